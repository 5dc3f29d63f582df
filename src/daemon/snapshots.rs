//! Snapshots of running VMs and the VMs restored from them: `vm.snapshot`, `vm.create` with
//! `from`, `snapshot.list|show|rm`.
//!
//! A snapshot is taken with the VM paused: a copy-on-write clone of its disk, then Firecracker's
//! full snapshot (vmstate + memory, made sparse afterwards), then the VM resumes (or stops).
//! Firecracker records each drive's host path in the vmstate and reopens exactly that path on
//! load, so the drive is re-pointed (`PATCH /drives/rootfs`) at the snapshot's own disk clone
//! for the `create` and back to the VM's disk afterwards: every restore then opens a file the
//! snapshot owns, and re-points the restored (still paused) VM at its own disk clone before
//! resuming it. The vsock socket and the tap are overridden at load (`vsock_override`,
//! `network_overrides`).
//!
//! A restore runs in a new VMM launched through the helper exactly as a boot's, so reconcile,
//! stop and delete treat it as any VM. Firecracker snapshots are bound to the version that wrote
//! them: the new VMM's `GET /version` is compared with the recorded one before the load, and a
//! mismatch is refused with nothing left behind. Restores of one snapshot are serialised up to
//! the end of the agent's `reconfigure` (the restored guest still has the snapshot's address until
//! then). This module never signals a process itself (the helper does) and never deletes a
//! snapshot a running VM came from.

use super::images;
use super::kernels;
use super::net;
use super::ops::Operations;
use super::requests::{SnapshotRef, VmCreate, VmSnapshot};
use super::shared::{bad, busy, check_name, create_dir, failed, not_found, random_hex};
use super::vms::{vm_json, Vms, KILL_WAIT, STOP_TIMEOUT};
use crate::agent;
use crate::error::Error;
use crate::rpc::{ErrorCode, RpcError};
use crate::store::{Snapshot, Vm, VmState};
use crate::vmm::api::{ApiError, Client};
use crate::vmm::disk::{cow_copy, CopyKind};
use crate::vmm::identity;
use crate::vmm::models::{
    NetworkOverride, PartialDrive, SnapshotCreateParams, SnapshotLoadParams, SnapshotType,
    VsockOverride,
};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The vmstate file in a snapshot's directory.
pub const VMSTATE: &str = "vmstate";
/// The guest memory file in a snapshot's directory.
pub const MEMORY: &str = "memory";
/// The disk clone in a snapshot's (and every VM's) directory.
pub const DISK: &str = "rootfs.ext4";
/// How long the restored guest's agent has to apply `reconfigure`.
const RECONFIGURE_TIMEOUT: Duration = Duration::from_secs(90);
/// How long the VMM has to open its API socket.
const API_TIMEOUT: Duration = Duration::from_secs(10);
/// Firecracker snapshot/load calls can take a while on a busy host (memory file, disk).
const SNAPSHOT_API_TIMEOUT: Duration = Duration::from_secs(60);

/// The refusal of a restore under another Firecracker version, with what to do.
pub fn version_mismatch(snap: &Snapshot, running: &str) -> Option<String> {
    (snap.firecracker_version != running).then(|| {
        format!(
            "snapshot `{}` was written by Firecracker {} but this host runs Firecracker {running}; \
             Firecracker snapshots only load under the version that wrote them \
             (install Firecracker {} again to restore it, or take a new snapshot under {running} and remove this one with `banger snapshot rm {}`)",
            snap.name, snap.firecracker_version, snap.firecracker_version, snap.name
        )
    })
}

