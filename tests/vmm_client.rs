//! banger's Firecracker client against a VMM process: the stand-in by default, or a real
//! Firecracker when `BANGER_TEST_FIRECRACKER=/path/to/firecracker` is set (then the tiny guest built
//! from tests/guest/ is what boots). The same assertions run against both; only the vsock agent
//! part needs the stand-in, whose "guest" runs banger's agent handler (the tiny guest has none).

mod common;
#[path = "guest/mod.rs"]
mod guest;

use common::vmm::find_vmm;
use common::wait_exit;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use banger::agent::{self, AGENT_VSOCK_PORT};
use banger::error::Error;
use banger::vmm::api::{wait_for_socket, ApiError, Client};
use banger::vmm::models::{
    BootSource, Drive, InstanceState, Logger, MachineConfiguration, Metrics, Vsock,
};
use serde_json::json;

const ENV: &str = "BANGER_TEST_FIRECRACKER";

/// A scratch directory removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        static N: AtomicUsize = AtomicUsize::new(0);
        let d = std::env::temp_dir().join(format!(
            "bvt-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Scratch(d)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

macro_rules! vmm_or_skip {
    () => {
        match find_vmm() {
            Ok(v) => v,
            Err(why) => {
                println!("SKIP: {why}");
                return;
            }
        }
    };
}

/// A running VMM process with its API client and console.
struct Vmm {
    child: Child,
    api: Client,
    console: Receiver<String>,
    standin: bool,
    dir: Scratch,
}

impl Vmm {
    fn spawn(bin: &Path, standin: bool) -> Vmm {
        let dir = Scratch::new("vmm");
        let sock = dir.0.join("api.sock");
        let mut child = Command::new(bin)
            .arg("--api-sock")
            .arg(&sock)
            .args(["--id", "banger-test"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {}: {e}", bin.display()));
        let stdout = child.stdout.take().unwrap();
        let (tx, console) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).split(b'\n') {
                let Ok(line) = line else { return };
                if tx
                    .send(String::from_utf8_lossy(&line).into_owned())
                    .is_err()
                {
                    return;
                }
            }
        });
        wait_for_socket(&sock, Duration::from_secs(10)).unwrap();
        Vmm {
            child,
            api: Client::new(&sock).with_timeout(Duration::from_secs(10)),
            console,
            standin,
            dir,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.0.join(name)
    }

    /// Reads console lines until the readiness line; returns the boot id.
    fn wait_ready(&self, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.console.recv_timeout(left) {
                Ok(line) => {
                    if let Some(id) = agent::parse_ready_line(&line) {
                        return id;
                    }
                    seen.push(line);
                }
                Err(_) => break,
            }
        }
        panic!("no readiness line on the console within {timeout:?}; saw: {seen:#?}");
    }

    fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        wait_exit(&mut self.child, timeout)
    }

    fn signal(&self, sig: rustix::process::Signal) {
        let pid = rustix::process::Pid::from_child(&self.child);
        rustix::process::kill_process(pid, sig).unwrap();
    }

    /// The configuration every test boots: the tiny guest, console on ttyS0, 1 vCPU, 128 MiB.
    fn configure(&self, kernel: &Path) {
        guest::configure(
            &self.api,
            kernel,
            "console=ttyS0 reboot=k panic=1 banger.name=vmc",
        );
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Asserts `r` is a 400 fault whose message contains `want`, and that banger's error carries the
/// fault message verbatim.
fn assert_fault(r: Result<(), ApiError>, want: &str) -> String {
    let e = r.expect_err(want);
    assert_eq!(e.status(), Some(400), "{e}");
    let msg = e.fault_message().unwrap().to_string();
    assert!(msg.contains(want), "fault {msg:?} lacks {want:?}");
    let rendered = Error::from(e).to_string();
    assert!(rendered.contains(&msg), "{rendered:?} lacks {msg:?}");
    msg
}

fn tiny_guest(dir: &Scratch) -> PathBuf {
    guest::build_tiny_guest(&dir.0).unwrap()
}

#[test]
fn tiny_guest_is_a_loadable_elf() {
    let d = Scratch::new("guest");
    let elf = match guest::build_tiny_guest(&d.0) {
        Ok(p) => p,
        Err(e) if e.why.contains("No such file") => {
            println!("SKIP: binutils missing: {e}");
            return;
        }
        Err(e) => panic!("{e}"),
    };
    let bytes = std::fs::read(&elf).unwrap();
    assert_eq!(&bytes[..4], b"\x7fELF");
    assert_eq!(guest::check_loadable_elf(&bytes), Ok(guest::HIMEM_START));
    assert!(bytes
        .windows(agent::READY_PREFIX.len())
        .any(|w| w == agent::READY_PREFIX.as_bytes()));
    // The checker itself refuses what Firecracker refuses.
    assert!(guest::check_loadable_elf(b"#!/bin/sh\n").is_err());
    let mut low = bytes.clone();
    let phoff = u64::from_le_bytes(low[32..40].try_into().unwrap()) as usize;
    low[phoff + 24..phoff + 32].copy_from_slice(&0x1000u64.to_le_bytes());
    assert!(guest::check_loadable_elf(&low)
        .unwrap_err()
        .contains("below"));
}

#[test]
fn boots_reports_running_answers_agent_and_shuts_down() {
    let (bin, standin) = vmm_or_skip!();
    let vmm = Vmm::spawn(&bin, standin);
    let mut vmm = vmm;
    let kernel = tiny_guest(&vmm.dir);

    let info = vmm.api.instance_info().unwrap();
    assert_eq!(info.state, InstanceState::NotStarted);
    assert_eq!(info.id, "banger-test");
    assert_eq!(info.app_name, "Firecracker");
    assert!(!vmm.api.version().unwrap().firecracker_version.is_empty());

    vmm.configure(&kernel);
    let disk = vmm.path("scratch.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    vmm.api
        .put_drive(&Drive {
            drive_id: "scratch".into(),
            partuuid: None,
            is_root_device: false,
            cache_type: None,
            is_read_only: Some(true),
            path_on_host: Some(disk),
            rate_limiter: None,
            io_engine: None,
            socket: None,
        })
        .unwrap();
    let vsock = vmm.path("v.sock");
    vmm.api
        .put_vsock(&Vsock {
            guest_cid: 3,
            uds_path: vsock.clone(),
            vsock_id: None,
        })
        .unwrap();
    let (log, metrics) = (vmm.path("fc.log"), vmm.path("fc.metrics"));
    std::fs::write(&log, b"").unwrap();
    std::fs::write(&metrics, b"").unwrap();
    vmm.api
        .put_logger(&Logger {
            log_path: Some(log),
            ..Logger::default()
        })
        .unwrap();
    vmm.api
        .put_metrics(&Metrics {
            metrics_path: metrics,
        })
        .unwrap();

    vmm.api.instance_start().unwrap();
    let boot_id = vmm.wait_ready(Duration::from_secs(20));
    assert_eq!(
        vmm.api.instance_info().unwrap().state,
        InstanceState::Running
    );
    vmm.api.flush_metrics().unwrap();

    if vmm.standin {
        let r = agent::agent_call(&vsock, AGENT_VSOCK_PORT, "health").unwrap();
        assert_eq!(r, json!({"status": "ok"}));
        let r = agent::agent_call(&vsock, AGENT_VSOCK_PORT, "boot_id").unwrap();
        assert_eq!(r["boot_id"], boot_id, "agent and console disagree");
        let r = agent::agent_call(&vsock, AGENT_VSOCK_PORT, "uname").unwrap();
        assert_eq!(r["sysname"], "Linux");
        // hello: the same boot id, the stand-in's fixed host key, the boot args' banger.name.
        let h = agent::call_hello(&vsock, AGENT_VSOCK_PORT).unwrap();
        assert_eq!(h.protocol, agent::PROTOCOL_VERSION);
        assert_eq!(h.boot_id, boot_id, "hello and console disagree");
        assert!(h.host_key.starts_with("ssh-ed25519 AAAA"), "{}", h.host_key);
        assert_eq!(h.hostname, "vmc");
        let r = agent::agent_call(&vsock, AGENT_VSOCK_PORT, "ports").unwrap();
        assert_eq!(r, json!({"ports": []}));
        let e = agent::agent_call(&vsock, AGENT_VSOCK_PORT, "reboot").unwrap_err();
        assert!(e.why.contains("unknown method"), "{e}");
        let e = agent::agent_call(&vsock, 1234, "health").unwrap_err();
        assert!(e.why.contains("handshake"), "{e}");
    } else {
        println!("note: the tiny guest has no agent; vsock calls checked only with the stand-in");
    }

    vmm.api.send_ctrl_alt_del().unwrap();
    let st = vmm
        .wait_exit(Duration::from_secs(10))
        .expect("VMM still running 10s after SendCtrlAltDel");
    assert!(st.success(), "VMM exited with {st} after SendCtrlAltDel");
    if vmm.standin {
        assert!(!vmm.api.socket().exists(), "stand-in left its API socket");
    }
}

#[test]
fn spec_rejections_surface_fault_message() {
    let (bin, standin) = vmm_or_skip!();
    let mut vmm = Vmm::spawn(&bin, standin);
    let kernel = tiny_guest(&vmm.dir);
    let api = &vmm.api;
    // Firecracker logs to stdout (the console) until told otherwise, and its lines can land in
    // the middle of the guest's: send them to a file, as banger does with --log-path.
    let log = vmm.path("firecracker.log");
    std::fs::write(&log, b"").unwrap();
    api.put_logger(&Logger {
        log_path: Some(log),
        ..Logger::default()
    })
    .unwrap();

    assert_fault(
        api.put_json("/boot-source", &json!({"boot_args": "console=ttyS0"})),
        "missing field `kernel_image_path`",
    );
    assert_fault(
        api.put_json("/boot-source", &json!({"kernel_image_path": 1})),
        "invalid type",
    );
    assert_fault(
        api.put_json(
            "/boot-source",
            &json!({"kernel_image_path": kernel, "kernel": "x"}),
        ),
        "unknown field `kernel`",
    );
    assert_fault(
        api.put_boot_source(&BootSource {
            kernel_image_path: vmm.path("no-such-kernel"),
            boot_args: None,
            initrd_path: None,
        }),
        "kernel file cannot be opened",
    );
    assert_fault(
        api.put_json(
            "/machine-config",
            &json!({"vcpu_count": 0, "mem_size_mib": 128}),
        ),
        // Firecracker 1.16.1's own words (checked against the real binary).
        "The number of vCPUs must be greater than 0",
    );
    assert_fault(
        api.put_json(
            "/machine-config",
            &json!({"vcpu_count": "two", "mem_size_mib": 128}),
        ),
        "invalid type",
    );
    let disk = vmm.path("d.img");
    std::fs::write(&disk, b"x").unwrap();
    assert_fault(
        api.put_json(
            "/drives/rootfs",
            &json!({"drive_id": "other", "is_root_device": true, "is_read_only": true, "path_on_host": disk}),
        ),
        "does not match",
    );
    assert_fault(
        api.put_json("/actions", &json!({"action_type": "SendCtrlAltDel"})),
        "not supported before starting",
    );
    assert_fault(api.instance_start(), "without kernel configuration");
    assert_eq!(
        api.instance_info().unwrap().state,
        InstanceState::NotStarted,
        "a refused request changed the state"
    );

    vmm.configure(&kernel);
    api.instance_start().unwrap();
    vmm.wait_ready(Duration::from_secs(20));
    assert_fault(
        api.put_machine_config(&MachineConfiguration {
            vcpu_count: 2,
            mem_size_mib: 256,
            smt: None,
            track_dirty_pages: None,
            cpu_template: None,
            huge_pages: None,
        }),
        "not supported after starting the microVM",
    );
    assert_fault(
        api.instance_start(),
        "not supported after starting the microVM",
    );
    assert_eq!(api.instance_info().unwrap().state, InstanceState::Running);

    vmm.signal(rustix::process::Signal::Term);
    let st = vmm
        .wait_exit(Duration::from_secs(10))
        .expect("VMM still running 10s after SIGTERM");
    assert!(
        !st.success(),
        "SIGTERM should end the VMM abnormally, got {st}"
    );
    if vmm.standin {
        assert!(
            !vmm.api.socket().exists(),
            "stand-in left its API socket after SIGTERM"
        );
    }
}

#[test]
fn standin_command_line() {
    let (bin, standin) = vmm_or_skip!();
    if !standin {
        println!("SKIP: {ENV} points at a real Firecracker; this checks the stand-in's CLI");
        return;
    }
    let out = Command::new(&bin).arg("--version").output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "Firecracker v1.16.1\n"
    );
    let out = Command::new(&bin)
        .args(["--api-sock", "/nonexistent/x.sock", "--bogus"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(153));
    assert!(String::from_utf8_lossy(&out.stderr).contains("'--bogus'"));
    let out = Command::new(&bin).arg("--id").output().unwrap();
    assert_eq!(out.status.code(), Some(153));
    // Bound to a path that cannot be created: fails with a message naming it.
    let out = Command::new(&bin)
        .args(["--api-sock", "/nonexistent/x.sock"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/x.sock"));
}

#[test]
fn standin_refuses_malformed_http_and_big_payloads() {
    let (bin, standin) = vmm_or_skip!();
    if !standin {
        println!("SKIP: {ENV} points at a real Firecracker; this checks stand-in limits");
        return;
    }
    let vmm = Vmm::spawn(&bin, standin);
    let big = "x".repeat(60_000);
    let r = vmm
        .api
        .request("PUT", "/boot-source", Some(big.as_bytes()))
        .unwrap();
    assert_eq!(r.status, 400);
    assert!(String::from_utf8_lossy(&r.body).contains("larger than the limit"));
    let r = vmm
        .api
        .request("PUT", "/no-such-thing", Some(b"{}"))
        .unwrap();
    assert_eq!(r.status, 400);
    assert!(String::from_utf8_lossy(&r.body).contains("Invalid request method and/or path"));
    // Still serving after refusals.
    assert_eq!(
        vmm.api.instance_info().unwrap().state,
        InstanceState::NotStarted
    );
}
