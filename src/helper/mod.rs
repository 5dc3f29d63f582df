//! The root helper's service: a fixed `priv.*` method table, every argument allow-listed.
//!
//! It must never become a general root primitive: no method takes a command, an arbitrary path or
//! an arbitrary pid; every argument goes through [`validate`]. It never forwards a signal to a VMM
//! it did not start.

pub mod validate;
pub mod vm;

use crate::layout::Layout;
use crate::rpc::server::{Call, Handler};
use crate::rpc::{ErrorCode, RpcError};
use serde_json::{json, Value};

/// The helper's method table.
pub struct Helper {
    layout: Layout,
    vm: vm::VmConfig,
}

/// Every method the helper serves.
pub const METHODS: [&str; 4] = [
    "priv.ping",
    "priv.vm_launch",
    "priv.vm_signal",
    "priv.vm_cleanup",
];

impl Helper {
    /// A helper over `layout`.
    pub fn new(layout: Layout) -> Self {
        let vm = vm::VmConfig::from_env(&layout);
        Helper { layout, vm }
    }

    /// A helper over `layout` with an explicit VMM configuration (tests).
    pub fn with_vm_config(layout: Layout, vm: vm::VmConfig) -> Self {
        Helper { layout, vm }
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
            "priv.vm_launch" => vm::vm_launch(&self.layout, &self.vm, &params),
            "priv.vm_signal" => vm::vm_signal(&self.layout, &self.vm, &params),
            "priv.vm_cleanup" => vm::vm_cleanup(&self.layout, &self.vm, &params),
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
