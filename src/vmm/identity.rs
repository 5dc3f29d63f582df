//! A VM's runtime identity and its durable record, `vms/<id>/handles.json`.
//!
//! Owns: reading a process's identity from `/proc` (pid + start time + comm), the atomic,
//! symlink-safe write of `handles.json` and pidfiles, and the classification a reconcile acts on
//! ([`Liveness`]). It never signals, kills or starts anything; it only looks. `/proc` is a parameter
//! (`proc_root`) so every branch is table-tested against fixture directories.
//!
//! Why pid + start time + comm: a pid alone is recycled by the kernel; the start time (field 22 of
//! `/proc/<pid>/stat`, in clock ticks since boot) tells a recycled pid apart; comm catches a record
//! that points at some other program altogether.

use crate::error::{Context, Error, Result};
use rustix::fd::{AsFd, OwnedFd};
use rustix::fs::{Mode, OFlags, CWD};
use serde::{Deserialize, Serialize};
use std::ffi::OsStr;
use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

/// Who a process is: enough to tell it apart from any later process that reuses its pid.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// Process id.
    pub pid: i32,
    /// Start time in clock ticks after boot (field 22 of `/proc/<pid>/stat`).
    pub start_time: u64,
    /// The kernel's short command name (`/proc/<pid>/comm`, at most 15 bytes).
    pub comm: String,
}

/// Version of the `handles.json` format written by this binary.
pub const HANDLES_VERSION: u32 = 1;

/// What `vms/<id>/handles.json` records about a running VM: its identity and the host-side handles
/// the daemon uses to reach it. Mirrored in the DB by the daemon.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Handles {
    /// Format version ([`HANDLES_VERSION`]).
    pub version: u32,
    /// The VM this is about.
    pub vm_id: String,
    /// The VMM process.
    pub identity: Identity,
    /// Firecracker's API socket.
    pub api_socket: PathBuf,
    /// Firecracker's host-side vsock Unix socket (created when the vsock device is configured).
    pub vsock_uds: PathBuf,
    /// Where the VMM's stdout/stderr (the guest serial console) are appended.
    pub console_log: PathBuf,
    /// The VMM's pidfile.
    pub pidfile: PathBuf,
    /// The transient systemd scope holding the VMM, when it was started in one.
    #[serde(default)]
    pub scope: Option<String>,
    /// The guest's boot_id once the daemon has learnt it (agent or console line).
    #[serde(default)]
    pub boot_id: Option<String>,
    /// When the VMM was launched (seconds since the Unix epoch).
    #[serde(default)]
    pub launched_at: u64,
}

/// The fields of `/proc/<pid>/stat` banger uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stat {
    /// Field 1.
    pub pid: i32,
    /// Field 2, without the parentheses.
    pub comm: String,
    /// Field 3 (`R`, `S`, `Z`, …).
    pub state: char,
    /// Field 4.
    pub ppid: i32,
    /// Field 6: the session id.
    pub session: i32,
    /// Field 22: start time in clock ticks after boot.
    pub start_time: u64,
}

/// Parses one `/proc/<pid>/stat` line. The comm (field 2) may itself contain spaces and
/// parentheses, so the split is at the first `(` and the **last** `)`.
pub fn parse_stat(s: &str) -> Result<Stat> {
    let bad = |why: &str| Error::new("parsing /proc/<pid>/stat", why.to_string());
    let s = s.trim();
    let open = s
        .find('(')
        .ok_or_else(|| bad("no `(` before the command name"))?;
    let close = s
        .rfind(')')
        .ok_or_else(|| bad("no `)` after the command name"))?;
    if close < open {
        return Err(bad("`)` before `(`"));
    }
    let pid: i32 = s[..open]
        .trim()
        .parse()
        .map_err(|_| bad("field 1 (pid) is not a number"))?;
    let comm = s[open + 1..close].to_string();
    // Fields 3.. follow the last `)`; index 0 here is field 3.
    let rest: Vec<&str> = s[close + 1..].split_whitespace().collect();
    let field = |n: usize| -> Result<&str> {
        rest.get(n - 3)
            .copied()
            .ok_or_else(|| bad(&format!("only {} fields, need field {n}", rest.len() + 2)))
    };
    let num = |n: usize| -> Result<i64> {
        field(n)?
            .parse()
            .map_err(|_| bad(&format!("field {n} is not a number")))
    };
    let state = field(3)?.chars().next().unwrap_or('?');
    let start_time: u64 = field(22)?
        .parse()
        .map_err(|_| bad("field 22 (start time) is not a number"))?;
    Ok(Stat {
        pid,
        comm,
        state,
        ppid: num(4)? as i32,
        session: num(6)? as i32,
        start_time,
    })
}

