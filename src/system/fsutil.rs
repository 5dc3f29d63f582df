//! Small filesystem mechanics shared by the system module: atomic writes and content comparison.
//! Nothing here decides what to write where; the callers do.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Context, Error, Result};

/// A sibling temp path for `path`: same directory (so the rename is atomic), hidden, per process.
pub(crate) fn temp_sibling(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp.{}", std::process::id()))
}

/// fsyncs a directory so a rename inside it is durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .ctx(|| format!("syncing directory {}", dir.display()))
}

fn parent_of(path: &Path) -> Result<&Path> {
    path.parent()
        .ok_or_else(|| Error::new(format!("writing {}", path.display()), "path has no parent"))
}

/// Writes `path` atomically from `fill`: temp file in the same directory, write, set `mode`, fsync,
/// rename over `path`, fsync the directory. On failure the temp file is removed and `path` is
/// untouched.
pub(crate) fn write_atomic_with(
    path: &Path,
    mode: u32,
    fill: impl FnOnce(&mut File) -> io::Result<()>,
) -> Result<()> {
    let dir = parent_of(path)?;
    let tmp = temp_sibling(path);
    let what = || format!("writing {}", path.display());
    let result = (|| -> io::Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        fill(&mut f)?;
        // The umask may have narrowed the mode given to open(2).
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(Error::new(what(), e));
    }
    sync_dir(dir)
}

/// Writes `bytes` to `path` atomically with `mode`.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    write_atomic_with(path, mode, |f| f.write_all(bytes))
}

/// Reads `path` if it exists: `Ok(None)` when missing.
pub(crate) fn read_if_exists(path: &Path) -> Result<Option<Vec<u8>>> {
    match fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::new(format!("reading {}", path.display()), e)),
    }
}

/// True when both files exist and have identical contents (streamed, no whole-file buffers).
pub(crate) fn same_contents(a: &Path, b: &Path) -> Result<bool> {
    let open = |p: &Path| -> Result<Option<File>> {
        match File::open(p) {
            Ok(f) => Ok(Some(f)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::new(format!("reading {}", p.display()), e)),
        }
    };
    let (Some(mut fa), Some(mut fb)) = (open(a)?, open(b)?) else {
        return Ok(false);
    };
    let (ma, mb) = (
        fa.metadata().ctx(|| format!("reading {}", a.display()))?,
        fb.metadata().ctx(|| format!("reading {}", b.display()))?,
    );
    if ma.len() != mb.len() {
        return Ok(false);
    }
    let mut ba = vec![0u8; 64 * 1024];
    let mut bb = vec![0u8; 64 * 1024];
    loop {
        let n = read_full(&mut fa, &mut ba).ctx(|| format!("reading {}", a.display()))?;
        let m = read_full(&mut fb, &mut bb).ctx(|| format!("reading {}", b.display()))?;
        if n != m || ba[..n] != bb[..m] {
            return Ok(false);
        }
        if n == 0 {
            return Ok(true);
        }
    }
}

fn read_full(f: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match f.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Creates `dir` (and parents) if missing; sets `mode` on `dir` itself when it was created.
pub(crate) fn ensure_dir(dir: &Path, mode: u32) -> Result<bool> {
    if dir.is_dir() {
        return Ok(false);
    }
    fs::create_dir_all(dir).ctx(|| format!("creating {}", dir.display()))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(mode))
        .ctx(|| format!("setting mode of {}", dir.display()))?;
    Ok(true)
}

/// Removes a file or symlink; `Ok(false)` when it was already gone.
pub(crate) fn remove_file_if_exists(path: &Path) -> Result<bool> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(Error::new(format!("removing {}", path.display()), e)),
    }
}

/// Removes a directory tree; `Ok(false)` when it was already gone.
pub(crate) fn remove_tree_if_exists(path: &Path) -> Result<bool> {
    match fs::remove_dir_all(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(Error::new(format!("removing {}", path.display()), e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::system::testutil::TempDir;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn atomic_write_replaces_and_sets_mode() {
        let t = TempDir::new();
        let p = t.path().join("f");
        write_atomic(&p, b"one", 0o600).unwrap();
        write_atomic(&p, b"two", 0o644).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(fs::metadata(&p).unwrap().mode() & 0o777, 0o644);
        // No temp file left behind.
        assert_eq!(fs::read_dir(t.path()).unwrap().count(), 1);
    }

    #[test]
    fn same_contents_table() {
        let t = TempDir::new();
        let (a, b, c) = (t.path().join("a"), t.path().join("b"), t.path().join("c"));
        fs::write(&a, b"xyz").unwrap();
        fs::write(&b, b"xyz").unwrap();
        fs::write(&c, b"xyq").unwrap();
        assert!(same_contents(&a, &b).unwrap());
        assert!(same_contents(&a, &a).unwrap());
        assert!(!same_contents(&a, &c).unwrap());
        assert!(!same_contents(&a, &t.path().join("missing")).unwrap());
    }
}
