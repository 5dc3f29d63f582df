//! `banger update`, top to bottom: DESIGN.md §8's eleven steps, one function per step.
//!
//! This module owns the *order* of the update, the journal records around every host change, and
//! the rollback policy. The mechanics live below it: [`super::manifest`], [`super::download`],
//! [`super::signature`], [`super::staging`], [`super::swap`], [`super::journal`]. Everything the
//! flow needs from the outside world comes in through [`Seams`] (service manager, HTTP fetcher,
//! daemon probe, program runner), so every refusal and rollback branch is unit-tested with fakes
//! while the CLI and the smoke suite run the same code for real.
//!
//! It must never touch a VM: there is no VM call anywhere in here. VMs survive restarts of
//! `bangerd-root` and `bangerd` by design (DESIGN §6), which is what makes restarting safe.
//!
//! Order of events (`run`):
//! 0. As root, first finish or roll back an update a crash left behind (its journal), then stop.
//! 1. Fetch the manifest, choose the target; unknown versions fail before anything changes.
//! 2. `--check`: one line, no root.
//! 3. Root and an existing install are required from here.
//! 4. Refuse while the daemon has operations in flight (`--force` overrides).
//! 5. Stage: signature before hash, hash before extract.
//! 6. Sanity-run the staged binary.
//! 7. `--dry-run` stops here.
//!    When the staged daemon reports pending migrations, snapshot `state.db` into the staging
//!    dir (refusing, with nothing changed, when it cannot be written).
//! 8. Swap (journalled; the snapshot is recorded first).
//! 9. Restart `bangerd-root`, then `bangerd`; wait for the daemon.
//! 10. Run the new `banger doctor`.
//! 11. Record build info in install.toml, drop `.previous`, wipe staging.
//!
//! Rollback: a failure in 8 restores the binary only (the old services never stopped); a failure
//! in 9 or 10 restores the binary and restarts both units, then reports the original error with
//! "(rolled back to previous install)"; when that fails too, the error says everything known for a
//! manual repair and the journal stays, so the next `banger update` retries the rollback. A failure
//! in 11 leaves the verified new version running and the journal says so: the next
//! `banger update` finishes the record.
//!
//! The database: a release whose daemon migrates `state.db` makes it unreadable to the old daemon
//! (it refuses migrations it does not know). So when the staged binary's `--check-migrations`
//! says "pending", a consistent copy of the live database is taken before the swap
//! ([`crate::store::backup`], `VACUUM INTO` from a read-only connection, into the staging dir); a
//! rollback at or after a restart stops `bangerd`, puts the copy back (owner and mode kept,
//! `-wal`/`-shm` removed) and only then restarts both units; step 11 deletes it. What the daemons
//! wrote between the snapshot and the rollback is lost with it (the update window: no operations
//! are in flight unless `--force`); VMs themselves are re-adopted from their `handles.json` as after
//! any restart. The copy costs the database's size in the staging filesystem and a full read of
//! the database (see `docs/architecture.md`).

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::download::{self, Fetcher, TtyProgress};
use super::journal::{
    self, DbSnapshot, DiskState, FileState, Journal, RecoveryPlan, Step, UpdateInfo,
};
use super::manifest::{Manifest, Release};
use super::sha256sums::Sha256Sums;
use super::signature::{self, KeySource};
use super::staging::{self, StagingPaths};
use super::swap;
use super::version::{self, Direction, Version};
use crate::buildinfo::{parse_one_line_version, BuildInfo};
use crate::error::{Error, Result};
use crate::layout::{Layout, DAEMON_UNIT, HELPER_UNIT};
use crate::store::backup;
use crate::system::install_toml;
use crate::system::service::ServiceManager;

/// How long the staged binary may take to print `--version`.
const VERSION_TIMEOUT: Duration = Duration::from_secs(15);
/// How long `bangerd --check-migrations` may take.
const MIGRATIONS_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the new `banger doctor` may take.
const DOCTOR_TIMEOUT: Duration = Duration::from_secs(120);
/// Most output kept from a program the flow runs (per stream).
const OUTPUT_CAP: u64 = 256 << 10;

/// What the operator asked for.
#[derive(Debug, Clone)]
pub struct Options {
    /// `--check`: report whether an update is available, change nothing.
    pub check: bool,
    /// `--to vX.Y.Z`: the version to install instead of `latest_stable`.
    pub to: Option<String>,
    /// `--force`: update even while operations are in flight.
    pub force: bool,
    /// `--dry-run`: stage, verify and sanity-run, then stop.
    pub dry_run: bool,
    /// `--allow-downgrade`: with `--to`, allow an older version.
    pub allow_downgrade: bool,
    /// Where the manifest is (compiled-in default; hidden `--manifest-url`).
    pub manifest_url: String,
    /// Which keys verify `SHA256SUMS` (embedded; hidden `--pubkey-file`).
    pub keys: KeySource,
    /// The running version (the one being replaced).
    pub running: String,
    /// Whether we run as root (the CLI checks the effective uid).
    pub is_root: bool,
}

/// What a program the flow ran did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunOutput {
    /// Exit code; `None` when a signal ended it.
    pub code: Option<i32>,
    /// Its standard output (capped, lossy UTF-8).
    pub stdout: String,
    /// Its standard error (capped, lossy UTF-8).
    pub stderr: String,
}

impl RunOutput {
    /// `exit N` or `killed by a signal`.
    pub fn status(&self) -> String {
        match self.code {
            Some(c) => format!("exit {c}"),
            None => "killed by a signal".to_string(),
        }
    }

    /// The last non-empty line of stderr, else of stdout (for error messages).
    pub fn last_line(&self) -> String {
        [&self.stderr, &self.stdout]
            .iter()
            .find_map(|s| s.lines().rev().find(|l| !l.trim().is_empty()))
            .unwrap_or("no output")
            .trim()
            .to_string()
    }
}

/// Runs a program and captures its output (the seam over "exec the new binary").
pub trait Runner {
    /// Runs `program ARGS…` with stdin closed, waiting at most `timeout`.
    fn run(&self, program: &Path, args: &[&str], timeout: Duration) -> Result<RunOutput>;
}

/// What the flow needs from the daemon.
pub trait DaemonProbe {
    /// Operations that are not done, one description each; `Ok(None)` when no daemon answers.
    fn unfinished_operations(&self) -> Result<Option<Vec<String>>>;
    /// Waits (bounded) until the daemon answers.
    fn wait_ready(&self) -> Result<()>;
}

/// The outside world, passed in.
pub struct Seams<'a> {
    /// systemd (or a fake).
    pub services: &'a dyn ServiceManager,
    /// HTTP (or a fake).
    pub fetcher: &'a dyn Fetcher,
    /// The daemon's operations list and readiness.
    pub daemon: &'a dyn DaemonProbe,
    /// Runs the staged and the installed binary.
    pub runner: &'a dyn Runner,
    /// One progress line (the CLI prints it on stderr).
    pub say: &'a dyn Fn(&str),
}

/// How an update run ended; `Display` is the one line for stdout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The target is the running version.
    UpToDate {
        /// The running version.
        running: Version,
    },
    /// `--check` while the running version is newer than the latest release.
    Ahead {
        /// The running version.
        running: Version,
        /// The manifest's latest.
        latest: Version,
    },
    /// `--check` found an update.
    Available {
        /// The running version.
        from: Version,
        /// The target.
        to: Version,
    },
    /// `--dry-run` staged and verified the target and stopped.
    DryRun {
        /// The running version.
        from: Version,
        /// The target.
        to: Version,
        /// The staging dir, left in place.
        staged: PathBuf,
    },
    /// The update is installed, restarted, healthy and recorded.
    Updated {
        /// The previous version.
        from: Version,
        /// The new version.
        to: Version,
    },
    /// An interrupted update was finished or rolled back; nothing else was done.
    Recovered {
        /// What happened, one sentence.
        what: String,
    },
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::UpToDate { running } => write!(f, "up to date ({running})"),
            Outcome::Ahead { running, latest } => write!(
                f,
                "up to date ({running} is newer than the latest release {latest})"
            ),
            Outcome::Available { from, to } => write!(f, "update available: {from} -> {to}"),
            Outcome::DryRun { from, to, staged } => write!(
                f,
                "dry run: would update {from} -> {to}; verified and staged in {} (nothing installed; run without --dry-run to install)",
                staged.display()
            ),
            Outcome::Updated { from, to } => write!(f, "updated {from} -> {to}"),
            Outcome::Recovered { what } => write!(f, "{what}"),
        }
    }
}

/// Runs `banger update` against `layout`.
pub fn run(layout: &Layout, opts: &Options, seams: &Seams) -> Result<Outcome> {
    let running = Version::parse(&opts.running)?;
    // An interrupted update is finished or rolled back first (under the lock), even offline.
    // Otherwise nothing on the host changes — not even the lock file — until the target is known
    // and every refusal of steps 1-4 has had its say: the lock is taken just before staging.
    // (An unreadable journal counts as pending: recovery reports it.)
    let pending = !journal::Journal::read(layout).is_ok_and(|r| journal::is_finished(&r));
    let mut lock = None;
    if opts.is_root && !opts.check && pending {
        lock = Some(UpdateLock::acquire(layout)?);
        if let Some(done) = recover_interrupted_update(layout, opts, seams)? {
            return Ok(done);
        }
    } else if opts.check && pending {
        (seams.say)("note: an interrupted update is pending; run sudo banger update to finish or roll it back");
    }
    let target = fetch_manifest_and_choose_target(opts, seams, &running)?; // 1
    if opts.check {
        return Ok(report_check(&target)); // 2
    }
    if target.direction == Some(Direction::UpToDate) {
        return Ok(Outcome::UpToDate { running });
    }
    require_root_and_an_install(layout, opts, &target)?; // 3
    refuse_while_operations_in_flight(opts, seams)?; // 4
    let _lock = match lock {
        Some(l) => l,
        None => {
            let l = UpdateLock::acquire(layout)?;
            // An update that crashed since we looked is handled before this one starts.
            if let Some(done) = recover_interrupted_update(layout, opts, seams)? {
                return Ok(done);
            }
            l
        }
    };
    let (staged, migrates) =
        match stage_verified_release(layout, opts, seams, &target) // 5
        .and_then(|s| sanity_run_staged_binary(seams, &s, &target).map(|m| (s, m))) // 6
    {
        Ok(s) => s,
        Err(e) => {
            let _ = staging::wipe(layout);
            return Err(e);
        }
    };
    if opts.dry_run {
        return Ok(stop_for_dry_run(&target, &staged)); // 7
    }
    let snapshot = if migrates {
        match snapshot_database(layout, seams) {
            Ok(s) => Some(s),
            Err(e) => {
                let _ = staging::wipe(layout);
                return Err(e);
            }
        }
    } else {
        None
    };
    let mut journal = swap_in_new_binary(layout, seams, &staged, &target, snapshot)?; // 8
    let mut restarted = false;
    let verified = restart_services(seams, &mut journal, &mut restarted) // 9
        .and_then(|()| run_new_doctor(layout, seams, &mut journal)); // 10
    if let Err(e) = verified {
        return Err(roll_back(layout, seams, &mut journal, e, restarted));
    }
    record_and_commit(layout, seams, &mut journal, &target.to)?; // 11
    Ok(Outcome::Updated {
        from: target.from,
        to: target.to,
    })
}

