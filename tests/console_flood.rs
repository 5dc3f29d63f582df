//! A guest that floods its serial console cannot fill the host disk (issue 11, finding 2): through
//! the real daemon and root helper (temp layout, as root, helper in a network namespace, as in
//! tests/vm_lifecycle.rs), a VM booting the flooding test guest (tests/guest/tiny_guest_flood.S)
//! under a small `[vm] console_log_max` keeps `console.log` and `console.log.1` under the cap,
//! is rotated, and keeps running.
//!
//! Against the stand-in VMM (which runs no guest code, so the flood is the one it produces for the
//! flood kernel, through the rate limiter banger configures), or with `BANGER_TEST_FIRECRACKER` a
//! real Firecracker running the flooding guest itself.

mod common;
#[path = "guest/mod.rs"]
mod guest;

use common::vmm::find_vmm;
use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

const READY: &str = "banger-guest: ready boot_id=";
const CAP: u64 = 64 << 10;
const CONFIG: &str = "[vm]\nconsole_log_max = \"64K\"\nconsole_rate = \"4K\"\n";

fn size(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
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

struct Killer(PathBuf);

impl Drop for Killer {
    fn drop(&mut self) {
        // VMMs are detached on purpose: make sure none outlives the test.
        for e in std::fs::read_dir(&self.0).into_iter().flatten().flatten() {
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

/// The daemon and helper of one test, under a temp layout with `config`.
struct Host {
    bed: Bed,
    daemon: Server,
    _helper: Server,
    _killer: Killer,
    standin: bool,
    /// Dropped last: its interfaces go with it.
    _ns: NetNs,
}

impl Host {
    fn new(test: &str, tag: &str, config: &str) -> Option<Host> {
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
                eprintln!("SKIP: {test}: no network namespace: {why}");
                return None;
            }
        };
        let bed = Bed::new(tag);
        let l = bed.layout();
        std::fs::create_dir_all(l.etc_dir()).unwrap();
        std::fs::write(l.config_toml(), config).unwrap();
        let helper = bed.spawn_in(
            Some(&ns),
            "bangerd-root",
            &l.helper_socket(),
            &[("BANGER_FIRECRACKER", &vmm)],
        );
        let daemon = bed.spawn("bangerd", &l.daemon_socket());
        Some(Host {
            _killer: Killer(l.vms_dir()),
            bed,
            daemon,
            _helper: helper,
            standin,
            _ns: ns,
        })
    }

    fn ok(&self, args: &[&str]) -> String {
        let o = self.bed.run("banger", args);
        assert!(
            o.status.success(),
            "banger {args:?} failed: {}\ndaemon log:\n{}",
            stderr(&o),
            self.daemon.log_text()
        );
        stdout(&o)
    }

    /// Imports `kernel` and an image `name` booting it with console readiness.
    fn import(&self, name: &str, kernel: &Path) {
        let rootfs = self.bed.root.join("rootfs.img");
        std::fs::write(&rootfs, vec![0u8; 1 << 20]).unwrap();
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
            READY,
        ]);
    }

    fn show(&self, vm: &str) -> Value {
        let v: Value = serde_json::from_str(&self.ok(&["vm", "show", vm, "--json"])).unwrap();
        v["vm"].clone()
    }
}

