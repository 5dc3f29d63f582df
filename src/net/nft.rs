//! banger's nftables table `inet banger`: the ruleset, the NAT set, and reading them back.
//!
//! Everything lives in that one table; nothing outside it is ever read-modified. All changes are
//! `nft -f -` transactions (atomic), except a VM's NAT element, which [`super::nfnl`] adds and
//! removes over netlink (on every VM start's path). The rules never grow with VMs: per-VM NAT is
//! one element of the set `nat_guests` (the guest address, with the VM id as the element's comment
//! so `net_down` can find it by id).
//!
//! Rules (`B` = the bridge): input from B is established/related only, else dropped (guests cannot
//! open connections to the host); forward to B is established/related only; forward from B only
//! for `@nat_guests`; masquerade for `@nat_guests` leaving via any interface but B. Every rule
//! carries the comment `banger:<RULES_VERSION>:<B>:<n>`, so [`TableState::rules_current`] can tell
//! "exactly our current rules" from anything else and the rules are rewritten only then (never on
//! a plain helper restart or a repeated `net_up`).

use super::cmd::{self, NFT};
use crate::error::{Error, Result};
use serde_json::Value;
use std::collections::BTreeMap;
use std::net::Ipv4Addr;

/// The table's family and name.
pub const TABLE: &str = "banger";
/// The set of guest addresses with NAT.
pub const NAT_SET: &str = "nat_guests";
/// Bumped whenever the rules below change, so an updated helper rewrites them on its next net_up.
pub const RULES_VERSION: u32 = 1;

/// banger's rules, chain by chain (`B` stands for the quoted bridge name).
fn rules(bridge: &str) -> Vec<(&'static str, String)> {
    let b = format!("\"{bridge}\"");
    vec![
        (
            "input",
            format!("iifname {b} ct state established,related accept"),
        ),
        ("input", format!("iifname {b} drop")),
        (
            "forward",
            format!("oifname {b} ct state established,related accept"),
        ),
        ("forward", format!("oifname {b} drop")),
        ("forward", format!("iifname {b} ip saddr @{NAT_SET} accept")),
        ("forward", format!("iifname {b} drop")),
        (
            "postrouting",
            format!("oifname != {b} ip saddr @{NAT_SET} masquerade"),
        ),
    ]
}

const CHAINS: [(&str, &str); 3] = [
    (
        "input",
        "type filter hook input priority filter; policy accept;",
    ),
    (
        "forward",
        "type filter hook forward priority filter; policy accept;",
    ),
    (
        "postrouting",
        "type nat hook postrouting priority srcnat; policy accept;",
    ),
];

fn marker(bridge: &str, n: usize) -> String {
    format!("banger:{RULES_VERSION}:{bridge}:{n}")
}

/// The transaction that (re)creates the table, its set and chains, and replaces the chains' rules
/// with the current ones. Set elements are kept.
pub fn ensure_script(bridge: &str) -> String {
    let mut s = format!("add table inet {TABLE}\n");
    s += &format!("add set inet {TABLE} {NAT_SET} {{ type ipv4_addr; }}\n");
    for (c, spec) in CHAINS {
        s += &format!("add chain inet {TABLE} {c} {{ {spec} }}\n");
        s += &format!("flush chain inet {TABLE} {c}\n");
    }
    for (n, (c, r)) in rules(bridge).into_iter().enumerate() {
        s += &format!(
            "add rule inet {TABLE} {c} {r} comment \"{}\"\n",
            marker(bridge, n)
        );
    }
    s
}

/// What `nft -j list table inet banger` showed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TableState {
    /// The table exists.
    pub present: bool,
    /// The NAT set exists.
    pub set_present: bool,
    /// Rule comments per chain, in order (`None` for a rule without one).
    pub chains: BTreeMap<String, Vec<Option<String>>>,
    /// NAT set elements: address and comment (the VM id).
    pub nat: Vec<(Ipv4Addr, Option<String>)>,
}

impl TableState {
    /// True when the chains hold exactly the current rules for `bridge`.
    pub fn rules_current(&self, bridge: &str) -> bool {
        if !self.present || !self.set_present {
            return false;
        }
        let want = rules(bridge);
        CHAINS.iter().all(|(c, _)| {
            let expect: Vec<Option<String>> = want
                .iter()
                .enumerate()
                .filter(|(_, (wc, _))| wc == c)
                .map(|(n, _)| Some(marker(bridge, n)))
                .collect();
            self.chains.get(*c) == Some(&expect)
        })
    }

    /// The NAT addresses recorded for VM `id`.
    pub fn nat_of(&self, id: &str) -> Vec<Ipv4Addr> {
        self.nat
            .iter()
            .filter(|(_, c)| c.as_deref() == Some(id))
            .map(|(ip, _)| *ip)
            .collect()
    }
}

/// Parses `nft -j list table inet banger`.
pub fn parse(json: &str) -> Result<TableState> {
    let v: Value =
        serde_json::from_str(json.trim()).map_err(|e| Error::new("parsing `nft -j` output", e))?;
    let items = v
        .get("nftables")
        .and_then(Value::as_array)
        .ok_or_else(|| Error::new("parsing `nft -j` output", "no `nftables` array"))?;
    let mut st = TableState::default();
    for it in items {
        if let Some(t) = it.get("table") {
            st.present |= t.get("name").and_then(Value::as_str) == Some(TABLE);
        }
        if let Some(c) = it.get("chain") {
            if let Some(n) = c.get("name").and_then(Value::as_str) {
                st.chains.entry(n.to_string()).or_default();
            }
        }
        if let Some(r) = it.get("rule") {
            if let Some(n) = r.get("chain").and_then(Value::as_str) {
                let comment = r.get("comment").and_then(Value::as_str).map(str::to_string);
                st.chains.entry(n.to_string()).or_default().push(comment);
            }
        }
        if let Some(s) = it.get("set") {
            if s.get("name").and_then(Value::as_str) == Some(NAT_SET) {
                st.set_present = true;
                for e in s
                    .get("elem")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    let (val, comment) = match e.get("elem") {
                        Some(inner) => (
                            inner.get("val"),
                            inner.get("comment").and_then(Value::as_str),
                        ),
                        None => (Some(e), None),
                    };
                    if let Some(ip) = val.and_then(Value::as_str).and_then(|s| s.parse().ok()) {
                        st.nat.push((ip, comment.map(str::to_string)));
                    }
                }
            }
        }
    }
    Ok(st)
}

