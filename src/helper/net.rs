//! The helper's network methods: `priv.net_up`, `priv.net_down`, `priv.net_purge`.
//!
//! Validates every argument (VM id, guest address of the configured subnet, NAT bool, nothing
//! else), derives every name from the id, and serializes all net calls behind one lock so two
//! calls never interleave their checks and changes. The config (`/etc/banger/config.toml`, root
//! owned) is read at each call, so a bad config refuses the call before anything changes. It never
//! takes an interface name, a rule or an address range from the caller.

use crate::helper::validate;
use crate::layout::Layout;
use crate::net::{plumb, NetConfig};
use crate::rpc::{ErrorCode, RpcError};
use serde_json::{json, Value};
use std::sync::Mutex;

/// Serializes the net methods; holds what the helper learned between calls.
#[derive(Default)]
pub struct NetLock(Mutex<plumb::State>);

impl NetLock {
    fn hold(&self) -> std::sync::MutexGuard<'_, plumb::State> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn config(layout: &Layout) -> Result<NetConfig, RpcError> {
    NetConfig::load(layout).map_err(|e| RpcError::new(ErrorCode::BadRequest, e.to_string()))
}

fn failed(e: crate::error::Error) -> RpcError {
    RpcError::new(ErrorCode::OperationFailed, e.to_string())
}

/// `priv.net_up {id, ip, nat}` → `{tap, bridge}`. `owner_uid` owns the tap.
pub fn net_up(
    layout: &Layout,
    lock: &NetLock,
    owner_uid: u32,
    params: &Value,
) -> Result<Value, RpcError> {
    let m = validate::only_params(params, &["id", "ip", "nat"])?
        .ok_or_else(|| RpcError::bad_request("missing arguments: id, ip, nat"))?;
    let id = validate::vm_id(validate::required_str(m, "id")?)?;
    let cfg = config(layout)?;
    let ip = validate::guest_ip(validate::required_str(m, "ip")?, &cfg.subnet)?;
    let nat = validate::required_bool(m, "nat")?;
    let mut state = lock.hold();
    let up = plumb::net_up(layout, &mut state, &cfg, id, ip, nat, owner_uid).map_err(failed)?;
    Ok(json!({"tap": up.tap, "bridge": up.bridge}))
}

/// `priv.net_down {id}` → `{}`.
pub fn net_down(layout: &Layout, lock: &NetLock, params: &Value) -> Result<Value, RpcError> {
    let m = validate::only_params(params, &["id"])?
        .ok_or_else(|| RpcError::bad_request("missing argument: id"))?;
    let id = validate::vm_id(validate::required_str(m, "id")?)?;
    let _g = lock.hold();
    plumb::net_down(layout, id).map_err(failed)?;
    Ok(json!({}))
}

/// `priv.net_purge {}` → `{}` (uninstall): every banger tap and bridge and the table.
pub fn net_purge(layout: &Layout, lock: &NetLock, params: &Value) -> Result<Value, RpcError> {
    validate::only_params(params, &[])?;
    let _g = lock.hold();
    plumb::purge(layout).map_err(failed)?;
    Ok(json!({}))
}
