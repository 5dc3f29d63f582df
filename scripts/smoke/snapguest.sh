# shellcheck shell=bash
# Snapshot scenarios on a real guest (issue 12): a TCG guest (the kernel and the image guest.sh
# builds, booted by the stand-in's TCG engine) snapshotted, and clones restored from it by the
# stand-in's TCG engine (QEMU migration streams), each told its own identity by the agent's
# `reconfigure` (DESIGN §13; SNAPAPI.md: the engine reaches a restored guest at the snapshot's
# address until the reconfigure answer moves it, so the source is stopped first and clones are
# restored one at a time by the daemon).
# shellcheck source=scripts/smoke/guest.sh
[[ -n ${SMOKE_LIB_LOADED:-} ]] || source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
declare -F guest_setup >/dev/null || source "$(dirname "${BASH_SOURCE[0]}")/guest.sh"

SCENARIOS+=(
    "snapshot_clone_network|TCG guest snapshotted (--stop), two clones: each answers SSH (vm exec) on its own address with its own name and sshd host key, same boot_id, distinct instance ids"
)

# `banger vm exec NAME -- CMD…` until it works (sshd comes up after the agent under TCG), at most
# $SNAP_SSH_WAIT_S seconds; OUT holds the last output.
SNAP_SSH_WAIT_S=180
snap_exec_ready() {
    local name=$1 t0
    shift
    t0=$(now_ms)
    while :; do
        RC=0
        OUT=$(CMD_TIMEOUT=60 cu banger vm exec "$name" -- "$@" 2>&1) || RC=$?
        ((RC == 0)) && return 0
        (($(now_ms) - t0 > SNAP_SSH_WAIT_S * 1000)) \
            && fail "vm exec $name -- $* never worked within ${SNAP_SSH_WAIT_S}s: $(last_line "$OUT")"
        sleep 2
    done
}

# vm exec NAME -- CMD…, its trimmed output in OUT (fails the scenario when it fails).
snap_exec() {
    local name=$1
    shift
    must "vm exec $name -- $*" cu banger vm exec "$name" -- "$@"
    OUT=$(last_line "$OUT")
}

# Creates clone $1 from snapshot $2; VM_* set by vm_net_get; notes how long it took.
snap_clone() {
    local name=$1 snap=$2 t0 ms
    t0=$(now_ms)
    RC=0
    OUT=$(CMD_TIMEOUT=320 cu banger vm create --from "$snap" --name "$name" 2>&1) || RC=$?
    ms=$(($(now_ms) - t0))
    printf '$ banger vm create --from %s --name %s  [%d ms]\n%s\n' "$snap" "$name" "$ms" "$OUT"
    ((RC == 0)) || fail "vm create --from $snap --name $name: exited $RC after $(secs "$ms"): $(last_line "$OUT")"
    note "vm create --from $snap --name $name (TCG restore + reconfigure): $(secs "$ms")"
    vm_net_get "$name"
    expect_eq "$VM_STATE" running "$name after create --from"
}

scenario_snapshot_clone_network() {
    guest_need_kernel
    cx "$SRC_BIN" vm snapshot --help >/dev/null 2>&1 \
        || skip "banger vm snapshot is not in this build (the daemon's snapshot flow)"
    guest_setup
    guest_create snapsrc
    local src_ip=$VM_IP src_id=$VM_ID
    # A warmed-up guest: snapshot once it answers SSH.
    snap_exec_ready snapsrc cat /proc/sys/kernel/random/boot_id
    local boot
    boot=$(last_line "$OUT")
    expect_match "$boot" '^[0-9a-f-]{36}$' "snapsrc's boot_id over SSH"
    agent_call "$src_id" hello
    local keys=("$(jq -r .host_key <<<"$OUT")")
    local t0
    t0=$(now_ms)
    must "vm snapshot snapsrc --as snap1 --stop" cu banger vm snapshot snapsrc --as snap1 --stop
    note "vm snapshot snapsrc --stop (TCG: QEMU migration stream): $(secs $(($(now_ms) - t0)))"

    snap_clone c1 snap1
    local c1_id=$VM_ID c1_ip=$VM_IP c1_mac=$VM_MAC
    expect_vm_net_identity c1
    snap_clone c2 snap1
    local c2_id=$VM_ID c2_ip=$VM_IP c2_mac=$VM_MAC
    expect_vm_net_identity c2
    [[ $c1_ip != "$c2_ip" && $c1_ip != "$src_ip" && $c2_ip != "$src_ip" ]] \
        || fail "clone addresses are not distinct: snapsrc $src_ip, c1 $c1_ip, c2 $c2_ip"
    [[ $c1_mac != "$c2_mac" ]] || fail "c1 and c2 share the MAC $c1_mac"

    local name ip mac id ids=()
    for name in c1 c2; do
        if [[ $name == c1 ]]; then ip=$c1_ip mac=$c1_mac id=$c1_id; else ip=$c2_ip mac=$c2_mac id=$c2_id; fi
        # vm exec reaches the clone by SSH on the address banger gave it.
        snap_exec_ready "$name" hostname
        expect_eq "$(last_line "$OUT")" "$name" "$name's hostname over SSH"
        snap_exec "$name" cat /proc/sys/kernel/random/boot_id
        expect_eq "$OUT" "$boot" "$name's boot_id (the snapshot's kernel, not booted again)"
        must "vm exec $name -- ip -4 -o addr show dev eth0" cu banger vm exec "$name" -- ip -4 -o addr show dev eth0
        expect_eq "$(awk '{print $4}' <<<"$OUT" | paste -sd' ')" "$ip/${NET_SUBNET#*/}" \
            "$name's eth0 addresses (the snapshot's one gone)"
        snap_exec "$name" cat /sys/class/net/eth0/address
        expect_eq "$OUT" "$mac" "$name's eth0 MAC"
        agent_call "$id" hello
        expect_eq "$(jq -r .boot_id <<<"$OUT")" "$boot" "$name's agent boot_id"
        expect_match "$(jq -r .instance_id <<<"$OUT")" '^[0-9a-f]{32}$' "$name's agent instance_id"
        ids+=("$(jq -r .instance_id <<<"$OUT")")
        # Its own sshd host key (made after the reseed); `vm exec` above pinned it and sshd served
        # it (StrictHostKeyChecking=yes), so sshd reloaded the new key.
        keys+=("$(jq -r .host_key <<<"$OUT")")
        expect_match "${keys[-1]}" '^ssh-ed25519 ' "$name's agent host_key"
    done
    [[ ${ids[0]} != "${ids[1]}" ]] || fail "c1 and c2 report the same instance id ${ids[0]}"
    [[ ${keys[0]} != "${keys[1]}" && ${keys[0]} != "${keys[2]}" && ${keys[1]} != "${keys[2]}" ]] \
        || fail "snapsrc, c1 and c2 do not each have their own sshd host key: ${keys[*]}"
    printf 'snapsrc %s, c1 %s (%s), c2 %s (%s), boot_id %s\n' "$src_ip" "$c1_ip" "${ids[0]}" "$c2_ip" "${ids[1]}" "$boot"

    guest_teardown c1 c2 snapsrc
    if cu banger snapshot rm --help >/dev/null 2>&1; then
        must "snapshot rm snap1" cu banger snapshot rm snap1
    fi
    expect_no_error_logs "in this scenario"
}
