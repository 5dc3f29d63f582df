//! The `bangerd` role: the owner daemon. Validates `[network]` and `[vm]`, opens the store, takes
//! its socket from systemd (`bangerd.socket`) or binds it, tells systemd it is ready, serves
//! [`crate::daemon::Daemon`] until SIGTERM or `daemon.shutdown`.

use crate::daemon::Daemon;
use crate::error::{Context, Result};
use crate::layout::Layout;
use crate::rpc::listen;
use crate::rpc::server::ServerConfig;
use crate::store;
use crate::system::units::DAEMON_SOCKET_NAME;
use argh::FromArgs;
use std::sync::Arc;

#[derive(FromArgs)]
/// banger's owner daemon: keeps VM and image state and serves the `banger` CLI on
/// /run/banger/bangerd.sock. Normally started by systemd (bangerd.service).
#[argh(
    example = "Check whether the installed database suits this binary:\n  bangerd --check-migrations --system",
    note = "--check-migrations exits 0 (compatible), 1 (migrations pending: this binary will apply them) or 2 (the database is newer than this binary, or unreadable)."
)]
struct Args {
    /// print whether state.db is compatible with this binary and exit (read-only)
    #[argh(switch)]
    check_migrations: bool,
    /// accepted for compatibility: banger has only the system layout (/var/lib/banger/state.db,
    /// relocated by BANGER_ROOT like every path), so --check-migrations checks it either way
    #[argh(switch)]
    system: bool,
    /// print the version and exit
    #[argh(switch)]
    version: bool,
}

/// Entry point of the daemon role.
pub fn main(args: Vec<String>) -> i32 {
    let a: Args = match super::parse_args(&args) {
        Ok(a) => a,
        Err(code) => return code,
    };
    if a.version {
        return super::print_version();
    }
    if a.check_migrations {
        // `--system` is accepted for compatibility with the Go original (and older updaters,
        // which pass it): banger has only the system layout, `Layout::from_env()` (the production
        // paths unless BANGER_ROOT relocates them), so both spellings check the same database.
        let _accepted_for_compatibility = a.system;
        let layout = Layout::from_env();
        return match store::check(&layout.state_db()) {
            Ok(c) => {
                println!("{}", c.line());
                c.exit_code()
            }
            Err(e) => {
                println!("unreadable: {e}");
                2
            }
        };
    }
    super::run_service("bangerd", || run(Layout::from_env()))
}

fn run(layout: Layout) -> Result<()> {
    // First, before any thread: no child process may see the socket-activation variables.
    let activation = listen::Activation::take_from_env();
    let install = crate::system::install_toml::load(&layout)?;
    // A bad [network] stops the daemon here, before it creates, binds or takes anything.
    let net = crate::net::NetConfig::load(&layout)?;
    // So does a bad [vm] (console log cap and serial rate).
    let console = crate::daemon::console_log::ConsoleConfig::load(&layout)?;
    let me = rustix::process::getuid().as_raw();
    let mut allowed = vec![0, me];
    if let Some(i) = &install {
        allowed.push(i.owner_uid);
    }
    // Before the store: a socket systemd passed that is not ours stops the daemon with nothing
    // created. From here a client of systemd's socket waits in its backlog until the daemon
    // serves.
    let socket = layout.daemon_socket();
    let want = listen::Want {
        path: &socket,
        name: DAEMON_SOCKET_NAME,
        mode: 0o600,
        owner: None,
    };
    let passed = listen::from_systemd(&activation, &want)?;
    for d in [
        layout.state_dir(),
        layout.vms_dir(),
        layout.images_dir(),
        layout.kernels_dir(),
    ] {
        std::fs::create_dir_all(&d).ctx(|| format!("creating {}", d.display()))?;
    }
    let store = store::Store::open(&layout.state_db())?;
    let interrupted =
        store.op_fail_unfinished("interrupted: the daemon stopped before it finished")?;
    crate::logging::info(
        "bangerd",
        "state store open",
        serde_json::json!({"db": layout.state_db(), "migrations_applied": store.migrations_applied(), "operations_interrupted": interrupted}),
    );
    // Without systemd, bind only now: a socket that answers means a store that is open.
    let (listener, origin) = listen::or_bind(passed, &want)?;
    let (stop_tx, stop_rx) = smol::channel::bounded(4);
    crate::logging::info(
        "bangerd",
        "network config",
        serde_json::json!({"bridge": net.bridge, "subnet": net.subnet.to_string()}),
    );
    let daemon = Arc::new(Daemon::new(
        layout.clone(),
        store,
        net,
        console,
        stop_tx.clone(),
    ));
    daemon.reconcile();
    daemon.spawn_log_rotation()?;
    super::serve_role(
        listener,
        ServerConfig::new("bangerd", allowed),
        daemon,
        stop_tx,
        stop_rx,
        serde_json::json!({"socket": socket, "listener": origin.as_str(), "state_dir": layout.state_dir()}),
    )
}
