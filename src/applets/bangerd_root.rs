//! The `bangerd-root` role: the privileged helper. Takes its socket from systemd
//! (`bangerd-root.socket`) or binds it, in a root-owned 0711 dir, owned by the owner uid, mode
//! 0600 either way, and serves the fixed `priv.*` table of [`crate::helper::Helper`].

use crate::error::{Context, Result};
use crate::helper::Helper;
use crate::layout::Layout;
use crate::rpc::listen;
use crate::rpc::server::ServerConfig;
use crate::system::units::HELPER_SOCKET_NAME;
use argh::FromArgs;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;

#[derive(FromArgs)]
/// banger's root helper: launches VMMs and plumbs host resources for bangerd, through a fixed,
/// allow-listed method table on /run/banger-root/bangerd-root.sock. Started by systemd
/// (bangerd-root.service); only root and the owner in /etc/banger/install.toml may connect.
struct Args {
    /// print the version and exit
    #[argh(switch)]
    version: bool,
}

/// Entry point of the helper role.
pub fn main(args: Vec<String>) -> i32 {
    let a: Args = match super::parse_args(&args) {
        Ok(a) => a,
        Err(code) => return code,
    };
    if a.version {
        return super::print_version();
    }
    super::run_service("bangerd-root", || run(Layout::from_env()))
}

fn run(layout: Layout) -> Result<()> {
    // First, before any thread: no child process (ip, nft, a VMM) may see these variables.
    let activation = listen::Activation::take_from_env();
    let install = crate::system::install_toml::load(&layout)?;
    let me = rustix::process::getuid().as_raw();
    let (owner_uid, owner_gid) = match &install {
        Some(i) => (i.owner_uid, i.owner_gid),
        None => (me, rustix::process::getgid().as_raw()),
    };
    let mut allowed = vec![0, owner_uid];
    allowed.dedup();
    let dir = layout.helper_run_dir();
    std::fs::create_dir_all(&dir).ctx(|| format!("creating {}", dir.display()))?;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o711))
        .ctx(|| format!("setting mode 0711 on {}", dir.display()))?;
    let socket = layout.helper_socket();
    let (listener, origin) = listen::listen(
        &activation,
        &listen::Want {
            path: &socket,
            name: HELPER_SOCKET_NAME,
            mode: 0o600,
            owner: Some((owner_uid, owner_gid)),
        },
    )?;
    let (stop_tx, stop_rx) = smol::channel::bounded(4);
    super::serve_role(
        listener,
        ServerConfig::new("bangerd-root", allowed),
        Arc::new(Helper::new(layout.clone())),
        stop_tx,
        stop_rx,
        serde_json::json!({"socket": socket, "listener": origin.as_str(), "owner_uid": owner_uid}),
    )
}
