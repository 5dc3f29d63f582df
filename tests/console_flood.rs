//! A guest that floods its serial console cannot fill the host disk (issue 11, finding 2): through
//! the real daemon and root helper (tests/vmhost/mod.rs: temp layout, as root, helper in a network
//! namespace), a VM booting the flooding test guest (tests/guest/tiny_guest_flood.S)
//! under a small `[vm] console_log_max` keeps `console.log` and `console.log.1` under the cap,
//! is rotated, and keeps running.
//!
//! Also, at the VMM API: `PUT /serial`'s rate limiter bounds what the flooding guest gets into its
//! console. And `banger vm logs` / errors show a guest's control sequences escaped (finding 7).
//!
//! Against the stand-in VMM (which runs no guest code, so the flood is the one it produces for the
//! flood kernel, through the rate limiter banger configures), or with `BANGER_TEST_FIRECRACKER` a
//! real Firecracker running the flooding guest itself. The tests here take one lock: a flooding
//! guest keeps a host CPU busy, and on a small machine two at once starve each other's VMMs.

mod common;
#[path = "guest/mod.rs"]
mod guest;
#[path = "vmhost/mod.rs"]
mod vmhost;

use common::vmm::find_vmm;
use common::*;
use guest::READY;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use banger::agent;
use banger::vmm::api::{wait_for_socket, Client};
use banger::vmm::models::{InstanceState, SerialDevice, TokenBucket};
use vmhost::{alive, Host};

/// One VM test of this file at a time (see the module doc).
fn one_at_a_time() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

const CAP: u64 = 64 << 10;
const CONFIG: &str = "[vm]\nconsole_log_max = \"64K\"\nconsole_rate = \"4K\"\n";

