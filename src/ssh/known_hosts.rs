//! banger's own known_hosts (`/var/lib/banger/ssh/known_hosts`): each guest's host key, pinned from
//! what the guest agent reported over vsock before anyone connects.
//!
//! Owns adding a VM's pin (idempotent for the same key), refusing a changed key with a loud error
//! that says what it means, removing a VM's entries, and reading pins back. Each banger line is
//! `<name>.vm,<ip> ssh-ed25519 AAAA… banger-vm=<id>`: the trailing comment ties the line to the VM so
//! delete removes exactly its lines. Lines banger did not write are kept as they are.
//! Every edit holds `known_hosts.lock` (flock) and replaces the file by rename, so concurrent
//! editors never lose each other's pins and `ssh` never reads half a file. It is not fsynced: it
//! sits on every boot's path, and a pin lost to a power cut (which stops every VM anyway) is
//! learned again from the agent's `hello` at the VM's next start. It never touches the
//! user's `~/.ssh/known_hosts` and never pins a key it was not given (no trust on first use).

use std::path::{Path, PathBuf};

use super::files::{self, FileLock};
use super::pubkey::PublicKey;
use crate::error::{Error, Result};
use crate::layout::Layout;

/// The comment tag on banger's lines: `banger-vm=<vm id>`.
const TAG: &str = "banger-vm=";

/// One VM's pin: the names it answers to and its host key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pin {
    /// The VM's id (tags the line so delete finds it).
    pub vm_id: String,
    /// The VM's name (for messages).
    pub vm_name: String,
    /// Host names the key is pinned for: `<name>.vm` and the VM's address.
    pub hosts: Vec<String>,
    /// The guest's ed25519 host key.
    pub key: PublicKey,
}

impl Pin {
    /// The usual pin: `<name>.vm` and `ip`.
    pub fn for_vm(vm_id: &str, vm_name: &str, ip: &str, key: PublicKey) -> Pin {
        Pin {
            vm_id: vm_id.to_string(),
            vm_name: vm_name.to_string(),
            hosts: vec![super::host_alias(vm_name), ip.to_string()],
            key,
        }
    }

    fn line(&self) -> String {
        format!(
            "{} {} {TAG}{}",
            self.hosts.join(","),
            self.key.to_openssh(),
            self.vm_id
        )
    }
}

/// What [`KnownHosts::pin`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pinned {
    /// The pin was written.
    Added,
    /// Exactly this pin was already there; the file was not touched.
    AlreadyPinned,
}

/// A parsed known_hosts line we can reason about (plain host list, a key, maybe banger's tag).
#[derive(Debug)]
struct Entry<'a> {
    hosts: Vec<&'a str>,
    key: Option<PublicKey>,
    key_text: String,
    vm_id: Option<&'a str>,
}

/// Parses a line; `None` for blanks, comments, markers (`@revoked` …) and hashed hosts, which are
/// kept but never matched.
fn parse_line(line: &str) -> Option<Entry<'_>> {
    let t = line.trim();
    if t.is_empty() || t.starts_with('#') || t.starts_with('@') || t.starts_with('|') {
        return None;
    }
    let mut f = t.split_ascii_whitespace();
    let hosts = f.next()?.split(',').collect();
    let ty = f.next()?;
    let blob = f.next()?;
    let key_text = format!("{ty} {blob}");
    let key = PublicKey::parse(&key_text).ok();
    let vm_id = f.find_map(|c| c.strip_prefix(TAG));
    Some(Entry {
        hosts,
        key,
        key_text,
        vm_id,
    })
}

/// banger's known_hosts file and its lock.
#[derive(Debug, Clone)]
pub struct KnownHosts {
    path: PathBuf,
    lock: PathBuf,
}

impl KnownHosts {
    /// The file at `path` (its lock beside it, `<path>.lock`).
    pub fn at(path: impl Into<PathBuf>) -> KnownHosts {
        let path = path.into();
        let mut lock = path.clone().into_os_string();
        lock.push(".lock");
        KnownHosts {
            path,
            lock: lock.into(),
        }
    }

    /// The install's file, `/var/lib/banger/ssh/known_hosts`.
    pub fn for_layout(layout: &Layout) -> KnownHosts {
        Self::at(layout.ssh_known_hosts())
    }

    /// Where the file is (what `ssh -o UserKnownHostsFile=` gets).
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn read(&self) -> Result<String> {
        let bytes = files::read_regular(&self.path)?.unwrap_or_default();
        String::from_utf8(bytes).map_err(|_| {
            Error::new(format!("reading {}", self.path.display()), "it is not text")
                .hint("move it aside; banger pins each VM's key again when it next starts")
        })
    }