/// The comm the kernel gives a process exec'd from `binary`: its file name, cut to 15 bytes.
pub fn comm_for(binary: &Path) -> String {
    let name = binary
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut end = name.len().min(15);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    name[..end].to_string()
}

fn proc_file(proc_root: &Path, pid: i32, name: &str) -> PathBuf {
    proc_root.join(pid.to_string()).join(name)
}

/// Reads `/proc/<pid>/stat` under `proc_root`.
pub fn read_stat(proc_root: &Path, pid: i32) -> Result<Stat> {
    let p = proc_file(proc_root, pid, "stat");
    let raw = std::fs::read(&p).ctx(|| format!("reading {}", p.display()))?;
    parse_stat(&String::from_utf8_lossy(&raw))
        .map_err(|e| Error::new(format!("parsing {}", p.display()), e.why))
}

fn read_comm(proc_root: &Path, pid: i32) -> std::io::Result<String> {
    let raw = std::fs::read(proc_file(proc_root, pid, "comm"))?;
    Ok(trim_comm(&String::from_utf8_lossy(&raw)).to_string())
}

/// A comm as compared: without the trailing newline (or other trailing whitespace) `/proc` or a
/// hand-edited record may carry.
fn trim_comm(s: &str) -> &str {
    s.trim_end()
}

/// Reads the identity of process `pid` from `proc_root` (normally `/proc`).
pub fn read_identity(proc_root: &Path, pid: i32) -> Result<Identity> {
    let stat = read_stat(proc_root, pid)?;
    let comm = read_comm(proc_root, pid)
        .ctx(|| format!("reading {}", proc_file(proc_root, pid, "comm").display()))?;
    Ok(Identity {
        pid,
        start_time: stat.start_time,
        comm,
    })
}

/// What a recorded identity says about the process today.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Liveness {
    /// The very process that was recorded is running: re-adopt it, untouched.
    Alive,
    /// It is gone (no such pid, a zombie, or the pid now belongs to another process): mark the VM
    /// stopped and clean up its host resources.
    Gone(String),
    /// Cannot tell: leave the VM alone and report why. Never kill on `Unsure`.
    Unsure(String),
}

/// Compares `recorded` with what `proc_root` shows for its pid.
pub fn classify(recorded: &Identity, proc_root: &Path) -> Liveness {
    let pid = recorded.pid;
    if pid <= 0 {
        return Liveness::Unsure(format!("recorded pid {pid} is not a process id"));
    }
    let stat_path = proc_file(proc_root, pid, "stat");
    let raw = match std::fs::read(&stat_path) {
        Ok(r) => r,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Liveness::Gone(format!("no process {pid}"))
        }
        Err(e) => return Liveness::Unsure(format!("reading {}: {e}", stat_path.display())),
    };
    let stat = match parse_stat(&String::from_utf8_lossy(&raw)) {
        Ok(s) => s,
        Err(e) => return Liveness::Unsure(format!("{}: {}", stat_path.display(), e.why)),
    };
    if stat.start_time != recorded.start_time {
        return Liveness::Gone(format!(
            "pid {pid} was reused: it started at tick {}, the VMM at tick {}",
            stat.start_time, recorded.start_time
        ));
    }
    if matches!(stat.state, 'Z' | 'X' | 'x') {
        return Liveness::Gone(format!("process {pid} has exited (state {})", stat.state));
    }
    let comm = match read_comm(proc_root, pid) {
        Ok(c) => c,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Liveness::Gone(format!("process {pid} exited while being checked"))
        }
        Err(e) => return Liveness::Unsure(format!("reading comm of {pid}: {e}")),
    };
    if comm != trim_comm(&recorded.comm) {
        return Liveness::Gone(format!(
            "pid {pid} is now `{comm}`, not the recorded `{}`",
            trim_comm(&recorded.comm)
        ));
    }
    Liveness::Alive
}

