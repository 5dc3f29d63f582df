//! The fenced `Include` of banger's ssh config in the user's `~/.ssh/config`.
//!
//! Owns installing (idempotent; the fence goes at the very top, because an `Include` below a
//! `Host` or `Match` line would only apply inside that block), uninstalling (exactly the fence's
//! lines go; everything the user wrote around it stays byte for byte) and the text printed when
//! the user only asks what would be added. A missing file is created 0600 (and `~/.ssh` 0700); an
//! existing file keeps its mode and owner. A symlinked `~/.ssh/config` is refused: replacing it
//! would break the link (dotfile managers keep the real file elsewhere), and editing through it
//! would change a file banger did not mean to. It never touches anything else in `~/.ssh`.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::Path;

use super::command::config_path;
use super::files;
use crate::error::{Context, Error, Result};

/// First line of the fence.
pub const BEGIN: &str = "# >>> banger ssh-config (added by `banger ssh-config --install`; `--uninstall` removes it) >>>";
/// Last line of the fence.
pub const END: &str = "# <<< banger ssh-config <<<";

/// What an install or uninstall did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The fence was written (file created or edited).
    Installed,
    /// The fence was already at the top, as it should be; nothing written.
    AlreadyInstalled,
    /// The fence was removed.
    Removed,
    /// There was no fence (or no file); nothing written.
    NotInstalled,
}

/// The fence: three lines including `include` (banger's generated config).
pub fn fence(include: &Path) -> Result<String> {
    Ok(format!(
        "{BEGIN}\nInclude {}\n{END}\n",
        config_path(include)?
    ))
}

/// Where the fence is: the byte range of its lines in `text`, or `None`. A half or doubled fence
/// is an error (the user must look at it).
fn find_fence(text: &str) -> Result<Option<std::ops::Range<usize>>, String> {
    let mut start = None;
    let mut found = None;
    let mut pos = 0;
    for line in text.split_inclusive('\n') {
        let l = line.trim_end_matches(['\n', '\r']).trim_end();
        if l == BEGIN {
            if start.is_some() || found.is_some() {
                return Err("it holds banger's fence more than once".into());
            }
            start = Some(pos);
        } else if l == END {
            match start.take() {
                Some(s) => found = Some(s..pos + line.len()),
                None => return Err("banger's fence end line appears without its start".into()),
            }
        }
        pos += line.len();
    }
    if start.is_some() {
        return Err("banger's fence start line appears without its end".into());
    }
    Ok(found)
}

/// `text` with the fence at its top (any earlier fence removed). Pure; table-tested.
pub fn with_fence(text: &str, fence: &str) -> Result<String, String> {
    let rest = without_fence(text)?.unwrap_or_else(|| text.to_string());
    Ok(format!("{fence}{rest}"))
}

/// `text` without the fence, or `None` when it has none. Pure; table-tested.
pub fn without_fence(text: &str) -> Result<Option<String>, String> {
    Ok(find_fence(text)?.map(|r| format!("{}{}", &text[..r.start], &text[r.end..])))
}

fn check_not_symlink(config: &Path) -> Result<Option<fs::Metadata>> {
    match fs::symlink_metadata(config) {
        Ok(md) if md.file_type().is_symlink() => Err(Error::new(
            format!("editing {}", config.display()),
            "it is a symlink; banger would either replace your link with a plain file or edit the \
             file behind it, so it does neither",
        )
        .hint(
            "add the lines `banger ssh-config` prints at the top of the file the link points to",
        )),
        Ok(md) if !md.is_file() => Err(Error::new(
            format!("editing {}", config.display()),
            "it is not a regular file",
        )),
        Ok(md) => Ok(Some(md)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::new(format!("reading {}", config.display()), e)),
    }
}

fn read_text(config: &Path) -> Result<String> {
    let bytes = files::read_regular(config)?.unwrap_or_default();
    String::from_utf8(bytes).map_err(|_| {
        Error::new(
            format!("reading {}", config.display()),
            "it is not UTF-8 text",
        )
    })
}

fn malformed(config: &Path, why: String) -> Error {
    Error::new(format!("editing {}", config.display()), why).hint(format!(
        "fix the lines between `{BEGIN}` and `{END}` by hand, then retry"
    ))
}

/// Writes `text` over `config`, keeping an existing file's mode and owner.
fn store(config: &Path, text: &str, old: Option<&fs::Metadata>) -> Result<()> {
    let mode = old.map(|m| m.mode() & 0o7777).unwrap_or(0o600);
    let owner = old.map(|m| (m.uid(), m.gid()));
    files::replace_atomic_owned(
        config,
        text.as_bytes(),
        mode,
        owner,
        files::Durability::Synced,
    )
}

