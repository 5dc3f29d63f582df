//! The stand-in's TCG engine: when `qemu-system-x86_64` is installed and the configured kernel is a
//! Linux `vmlinux` with a PVH entry note, InstanceStart boots that kernel for real under
//! `qemu-system-x86_64 -accel tcg -M microvm` instead of pretending (DESIGN §13).
//!
//! It owns: deciding whether to engage ([`engages`]), the QEMU command line built from the
//! Firecracker configuration the API accepted ([`plan`]: vcpus, memory, drives, the tap, the boot
//! arguments Firecracker would pass, the serial console on the stand-in's stdout), the QEMU child
//! (it dies with the stand-in: `PR_SET_PDEATHSIG`), QMP on a private socket for Ctrl+Alt+Del, and the
//! map of Firecracker's vsock device (which QEMU cannot offer here: no `/dev/vhost-vsock`) onto the
//! guest's TCP port 52 through the tap. It never decides an API answer (that is [`crate::machine`]),
//! never creates or changes a network object (the tap is the one the host made), and is never
//! shipped: tests only.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, FileExt};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use banger::vmm::models::{CacheType, Drive, NetworkInterface};

use crate::machine::Machine;

/// The emulator the engine runs.
pub const QEMU: &str = "qemu-system-x86_64";

/// Environment override: a path to the emulator, or `off` to never engage (tests of the tiny path).
pub const QEMU_ENV: &str = "BANGER_STANDIN_QEMU";

/// The test-only kernel argument that makes the guest agent also listen on TCP (DESIGN §13).
pub const AGENT_TCP_ARG: &str = "banger.agent_tcp";

/// The guest port the agent listens on, over vsock and (here) TCP.
pub const AGENT_PORT: u16 = 52;

/// Firecracker's boot arguments when `PUT /boot-source` gives none (`DEFAULT_KERNEL_CMDLINE`).
pub const FIRECRACKER_DEFAULT_BOOT_ARGS: &str =
    "reboot=k panic=1 nomodule 8250.nr_uarts=0 i8042.noaux i8042.nomux i8042.dumbkbd swiotlb=noforce";

/// How long QEMU may take to load the kernel and open its devices before InstanceStart fails.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a host-side `CONNECT 52` waits for the guest's TCP port before it is refused.
const GUEST_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// `XEN_ELFNOTE_PHYS32_ENTRY`: the ELF note (owner "Xen") holding the 32-bit PVH entry point.
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
const PT_NOTE: u32 = 4;
const EM_X86_64: u16 = 62;
/// Larger note segments are refused rather than read (a vmlinux's are a few KiB).
const MAX_NOTE_SEGMENT: u64 = 1 << 20;
const MAX_PROGRAM_HEADERS: u16 = 256;

fn read_at(f: &File, off: u64, len: usize, what: &str) -> Result<Vec<u8>, String> {
    let mut b = vec![0u8; len];
    f.read_exact_at(&mut b, off).map_err(|e| {
        format!("truncated or unreadable ELF: reading {what} ({len} bytes at {off}): {e}")
    })?;
    Ok(b)
}

fn u16_at(b: &[u8], i: usize) -> u16 {
    u16::from_le_bytes([b[i], b[i + 1]])
}

fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

fn u64_at(b: &[u8], i: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[i..i + 8]);
    u64::from_le_bytes(a)
}

/// The PVH entry address of the x86-64 ELF kernel at `path` (the `Xen` note of type 18 that
/// QEMU's microvm enters a `vmlinux` through), or why the file has none.
pub fn pvh_entry(path: &Path) -> Result<u64, String> {
    let f = File::open(path).map_err(|e| format!("opening {}: {e}", path.display()))?;
    let h = read_at(&f, 0, 64, "the ELF header")?;
    if &h[..4] != b"\x7fELF" {
        return Err("not an ELF file".into());
    }
    if h[4] != 2 || h[5] != 1 {
        return Err("not a 64-bit little-endian ELF".into());
    }
    if u16_at(&h, 18) != EM_X86_64 {
        return Err(format!("ELF machine {} is not x86-64", u16_at(&h, 18)));
    }
    let phoff = u64_at(&h, 32);
    let phentsize = u16_at(&h, 54);
    let phnum = u16_at(&h, 56);
    if phentsize != 56 {
        return Err(format!("program header size {phentsize} is not 56"));
    }
    if phnum > MAX_PROGRAM_HEADERS {
        return Err(format!(
            "{phnum} program headers (more than {MAX_PROGRAM_HEADERS})"
        ));
    }
    let ph = read_at(&f, phoff, 56 * phnum as usize, "the program headers")?;
    for e in ph.chunks_exact(56) {
        if u32_at(e, 0) != PT_NOTE {
            continue;
        }
        let (off, size) = (u64_at(e, 8), u64_at(e, 32));
        if size > MAX_NOTE_SEGMENT {
            return Err(format!(
                "note segment of {size} bytes (more than {MAX_NOTE_SEGMENT})"
            ));
        }
        let notes = read_at(&f, off, size as usize, "a note segment")?;
        if let Some(entry) = find_pvh_note(&notes)? {
            return Ok(entry);
        }
    }
    Err(
        "no PVH entry note (ELF note \"Xen\" type 18): not a Linux vmlinux built with CONFIG_PVH"
            .into(),
    )
}

