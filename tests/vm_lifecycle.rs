//! VM lifecycle end to end through the real daemon and root helper (under a temp layout, as root),
//! against the stand-in VMM or, with `BANGER_TEST_FIRECRACKER`, a real Firecracker booting the
//! tiny guest. Proves: create → running → stop → start (new boot_id) → restart → delete; VMs
//! survive daemon and helper restarts untouched; a VM that died while the daemon was down is
//! stopped and cleaned; bad specs leave nothing behind; concurrent creates never collide.

mod common;
#[path = "guest/mod.rs"]
mod guest;

use banger::rpc::client::{self, CallError};
use banger::rpc::ErrorCode;
use common::vmm::find_vmm;
use common::*;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::Duration;

const READY: &str = "banger-guest: ready boot_id=";

/// A temp install with both services running and images imported.
struct Host {
    bed: Bed,
    vmm: PathBuf,
    standin: bool,
    daemon: Option<Server>,
    helper: Option<Server>,
}

impl Host {
    fn new(name: &str) -> Option<Host> {
        if !is_root() {
            println!("SKIP: VM lifecycle tests need root (the helper launches VMMs)");
            return None;
        }
        let (vmm, standin) = match find_vmm() {
            Ok(v) => v,
            Err(why) => {
                println!("SKIP: {why}");
                return None;
            }
        };
        let mut h = Host {
            bed: Bed::new(name),
            vmm,
            standin,
            daemon: None,
            helper: None,
        };
        h.start_helper();
        h.start_daemon();
        let kernel = guest::build_tiny_guest(&h.bed.root).expect("building the tiny guest");
        let rootfs = h.bed.root.join("rootfs.img");
        std::fs::write(&rootfs, vec![0u8; 1 << 20]).unwrap();
        h.ok(&["kernel", "import", "tiny", kernel.to_str().unwrap()]);
        let r = rootfs.to_str().unwrap();
        h.ok(&[
            "image",
            "import",
            "tiny",
            "--rootfs",
            r,
            "--kernel",
            "tiny",
            "--ready-console",
            READY,
        ]);
        if standin {
            // The stand-in's "guest" runs banger's agent handler: readiness through vsock.
            h.ok(&[
                "image", "import", "agent", "--rootfs", r, "--kernel", "tiny",
            ]);
        }
        Some(h)
    }

    fn start_helper(&mut self) {
        let sock = self.bed.layout().helper_socket();
        self.helper = Some(self.bed.spawn_with(
            "bangerd-root",
            &sock,
            &[("BANGER_FIRECRACKER", &self.vmm)],
        ));
    }

    fn start_daemon(&mut self) {
        let sock = self.bed.layout().daemon_socket();
        self.daemon = Some(self.bed.spawn("bangerd", &sock));
    }

    fn stop_daemon(&mut self) {
        if let Some(mut d) = self.daemon.take() {
            assert_eq!(d.sigterm_and_wait().code(), Some(0));
        }
    }

    fn stop_helper(&mut self) {
        if let Some(mut h) = self.helper.take() {
            h.sigterm_and_wait();
        }
    }

    fn run(&self, args: &[&str]) -> std::process::Output {
        self.bed.run("banger", args)
    }

    fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(
            o.status.success(),
            "banger {args:?} failed: {}\ndaemon log:\n{}",
            stderr(&o),
            self.daemon
                .as_ref()
                .map(|d| d.log_text())
                .unwrap_or_default()
        );
        stdout(&o)
    }

    fn call(&self, method: &str, params: Value) -> Result<Value, CallError> {
        client::call_with_timeout(
            &self.bed.layout().daemon_socket(),
            method,
            params,
            Duration::from_secs(120),
        )
    }

    fn show(&self, vm: &str) -> Value {
        let v: Value = serde_json::from_str(&self.ok(&["vm", "show", vm, "--json"])).unwrap();
        v["vm"].clone()
    }

    fn list(&self) -> Vec<Value> {
        let v: Value = serde_json::from_str(&self.ok(&["vm", "list", "--json"])).unwrap();
        v.as_array().unwrap().clone()
    }

    fn image(&self) -> &'static str {
        "tiny"
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        // VMMs are detached on purpose: make sure none outlives the test.
        let vms = self.bed.layout().vms_dir();
        for e in std::fs::read_dir(&vms).into_iter().flatten().flatten() {
            if let Ok(Some(h)) = banger::vmm::identity::read_handles(&e.path().join("handles.json"))
            {
                if matches!(
                    banger::vmm::identity::classify(&h.identity, Path::new("/proc")),
                    banger::vmm::identity::Liveness::Alive
                ) {
                    if let Some(pid) = rustix::process::Pid::from_raw(h.identity.pid) {
                        let _ = rustix::process::kill_process(pid, rustix::process::Signal::Kill);
                    }
                }
            }
        }
    }
}

