# shellcheck shell=bash
# Snapshot scenarios (issue 12): clones of one snapshot under real systemd, across helper and daemon
# restarts.
# shellcheck source=scripts/smoke/lib.sh
[[ -n ${SMOKE_LIB_LOADED:-} ]] || source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

SCENARIOS+=(
    "snapshot_clone_survives|vm snapshot; two clones (own scopes, addresses, instance ids); helper+daemon restart: same pids, instance ids; snapshot rm refused while they run"
)

# The instance id NAME's guest agent reports (empty for a guest without the agent).
guest_instance() {
    [[ $IMAGE == agent ]] || return 0
    must "agent hello ($1)" cx python3 "$SMOKE_LIB/agent.py" "$VMS_DIR/$2/vsock.sock" hello >&2
    jq -r '.instance_id // ""' <<<"$OUT"
}

scenario_snapshot_clone_survives() {
    local c inst gi
    vm_setup
    must "vm create src" cu banger vm create --name src --image "$IMAGE" --memory 128
    vm_get src
    local src_boot=$VM_BOOT
    must "vm snapshot" cu banger vm snapshot src --as warm
    printf 'snapshot: %s\n' "$(last_line "$OUT")"
    vm_get src
    expect_eq "$VM_STATE" running "the source after its snapshot"
    must "vm create --from warm c1" cu banger vm create --from warm --name c1
    must "vm create --from warm c2" cu banger vm create --from warm --name c2
    declare -A PID START BOOT INST
    for c in c1 c2; do
        vm_get "$c"
        expect_eq "$VM_STATE" running "$c after restore"
        expect_vmm_process "$c after restore"
        expect_eq "$VM_BOOT" "$src_boot" "$c boot_id (clones share the source's)"
        inst=$(jq -r '.vm.instance_id // ""' <<<"$OUT")
        gi=$(guest_instance "$c" "$VM_ID")
        expect_eq "$gi" "$inst" "$c: the guest's instance id is the recorded one"
        PID[$c]=$VM_PID START[$c]=$VM_START BOOT[$c]=$VM_BOOT INST[$c]=$inst
    done
    [[ ${PID[c1]} != "${PID[c2]}" ]] || fail "both clones have VMM pid ${PID[c1]}"
    if [[ $IMAGE == agent ]]; then
        [[ -n ${INST[c1]} && ${INST[c1]} != "${INST[c2]}" ]] || fail "clone instance ids: '${INST[c1]}' '${INST[c2]}'"
    fi
    must "vm list" cu banger vm list --json
    expect_eq "$(jq -r '[.[] | select(.snapshot == "warm") | .name] | sort | join(",")' <<<"$OUT")" "c1,c2" \
        "vm list: VMs from snapshot warm"
    must_fail "snapshot rm while clones run" cu banger snapshot rm warm
    grep -q "in use by running VMs c1, c2" <<<"$OUT" || fail "snapshot rm refusal: $(last_line "$OUT")"

    cx systemctl reset-failed bangerd-root bangerd
    must "systemctl restart bangerd-root" cx systemctl restart bangerd-root
    must "systemctl restart bangerd" cx systemctl restart bangerd
    expect_active bangerd bangerd-root
    for c in c1 c2; do
        vm_list_get "$c"
        expect_eq "$L_STATE $L_PID $L_START $L_BOOT" "running ${PID[$c]} ${START[$c]} ${BOOT[$c]}" \
            "$c in vm list after the restarts"
        vm_get "$c"
        expect_vmm_process "$c after the restarts"
        expect_eq "$(jq -r '.vm.instance_id // ""' <<<"$OUT")" "${INST[$c]}" "$c recorded instance id after the restarts"
        gi=$(guest_instance "$c" "$VM_ID")
        expect_eq "$gi" "${INST[$c]}" "$c guest instance id after the restarts"
    done
    expect_reconciled "adopted" 3 "after the daemon restart"
    must "vm delete" cu banger vm delete c1 c2 src
    must "snapshot rm" cu banger snapshot rm warm
    must "snapshot list" cu banger snapshot list --json
    expect_eq "$OUT" "[]" "snapshots after rm"
    expect_no_vms "after delete"
    expect_no_error_logs "in this scenario"
}
