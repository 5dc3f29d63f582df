#!/usr/bin/env python3
"""The Debian mirror for `banger image build` inside a smoke container, which has no network of its
own (--private-network): an HTTP proxy in two halves joined by a Unix socket bound into it.

usage: mirror_proxy.py serve SOCKET MIRROR_URL   (on the host: the proxy itself)
       mirror_proxy.py relay PORT SOCKET         (in the container: 127.0.0.1:PORT -> SOCKET)

`serve` answers proxy requests (GET/HEAD, one per connection) for the mirror's host and port only,
forwarding each to that host; anything else gets 403. So the container reaches exactly the mirror
the host's own apt uses, through debootstrap's ordinary client (wget with http_proxy), and nothing
else. `relay` only moves bytes. Both run until killed.
"""
import socket
import sys
import threading
import urllib.parse

HEAD_LIMIT = 65536


def pipe(src, dst):
    try:
        while True:
            b = src.recv(65536)
            if not b:
                break
            dst.sendall(b)
    except OSError:
        pass
    finally:
        for s, how in ((dst, socket.SHUT_WR), (src, socket.SHUT_RD)):
            try:
                s.shutdown(how)
            except OSError:
                pass


def splice(a, b):
    t = threading.Thread(target=pipe, args=(b, a), daemon=True)
    t.start()
    pipe(a, b)
    t.join()
    a.close()
    b.close()


def read_head(c):
    buf = b""
    while b"\r\n\r\n" not in buf:
        b = c.recv(4096)
        if not b:
            raise OSError("closed before the end of the request head")
        buf += b
        if len(buf) > HEAD_LIMIT:
            raise OSError("request head too long")
    head, rest = buf.split(b"\r\n\r\n", 1)
    return head.decode("latin-1").split("\r\n"), rest


def refuse(c, why):
    body = (why + "\n").encode()
    c.sendall(b"HTTP/1.1 403 Forbidden\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    c.close()


def serve_one(c, allowed):
    try:
        lines, rest = read_head(c)
        method, target, version = lines[0].split(" ", 2)
        u = urllib.parse.urlsplit(target)
        port = u.port or 80
        if method not in ("GET", "HEAD") or u.scheme != "http" or (u.hostname, port) != allowed:
            return refuse(c, f"smoke mirror proxy: only GET/HEAD of http://{allowed[0]}:{allowed[1]}/")
        path = u.path or "/"
        if u.query:
            path += "?" + u.query
        keep = [h for h in lines[1:] if h.split(":", 1)[0].strip().lower()
                not in ("connection", "proxy-connection", "keep-alive")]
        head = [f"{method} {path} {version}"] + keep + ["Connection: close"]
        up = socket.create_connection(allowed, timeout=60)
        up.settimeout(None)
        up.sendall("\r\n".join(head).encode("latin-1") + b"\r\n\r\n" + rest)
        splice(c, up)
    except (OSError, ValueError) as e:
        print(f"mirror_proxy: {e}", file=sys.stderr)
        c.close()


def serve(path, mirror):
    u = urllib.parse.urlsplit(mirror)
    if u.scheme != "http" or not u.hostname:
        sys.exit(f"mirror_proxy: {mirror}: only an http:// mirror can be proxied")
    allowed = (u.hostname, u.port or 80)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.listen(64)
    while True:
        c, _ = s.accept()
        threading.Thread(target=serve_one, args=(c, allowed), daemon=True).start()


def relay_one(c, path):
    try:
        u = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        u.connect(path)
    except OSError as e:
        print(f"mirror_proxy relay: {path}: {e}", file=sys.stderr)
        c.close()
        return
    splice(c, u)


def relay(port, path):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port))
    s.listen(64)
    while True:
        c, _ = s.accept()
        threading.Thread(target=relay_one, args=(c, path), daemon=True).start()


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "serve":
        serve(sys.argv[2], sys.argv[3])
    elif len(sys.argv) == 4 and sys.argv[1] == "relay":
        relay(int(sys.argv[2]), sys.argv[3])
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
