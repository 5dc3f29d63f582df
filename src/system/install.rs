//! `banger system install | uninstall | status`: put banger on this host, take it off, describe it.
//!
//! Owns the install steps in order: resolve the owner, copy the binary, make the links, record
//! install.toml, create the directories, write the units, then hand over to systemd and wait for the
//! daemon. Every step compares before it writes, so a re-install changes only what drifted and is
//! how unit changes reach a host. It never checks for root (the CLI does) and never touches a VM.

use std::fmt;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::fsutil;
use super::install_toml::{self, InstallInfo};
use super::service::ServiceManager;
use super::units::{self, UnitOwner, DAEMON_SOCKET_UNIT, HELPER_SOCKET_UNIT};
use super::users::{self, User};
use crate::buildinfo::BuildInfo;
use crate::error::{Context, Error, Result};
use crate::layout::{Layout, DAEMON_UNIT, HELPER_UNIT, LINK_NAMES};

/// Mode of the installed binary.
pub const BINARY_MODE: u32 = 0o755;
/// Mode of unit files.
pub const UNIT_MODE: u32 = 0o644;
/// Mode of the cache directory, root's: update staging lives below it.
const ROOT_CACHE_DIR_MODE: u32 = 0o755;

/// Mode of the owner's state and cache directories (matches `StateDirectoryMode=`).
pub const OWNER_DIR_MODE: u32 = 0o750;

const HINT_INSTALL: &str = "run sudo banger system install --owner USER";

/// Refuses, before anything is written, unless systemd is PID 1: banger's services are systemd
/// units. Asks as `sd_booted(3)` does, through the layout (`/run/systemd/system` is a directory),
/// so a test can point it at a temp root with or without that directory.
pub fn require_systemd(layout: &Layout) -> Result<()> {
    let marker = layout.systemd_booted_marker();
    match fs::symlink_metadata(&marker) {
        Ok(m) if m.is_dir() => Ok(()),
        _ => Err(Error::new(
            "installing banger",
            format!(
                "PID 1 is not systemd ({} is missing); banger runs as systemd services",
                marker.display()
            ),
        )
        .hint("install on a host booted with systemd; nothing was written")),
    }
}

/// What an install changed. A re-install of the same binary for the same owner on a healthy host
/// changes nothing ([`InstallReport::is_noop`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstallReport {
    /// The install.toml now on disk.
    pub info: InstallInfo,
    /// The binary was copied (new or different content) or its mode fixed.
    pub binary_changed: bool,
    /// Links created or replaced.
    pub links_changed: Vec<PathBuf>,
    /// install.toml was written.
    pub install_toml_changed: bool,
    /// Directories created (or re-owned).
    pub dirs_changed: Vec<PathBuf>,
    /// Unit files written (new, changed template, or a hand edit put back).
    pub units_changed: Vec<String>,
    /// Units enabled by this install.
    pub enabled: Vec<String>,
    /// Units started by this install.
    pub started: Vec<String>,
    /// Units restarted because their unit, the binary or the owner changed.
    pub restarted: Vec<String>,
    /// Shell completion loaders written (for the shells whose directory exists).
    pub completions_changed: Vec<PathBuf>,
}

impl InstallReport {
    /// True when nothing on the host changed and no service was started or restarted.
    pub fn is_noop(&self) -> bool {
        !self.binary_changed
            && self.links_changed.is_empty()
            && !self.install_toml_changed
            && self.dirs_changed.is_empty()
            && self.units_changed.is_empty()
            && self.enabled.is_empty()
            && self.started.is_empty()
            && self.restarted.is_empty()
            && self.completions_changed.is_empty()
    }
}

fn list(items: &[String]) -> String {
    items.join(", ")
}

fn paths(items: &[PathBuf]) -> String {
    items
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

impl fmt::Display for InstallReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let short: String = self.info.commit.chars().take(8).collect();
        writeln!(
            f,
            "banger v{} (commit {short}) installed for {} (uid {})",
            self.info.version, self.info.owner_user, self.info.owner_uid
        )?;
        if self.is_noop() {
            return writeln!(f, "  nothing changed; both services were already running");
        }
        if self.binary_changed {
            writeln!(f, "  binary: updated")?;
        }
        if !self.links_changed.is_empty() {
            writeln!(f, "  links: {}", paths(&self.links_changed))?;
        }
        if self.install_toml_changed {
            writeln!(f, "  install.toml: written")?;
        }
        if !self.dirs_changed.is_empty() {
            writeln!(f, "  directories: {}", paths(&self.dirs_changed))?;
        }
        if !self.units_changed.is_empty() {
            writeln!(f, "  units written: {}", list(&self.units_changed))?;
        }
        if !self.enabled.is_empty() {
            writeln!(f, "  enabled: {}", list(&self.enabled))?;
        }
        if !self.started.is_empty() {
            writeln!(f, "  started: {}", list(&self.started))?;
        }
        if !self.restarted.is_empty() {
            writeln!(f, "  restarted: {}", list(&self.restarted))?;
        }
        if !self.completions_changed.is_empty() {
            writeln!(
                f,
                "  shell completion: {}",
                paths(&self.completions_changed)
            )?;
        }
        Ok(())
    }
}

