//! `banger doctor`: read-only health checks of this host and of the install.
//!
//! Owns the checks, their PASS/WARN/FAIL verdicts and both renderings (text rows, JSON). It never
//! writes, never migrates and never starts anything except `firecracker --version` (and only a
//! root-owned, not group/world-writable firecracker). A check that cannot be decided here (no
//! systemd, not installed, not root) says WARN with the reason; it never passes silently. The update
//! flow runs the new binary's doctor and rolls back on any FAIL, so FAIL means "banger is broken
//! here", not "something is unusual".

use std::ffi::OsStr;
use std::fmt::Write as _;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::install_toml;
use super::service::{self, ServiceManager};
use super::units;
use crate::buildinfo::BuildInfo;
use crate::layout::{Layout, DAEMON_UNIT, HELPER_UNIT};

/// A Firecracker version: `(major, minor, patch)`.
pub type FcVersion = (u32, u32, u32);

/// The Firecracker versions banger is tested with: `min <= v < max_exclusive`.
pub const TESTED_FIRECRACKER: (FcVersion, FcVersion) = ((1, 10, 0), (2, 0, 0));

/// The KVM device (a host device, not a layout path: a temp layout still runs on this host's KVM).
pub const KVM_DEVICE: &str = "/dev/kvm";

/// Where firecracker is looked for when it is not on `PATH`.
pub const FIRECRACKER_FALLBACK: &str = "/usr/local/bin/firecracker";

/// How long `firecracker --version` may take.
const VERSION_TIMEOUT: Duration = Duration::from_secs(5);

const HINT_INSTALL: &str = "run sudo banger system install --owner USER";

/// A check's verdict.
#[derive(Serialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "UPPERCASE")]
pub enum Level {
    /// Fine.
    Pass,
    /// Works, or cannot be checked here; the details say which and why.
    Warn,
    /// Broken: banger will not work correctly until this is fixed.
    Fail,
}

impl Level {
    /// `PASS`, `WARN` or `FAIL`.
    pub fn word(self) -> &'static str {
        match self {
            Level::Pass => "PASS",
            Level::Warn => "WARN",
            Level::Fail => "FAIL",
        }
    }
}

/// One row of the report.
#[derive(Serialize, Clone, Debug, PartialEq, Eq)]
pub struct Check {
    /// Verdict.
    pub level: Level,
    /// Short stable name, e.g. `units`.
    pub name: String,
    /// What was found and, when not PASS, what to do.
    pub details: Vec<String>,
}

impl Check {
    /// A check with a verdict and details.
    pub fn new(level: Level, name: impl Into<String>, details: Vec<String>) -> Self {
        Check {
            level,
            name: name.into(),
            details,
        }
    }
}

/// Inputs that tests (and the CLI) may override.
#[derive(Debug, Clone)]
pub struct DoctorOptions {
    /// Firecracker to check; `None` = `firecracker` on `PATH`, else [`FIRECRACKER_FALLBACK`].
    pub firecracker: Option<PathBuf>,
    /// The KVM device to check.
    pub kvm: PathBuf,
    /// Whether systemd runs this host (default: [`service::systemd_running`]).
    pub systemd: bool,
    /// Rows supplied by the caller (e.g. the state store check), spliced in after `version`.
    pub extra: Vec<Check>,
    /// The tun clone device the owner's VMMs open.
    pub tun: PathBuf,
    /// The ssh client to check (default: `ssh` on `PATH`, which `banger vm ssh` runs).
    pub ssh: Option<PathBuf>,
}

impl Default for DoctorOptions {
    fn default() -> Self {
        DoctorOptions {
            firecracker: None,
            kvm: PathBuf::from(KVM_DEVICE),
            systemd: service::systemd_running(),
            extra: vec![],
            tun: PathBuf::from(crate::net::tap::TUN_DEVICE),
            ssh: None,
        }
    }
}

/// Runs every check, in a fixed order: architecture, version, `opts.extra`, units, unit
/// directives, sockets, kvm, firecracker, ssh, snapshots (only when one cannot be restored), network,
/// update.
pub fn run(layout: &Layout, svc: &dyn ServiceManager, opts: &DoctorOptions) -> Vec<Check> {
    let install = install_toml::load(layout);
    let owner_uid = match &install {
        Ok(Some(i)) => Some(i.owner_uid),
        _ => None,
    };
    let mut checks = vec![
        check_architecture(std::env::consts::ARCH),
        check_version(&install, &BuildInfo::current()),
    ];
    checks.extend(opts.extra.iter().cloned());
    let installed = owner_uid.is_some();
    checks.push(check_units(layout, svc, installed, opts.systemd));
    checks.push(check_unit_directives(layout, installed));
    checks.push(check_sockets(layout, owner_uid));
    let owner = match &install {
        Ok(Some(i)) => Some((i.owner_uid, i.owner_gid, i.owner_user.clone())),
        _ => None,
    };
    checks.push(with_owner_kvm(
        check_kvm(&opts.kvm),
        &opts.kvm,
        owner.clone(),
    ));
    checks.push(check_firecracker(opts.firecracker.as_deref()));
    checks.push(check_ssh(layout, owner_uid, opts.ssh.as_deref()));
    if let Some(c) = check_snapshots(layout, opts.firecracker.as_deref()) {
        checks.push(c);
    }
    checks.push(check_network(
        &NetFacts::gather(layout, &opts.tun),
        owner.as_ref(),
    ));
    checks.push(check_update(layout));
    checks
}

/// An update journal that does not end is an update a crash interrupted: FAIL with the command
/// that finishes or rolls it back. While `banger update` runs (it holds the update lock; this is
/// also how the new binary's doctor sees it mid-update) the same journal is only a WARN.
fn check_update(layout: &Layout) -> Check {
    use crate::update::journal::{self, Journal};
    let name = "update";
    let path = journal::path(layout);
    let records = match Journal::read(layout) {
        Ok(r) => r,
        Err(e) if e.why.contains("Permission denied") => {
            return Check::new(
                Level::Warn,
                name,
                vec![
                    format!("cannot read {} as this user", path.display()),
                    "run sudo banger doctor to check for an interrupted update".into(),
                ],
            )
        }
        Err(e) => {
            return Check::new(
                Level::Fail,
                name,
                vec![
                    e.to_string(),
                    "inspect it, then run sudo banger update".into(),
                ],
            )
        }
    };
    if journal::is_finished(&records) {
        return Check::new(Level::Pass, name, vec!["no interrupted update".into()]);
    }
    let what = records
        .first()
        .and_then(|r| r.info.as_ref())
        .map(|i| format!("v{} -> v{}", i.from, i.to))
        .unwrap_or_else(|| "of unknown versions".into());
    if crate::update::flow::update_in_progress(layout) {
        return Check::new(
            Level::Warn,
            name,
            vec![
                format!("an update {what} is in progress ({})", path.display()),
                "let it finish; run banger doctor again afterwards".into(),
            ],
        );
    }
    Check::new(
        Level::Fail,
        name,
        vec![
            format!(
                "an update {what} was interrupted (journal {})",
                path.display()
            ),
            "run sudo banger update to finish or roll it back".into(),
        ],
    )
}

/// True when any check failed (the CLI exits 1).
pub fn any_fail(checks: &[Check]) -> bool {
    checks.iter().any(|c| c.level == Level::Fail)
}

/// Rows `PASS name` with details indented two spaces below; the level word is coloured only when
/// `color` is set.
pub fn render_text(checks: &[Check], color: bool) -> String {
    use crate::termsafe::plain;
    let mut out = String::new();
    for c in checks {
        let word = c.level.word();
        if color {
            let code = match c.level {
                Level::Pass => "32",
                Level::Warn => "33",
                Level::Fail => "31",
            };
            let _ = writeln!(out, "\x1b[{code}m{word}\x1b[0m {}", plain(&c.name));
        } else {
            let _ = writeln!(out, "{word} {}", plain(&c.name));
        }
        // Details quote the daemon, systemd and the journal: escaped for the terminal.
        for d in &c.details {
            let _ = writeln!(out, "  {}", plain(d));
        }
    }
    out
}

/// `{"ok": <no FAIL>, "checks": [{"level": "PASS", "name": …, "details": […]}, …]}`.
pub fn render_json(checks: &[Check]) -> String {
    serde_json::json!({ "ok": !any_fail(checks), "checks": checks }).to_string()
}

/// Whether to colour output: only on a TTY, never when `NO_COLOR` is set (any value) or
/// `TERM=dumb`.
pub fn use_color(is_tty: bool) -> bool {
    use_color_from(
        is_tty,
        std::env::var_os("NO_COLOR").is_some(),
        std::env::var_os("TERM").as_deref(),
    )
}

fn use_color_from(is_tty: bool, no_color: bool, term: Option<&OsStr>) -> bool {
    is_tty && !no_color && term != Some(OsStr::new("dumb"))
}

// ---- checks ----