/// Adds the fence including `include` at the top of `config`; creates `config` (0600) and its
/// directory (0700) when missing. Idempotent: a fence already at the top is left alone.
pub fn install(config: &Path, include: &Path) -> Result<Outcome> {
    let fence = fence(include)?;
    let old_md = check_not_symlink(config)?;
    let old = read_text(config)?;
    let new = with_fence(&old, &fence).map_err(|e| malformed(config, e))?;
    if old_md.is_some() && new == old {
        return Ok(Outcome::AlreadyInstalled);
    }
    if old_md.is_none() {
        if let Some(dir) = config.parent() {
            if !dir.exists() {
                fs::DirBuilder::new()
                    .mode(0o700)
                    .recursive(true)
                    .create(dir)
                    .ctx(|| format!("creating {}", dir.display()))?;
            }
        }
    }
    store(config, &new, old_md.as_ref())?;
    Ok(Outcome::Installed)
}

/// Removes exactly the fence's lines from `config`. A missing file or fence changes nothing.
pub fn uninstall(config: &Path) -> Result<Outcome> {
    let Some(md) = check_not_symlink(config)? else {
        return Ok(Outcome::NotInstalled);
    };
    let old = read_text(config)?;
    match without_fence(&old).map_err(|e| malformed(config, e))? {
        None => Ok(Outcome::NotInstalled),
        Some(new) => {
            store(config, &new, Some(&md))?;
            Ok(Outcome::Removed)
        }
    }
}

