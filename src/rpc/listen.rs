//! A server's listening socket: taken from systemd (socket activation) or bound here.
//!
//! Under systemd, `bangerd.socket` and `bangerd-root.socket` own the listening sockets, so a socket
//! outlives every restart of its daemon: a client that connects while the daemon restarts waits
//! in the socket's backlog instead of being refused. The daemon receives the socket as fd 3 with
//! `LISTEN_PID`/`LISTEN_FDS`/`LISTEN_FDNAMES` (`sd_listen_fds(3)`); started by hand or in tests
//! (no such variables) it binds the path itself, as before.
//!
//! Owns: reading (and unsetting) those variables, checking that what systemd passed is a
//! listening `AF_UNIX` stream socket bound at the expected path, marking it close-on-exec (the
//! helper starts VMMs, which must never inherit it), and holding the socket file to the same
//! owner and mode a self-bound socket gets. It must never accept a socket it did not check, and
//! never bind a path while systemd passed a socket (a bad one is an error, not a reason to bind).

use crate::error::{Context, Error, Result};
use std::os::fd::{AsFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::Path;

/// The first fd systemd passes (`SD_LISTEN_FDS_START`).
pub const LISTEN_FDS_START: RawFd = 3;

/// More passed fds than this is not a socket unit of ours: refuse rather than walk a huge range.
const MAX_FDS: usize = 64;

const HINT_REINSTALL: &str =
    "run sudo banger system install to put back banger's socket units, then sudo banger system restart";

/// The socket-activation variables as the process received them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Activation {
    /// `LISTEN_PID`.
    pub pid: Option<String>,
    /// `LISTEN_FDS`.
    pub fds: Option<String>,
    /// `LISTEN_FDNAMES`.
    pub names: Option<String>,
}

/// Where the listening socket came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Passed by systemd (socket activation).
    Systemd,
    /// Bound by this process.
    Bound,
}

impl Origin {
    /// For log lines.
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Systemd => "systemd",
            Origin::Bound => "bound",
        }
    }
}

/// What the listening socket must be: its path, the name systemd gives it
/// (`FileDescriptorName=`), its file mode and, when set, its owner (uid, gid).
#[derive(Debug, Clone)]
pub struct Want<'a> {
    /// The socket's path.
    pub path: &'a Path,
    /// The fd name in `LISTEN_FDNAMES`.
    pub name: &'a str,
    /// Mode of the socket file.
    pub mode: u32,
    /// Owner of the socket file (None: whoever this process is).
    pub owner: Option<(u32, u32)>,
}

impl Activation {
    /// Reads the variables and removes them from the environment, so no child process (`ip`,
    /// `nft`, `systemd-run`, a VMM) ever sees them. Call it first thing in a role, before any
    /// thread starts.
    pub fn take_from_env() -> Activation {
        let get = |k: &str| std::env::var_os(k).map(|v| v.to_string_lossy().into_owned());
        let a = Activation {
            pid: get("LISTEN_PID"),
            fds: get("LISTEN_FDS"),
            names: get("LISTEN_FDNAMES"),
        };
        for k in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
            std::env::remove_var(k);
        }
        a
    }

    /// Which passed fd is the socket named `name`, for process `my_pid`, as `sd_listen_fds(3)`
    /// reads the variables: `Ok(None)` when nothing was passed to this process (no variables, or
    /// `LISTEN_PID` names another process, or `LISTEN_FDS=0`). `Ok(Some((fd, all)))` with every
    /// passed fd in `all` (so the caller can close the others). Anything malformed, more than
    /// one fd without names, or no fd of that name, is an error.
    pub fn select(&self, my_pid: u32, name: &str) -> Result<Option<(RawFd, Vec<RawFd>)>> {
        let what = || format!("taking the {name} socket from systemd");
        let (Some(pid), Some(fds)) = (&self.pid, &self.fds) else {
            return Ok(None);
        };
        let pid: u32 = pid.trim().parse().map_err(|_| {
            Error::new(what(), format!("LISTEN_PID={pid:?} is not a process id"))
                .hint(HINT_REINSTALL)
        })?;
        if pid != my_pid {
            return Ok(None);
        }
        let n: usize = fds.trim().parse().map_err(|_| {
            Error::new(what(), format!("LISTEN_FDS={fds:?} is not a count")).hint(HINT_REINSTALL)
        })?;
        if n == 0 {
            return Ok(None);
        }
        if n > MAX_FDS {
            return Err(Error::new(
                what(),
                format!("LISTEN_FDS={n}: more sockets than any banger socket unit passes"),
            )
            .hint(HINT_REINSTALL));
        }
        let all: Vec<RawFd> = (0..n as RawFd).map(|i| LISTEN_FDS_START + i).collect();
        let index = match &self.names {
            None if n == 1 => 0,
            None => {
                return Err(Error::new(
                    what(),
                    format!("systemd passed {n} sockets without names (LISTEN_FDNAMES)"),
                )
                .hint(HINT_REINSTALL))
            }
            Some(names) => {
                let names: Vec<&str> = names.split(':').collect();
                if names.len() != n {
                    return Err(Error::new(
                        what(),
                        format!(
                            "LISTEN_FDNAMES names {} sockets but LISTEN_FDS={n}",
                            names.len()
                        ),
                    )
                    .hint(HINT_REINSTALL));
                }
                let found: Vec<usize> = names
                    .iter()
                    .enumerate()
                    .filter(|(_, x)| **x == name)
                    .map(|(i, _)| i)
                    .collect();
                match found[..] {
                    [i] => i,
                    [] => {
                        return Err(Error::new(
                            what(),
                            format!(
                                "systemd passed sockets named {:?}, none named {name:?}",
                                names.join(":")
                            ),
                        )
                        .hint(format!(
                            "the socket unit needs FileDescriptorName={name}; {HINT_REINSTALL}"
                        )))
                    }
                    _ => {
                        return Err(Error::new(
                            what(),
                            format!("systemd passed {} sockets named {name:?}", found.len()),
                        )
                        .hint(HINT_REINSTALL))
                    }
                }
            }
        };
        Ok(Some((all[index], all)))
    }
}

