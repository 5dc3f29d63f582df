//! The staging dir (`Layout::updates_dir`) and the strict release-tarball extractor.
//!
//! The staging dir is recreated clean and 0700 for every update (refused while the journal there
//! records an interrupted update: recovery goes first). A tarball is extracted only after its
//! streamed hash matched the signed SHA256SUMS entry, and even then only exactly the expected
//! files (`banger`), as regular files, each size-capped, never through a path we did not build
//! ourselves: no absolute paths, no `..`, no links, no devices, no directories. Any refusal
//! removes everything already extracted.

use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use super::download::Downloaded;
use super::journal;
use super::sha256sums::Sha256Sums;
use crate::error::{Error, Result};
use crate::layout::Layout;

/// The one file a release tarball holds.
pub const BINARY_NAME: &str = "banger";

/// Largest file accepted inside a tarball (uncompressed).
pub const MAX_FILE_BYTES: u64 = 512 << 20;

/// Where each staged artifact goes, all inside the staging dir.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StagingPaths {
    /// The staging dir itself.
    pub dir: PathBuf,
    /// Downloaded `SHA256SUMS`.
    pub sha256sums: PathBuf,
    /// Downloaded `SHA256SUMS.sig`.
    pub signature: PathBuf,
    /// Where the tarball is extracted.
    pub extract_dir: PathBuf,
}

impl StagingPaths {
    /// The paths for `layout`.
    pub fn new(layout: &Layout) -> StagingPaths {
        let dir = layout.updates_dir();
        StagingPaths {
            sha256sums: dir.join("SHA256SUMS"),
            signature: dir.join("SHA256SUMS.sig"),
            extract_dir: dir.join("extract"),
            dir,
        }
    }

    /// The downloaded tarball, by its release file name.
    pub fn tarball(&self, file_name: &str) -> PathBuf {
        self.dir.join(file_name)
    }

    /// The extracted binary.
    pub fn binary(&self) -> PathBuf {
        self.extract_dir.join(BINARY_NAME)
    }
}

/// Makes a new, empty directory with `mode`, refusing to reuse anything already at `p` (it must
/// have been removed first) and checking the result is a real directory owned by us.
fn make_private_dir(p: &Path, mode: u32) -> Result<()> {
    let what = || format!("creating the staging dir {}", p.display());
    std::fs::DirBuilder::new()
        .mode(mode)
        .create(p)
        .map_err(|e| Error::new(what(), e))?;
    let m = std::fs::symlink_metadata(p).map_err(|e| Error::new(what(), e))?;
    let euid = rustix::process::geteuid().as_raw();
    if !m.is_dir() || m.uid() != euid {
        return Err(Error::new(what(), "it is not a directory owned by us")
            .hint("something raced banger for the staging dir; check who writes there"));
    }
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
        .map_err(|e| Error::new(what(), e))
}

fn remove_tree(p: &Path) -> Result<()> {
    match std::fs::remove_dir_all(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        // A file or symlink where the dir should be.
        Err(_) if std::fs::symlink_metadata(p).is_ok_and(|m| !m.is_dir()) => {
            std::fs::remove_file(p).map_err(|e| Error::new(format!("removing {}", p.display()), e))
        }
        Err(e) => Err(Error::new(format!("removing {}", p.display()), e)),
    }
}

/// Recreates the staging dir empty and 0700. Refuses while it holds an unfinished update journal.
pub fn prepare(layout: &Layout) -> Result<StagingPaths> {
    if journal::pending(layout)? {
        return Err(Error::new(
            "preparing the update staging dir",
            format!(
                "{} records an interrupted update",
                journal::path(layout).display()
            ),
        )
        .hint("run sudo banger update to finish or roll it back first"));
    }
    let paths = StagingPaths::new(layout);
    if let Some(parent) = paths.dir.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| Error::new(format!("creating {}", parent.display()), e))?;
        if rustix::process::geteuid().is_root() {
            parent_is_roots(parent)?;
        }
    }
    remove_tree(&paths.dir)?;
    make_private_dir(&paths.dir, 0o700)?;
    Ok(paths)
}