/// Reads the table back (`present: false` when it does not exist).
pub fn read() -> Result<TableState> {
    let r = cmd::run(NFT, &["-j", "list", "table", "inet", TABLE], None)?;
    if !r.ok {
        if r.stderr.contains("No such file or directory") {
            return Ok(TableState::default());
        }
        return Err(Error::new(
            format!("reading nftables table inet {TABLE}"),
            r.stderr.replace('\n', "; "),
        )
        .hint("check that nftables works here: sudo nft list tables"));
    }
    parse(&r.stdout)
}

/// Applies `script` as one atomic transaction.
pub fn apply(script: &str) -> Result<()> {
    if script.is_empty() {
        return Ok(());
    }
    let ran = cmd::run(NFT, &["-f", "-"], Some(script))?;
    if ran.ok {
        return Ok(());
    }
    Err(Error::new(
        format!("applying nftables changes to inet {TABLE}"),
        if ran.stderr.is_empty() {
            "failed without a message".to_string()
        } else {
            ran.stderr.replace('\n', "; ")
        },
    ))
}

/// `add element` line for VM `id` at `ip`.
pub fn add_nat_line(ip: Ipv4Addr, id: &str) -> String {
    format!("add element inet {TABLE} {NAT_SET} {{ {ip} comment \"{id}\" }}\n")
}

/// Deletes the whole table; absent is fine.
pub fn delete_table() -> Result<()> {
    let r = cmd::run(NFT, &["delete", "table", "inet", TABLE], None)?;
    if r.ok || r.stderr.contains("No such file or directory") {
        Ok(())
    } else {
        Err(Error::new(
            format!("deleting nftables table inet {TABLE}"),
            r.stderr.replace('\n', "; "),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn script_names_one_table_and_marks_every_rule() {
        let s = ensure_script("banger0");
        for line in s.lines() {
            assert!(
                line.contains(" inet banger ") || line.ends_with(" inet banger"),
                "outside the table: {line}"
            );
        }
        assert_eq!(s.matches("add rule").count(), rules("banger0").len());
        assert_eq!(s.matches("comment \"banger:1:banger0:").count(), 7);
        assert!(s.contains("add rule inet banger input iifname \"banger0\" drop comment"));
        assert!(s.contains("masquerade"));
        assert!(s.contains("flush chain inet banger forward"));
        assert!(!s.contains("flush set"), "elements must survive");
    }

    fn listed(bridge: &str, nat: &str) -> String {
        let mut items = vec![
            r#"{"metainfo":{"version":"1.0.6"}}"#.to_string(),
            r#"{"table":{"family":"inet","name":"banger","handle":1}}"#.to_string(),
            format!(
                r#"{{"set":{{"family":"inet","name":"nat_guests","table":"banger","type":"ipv4_addr","handle":1{nat}}}}}"#
            ),
        ];
        for (c, _) in CHAINS {
            items.push(format!(
                r#"{{"chain":{{"family":"inet","table":"banger","name":"{c}"}}}}"#
            ));
        }
        for (n, (c, _)) in rules(bridge).into_iter().enumerate() {
            items.push(format!(
                r#"{{"rule":{{"family":"inet","table":"banger","chain":"{c}","handle":{n},"expr":[],"comment":"{}"}}}}"#,
                marker(bridge, n)
            ));
        }
        format!(r#"{{"nftables":[{}]}}"#, items.join(","))
    }

    #[test]
    fn parses_state_and_nat_elements() {
        let j = listed(
            "banger0",
            r#","elem":[{"elem":{"val":"172.30.0.2","comment":"aaa"}},"172.30.0.9"]"#,
        );
        let st = parse(&j).unwrap();
        assert!(st.present && st.set_present);
        assert!(st.rules_current("banger0"));
        assert!(!st.rules_current("banger-x"));
        assert_eq!(
            st.nat,
            vec![
                ("172.30.0.2".parse().unwrap(), Some("aaa".into())),
                ("172.30.0.9".parse().unwrap(), None)
            ]
        );
        assert_eq!(
            st.nat_of("aaa"),
            vec!["172.30.0.2".parse::<Ipv4Addr>().unwrap()]
        );
        assert!(st.nat_of("bbb").is_empty());
    }

    #[test]
    fn rules_current_detects_drift() {
        let j = listed("banger0", "");
        let mut st = parse(&j).unwrap();
        assert!(st.rules_current("banger0"));
        st.chains.get_mut("forward").unwrap().pop();
        assert!(!st.rules_current("banger0"));
        let mut st = parse(&j).unwrap();
        st.chains.get_mut("input").unwrap().push(None);
        assert!(!st.rules_current("banger0"));
        let mut st = parse(&j).unwrap();
        st.set_present = false;
        assert!(!st.rules_current("banger0"));
        assert!(!TableState::default().rules_current("banger0"));
    }

    #[test]
    fn refuses_garbage() {
        for bad in ["", "[]", "{}", "nope"] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }
}
