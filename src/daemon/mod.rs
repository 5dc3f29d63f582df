//! The owner daemon's service: its method table over the state store and the operations registry.
//!
//! Knows nothing about argv or sockets; `applets::bangerd` binds the socket and serves this.

pub mod ops;
pub mod vms;

use crate::buildinfo::BuildInfo;
use crate::layout::Layout;
use crate::rpc::server::{Call, Handler, Reply};
use crate::rpc::{ErrorCode, RpcError};
use crate::store::Store;
use ops::Operations;
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Everything the daemon's methods share.
pub struct Daemon {
    layout: Layout,
    started: Instant,
    store: Arc<Mutex<Store>>,
    ops: Operations,
    vms: vms::Vms,
    stop: smol::channel::Sender<()>,
}

impl Daemon {
    /// A daemon over `store`; `stop` is signalled by `daemon.shutdown`.
    pub fn new(layout: Layout, store: Store, stop: smol::channel::Sender<()>) -> Self {
        let store = Arc::new(Mutex::new(store));
        Daemon {
            ops: Operations::new(store.clone()),
            vms: vms::Vms::new(layout.clone(), store.clone()),
            layout,
            started: Instant::now(),
            store,
            stop,
        }
    }

    /// The operations registry.
    pub fn operations(&self) -> &Operations {
        &self.ops
    }

    /// Re-adopts, stops or reports every VM recorded as running (call once at start).
    pub fn reconcile(&self) -> (usize, usize, usize) {
        self.vms.reconcile()
    }

    /// The state store.
    pub fn store(&self) -> &Arc<Mutex<Store>> {
        &self.store
    }

    fn status(&self) -> Value {
        let b = BuildInfo::current();
        json!({
            "version": b.version,
            "commit": b.commit,
            "built_at": b.built_at,
            "pid": std::process::id(),
            "uptime_s": self.started.elapsed().as_secs_f64(),
            "socket": self.layout.daemon_socket(),
            "state_dir": self.layout.state_dir(),
        })
    }
}

/// No parameters expected: anything else is refused, so a typo never silently does nothing.
fn no_params(params: &Value) -> Result<(), RpcError> {
    match params {
        Value::Null => Ok(()),
        Value::Object(m) if m.is_empty() => Ok(()),
        Value::Object(m) => Err(RpcError::bad_request(format!(
            "unexpected parameter(s): {}",
            m.keys().cloned().collect::<Vec<_>>().join(", ")
        ))),
        _ => Err(RpcError::bad_request("params must be an object")),
    }
}

impl Handler for Daemon {
    fn handle_reply(&self, call: &Call, params: Value) -> Result<Reply, RpcError> {
        if call.method == "vm.list" {
            return self.vms.list_raw(&params).map(Reply::Raw);
        }
        self.handle(call, params).map(Reply::Json)
    }

    fn handle(&self, call: &Call, params: Value) -> Result<Value, RpcError> {
        match call.method.as_str() {
            "ping" => {
                no_params(&params)?;
                Ok(json!({"pong": true, "version": crate::buildinfo::VERSION}))
            }
            "daemon.status" => {
                no_params(&params)?;
                Ok(self.status())
            }
            "daemon.operations.list" => {
                no_params(&params)?;
                Ok(json!({"operations": self.ops.list()}))
            }
            "daemon.shutdown" => {
                no_params(&params)?;
                // Peers were already limited to root and the owner by the server.
                let _ = self.stop.try_send(());
                Ok(json!({"stopping": true}))
            }
            other => {
                if let Some(r) = self.vms.handle(&self.ops, other, &params) {
                    return r;
                }
                Err(RpcError::new(
                    ErrorCode::UnknownMethod,
                    format!(
                        "unknown method `{other}` (this daemon is banger v{})",
                        crate::buildinfo::VERSION
                    ),
                ))
            }
        }
    }
}
