#!/usr/bin/env python3
"""VM benchmarks for `scripts/smoke.sh --bench`, run inside the test container. Prints numbers
(JSON, one line), never judges them.

  vmbench.py raw VMM KERNEL ROOTFS WORKDIR PREFIX [--uid N --gid N] [--scope]
      The raw VMM start of the config `banger vm create` uses (1 vCPU, 512 MiB, the kernel, one
      root drive, a vsock device, InstanceStart) driven by hand over the API socket: wall time
      from spawn to the console line starting with PREFIX. --scope starts it the way the helper
      does: forked and held before exec, registered as its own banger-bench-*.scope in
      banger.slice with StartTransientUnit over the D-Bus system bus (job waited for), then
      released (connection setup included: each run is a new process).
      --scope=systemd-run does it with `systemd-run --scope` instead (the old way, to compare).
  vmbench.py create NAME IMAGE         wall time of `banger vm create --name NAME --image IMAGE`
  vmbench.py restore NAME SNAP         wall time of `banger vm create --from SNAP --name NAME`
  vmbench.py stages NAME...            median of each stage of the `vm.create` operations of those
                                       VMs (the daemon's timings, `daemon.operations.list`)
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
import struct
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


# --- a minimal D-Bus client: just enough for StartTransientUnit over the system bus ---

SYSTEM_BUS = "/run/dbus/system_bus_socket"


class Writer:
    """D-Bus marshalling (little endian) of the few types StartTransientUnit needs."""

    def __init__(self):
        self.b = bytearray()

    def align(self, n):
        self.b += b"\0" * (-len(self.b) % n)

    def u(self, v):
        self.align(4)
        self.b += struct.pack("<I", v)

    def s(self, v):
        v = v.encode()
        self.u(len(v))
        self.b += v + b"\0"

    def g(self, v):
        self.b += bytes([len(v)]) + v.encode() + b"\0"

    def array(self, elem_align, items, write):
        self.u(0)
        at = len(self.b) - 4
        self.align(elem_align)
        start = len(self.b)
        for i in items:
            write(i)
        struct.pack_into("<I", self.b, at, len(self.b) - start)

    def variant(self, sig, v):
        self.g(sig)
        {"s": self.s, "o": self.s, "g": self.g, "y": lambda x: self.b.append(x),
         "u": self.u, "au": lambda x: self.array(4, x, self.u)}[sig](v)


class Reader:
    def __init__(self, b):
        self.b, self.i = b, 0

    def align(self, n):
        self.i += -self.i % n

    def u(self):
        self.align(4)
        (v,) = struct.unpack_from("<I", self.b, self.i)
        self.i += 4
        return v

    def s(self):
        n = self.u()
        v = self.b[self.i:self.i + n].decode()
        self.i += n + 1
        return v

    def g(self):
        n = self.b[self.i]
        v = self.b[self.i + 1:self.i + 1 + n].decode()
        self.i += n + 2
        return v

    def value(self, sig):
        if sig in ("s", "o"):
            return self.s()
        if sig == "g":
            return self.g()
        if sig == "u":
            return self.u()
        if sig == "y":
            self.i += 1
            return self.b[self.i - 1]
        raise RuntimeError(f"D-Bus: unexpected header type {sig}")


class Systemd:
    """One connection to the system bus, as the helper keeps one."""

    def __init__(self, path=SYSTEM_BUS):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(path)
        self.sock.sendall(b"\0AUTH EXTERNAL " + str(os.geteuid()).encode().hex().encode() + b"\r\n")
        line = self.sock.recv(4096)
        if not line.startswith(b"OK "):
            raise RuntimeError(f"D-Bus auth on {path}: {line!r}")
        self.sock.sendall(b"BEGIN\r\n")
        self.serial = 0
        self.buf = b""
        self.reply(self.call("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
                             "Hello", "", lambda w: None))

    def call(self, dest, path, iface, member, sig, write_body):
        body = Writer()
        write_body(body)
        self.serial += 1
        h = Writer()
        h.b += b"l\x01\x00\x01"
        h.u(len(body.b))
        h.u(self.serial)
        fields = [(1, "o", path), (2, "s", iface), (3, "s", member), (6, "s", dest)]
        if sig:
            fields.append((8, "g", sig))

        def field(f):
            h.align(8)
            h.b.append(f[0])
            h.variant(f[1], f[2])
        h.array(8, fields, field)
        h.align(8)
        self.sock.sendall(bytes(h.b) + bytes(body.b))
        return self.serial

    def reply(self, serial, on_signal=None):
        """The body Reader of the reply to `serial`; signals meanwhile go to on_signal."""
        while True:
            mtype, fields, r = self.message()
            if mtype in (2, 3) and fields.get(5) == serial:
                if mtype == 3:
                    raise RuntimeError(f"D-Bus: {fields.get(4)}: {r.s() if fields.get(8) else ''}")
                return r
            if mtype == 4 and on_signal:
                on_signal(fields, r)

    def _read(self, n):
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise RuntimeError("D-Bus: systemd closed the connection")
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def message(self):
        """(type, fields, body Reader) of the next message."""
        fixed = self._read(16)
        if fixed[0:1] != b"l":
            raise RuntimeError("D-Bus: big-endian message")
        mtype = fixed[1]
        body_len, _serial, fields_len = struct.unpack_from("<III", fixed, 4)
        rest = self._read(fields_len + (-(16 + fields_len) % 8) + body_len)
        r = Reader(fixed + rest)
        r.i = 12
        end = 16 + r.u()
        fields = {}
        while r.i < end:
            r.align(8)
            code = r.b[r.i]
            r.i += 1
            fields[code] = r.value(r.g())
        r.align(8)
        return mtype, fields, Reader(r.b[r.i:])

    def start_scope(self, unit, slice_, description, pid):
        """StartTransientUnit(unit, "fail", {Description, Slice, CollectMode, PIDs}) and wait for
        its job's JobRemoved; raises unless the result is "done"."""
        props = [("Description", "s", description), ("Slice", "s", slice_),
                 ("CollectMode", "s", "inactive-or-failed"), ("PIDs", "au", [pid])]

        def body(w):
            w.s(unit)
            w.s("fail")

            def prop(p):
                w.align(8)
                w.s(p[0])
                w.variant(p[1], p[2])
            w.array(8, props, prop)
            w.array(8, [], None)
        removed = {}

        def on_signal(fields, r):
            if fields.get(3) == "JobRemoved":
                r.u()
                path, _unit, result = r.s(), r.s(), r.s()
                removed[path] = result
        rule = ("type='signal',interface='org.freedesktop.systemd1.Manager',member='JobRemoved',"
                f"path='/org/freedesktop/systemd1',arg2='{unit}'")
        self.reply(self.call("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
                             "AddMatch", "s", lambda w: w.s(rule)))
        serial = self.call("org.freedesktop.systemd1", "/org/freedesktop/systemd1",
                           "org.freedesktop.systemd1.Manager", "StartTransientUnit",
                           "ssa(sv)a(sa(sv))", body)
        job = self.reply(serial, on_signal).s()
        while job not in removed:
            mtype, fields, r = self.message()
            if mtype == 4:
                on_signal(fields, r)
        if removed[job] != "done":
            raise RuntimeError(f"scope {unit}: start job {removed[job]}")