/// Punches holes where `path` holds whole zero pages, so a mostly-empty guest memory file costs
/// what it holds. Returns the bytes allocated afterwards.
pub fn make_sparse(path: &Path) -> Result<u64, Error> {
    use std::io::Read;
    use std::os::unix::fs::MetadataExt;
    const PAGE: usize = 4096;
    static ZERO_PAGE: [u8; PAGE] = [0; PAGE];
    let what = || format!("making {} sparse", path.display());
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| Error::new(what(), e))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut off: u64 = 0;
    let mut zero_from: Option<u64> = None;
    let punch = |f: &std::fs::File, from: u64, to: u64| -> Result<(), Error> {
        rustix::fs::fallocate(
            f,
            rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
            from,
            to - from,
        )
        .map_err(|e| Error::new(what(), e))
    };
    loop {
        let n = read_full(&mut f, &mut buf).map_err(|e| Error::new(what(), e))?;
        if n == 0 {
            break;
        }
        for (i, page) in buf[..n].chunks(PAGE).enumerate() {
            let at = off + (i * PAGE) as u64;
            // Slice equality is a memcmp: fast even in an unoptimized build.
            if page == &ZERO_PAGE[..page.len()] {
                zero_from.get_or_insert(at);
            } else if let Some(z) = zero_from.take() {
                punch(&f, z, at)?;
            }
        }
        off += n as u64;
    }
    if let Some(z) = zero_from {
        punch(&f, z, off)?;
    }
    let _ = f.read(&mut []);
    Ok(f.metadata().map(|m| m.blocks() * 512).unwrap_or(0))
}

fn read_full(f: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    use std::io::Read;
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Bytes allocated on disk by the files directly in `dir` (what `du` counts).
pub fn allocated(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.blocks() * 512)
                .sum()
        })
        .unwrap_or(0)
}

fn copy_kind(k: CopyKind) -> &'static str {
    match k {
        CopyKind::Reflink => "reflink",
        CopyKind::Sparse => "sparse copy",
    }
}

fn snapshot_json(s: &Snapshot, clones: &[(String, String)]) -> Value {
    let mut v = serde_json::to_value(s).unwrap_or(Value::Null);
    v["vms"] = json!(clones
        .iter()
        .map(|(n, st)| json!({"name": n, "state": st}))
        .collect::<Vec<_>>());
    v
}

fn find_snapshot(vms: &Vms, r: &str) -> Result<Snapshot, RpcError> {
    vms.ctx.db(|s| s.snapshot_get(r))?.ok_or_else(|| {
        not_found(format!(
            "no snapshot named `{r}` (see `banger snapshot list`)"
        ))
    })
}

fn api_failed(what: String) -> impl Fn(ApiError) -> RpcError {
    move |e| failed(Error::new(what.clone(), e))
}

