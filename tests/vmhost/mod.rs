//! The temp banger install every VM test runs on (tests/vm_lifecycle.rs, snapshot.rs,
//! console_flood.rs, vm_ssh.rs, vm_tcg.rs): the daemon and the root helper under a temp layout,
//! as root; the helper in a network namespace of the test's own (its bridge, taps, nftables rules
//! and VMMs with it), the daemon outside, reaching it over its Unix socket; the VMM a real
//! Firecracker when `BANGER_TEST_FIRECRACKER` names one, else the stand-in. The CLI runs inside
//! the namespace whenever it connects to a guest address, so no packet reaches the machine's own
//! network. VMMs left running are killed on drop. It never touches the machine's own network or
//! anything outside its temp root. Include with `mod common;`, `#[path = "guest/mod.rs"] mod
//! guest;` and `#[path = "vmhost/mod.rs"] mod vmhost;`.
#![allow(dead_code)]

use crate::common::vmm::find_vmm;
use crate::common::*;
use crate::guest;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

pub struct Host {
    /// Killed before the bed's directory goes.
    pub daemon: Option<Server>,
    pub helper: Option<Server>,
    pub bed: Bed,
    pub vmm: PathBuf,
    pub standin: bool,
    /// Whether the VMM opens its tap (a real Firecracker, or a stand-in that does); asked once.
    opens_taps: OnceLock<bool>,
    /// Dropped last: its interfaces go with it.
    pub ns: NetNs,
}

impl Host {
    /// Both services running, nothing imported; `None` after printing the SKIP line for `test`.
    pub fn start(test: &str, tag: &str) -> Option<Host> {
        Host::start_with(test, tag, None)
    }

    /// [`Host::start`] with /etc/banger/config.toml holding `config` (written before the services
    /// start) when given.
    pub fn start_with(test: &str, tag: &str, config: Option<&str>) -> Option<Host> {
        if !is_root() {
            eprintln!("SKIP: {test}: needs root (the helper launches VMMs)");
            return None;
        }
        let (vmm, standin) = match find_vmm() {
            Ok(v) => v,
            Err(why) => {
                eprintln!("SKIP: {test}: {why}");
                return None;
            }
        };
        let ns = match NetNs::new(tag) {
            Ok(ns) => ns,
            Err(why) => {
                eprintln!("SKIP: {test}: {why}");
                return None;
            }
        };
        let mut h = Host {
            daemon: None,
            helper: None,
            bed: short_bed(),
            vmm,
            standin,
            opens_taps: OnceLock::new(),
            ns,
        };
        if let Some(text) = config {
            let l = h.bed.layout();
            std::fs::create_dir_all(l.etc_dir()).unwrap();
            std::fs::write(l.config_toml(), text).unwrap();
        }
        h.start_helper();
        h.start_daemon();
        Some(h)
    }

    /// [`Host::start_with`], then the tiny guest imported as kernel and image `tiny` (ready at
    /// its console line) and, under the stand-in, as image `agent` (ready through the agent: the
    /// stand-in's "guest" runs banger's agent handler).
    pub fn with_tiny_guest(test: &str, tag: &str, config: Option<&str>) -> Option<Host> {
        let h = Host::start_with(test, tag, config)?;
        let kernel = guest::build_tiny_guest(&h.bed.root).expect("building the tiny guest");
        h.import_console_image("tiny", &kernel);
        if h.standin {
            h.import_agent_image("tiny");
        }
        Some(h)
    }

    /// The blank 1 MiB root image (`<root>/rootfs.img`) the test images are imported from.
    pub fn blank_rootfs(&self) -> PathBuf {
        let rootfs = self.bed.root.join("rootfs.img");
        std::fs::write(&rootfs, vec![0u8; 1 << 20]).unwrap();
        rootfs
    }

    /// Imports `kernel` as kernel `name`, and image `name` booting it on the blank root image,
    /// ready when the guest prints its readiness line on the console.
    pub fn import_console_image(&self, name: &str, kernel: &Path) {
        let rootfs = self.blank_rootfs();
        self.ok(&["kernel", "import", name, kernel.to_str().unwrap()]);
        self.ok(&[
            "image",
            "import",
            name,
            "--rootfs",
            rootfs.to_str().unwrap(),
            "--kernel",
            name,
            "--ready-console",
            guest::READY,
        ]);
    }

