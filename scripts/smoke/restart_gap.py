#!/usr/bin/env python3
"""Daemon unavailability during `systemctl restart UNIT`, seen by a tight loop of pings.

usage: restart_gap.py [--method M] SOCKET UNIT
       restart_gap.py [--method M] SOCKET -- CMD [ARGS...]
Pings SOCKET back to back (method `ping`, or M, e.g. `priv.ping` for the helper), restarts UNIT (or
runs CMD, e.g. `banger update`) once the loop is going, keeps pinging until the daemon has
answered for a while after the restart returned, and prints one JSON object:
  restart_ms       how long `systemctl restart` (or CMD) took
  rc, output       with CMD: its exit code and the last line of its output
  pings            pings sent
  failed           pings that failed, for any reason; by reason:
  refused          the connection was refused or the socket was missing (nobody listening)
  reset            connected, but the connection closed without an answer
  timed_out        no answer within the ping timeout (10 s)
  not_ok           answered with an error
  worst_ms         the slowest ping (answered or not) that started while CMD ran or after
  last_fail_to_ok_ms   last failed ping (its start) -> first answered ping after it (its end)
  outage_ms        last answered ping before the first failure -> first answered ping after the last
Exit 0; 1 when the daemon never answered again.
"""
import errno
import json
import os
import socket
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from rpc import call  # noqa: E402

PING_TIMEOUT = 10.0


def now_ms():
    return time.monotonic_ns() / 1e6


def classify(e):
    if isinstance(e, (ConnectionRefusedError, FileNotFoundError)):
        return "refused"
    if isinstance(e, OSError) and e.errno in (errno.ECONNREFUSED, errno.ENOENT):
        return "refused"
    if isinstance(e, (socket.timeout, TimeoutError)):
        return "timed_out"
    return "reset"


def main():
    args = sys.argv[1:]
    method = "ping"
    if len(args) >= 2 and args[0] == "--method":
        method, args = args[1], args[2:]
    sock, unit = args[0], args[1]
    cmd = args[2:] if unit == "--" else ["systemctl", "restart", unit]
    samples = []  # (start_ms, end_ms, outcome): outcome "ok" or a failure reason
    stop = threading.Event()

    def loop():
        while not stop.is_set():
            t0 = now_ms()
            try:
                outcome = "ok" if call(sock, method, timeout=PING_TIMEOUT).get("ok") else "not_ok"
            except (OSError, ValueError) as e:
                outcome = classify(e)
            samples.append((t0, now_ms(), outcome))

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
        if len(tail) == 5 and all(s[2] == "ok" for s in tail) and tail[0][0] > r1:
            break
    stop.set()
    th.join(PING_TIMEOUT + 1)

    fails = [i for i, s in enumerate(samples) if s[2] != "ok"]
    out = {"restart_ms": round(r1 - r0, 1), "pings": len(samples), "failed": len(fails),
           "refused": 0, "reset": 0, "timed_out": 0, "not_ok": 0,
           "worst_ms": round(max((s[1] - s[0] for s in samples if s[1] >= r0), default=0.0), 1),
           "last_fail_to_ok_ms": 0.0, "outage_ms": 0.0}
    for i in fails:
        out[samples[i][2]] += 1
    if unit == "--":
        tail = [line for line in done.stdout.splitlines() if line.strip()]
        out["rc"] = done.returncode
        out["output"] = tail[-1] if tail else ""
    if fails:
        first, last = fails[0], fails[-1]
        after = next((s for s in samples[last + 1:] if s[2] == "ok"), None)
        if after is None:
            print(json.dumps(out))
            return 1
        before = next((s for s in reversed(samples[:first]) if s[2] == "ok"), None)
        out["last_fail_to_ok_ms"] = round(after[1] - samples[last][0], 1)
        out["outage_ms"] = round(after[1] - (before[1] if before else samples[first][0]), 1)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
