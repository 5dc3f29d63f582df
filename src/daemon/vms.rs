//! VM lifecycle, images and kernels: the daemon's `vm.*`, `image.*` and `kernel.*` methods.
//!
//! The daemon owns the records and the Firecracker API conversation; the root helper only starts,
//! signals and cleans up VMM processes. A VM's runtime identity (pid, start time, comm) is
//! recorded in `vms/<id>/handles.json` by the helper and mirrored here, and every decision about
//! a running VM re-checks it against /proc: a VM whose process is gone is stopped and cleaned; one
//! we are unsure of is reported and left alone, never killed.

use super::ops::{OpHandle, Operations};
use crate::agent;
use crate::error::{Error, Result};
use crate::layout::Layout;
use crate::rpc::{client, ErrorCode, RpcError};
use crate::store::{Image, Kernel, Store, Vm};
use crate::vmm::api::Client;
use crate::vmm::identity::{self, Identity, Liveness};
use crate::vmm::launch::VmFiles;
use crate::vmm::models::{BootSource, Drive, MachineConfiguration, Vsock};
use serde_json::value::RawValue;
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Most vCPUs a VM may have (Firecracker's limit).
pub const VCPU_MAX: u64 = 32;
/// Least and most memory a VM may have, in MiB.
pub const MEMORY_MIB: std::ops::RangeInclusive<u64> = 16..=1 << 20;

/// How long a guest has to become ready after InstanceStart.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a VM that was killed has to disappear from /proc.
const KILL_WAIT: Duration = Duration::from_secs(10);
/// Kernel command line for banger guests.
const BOOT_ARGS: &str = "console=ttyS0 reboot=k panic=1 pci=off";
/// Guest CID of every VM's vsock device (each VM has its own device and host socket).
const GUEST_CID: u32 = 3;
/// Largest chunk `vm.logs` returns at once.
const LOG_CHUNK: u64 = 64 * 1024;

/// The VM service.
pub struct Vms {
    layout: Layout,
    store: Arc<Mutex<Store>>,
    locks: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    proc_root: PathBuf,
}

fn bad(msg: impl Into<String>) -> RpcError {
    RpcError::bad_request(msg)
}

fn failed(e: Error) -> RpcError {
    RpcError::new(ErrorCode::OperationFailed, e.to_string())
}

fn params<'a>(p: &'a Value, allowed: &[&str]) -> Result<&'a Map<String, Value>, RpcError> {
    static EMPTY: std::sync::OnceLock<Map<String, Value>> = std::sync::OnceLock::new();
    let m = match crate::helper::validate::only_params(p, allowed)? {
        Some(m) => m,
        None => EMPTY.get_or_init(Map::new),
    };
    Ok(m)
}

fn opt_str<'a>(m: &'a Map<String, Value>, k: &str) -> Result<Option<&'a str>, RpcError> {
    match m.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.as_str())),
        Some(_) => Err(bad(format!("`{k}` must be a string"))),
    }
}

fn req_str<'a>(m: &'a Map<String, Value>, k: &str) -> Result<&'a str, RpcError> {
    opt_str(m, k)?.ok_or_else(|| bad(format!("`{k}` is required")))
}

fn opt_u64(m: &Map<String, Value>, k: &str) -> Result<Option<u64>, RpcError> {
    match m.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| bad(format!("`{k}` must be a non-negative integer"))),
    }
}

/// Validates a VM, image or kernel name (the helper's VM id rules).
fn check_name(kind: &str, name: &str) -> Result<(), RpcError> {
    crate::helper::validate::vm_id(name).map(drop).map_err(|_| {
        bad(format!(
            "{kind} name `{name}` is invalid: use 1-63 of a-z, 0-9 and '-', not starting or ending with '-'"
        ))
    })
}

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

