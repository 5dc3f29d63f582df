# shellcheck shell=bash
# Real-guest scenarios (DESIGN.md §12, §13, issue 9): the kernel built by packaging/kernel/build.sh,
# an image made in the container by the real `banger image build`, booted by the stand-in VMM's TCG
# engine (QEMU TCG, the guest's agent on TCP 52 through the tap), with real systemd, sshd and agent
# inside. Slow (tens of seconds of TCG boot each): few scenarios, each lean. Getting in (issue 10):
# `guest_ssh` and `update_guest_keeps_vm_alive` each run several checks on one guest; every check is
# also a scenario of its own, not in the full run (`--scenario vm_exec_io`; see the list at
# GUEST_SSH_SCENARIOS), and `guest_ssh_bench` prints the SSH numbers (scripts/bench.sh runs it).
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
    "guest_ssh|on one built image: vm_run_command, then one TCG guest for vm_exec_io, vm_ports, ssh_config_install, vm_ssh_pinned (each also alone: --scenario NAME)"
    "update_guest_keeps_vm_alive|one TCG guest through a rolled-back and a real update: the same boot answers SSH after each (alone: --scenario update_rollback_keeps_vm_alive_guest / update_keeps_vm_alive_guest)"
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

# The SSH scenarios (issue 10) below are also guest scenarios: the kernel, the image cache, the proxy.
GUEST_SSH_SCENARIOS=" vm_run_command vm_exec_io vm_ports ssh_config_install vm_ssh_pinned guest_ssh_bench \
    update_guest_keeps_vm_alive update_keeps_vm_alive_guest update_rollback_keeps_vm_alive_guest "
is_guest_scenario() {
    [[ $1 == guest_* || $1 == image_build_* || $1 == snapshot_clone_network || $GUEST_SSH_SCENARIOS == *" $1 "* ]]
}

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

# --- getting into the guest (issue 10): vm run / exec / ssh / ports, ssh-config, pinned keys -------
# TCG boots are slow, so `guest_ssh` runs every check below on one built image and one guest (the
# pin check last: it breaks the pin on purpose, then restores it); each check is also a scenario of
# its own (`--scenario vm_exec_io`), with its own image build and boot.

KNOWN_HOSTS=/var/lib/banger/ssh/known_hosts

# The image and, unless $1 is "image-only", a running guest $GS (VM_* set) whose sshd answers.
guest_ssh_setup() {
    guest_need_kernel
    guest_setup
    [[ ${1:-} == image-only ]] && return 0
    GS=gs
    guest_create "$GS" "${@}"
    guest_ssh_ready "$GS"
}

# Waits (bounded) until `vm exec` reaches $1's sshd, and checks it is the guest the agent described:
# the boot_id over SSH is the one `vm show` recorded from the agent's hello.
guest_ssh_ready() {
    local name=$1 t0 _
    vm_net_get "$name"
    t0=$(now_ms)
    # vm exec itself waits 30 s for a refusing sshd; sshd comes up a little after the agent.
    for _ in 1 2 3 4; do
        RC=0
        OUT=$(CMD_TIMEOUT=60 cu banger vm exec "$name" -- cat /proc/sys/kernel/random/boot_id 2>&1) || RC=$?
        ((RC != 0)) || break
        printf 'vm exec %s (sshd not up yet?): exit %s: %s\n' "$name" "$RC" "$OUT"
        sleep 2
    done
    ((RC == 0)) || fail "vm exec $name -- cat boot_id: exited $RC: $(last_line "$OUT")"
    note "first SSH to $name (sshd answering) $(secs $(($(now_ms) - t0))) after vm create returned"
    expect_eq "$OUT" "$VM_BOOT" "$name: boot_id over SSH vs the one vm show recorded"
}

# Everything `vm show`/`vm list` say about the VMs and what lies under the VM dirs, the pins and
# banger's ssh config: a refusal must leave all of it as it was.
guest_vm_state() {
    cu banger vm list --json | jq -c '[.[] | {name, state, pid, start_time, boot_id, ip}]'
    cx sh -c "ls -A $VMS_DIR; sha256sum $KNOWN_HOSTS /var/lib/banger/ssh/config; ip -br link | grep -o '^bgr-[^ ]*' || true" | sort
}