/// Walks one note segment; `Ok(None)` when it holds no PVH entry note.
fn find_pvh_note(b: &[u8]) -> Result<Option<u64>, String> {
    let pad = |n: usize| n.div_ceil(4) * 4;
    let mut i = 0usize;
    while i + 12 <= b.len() {
        let namesz = u32_at(b, i) as usize;
        let descsz = u32_at(b, i + 4) as usize;
        let kind = u32_at(b, i + 8);
        let name_at = i + 12;
        let desc_at = name_at
            .checked_add(pad(namesz))
            .filter(|&d| d <= b.len())
            .ok_or("truncated ELF note (name runs past its segment)")?;
        let end = desc_at
            .checked_add(pad(descsz))
            .filter(|&e| e <= b.len().div_ceil(4) * 4)
            .ok_or("truncated ELF note (descriptor runs past its segment)")?;
        if kind == XEN_ELFNOTE_PHYS32_ENTRY && &b[name_at..name_at + namesz] == b"Xen\0" {
            let desc = b
                .get(desc_at..desc_at + descsz)
                .ok_or("truncated PVH entry note")?;
            return match descsz {
                4 => Ok(Some(u32_at(desc, 0) as u64)),
                8 => Ok(Some(u64_at(desc, 0))),
                n => Err(format!("PVH entry note with a {n}-byte address")),
            };
        }
        i = end;
    }
    Ok(None)
}

/// The kernel command line's arguments, split as the kernel splits them: on spaces outside double
/// quotes, quotes removed. Arguments after `--` belong to init and are not returned.
pub fn kernel_args(cmdline: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut any = false;
    for c in cmdline.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                any = true;
            }
            c if c.is_ascii_whitespace() && !quoted => {
                if any {
                    if cur == "--" {
                        return out;
                    }
                    out.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            c => {
                cur.push(c);
                any = true;
            }
        }
    }
    if any && cur != "--" {
        out.push(cur);
    }
    out
}

/// The guest's static address from the kernel's `ip=<client>:<server>:<gw>:<mask>:…` argument
/// (the last one wins, as in the kernel); `None` without one or for `ip=dhcp`/`off` and friends.
pub fn guest_ip(cmdline: &str) -> Option<Ipv4Addr> {
    kernel_args(cmdline)
        .iter()
        .rev()
        .find_map(|a| a.strip_prefix("ip="))
        .and_then(|v| v.split(':').next())
        .and_then(|a| a.parse().ok())
}

/// The emulator to use, when the engine may engage at all: [`QEMU_ENV`] (`off` disables) or
/// [`QEMU`] on `PATH`.
pub fn qemu_binary() -> Option<PathBuf> {
    match std::env::var_os(QEMU_ENV) {
        Some(v) if v == "off" => return None,
        Some(v) if !v.is_empty() => return Some(PathBuf::from(v)),
        _ => {}
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(QEMU))
        .find(|p| p.is_file())
}

/// Whether InstanceStart boots this machine under QEMU: the emulator exists and the kernel is a
/// Linux vmlinux with a PVH entry. Returns the emulator's path.
pub fn engages(m: &Machine) -> Option<PathBuf> {
    let qemu = qemu_binary()?;
    let bs = m.boot_source.as_ref()?;
    pvh_entry(&bs.kernel_image_path).ok()?;
    Some(qemu)
}

/// A QEMU command line for one machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// QEMU's arguments (without the program).
    pub args: Vec<OsString>,
    /// The kernel command line the guest gets (Firecracker's, plus [`AGENT_TCP_ARG`]).
    pub cmdline: String,
    /// The guest's address from `ip=`, where the vsock port is mapped to.
    pub guest_ip: Option<Ipv4Addr>,
    /// Descriptors QEMU inherits (named by number in `args`).
    pub pass_fds: Vec<RawFd>,
}

/// A value inside a QEMU `-opt key=value,…` list: commas are doubled.
fn qemu_value(s: &str) -> String {
    s.replace(',', ",,")
}

fn utf8_path<'a>(p: &'a Path, what: &str) -> Result<&'a str, String> {
    p.to_str()
        .ok_or_else(|| format!("{what} path {} is not UTF-8", p.display()))
}

/// The drives in Firecracker's attach order: the root device first (it becomes `/dev/vda`), the
/// others in the order they were configured.
fn firecracker_drive_order(drives: &[Drive]) -> Vec<&Drive> {
    let mut out: Vec<&Drive> = drives.iter().filter(|d| d.is_root_device).collect();
    out.extend(drives.iter().filter(|d| !d.is_root_device));
    out
}

/// The kernel command line Firecracker builds: the boot arguments (or its default), `pci=off`,
/// and for a root drive `root=/dev/vda` (or `root=PARTUUID=…`) with `ro`/`rw`.
pub fn firecracker_cmdline(m: &Machine) -> String {
    let mut c = m
        .boot_source
        .as_ref()
        .and_then(|b| b.boot_args.clone())
        .unwrap_or_else(|| FIRECRACKER_DEFAULT_BOOT_ARGS.to_string());
    c.push_str(" pci=off");
    if let Some(root) = m.drives.iter().find(|d| d.is_root_device) {
        match &root.partuuid {
            Some(u) => c.push_str(&format!(" root=PARTUUID={u}")),
            None => c.push_str(" root=/dev/vda"),
        }
        c.push_str(if root.is_read_only.unwrap_or(false) {
            " ro"
        } else {
            " rw"
        });
    }
    c
}

/// Builds the QEMU command line for `m`, with QMP served on `qmp`.
pub fn plan(m: &Machine, qmp: &Path) -> Result<Plan, String> {
    plan_with_nets(m, &machine_nets(m), qmp)
}

