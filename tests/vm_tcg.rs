//! The SSH story on a real Linux guest: the stand-in VMM's TCG engine boots the built kernel and a
//! root image made by `banger image build` (systemd, sshd, the agent) under QEMU, on the real tap
//! and bridge the helper made in the test's network namespace. Through the real daemon and CLI:
//! `vm run --rm -- sh -c 'exit 7'` exits 7 and leaves no VM; `vm exec` passes stdin through, keeps
//! stdout and stderr apart and returns the status; `vm ports` shows a listener started in the
//! guest; plain `ssh NAME.vm` works through `ssh-config --install`; the same guest (same boot_id)
//! answers SSH after both services restart; a swapped pin is refused with ssh's MITM message.
//! Prints the `vm run --rm -- true` split (create, boot, first SSH, delete) and `vm exec` against
//! plain ssh (median of 20).
//!
//! Needs root, qemu-system-x86_64, the kernel (`BANGER_TEST_KERNEL`, else the newest
//! `/var/tmp/banger-cache/kernel/*/vmlinux`) and the image (`BANGER_TEST_ROOTFS`); SKIPs otherwise.

mod common;
#[path = "guest/mod.rs"]
mod guest;
#[path = "vmhost/mod.rs"]
mod vmhost;

use common::*;
use serde_json::Value;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Instant;
use vmhost::Host;

const TEST: &str = "vm_tcg";

