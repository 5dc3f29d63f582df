//! The stand-in's snapshot API, held to Firecracker v1.16.1's rules: `PATCH /vm` (Paused/Resumed,
//! post-boot only), `PATCH /drives/{id}` (re-point a drive post-boot), `PUT /snapshot/create` (only
//! while Paused; writes the vmstate and a sparse memory file) and `PUT /snapshot/load` (only in a
//! fresh process before any boot-specific configuration; opens the recorded drives, the taps —
//! overridden or recorded — and the vsock socket — overridden or recorded; `resume_vm`). A failed
//! load ends the process after the answer, as Firecracker's does.
//!
//! The vmstate is the stand-in's own JSON (SNAPAPI.md): `{"standin_vmstate":1,
//! "firecracker_version", "engine": "tiny"|"tcg", "machine": {…}, "boot_id", "instance_id"}`.
//! The memory of the tiny engine is a sparse file of `mem_size_mib`. Snapshots of the TCG engine
//! belong to `crate::tcg` (snaptcg): its memory file is QEMU's migration stream, and a TCG
//! snapshot loaded without `resume_vm` starts its QEMU at the resume (SNAPAPI.md).

use std::os::unix::net::UnixListener;

use banger::vmm::models::{
    BootSource, Drive, MachineConfiguration, MemoryBackendType, NetworkInterface, PartialDrive,
    SnapshotCreateParams, SnapshotLoadParams, SnapshotType, Vm, VmState, Vsock,
};
use serde::{Deserialize, Serialize};

use crate::machine::{parse, After, Answer, Machine, POST_BOOT, PRE_BOOT, VERSION};
use crate::tap::Tap;

/// The vmstate format version this stand-in writes and reads.
pub const VMSTATE_VERSION: u32 = 1;

/// The configuration needed to rebuild the Machine.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SavedMachine {
    /// Boot source.
    pub boot_source: Option<BootSource>,
    /// Machine configuration.
    pub machine: MachineConfiguration,
    /// Drives, in order.
    pub drives: Vec<Drive>,
    /// Network interfaces, in order.
    pub nets: Vec<NetworkInterface>,
    /// The vsock device.
    pub vsock: Option<Vsock>,
}

/// The stand-in's vmstate file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmStateFile {
    /// [`VMSTATE_VERSION`].
    pub standin_vmstate: u32,
    /// The Firecracker version the stand-in impersonated when it wrote this.
    pub firecracker_version: String,
    /// "tiny" (the stand-in's fake guest) or "tcg".
    pub engine: String,
    /// The machine.
    pub machine: SavedMachine,
    /// The guest's boot id.
    pub boot_id: Option<String>,
    /// The guest agent's instance id at the snapshot, when it had one.
    #[serde(default)]
    pub instance_id: Option<String>,
}

/// A TCG engine failure as Firecracker-shaped fault text.
fn tcg_fault(what: &str, e: String) -> Answer {
    Answer::fault(
        400,
        format!("{what}: the stand-in's TCG engine failed: {e}"),
    )
}

fn load_error(msg: impl std::fmt::Display) -> Answer {
    Answer::fault(
        400,
        format!("Load snapshot error: Failed to restore from snapshot: {msg}"),
    )
}

type Reply = (Answer, After);

impl Machine {
    /// `PATCH /vm`.
    pub(crate) fn patch_vm(&mut self, body: &[u8]) -> Result<Reply, Answer> {
        let v: Vm = parse(body)?;
        if !self.started {
            return Err(Answer::fault(400, PRE_BOOT));
        }
        if crate::tcg::active() {
            let r = match v.state {
                VmState::Paused => crate::tcg::pause(),
                _ => crate::tcg::resume(self),
            };
            r.map_err(|e| tcg_fault("Failed to change the microVM state", e))?;
        }
        // Pausing a paused VM (or resuming a running one) succeeds, as in Firecracker.
        self.paused = v.state == VmState::Paused;
        Ok((Answer::no_content(), After::Nothing))
    }

