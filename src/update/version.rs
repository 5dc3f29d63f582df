//! Release versions and the update direction policy (upgrade, up to date, refused downgrade).
//!
//! A version is `[v]ID(.ID)*[-PRE(.PRE)*][+BUILD]`, each identifier ASCII letters and digits. That
//! covers `v1.2.3`, `0.2.0` (what `build.rs` stamps: no `v`) and the smoke suite's `v0.smoke.0` and
//! `v0.smoke.broken`. The leading `v` is not part of the identity: `v0.2.0 == 0.2.0`.
//!
//! Ordering, identifier by identifier from the left (semver's rules, generalised to any length):
//! - two numeric identifiers compare as numbers (`0.10.0 > 0.9.0`);
//! - two alphanumeric identifiers compare as ASCII strings;
//! - a numeric identifier is lower than an alphanumeric one (`0.1.0 < 0.smoke.0`);
//! - a missing core identifier counts as `0` (`1.2 == 1.2.0`);
//! - a pre-release is lower than the same core without one (`1.0.0-rc.1 < 1.0.0`), and pre-release
//!   identifiers compare like core ones except that a shorter prefix is lower (`-rc < -rc.1`);
//! - `+BUILD` metadata is ignored for ordering and equality.
//!
//! This module must never decide from strings: compare parsed [`Version`]s.

use std::cmp::Ordering;
use std::fmt;

use crate::error::{Error, Result};

/// Longest version string accepted.
pub const MAX_LEN: usize = 64;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Ident {
    Num(u64),
    Alpha(String),
}

impl Ident {
    fn parse(s: &str) -> Option<Ident> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return None;
        }
        if s.bytes().all(|b| b.is_ascii_digit()) {
            s.parse().ok().map(Ident::Num)
        } else {
            Some(Ident::Alpha(s.to_string()))
        }
    }

    fn cmp(&self, other: &Ident) -> Ordering {
        match (self, other) {
            (Ident::Num(a), Ident::Num(b)) => a.cmp(b),
            (Ident::Alpha(a), Ident::Alpha(b)) => a.cmp(b),
            (Ident::Num(_), Ident::Alpha(_)) => Ordering::Less,
            (Ident::Alpha(_), Ident::Num(_)) => Ordering::Greater,
        }
    }

    fn is_zero(&self) -> bool {
        matches!(self, Ident::Num(0))
    }
}

/// A parsed release version. Displays with a leading `v`.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct Version {
    /// As given, without the leading `v`.
    text: String,
    core: Vec<Ident>,
    pre: Vec<Ident>,
}

impl Version {
    /// Parses `vX.Y.Z`, `X.Y.Z` or any dotted form described in the module doc.
    pub fn parse(s: &str) -> Result<Version> {
        let bad = |why: &str| {
            Error::new(format!("parsing version {s:?}"), why)
                .hint("versions look like v1.2.3 (or v0.smoke.0)")
        };
        let t = s.trim();
        if t.is_empty() {
            return Err(bad("it is empty"));
        }
        if t.len() > MAX_LEN {
            return Err(bad(&format!("it is longer than {MAX_LEN} characters")));
        }
        let text = t.strip_prefix('v').unwrap_or(t);
        let without_build = text.split_once('+').map_or(text, |(a, b)| {
            if b.is_empty() {
                // An empty build suffix is malformed; make the core check below fail.
                ""
            } else {
                a
            }
        });
        let (core_s, pre_s) = match without_build.split_once('-') {
            Some((c, p)) => (c, Some(p)),
            None => (without_build, None),
        };
        let idents =
            |part: &str| -> Option<Vec<Ident>> { part.split('.').map(Ident::parse).collect() };
        let core = idents(core_s).ok_or_else(|| {
            bad("each dot-separated part must be non-empty ASCII letters or digits")
        })?;
        let pre = match pre_s {
            Some(p) => idents(p).ok_or_else(|| bad("malformed pre-release suffix after '-'"))?,
            None => Vec::new(),
        };
        if !matches!(core.first(), Some(Ident::Num(_))) {
            return Err(bad("it must start with a number"));
        }
        Ok(Version {
            text: text.to_string(),
            core,
            pre,
        })
    }