# How many pins banger's known_hosts holds.
pins_count() { cx sh -c "cat $KNOWN_HOSTS 2>/dev/null || true" | grep -c . || true; }

# vm_run_command: `vm run --rm -- sh -c 'exit 7'` exits 7, deletes its VM (row, dir, tap, VMM,
# scope, pin, ssh config block) and says so.
check_vm_run_command() {
    local t0 ms
    expect_eq "$(bgr_links)" "" "taps before vm run"
    t0=$(now_ms)
    RC=0
    OUT=$(CMD_TIMEOUT=400 cu banger vm run --rm --vcpu 2 --memory 1024 -- sh -c 'exit 7' 2>&1) || RC=$?
    ms=$(($(now_ms) - t0))
    printf "\$ banger vm run --rm --vcpu 2 --memory 1024 -- sh -c 'exit 7'  [%d ms, exit %d]\n%s\n" "$ms" "$RC" "$OUT"
    expect_eq "$RC" 7 "vm run --rm -- sh -c 'exit 7': exit status"
    [[ $OUT != *panicked* ]] || fail "vm run panicked: $OUT"
    expect_match "$OUT" '(^|'"$NL"')banger: deleted VM vm-[0-9a-f]+$' "vm run --rm says it deleted the VM"
    note "vm run --rm -- sh -c 'exit 7' (create + TCG boot + first SSH + delete): $(secs "$ms")"
    expect_no_vms "after vm run --rm"
    local _
    for _ in $(seq 50); do
        [[ -z $(cx pgrep -x qemu-system-x86 || true) ]] && break
        sleep 0.1
    done
    expect_no_process qemu-system-x86
    expect_eq "$(bgr_links)" "" "taps after vm run --rm"
    expect_eq "$(pins_count)" 0 "pins left in $KNOWN_HOSTS after vm run --rm"
    cx grep -q '^Host ' /var/lib/banger/ssh/config && fail "a Host block is left in banger's ssh config after vm run --rm"
    return 0
}

# vm_exec_io: stdin reaches the remote command, stdout and stderr come back apart (and exactly),
# the remote status is banger's, the words reach the guest as given.
check_vm_exec_io() {
    local name=$1 err=$RUN_DIR/exec.err out sum
    RC=0
    out=$(printf 'hello\nworld\n' | cu banger vm exec "$name" -- sh -c 'tr a-z A-Z; echo oops >&2; exit 3' 2>"$err") || RC=$?
    printf '$ printf hello\\nworld | vm exec %s -- sh -c ...: exit %s\nstdout: %q\nstderr: %q\n' "$name" "$RC" "$out" "$(cat "$err")"
    expect_eq "$RC" 3 "vm exec: the remote exit status"
    expect_eq "$out" "HELLO${NL}WORLD" "vm exec: stdout (stdin piped through tr)"
    expect_eq "$(cat "$err")" oops "vm exec: stderr, apart from stdout"
    # 256 KiB of random bytes through the guest and back: the same digest.
    head -c 262144 /dev/urandom >"$RUN_DIR/exec.in"
    sum=$(sha256sum <"$RUN_DIR/exec.in" | cut -d' ' -f1)
    RC=0
    out=$(cu banger vm exec "$name" -- sha256sum <"$RUN_DIR/exec.in" 2>"$err") || RC=$?
    expect_eq "$RC" 0 "vm exec -- sha256sum: exit status ($(cat "$err"))"
    expect_eq "${out%% *}" "$sum" "sha256 of 256 KiB piped through vm exec"
    # The words as given: spaces, quotes, $ and an empty word are not the guest shell's to split.
    # shellcheck disable=SC2016 # a literal $HOME, on purpose
    must "vm exec with tricky words" cu banger vm exec "$name" -- printf '[%s]' 'a b' '$HOME' "it's" '' '*'
    expect_eq "$OUT" "[a b][\$HOME][it's][][*]" "vm exec: words reach the guest as given"
    # Not running, unknown: refused before ssh runs, clear errors.
    must_fail "vm exec on an unknown VM" cu banger vm exec nosuch -- true
    expect_clear_error "$OUT" "vm exec on an unknown VM"
    must_fail "vm exec without a command" cu banger vm exec "$name"
    expect_eq "$RC" 2 "vm exec without a command: usage exit status"
    expect_clear_error "$OUT" "vm exec without a command"
}

