# shellcheck shell=bash
# Real-guest scenarios (DESIGN.md §12, §13, issue 9): the kernel built by packaging/kernel/build.sh,
# an image made in the container by the real `banger image build`, booted by the stand-in VMM's TCG
# engine (QEMU TCG, the guest's agent on TCP 52 through the tap), with real systemd, sshd and agent
# inside. Slow (tens of seconds of TCG boot each): few scenarios, each lean.
#
# What the container gets (hooks in lib.sh, for these scenarios only):
# - /opt/banger-kernel: the cached kernel directory (read-only). None cached: the scenarios SKIP.
# - /var/cache/banger: a per-container directory under $GUEST_CACHE/work, holding a hard-linked
#   copy of every debootstrap tree in $GUEST_CACHE/debootstrap (so `image build` only pays
#   debootstrap once per machine; one mount, so its `cp --link` works). A tree a scenario made is
#   moved into $GUEST_CACHE/debootstrap once its container is stopped.
# - the host's Debian mirror through scripts/smoke/mirror_proxy.py (the container has no network of
#   its own): `serve` on the host for the mirror's host only, `relay` in the container on
#   127.0.0.1:$GUEST_PROXY_PORT, used as http_proxy by debootstrap's wget.
# The "upstream" host of guest_network lives in a network namespace the scenario creates inside the
# container; no test traffic goes anywhere else.
# shellcheck source=scripts/smoke/lib.sh
[[ -n ${SMOKE_LIB_LOADED:-} ]] || source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

SCENARIOS+=(
    "guest_boots|built kernel + image build (real debootstrap) + TCG boot: agent hello (boot_id, host key, name); vm logs shows systemd"
    "guest_network|guest has its ip= address and name; TCP to guest:22 answers; no --nat: upstream unreachable, --nat: reachable, masqueraded"
    "guest_agent_ports|the guest agent's ports: sshd on 22, and a listener started in the guest (vm exec)"
    "image_build_refusals|not root, name taken, debootstrap failure (log path), --size too small (how much): clear errors, nothing left"
)

GUEST_CACHE=${SMOKE_GUEST_CACHE:-/var/tmp/banger-cache/smoke-image}
GUEST_KERNEL_CT=/opt/banger-kernel
GUEST_PROXY_CT=/run/banger-smoke-mirror
GUEST_PROXY_PORT=3142
GUEST_UPSTREAM_NS=smoke-upstream
GUEST_UPSTREAM_IP=10.77.0.2
GUEST_UPLINK_IP=10.77.0.1
GUEST_READY_TIMEOUT_S=240
GUEST_KERNEL_HOST=""
GUEST_NO_KERNEL=""
GUEST_MIRROR=""
GUEST_NO_PROXY=""
GUEST_PROXY_PID=""
GUEST_WORK=""

PREPARE_HOOKS+=(guest_prepare)
BEFORE_CONTAINER_HOOKS+=(guest_before_container)
AFTER_CONTAINER_HOOKS+=(guest_after_container)
CLEANUP_HOOKS+=(guest_cleanup)

is_guest_scenario() { [[ $1 == guest_* || $1 == image_build_* || $1 == snapshot_clone_network ]]; }

# --- host side: once per run, then per container ---------------------------------------------------