    /// The version without the leading `v` (as `build.rs` stamps it).
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "v{}", self.text)
    }
}

impl TryFrom<String> for Version {
    type Error = Error;
    fn try_from(s: String) -> Result<Version> {
        Version::parse(&s)
    }
}

impl From<Version> for String {
    fn from(v: Version) -> String {
        v.to_string()
    }
}

impl std::str::FromStr for Version {
    type Err = Error;
    fn from_str(s: &str) -> Result<Version> {
        Version::parse(s)
    }
}

impl Ord for Version {
    fn cmp(&self, other: &Version) -> Ordering {
        let n = self.core.len().max(other.core.len());
        let zero = Ident::Num(0);
        for i in 0..n {
            let a = self.core.get(i).unwrap_or(&zero);
            let b = other.core.get(i).unwrap_or(&zero);
            match a.cmp(b) {
                Ordering::Equal => {}
                o => return o,
            }
        }
        match (self.pre.is_empty(), other.pre.is_empty()) {
            (true, true) => Ordering::Equal,
            (true, false) => Ordering::Greater,
            (false, true) => Ordering::Less,
            (false, false) => {
                for (a, b) in self.pre.iter().zip(&other.pre) {
                    match a.cmp(b) {
                        Ordering::Equal => {}
                        o => return o,
                    }
                }
                self.pre.len().cmp(&other.pre.len())
            }
        }
    }
}

impl PartialOrd for Version {
    fn partial_cmp(&self, other: &Version) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Version {
    fn eq(&self, other: &Version) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Version {}

impl std::hash::Hash for Version {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        // Consistent with Eq: trailing zero core identifiers do not count.
        let mut core = self.core.as_slice();
        while let Some((last, rest)) = core.split_last() {
            if !last.is_zero() {
                break;
            }
            core = rest;
        }
        for i in core
            .iter()
            .chain(std::iter::once(&Ident::Alpha("-".into())))
            .chain(&self.pre)
        {
            match i {
                Ident::Num(n) => (0u8, n).hash(state),
                Ident::Alpha(s) => (1u8, s).hash(state),
            }
        }
    }
}

/// What an update from the running version to a target would be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Direction {
    /// Target equals the running version: nothing to do.
    UpToDate,
    /// Target is newer.
    Upgrade,
    /// Target is older, and the operator asked for it explicitly.
    Downgrade,
}

