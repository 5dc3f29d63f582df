# shellcheck shell=bash
# Update scenarios (DESIGN.md §8, issue 5), the releases they need, and the update benchmark.
# shellcheck source=scripts/smoke/lib.sh
[[ -n ${SMOKE_LIB_LOADED:-} ]] || source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

SCENARIOS+=(
    "update_check|update --check (owner and root) reports v0.1.0 -> v0.smoke.0; up to date; no manifest: clear error"
    "update_to_unknown|update --to v9.9.9 (and bad versions) fails before anything changes: install byte-identical"
    "update_no_root|update as the owner refuses (run: sudo banger update), install byte-identical"
    "update_dry_run|update --dry-run stages and sanity-runs v0.smoke.0, installs nothing"
    "update_keeps_vm_alive|real swap to v0.smoke.0 with 2 running VMs: same VMMs and boots; install.toml, doctor, no .previous"
    "update_rollback_keeps_vm_alive|v0.smoke.broken (daemon exits 1) rolls back: old binary and version, VMs untouched"
    "update_busy_refused|an operation in flight refuses the update (listing it); --force proceeds"
    "update_crash_recovery|update SIGKILLed in its doctor step, then in its record step: doctor FAILs, next update rolls back / finishes"
    "update_bad_artifacts|tampered, wrongly signed, oversized, malicious-tar, schema 2, downgrade releases: each refused, install unchanged"
)

# --- update scenarios (DESIGN.md §8, issue 5) -------------------------------------------------------
# Releases are built once per run on the host (prepare_releases) and bound in at REL_DIR; each
# scenario serves them with python3's http.server on 127.0.0.1 inside its container, with a
# throw-away signing key. The installed version is the binary under test (Cargo's 0.1.0);
# v0.smoke.0 is a real build of this source stamped with that version; v0.smoke.broken and
# v0.smoke.slow are shell-script releases that run v0.smoke.0 (REL_REAL) for every role but
# misbehave on purpose: broken's daemon exits 1, slow's doctor / `version` hang while a marker
# file exists.

# Starts the release server and installs banger; sets UPD (the hidden flags every `banger update`
# here gets) and ORIG_FP (the install as it was before any update).
update_setup() {
    install_banger
    start_release_server
    UPD=(--manifest-url "$REL_URL/main/manifest.json" --pubkey-file "$REL_DIR/keys/key.pub.pem")
    ORIG_FP=$(host_fingerprint)
    ORIG_SHA=$(cx sha256sum /usr/local/lib/banger/banger | cut -d' ' -f1)
}

# python3 -m http.server's engine (scripts/smoke/serve.py: a free port, written to a file) in a
# transient unit, so it outlives the command that started it; serves /srv/www, where main/ and
# big/ link to the bound releases and scenarios add their own trees. Sets REL_URL.
start_release_server() {
    cx mkdir -p /srv/www
    cx ln -sfn "$REL_DIR/www/main" /srv/www/main
    cx test ! -d "$REL_DIR/www/big" || cx ln -sfn "$REL_DIR/www/big" /srv/www/big
    cx test ! -d "$REL_DIR/www/bench" || cx ln -sfn "$REL_DIR/www/bench" /srv/www/bench
    must "start the release server" cx systemd-run --quiet --unit=smoke-releases \
        python3 "$SMOKE_LIB/serve.py" /srv/www /run/smoke-releases.port
    local deadline=$(($(now_ms) + 10000)) port=""
    while (($(now_ms) < deadline)); do
        port=$(cx cat /run/smoke-releases.port 2>/dev/null || true)
        [[ -n $port ]] && break
        sleep 0.05
    done
    [[ -n $port ]] || fail "the release server did not start: $(cx journalctl -u smoke-releases -o cat --no-pager | tail -n 3)"
    REL_URL=http://127.0.0.1:$port
    must "the release server answers" cx python3 -c 'import sys, urllib.request
urllib.request.urlopen(sys.argv[1], timeout=5).read()' "$REL_URL/main/manifest.json"
}

# What an update must not change when it fails or only looks: the real binary, install.toml, the
# units, the links, the lib dir listing (no .previous, no banger.new), no staging left behind, and
# nothing else under /var/cache/banger (no lock file: a refused update creates nothing). The
# staging line comes before the cache line: --dry-run compares what precedes it.
host_fingerprint() {
    # shellcheck disable=SC2016 # expanded inside the container
    cx sh -c 'cd / && sha256sum usr/local/lib/banger/banger etc/banger/install.toml \
        etc/systemd/system/bangerd.service etc/systemd/system/bangerd-root.service
        echo "lib: $(ls -A usr/local/lib/banger | tr "\n" " ")"
        for l in banger bangerd bangerd-root; do printf "%s -> %s\n" $l "$(readlink usr/local/bin/$l)"; done
        echo "staging: $(ls -A var/cache/banger/updates 2>/dev/null | tr "\n" " ")"
        echo "cache: $(find var/cache/banger -path var/cache/banger/updates -prune -o -printf "%p %y %m %u " 2>/dev/null)"'
}

expect_untouched() {
    local now
    now=$(host_fingerprint)
    [[ $now == "$ORIG_FP" ]] || fail "$1: the install changed: $(diff <(echo "$ORIG_FP") <(echo "$now") | grep '^[<>]' | tr '\n' ' ')"
}

# A failed `banger update`: progress lines, then the error in the `banger: what: why (hint)` shape.
expect_update_error() {
    expect_clear_error "$(last_line "$OUT")" "$1"
    expect_eq "$(grep -vc '^banger update: ' <<<"$OUT")" 1 "$1: lines besides the progress lines (one error line)"
}

# The installed version, as `banger version` says.
expect_version() {
    must "banger version" cu banger version
    expect_eq "$(sed -n 's/^version: *//p' <<<"$OUT")" "$1" "banger version $2"
}