fn check_architecture(arch: &str) -> Check {
    if arch == "x86_64" {
        Check::new(Level::Pass, "architecture", vec![arch.to_string()])
    } else {
        Check::new(
            Level::Fail,
            "architecture",
            vec![format!("{arch}: banger supports x86_64 hosts only")],
        )
    }
}

fn short(commit: &str) -> String {
    commit.chars().take(8).collect()
}

fn describe(b: &BuildInfo) -> String {
    format!(
        "v{} (commit {}, built {})",
        b.version,
        short(&b.commit),
        b.built_at
    )
}

/// Drift is a WARN, not a FAIL: during `banger update` the new binary's doctor runs before
/// install.toml is recorded, and a development build run from elsewhere is not a broken install.
fn check_version(
    install: &crate::error::Result<Option<install_toml::InstallInfo>>,
    running: &BuildInfo,
) -> Check {
    let name = "version";
    match install {
        Ok(None) => Check::new(
            Level::Warn,
            name,
            vec![
                format!("running {}; banger is not installed", describe(running)),
                HINT_INSTALL.to_string(),
            ],
        ),
        Err(e) => Check::new(Level::Fail, name, vec![e.to_string()]),
        Ok(Some(info)) if info.build() == *running => {
            Check::new(Level::Pass, name, vec![describe(running)])
        }
        Ok(Some(info)) => Check::new(
            Level::Warn,
            name,
            vec![
                format!("running:   {}", describe(running)),
                format!("installed: {}", describe(&info.build())),
                format!(
                    "if an update is in progress this is expected; otherwise run sudo banger system install --owner {}",
                    info.owner_user
                ),
            ],
        ),
    }
}

fn not_installed(name: &str) -> Check {
    Check::new(
        Level::Warn,
        name,
        vec![
            "banger is not installed; nothing to check".to_string(),
            HINT_INSTALL.to_string(),
        ],
    )
}

fn check_units(layout: &Layout, svc: &dyn ServiceManager, installed: bool, systemd: bool) -> Check {
    let name = "units";
    if !installed {
        return not_installed(name);
    }
    let mut level = Level::Pass;
    let mut details = vec![];
    for unit in units::ALL_UNITS {
        let path = layout.unit_file(unit);
        if !path.is_file() {
            if units::is_socket(unit) {
                // An install from before socket activation: it works, but each restart refuses
                // clients for a moment. Not a FAIL: an update (which keeps the units) must not
                // roll back over it.
                level = level.max(Level::Warn);
                details.push(format!(
                    "{unit}: {} is missing, so clients are refused while the daemons restart (run sudo banger system install to add it)",
                    path.display()
                ));
            } else {
                level = level.max(Level::Fail);
                details.push(format!(
                    "{unit}: {} is missing ({HINT_INSTALL})",
                    path.display()
                ));
            }
            continue;
        }
        if !systemd {
            level = level.max(Level::Warn);
            details.push(format!(
                "{unit}: present; systemd is not running on this host (no /run/systemd/system), so whether it is active cannot be checked"
            ));
            continue;
        }
        match svc.is_active(unit) {
            Ok(true) => details.push(format!("{unit}: active")),
            Ok(false) => {
                level = level.max(Level::Fail);
                details.push(format!(
                    "{unit}: not active (run sudo banger system restart; see journalctl -u {unit})"
                ));
            }
            Err(e) => {
                level = level.max(Level::Fail);
                details.push(format!("{unit}: {e}"));
            }
        }
    }
    Check::new(level, name, details)
}

fn check_unit_directives(layout: &Layout, installed: bool) -> Check {
    let name = "unit directives";
    if !installed {
        return not_installed(name);
    }
    let mut level = Level::Pass;
    let mut details = vec![];
    for unit in units::ALL_UNITS {
        let path = layout.unit_file(unit);
        let texts = match units::read_with_dropins(&path) {
            Ok(Some(t)) => t,
            // The units check already reports a missing unit file, at the right level.
            Ok(None) => continue,
            Err(e) => {
                level = Level::Fail;
                details.push(format!("{unit}: {e}"));
                continue;
            }
        };
        let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
        let mut good = vec![];
        for r in units::REQUIRED_DIRECTIVES.iter().filter(|d| d.unit == unit) {
            let (key, want) = (r.key, r.value);
            match units::directive(&texts, r.section, key) {
                Some(v) if v == want => good.push(format!("{key}={want}")),
                got => {
                    let got = got.as_deref().unwrap_or("<unset>").to_string();
                    match r.need {
                        units::Need::Must => {
                            level = Level::Fail;
                            details.push(format!(
                                "{unit}: {key}={got}, expected {key}={want} (running VMs are at risk on restart; run sudo banger system install to put the unit back and check its drop-ins)"
                            ));
                        }
                        units::Need::Should => {
                            level = level.max(Level::Warn);
                            details.push(format!(
                                "{unit}: {key}={got}, expected {key}={want} (weaker than banger's unit; run sudo banger system install to put the unit back and check its drop-ins)"
                            ));
                        }
                    }
                }
            }
        }
        if !good.is_empty() {
            details.push(format!("{unit}: {}", good.join(" ")));
        }
    }
    Check::new(level, name, details)
}

/// What kind of file a runtime path must be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Socket,
    Dir,
}

/// Checks one runtime path: kind, exact permission bits, owner uid. `Ok(summary)` or `Err(problem)`.
fn check_node(path: &Path, kind: Kind, mode: u32, uid: u32) -> Result<String, String> {
    let shown = path.display();
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(format!("{shown}: missing")),
        Err(e) => return Err(format!("{shown}: {e}")),
    };
    let ft = meta.file_type();
    let kind_ok = match kind {
        Kind::Socket => ft.is_socket(),
        Kind::Dir => ft.is_dir(),
    };
    if !kind_ok {
        let want = match kind {
            Kind::Socket => "a socket",
            Kind::Dir => "a directory",
        };
        return Err(format!("{shown}: not {want}"));
    }
    let (got_mode, got_uid) = (meta.mode() & 0o7777, meta.uid());
    let mut problems = vec![];
    if got_mode != mode {
        problems.push(format!("mode {got_mode:04o}, expected {mode:04o}"));
    }
    if got_uid != uid {
        problems.push(format!("owner uid {got_uid}, expected {uid}"));
    }
    if problems.is_empty() {
        Ok(format!("{shown}: {mode:04o} uid {uid}"))
    } else {
        Err(format!("{shown}: {}", problems.join(", ")))
    }
}

fn check_sockets(layout: &Layout, owner_uid: Option<u32>) -> Check {
    let name = "sockets";
    let Some(owner) = owner_uid else {
        return not_installed(name);
    };
    let mut level = Level::Pass;
    let mut details = vec![];
    for (path, kind, mode, uid, unit) in [
        (
            layout.daemon_socket(),
            Kind::Socket,
            0o600,
            owner,
            DAEMON_UNIT,
        ),
        (layout.helper_run_dir(), Kind::Dir, 0o711, 0, HELPER_UNIT),
        (
            layout.helper_socket(),
            Kind::Socket,
            0o600,
            owner,
            HELPER_UNIT,
        ),
    ] {
        match check_node(&path, kind, mode, uid) {
            Ok(s) => details.push(s),
            Err(p) => {
                level = Level::Fail;
                details.push(format!(
                    "{p} (run sudo banger system restart; see journalctl -u {unit})"
                ));
            }
        }
    }
    Check::new(level, name, details)
}

fn check_kvm(kvm: &Path) -> Check {
    let name = "kvm";
    let shown = kvm.display();
    let hint = "enable virtualization (VT-x/AMD-V) in firmware and load kvm_intel or kvm_amd";
    let meta = match fs::metadata(kvm) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Check::new(
                Level::Fail,
                name,
                vec![format!("{shown}: missing ({hint})")],
            );
        }
        Err(e) => return Check::new(Level::Fail, name, vec![format!("{shown}: {e}")]),
    };
    if !meta.file_type().is_char_device() {
        return Check::new(
            Level::Fail,
            name,
            vec![format!("{shown}: not a character device ({hint})")],
        );
    }
    // Opening is the only test that also sees device-cgroup denials (containers); it writes nothing.
    match fs::OpenOptions::new().read(true).write(true).open(kvm) {
        Ok(_) => Check::new(Level::Pass, name, vec![format!("{shown}: read/write")]),
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied && !is_root() => Check::new(
            Level::Warn,
            name,
            vec![format!(
                "{shown}: this uid ({}) cannot open it (run sudo banger doctor for the full check of what the VMMs can open)",
                rustix::process::geteuid().as_raw()
            )],
        ),
        Err(e) => Check::new(
            Level::Fail,
            name,
            vec![format!("{shown}: cannot open read/write: {e}")],
        ),
    }
}

/// Whether the owner — whom the helper runs every VMM as, with /dev/kvm's group added when that
/// group is not root — may open `/dev/kvm` read/write, judged from its owner, group and mode.
pub fn owner_can_use_kvm(
    dev_uid: u32,
    dev_gid: u32,
    mode: u32,
    owner_uid: u32,
    owner_gid: u32,
) -> bool {
    let rw = |bits: u32| mode & bits == bits;
    (dev_uid == owner_uid && rw(0o600))
        || ((dev_gid == owner_gid || dev_gid != 0) && rw(0o060))
        || rw(0o006)
}

