//! `/etc/banger/install.toml`: who owns this install and which build is installed.
//!
//! Owns the record's shape and its durable, atomic write. `system install` writes it whole;
//! `banger update` rewrites the version fields; the helper and doctor read it. A missing file means
//! "not installed"; a file that does not parse is an error, never silently replaced.

use serde::{Deserialize, Serialize};

use super::fsutil;
use crate::error::{Error, Result};
use crate::layout::Layout;

/// Mode of install.toml: world-readable (the CLI reads it as the user), root-writable.
pub const MODE: u32 = 0o644;

const HEADER: &str = "# Written by `banger system install`; `banger update` rewrites version, commit and built_at.\n";

/// The contents of install.toml.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct InstallInfo {
    /// The owner user's name: the daemon runs as this user.
    pub owner_user: String,
    /// The owner's uid: the daemon and helper accept this peer.
    pub owner_uid: u32,
    /// The owner's primary gid.
    pub owner_gid: u32,
    /// The owner's home directory.
    pub owner_home: String,
    /// Installed version, without a leading `v`.
    pub version: String,
    /// Installed git commit.
    pub commit: String,
    /// Build time of the installed binary (RFC 3339).
    pub built_at: String,
    /// When banger was first installed on this host (RFC 3339); kept across re-installs.
    pub installed_at: String,
}

impl InstallInfo {
    /// The three version fields as a [`crate::buildinfo::BuildInfo`].
    pub fn build(&self) -> crate::buildinfo::BuildInfo {
        crate::buildinfo::BuildInfo {
            version: self.version.clone(),
            commit: self.commit.clone(),
            built_at: self.built_at.clone(),
        }
    }
}

/// Parses install.toml text; `origin` names the file in errors.
pub fn parse(text: &str, origin: &str) -> Result<InstallInfo> {
    toml::from_str(text).map_err(|e| {
        Error::new(format!("parsing {origin}"), e.message().trim())
            .hint("fix or remove the file, then run sudo banger system install --owner USER")
    })
}

/// Renders install.toml text (with a header comment).
pub fn render(info: &InstallInfo) -> Result<String> {
    let body = toml::to_string(info).map_err(|e| Error::new("rendering install.toml", e))?;
    Ok(format!("{HEADER}{body}"))
}

/// Loads install.toml: `Ok(None)` when it does not exist (not installed).
pub fn load(layout: &Layout) -> Result<Option<InstallInfo>> {
    let path = layout.install_toml();
    let Some(bytes) = fsutil::read_if_exists(&path)? else {
        return Ok(None);
    };
    let text = String::from_utf8(bytes).map_err(|_| {
        Error::new(format!("parsing {}", path.display()), "not UTF-8")
            .hint("fix or remove the file, then run sudo banger system install --owner USER")
    })?;
    parse(&text, &path.display().to_string()).map(Some)
}

/// Writes install.toml atomically (temp file, fsync, rename, fsync dir), mode 0644. The directory
/// must exist.
pub fn save(layout: &Layout, info: &InstallInfo) -> Result<()> {
    let text = render(info)?;
    fsutil::write_atomic(&layout.install_toml(), text.as_bytes(), MODE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::system::testutil::TempDir;
    use std::os::unix::fs::MetadataExt;

    pub(crate) fn sample() -> InstallInfo {
        InstallInfo {
            owner_user: "alice".into(),
            owner_uid: 1000,
            owner_gid: 1000,
            owner_home: "/home/alice".into(),
            version: "0.1.0".into(),
            commit: "0123456789abcdef".into(),
            built_at: "2026-01-01T00:00:00Z".into(),
            installed_at: "2026-01-02T03:04:05Z".into(),
        }
    }

    #[test]
    fn missing_is_none() {
        let t = TempDir::new();
        assert_eq!(load(&Layout::under(t.path())).unwrap(), None);
    }

    #[test]
    fn save_load_round_trip_with_mode() {
        let t = TempDir::new();
        let l = Layout::under(t.path());
        std::fs::create_dir_all(l.etc_dir()).unwrap();
        save(&l, &sample()).unwrap();
        assert_eq!(load(&l).unwrap(), Some(sample()));
        let meta = std::fs::metadata(l.install_toml()).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o644);
        let text = std::fs::read_to_string(l.install_toml()).unwrap();
        assert!(text.starts_with("# Written by"));
        assert!(text.contains("owner_uid = 1000\n"), "{text}");
        assert!(text.contains("owner_user = \"alice\"\n"), "{text}");
    }

    #[test]
    fn unparsable_names_path_and_hint() {
        let t = TempDir::new();
        let l = Layout::under(t.path());
        std::fs::create_dir_all(l.etc_dir()).unwrap();
        for bad in ["owner_user = ", "owner_user = \"a\"\n", "[[["] {
            std::fs::write(l.install_toml(), bad).unwrap();
            let e = load(&l).unwrap_err();
            assert!(
                e.what.contains(&l.install_toml().display().to_string()),
                "{e}"
            );
            assert!(
                e.hint.as_deref().unwrap_or("").contains("system install"),
                "{e}"
            );
        }
    }

    #[test]
    fn save_without_etc_dir_fails_cleanly() {
        let t = TempDir::new();
        let l = Layout::under(t.path());
        let e = save(&l, &sample()).unwrap_err();
        assert!(e.what.contains("install.toml"), "{e}");
    }
}
