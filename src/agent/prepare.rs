//! What the agent does to its guest once at start, before it answers anyone: set the hostname,
//! install root's authorized key, make sure sshd has host keys.
//!
//! Every path is under an injectable root directory and the kernel hostname change is a seam
//! ([`HostnameSetter`]), so tests run all of it in a temp dir. Each step is independent: a failed
//! or refused step is reported and the others still run. It never deletes anything, never touches
//! a key it was not given, and writes files atomically (temp file, fsync, rename).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::agent::cmdline::GuestConfig;
use crate::error::{Context, Error, Result};

/// The one sshd host key type a guest gets: ed25519, the type banger pins. (`ssh-keygen -A` would
/// also make an RSA key, which takes seconds on KVM and tens of seconds under TCG at every first
/// boot; the drop-in tells sshd to use only this key.)
pub const HOST_KEY_TYPES: [&str; 1] = ["ed25519"];

/// Sets the kernel's hostname; a seam so tests never change the machine's name.
pub trait HostnameSetter {
    /// Sets the running kernel's hostname to `name`.
    fn set(&self, name: &str) -> std::io::Result<()>;
}

/// The real thing: `sethostname(2)`.
pub struct KernelHostname;

impl HostnameSetter for KernelHostname {
    fn set(&self, name: &str) -> std::io::Result<()> {
        rustix::system::sethostname(name.as_bytes()).map_err(std::io::Error::from)
    }
}

/// Where and as whom the preparation writes.
#[derive(Debug, Clone)]
pub struct Options {
    /// The guest's root directory (`/` in a guest).
    pub root: PathBuf,
    /// Owner (uid, gid) given to `/root/.ssh` and `authorized_keys`; `Some((0, 0))` in a guest.
    pub owner: Option<(u32, u32)>,
    /// The `ssh-keygen` to run.
    pub keygen: PathBuf,
}

impl Options {
    /// The guest's own root, owned by root, the system `ssh-keygen`.
    pub fn guest() -> Self {
        Options {
            root: PathBuf::from("/"),
            owner: Some((0, 0)),
            keygen: PathBuf::from("ssh-keygen"),
        }
    }

    /// `<root>/etc/ssh/ssh_host_<ty>_key`.
    pub fn host_key_path(&self, ty: &str) -> PathBuf {
        self.root.join(format!("etc/ssh/ssh_host_{ty}_key"))
    }
}

/// What the preparation did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// The hostname now set, when one was given and set.
    pub hostname: Option<String>,
    /// Whether root's authorized_keys was written.
    pub authorized_key: bool,
    /// The host key types ssh-keygen was run for (empty when all existed).
    pub generated: Vec<String>,
    /// What failed or was refused, one line each (the command line's refusals first).
    pub problems: Vec<String>,
}

/// Applies `cfg` to the guest under `opts.root`.
pub fn prepare(cfg: &GuestConfig, opts: &Options, host: &dyn HostnameSetter) -> Report {
    let mut r = Report {
        problems: cfg.problems.clone(),
        ..Report::default()
    };
    if let Some(name) = &cfg.name {
        match set_hostname(name, opts, host) {
            Ok(()) => r.hostname = Some(name.clone()),
            Err(e) => r.problems.push(e.to_string()),
        }
    }
    if let Some(line) = &cfg.authorized_key {
        match write_authorized_key(line, opts) {
            Ok(()) => r.authorized_key = true,
            Err(e) => r.problems.push(e.to_string()),
        }
    }
    match ensure_host_keys(opts) {
        Ok(made) => r.generated = made,
        Err(e) => r.problems.push(e.to_string()),
    }
    r
}

/// Writes `<root>/etc/hostname` and sets the kernel's hostname.
pub(crate) fn set_hostname(name: &str, opts: &Options, host: &dyn HostnameSetter) -> Result<()> {
    let etc = opts.root.join("etc");
    std::fs::create_dir_all(&etc).ctx(|| format!("creating {}", etc.display()))?;
    crate::vmm::identity::write_atomic(
        &etc.join("hostname"),
        format!("{name}\n").as_bytes(),
        0o644,
        None,
    )?;
    host.set(name)
        .map_err(|e| Error::new(format!("setting the hostname to {name:?}"), e))
}

