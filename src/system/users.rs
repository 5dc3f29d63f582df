//! Owner lookup without libc: parse an `/etc/passwd`-format file.
//!
//! The passwd file is always the *host's* (`/etc/passwd`), never one under the layout root: the
//! owner is a real account on this machine. Every function takes the path so tests use fixtures.

use std::path::{Path, PathBuf};

use crate::error::{Context, Result};

/// A user account: the fields banger needs from one passwd line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// Login name.
    pub name: String,
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Home directory.
    pub home: String,
}

/// The host's passwd file. Not a [`crate::layout::Layout`] path on purpose: a temp layout still
/// runs on this host's accounts.
pub fn host_passwd() -> PathBuf {
    PathBuf::from("/etc/passwd")
}

/// Parses one passwd line (`name:pw:uid:gid:gecos:home:shell`). Comments, blank lines, NIS
/// `+`/`-` entries and malformed lines give `None`.
pub fn parse_line(line: &str) -> Option<User> {
    let line = line.trim_end_matches(['\r', '\n']);
    if line.trim().is_empty() || line.starts_with('#') || line.starts_with(['+', '-']) {
        return None;
    }
    let f: Vec<&str> = line.split(':').collect();
    if f.len() != 7 || f[0].is_empty() {
        return None;
    }
    Some(User {
        name: f[0].to_string(),
        uid: f[2].parse().ok()?,
        gid: f[3].parse().ok()?,
        home: f[5].to_string(),
    })
}

/// Parses a whole passwd file; malformed lines are skipped.
pub fn parse(text: &str) -> Vec<User> {
    text.lines().filter_map(parse_line).collect()
}

fn read(passwd: &Path) -> Result<Vec<User>> {
    let text = std::fs::read_to_string(passwd).ctx(|| format!("reading {}", passwd.display()))?;
    Ok(parse(&text))
}

/// The first user named `name` in `passwd`.
pub fn lookup_user(passwd: &Path, name: &str) -> Result<Option<User>> {
    Ok(read(passwd)?.into_iter().find(|u| u.name == name))
}

/// The first user with `uid` in `passwd`.
pub fn user_by_uid(passwd: &Path, uid: u32) -> Result<Option<User>> {
    Ok(read(passwd)?.into_iter().find(|u| u.uid == uid))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::system::testutil::TempDir;

    fn u(name: &str, uid: u32, gid: u32, home: &str) -> User {
        User {
            name: name.into(),
            uid,
            gid,
            home: home.into(),
        }
    }

    #[test]
    fn parse_line_table() {
        let cases: &[(&str, Option<User>)] = &[
            (
                "root:x:0:0:root:/root:/bin/bash",
                Some(u("root", 0, 0, "/root")),
            ),
            (
                "alice:x:1000:1001:Alice A,,,:/home/alice:/bin/zsh",
                Some(u("alice", 1000, 1001, "/home/alice")),
            ),
            (
                "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin",
                Some(u("nobody", 65534, 65534, "/nonexistent")),
            ),
            ("svc:x:998:998::/:\r", Some(u("svc", 998, 998, "/"))),
            ("# comment:x:1:1::/:/bin/sh", None),
            ("", None),
            ("   ", None),
            ("+nis::::::", None),
            ("-bad::::::", None),
            ("short:x:1:1", None),
            ("toomany:x:1:1:g:/h:/s:extra", None),
            ("neguid:x:-1:1:g:/h:/s", None),
            ("bigid:x:4294967296:1:g:/h:/s", None),
            ("nogid:x:1::g:/h:/s", None),
            (":x:1:1:g:/h:/s", None),
        ];
        for (line, want) in cases {
            assert_eq!(&parse_line(line), want, "line {line:?}");
        }
    }

    #[test]
    fn lookups_against_fixture() {
        let t = TempDir::new();
        let p = t.path().join("passwd");
        std::fs::write(
            &p,
            "root:x:0:0:root:/root:/bin/bash\n# x\nbroken line\nalice:x:1000:1000::/home/alice:/bin/sh\nalice:x:2000:2000::/dup:/bin/sh\n",
        )
        .unwrap();
        assert_eq!(
            lookup_user(&p, "alice").unwrap(),
            Some(u("alice", 1000, 1000, "/home/alice"))
        );
        assert_eq!(lookup_user(&p, "bob").unwrap(), None);
        assert_eq!(
            user_by_uid(&p, 0).unwrap().map(|u| u.name),
            Some("root".into())
        );
        assert_eq!(user_by_uid(&p, 5).unwrap(), None);
        let e = lookup_user(&t.path().join("nope"), "alice").unwrap_err();
        assert!(e.what.contains("nope"), "{e}");
    }
}