/// Finds the owner in `passwd` by name, or by uid when `owner` is all digits and no user has that
/// name. Root is refused: the daemon must not run privileged.
pub fn resolve_owner(passwd: &Path, owner: &str) -> Result<User> {
    let what = || format!("looking up owner {owner:?} in {}", passwd.display());
    let mut user = users::lookup_user(passwd, owner)?;
    if user.is_none() && !owner.is_empty() && owner.bytes().all(|b| b.is_ascii_digit()) {
        if let Ok(uid) = owner.parse() {
            user = users::user_by_uid(passwd, uid)?;
        }
    }
    let user = user.ok_or_else(|| {
        Error::new(what(), "no such user")
            .hint("pass an existing login, e.g. sudo banger system install --owner \"$SUDO_USER\"")
    })?;
    if user.uid == 0 {
        return Err(Error::new(what(), "the owner must not be root")
            .hint("pass the unprivileged user who will run banger, e.g. --owner \"$SUDO_USER\""));
    }
    Ok(user)
}

/// Installs (or re-installs) banger: see the module doc for the steps. `source_binary` is the file
/// to install (normally the running executable; it may be the installed file itself).
/// `wait_ready` is called last and must return only when the daemon answers.
pub fn install(
    layout: &Layout,
    owner: &str,
    passwd: &Path,
    source_binary: &Path,
    svc: &dyn ServiceManager,
    wait_ready: &dyn Fn() -> Result<()>,
) -> Result<InstallReport> {
    require_systemd(layout)?;
    let user = resolve_owner(passwd, owner)?;
    let previous = install_toml::load(layout)?;

    let binary_changed = install_binary(layout, source_binary)?;
    let links_changed = install_links(layout)?;
    let mut dirs_changed = install_dirs(layout, &user)?;

    let build = BuildInfo::current();
    let info = InstallInfo {
        owner_user: user.name.clone(),
        owner_uid: user.uid,
        owner_gid: user.gid,
        owner_home: user.home.clone(),
        version: build.version,
        commit: build.commit,
        built_at: build.built_at,
        installed_at: previous
            .as_ref()
            .map(|p| p.installed_at.clone())
            .unwrap_or_else(crate::clock::now_rfc3339),
    };
    let install_toml_changed = previous.as_ref() != Some(&info);
    if install_toml_changed {
        install_toml::save(layout, &info)?;
    }
    let owner_changed = previous.as_ref().is_some_and(|p| {
        (&p.owner_user, p.owner_uid, p.owner_gid)
            != (&info.owner_user, info.owner_uid, info.owner_gid)
    });

    if fsutil::ensure_dir(&layout.unit_dir(), 0o755)? {
        dirs_changed.push(layout.unit_dir());
    }
    let units_changed = write_units(
        layout,
        &UnitOwner {
            user: user.name.clone(),
            gid: user.gid,
        },
    )?;

    let mut report = InstallReport {
        info,
        binary_changed,
        links_changed,
        install_toml_changed,
        dirs_changed,
        units_changed,
        enabled: vec![],
        started: vec![],
        restarted: vec![],
        completions_changed: super::completions::install(layout)?,
    };
    svc.daemon_reload()?;
    // Helper first (the daemon wants it), each socket before its service. A socket started here
    // (new, or an install from before socket activation) means a running service must restart to
    // take it from systemd instead of the socket it bound itself; a changed socket unit is
    // restarted, which restarts its service too (`Requires=`).
    let mut socket_moved = false;
    for unit in units::ALL_UNITS {
        let changed = report.units_changed.iter().any(|u| u == unit);
        if !svc.is_enabled(unit)? {
            svc.enable(unit)?;
            report.enabled.push(unit.to_string());
        }
        if units::is_socket(unit) {
            socket_moved = false;
            if !svc.is_active(unit)? {
                svc.start(unit)?;
                report.started.push(unit.to_string());
                socket_moved = true;
            } else if changed || owner_changed {
                svc.restart(unit)?;
                report.restarted.push(unit.to_string());
                socket_moved = true;
            }
            continue;
        }
        let must_restart = binary_changed || owner_changed || changed || socket_moved;
        if !svc.is_active(unit)? {
            svc.start(unit)?;
            report.started.push(unit.to_string());
        } else if must_restart {
            svc.restart(unit)?;
            report.restarted.push(unit.to_string());
        }
    }
    wait_ready()?;
    Ok(report)
}

/// Copies `source` to `layout.binary()` (temp file + rename, 0755) unless the contents already
/// match; fixes the mode when only that drifted. Returns whether anything changed.
fn install_binary(layout: &Layout, source: &Path) -> Result<bool> {
    let target = layout.binary();
    fsutil::ensure_dir(&layout.lib_dir(), 0o755)?;
    let same_file = match (fs::canonicalize(source), fs::canonicalize(&target)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if same_file || fsutil::same_contents(source, &target)? {
        let mode = fs::metadata(&target)
            .ctx(|| format!("reading {}", target.display()))?
            .mode();
        if mode & 0o7777 == BINARY_MODE {
            return Ok(false);
        }
        fs::set_permissions(&target, fs::Permissions::from_mode(BINARY_MODE))
            .ctx(|| format!("setting mode of {}", target.display()))?;
        return Ok(true);
    }
    let mut src = File::open(source).ctx(|| format!("reading {}", source.display()))?;
    fsutil::write_atomic_with(&target, BINARY_MODE, |f| io::copy(&mut src, f).map(|_| ()))?;
    Ok(true)
}

/// Points every name in [`LINK_NAMES`] at the binary, replacing wrong links or stray files.
fn install_links(layout: &Layout) -> Result<Vec<PathBuf>> {
    fsutil::ensure_dir(&layout.bin_dir(), 0o755)?;
    let target = layout.binary();
    let mut changed = vec![];
    for name in LINK_NAMES {
        let link = layout.link(name);
        if points_at(&link, &target) {
            continue;
        }
        if link.is_dir() && !link.is_symlink() {
            return Err(Error::new(
                format!("linking {} to {}", link.display(), target.display()),
                "a directory is in the way",
            )
            .hint("remove it and re-run sudo banger system install"));
        }
        // A new link beside it, renamed over: the name never disappears.
        let tmp = fsutil::temp_sibling(&link);
        let _ = fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&target, &tmp)
            .and_then(|()| fs::rename(&tmp, &link))
            .map_err(|e| {
                let _ = fs::remove_file(&tmp);
                Error::new(
                    format!("linking {} to {}", link.display(), target.display()),
                    e,
                )
            })?;
        changed.push(link);
    }
    if !changed.is_empty() {
        fsutil::sync_dir(&layout.bin_dir())?;
    }
    Ok(changed)
}