class Forked:
    """A child forked by hand (held before exec), with Popen's poll/wait."""

    def __init__(self, pid):
        self.pid, self.returncode = pid, None

    def poll(self):
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self):
        if self.returncode is None:
            self.returncode = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
        return self.returncode


def spawn_held(cmd, out, groups, uid, gid, register):
    """fork; the child detaches, drops ids and waits on a pipe; register(pid); then it execs."""
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(go_w)
            os.setsid()
            devnull = os.open(os.devnull, os.O_RDONLY)
            os.dup2(devnull, 0)
            os.dup2(out.fileno(), 1)
            os.dup2(out.fileno(), 2)
            if uid is not None:
                os.setgroups(groups)
                os.setresgid(gid, gid, gid)
                os.setresuid(uid, uid, uid)
            if os.read(go_r, 1) == b"G":
                os.execv(cmd[0], cmd)
        finally:
            os._exit(127)
    os.close(go_r)
    child = Forked(pid)
    try:
        register(pid)
        os.write(go_w, b"G")
    except BaseException:
        os.kill(pid, signal.SIGKILL)
        child.wait()
        raise
    finally:
        os.close(go_w)
    return child


def raw(args):
    vmm, kernel, rootfs, work, prefix = args[:5]
    rest = args[5:]
    uid = gid = None
    scope = "--scope" in rest
    old_scope = "--scope=systemd-run" in rest
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
    groups = []
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
    if old_scope:
        # systemd-run keeps the supplementary groups it was started with (it never calls setgroups).
        cmd = ["systemd-run", "--scope", "--quiet", "--collect", "--slice=banger.slice",
               f"--unit=banger-bench-{vid}.scope"] + \
              ([f"--uid={uid}", f"--gid={gid}"] if uid is not None else []) + cmd
    elif uid is not None:
        kw.update({"user": uid, "group": gid})
    with open(console, "wb") as out:
        t0 = time.monotonic()
        if scope:
            bus = Systemd()
            p = spawn_held(cmd, out, groups, uid, gid,
                           lambda pid: bus.start_scope(f"banger-bench-{vid}.scope", "banger.slice",
                                                       f"banger bench {vid}", pid))
        else:
            p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                                 stderr=subprocess.STDOUT, start_new_session=True, **kw)
    try:
        # exec_ms: spawn -> the pid runs the VMM binary (what a scope registration adds to).
        real = os.path.realpath(vmm)
        while True:
            try:
                if os.readlink(f"/proc/{p.pid}/exe") == real:
                    break
            except FileNotFoundError:
                pass
            if p.poll() is not None:
                raise RuntimeError(f"VMM exited {p.returncode}: {open(console).read()[-300:]}")
            time.sleep(0.0002)
        exec_ms = ms(t0)
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
        print(json.dumps({"ready_ms": ms(t0), "exec_ms": exec_ms, "api_up_ms": spawned,
                          "configured_ms": configured}))
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()


def create(args, source="--image"):
    name, image = args
    t0 = time.monotonic()
    r = subprocess.run(["banger", "vm", "create", "--name", name, source, image],
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


def stages(names):
    """Per-stage medians (ms) of the named VMs' vm.create operations, in the order first seen;
    stages that ran beside the others are marked with a trailing `*`."""
    ops = json.loads(rpc("daemon.operations.list"))["result"]["operations"]
    seen = {}
    for op in ops:
        if op.get("kind") != "vm.create" or op.get("target") not in names:
            continue
        for t in op.get("timings") or []:
            key = t["stage"] + ("*" if t.get("concurrent") else "")
            seen.setdefault(key, []).append(t["ms"])
    print(json.dumps({k: round(statistics.median(v), 2) for k, v in seen.items()}))
    return 0


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
    if cmd == "restore":
        return create(args, "--from")
    if cmd == "stages":
        return stages(set(args))
    if cmd == "list":
        return list_bench(args)
    if cmd == "seed":
        return seed(args)
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main() or 0)