    /// `PATCH /drives/{id}`: a new backing file for a drive, post-boot.
    pub(crate) fn patch_drive(&mut self, path_id: &str, body: &[u8]) -> Result<Reply, Answer> {
        let d: PartialDrive = parse(body)?;
        if d.drive_id != path_id {
            return Err(Answer::fault(
                400,
                "The id from the path does not match the id from the body!",
            ));
        }
        if !self.started {
            return Err(Answer::fault(400, PRE_BOOT));
        }
        if crate::tcg::active() && !self.paused {
            // QEMU cannot switch a running guest's drive file: the engine opens the recorded
            // path when a loaded snapshot resumes, and refuses a resume onto another file.
            return Err(Answer::fault(
                400,
                "Drive config error: the stand-in's TCG engine re-points drives only while the microVM is paused",
            ));
        }
        let Some(drive) = self.drives.iter_mut().find(|o| o.drive_id == d.drive_id) else {
            return Err(Answer::fault(
                400,
                format!(
                    "Drive config error: Unable to patch the block device: Invalid block device ID: {}",
                    d.drive_id
                ),
            ));
        };
        if let Some(p) = &d.path_on_host {
            let opened = std::fs::OpenOptions::new()
                .read(true)
                .write(!drive.is_read_only.unwrap_or(false))
                .open(p);
            if let Err(e) = opened {
                return Err(Answer::fault(
                    400,
                    format!(
                        "Drive config error: Unable to patch the block device: Error manipulating the backing file: {e} {}",
                        p.display()
                    ),
                ));
            }
            drive.path_on_host = Some(p.clone());
        }
        if d.rate_limiter.is_some() {
            drive.rate_limiter = d.rate_limiter;
        }
        Ok((Answer::no_content(), After::Nothing))
    }

    /// `PUT /snapshot/create`: Paused only; the vmstate and a sparse memory file.
    pub(crate) fn create_snapshot(&mut self, body: &[u8]) -> Result<Reply, Answer> {
        let c: SnapshotCreateParams = parse(body)?;
        if !self.started {
            return Err(Answer::fault(400, PRE_BOOT));
        }
        let tcg = crate::tcg::active();
        if !self.paused {
            return Err(Answer::fault(
                400,
                "Create snapshot error: Cannot save the microVM state: Operation not allowed: save/restore unavailable while running",
            ));
        }
        if c.snapshot_type == Some(SnapshotType::Diff) {
            return Err(Answer::fault(
                400,
                "Diff snapshots are valid Firecracker API but not served by the banger stand-in VMM",
            ));
        }
        let state = VmStateFile {
            standin_vmstate: VMSTATE_VERSION,
            firecracker_version: VERSION.into(),
            engine: if tcg { "tcg" } else { "tiny" }.into(),
            machine: SavedMachine {
                boot_source: self.boot_source.clone(),
                machine: self.machine.clone(),
                drives: self.drives.clone(),
                nets: self.nets.iter().map(|(n, _)| n.clone()).collect(),
                vsock: self.vsock.as_ref().map(|(v, _)| v.clone()),
            },
            boot_id: self.boot_id.clone(),
            instance_id: match &self.agent_instance {
                Some(live) => live.lock().ok().map(|v| v.clone()),
                None => self.instance_id.clone(),
            },
        };
        let mem = if tcg {
            crate::tcg::save(&c.mem_file_path).map_err(std::io::Error::other)
        } else {
            std::fs::File::create(&c.mem_file_path)
                .and_then(|f| f.set_len(self.machine.mem_size_mib << 20))
        };
        if let Err(e) = mem {
            return Err(Answer::fault(
                400,
                format!("Create snapshot error: Cannot write memory file: {e}"),
            ));
        }
        let json = serde_json::to_vec(&state).unwrap_or_default();
        if let Err(e) = std::fs::write(&c.snapshot_path, json) {
            return Err(Answer::fault(
                400,
                format!(
                    "Create snapshot error: Cannot perform open on the snapshot backing file: {e}"
                ),
            ));
        }
        Ok((Answer::no_content(), After::Nothing))
    }