/// True when `link` is a symlink whose target is exactly `target`.
fn points_at(link: &Path, target: &Path) -> bool {
    fs::read_link(link).is_ok_and(|t| t == target)
}

/// Creates `/etc/banger` and the owner's state and cache directories (owned by the owner, so the
/// daemon's `StateDirectory=` has nothing to fix and the helper's `ReadWritePaths=` exists).
fn install_dirs(layout: &Layout, user: &User) -> Result<Vec<PathBuf>> {
    let mut changed = vec![];
    if fsutil::ensure_dir(&layout.etc_dir(), 0o755)? {
        changed.push(layout.etc_dir());
    }
    // State belongs to the owner; the cache dir stays root's (0755): root stages updates in it,
    // so the owner must not be able to swap what lies below it. The daemon's own cache is the
    // `daemon/` subdirectory systemd makes for it (`CacheDirectory=banger/daemon`).
    for (dir, uid, gid, mode) in [
        (layout.state_dir(), user.uid, user.gid, OWNER_DIR_MODE),
        (layout.cache_dir(), 0, 0, ROOT_CACHE_DIR_MODE),
    ] {
        let created = fsutil::ensure_dir(&dir, mode)?;
        let meta = fs::metadata(&dir).ctx(|| format!("reading {}", dir.display()))?;
        let reowned = meta.uid() != uid || meta.gid() != gid || meta.mode() & 0o7777 != mode;
        if reowned {
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid))
                .ctx(|| format!("giving {} to uid {uid}", dir.display()))?;
            fs::set_permissions(&dir, fs::Permissions::from_mode(mode))
                .ctx(|| format!("setting mode {mode:o} on {}", dir.display()))?;
        }
        if created || reowned {
            changed.push(dir);
        }
    }
    Ok(changed)
}

/// Writes each unit file whose content differs from the rendering. Returns the units written.
fn write_units(layout: &Layout, owner: &UnitOwner) -> Result<Vec<String>> {
    let mut changed = vec![];
    for (unit, text) in units::render_all(layout, owner)? {
        let path = layout.unit_file(unit);
        let current = fsutil::read_if_exists(&path)?;
        let mode_ok = fs::metadata(&path).is_ok_and(|m| m.mode() & 0o7777 == UNIT_MODE);
        if current.as_deref() == Some(text.as_bytes()) && mode_ok {
            continue;
        }
        fsutil::write_atomic(&path, text.as_bytes(), UNIT_MODE)?;
        changed.push(unit.to_string());
    }
    Ok(changed)
}

/// What an uninstall did. A second uninstall does nothing ([`UninstallReport::is_noop`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UninstallReport {
    /// Units stopped.
    pub stopped: Vec<String>,
    /// Units disabled.
    pub disabled: Vec<String>,
    /// Files, links and directories removed.
    pub removed: Vec<PathBuf>,
    /// Things left in place, with why (e.g. a link that is not ours).
    pub kept: Vec<(PathBuf, String)>,
    /// Network objects removed (taps, bridge, the nftables table).
    pub network: Vec<String>,
}

impl UninstallReport {
    /// True when nothing was stopped, disabled or removed.
    pub fn is_noop(&self) -> bool {
        self.stopped.is_empty()
            && self.disabled.is_empty()
            && self.removed.is_empty()
            && self.network.is_empty()
    }
}

impl fmt::Display for UninstallReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_noop() {
            writeln!(f, "banger is not installed; nothing to remove")?;
        } else {
            writeln!(f, "banger uninstalled")?;
            if !self.stopped.is_empty() {
                writeln!(f, "  stopped: {}", list(&self.stopped))?;
            }
            if !self.disabled.is_empty() {
                writeln!(f, "  disabled: {}", list(&self.disabled))?;
            }
            for p in &self.removed {
                writeln!(f, "  removed {}", p.display())?;
            }
            for n in &self.network {
                writeln!(f, "  removed {n}")?;
            }
        }
        for (p, why) in &self.kept {
            writeln!(f, "  kept {}: {why}", p.display())?;
        }
        Ok(())
    }
}

/// Uninstalls banger: stops and disables both units, removes the unit files, our links, the binary
/// and its backup. `purge` also removes state, cache, `/etc/banger` and the runtime directories.
/// Running VMMs are not stopped (they live in their own scopes); purging removes their disks.
/// `--purge` or not, the network objects (every banger tap, the bridge, the nftables table) are
/// removed: they are runtime objects. Only for the system layout: a relocated layout (tests) does
/// not own the network namespace it runs in.
pub fn uninstall(
    layout: &Layout,
    purge: bool,
    svc: &dyn ServiceManager,
) -> Result<UninstallReport> {
    let net = |l: &Layout| {
        if l.is_system() {
            crate::net::plumb::purge(l)
        } else {
            Ok(vec![])
        }
    };
    uninstall_with_network(layout, purge, svc, &net)
}