/// Downgrades a passing kvm row when the owner's VMMs could not open the device.
fn with_owner_kvm(check: Check, kvm: &Path, owner: Option<(u32, u32, String)>) -> Check {
    let (Some((uid, gid, user)), Ok(m)) = (owner, fs::metadata(kvm)) else {
        return check;
    };
    if check.level == Level::Fail || owner_can_use_kvm(m.uid(), m.gid(), m.mode(), uid, gid) {
        return check;
    }
    Check::new(
        Level::Fail,
        "kvm",
        vec![format!(
            "{}: VMMs run as {user} (uid {uid}), who cannot open it (owner {}, group {}, mode {:o}); give it a kvm group: groupadd -r kvm; chgrp kvm {0}; chmod 0660 {0} (udev does this on most distributions)",
            kvm.display(),
            m.uid(),
            m.gid(),
            m.mode() & 0o777
        )],
    )
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// A host IPv4 route: device, destination, prefix length.
pub type Route = (String, std::net::Ipv4Addr, u8);

/// Parses `/proc/net/route` (the calling process's namespace; main table): hex fields in host
/// byte order (x86_64: little-endian).
pub fn parse_proc_route(text: &str) -> Vec<Route> {
    let hex = |s: &str| u32::from_str_radix(s, 16).ok();
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let (dev, dst, mask) = (f.first()?, hex(f.get(1)?)?, hex(f.get(7)?)?);
            Some((
                dev.to_string(),
                std::net::Ipv4Addr::from(dst.to_le_bytes()),
                u8::try_from(mask.count_ones()).ok()?,
            ))
        })
        .collect()
}

/// Whether the owner's VMMs (owner uid, owner gid) may open the tun device read/write.
pub fn owner_can_open_tun(
    dev_uid: u32,
    dev_gid: u32,
    mode: u32,
    owner_uid: u32,
    owner_gid: u32,
) -> bool {
    let rw = |bits: u32| mode & bits == bits;
    (dev_uid == owner_uid && rw(0o600)) || (dev_gid == owner_gid && rw(0o060)) || rw(0o006)
}

/// What the `network` row looks at, gathered read-only (separate from the verdict for tests).
#[derive(Debug)]
pub struct NetFacts {
    /// `[network]` of config.toml.
    pub config: crate::error::Result<crate::net::NetConfig>,
    /// Host routes, or why they could not be read.
    pub routes: Result<Vec<Route>, String>,
    /// Interfaces, or why they could not be listed.
    pub links: Result<Vec<crate::net::link::Link>, String>,
    /// `net.ipv4.ip_forward`.
    pub ip_forward: Result<bool, String>,
    /// `inet banger` as nft shows it; `None` when not root (nft cannot list).
    pub table: Option<Result<crate::net::nft::TableState, String>>,
    /// The tun device's (uid, gid, mode), or why not.
    pub tun: Result<(u32, u32, u32), String>,
    /// The tun device's path.
    pub tun_path: PathBuf,
}

impl NetFacts {
    /// Reads everything; never writes.
    pub fn gather(layout: &Layout, tun: &Path) -> NetFacts {
        use crate::net::{forward, link, nft};
        NetFacts {
            config: crate::net::NetConfig::load(layout),
            routes: fs::read_to_string("/proc/net/route")
                .map(|t| parse_proc_route(&t))
                .map_err(|e| format!("reading /proc/net/route: {e}")),
            links: link::all().map_err(|e| e.to_string()),
            ip_forward: forward::read(Path::new(forward::IP_FORWARD)).map_err(|e| e.to_string()),
            table: is_root().then(|| nft::read().map_err(|e| e.to_string())),
            tun: fs::metadata(tun)
                .map(|m| (m.uid(), m.gid(), m.mode()))
                .map_err(|e| format!("{}: {e}", tun.display())),
            tun_path: tun.to_path_buf(),
        }
    }
}

/// The `network` row: config valid, subnet clear of host routes, bridge present and up (absent is
/// a WARN while no VM runs: it is created with the first), ip_forward on while a NAT VM runs,
/// banger's nftables table present and current while any VM runs, the tun device openable by the
/// owner.
pub fn check_network(f: &NetFacts, owner: Option<&(u32, u32, String)>) -> Check {
    use crate::net::{names::TAP_PREFIX, plumb};
    let name = "network";
    let cfg = match &f.config {
        Ok(c) => c,
        Err(e) => return Check::new(Level::Fail, name, vec![e.to_string()]),
    };
    let (b, sn) = (cfg.bridge.as_str(), cfg.subnet);
    let mut level = Level::Pass;
    let mut d = vec![format!("bridge {b}, subnet {sn}")];
    let mut raise = |l: Level, msg: String, d: &mut Vec<String>| {
        level = level.max(l);
        d.push(msg);
    };
    match &f.routes {
        Ok(routes) => {
            for (dev, net, p) in routes {
                if *p > 0 && dev != b && sn.overlaps(*net, *p) {
                    raise(
                        Level::Fail,
                        format!(
                            "subnet {sn} overlaps the host route {net}/{p} on {dev}; set network.subnet in /etc/banger/config.toml to a free private range"
                        ),
                        &mut d,
                    );
                }
            }
        }
        Err(e) => raise(
            Level::Warn,
            format!("cannot check host routes: {e}"),
            &mut d,
        ),
    }
    let links = match &f.links {
        Ok(l) => l.as_slice(),
        Err(e) => {
            raise(Level::Fail, format!("cannot list interfaces: {e}"), &mut d);
            &[]
        }
    };
    let taps: Vec<_> = links
        .iter()
        .filter(|l| l.name.starts_with(TAP_PREFIX) && l.kind.as_deref() == Some("tun"))
        .collect();
    let nat_vms = taps
        .iter()
        .filter(|t| {
            t.alias
                .as_deref()
                .and_then(plumb::parse_alias)
                .is_some_and(|a| a.nat)
        })
        .count();
    let running = !taps.is_empty();
    match links.iter().find(|l| l.name == b) {
        _ if f.links.is_err() => {}
        None if running => raise(
            Level::Fail,
            format!("bridge {b} is missing while {} VM tap(s) exist; restart those VMs", taps.len()),
            &mut d,
        ),
        None => raise(
            Level::Warn,
            format!("bridge {b} is absent (it is created when the first VM starts)"),
            &mut d,
        ),
        Some(l) if l.kind.as_deref() != Some("bridge") => raise(
            Level::Fail,
            format!(
                "{b} exists and is not a bridge; remove it (sudo ip link del {b}) or set another network.bridge"
            ),
            &mut d,
        ),
        Some(l) => {
            let gw = (sn.gateway(), sn.prefix());
            if !l.ipv4.contains(&gw) {
                raise(
                    Level::Fail,
                    format!("bridge {b} lacks its address {}/{}; start a VM to restore it", gw.0, gw.1),
                    &mut d,
                );
            }
            if l.up {
                d.push(format!("bridge {b} is up; {} VM tap(s), {nat_vms} with NAT", taps.len()));
            } else {
                raise(
                    if running { Level::Fail } else { Level::Warn },
                    format!("bridge {b} is down (sudo ip link set dev {b} up)"),
                    &mut d,
                );
            }
        }
    }
    match &f.ip_forward {
        Ok(true) => d.push("net.ipv4.ip_forward = 1".into()),
        Ok(false) if nat_vms > 0 => raise(
            Level::Fail,
            format!(
                "net.ipv4.ip_forward = 0 while {nat_vms} NAT VM(s) run: their traffic is not forwarded (restart them, or sudo sysctl -w net.ipv4.ip_forward=1)"
            ),
            &mut d,
        ),
        Ok(false) => d.push("net.ipv4.ip_forward = 0 (no NAT VM runs)".into()),
        Err(e) => raise(Level::Warn, e.clone(), &mut d),
    }
    match &f.table {
        None if running => raise(
            Level::Warn,
            "cannot read nftables as this user; run sudo banger doctor to check table inet banger".into(),
            &mut d,
        ),
        None => {}
        Some(Err(e)) => raise(
            if running { Level::Fail } else { Level::Warn },
            format!("{e} (install nftables: sudo apt-get install nftables)"),
            &mut d,
        ),
        Some(Ok(st)) if running && !st.rules_current(b) => raise(
            Level::Fail,
            format!(
                "table inet banger is {} while VMs run: guests are not kept off the host; start a VM to restore it",
                if st.present { "not banger's current ruleset" } else { "missing" }
            ),
            &mut d,
        ),
        Some(Ok(st)) if st.nat.len() < nat_vms => raise(
            Level::Fail,
            format!(
                "{nat_vms} NAT VM(s) run but table inet banger holds {} NAT address(es); restart them",
                st.nat.len()
            ),
            &mut d,
        ),
        Some(Ok(st)) if st.present => {
            d.push(format!("table inet banger present, {} NAT address(es)", st.nat.len()))
        }
        Some(Ok(_)) => d.push("table inet banger absent (created when the first VM starts)".into()),
    }
    let tun = f.tun_path.display();
    match (&f.tun, owner) {
        (Err(e), _) => raise(Level::Fail, format!("{e} (sudo modprobe tun)"), &mut d),
        (Ok((u, g, m)), Some((ou, og, user))) if !owner_can_open_tun(*u, *g, *m, *ou, *og) => raise(
            Level::Fail,
            format!(
                "VMMs run as {user} (uid {ou}), who cannot open {tun} (owner {u}, group {g}, mode {:o}); fix: sudo chmod 0666 {tun} (Debian's default, set by udev)",
                m & 0o777
            ),
            &mut d,
        ),
        (Ok((_, _, m)), _) => d.push(format!("{tun}: mode {:o}", m & 0o777)),
    }
    Check::new(level, name, d)
}