#[test]
fn a_flooding_guest_keeps_its_logs_under_the_cap_and_keeps_running() {
    let Some(h) = Host::new(
        "a_flooding_guest_keeps_its_logs_under_the_cap_and_keeps_running",
        "flood",
        CONFIG,
    ) else {
        return;
    };
    let (bed, daemon, standin) = (&h.bed, &h.daemon, h.standin);
    let l = bed.layout();
    let ok = |args: &[&str]| h.ok(args);
    let kernel = guest::build_flood_guest(&bed.root).expect("building the flooding guest");
    h.import("flood", &kernel);
    let out = ok(&["vm", "create", "--name", "f", "--image", "flood"]);
    assert!(out.contains("f running boot_id="), "{out}");
    let show = || h.show("f");
    let vm = show();
    let dir = l.vm_dir(vm["id"].as_str().unwrap());
    let (console, previous) = (dir.join("console.log"), dir.join("console.log.1"));
    let (vmm_log, vmm_log_prev) = (dir.join("firecracker.log"), dir.join("firecracker.log.1"));

    // Watch: both files stay under the cap at every look; a rotation happens; then a second one
    // (the .1 replaced, not accumulated).
    let start = Instant::now();
    let (mut max_seen, mut rotations, mut last_prev) = (0u64, 0, None::<Vec<u8>>);
    while start.elapsed() < Duration::from_secs(60) && rotations < 2 {
        for p in [&console, &previous, &vmm_log, &vmm_log_prev] {
            let n = size(p);
            max_seen = max_seen.max(n);
            assert!(
                n <= CAP,
                "{} is {n} bytes, over the {CAP}-byte cap\ndaemon log:\n{}",
                p.display(),
                daemon.log_text()
            );
        }
        let prev = std::fs::read(&previous).ok();
        if prev.is_some() && prev != last_prev {
            rotations += 1;
            last_prev = prev;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        rotations >= 2,
        "console.log was rotated {rotations} times in 60s (largest file seen {max_seen} bytes)\ndaemon log:\n{}",
        daemon.log_text()
    );
    let vm2 = show();
    assert_eq!(vm2["state"], "running", "{vm2}");
    assert_eq!(vm2["boot_id"], vm["boot_id"], "the VM rebooted");
    assert!(alive(&vm2), "the flooding VM's VMM is gone: {vm2}");
    let flood = String::from_utf8_lossy(&std::fs::read(&previous).unwrap()).into_owned();
    assert!(
        flood.contains("banger-guest: flood 0123"),
        "the rotated file holds no flood: {:?}",
        &flood[..flood.len().min(200)]
    );
    assert!(
        daemon.log_text().contains("log rotated"),
        "the daemon did not log its rotations"
    );
    println!(
        "{}: largest file seen {max_seen} bytes (cap {CAP}), {rotations} rotations in {:.1}s",
        if standin { "stand-in" } else { "firecracker" },
        start.elapsed().as_secs_f64()
    );
    // It still stops like any guest.
    ok(&["vm", "stop", "f", "--timeout", "10"]);
    assert_eq!(show()["state"], "stopped");
    assert!(!alive(&vm2), "VMM still alive after stop");
}

#[test]
fn vm_logs_and_errors_show_guest_control_sequences_escaped() {
    let Some(h) = Host::new(
        "vm_logs_and_errors_show_guest_control_sequences_escaped",
        "escape",
        "",
    ) else {
        return;
    };
    let kernel = guest::build_tiny_guest(&h.bed.root).expect("building the tiny guest");
    h.import("tiny", &kernel);
    h.ok(&["vm", "create", "--name", "e", "--image", "tiny"]);
    let vm = h.show("e");
    // What a hostile guest writes on its console: a window-title OSC, a clipboard write, a
    // screen clear and a cursor move, a bell, a lone CR, a C1 CSI; and colour, which is kept.
    let evil = "\x1b]0;pwned\x07\x1b]52;c;cGFzdGU=\x1b\\\x1b[2J\x1b[1;1Hding\x07 hidden\rshown \u{9b}31m \x1b[32mgreen\x1b[0m\r\n";
    let console = h
        .bed
        .layout()
        .vm_dir(vm["id"].as_str().unwrap())
        .join("console.log");
    std::fs::OpenOptions::new()
        .append(true)
        .open(&console)
        .and_then(|mut f| std::io::Write::write_all(&mut f, evil.as_bytes()))
        .unwrap();
    let out = h.ok(&["vm", "logs", "e"]);
    for want in [
        "\\x1b]0;pwned\\x07",
        "\\x1b]52;c;cGFzdGU=\\x1b\\",
        "\\x1b[2J\\x1b[1;1Hding\\x07",
        "hidden\\x0dshown",
        "\\u{009b}31m",
        "\x1b[32mgreen\x1b[0m\r\n",
        READY,
    ] {
        assert!(out.contains(want), "vm logs lacks {want:?}: {out:?}");
    }
    let bare_esc = out
        .match_indices('\x1b')
        .filter(|(i, _)| !out[*i..].starts_with("\x1b[32m") && !out[*i..].starts_with("\x1b[0m"))
        .count();
    assert_eq!(
        bare_esc, 0,
        "an escape sequence other than colour reached stdout: {out:?}"
    );
    assert!(!out.contains('\x07') && !out.contains('\u{9b}'), "{out:?}");
    // --raw passes the bytes through.
    let raw = h.ok(&["vm", "logs", "e", "--raw"]);
    assert!(raw.contains(evil), "--raw changed the console: {raw:?}");
    // An error carrying daemon-echoed text shows it escaped too.
    let o: Output = h.bed.run("banger", &["vm", "show", "\x1b]0;pwned\x07"]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.contains("\\x1b]0;pwned\\x07"), "{err:?}");
    assert!(!err.contains('\x1b') && !err.contains('\x07'), "{err:?}");
    h.ok(&["vm", "stop", "e", "--timeout", "10"]);
}