/// Checks that `fd` is a listening `AF_UNIX` stream socket bound at `path`, marks it
/// close-on-exec, and returns it as a listener. `fd` is closed on any refusal.
pub fn adopt(fd: OwnedFd, path: &Path) -> Result<UnixListener> {
    use rustix::net::{sockopt, AddressFamily, SocketType};
    let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
    let what = || {
        format!(
            "taking the socket for {} from systemd (fd {raw})",
            path.display()
        )
    };
    let refuse = |why: String| Err(Error::new(what(), why).hint(HINT_REINSTALL));
    let st = rustix::fs::fstat(&fd).ctx(what)?;
    let kind = rustix::fs::FileType::from_raw_mode(st.st_mode);
    if kind != rustix::fs::FileType::Socket {
        return refuse(format!("it is a {kind:?}, not a socket"));
    }
    let domain = sockopt::get_socket_domain(&fd).ctx(what)?;
    if domain != AddressFamily::UNIX {
        return refuse(format!(
            "it is a socket of address family {}, not AF_UNIX",
            domain.as_raw()
        ));
    }
    let ty = sockopt::get_socket_type(&fd).ctx(what)?;
    if ty != SocketType::STREAM {
        return refuse(format!(
            "it is a socket of type {}, not a stream socket",
            ty.as_raw()
        ));
    }
    if !sockopt::get_socket_acceptconn(&fd).ctx(what)? {
        return refuse("it is not listening".to_string());
    }
    let listener = UnixListener::from(fd);
    let addr = listener.local_addr().ctx(what)?;
    match addr.as_pathname() {
        Some(p) if p == path => {}
        Some(p) => return refuse(format!("it is bound at {}, not there", p.display())),
        None => return refuse("it is not bound to a path".to_string()),
    }
    rustix::io::fcntl_setfd(listener.as_fd(), rustix::io::FdFlags::CLOEXEC)
        .ctx(|| format!("marking the socket for {} close-on-exec", path.display()))?;
    Ok(listener)
}

/// Holds the socket file at `path` to `mode` and `owner` (what [`super::server::bind`] gives a
/// socket it binds): changes what differs and says whether it had to. The socket unit sets both
/// (`SocketUser=`/`SocketGroup=`/`SocketMode=`); this is the check that they did.
fn hold_mode(path: &Path, mode: u32, owner: Option<(u32, u32)>) -> Result<bool> {
    let meta = std::fs::symlink_metadata(path).ctx(|| format!("reading {}", path.display()))?;
    if !std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()) {
        return Err(Error::new(
            format!("checking {}", path.display()),
            "it is not a socket file",
        )
        .hint(HINT_REINSTALL));
    }
    let mut changed = false;
    if let Some((uid, gid)) = owner {
        if meta.uid() != uid || meta.gid() != gid {
            std::os::unix::fs::lchown(path, Some(uid), Some(gid))
                .ctx(|| format!("chowning {} to {uid}:{gid}", path.display()))?;
            changed = true;
        }
    }
    if meta.mode() & 0o7777 != mode || changed {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .ctx(|| format!("setting mode {mode:o} on {}", path.display()))?;
        changed = true;
    }
    Ok(changed)
}