# The stdout line of the last must/must_fail (progress lines start with `banger update:`).
outcome_line() { grep -v '^banger update: ' <<<"$OUT" | tail -n1; }

# VMs named "$@" are running and still the same VMM processes and the same boots as recorded by
# remember_vms (VM_IDENT[name] = "pid start boot").
declare -A VM_IDENT=()
remember_vms() {
    local n
    for n in "$@"; do
        vm_get "$n"
        expect_eq "$VM_STATE" running "$n before the update"
        expect_vmm_process "$n before the update"
        VM_IDENT[$n]="$VM_PID $VM_START $VM_BOOT"
    done
}
expect_vms_unchanged() {
    local n what=$1 pid start boot
    shift
    for n in "$@"; do
        read -r pid start boot <<<"${VM_IDENT[$n]}"
        expect_eq "$(proc_ident "$pid")" "$start firecracker" "$n: the VMM (pid $pid) $what"
        vm_list_get "$n"
        expect_eq "$L_STATE $L_PID $L_START $L_BOOT" "running $pid $start $boot" "$n in vm list $what"
        vm_get "$n"
        expect_vmm_process "$n $what"
        expect_guest_boot 1 "$n $what"
    done
}

# An update left no journal and nothing staged, and doctor says so.
expect_no_pending_update() {
    expect_absent /var/cache/banger/updates "$1"
    must "doctor as root $1" cx banger doctor --json
    expect_eq "$(jq -r '.checks[] | select(.name == "update") | .level' <<<"$OUT")" PASS "doctor's update row $1"
}

scenario_update_check() {
    update_setup
    must "update --check as $TEST_USER" cu banger update --check "${UPD[@]}"
    expect_eq "$(outcome_line)" "update available: v0.1.0 -> v0.smoke.0" "update --check as $TEST_USER"
    expect_eq "$(grep -vc '^banger update: ' <<<"$OUT")" 1 "update --check prints one line on stdout"
    must "update --check as root" cx banger update --check "${UPD[@]}"
    expect_eq "$(outcome_line)" "update available: v0.1.0 -> v0.smoke.0" "update --check as root"
    must "update --check --to v0.smoke.broken" cu banger update --check --to v0.smoke.broken "${UPD[@]}"
    expect_eq "$(outcome_line)" "update available: v0.1.0 -> v0.smoke.broken" "update --check --to"
    # A manifest whose latest is the installed version.
    cx mkdir -p /srv/www/same
    cx sh -c 'printf "%s\n" "{\"schema_version\": 1, \"latest_stable\": \"v0.1.0\", \"releases\": [{\"version\": \"v0.1.0\",
        \"tarball_url\": \"v0.1.0/banger-v0.1.0-linux-amd64.tar.gz\", \"sha256sums_url\": \"v0.1.0/SHA256SUMS\",
        \"sha256sums_sig_url\": \"v0.1.0/SHA256SUMS.sig\"}]}" >/srv/www/same/manifest.json'
    must "update --check, latest = installed" cu banger update --check --manifest-url "$REL_URL/same/manifest.json" \
        --pubkey-file "$REL_DIR/keys/key.pub.pem"
    expect_eq "$(outcome_line)" "up to date (v0.1.0)" "update --check when up to date"
    must "update as root, latest = installed" cx banger update --manifest-url "$REL_URL/same/manifest.json" \
        --pubkey-file "$REL_DIR/keys/key.pub.pem"
    expect_eq "$(outcome_line)" "up to date (v0.1.0)" "update when up to date"
    # No manifest at all: a clear error.
    must_fail "update --check, no manifest" cu banger update --check --manifest-url "$REL_URL/nowhere/manifest.json"
    expect_update_error "update --check, no manifest"
    expect_untouched "after --check"
    expect_version 0.1.0 "after --check"
}

scenario_update_to_unknown() {
    update_setup
    local v
    for v in v9.9.9 v0.0.0 not-a-version; do
        must_fail "update --to $v" cx banger update --to "$v" "${UPD[@]}"
        expect_eq "$RC" 1 "update --to $v exit code"
        expect_update_error "update --to $v"
        expect_match "$OUT" "${v#v}" "update --to $v names the version"
        expect_untouched "after update --to $v"
    done
    must_fail "update --check --to v9.9.9" cu banger update --check --to v9.9.9 "${UPD[@]}"
    expect_update_error "update --check --to v9.9.9"
    expect_untouched "after update --check --to v9.9.9"
    must "daemon status" cu banger daemon status
    expect_version 0.1.0 "after the refused updates"
}

scenario_update_no_root() {
    update_setup
    must_fail "update as $TEST_USER" cu banger update "${UPD[@]}"
    expect_eq "$RC" 1 "update as $TEST_USER exit code"
    expect_update_error "update as $TEST_USER"
    expect_match "$OUT" 'root is required \(run: sudo banger update\)' "update as $TEST_USER says why"
    must_fail "update --to as $TEST_USER" cu banger update --to v0.smoke.0 "${UPD[@]}"
    expect_match "$OUT" 'root is required \(run: sudo banger update --to v0.smoke.0\)' "update --to as $TEST_USER"
    must_fail "update --dry-run as $TEST_USER" cu banger update --dry-run "${UPD[@]}"
    expect_match "$OUT" 'root is required' "update --dry-run as $TEST_USER"
    must_fail "update --force as $TEST_USER" cu banger update --force "${UPD[@]}"
    expect_match "$OUT" 'root is required' "update --force as $TEST_USER"
    expect_untouched "after updates as $TEST_USER"
    expect_version 0.1.0 "after updates as $TEST_USER"
    must "daemon status" cu banger daemon status
}

