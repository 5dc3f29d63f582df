//! The stand-in's TCG engine against a real Linux kernel: QEMU boots the `vmlinux` that
//! `packaging/kernel/` builds, on a tap in a bridge inside a network namespace each test creates
//! (never the machine's own network), with the Firecracker API driving it exactly as banger does.
//!
//! The engine's own lifecycle runs against a tiny PVH guest (`pvh_guest/`, assembled here with
//! `as`/`ld`) and needs only `qemu-system-x86_64`. The Linux tests need root (network namespaces,
//! taps), `ip`, QEMU and the kernel (`BANGER_TEST_KERNEL`, else the newest
//! `/var/tmp/banger-cache/kernel/*/vmlinux`); the full-system test also needs `BANGER_TEST_ROOTFS`
//! (an ext4 image with systemd and the agent). Each test prints `SKIP: <test>: <reason>` and
//! returns when something is missing. Numbers are printed (`TCG-BENCH:` lines), never asserted on.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use banger::vmm::api::{wait_for_socket, Client};
use serde_json::json;

const STANDIN: &str = env!("CARGO_BIN_EXE_firecracker");
const GUEST_IP: &str = "172.30.0.2";
const GATEWAY: &str = "172.30.0.1";

/// One TCG boot at a time: they share two cores with everything else.
static SERIAL: Mutex<()> = Mutex::new(());

fn skip(test: &str, why: &str) {
    eprintln!("SKIP: {test}: {why}");
}

fn have(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
}

fn test_kernel() -> Option<PathBuf> {
    if let Some(k) = std::env::var_os("BANGER_TEST_KERNEL") {
        return Some(PathBuf::from(k)).filter(|p| p.is_file());
    }
    let rd = std::fs::read_dir("/var/tmp/banger-cache/kernel").ok()?;
    rd.flatten()
        .map(|e| e.path().join("vmlinux"))
        .filter(|p| p.is_file())
        .max_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
}

/// The kernel when everything a boot needs is here; otherwise prints the SKIP line.
fn preconditions(test: &str) -> Option<PathBuf> {
    if !rustix::process::geteuid().is_root() {
        skip(test, "needs root (network namespace, bridge and tap)");
        return None;
    }
    for tool in ["ip", "qemu-system-x86_64"] {
        if !have(tool) {
            skip(
                test,
                &format!("{tool} is not installed (scripts/deps.sh --smoke)"),
            );
            return None;
        }
    }
    let Some(k) = test_kernel() else {
        skip(
            test,
            "no kernel: set BANGER_TEST_KERNEL or build one with packaging/kernel/build.sh",
        );
        return None;
    };
    Some(k)
}