/// `vm.snapshot`.
pub fn take(vms: &Vms, ops: &Operations, req: VmSnapshot) -> Result<Value, RpcError> {
    let vm = vms.find(&req.vm)?;
    let name = match req.name {
        Some(n) if !n.is_empty() => n,
        _ => format!("{}-{}", vm.name, random_hex(2)),
    };
    check_name("snapshot", &name)?;
    if vms.ctx.db(|s| s.snapshot_get(&name))?.is_some() {
        return Err(RpcError::new(
            ErrorCode::AlreadyExists,
            format!("a snapshot named `{name}` already exists (pick another --as, or `banger snapshot rm {name}`)"),
        ));
    }
    let lock = vms.lock_for(&vm.id);
    let _g = lock.lock().unwrap_or_else(|p| p.into_inner());
    let vm = vms.refresh(vms.find(&vm.id)?)?;
    if vm.state != VmState::Running {
        return Err(busy(format!(
            "VM `{}` is {}; only a running VM can be snapshotted (start it with `banger vm start {}`)",
            vm.name, vm.state, vm.name
        )));
    }
    let image = images::resolve(&vms.ctx, vm.image.as_deref())?;
    let kernel = kernels::for_image(&vms.ctx, &image)?;
    let op = ops.begin("vm.snapshot", Some(&vm.name));
    let id = random_hex(6);
    let dir = vms.ctx.layout.snapshot_dir(&id);
    let r = (|| -> Result<Value, RpcError> {
        create_dir(&vms.ctx.layout.snapshots_dir())?;
        create_dir(&dir)?;
        let _ = std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700));
        let files = vms.files(&vm);
        let api = Client::new(&files.api_socket).with_timeout(SNAPSHOT_API_TIMEOUT);
        let what = |s: &str| format!("snapshotting VM `{}`: {s}", vm.name);
        let version = api
            .version()
            .map_err(api_failed(what("asking Firecracker its version")))?
            .firecracker_version;
        op.stage("pausing");
        api.pause().map_err(api_failed(what("pausing")))?;
        let taken = capture(&api, &files.dir, &dir, &what);
        // A VM left on the snapshot's disk must not run again: it is stopped instead.
        let stranded = matches!(&taken, Err((_, true)));
        let vm_json_after = if req.stop.unwrap_or(false) || stranded {
            op.stage("stopping");
            vms.stop_locked(ops, vm.clone(), STOP_TIMEOUT)
        } else {
            op.stage("resuming");
            api.resume()
                .map_err(api_failed(what("resuming")))
                .map(|_| vm_json(&vm, None))
        };
        let copy = taken.map_err(|(e, _)| e)?;
        let vm_after = vm_json_after?;
        let size_mem = make_sparse(&dir.join(MEMORY)).map_err(failed)?;
        let snap = Snapshot {
            id: id.clone(),
            name: name.clone(),
            source_vm: vm.name.clone(),
            kernel: kernel.name.clone(),
            image: vm.image.clone(),
            vcpu: vm.vcpu,
            memory_mib: vm.memory_mib,
            agent: image.ready_pattern.is_none(),
            firecracker_version: version,
            boot_id: vm.boot_id.clone(),
            dir: dir.to_string_lossy().into_owned(),
            size_bytes: allocated(&dir),
            created_at: crate::clock::now_rfc3339(),
        };
        vms.ctx.db(|s| s.snapshot_insert(&snap))?;
        let mut out = snapshot_json(&snap, &[]);
        out["disk_copy"] = json!(copy_kind(copy));
        out["memory_allocated_bytes"] = json!(size_mem);
        out["vm"] = vm_after;
        Ok(out)
    })();
    if r.is_err() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    op.finish(r.as_ref().err().map(|e| e.message.clone()));
    r
}

/// With the VM paused: the disk clone, the drive re-pointed at it, the snapshot, the drive back.
fn capture(
    api: &Client,
    vm_dir: &Path,
    dir: &Path,
    what: &dyn Fn(&str) -> String,
) -> Result<CopyKind, (RpcError, bool)> {
    let own_disk = vm_dir.join(DISK);
    let snap_disk = dir.join(DISK);
    let copy = cow_copy(&own_disk, &snap_disk).map_err(|e| (failed(e), false))?;
    let point = |p: &Path| {
        api.patch_drive(&PartialDrive {
            drive_id: "rootfs".into(),
            path_on_host: Some(p.to_path_buf()),
            rate_limiter: None,
        })
    };
    // A failed re-point may have happened half-way: treat the VM as stranded.
    point(&snap_disk).map_err(|e| {
        let e = api_failed(what("pointing the drive at the snapshot's disk"))(e);
        let back = point(&own_disk).is_err();
        (e, back)
    })?;
    let created = api.create_snapshot(&SnapshotCreateParams {
        mem_file_path: dir.join(MEMORY),
        snapshot_path: dir.join(VMSTATE),
        snapshot_type: Some(SnapshotType::Full),
    });
    // Whatever the snapshot did, the VM goes back to its own disk before it runs again.
    point(&own_disk).map_err(|e| {
        (
            api_failed(what(
                "pointing the drive back at the VM's own disk (the VM was stopped instead of resumed)",
            ))(e),
            true,
        )
    })?;
    created.map_err(|e| (api_failed(what("writing the snapshot"))(e), false))?;
    Ok(copy)
}