/// Root runs what it stages: refuse a staging parent that anyone but root could rename or fill.
fn parent_is_roots(parent: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::symlink_metadata(parent)
        .map_err(|e| Error::new(format!("checking {}", parent.display()), e))?;
    if !m.is_dir() || m.uid() != 0 || m.mode() & 0o022 != 0 {
        return Err(Error::new(
            format!("checking the update staging parent {}", parent.display()),
            format!(
                "it must be a directory owned by root and writable only by root (it is uid {}, mode {:o}{})",
                m.uid(),
                m.mode() & 0o7777,
                if m.is_dir() { "" } else { ", not a directory" }
            ),
        )
        .hint("re-run `sudo banger system install --owner USER`, which fixes its ownership"));
    }
    Ok(())
}

/// Removes the staging dir and everything in it (journal included): the end of every update.
pub fn wipe(layout: &Layout) -> Result<()> {
    remove_tree(&layout.updates_dir())
}

/// Checks a tarball's streamed hash against its signed SHA256SUMS entry.
pub fn verify_hash(file_name: &str, actual_sha256: &str, sums: &Sha256Sums) -> Result<()> {
    let want = sums.expect(file_name)?;
    if !actual_sha256.eq_ignore_ascii_case(want) {
        return Err(Error::new(
            format!("verifying {file_name}"),
            format!("its sha256 {actual_sha256} does not match SHA256SUMS ({want})"),
        )
        .hint("the download is corrupted or tampered with; nothing was installed"));
    }
    Ok(())
}

/// What an archive must contain.
#[derive(Debug, Clone, Copy)]
pub struct ExtractSpec<'a> {
    /// Exactly these file names, at the archive's top level.
    pub files: &'a [&'a str],
    /// Largest accepted file, uncompressed.
    pub max_file_bytes: u64,
}

impl Default for ExtractSpec<'static> {
    fn default() -> Self {
        ExtractSpec {
            files: &[BINARY_NAME],
            max_file_bytes: MAX_FILE_BYTES,
        }
    }
}

fn entry_kind(t: tar::EntryType) -> &'static str {
    use tar::EntryType::*;
    match t {
        Symlink => "a symlink",
        Link => "a hard link",
        Char => "a character device",
        Block => "a block device",
        Fifo => "a FIFO",
        Directory => "a directory",
        _ => "an unsupported entry type",
    }
}

/// The top-level name an entry path stands for, or why it is refused.
fn entry_name(raw: &[u8]) -> std::result::Result<String, String> {
    let text = std::str::from_utf8(raw).map_err(|_| "its path is not UTF-8".to_string())?;
    let mut normal = Vec::new();
    for c in Path::new(text).components() {
        match c {
            Component::RootDir | Component::Prefix(_) => {
                return Err(format!("{text:?} is an absolute path"))
            }
            Component::ParentDir => return Err(format!("{text:?} contains `..`")),
            Component::CurDir => {}
            Component::Normal(n) => normal.push(n.to_string_lossy().into_owned()),
        }
    }
    match normal.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(format!("{text:?} names no file")),
        _ => Err(format!("{text:?} is not a top-level file")),
    }
}

/// Extracts `tarball` (gzip'd tar) into `dest` (created fresh, 0700) strictly per `spec`; the
/// files end up mode 0755. On any refusal `dest` is removed. Returns the extracted paths in
/// `spec.files` order.
pub fn extract(tarball: &Path, dest: &Path, spec: &ExtractSpec) -> Result<Vec<PathBuf>> {
    remove_tree(dest)?;
    make_private_dir(dest, 0o700)?;
    let r = extract_into(tarball, dest, spec);
    if r.is_err() {
        let _ = remove_tree(dest);
    }
    r
}

