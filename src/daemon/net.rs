//! The daemon's side of guest networking (DESIGN §10): the address plan and the calls that ask the
//! root helper to bring a VM's network up or down.
//!
//! The address plan hands each VM the lowest free guest address of the configured subnet at create
//! (allocated inside one store transaction, so concurrent creates never share one) and keeps it
//! for the VM's life. This module never touches a kernel object itself: the helper derives and
//! owns every interface and rule; the daemon passes only the VM id, its address and its NAT bit.

use super::shared::Ctx;
use crate::error::{Error, Result};
use crate::net::{NetConfig, Subnet};
use crate::rpc::RpcError;
use crate::store::Vm;
use serde_json::json;
use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::path::Path;

/// The lowest guest address of `subnet` that is not in `taken` (addresses as recorded; ones that
/// do not parse or lie outside the subnet are ignored). An exhausted subnet is an error naming
/// the subnet and how to widen it (`[network] subnet` in `config`).
pub fn lowest_free(subnet: &Subnet, taken: &[String], config: &Path) -> Result<Ipv4Addr> {
    let taken: HashSet<Ipv4Addr> = taken.iter().filter_map(|s| s.parse().ok()).collect();
    if let Some(ip) = subnet.guest_addresses().find(|ip| !taken.contains(ip)) {
        return Ok(ip);
    }
    let count = subnet.guest_addresses().count();
    let why = format!("subnet {subnet} is exhausted: all {count} guest addresses belong to VMs");
    let hint = match wider(subnet) {
        Some(w) => format!(
            "delete VMs you no longer need, or widen the subnet: set `subnet = \"{w}\"` under \
             [network] in {} and restart banger (`sudo banger system restart`)",
            config.display()
        ),
        None => format!(
            "delete VMs you no longer need ({subnet} is already the widest subnet banger allows)"
        ),
    };
    Err(Error::new("allocating a guest address", why).hint(hint))
}

/// The subnet one bit wider than `s` that contains it (`None` at the widest allowed, /16).
fn wider(s: &Subnet) -> Option<String> {
    let prefix = s.prefix().checked_sub(1).filter(|p| *p >= 16)?;
    let mask = u32::MAX << (32 - prefix);
    let net = Ipv4Addr::from(u32::from(s.network()) & mask);
    Some(format!("{net}/{prefix}"))
}

/// The address `vm` boots with, in `cfg`'s subnet. A VM whose recorded address lies outside the
/// configured subnet (the subnet was changed under it) is refused with what to do.
pub fn address_of(vm: &Vm, cfg: &NetConfig, config: &Path) -> Result<Ipv4Addr, Error> {
    let what = || format!("starting VM `{}`", vm.name);
    let ip: Ipv4Addr = vm
        .ip
        .as_deref()
        .ok_or_else(|| Error::new(what(), "it has no guest address"))?
        .parse()
        .map_err(|e| Error::new(what(), format!("its recorded address is unreadable: {e}")))?;
    if !cfg.subnet.is_guest_address(ip) {
        return Err(Error::new(
            what(),
            format!(
                "its address {ip} is not a guest address of the configured subnet {}",
                cfg.subnet
            ),
        )
        .hint(format!(
            "restore the previous `subnet` under [network] in {}, or recreate the VM",
            config.display()
        )));
    }
    Ok(ip)
}

/// `priv.net_up`: the VM's tap on the bridge and its NAT bit. Returns the tap's name as the
/// helper reports it.
pub fn up(ctx: &Ctx, vm: &Vm, ip: Ipv4Addr) -> Result<String, RpcError> {
    let r = ctx.helper(
        "priv.net_up",
        json!({"id": vm.id, "ip": ip.to_string(), "nat": vm.nat}),
    )?;
    r.get("tap")
        .and_then(|t| t.as_str())
        .map(str::to_string)
        .ok_or_else(|| {
            super::shared::failed(Error::new(
                format!("bringing up the network of VM `{}`", vm.name),
                format!("the helper's answer names no tap: {r}"),
            ))
        })
}