/// Parses `firecracker --version` output (`Firecracker v1.16.1`) into `(major, minor, patch)`.
/// A pre-release suffix (`1.7.0-dev`) is ignored.
pub fn parse_firecracker_version(text: &str) -> Option<FcVersion> {
    for line in text.lines() {
        let mut words = line.split_whitespace();
        while let Some(w) = words.next() {
            if !w.eq_ignore_ascii_case("firecracker") {
                continue;
            }
            let v = words.next()?;
            let v = v.strip_prefix('v').unwrap_or(v);
            let mut parts = v.splitn(3, '.');
            let major = parts.next()?.parse().ok()?;
            let minor = parts.next()?.parse().ok()?;
            let patch_str = parts.next()?;
            let digits: String = patch_str.chars().take_while(char::is_ascii_digit).collect();
            let patch = digits.parse().ok()?;
            return Some((major, minor, patch));
        }
    }
    None
}

fn vstr(v: FcVersion) -> String {
    format!("{}.{}.{}", v.0, v.1, v.2)
}

/// Verdict on a firecracker version: below the tested range FAILs (API features may be missing),
/// at or above its end WARNs (likely fine, not tested).
fn classify_firecracker(v: FcVersion) -> (Level, String) {
    let (min, max) = TESTED_FIRECRACKER;
    let range = format!(
        "tested range {} up to (not including) {}",
        vstr(min),
        vstr(max)
    );
    if v < min {
        (
            Level::Fail,
            format!(
                "version v{} is older than the {range}; upgrade firecracker",
                vstr(v)
            ),
        )
    } else if v >= max {
        (
            Level::Warn,
            format!("version v{} is newer than the {range}", vstr(v)),
        )
    } else {
        (Level::Pass, format!("version v{} ({range})", vstr(v)))
    }
}

/// Problems with a firecracker file's owner and mode: the root helper executes it.
fn firecracker_file_problems(uid: u32, mode: u32) -> Vec<String> {
    let mut p = vec![];
    if uid != 0 {
        p.push(format!("owned by uid {uid}, must be owned by root"));
    }
    if mode & 0o022 != 0 {
        p.push(format!(
            "mode {:04o} is group/world-writable",
            mode & 0o7777
        ));
    }
    if mode & 0o111 == 0 {
        p.push(format!("mode {:04o} is not executable", mode & 0o7777));
    }
    p
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn check_firecracker(explicit: Option<&Path>) -> Check {
    let name = "firecracker";
    let (min, max) = TESTED_FIRECRACKER;
    let get = format!(
        "install Firecracker v{} or later, below v{}, from https://github.com/firecracker-microvm/firecracker/releases into {FIRECRACKER_FALLBACK}",
        vstr(min),
        vstr(max)
    );
    let path = match explicit {
        Some(p) => p.to_path_buf(),
        None => match find_on_path("firecracker") {
            Some(p) => p,
            None => PathBuf::from(FIRECRACKER_FALLBACK),
        },
    };
    let shown = path.display().to_string();
    let meta = match fs::metadata(&path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let where_ = if explicit.is_some() {
                shown.clone()
            } else {
                format!("on PATH or at {FIRECRACKER_FALLBACK}")
            };
            return Check::new(
                Level::Fail,
                name,
                vec![format!("not found {where_} ({get})")],
            );
        }
        Err(e) => return Check::new(Level::Fail, name, vec![format!("{shown}: {e}")]),
    };
    let mut details = vec![format!("path: {shown}")];
    let problems = firecracker_file_problems(meta.uid(), meta.mode());
    if !problems.is_empty() {
        // Never execute a binary someone other than root could have replaced.
        details.extend(problems.into_iter().map(|p| format!("{shown}: {p}")));
        details.push(format!(
            "fix with: sudo chown root:root {shown} && sudo chmod 0755 {shown}"
        ));
        return Check::new(Level::Fail, name, details);
    }
    details.push(format!("owner root, mode {:04o}", meta.mode() & 0o7777));
    let output = match version_output(&path) {
        Ok(o) => o,
        Err(e) => {
            details.push(format!("running {shown} --version: {e}"));
            return Check::new(Level::Fail, name, details);
        }
    };
    match parse_firecracker_version(&output) {
        None => {
            let first = output.lines().next().unwrap_or("").trim();
            details.push(format!(
                "cannot read a version from `{shown} --version` (first line: {first:?})"
            ));
            Check::new(Level::Fail, name, details)
        }
        Some(v) => {
            let (level, line) = classify_firecracker(v);
            details.push(line);
            Check::new(level, name, details)
        }
    }
}

/// The ssh row: the client `banger vm ssh` runs (on `PATH`, OpenSSH, its version) and, once
/// banger is installed, banger's private key (the owner's, mode 0600: ssh refuses a key others can
/// read). No client is a WARN (only getting into VMs needs it); a key ssh would refuse is a FAIL.
/// Like firecracker, the client is only run when root owns it and nobody else can write it.
fn check_ssh(layout: &Layout, owner_uid: Option<u32>, explicit: Option<&Path>) -> Check {
    let name = "ssh";
    let (mut level, client) = ssh_client(
        explicit
            .map(Path::to_path_buf)
            .or_else(|| find_on_path("ssh")),
    );
    let mut details = vec![client];
    let Some(uid) = owner_uid else {
        details.push("key: none to check (banger is not installed)".into());
        return Check::new(level, name, details);
    };
    let key = layout.ssh_key();
    let shown = key.display();
    match fs::symlink_metadata(&key) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => details.push(format!(
            "key: {shown} not made yet (the daemon makes it when it creates the first VM)"
        )),
        Err(e) => {
            level = level.max(Level::Warn);
            details.push(format!(
                "key: cannot check {shown} as this user: {e} (run `banger doctor` as the owner or root)"
            ));
        }
        Ok(m) if !m.file_type().is_file() => {
            level = Level::Fail;
            details.push(format!(
                "key: {shown} is not a regular file (move it aside; the daemon makes a new key, then recreate your VMs)"
            ));
        }
        Ok(m) => {
            let mode = m.mode() & 0o7777;
            let mut problems = vec![];
            if m.uid() != uid {
                problems.push(format!(
                    "owned by uid {}, not the owner (uid {uid}), whose ssh must read it (fix with: sudo chown {uid} {shown})",
                    m.uid()
                ));
            }
            if mode & 0o077 != 0 {
                problems.push(format!(
                    "mode {mode:04o}: ssh refuses a private key others can read (if you trust it: chmod 600 {shown}; otherwise delete it and recreate your VMs)"
                ));
            }
            if problems.is_empty() {
                details.push(format!("key: {shown} (owner uid {uid}, mode {mode:04o})"));
            } else {
                level = Level::Fail;
                details.extend(problems.into_iter().map(|p| format!("key: {shown}: {p}")));
            }
        }
    }
    Check::new(level, name, details)
}

/// The client half of the ssh row: its verdict and detail line.
fn ssh_client(path: Option<PathBuf>) -> (Level, String) {
    let install = "`banger vm ssh`, `vm exec` and `vm run` need OpenSSH's client: sudo apt-get install openssh-client";
    let Some(path) = path else {
        return (Level::Warn, format!("client: no `ssh` on PATH ({install})"));
    };
    let shown = path.display().to_string();
    let meta = match fs::metadata(&path) {
        Ok(m) => m,
        Err(e) => return (Level::Warn, format!("client: {shown}: {e} ({install})")),
    };
    let problems = firecracker_file_problems(meta.uid(), meta.mode());
    if !problems.is_empty() {
        return (
            Level::Warn,
            format!(
                "client: {shown}: not run: {} (fix with: sudo chown root:root {shown} && sudo chmod 0755 {shown})",
                problems.join(", ")
            ),
        );
    }
    match bounded_output(&path, "-V", Stream::Stderr) {
        Ok(out) => {
            let first = out.lines().next().unwrap_or("").trim();
            if first.starts_with("OpenSSH_") {
                (Level::Pass, format!("client: {shown} ({first})"))
            } else {
                (
                    Level::Warn,
                    format!(
                        "client: {shown} is not OpenSSH (`ssh -V` says {first:?}); banger passes OpenSSH options ({install})"
                    ),
                )
            }
        }
        Err(e) => (Level::Warn, format!("client: running {shown} -V: {e}")),
    }
}

