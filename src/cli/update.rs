//! `banger update`: flags, and the real seams (systemctl, HTTP, the daemon socket, child processes)
//! handed to [`crate::update::flow`], which does the work.

use std::path::PathBuf;
use std::time::Duration;

use argh::{ArgsInfo, FromArgs};
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::layout::Layout;
use crate::rpc::client::{self, CallError};
use crate::update::download::HttpFetcher;
use crate::update::flow::{self, DaemonProbe, Options, ProcessRunner, Seams};
use crate::update::manifest::DEFAULT_MANIFEST_URL;
use crate::update::signature::KeySource;

#[derive(FromArgs, ArgsInfo)]
/// Update banger to the latest signed release without stopping running VMs (root).
#[argh(
    subcommand,
    name = "update",
    example = "Is there a newer release? (no root needed, changes nothing):\n  banger update --check",
    example = "Install the latest release:\n  sudo banger update",
    example = "Download, verify and test-run a release without installing it:\n  sudo banger update --dry-run",
    example = "Go back to an older release on purpose:\n  sudo banger update --to v0.1.0 --allow-downgrade",
    note = "The update verifies the release's signed SHA256SUMS and the tarball's hash, runs the new binary before trusting it, swaps /usr/local/lib/banger/banger in one rename (keeping banger.previous), restarts bangerd-root and bangerd (VMs keep running), and runs the new `banger doctor`. If anything fails after the swap it rolls back to the previous install on its own. An update interrupted by a crash is finished or rolled back by the next `sudo banger update`; `banger doctor` reports one. Progress goes to stderr; the outcome is one line on stdout."
)]
pub struct UpdateCmd {
    /// only report whether an update is available (one line), change nothing
    #[argh(switch)]
    check: bool,
    /// install this version (e.g. v0.2.0) instead of the latest stable one
    #[argh(option)]
    to: Option<String>,
    /// update even while the daemon has operations in flight
    #[argh(switch)]
    force: bool,
    /// stage, verify and test-run the release, then stop without installing
    #[argh(switch)]
    dry_run: bool,
    /// with --to, allow installing a version older than this one
    #[argh(switch)]
    allow_downgrade: bool,
    /// release manifest URL (tests and the smoke suite)
    #[argh(option, hidden_help)]
    manifest_url: Option<String>,
    /// PEM file with the public key(s) to trust instead of the embedded ones (tests and the smoke
    /// suite): a regular file owned by root that group and others cannot write; every run using
    /// one prints a WARNING line with its key fingerprints and logs it to the system log
    #[argh(option, hidden_help)]
    pubkey_file: Option<PathBuf>,
}

/// How long one `daemon.operations.list` call may take.
const OPS_TIMEOUT: Duration = Duration::from_secs(5);

/// The daemon, over its socket.
struct SocketDaemon {
    socket: PathBuf,
}

impl DaemonProbe for SocketDaemon {
    fn unfinished_operations(&self) -> Result<Option<Vec<String>>> {
        let what = "asking the daemon for operations in flight";
        let v = match client::call_with_timeout(
            &self.socket,
            "daemon.operations.list",
            json!({}),
            OPS_TIMEOUT,
        ) {
            Ok(v) => v,
            Err(CallError::NotRunning { .. }) => return Ok(None),
            Err(e) => return Err(e.into_error(what)),
        };
        let ops = v["operations"]
            .as_array()
            .ok_or_else(|| Error::new(what, "the answer has no `operations` list"))?;
        Ok(Some(
            ops.iter()
                .filter(|o| o["done"] != Value::Bool(true))
                .map(describe_op)
                .collect(),
        ))
    }

    fn wait_ready(&self) -> Result<()> {
        super::system::wait_ready(&self.socket)
    }
}

/// `op-… vm.create on box1 (stage boot, since …)`.
fn describe_op(o: &Value) -> String {
    let s = |k: &str| o[k].as_str().unwrap_or("?").to_string();
    let target = o["target"]
        .as_str()
        .map(|t| format!(" on {t}"))
        .unwrap_or_default();
    format!(
        "{} {}{target} (stage {}, since {})",
        s("id"),
        s("kind"),
        s("stage"),
        s("started_at")
    )
}

/// Runs `banger update`.
pub fn run(c: UpdateCmd) -> Result<i32> {
    if c.allow_downgrade && c.to.is_none() {
        return Err(Error::usage(
            "banger update --allow-downgrade",
            "it needs --to naming the older version",
        )
        .hint("e.g. sudo banger update --to v0.1.0 --allow-downgrade"));
    }
    if c.check && c.dry_run {
        return Err(Error::usage(
            "banger update --check --dry-run",
            "pick one: --check only reports, --dry-run stages and verifies",
        ));
    }
    let layout = Layout::from_env();
    let opts = Options {
        check: c.check,
        to: c.to,
        force: c.force,
        dry_run: c.dry_run,
        allow_downgrade: c.allow_downgrade,
        manifest_url: c
            .manifest_url
            .unwrap_or_else(|| DEFAULT_MANIFEST_URL.to_string()),
        keys: c.pubkey_file.map_or(KeySource::Embedded, KeySource::File),
        running: crate::buildinfo::VERSION.to_string(),
        is_root: rustix::process::geteuid().is_root(),
    };
    // Lines quote the manifest and the release (network text): escaped for the terminal.
    let say = |line: &str| eprintln!("banger update: {}", crate::termsafe::plain(line));
    let seams = Seams {
        services: &crate::system::service::Systemctl,
        fetcher: &HttpFetcher::new(),
        daemon: &SocketDaemon {
            socket: layout.daemon_socket(),
        },
        runner: &ProcessRunner,
        say: &say,
    };
    let outcome = flow::run(&layout, &opts, &seams)?;
    println!("{}", crate::termsafe::plain(&outcome.to_string()));
    // The VMM may have changed since snapshots were taken (they are bound to its version).
    for w in crate::system::doctor::snapshot_version_warnings(&layout, None) {
        say(&format!("warning: {w}"));
    }
    Ok(0)
}
