//! `[network]` of `/etc/banger/config.toml`: the bridge name and the guest subnet.
//!
//! Owns parsing and validation (a bad value is an error naming the key, the value and the allowed
//! form; unknown keys are refused) and the subnet's address arithmetic. It never touches the host.

use crate::error::{Error, Result};
use crate::layout::Layout;
use std::fmt;
use std::net::Ipv4Addr;

/// The bridge name when `network.bridge` is unset.
pub const DEFAULT_BRIDGE: &str = "banger0";
/// The guest subnet when `network.subnet` is unset.
pub const DEFAULT_SUBNET: &str = "172.30.0.0/24";

/// The keys `[network]` accepts.
const KEYS: [&str; 2] = ["bridge", "subnet"];
const BRIDGE_FORM: &str = "`banger0` or `banger-` followed by 1-8 of a-z, 0-9";
const SUBNET_FORM: &str =
    "a private IPv4 network `a.b.c.d/n` in 10/8, 172.16/12 or 192.168/16, prefix 16-29, host bits zero";

/// The validated `[network]` section.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// The host bridge every guest tap is attached to.
    pub bridge: String,
    /// The guest subnet; the bridge takes its first host address.
    pub subnet: Subnet,
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig {
            bridge: DEFAULT_BRIDGE.to_string(),
            subnet: Subnet {
                network: Ipv4Addr::new(172, 30, 0, 0),
                prefix: 24,
            },
        }
    }
}

fn bad_key(origin: &str, key: &str, value: &str, why: &str, form: &str) -> Error {
    Error::new(
        format!("{origin}: network.{key} = {value:?}"),
        format!("{why}; allowed: {form}"),
    )
    .hint(format!(
        "fix network.{key} in {origin}, or remove it to use the default"
    ))
}

impl NetConfig {
    /// `[network]` of `layout.config_toml()`; a missing file or section gives the defaults.
    /// A bad value is an Error naming the key (`network.bridge` / `network.subnet`), the bad value
    /// and the allowed form. Unknown keys in `[network]` are refused too.
    pub fn load(layout: &Layout) -> Result<NetConfig> {
        let path = layout.config_toml();
        let text = match std::fs::read(&path) {
            Ok(b) => String::from_utf8(b).map_err(|_| {
                Error::new(format!("reading {}", path.display()), "not UTF-8")
                    .hint("fix or remove the file")
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(NetConfig::default()),
            Err(e) => {
                return Err(Error::new(format!("reading {}", path.display()), e)
                    .hint("check the file's permissions"))
            }
        };
        Self::parse_from(&text, &path.display().to_string())
    }

    /// Parses config.toml text (only `[network]` is read).
    pub fn parse(toml_text: &str) -> Result<NetConfig> {
        Self::parse_from(toml_text, "config.toml")
    }

    fn parse_from(text: &str, origin: &str) -> Result<NetConfig> {
        let doc: toml::Table = toml::from_str(text).map_err(|e| {
            Error::new(format!("parsing {origin}"), e.message().trim())
                .hint("fix the TOML syntax or remove the file")
        })?;
        let mut cfg = NetConfig::default();
        let Some(section) = doc.get("network") else {
            return Ok(cfg);
        };
        let Some(section) = section.as_table() else {
            return Err(
                Error::new(format!("{origin}: network"), "must be a table ([network])").hint(
                    format!("write the settings under a [network] header in {origin}"),
                ),
            );
        };
        let unknown: Vec<&str> = section
            .keys()
            .map(String::as_str)
            .filter(|k| !KEYS.contains(k))
            .collect();
        if !unknown.is_empty() {
            let names: Vec<String> = unknown.iter().map(|k| format!("network.{k}")).collect();
            return Err(Error::new(
                format!("{origin}: {}", names.join(", ")),
                format!(
                    "unknown key (allowed: {})",
                    KEYS.map(|k| format!("network.{k}")).join(", ")
                ),
            )
            .hint(format!("remove it from {origin}")));
        }
        if let Some(v) = section.get("bridge") {
            let s = v.as_str().ok_or_else(|| {
                bad_key(
                    origin,
                    "bridge",
                    &v.to_string(),
                    "not a string",
                    BRIDGE_FORM,
                )
            })?;
            check_bridge_name(s).map_err(|why| bad_key(origin, "bridge", s, &why, BRIDGE_FORM))?;
            cfg.bridge = s.to_string();
        }
        if let Some(v) = section.get("subnet") {
            let s = v.as_str().ok_or_else(|| {
                bad_key(
                    origin,
                    "subnet",
                    &v.to_string(),
                    "not a string",
                    SUBNET_FORM,
                )
            })?;
            cfg.subnet =
                Subnet::parse(s).map_err(|why| bad_key(origin, "subnet", s, &why, SUBNET_FORM))?;
        }
        Ok(cfg)
    }
}

/// Bridge name: `banger0` or `banger-<1..8 of [a-z0-9]>`.
pub fn check_bridge_name(name: &str) -> std::result::Result<(), String> {
    if name == DEFAULT_BRIDGE {
        return Ok(());
    }
    let Some(rest) = name.strip_prefix("banger-") else {
        return Err(format!(
            "`{name}` is not `banger0` and does not start with `banger-`"
        ));
    };
    if rest.is_empty() || rest.len() > 8 {
        return Err(format!("`{name}`: 1-8 characters must follow `banger-`"));
    }
    if !rest
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    {
        return Err(format!("`{name}`: only a-z and 0-9 may follow `banger-`"));
    }
    Ok(())
}

/// An IPv4 network: address with zero host bits, and a prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Subnet {
    network: Ipv4Addr,
    prefix: u8,
}

fn mask_bits(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix))
    }
}