/// Step 0: an update a crash left behind is finished or rolled back before anything else; then
/// the run stops (`Some`), so the operator sees what state the host is in before updating again.
fn recover_interrupted_update(
    layout: &Layout,
    opts: &Options,
    seams: &Seams,
) -> Result<Option<Outcome>> {
    let path = journal::path(layout);
    let records = Journal::read(layout).map_err(|e| {
        let hint = format!(
            "inspect it; if {} works, move {} aside and run sudo banger update again",
            layout.binary().display(),
            layout.updates_dir().display()
        );
        e.hint(hint)
    })?;
    if journal::is_finished(&records) {
        return Ok(None);
    }
    if opts.dry_run {
        return Err(Error::new(
            "starting a dry run",
            format!("{} records an interrupted update", path.display()),
        )
        .hint("run sudo banger update (without --dry-run) to finish or roll it back first"));
    }
    let info = records.first().and_then(|r| r.info.clone());
    let (from, to) = info
        .as_ref()
        .map(|i| (format!("v{}", i.from), format!("v{}", i.to)))
        .unwrap_or_else(|| ("the previous version".into(), "the new version".into()));
    let say = seams.say;
    say(&format!(
        "found an interrupted update {from} -> {to} in {}; recovering it first",
        path.display()
    ));
    let (restart, restore_db) = match journal::recovery_plan(&records, layout) {
        RecoveryPlan::Nothing => return Ok(None),
        RecoveryPlan::Discard => (false, false),
        RecoveryPlan::RollBack {
            restart_services,
            restore_db,
        } => (restart_services, restore_db),
        RecoveryPlan::Finish => {
            let target = info
                .as_ref()
                .map(|i| Version::parse(&i.to))
                .transpose()?
                .ok_or_else(|| Error::new("finishing the interrupted update", "no target"))?;
            let mut j = Journal::open(layout)?;
            j.append(Step::CommitBegin)?;
            record_build_info(layout, seams, &target)?;
            swap::commit(layout)?;
            remove_db_snapshot(layout)?;
            j.append(Step::Done)?;
            staging::wipe(layout)?;
            return Ok(Some(Outcome::Recovered {
                what: format!("finished the interrupted update {from} -> {to}: {to} is installed"),
            }));
        }
        RecoveryPlan::Manual { reason } => {
            return Err(Error::new(
                format!("recovering the interrupted update recorded in {}", path.display()),
                reason,
            )
            .hint(format!(
                "manual repair: put a working banger at {} (reinstall it with sudo banger system install --owner USER), then remove {}",
                layout.binary().display(),
                layout.updates_dir().display()
            )))
        }
    };
    let mut j = Journal::open(layout)?;
    swap::restore(layout, &mut j)?;
    say(&format!("restored {from} at {}", layout.binary().display()));
    if restore_db {
        restore_database(layout, seams, &mut j).map_err(|e| {
            let hint = format!(
                "{from} is back in place but its database is not; {}",
                database_repair_hint(layout, &j)
            );
            e.hint(hint)
        })?;
    }
    if restart {
        j.append(Step::RollbackRestartBegin)?;
        restart_both(seams).map_err(|e| {
            let hint = format!(
                "{from} is back in place but the services did not restart; see journalctl -u {HELPER_UNIT} -u {DAEMON_UNIT}, then run sudo banger update again"
            );
            e.hint(hint)
        })?;
        j.append(Step::RollbackRestartDone)?;
    }
    j.append(Step::RollbackDone)?;
    staging::wipe(layout)?;
    Ok(Some(Outcome::Recovered {
        what: format!(
            "rolled back the interrupted update {from} -> {to}: {from} is installed (run sudo banger update again to update)"
        ),
    }))
}

/// The chosen target and how it relates to the running version.
#[derive(Debug, Clone)]
struct Target {
    release: Release,
    from: Version,
    to: Version,
    /// `None`: the running version is newer than `latest_stable` (only reported by `--check`).
    direction: Option<Direction>,
}

/// Step 1: fetch the manifest and choose the target; an unknown version fails here, before
/// anything on the host changes.
fn fetch_manifest_and_choose_target(
    opts: &Options,
    seams: &Seams,
    running: &Version,
) -> Result<Target> {
    (seams.say)(&format!(
        "fetching the release manifest {}",
        opts.manifest_url
    ));
    let bytes = download::to_memory(
        seams.fetcher,
        &opts.manifest_url,
        "the release manifest",
        download::MANIFEST_MAX,
    )?;
    let manifest = Manifest::parse(&bytes, &opts.manifest_url)?;
    let release = manifest.target(opts.to.as_deref())?.clone();
    let explicit = opts.to.is_some();
    let direction = match version::decide(running, &release.version, explicit, opts.allow_downgrade)
    {
        Ok(d) => Some(d),
        Err(_) if opts.check && !explicit => None,
        Err(e) => return Err(e),
    };
    Ok(Target {
        from: running.clone(),
        to: release.version.clone(),
        release,
        direction,
    })
}

/// Step 2: `--check` reports in one line and changes nothing.
fn report_check(target: &Target) -> Outcome {
    match target.direction {
        Some(Direction::UpToDate) => Outcome::UpToDate {
            running: target.from.clone(),
        },
        None => Outcome::Ahead {
            running: target.from.clone(),
            latest: target.to.clone(),
        },
        Some(_) => Outcome::Available {
            from: target.from.clone(),
            to: target.to.clone(),
        },
    }
}

/// Step 3: from here on the host changes, so root is required and banger must be installed.
fn require_root_and_an_install(layout: &Layout, opts: &Options, target: &Target) -> Result<()> {
    let what = format!("updating banger {} to {}", target.from, target.to);
    if !opts.is_root {
        let mut cmd = "sudo banger update".to_string();
        if let Some(to) = &opts.to {
            cmd += &format!(" --to {to}");
        }
        return Err(Error::new(what, "root is required").hint(format!("run: {cmd}")));
    }
    let binary = layout.binary();
    let installed = std::fs::symlink_metadata(&binary).is_ok_and(|m| m.is_file());
    if !installed || install_toml::load(layout)?.is_none() {
        return Err(Error::new(
            what,
            format!(
                "banger is not installed here ({} or {} is missing)",
                binary.display(),
                layout.install_toml().display()
            ),
        )
        .hint("install it first: sudo banger system install --owner USER"));
    }
    Ok(())
}

/// Step 4: restarting the daemon would cut an operation short, so refuse while any is in flight
/// (`--force` overrides). A daemon that does not answer is no reason to refuse: updating is how a
/// broken install gets fixed.
fn refuse_while_operations_in_flight(opts: &Options, seams: &Seams) -> Result<()> {
    let say = seams.say;
    match seams.daemon.unfinished_operations() {
        Ok(None) => {
            say("the daemon is not running; continuing (the update restarts it)");
            Ok(())
        }
        Ok(Some(ops)) if ops.is_empty() => Ok(()),
        Ok(Some(ops)) if opts.force => {
            say(&format!(
                "--force: updating although {} operation(s) are in flight: {}",
                ops.len(),
                ops.join("; ")
            ));
            Ok(())
        }
        Ok(Some(ops)) => Err(Error::new(
            "updating banger",
            format!(
                "{} operation(s) are in flight: {}",
                ops.len(),
                ops.join("; ")
            ),
        )
        .hint("wait for them to finish and run it again, or pass --force (running VMs keep running either way)")),
        Err(e) if opts.force => {
            say(&format!("--force: cannot list operations ({e}); continuing"));
            Ok(())
        }
        Err(e) => Err(e.hint(
            "cannot tell whether operations are in flight; pass --force to update anyway",
        )),
    }
}

/// A verified, extracted release in the staging dir.
#[derive(Debug, Clone)]
struct Staged {
    paths: StagingPaths,
    binary: PathBuf,
}

/// Step 5: stage into a clean staging dir. The signature is checked before the hash list is
/// believed, the tarball's streamed hash before it is opened.
fn stage_verified_release(
    layout: &Layout,
    opts: &Options,
    seams: &Seams,
    target: &Target,
) -> Result<Staged> {
    let say = seams.say;
    let release = &target.release;
    let keys = signature::trusted_keys(&opts.keys)?;
    if let KeySource::File(file) = &opts.keys {
        announce_key_override(layout, seams, file, &keys);
    }
    let paths = staging::prepare(layout)?;
    say(&format!("downloading SHA256SUMS for {}", target.to));
    let sums_bytes = download::to_memory(
        seams.fetcher,
        &release.sha256sums_url,
        "SHA256SUMS",
        download::SHA256SUMS_MAX,
    )?;
    let sig = download::to_memory(
        seams.fetcher,
        &release.sha256sums_sig_url,
        "SHA256SUMS.sig",
        download::SIGNATURE_MAX,
    )?;
    let key = signature::verify(&keys, &sums_bytes, &sig)?;
    say(&format!("SHA256SUMS signature verified ({})", key.label()));
    let sums = Sha256Sums::parse(&sums_bytes)?;
    let name = release.tarball_file_name()?;
    sums.expect(&name)?;
    for (p, bytes) in [(&paths.sha256sums, &sums_bytes), (&paths.signature, &sig)] {
        std::fs::write(p, bytes).map_err(|e| Error::new(format!("writing {}", p.display()), e))?;
    }
    say(&format!("downloading {name}"));
    let mut bar = TtyProgress::stderr(&format!("downloading {name}"));
    let mut progress = |done: u64, total: Option<u64>| bar.update(done, total);
    let tarball = download::to_file(
        seams.fetcher,
        &release.tarball_url,
        "the release tarball",
        &paths.tarball(&name),
        download::TARBALL_MAX,
        Some(&mut progress),
    );
    bar.finish();
    let tarball = tarball?;
    let binary = staging::stage(&paths, &tarball, &name, &sums)?;
    say(&format!(
        "{name} matches the signed SHA256SUMS; extracted {}",
        binary.display()
    ));
    Ok(Staged { paths, binary })
}

/// A `--pubkey-file` replaces the keys built into banger: say so loudly, once per run, naming the
/// file and each key's fingerprint, and put the same line in the system log (`/dev/log`, which
/// journald reads) so the override is on record after the terminal is gone.
fn announce_key_override(
    layout: &Layout,
    seams: &Seams,
    file: &Path,
    keys: &[signature::PublicKey],
) {
    let fps: Vec<String> = keys.iter().map(|k| k.fingerprint()).collect();
    let line = format!(
        "WARNING: trusting release signing key{} {} from --pubkey-file {} INSTEAD OF the keys built into banger",
        if fps.len() == 1 { "" } else { "s" },
        fps.join(", "),
        file.display()
    );
    match log_to_syslog(&layout.syslog_socket(), &line) {
        Ok(()) => (seams.say)(&line),
        Err(e) => (seams.say)(&format!(
            "{line} (not in the system log: {}: {e})",
            layout.syslog_socket().display()
        )),
    }
}

/// Sends `msg` to the syslog datagram socket at `socket` as `banger-update[pid]`, priority
/// user.warning. The message is one line.
fn log_to_syslog(socket: &Path, msg: &str) -> std::io::Result<()> {
    let s = std::os::unix::net::UnixDatagram::unbound()?;
    let line = format!(
        "<12>banger-update[{}]: {}",
        std::process::id(),
        msg.replace('\n', " ")
    );
    s.send_to(line.as_bytes(), socket).map(|_| ())
}

/// Step 6: run the staged binary before trusting it: it must say it is the target, and its daemon
/// must accept the installed database (`--check-migrations`: 0 or 1 go, 2 aborts). Returns true
/// when its daemon will migrate the database (1).
fn sanity_run_staged_binary(seams: &Seams, staged: &Staged, target: &Target) -> Result<bool> {
    let what = format!("sanity-running the staged {}", target.to);
    let out = seams
        .runner
        .run(&staged.binary, &["--version"], VERSION_TIMEOUT)?;
    let named = parse_one_line_version(&out.stdout).and_then(|v| Version::parse(&v).ok());
    match named {
        Some(v) if out.code == Some(0) && v == target.to => {}
        _ => {
            return Err(Error::new(
                &what,
                format!(
                    "its --version ({}) does not name {}: {}",
                    out.status(),
                    target.to,
                    out.last_line()
                ),
            )
            .hint("the release is mislabelled; nothing was installed"))
        }
    }
    let out = seams.runner.run(
        &staged.binary,
        &["--role", "bangerd", "--check-migrations", "--system"],
        MIGRATIONS_TIMEOUT,
    )?;
    match out.code {
        Some(c @ (0 | 1)) => {
            (seams.say)(&format!(
                "staged {} runs; database: {}",
                target.to,
                out.stdout.trim()
            ));
            Ok(c == 1)
        }
        Some(2) => Err(Error::new(
            &what,
            format!(
                "its daemon cannot use the installed database: {}",
                out.last_line()
            ),
        )
        .hint("the database is newer than that release; install a newer version (banger update --check)")),
        _ => Err(Error::new(
            &what,
            format!(
                "bangerd --check-migrations failed ({}): {}",
                out.status(),
                out.last_line()
            ),
        )
        .hint("the release does not run on this host; nothing was installed")),
    }
}

/// Step 7: `--dry-run` stops with the plan and leaves the staging dir for inspection.
fn stop_for_dry_run(target: &Target, staged: &Staged) -> Outcome {
    Outcome::DryRun {
        from: target.from.clone(),
        to: target.to.clone(),
        staged: staged.paths.dir.clone(),
    }
}

/// Before step 8, only when the new daemon will migrate the database: a consistent copy of
/// `state.db` in the staging dir, for a rollback to put back. Nothing on the host changes here; a
/// copy that cannot be written (no room, I/O error) refuses the update.
fn snapshot_database(layout: &Layout, seams: &Seams) -> Result<DbSnapshot> {
    let say = seams.say;
    let db = layout.state_db();
    let dest = layout.updates_dir().join(journal::DB_SNAPSHOT_FILE);
    say(&format!(
        "the new release migrates the database; snapshotting {} to {}",
        db.display(),
        dest.display()
    ));
    let started = Instant::now();
    let refused = |e: Error| {
        let mut hint = e.hint.clone().unwrap_or_default();
        if !hint.contains("nothing was changed") {
            if !hint.is_empty() {
                hint.push_str("; ");
            }
            hint.push_str("the update stopped before the swap: nothing was changed");
        }
        e.hint(hint)
    };
    let Some(snap) = backup::snapshot(&db, &dest).map_err(refused)? else {
        say(&format!(
            "{} does not exist yet; a rollback removes the one the new daemon creates",
            db.display()
        ));
        return Ok(DbSnapshot {
            file: None,
            sha256: None,
            bytes: 0,
            uid: 0,
            gid: 0,
            mode: 0,
        });
    };
    let sha256 = super::sha256_file(&dest).map_err(refused)?;
    say(&format!(
        "database snapshot taken: {} bytes in {} ms",
        snap.bytes,
        started.elapsed().as_millis()
    ));
    Ok(DbSnapshot {
        file: Some(journal::DB_SNAPSHOT_FILE.to_string()),
        sha256: Some(sha256),
        bytes: snap.bytes,
        uid: snap.owner.uid,
        gid: snap.owner.gid,
        mode: snap.owner.mode,
    })
}

