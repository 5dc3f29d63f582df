//! A temp banger install for the SSH tests: the root helper in a network namespace of the test's
//! own (its VMMs, taps and guests with it), the daemon outside, the stand-in VMM; the CLI runs
//! inside the namespace whenever it connects to a guest address, so no packet reaches the
//! machine's own network. VMMs left running are killed on drop.
#![allow(dead_code)]

use crate::common::vmm::find_vmm;
use crate::common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub struct Host {
    pub bed: Bed,
    pub vmm: PathBuf,
    pub standin: bool,
    pub daemon: Option<Server>,
    pub helper: Option<Server>,
    /// Dropped last: its interfaces go with it.
    pub ns: NetNs,
}

impl Host {
    /// Both services running, nothing imported; `None` after printing the SKIP line for `test`.
    pub fn start(test: &str, tag: &str) -> Option<Host> {
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
            bed: short_bed(),
            vmm,
            standin,
            daemon: None,
            helper: None,
            ns,
        };
        h.start_helper();
        h.start_daemon();
        Some(h)
    }

    pub fn start_helper(&mut self) {
        let sock = self.bed.layout().helper_socket();
        self.helper = Some(self.bed.spawn_in(
            Some(&self.ns),
            "bangerd-root",
            &sock,
            &[("BANGER_FIRECRACKER", &self.vmm)],
        ));
    }

    pub fn start_daemon(&mut self) {
        let sock = self.bed.layout().daemon_socket();
        self.daemon = Some(self.bed.spawn("bangerd", &sock));
    }

    /// SIGTERM both services (daemon first) and start them again (helper first).
    pub fn restart_services(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            d.sigterm_and_wait();
        }
        if let Some(mut h) = self.helper.take() {
            h.sigterm_and_wait();
        }
        self.start_helper();
        self.start_daemon();
    }

    /// The CLI inside the test's network namespace (anything that connects to a guest address).
    pub fn cmd_in_ns(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns.name])
            .arg(self.bed.bin.join("banger"))
            .args(args)
            .env("BANGER_ROOT", &self.bed.root);
        c
    }

    pub fn run_in_ns(&self, args: &[&str]) -> Output {
        self.cmd_in_ns(args).output().unwrap()
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.bed.run("banger", args)
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(
            o.status.success(),
            "banger {args:?} failed: {}\ndaemon log:\n{}",
            stderr(&o),
            std::fs::read_to_string(self.bed.root.join("bangerd.log")).unwrap_or_default()
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
