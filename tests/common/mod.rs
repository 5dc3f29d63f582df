//! Shared harness for integration tests: a temp layout, role links to the real binary, and
//! daemons spawned under it (killed on drop).
#![allow(dead_code)]

pub mod vmm;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_banger");

/// A temp root with role links; removed on drop.
pub struct Bed {
    pub root: PathBuf,
    pub bin: PathBuf,
}

impl Bed {
    pub fn new(name: &str) -> Bed {
        let root = std::env::temp_dir().join(format!(
            "banger-it-{name}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let bin = root.join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        for role in ["banger", "bangerd", "bangerd-root", "banger-vsock-agent"] {
            std::os::unix::fs::symlink(BIN, bin.join(role)).unwrap();
        }
        Bed { root, bin }
    }

    pub fn layout(&self) -> banger::layout::Layout {
        banger::layout::Layout::under(&self.root)
    }

    pub fn cmd(&self, role: &str) -> Command {
        let mut c = Command::new(self.bin.join(role));
        c.env("BANGER_ROOT", &self.root).env_remove("NOTIFY_SOCKET");
        c
    }

    pub fn run(&self, role: &str, args: &[&str]) -> Output {
        self.cmd(role).args(args).output().unwrap()
    }

    /// Spawns a long-running role and waits until `socket` answers (bounded).
    pub fn spawn(&self, role: &str, socket: &Path) -> Server {
        self.spawn_with(role, socket, &[])
    }

    /// [`Bed::spawn`] with extra environment variables.
    pub fn spawn_with(&self, role: &str, socket: &Path, envs: &[(&str, &Path)]) -> Server {
        self.spawn_in(None, role, socket, envs)
    }

    /// [`Bed::spawn_with`] inside the network namespace named `ns` (when given): the process and
    /// every process it starts (the helper's VMMs) see only that namespace's interfaces. It still
    /// reaches and serves the others over Unix sockets, which belong to the filesystem.
    pub fn spawn_in(
        &self,
        ns: Option<&str>,
        role: &str,
        socket: &Path,
        envs: &[(&str, &Path)],
    ) -> Server {
        let mut cmd = match ns {
            Some(ns) => self.cmd_in(ns, role),
            None => self.cmd(role),
        };
        for (k, v) in envs {
            cmd.env(k, v);
        }
        self.start_logged(&mut cmd, role, socket, || {
            socket.exists() && std::os::unix::net::UnixStream::connect(socket).is_ok()
        })
    }

    /// [`Bed::cmd`] inside the network namespace named `ns`: `ip netns exec` execs the role in
    /// place, so the child is the role itself.
    pub fn cmd_in(&self, ns: &str, role: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns])
            .arg(self.bin.join(role))
            .env("BANGER_ROOT", &self.root)
            .env_remove("NOTIFY_SOCKET");
        c
    }

    /// Starts `cmd` (`role` of this bed) with stdout discarded and stderr appended to
    /// `<root>/<role>.log`, and waits until `answers()` says it serves `socket` (20 s at most).
    pub fn start_logged(
        &self,
        cmd: &mut Command,
        role: &str,
        socket: &Path,
        answers: impl Fn() -> bool,
    ) -> Server {
        let log = self.root.join(format!("{role}.log"));
        let child = cmd
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log)
                    .unwrap(),
            )
            .spawn()
            .unwrap();
        let s = Server { child, log };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !answers() {
            assert!(
                Instant::now() < deadline,
                "{role} did not answer on {} within 20s; log:\n{}",
                socket.display(),
                s.log_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        s
    }

    /// Spawns `role` with NOTIFY_SOCKET pointing at a datagram socket and returns what it sent first.
    pub fn spawn_notified(&self, role: &str) -> (Server, String) {
        let nsock = self.root.join(format!("{role}-notify.sock"));
        let rx = UnixDatagram::bind(&nsock).unwrap();
        rx.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let log = self.root.join(format!("{role}.log"));
        let child = self
            .cmd(role)
            .env("NOTIFY_SOCKET", &nsock)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut buf = [0u8; 256];
        let n = rx.recv(&mut buf).expect("no sd_notify message within 20s");
        (
            Server { child, log },
            String::from_utf8_lossy(&buf[..n]).into_owned(),
        )
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// A spawned server process; SIGKILLed on drop if still running.
pub struct Server {
    pub child: Child,
    pub log: PathBuf,
}

impl Server {
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn sigterm_and_wait(&mut self) -> std::process::ExitStatus {
        let pid = rustix::process::Pid::from_raw(self.pid()).unwrap();
        rustix::process::kill_process(pid, rustix::process::Signal::Term).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(Instant::now() < deadline, "server ignored SIGTERM for 20s");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Waits up to `timeout` for `child` to exit; its status, or `None` if it still runs.
pub fn wait_exit(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Some(st) = child.try_wait().unwrap() {
            return Some(st);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// A named network namespace of the test's own (`ip netns add`), deleted on drop. Bridges, taps
/// and nftables rules the helper makes for a test live here and never on the machine's own
/// network; being named, it outlives a helper restart, like the host's namespace does.
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    /// A fresh namespace for `tag`; `Err` is the SKIP reason (not root, no `ip`).
    pub fn new(tag: &str) -> Result<NetNs, String> {
        if !is_root() {
            return Err("network namespaces need root".into());
        }
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let name = format!(
            "bgr-it-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let o = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .map_err(|e| format!("`ip netns add` could not run (install iproute2): {e}"))?;
        if !o.status.success() {
            return Err(format!(
                "`ip netns add {name}` failed: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ));
        }
        Ok(NetNs { name })
    }

    /// `ip -n <ns> <args>`.
    pub fn ip(&self, args: &[&str]) -> Output {
        Command::new("ip")
            .arg("-n")
            .arg(&self.name)
            .args(args)
            .output()
            .unwrap()
    }

    /// `ip -j -d link show <dev>` in the namespace, parsed; `None` when there is no such link.
    pub fn link(&self, dev: &str) -> Option<serde_json::Value> {
        let o = self.ip(&["-j", "-d", "link", "show", "dev", dev]);
        if !o.status.success() {
            return None;
        }
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).ok()?;
        v.as_array()?.first().cloned()
    }

    /// Names of the namespace's links whose names start with `prefix`.
    pub fn links_with_prefix(&self, prefix: &str) -> Vec<String> {
        let o = self.ip(&["-j", "link", "show"]);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|l| l["ifname"].as_str())
            .filter(|n| n.starts_with(prefix))
            .map(str::to_string)
            .collect()
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// A scratch directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("banger-it-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// True when `tool arg` runs and succeeds (e.g. `openssl version`).
pub fn have(tool: &str, arg: &str) -> bool {
    Command::new(tool)
        .arg(arg)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Serves files under `dir` over HTTP/1.1 on 127.0.0.1 (one thread per connection).
pub fn serve(dir: PathBuf) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let dir = dir.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut first = String::new();
                let _ = reader.read_line(&mut first);
                loop {
                    let mut h = String::new();
                    if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                        break;
                    }
                }
                let path = first.split_whitespace().nth(1).unwrap_or("/").to_string();
                let body = (!path.contains(".."))
                    .then(|| std::fs::read(dir.join(path.trim_start_matches('/'))).ok())
                    .flatten();
                let (status, body) = match body {
                    Some(b) => ("200 OK", b),
                    None => ("404 Not Found", b"not found".to_vec()),
                };
                let head = format!(
                    "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = conn.write_all(head.as_bytes());
                let _ = conn.write_all(&body);
            });
        }
    });
    base
}
