//! VM lifecycle: the daemon's `vm.*` methods, the per-VM lock, and reconcile after a restart.
//!
//! The daemon owns the records and the Firecracker API conversation ([`super::boot`]); the root
//! helper only starts, signals and cleans up VMM processes. A VM's runtime identity (pid, start
//! time, comm) is recorded in `vms/<id>/handles.json` by the helper and mirrored here, and every
//! decision about a running VM re-checks it against /proc: a VM whose process is gone is stopped
//! and cleaned; one we are unsure of is reported and left alone, never killed. What an action may
//! do in each [`VmState`] is decided in one place, [`plan`].

use super::boot::{self, GuestNet};
use super::images;
use super::kernels;
use super::net;
use super::ops::{OpHandle, Operations};
use super::requests::{VmCreate, VmDelete, VmKill, VmLogs, VmRef, VmStop};
use super::shared::{bad, busy, check_name, create_dir, failed, not_found, random_hex, Ctx};
use crate::error::Error;
use crate::rpc::{ErrorCode, RpcError};
use crate::store::{Image, Vm, VmState};
use crate::vmm::api::Client;
use crate::vmm::identity::{self, Identity, Liveness};
use crate::vmm::launch::VmFiles;
use serde_json::value::RawValue;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Most vCPUs a VM may have (Firecracker's limit).
pub const VCPU_MAX: u64 = 32;
/// Least and most memory a VM may have, in MiB.
pub const MEMORY_MIB: std::ops::RangeInclusive<u64> = 16..=1 << 20;

/// How long a VM that was killed has to disappear from /proc.
pub(super) const KILL_WAIT: Duration = Duration::from_secs(10);
/// How long `vm.stop` waits for a graceful shutdown unless told otherwise.
pub(super) const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// `vm.delete` kills a running VM at once: its disk goes with it, so a graceful shutdown could
/// save nothing (and a guest that ignores Ctrl-Alt-Del cost the whole wait, VM after VM).
const DELETE_STOP_TIMEOUT: Duration = Duration::ZERO;
/// Largest chunk `vm.logs` returns at once.
const LOG_CHUNK: u64 = 64 * 1024;

/// Checks a VM's size; the CLI runs the same check before asking the daemon.
pub fn check_size(vcpu: u64, memory_mib: u64) -> Result<(), String> {
    if vcpu == 0 || vcpu > VCPU_MAX {
        return Err(format!("vcpu {vcpu} is out of range (1-{VCPU_MAX})"));
    }
    if !MEMORY_MIB.contains(&memory_mib) {
        return Err(format!(
            "memory {memory_mib} MiB is out of range ({}-{} MiB)",
            MEMORY_MIB.start(),
            MEMORY_MIB.end()
        ));
    }
    Ok(())
}

/// A lifecycle action, as [`plan`] judges it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Boot a VM that has no VMM.
    Start,
    /// Shut a running VM down.
    Stop,
    /// Signal a running VM's VMM.
    Kill,
    /// Remove a VM and its disk.
    Delete,
}

/// What an allowed action does in the VM's current state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// Do it.
    Proceed,
    /// Nothing to do: the VM is already where the action would take it.
    AlreadyDone,
    /// Stop the VM first, then do it.
    StopFirst,
}

/// Whether `action` may run on VM `name` in `state`: the one place that decides. A refusal is
/// `busy` and says why and what to look at.
pub fn plan(state: VmState, action: Action, name: &str) -> Result<Plan, RpcError> {
    use Action::*;
    use VmState::*;
    match (action, state) {
        (Start, Created | Stopped) => Ok(Plan::Proceed),
        (Start, Running) => Err(busy(format!("VM `{name}` is already running"))),
        (Stop | Kill, Running) => Ok(Plan::Proceed),
        (Stop, Created | Stopped) => Ok(Plan::AlreadyDone),
        (Kill, Created | Stopped) => Err(busy(format!("VM `{name}` is not running"))),
        (Delete, Created | Stopped) => Ok(Plan::Proceed),
        (Delete, Running) => Ok(Plan::StopFirst),
        (_, Unknown) => Err(busy(format!(
            "VM `{name}` may still be running (state unknown); banger will not guess (check `banger vm show {name}`)"
        ))),
        (_, Starting | Stopping) => Err(busy(format!(
            "VM `{name}` is {state}; try again when that has finished (see `banger vm show {name}`)"
        ))),
    }
}