    /// Imports image `agent`: the blank root image booting kernel `kernel`, ready through the
    /// guest agent.
    pub fn import_agent_image(&self, kernel: &str) {
        let rootfs = self.blank_rootfs();
        let r = rootfs.to_str().unwrap();
        self.ok(&[
            "image", "import", "agent", "--rootfs", r, "--kernel", kernel,
        ]);
    }

    pub fn start_helper(&mut self) {
        let sock = self.bed.layout().helper_socket();
        self.helper = Some(self.bed.spawn_in(
            Some(&self.ns.name),
            "bangerd-root",
            &sock,
            &[("BANGER_FIRECRACKER", &self.vmm)],
        ));
    }

    pub fn start_daemon(&mut self) {
        let sock = self.bed.layout().daemon_socket();
        self.daemon = Some(self.bed.spawn("bangerd", &sock));
    }

    /// SIGTERMs the daemon; it must exit 0.
    pub fn stop_daemon(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            assert_eq!(d.sigterm_and_wait().code(), Some(0));
        }
    }

    pub fn stop_helper(&mut self) {
        if let Some(mut h) = self.helper.take() {
            h.sigterm_and_wait();
        }
    }

    /// SIGTERM both services (daemon first) and start them again (helper first).
    pub fn restart_services(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            d.sigterm_and_wait();
        }
        self.stop_helper();
        self.start_helper();
        self.start_daemon();
    }

    /// The CLI inside the test's network namespace (anything that connects to a guest address).
    pub fn cmd_in_ns(&self, args: &[&str]) -> Command {
        let mut c = self.bed.cmd_in(&self.ns.name, "banger");
        c.args(args);
        c
    }

    pub fn run_in_ns(&self, args: &[&str]) -> Output {
        self.cmd_in_ns(args).output().unwrap()
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.bed.run("banger", args)
    }

    /// The daemon's log so far (it survives restarts: each appends).
    pub fn daemon_log(&self) -> String {
        std::fs::read_to_string(self.bed.root.join("bangerd.log")).unwrap_or_default()
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(
            o.status.success(),
            "banger {args:?} failed: {}\ndaemon log:\n{}",
            stderr(&o),
            self.daemon_log()
        );
        stdout(&o)
    }

    pub fn show(&self, vm: &str) -> Value {
        let v: Value = serde_json::from_str(&self.ok(&["vm", "show", vm, "--json"])).unwrap();
        v["vm"].clone()
    }

    pub fn vm_count(&self) -> usize {
        let v: Value = serde_json::from_str(&self.ok(&["vm", "list", "--json"])).unwrap();
        v.as_array().map(Vec::len).unwrap_or(0)
    }

    pub fn known_hosts(&self) -> String {
        std::fs::read_to_string(self.bed.layout().ssh_known_hosts()).unwrap_or_default()
    }

    pub fn ssh_config(&self) -> String {
        std::fs::read_to_string(self.bed.layout().ssh_config()).unwrap_or_default()
    }

    /// `banger ssh-config --install` for a user whose home is `home`, then plain `ssh -F` with
    /// that user's ssh config (ssh reads it as it would ~/.ssh/config) and `args`, inside the
    /// namespace.
    pub fn ssh_through_user_config(&self, home: &str, args: &[&str]) -> Output {
        let o = self
            .bed
            .cmd("banger")
            .args(["ssh-config", "--install"])
            .env("HOME", home)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        let cfg = self.bed.layout().user_ssh_config(Path::new(home));
        Command::new("ip")
            .args(["netns", "exec", &self.ns.name, "ssh", "-F"])
            .arg(&cfg)
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap()
    }

    /// The VM's tap in the helper's namespace, if it exists.
    pub fn tap(&self, vm: &Value) -> Option<Value> {
        self.ns
            .link(vm["tap"].as_str().expect("a VM reports its tap"))
    }

    /// Checks that the VMM of `vm` holds its tap open (it was given it through
    /// PUT /network-interfaces/eth0), when the VMM is one that opens taps; says so otherwise.
    pub fn assert_vmm_holds_tap(&self, vm: &Value) {
        let (pid, tap) = (vm["pid"].as_i64().unwrap(), vm["tap"].as_str().unwrap());
        let opens_taps = *self.opens_taps.get_or_init(|| {
            crate::common::vmm::opens_taps(&self.vmm, self.standin, &self.ns, &self.bed.root)
        });
        if !opens_taps {
            eprintln!(
                "NOTE: {} does not open taps (a stand-in older than the tap-opening one): \
                 not checking that VMM pid {pid} holds {tap}",
                self.vmm.display()
            );
            return;
        }
        assert!(
            vmm_holds_tap(pid, tap),
            "VMM pid {pid} does not hold {tap} open"
        );
    }

    /// The `ssh` command line banger's `vm exec VM -- true` runs for a guest at `ip` (the
    /// owner key, banger's known_hosts), `ssh` first.
    pub fn plain_ssh_argv(&self, ip: &str) -> Vec<std::ffi::OsString> {
        let l = self.bed.layout();
        let (k, kh) = (l.ssh_key(), l.ssh_known_hosts());
        let words = vec!["true".to_string()];
        banger::ssh::command::SshCommand {
            key: &k,
            known_hosts: &kh,
            host: ip,
            port: None,
            tty: banger::ssh::command::Tty::No,
            command: Some(&words),
        }
        .argv()
        .unwrap()
    }

    /// `vm exec VM -- true` against [`Host::plain_ssh_argv`], 20 times each inside the
    /// namespace: the medians in ms (banger's, plain ssh's). Every run must succeed.
    pub fn exec_vs_ssh_ms(&self, vm: &str, ip: &str) -> (f64, f64) {
        let argv = self.plain_ssh_argv(ip);
        let (mut banger_ms, mut ssh_ms) = (Vec::new(), Vec::new());
        for _ in 0..20 {
            banger_ms.push(time_ms(
                &mut self.cmd_in_ns(&["vm", "exec", vm, "--", "true"]),
            ));
            ssh_ms.push(time_ms(
                Command::new("ip")
                    .args(["netns", "exec", &self.ns.name])
                    .args(&argv),
            ));
        }
        (median(banger_ms), median(ssh_ms))
    }
}