/// The socket systemd passed to this process for `want`, checked by [`adopt`] with its file held
/// to `want`'s mode and owner; `Ok(None)` when systemd passed none (bind it then). Passed fds
/// that are not ours are closed. It has no other effect, so a role calls it before it creates
/// anything: a socket that is not ours stops the role with nothing changed.
pub fn from_systemd(activation: &Activation, want: &Want) -> Result<Option<UnixListener>> {
    let Some((fd, all)) = activation.select(std::process::id(), want.name)? else {
        return Ok(None);
    };
    for other in all.into_iter().filter(|o| *o != fd) {
        // SAFETY: systemd passed these fds to this process (LISTEN_PID is ours) and nothing
        // else in it has taken them: closing them once, here, is sound.
        drop(unsafe { OwnedFd::from_raw_fd(other) });
    }
    // Refuse a number that is no open fd before taking ownership of it.
    rustix::io::fcntl_getfd(
        // SAFETY: only borrowed for this one call; an fd that is not open makes it fail.
        unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) },
    )
    .map_err(|e| {
        Error::new(
            format!("taking the {} socket from systemd", want.name),
            format!("fd {fd} (LISTEN_FDS) is not open: {e}"),
        )
        .hint(HINT_REINSTALL)
    })?;
    // SAFETY: fd is open (checked just above), was passed to this process by systemd for this
    // socket, and is owned by nothing else in this process.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let listener = adopt(owned, want.path)?;
    if hold_mode(want.path, want.mode, want.owner)? {
        crate::logging::log(
            "warn",
            "rpc",
            "systemd's socket had another owner or mode: set it back",
            serde_json::json!({"socket": want.path, "mode": format!("{:o}", want.mode)}),
        );
    }
    Ok(Some(listener))
}

/// The listening socket for `want`: `passed` (from [`from_systemd`]) when there is one, else
/// bound here by [`super::server::bind`].
pub fn or_bind(passed: Option<UnixListener>, want: &Want) -> Result<(UnixListener, Origin)> {
    match passed {
        Some(l) => Ok((l, Origin::Systemd)),
        None => Ok((
            super::server::bind(want.path, want.mode, want.owner)?,
            Origin::Bound,
        )),
    }
}

