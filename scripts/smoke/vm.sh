# shellcheck shell=bash
# VM scenarios (DESIGN.md §6, issue 4), the VM helpers the other areas share, and the VM benchmark.
# shellcheck source=scripts/smoke/lib.sh
[[ -n ${SMOKE_LIB_LOADED:-} ]] || source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

SCENARIOS+=(
    "vm_lifecycle|vm create -> running (owner uid, own scope) -> stop -> start (new boot_id) -> restart -> delete"
    "helper_restart_keeps_vm_alive|10x systemctl restart bangerd-root: same pid, start time, boot_id; still running; stop works"
    "daemon_restart_keeps_vm_alive|10x systemctl restart bangerd: same pid, start time, boot_id; still running; stop works"
    "daemon_down_vm_survives|daemon stop: the VM keeps running; system restart re-adopts it untouched"
    "vm_died_while_daemon_down|VMM SIGKILLed while the daemon is down: after start it is stopped, cleaned, startable"
    "invalid_spec_rejected|vcpu 0, memory 0, bad names (CLI and RPC): clear errors, exit 2, no row, no dir"
    "concurrent_creates|8 creates at once: 8 distinct running VMs in 8 scopes; same-name race has one winner; delete all"
)

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

# --- VM helpers ---

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

# --- benchmark ---

# VM numbers in one container: `vm create` -> running beside the raw VMM start of the same config,
# helper and daemon RSS with 0 and 20 running VMs, `vm list --json` with 20 running and with 1,000
# rows. Numbers only; a step that fails says so and ends the VM benchmarks.
bench_vm() { bench_in_container vm bench_vm_body; }