/// `vm.create` with `from`: a new VM restored from a snapshot.
pub fn restore(vms: &Vms, ops: &Operations, req: VmCreate) -> Result<Value, RpcError> {
    let from = req.from.clone().unwrap_or_default();
    if req.image.is_some() || req.vcpu.is_some() || req.memory_mib.is_some() {
        return Err(bad(
            "`from` restores a snapshot with its own image, vCPUs and memory; drop `image`, `vcpu` and `memory_mib`",
        ));
    }
    if req.start == Some(false) {
        return Err(bad(
            "a VM restored from a snapshot is always started; drop `start`",
        ));
    }
    let snap = find_snapshot(vms, &from)?;
    let name = match req.name {
        Some(n) if !n.is_empty() => n,
        _ => format!("{}-{}", snap.name, random_hex(2)),
    };
    check_name("VM", &name)?;
    let snap_dir = PathBuf::from(&snap.dir);
    for f in [VMSTATE, MEMORY, DISK] {
        if !snap_dir.join(f).is_file() {
            return Err(failed(
                Error::new(
                    format!("restoring snapshot `{}`", snap.name),
                    format!("{} is missing", snap_dir.join(f).display()),
                )
                .hint(format!(
                    "the snapshot is damaged; remove it with `banger snapshot rm {}`",
                    snap.name
                )),
            ));
        }
    }
    let image = images::resolve(&vms.ctx, snap.image.as_deref()).ok();
    let op = ops.begin("vm.create", Some(&name));
    let now = crate::clock::now_rfc3339();
    let id = vms.new_id()?;
    let mut vm = Vm {
        mac: Some(crate::net::mac_for(&id)),
        id,
        name: name.clone(),
        image: snap.image.clone(),
        vcpu: snap.vcpu,
        memory_mib: snap.memory_mib,
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
    let r = (|| -> Result<Value, RpcError> {
        op.stage("recording");
        vms.record_new(&mut vm, Some(&snap.id))?;
        let lock = vms.lock_for(&vm.id);
        let _g = lock.lock().unwrap_or_else(|p| p.into_inner());
        let r = load(vms, &op, &snap, image.as_ref(), vm.clone());
        if r.is_err() {
            // A restore that did not run leaves nothing: no record, no directory, no ssh entry
            // (load refreshed the ssh config with this VM in it).
            let _ = std::fs::remove_dir_all(vms.ctx.layout.vm_dir(&vm.id));
            let _ = vms.ctx.db(|s| s.vm_delete(&vm.id));
            super::ssh::refresh_config(&vms.ctx);
        }
        r
    })();
    op.finish(r.as_ref().err().map(|e| e.message.clone()));
    r
}

/// Work running beside a restore's stages on a scoped thread: joined once, its result kept (a
/// panic becomes an error naming `what`), timed into the operation as `what`.
struct Beside<'s, T> {
    what: &'static str,
    handle: Option<std::thread::ScopedJoinHandle<'s, Result<T, RpcError>>>,
    result: Option<Result<T, RpcError>>,
}

impl<'s, T: Send + 's> Beside<'s, T> {
    fn spawn<'e>(
        sc: &'s std::thread::Scope<'s, 'e>,
        op: &'s super::ops::OpHandle<'_>,
        what: &'static str,
        f: impl FnOnce() -> Result<T, RpcError> + Send + 's,
    ) -> Self {
        let handle = sc.spawn(move || {
            let t = std::time::Instant::now();
            let r = f();
            op.concurrent(what, t.elapsed());
            r
        });
        Beside {
            what,
            handle: Some(handle),
            result: None,
        }
    }

    fn is_finished(&self) -> bool {
        self.handle.as_ref().is_none_or(|h| h.is_finished())
    }

    /// Waits for it (once) and returns its result.
    fn wait(&mut self) -> &Result<T, RpcError> {
        let (what, handle) = (self.what, self.handle.take());
        self.result.get_or_insert_with(|| match handle {
            Some(h) => h.join().unwrap_or_else(|_| {
                Err(failed(Error::new(
                    format!("restoring a VM: {what}"),
                    "the thread doing it panicked",
                )))
            }),
            None => Err(failed(Error::new(
                format!("restoring a VM: {what}"),
                "it never ran",
            ))),
        })
    }
}

