//! The root helper's service: a fixed `priv.*` method table, every argument allow-listed.
//!
//! It must never become a general root primitive: no method takes a command, an arbitrary path or
//! an arbitrary pid; every argument goes through [`validate`]. It never forwards a signal to a VMM
//! it did not start.

pub mod net;
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
    net: net::NetLock,
}

/// Every method the helper serves.
pub const METHODS: [&str; 7] = [
    "priv.ping",
    "priv.vm_launch",
    "priv.vm_signal",
    "priv.vm_cleanup",
    "priv.net_up",
    "priv.net_down",
    "priv.net_purge",
];

impl Helper {
    /// A helper over `layout`.
    pub fn new(layout: Layout) -> Self {
        let vm = vm::VmConfig::from_env(&layout);
        Helper::with_vm_config(layout, vm)
    }

    /// A helper over `layout` with an explicit VMM configuration (tests).
    pub fn with_vm_config(layout: Layout, vm: vm::VmConfig) -> Self {
        Helper {
            layout,
            vm,
            net: net::NetLock::default(),
        }
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
            // Taps belong to the uid the VMMs run as (the owner), so Firecracker can open them.
            "priv.net_up" => net::net_up(&self.layout, &self.net, self.vm.vmm_uid(), &params),
            "priv.net_down" => net::net_down(&self.layout, &self.net, &params),
            "priv.net_purge" => net::net_purge(&self.layout, &self.net, &params),
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
