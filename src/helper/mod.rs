//! The root helper's service: a fixed `priv.*` method table, every argument allow-listed.
//!
//! It must never become a general root primitive: no method takes a command, an arbitrary path or
//! an arbitrary pid; every argument goes through [`validate`]. It never forwards a signal to a VMM
//! it did not start.

pub mod validate;

use crate::layout::Layout;
use crate::rpc::server::{Call, Handler};
use crate::rpc::{ErrorCode, RpcError};
use serde_json::{json, Value};

/// The helper's method table.
pub struct Helper {
    #[allow(dead_code)]
    layout: Layout,
}

/// Every method the helper serves.
pub const METHODS: [&str; 1] = ["priv.ping"];

impl Helper {
    /// A helper over `layout`.
    pub fn new(layout: Layout) -> Self {
        Helper { layout }
    }
}

impl Handler for Helper {
    fn handle(&self, call: &Call, params: Value) -> Result<Value, RpcError> {
        match call.method.as_str() {
            "priv.ping" => {
                validate::only_params(&params, &[])?;
                Ok(
                    json!({"pong": true, "version": crate::buildinfo::VERSION, "uid": rustix::process::geteuid().as_raw()}),
                )
            }
            other => Err(RpcError::new(
                ErrorCode::UnknownMethod,
                format!(
                    "unknown method `{other}` (the helper serves only: {})",
                    METHODS.join(", ")
                ),
            )),
        }
    }
}
