//! What the daemon's method modules share: the layout and state store handle ([`Ctx`]), the root
//! helper call, name validation and error shorthands.
//!
//! Holds no policy of its own: VM, image, kernel and network decisions live in their modules.

use crate::error::{Error, Result};
use crate::layout::Layout;
use crate::net::NetConfig;
use crate::rpc::{client, ErrorCode, RpcError};
use crate::store::Store;
use serde_json::Value;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long one root helper call may take.
const HELPER_TIMEOUT: Duration = Duration::from_secs(60);

/// The daemon's layout and its one state store connection.
#[derive(Clone)]
pub struct Ctx {
    /// Every host path.
    pub layout: Layout,
    /// The store, shared by every method (one connection, one writer).
    pub store: Arc<Mutex<Store>>,
    /// `[network]`, validated once at daemon start.
    pub net: NetConfig,
    /// `[vm]`'s console bounds (serial rate, log cap), validated once at daemon start.
    pub console: super::console_log::ConsoleConfig,
}

impl Ctx {
    /// Runs `f` with the store locked; a store error becomes `operation_failed`.
    pub fn db<T>(&self, f: impl FnOnce(&Store) -> Result<T>) -> Result<T, RpcError> {
        let store = self
            .store
            .lock()
            .map_err(|_| RpcError::new(ErrorCode::OperationFailed, "state store lock poisoned"))?;
        f(&store).map_err(failed)
    }

    /// Calls the root helper's `method`.
    pub fn helper(&self, method: &str, params: Value) -> Result<Value, RpcError> {
        client::call_with_timeout(&self.layout.helper_socket(), method, params, HELPER_TIMEOUT)
            .map_err(|e| {
                let e = e.into_error(&format!("asking the root helper to {method}"));
                failed(e.hint("is bangerd-root running? `sudo banger system restart`"))
            })
    }
}

/// A `bad_request`.
pub fn bad(msg: impl Into<String>) -> RpcError {
    RpcError::bad_request(msg)
}

/// An `operation_failed` carrying `e`'s full message.
pub fn failed(e: Error) -> RpcError {
    RpcError::new(ErrorCode::OperationFailed, e.to_string())
}

/// A `not_found`.
pub fn not_found(msg: impl Into<String>) -> RpcError {
    RpcError::new(ErrorCode::NotFound, msg)
}

/// A `busy`: the object's state forbids the action right now.
pub fn busy(msg: impl Into<String>) -> RpcError {
    RpcError::new(ErrorCode::Busy, msg)
}

/// Validates a VM, image or kernel name (the helper's VM id rules).
pub fn check_name(kind: &str, name: &str) -> Result<(), RpcError> {
    crate::helper::validate::vm_id(name).map(drop).map_err(|_| {
        bad(format!(
            "{kind} name `{name}` is invalid: use 1-63 of a-z, 0-9 and '-', not starting or ending with '-'"
        ))
    })
}

/// `bytes` random bytes as lowercase hex.
pub fn random_hex(bytes: usize) -> String {
    use ring::rand::SecureRandom;
    let mut b = vec![0u8; bytes];
    if ring::rand::SystemRandom::new().fill(&mut b).is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        return format!("{t:x}").chars().rev().take(bytes * 2).collect();
    }
    hex::encode(b)
}

/// Creates `dir` with its parents, as an `operation_failed` naming it.
pub fn create_dir(dir: &std::path::Path) -> Result<(), RpcError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| failed(Error::new(format!("creating {}", dir.display()), e)))
}