/// [`plan`] with the network interfaces given apart (each with its held tap's descriptor, if
/// any), so tests can plan for interfaces without opening taps.
fn plan_with_nets(
    m: &Machine,
    nets: &[(&NetworkInterface, Option<RawFd>)],
    qmp: &Path,
) -> Result<Plan, String> {
    let bs = m
        .boot_source
        .as_ref()
        .ok_or("no boot source is configured")?;
    let mut cmdline = firecracker_cmdline(m);
    let guest_ip = guest_ip(&cmdline);
    if m.vsock.is_some() {
        cmdline.push_str(&format!(" {AGENT_TCP_ARG}={AGENT_PORT}"));
    }
    let mut a: Vec<String> = vec![
        "-accel".into(),
        "tcg".into(),
        // No ACPI: the guest learns its virtio-mmio devices from the `virtio_mmio.device=`
        // arguments QEMU appends and finds the i8042 by probing its ports. (With ACPI, Debian's
        // 6.1 kernel hangs under TCG right after TSC calibration, and the ACPI tables list no
        // i8042, so Ctrl+Alt+Del would reach nobody.) Like Firecracker, which implements no
        // guest power management, a guest's poweroff then halts it; its reboot ends QEMU.
        "-M".into(),
        "microvm,acpi=off".into(),
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-display".into(),
        "none".into(),
        "-no-reboot".into(),
        "-smp".into(),
        m.machine.vcpu_count.to_string(),
        "-m".into(),
        format!("{}M", m.machine.mem_size_mib),
        "-kernel".into(),
        utf8_path(&bs.kernel_image_path, "kernel")?.into(),
        "-append".into(),
        cmdline.clone(),
        // The controller Firecracker emulates: Ctrl+Alt+Del in, the guest's reset (`reboot=k`) out.
        "-device".into(),
        "i8042".into(),
        "-chardev".into(),
        "stdio,id=console,signal=off".into(),
        "-serial".into(),
        "chardev:console".into(),
        "-qmp".into(),
        format!(
            "unix:{},server=on,wait=off",
            qemu_value(utf8_path(qmp, "QMP socket")?)
        ),
    ];
    if let Some(initrd) = &bs.initrd_path {
        a.push("-initrd".into());
        a.push(utf8_path(initrd, "initrd")?.into());
    }
    for d in firecracker_drive_order(&m.drives) {
        let Some(p) = &d.path_on_host else {
            return Err(format!("drive {} has no path_on_host", d.drive_id));
        };
        let cache = match d.cache_type {
            Some(CacheType::Writeback) => "writeback",
            Some(CacheType::Unsafe) | None => "unsafe",
        };
        a.push("-drive".into());
        a.push(format!(
            "id=drive_{},file={},format=raw,if=none,readonly={},cache={cache}",
            d.drive_id,
            qemu_value(utf8_path(p, "drive")?),
            if d.is_read_only.unwrap_or(false) {
                "on"
            } else {
                "off"
            },
        ));
        a.push("-device".into());
        a.push(format!("virtio-blk-device,drive=drive_{}", d.drive_id));
    }
    let mut pass_fds = Vec::new();
    for &(n, fd) in nets {
        a.push("-netdev".into());
        a.push(netdev_arg(n, fd));
        pass_fds.extend(fd);
        let mut dev = format!("virtio-net-device,netdev=net_{}", n.iface_id);
        if let Some(mac) = &n.guest_mac {
            dev.push_str(&format!(",mac={mac}"));
        }
        if let Some(mtu) = n.mtu {
            dev.push_str(&format!(",host_mtu={mtu}"));
        }
        a.push("-device".into());
        a.push(dev);
    }
    Ok(Plan {
        args: a.into_iter().map(OsString::from).collect(),
        cmdline,
        guest_ip,
        pass_fds,
    })
}

/// QEMU's `-netdev` for interface `n`: the tap by name, or the queue the stand-in holds open (a
/// held tap is busy for any other opener, so QEMU gets that very queue; it probes IFF_VNET_HDR
/// on it itself, and QEMU refuses `ifname=`/`vnet_hdr=` next to `fd=`).
fn netdev_arg(n: &NetworkInterface, fd: Option<RawFd>) -> String {
    match fd {
        Some(fd) => format!("tap,id=net_{},fd={fd}", n.iface_id),
        None => format!(
            "tap,id=net_{},ifname={},script=no,downscript=no,vnet_hdr=on",
            n.iface_id,
            qemu_value(&n.host_dev_name)
        ),
    }
}

/// The machine's network interfaces, each with the descriptor of its tap when the stand-in holds
/// one open.
fn machine_nets(m: &Machine) -> Vec<(&NetworkInterface, Option<RawFd>)> {
    m.nets
        .iter()
        .map(|(n, tap)| (n, Some(tap.as_raw_fd())))
        .collect()
}

/// Where the QEMU child is in its life.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    Starting,
    Running,
    /// Exited with this exit code (before or after the start finished).
    Exited(i32),
}

/// The running engine: the QMP connection and where vsock connections go.
pub struct Engine {
    qmp: Mutex<Qmp>,
    guest: Option<SocketAddr>,
}

static ENGINE: OnceLock<Engine> = OnceLock::new();

/// The engine, once InstanceStart started one.
pub fn engine() -> Option<&'static Engine> {
    ENGINE.get()
}

/// Where the private QMP directory goes: beside the API socket (set by [`init`]), which the VMM
/// can always write (under the helper's `ProtectSystem=strict`, `/tmp` is read-only).
static RUNTIME_DIR: OnceLock<PathBuf> = OnceLock::new();

/// Tells the engine where the stand-in's API socket lives.
pub fn init(api_sock: &Path) {
    if let Some(d) = api_sock.parent() {
        let d = if d.as_os_str().is_empty() {
            Path::new(".")
        } else {
            d
        };
        let _ = RUNTIME_DIR.set(d.to_path_buf());
    }
}

/// A private 0700 directory for the QMP socket (removed once QEMU's end is connected).
fn private_dir() -> Result<PathBuf, String> {
    let base = RUNTIME_DIR
        .get()
        .cloned()
        .unwrap_or_else(std::env::temp_dir);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos();
    let d = base.join(format!(".standin-qmp-{}-{nanos:08x}", std::process::id()));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&d)
        .map_err(|e| format!("creating the QMP directory {}: {e}", d.display()))?;
    Ok(d)
}

