# shellcheck shell=bash
# System scenarios (DESIGN.md §7): install, daemon administration, restart, reinstall, uninstall;
# and the daemon restart benchmark.
# shellcheck source=scripts/smoke/lib.sh
[[ -n ${SMOKE_LIB_LOADED:-} ]] || source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

SCENARIOS+=(
    "system_install|install as $TEST_USER: units active with the §7 directives, links, install.toml, sockets, doctor"
    "daemon_admin|daemon socket, --check-migrations --system, sudo daemon stop then status fails clearly, system restart"
    "restart_is_ready|after systemctl restart bangerd the first daemon status answers (Type=notify)"
    "reinstall_idempotent|second install keeps units, links, owner and installed_at; a hand-edited unit is put back"
    "uninstall_purge|uninstall removes units, links, binary; --purge removes state; a second uninstall is a no-op"
    "restart_refuses_nobody|a tight ping loop through systemctl restart (daemon, helper), system restart and a full update: 0 refused, worst latency noted"
    "unit_security|systemd-analyze security of both units: exposure scores noted; the hardening systemd parsed is in effect"
)

scenario_system_install() {
    install_banger
    # install returns only once the daemon answers: no wait, no retry here.
    must "daemon status right after install" cu banger daemon status
    expect_active bangerd bangerd-root bangerd.socket bangerd-root.socket
    expect_eq "$(cx systemctl is-enabled bangerd.socket bangerd-root.socket | tr '\n' ' ')" "enabled enabled " "socket units enabled"
    # The daemons took their sockets from systemd (socket activation), not bound their own.
    expect_match "$(cx journalctl -u bangerd -o cat --no-pager | grep '"msg":"serving"' | tail -n1)" '"listener":"systemd"' "bangerd's socket came from systemd"
    expect_match "$(cx journalctl -u bangerd-root -o cat --no-pager | grep '"msg":"serving"' | tail -n1)" '"listener":"systemd"' "bangerd-root's socket came from systemd"

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
    expect_stat /run/banger 700 "$TEST_USER" "" "daemon runtime dir"
    local sockunit
    for sockunit in /etc/systemd/system/bangerd.socket /etc/systemd/system/bangerd-root.socket; do
        expect_unit_lines "$sockunit" "SocketUser=$TEST_USER" SocketMode=0600
    done
    expect_unit_lines "$unit" Requires=bangerd.socket
    expect_unit_lines "$root_unit" Requires=bangerd-root.socket
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
    [[ -n $OUT && $OUT != *$'\n'* ]] || fail "--check-migrations prints one line, not '$OUT'"

    must_fail "daemon stop without root" cu banger daemon stop
    expect_eq "$RC" 1 "daemon stop without root exit code"
    expect_match "$OUT" 'root|sudo' "daemon stop without root explains why"
    expect_active bangerd

    must "sudo daemon stop" cx sudo banger daemon stop
    expect_inactive bangerd bangerd.socket
    must_fail "daemon status with the daemon stopped" cu banger daemon status
    expect_eq "$RC" 1 "daemon status (stopped) exit code"
    expect_clear_error "$OUT" "daemon status (stopped)"

    must "system restart" cx banger system restart
    expect_active bangerd bangerd-root bangerd.socket bangerd-root.socket
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
        /etc/systemd/system/bangerd.socket /etc/systemd/system/bangerd-root.socket /usr/local/bin/banger /usr/local/bin/bangerd /usr/local/bin/bangerd-root \
        /usr/local/lib/banger/banger; do
        expect_absent "$f" "after uninstall"
    done
    expect_inactive bangerd bangerd-root bangerd.socket bangerd-root.socket
    expect_eq "$(cx systemctl show -P LoadState bangerd)" not-found "bangerd LoadState after uninstall"
    expect_eq "$(cx systemctl show -P LoadState bangerd.socket)" not-found "bangerd.socket LoadState after uninstall"
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

# One command under a tight ping loop (restart_gap.py) on SOCKET with METHOD: it succeeds, and no
# ping fails (none refused, none reset or timed out); the worst ping latency is noted.
expect_no_refusals() {
    local what=$1 sock=$2 method=$3 r
    shift 3
    must "$what under a ping loop" cx python3 "$SMOKE_LIB/restart_gap.py" --method "$method" "$sock" -- "$@"
    r=$OUT
    expect_eq "$(jq -r .rc <<<"$r")" 0 "$what: exit code ($(jq -r .output <<<"$r"))"
    expect_eq "$(jq -r .refused <<<"$r")" 0 "$what: refused pings"
    expect_eq "$(jq -r .failed <<<"$r")" 0 "$what: failed pings ($(jq -c '{reset, timed_out, not_ok}' <<<"$r"))"
    note "$what: $(jq -r '"\(.pings) pings, 0 refused, worst \(.worst_ms) ms (goal <= 150 ms), took \(.restart_ms) ms"' <<<"$r")"
    GAP_OUT=$r
}

scenario_restart_refuses_nobody() {
    update_setup
    expect_active bangerd.socket bangerd-root.socket
    local pid_before
    pid_before=$(cx systemctl show -P MainPID bangerd)
    expect_no_refusals "systemctl restart bangerd" "$DAEMON_SOCK" ping systemctl restart bangerd
    [[ $(cx systemctl show -P MainPID bangerd) != "$pid_before" ]] || fail "bangerd was not restarted"
    expect_no_refusals "systemctl restart bangerd-root" "$HELPER_SOCK" priv.ping systemctl restart bangerd-root
    expect_no_refusals "banger system restart" "$DAEMON_SOCK" ping banger system restart
    expect_no_refusals "banger update" "$DAEMON_SOCK" ping banger update "${UPD[@]}"
    expect_eq "$(jq -r .output <<<"$GAP_OUT")" "updated v0.1.0 -> v0.smoke.0" "update outcome"
    expect_version 0.smoke.0 "after the update"
    expect_active bangerd bangerd-root bangerd.socket bangerd-root.socket
    expect_doctor_clean
    # Latencies here are mostly systemd setting up the daemon's sandbox (mount namespace), and
    # grow with the machine's load: say what it was.
    note "load average during the restarts: $(cut -d' ' -f1-3 /proc/loadavg)"
}

scenario_unit_security() {
    install_banger
    local unit score
    for unit in bangerd-root bangerd; do
        must "systemd-analyze security $unit" cx systemd-analyze security --no-pager "$unit.service"
        score=$(sed -n 's/.*Overall exposure level for [^:]*: *\([0-9.]*\).*/\1/p' <<<"$OUT")
        [[ -n $score ]] || fail "systemd-analyze security $unit printed no overall exposure level"
        note "$unit.service exposure $score ($(sed -n 's/.*Overall exposure level for [^:]*: *[0-9.]* *//p' <<<"$OUT"))"
    done
    # What systemd parsed: the helper's capabilities are exactly what it uses.
    expect_eq "$(cx systemctl show -P CapabilityBoundingSet bangerd-root | tr ' ' '\n' | sort | tr '\n' ' ')" \
        "cap_chown cap_dac_override cap_fowner cap_kill cap_net_admin cap_setgid cap_setuid " "bangerd-root CapabilityBoundingSet (systemctl show)"
    [[ -n $(cx systemctl show -P SystemCallFilter bangerd) ]] || fail "bangerd has no SystemCallFilter in effect"
    expect_match "$(cx systemctl show -P DeviceAllow bangerd-root)" '/dev/net/tun rw' "bangerd-root DeviceAllow (systemctl show)"
    # ProtectClock= closes the device policy: without the DeviceAllow= line the helper could not
    # open the tun device (where this systemd enforces device policies; say which).
    must "tun device under ProtectClock= with DeviceAllow=" cx systemd-run --quiet --wait --pipe \
        -p ProtectClock=yes -p "DeviceAllow=/dev/net/tun rw" sh -c 'exec 3<>/dev/net/tun'
    if cx systemd-run --quiet --wait --pipe -p ProtectClock=yes sh -c 'exec 3<>/dev/net/tun' >/dev/null 2>&1; then
        note "this container's systemd does not enforce device policies: DeviceAllow=/dev/net/tun is unproven here"
    else
        note "device policy enforced here: ProtectClock= alone denies /dev/net/tun, DeviceAllow= lets the helper open it"
    fi
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
