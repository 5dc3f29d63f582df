//! The debootstrap cache: one minimal Debian tree per (suite, mirror, package set), made once by
//! `debootstrap --variant=minbase` and afterwards only read (image builds customise a copy).
//!
//! A tree is published by a rename only once complete, so a reader never sees a partial one; a
//! failed or interrupted build leaves only its log. It never modifies a published tree.

use crate::error::{Context, Error, Result};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// What every banger image holds: an init that the agent's unit and the serial getty plug into,
/// udev (without it device units such as ttyS0 never appear), sshd and `ip`.
pub const BASE_PACKAGES: [&str; 6] = [
    "systemd",
    "systemd-sysv",
    "udev",
    "dbus",
    "openssh-server",
    "iproute2",
];

/// Bumped whenever what a cached tree holds changes for the same inputs (the steps after
/// debootstrap below), so old trees are not reused.
const RECIPE_VERSION: &str = "banger-debootstrap-1";

/// debootstrap downloads and unpacks a few hundred packages; a stuck mirror must not hang a
/// build forever.
const DEBOOTSTRAP_TIMEOUT: Duration = Duration::from_secs(45 * 60);

/// Everything that decides a cached tree's content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recipe {
    /// Debian suite, e.g. `bookworm`.
    pub suite: String,
    /// Mirror URL, without a trailing slash.
    pub mirror: String,
    /// [`BASE_PACKAGES`] plus the user's, sorted and without duplicates.
    pub packages: Vec<String>,
}

impl Recipe {
    /// Validates the inputs and builds the recipe: a bad suite, mirror or package name is refused
    /// here, before anything is downloaded.
    pub fn new(suite: &str, mirror: &str, extra: &[String]) -> Result<Recipe> {
        check_suite(suite).map_err(|why| Error::usage(format!("--suite {suite}"), why))?;
        check_mirror(mirror).map_err(|why| Error::usage(format!("--mirror {mirror}"), why))?;
        let mut packages: Vec<String> = BASE_PACKAGES.iter().map(|p| p.to_string()).collect();
        for p in extra {
            check_package(p).map_err(|why| Error::usage(format!("--package {p}"), why))?;
            packages.push(p.clone());
        }
        packages.sort();
        packages.dedup();
        Ok(Recipe {
            suite: suite.to_string(),
            mirror: mirror.trim_end_matches('/').to_string(),
            packages,
        })
    }

    /// The cache key: 16 hex digits of the SHA-256 of everything that decides the tree.
    pub fn key(&self) -> String {
        let text = format!(
            "{RECIPE_VERSION}\nsuite={}\nmirror={}\npackages={}\n",
            self.suite,
            self.mirror,
            self.packages.join(",")
        );
        let d = ring::digest::digest(&ring::digest::SHA256, text.as_bytes());
        hex::encode(&d.as_ref()[..8])
    }
}

/// Debian suite names: lower-case letters, digits and '-' (bookworm, trixie, stable, sid…).
pub fn check_suite(s: &str) -> std::result::Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 32
        && s.starts_with(|c: char| c.is_ascii_lowercase())
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    ok.then_some(())
        .ok_or_else(|| "a suite is a Debian release name such as bookworm".into())
}

/// A mirror is an http(s) or file URL without spaces or commas.
pub fn check_mirror(m: &str) -> std::result::Result<(), String> {
    let scheme = m.starts_with("http://") || m.starts_with("https://") || m.starts_with("file:/");
    let clean = !m
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || c == ',');
    (scheme && clean && m.len() <= 512)
        .then_some(())
        .ok_or_else(|| "give an http://, https:// or file:/ URL of a Debian mirror".into())
}

/// Debian package names (Policy 5.6.1): lower-case alphanumerics and `+ - .`, at least two
/// characters, starting with an alphanumeric.
pub fn check_package(p: &str) -> std::result::Result<(), String> {
    let ok = p.len() >= 2
        && p.len() <= 128
        && p.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && p.chars().all(|c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || c == '+' || c == '-' || c == '.'
        });
    ok.then_some(()).ok_or_else(|| {
        "a Debian package name is lower-case letters, digits and + - . (e.g. git, build-essential)"
            .into()
    })
}

/// The cache directory (root's, e.g. `/var/cache/banger/debootstrap`).
#[derive(Debug, Clone)]
pub struct Cache {
    dir: PathBuf,
}

/// A published tree.
#[derive(Debug, Clone)]
pub struct Tree {
    /// The root of the tree (read it, never change it).
    pub root: PathBuf,
    /// True if it was already in the cache.
    pub cached: bool,
}

