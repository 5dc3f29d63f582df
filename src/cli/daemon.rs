//! `banger daemon …`: where the daemon listens, how it is, and stopping it.

use crate::error::Result;
use crate::layout::{Layout, DAEMON_UNIT};
use crate::rpc::client;
use argh::{ArgsInfo, FromArgs};
use serde_json::{json, Value};

#[derive(FromArgs, ArgsInfo)]
/// Inspect or stop the banger daemon (bangerd).
#[argh(subcommand, name = "daemon")]
pub struct DaemonCmd {
    #[argh(subcommand)]
    cmd: Sub,
}

#[derive(FromArgs, ArgsInfo)]
#[argh(subcommand)]
enum Sub {
    Socket(SocketCmd),
    Status(StatusCmd),
    Stop(StopCmd),
}

#[derive(FromArgs, ArgsInfo)]
/// Print the daemon's socket path, nothing else.
#[argh(subcommand, name = "socket")]
struct SocketCmd {}

#[derive(FromArgs, ArgsInfo)]
/// Ask the daemon how it is: version, pid, uptime, socket, state directory.
#[argh(subcommand, name = "status")]
struct StatusCmd {
    /// print the daemon's answer as JSON
    #[argh(switch)]
    json: bool,
}

#[derive(FromArgs, ArgsInfo)]
/// Stop the installed daemon service (root; running VMs keep running).
#[argh(
    subcommand,
    name = "stop",
    note = "Start it again with `sudo banger system restart`."
)]
struct StopCmd {}

/// Runs a `daemon` subcommand.
pub fn run(c: DaemonCmd) -> Result<i32> {
    let layout = Layout::from_env();
    match c.cmd {
        Sub::Socket(_) => {
            println!("{}", layout.daemon_socket().display());
            Ok(0)
        }
        Sub::Status(s) => {
            let v = client::call(&layout.daemon_socket(), "daemon.status", json!({}))
                .map_err(|e| e.into_error("asking the daemon for its status"))?;
            if s.json {
                println!("{}", crate::termsafe::json(&v.to_string()));
            } else {
                print!("{}", crate::termsafe::plain(&render_status(&v)));
            }
            Ok(0)
        }
        Sub::Stop(_) => {
            super::require_root("stopping the daemon", "banger daemon stop")?;
            let svc = crate::system::service::Systemctl;
            use crate::system::service::ServiceManager;
            // The socket first: left listening, it would start the daemon again for the next
            // client (socket activation). An install from before that has none to stop.
            let socket = crate::system::units::DAEMON_SOCKET_UNIT;
            if svc.is_active(socket)? {
                svc.stop(socket)?;
            }
            svc.stop(DAEMON_UNIT)?;
            println!(
                "bangerd stopped (VMs keep running; start it with `sudo banger system restart`)"
            );
            Ok(0)
        }
    }
}

fn render_status(v: &Value) -> String {
    let s = |k: &str| v.get(k).and_then(Value::as_str).unwrap_or("?").to_string();
    let uptime = v.get("uptime_s").and_then(Value::as_f64).unwrap_or(0.0);
    let pid = v.get("pid").and_then(Value::as_u64).unwrap_or(0);
    format!(
        "bangerd v{} (commit {}, built {})\npid: {pid}\nuptime: {uptime:.1}s\nsocket: {}\nstate: {}\n",
        s("version"),
        s("commit").chars().take(8).collect::<String>(),
        s("built_at"),
        s("socket"),
        s("state_dir"),
    )
}
