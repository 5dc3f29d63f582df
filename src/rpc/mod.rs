//! banger's wire protocol (DESIGN §4): JSON over a Unix stream socket, one request per connection.
//!
//! - [`proto`]: the envelope, error codes, size cap and deadlines.
//! - [`listen`]: the listening socket, taken from systemd (socket activation) or bound.
//! - [`server`]: the smol accept loop with `SO_PEERCRED` checks, per-request logging and drain.
//! - [`client`]: a blocking client for the CLI and the updater.
//! - [`peer`]: peer credentials of a Unix socket.

pub mod client;
pub mod listen;
pub mod peer;
pub mod proto;
pub mod server;

pub use proto::{ErrorCode, Request, Response, RpcError};