fn kernel() -> Option<PathBuf> {
    if let Some(k) = std::env::var_os("BANGER_TEST_KERNEL") {
        return Some(PathBuf::from(k)).filter(|p| p.is_file());
    }
    std::fs::read_dir("/var/tmp/banger-cache/kernel")
        .ok()?
        .flatten()
        .map(|e| e.path().join("vmlinux"))
        .filter(|p| p.is_file())
        .max_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

#[test]
fn ssh_into_a_real_guest() {
    if !have("qemu-system-x86_64", "--version") {
        eprintln!("SKIP: {TEST}: qemu-system-x86_64 is not installed (scripts/deps.sh --smoke)");
        return;
    }
    let Some(kernel) = kernel() else {
        eprintln!("SKIP: {TEST}: no kernel (BANGER_TEST_KERNEL, or packaging/kernel/build.sh)");
        return;
    };
    let Some(rootfs) = std::env::var_os("BANGER_TEST_ROOTFS").map(PathBuf::from) else {
        eprintln!(
            "SKIP: {TEST}: BANGER_TEST_ROOTFS is not set (an image from `banger image build`)"
        );
        return;
    };
    // An emulated guest on a shared 2-core machine boots in tens of seconds, sometimes more.
    std::env::set_var(banger::daemon::boot::READY_TIMEOUT_ENV, "300");
    let Some(mut h) = Host::start(TEST, "tcg") else {
        return;
    };
    if !h.standin {
        eprintln!(
            "SKIP: {TEST}: BANGER_TEST_FIRECRACKER is a real Firecracker (no KVM guest here)"
        );
        return;
    }
    h.ok(&["kernel", "import", "linux", kernel.to_str().unwrap()]);
    h.ok(&[
        "image",
        "import",
        "deb",
        "--rootfs",
        rootfs.to_str().unwrap(),
        "--kernel",
        "linux",
    ]);
    assert!(h.ns.ip(&["link", "set", "lo", "up"]).status.success());

    // vm_run_command: the command's status, no VM left.
    let t = Instant::now();
    let o = h.run_in_ns(&[
        "vm", "run", "--rm", "--name", "once", "--", "sh", "-c", "exit 7",
    ]);
    let run_ms = ms(t);
    assert_eq!(o.status.code(), Some(7), "{}", stderr(&o));
    assert_eq!(h.vm_count(), 0);

    // A VM to work with.
    h.ok(&["vm", "run", "-d", "--name", "dev"]);
    let vm = h.show("dev");
    let key_line = h.known_hosts();
    if key_line.contains("AAAAC3NzaC1lZDI1NTE5AAAAIGposxU1u8AlmBpcq3yn+btS1uQymLutYq90E6gMTcpH") {
        eprintln!("SKIP: {TEST}: the stand-in pretended (no TCG engine in this stand-in)");
        return;
    }
    let boot_id = vm["boot_id"].as_str().unwrap().to_string();

    // vm_exec_io: stdin in, stdout and stderr apart, the status out.
    let mut child = h
        .cmd_in_ns(&[
            "vm",
            "exec",
            "dev",
            "--",
            "sh",
            "-c",
            "tr a-z A-Z; echo oops >&2; exit 3",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(b"hello\n").unwrap();
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
    assert_eq!(stdout(&o), "HELLO\n");
    assert_eq!(stderr(&o), "oops\n");

    // The guest's boot id over SSH is the one its agent reported.
    let o = h.run_in_ns(&[
        "vm",
        "exec",
        "dev",
        "--",
        "cat",
        "/proc/sys/kernel/random/boot_id",
    ]);
    assert_eq!(stdout(&o).trim(), boot_id);

    // vm_ports: a listener started in the guest shows up (a second sshd on 2222).
    let o = h.run_in_ns(&["vm", "exec", "dev", "--", "/usr/sbin/sshd", "-p", "2222"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: Value = serde_json::from_str(&h.ok(&["vm", "ports", "dev", "--json"])).unwrap();
    let endpoints: Vec<&str> = v["ports"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["endpoint"].as_str())
        .collect();
    assert!(endpoints.contains(&"dev.vm:2222"), "{v}");
    assert!(endpoints.contains(&"dev.vm:22"), "{v}");

    // ssh_config_install: plain ssh through the Include.
    let o = h.ssh_through_user_config("/home/tcguser", &["dev.vm", "true"]);
    assert!(o.status.success(), "{}", stderr(&o));

    // The same guest answers SSH after both services restart.
    h.restart_services();
    let o = h.run_in_ns(&[
        "vm",
        "exec",
        "dev",
        "--",
        "cat",
        "/proc/sys/kernel/random/boot_id",
    ]);
    assert_eq!(stdout(&o).trim(), boot_id, "{}", stderr(&o));

    // Numbers: vm exec against plain ssh with the same options (median of 20).
    let (b, s) = h.exec_vs_ssh_ms("dev", vm["ip"].as_str().unwrap());
    eprintln!("TCG-BENCH vm exec dev -- true: {b:.0} ms; plain ssh, same options: {s:.0} ms (median of 20)");

    // vm_ssh_pinned: another key in the pin is refused with ssh's MITM message.
    let l = h.bed.layout();
    let pinned_blob = key_line.split_whitespace().nth(2).unwrap();
    let other = banger::ssh::PublicKey::from_bytes([5; 32]).to_openssh();
    let other_blob = other.split_whitespace().nth(1).unwrap();
    std::fs::write(
        l.ssh_known_hosts(),
        key_line.replace(pinned_blob, other_blob),
    )
    .unwrap();
    let o = h.run_in_ns(&["vm", "exec", "dev", "--", "true"]);
    assert_eq!(o.status.code(), Some(255));
    assert!(
        stderr(&o).contains("REMOTE HOST IDENTIFICATION HAS CHANGED"),
        "{}",
        stderr(&o)
    );
    h.ok(&["vm", "delete", "dev"]);

    // The `vm run --rm -- true` split: create (record + disk), boot (to the agent's hello and the
    // pin), first SSH (sshd answering included), delete.
    let t = Instant::now();
    h.ok(&["vm", "create", "--name", "split", "--no-start"]);
    let create = ms(t);
    let t = Instant::now();
    h.ok(&["vm", "start", "split"]);
    let boot = ms(t);
    let t = Instant::now();
    let ip = h.show("split")["ip"].as_str().unwrap().to_string();
    loop {
        let o = h.run_in_ns(&["vm", "exec", "split", "--", "true"]);
        if o.status.success() {
            break;
        }
        assert!(
            t.elapsed().as_secs() < 120,
            "no SSH to {ip}: {}",
            stderr(&o)
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let first_ssh = ms(t);
    let t = Instant::now();
    h.ok(&["vm", "delete", "split"]);
    let delete = ms(t);
    eprintln!(
        "TCG-BENCH vm run --rm -- sh -c 'exit 7': {run_ms:.0} ms end to end; split: create {create:.0} ms, boot {boot:.0} ms, first SSH {first_ssh:.0} ms, delete {delete:.0} ms"
    );
}
