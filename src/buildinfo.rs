//! Build identity stamped by `build.rs`: version, git commit, build time.
//!
//! Owns both the printers (`banger version`'s three lines, `--version`'s one line) and the parser of
//! the three-line form, which the updater uses to read a freshly installed binary's identity.

use crate::error::{Error, Result};

/// Version of this binary, without a leading `v` (e.g. `0.1.0`).
pub const VERSION: &str = env!("BANGER_BUILD_VERSION");
/// Full git commit this binary was built from, or `unknown`.
pub const COMMIT: &str = env!("BANGER_BUILD_COMMIT");
/// RFC 3339 build time (UTC).
pub const BUILT_AT: &str = env!("BANGER_BUILD_TIME");

/// A build identity: the three fields of `banger version`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BuildInfo {
    /// Version without a leading `v`.
    pub version: String,
    /// Git commit.
    pub commit: String,
    /// RFC 3339 build time.
    pub built_at: String,
}

impl BuildInfo {
    /// The identity of the running binary.
    pub fn current() -> Self {
        BuildInfo {
            version: VERSION.to_string(),
            commit: COMMIT.to_string(),
            built_at: BUILT_AT.to_string(),
        }
    }

    /// Exactly three lines: `version: …`, `commit: …`, `built_at: …` (trailing newline).
    pub fn three_lines(&self) -> String {
        format!(
            "version: {}\ncommit: {}\nbuilt_at: {}\n",
            self.version, self.commit, self.built_at
        )
    }

    /// One line: `banger vX.Y.Z (commit abcdef12, built …)`.
    pub fn one_line(&self) -> String {
        let short: String = self.commit.chars().take(8).collect();
        format!(
            "banger v{} (commit {}, built {})",
            self.version, short, self.built_at
        )
    }

    /// Parses the three-line form. Unrelated lines are ignored, whitespace around keys and values
    /// is tolerated; every field must be present and non-empty.
    pub fn parse(text: &str) -> Result<Self> {
        let (mut version, mut commit, mut built_at) = (None, None, None);
        for line in text.lines() {
            let Some((k, v)) = line.split_once(':') else {
                continue;
            };
            let v = v.trim();
            if v.is_empty() {
                continue;
            }
            match k.trim() {
                "version" => version = Some(v.trim_start_matches('v').to_string()),
                "commit" => commit = Some(v.to_string()),
                "built_at" => built_at = Some(v.to_string()),
                _ => {}
            }
        }
        let missing = |f: &str| {
            Error::new(
                "parsing `banger version` output",
                format!("field `{f}` is missing"),
            )
        };
        Ok(BuildInfo {
            version: version.ok_or_else(|| missing("version"))?,
            commit: commit.ok_or_else(|| missing("commit"))?,
            built_at: built_at.ok_or_else(|| missing("built_at"))?,
        })
    }
}

/// Parses a one-line `--version` output (`banger vX.Y.Z (…)`) into the version, without `v`.
pub fn parse_one_line_version(text: &str) -> Option<String> {
    let mut words = text.split_whitespace();
    while let Some(w) = words.next() {
        if w == "banger" {
            let v = words.next()?;
            return Some(v.trim_start_matches('v').to_string());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bi(v: &str, c: &str, b: &str) -> BuildInfo {
        BuildInfo {
            version: v.into(),
            commit: c.into(),
            built_at: b.into(),
        }
    }

    #[test]
    fn round_trip() {
        let cur = BuildInfo::current();
        assert_eq!(BuildInfo::parse(&cur.three_lines()).unwrap(), cur);
        assert_eq!(cur.three_lines().lines().count(), 3);
    }

    #[test]
    fn parse_table() {
        let ok = bi("1.2.3", "abc", "2026-01-01T00:00:00Z");
        let cases: &[(&str, Option<&BuildInfo>)] = &[
            (
                "version: 1.2.3\ncommit: abc\nbuilt_at: 2026-01-01T00:00:00Z\n",
                Some(&ok),
            ),
            (
                "  version :   v1.2.3  \n\tcommit:abc\nbuilt_at:   2026-01-01T00:00:00Z   ",
                Some(&ok),
            ),
            (
                "warning: something\nversion: 1.2.3\nnoise line\ncommit: abc\nbuilt_at: 2026-01-01T00:00:00Z\n",
                Some(&ok),
            ),
            ("version: 1.2.3\nbuilt_at: 2026-01-01T00:00:00Z\n", None),
            ("version: 1.2.3\ncommit:   \nbuilt_at: x\n", None),
            ("", None),
            ("\n\n", None),
        ];
        for (input, want) in cases {
            let got = BuildInfo::parse(input);
            match want {
                Some(w) => assert_eq!(&got.unwrap(), *w, "input {input:?}"),
                None => assert!(got.is_err(), "input {input:?} should be rejected"),
            }
        }
    }

    #[test]
    fn one_line_shape() {
        let b = bi("0.2.0", "0123456789abcdef", "2026-01-01T00:00:00Z");
        assert_eq!(
            b.one_line(),
            "banger v0.2.0 (commit 01234567, built 2026-01-01T00:00:00Z)"
        );
        assert_eq!(
            parse_one_line_version(&b.one_line()).as_deref(),
            Some("0.2.0")
        );
        assert_eq!(parse_one_line_version("garbage"), None);
    }
}
