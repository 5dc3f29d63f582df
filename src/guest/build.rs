//! The `image build` flow, in order: the cached debootstrap tree (made if missing), a private
//! hard-linked copy of it, the customisation, the size check, `mkfs.ext4 -d`. Everything happens in one
//! scratch directory per build, removed when the build is dropped (success or failure) — or, if
//! the process died, by the next build.
//!
//! It neither checks permissions nor names (the CLI did, before calling) nor talks to the daemon.

use super::customize::{self, Inputs};
use super::debootstrap::{self, Cache, Recipe};
use super::ext4::{self, Usage};
use super::progress::Progress;
use crate::error::{Context, Error, Result};
use crate::layout::Layout;
use std::fs;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// What to build.
#[derive(Debug, Clone)]
pub struct Request {
    /// The image name (already validated).
    pub name: String,
    /// Suite, mirror and packages.
    pub recipe: Recipe,
    /// Image size in bytes.
    pub size: u64,
}

/// A finished image, in its scratch directory until dropped.
#[derive(Debug)]
pub struct Built {
    /// The ext4 image.
    pub image: PathBuf,
    /// What the customised tree held.
    pub usage: Usage,
    /// True when debootstrap was skipped (cached tree).
    pub debootstrap_cached: bool,
    /// The cached tree it was made from.
    pub cached_tree: PathBuf,
    scratch: Scratch,
}

impl Built {
    /// The scratch directory holding the image (removed on drop).
    pub fn dir(&self) -> &Path {
        &self.scratch.0
    }
}

/// A directory removed (with everything in it) when dropped.
#[derive(Debug)]
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = debootstrap::remove_tree(&self.0);
    }
}

/// Builds the image described by `req`.
pub fn build(layout: &Layout, req: &Request, inputs: &Inputs<'_>, p: &Progress) -> Result<Built> {
    for tool in ["mkfs.ext4", "cp"] {
        if !super::have(tool) {
            return Err(
                Error::new("building an image", format!("`{tool}` is not installed"))
                    .hint("install e2fsprogs and coreutils"),
            );
        }
    }
    let scratch = new_scratch(&layout.image_build_dir(), &req.name)?;

    let cache = Cache::new(layout.debootstrap_cache_dir());
    let r = &req.recipe;
    if cache.entry(r).join("ready").is_file() {
        p.stage(&format!(
            "debootstrap {}: cached ({})",
            r.suite,
            cache.entry(r).display()
        ));
    } else {
        if !super::have("debootstrap") {
            return Err(
                Error::new("building an image", "`debootstrap` is not installed")
                    .hint("install it: apt-get install debootstrap"),
            );
        }
        p.stage(&format!(
            "debootstrap {} from {} ({} packages; log {})",
            r.suite,
            r.mirror,
            r.packages.len(),
            cache.log(r).display()
        ));
    }
    let tree = cache.ensure(r)?;

    // A hard-linked copy: new directories, shared file inodes. Customisation only ever replaces
    // or unlinks directory entries (never writes a file in place), so the cached tree stays as it
    // was, and the copy costs no data I/O (a full copy took 3-40 s on a busy host).
    p.stage("linking a private copy of the tree");
    let work = scratch.0.join("tree");
    let out = Command::new("cp")
        .args(["-a", "--link"])
        .arg(&tree.root)
        .arg(&work)
        .stdin(Stdio::null())
        .output()
        .ctx(|| format!("copying {} to {}", tree.root.display(), work.display()))?;
    if !out.status.success() {
        let why = String::from_utf8_lossy(&out.stderr);
        let why = why.lines().last().unwrap_or("cp failed");
        let e = Error::new(
            format!("copying {} to {}", tree.root.display(), work.display()),
            why.to_string(),
        );
        return Err(if why.contains("No space left") {
            e.hint("disk full: free some space and run the build again")
        } else {
            e
        });
    }

    p.stage("adding the agent, its unit, the sshd drop-in, the serial getty");
    let agent = agent_binary(&scratch.0, inputs.agent)?;
    customize::customize(
        &work,
        &Inputs {
            agent: &agent,
            ..inputs.clone()
        },
    )?;

    let usage = ext4::measure(&work)?;
    ext4::check_fits(&usage, req.size)?;
    let image = scratch.0.join("rootfs.ext4");
    p.stage(&format!(
        "mkfs.ext4 {} ({} of files)",
        ext4::human(req.size),
        ext4::human(usage.bytes)
    ));
    ext4::make(&work, &image, req.size, &usage)?;
    debootstrap::remove_tree(&work)?;
    Ok(Built {
        image,
        usage,
        debootstrap_cached: tree.cached,
        cached_tree: tree.root,
        scratch,
    })
}

