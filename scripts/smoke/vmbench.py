#!/usr/bin/env python3
"""VM benchmarks for `scripts/smoke.sh --bench`, run inside the test container. Prints numbers
(JSON, one line), never judges them.

  vmbench.py raw VMM KERNEL ROOTFS WORKDIR PREFIX [--uid N --gid N] [--scope]
      The raw VMM start of the config `banger vm create` uses (1 vCPU, 512 MiB, the kernel, one
      root drive, a vsock device, InstanceStart) driven by hand over the API socket: wall time
      from spawn to the console line starting with PREFIX. --scope starts it the way the helper
      does, inside `systemd-run --scope --slice=banger.slice`.
  vmbench.py create NAME IMAGE         wall time of `banger vm create --name NAME --image IMAGE`
  vmbench.py list N                    median/min/max of N `banger vm list --json` (CLI process)
                                       and of N bare `vm.list` and `ping` RPCs, plus the row count
  vmbench.py seed DB N                 inserts N stopped VM rows into state.db (daemon stopped)
"""
import http.client
import json
import os
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import time
import uuid

DAEMON_SOCK = "/run/banger/bangerd.sock"
BOOT_ARGS = "console=ttyS0 reboot=k panic=1 pci=off"  # the daemon's BOOT_ARGS


def ms(t0):
    return round((time.monotonic() - t0) * 1000, 1)


class UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path):
        super().__init__("localhost", timeout=10)
        self.unix_path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(self.unix_path)


def put(conn, path, body):
    conn.request("PUT", path, json.dumps(body), {"Content-Type": "application/json"})
    r = conn.getresponse()
    data = r.read()
    if r.status // 100 != 2:
        raise RuntimeError(f"PUT {path}: {r.status} {data.decode(errors='replace')}")


def raw(args):
    vmm, kernel, rootfs, work, prefix = args[:5]
    rest = args[5:]
    uid = gid = None
    scope = "--scope" in rest
    if "--uid" in rest:
        uid = int(rest[rest.index("--uid") + 1])
    if "--gid" in rest:
        gid = int(rest[rest.index("--gid") + 1])
    os.makedirs(work, exist_ok=True)
    api, vsock, console = (os.path.join(work, n) for n in ("fc.sock", "vsock.sock", "console.log"))
    for p in (api, vsock):
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass
    vid = "raw-" + uuid.uuid4().hex[:8]
    cmd = [vmm, "--api-sock", api, "--id", vid]
    kw = {}
    if uid is not None:
        # The helper's groups for the VMM: the owner's and /dev/kvm's (Firecracker opens /dev/kvm).
        groups = [gid]
        try:
            kvm = os.stat("/dev/kvm").st_gid
            if kvm not in (0, gid):
                groups.append(kvm)
        except FileNotFoundError:
            pass
        kw = {"extra_groups": groups}
    if scope:
        # systemd-run keeps the supplementary groups it was started with (it never calls setgroups).
        cmd = ["systemd-run", "--scope", "--quiet", "--collect", "--slice=banger.slice",
               f"--unit=banger-bench-{vid}.scope"] + \
              ([f"--uid={uid}", f"--gid={gid}"] if uid is not None else []) + cmd
    elif uid is not None:
        kw.update({"user": uid, "group": gid})
    with open(console, "wb") as out:
        t0 = time.monotonic()
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                             start_new_session=True, **kw)
    try:
        while True:  # the socket file appears before the VMM listens on it
            if p.poll() is not None:
                raise RuntimeError(f"VMM exited {p.returncode}: {open(console).read()[-300:]}")
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.connect(api)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                time.sleep(0.0005)
        spawned = ms(t0)
        c = UnixHTTP(api)
        put(c, "/machine-config", {"vcpu_count": 1, "mem_size_mib": 512})
        put(c, "/boot-source", {"kernel_image_path": kernel, "boot_args": BOOT_ARGS})
        put(c, "/drives/rootfs", {"drive_id": "rootfs", "is_root_device": True,
                                  "is_read_only": False, "path_on_host": rootfs})
        put(c, "/vsock", {"guest_cid": 3, "uds_path": vsock})
        put(c, "/actions", {"action_type": "InstanceStart"})
        configured = ms(t0)
        needle = prefix.encode()
        deadline = time.monotonic() + 30
        while True:
            with open(console, "rb") as f:
                if any(line.startswith(needle) for line in f.read().splitlines()):
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("no ready line within 30 s")
            time.sleep(0.001)
        print(json.dumps({"ready_ms": ms(t0), "api_up_ms": spawned, "configured_ms": configured}))
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()


def create(args):
    name, image = args
    t0 = time.monotonic()
    r = subprocess.run(["banger", "vm", "create", "--name", name, "--image", image],
                       capture_output=True, text=True)
    took = ms(t0)
    if r.returncode != 0:
        print(r.stdout + r.stderr, file=sys.stderr)
        return 1
    print(json.dumps({"create_ms": took}))
    return 0


def rpc(method):
    """One request; the raw answer line (parse it outside any timing)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(DAEMON_SOCK)
        s.sendall(json.dumps({"v": 1, "method": method, "params": {}, "op_id": "op-bench"}).encode()
                  + b"\n")
        s.shutdown(socket.SHUT_WR)
        buf = b""
        while True:
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            buf += chunk
    return buf.split(b"\n", 1)[0]


def summary(v):
    return {"median": round(statistics.median(v), 2), "min": round(min(v), 2),
            "max": round(max(v), 2)}


def list_bench(args):
    n = int(args[0])
    rows = len(json.loads(subprocess.run(["banger", "vm", "list", "--json"], check=True,
                                         capture_output=True, text=True).stdout))
    cli, bare, ping = [], [], []
    for _ in range(n):
        t0 = time.monotonic()
        rpc("ping")
        ping.append((time.monotonic() - t0) * 1000)
        t0 = time.monotonic()
        subprocess.run(["banger", "vm", "list", "--json"], check=True, stdout=subprocess.DEVNULL)
        cli.append((time.monotonic() - t0) * 1000)
        t0 = time.monotonic()
        r = rpc("vm.list")
        bare.append((time.monotonic() - t0) * 1000)
        r = json.loads(r)
        if not r.get("ok"):
            raise RuntimeError(f"vm.list: {r}")
    print(json.dumps({"rows": rows, "cli_ms": summary(cli), "rpc_ms": summary(bare),
                      "ping_ms": summary(ping)}))


def seed(args):
    db, n = args[0], int(args[1])
    con = sqlite3.connect(db, timeout=10)
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    with con:
        con.executemany(
            "INSERT INTO vms (id, name, image, vcpu, memory_mib, state, created_at, updated_at)"
            " VALUES (?, ?, 'tiny', 1, 512, 'stopped', ?, ?)",
            [(uuid.uuid4().hex[:12], f"seed-{i:04d}", now, now) for i in range(n)])
    con.close()
    print(json.dumps({"seeded": n}))


def main():
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "raw":
        return raw(args)
    if cmd == "create":
        return create(args)
    if cmd == "list":
        return list_bench(args)
    if cmd == "seed":
        return seed(args)
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main() or 0)
