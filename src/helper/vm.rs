//! The helper's VMM methods: `priv.vm_launch`, `priv.vm_signal`, `priv.vm_cleanup`.
//!
//! Owns the root side of a VM's process life. It must never take a program, a path or a pid from
//! the caller: the VMM binary comes from the helper's own environment ([`FIRECRACKER_ENV`]), every
//! path is derived from `Layout::vm_dir(id)` of a validated id, and the pid to signal comes from
//! that VM's `handles.json` and is re-verified as one of banger's own VMMs (comm, `--id <id>`,
//! owner uid, start time) right before delivery. It never forwards a signal it was not asked for.
//!
//! Socket ownership: the helper runs as root but starts the VMM as the owner user ([`VmConfig`]'s
//! `run_as`: owner uid/gid from install.toml plus the group of `/dev/kvm`), so the API socket and
//! the vsock socket Firecracker creates belong to the owner and the daemon can connect to both —
//! including the vsock socket, which only appears later when the daemon configures the device.
//! The owner therefore needs `/dev/kvm` through its group (`banger doctor` should check); a
//! jailer mode later would do the same id drop plus a chroot.

use crate::helper::validate;
use crate::layout::Layout;
use crate::rpc::{ErrorCode, RpcError};
use crate::vmm::identity::{self, Handles, Liveness, VmmExpect, HANDLES_VERSION};
use crate::vmm::launch::{self, LaunchSpec, RunAs, VmFiles};
use serde_json::{json, Map, Value};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Environment variable naming the Firecracker binary, read once when the helper starts.
pub const FIRECRACKER_ENV: &str = "BANGER_FIRECRACKER";
/// The Firecracker binary when [`FIRECRACKER_ENV`] is unset.
pub const DEFAULT_FIRECRACKER: &str = "/usr/local/bin/firecracker";
/// The only value `priv.vm_launch`'s optional `vmm` argument accepts today (a jailer may follow).
pub const VMM_KINDS: [&str; 1] = ["firecracker"];

/// How the helper launches and recognises VMMs: all from its own environment, none from callers.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// The VMM executable.
    pub vmm_binary: PathBuf,
    /// Start each VMM in its own transient systemd scope.
    pub use_scope: bool,
    /// Run VMMs as this user (the owner) instead of the helper's own user.
    pub run_as: Option<RunAs>,
    /// Where `/proc` is.
    pub proc_root: PathBuf,
    /// Bound on a VMM's start.
    pub start_timeout: Duration,
}

impl VmConfig {
    /// The production configuration: [`FIRECRACKER_ENV`] (absolute) or [`DEFAULT_FIRECRACKER`];
    /// a scope when systemd runs; VMMs as the owner of install.toml when the helper is root.
    pub fn from_env(layout: &Layout) -> Self {
        let vmm_binary = match std::env::var_os(FIRECRACKER_ENV) {
            Some(v) if Path::new(&v).is_absolute() => PathBuf::from(v),
            Some(v) if !v.is_empty() => {
                crate::logging::error(
                    "bangerd-root",
                    "ignoring a relative BANGER_FIRECRACKER",
                    json!({"value": v.to_string_lossy(), "using": DEFAULT_FIRECRACKER}),
                );
                PathBuf::from(DEFAULT_FIRECRACKER)
            }
            _ => PathBuf::from(DEFAULT_FIRECRACKER),
        };
        let owner = match crate::system::install_toml::load(layout) {
            Ok(Some(i)) => Some((i.owner_uid, i.owner_gid)),
            _ => None,
        };
        let run_as = match owner {
            Some((uid, gid)) if rustix::process::geteuid().is_root() && uid != 0 => {
                let mut groups = vec![gid];
                // /dev/kvm is the kernel's device node, not a banger path.
                if let Ok(m) = std::fs::metadata("/dev/kvm") {
                    if m.gid() != 0 && m.gid() != gid {
                        groups.push(m.gid());
                    }
                }
                Some(RunAs { uid, gid, groups })
            }
            _ => None,
        };
        VmConfig {
            vmm_binary,
            use_scope: launch::systemd_running(),
            run_as,
            proc_root: PathBuf::from("/proc"),
            start_timeout: launch::START_TIMEOUT,
        }
    }

