//! Peer credentials of a connected Unix socket (`SO_PEERCRED`).

use std::os::fd::AsFd;

/// Who is on the other end of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Peer {
    /// Peer process id.
    pub pid: i32,
    /// Peer user id.
    pub uid: u32,
    /// Peer group id.
    pub gid: u32,
}

/// Reads the peer credentials of `sock`.
pub fn peer_of(sock: impl AsFd) -> std::io::Result<Peer> {
    let c = rustix::net::sockopt::get_socket_peercred(sock)?;
    Ok(Peer {
        pid: c.pid.as_raw_nonzero().get(),
        uid: c.uid.as_raw(),
        gid: c.gid.as_raw(),
    })
}
