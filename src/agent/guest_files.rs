//! The files banger puts into a guest image for its agent, and where they go.
//!
//! Owns the agent's systemd unit and the sshd drop-in (both in `packaging/guest/`, embedded here
//! so the image builder and the tests use the very same text) and their paths relative to the
//! image's root. It writes nothing itself: the image builder does.

/// The agent's unit (`packaging/guest/banger-vsock-agent.service`).
pub const AGENT_UNIT: &str = include_str!("../../packaging/guest/banger-vsock-agent.service");

/// The sshd drop-in (`packaging/guest/sshd-banger.conf`).
pub const SSHD_DROPIN: &str = include_str!("../../packaging/guest/sshd-banger.conf");

/// Where the agent binary goes, relative to the image root (the unit's `ExecStart`).
pub const AGENT_BIN_PATH: &str = "usr/local/bin/banger-vsock-agent";

/// Where [`AGENT_UNIT`] goes, relative to the image root.
pub const AGENT_UNIT_PATH: &str = "etc/systemd/system/banger-vsock-agent.service";

/// The enablement link for [`AGENT_UNIT`] (pointing at `/` + [`AGENT_UNIT_PATH`]).
pub const AGENT_UNIT_WANTS_PATH: &str =
    "etc/systemd/system/multi-user.target.wants/banger-vsock-agent.service";

/// Where [`SSHD_DROPIN`] goes, relative to the image root.
pub const SSHD_DROPIN_PATH: &str = "etc/ssh/sshd_config.d/banger.conf";

#[cfg(test)]
mod tests {
    use super::*;

    /// The settings of a `[Section]`, comments and blank lines dropped.
    fn section<'a>(text: &'a str, name: &str) -> Vec<&'a str> {
        let mut inside = false;
        let mut out = Vec::new();
        for l in text.lines().map(str::trim) {
            if l.starts_with('[') {
                inside = l == format!("[{name}]");
            } else if inside && !l.is_empty() && !l.starts_with('#') {
                out.push(l);
            }
        }
        out
    }

    #[test]
    fn agent_unit_lines() {
        assert_eq!(
            section(AGENT_UNIT, "Unit"),
            [
                "Description=banger guest agent (hostname, root's SSH key, sshd host keys; answers the host over vsock)",
                "DefaultDependencies=no",
                "After=local-fs.target systemd-remount-fs.service",
                "Before=ssh.service ssh.socket multi-user.target shutdown.target",
                "Conflicts=shutdown.target",
                "StartLimitIntervalSec=0",
            ]
        );
        assert_eq!(
            section(AGENT_UNIT, "Service"),
            [
                "Type=notify",
                "NotifyAccess=main",
                &format!("ExecStart=/{AGENT_BIN_PATH}"),
                "Restart=always",
                "RestartSec=1s",
                "TimeoutStartSec=5min",
                "StandardOutput=journal+console",
                "StandardError=journal+console",
            ]
        );
        assert_eq!(
            section(AGENT_UNIT, "Install"),
            ["WantedBy=multi-user.target"]
        );
        assert!(
            AGENT_UNIT_WANTS_PATH.ends_with(AGENT_UNIT_PATH.rsplit('/').next().unwrap_or_default())
        );
    }

    #[test]
    fn sshd_dropin_lines() {
        let settings: Vec<&str> = SSHD_DROPIN
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .collect();
        assert_eq!(
            settings,
            [
                "PermitRootLogin prohibit-password",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "HostKey /etc/ssh/ssh_host_ed25519_key",
            ]
        );
        // sshd only reads drop-ins named *.conf.
        assert!(
            SSHD_DROPIN_PATH.starts_with("etc/ssh/sshd_config.d/")
                && SSHD_DROPIN_PATH.ends_with(".conf")
        );
    }

    /// sshd itself accepts the drop-in (`sshd -t -f`), when sshd is installed.
    #[test]
    fn sshd_accepts_the_dropin() {
        let sshd = std::path::Path::new("/usr/sbin/sshd");
        if !sshd.exists() {
            eprintln!("SKIP: sshd_accepts_the_dropin: /usr/sbin/sshd not installed");
            return;
        }
        let d = std::env::temp_dir().join(format!("banger-sshd-dropin-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        let conf = d.join("sshd_config");
        std::fs::write(&conf, SSHD_DROPIN).unwrap();
        let key = d.join("hostkey");
        let k = std::process::Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(&key)
            .status();
        if !k.is_ok_and(|s| s.success()) {
            eprintln!("SKIP: sshd_accepts_the_dropin: ssh-keygen failed");
            let _ = std::fs::remove_dir_all(&d);
            return;
        }
        let o = std::process::Command::new(sshd)
            .arg("-t")
            .arg("-f")
            .arg(&conf)
            .arg("-h")
            .arg(&key)
            .output()
            .unwrap();
        let _ = std::fs::remove_dir_all(&d);
        assert!(
            o.status.success(),
            "sshd -t: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
}