/// Classifies a VM from its `handles.json`.
///
/// - a readable record → [`classify`] of its identity;
/// - **missing file → `Unsure`**: reconcile only asks about VMs the DB believes are running, and a
///   missing record then means a launch or cleanup was interrupted — a VMM may well be running that
///   nobody can name. Marking it stopped could start a second VMM on the same disk, so it is left
///   alone and reported (the daemon should first try the identity mirrored in its DB);
/// - **garbage (unparsable, empty, unknown version) → `Unsure`** for the same reason.
pub fn classify_handles(path: &Path, proc_root: &Path) -> Liveness {
    match read_handles(path) {
        Ok(Some(h)) => classify(&h.identity, proc_root),
        Ok(None) => Liveness::Unsure(format!("{} is missing", path.display())),
        Err(e) => Liveness::Unsure(e.to_string()),
    }
}

/// What the helper expects of one of banger's own VMMs, from its own configuration (never from a
/// file the owner can write).
#[derive(Debug, Clone)]
pub struct VmmExpect<'a> {
    /// The comm of the configured VMM binary ([`comm_for`]).
    pub comm: &'a str,
    /// The VM it must serve: its command line carries `--id <vm_id>`.
    pub vm_id: &'a str,
    /// The real uid it must run as, when known (the owner: the helper never signals anyone else's).
    pub uid: Option<u32>,
}

/// Why `identity` is not one of banger's own running VMMs, or `Ok` when it is.
pub fn check_banger_vmm(
    identity: &Identity,
    expect: &VmmExpect,
    proc_root: &Path,
) -> Result<(), String> {
    if trim_comm(&identity.comm) != expect.comm {
        return Err(format!(
            "recorded comm `{}` is not the VMM's `{}`",
            identity.comm, expect.comm
        ));
    }
    match classify(identity, proc_root) {
        Liveness::Alive => {}
        Liveness::Gone(why) | Liveness::Unsure(why) => return Err(why),
    }
    let pid = identity.pid;
    let cmdline = std::fs::read(proc_file(proc_root, pid, "cmdline"))
        .map_err(|e| format!("reading the command line of {pid}: {e}"))?;
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    let has_id = args
        .windows(2)
        .any(|w| w[0] == b"--id" && w[1] == expect.vm_id.as_bytes());
    if !has_id {
        return Err(format!(
            "process {pid} is not serving VM `{}` (no `--id {}`)",
            expect.vm_id, expect.vm_id
        ));
    }
    if let Some(want) = expect.uid {
        let status = std::fs::read_to_string(proc_file(proc_root, pid, "status"))
            .map_err(|e| format!("reading the status of {pid}: {e}"))?;
        let uid = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|r| r.split_whitespace().next())
            .and_then(|u| u.parse::<u32>().ok())
            .ok_or_else(|| format!("no Uid line in the status of {pid}"))?;
        if uid != want {
            return Err(format!(
                "process {pid} runs as uid {uid}, banger's VMMs as uid {want}"
            ));
        }
    }
    Ok(())
}

/// True when `identity` is one of banger's own VMMs, running now: see [`check_banger_vmm`].
pub fn is_banger_vmm(identity: &Identity, expect: &VmmExpect, proc_root: &Path) -> bool {
    check_banger_vmm(identity, expect, proc_root).is_ok()
}

/// Opens directory `path` without following a symlink at any component, so a root process working
/// in an owner-writable tree cannot be redirected elsewhere by a swapped-in link.
pub fn open_dir_nofollow(path: &Path) -> Result<OwnedFd> {
    let what = || format!("opening directory {}", path.display());
    if !path.is_absolute() {
        return Err(Error::new(what(), "not an absolute path"));
    }
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let mut fd = rustix::fs::openat(CWD, "/", flags, Mode::empty()).ctx(what)?;
    for c in path.components() {
        match c {
            Component::RootDir => {}
            Component::Normal(name) => {
                fd = rustix::fs::openat(&fd, name, flags, Mode::empty()).map_err(|e| {
                    let why = if e == rustix::io::Errno::LOOP || e == rustix::io::Errno::NOTDIR {
                        format!(
                            "`{}` is not a plain directory (symlink?)",
                            name.to_string_lossy()
                        )
                    } else {
                        e.to_string()
                    };
                    Error::new(what(), why)
                })?;
            }
            _ => return Err(Error::new(what(), "path contains `.` or `..`")),
        }
    }
    Ok(fd)
}