/// The VM service.
pub struct Vms {
    pub(super) ctx: Ctx,
    locks: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    /// Per-snapshot locks: restores of one snapshot run one at a time up to `reconfigure`.
    snapshot_locks: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    proc_root: PathBuf,
}

/// A VM as `vm.show`, `vm.list` and the lifecycle methods report it: the record plus its tap.
#[derive(serde::Serialize)]
struct VmView<'a> {
    #[serde(flatten)]
    vm: &'a Vm,
    /// The tap's name, derived from the id (none for a VM that never had a network).
    tap: Option<String>,
    /// The snapshot it was restored from (none for a booted VM, or once that snapshot is gone).
    snapshot: Option<&'a str>,
    /// The guest agent's instance id recorded at the restore (none for a booted VM).
    instance_id: Option<&'a str>,
}

/// Where a VM came from: the snapshot's name (if it still exists) and the agent's instance id.
pub(super) type Origin = (Option<String>, Option<String>);

impl<'a> VmView<'a> {
    fn of(vm: &'a Vm, origin: Option<&'a Origin>) -> Self {
        VmView {
            vm,
            tap: vm.ip.as_ref().map(|_| crate::net::tap_name(&vm.id)),
            snapshot: origin.and_then(|o| o.0.as_deref()),
            instance_id: origin.and_then(|o| o.1.as_deref()),
        }
    }
}

/// A VM as the methods report it, with where it came from.
pub(super) fn vm_json(vm: &Vm, origin: Option<&Origin>) -> Value {
    serde_json::to_value(VmView::of(vm, origin)).unwrap_or(Value::Null)
}

impl Vms {
    /// Records new VM `vm` with the lowest free address of the subnet (and, for a restore, the
    /// snapshot it comes from) in one transaction; a taken name is `already_exists`.
    pub(crate) fn record_new(
        &self,
        vm: &mut Vm,
        snapshot_id: Option<&str>,
    ) -> Result<(), RpcError> {
        let (subnet, config) = (self.ctx.net.subnet, self.ctx.layout.config_toml());
        self.ctx
            .db(|s| {
                s.vm_insert_allocating_then(
                    vm,
                    |taken| net::lowest_free(&subnet, taken, &config).map(|ip| ip.to_string()),
                    |s, vm| match snapshot_id {
                        Some(id) => s.vm_set_origin(&vm.id, Some(id), None),
                        None => Ok(()),
                    },
                )
            })
            .map_err(|e| {
                if e.message.contains("already exists") {
                    RpcError::new(ErrorCode::AlreadyExists, e.message)
                } else {
                    e
                }
            })
    }

    /// A VM service over `ctx`.
    pub fn new(ctx: Ctx) -> Self {
        Vms {
            ctx,
            locks: Mutex::new(HashMap::new()),
            snapshot_locks: Mutex::new(HashMap::new()),
            proc_root: PathBuf::from("/proc"),
        }
    }