fn extract_into(tarball: &Path, dest: &Path, spec: &ExtractSpec) -> Result<Vec<PathBuf>> {
    let what = format!("extracting {}", tarball.display());
    let refuse = |why: String| {
        Error::new(&what, why)
            .hint("the release tarball is not what banger expects; nothing was installed")
    };
    let f = File::open(tarball).map_err(|e| Error::new(&what, e))?;
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(BufReader::new(f)));
    let entries = archive.entries().map_err(|e| Error::new(&what, e))?;
    let mut seen: Vec<String> = Vec::new();
    for entry in entries {
        let mut entry = entry.map_err(|e| refuse(format!("unreadable archive ({e})")))?;
        let raw = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw).into_owned();
        let name = entry_name(&raw).map_err(|why| refuse(format!("entry {why}")))?;
        let kind = entry.header().entry_type();
        if kind != tar::EntryType::Regular {
            return Err(refuse(format!("entry {shown:?} is {}", entry_kind(kind))));
        }
        if !spec.files.contains(&name.as_str()) {
            return Err(refuse(format!(
                "unexpected file {shown:?} (a release holds exactly: {})",
                spec.files.join(", ")
            )));
        }
        if seen.contains(&name) {
            return Err(refuse(format!("{name} appears twice")));
        }
        let claimed = entry
            .header()
            .size()
            .map_err(|e| refuse(format!("entry {shown:?}: {e}")))?;
        if claimed > spec.max_file_bytes {
            return Err(refuse(format!(
                "{name} is {claimed} bytes, over the {}-byte limit",
                spec.max_file_bytes
            )));
        }
        let out_path = dest.join(&name);
        let mut out = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o700)
            .open(&out_path)
            .map_err(|e| Error::new(format!("creating {}", out_path.display()), e))?;
        let mut limited = (&mut entry).take(spec.max_file_bytes + 1);
        let n = std::io::copy(&mut limited, &mut out)
            .map_err(|e| refuse(format!("reading {name}: {e}")))?;
        if n > spec.max_file_bytes {
            return Err(refuse(format!(
                "{name} is over the {}-byte limit",
                spec.max_file_bytes
            )));
        }
        out.flush()
            .and_then(|()| out.set_permissions(std::fs::Permissions::from_mode(0o755)))
            .and_then(|()| out.sync_all())
            .map_err(|e| Error::new(format!("writing {}", out_path.display()), e))?;
        seen.push(name);
    }
    let missing: Vec<&str> = spec
        .files
        .iter()
        .copied()
        .filter(|f| !seen.iter().any(|s| s == f))
        .collect();
    if !missing.is_empty() {
        return Err(refuse(format!("missing {}", missing.join(", "))));
    }
    super::fsync_dir(dest)?;
    Ok(spec.files.iter().map(|f| dest.join(f)).collect())
}

