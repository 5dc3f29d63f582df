//! Per-VM disks: each VM gets its own copy-on-write copy of its image's root filesystem.
//!
//! A reflink (`FICLONE`) when the filesystem can share extents (btrfs, xfs), else a sparse copy
//! that writes only non-zero blocks, so a mostly-empty 10 GiB image costs what it holds.

use crate::error::{Context, Result};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// How a copy was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyKind {
    /// Shared extents: instant, no space used until written.
    Reflink,
    /// Zero blocks skipped as holes.
    Sparse,
}

/// Copies `src` to a new file `dst` (mode 0600; `dst` must not exist).
pub fn cow_copy(src: &Path, dst: &Path) -> Result<CopyKind> {
    let what = || format!("copying {} to {}", src.display(), dst.display());
    let input = File::open(src).ctx(what)?;
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dst)
        .ctx(what)?;
    let result = (|| {
        if rustix::fs::ioctl_ficlone(&out, &input).is_ok() {
            return Ok(CopyKind::Reflink);
        }
        sparse_copy(&input, &mut out).ctx(what)?;
        out.sync_all().ctx(what)?;
        Ok(CopyKind::Sparse)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(dst);
    }
    result
}

fn sparse_copy(input: &File, out: &mut File) -> std::io::Result<()> {
    let len = input.metadata()?.len();
    // Only the data extents are read (SEEK_DATA/SEEK_HOLE): a 2 GiB image holding 200 MiB is
    // copied in ~200 MiB of reads, not 2 GiB of zero checks. Filesystems without them report the
    // whole file as one extent.
    let mut pos: u64 = 0;
    while pos < len {
        let data = match rustix::fs::seek(input, rustix::fs::SeekFrom::Data(pos as i64)) {
            Ok(d) => d,
            Err(rustix::io::Errno::NXIO) => break,
            Err(e) => return Err(e.into()),
        };
        let hole = rustix::fs::seek(input, rustix::fs::SeekFrom::Hole(data as i64))
            .map_err(std::io::Error::from)?
            .min(len);
        copy_range(input, out, data, hole - data)?;
        pos = hole;
    }
    // Trailing holes need an explicit length.
    out.set_len(len)?;
    Ok(())
}

/// Copies `len` bytes at `offset` of `input` to the same offset of `out`, skipping zero blocks.
fn copy_range(mut input: &File, out: &mut File, offset: u64, len: u64) -> std::io::Result<()> {
    const BLOCK: usize = 64 * 1024;
    let mut buf = vec![0u8; BLOCK];
    input.seek(SeekFrom::Start(offset))?;
    out.seek(SeekFrom::Start(offset))?;
    let mut left = len;
    while left > 0 {
        let want = BLOCK.min(usize::try_from(left).unwrap_or(BLOCK));
        let n = read_full(&mut input, &mut buf[..want])?;
        if n == 0 {
            break;
        }
        if buf[..n].iter().all(|&b| b == 0) {
            out.seek(SeekFrom::Current(n as i64))?;
        } else {
            out.write_all(&buf[..n])?;
        }
        left -= n as u64;
    }
    Ok(())
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn copy_is_identical_and_sparse() {
        let dir = std::env::temp_dir().join(format!("banger-disk-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let src = dir.join("src.img");
        let mut f = File::create(&src).unwrap();
        f.write_all(b"header").unwrap();
        f.seek(SeekFrom::Start(8 << 20)).unwrap();
        f.write_all(b"middle").unwrap();
        // A data extent that is all zeros (written, not a hole) is still copied as a hole.
        f.seek(SeekFrom::Start(12 << 20)).unwrap();
        f.write_all(&vec![0u8; 1 << 20]).unwrap();
        f.set_len(16 << 20).unwrap();
        drop(f);
        let dst = dir.join("dst.img");
        let kind = cow_copy(&src, &dst).unwrap();
        assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
        let m = std::fs::metadata(&dst).unwrap();
        assert_eq!(m.len(), 16 << 20);
        if kind == CopyKind::Sparse {
            assert!(
                m.blocks() * 512 < 1 << 20,
                "copy is not sparse: {} blocks",
                m.blocks()
            );
        }
        // Never overwrites.
        assert!(cow_copy(&src, &dst).is_err());
        assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