fn shell_words(program: &Path, args: &[OsString]) -> String {
    std::iter::once(program.as_os_str())
        .chain(args.iter().map(|a| a.as_os_str()))
        .map(|a| {
            let s = a.to_string_lossy();
            if s.is_empty() || s.contains(|c: char| c.is_whitespace() || c == '\'' || c == '"') {
                format!("'{}'", s.replace('\'', "'\\''"))
            } else {
                s.into_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Boots `m` under `qemu` and returns once QEMU has loaded the kernel, opened every device and
/// answers QMP; an error (with QEMU's own last words) otherwise, and then no QEMU is left running.
/// When the guest later powers off or reboots, QEMU exits and `on_exit` gets the stand-in's exit
/// code (0 for a clean guest exit).
pub fn start(
    m: &Machine,
    qemu: &Path,
    on_exit: impl FnOnce(i32) + Send + 'static,
) -> Result<&'static Engine, String> {
    if ENGINE.get().is_some() {
        return Err("the TCG engine already runs a guest".into());
    }
    let dir = private_dir()?;
    let qmp_path = dir.join("qmp.sock");
    let result = spawn_and_connect(m, qemu, &qmp_path, on_exit);
    let _ = std::fs::remove_file(&qmp_path);
    let _ = std::fs::remove_dir(&dir);
    let engine = result?;
    Ok(ENGINE.get_or_init(|| engine))
}

fn spawn_and_connect(
    m: &Machine,
    qemu: &Path,
    qmp_path: &Path,
    on_exit: impl FnOnce(i32) + Send + 'static,
) -> Result<Engine, String> {
    let plan = plan(m, qmp_path)?;
    eprintln!("stand-in: TCG engine: {}", shell_words(qemu, &plan.args));
    let guest = plan.guest_ip.map(|ip| SocketAddr::from((ip, AGENT_PORT)));
    match (&m.vsock, guest) {
        (Some(_), Some(g)) => eprintln!("stand-in: TCG engine: vsock port {AGENT_PORT} -> tcp {g}"),
        (Some(_), None) => eprintln!(
            "stand-in: TCG engine: vsock port {AGENT_PORT} -> nothing (no static ip= boot argument): host connections are refused"
        ),
        (None, _) => {}
    }

    let phase = Arc::new((Mutex::new(Phase::Starting), Condvar::new()));
    let tail: Arc<Mutex<VecDeque<String>>> = Arc::default();
    let (tx, rx) = std::sync::mpsc::channel::<Result<u32, String>>();
    let (qemu, args, pass_fds) = (qemu.to_path_buf(), plan.args.clone(), plan.pass_fds.clone());
    let (phase2, tail2) = (Arc::clone(&phase), Arc::clone(&tail));
    // The thread that spawns QEMU lives exactly as long as QEMU: PR_SET_PDEATHSIG fires when the
    // spawning *thread* ends, so it must not be a short-lived API connection thread.
    thread::spawn(move || {
        let mut cmd = Command::new(&qemu);
        cmd.args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::inherit())
            .stderr(Stdio::piped());
        // SAFETY: prctl(2) and fcntl(2) are async-signal-safe and touch only the child: its
        // descriptor table is its own copy, so clearing close-on-exec there leaves ours alone.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                for &fd in &pass_fds {
                    if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                let _ = tx.send(Err(format!("running {}: {e}", qemu.display())));
                return;
            }
        };
        let _ = tx.send(Ok(child.id()));
        let forward = child.stderr.take().map(|err| {
            thread::spawn(move || {
                for line in BufReader::new(err).lines() {
                    let Ok(line) = line else { break };
                    eprintln!("{line}");
                    if let Ok(mut t) = tail2.lock() {
                        if t.len() == 8 {
                            t.pop_front();
                        }
                        t.push_back(line);
                    }
                }
            })
        });
        let status = child.wait();
        if let Some(f) = forward {
            let _ = f.join();
        }
        let code = match status {
            Ok(s) if s.success() => 0,
            Ok(s) => {
                eprintln!("stand-in: TCG engine: QEMU ended: {s}");
                1
            }
            Err(e) => {
                eprintln!("stand-in: TCG engine: waiting for QEMU: {e}");
                1
            }
        };
        let (lock, cv) = &*phase2;
        let mut p = match lock.lock() {
            Ok(p) => p,
            Err(e) => e.into_inner(),
        };
        let was = std::mem::replace(&mut *p, Phase::Exited(code));
        cv.notify_all();
        drop(p);
        if was == Phase::Running {
            on_exit(code);
        }
    });
    let pid = rx
        .recv()
        .map_err(|_| "the QEMU launcher thread ended before starting QEMU".to_string())??;

    let last_words = || {
        tail.lock()
            .map(|t| t.iter().cloned().collect::<Vec<_>>().join(" | "))
            .unwrap_or_default()
    };
    let exited = || {
        let (lock, _) = &*phase;
        matches!(lock.lock().map(|p| p.clone()), Ok(Phase::Exited(_)))
    };
    let deadline = Instant::now() + START_TIMEOUT;
    let connected = loop {
        if exited() {
            break Err(format!("QEMU exited while starting: {}", last_words()));
        }
        if Instant::now() > deadline {
            break Err(format!(
                "QEMU did not answer QMP within {}s",
                START_TIMEOUT.as_secs()
            ));
        }
        match UnixStream::connect(qmp_path) {
            Ok(s) => break Qmp::handshake(s),
            Err(_) => thread::sleep(Duration::from_millis(10)),
        }
    };
    let qmp = match connected {
        Ok(q) => q,
        Err(e) => {
            // SAFETY: kill(2) on the child we spawned; it has not been reaped while the phase is
            // not Exited (a stale pid is at worst signalled in vain).
            if !exited() {
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            }
            let (lock, cv) = &*phase;
            let mut p = lock.lock().map_err(|_| e.clone())?;
            while *p != Phase::Starting && !matches!(*p, Phase::Exited(_)) {
                p = cv.wait(p).map_err(|_| e.clone())?;
            }
            return Err(e);
        }
    };
    let (lock, _) = &*phase;
    let mut p = lock
        .lock()
        .map_err(|_| "the QEMU phase lock is poisoned".to_string())?;
    if let Phase::Exited(_) = *p {
        return Err(format!("QEMU exited while starting: {}", last_words()));
    }
    *p = Phase::Running;
    drop(p);
    eprintln!("stand-in: TCG engine: QEMU pid {pid} running");
    Ok(Engine {
        qmp: Mutex::new(qmp),
        guest,
    })
}

