//! The ext4 maker: a directory tree becomes a root filesystem image with `mkfs.ext4 -d` (e2fsprogs
//! copies the tree into the new filesystem itself: no mount, no loop device, no root-only kernel
//! objects).
//!
//! It sizes nothing by guesswork at the last moment: before mkfs runs it measures the tree, refuses
//! a `--size` too small for it (saying how much it needs) and a host disk without room for the
//! image; a failed mkfs leaves no partial image behind.

use crate::error::{Context, Error, Result};
use std::collections::HashSet;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Stdio};

const MIB: u64 = 1 << 20;
/// mke2fs's default bytes-per-inode for ext4 (`inode_ratio` in mke2fs.conf).
const INODE_RATIO: u64 = 16384;
/// mke2fs's default inode size.
const INODE_SIZE: u64 = 256;
/// Room left for the guest's first boot (host keys, journal, logs, apt) on top of the tree.
const HEADROOM: u64 = 64 * MIB;

/// What a tree occupies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// Allocated bytes (st_blocks × 512), each hard-linked file counted once.
    pub bytes: u64,
    /// Files, directories, links and devices: each needs an inode.
    pub inodes: u64,
}

/// Walks `tree` (without following symlinks) and adds up what it holds, like `du -s` and `du
/// --inodes`.
pub fn measure(tree: &Path) -> Result<Usage> {
    let mut u = Usage::default();
    let mut seen = HashSet::new();
    let mut stack = vec![tree.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let rd = fs::read_dir(&dir).ctx(|| format!("measuring {}", dir.display()))?;
        u.inodes += 1;
        u.bytes += fs::symlink_metadata(&dir)
            .map(|m| m.blocks() * 512)
            .unwrap_or(0);
        for e in rd {
            let e = e.ctx(|| format!("measuring {}", dir.display()))?;
            let m = fs::symlink_metadata(e.path())
                .ctx(|| format!("measuring {}", e.path().display()))?;
            if m.is_dir() {
                stack.push(e.path());
                continue;
            }
            if m.nlink() > 1 && !seen.insert((m.dev(), m.ino())) {
                continue;
            }
            u.inodes += 1;
            u.bytes += m.blocks() * 512;
        }
    }
    Ok(u)
}

/// The journal mke2fs gives a filesystem of `size` bytes with 4 KiB blocks
/// (`ext2fs_default_journal_size`).
fn journal_for(size: u64) -> u64 {
    let blocks = size / 4096;
    let jblocks = match blocks {
        b if b < 2048 => 0,
        b if b < 32768 => 1024,
        b if b < 256 * 1024 => 4096,
        b if b < 512 * 1024 => 8192,
        b if b < 4096 * 1024 => 16384,
        b if b < 8192 * 1024 => 32768,
        b if b < 16384 * 1024 => 65536,
        b if b < 32768 * 1024 => 131072,
        _ => 262144,
    };
    jblocks * 4096
}

/// The smallest image size (whole MiB) that holds `u` plus [`HEADROOM`]: data, one inode per
/// entry with 10% spare, the inode tables, the journal and ~3% of block-group metadata.
pub fn required_size(u: &Usage) -> u64 {
    let data = u.bytes + HEADROOM;
    let by_inodes = (u.inodes + u.inodes / 10) * INODE_RATIO;
    let mut size = data;
    // The journal and inode tables grow with the size: settle in a few rounds.
    for _ in 0..4 {
        let tables = size / INODE_RATIO * INODE_SIZE;
        size = data + data / 32 + tables + journal_for(size);
    }
    size.max(by_inodes).div_ceil(MIB) * MIB
}