    pub(super) fn lock_for(&self, id: &str) -> Arc<Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.entry(id.to_string()).or_default().clone()
    }

    /// The lock that serialises restores of snapshot `id` (and its removal).
    pub(super) fn snapshot_lock(&self, id: &str) -> Arc<Mutex<()>> {
        let mut locks = self
            .snapshot_locks
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        locks.entry(id.to_string()).or_default().clone()
    }

    pub(super) fn find(&self, r: &str) -> Result<Vm, RpcError> {
        self.ctx
            .db(|s| s.vm_get(r))?
            .ok_or_else(|| not_found(format!("no VM named `{r}` (see `banger vm list`)")))
    }

    pub(super) fn files(&self, vm: &Vm) -> VmFiles {
        VmFiles::in_dir(&self.ctx.layout.vm_dir(&vm.id))
    }

    /// Looks up the VM `r`, holds its lock, refreshes its liveness and runs `f`.
    fn with_vm(
        &self,
        r: &str,
        f: impl FnOnce(Vm) -> Result<Value, RpcError>,
    ) -> Result<Value, RpcError> {
        let vm = self.find(r)?;
        let lock = self.lock_for(&vm.id);
        let _g = lock.lock().unwrap_or_else(|p| p.into_inner());
        let vm = self.refresh(self.find(&vm.id)?)?;
        f(vm)
    }

    /// Re-checks a VM that is recorded as running against /proc: gone → stopped and cleaned.
    pub(super) fn refresh(&self, mut vm: Vm) -> Result<Vm, RpcError> {
        if !matches!(vm.state, VmState::Running | VmState::Unknown) {
            return Ok(vm);
        }
        let files = self.files(&vm);
        let handles = identity::read_handles(&files.handles);
        let live = match &handles {
            Ok(Some(h)) => identity::classify(&h.identity, &self.proc_root),
            Ok(None) => Liveness::Unsure(format!("{} is missing", files.handles.display())),
            Err(e) => Liveness::Unsure(e.to_string()),
        };
        match live {
            Liveness::Alive => {
                // The record's identity is mirrored here: a VM adopted after a daemon died between
                // its launch and its `running` write has no pid recorded yet.
                let ident = handles.ok().flatten().map(|h| h.identity);
                let mirrored = ident.as_ref().is_none_or(|i| {
                    vm.pid == Some(i.pid)
                        && vm.start_time == Some(i.start_time)
                        && vm.comm.as_deref() == Some(i.comm.as_str())
                });
                if vm.state != VmState::Running || !mirrored {
                    if let Some(i) = ident {
                        vm.pid = Some(i.pid);
                        vm.start_time = Some(i.start_time);
                        vm.comm = Some(i.comm);
                    }
                    vm.state = VmState::Running;
                    self.ctx.db(|s| s.vm_update(&vm))?;
                }
            }
            Liveness::Gone(why) => {
                crate::logging::info(
                    "bangerd",
                    "vm process gone",
                    json!({"vm": vm.name, "why": why}),
                );
                self.mark_stopped(&mut vm)?;
            }
            Liveness::Unsure(why) => {
                if vm.state != VmState::Unknown {
                    crate::logging::error(
                        "bangerd",
                        "vm state unsure",
                        json!({"vm": vm.name, "why": why}),
                    );
                    vm.state = VmState::Unknown;
                    self.ctx.db(|s| s.vm_update(&vm))?;
                }
            }
        }
        Ok(vm)
    }

    /// The VMM is gone: has the helper clean up after it and take its network down, and records
    /// the VM as stopped.
    pub(super) fn mark_stopped(&self, vm: &mut Vm) -> Result<(), RpcError> {
        if let Err(e) = self.ctx.helper("priv.vm_cleanup", json!({"id": vm.id})) {
            crate::logging::error(
                "bangerd",
                "vm cleanup failed",
                json!({"vm": vm.name, "error": e.message}),
            );
        }
        if vm.ip.is_some() {
            net::down(&self.ctx, vm);
        }
        vm.state = VmState::Stopped;
        vm.pid = None;
        vm.start_time = None;
        vm.comm = None;
        self.ctx.db(|s| s.vm_update(vm))
    }

    /// Reconciles every VM after a daemon start: re-adopts live ones untouched, stops and cleans
    /// gone ones, reports unsure ones. Returns (adopted, stopped, unsure).
    pub fn reconcile(&self) -> (usize, usize, usize) {
        let vms = match self.ctx.db(|s| s.vm_list()) {
            Ok(v) => v,
            Err(e) => {
                crate::logging::error(
                    "bangerd",
                    "reconcile: listing VMs failed",
                    json!({"error": e.message}),
                );
                return (0, 0, 0);
            }
        };
        let (mut adopted, mut stopped, mut unsure) = (0, 0, 0);
        for vm in vms {
            if matches!(vm.state, VmState::Starting | VmState::Stopping) {
                // A previous daemon died mid-transition: decide from /proc like a running one.
                let mut v = vm.clone();
                v.state = VmState::Unknown;
                let _ = self.ctx.db(|s| s.vm_update(&v));
            }
            let Ok(vm) = self.find(&vm.id) else { continue };
            let was_live = matches!(vm.state, VmState::Running | VmState::Unknown);
            match self.refresh(vm).map(|v| v.state) {
                Ok(VmState::Running) if was_live => adopted += 1,
                Ok(VmState::Stopped) if was_live => stopped += 1,
                Ok(VmState::Unknown) => unsure += 1,
                _ => {}
            }
        }
        crate::logging::info(
            "bangerd",
            "reconciled VMs",
            json!({"adopted": adopted, "stopped": stopped, "unsure": unsure}),
        );
        (adopted, stopped, unsure)
    }

    /// `vm.create`: validates everything first (nothing is recorded for a bad request), records
    /// the VM, copies its disk and, unless `start` is false, boots it.
    pub fn create(&self, ops: &Operations, req: VmCreate) -> Result<Value, RpcError> {
        if req.from.is_some() {
            return super::snapshots::restore(self, ops, req);
        }
        let name = match req.name {
            Some(n) if !n.is_empty() => n,
            _ => format!("vm-{}", random_hex(3)),
        };
        check_name("VM", &name)?;
        let vcpu = req.vcpu.unwrap_or(1);
        let memory = req.memory_mib.unwrap_or(512);
        check_size(vcpu, memory).map_err(bad)?;
        let start = req.start.unwrap_or(true);
        let image = images::resolve(&self.ctx, req.image.as_deref())?;
        let op = ops.begin("vm.create", Some(&name));
        let now = crate::clock::now_rfc3339();
        let id = self.new_id()?;
        let mut vm = Vm {
            mac: Some(crate::net::mac_for(&id)),
            id,
            name: name.clone(),
            image: Some(image.name.clone()),
            // check_size bounds both.
            vcpu: vcpu as u32,
            memory_mib: memory as u32,
            state: VmState::Created,
            pid: None,
            start_time: None,
            comm: None,
            boot_id: None,
            ip: None,
            nat: req.nat.unwrap_or(false),
            created_at: now.clone(),
            updated_at: now,
        };
        let r = (|| {
            op.stage("recording");
            self.record_new(&mut vm, None)?;
            let lock = self.lock_for(&vm.id);
            let _g = lock.lock().unwrap_or_else(|p| p.into_inner());
            op.stage("copying root filesystem");
            if let Err(e) = self.prepare_disk(&vm, &image) {
                let _ = self.ctx.db(|s| s.vm_delete(&vm.id));
                let _ = std::fs::remove_dir_all(self.ctx.layout.vm_dir(&vm.id));
                return Err(e);
            }
            if start {
                self.boot(&op, vm.clone())
            } else {
                Ok(self.vm_view(&vm))
            }
        })();
        op.finish(r.as_ref().err().map(|e| e.message.clone()));
        r
    }

    /// A fresh VM id whose tap name (its first 10 hex digits) no other VM's shares.
    pub(super) fn new_id(&self) -> Result<String, RpcError> {
        for _ in 0..8 {
            let id = random_hex(6);
            // tap_name keeps the id's first 10 characters.
            if !self.ctx.db(|s| s.vm_id_prefix_taken(&id, 10))? {
                return Ok(id);
            }
        }
        Err(failed(Error::new(
            "choosing a VM id",
            "every candidate's tap name was taken",
        )))
    }

    /// The VM's guest network as the VMM and kernel will see it (the helper makes the tap
    /// separately). A VM recorded before guest networking gets its address here, once, and keeps
    /// it.
    fn guest_net(&self, vm: &mut Vm) -> Result<(Ipv4Addr, GuestNet), RpcError> {
        let config = self.ctx.layout.config_toml();
        if vm.ip.is_none() {
            let subnet = self.ctx.net.subnet;
            let mac = crate::net::mac_for(&vm.id);
            let ip = self.ctx.db(|s| {
                s.vm_assign_address(&vm.id, &mac, |taken| {
                    net::lowest_free(&subnet, taken, &config).map(|ip| ip.to_string())
                })
            })?;
            vm.ip = Some(ip);
            vm.mac = Some(mac);
        }
        let ip = net::address_of(vm, &self.ctx.net, &config).map_err(failed)?;
        Ok((
            ip,
            GuestNet {
                tap: crate::net::tap_name(&vm.id),
                mac: vm
                    .mac
                    .clone()
                    .unwrap_or_else(|| crate::net::mac_for(&vm.id)),
                ip_arg: crate::net::kernel_ip_arg(ip, &self.ctx.net.subnet, &vm.name),
            },
        ))
    }

    fn prepare_disk(&self, vm: &Vm, image: &Image) -> Result<(), RpcError> {
        let dir = self.ctx.layout.vm_dir(&vm.id);
        create_dir(&dir)?;
        let _ = std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700));
        crate::vmm::disk::cow_copy(Path::new(&image.rootfs), &dir.join("rootfs.ext4"))
            .map_err(failed)?;
        Ok(())
    }

    /// Launches the VMM through the helper, configures and boots it, waits for the guest. On any
    /// failure the VMM is killed and the VM recorded as stopped.
    fn boot(&self, op: &OpHandle<'_>, mut vm: Vm) -> Result<Value, RpcError> {
        let image = images::resolve(&self.ctx, vm.image.as_deref())?;
        let kernel = kernels::for_image(&self.ctx, &image)?;
        let files = self.files(&vm);
        let console_offset = std::fs::metadata(&files.console_log)
            .map(|m| m.len())
            .unwrap_or(0);
        vm.state = VmState::Starting;
        self.ctx.db(|s| s.vm_update(&vm))?;
        let (ip, guest_net) = match self.guest_net(&mut vm) {
            Ok(n) => n,
            Err(e) => {
                let mut v = vm.clone();
                let _ = self.mark_stopped(&mut v);
                return Err(e);
            }
        };
        let guest_args = match super::ssh::guest_args(&self.ctx, &vm) {
            Ok(a) => a,
            Err(e) => {
                let mut v = vm.clone();
                let _ = self.mark_stopped(&mut v);
                return Err(e);
            }
        };
        op.stage("launching VMM");
        // `priv.net_up` runs beside the launch and the device configuration, which need only the
        // address: the tap and its rules are in place before the VMM is told to open the tap
        // (PUT /network-interfaces waits for them), and a start no longer waits for them first.
        let (net_r, ident_r, devices_r) = std::thread::scope(|sc| {
            let vm = &vm;
            let net_thread = sc.spawn(move || net::up(&self.ctx, vm, ip));
            let ident_r = self
                .ctx
                .helper("priv.vm_launch", json!({"id": vm.id}))
                .and_then(|_| boot::read_identity(&files));
            let devices_r = match &ident_r {
                Ok(_) => boot::configure_devices(
                    vm,
                    &kernel,
                    &files,
                    &guest_net,
                    &guest_args,
                    &self.ctx.console.serial(),
                ),
                Err(_) => Ok(()),
            };
            let net_r = net_thread.join().unwrap_or_else(|_| {
                Err(failed(Error::new(
                    format!("bringing up the network of VM `{}`", vm.name),
                    "the thread asking the helper panicked",
                )))
            });
            (net_r, ident_r, devices_r)
        });
        let ident = match ident_r {
            Ok(i) => i,
            Err(e) => {
                // Also takes down whatever net_up made.
                let mut v = vm.clone();
                let _ = self.mark_stopped(&mut v);
                return Err(e);
            }
        };
        vm.pid = Some(ident.pid);
        vm.start_time = Some(ident.start_time);
        vm.comm = Some(ident.comm.clone());
        self.ctx.db(|s| s.vm_update(&vm))?;
        let result = (|| -> Result<String, RpcError> {
            op.stage("configuring VM");
            devices_r?;
            let tap = net_r?;
            if tap != guest_net.tap {
                return Err(failed(Error::new(
                    format!("bringing up the network of VM `{}`", vm.name),
                    format!("the helper made tap {tap}, not {}", guest_net.tap),
                )));
            }
            boot::attach_net_and_start(&vm, &files, &guest_net)?;
            op.stage("waiting for guest");
            let boot_id =
                boot::wait_ready(&image, &files, &ident, &self.proc_root, console_offset)?;
            super::ssh::pin_host_key(&self.ctx, &vm, &image, &files)?;
            Ok(boot_id)
        })();
        match result {
            Ok(boot_id) => {
                vm.state = VmState::Running;
                vm.boot_id = Some(boot_id.clone());
                self.ctx.db(|s| s.vm_update(&vm))?;
                if let Ok(Some(mut h)) = identity::read_handles(&files.handles) {
                    h.boot_id = Some(boot_id);
                    if let Err(e) = identity::write_handles(&files.handles, &h, None) {
                        crate::logging::error(
                            "bangerd",
                            "recording boot_id failed",
                            json!({"vm": vm.name, "error": e.to_string()}),
                        );
                    }
                }
                super::ssh::refresh_config(&self.ctx);
                Ok(self.vm_view(&vm))
            }
            Err(e) => {
                let _ = self
                    .ctx
                    .helper("priv.vm_signal", json!({"id": vm.id, "signal": "KILL"}));
                self.wait_gone(&ident, KILL_WAIT);
                let _ = self.mark_stopped(&mut vm);
                Err(RpcError::new(
                    e.code,
                    format!("{} (console: {})", e.message, boot::console_tail(&files, 5)),
                ))
            }
        }
    }

    /// `vm.start`.
    pub fn start(&self, ops: &Operations, req: VmRef) -> Result<Value, RpcError> {
        self.with_vm(&req.vm, |vm| self.start_locked(ops, vm))
    }

    fn start_locked(&self, ops: &Operations, vm: Vm) -> Result<Value, RpcError> {
        plan(vm.state, Action::Start, &vm.name)?;
        let op = ops.begin("vm.start", Some(&vm.name));
        let r = self.boot(&op, vm);
        op.finish(r.as_ref().err().map(|e| e.message.clone()));
        r
    }

    /// `vm.restart`: stop (if running), then start: a new boot with a new boot_id.
    pub fn restart(&self, ops: &Operations, req: VmRef) -> Result<Value, RpcError> {
        self.with_vm(&req.vm, |vm| {
            let id = vm.id.clone();
            self.stop_locked(ops, vm, STOP_TIMEOUT)?;
            let vm = self.find(&id)?;
            self.start_locked(ops, vm)
        })
    }

    pub(super) fn wait_gone(&self, ident: &Identity, timeout: Duration) -> bool {
        let start = Instant::now();
        loop {
            if matches!(
                identity::classify(ident, &self.proc_root),
                Liveness::Gone(_)
            ) {
                return true;
            }
            if start.elapsed() >= timeout {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `vm.stop`.
    pub fn stop(&self, ops: &Operations, req: VmStop) -> Result<Value, RpcError> {
        let timeout = req
            .timeout_s
            .map(Duration::from_secs)
            .unwrap_or(STOP_TIMEOUT);
        self.with_vm(&req.vm, |vm| self.stop_locked(ops, vm, timeout))
    }

    /// Ctrl-Alt-Del, then SIGKILL after `timeout` (zero: SIGKILL at once); the VM's lock is held.
    pub(super) fn stop_locked(
        &self,
        ops: &Operations,
        mut vm: Vm,
        timeout: Duration,
    ) -> Result<Value, RpcError> {
        if plan(vm.state, Action::Stop, &vm.name)? == Plan::AlreadyDone {
            return Ok(self.vm_view(&vm));
        }
        let ident = identity_of(&vm);
        let op = ops.begin("vm.stop", Some(&vm.name));
        let files = self.files(&vm);
        let graceful = !timeout.is_zero() && {
            op.stage("asking the guest to shut down");
            Client::new(&files.api_socket)
                .with_timeout(Duration::from_secs(2))
                .send_ctrl_alt_del()
                .is_ok()
        };
        let mut gone = graceful && self.wait_gone(&ident, timeout);
        if !gone {
            op.stage("killing the VMM");
            let _ = self
                .ctx
                .helper("priv.vm_signal", json!({"id": vm.id, "signal": "KILL"}));
            gone = self.wait_gone(&ident, KILL_WAIT);
        }
        let r = if gone {
            op.stage("cleaning up");
            self.mark_stopped(&mut vm).map(|_| self.vm_view(&vm))
        } else {
            Err(failed(Error::new(
                format!("stopping VM `{}`", vm.name),
                format!("VMM pid {} is still running after SIGKILL", ident.pid),
            )))
        };
        op.finish(r.as_ref().err().map(|e| e.message.clone()));
        r
    }

    /// `vm.kill`: delivers the signal through the helper; a VMM that goes away is recorded stopped.
    pub fn kill(&self, req: VmKill) -> Result<Value, RpcError> {
        let signal = req.signal.unwrap_or_else(|| "KILL".into());
        crate::helper::validate::signal(&signal)?;
        self.with_vm(&req.vm, |mut vm| {
            plan(vm.state, Action::Kill, &vm.name)?;
            self.ctx
                .helper("priv.vm_signal", json!({"id": vm.id, "signal": signal}))?;
            let wait = if signal.ends_with("KILL") {
                KILL_WAIT
            } else {
                Duration::from_secs(2)
            };
            if self.wait_gone(&identity_of(&vm), wait) {
                self.mark_stopped(&mut vm)?;
            }
            Ok(self.vm_view(&vm))
        })
    }

    /// `vm.delete`: every name is resolved first (an unknown one deletes nothing); running VMs
    /// are stopped; a VM in an unknown state stops the batch there.
    pub fn delete(&self, ops: &Operations, req: VmDelete) -> Result<Value, RpcError> {
        if req.vms.is_empty() {
            return Err(bad("`vms` must be a non-empty list of names"));
        }
        let vms: Vec<Vm> = req
            .vms
            .iter()
            .map(|r| self.find(r))
            .collect::<Result<_, _>>()?;
        let mut deleted = Vec::new();
        for vm in vms {
            let lock = self.lock_for(&vm.id);
            let _g = lock.lock().unwrap_or_else(|p| p.into_inner());
            let vm = self.refresh(self.find(&vm.id)?)?;
            let p = plan(vm.state, Action::Delete, &vm.name).map_err(|e| {
                RpcError::new(
                    e.code,
                    format!(
                        "{}; not deleting it (deleted so far: {})",
                        e.message,
                        if deleted.is_empty() {
                            "none".to_string()
                        } else {
                            deleted.join(", ")
                        }
                    ),
                )
            })?;
            if p == Plan::StopFirst {
                self.stop_locked(ops, vm.clone(), DELETE_STOP_TIMEOUT)?;
            } else if vm.ip.is_some() {
                // Its network went down when it stopped; again (idempotent) in case that failed.
                net::down(&self.ctx, &vm);
            }
            let dir = self.ctx.layout.vm_dir(&vm.id);
            if dir.exists() {
                std::fs::remove_dir_all(&dir)
                    .map_err(|e| failed(Error::new(format!("removing {}", dir.display()), e)))?;
            }
            self.ctx.db(|s| s.vm_delete(&vm.id))?;
            super::ssh::forget(&self.ctx, &vm);
            deleted.push(vm.name.clone());
        }
        Ok(json!({"deleted": deleted}))
    }

    /// A VM as the methods report it, with the snapshot it came from.
    fn vm_view(&self, vm: &Vm) -> Value {
        let (snap_id, instance) = self.ctx.db(|s| s.vm_origin(&vm.id)).unwrap_or((None, None));
        let name = snap_id
            .and_then(|id| self.ctx.db(|s| s.snapshot_get(&id)).ok().flatten())
            .map(|s| s.name);
        vm_json(vm, Some(&(name, instance)))
    }

    /// `vm.list`, serialized straight from the rows: with a thousand VMs, building a `Value`
    /// tree first costs more than the query.
    pub fn list_raw(&self) -> Result<Box<RawValue>, RpcError> {
        #[derive(serde::Serialize)]
        struct List<'a> {
            vms: Vec<VmView<'a>>,
        }
        let mut vms = self.ctx.db(|s| s.vm_list())?;
        for vm in vms.iter_mut().filter(|v| v.state == VmState::Running) {
            let busy = self
                .locks
                .lock()
                .ok()
                .and_then(|l| l.get(&vm.id).cloned())
                .is_some_and(|l| l.try_lock().is_err());
            // Busy VMs are reported as recorded; the holder of the lock will settle them.
            if !busy {
                *vm = self.refresh(vm.clone())?;
            }
        }
        let origins: HashMap<String, Origin> = self
            .ctx
            .db(|s| s.vm_origins())?
            .into_iter()
            .map(|(id, name, instance)| (id, (name, instance)))
            .collect();
        serde_json::value::to_raw_value(&List {
            vms: vms
                .iter()
                .map(|v| VmView::of(v, origins.get(&v.id)))
                .collect(),
        })
        .map_err(|e| {
            RpcError::new(
                ErrorCode::OperationFailed,
                format!("encoding the VM list: {e}"),
            )
        })
    }

    /// `vm.show`.
    pub fn show(&self, req: VmRef) -> Result<Value, RpcError> {
        self.with_vm(&req.vm, |vm| {
            let files = self.files(&vm);
            Ok(json!({"vm": self.vm_view(&vm), "dir": files.dir, "console_log": files.console_log}))
        })
    }

    /// `vm.logs`: up to [`LOG_CHUNK`] bytes of the console from `offset`.
    pub fn logs(&self, req: VmLogs) -> Result<Value, RpcError> {
        let offset = req.offset.unwrap_or(0);
        self.with_vm(&req.vm, |vm| self.read_console(&vm, offset))
    }

    fn read_console(&self, vm: &Vm, offset: u64) -> Result<Value, RpcError> {
        use std::io::{Read, Seek, SeekFrom};
        let path = self.files(vm).console_log;
        let read_err =
            |e: std::io::Error| failed(Error::new(format!("reading {}", path.display()), e));
        let mut f = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(json!({"data": "", "offset": 0, "more": false}))
            }
            Err(e) => return Err(read_err(e)),
        };
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let from = if offset > len { 0 } else { offset };
        f.seek(SeekFrom::Start(from)).map_err(read_err)?;
        let mut buf = Vec::new();
        f.take(LOG_CHUNK).read_to_end(&mut buf).map_err(read_err)?;
        let next = from + buf.len() as u64;
        Ok(json!({"data": String::from_utf8_lossy(&buf), "offset": next, "more": next < len}))
    }
}