impl Cache {
    /// The cache in `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Cache {
        Cache { dir: dir.into() }
    }

    /// Where the tree for `r` lives once published.
    pub fn entry(&self, r: &Recipe) -> PathBuf {
        self.dir.join(r.key())
    }

    /// debootstrap's log for `r` (kept after a failure: its path is in the error).
    pub fn log(&self, r: &Recipe) -> PathBuf {
        self.dir.join(format!("{}.log", r.key()))
    }

    /// The published tree for `r`, debootstrapping it first if it is not in the cache. Concurrent
    /// callers for the same recipe wait for one build (a lock file beside the entry).
    pub fn ensure(&self, r: &Recipe) -> Result<Tree> {
        fs::create_dir_all(&self.dir).ctx(|| format!("creating {}", self.dir.display()))?;
        let entry = self.entry(r);
        let lock_path = self.dir.join(format!("{}.lock", r.key()));
        let lock =
            fs::File::create(&lock_path).ctx(|| format!("creating {}", lock_path.display()))?;
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)
            .ctx(|| format!("locking {}", lock_path.display()))?;
        let root = entry.join("tree");
        if entry.join("ready").is_file() {
            return Ok(Tree { root, cached: true });
        }
        let tmp = self.dir.join(format!("{}.tmp", r.key()));
        remove_tree(&tmp)?;
        let result = self.build(r, &tmp);
        if let Err(e) = result {
            remove_tree(&tmp)?;
            return Err(e);
        }
        remove_tree(&entry)?;
        fs::rename(&tmp, &entry)
            .ctx(|| format!("publishing {} as {}", tmp.display(), entry.display()))?;
        let log = self.log(r);
        let _ = fs::rename(&log, entry.join("debootstrap.log"));
        Ok(Tree {
            root,
            cached: false,
        })
    }

    fn build(&self, r: &Recipe, tmp: &Path) -> Result<()> {
        let tree = tmp.join("tree");
        fs::create_dir_all(&tree).ctx(|| format!("creating {}", tree.display()))?;
        let log_path = self.log(r);
        let log = fs::File::create(&log_path).ctx(|| format!("creating {}", log_path.display()))?;
        let log_err = log
            .try_clone()
            .ctx(|| format!("opening {}", log_path.display()))?;
        let what = || format!("debootstrap {} from {}", r.suite, r.mirror);
        let mut child = Command::new("debootstrap")
            .arg("--variant=minbase")
            .arg(format!("--include={}", r.packages.join(",")))
            .arg(&r.suite)
            .arg(&tree)
            .arg(&r.mirror)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(|e| {
                Error::new(what(), format!("cannot run debootstrap: {e}"))
                    .hint("install it: apt-get install debootstrap")
            })?;
        let started = Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait().ctx(what)? {
                break s;
            }
            if started.elapsed() > DEBOOTSTRAP_TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                unmount_below(&tree);
                return Err(Error::new(
                    what(),
                    format!(
                        "still running after {} min",
                        DEBOOTSTRAP_TIMEOUT.as_secs() / 60
                    ),
                )
                .hint(format!(
                    "see its log {}; is the mirror reachable?",
                    log_path.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        // debootstrap mounts /proc and /sys in the target; a failure may leave them behind.
        unmount_below(&tree);
        if !status.success() {
            return Err(Error::new(what(), format!("debootstrap failed ({status})"))
                .hint(format!("see its log {}", log_path.display())));
        }
        // The cache keeps no package downloads or indexes: a guest runs `apt-get update` anyway.
        for dir in ["var/cache/apt/archives", "var/lib/apt/lists"] {
            clear_files(&tree.join(dir))?;
        }
        let recipe = format!(
            "suite={}\nmirror={}\npackages={}\n",
            r.suite,
            r.mirror,
            r.packages.join(",")
        );
        fs::write(tmp.join("recipe"), recipe)
            .ctx(|| format!("writing {}/recipe", tmp.display()))?;
        fs::write(tmp.join("ready"), b"").ctx(|| format!("writing {}/ready", tmp.display()))?;
        Ok(())
    }
}

/// Removes the regular files directly in `dir` (keeps subdirectories such as `partial/`).
fn clear_files(dir: &Path) -> Result<()> {
    let Ok(rd) = fs::read_dir(dir) else {
        return Ok(());
    };
    for e in rd.flatten() {
        if e.file_type().is_ok_and(|t| t.is_file()) {
            fs::remove_file(e.path()).ctx(|| format!("removing {}", e.path().display()))?;
        }
    }
    Ok(())
}

/// Lazily unmounts whatever is mounted at or below `dir` (deepest first), so removing a tree
/// never descends into a live /proc or /sys.
pub fn unmount_below(dir: &Path) {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let mut points: Vec<PathBuf> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for p in points {
        let _ = Command::new("umount")
            .arg("--lazy")
            .arg(&p)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Removes a tree if it exists (after unmounting anything left mounted inside it).
pub fn remove_tree(dir: &Path) -> Result<()> {
    if fs::symlink_metadata(dir).is_err() {
        return Ok(());
    }
    unmount_below(dir);
    fs::remove_dir_all(dir).ctx(|| format!("removing {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pk(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn key_depends_on_suite_mirror_and_package_set_only() {
        let a = Recipe::new("bookworm", "http://m.example/debian", &pk(&["git", "curl"])).unwrap();
        let same = Recipe::new(
            "bookworm",
            "http://m.example/debian/",
            &pk(&["curl", "git", "git", "systemd"]),
        )
        .unwrap();
        assert_eq!(
            a.key(),
            same.key(),
            "order, duplicates, base packages, trailing /"
        );
        assert_eq!(a.key().len(), 16);
        assert!(a.key().chars().all(|c| c.is_ascii_hexdigit()));
        let others = [
            Recipe::new("trixie", "http://m.example/debian", &pk(&["git", "curl"])).unwrap(),
            Recipe::new("bookworm", "http://n.example/debian", &pk(&["git", "curl"])).unwrap(),
            Recipe::new("bookworm", "http://m.example/debian", &pk(&["git"])).unwrap(),
            Recipe::new("bookworm", "http://m.example/debian", &pk(&[])).unwrap(),
        ];
        for o in &others {
            assert_ne!(a.key(), o.key(), "{o:?}");
        }
    }

    #[test]
    fn recipe_always_holds_the_base_packages() {
        let r = Recipe::new("bookworm", "http://m.example/debian", &pk(&["vim"])).unwrap();
        for p in BASE_PACKAGES {
            assert!(r.packages.iter().any(|x| x == p), "{p}");
        }
        assert!(r.packages.iter().any(|x| x == "vim"));
        assert!(r.packages.windows(2).all(|w| w[0] < w[1]), "sorted, unique");
    }

    #[test]
    fn validators() {
        for ok in ["bookworm", "trixie", "stable", "bookworm-backports"] {
            assert!(check_suite(ok).is_ok(), "{ok}");
        }
        for bad in ["", "Bookworm", "book worm", "../x", "-x", "bookworm,x"] {
            assert!(check_suite(bad).is_err(), "{bad:?}");
        }
        for ok in [
            "http://deb.debian.org/debian",
            "https://m/debian",
            "file:///srv/mirror",
        ] {
            assert!(check_mirror(ok).is_ok(), "{ok}");
        }
        for bad in ["deb.debian.org", "ftp://x", "http://a b", "http://x,y", ""] {
            assert!(check_mirror(bad).is_err(), "{bad:?}");
        }
        for ok in ["git", "build-essential", "g++", "libc6.1", "0ad"] {
            assert!(check_package(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a", "Git", "git,curl", "-x", "git curl", "a/b", "x=1.0"] {
            assert!(check_package(bad).is_err(), "{bad:?}");
        }
        let e = Recipe::new("bookworm", "http://m/debian", &pk(&["git,curl"])).unwrap_err();
        assert_eq!(e.code, 2);
        assert!(e.to_string().contains("--package git,curl"), "{e}");
    }

    #[test]
    fn a_failed_debootstrap_leaves_only_its_log() {
        if !rustix::process::geteuid().is_root() || !crate::guest::have("debootstrap") {
            eprintln!("SKIP: a_failed_debootstrap_leaves_only_its_log: needs root and debootstrap");
            return;
        }
        let dir = std::env::temp_dir().join(format!("banger-dbs-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let cache = Cache::new(&dir);
        // A file: mirror that does not exist fails fast and talks to no host.
        let r = Recipe::new("bookworm", "file:///nonexistent/banger-mirror", &[]).unwrap();
        let e = cache.ensure(&r).unwrap_err();
        let log = cache.log(&r);
        assert!(e.to_string().contains(&log.display().to_string()), "{e}");
        assert!(log.is_file());
        let mut left: Vec<String> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        let key = r.key();
        assert_eq!(left, vec![format!("{key}.lock"), format!("{key}.log")]);
        fs::remove_dir_all(&dir).unwrap();
    }
}
