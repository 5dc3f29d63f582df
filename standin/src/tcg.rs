//! The stand-in's TCG engine: when `qemu-system-x86_64` is installed and the configured kernel is a
//! Linux `vmlinux` with a PVH entry note, InstanceStart boots that kernel for real under
//! `qemu-system-x86_64 -accel tcg -M microvm` instead of pretending (DESIGN §13).
//!
//! It owns: deciding whether to engage ([`engages`]), the QEMU command line built from the
//! Firecracker configuration the API accepted ([`plan`]: vcpus, memory, drives, the tap, the boot
//! arguments Firecracker would pass, the serial console on the stand-in's stdout), the QEMU child
//! (it dies with the stand-in: `PR_SET_PDEATHSIG`), QMP on a private socket (Ctrl+Alt+Del; pause and
//! resume; snapshots as QEMU migration streams: [`Engine::save`] into the memory file, [`restore`]
//! from it into a new QEMU with the same devices), and the map of Firecracker's vsock device (which
//! QEMU cannot offer here: no `/dev/vhost-vsock`) onto the guest's TCP port 52 through the tap. A
//! restored guest keeps the snapshot's address until the agent's `reconfigure` answer, which the
//! vsock splice reads, moves it ([`Engine::splice`]). It never decides an API answer (that is
//! [`crate::machine`]), never creates or changes a network object (the tap is the one the host
//! made), and is never shipped: tests only.

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
use std::sync::atomic::{AtomicBool, Ordering};
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

/// How long a host-side `CONNECT 52` keeps trying a restored guest not reconfigured yet (well
/// under the 90 s the daemon gives `reconfigure`).
const RESTORED_CONNECT_TIMEOUT: Duration = Duration::from_secs(20);

/// How long a migration stream may take to be written or read back (a TCG guest's memory on a
/// busy machine; QEMU skips zero pages, so a mostly idle guest takes a second or two).
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(600);

/// The QMP name the memory file's descriptor gets for `migrate fd:`.
const MIGRATION_FD_NAME: &str = "banger-snapshot";

/// Migration bandwidth: QEMU's default (128 MiB/s) would throttle a local file for nothing.
const MIGRATION_MAX_BANDWIDTH: u64 = 8 << 30;

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
    /// The guest agent's TCP address: from `ip=`, then from each accepted `reconfigure`.
    guest: Mutex<Option<SocketAddr>>,
    /// Restored and not reconfigured yet: the guest still answers the snapshot's address, which
    /// another clone may have used, so each connection is preceded by `announce-self`.
    announce: AtomicBool,
    /// The file QEMU has open for each drive.
    drives: Vec<(String, Option<PathBuf>)>,
}

fn drive_paths(m: &Machine) -> Vec<(String, Option<PathBuf>)> {
    m.drives
        .iter()
        .map(|d| (d.drive_id.clone(), d.path_on_host.clone()))
        .collect()
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
    let engine = start_engine(m, qemu, on_exit)?;
    Ok(ENGINE.get_or_init(|| engine))
}

/// [`start`] without the process-wide engine slot (tests run several).
fn start_engine(
    m: &Machine,
    qemu: &Path,
    on_exit: impl FnOnce(i32) + Send + 'static,
) -> Result<Engine, String> {
    let dir = private_dir()?;
    let qmp_path = dir.join("qmp.sock");
    let result = plan(m, &qmp_path).and_then(|p| spawn_and_connect(m, p, qemu, &qmp_path, on_exit));
    let _ = std::fs::remove_file(&qmp_path);
    let _ = std::fs::remove_dir(&dir);
    result
}

/// `plan` for a restore: the same machine, plus `-S -incoming fd:<mem_fd>` (QEMU reads the
/// migration stream from that descriptor and stays paused).
fn restore_plan(mut plan: Plan, mem_fd: RawFd) -> Plan {
    plan.args.extend(
        ["-S".to_string(), "-incoming".into(), format!("fd:{mem_fd}")]
            .into_iter()
            .map(OsString::from),
    );
    plan.pass_fds.push(mem_fd);
    plan
}

/// A snapshot loaded with `resume_vm: false`, waiting for the resume that starts its QEMU (so
/// that a drive re-pointed meanwhile, `PATCH /drives`, is the file QEMU opens).
struct Pending {
    qemu: PathBuf,
    mem_file: PathBuf,
    on_exit: Box<dyn FnOnce(i32) + Send>,
}

static PENDING: Mutex<Option<Pending>> = Mutex::new(None);

/// The first bytes of every QEMU migration stream (`QEMU_VM_FILE_MAGIC`).
const MIGRATION_MAGIC: &[u8; 4] = b"QEVM";

fn pending() -> std::sync::MutexGuard<'static, Option<Pending>> {
    PENDING.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether the TCG engine is in charge of this VM: it runs a guest, or holds a loaded snapshot
/// that starts at the next resume.
pub fn active() -> bool {
    ENGINE.get().is_some() || pending().is_some()
}

/// Firecracker's snapshot load for a TCG snapshot. `m` is the machine rebuilt from the vmstate
/// (overrides applied, taps open); `mem_file` must hold a QEMU migration stream. With `resume`
/// QEMU starts now (see [`resume`]); without, the snapshot waits, paused, for [`resume`]. `on_exit`
/// as for [`start`].
pub fn restore(
    m: &Machine,
    mem_file: &Path,
    resume_now: bool,
    on_exit: impl FnOnce(i32) + Send + 'static,
) -> Result<(), String> {
    if active() {
        return Err("the TCG engine already runs a guest".into());
    }
    let qemu = qemu_binary().ok_or_else(|| {
        format!("the snapshot was taken by the TCG engine, and {QEMU} is not installed or {QEMU_ENV}=off")
    })?;
    let mut magic = [0u8; 4];
    File::open(mem_file)
        .and_then(|f| f.read_exact_at(&mut magic, 0))
        .map_err(|e| format!("reading the memory file {}: {e}", mem_file.display()))?;
    if &magic != MIGRATION_MAGIC {
        return Err(format!(
            "the memory file {} is not a QEMU migration stream (the TCG engine's snapshots are)",
            mem_file.display()
        ));
    }
    *pending() = Some(Pending {
        qemu,
        mem_file: mem_file.to_path_buf(),
        on_exit: Box::new(on_exit),
    });
    if resume_now {
        return resume(m);
    }
    Ok(())
}

