//! Helpers shared by the benchmarks.
#![allow(dead_code)]

use banger::rpc::client;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Starts a bare VMM on API socket `api` (`--id raw`), inside network namespace `netns` when given,
/// stdin and stderr closed, stdout as `stdout`: what the benches' "raw" numbers time.
pub fn spawn_raw_vmm(
    vmm: &Path,
    api: &Path,
    netns: Option<&str>,
    stdout: std::process::Stdio,
) -> std::process::Child {
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = std::process::Command::new("ip");
            c.args(["netns", "exec", ns]).arg(vmm);
            c
        }
        None => std::process::Command::new(vmm),
    };
    cmd.arg("--api-sock")
        .arg(api)
        .args(["--id", "raw"])
        .stdin(std::process::Stdio::null())
        .stdout(stdout)
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn VMM")
}

/// Resident set size of `pid` in KiB (0 if unknown).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Waits (bounded) until `method` answers on `sock`.
pub fn wait_call(sock: &Path, method: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while client::call(sock, method, json!({})).is_err() {
        assert!(
            Instant::now() < deadline,
            "{} never answered",
            sock.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A [`Host`] for a VM benchmark: both services running with the helper in a network namespace
/// of its own, and the tiny guest imported as kernel `k` and image `i` (ready at its console
/// line).
pub struct VmBench {
    pub host: Host,
    /// `BANGER_TEST_FIRECRACKER`, else the release stand-in.
    pub vmm: PathBuf,
    pub helper: u32,
    pub daemon: u32,
    /// The tiny guest, as `build_guest` made it under the host's root.
    pub kernel: PathBuf,
    /// The blank 1 MiB root image image `i` was imported from.
    pub rootfs: PathBuf,
}

impl VmBench {
    /// The set-up [`VmBench`] named `tag`; `None` after printing why benchmark `bench` skips (not
    /// root, no VMM, no network namespace). `build_guest` is `guest::build_tiny_guest` (the
    /// benchmark's own include of tests/guest).
    pub fn start(
        bench: &str,
        tag: &str,
        build_guest: fn(&Path) -> banger::error::Result<PathBuf>,
    ) -> Option<VmBench> {
        if !rustix::process::geteuid().is_root() {
            println!("SKIP: {bench} bench needs root (the helper launches VMMs)");
            return None;
        }
        let target = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/x86_64-unknown-linux-gnu");
        let vmm = std::env::var("BANGER_TEST_FIRECRACKER")
            .map(PathBuf::from)
            .unwrap_or_else(|_| target.join("release/firecracker"));
        if !vmm.is_file() {
            println!(
                "SKIP: no VMM at {} (build the stand-in: cargo build --release -p banger-fc-standin)",
                vmm.display()
            );
            return None;
        }
        let mut host = Host::new(tag, &[("BANGER_FIRECRACKER", &vmm)]);
        if let Err(why) = host.isolate_network() {
            println!("SKIP: {bench} bench runs the helper in a network namespace: {why}");
            return None;
        }
        let helper = host.start("bangerd-root");
        let daemon = host.start("bangerd");
        let sock = host.layout.daemon_socket();
        let kernel = build_guest(&host.root).expect("building the tiny guest");
        let rootfs = host.root.join("rootfs.img");
        std::fs::write(&rootfs, vec![0u8; 1 << 20]).expect("rootfs");
        let call = |method: &str, params| {
            client::call_with_timeout(&sock, method, params, Duration::from_secs(120))
                .unwrap_or_else(|e| panic!("{method}: {e:?}"))
        };
        call("kernel.import", json!({"name": "k", "path": kernel}));
        call(
            "image.import",
            json!({"name": "i", "rootfs": rootfs, "kernel": "k", "ready_console": "banger-guest: ready boot_id="}),
        );
        Some(VmBench {
            host,
            vmm,
            helper,
            daemon,
            kernel,
            rootfs,
        })
    }
}

/// A temp layout with `bangerd`/`bangerd-root` links to the binary under test; every service it
/// spawned is killed and the root removed on drop (a failed `expect` included).
pub struct Host {
    /// The temp root (`BANGER_ROOT`).
    pub root: std::path::PathBuf,
    /// Its layout.
    pub layout: banger::layout::Layout,
    bindir: std::path::PathBuf,
    envs: Vec<(String, std::path::PathBuf)>,
    children: Vec<std::process::Child>,
    netns: Option<String>,
}

impl Host {
    /// A host named `tag` running `bin` (BANGER_BENCH_BIN, else the release build), with `envs`
    /// set for every service.
    pub fn new(tag: &str, envs: &[(&str, &Path)]) -> Host {
        // Absolute: the role links point at it from the temp root.
        let bin = std::env::var("BANGER_BENCH_BIN")
            .map(|p| std::path::absolute(p).expect("BANGER_BENCH_BIN"))
            .unwrap_or_else(|_| {
                Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("target/x86_64-unknown-linux-gnu/release/banger")
            });
        let root = std::env::temp_dir().join(format!("banger-{tag}-{}", std::process::id()));
        let bindir = root.join("bin");
        std::fs::create_dir_all(&bindir).expect("temp dir");
        for r in ["bangerd", "bangerd-root"] {
            std::os::unix::fs::symlink(&bin, bindir.join(r)).expect("link");
        }
        Host {
            layout: banger::layout::Layout::under(&root),
            root,
            bindir,
            envs: envs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_path_buf()))
                .collect(),
            children: Vec::new(),
            netns: None,
        }
    }

    /// The network namespace [`Host::isolate_network`] made, if any.
    pub fn netns(&self) -> Option<&str> {
        self.netns.as_deref()
    }

    /// Runs the root helper (and so the VMMs it launches) in a network namespace of its own,
    /// made now and deleted on drop: guest bridges, taps and rules never touch the machine's own
    /// network. `Err` says why it could not be made.
    pub fn isolate_network(&mut self) -> Result<(), String> {
        let name = format!("bgr-bench-{}", std::process::id());
        let o = std::process::Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .map_err(|e| format!("`ip netns add` could not run: {e}"))?;
        if !o.status.success() {
            return Err(format!(
                "`ip netns add {name}`: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ));
        }
        self.netns = Some(name);
        Ok(())
    }

    /// Starts `role` and waits until it answers; returns its pid.
    pub fn start(&mut self, role: &str) -> u32 {
        let mut cmd = match (&self.netns, role) {
            (Some(ns), "bangerd-root") => {
                let mut c = std::process::Command::new("ip");
                c.args(["netns", "exec", ns]).arg(self.bindir.join(role));
                c
            }
            _ => std::process::Command::new(self.bindir.join(role)),
        };
        cmd.env("BANGER_ROOT", &self.root)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        for (k, v) in &self.envs {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("spawn");
        let pid = child.id();
        self.children.push(child);
        match role {
            "bangerd" => wait_call(&self.layout.daemon_socket(), "ping"),
            _ => wait_call(&self.layout.helper_socket(), "priv.ping"),
        }
        pid
    }

    /// Stops the daemon through `daemon.shutdown` and reaps it.
    pub fn stop_daemon(&mut self, pid: u32) {
        let _ = client::call(&self.layout.daemon_socket(), "daemon.shutdown", json!({}));
        if let Some(i) = self.children.iter().position(|c| c.id() == pid) {
            let _ = self.children.remove(i).wait();
        }
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(ns) = &self.netns {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", ns])
                .output();
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}