/// The VMM identity recorded for `vm` (zeros when it has none, which never matches a process).
fn identity_of(vm: &Vm) -> Identity {
    Identity {
        pid: vm.pid.unwrap_or(0),
        start_time: vm.start_time.unwrap_or(0),
        comm: vm.comm.clone().unwrap_or_default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_table() {
        use Action::*;
        use VmState::*;
        // Every (state, action) pair is listed: a new state or action must be decided here.
        let table: &[(VmState, [Option<Plan>; 4])] = &[
            //            Start                 Stop                      Kill                  Delete
            (
                Created,
                [
                    Some(Plan::Proceed),
                    Some(Plan::AlreadyDone),
                    None,
                    Some(Plan::Proceed),
                ],
            ),
            (Starting, [None, None, None, None]),
            (
                Running,
                [
                    None,
                    Some(Plan::Proceed),
                    Some(Plan::Proceed),
                    Some(Plan::StopFirst),
                ],
            ),
            (Stopping, [None, None, None, None]),
            (
                Stopped,
                [
                    Some(Plan::Proceed),
                    Some(Plan::AlreadyDone),
                    None,
                    Some(Plan::Proceed),
                ],
            ),
            (Unknown, [None, None, None, None]),
        ];
        assert_eq!(table.len(), VmState::ALL.len());
        for (state, want) in table {
            for (action, want) in [Start, Stop, Kill, Delete].into_iter().zip(want) {
                let got = plan(*state, action, "v");
                match (got, want) {
                    (Ok(p), Some(w)) => assert_eq!(p, *w, "{state} {action:?}"),
                    (Err(e), None) => {
                        assert_eq!(e.code, ErrorCode::Busy, "{state} {action:?}");
                        assert!(e.message.contains("VM `v`"), "{}", e.message);
                    }
                    (got, want) => panic!("{state} {action:?}: got {got:?}, want {want:?}"),
                }
            }
        }
        assert!(plan(Unknown, Stop, "v")
            .unwrap_err()
            .message
            .contains("will not guess"));
    }

    #[test]
    fn size_table() {
        for (vcpu, mem) in [(1, 16), (32, 1 << 20), (2, 512)] {
            assert!(check_size(vcpu, mem).is_ok(), "{vcpu} {mem}");
        }
        for (vcpu, mem, want) in [
            (0, 512, "vcpu 0 is out of range (1-32)"),
            (33, 512, "vcpu 33 is out of range"),
            (1, 8, "memory 8 MiB is out of range"),
            (1, (1 << 20) + 1, "out of range"),
        ] {
            let e = check_size(vcpu, mem).unwrap_err();
            assert!(e.contains(want), "{e}");
        }
    }
}
