//! The release manifest (`manifest.json`): which versions exist and where their artifacts live.
//!
//! The manifest is unsigned, so it only ever says *where* to look: hashes come from the signed
//! `SHA256SUMS`, never from here. It must never be trusted for anything a forged copy could abuse
//! beyond pointing at artifacts that then fail verification.
//!
//! Shape: `{"schema_version":1,"latest_stable":"v0.2.0","releases":[{"version":…,"tarball_url":…,
//! "sha256sums_url":…,"sha256sums_sig_url":…}]}`. Unknown fields are ignored (additive changes keep
//! schema 1); a newer `schema_version` is refused. URLs may be absolute (`http://`, `https://`) or
//! relative to the manifest's own URL (what the release builder writes without `--base-url`).

use serde::Deserialize;

use super::version::Version;
use crate::error::{Error, Result};

/// Where `banger update` looks by default (hidden `--manifest-url` overrides it for tests).
/// PLACEHOLDER host (`.example` is reserved): set the real release location before shipping.
pub const DEFAULT_MANIFEST_URL: &str = "https://releases.banger.example/manifest.json";

/// The newest manifest schema this binary understands.
pub const SCHEMA_VERSION: u64 = 1;

/// Longest URL accepted in a manifest.
pub const MAX_URL_LEN: usize = 2048;

/// Most releases a manifest may list.
pub const MAX_RELEASES: usize = 4096;

/// One release's artifact locations (absolute URLs after parsing).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Release {
    /// The release's version.
    pub version: Version,
    /// The `banger-<version>-linux-amd64.tar.gz` URL.
    pub tarball_url: String,
    /// The `SHA256SUMS` URL.
    pub sha256sums_url: String,
    /// The `SHA256SUMS.sig` URL (base64 DER ECDSA P-256 signature).
    pub sha256sums_sig_url: String,
}

impl Release {
    /// The tarball's file name: the last path segment of its URL, which is the name SHA256SUMS
    /// lists it under.
    pub fn tarball_file_name(&self) -> Result<String> {
        let path = self
            .tarball_url
            .split(['?', '#'])
            .next()
            .unwrap_or_default();
        let name = path.rsplit('/').next().unwrap_or_default();
        if name.is_empty() || name == "." || name == ".." {
            return Err(Error::new(
                format!("release {}", self.version),
                format!("tarball URL {} names no file", self.tarball_url),
            ));
        }
        Ok(name.to_string())
    }
}

/// A parsed, validated manifest.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Manifest {
    /// Manifest format version (1).
    pub schema_version: u64,
    /// The version `banger update` installs when no `--to` is given.
    pub latest_stable: Version,
    /// Every published release.
    pub releases: Vec<Release>,
}

#[derive(Deserialize)]
struct SchemaOnly {
    schema_version: Option<serde_json::Value>,
}

/// Resolves `url` against the manifest's own URL: absolute `http(s)://` URLs are kept, `/path` is
/// taken from the manifest's origin, anything else from the manifest's directory.
fn resolve(base: &str, url: &str) -> Option<String> {
    if url.starts_with("https://") || url.starts_with("http://") {
        return Some(url.to_string());
    }
    if url.contains("://") || url.starts_with("//") {
        return None; // other schemes and scheme-relative URLs are not ours to follow
    }
    let base = base.split(['?', '#']).next().unwrap_or_default();
    let scheme_end = base.find("://")? + 3;
    if let Some(abs) = url.strip_prefix('/') {
        let host_end = base[scheme_end..]
            .find('/')
            .map_or(base.len(), |i| scheme_end + i);
        return Some(format!("{}/{abs}", &base[..host_end]));
    }
    let dir_end = base[scheme_end..].rfind('/').map(|i| scheme_end + i + 1);
    match dir_end {
        Some(end) => Some(format!("{}{url}", &base[..end])),
        None => Some(format!("{base}/{url}")),
    }
}