/// Which output of a child [`bounded_output`] returns.
#[derive(Clone, Copy)]
enum Stream {
    Stdout,
    Stderr,
}

/// Snapshots written by another Firecracker than the installed one cannot be restored (issue 12):
/// one line per such snapshot, empty when all match or nothing can be told (no VMM, no database).
/// Also printed by `banger update`.
pub fn snapshot_version_warnings(layout: &Layout, explicit: Option<&Path>) -> Vec<String> {
    let path = match explicit {
        Some(p) => p.to_path_buf(),
        None => find_on_path("firecracker").unwrap_or_else(|| PathBuf::from(FIRECRACKER_FALLBACK)),
    };
    let Ok(meta) = fs::metadata(&path) else {
        return vec![];
    };
    if !firecracker_file_problems(meta.uid(), meta.mode()).is_empty() {
        return vec![];
    }
    let Some(installed) = version_output(&path)
        .ok()
        .and_then(|o| parse_firecracker_version(&o))
        .map(vstr)
    else {
        return vec![];
    };
    let Ok(conn) = crate::store::open_read_only(&layout.state_db()) else {
        return vec![];
    };
    let rows: Vec<(String, String)> = conn
        .prepare("SELECT name, firecracker_version FROM snapshots ORDER BY name")
        .and_then(|mut st| {
            st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                .and_then(|it| it.collect())
        })
        .unwrap_or_default();
    rows.into_iter()
        .filter(|(_, v)| *v != installed)
        .map(|(name, v)| {
            format!(
                "snapshot `{name}` was written by Firecracker {v}, the installed one is {installed}: it cannot be restored (reinstall {v}, or `banger snapshot rm {name}`)"
            )
        })
        .collect()
}

fn check_snapshots(layout: &Layout, explicit: Option<&Path>) -> Option<Check> {
    let w = snapshot_version_warnings(layout, explicit);
    (!w.is_empty()).then(|| Check::new(Level::Warn, "snapshots", w))
}

/// Runs `path --version` with a bounded wait; returns stdout.
fn version_output(path: &Path) -> Result<String, String> {
    bounded_output(path, "--version", Stream::Stdout)
}