# vm_ports: a listener started in the guest through vm exec (perl is in every Debian image;
# systemd-run keeps it after the SSH session ends) shows as NAME.vm:PORT, in --json too, and
# answers from this host at the VM's address.
check_vm_ports() {
    local name=$1 _ ip
    ip=$(cu banger vm show "$name" --json | jq -r .vm.ip)
    # shellcheck disable=SC2016 # perl's own $s and $c
    must "start a listener in the guest (perl on 8080)" cu banger vm exec "$name" -- systemd-run --quiet \
        --unit=smoke-listen perl -MIO::Socket::INET -e 'my $s = IO::Socket::INET->new(LocalPort => 8080,
        Listen => 5, ReuseAddr => 1) or die "listen: $!"; while (my $c = $s->accept) { print $c "hi from perl\n"; close $c }'
    for _ in $(seq 50); do
        OUT=$(cu banger vm ports "$name" --json)
        jq -e '.ports | any(.port == 8080)' <<<"$OUT" >/dev/null && break
        sleep 0.2
    done
    printf 'vm ports %s --json: %s\n' "$name" "$OUT"
    jq -e --arg e "$name.vm:8080" --arg n "$name" --arg ip "$ip" \
        '.ports | any(.endpoint == $e and .vm == $n and .port == 8080 and .process == "perl" and .ip == $ip)' \
        <<<"$OUT" >/dev/null || fail "vm ports $name --json lacks $name.vm:8080 (perl, $ip): $OUT"
    jq -e --arg e "$name.vm:22" '.ports | any(.endpoint == $e and .process == "sshd")' <<<"$OUT" >/dev/null \
        || fail "vm ports $name --json lacks $name.vm:22 (sshd): $OUT"
    must "vm ports $name" cu banger vm ports "$name"
    expect_match "$OUT" "(^|$NL)$name\\.vm:8080 +[^ ]+ +perl($NL|$)" "vm ports $name: the perl listener's row"
    expect_match "$OUT" "(^|$NL)$name\\.vm:22 +[^ ]+ +sshd($NL|$)" "vm ports $name: sshd's row"
    must "TCP to $ip:8080 from the host" cx python3 -c 'import socket, sys
print(socket.create_connection((sys.argv[1], 8080), 10).makefile().readline().strip())' "$ip"
    expect_eq "$OUT" "hi from perl" "what the guest's listener said"
    must_fail "vm ports nosuch" cu banger vm ports nosuch
    expect_clear_error "$OUT" "vm ports nosuch"
}

# ssh_config_install: `ssh-config` alone shows and changes nothing; --install (twice) puts the
# fence at the top of the owner's ~/.ssh/config, above the owner's own lines; plain `ssh NAME.vm`
# then reaches the guest; --uninstall leaves the file byte for byte as it was. The owner's own
# known_hosts is never written.
check_ssh_config_install() {
    local name=$1 cfg=/home/$TEST_USER/.ssh/config orig installed
    cu sh -c 'mkdir -p ~/.ssh && chmod 700 ~/.ssh && printf "# my own settings\nHost other\n    User me\n" >~/.ssh/config && chmod 600 ~/.ssh/config'
    orig=$(cx sha256sum "$cfg")
    must "ssh-config (show)" cu banger ssh-config
    expect_match "$OUT" 'Include /var/lib/banger/ssh/config' "ssh-config shows the Include"
    expect_eq "$(cx sha256sum "$cfg")" "$orig" "$cfg after ssh-config without --install"
    must "ssh-config --install" cu banger ssh-config --install
    printf '%s:\n%s\n' "$cfg" "$(cx cat "$cfg")"
    expect_eq "$(cx head -n1 "$cfg")" "# >>> banger ssh-config (added by \`banger ssh-config --install\`; \`--uninstall\` removes it) >>>" \
        "first line of $cfg"
    cx grep -qx 'Include /var/lib/banger/ssh/config' "$cfg" || fail "$cfg has no Include line for banger's config"
    cx grep -qx 'Host other' "$cfg" || fail "$cfg lost the owner's own lines"
    expect_stat "$cfg" "600" "$TEST_USER" "" "the owner's ssh config"
    installed=$(cx sha256sum "$cfg")
    must "ssh-config --install again" cu banger ssh-config --install
    expect_eq "$(cx sha256sum "$cfg")" "$installed" "$cfg after a second --install (idempotent)"
    # Plain ssh, the owner's own client and config: the boot_id proves it is this guest.
    must "plain ssh $name.vm" cu ssh -o BatchMode=yes "$name.vm" cat /proc/sys/kernel/random/boot_id </dev/null
    expect_eq "$OUT" "$VM_BOOT" "boot_id over plain ssh $name.vm"
    expect_absent "/home/$TEST_USER/.ssh/known_hosts" "(plain ssh must use banger's known_hosts only)"
    must "ssh-config --uninstall" cu banger ssh-config --uninstall
    expect_eq "$(cx sha256sum "$cfg")" "$orig" "$cfg after --uninstall (exactly the fence removed)"
    must_fail "plain ssh $name.vm after --uninstall" cu ssh -o BatchMode=yes -o ConnectTimeout=5 "$name.vm" true </dev/null
}

