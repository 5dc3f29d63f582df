//! The helper side of guest networking: `net_up`, `net_down`, `purge` on real kernel objects.
//!
//! Callers pass already-validated values (the helper's validators, or uninstall for `purge`);
//! every interface name is derived here from the VM id. Only interfaces named `bgr-…` (taps) and
//! bridges with a banger bridge name are ever changed, and only the nftables table `inet banger`.
//! Nothing happens at helper start: an existing tap or rule is only read until a call asks for a
//! change, so restarting or updating the helper never touches a running VM's network.
//!
//! Links are read and changed over rtnetlink in-process ([`super::rtnl`]); a VM's NAT element over
//! nf_tables netlink ([`super::nfnl`], read first, changed only when it differs); banger's rules
//! through one `nft -f -` transaction per change (rare). Each tap records its VM in its interface alias,
//! `banger:<id>:<ip>` or `banger:<id>:<ip>:nat`: a second VM whose id shares the tap's
//! 10-character prefix is refused instead of sharing or tearing down another VM's tap, `net_down`
//! knows the NAT address to drop without reading the table, and doctor counts NAT VMs without
//! root.
//!
//! [`State`] remembers, for the life of one helper process, that banger's rules were verified
//! current for a bridge, so a `net_up` then costs one read of the VM's NAT element (and a change
//! only when it differs). The read fails if the table or its set was removed behind banger's back;
//! the helper then forgets, reads the table back and re-asserts the rules.

use super::config::{check_bridge_name, NetConfig};
use super::forward;
use super::names::{tap_name, TAP_PREFIX};
use super::nfnl;
use super::nft;
use super::rtnl::{NlLink, Rtnl};
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

/// What one helper process knows between calls (held under the helper's net lock).
#[derive(Debug, Default)]
pub struct State {
    /// The bridge banger's rules were last verified or written for.
    rules_for: Option<String>,
}

/// A tap's alias: which VM it belongs to, its address and NAT bit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TapAlias {
    /// VM id.
    pub id: String,
    /// Guest address.
    pub ip: Option<Ipv4Addr>,
    /// NAT on.
    pub nat: bool,
}

/// The alias banger writes on VM `id`'s tap.
pub fn alias_for(id: &str, ip: Ipv4Addr, nat: bool) -> String {
    if nat {
        format!("banger:{id}:{ip}:nat")
    } else {
        format!("banger:{id}:{ip}")
    }
}

/// The VM recorded in a tap alias, if it is banger's.
pub fn parse_alias(alias: &str) -> Option<TapAlias> {
    let mut parts = alias.strip_prefix("banger:")?.split(':');
    let id = parts.next().filter(|s| !s.is_empty())?.to_string();
    let ip = parts.next().and_then(|s| s.parse().ok());
    let nat = parts.next() == Some("nat");
    Some(TapAlias { id, ip, nat })
}

