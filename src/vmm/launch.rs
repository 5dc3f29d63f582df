//! Starting, signalling and cleaning up after a VMM process, detached so it outlives banger.
//!
//! Owns the VMM's process life on the host: the command line, the detachment (new session,
//! stdin `/dev/null`, stdout+stderr appended to `console.log`, umask 077, own pidfile, and — when
//! systemd runs — its own transient scope `banger-vm-<id>.scope` in `banger.slice`), reaping, and
//! identity-checked signal delivery. It must never signal a process whose identity it has not just
//! re-verified, never follow a symlink while working as root in the owner-writable VM directory,
//! and never remove anything but a stopped VM's sockets and pidfile.
//!
//! Decisions (DESIGN §6):
//! - **Reaping**: the launcher keeps the VMM as its child and a small reaper thread per VMM waits
//!   for it (and logs its exit status). No zombie stays behind while the helper lives; when the
//!   helper restarts, its VMMs are reparented to init (or the nearest subreaper), which reaps them.
//!   A double fork would lose the exit status and need a raw `fork` in `pre_exec`; a single
//!   `waitpid(-1)` reaper would steal the statuses of the helper's other children (`ip`, …).
//! - **Survival**: `setsid` puts the VMM in its own session and process group, so no terminal or
//!   process-group signal aimed at the helper reaches it; with systemd it also lives in its own
//!   scope (another cgroup), so `systemctl stop/restart bangerd-root` cannot reach it under any
//!   `KillMode`.
//! - **Scope without systemd-run**: the child is forked and *held* before exec (in `pre_exec` it
//!   reports its pid on one pipe and blocks reading another); [`scope::start`] asks systemd over
//!   D-Bus (`StartTransientUnit`, `PIDs=[pid]`) to create `banger-vm-<id>.scope` in
//!   `banger.slice`, waits for the job and checks `/proc/<pid>/cgroup`; only then does the child
//!   get the go byte and exec, so the VMM never runs a single instruction outside its scope
//!   (while held it has closed its copies of the launcher's descriptors, see
//!   [`close_inherited_fds`]). If
//!   the registration fails the held child is killed and reaped, and the error says why (bus
//!   unreachable, unit exists, job failed). `spawn` returns only after exec, so it runs on a short
//!   scoped thread while the launching thread does the registration. The pid we hold is the
//!   VMM's (exec keeps it); [`launch`] still waits until `/proc/<pid>/comm` is the VMM's and its
//!   API socket exists, and kills it on timeout. (`systemd-run --scope` did the same dance in a
//!   process of its own, with its own bus connection, on every launch; systemd's job itself —
//!   creating the cgroup and moving the pid — still costs what it costs.)
//! - **Privileges**: with [`RunAs`] the VMM runs as the owner user (uid, primary gid, and exactly the
//!   supplementary groups given, e.g. the group of `/dev/kvm`), so the sockets Firecracker creates
//!   (API socket now, vsock socket when configured) belong to the owner and the daemon can connect;
//!   the VMM never runs as root. The ids are dropped in `pre_exec` (setgroups, then setresgid,
//!   then setresuid) before the hold, with or without a scope: moving a pid into a scope needs
//!   systemd's privileges, not the child's. A jailer ([`VmmKind`]) would later take over the id
//!   drop and the chroot.

use crate::error::{Context, Error, Result};
use crate::vmm::identity::{self, classify, open_dir_nofollow, open_parent, Identity, Liveness};
use crate::vmm::scope;
use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use rustix::pipe::PipeFlags;
use rustix::process::{Pid, PidfdFlags, Signal};
use std::ffi::OsString;
use std::fs::File;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Firecracker's API socket, in the VM directory.
pub const API_SOCKET: &str = "fc.sock";
/// Firecracker's host-side vsock socket, in the VM directory.
pub const VSOCK_SOCKET: &str = "vsock.sock";
/// The VMM's stdout/stderr (the guest console), in the VM directory.
pub const CONSOLE_LOG: &str = "console.log";
/// The VMM's pidfile, in the VM directory.
pub const PIDFILE: &str = "vmm.pid";
/// The VM's identity record ([`identity::Handles`]), in the VM directory.
pub const HANDLES: &str = "handles.json";
/// File name of the VMM's own log.
pub const VMM_LOG: &str = "firecracker.log";
/// The slice every VMM scope lives in.
pub const SLICE: &str = "banger.slice";
/// How long [`launch`] waits for the VMM to exec, by default.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);