/// Parses `2G`, `1536M`, `800m`, `3g`, `1T` or a plain byte count (binary units).
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let bad = || format!("`{s}` is not a size: use e.g. 2G, 1536M");
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => MIB,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(bad()),
            };
            (&t[..i], m)
        }
        _ => (t, 1),
    };
    if num.is_empty() || !num.chars().all(|c| c.is_ascii_digit()) {
        return Err(bad());
    }
    let n: u64 = num.parse().map_err(|_| bad())?;
    let v = n.checked_mul(mult).ok_or_else(bad)?;
    if v < 16 * MIB {
        return Err(format!(
            "{s} is too small for any root filesystem (at least 16M)"
        ));
    }
    if v > 1 << 44 {
        return Err(format!("{s} is larger than 16T"));
    }
    Ok(v)
}

/// Human size in MiB/GiB for messages.
pub fn human(bytes: u64) -> String {
    if bytes >= 1 << 30 {
        format!("{:.1}G", bytes as f64 / (1u64 << 30) as f64)
    } else {
        format!("{}M", bytes.div_ceil(MIB))
    }
}

/// Refuses `size` if the tree needs more.
pub fn check_fits(u: &Usage, size: u64) -> Result<()> {
    let need = required_size(u);
    if size < need {
        return Err(Error::usage(
            format!("--size {}", human(size)),
            format!(
                "too small: the tree holds {} in {} files and needs an image of at least {}",
                human(u.bytes),
                u.inodes,
                human(need)
            ),
        )
        .hint(format!("use --size {}M or more", need.div_ceil(MIB))));
    }
    Ok(())
}

/// Bytes free for an unprivileged writer... and for root, on the filesystem holding `dir`.
fn free_bytes(dir: &Path) -> Result<u64> {
    let s = rustix::fs::statvfs(dir).ctx(|| format!("checking free space on {}", dir.display()))?;
    Ok(s.f_bavail.saturating_mul(s.f_frsize))
}

/// The host bytes an image of the tree occupies once written (mke2fs writes data and metadata;
/// free space stays holes).
pub fn host_bytes_needed(u: &Usage) -> u64 {
    u.bytes + u.bytes / 16 + u.inodes * INODE_SIZE + 32 * MIB
}

fn disk_full(image: &Path, free: u64, need: u64) -> Error {
    let dir = image.parent().unwrap_or(Path::new("/"));
    Error::new(
        format!("writing the image {}", image.display()),
        format!(
            "disk full: {} free on the filesystem holding {}, the image needs about {}",
            human(free),
            dir.display(),
            human(need)
        ),
    )
    .hint("free some space there and run the build again")
}

/// Makes `image` (which must not exist) from `tree`, `size` bytes large. On any failure the
/// image file is removed.
pub fn make(tree: &Path, image: &Path, size: u64, usage: &Usage) -> Result<()> {
    check_fits(usage, size)?;
    let dir = image.parent().unwrap_or(Path::new("/"));
    let need = host_bytes_needed(usage);
    let free = free_bytes(dir)?;
    if free < need {
        return Err(disk_full(image, free, need));
    }
    if fs::symlink_metadata(image).is_ok() {
        return Err(Error::new(
            format!("writing the image {}", image.display()),
            "the file already exists",
        ));
    }
    let out = Command::new("mkfs.ext4")
        // The file is new and sparse, so its journal blocks already read as zeros: writing them
        // again (64 MiB for 2G) is pure I/O.
        .args([
            "-q",
            "-F",
            "-L",
            "banger-root",
            "-E",
            "lazy_journal_init=1",
            "-d",
        ])
        .arg(tree)
        .arg(image)
        .arg(format!("{}k", size / 1024))
        .stdin(Stdio::null())
        .output();
    let result = match out {
        Err(e) => Err(Error::new(
            format!("making {}", image.display()),
            format!("cannot run mkfs.ext4: {e}"),
        )
        .hint("install e2fsprogs")),
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => {
            let text = String::from_utf8_lossy(&o.stderr).into_owned();
            Err(classify_failure(
                &text,
                image,
                size,
                usage,
                free_bytes(dir).unwrap_or(0),
            ))
        }
    };
    if result.is_err() {
        let _ = fs::remove_file(image);
    }
    result
}