fn ensure_bridge(nl: &mut Rtnl, cfg: &NetConfig) -> Result<u32> {
    let b = cfg.bridge.as_str();
    let l = match nl.link(b)? {
        Some(l) => l,
        None => {
            nl.add_bridge(b)?;
            nl.link(b)?.ok_or_else(|| {
                Error::new(format!("creating bridge {b}"), "it vanished right after")
            })?
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
    let (gw, p) = (cfg.subnet.gateway(), cfg.subnet.prefix());
    if !nl.ipv4_addrs(l.index)?.contains(&(gw, p)) {
        nl.add_ipv4(l.index, gw, p)?;
    }
    if !l.up {
        nl.set_up(l.index)?;
    }
    Ok(l.index)
}

fn foreign_owner(l: &NlLink, id: &str) -> Option<String> {
    l.alias
        .as_deref()
        .and_then(parse_alias)
        .filter(|a| a.id != id)
        .map(|a| a.id)
}

fn ensure_tap(
    nl: &mut Rtnl,
    id: &str,
    ip: Ipv4Addr,
    nat: bool,
    bridge: u32,
    owner_uid: u32,
) -> Result<(String, bool)> {
    let t = tap_name(id);
    let alias = alias_for(id, ip, nat);
    let what = || format!("preparing tap {t} for VM {id}");
    let (l, created) = match nl.link(&t)? {
        Some(l) => (l, false),
        None => {
            tap::create_persistent(&t, owner_uid).map_err(|e| Error::new(what(), e))?;
            let l = nl
                .link(&t)?
                .ok_or_else(|| Error::new(what(), "the new tap vanished"))?;
            (l, true)
        }
    };
    if !created {
        if l.kind.as_deref() != Some("tun") || !l.is_tap {
            return Err(Error::new(what(), format!("{t} exists and is not a tap"))
                .hint(format!("remove it: sudo ip link del {t}")));
        }
        if let Some(other) = foreign_owner(&l, id) {
            return Err(Error::new(
                what(),
                format!("{t} belongs to VM {other} (the ids share their first 10 characters)"),
            )
            .hint("delete one of the two VMs"));
        }
        if l.tun_owner != Some(owner_uid) {
            return Err(Error::new(
                what(),
                format!(
                    "{t} exists owned by {}, not by banger's owner uid {owner_uid}",
                    l.tun_owner
                        .map_or("nobody".to_string(), |u| format!("uid {u}"))
                ),
            )
            .hint("stop the VM (banger vm stop) so its tap is recreated"));
        }
    }
    let mut attach = || -> Result<()> {
        if l.master != Some(bridge) || l.alias.as_deref() != Some(&alias) {
            nl.set_master_alias(l.index, bridge, &alias)?;
        }
        // Isolation is set in the same request that brings the port up, before it is up.
        if l.master != Some(bridge) || l.isolated != Some(true) || !l.up {
            nl.isolate_and_up(l.index)?;
        }
        // The VM's MAC lives on its port, whatever another port sends: a clone restored from a
        // snapshot wakes with the source VM's MAC (and its TCP connections) and would otherwise
        // pull the host's packets for a still-running source — an open SSH session — to itself
        // until the agent gave it its own. Every time (idempotent): a bridge re-created behind
        // our back forgot it.
        nl.pin_fdb(l.index, mac_bytes(id))?;
        Ok(())
    };
    if let Err(e) = attach() {
        if created {
            let _ = nl.delete(&t);
        }
        return Err(e);
    }
    Ok((t, created))
}

/// VM `id`'s MAC ([`crate::net::mac_for`], which Firecracker gives its NIC) as bytes.
fn mac_bytes(id: &str) -> [u8; 6] {
    let mut b = [0u8; 6];
    for (out, h) in b.iter_mut().zip(crate::net::mac_for(id).split(':')) {
        *out = u8::from_str_radix(h, 16).unwrap_or(0);
    }
    b
}

/// True when any banger tap records NAT.
fn nat_vms_remain(nl: &mut Rtnl) -> Result<bool> {
    Ok(nl.links()?.iter().any(|l| {
        l.name.starts_with(TAP_PREFIX)
            && l.alias
                .as_deref()
                .and_then(parse_alias)
                .is_some_and(|a| a.nat)
    }))
}

/// Bridge, rules, tap: the first part of [`net_up`]. Returns the rtnetlink socket, the
/// tap's name and whether this call created it.
fn bridge_rules_tap(
    state: &mut State,
    cfg: &NetConfig,
    id: &str,
    ip: Ipv4Addr,
    nat: bool,
    owner_uid: u32,
) -> Result<(Rtnl, String, bool)> {
    let mut nl = Rtnl::open()?;
    let bridge = ensure_bridge(&mut nl, cfg)?;
    if state.rules_for.as_deref() != Some(cfg.bridge.as_str()) {
        assert_rules(state, cfg)?;
    }
    let (tap, created) = ensure_tap(&mut nl, id, ip, nat, bridge, owner_uid)?;
    Ok((nl, tap, created))
}

/// Brings VM `id`'s network up: bridge (gateway address, up), banger's nftables rules, the
/// persistent tap owned by `owner_uid` on the bridge with port isolation, and the VM's NAT bit.
/// Idempotent: for a VM whose network is already up it changes nothing.
pub fn net_up(
    layout: &Layout,
    state: &mut State,
    cfg: &NetConfig,
    id: &str,
    ip: Ipv4Addr,
    nat: bool,
    owner_uid: u32,
) -> Result<Up> {
    let (mut nl, tap, created) = bridge_rules_tap(state, cfg, id, ip, nat, owner_uid)?;
    let sysctl = Path::new(forward::IP_FORWARD);
    let marker = forward::marker(layout);
    let r = (|| -> Result<()> {
        if nat {
            forward::enable(sysctl, &marker)?;
        }
        if let Err(first) = nfnl::set_exactly(ip, id, nat) {
            // The table may have been removed behind our back: read it back, re-assert, retry.
            state.rules_for = None;
            assert_rules(state, cfg).map_err(|_| first)?;
            nfnl::set_exactly(ip, id, nat)?;
        }
        if !nat && marker.exists() && !nat_vms_remain(&mut nl)? {
            forward::restore(sysctl, &marker)?;
        }
        Ok(())
    })();
    if let Err(e) = r {
        if created {
            let _ = nl.delete(&tap);
        }
        return Err(e);
    }
    Ok(Up {
        tap,
        bridge: cfg.bridge.clone(),
    })
}

/// Reads the table back and rewrites banger's rules (one transaction) unless they are current.
fn assert_rules(state: &mut State, cfg: &NetConfig) -> Result<()> {
    let st = nft::read()?;
    if !st.rules_current(&cfg.bridge) {
        // Rules first: a guest-facing port never exists without them.
        nft::apply(&nft::ensure_script(&cfg.bridge))?;
    }
    state.rules_for = Some(cfg.bridge.clone());
    Ok(())
}

/// Tears VM `id`'s network down: its tap and its NAT element (forwarding restored when it was
/// the last NAT VM). Idempotent; a tap recorded for another VM is refused.
pub fn net_down(layout: &Layout, id: &str) -> Result<()> {
    let mut nl = Rtnl::open()?;
    let t = tap_name(id);
    let what = || format!("removing tap {t} of VM {id}");
    let mut nat_ips: Vec<Ipv4Addr> = vec![];
    match nl.link(&t)? {
        Some(l) => {
            if l.kind.as_deref() != Some("tun") {
                return Err(Error::new(what(), format!("{t} is not a tap"))
                    .hint(format!("remove it by hand: sudo ip link del {t}")));
            }
            if let Some(other) = foreign_owner(&l, id) {
                return Err(Error::new(what(), format!("{t} belongs to VM {other}")));
            }
            nl.delete(&t)?;
            match l.alias.as_deref().and_then(parse_alias) {
                Some(TapAlias {
                    ip: Some(ip),
                    nat: true,
                    ..
                }) => nat_ips.push(ip),
                Some(TapAlias { ip: Some(_), .. }) => {}
                // No usable record on the tap: look the VM up in the table.
                _ => nat_ips = nft::read()?.nat_of(id),
            }
        }
        // No tap (already down, or removed by hand): the table is the only record left.
        None => nat_ips = nft::read()?.nat_of(id),
    }
    if !nat_ips.is_empty() {
        let changes: Vec<nfnl::Change<'_>> = nat_ips
            .iter()
            .flat_map(|a| [nfnl::Change::Add(*a, id), nfnl::Change::Delete(*a)])
            .collect();
        if let Err(e) = nfnl::apply(&changes) {
            if nft::read()?.present {
                return Err(e);
            }
        }
    }
    let marker = forward::marker(layout);
    if marker.exists() && !nat_vms_remain(&mut nl)? {
        forward::restore(Path::new(forward::IP_FORWARD), &marker)?;
    }
    Ok(())
}

/// Removes every banger tap (running VMs' too), every banger bridge, the table `inet banger`,
/// and restores forwarding. For uninstall; idempotent. Returns what it removed.
pub fn purge(layout: &Layout) -> Result<Vec<String>> {
    let mut nl = Rtnl::open()?;
    let mut removed = vec![];
    let links = nl.links()?;
    for l in links
        .iter()
        .filter(|l| l.name.starts_with(TAP_PREFIX) && l.kind.as_deref() == Some("tun"))
    {
        nl.delete(&l.name)?;
        removed.push(format!("tap {}", l.name));
    }
    for l in links
        .iter()
        .filter(|l| l.kind.as_deref() == Some("bridge") && check_bridge_name(&l.name).is_ok())
    {
        nl.delete(&l.name)?;
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
        let ip: Ipv4Addr = "172.30.0.9".parse().unwrap();
        for (id, nat) in [
            ("0123456789ab", false),
            ("0123456789ab", true),
            ("vm-1", true),
        ] {
            assert_eq!(
                parse_alias(&alias_for(id, ip, nat)),
                Some(TapAlias {
                    id: id.into(),
                    ip: Some(ip),
                    nat
                })
            );
        }
        assert_eq!(parse_alias("something else"), None);
        assert_eq!(parse_alias("banger:"), None);
        assert_eq!(
            parse_alias("banger:abc"),
            Some(TapAlias {
                id: "abc".into(),
                ip: None,
                nat: false
            })
        );
    }
}