# vm_ssh_pinned: SSH works with the pin; with another key in its place ssh refuses with its MITM
# warning (exit 255, banger's note), banger re-pins nothing and nothing else changes; the pin put
# back, SSH works again.
check_vm_ssh_pinned() {
    local name=$1 ip orig line blob other before
    ip=$(cu banger vm show "$name" --json | jq -r .vm.ip)
    must "vm ssh $name -- cat boot_id" cu banger vm ssh "$name" -- cat /proc/sys/kernel/random/boot_id
    expect_eq "$OUT" "$VM_BOOT" "boot_id over vm ssh"
    orig=$(cx cat "$KNOWN_HOSTS")
    line=$(grep -E "^$name\\.vm,$ip ssh-ed25519 " <<<"$orig") || fail "no pin for $name.vm,$ip in $KNOWN_HOSTS: $orig"
    blob=$(awk '{print $3}' <<<"$line")
    cx rm -f /tmp/smoke-other /tmp/smoke-other.pub
    must "ssh-keygen (another host key)" cx ssh-keygen -q -t ed25519 -N '' -C other -f /tmp/smoke-other
    other=$(cx cut -d' ' -f2 /tmp/smoke-other.pub)
    [[ $other != "$blob" ]] || fail "ssh-keygen made the pinned key"
    # In place (the file keeps its owner and mode): the pinned blob replaced by the other key's.
    cx python3 -c 'import sys
p, old, new = sys.argv[1:]
t = open(p).read()
assert t.count(old) == 1
open(p, "r+").write(t.replace(old, new))' "$KNOWN_HOSTS" "$blob" "$other"
    before=$(guest_vm_state)
    local how
    for how in exec ssh; do
        must_fail "vm $how $name with a swapped pin" cu banger vm "$how" "$name" -- true
        expect_eq "$RC" 255 "vm $how with a swapped pin: exit status (ssh's own failure)"
        expect_match "$OUT" 'REMOTE HOST IDENTIFICATION HAS CHANGED' "vm $how with a swapped pin: ssh's warning"
        expect_match "$OUT" 'man-in-the-middle' "vm $how with a swapped pin: says what it may mean"
        expect_match "$OUT" "(^|$NL)banger: ssh to $name exited 255: " "vm $how with a swapped pin: banger's note"
        [[ $OUT != *panicked* ]] || fail "vm $how panicked"
    done
    expect_eq "$(guest_vm_state)" "$before" "VMs, pins and ssh config after the refusals"
    expect_eq "$(cx grep -c "$other" "$KNOWN_HOSTS")" 1 "the swapped pin is still there (nothing re-pinned it)"
    cx python3 -c 'import sys
p, old, new = sys.argv[1:]
t = open(p).read()
open(p, "r+").write(t.replace(old, new))' "$KNOWN_HOSTS" "$other" "$blob"
    expect_eq "$(cx cat "$KNOWN_HOSTS")" "$orig" "$KNOWN_HOSTS restored"
    must "vm exec $name after the pin is restored" cu banger vm exec "$name" -- cat /proc/sys/kernel/random/boot_id
    expect_eq "$OUT" "$VM_BOOT" "boot_id after the pin is restored"
}

