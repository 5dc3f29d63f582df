//! The helper side of guest networking: `net_up`, `net_down`, `purge` on real kernel objects.
//!
//! Callers pass already-validated values (the helper's validators, or uninstall for `purge`);
//! every interface name is derived here from the VM id. Only interfaces named `bgr-…` (taps) and
//! bridges with a banger bridge name are ever changed, and only the nftables table `inet banger`.
//! Nothing happens at helper start: an existing tap or rule is only read until a call asks for a
//! change, so restarting or updating the helper never touches a running VM's network.
//!
//! Each tap records its VM in its interface alias, `banger:<id>` or `banger:<id>:nat`, so a
//! second VM whose id shares the tap's 10-character prefix is refused instead of sharing or
//! tearing down another VM's tap, and doctor can tell how many NAT VMs run without root.

use super::config::{check_bridge_name, NetConfig};
use super::forward;
use super::link::{self, Link};
use super::names::{tap_name, TAP_PREFIX};
use super::nft;
use super::tap;
use crate::error::{Error, Result};
use crate::layout::Layout;
use std::net::Ipv4Addr;
use std::path::Path;

/// What `net_up` set up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Up {
    /// The VM's tap.
    pub tap: String,
    /// The bridge it is attached to.
    pub bridge: String,
}

/// The alias banger writes on VM `id`'s tap.
pub fn alias_for(id: &str, nat: bool) -> String {
    if nat {
        format!("banger:{id}:nat")
    } else {
        format!("banger:{id}")
    }
}

/// The VM id and NAT bit recorded in a tap alias, if it is banger's.
pub fn parse_alias(alias: &str) -> Option<(&str, bool)> {
    let rest = alias.strip_prefix("banger:")?;
    match rest.strip_suffix(":nat") {
        Some(id) => Some((id, true)),
        None => Some((rest, false)),
    }
}

/// True when `owner` (as iproute2 prints a tap's owner: a uid or a user name) is `uid`.
pub fn owner_is(owner: Option<&str>, uid: u32) -> bool {
    let Some(o) = owner else { return false };
    if let Ok(n) = o.parse::<u32>() {
        return n == uid;
    }
    matches!(
        crate::system::users::lookup_user(&crate::system::users::host_passwd(), o),
        Ok(Some(u)) if u.uid == uid
    )
}

fn ensure_bridge(cfg: &NetConfig) -> Result<()> {
    let b = cfg.bridge.as_str();
    let gw = format!("{}/{}", cfg.subnet.gateway(), cfg.subnet.prefix());
    let existing = link::show(b)?;
    let l = match existing {
        Some(l) => l,
        None => {
            link::ip(&["link", "add", "name", b, "type", "bridge"])?;
            Link {
                name: b.to_string(),
                kind: Some("bridge".into()),
                ..Link::default()
            }
        }
    };
    if l.kind.as_deref() != Some("bridge") {
        return Err(Error::new(
            format!("preparing bridge {b}"),
            format!(
                "an interface named {b} exists and is not a bridge (kind {})",
                l.kind.as_deref().unwrap_or("none")
            ),
        )
        .hint(format!(
            "remove it (sudo ip link del {b}) or set another network.bridge in config.toml"
        )));
    }
    if !l
        .ipv4
        .iter()
        .any(|(ip, p)| *ip == cfg.subnet.gateway() && *p == cfg.subnet.prefix())
    {
        link::ip(&["addr", "add", &gw, "dev", b])?;
    }
    if !l.up {
        link::ip(&["link", "set", "dev", b, "up"])?;
    }
    Ok(())
}

fn ensure_tap(id: &str, nat: bool, bridge: &str, owner_uid: u32) -> Result<String> {
    let t = tap_name(id);
    let alias = alias_for(id, nat);
    let what = || format!("preparing tap {t} for VM {id}");
    let (l, created) = match link::show(&t)? {
        Some(l) => (l, false),
        None => {
            tap::create_persistent(&t, owner_uid).map_err(|e| Error::new(what(), e))?;
            (Link::default(), true)
        }
    };
    if !created {
        if l.kind.as_deref() != Some("tun") || l.tun_type.as_deref() != Some("tap") {
            return Err(Error::new(what(), format!("{t} exists and is not a tap"))
                .hint(format!("remove it: sudo ip link del {t}")));
        }
        if let Some((other, _)) = l.alias.as_deref().and_then(parse_alias) {
            if other != id {
                return Err(Error::new(
                    what(),
                    format!("{t} belongs to VM {other} (the ids share their first 10 characters)"),
                )
                .hint("delete one of the two VMs"));
            }
        }
        if !owner_is(l.tun_owner.as_deref(), owner_uid) {
            return Err(Error::new(
                what(),
                format!(
                    "{t} exists owned by {}, not by banger's owner uid {owner_uid}",
                    l.tun_owner.as_deref().unwrap_or("nobody")
                ),
            )
            .hint("stop the VM (banger vm stop) so its tap is recreated"));
        }
    }
    let attach = || -> Result<()> {
        if created || l.master.as_deref() != Some(bridge) || l.alias.as_deref() != Some(&alias) {
            link::ip(&["link", "set", "dev", &t, "master", bridge, "alias", &alias])?;
        }
        // Isolation is set in the same request that brings the port up, before it is up.
        if created || l.master.as_deref() != Some(bridge) || l.isolated != Some(true) || !l.up {
            link::ip(&[
                "link",
                "set",
                "dev",
                &t,
                "up",
                "type",
                "bridge_slave",
                "isolated",
                "on",
            ])?;
        }
        Ok(())
    };
    if let Err(e) = attach() {
        if created {
            let _ = link::delete(&t);
        }
        return Err(e);
    }
    Ok(t)
}

