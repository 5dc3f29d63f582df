#!/usr/bin/env python3
"""Runs a command and reports when each line of its stderr arrived.

usage: timed_lines.py CMD [ARGS...]
Prints one JSON object: total_ms (spawn -> exit), rc, stdout (text), lines ([[ms, line], ...],
ms since spawn). Exit 0 whatever the command's exit code.
"""
import json
import subprocess
import sys
import threading
import time


def main():
    t0 = time.monotonic_ns()
    ms = lambda: round((time.monotonic_ns() - t0) / 1e6, 1)  # noqa: E731
    p = subprocess.Popen(sys.argv[1:], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    lines = []
    out = []
    t = threading.Thread(target=lambda: out.append(p.stdout.read()), daemon=True)
    t.start()
    for line in p.stderr:
        lines.append([ms(), line.rstrip("\n")])
    rc = p.wait()
    total = ms()
    t.join(5)
    print(json.dumps({"total_ms": total, "rc": rc, "stdout": "".join(out), "lines": lines}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