fn size(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

#[test]
fn a_flooding_guest_keeps_its_logs_under_the_cap_and_keeps_running() {
    let _one = one_at_a_time();
    let Some(h) = Host::start_with(
        "a_flooding_guest_keeps_its_logs_under_the_cap_and_keeps_running",
        "flood",
        Some(CONFIG),
    ) else {
        return;
    };
    let (bed, standin) = (&h.bed, h.standin);
    let l = bed.layout();
    let ok = |args: &[&str]| h.ok(args);
    let kernel = guest::build_flood_guest(&bed.root).expect("building the flooding guest");
    h.import_console_image("flood", &kernel);
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
                h.daemon_log()
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
        h.daemon_log()
    );
    let vm2 = show();
    assert_eq!(vm2["state"], "running", "{vm2}");
    assert_eq!(vm2["boot_id"], vm["boot_id"], "the VM rebooted");
    assert!(alive(&vm2), "the flooding VM's VMM is gone: {vm2}");
    // What the rotation kept is the guest's flood. Firecracker's serial rate limiter drops
    // single bytes once the bucket is empty, so after a few rotations whole lines rarely survive
    // under a real Firecracker: every byte must still be one the guest writes (the flood line's,
    // or its readiness line's), and there must be plenty of them.
    let kept = std::fs::read(&previous).unwrap();
    let guest_bytes: Vec<u8> = [
        &b"banger-guest: flood 0123456789abcdefghijklmnopqrstuvwxyz\n"[..],
        &b"banger-guest: ready boot_id=0123456789abcdef-\r"[..],
    ]
    .concat();
    let foreign: Vec<u8> = kept
        .iter()
        .copied()
        .filter(|b| !guest_bytes.contains(b))
        .take(16)
        .collect();
    assert!(
        kept.len() >= 256 && foreign.is_empty(),
        "the rotated file ({} bytes) is not the guest's flood: foreign bytes {:?}, start {:?}",
        kept.len(),
        foreign,
        String::from_utf8_lossy(&kept[..kept.len().min(200)])
    );
    assert!(
        h.daemon_log().contains("log rotated"),
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
    let _one = one_at_a_time();
    let Some(h) = Host::start_with(
        "vm_logs_and_errors_show_guest_control_sequences_escaped",
        "escape",
        Some(""),
    ) else {
        return;
    };
    let kernel = guest::build_tiny_guest(&h.bed.root).expect("building the tiny guest");
    h.import_console_image("tiny", &kernel);
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

/// A bare VMM process (no daemon) in a scratch directory, killed on drop.
struct Vmm {
    child: std::process::Child,
    api: Client,
    dir: TempDir,
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Boots the flooding guest with its serial console going to `serial.out` under `limit`; returns
/// the VMM and that file once the readiness line is in it.
fn boot_flood(bin: &Path, limit: Option<TokenBucket>) -> (Vmm, PathBuf) {
    let dir = TempDir::new("flood-vmm");
    let sock = dir.0.join("api.sock");
    let child = std::process::Command::new(bin)
        .arg("--api-sock")
        .arg(&sock)
        .args(["--id", "flood"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {}: {e}", bin.display()));
    wait_for_socket(&sock, Duration::from_secs(10)).unwrap();
    let vmm = Vmm {
        child,
        api: Client::new(&sock).with_timeout(Duration::from_secs(10)),
        dir,
    };
    let kernel = guest::build_flood_guest(&vmm.dir.0).unwrap();
    guest::configure(&vmm.api, &kernel, "console=ttyS0 reboot=k panic=1");
    let out = vmm.dir.0.join("serial.out");
    vmm.api
        .put_serial(&SerialDevice {
            serial_out_path: Some(out.clone()),
            rate_limiter: limit,
        })
        .unwrap();
    vmm.api.instance_start().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read(&out).unwrap_or_default();
        if String::from_utf8_lossy(&text)
            .lines()
            .any(|l| agent::parse_ready_line(l).is_some())
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no readiness line in {} within 30s: {:?}",
            out.display(),
            String::from_utf8_lossy(&text[..text.len().min(300)])
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    (vmm, out)
}

#[test]
fn serial_rate_limiter_bounds_a_flooding_guest() {
    let _one = one_at_a_time();
    let (bin, standin) = match find_vmm() {
        Ok(v) => v,
        Err(why) => {
            eprintln!("SKIP: serial_rate_limiter_bounds_a_flooding_guest: {why}");
            return;
        }
    };
    if standin {
        println!("note: the stand-in runs no guest code: its flood is the one it produces for the flood kernel");
    }
    // 256 bytes per second, bucket of 256, no burst.
    let rate = 256u64;
    // Unlimited first: the flood is real and far above that limit (each byte is a VM exit, so a
    // real Firecracker on a slow, loaded /dev/kvm manages a few KiB/s; the stand-in offers
    // 400 KiB/s).
    let (mut vmm, out) = boot_flood(&bin, None);
    let (t0, n0) = (Instant::now(), size(&out));
    std::thread::sleep(Duration::from_secs(2));
    let unlimited = size(&out) - n0;
    let secs = t0.elapsed().as_secs_f64();
    assert!(
        unlimited as f64 > 4.0 * rate as f64 * secs,
        "the flooding guest wrote only {unlimited} bytes in {secs:.1}s without a limiter"
    );
    println!(
        "unlimited flood: {:.1} KiB/s",
        unlimited as f64 / 1024.0 / secs
    );
    vmm.api.send_ctrl_alt_del().unwrap();
    assert!(
        wait_exit(&mut vmm.child, Duration::from_secs(20)).is_some(),
        "flooding guest did not stop"
    );
    drop(vmm);

    // Limited: after the starting budget, the console grows by at most `rate` per second of wall
    // time (a slower machine only writes less), and the guest keeps running.
    let (mut vmm, out) = boot_flood(
        &bin,
        Some(TokenBucket {
            one_time_burst: None,
            refill_time: 1000,
            size: rate,
        }),
    );
    let (t0, n0) = (Instant::now(), size(&out));
    std::thread::sleep(Duration::from_secs(3));
    let grown = size(&out) - n0;
    let secs = t0.elapsed().as_secs_f64();
    // Whatever was left in the bucket at t0 (at most its size) plus the refill since.
    let bound = rate + (rate as f64 * secs) as u64 + 8;
    assert!(
        grown <= bound,
        "console grew {grown} bytes in {secs:.1}s, above the limiter's {bound}"
    );
    assert!(grown > 0, "the limited guest stopped writing");
    println!("limited flood: {grown} bytes in {secs:.1}s (bound {bound})");
    let text = String::from_utf8_lossy(&std::fs::read(&out).unwrap()).into_owned();
    assert!(
        text.contains("banger-guest: flood 0123"),
        "no flood line in the console"
    );
    assert_eq!(
        vmm.api.instance_info().unwrap().state,
        InstanceState::Running
    );
    // Pre-boot only.
    let e = vmm.api.put_serial(&SerialDevice::default()).unwrap_err();
    assert_eq!(e.status(), Some(400), "{e}");
    assert!(
        e.fault_message()
            .unwrap_or_default()
            .contains("not supported after starting the microVM"),
        "{e}"
    );
    vmm.api.send_ctrl_alt_del().unwrap();
    let st = wait_exit(&mut vmm.child, Duration::from_secs(20))
        .expect("flooding guest still running 20s after SendCtrlAltDel");
    assert!(st.success(), "VMM exited with {st}");
}