impl Manifest {
    /// Parses and validates a manifest fetched from `manifest_url` (used to resolve relative URLs).
    pub fn parse(bytes: &[u8], manifest_url: &str) -> Result<Manifest> {
        let what = format!("reading the release manifest {manifest_url}");
        if bytes.len() as u64 > super::download::MANIFEST_MAX {
            return Err(Error::new(
                what,
                format!("it is larger than {} bytes", super::download::MANIFEST_MAX),
            ));
        }
        // The schema first, on its own: a newer manifest may not fit our structs at all, and its
        // operator deserves "upgrade manually", not a field error.
        let schema: SchemaOnly = serde_json::from_slice(bytes)
            .map_err(|e| Error::new(&what, format!("not a JSON object ({e})")))?;
        let schema_version = match schema.schema_version {
            Some(serde_json::Value::Number(n)) => n.as_u64(),
            _ => None,
        }
        .ok_or_else(|| {
            Error::new(
                &what,
                "schema_version is missing or not a non-negative integer",
            )
        })?;
        if schema_version > SCHEMA_VERSION {
            return Err(Error::new(
                &what,
                format!(
                    "schema_version {schema_version} is newer than this banger understands ({SCHEMA_VERSION})"
                ),
            )
            .hint("upgrade banger manually: install the latest release by hand, then use banger update again"));
        }
        if schema_version == 0 {
            return Err(Error::new(
                &what,
                "schema_version 0 is not a valid manifest",
            ));
        }
        let mut m: Manifest =
            serde_json::from_slice(bytes).map_err(|e| Error::new(&what, e.to_string()))?;
        if m.releases.is_empty() {
            return Err(Error::new(&what, "it lists no releases"));
        }
        if m.releases.len() > MAX_RELEASES {
            return Err(Error::new(
                &what,
                format!("it lists more than {MAX_RELEASES} releases"),
            ));
        }
        for i in 0..m.releases.len() {
            let r = &m.releases[i];
            if m.releases[..i].iter().any(|o| o.version == r.version) {
                return Err(Error::new(
                    &what,
                    format!("release {} is listed twice", r.version),
                ));
            }
            let r = &mut m.releases[i];
            let version = r.version.clone();
            for (field, url) in [
                ("tarball_url", &mut r.tarball_url),
                ("sha256sums_url", &mut r.sha256sums_url),
                ("sha256sums_sig_url", &mut r.sha256sums_sig_url),
            ] {
                let bad = |why: &str| {
                    Error::new(&what, format!("release {version}: {field} {why}"))
                        .hint("the manifest is broken; tell the release maintainer")
                };
                if url.trim().is_empty() {
                    return Err(bad("is empty"));
                }
                if url.len() > MAX_URL_LEN
                    || url.chars().any(|c| c.is_whitespace() || c.is_control())
                {
                    return Err(bad("is not a usable URL"));
                }
                *url = resolve(manifest_url, url)
                    .ok_or_else(|| bad(&format!("{url:?} is not an http(s) URL")))?;
            }
            r.tarball_file_name()
                .map_err(|e| Error::new(&what, e.why))?;
        }
        if m.find(&m.latest_stable).is_none() {
            return Err(Error::new(
                &what,
                format!(
                    "latest_stable {} is not among the releases ({})",
                    m.latest_stable,
                    m.known_versions()
                ),
            ));
        }
        Ok(m)
    }

    /// The release with this version, if listed (`v0.2.0` and `0.2.0` are the same version).
    pub fn find(&self, version: &Version) -> Option<&Release> {
        self.releases.iter().find(|r| &r.version == version)
    }