/// Runs `cmd`, which must succeed; its wall time in ms.
pub fn time_ms(cmd: &mut Command) -> f64 {
    let t = std::time::Instant::now();
    let o = cmd.output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    t.elapsed().as_secs_f64() * 1000.0
}

/// The middle value of `v` (the upper one of the two for an even count).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Whether the VMM process `vm` (a `vm show --json` object) names is alive: the same pid, start
/// time and command.
pub fn alive(vm: &Value) -> bool {
    let ident = banger::vmm::identity::Identity {
        pid: vm["pid"].as_i64().unwrap_or(0) as i32,
        start_time: vm["start_time"].as_u64().unwrap_or(0),
        comm: vm["comm"].as_str().unwrap_or("").to_string(),
    };
    matches!(
        banger::vmm::identity::classify(&ident, Path::new("/proc")),
        banger::vmm::identity::Liveness::Alive
    )
}

/// Whether process `pid` holds `/dev/net/tun` attached to `tap`: the kernel's fdinfo of a tun
/// descriptor names its interface. Proof that the VMM was given the tap (PUT /network-interfaces)
/// and opened it as Firecracker does.
pub fn vmm_holds_tap(pid: i64, tap: &str) -> bool {
    let dir = format!("/proc/{pid}/fdinfo");
    std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .any(|info| info.lines().any(|l| l == format!("iff:\t{tap}")))
}

/// A [`Bed`] under a short root: Unix socket paths below it (the VMM's, QEMU's QMP socket in the
/// stand-in's TCG engine) must stay under 108 bytes, which `Bed::new`'s long names can exceed.
fn short_bed() -> Bed {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let root = std::env::temp_dir().join(format!(
        "bs{}-{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&root);
    let bin = root.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    for role in ["banger", "bangerd", "bangerd-root", "banger-vsock-agent"] {
        std::os::unix::fs::symlink(BIN, bin.join(role)).unwrap();
    }
    Bed { root, bin }
}

impl Drop for Host {
    fn drop(&mut self) {
        // VMMs are detached on purpose: make sure none outlives the test.
        let vms = self.bed.layout().vms_dir();
        for e in std::fs::read_dir(&vms).into_iter().flatten().flatten() {
            if let Ok(Some(h)) = banger::vmm::identity::read_handles(&e.path().join("handles.json"))
            {
                if let Some(pid) = rustix::process::Pid::from_raw(h.identity.pid) {
                    if matches!(
                        banger::vmm::identity::classify(&h.identity, Path::new("/proc")),
                        banger::vmm::identity::Liveness::Alive
                    ) {
                        let _ = rustix::process::kill_process(pid, rustix::process::Signal::Kill);
                    }
                }
            }
        }
    }
}