/// Makes sure `<root>/root/.ssh/authorized_keys` (0600, in a 0700 `.ssh`) holds `line`: keys
/// already there are kept (a user may have added some, and the agent runs again at every boot and
/// restart), the owner's key is appended when its type and key are not among them.
pub(crate) fn write_authorized_key(line: &str, opts: &Options) -> Result<()> {
    let home = opts.root.join("root");
    let ssh = home.join(".ssh");
    for dir in [&home, &ssh] {
        ensure_private_dir(dir, opts.owner)?;
    }
    let path = ssh.join("authorized_keys");
    let existing = match std::fs::symlink_metadata(&path) {
        Ok(m) if m.file_type().is_file() => {
            std::fs::read_to_string(&path).ctx(|| format!("reading {}", path.display()))?
        }
        // A link or anything else is replaced, never followed.
        _ => String::new(),
    };
    let mut content = existing.clone();
    if !existing.lines().any(|l| key_of(l) == key_of(line)) {
        if !content.is_empty() && !content.ends_with('\n') {
            content.push('\n');
        }
        content.push_str(line);
        content.push('\n');
    }
    // Rewritten even when unchanged, so mode and owner are right whatever the image had.
    crate::vmm::identity::write_atomic(&path, content.as_bytes(), 0o600, opts.owner)
}

/// An authorized_keys line's type and key (options-less lines; the comment does not count).
fn key_of(line: &str) -> Vec<&str> {
    line.split_ascii_whitespace().take(2).collect()
}

/// Makes `dir` a real directory (not a link), mode 0700, owned by `owner` when given.
fn ensure_private_dir(dir: &Path, owner: Option<(u32, u32)>) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let what = || format!("preparing {}", dir.display());
    match std::fs::symlink_metadata(dir) {
        Ok(m) if m.file_type().is_dir() => {}
        Ok(_) => {
            return Err(Error::new(what(), "exists and is not a directory")
                .hint("remove it from the image"))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir(dir).ctx(what)?;
        }
        Err(e) => return Err(Error::new(what(), e)),
    }
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::lchown(dir, Some(uid), Some(gid)).ctx(what)?;
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).ctx(what)
}

/// Runs `ssh-keygen -t ed25519` for the host key when it is missing (under `<root>/etc/ssh`);
/// returns the types that were missing.
fn ensure_host_keys(opts: &Options) -> Result<Vec<String>> {
    let missing: Vec<String> = HOST_KEY_TYPES
        .iter()
        .filter(|t| !opts.host_key_path(t).exists())
        .map(|t| t.to_string())
        .collect();
    if missing.is_empty() {
        return Ok(missing);
    }
    let ed = opts.host_key_path("ed25519");
    // A leftover private half without its public one would make ssh-keygen ask to overwrite.
    let _ = std::fs::remove_file(&ed);
    keygen(
        opts,
        &ed,
        &format!("generating sshd host keys ({})", missing.join(", ")),
    )?;
    Ok(missing)
}

/// Replaces the ed25519 host key with a fresh one: made beside it under a temporary name, then
/// renamed over it, public half last (a reader sees the old pair or the new, and `hello` never
/// reports a public key whose private half is not in place). For a clone of a snapshot, which
/// wakes with the source VM's key: run only after the kernel's generator was reseeded, or every
/// clone would draw the same key. Returns the new public key line.
pub fn replace_host_key(opts: &Options) -> Result<String> {
    let ed = opts.host_key_path("ed25519");
    let tmp = ed.with_file_name(format!(".banger-new-host-key-{}", std::process::id()));
    let tmp_pub = tmp.with_extension("pub");
    let _ = std::fs::remove_file(&tmp);
    let _ = std::fs::remove_file(&tmp_pub);
    let r = (|| {
        keygen(opts, &tmp, "making a new sshd host key (ed25519)")?;
        let what = || format!("putting the new host key in place at {}", ed.display());
        std::fs::rename(&tmp, &ed).ctx(what)?;
        std::fs::rename(&tmp_pub, ed.with_extension("pub")).ctx(what)?;
        std::fs::read_to_string(ed.with_extension("pub")).ctx(what)
    })();
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
        let _ = std::fs::remove_file(&tmp_pub);
    }
    Ok(r?.trim_end().to_string())
}

