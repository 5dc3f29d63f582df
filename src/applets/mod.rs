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
            eprintln!("banger: --role needs a role name (one of: {})", ROLES.join(", "));
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
