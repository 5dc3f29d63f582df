//! Role dispatch, busybox style: one binary, a role per basename of argv[0].
//!
//! `banger --role NAME ARGS…` (hidden) runs a role without a link, for tests.
//!
//! A reader that leaves early (`banger vm --help | head -1`, `banger vm list | head -0`) is not
//! banger's failure: help and version output ignore a closed pipe, and the CLI role turns the
//! panic of any other print on a closed stdout or stderr into a quiet exit ([`CLOSED_PIPE_EXIT`]).

use std::ffi::OsString;
use std::path::Path;

pub mod banger;
pub mod bangerd;
pub mod bangerd_root;
pub mod vsock_agent;

/// The roles this binary can play, by the name it is invoked as.
pub const ROLES: [&str; 4] = ["banger", "bangerd", "bangerd-root", "banger-vsock-agent"];

/// Runs the role named by argv[0] (or `--role`) and returns the process exit code.
pub fn dispatch(argv: Vec<OsString>) -> i32 {
    let mut args: Vec<String> = argv
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    if args.is_empty() {
        args.push("banger".into());
    }
    let mut name = Path::new(&args[0])
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if name == "banger" && args.get(1).map(String::as_str) == Some("--role") {
        let Some(role) = args.get(2).cloned() else {
            eprintln!(
                "banger: --role needs a role name (one of: {})",
                ROLES.join(", ")
            );
            return 2;
        };
        name = role.clone();
        args.drain(0..2);
        args[0] = role;
    }
    match name.as_str() {
        "banger" => {
            exit_quietly_on_closed_pipe();
            banger::main(args)
        }
        "bangerd" => bangerd::main(args),
        "bangerd-root" => bangerd_root::main(args),
        "banger-vsock-agent" => vsock_agent::main(args),
        other => {
            eprintln!(
                "banger: unknown role `{other}` (invoke this binary as one of: {})",
                ROLES.join(", ")
            );
            2
        }
    }
}

/// Parses `args` (argv[0] first) with argh; prints help or the usage error and yields the exit code.
pub(crate) fn parse_args<T: argh::FromArgs>(args: &[String]) -> Result<T, i32> {
    let cmd = Path::new(&args[0])
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| args[0].clone());
    let rest: Vec<&str> = args[1..].iter().map(String::as_str).collect();
    T::from_args(&[cmd.as_str()], &rest).map_err(|early| match early.status {
        Ok(()) => {
            print_out(&format!("{}\n", early.output));
            0
        }
        Err(()) => {
            eprintln!("{}", early.output);
            2
        }
    })
}

/// Serves `handler` on `listener`: SIGTERM/SIGINT stop it, systemd hears READY=1 once the socket is
/// bound, and one log line marks start and stop.
pub(crate) fn serve_role(
    listener: std::os::unix::net::UnixListener,
    cfg: crate::rpc::server::ServerConfig,
    handler: std::sync::Arc<dyn crate::rpc::server::Handler>,
    stop_tx: smol::channel::Sender<()>,
    stop_rx: smol::channel::Receiver<()>,
    fields: serde_json::Value,
) -> crate::error::Result<()> {
    use crate::error::Context;
    use smol::stream::StreamExt;
    let role = cfg.role;
    let mut signals =
        async_signal::Signals::new([async_signal::Signal::Term, async_signal::Signal::Int])
            .ctx(|| "installing SIGTERM/SIGINT handlers".into())?;
    smol::spawn(async move {
        if let Some(Ok(sig)) = signals.next().await {
            crate::logging::info(
                role,
                "signal received, stopping",
                serde_json::json!({"signal": format!("{sig:?}")}),
            );
        }
        let _ = stop_tx.send(()).await;
    })
    .detach();
    crate::logging::info(role, "serving", fields);
    if let Err(e) = crate::sdnotify::notify("READY=1") {
        crate::logging::error(
            role,
            "sd_notify failed",
            serde_json::json!({"error": e.to_string()}),
        );
    }
    crate::rpc::server::serve(listener, cfg, handler, stop_rx)?;
    let _ = crate::sdnotify::notify("STOPPING=1");
    crate::logging::info(role, "stopped", serde_json::json!({}));
    Ok(())
}

/// Prints the one-line version (`--version` of every role).
pub(crate) fn print_version() -> i32 {
    print_out(&format!(
        "{}\n",
        crate::buildinfo::BuildInfo::current().one_line()
    ));
    0
}

/// The exit status of the CLI when its stdout or stderr was closed under it: what a shell reports
/// for a tool killed by SIGPIPE (128 + 13), as `ls | head -0` gets, without banger's panic message.
pub const CLOSED_PIPE_EXIT: i32 = 141;

/// Writes `text` to stdout as help and version output does: a closed pipe (the reader took what it
/// wanted, `--help | head -1`) is not an error; any other failure is ignored too, as there is no
/// better place to report it than stdout itself (stderr is likely gone with it).
pub(crate) fn print_out(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
}

/// Whether a panic message is the standard library's print macros failing on a closed pipe
/// (`failed printing to stdout: Broken pipe (os error 32)`), and nothing else.
fn is_closed_pipe_panic(msg: Option<&str>) -> bool {
    msg.is_some_and(|m| {
        (m.starts_with("failed printing to stdout") || m.starts_with("failed printing to stderr"))
            && m.ends_with(&format!("(os error {})", libc::EPIPE))
    })
}

/// For the CLI: `println!` on a closed stdout panics (Rust ignores SIGPIPE, so the write returns
/// EPIPE). That panic becomes a quiet exit with [`CLOSED_PIPE_EXIT`]; every other panic keeps the
/// default report. SIGPIPE itself stays ignored: the RPC client relies on seeing EPIPE from a
/// daemon that closed early, which a default SIGPIPE would turn into a silent death.
fn exit_quietly_on_closed_pipe() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if is_closed_pipe_panic(info.payload_as_str()) {
            std::process::exit(CLOSED_PIPE_EXIT);
        }
        default(info)
    }));
}

/// Runs a long-lived role's body; a failure is logged as one JSON line and exits 1.
pub(crate) fn run_service(role: &str, body: impl FnOnce() -> crate::error::Result<()>) -> i32 {
    match body() {
        Ok(()) => 0,
        Err(e) => {
            crate::logging::error(role, "fatal", serde_json::json!({"error": e.to_string()}));
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closed_pipe_panics_are_told_apart() {
        let epipe = std::io::Error::from_raw_os_error(libc::EPIPE);
        for label in ["stdout", "stderr"] {
            let m = format!("failed printing to {label}: {epipe}");
            assert!(is_closed_pipe_panic(Some(&m)), "{m}");
        }
        let other = std::io::Error::from_raw_os_error(libc::ENOSPC);
        for m in [
            format!("failed printing to stdout: {other}"),
            format!("index out of bounds: {epipe}"),
            "called `Option::unwrap()` on a `None` value".to_string(),
        ] {
            assert!(!is_closed_pipe_panic(Some(&m)), "{m}");
        }
        assert!(!is_closed_pipe_panic(None));
    }
}
