//! `banger system …`: install, inspect, restart and remove banger's system services.

use crate::error::{Error, Result};
use crate::layout::{Layout, DAEMON_UNIT, HELPER_UNIT};
use crate::system::{install, service};
use argh::{ArgsInfo, FromArgs};
use std::path::Path;
use std::time::{Duration, Instant};

/// How long install/restart wait for the daemon to answer.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(FromArgs, ArgsInfo)]
/// Install, inspect, restart or remove banger's system services.
#[argh(subcommand, name = "system")]
pub struct SystemCmd {
    #[argh(subcommand)]
    cmd: Sub,
}

#[derive(FromArgs, ArgsInfo)]
#[argh(subcommand)]
enum Sub {
    Install(InstallCmd),
    Status(StatusCmd),
    Restart(RestartCmd),
    Uninstall(UninstallCmd),
}

#[derive(FromArgs, ArgsInfo)]
/// Install this binary system-wide and start bangerd and bangerd-root (root).
#[argh(
    subcommand,
    name = "install",
    example = "sudo banger system install --owner \"$USER\"",
    note = "Copies this binary to /usr/local/lib/banger/banger, links banger, bangerd and bangerd-root in /usr/local/bin, writes /etc/banger/install.toml and the systemd units, and returns once the daemon answers. Re-running it is safe: it is how unit changes reach a host."
)]
struct InstallCmd {
    /// the user who will own the daemon and its VMs
    #[argh(option)]
    owner: String,
}

#[derive(FromArgs, ArgsInfo)]
/// Show what is installed and whether the services run.
#[argh(subcommand, name = "status")]
struct StatusCmd {}

#[derive(FromArgs, ArgsInfo)]
/// Restart bangerd-root, then bangerd, and wait until the daemon answers (root). VMs keep running.
#[argh(subcommand, name = "restart")]
struct RestartCmd {}

#[derive(FromArgs, ArgsInfo)]
/// Stop and remove banger's services, links, binary and network objects (root). VM state is kept unless --purge.
#[argh(subcommand, name = "uninstall")]
struct UninstallCmd {
    /// also delete state (/var/lib/banger), cache and /etc/banger
    #[argh(switch)]
    purge: bool,
}

/// Runs a `system` subcommand.
pub fn run(c: SystemCmd) -> Result<i32> {
    let layout = Layout::from_env();
    let svc = service::Systemctl;
    match c.cmd {
        Sub::Install(i) => {
            super::require_root(
                "installing banger",
                &format!("banger system install --owner {}", i.owner),
            )?;
            let me =
                std::env::current_exe().map_err(|e| Error::new("finding the running binary", e))?;
            let socket = layout.daemon_socket();
            let report = install::install(
                &layout,
                &i.owner,
                &crate::system::users::host_passwd(),
                &me,
                &svc,
                &|| wait_ready(&socket),
            )?;
            print!("{report}");
            Ok(0)
        }
        Sub::Status(_) => {
            let st = install::status(&layout, &svc)?;
            print!("{st}");
            Ok(0)
        }
        Sub::Restart(_) => {
            super::require_root("restarting banger", "banger system restart")?;
            use service::ServiceManager;
            svc.restart(HELPER_UNIT)?;
            svc.restart(DAEMON_UNIT)?;
            wait_ready(&layout.daemon_socket())?;
            println!("bangerd-root and bangerd restarted; the daemon answers");
            Ok(0)
        }
        Sub::Uninstall(u) => {
            let cmd = if u.purge {
                "banger system uninstall --purge"
            } else {
                "banger system uninstall"
            };
            super::require_root("uninstalling banger", cmd)?;
            let report = install::uninstall(&layout, u.purge, &svc)?;
            print!("{report}");
            Ok(0)
        }
    }
}

/// Waits (bounded) until the daemon answers `ping` on `socket`.
pub(crate) fn wait_ready(socket: &Path) -> Result<()> {
    let start = Instant::now();
    let mut last = String::new();
    while start.elapsed() < READY_TIMEOUT {
        match crate::rpc::client::call_with_timeout(
            socket,
            "ping",
            serde_json::json!({}),
            Duration::from_secs(2),
        ) {
            Ok(_) => return Ok(()),
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(Error::new(
        format!(
            "waiting {}s for the daemon to answer on {}",
            READY_TIMEOUT.as_secs(),
            socket.display()
        ),
        last,
    )
    .hint("see `journalctl -u bangerd -n 50` for why it did not start"))
}