/// `priv.net_down`, best effort: a failure is logged (the tap is removed at the VM's next stop or
/// delete, both idempotent) and never fails the caller, whose VMM is already gone.
pub fn down(ctx: &Ctx, vm: &Vm) {
    if let Err(e) = ctx.helper("priv.net_down", json!({"id": vm.id})) {
        crate::logging::error(
            "bangerd",
            "bringing a VM's network down failed",
            json!({"vm": vm.name, "tap": crate::net::tap_name(&vm.id), "error": e.message}),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subnet(s: &str) -> Subnet {
        Subnet::parse(s).unwrap()
    }

    fn strs(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    const CFG: &str = "/etc/banger/config.toml";

    #[test]
    fn lowest_free_table() {
        let s24 = subnet("172.30.0.0/24");
        // (taken, want)
        let cases: &[(&[&str], &str)] = &[
            (&[], "172.30.0.2"),
            (&["172.30.0.2"], "172.30.0.3"),
            (&["172.30.0.2", "172.30.0.3", "172.30.0.5"], "172.30.0.4"),
            // Freed at delete: a hole is reused before anything higher.
            (&["172.30.0.3", "172.30.0.4"], "172.30.0.2"),
            // Addresses of another subnet (changed config) or unreadable ones take nothing here.
            (&["10.0.0.2", "garbage", ""], "172.30.0.2"),
        ];
        for (taken, want) in cases {
            let got = lowest_free(&s24, &strs(taken), Path::new(CFG)).unwrap();
            assert_eq!(got.to_string(), *want, "{taken:?}");
        }
    }

    #[test]
    fn a_29_has_five_guest_addresses_then_a_clear_error() {
        let s = subnet("10.9.8.0/29");
        let mut taken = Vec::new();
        for want in ["10.9.8.2", "10.9.8.3", "10.9.8.4", "10.9.8.5", "10.9.8.6"] {
            let ip = lowest_free(&s, &taken, Path::new(CFG)).unwrap();
            assert_eq!(ip.to_string(), want);
            taken.push(ip.to_string());
        }
        let e = lowest_free(&s, &taken, Path::new(CFG))
            .unwrap_err()
            .to_string();
        for part in [
            "subnet 10.9.8.0/29 is exhausted",
            "all 5 guest addresses",
            "[network]",
            CFG,
            "subnet = \"10.9.8.0/28\"",
        ] {
            assert!(e.contains(part), "missing {part:?} in: {e}");
        }
        // Network, gateway (the bridge's) and broadcast are never handed out.
        for never in ["10.9.8.0", "10.9.8.1", "10.9.8.7"] {
            assert!(!taken.contains(&never.to_string()));
        }
        // One delete frees exactly that address.
        taken.retain(|ip| ip != "10.9.8.4");
        assert_eq!(
            lowest_free(&s, &taken, Path::new(CFG)).unwrap().to_string(),
            "10.9.8.4"
        );
    }

    #[test]
    fn widening_hint_table() {
        for (s, want) in [
            ("10.9.8.0/29", Some("10.9.8.0/28")),
            ("10.9.8.8/29", Some("10.9.8.0/28")),
            ("172.30.0.0/24", Some("172.30.0.0/23")),
            ("172.30.1.0/24", Some("172.30.0.0/23")),
            ("192.168.0.0/17", Some("192.168.0.0/16")),
            ("10.1.0.0/16", None),
        ] {
            assert_eq!(wider(&subnet(s)).as_deref(), want, "{s}");
        }
    }

    #[test]
    fn address_of_refuses_a_vm_outside_the_subnet() {
        let cfg = NetConfig::default();
        let mut vm = Vm {
            id: "0123456789ab".into(),
            name: "v".into(),
            image: None,
            vcpu: 1,
            memory_mib: 128,
            state: crate::store::VmState::Stopped,
            pid: None,
            start_time: None,
            comm: None,
            boot_id: None,
            ip: Some("172.30.0.9".into()),
            mac: None,
            nat: false,
            created_at: String::new(),
            updated_at: String::new(),
        };
        assert_eq!(
            address_of(&vm, &cfg, Path::new(CFG)).unwrap().to_string(),
            "172.30.0.9"
        );
        for (ip, want) in [
            (
                Some("10.0.0.2"),
                "not a guest address of the configured subnet 172.30.0.0/24",
            ),
            (Some("172.30.0.1"), "not a guest address"),
            (Some("x"), "unreadable"),
            (None, "no guest address"),
        ] {
            vm.ip = ip.map(str::to_string);
            let e = address_of(&vm, &cfg, Path::new(CFG))
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{ip:?}: {e}");
        }
    }
}
