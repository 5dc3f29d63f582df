//! Which Debian mirror an image build downloads from: the one this host's apt already uses for the
//! suite (so a build talks to no host the machine does not already trust), else Debian's CDN.
//!
//! Reads apt's sources (one-line `.list` and deb822 `.sources`); never writes them.

use std::path::Path;

/// Used when the host's apt sources name no mirror for the suite.
pub const FALLBACK: &str = "http://deb.debian.org/debian";

/// The first `http(s)://` or `file:` URI apt uses for `suite` in the sources under `etc_apt`
/// (normally `/etc/apt`): `sources.list`, then `sources.list.d/*.list`, then `*.sources`.
pub fn host_mirror(etc_apt: &Path, suite: &str) -> Option<String> {
    let mut lists = vec![etc_apt.join("sources.list")];
    let mut deb822 = Vec::new();
    if let Ok(rd) = std::fs::read_dir(etc_apt.join("sources.list.d")) {
        let mut names: Vec<_> = rd.flatten().map(|e| e.path()).collect();
        names.sort();
        for p in names {
            match p.extension().and_then(|e| e.to_str()) {
                Some("list") => lists.push(p),
                Some("sources") => deb822.push(p),
                _ => {}
            }
        }
    }
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    lists
        .iter()
        .find_map(|p| from_one_line(&read(p), suite))
        .or_else(|| deb822.iter().find_map(|p| from_deb822(&read(p), suite)))
}

fn usable(uri: &str) -> bool {
    uri.starts_with("http://") || uri.starts_with("https://") || uri.starts_with("file:")
}

/// `deb [options] URI SUITE COMPONENT…` lines.
pub fn from_one_line(text: &str, suite: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let line = line.split('#').next().unwrap_or("");
        let mut words = line.split_whitespace();
        if words.next() != Some("deb") {
            return None;
        }
        let rest: Vec<&str> = words.collect();
        // Skip a `[arch=amd64 signed-by=…]` option block, which may span several words.
        let mut i = 0;
        if rest.first().is_some_and(|w| w.starts_with('[')) {
            while i < rest.len() && !rest[i].ends_with(']') {
                i += 1;
            }
            i += 1;
        }
        let (uri, s) = (rest.get(i)?, rest.get(i + 1)?);
        (usable(uri) && *s == suite).then(|| uri.trim_end_matches('/').to_string())
    })
}

/// deb822 stanzas: `Types: deb`, `URIs: …`, `Suites: …`, blank-line separated.
pub fn from_deb822(text: &str, suite: &str) -> Option<String> {
    text.split("\n\n").find_map(|stanza| {
        let field = |name: &str| {
            stanza.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
            })
        };
        let types = field("Types").unwrap_or("deb");
        if !types.split_whitespace().any(|t| t == "deb") {
            return None;
        }
        if !field("Suites")?.split_whitespace().any(|s| s == suite) {
            return None;
        }
        field("URIs")?
            .split_whitespace()
            .find(|u| usable(u))
            .map(|u| u.trim_end_matches('/').to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_sources() {
        let cases: &[(&str, Option<&str>)] = &[
            (
                "deb http://ftp.example/debian bookworm main\n",
                Some("http://ftp.example/debian"),
            ),
            (
                "deb [arch=amd64 signed-by=/k.gpg] https://m.example/debian/ bookworm main",
                Some("https://m.example/debian"),
            ),
            ("# deb http://x/debian bookworm main\n", None),
            ("deb-src http://x/debian bookworm main\n", None),
            ("deb http://x/debian bullseye main\n", None),
            ("deb http://x/debian bookworm-updates main\n", None),
            ("deb cdrom:[Debian]/ bookworm main\n", None),
            ("deb\n", None),
        ];
        for (text, want) in cases {
            assert_eq!(from_one_line(text, "bookworm").as_deref(), *want, "{text}");
        }
    }

    #[test]
    fn deb822_sources() {
        let text = "Types: deb\nURIs: http://sec.example/debian-security\nSuites: bookworm-security\n\n\
                    Types: deb deb-src\nURIs: http://deb.example/debian/\nSuites: bookworm bookworm-updates\nComponents: main\n";
        assert_eq!(
            from_deb822(text, "bookworm").as_deref(),
            Some("http://deb.example/debian")
        );
        assert_eq!(from_deb822(text, "trixie"), None);
        let src_only = "Types: deb-src\nURIs: http://x/debian\nSuites: bookworm\n";
        assert_eq!(from_deb822(src_only, "bookworm"), None);
    }

    #[test]
    fn host_mirror_prefers_list_files_then_sources() {
        let dir = std::env::temp_dir().join(format!("banger-mirror-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("sources.list.d")).unwrap();
        std::fs::write(
            dir.join("sources.list.d/debian.sources"),
            "Types: deb\nURIs: http://b.example/debian\nSuites: bookworm\n",
        )
        .unwrap();
        assert_eq!(
            host_mirror(&dir, "bookworm").as_deref(),
            Some("http://b.example/debian")
        );
        std::fs::write(
            dir.join("sources.list"),
            "deb http://a.example/debian bookworm main\n",
        )
        .unwrap();
        assert_eq!(
            host_mirror(&dir, "bookworm").as_deref(),
            Some("http://a.example/debian")
        );
        assert_eq!(host_mirror(&dir, "sid"), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
