//! The daemon's side of SSH (DESIGN §11): what a guest is told at boot (`banger.name=`,
//! `banger.key=`), pinning the host key its agent reports once it is ready, forgetting a VM's pins
//! at delete, keeping the generated ssh config in step with the VMs, and `vm.ports`.
//!
//! The mechanics (key, known_hosts, config file) are [`crate::ssh`]'s; this module only decides
//! when. It never trusts a host key it did not get from the guest's agent over vsock, and never
//! touches a user's `~/.ssh`.

use super::shared::{busy, failed, not_found, Ctx};
use crate::error::Error;
use crate::rpc::RpcError;
use crate::ssh::known_hosts::{KnownHosts, Pin, Pinned};
use crate::ssh::ssh_config::{self, VmHost};
use crate::ssh::{OwnerKey, PublicKey};
use crate::store::{Image, Vm, VmState};
use crate::vmm::launch::VmFiles;
use serde_json::{json, Value};

/// The guest agent's kernel arguments: `banger.name=<vm name> banger.key=<base64 line>`. Makes the
/// install's key on first need.
pub fn guest_args(ctx: &Ctx, vm: &Vm) -> Result<String, RpcError> {
    let key = OwnerKey::ensure(&ctx.layout).map_err(|e| {
        failed(Error::new(
            format!("preparing the SSH key for VM `{}`", vm.name),
            e,
        ))
    })?;
    Ok(format!("banger.name={} {}", vm.name, key.kernel_arg()))
}

/// After a guest became ready: asks its agent for `hello` and pins the host key it reports for
/// `<name>.vm` and the VM's address. Guests without the agent (a console readiness line) are
/// skipped; an agent that cannot say `hello` is logged (ssh to it will refuse: nothing is trusted
/// on first use). A changed key is the loud refusal, returned as the boot's error.
pub fn pin_host_key(ctx: &Ctx, vm: &Vm, image: &Image, files: &VmFiles) -> Result<(), RpcError> {
    if image.ready_pattern.is_some() {
        return Ok(());
    }
    let Some(ip) = vm.ip.as_deref() else {
        return Ok(());
    };
    let hello = match crate::agent::call_hello(&files.vsock_uds, crate::agent::AGENT_VSOCK_PORT) {
        Ok(h) => h,
        Err(e) => {
            crate::logging::error(
                "bangerd",
                "no host key pinned: the guest agent did not answer hello",
                json!({"vm": vm.name, "error": e.to_string()}),
            );
            return Ok(());
        }
    };
    for p in &hello.problems {
        crate::logging::error(
            "bangerd",
            "guest agent preparation problem",
            json!({"vm": vm.name, "problem": p}),
        );
    }
    let key = PublicKey::parse(&hello.host_key).map_err(|e| {
        failed(Error::new(
            format!("pinning the host key of VM `{}`", vm.name),
            format!("its agent reported {:?}: {e}", hello.host_key),
        ))
    })?;
    let kh = KnownHosts::for_layout(&ctx.layout);
    // Pins of VMs that no longer exist (a delete interrupted before its unpin) must not block an
    // address that was handed out again.
    let ids: Vec<String> = ctx.db(|s| s.vm_list())?.into_iter().map(|v| v.id).collect();
    kh.retain_vms(|id| ids.iter().any(|i| i == id))
        .map_err(failed)?;
    match kh
        .pin(&Pin::for_vm(&vm.id, &vm.name, ip, key))
        .map_err(failed)?
    {
        Pinned::Added => crate::logging::info(
            "bangerd",
            "pinned guest host key",
            json!({"vm": vm.name, "ip": ip, "fingerprint": key.fingerprint()}),
        ),
        Pinned::AlreadyPinned => {}
    }
    Ok(())
}

/// After a delete: removes the VM's pins (logged on failure; the next pin prunes them).
pub fn forget(ctx: &Ctx, vm: &Vm) {
    if let Err(e) = KnownHosts::for_layout(&ctx.layout).unpin_vm(&vm.id) {
        crate::logging::error(
            "bangerd",
            "removing the VM's pinned host key failed",
            json!({"vm": vm.name, "error": e.to_string()}),
        );
    }
    refresh_config(ctx);
}

/// Rewrites `/var/lib/banger/ssh/config` for every VM with an address (only when it changes).
/// Failures are logged: the config is a convenience for plain `ssh NAME.vm`, never needed by banger.
pub fn refresh_config(ctx: &Ctx) {
    let r = ctx.db(|s| s.vm_list()).and_then(|vms| {
        let hosts: Vec<VmHost> = vms
            .iter()
            .filter_map(|v| {
                let ip = v.ip.as_deref()?.parse().ok()?;
                Some(VmHost {
                    name: v.name.clone(),
                    ip,
                })
            })
            .collect();
        ssh_config::write(&ctx.layout, &hosts).map_err(failed)
    });
    if let Err(e) = r {
        crate::logging::error(
            "bangerd",
            "writing the ssh config failed",
            json!({"error": e.message}),
        );
    }
}

/// At daemon start: drops pins of VMs that no longer exist and rewrites the ssh config.
pub fn reconcile(ctx: &Ctx) {
    let kh = KnownHosts::for_layout(&ctx.layout);
    if kh.path().exists() {
        match ctx.db(|s| s.vm_list()) {
            Ok(vms) => {
                if let Err(e) = kh.retain_vms(|id| vms.iter().any(|v| v.id == id)) {
                    crate::logging::error(
                        "bangerd",
                        "pruning pinned host keys failed",
                        json!({"error": e.to_string()}),
                    );
                }
            }
            Err(e) => crate::logging::error(
                "bangerd",
                "pruning pinned host keys failed",
                json!({"error": e.message}),
            ),
        }
    }
    refresh_config(ctx);
}

