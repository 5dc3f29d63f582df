//! The owner daemon's service: its method table over the state store and the operations registry.
//!
//! Knows nothing about argv or sockets; `applets::bangerd` binds the socket and serves this.
//! Every method's parameters are read here into their typed struct ([`requests`]) and handed to
//! the module that owns the concern: [`vms`] (lifecycle, with [`boot`]), [`images`], [`kernels`],
//! [`net`] (the guest address plan and the helper's network calls), [`ssh`] (the guest's key
//! arguments, pinned host keys, the generated ssh config, `vm.ports`).

pub mod boot;
pub mod console_log;
pub mod images;
pub mod kernels;
pub mod net;
pub mod ops;
pub mod requests;
pub mod shared;
pub mod snapshots;
pub mod ssh;
pub mod vms;

use crate::buildinfo::BuildInfo;
use crate::layout::Layout;
use crate::rpc::server::{Call, Handler, Reply};
use crate::rpc::{ErrorCode, RpcError};
use crate::store::Store;
use ops::Operations;
use requests::{parse, NoParams};
use serde_json::{json, Value};
use shared::Ctx;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Everything the daemon's methods share.
pub struct Daemon {
    layout: Layout,
    started: Instant,
    ctx: Ctx,
    ops: Operations,
    vms: vms::Vms,
    stop: smol::channel::Sender<()>,
}

impl Daemon {
    /// A daemon over `store` with the validated `[network]` config `net` and `[vm]` console
    /// bounds `console`; `stop` is signalled by `daemon.shutdown`.
    pub fn new(
        layout: Layout,
        store: Store,
        net: crate::net::NetConfig,
        console: console_log::ConsoleConfig,
        stop: smol::channel::Sender<()>,
    ) -> Self {
        let store = Arc::new(Mutex::new(store));
        let ctx = Ctx {
            layout: layout.clone(),
            store: store.clone(),
            net,
            console,
        };
        Daemon {
            ops: Operations::new(store),
            vms: vms::Vms::new(ctx.clone()),
            layout,
            started: Instant::now(),
            ctx,
            stop,
        }
    }

    /// The operations registry.
    pub fn operations(&self) -> &Operations {
        &self.ops
    }

    /// Re-adopts, stops or reports every VM recorded as running (call once at start).
    pub fn reconcile(&self) -> (usize, usize, usize) {
        let r = self.vms.reconcile();
        ssh::reconcile(&self.ctx);
        r
    }

    /// Starts rotating every VM's logs at the configured cap ([`console_log`]).
    pub fn spawn_log_rotation(&self) -> crate::error::Result<()> {
        console_log::spawn_rotator(
            self.layout.clone(),
            self.ctx.store.clone(),
            self.ctx.console,
        )
        .map(drop)
    }

