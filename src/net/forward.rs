//! `net.ipv4.ip_forward` of the current network namespace, on while any NAT VM exists.
//!
//! Decision (how the previous value is restored): when banger turns forwarding on and it was off,
//! it first records that in a marker file under the helper's runtime dir (`/run/banger-root`,
//! kept across helper restarts and gone at reboot, like the setting itself). When the last NAT VM
//! goes (`net_down`) or on `net_purge`, forwarding is turned back off only if that marker exists,
//! and the marker is removed. If forwarding was already on when banger first needed it, there is
//! no marker and banger never turns it off. An administrator who turns it on by hand while banger's
//! marker exists will see it turned off with the last NAT VM; doctor reports the state.

use crate::error::{Context, Error, Result};
use crate::layout::Layout;
use std::path::{Path, PathBuf};

/// The kernel setting (per network namespace; a kernel path, not a banger one).
pub const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

/// The marker saying "banger turned forwarding on; it was off".
pub fn marker(layout: &Layout) -> PathBuf {
    layout.helper_run_dir().join("net-ip-forward-was-off")
}

/// Reads the setting at `path` (`true` when forwarding is on).
pub fn read(path: &Path) -> Result<bool> {
    let s = std::fs::read_to_string(path).ctx(|| format!("reading {}", path.display()))?;
    Ok(s.trim() != "0")
}

fn write(path: &Path, on: bool) -> Result<()> {
    std::fs::write(path, if on { "1\n" } else { "0\n" }).map_err(|e| {
        Error::new(format!("writing {}", path.display()), e)
            .hint("the helper needs a writable /proc/sys/net (CAP_NET_ADMIN in this namespace)")
    })
}

/// Turns forwarding on, recording at `marker` that it was off.
pub fn enable(sysctl: &Path, marker: &Path) -> Result<()> {
    if read(sysctl)? {
        return Ok(());
    }
    if let Some(dir) = marker.parent() {
        std::fs::create_dir_all(dir).ctx(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(marker, b"0\n").ctx(|| format!("writing {}", marker.display()))?;
    write(sysctl, true)
}

/// Turns forwarding back off if banger turned it on (the marker exists); removes the marker.
pub fn restore(sysctl: &Path, marker: &Path) -> Result<()> {
    if !marker.exists() {
        return Ok(());
    }
    write(sysctl, false)?;
    std::fs::remove_file(marker).ctx(|| format!("removing {}", marker.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::system::testutil::TempDir;

    #[test]
    fn enable_restore_only_what_banger_changed() {
        let t = TempDir::new();
        let sysctl = t.path().join("ip_forward");
        let m = t.path().join("run/marker");
        // Off before: banger turns it on, and back off.
        std::fs::write(&sysctl, "0\n").unwrap();
        enable(&sysctl, &m).unwrap();
        assert!(read(&sysctl).unwrap());
        assert!(m.exists());
        enable(&sysctl, &m).unwrap();
        restore(&sysctl, &m).unwrap();
        assert!(!read(&sysctl).unwrap());
        assert!(!m.exists());
        restore(&sysctl, &m).unwrap();
        assert!(!read(&sysctl).unwrap());
        // On before: left on.
        std::fs::write(&sysctl, "1\n").unwrap();
        enable(&sysctl, &m).unwrap();
        assert!(!m.exists());
        restore(&sysctl, &m).unwrap();
        assert!(read(&sysctl).unwrap());
    }

    #[test]
    fn unreadable_setting_names_the_path() {
        let t = TempDir::new();
        let e = read(&t.path().join("nope")).unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
    }
}