/// A QMP client on the private socket.
struct Qmp {
    r: BufReader<UnixStream>,
    w: UnixStream,
}

impl Qmp {
    fn handshake(s: UnixStream) -> Result<Qmp, String> {
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| format!("QMP socket: {e}"))?;
        let w = s.try_clone().map_err(|e| format!("QMP socket: {e}"))?;
        let mut q = Qmp {
            r: BufReader::new(s),
            w,
        };
        let greeting = q.read_message()?;
        if greeting.get("QMP").is_none() {
            return Err(format!("QMP greeting expected, got {greeting}"));
        }
        q.execute(serde_json::json!({"execute": "qmp_capabilities"}))?;
        Ok(q)
    }

    fn read_message(&mut self) -> Result<serde_json::Value, String> {
        let mut line = String::new();
        loop {
            line.clear();
            match self.r.read_line(&mut line) {
                Ok(0) => return Err("QMP connection closed".into()),
                Ok(_) => {}
                Err(e) => return Err(format!("reading QMP: {e}")),
            }
            let v: serde_json::Value =
                serde_json::from_str(line.trim()).map_err(|e| format!("QMP sent {line:?}: {e}"))?;
            if v.get("event").is_none() {
                return Ok(v);
            }
        }
    }

    /// Runs one command; its `return` value or QMP's error.
    fn execute(&mut self, cmd: serde_json::Value) -> Result<serde_json::Value, String> {
        let mut text = cmd.to_string();
        text.push('\n');
        self.w
            .write_all(text.as_bytes())
            .map_err(|e| format!("writing QMP: {e}"))?;
        let v = self.read_message()?;
        if let Some(r) = v.get("return") {
            return Ok(r.clone());
        }
        Err(format!(
            "QMP {cmd} failed: {}",
            v.get("error").unwrap_or(&v)
        ))
    }
}

impl Engine {
    /// Firecracker's SendCtrlAltDel: the Ctrl+Alt+Del chord on the guest's i8042 keyboard.
    pub fn ctrl_alt_del(&self) -> Result<(), String> {
        let mut q = self
            .qmp
            .lock()
            .map_err(|_| "the QMP lock is poisoned".to_string())?;
        let keys: Vec<serde_json::Value> = ["ctrl", "alt", "delete"]
            .iter()
            .map(|k| serde_json::json!({"type": "qcode", "data": k}))
            .collect();
        q.execute(serde_json::json!({"execute": "send-key", "arguments": {"keys": keys}}))
            .map(|_| ())
    }

    /// The guest end of a host-side vsock `CONNECT port`: TCP to the guest's address, only for
    /// the agent's port. `None` is Firecracker's answer to a port nobody listens on (the host side
    /// is closed).
    pub fn connect_guest(&self, port: u32) -> Option<TcpStream> {
        if port != u32::from(AGENT_PORT) {
            return None;
        }
        let s = TcpStream::connect_timeout(&self.guest?, GUEST_CONNECT_TIMEOUT).ok()?;
        let _ = s.set_nodelay(true);
        Some(s)
    }
}

/// Copies both ways between the host's vsock connection and the guest's TCP connection until both
/// directions are done, half-closing each side as its peer finishes.
pub fn splice(host: UnixStream, guest: TcpStream) {
    let (Ok(host_w), Ok(guest_w)) = (host.try_clone(), guest.try_clone()) else {
        return;
    };
    let up = thread::spawn(move || {
        let mut host = host;
        let mut guest_w = guest_w;
        let _ = std::io::copy(&mut host, &mut guest_w);
        let _ = guest_w.shutdown(Shutdown::Write);
    });
    let mut guest = guest;
    let mut host_w = host_w;
    let _ = std::io::copy(&mut guest, &mut host_w);
    let _ = host_w.shutdown(Shutdown::Write);
    let _ = up.join();
}

#[cfg(test)]
mod tests {
    use super::*;
    use banger::vmm::models::{BootSource, NetworkInterface, Vsock};

