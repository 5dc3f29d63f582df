//! `banger update`: the signed self-update, one module per concern.
//!
//! The mechanics live here; the flow that strings them together as DESIGN.md §8's eleven steps
//! lives in its own module on top. Order of trust: the manifest only says where to look;
//! `SHA256SUMS` is trusted once its signature verifies against an embedded key; the tarball is
//! trusted once its streamed hash matches that file; only then is it extracted and run.
//!
//! - [`version`]: version parsing, ordering and the downgrade policy.
//! - [`manifest`]: `manifest.json`, target selection.
//! - [`sha256sums`]: the signed hash list.
//! - [`signature`]: ECDSA P-256 verification against embedded keys.
//! - [`download`]: capped, hashing HTTP downloads.
//! - [`staging`]: the staging dir and the strict tarball extractor.
//! - [`journal`]: the crash-safe update journal and the recovery decision.
//! - [`swap`]: putting the staged binary in place, restoring and committing.
//! - [`flow`]: `banger update` itself, the eleven steps in order, with recovery and rollback.

pub mod download;
pub mod flow;
pub mod journal;
pub mod manifest;
pub mod sha256sums;
pub mod signature;
pub mod staging;
pub mod swap;
pub mod version;

use std::io::Read;
use std::path::Path;

use crate::error::{Context, Result};

/// Lower-case hex SHA-256 of everything `r` yields.
pub fn sha256_reader(mut r: impl Read) -> std::io::Result<String> {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
    }
    Ok(hex::encode(ctx.finish()))
}

/// Lower-case hex SHA-256 of a file.
pub fn sha256_file(path: &Path) -> Result<String> {
    let f = std::fs::File::open(path).ctx(|| format!("opening {}", path.display()))?;
    sha256_reader(f).ctx(|| format!("reading {}", path.display()))
}

/// fsyncs a directory so that renames and unlinks in it are durable.
pub fn fsync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .ctx(|| format!("syncing directory {}", dir.display()))
}

#[cfg(test)]
pub(crate) mod testutil {
    //! A self-removing temp dir (no tempfile crate in the tree).
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicU32, Ordering};

    static SEQ: AtomicU32 = AtomicU32::new(0);

    /// A fresh directory under the system temp dir, removed on drop.
    pub struct TempDir(PathBuf);

    impl TempDir {
        pub fn new(tag: &str) -> TempDir {
            let p = std::env::temp_dir().join(format!(
                "banger-test-{tag}-{}-{}",
                std::process::id(),
                SEQ.fetch_add(1, Ordering::SeqCst)
            ));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }
        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
