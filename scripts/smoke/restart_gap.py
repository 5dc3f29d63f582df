#!/usr/bin/env python3
"""Daemon unavailability during `systemctl restart UNIT`, seen by a tight loop of pings.

usage: restart_gap.py SOCKET UNIT
       restart_gap.py SOCKET -- CMD [ARGS...]
Pings SOCKET back to back, restarts UNIT (or runs CMD, e.g. `banger update`) once the loop is going, keeps pinging until the daemon has
answered for a while after the restart returned, and prints one JSON object:
  restart_ms       how long `systemctl restart` (or CMD) took
  rc, output       with CMD: its exit code and the last line of its output
  failed           pings that failed
  last_fail_to_ok_ms   last failed ping (its start) -> first answered ping after it (its end)
  outage_ms        last answered ping before the first failure -> first answered ping after the last
Exit 0; 1 when the daemon never answered again.
"""
import json
import os
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from rpc import call  # noqa: E402


def now_ms():
    return time.monotonic_ns() / 1e6


def main():
    sock, unit = sys.argv[1], sys.argv[2]
    cmd = sys.argv[3:] if unit == "--" else ["systemctl", "restart", unit]
    samples = []  # (start_ms, end_ms, ok)
    stop = threading.Event()

    def loop():
        while not stop.is_set():
            t0 = now_ms()
            try:
                ok = bool(call(sock, "ping", timeout=2.0).get("ok"))
            except (OSError, ValueError):
                ok = False
            samples.append((t0, now_ms(), ok))

    th = threading.Thread(target=loop, daemon=True)
    th.start()
    time.sleep(0.3)
    r0 = now_ms()
    done = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    r1 = now_ms()
    if unit != "--" and done.returncode != 0:
        raise subprocess.CalledProcessError(done.returncode, cmd, done.stdout)
    deadline = r1 + 10_000
    while now_ms() < deadline:
        time.sleep(0.2)
        tail = samples[-5:]
        if len(tail) == 5 and all(s[2] for s in tail) and tail[0][0] > r1:
            break
    stop.set()
    th.join(3)

    fails = [i for i, s in enumerate(samples) if not s[2]]
    out = {"restart_ms": round(r1 - r0, 1), "pings": len(samples), "failed": len(fails),
           "last_fail_to_ok_ms": 0.0, "outage_ms": 0.0}
    if unit == "--":
        tail = [line for line in done.stdout.splitlines() if line.strip()]
        out["rc"] = done.returncode
        out["output"] = tail[-1] if tail else ""
    if fails:
        first, last = fails[0], fails[-1]
        after = next((s for s in samples[last + 1:] if s[2]), None)
        if after is None:
            print(json.dumps(out))
            return 1
        before = next((s for s in reversed(samples[:first]) if s[2]), None)
        out["last_fail_to_ok_ms"] = round(after[1] - samples[last][0], 1)
        out["outage_ms"] = round(after[1] - (before[1] if before else samples[first][0]), 1)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