/// `vm.ports`: the TCP listeners the guest agent sees, for a running VM with the agent.
pub fn ports(ctx: &Ctx, vm_ref: &str) -> Result<Value, RpcError> {
    let vm = ctx
        .db(|s| s.vm_get(vm_ref))?
        .ok_or_else(|| not_found(format!("no VM named `{vm_ref}` (see `banger vm list`)")))?;
    if vm.state != VmState::Running {
        return Err(busy(format!(
            "VM `{}` is {}, not running (start it with `banger vm start {}`)",
            vm.name,
            vm.state.as_str(),
            vm.name
        )));
    }
    let files = VmFiles::in_dir(&ctx.layout.vm_dir(&vm.id));
    let v = crate::agent::agent_call(&files.vsock_uds, crate::agent::AGENT_VSOCK_PORT, "ports")
        .map_err(|e| {
            failed(e.hint(
                "the guest agent did not answer; is the VM's image built by `banger image build`?",
            ))
        })?;
    Ok(json!({"vm": vm.name, "ip": vm.ip, "ports": v.get("ports").cloned().unwrap_or(json!([]))}))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rpc::ErrorCode;
    use crate::ssh::known_hosts::Pin;
    use crate::store::Store;
    use crate::system::testutil::TempDir;
    use std::sync::{Arc, Mutex};

    fn ctx(t: &TempDir) -> Ctx {
        let layout = crate::layout::Layout::under(t.path());
        std::fs::create_dir_all(layout.state_dir()).unwrap();
        let store = Store::open(&layout.state_db()).unwrap();
        Ctx {
            layout,
            store: Arc::new(Mutex::new(store)),
            net: crate::net::NetConfig::default(),
            console: Default::default(),
        }
    }

    fn vm(id: &str, name: &str, ip: Option<&str>, state: VmState) -> Vm {
        Vm {
            id: id.into(),
            name: name.into(),
            image: None,
            vcpu: 1,
            memory_mib: 512,
            state,
            pid: None,
            start_time: None,
            comm: None,
            boot_id: None,
            ip: ip.map(String::from),
            mac: None,
            nat: false,
            created_at: "2026-12-01T00:00:00Z".into(),
            updated_at: "2026-12-01T00:00:00Z".into(),
        }
    }

    #[test]
    fn reconcile_prunes_pins_of_gone_vms_and_writes_the_config() {
        let t = TempDir::new();
        let c = ctx(&t);
        let kept = vm("aaaaaaaaaaaa", "dev", Some("172.30.0.2"), VmState::Stopped);
        c.db(|s| s.vm_insert(&kept)).unwrap();
        c.db(|s| s.vm_insert(&vm("cccccccccccc", "old", None, VmState::Created)))
            .unwrap();
        let kh = KnownHosts::for_layout(&c.layout);
        let key = PublicKey::from_bytes([1; 32]);
        kh.pin(&Pin::for_vm("aaaaaaaaaaaa", "dev", "172.30.0.2", key))
            .unwrap();
        // A VM deleted while the daemon could not unpin it.
        kh.pin(&Pin::for_vm(
            "bbbbbbbbbbbb",
            "gone",
            "172.30.0.3",
            PublicKey::from_bytes([2; 32]),
        ))
        .unwrap();
        reconcile(&c);
        assert_eq!(kh.pinned("dev.vm").unwrap(), Some(key));
        assert_eq!(kh.pinned("172.30.0.3").unwrap(), None);
        let cfg = std::fs::read_to_string(c.layout.ssh_config()).unwrap();
        assert!(
            cfg.contains("Host dev.vm\n    HostName 172.30.0.2\n"),
            "{cfg}"
        );
        assert!(
            !cfg.contains("old.vm"),
            "a VM without an address got a block"
        );
        // forget: the pin and the block go.
        c.db(|s| s.vm_delete("aaaaaaaaaaaa")).unwrap();
        forget(&c, &kept);
        assert_eq!(kh.pinned("dev.vm").unwrap(), None);
        let cfg = std::fs::read_to_string(c.layout.ssh_config()).unwrap();
        assert!(!cfg.contains("dev.vm"), "{cfg}");
    }

    #[test]
    fn guest_args_carry_name_and_key() {
        let t = TempDir::new();
        let c = ctx(&t);
        let a = guest_args(&c, &vm("aaaaaaaaaaaa", "dev", None, VmState::Created)).unwrap();
        let key = OwnerKey::load(&c.layout).unwrap();
        assert_eq!(a, format!("banger.name=dev {}", key.kernel_arg()));
        // The agent's own parser accepts both.
        let g = crate::agent::cmdline::parse(&a);
        assert_eq!(g.name.as_deref(), Some("dev"));
        assert_eq!(g.authorized_key, Some(key.authorized_keys_line()));
    }

    #[test]
    fn ports_refuses_unknown_and_stopped_vms() {
        let t = TempDir::new();
        let c = ctx(&t);
        c.db(|s| s.vm_insert(&vm("aaaaaaaaaaaa", "dev", None, VmState::Stopped)))
            .unwrap();
        assert_eq!(ports(&c, "nope").unwrap_err().code, ErrorCode::NotFound);
        let e = ports(&c, "dev").unwrap_err();
        assert_eq!(e.code, ErrorCode::Busy);
        assert!(e.message.contains("banger vm start dev"), "{}", e.message);
    }
}
