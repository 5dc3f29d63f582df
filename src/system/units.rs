//! The four systemd units, rendered from the templates in `packaging/` (DESIGN §7): each daemon's
//! service and the socket unit that holds its listening socket across restarts.
//!
//! Owns the templates' placeholders, the directives doctor requires of them, and a minimal reader
//! of unit files (for doctor). The directives that keep VMs alive across restarts
//! (`KillMode=process`, `SendSIGKILL=no`, `RuntimeDirectoryPreserve=yes`) and readiness
//! (`Type=notify`) are in the templates, and the tests below pin every rendered line.

use std::path::Path;

use crate::error::{Error, Result};
use crate::layout::{Layout, DAEMON_UNIT, HELPER_UNIT};

const HELPER_TEMPLATE: &str = include_str!("../../packaging/bangerd-root.service.in");
const DAEMON_TEMPLATE: &str = include_str!("../../packaging/bangerd.service.in");
const HELPER_SOCKET_TEMPLATE: &str = include_str!("../../packaging/bangerd-root.socket.in");
const DAEMON_SOCKET_TEMPLATE: &str = include_str!("../../packaging/bangerd.socket.in");

/// The helper's socket unit.
pub const HELPER_SOCKET_UNIT: &str = "bangerd-root.socket";
/// The daemon's socket unit.
pub const DAEMON_SOCKET_UNIT: &str = "bangerd.socket";
/// The helper's socket as systemd names it to the helper (`FileDescriptorName=`).
pub const HELPER_SOCKET_NAME: &str = "bangerd-root";
/// The daemon's socket as systemd names it to the daemon (`FileDescriptorName=`).
pub const DAEMON_SOCKET_NAME: &str = "bangerd";

/// Every unit banger installs, in start order: helper before daemon, each socket before its
/// service.
pub const ALL_UNITS: [&str; 4] = [
    HELPER_SOCKET_UNIT,
    HELPER_UNIT,
    DAEMON_SOCKET_UNIT,
    DAEMON_UNIT,
];

/// The socket unit of a service (`None` for anything else).
pub fn socket_of(service: &str) -> Option<&'static str> {
    match service {
        HELPER_UNIT => Some(HELPER_SOCKET_UNIT),
        DAEMON_UNIT => Some(DAEMON_SOCKET_UNIT),
        _ => None,
    }
}

/// True for banger's socket units.
pub fn is_socket(unit: &str) -> bool {
    unit == HELPER_SOCKET_UNIT || unit == DAEMON_SOCKET_UNIT
}

/// What a unit needs to know about the owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitOwner {
    /// Owner login name (`User=`, `SocketUser=`).
    pub user: String,
    /// Owner primary gid (`Group=`, `SocketGroup=`; systemd accepts a numeric id).
    pub gid: u32,
}

/// How much a required directive matters, which is how loud doctor is when it is missing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Running VMs or readiness depend on it: doctor FAILs (and an update rolls back).
    Must,
    /// Hardening and socket activation: doctor WARNs. An update keeps the units it finds (only
    /// `system install` writes units), so a host updated from an older release lacks these until
    /// its next install, and that must not roll the update back.
    Should,
}

/// One directive doctor checks in the unit file on disk (plus its drop-ins).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Required {
    /// The unit.
    pub unit: &'static str,
    /// Its section (`Service`, `Socket`).
    pub section: &'static str,
    /// The key.
    pub key: &'static str,
    /// The value it must have.
    pub value: &'static str,
    /// How much it matters.
    pub need: Need,
}

const fn must(unit: &'static str, key: &'static str, value: &'static str) -> Required {
    Required {
        unit,
        section: "Service",
        key,
        value,
        need: Need::Must,
    }
}

const fn should(unit: &'static str, key: &'static str, value: &'static str) -> Required {
    Required {
        unit,
        section: "Service",
        key,
        value,
        need: Need::Should,
    }
}

const fn socket(unit: &'static str, key: &'static str, value: &'static str) -> Required {
    Required {
        unit,
        section: "Socket",
        key,
        value,
        need: Need::Should,
    }
}

/// The helper's capability bounding set (kept in one place: template test and doctor agree).
pub const HELPER_CAPABILITIES: &str =
    "CAP_CHOWN CAP_DAC_OVERRIDE CAP_FOWNER CAP_KILL CAP_NET_ADMIN CAP_SETGID CAP_SETUID";