/// `PATCH /vm {"state":"Paused"}`: QMP `stop`; a loaded snapshot not started yet is paused
/// already.
pub fn pause() -> Result<(), String> {
    match ENGINE.get() {
        Some(e) => e.pause(),
        None => Ok(()),
    }
}

/// `PATCH /vm {"state":"Resumed"}`: a loaded snapshot starts (QEMU with `m`'s devices reads the
/// stream, then continues); a running engine continues (QMP `cont`), refused when a drive of `m`
/// names another file than the one QEMU has open (QEMU cannot switch it).
pub fn resume(m: &Machine) -> Result<(), String> {
    if let Some(e) = ENGINE.get() {
        e.same_drives(m)?;
        return e.resume();
    }
    let Some(p) = pending().take() else {
        return Err("the TCG engine has no guest".into());
    };
    let engine = restore_engine(m, &p.qemu, &p.mem_file, true, p.on_exit)?;
    let _ = ENGINE.set(engine);
    Ok(())
}

/// `PUT /snapshot/create` for the TCG engine: the running guest's migration stream into
/// `mem_file` ([`Engine::save`]); a loaded snapshot not started yet is copied as it is.
pub fn save(mem_file: &Path) -> Result<(), String> {
    if let Some(e) = ENGINE.get() {
        return e.save(mem_file);
    }
    let from = pending()
        .as_ref()
        .map(|p| p.mem_file.clone())
        .ok_or("the TCG engine has no guest")?;
    std::fs::copy(&from, mem_file)
        .map(drop)
        .map_err(|e| format!("copying {} to {}: {e}", from.display(), mem_file.display()))
}

/// Starts QEMU for `m` reading the migration stream in `mem_file`, waits for the stream to be
/// read completely, and continues the guest when `resume`. An error (with QEMU's last words)
/// leaves no QEMU running.
fn restore_engine(
    m: &Machine,
    qemu: &Path,
    mem_file: &Path,
    resume: bool,
    on_exit: impl FnOnce(i32) + Send + 'static,
) -> Result<Engine, String> {
    // Kept open until QEMU has been spawned with its own copy.
    let mem = File::open(mem_file)
        .map_err(|e| format!("opening the memory file {}: {e}", mem_file.display()))?;
    let dir = private_dir()?;
    let qmp_path = dir.join("qmp.sock");
    let result = plan(m, &qmp_path).and_then(|p| {
        spawn_and_connect(
            m,
            restore_plan(p, mem.as_raw_fd()),
            qemu,
            &qmp_path,
            on_exit,
        )
    });
    let _ = std::fs::remove_file(&qmp_path);
    let _ = std::fs::remove_dir(&dir);
    drop(mem);
    let engine = result?;
    if let Err(e) = engine.finish_incoming(resume) {
        let _ = engine.quit();
        return Err(e);
    }
    engine.announce.store(true, Ordering::SeqCst);
    Ok(engine)
}

fn spawn_and_connect(
    m: &Machine,
    plan: Plan,
    qemu: &Path,
    qmp_path: &Path,
    on_exit: impl FnOnce(i32) + Send + 'static,
) -> Result<Engine, String> {
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
        guest: Mutex::new(guest),
        announce: AtomicBool::new(false),
        drives: drive_paths(m),
    })
}

