#!/usr/bin/env bash
# Smoke suite (DESIGN.md §9, issue 3): boots a Debian bookworm rootfs under systemd-nspawn (a real
# systemd), installs banger inside and runs named scenarios against the real units.
#
#   scripts/smoke.sh                  run every scenario
#   scripts/smoke.sh --list           list scenarios
#   scripts/smoke.sh --scenario a,b   run some
#   scripts/smoke.sh --bench          also measure boot, restart unavailability, VM create/list/RSS
#   scripts/smoke.sh --rebuild        rebuild the cached rootfs first (times a cold prepare)
#
# Environment: BANGER_BIN (binary to test; default: `cargo build`), SMOKE_CACHE_DIR (rootfs cache,
# default .smoke-cache/), SMOKE_MIRROR (Debian mirror; default: the one apt on this host uses),
# SMOKE_FIRECRACKER (a real firecracker; default: the stand-in VMM, `cargo build -p
# banger-fc-standin`, or the `firecracker` beside BANGER_BIN), SMOKE_KEEP_LOGS=1 (keep the per-run
# log dir), SMOKE_RELEASE_BIN (--bench: a release-profile banger to measure staging with too;
# default: target/x86_64-unknown-linux-gnu/release/banger when it exists).
#
# The update scenarios (and --bench) need releases: this source built once per run with
# BANGER_VERSION=v0.smoke.0 (dev profile, own target dir in the cache, seeded from target/), signed
# with a throw-away key by packaging/release.sh, served inside each container on 127.0.0.1.
#
# Every scenario gets a fresh container (a volatile overlay over the cached rootfs), so no scenario
# can leak state into the next. The VMM is installed in each as a root-owned 0755
# /usr/local/bin/firecracker, where the root helper and `banger doctor` look for it; the VM
# scenarios boot the tiny test guest (tests/guest/tiny_guest.S, assembled here with as/ld), which
# real Firecracker boots as it is and the stand-in accepts. Needs root.
set -euo pipefail

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HELPERS_DIR=$REPO_ROOT/scripts/smoke
CACHE_DIR=${SMOKE_CACHE_DIR:-$REPO_ROOT/.smoke-cache}
SUITE=bookworm
BOOT_TIMEOUT=${SMOKE_BOOT_TIMEOUT:-60}  # seconds until `systemctl is-system-running` must say running/degraded
CMD_TIMEOUT=90       # seconds any one command inside the container may take
STOP_TIMEOUT=20      # seconds for an orderly poweroff before the container is killed
TEST_USER=dev
TEST_UID=1000
SRC_BIN=/opt/banger-src/banger     # where the binary under test appears inside the container
SMOKE_LIB=/opt/banger-smoke        # scripts/smoke/ inside the container
REL_DIR=/opt/banger-releases       # the releases built for the update scenarios (prepare_releases)
REL_REAL=$REL_DIR/bin/v0.smoke.0/banger  # the v0.smoke.0 build inside the container
VMM_SRC=/opt/banger-src/firecracker      # the VMM under test inside the container (bound in)
VMM_BIN=/usr/local/bin/firecracker       # where it is installed (root, 0755) for helper and doctor
GUEST_DIR=/opt/banger-guest              # tiny guest kernel and a blank rootfs inside the container
VMS_DIR=/var/lib/banger/vms
READY_PREFIX='banger-guest: ready boot_id='
DAEMON_SOCK=/run/banger/bangerd.sock
HELPER_SOCK=/run/banger-root/bangerd-root.sock

log() { printf 'smoke: %s\n' "$*" >&2; }
die() { printf 'smoke: error: %s\n' "$*" >&2; exit 2; }
now_ms() { echo $(($(date +%s%N) / 1000000)); }
secs() { printf '%d.%ds' $(($1 / 1000)) $((($1 % 1000) / 100)); }

# ===================================================================================================
# Scenarios: add a line to SCENARIOS and a function scenario_<name>. Each runs in a subshell with
# `set -e`, inside a freshly booted container where nothing of banger is installed yet. Use `cx`
# (root) / `cu` (the test user) to run commands inside, `must`/`fail`/`expect_*` to assert.
# ===================================================================================================

