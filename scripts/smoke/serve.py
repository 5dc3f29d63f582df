#!/usr/bin/env python3
"""A quiet static HTTP server on 127.0.0.1 for the update scenarios (releases, manifests).

usage: serve.py DIR PORTFILE
Binds 127.0.0.1 on a free port (the container shares the host's network, so a fixed port could
clash with another run), writes the port to PORTFILE (atomically) and serves DIR until killed.
Symlinks under DIR are followed.
"""
import functools
import http.server
import os
import sys


class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def main():
    root, portfile = sys.argv[1], sys.argv[2]
    handler = functools.partial(Quiet, directory=root)
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    tmp = portfile + ".tmp"
    with open(tmp, "w") as f:
        f.write("%d\n" % srv.server_address[1])
    os.replace(tmp, portfile)
    srv.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