/// The agent to install: `src` without its debug sections when `strip` is available (a debug
/// build carries tens of MiB of them), else `src` itself.
fn agent_binary(scratch: &Path, src: &Path) -> Result<PathBuf> {
    // `/proc/self/exe` must be resolved here: in the `strip` child it would name `strip`.
    let Ok(src) = fs::canonicalize(src) else {
        return Ok(src.to_path_buf());
    };
    if !super::have("strip") || !src.is_file() {
        return Ok(src);
    }
    let dst = scratch.join("banger-vsock-agent");
    let ok = Command::new("strip")
        .arg("--strip-debug")
        .arg("-o")
        .arg(&dst)
        .arg(&src)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    Ok(if ok { dst } else { src })
}

/// Creates `<base>/<name>.<pid>` (0711: the owner's daemon must reach the image inside, and
/// nothing else in it is readable). Removes scratch dirs of builds whose process is gone.
fn new_scratch(base: &Path, name: &str) -> Result<Scratch> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o711)
        .create(base)
        .ctx(|| format!("creating {}", base.display()))?;
    fs::set_permissions(base, fs::Permissions::from_mode(0o711))
        .ctx(|| format!("setting permissions of {}", base.display()))?;
    remove_stale(base);
    let dir = base.join(format!("{name}.{}", std::process::id()));
    debootstrap::remove_tree(&dir)?;
    fs::DirBuilder::new()
        .mode(0o711)
        .create(&dir)
        .ctx(|| format!("creating {}", dir.display()))?;
    Ok(Scratch(dir))
}

/// `<name>.<pid>` entries whose pid no longer runs.
fn remove_stale(base: &Path) {
    let Ok(rd) = fs::read_dir(base) else { return };
    for e in rd.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = n.rsplit_once('.').and_then(|(_, p)| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = debootstrap::remove_tree(&e.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agent_is_this_binary_without_debug_sections() {
        let base = std::env::temp_dir().join(format!("banger-agentbin-{}", std::process::id()));
        let _ = fs::remove_dir_all(&base);
        fs::create_dir_all(&base).unwrap();
        let me = std::env::current_exe().unwrap();
        let got = agent_binary(&base, Path::new("/proc/self/exe")).unwrap();
        let (got_len, me_len) = (
            fs::metadata(&got).unwrap().len(),
            fs::metadata(&me).unwrap().len(),
        );
        if got == me {
            eprintln!("SKIP: the_agent_is_this_binary_without_debug_sections: strip unavailable");
        } else {
            // Stripped of debug info but still this program: its own strings are in it.
            assert!(
                got_len <= me_len && got_len > me_len / 50,
                "{got_len} vs {me_len}"
            );
            let bytes = fs::read(&got).unwrap();
            let needle = b"the_agent_is_this_binary_without_debug_sections";
            assert!(bytes.windows(needle.len()).any(|w| w == needle));
        }
        fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn scratch_is_removed_on_drop_and_stale_ones_are_swept() {
        let base = std::env::temp_dir().join(format!("banger-scratch-{}", std::process::id()));
        let _ = fs::remove_dir_all(&base);
        // A leftover of a dead build (pid 0 never names a user process) and a foreign file.
        fs::create_dir_all(base.join("old.999999999/tree")).unwrap();
        fs::write(base.join("README"), "keep").unwrap();
        let s = new_scratch(&base, "dev").unwrap();
        assert!(!base.join("old.999999999").exists(), "stale scratch swept");
        assert!(base.join("README").exists());
        assert_eq!(
            fs::metadata(&s.0).unwrap().permissions().mode() & 0o777,
            0o711
        );
        fs::write(s.0.join("rootfs.ext4"), "x").unwrap();
        let dir = s.0.clone();
        drop(s);
        assert!(!dir.exists());
        fs::remove_dir_all(&base).unwrap();
    }
}