fn alive(vm: &Value) -> bool {
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

#[test]
fn create_stop_start_restart_delete() {
    let Some(h) = Host::new("life") else { return };
    let out = h.ok(&["vm", "create", "--name", "a", "--image", h.image()]);
    assert!(out.contains("a running boot_id="), "{out}");
    let v1 = h.show("a");
    assert_eq!(v1["state"], "running");
    assert!(alive(&v1), "VMM not alive: {v1}");
    let boot1 = v1["boot_id"].as_str().unwrap().to_string();
    // The VMM runs detached: its own session.
    let pid = v1["pid"].as_i64().unwrap() as i32;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    assert_eq!(
        fields[3],
        pid.to_string(),
        "VMM is not a session leader: {stat}"
    );
    // The console carries the ready line with that boot id.
    let logs = h.ok(&["vm", "logs", "a"]);
    assert!(logs.contains(&format!("{READY}{boot1}")), "{logs}");

    h.ok(&["vm", "stop", "a", "--timeout", "5"]);
    let v2 = h.show("a");
    assert_eq!(v2["state"], "stopped");
    assert!(!alive(&v1), "VMM still alive after stop");

    h.ok(&["vm", "start", "a"]);
    let v3 = h.show("a");
    assert_eq!(v3["state"], "running");
    let boot3 = v3["boot_id"].as_str().unwrap().to_string();
    assert_ne!(boot1, boot3, "a new boot must have a new boot_id");

    h.ok(&["vm", "restart", "a"]);
    let v4 = h.show("a");
    assert_ne!(v4["boot_id"].as_str().unwrap(), boot3);
    assert!(alive(&v4));

    // Operations were recorded with stages and finished.
    let ops = h.call("daemon.operations.list", json!({})).unwrap();
    let kinds: Vec<&str> = ops["operations"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|o| o["kind"].as_str())
        .collect();
    assert!(
        kinds.contains(&"vm.create") && kinds.contains(&"vm.start"),
        "{kinds:?}"
    );
    assert!(
        ops["operations"]
            .as_array()
            .unwrap()
            .iter()
            .all(|o| o["done"] == true),
        "{ops}"
    );

    h.ok(&["vm", "delete", "a"]);
    assert!(!alive(&v4));
    assert!(h.list().is_empty());
    assert!(std::fs::read_dir(h.bed.layout().vms_dir())
        .unwrap()
        .next()
        .is_none());
    let o = h.run(&["vm", "show", "a"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("no VM named `a`"), "{}", stderr(&o));
}

#[test]
fn agent_readiness_reports_guest_boot_id() {
    let Some(h) = Host::new("agent") else { return };
    if !h.standin {
        println!("SKIP: agent readiness needs a guest with the agent (the tiny guest has none)");
        return;
    }
    h.ok(&["vm", "create", "--name", "ag", "--image", "agent"]);
    let v = h.show("ag");
    let boot = v["boot_id"].as_str().unwrap();
    // The agent's answer matches what the guest printed on its console.
    let logs = h.ok(&["vm", "logs", "ag"]);
    assert!(logs.contains(&format!("{READY}{boot}")), "{logs}");
    h.ok(&["vm", "delete", "ag"]);
}

#[test]
fn vms_survive_daemon_and_helper_restarts() {
    let Some(mut h) = Host::new("survive") else {
        return;
    };
    h.ok(&["vm", "create", "--name", "s", "--image", h.image()]);
    let before = h.show("s");
    for round in 0..3 {
        h.stop_helper();
        h.start_helper();
        h.stop_daemon();
        assert!(
            alive(&before),
            "round {round}: VM died while the daemon was down"
        );
        h.start_daemon();
        let after = h.show("s");
        assert_eq!(after["state"], "running", "round {round}: {after}");
        for k in ["pid", "start_time", "comm", "boot_id"] {
            assert_eq!(before[k], after[k], "round {round}: {k} changed");
        }
    }
    // And the re-adopted VM still stops normally.
    h.ok(&["vm", "stop", "s"]);
    assert!(!alive(&before));
}

#[test]
fn vm_that_died_while_daemon_was_down_is_stopped_and_cleaned() {
    let Some(mut h) = Host::new("died") else {
        return;
    };
    h.ok(&["vm", "create", "--name", "d", "--image", h.image()]);
    let v = h.show("d");
    h.stop_daemon();
    let pid = rustix::process::Pid::from_raw(v["pid"].as_i64().unwrap() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::Kill).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while alive(&v) {
        assert!(std::time::Instant::now() < deadline, "VMM did not die");
        std::thread::sleep(Duration::from_millis(10));
    }
    h.start_daemon();
    let after = h.show("d");
    assert_eq!(after["state"], "stopped", "{after}");
    assert!(after["pid"].is_null());
    let dir = h.bed.layout().vm_dir(after["id"].as_str().unwrap());
    assert!(!dir.join("fc.sock").exists(), "API socket not cleaned");
    // It starts again like any stopped VM.
    h.ok(&["vm", "start", "d"]);
    h.ok(&["vm", "delete", "d"]);
}

#[test]
fn invalid_specs_are_rejected_and_leave_nothing() {
    let Some(h) = Host::new("invalid") else {
        return;
    };
    for args in [
        vec!["vm", "create", "--vcpu", "0"],
        vec!["vm", "create", "--memory", "0"],
        vec!["vm", "create", "--memory", "8"],
        vec!["vm", "create", "--vcpu", "33"],
        vec!["vm", "create", "--name", "Bad_Name"],
        vec!["vm", "create", "--name", "-x"],
    ] {
        let o = h.run(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).starts_with("banger: "), "{}", stderr(&o));
    }
    // The daemon checks again, whatever a client sends.
    for params in [
        json!({"name": "ok", "vcpu": 0}),
        json!({"name": "ok", "memory_mib": 0}),
        json!({"name": "UPPER"}),
        json!({"name": "a".repeat(64)}),
        json!({"name": "ok", "vcpu": "two"}),
        json!({"name": "ok", "cmd": "x"}),
        json!({"name": "ok", "image": "nope"}),
    ] {
        match h.call("vm.create", params.clone()) {
            Err(CallError::Rpc(e)) => assert!(
                matches!(e.code, ErrorCode::BadRequest | ErrorCode::NotFound),
                "{params}: {e:?}"
            ),
            other => panic!("{params}: {other:?}"),
        }
    }
    assert!(h.list().is_empty(), "a rejected create left a row");
    // A kernel that is not an ELF image is refused at import, not at boot.
    let not_elf = h.bed.root.join("bzImage");
    std::fs::write(&not_elf, b"MZ not an elf").unwrap();
    let o = h.run(&["kernel", "import", "bz", not_elf.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("not an ELF kernel image"),
        "{}",
        stderr(&o)
    );
    assert!(!h.bed.layout().kernels_dir().join("bz").exists());
    assert!(std::fs::read_dir(h.bed.layout().vms_dir())
        .unwrap()
        .next()
        .is_none());
    // A taken name is refused and the first VM is untouched.
    h.ok(&[
        "vm",
        "create",
        "--name",
        "one",
        "--image",
        h.image(),
        "--no-start",
    ]);
    match h.call("vm.create", json!({"name": "one", "image": h.image()})) {
        Err(CallError::Rpc(e)) => assert_eq!(e.code, ErrorCode::AlreadyExists),
        other => panic!("{other:?}"),
    }
    assert_eq!(h.list().len(), 1);
    h.ok(&["vm", "delete", "one"]);
}

#[test]
fn concurrent_creates_never_collide() {
    let Some(h) = Host::new("conc") else { return };
    let sock = h.bed.layout().daemon_socket();
    let image = h.image();
    let threads: Vec<_> = (0..8)
        .map(|i| {
            let sock = sock.clone();
            std::thread::spawn(move || {
                let params = if i % 2 == 0 {
                    json!({"name": format!("c{i}"), "image": image})
                } else {
                    json!({"image": image})
                };
                client::call_with_timeout(&sock, "vm.create", params, Duration::from_secs(120))
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap().expect("concurrent create");
    }
    let vms = h.list();
    assert_eq!(vms.len(), 8);
    let mut names: Vec<&str> = vms.iter().map(|v| v["name"].as_str().unwrap()).collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), 8);
    let mut pids: Vec<i64> = vms.iter().map(|v| v["pid"].as_i64().unwrap()).collect();
    pids.sort();
    pids.dedup();
    assert_eq!(pids.len(), 8);
    assert!(vms.iter().all(|v| v["state"] == "running" && alive(v)));
    let mut args = vec!["vm", "delete"];
    args.extend(names.iter());
    h.ok(&args);
    assert!(h.list().is_empty());
}