fn is_private(net: Ipv4Addr, prefix: u8) -> bool {
    let n = u32::from(net);
    let inside =
        |base: [u8; 4], p: u8| prefix >= p && n & mask_bits(p) == u32::from(Ipv4Addr::from(base));
    inside([10, 0, 0, 0], 8) || inside([172, 16, 0, 0], 12) || inside([192, 168, 0, 0], 16)
}

impl Subnet {
    /// "a.b.c.d/n": private IPv4 (10/8, 172.16/12, 192.168/16), prefix 16..=29, host bits zero.
    pub fn parse(s: &str) -> std::result::Result<Subnet, String> {
        let (addr, prefix) = s
            .split_once('/')
            .ok_or_else(|| format!("`{s}` has no `/prefix`"))?;
        let network: Ipv4Addr = addr
            .parse()
            .map_err(|_| format!("`{addr}` is not an IPv4 address"))?;
        if prefix.is_empty() || !prefix.bytes().all(|b| b.is_ascii_digit()) || prefix.len() > 2 {
            return Err(format!("`/{prefix}` is not a prefix length"));
        }
        let prefix: u8 = prefix
            .parse()
            .map_err(|_| format!("`/{prefix}` is not a prefix length"))?;
        if !(16..=29).contains(&prefix) {
            return Err(format!("prefix /{prefix} is outside 16-29"));
        }
        if u32::from(network) & !mask_bits(prefix) != 0 {
            return Err(format!("`{s}` has host bits set"));
        }
        if !is_private(network, prefix) {
            return Err(format!("`{s}` is not inside a private IPv4 range"));
        }
        Ok(Subnet { network, prefix })
    }

