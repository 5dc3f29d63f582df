//! systemd readiness notification (`sd_notify`), without libsystemd.
//!
//! Sends a datagram to `$NOTIFY_SOCKET` (path or abstract `@name`). A no-op when unset.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// Sends `state` (e.g. `READY=1`) to systemd if it asked for notifications.
pub fn notify(state: &str) -> std::io::Result<bool> {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(false);
    };
    let path = path.to_string_lossy().into_owned();
    let sock = UnixDatagram::unbound()?;
    let addr = if let Some(name) = path.strip_prefix('@') {
        SocketAddr::from_abstract_name(name.as_bytes())?
    } else {
        SocketAddr::from_pathname(&path)?
    };
    sock.send_to_addr(state.as_bytes(), &addr)?;
    Ok(true)
}
