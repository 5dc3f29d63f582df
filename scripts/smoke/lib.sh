# shellcheck shell=bash
# shellcheck disable=SC2034 # constants and state shared with the driver and the scenario files
# The smoke suite's library (sourced by scripts/smoke.sh): constants, the test bed (host tools, the
# cached rootfs, the binary, VMM and guest under test, one container at a time, commands inside
# it), the scenario helpers (assertions, install helpers, doctor) and the benchmark plumbing. It
# holds no scenario; it never touches the host's own network (containers run --private-network).
SMOKE_LIB_LOADED=1
REPO_ROOT=${REPO_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
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
NL=$'\n'

# ===================================================================================================
# Scenarios: each area's file (system.sh, vm.sh, update.sh, net.sh) adds lines "name|what it checks"
# to SCENARIOS and a function scenario_<name>. Each runs in a subshell with `set -e`, inside a
# freshly booted container where nothing of banger is installed yet. Use `cx` (root) / `cu` (the
# test user) to run commands inside, `must`/`fail`/`expect_*` to assert.
# ===================================================================================================

SCENARIOS=()

# Hooks for scenario areas that need more than the common test bed (guest.sh: the built kernel, the
# image cache, the mirror proxy). PREPARE_HOOKS run once with the selected scenario names before
# any container; BEFORE_CONTAINER_HOOKS with the scenario name before its container boots (they may
# set CT_EXTRA_BINDS, nspawn bind options for that one container); AFTER_CONTAINER_HOOKS with the
# name once it is stopped; CLEANUP_HOOKS at exit.
PREPARE_HOOKS=()
BEFORE_CONTAINER_HOOKS=()
AFTER_CONTAINER_HOOKS=()
CLEANUP_HOOKS=()
CT_EXTRA_BINDS=()

# Ends the scenario as skipped, with the reason (the runner prints SKIP, never PASS).
skip() {
    printf '%s\n' "$*" >"$SKIP_FILE"
    exit 0
}

# doctor checks that cannot pass in this test bed, and why. They must never say PASS here; a FAIL
# of one of these is allowed (noted). Empty now: the VMM is installed in every container.
declare -A DOCTOR_CANNOT_PASS=()

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

ROOTFS_PACKAGES=(systemd systemd-sysv dbus iproute2 iptables nftables openssl python3 procps sudo)
# The real-guest scenarios (guest.sh): `image build` runs debootstrap and strip, the stand-in boots
# the guest with QEMU, and `vm exec`/`vm ssh` need an ssh client.
ROOTFS_PACKAGES+=(debootstrap binutils qemu-system-x86 openssh-client)

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
        --bind-ro="$VMM_HOST:$VMM_SRC" --bind-ro="$RUN_DIR/guest:$GUEST_DIR" "${CT_EXTRA_BINDS[@]}") dev root started
    [[ -c /dev/kvm ]] && binds+=(--bind=/dev/kvm)
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
        # --private-network: a network namespace of its own (only lo, up), so the bridges, taps and
        # nftables tables a scenario makes never reach the machine's network; nspawn keeps
        # CAP_NET_ADMIN in there for the helper.
        exec setsid systemd-nspawn --quiet --directory="$ROOTFS" --volatile=overlay --boot \
            --keep-unit --register=no --machine="$CT_NAME" --console=read-only --private-network "${binds[@]}" \
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
    # The network rule: nothing a scenario does may reach the machine's own network namespace.
    if [[ $(readlink "/proc/$LEADER/ns/net") == "$(readlink /proc/self/ns/net)" ]]; then
        BOOT_ERROR="container $CT_NAME shares the host's network namespace (--private-network ignored?)"
        return 1
    fi
    # /dev/net/tun as a stock Debian host has it: 0666 (udev's rule for the tun node; TUNSETIFF, not
    # the node, decides who may attach to a tap). nspawn copies the host's node with the host's
    # mode, 0600 on this machine, which would stop the owner's VMM from opening its tap; a fresh
    # node in the container's own /dev leaves the host's node alone.
    if ! cx sh -c "rm -f /dev/net/tun && mkdir -p /dev/net && mknod -m 0666 /dev/net/tun c 10 200"; then
        BOOT_ERROR="making /dev/net/tun 0666 in $CT_NAME failed"
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

# Ends the run (EXIT trap): back to the terminal, the container powered off, the run's logs removed
# unless a failure (KEEP_LOGS=yes) or SMOKE_KEEP_LOGS=1 keeps them.
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    # A signal can land while a redirected function runs (run_tracked > log): talk to the terminal.
    exec 1>&"$ORIG_STDOUT" 2>&"$ORIG_STDERR"
    stop_container
    local h
    for h in "${CLEANUP_HOOKS[@]}"; do "$h" || true; done
    if [[ -n ${RUN_DIR:-} && -d $RUN_DIR ]]; then
        if [[ ${KEEP_LOGS:-} == yes || ${SMOKE_KEEP_LOGS:-} == 1 ]]; then
            log "logs kept in $RUN_DIR"
        else
            rm -rf "$RUN_DIR"
        fi
    fi
    exit "$rc"
}

# --- benchmarks ------------------------------------------------------------------------------------

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

bench() { echo "bench: $*" | tee -a "$BENCH_OUT"; }

# "median X ms (min Y, max Z, n=N)" of the numbers on stdin.
med() {
    jq -rs 'sort as $v | ($v | length) as $n
        | (if $n % 2 == 1 then $v[($n - 1) / 2] else ($v[$n / 2 - 1] + $v[$n / 2]) / 2 end) as $m
        | "median \($m * 10 | round / 10) ms (min \($v[0] * 10 | round / 10), max \($v[-1] * 10 | round / 10), n=\($n))"'
}

# shellcheck disable=SC2016 # awk's own $2
rss_kb() { cx awk '/^VmRSS:/ { print $2 }' "/proc/$(cx systemctl show -P MainPID "$1")/status"; }

size_mib() { cx stat -c %s "$1" | jq -r '. / 1048576 * 10 | round / 10'; }