scenario_update_dry_run() {
    update_setup
    must "update --dry-run" cx banger update --dry-run "${UPD[@]}"
    expect_match "$(outcome_line)" '^dry run: would update v0\.1\.0 -> v0\.smoke\.0; verified and staged in /var/cache/banger/updates' \
        "update --dry-run outcome"
    expect_match "$OUT" 'signature verified' "update --dry-run verified the signature"
    expect_match "$OUT" 'staged v0\.smoke\.0 runs' "update --dry-run sanity-ran the staged binary"
    # The staged binary is the release's, byte for byte; nothing else changed.
    local staged
    staged=$(cx find /var/cache/banger/updates -type f -name banger)
    [[ -n $staged ]] || fail "no staged banger under /var/cache/banger/updates after --dry-run"
    expect_eq "$(cx sha256sum "$staged" | cut -d' ' -f1)" "$(cx sha256sum "$REL_REAL" | cut -d' ' -f1)" \
        "staged binary vs the v0.smoke.0 release binary"
    local fp=${ORIG_FP%staging:*}
    [[ $(host_fingerprint) == "$fp"staging:* ]] || fail "--dry-run changed the install: $(host_fingerprint)"
    expect_version 0.1.0 "after --dry-run"
    expect_eq "$(toml_get version)" 0.1.0 "install.toml version after --dry-run"
    must "daemon status" cu banger daemon status
    # A real update afterwards starts from a clean staging dir; a second dry run too.
    must "second update --dry-run" cx banger update --dry-run "${UPD[@]}"
    expect_match "$(outcome_line)" '^dry run: would update' "second --dry-run"
}

scenario_update_keeps_vm_alive() {
    vm_setup
    update_setup
    must "vm create one" cu banger vm create --name one --image "$IMAGE"
    must "vm create two" cu banger vm create --name two --image "$IMAGE"
    remember_vms one two
    local started elapsed
    started=$(now_ms)
    must "update to v0.smoke.0" cx banger update "${UPD[@]}"
    elapsed=$(($(now_ms) - started))
    printf 'update took %s ms\n' "$elapsed"
    expect_eq "$(outcome_line)" "updated v0.1.0 -> v0.smoke.0" "update outcome"
    expect_active bangerd bangerd-root
    expect_vms_unchanged "after the update" one two
    expect_eq "$(cx sha256sum /usr/local/lib/banger/banger | cut -d' ' -f1)" \
        "$(cx sha256sum "$REL_REAL" | cut -d' ' -f1)" "installed binary vs the v0.smoke.0 release binary"
    expect_stat /usr/local/lib/banger/banger "755" root root "installed binary"
    expect_eq "$(cx ls -A /usr/local/lib/banger | tr '\n' ' ')" "banger " "/usr/local/lib/banger after the update"
    expect_version 0.smoke.0 "after the update"
    expect_eq "$(toml_get version)" 0.smoke.0 "install.toml version"
    expect_eq "$(toml_get commit)" smoke-v0.smoke.0 "install.toml commit"
    expect_eq "$(toml_get built_at)" 2026-01-01T00:00:00Z "install.toml built_at"
    expect_eq "$(toml_get owner_user)" "$TEST_USER" "install.toml owner_user after the update"
    # The services run the new file (exec'd after the swap), not the old inode.
    local unit pid
    for unit in bangerd bangerd-root; do
        pid=$(cx systemctl show -P MainPID "$unit")
        expect_eq "$(cx readlink "/proc/$pid/exe")" /usr/local/lib/banger/banger "$unit's executable after the update"
    done
    expect_no_pending_update "after the update"
    expect_doctor_clean
    # The new daemon manages the VMs it inherited.
    must "vm stop one after the update" cu banger vm stop one --timeout 5
    vm_get one
    expect_eq "$VM_STATE" stopped "one after stop"
    must "vm delete one two" cu banger vm delete one two
    expect_no_vms "after delete"
    must "update again: up to date" cx banger update "${UPD[@]}"
    expect_eq "$(outcome_line)" "up to date (v0.smoke.0)" "update after the update"
}

scenario_update_rollback_keeps_vm_alive() {
    vm_setup
    update_setup
    must "vm create one" cu banger vm create --name one --image "$IMAGE"
    must "vm create two" cu banger vm create --name two --image "$IMAGE"
    remember_vms one two
    local helper_before
    helper_before=$(cx systemctl show -P MainPID bangerd-root)
    local since
    since=$(cx date '+%Y-%m-%d %H:%M:%S')
    must_fail "update to v0.smoke.broken" cx banger update --to v0.smoke.broken "${UPD[@]}"
    expect_eq "$RC" 1 "failed update exit code"
    expect_update_error "update to v0.smoke.broken"
    expect_match "$OUT" '\(rolled back to previous install\)' "the failed update says it rolled back"
    expect_match "$OUT" 'rolling back to v0\.1\.0' "the failed update's progress"
    # What triggered the rollback is the daemon's restart into the broken release: the update
    # says the restart (or the wait for the daemon after it) failed, and the journal shows the
    # broken release's bangerd refusing to start during this update.
    expect_match "$OUT" 'banger update: (systemctl restart bangerd\.service|waiting for the daemon) failed; rolling back to v0\.1\.0' \
        "the rollback was triggered by the daemon's restart"
    local journal
    journal=$(cx journalctl -u bangerd --since "$since" -o cat --no-pager 2>&1)
    expect_match "$journal" 'bangerd v0\.smoke\.broken: refusing to start' \
        "bangerd's journal: the broken release ran and refused to start"
    expect_active bangerd bangerd-root
    must "daemon status after the rollback" cu banger daemon status
    expect_version 0.1.0 "after the rollback"
    expect_eq "$(cx sha256sum /usr/local/lib/banger/banger | cut -d' ' -f1)" "$ORIG_SHA" "binary hash after the rollback"
    expect_untouched "after the rollback"
    [[ $(cx systemctl show -P MainPID bangerd-root) != "$helper_before" ]] \
        || fail "bangerd-root was not restarted (the broken release never ran?)"
    local unit pid
    for unit in bangerd bangerd-root; do
        pid=$(cx systemctl show -P MainPID "$unit")
        expect_eq "$(cx readlink "/proc/$pid/exe")" /usr/local/lib/banger/banger "$unit's executable after the rollback"
    done
    expect_vms_unchanged "after the rollback" one two
    expect_doctor_clean
    must "vm stop one after the rollback" cu banger vm stop one --timeout 5
    must "vm delete one two" cu banger vm delete one two
    expect_no_vms "after delete"
}