    /// `PUT /snapshot/load`. Any failure past the body checks ends the process (as Firecracker's).
    pub(crate) fn load_snapshot(&mut self, body: &[u8]) -> Result<Reply, Answer> {
        let l: SnapshotLoadParams = parse(body)?;
        let mem = l.memory().map_err(|m| {
            Answer::fault(
                400,
                format!("An error occurred when deserializing the json body of a request: {m}"),
            )
        })?;
        if self.started {
            return Err(Answer::fault(400, POST_BOOT));
        }
        if self.boot_path {
            return Err(Answer::fault(
                400,
                "Load snapshot error: Loading a microVM snapshot not allowed after configuring boot-specific resources.",
            ));
        }
        // From here on a failure is fatal to the process, as in Firecracker.
        let fatal = |a: Answer| Ok((a, After::ExitFailed));
        if mem.backend_type == MemoryBackendType::Uffd {
            return fatal(load_error(
                "Failed to load guest memory: Uffd memory backends are not served by the banger stand-in VMM",
            ));
        }
        let raw = match std::fs::read(&l.snapshot_path) {
            Ok(r) => r,
            Err(e) => {
                return fatal(load_error(format!(
                    "Failed to get snapshot state from file: Failed to open snapshot file: {e}"
                )))
            }
        };
        let state: VmStateFile = match serde_json::from_slice(&raw) {
            Ok(s) => s,
            Err(e) => {
                return fatal(load_error(format!(
                    "Failed to get snapshot state from file: Failed to load snapshot state from file: {e}"
                )))
            }
        };
        if state.standin_vmstate != VMSTATE_VERSION || state.firecracker_version != VERSION {
            return fatal(load_error(format!(
                "Invalid snapshot state: the snapshot was written by Firecracker {} (vmstate {}), this is Firecracker {VERSION}",
                state.firecracker_version, state.standin_vmstate
            )));
        }
        let tcg = match state.engine.as_str() {
            "tiny" => false,
            "tcg" => true,
            other => {
                return fatal(load_error(format!(
                    "Invalid snapshot state: unknown stand-in engine {other:?}"
                )))
            }
        };
        let want = state.machine.machine.mem_size_mib << 20;
        match std::fs::metadata(&mem.backend_path) {
            // A TCG memory file is QEMU's stream (checked by the engine), not a memory image.
            Ok(_) if tcg => {}
            Ok(m) if m.len() == want => {}
            Ok(m) => {
                return fatal(load_error(format!(
                    "Failed to load guest memory: Error creating guest memory from file: the memory file is {} bytes, the snapshot's memory is {want}",
                    m.len()
                )))
            }
            Err(e) => {
                return fatal(load_error(format!(
                    "Failed to load guest memory: Error creating guest memory from file: {e}"
                )))
            }
        }
        let overrides = l.network_overrides.clone().unwrap_or_default();
        for o in &overrides {
            if !state.machine.nets.iter().any(|n| n.iface_id == o.iface_id) {
                return fatal(load_error(
                    "Failed to get snapshot state from file: Unknown Network Device.",
                ));
            }
        }
        for d in &state.machine.drives {
            let Some(p) = &d.path_on_host else { continue };
            let opened = std::fs::OpenOptions::new()
                .read(true)
                .write(!d.is_read_only.unwrap_or(false))
                .open(p);
            if let Err(e) = opened {
                return fatal(load_error(format!(
                    "Failed to build microVM from snapshot: Failed to restore devices: Error restoring MMIO devices: Block: Virtio backend error: Error manipulating the backing file: {e} {}",
                    p.display()
                )));
            }
        }
        let mut nets = Vec::new();
        for n in &state.machine.nets {
            let mut n = n.clone();
            if let Some(o) = overrides.iter().find(|o| o.iface_id == n.iface_id) {
                n.host_dev_name = o.host_dev_name.clone();
            }
            match Tap::open_named(&n.host_dev_name) {
                Ok(t) => nets.push((n, t)),
                Err(e) => {
                    return fatal(load_error(format!(
                        "Failed to build microVM from snapshot: Failed to restore devices: Error restoring MMIO devices: Net: {}",
                        e.net_error()
                    )))
                }
            }
        }
        let mut vsock = None;
        if let Some(v) = &state.machine.vsock {
            let mut v = v.clone();
            if let Some(o) = &l.vsock_override {
                v.uds_path = o.uds_path.clone();
            }
            match UnixListener::bind(&v.uds_path) {
                Ok(listener) => vsock = Some((v, listener)),
                Err(e) => {
                    return fatal(load_error(format!(
                        "Failed to build microVM from snapshot: Failed to restore devices: Error restoring MMIO devices: Vsock: Error binding to the host-side Unix socket {}: {e}",
                        v.uds_path.display()
                    )))
                }
            }
        }
        self.boot_source = state.machine.boot_source;
        self.machine = state.machine.machine;
        self.drives = state.machine.drives;
        self.nets = nets;
        self.vsock = vsock;
        self.boot_id = state.boot_id;
        self.instance_id = state.instance_id;
        self.started = true;
        self.paused = !l.resume_vm.unwrap_or(false);
        if tcg {
            let r = crate::tcg::restore(
                self,
                &mem.backend_path,
                l.resume_vm.unwrap_or(false),
                |code| crate::server::exit_clean(code),
            );
            if let Err(e) = r {
                return fatal(load_error(format!(
                    "Failed to restore the microVM with the stand-in's TCG engine: {e}"
                )));
            }
        }
        Ok((Answer::no_content(), After::Restored))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testdir::tmp;
    use serde_json::{json, Value};
    use std::path::Path;

    fn call(m: &mut Machine, method: &str, path: &str, body: Value) -> (u16, String, After) {
        let (a, after) = m.handle(method, path, body.to_string().as_bytes());
        let msg = a
            .body
            .and_then(|b| serde_json::from_str::<Value>(&b).ok())
            .and_then(|v| v["fault_message"].as_str().map(String::from))
            .unwrap_or_default();
        (a.status, msg, after)
    }

    fn state(m: &mut Machine) -> String {
        let (a, _) = m.handle("GET", "/", b"");
        let v: Value = serde_json::from_str(&a.body.unwrap()).unwrap();
        v["state"].as_str().unwrap().to_string()
    }

    /// A booted machine with a kernel, a root drive and vsock in `dir`.
    fn booted(dir: &Path) -> Machine {
        let k = dir.join("vmlinux");
        let mut kernel = b"\x7fELF\x02\x01\x01".to_vec();
        kernel.resize(128, 0);
        std::fs::write(&k, kernel).unwrap();
        let disk = dir.join("disk.ext4");
        std::fs::write(&disk, b"disk").unwrap();
        let mut m = Machine::new("src");
        for (path, body) in [
            (
                "/machine-config",
                json!({"vcpu_count": 1, "mem_size_mib": 64}),
            ),
            ("/boot-source", json!({"kernel_image_path": k})),
            (
                "/drives/rootfs",
                json!({"drive_id": "rootfs", "is_root_device": true, "path_on_host": disk}),
            ),
            (
                "/vsock",
                json!({"guest_cid": 3, "uds_path": dir.join("src.vsock")}),
            ),
            ("/actions", json!({"action_type": "InstanceStart"})),
        ] {
            let (status, msg, _) = call(&mut m, "PUT", path, body);
            assert_eq!(status, 204, "{path}: {msg}");
        }
        m.boot_id = Some("0123-boot".into());
        m
    }

    fn load_body(dir: &Path, extra: Value) -> Value {
        let mut b = json!({
            "snapshot_path": dir.join("vmstate"),
            "mem_backend": {"backend_type": "File", "backend_path": dir.join("mem")},
        });
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b
    }

    #[test]
    fn create_rules() {
        let t = tmp("snap-create");
        let (vmstate, mem) = (t.0.join("vmstate"), t.0.join("mem"));
        let create =
            json!({"snapshot_type": "Full", "snapshot_path": vmstate, "mem_file_path": mem});
        let mut fresh = Machine::new("x");
        for (method, path, body) in [
            ("PATCH", "/vm", json!({"state": "Paused"})),
            ("PUT", "/snapshot/create", create.clone()),
            (
                "PATCH",
                "/drives/rootfs",
                json!({"drive_id": "rootfs", "path_on_host": mem}),
            ),
        ] {
            let (status, msg, _) = call(&mut fresh, method, path, body);
            assert_eq!((status, msg.as_str()), (400, PRE_BOOT), "{method} {path}");
        }
        let mut m = booted(&t.0);
        let cases: Vec<(&str, &str, Value, &str)> = vec![
            (
                "PUT",
                "/vm",
                json!({"state": "Paused"}),
                "Invalid request method and/or path",
            ),
            (
                "PATCH",
                "/vm",
                json!({"state": "Bogus"}),
                "unknown variant `Bogus`",
            ),
            ("PATCH", "/vm", json!({}), "missing field `state`"),
            (
                "PUT",
                "/snapshot/create",
                create.clone(),
                "save/restore unavailable while running",
            ),
            (
                "PUT",
                "/snapshot/create",
                json!({"snapshot_path": vmstate}),
                "missing field `mem_file_path`",
            ),
            (
                "PATCH",
                "/drives/rootfs",
                json!({"drive_id": "other"}),
                "does not match",
            ),
            (
                "PATCH",
                "/drives/nodrive",
                json!({"drive_id": "nodrive", "path_on_host": mem}),
                "Invalid block device ID",
            ),
            (
                "PATCH",
                "/drives/rootfs",
                json!({"drive_id": "rootfs", "path_on_host": "/nonexistent/d"}),
                "Error manipulating the backing file",
            ),
        ];
        for (method, path, body, want) in cases {
            let (status, msg, after) = call(&mut m, method, path, body.clone());
            assert_eq!(status, 400, "{method} {path} {body}");
            assert!(
                msg.contains(want),
                "{method} {path} {body}: {msg:?} lacks {want:?}"
            );
            assert_eq!(after, After::Nothing);
        }
        assert!(!vmstate.exists() && !mem.exists(), "refusals wrote nothing");
        assert_eq!(state(&mut m), "Running");
        assert_eq!(
            call(&mut m, "PATCH", "/vm", json!({"state": "Paused"})).0,
            204
        );
        assert_eq!(
            call(&mut m, "PATCH", "/vm", json!({"state": "Paused"})).0,
            204
        );
        assert_eq!(state(&mut m), "Paused");
        let (status, msg, _) = call(&mut m, "PUT", "/snapshot/create", create);
        assert_eq!(status, 204, "{msg}");
        let v: VmStateFile = serde_json::from_slice(&std::fs::read(&vmstate).unwrap()).unwrap();
        assert_eq!(v.firecracker_version, VERSION);
        assert_eq!(v.boot_id.as_deref(), Some("0123-boot"));
        assert_eq!(
            v.machine.drives[0].path_on_host,
            Some(t.0.join("disk.ext4"))
        );
        let meta = std::fs::metadata(&mem).unwrap();
        assert_eq!(meta.len(), 64 << 20);
        use std::os::unix::fs::MetadataExt;
        assert!(meta.blocks() * 512 < 1 << 20, "the memory file is sparse");
        assert_eq!(
            call(&mut m, "PATCH", "/vm", json!({"state": "Resumed"})).0,
            204
        );
        assert_eq!(state(&mut m), "Running");
    }

    #[test]
    fn load_rules() {
        let t = tmp("snap-load");
        let dir = &t.0;
        let mut src = booted(dir);
        assert_eq!(
            call(&mut src, "PATCH", "/vm", json!({"state": "Paused"})).0,
            204
        );
        let create =
            json!({"snapshot_path": dir.join("vmstate"), "mem_file_path": dir.join("mem")});
        assert_eq!(call(&mut src, "PUT", "/snapshot/create", create).0, 204);
        drop(src);
        let _ = std::fs::remove_file(dir.join("src.vsock"));

        // Body checks: answered, nothing else happens.
        let mut m = Machine::new("c");
        for (body, want) in [
            (
                json!({"snapshot_path": dir.join("vmstate")}),
                "either `mem_backend` or `mem_file_path` is required",
            ),
            (
                load_body(dir, json!({"mem_file_path": dir.join("mem")})),
                "exclusively is required",
            ),
            (load_body(dir, json!({"bogus": 1})), "unknown field `bogus`"),
        ] {
            let (status, msg, after) = call(&mut m, "PUT", "/snapshot/load", body.clone());
            assert_eq!(status, 400, "{body}");
            assert!(msg.contains(want), "{body}: {msg:?} lacks {want:?}");
            assert_eq!(after, After::Nothing);
        }
        // Only before any boot-specific configuration.
        let mut configured = Machine::new("c");
        assert_eq!(
            call(
                &mut configured,
                "PUT",
                "/machine-config",
                json!({"vcpu_count": 1, "mem_size_mib": 64})
            )
            .0,
            204
        );
        let (status, msg, after) = call(
            &mut configured,
            "PUT",
            "/snapshot/load",
            load_body(dir, json!({})),
        );
        assert_eq!(status, 400);
        assert!(
            msg.contains("not allowed after configuring boot-specific resources"),
            "{msg}"
        );
        assert_eq!(after, After::Nothing);

        // Failures past the checks end the process (ExitFailed), as Firecracker's do.
        let mut wrong_version: Value =
            serde_json::from_slice(&std::fs::read(dir.join("vmstate")).unwrap()).unwrap();
        wrong_version["firecracker_version"] = json!("1.15.0");
        std::fs::write(dir.join("old-vmstate"), wrong_version.to_string()).unwrap();
        std::fs::write(dir.join("small-mem"), b"x").unwrap();
        let fatal: Vec<(Value, &str)> = vec![
            (
                json!({"snapshot_path": dir.join("nope"), "mem_file_path": dir.join("mem")}),
                "Failed to open snapshot file",
            ),
            (
                json!({"snapshot_path": dir.join("old-vmstate"), "mem_file_path": dir.join("mem")}),
                "written by Firecracker 1.15.0",
            ),
            (
                json!({"snapshot_path": dir.join("vmstate"), "mem_file_path": dir.join("small-mem")}),
                "Failed to load guest memory",
            ),
            (
                load_body(
                    dir,
                    json!({"network_overrides": [{"iface_id": "eth0", "host_dev_name": "bgr-x"}]}),
                ),
                "Unknown Network Device.",
            ),
            (
                load_body(
                    dir,
                    json!({"mem_backend": {"backend_type": "Uffd", "backend_path": dir.join("mem")}}),
                ),
                "Uffd",
            ),
        ];
        for (body, want) in fatal {
            let mut m = Machine::new("c");
            let (status, msg, after) = call(&mut m, "PUT", "/snapshot/load", body.clone());
            assert_eq!(status, 400, "{body}");
            assert!(msg.contains(want), "{body}: {msg:?} lacks {want:?}");
            assert_eq!(after, After::ExitFailed, "{body}");
            assert!(!m.started);
        }
        // The recorded drive must exist.
        std::fs::rename(dir.join("disk.ext4"), dir.join("moved.ext4")).unwrap();
        let mut m = Machine::new("c");
        let (_, msg, after) = call(&mut m, "PUT", "/snapshot/load", load_body(dir, json!({})));
        assert!(msg.contains("Error manipulating the backing file"), "{msg}");
        assert_eq!(after, After::ExitFailed);
        std::fs::rename(dir.join("moved.ext4"), dir.join("disk.ext4")).unwrap();

        // A good load: overridden vsock, paused without resume_vm; then drive re-point and resume.
        let mut m = Machine::new("c");
        let body = load_body(
            dir,
            json!({"vsock_override": {"uds_path": dir.join("c.vsock")}}),
        );
        let (status, msg, after) = call(&mut m, "PUT", "/snapshot/load", body.clone());
        assert_eq!((status, msg.as_str(), after), (204, "", After::Restored));
        assert!(dir.join("c.vsock").exists() && !dir.join("src.vsock").exists());
        assert_eq!(m.boot_id.as_deref(), Some("0123-boot"));
        assert_eq!(state(&mut m), "Paused");
        std::fs::write(dir.join("clone.ext4"), b"clone").unwrap();
        let patch = json!({"drive_id": "rootfs", "path_on_host": dir.join("clone.ext4")});
        assert_eq!(call(&mut m, "PATCH", "/drives/rootfs", patch).0, 204);
        assert_eq!(m.drives[0].path_on_host, Some(dir.join("clone.ext4")));
        assert_eq!(
            call(&mut m, "PATCH", "/vm", json!({"state": "Resumed"})).0,
            204
        );
        assert_eq!(state(&mut m), "Running");
        let (status, msg, after) = call(&mut m, "PUT", "/snapshot/load", body);
        assert_eq!(
            (status, msg.as_str(), after),
            (400, POST_BOOT, After::Nothing)
        );
        assert_eq!(
            call(
                &mut m,
                "PUT",
                "/machine-config",
                json!({"vcpu_count": 1, "mem_size_mib": 64})
            )
            .1,
            POST_BOOT
        );

        let mut r = Machine::new("d");
        let body = load_body(
            dir,
            json!({"resume_vm": true, "vsock_override": {"uds_path": dir.join("d.vsock")}}),
        );
        assert_eq!(call(&mut r, "PUT", "/snapshot/load", body).0, 204);
        assert_eq!(state(&mut r), "Running");
    }
}
