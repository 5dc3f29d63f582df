//! Shared harness for integration tests: a temp layout, role links to the real binary, and
//! daemons spawned under it (killed on drop).
#![allow(dead_code)]

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
        let log = self.root.join(format!("{role}.log"));
        let child = self
            .cmd(role)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let s = Server { child, log };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !socket.exists() || std::os::unix::net::UnixStream::connect(socket).is_err() {
            assert!(
                Instant::now() < deadline,
                "{role} did not bind {} within 20s; log:\n{}",
                socket.display(),
                std::fs::read_to_string(&s.log).unwrap_or_default()
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
