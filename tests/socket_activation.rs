//! Socket activation of the real daemons, with the socket passed exactly as systemd passes it
//! (fd 3, `LISTEN_PID` = the daemon's pid, `LISTEN_FDS`, `LISTEN_FDNAMES`): it is served; a
//! client that connects while no daemon runs waits and is answered by the next daemon (the
//! zero-refusal restart); a socket that is not the daemon's is refused and nothing is bound.
//! The smoke scenario `restart_refuses_nobody` checks the same under real systemd.

mod common;

use banger::rpc::client;
use common::{stderr, Bed, Server};
use serde_json::json;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// `role` under `bed`, exec'd by a shell that sets `LISTEN_PID` to its own pid (which the role
/// keeps across exec), with `fd` as fd 3 and the other variables from `env`.
fn activated(bed: &Bed, role: &str, fd: RawFd, env: &[(&str, &str)]) -> Command {
    let mut c = Command::new("/bin/sh");
    c.args(["-c", "LISTEN_PID=$$ exec \"$0\""])
        .arg(bed.bin.join(role))
        .env("BANGER_ROOT", &bed.root)
        .env_remove("NOTIFY_SOCKET")
        .env_remove("LISTEN_PID");
    for (k, v) in env {
        c.env(k, v);
    }
    // SAFETY: dup2 is async-signal-safe; fd stays open in the parent for the child's lifetime.
    unsafe {
        c.pre_exec(move || {
            // dup2 onto itself keeps close-on-exec: clear it instead.
            let r = if fd == 3 {
                libc::fcntl(3, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, 3)
            };
            if r < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    c
}

fn spawn(bed: &Bed, role: &str, fd: RawFd, name: &str, socket: &Path, method: &str) -> Server {
    let mut cmd = activated(
        bed,
        role,
        fd,
        &[("LISTEN_FDS", "1"), ("LISTEN_FDNAMES", name)],
    );
    bed.start_logged(&mut cmd, role, socket, || {
        client::call_with_timeout(socket, method, json!({}), Duration::from_secs(2)).is_ok()
    })
}

fn listener_at(path: &Path, mode: u32) -> UnixListener {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let l = UnixListener::bind(path).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    l
}

/// The daemon serves the socket it is given (it binds nothing), and a client that connects and
/// sends its request while no daemon runs is answered by the next daemon on the same socket.
#[test]
fn daemon_serves_the_passed_socket_and_a_client_waits_across_a_restart() {
    let bed = Bed::new("sockact");
    let l = bed.layout();
    let sock = l.daemon_socket();
    let listener = listener_at(&sock, 0o600);
    let ino = std::fs::metadata(&sock).unwrap().ino();
    let fd = listener.as_raw_fd();

    let mut first = spawn(&bed, "bangerd", fd, "bangerd", &sock, "ping");
    assert!(
        first.log_text().contains(r#""listener":"systemd""#),
        "{}",
        first.log_text()
    );
    assert_eq!(
        std::fs::metadata(&sock).unwrap().ino(),
        ino,
        "the daemon replaced the socket it was given"
    );
    assert!(first.sigterm_and_wait().success());

    // No daemon now. systemd (here: this test) still holds the socket: the client connects and
    // sends its request; it is not refused.
    let mut waiting = UnixStream::connect(&sock).expect("connect with no daemon running");
    waiting
        .write_all(b"{\"v\":1,\"method\":\"ping\",\"params\":{},\"op_id\":\"op-waiting\"}\n")
        .unwrap();
    waiting
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();

    let _second = spawn(&bed, "bangerd", fd, "bangerd", &sock, "ping");
    let mut answer = String::new();
    waiting.read_to_string(&mut answer).unwrap();
    let v: serde_json::Value = serde_json::from_str(answer.trim()).unwrap();
    assert_eq!(v["ok"], true, "{answer}");
    assert_eq!(std::fs::metadata(&sock).unwrap().ino(), ino);
}

/// The helper takes its socket, holds the file to owner-only 0600 as if it had bound it, and
/// marks it close-on-exec, so no VMM it starts inherits the socket.
#[test]
fn helper_takes_its_socket_holds_its_mode_and_closes_it_on_exec() {
    let bed = Bed::new("sockact-helper");
    let l = bed.layout();
    let sock = l.helper_socket();
    // As a socket unit with a loosened SocketMode= would leave it.
    let listener = listener_at(&sock, 0o666);
    let h = spawn(
        &bed,
        "bangerd-root",
        listener.as_raw_fd(),
        "bangerd-root",
        &sock,
        "priv.ping",
    );
    let meta = std::fs::metadata(&sock).unwrap();
    assert_eq!(meta.mode() & 0o7777, 0o600);
    assert_eq!(meta.uid(), rustix::process::getuid().as_raw());
    let dir = std::fs::metadata(l.helper_run_dir()).unwrap();
    assert_eq!(dir.mode() & 0o777, 0o711);
    let fdinfo = std::fs::read_to_string(format!("/proc/{}/fdinfo/3", h.pid())).unwrap();
    let flags = fdinfo
        .lines()
        .find_map(|l| l.strip_prefix("flags:"))
        .map(|f| u32::from_str_radix(f.trim(), 8).unwrap())
        .unwrap();
    assert_ne!(flags & libc::O_CLOEXEC as u32, 0, "fd 3 flags {flags:o}");
    assert!(h.log_text().contains(r#""listener":"systemd""#));
}

/// What is not the daemon's socket is refused, with what it is, and the daemon binds nothing.
#[test]
fn a_socket_that_is_not_the_daemons_is_refused_and_nothing_is_bound() {
    let bed = Bed::new("sockact-bad");
    let l = bed.layout();
    let sock = l.daemon_socket();
    std::fs::create_dir_all(sock.parent().unwrap()).unwrap();
    let elsewhere = bed.root.join("elsewhere.sock");
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let other = UnixListener::bind(&elsewhere).unwrap();
    let ours = bed.root.join("ours.sock");
    let named = UnixListener::bind(&ours).unwrap();
    let cases: Vec<(OwnedFd, &str, &str)> = vec![
        (tcp.into(), "bangerd", "not AF_UNIX"),
        (other.into(), "bangerd", "is bound at"),
        (named.into(), "bangerd-root", "none named"),
    ];
    for (fd, name, want) in &cases {
        let o = activated(
            &bed,
            "bangerd",
            fd.as_raw_fd(),
            &[("LISTEN_FDS", "1"), ("LISTEN_FDNAMES", name)],
        )
        .output()
        .unwrap();
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{want}: {err}");
        assert!(err.contains(want), "{want}: {err}");
        assert!(err.contains("taking the"), "{err}");
        assert!(!sock.exists(), "{want}: the daemon bound its socket anyway");
        assert!(
            !l.state_dir().exists(),
            "{want}: the daemon created its state"
        );
    }
}

/// Variables meant for another process (LISTEN_PID is not ours) are not ours: bind, as
/// `sd_listen_fds(3)` says.
#[test]
fn variables_for_another_process_are_ignored_and_the_daemon_binds() {
    let bed = Bed::new("sockact-other");
    let l = bed.layout();
    let mut c = bed.cmd("bangerd");
    c.env("LISTEN_PID", "1")
        .env("LISTEN_FDS", "1")
        .env("LISTEN_FDNAMES", "bangerd");
    let log = bed.root.join("bangerd.log");
    let child = c
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let s = Server { child, log };
    let deadline = Instant::now() + Duration::from_secs(20);
    while client::call(&l.daemon_socket(), "ping", json!({})).is_err() {
        assert!(Instant::now() < deadline, "{}", s.log_text());
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        s.log_text().contains(r#""listener":"bound""#),
        "{}",
        s.log_text()
    );
}