/// Makes the VM's directory, launches its VMM and restores the snapshot into it: the snapshot's
/// memory and vmstate loaded with this VM's tap and vsock socket, the drive re-pointed at the VM's
/// own disk clone, resumed, and the agent told its new identity. On failure the VMM is killed and
/// the network taken down.
///
/// What does not depend on another step runs beside the stages: the network (its tap is needed
/// by the load), the disk clone (needed by the drive re-point), the ssh config refresh (needs only the record), and
/// the helper's launch call itself: the API conversation starts as soon as the VMM's socket
/// answers, while the helper still writes its pidfile and (durably) handles.json; the VM is
/// recorded running only once that record exists.
///
/// Its store writes (`starting`, then `running` with identity and origin) are commits under WAL +
/// `synchronous=NORMAL` (see `Store::open`): durable across a crash of banger, and a power cut can
/// only drop the last of them — which is fine here, since no VMM survives a power cut: a lost
/// `running` leaves `starting`, which reconcile turns into stopped (its handles name a dead
/// process); a lost `starting` leaves `created` over a disk clone the cut may have left partial
/// (the cut came within a commit or two of it) — an ordinary VM that boots from what its disk
/// holds, as any disk after a power cut; a lost insert leaves only a directory nothing points at.
fn load(
    vms: &Vms,
    op: &super::ops::OpHandle<'_>,
    snap: &Snapshot,
    image: Option<&crate::store::Image>,
    mut vm: Vm,
) -> Result<Value, RpcError> {
    let files = vms.files(&vm);
    let snap_dir = PathBuf::from(&snap.dir);
    op.stage("recording the VM starting");
    create_dir(&files.dir)?;
    let _ = std::fs::set_permissions(
        &files.dir,
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    );
    let ip = net::address_of(&vm, &vms.ctx.net, &vms.ctx.layout.config_toml()).map_err(failed)?;
    let tap = crate::net::tap_name(&vm.id);
    // Before any process exists: a daemon that dies from here on leaves a VM reconcile decides
    // from handles.json (`starting` becomes `unknown`, then running, stopped or unsure), never one
    // a `vm start` or `vm delete` could act on while its VMM may run.
    vm.state = VmState::Starting;
    vms.ctx.db(|s| s.vm_update(&vm))?;
    let what = |s: &str| {
        format!(
            "restoring VM `{}` from snapshot `{}`: {s}",
            vm.name, snap.name
        )
    };
    // Recorded by the helper with the VMM (a boot id it would refuse is written afterwards).
    let sent_boot_id = snap.boot_id.as_deref().filter(|b| {
        !b.is_empty() && b.len() <= 64 && b.bytes().all(|c| c.is_ascii_hexdigit() || c == b'-')
    });
    op.stage("launching VMM");
    let (result, launched, copy) = std::thread::scope(|sc| {
        let v = &vm;
        // The tap, its rules and the NAT bit (the load opens the tap; a few ms, done long before
        // the VMM's socket answers).
        let mut net_t = Beside::spawn(sc, op, "network through the helper", move || {
            net::up(&vms.ctx, v, ip)
        });
        let (src, dst) = (snap_dir.join(DISK), files.dir.join(DISK));
        let mut clone_t = Beside::spawn(sc, op, "disk clone", move || {
            cow_copy(&src, &dst).map_err(failed)
        });
        let mut ssh_t = Beside::spawn(sc, op, "ssh config refresh", move || {
            super::ssh::refresh_config(&vms.ctx);
            Ok(())
        });
        let mut launch_t = Beside::spawn(sc, op, "helper vm_launch call", move || {
            let reply = vms.ctx.helper(
                "priv.vm_launch",
                json!({"id": v.id, "boot_id": sent_boot_id}),
            )?;
            op.helper_steps("helper", &reply);
            serde_json::from_value::<identity::Handles>(reply)
                .map(|h| h.identity)
                .map_err(|e| {
                    failed(Error::new(
                        "launching the VMM",
                        format!("the helper's answer is not a VMM record: {e}"),
                    ))
                })
        });
        let result = (|| -> Result<(String, Option<String>), RpcError> {
            op.stage("waiting for the API socket");
            wait_api(&files.api_socket, &mut launch_t)?;
            let api = Client::new(&files.api_socket).with_timeout(SNAPSHOT_API_TIMEOUT);
            op.stage("checking the Firecracker version");
            let running = api
                .version()
                .map_err(api_failed(what("asking Firecracker its version")))?
                .firecracker_version;
            if let Some(msg) = version_mismatch(snap, &running) {
                return Err(RpcError::new(ErrorCode::BadRequest, msg));
            }
            // Allowed before a load (not boot-specific): a restored guest's console is
            // rate-limited like a booted one's (see daemon::console_log).
            op.stage("configuring the serial console");
            api.put_serial(&vms.ctx.console.serial())
                .map_err(api_failed(what("configuring the serial console")))?;
            op.stage("waiting for the network");
            let made = net_t.wait().clone()?;
            if made != tap {
                return Err(failed(Error::new(
                    what("bringing up the network"),
                    format!("the helper made tap {made}, not {tap}"),
                )));
            }
            // From the load until the agent has its new address, the guest has the snapshot's.
            op.stage("waiting for other restores of the snapshot");
            let snap_lock = vms.snapshot_lock(&snap.id);
            let snap_guard = snap_lock.lock().unwrap_or_else(|p| p.into_inner());
            op.stage("loading snapshot");
            let mut load =
                SnapshotLoadParams::from_files(snap_dir.join(VMSTATE), snap_dir.join(MEMORY));
            load.network_overrides = Some(vec![NetworkOverride {
                iface_id: "eth0".into(),
                host_dev_name: tap.clone(),
            }]);
            load.vsock_override = Some(VsockOverride {
                uds_path: files.vsock_uds.clone(),
            });
            // Resumed only once the drive is this VM's own disk.
            load.resume_vm = Some(false);
            api.load_snapshot(&load)
                .map_err(api_failed(what("loading the snapshot")))?;
            op.stage("waiting for the disk clone");
            clone_t.wait().as_ref().map_err(Clone::clone)?;
            op.stage("pointing the drive at the VM's disk");
            api.patch_drive(&PartialDrive {
                drive_id: "rootfs".into(),
                path_on_host: Some(files.dir.join(DISK)),
                rate_limiter: None,
            })
            .map_err(api_failed(what("pointing the drive at the VM's own disk")))?;
            op.stage("resuming");
            api.resume().map_err(api_failed(what("resuming")))?;
            if !snap.agent {
                // No agent to tell: the guest runs on with the snapshot's identity.
                return Ok((snap.boot_id.clone().unwrap_or_default(), None));
            }
            op.stage("reconfiguring the guest");
            let done = reconfigure(vms, v, ip, &files, &what)?;
            drop(snap_guard);
            Ok(done)
        })();
        // Everything beside the stages ends here, whatever happened.
        if result.is_ok() {
            op.stage("waiting for the helper's record");
        }
        let launched = launch_t.wait().clone();
        let _ = net_t.wait();
        let copy = clone_t.wait().clone();
        let _ = ssh_t.wait();
        (result, launched, copy)
    });
    let result = result.and_then(|r| {
        let ident = launched.clone()?;
        Ok((r, ident, copy?))
    });
    match result {
        Ok(((boot_id, instance_id), ident, copy)) => {
            op.stage("recording the VM running");
            vm.state = VmState::Running;
            vm.pid = Some(ident.pid);
            vm.start_time = Some(ident.start_time);
            vm.comm = Some(ident.comm.clone());
            vm.boot_id = (!boot_id.is_empty()).then_some(boot_id.clone());
            vms.ctx
                .db(|s| s.vm_update_with_origin(&vm, Some(&snap.id), instance_id.as_deref()))?;
            if vm.boot_id.is_some() && vm.boot_id.as_deref() != sent_boot_id {
                // The helper recorded the snapshot's boot id; the guest reported another.
                op.stage("recording the boot id in handles.json");
                if let Ok(Some(mut h)) = identity::read_handles(&files.handles) {
                    h.boot_id = vm.boot_id.clone();
                    let _ = identity::write_handles(&files.handles, &h, None);
                }
            }
            if let Some(image) = image.filter(|i| i.ready_pattern.is_none()) {
                op.stage("pinning the host key");
                if let Err(e) = super::ssh::pin_host_key(&vms.ctx, &vm, image, &files) {
                    crate::logging::error(
                        "bangerd",
                        "restored VM: pinning the host key failed",
                        json!({"vm": vm.name, "error": e.message}),
                    );
                }
            }
            let mut out = vm_json(&vm, Some(&(Some(snap.name.clone()), instance_id)));
            out["disk_copy"] = json!(copy_kind(copy));
            Ok(out)
        }
        Err(e) => {
            if let Ok(ident) = &launched {
                let _ = vms
                    .ctx
                    .helper("priv.vm_signal", json!({"id": vm.id, "signal": "KILL"}));
                vms.wait_gone(ident, KILL_WAIT);
            }
            let _ = vms.mark_stopped(&mut vm);
            Err(e)
        }
    }
}

