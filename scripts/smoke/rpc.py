#!/usr/bin/env python3
"""One banger RPC (DESIGN §4) over a Unix socket, for the smoke suite.

usage: rpc.py SOCKET METHOD [PARAMS_JSON]
Prints the response's result as JSON and exits 0 when ok; prints the error and exits 1 otherwise;
exits 3 when the socket cannot be reached at all.
"""
import json
import socket
import sys


def call(path, method, params=None, timeout=5.0):
    """Send one request, return the decoded response (raises OSError when unreachable)."""
    req = {"v": 1, "method": method, "params": params or {}, "op_id": "op-smoke"}
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(json.dumps(req).encode() + b"\n")
        s.shutdown(socket.SHUT_WR)
        buf = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
            if b"\n" in buf:
                break
    line = buf.split(b"\n", 1)[0]
    if not line:
        raise OSError("empty response")
    return json.loads(line)


def answer(name, target, ask):
    """Prints what `ask()` answered and returns the exit code (the smoke scripts' convention):
    0 with the result as JSON on stdout when ok; 1 with the error on stderr when the other side
    said no; 3 with `NAME: TARGET: why` when it could not be asked (socket, transport, JSON)."""
    try:
        resp = ask()
    except (OSError, ValueError) as e:
        print(f"{name}: {target}: {e}", file=sys.stderr)
        return 3
    if resp.get("ok"):
        print(json.dumps(resp.get("result")))
        return 0
    print(json.dumps(resp.get("error")), file=sys.stderr)
    return 1


def main():
    if len(sys.argv) not in (3, 4):
        print(__doc__, file=sys.stderr)
        return 2
    params = json.loads(sys.argv[3]) if len(sys.argv) == 4 else {}
    return answer("rpc", sys.argv[1], lambda: call(sys.argv[1], sys.argv[2], params))


if __name__ == "__main__":
    sys.exit(main())