scenario_update_busy_refused() {
    vm_setup
    update_setup
    # An image whose ready line never comes: its create waits (60 s) with the operation in flight.
    must "image import never" cu banger image import never --rootfs "$GUEST_DIR/rootfs.img" --kernel tiny \
        --ready-console 'banger-smoke: this line never comes'
    cu banger vm create --name waiting --image never >"$RUN_DIR/busy-create.out" 2>&1 &
    local create_pid=$! deadline ops=""
    deadline=$(($(now_ms) + 20000))
    while (($(now_ms) < deadline)); do
        ops=$(cu python3 "$SMOKE_LIB/rpc.py" "$DAEMON_SOCK" daemon.operations.list 2>/dev/null || true)
        [[ $(jq -r '[.. | objects | select(has("stage") and .done == false)] | length' <<<"$ops" 2>/dev/null) \
            -gt 0 ]] && break
        sleep 0.1
    done
    printf 'operations: %s\n' "$ops"
    must_fail "update with an operation in flight" cx banger update "${UPD[@]}"
    expect_eq "$RC" 1 "refused update exit code"
    expect_update_error "update with an operation in flight"
    expect_match "$OUT" '[0-9]+ operation\(s\) are in flight: op-' "the refusal lists the operations"
    expect_match "$OUT" '--force' "the refusal names --force"
    expect_untouched "after the refused update"
    kill -0 "$create_pid" 2>/dev/null || fail "the create finished before the update was tried: $(cat "$RUN_DIR/busy-create.out")"
    local started
    started=$(now_ms)
    must "update --force with an operation in flight" cx banger update --force "${UPD[@]}"
    note "update --force with a vm create in flight took $(($(now_ms) - started)) ms"
    expect_eq "$(outcome_line)" "updated v0.1.0 -> v0.smoke.0" "update --force outcome"
    expect_match "$OUT" '--force: updating although [0-9]+ operation\(s\) are in flight' "update --force says what it overrode"
    expect_version 0.smoke.0 "after update --force"
    must "daemon status after update --force" cu banger daemon status
    local rc=0
    wait "$create_pid" || rc=$?
    note "the create in flight during update --force: exit $rc: $(last_line "$(cat "$RUN_DIR/busy-create.out")")"
    expect_doctor_clean
}

# Starts `banger update ARGS` as root in the background inside the container; UPD_PID is its pid
# in there, UPD_LOG where its output goes (on the host).
start_update_bg() {
    UPD_BG_SEQ=$((${UPD_BG_SEQ:-0} + 1))
    UPD_LOG=$RUN_DIR/update-bg.$UPD_BG_SEQ.out
    cx rm -f /run/smoke-update.pid
    # shellcheck disable=SC2016 # expanded inside the container
    # (Its cx dies with the same SIGKILL, which bash would report on stderr: hence the braces.)
    { cx sh -c 'echo $$ >/run/smoke-update.pid; exec banger update "$@"' update "$@" >"$UPD_LOG" 2>&1 & } 2>/dev/null
    local deadline=$(($(now_ms) + 5000))
    UPD_PID=""
    while [[ -z $UPD_PID ]] && (($(now_ms) < deadline)); do
        UPD_PID=$(cx cat /run/smoke-update.pid 2>/dev/null || true)
        sleep 0.02
    done
    [[ -n $UPD_PID ]] || fail "the background update did not start"
}

# Waits until the update journal has a record STEP (while the update runs).
wait_journal_step() {
    local step=$1 deadline=$(($(now_ms) + 60000))
    while (($(now_ms) < deadline)); do
        cx grep -qF "\"step\":\"$step\"" /var/cache/banger/updates/journal.jsonl 2>/dev/null && return 0
        cx kill -0 "$UPD_PID" 2>/dev/null || fail "the update ended before journal step $step: $(tail -n 3 "$UPD_LOG" | tr '\n' ' ')"
        sleep 0.05
    done
    fail "no journal step $step within 60 s: $(tail -n 3 "$UPD_LOG" | tr '\n' ' ')"
}

# SIGKILLs the background update and the hung child it waits for (the release's doctor or version).
kill_update() {
    local kids
    kids=$(cx pgrep -P "$UPD_PID" | tr '\n' ' ' || true)
    # shellcheck disable=SC2086 # one word per pid
    must "SIGKILL the update (pid $UPD_PID) and its children ($kids)" cx kill -KILL "$UPD_PID" $kids
    local deadline=$(($(now_ms) + 5000))
    while cx kill -0 "$UPD_PID" 2>/dev/null && (($(now_ms) < deadline)); do sleep 0.05; done
    printf '$ (killed update output)\n%s\n' "$(grep -v '^scripts/smoke.sh: line [0-9]*: .* Killed' "$UPD_LOG")"
}