/// Splits `path` into its directory (opened with [`open_dir_nofollow`]) and file name.
pub fn open_parent(path: &Path) -> Result<(OwnedFd, std::ffi::OsString)> {
    let name = path
        .file_name()
        .ok_or_else(|| Error::new(format!("using {}", path.display()), "no file name"))?;
    let dir = path
        .parent()
        .ok_or_else(|| Error::new(format!("using {}", path.display()), "no parent directory"))?;
    Ok((open_dir_nofollow(dir)?, name.to_os_string()))
}

static TMP_COUNTER: AtomicU32 = AtomicU32::new(0);

/// Writes `bytes` to `path` atomically and durably: a fresh temp file in the same directory
/// (`O_EXCL|O_NOFOLLOW`, so a planted link is never followed), write, mode `mode`, owner `owner`
/// (uid, gid) when given, fsync, rename over `path`, fsync the directory. On failure `path` is
/// untouched and the temp file removed.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32, owner: Option<(u32, u32)>) -> Result<()> {
    write_atomic_with(path, bytes, mode, owner, true)
}

/// [`write_atomic`] without the two fsyncs: the same atomic, symlink-safe replacement, surviving a
/// crash of the writer but not a power loss. For records that only describe a live process (a
/// pidfile), which a power loss ends anyway.
pub fn write_atomic_volatile(
    path: &Path,
    bytes: &[u8],
    mode: u32,
    owner: Option<(u32, u32)>,
) -> Result<()> {
    write_atomic_with(path, bytes, mode, owner, false)
}

fn write_atomic_with(
    path: &Path,
    bytes: &[u8],
    mode: u32,
    owner: Option<(u32, u32)>,
    durable: bool,
) -> Result<()> {
    let what = || format!("writing {}", path.display());
    let (dir, name) = open_parent(path)?;
    let tmp = format!(
        ".{}.tmp.{}.{}",
        name.to_string_lossy(),
        std::process::id(),
        TMP_COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let fd = match rustix::fs::openat(&dir, tmp.as_str(), flags, Mode::from_raw_mode(mode)) {
        Ok(fd) => fd,
        Err(rustix::io::Errno::EXIST) => {
            // A leftover of a crashed writer with our pid, or something planted: unlink (never
            // follows) and try once more.
            let _ = rustix::fs::unlinkat(&dir, tmp.as_str(), rustix::fs::AtFlags::empty());
            rustix::fs::openat(&dir, tmp.as_str(), flags, Mode::from_raw_mode(mode)).ctx(what)?
        }
        Err(e) => return Err(Error::new(what(), e)),
    };
    let result = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::from(fd);
        f.write_all(bytes)?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::fchown(&f, Some(uid), Some(gid))?;
        }
        // After fchown (which may clear mode bits) and regardless of the umask.
        rustix::fs::fchmod(&f, Mode::from_raw_mode(mode))?;
        if durable {
            f.sync_all()?;
        }
        rustix::fs::renameat(&dir, tmp.as_str(), &dir, name.as_os_str())?;
        Ok(())
    })();
    if let Err(e) = result {
        let _ = rustix::fs::unlinkat(&dir, tmp.as_str(), rustix::fs::AtFlags::empty());
        return Err(Error::new(what(), e));
    }
    if !durable {
        return Ok(());
    }
    rustix::fs::fsync(dir.as_fd()).ctx(|| format!("syncing the directory of {}", path.display()))
}