/// [`from_systemd`], else bind: both steps at once, for a role that has nothing to do between.
pub fn listen(activation: &Activation, want: &Want) -> Result<(UnixListener, Origin)> {
    let passed = from_systemd(activation, want)?;
    or_bind(passed, want)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::system::testutil::TempDir;

    fn act(pid: Option<&str>, fds: Option<&str>, names: Option<&str>) -> Activation {
        Activation {
            pid: pid.map(str::to_string),
            fds: fds.map(str::to_string),
            names: names.map(str::to_string),
        }
    }

    #[test]
    fn select_table() {
        type Case<'a> = (
            Option<&'a str>,
            Option<&'a str>,
            Option<&'a str>,
            Option<RawFd>,
        );
        let ok: &[Case] = &[
            // Nothing passed: bind.
            (None, None, None, None),
            (Some("42"), None, None, None),
            (None, Some("1"), None, None),
            // Passed to another process (inherited from a parent): not ours, bind.
            (Some("41"), Some("1"), Some("bangerd"), None),
            (Some("42"), Some("0"), None, None),
            // Ours.
            (Some("42"), Some("1"), None, Some(3)),
            (Some("42"), Some("1"), Some("bangerd"), Some(3)),
            (Some(" 42 "), Some("1\n"), Some("bangerd"), Some(3)),
            (Some("42"), Some("3"), Some("x:bangerd:y"), Some(4)),
        ];
        for (pid, fds, names, want) in ok {
            let got = act(*pid, *fds, *names).select(42, "bangerd").unwrap();
            assert_eq!(got.map(|g| g.0), *want, "{pid:?} {fds:?} {names:?}");
        }
        let got = act(Some("42"), Some("3"), Some("x:bangerd:y"))
            .select(42, "bangerd")
            .unwrap()
            .unwrap();
        assert_eq!(got.1, [3, 4, 5]);
        type Bad<'a> = (Option<&'a str>, Option<&'a str>, Option<&'a str>, &'a str);
        let bad: &[Bad] = &[
            (Some("me"), Some("1"), None, "is not a process id"),
            (Some("42"), Some("one"), None, "is not a count"),
            (Some("42"), Some("-1"), None, "is not a count"),
            (Some("42"), Some("1000"), None, "more sockets than"),
            (Some("42"), Some("2"), None, "without names"),
            (Some("42"), Some("2"), Some("bangerd"), "names 1 sockets"),
            (
                Some("42"),
                Some("1"),
                Some("bangerd-root"),
                "none named \"bangerd\"",
            ),
            (Some("42"), Some("1"), Some("bangerd.socket"), "none named"),
            (
                Some("42"),
                Some("2"),
                Some("bangerd:bangerd"),
                "2 sockets named",
            ),
        ];
        for (pid, fds, names, want) in bad {
            let e = act(*pid, *fds, *names)
                .select(42, "bangerd")
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{pid:?} {fds:?} {names:?}: {e}");
            assert!(e.contains("taking the bangerd socket from systemd"), "{e}");
        }
    }

    fn fd_of(x: impl Into<OwnedFd>) -> OwnedFd {
        x.into()
    }

    #[test]
    fn adopt_takes_a_listening_unix_stream_socket_at_the_path() {
        let t = TempDir::new();
        let path = t.path().join("s.sock");
        let l = UnixListener::bind(&path).unwrap();
        // std binds close-on-exec; clear it so adopt is seen setting it.
        rustix::io::fcntl_setfd(&l, rustix::io::FdFlags::empty()).unwrap();
        let got = adopt(fd_of(l), &path).unwrap();
        let flags = rustix::io::fcntl_getfd(&got).unwrap();
        assert!(flags.contains(rustix::io::FdFlags::CLOEXEC));
        // It is the same socket: a client connecting to the path is accepted on it.
        let _c = std::os::unix::net::UnixStream::connect(&path).unwrap();
        got.accept().unwrap();
    }

    #[test]
    fn adopt_refuses_what_is_not_our_listening_socket() {
        let t = TempDir::new();
        let path = t.path().join("s.sock");
        let other = t.path().join("other.sock");
        let cases: Vec<(OwnedFd, &str)> = vec![
            (fd_of(UnixListener::bind(&other).unwrap()), "is bound at"),
            (
                fd_of(std::os::unix::net::UnixDatagram::bind(t.path().join("d.sock")).unwrap()),
                "not a stream socket",
            ),
            (
                fd_of(std::net::TcpListener::bind("127.0.0.1:0").unwrap()),
                "not AF_UNIX",
            ),
            (
                fd_of(std::fs::File::open("/dev/null").unwrap()),
                "not a socket",
            ),
            (
                fd_of(std::fs::File::open(t.path()).unwrap()),
                "not a socket",
            ),
            (
                fd_of(std::os::unix::net::UnixStream::pair().unwrap().0),
                "not listening",
            ),
            (
                {
                    use std::os::linux::net::SocketAddrExt;
                    let name = format!("banger-listen-test-{}", std::process::id());
                    let a = std::os::unix::net::SocketAddr::from_abstract_name(name).unwrap();
                    fd_of(UnixListener::bind_addr(&a).unwrap())
                },
                "not bound to a path",
            ),
        ];
        for (fd, want) in cases {
            let e = adopt(fd, &path).unwrap_err().to_string();
            assert!(e.contains(want), "want {want:?}: {e}");
            assert!(e.contains(&path.display().to_string()), "{e}");
        }
        assert!(!path.exists(), "a refusal must not create the socket");
    }

    #[test]
    fn hold_mode_sets_back_a_wrong_mode_and_refuses_a_non_socket() {
        let t = TempDir::new();
        let path = t.path().join("s.sock");
        let _l = UnixListener::bind(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(!hold_mode(&path, 0o600, None).unwrap());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
        assert!(hold_mode(&path, 0o600, None).unwrap());
        let m = std::fs::metadata(&path).unwrap();
        assert_eq!(m.mode() & 0o7777, 0o600);
        let me = (
            rustix::process::geteuid().as_raw(),
            rustix::process::getegid().as_raw(),
        );
        assert!(!hold_mode(&path, 0o600, Some(me)).unwrap());
        let file = t.path().join("f");
        std::fs::write(&file, b"").unwrap();
        let e = hold_mode(&file, 0o600, None).unwrap_err().to_string();
        assert!(e.contains("not a socket file"), "{e}");
        let link = t.path().join("l");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        let e = hold_mode(&link, 0o600, None).unwrap_err().to_string();
        assert!(e.contains("not a socket file"), "{e}");
    }

    #[test]
    fn listen_binds_when_nothing_was_passed() {
        let t = TempDir::new();
        let path = t.path().join("s.sock");
        let want = Want {
            path: &path,
            name: "bangerd",
            mode: 0o600,
            owner: None,
        };
        // LISTEN_PID of another process: not ours, so bind (as sd_listen_fds does).
        let a = act(Some("1"), Some("1"), Some("bangerd"));
        let (_l, origin) = listen(&a, &want).unwrap();
        assert_eq!(origin, Origin::Bound);
        let m = std::fs::metadata(&path).unwrap();
        assert_eq!(m.mode() & 0o7777, 0o600);
    }
}