scenario_update_crash_recovery() {
    vm_setup
    update_setup
    must "vm create one" cu banger vm create --name one --image "$IMAGE"
    remember_vms one
    local slow_sha
    slow_sha=$(cx sha256sum "$REL_DIR/wrap/v0.smoke.slow" | cut -d' ' -f1)

    # 1. Killed while the new release's doctor runs: services already restarted on the new binary.
    cx touch /run/banger-smoke-hang-doctor
    start_update_bg --to v0.smoke.slow "${UPD[@]}"
    wait_journal_step doctor.begin
    # (Not through /usr/local/bin/banger: that is the hanging release now.)
    must "doctor while the update hangs" cx "$REL_REAL" doctor --json
    expect_eq "$(jq -r '.checks[] | select(.name == "update") | .level' <<<"$OUT")" WARN "doctor's update row while an update runs"
    kill_update
    cx rm -f /run/banger-smoke-hang-doctor
    expect_eq "$(cx sha256sum /usr/local/lib/banger/banger | cut -d' ' -f1)" "$slow_sha" "binary after the kill (the new one)"
    local rc=0
    OUT=$(cx banger doctor 2>&1) || rc=$?
    printf '$ banger doctor  (exit %s)\n%s\n' "$rc" "$OUT"
    expect_eq "$rc" 1 "doctor exit code with an interrupted update"
    expect_match "$OUT" "(^|$NL)FAIL +update$NL +an update v0\.1\.0 -> v0\.smoke\.slow was interrupted" "doctor reports the leftover"
    expect_match "$OUT" 'run sudo banger update' "doctor says what to run"
    must_fail "update --dry-run with a leftover journal" cx banger update --dry-run "${UPD[@]}"
    expect_match "$OUT" 'without --dry-run' "dry run refuses to run over a leftover"
    must "update after the crash (recovers)" cx banger update "${UPD[@]}"
    expect_match "$(outcome_line)" '^rolled back the interrupted update v0\.1\.0 -> v0\.smoke\.slow: v0\.1\.0 is installed' \
        "recovery outcome"
    expect_untouched "after the recovery (exactly the old install)"
    expect_version 0.1.0 "after the recovery"
    must "daemon status after the recovery" cu banger daemon status
    expect_vms_unchanged "after crash 1 and recovery" one
    expect_doctor_clean

    # 2. Killed while recording, after the new doctor passed: the next update finishes it.
    cx touch /run/banger-smoke-hang-version
    start_update_bg --to v0.smoke.slow "${UPD[@]}"
    wait_journal_step commit.begin
    kill_update
    cx rm -f /run/banger-smoke-hang-version
    OUT=$(cx banger doctor 2>&1) || true
    printf '$ banger doctor\n%s\n' "$OUT"
    expect_match "$OUT" "(^|$NL)FAIL +update$NL" "doctor reports the second leftover"
    must "update after the second crash (finishes)" cx banger update "${UPD[@]}"
    expect_match "$(outcome_line)" '^finished the interrupted update v0\.1\.0 -> v0\.smoke\.slow: v0\.smoke\.slow is installed' \
        "recovery outcome"
    expect_eq "$(cx sha256sum /usr/local/lib/banger/banger | cut -d' ' -f1)" "$slow_sha" "binary after finishing"
    expect_eq "$(cx ls -A /usr/local/lib/banger | tr '\n' ' ')" "banger " "/usr/local/lib/banger after finishing"
    expect_eq "$(toml_get version)" 0.smoke.slow "install.toml version after finishing"
    expect_version 0.smoke.slow "after finishing"
    must "daemon status after finishing" cu banger daemon status
    expect_no_pending_update "after finishing"
    expect_vms_unchanged "after crash 2 and recovery" one
    # The wrapper release runs v0.smoke.0's code, whose own build info differs from what the
    # wrapper says: doctor's version row may WARN about the drift; nothing may FAIL.
    expect_doctor_clean
    must "vm delete one" cu banger vm delete one
    expect_no_vms "after delete"
}

scenario_update_bad_artifacts() {
    update_setup
    must "build the bad releases" cx python3 "$SMOKE_LIB/badrel.py" /srv/www/bad "$REL_DIR/keys/key.pem" \
        "$REL_DIR/keys/other.pem" v0.smoke.9 "$REL_DIR/wrap/v0.smoke.broken"
    local cases=$OUT c args
    # case -> what the refusal must say
    declare -A WANT=(
        [tampered_tarball]='does not match SHA256SUMS'
        [tampered_sums]='verifying the SHA256SUMS signature: it does not verify against any trusted key'
        [wrong_key]='verifying the SHA256SUMS signature: it does not verify against any trusted key'
        [truncated_sig]='the signature is truncated: its DER header says [0-9]+ bytes, it has 30'
        [garbage_sig]='the signature is not valid base64'
        [empty_sig]='signature file is empty'
        [oversized_sig]='larger than'
        [oversized_sums]='larger than|over .*limit|16384'
        [oversized_manifest]='larger than'
        [oversized_tarball]='larger than|over .*limit|268435456'
        [oversized_file]='over the [0-9]+-byte limit'
        [traversal]='entry'
        [absolute]='entry'
        [dot_dot_inside]='entry'
        [symlink]='symlink|link'
        [hardlink]='link'
        [device]='device'
        [directory]='director'
        [extra_file]='unexpected file "README"'
        [twice]='appears twice'
        [missing_binary]='unexpected file "README"|missing banger'
        [schema_version_2]='schema_version 2 is newer.*upgrade banger manually|schema_version 2'
        [no_sig_url]='sha256sums_sig_url'
        [not_json]='manifest'
        [downgrade]='older than the installed.*downgrade'
    )
    for c in $cases; do
        [[ -n ${WANT[$c]:-} ]] || fail "badrel.py made case $c, which this scenario does not know"
        args=(--manifest-url "$REL_URL/bad/$c/manifest.json" --pubkey-file "$REL_DIR/keys/key.pub.pem")
        must_fail "update from the $c release" cx banger update "${args[@]}"
        expect_eq "$RC" 1 "$c: exit code"
        expect_update_error "$c"
        expect_match "$OUT" "${WANT[$c]}" "$c: the refusal says why"
        expect_untouched "after the $c release"
        printf 'refused %s: %s\n' "$c" "$(last_line "$OUT")" | tee -a "$RUN_DIR/bad-artifacts.txt"
    done
    # Downgrades only on purpose: --to alone is not enough either.
    args=(--manifest-url "$REL_URL/bad/downgrade/manifest.json" --pubkey-file "$REL_DIR/keys/key.pub.pem")
    must_fail "update --to v0.0.1 without --allow-downgrade" cx banger update --to v0.0.1 "${args[@]}"
    expect_match "$OUT" 'allow-downgrade' "downgrade refusal names --allow-downgrade"
    expect_untouched "after --to v0.0.1"
    # A mislabelled release: signed and intact, but its binary does not say it is that version.
    must_fail "update --to v0.smoke.broken with --pubkey-file of another key" cx banger update --to v0.smoke.broken \
        --manifest-url "$REL_URL/main/manifest.json" --pubkey-file "$REL_DIR/keys/other.pub.pem"
    expect_match "$OUT" 'it does not verify against any trusted key' "the main release under another key"
    expect_untouched "after the wrong --pubkey-file"
    # A private key where the public one belongs.
    must_fail "update with a private key as --pubkey-file" cx banger update "${UPD[@]:0:2}" --pubkey-file "$REL_DIR/keys/key.pem"
    expect_update_error "private key as --pubkey-file"
    expect_untouched "after the private key"
    expect_version 0.1.0 "after every bad release"
    expect_no_pending_update "after every bad release"
    expect_doctor_clean
}

