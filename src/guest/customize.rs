//! Turns a copy of a debootstrapped tree into a banger guest root: the agent and its unit
//! (enabled), the sshd drop-in, a serial getty on ttyS0, an fstab for the virtio-blk root, no sshd
//! host keys and an empty machine-id (each VM makes its own at first boot), a placeholder hostname.
//!
//! Works only below the tree it is given and never writes through a symlink found in it (a tree
//! is foreign data: its `/etc/resolv.conf` may well point at a host path). It never writes an
//! existing file in place: it replaces or unlinks directory entries, so the copy it is handed may
//! share file inodes with the cached tree (a hard-linked copy) without changing it.

use crate::error::{Context, Error, Result};
use std::fs;
use std::io::Write;
use std::os::unix::fs::{symlink, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

use crate::agent::guest_files::{
    AGENT_BIN_PATH, AGENT_UNIT, AGENT_UNIT_PATH, SSHD_DROPIN, SSHD_DROPIN_PATH,
};

const AGENT_UNIT_NAME: &str = "banger-vsock-agent.service";
/// The hostname a guest has until its agent sets the VM's name.
pub const PLACEHOLDER_HOSTNAME: &str = "banger";

/// What goes into the tree besides fixed files.
#[derive(Debug, Clone)]
pub struct Inputs<'a> {
    /// The agent binary to copy in (the running banger, `/proc/self/exe`).
    pub agent: &'a Path,
    /// Its unit file text.
    pub agent_unit: &'a str,
    /// The sshd drop-in text.
    pub sshd_dropin: &'a str,
}

impl Default for Inputs<'static> {
    fn default() -> Self {
        Inputs {
            agent: Path::new("/proc/self/exe"),
            agent_unit: AGENT_UNIT,
            sshd_dropin: SSHD_DROPIN,
        }
    }
}

/// Customises `tree` (a private copy) in place.
pub fn customize(tree: &Path, inputs: &Inputs<'_>) -> Result<()> {
    let t = Tree(tree);
    // The agent: this very binary (static), plus its unit, enabled where its [Install] says.
    let agent = fs::read(inputs.agent).ctx(|| format!("reading {}", inputs.agent.display()))?;
    t.put(AGENT_BIN_PATH, &agent, 0o755)?;
    t.put(AGENT_UNIT_PATH, inputs.agent_unit.as_bytes(), 0o644)?;
    let targets = wanted_by(inputs.agent_unit);
    if targets.is_empty() {
        return Err(Error::new(
            format!("enabling {AGENT_UNIT_NAME}"),
            "the unit has no WantedBy= in its [Install] section",
        )
        .hint("fix packaging/guest/banger-vsock-agent.service"));
    }
    for target in targets {
        t.link(
            &format!("etc/systemd/system/{target}.wants/{AGENT_UNIT_NAME}"),
            &format!("/{AGENT_UNIT_PATH}"),
        )?;
    }

    t.put(SSHD_DROPIN_PATH, inputs.sshd_dropin.as_bytes(), 0o644)?;

    // A login prompt on the serial console, like `systemctl enable serial-getty@ttyS0`.
    let getty = "lib/systemd/system/serial-getty@.service";
    if !t.exists(getty) && !t.exists(&format!("usr/{getty}")) {
        return Err(Error::new(
            "enabling a serial getty on ttyS0",
            format!("{} has no {getty}", tree.display()),
        )
        .hint("is systemd in the image's package set?"));
    }
    t.link(
        "etc/systemd/system/getty.target.wants/serial-getty@ttyS0.service",
        &format!("/{getty}"),
    )?;

    // The kernel mounts the root read-write (root=/dev/vda rw); fstab makes systemd agree.
    t.put(
        "etc/fstab",
        b"# banger: the VM's root disk (virtio-blk)\n/dev/vda / ext4 defaults,noatime 0 1\n",
        0o644,
    )?;

    // Identity is per VM: sshd host keys (the agent makes them at first boot) and machine-id
    // (systemd makes one when the file is empty) must never be shared by clones of an image.
    for name in t.list("etc/ssh")? {
        if name.starts_with("ssh_host_") {
            t.remove(&format!("etc/ssh/{name}"))?;
        }
    }
    t.put("etc/machine-id", b"", 0o444)?;
    if t.is_regular("var/lib/dbus/machine-id") {
        t.link("var/lib/dbus/machine-id", "/etc/machine-id")?;
    }

    t.put(
        "etc/hostname",
        format!("{PLACEHOLDER_HOSTNAME}\n").as_bytes(),
        0o644,
    )?;
    t.put(
        "etc/hosts",
        b"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n",
        0o644,
    )?;
    // debootstrap copied the build host's resolver config; a guest gets its DNS servers from
    // the kernel's ip= configuration, which the kernel publishes in resolv.conf syntax.
    t.link("etc/resolv.conf", "/proc/net/pnp")?;
    Ok(())
}