/// Rolling back at or after a restart, when the update took a database snapshot: stop `bangerd`
/// (the new daemon may have migrated the database and still hold it open), put the snapshot back
/// and only then let the caller restart the units. The snapshot is checked against its recorded
/// hash before anything is stopped. Journalled `db.restore.begin` / `db.restored`; re-running it
/// after a crash is safe (the snapshot stays in the staging dir until the rollback is done).
fn restore_database(layout: &Layout, seams: &Seams, journal: &mut Journal) -> Result<()> {
    let Some(snap) = journal.db_snapshot().cloned() else {
        return Ok(());
    };
    let db = layout.state_db();
    let what = || format!("putting back {} as it was before the update", db.display());
    let file = match &snap.file {
        None => None,
        Some(name) if name == journal::DB_SNAPSHOT_FILE => {
            let p = layout.updates_dir().join(name);
            let got = super::sha256_file(&p).map_err(|e| Error::new(what(), e))?;
            if snap.sha256.as_deref() != Some(got.as_str()) {
                return Err(Error::new(
                    what(),
                    format!(
                        "the snapshot {} has sha256 {got}, not the recorded {}",
                        p.display(),
                        snap.sha256.as_deref().unwrap_or("(none)")
                    ),
                ));
            }
            Some(p)
        }
        Some(other) => {
            return Err(Error::new(
                what(),
                format!("the journal names an unexpected snapshot file {other:?}"),
            ))
        }
    };
    journal.append(Step::DbRestoreBegin)?;
    (seams.say)(&format!(
        "stopping {DAEMON_UNIT} to put back the database as it was before the update"
    ));
    // Its socket too: left listening, the next client would start a daemon on the database being
    // put back. Clients are refused until the rollback restarts the daemon (which starts the
    // socket again, through `Requires=`): only on this path, never on an update's restarts.
    // (An install from before socket activation has no socket unit: nothing to stop.)
    let socket = crate::system::units::DAEMON_SOCKET_UNIT;
    if seams.services.is_active(socket)? {
        seams.services.stop(socket)?;
    }
    seams.services.stop(DAEMON_UNIT)?;
    let owner = backup::FileOwner {
        uid: snap.uid,
        gid: snap.gid,
        mode: snap.mode,
    };
    backup::restore(file.as_deref(), &db, owner)?;
    journal.append(Step::DbRestored)?;
    (seams.say)(&format!("restored {}", db.display()));
    Ok(())
}

/// What a person does when the database could not be put back automatically.
fn database_repair_hint(layout: &Layout, journal: &Journal) -> String {
    let db = layout.state_db();
    match journal.db_snapshot() {
        Some(DbSnapshot {
            file: Some(name),
            uid,
            gid,
            mode,
            ..
        }) => format!(
            "the database as it was before the update is {snap}: with {DAEMON_UNIT} stopped, remove {db}-wal and {db}-shm, copy it to {db} (owner {uid}:{gid}, mode {mode:o}), or run sudo banger update to retry",
            snap = layout.updates_dir().join(name).display(),
            db = db.display(),
        ),
        Some(DbSnapshot { file: None, .. }) => format!(
            "there was no database before the update: with {DAEMON_UNIT} stopped, remove {db}, {db}-wal and {db}-shm, or run sudo banger update to retry",
            db = db.display()
        ),
        None => "run sudo banger update to retry".to_string(),
    }
}

/// Step 8: swap the binary with the journal recording each step (and first, the database
/// snapshot, if one was taken). A failure here restores the old binary (nothing was restarted,
/// so nothing else changed).
fn swap_in_new_binary(
    layout: &Layout,
    seams: &Seams,
    staged: &Staged,
    target: &Target,
    snapshot: Option<DbSnapshot>,
) -> Result<Journal> {
    let info = UpdateInfo {
        from: target.from.as_str().to_string(),
        to: target.to.as_str().to_string(),
        old_sha256: super::sha256_file(&layout.binary())?,
        new_sha256: super::sha256_file(&staged.binary)?,
    };
    let mut journal = Journal::create(layout, info)?;
    if let Some(s) = snapshot {
        if let Err(e) = journal.record_db_snapshot(s) {
            return Err(roll_back(layout, seams, &mut journal, e, false));
        }
    }
    (seams.say)(&format!(
        "installing {} at {} (keeping {} as {})",
        target.to,
        layout.binary().display(),
        target.from,
        layout.binary_previous().display()
    ));
    if let Err(e) = swap::swap_in(layout, &staged.binary, &mut journal) {
        return Err(roll_back(layout, seams, &mut journal, e, false));
    }
    Ok(journal)
}

/// Restarts the helper, then the daemon, then waits for the daemon to answer.
fn restart_both(seams: &Seams) -> Result<()> {
    seams.services.restart(HELPER_UNIT)?;
    seams.services.restart(DAEMON_UNIT)?;
    seams.daemon.wait_ready()
}

/// Step 9: restart `bangerd-root`, then `bangerd`, and wait for the daemon. `restarted` turns
/// true as soon as a restart may have begun: from then on a rollback restarts both units again.
fn restart_services(seams: &Seams, journal: &mut Journal, restarted: &mut bool) -> Result<()> {
    let say = seams.say;
    journal.append(Step::RestartHelperBegin)?;
    *restarted = true;
    say(&format!("restarting {HELPER_UNIT} (VMs keep running)"));
    seams.services.restart(HELPER_UNIT)?;
    journal.append(Step::RestartHelperDone)?;
    journal.append(Step::RestartDaemonBegin)?;
    say(&format!("restarting {DAEMON_UNIT}"));
    seams.services.restart(DAEMON_UNIT)?;
    seams.daemon.wait_ready()?;
    journal.append(Step::RestartDaemonDone)?;
    say("the daemon answers");
    Ok(())
}

/// Step 10: the **new** binary's doctor judges the host; any FAIL rolls back.
fn run_new_doctor(layout: &Layout, seams: &Seams, journal: &mut Journal) -> Result<()> {
    journal.append(Step::DoctorBegin)?;
    (seams.say)("running the new banger doctor");
    let out = seams
        .runner
        .run(&layout.binary(), &["doctor"], DOCTOR_TIMEOUT)?;
    if out.code != Some(0) {
        let fails: Vec<String> = failing_rows(&out.stdout);
        let why = if fails.is_empty() {
            format!("it failed ({}): {}", out.status(), out.last_line())
        } else {
            format!("it reports {}", fails.join("; "))
        };
        return Err(
            Error::new("checking the new version with banger doctor", why)
                .hint("see `banger doctor` for details"),
        );
    }
    journal.append(Step::DoctorPassed)?;
    Ok(())
}

/// `FAIL name: first detail` for every FAIL row of doctor's text output.
fn failing_rows(text: &str) -> Vec<String> {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if let Some(name) = line.strip_prefix("FAIL ") {
            let detail = lines
                .get(i + 1)
                .filter(|d| d.starts_with("  "))
                .map(|d| format!(": {}", d.trim()))
                .unwrap_or_default();
            out.push(format!("FAIL {}{detail}", name.trim()));
        }
    }
    out
}

/// Step 11: record the new build in install.toml, drop `.previous`, wipe staging. The new version
/// passed doctor, so a failure here keeps it: the journal tells the next `banger update` to finish.
fn record_and_commit(
    layout: &Layout,
    seams: &Seams,
    journal: &mut Journal,
    to: &Version,
) -> Result<()> {
    let finish_hint =
        "the new version is installed and healthy; run sudo banger update to finish recording it";
    let r = (|| {
        journal.append(Step::CommitBegin)?;
        record_build_info(layout, seams, to)?;
        swap::commit(layout)?;
        remove_db_snapshot(layout)?;
        journal.append(Step::Done)
    })();
    r.map_err(|e| {
        let hint = match &e.hint {
            Some(h) => format!("{finish_hint}; {h}"),
            None => finish_hint.to_string(),
        };
        e.hint(hint)
    })?;
    if let Err(e) = staging::wipe(layout) {
        (seams.say)(&format!("warning: {e}"));
    }
    Ok(())
}

/// The new version is committed: the database snapshot is no longer needed (it can be as large as
/// the database, so it goes now rather than with the rest of staging).
fn remove_db_snapshot(layout: &Layout) -> Result<()> {
    let p = layout.updates_dir().join(journal::DB_SNAPSHOT_FILE);
    match std::fs::remove_file(&p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::new(format!("removing {}", p.display()), e)),
    }
}

/// Execs the installed binary's `banger version` and writes its three fields into install.toml;
/// when that fails, writes the target version alone (commit and built_at `unknown`) and warns.
fn record_build_info(layout: &Layout, seams: &Seams, to: &Version) -> Result<()> {
    let mut info = install_toml::load(layout)?.ok_or_else(|| {
        Error::new(
            format!("recording {to} in {}", layout.install_toml().display()),
            "the file is missing",
        )
        .hint("run sudo banger system install --owner USER to write it again")
    })?;
    let build = seams
        .runner
        .run(&layout.binary(), &["version"], VERSION_TIMEOUT)
        .and_then(|out| {
            if out.code == Some(0) {
                BuildInfo::parse(&out.stdout)
            } else {
                Err(Error::new(
                    "running banger version",
                    format!("{}: {}", out.status(), out.last_line()),
                ))
            }
        });
    match build {
        Ok(b) => {
            if Version::parse(&b.version).ok().as_ref() != Some(to) {
                (seams.say)(&format!(
                    "warning: the new binary says it is v{}, not {to}; recording what it says",
                    b.version
                ));
            }
            info.version = b.version;
            info.commit = b.commit;
            info.built_at = b.built_at;
        }
        Err(e) => {
            (seams.say)(&format!(
                "warning: cannot read the new build's identity ({e}); recording version {to} only"
            ));
            info.version = to.as_str().to_string();
            info.commit = "unknown".into();
            info.built_at = "unknown".into();
        }
    }
    install_toml::save(layout, &info)
}

/// Rolls back after `original` failed. Before any restart only the binary goes back (the old
/// services never stopped); once a restart may have begun, both units are restarted on the old
/// binary. Returns the error to report.
fn roll_back(
    layout: &Layout,
    seams: &Seams,
    journal: &mut Journal,
    original: Error,
    restarted: bool,
) -> Error {
    let say = seams.say;
    let from = format!("v{}", journal.info().from);
    say(&format!("{} failed; rolling back to {from}", original.what));
    let mut failures: Vec<String> = Vec::new();
    let binary = swap::restore(layout, journal);
    // The new daemon may have migrated the database: put it back before the old one starts.
    let database = match binary {
        Ok(()) if restarted => restore_database(layout, seams, journal),
        _ => Ok(()),
    };
    if let Err(e) = binary {
        failures.push(format!("restoring the binary: {e}"));
    } else if let Err(e) = database {
        // A daemon started on a half-restored (or still migrated) database would refuse it at
        // best: leave the units for the person doing the repair.
        failures.push(format!("restoring the database: {e}"));
    } else if restarted {
        say(&format!(
            "restarting {HELPER_UNIT} and {DAEMON_UNIT} on {from}"
        ));
        let r = journal
            .append(Step::RollbackRestartBegin)
            .and_then(|()| restart_both(seams))
            .and_then(|()| journal.append(Step::RollbackRestartDone));
        if let Err(e) = r {
            failures.push(format!("restarting the services: {e}"));
        }
    }
    if failures.is_empty() {
        let _ = journal.append(Step::RollbackDone);
        let _ = staging::wipe(layout);
        return Error {
            why: format!("{} (rolled back to previous install)", original.why),
            ..original
        };
    }
    let info = journal.info().clone();
    let disk = DiskState::inspect(layout, &info);
    let describe = |s: &FileState| match s {
        FileState::Missing => "missing".to_string(),
        FileState::Old => format!("v{} (old)", info.from),
        FileState::New => format!("v{} (new)", info.to),
        FileState::Other(o) => o.clone(),
    };
    Error::new(
        original.what.clone(),
        format!(
            "{original_why}{original_hint}; the rollback failed too: {}",
            failures.join("; "),
            original_why = original.why,
            original_hint = original
                .hint
                .as_ref()
                .map(|h| format!(" ({h})"))
                .unwrap_or_default()
        ),
    )
    .hint(format!(
        "manual repair needed: {} is {}, {} is {}; the update journal is {}; see journalctl -u {HELPER_UNIT} -u {DAEMON_UNIT}, then run sudo banger update to retry the rollback (or sudo banger system restart once the old binary is in place){}; running VMs were not touched",
        layout.binary().display(),
        describe(&disk.real),
        layout.binary_previous().display(),
        describe(&disk.previous),
        journal.file_path().display(),
        if restarted && journal.db_snapshot().is_some() {
            format!("; {}", database_repair_hint(layout, journal))
        } else {
            String::new()
        }
    ))
}