fn run(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("running {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace with bridge `br0` (the gateway address) and tap `tap0` in it; deleted on
/// drop, which also removes both links.
struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Netns {
        let name = format!("bgtcg-{tag}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        run(&["ip", "netns", "add", &name]);
        let ns = Netns(name);
        let n = ns.0.as_str();
        run(&["ip", "-n", n, "link", "set", "lo", "up"]);
        run(&["ip", "-n", n, "link", "add", "br0", "type", "bridge"]);
        run(&[
            "ip",
            "-n",
            n,
            "addr",
            "add",
            &format!("{GATEWAY}/24"),
            "dev",
            "br0",
        ]);
        run(&["ip", "-n", n, "link", "set", "br0", "up"]);
        run(&["ip", "-n", n, "tuntap", "add", "dev", "tap0", "mode", "tap"]);
        run(&["ip", "-n", n, "link", "set", "tap0", "master", "br0", "up"]);
        ns
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// A stand-in process in the namespace, its console (stdout) and stderr collected.
struct Vmm {
    child: Child,
    dir: PathBuf,
    console: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
    api: Client,
    ns: Option<Netns>,
}

fn collect(r: impl std::io::Read + Send + 'static, into: Arc<Mutex<String>>) {
    thread::spawn(move || {
        for line in BufReader::new(r).lines() {
            let Ok(line) = line else { break };
            let mut s = into.lock().unwrap_or_else(|e| e.into_inner());
            s.push_str(&line);
            s.push('\n');
        }
    });
}

impl Vmm {
    /// The stand-in inside a fresh network namespace (with `br0` and `tap0`).
    fn spawn(tag: &str) -> Vmm {
        Vmm::spawn_with(tag, Some(Netns::new(tag)), &[])
    }

    fn spawn_with(tag: &str, ns: Option<Netns>, env: &[(&str, &Path)]) -> Vmm {
        let dir = std::env::temp_dir().join(format!("bgtcg-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("api.sock");
        // `ip netns exec` execs the stand-in, so the child's pid is the stand-in's.
        let mut cmd = match &ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &ns.0, STANDIN]);
                c
            }
            None => Command::new(STANDIN),
        };
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .arg("--api-sock")
            .arg(&sock)
            .args(["--id", tag])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning the stand-in");
        let console = Arc::default();
        let stderr = Arc::default();
        collect(child.stdout.take().unwrap(), Arc::clone(&console));
        collect(child.stderr.take().unwrap(), Arc::clone(&stderr));
        wait_for_socket(&sock, Duration::from_secs(10)).expect("the API socket");
        Vmm {
            child,
            api: Client::new(&sock).with_timeout(Duration::from_secs(60)),
            dir,
            console,
            stderr,
            ns,
        }
    }

    fn put(&self, path: &str, body: serde_json::Value) {
        self.api
            .put_json(path, &body)
            .unwrap_or_else(|e| panic!("PUT {path}: {e}"))
    }

    /// Configures the VM as banger does (boot args with `ip=`, machine, tap, vsock, maybe a root
    /// drive) and starts it.
    fn configure_and_start(&self, kernel: &Path, extra_args: &str, rootfs: Option<&Path>) {
        let args = format!(
            "console=ttyS0 reboot=k panic=1 pci=off ip={GUEST_IP}::{GATEWAY}:255.255.255.0:tcgtest:eth0:off {extra_args}"
        );
        let put = |path: &str, body: serde_json::Value| self.put(path, body);
        put(
            "/boot-source",
            json!({"kernel_image_path": kernel, "boot_args": args}),
        );
        put(
            "/machine-config",
            json!({"vcpu_count": 2, "mem_size_mib": 512}),
        );
        if let Some(r) = rootfs {
            put(
                "/drives/rootfs",
                json!({"drive_id": "rootfs", "is_root_device": true, "is_read_only": false, "path_on_host": r}),
            );
        }
        put(
            "/network-interfaces/eth0",
            json!({"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "02:00:ac:1e:00:02"}),
        );
        put(
            "/vsock",
            json!({"guest_cid": 3, "uds_path": self.dir.join("vsock.sock")}),
        );
        self.api
            .put_json("/actions", &json!({"action_type": "InstanceStart"}))
            .expect("InstanceStart");
    }

    /// Waits until the console holds `needle`; the console so far on timeout.
    fn wait_console(&self, needle: &str, timeout: Duration) -> Result<Duration, String> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if self.console.lock().unwrap().contains(needle) {
                return Ok(start.elapsed());
            }
            thread::sleep(Duration::from_millis(20));
        }
        Err(format!(
            "no {needle:?} on the console within {timeout:?}; console:\n{}\nstderr:\n{}",
            self.console.lock().unwrap(),
            self.stderr.lock().unwrap()
        ))
    }

    fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// QEMU's pid from the engine's stderr line (printed before InstanceStart answers; the
    /// collector thread may still be on its way to it).
    fn qemu_pid(&self) -> u32 {
        let start = Instant::now();
        loop {
            let err = self.stderr.lock().unwrap_or_else(|e| e.into_inner());
            let pid = err
                .lines()
                .find_map(|l| l.strip_prefix("stand-in: TCG engine: QEMU pid "))
                .and_then(|r| r.split_whitespace().next())
                .and_then(|p| p.parse().ok());
            match pid {
                Some(p) => return p,
                None if start.elapsed() > Duration::from_secs(10) => {
                    panic!("no QEMU pid on stderr:\n{err}")
                }
                None => {}
            }
            drop(err);
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn alive(pid: u32) -> bool {
    // A zombie is dead for our purpose; QEMU's parent (the stand-in) is gone, so init reaps it.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(false)
}

/// The kernel boots under QEMU (console on the stand-in's stdout), brings up eth0 from `ip=` on
/// the tap (the guest answers ARP through the bridge, with the configured MAC), and SendCtrlAltDel reaches it as a
/// keyboard event: with no init to take the chord the kernel restarts at once, QEMU (`-no-reboot`)
/// exits, and so does the stand-in, with 0 as Firecracker does.
#[test]
fn kernel_boots_and_exits_on_ctrl_alt_del() {
    let test = "kernel_boots_and_exits_on_ctrl_alt_del";
    let Some(kernel) = preconditions(test) else {
        return;
    };
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut vmm = Vmm::spawn("cad");
    let t0 = Instant::now();
    // No root drive: the kernel waits for one forever, alive and listening to its keyboard.
    vmm.configure_and_start(&kernel, "rootwait", None);
    let started = t0.elapsed();
    let banner = vmm
        .wait_console("Linux version", Duration::from_secs(60))
        .unwrap();
    vmm.wait_console("Waiting for root device", Duration::from_secs(120))
        .unwrap();
    let waiting = t0.elapsed();
    {
        let err = vmm.stderr.lock().unwrap();
        assert!(
            err.contains(&format!(
                "stand-in: TCG engine: vsock port 52 -> tcp {GUEST_IP}:52"
            )),
            "{err}"
        );
    }
    let console = vmm.console.lock().unwrap().clone();
    assert!(console.contains("IP-Config: Complete"), "{console}");
    // The agent's vsock port maps to the guest's TCP 52, where nothing listens yet: refused, as
    // Firecracker refuses a port the guest does not listen on (the host side is closed).
    let refused =
        banger::agent::vsock_connect(&vmm.dir.join("vsock.sock"), 52, Duration::from_secs(10));
    assert!(
        refused.is_err(),
        "CONNECT 52 answered with no agent in the guest"
    );
    // That attempt went to the guest over the tap: the bridge learned the guest's MAC by ARP.
    let neigh = Command::new("ip")
        .args(["-n", &vmm.ns.as_ref().unwrap().0, "neigh", "show", GUEST_IP])
        .output()
        .expect("ip neigh");
    let neigh = String::from_utf8_lossy(&neigh.stdout);
    assert!(
        neigh.contains("lladdr 02:00:ac:1e:00:02"),
        "the guest never answered ARP on the tap: {neigh:?}"
    );

    let qemu = vmm.qemu_pid();
    let t1 = Instant::now();
    vmm.api
        .put_json("/actions", &json!({"action_type": "SendCtrlAltDel"}))
        .expect("SendCtrlAltDel");
    let status = vmm.wait_exit(Duration::from_secs(60)).unwrap_or_else(|| {
        panic!(
            "the stand-in still runs 60 s after SendCtrlAltDel; console tail:\n{}",
            vmm.console.lock().unwrap()
        )
    });
    assert_eq!(status.code(), Some(0), "{}", vmm.stderr.lock().unwrap());
    thread::sleep(Duration::from_millis(200));
    assert!(!alive(qemu), "QEMU {qemu} outlived the stand-in");
    eprintln!(
        "TCG-BENCH: InstanceStart answered {started:?}; kernel banner +{banner:?}; waiting for root +{waiting:?}; SendCtrlAltDel -> exit {:?}",
        t1.elapsed()
    );
}

/// Assembles the tiny PVH guest into `dir`; `Err` is the SKIP reason.
fn pvh_guest(dir: &Path) -> Result<PathBuf, String> {
    for tool in ["as", "ld", "qemu-system-x86_64"] {
        if !have(tool) {
            return Err(format!("{tool} is not installed (scripts/deps.sh --smoke)"));
        }
    }
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/pvh_guest");
    let (obj, elf) = (dir.join("pvh_guest.o"), dir.join("pvh-guest.elf"));
    run(&[
        "as",
        "--64",
        "-o",
        obj.to_str().unwrap(),
        src.join("pvh_guest.S").to_str().unwrap(),
    ]);
    run(&[
        "ld",
        "-m",
        "elf_x86_64",
        "-static",
        "-nostdlib",
        "-T",
        src.join("pvh_guest.ld").to_str().unwrap(),
        "-o",
        elf.to_str().unwrap(),
        obj.to_str().unwrap(),
    ]);
    Ok(elf)
}

/// A stand-in (no network) with the tiny PVH guest configured, not started; `None` after a SKIP.
fn tiny(test: &str, tag: &str, env: &[(&str, &Path)]) -> Option<(Vmm, PathBuf)> {
    let build = std::env::temp_dir().join(format!("bgtcg-build-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&build).unwrap();
    let elf = match pvh_guest(&build) {
        Ok(e) => e,
        Err(why) => {
            skip(test, &why);
            return None;
        }
    };
    let vmm = Vmm::spawn_with(tag, None, env);
    let kernel = vmm.dir.join("vmlinux");
    std::fs::copy(&elf, &kernel).unwrap();
    let _ = std::fs::remove_dir_all(&build);
    vmm.put(
        "/boot-source",
        json!({"kernel_image_path": kernel, "boot_args": "console=ttyS0 reboot=k panic=1"}),
    );
    vmm.put(
        "/machine-config",
        json!({"vcpu_count": 1, "mem_size_mib": 64}),
    );
    vmm.put(
        "/vsock",
        json!({"guest_cid": 3, "uds_path": vmm.dir.join("vsock.sock")}),
    );
    Some((vmm, kernel))
}

/// The engine's whole life on the tiny PVH guest, with Firecracker's API contract unchanged around
/// it: the guest's console on stdout, Running after InstanceStart, post-boot configuration refused,
/// no agent behind vsock (no `ip=`), SendCtrlAltDel reaches the guest's keyboard, and the guest's
/// reset ends QEMU and then the stand-in with 0, its sockets removed.
#[test]
fn tiny_pvh_guest_lifecycle() {
    let test = "tiny_pvh_guest_lifecycle";
    let Some((mut vmm, kernel)) = tiny(test, "life", &[]) else {
        return;
    };
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let t0 = Instant::now();
    vmm.put("/actions", json!({"action_type": "InstanceStart"}));
    let started = t0.elapsed();
    let hello = vmm
        .wait_console("pvh-guest: hello", Duration::from_secs(30))
        .unwrap();
    let info = vmm.api.instance_info().unwrap();
    assert_eq!(info.state, banger::vmm::models::InstanceState::Running);
    // QMP's socket is private and gone once the stand-in holds its end.
    let leftovers: Vec<_> = std::fs::read_dir(&vmm.dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("qmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    assert!(
        !vmm.console.lock().unwrap().contains("banger-guest: ready"),
        "the fake readiness line is printed for a real guest"
    );
    {
        let err = vmm.stderr.lock().unwrap();
        assert!(err.contains("stand-in: TCG engine: "), "{err}");
        assert!(err.contains("-M microvm"), "{err}");
        assert!(
            err.contains("vsock port 52 -> nothing (no static ip= boot argument)"),
            "{err}"
        );
    }
    let e = vmm
        .api
        .put_json("/boot-source", &json!({"kernel_image_path": kernel}))
        .unwrap_err();
    assert_eq!(e.status(), Some(400));
    assert!(
        banger::agent::vsock_connect(&vmm.dir.join("vsock.sock"), 52, Duration::from_secs(5))
            .is_err(),
        "CONNECT 52 answered with no guest address"
    );
    let qemu = vmm.qemu_pid();
    assert!(alive(qemu));
    let t1 = Instant::now();
    vmm.put("/actions", json!({"action_type": "SendCtrlAltDel"}));
    let status = vmm
        .wait_exit(Duration::from_secs(30))
        .expect("the stand-in still runs after SendCtrlAltDel");
    assert_eq!(status.code(), Some(0), "{}", vmm.stderr.lock().unwrap());
    let start = Instant::now();
    while alive(qemu) && start.elapsed() < Duration::from_secs(10) {
        thread::sleep(Duration::from_millis(20));
    }
    assert!(!alive(qemu), "QEMU {qemu} outlived the stand-in");
    for sock in ["api.sock", "vsock.sock"] {
        assert!(!vmm.dir.join(sock).exists(), "{sock} left behind");
    }
    eprintln!(
        "TCG-BENCH: tiny PVH guest: InstanceStart answered in {started:?}, console +{hello:?}, SendCtrlAltDel -> exit {:?}",
        t1.elapsed()
    );
}

/// Killing the stand-in (SIGTERM as the helper does, or SIGKILL) takes QEMU down with it.
#[test]
fn qemu_dies_with_the_standin() {
    let test = "qemu_dies_with_the_standin";
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    for (sig, name) in [(libc::SIGTERM, "term"), (libc::SIGKILL, "kill")] {
        let Some((mut vmm, _)) = tiny(test, name, &[]) else {
            return;
        };
        vmm.put("/actions", json!({"action_type": "InstanceStart"}));
        vmm.wait_console("pvh-guest: hello", Duration::from_secs(30))
            .unwrap();
        let qemu = vmm.qemu_pid();
        assert!(alive(qemu));
        // SAFETY: signalling our own child.
        assert_eq!(unsafe { libc::kill(vmm.child.id() as libc::pid_t, sig) }, 0);
        let status = vmm
            .wait_exit(Duration::from_secs(10))
            .expect("the stand-in survived its signal");
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(sig), "{name}");
        let start = Instant::now();
        while alive(qemu) && start.elapsed() < Duration::from_secs(10) {
            thread::sleep(Duration::from_millis(20));
        }
        assert!(!alive(qemu), "QEMU {qemu} outlived the stand-in's {name}");
        if sig == libc::SIGTERM {
            assert!(
                !vmm.dir.join("api.sock").exists(),
                "SIGTERM leaves the API socket"
            );
        }
    }
}

/// QEMU failing to start (here a stand-in for it that exits with an error, as QEMU does on a busy
/// tap) fails InstanceStart with a Firecracker-shaped fault carrying QEMU's words, and changes
/// nothing: the VM is still not started, no QEMU runs, the stand-in still answers.
#[test]
fn qemu_start_failure_is_a_fault() {
    let test = "qemu_start_failure_is_a_fault";
    let dir = std::env::temp_dir().join(format!("bgtcg-fakeq-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let fake = dir.join("qemu-system-x86_64");
    std::fs::write(
        &fake,
        "#!/bin/sh\necho 'qemu-system-x86_64: -netdev tap: could not configure /dev/net/tun (tap0): Device or resource busy' >&2\nexit 1\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let Some((mut vmm, _)) = tiny(test, "fail", &[("BANGER_STANDIN_QEMU", &fake)]) else {
        let _ = std::fs::remove_dir_all(&dir);
        return;
    };
    let e = vmm
        .api
        .put_json("/actions", &json!({"action_type": "InstanceStart"}))
        .unwrap_err();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(e.status(), Some(400));
    let msg = e.fault_message().unwrap_or_default().to_string();
    assert!(msg.contains("TCG engine failed"), "{msg}");
    assert!(msg.contains("Device or resource busy"), "{msg}");
    let info = vmm.api.instance_info().unwrap();
    assert_eq!(info.state, banger::vmm::models::InstanceState::NotStarted);
    assert!(
        vmm.child.try_wait().unwrap().is_none(),
        "the stand-in exited"
    );
    assert!(
        !vmm.console.lock().unwrap().contains("banger-guest: ready"),
        "fell back to the fake guest"
    );
}

/// A whole system (`BANGER_TEST_ROOTFS`: systemd and banger's agent unit): systemd boots, the
/// guest's own agent answers `hello` and `ports` over the vsock socket (mapped to TCP 52), and
/// SendCtrlAltDel makes systemd reboot cleanly, after which the stand-in exits 0.
#[test]
fn systemd_guest_agent_over_vsock() {
    let test = "systemd_guest_agent_over_vsock";
    let Some(kernel) = preconditions(test) else {
        return;
    };
    let Some(rootfs) = std::env::var_os("BANGER_TEST_ROOTFS").map(PathBuf::from) else {
        skip(
            test,
            "BANGER_TEST_ROOTFS is not set (an ext4 image with systemd and banger-vsock-agent)",
        );
        return;
    };
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut vmm = Vmm::spawn("sys");
    // The guest writes to its root: boot a sparse copy.
    let disk = vmm.dir.join("rootfs.ext4");
    run(&[
        "cp",
        "--sparse=always",
        rootfs.to_str().unwrap(),
        disk.to_str().unwrap(),
    ]);
    // A data drive configured before the root drive: Firecracker still makes the root /dev/vda
    // (the guest would not boot otherwise), the data drive /dev/vdb.
    let data = vmm.dir.join("data.img");
    std::fs::File::create(&data)
        .and_then(|f| f.set_len(64 << 20))
        .unwrap();
    vmm.put(
        "/drives/data",
        json!({"drive_id": "data", "is_root_device": false, "is_read_only": true, "path_on_host": data}),
    );
    let t0 = Instant::now();
    vmm.configure_and_start(&kernel, "banger.name=tcgtest", Some(&disk));
    let uds = vmm.dir.join("vsock.sock");
    let mut answered = None;
    while t0.elapsed() < Duration::from_secs(180) {
        if let Ok(v) = banger::agent::agent_call(&uds, 52, "hello") {
            answered = Some((t0.elapsed(), v));
            break;
        }
        thread::sleep(Duration::from_millis(100));
    }
    let Some((agent_at, v)) = answered else {
        panic!(
            "the agent never answered over vsock; console:\n{}\nstderr:\n{}",
            vmm.console.lock().unwrap(),
            vmm.stderr.lock().unwrap()
        );
    };
    let boot_id = v["boot_id"].as_str().unwrap_or_default().to_string();
    assert!(banger::agent::is_boot_id(&boot_id), "{v}");
    // The real agent in the real guest: the name from banger.name=, the key sshd will present.
    assert_eq!(v["hostname"], "tcgtest", "{v}");
    assert!(
        v["host_key"]
            .as_str()
            .unwrap_or_default()
            .starts_with("ssh-ed25519 "),
        "{v}"
    );
    assert_ne!(
        v["host_key"].as_str(),
        Some("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGposxU1u8AlmBpcq3yn+btS1uQymLutYq90E6gMTcpH"),
        "the stand-in's fake agent answered instead of the guest's"
    );
    let ports = banger::agent::agent_call(&uds, 52, "ports").expect("ports");
    let listening: Vec<u64> = ports["ports"]
        .as_array()
        .map(|a| a.iter().filter_map(|p| p["port"].as_u64()).collect())
        .unwrap_or_default();
    assert!(
        listening.contains(&52),
        "the agent's own TCP port is not listed: {ports}"
    );
    let reached = vmm
        .wait_console("Reached target", Duration::from_secs(120))
        .map(|_| ())
        .map_err(|e| e.lines().next().unwrap_or_default().to_string());
    let t1 = Instant::now();
    vmm.api
        .put_json("/actions", &json!({"action_type": "SendCtrlAltDel"}))
        .expect("SendCtrlAltDel");
    let status = vmm.wait_exit(Duration::from_secs(120)).unwrap_or_else(|| {
        panic!(
            "the stand-in still runs 120 s after SendCtrlAltDel; console:\n{}",
            vmm.console.lock().unwrap()
        )
    });
    assert_eq!(status.code(), Some(0));
    let console = vmm.console.lock().unwrap().clone();
    assert!(reached.is_ok(), "{reached:?}");
    assert!(
        console.contains("[vdb] 131072 512-byte logical blocks"),
        "the 64 MiB data drive is not /dev/vdb"
    );
    assert!(
        console.contains("reboot: Restarting system"),
        "systemd did not reboot cleanly:\n{console}"
    );
    eprintln!(
        "TCG-BENCH: InstanceStart -> agent hello over vsock {agent_at:?}; SendCtrlAltDel -> clean reboot and exit {:?}",
        t1.elapsed()
    );
}

/// The TCG engine's snapshot API on the tiny PVH guest, through the Firecracker API: create is
/// refused while running; paused, the memory file is QEMU's migration stream and the vmstate says
/// engine "tcg"; the source resumes and still takes Ctrl+Alt+Del. A fresh stand-in loads it
/// without resume_vm (no QEMU yet, vsock closed), resumes it: the guest continues where it was (no
/// second "hello" on the console: restored, not booted) and its i8042 loop takes the Ctrl+Alt+Del
/// that ends it, and the stand-in, with 0.
#[test]
fn tiny_pvh_guest_snapshot_and_restore() {
    let test = "tiny_pvh_guest_snapshot_and_restore";
    let Some((mut src, _kernel)) = tiny(test, "snapsrc", &[]) else {
        return;
    };
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let snap = std::env::temp_dir().join(format!("bgtcg-snapfiles-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&snap);
    std::fs::create_dir_all(&snap).unwrap();
    let (mem, state) = (snap.join("memory"), snap.join("vmstate"));
    src.put("/actions", json!({"action_type": "InstanceStart"}));
    src.wait_console("pvh-guest: hello", Duration::from_secs(30))
        .unwrap();
    let create = json!({"mem_file_path": mem, "snapshot_path": state, "snapshot_type": "Full"});
    let e = src.api.put_json("/snapshot/create", &create).unwrap_err();
    assert_eq!(e.status(), Some(400), "create while running");
    assert!(!mem.exists() && !state.exists());
    src.api.pause().unwrap();
    let t0 = Instant::now();
    src.put("/snapshot/create", create);
    let save = t0.elapsed();
    let stream = std::fs::read(&mem).unwrap();
    assert_eq!(&stream[..4], b"QEVM", "not a QEMU migration stream");
    let vmstate: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&state).unwrap()).unwrap();
    assert_eq!(vmstate["engine"], "tcg", "{vmstate}");
    src.api.resume().unwrap();
    src.put("/actions", json!({"action_type": "SendCtrlAltDel"}));
    let status = src
        .wait_exit(Duration::from_secs(30))
        .expect("the source still runs after SendCtrlAltDel");
    assert_eq!(status.code(), Some(0), "{}", src.stderr.lock().unwrap());

    let mut clone = Vmm::spawn_with("snapclone", None, &[]);
    let vsock = clone.dir.join("vsock.sock");
    let t1 = Instant::now();
    clone.put(
        "/snapshot/load",
        json!({"snapshot_path": state, "mem_backend": {"backend_type": "File", "backend_path": mem},
            "resume_vm": false, "vsock_override": {"uds_path": vsock}}),
    );
    let load = t1.elapsed();
    assert!(
        !clone
            .stderr
            .lock()
            .unwrap()
            .contains("stand-in: TCG engine: QEMU pid"),
        "QEMU started before the resume"
    );
    assert!(
        banger::agent::vsock_connect(&vsock, 52, Duration::from_secs(5)).is_err(),
        "vsock answered for a guest not resumed"
    );
    let t2 = Instant::now();
    clone.api.resume().unwrap();
    let resume = t2.elapsed();
    let qemu = clone.qemu_pid();
    assert!(alive(qemu));
    clone.put("/actions", json!({"action_type": "SendCtrlAltDel"}));
    let status = clone
        .wait_exit(Duration::from_secs(30))
        .expect("the restored guest did not take Ctrl+Alt+Del");
    assert_eq!(status.code(), Some(0), "{}", clone.stderr.lock().unwrap());
    assert!(
        !clone.console.lock().unwrap().contains("pvh-guest: hello"),
        "the restored guest started over: {}",
        clone.console.lock().unwrap()
    );
    let _ = std::fs::remove_dir_all(&snap);
    eprintln!(
        "TCG-BENCH: tiny PVH guest: pause+snapshot/create {save:?} ({} KiB stream for 64 MiB); snapshot/load {load:?}; resume (QEMU start + stream) {resume:?}",
        stream.len() >> 10
    );
}