scenario_guest_ssh() {
    guest_ssh_setup image-only
    check_vm_run_command
    GS=gs
    guest_create "$GS"
    guest_ssh_ready "$GS"
    check_vm_exec_io "$GS"
    check_vm_ports "$GS"
    check_ssh_config_install "$GS"
    check_vm_ssh_pinned "$GS"
    guest_teardown "$GS"
    expect_eq "$(pins_count)" 0 "pins left after vm delete"
    expect_no_error_logs "in this scenario"
}

scenario_vm_run_command() {
    guest_ssh_setup image-only
    check_vm_run_command
}

scenario_vm_exec_io() {
    guest_ssh_setup
    check_vm_exec_io "$GS"
    guest_teardown "$GS"
}

scenario_vm_ports() {
    guest_ssh_setup
    check_vm_ports "$GS"
    guest_teardown "$GS"
}

scenario_ssh_config_install() {
    guest_ssh_setup
    check_ssh_config_install "$GS"
    guest_teardown "$GS"
}

scenario_vm_ssh_pinned() {
    guest_ssh_setup
    check_vm_ssh_pinned "$GS"
    guest_teardown "$GS"
}

# --- the update scenarios on a TCG guest (the seed's "the same VM answers SSH") ---------------------
# update.sh's flow (its helpers: update_setup, outcome_line, expect_update_error, expect_version,
# expect_untouched, expect_no_pending_update) with a real guest: after the update, `vm exec` reads
# the same boot_id the agent's hello gave before it, from the same VMM process.

guest_update_setup() {
    guest_need_kernel
    guest_setup
    # After guest_setup: update_setup's install (again) and fingerprint are what the update changes.
    update_setup
    GS=gu
    guest_create "$GS"
    guest_ssh_ready "$GS"
    GU_IDENT="$VM_PID $VM_START $VM_BOOT"
    agent_call "$VM_ID" hello
    expect_eq "$(jq -r .boot_id <<<"$OUT")" "$VM_BOOT" "$GS: hello boot_id before the update"
}

# The guest of guest_update_setup is the same one, on the same VMM, and answers SSH.
expect_same_guest() {
    local what=$1 pid start boot
    read -r pid start boot <<<"$GU_IDENT"
    expect_active bangerd bangerd-root
    expect_eq "$(proc_ident "$pid")" "$start firecracker" "$GS: the VMM (pid $pid) $what"
    vm_get "$GS"
    expect_eq "$VM_STATE $VM_PID $VM_START $VM_BOOT" "running $pid $start $boot" "$GS in vm show $what"
    agent_call "$VM_ID" hello
    expect_eq "$(jq -r .boot_id <<<"$OUT")" "$boot" "$GS: hello boot_id $what"
    must "vm exec $GS -- cat boot_id $what" cu banger vm exec "$GS" -- cat /proc/sys/kernel/random/boot_id
    expect_eq "$OUT" "$boot" "$GS: boot_id over SSH $what"
}

check_update_rollback_keeps_guest() {
    must_fail "update to v0.smoke.broken" cx banger update --to v0.smoke.broken "${UPD[@]}"
    expect_eq "$RC" 1 "failed update exit code"
    expect_update_error "update to v0.smoke.broken"
    expect_match "$OUT" '\(rolled back to previous install\)' "the failed update says it rolled back"
    expect_version 0.1.0 "after the rollback"
    expect_untouched "after the rollback"
    expect_same_guest "after the rolled-back update"
}

check_update_keeps_guest() {
    must "update to v0.smoke.0" cx banger update "${UPD[@]}"
    expect_eq "$(outcome_line)" "updated v0.1.0 -> v0.smoke.0" "update outcome"
    expect_version 0.smoke.0 "after the update"
    expect_no_pending_update "after the update"
    expect_same_guest "after the update"
}

scenario_update_guest_keeps_vm_alive() {
    guest_update_setup
    check_update_rollback_keeps_guest
    check_update_keeps_guest
    guest_teardown "$GS"
}

scenario_update_keeps_vm_alive_guest() {
    guest_update_setup
    check_update_keeps_guest
    guest_teardown "$GS"
}