/// The targets named by `WantedBy=` in the unit's `[Install]` section.
pub fn wanted_by(unit: &str) -> Vec<String> {
    let mut section = "";
    let mut out = Vec::new();
    for line in unit.lines().map(str::trim) {
        if line.starts_with('[') && line.ends_with(']') {
            section = line;
        } else if section == "[Install]" {
            if let Some(v) = line.strip_prefix("WantedBy=") {
                out.extend(v.split_whitespace().map(str::to_string));
            }
        }
    }
    out
}

/// Paths relative to a tree root, resolved without following symlinks in the tree.
struct Tree<'a>(&'a Path);

impl Tree<'_> {
    fn path(&self, rel: &str) -> PathBuf {
        self.0.join(rel)
    }

    fn exists(&self, rel: &str) -> bool {
        fs::symlink_metadata(self.path(rel)).is_ok()
    }

    fn is_regular(&self, rel: &str) -> bool {
        fs::symlink_metadata(self.path(rel)).is_ok_and(|m| m.file_type().is_file())
    }

    /// Makes sure every directory from the root down to `rel` is a real directory (created
    /// 0755 if missing); a symlink on the way is refused.
    fn dir(&self, rel: &Path) -> Result<PathBuf> {
        let mut p = self.0.to_path_buf();
        for c in rel.components() {
            let Component::Normal(c) = c else {
                return Err(Error::new(
                    format!("writing {} in {}", rel.display(), self.0.display()),
                    "not a plain relative path",
                ));
            };
            p.push(c);
            match fs::symlink_metadata(&p) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    return Err(Error::new(
                        format!("writing below {}", p.display()),
                        "it is a symlink or a file in the image tree, not a directory",
                    ))
                }
                Err(_) => {
                    fs::create_dir(&p).ctx(|| format!("creating {}", p.display()))?;
                }
            }
        }
        Ok(p)
    }

    fn parent(&self, rel: &str) -> Result<(PathBuf, PathBuf)> {
        let r = Path::new(rel);
        let dir = self.dir(r.parent().unwrap_or(Path::new("")))?;
        let name = r.file_name().ok_or_else(|| {
            Error::new(format!("writing {rel} in {}", self.0.display()), "no name")
        })?;
        Ok((dir.clone(), dir.join(name)))
    }

    /// Replaces whatever is at `rel` (file or symlink, never followed) with a new file.
    fn put(&self, rel: &str, data: &[u8], mode: u32) -> Result<()> {
        let (dir, path) = self.parent(rel)?;
        let tmp = dir.join(format!(".banger-tmp.{}", std::process::id()));
        let what = || format!("writing {}", path.display());
        let _ = fs::remove_file(&tmp);
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .ctx(what)?;
        let r = f
            .write_all(data)
            .and_then(|_| {
                fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(mode))
            })
            .and_then(|_| fs::rename(&tmp, &path));
        if r.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        r.ctx(what)
    }

    /// Replaces whatever is at `rel` with a symlink to `target` (an absolute path in the guest).
    fn link(&self, rel: &str, target: &str) -> Result<()> {
        let (_, path) = self.parent(rel)?;
        if fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir()) {
            return Err(Error::new(
                format!("linking {} to {target}", path.display()),
                "a directory is in the way",
            ));
        }
        let _ = fs::remove_file(&path);
        symlink(target, &path).ctx(|| format!("linking {} to {target}", path.display()))
    }

    fn remove(&self, rel: &str) -> Result<()> {
        let p = self.path(rel);
        fs::remove_file(&p).ctx(|| format!("removing {}", p.display()))
    }

    fn list(&self, rel: &str) -> Result<Vec<String>> {
        let p = self.path(rel);
        if fs::symlink_metadata(&p)
            .map(|m| !m.is_dir())
            .unwrap_or(true)
        {
            return Ok(Vec::new());
        }
        let rd = fs::read_dir(&p).ctx(|| format!("listing {}", p.display()))?;
        Ok(rd
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    struct Tmp(PathBuf);
    impl Drop for Tmp {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
    fn tmp(tag: &str) -> Tmp {
        let d = std::env::temp_dir().join(format!(
            "banger-customize-{tag}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        Tmp(d)
    }

    /// A tree shaped like a debootstrapped bookworm, as far as customisation cares.
    fn debian_like(root: &Path) {
        for d in [
            "etc/ssh/sshd_config.d",
            "usr/lib/systemd/system",
            "var/lib/dbus",
            "etc/systemd/system",
        ] {
            fs::create_dir_all(root.join(d)).unwrap();
        }
        symlink("usr/lib", root.join("lib")).unwrap();
        fs::write(
            root.join("usr/lib/systemd/system/serial-getty@.service"),
            "[Unit]\n",
        )
        .unwrap();
        for k in [
            "ssh_host_ed25519_key",
            "ssh_host_ed25519_key.pub",
            "ssh_host_rsa_key",
            "ssh_host_ecdsa_key.pub",
        ] {
            fs::write(root.join("etc/ssh").join(k), "secret").unwrap();
        }
        fs::write(
            root.join("etc/ssh/sshd_config"),
            "Include /etc/ssh/sshd_config.d/*.conf\n",
        )
        .unwrap();
        fs::write(
            root.join("etc/machine-id"),
            "0123456789abcdef0123456789abcdef\n",
        )
        .unwrap();
        fs::write(
            root.join("var/lib/dbus/machine-id"),
            "0123456789abcdef0123456789abcdef\n",
        )
        .unwrap();
        fs::write(root.join("etc/hostname"), "buildhost\n").unwrap();
    }

    fn inputs<'a>(agent: &'a Path) -> Inputs<'a> {
        Inputs {
            agent,
            agent_unit: AGENT_UNIT,
            sshd_dropin: SSHD_DROPIN,
        }
    }

    fn mode(p: &Path) -> u32 {
        fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn customises_a_debian_tree() {
        let t = tmp("ok");
        let root = t.0.join("tree");
        debian_like(&root);
        let agent = t.0.join("agent-bin");
        fs::write(&agent, b"\x7fELF fake agent").unwrap();
        customize(&root, &inputs(&agent)).unwrap();

        let a = root.join(AGENT_BIN_PATH);
        assert_eq!(fs::read(&a).unwrap(), b"\x7fELF fake agent");
        assert_eq!(mode(&a), 0o755);
        let unit = root.join("etc/systemd/system/banger-vsock-agent.service");
        assert_eq!(fs::read_to_string(&unit).unwrap(), AGENT_UNIT);
        assert_eq!(mode(&unit), 0o644);
        let wants = root.join(crate::agent::guest_files::AGENT_UNIT_WANTS_PATH);
        assert_eq!(
            fs::read_link(&wants).unwrap(),
            Path::new("/").join(AGENT_UNIT_PATH)
        );
        for target in wanted_by(AGENT_UNIT) {
            let l = root.join(format!(
                "etc/systemd/system/{target}.wants/banger-vsock-agent.service"
            ));
            assert_eq!(
                fs::read_link(&l).unwrap(),
                Path::new("/etc/systemd/system/banger-vsock-agent.service")
            );
        }
        assert_eq!(
            fs::read_link(
                root.join("etc/systemd/system/getty.target.wants/serial-getty@ttyS0.service")
            )
            .unwrap(),
            Path::new("/lib/systemd/system/serial-getty@.service")
        );
        // The link resolves inside the tree (lib -> usr/lib).
        assert!(root
            .join("lib/systemd/system/serial-getty@.service")
            .is_file());

        let dropin = root.join("etc/ssh/sshd_config.d/banger.conf");
        assert_eq!(fs::read_to_string(&dropin).unwrap(), SSHD_DROPIN);
        for line in [
            "PermitRootLogin prohibit-password",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
        ] {
            assert!(SSHD_DROPIN.lines().any(|l| l.trim() == line), "{line}");
        }
        let keys: Vec<_> = fs::read_dir(root.join("etc/ssh"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("ssh_host_"))
            .collect();
        assert!(keys.is_empty(), "host keys left: {keys:?}");
        assert!(
            root.join("etc/ssh/sshd_config").is_file(),
            "other ssh files kept"
        );

        assert_eq!(fs::read(root.join("etc/machine-id")).unwrap(), b"");
        assert_eq!(mode(&root.join("etc/machine-id")), 0o444);
        assert_eq!(
            fs::read_link(root.join("var/lib/dbus/machine-id")).unwrap(),
            Path::new("/etc/machine-id")
        );
        let fstab = fs::read_to_string(root.join("etc/fstab")).unwrap();
        assert!(
            fstab
                .lines()
                .any(|l| l.split_whitespace().take(3).eq(["/dev/vda", "/", "ext4"])),
            "{fstab}"
        );
        assert_eq!(
            fs::read_to_string(root.join("etc/hostname")).unwrap(),
            "banger\n"
        );
        assert_eq!(
            fs::read_link(root.join("etc/resolv.conf")).unwrap(),
            Path::new("/proc/net/pnp")
        );
        // No temp files left behind.
        let mut stack = vec![root.clone()];
        while let Some(d) = stack.pop() {
            for e in fs::read_dir(&d).unwrap() {
                let e = e.unwrap();
                assert!(
                    !e.file_name().to_string_lossy().starts_with(".banger-tmp"),
                    "{:?}",
                    e.path()
                );
                if e.file_type().unwrap().is_dir() {
                    stack.push(e.path());
                }
            }
        }
    }

    #[test]
    fn never_writes_through_a_symlink_in_the_tree() {
        let t = tmp("symlink");
        let root = t.0.join("tree");
        debian_like(&root);
        let outside = t.0.join("outside");
        fs::create_dir_all(&outside).unwrap();
        fs::write(outside.join("resolv.conf"), "nameserver 10.0.0.1\n").unwrap();
        fs::write(outside.join("hostname"), "host\n").unwrap();
        // Files pointing out of the tree get replaced, not written through.
        symlink(outside.join("resolv.conf"), root.join("etc/resolv.conf")).unwrap();
        fs::remove_file(root.join("etc/hostname")).unwrap();
        symlink(outside.join("hostname"), root.join("etc/hostname")).unwrap();
        let agent = t.0.join("agent-bin");
        fs::write(&agent, b"x").unwrap();
        customize(&root, &inputs(&agent)).unwrap();
        assert_eq!(
            fs::read_to_string(outside.join("resolv.conf")).unwrap(),
            "nameserver 10.0.0.1\n"
        );
        assert_eq!(
            fs::read_to_string(outside.join("hostname")).unwrap(),
            "host\n"
        );
        assert!(fs::symlink_metadata(root.join("etc/hostname"))
            .unwrap()
            .is_file());

        // A directory on the way that is a symlink is refused, and nothing outside is created.
        let t2 = tmp("symlink-dir");
        let root2 = t2.0.join("tree");
        debian_like(&root2);
        fs::remove_dir_all(root2.join("etc/ssh")).unwrap();
        symlink(&outside, root2.join("etc/ssh")).unwrap();
        let e = customize(&root2, &inputs(&agent)).unwrap_err();
        assert!(e.to_string().contains("etc/ssh"), "{e}");
        assert!(!outside.join("sshd_config.d").exists());
    }

    #[test]
    fn refusals_name_what_is_missing() {
        let t = tmp("refuse");
        let root = t.0.join("tree");
        debian_like(&root);
        let agent = t.0.join("agent-bin");
        fs::write(&agent, b"x").unwrap();
        let no_install = Inputs {
            agent_unit: "[Unit]\nDescription=x\n[Service]\nExecStart=/bin/true\n",
            ..inputs(&agent)
        };
        let e = customize(&root, &no_install).unwrap_err();
        assert!(e.to_string().contains("WantedBy"), "{e}");

        fs::remove_file(root.join("usr/lib/systemd/system/serial-getty@.service")).unwrap();
        let e = customize(&root, &inputs(&agent)).unwrap_err();
        assert!(e.to_string().contains("serial-getty@.service"), "{e}");

        let e = customize(&root, &inputs(&t.0.join("no-such-agent"))).unwrap_err();
        assert!(e.to_string().contains("no-such-agent"), "{e}");
    }

    #[test]
    fn a_hard_linked_copy_leaves_the_original_untouched() {
        let t = tmp("hardlink");
        let orig = t.0.join("orig");
        debian_like(&orig);
        fs::write(orig.join("etc/resolv.conf"), "nameserver 10.9.9.9\n").unwrap();
        fs::write(orig.join("etc/fstab"), "# original\n").unwrap();
        let snapshot = |root: &Path| {
            let mut out = Vec::new();
            let mut stack = vec![root.to_path_buf()];
            while let Some(d) = stack.pop() {
                let mut entries: Vec<_> = fs::read_dir(&d)
                    .unwrap()
                    .map(|e| e.unwrap().path())
                    .collect();
                entries.sort();
                for p in entries {
                    let m = fs::symlink_metadata(&p).unwrap();
                    let content = if m.is_file() {
                        fs::read(&p).unwrap()
                    } else {
                        Vec::new()
                    };
                    out.push((
                        p.strip_prefix(root).unwrap().to_path_buf(),
                        m.permissions().mode(),
                        content,
                    ));
                    if m.is_dir() {
                        stack.push(p);
                    }
                }
            }
            out
        };
        let before = snapshot(&orig);
        let copy = t.0.join("copy");
        let ok = std::process::Command::new("cp")
            .args(["-a", "--link"])
            .arg(&orig)
            .arg(&copy)
            .status()
            .unwrap();
        assert!(ok.success());
        let agent = t.0.join("agent-bin");
        fs::write(&agent, b"x").unwrap();
        customize(&copy, &inputs(&agent)).unwrap();
        assert_eq!(snapshot(&orig), before, "the original tree changed");
        assert_ne!(snapshot(&copy), before, "the copy was customised");
    }

    #[test]
    fn wanted_by_reads_only_the_install_section() {
        let u = "[Unit]\nWantedBy=nope.target\n[Install]\nWantedBy=multi-user.target sockets.target\nWantedBy=x.target\n";
        assert_eq!(
            wanted_by(u),
            ["multi-user.target", "sockets.target", "x.target"]
        );
        assert!(wanted_by("[Service]\nExecStart=/x\n").is_empty());
    }
}
