//! The real binary under each role name, against a temp layout: dispatch, identity, the daemon's
//! and the helper's RPC surface, peer checks, bad input, migrations check, readiness, SIGTERM.

mod common;

use banger::rpc::client::{self, CallError};
use banger::rpc::ErrorCode;
use common::*;
use serde_json::json;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::time::Duration;

#[test]
fn unknown_role_exits_2_listing_roles() {
    let bed = Bed::new("role");
    let odd = bed.bin.join("frobnicate");
    std::os::unix::fs::symlink(BIN, &odd).unwrap();
    let o = std::process::Command::new(&odd).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    let e = stderr(&o);
    for r in ["banger", "bangerd", "bangerd-root", "banger-vsock-agent"] {
        assert!(e.contains(r), "roles not listed: {e}");
    }
    let o = bed.run("banger", &["--role", "nope"]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn version_forms() {
    let bed = Bed::new("version");
    let o = bed.run("banger", &["version"]);
    assert!(o.status.success());
    let text = stdout(&o);
    assert_eq!(text.lines().count(), 3, "{text}");
    let info = banger::buildinfo::BuildInfo::parse(&text).unwrap();
    assert_eq!(info, banger::buildinfo::BuildInfo::current());
    for (role, args) in [
        ("banger", vec!["--version"]),
        ("bangerd", vec!["--version"]),
    ] {
        let o = bed.run(role, &args);
        assert!(o.status.success());
        let line = stdout(&o);
        assert_eq!(line.lines().count(), 1);
        assert!(
            line.starts_with(&format!("banger v{} (commit ", info.version)),
            "{line}"
        );
    }
    // The hidden --role form runs a role without a link.
    let o = std::process::Command::new(BIN)
        .args(["--role", "bangerd", "--version"])
        .output()
        .unwrap();
    assert!(stdout(&o).starts_with("banger v"), "{}", stdout(&o));
}

#[test]
fn agent_role_answers_version_and_rejects_bad_flags() {
    let bed = Bed::new("agent");
    let o = bed.run("banger-vsock-agent", &["--version"]);
    assert!(o.status.success());
    assert!(stdout(&o).starts_with("banger v"), "{}", stdout(&o));
    let o = bed.run("banger-vsock-agent", &["--port", "not-a-port"]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn usage_error_exits_2() {
    let bed = Bed::new("usage");
    let o = bed.run("banger", &["no-such-command"]);
    assert_eq!(o.status.code(), Some(2));
    let o = bed.run("banger", &["--help"]);
    assert_eq!(o.status.code(), Some(0));
    assert!(stdout(&o).contains("system"), "{}", stdout(&o));
}

#[test]
fn daemon_ping_status_operations_and_sigterm() {
    let bed = Bed::new("daemon");
    let l = bed.layout();
    let (mut d, msg) = bed.spawn_notified("bangerd");
    assert_eq!(msg, "READY=1");
    // READY=1 is only sent after bind, so the socket answers right away.
    let v = client::call(&l.daemon_socket(), "ping", json!({})).unwrap();
    assert_eq!(v["pong"], true);
    let mode = std::fs::metadata(l.daemon_socket())
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);

    let st = client::call(&l.daemon_socket(), "daemon.status", json!({})).unwrap();
    assert_eq!(st["version"], banger::buildinfo::VERSION);
    assert_eq!(st["pid"], d.pid());
    assert_eq!(st["socket"], l.daemon_socket().to_str().unwrap());

    let o = bed.run("banger", &["daemon", "status", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let j: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(j["pid"], d.pid());
    let o = bed.run("banger", &["daemon", "status"]);
    assert!(stdout(&o).contains(&format!("pid: {}", d.pid())));
    let o = bed.run("banger", &["daemon", "socket"]);
    assert_eq!(stdout(&o).trim(), l.daemon_socket().to_str().unwrap());

    let ops = client::call(&l.daemon_socket(), "daemon.operations.list", json!({})).unwrap();
    assert!(ops["operations"].is_array(), "{ops}");

    match client::call(&l.daemon_socket(), "no.such.method", json!({})) {
        Err(CallError::Rpc(e)) => {
            assert_eq!(e.code, ErrorCode::UnknownMethod);
            assert!(e.op_id.starts_with("op-"));
        }
        other => panic!("unexpected {other:?}"),
    }
    // One JSON log line per RPC with op_id and duration.
    let log = d.log_text();
    let rpc_lines: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|v: &serde_json::Value| v["msg"] == "rpc")
        .collect();
    assert!(rpc_lines.len() >= 5, "{log}");
    assert!(rpc_lines
        .iter()
        .all(|v| v["op_id"].is_string() && v["duration_ms"].is_number()));

    let st = d.sigterm_and_wait();
    assert_eq!(st.code(), Some(0), "log: {}", d.log_text());
    // Gone: the CLI says so clearly and exits 1.
    let o = bed.run("banger", &["daemon", "status"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).starts_with("banger: asking the daemon for its status: "),
        "{}",
        stderr(&o)
    );
    assert!(stderr(&o).contains("system"), "{}", stderr(&o));
}

#[test]
fn daemon_shutdown_method_stops_it() {
    let bed = Bed::new("shutdown");
    let l = bed.layout();
    let mut d = bed.spawn("bangerd", &l.daemon_socket());
    let v = client::call(&l.daemon_socket(), "daemon.shutdown", json!({})).unwrap();
    assert_eq!(v["stopping"], true);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(st) = d.child.try_wait().unwrap() {
            assert_eq!(st.code(), Some(0));
            break;
        }
        assert!(std::time::Instant::now() < deadline, "daemon did not stop");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn oversized_and_malformed_requests_get_bad_request_and_daemon_keeps_serving() {
    let bed = Bed::new("badreq");
    let l = bed.layout();
    let _d = bed.spawn("bangerd", &l.daemon_socket());
    let big = format!(
        "{{\"v\":1,\"method\":\"ping\",\"params\":{{\"pad\":\"{}\"}}}}\n",
        "x".repeat(2 << 20)
    );
    for body in [
        big.as_bytes(),
        b"this is not json\n".as_slice(),
        b"{\"v\":1}\n",
        b"{\"v\":7,\"method\":\"ping\"}\n",
        b"{\"v\":1,\"method\":\"ping\",\"params\":[1,2]}\n",
    ] {
        let r = client::exchange(&l.daemon_socket(), body, Duration::from_secs(10)).unwrap();
        assert!(!r.ok);
        let e = r.error.unwrap();
        assert!(
            matches!(e.code, ErrorCode::BadRequest | ErrorCode::BadVersion),
            "{e:?}"
        );
        assert!(e.op_id.starts_with("op-"), "{e:?}");
    }
    // A ping with unexpected params is refused, not silently ignored.
    let e = client::call(&l.daemon_socket(), "ping", json!({"x": 1})).unwrap_err();
    assert!(
        matches!(e, CallError::Rpc(ref r) if r.code == ErrorCode::BadRequest),
        "{e:?}"
    );
    assert!(client::call(&l.daemon_socket(), "ping", json!({})).is_ok());
}

/// Runs `banger daemon status` as `nobody` (uid 65534).
fn status_as_nobody(bed: &Bed) -> std::process::Output {
    use std::os::unix::process::CommandExt;
    let mut c = bed.cmd("banger");
    c.args(["daemon", "status"]).uid(65534).gid(65534);
    c.output().unwrap()
}

#[test]
fn other_uid_is_refused_owner_is_served() {
    if !is_root() {
        println!("SKIP: other_uid_is_refused_owner_is_served needs root to switch to nobody");
        return;
    }
    let bed = Bed::new("peer");
    let l = bed.layout();
    let _d = bed.spawn("bangerd", &l.daemon_socket());
    for dir in [bed.root.clone(), bed.root.join("run"), l.run_dir()] {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    // 0600 socket: the kernel refuses nobody before we do.
    let o = status_as_nobody(&bed);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("permission denied"), "{}", stderr(&o));
    // Even if the socket were opened up, SO_PEERCRED refuses nobody.
    std::fs::set_permissions(l.daemon_socket(), std::fs::Permissions::from_mode(0o666)).unwrap();
    let o = status_as_nobody(&bed);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("unauthorized"), "{}", stderr(&o));
    assert!(stderr(&o).contains("uid 65534"), "{}", stderr(&o));
    // The owner (root here) is still served.
    assert!(client::call(&l.daemon_socket(), "ping", json!({})).is_ok());
}

#[test]
fn helper_serves_priv_ping_and_refuses_unlisted_arguments() {
    let bed = Bed::new("helper");
    let l = bed.layout();
    let (_h, msg) = bed.spawn_notified("bangerd-root");
    assert_eq!(msg, "READY=1");
    let dir = std::fs::metadata(l.helper_run_dir()).unwrap();
    assert_eq!(dir.permissions().mode() & 0o777, 0o711);
    let sock = std::fs::metadata(l.helper_socket()).unwrap();
    assert_eq!(sock.permissions().mode() & 0o777, 0o600);
    assert_eq!(sock.uid(), rustix::process::getuid().as_raw());

    let v = client::call(&l.helper_socket(), "priv.ping", json!({})).unwrap();
    assert_eq!(v["pong"], true);
    for (method, params, code) in [
        (
            "priv.ping",
            json!({"cmd": "rm -rf /"}),
            ErrorCode::BadRequest,
        ),
        ("priv.exec", json!({"cmd": "id"}), ErrorCode::UnknownMethod),
        ("ping", json!({}), ErrorCode::UnknownMethod),
    ] {
        match client::call(&l.helper_socket(), method, params) {
            Err(CallError::Rpc(e)) => assert_eq!(e.code, code, "{method}: {e:?}"),
            other => panic!("{method}: unexpected {other:?}"),
        }
    }
    assert!(client::call(&l.helper_socket(), "priv.ping", json!({})).is_ok());
}

#[test]
fn check_migrations_exit_codes() {
    let bed = Bed::new("migr");
    let l = bed.layout();
    // Missing DB: all pending, and the check creates nothing.
    let o = bed.run("bangerd", &["--check-migrations"]);
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    assert_eq!(stdout(&o).lines().count(), 1);
    assert!(!l.state_db().exists());
    // A daemon run migrates it: compatible.
    {
        let mut d = bed.spawn("bangerd", &l.daemon_socket());
        d.sigterm_and_wait();
    }
    let o = bed.run("bangerd", &["--check-migrations"]);
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
    // Written by a newer binary: incompatible.
    {
        let c = rusqlite::Connection::open(l.state_db()).unwrap();
        c.execute(
            "INSERT INTO schema_migrations (version, name, applied_at) VALUES (999, 'future', 'x')",
            [],
        )
        .unwrap();
    }
    let before = std::fs::read(l.state_db()).unwrap();
    let o = bed.run("bangerd", &["--check-migrations"]);
    assert_eq!(o.status.code(), Some(2), "{}", stdout(&o));
    assert_eq!(
        std::fs::read(l.state_db()).unwrap(),
        before,
        "check must not write"
    );
    // And the daemon refuses to run on it rather than touching it.
    let o = bed.run("bangerd", &[]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(std::fs::read(l.state_db()).unwrap(), before);
}

/// `--system` is accepted for compatibility: both spellings give the same answer (exit code and
/// line) in each of the three states, and `--help` says why the flag exists.
#[test]
fn check_migrations_system_flag_is_the_same_check() {
    let bed = Bed::new("migrsys");
    let l = bed.layout();
    let both = |state: &str| {
        let plain = bed.run("bangerd", &["--check-migrations"]);
        let system = bed.run("bangerd", &["--check-migrations", "--system"]);
        assert_eq!(plain.status.code(), system.status.code(), "{state}");
        assert_eq!(stdout(&plain), stdout(&system), "{state}");
        assert_eq!(stdout(&plain).lines().count(), 1, "{state}");
        plain.status.code()
    };
    assert_eq!(both("missing database"), Some(1));
    {
        let mut d = bed.spawn("bangerd", &l.daemon_socket());
        d.sigterm_and_wait();
    }
    assert_eq!(both("migrated database"), Some(0));
    {
        let c = rusqlite::Connection::open(l.state_db()).unwrap();
        c.execute(
            "INSERT INTO schema_migrations (version, name, applied_at) VALUES (999, 'future', 'x')",
            [],
        )
        .unwrap();
    }
    assert_eq!(both("newer database"), Some(2));
    let help = bed.run("bangerd", &["--help"]);
    // argh wraps option help: compare with whitespace runs collapsed.
    let text = format!("{}{}", stdout(&help), String::from_utf8_lossy(&help.stderr))
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    assert!(
        text.contains("accepted for compatibility: banger has only the system layout"),
        "{text}"
    );
}

#[test]
fn second_daemon_on_same_socket_is_refused() {
    let bed = Bed::new("twice");
    let l = bed.layout();
    let _d = bed.spawn("bangerd", &l.daemon_socket());
    let o = bed.run("bangerd", &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("already answering"), "{}", stderr(&o));
    assert!(client::call(&l.daemon_socket(), "ping", json!({})).is_ok());
}

#[test]
fn root_only_commands_refuse_without_root_and_change_nothing() {
    if !is_root() {
        println!("SKIP: root_only_commands_refuse_without_root_and_change_nothing needs root to switch to nobody");
        return;
    }
    use std::os::unix::process::CommandExt;
    let bed = Bed::new("noroot");
    std::fs::set_permissions(&bed.root, std::fs::Permissions::from_mode(0o755)).unwrap();
    let snapshot = || {
        let mut names: Vec<String> = walk(&bed.root);
        names.sort();
        names
    };
    let before = snapshot();
    for (args, hint) in [
        (vec!["daemon", "stop"], "sudo banger daemon stop"),
        (
            vec!["system", "install", "--owner", "nobody"],
            "sudo banger system install --owner nobody",
        ),
        (vec!["system", "restart"], "sudo banger system restart"),
        (
            vec!["system", "uninstall", "--purge"],
            "sudo banger system uninstall --purge",
        ),
    ] {
        let mut c = bed.cmd("banger");
        c.args(&args).uid(65534).gid(65534);
        let o = c.output().unwrap();
        assert_eq!(o.status.code(), Some(1), "{args:?}");
        let e = stderr(&o);
        assert!(
            e.starts_with("banger: ") && e.contains("root is required"),
            "{args:?}: {e}"
        );
        assert!(e.contains(hint), "{args:?}: {e}");
    }
    assert_eq!(before, snapshot(), "a refused command changed the layout");
}

fn walk(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        out.push(e.path().display().to_string());
        if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            out.extend(walk(&e.path()));
        }
    }
    out
}
