//! File mechanics for banger's SSH material: owner-only directories, unique temp siblings,
//! create-once and replace-atomically writes, and an advisory lock file. It decides nothing about
//! what is written where; its callers do.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Context, Error, Result};

/// A temp path beside `path` that no other thread or process picks (pid, counter, clock).
pub(crate) fn temp_sibling(path: &Path) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    path.with_file_name(format!(
        ".{name}.tmp.{}.{}.{nanos}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ))
}

/// fsyncs a directory so a rename or link inside it is durable.
fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .ctx(|| format!("syncing directory {}", dir.display()))
}

fn parent_of(path: &Path) -> Result<&Path> {
    path.parent()
        .ok_or_else(|| Error::new(format!("writing {}", path.display()), "path has no parent"))
}

/// Whether a write must survive a power loss (fsync of the file and its directory) or only be
/// atomic (readers see the old or the new file, never half of one; the rename is enough).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Durability {
    /// fsync file and directory: the install's key, which guests already carry.
    Synced,
    /// Atomic only: files the daemon can derive again (pins from the agents' `hello`, the ssh
    /// config from the VM table) and which sit on the boot path, where two fsyncs cost ~6 ms.
    AtomicOnly,
}

/// Writes `bytes` into a new temp sibling of `path` with exactly `mode` (fsynced when `sync`);
/// returns its path.
fn write_temp(path: &Path, bytes: &[u8], mode: u32, sync: bool) -> Result<PathBuf> {
    let tmp = temp_sibling(path);
    let result = (|| -> io::Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)?;
        f.write_all(bytes)?;
        // The umask may have narrowed the mode given to open(2).
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        if sync {
            f.sync_all()?;
        }
        Ok(())
    })();
    match result {
        Ok(()) => Ok(tmp),
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            Err(Error::new(format!("writing {}", tmp.display()), e))
        }
    }
}

/// Replaces `path` with `bytes` (mode `mode`) in one rename: readers see the old or the new file,
/// never a half-written one.
pub(crate) fn replace_atomic(
    path: &Path,
    bytes: &[u8],
    mode: u32,
    durability: Durability,
) -> Result<()> {
    replace_atomic_owned(path, bytes, mode, None, durability)
}

/// [`replace_atomic`], and the new file gets `owner` (uid, gid) when given and not already ours
/// (root editing a user's file keeps it the user's).
pub(crate) fn replace_atomic_owned(
    path: &Path,
    bytes: &[u8],
    mode: u32,
    owner: Option<(u32, u32)>,
    durability: Durability,
) -> Result<()> {
    let dir = parent_of(path)?;
    let sync = durability == Durability::Synced;
    let tmp = write_temp(path, bytes, mode, sync)?;
    let mut result = Ok(());
    if let Some((uid, gid)) = owner {
        let me = (
            rustix::process::geteuid().as_raw(),
            rustix::process::getegid().as_raw(),
        );
        if (uid, gid) != me {
            result = std::os::unix::fs::chown(&tmp, Some(uid), Some(gid));
        }
    }
    if let Err(e) = result.and_then(|()| fs::rename(&tmp, path)) {
        let _ = fs::remove_file(&tmp);
        return Err(Error::new(format!("writing {}", path.display()), e));
    }
    if sync {
        sync_dir(dir)?;
    }
    Ok(())
}

/// Creates `path` with `bytes` only if it does not exist yet, atomically (a complete temp file is
/// hard-linked into place, which fails when another writer got there first). Returns false when
/// `path` already existed; then nothing was changed.
pub(crate) fn create_once(path: &Path, bytes: &[u8], mode: u32) -> Result<bool> {
    let dir = parent_of(path)?;
    let tmp = write_temp(path, bytes, mode, true)?;
    let linked = fs::hard_link(&tmp, path);
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => {
            sync_dir(dir)?;
            Ok(true)
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(Error::new(format!("creating {}", path.display()), e)),
    }
}

/// Reads `path` if it exists (`Ok(None)` when missing), refusing a symlink.
pub(crate) fn read_regular(path: &Path) -> Result<Option<Vec<u8>>> {
    use std::io::Read;
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path);
    let mut f = match f {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            return Err(Error::new(
                format!("reading {}", path.display()),
                "it is a symlink; banger's SSH files must be regular files",
            )
            .hint(format!(
                "remove {} and let banger recreate it",
                path.display()
            )))
        }
        Err(e) => return Err(Error::new(format!("reading {}", path.display()), e)),
    };
    let mut buf = Vec::new();
    f.read_to_end(&mut buf)
        .ctx(|| format!("reading {}", path.display()))?;
    Ok(Some(buf))
}