    struct Tmp(PathBuf);
    impl Drop for Tmp {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn tmp(tag: &str) -> Tmp {
        let d = std::env::temp_dir().join(format!("fc-standin-tcg-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Tmp(d)
    }

    /// A minimal x86-64 ELF with one PT_NOTE segment holding `notes`.
    fn elf_with_notes(notes: &[u8]) -> Vec<u8> {
        let mut h = vec![0u8; 64];
        h[..4].copy_from_slice(b"\x7fELF");
        h[4] = 2;
        h[5] = 1;
        h[6] = 1;
        h[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
        h[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
        h[54..56].copy_from_slice(&56u16.to_le_bytes());
        h[56..58].copy_from_slice(&1u16.to_le_bytes());
        let mut ph = vec![0u8; 56];
        ph[0..4].copy_from_slice(&PT_NOTE.to_le_bytes());
        ph[8..16].copy_from_slice(&120u64.to_le_bytes()); // p_offset
        ph[32..40].copy_from_slice(&(notes.len() as u64).to_le_bytes());
        h.extend(ph);
        h.extend(notes);
        h
    }

    fn note(name: &[u8], kind: u32, desc: &[u8]) -> Vec<u8> {
        let mut n = Vec::new();
        n.extend((name.len() as u32).to_le_bytes());
        n.extend((desc.len() as u32).to_le_bytes());
        n.extend(kind.to_le_bytes());
        n.extend(name);
        n.resize(n.len().div_ceil(4) * 4, 0);
        n.extend(desc);
        n.resize(n.len().div_ceil(4) * 4, 0);
        n
    }

    #[test]
    fn pvh_note_table() {
        let t = tmp("pvh");
        let gnu = note(
            b"GNU\0",
            3,
            &[
                1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20,
            ],
        );
        let xen64 = note(b"Xen\0", 18, &0x0100_0abcu64.to_le_bytes());
        let xen32 = note(b"Xen\0", 18, &0x0100_0def_u32.to_le_bytes());
        let xen_other = note(b"Xen\0", 17, &0u64.to_le_bytes());
        let not_xen = note(b"Xyz\0", 18, &0u64.to_le_bytes());
        let good = elf_with_notes(&[gnu.clone(), xen64.clone()].concat());
        let mut wrong_machine = good.clone();
        wrong_machine[18] = 3;
        let mut huge_note = xen64.clone();
        huge_note[4..8].copy_from_slice(&0xffff_fff0u32.to_le_bytes());
        let cases: Vec<(&str, Vec<u8>, Result<u64, &str>)> = vec![
            ("gnu then xen 64", good.clone(), Ok(0x0100_0abc)),
            ("xen 32", elf_with_notes(&xen32), Ok(0x0100_0def)),
            (
                "no xen note",
                elf_with_notes(&[gnu.clone(), xen_other, not_xen].concat()),
                Err("no PVH entry note"),
            ),
            ("empty", vec![], Err("truncated")),
            (
                "garbage",
                b"#!/bin/sh\necho not a kernel, not even close to one............................"
                    .to_vec(),
                Err("not an ELF"),
            ),
            (
                "32-bit",
                {
                    let mut b = good.clone();
                    b[4] = 1;
                    b
                },
                Err("not a 64-bit"),
            ),
            ("arm64", wrong_machine, Err("not x86-64")),
            ("truncated header", good[..40].to_vec(), Err("truncated")),
            ("truncated phdrs", good[..100].to_vec(), Err("truncated")),
            (
                "truncated notes",
                good[..good.len() - 6].to_vec(),
                Err("truncated"),
            ),
            (
                "note size overflow",
                elf_with_notes(&huge_note),
                Err("truncated ELF note"),
            ),
            (
                "tiny guest has no notes",
                elf_with_notes(&[]),
                Err("no PVH entry note"),
            ),
        ];
        for (name, bytes, want) in cases {
            let p = t.0.join("k");
            std::fs::write(&p, &bytes).unwrap();
            match (pvh_entry(&p), want) {
                (Ok(got), Ok(w)) => assert_eq!(got, w, "{name}"),
                (Err(e), Err(w)) => assert!(e.contains(w), "{name}: {e:?} lacks {w:?}"),
                (got, w) => panic!("{name}: got {got:?}, want {w:?}"),
            }
        }
        assert!(pvh_entry(&t.0.join("missing"))
            .unwrap_err()
            .contains("opening"));
    }

    /// Real kernels on this machine, when there are any: a vmlinux built with CONFIG_PVH has the
    /// note; a bzImage (Debian's /boot/vmlinuz-*) is no ELF at all.
    #[test]
    fn pvh_note_real_files() {
        let mut checked = 0;
        if let Some(k) = find_test_kernel() {
            let entry = pvh_entry(&k).unwrap_or_else(|e| panic!("{}: {e}", k.display()));
            assert!(entry > 0x100000 && entry < 0x1_0000_0000, "{entry:#x}");
            checked += 1;
        }
        if let Ok(rd) = std::fs::read_dir("/boot") {
            for e in rd.flatten() {
                if e.file_name().to_string_lossy().starts_with("vmlinuz-") {
                    let err = pvh_entry(&e.path()).unwrap_err();
                    assert!(err.contains("not an ELF"), "{}: {err}", e.path().display());
                    checked += 1;
                }
            }
        }
        // This very test binary: an ELF without a Xen note.
        if let Ok(me) = std::env::current_exe() {
            let err = pvh_entry(&me).unwrap_err();
            assert!(err.contains("no PVH entry note"), "{err}");
            checked += 1;
        }
        assert!(checked > 0);
    }

    #[test]
    fn kernel_args_and_guest_ip_table() {
        let cases: &[(&str, Option<&str>)] = &[
            (
                "console=ttyS0 ip=172.30.0.2::172.30.0.1:255.255.255.0:dev:eth0:off",
                Some("172.30.0.2"),
            ),
            ("ip=10.0.0.9", Some("10.0.0.9")),
            ("ip=10.0.0.9:::255.0.0.0::eth0:none quiet", Some("10.0.0.9")),
            ("ip=dhcp", None),
            ("ip=off", None),
            ("ip=", None),
            ("console=ttyS0", None),
            ("", None),
            ("ip=1.2.3.4 ip=5.6.7.8::", Some("5.6.7.8")),
            ("ip=1.2.3.4 ip=dhcp", None),
            (
                "\"ip=10.1.2.3::10.1.2.1:255.255.255.0:a b:eth0:off\"",
                Some("10.1.2.3"),
            ),
            ("banger.name=\"x y\" ip=10.1.2.4", Some("10.1.2.4")),
            ("ip=300.1.2.3::", None),
            ("noip=1.2.3.4", None),
            ("quiet -- ip=1.2.3.4", None),
            ("ip=1.2.3.4 -- ip=5.6.7.8", Some("1.2.3.4")),
        ];
        for (cmdline, want) in cases {
            let want = want.map(|w| w.parse::<Ipv4Addr>().unwrap());
            assert_eq!(guest_ip(cmdline), want, "{cmdline:?}");
        }
        assert_eq!(
            kernel_args("  a=1  b=\"two words\"  \"c=3\" -- init args"),
            vec!["a=1", "b=two words", "c=3"]
        );
    }

    fn configured(t: &Tmp) -> (Machine, NetworkInterface) {
        let mut m = Machine::new("vm1");
        m.boot_source = Some(BootSource {
            kernel_image_path: t.0.join("vmlinux"),
            boot_args: Some(
                "console=ttyS0 reboot=k panic=1 pci=off ip=172.30.0.5::172.30.0.1:255.255.255.0:dev:eth0:off"
                    .into(),
            ),
            initrd_path: None,
        });
        m.machine.vcpu_count = 2;
        m.machine.mem_size_mib = 1024;
        let drive = |id: &str, root: bool, ro: bool, path: &str| Drive {
            drive_id: id.into(),
            partuuid: None,
            is_root_device: root,
            cache_type: None,
            is_read_only: Some(ro),
            path_on_host: Some(t.0.join(path)),
            rate_limiter: None,
            io_engine: None,
            socket: None,
        };
        // The data drive is configured first; the root drive still becomes vda.
        m.drives.push(drive("data", false, true, "data,1.img"));
        m.drives.push(drive("rootfs", true, false, "rootfs.ext4"));
        let net = NetworkInterface {
            iface_id: "eth0".into(),
            host_dev_name: "bgr-0123456789".into(),
            guest_mac: Some("02:aa:bb:cc:dd:ee".into()),
            mtu: None,
            rx_rate_limiter: None,
            tx_rate_limiter: None,
        };
        (m, net)
    }

    fn strings(p: &Plan) -> Vec<String> {
        p.args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    fn value_of<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
        args.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn plan_from_firecracker_config() {
        let t = tmp("plan");
        let (mut m, mut net) = configured(&t);
        let qmp = t.0.join("q.sock");
        // The stand-in holds the tap open (fd 7 here): QEMU gets that queue.
        let p = plan_with_nets(&m, &[(&net, Some(7))], &qmp).unwrap();
        let a = strings(&p);
        assert_eq!(&a[..4], ["-accel", "tcg", "-M", "microvm,acpi=off"]);
        assert!(a.contains(&"-no-reboot".to_string()));
        assert_eq!(value_of(&a, "-smp"), ["2"]);
        assert_eq!(value_of(&a, "-m"), ["1024M"]);
        assert_eq!(
            value_of(&a, "-kernel"),
            [t.0.join("vmlinux").to_str().unwrap()]
        );
        assert_eq!(
            p.cmdline,
            "console=ttyS0 reboot=k panic=1 pci=off ip=172.30.0.5::172.30.0.1:255.255.255.0:dev:eth0:off pci=off root=/dev/vda rw"
        );
        assert_eq!(value_of(&a, "-append"), [p.cmdline.as_str()]);
        assert_eq!(p.guest_ip, Some(Ipv4Addr::new(172, 30, 0, 5)));
        let root = t.0.join("rootfs.ext4");
        let data = t.0.join("data,,1.img");
        assert_eq!(
            value_of(&a, "-drive"),
            [
                format!(
                    "id=drive_rootfs,file={},format=raw,if=none,readonly=off,cache=unsafe",
                    root.display()
                ),
                format!(
                    "id=drive_data,file={},format=raw,if=none,readonly=on,cache=unsafe",
                    data.display()
                ),
            ]
        );
        assert_eq!(
            value_of(&a, "-device"),
            [
                "i8042",
                "virtio-blk-device,drive=drive_rootfs",
                "virtio-blk-device,drive=drive_data",
                "virtio-net-device,netdev=net_eth0,mac=02:aa:bb:cc:dd:ee"
            ]
        );
        assert_eq!(value_of(&a, "-netdev"), ["tap,id=net_eth0,fd=7"]);
        assert_eq!(p.pass_fds, [7]);
        assert_eq!(
            value_of(&a, "-qmp"),
            [format!("unix:{},server=on,wait=off", qmp.display())]
        );
        assert_eq!(value_of(&a, "-serial"), ["chardev:console"]);
        assert!(value_of(&a, "-initrd").is_empty());
        // Not held: QEMU opens the tap by name.
        let by_name = plan_with_nets(&m, &[(&net, None)], &qmp).unwrap();
        assert_eq!(
            value_of(&strings(&by_name), "-netdev"),
            ["tap,id=net_eth0,ifname=bgr-0123456789,script=no,downscript=no,vnet_hdr=on"]
        );
        assert!(by_name.pass_fds.is_empty());
        // No interface, no netdev.
        let none = plan(&m, &qmp).unwrap();
        assert!(value_of(&strings(&none), "-netdev").is_empty());

        // With a vsock device the guest is told to serve the agent on TCP too.
        let l = std::os::unix::net::UnixListener::bind(t.0.join("v.sock")).unwrap();
        m.vsock = Some((
            Vsock {
                guest_cid: 3,
                uds_path: t.0.join("v.sock"),
                vsock_id: None,
            },
            l,
        ));
        m.boot_source.as_mut().unwrap().initrd_path = Some(t.0.join("initrd.img"));
        m.drives[1].is_read_only = Some(true);
        m.drives[1].partuuid = Some("abcd-01".into());
        net.mtu = Some(1400);
        let p = plan_with_nets(&m, &[(&net, None)], &qmp).unwrap();
        assert!(
            p.cmdline
                .ends_with(" pci=off root=PARTUUID=abcd-01 ro banger.agent_tcp=52"),
            "{}",
            p.cmdline
        );
        assert_eq!(
            value_of(&strings(&p), "-initrd"),
            [t.0.join("initrd.img").to_str().unwrap()]
        );
        assert!(value_of(&strings(&p), "-device")
            .contains(&"virtio-net-device,netdev=net_eth0,mac=02:aa:bb:cc:dd:ee,host_mtu=1400"));

        // Firecracker's default boot arguments when none are given; no root drive, no root=.
        m.boot_source.as_mut().unwrap().boot_args = None;
        m.drives.retain(|d| !d.is_root_device);
        let p = plan(&m, &qmp).unwrap();
        assert_eq!(
            p.cmdline,
            format!("{FIRECRACKER_DEFAULT_BOOT_ARGS} pci=off banger.agent_tcp=52")
        );
        assert_eq!(p.guest_ip, None);

        m.boot_source = None;
        assert!(plan(&m, &qmp).unwrap_err().contains("no boot source"));
    }

    #[test]
    fn engages_only_for_pvh_kernels_with_qemu() {
        let t = tmp("eng");
        let (mut m, _) = configured(&t);
        // A kernel that is an ELF without the PVH note (the tiny guest's shape) never engages.
        std::fs::write(t.0.join("vmlinux"), elf_with_notes(&[])).unwrap();
        assert_eq!(engages(&m), None);
        std::fs::write(
            t.0.join("vmlinux"),
            elf_with_notes(&note(b"Xen\0", 18, &0x0100_0000u32.to_le_bytes())),
        )
        .unwrap();
        match qemu_binary() {
            Some(q) => assert_eq!(engages(&m), Some(q)),
            None => {
                eprintln!("SKIP: engages_only_for_pvh_kernels_with_qemu (positive half): {QEMU} not installed");
                assert_eq!(engages(&m), None);
            }
        }
        m.boot_source = None;
        assert_eq!(engages(&m), None);
    }

    /// The development kernel, when one has been built: `BANGER_TEST_KERNEL`, else the newest
    /// `/var/tmp/banger-cache/kernel/*/vmlinux` (where `packaging/kernel/` caches its builds).
    /// The vsock bridge on loopback: only the agent's port is mapped, bytes flow both ways, and
    /// each side's end of input reaches the other as a half-close.
    #[test]
    fn vsock_bridge_to_guest_tcp() {
        use std::io::Read;
        let guest = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = guest.local_addr().unwrap();
        let agent = thread::spawn(move || {
            let (mut c, _) = guest.accept().unwrap();
            let mut got = String::new();
            c.read_to_string(&mut got).unwrap();
            c.write_all(format!("pong:{got}").as_bytes()).unwrap();
        });
        let (qmp, _qemu_end) = UnixStream::pair().unwrap();
        let engine = Engine {
            qmp: Mutex::new(Qmp {
                r: BufReader::new(qmp.try_clone().unwrap()),
                w: qmp,
            }),
            guest: Some(addr),
        };
        assert!(engine.connect_guest(53).is_none());
        assert!(engine.connect_guest(22).is_none());
        let tcp = engine
            .connect_guest(52)
            .expect("the agent's port is mapped");
        let (mut host, vmm_end) = UnixStream::pair().unwrap();
        let bridge = thread::spawn(move || splice(vmm_end, tcp));
        host.write_all(b"ping").unwrap();
        host.shutdown(Shutdown::Write).unwrap();
        let mut answer = String::new();
        host.read_to_string(&mut answer).unwrap();
        assert_eq!(answer, "pong:ping");
        agent.join().unwrap();
        bridge.join().unwrap();

        let nowhere = Engine {
            guest: None,
            ..engine
        };
        assert!(nowhere.connect_guest(52).is_none());
    }

    /// The QMP client against a scripted QEMU end: greeting, capabilities, events skipped, the
    /// Ctrl+Alt+Del chord as QEMU's qcodes, QMP errors reported.
    #[test]
    fn qmp_ctrl_alt_del() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let qemu = thread::spawn(move || {
            let mut w = theirs.try_clone().unwrap();
            let mut r = BufReader::new(theirs);
            let mut got = Vec::new();
            let mut line = String::new();
            w.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": [\"oob\"]}}\r\n")
                .unwrap();
            for answer in [
                "{\"return\": {}}",
                "{\"timestamp\": {}, \"event\": \"RTC_CHANGE\"}\r\n{\"return\": {}}",
                "{\"error\": {\"class\": \"GenericError\", \"desc\": \"no keyboard\"}}",
            ] {
                line.clear();
                r.read_line(&mut line).unwrap();
                got.push(serde_json::from_str::<serde_json::Value>(&line).unwrap());
                w.write_all(format!("{answer}\r\n").as_bytes()).unwrap();
            }
            got
        });
        let engine = Engine {
            qmp: Mutex::new(Qmp::handshake(ours).unwrap()),
            guest: None,
        };
        engine.ctrl_alt_del().unwrap();
        let err = engine.ctrl_alt_del().unwrap_err();
        assert!(err.contains("no keyboard"), "{err}");
        let got = qemu.join().unwrap();
        assert_eq!(got[0], serde_json::json!({"execute": "qmp_capabilities"}));
        assert_eq!(
            got[1],
            serde_json::json!({"execute": "send-key", "arguments": {"keys": [
                {"type": "qcode", "data": "ctrl"},
                {"type": "qcode", "data": "alt"},
                {"type": "qcode", "data": "delete"}
            ]}})
        );
        // QEMU gone: a clear error, not a hang.
        assert!(engine.ctrl_alt_del().unwrap_err().contains("QMP"));
    }

    fn find_test_kernel() -> Option<PathBuf> {
        if let Some(k) = std::env::var_os("BANGER_TEST_KERNEL") {
            return Some(PathBuf::from(k));
        }
        let rd = std::fs::read_dir("/var/tmp/banger-cache/kernel").ok()?;
        rd.flatten()
            .map(|e| e.path().join("vmlinux"))
            .filter(|p| p.is_file())
            .max_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
    }
}