/// Whether `config` holds the fence (anywhere).
pub fn is_installed(config: &Path) -> Result<bool> {
    check_not_symlink(config)?;
    let text = read_text(config)?;
    Ok(find_fence(&text)
        .map_err(|e| malformed(config, e))?
        .is_some())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::system::testutil::TempDir;
    use std::os::unix::fs::PermissionsExt;
    use std::path::PathBuf;

    const INC: &str = "/var/lib/banger/ssh/config";

    fn f() -> String {
        fence(Path::new(INC)).unwrap()
    }

    #[test]
    fn fence_text() {
        assert_eq!(
            f(),
            format!("{BEGIN}\nInclude /var/lib/banger/ssh/config\n{END}\n")
        );
        assert_eq!(
            fence(Path::new("/tmp/a b/config")).unwrap(),
            format!("{BEGIN}\nInclude \"/tmp/a b/config\"\n{END}\n")
        );
    }

    #[test]
    fn with_fence_table() {
        let fence = f();
        let cases: Vec<(String, String)> = vec![
            // Empty file.
            (String::new(), fence.clone()),
            // Goes above Host blocks, never inside one.
            (
                "Host gh\n  User git\n".into(),
                format!("{fence}Host gh\n  User git\n"),
            ),
            // No trailing newline in the user's file: kept as is.
            ("Host a".into(), format!("{fence}Host a")),
            // Already at the top: same text.
            (format!("{fence}Host a\n"), format!("{fence}Host a\n")),
            // Moved from inside a Host block to the top.
            (
                format!("Host a\n  User x\n{fence}Host b\n"),
                format!("{fence}Host a\n  User x\nHost b\n"),
            ),
        ];
        for (input, want) in cases {
            assert_eq!(with_fence(&input, &fence).unwrap(), want, "{input:?}");
        }
    }

    #[test]
    fn without_fence_table() {
        let fence = f();
        assert_eq!(without_fence("Host a\n").unwrap(), None);
        assert_eq!(without_fence("").unwrap(), None);
        assert_eq!(
            without_fence(&format!("# mine\n{fence}\nHost a\n")).unwrap(),
            Some("# mine\n\nHost a\n".into())
        );
        // The fence with another Include path is still banger's fence.
        let other = fence.replace(INC, "/elsewhere/config");
        assert_eq!(without_fence(&other).unwrap(), Some(String::new()));
        // Malformed fences are refused, not guessed at.
        for bad in [
            format!("{BEGIN}\nInclude x\n"),
            format!("Include x\n{END}\n"),
            format!("{fence}{fence}"),
            format!("{BEGIN}\n{BEGIN}\n{END}\n"),
        ] {
            assert!(without_fence(&bad).is_err(), "{bad:?}");
            assert!(with_fence(&bad, &fence).is_err(), "{bad:?}");
        }
    }

    fn home() -> (TempDir, PathBuf) {
        let t = TempDir::new();
        let c = t.path().join(".ssh/config");
        (t, c)
    }

    #[test]
    fn install_twice_then_uninstall_restores_the_file() {
        let (_t, c) = home();
        fs::create_dir_all(c.parent().unwrap()).unwrap();
        let original = "# my settings\nHost gh\n  User git\n\nHost *\n  ServerAliveInterval 30\n";
        fs::write(&c, original).unwrap();
        fs::set_permissions(&c, fs::Permissions::from_mode(0o640)).unwrap();
        assert_eq!(install(&c, Path::new(INC)).unwrap(), Outcome::Installed);
        let once = fs::read_to_string(&c).unwrap();
        assert_eq!(once, format!("{}{original}", f()));
        assert_eq!(fs::metadata(&c).unwrap().mode() & 0o777, 0o640, "mode kept");
        let ino = fs::metadata(&c).unwrap().ino();
        assert_eq!(
            install(&c, Path::new(INC)).unwrap(),
            Outcome::AlreadyInstalled
        );
        assert_eq!(fs::metadata(&c).unwrap().ino(), ino, "rewritten");
        assert!(is_installed(&c).unwrap());
        assert_eq!(uninstall(&c).unwrap(), Outcome::Removed);
        assert_eq!(fs::read_to_string(&c).unwrap(), original);
        assert_eq!(uninstall(&c).unwrap(), Outcome::NotInstalled);
        assert!(!is_installed(&c).unwrap());
    }

    #[test]
    fn uninstall_keeps_user_edits_around_the_fence() {
        let (_t, c) = home();
        install(&c, Path::new(INC)).unwrap();
        let text = fs::read_to_string(&c).unwrap();
        let edited = format!("# added above by the user\n{text}Host added-below\n  User me\n");
        fs::write(&c, &edited).unwrap();
        assert_eq!(uninstall(&c).unwrap(), Outcome::Removed);
        assert_eq!(
            fs::read_to_string(&c).unwrap(),
            "# added above by the user\nHost added-below\n  User me\n"
        );
    }

    #[test]
    fn missing_file_and_dir_are_created_owner_only() {
        let (t, c) = home();
        assert_eq!(uninstall(&c).unwrap(), Outcome::NotInstalled);
        assert!(
            !t.path().join(".ssh").exists(),
            "uninstall created something"
        );
        assert_eq!(install(&c, Path::new(INC)).unwrap(), Outcome::Installed);
        assert_eq!(fs::metadata(&c).unwrap().mode() & 0o777, 0o600);
        assert_eq!(
            fs::metadata(c.parent().unwrap()).unwrap().mode() & 0o777,
            0o700
        );
        assert_eq!(fs::read_to_string(&c).unwrap(), f());
        assert_eq!(uninstall(&c).unwrap(), Outcome::Removed);
        assert_eq!(fs::read_to_string(&c).unwrap(), "");
    }

    #[test]
    fn symlinked_config_is_refused_and_untouched() {
        let (t, c) = home();
        fs::create_dir_all(c.parent().unwrap()).unwrap();
        let real = t.path().join("dotfiles-config");
        fs::write(&real, "Host a\n").unwrap();
        std::os::unix::fs::symlink(&real, &c).unwrap();
        for r in [install(&c, Path::new(INC)), uninstall(&c)] {
            let e = r.unwrap_err().to_string();
            assert!(e.contains("symlink"), "{e}");
        }
        assert!(fs::symlink_metadata(&c).unwrap().file_type().is_symlink());
        assert_eq!(fs::read_to_string(&real).unwrap(), "Host a\n");
    }

    #[test]
    fn malformed_fence_is_refused_and_untouched() {
        let (_t, c) = home();
        fs::create_dir_all(c.parent().unwrap()).unwrap();
        let bad = format!("Host a\n{BEGIN}\nInclude x\n");
        fs::write(&c, &bad).unwrap();
        for r in [install(&c, Path::new(INC)), uninstall(&c)] {
            let e = r.unwrap_err().to_string();
            assert!(
                e.contains("without its end") && e.contains("by hand"),
                "{e}"
            );
        }
        assert_eq!(fs::read_to_string(&c).unwrap(), bad);
    }

    /// With the fence installed, ssh resolves `<name>.vm` through banger's file even though the
    /// user's own blocks follow.
    #[test]
    fn ssh_follows_the_include() {
        if !Path::new("/usr/bin/ssh").exists() {
            eprintln!("SKIP: ssh_follows_the_include: ssh is not installed");
            return;
        }
        let (t, c) = home();
        let inc = t.path().join("banger-config");
        fs::write(
            &inc,
            "Host dev.vm\n    HostName 172.30.0.2\n    User root\n",
        )
        .unwrap();
        fs::create_dir_all(c.parent().unwrap()).unwrap();
        fs::write(&c, "Host *\n    User someone\n").unwrap();
        install(&c, &inc).unwrap();
        let out = std::process::Command::new("/usr/bin/ssh")
            .arg("-G")
            .arg("-F")
            .arg(&c)
            .arg("dev.vm")
            .output()
            .unwrap();
        let cfg = String::from_utf8(out.stdout).unwrap();
        assert!(cfg.lines().any(|l| l == "hostname 172.30.0.2"), "{cfg}");
        assert!(cfg.lines().any(|l| l == "user root"), "{cfg}");
    }
}