/// Turns mkfs.ext4's stderr into the error the operator can act on.
pub fn classify_failure(stderr: &str, image: &Path, size: u64, u: &Usage, free: u64) -> Error {
    if stderr.contains("No space left on device") {
        return disk_full(image, free, host_bytes_needed(u));
    }
    if stderr.contains("Could not allocate block") || stderr.contains("Could not allocate inode") {
        // Our estimate was too low for this tree: ask for a quarter more than mkfs just failed at.
        let need = (required_size(u).max(size) + size / 4).div_ceil(MIB) * MIB;
        return Error::usage(
            format!("--size {}", human(size)),
            format!(
                "too small: mkfs.ext4 ran out of space copying a tree of {} in {} files",
                human(u.bytes),
                u.inodes
            ),
        )
        .hint(format!("use --size {}M or more", need / MIB));
    }
    let last = stderr
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("no output");
    Error::new(
        format!("making {} with mkfs.ext4", image.display()),
        last.trim().to_string(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    struct Tmp(PathBuf);
    impl Drop for Tmp {
        fn drop(&mut self) {
            let _ = Command::new("umount")
                .arg("--lazy")
                .arg(&self.0)
                .stderr(Stdio::null())
                .status();
            let _ = fs::remove_dir_all(&self.0);
        }
    }
    fn tmp(tag: &str) -> Tmp {
        let d = std::env::temp_dir().join(format!("banger-ext4-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        Tmp(d)
    }

    #[test]
    fn sizes_parse() {
        let ok: &[(&str, u64)] = &[
            ("2G", 2 << 30),
            ("2g", 2 << 30),
            ("1536M", 1536 * MIB),
            ("16M", 16 * MIB),
            ("1T", 1 << 40),
            ("33554432", 32 * MIB),
            ("65536K", 64 * MIB),
        ];
        for (s, v) in ok {
            assert_eq!(parse_size(s), Ok(*v), "{s}");
        }
        for bad in [
            "",
            "G",
            "2X",
            "2.5G",
            "-1G",
            "1M",
            "99999999999T",
            "2 G",
            "0x10M",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn required_size_covers_the_tree_and_grows_with_it() {
        let small = Usage {
            bytes: 10 * MIB,
            inodes: 100,
        };
        let debian = Usage {
            bytes: 420 * MIB,
            inodes: 19_000,
        };
        let many_files = Usage {
            bytes: 10 * MIB,
            inodes: 200_000,
        };
        for u in [small, debian, many_files] {
            let r = required_size(&u);
            assert_eq!(r % MIB, 0);
            assert!(r >= u.bytes + HEADROOM, "{u:?}: {r}");
            assert!(r / INODE_RATIO >= u.inodes, "{u:?}: enough inodes");
        }
        assert!(required_size(&debian) > required_size(&small));
        assert!(required_size(&many_files) > required_size(&small));
        // A debootstrapped bookworm fits the default 2G with room to spare.
        assert!(required_size(&debian) < 1 << 30);
    }

    #[test]
    fn too_small_says_how_much_is_needed() {
        let u = Usage {
            bytes: 420 * MIB,
            inodes: 19_000,
        };
        let e = check_fits(&u, 100 * MIB).unwrap_err();
        let need = required_size(&u) / MIB;
        assert_eq!(e.code, 2);
        assert!(e.to_string().contains(&format!("--size {need}M")), "{e}");
        assert!(check_fits(&u, 2 << 30).is_ok());
    }

    #[test]
    fn mkfs_failures_are_classified() {
        let u = Usage {
            bytes: 30 * MIB,
            inodes: 200,
        };
        let img = Path::new("/x/img");
        let e = classify_failure(
            "__populate_fs: Could not allocate block in ext2 filesystem while writing file \"big\"\nmkfs.ext4: Could not allocate block in ext2 filesystem while populating file system\n",
            img,
            20 * MIB,
            &u,
            1 << 30,
        );
        assert!(
            e.to_string().contains("too small") && e.to_string().contains("--size"),
            "{e}"
        );
        let e = classify_failure(
            "mkfs.ext4: No space left on device while writing out and closing file system\n",
            img,
            20 * MIB,
            &u,
            5 * MIB,
        );
        assert!(e.to_string().contains("disk full"), "{e}");
        let e = classify_failure("mkfs.ext4: Bad magic\n", img, 20 * MIB, &u, 1 << 30);
        assert!(e.to_string().contains("Bad magic"), "{e}");
    }

    fn have_mkfs() -> bool {
        crate::guest::have("mkfs.ext4")
    }

    fn sample_tree(root: &Path) {
        fs::create_dir_all(root.join("etc/sub")).unwrap();
        fs::write(root.join("etc/hostname"), "x\n").unwrap();
        fs::write(root.join("big"), vec![7u8; 3 * MIB as usize]).unwrap();
        fs::hard_link(root.join("big"), root.join("big-again")).unwrap();
        std::os::unix::fs::symlink("/etc/hostname", root.join("etc/sub/link")).unwrap();
    }

    #[test]
    fn measures_like_du_counting_hard_links_once() {
        let t = tmp("measure");
        let root = t.0.join("tree");
        sample_tree(&root);
        let u = measure(&root).unwrap();
        // tree, etc, etc/sub, hostname, big (+ its second name), link.
        assert_eq!(u.inodes, 6);
        assert!(u.bytes >= 3 * MIB && u.bytes < 4 * MIB, "{u:?}");
    }

    #[test]
    fn makes_an_image_and_leaves_nothing_when_too_small() {
        if !have_mkfs() {
            eprintln!("SKIP: makes_an_image_and_leaves_nothing_when_too_small: mkfs.ext4 missing");
            return;
        }
        let t = tmp("make");
        let root = t.0.join("tree");
        sample_tree(&root);
        let u = measure(&root).unwrap();
        let img = t.0.join("root.ext4");
        let e = make(&root, &img, 16 * MIB, &u).unwrap_err();
        assert!(e.to_string().contains("too small"), "{e}");
        assert!(!img.exists());

        make(&root, &img, required_size(&u), &u).unwrap();
        assert_eq!(fs::metadata(&img).unwrap().len(), required_size(&u));
        // The tree really is inside: debugfs reads the filesystem without mounting it.
        if crate::guest::have("debugfs") {
            let o = Command::new("debugfs")
                .args(["-R", "cat /etc/hostname"])
                .arg(&img)
                .output()
                .unwrap();
            assert_eq!(String::from_utf8_lossy(&o.stdout), "x\n");
        }
        // An existing file is never overwritten.
        let e = make(&root, &img, required_size(&u), &u).unwrap_err();
        assert!(e.to_string().contains("already exists"), "{e}");
        assert!(img.exists());
    }

    #[test]
    fn disk_full_is_refused_and_leaves_nothing() {
        if !rustix::process::geteuid().is_root() || !have_mkfs() {
            eprintln!("SKIP: disk_full_is_refused_and_leaves_nothing: needs root (tmpfs mount) and mkfs.ext4");
            return;
        }
        let t = tmp("full");
        let root = t.0.join("tree");
        sample_tree(&root);
        let small = t.0.join("small");
        fs::create_dir_all(&small).unwrap();
        // A 4 MiB tmpfs: too little for the image's data, however large the image's --size.
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=4m", "banger-test"])
            .arg(&small)
            .status()
            .unwrap();
        assert!(ok.success());
        let _unmount = Tmp(small.clone());
        let u = measure(&root).unwrap();
        let img = small.join("root.ext4");
        let e = make(&root, &img, 256 * MIB, &u).unwrap_err();
        assert!(e.to_string().contains("disk full"), "{e}");
        assert_eq!(
            fs::read_dir(&small).unwrap().count(),
            0,
            "nothing left behind"
        );
    }
}