/// Where the update lock lives: beside the staging dir, which is recreated by every update.
pub fn lock_path(layout: &Layout) -> PathBuf {
    layout.cache_dir().join("update.lock")
}

/// An exclusive `flock` held for a whole update run: a second `banger update` refuses, and
/// `banger doctor` tells an update in progress from one a crash left behind. The lock file exists
/// only while an update runs: it is removed (still locked) when the run ends, so a refused update
/// leaves nothing behind, and a taker checks that the file it locked is still the one at the path
/// (else a finishing update removed it under it, and it tries again).
#[derive(Debug)]
pub struct UpdateLock {
    file: File,
    path: PathBuf,
}

impl UpdateLock {
    /// Takes the lock (creating its file 0644), or refuses when another update holds it.
    pub fn acquire(layout: &Layout) -> Result<UpdateLock> {
        let p = lock_path(layout);
        let what = || format!("locking {}", p.display());
        std::fs::create_dir_all(layout.cache_dir()).map_err(|e| Error::new(what(), e))?;
        for _ in 0..10 {
            let file = OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .mode(0o644)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&p)
                .map_err(|e| Error::new(what(), e))?;
            match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
                Ok(()) => {}
                Err(rustix::io::Errno::WOULDBLOCK) => {
                    return Err(Error::new(
                        "starting banger update",
                        "another banger update is running",
                    )
                    .hint("wait for it to finish"))
                }
                Err(e) => return Err(Error::new(what(), e)),
            }
            let held = rustix::fs::fstat(&file).map_err(|e| Error::new(what(), e))?;
            match rustix::fs::lstat(&p) {
                Ok(st) if (st.st_dev, st.st_ino) == (held.st_dev, held.st_ino) => {
                    return Ok(UpdateLock { file, path: p });
                }
                _ => continue,
            }
        }
        Err(Error::new(what(), "the lock file kept being replaced").hint("try again"))
    }
}

impl Drop for UpdateLock {
    fn drop(&mut self) {
        // Removed while still held: a waiter that opened it re-checks the path and starts over.
        let _ = std::fs::remove_file(&self.path);
        let _ = rustix::fs::flock(&self.file, rustix::fs::FlockOperation::Unlock);
    }
}

/// True when a `banger update` holds the lock right now (read-only probe, for doctor).
pub fn update_in_progress(layout: &Layout) -> bool {
    let Ok(file) = File::open(lock_path(layout)) else {
        return false;
    };
    matches!(
        rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockShared),
        Err(rustix::io::Errno::WOULDBLOCK)
    )
}

/// The real [`Runner`]: a child process with stdin closed, output captured (capped), a bounded
/// wait (killed when it runs over), and a short retry on `ETXTBSY` (a file just written).
#[derive(Debug, Default, Clone)]
pub struct ProcessRunner;

impl Runner for ProcessRunner {
    fn run(&self, program: &Path, args: &[&str], timeout: Duration) -> Result<RunOutput> {
        let shown = format!("{} {}", program.display(), args.join(" "));
        let what = || format!("running {shown}");
        let mut tries = 0;
        let mut child = loop {
            let r = Command::new(program)
                .args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn();
            match r {
                Ok(c) => break c,
                Err(e)
                    if e.raw_os_error() == Some(rustix::io::Errno::TXTBSY.raw_os_error())
                        && tries < 50 =>
                {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(Error::new(what(), e)),
            }
        };
        let drain = |s: Option<Box<dyn Read + Send>>| {
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                if let Some(s) = s {
                    let mut s = s.take(OUTPUT_CAP);
                    let _ = s.read_to_end(&mut buf);
                    // Keep reading past the cap so the child never blocks on a full pipe.
                    let _ = std::io::copy(&mut s.into_inner(), &mut std::io::sink());
                }
                String::from_utf8_lossy(&buf).into_owned()
            })
        };
        let out = drain(
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
        );
        let err = drain(
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
        );
        let started = Instant::now();
        let status = loop {
            match child.try_wait() {
                Ok(Some(st)) => break st,
                Ok(None) if started.elapsed() >= timeout => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(Error::new(
                        what(),
                        format!("no answer within {}s; killed it", timeout.as_secs()),
                    ));
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(5)),
                Err(e) => return Err(Error::new(what(), e)),
            }
        };
        Ok(RunOutput {
            code: status.code(),
            stdout: out.join().unwrap_or_default(),
            stderr: err.join().unwrap_or_default(),
        })
    }
}

#[cfg(test)]
mod tests {
    //! Every branch of the flow with fakes: a fetcher serving a release signed by a key made here,
    //! `FakeServices`, a fake daemon and a fake runner that plays the old and the new binary.
    use super::*;
    use crate::store::backup::dump;
    use crate::store::{check_with, Migration, Store, LATEST, MIGRATIONS};
    use crate::system::install_toml::InstallInfo;
    use crate::system::service::FakeServices;
    use crate::update::download::Body;
    use crate::update::testutil::TempDir;
    use base64::Engine;
    use std::cell::{Cell, RefCell};
    use std::collections::HashMap;
    use std::os::unix::fs::PermissionsExt;

    const OLD_BIN: &[u8] = b"#!fake banger 0.1.0\n";
    const NEW_BIN: &[u8] = b"#!fake banger 0.2.0, a little longer\n";
    const BASE: &str = "http://rel.test";
    const TARBALL: &str = "banger-v0.2.0-linux-amd64.tar.gz";

    const SPKI_P256_PREFIX: [u8; 26] = [
        0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08,
        0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
    ];

    /// A throw-away ECDSA P-256 key: signs, and writes its public half as PEM.
    struct Key(ring::signature::EcdsaKeyPair);

