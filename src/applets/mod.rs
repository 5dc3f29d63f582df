//! Role dispatch, busybox style: one binary, a role per basename of argv[0].
//!
//! `banger --role NAME ARGS…` (hidden) runs a role without a link, for tests.

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
        "banger" => banger::main(args),
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
            println!("{}", early.output);
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
    println!("{}", crate::buildinfo::BuildInfo::current().one_line());
    0
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