    /// The uid banger's VMMs run as: the owner, or the helper's own uid.
    pub fn vmm_uid(&self) -> u32 {
        self.run_as
            .as_ref()
            .map(|r| r.uid)
            .unwrap_or_else(|| rustix::process::geteuid().as_raw())
    }
}

fn params_of<'a>(params: &'a Value, allowed: &[&str]) -> Result<&'a Map<String, Value>, RpcError> {
    validate::only_params(params, allowed)?
        .ok_or_else(|| RpcError::bad_request(format!("missing arguments: {}", allowed.join(", "))))
}

fn str_arg<'a>(m: &'a Map<String, Value>, key: &str) -> Result<Option<&'a str>, RpcError> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(RpcError::bad_request(format!("`{key}` must be a string"))),
    }
}

fn vm_id_arg(m: &Map<String, Value>) -> Result<String, RpcError> {
    let id = str_arg(m, "id")?.ok_or_else(|| RpcError::bad_request("missing `id`"))?;
    Ok(validate::vm_id(id)?.to_string())
}

fn failed(e: crate::error::Error) -> RpcError {
    RpcError::from(e)
}

/// `priv.vm_launch { id, vmm?, boot_id? }`: starts VM `id`'s VMM detached, writes
/// `vms/<id>/handles.json` and returns it (with `steps`: how long each step took). The VM
/// directory must exist (the daemon creates it). `boot_id` is recorded as the guest's when the
/// daemon already knows it (a restore: the snapshot's), so the record needs no second write.
pub fn vm_launch(layout: &Layout, cfg: &VmConfig, params: &Value) -> Result<Value, RpcError> {
    let m = params_of(params, &["id", "vmm", "boot_id"])?;
    let id = vm_id_arg(m)?;
    let boot_id = str_arg(m, "boot_id")?
        .map(|b| {
            let ok = !b.is_empty()
                && b.len() <= 64
                && b.bytes().all(|c| c.is_ascii_hexdigit() || c == b'-');
            ok.then(|| b.to_string()).ok_or_else(|| {
                RpcError::bad_request("`boot_id` must be 1-64 hex digits and dashes")
            })
        })
        .transpose()?;
    if let Some(v) = str_arg(m, "vmm")? {
        if !VMM_KINDS.contains(&v) {
            return Err(RpcError::bad_request(format!(
                "vmm `{v}` is not allowed (allowed: {})",
                VMM_KINDS.join(", ")
            )));
        }
    }
    let dir = layout.vm_dir(&id);
    let files = VmFiles::in_dir(&dir);
    let meta = std::fs::symlink_metadata(&dir).map_err(|_| {
        RpcError::new(
            ErrorCode::NotFound,
            format!(
                "VM directory {} does not exist (bangerd creates it before a launch)",
                dir.display()
            ),
        )
    })?;
    if !meta.is_dir() {
        return Err(RpcError::bad_request(format!(
            "{} is not a directory",
            dir.display()
        )));
    }
    if let Some(r) = &cfg.run_as {
        if meta.uid() != r.uid {
            return Err(RpcError::bad_request(format!(
                "{} belongs to uid {}, not to banger's owner (uid {})",
                dir.display(),
                meta.uid(),
                r.uid
            )));
        }
    }
    // One VMM per VM: refuse while the record names a live (or unverifiable) VMM. A missing or
    // garbled record does not block; launch() still refuses if the API socket answers.
    if let Ok(Some(h)) = identity::read_handles(&files.handles) {
        match identity::classify(&h.identity, &cfg.proc_root) {
            Liveness::Gone(_) => {}
            Liveness::Alive => {
                return Err(RpcError::new(
                    ErrorCode::AlreadyExists,
                    format!("VM {id} already has a running VMM (pid {})", h.identity.pid),
                ))
            }
            Liveness::Unsure(why) => {
                return Err(RpcError::new(
                    ErrorCode::Busy,
                    format!("VM {id}: cannot tell whether its last VMM still runs: {why}"),
                ))
            }
        }
    }
    let spec = LaunchSpec {
        use_scope: cfg.use_scope,
        run_as: cfg.run_as.clone(),
        start_timeout: cfg.start_timeout,
        proc_root: cfg.proc_root.clone(),
        ..LaunchSpec::firecracker(&id, &cfg.vmm_binary, &files)
    };
    let mut steps = launch::Steps::new();
    let ident = launch::launch_timed(&spec, &mut steps).map_err(failed)?;
    let handles = Handles {
        version: HANDLES_VERSION,
        vm_id: id.clone(),
        identity: ident.clone(),
        api_socket: files.api_socket.clone(),
        vsock_uds: files.vsock_uds.clone(),
        console_log: files.console_log.clone(),
        pidfile: files.pidfile.clone(),
        scope: cfg.use_scope.then(|| launch::scope_unit(&id)),
        boot_id,
        launched_at: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    };
    let owner = cfg.run_as.as_ref().map(|r| (r.uid, r.gid));
    let t = std::time::Instant::now();
    let written = identity::write_handles(&files.handles, &handles, owner);
    steps.push(("writing handles.json", t.elapsed()));
    if let Err(e) = written {
        // Without a record nobody could find this VMM again: take it back down while we still
        // know exactly who it is.
        let _ = launch::signal(&ident, rustix::process::Signal::Kill, &cfg.proc_root);
        return Err(failed(e));
    }
    crate::logging::info(
        "bangerd-root",
        "vmm launched",
        json!({"vm": id, "pid": ident.pid, "start_time": ident.start_time, "scope": handles.scope}),
    );
    let mut out = serde_json::to_value(&handles)
        .map_err(|e| RpcError::new(ErrorCode::OperationFailed, e.to_string()))?;
    // How long each step took, for the daemon's operation timings (not part of the record).
    out["steps"] = steps
        .iter()
        .map(|(name, d)| json!({"step": name, "ms": d.as_secs_f64() * 1000.0}))
        .collect();
    Ok(out)
}