# --- releases for the update scenarios -------------------------------------------------------------
# Built once per run on the host into $RUN_DIR/releases and bound in read-only at REL_DIR:
#   bin/v0.smoke.0/banger   this source built with BANGER_VERSION=v0.smoke.0 (dev profile, stripped)
#   keys/                   a throw-away signing key (key.pem, key.pub.pem) and another (other*.pem)
#   wrap/<version>          the shell-script release binaries (v0.smoke.broken, v0.smoke.slow)
#   www/main/               manifest.json (latest v0.smoke.0) + the three releases, by release.sh
#   www/bench/, www/big/    with --bench: v0.1.0 (the binary under test) beside v0.smoke.0; and
#                           v0.smoke.0 padded to 100 MiB with random bytes

REL_HOST=""
RELEASE_EPOCH=1767225600   # built_at of the release builds: 2026-01-01T00:00:00Z

# The v0.smoke.0 build: a dev build of this source with the version stamped in, in its own target
# dir under the cache (seeded from target/ on first use, so only banger itself compiles).
build_release_binary() {
    local tdir=$CACHE_DIR/release-target lock_fd sub=x86_64-unknown-linux-gnu/debug
    mkdir -p "$CACHE_DIR"
    exec {lock_fd}>"$CACHE_DIR/release-target.lock"
    flock "$lock_fd"
    if [[ ! -d $tdir/$sub/deps && -d $REPO_ROOT/target/$sub/deps ]]; then
        log "seeding $tdir from target/ (no full rebuild)"
        mkdir -p "$tdir/$sub"
        [[ ! -d $REPO_ROOT/target/debug ]] || cp -a "$REPO_ROOT/target/debug" "$tdir/"
        cp -a "$REPO_ROOT/target/$sub/build" "$REPO_ROOT/target/$sub/deps" "$REPO_ROOT/target/$sub/.fingerprint" "$tdir/$sub/"
    fi
    log "building banger v0.smoke.0 (cargo build, dev profile, CARGO_TARGET_DIR=$tdir)"
    (cd "$REPO_ROOT" && CARGO_TARGET_DIR=$tdir CARGO_INCREMENTAL=0 BANGER_VERSION=v0.smoke.0 \
        BANGER_COMMIT=smoke-v0.smoke.0 SOURCE_DATE_EPOCH=$RELEASE_EPOCH cargo build --quiet --bin banger) \
        || die "building banger v0.smoke.0 failed"
    exec {lock_fd}>&-
    RELEASE_BUILD=$tdir/$sub/banger
}

# A release binary that is a shell script running v0.smoke.0 for every role (argv[0] picks the
# role, so the real file is called banger and other roles go through --role), claiming VERSION.
# KIND broken: its daemon exits 1 (but --version and --check-migrations work, so the update's
# sanity run passes). KIND slow: `doctor` / `version` wait while /run/banger-smoke-hang-doctor /
# -version exists (to SIGKILL an update at a known step).
write_release_wrapper() {
    local out=$1 version=$2 kind=$3
    cat >"$out" <<WRAPPER
#!/bin/sh
# banger smoke-test release $version ($kind): runs v0.smoke.0 for every role.
real=$REL_DIR/bin/v0.smoke.0/banger
v=${version#v}
kind=$kind
WRAPPER
    cat >>"$out" <<'WRAPPER'
role=${0##*/}
case $role in
bangerd | bangerd-root) ;;
*)
    role=banger
    if [ "${1:-}" = --role ]; then role=$2; shift 2; fi
    ;;
esac
if [ "$role" = banger ]; then
    case ${1:-} in
    --version)
        echo "banger v$v (commit smoke-v$v, built 2026-01-01T00:00:00Z)"
        exit 0
        ;;
    version)
        while [ "$kind" = slow ] && [ -e /run/banger-smoke-hang-version ]; do sleep 0.1; done
        printf 'version: %s\ncommit: smoke-v%s\nbuilt_at: 2026-01-01T00:00:00Z\n' "$v" "$v"
        exit 0
        ;;
    doctor)
        while [ "$kind" = slow ] && [ -e /run/banger-smoke-hang-doctor ]; do sleep 0.1; done
        ;;
    esac
    exec "$real" "$@"