/// The downgrade policy: a target older than `running` is refused unless the operator named it
/// with `--to` (`explicit_to`) **and** passed `--allow-downgrade`. The same version is
/// [`Direction::UpToDate`].
pub fn decide(
    running: &Version,
    target: &Version,
    explicit_to: bool,
    allow_downgrade: bool,
) -> Result<Direction> {
    match target.cmp(running) {
        Ordering::Equal => Ok(Direction::UpToDate),
        Ordering::Greater => Ok(Direction::Upgrade),
        Ordering::Less if explicit_to && allow_downgrade => Ok(Direction::Downgrade),
        Ordering::Less => {
            let e = Error::new(
                format!("updating {running} to {target}"),
                format!("{target} is older than the installed {running}; refusing to downgrade"),
            );
            Err(if explicit_to {
                e.hint(format!(
                    "add --allow-downgrade to install {target} on purpose"
                ))
            } else {
                e.hint(format!(
                    "the release manifest's latest is older than this install; to downgrade on purpose run: banger update --to {target} --allow-downgrade"
                ))
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Version {
        Version::parse(s).unwrap()
    }

    #[test]
    fn parse_table() {
        let ok = [
            ("v1.2.3", "v1.2.3"),
            ("1.2.3", "v1.2.3"),
            (" v0.2.0 ", "v0.2.0"),
            ("v0.smoke.0", "v0.smoke.0"),
            ("v0.smoke.broken", "v0.smoke.broken"),
            ("1.0.0-rc.1", "v1.0.0-rc.1"),
            ("1.0.0+build5", "v1.0.0+build5"),
            ("2", "v2"),
        ];
        for (input, shown) in ok {
            assert_eq!(v(input).to_string(), shown, "{input:?}");
        }
        let bad = [
            "",
            "v",
            "vv1.0",
            "1..2",
            ".1",
            "1.",
            "1.2.3-",
            "1.2.3+",
            "smoke.1",
            "1.2 .3",
            "1.2/3",
            "1.2.3-rc..1",
            "../1",
            "99999999999999999999999.0",
        ];
        for input in bad {
            assert!(
                Version::parse(input).is_err(),
                "{input:?} should be rejected"
            );
        }
        assert!(Version::parse(&"1.".repeat(40)).is_err());
    }

    #[test]
    fn ordering_table() {
        use Ordering::*;
        let cases = [
            ("v1.2.3", "1.2.3", Equal),
            ("1.2", "1.2.0", Equal),
            ("1.2.0+a", "1.2.0+b", Equal),
            ("0.10.0", "0.9.0", Greater),
            ("0.2.0", "0.1.9", Greater),
            ("1.0.0", "0.99.99", Greater),
            ("0.smoke.0", "0.1.0", Greater),
            ("0.smoke.broken", "0.smoke.0", Greater),
            ("0.smoke.0", "1.0.0", Less),
            ("1.0.0-rc.1", "1.0.0", Less),
            ("1.0.0-rc.2", "1.0.0-rc.10", Less),
            ("1.0.0-rc", "1.0.0-rc.1", Less),
            ("1.0.0-alpha", "1.0.0-beta", Less),
            ("1.2.3.1", "1.2.3", Greater),
        ];
        for (a, b, want) in cases {
            assert_eq!(v(a).cmp(&v(b)), want, "{a} vs {b}");
            assert_eq!(v(b).cmp(&v(a)), want.reverse(), "{b} vs {a}");
        }
    }

    #[test]
    fn equal_versions_hash_equal() {
        use std::collections::HashSet;
        let set: HashSet<Version> = [v("1.2"), v("v1.2.0"), v("1.2.0+x")].into_iter().collect();
        assert_eq!(set.len(), 1);
    }

    #[test]
    fn policy_table() {
        let cases: &[(&str, &str, bool, bool, Option<Direction>)] = &[
            ("0.1.0", "0.1.0", false, false, Some(Direction::UpToDate)),
            ("0.1.0", "v0.1.0", true, true, Some(Direction::UpToDate)),
            ("0.1.0", "0.2.0", false, false, Some(Direction::Upgrade)),
            ("0.1.0", "0.2.0", true, false, Some(Direction::Upgrade)),
            ("0.1.0", "0.smoke.0", false, false, Some(Direction::Upgrade)),
            ("0.2.0", "0.1.0", false, false, None),
            ("0.2.0", "0.1.0", false, true, None),
            ("0.2.0", "0.1.0", true, false, None),
            ("0.2.0", "0.1.0", true, true, Some(Direction::Downgrade)),
        ];
        for (running, target, to, allow, want) in cases {
            let got = decide(&v(running), &v(target), *to, *allow);
            match want {
                Some(d) => assert_eq!(&got.unwrap(), d, "{running} -> {target}"),
                None => {
                    let e = got.unwrap_err().to_string();
                    assert!(e.contains("refusing to downgrade"), "{e}");
                    assert!(e.contains("--allow-downgrade"), "{e}");
                }
            }
        }
    }

    #[test]
    fn serde_round_trip() {
        let x: Version = serde_json::from_str("\"0.2.0\"").unwrap();
        assert_eq!(serde_json::to_string(&x).unwrap(), "\"v0.2.0\"");
        assert!(serde_json::from_str::<Version>("\"nope\"").is_err());
    }
}