/// [`uninstall`] with the network purge passed in (tests). A failed network purge does not stop
/// the uninstall: it is reported as kept, with the error.
pub fn uninstall_with_network(
    layout: &Layout,
    purge: bool,
    svc: &dyn ServiceManager,
    net_purge: &dyn Fn(&Layout) -> Result<Vec<String>>,
) -> Result<UninstallReport> {
    let mut report = UninstallReport::default();
    // Daemon first: it is the helper's only client. Each socket before its service: stopped
    // first, a socket can no longer start the service again (a stopped socket stops its service
    // too, through the service's `Requires=`).
    for (socket, service) in [
        (DAEMON_SOCKET_UNIT, DAEMON_UNIT),
        (HELPER_SOCKET_UNIT, HELPER_UNIT),
    ] {
        let active = [svc.is_active(socket)?, svc.is_active(service)?];
        for (unit, was_active) in [(socket, active[0]), (service, active[1])] {
            if was_active {
                svc.stop(unit)?;
                report.stopped.push(unit.to_string());
            }
        }
        for unit in [socket, service] {
            if svc.is_enabled(unit)? {
                svc.disable(unit)?;
                report.disabled.push(unit.to_string());
            }
        }
    }
    let mut units_removed = false;
    for unit in [
        DAEMON_SOCKET_UNIT,
        DAEMON_UNIT,
        HELPER_SOCKET_UNIT,
        HELPER_UNIT,
    ] {
        let path = layout.unit_file(unit);
        if fsutil::remove_file_if_exists(&path)? {
            report.removed.push(path);
            units_removed = true;
        }
    }
    if units_removed {
        svc.daemon_reload()?;
    }
    // With the helper stopped, and before its runtime dir (the ip_forward marker) goes.
    match net_purge(layout) {
        Ok(gone) => report.network = gone,
        Err(e) => report.kept.push((
            PathBuf::from("network (banger taps, bridge, nftables table inet banger)"),
            format!("{e} (remove them by hand: sudo ip link del <name>; sudo nft delete table inet banger)"),
        )),
    }

    let binary = layout.binary();
    for name in LINK_NAMES {
        let link = layout.link(name);
        if points_at(&link, &binary) {
            fsutil::remove_file_if_exists(&link)?;
            report.removed.push(link);
        } else if link.symlink_metadata().is_ok() {
            report
                .kept
                .push((link, format!("not a link to {}", binary.display())));
        }
    }
    for file in [binary.clone(), layout.binary_previous()] {
        if fsutil::remove_file_if_exists(&file)? {
            report.removed.push(file);
        }
    }
    report
        .removed
        .extend(super::completions::uninstall(layout)?);
    let lib = layout.lib_dir();
    match fs::remove_dir(&lib) {
        Ok(()) => report.removed.push(lib),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(_) => report.kept.push((lib, "not empty".to_string())),
    }

    if purge {
        for dir in [
            layout.state_dir(),
            layout.cache_dir(),
            layout.etc_dir(),
            layout.run_dir(),
            layout.helper_run_dir(),
        ] {
            if fsutil::remove_tree_if_exists(&dir)? {
                report.removed.push(dir);
            }
        }
    }
    Ok(report)
}

/// One unit's state, as `system status` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnitStatus {
    /// Unit name.
    pub unit: String,
    /// The unit file exists.
    pub file_present: bool,
    /// Enabled at boot.
    pub enabled: bool,
    /// Currently active.
    pub active: bool,
}

/// What `banger system status` reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemStatus {
    /// Path of the installed binary.
    pub binary: PathBuf,
    /// The installed binary exists.
    pub binary_present: bool,
    /// install.toml, if present.
    pub install: Option<InstallInfo>,
    /// Every unit, in [`units::ALL_UNITS`] order.
    pub units: Vec<UnitStatus>,
}

impl SystemStatus {
    /// Installed = binary and install.toml both present.
    pub fn installed(&self) -> bool {
        self.binary_present && self.install.is_some()
    }
    /// Installed and every unit active (a socket unit an older install lacks is not required).
    pub fn healthy(&self) -> bool {
        self.installed()
            && self
                .units
                .iter()
                .all(|u| u.active || (units::is_socket(&u.unit) && !u.file_present))
    }
}

impl fmt::Display for SystemStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.installed() {
            writeln!(f, "banger is installed")?;
        } else {
            writeln!(f, "banger is not installed ({HINT_INSTALL})")?;
        }
        let present = if self.binary_present {
            ""
        } else {
            " (missing)"
        };
        writeln!(f, "  binary: {}{present}", self.binary.display())?;
        if let Some(i) = &self.install {
            let short: String = i.commit.chars().take(8).collect();
            writeln!(
                f,
                "  version: v{} (commit {short}, built {})",
                i.version, i.built_at
            )?;
            writeln!(
                f,
                "  owner: {} (uid {}, gid {})",
                i.owner_user, i.owner_uid, i.owner_gid
            )?;
            writeln!(f, "  installed_at: {}", i.installed_at)?;
        }
        for u in &self.units {
            let state = if !u.file_present {
                "no unit file".to_string()
            } else {
                format!(
                    "{}, {}",
                    if u.active { "active" } else { "inactive" },
                    if u.enabled { "enabled" } else { "disabled" }
                )
            };
            writeln!(f, "  {}: {state}", u.unit)?;
        }
        Ok(())
    }
}

