//! The two systemd units, rendered from the templates in `packaging/` (DESIGN §7).
//!
//! Owns the templates' placeholders and a minimal reader of unit files (for doctor). The directives
//! that keep VMs alive across restarts (`KillMode=process`, `SendSIGKILL=no`,
//! `RuntimeDirectoryPreserve=yes`) and readiness (`Type=notify`) are in the templates, and the tests
//! below pin every rendered line.

use std::path::Path;

use crate::error::{Error, Result};
use crate::layout::{Layout, DAEMON_UNIT, HELPER_UNIT};

const HELPER_TEMPLATE: &str = include_str!("../../packaging/bangerd-root.service.in");
const DAEMON_TEMPLATE: &str = include_str!("../../packaging/bangerd.service.in");

/// What a unit needs to know about the owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitOwner {
    /// Owner login name (`User=`).
    pub user: String,
    /// Owner primary gid (`Group=`; systemd accepts a numeric id).
    pub gid: u32,
}

/// Directives each unit must carry for VMs to survive restarts and for readiness to be real.
/// `(unit, key, value)`: checked by doctor against the file on disk.
pub const REQUIRED_DIRECTIVES: &[(&str, &str, &str)] = &[
    (HELPER_UNIT, "Type", "notify"),
    (HELPER_UNIT, "KillMode", "process"),
    (HELPER_UNIT, "SendSIGKILL", "no"),
    (HELPER_UNIT, "RuntimeDirectoryPreserve", "yes"),
    (DAEMON_UNIT, "Type", "notify"),
    (DAEMON_UNIT, "KillMode", "process"),
    (DAEMON_UNIT, "RuntimeDirectoryPreserve", "yes"),
];

fn substitute(template: &str, vars: &[(&str, String)], unit: &str) -> Result<String> {
    let mut out = template.to_string();
    for (key, value) in vars {
        if value.contains('\n') {
            return Err(Error::new(
                format!("rendering {unit}"),
                format!("value for {key} contains a newline"),
            ));
        }
        out = out.replace(&format!("@{key}@"), value);
    }
    if let Some(line) = out.lines().find(|l| {
        let b = l.as_bytes();
        b.windows(2)
            .any(|w| w[0] == b'@' && w[1].is_ascii_uppercase())
    }) {
        return Err(Error::new(
            format!("rendering {unit}"),
            format!("unreplaced placeholder in line {line:?}"),
        ));
    }
    Ok(out)
}

/// Renders `bangerd-root.service`.
pub fn render_helper(layout: &Layout) -> Result<String> {
    substitute(
        HELPER_TEMPLATE,
        &[
            (
                "HELPER_BIN",
                layout.link("bangerd-root").display().to_string(),
            ),
            ("STATE_DIR", layout.state_dir().display().to_string()),
        ],
        HELPER_UNIT,
    )
}

/// Renders `bangerd.service` for `owner`.
pub fn render_daemon(layout: &Layout, owner: &UnitOwner) -> Result<String> {
    if owner.user.is_empty() || owner.user.chars().any(|c| c.is_whitespace() || c == '@') {
        return Err(Error::new(
            format!("rendering {DAEMON_UNIT}"),
            format!("owner name {:?} is not a valid user name", owner.user),
        ));
    }
    substitute(
        DAEMON_TEMPLATE,
        &[
            ("OWNER_USER", owner.user.clone()),
            ("OWNER_GID", owner.gid.to_string()),
            ("DAEMON_BIN", layout.link("bangerd").display().to_string()),
        ],
        DAEMON_UNIT,
    )
}

/// Both units, helper first: `(unit name, contents)`.
pub fn render_all(layout: &Layout, owner: &UnitOwner) -> Result<Vec<(&'static str, String)>> {
    Ok(vec![
        (HELPER_UNIT, render_helper(layout)?),
        (DAEMON_UNIT, render_daemon(layout, owner)?),
    ])
}