    /// The state store.
    pub fn store(&self) -> &Arc<Mutex<Store>> {
        &self.ctx.store
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

impl Handler for Daemon {
    fn handle_reply(&self, call: &Call, params: Value) -> Result<Reply, RpcError> {
        if call.method == "vm.list" {
            parse::<NoParams>("vm.list", &params)?;
            return self.vms.list_raw().map(Reply::Raw);
        }
        self.handle(call, params).map(Reply::Json)
    }

    fn handle(&self, call: &Call, params: Value) -> Result<Value, RpcError> {
        let (m, p, ops, ctx) = (call.method.as_str(), &params, &self.ops, &self.ctx);
        match m {
            "ping" => {
                parse::<NoParams>(m, p)?;
                Ok(json!({"pong": true, "version": crate::buildinfo::VERSION}))
            }
            "daemon.status" => {
                parse::<NoParams>(m, p)?;
                Ok(self.status())
            }
            "daemon.operations.list" => {
                parse::<NoParams>(m, p)?;
                Ok(json!({"operations": self.ops.list()}))
            }
            "daemon.shutdown" => {
                parse::<NoParams>(m, p)?;
                // Peers were already limited to root and the owner by the server.
                let _ = self.stop.try_send(());
                Ok(json!({"stopping": true}))
            }
            "vm.create" => self.vms.create(ops, parse(m, p)?),
            "vm.start" => self.vms.start(ops, parse(m, p)?),
            "vm.stop" => self.vms.stop(ops, parse(m, p)?),
            "vm.restart" => self.vms.restart(ops, parse(m, p)?),
            "vm.kill" => self.vms.kill(parse(m, p)?),
            "vm.delete" => self.vms.delete(ops, parse(m, p)?),
            "vm.list" => {
                parse::<NoParams>(m, p)?;
                let raw = self.vms.list_raw()?;
                serde_json::from_str(raw.get())
                    .map_err(|e| RpcError::new(ErrorCode::OperationFailed, e.to_string()))
            }
            "vm.show" => self.vms.show(parse(m, p)?),
            "vm.snapshot" => snapshots::take(&self.vms, ops, parse(m, p)?),
            "snapshot.list" => parse::<NoParams>(m, p).and_then(|_| snapshots::list(&self.vms)),
            "snapshot.show" => snapshots::show(&self.vms, parse(m, p)?),
            "snapshot.rm" => snapshots::remove(&self.vms, parse(m, p)?),
            "vm.logs" => self.vms.logs(parse(m, p)?),
            "vm.ports" => ssh::ports(ctx, &parse::<requests::VmRef>(m, p)?.vm),
            "image.import" => images::import(ctx, ops, parse(m, p)?),
            "image.list" => parse::<NoParams>(m, p).and_then(|_| images::list(ctx)),
            "image.rm" => images::remove(ctx, parse(m, p)?),
            "kernel.import" => kernels::import(ctx, parse(m, p)?),
            "kernel.list" => parse::<NoParams>(m, p).and_then(|_| kernels::list(ctx)),
            "kernel.rm" => kernels::remove(ctx, parse(m, p)?),
            other => Err(RpcError::new(
                ErrorCode::UnknownMethod,
                format!(
                    "unknown method `{other}` (this daemon is banger v{})",
                    crate::buildinfo::VERSION
                ),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rpc::peer::Peer;

    /// A daemon over a fresh store in a private temp root (no helper: nothing here may reach it).
    struct Fixture {
        root: std::path::PathBuf,
        daemon: Daemon,
    }

    impl Fixture {
        fn new(tag: &str) -> Fixture {
            let root = std::env::temp_dir().join(format!(
                "banger-daemon-{tag}-{}-{}",
                std::process::id(),
                crate::daemon::shared::random_hex(4)
            ));
            let layout = Layout::under(&root);
            for d in [layout.vms_dir(), layout.images_dir(), layout.kernels_dir()] {
                std::fs::create_dir_all(d).unwrap();
            }
            let store = Store::open(&layout.state_db()).unwrap();
            let (tx, _rx) = smol::channel::bounded(1);
            Fixture {
                daemon: Daemon::new(
                    layout,
                    store,
                    crate::net::NetConfig::default(),
                    Default::default(),
                    tx,
                ),
                root,
            }
        }

        fn call(&self, method: &str, params: Value) -> Result<Value, RpcError> {
            let call = Call {
                method: method.into(),
                op_id: "op-test".into(),
                peer: Peer {
                    pid: 1,
                    uid: 0,
                    gid: 0,
                },
            };
            self.daemon.handle(&call, params)
        }
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }

    /// A kernel `k6` imported into `f` (a file with the ELF magic is all `kernel.import` checks).
    fn with_kernel(f: &Fixture) {
        let k = f.root.join("vmlinux");
        std::fs::write(&k, b"\x7fELF rest of a kernel").unwrap();
        f.call(
            "kernel.import",
            json!({"name": "k6", "path": k.to_string_lossy()}),
        )
        .unwrap();
    }

    /// A sparse 4 MiB file holding 4 KiB of data at its start.
    fn sparse_rootfs(path: &std::path::Path) {
        let file = std::fs::File::create(path).unwrap();
        std::io::Write::write_all(&mut &file, &[0x55u8; 4096]).unwrap();
        file.set_len(4 << 20).unwrap();
    }

    #[test]
    fn image_import_refuses_a_bad_origin_and_copies_nothing() {
        let f = Fixture::new("origin-bad");
        with_kernel(&f);
        let src = f.root.join("src.ext4");
        sparse_rootfs(&src);
        let layout = Layout::under(&f.root);
        for (origin, want) in [
            ("x".repeat(513), "origin is 513 bytes; at most 512"),
            ("built\nfake row".to_string(), "control character '\\n'"),
            ("a\u{1b}[31mred".to_string(), "control character '\\u{1b}'"),
        ] {
            let e = f
                .call(
                    "image.import",
                    json!({"name": "i", "rootfs": src.to_string_lossy(), "kernel": "k6", "origin": origin}),
                )
                .unwrap_err();
            assert_eq!(e.code, ErrorCode::BadRequest, "{e:?}");
            assert!(e.message.contains(want), "{}", e.message);
            let store = f.daemon.store().lock().unwrap();
            assert!(store.image_list().unwrap().is_empty());
            drop(store);
            assert_eq!(std::fs::read_dir(layout.images_dir()).unwrap().count(), 0);
            assert!(f.daemon.operations().list().is_empty());
        }
        // Exactly 512 bytes of printable text (multi-byte included) is fine.
        let ok = format!("{}é", "x".repeat(510));
        assert_eq!(ok.len(), 512);
        let v = f
            .call(
                "image.import",
                json!({"name": "i", "rootfs": src.to_string_lossy(), "kernel": "k6", "origin": ok}),
            )
            .unwrap();
        assert_eq!(v["origin"], ok);
    }

    #[test]
    fn image_list_reports_origin_and_sizes() {
        let f = Fixture::new("origin-list");
        with_kernel(&f);
        let src = f.root.join("src.ext4");
        sparse_rootfs(&src);
        f.call(
            "image.import",
            json!({"name": "plain", "rootfs": src.to_string_lossy(), "kernel": "k6"}),
        )
        .unwrap();
        f.call(
            "image.import",
            json!({"name": "built", "rootfs": src.to_string_lossy(), "kernel": "k6",
                   "origin": "built: debian bookworm from http://deb.example, +git, 2026-12-01"}),
        )
        .unwrap();
        let v = f.call("image.list", json!({})).unwrap();
        let imgs = v["images"].as_array().unwrap();
        assert_eq!(imgs.len(), 2);
        let (built, plain) = (&imgs[0], &imgs[1]);
        assert_eq!(
            plain["origin"],
            format!("imported from {}", src.display()),
            "{plain}"
        );
        assert_eq!(
            built["origin"],
            "built: debian bookworm from http://deb.example, +git, 2026-12-01"
        );
        use std::os::unix::fs::MetadataExt;
        let src_sparse = std::fs::metadata(&src).unwrap().blocks() * 512 < 4 << 20;
        for i in imgs {
            let size = i["size_bytes"].as_u64().unwrap();
            let disk = i["disk_bytes"].as_u64().unwrap();
            assert_eq!(size, 4 << 20, "{i}");
            assert!(disk >= 4096, "{i}");
            if src_sparse {
                assert!(disk < size, "allocated, not apparent: {i}");
            } else {
                eprintln!(
                    "SKIP: image_list_reports_origin_and_sizes (sparse part): this filesystem \
                     has no holes"
                );
            }
        }
        // A rootfs that went missing lists with null sizes, not an error.
        std::fs::remove_file(plain["rootfs"].as_str().unwrap()).unwrap();
        let v = f.call("image.list", json!({})).unwrap();
        let plain = &v["images"][1];
        assert_eq!(plain["name"], "plain");
        assert!(
            plain["size_bytes"].is_null() && plain["disk_bytes"].is_null(),
            "{plain}"
        );
        assert_eq!(v["images"][0]["size_bytes"], 4 << 20);
    }

    #[test]
    fn bad_params_are_refused_and_create_nothing() {
        let f = Fixture::new("params");
        for (method, params, want) in [
            (
                "vm.create",
                json!({"name": "a", "cmd": "x"}),
                "unknown field `cmd`",
            ),
            (
                "vm.create",
                json!({"name": "a", "vcpu": "two"}),
                "`vcpu`: invalid type",
            ),
            (
                "vm.create",
                json!({"name": "a", "start": 1}),
                "`start`: invalid type",
            ),
            (
                "vm.create",
                json!({"name": "a", "vcpu": 33}),
                "vcpu 33 is out of range",
            ),
            (
                "vm.create",
                json!({"name": "a", "memory_mib": 8}),
                "memory 8 MiB is out of range",
            ),
            ("vm.create", json!({"name": "A"}), "VM name `A` is invalid"),
            ("vm.create", json!([]), "params must be an object"),
            ("vm.delete", json!({"vms": []}), "non-empty"),
            (
                "vm.stop",
                json!({"vm": "a", "timeout_s": "5"}),
                "`timeout_s`: invalid type",
            ),
            ("vm.show", json!({}), "missing field `vm`"),
            (
                "image.import",
                json!({"name": "i", "rootfs": "/x", "kernel": "k", "extra": 1}),
                "unknown field `extra`",
            ),
            (
                "kernel.import",
                json!({"name": "k", "path": 5}),
                "`path`: invalid type",
            ),
            ("kernel.list", json!({"all": true}), "unknown field `all`"),
            ("ping", json!({"x": 1}), "unknown field `x`"),
        ] {
            let e = f.call(method, params.clone()).unwrap_err();
            assert_eq!(e.code, ErrorCode::BadRequest, "{method} {params}: {e:?}");
            assert!(e.message.contains(want), "{method} {params}: {}", e.message);
        }
        let layout = Layout::under(&f.root);
        let store = f.daemon.store().lock().unwrap();
        assert!(store.vm_list().unwrap().is_empty());
        assert!(store.image_list().unwrap().is_empty());
        assert!(store.kernel_list().unwrap().is_empty());
        for d in [layout.vms_dir(), layout.images_dir(), layout.kernels_dir()] {
            assert_eq!(std::fs::read_dir(&d).unwrap().count(), 0, "{}", d.display());
        }
        assert!(
            f.daemon.operations().list().is_empty(),
            "a refused call began an operation"
        );
    }

    #[test]
    fn reconcile_mirrors_the_identity_of_a_vm_adopted_before_its_running_write() {
        // A daemon died between the helper's launch (handles.json written) and its own
        // `running` write: the row is `starting` without a pid. Adopting it must record the pid,
        // or a later stop would look for no process at all.
        let f = Fixture::new("adopt");
        let layout = Layout::under(&f.root);
        let me = crate::vmm::identity::read_identity(
            std::path::Path::new("/proc"),
            std::process::id() as i32,
        )
        .unwrap();
        let vm = crate::store::Vm {
            id: "0123456789ab".into(),
            name: "half".into(),
            image: None,
            vcpu: 1,
            memory_mib: 128,
            state: crate::store::VmState::Starting,
            pid: None,
            start_time: None,
            comm: None,
            boot_id: None,
            ip: None,
            mac: None,
            nat: false,
            created_at: crate::clock::now_rfc3339(),
            updated_at: crate::clock::now_rfc3339(),
        };
        f.daemon.store().lock().unwrap().vm_insert(&vm).unwrap();
        let files = crate::vmm::launch::VmFiles::in_dir(&layout.vm_dir(&vm.id));
        std::fs::create_dir_all(&files.dir).unwrap();
        let handles = crate::vmm::identity::Handles {
            version: crate::vmm::identity::HANDLES_VERSION,
            vm_id: vm.id.clone(),
            identity: me.clone(),
            api_socket: files.api_socket.clone(),
            vsock_uds: files.vsock_uds.clone(),
            console_log: files.console_log.clone(),
            pidfile: files.pidfile.clone(),
            scope: None,
            boot_id: None,
            launched_at: 0,
        };
        crate::vmm::identity::write_handles(&files.handles, &handles, None).unwrap();
        assert_eq!(f.daemon.vms.reconcile(), (1, 0, 0));
        let got = f
            .daemon
            .store()
            .lock()
            .unwrap()
            .vm_get("half")
            .unwrap()
            .unwrap();
        assert_eq!(got.state, crate::store::VmState::Running);
        assert_eq!(
            (got.pid, got.start_time, got.comm),
            (Some(me.pid), Some(me.start_time), Some(me.comm))
        );
    }
}