    /// Comma-separated list of the listed versions, newest first.
    pub fn known_versions(&self) -> String {
        let mut v: Vec<&Version> = self.releases.iter().map(|r| &r.version).collect();
        v.sort_by(|a, b| b.cmp(a));
        v.iter()
            .map(|v| v.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The release to install: the one `--to` names, else `latest_stable`. An unknown `--to`
    /// fails here, before anything on the host changes, listing the known versions.
    pub fn target(&self, to: Option<&str>) -> Result<&Release> {
        let Some(to) = to else {
            return self.find(&self.latest_stable).ok_or_else(|| {
                Error::new(
                    "choosing the update target",
                    format!("latest_stable {} is not listed", self.latest_stable),
                )
            });
        };
        let wanted = Version::parse(to)?;
        self.find(&wanted).ok_or_else(|| {
            Error::new(
                format!("choosing the update target {wanted}"),
                format!("{wanted} is not in the release manifest"),
            )
            .hint(format!("known versions: {}", self.known_versions()))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const URL: &str = "https://example.test/rel/manifest.json";

    fn release(v: &str) -> String {
        format!(
            r#"{{"version":"{v}","tarball_url":"{v}/banger-{v}-linux-amd64.tar.gz","sha256sums_url":"{v}/SHA256SUMS","sha256sums_sig_url":"https://cdn.test/{v}/SHA256SUMS.sig"}}"#
        )
    }

    fn manifest(latest: &str, versions: &[&str]) -> String {
        let rel: Vec<String> = versions.iter().map(|v| release(v)).collect();
        format!(
            r#"{{"schema_version":1,"latest_stable":"{latest}","releases":[{}],"extra":true}}"#,
            rel.join(",")
        )
    }

    #[test]
    fn parses_and_resolves() {
        let m = Manifest::parse(manifest("v0.2.0", &["v0.1.0", "v0.2.0"]).as_bytes(), URL).unwrap();
        let t = m.target(None).unwrap();
        assert_eq!(t.version.to_string(), "v0.2.0");
        assert_eq!(
            t.tarball_url,
            "https://example.test/rel/v0.2.0/banger-v0.2.0-linux-amd64.tar.gz"
        );
        assert_eq!(
            t.sha256sums_sig_url,
            "https://cdn.test/v0.2.0/SHA256SUMS.sig"
        );
        assert_eq!(
            t.tarball_file_name().unwrap(),
            "banger-v0.2.0-linux-amd64.tar.gz"
        );
        assert_eq!(
            m.target(Some("0.1.0")).unwrap().version.to_string(),
            "v0.1.0"
        );
        assert_eq!(m.known_versions(), "v0.2.0, v0.1.0");
    }

    #[test]
    fn unknown_target_lists_known() {
        let m = Manifest::parse(manifest("v0.2.0", &["v0.1.0", "v0.2.0"]).as_bytes(), URL).unwrap();
        let e = m.target(Some("v9.9.9")).unwrap_err().to_string();
        assert!(e.contains("v9.9.9 is not in the release manifest"), "{e}");
        assert!(e.contains("known versions: v0.2.0, v0.1.0"), "{e}");
        assert!(m.target(Some("not a version")).is_err());
    }

    #[test]
    fn rejected_table() {
        let big = format!(r#"{{"schema_version":1,"pad":"{}"}}"#, "x".repeat(1 << 20));
        let cases: Vec<(String, &str)> = vec![
            (
                r#"{"schema_version":2,"whatever":[]}"#.into(),
                "upgrade banger manually",
            ),
            (
                r#"{"latest_stable":"v1"}"#.into(),
                "schema_version is missing",
            ),
            (
                r#"{"schema_version":"1"}"#.into(),
                "schema_version is missing",
            ),
            (r#"{"schema_version":0}"#.into(), "schema_version 0"),
            ("[1,2]".into(), "not a JSON object"),
            ("not json".into(), "not a JSON object"),
            (big, "larger than"),
            (
                manifest("v0.3.0", &["v0.1.0"]),
                "latest_stable v0.3.0 is not among",
            ),
            (manifest("v0.1.0", &["v0.1.0", "0.1.0"]), "listed twice"),
            (manifest("v0.1.0", &[]), "no releases"),
            (
                manifest("v0.1.0", &["v0.1.0"]).replace("\"v0.1.0/SHA256SUMS\"", "\"\""),
                "sha256sums_url is empty",
            ),
            (
                manifest("v0.1.0", &["v0.1.0"]).replace("\"v0.1.0/SHA256SUMS\"", "\"  \""),
                "sha256sums_url is empty",
            ),
            (
                manifest("v0.1.0", &["v0.1.0"])
                    .replace("\"v0.1.0/SHA256SUMS\"", "\"file:///etc/passwd\""),
                "not an http(s) URL",
            ),
            (
                manifest("v0.1.0", &["v0.1.0"]).replace("\"v0.1.0/SHA256SUMS\"", "\"//evil/x\""),
                "not an http(s) URL",
            ),
            (
                manifest("v0.1.0", &["v0.1.0"])
                    .replace("v0.1.0/banger-v0.1.0-linux-amd64.tar.gz", "dir/"),
                "names no file",
            ),
            (
                manifest("v0.1.0", &["v0.1.0"]).replace(
                    ",\"sha256sums_sig_url\":\"https://cdn.test/v0.1.0/SHA256SUMS.sig\"",
                    "",
                ),
                "missing field",
            ),
            (manifest("bogus", &["v0.1.0"]), "parsing version"),
        ];
        for (input, want) in cases {
            let e = Manifest::parse(input.as_bytes(), URL)
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "want {want:?} in {e}");
        }
    }

    #[test]
    fn resolve_table() {
        let cases = [
            ("https://h/a/m.json", "x/y", Some("https://h/a/x/y")),
            ("https://h/a/m.json", "/x/y", Some("https://h/x/y")),
            (
                "http://127.0.0.1:8080/manifest.json?x=1",
                "v1/S",
                Some("http://127.0.0.1:8080/v1/S"),
            ),
            ("http://h", "v1/S", Some("http://h/v1/S")),
            ("http://h", "/v1/S", Some("http://h/v1/S")),
            ("https://h/a/m.json", "http://o/z", Some("http://o/z")),
            ("https://h/a/m.json", "ftp://o/z", None),
        ];
        for (base, url, want) in cases {
            assert_eq!(resolve(base, url).as_deref(), want, "{base} + {url}");
        }
    }
}