/// Makes sure `dir` exists as a real directory (not a symlink) with mode 0700; creates missing
/// parents with default modes. A looser mode on an existing directory we own is tightened.
pub(crate) fn ensure_private_dir(dir: &Path) -> Result<()> {
    let what = || format!("preparing {}", dir.display());
    match fs::symlink_metadata(dir) {
        Ok(md) if md.file_type().is_symlink() || !md.is_dir() => {
            return Err(Error::new(what(), "it exists and is not a directory")
                .hint(format!("remove {} and retry", dir.display())))
        }
        Ok(md) => {
            if md.mode() & 0o077 != 0 && md.uid() == rustix::process::geteuid().as_raw() {
                fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).ctx(what)?;
            }
            return Ok(());
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::new(what(), e)),
    }
    if let Some(parent) = dir.parent() {
        fs::create_dir_all(parent).ctx(what)?;
    }
    match fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return ensure_private_dir(dir),
        Err(e) => return Err(Error::new(what(), e)),
    }
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).ctx(what)
}

/// An exclusive advisory lock on `<path>` (a lock file, created 0600 if missing), held until drop.
pub(crate) struct FileLock {
    _file: File,
}

impl FileLock {
    /// Blocks until the lock on `path` is ours.
    pub(crate) fn exclusive(path: &Path) -> Result<FileLock> {
        let what = || format!("locking {}", path.display());
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
            .ctx(what)?;
        loop {
            match rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive) {
                Ok(()) => return Ok(FileLock { _file: file }),
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(Error::new(what(), e)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::system::testutil::TempDir;

    #[test]
    fn create_once_never_replaces() {
        let t = TempDir::new();
        let p = t.path().join("k");
        assert!(create_once(&p, b"first", 0o600).unwrap());
        assert!(!create_once(&p, b"second", 0o600).unwrap());
        assert_eq!(fs::read(&p).unwrap(), b"first");
        assert_eq!(fs::metadata(&p).unwrap().mode() & 0o777, 0o600);
        // No temp files left.
        assert_eq!(fs::read_dir(t.path()).unwrap().count(), 1);
    }

    #[test]
    fn replace_atomic_sets_mode_and_leaves_no_temp() {
        let t = TempDir::new();
        let p = t.path().join("f");
        replace_atomic(&p, b"one", 0o600, Durability::Synced).unwrap();
        replace_atomic(&p, b"two", 0o644, Durability::AtomicOnly).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(fs::metadata(&p).unwrap().mode() & 0o777, 0o644);
        assert_eq!(fs::read_dir(t.path()).unwrap().count(), 1);
    }

    #[test]
    fn private_dir_created_0700_and_tightened() {
        let t = TempDir::new();
        let d = t.path().join("a/b/ssh");
        ensure_private_dir(&d).unwrap();
        assert_eq!(fs::metadata(&d).unwrap().mode() & 0o777, 0o700);
        fs::set_permissions(&d, fs::Permissions::from_mode(0o755)).unwrap();
        ensure_private_dir(&d).unwrap();
        assert_eq!(fs::metadata(&d).unwrap().mode() & 0o777, 0o700);
    }

    #[test]
    fn private_dir_refuses_symlink_and_file() {
        let t = TempDir::new();
        let real = t.path().join("real");
        fs::create_dir(&real).unwrap();
        let link = t.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let e = ensure_private_dir(&link).unwrap_err();
        assert!(e.to_string().contains("not a directory"), "{e}");
        let file = t.path().join("file");
        fs::write(&file, b"x").unwrap();
        assert!(ensure_private_dir(&file).is_err());
        // Nothing was changed.
        assert_eq!(fs::read(&file).unwrap(), b"x");
        assert!(fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
    }

    #[test]
    fn read_regular_refuses_symlink() {
        let t = TempDir::new();
        let real = t.path().join("real");
        fs::write(&real, b"x").unwrap();
        let link = t.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        assert!(read_regular(&link)
            .unwrap_err()
            .to_string()
            .contains("symlink"));
        assert_eq!(read_regular(&real).unwrap().unwrap(), b"x");
        assert_eq!(read_regular(&t.path().join("missing")).unwrap(), None);
    }
}