/// `priv.vm_signal { id, signal }`: delivers one of the allowed signals to VM `id`'s VMM, named by
/// its `handles.json` and re-verified as banger's own VMM for that VM.
pub fn vm_signal(layout: &Layout, cfg: &VmConfig, params: &Value) -> Result<Value, RpcError> {
    let m = params_of(params, &["id", "signal"])?;
    let id = vm_id_arg(m)?;
    let sig_name =
        str_arg(m, "signal")?.ok_or_else(|| RpcError::bad_request("missing `signal`"))?;
    let sig = validate::signal(sig_name)?;
    let files = VmFiles::in_dir(&layout.vm_dir(&id));
    let h = identity::read_handles(&files.handles)
        .map_err(failed)?
        .ok_or_else(|| {
            RpcError::new(
                ErrorCode::NotFound,
                format!(
                    "VM {id} has no VMM record ({} is missing)",
                    files.handles.display()
                ),
            )
        })?;
    let comm = identity::comm_for(&cfg.vmm_binary);
    let expect = VmmExpect {
        comm: &comm,
        vm_id: &id,
        uid: Some(cfg.vmm_uid()),
    };
    if let Err(why) = identity::check_banger_vmm(&h.identity, &expect, &cfg.proc_root) {
        return Err(RpcError::bad_request(format!(
            "refusing to signal pid {}: it is not banger's running VMM for VM {id} ({why})",
            h.identity.pid
        )));
    }
    launch::signal(&h.identity, sig, &cfg.proc_root).map_err(failed)?;
    crate::logging::info(
        "bangerd-root",
        "vmm signalled",
        json!({"vm": id, "pid": h.identity.pid, "signal": sig_name}),
    );
    Ok(json!({"pid": h.identity.pid, "signal": sig_name.trim_start_matches("SIG")}))
}