    fn edit(&self, f: impl FnOnce(&str) -> Result<Option<String>>) -> Result<bool> {
        if let Some(dir) = self.path.parent() {
            files::ensure_private_dir(dir)?;
        }
        let _lock = FileLock::exclusive(&self.lock)?;
        let old = self.read()?;
        match f(&old)? {
            Some(new) if new != old => {
                files::replace_atomic(
                    &self.path,
                    new.as_bytes(),
                    0o600,
                    files::Durability::AtomicOnly,
                )?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Pins `pin.key` for `pin.hosts`. Refuses, changing nothing, when any of those hosts is
    /// already pinned to another key. Replaces the VM's own earlier lines.
    pub fn pin(&self, pin: &Pin) -> Result<Pinned> {
        if pin.hosts.is_empty()
            || pin
                .hosts
                .iter()
                .any(|h| h.is_empty() || h.contains([',', ' ', '\t', '\n', '#', '*', '?', '!']))
            || pin.vm_id.is_empty()
            || pin.vm_id.contains(char::is_whitespace)
        {
            return Err(Error::new(
                format!("pinning the host key of VM {}", pin.vm_name),
                format!("bad host names {:?} or VM id {:?}", pin.hosts, pin.vm_id),
            ));
        }
        let want = pin.line();
        let mut already = false;
        self.edit(|old| {
            let mut kept = Vec::new();
            let mut own_lines = 0;
            let mut exact = false;
            for line in old.lines() {
                let Some(e) = parse_line(line) else {
                    kept.push(line);
                    continue;
                };
                let shared: Vec<&str> = e
                    .hosts
                    .iter()
                    .copied()
                    .filter(|h| pin.hosts.iter().any(|p| p == h))
                    .collect();
                if !shared.is_empty() && e.key != Some(pin.key) {
                    return Err(changed_key(self, pin, &shared, &e));
                }
                let ours = e.vm_id == Some(pin.vm_id.as_str());
                if line == want {
                    exact = true;
                }
                if ours || (!shared.is_empty() && e.vm_id.is_some()) {
                    own_lines += 1;
                    continue;
                }
                kept.push(line);
            }
            if exact && own_lines == 1 {
                already = true;
                return Ok(None);
            }
            let mut out = String::new();
            for l in kept {
                out.push_str(l);
                out.push('\n');
            }
            out.push_str(&want);
            out.push('\n');
            Ok(Some(out))
        })?;
        Ok(if already {
            Pinned::AlreadyPinned
        } else {
            Pinned::Added
        })
    }

    /// Removes every line banger wrote for VM `vm_id`; returns how many. A missing file is fine.
    pub fn unpin_vm(&self, vm_id: &str) -> Result<usize> {
        self.retain_vms(|id| id != vm_id)
    }

    /// Keeps banger's lines only for VMs `keep` says still exist (reconcile after a crash between
    /// a delete and its unpin); lines banger did not write are always kept. Returns how many went.
    pub fn retain_vms(&self, keep: impl Fn(&str) -> bool) -> Result<usize> {
        if files::read_regular(&self.path)?.is_none() {
            return Ok(0);
        }
        let mut removed = 0;
        self.edit(|old| {
            let mut out = String::new();
            for line in old.lines() {
                if let Some(id) = parse_line(line).and_then(|e| e.vm_id) {
                    if !keep(id) {
                        removed += 1;
                        continue;
                    }
                }
                out.push_str(line);
                out.push('\n');
            }
            Ok(Some(out))
        })?;
        Ok(removed)
    }

    /// The key pinned for `host`, if any (the first plain line naming it).
    pub fn pinned(&self, host: &str) -> Result<Option<PublicKey>> {
        let text = self.read()?;
        Ok(text
            .lines()
            .filter_map(parse_line)
            .find(|e| e.hosts.contains(&host))
            .and_then(|e| e.key))
    }
}

/// The loud refusal: which VM, which key was pinned, which key is offered, what it means, what to do.
fn changed_key(kh: &KnownHosts, pin: &Pin, shared: &[&str], old: &Entry<'_>) -> Error {
    let pinned = match old.key {
        Some(k) => format!("ssh-ed25519 {}", k.fingerprint()),
        None => old.key_text.clone(),
    };
    let whose = match old.vm_id {
        Some(id) if id != pin.vm_id => format!(" (pinned for an earlier VM, id {id})"),
        _ => String::new(),
    };
    Error::new(
        format!(
            "pinning the host key of VM {} ({}) in {}",
            pin.vm_name,
            shared.join(", "),
            kh.path.display()
        ),
        format!(
            "THE GUEST'S HOST KEY HAS CHANGED: pinned {pinned}{whose}, now offered ssh-ed25519 {}. \
             Someone may be intercepting the connection (a man-in-the-middle), or the VM's disk was \
             replaced or the VM recreated outside banger; banger will not connect to it",
            pin.key.fingerprint()
        ),
    )
    .hint(format!(
        "nothing was changed; if you recreated the VM on purpose, delete it with `banger vm delete {}` \
         (which removes the old pin) and create it again; otherwise treat the VM as compromised",
        pin.vm_name
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::system::testutil::TempDir;
    use std::fs;
    use std::os::unix::fs::MetadataExt;

    fn key(n: u8) -> PublicKey {
        PublicKey::from_bytes([n; 32])
    }

    fn setup() -> (TempDir, KnownHosts) {
        let t = TempDir::new();
        let kh = KnownHosts::at(t.path().join("ssh/known_hosts"));
        (t, kh)
    }

    #[test]
    fn add_is_idempotent_and_owner_only() {
        let (_t, kh) = setup();
        let p = Pin::for_vm("aaaaaaaaaaaa", "dev", "172.30.0.2", key(1));
        assert_eq!(kh.pin(&p).unwrap(), Pinned::Added);
        let text = fs::read_to_string(kh.path()).unwrap();
        assert_eq!(
            text,
            format!(
                "dev.vm,172.30.0.2 {} banger-vm=aaaaaaaaaaaa\n",
                key(1).to_openssh()
            )
        );
        assert_eq!(fs::metadata(kh.path()).unwrap().mode() & 0o777, 0o600);
        let ino = fs::metadata(kh.path()).unwrap().ino();
        assert_eq!(kh.pin(&p).unwrap(), Pinned::AlreadyPinned);
        assert_eq!(fs::metadata(kh.path()).unwrap().ino(), ino, "rewritten");
        assert_eq!(kh.pinned("dev.vm").unwrap(), Some(key(1)));
        assert_eq!(kh.pinned("172.30.0.2").unwrap(), Some(key(1)));
        assert_eq!(kh.pinned("other.vm").unwrap(), None);
    }

    #[test]
    fn changed_key_is_refused_loudly_and_changes_nothing() {
        let (_t, kh) = setup();
        kh.pin(&Pin::for_vm("aaaaaaaaaaaa", "dev", "172.30.0.2", key(1)))
            .unwrap();
        let before = fs::read(kh.path()).unwrap();
        let cases = [
            // Same VM, new key.
            Pin::for_vm("aaaaaaaaaaaa", "dev", "172.30.0.2", key(2)),
            // Another VM reusing the address while the old pin is still there.
            Pin::for_vm("bbbbbbbbbbbb", "web", "172.30.0.2", key(3)),
            // Another VM id with the same name.
            Pin::for_vm("cccccccccccc", "dev", "172.30.0.9", key(4)),
        ];
        for p in cases {
            let e = kh.pin(&p).unwrap_err().to_string();
            assert!(e.contains("HOST KEY HAS CHANGED"), "{e}");
            assert!(e.contains("man-in-the-middle"), "{e}");
            assert!(e.contains(&key(1).fingerprint()), "{e}");
            assert!(e.contains(&p.key.fingerprint()), "{e}");
            assert!(
                e.contains(&format!("banger vm delete {}", p.vm_name)),
                "{e}"
            );
            assert_eq!(fs::read(kh.path()).unwrap(), before, "{p:?}");
        }
        let e = kh
            .pin(&Pin::for_vm("bbbbbbbbbbbb", "web", "172.30.0.2", key(3)))
            .unwrap_err()
            .to_string();
        assert!(e.contains("earlier VM, id aaaaaaaaaaaa"), "{e}");
    }

    #[test]
    fn same_vm_new_address_replaces_its_line() {
        let (_t, kh) = setup();
        kh.pin(&Pin::for_vm("aaaaaaaaaaaa", "dev", "172.30.0.2", key(1)))
            .unwrap();
        kh.pin(&Pin::for_vm("aaaaaaaaaaaa", "dev", "172.30.0.5", key(1)))
            .unwrap();
        let text = fs::read_to_string(kh.path()).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        assert_eq!(kh.pinned("172.30.0.2").unwrap(), None);
        assert_eq!(kh.pinned("172.30.0.5").unwrap(), Some(key(1)));
    }

    #[test]
    fn remove_takes_exactly_the_vms_lines() {
        let (_t, kh) = setup();
        fs::create_dir_all(kh.path().parent().unwrap()).unwrap();
        let foreign = format!("# a comment\nexample.test {}\n", key(9).to_openssh());
        fs::write(kh.path(), &foreign).unwrap();
        kh.pin(&Pin::for_vm("aaaaaaaaaaaa", "dev", "172.30.0.2", key(1)))
            .unwrap();
        kh.pin(&Pin::for_vm("bbbbbbbbbbbb", "web", "172.30.0.3", key(2)))
            .unwrap();
        assert_eq!(kh.unpin_vm("aaaaaaaaaaaa").unwrap(), 1);
        assert_eq!(kh.unpin_vm("aaaaaaaaaaaa").unwrap(), 0);
        let text = fs::read_to_string(kh.path()).unwrap();
        assert!(text.starts_with(&foreign), "{text}");
        assert_eq!(kh.pinned("dev.vm").unwrap(), None);
        assert_eq!(kh.pinned("web.vm").unwrap(), Some(key(2)));
        // Now the address is free for another VM with another key.
        assert_eq!(
            kh.pin(&Pin::for_vm("cccccccccccc", "new", "172.30.0.2", key(3)))
                .unwrap(),
            Pinned::Added
        );
        // retain_vms drops pins of VMs that no longer exist, keeps foreign lines.
        assert_eq!(kh.retain_vms(|id| id == "cccccccccccc").unwrap(), 1);
        let text = fs::read_to_string(kh.path()).unwrap();
        assert!(text.starts_with(&foreign), "{text}");
        assert_eq!(kh.pinned("web.vm").unwrap(), None);
        assert_eq!(kh.pinned("new.vm").unwrap(), Some(key(3)));
    }

    #[test]
    fn remove_on_missing_file_is_fine_and_creates_nothing() {
        let (t, kh) = setup();
        assert_eq!(kh.unpin_vm("aaaaaaaaaaaa").unwrap(), 0);
        assert!(!t.path().join("ssh").exists());
    }

    #[test]
    fn bad_pins_are_refused_and_write_nothing() {
        let (t, kh) = setup();
        let mut p = Pin::for_vm("aaaaaaaaaaaa", "dev", "172.30.0.2", key(1));
        p.hosts.push("evil,*".into());
        assert!(kh.pin(&p).is_err());
        let mut p = Pin::for_vm("a b", "dev", "172.30.0.2", key(1));
        assert!(kh.pin(&p).is_err());
        p.vm_id = "aaaaaaaaaaaa".into();
        p.hosts.clear();
        assert!(kh.pin(&p).is_err());
        assert!(!t.path().join("ssh").exists());
    }

    #[test]
    fn concurrent_pins_all_land() {
        let (_t, kh) = setup();
        std::thread::scope(|s| {
            for i in 0..16u8 {
                let kh = kh.clone();
                s.spawn(move || {
                    let id = format!("{:012x}", i);
                    let p = Pin::for_vm(
                        &id,
                        &format!("vm{i}"),
                        &format!("172.30.0.{}", i + 2),
                        key(i),
                    );
                    kh.pin(&p).unwrap();
                    if i % 2 == 0 {
                        kh.unpin_vm(&id).unwrap();
                    }
                });
            }
        });
        for i in 0..16u8 {
            let want = (i % 2 == 1).then(|| key(i));
            assert_eq!(kh.pinned(&format!("vm{i}.vm")).unwrap(), want, "vm{i}");
        }
        let text = fs::read_to_string(kh.path()).unwrap();
        assert_eq!(text.lines().count(), 8, "{text}");
        // Only the file and its lock in the directory: no temp files left.
        assert_eq!(
            fs::read_dir(kh.path().parent().unwrap()).unwrap().count(),
            2
        );
    }

    #[test]
    fn ssh_keygen_finds_the_pins() {
        let Some(keygen) = ["/usr/bin/ssh-keygen", "/bin/ssh-keygen"]
            .iter()
            .find(|p| Path::new(p).exists())
        else {
            eprintln!("SKIP: ssh_keygen_finds_the_pins: ssh-keygen is not installed");
            return;
        };
        let (_t, kh) = setup();
        let k = PublicKey::parse(crate::ssh::pubkey::tests::SAMPLE).unwrap();
        kh.pin(&Pin::for_vm("aaaaaaaaaaaa", "dev", "172.30.0.2", k))
            .unwrap();
        for host in ["dev.vm", "172.30.0.2"] {
            let out = std::process::Command::new(keygen)
                .args(["-F", host, "-f"])
                .arg(kh.path())
                .output()
                .unwrap();
            assert!(out.status.success(), "{host}");
            assert!(String::from_utf8_lossy(&out.stdout).contains(&k.to_openssh()));
        }
        let out = std::process::Command::new(keygen)
            .args(["-F", "web.vm", "-f"])
            .arg(kh.path())
            .output()
            .unwrap();
        assert!(!out.status.success());
    }
}