fn random_hex(bytes: usize) -> String {
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

fn vm_json(vm: &Vm) -> Value {
    serde_json::to_value(vm).unwrap_or(Value::Null)
}

impl Vms {
    /// A VM service over `store`.
    pub fn new(layout: Layout, store: Arc<Mutex<Store>>) -> Self {
        Vms {
            layout,
            store,
            locks: Mutex::new(HashMap::new()),
            proc_root: PathBuf::from("/proc"),
        }
    }

    fn db<T>(&self, f: impl FnOnce(&Store) -> Result<T>) -> Result<T, RpcError> {
        let store = self
            .store
            .lock()
            .map_err(|_| RpcError::new(ErrorCode::OperationFailed, "state store lock poisoned"))?;
        f(&store).map_err(failed)
    }

    fn lock_for(&self, id: &str) -> Arc<Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.entry(id.to_string()).or_default().clone()
    }

    fn find(&self, r: &str) -> Result<Vm, RpcError> {
        self.db(|s| s.vm_get(r))?.ok_or_else(|| {
            RpcError::new(
                ErrorCode::NotFound,
                format!("no VM named `{r}` (see `banger vm list`)"),
            )
        })
    }

    fn files(&self, vm: &Vm) -> VmFiles {
        VmFiles::in_dir(&self.layout.vm_dir(&vm.id))
    }

    fn helper(&self, method: &str, params: Value) -> Result<Value, RpcError> {
        client::call_with_timeout(
            &self.layout.helper_socket(),
            method,
            params,
            Duration::from_secs(60),
        )
        .map_err(|e| {
            let e = e.into_error(&format!("asking the root helper to {method}"));
            failed(e.hint("is bangerd-root running? `sudo banger system restart`"))
        })
    }

    /// Dispatches one `vm.*`, `image.*` or `kernel.*` method; `None` if `method` is not ours.
    pub fn handle(
        &self,
        ops: &Operations,
        method: &str,
        p: &Value,
    ) -> Option<Result<Value, RpcError>> {
        Some(match method {
            "vm.create" => self.create(ops, p),
            "vm.start" => self.with_vm(p, &["vm"], |vm, _| self.start(ops, vm)),
            "vm.stop" => self.with_vm(p, &["vm", "timeout_s"], |vm, m| {
                let t = opt_u64(m, "timeout_s")?.unwrap_or(10);
                self.stop(ops, vm, Duration::from_secs(t))
            }),
            "vm.restart" => self.with_vm(p, &["vm"], |vm, _| {
                let id = vm.id.clone();
                let vm = self
                    .stop(ops, vm, Duration::from_secs(10))
                    .and_then(|_| self.find(&id))?;
                self.start(ops, vm)
            }),
            "vm.kill" => self.with_vm(p, &["vm", "signal"], |vm, m| {
                self.kill(vm, opt_str(m, "signal")?.unwrap_or("KILL"))
            }),
            "vm.delete" => self.delete(ops, p),
            "vm.list" => self.list_raw(p).and_then(|raw| {
                serde_json::from_str(raw.get())
                    .map_err(|e| RpcError::new(ErrorCode::OperationFailed, e.to_string()))
            }),
            "vm.show" => self.with_vm(p, &["vm"], |vm, _| self.show(vm)),
            "vm.logs" => self.with_vm(p, &["vm", "offset"], |vm, m| {
                self.logs(&vm, opt_u64(m, "offset")?.unwrap_or(0))
            }),
            "image.import" => self.image_import(ops, p),
            "image.list" => params(p, &[])
                .and_then(|_| self.db(|s| s.image_list()).map(|v| json!({"images": v}))),
            "image.rm" => self.image_rm(p),
            "kernel.import" => self.kernel_import(p),
            "kernel.list" => params(p, &[])
                .and_then(|_| self.db(|s| s.kernel_list()).map(|v| json!({"kernels": v}))),
            "kernel.rm" => self.kernel_rm(p),
            _ => return None,
        })
    }

    /// Looks up the VM named by `vm`, holds its lock, refreshes its liveness and runs `f`.
    fn with_vm(
        &self,
        p: &Value,
        allowed: &[&str],
        f: impl FnOnce(Vm, &Map<String, Value>) -> Result<Value, RpcError>,
    ) -> Result<Value, RpcError> {
        let m = params(p, allowed)?;
        let r = req_str(m, "vm")?;
        let vm = self.find(r)?;
        let lock = self.lock_for(&vm.id);
        let _g = lock.lock().unwrap_or_else(|p| p.into_inner());
        let vm = self.refresh(self.find(&vm.id)?)?;
        f(vm, m)
    }

    /// Re-checks a VM that is recorded as running against /proc: gone → stopped and cleaned.
    fn refresh(&self, mut vm: Vm) -> Result<Vm, RpcError> {
        if !matches!(vm.state.as_str(), "running" | "unknown") {
            return Ok(vm);
        }
        let files = self.files(&vm);
        match identity::classify_handles(&files.handles, &self.proc_root) {
            Liveness::Alive => {
                if vm.state != "running" {
                    vm.state = "running".into();
                    self.db(|s| s.vm_update(&vm))?;
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
                if vm.state != "unknown" {
                    crate::logging::error(
                        "bangerd",
                        "vm state unsure",
                        json!({"vm": vm.name, "why": why}),
                    );
                    vm.state = "unknown".into();
                    self.db(|s| s.vm_update(&vm))?;
                }
            }
        }
        Ok(vm)
    }

    fn mark_stopped(&self, vm: &mut Vm) -> Result<(), RpcError> {
        if let Err(e) = self.helper("priv.vm_cleanup", json!({"id": vm.id})) {
            crate::logging::error(
                "bangerd",
                "vm cleanup failed",
                json!({"vm": vm.name, "error": e.message}),
            );
        }
        vm.state = "stopped".into();
        vm.pid = None;
        vm.start_time = None;
        vm.comm = None;
        self.db(|s| s.vm_update(vm))
    }

    /// Reconciles every VM after a daemon start: re-adopts live ones untouched, stops and cleans
    /// gone ones, reports unsure ones. Returns (adopted, stopped, unsure).
    pub fn reconcile(&self) -> (usize, usize, usize) {
        let vms = match self.db(|s| s.vm_list()) {
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
            if matches!(vm.state.as_str(), "starting" | "stopping") {
                // A previous daemon died mid-transition: decide from /proc like a running one.
                let mut v = vm.clone();
                v.state = "unknown".into();
                let _ = self.db(|s| s.vm_update(&v));
            }
            let Ok(vm) = self.find(&vm.id) else { continue };
            let was_live = matches!(vm.state.as_str(), "running" | "unknown");
            match self.refresh(vm) {
                Ok(v) if was_live && v.state == "running" => adopted += 1,
                Ok(v) if was_live && v.state == "stopped" => stopped += 1,
                Ok(v) if v.state == "unknown" => unsure += 1,
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

    fn create(&self, ops: &Operations, p: &Value) -> Result<Value, RpcError> {
        let m = params(p, &["name", "image", "vcpu", "memory_mib", "start"])?;
        let name = match opt_str(m, "name")? {
            Some(n) if !n.is_empty() => n.to_string(),
            _ => format!("vm-{}", random_hex(3)),
        };
        check_name("VM", &name)?;
        let vcpu = opt_u64(m, "vcpu")?.unwrap_or(1);
        let memory = opt_u64(m, "memory_mib")?.unwrap_or(512);
        if vcpu == 0 || vcpu > 32 {
            return Err(bad(format!("vcpu {vcpu} is out of range (1-32)")));
        }
        if !(16..=1 << 20).contains(&memory) {
            return Err(bad(format!(
                "memory {memory} MiB is out of range (16 MiB - 1 TiB)"
            )));
        }
        let start = match m.get("start") {
            None | Some(Value::Null) => true,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(bad("`start` must be a boolean")),
        };
        let image = self.resolve_image(opt_str(m, "image")?)?;
        let op = ops.begin("vm.create", Some(&name));
        let now = crate::clock::now_rfc3339();
        let vm = Vm {
            id: random_hex(6),
            name: name.clone(),
            image: Some(image.name.clone()),
            vcpu: vcpu as u32,
            memory_mib: memory as u32,
            state: "created".into(),
            pid: None,
            start_time: None,
            comm: None,
            boot_id: None,
            created_at: now.clone(),
            updated_at: now,
        };
        let r = (|| {
            op.stage("recording");
            self.db(|s| s.vm_insert(&vm)).map_err(|e| {
                if e.message.contains("already exists") {
                    RpcError::new(ErrorCode::AlreadyExists, e.message)
                } else {
                    e
                }
            })?;
            let lock = self.lock_for(&vm.id);
            let _g = lock.lock().unwrap_or_else(|p| p.into_inner());
            op.stage("copying root filesystem");
            if let Err(e) = self.prepare_disk(&vm, &image) {
                let _ = self.db(|s| s.vm_delete(&vm.id));
                let _ = std::fs::remove_dir_all(self.layout.vm_dir(&vm.id));
                return Err(e);
            }
            if start {
                self.boot(&op, vm.clone())
            } else {
                Ok(vm_json(&vm))
            }
        })();
        op.finish(r.as_ref().err().map(|e| e.message.clone()));
        r
    }

    fn resolve_image(&self, name: Option<&str>) -> Result<Image, RpcError> {
        match name {
            Some(n) => self.db(|s| s.image_get(n))?.ok_or_else(|| {
                RpcError::new(
                    ErrorCode::NotFound,
                    format!("no image named `{n}` (see `banger image list`; import one with `banger image import`)"),
                )
            }),
            None => {
                let mut all = self.db(|s| s.image_list())?;
                match all.len() {
                    1 => Ok(all.remove(0)),
                    0 => Err(RpcError::new(
                        ErrorCode::NotFound,
                        "no images yet: import one with `banger image import NAME --rootfs FILE --kernel KERNEL`",
                    )),
                    _ => Err(bad("several images exist: pick one with --image (see `banger image list`)")),
                }
            }
        }
    }

    fn prepare_disk(&self, vm: &Vm, image: &Image) -> Result<(), RpcError> {
        let dir = self.layout.vm_dir(&vm.id);
        std::fs::create_dir_all(&dir)
            .map_err(|e| failed(Error::new(format!("creating {}", dir.display()), e)))?;
        let _ = std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700));
        crate::vmm::disk::cow_copy(Path::new(&image.rootfs), &dir.join("rootfs.ext4"))
            .map_err(failed)?;
        Ok(())
    }

    /// Launches the VMM through the helper, configures and boots it, waits for the guest.
    fn boot(&self, op: &OpHandle<'_>, mut vm: Vm) -> Result<Value, RpcError> {
        let image = self.resolve_image(vm.image.as_deref())?;
        let kernel = self.kernel_for(&image)?;
        let files = self.files(&vm);
        let console_offset = std::fs::metadata(&files.console_log)
            .map(|m| m.len())
            .unwrap_or(0);
        vm.state = "starting".into();
        self.db(|s| s.vm_update(&vm))?;
        op.stage("launching VMM");
        let launched = self.helper("priv.vm_launch", json!({"id": vm.id}));
        let ident = match launched.and_then(|_| self.read_identity(&files)) {
            Ok(i) => i,
            Err(e) => {
                let mut v = vm.clone();
                let _ = self.mark_stopped(&mut v);
                return Err(e);
            }
        };
        vm.pid = Some(ident.pid);
        vm.start_time = Some(ident.start_time);
        vm.comm = Some(ident.comm.clone());
        self.db(|s| s.vm_update(&vm))?;
        let result = (|| {
            op.stage("configuring VM");
            self.configure(&vm, &kernel, &files)?;
            op.stage("waiting for guest");
            self.wait_ready(&image, &files, &ident, console_offset)
        })();
        match result {
            Ok(boot_id) => {
                vm.state = "running".into();
                vm.boot_id = Some(boot_id.clone());
                self.db(|s| s.vm_update(&vm))?;
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
                Ok(vm_json(&vm))
            }
            Err(e) => {
                let _ = self.helper("priv.vm_signal", json!({"id": vm.id, "signal": "KILL"}));
                self.wait_gone(&ident, KILL_WAIT);
                let _ = self.mark_stopped(&mut vm);
                Err(RpcError::new(
                    e.code,
                    format!("{} (console: {})", e.message, self.console_tail(&files, 5)),
                ))
            }
        }
    }

    fn read_identity(&self, files: &VmFiles) -> Result<Identity, RpcError> {
        match identity::read_handles(&files.handles).map_err(failed)? {
            Some(h) => Ok(h.identity),
            None => Err(failed(Error::new(
                "launching the VMM",
                format!("the helper recorded no {}", files.handles.display()),
            ))),
        }
    }

    fn kernel_for(&self, image: &Image) -> Result<Kernel, RpcError> {
        let name = image
            .kernel
            .as_deref()
            .ok_or_else(|| bad(format!("image `{}` has no kernel", image.name)))?;
        self.db(|s| s.kernel_get(name))?.ok_or_else(|| {
            RpcError::new(
                ErrorCode::NotFound,
                format!("kernel `{name}` of image `{}` is gone", image.name),
            )
        })
    }

    fn configure(&self, vm: &Vm, kernel: &Kernel, files: &VmFiles) -> Result<(), RpcError> {
        let api = |e: crate::vmm::api::ApiError| {
            failed(Error::new(
                format!("configuring VM `{}` through Firecracker", vm.name),
                e,
            ))
        };
        crate::vmm::api::wait_for_socket(&files.api_socket, Duration::from_secs(10))
            .map_err(failed)?;
        let c = Client::new(&files.api_socket);
        c.put_machine_config(&MachineConfiguration {
            vcpu_count: vm.vcpu.min(32) as u8,
            mem_size_mib: u64::from(vm.memory_mib),
            smt: None,
            track_dirty_pages: None,
            cpu_template: None,
            huge_pages: None,
        })
        .map_err(api)?;
        c.put_boot_source(&BootSource {
            kernel_image_path: PathBuf::from(&kernel.path),
            boot_args: Some(BOOT_ARGS.into()),
            initrd_path: None,
        })
        .map_err(api)?;
        c.put_drive(&Drive {
            drive_id: "rootfs".into(),
            partuuid: None,
            is_root_device: true,
            cache_type: None,
            is_read_only: Some(false),
            path_on_host: Some(files.dir.join("rootfs.ext4")),
            rate_limiter: None,
            io_engine: None,
            socket: None,
        })
        .map_err(api)?;
        c.put_vsock(&Vsock {
            guest_cid: GUEST_CID,
            uds_path: files.vsock_uds.clone(),
            vsock_id: None,
        })
        .map_err(api)?;
        c.instance_start().map_err(api)?;
        Ok(())
    }

    /// Waits for the guest: its agent over vsock, or the image's console line. Returns boot_id.
    fn wait_ready(
        &self,
        image: &Image,
        files: &VmFiles,
        ident: &Identity,
        console_offset: u64,
    ) -> Result<String, RpcError> {
        let start = Instant::now();
        let mut last = String::from("no answer yet");
        while start.elapsed() < READY_TIMEOUT {
            if let Liveness::Gone(why) = identity::classify(ident, &self.proc_root) {
                return Err(failed(Error::new(
                    "waiting for the guest",
                    format!("the VMM exited ({why})"),
                )));
            }
            match &image.ready_pattern {
                Some(prefix) => {
                    if let Some(id) = console_ready(&files.console_log, console_offset, prefix) {
                        return Ok(id);
                    }
                    last = format!("no console line starting with {prefix:?} yet");
                }
                None => {
                    match agent::agent_call(&files.vsock_uds, agent::AGENT_VSOCK_PORT, "boot_id") {
                        Ok(v) => {
                            if let Some(id) = v.get("boot_id").and_then(Value::as_str) {
                                return Ok(id.to_string());
                            }
                            last = format!("agent answered without a boot_id: {v}");
                        }
                        Err(e) => last = e.to_string(),
                    }
                }
            }
            // A guest is usually ready within tens of milliseconds: look often at first.
            let pause = if start.elapsed() < Duration::from_millis(300) {
                2
            } else {
                20
            };
            std::thread::sleep(Duration::from_millis(pause));
        }
        Err(failed(
            Error::new(
                format!(
                    "waiting {}s for the guest to become ready",
                    READY_TIMEOUT.as_secs()
                ),
                last,
            )
            .hint("see `banger vm logs` for the guest console"),
        ))
    }

    fn console_tail(&self, files: &VmFiles, lines: usize) -> String {
        let text = std::fs::read(&files.console_log).unwrap_or_default();
        let text = String::from_utf8_lossy(&text);
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join(" | ")
    }

    fn start(&self, ops: &Operations, vm: Vm) -> Result<Value, RpcError> {
        if vm.state == "running" {
            return Err(RpcError::new(
                ErrorCode::Busy,
                format!("VM `{}` is already running", vm.name),
            ));
        }
        if vm.state == "unknown" {
            return Err(RpcError::new(
                ErrorCode::Busy,
                format!(
                    "VM `{}` may still be running (state unknown); check `banger vm show {}`",
                    vm.name, vm.name
                ),
            ));
        }
        let op = ops.begin("vm.start", Some(&vm.name));
        let r = self.boot(&op, vm);
        op.finish(r.as_ref().err().map(|e| e.message.clone()));
        r
    }

    fn wait_gone(&self, ident: &Identity, timeout: Duration) -> bool {
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

    fn stop(&self, ops: &Operations, mut vm: Vm, timeout: Duration) -> Result<Value, RpcError> {
        if vm.state != "running" {
            if vm.state == "unknown" {
                return Err(RpcError::new(
                    ErrorCode::Busy,
                    format!("VM `{}` is in an unknown state; banger will not guess (see `banger vm show`)", vm.name),
                ));
            }
            return Ok(vm_json(&vm));
        }
        let ident = Identity {
            pid: vm.pid.unwrap_or(0),
            start_time: vm.start_time.unwrap_or(0),
            comm: vm.comm.clone().unwrap_or_default(),
        };
        let op = ops.begin("vm.stop", Some(&vm.name));
        let files = self.files(&vm);
        op.stage("asking the guest to shut down");
        let graceful = Client::new(&files.api_socket)
            .with_timeout(Duration::from_secs(2))
            .send_ctrl_alt_del()
            .is_ok();
        let mut gone = graceful && self.wait_gone(&ident, timeout);
        if !gone {
            op.stage("killing the VMM");
            let _ = self.helper("priv.vm_signal", json!({"id": vm.id, "signal": "KILL"}));
            gone = self.wait_gone(&ident, KILL_WAIT);
        }
        let r = if gone {
            op.stage("cleaning up");
            self.mark_stopped(&mut vm).map(|_| vm_json(&vm))
        } else {
            Err(failed(Error::new(
                format!("stopping VM `{}`", vm.name),
                format!("VMM pid {} is still running after SIGKILL", ident.pid),
            )))
        };
        op.finish(r.as_ref().err().map(|e| e.message.clone()));
        r
    }

    fn kill(&self, mut vm: Vm, signal: &str) -> Result<Value, RpcError> {
        crate::helper::validate::signal(signal)?;
        if vm.state != "running" {
            return Err(RpcError::new(
                ErrorCode::Busy,
                format!("VM `{}` is not running", vm.name),
            ));
        }
        self.helper("priv.vm_signal", json!({"id": vm.id, "signal": signal}))?;
        let ident = Identity {
            pid: vm.pid.unwrap_or(0),
            start_time: vm.start_time.unwrap_or(0),
            comm: vm.comm.clone().unwrap_or_default(),
        };
        if self.wait_gone(
            &ident,
            if signal.ends_with("KILL") {
                KILL_WAIT
            } else {
                Duration::from_secs(2)
            },
        ) {
            self.mark_stopped(&mut vm)?;
        }
        Ok(vm_json(&vm))
    }

    fn delete(&self, ops: &Operations, p: &Value) -> Result<Value, RpcError> {
        let m = params(p, &["vms"])?;
        let refs: Vec<&str> = match m.get("vms") {
            Some(Value::Array(a)) if !a.is_empty() => a
                .iter()
                .map(|v| {
                    v.as_str()
                        .ok_or_else(|| bad("`vms` must be a list of names"))
                })
                .collect::<Result<_, _>>()?,
            _ => return Err(bad("`vms` must be a non-empty list of names")),
        };
        // Resolve all first: an unknown name deletes nothing.
        let vms: Vec<Vm> = refs
            .iter()
            .map(|r| self.find(r))
            .collect::<Result<_, _>>()?;
        let mut deleted = Vec::new();
        for vm in vms {
            let lock = self.lock_for(&vm.id);
            let _g = lock.lock().unwrap_or_else(|p| p.into_inner());
            let vm = self.refresh(self.find(&vm.id)?)?;
            if vm.state == "running" {
                self.stop(ops, vm.clone(), Duration::from_secs(5))?;
            } else if vm.state == "unknown" {
                return Err(RpcError::new(
                    ErrorCode::Busy,
                    format!(
                        "VM `{}` is in an unknown state; not deleting it (deleted so far: {})",
                        vm.name,
                        deleted.join(", ")
                    ),
                ));
            }
            let dir = self.layout.vm_dir(&vm.id);
            if dir.exists() {
                std::fs::remove_dir_all(&dir)
                    .map_err(|e| failed(Error::new(format!("removing {}", dir.display()), e)))?;
            }
            self.db(|s| s.vm_delete(&vm.id))?;
            deleted.push(vm.name.clone());
        }
        Ok(json!({"deleted": deleted}))
    }

    /// `vm.list`, serialized straight from the rows: with a thousand VMs, building a `Value`
    /// tree first costs more than the query.
    pub fn list_raw(&self, p: &Value) -> Result<Box<RawValue>, RpcError> {
        #[derive(serde::Serialize)]
        struct List<'a> {
            vms: &'a [Vm],
        }
        params(p, &[])?;
        let mut vms = self.db(|s| s.vm_list())?;
        for vm in vms.iter_mut().filter(|v| v.state == "running") {
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
        serde_json::value::to_raw_value(&List { vms: &vms }).map_err(|e| {
            RpcError::new(
                ErrorCode::OperationFailed,
                format!("encoding the VM list: {e}"),
            )
        })
    }

    fn show(&self, vm: Vm) -> Result<Value, RpcError> {
        let files = self.files(&vm);
        Ok(json!({"vm": vm_json(&vm), "dir": files.dir, "console_log": files.console_log}))
    }

    fn logs(&self, vm: &Vm, offset: u64) -> Result<Value, RpcError> {
        use std::io::{Read, Seek, SeekFrom};
        let path = self.files(vm).console_log;
        let mut f = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(json!({"data": "", "offset": 0, "more": false}))
            }
            Err(e) => return Err(failed(Error::new(format!("reading {}", path.display()), e))),
        };
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let from = if offset > len { 0 } else { offset };
        f.seek(SeekFrom::Start(from))
            .map_err(|e| failed(Error::new(format!("reading {}", path.display()), e)))?;
        let mut buf = Vec::new();
        f.take(LOG_CHUNK)
            .read_to_end(&mut buf)
            .map_err(|e| failed(Error::new(format!("reading {}", path.display()), e)))?;
        let next = from + buf.len() as u64;
        Ok(json!({"data": String::from_utf8_lossy(&buf), "offset": next, "more": next < len}))
    }

    fn image_import(&self, ops: &Operations, p: &Value) -> Result<Value, RpcError> {
        let m = params(p, &["name", "rootfs", "kernel", "ready_console"])?;
        let name = req_str(m, "name")?;
        check_name("image", name)?;
        let rootfs = Path::new(req_str(m, "rootfs")?);
        let kernel = req_str(m, "kernel")?;
        let ready = opt_str(m, "ready_console")?.filter(|s| !s.is_empty());
        if self.db(|s| s.kernel_get(kernel))?.is_none() {
            return Err(RpcError::new(
                ErrorCode::NotFound,
                format!("no kernel named `{kernel}`: import it first with `banger kernel import {kernel} PATH`"),
            ));
        }
        if self.db(|s| s.image_get(name))?.is_some() {
            return Err(RpcError::new(
                ErrorCode::AlreadyExists,
                format!("an image named `{name}` exists (remove it with `banger image rm {name}`)"),
            ));
        }
        if !rootfs.is_absolute() || !rootfs.is_file() {
            return Err(bad(format!(
                "rootfs {} is not an absolute path to a file",
                rootfs.display()
            )));
        }
        let op = ops.begin("image.import", Some(name));
        let dir = self.layout.images_dir().join(name);
        let r = (|| -> Result<Value, RpcError> {
            op.stage("copying root filesystem");
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir)
                .map_err(|e| failed(Error::new(format!("creating {}", dir.display()), e)))?;
            let dst = dir.join("rootfs.ext4");
            crate::vmm::disk::cow_copy(rootfs, &dst).map_err(failed)?;
            let img = Image {
                name: name.to_string(),
                rootfs: dst.to_string_lossy().into_owned(),
                kernel: Some(kernel.to_string()),
                ready_pattern: ready.map(str::to_string),
                created_at: crate::clock::now_rfc3339(),
            };
            self.db(|s| s.image_put(&img))?;
            Ok(serde_json::to_value(&img).unwrap_or(Value::Null))
        })();
        if r.is_err() {
            let _ = std::fs::remove_dir_all(&dir);
        }
        op.finish(r.as_ref().err().map(|e| e.message.clone()));
        r
    }

    fn image_rm(&self, p: &Value) -> Result<Value, RpcError> {
        let m = params(p, &["name"])?;
        let name = req_str(m, "name")?;
        check_name("image", name)?;
        if !self.db(|s| s.image_delete(name))? {
            return Err(RpcError::new(
                ErrorCode::NotFound,
                format!("no image named `{name}`"),
            ));
        }
        let _ = std::fs::remove_dir_all(self.layout.images_dir().join(name));
        Ok(json!({"removed": name}))
    }

    fn kernel_import(&self, p: &Value) -> Result<Value, RpcError> {
        let m = params(p, &["name", "path"])?;
        let name = req_str(m, "name")?;
        check_name("kernel", name)?;
        let src = Path::new(req_str(m, "path")?);
        if !src.is_absolute() || !src.is_file() {
            return Err(bad(format!(
                "kernel {} is not an absolute path to a file",
                src.display()
            )));
        }
        let mut magic = [0u8; 4];
        let is_elf = std::fs::File::open(src)
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
            .is_ok()
            && magic == *b"\x7fELF";
        if !is_elf {
            return Err(bad(format!(
                "{} is not an ELF kernel image (Firecracker on x86_64 boots an uncompressed vmlinux, not a bzImage)",
                src.display()
            )));
        }
        let dir = self.layout.kernels_dir().join(name);
        std::fs::create_dir_all(&dir)
            .map_err(|e| failed(Error::new(format!("creating {}", dir.display()), e)))?;
        let dst = dir.join("vmlinux");
        let tmp = dir.join(".vmlinux.tmp");
        let _ = std::fs::remove_file(&tmp);
        std::fs::copy(src, &tmp)
            .and_then(|_| std::fs::rename(&tmp, &dst))
            .map_err(|e| {
                failed(Error::new(
                    format!("copying {} to {}", src.display(), dst.display()),
                    e,
                ))
            })?;
        let k = Kernel {
            name: name.to_string(),
            path: dst.to_string_lossy().into_owned(),
            created_at: crate::clock::now_rfc3339(),
        };
        self.db(|s| s.kernel_put(&k))?;
        Ok(serde_json::to_value(&k).unwrap_or(Value::Null))
    }

    fn kernel_rm(&self, p: &Value) -> Result<Value, RpcError> {
        let m = params(p, &["name"])?;
        let name = req_str(m, "name")?;
        check_name("kernel", name)?;
        if !self.db(|s| s.kernel_delete(name))? {
            return Err(RpcError::new(
                ErrorCode::NotFound,
                format!("no kernel named `{name}`"),
            ));
        }
        let _ = std::fs::remove_dir_all(self.layout.kernels_dir().join(name));
        Ok(json!({"removed": name}))
    }
}