/// Verifies the downloaded tarball's hash against SHA256SUMS, then extracts it into the staging
/// dir. Returns the staged binary's path. A hash mismatch removes the tarball.
pub fn stage(
    paths: &StagingPaths,
    tarball: &Downloaded,
    file_name: &str,
    sums: &Sha256Sums,
) -> Result<PathBuf> {
    if let Err(e) = verify_hash(file_name, &tarball.sha256, sums) {
        let _ = std::fs::remove_file(&tarball.path);
        return Err(e);
    }
    extract(&tarball.path, &paths.extract_dir, &ExtractSpec::default())?;
    Ok(paths.binary())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::update::testutil::TempDir;
    use tar::{EntryType, Header};

    /// One raw tar entry: name bytes written straight into the header (so `..` and absolute
    /// paths get through, as an attacker's tool would write them).
    struct E<'a> {
        name: &'a [u8],
        kind: EntryType,
        data: &'a [u8],
        link: &'a [u8],
    }

    fn file<'a>(name: &'a str, data: &'a [u8]) -> E<'a> {
        E {
            name: name.as_bytes(),
            kind: EntryType::Regular,
            data,
            link: b"",
        }
    }

    fn tarball(dir: &Path, entries: &[E]) -> PathBuf {
        let p = dir.join("t.tar.gz");
        let gz =
            flate2::write::GzEncoder::new(File::create(&p).unwrap(), flate2::Compression::fast());
        let mut b = tar::Builder::new(gz);
        for e in entries {
            let mut h = Header::new_gnu();
            h.as_old_mut().name[..e.name.len()].copy_from_slice(e.name);
            h.as_old_mut().linkname[..e.link.len()].copy_from_slice(e.link);
            h.set_entry_type(e.kind);
            h.set_mode(0o755);
            h.set_size(e.data.len() as u64);
            h.set_cksum();
            b.append(&h, e.data).unwrap();
        }
        b.into_inner().unwrap().finish().unwrap();
        p
    }

    fn listing(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .map(|rd| {
                rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    #[test]
    fn extracts_exactly_the_binary() {
        let dir = TempDir::new("stage-ok");
        let t = tarball(dir.path(), &[file("./banger", b"#!/bin/sh\n")]);
        let dest = dir.path().join("x");
        let got = extract(&t, &dest, &ExtractSpec::default()).unwrap();
        assert_eq!(got, [dest.join("banger")]);
        assert_eq!(std::fs::read(&got[0]).unwrap(), b"#!/bin/sh\n");
        let m = std::fs::metadata(&got[0]).unwrap();
        assert_eq!(m.permissions().mode() & 0o7777, 0o755);
        assert_eq!(
            std::fs::metadata(&dest).unwrap().permissions().mode() & 0o777,
            0o700
        );
    }

    #[test]
    fn malicious_tarballs_refused_and_nothing_left() {
        let dir = TempDir::new("stage-bad");
        let big = vec![0u8; 2048];
        let spec = ExtractSpec {
            files: &["banger"],
            max_file_bytes: 1024,
        };
        let cases: Vec<(Vec<E>, &str)> = vec![
            (vec![file("../evil", b"x")], "contains `..`"),
            (vec![file("x/../../evil", b"x")], "contains `..`"),
            (vec![file("/tmp/evil", b"x")], "absolute path"),
            (vec![file("sub/banger", b"x")], "not a top-level file"),
            (
                vec![E {
                    name: b"banger",
                    kind: EntryType::Symlink,
                    data: b"",
                    link: b"/etc/passwd",
                }],
                "is a symlink",
            ),
            (
                vec![E {
                    name: b"banger",
                    kind: EntryType::Link,
                    data: b"",
                    link: b"/etc/passwd",
                }],
                "is a hard link",
            ),
            (
                vec![E {
                    name: b"banger",
                    kind: EntryType::Char,
                    data: b"",
                    link: b"",
                }],
                "character device",
            ),
            (
                vec![E {
                    name: b"banger",
                    kind: EntryType::Block,
                    data: b"",
                    link: b"",
                }],
                "block device",
            ),
            (
                vec![E {
                    name: b"banger",
                    kind: EntryType::Fifo,
                    data: b"",
                    link: b"",
                }],
                "FIFO",
            ),
            (
                vec![E {
                    name: b"banger/",
                    kind: EntryType::Directory,
                    data: b"",
                    link: b"",
                }],
                "directory",
            ),
            (
                vec![file("banger", b"x"), file("extra", b"y")],
                "unexpected file \"extra\"",
            ),
            (
                vec![file("README", b"y"), file("banger", b"x")],
                "unexpected file",
            ),
            (
                vec![file("banger", b"x"), file("./banger", b"y")],
                "appears twice",
            ),
            (vec![], "missing banger"),
            (vec![file("banger", &big)], "over the 1024-byte limit"),
            (
                vec![E {
                    name: b"\xffbanger",
                    kind: EntryType::Regular,
                    data: b"",
                    link: b"",
                }],
                "not UTF-8",
            ),
        ];
        for (entries, want) in cases {
            let t = tarball(dir.path(), &entries);
            let dest = dir.path().join("x");
            let e = extract(&t, &dest, &spec).unwrap_err().to_string();
            assert!(e.contains(want), "want {want:?} in {e}");
            assert!(e.contains("nothing was installed"), "{e}");
            assert!(!dest.exists(), "{want}: extraction dir left behind");
            assert_eq!(
                listing(dir.path()),
                ["t.tar.gz"],
                "{want}: something escaped"
            );
            assert!(!Path::new("/tmp/evil").exists());
        }
        // Not gzip at all.
        let p = dir.path().join("t.tar.gz");
        std::fs::write(&p, b"definitely not a tarball").unwrap();
        let e = extract(&p, &dir.path().join("x"), &spec)
            .unwrap_err()
            .to_string();
        assert!(e.contains("extracting"), "{e}");
        assert!(!dir.path().join("x").exists());
    }

    #[test]
    fn prepare_refuses_a_staging_parent_the_owner_controls() {
        if !rustix::process::geteuid().is_root() {
            println!("SKIP: needs root to hand the cache dir to another user");
            return;
        }
        let dir = TempDir::new("stage-owner");
        let layout = Layout::under(dir.path());
        std::fs::create_dir_all(layout.updates_dir()).unwrap();
        std::fs::write(layout.updates_dir().join("planted"), b"x").unwrap();
        std::os::unix::fs::chown(layout.cache_dir(), Some(65534), Some(65534)).unwrap();
        let e = prepare(&layout).unwrap_err().to_string();
        assert!(e.contains("owned by root"), "{e}");
        assert!(e.contains("system install"), "{e}");
        // Refused before anything below it was touched.
        assert!(layout.updates_dir().join("planted").exists());
        std::os::unix::fs::chown(layout.cache_dir(), Some(0), Some(0)).unwrap();
        std::fs::set_permissions(layout.cache_dir(), std::fs::Permissions::from_mode(0o777))
            .unwrap();
        assert!(
            prepare(&layout).is_err(),
            "a world-writable parent must be refused too"
        );
        std::fs::set_permissions(layout.cache_dir(), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        assert!(prepare(&layout).is_ok());
    }

    #[test]
    fn prepare_stage_and_wipe() {
        let dir = TempDir::new("stage-flow");
        let layout = Layout::under(dir.path());
        std::fs::create_dir_all(layout.updates_dir()).unwrap();
        std::fs::write(layout.updates_dir().join("stale"), b"x").unwrap();
        let paths = prepare(&layout).unwrap();
        assert_eq!(listing(&paths.dir), Vec::<String>::new());
        assert_eq!(
            std::fs::metadata(&paths.dir).unwrap().permissions().mode() & 0o777,
            0o700
        );

        let name = "banger-v0.2.0-linux-amd64.tar.gz";
        let built = tarball(dir.path(), &[file("banger", b"new binary")]);
        std::fs::rename(&built, paths.tarball(name)).unwrap();
        let sha = crate::update::sha256_file(&paths.tarball(name)).unwrap();
        let dl = Downloaded {
            path: paths.tarball(name),
            bytes: 0,
            sha256: sha.clone(),
        };
        let sums = Sha256Sums::parse(format!("{sha}  {name}\n").as_bytes()).unwrap();
        let bin = stage(&paths, &dl, name, &sums).unwrap();
        assert_eq!(std::fs::read(bin).unwrap(), b"new binary");

        // Hash mismatch: refused before extraction, tarball removed.
        let bad = Sha256Sums::parse(format!("{}  {name}\n", "0".repeat(64)).as_bytes()).unwrap();
        std::fs::remove_dir_all(&paths.extract_dir).unwrap();
        let e = stage(&paths, &dl, name, &bad).unwrap_err().to_string();
        assert!(e.contains("does not match SHA256SUMS"), "{e}");
        assert!(!paths.extract_dir.exists());
        assert!(!paths.tarball(name).exists());
        // Not listed at all.
        let other = Sha256Sums::parse(format!("{sha}  other.tar.gz\n").as_bytes()).unwrap();
        assert!(verify_hash(name, &sha, &other)
            .unwrap_err()
            .to_string()
            .contains("not listed"));

        // An interrupted update blocks a fresh staging dir.
        std::fs::write(journal::path(&layout), "{\"step\":\"update.begin\",\"at\":\"x\",\"info\":{\"from\":\"1\",\"to\":\"2\",\"old_sha256\":\"a\",\"new_sha256\":\"b\"}}\n").unwrap();
        let e = prepare(&layout).unwrap_err().to_string();
        assert!(e.contains("interrupted update"), "{e}");
        wipe(&layout).unwrap();
        wipe(&layout).unwrap();
        assert!(!layout.updates_dir().exists());

        // A symlink planted where the staging dir goes is removed, not followed.
        let elsewhere = dir.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).unwrap();
        std::fs::write(elsewhere.join("keep"), b"k").unwrap();
        std::os::unix::fs::symlink(&elsewhere, layout.updates_dir()).unwrap();
        prepare(&layout).unwrap();
        assert!(std::fs::symlink_metadata(layout.updates_dir())
            .unwrap()
            .is_dir());
        assert_eq!(listing(&elsewhere), ["keep"]);
    }
}