/// Sends `data` on `s` with descriptor `fd` attached (SCM_RIGHTS), as QMP's `getfd` wants it.
fn send_with_fd(s: &UnixStream, data: &[u8], fd: RawFd) -> std::io::Result<()> {
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: CMSG_SPACE/CMSG_LEN are pure arithmetic.
    let (space, len) = unsafe {
        (
            libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) as usize,
            libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32),
        )
    };
    // u64 words: the control buffer must be aligned for cmsghdr.
    let mut control = vec![0u64; space.div_ceil(8)];
    // SAFETY: msghdr is plain old data; all-zero is a valid starting value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: msg_control points at `space` writable, aligned bytes, enough for one cmsghdr with
    // one descriptor (CMSG_SPACE), so CMSG_FIRSTHDR is non-null and CMSG_DATA has room for it;
    // sendmsg reads only the buffers msg points at, which outlive the call.
    let n = unsafe {
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = len as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<RawFd>(), fd);
        libc::sendmsg(s.as_raw_fd(), &msg, libc::MSG_NOSIGNAL)
    };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // The descriptor went with the first byte; the rest (if any) is plain data.
    (&*s).write_all(&data[n as usize..])
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
        self.execute_with_fd(cmd, None)
    }

    /// [`Self::execute`], with a descriptor attached to the command (for `getfd`).
    fn execute_with_fd(
        &mut self,
        cmd: serde_json::Value,
        fd: Option<RawFd>,
    ) -> Result<serde_json::Value, String> {
        let mut text = cmd.to_string();
        text.push('\n');
        match fd {
            Some(fd) => send_with_fd(&self.w, text.as_bytes(), fd),
            None => self.w.write_all(text.as_bytes()),
        }
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

    fn qmp(&self) -> Result<std::sync::MutexGuard<'_, Qmp>, String> {
        self.qmp
            .lock()
            .map_err(|_| "the QMP lock is poisoned".to_string())
    }

    /// Refuses when a drive of `m` is another file than the one QEMU has open.
    fn same_drives(&self, m: &Machine) -> Result<(), String> {
        for (id, path) in drive_paths(m) {
            let open = self.drives.iter().find(|(d, _)| *d == id).map(|(_, p)| p);
            if open != Some(&path) {
                return Err(format!(
                    "drive {id} now names {}, but QEMU has {} open and cannot switch a running guest's drive (re-point drives only between a snapshot load and the resume, or back before resuming)",
                    path.as_deref().map_or("nothing".into(), |p| p.display().to_string()),
                    open.and_then(|p| p.as_deref()).map_or("nothing".into(), |p| p.display().to_string()),
                ));
            }
        }
        Ok(())
    }

    /// Firecracker's `PUT /vm {"state":"Paused"}`: QMP `stop`.
    pub fn pause(&self) -> Result<(), String> {
        self.qmp()?
            .execute(serde_json::json!({"execute": "stop"}))
            .map(drop)
    }

    /// Firecracker's `PUT /vm {"state":"Resumed"}`: QMP `cont` (also after a [`Self::save`]).
    pub fn resume(&self) -> Result<(), String> {
        self.qmp()?
            .execute(serde_json::json!({"execute": "cont"}))
            .map(drop)
    }

    /// Firecracker's full snapshot's memory file: QEMU's migration stream of the paused guest
    /// (devices and memory) written into `mem_file` (created or truncated, mode 0600). Returns
    /// once QEMU says the migration completed; the guest stays paused.
    pub fn save(&self, mem_file: &Path) -> Result<(), String> {
        use std::os::unix::fs::OpenOptionsExt;
        let mut q = self.qmp()?;
        let status = q.execute(serde_json::json!({"execute": "query-status"}))?;
        if status.get("running").and_then(serde_json::Value::as_bool) != Some(false) {
            return Err(format!(
                "the guest is not paused (QEMU status {}): pause it before taking a snapshot",
                status.get("status").unwrap_or(&status)
            ));
        }
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(mem_file)
            .map_err(|e| format!("creating the memory file {}: {e}", mem_file.display()))?;
        q.execute_with_fd(
            serde_json::json!({"execute": "getfd", "arguments": {"fdname": MIGRATION_FD_NAME}}),
            Some(f.as_raw_fd()),
        )?;
        q.execute(serde_json::json!({"execute": "migrate-set-parameters",
            "arguments": {"max-bandwidth": MIGRATION_MAX_BANDWIDTH}}))?;
        q.execute(serde_json::json!({"execute": "migrate",
            "arguments": {"uri": format!("fd:{MIGRATION_FD_NAME}")}}))?;
        wait_migration(&mut q, "writing the migration stream")?;
        f.sync_all()
            .map_err(|e| format!("syncing the memory file {}: {e}", mem_file.display()))
    }

    /// After `-incoming`: waits until the stream is read, then `cont` when `resume`.
    fn finish_incoming(&self, resume: bool) -> Result<(), String> {
        let mut q = self.qmp()?;
        wait_migration(&mut q, "reading the migration stream")?;
        if resume {
            q.execute(serde_json::json!({"execute": "cont"}))?;
        }
        Ok(())
    }

    /// Ends QEMU (a failed restore).
    fn quit(&self) -> Result<(), String> {
        self.qmp()?
            .execute(serde_json::json!({"execute": "quit"}))
            .map(drop)
    }

    /// Where the agent's port is reached now.
    pub fn guest_addr(&self) -> Option<SocketAddr> {
        *self.guest.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The guest end of a host-side vsock `CONNECT port`: TCP to the guest's address, only for
    /// the agent's port. `None` is Firecracker's answer to a port nobody listens on (the host side
    /// is closed). A restored guest not reconfigured yet announces itself first (QMP
    /// `announce-self`: the bridge learns that the snapshot's MAC is behind this clone's tap).
    pub fn connect_guest(&self, port: u32) -> Option<TcpStream> {
        if port != u32::from(AGENT_PORT) {
            return None;
        }
        let addr = self.guest_addr()?;
        // A restored guest's agent listens (its memory says so), but the way to it settles only
        // after the restore (the bridge learning the MAC's new port, the host's neighbour entry
        // for an address another clone just gave up): keep trying for a while.
        let deadline = Instant::now() + RESTORED_CONNECT_TIMEOUT;
        loop {
            let restored = self.announce.load(Ordering::SeqCst);
            if restored {
                let r = self.qmp().and_then(|mut q| {
                    q.execute(serde_json::json!({"execute": "announce-self",
                        "arguments": {"initial": 0, "max": 50, "rounds": 3, "step": 50}}))
                });
                if let Err(e) = r {
                    eprintln!("stand-in: TCG engine: announce-self: {e}");
                }
            }
            match TcpStream::connect_timeout(&addr, GUEST_CONNECT_TIMEOUT) {
                Ok(s) => {
                    let _ = s.set_nodelay(true);
                    return Some(s);
                }
                Err(e) if restored && Instant::now() < deadline => {
                    eprintln!("stand-in: TCG engine: restored guest at {addr}: {e}; trying again");
                    thread::sleep(Duration::from_millis(200));
                }
                Err(_) => return None,
            }
        }
    }

    /// Copies both ways between the host's vsock connection and the guest's TCP connection until
    /// both directions are done, half-closing each side as its peer finishes. It reads the agent's
    /// line protocol on the way: a `reconfigure` request answered `"ok":true` moves the guest's
    /// address to the request's `ip` for every later connection (the old one is gone from the
    /// guest); that connection is then closed both ways once the host is done with it (the guest
    /// can no longer hear the host on it).
    pub fn splice(&self, host: UnixStream, guest: TcpStream) {
        let (Ok(host_w), Ok(guest_w)) = (host.try_clone(), guest.try_clone()) else {
            return;
        };
        let pending: Arc<Mutex<VecDeque<Option<Ipv4Addr>>>> = Arc::default();
        let moved = Arc::new(AtomicBool::new(false));
        let (pending2, moved2) = (pending.clone(), moved.clone());
        let up = thread::spawn(move || {
            let mut host = BufReader::new(host);
            let mut guest_w = guest_w;
            let mut line = Vec::new();
            loop {
                line.clear();
                match host.read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                if line.ends_with(b"\n") {
                    if let Ok(mut p) = pending2.lock() {
                        p.push_back(reconfigure_target(&line));
                    }
                }
                if guest_w.write_all(&line).is_err() {
                    break;
                }
            }
            let how = if moved2.load(Ordering::SeqCst) {
                Shutdown::Both
            } else {
                Shutdown::Write
            };
            let _ = guest_w.shutdown(how);
        });
        let mut guest = BufReader::new(guest);
        let mut host_w = host_w;
        let mut line = Vec::new();
        loop {
            line.clear();
            match guest.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            if line.ends_with(b"\n") {
                let target = pending
                    .lock()
                    .ok()
                    .and_then(|mut p| p.pop_front())
                    .flatten();
                if let Some(ip) = target.filter(|_| answer_ok(&line)) {
                    let addr = SocketAddr::from((ip, AGENT_PORT));
                    *self.guest.lock().unwrap_or_else(|e| e.into_inner()) = Some(addr);
                    self.announce.store(false, Ordering::SeqCst);
                    moved.store(true, Ordering::SeqCst);
                    eprintln!("stand-in: TCG engine: the guest was reconfigured: vsock port {AGENT_PORT} -> tcp {addr}");
                }
            }
            if host_w.write_all(&line).is_err() {
                break;
            }
        }
        let _ = host_w.shutdown(Shutdown::Write);
        let _ = up.join();
    }
}