/// Writes `handles` to `path` atomically, mode 0600, owned by `owner` when given (the helper runs
/// as root and hands the record to the owner user, whose daemon reads it and mirrors it).
pub fn write_handles(path: &Path, handles: &Handles, owner: Option<(u32, u32)>) -> Result<()> {
    let mut bytes =
        serde_json::to_vec_pretty(handles).ctx(|| format!("encoding {}", path.display()))?;
    bytes.push(b'\n');
    write_atomic(path, &bytes, 0o600, owner)
}

/// Opens `name` in the pinned directory `dir` for reading, as root in an owner-writable
/// directory: `O_NOFOLLOW` (a planted link is refused, never followed) and `O_NONBLOCK` (a planted
/// FIFO or device cannot make the open wait for a writer), then `fstat` on the opened file: only a
/// regular file is returned, so a read never blocks either. `Ok(None)` when it does not exist;
/// `shown` names the file in errors.
pub fn open_regular_at(
    dir: &impl AsFd,
    name: &OsStr,
    shown: &Path,
) -> Result<Option<std::fs::File>> {
    let what = || format!("reading {}", shown.display());
    let flags =
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC;
    let fd = match rustix::fs::openat(dir, name, flags, Mode::empty()) {
        Ok(fd) => fd,
        Err(rustix::io::Errno::NOENT) => return Ok(None),
        Err(rustix::io::Errno::LOOP) => return Err(Error::new(what(), "it is a symlink")),
        Err(e) => return Err(Error::new(what(), e)),
    };
    let st = rustix::fs::fstat(&fd).ctx(what)?;
    let kind = rustix::fs::FileType::from_raw_mode(st.st_mode);
    if kind != rustix::fs::FileType::RegularFile {
        return Err(
            Error::new(what(), format!("it is not a regular file (a {kind:?})"))
                .hint("remove it; banger writes this file itself"),
        );
    }
    Ok(Some(std::fs::File::from(fd)))
}

/// A path that reaches `name` inside the pinned directory `dir` through this process's fd table
/// (`/proc/self/fd/N/name`), for the calls that only take a path (`connect(2)` on a Unix socket):
/// whatever the directory's path points at by now, this stays the directory that was opened.
pub fn fd_path(dir: &impl AsFd, name: &OsStr) -> PathBuf {
    use std::os::fd::AsRawFd;
    PathBuf::from(format!("/proc/self/fd/{}", dir.as_fd().as_raw_fd())).join(name)
}

/// Reads `path`: `Ok(None)` when it does not exist; an error when it is unreadable, not a regular
/// file, not JSON of the expected shape, or of a newer format version.
pub fn read_handles(path: &Path) -> Result<Option<Handles>> {
    // The root helper reads this from the owner's directory: no symlink anywhere on the way.
    let (dir, name) = match open_parent(path) {
        Ok(d) => d,
        Err(_) if !path.exists() && path.parent().is_some_and(|p| !p.exists()) => return Ok(None),
        Err(e) => return Err(e),
    };
    read_handles_at(&dir, &name, path)
}