/// Brings VM `id`'s network up: bridge (gateway address, up), banger's nftables rules, the
/// persistent tap owned by `owner_uid` on the bridge with port isolation, and the VM's NAT bit.
/// Idempotent: for a VM whose network is already up it changes nothing.
pub fn net_up(
    layout: &Layout,
    cfg: &NetConfig,
    id: &str,
    ip: Ipv4Addr,
    nat: bool,
    owner_uid: u32,
) -> Result<Up> {
    ensure_bridge(cfg)?;
    let st = nft::read()?;
    let mut script = String::new();
    if !st.rules_current(&cfg.bridge) {
        script += &nft::ensure_script(&cfg.bridge);
    }
    if !script.is_empty() {
        // Rules first: a guest-facing port never exists without them.
        nft::apply(&script)?;
    }
    let tap = ensure_tap(id, nat, &cfg.bridge, owner_uid)?;
    let r = set_nat(layout, &st, id, ip, nat);
    if let Err(e) = r {
        let _ = link::delete(&tap);
        return Err(e);
    }
    Ok(Up {
        tap,
        bridge: cfg.bridge.clone(),
    })
}

fn set_nat(layout: &Layout, st: &nft::TableState, id: &str, ip: Ipv4Addr, nat: bool) -> Result<()> {
    let sysctl = Path::new(forward::IP_FORWARD);
    let mut script = String::new();
    let mut remaining = st.nat.clone();
    remaining.retain(|(a, c)| {
        let stale = (c.as_deref() == Some(id) && !(nat && *a == ip))
            || (nat && *a == ip && c.as_deref() != Some(id));
        if stale {
            script += &nft::delete_nat_line(*a);
        }
        !stale
    });
    if nat && !remaining.iter().any(|(a, _)| *a == ip) {
        script += &nft::add_nat_line(ip, id);
        remaining.push((ip, Some(id.to_string())));
    }
    if nat {
        forward::enable(sysctl, &forward::marker(layout))?;
    }
    nft::apply(&script)?;
    if remaining.is_empty() {
        forward::restore(sysctl, &forward::marker(layout))?;
    }
    Ok(())
}

/// Tears VM `id`'s network down: its tap and its NAT element (forwarding restored when it was
/// the last NAT VM). Idempotent; a tap recorded for another VM is refused.
pub fn net_down(layout: &Layout, id: &str) -> Result<()> {
    let t = tap_name(id);
    if let Some(l) = link::show(&t)? {
        if l.kind.as_deref() != Some("tun") {
            return Err(Error::new(
                format!("removing tap {t} of VM {id}"),
                format!("{t} is not a tap"),
            )
            .hint(format!("remove it by hand: sudo ip link del {t}")));
        }
        if let Some((other, _)) = l.alias.as_deref().and_then(parse_alias) {
            if other != id {
                return Err(Error::new(
                    format!("removing tap {t} of VM {id}"),
                    format!("{t} belongs to VM {other}"),
                ));
            }
        }
        link::delete(&t)?;
    }
    let st = nft::read()?;
    let mine = st.nat_of(id);
    if !mine.is_empty() {
        let script: String = mine.iter().map(|a| nft::delete_nat_line(*a)).collect();
        nft::apply(&script)?;
    }
    if st.nat.len() == mine.len() {
        forward::restore(Path::new(forward::IP_FORWARD), &forward::marker(layout))?;
    }
    Ok(())
}

/// Removes every banger tap (running VMs' too), every banger bridge, the table `inet banger`,
/// and restores forwarding. For uninstall; idempotent. Returns what it removed.
pub fn purge(layout: &Layout) -> Result<Vec<String>> {
    let mut removed = vec![];
    let links = link::all()?;
    for l in links
        .iter()
        .filter(|l| l.name.starts_with(TAP_PREFIX) && l.kind.as_deref() == Some("tun"))
    {
        link::delete(&l.name)?;
        removed.push(format!("tap {}", l.name));
    }
    for l in links
        .iter()
        .filter(|l| l.kind.as_deref() == Some("bridge") && check_bridge_name(&l.name).is_ok())
    {
        link::delete(&l.name)?;
        removed.push(format!("bridge {}", l.name));
    }
    if nft::read()?.present {
        nft::delete_table()?;
        removed.push(format!("nftables table inet {}", nft::TABLE));
    }
    forward::restore(Path::new(forward::IP_FORWARD), &forward::marker(layout))?;
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alias_round_trip() {
        for (id, nat) in [
            ("0123456789ab", false),
            ("0123456789ab", true),
            ("vm-1", true),
        ] {
            assert_eq!(parse_alias(&alias_for(id, nat)), Some((id, nat)));
        }
        assert_eq!(parse_alias("something else"), None);
        assert_eq!(parse_alias(""), None);
    }

    #[test]
    fn owner_table() {
        assert!(owner_is(Some("1000"), 1000));
        assert!(!owner_is(Some("1001"), 1000));
        assert!(!owner_is(None, 1000));
        assert!(owner_is(Some("root"), 0));
        assert!(!owner_is(Some("root"), 1000));
        assert!(!owner_is(Some("no-such-user-here"), 1000));
    }
}