SCENARIOS=(
    "system_install|install as $TEST_USER: units active with the §7 directives, links, install.toml, sockets, doctor"
    "daemon_admin|daemon socket, --check-migrations --system, sudo daemon stop then status fails clearly, system restart"
    "restart_is_ready|after systemctl restart bangerd the first daemon status answers (Type=notify)"
    "reinstall_idempotent|second install keeps units, links, owner and installed_at; a hand-edited unit is put back"
    "uninstall_purge|uninstall removes units, links, binary; --purge removes state; a second uninstall is a no-op"
    "vm_lifecycle|vm create -> running (owner uid, own scope) -> stop -> start (new boot_id) -> restart -> delete"
    "helper_restart_keeps_vm_alive|10x systemctl restart bangerd-root: same pid, start time, boot_id; still running; stop works"
    "daemon_restart_keeps_vm_alive|10x systemctl restart bangerd: same pid, start time, boot_id; still running; stop works"
    "daemon_down_vm_survives|daemon stop: the VM keeps running; system restart re-adopts it untouched"
    "vm_died_while_daemon_down|VMM SIGKILLed while the daemon is down: after start it is stopped, cleaned, startable"
    "invalid_spec_rejected|vcpu 0, memory 0, bad names (CLI and RPC): clear errors, exit 2, no row, no dir"
    "concurrent_creates|8 creates at once: 8 distinct running VMs in 8 scopes; same-name race has one winner; delete all"
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

# doctor checks that cannot pass in this test bed, and why. They must never say PASS here; a FAIL
# of one of these is allowed (noted). Empty now: the VMM is installed in every container.
declare -A DOCTOR_CANNOT_PASS=()

scenario_system_install() {
    install_banger
    # install returns only once the daemon answers: no wait, no retry here.
    must "daemon status right after install" cu banger daemon status
    expect_active bangerd bangerd-root

    local unit=/etc/systemd/system/bangerd.service root_unit=/etc/systemd/system/bangerd-root.service
    expect_unit_lines "$unit" Type=notify KillMode=process RuntimeDirectoryPreserve=yes "User=$TEST_USER"
    expect_unit_lines "$root_unit" Type=notify KillMode=process SendSIGKILL=no RuntimeDirectoryPreserve=yes
    # What systemd itself parsed, not only what the file says.
    expect_eq "$(cx systemctl show -P KillMode bangerd)" process "bangerd KillMode (systemctl show)"
    expect_eq "$(cx systemctl show -P KillMode bangerd-root)" process "bangerd-root KillMode (systemctl show)"
    expect_eq "$(cx systemctl show -P SendSIGKILL bangerd-root)" no "bangerd-root SendSIGKILL (systemctl show)"
    expect_eq "$(cx systemctl show -P Type bangerd)" notify "bangerd Type (systemctl show)"
    expect_eq "$(cx systemctl show -P Type bangerd-root)" notify "bangerd-root Type (systemctl show)"
    expect_eq "$(cx systemctl show -P User bangerd)" "$TEST_USER" "bangerd User (systemctl show)"

    expect_install_files

    local v
    for v in version commit built_at; do
        expect_eq "$(toml_get "$v")" "$(version_field "$v")" "install.toml $v vs banger version"
    done
    expect_match "$(toml_get installed_at)" '^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9:.]+(Z|[+-][0-9:]+)$' "install.toml installed_at (RFC 3339)"

    expect_stat /run/banger-root 711 root root "helper runtime dir"
    expect_stat "$DAEMON_SOCK" 600 "$TEST_USER" "" "daemon socket"
    expect_stat "$HELPER_SOCK" 600 "$TEST_USER" "" "helper socket"
    must "daemon status as $TEST_USER" cu banger daemon status
    must "helper priv.ping as $TEST_USER" cu python3 "$SMOKE_LIB/rpc.py" "$HELPER_SOCK" priv.ping

    expect_doctor_clean
    # The VMM is installed in every container: doctor must find it, root-owned, in the tested range.
    OUT=$(cx banger doctor 2>&1 || true)
    grep -qE '^PASS +firecracker$' <<<"$OUT" \
        || fail "doctor: the firecracker row is not PASS with $VMM_BIN installed ($VMM_KIND): $(grep -A1 firecracker <<<"$OUT" | tr '\n' ' ')"
}

scenario_daemon_admin() {
    install_banger
    must "daemon socket" cu banger daemon socket
    expect_eq "$OUT" "$DAEMON_SOCK" "banger daemon socket output"
    must "check-migrations on the installed DB" cx bangerd --check-migrations --system
    expect_eq "$(wc -l <<<"$OUT" | tr -d ' ')" 1 "--check-migrations prints one line"

    must_fail "daemon stop without root" cu banger daemon stop
    expect_eq "$RC" 1 "daemon stop without root exit code"
    expect_match "$OUT" 'root|sudo' "daemon stop without root explains why"
    expect_active bangerd

    must "sudo daemon stop" cx sudo banger daemon stop
    expect_inactive bangerd
    must_fail "daemon status with the daemon stopped" cu banger daemon status
    expect_eq "$RC" 1 "daemon status (stopped) exit code"
    expect_clear_error "$OUT" "daemon status (stopped)"

    must "system restart" cx banger system restart
    expect_active bangerd bangerd-root
    must "daemon status after system restart" cu banger daemon status
}

scenario_restart_is_ready() {
    install_banger
    local i
    # Three, not more: install's start plus five restarts within 10 s would trip systemd's default
    # start rate limit (StartLimitBurst=5), which is not what this scenario is about.
    # Alternately the CLI and a bare one-shot ping (rpc.py connects once, never retries).
    for i in 1 2 3; do
        must "systemctl restart bangerd (#$i)" cx systemctl restart bangerd
        if ((i % 2)); then
            must "first daemon status after restart #$i" cu banger daemon status
        else
            must "first ping after restart #$i" cu python3 "$SMOKE_LIB/rpc.py" "$DAEMON_SOCK" ping
        fi
    done
    must "systemctl restart bangerd-root" cx systemctl restart bangerd-root
    must "first helper priv.ping after restart" cu python3 "$SMOKE_LIB/rpc.py" "$HELPER_SOCK" priv.ping
}

scenario_reinstall_idempotent() {
    install_banger
    local before after owner installed_at
    before=$(install_fingerprint)
    owner=$(toml_get owner_user)
    installed_at=$(toml_get installed_at)

    install_banger
    after=$(install_fingerprint)
    expect_eq "$after" "$before" "units and links after a second install"
    expect_eq "$(toml_get owner_user)" "$owner" "install.toml owner_user after reinstall"
    expect_eq "$(toml_get installed_at)" "$installed_at" "install.toml installed_at after reinstall"
    expect_active bangerd bangerd-root
    must "daemon status after reinstall" cu banger daemon status
    must "helper priv.ping after reinstall" cu python3 "$SMOKE_LIB/rpc.py" "$HELPER_SOCK" priv.ping

    # A hand edit must not survive: install is how unit changes reach a host.
    cx sed -i 's/^KillMode=process/KillMode=control-group/' /etc/systemd/system/bangerd.service
    cx sh -c 'echo "# edited by hand" >> /etc/systemd/system/bangerd-root.service'
    cx systemctl daemon-reload
    expect_eq "$(cx systemctl show -P KillMode bangerd)" control-group "bangerd KillMode after the hand edit"
    install_banger
    after=$(install_fingerprint)
    expect_eq "$after" "$before" "units after reinstall over a hand-edited unit"
    expect_eq "$(cx systemctl show -P KillMode bangerd)" process "bangerd KillMode after reinstall (systemctl show)"
    expect_eq "$(cx systemctl show -P NeedDaemonReload bangerd)" no "bangerd NeedDaemonReload after reinstall"
    expect_active bangerd bangerd-root
    must "daemon status after repairing reinstall" cu banger daemon status
}

scenario_uninstall_purge() {
    install_banger
    must "daemon status" cu banger daemon status
    local had_state=no
    cx test -d /var/lib/banger && had_state=yes

    must "system uninstall" cx banger system uninstall
    local f
    for f in /etc/systemd/system/bangerd.service /etc/systemd/system/bangerd-root.service \
        /usr/local/bin/banger /usr/local/bin/bangerd /usr/local/bin/bangerd-root \
        /usr/local/lib/banger/banger; do
        expect_absent "$f" "after uninstall"
    done
    expect_inactive bangerd bangerd-root
    expect_eq "$(cx systemctl show -P LoadState bangerd)" not-found "bangerd LoadState after uninstall"
    expect_no_process bangerd
    expect_no_process bangerd-root
    if [[ $had_state == yes ]]; then
        cx test -d /var/lib/banger || fail "uninstall without --purge removed /var/lib/banger"
    fi

    must "system uninstall --purge" cx "$SRC_BIN" system uninstall --purge
    for f in /var/lib/banger /var/cache/banger /etc/banger; do
        expect_absent "$f" "after uninstall --purge"
    done

    must "second uninstall --purge (no-op)" cx "$SRC_BIN" system uninstall --purge
    must "second uninstall (no-op)" cx "$SRC_BIN" system uninstall
}

# --- VM scenarios (DESIGN.md §6, issue 4) -----------------------------------------------------------
# IMAGE (set by vm_setup) is what they boot: with the stand-in `agent` (readiness = the guest agent
# answering over vsock, as in production), with a real Firecracker `tiny` (readiness = the tiny
# guest's console line).

scenario_vm_lifecycle() {
    vm_setup
    must "vm create as $TEST_USER" cu banger vm create --name life --image "$IMAGE"
    expect_match "$OUT" '^life running boot_id=[^ ]+ pid=[0-9]+$' "vm create output"
    vm_get life
    expect_eq "$VM_STATE" running "state after create"
    expect_vmm_process "after create"
    expect_guest_boot 1 "after create"
    local id=$VM_ID pid1=$VM_PID start1=$VM_START boot1=$VM_BOOT
    must "vm logs" cu banger vm logs life
    [[ $OUT == *"$READY_PREFIX$boot1"* ]] || fail "vm logs lacks the ready line with boot_id $boot1"
    vm_list_get life
    expect_eq "$L_STATE $L_PID $L_BOOT" "running $pid1 $boot1" "vm list after create"

    must "vm stop" cu banger vm stop life --timeout 5
    vm_get life
    expect_eq "$VM_STATE" stopped "state after stop"
    expect_vmm_gone "$pid1" "$start1" "after stop"
    expect_vm_cleaned "$id" "after stop"

    must "vm start" cu banger vm start life
    vm_get life
    expect_eq "$VM_STATE" running "state after start"
    expect_vmm_process "after start"
    [[ $VM_BOOT != "$boot1" ]] || fail "start after stop kept boot_id $boot1: not a new boot"
    expect_guest_boot 2 "after start"
    local pid2=$VM_PID start2=$VM_START boot2=$VM_BOOT

    must "vm restart" cu banger vm restart life
    vm_get life
    expect_eq "$VM_STATE" running "state after restart"
    expect_vmm_process "after restart"
    expect_vmm_gone "$pid2" "$start2" "the VMM before the restart"
    [[ $VM_BOOT != "$boot2" && $VM_BOOT != "$boot1" ]] || fail "restart did not give a new boot_id ($VM_BOOT)"
    expect_guest_boot 3 "after restart"
    local pid3=$VM_PID start3=$VM_START

    if [[ $IMAGE != tiny ]]; then
        # The other readiness path: the console line of a guest without the agent.
        must "vm create --image tiny (console readiness)" cu banger vm create --name life-console --image tiny
        vm_get life-console
        expect_eq "$VM_STATE" running "state of life-console"
        expect_vmm_process "life-console after create"
    fi

    local names=(life) n
    [[ $IMAGE == tiny ]] || names+=(life-console)
    must "vm delete ${names[*]}" cu banger vm delete "${names[@]}"
    for n in "${names[@]}"; do
        expect_match "$OUT" "(^|$NL)deleted $n($NL|$)" "vm delete output"
    done
    expect_vmm_gone "$pid3" "$start3" "after delete"
    expect_no_vms "after delete"
    must_fail "vm show of a deleted VM" cu banger vm show life
    expect_eq "$RC" 1 "vm show (deleted) exit code"
    expect_clear_error "$OUT" "vm show (deleted)"
    expect_match "$OUT" "no VM named .life." "vm show (deleted) says why"
    expect_no_error_logs "in this scenario"
}

scenario_helper_restart_keeps_vm_alive() { restart_keeps_vm_alive bangerd-root; }
scenario_daemon_restart_keeps_vm_alive() { restart_keeps_vm_alive bangerd; }

# 10 restarts of UNIT with a VM running: after each, the same VMM (pid, start time), the same guest
# boot (boot_id from the daemon and from the guest; one ready line on its console), `vm list` says
# running; both services answer. Then the restarted services still stop the VM they adopted.
restart_keeps_vm_alive() {
    local unit=$1 i other
    vm_setup
    must "vm create" cu banger vm create --name keep --image "$IMAGE"
    vm_get keep
    expect_eq "$VM_STATE" running "state after create"
    expect_vmm_process "after create"
    local pid=$VM_PID start=$VM_START boot=$VM_BOOT main_before main_after
    other=$([[ $unit == bangerd ]] && echo bangerd-root || echo bangerd)
    main_before=$(cx systemctl show -P MainPID "$other")
    for i in 1 2 3 4 5 6 7 8 9 10; do
        # Not about systemd's start rate limit (5 starts in 10 s by default): clear its counter.
        cx systemctl reset-failed "$unit"
        must "systemctl restart $unit (#$i)" cx systemctl restart "$unit"
        expect_active bangerd bangerd-root
        expect_eq "$(proc_ident "$pid")" "$start firecracker" "the VMM (pid $pid) after restart #$i"
        vm_list_get keep
        expect_eq "$L_STATE $L_PID $L_START $L_BOOT" "running $pid $start $boot" "vm list after restart #$i"
        vm_get keep
        expect_guest_boot 1 "after restart #$i"
        must "helper priv.ping after restart #$i" cu python3 "$SMOKE_LIB/rpc.py" "$HELPER_SOCK" priv.ping
    done
    main_after=$(cx systemctl show -P MainPID "$other")
    expect_eq "$main_after" "$main_before" "$other MainPID across restarts of $unit (it must not restart too)"
    vm_get keep
    expect_vmm_process "after 10 restarts of $unit"
    if [[ $unit == bangerd ]]; then
        expect_reconciled "adopted" 1 "after the last restart"
    fi
    must "vm stop after 10 restarts of $unit" cu banger vm stop keep --timeout 5
    vm_get keep
    expect_eq "$VM_STATE" stopped "state after stop"
    expect_vmm_gone "$pid" "$start" "after stop"
    must "vm delete" cu banger vm delete keep
    expect_no_vms "after delete"
    expect_no_error_logs "in this scenario"
}

scenario_daemon_down_vm_survives() {
    vm_setup
    must "vm create" cu banger vm create --name survivor --image "$IMAGE"
    vm_get survivor
    expect_vmm_process "after create"
    local pid=$VM_PID start=$VM_START boot=$VM_BOOT
    must "banger daemon stop (root)" cx banger daemon stop
    expect_inactive bangerd
    expect_active bangerd-root
    sleep 1
    expect_eq "$(proc_ident "$pid")" "$start firecracker" "the VMM with the daemon down"
    expect_scope_active "$VM_ID" "with the daemon down"
    expect_guest_boot 1 "with the daemon down"
    must "banger system restart" cx banger system restart
    expect_active bangerd bangerd-root
    expect_reconciled adopted 1 "after the daemon came back"
    vm_get survivor
    expect_eq "$VM_STATE $VM_PID $VM_START $VM_BOOT" "running $pid $start $boot" "vm show after re-adoption"
    expect_vmm_process "after re-adoption"
    expect_guest_boot 1 "after re-adoption"
    vm_list_get survivor
    expect_eq "$L_STATE $L_PID $L_START $L_BOOT" "running $pid $start $boot" "vm list after re-adoption"
    must "vm stop after re-adoption" cu banger vm stop survivor --timeout 5
    expect_vmm_gone "$pid" "$start" "after stop"
    must "vm delete" cu banger vm delete survivor
    expect_no_vms "after delete"
    expect_no_error_logs "in this scenario"
}

scenario_vm_died_while_daemon_down() {
    vm_setup
    must "vm create" cu banger vm create --name doomed --image "$IMAGE"
    vm_get doomed
    expect_vmm_process "after create"
    local id=$VM_ID pid=$VM_PID start=$VM_START boot=$VM_BOOT
    must "banger daemon stop (root)" cx banger daemon stop
    expect_inactive bangerd
    must "SIGKILL the VMM" cx kill -KILL "$pid"
    wait_vmm_gone "$pid" "$start" "after SIGKILL"
    must "systemctl start bangerd" cx systemctl start bangerd
    expect_active bangerd bangerd-root
    expect_reconciled stopped 1 "after the daemon came back"
    # vm show reports the record as reconcile left it (it does not re-check /proc itself).
    vm_get doomed
    expect_eq "$VM_STATE" stopped "state after reconcile"
    expect_vm_cleaned "$id" "after reconcile"
    expect_eq "$(jq -r '.vm.pid // "none"' <<<"$OUT")" none "recorded pid after reconcile"
    vm_list_get doomed
    expect_eq "$L_STATE" stopped "vm list after reconcile"
    must "vm start after the VMM died" cu banger vm start doomed
    vm_get doomed
    expect_eq "$VM_STATE" running "state after start"
    expect_vmm_process "after start"
    [[ $VM_BOOT != "$boot" ]] || fail "start after the VMM died kept boot_id $boot"
    must "vm delete" cu banger vm delete doomed
    expect_no_vms "after delete"
    expect_no_error_logs "in this scenario"
}

scenario_invalid_spec_rejected() {
    vm_setup
    local long args
    long=$(printf 'a%.0s' {1..64})
    # Refused by the CLI (usage errors, exit 2) before the daemon is asked.
    for args in "--vcpu 0" "--memory 0" "--name Bad" "--name -lead" "--name trail-" "--name a_b" \
        "--name $long" "--name a.b" "--name ../x"; do
        # shellcheck disable=SC2086 # word splitting of the option list is intended
        must_fail "vm create $args" cu banger vm create --image "$IMAGE" $args
        expect_eq "$RC" 2 "vm create $args exit code"
        expect_clear_error "$OUT" "vm create $args"
        [[ $args != --name* ]] || expect_match "$OUT" "VM name" "vm create $args names the problem"
        [[ $args == --name* ]] || expect_match "$OUT" "--vcpu and --memory|(vcpu|memory) .*out of range" "vm create $args names the problem"
    done
    # Values only the daemon refuses (the CLI passes them on): a clear error, no row either.
    for args in "--vcpu 33" "--memory 8"; do
        # shellcheck disable=SC2086
        must_fail "vm create $args" cu banger vm create --image "$IMAGE" $args
        expect_clear_error "$OUT" "vm create $args"
        expect_match "$OUT" "out of range" "vm create $args says why"
        [[ $RC == 2 ]] || note "vm create $args: exit $RC (daemon-side bad_request), not 2 like the CLI-side checks"
    done
    # The daemon checks again for callers other than the CLI.
    local params
    for params in '{"vcpu":0}' '{"memory_mib":0}' '{"name":"Bad"}' '{"name":"-x"}' "{\"name\":\"$long\"}" \
        '{"vcpu":-1}' '{"vcpu":"2"}' '{"vcpu":33}' '{"memory_mib":8}' '{"name":"a/b"}' '{"bogus":1}'; do
        params=$(jq -c --arg i "$IMAGE" '. + {image: $i}' <<<"$params")
        must_fail "vm.create $params over RPC" cu python3 "$SMOKE_LIB/rpc.py" "$DAEMON_SOCK" vm.create "$params"
        expect_eq "$RC" 1 "vm.create $params: rpc.py exit code (error answer)"
        expect_eq "$(jq -r .code <<<"$OUT" 2>/dev/null)" bad_request "vm.create $params: error code"
    done
    expect_no_vms "after the refused creates"
    must "daemon still answers" cu banger daemon status
}

scenario_concurrent_creates() {
    vm_setup
    local i pids=() rc failed="" out_dir=$RUN_DIR/concurrent
    mkdir -p "$out_dir"
    for i in 1 2 3 4 5 6 7 8; do
        cu banger vm create --name "cc-$i" --image "$IMAGE" >"$out_dir/$i.out" 2>&1 &
        pids+=($!)
    done
    for i in 1 2 3 4 5 6 7 8; do
        rc=0
        wait "${pids[$((i - 1))]}" || rc=$?
        printf '$ banger vm create --name cc-%s (exit %s)\n%s\n' "$i" "$rc" "$(cat "$out_dir/$i.out")"
        ((rc == 0)) || failed+="cc-$i (exit $rc: $(last_line "$(cat "$out_dir/$i.out")")) "
    done
    [[ -z $failed ]] || fail "concurrent creates failed: $failed"
    must "vm list --json" cu banger vm list --json
    local listed
    listed=$OUT
    expect_eq "$(jq -r '[.[] | select(.state == "running")] | length' <<<"$listed")" 8 "running VMs in vm list"
    for field in id pid boot_id; do
        expect_eq "$(jq -r "[.[].$field] | unique | length" <<<"$listed")" 8 "distinct ${field}s among the 8 VMs"
    done
    for i in 1 2 3 4 5 6 7 8; do
        vm_get "cc-$i"
        expect_eq "$VM_STATE" running "cc-$i state"
        expect_vmm_process "cc-$i"
    done
    expect_eq "$(cx pgrep -cx firecracker || true)" 8 "firecracker processes in the container"

    # Two creates of one name at once: exactly one wins, the other is told the name is taken.
    cu banger vm create --name twin --image "$IMAGE" >"$out_dir/twin1.out" 2>&1 &
    pids=($!)
    cu banger vm create --name twin --image "$IMAGE" >"$out_dir/twin2.out" 2>&1 &
    pids+=($!)
    local ok=0 lost=""
    for i in 0 1; do
        rc=0
        wait "${pids[$i]}" || rc=$?
        printf '$ banger vm create --name twin (exit %s)\n%s\n' "$rc" "$(cat "$out_dir/twin$((i + 1)).out")"
        if ((rc == 0)); then ok=$((ok + 1)); else lost=$(cat "$out_dir/twin$((i + 1)).out"); fi
    done
    expect_eq "$ok" 1 "creates of the same name that succeeded"
    expect_clear_error "$lost" "the losing create of twin"
    expect_match "$lost" "exists|already|taken" "the losing create of twin says why"
    must "vm list --json" cu banger vm list --json
    expect_eq "$(jq -r '[.[] | select(.name == "twin")] | length' <<<"$OUT")" 1 "rows named twin"

    must "vm delete all at once" cu banger vm delete cc-1 cc-2 cc-3 cc-4 cc-5 cc-6 cc-7 cc-8 twin
    expect_no_vms "after delete"
    expect_no_error_logs "in this scenario"
}

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
# units, the links, the lib dir listing (no .previous, no banger.new), no staging left behind.
host_fingerprint() {
    # shellcheck disable=SC2016 # expanded inside the container
    cx sh -c 'cd / && sha256sum usr/local/lib/banger/banger etc/banger/install.toml \
        etc/systemd/system/bangerd.service etc/systemd/system/bangerd-root.service
        echo "lib: $(ls -A usr/local/lib/banger | tr "\n" " ")"
        for l in banger bangerd bangerd-root; do printf "%s -> %s\n" $l "$(readlink usr/local/bin/$l)"; done
        echo "staging: $(ls -A var/cache/banger/updates 2>/dev/null | tr "\n" " ")"'
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
    must_fail "update to v0.smoke.broken" cx banger update --to v0.smoke.broken "${UPD[@]}"
    expect_eq "$RC" 1 "failed update exit code"
    expect_update_error "update to v0.smoke.broken"
    expect_match "$OUT" '\(rolled back to previous install\)' "the failed update says it rolled back"
    expect_match "$OUT" 'rolling back to v0\.1\.0' "the failed update's progress"
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
        [tampered_sums]='signature'
        [wrong_key]='signature'
        [truncated_sig]='signature'
        [garbage_sig]='signature'
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
    expect_match "$OUT" 'signature' "the main release under another key"
    expect_untouched "after the wrong --pubkey-file"
    # A private key where the public one belongs.
    must_fail "update with a private key as --pubkey-file" cx banger update "${UPD[@]:0:2}" --pubkey-file "$REL_DIR/keys/key.pem"
    expect_update_error "private key as --pubkey-file"
    expect_untouched "after the private key"
    expect_version 0.1.0 "after every bad release"
    expect_no_pending_update "after every bad release"
    expect_doctor_clean
}

# --- VM helpers ---

NL=$'\n'

# Installs banger, imports the tiny guest as kernel `tiny`, image `tiny` (console readiness) and,
# with the stand-in, image `agent` (agent readiness); sets IMAGE.
vm_setup() {
    install_banger
    must "kernel import" cu banger kernel import tiny "$GUEST_DIR/tiny-guest.elf"
    must "image import tiny" cu banger image import tiny --rootfs "$GUEST_DIR/rootfs.img" --kernel tiny \
        --ready-console "$READY_PREFIX"
    IMAGE=tiny
    VMM_GROUPS=$TEST_UID
    if cx test -c /dev/kvm; then
        VMM_GROUPS=$(cx stat -c %g /dev/kvm)
        VMM_GROUPS=$(printf '%s\n' "$TEST_UID" "$VMM_GROUPS" | sort -n | xargs)
    fi
    if [[ $VMM_KIND == standin ]]; then
        must "image import agent" cu banger image import agent --rootfs "$GUEST_DIR/rootfs.img" --kernel tiny
        IMAGE=agent
    fi
}

# `vm show NAME --json` (the record, as the daemon keeps it) into VM_ID VM_STATE VM_PID VM_START
# VM_COMM VM_BOOT (empty when null); OUT keeps the JSON.
vm_get() {
    must "vm show $1" cu banger vm show "$1" --json
    local line
    line=$(jq -r '.vm | [.id, .state, (.pid // ""), (.start_time // ""), (.comm // ""), (.boot_id // "")]
        | map(tostring) | join("|")' <<<"$OUT") || fail "vm show $1 --json: unexpected output: $(last_line "$OUT")"
    IFS='|' read -r VM_ID VM_STATE VM_PID VM_START VM_COMM VM_BOOT <<<"$line"
}

# NAME's row in `vm list --json` (which re-checks running VMs against /proc) into L_STATE L_PID
# L_START L_BOOT.
vm_list_get() {
    must "vm list --json" cu banger vm list --json
    local line
    line=$(jq -r --arg n "$1" '[.[] | select(.name == $n)] | if length == 1 then .[0] else error("rows: \(length)") end
        | [.state, (.pid // ""), (.start_time // ""), (.boot_id // "")] | map(tostring) | join("|")' <<<"$OUT") \
        || fail "vm list --json: no single row for $1: $(last_line "$OUT")"
    IFS='|' read -r L_STATE L_PID L_START L_BOOT <<<"$line"
}

# "<start time> <comm>" of a live PID in the container, from /proc/PID/stat (fields 22 and 2); empty
# when there is no such process.
proc_ident() {
    local stat comm f
    stat=$(cx cat "/proc/$1/stat" 2>/dev/null) || return 0
    comm=${stat#*(}
    comm=${comm%)*}
    read -r -a f <<<"${stat##*) }"
    echo "${f[19]} $comm"
}

# The VM read by vm_get runs: its recorded identity matches a live process, which runs as the
# owner, is a session leader (detached) and lives in its own scope banger.slice/banger-vm-<id>.scope.
expect_vmm_process() {
    local what=$1 stat f ids cg groups
    [[ -n $VM_PID && -n $VM_START ]] || fail "$what: no VMM identity recorded (pid '$VM_PID')"
    expect_eq "$VM_COMM" firecracker "$what: recorded comm"
    expect_eq "$(proc_ident "$VM_PID")" "$VM_START $VM_COMM" "$what: /proc/$VM_PID start time and comm"
    stat=$(cx cat "/proc/$VM_PID/stat")
    read -r -a f <<<"${stat##*) }"
    expect_eq "${f[3]}" "$VM_PID" "$what: VMM session id (a session leader)"
    # shellcheck disable=SC2016 # awk's own $2, $3
    ids=$(cx awk '/^(Uid|Gid):/ { printf "%s %s ", $2, $3 }' "/proc/$VM_PID/status")
    expect_eq "$ids" "$TEST_UID $TEST_UID $TEST_UID $TEST_UID " "$what: VMM real/effective uid and gid"
    # shellcheck disable=SC2016 # awk's own $1
    groups=$(cx awk '/^Groups:/ { $1 = ""; print }' "/proc/$VM_PID/status" | xargs)
    expect_eq "$groups" "$VMM_GROUPS" "$what: VMM supplementary groups (owner's, /dev/kvm's)"
    cg=$(cx cat "/proc/$VM_PID/cgroup")
    printf 'vmm %s: pid %s, uid/gid %s, groups %s, cgroup %s\n' "$what" "$VM_PID" "$ids" "$groups" "$(tr '\n' ' ' <<<"$cg")"
    grep -qE "(^|:)/banger\.slice/banger-vm-$VM_ID\.scope$" <<<"$cg" \
        || fail "$what: VMM not in banger.slice/banger-vm-$VM_ID.scope: $(tr '\n' ' ' <<<"$cg")"
    expect_scope_active "$VM_ID" "$what"
}

expect_scope_active() {
    local state
    state=$(cx systemctl is-active "banger-vm-$1.scope" || true)
    expect_eq "$state" active "banger-vm-$1.scope $2"
}

# The process PID with START is gone (or the pid now belongs to another process).
expect_vmm_gone() {
    local ident
    ident=$(proc_ident "$1")
    [[ $ident != "$2 "* ]] || fail "VMM pid $1 (start time $2) still runs $3"
}

wait_vmm_gone() {
    local deadline=$(($(now_ms) + 10000))
    while [[ $(proc_ident "$1") == "$2 "* ]] && (($(now_ms) < deadline)); do sleep 0.05; done
    expect_vmm_gone "$@"
}

# A stopped VM's runtime files are gone (its disk stays) and so is its scope.
expect_vm_cleaned() {
    local id=$1 what=$2 f
    for f in fc.sock vsock.sock vmm.pid; do
        expect_absent "$VMS_DIR/$id/$f" "$what"
    done
    cx test -f "$VMS_DIR/$id/rootfs.ext4" || fail "$VMS_DIR/$id/rootfs.ext4 missing $what"
    local state
    state=$(cx systemctl is-active "banger-vm-$id.scope" || true)
    [[ $state != active ]] || fail "banger-vm-$id.scope still active $what"
}

# The guest read by vm_get is on its BOOTS-th boot and that boot is VM_BOOT: its console has
# exactly BOOTS ready lines, the last with VM_BOOT; with the agent image, the agent itself (over
# the vsock socket) reports VM_BOOT too.
expect_guest_boot() {
    local boots=$1 what=$2 lines
    lines=$(cx grep -a "^$READY_PREFIX" "$VMS_DIR/$VM_ID/console.log" || true)
    expect_eq "$(grep -c . <<<"$lines" || true)" "$boots" "$what: ready lines on the console"
    expect_eq "$(last_line "$lines")" "$READY_PREFIX$VM_BOOT" "$what: last ready line"
    if [[ $IMAGE == agent ]]; then
        must "agent boot_id $what" cx python3 "$SMOKE_LIB/agent.py" "$VMS_DIR/$VM_ID/vsock.sock" boot_id
        expect_eq "$(jq -r .boot_id <<<"$OUT")" "$VM_BOOT" "$what: boot_id the guest agent reports"
    fi
}

# No VM rows, no VM directories, no VMM processes, no VM scopes.
expect_no_vms() {
    must "vm list --json" cu banger vm list --json
    expect_eq "$(jq -r length <<<"$OUT")" 0 "VM rows $1"
    expect_eq "$(cx find "$VMS_DIR" -mindepth 1 -maxdepth 1 2>/dev/null | tr '\n' ' ')" "" "entries in $VMS_DIR $1"
    expect_eq "$(cx pgrep -x firecracker | tr '\n' ' ' || true)" "" "firecracker processes $1"
    expect_eq "$(cx systemctl list-units --plain --no-legend 'banger-vm-*' | awk '{print $1}' | tr '\n' ' ')" "" \
        "VM scopes $1"
}

# Neither service logged an error (a VM scenario that went as planned leaves none).
expect_no_error_logs() {
    local errs
    errs=$(cx journalctl -u bangerd -u bangerd-root -o cat --no-pager | grep '"level":"error"' || true)
    [[ -z $errs ]] || fail "error logged $1: $(last_line "$errs")"
}

# The daemon's last reconcile (journal) counted N VMs as KIND (adopted/stopped/unsure).
expect_reconciled() {
    local kind=$1 n=$2 what=$3 line
    line=$(cx journalctl -u bangerd -o cat --no-pager | grep 'reconciled VMs' | tail -n1 || true)
    [[ -n $line ]] || fail "no 'reconciled VMs' line in the daemon's journal $what"
    printf 'journal: %s\n' "$line"
    expect_match "$line" "\"$kind\": ?${n}[,}]" "reconcile $what: $kind"
    expect_match "$line" '"unsure": ?0[,}]' "reconcile $what: unsure"
}

# --- scenario helpers (run inside the scenario subshell) --------------------------------------------

# Records why the scenario failed (first reason wins) and ends it.
fail() {
    [[ -s $REASON_FILE ]] || printf '%s\n' "$*" >"$REASON_FILE"
    exit 1
}

# Runs a command, keeping its combined output in OUT; fails the scenario with WHAT when it fails.
must() {
    local what=$1
    shift
    RC=0
    local t0
    t0=$(now_ms)
    OUT=$("$@" 2>&1) || RC=$?
    printf '$ %s  [%d ms]\n%s\n' "$*" "$(($(now_ms) - t0))" "$OUT"
    ((RC == 0)) || fail "$what: exited $RC: $(last_line "$OUT")"
}

# The reverse: the command must fail (exit code in RC, output in OUT).
must_fail() {
    local what=$1
    shift
    RC=0
    local t0
    t0=$(now_ms)
    OUT=$("$@" 2>&1) || RC=$?
    printf '$ %s  (expected to fail) [%d ms]\n%s\n' "$*" "$(($(now_ms) - t0))" "$OUT"
    ((RC != 0)) || fail "$what: succeeded but should have failed"
}

# A remark the runner prints under the scenario's PASS/FAIL line (e.g. an allowance that was used).
note() { printf '%s\n' "$*" >>"$NOTES_FILE"; }

last_line() { local s=${1%$'\n'}; s=${s##*$'\n'}; printf '%s' "${s:-<no output>}"; }

expect_eq() { [[ $1 == "$2" ]] || fail "$3: got '$1', want '$2'"; }
expect_match() { [[ $1 =~ $2 ]] || fail "$3: '$(last_line "$1")' does not match /$2/"; }

expect_active() {
    local u state
    for u in "$@"; do
        state=$(cx systemctl is-active "$u" || true)
        [[ $state == active ]] || fail "$u is '$state', want active"
    done
}

expect_inactive() {
    local u state
    for u in "$@"; do
        state=$(cx systemctl is-active "$u" || true)
        [[ $state == inactive || $state == unknown ]] || fail "$u is '$state', want inactive"
    done
}

expect_absent() { ! cx test -e "$1" -o -L "$1" || fail "$1 still exists $2"; }

expect_no_process() {
    local pids
    pids=$(cx pgrep -x "$1" || true)
    [[ -z $pids ]] || fail "a $1 process is still running (pid $pids)"
}

# Each directive must appear as a whole line in the unit file.
expect_unit_lines() {
    local file=$1 line
    shift
    cx test -f "$file" || fail "$file missing"
    for line in "$@"; do
        cx grep -qxF "$line" "$file" || fail "$file lacks the line $line"
    done
}

# expect_stat PATH "MODES" OWNER GROUP WHAT — MODES is a space-separated set of accepted octal modes;
# an empty GROUP is not checked.
expect_stat() {
    local path=$1 modes=$2 owner=$3 group=$4 what=$5 mode u g
    read -r mode u g < <(cx stat -c '%a %U %G' "$path" 2>/dev/null) || fail "$what $path missing"
    [[ " $modes " == *" $mode "* ]] || fail "$what $path mode $mode, want $modes"
    [[ $u == "$owner" ]] || fail "$what $path owner $u, want $owner"
    [[ -z $group || $g == "$group" ]] || fail "$what $path group $g, want $group"
}

install_banger() {
    must "system install --owner $TEST_USER" cx "$SRC_BIN" system install --owner "$TEST_USER"
}

# The real file is a root-owned, not group/world-writable copy of the binary under test, and the
# three links point at it.
expect_install_files() {
    local real=/usr/local/lib/banger/banger name target
    expect_stat "$real" "755 555 750 700 500" root root "installed binary"
    cx cmp -s "$SRC_BIN" "$real" || fail "$real differs from the binary under test"
    for name in banger bangerd bangerd-root; do
        cx test -L "/usr/local/bin/$name" || fail "/usr/local/bin/$name is not a symlink"
        target=$(cx readlink -f "/usr/local/bin/$name")
        expect_eq "$target" "$real" "/usr/local/bin/$name resolves to"
    done
    expect_eq "$(toml_get owner_user)" "$TEST_USER" "install.toml owner_user"
    expect_eq "$(toml_get owner_uid)" "$TEST_UID" "install.toml owner_uid"
    expect_eq "$(toml_get owner_gid)" "$TEST_UID" "install.toml owner_gid"
    expect_eq "$(toml_get owner_home)" "/home/$TEST_USER" "install.toml owner_home"
}

# Everything a reinstall must leave unchanged: unit contents, link targets, the real file.
install_fingerprint() {
    # shellcheck disable=SC2016 # expanded inside the container
    cx sh -c 'sha256sum /etc/systemd/system/bangerd.service /etc/systemd/system/bangerd-root.service \
        /usr/local/lib/banger/banger; for l in banger bangerd bangerd-root; do
        printf "%s -> %s\n" "$l" "$(readlink /usr/local/bin/$l)"; done'
}

toml_get() {
    cx python3 -c 'import sys, tomllib
v = tomllib.load(open("/etc/banger/install.toml", "rb")).get(sys.argv[1])
print("" if v is None else v)' "$1" || fail "cannot read $1 from /etc/banger/install.toml"
}

version_field() {
    local out
    out=$(cu banger version) || fail "banger version failed"
    sed -n "s/^$1: *//p" <<<"$out"
}

# A failing CLI call prints `banger: <what failed>: <why> (<what to do>)`, no panic, no backtrace.
expect_clear_error() {
    local out=$1 what=$2
    [[ $out != *panicked* && $out != *RUST_BACKTRACE* ]] || fail "$what: panicked: $(last_line "$out")"
    expect_match "$out" '^banger: .+: .+' "$what: error message shape"
}

# doctor, as the owner and as root: every row PASS, except checks that cannot pass in this test bed,
# which must not say PASS and must give the reason on an indented line. No FAIL, exit 0 — unless
# the only FAIL rows are checks listed in DOCTOR_CANNOT_PASS (then exit 1 is expected). --json parses.
expect_doctor_clean() {
    local who what text_rc text_rows json_rc json_rows
    for who in cu cx; do
        what="doctor as $([[ $who == cu ]] && echo "$TEST_USER" || echo root)"
        text_rc=0
        OUT=$($who banger doctor 2>&1) || text_rc=$?
        printf '$ %s banger doctor  (exit %s)\n%s\n' "$who" "$text_rc" "$OUT"
        check_doctor_rows "$OUT" "$text_rc" "$what"
        text_rows=$(grep -E '^(PASS|WARN|FAIL) ' <<<"$OUT")

        json_rc=0
        OUT=$($who banger doctor --json 2>&1) || json_rc=$?
        printf '$ %s banger doctor --json  (exit %s)\n%s\n' "$who" "$json_rc" "$OUT"
        expect_eq "$json_rc" "$text_rc" "$what --json exit code (same as text)"
        json_rows=$(cx python3 -c 'import json, sys
for c in json.loads(sys.stdin.read())["checks"]:
    print(c["level"], c["name"])' <<<"$OUT") || fail "$what --json: not the expected JSON: $(last_line "$OUT")"
        expect_eq "$json_rows" "$text_rows" "$what --json rows (same as text)"
    done
}

check_doctor_rows() {
    local out=$1 rc=$2 what=$3 line prev="" name level fails="" allowed_fails=0 no_reason=""
    while IFS= read -r line; do
        if [[ $prev =~ ^(WARN|FAIL)[[:space:]] ]] && [[ ! $line =~ ^[[:space:]]+[^[:space:]] ]]; then
            no_reason+="${prev#* } "
        fi
        prev=$line
        [[ $line =~ ^(PASS|WARN|FAIL)[[:space:]]+(.+)$ ]] || continue
        level=${BASH_REMATCH[1]} name=${BASH_REMATCH[2]}
        if [[ -n ${DOCTOR_CANNOT_PASS[$name]:-} ]]; then
            [[ $level != PASS ]] || fail "$what: '$name' says PASS but cannot pass here (${DOCTOR_CANNOT_PASS[$name]})"
            if [[ $level == FAIL ]]; then
                allowed_fails=$((allowed_fails + 1))
                note "$what: '$name' FAILs, allowed here: ${DOCTOR_CANNOT_PASS[$name]}"
            fi
        elif [[ $level == FAIL ]]; then
            fails+="$name; "
        fi
    done <<<"$out"$'\n'
    [[ -z $fails ]] || fail "$what: FAIL rows: ${fails%; }"
    [[ -z $no_reason ]] || fail "$what: WARN/FAIL rows without a reason: $no_reason"
    grep -qE '^PASS ' <<<"$out" || fail "$what printed no PASS row"
    expect_eq "$rc" "$((allowed_fails > 0 ? 1 : 0))" "$what exit code"
}

# ===================================================================================================
# Test bed: host tools, cached rootfs, one container at a time.
# ===================================================================================================

ensure_host_tools() {
    local missing=()
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    command -v systemd-nspawn >/dev/null || missing+=(systemd-container)
    command -v nsenter >/dev/null || missing+=(util-linux)
    command -v pgrep >/dev/null || missing+=(procps)
    command -v jq >/dev/null || missing+=(jq)
    command -v as >/dev/null && command -v ld >/dev/null || missing+=(binutils)
    ((${#missing[@]} == 0)) && return 0
    log "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

# The Debian mirror this host's apt already uses (one-line or deb822 sources), so the test bed never
# talks to any other host. SMOKE_MIRROR overrides.
debian_mirror() {
    if [[ -n ${SMOKE_MIRROR:-} ]]; then echo "$SMOKE_MIRROR"; return; fi
    local f uri
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [[ -f $f ]] || continue
        uri=$(awk -v s="$SUITE" '$1 == "deb" { for (i = 2; i < NF; i++)
            if ($i ~ /^(https?|file):/ && $(i + 1) == s) { print $i; exit } }' "$f")
        [[ -n $uri ]] && { echo "$uri"; return; }
    done
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ -f $f ]] || continue
        uri=$(awk -v s="$SUITE" '
            /^[[:space:]]*$/ { if (u != "" && ok) { print u; exit } u = ""; ok = 0; next }
            /^URIs:/ { u = $2 }
            /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == s) ok = 1 }
            END { if (u != "" && ok) print u }' "$f" | head -n1)
        [[ -n $uri ]] && { echo "$uri"; return; }
    done
    die "no Debian $SUITE mirror in /etc/apt/sources.list(.d); set SMOKE_MIRROR"
}

ROOTFS_PACKAGES=(systemd systemd-sysv dbus iproute2 iptables openssl python3 procps sudo)

# Everything that decides the rootfs content. Its text is hashed into the cache directory name, so
# editing this function or the package list rebuilds the rootfs.
rootfs_recipe() {
    local dir=$1 mirror=$2
    debootstrap --variant=minbase --include="$(IFS=,; echo "${ROOTFS_PACKAGES[*]}")" \
        "$SUITE" "$dir" "$mirror" >"$dir.log" 2>&1 \
        || { tail -n 30 "$dir.log" >&2; die "debootstrap failed (full log: $dir.log)"; }
    chroot "$dir" useradd --create-home --uid "$TEST_UID" --user-group --shell /bin/bash "$TEST_USER"
    echo banger-smoke >"$dir/etc/hostname"
    printf '127.0.0.1\tlocalhost\n127.0.1.1\tbanger-smoke\n::1\tlocalhost ip6-localhost ip6-loopback\n' \
        >"$dir/etc/hosts"
    # Nothing in the test bed may wake up on its own and compete with a scenario.
    local unit
    for unit in apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer e2scrub_all.timer \
        systemd-tmpfiles-clean.timer fstrim.timer console-getty.service; do
        ln -sf /dev/null "$dir/etc/systemd/system/$unit"
    done
    chroot "$dir" apt-get clean
    rm -rf "$dir/var/lib/apt/lists/"*
}

rootfs_hash() {
    { declare -f rootfs_recipe; echo "${ROOTFS_PACKAGES[*]} $SUITE $TEST_USER $TEST_UID"; } \
        | sha256sum | cut -c1-16
}

# Sets ROOTFS to a ready tree, building it first when its recipe changed (or with --rebuild).
# Two locks in the cache dir: build.lock (exclusive) makes concurrent runs wait for one build
# instead of racing; use.lock is held shared by every run for as long as it boots containers, and
# taken exclusively only to replace or delete trees, so no tree vanishes under a running container.
# A tree is only ever used once complete (.smoke-ready).
prepare_rootfs() {
    local rebuild=$1 hash dir started build_fd
    started=$(now_ms)
    hash=$(rootfs_hash)
    dir=$CACHE_DIR/rootfs-$hash
    mkdir -p "$CACHE_DIR"
    exec {build_fd}>"$CACHE_DIR/build.lock" {USE_LOCK_FD}>"$CACHE_DIR/use.lock"
    flock "$build_fd"
    BENCH_ROOTFS_KIND=cached
    if [[ $rebuild == yes || ! -f $dir/.smoke-ready ]]; then
        local mirror
        mirror=$(debian_mirror)
        log "building rootfs $dir (debootstrap $SUITE from $mirror)"
        rm -rf "$dir.tmp" "$dir.tmp.log"
        mkdir -p "$dir.tmp"
        rootfs_recipe "$dir.tmp" "$mirror"
        touch "$dir.tmp/.smoke-ready"
        flock "$USE_LOCK_FD"
        rm -rf "$dir"
        mv "$dir.tmp.log" "$dir.log"
        mv "$dir.tmp" "$dir"
        # Trees of older recipes are dead weight, and no run is using any tree right now.
        find "$CACHE_DIR" -maxdepth 1 -name 'rootfs-*' ! -name "rootfs-$hash" ! -name "rootfs-$hash.*" \
            -exec rm -rf {} +
        BENCH_ROOTFS_KIND=built
    fi
    flock -s "$USE_LOCK_FD"
    exec {build_fd}>&-
    BENCH_ROOTFS_MS=$(($(now_ms) - started))
    ROOTFS=$dir
}

# Sets BIN to the binary under test: BANGER_BIN, else a fresh debug build.
prepare_binary() {
    if [[ -n ${BANGER_BIN:-} ]]; then
        BIN=$(realpath "$BANGER_BIN")
    else
        log "building banger (cargo build)"
        (cd "$REPO_ROOT" && cargo build --quiet) || die "cargo build failed"
        BIN=$REPO_ROOT/target/x86_64-unknown-linux-gnu/debug/banger
    fi
    [[ -x $BIN ]] || die "binary under test $BIN is not executable"
}

# Sets VMM_HOST (the VMM to install in each container) and VMM_KIND (standin or real):
# SMOKE_FIRECRACKER, else the stand-in beside BANGER_BIN, else a fresh `cargo build -p banger-fc-standin`.
prepare_vmm() {
    if [[ -n ${SMOKE_FIRECRACKER:-} ]]; then
        VMM_HOST=$(realpath "$SMOKE_FIRECRACKER")
        VMM_KIND=real
    elif [[ -n ${BANGER_BIN:-} && -x $(dirname "$BIN")/firecracker ]]; then
        VMM_HOST=$(dirname "$BIN")/firecracker
        VMM_KIND=standin
    else
        log "building the stand-in VMM (cargo build -p banger-fc-standin)"
        (cd "$REPO_ROOT" && cargo build --quiet -p banger-fc-standin) || die "building the stand-in failed"
        VMM_HOST=$REPO_ROOT/target/x86_64-unknown-linux-gnu/debug/firecracker
        VMM_KIND=standin
    fi
    [[ -x $VMM_HOST ]] || die "VMM $VMM_HOST is not executable"
}

# The tiny test guest, assembled as tests/guest/mod.rs does (a real Firecracker boots it as it
# is), and a blank 1 MiB root filesystem, in $RUN_DIR/guest (bound in at $GUEST_DIR).
prepare_guest() {
    local dir=$RUN_DIR/guest
    mkdir -p "$dir"
    as --64 -o "$dir/tiny_guest.o" "$REPO_ROOT/tests/guest/tiny_guest.S" \
        || die "assembling tests/guest/tiny_guest.S failed"
    ld -m elf_x86_64 -static -nostdlib -T "$REPO_ROOT/tests/guest/tiny_guest.ld" \
        -o "$dir/tiny-guest.elf" "$dir/tiny_guest.o" || die "linking the tiny guest failed"
    rm -f "$dir/tiny_guest.o"
    truncate -s 1M "$dir/rootfs.img"
    chmod 0755 "$dir"
    chmod 0644 "$dir/tiny-guest.elf" "$dir/rootfs.img"
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
        strip -o "$d/bin/banger-v0.1.0" "$BIN" || die "strip $BIN failed"
        make_release "$d/www/bench" --version v0.1.0 --binary "$d/bin/banger-v0.1.0"
        make_release "$d/www/bench" --version v0.smoke.0 --binary "$d/bin/v0.smoke.0/banger"
        local pad=$((100 * 1024 * 1024 - $(stat -c %s "$d/bin/v0.smoke.0/banger")))
        { cat "$d/bin/v0.smoke.0/banger"; head -c "$pad" /dev/urandom; } >"$d/bin/banger-big"
        chmod 0755 "$d/bin/banger-big"
        make_release "$d/www/big" --version v0.smoke.0 --binary "$d/bin/banger-big"
        rm -f "$d/bin/banger-big" "$d/bin/banger-v0.1.0"
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
    BENCH_RELEASES_MS=$(($(now_ms) - started))
}


# --- cgroups ---------------------------------------------------------------------------------------
# With --keep-unit --register=no, nspawn creates payload/ and supervisor/ under whatever cgroup it
# starts in. Starting it in a cgroup of our own (in the unified and the name=systemd hierarchy,
# whichever exist) keeps concurrent runs apart and gives cleanup one subtree to kill and remove.

cgroup_roots() {
    local mnt rel
    mnt=$(findmnt -n -t cgroup2 -o TARGET | head -n1)
    rel=$(sed -n 's/^0:://p' /proc/self/cgroup)
    [[ -n $mnt && -n $rel ]] && echo "$mnt${rel%/}"
    mnt=$(findmnt -n -t cgroup -o TARGET,OPTIONS | awk '$2 ~ /name=systemd/ { print $1; exit }')
    rel=$(sed -n 's/^[0-9]*:name=systemd://p' /proc/self/cgroup)
    [[ -n $mnt && -n $rel ]] && echo "$mnt${rel%/}"
    return 0
}

# Kills whatever is left in a cgroup subtree and removes it, deepest first.
cgroup_destroy() {
    local cg=$1 tries pid
    [[ -d $cg ]] || return 0
    for tries in 1 2 3 4 5 6 7 8 9 10; do
        if [[ -f $cg/cgroup.kill ]]; then
            echo 1 >"$cg/cgroup.kill" 2>/dev/null || true
        else
            while read -r pid; do kill -KILL "$pid" 2>/dev/null || true; done \
                < <(find "$cg" -name cgroup.procs -exec cat {} + 2>/dev/null)
        fi
        find "$cg" -depth -type d -exec rmdir {} + 2>/dev/null || true
        [[ -d $cg ]] || return 0
        sleep 0.2
    done
    log "warning: could not remove cgroup $cg (tries $tries)"
}

# Cgroups of runs that died without running their trap (SIGKILL, a lost machine): a cgroup named
# banger-smoke-<pid>-<n> whose runner <pid> is gone. What is left in it is killed and it is removed.
sweep_stale_cgroups() {
    local root cg pid
    while read -r root; do
        for cg in "$root"/banger-smoke-*-*; do
            [[ -d $cg ]] || continue
            pid=${cg##*/banger-smoke-}
            pid=${pid%-*}
            [[ $pid =~ ^[0-9]+$ ]] || continue
            ! kill -0 "$pid" 2>/dev/null || continue
            log "removing what an earlier, killed run left: $cg"
            cgroup_destroy "$cg"
        done
    done < <(cgroup_roots)
}

# --- one container ---------------------------------------------------------------------------------

CT_SEQ=0
CT_NAME=""
NSPAWN_PID=""
LEADER=""
CT_CGROUPS=()

# Boots a fresh container; sets CT_NAME, NSPAWN_PID, LEADER and BENCH_BOOT_MS, or returns 1 with
# BOOT_ERROR set (the caller still owes a stop_container).
start_container() {
    CT_SEQ=$((CT_SEQ + 1))
    CT_NAME=banger-smoke-$$-$CT_SEQ
    local binds=(--bind-ro="$BIN:$SRC_BIN" --bind-ro="$HELPERS_DIR:$SMOKE_LIB"
        --bind-ro="$VMM_HOST:$VMM_SRC" --bind-ro="$RUN_DIR/guest:$GUEST_DIR") dev root started
    for dev in /dev/kvm /dev/net/tun; do
        [[ -c $dev ]] && binds+=(--bind="$dev")
    done
    [[ -z $REL_HOST ]] || binds+=(--bind-ro="$REL_HOST:$REL_DIR")
    CT_CGROUPS=()
    while read -r root; do
        mkdir -p "$root/$CT_NAME/exec" "$root/$CT_NAME/scenario"
        CT_CGROUPS+=("$root/$CT_NAME")
    done < <(cgroup_roots)

    started=$(now_ms)
    (
        for root in "${CT_CGROUPS[@]}"; do echo "$BASHPID" >"$root/cgroup.procs"; done
        # Own session: a Ctrl-C on the terminal reaches the runner, which powers off in order.
        exec setsid systemd-nspawn --quiet --directory="$ROOTFS" --volatile=overlay --boot \
            --keep-unit --register=no --machine="$CT_NAME" --console=read-only "${binds[@]}" \
            </dev/null >"$RUN_DIR/$CT_NAME.console" 2>&1
    ) &
    NSPAWN_PID=$!

    local deadline=$((started + BOOT_TIMEOUT * 1000)) state=""
    while (($(now_ms) < deadline)); do
        if ! kill -0 "$NSPAWN_PID" 2>/dev/null; then
            BOOT_ERROR="container $CT_NAME exited during boot (console: $RUN_DIR/$CT_NAME.console)"
            return 1
        fi
        if [[ -z $LEADER ]]; then
            LEADER=$(find_leader)
        else
            state=$(cx systemctl is-system-running 2>/dev/null || true)
            [[ $state == running || $state == degraded ]] && break
        fi
        sleep 0.1
    done
    if [[ $state != running && $state != degraded ]]; then
        BOOT_ERROR="container $CT_NAME not up after ${BOOT_TIMEOUT}s: is-system-running says '${state:-<no leader>}' (console: $RUN_DIR/$CT_NAME.console)"
        return 1
    fi
    BENCH_BOOT_MS=$(($(now_ms) - started))
    # A copy, so that it is root-owned 0755 whoever owns the file on the host (doctor checks).
    if ! cx install -o root -g root -m 0755 "$VMM_SRC" "$VMM_BIN"; then
        BOOT_ERROR="installing the VMM as $VMM_BIN in $CT_NAME failed"
        return 1
    fi
    # /dev/kvm as udev makes it on a Debian host (0660 root:kvm) rather than the bound host node's
    # own mode: a fresh node of the same device, so that the helper hands VMMs the kvm group.
    if [[ -c /dev/kvm ]] && ! cx sh -c "getent group kvm >/dev/null || groupadd --system kvm
        umount /dev/kvm && rm -f /dev/kvm && mknod -m 0660 /dev/kvm c $(stat -c '%Hr %Lr' /dev/kvm) \
        && chgrp kvm /dev/kvm"; then
        BOOT_ERROR="making /dev/kvm 0660 root:kvm in $CT_NAME failed"
        return 1
    fi
    if [[ $state == degraded ]]; then
        log "note: $CT_NAME boots degraded: $(cx systemctl --failed --plain --no-legend | awk '{print $1}' | tr '\n' ' ')"
    fi
}

# The container's PID 1 as seen from the host: nspawn's child whose innermost pid is 1.
find_leader() {
    local pid
    for pid in $(pgrep -P "$NSPAWN_PID" || true); do
        if [[ $(awk '/^NSpid:/ { print $NF }' "/proc/$pid/status" 2>/dev/null) == 1 ]]; then
            echo "$pid"
            return
        fi
    done
}

# Kills what cx started that is still running inside the container, then lets each nsenter reap its
# child and exit on its own (see cx).
kill_injected() {
    local procs=() pid deadline
    ((${#CT_CGROUPS[@]})) || return 0
    mapfile -t procs <"${CT_CGROUPS[0]}/exec/cgroup.procs"
    ((${#procs[@]})) || return 0
    for pid in "${procs[@]}"; do
        # Inside the container's PID namespace = two NSpid fields.
        if [[ $(awk '/^NSpid:/ { print NF - 1 }' "/proc/$pid/status" 2>/dev/null) == 2 ]]; then
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
    deadline=$(($(now_ms) + 2000))
    while [[ -s ${CT_CGROUPS[0]}/exec/cgroup.procs ]] && (($(now_ms) < deadline)); do sleep 0.05; done
}

# Powers the container off in order (SIGRTMIN+4 to its systemd), kills it when that takes too long,
# and removes its cgroups. Safe to call at any point, twice, or with nothing running.
stop_container() {
    [[ -n $NSPAWN_PID ]] || return 0
    local cg
    # First whatever drives the container, then what it runs inside, then the container itself.
    # (Quietly: bash would report the killed job on stderr.)
    {
        for cg in "${CT_CGROUPS[@]}"; do cgroup_destroy "$cg/scenario"; done
        [[ -z ${TRACKED_PID:-} ]] || wait "$TRACKED_PID" || true
    } 2>/dev/null
    TRACKED_PID=""
    kill_injected
    # SIGRTMIN+4 asks systemd for a poweroff. Resent every second: PID 1 of a namespace drops a
    # signal it has no handler for yet, so one sent early in boot is lost.
    local deadline=$(($(now_ms) + STOP_TIMEOUT * 1000)) next=0
    while kill -0 "$NSPAWN_PID" 2>/dev/null && (($(now_ms) < deadline)); do
        if (($(now_ms) >= next)); then
            [[ -n $LEADER ]] || LEADER=$(find_leader)
            if [[ -n $LEADER ]]; then kill -s RTMIN+4 "$LEADER" 2>/dev/null || true
            else kill -TERM "$NSPAWN_PID" 2>/dev/null || true; fi
            next=$(($(now_ms) + 1000))
        fi
        sleep 0.1
    done
    if kill -0 "$NSPAWN_PID" 2>/dev/null; then
        log "warning: $CT_NAME did not power off within ${STOP_TIMEOUT}s; killing it"
    fi
    {
        for cg in "${CT_CGROUPS[@]}"; do cgroup_destroy "$cg"; done
        wait "$NSPAWN_PID" || true
    } 2>/dev/null
    NSPAWN_PID="" LEADER="" CT_CGROUPS=()
}

# Runs a command inside the container as root, with a clean environment and a time bound.
# It joins the run's exec/ cgroup first, so that stop_container can find whatever a scenario left
# running in the container. nsenter ignores INT/TERM so that it outlives its child and reaps it: a
# child orphaned by a killed nsenter goes to the host's init, and its zombie, still in the
# container's PID namespace, would hold up systemd-shutdown in there for 10 s.
cx() {
    (
        local cg
        for cg in "${CT_CGROUPS[@]}"; do echo "$BASHPID" >"$cg/exec/cgroup.procs"; done
        trap '' INT TERM
        exec nsenter --target "$LEADER" --all -- env -i \
            PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
            timeout --kill-after=5 "$CMD_TIMEOUT" "$@"
    )
}

# The same as the test user (the owner).
cu() { cx runuser -u "$TEST_USER" -- "$@"; }

journal_tail() {
    cx journalctl -u bangerd -u bangerd-root -n 30 --no-pager -o short-precise 2>&1 || true
}

# --- runner ----------------------------------------------------------------------------------------

list_scenarios() {
    local s
    for s in "${SCENARIOS[@]}"; do printf '%-30s %s\n' "${s%%|*}" "${s#*|}"; done
}

scenario_names() { local s; for s in "${SCENARIOS[@]}"; do echo "${s%%|*}"; done; }

PASSED=0
FAILED=0
declare -A BENCH_SCENARIO_MS=()
BOOT_TIMES=()

scenario_body() { scenario_body_fn "scenario_$1"; }

# Runs function "$1" the way scenarios run: errexit, and the first failing command is the reason.
scenario_body_fn() {
    set -eEuo pipefail
    trap 'fail "line $LINENO: \`$BASH_COMMAND\` exited $?"' ERR
    "$1"
}

# Runs "$@" in a background subshell inside the container's scenario/ cgroup and waits for it.
# Waiting with `wait` lets a trapped INT/TERM interrupt the runner at once (a foreground child
# would be waited for first), and the cgroup lets cleanup kill every process the scenario forked.
run_tracked() {
    (
        local cg
        for cg in "${CT_CGROUPS[@]}"; do echo "$BASHPID" >"$cg/scenario/cgroup.procs"; done
        "$@"
    ) &
    TRACKED_PID=$!
    wait "$TRACKED_PID"
}

run_scenario() {
    local name=$1 started rc=0 reason elapsed
    started=$(now_ms)
    if ! start_container; then
        FAILED=$((FAILED + 1))
        echo "FAIL $name: $BOOT_ERROR"
        { tail -n 20 "$RUN_DIR/$CT_NAME.console" 2>/dev/null || true; } | sed 's/^/  | /'
        KEEP_LOGS=yes
        stop_container
        return
    fi
    BOOT_TIMES+=("$BENCH_BOOT_MS")
    REASON_FILE=$RUN_DIR/$name.reason
    NOTES_FILE=$RUN_DIR/$name.notes
    : >"$REASON_FILE"
    : >"$NOTES_FILE"
    run_tracked scenario_body "$name" >"$RUN_DIR/$name.log" 2>&1 || rc=$?
    elapsed=$(($(now_ms) - started))
    BENCH_SCENARIO_MS[$name]=$elapsed
    if ((rc == 0)); then
        PASSED=$((PASSED + 1))
        echo "PASS $name ($(secs "$elapsed"))"
        sort -u "$NOTES_FILE" | sed 's/^/  note: /'
    else
        FAILED=$((FAILED + 1))
        reason=$(head -n1 "$REASON_FILE")
        echo "FAIL $name: ${reason:-exited $rc}"
        sort -u "$NOTES_FILE" | sed 's/^/  note: /'
        echo "  --- last lines of the scenario's output ($RUN_DIR/$name.log):"
        tail -n 15 "$RUN_DIR/$name.log" | sed 's/^/  | /'
        echo "  --- journalctl -u bangerd -u bangerd-root -n 30:"
        journal_tail | sed 's/^/  | /'
        KEEP_LOGS=yes
    fi
    stop_container
}

# Daemon unavailability around `systemctl restart bangerd`, a few times, in one container.
bench_restart() {
    if ! start_container; then
        echo "bench: restart gap: $BOOT_ERROR"
        KEEP_LOGS=yes
        stop_container
        return
    fi
    BOOT_TIMES+=("$BENCH_BOOT_MS")
    if ! cx "$SRC_BIN" system install --owner "$TEST_USER" >"$RUN_DIR/bench-install.log" 2>&1; then
        echo "bench: restart gap: install failed (see $RUN_DIR/bench-install.log)"
        KEEP_LOGS=yes
        stop_container
        return
    fi
    run_tracked bench_restart_body
    stop_container
}

bench_restart_body() {
    local i out results=()
    for i in 1 2 3 4 5; do
        # reset-failed clears systemd's start rate limit (5 starts in 10 s) between rounds.
        cx systemctl reset-failed bangerd
        if out=$(cx python3 "$SMOKE_LIB/restart_gap.py" "$DAEMON_SOCK" bangerd 2>&1); then
            echo "bench: restart #$i: $out"
            results+=("$out")
        else
            echo "bench: restart #$i: failed: $(last_line "$out")"
            return
        fi
    done
    printf '%s\n' "${results[@]}" | cx python3 -c 'import json, statistics, sys
rs = [json.loads(l) for l in sys.stdin if l.strip()]
def med_max(k):
    v = [r[k] for r in rs]
    return "median %.1f ms, max %.1f ms" % (statistics.median(v), max(v))
print("bench: restart unavailability, last failed -> first answered ping:", med_max("last_fail_to_ok_ms"))
print("bench: restart unavailability, last answered -> next answered ping:", med_max("outage_ms"), "(target <= 150 ms)")
print("bench: systemctl restart bangerd took:", med_max("restart_ms"))'
}

# Runs benchmark body BODY in a fresh container, as a scenario body (tracked, logged), and prints
# what it measured; NAME labels its files and lines. Usage: bench_in_container NAME BODY
bench_in_container() {
    local name=$1 body=$2 rc=0
    if ! start_container; then
        echo "bench: $name: $BOOT_ERROR"
        KEEP_LOGS=yes
        stop_container
        return
    fi
    BOOT_TIMES+=("$BENCH_BOOT_MS")
    REASON_FILE=$RUN_DIR/bench-$name.reason
    NOTES_FILE=$RUN_DIR/bench-$name.notes
    BENCH_OUT=$RUN_DIR/bench-$name.out
    : >"$REASON_FILE"
    : >"$BENCH_OUT"
    run_tracked scenario_body_fn "$body" >"$RUN_DIR/bench-$name.log" 2>&1 || rc=$?
    cat "$BENCH_OUT"
    if ((rc != 0)); then
        echo "bench: $name: failed: $(head -n1 "$REASON_FILE") (log: $RUN_DIR/bench-$name.log)"
        KEEP_LOGS=yes
    fi
    stop_container
}

# VM numbers in one container: `vm create` -> running beside the raw VMM start of the same config,
# helper and daemon RSS with 0 and 20 running VMs, `vm list --json` with 20 running and with 1,000
# rows. Numbers only; a step that fails says so and ends the VM benchmarks.
bench_vm() { bench_in_container vm bench_vm_body; }

bench() { echo "bench: $*" | tee -a "$BENCH_OUT"; }

# "median X ms (min Y, max Z, n=N)" of the numbers on stdin.
med() {
    jq -rs 'sort as $v | ($v | length) as $n
        | (if $n % 2 == 1 then $v[($n - 1) / 2] else ($v[$n / 2 - 1] + $v[$n / 2]) / 2 end) as $m
        | "median \($m * 10 | round / 10) ms (min \($v[0] * 10 | round / 10), max \($v[-1] * 10 | round / 10), n=\($n))"'
}

# shellcheck disable=SC2016 # awk's own $2
rss_kb() { cx awk '/^VmRSS:/ { print $2 }' "/proc/$(cx systemctl show -P MainPID "$1")/status"; }

bench_vm_body() {
    vm_setup
    local i raw=() scoped=() created=() work=/var/tmp/banger-raw rootfs
    bench "vm: VMM $VMM_KIND ($VMM_HOST)"
    bench "vm: RSS with no VMs: helper $(rss_kb bangerd-root) KiB, daemon $(rss_kb bangerd) KiB"
    cx install -d -o "$TEST_USER" -g "$TEST_USER" -m 0700 "$work"
    rootfs=$work/rootfs.ext4
    cx install -o "$TEST_USER" -g "$TEST_USER" -m 0600 "$GUEST_DIR/rootfs.img" "$rootfs"
    # Same config as `vm create --image tiny`: 1 vCPU, 512 MiB, the kernel, one drive, vsock; ready
    # = the console line. Raw: spawned as the owner; scoped: as the helper does, via systemd-run.
    for i in 1 2 3 4 5 6 7; do
        must "raw VMM start #$i" cx python3 "$SMOKE_LIB/vmbench.py" raw "$VMM_BIN" "$GUEST_DIR/tiny-guest.elf" \
            "$rootfs" "$work" "$READY_PREFIX" --uid "$TEST_UID" --gid "$TEST_UID"
        raw+=("$(jq .ready_ms <<<"$OUT")")
        must "raw VMM start in a scope #$i" cx python3 "$SMOKE_LIB/vmbench.py" raw "$VMM_BIN" \
            "$GUEST_DIR/tiny-guest.elf" "$rootfs" "$work" "$READY_PREFIX" --uid "$TEST_UID" --gid "$TEST_UID" --scope
        scoped+=("$(jq .ready_ms <<<"$OUT")")
        must "vm create b$i" cu python3 "$SMOKE_LIB/vmbench.py" create "b$i" tiny
        created+=("$(jq .create_ms <<<"$OUT")")
    done
    bench "vm create -> running (image tiny, console ready line): $(printf '%s\n' "${created[@]}" | med)"
    bench "raw VMM start, same config, spawn -> ready line:       $(printf '%s\n' "${raw[@]}" | med)"
    bench "raw VMM start in its own systemd scope (as the helper): $(printf '%s\n' "${scoped[@]}" | med)"
    local mc mr ms
    mc=$(printf '%s\n' "${created[@]}" | jq -s 'sort | .[length / 2 | floor]')
    mr=$(printf '%s\n' "${raw[@]}" | jq -s 'sort | .[length / 2 | floor]')
    ms=$(printf '%s\n' "${scoped[@]}" | jq -s 'sort | .[length / 2 | floor]')
    bench "vm create / raw start: $(jq -n "$mc / $mr * 100 | round / 100")x (target <= 1.2); / raw start in a scope: $(jq -n "$mc / $ms * 100 | round / 100")x"
    if [[ $IMAGE != tiny ]]; then
        local agent=()
        for i in 1 2 3 4 5; do
            must "vm create a$i (agent)" cu python3 "$SMOKE_LIB/vmbench.py" create "a$i" "$IMAGE"
            agent+=("$(jq .create_ms <<<"$OUT")")
        done
        bench "vm create -> running (image $IMAGE, agent over vsock): $(printf '%s\n' "${agent[@]}" | med)"
    fi
    local n
    n=$(cu banger vm list --json | jq length)
    for ((i = n + 1; i <= 20; i++)); do
        must "vm create r$i" cu banger vm create --name "r$i" --image "$IMAGE"
    done
    n=$(cu banger vm list --json | jq '[.[] | select(.state == "running")] | length')
    bench "vm: RSS with $n running VMs: helper $(rss_kb bangerd-root) KiB, daemon $(rss_kb bangerd) KiB"
    must "vm list with $n running" cu python3 "$SMOKE_LIB/vmbench.py" list 20
    bench "vm list --json, $n running VMs: CLI $(jq -c .cli_ms <<<"$OUT") ms, bare vm.list RPC $(jq -c .rpc_ms <<<"$OUT") ms"
    local all started
    all=$(cu banger vm list --json | jq -r '.[].name' | tr '\n' ' ')
    started=$(now_ms)
    # shellcheck disable=SC2086 # one word per VM name
    must "vm delete all" cu banger vm delete $all
    bench "vm delete of $n running VMs in one call: $(($(now_ms) - started)) ms"

    must "stop the daemon" cx systemctl stop bangerd
    must "seed 1000 VM rows" cu python3 "$SMOKE_LIB/vmbench.py" seed /var/lib/banger/state.db 1000
    started=$(now_ms)
    must "start the daemon over 1000 rows" cx systemctl start bangerd
    bench "vm: systemctl start bangerd (reconcile) with 1000 stopped rows: $(($(now_ms) - started)) ms"
    must "vm list with 1000 rows" cu python3 "$SMOKE_LIB/vmbench.py" list 20
    local served
    served=$(cx journalctl -u bangerd -o cat --no-pager | grep '^{' \
        | jq -r 'select(.msg == "rpc" and .method == "vm.list") | .duration_ms' | tail -n 40 | med)
    bench "vm list, 1000 rows, as the daemon logs it (duration_ms: parse, handle, serialize, write): $served"
    bench "vm list --json, $(jq .rows <<<"$OUT") rows: CLI $(jq -c .cli_ms <<<"$OUT") ms, bare vm.list RPC $(jq -c .rpc_ms <<<"$OUT") ms (target median <= 5 ms); bare ping RPC $(jq -c .ping_ms <<<"$OUT") ms"
}

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

size_mib() { cx stat -c %s "$1" | jq -r '. / 1048576 * 10 | round / 10'; }

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    # A signal can land while a redirected function runs (run_tracked > log): talk to the terminal.
    exec 1>&"$ORIG_STDOUT" 2>&"$ORIG_STDERR"
    stop_container
    if [[ -n ${RUN_DIR:-} && -d $RUN_DIR ]]; then
        if [[ ${KEEP_LOGS:-} == yes || ${SMOKE_KEEP_LOGS:-} == 1 ]]; then
            log "logs kept in $RUN_DIR"
        else
            rm -rf "$RUN_DIR"
        fi
    fi
    exit "$rc"
}

usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
}

main() {
    local selected="" bench=no rebuild=no
    while (($#)); do
        case $1 in
            --list) list_scenarios; return 0 ;;
            --scenario) [[ -n ${2:-} ]] || die "--scenario needs a comma-separated list (see --list)"; selected=$2; shift ;;
            --scenario=?*) selected=${1#*=} ;;
            --bench) bench=yes ;;
            --rebuild) rebuild=yes ;;
            -h | --help) usage; return 0 ;;
            *) usage >&2; die "unknown argument $1" ;;
        esac
        shift
    done

    local names=() n
    if [[ -n $selected ]]; then
        IFS=, read -r -a names <<<"$selected"
        for n in "${names[@]}"; do
            declare -F "scenario_$n" >/dev/null || die "unknown scenario '$n' (see --list)"
        done
    else
        mapfile -t names < <(scenario_names)
    fi

    [[ $(id -u) == 0 ]] || die "must run as root (systemd-nspawn)"
    ensure_host_tools
    exec {ORIG_STDOUT}>&1 {ORIG_STDERR}>&2
    RUN_DIR=$(mktemp -d "${TMPDIR:-/tmp}/banger-smoke.XXXXXX")
    trap cleanup EXIT
    trap 'echo "smoke: interrupted" >&"$ORIG_STDERR"; exit 130' INT
    trap 'echo "smoke: terminated" >&"$ORIG_STDERR"; exit 143' TERM

    sweep_stale_cgroups
    prepare_binary
    prepare_vmm
    prepare_guest
    prepare_rootfs "$rebuild"
    if [[ $bench == yes || " ${names[*]} " == *" update_"* ]]; then
        prepare_releases "$bench"
        log "releases in $REL_HOST ($(secs "$BENCH_RELEASES_MS"))"
    fi
    log "rootfs $ROOTFS ($BENCH_ROOTFS_KIND, $(secs "$BENCH_ROOTFS_MS")); binary $BIN; VMM $VMM_HOST ($VMM_KIND)"

    for n in "${names[@]}"; do run_scenario "$n"; done
    if [[ $bench == yes ]]; then
        bench_restart
        bench_vm
        bench_update
        echo "bench: rootfs prepare ($BENCH_ROOTFS_KIND): ${BENCH_ROOTFS_MS} ms"
        echo "bench: container boot to running: ${BOOT_TIMES[*]} ms"
        for n in "${names[@]}"; do echo "bench: scenario $n: ${BENCH_SCENARIO_MS[$n]} ms"; done
    fi
    echo "smoke: $PASSED passed, $FAILED failed"
    ((FAILED == 0))
}

main "$@"
