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
# default: target/x86_64-unknown-linux-gnu/release/banger when it exists), SMOKE_KERNEL_DIR (the
# real-guest scenarios' kernel dir; default: packaging/kernel/build.sh --cached-only, else they
# SKIP), SMOKE_GUEST_CACHE (their debootstrap cache, default /var/tmp/banger-cache/smoke-image).
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

# The suite's parts: the test bed and the assertions (lib.sh), then one file of scenarios per area,
# each adding its lines to SCENARIOS in the order they run.
# shellcheck source=scripts/smoke/lib.sh
source "$REPO_ROOT/scripts/smoke/lib.sh"
# shellcheck source=scripts/smoke/system.sh
source "$REPO_ROOT/scripts/smoke/system.sh"
# shellcheck source=scripts/smoke/vm.sh
source "$REPO_ROOT/scripts/smoke/vm.sh"
# shellcheck source=scripts/smoke/update.sh
source "$REPO_ROOT/scripts/smoke/update.sh"
# shellcheck source=scripts/smoke/net.sh
source "$REPO_ROOT/scripts/smoke/net.sh"
# shellcheck source=scripts/smoke/guest.sh
source "$REPO_ROOT/scripts/smoke/guest.sh"
# shellcheck source=scripts/smoke/install.sh
source "$REPO_ROOT/scripts/smoke/install.sh"
# shellcheck source=scripts/smoke/snapshot.sh
source "$REPO_ROOT/scripts/smoke/snapshot.sh"
# shellcheck source=scripts/smoke/snapguest.sh
source "$REPO_ROOT/scripts/smoke/snapguest.sh"

# --- runner ----------------------------------------------------------------------------------------

list_scenarios() {
    local s
    for s in "${SCENARIOS[@]}"; do printf '%-30s %s\n' "${s%%|*}" "${s#*|}"; done
}

scenario_names() { local s; for s in "${SCENARIOS[@]}"; do echo "${s%%|*}"; done; }

PASSED=0
FAILED=0
SKIPPED=0
declare -A BENCH_SCENARIO_MS=()
BOOT_TIMES=()

scenario_body() { scenario_body_fn "scenario_$1"; }

run_scenario() {
    local name=$1 started rc=0 reason elapsed h
    started=$(now_ms)
    CT_EXTRA_BINDS=()
    for h in "${BEFORE_CONTAINER_HOOKS[@]}"; do "$h" "$name"; done
    if ! start_container; then
        FAILED=$((FAILED + 1))
        echo "FAIL $name: $BOOT_ERROR"
        { tail -n 20 "$RUN_DIR/$CT_NAME.console" 2>/dev/null || true; } | sed 's/^/  | /'
        KEEP_LOGS=yes
        stop_container
        for h in "${AFTER_CONTAINER_HOOKS[@]}"; do "$h" "$name"; done
        CT_EXTRA_BINDS=()
        return
    fi
    BOOT_TIMES+=("$BENCH_BOOT_MS")
    REASON_FILE=$RUN_DIR/$name.reason
    NOTES_FILE=$RUN_DIR/$name.notes
    : >"$REASON_FILE"
    : >"$NOTES_FILE"
    SKIP_FILE=$RUN_DIR/$name.skip
    : >"$SKIP_FILE"
    run_tracked scenario_body "$name" >"$RUN_DIR/$name.log" 2>&1 || rc=$?
    elapsed=$(($(now_ms) - started))
    BENCH_SCENARIO_MS[$name]=$elapsed
    if ((rc == 0)) && [[ -s $SKIP_FILE ]]; then
        SKIPPED=$((SKIPPED + 1))
        echo "SKIP: $name: $(head -n1 "$SKIP_FILE")" >&2
        sort -u "$NOTES_FILE" | sed 's/^/  note: /'
    elif ((rc == 0)); then
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
    for h in "${AFTER_CONTAINER_HOOKS[@]}"; do "$h" "$name"; done
    CT_EXTRA_BINDS=()
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
    local hook
    for hook in "${PREPARE_HOOKS[@]}"; do "$hook" "${names[@]}"; done
    if [[ $bench == yes || " ${names[*]} " == *" update_"* || " ${names[*]} " == *" net_survives_restarts "* || " ${names[*]} " == *" restart_refuses_nobody "* ]]; then
        prepare_releases "$bench"
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
    echo "smoke: $PASSED passed, $FAILED failed$( ((SKIPPED == 0)) || echo ", $SKIPPED skipped")"
    ((FAILED == 0))
}

main "$@"
