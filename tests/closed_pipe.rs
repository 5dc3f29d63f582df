//! A reader that leaves early is not banger's failure: `banger vm --help | head -1`, `banger vm list
//! | head -0` and the like exit quietly (no Rust panic message) whether the output is help, the
//! version, a table from the daemon or JSON. Each case runs the real binary with its stdout (or
//! stderr) the write end of a pipe whose read end is already closed, so every write is EPIPE.

mod common;

use common::*;
use std::process::{Command, Output, Stdio};

/// `cmd` with stdout (or stderr, `on_stderr`) on a pipe nobody reads; the other stream captured.
fn closed_pipe(mut cmd: Command, on_stderr: bool) -> Output {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    if on_stderr {
        cmd.stderr(writer).stdout(Stdio::piped());
    } else {
        cmd.stdout(writer).stderr(Stdio::piped());
    }
    cmd.stdin(Stdio::null()).output().unwrap()
}

/// What the process said on the stream that was not closed.
fn other(o: &Output, on_stderr: bool) -> String {
    if on_stderr {
        stdout(o)
    } else {
        stderr(o)
    }
}

fn expect_quiet(what: &str, o: &Output, on_stderr: bool, codes: &[i32]) {
    let said = other(o, on_stderr);
    assert!(
        !said.contains("panicked") && !said.contains("RUST_BACKTRACE"),
        "{what}: panicked on a closed pipe: {said}"
    );
    assert!(
        o.status.code().is_some_and(|c| codes.contains(&c)),
        "{what}: exit {:?}, want one of {codes:?}; said: {said}",
        o.status
    );
}

#[test]
fn help_and_version_to_a_closed_pipe_exit_quietly() {
    let bed = Bed::new("closed-pipe-help");
    for args in [
        &["vm", "--help"][..],
        &["--help"],
        &["image", "--help"],
        &["vm", "run", "--help"],
        &["ssh-config", "--help"],
        &["--version"],
        &["completion", "bash"],
    ] {
        let mut c = bed.cmd("banger");
        c.args(args);
        let o = closed_pipe(c, false);
        expect_quiet(&format!("banger {}", args.join(" ")), &o, false, &[0]);
        assert_eq!(stderr(&o), "", "banger {}: stderr", args.join(" "));
    }
    // The other roles' help and version go through the same printing.
    for role in ["bangerd", "bangerd-root", "banger-vsock-agent"] {
        for arg in ["--help", "--version"] {
            let mut c = bed.cmd(role);
            c.arg(arg);
            let o = closed_pipe(c, false);
            expect_quiet(&format!("{role} {arg}"), &o, false, &[0]);
        }
    }
}

/// Output that comes from the daemon (a table, JSON, a version block): a closed stdout ends the CLI
/// quietly with 141 (what a shell reports for a tool killed by SIGPIPE); a closed stderr on an error
/// path too. With the reader there, the same commands print and exit 0, so the pipes are the only
/// difference.
#[test]
fn daemon_output_to_a_closed_pipe_exits_quietly() {
    let bed = Bed::new("closed-pipe-list");
    let l = bed.layout();
    let _daemon = bed.spawn("bangerd", &l.daemon_socket());
    for args in [
        &["vm", "list"][..],
        &["vm", "list", "--json"],
        &["image", "list"],
        &["kernel", "list", "--json"],
        &["daemon", "status"],
    ] {
        let what = format!("banger {}", args.join(" "));
        let o = bed.run("banger", args);
        assert!(o.status.success(), "{what}: {}", stderr(&o));
        assert!(!stdout(&o).is_empty(), "{what} prints something");
        let mut c = bed.cmd("banger");
        c.args(args);
        let o = closed_pipe(c, false);
        expect_quiet(&what, &o, false, &[banger::applets::CLOSED_PIPE_EXIT]);
        assert_eq!(stderr(&o), "", "{what}: stderr");
    }
    // An error message to a closed stderr (`banger vm show nosuch 2>&1 | head -0`).
    let mut c = bed.cmd("banger");
    c.args(["vm", "show", "nosuch"]);
    let o = closed_pipe(c, true);
    expect_quiet(
        "banger vm show nosuch (closed stderr)",
        &o,
        true,
        &[banger::applets::CLOSED_PIPE_EXIT],
    );
}