/// Waits until the VMM's API socket accepts a connection, or the helper's launch call has failed
/// (its error), within [`API_TIMEOUT`].
fn wait_api(socket: &Path, launch: &mut Beside<'_, identity::Identity>) -> Result<(), RpcError> {
    let deadline = std::time::Instant::now() + API_TIMEOUT;
    loop {
        if std::os::unix::net::UnixStream::connect(socket).is_ok() {
            return Ok(());
        }
        if launch.is_finished() {
            launch.wait().as_ref().map_err(Clone::clone)?;
            // Launched (the helper saw the socket): one last bounded wait for it to answer.
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            return crate::vmm::api::wait_for_socket(socket, left).map_err(failed);
        }
        if std::time::Instant::now() >= deadline {
            return crate::vmm::api::wait_for_socket(socket, Duration::ZERO).map_err(failed);
        }
        // A refused connect costs microseconds; the VMM binds its socket a few ms after exec.
        std::thread::sleep(Duration::from_micros(500));
    }
}

/// Tells a restored guest's agent its new identity (name, address, key, a fresh RNG seed);
/// returns the boot id and instance id it reports.
fn reconfigure(
    vms: &Vms,
    vm: &Vm,
    ip: std::net::Ipv4Addr,
    files: &crate::vmm::launch::VmFiles,
    what: &dyn Fn(&str) -> String,
) -> Result<(String, Option<String>), RpcError> {
    let key = crate::ssh::OwnerKey::ensure(&vms.ctx.layout)
        .map_err(|e| failed(Error::new(what("preparing the SSH key"), e)))?;
    let subnet = &vms.ctx.net.subnet;
    let rc = agent::reconfigure::Reconfigure {
        name: vm.name.clone(),
        ip: format!("{ip}/{}", subnet.prefix()),
        gateway: subnet.gateway().to_string(),
        mac: vm
            .mac
            .clone()
            .unwrap_or_else(|| crate::net::mac_for(&vm.id)),
        key: key.kernel_arg_value(),
        seed: Some(fresh_seed().map_err(|e| {
            failed(Error::new(
                what("drawing a seed for the guest's random generator"),
                e,
            ))
        })?),
    };
    let done = agent::reconfigure(&files.vsock_uds, &rc, RECONFIGURE_TIMEOUT)
        .map_err(|e| failed(Error::new(what("telling the guest its new identity"), e)))?;
    Ok((done.boot_id, Some(done.instance_id)))
}