scenario_update_rollback_keeps_vm_alive_guest() {
    guest_update_setup
    check_update_rollback_keeps_guest
    guest_teardown "$GS"
}

# --- numbers (issue 10's note): `--scenario guest_ssh_bench`, also run by scripts/bench.sh ---------
# Prints, never judges: `vm run --rm -- true` end to end and split into create / boot / first SSH /
# delete; `vm exec NAME -- true` against plain ssh with banger's options to the same guest (median
# of 20, interleaved in alternating order), with the parts of banger's overhead (CLI + vm.show RPC,
# the guest liveness check). Never probe port 22 here: each probe costs the guest an sshd start,
# which the next ssh would pay for.

scenario_guest_ssh_bench() {
    guest_ssh_setup image-only
    local t0 total create boot first del
    t0=$(now_ms)
    CMD_TIMEOUT=400 must "vm run --rm -- true" cu banger vm run --rm --vcpu 2 --memory 1024 -- true
    total=$(($(now_ms) - t0))
    t0=$(now_ms)
    must "vm create split --no-start" cu banger vm create --name split --no-start --vcpu 2 --memory 1024
    create=$(($(now_ms) - t0))
    t0=$(now_ms)
    CMD_TIMEOUT=320 must "vm start split" cu banger vm start split
    boot=$(($(now_ms) - t0))
    t0=$(now_ms)
    # shellcheck disable=SC2016 # the inner shell expands $(seq 60), in the container
    CMD_TIMEOUT=200 must "first SSH to split" cu sh -c 'for i in $(seq 60); do banger vm exec split -- true && exit 0; sleep 0.2; done; exit 1'
    first=$(($(now_ms) - t0))
    t0=$(now_ms)
    must "vm delete split" cu banger vm delete split
    del=$(($(now_ms) - t0))
    note "bench: vm run --rm -- true: ${total} ms end to end; split: create ${create} ms, boot (to the agent's hello and the pin) ${boot} ms, first SSH (sshd answering) ${first} ms, delete ${del} ms"

    guest_create gb
    guest_ssh_ready gb
    CMD_TIMEOUT=600 must "vm exec vs plain ssh (20 each)" cu python3 -c 'import socket, statistics, subprocess, sys, time
name, ip = sys.argv[1:3]
d = "/var/lib/banger/ssh"
# The options src/ssh/command.rs passes (SshCommand::argv), stdin not a terminal.
plain = ["ssh", "-F", "none", "-i", d + "/id_ed25519", "-o", "UserKnownHostsFile=" + d + "/known_hosts",
         "-o", "GlobalKnownHostsFile=none", "-o", "StrictHostKeyChecking=yes", "-o", "IdentitiesOnly=yes",
         "-o", "PreferredAuthentications=publickey", "-o", "HostKeyAlgorithms=ssh-ed25519", "-o", "LogLevel=ERROR",
         "-o", "ConnectTimeout=60", "-o", "ConnectionAttempts=30", "-T", "root@" + ip, "--", "true"]
runs = {"vm exec": ["banger", "vm", "exec", name, "--", "true"], "plain ssh": plain,
        "vm show (CLI + RPC)": ["banger", "vm", "show", name, "--json"]}
ms = {k: [] for k in runs}
live = "liveness check (TCP to closed port 1, refused by the guest kernel)"
ms[live] = []
for i in range(20):
    # Alternating order, so that neither of the two ssh runs always follows the other.
    for k in (list(runs) if i % 2 == 0 else list(runs)[::-1]):
        t = time.monotonic()
        subprocess.run(runs[k], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, check=True)
        ms[k].append((time.monotonic() - t) * 1000)
    t = time.monotonic()
    try:
        socket.create_connection((ip, 1), 5).close()
    except ConnectionRefusedError:
        pass
    ms[live].append((time.monotonic() - t) * 1000)
for k, v in ms.items():
    print("%s: median %.1f ms (min %.1f, max %.1f, n=%d)" % (k, statistics.median(v), min(v), max(v), len(v)))
print("banger overhead (median vm exec - median plain ssh): %.1f ms" % (statistics.median(ms["vm exec"]) - statistics.median(ms["plain ssh"])))' gb "$VM_IP"
    local line
    while IFS= read -r line; do note "bench: $line"; done <<<"$OUT"
    guest_teardown gb
}