/// Directives each unit must carry: for VMs to survive restarts and for readiness to be real
/// ([`Need::Must`]), and for the sandbox and socket activation ([`Need::Should`]). Checked by
/// doctor against the files on disk.
pub const REQUIRED_DIRECTIVES: &[Required] = &[
    must(HELPER_UNIT, "Type", "notify"),
    must(HELPER_UNIT, "KillMode", "process"),
    must(HELPER_UNIT, "SendSIGKILL", "no"),
    must(HELPER_UNIT, "RuntimeDirectoryPreserve", "yes"),
    should(HELPER_UNIT, "NoNewPrivileges", "yes"),
    should(HELPER_UNIT, "CapabilityBoundingSet", HELPER_CAPABILITIES),
    should(HELPER_UNIT, "ProtectSystem", "strict"),
    should(HELPER_UNIT, "ProtectHome", "yes"),
    should(HELPER_UNIT, "ProtectKernelModules", "yes"),
    should(HELPER_UNIT, "ProtectKernelLogs", "yes"),
    should(HELPER_UNIT, "ProtectControlGroups", "yes"),
    should(HELPER_UNIT, "ProtectClock", "yes"),
    should(HELPER_UNIT, "ProtectHostname", "yes"),
    should(HELPER_UNIT, "RestrictRealtime", "yes"),
    should(HELPER_UNIT, "RestrictSUIDSGID", "yes"),
    should(HELPER_UNIT, "LockPersonality", "yes"),
    should(HELPER_UNIT, "SystemCallArchitectures", "native"),
    must(DAEMON_UNIT, "Type", "notify"),
    must(DAEMON_UNIT, "KillMode", "process"),
    must(DAEMON_UNIT, "RuntimeDirectoryPreserve", "yes"),
    should(DAEMON_UNIT, "NoNewPrivileges", "yes"),
    should(DAEMON_UNIT, "ProtectSystem", "strict"),
    should(DAEMON_UNIT, "ProtectKernelModules", "yes"),
    should(DAEMON_UNIT, "ProtectKernelLogs", "yes"),
    should(DAEMON_UNIT, "ProtectKernelTunables", "yes"),
    should(DAEMON_UNIT, "ProtectControlGroups", "yes"),
    should(DAEMON_UNIT, "ProtectClock", "yes"),
    should(DAEMON_UNIT, "ProtectHostname", "yes"),
    should(DAEMON_UNIT, "PrivateDevices", "yes"),
    should(DAEMON_UNIT, "RestrictRealtime", "yes"),
    should(DAEMON_UNIT, "RestrictSUIDSGID", "yes"),
    should(DAEMON_UNIT, "RestrictNamespaces", "yes"),
    should(DAEMON_UNIT, "LockPersonality", "yes"),
    should(DAEMON_UNIT, "MemoryDenyWriteExecute", "yes"),
    should(DAEMON_UNIT, "SystemCallArchitectures", "native"),
    should(DAEMON_UNIT, "SystemCallFilter", "@system-service"),
    socket(HELPER_SOCKET_UNIT, "FileDescriptorName", HELPER_SOCKET_NAME),
    socket(HELPER_SOCKET_UNIT, "SocketMode", "0600"),
    socket(HELPER_SOCKET_UNIT, "DirectoryMode", "0711"),
    socket(DAEMON_SOCKET_UNIT, "FileDescriptorName", DAEMON_SOCKET_NAME),
    socket(DAEMON_SOCKET_UNIT, "SocketMode", "0600"),
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

fn check_owner(owner: &UnitOwner, unit: &str) -> Result<()> {
    if owner.user.is_empty() || owner.user.chars().any(|c| c.is_whitespace() || c == '@') {
        return Err(Error::new(
            format!("rendering {unit}"),
            format!("owner name {:?} is not a valid user name", owner.user),
        ));
    }
    Ok(())
}

/// Renders `bangerd-root.socket` for `owner`.
pub fn render_helper_socket(layout: &Layout, owner: &UnitOwner) -> Result<String> {
    check_owner(owner, HELPER_SOCKET_UNIT)?;
    substitute(
        HELPER_SOCKET_TEMPLATE,
        &[
            (
                "HELPER_SOCKET",
                layout.helper_socket().display().to_string(),
            ),
            ("OWNER_USER", owner.user.clone()),
            ("OWNER_GID", owner.gid.to_string()),
        ],
        HELPER_SOCKET_UNIT,
    )
}

/// Renders `bangerd.socket` for `owner`.
pub fn render_daemon_socket(layout: &Layout, owner: &UnitOwner) -> Result<String> {
    check_owner(owner, DAEMON_SOCKET_UNIT)?;
    substitute(
        DAEMON_SOCKET_TEMPLATE,
        &[
            (
                "DAEMON_SOCKET",
                layout.daemon_socket().display().to_string(),
            ),
            ("OWNER_USER", owner.user.clone()),
            ("OWNER_GID", owner.gid.to_string()),
        ],
        DAEMON_SOCKET_UNIT,
    )
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
    check_owner(owner, DAEMON_UNIT)?;
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

/// All four units in [`ALL_UNITS`] order: `(unit name, contents)`.
pub fn render_all(layout: &Layout, owner: &UnitOwner) -> Result<Vec<(&'static str, String)>> {
    Ok(vec![
        (HELPER_SOCKET_UNIT, render_helper_socket(layout, owner)?),
        (HELPER_UNIT, render_helper(layout)?),
        (DAEMON_SOCKET_UNIT, render_daemon_socket(layout, owner)?),
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
                "# The listening socket is bangerd-root.socket's and outlives every restart of this service.",
                "Requires=bangerd-root.socket",
                "After=bangerd-root.socket network.target",
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
                "# Also keeps bangerd-root.socket's socket file there while the service is down.",
                "RuntimeDirectoryPreserve=yes",
                "UMask=0077",
                "NoNewPrivileges=yes",
                "# Only what the helper does: taps, the bridge and nftables (NET_ADMIN); files it makes for the",
                "# owner in the VM directories and the socket's owner (CHOWN, FOWNER, DAC_OVERRIDE); signals to the",
                "# owner's VMMs (KILL); starting each VMM as the owner (SETUID, SETGID).",
                "CapabilityBoundingSet=CAP_CHOWN CAP_DAC_OVERRIDE CAP_FOWNER CAP_KILL CAP_NET_ADMIN CAP_SETGID CAP_SETUID",
                "ProtectSystem=strict",
                "ReadWritePaths=/var/lib/banger",
                "# iptables-legacy takes this lock; \"-\" because it may not exist yet.",
                "ReadWritePaths=-/run/xtables.lock",
                "ProtectHome=yes",
                "ProtectKernelModules=yes",
                "ProtectKernelLogs=yes",
                "ProtectControlGroups=yes",
                "ProtectClock=yes",
                "# ProtectClock= limits devices to the pseudo devices (and the RTC, read-only): the helper opens",
                "# the tun device to make taps. VMMs open /dev/kvm from their own scopes, outside this unit.",
                "DeviceAllow=/dev/net/tun rw",
                "ProtectHostname=yes",
                "RestrictRealtime=yes",
                "RestrictSUIDSGID=yes",
                "LockPersonality=yes",
                "SystemCallArchitectures=native",
                "# VMMs inherit this sandbox (namespaces, seccomp): so no PrivateDevices= (/dev/kvm), no",
                "# MemoryDenyWriteExecute= (the test VMM's TCG engine generates code), no RestrictNamespaces=",
                "# (a jailer makes namespaces), no ProtectKernelTunables= (NAT sets net.ipv4.ip_forward).",
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
                "# The listening socket is bangerd.socket's and outlives every restart of this service.",
                "Requires=bangerd.socket",
                "Wants=bangerd-root.service",
                "After=bangerd.socket bangerd-root.service network.target",
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
                "# Also keeps bangerd.socket's socket file there while the service is down.",
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
                "# The daemon opens no device (the helper starts VMMs; image build runs as root in the CLI).",
                "PrivateDevices=yes",
                "ProtectKernelLogs=yes",
                "ProtectClock=yes",
                "ProtectHostname=yes",
                "RestrictRealtime=yes",
                "RestrictNamespaces=yes",
                "MemoryDenyWriteExecute=yes",
                "SystemCallArchitectures=native",
                "SystemCallFilter=@system-service",
                "SystemCallErrorNumber=EPERM",
                "",
                "[Install]",
                "WantedBy=multi-user.target",
            ],
        );
    }

    #[test]
    fn helper_socket_unit_line_by_line() {
        let got = render_helper_socket(&Layout::system(), &owner()).unwrap();
        assert!(got.ends_with('\n'));
        assert_lines(
            &got,
            &[
                "# bangerd-root.socket: the root helper's listening socket. systemd holds it, so it outlives every",
                "# restart of bangerd-root.service: a client that connects meanwhile waits instead of being refused.",
                "# Written by `sudo banger system install --owner USER`; the next install puts back any hand edit.",
                "# To customise, use a drop-in: systemctl edit bangerd-root.socket",
                "[Unit]",
                "Description=banger root helper socket",
                "",
                "[Socket]",
                "ListenStream=/run/banger-root/bangerd-root.sock",
                "FileDescriptorName=bangerd-root",
                "# Reachable by the owner only (and root); the helper also checks every peer with SO_PEERCRED.",
                "SocketUser=alice",
                "SocketGroup=1001",
                "SocketMode=0600",
                "DirectoryMode=0711",
                "",
                "[Install]",
                "WantedBy=sockets.target",
            ],
        );
    }

    #[test]
    fn daemon_socket_unit_line_by_line() {
        let got = render_daemon_socket(&Layout::system(), &owner()).unwrap();
        assert!(got.ends_with('\n'));
        assert_lines(
            &got,
            &[
                "# bangerd.socket: the owner daemon's listening socket. systemd holds it, so it outlives every",
                "# restart of bangerd.service (and `banger update`): a client that connects meanwhile waits",
                "# instead of being refused.",
                "# Written by `sudo banger system install --owner USER`; the next install puts back any hand edit.",
                "# To customise, use a drop-in: systemctl edit bangerd.socket",
                "[Unit]",
                "Description=banger owner daemon socket",
                "",
                "[Socket]",
                "ListenStream=/run/banger/bangerd.sock",
                "FileDescriptorName=bangerd",
                "# Reachable by the owner only (and root); the daemon also checks every peer with SO_PEERCRED.",
                "SocketUser=alice",
                "SocketGroup=1001",
                "SocketMode=0600",
                "DirectoryMode=0700",
                "",
                "[Install]",
                "WantedBy=sockets.target",
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
        let hs = render_helper_socket(&l, &owner()).unwrap();
        assert!(hs.contains("ListenStream=/tmp/r/run/banger-root/bangerd-root.sock\n"));
        let ds = render_daemon_socket(&l, &owner()).unwrap();
        assert!(ds.contains("ListenStream=/tmp/r/run/banger/bangerd.sock\n"));
    }

    #[test]
    fn rendered_units_carry_required_directives() {
        let all = render_all(&Layout::system(), &owner()).unwrap();
        assert_eq!(all.iter().map(|u| u.0).collect::<Vec<_>>(), ALL_UNITS);
        for (unit, text) in &all {
            let required: Vec<_> = REQUIRED_DIRECTIVES
                .iter()
                .filter(|d| d.unit == *unit)
                .collect();
            assert!(!required.is_empty(), "{unit}: nothing required");
            for r in required {
                assert_eq!(
                    directive(&[text], r.section, r.key).as_deref(),
                    Some(r.value),
                    "{unit} {}",
                    r.key
                );
            }
        }
        // Each service requires (and is ordered after) its socket, so it never starts without it.
        for service in [HELPER_UNIT, DAEMON_UNIT] {
            let text = &all.iter().find(|u| u.0 == service).unwrap().1;
            let socket = socket_of(service).unwrap();
            assert_eq!(
                directive(&[text], "Unit", "Requires").as_deref(),
                Some(socket)
            );
            assert!(directive(&[text], "Unit", "After")
                .unwrap()
                .split_whitespace()
                .any(|u| u == socket));
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
            assert!(
                render_helper_socket(&Layout::system(), &o).is_err(),
                "{bad:?}"
            );
            assert!(
                render_daemon_socket(&Layout::system(), &o).is_err(),
                "{bad:?}"
            );
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
