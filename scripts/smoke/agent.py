#!/usr/bin/env python3
"""One guest-agent call through a VM's Firecracker vsock Unix socket, for the smoke suite.

usage: agent.py VSOCK_UDS METHOD [PORT]
Does Firecracker's host-side handshake (`CONNECT <port>\\n` -> `OK <n>\\n`), sends
`{"method": METHOD}` and prints the result as JSON (exit 0); prints the error and exits 1 when the
agent says no; exits 3 when the socket, the handshake or the answer fails.
"""
import json
import os
import socket
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from rpc import answer  # noqa: E402

AGENT_PORT = 52  # banger::agent::AGENT_VSOCK_PORT


def read_line(s, limit=65536):
    buf = b""
    while not buf.endswith(b"\n"):
        b = s.recv(1)  # byte by byte: nothing past the line may be consumed
        if not b:
            raise OSError(f"connection closed after {buf!r}")
        buf += b
        if len(buf) > limit:
            raise OSError("line too long")
    return buf[:-1].decode()


def call(uds, method, port=AGENT_PORT, timeout=5.0):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(uds)
        s.sendall(f"CONNECT {port}\n".encode())
        ok = read_line(s)
        if not ok.startswith("OK "):
            raise OSError(f"handshake answered {ok!r}")
        s.sendall(json.dumps({"method": method}).encode() + b"\n")
        return json.loads(read_line(s))


def main():
    if len(sys.argv) not in (3, 4):
        print(__doc__, file=sys.stderr)
        return 2
    port = int(sys.argv[3]) if len(sys.argv) == 4 else AGENT_PORT
    return answer("agent", sys.argv[1], lambda: call(sys.argv[1], sys.argv[2], port))


if __name__ == "__main__":
    sys.exit(main())