bench_vm_body() {
    vm_setup
    local i raw=() scoped=() created=() work=/var/tmp/banger-raw rootfs
    bench "vm: VMM $VMM_KIND ($VMM_HOST)"
    bench "vm: RSS with no VMs: helper $(rss_kb bangerd-root) KiB, daemon $(rss_kb bangerd) KiB"
    cx install -d -o "$TEST_USER" -g "$TEST_USER" -m 0700 "$work"
    rootfs=$work/rootfs.ext4
    cx install -o "$TEST_USER" -g "$TEST_USER" -m 0600 "$GUEST_DIR/rootfs.img" "$rootfs"
    # Same config as `vm create --image tiny`: 1 vCPU, 512 MiB, the kernel, one drive, vsock; ready
    # = the console line. Raw: spawned as the owner; scoped: as the helper does (held, registered
    # with StartTransientUnit over D-Bus, released); and the old way, via systemd-run --scope.
    local oldscope=() rawx=() scopedx=() oldscopex=()
    for i in 1 2 3 4 5 6 7; do
        must "raw VMM start #$i" cx python3 "$SMOKE_LIB/vmbench.py" raw "$VMM_BIN" "$GUEST_DIR/tiny-guest.elf" \
            "$rootfs" "$work" "$READY_PREFIX" --uid "$TEST_UID" --gid "$TEST_UID"
        raw+=("$(jq .ready_ms <<<"$OUT")")
        rawx+=("$(jq .exec_ms <<<"$OUT")")
        must "raw VMM start in a scope #$i" cx python3 "$SMOKE_LIB/vmbench.py" raw "$VMM_BIN" \
            "$GUEST_DIR/tiny-guest.elf" "$rootfs" "$work" "$READY_PREFIX" --uid "$TEST_UID" --gid "$TEST_UID" --scope
        scoped+=("$(jq .ready_ms <<<"$OUT")")
        scopedx+=("$(jq .exec_ms <<<"$OUT")")
        # Only a comparison: a failed run is reported, not fatal.
        if OUT=$(cx python3 "$SMOKE_LIB/vmbench.py" raw "$VMM_BIN" "$GUEST_DIR/tiny-guest.elf" "$rootfs" "$work" \
            "$READY_PREFIX" --uid "$TEST_UID" --gid "$TEST_UID" --scope=systemd-run 2>&1); then
            oldscope+=("$(jq .ready_ms <<<"$OUT")")
            oldscopex+=("$(jq .exec_ms <<<"$OUT")")
        else
            bench "raw VMM start via systemd-run #$i failed: $(last_line "$OUT")"
        fi
        must "vm create b$i" cu python3 "$SMOKE_LIB/vmbench.py" create "b$i" tiny
        created+=("$(jq .create_ms <<<"$OUT")")
        # The tiny guest spins a vCPU (it polls for Ctrl-Alt-Del): keep only b1 (snapshotted
        # below) running, or the later runs would share 2 cores with the earlier guests.
        ((i == 1)) || must "stop b$i" cu banger vm stop --timeout 0 "b$i"
    done
    bench "vm create -> running (image tiny, console ready line): $(printf '%s\n' "${created[@]}" | med)"
    bench "raw VMM start, same config, spawn -> ready line:       $(printf '%s\n' "${raw[@]}" | med)"
    bench "raw VMM start in its own systemd scope (as the helper): $(printf '%s\n' "${scoped[@]}" | med)"
    ((${#oldscope[@]} == 0)) \
        || bench "raw VMM start in a scope via systemd-run (the old way): $(printf '%s\n' "${oldscope[@]}" | med)"
    bench "spawn -> VMM exec'd: raw $(printf '%s\n' "${rawx[@]}" | med); in a scope (as the helper) $(printf '%s\n' "${scopedx[@]}" | med)"
    ((${#oldscopex[@]} == 0)) \
        || bench "spawn -> VMM exec'd via systemd-run (the old way): $(printf '%s\n' "${oldscopex[@]}" | med)"
    local mc mr ms
    mc=$(printf '%s\n' "${created[@]}" | jq -s 'sort | .[length / 2 | floor]')
    mr=$(printf '%s\n' "${raw[@]}" | jq -s 'sort | .[length / 2 | floor]')
    ms=$(printf '%s\n' "${scoped[@]}" | jq -s 'sort | .[length / 2 | floor]')
    # The helper's own time for priv.vm_launch (fork, scope, exec, API socket up), as it logs it.
    bench "helper priv.vm_launch (duration_ms as the helper logs it): $(cx journalctl -u bangerd-root -o cat --no-pager \
        | grep '^{' | jq -r 'select(.msg == "rpc" and .method == "priv.vm_launch") | .duration_ms' | med)"
    bench "vm create / raw start: $(jq -n "$mc / $mr * 100 | round / 100")x (target <= 1.2); / raw start in a scope: $(jq -n "$mc / $ms * 100 | round / 100")x"
    # A restore under systemd: the clone's VMM gets its own scope like a booted one (the
    # registration is on its path); the cold creates above are the comparison.
    # Only the clone being measured runs (b2..b7 were stopped above, b1 is stopped once snapshotted).
    local restored=()
    must "delete b2..b7" cu banger vm delete b2 b3 b4 b5 b6 b7
    must "vm snapshot b1" cu banger vm snapshot b1 --as warm
    must "stop b1" cu banger vm stop --timeout 0 b1
    for i in 1 2 3 4 5 6 7; do
        must "vm create --from warm w$i" cu python3 "$SMOKE_LIB/vmbench.py" restore "w$i" warm
        restored+=("$(jq .create_ms <<<"$OUT")")
        must "stop w$i" cu banger vm stop --timeout 0 "w$i"
    done
    bench "vm create --from warm -> running (image tiny, own scope, CLI wall time): $(printf '%s\n' "${restored[@]}" | med)"
    must "restore stages" cu python3 "$SMOKE_LIB/vmbench.py" stages w1 w2 w3 w4 w5 w6 w7
    bench "vm create --from stages, median ms (* = beside the others): $OUT"
    must "create stages" cu python3 "$SMOKE_LIB/vmbench.py" stages b1 b2 b3 b4 b5 b6 b7
    bench "vm create stages, median ms (* = beside the others): $OUT"
    must "delete the clones" cu banger vm delete w1 w2 w3 w4 w5 w6 w7
    must "snapshot rm warm" cu banger snapshot rm warm
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
