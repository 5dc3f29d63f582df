//! The daemon's generated ssh config (`/var/lib/banger/ssh/config`): one `Host <name>.vm` block
//! per VM with an address, so that plain `ssh <name>.vm` (once `banger ssh-config --install` has
//! included this file) connects exactly as `banger vm ssh` does — banger's key, banger's
//! known_hosts, strict host key checking.
//!
//! Owns rendering and atomically rewriting that file (not fsynced: the daemon writes it again from
//! the VM table at every start). It never edits the user's `~/.ssh/config`
//! ([`super::include`] adds the one `Include` line there).

use std::net::IpAddr;

use super::command::config_path;
use super::files;
use crate::error::{Error, Result};
use crate::layout::Layout;

/// One VM as the config sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmHost {
    /// The VM's name (the block is `Host <name>.vm`).
    pub name: String,
    /// Its guest address.
    pub ip: IpAddr,
}

const HEADER: &str = "\
# banger's ssh config: one Host block per VM, rewritten by bangerd whenever VMs come and go
# (edits here are lost). `banger ssh-config --install` includes it from ~/.ssh/config.
";

/// The file's text for `vms` (sorted by name, so the same VMs always give the same bytes).
pub fn render(layout: &Layout, vms: &[VmHost]) -> Result<String> {
    let key = config_path(&layout.ssh_key())?;
    let kh = config_path(&layout.ssh_known_hosts())?;
    let mut vms: Vec<&VmHost> = vms.iter().collect();
    vms.sort_by(|a, b| a.name.cmp(&b.name));
    let mut out = HEADER.to_string();
    for vm in vms {
        crate::helper::validate::vm_id(&vm.name).map_err(|_| {
            Error::new(
                "writing banger's ssh config",
                format!("VM name {:?} is not a valid host name", vm.name),
            )
        })?;
        out.push_str(&format!(
            "\nHost {alias}\n    HostName {ip}\n    User root\n    IdentityFile {key}\n    \
             UserKnownHostsFile {kh}\n    GlobalKnownHostsFile none\n    StrictHostKeyChecking yes\n    \
             IdentitiesOnly yes\n    PreferredAuthentications publickey\n    \
             HostKeyAlgorithms ssh-ed25519\n    LogLevel ERROR\n    ConnectTimeout {timeout}\n    \
             ConnectionAttempts {attempts}\n",
            alias = super::host_alias(&vm.name),
            ip = vm.ip,
            timeout = super::command::CONNECT_TIMEOUT_S,
            attempts = super::command::CONNECT_ATTEMPTS,
        ));
    }
    Ok(out)
}

/// Rewrites the file for `vms` when its content changes (0600, atomic). Returns whether it wrote.
pub fn write(layout: &Layout, vms: &[VmHost]) -> Result<bool> {
    let text = render(layout, vms)?;
    files::ensure_private_dir(&layout.ssh_dir())?;
    let path = layout.ssh_config();
    if files::read_regular(&path)?.as_deref() == Some(text.as_bytes()) {
        return Ok(false);
    }
    files::replace_atomic(&path, text.as_bytes(), 0o600, files::Durability::AtomicOnly)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::system::testutil::TempDir;
    use std::fs;
    use std::os::unix::fs::MetadataExt;

    fn vm(name: &str, ip: &str) -> VmHost {
        VmHost {
            name: name.into(),
            ip: ip.parse().unwrap(),
        }
    }

    #[test]
    fn renders_one_block_per_vm_sorted() {
        let l = Layout::system();
        let text = render(&l, &[vm("web", "172.30.0.3"), vm("dev", "172.30.0.2")]).unwrap();
        let dev = text.find("Host dev.vm\n").unwrap();
        let web = text.find("Host web.vm\n").unwrap();
        assert!(dev < web);
        let block: Vec<&str> = text[dev..web].lines().map(str::trim).collect();
        assert_eq!(
            block,
            [
                "Host dev.vm",
                "HostName 172.30.0.2",
                "User root",
                "IdentityFile /var/lib/banger/ssh/id_ed25519",
                "UserKnownHostsFile /var/lib/banger/ssh/known_hosts",
                "GlobalKnownHostsFile none",
                "StrictHostKeyChecking yes",
                "IdentitiesOnly yes",
                "PreferredAuthentications publickey",
                "HostKeyAlgorithms ssh-ed25519",
                "LogLevel ERROR",
                "ConnectTimeout 60",
                "ConnectionAttempts 30",
                "",
            ]
        );
        assert_eq!(render(&l, &[]).unwrap(), HEADER);
    }

    #[test]
    fn write_is_atomic_owner_only_and_skips_unchanged() {
        let t = TempDir::new();
        let l = Layout::under(t.path());
        assert!(write(&l, &[vm("dev", "172.30.0.2")]).unwrap());
        assert_eq!(fs::metadata(l.ssh_config()).unwrap().mode() & 0o777, 0o600);
        let ino = fs::metadata(l.ssh_config()).unwrap().ino();
        assert!(!write(&l, &[vm("dev", "172.30.0.2")]).unwrap());
        assert_eq!(fs::metadata(l.ssh_config()).unwrap().ino(), ino);
        assert!(write(&l, &[]).unwrap());
        assert_eq!(fs::read_to_string(l.ssh_config()).unwrap(), HEADER);
    }

    #[test]
    fn bad_name_refused_and_nothing_written() {
        let t = TempDir::new();
        let l = Layout::under(t.path());
        let bad = VmHost {
            name: "x\n    ProxyCommand evil".into(),
            ip: "172.30.0.2".parse().unwrap(),
        };
        assert!(write(&l, &[bad]).is_err());
        assert!(!l.ssh_config().exists());
    }

    /// ssh reads the generated block as intended (`ssh -G` resolves without connecting).
    #[test]
    fn ssh_resolves_the_block() {
        if !std::path::Path::new("/usr/bin/ssh").exists() {
            eprintln!("SKIP: ssh_resolves_the_block: ssh is not installed");
            return;
        }
        let t = TempDir::new();
        let l = Layout::under(t.path().join("with space"));
        write(&l, &[vm("dev", "172.30.0.2")]).unwrap();
        let out = std::process::Command::new("/usr/bin/ssh")
            .arg("-G")
            .arg("-F")
            .arg(l.ssh_config())
            .arg("dev.vm")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let cfg = String::from_utf8(out.stdout).unwrap();
        let kh = format!("userknownhostsfile {}", l.ssh_known_hosts().display());
        for want in [
            "hostname 172.30.0.2",
            "user root",
            "stricthostkeychecking true",
            "identitiesonly yes",
            kh.as_str(),
        ] {
            assert!(cfg.lines().any(|x| x == want), "{want:?} not in\n{cfg}");
        }
    }
}
