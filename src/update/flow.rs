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
//! 8. Swap (journalled).
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

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::download::{self, Fetcher, TtyProgress};
use super::journal::{self, DiskState, FileState, Journal, RecoveryPlan, Step, UpdateInfo};
use super::manifest::{Manifest, Release};
use super::sha256sums::Sha256Sums;
use super::signature::{self, KeySource};
use super::staging::{self, StagingPaths};
use super::swap;
use super::version::{self, Direction, Version};
use crate::buildinfo::{parse_one_line_version, BuildInfo};
use crate::error::{Error, Result};
use crate::layout::{Layout, DAEMON_UNIT, HELPER_UNIT};
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
    let _lock = if opts.is_root && !opts.check {
        let lock = UpdateLock::acquire(layout)?;
        if let Some(done) = recover_interrupted_update(layout, opts, seams)? {
            return Ok(done);
        }
        Some(lock)
    } else {
        None
    };
    let target = fetch_manifest_and_choose_target(opts, seams, &running)?; // 1
    if opts.check {
        return Ok(report_check(&target)); // 2
    }
    if target.direction == Some(Direction::UpToDate) {
        return Ok(Outcome::UpToDate { running });
    }
    require_root_and_an_install(layout, opts, &target)?; // 3
    refuse_while_operations_in_flight(opts, seams)?; // 4
    let staged =
        match stage_verified_release(layout, opts, seams, &target) // 5
        .and_then(|s| sanity_run_staged_binary(seams, &s, &target).map(|()| s)) // 6
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
    let mut journal = swap_in_new_binary(layout, seams, &staged, &target)?; // 8
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
    let restart = match journal::recovery_plan(&records, layout) {
        RecoveryPlan::Nothing => return Ok(None),
        RecoveryPlan::Discard => false,
        RecoveryPlan::RollBack { restart_services } => restart_services,
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

/// Step 6: run the staged binary before trusting it: it must say it is the target, and its daemon
/// must accept the installed database (`--check-migrations`: 0 or 1 go, 2 aborts).
fn sanity_run_staged_binary(seams: &Seams, staged: &Staged, target: &Target) -> Result<()> {
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
        Some(0) | Some(1) => {
            (seams.say)(&format!(
                "staged {} runs; database: {}",
                target.to,
                out.stdout.trim()
            ));
            Ok(())
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

/// Step 8: swap the binary with the journal recording each step. A failure here restores the old
/// binary (nothing was restarted, so nothing else changed).
fn swap_in_new_binary(
    layout: &Layout,
    seams: &Seams,
    staged: &Staged,
    target: &Target,
) -> Result<Journal> {
    let info = UpdateInfo {
        from: target.from.as_str().to_string(),
        to: target.to.as_str().to_string(),
        old_sha256: super::sha256_file(&layout.binary())?,
        new_sha256: super::sha256_file(&staged.binary)?,
    };
    let mut journal = Journal::create(layout, info)?;
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
    say(&format!("{original}"));
    say(&format!("rolling back to {from}"));
    let mut failures: Vec<String> = Vec::new();
    if let Err(e) = swap::restore(layout, journal) {
        failures.push(format!("restoring the binary: {e}"));
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
        "manual repair needed: {} is {}, {} is {}; the update journal is {}; see journalctl -u {HELPER_UNIT} -u {DAEMON_UNIT}, then run sudo banger update to retry the rollback (or sudo banger system restart once the old binary is in place); running VMs were not touched",
        layout.binary().display(),
        describe(&disk.real),
        layout.binary_previous().display(),
        describe(&disk.previous),
        journal.file_path().display()
    ))
}

/// Where the update lock lives: beside the staging dir, which is recreated by every update.
pub fn lock_path(layout: &Layout) -> PathBuf {
    layout.cache_dir().join("update.lock")
}

/// An exclusive `flock` held for a whole update run: a second `banger update` refuses, and
/// `banger doctor` tells an update in progress from one a crash left behind.
#[derive(Debug)]
pub struct UpdateLock {
    _file: File,
}

impl UpdateLock {
    /// Takes the lock (creating its file 0644), or refuses when another update holds it.
    pub fn acquire(layout: &Layout) -> Result<UpdateLock> {
        let p = lock_path(layout);
        let what = || format!("locking {}", p.display());
        std::fs::create_dir_all(layout.cache_dir()).map_err(|e| Error::new(what(), e))?;
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o644)
            .open(&p)
            .map_err(|e| Error::new(what(), e))?;
        match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => Ok(UpdateLock { _file: file }),
            Err(rustix::io::Errno::WOULDBLOCK) => Err(Error::new(
                "starting banger update",
                "another banger update is running",
            )
            .hint("wait for it to finish")),
            Err(e) => Err(Error::new(what(), e)),
        }
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