const PATH_ENV: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The per-VM files below `vms/<id>/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmFiles {
    /// `vms/<id>`.
    pub dir: PathBuf,
    /// `vms/<id>/fc.sock`.
    pub api_socket: PathBuf,
    /// `vms/<id>/vsock.sock`.
    pub vsock_uds: PathBuf,
    /// `vms/<id>/console.log`.
    pub console_log: PathBuf,
    /// `vms/<id>/vmm.pid`.
    pub pidfile: PathBuf,
    /// `vms/<id>/handles.json`.
    pub handles: PathBuf,
    /// `vms/<id>/firecracker.log`: the VMM's own log, kept out of the guest console (Firecracker
    /// logs to stdout by default, and its lines would split the guest's on the shared stream).
    pub vmm_log: PathBuf,
}

impl VmFiles {
    /// The files of the VM whose directory is `dir` (`Layout::vm_dir(id)`).
    pub fn in_dir(dir: &Path) -> Self {
        VmFiles {
            dir: dir.to_path_buf(),
            api_socket: dir.join(API_SOCKET),
            vsock_uds: dir.join(VSOCK_SOCKET),
            console_log: dir.join(CONSOLE_LOG),
            pidfile: dir.join(PIDFILE),
            handles: dir.join(HANDLES),
            vmm_log: dir.join(VMM_LOG),
        }
    }
}

/// Which program the launcher starts and how its command line is built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmmKind {
    /// Firecracker: `<vmm> --api-sock <api_socket> --id <vm_id> <extra_args…>`.
    /// (A `Jailer` kind would add `--uid/--gid/--chroot-base-dir` and do the id drop itself.)
    Firecracker,
    /// Any program, `<vmm> <extra_args…>` only (tests' stand-ins such as `sleep`).
    Plain,
}

/// The identity the VMM runs under instead of root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAs {
    /// User id (the owner).
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Exactly these supplementary groups (e.g. the owner's gid and `/dev/kvm`'s group).
    pub groups: Vec<u32>,
}

/// Everything needed to start one VMM.
#[derive(Debug, Clone)]
pub struct LaunchSpec {
    /// The VM (already validated by the caller).
    pub vm_id: String,
    /// The VMM executable (from the helper's own configuration, never from a caller).
    pub vmm_binary: PathBuf,
    /// How to build the command line.
    pub kind: VmmKind,
    /// The API socket the VMM creates.
    pub api_socket: PathBuf,
    /// stdout and stderr are appended here.
    pub console_log: PathBuf,
    /// The pidfile written once the VMM runs.
    pub pidfile: PathBuf,
    /// Further arguments after the ones [`VmmKind`] implies.
    pub extra_args: Vec<String>,
    /// Start the VMM inside its own transient systemd scope ([`scope::start`]).
    pub use_scope: bool,
    /// Where systemd's D-Bus API is (the host's unless a test says otherwise).
    pub systemd: scope::Endpoints,
    /// Run the VMM as this user instead of the launcher's (requires root).
    pub run_as: Option<RunAs>,
    /// Bound on the wait for the VMM to exec.
    pub start_timeout: Duration,
    /// Where `/proc` is (tests may not change it for a real launch; it is here for symmetry).
    pub proc_root: PathBuf,
}

impl LaunchSpec {
    /// A Firecracker launch of VM `vm_id` from `vmm_binary` with the standard files of `files`.
    pub fn firecracker(vm_id: &str, vmm_binary: &Path, files: &VmFiles) -> Self {
        LaunchSpec {
            vm_id: vm_id.to_string(),
            vmm_binary: vmm_binary.to_path_buf(),
            kind: VmmKind::Firecracker,
            api_socket: files.api_socket.clone(),
            console_log: files.console_log.clone(),
            pidfile: files.pidfile.clone(),
            // Firecracker (run as the owner) creates this file itself in the owner's VM dir.
            extra_args: vec![
                "--log-path".into(),
                files.vmm_log.to_string_lossy().into_owned(),
            ],
            use_scope: systemd_running(),
            systemd: scope::Endpoints::system(),
            run_as: None,
            start_timeout: START_TIMEOUT,
            proc_root: PathBuf::from("/proc"),
        }
    }
}

/// True when systemd is the init system (`/run/systemd/system` exists, as `sd_booted(3)` checks).
/// This is systemd's own marker, not a banger path, so it does not come from the `Layout`.
pub fn systemd_running() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

/// The transient scope of VM `vm_id`.
pub fn scope_unit(vm_id: &str) -> String {
    format!("banger-vm-{vm_id}.scope")
}

/// The program and arguments [`launch`] runs for `spec` (the VMM itself: the scope is registered
/// over D-Bus, never by a wrapper program).
pub fn command_line(spec: &LaunchSpec) -> (PathBuf, Vec<OsString>) {
    let mut vmm: Vec<OsString> = Vec::new();
    if spec.kind == VmmKind::Firecracker {
        vmm.push("--api-sock".into());
        vmm.push(spec.api_socket.clone().into());
        vmm.push("--id".into());
        vmm.push(spec.vm_id.clone().into());
    }
    vmm.extend(spec.extra_args.iter().map(OsString::from));
    (spec.vmm_binary.clone(), vmm)
}

/// Opens the console log for appending, as root in an owner-writable directory: never through a
/// symlink, never a file with other links, never someone else's file; a new one is handed to the
/// VMM's user.
fn open_console(path: &Path, run_as: Option<&RunAs>) -> Result<File> {
    let what = || format!("opening the console log {}", path.display());
    let (dir, name) = open_parent(path)?;
    let flags = OFlags::RDWR | OFlags::APPEND | OFlags::NOFOLLOW | OFlags::NOCTTY | OFlags::CLOEXEC;
    let mode = Mode::from_raw_mode(0o600);
    match rustix::fs::openat(
        &dir,
        name.as_os_str(),
        flags | OFlags::CREATE | OFlags::EXCL,
        mode,
    ) {
        Ok(fd) => {
            let f = File::from(fd);
            if let Some(r) = run_as {
                std::os::unix::fs::fchown(&f, Some(r.uid), Some(r.gid)).ctx(what)?;
            }
            Ok(f)
        }
        Err(rustix::io::Errno::EXIST) => {
            // O_NONBLOCK: a planted FIFO or device must not make the open wait (on a regular
            // file, the only kind kept below, it changes nothing).
            let fd = rustix::fs::openat(&dir, name.as_os_str(), flags | OFlags::NONBLOCK, mode)
                .ctx(what)?;
            let st = rustix::fs::fstat(&fd).ctx(what)?;
            let want_uid = run_as
                .map(|r| r.uid)
                .unwrap_or_else(|| rustix::process::geteuid().as_raw());
            if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
                return Err(Error::new(what(), "not a regular file"));
            }
            if st.st_nlink != 1 {
                return Err(
                    Error::new(what(), format!("it has {} hard links", st.st_nlink))
                        .hint("remove it; banger recreates it"),
                );
            }
            if st.st_uid != want_uid {
                return Err(Error::new(
                    what(),
                    format!("owned by uid {}, expected uid {want_uid}", st.st_uid),
                )
                .hint("remove it; banger recreates it"));
            }
            Ok(File::from(fd))
        }
        Err(e) => Err(Error::new(what(), e)),
    }
}

/// Removes a leftover API socket of a dead VMM (Firecracker refuses to start over one); refuses
/// when something still answers on it.
fn clear_stale_socket(path: &Path) -> Result<()> {
    let what = || format!("clearing the old API socket {}", path.display());
    let (dir, name) = open_parent(path)?;
    let st = match rustix::fs::statat(&dir, name.as_os_str(), AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(rustix::io::Errno::NOENT) => return Ok(()),
        Err(e) => return Err(Error::new(what(), e)),
    };
    if FileType::from_raw_mode(st.st_mode) != FileType::Socket {
        return Err(Error::new(what(), "it exists and is not a socket"));
    }
    // Through the pinned directory, not `path`: the directory may have been swapped since.
    if std::os::unix::net::UnixStream::connect(identity::fd_path(&dir, &name)).is_ok() {
        return Err(Error::new(what(), "a process is still listening on it")
            .hint("the VM's VMM is still running; stop it first"));
    }
    rustix::fs::unlinkat(&dir, name.as_os_str(), AtFlags::empty()).ctx(what)
}

/// The last `max` bytes of the console log, for error messages.
fn tail(f: &File, max: u64) -> String {
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(max);
    let mut buf = vec![0; (len - start) as usize];
    match f.read_at(&mut buf, start) {
        Ok(n) => String::from_utf8_lossy(&buf[..n]).trim().to_string(),
        Err(_) => String::new(),
    }
}

fn read_comm(proc_root: &Path, pid: i32) -> Option<String> {
    std::fs::read(proc_root.join(pid.to_string()).join("comm"))
        .ok()
        .map(|b| String::from_utf8_lossy(&b).trim_end().to_string())
}

/// What a held child is told through the go pipe: exec now. Anything else (EOF) aborts it.
const GO: u8 = b'G';

/// Registers a held child (by pid) before it may exec; an error aborts the launch.
type Register<'a> = &'a dyn Fn(u32) -> Result<()>;

/// How long each step of a launch took, in order (for the operation's timings).
pub type Steps = Vec<(&'static str, Duration)>;

/// Starts the VMM of `spec` detached and returns its identity once it has exec'd.
///
/// Writes the pidfile; `handles.json` is the caller's (it knows the rest of the record).
pub fn launch(spec: &LaunchSpec) -> Result<Identity> {
    launch_timed(spec, &mut Steps::new())
}

/// [`launch`], recording how long each step took in `steps`.
pub fn launch_timed(spec: &LaunchSpec, steps: &mut Steps) -> Result<Identity> {
    if !spec.use_scope {
        return launch_steps(spec, None, steps);
    }
    let unit = scope_unit(&spec.vm_id);
    let register = |pid: u32| {
        scope::start(
            &spec.systemd,
            &scope::ScopeRequest {
                unit: &unit,
                slice: SLICE,
                description: format!("banger VM {} ({})", spec.vm_id, spec.vmm_binary.display()),
                pid,
                timeout: spec.start_timeout,
                proc_root: &spec.proc_root,
            },
        )
    };
    launch_steps(spec, Some(&register), steps)
}

/// [`launch`], with the child held before exec until `register` (when given) accepted its pid.
#[cfg(test)]
fn launch_held(spec: &LaunchSpec, register: Option<Register<'_>>) -> Result<Identity> {
    launch_steps(spec, register, &mut Steps::new())
}

/// [`launch_held`], recording each step's time in `steps`.
fn launch_steps(
    spec: &LaunchSpec,
    register: Option<Register<'_>>,
    steps: &mut Steps,
) -> Result<Identity> {
    let what = || format!("starting the VMM of VM {}", spec.vm_id);
    let mut lap = {
        let mut last = Instant::now();
        move |steps: &mut Steps, name: &'static str| {
            let now = Instant::now();
            steps.push((name, now - last));
            last = now;
        }
    };
    if spec.kind == VmmKind::Firecracker {
        clear_stale_socket(&spec.api_socket)?;
    }
    let console = open_console(&spec.console_log, spec.run_as.as_ref())?;
    let out = console.try_clone().ctx(what)?;
    let err = console.try_clone().ctx(what)?;
    let (program, args) = command_line(spec);
    let mut cmd = Command::new(&program);
    cmd.args(&args)
        .env_clear()
        .env("PATH", PATH_ENV)
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);

    // Everything the child needs is computed here, before fork: after fork only raw syscalls.
    let ids = match &spec.run_as {
        Some(r) if r.uid == u32::MAX || r.gid == u32::MAX || r.groups.contains(&u32::MAX) => {
            return Err(Error::new(what(), "uid/gid -1 is not an id"));
        }
        // SAFETY: `Uid/Gid::from_raw` only require the value not to be -1, checked just above.
        Some(r) => Some(unsafe {
            (
                rustix::process::Uid::from_raw(r.uid),
                rustix::process::Gid::from_raw(r.gid),
                r.groups
                    .iter()
                    .map(|g| rustix::process::Gid::from_raw(*g))
                    .collect::<Vec<_>>(),
            )
        }),
        None => None,
    };
    // The hold: the child reports its pid on one pipe and waits for GO on the other (both
    // close-on-exec, so the VMM never sees them).
    let pipes = match register {
        Some(_) => {
            let (pid_r, pid_w) = rustix::pipe::pipe_with(PipeFlags::CLOEXEC).ctx(what)?;
            let (go_r, go_w) = rustix::pipe::pipe_with(PipeFlags::CLOEXEC).ctx(what)?;
            Some((pid_r, pid_w, go_r, go_w))
        }
        None => None,
    };
    let hold_fds = pipes
        .as_ref()
        .map(|(_, pid_w, go_r, go_w)| (pid_w.as_raw_fd(), go_r.as_raw_fd(), go_w.as_raw_fd()));
    // SAFETY: the closure runs in the forked child before exec, where only async-signal-safe work
    // is allowed. It makes raw syscalls only (rustix's linux_raw backend: setsid, umask, setgroups,
    // setresgid, setresuid, getpid, write, close, read), allocates nothing and takes no locks; its
    // captures (plain ids and fd numbers) were built before the fork. The thread-scoped id calls
    // are right here because the child has exactly one thread.
    unsafe {
        cmd.pre_exec(move || {
            rustix::process::setsid()?;
            rustix::process::umask(Mode::from_raw_mode(0o077));
            if let Some((uid, gid, groups)) = &ids {
                rustix::thread::set_thread_groups(groups)?;
                rustix::thread::set_thread_res_gid(*gid, *gid, *gid)?;
                rustix::thread::set_thread_res_uid(*uid, *uid, *uid)?;
            }
            if let Some((pid_w, go_r, go_w)) = hold_fds {
                hold_in_child(pid_w, go_r, go_w)?;
            }
            Ok(())
        });
    }
    let spawn_failed = |e: std::io::Error| {
        Error::new(what(), format!("running {}: {e}", program.display()))
            .hint("check BANGER_FIRECRACKER / the VMM path and that it is executable")
    };
    lap(steps, "preparing the launch");
    let mut registered = Duration::ZERO;
    let child = match (register, pipes) {
        (Some(register), Some((pid_r, pid_w, go_r, go_w))) => {
            // `spawn` returns only once the child exec'd, so it runs on a thread of its own while
            // this one reads the pid, registers it, and releases (or kills) the child.
            std::thread::scope(|s| {
                let cmd = &mut cmd;
                let spawner = std::thread::Builder::new()
                    .name("vmm-spawn".into())
                    .stack_size(64 * 1024)
                    .spawn_scoped(s, move || {
                        let r = cmd.spawn();
                        // Our ends: EOF for the reader below if the child never reported.
                        drop((pid_w, go_r));
                        r
                    })
                    .ctx(what)?;
                let released = read_pid(&pid_r).and_then(|pid| {
                    let t = Instant::now();
                    let registered_r = register(pid);
                    registered = t.elapsed();
                    let go = registered_r.and_then(|()| {
                        rustix::io::write(&go_w, &[GO])
                            .ctx(|| format!("releasing the held VMM (pid {pid})"))
                    });
                    if go.is_err() {
                        // Our own unreaped child: its pid cannot have been reused. EOF alone
                        // could wait on another child that inherited the pipe while forking.
                        if let Some(p) = Pid::from_raw(pid as i32) {
                            let _ = rustix::process::kill_process(p, Signal::Kill);
                        }
                    }
                    go.map(|_| pid)
                });
                drop(go_w);
                let spawned = spawner
                    .join()
                    .map_err(|_| Error::new(what(), "the spawning thread panicked"))?;
                match (released, spawned) {
                    (Ok(_), Ok(child)) => Ok(child),
                    (Ok(_), Err(e)) => Err(spawn_failed(e)),
                    (Err(e), Ok(mut child)) => {
                        // Killed while held (above), never exec'd: reap it.
                        let _ = child.kill();
                        let _ = child.wait();
                        Err(e)
                    }
                    // The child stopped on our EOF, or was killed: the registration's error.
                    (Err(e), Err(spawn_e)) if spawn_e.raw_os_error() == Some(CANCELED) => Err(e),
                    // The child failed on its own before reporting (setsid, ids): its error.
                    (Err(_), Err(spawn_e)) => Err(spawn_failed(spawn_e)),
                }
            })?
        }
        _ => cmd.spawn().map_err(spawn_failed)?,
    };
    if register.is_some() {
        steps.push(("registering the scope", registered));
    }
    lap(steps, "fork and exec (with the scope registration)");
    let raw_pid = child.id() as i32;
    let pid = Pid::from_raw(raw_pid).ok_or_else(|| Error::new(what(), "spawn returned pid 0"))?;
    // Pins the child for the kill on a failed start: the reaper may reap it at any moment.
    let pidfd = rustix::process::pidfd_open(pid, PidfdFlags::empty()).ok();
    let exited = spawn_reaper(child, spec.vm_id.clone());

    let want = identity::comm_for(&spec.vmm_binary);
    let deadline = Instant::now() + spec.start_timeout;
    let mut last_comm = String::new();
    let ident = loop {
        if let Ok(status) = exited.try_recv() {
            return Err(Error::new(
                what(),
                format!(
                    "{} exited during start ({status}); console: {}",
                    program.display(),
                    tail(&console, 2048)
                ),
            ));
        }
        if let Some(c) = read_comm(&spec.proc_root, raw_pid) {
            // Firecracker is up once its API socket exists: until then it may still fail.
            let ready = spec.kind != VmmKind::Firecracker || spec.api_socket.exists();
            if c == want && ready {
                break identity::read_identity(&spec.proc_root, raw_pid)?;
            }
            last_comm = c;
        }
        if Instant::now() >= deadline {
            if let Some(fd) = &pidfd {
                let _ = rustix::process::pidfd_send_signal(fd, Signal::Kill);
            }
            let mut e = Error::new(
                what(),
                if last_comm == want {
                    format!(
                        "{want} (pid {raw_pid}) did not create {} within {:?}; console: {}",
                        spec.api_socket.display(),
                        spec.start_timeout,
                        tail(&console, 2048)
                    )
                } else {
                    format!(
                        "pid {raw_pid} is still `{last_comm}`, not `{want}`, after {:?}; console: {}",
                        spec.start_timeout,
                        tail(&console, 2048)
                    )
                },
            );
            if spec.use_scope {
                e = e.hint(format!(
                    "check `systemctl status {}` and the console log",
                    scope_unit(&spec.vm_id)
                ));
            }
            return Err(e);
        }
        // Firecracker binds its API socket a few ms after exec: a fine poll costs a stat and a
        // small read per ms, and every ms of slack is on the restore's critical path.
        std::thread::sleep(Duration::from_micros(500));
    };
    lap(steps, "waiting for the VMM's API socket");
    let owner = spec.run_as.as_ref().map(|r| (r.uid, r.gid));
    // Not fsynced: the pidfile only names a live process, which a power loss ends anyway (the
    // durable record is handles.json).
    identity::write_atomic_volatile(
        &spec.pidfile,
        format!("{raw_pid}\n").as_bytes(),
        0o600,
        owner,
    )?;
    lap(steps, "writing the pidfile");
    Ok(ident)
}

/// `ECANCELED`: what a held child's `pre_exec` fails with when told not to exec.
const CANCELED: i32 = rustix::io::Errno::CANCELED.raw_os_error();

/// The held child's side, between fork and exec: reports its pid on `pid_w`, closes its copy of
/// `go_w` (so the parent closing its own is an EOF here), and waits for [`GO`] on `go_r`.
/// Raw syscalls only (see the `pre_exec` safety note in [`launch_held`]).
fn hold_in_child(pid_w: RawFd, go_r: RawFd, go_w: RawFd) -> std::io::Result<()> {
    close_inherited_fds();
    // SAFETY: the three descriptors were open in the parent at fork time (owned by `launch_held`
    // until after `spawn` returns), so they are open here; closing our copy of `go_w` touches
    // nothing of the parent's.
    let (pid_w, go_r) = unsafe {
        rustix::io::close(go_w);
        (BorrowedFd::borrow_raw(pid_w), BorrowedFd::borrow_raw(go_r))
    };
    let pid = rustix::process::getpid()
        .as_raw_nonzero()
        .get()
        .to_ne_bytes();
    let mut sent = 0;
    while sent < pid.len() {
        match rustix::io::write(pid_w, &pid[sent..]) {
            Ok(0) => return Err(std::io::Error::from_raw_os_error(CANCELED)),
            Ok(n) => sent += n,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let mut byte = [0u8];
    loop {
        match rustix::io::read(go_r, &mut byte) {
            Ok(1) if byte[0] == GO => return Ok(()),
            Err(rustix::io::Errno::INTR) => {}
            _ => return Err(std::io::Error::from_raw_os_error(CANCELED)),
        }
    }
}

/// The held child's copies of the launcher's descriptors (fd 3 and up: listeners, connections,
/// netlink sockets, a tap the helper is just creating for another VM, files), closed before it
/// reports its pid: all are close-on-exec, but the hold lasts the scope registration (tens of ms),
/// and meanwhile a copy would keep a listener accepting, a connection the launcher closed from
/// reaching EOF, or another VM's tap attached (its VMM's open then fails with EBUSY). Kept: pipes
/// and unnamed socket pairs — std's exec-error channel is one, and it cannot be told from another.
/// Raw syscalls and stack buffers only (see the `pre_exec` safety note in [`launch_held`]); a
/// `/proc` it cannot read closes nothing.
fn close_inherited_fds() {
    let Ok(dir) = rustix::fs::openat(
        rustix::fs::CWD,
        rustix::cstr!("/proc/self/fd"),
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    ) else {
        return;
    };
    let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 1024];
    let mut entries = rustix::fs::RawDir::new(&dir, &mut buf);
    // procfs lists descriptors by number from the last position, so closing as we go is safe.
    while let Some(Ok(entry)) = entries.next() {
        let name = entry.file_name().to_bytes();
        if name.is_empty() || !name.iter().all(u8::is_ascii_digit) || name.len() > 9 {
            continue;
        }
        let fd = name.iter().fold(0i32, |n, d| n * 10 + i32::from(d - b'0'));
        if fd < 3 || fd == dir.as_raw_fd() {
            continue;
        }
        // SAFETY: `fd` is listed as open in this (single-threaded) child; it is only examined
        // and, unless kept, closed — never used after.
        unsafe {
            let keep = match rustix::fs::fstat(BorrowedFd::borrow_raw(fd)) {
                Ok(st) => match FileType::from_raw_mode(st.st_mode) {
                    FileType::Fifo => true,
                    FileType::Socket => is_socket_pair_end(fd),
                    _ => false,
                },
                Err(_) => true,
            };
            if !keep {
                rustix::io::close(fd);
            }
        }
    }
}

/// True for an AF_UNIX socket with no name on either end (a `socketpair(2)` end). Raw
/// syscalls on stack buffers only.
fn is_socket_pair_end(fd: RawFd) -> bool {
    let unnamed = |peer: bool| {
        // SAFETY: plain getsockname/getpeername into a zeroed sockaddr_un of the size given.
        unsafe {
            let mut a: libc::sockaddr_un = std::mem::zeroed();
            let mut len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
            let p = (&mut a as *mut libc::sockaddr_un).cast::<libc::sockaddr>();
            let rc = if peer {
                libc::getpeername(fd, p, &mut len)
            } else {
                libc::getsockname(fd, p, &mut len)
            };
            rc == 0
                && a.sun_family == libc::AF_UNIX as libc::sa_family_t
                && len as usize <= std::mem::size_of::<libc::sa_family_t>()
        }
    };
    unnamed(false) && unnamed(true)
}

/// The parent's side: the held child's pid, or an error when it ended before reporting.
fn read_pid(pid_r: &OwnedFd) -> Result<u32> {
    let what = || "waiting for the forked VMM's pid".to_string();
    let mut buf = [0u8; 4];
    let mut got = 0;
    while got < buf.len() {
        match rustix::io::read(pid_r, &mut buf[got..]) {
            Ok(0) => return Err(Error::new(what(), "it ended before reporting")),
            Ok(n) => got += n,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(Error::new(what(), e)),
        }
    }
    match i32::from_ne_bytes(buf) {
        p if p > 0 => Ok(p as u32),
        p => Err(Error::new(what(), format!("it reported pid {p}"))),
    }
}

/// Waits for `child` on a small thread of its own, logs its exit, and reports it on the channel.
fn spawn_reaper(mut child: std::process::Child, vm_id: String) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    let pid = child.id();
    let r = std::thread::Builder::new()
        .name(format!("reap-{pid}"))
        .stack_size(64 * 1024)
        .spawn(move || {
            let status = match child.wait() {
                Ok(s) => describe(s),
                Err(e) => format!("wait failed: {e}"),
            };
            crate::logging::info(
                "bangerd-root",
                "vmm exited",
                serde_json::json!({"vm": vm_id, "pid": pid, "status": status}),
            );
            let _ = tx.send(status);
        });
    if let Err(e) = r {
        // The child was dropped with the closure: it runs on, and init reaps it once the helper
        // is gone. Rare (no threads left), and no reason to fail a VM that started.
        crate::logging::error(
            "bangerd-root",
            "no reaper thread for VMM",
            serde_json::json!({"pid": pid, "error": e.to_string()}),
        );
    }
    rx
}

fn describe(s: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (s.code(), s.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        _ => s.to_string(),
    }
}

/// Sends `sig` to the process of `identity`, after re-checking that the pid still belongs to it
/// (never signals a reused pid). The process is pinned with a pidfd before the check, so a pid
/// reused between check and signal is not hit either.
pub fn signal(identity: &Identity, sig: Signal, proc_root: &Path) -> Result<()> {
    let what = || format!("signalling pid {} ({sig:?})", identity.pid);
    let pid = Pid::from_raw(identity.pid).ok_or_else(|| Error::new(what(), "not a process id"))?;
    let pidfd = rustix::process::pidfd_open(pid, PidfdFlags::empty());
    if let Err(rustix::io::Errno::SRCH) = pidfd {
        return Err(Error::new(what(), "no such process"));
    }
    match classify(identity, proc_root) {
        Liveness::Alive => {}
        Liveness::Gone(why) => return Err(Error::new(what(), format!("not delivered: {why}"))),
        Liveness::Unsure(why) => {
            return Err(Error::new(
                what(),
                format!("not delivered, cannot verify: {why}"),
            ))
        }
    }
    match pidfd {
        Ok(fd) => rustix::process::pidfd_send_signal(&fd, sig).ctx(what),
        // Kernels before 5.3: the identity check above is the only guard.
        Err(rustix::io::Errno::NOSYS) => rustix::process::kill_process(pid, sig).ctx(what),
        Err(e) => Err(Error::new(what(), e)),
    }
}

/// Removes the sockets and pidfile a stopped VM left in `vm_dir` (`fc.sock`, `vsock.sock`,
/// Firecracker's per-port `vsock.sock_<port>` listeners, `vmm.pid`) and returns what it removed.
/// Refuses while `handles.json` names a VMM that is alive or cannot be verified. Keeps
/// `console.log` (logs outlive the VM) and `handles.json` (a stale record classifies as gone).
pub fn cleanup(vm_dir: &Path, proc_root: &Path) -> Result<Vec<PathBuf>> {
    let files = VmFiles::in_dir(vm_dir);
    let what = || format!("cleaning up {}", vm_dir.display());
    let dir = match open_dir_nofollow(vm_dir) {
        Ok(d) => d,
        Err(_) if !vm_dir.exists() => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    // Everything below goes through the pinned `dir`, never through `vm_dir` again: the owner can
    // rename or replace the directory (or plant links and FIFOs in it) at any moment.
    let handles_name = files.handles.file_name().unwrap_or_default();
    if let Ok(Some(h)) = identity::read_handles_at(&dir, handles_name, &files.handles) {
        match classify(&h.identity, proc_root) {
            Liveness::Gone(_) => {}
            Liveness::Alive => {
                return Err(Error::new(
                    what(),
                    format!("its VMM (pid {}) is still running", h.identity.pid),
                )
                .hint("stop the VM first"))
            }
            Liveness::Unsure(why) => {
                return Err(Error::new(
                    what(),
                    format!("cannot tell whether its VMM runs: {why}"),
                ))
            }
        }
    }
    let mut names: Vec<(OsString, FileType)> = vec![
        (API_SOCKET.into(), FileType::Socket),
        (VSOCK_SOCKET.into(), FileType::Socket),
        (PIDFILE.into(), FileType::RegularFile),
    ];
    let prefix = format!("{VSOCK_SOCKET}_");
    for entry in rustix::fs::Dir::read_from(&dir).ctx(what)? {
        let entry = entry.ctx(what)?;
        let name = std::ffi::OsStr::from_bytes(entry.file_name().to_bytes());
        if name.to_string_lossy().starts_with(&prefix) {
            names.push((name.to_os_string(), FileType::Socket));
        }
    }
    let mut removed = Vec::new();
    for (name, kind) in names {
        let st = match rustix::fs::statat(&dir, name.as_os_str(), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(rustix::io::Errno::NOENT) => continue,
            Err(e) => return Err(Error::new(what(), e)),
        };
        if FileType::from_raw_mode(st.st_mode) != kind {
            // Not ours to remove (a link or something unexpected): leave it and say so.
            return Err(Error::new(
                what(),
                format!("{} is not a {kind:?}", vm_dir.join(&name).display()),
            ));
        }
        rustix::fs::unlinkat(&dir, name.as_os_str(), AtFlags::empty()).ctx(what)?;
        removed.push(vm_dir.join(name));
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::system::testutil::TempDir;
    use crate::vmm::identity::parse_stat;

    fn sleep_spec(dir: &Path) -> LaunchSpec {
        let files = VmFiles::in_dir(dir);
        LaunchSpec {
            kind: VmmKind::Plain,
            extra_args: vec!["60".into()],
            use_scope: false,
            ..LaunchSpec::firecracker("vm-test", Path::new("/bin/sleep"), &files)
        }
    }

    fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn command_lines() {
        let files = VmFiles::in_dir(Path::new("/r/vms/a"));
        let mut s = LaunchSpec::firecracker("a", Path::new("/usr/local/bin/firecracker"), &files);
        s.use_scope = false;
        let (p, a) = command_line(&s);
        assert_eq!(p, Path::new("/usr/local/bin/firecracker"));
        assert_eq!(
            a,
            [
                "--api-sock",
                "/r/vms/a/fc.sock",
                "--id",
                "a",
                "--log-path",
                "/r/vms/a/firecracker.log"
            ]
            .map(OsString::from)
        );
        // A scope changes nothing on the command line: no wrapper program any more.
        s.use_scope = true;
        s.run_as = Some(RunAs {
            uid: 1000,
            gid: 1000,
            groups: vec![1000],
        });
        assert_eq!(command_line(&s), (p, a));
    }

    /// The processes whose command line is exactly `argv` (NUL-separated in /proc).
    /// The process runs as uid/gid 65534 (real, effective, saved, fs) with groups 4242 and 65534.
    fn assert_runs_as_nobody_with_4242(pid: i32) {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
        let line = |k: &str| {
            status
                .lines()
                .find(|l| l.starts_with(k))
                .map(|l| l.split_whitespace().skip(1).collect::<Vec<_>>().join(" "))
                .unwrap_or_default()
        };
        assert_eq!(line("Uid:"), "65534 65534 65534 65534");
        assert_eq!(line("Gid:"), "65534 65534 65534 65534");
        assert_eq!(line("Groups:"), "4242 65534");
    }

    fn pids_running(argv: &[&str]) -> Vec<i32> {
        let want: Vec<u8> = argv
            .iter()
            .flat_map(|a| [a.as_bytes(), b"\0"].concat())
            .collect();
        std::fs::read_dir("/proc")
            .expect("/proc")
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
            .filter(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).ok() == Some(want.clone()))
            .collect()
    }

    #[test]
    fn held_child_execs_only_after_registration() {
        let t = TempDir::new();
        let mut spec = sleep_spec(t.path());
        let token = format!("{}.{}", 60, std::process::id());
        spec.extra_args = vec![token.clone()];
        let seen = std::sync::Mutex::new(None);
        // A listening socket of ours: the held child closed its copy before reporting its pid.
        let listener =
            std::os::unix::net::UnixListener::bind(t.path().join("ours.sock")).expect("bind");
        let ours = format!(
            "socket:[{}]",
            rustix::fs::fstat(&listener).expect("fstat").st_ino
        );
        // And a file of ours (as a tap being created would be: a device node).
        let null = std::fs::File::open("/dev/null").expect("/dev/null");
        let null_ino = rustix::fs::fstat(&null).expect("fstat").st_ino;
        let register = |pid: u32| {
            let held_null = std::fs::read_dir(format!("/proc/{pid}/fd"))
                .expect("fds")
                .filter_map(|e| {
                    let n: i32 = e.ok()?.file_name().to_str()?.parse().ok()?;
                    (n > 2).then_some(n)
                })
                .any(|n| {
                    std::fs::metadata(format!("/proc/{pid}/fd/{n}"))
                        .is_ok_and(|m| std::os::unix::fs::MetadataExt::ino(&m) == null_ino)
                });
            assert!(
                !held_null,
                "the held child keeps our /dev/null beyond stdio"
            );
            let held_sockets: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
                .expect("fds")
                .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .map(|l| l.to_string_lossy().into_owned())
                .filter(|l| l.starts_with("socket:"))
                .collect();
            assert!(
                !held_sockets.contains(&ours),
                "the held child keeps our listener: {held_sockets:?}"
            );
            // Held: forked, detached, but not yet the VMM (still our own image, not `sleep`).
            let exe = std::fs::read_link(format!("/proc/{pid}/exe")).expect("exe");
            let stat =
                parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat"))
                    .expect("parse");
            *seen.lock().unwrap() = Some((pid, exe, stat.session));
            Ok(())
        };
        let id = launch_held(&spec, Some(&register)).expect("launch held");
        let (pid, exe, session) = seen.lock().unwrap().clone().expect("register was called");
        assert_eq!(pid as i32, id.pid, "the registered pid is the VMM's");
        assert_eq!(
            exe,
            std::env::current_exe().expect("current exe"),
            "not exec'd while held"
        );
        assert_eq!(session, id.pid, "setsid happened before the hold");
        assert_eq!(id.comm, "sleep");
        assert_eq!(pids_running(&["/bin/sleep", &token]), vec![id.pid]);
        // The hold's pipes are close-on-exec: beyond stdin/stdout/stderr the VMM has only what
        // the test process itself inherited without close-on-exec (the same open files).
        for e in std::fs::read_dir(format!("/proc/{}/fd", id.pid)).expect("fds") {
            let name = e.expect("fd").file_name().into_string().expect("fd name");
            if ["0", "1", "2"].contains(&name.as_str()) {
                continue;
            }
            let theirs = std::fs::read_link(format!("/proc/{}/fd/{name}", id.pid)).ok();
            let ours = std::fs::read_link(format!("/proc/self/fd/{name}")).ok();
            assert_eq!(theirs, ours, "VMM fd {name} is not an inherited one");
        }
        signal(&id, Signal::Kill, Path::new("/proc")).expect("kill");
    }

    #[test]
    fn refused_registration_kills_the_held_child() {
        let t = TempDir::new();
        let mut spec = sleep_spec(t.path());
        let token = format!("{}.{}", 61, std::process::id());
        spec.extra_args = vec![token.clone()];
        let held = std::sync::Mutex::new(0u32);
        let register = |pid: u32| {
            *held.lock().unwrap() = pid;
            Err(Error::new("registering", "refused by the test"))
        };
        let e = launch_held(&spec, Some(&register)).unwrap_err();
        assert_eq!(e.to_string(), "registering: refused by the test");
        let pid = *held.lock().unwrap();
        assert!(pid > 0);
        // Killed and reaped before launch returned: no process, not even a zombie, and it never
        // became the VMM.
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "pid {pid} still exists"
        );
        assert_eq!(pids_running(&["/bin/sleep", &token]), Vec::<i32>::new());
        assert!(!spec.pidfile.exists(), "no pidfile for a refused start");
    }

    #[test]
    fn held_child_that_cannot_exec_is_an_error() {
        let t = TempDir::new();
        let mut spec = sleep_spec(t.path());
        spec.vmm_binary = t.path().join("no-such-vmm");
        let called = std::sync::atomic::AtomicBool::new(false);
        let register = |_pid: u32| {
            called.store(true, std::sync::atomic::Ordering::SeqCst);
            Ok(())
        };
        let e = launch_held(&spec, Some(&register)).unwrap_err().to_string();
        assert!(called.load(std::sync::atomic::Ordering::SeqCst));
        assert!(e.contains("running") && e.contains("no-such-vmm"), "{e}");
        assert!(!spec.pidfile.exists());
    }

    #[test]
    fn scope_without_a_bus_is_a_clear_error_and_starts_nothing() {
        let t = TempDir::new();
        let mut spec = sleep_spec(t.path());
        let token = format!("{}.{}", 62, std::process::id());
        spec.extra_args = vec![token.clone()];
        spec.use_scope = true;
        spec.systemd = scope::Endpoints {
            system_bus: t.path().join("no-bus"),
        };
        let e = launch(&spec).unwrap_err().to_string();
        assert!(
            e.contains("registering the scope banger-vm-vm-test.scope"),
            "{e}"
        );
        assert!(e.contains("system bus is unreachable"), "{e}");
        assert!(e.contains("no VMM was started"), "{e}");
        assert_eq!(pids_running(&["/bin/sleep", &token]), Vec::<i32>::new());
        assert!(!spec.pidfile.exists());
    }

    #[test]
    fn launch_in_a_real_scope_as_another_user() {
        if !systemd_running() || !rustix::process::geteuid().is_root() {
            eprintln!(
                "SKIP launch_in_a_real_scope_as_another_user: needs root and systemd as init"
            );
            return;
        }
        let t = TempDir::new();
        let mut spec = sleep_spec(t.path());
        spec.vm_id = format!("scopetest{}", std::process::id());
        spec.use_scope = true;
        spec.run_as = Some(RunAs {
            uid: 65534,
            gid: 65534,
            groups: vec![65534, 4242],
        });
        let id = launch(&spec).expect("launch in a scope");
        assert_runs_as_nobody_with_4242(id.pid);
        let unit = scope_unit(&spec.vm_id);
        assert!(
            scope::pid_in_scope(Path::new("/proc"), id.pid as u32, SLICE, &unit).expect("cgroup"),
            "pid {} not in {unit}",
            id.pid
        );
        // A second VMM for the same VM is refused by systemd (the unit exists), and killed.
        let e = launch(&spec).unwrap_err().to_string();
        assert!(e.contains("UnitExists"), "{e}");
        signal(&id, Signal::Kill, Path::new("/proc")).expect("kill");
    }

    #[test]
    fn launch_detached_signal_and_reap() {
        let t = TempDir::new();
        let spec = sleep_spec(t.path());
        // The child's stderr lands in console.log: prove it with a failing run first (sleep
        // rejects Firecracker's flags and exits before any API socket appears), which also
        // exercises the early-exit error and its console excerpt.
        let bad = LaunchSpec {
            kind: VmmKind::Firecracker,
            ..spec.clone()
        };
        let e = launch(&bad).unwrap_err();
        assert!(e.to_string().contains("exited during start"), "{e}");
        assert!(
            e.to_string().contains("api-sock"),
            "console excerpt in the error: {e}"
        );
        let log = std::fs::read_to_string(&spec.console_log).expect("console.log");
        assert!(log.contains("api-sock"), "console.log: {log:?}");
        assert!(!spec.pidfile.exists(), "no pidfile for a failed start");

        let id = launch(&spec).expect("launch sleep");
        let proc_root = Path::new("/proc");
        assert_eq!(id.comm, "sleep");
        assert_eq!(
            identity::read_identity(proc_root, id.pid).expect("reread"),
            id
        );
        let stat =
            parse_stat(&std::fs::read_to_string(format!("/proc/{}/stat", id.pid)).expect("stat"))
                .expect("parse");
        assert_eq!(stat.session, id.pid, "new session");
        let pidfile = std::fs::read_to_string(&spec.pidfile).expect("pidfile");
        assert_eq!(pidfile.trim(), id.pid.to_string());
        // stdin is /dev/null.
        let stdin = std::fs::read_link(format!("/proc/{}/fd/0", id.pid)).expect("fd 0");
        assert_eq!(stdin, Path::new("/dev/null"));

        // A live VMM blocks cleanup.
        identity::write_handles(&t.path().join(HANDLES), &handles_for(&id, t.path()), None)
            .expect("handles");
        assert!(cleanup(t.path(), proc_root).is_err());

        // Reused-pid simulation: same pid, other start time → refused, process untouched.
        let tampered = Identity {
            start_time: id.start_time + 1,
            ..id.clone()
        };
        let e = signal(&tampered, Signal::Term, proc_root).unwrap_err();
        assert!(e.to_string().contains("reused"), "{e}");
        let other_comm = Identity {
            comm: "firecracker".into(),
            ..id.clone()
        };
        assert!(signal(&other_comm, Signal::Term, proc_root).is_err());
        assert_eq!(classify(&id, proc_root), Liveness::Alive);

        signal(&id, Signal::Term, proc_root).expect("TERM");
        // Reaped by the reaper thread: the pid disappears entirely (no zombie left).
        let stat_path = format!("/proc/{}/stat", id.pid);
        wait_until("the VMM to be reaped", || {
            match std::fs::read_to_string(&stat_path) {
                Err(_) => true,
                // Same pid, different process: ours is gone.
                Ok(s) => parse_stat(&s)
                    .map(|s| s.start_time != id.start_time)
                    .unwrap_or(true),
            }
        });
        assert!(matches!(classify(&id, proc_root), Liveness::Gone(_)));
        assert!(
            signal(&id, Signal::Term, proc_root).is_err(),
            "never signals a gone VMM"
        );

        // Now cleanup removes the pidfile and leftover sockets, keeps console.log and handles.
        let sock = std::os::unix::net::UnixListener::bind(t.path().join(API_SOCKET)).expect("bind");
        drop(sock);
        let port_sock =
            std::os::unix::net::UnixListener::bind(t.path().join("vsock.sock_52")).expect("bind");
        drop(port_sock);
        let mut removed = cleanup(t.path(), proc_root).expect("cleanup");
        removed.sort();
        let mut want = vec![
            t.path().join(API_SOCKET),
            t.path().join(PIDFILE),
            t.path().join("vsock.sock_52"),
        ];
        want.sort();
        assert_eq!(removed, want);
        assert!(t.path().join(CONSOLE_LOG).exists());
        assert!(t.path().join(HANDLES).exists());
        assert_eq!(
            cleanup(t.path(), proc_root).expect("again"),
            Vec::<PathBuf>::new()
        );
    }

    fn handles_for(id: &Identity, dir: &Path) -> identity::Handles {
        let f = VmFiles::in_dir(dir);
        identity::Handles {
            version: identity::HANDLES_VERSION,
            vm_id: "vm-test".into(),
            identity: id.clone(),
            api_socket: f.api_socket,
            vsock_uds: f.vsock_uds,
            console_log: f.console_log,
            pidfile: f.pidfile,
            scope: None,
            boot_id: None,
            launched_at: 0,
        }
    }

    #[test]
    fn launch_refuses_a_live_api_socket_and_clears_a_stale_one() {
        let t = TempDir::new();
        let files = VmFiles::in_dir(t.path());
        let mut spec = sleep_spec(t.path());
        spec.kind = VmmKind::Firecracker;
        let listener = std::os::unix::net::UnixListener::bind(&files.api_socket).expect("bind");
        let e = launch(&spec).unwrap_err();
        assert!(e.to_string().contains("still listening"), "{e}");
        // Shut down, not only closed: a child another test forked in parallel (held before its
        // exec) may hold a copy of this descriptor, which would keep the socket listening.
        rustix::net::shutdown(&listener, rustix::net::Shutdown::ReadWrite).expect("shutdown");
        drop(listener);
        // Stale socket: cleared, then sleep rejects the firecracker flags and exits.
        let e = launch(&spec).unwrap_err();
        assert!(e.to_string().contains("exited during start"), "{e}");
        assert!(!files.api_socket.exists());
    }

    #[test]
    fn console_log_is_never_followed_or_hijacked() {
        let t = TempDir::new();
        let target = t.path().join("target");
        std::fs::write(&target, "secret").expect("write");
        let spec = sleep_spec(t.path());
        std::os::unix::fs::symlink(&target, &spec.console_log).expect("symlink");
        assert!(launch(&spec).is_err(), "symlinked console.log");
        std::fs::remove_file(&spec.console_log).expect("rm");
        std::fs::hard_link(&target, &spec.console_log).expect("hard link");
        let e = launch(&spec).unwrap_err();
        assert!(e.to_string().contains("hard links"), "{e}");
        assert_eq!(std::fs::read_to_string(&target).expect("read"), "secret");
    }

    #[test]
    fn start_timeout_kills_a_launcher_that_never_execs() {
        // A `/proc` that never shows the VMM's comm stands in for a systemd-run that forked
        // instead of exec'ing in place: bounded wait, clear error, the child is killed and reaped.
        let t = TempDir::new();
        let fake_proc = t.path().join("proc");
        std::fs::create_dir(&fake_proc).expect("mkdir");
        let mut spec = sleep_spec(t.path());
        spec.proc_root = fake_proc;
        spec.start_timeout = Duration::from_millis(300);
        let e = launch(&spec).unwrap_err();
        assert!(e.to_string().contains("not `sleep`"), "{e}");
        assert!(!spec.pidfile.exists(), "no pidfile for a failed start");
    }

    #[test]
    fn launch_as_another_user_drops_ids_and_hands_over_files() {
        if !rustix::process::geteuid().is_root() {
            eprintln!("SKIP launch_as_another_user: needs root to change uid");
            return;
        }
        let t = TempDir::new();
        let mut spec = sleep_spec(t.path());
        spec.run_as = Some(RunAs {
            uid: 65534,
            gid: 65534,
            groups: vec![65534, 4242],
        });
        let id = launch(&spec).expect("launch as nobody");
        assert_runs_as_nobody_with_4242(id.pid);
        use std::os::unix::fs::MetadataExt;
        for f in [&spec.console_log, &spec.pidfile] {
            let m = std::fs::metadata(f).expect("meta");
            assert_eq!(
                (m.uid(), m.gid(), m.mode() & 0o777),
                (65534, 65534, 0o600),
                "{}",
                f.display()
            );
        }
        let expect = identity::VmmExpect {
            comm: "sleep",
            vm_id: "vm-test",
            uid: Some(65534),
        };
        // Plain kind has no `--id`: not a banger VMM by the helper's standard.
        assert!(!identity::is_banger_vmm(&id, &expect, Path::new("/proc")));
        signal(&id, Signal::Kill, Path::new("/proc")).expect("kill");
    }
}
