//! Reads network interfaces back from `ip -d -j addr show` (the namespace of the calling process,
//! never sysfs, which shows the namespace that mounted it): doctor's and the tests' view, the same
//! one an operator gets from `ip -d link`. Read-only; the helper changes links over rtnetlink.
//!
//! Owns the parsing of iproute2's JSON; table-tested against real output.

use super::cmd::{self, IP};
use crate::error::{Error, Result};
use serde_json::Value;
use std::net::Ipv4Addr;

/// One interface as iproute2 reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Link {
    /// Interface name.
    pub name: String,
    /// Interface index.
    pub ifindex: u64,
    /// Administratively up.
    pub up: bool,
    /// `info_kind` (`bridge`, `tun`, …), if any.
    pub kind: Option<String>,
    /// For tun devices: `tap` or `tun`.
    pub tun_type: Option<String>,
    /// For tun devices: the owner as iproute2 prints it (a user name, or a uid when unnamed).
    pub tun_owner: Option<String>,
    /// For tun devices: persistent.
    pub persist: bool,
    /// Name of the master (bridge), if enslaved.
    pub master: Option<String>,
    /// Bridge port isolation, when enslaved to a bridge.
    pub isolated: Option<bool>,
    /// The interface alias (banger records the VM id on its taps).
    pub alias: Option<String>,
    /// IPv4 addresses with prefix length.
    pub ipv4: Vec<(Ipv4Addr, u8)>,
}

/// Parses `ip -d -j addr show` / `ip -d -j link show` output.
pub fn parse(json: &str) -> Result<Vec<Link>> {
    let v: Value =
        serde_json::from_str(json.trim()).map_err(|e| Error::new("parsing `ip -j` output", e))?;
    let arr = v
        .as_array()
        .ok_or_else(|| Error::new("parsing `ip -j` output", "not a JSON array"))?;
    Ok(arr.iter().map(one).collect())
}

fn one(v: &Value) -> Link {
    let s = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
    let info = v.get("linkinfo").cloned().unwrap_or(Value::Null);
    let data = info.get("info_data").cloned().unwrap_or(Value::Null);
    let slave = info.get("info_slave_data").cloned().unwrap_or(Value::Null);
    let owner = match data.get("user") {
        Some(Value::String(u)) => Some(u.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    };
    let ipv4 = v
        .get("addr_info")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter(|x| x.get("family").and_then(Value::as_str) == Some("inet"))
                .filter_map(|x| {
                    let ip = x.get("local")?.as_str()?.parse().ok()?;
                    let p = u8::try_from(x.get("prefixlen")?.as_u64()?).ok()?;
                    Some((ip, p))
                })
                .collect()
        })
        .unwrap_or_default();
    Link {
        name: s(v, "ifname").unwrap_or_default(),
        ifindex: v.get("ifindex").and_then(Value::as_u64).unwrap_or(0),
        up: v
            .get("flags")
            .and_then(Value::as_array)
            .is_some_and(|f| f.iter().any(|x| x.as_str() == Some("UP"))),
        kind: s(&info, "info_kind"),
        tun_type: s(&data, "type"),
        tun_owner: owner,
        persist: data
            .get("persist")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        master: s(v, "master"),
        isolated: slave.get("isolated").and_then(Value::as_bool),
        alias: s(v, "ifalias"),
        ipv4,
    }
}

/// Every interface.
pub fn all() -> Result<Vec<Link>> {
    parse(&cmd::check(IP, &["-d", "-j", "addr", "show"], None)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TAP: &str = r#"[{"ifindex":3,"ifname":"bgr-abc","flags":["NO-CARRIER","BROADCAST","MULTICAST","UP"],"mtu":1500,"master":"banger0","operstate":"DOWN","linkinfo":{"info_kind":"tun","info_data":{"type":"tap","pi":false,"vnet_hdr":true,"multi_queue":false,"persist":true,"user":"cloudsdk"},"info_slave_kind":"bridge","info_slave_data":{"state":"disabled","isolated":true,"locked":false}},"ifalias":"vmabc","addr_info":[]}]"#;
    const BRIDGE: &str = r#"[{"ifindex":2,"ifname":"banger0","flags":["BROADCAST","MULTICAST"],"linkinfo":{"info_kind":"bridge","info_data":{"stp_state":0}},"addr_info":[{"family":"inet","local":"172.30.0.1","prefixlen":24,"scope":"global"},{"family":"inet6","local":"fe80::1","prefixlen":64}]},{"ifindex":4,"ifname":"bgr-x","flags":["UP"],"linkinfo":{"info_kind":"tun","info_data":{"type":"tap","persist":true,"user":1234}}}]"#;

    #[test]
    fn parses_tap() {
        let l = parse(TAP).unwrap();
        assert_eq!(
            l,
            vec![Link {
                name: "bgr-abc".into(),
                ifindex: 3,
                up: true,
                kind: Some("tun".into()),
                tun_type: Some("tap".into()),
                tun_owner: Some("cloudsdk".into()),
                persist: true,
                master: Some("banger0".into()),
                isolated: Some(true),
                alias: Some("vmabc".into()),
                ipv4: vec![],
            }]
        );
    }

    #[test]
    fn parses_bridge_and_numeric_owner() {
        let l = parse(BRIDGE).unwrap();
        assert_eq!(l.len(), 2);
        assert_eq!(l[0].kind.as_deref(), Some("bridge"));
        assert!(!l[0].up);
        assert_eq!(l[0].ipv4, vec![("172.30.0.1".parse().unwrap(), 24)]);
        assert_eq!(l[0].master, None);
        assert_eq!(l[0].isolated, None);
        assert_eq!(l[1].tun_owner.as_deref(), Some("1234"));
        assert!(l[1].persist);
    }

    #[test]
    fn refuses_garbage() {
        for bad in ["", "{}", "not json", "[1"] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(parse("[]").unwrap(), vec![]);
    }
}