    /// The network address.
    pub fn network(&self) -> Ipv4Addr {
        self.network
    }
    /// The prefix length.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }
    /// The netmask, e.g. 255.255.255.0 for /24.
    pub fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(mask_bits(self.prefix))
    }
    /// The first host address: the bridge's.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) + 1)
    }
    /// The broadcast address.
    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) | !mask_bits(self.prefix))
    }
    /// True when `ip` lies inside the subnet (network and broadcast included).
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & mask_bits(self.prefix) == u32::from(self.network)
    }
    /// Inside the subnet and not network / gateway / broadcast.
    pub fn is_guest_address(&self, ip: Ipv4Addr) -> bool {
        self.contains(ip) && ip != self.network && ip != self.gateway() && ip != self.broadcast()
    }
    /// Every guest address, lowest first.
    pub fn guest_addresses(&self) -> impl Iterator<Item = Ipv4Addr> {
        let first = u32::from(self.network) + 2;
        let last = u32::from(self.broadcast()) - 1;
        (first..=last).map(Ipv4Addr::from)
    }
    /// True when this subnet and `other_net/other_prefix` share any address.
    pub fn overlaps(&self, other_net: Ipv4Addr, other_prefix: u8) -> bool {
        let p = self.prefix.min(other_prefix.min(32));
        let m = mask_bits(p);
        u32::from(self.network) & m == u32::from(other_net) & m
    }
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::system::testutil::TempDir;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn bridge_name_table() {
        for ok in ["banger0", "banger-a", "banger-0", "banger-abcd1234"] {
            assert!(check_bridge_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "banger",
            "banger1",
            "banger-",
            "banger-abcd12345",
            "banger-A",
            "banger-a_b",
            "banger-a-b",
            "br0",
            "eth0",
            "banger0 ",
            "banger-é",
            "x-banger0",
        ] {
            assert!(check_bridge_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn subnet_parse_table() {
        for (ok, net, prefix) in [
            ("172.30.0.0/24", "172.30.0.0", 24),
            ("10.0.0.0/16", "10.0.0.0", 16),
            ("192.168.7.8/29", "192.168.7.8", 29),
            ("172.16.0.0/16", "172.16.0.0", 16),
            ("172.31.255.248/29", "172.31.255.248", 29),
        ] {
            let s = Subnet::parse(ok).unwrap();
            assert_eq!((s.network(), s.prefix()), (ip(net), prefix), "{ok}");
            assert_eq!(s.to_string(), ok);
        }
        for bad in [
            "",
            "172.30.0.0",
            "172.30.0.0/",
            "172.30.0.0/15",
            "172.30.0.0/30",
            "172.30.0.0/32",
            "172.30.0.1/24",
            "8.8.8.0/24",
            "172.32.0.0/24",
            "192.169.0.0/24",
            "11.0.0.0/16",
            "172.30.0.0/+24",
            "172.30.0.0/024",
            "172.30.0/24",
            "::1/64",
            "172.30.0.0/24 ",
            "a.b.c.d/24",
            "100.64.0.0/16",
        ] {
            assert!(Subnet::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn subnet_arithmetic() {
        let s = Subnet::parse("172.30.0.0/24").unwrap();
        assert_eq!(s.netmask(), ip("255.255.255.0"));
        assert_eq!(s.gateway(), ip("172.30.0.1"));
        assert_eq!(s.broadcast(), ip("172.30.0.255"));
        assert!(s.contains(ip("172.30.0.0")) && s.contains(ip("172.30.0.255")));
        assert!(!s.contains(ip("172.30.1.0")) && !s.contains(ip("172.29.255.255")));
        for (a, guest) in [
            ("172.30.0.0", false),
            ("172.30.0.1", false),
            ("172.30.0.2", true),
            ("172.30.0.254", true),
            ("172.30.0.255", false),
            ("172.30.1.2", false),
            ("10.0.0.2", false),
        ] {
            assert_eq!(s.is_guest_address(ip(a)), guest, "{a}");
        }
        let all: Vec<Ipv4Addr> = s.guest_addresses().collect();
        assert_eq!(all.len(), 253);
        assert_eq!(all[0], ip("172.30.0.2"));
        assert_eq!(all[252], ip("172.30.0.254"));
        let small = Subnet::parse("10.1.2.8/29").unwrap();
        assert_eq!(small.netmask(), ip("255.255.255.248"));
        let g: Vec<String> = small.guest_addresses().map(|a| a.to_string()).collect();
        assert_eq!(
            g,
            [
                "10.1.2.10",
                "10.1.2.11",
                "10.1.2.12",
                "10.1.2.13",
                "10.1.2.14"
            ]
        );
        let wide = Subnet::parse("10.9.0.0/16").unwrap();
        assert_eq!(wide.broadcast(), ip("10.9.255.255"));
        assert_eq!(wide.guest_addresses().count(), 65533);
    }

    #[test]
    fn overlaps_table() {
        let s = Subnet::parse("172.30.0.0/24").unwrap();
        for (net, p, want) in [
            ("0.0.0.0", 0, true),
            ("172.16.0.0", 12, true),
            ("172.30.0.0", 24, true),
            ("172.30.0.128", 25, true),
            ("172.30.0.7", 32, true),
            ("172.30.1.0", 24, false),
            ("172.29.0.0", 16, false),
            ("10.0.0.0", 8, false),
            ("192.168.1.0", 24, false),
        ] {
            assert_eq!(s.overlaps(ip(net), p), want, "{net}/{p}");
        }
    }

    #[test]
    fn parse_defaults_and_values() {
        assert_eq!(NetConfig::parse("").unwrap(), NetConfig::default());
        assert_eq!(
            NetConfig::parse("[other]\nx = 1\n").unwrap(),
            NetConfig::default()
        );
        assert_eq!(
            NetConfig::parse("[network]\n").unwrap(),
            NetConfig::default()
        );
        let d = NetConfig::default();
        assert_eq!(d.bridge, DEFAULT_BRIDGE);
        assert_eq!(d.subnet.to_string(), DEFAULT_SUBNET);
        let c = NetConfig::parse("[network]\nbridge = \"banger-t1\"\nsubnet = \"10.7.0.0/16\"\n")
            .unwrap();
        assert_eq!(c.bridge, "banger-t1");
        assert_eq!(c.subnet, Subnet::parse("10.7.0.0/16").unwrap());
    }

    #[test]
    fn parse_refusals_name_the_key() {
        for (text, key) in [
            ("[network]\nbridge = \"br0\"\n", "network.bridge"),
            ("[network]\nbridge = 3\n", "network.bridge"),
            ("[network]\nsubnet = \"8.8.8.0/24\"\n", "network.subnet"),
            ("[network]\nsubnet = \"172.30.0.1/24\"\n", "network.subnet"),
            ("[network]\nsubnet = 24\n", "network.subnet"),
            ("[network]\nbrige = \"banger0\"\n", "network.brige"),
            ("network = 1\n", "network"),
            ("[network\n", "parsing"),
        ] {
            let e = NetConfig::parse(text).unwrap_err();
            let msg = e.to_string();
            assert!(msg.contains(key), "{text:?}: {msg}");
        }
        let e = NetConfig::parse("[network]\nsubnet = \"8.8.8.0/24\"\n").unwrap_err();
        assert!(e.to_string().contains("8.8.8.0/24"), "{e}");
        assert!(e.to_string().contains("private IPv4"), "{e}");
        let e = NetConfig::parse("[network]\nbridge = \"br0\"\n").unwrap_err();
        assert!(e.to_string().contains("banger-"), "{e}");
    }

    #[test]
    fn load_missing_file_is_default_and_bad_file_names_path() {
        let t = TempDir::new();
        let l = Layout::under(t.path());
        assert_eq!(NetConfig::load(&l).unwrap(), NetConfig::default());
        std::fs::create_dir_all(l.etc_dir()).unwrap();
        std::fs::write(l.config_toml(), "[network]\nsubnet = \"172.30.0.0/33\"\n").unwrap();
        let e = NetConfig::load(&l).unwrap_err();
        assert!(
            e.to_string()
                .contains(&l.config_toml().display().to_string()),
            "{e}"
        );
        assert!(e.to_string().contains("network.subnet"), "{e}");
        std::fs::write(l.config_toml(), "[network]\nbridge = \"banger-x\"\n").unwrap();
        assert_eq!(NetConfig::load(&l).unwrap().bridge, "banger-x");
    }
}