    impl Key {
        fn new() -> Key {
            use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_ASN1_SIGNING as ALG};
            let rng = ring::rand::SystemRandom::new();
            let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ALG, &rng).unwrap();
            Key(EcdsaKeyPair::from_pkcs8(&ALG, pkcs8.as_ref(), &rng).unwrap())
        }
        fn sign_b64(&self, data: &[u8]) -> Vec<u8> {
            let rng = ring::rand::SystemRandom::new();
            let sig = self.0.sign(&rng, data).unwrap();
            base64::engine::general_purpose::STANDARD
                .encode(sig.as_ref())
                .into_bytes()
        }
        fn pem(&self) -> String {
            use ring::signature::KeyPair;
            let mut der = SPKI_P256_PREFIX.to_vec();
            der.extend_from_slice(self.0.public_key().as_ref());
            let b64 = base64::engine::general_purpose::STANDARD.encode(der);
            format!("-----BEGIN PUBLIC KEY-----\n{b64}\n-----END PUBLIC KEY-----\n")
        }
    }

    fn tarball(files: &[(&str, &[u8])]) -> Vec<u8> {
        let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        let mut b = tar::Builder::new(gz);
        for (name, data) in files {
            let mut h = tar::Header::new_gnu();
            h.set_path(name).unwrap();
            h.set_mode(0o755);
            h.set_size(data.len() as u64);
            h.set_cksum();
            b.append(&h, *data).unwrap();
        }
        b.into_inner().unwrap().finish().unwrap()
    }

    /// Serves URLs from a map; unknown URLs are a 404.
    #[derive(Default)]
    struct FakeFetcher {
        routes: RefCell<HashMap<String, Vec<u8>>>,
        gets: RefCell<Vec<String>>,
    }

    impl FakeFetcher {
        fn put(&self, path: &str, body: impl Into<Vec<u8>>) {
            self.routes
                .borrow_mut()
                .insert(format!("{BASE}{path}"), body.into());
        }
        fn body(&self, path: &str) -> Vec<u8> {
            self.routes.borrow()[&format!("{BASE}{path}")].clone()
        }
    }

    impl Fetcher for FakeFetcher {
        fn get(&self, url: &str, what: &str) -> Result<Body> {
            self.gets.borrow_mut().push(url.to_string());
            match self.routes.borrow().get(url) {
                Some(b) => Ok(Body {
                    content_length: Some(b.len() as u64),
                    reader: Box::new(std::io::Cursor::new(b.clone())),
                }),
                None => Err(Error::new(
                    format!("downloading {what} from {url}"),
                    "HTTP 404",
                )),
            }
        }
    }

    /// Plays whichever binary is at the path it is asked to run, by content.
    struct FakeRunner {
        migrations: Cell<i32>,
        doctor_fails: Cell<bool>,
        version_fails: Cell<bool>,
        /// Overrides what the new binary's `--version` names.
        new_claims: RefCell<Option<String>>,
        panic_on: RefCell<Option<String>>,
        calls: RefCell<Vec<String>>,
        /// When set, `--check-migrations` classifies this real database file with the binary's
        /// own migrations (the new binary knows [`new_migrations`]).
        real_db: RefCell<Option<PathBuf>>,
    }

    impl Default for FakeRunner {
        fn default() -> Self {
            FakeRunner {
                migrations: Cell::new(1),
                doctor_fails: Cell::new(false),
                version_fails: Cell::new(false),
                new_claims: RefCell::new(None),
                panic_on: RefCell::new(None),
                calls: RefCell::new(Vec::new()),
                real_db: RefCell::new(None),
            }
        }
    }

    impl Runner for FakeRunner {
        fn run(&self, program: &Path, args: &[&str], _t: Duration) -> Result<RunOutput> {
            let content = std::fs::read(program).unwrap_or_default();
            let (who, version) = if content == NEW_BIN {
                let v = self.new_claims.borrow().clone();
                ("new", v.unwrap_or_else(|| "0.2.0".into()))
            } else if content == OLD_BIN {
                ("old", "0.1.0".to_string())
            } else {
                ("other", "9.9.9".to_string())
            };
            let call = format!("{who} {}", args.join(" "));
            self.calls.borrow_mut().push(call.clone());
            if self.panic_on.borrow().as_deref() == Some(call.as_str()) {
                panic!("simulated crash while running `{call}`");
            }
            let ok = |stdout: String| RunOutput {
                code: Some(0),
                stdout,
                stderr: String::new(),
            };
            let fail = |code: i32, stdout: &str| RunOutput {
                code: Some(code),
                stdout: stdout.into(),
                stderr: String::new(),
            };
            Ok(match args {
                ["--version"] => ok(format!("banger v{version} (commit {who}c, built t)\n")),
                ["--role", "bangerd", "--check-migrations", "--system"] => {
                    let code = match &*self.real_db.borrow() {
                        Some(db) => {
                            let known = if who == "new" {
                                new_migrations()
                            } else {
                                MIGRATIONS.to_vec()
                            };
                            check_with(db, &known).map_or(3, |c| c.exit_code())
                        }
                        None => self.migrations.get(),
                    };
                    fail(code, &format!("migrations: code {code}\n"))
                }
                ["doctor"] if who == "new" && self.doctor_fails.get() => fail(
                    1,
                    "PASS version\nFAIL units\n  bangerd.service: not active\nPASS update\n",
                ),
                ["doctor"] => ok("PASS units\n".into()),
                ["version"] if self.version_fails.get() => fail(1, "boom"),
                ["version"] => ok(format!(
                    "version: {version}\ncommit: {who}commit\nbuilt_at: 2026-02-02T00:00:00Z\n"
                )),
                _ => fail(2, "unexpected"),
            })
        }
    }

    #[derive(Default)]
    struct FakeDaemon {
        ops: RefCell<Option<Vec<String>>>,
        not_running: Cell<bool>,
        ready_fails_once: Cell<bool>,
        panic_on_ready: Cell<bool>,
        readies: Cell<u32>,
    }

    impl DaemonProbe for FakeDaemon {
        fn unfinished_operations(&self) -> Result<Option<Vec<String>>> {
            if self.not_running.get() {
                return Ok(None);
            }
            Ok(Some(self.ops.borrow().clone().unwrap_or_default()))
        }
        fn wait_ready(&self) -> Result<()> {
            self.readies.set(self.readies.get() + 1);
            if self.panic_on_ready.get() {
                panic!("simulated crash while waiting for the daemon");
            }
            if self.ready_fails_once.replace(false) {
                return Err(Error::new("waiting for the daemon", "it never answered"));
            }
            Ok(())
        }
    }

    /// A service manager that crashes (panics) on its `n`th restart.
    struct CrashingServices {
        inner: FakeServices,
        crash_at: usize,
        restarts: Cell<usize>,
    }

    impl ServiceManager for CrashingServices {
        fn daemon_reload(&self) -> Result<()> {
            self.inner.daemon_reload()
        }
        fn enable(&self, u: &str) -> Result<()> {
            self.inner.enable(u)
        }
        fn disable(&self, u: &str) -> Result<()> {
            self.inner.disable(u)
        }
        fn start(&self, u: &str) -> Result<()> {
            self.inner.start(u)
        }
        fn stop(&self, u: &str) -> Result<()> {
            self.inner.stop(u)
        }
        fn restart(&self, u: &str) -> Result<()> {
            let n = self.restarts.get() + 1;
            self.restarts.set(n);
            if n == self.crash_at {
                panic!("simulated crash during restart {n} ({u})");
            }
            self.inner.restart(u)
        }
        fn is_active(&self, u: &str) -> Result<bool> {
            self.inner.is_active(u)
        }
        fn is_enabled(&self, u: &str) -> Result<bool> {
            self.inner.is_enabled(u)
        }
    }

    /// A temp host with v0.1.0 installed and a release server offering v0.2.0 (and v0.0.9).
    struct Host {
        _dir: TempDir,
        layout: Layout,
        fetcher: FakeFetcher,
        key: Key,
        pubkey: PathBuf,
    }

    fn install_info() -> InstallInfo {
        InstallInfo {
            owner_user: "alice".into(),
            owner_uid: 1000,
            owner_gid: 1000,
            owner_home: "/home/alice".into(),
            version: "0.1.0".into(),
            commit: "oldcommit".into(),
            built_at: "2026-01-01T00:00:00Z".into(),
            installed_at: "2026-01-02T00:00:00Z".into(),
        }
    }

    fn release_json(v: &str) -> String {
        format!(
            r#"{{"version":"{v}","tarball_url":"{v}/banger-{v}-linux-amd64.tar.gz","sha256sums_url":"{v}/SHA256SUMS","sha256sums_sig_url":"{v}/SHA256SUMS.sig"}}"#
        )
    }

    fn manifest(schema: u32) -> String {
        format!(
            r#"{{"schema_version":{schema},"latest_stable":"v0.2.0","releases":[{},{}]}}"#,
            release_json("v0.2.0"),
            release_json("v0.0.9")
        )
    }

    impl Host {
        fn new(tag: &str) -> Host {
            let dir = TempDir::new(tag);
            let layout = Layout::under(dir.path().join("root"));
            std::fs::create_dir_all(layout.lib_dir()).unwrap();
            std::fs::create_dir_all(layout.etc_dir()).unwrap();
            std::fs::write(layout.binary(), OLD_BIN).unwrap();
            std::fs::set_permissions(layout.binary(), std::fs::Permissions::from_mode(0o755))
                .unwrap();
            install_toml::save(&layout, &install_info()).unwrap();
            let key = Key::new();
            let pubkey = dir.path().join("release.pub.pem");
            std::fs::write(&pubkey, key.pem()).unwrap();
            let h = Host {
                _dir: dir,
                layout,
                fetcher: FakeFetcher::default(),
                key,
                pubkey,
            };
            h.fetcher.put("/manifest.json", manifest(1));
            h.publish("v0.2.0", NEW_BIN);
            h.publish("v0.0.9", OLD_BIN);
            h
        }

        fn publish(&self, v: &str, binary: &[u8]) {
            let name = format!("banger-{v}-linux-amd64.tar.gz");
            let tgz = tarball(&[("banger", binary)]);
            let sums = format!(
                "{}  {name}\n",
                crate::update::sha256_reader(&tgz[..]).unwrap()
            );
            self.fetcher.put(&format!("/{v}/{name}"), tgz);
            self.fetcher.put(
                &format!("/{v}/SHA256SUMS.sig"),
                self.key.sign_b64(sums.as_bytes()),
            );
            self.fetcher.put(&format!("/{v}/SHA256SUMS"), sums);
        }

        fn opts(&self) -> Options {
            Options {
                check: false,
                to: None,
                force: false,
                dry_run: false,
                allow_downgrade: false,
                manifest_url: format!("{BASE}/manifest.json"),
                keys: KeySource::File(self.pubkey.clone()),
                running: "0.1.0".into(),
                is_root: true,
            }
        }

        /// What "the install" is: the binary's bytes, install.toml's bytes, the lib dir listing.
        fn snapshot(&self) -> (Vec<u8>, Vec<u8>, Vec<String>) {
            let mut listing: Vec<String> = std::fs::read_dir(self.layout.lib_dir())
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            listing.sort();
            (
                std::fs::read(self.layout.binary()).unwrap(),
                std::fs::read(self.layout.install_toml()).unwrap(),
                listing,
            )
        }

        fn assert_exactly(&self, bin: &[u8], ctx: &str) {
            let (b, toml, listing) = self.snapshot();
            assert_eq!(b, bin, "{ctx}: binary");
            assert_eq!(listing, ["banger"], "{ctx}: lib dir");
            assert!(
                !journal::pending(&self.layout).unwrap(),
                "{ctx}: journal still pending"
            );
            assert!(
                !self.layout.updates_dir().exists(),
                "{ctx}: staging not wiped"
            );
            let info = install_toml::load(&self.layout).unwrap().unwrap();
            let want = if bin == NEW_BIN { "0.2.0" } else { "0.1.0" };
            assert_eq!(
                info.version,
                want,
                "{ctx}: install.toml {}",
                String::from_utf8_lossy(&toml)
            );
        }
    }

    struct Fakes {
        services: FakeServices,
        daemon: FakeDaemon,
        runner: FakeRunner,
        said: RefCell<Vec<String>>,
    }

    impl Fakes {
        fn new() -> Fakes {
            let services = FakeServices::new();
            services.set_active(HELPER_UNIT, true);
            services.set_active(DAEMON_UNIT, true);
            Fakes {
                services,
                daemon: FakeDaemon::default(),
                runner: FakeRunner::default(),
                said: RefCell::new(Vec::new()),
            }
        }
    }

    fn run_with(
        h: &Host,
        o: &Options,
        f: &Fakes,
        services: &dyn ServiceManager,
        hook: &dyn Fn(&str),
    ) -> Result<Outcome> {
        let say = |l: &str| {
            f.said.borrow_mut().push(l.to_string());
            hook(l);
        };
        let seams = Seams {
            services,
            fetcher: &h.fetcher,
            daemon: &f.daemon,
            runner: &f.runner,
            say: &say,
        };
        run(&h.layout, o, &seams)
    }

    fn go(h: &Host, o: &Options, f: &Fakes) -> Result<Outcome> {
        run_with(h, o, f, &f.services, &|_| {})
    }

    const BOTH_RESTARTED: [&str; 2] = ["restart bangerd-root.service", "restart bangerd.service"];

    #[test]
    fn updates_restarts_checks_and_records() {
        let h = Host::new("flow-ok");
        let f = Fakes::new();
        let out = go(&h, &h.opts(), &f).unwrap();
        assert_eq!(out.to_string(), "updated v0.1.0 -> v0.2.0");
        h.assert_exactly(NEW_BIN, "after a good update");
        let info = install_toml::load(&h.layout).unwrap().unwrap();
        assert_eq!(
            (info.commit.as_str(), info.built_at.as_str()),
            ("newcommit", "2026-02-02T00:00:00Z")
        );
        assert_eq!(info.installed_at, install_info().installed_at);
        assert_eq!(f.services.actions(), BOTH_RESTARTED);
        assert_eq!(f.daemon.readies.get(), 1);
        assert_eq!(
            *f.runner.calls.borrow(),
            [
                "new --version",
                "new --role bangerd --check-migrations --system",
                "new doctor",
                "new version"
            ]
        );
        let said = f.said.borrow().join("\n");
        for step in [
            "fetching the release manifest",
            "signature verified",
            "matches the signed SHA256SUMS",
            "installing v0.2.0",
            "restarting bangerd-root.service",
            "the daemon answers",
            "running the new banger doctor",
        ] {
            assert!(
                said.contains(step),
                "missing progress line {step:?} in:\n{said}"
            );
        }
        // The lock is released: a second run finds nothing to do.
        let o = Options {
            running: "0.2.0".into(),
            ..h.opts()
        };
        assert_eq!(
            go(&h, &o, &Fakes::new()).unwrap().to_string(),
            "up to date (v0.2.0)"
        );
    }

    #[test]
    fn check_prints_one_line_needs_no_root_and_touches_nothing() {
        let h = Host::new("flow-check");
        let before = h.snapshot();
        let f = Fakes::new();
        let check = Options {
            check: true,
            is_root: false,
            ..h.opts()
        };
        assert_eq!(
            go(&h, &check, &f).unwrap().to_string(),
            "update available: v0.1.0 -> v0.2.0"
        );
        let current = Options {
            running: "0.2.0".into(),
            ..check.clone()
        };
        assert_eq!(
            go(&h, &current, &f).unwrap().to_string(),
            "up to date (v0.2.0)"
        );
        let ahead = Options {
            running: "0.3.0".into(),
            ..check.clone()
        };
        assert!(go(&h, &ahead, &f)
            .unwrap()
            .to_string()
            .starts_with("up to date (v0.3.0 is newer than the latest release v0.2.0)"));
        let unknown = Options {
            to: Some("v9.9.9".into()),
            ..check
        };
        let e = go(&h, &unknown, &f).unwrap_err().to_string();
        assert!(e.contains("v9.9.9 is not in the release manifest"), "{e}");
        assert!(e.contains("known versions: v0.2.0, v0.0.9"), "{e}");
        assert_eq!(h.snapshot(), before);
        assert!(!h.layout.cache_dir().exists(), "--check must not even lock");
        assert!(f.services.calls().is_empty());
        assert!(f.runner.calls.borrow().is_empty());
        assert!(f.fetcher_only_manifest(&h));
    }

    impl Fakes {
        fn fetcher_only_manifest(&self, h: &Host) -> bool {
            h.fetcher
                .gets
                .borrow()
                .iter()
                .all(|u| u.ends_with("/manifest.json"))
        }
    }

    #[test]
    fn every_refusal_leaves_the_host_untouched() {
        type Setup = Box<dyn Fn(&Host, &mut Options, &Fakes)>;
        let cases: Vec<(&str, Setup, &str)> = vec![
            (
                "unknown --to",
                Box::new(|_, o, _| o.to = Some("v9.9.9".into())),
                "v9.9.9 is not in the release manifest",
            ),
            (
                "not root",
                Box::new(|_, o, _| o.is_root = false),
                "root is required (run: sudo banger update)",
            ),
            (
                "busy",
                Box::new(|_, _, f| {
                    *f.daemon.ops.borrow_mut() = Some(vec!["op-1 vm.create on box1".into()])
                }),
                "1 operation(s) are in flight: op-1 vm.create on box1",
            ),
            (
                "downgrade without --allow-downgrade",
                Box::new(|_, o, _| o.to = Some("v0.0.9".into())),
                "refusing to downgrade (add --allow-downgrade",
            ),
            (
                "manifest schema_version 2",
                Box::new(|h, _, _| h.fetcher.put("/manifest.json", manifest(2))),
                "upgrade banger manually",
            ),
            (
                "tampered tarball",
                Box::new(|h, _, _| {
                    h.fetcher.put(
                        &format!("/v0.2.0/{TARBALL}"),
                        tarball(&[("banger", b"#!evil\n")]),
                    )
                }),
                "does not match SHA256SUMS",
            ),
            (
                "tampered SHA256SUMS",
                Box::new(|h, _, _| {
                    let mut s = h.fetcher.body("/v0.2.0/SHA256SUMS");
                    s[0] = if s[0] == b'0' { b'1' } else { b'0' };
                    h.fetcher.put("/v0.2.0/SHA256SUMS", s);
                }),
                "verifying the SHA256SUMS signature",
            ),
            (
                "wrong key",
                Box::new(|h, _, _| std::fs::write(&h.pubkey, Key::new().pem()).unwrap()),
                "verifying the SHA256SUMS signature",
            ),
            (
                "garbage signature",
                Box::new(|h, _, _| h.fetcher.put("/v0.2.0/SHA256SUMS.sig", "!!not base64!!")),
                "not valid base64",
            ),
            (
                "placeholder embedded key",
                Box::new(|_, o, _| o.keys = KeySource::Embedded),
                "PLACEHOLDER",
            ),
            (
                "mislabelled release",
                Box::new(|_, _, f| *f.runner.new_claims.borrow_mut() = Some("0.3.0".into())),
                "does not name v0.2.0",
            ),
            (
                "database newer than the release",
                Box::new(|_, _, f| f.runner.migrations.set(2)),
                "cannot use the installed database",
            ),
            (
                "staged binary crashes",
                Box::new(|_, _, f| f.runner.migrations.set(139)),
                "bangerd --check-migrations failed (exit 139)",
            ),
        ];
        // Refused before staging (steps 1-4): not even the cache dir or the lock file appears.
        let before_staging = [
            "unknown --to",
            "not root",
            "busy",
            "downgrade without --allow-downgrade",
            "manifest schema_version 2",
        ];
        for (name, setup, want) in cases {
            let h = Host::new("flow-refuse");
            let f = Fakes::new();
            let mut o = h.opts();
            setup(&h, &mut o, &f);
            let before = h.snapshot();
            let e = go(&h, &o, &f).unwrap_err().to_string();
            assert!(e.contains(want), "{name}: {e}");
            assert_eq!(h.snapshot(), before, "{name}: host changed");
            assert!(
                !lock_path(&h.layout).exists(),
                "{name}: the lock file was left behind"
            );
            if before_staging.contains(&name) {
                assert!(
                    !h.layout.cache_dir().exists(),
                    "{name}: {} was created",
                    lock_path(&h.layout).display()
                );
            }
            assert!(
                f.services.calls().is_empty(),
                "{name}: {:?}",
                f.services.calls()
            );
            assert!(
                !h.layout.updates_dir().exists(),
                "{name}: staging left behind"
            );
            assert!(
                !f.runner
                    .calls
                    .borrow()
                    .iter()
                    .any(|c| c.ends_with("doctor")),
                "{name}"
            );
        }
    }

    #[test]
    fn not_installed_is_refused() {
        let h = Host::new("flow-not-installed");
        std::fs::remove_file(h.layout.install_toml()).unwrap();
        let f = Fakes::new();
        let e = go(&h, &h.opts(), &f).unwrap_err().to_string();
        assert!(e.contains("banger is not installed here"), "{e}");
        assert!(e.contains("sudo banger system install"), "{e}");
        assert_eq!(std::fs::read(h.layout.binary()).unwrap(), OLD_BIN);
    }

    #[test]
    fn busy_is_refused_and_force_proceeds() {
        let h = Host::new("flow-busy");
        let f = Fakes::new();
        *f.daemon.ops.borrow_mut() = Some(vec!["op-7 image.build".into()]);
        let e = go(&h, &h.opts(), &f).unwrap_err();
        assert!(e.to_string().contains("op-7 image.build"), "{e}");
        assert!(e.hint.unwrap_or_default().contains("--force"));
        let forced = Options {
            force: true,
            ..h.opts()
        };
        go(&h, &forced, &f).unwrap();
        h.assert_exactly(NEW_BIN, "forced");
        assert!(f
            .said
            .borrow()
            .iter()
            .any(|l| l.contains("--force: updating although 1")));
    }

    #[test]
    fn a_stopped_daemon_does_not_block_the_update() {
        let h = Host::new("flow-nodaemon");
        let f = Fakes::new();
        f.daemon.not_running.set(true);
        go(&h, &h.opts(), &f).unwrap();
        h.assert_exactly(NEW_BIN, "daemon was down");
        assert!(f
            .said
            .borrow()
            .iter()
            .any(|l| l.contains("the daemon is not running")));
    }

    #[test]
    fn dry_run_stages_verifies_and_stops() {
        let h = Host::new("flow-dry");
        let before = h.snapshot();
        let f = Fakes::new();
        let o = Options {
            dry_run: true,
            ..h.opts()
        };
        let out = go(&h, &o, &f).unwrap().to_string();
        assert!(
            out.starts_with("dry run: would update v0.1.0 -> v0.2.0"),
            "{out}"
        );
        assert_eq!(out.lines().count(), 1);
        assert_eq!(h.snapshot(), before);
        assert!(f.services.calls().is_empty());
        let staged = StagingPaths::new(&h.layout).binary();
        assert_eq!(std::fs::read(staged).unwrap(), NEW_BIN, "staging is left");
        assert_eq!(
            *f.runner.calls.borrow(),
            [
                "new --version",
                "new --role bangerd --check-migrations --system"
            ]
        );
        // A real update afterwards starts from a clean staging dir.
        go(&h, &h.opts(), &Fakes::new()).unwrap();
        h.assert_exactly(NEW_BIN, "after dry run");
    }

    /// A `--pubkey-file` run prints one loud line naming the file and the key's fingerprint, and
    /// sends the same line to the system log socket; runs on the embedded keys print none.
    #[test]
    fn a_key_file_override_is_announced_and_logged() {
        let h = Host::new("flow-keyfile");
        std::fs::create_dir_all(h.layout.syslog_socket().parent().unwrap()).unwrap();
        let log = std::os::unix::net::UnixDatagram::bind(h.layout.syslog_socket()).unwrap();
        log.set_nonblocking(true).unwrap();
        let f = Fakes::new();
        let o = Options {
            dry_run: true,
            ..h.opts()
        };
        go(&h, &o, &f).unwrap();
        let fp = signature::PublicKey::from_file(&h.pubkey).unwrap()[0].fingerprint();
        let loud: Vec<String> = f
            .said
            .borrow()
            .iter()
            .filter(|l| l.contains("--pubkey-file"))
            .cloned()
            .collect();
        assert_eq!(loud.len(), 1, "{:?}", f.said.borrow());
        let want = format!(
            "WARNING: trusting release signing key {fp} from --pubkey-file {} INSTEAD OF the keys built into banger",
            h.pubkey.display()
        );
        assert_eq!(loud[0], want);
        let mut buf = [0u8; 4096];
        let n = log.recv(&mut buf).expect("one syslog datagram");
        let got = String::from_utf8_lossy(&buf[..n]).into_owned();
        assert!(got.starts_with("<12>banger-update["), "{got}");
        assert!(got.ends_with(&format!("]: {want}")), "{got}");
        assert!(log.recv(&mut buf).is_err(), "exactly one record");

        // Without a system log the line still prints, and says it is not logged.
        drop(log);
        std::fs::remove_file(h.layout.syslog_socket()).unwrap();
        let f = Fakes::new();
        go(&h, &o, &f).unwrap();
        let said = f.said.borrow().join("\n");
        assert!(
            said.contains(&format!("{want} (not in the system log:")),
            "{said}"
        );

        // A group-writable key file is refused before anything is downloaded or staged.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&h.pubkey, std::fs::Permissions::from_mode(0o664)).unwrap();
        std::fs::remove_dir_all(StagingPaths::new(&h.layout).dir).ok();
        let before = h.snapshot();
        let e = go(&h, &o, &Fakes::new()).unwrap_err();
        assert_eq!(e.why, "its mode 0664 lets its group write it", "{e}");
        assert_eq!(h.snapshot(), before);
        assert!(!StagingPaths::new(&h.layout).dir.exists());
    }

    #[test]
    fn downgrade_on_purpose() {
        let h = Host::new("flow-down");
        std::fs::write(h.layout.binary(), NEW_BIN).unwrap();
        let o = Options {
            to: Some("v0.0.9".into()),
            allow_downgrade: true,
            running: "0.2.0".into(),
            ..h.opts()
        };
        let f = Fakes::new();
        // The fake plays OLD_BIN as 0.1.0, so v0.0.9's --version is a mismatch: refused.
        let e = go(&h, &o, &f).unwrap_err().to_string();
        assert!(e.contains("does not name v0.0.9"), "{e}");
        assert_eq!(std::fs::read(h.layout.binary()).unwrap(), NEW_BIN);
    }

    #[test]
    fn failure_in_the_swap_restores_the_binary_without_touching_services() {
        let h = Host::new("flow-swapfail");
        let f = Fakes::new();
        let staged = StagingPaths::new(&h.layout).binary();
        // Something rewrites the staged file after it was verified and hashed.
        let tamper = |l: &str| {
            if l.starts_with("installing") {
                std::fs::write(&staged, b"#!swapped under us\n").unwrap();
            }
        };
        let e = run_with(&h, &h.opts(), &f, &f.services, &tamper)
            .unwrap_err()
            .to_string();
        assert!(e.contains("is not the verified"), "{e}");
        assert!(e.contains("(rolled back to previous install)"), "{e}");
        h.assert_exactly(OLD_BIN, "swap failed");
        assert!(f.services.calls().is_empty(), "{:?}", f.services.calls());
        assert_eq!(f.daemon.readies.get(), 0);
    }

    #[test]
    fn failure_at_or_after_a_restart_rolls_back_and_restarts_both() {
        type Setup = Box<dyn Fn(&Fakes)>;
        let cases: Vec<(&str, Setup, &str)> = vec![
            (
                "helper restart fails",
                Box::new(|f| f.services.fail_once("restart bangerd-root.service")),
                "systemctl restart bangerd-root.service: injected failure (rolled back to previous install)",
            ),
            (
                "daemon restart fails",
                Box::new(|f| f.services.fail_once("restart bangerd.service")),
                "systemctl restart bangerd.service: injected failure (rolled back to previous install)",
            ),
            (
                "daemon never answers",
                Box::new(|f| f.daemon.ready_fails_once.set(true)),
                "it never answered (rolled back to previous install)",
            ),
            (
                "new doctor FAILs",
                Box::new(|f| f.runner.doctor_fails.set(true)),
                "it reports FAIL units: bangerd.service: not active (rolled back to previous install)",
            ),
        ];
        for (name, setup, want) in cases {
            let h = Host::new("flow-rollback");
            let f = Fakes::new();
            setup(&f);
            let e = go(&h, &h.opts(), &f).unwrap_err().to_string();
            assert!(e.contains(want), "{name}: {e}");
            h.assert_exactly(OLD_BIN, name);
            assert_eq!(
                install_toml::load(&h.layout).unwrap().unwrap(),
                install_info(),
                "{name}"
            );
            let actions = f.services.actions();
            assert_eq!(
                &actions[actions.len() - 2..],
                BOTH_RESTARTED,
                "{name}: {actions:?}"
            );
            assert!(f.services.active(HELPER_UNIT) && f.services.active(DAEMON_UNIT));
            assert!(f
                .said
                .borrow()
                .iter()
                .any(|l| l.ends_with("failed; rolling back to v0.1.0")));
        }
    }

    #[test]
    fn a_rollback_whose_restart_fails_asks_for_repair_and_the_next_run_finishes_it() {
        let h = Host::new("flow-manual");
        let f = Fakes::new();
        // The daemon's unit cannot restart at all: neither on the new binary nor on the old one.
        f.services.fail_on("restart bangerd.service");
        let e = go(&h, &h.opts(), &f).unwrap_err();
        let text = e.to_string();
        assert!(
            text.starts_with("systemctl restart bangerd.service: injected failure"),
            "{text}"
        );
        assert!(
            text.contains("the rollback failed too: restarting the services"),
            "{text}"
        );
        let hint = e.hint.clone().unwrap_or_default();
        assert!(hint.contains("manual repair needed"), "{hint}");
        assert!(hint.contains("is v0.1.0 (old)"), "{hint}");
        assert!(hint.contains("journal.jsonl"), "{hint}");
        assert!(hint.contains("sudo banger update"), "{hint}");
        assert_eq!(
            std::fs::read(h.layout.binary()).unwrap(),
            OLD_BIN,
            "old binary is back"
        );
        assert!(
            journal::pending(&h.layout).unwrap(),
            "the journal stays for the retry"
        );

        // Once the unit can restart again, the next `banger update` finishes the rollback first.
        f.services.clear_failures();
        f.services.clear_calls();
        let out = go(&h, &h.opts(), &f).unwrap().to_string();
        assert!(
            out.starts_with("rolled back the interrupted update v0.1.0 -> v0.2.0"),
            "{out}"
        );
        h.assert_exactly(OLD_BIN, "after recovery");
        assert_eq!(f.services.actions(), BOTH_RESTARTED);
    }

    #[test]
    fn record_failure_keeps_the_healthy_new_version_and_recovery_finishes() {
        let h = Host::new("flow-record");
        let f = Fakes::new();
        let toml = h.layout.install_toml();
        // install.toml becomes unreadable once the new doctor has passed.
        let break_toml = |l: &str| {
            if l.starts_with("running the new banger doctor") {
                std::fs::write(&toml, "owner_user = ").unwrap();
            }
        };
        let e = run_with(&h, &h.opts(), &f, &f.services, &break_toml).unwrap_err();
        assert!(
            e.hint
                .clone()
                .unwrap_or_default()
                .contains("the new version is installed and healthy"),
            "{e}"
        );
        assert_eq!(std::fs::read(h.layout.binary()).unwrap(), NEW_BIN);
        install_toml::save(&h.layout, &install_info()).unwrap();
        let out = go(&h, &h.opts(), &Fakes::new()).unwrap().to_string();
        assert!(
            out.starts_with("finished the interrupted update v0.1.0 -> v0.2.0"),
            "{out}"
        );
        h.assert_exactly(NEW_BIN, "finished by recovery");
    }

    #[test]
    fn unreadable_build_info_records_the_version_only() {
        let h = Host::new("flow-noversion");
        let f = Fakes::new();
        f.runner.version_fails.set(true);
        go(&h, &h.opts(), &f).unwrap();
        h.assert_exactly(NEW_BIN, "version fallback");
        let info = install_toml::load(&h.layout).unwrap().unwrap();
        assert_eq!(
            (info.commit.as_str(), info.built_at.as_str()),
            ("unknown", "unknown")
        );
        assert!(f
            .said
            .borrow()
            .iter()
            .any(|l| l.starts_with("warning: cannot read the new build's identity")));
    }

    #[test]
    fn a_second_update_is_refused_while_one_runs() {
        let h = Host::new("flow-lock");
        let _held = UpdateLock::acquire(&h.layout).unwrap();
        assert!(update_in_progress(&h.layout));
        let e = go(&h, &h.opts(), &Fakes::new()).unwrap_err().to_string();
        assert!(e.contains("another banger update is running"), "{e}");
        drop(_held);
        assert!(!update_in_progress(&h.layout));
        assert!(
            !lock_path(&h.layout).exists(),
            "a released lock leaves its file"
        );
        // A lock file a killed update left behind (no process holds it) is taken over.
        std::fs::write(lock_path(&h.layout), b"").unwrap();
        go(&h, &h.opts(), &Fakes::new()).unwrap();
        h.assert_exactly(NEW_BIN, "after taking over a stale lock file");
        assert!(
            !lock_path(&h.layout).exists(),
            "a finished update leaves its lock file"
        );
    }

    #[test]
    fn dry_run_refuses_while_an_interrupted_update_waits() {
        let h = Host::new("flow-dry-pending");
        let f = Fakes::new();
        f.runner.doctor_fails.set(true);
        f.services.fail_on("restart");
        let _ = go(&h, &h.opts(), &f);
        assert!(journal::pending(&h.layout).unwrap());
        let o = Options {
            dry_run: true,
            ..h.opts()
        };
        let e = go(&h, &o, &Fakes::new()).unwrap_err().to_string();
        assert!(e.contains("without --dry-run"), "{e}");
    }

    /// Runs the recovery (`banger update` as root) and checks the host is exactly old or new.
    fn recover_and_check(h: &Host, ctx: &str) -> &'static [u8] {
        let f = Fakes::new();
        let out = go(h, &h.opts(), &f);
        let out = match out {
            Ok(o) => o.to_string(),
            Err(e) => panic!("{ctx}: recovery failed: {e}"),
        };
        let bin = std::fs::read(h.layout.binary()).unwrap();
        let want: &'static [u8] = if bin == NEW_BIN { NEW_BIN } else { OLD_BIN };
        h.assert_exactly(want, ctx);
        if want == OLD_BIN {
            assert!(
                out.starts_with("rolled back the interrupted update"),
                "{ctx}: {out}"
            );
        } else {
            assert!(
                out.starts_with("finished the interrupted update"),
                "{ctx}: {out}"
            );
        }
        // VMs are never touched: the only service actions recovery may take are restarts, and
        // stopping the daemon and its socket (never the helper) to put the database snapshot
        // back first.
        let actions = f.services.actions();
        let restarts = actions
            .iter()
            .skip_while(|a| *a == "stop bangerd.socket" || *a == "stop bangerd.service")
            .collect::<Vec<_>>();
        assert!(
            restarts.iter().all(|a| a.starts_with("restart ")),
            "{ctx}: {actions:?}"
        );
        want
    }

    fn crash(h: &Host, f: &Fakes, services: &dyn ServiceManager) {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _ = run_with(h, &h.opts(), f, services, &|_| {});
        }));
        assert!(r.is_err(), "the simulated crash did not happen");
    }

    #[test]
    fn crash_at_every_seam_then_recovery_ends_old_or_new() {
        // (what crashes, configure, expected end state)
        let runner_crash = |call: &str| {
            let f = Fakes::new();
            *f.runner.panic_on.borrow_mut() = Some(call.to_string());
            f
        };
        let cases: Vec<(&str, Fakes, usize, &[u8])> = vec![
            ("helper restart", Fakes::new(), 1, OLD_BIN),
            ("daemon restart", Fakes::new(), 2, OLD_BIN),
            (
                "wait for the daemon",
                {
                    let f = Fakes::new();
                    f.daemon.panic_on_ready.set(true);
                    f
                },
                0,
                OLD_BIN,
            ),
            ("new doctor", runner_crash("new doctor"), 0, OLD_BIN),
            (
                "new banger version",
                runner_crash("new version"),
                0,
                NEW_BIN,
            ),
            (
                "rollback restart",
                {
                    let f = Fakes::new();
                    f.runner.doctor_fails.set(true);
                    f
                },
                3,
                OLD_BIN,
            ),
        ];
        for (name, f, crash_at, want) in cases {
            let h = Host::new("flow-crash");
            let services = CrashingServices {
                inner: FakeServices::new(),
                crash_at,
                restarts: Cell::new(0),
            };
            crash(&h, &f, &services);
            assert!(
                journal::pending(&h.layout).unwrap(),
                "{name}: no journal left"
            );
            let got = recover_and_check(&h, &format!("crash in {name}"));
            assert_eq!(got, want, "crash in {name}");
        }
    }

    #[test]
    fn killed_after_every_journal_record_recovers_old_or_new() {
        // A full journal, as far as the flow writes before the record step.
        let h = Host::new("flow-journal-source");
        let f = Fakes::new();
        *f.runner.panic_on.borrow_mut() = Some("new version".into());
        crash(&h, &f, &f.services);
        let text = std::fs::read_to_string(journal::path(&h.layout)).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let steps: Vec<Step> = journal::parse(&text)
            .unwrap()
            .iter()
            .map(|r| r.step)
            .collect();
        assert_eq!(steps.last(), Some(&Step::CommitBegin));
        let reached = |s: Step, k: usize| steps[..k].contains(&s);

        for k in 1..=lines.len() {
            // Variants of what the disk can hold when the process died after record k.
            let mut variants: Vec<&str> = vec!["as journalled"];
            if steps[k - 1] == Step::SwapSavedOld {
                variants.push("renamed, not yet journalled");
            }
            if steps[k - 1] == Step::CommitBegin {
                variants.push("committed, not yet journalled");
            }
            for variant in variants {
                let t = Host::new("flow-journal");
                let l = &t.layout;
                let new_path = swap::incoming_path(l);
                let prev = l.binary_previous();
                if reached(Step::SwapPlacedNew, k) || variant == "renamed, not yet journalled" {
                    std::fs::write(l.binary(), NEW_BIN).unwrap();
                    std::fs::write(&prev, OLD_BIN).unwrap();
                } else if reached(Step::SwapSavedOld, k) {
                    std::fs::write(&prev, OLD_BIN).unwrap();
                    std::fs::write(&new_path, NEW_BIN).unwrap();
                } else if reached(Step::SwapCopyDone, k) {
                    std::fs::write(&new_path, NEW_BIN).unwrap();
                } else if reached(Step::SwapCopyBegin, k) {
                    std::fs::write(&new_path, &NEW_BIN[..5]).unwrap();
                }
                if variant == "committed, not yet journalled" {
                    std::fs::remove_file(&prev).unwrap();
                }
                let paths = StagingPaths::new(l);
                std::fs::create_dir_all(&paths.extract_dir).unwrap();
                std::fs::write(paths.binary(), NEW_BIN).unwrap();
                let mut j = lines[..k].join("\n");
                j.push('\n');
                std::fs::write(journal::path(l), j).unwrap();

                let ctx = format!("killed after {:?} ({variant})", steps[k - 1]);
                let got = recover_and_check(&t, &ctx);
                let want: &[u8] = if reached(Step::DoctorPassed, k) {
                    NEW_BIN
                } else {
                    OLD_BIN
                };
                assert_eq!(got, want, "{ctx}");
            }
        }
    }

    // ---- The database across an update whose daemon migrates it ----

    /// What the new release's daemon knows: this binary's migrations and one more, which adds a
    /// column and rewrites rows (like this round's VM network columns).
    fn new_migrations() -> Vec<Migration> {
        let mut m = MIGRATIONS.to_vec();
        m.push(Migration {
            version: LATEST + 1,
            name: "test: vm network columns",
            sql: "ALTER TABLE vms ADD COLUMN test_bridge TEXT; UPDATE vms SET test_bridge = 'br0';",
        });
        m
    }

    /// systemd with a real `bangerd` as far as the database goes: starting the daemon opens
    /// `state.db` with the migrations of whichever binary is at the real path (the new one
    /// migrates it, and writes a row), and fails the start, as the real daemon does, when the
    /// database has migrations it does not know. Stopping it closes the database. It can crash
    /// (panic) before or after its `n`th restart, or on stopping the daemon.
    struct DbServices {
        inner: FakeServices,
        layout: Layout,
        daemon: RefCell<Option<Store>>,
        new_migrates: bool,
        migrated: Cell<bool>,
        restarts: Cell<usize>,
        crash_before: Cell<usize>,
        crash_after: Cell<usize>,
        crash_on_stop: Cell<bool>,
    }

    impl DbServices {
        fn start_daemon(&self) -> Result<()> {
            self.daemon.replace(None);
            let new = std::fs::read(self.layout.binary()).unwrap_or_default() == NEW_BIN;
            let known = if new && self.new_migrates {
                new_migrations()
            } else {
                MIGRATIONS.to_vec()
            };
            match Store::open_with(&self.layout.state_db(), &known) {
                Ok(store) => {
                    if new && !store.migrations_applied().is_empty() {
                        self.migrated.set(true);
                        add_vm(&store, "made-by-the-new-daemon");
                    }
                    self.daemon.replace(Some(store));
                    Ok(())
                }
                Err(e) => {
                    self.inner.set_active(DAEMON_UNIT, false);
                    Err(Error::new(
                        "systemctl restart bangerd.service",
                        format!("bangerd exited at start: {e}"),
                    ))
                }
            }
        }
    }

    impl ServiceManager for DbServices {
        fn daemon_reload(&self) -> Result<()> {
            self.inner.daemon_reload()
        }
        fn enable(&self, u: &str) -> Result<()> {
            self.inner.enable(u)
        }
        fn disable(&self, u: &str) -> Result<()> {
            self.inner.disable(u)
        }
        fn start(&self, u: &str) -> Result<()> {
            self.inner.start(u)
        }
        fn stop(&self, u: &str) -> Result<()> {
            // The socket goes first: a listening socket would start a daemon on the database
            // being put back.
            assert!(
                u != DAEMON_UNIT || !self.inner.active(crate::system::units::DAEMON_SOCKET_UNIT),
                "stopping {u} while its socket still listens"
            );
            if u == DAEMON_UNIT && self.crash_on_stop.get() {
                panic!("simulated crash while stopping {u}");
            }
            self.inner.stop(u)?;
            if u == DAEMON_UNIT {
                self.daemon.replace(None);
            }
            Ok(())
        }
        fn restart(&self, u: &str) -> Result<()> {
            let n = self.restarts.get() + 1;
            self.restarts.set(n);
            if n == self.crash_before.get() {
                panic!("simulated crash before restart {n} ({u})");
            }
            self.inner.restart(u)?;
            if u == DAEMON_UNIT {
                // The service requires its socket (`Requires=`): starting it starts the socket.
                self.inner
                    .set_active(crate::system::units::DAEMON_SOCKET_UNIT, true);
                self.start_daemon()?;
            }
            if n == self.crash_after.get() {
                panic!("simulated crash after restart {n} ({u})");
            }
            Ok(())
        }
        fn is_active(&self, u: &str) -> Result<bool> {
            self.inner.is_active(u)
        }
        fn is_enabled(&self, u: &str) -> Result<bool> {
            self.inner.is_enabled(u)
        }
    }

    fn add_vm(s: &Store, id: &str) {
        s.conn()
            .execute(
                "INSERT INTO vms (id, name, vcpu, memory_mib, state, created_at, updated_at) \
                 VALUES (?1, ?1, 2, 256, 'running', 't', 't')",
                [id],
            )
            .unwrap();
    }

    /// The installed database before an update: its content, owner and mode.
    struct DbBefore {
        dump: Vec<String>,
        owner: (u32, u32, u32),
    }

    /// Gives `h` a real `state.db` (owned by uid/gid 1000, mode 0640, when we are root) with the
    /// old daemon running on it and its last commits still in the WAL.
    fn with_db(h: &Host, new_migrates: bool) -> (DbServices, DbBefore) {
        use std::os::unix::fs::MetadataExt;
        let db = h.layout.state_db();
        std::fs::create_dir_all(h.layout.state_dir()).unwrap();
        let s = Store::open(&db).unwrap();
        for i in 0..20 {
            add_vm(&s, &format!("vm{i}"));
        }
        drop(s);
        if rustix::process::geteuid().is_root() {
            std::os::unix::fs::chown(&db, Some(1000), Some(1000)).unwrap();
        } else {
            eprintln!("SKIP: with_db: not root, the database's owner is not varied (mode is)");
        }
        std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o640)).unwrap();
        let services = DbServices {
            inner: FakeServices::new(),
            layout: h.layout.clone(),
            daemon: RefCell::new(None),
            new_migrates,
            migrated: Cell::new(false),
            restarts: Cell::new(0),
            crash_before: Cell::new(0),
            crash_after: Cell::new(0),
            crash_on_stop: Cell::new(false),
        };
        services.inner.set_active(HELPER_UNIT, true);
        services.inner.set_active(DAEMON_UNIT, true);
        services
            .inner
            .set_active(crate::system::units::DAEMON_SOCKET_UNIT, true);
        services.start_daemon().unwrap();
        add_vm(services.daemon.borrow().as_ref().unwrap(), "in-the-wal");
        let wal = crate::store::backup::tests_sibling(&db, "-wal");
        assert!(
            std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0) > 0,
            "the old daemon's last commit must sit in its WAL"
        );
        let m = std::fs::metadata(&db).unwrap();
        let before = DbBefore {
            dump: dump(&db),
            owner: (m.uid(), m.gid(), m.mode() & 0o7777),
        };
        (services, before)
    }

    /// The database is exactly the pre-update one, the old binary's check says compatible (0),
    /// and the old daemon runs on it.
    fn assert_db_is_old(h: &Host, d: &DbServices, before: &DbBefore, ctx: &str) {
        use std::os::unix::fs::MetadataExt;
        let db = h.layout.state_db();
        assert_eq!(dump(&db), before.dump, "{ctx}: database content");
        assert_eq!(
            check_with(&db, MIGRATIONS).unwrap().exit_code(),
            0,
            "{ctx}: the old binary's check"
        );
        let m = std::fs::metadata(&db).unwrap();
        assert_eq!(
            (m.uid(), m.gid(), m.mode() & 0o7777),
            before.owner,
            "{ctx}: owner and mode"
        );
        assert!(d.daemon.borrow().is_some(), "{ctx}: the old daemon runs");
    }

    fn db_steps(h: &Host) -> Vec<Step> {
        Journal::read(&h.layout)
            .unwrap()
            .iter()
            .map(|r| r.step)
            .collect()
    }

    #[test]
    fn doctor_fail_after_a_migration_puts_the_database_back() {
        let h = Host::new("flow-db-doctor");
        let (d, before) = with_db(&h, true);
        let f = Fakes::new();
        f.runner.doctor_fails.set(true);
        *f.runner.real_db.borrow_mut() = Some(h.layout.state_db());
        let e = run_with(&h, &h.opts(), &f, &d, &|_| {})
            .unwrap_err()
            .to_string();
        assert!(e.contains("(rolled back to previous install)"), "{e}");
        assert!(d.migrated.get(), "the new daemon did migrate the database");
        h.assert_exactly(OLD_BIN, "doctor FAIL with a migration");
        assert_db_is_old(&h, &d, &before, "doctor FAIL with a migration");
        assert_eq!(
            d.inner.actions(),
            [
                "restart bangerd-root.service",
                "restart bangerd.service",
                "stop bangerd.socket",
                "stop bangerd.service",
                "restart bangerd-root.service",
                "restart bangerd.service"
            ]
        );
        let said = f.said.borrow().join("\n");
        assert!(said.contains("database snapshot taken"), "{said}");
        assert!(said.contains("restored "), "{said}");
    }

    #[test]
    fn the_fake_daemon_really_refuses_a_migrated_database() {
        // What the snapshot is for: without it, the old daemon cannot start on the new schema.
        let h = Host::new("flow-db-control");
        let (d, _) = with_db(&h, true);
        std::fs::write(h.layout.binary(), NEW_BIN).unwrap();
        d.restart(DAEMON_UNIT).unwrap();
        assert!(d.migrated.get());
        std::fs::write(h.layout.binary(), OLD_BIN).unwrap();
        let e = d.restart(DAEMON_UNIT).unwrap_err().to_string();
        assert!(
            e.contains("unknown to this binary") || e.contains("does not know"),
            "{e}"
        );
    }

    #[test]
    fn a_good_update_keeps_the_migrated_database_and_drops_the_snapshot() {
        let h = Host::new("flow-db-ok");
        let (d, before) = with_db(&h, true);
        let f = Fakes::new();
        *f.runner.real_db.borrow_mut() = Some(h.layout.state_db());
        let snap = h.layout.updates_dir().join(journal::DB_SNAPSHOT_FILE);
        let seen = RefCell::new(None);
        let look = |l: &str| {
            if l.starts_with("running the new banger doctor") {
                let rec = journal::db_snapshot(&Journal::read(&h.layout).unwrap());
                let sha = crate::update::sha256_file(&snap).ok();
                *seen.borrow_mut() = Some((rec, sha));
            }
        };
        run_with(&h, &h.opts(), &f, &d, &look).unwrap();
        h.assert_exactly(NEW_BIN, "good update with a migration");
        let (rec, sha) = seen.take().unwrap();
        let rec = rec.expect("a db.snapshot record while the update ran");
        assert_eq!(rec.file.as_deref(), Some(journal::DB_SNAPSHOT_FILE));
        assert_eq!(rec.sha256, sha, "the record names the file's hash");
        assert!(!snap.exists(), "the snapshot is removed with staging");
        assert!(d.migrated.get());
        assert_ne!(dump(&h.layout.state_db()), before.dump);
        let db = h.layout.state_db();
        assert_eq!(check_with(&db, &new_migrations()).unwrap().exit_code(), 0);
        assert!(dump(&db)
            .iter()
            .any(|l| l.contains("made-by-the-new-daemon")));
        assert!(!d.inner.actions().iter().any(|a| a.starts_with("stop")));
    }

    #[test]
    fn no_pending_migrations_no_snapshot() {
        let h = Host::new("flow-db-none");
        let (d, before) = with_db(&h, false);
        let f = Fakes::new();
        f.runner.doctor_fails.set(true);
        *f.runner.real_db.borrow_mut() = Some(h.layout.state_db());
        // The new binary migrates nothing here: its check reports 0.
        f.runner.migrations.set(0);
        *f.runner.real_db.borrow_mut() = None;
        let snap = h.layout.updates_dir().join(journal::DB_SNAPSHOT_FILE);
        let seen = RefCell::new(Vec::new());
        let look = |l: &str| {
            if l.starts_with("running the new banger doctor") {
                *seen.borrow_mut() = db_steps(&h);
                assert!(!snap.exists(), "a snapshot was taken");
            }
        };
        let e = run_with(&h, &h.opts(), &f, &d, &look)
            .unwrap_err()
            .to_string();
        assert!(e.contains("(rolled back to previous install)"), "{e}");
        let steps = seen.take();
        assert!(steps.contains(&Step::DoctorBegin), "{steps:?}");
        assert!(!steps.contains(&Step::DbSnapshot), "{steps:?}");
        assert!(!f.said.borrow().iter().any(|l| l.contains("snapshot")));
        // The rollback did not stop the daemon to restore anything.
        assert!(!d.inner.actions().iter().any(|a| a.starts_with("stop")));
        h.assert_exactly(OLD_BIN, "no migrations");
        assert_db_is_old(&h, &d, &before, "no migrations");
    }

    #[test]
    fn dry_run_takes_no_snapshot() {
        let h = Host::new("flow-db-dry");
        let (d, _) = with_db(&h, true);
        let f = Fakes::new();
        *f.runner.real_db.borrow_mut() = Some(h.layout.state_db());
        let o = Options {
            dry_run: true,
            ..h.opts()
        };
        run_with(&h, &o, &f, &d, &|_| {}).unwrap();
        assert!(StagingPaths::new(&h.layout).binary().exists());
        assert!(!h
            .layout
            .updates_dir()
            .join(journal::DB_SNAPSHOT_FILE)
            .exists());
        assert!(!f.said.borrow().iter().any(|l| l.contains("snapshot")));
    }

    #[test]
    fn a_snapshot_that_cannot_be_written_refuses_before_the_swap() {
        let h = Host::new("flow-db-nowrite");
        let (d, before) = with_db(&h, true);
        let f = Fakes::new();
        *f.runner.real_db.borrow_mut() = Some(h.layout.state_db());
        let host_before = h.snapshot();
        // Something occupies the snapshot's temporary path, so it cannot be written.
        let blocker = h
            .layout
            .updates_dir()
            .join(format!("{}.partial", journal::DB_SNAPSHOT_FILE));
        let block = |l: &str| {
            if l.starts_with("the new release migrates the database") {
                std::fs::create_dir_all(blocker.join("x")).unwrap();
            }
        };
        let e = run_with(&h, &h.opts(), &f, &d, &block).unwrap_err();
        let text = e.to_string();
        assert!(text.contains(".partial"), "{text}");
        assert!(text.contains("nothing was changed"), "{text}");
        assert!(!text.contains("rolled back"), "{text}");
        assert_eq!(h.snapshot(), host_before, "host changed");
        assert!(d.inner.actions().is_empty(), "{:?}", d.inner.actions());
        assert!(!h.layout.updates_dir().exists(), "staging left behind");
        assert!(!journal::pending(&h.layout).unwrap());
        assert!(!f
            .runner
            .calls
            .borrow()
            .iter()
            .any(|c| c.ends_with("doctor")));
        assert_db_is_old(&h, &d, &before, "refused");
    }

    #[test]
    fn crashes_around_the_database_snapshot_recover_old_or_new() {
        type Setup = Box<dyn Fn(&DbServices, &Fakes)>;
        // (crash point, setup, the journal's last step at the crash, expected end)
        let cases: Vec<(&str, Setup, Step, &[u8])> = vec![
            (
                "helper restart, after the snapshot record",
                Box::new(|d, _| d.crash_before.set(1)),
                Step::RestartHelperBegin,
                OLD_BIN,
            ),
            (
                "just after the new daemon migrated",
                Box::new(|d, _| d.crash_after.set(2)),
                Step::RestartDaemonBegin,
                OLD_BIN,
            ),
            (
                "stopping the daemon to restore, after db.restore.begin",
                Box::new(|d, f| {
                    f.runner.doctor_fails.set(true);
                    d.crash_on_stop.set(true);
                }),
                Step::DbRestoreBegin,
                OLD_BIN,
            ),
            (
                "rollback restart, after db.restored",
                Box::new(|d, f| {
                    f.runner.doctor_fails.set(true);
                    d.crash_before.set(3);
                }),
                Step::RollbackRestartBegin,
                OLD_BIN,
            ),
            (
                "rollback restart of the old daemon, after db.restored",
                Box::new(|d, f| {
                    f.runner.doctor_fails.set(true);
                    d.crash_after.set(4);
                }),
                Step::RollbackRestartBegin,
                OLD_BIN,
            ),
            (
                "recording the new version",
                Box::new(|_, f| *f.runner.panic_on.borrow_mut() = Some("new version".into())),
                Step::CommitBegin,
                NEW_BIN,
            ),
        ];
        for (name, setup, last, want) in cases {
            let h = Host::new("flow-db-crash");
            let (d, before) = with_db(&h, true);
            let f = Fakes::new();
            *f.runner.real_db.borrow_mut() = Some(h.layout.state_db());
            setup(&d, &f);
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let _ = run_with(&h, &h.opts(), &f, &d, &|_| {});
            }));
            assert!(r.is_err(), "{name}: the simulated crash did not happen");
            let steps = db_steps(&h);
            assert!(steps.contains(&Step::DbSnapshot), "{name}: {steps:?}");
            assert_eq!(steps.last(), Some(&last), "{name}: {steps:?}");
            // The updater died; the daemon (whichever) keeps running. The next update recovers.
            d.crash_before.set(0);
            d.crash_after.set(0);
            d.crash_on_stop.set(false);
            d.inner.clear_calls();
            let rf = Fakes::new();
            *rf.runner.real_db.borrow_mut() = Some(h.layout.state_db());
            let out = run_with(&h, &h.opts(), &rf, &d, &|_| {})
                .unwrap_or_else(|e| panic!("{name}: recovery failed: {e}"))
                .to_string();
            h.assert_exactly(want, name);
            if want == OLD_BIN {
                assert!(
                    out.starts_with("rolled back the interrupted update"),
                    "{name}: {out}"
                );
                assert_db_is_old(&h, &d, &before, name);
                let restored_before = steps.contains(&Step::DbRestored);
                let stops = d
                    .inner
                    .actions()
                    .iter()
                    .filter(|a| *a == "stop bangerd.service")
                    .count();
                assert_eq!(
                    stops,
                    usize::from(!restored_before),
                    "{name}: {:?}",
                    d.inner.actions()
                );
            } else {
                assert!(
                    out.starts_with("finished the interrupted update"),
                    "{name}: {out}"
                );
                let db = h.layout.state_db();
                assert_eq!(
                    check_with(&db, &new_migrations()).unwrap().exit_code(),
                    0,
                    "{name}"
                );
                assert!(
                    d.inner.actions().is_empty(),
                    "{name}: {:?}",
                    d.inner.actions()
                );
            }
        }
    }
}