/// `snapshot.list`.
pub fn list(vms: &Vms) -> Result<Value, RpcError> {
    let snaps = vms.ctx.db(|s| s.snapshot_list())?;
    let mut out = Vec::new();
    for s in &snaps {
        let clones = vms.ctx.db(|st| st.snapshot_clones(&s.id))?;
        out.push(snapshot_json(s, &clones));
    }
    Ok(json!({"snapshots": out}))
}

/// `snapshot.show`.
pub fn show(vms: &Vms, req: SnapshotRef) -> Result<Value, RpcError> {
    let s = find_snapshot(vms, &req.snapshot)?;
    let clones = vms.ctx.db(|st| st.snapshot_clones(&s.id))?;
    Ok(json!({"snapshot": snapshot_json(&s, &clones)}))
}

/// `snapshot.rm`: refused while VMs restored from it run (named); otherwise frees its files.
pub fn remove(vms: &Vms, req: SnapshotRef) -> Result<Value, RpcError> {
    let s = find_snapshot(vms, &req.snapshot)?;
    let snap_lock = vms.snapshot_lock(&s.id);
    let _g = snap_lock.lock().unwrap_or_else(|p| p.into_inner());
    let live: Vec<String> = vms
        .ctx
        .db(|st| st.snapshot_clones(&s.id))?
        .into_iter()
        .filter(|(_, state)| {
            state != VmState::Stopped.as_str() && state != VmState::Created.as_str()
        })
        .map(|(n, _)| n)
        .collect();
    if !live.is_empty() {
        return Err(busy(format!(
            "snapshot `{}` is in use by running VM{} {}; stop or delete {} first (`banger vm delete {}`)",
            s.name,
            if live.len() == 1 { "" } else { "s" },
            live.join(", "),
            if live.len() == 1 { "it" } else { "them" },
            live.join(" ")
        )));
    }
    let dir = PathBuf::from(&s.dir);
    let freed = allocated(&dir);
    if dir.exists() {
        std::fs::remove_dir_all(&dir)
            .map_err(|e| failed(Error::new(format!("removing {}", dir.display()), e)))?;
    }
    vms.ctx.db(|st| st.snapshot_delete(&s.id))?;
    Ok(json!({"removed": s.name, "freed_bytes": freed}))
}