# Finds the kernel (SMOKE_KERNEL_DIR, else build.sh's cache; never builds) and starts the mirror
# proxy, when a guest scenario is selected.
guest_prepare() {
    local n want=no err
    for n in "$@"; do is_guest_scenario "$n" && want=yes; done
    [[ $want == yes ]] || return 0
    if [[ -n ${SMOKE_KERNEL_DIR:-} ]]; then
        if [[ -f $SMOKE_KERNEL_DIR/vmlinux ]]; then
            GUEST_KERNEL_HOST=$(realpath "$SMOKE_KERNEL_DIR")
        else
            GUEST_NO_KERNEL="SMOKE_KERNEL_DIR=$SMOKE_KERNEL_DIR holds no vmlinux"
        fi
    elif GUEST_KERNEL_HOST=$("$REPO_ROOT/packaging/kernel/build.sh" --cached-only 2>"$RUN_DIR/kernel.err" | tail -n1) \
        && [[ -f $GUEST_KERNEL_HOST/vmlinux ]]; then
        :
    else
        err=$(tail -n1 "$RUN_DIR/kernel.err" 2>/dev/null)
        GUEST_KERNEL_HOST=""
        GUEST_NO_KERNEL="no built guest kernel: ${err:-packaging/kernel/build.sh --cached-only found none} (scripts/test.sh builds it)"
    fi
    if [[ -n $GUEST_KERNEL_HOST ]]; then
        log "guest kernel $GUEST_KERNEL_HOST/vmlinux ($(grep -s '^build_seconds=' "$GUEST_KERNEL_HOST/build-info" || echo 'no build-info'))"
    else
        log "guest kernel: none ($GUEST_NO_KERNEL)"
    fi

    mkdir -p "$GUEST_CACHE/debootstrap" "$GUEST_CACHE/work" "$RUN_DIR/mirror"
    GUEST_MIRROR=$(debian_mirror)
    if [[ $GUEST_MIRROR == http://* ]]; then
        python3 "$HELPERS_DIR/mirror_proxy.py" serve "$RUN_DIR/mirror/proxy.sock" "$GUEST_MIRROR" \
            2>"$RUN_DIR/mirror/proxy.log" &
        GUEST_PROXY_PID=$!
    else
        GUEST_NO_PROXY="the host's mirror $GUEST_MIRROR is not http:// (mirror_proxy.py proxies plain HTTP only)"
        log "guest: $GUEST_NO_PROXY; image builds work only from the debootstrap cache"
    fi
}

guest_cleanup() {
    [[ -z $GUEST_PROXY_PID ]] || { kill "$GUEST_PROXY_PID" 2>/dev/null; wait "$GUEST_PROXY_PID" 2>/dev/null; }
    GUEST_PROXY_PID=""
    [[ -z $GUEST_WORK ]] || rm -rf "$GUEST_WORK"
    GUEST_WORK=""
}

# Gives a guest scenario's container the kernel, its own /var/cache/banger seeded with the cached
# debootstrap trees (hard links, a second or two) and the proxy's socket.
guest_before_container() {
    is_guest_scenario "$1" || return 0
    local d
    GUEST_WORK=$GUEST_CACHE/work/$$-$1
    rm -rf "$GUEST_WORK"
    mkdir -p "$GUEST_WORK/debootstrap"
    for d in "$GUEST_CACHE"/debootstrap/*/; do
        [[ -f $d/ready ]] || continue
        cp -a --link "${d%/}" "$GUEST_WORK/debootstrap/" || log "warning: could not link $d into $GUEST_WORK"
    done
    CT_EXTRA_BINDS=(--bind="$GUEST_WORK:/var/cache/banger" --bind="$RUN_DIR/mirror:$GUEST_PROXY_CT")
    [[ -z $GUEST_KERNEL_HOST ]] || CT_EXTRA_BINDS+=(--bind-ro="$GUEST_KERNEL_HOST:$GUEST_KERNEL_CT")
}

# Keeps a debootstrap tree the scenario made (complete ones only) and drops the container's copy.
guest_after_container() {
    is_guest_scenario "$1" || return 0
    [[ -n $GUEST_WORK && -d $GUEST_WORK ]] || return 0
    local d key
    for d in "$GUEST_WORK"/debootstrap/*/; do
        [[ -f $d/ready ]] || continue
        key=$(basename "$d")
        if [[ ! -e $GUEST_CACHE/debootstrap/$key ]] && mv -T "${d%/}" "$GUEST_CACHE/debootstrap/$key" 2>/dev/null; then
            log "debootstrap tree $key kept in $GUEST_CACHE/debootstrap"
        fi
    done
    rm -rf "$GUEST_WORK"
    GUEST_WORK=""
}

# --- in the scenario --------------------------------------------------------------------------------

guest_need_kernel() {
    [[ -n $GUEST_KERNEL_HOST ]] || skip "$GUEST_NO_KERNEL"
    cx test -x /usr/bin/qemu-system-x86_64 || skip "no qemu-system-x86_64 in the test bed (ROOTFS_PACKAGES)"
    [[ $VMM_KIND == standin ]] || skip "SMOKE_FIRECRACKER is a real Firecracker: this host's /dev/kvm boots no Linux guest"
}

# The in-container half of the mirror proxy, as a transient unit (gone with the container).
guest_relay() {
    [[ -z $GUEST_NO_PROXY ]] || return 0
    must "mirror relay" cx systemd-run --quiet --unit=smoke-mirror-relay \
        python3 "$SMOKE_LIB/mirror_proxy.py" relay "$GUEST_PROXY_PORT" "$GUEST_PROXY_CT/proxy.sock"
    local _
    for _ in $(seq 50); do
        cx python3 -c 'import socket, sys; socket.create_connection(("127.0.0.1", int(sys.argv[1])), 1)' \
            "$GUEST_PROXY_PORT" 2>/dev/null && return 0
        sleep 0.1
    done
    fail "the mirror relay does not listen on 127.0.0.1:$GUEST_PROXY_PORT"
}

# `banger image build` as root with the mirror through the proxy and the time bound of a cold build.
image_build() {
    CMD_TIMEOUT=1800 cx env "http_proxy=http://127.0.0.1:$GUEST_PROXY_PORT" \
        banger image build "$@" --mirror "$GUEST_MIRROR"
}

# Installs banger, imports the built kernel as `k` and builds image `dev` with it (the product
# path: `sudo banger image build dev --kernel k`). Notes the build's time and size.
guest_setup() {
    install_banger
    # A TCG guest on a busy 2-core machine takes a minute or more to reach its agent: the daemon's
    # 60 s readiness wait is lengthened for the test bed (under the CLI's own 300 s call limit).
    cx mkdir -p /etc/systemd/system/bangerd.service.d
    cx sh -c "printf '[Service]\nEnvironment=BANGER_READY_TIMEOUT_S=$GUEST_READY_TIMEOUT_S\n' \
        >/etc/systemd/system/bangerd.service.d/smoke-tcg.conf"
    cx systemctl daemon-reload
    must "restart bangerd (readiness wait ${GUEST_READY_TIMEOUT_S}s)" cx systemctl restart bangerd
    must "kernel import k" cu banger kernel import k "$GUEST_KERNEL_CT/vmlinux"
    guest_relay
    local t0 ms
    t0=$(now_ms)
    must "image build dev" image_build dev --kernel k
    ms=$(($(now_ms) - t0))
    expect_match "$OUT" '(^|'"$NL"')built image dev: ' "image build summary"
    note "image build dev in $(secs "$ms"): $(grep '^built image dev: ' <<<"$OUT")"
    must "image list" cu banger image list
    grep -qE '^dev[[:space:]]' <<<"$OUT" || fail "image list does not show dev"
}

# Creates VM $1 (more args: vm create options) on image dev and notes how long the TCG boot to the
# agent's answer took; vm_net_get's VM_* are set.
guest_create() {
    local name=$1 t0 ms
    shift
    t0=$(now_ms)
    RC=0
    OUT=$(CMD_TIMEOUT=320 cu banger vm create --name "$name" --image dev --vcpu 2 --memory 1024 "$@" 2>&1) || RC=$?
    ms=$(($(now_ms) - t0))
    printf '$ banger vm create --name %s --image dev --vcpu 2 --memory 1024 %s  [%d ms]\n%s\n' "$name" "$*" "$ms" "$OUT"
    if ((RC != 0)); then
        echo "--- the guest's console:"
        cx sh -c 'cat /var/lib/banger/vms/*/console.log' 2>&1 || true
        fail "vm create $name (TCG boot until the agent answers): exited $RC after $(secs "$ms"): $(last_line "$OUT")"
    fi
    note "vm create $name (QEMU TCG boot -> agent ready): $(secs "$ms")"
    vm_net_get "$name"
    expect_eq "$VM_STATE" running "$name after create"
    [[ -n $VM_BOOT ]] || fail "$name: no boot_id recorded"
}

# The agent's answer to METHOD through the VM's vsock socket (the stand-in maps it to the guest).
agent_call() {
    must "agent $2 ($1)" cx python3 "$SMOKE_LIB/agent.py" "$VMS_DIR/$1/vsock.sock" "$2"
}

# The guest's hostname (from its agent's hello, $2) is its name: the agent sets it from banger.name=,
# which the daemon passes from the ssh work on; without it, say so instead of judging the image's.
expect_guest_hostname() {
    local cmdline
    cmdline=$(cu banger vm logs "$1" | grep -m1 'Kernel command line:' || true)
    if [[ $cmdline == *banger.name=* ]]; then
        expect_eq "$(jq -r .hostname <<<"$2")" "$1" "the guest's hostname"
    else
        note "SKIP: $1's hostname: this daemon passes no banger.name= (the agent sets the hostname from it); the guest says '$(jq -r .hostname <<<"$2")'"
    fi
}

guest_can_exec() { cu banger vm exec --help >/dev/null 2>&1; }

guest_teardown() {
    must "vm delete $*" cu banger vm delete "$@"
    expect_no_vms "after delete"
    local _
    for _ in $(seq 50); do
        [[ -z $(cx pgrep -x qemu-system-x86 || true) ]] && break
        sleep 0.1
    done
    expect_no_process qemu-system-x86
}

scenario_guest_boots() {
    guest_need_kernel
    guest_setup
    guest_create g1
    local id=$VM_ID boot=$VM_BOOT t0
    t0=$(now_ms)
    agent_call "$id" hello
    note "agent hello over vsock (stand-in -> guest TCP 52): $(($(now_ms) - t0)) ms"
    local hello=$OUT
    expect_eq "$(jq -r .protocol <<<"$hello")" 2 "hello protocol"
    expect_match "$(jq -r .instance_id <<<"$hello")" '^[0-9a-f]{32}$' "hello instance_id"
    expect_eq "$(jq -r .boot_id <<<"$hello")" "$boot" "hello boot_id (the one vm show recorded)"
    expect_match "$(jq -r .host_key <<<"$hello")" '^ssh-ed25519 AAAA[0-9A-Za-z+/]+=*$' "hello host_key"
    expect_guest_hostname g1 "$hello"
    # The guest's own kernel: its boot_id is the guest's, not a stand-in's made-up one.
    agent_call "$id" uname
    printf 'uname: %s\n' "$OUT"
    must "vm logs g1" cu banger vm logs g1
    local logs=$OUT
    expect_match "$logs" 'Linux version 6\.1\.' "vm logs: the built kernel's banner"
    expect_match "$logs" 'systemd 252' "vm logs: systemd starting"
    expect_match "$logs" 'Reached target' "vm logs: systemd reaching its targets"
    # The agent answers early in the boot; the rest of it follows on the console.
    local _ t1
    t1=$(now_ms)
    for _ in $(seq 60); do
        grep -qE 'Reached target.*[Mm]ulti-[Uu]ser|^[a-z0-9-]+ login: ' <<<"$logs" && break
        sleep 2
        logs=$(cu banger vm logs g1)
    done
    printf '$ banger vm logs g1 (last lines)\n%s\n' "$(tail -n 5 <<<"$logs")"
    expect_match "$logs" "Reached target.*[Mm]ulti-[Uu]ser|${NL}[a-z0-9-]+ login: " "vm logs: systemd reached multi-user (or the serial getty's login prompt)"
    note "multi-user / serial login prompt on the console $(secs $(($(now_ms) - t1))) after the agent's hello"
    guest_teardown g1
    expect_no_error_logs "in this scenario"
}

# The upstream host: a network namespace in the container with a veth to it, and a TCP server there
# that answers "upstream-ok" and logs each peer's address.
guest_upstream() {
    cx ip netns add "$GUEST_UPSTREAM_NS"
    cx ip link add sm-up0 type veth peer name sm-up1 netns "$GUEST_UPSTREAM_NS"
    cx ip addr add "$GUEST_UPLINK_IP/24" dev sm-up0
    cx ip link set sm-up0 up
    cx ip -n "$GUEST_UPSTREAM_NS" addr add "$GUEST_UPSTREAM_IP/24" dev sm-up1
    cx ip -n "$GUEST_UPSTREAM_NS" link set sm-up1 up
    cx ip -n "$GUEST_UPSTREAM_NS" link set lo up
    # shellcheck disable=SC2016 # python, not shell
    must "upstream server" cx systemd-run --quiet --unit=smoke-upstream ip netns exec "$GUEST_UPSTREAM_NS" \
        python3 -c 'import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 8080)); s.listen(8)
while True:
    c, a = s.accept()
    open("/run/smoke-upstream.peers", "a").write(a[0] + "\n")
    c.sendall(b"upstream-ok\n"); c.close()'
}

# In the guest: connect to the upstream host and print what it says (bash's /dev/tcp).
guest_reach_upstream() {
    cu banger vm exec "$1" -- timeout 8 bash -c "exec 3<>/dev/tcp/$GUEST_UPSTREAM_IP/8080 && head -n1 <&3"
}

scenario_guest_network() {
    guest_need_kernel
    guest_setup
    guest_create gn
    local id=$VM_ID ip=$VM_IP
    expect_vm_net_identity gn
    agent_call "$id" hello
    expect_guest_hostname gn "$OUT"
    # The guest answers on the address banger gave it (ip=): its sshd, from the container (sshd
    # starts a little after the agent: up to 120 s for it under TCG).
    must "TCP to $ip:22" cx python3 -c 'import socket, sys, time
end = time.time() + 120
while True:
    try:
        s = socket.create_connection((sys.argv[1], 22), 10); break
    except ConnectionRefusedError:
        if time.time() > end: raise
        time.sleep(1)
s.settimeout(10)
print(s.recv(64).decode(errors="replace").strip())' "$ip"
    expect_match "$OUT" '^SSH-2\.0-OpenSSH' "sshd's banner from $ip:22"
    if ! guest_can_exec; then
        note "SKIP: guest_network: the NAT half (guest -> upstream, with and without --nat) needs \`banger vm exec\` (not in this build)"
        echo "SKIP: guest_network: NAT half: no banger vm exec in this build" >&2
        guest_teardown gn
        return 0
    fi
    guest_upstream
    RC=0
    OUT=$(guest_reach_upstream gn 2>&1) || RC=$?
    printf '$ guest gn -> upstream (no --nat): exit %s\n%s\n' "$RC" "$OUT"
    if ((RC == 0)) || [[ $OUT == *upstream-ok* ]]; then
        fail "guest gn (no --nat) reached the upstream host: $OUT"
    fi
    expect_eq "$(cx cat /run/smoke-upstream.peers 2>/dev/null | wc -l)" 0 "connections the upstream saw from gn"
    must "vm delete gn" cu banger vm delete gn

    guest_create gnat --nat
    local nat_ip=$VM_IP
    must "guest gnat -> upstream (--nat)" guest_reach_upstream gnat
    expect_eq "$(last_line "$OUT")" upstream-ok "what the upstream said to gnat"
    # Masqueraded: the upstream saw the container's uplink address, never the guest's own.
    expect_eq "$(cx cat /run/smoke-upstream.peers)" "$GUEST_UPLINK_IP" "peer address the upstream saw (gnat is $nat_ip)"
    guest_teardown gnat
}

scenario_guest_agent_ports() {
    guest_need_kernel
    guest_setup
    guest_create gp
    local id=$VM_ID
    # sshd starts a little after the agent answers: up to 120 s for it under TCG.
    local _
    for _ in $(seq 60); do
        agent_call "$id" ports
        jq -e '.ports | any(.port == 22 and .process == "sshd")' <<<"$OUT" >/dev/null && break
        sleep 2
    done
    printf 'ports: %s\n' "$OUT"
    jq -e '.ports | any(.port == 22 and .process == "sshd")' <<<"$OUT" >/dev/null \
        || fail "agent ports lacks sshd on 22: $OUT"
    if guest_can_exec; then
        must "start a listener in the guest (sshd -p 2222)" cu banger vm exec gp -- /usr/sbin/sshd -p 2222
        for _ in $(seq 30); do
            agent_call "$id" ports
            jq -e '.ports | any(.port == 2222)' <<<"$OUT" >/dev/null && break
            sleep 0.2
        done
        jq -e '.ports | any(.port == 2222 and .process == "sshd")' <<<"$OUT" >/dev/null \
            || fail "agent ports lacks the listener started on 2222: $OUT"
        must "vm ports gp" cu banger vm ports gp
        [[ $OUT == *2222* ]] || fail "vm ports gp does not show 2222"
    else
        note "SKIP: guest_agent_ports: starting a listener in the guest needs \`banger vm exec\` (not in this build)"
        echo "SKIP: guest_agent_ports: listener half: no banger vm exec in this build" >&2
    fi
    guest_teardown gp
}

# What a refused build must leave as it found it: images, scratch, cached trees, image files.
build_state() {
    cu banger image list --json | jq -c '[(if type == "object" then .images else . end)[] | .name] | sort'
    cx sh -c 'ls -A /var/cache/banger/image-build 2>/dev/null; ls -d /var/cache/banger/debootstrap/*/ 2>/dev/null;
        ls -A /var/lib/banger/images 2>/dev/null' | sort
}

scenario_image_build_refusals() {
    install_banger
    must "kernel import tiny" cu banger kernel import tiny "$GUEST_DIR/tiny-guest.elf"
    must "image import taken" cu banger image import taken --rootfs "$GUEST_DIR/rootfs.img" --kernel tiny
    guest_relay
    local before
    before=$(build_state)
    printf 'state before: %s\n' "$before"

    must_fail "image build as $TEST_USER" cu banger image build nope --kernel tiny
    expect_clear_error "$OUT" "image build as $TEST_USER"
    expect_match "$OUT" 'root' "image build as $TEST_USER says it needs root"
    expect_eq "$(build_state)" "$before" "state after the not-root refusal"

    must_fail "image build taken" image_build taken --kernel tiny
    expect_clear_error "$OUT" "image build taken"
    expect_match "$OUT" 'taken.*exists|exists.*taken' "image build taken says the name exists"
    expect_eq "$(build_state)" "$before" "state after the name-taken refusal"

    # A mirror where nothing listens (loopback): debootstrap itself fails.
    must_fail "image build with a dead mirror" cx banger image build dead --kernel tiny --mirror http://127.0.0.1:9/debian
    expect_clear_error "$OUT" "image build with a dead mirror"
    local logpath
    logpath=$(grep -oE '/var/cache/banger/debootstrap/[0-9a-f]{16}\.log' <<<"$OUT" | head -n1)
    [[ -n $logpath ]] || fail "the debootstrap failure does not name its log: $(last_line "$OUT")"
    cx test -s "$logpath" || fail "the log it names, $logpath, is missing or empty"
    expect_eq "$(build_state)" "$before" "state after the debootstrap failure (its log aside)"

    if [[ -n $GUEST_NO_PROXY ]] && ! cx sh -c 'ls /var/cache/banger/debootstrap/*/ready' >/dev/null 2>&1; then
        note "SKIP: image_build_refusals: --size too small needs a debootstrap tree: $GUEST_NO_PROXY and none cached"
    else
        must_fail "image build --size 64M" image_build small --kernel tiny --size 64M
        expect_clear_error "$OUT" "image build --size 64M"
        expect_match "$OUT" '64' "the --size refusal names the size asked"
        expect_match "$OUT" 'needs .*[0-9.]+ ?[KMG]' "the --size refusal says how much it needs"
        # The debootstrap tree it made (on a cold cache) is the cache's, kept on purpose.
        local after
        after=$(build_state | grep -v '^/var/cache/banger/debootstrap/')
        expect_eq "$after" "$(grep -v '^/var/cache/banger/debootstrap/' <<<"$before")" "state after the --size refusal"
    fi
    must "image list" cu banger image list
    expect_no_error_logs "in this scenario"
}