/// Polls `query-migrate` until the migration completed (`Ok`) or failed, was cancelled or took
/// longer than [`MIGRATION_TIMEOUT`].
fn wait_migration(q: &mut Qmp, what: &str) -> Result<(), String> {
    let deadline = Instant::now() + MIGRATION_TIMEOUT;
    loop {
        let v = q.execute(serde_json::json!({"execute": "query-migrate"}))?;
        match v.get("status").and_then(serde_json::Value::as_str) {
            Some("completed") => return Ok(()),
            Some(s @ ("failed" | "cancelled")) => {
                return Err(format!(
                    "{what}: QEMU's migration {s}{}",
                    v.get("error-desc")
                        .and_then(serde_json::Value::as_str)
                        .map(|d| format!(": {d}"))
                        .unwrap_or_default()
                ))
            }
            _ if Instant::now() > deadline => {
                return Err(format!(
                    "{what}: not done within {}s (QEMU says {v})",
                    MIGRATION_TIMEOUT.as_secs()
                ))
            }
            _ => thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// The address a request line asks the guest to move to: `params.ip` of a `reconfigure`.
fn reconfigure_target(line: &[u8]) -> Option<Ipv4Addr> {
    let v: serde_json::Value = serde_json::from_slice(line).ok()?;
    if v.get("method")?.as_str()? != "reconfigure" {
        return None;
    }
    let ip = v.get("params")?.get("ip")?.as_str()?;
    ip.split('/').next()?.parse().ok()
}

/// Whether an answer line is `{"ok":true,…}`.
fn answer_ok(line: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(line)
        .ok()
        .and_then(|v| v.get("ok").and_then(serde_json::Value::as_bool))
        == Some(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testdir::{tmp, Tmp};
    use banger::vmm::models::{BootSource, NetworkInterface, Vsock};

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
        let t = tmp("tcg-pvh");
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
        let t = tmp("tcg-plan");
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
        let t = tmp("tcg-eng");
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
            guest: Mutex::new(Some(addr)),
            announce: AtomicBool::new(false),
            drives: Vec::new(),
        };
        assert!(engine.connect_guest(53).is_none());
        assert!(engine.connect_guest(22).is_none());
        let tcp = engine
            .connect_guest(52)
            .expect("the agent's port is mapped");
        let (mut host, vmm_end) = UnixStream::pair().unwrap();
        let engine = Arc::new(engine);
        let e2 = engine.clone();
        let bridge = thread::spawn(move || e2.splice(vmm_end, tcp));
        host.write_all(b"ping").unwrap();
        host.shutdown(Shutdown::Write).unwrap();
        let mut answer = String::new();
        host.read_to_string(&mut answer).unwrap();
        assert_eq!(answer, "pong:ping");
        agent.join().unwrap();
        bridge.join().unwrap();

        *engine.guest.lock().unwrap() = None;
        assert!(engine.connect_guest(52).is_none());
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
            guest: Mutex::new(None),
            announce: AtomicBool::new(false),
            drives: Vec::new(),
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

    /// Reads one line from a scripted QEMU's end with recvmsg, keeping a descriptor that came
    /// with it (QMP's `getfd`).
    fn recv_line(s: &UnixStream) -> (serde_json::Value, Option<std::os::fd::OwnedFd>) {
        use std::os::fd::FromRawFd;
        let mut line = Vec::new();
        let mut fd = None;
        while !line.ends_with(b"\n") {
            let mut buf = [0u8; 4096];
            let mut iov = libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: buf.len(),
            };
            let mut control = [0u64; 8];
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = std::mem::size_of_val(&control) as _;
            let n = unsafe { libc::recvmsg(s.as_raw_fd(), &mut msg, 0) };
            assert!(n > 0, "recvmsg: {}", std::io::Error::last_os_error());
            unsafe {
                let c = libc::CMSG_FIRSTHDR(&msg);
                if !c.is_null() && (*c).cmsg_type == libc::SCM_RIGHTS {
                    let raw = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<RawFd>());
                    fd = Some(std::os::fd::OwnedFd::from_raw_fd(raw));
                }
            }
            line.extend_from_slice(&buf[..n as usize]);
        }
        (serde_json::from_slice(&line).unwrap(), fd)
    }

    /// A scripted QEMU: greeting, then for each command the answer `reply` gives (events may
    /// precede it); returns the commands it got and what was written into a passed descriptor.
    fn scripted_qemu(
        theirs: UnixStream,
        reply: impl Fn(&serde_json::Value, Option<&std::os::fd::OwnedFd>) -> Option<String>
            + Send
            + 'static,
    ) -> thread::JoinHandle<Vec<serde_json::Value>> {
        thread::spawn(move || {
            let mut w = theirs.try_clone().unwrap();
            w.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\r\n")
                .unwrap();
            let mut got = Vec::new();
            loop {
                let mut probe = [0u8; 1];
                let n = unsafe {
                    libc::recv(
                        theirs.as_raw_fd(),
                        probe.as_mut_ptr().cast(),
                        1,
                        libc::MSG_PEEK,
                    )
                };
                if n <= 0 {
                    return got;
                }
                let (cmd, fd) = recv_line(&theirs);
                let answer = reply(&cmd, fd.as_ref());
                got.push(cmd);
                match answer {
                    Some(a) => w.write_all(format!("{a}\r\n").as_bytes()).unwrap(),
                    None => return got,
                }
            }
        })
    }

    fn engine_on(ours: UnixStream) -> Engine {
        Engine {
            qmp: Mutex::new(Qmp::handshake(ours).unwrap()),
            guest: Mutex::new(None),
            announce: AtomicBool::new(false),
            drives: Vec::new(),
        }
    }

    /// pause/resume are QMP stop/cont; save checks the guest is paused, hands QEMU the memory
    /// file by descriptor (`getfd`, SCM_RIGHTS), lifts the bandwidth cap, migrates to `fd:` and
    /// waits for `completed` (events and `active` polls in between); what QEMU writes through
    /// the descriptor is the file's content, mode 0600.
    #[test]
    fn qmp_pause_resume_save() {
        use std::os::unix::fs::PermissionsExt;
        let t = tmp("tcg-save");
        let (ours, theirs) = UnixStream::pair().unwrap();
        let polls = Arc::new(Mutex::new(0));
        let polls2 = polls.clone();
        let qemu = scripted_qemu(theirs, move |cmd, fd| {
            let ok = "{\"return\": {}}".to_string();
            Some(match cmd["execute"].as_str().unwrap() {
                "query-status" => {
                    "{\"return\": {\"status\": \"paused\", \"running\": false}}".into()
                }
                "getfd" => {
                    let mut f = File::from(
                        fd.expect("getfd came with a descriptor")
                            .try_clone()
                            .unwrap(),
                    );
                    f.write_all(b"QEVM stream").unwrap();
                    ok
                }
                "query-migrate" => {
                    let mut n = polls2.lock().unwrap();
                    *n += 1;
                    if *n < 3 {
                        "{\"event\": \"MIGRATION\", \"data\": {}}\r\n{\"return\": {\"status\": \"active\"}}".into()
                    } else {
                        "{\"return\": {\"status\": \"completed\"}}".into()
                    }
                }
                _ => ok,
            })
        });
        let engine = engine_on(ours);
        engine.pause().unwrap();
        let mem = t.0.join("mem");
        engine.save(&mem).unwrap();
        engine.resume().unwrap();
        assert_eq!(std::fs::read(&mem).unwrap(), b"QEVM stream");
        assert_eq!(
            std::fs::metadata(&mem).unwrap().permissions().mode() & 0o777,
            0o600
        );
        drop(engine);
        let got = qemu.join().unwrap();
        let names: Vec<&str> = got.iter().map(|c| c["execute"].as_str().unwrap()).collect();
        assert_eq!(
            names,
            [
                "qmp_capabilities",
                "stop",
                "query-status",
                "getfd",
                "migrate-set-parameters",
                "migrate",
                "query-migrate",
                "query-migrate",
                "query-migrate",
                "cont"
            ]
        );
        assert_eq!(
            got[3]["arguments"],
            serde_json::json!({"fdname": MIGRATION_FD_NAME})
        );
        assert_eq!(
            got[4]["arguments"],
            serde_json::json!({"max-bandwidth": MIGRATION_MAX_BANDWIDTH})
        );
        assert_eq!(
            got[5]["arguments"],
            serde_json::json!({"uri": format!("fd:{MIGRATION_FD_NAME}")})
        );
    }

    /// A running guest is refused before any file is made; a failed migration says QEMU's why.
    #[test]
    fn qmp_save_refusals() {
        let t = tmp("tcg-saveno");
        let (ours, theirs) = UnixStream::pair().unwrap();
        let running = Arc::new(Mutex::new(true));
        let r2 = running.clone();
        let qemu = scripted_qemu(theirs, move |cmd, _| {
            Some(match cmd["execute"].as_str().unwrap() {
                "query-status" if *r2.lock().unwrap() => {
                    "{\"return\": {\"status\": \"running\", \"running\": true}}".into()
                }
                "query-status" => "{\"return\": {\"status\": \"paused\", \"running\": false}}".into(),
                "query-migrate" => "{\"return\": {\"status\": \"failed\", \"error-desc\": \"No space left on device\"}}".into(),
                _ => "{\"return\": {}}".into(),
            })
        });
        let engine = engine_on(ours);
        let mem = t.0.join("mem");
        let e = engine.save(&mem).unwrap_err();
        assert!(e.contains("not paused") && e.contains("running"), "{e}");
        assert!(!mem.exists());
        *running.lock().unwrap() = false;
        let e = engine.save(&mem).unwrap_err();
        assert!(
            e.contains("migration failed: No space left on device"),
            "{e}"
        );
        let e = engine.save(&t.0.join("no/such/dir/mem")).unwrap_err();
        assert!(e.contains("creating the memory file"), "{e}");
        drop(engine);
        qemu.join().unwrap();
    }

    /// A restore is the boot's command line plus `-S -incoming fd:N`, N inherited by QEMU.
    #[test]
    fn restore_plan_adds_incoming() {
        let t = tmp("tcg-rplan");
        let (m, net) = configured(&t);
        let qmp = t.0.join("q.sock");
        let boot = plan_with_nets(&m, &[(&net, Some(7))], &qmp).unwrap();
        let r = restore_plan(boot.clone(), 9);
        let (a, b) = (strings(&r), strings(&boot));
        assert_eq!(a[..b.len()], b[..]);
        assert_eq!(a[b.len()..], ["-S", "-incoming", "fd:9"]);
        assert_eq!(r.pass_fds, [7, 9]);
        assert_eq!(r.guest_ip, boot.guest_ip);
    }

    /// The splice reads the agent's lines: only a reconfigure answered ok moves the address
    /// (and stops the announcements); failed ones, other methods and garbage do not.
    #[test]
    fn splice_follows_reconfigure() {
        use std::io::Read;
        let guest = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = guest.local_addr().unwrap();
        // A fake agent: answers each line; a reconfigure to 10.9.8.66 fails, others succeed.
        let agent = thread::spawn(move || {
            let (c, _) = guest.accept().unwrap();
            let mut w = c.try_clone().unwrap();
            for line in BufReader::new(c).lines() {
                let line = line.unwrap();
                let answer = if line.contains("10.9.8.66") || !line.starts_with('{') {
                    r#"{"ok":false,"error":"reconfigure refused: no"}"#
                } else {
                    r#"{"ok":true,"result":{"instance_id":"00","boot_id":"b"}}"#
                };
                w.write_all(format!("{answer}\n").as_bytes()).unwrap();
            }
        });
        let (qmp, _q) = UnixStream::pair().unwrap();
        let engine = Arc::new(Engine {
            qmp: Mutex::new(Qmp {
                r: BufReader::new(qmp.try_clone().unwrap()),
                w: qmp,
            }),
            guest: Mutex::new(Some(addr)),
            announce: AtomicBool::new(true),
            drives: Vec::new(),
        });
        let tcp = TcpStream::connect(addr).unwrap();
        let (host, vmm_end) = UnixStream::pair().unwrap();
        let e2 = engine.clone();
        let bridge = thread::spawn(move || e2.splice(vmm_end, tcp));
        let mut r = BufReader::new(host.try_clone().unwrap());
        let mut w = host;
        let mut ask = |line: &str| {
            w.write_all(format!("{line}\n").as_bytes()).unwrap();
            let mut a = String::new();
            r.read_line(&mut a).unwrap();
            a
        };
        let reconf = |ip: &str| {
            serde_json::json!({"method": "reconfigure", "params": {"ip": ip}}).to_string()
        };
        assert!(ask(r#"{"method":"hello"}"#).contains("\"ok\":true"));
        assert!(ask("not json").contains("\"ok\":false"));
        assert!(ask(&reconf("10.9.8.66/24")).contains("\"ok\":false"));
        assert_eq!(engine.guest_addr(), Some(addr));
        assert!(engine.announce.load(Ordering::SeqCst));
        assert!(ask(&reconf("10.9.8.7/24")).contains("\"ok\":true"));
        assert_eq!(engine.guest_addr(), Some("10.9.8.7:52".parse().unwrap()));
        assert!(!engine.announce.load(Ordering::SeqCst));
        // After a move the host's end of input closes the guest connection both ways.
        w.shutdown(Shutdown::Write).unwrap();
        let mut rest = String::new();
        r.read_to_string(&mut rest).unwrap();
        assert_eq!(rest, "");
        bridge.join().unwrap();
        agent.join().unwrap();
        assert_eq!(
            reconfigure_target(reconf("10.1.2.3").as_bytes()),
            Some(Ipv4Addr::new(10, 1, 2, 3))
        );
        assert_eq!(
            reconfigure_target(b"{\"method\":\"hello\",\"params\":{\"ip\":\"10.0.0.1/8\"}}"),
            None
        );
        assert!(!answer_ok(b"{\"ok\":\"true\"}"));
    }

    /// Loading a TCG snapshot: the memory file must be a migration stream (else refused, nothing
    /// held); without resume_vm it waits (paused: pause is a no-op, a new snapshot copies the
    /// stream); a resume that would need QEMU to switch a drive's file is refused.
    #[test]
    fn restore_pending_and_drive_checks() {
        let t = tmp("tcg-pending");
        let (m, _) = configured(&t);
        let bad = t.0.join("bad.mem");
        std::fs::write(&bad, b"not a stream").unwrap();
        if qemu_binary().is_none() {
            eprintln!("SKIP: restore_pending_and_drive_checks (load half): {QEMU} not installed");
        } else {
            let e = restore(&m, &bad, false, |_| {}).unwrap_err();
            assert!(e.contains("not a QEMU migration stream"), "{e}");
            let e = restore(&m, &t.0.join("missing"), false, |_| {}).unwrap_err();
            assert!(e.contains("reading the memory file"), "{e}");
            assert!(!active());
            let good = t.0.join("good.mem");
            std::fs::write(&good, b"QEVM\0\0\0\x03rest of the stream").unwrap();
            restore(&m, &good, false, |_| {}).unwrap();
            assert!(active());
            assert!(restore(&m, &good, false, |_| {})
                .unwrap_err()
                .contains("already"));
            pause().unwrap();
            let copy = t.0.join("again.mem");
            save(&copy).unwrap();
            assert_eq!(std::fs::read(&copy).unwrap(), std::fs::read(&good).unwrap());
            *pending() = None;
            assert!(!active());
        }
        let (ours, _theirs) = UnixStream::pair().unwrap();
        let engine = Engine {
            qmp: Mutex::new(Qmp {
                r: BufReader::new(ours.try_clone().unwrap()),
                w: ours,
            }),
            guest: Mutex::new(None),
            announce: AtomicBool::new(false),
            drives: drive_paths(&m),
        };
        engine.same_drives(&m).unwrap();
        let mut moved = Machine::new("x");
        moved.drives = m.drives.clone();
        moved.drives[1].path_on_host = Some(t.0.join("clone.ext4"));
        let e = engine.same_drives(&moved).unwrap_err();
        assert!(
            e.contains("drive rootfs now names") && e.contains("cannot switch"),
            "{e}"
        );
    }

    /// Runs a command; its stdout, or why it failed.
    fn sh(args: &[&str]) -> Result<String, String> {
        let o = Command::new(args[0])
            .args(&args[1..])
            .output()
            .map_err(|e| format!("{args:?}: {e}"))?;
        if !o.status.success() {
            return Err(format!(
                "{args:?}: {}: {}",
                o.status,
                String::from_utf8_lossy(&o.stderr).trim()
            ));
        }
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    }

    /// One agent request over the engine's vsock map (connect, one line, one answer).
    fn ask_agent(e: &Engine, line: &str) -> Result<serde_json::Value, String> {
        let s = e
            .connect_guest(52)
            .ok_or("no TCP connection to the agent")?;
        s.set_read_timeout(Some(Duration::from_secs(30))).ok();
        (&s).write_all(format!("{line}\n").as_bytes())
            .map_err(|e| e.to_string())?;
        let mut a = String::new();
        BufReader::new(&s)
            .read_line(&mut a)
            .map_err(|e| e.to_string())?;
        serde_json::from_str(&a).map_err(|e| format!("{a:?}: {e}"))
    }

    /// The agent to put into the test image: `BANGER_TEST_AGENT`, else the `banger` binary this
    /// workspace built next to this test (`target/<triple>/debug/banger`), if any.
    fn test_agent() -> Option<PathBuf> {
        if let Some(a) = std::env::var_os("BANGER_TEST_AGENT") {
            return Some(PathBuf::from(a));
        }
        let me = std::env::current_exe().ok()?;
        Some(me.parent()?.parent()?.join("banger")).filter(|p| p.is_file())
    }

    fn machine_for(
        kernel: &Path,
        disk: &Path,
        tap: &str,
        vsock: &Path,
        key_b64: &str,
    ) -> Result<Machine, String> {
        let mut m = Machine::new("snap");
        m.boot_source = Some(BootSource {
            kernel_image_path: kernel.to_path_buf(),
            boot_args: Some(format!(
                "console=ttyS0 reboot=k panic=1 pci=off ip=172.30.0.5::172.30.0.1:255.255.255.0:snap-src:eth0:off banger.name=snap-src banger.key={key_b64}"
            )),
            initrd_path: None,
        });
        m.machine.vcpu_count = 1;
        m.machine.mem_size_mib = 256;
        m.drives.push(Drive {
            drive_id: "rootfs".into(),
            partuuid: None,
            is_root_device: true,
            cache_type: None,
            is_read_only: Some(false),
            path_on_host: Some(disk.to_path_buf()),
            rate_limiter: None,
            io_engine: None,
            socket: None,
        });
        let t = crate::tap::Tap::open_named(tap).map_err(|e| e.net_error())?;
        m.nets.push((
            NetworkInterface {
                iface_id: "eth0".into(),
                host_dev_name: tap.into(),
                guest_mac: Some("02:aa:00:00:00:05".into()),
                mtu: None,
                rx_rate_limiter: None,
                tx_rate_limiter: None,
            },
            t,
        ));
        let _ = std::fs::remove_file(vsock);
        let l = std::os::unix::net::UnixListener::bind(vsock).map_err(|e| e.to_string())?;
        m.vsock = Some((
            Vsock {
                guest_cid: 3,
                uds_path: vsock.to_path_buf(),
                vsock_id: None,
            },
            l,
        ));
        Ok(m)
    }

    /// The whole snapshot story on a real guest (kernel + `BANGER_TEST_ROOTFS` with this
    /// workspace's agent put in): boot under QEMU on tap0, pause, save the migration stream,
    /// copy the disk, stop the source; restore into a second QEMU on tap1 with the copy; the
    /// agent answers at the snapshot's address with the source's boot id and instance id;
    /// `reconfigure` through the splice moves it (name, MAC, address); the agent and sshd
    /// answer at the new address, same boot id, new instance id. All in a network namespace of
    /// this test thread's own. Prints TCG-BENCH numbers.
    #[test]
    fn snapshot_restore_reconfigure_real_guest() {
        const TEST: &str = "snapshot_restore_reconfigure_real_guest";
        let skip = |why: &str| eprintln!("SKIP: {TEST}: {why}");
        if !rustix::process::geteuid().is_root() {
            return skip("needs root (network namespace, bridge, taps)");
        }
        let Some(qemu) = qemu_binary() else {
            return skip("qemu-system-x86_64 is not installed");
        };
        let Some(kernel) = find_test_kernel() else {
            return skip("no kernel (BANGER_TEST_KERNEL, or packaging/kernel/build.sh)");
        };
        let Some(rootfs) = std::env::var_os("BANGER_TEST_ROOTFS").map(PathBuf::from) else {
            return skip("BANGER_TEST_ROOTFS is not set (an image from `banger image build`)");
        };
        for tool in ["ip", "ssh", "ssh-keygen", "debugfs"] {
            if sh(&["sh", "-c", &format!("command -v {tool}")]).is_err() {
                return skip(&format!("{tool} is not installed"));
            }
        }
        let t = tmp("tcg-snapreal");
        let d = &t.0;
        // This thread's own network namespace: children (ip, QEMU, ssh) and the engine's
        // threads start in it; it goes away with them.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            return skip(&format!(
                "unshare(CLONE_NEWNET): {}",
                std::io::Error::last_os_error()
            ));
        }
        for c in [
            "ip link set lo up",
            "ip link add br0 type bridge",
            "ip addr add 172.30.0.1/24 dev br0",
            "ip link set br0 up",
            "ip tuntap add dev tap0 mode tap",
            "ip tuntap add dev tap1 mode tap",
            "ip link set tap0 master br0 up",
            "ip link set tap1 master br0 up",
        ] {
            sh(&c.split(' ').collect::<Vec<_>>()).unwrap();
        }
        // The source's disk: the image with this workspace's agent (protocol 2) put in.
        let disk = d.join("source.ext4");
        sh(&[
            "cp",
            "--sparse=always",
            rootfs.to_str().unwrap(),
            disk.to_str().unwrap(),
        ])
        .unwrap();
        match test_agent() {
            Some(agent) => {
                let cmds = d.join("debugfs.cmds");
                std::fs::write(
                    &cmds,
                    format!(
                        "cd /usr/local/bin\nrm banger-vsock-agent\nwrite {} banger-vsock-agent\nsif banger-vsock-agent mode 0100755\n",
                        agent.display()
                    ),
                )
                .unwrap();
                sh(&[
                    "debugfs",
                    "-w",
                    "-f",
                    cmds.to_str().unwrap(),
                    disk.to_str().unwrap(),
                ])
                .unwrap();
                eprintln!("{TEST}: agent {} put into the image copy", agent.display());
            }
            None => eprintln!("{TEST}: no agent binary to put in; the image's own agent is used"),
        }
        let key = d.join("id");
        sh(&[
            "ssh-keygen",
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-f",
            key.to_str().unwrap(),
        ])
        .unwrap();
        let key_b64 = sh(&["base64", "-w0", d.join("id.pub").to_str().unwrap()])
            .unwrap()
            .trim()
            .to_string();

        let m1 = machine_for(&kernel, &disk, "tap0", &d.join("v1.sock"), &key_b64).unwrap();
        let source = start_engine(&m1, &qemu, |_| {}).unwrap();
        let t0 = Instant::now();
        let hello = loop {
            match ask_agent(&source, r#"{"method":"hello"}"#) {
                Ok(v) if v["ok"] == true => break v["result"].clone(),
                _ if t0.elapsed() > Duration::from_secs(600) => {
                    panic!("the source guest's agent never answered")
                }
                _ => thread::sleep(Duration::from_millis(500)),
            }
        };
        let boot_ms = t0.elapsed().as_millis();
        if hello["protocol"] != 2 {
            let _ = source.quit();
            return skip(&format!(
                "the image's agent speaks protocol {} (needs 2: BANGER_TEST_AGENT or build the banger binary)",
                hello["protocol"]
            ));
        }
        let (boot_id, source_id) = (hello["boot_id"].clone(), hello["instance_id"].clone());
        // A warmed-up VM: snapshot once sshd listens (it starts after the agent).
        loop {
            let p = ask_agent(&source, r#"{"method":"ports"}"#).unwrap_or_default();
            if p["result"]["ports"]
                .as_array()
                .is_some_and(|a| a.iter().any(|p| p["port"] == 22))
            {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(900),
                "sshd never listened in the source guest: {p}"
            );
            thread::sleep(Duration::from_millis(500));
        }
        let sshd_ms = t0.elapsed().as_millis();

        let mem = d.join("snapshot.mem");
        let t1 = Instant::now();
        source.pause().unwrap();
        source.save(&mem).unwrap();
        let save_ms = t1.elapsed().as_millis();
        let clone_disk = d.join("clone.ext4");
        sh(&[
            "cp",
            "--sparse=always",
            disk.to_str().unwrap(),
            clone_disk.to_str().unwrap(),
        ])
        .unwrap();
        source.quit().unwrap();
        drop(m1);
        let mem_meta = std::fs::metadata(&mem).unwrap();
        use std::os::unix::fs::MetadataExt;

        let m2 = machine_for(&kernel, &clone_disk, "tap1", &d.join("v2.sock"), &key_b64).unwrap();
        let t2 = Instant::now();
        let clone = restore_engine(&m2, &qemu, &mem, true, |_| {}).unwrap();
        let restore_ms = t2.elapsed().as_millis();
        let t3 = Instant::now();
        let again = loop {
            match ask_agent(&clone, r#"{"method":"hello"}"#) {
                Ok(v) if v["ok"] == true => break v["result"].clone(),
                r if t3.elapsed() > Duration::from_secs(120) => {
                    panic!("the restored guest's agent never answered at its old address: {r:?}")
                }
                _ => thread::sleep(Duration::from_millis(200)),
            }
        };
        let first_hello_ms = t3.elapsed().as_millis();
        assert_eq!(again["boot_id"], boot_id, "{again}");
        assert_eq!(again["instance_id"], source_id, "{again}");
        assert_eq!(again["hostname"], "snap-src", "{again}");

        // reconfigure through the splice, as the stand-in serves vsock.
        let req = serde_json::json!({"method": "reconfigure", "v": 2, "params": {
            "name": "clone-1", "ip": "172.30.0.9/24", "gateway": "172.30.0.1",
            "mac": "02:bb:00:00:00:09", "key": key_b64,
        }});
        let t4 = Instant::now();
        let tcp = clone
            .connect_guest(52)
            .expect("the agent at the old address");
        let (host, vmm_end) = UnixStream::pair().unwrap();
        let answer = thread::scope(|sc| {
            sc.spawn(|| clone.splice(vmm_end, tcp));
            (&host).write_all(format!("{req}\n").as_bytes()).unwrap();
            host.set_read_timeout(Some(Duration::from_secs(60)))
                .unwrap();
            let mut a = String::new();
            BufReader::new(&host).read_line(&mut a).unwrap();
            host.shutdown(Shutdown::Both).unwrap();
            a
        });
        let reconf_ms = t4.elapsed().as_millis();
        let answer: serde_json::Value = serde_json::from_str(&answer).unwrap();
        assert_eq!(answer["ok"], true, "{answer}");
        assert_eq!(answer["result"]["boot_id"], boot_id);
        assert_ne!(answer["result"]["instance_id"], source_id);
        assert_eq!(clone.guest_addr(), Some("172.30.0.9:52".parse().unwrap()));

        let after = ask_agent(&clone, r#"{"method":"hello"}"#).unwrap();
        assert_eq!(after["result"]["boot_id"], boot_id, "{after}");
        assert_eq!(
            after["result"]["instance_id"],
            answer["result"]["instance_id"]
        );
        assert_eq!(after["result"]["hostname"], "clone-1");
        let ssh = |cmd: &str| {
            sh(&[
                "ssh",
                "-i",
                key.to_str().unwrap(),
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "BatchMode=yes",
                "-o",
                "ConnectTimeout=30",
                "root@172.30.0.9",
                cmd,
            ])
        };
        let out = ssh("cat /proc/sys/kernel/random/boot_id; hostname; cat /sys/class/net/eth0/address; ip -4 -o addr show dev eth0 | wc -l; ip -4 -o addr show dev eth0")
            .unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], boot_id.as_str().unwrap(), "{out}");
        assert_eq!(lines[1], "clone-1", "{out}");
        assert_eq!(lines[2], "02:bb:00:00:00:09", "{out}");
        assert_eq!(lines[3], "1", "{out}");
        assert!(lines[4].contains("172.30.0.9/24"), "{out}");
        clone.quit().unwrap();
        eprintln!(
            "TCG-BENCH: boot -> agent {boot_ms} ms, -> sshd {sshd_ms} ms; pause+save {save_ms} ms, memory file {} MB ({} MB allocated) for 256 MiB; restore (QEMU start + stream read + cont) {restore_ms} ms; first hello after restore {first_hello_ms} ms; reconfigure {reconf_ms} ms",
            mem_meta.len() >> 20,
            (mem_meta.blocks() * 512) >> 20
        );
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