/// 32 bytes of host randomness, hex: the seed a restored guest mixes into its kernel's random pool
/// (clones of one snapshot share the generator state the snapshot froze).
fn fresh_seed() -> std::result::Result<String, String> {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| "the host's random generator failed".to_string())?;
    Ok(hex::encode(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(version: &str) -> Snapshot {
        Snapshot {
            id: "aaaaaaaaaaaa".into(),
            name: "warm".into(),
            source_vm: "dev".into(),
            kernel: "k".into(),
            image: Some("img".into()),
            vcpu: 1,
            memory_mib: 128,
            agent: true,
            firecracker_version: version.into(),
            boot_id: None,
            dir: "/s".into(),
            size_bytes: 0,
            created_at: "t".into(),
        }
    }

    #[test]
    fn version_check_says_what_was_recorded_what_runs_and_what_to_do() {
        assert_eq!(version_mismatch(&snap("1.16.1"), "1.16.1"), None);
        let msg = version_mismatch(&snap("1.15.0"), "1.16.1").unwrap();
        for want in [
            "written by Firecracker 1.15.0",
            "runs Firecracker 1.16.1",
            "install Firecracker 1.15.0",
            "banger snapshot rm warm",
        ] {
            assert!(msg.contains(want), "{msg} lacks {want}");
        }
    }

    #[test]
    fn memory_files_become_sparse_without_changing_content() {
        use std::io::{Seek, SeekFrom, Write};
        let dir = std::env::temp_dir().join(format!("banger-sparse-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("memory");
        let mut f = std::fs::File::create(&p).unwrap();
        // 8 MiB written in full (as Firecracker writes memory), data in two places.
        f.write_all(&vec![0u8; 8 << 20]).unwrap();
        f.seek(SeekFrom::Start(4096 * 3 + 17)).unwrap();
        f.write_all(b"guest data").unwrap();
        f.seek(SeekFrom::Start((8 << 20) - 5)).unwrap();
        f.write_all(b"tail!").unwrap();
        f.sync_all().unwrap();
        let before = std::fs::read(&p).unwrap();
        let alloc = make_sparse(&p).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), before, "content unchanged");
        assert!(alloc <= 64 * 1024, "{alloc} bytes still allocated");
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 8 << 20);
        assert!(allocated(&dir) >= alloc);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