/// Runs `path arg` with a bounded wait; returns the chosen stream (the first 64 KiB).
fn bounded_output(path: &Path, arg: &str, stream: Stream) -> Result<String, String> {
    let mut child = spawn_retrying(path, arg, stream)?;
    let started = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if started.elapsed() >= VERSION_TIMEOUT => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("no answer within {}s", VERSION_TIMEOUT.as_secs()));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => return Err(e.to_string()),
        }
    }
    let mut out = Vec::new();
    let pipe: Option<Box<dyn Read>> = match stream {
        Stream::Stdout => child.stdout.take().map(|s| Box::new(s) as Box<dyn Read>),
        Stream::Stderr => child.stderr.take().map(|s| Box::new(s) as Box<dyn Read>),
    };
    if let Some(s) = pipe {
        s.take(64 * 1024)
            .read_to_end(&mut out)
            .map_err(|e| e.to_string())?;
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// Spawns, retrying briefly on ETXTBSY (a just-written file whose write fd another thread's fork
/// briefly inherited).
fn spawn_retrying(path: &Path, arg: &str, stream: Stream) -> Result<std::process::Child, String> {
    let pipe = |s: Stream| match (s, stream) {
        (Stream::Stdout, Stream::Stdout) | (Stream::Stderr, Stream::Stderr) => Stdio::piped(),
        _ => Stdio::null(),
    };
    let mut tries = 0;
    loop {
        let r = Command::new(path)
            .arg(arg)
            .stdin(Stdio::null())
            .stdout(pipe(Stream::Stdout))
            .stderr(pipe(Stream::Stderr))
            .spawn();
        match r {
            Ok(c) => return Ok(c),
            Err(e)
                if e.raw_os_error() == Some(rustix::io::Errno::TXTBSY.raw_os_error())
                    && tries < 20 =>
            {
                tries += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::system::install_toml::InstallInfo;
    use crate::system::service::FakeServices;
    use crate::system::testutil::TempDir;
    use std::os::unix::fs::PermissionsExt;

    fn euid() -> u32 {
        rustix::process::geteuid().as_raw()
    }

    fn info_for(uid: u32) -> InstallInfo {
        let b = BuildInfo::current();
        InstallInfo {
            owner_user: "alice".into(),
            owner_uid: uid,
            owner_gid: uid,
            owner_home: "/home/alice".into(),
            version: b.version,
            commit: b.commit,
            built_at: b.built_at,
            installed_at: "2026-01-01T00:00:00Z".into(),
        }
    }

    /// A temp layout with install.toml and both rendered unit files.
    fn installed_layout(t: &TempDir, uid: u32) -> Layout {
        let l = Layout::under(t.path());
        fs::create_dir_all(l.etc_dir()).unwrap();
        fs::create_dir_all(l.unit_dir()).unwrap();
        install_toml::save(&l, &info_for(uid)).unwrap();
        let owner = units::UnitOwner {
            user: "alice".into(),
            gid: uid,
        };
        for (unit, text) in units::render_all(&l, &owner).unwrap() {
            fs::write(l.unit_file(unit), text).unwrap();
        }
        l
    }

    fn script(dir: &Path, name: &str, body: &str, mode: u32) -> PathBuf {
        let p = dir.join(name);
        fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    #[test]
    fn firecracker_version_parse_table() {
        let cases: &[(&str, Option<FcVersion>)] = &[
            ("Firecracker v1.16.1", Some((1, 16, 1))),
            ("Firecracker v1.16.1\n\n", Some((1, 16, 1))),
            (
                "Firecracker v1.10.0\nSupported snapshot data format versions: v4.0.0\n",
                Some((1, 10, 0)),
            ),
            ("  firecracker   v1.7.0-dev  ", Some((1, 7, 0))),
            ("Firecracker 1.12.3", Some((1, 12, 3))),
            ("warning: x\nFirecracker v2.0.0", Some((2, 0, 0))),
            ("Firecracker v1.16", None),
            ("Firecracker vX.Y.Z", None),
            ("Firecracker", None),
            ("v1.16.1", None),
            ("", None),
        ];
        for (input, want) in cases {
            assert_eq!(parse_firecracker_version(input), *want, "{input:?}");
        }
    }

    #[test]
    fn firecracker_range_table() {
        for (v, want) in [
            ((1, 9, 9), Level::Fail),
            ((0, 25, 0), Level::Fail),
            ((1, 10, 0), Level::Pass),
            ((1, 16, 1), Level::Pass),
            ((1, 99, 0), Level::Pass),
            ((2, 0, 0), Level::Warn),
            ((3, 1, 0), Level::Warn),
        ] {
            assert_eq!(classify_firecracker(v).0, want, "{v:?}");
        }
    }

    #[test]
    fn firecracker_file_problems_table() {
        for (uid, mode, n) in [
            (0, 0o100755, 0),
            (0, 0o100555, 0),
            (1000, 0o100755, 1),
            (0, 0o100775, 1),
            (0, 0o100757, 1),
            (0, 0o100644, 1),
            (1000, 0o100777, 2),
        ] {
            assert_eq!(
                firecracker_file_problems(uid, mode).len(),
                n,
                "uid {uid} mode {mode:o}"
            );
        }
    }

    #[test]
    fn firecracker_check_runs_only_trusted_binaries() {
        let t = TempDir::new();
        let c = check_firecracker(Some(&t.path().join("missing")));
        assert_eq!(c.level, Level::Fail);
        assert!(c.details[0].contains("not found"), "{c:?}");
        if euid() != 0 {
            eprintln!("SKIP firecracker_check_runs_only_trusted_binaries: needs root to own the fake firecracker");
            return;
        }
        for (out, want) in [
            ("Firecracker v1.16.1", Level::Pass),
            ("Firecracker v1.9.0", Level::Fail),
            ("Firecracker v2.1.0", Level::Warn),
            ("garbage", Level::Fail),
        ] {
            let fc = script(t.path(), "fc", &format!("echo '{out}'"), 0o755);
            let c = check_firecracker(Some(&fc));
            assert_eq!(c.level, want, "{out}: {c:?}");
            fs::remove_file(&fc).unwrap();
        }
        // World-writable: FAIL, and it is never executed.
        let marker = t.path().join("ran");
        let fc = script(
            t.path(),
            "fc-ww",
            &format!("touch {}; echo 'Firecracker v1.16.1'", marker.display()),
            0o757,
        );
        let c = check_firecracker(Some(&fc));
        assert_eq!(c.level, Level::Fail);
        assert!(
            c.details.iter().any(|d| d.contains("world-writable")),
            "{c:?}"
        );
        assert!(!marker.exists(), "an untrusted firecracker must not be run");
    }

    #[test]
    fn ssh_row_client_and_key_table() {
        let t = TempDir::new();
        // No client: WARN with how to get it; not installed: the key is not looked for.
        let l = Layout::under(t.path());
        let c = check_ssh(&l, None, Some(&t.path().join("missing")));
        assert_eq!(c.level, Level::Warn, "{c:?}");
        assert!(c.details[0].contains("openssh-client"), "{c:?}");
        assert!(c.details[1].contains("not installed"), "{c:?}");
        if euid() != 0 {
            eprintln!("SKIP ssh_row_client_and_key_table (rest): needs root to own the fake ssh and chown the key");
            return;
        }
        // A client nobody else can replace is run (`ssh -V` answers on stderr).
        let ssh = script(
            t.path(),
            "ssh",
            "[ \"$1\" = -V ] && echo 'OpenSSH_9.2p1 Debian-2+deb12u3, OpenSSL 3.0.15' >&2",
            0o755,
        );
        let c = check_ssh(&l, None, Some(&ssh));
        assert_eq!(c.level, Level::Pass, "{c:?}");
        assert!(c.details[0].contains("OpenSSH_9.2p1"), "{c:?}");
        // Something else called ssh: WARN, with what it said.
        let other = script(t.path(), "other-ssh", "echo 'Dropbear v2022' >&2", 0o755);
        let c = check_ssh(&l, None, Some(&other));
        assert_eq!(c.level, Level::Warn, "{c:?}");
        assert!(c.details[0].contains("not OpenSSH"), "{c:?}");
        // A world-writable client is never run.
        let marker = t.path().join("ran");
        let ww = script(
            t.path(),
            "ssh-ww",
            &format!("touch {}; echo OpenSSH_9 >&2", marker.display()),
            0o757,
        );
        let c = check_ssh(&l, None, Some(&ww));
        assert_eq!(c.level, Level::Warn, "{c:?}");
        assert!(c.details[0].contains("not run"), "{c:?}");
        assert!(!marker.exists(), "an untrusted ssh must not be run");

        // Installed: the key, as the daemon makes it (the owner's, 0600), or not made yet.
        let uid = 4242;
        let l = installed_layout(&t, uid);
        let c = check_ssh(&l, Some(uid), Some(&ssh));
        assert_eq!(c.level, Level::Pass, "{c:?}");
        assert!(c.details[1].contains("not made yet"), "{c:?}");
        fs::create_dir_all(l.ssh_dir()).unwrap();
        fs::write(l.ssh_key(), "key").unwrap();
        let set = |mode: u32, owner: u32| {
            fs::set_permissions(l.ssh_key(), fs::Permissions::from_mode(mode)).unwrap();
            std::os::unix::fs::chown(l.ssh_key(), Some(owner), None).unwrap();
        };
        let cases: &[(u32, u32, Level, &str)] = &[
            (0o600, uid, Level::Pass, "mode 0600"),
            (0o644, uid, Level::Fail, "chmod 600"),
            (0o600, 0, Level::Fail, "not the owner"),
            (0o640, 0, Level::Fail, "ssh refuses"),
        ];
        for (mode, owner, want, says) in cases {
            set(*mode, *owner);
            let c = check_ssh(&l, Some(uid), Some(&ssh));
            assert_eq!(c.level, *want, "{mode:o} {owner}: {c:?}");
            assert!(c.details.iter().any(|d| d.contains(says)), "{says}: {c:?}");
        }
        // A symlink where the key belongs: FAIL (ssh would follow it anywhere).
        fs::remove_file(l.ssh_key()).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", l.ssh_key()).unwrap();
        let c = check_ssh(&l, Some(uid), Some(&ssh));
        assert_eq!(c.level, Level::Fail, "{c:?}");
        assert!(c.details[1].contains("not a regular file"), "{c:?}");
    }

    #[test]
    fn kvm_check_table() {
        let t = TempDir::new();
        let c = check_kvm(&t.path().join("kvm"));
        assert_eq!(c.level, Level::Fail);
        assert!(c.details[0].contains("missing"));
        fs::write(t.path().join("file"), b"").unwrap();
        assert_eq!(check_kvm(&t.path().join("file")).level, Level::Fail);
        // /dev/null: a character device anyone may open read/write.
        assert_eq!(check_kvm(Path::new("/dev/null")).level, Level::Pass);
    }

    #[test]
    fn owner_kvm_table() {
        // (dev uid, dev gid, mode, owner uid, owner gid) -> usable
        for (u, g, m, ou, og, want) in [
            (0, 0, 0o600, 1000, 1000, false), // root-only node, as on this build machine
            (0, 0, 0o660, 1000, 1000, false), // group root is never added to a VMM
            (0, 107, 0o660, 1000, 1000, true), // kvm group: the helper adds it
            (0, 1000, 0o660, 1000, 1000, true),
            (0, 0, 0o666, 1000, 1000, true),
            (1000, 0, 0o600, 1000, 1000, true),
            (0, 107, 0o600, 1000, 1000, false),
        ] {
            assert_eq!(owner_can_use_kvm(u, g, m, ou, og), want, "{u} {g} {m:o}");
        }
    }

    #[test]
    fn architecture_table() {
        assert_eq!(check_architecture("x86_64").level, Level::Pass);
        assert_eq!(check_architecture("aarch64").level, Level::Fail);
    }

    #[test]
    fn version_check_table() {
        let cur = BuildInfo::current();
        let c = check_version(&Ok(None), &cur);
        assert_eq!(c.level, Level::Warn);
        assert!(c
            .details
            .iter()
            .any(|d| d == "run sudo banger system install --owner USER"));
        assert_eq!(
            check_version(&Ok(Some(info_for(1))), &cur).level,
            Level::Pass
        );
        let mut old = info_for(1);
        old.commit = "deadbeef".into();
        let c = check_version(&Ok(Some(old)), &cur);
        assert_eq!(c.level, Level::Warn);
        assert!(c.details[1].contains("deadbeef"), "{c:?}");
        let c = check_version(&Err(crate::error::Error::new("parsing x", "bad")), &cur);
        assert_eq!(c.level, Level::Fail);
    }

    #[test]
    fn units_check() {
        let t = TempDir::new();
        let svc = FakeServices::new();
        let bare = Layout::under(t.path().join("bare"));
        assert_eq!(check_units(&bare, &svc, false, true).level, Level::Warn);

        let l = installed_layout(&t, 1000);
        for unit in units::ALL_UNITS {
            svc.set_active(unit, true);
        }
        assert_eq!(check_units(&l, &svc, true, true).level, Level::Pass);

        svc.set_active(DAEMON_UNIT, false);
        let c = check_units(&l, &svc, true, true);
        assert_eq!(c.level, Level::Fail);
        assert!(
            c.details[3].contains("journalctl -u bangerd.service"),
            "{c:?}"
        );
        svc.set_active(DAEMON_UNIT, true);

        // A stopped socket refuses every client: FAIL.
        svc.set_active(units::DAEMON_SOCKET_UNIT, false);
        let c = check_units(&l, &svc, true, true);
        assert_eq!(c.level, Level::Fail, "{c:?}");
        assert!(
            c.details[2].starts_with("bangerd.socket: not active"),
            "{c:?}"
        );
        svc.set_active(units::DAEMON_SOCKET_UNIT, true);

        // An install from before socket activation: a WARN (an update keeps the units it finds
        // and must not roll back over this), saying what to run.
        fs::remove_file(l.unit_file(units::HELPER_SOCKET_UNIT)).unwrap();
        let c = check_units(&l, &svc, true, true);
        assert_eq!(c.level, Level::Warn, "{c:?}");
        assert!(
            c.details[0]
                .contains("refused while the daemons restart (run sudo banger system install"),
            "{c:?}"
        );
        let socket_text = units::render_helper_socket(
            &l,
            &units::UnitOwner {
                user: "alice".into(),
                gid: 1000,
            },
        )
        .unwrap();
        fs::write(l.unit_file(units::HELPER_SOCKET_UNIT), socket_text).unwrap();

        let c = check_units(&l, &svc, true, false);
        assert_eq!(c.level, Level::Warn);
        assert!(c.details[0].contains("systemd is not running"), "{c:?}");

        svc.fail_on("is-active");
        assert_eq!(check_units(&l, &svc, true, true).level, Level::Fail);

        fs::remove_file(l.unit_file(HELPER_UNIT)).unwrap();
        let c = check_units(&l, &svc, true, false);
        assert_eq!(
            c.level,
            Level::Fail,
            "a missing unit file fails even without systemd"
        );
    }

    #[test]
    fn unit_directives_check() {
        let t = TempDir::new();
        let l = installed_layout(&t, 1000);
        let c = check_unit_directives(&l, true);
        assert_eq!(c.level, Level::Pass, "{c:?}");
        assert_eq!(
            c.details[0],
            "bangerd-root.socket: FileDescriptorName=bangerd-root SocketMode=0600 DirectoryMode=0711"
        );
        assert!(
            c.details[1].starts_with(
                "bangerd-root.service: Type=notify KillMode=process SendSIGKILL=no RuntimeDirectoryPreserve=yes NoNewPrivileges=yes CapabilityBoundingSet=CAP_CHOWN "
            ),
            "{c:?}"
        );

        // A drop-in that weakens the sandbox is a WARN (not what keeps VMs alive), naming it.
        let dropins = l.unit_dir().join("bangerd.service.d");
        fs::create_dir_all(&dropins).unwrap();
        fs::write(
            dropins.join("loose.conf"),
            "[Service]\nMemoryDenyWriteExecute=no\nSystemCallFilter=\n",
        )
        .unwrap();
        let c = check_unit_directives(&l, true);
        assert_eq!(c.level, Level::Warn, "{c:?}");
        for want in [
            "bangerd.service: MemoryDenyWriteExecute=no, expected MemoryDenyWriteExecute=yes (weaker",
            "bangerd.service: SystemCallFilter=<unset>, expected SystemCallFilter=@system-service",
        ] {
            assert!(c.details.iter().any(|d| d.starts_with(want)), "{want}: {c:?}");
        }
        fs::remove_dir_all(&dropins).unwrap();
        // A socket unit that hands the socket to the wrong name is a WARN too.
        let path = l.unit_file(units::DAEMON_SOCKET_UNIT);
        let text = fs::read_to_string(&path).unwrap();
        fs::write(&path, text.replace("FileDescriptorName=bangerd\n", "")).unwrap();
        let c = check_unit_directives(&l, true);
        assert_eq!(c.level, Level::Warn, "{c:?}");
        fs::write(&path, text).unwrap();

        // A drop-in that undoes KillMode=process is caught.
        let dropins = l.unit_dir().join("bangerd.service.d");
        fs::create_dir_all(&dropins).unwrap();
        fs::write(
            dropins.join("override.conf"),
            "[Service]\nKillMode=control-group\n",
        )
        .unwrap();
        let c = check_unit_directives(&l, true);
        assert_eq!(c.level, Level::Fail);
        assert!(
            c.details
                .iter()
                .any(|d| d.contains("KillMode=control-group, expected KillMode=process")),
            "{c:?}"
        );
        fs::remove_dir_all(&dropins).unwrap();

        let path = l.unit_file(HELPER_UNIT);
        let text = fs::read_to_string(&path).unwrap();
        fs::write(&path, text.replace("SendSIGKILL=no\n", "")).unwrap();
        let c = check_unit_directives(&l, true);
        assert_eq!(c.level, Level::Fail);
        assert!(
            c.details
                .iter()
                .any(|d| d.starts_with("bangerd-root.service: SendSIGKILL=<unset>")),
            "{c:?}"
        );

        assert_eq!(check_unit_directives(&l, false).level, Level::Warn);
    }

    #[test]
    fn check_node_table() {
        let t = TempDir::new();
        let me = euid();
        let sock = t.path().join("s.sock");
        let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        fs::set_permissions(&sock, fs::Permissions::from_mode(0o600)).unwrap();
        let dir = t.path().join("d");
        fs::create_dir(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o711)).unwrap();
        let file = t.path().join("f");
        fs::write(&file, b"").unwrap();

        assert!(check_node(&sock, Kind::Socket, 0o600, me).is_ok());
        assert!(check_node(&dir, Kind::Dir, 0o711, me).is_ok());
        let cases: &[(&Path, Kind, u32, u32, &str)] = &[
            (&sock, Kind::Socket, 0o660, me, "mode 0600, expected 0660"),
            (&sock, Kind::Socket, 0o600, me + 1, "expected"),
            (&dir, Kind::Socket, 0o711, me, "not a socket"),
            (&file, Kind::Dir, 0o644, me, "not a directory"),
            (&t.path().join("none"), Kind::Socket, 0o600, me, "missing"),
        ];
        for (p, k, m, u, want) in cases {
            let e = check_node(p, *k, *m, *u).unwrap_err();
            assert!(e.contains(want), "{e} should mention {want}");
        }
    }

    #[test]
    fn sockets_check_end_to_end() {
        let t = TempDir::new();
        assert_eq!(
            check_sockets(&Layout::under(t.path()), None).level,
            Level::Warn
        );
        if euid() != 0 {
            eprintln!("SKIP sockets_check_end_to_end: the helper dir must be owned by root");
            return;
        }
        let l = installed_layout(&t, 0);
        let c = check_sockets(&l, Some(0));
        assert_eq!(c.level, Level::Fail, "sockets missing");
        assert!(c.details[0].contains("missing"), "{c:?}");
        fs::create_dir_all(l.run_dir()).unwrap();
        fs::create_dir_all(l.helper_run_dir()).unwrap();
        fs::set_permissions(l.helper_run_dir(), fs::Permissions::from_mode(0o711)).unwrap();
        let _a = std::os::unix::net::UnixListener::bind(l.daemon_socket()).unwrap();
        let _b = std::os::unix::net::UnixListener::bind(l.helper_socket()).unwrap();
        for s in [l.daemon_socket(), l.helper_socket()] {
            fs::set_permissions(s, fs::Permissions::from_mode(0o600)).unwrap();
        }
        let c = check_sockets(&l, Some(0));
        assert_eq!(c.level, Level::Pass, "{c:?}");
        fs::set_permissions(l.helper_run_dir(), fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(check_sockets(&l, Some(0)).level, Level::Fail);
    }

    #[test]
    fn run_orders_rows_splices_extra_and_writes_nothing() {
        let t = TempDir::new();
        let l = installed_layout(&t, 1000);
        let snapshot = |root: &Path| {
            let mut v = vec![];
            let mut stack = vec![root.to_path_buf()];
            while let Some(d) = stack.pop() {
                for e in fs::read_dir(&d).unwrap() {
                    let p = e.unwrap().path();
                    let m = fs::symlink_metadata(&p).unwrap();
                    v.push((p.clone(), m.len(), m.mtime(), m.mtime_nsec(), m.mode()));
                    if m.is_dir() {
                        stack.push(p);
                    }
                }
            }
            v.sort();
            v
        };
        let before = snapshot(t.path());
        let svc = FakeServices::new();
        let opts = DoctorOptions {
            firecracker: Some(t.path().join("no-firecracker")),
            kvm: PathBuf::from("/dev/null"),
            systemd: false,
            extra: vec![Check::new(Level::Pass, "state store", vec!["ok".into()])],
            tun: PathBuf::from("/dev/null"),
            ssh: Some(t.path().join("no-ssh")),
        };
        let checks = run(&l, &svc, &opts);
        let names: Vec<&str> = checks.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "architecture",
                "version",
                "state store",
                "units",
                "unit directives",
                "sockets",
                "kvm",
                "firecracker",
                "ssh",
                "network",
                "update"
            ]
        );
        assert!(any_fail(&checks), "sockets and firecracker are missing");
        assert_eq!(snapshot(t.path()), before, "doctor must not write");
        assert!(svc.actions().is_empty(), "doctor must not act on services");
    }

    fn sample_checks() -> Vec<Check> {
        vec![
            Check::new(Level::Pass, "architecture", vec!["x86_64".into()]),
            Check::new(Level::Warn, "units", vec!["a".into(), "b".into()]),
            Check::new(Level::Fail, "kvm", vec![]),
        ]
    }

    #[test]
    fn render_text_escapes_quoted_text_but_keeps_its_own_colour() {
        let checks = [Check::new(
            Level::Fail,
            "daemon",
            vec!["journal: \x1b]0;pwned\x07 \x1b[2J".into()],
        )];
        assert_eq!(
            render_text(&checks, true),
            "\x1b[31mFAIL\x1b[0m daemon\n  journal: \\x1b]0;pwned\\x07 \\x1b[2J\n"
        );
    }

    #[test]
    fn render_text_plain_and_colour() {
        assert_eq!(
            render_text(&sample_checks(), false),
            "PASS architecture\n  x86_64\nWARN units\n  a\n  b\nFAIL kvm\n"
        );
        assert_eq!(
            render_text(&sample_checks(), true),
            "\x1b[32mPASS\x1b[0m architecture\n  x86_64\n\x1b[33mWARN\x1b[0m units\n  a\n  b\n\x1b[31mFAIL\x1b[0m kvm\n"
        );
        assert_eq!(render_text(&[], false), "");
    }

    #[test]
    fn render_json_shape() {
        let v: serde_json::Value = serde_json::from_str(&render_json(&sample_checks())).unwrap();
        assert_eq!(v["ok"], false);
        assert_eq!(v["checks"][0]["level"], "PASS");
        assert_eq!(v["checks"][1]["details"][1], "b");
        assert_eq!(v["checks"][2]["name"], "kvm");
        let ok: serde_json::Value =
            serde_json::from_str(&render_json(&sample_checks()[..2])).unwrap();
        assert_eq!(ok["ok"], true);
    }

    #[test]
    fn any_fail_and_colour_table() {
        assert!(any_fail(&sample_checks()));
        assert!(!any_fail(&sample_checks()[..2]));
        let dumb = OsStr::new("dumb");
        let xterm = OsStr::new("xterm-256color");
        for (tty, no_color, term, want) in [
            (true, false, Some(xterm), true),
            (true, false, None, true),
            (false, false, Some(xterm), false),
            (true, true, Some(xterm), false),
            (true, false, Some(dumb), false),
        ] {
            assert_eq!(
                use_color_from(tty, no_color, term),
                want,
                "{tty} {no_color} {term:?}"
            );
        }
    }

    #[test]
    fn leftover_update_journal_fails_with_the_command_to_run() {
        use crate::update::journal::{Journal, UpdateInfo};
        let t = TempDir::new();
        let l = Layout::under(t.path());
        let c = check_update(&l);
        assert_eq!(
            (c.level, c.details[0].as_str()),
            (Level::Pass, "no interrupted update")
        );

        fs::create_dir_all(l.updates_dir()).unwrap();
        let info = UpdateInfo {
            from: "0.1.0".into(),
            to: "0.2.0".into(),
            old_sha256: "aa".into(),
            new_sha256: "bb".into(),
        };
        let j = Journal::create(&l, info).unwrap();
        let c = check_update(&l);
        assert_eq!(c.level, Level::Fail, "{c:?}");
        assert!(
            c.details[0].contains("v0.1.0 -> v0.2.0 was interrupted"),
            "{c:?}"
        );
        assert_eq!(
            c.details[1],
            "run sudo banger update to finish or roll it back"
        );

        // While an update holds the lock, its own journal is not a leftover.
        let lock = crate::update::flow::UpdateLock::acquire(&l).unwrap();
        let c = check_update(&l);
        assert_eq!(c.level, Level::Warn, "{c:?}");
        assert!(c.details[0].contains("in progress"), "{c:?}");
        drop(lock);
        drop(j);

        fs::write(crate::update::journal::path(&l), "{not json}\n{}\n").unwrap();
        assert_eq!(check_update(&l).level, Level::Fail);
    }

    #[test]
    fn proc_route_parses_host_order() {
        let text =
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
eth0\t00000000\t0101A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
eth0\t0001A8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
banger0\t00001EAC\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n";
        assert_eq!(
            parse_proc_route(text),
            vec![
                ("eth0".to_string(), "0.0.0.0".parse().unwrap(), 0),
                ("eth0".to_string(), "192.168.1.0".parse().unwrap(), 24),
                ("banger0".to_string(), "172.30.0.0".parse().unwrap(), 24),
            ]
        );
        assert!(parse_proc_route("").is_empty());
        assert!(parse_proc_route("header\ngarbage line\n").is_empty());
    }

    #[test]
    fn tun_owner_table() {
        for (u, g, m, want) in [
            (0, 0, 0o20666, true),
            (0, 0, 0o20600, false),
            (1000, 0, 0o20600, true),
            (0, 1000, 0o20660, true),
            (0, 5, 0o20660, false),
            (0, 0, 0o20664, false),
        ] {
            assert_eq!(
                owner_can_open_tun(u, g, m, 1000, 1000),
                want,
                "{u} {g} {m:o}"
            );
        }
    }

    fn net_facts() -> NetFacts {
        use crate::net::link::Link;
        NetFacts {
            config: Ok(crate::net::NetConfig::default()),
            routes: Ok(vec![
                ("eth0".into(), "0.0.0.0".parse().unwrap(), 0),
                ("eth0".into(), "192.168.1.0".parse().unwrap(), 24),
                ("banger0".into(), "172.30.0.0".parse().unwrap(), 24),
            ]),
            links: Ok(vec![Link {
                name: "banger0".into(),
                up: true,
                kind: Some("bridge".into()),
                ipv4: vec![("172.30.0.1".parse().unwrap(), 24)],
                ..Link::default()
            }]),
            ip_forward: Ok(false),
            table: Some(Ok(crate::net::nft::TableState::default())),
            tun: Ok((0, 0, 0o20666)),
            tun_path: PathBuf::from("/dev/net/tun"),
        }
    }

    fn with_tap(f: &mut NetFacts, nat: bool) {
        if let Ok(l) = &mut f.links {
            l.push(crate::net::link::Link {
                name: "bgr-0a0a0a0a0a".into(),
                kind: Some("tun".into()),
                alias: Some(crate::net::plumb::alias_for(
                    "0a0a0a0a0a01",
                    "172.30.0.2".parse().unwrap(),
                    nat,
                )),
                ..Default::default()
            });
        }
    }

    fn current_table(nat: usize) -> crate::net::nft::TableState {
        let script = crate::net::nft::ensure_script("banger0");
        let mut st = crate::net::nft::TableState {
            present: true,
            set_present: true,
            ..Default::default()
        };
        for (n, line) in script
            .lines()
            .filter(|l| l.starts_with("add rule"))
            .enumerate()
        {
            let chain = line.split_whitespace().nth(4).unwrap().to_string();
            st.chains.entry(chain).or_default().push(Some(format!(
                "banger:{}:banger0:{n}",
                crate::net::nft::RULES_VERSION
            )));
        }
        for i in 0..nat {
            st.nat.push((
                format!("172.30.0.{}", i + 2).parse().unwrap(),
                Some("x".into()),
            ));
        }
        st
    }

    #[test]
    fn network_row_table() {
        let owner = (1000, 1000, "alice".to_string());
        let verdict = |f: &NetFacts| check_network(f, Some(&owner));
        let has = |c: &Check, s: &str| c.details.iter().any(|d| d.contains(s));

        let c = verdict(&net_facts());
        assert_eq!(c.level, Level::Pass, "{c:?}");
        assert_eq!(c.name, "network");

        // Bad config: FAIL naming the key.
        let mut f = net_facts();
        f.config = crate::net::NetConfig::parse("[network]\nsubnet = \"1.2.3.0/24\"\n");
        let c = verdict(&f);
        assert_eq!(c.level, Level::Fail);
        assert!(has(&c, "network.subnet"), "{c:?}");

        // Overlapping host route: FAIL; our own bridge's route and the default route are fine.
        let mut f = net_facts();
        f.routes = Ok(vec![("eth1".into(), "172.30.0.0".parse().unwrap(), 16)]);
        let c = verdict(&f);
        assert_eq!(c.level, Level::Fail);
        assert!(
            has(&c, "overlaps the host route 172.30.0.0/16 on eth1"),
            "{c:?}"
        );

        // No bridge: WARN while no VM runs, FAIL when a tap exists.
        let mut f = net_facts();
        f.links = Ok(vec![]);
        let c = verdict(&f);
        assert_eq!(c.level, Level::Warn, "{c:?}");
        assert!(has(&c, "created when the first VM starts"));
        with_tap(&mut f, false);
        f.table = Some(Ok(current_table(0)));
        assert_eq!(verdict(&f).level, Level::Fail);

        // Bridge down / lacking its address / not a bridge.
        let mut f = net_facts();
        if let Ok(l) = &mut f.links {
            l[0].up = false;
        }
        assert_eq!(verdict(&f).level, Level::Warn);
        with_tap(&mut f, false);
        f.table = Some(Ok(current_table(0)));
        assert_eq!(verdict(&f).level, Level::Fail);
        let mut f = net_facts();
        if let Ok(l) = &mut f.links {
            l[0].ipv4.clear();
        }
        assert!(has(&verdict(&f), "lacks its address 172.30.0.1/24"));
        let mut f = net_facts();
        if let Ok(l) = &mut f.links {
            l[0].kind = Some("tun".into());
        }
        assert_eq!(verdict(&f).level, Level::Fail);

        // A NAT VM runs: forwarding must be on and the table current with its address.
        let mut f = net_facts();
        with_tap(&mut f, true);
        f.table = Some(Ok(current_table(1)));
        let c = verdict(&f);
        assert_eq!(c.level, Level::Fail, "ip_forward off: {c:?}");
        assert!(has(&c, "ip_forward = 0 while 1 NAT VM"));
        f.ip_forward = Ok(true);
        assert_eq!(verdict(&f).level, Level::Pass, "{:?}", verdict(&f));
        f.table = Some(Ok(current_table(0)));
        assert_eq!(verdict(&f).level, Level::Fail);
        f.table = Some(Ok(crate::net::nft::TableState::default()));
        let c = verdict(&f);
        assert_eq!(c.level, Level::Fail);
        assert!(has(&c, "missing while VMs run"), "{c:?}");
        // Not root: the table cannot be read, said as a WARN.
        f.table = None;
        let c = verdict(&f);
        assert_eq!(c.level, Level::Warn);
        assert!(has(&c, "sudo banger doctor"));

        // The owner cannot open the tun device: FAIL with the fix.
        let mut f = net_facts();
        f.tun = Ok((0, 0, 0o20600));
        let c = verdict(&f);
        assert_eq!(c.level, Level::Fail);
        assert!(has(&c, "chmod 0666 /dev/net/tun"), "{c:?}");
        assert_eq!(
            check_network(&f, None).level,
            Level::Pass,
            "no owner: not judged"
        );
        f.tun = Err("/dev/net/tun: No such file".into());
        assert_eq!(verdict(&f).level, Level::Fail);
    }
}