fi
if [ "$kind" = broken ] && [ "$role" = bangerd ]; then
    case " $* " in
    *" --version "* | *" --check-migrations "*) ;;
    *)
        echo "bangerd v$v: refusing to start (a smoke-test release broken on purpose)" >&2
        exit 1
        ;;
    esac
fi
exec "$real" --role "$role" "$@"
WRAPPER
    chmod 0755 "$out"
}

# release.sh into WWW with KEY; the rest of the arguments are passed on.
make_release() {
    local www=$1
    shift
    bash "$REPO_ROOT/packaging/release.sh" --out "$www" --key "$REL_HOST/keys/key.pem" "$@" \
        >>"$REL_HOST/release.log" 2>&1 || die "packaging/release.sh $* failed (see $REL_HOST/release.log)"
}

prepare_releases() {
    local bench=$1 started d
    started=$(now_ms)
    REL_HOST=$RUN_DIR/releases
    d=$REL_HOST
    mkdir -p "$d/bin/v0.smoke.0" "$d/keys" "$d/www/main" "$d/wrap"
    build_release_binary
    strip -o "$d/bin/v0.smoke.0/banger" "$RELEASE_BUILD" || die "strip $RELEASE_BUILD failed"
    "$d/bin/v0.smoke.0/banger" --version | grep -qF 'banger v0.smoke.0 ' \
        || die "the v0.smoke.0 build says $("$d/bin/v0.smoke.0/banger" --version)"
    bash "$REPO_ROOT/packaging/release.sh" --gen-key --key "$d/keys/other.pem" --print-pubkey \
        >/dev/null 2>"$d/release.log" || die "generating a signing key failed"
    make_release "$d/www/main" --gen-key --version v0.smoke.0 --binary "$d/bin/v0.smoke.0/banger"
    write_release_wrapper "$d/wrap/v0.smoke.broken" v0.smoke.broken broken
    write_release_wrapper "$d/wrap/v0.smoke.slow" v0.smoke.slow slow
    make_release "$d/www/main" --version v0.smoke.broken --binary "$d/wrap/v0.smoke.broken" --no-latest
    make_release "$d/www/main" --version v0.smoke.slow --binary "$d/wrap/v0.smoke.slow" --no-latest
    if [[ $bench == yes ]]; then
        # Named banger: release.sh runs it (`--release-keys`), and the binary picks its role by name.
        mkdir -p "$d/bin/v0.1.0"
        strip -o "$d/bin/v0.1.0/banger" "$BIN" || die "strip $BIN failed"
        make_release "$d/www/bench" --version v0.1.0 --binary "$d/bin/v0.1.0/banger"
        make_release "$d/www/bench" --version v0.smoke.0 --binary "$d/bin/v0.smoke.0/banger"
        local pad=$((100 * 1024 * 1024 - $(stat -c %s "$d/bin/v0.smoke.0/banger")))
        mkdir -p "$d/bin/big"
        { cat "$d/bin/v0.smoke.0/banger"; head -c "$pad" /dev/urandom; } >"$d/bin/big/banger"
        chmod 0755 "$d/bin/big/banger"
        make_release "$d/www/big" --version v0.smoke.0 --binary "$d/bin/big/banger"
        rm -rf "$d/bin/big" "$d/bin/v0.1.0"
        local rel=${SMOKE_RELEASE_BIN:-$REPO_ROOT/target/x86_64-unknown-linux-gnu/release/banger}
        BENCH_RELEASE_SKIP=""
        if [[ ! -x $rel ]]; then
            BENCH_RELEASE_SKIP="no release-profile build at $rel (set SMOKE_RELEASE_BIN)"
        elif ! "$rel" update --help >/dev/null 2>&1; then
            BENCH_RELEASE_SKIP="$rel ($("$rel" --version 2>&1)) predates banger update; rebuild it (cargo build --release) or set SMOKE_RELEASE_BIN"
        else
            mkdir -p "$d/bin/release"
            cp "$rel" "$d/bin/release/banger"
        fi
    fi
    chmod -R a+rX "$d"
    chmod 0600 "$d/keys/key.pem" "$d/keys/other.pem"
    log "releases in $REL_HOST ($(secs $(($(now_ms) - started))))"
}

# --- benchmark ---

# `banger update` numbers in one container: the whole update v0.1.0 -> v0.smoke.0 and back (a
# downgrade on purpose) with a tight ping loop on the daemon socket beside it; then the staging
# throughput of `update --dry-run` on the 100 MiB release beside sha256sum of the same tarball.
bench_update() { bench_in_container update bench_update_body; }