/// Reads the install state without changing anything.
pub fn status(layout: &Layout, svc: &dyn ServiceManager) -> Result<SystemStatus> {
    let binary = layout.binary();
    let mut states = vec![];
    for unit in units::ALL_UNITS {
        states.push(UnitStatus {
            unit: unit.to_string(),
            file_present: layout.unit_file(unit).is_file(),
            enabled: svc.is_enabled(unit)?,
            active: svc.is_active(unit)?,
        });
    }
    Ok(SystemStatus {
        binary_present: binary.is_file(),
        binary,
        install: install_toml::load(layout)?,
        units: states,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::system::service::FakeServices;
    use crate::system::testutil::TempDir;
    use std::cell::Cell;

    struct Bed {
        _tmp: TempDir,
        layout: Layout,
        passwd: PathBuf,
        src: PathBuf,
        uid: u32,
        gid: u32,
    }

    fn bed() -> Bed {
        let tmp = TempDir::new();
        let layout = Layout::under(tmp.path().join("root"));
        // The owner is whoever runs the tests, so chown works without root too.
        let uid = rustix::process::geteuid().as_raw();
        let gid = rustix::process::getegid().as_raw();
        let (owner_uid, owner_gid) = if uid == 0 { (1000, 1000) } else { (uid, gid) };
        let passwd = tmp.path().join("passwd");
        fs::write(
            &passwd,
            format!(
                "root:x:0:0:root:/root:/bin/bash\nalice:x:{owner_uid}:{owner_gid}::/home/alice:/bin/sh\n\
                 bob:x:{owner_uid}:{owner_gid}::/home/bob:/bin/sh\n"
            ),
        )
        .unwrap();
        let src = tmp.path().join("banger-src");
        fs::write(&src, b"#!binary v1\n").unwrap();
        fs::create_dir_all(layout.systemd_booted_marker()).unwrap();
        Bed {
            layout,
            passwd,
            src,
            uid: owner_uid,
            gid: owner_gid,
            _tmp: tmp,
        }
    }

    fn run(b: &Bed, owner: &str, svc: &FakeServices) -> Result<InstallReport> {
        install(&b.layout, owner, &b.passwd, &b.src, svc, &|| Ok(()))
    }

    fn mode(p: &Path) -> u32 {
        fs::symlink_metadata(p).unwrap().mode() & 0o7777
    }

    /// Every path under `root`, for "nothing was written" checks.
    fn tree(root: &Path) -> Vec<PathBuf> {
        let mut out = vec![];
        let mut todo = vec![root.to_path_buf()];
        while let Some(d) = todo.pop() {
            for e in fs::read_dir(&d).into_iter().flatten().flatten() {
                let p = e.path();
                if p.is_dir() && !p.is_symlink() {
                    todo.push(p.clone());
                }
                out.push(p);
            }
        }
        out.sort();
        out
    }

    #[test]
    fn refuses_without_systemd_as_pid1_and_writes_nothing() {
        let b = bed();
        let marker = b.layout.systemd_booted_marker();
        for (what, make) in [("missing", None), ("a file, not a directory", Some(false))] {
            let _ = fs::remove_dir_all(b.layout.root());
            if let Some(false) = make {
                fs::create_dir_all(marker.parent().unwrap()).unwrap();
                fs::write(&marker, b"").unwrap();
            }
            let before = tree(b.layout.root());
            let svc = FakeServices::new();
            let e = run(&b, "alice", &svc).unwrap_err().to_string();
            assert!(e.contains("PID 1 is not systemd"), "{what}: {e}");
            assert!(e.contains(&marker.display().to_string()), "{what}: {e}");
            assert_eq!(e.lines().count(), 1, "{what}: not one line: {e}");
            assert_eq!(
                tree(b.layout.root()),
                before,
                "{what}: something was written"
            );
            assert!(
                svc.calls().is_empty(),
                "{what}: systemctl was called: {:?}",
                svc.calls()
            );
        }
        // With the marker directory, the same install goes ahead.
        fs::create_dir_all(&marker).unwrap_or_else(|_| {
            fs::remove_file(&marker).unwrap();
            fs::create_dir_all(&marker).unwrap();
        });
        run(&b, "alice", &FakeServices::new()).unwrap();
        assert!(b.layout.binary().is_file());
    }

    #[test]
    fn fresh_install_lays_out_everything() {
        let b = bed();
        let svc = FakeServices::new();
        let ready = Cell::new(0);
        let r = install(&b.layout, "alice", &b.passwd, &b.src, &svc, &|| {
            ready.set(ready.get() + 1);
            Ok(())
        })
        .unwrap();
        assert_eq!(ready.get(), 1);
        let l = &b.layout;
        assert_eq!(fs::read(l.binary()).unwrap(), b"#!binary v1\n");
        assert_eq!(mode(&l.binary()), 0o755);
        for name in LINK_NAMES {
            assert_eq!(fs::read_link(l.link(name)).unwrap(), l.binary(), "{name}");
        }
        let info = install_toml::load(l).unwrap().unwrap();
        let build = BuildInfo::current();
        assert_eq!(
            (
                info.owner_user.as_str(),
                info.owner_uid,
                info.owner_gid,
                info.owner_home.as_str()
            ),
            ("alice", b.uid, b.gid, "/home/alice")
        );
        assert_eq!(info.build(), build);
        assert_eq!(mode(&l.install_toml()), 0o644);
        let owner = UnitOwner {
            user: "alice".into(),
            gid: b.gid,
        };
        for (unit, text) in units::render_all(l, &owner).unwrap() {
            assert_eq!(fs::read_to_string(l.unit_file(unit)).unwrap(), text);
            assert_eq!(mode(&l.unit_file(unit)), 0o644);
        }
        assert_eq!(mode(&l.state_dir()), 0o750);
        // The cache dir stays root's: update staging lives below it.
        assert_eq!(mode(&l.cache_dir()), 0o755);
        assert_eq!(fs::metadata(l.cache_dir()).unwrap().uid(), 0);
        assert!(r.binary_changed && r.install_toml_changed);
        assert_eq!(r.links_changed.len(), 3);
        assert_eq!(r.units_changed, units::ALL_UNITS);
        assert_eq!(
            svc.actions(),
            [
                "daemon-reload",
                "enable bangerd-root.socket",
                "start bangerd-root.socket",
                "enable bangerd-root.service",
                "start bangerd-root.service",
                "enable bangerd.socket",
                "start bangerd.socket",
                "enable bangerd.service",
                "start bangerd.service",
            ]
        );
        assert!(r.to_string().contains(
            "started: bangerd-root.socket, bangerd-root.service, bangerd.socket, bangerd.service"
        ));
    }

    #[test]
    fn second_install_changes_nothing_and_keeps_installed_at() {
        let b = bed();
        let svc = FakeServices::new();
        run(&b, "alice", &svc).unwrap();
        // Pretend the first install happened long ago.
        let mut info = install_toml::load(&b.layout).unwrap().unwrap();
        info.installed_at = "2020-01-01T00:00:00Z".into();
        install_toml::save(&b.layout, &info).unwrap();
        let unit_before = fs::metadata(b.layout.unit_file(DAEMON_UNIT)).unwrap().ino();

        svc.clear_calls();
        let r = run(&b, "alice", &svc).unwrap();
        assert!(r.is_noop(), "{r:?}");
        assert!(r.to_string().contains("nothing changed"));
        assert_eq!(svc.actions(), ["daemon-reload"]);
        assert_eq!(r.info.installed_at, "2020-01-01T00:00:00Z");
        let after = install_toml::load(&b.layout).unwrap().unwrap();
        assert_eq!(after.installed_at, "2020-01-01T00:00:00Z");
        assert_eq!(
            fs::metadata(b.layout.unit_file(DAEMON_UNIT)).unwrap().ino(),
            unit_before,
            "unchanged unit must not be rewritten"
        );
    }

    /// An install from before socket activation (no socket units, each daemon bound its own
    /// socket): a re-install adds both socket units, starts them, and restarts each service so it
    /// takes its socket from systemd. Nothing else changes.
    #[test]
    fn install_over_an_install_without_sockets_adds_and_starts_them() {
        let b = bed();
        let svc = FakeServices::new();
        run(&b, "alice", &svc).unwrap();
        for socket in [HELPER_SOCKET_UNIT, DAEMON_SOCKET_UNIT] {
            fs::remove_file(b.layout.unit_file(socket)).unwrap();
            svc.set_active(socket, false);
            svc.set_enabled(socket, false);
        }
        svc.clear_calls();
        let r = run(&b, "alice", &svc).unwrap();
        assert_eq!(r.units_changed, [HELPER_SOCKET_UNIT, DAEMON_SOCKET_UNIT]);
        assert!(!r.binary_changed && !r.install_toml_changed);
        assert_eq!(
            svc.actions(),
            [
                "daemon-reload",
                "enable bangerd-root.socket",
                "start bangerd-root.socket",
                "restart bangerd-root.service",
                "enable bangerd.socket",
                "start bangerd.socket",
                "restart bangerd.service",
            ]
        );
        for socket in [HELPER_SOCKET_UNIT, DAEMON_SOCKET_UNIT] {
            assert!(b.layout.unit_file(socket).is_file());
            assert!(svc.active(socket) && svc.enabled(socket), "{socket}");
        }
        // And the next install is a no-op again.
        svc.clear_calls();
        assert!(run(&b, "alice", &svc).unwrap().is_noop());
    }

    #[test]
    fn hand_edited_socket_unit_is_put_back_and_restarted_with_its_service() {
        let b = bed();
        let svc = FakeServices::new();
        run(&b, "alice", &svc).unwrap();
        let path = b.layout.unit_file(HELPER_SOCKET_UNIT);
        let good = fs::read_to_string(&path).unwrap();
        fs::write(&path, good.replace("SocketMode=0600", "SocketMode=0666")).unwrap();
        svc.clear_calls();
        let r = run(&b, "alice", &svc).unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), good);
        assert_eq!(r.units_changed, [HELPER_SOCKET_UNIT]);
        assert_eq!(
            svc.actions(),
            [
                "daemon-reload",
                "restart bangerd-root.socket",
                "restart bangerd-root.service"
            ]
        );
    }

    #[test]
    fn hand_edited_unit_is_put_back_and_restarted() {
        let b = bed();
        let svc = FakeServices::new();
        run(&b, "alice", &svc).unwrap();
        let path = b.layout.unit_file(HELPER_UNIT);
        let good = fs::read_to_string(&path).unwrap();
        fs::write(
            &path,
            good.replace("KillMode=process", "KillMode=control-group"),
        )
        .unwrap();
        svc.clear_calls();
        let r = run(&b, "alice", &svc).unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), good);
        assert_eq!(r.units_changed, [HELPER_UNIT]);
        assert_eq!(r.restarted, [HELPER_UNIT]);
        assert_eq!(
            svc.actions(),
            ["daemon-reload", "restart bangerd-root.service"]
        );
    }

    #[test]
    fn new_binary_restarts_both_running_services() {
        let b = bed();
        let svc = FakeServices::new();
        run(&b, "alice", &svc).unwrap();
        fs::write(&b.src, b"#!binary v2\n").unwrap();
        svc.clear_calls();
        let r = run(&b, "alice", &svc).unwrap();
        assert!(r.binary_changed);
        assert_eq!(fs::read(b.layout.binary()).unwrap(), b"#!binary v2\n");
        assert_eq!(r.restarted, [HELPER_UNIT, DAEMON_UNIT]);
        assert_eq!(
            svc.actions(),
            [
                "daemon-reload",
                "restart bangerd-root.service",
                "restart bangerd.service"
            ]
        );
    }

    #[test]
    fn stopped_services_are_started_not_restarted() {
        let b = bed();
        let svc = FakeServices::new();
        run(&b, "alice", &svc).unwrap();
        svc.set_active(DAEMON_UNIT, false);
        svc.clear_calls();
        let r = run(&b, "alice", &svc).unwrap();
        assert_eq!(r.started, [DAEMON_UNIT]);
        assert_eq!(svc.actions(), ["daemon-reload", "start bangerd.service"]);
    }

    #[test]
    fn installing_from_the_installed_binary_is_a_noop() {
        let b = bed();
        let svc = FakeServices::new();
        run(&b, "alice", &svc).unwrap();
        let r = install(
            &b.layout,
            "alice",
            &b.passwd,
            &b.layout.link("banger"),
            &svc,
            &|| Ok(()),
        )
        .unwrap();
        assert!(r.is_noop(), "{r:?}");
        assert_eq!(fs::read(b.layout.binary()).unwrap(), b"#!binary v1\n");
    }

    #[test]
    fn wrong_links_and_modes_are_repaired() {
        let b = bed();
        let svc = FakeServices::new();
        run(&b, "alice", &svc).unwrap();
        let l = &b.layout;
        fs::remove_file(l.link("banger")).unwrap();
        std::os::unix::fs::symlink("/elsewhere", l.link("banger")).unwrap();
        fs::remove_file(l.link("bangerd")).unwrap();
        fs::write(l.link("bangerd"), b"stray copy").unwrap();
        fs::set_permissions(l.binary(), fs::Permissions::from_mode(0o700)).unwrap();
        let r = run(&b, "alice", &svc).unwrap();
        assert_eq!(r.links_changed, [l.link("banger"), l.link("bangerd")]);
        assert!(r.binary_changed);
        assert_eq!(mode(&l.binary()), 0o755);
        for name in LINK_NAMES {
            assert_eq!(fs::read_link(l.link(name)).unwrap(), l.binary());
        }
        // No temp links left behind.
        assert_eq!(fs::read_dir(l.bin_dir()).unwrap().count(), 3);
    }

    #[test]
    fn owner_change_rewrites_daemon_unit_and_restarts_both() {
        let b = bed();
        let svc = FakeServices::new();
        run(&b, "alice", &svc).unwrap();
        svc.clear_calls();
        let r = run(&b, "bob", &svc).unwrap();
        assert_eq!(r.info.owner_user, "bob");
        assert!(r.install_toml_changed);
        // Both sockets belong to the owner (SocketUser=), and the daemon runs as the owner.
        assert_eq!(
            r.units_changed,
            [HELPER_SOCKET_UNIT, DAEMON_SOCKET_UNIT, DAEMON_UNIT]
        );
        assert_eq!(
            r.restarted,
            [
                HELPER_SOCKET_UNIT,
                HELPER_UNIT,
                DAEMON_SOCKET_UNIT,
                DAEMON_UNIT
            ]
        );
        let socket = fs::read_to_string(b.layout.unit_file(HELPER_SOCKET_UNIT)).unwrap();
        assert!(socket.contains("\nSocketUser=bob\n"));
        let unit = fs::read_to_string(b.layout.unit_file(DAEMON_UNIT)).unwrap();
        assert!(unit.contains("\nUser=bob\n"));
    }

    #[test]
    fn owner_errors() {
        let b = bed();
        let svc = FakeServices::new();
        let e = run(&b, "nosuch", &svc).unwrap_err();
        assert!(e.to_string().contains("no such user"), "{e}");
        assert!(e.hint.unwrap().contains("--owner"));
        let e = run(&b, "root", &svc).unwrap_err();
        assert!(e.to_string().contains("must not be root"), "{e}");
        assert!(
            !b.layout.binary().exists(),
            "nothing installed on a bad owner"
        );
        assert!(svc.calls().is_empty());
        // A numeric owner resolves by uid.
        assert_eq!(
            resolve_owner(&b.passwd, &b.uid.to_string()).unwrap().uid,
            b.uid
        );
    }

    #[test]
    fn service_and_readiness_failures_propagate() {
        let b = bed();
        let svc = FakeServices::new();
        svc.fail_once("start bangerd.service");
        let e = run(&b, "alice", &svc).unwrap_err();
        assert!(
            e.to_string().contains("journalctl -u bangerd.service"),
            "{e}"
        );
        let e = install(&b.layout, "alice", &b.passwd, &b.src, &svc, &|| {
            Err(Error::new("waiting for bangerd", "timed out").hint("see journalctl -u bangerd"))
        })
        .unwrap_err();
        assert!(e.to_string().contains("journalctl -u bangerd"), "{e}");
        // The retry (after the failed start) started the daemon.
        assert!(svc.active(DAEMON_UNIT));
    }

    #[test]
    fn missing_source_binary_is_reported() {
        let b = bed();
        let e = install(
            &b.layout,
            "alice",
            &b.passwd,
            &b.src.with_file_name("nope"),
            &FakeServices::new(),
            &|| Ok(()),
        )
        .unwrap_err();
        assert!(e.what.contains("nope"), "{e}");
    }

    #[test]
    fn uninstall_purge_and_second_uninstall() {
        let b = bed();
        let svc = FakeServices::new();
        run(&b, "alice", &svc).unwrap();
        let l = &b.layout;
        fs::write(l.binary_previous(), b"old").unwrap();
        fs::write(l.state_db(), b"db").unwrap();
        // A link we do not own is left alone.
        fs::remove_file(l.link("banger")).unwrap();
        std::os::unix::fs::symlink("/opt/other/banger", l.link("banger")).unwrap();
        svc.clear_calls();

        let r = uninstall(l, false, &svc).unwrap();
        assert_eq!(
            svc.actions(),
            [
                "stop bangerd.socket",
                "stop bangerd.service",
                "disable bangerd.socket",
                "disable bangerd.service",
                "stop bangerd-root.socket",
                "stop bangerd-root.service",
                "disable bangerd-root.socket",
                "disable bangerd-root.service",
                "daemon-reload",
            ]
        );
        for p in [
            l.unit_file(DAEMON_SOCKET_UNIT),
            l.unit_file(DAEMON_UNIT),
            l.unit_file(HELPER_SOCKET_UNIT),
            l.unit_file(HELPER_UNIT),
            l.link("bangerd"),
            l.link("bangerd-root"),
            l.binary(),
            l.binary_previous(),
            l.lib_dir(),
        ] {
            assert!(p.symlink_metadata().is_err(), "{} still there", p.display());
            assert!(r.removed.contains(&p), "{} not reported", p.display());
        }
        assert!(l.link("banger").symlink_metadata().is_ok());
        assert_eq!(r.kept.len(), 1);
        assert!(
            l.state_db().exists() && l.install_toml().exists(),
            "state kept without --purge"
        );

        svc.clear_calls();
        let r = uninstall(l, true, &svc).unwrap();
        assert!(svc.actions().is_empty(), "{:?}", svc.actions());
        for d in [l.state_dir(), l.cache_dir(), l.etc_dir()] {
            assert!(!d.exists(), "{} still there", d.display());
        }
        assert_eq!(r.stopped.len() + r.disabled.len(), 0);

        let r = uninstall(l, true, &svc).unwrap();
        assert!(r.is_noop(), "{r:?}");
        assert!(svc.actions().is_empty());
        assert!(r.to_string().starts_with("banger is not installed"));
    }

    #[test]
    fn uninstall_purges_the_network_and_survives_a_failed_purge() {
        let b = bed();
        let svc = FakeServices::new();
        run(&b, "alice", &svc).unwrap();
        let calls = std::cell::Cell::new(0);
        let net = |_: &Layout| {
            calls.set(calls.get() + 1);
            Ok(vec![
                "tap bgr-0a0a0a0a0a".to_string(),
                "bridge banger0".to_string(),
            ])
        };
        let r = uninstall_with_network(&b.layout, false, &svc, &net).unwrap();
        assert_eq!(calls.get(), 1);
        let text = r.to_string();
        assert!(text.contains("  removed bridge banger0\n"), "{text}");
        assert!(text.contains("  removed tap bgr-0a0a0a0a0a\n"), "{text}");
        // Only network objects left: still not a no-op.
        let r = uninstall_with_network(&b.layout, false, &svc, &net).unwrap();
        assert!(!r.is_noop());
        let failing = |_: &Layout| -> Result<Vec<String>> {
            Err(crate::error::Error::new("running `nft`", "missing"))
        };
        let r = uninstall_with_network(&b.layout, true, &svc, &failing).unwrap();
        assert!(
            r.to_string().contains("nft delete table inet banger"),
            "{r}"
        );
        assert!(
            !b.layout.state_dir().exists(),
            "the rest of the uninstall still ran"
        );
        // A relocated layout never purges the namespace it runs in.
        assert!(uninstall(&b.layout, true, &svc).unwrap().network.is_empty());
    }

    #[test]
    fn status_reports_install_and_units() {
        let b = bed();
        let svc = FakeServices::new();
        let s = status(&b.layout, &svc).unwrap();
        assert!(!s.installed() && !s.healthy());
        assert!(s
            .to_string()
            .contains("not installed (run sudo banger system install"));
        run(&b, "alice", &svc).unwrap();
        let s = status(&b.layout, &svc).unwrap();
        assert!(s.installed() && s.healthy());
        let text = s.to_string();
        assert!(text.contains("  owner: alice"), "{text}");
        assert!(
            text.contains("  bangerd.service: active, enabled"),
            "{text}"
        );
        svc.set_active(DAEMON_UNIT, false);
        assert!(!status(&b.layout, &svc).unwrap().healthy());
    }
}