/// [`read_handles`] of `name` in the pinned directory `dir` (`shown` names it in errors).
pub fn read_handles_at(dir: &impl AsFd, name: &OsStr, shown: &Path) -> Result<Option<Handles>> {
    let what = || format!("reading {}", shown.display());
    let Some(f) = open_regular_at(dir, name, shown)? else {
        return Ok(None);
    };
    let mut bytes = Vec::new();
    f.take(1 << 20).read_to_end(&mut bytes).ctx(what)?;
    let h: Handles = serde_json::from_slice(&bytes).ctx(what)?;
    if h.version != HANDLES_VERSION {
        return Err(Error::new(
            what(),
            format!(
                "format version {} (this banger knows {HANDLES_VERSION})",
                h.version
            ),
        )
        .hint("an older banger is reading a newer banger's record; update banger"));
    }
    Ok(Some(h))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::system::testutil::TempDir;

    /// A fake `/proc/<pid>` with `stat`, `comm` and `cmdline`.
    pub(crate) fn fake_proc(root: &Path, pid: i32, stat: &str, comm: &str, cmdline: &[&str]) {
        let d = root.join(pid.to_string());
        std::fs::create_dir_all(&d).expect("mkdir");
        std::fs::write(d.join("stat"), stat).expect("stat");
        std::fs::write(d.join("comm"), comm).expect("comm");
        let mut c = cmdline.join("\0");
        c.push('\0');
        std::fs::write(d.join("cmdline"), c).expect("cmdline");
        std::fs::write(d.join("status"), "Name:\tx\nUid:\t1000\t1000\t1000\t1000\n")
            .expect("status");
    }

    fn stat_line(pid: i32, comm: &str, state: char, start: u64) -> String {
        format!(
            "{pid} ({comm}) {state} 1 {pid} {pid} 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 {start} 1000 100 18446744073709551615\n"
        )
    }

    fn ident(pid: i32, start: u64, comm: &str) -> Identity {
        Identity {
            pid,
            start_time: start,
            comm: comm.into(),
        }
    }

    #[test]
    fn parse_stat_table() {
        let s = parse_stat(&stat_line(42, "firecracker", 'S', 777)).expect("plain");
        assert_eq!(
            (
                s.pid,
                s.comm.as_str(),
                s.state,
                s.ppid,
                s.session,
                s.start_time
            ),
            (42, "firecracker", 'S', 1, 42, 777)
        );
        // comm with spaces and parentheses: split at the last `)`.
        let s = parse_stat(&stat_line(7, "a) (b c) d", 'R', 9)).expect("nasty comm");
        assert_eq!((s.comm.as_str(), s.start_time), ("a) (b c) d", 9));
        let s = parse_stat(&stat_line(7, ")", 'R', 10)).expect("comm is )");
        assert_eq!((s.comm.as_str(), s.start_time), (")", 10));
        // extra whitespace and no trailing newline.
        let s = parse_stat("  8 (x)   S  1 8 8 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0   55  ")
            .expect("spaces");
        assert_eq!(s.start_time, 55);
        for bad in [
            "",
            "8 x S 1",
            "8 (x S 1 2",
            "x (y) S 1 2 3",
            "8 (x) S 1 8 8",
            "8 (x) S 1 8 8 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 abc",
        ] {
            assert!(parse_stat(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn comm_for_table() {
        assert_eq!(
            comm_for(Path::new("/usr/local/bin/firecracker")),
            "firecracker"
        );
        assert_eq!(
            comm_for(Path::new("/x/a-very-long-binary-name")),
            "a-very-long-bin"
        );
        assert_eq!(comm_for(Path::new("/bin/sleep")), "sleep");
    }

    #[test]
    fn read_identity_from_fixture() {
        let t = TempDir::new();
        fake_proc(
            t.path(),
            42,
            &stat_line(42, "fire cracker)", 'S', 123),
            "fire cracker)\n",
            &["x"],
        );
        let id = read_identity(t.path(), 42).expect("identity");
        assert_eq!(id, ident(42, 123, "fire cracker)"));
        assert!(read_identity(t.path(), 43).is_err());
    }

    #[test]
    fn read_identity_of_self() {
        let me = rustix::process::getpid().as_raw_nonzero().get();
        let id = read_identity(Path::new("/proc"), me).expect("own identity");
        assert_eq!(id.pid, me);
        assert!(id.start_time > 0);
        assert_eq!(classify(&id, Path::new("/proc")), Liveness::Alive);
    }

    #[test]
    fn classify_table() {
        let t = TempDir::new();
        let p = t.path();
        fake_proc(
            p,
            100,
            &stat_line(100, "firecracker", 'S', 5000),
            "firecracker\n",
            &["firecracker"],
        );
        fake_proc(
            p,
            101,
            &stat_line(101, "firecracker", 'Z', 6000),
            "firecracker\n",
            &[],
        );
        fake_proc(
            p,
            102,
            &stat_line(102, "bash", 'S', 7000),
            "bash\n",
            &["bash"],
        );
        fake_proc(p, 103, "103 (firecracker) S garbage", "firecracker\n", &[]);
        fake_proc(
            p,
            104,
            &stat_line(104, "firecracker", 'S', 8000),
            "firecracker",
            &[],
        );
        let alive = |l: &Liveness| matches!(l, Liveness::Alive);
        let gone = |l: &Liveness| matches!(l, Liveness::Gone(_));
        let unsure = |l: &Liveness| matches!(l, Liveness::Unsure(_));
        type Check = fn(&Liveness) -> bool;
        let cases: Vec<(&str, Identity, Check)> = vec![
            ("happy path", ident(100, 5000, "firecracker"), alive),
            (
                "recorded comm with newline",
                ident(100, 5000, "firecracker\n"),
                alive,
            ),
            (
                "comm file without newline",
                ident(104, 8000, "firecracker"),
                alive,
            ),
            ("stale pid", ident(999, 5000, "firecracker"), gone),
            ("reused pid", ident(100, 4999, "firecracker"), gone),
            ("wrong comm", ident(102, 7000, "firecracker"), gone),
            ("zombie", ident(101, 6000, "firecracker"), gone),
            ("garbage stat", ident(103, 1, "firecracker"), unsure),
            ("nonsense pid", ident(0, 1, "firecracker"), unsure),
        ];
        for (name, id, want) in cases {
            let got = classify(&id, p);
            assert!(want(&got), "{name}: got {got:?}");
        }
    }

    fn handles(pid: i32, start: u64) -> Handles {
        Handles {
            version: HANDLES_VERSION,
            vm_id: "vm-1".into(),
            identity: ident(pid, start, "firecracker"),
            api_socket: "/r/vms/vm-1/fc.sock".into(),
            vsock_uds: "/r/vms/vm-1/vsock.sock".into(),
            console_log: "/r/vms/vm-1/console.log".into(),
            pidfile: "/r/vms/vm-1/vmm.pid".into(),
            scope: None,
            boot_id: Some("b00t".into()),
            launched_at: 1,
        }
    }

    #[test]
    fn handles_round_trip_atomic_0600() {
        use std::os::unix::fs::PermissionsExt;
        let t = TempDir::new();
        let path = t.path().join("handles.json");
        assert_eq!(read_handles(&path).expect("missing is fine"), None);
        let h = handles(100, 5000);
        write_handles(&path, &h, None).expect("write");
        write_handles(&path, &h, None).expect("overwrite");
        assert_eq!(read_handles(&path).expect("read"), Some(h));
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let names: Vec<_> = std::fs::read_dir(t.path())
            .expect("ls")
            .map(|e| e.expect("e").file_name())
            .collect();
        assert_eq!(names.len(), 1, "no temp file left: {names:?}");
    }

    #[test]
    fn write_refuses_symlinked_dir() {
        let t = TempDir::new();
        let real = t.path().join("real");
        std::fs::create_dir(&real).expect("mkdir");
        std::os::unix::fs::symlink(&real, t.path().join("link")).expect("symlink");
        let e =
            write_handles(&t.path().join("link/handles.json"), &handles(1, 1), None).unwrap_err();
        assert!(e.to_string().contains("not a plain directory"), "{e}");
        assert!(!real.join("handles.json").exists());
    }

    /// A FIFO (or a link, or a directory) planted as `handles.json` is refused at once: the open
    /// does not wait for a writer and nothing is read from it.
    #[test]
    fn read_refuses_a_planted_fifo_link_or_dir_without_blocking() {
        let t = TempDir::new();
        let f = t.path().join("handles.json");
        rustix::fs::mknodat(
            CWD,
            &f,
            rustix::fs::FileType::Fifo,
            Mode::from_raw_mode(0o600),
            0,
        )
        .expect("mkfifo");
        // Were the open blocking, this thread would wait forever for a writer: run it aside.
        let (tx, rx) = std::sync::mpsc::channel();
        let f2 = f.clone();
        std::thread::spawn(move || {
            let _ = tx.send(read_handles(&f2).map_err(|e| e.why));
        });
        let r = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("read_handles returned (the FIFO did not block it)");
        assert_eq!(r, Err("it is not a regular file (a Fifo)".to_string()));
        assert!(matches!(
            classify_handles(&f, Path::new("/proc")),
            Liveness::Unsure(_)
        ));
        std::fs::remove_file(&f).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", &f).unwrap();
        assert_eq!(read_handles(&f).unwrap_err().why, "it is a symlink");
        std::fs::remove_file(&f).unwrap();
        std::fs::create_dir(&f).unwrap();
        assert_eq!(
            read_handles(&f).unwrap_err().why,
            "it is not a regular file (a Directory)"
        );
    }

    #[test]
    fn fd_path_reaches_the_pinned_directory_after_a_rename() {
        let t = TempDir::new();
        let d = t.path().join("d");
        std::fs::create_dir(&d).unwrap();
        std::fs::write(d.join("x"), "pinned").unwrap();
        let fd = open_dir_nofollow(&d).unwrap();
        std::fs::rename(&d, t.path().join("moved")).unwrap();
        std::fs::create_dir(&d).unwrap();
        std::fs::write(d.join("x"), "impostor").unwrap();
        let p = fd_path(&fd, OsStr::new("x"));
        assert!(p.starts_with("/proc/self/fd/"), "{}", p.display());
        assert_eq!(std::fs::read_to_string(p).unwrap(), "pinned");
    }

    #[test]
    fn classify_handles_table() {
        let t = TempDir::new();
        let proc_root = t.path().join("proc");
        fake_proc(
            &proc_root,
            100,
            &stat_line(100, "firecracker", 'S', 5000),
            "firecracker\n",
            &[],
        );
        let f = t.path().join("handles.json");
        assert!(
            matches!(classify_handles(&f, &proc_root), Liveness::Unsure(_)),
            "missing file"
        );
        for garbage in ["", "{", "null", "{\"version\":1}", "\u{0}\u{1}"] {
            std::fs::write(&f, garbage).expect("write");
            assert!(
                matches!(classify_handles(&f, &proc_root), Liveness::Unsure(_)),
                "garbage {garbage:?}"
            );
        }
        let mut newer = handles(100, 5000);
        newer.version = 99;
        std::fs::write(&f, serde_json::to_vec(&newer).expect("json")).expect("write");
        assert!(
            matches!(classify_handles(&f, &proc_root), Liveness::Unsure(_)),
            "newer version"
        );
        write_handles(&f, &handles(100, 5000), None).expect("write");
        assert_eq!(classify_handles(&f, &proc_root), Liveness::Alive);
        // Whitespace around the JSON is fine.
        let text = std::fs::read_to_string(&f).expect("read");
        std::fs::write(&f, format!("\n  {text}\n\n")).expect("write");
        assert_eq!(classify_handles(&f, &proc_root), Liveness::Alive);
        write_handles(&f, &handles(100, 1), None).expect("write");
        assert!(
            matches!(classify_handles(&f, &proc_root), Liveness::Gone(_)),
            "reused pid"
        );
    }

    #[test]
    fn banger_vmm_table() {
        let t = TempDir::new();
        let p = t.path();
        let line = |pid| stat_line(pid, "firecracker", 'S', 5000);
        fake_proc(
            p,
            100,
            &line(100),
            "firecracker\n",
            &[
                "/usr/local/bin/firecracker",
                "--api-sock",
                "/s",
                "--id",
                "vm-1",
            ],
        );
        fake_proc(
            p,
            101,
            &line(101),
            "firecracker\n",
            &["/usr/local/bin/firecracker", "--id", "vm-2"],
        );
        fake_proc(
            p,
            102,
            &stat_line(102, "bash", 'S', 5000),
            "bash\n",
            &["bash", "--id", "vm-1"],
        );
        let expect = VmmExpect {
            comm: "firecracker",
            vm_id: "vm-1",
            uid: Some(1000),
        };
        assert!(is_banger_vmm(&ident(100, 5000, "firecracker"), &expect, p));
        let refused = [
            ("reused pid", ident(100, 1, "firecracker"), expect.clone()),
            ("other VM", ident(101, 5000, "firecracker"), expect.clone()),
            (
                "record names another program",
                ident(102, 5000, "bash"),
                expect.clone(),
            ),
            ("gone", ident(103, 5000, "firecracker"), expect.clone()),
            (
                "other uid",
                ident(100, 5000, "firecracker"),
                VmmExpect {
                    uid: Some(0),
                    ..expect.clone()
                },
            ),
        ];
        for (name, id, ex) in refused {
            assert!(check_banger_vmm(&id, &ex, p).is_err(), "{name}");
        }
    }
}