bench_update_body() {
    update_setup
    local key=$REL_DIR/keys/key.pub.pem i up=() down=() gap=() gap2=() dgap=() tar_up tar_down
    tar_up=$REL_DIR/www/bench/v0.smoke.0/banger-v0.smoke.0-linux-amd64.tar.gz
    tar_down=$REL_DIR/www/bench/v0.1.0/banger-v0.1.0-linux-amd64.tar.gz
    for i in 1 2 3 4 5; do
        must "update up #$i" cx python3 "$SMOKE_LIB/restart_gap.py" "$DAEMON_SOCK" -- banger update \
            --manifest-url "$REL_URL/bench/manifest.json" --pubkey-file "$key"
        expect_eq "$(jq -r '"\(.rc) \(.output)"' <<<"$OUT")" "0 updated v0.1.0 -> v0.smoke.0" "update up #$i"
        up+=("$(jq .restart_ms <<<"$OUT")")
        gap+=("$(jq .outage_ms <<<"$OUT")")
        gap2+=("$(jq .last_fail_to_ok_ms <<<"$OUT")")
        must "update down #$i" cx python3 "$SMOKE_LIB/restart_gap.py" "$DAEMON_SOCK" -- banger update --to v0.1.0 \
            --allow-downgrade --manifest-url "$REL_URL/bench/manifest.json" --pubkey-file "$key"
        expect_eq "$(jq -r '"\(.rc) \(.output)"' <<<"$OUT")" "0 updated v0.smoke.0 -> v0.1.0" "update down #$i"
        down+=("$(jq .restart_ms <<<"$OUT")")
        dgap+=("$(jq .outage_ms <<<"$OUT")")
    done
    bench "update: whole banger update v0.1.0 -> v0.smoke.0 ($(size_mib "$tar_up") MiB tarball, $(size_mib "$REL_REAL") MiB binary, local server): $(printf '%s\n' "${up[@]}" | med) (target <= 1500 ms)"
    bench "update: daemon unavailability during it, last answered -> next answered ping: $(printf '%s\n' "${gap[@]}" | med) (target <= 300 ms); last failed -> first answered: $(printf '%s\n' "${gap2[@]}" | med)"
    bench "update: downgrade v0.smoke.0 -> v0.1.0 ($(size_mib "$tar_down") MiB tarball): $(printf '%s\n' "${down[@]}" | med); unavailability $(printf '%s\n' "${dgap[@]}" | med)"

    local big=$REL_DIR/www/big/v0.smoke.0/banger-v0.smoke.0-linux-amd64.tar.gz stage=() sums=() bytes
    bytes=$(cx stat -c %s "$big")
    cx cat "$big" >/dev/null
    for i in 1 2 3; do
        must "update --dry-run of the 100 MiB release #$i" cx python3 "$SMOKE_LIB/timed_lines.py" banger update --dry-run \
            --manifest-url "$REL_URL/big/manifest.json" --pubkey-file "$key"
        expect_match "$(jq -r .stdout <<<"$OUT")" '^dry run: would update' "dry run #$i"
        stage+=("$(jq '(.lines | map(select(.[1] | test("matches the signed SHA256SUMS"))) | .[0][0])
            - (.lines | map(select(.[1] | test("downloading banger-.*tar.gz"))) | .[0][0])' <<<"$OUT")")
        must "sha256sum of the 100 MiB tarball #$i" cx python3 "$SMOKE_LIB/timed_lines.py" sha256sum "$big"
        sums+=("$(jq .total_ms <<<"$OUT")")
    done
    local ms mss
    ms=$(printf '%s\n' "${stage[@]}" | jq -s 'sort | .[length / 2 | floor]')
    mss=$(printf '%s\n' "${sums[@]}" | jq -s 'sort | .[length / 2 | floor]')
    bench "update: staging $(size_mib "$big") MiB tarball (100 MiB file; download + hash + verify + extract + fsync, from the 'downloading' to the 'extracted' progress line): $(printf '%s\n' "${stage[@]}" | med) = $(jq -n "$bytes / 1048576 / ($ms / 1000) | round") MiB/s"
    # Where the time goes: the same bytes fetched from the same server, and gunzipped, alone.
    local fetch=() gz=()
    for i in 1 2 3; do
        must "fetch the 100 MiB tarball #$i" cx python3 "$SMOKE_LIB/timed_lines.py" python3 -c 'import shutil, sys, urllib.request
shutil.copyfileobj(urllib.request.urlopen(sys.argv[1]), open("/dev/null", "wb"), 1 << 20)' \
            "$REL_URL/big/v0.smoke.0/banger-v0.smoke.0-linux-amd64.tar.gz"
        fetch+=("$(jq .total_ms <<<"$OUT")")
        # shellcheck disable=SC2016 # expanded by sh inside the container
        must "gunzip the 100 MiB tarball #$i" cx python3 "$SMOKE_LIB/timed_lines.py" sh -c 'gzip -dc "$1" >/dev/null' gz "$big"
        gz+=("$(jq .total_ms <<<"$OUT")")
    done
    bench "update: for reference, fetching the tarball from the server alone (python urllib): $(printf '%s\n' "${fetch[@]}" | med); gzip -dc alone: $(printf '%s\n' "${gz[@]}" | med)"
    if [[ -n ${BENCH_RELEASE_SKIP:-} ]]; then
        bench "update: staging by a release-profile build: skipped: $BENCH_RELEASE_SKIP"
    else
        local rstage=() rv rms
        rv=$(cx "$REL_DIR/bin/release/banger" --version)
        for i in 1 2 3; do
            must "update --dry-run of the 100 MiB release with the release build #$i" cx python3 "$SMOKE_LIB/timed_lines.py" \
                "$REL_DIR/bin/release/banger" update --dry-run --manifest-url "$REL_URL/big/manifest.json" --pubkey-file "$key"
            expect_match "$(jq -r .stdout <<<"$OUT")" '^dry run: would update' "release-build dry run #$i"
            rstage+=("$(jq '(.lines | map(select(.[1] | test("matches the signed SHA256SUMS"))) | .[0][0])
                - (.lines | map(select(.[1] | test("downloading banger-.*tar.gz"))) | .[0][0])' <<<"$OUT")")
        done
        rms=$(printf '%s\n' "${rstage[@]}" | jq -s 'sort | .[length / 2 | floor]')
        bench "update: the same staging by a release-profile build ($rv): $(printf '%s\n' "${rstage[@]}" | med) = $(jq -n "$bytes / 1048576 / ($rms / 1000) | round") MiB/s; / sha256sum = $(jq -n "$mss / $rms * 100 | round")%"
    fi
    bench "update: sha256sum of the same tarball (page cache): $(printf '%s\n' "${sums[@]}" | med) = $(jq -n "$bytes / 1048576 / ($mss / 1000) | round") MiB/s; staging / sha256sum = $(jq -n "$mss / $ms * 100 | round")% (target >= 50%)"
}