/// `priv.vm_cleanup { id }`: removes a stopped VM's sockets and pidfile; refuses while its VMM runs.
pub fn vm_cleanup(layout: &Layout, cfg: &VmConfig, params: &Value) -> Result<Value, RpcError> {
    let m = params_of(params, &["id"])?;
    let id = vm_id_arg(m)?;
    let removed = launch::cleanup(&layout.vm_dir(&id), &cfg.proc_root).map_err(failed)?;
    Ok(json!({"removed": removed}))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::system::testutil::TempDir;
    use std::time::Instant;

    fn cfg(vmm: &Path) -> VmConfig {
        VmConfig {
            vmm_binary: vmm.to_path_buf(),
            use_scope: false,
            run_as: None,
            proc_root: PathBuf::from("/proc"),
            start_timeout: Duration::from_secs(10),
        }
    }

    #[test]
    fn arguments_are_allow_listed() {
        let t = TempDir::new();
        let l = Layout::under(t.path());
        let c = cfg(Path::new("/nonexistent/firecracker"));
        let refused = [
            ("launch", json!(null)),
            ("launch", json!({})),
            ("launch", json!({"id": "../etc"})),
            ("launch", json!({"id": "a", "vmm": "/bin/sh"})),
            ("launch", json!({"id": "a", "cmd": "rm -rf /"})),
            ("launch", json!({"id": "a", "api_socket": "/tmp/x"})),
            ("launch", json!({"id": 7})),
            ("launch", json!({"id": "a", "boot_id": "../x"})),
            ("launch", json!({"id": "a", "boot_id": ""})),
            ("launch", json!({"id": "a", "boot_id": 5})),
            ("signal", json!({"id": "a", "signal": "STOP"})),
            ("signal", json!({"id": "a", "signal": "TERM", "pid": 1})),
            ("signal", json!({"id": "a"})),
            ("cleanup", json!({"id": "a/b"})),
            ("cleanup", json!({"id": "a", "path": "/"})),
        ];
        for (m, p) in refused {
            let r = match m {
                "launch" => vm_launch(&l, &c, &p),
                "signal" => vm_signal(&l, &c, &p),
                _ => vm_cleanup(&l, &c, &p),
            };
            let e = r.expect_err(&format!("{m} {p}"));
            assert_eq!(e.code, ErrorCode::BadRequest, "{m} {p}: {e}");
        }
        // Well-formed but nothing there.
        let e = vm_launch(&l, &c, &json!({"id": "a", "vmm": "firecracker"})).unwrap_err();
        assert_eq!(e.code, ErrorCode::NotFound, "{e}");
        let e = vm_signal(&l, &c, &json!({"id": "a", "signal": "SIGTERM"})).unwrap_err();
        assert_eq!(e.code, ErrorCode::NotFound, "{e}");
        assert_eq!(
            vm_cleanup(&l, &c, &json!({"id": "a"})).expect("nothing to clean"),
            json!({"removed": []})
        );
    }

    /// A stand-in `firecracker`: a shell script (comm = its file name) that binds the API socket
    /// it is given and stays up until TERM. Needs python3 for the Unix socket.
    fn fake_firecracker(dir: &Path) -> Option<PathBuf> {
        let py = ["/usr/bin/python3", "/usr/local/bin/python3"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.exists())?;
        let script = dir.join("firecracker");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\n\
                 echo \"fake firecracker $*\"\n\
                 {} -c 'import socket,sys,time; s=socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen(1); time.sleep(120)' \"$2\" &\n\
                 trap 'kill $!; wait $!; exit 0' TERM\n\
                 wait\n",
                py.display()
            ),
        )
        .ok()?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).ok()?;
        Some(script)
    }

    #[test]
    fn launch_signal_cleanup_through_the_helper() {
        let t = TempDir::new();
        let Some(vmm) = fake_firecracker(t.path()) else {
            eprintln!(
                "SKIP launch_signal_cleanup_through_the_helper: no python3 for the stand-in VMM"
            );
            return;
        };
        let l = Layout::under(t.path().join("root"));
        let c = cfg(&vmm);
        let dir = l.vm_dir("vm-1");
        std::fs::create_dir_all(&dir).expect("mkdir");
        let h: Handles =
            serde_json::from_value(vm_launch(&l, &c, &json!({"id": "vm-1"})).expect("launch"))
                .expect("handles json");
        assert_eq!(h.identity.comm, "firecracker");
        assert_eq!(h.api_socket, dir.join("fc.sock"));
        assert!(h.api_socket.exists());
        assert_eq!(
            identity::read_handles(&dir.join("handles.json")).expect("read"),
            Some(h.clone())
        );
        let log = std::fs::read_to_string(dir.join("console.log")).expect("console");
        assert!(log.contains("--id vm-1"), "{log}");

        // A second launch of the same VM is refused while the first runs.
        let e = vm_launch(&l, &c, &json!({"id": "vm-1"})).unwrap_err();
        assert_eq!(e.code, ErrorCode::AlreadyExists, "{e}");
        // Cleanup refuses too.
        assert!(vm_cleanup(&l, &c, &json!({"id": "vm-1"})).is_err());

        // A record pointing at a process that is not this VM's VMM is refused: our own test
        // process (right start time, wrong comm), and the real VMM under another VM's id.
        let other = l.vm_dir("vm-2");
        std::fs::create_dir_all(&other).expect("mkdir");
        let me =
            identity::read_identity(Path::new("/proc"), std::process::id() as i32).expect("me");
        let mut forged = h.clone();
        forged.identity = me;
        identity::write_handles(&other.join("handles.json"), &forged, None).expect("write");
        let e = vm_signal(&l, &c, &json!({"id": "vm-2", "signal": "KILL"})).unwrap_err();
        assert!(e.message.contains("refusing"), "{e}");
        identity::write_handles(&other.join("handles.json"), &h, None).expect("write");
        let e = vm_signal(&l, &c, &json!({"id": "vm-2", "signal": "KILL"})).unwrap_err();
        assert!(e.message.contains("not serving VM `vm-2`"), "{e}");

        let r = vm_signal(&l, &c, &json!({"id": "vm-1", "signal": "SIGTERM"})).expect("signal");
        assert_eq!(r, json!({"pid": h.identity.pid, "signal": "TERM"}));
        let deadline = Instant::now() + Duration::from_secs(10);
        while identity::classify(&h.identity, &c.proc_root) == Liveness::Alive {
            assert!(Instant::now() < deadline, "VMM did not stop");
            std::thread::sleep(Duration::from_millis(10));
        }
        let e = vm_signal(&l, &c, &json!({"id": "vm-1", "signal": "KILL"})).unwrap_err();
        assert!(
            e.message.contains("refusing"),
            "a stopped VMM is never signalled: {e}"
        );
        let r = vm_cleanup(&l, &c, &json!({"id": "vm-1"})).expect("cleanup");
        let removed: Vec<String> = serde_json::from_value(r["removed"].clone()).expect("list");
        assert!(
            removed.iter().any(|p| p.ends_with("vmm.pid")),
            "{removed:?}"
        );
        // The stale socket (python was killed by the script's trap) is gone either way.
        assert!(!dir.join("fc.sock").exists() || removed.iter().any(|p| p.ends_with("fc.sock")));
        // And the VM can be launched again, this time with the guest's boot id known up front
        // (a restore): recorded with the VMM, and the reply says how long each step took.
        let reply =
            vm_launch(&l, &c, &json!({"id": "vm-1", "boot_id": "0123-abcd"})).expect("relaunch");
        let steps: Vec<&str> = reply["steps"]
            .as_array()
            .expect("steps")
            .iter()
            .filter_map(|s| s["step"].as_str())
            .collect();
        assert!(steps.contains(&"writing handles.json"), "{steps:?}");
        let h2: Handles = serde_json::from_value(reply).expect("json");
        assert_ne!(h2.identity, h.identity);
        assert_eq!(h2.boot_id.as_deref(), Some("0123-abcd"));
        assert_eq!(
            identity::read_handles(&dir.join("handles.json"))
                .expect("read")
                .and_then(|h| h.boot_id)
                .as_deref(),
            Some("0123-abcd")
        );
        vm_signal(&l, &c, &json!({"id": "vm-1", "signal": "TERM"})).expect("stop");
    }
}