/// Scans `console` from `offset` for a whole line containing `prefix` followed by a boot id
/// (1–64 hex digits and dashes); returns the id. A line still being written (no newline yet) is
/// not read, and text that is not a boot id never counts: a split or garbled line is no answer.
fn console_ready(console: &Path, offset: u64, prefix: &str) -> Option<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(console).ok()?;
    f.seek(SeekFrom::Start(offset)).ok()?;
    let mut buf = Vec::new();
    f.take(4 << 20).read_to_end(&mut buf).ok()?;
    let whole = &buf[..buf.iter().rposition(|&b| b == b'\n')?];
    String::from_utf8_lossy(whole)
        .lines()
        .find_map(|l| agent::parse_ready_line_with(l, prefix))
}

#[cfg(test)]
mod tests {
    use super::console_ready;

    #[test]
    fn console_ready_table() {
        let dir = std::env::temp_dir().join(format!("banger-console-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("console.log");
        let prefix = "banger-guest: ready boot_id=";
        let cases: &[(&str, Option<&str>)] = &[
            ("banger-guest: ready boot_id=0123abcd\n", Some("0123abcd")),
            (
                "[ 1.0] banger-guest: ready boot_id=0123-abcd\r\n",
                Some("0123-abcd"),
            ),
            ("noise\nbanger-guest: ready boot_id=ff\nmore\n", Some("ff")),
            // Still being written: not yet.
            ("banger-guest: ready boot_id=0000082", None),
            // A VMM log line split the guest's line: not a boot id.
            (
                "banger-guest: rea2026-11-27T11:37:27 Status code: 204 | dy boot_id=0000\n",
                None,
            ),
            (
                "banger-guest: ready boot_id=2026-11-27T11:42:03.145 Status code: 204\n",
                None,
            ),
            ("banger-guest: ready boot_id=\n", None),
            ("banger-guest: ready boot_id=xyz\n", None),
            ("", None),
        ];
        for (text, want) in cases {
            std::fs::write(&p, text).unwrap();
            assert_eq!(console_ready(&p, 0, prefix).as_deref(), *want, "{text:?}");
        }
        // Only what the current boot wrote counts.
        std::fs::write(&p, "banger-guest: ready boot_id=aa\n").unwrap();
        assert_eq!(console_ready(&p, 31, prefix), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
