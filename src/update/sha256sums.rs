//! The `SHA256SUMS` file of a release: the only source of the hashes banger trusts (after its
//! signature holds). Never take a hash from the manifest.
//!
//! Accepted lines:
//! - GNU: `<64 hex>  <file>` or `<64 hex> *<file>` (binary mode marker);
//! - BSD: `SHA256 (<file>) = <64 hex>`;
//! - blank lines and lines starting with `#` are skipped.
//!
//! Anything else is rejected with its line number: a signed file we cannot read fully is a broken
//! release, not something to skim. Digests are lower-cased; one file named twice with different
//! digests is rejected.

use crate::error::{Error, Result};

/// One `digest file` pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// File name as written (a leading `./` removed).
    pub file: String,
    /// Lower-case hex SHA-256.
    pub digest: String,
}

/// A parsed SHA256SUMS file.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Sha256Sums {
    entries: Vec<Entry>,
}

fn is_digest(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn clean_name(name: &str) -> Option<String> {
    let name = name.strip_prefix("./").unwrap_or(name);
    (!name.is_empty() && !name.contains('\0')).then(|| name.to_string())
}

fn parse_line(line: &str) -> Option<Entry> {
    if let Some(rest) = line.strip_prefix("SHA256 (") {
        let (name, digest) = rest.rsplit_once(") = ")?;
        if !is_digest(digest) {
            return None;
        }
        return Some(Entry {
            file: clean_name(name)?,
            digest: digest.to_ascii_lowercase(),
        });
    }
    let digest = line.get(..64)?;
    if !is_digest(digest) {
        return None;
    }
    let rest = &line[64..];
    let name = rest
        .strip_prefix("  ")
        .or_else(|| rest.strip_prefix(" *"))?;
    Some(Entry {
        file: clean_name(name)?,
        digest: digest.to_ascii_lowercase(),
    })
}

impl Sha256Sums {
    /// Parses the file's bytes.
    pub fn parse(bytes: &[u8]) -> Result<Sha256Sums> {
        let what = "parsing SHA256SUMS";
        let text = std::str::from_utf8(bytes)
            .map_err(|e| Error::new(what, format!("not UTF-8 text ({e})")))?;
        let mut entries: Vec<Entry> = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.strip_suffix('\r').unwrap_or(raw);
            let trimmed = line.trim();
            if trimmed.is_empty() || trimmed.starts_with('#') {
                continue;
            }
            let entry = parse_line(line).ok_or_else(|| {
                let shown: String = line.chars().take(80).collect();
                Error::new(
                    what,
                    format!("line {}: malformed entry {shown:?}", i + 1),
                )
                .hint("expected `<sha256>  <file>` or `SHA256 (<file>) = <sha256>`; the release is broken")
            })?;
            if let Some(prev) = entries.iter().find(|e| e.file == entry.file) {
                if prev.digest != entry.digest {
                    return Err(Error::new(
                        what,
                        format!(
                            "line {}: {} is listed twice with different digests",
                            i + 1,
                            entry.file
                        ),
                    ));
                }
                continue;
            }
            entries.push(entry);
        }
        Ok(Sha256Sums { entries })
    }

    /// All entries, in file order.
    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// The lower-case digest listed for `name` (a leading `./` on either side is ignored).
    pub fn lookup(&self, name: &str) -> Option<&str> {
        let name = name.strip_prefix("./").unwrap_or(name);
        self.entries
            .iter()
            .find(|e| e.file == name)
            .map(|e| e.digest.as_str())
    }

    /// Like [`lookup`](Self::lookup), but a missing entry is an error that names what is listed.
    pub fn expect(&self, name: &str) -> Result<&str> {
        self.lookup(name).ok_or_else(|| {
            let listed: Vec<&str> = self.entries.iter().map(|e| e.file.as_str()).collect();
            Error::new(
                "looking up the tarball in SHA256SUMS",
                format!("{name} is not listed (listed: {})", listed.join(", ")),
            )
            .hint("the release is incomplete; do not install it")
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
    const B: &str = "2C26B46B68FFC68FF99B453C1D30413413422D706483BFA0F98A5E886266E7AE";

    #[test]
    fn accepted_table() {
        let cases: &[(String, &[(&str, &str)])] = &[
            (format!("{A}  banger.tar.gz\n"), &[("banger.tar.gz", A)]),
            (format!("{A} *banger.tar.gz"), &[("banger.tar.gz", A)]),
            (format!("{A}  ./banger.tar.gz\r\n"), &[("banger.tar.gz", A)]),
            (format!("SHA256 (x y.tgz) = {A}\n"), &[("x y.tgz", A)]),
            (
                format!("# comment\n\n   \n{A}  a\n  # indented comment\nSHA256 (b) = {B}\n"),
                &[("a", A), ("b", &B.to_ascii_lowercase())],
            ),
            (format!("{A}  a\n{A}  a\n"), &[("a", A)]),
            (
                format!("{A}  name with  two spaces"),
                &[("name with  two spaces", A)],
            ),
            (String::new(), &[]),
        ];
        for (input, want) in cases {
            let s =
                Sha256Sums::parse(input.as_bytes()).unwrap_or_else(|e| panic!("{input:?}: {e}"));
            let got: Vec<(&str, &str)> = s
                .entries()
                .iter()
                .map(|e| (e.file.as_str(), e.digest.as_str()))
                .collect();
            assert_eq!(&got, want, "{input:?}");
        }
    }

    #[test]
    fn rejected_table() {
        let short = &A[..63];
        let cases: &[(String, &str)] = &[
            (format!("{A} banger"), "line 1"),
            (format!("{A}\tbanger"), "line 1"),
            (format!("{A}  "), "line 1"),
            (format!("{short}  banger"), "line 1"),
            (format!("# ok\n{A}x  banger"), "line 2"),
            (format!("\n\nzz{}  banger", &A[2..]), "line 3"),
            (format!("SHA256 (banger) = {short}"), "line 1"),
            (format!("SHA256 (banger) {A}"), "line 1"),
            (format!("MD5 (banger) = {A}"), "line 1"),
            (format!("SHA256 () = {A}"), "line 1"),
            ("garbage".to_string(), "line 1"),
            (format!("{A}  a\n{}  a\n", B), "listed twice"),
        ];
        for (input, want) in cases {
            let e = Sha256Sums::parse(input.as_bytes()).unwrap_err().to_string();
            assert!(e.contains(want), "{input:?}: {e}");
        }
        assert!(Sha256Sums::parse(b"\xff\xfe").is_err());
    }

    #[test]
    fn lookup_and_expect() {
        let s = Sha256Sums::parse(format!("{A}  a.tgz\n{B}  b.tgz\n").as_bytes()).unwrap();
        assert_eq!(s.lookup("a.tgz"), Some(A));
        assert_eq!(s.lookup("./b.tgz"), Some(B.to_ascii_lowercase().as_str()));
        assert_eq!(s.lookup("c.tgz"), None);
        let e = s.expect("c.tgz").unwrap_err().to_string();
        assert!(
            e.contains("c.tgz is not listed (listed: a.tgz, b.tgz)"),
            "{e}"
        );
    }
}