/// `ssh-keygen -q -t ed25519 -N '' -C '' -f PATH` (the directory is made if missing); checks
/// that the public half exists after.
fn keygen(opts: &Options, path: &Path, doing: &str) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(dir).ctx(|| format!("creating {}", dir.display()))?;
    let what = || {
        format!(
            "{doing} with {} -t ed25519 in {}",
            opts.keygen.display(),
            dir.display()
        )
    };
    let out = Command::new(&opts.keygen)
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "", "-f"])
        .arg(path)
        .output()
        .map_err(|e| Error::new(what(), e).hint("is openssh-server installed in the image?"))?;
    if !out.status.success() {
        return Err(Error::new(
            what(),
            format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        ));
    }
    if !path.with_extension("pub").exists() {
        return Err(Error::new(
            what(),
            format!("it succeeded but left no {}.pub", path.display()),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    const LINE: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAILf5oszbHqEb+6X3j8hlzlMXxaLuKBJTgVM/l0kQlrAO owner@host";

    #[derive(Default)]
    struct Recorder(RefCell<Vec<String>>, bool);
    impl HostnameSetter for Recorder {
        fn set(&self, name: &str) -> std::io::Result<()> {
            if self.1 {
                return Err(std::io::Error::from_raw_os_error(libc::EPERM));
            }
            self.0.borrow_mut().push(name.to_string());
            Ok(())
        }
    }

    fn tmp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("banger-prep-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn opts(root: &Path) -> Options {
        Options {
            root: root.to_path_buf(),
            owner: None,
            keygen: PathBuf::from("ssh-keygen"),
        }
    }

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
    }

    fn have_keygen() -> bool {
        Command::new("ssh-keygen").arg("-?").output().is_ok()
    }

    #[test]
    fn full_preparation_in_a_temp_root() {
        if !have_keygen() {
            eprintln!("SKIP: full_preparation_in_a_temp_root: ssh-keygen not installed");
            return;
        }
        let root = tmp("full");
        let cfg = GuestConfig {
            name: Some("dev-1".into()),
            authorized_key: Some(LINE.into()),
            problems: vec![],
            agent_tcp: None,
        };
        let rec = Recorder::default();
        let mut o = opts(&root);
        // As root (the guest's case) ownership is set explicitly; otherwise our own ids.
        let me = (
            rustix::process::geteuid().as_raw(),
            rustix::process::getegid().as_raw(),
        );
        o.owner = Some(me);
        let r = prepare(&cfg, &o, &rec);
        assert_eq!(r.problems, Vec::<String>::new());
        assert_eq!(r.hostname.as_deref(), Some("dev-1"));
        assert!(r.authorized_key);
        assert_eq!(r.generated, vec!["ed25519"]);
        assert_eq!(*rec.0.borrow(), vec!["dev-1".to_string()]);
        assert_eq!(
            std::fs::read_to_string(root.join("etc/hostname")).unwrap(),
            "dev-1\n"
        );
        let ak = root.join("root/.ssh/authorized_keys");
        assert_eq!(std::fs::read_to_string(&ak).unwrap(), format!("{LINE}\n"));
        assert_eq!(mode(&ak), 0o600);
        assert_eq!(mode(&root.join("root/.ssh")), 0o700);
        assert_eq!(mode(&root.join("root")), 0o700);
        assert_eq!(std::fs::metadata(&ak).unwrap().uid(), me.0);
        for t in HOST_KEY_TYPES {
            assert!(o.host_key_path(t).exists(), "{t}");
        }
        let pubkey =
            std::fs::read_to_string(root.join("etc/ssh/ssh_host_ed25519_key.pub")).unwrap();
        assert!(pubkey.starts_with("ssh-ed25519 AAAA"), "{pubkey}");

        // Second start (Restart=always): keys kept, nothing regenerated, same files.
        let r2 = prepare(&cfg, &o, &rec);
        assert!(r2.generated.is_empty());
        assert!(r2.problems.is_empty(), "{:?}", r2.problems);
        let again = std::fs::read_to_string(root.join("etc/ssh/ssh_host_ed25519_key.pub")).unwrap();
        assert_eq!(pubkey, again);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn nothing_given_touches_only_host_keys() {
        let root = tmp("empty");
        std::fs::create_dir_all(root.join("etc/ssh")).unwrap();
        for t in HOST_KEY_TYPES {
            std::fs::write(root.join(format!("etc/ssh/ssh_host_{t}_key")), "x").unwrap();
        }
        let rec = Recorder::default();
        let mut o = opts(&root);
        // All keys exist: ssh-keygen must not even be looked for.
        o.keygen = PathBuf::from("/nonexistent/ssh-keygen");
        let r = prepare(&GuestConfig::default(), &o, &rec);
        assert_eq!(r, Report::default());
        assert!(rec.0.borrow().is_empty());
        assert!(!root.join("etc/hostname").exists());
        assert!(!root.join("root").exists());
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn failures_are_reported_and_other_steps_still_run() {
        let root = tmp("fail");
        // `.ssh` is a file: refused, nothing written under it.
        std::fs::create_dir_all(root.join("root")).unwrap();
        std::fs::write(root.join("root/.ssh"), "not a dir").unwrap();
        let cfg = GuestConfig {
            name: Some("vm".into()),
            authorized_key: Some(LINE.into()),
            problems: vec!["banger.key is not base64".into()],
            agent_tcp: None,
        };
        let rec = Recorder(RefCell::new(vec![]), true);
        let mut o = opts(&root);
        o.keygen = PathBuf::from("/nonexistent/ssh-keygen");
        let r = prepare(&cfg, &o, &rec);
        assert_eq!(r.hostname, None);
        assert!(!r.authorized_key);
        assert!(r.generated.is_empty());
        assert_eq!(r.problems.len(), 4, "{:#?}", r.problems);
        assert!(r.problems[0].contains("not base64"));
        assert!(
            r.problems[1].contains("setting the hostname"),
            "{}",
            r.problems[1]
        );
        assert!(
            r.problems[2].contains("not a directory"),
            "{}",
            r.problems[2]
        );
        assert!(
            r.problems[3].contains("/nonexistent/ssh-keygen"),
            "{}",
            r.problems[3]
        );
        assert!(
            r.problems[3].contains("openssh-server"),
            "{}",
            r.problems[3]
        );
        // /etc/hostname is written before the kernel call: the next boot's systemd uses it.
        assert_eq!(
            std::fs::read_to_string(root.join("etc/hostname")).unwrap(),
            "vm\n"
        );
        assert_eq!(
            std::fs::read_to_string(root.join("root/.ssh")).unwrap(),
            "not a dir"
        );
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn authorized_key_is_added_once_and_other_keys_kept() {
        let root = tmp("ak");
        let o = opts(&root);
        let other = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGposxU1u8AlmBpcq3yn+btS1uQymLutYq90E6gMTcpH colleague";
        std::fs::create_dir_all(root.join("root/.ssh")).unwrap();
        let ak = root.join("root/.ssh/authorized_keys");
        // A user's key, no trailing newline, a file too open.
        std::fs::write(&ak, other).unwrap();
        std::fs::set_permissions(&ak, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_authorized_key(LINE, &o).unwrap();
        let want = format!("{other}\n{LINE}\n");
        assert_eq!(std::fs::read_to_string(&ak).unwrap(), want);
        assert_eq!(mode(&ak), 0o600);
        // Next boot: same key (even with another comment) is not added twice.
        let recommented = LINE.replace("owner@host", "renamed");
        write_authorized_key(&recommented, &o).unwrap();
        write_authorized_key(LINE, &o).unwrap();
        assert_eq!(std::fs::read_to_string(&ak).unwrap(), want);
        // A link there is replaced by a file, not followed.
        let target = root.join("elsewhere");
        std::fs::write(&target, "secret\n").unwrap();
        std::fs::remove_file(&ak).unwrap();
        std::os::unix::fs::symlink(&target, &ak).unwrap();
        write_authorized_key(LINE, &o).unwrap();
        assert_eq!(std::fs::read_to_string(&ak).unwrap(), format!("{LINE}\n"));
        assert!(std::fs::symlink_metadata(&ak)
            .unwrap()
            .file_type()
            .is_file());
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "secret\n");
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn failing_keygen_says_why() {
        let root = tmp("keygen");
        let mut o = opts(&root);
        o.keygen = PathBuf::from("false");
        let e = ensure_host_keys(&o).unwrap_err();
        assert!(e.to_string().contains("(ed25519)"), "{e}");
        assert!(e.why.contains("exit status: 1"), "{e}");
        std::fs::remove_dir_all(&root).unwrap();
    }
}