/// The effective value of `key` in section `[section]` of a unit file's text plus drop-ins (in
/// order; a later assignment wins, an empty assignment resets). Comments and other sections are
/// ignored. Line continuations are not supported (our units never use them).
pub fn directive(texts: &[&str], section: &str, key: &str) -> Option<String> {
    let mut value = None;
    for text in texts {
        let mut in_section = false;
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
                continue;
            }
            if line.starts_with('[') {
                in_section = line == format!("[{section}]");
                continue;
            }
            if !in_section {
                continue;
            }
            if let Some((k, v)) = line.split_once('=') {
                if k.trim() == key {
                    let v = v.trim();
                    value = if v.is_empty() {
                        None
                    } else {
                        Some(v.to_string())
                    };
                }
            }
        }
    }
    value
}

/// Reads a unit file and its drop-ins (`<unit>.d/*.conf` in the same directory, sorted by name).
/// `Ok(None)` when the unit file does not exist.
pub fn read_with_dropins(unit_file: &Path) -> Result<Option<Vec<String>>> {
    let Some(main) = super::fsutil::read_if_exists(unit_file)? else {
        return Ok(None);
    };
    let mut texts = vec![String::from_utf8_lossy(&main).into_owned()];
    let mut dropin_dir = unit_file.as_os_str().to_owned();
    dropin_dir.push(".d");
    let dropin_dir = Path::new(&dropin_dir);
    if let Ok(entries) = std::fs::read_dir(dropin_dir) {
        let mut confs: Vec<_> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "conf"))
            .collect();
        confs.sort();
        for c in confs {
            if let Some(b) = super::fsutil::read_if_exists(&c)? {
                texts.push(String::from_utf8_lossy(&b).into_owned());
            }
        }
    }
    Ok(Some(texts))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner() -> UnitOwner {
        UnitOwner {
            user: "alice".into(),
            gid: 1001,
        }
    }

    fn assert_lines(got: &str, want: &[&str]) {
        let got: Vec<&str> = got.lines().collect();
        for (i, (g, w)) in got.iter().zip(want.iter()).enumerate() {
            assert_eq!(g, w, "line {} differs", i + 1);
        }
        assert_eq!(
            got.len(),
            want.len(),
            "line count differs:\n{}",
            got.join("\n")
        );
    }

    #[test]
    fn helper_unit_line_by_line() {
        let got = render_helper(&Layout::system()).unwrap();
        assert!(got.ends_with('\n'));
        assert_lines(
            &got,
            &[
                "# bangerd-root.service: banger's root helper (tap/bridge/NAT, VMM launch and signalling, disk plumbing).",
                "# Written by `sudo banger system install`; the next install puts back any hand edit.",
                "# To customise, use a drop-in: systemctl edit bangerd-root.service",
                "[Unit]",
                "Description=banger root helper",
                "After=network.target",
                "Before=bangerd.service",
                "# Restarts are how updates and `system restart` work: never refuse one for coming too often",
                "# (RestartSec= already keeps a crash loop from spinning).",
                "StartLimitIntervalSec=0",
                "",
                "[Service]",
                "Type=notify",
                "ExecStart=/usr/local/bin/bangerd-root",
                "# VMMs live in their own scopes and must never go down with the helper.",
                "KillMode=process",
                "SendSIGKILL=no",
                "Restart=on-failure",
                "RestartSec=1s",
                "RuntimeDirectory=banger-root",
                "RuntimeDirectoryMode=0711",
                "RuntimeDirectoryPreserve=yes",
                "UMask=0077",
                "NoNewPrivileges=yes",
                "CapabilityBoundingSet=CAP_CHOWN CAP_DAC_OVERRIDE CAP_FOWNER CAP_KILL CAP_MKNOD CAP_NET_ADMIN CAP_NET_RAW CAP_SETGID CAP_SETUID CAP_SYS_ADMIN CAP_SYS_CHROOT CAP_SYS_RESOURCE",
                "ProtectSystem=strict",
                "ReadWritePaths=/var/lib/banger",
                "# iptables-legacy takes this lock; \"-\" because it may not exist yet.",
                "ReadWritePaths=-/run/xtables.lock",
                "ProtectHome=yes",
                "ProtectKernelModules=yes",
                "",
                "[Install]",
                "WantedBy=multi-user.target",
            ],
        );
    }

    #[test]
    fn daemon_unit_line_by_line() {
        let got = render_daemon(&Layout::system(), &owner()).unwrap();
        assert!(got.ends_with('\n'));
        assert_lines(
            &got,
            &[
                "# bangerd.service: banger's owner daemon (VM and image orchestration, state store, RPC for the CLI).",
                "# Written by `sudo banger system install --owner USER`; the next install puts back any hand edit.",
                "# To customise, use a drop-in: systemctl edit bangerd.service",
                "[Unit]",
                "Description=banger owner daemon",
                "Wants=bangerd-root.service",
                "After=bangerd-root.service network.target",
                "# Restarts are how updates and `system restart` work: never refuse one for coming too often",
                "# (RestartSec= already keeps a crash loop from spinning).",
                "StartLimitIntervalSec=0",
                "",
                "[Service]",
                "Type=notify",
                "User=alice",
                "Group=1001",
                "ExecStart=/usr/local/bin/bangerd",
                "# Restarting the daemon must never touch anything it started.",
                "KillMode=process",
                "Restart=on-failure",
                "RestartSec=1s",
                "RuntimeDirectory=banger",
                "RuntimeDirectoryMode=0700",
                "RuntimeDirectoryPreserve=yes",
                "StateDirectory=banger",
                "StateDirectoryMode=0750",
                "# The daemon's cache is a subdirectory: /var/cache/banger itself stays root's, because root",
                "# stages updates below it (/var/cache/banger/updates) and the owner must not control that path.",
                "CacheDirectory=banger/daemon",
                "CacheDirectoryMode=0750",
                "UMask=0077",
                "NoNewPrivileges=yes",
                "CapabilityBoundingSet=",
                "ProtectSystem=strict",
                "ProtectHome=read-only",
                "PrivateTmp=yes",
                "ProtectKernelTunables=yes",
                "ProtectKernelModules=yes",
                "ProtectControlGroups=yes",
                "RestrictSUIDSGID=yes",
                "LockPersonality=yes",
                "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
                "",
                "[Install]",
                "WantedBy=multi-user.target",
            ],
        );
    }

    #[test]
    fn temp_layout_paths_follow_the_root() {
        let l = Layout::under("/tmp/r");
        let h = render_helper(&l).unwrap();
        assert!(h.contains("ExecStart=/tmp/r/usr/local/bin/bangerd-root\n"));
        assert!(h.contains("ReadWritePaths=/tmp/r/var/lib/banger\n"));
        let d = render_daemon(&l, &owner()).unwrap();
        assert!(d.contains("ExecStart=/tmp/r/usr/local/bin/bangerd\n"));
    }

    #[test]
    fn rendered_units_carry_required_directives() {
        for (unit, text) in render_all(&Layout::system(), &owner()).unwrap() {
            for (u, k, v) in REQUIRED_DIRECTIVES.iter().filter(|d| d.0 == unit) {
                assert_eq!(
                    directive(&[&text], "Service", k).as_deref(),
                    Some(*v),
                    "{u} {k}"
                );
            }
        }
    }

    #[test]
    fn bad_owner_names_rejected() {
        for bad in ["", "a b", "a\nb", "@x@"] {
            let o = UnitOwner {
                user: bad.into(),
                gid: 1,
            };
            assert!(render_daemon(&Layout::system(), &o).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn directive_table() {
        let unit =
            "[Unit]\nKillMode=mixed\n[Service]\n# KillMode=none\nKillMode = process\nType=simple\n";
        let cases: &[(&[&str], &str, Option<&str>)] = &[
            (&[unit], "KillMode", Some("process")),
            (&[unit], "Type", Some("simple")),
            (&[unit], "SendSIGKILL", None),
            (
                &[unit, "[Service]\nKillMode=control-group\n"],
                "KillMode",
                Some("control-group"),
            ),
            (&[unit, "[Service]\nKillMode=\n"], "KillMode", None),
            (
                &[unit, "[Unit]\nKillMode=control-group\n"],
                "KillMode",
                Some("process"),
            ),
        ];
        for (texts, key, want) in cases {
            assert_eq!(
                directive(texts, "Service", key).as_deref(),
                *want,
                "{key} in {texts:?}"
            );
        }
    }
}
