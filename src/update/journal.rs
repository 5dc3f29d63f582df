//! The crash-safe update journal, and the decision of what to do with an interrupted update.
//!
//! The journal is `journal.jsonl` in the staging dir: one JSON record per line, append-only, each
//! record written and fsynced before the step it announces (`….begin`) and after it (`….done`), so
//! after a SIGKILL or power loss the last durable record bounds where the update stopped. The first
//! record (`update.begin`) carries the SHA-256 of the old and the new binary, which lets recovery
//! tell from the disk itself which binary is where: the journal says how far the update meant to
//! get; the hashes say how far it really got.
//!
//! When the new release migrates the database, a `db.snapshot` record (after `update.begin`, before
//! the swap) says where the copy of `state.db` taken before the update is; `db.restore.begin` and
//! `db.restored` bracket putting it back during a rollback.
//!
//! [`recovery_plan`] turns the two into one of: nothing to do, discard (nothing on the host
//! changed), roll back (restore the old binary, restarting the units if the new one may have run,
//! and putting the database snapshot back first if the new daemon may have migrated it),
//! finish (the new version already passed doctor), or manual repair with the reason. It never acts;
//! the update flow does, via `swap`. A torn last line (the record being written when the process
//! died) is ignored; any other unreadable line is corruption and ends in manual repair.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{fsync_dir, sha256_file};
use crate::error::{Error, Result};
use crate::layout::Layout;

/// File name of the journal inside the staging dir.
pub const FILE_NAME: &str = "journal.jsonl";

/// The journal's path for `layout`.
pub fn path(layout: &Layout) -> PathBuf {
    layout.updates_dir().join(FILE_NAME)
}

/// What the update is, recorded once in the first record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpdateInfo {
    /// Running version (without `v`).
    pub from: String,
    /// Target version (without `v`).
    pub to: String,
    /// SHA-256 of the installed binary before the update.
    pub old_sha256: String,
    /// SHA-256 of the staged (new) binary.
    pub new_sha256: String,
}

/// File name of the database snapshot inside the staging dir.
pub const DB_SNAPSHOT_FILE: &str = "state.db.snapshot";

/// The copy of `state.db` taken before an update whose daemon migrates it (the `db.snapshot`
/// record).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DbSnapshot {
    /// The snapshot's file name in the staging dir ([`DB_SNAPSHOT_FILE`]); absent when there was
    /// no database before the update, so putting it back means removing the one the new daemon
    /// created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    /// SHA-256 of the snapshot file, checked before it is put back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// Its size.
    pub bytes: u64,
    /// Owner uid of the original `state.db` (the daemon runs as it).
    pub uid: u32,
    /// Owner gid of the original.
    pub gid: u32,
    /// Permission bits of the original.
    pub mode: u32,
}

/// One step of an update. The names are the journal's on-disk vocabulary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Step {
    /// The update starts; carries [`UpdateInfo`]. Nothing on the host has changed yet.
    #[serde(rename = "update.begin")]
    UpdateBegin,
    /// The database snapshot is complete and durable; carries [`DbSnapshot`]. Written right after
    /// `update.begin` when the new release migrates the database, never otherwise.
    #[serde(rename = "db.snapshot")]
    DbSnapshot,
    /// About to stop `bangerd` and put the database snapshot back (rolling back).
    #[serde(rename = "db.restore.begin")]
    DbRestoreBegin,
    /// `state.db` is the snapshot again (durable), with no `-wal`/`-shm` beside it.
    #[serde(rename = "db.restored")]
    DbRestored,
    /// About to copy the staged binary next to the real one (`banger.new`).
    #[serde(rename = "swap.copy.begin")]
    SwapCopyBegin,
    /// `banger.new` is complete and durable.
    #[serde(rename = "swap.copy.done")]
    SwapCopyDone,
    /// About to save the old binary as `.previous`.
    #[serde(rename = "swap.begin")]
    SwapBegin,
    /// `.previous` holds the old binary (durable).
    #[serde(rename = "swap.saved_old")]
    SwapSavedOld,
    /// The new binary is at the real path (durable).
    #[serde(rename = "swap.placed_new")]
    SwapPlacedNew,
    /// The swap step is complete.
    #[serde(rename = "swap.done")]
    SwapDone,
    /// About to restart `bangerd-root`.
    #[serde(rename = "restart.helper.begin")]
    RestartHelperBegin,
    /// `bangerd-root` restarted.
    #[serde(rename = "restart.helper.done")]
    RestartHelperDone,
    /// About to restart `bangerd`.
    #[serde(rename = "restart.daemon.begin")]
    RestartDaemonBegin,
    /// `bangerd` restarted and answers.
    #[serde(rename = "restart.daemon.done")]
    RestartDaemonDone,
    /// About to run the new `banger doctor`.
    #[serde(rename = "doctor.begin")]
    DoctorBegin,
    /// The new `banger doctor` passed: the new version is known good.
    #[serde(rename = "doctor.passed")]
    DoctorPassed,
    /// About to record install.toml and remove `.previous`.
    #[serde(rename = "commit.begin")]
    CommitBegin,
    /// The update is complete.
    #[serde(rename = "done")]
    Done,
    /// A rollback starts (from a failure or from recovery).
    #[serde(rename = "rollback.begin")]
    RollbackBegin,
    /// The old binary is back at the real path (durable).
    #[serde(rename = "rollback.restored")]
    RollbackRestored,
    /// About to restart both units on the old binary.
    #[serde(rename = "rollback.restart.begin")]
    RollbackRestartBegin,
    /// Both units restarted on the old binary.
    #[serde(rename = "rollback.restart.done")]
    RollbackRestartDone,
    /// The rollback is complete.
    #[serde(rename = "rollback.done")]
    RollbackDone,
    /// A step name this binary does not know (written by another version).
    #[serde(other)]
    Unknown,
}

/// One journal line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The step.
    pub step: Step,
    /// RFC 3339 time it was written.
    pub at: String,
    /// Present on `update.begin`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<UpdateInfo>,
    /// Present on `db.snapshot`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub db: Option<DbSnapshot>,
}

/// Parses journal text. A last line without its newline that does not parse is a torn write and
/// is dropped; any other bad line is an error naming its line number.
pub fn parse(text: &str) -> Result<Vec<Record>> {
    let mut out = Vec::new();
    let complete = text.ends_with('\n');
    let lines: Vec<&str> = text.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Record>(line) {
            Ok(r) => out.push(r),
            Err(_) if i + 1 == lines.len() && !complete => break,
            Err(e) => {
                return Err(Error::new(
                    "reading the update journal",
                    format!("line {} is corrupt ({e})", i + 1),
                ))
            }
        }
    }
    Ok(out)
}

/// True when there is no journal or its last record ends the update (`done`, `rollback.done`).
pub fn is_finished(records: &[Record]) -> bool {
    records
        .last()
        .is_none_or(|r| matches!(r.step, Step::Done | Step::RollbackDone))
}

/// True when the staging dir holds an interrupted update that recovery must handle first.
pub fn pending(layout: &Layout) -> Result<bool> {
    Ok(!is_finished(&Journal::read(layout)?))
}

/// An open journal, appending.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    file: File,
    info: UpdateInfo,
    db: Option<DbSnapshot>,
}

impl Journal {
    /// Starts a new journal in the (existing) staging dir with the `update.begin` record.
    /// Refuses when an unfinished journal is there: recover that first.
    pub fn create(layout: &Layout, info: UpdateInfo) -> Result<Journal> {
        let p = path(layout);
        if pending(layout)? {
            return Err(Error::new(
                "starting the update journal",
                format!("{} records an interrupted update", p.display()),
            )
            .hint("run sudo banger update to finish or roll it back first"));
        }
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(&p)
            .map_err(|e| Error::new(format!("creating {}", p.display()), e))?;
        drop(file);
        let file = OpenOptions::new()
            .append(true)
            .open(&p)
            .map_err(|e| Error::new(format!("opening {}", p.display()), e))?;
        let mut j = Journal {
            path: p,
            file,
            info: info.clone(),
            db: None,
        };
        j.write(Record {
            step: Step::UpdateBegin,
            at: crate::clock::now_rfc3339(),
            info: Some(info),
            db: None,
        })?;
        if let Some(dir) = j.path.parent() {
            fsync_dir(dir)?;
        }
        Ok(j)
    }

    /// Opens the existing journal to continue it (recovery). It must start with `update.begin`.
    pub fn open(layout: &Layout) -> Result<Journal> {
        let p = path(layout);
        let records = Journal::read(layout)?;
        let info = begin_info(&records).ok_or_else(|| {
            Error::new(
                format!("opening the update journal {}", p.display()),
                "it has no update.begin record",
            )
        })?;
        let file = OpenOptions::new()
            .append(true)
            .open(&p)
            .map_err(|e| Error::new(format!("opening {}", p.display()), e))?;
        let j = Journal {
            path: p,
            file,
            info,
            db: db_snapshot(&records),
        };
        // A torn last line (never acknowledged) would glue onto the next record: cut it off.
        let text = std::fs::read(&j.path)
            .map_err(|e| Error::new(format!("reading {}", j.path.display()), e))?;
        if !text.is_empty() && !text.ends_with(b"\n") {
            let keep = text.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
            j.file
                .set_len(keep as u64)
                .and_then(|()| j.file.sync_data())
                .map_err(|e| {
                    Error::new(
                        format!("truncating a torn record in {}", j.path.display()),
                        e,
                    )
                })?;
        }
        Ok(j)
    }

    /// All records of the journal for `layout`; no journal is an empty list.
    pub fn read(layout: &Layout) -> Result<Vec<Record>> {
        let p = path(layout);
        match std::fs::read_to_string(&p) {
            Ok(text) => parse(&text).map_err(|e| Error {
                what: format!("reading the update journal {}", p.display()),
                ..e
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(Error::new(format!("reading {}", p.display()), e)),
        }
    }

    /// What this update is.
    pub fn info(&self) -> &UpdateInfo {
        &self.info
    }

    /// Where the journal lives.
    pub fn file_path(&self) -> &Path {
        &self.path
    }

    /// The database snapshot this update took, if it took one.
    pub fn db_snapshot(&self) -> Option<&DbSnapshot> {
        self.db.as_ref()
    }

    /// Appends one record and fsyncs it before returning.
    pub fn append(&mut self, step: Step) -> Result<()> {
        self.write(Record {
            step,
            at: crate::clock::now_rfc3339(),
            info: None,
            db: None,
        })
    }

    /// Appends the `db.snapshot` record for a snapshot that is already complete and durable.
    pub fn record_db_snapshot(&mut self, snapshot: DbSnapshot) -> Result<()> {
        self.write(Record {
            step: Step::DbSnapshot,
            at: crate::clock::now_rfc3339(),
            info: None,
            db: Some(snapshot.clone()),
        })?;
        self.db = Some(snapshot);
        Ok(())
    }

    fn write(&mut self, r: Record) -> Result<()> {
        let mut line =
            serde_json::to_string(&r).map_err(|e| Error::new("encoding a journal record", e))?;
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .and_then(|()| self.file.sync_data())
            .map_err(|e| Error::new(format!("writing {}", self.path.display()), e))
    }
}

/// The snapshot the `db.snapshot` record describes, if there is one.
pub fn db_snapshot(records: &[Record]) -> Option<DbSnapshot> {
    records
        .iter()
        .find(|r| r.step == Step::DbSnapshot)
        .and_then(|r| r.db.clone())
}

fn begin_info(records: &[Record]) -> Option<UpdateInfo> {
    records
        .first()
        .filter(|r| r.step == Step::UpdateBegin)
        .and_then(|r| r.info.clone())
}

/// What a file on disk is, judged by its hash against the journal's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileState {
    /// Not there.
    Missing,
    /// The old binary.
    Old,
    /// The new binary.
    New,
    /// Something else (or unreadable), with a description.
    Other(String),
}

/// What is actually on disk for an update.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskState {
    /// The real binary path.
    pub real: FileState,
    /// `banger.previous`.
    pub previous: FileState,
}

fn classify(p: &Path, info: &UpdateInfo) -> FileState {
    match std::fs::symlink_metadata(p) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return FileState::Missing,
        Err(e) => return FileState::Other(format!("{}: {e}", p.display())),
        Ok(m) if !m.is_file() => {
            return FileState::Other(format!("{} is not a regular file", p.display()))
        }
        Ok(_) => {}
    }
    match sha256_file(p) {
        Ok(h) if h == info.old_sha256 => FileState::Old,
        Ok(h) if h == info.new_sha256 => FileState::New,
        Ok(h) => FileState::Other(format!("{} has unexpected sha256 {h}", p.display())),
        Err(e) => FileState::Other(e.to_string()),
    }
}

impl DiskState {
    /// Looks at the real binary and `.previous` of `layout`.
    pub fn inspect(layout: &Layout, info: &UpdateInfo) -> DiskState {
        DiskState {
            real: classify(&layout.binary(), info),
            previous: classify(&layout.binary_previous(), info),
        }
    }
}

/// What to do about the journal found in the staging dir.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecoveryPlan {
    /// No interrupted update (no journal, or it ended): just wipe staging.
    Nothing,
    /// Interrupted before the installed binary changed: remove leftovers (`swap::restore` does it
    /// without touching the real binary), wipe staging. No restart needed.
    Discard,
    /// Put the old binary back (`swap::restore`). When `restart_services`, the new binary may have
    /// run as a service, so restart both units afterwards (VMs survive restarts by design).
    RollBack {
        /// Restart `bangerd-root` and `bangerd` after restoring.
        restart_services: bool,
        /// Before restarting: stop `bangerd` and put the database snapshot back (the new daemon
        /// may have migrated the database, which the old one would refuse).
        restore_db: bool,
    },
    /// The new version passed doctor before the interruption: record it in install.toml, remove
    /// `.previous` (`swap::commit`), wipe staging.
    Finish,
    /// The disk matches nothing the journal explains; a person must look.
    Manual {
        /// What does not add up.
        reason: String,
    },
}

/// Reads the disk for `layout` and decides (see [`decide`]).
pub fn recovery_plan(records: &[Record], layout: &Layout) -> RecoveryPlan {
    match begin_info(records) {
        Some(info) => decide(records, &DiskState::inspect(layout, &info)),
        None => decide(
            records,
            &DiskState {
                real: FileState::Missing,
                previous: FileState::Missing,
            },
        ),
    }
}

/// The pure decision from the journal and the disk state.
pub fn decide(records: &[Record], disk: &DiskState) -> RecoveryPlan {
    if is_finished(records) {
        return RecoveryPlan::Nothing;
    }
    let manual = |reason: String| RecoveryPlan::Manual {
        reason: format!(
            "{reason} (real binary: {:?}, .previous: {:?})",
            disk.real, disk.previous
        ),
    };
    if begin_info(records).is_none() {
        return manual("the update journal does not start with update.begin".into());
    }
    if records.iter().any(|r| r.step == Step::Unknown) {
        return manual("the update journal has steps this banger does not know".into());
    }
    let reached = |s: Step| records.iter().any(|r| r.step == s);
    let rolling_back = reached(Step::RollbackBegin);
    let verified = (reached(Step::DoctorPassed) || reached(Step::CommitBegin)) && !rolling_back;
    if verified {
        return match disk.real {
            FileState::New => RecoveryPlan::Finish,
            _ => manual("the new version passed doctor but is no longer at the real path".into()),
        };
    }
    let restarted = reached(Step::RestartHelperBegin)
        || reached(Step::RestartDaemonBegin)
        || reached(Step::RollbackRestartBegin);
    // The new binary may have been started by anything once it sat at the real path.
    let new_was_live = restarted || reached(Step::SwapPlacedNew) || disk.real == FileState::New;
    let snapshot = reached(Step::DbSnapshot);
    if snapshot && db_snapshot(records).is_none() {
        return manual(
            "the update journal's db.snapshot record does not say where the snapshot is".into(),
        );
    }
    if !snapshot && (reached(Step::DbRestoreBegin) || reached(Step::DbRestored)) {
        return manual("the update journal restores a database snapshot it never took".into());
    }
    // Once `db.restored` is durable the old daemon may have written to the restored database:
    // putting the snapshot back again would lose that.
    let restore_db = new_was_live && snapshot && !reached(Step::DbRestored);
    match (&disk.real, &disk.previous) {
        (FileState::Old, _) if !new_was_live => RecoveryPlan::Discard,
        (FileState::Old, _) | (_, FileState::Old) => RecoveryPlan::RollBack {
            restart_services: new_was_live,
            restore_db,
        },
        _ => manual("the old binary is neither at the real path nor at .previous".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::update::testutil::TempDir;
    use FileState::{Missing, New, Old};

    fn rec(step: Step) -> Record {
        Record {
            step,
            at: "2026-01-01T00:00:00Z".into(),
            info: (step == Step::UpdateBegin).then(info),
            db: (step == Step::DbSnapshot).then(snap),
        }
    }

    fn snap() -> DbSnapshot {
        DbSnapshot {
            file: Some(DB_SNAPSHOT_FILE.into()),
            sha256: Some("cc".into()),
            bytes: 4096,
            uid: 1000,
            gid: 1000,
            mode: 0o600,
        }
    }

    fn info() -> UpdateInfo {
        UpdateInfo {
            from: "0.1.0".into(),
            to: "0.2.0".into(),
            old_sha256: "aa".into(),
            new_sha256: "bb".into(),
        }
    }

    fn journal(steps: &[Step]) -> Vec<Record> {
        steps.iter().map(|s| rec(*s)).collect()
    }

    #[test]
    fn parse_tolerates_only_a_torn_last_line() {
        let a = serde_json::to_string(&rec(Step::UpdateBegin)).unwrap();
        let b = serde_json::to_string(&rec(Step::SwapBegin)).unwrap();
        assert_eq!(parse(&format!("{a}\n{b}\n")).unwrap().len(), 2);
        assert_eq!(parse(&format!("{a}\n{}", &b[..10])).unwrap().len(), 1);
        let e = parse(&format!("{a}\n{}\n{b}\n", &b[..10]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 2 is corrupt"), "{e}");
        assert!(parse("").unwrap().is_empty());
        let unknown = parse("{\"step\":\"future.step\",\"at\":\"x\"}\n").unwrap();
        assert_eq!(unknown[0].step, Step::Unknown);
        assert_eq!(
            b.split(',').next().unwrap(),
            "{\"step\":\"swap.begin\"",
            "on-disk step names are part of the format"
        );
    }

    #[test]
    fn decision_table() {
        use Step::*;
        let other = || FileState::Other("x".into());
        let swap_all = [
            UpdateBegin,
            SwapCopyBegin,
            SwapCopyDone,
            SwapBegin,
            SwapSavedOld,
            SwapPlacedNew,
            SwapDone,
        ];
        let upto = |n: usize| swap_all[..n].to_vec();
        let with = |extra: &[Step]| {
            let mut v = swap_all.to_vec();
            v.extend_from_slice(extra);
            v
        };
        let rb = |restart| RecoveryPlan::RollBack {
            restart_services: restart,
            restore_db: false,
        };
        let rbdb = |restore_db| RecoveryPlan::RollBack {
            restart_services: true,
            restore_db,
        };
        // The same update, with a database snapshot recorded right after update.begin.
        let db_all = {
            let mut v = vec![UpdateBegin, DbSnapshot];
            v.extend_from_slice(&swap_all[1..]);
            v
        };
        let db_with = |extra: &[Step]| {
            let mut v = db_all.clone();
            v.extend_from_slice(extra);
            v
        };
        let restarts = [
            RestartHelperBegin,
            RestartHelperDone,
            RestartDaemonBegin,
            RestartDaemonDone,
            DoctorBegin,
        ];
        let cases: Vec<(Vec<Step>, FileState, FileState, Option<RecoveryPlan>)> = vec![
            (vec![], Missing, Missing, Some(RecoveryPlan::Nothing)),
            (
                with(&[
                    RestartHelperBegin,
                    RestartHelperDone,
                    RestartDaemonBegin,
                    RestartDaemonDone,
                    DoctorBegin,
                    DoctorPassed,
                    CommitBegin,
                    Done,
                ]),
                New,
                Missing,
                Some(RecoveryPlan::Nothing),
            ),
            (
                with(&[RollbackBegin, RollbackRestored, RollbackDone]),
                Old,
                Missing,
                Some(RecoveryPlan::Nothing),
            ),
            // Before the real path changed.
            (upto(1), Old, Missing, Some(RecoveryPlan::Discard)),
            (upto(2), Old, Missing, Some(RecoveryPlan::Discard)),
            (upto(3), Old, Missing, Some(RecoveryPlan::Discard)),
            (upto(4), Old, Missing, Some(RecoveryPlan::Discard)),
            (upto(4), Old, Old, Some(RecoveryPlan::Discard)),
            (upto(5), Old, Old, Some(RecoveryPlan::Discard)),
            // Killed between the rename and its record: the disk says new.
            (upto(5), New, Old, Some(rb(true))),
            (upto(6), New, Old, Some(rb(true))),
            (upto(7), New, Old, Some(rb(true))),
            (with(&[RestartHelperBegin]), New, Old, Some(rb(true))),
            (
                with(&[
                    RestartHelperBegin,
                    RestartHelperDone,
                    RestartDaemonBegin,
                    RestartDaemonDone,
                    DoctorBegin,
                ]),
                New,
                Old,
                Some(rb(true)),
            ),
            // Doctor passed: finish, whatever the state of .previous.
            (
                with(&[
                    RestartHelperBegin,
                    RestartHelperDone,
                    RestartDaemonBegin,
                    RestartDaemonDone,
                    DoctorBegin,
                    DoctorPassed,
                ]),
                New,
                Old,
                Some(RecoveryPlan::Finish),
            ),
            (
                with(&[
                    RestartHelperBegin,
                    RestartHelperDone,
                    RestartDaemonBegin,
                    RestartDaemonDone,
                    DoctorBegin,
                    DoctorPassed,
                    CommitBegin,
                ]),
                New,
                Missing,
                Some(RecoveryPlan::Finish),
            ),
            (with(&[DoctorPassed]), Old, Old, None),
            // Rollback interrupted, before and after the restore.
            (
                with(&[RestartHelperBegin, RollbackBegin]),
                New,
                Old,
                Some(rb(true)),
            ),
            (
                with(&[RestartHelperBegin, RollbackBegin]),
                Old,
                Missing,
                Some(rb(true)),
            ),
            (
                with(&[
                    RestartHelperBegin,
                    RollbackBegin,
                    RollbackRestored,
                    RollbackRestartBegin,
                ]),
                Old,
                Missing,
                Some(rb(true)),
            ),
            (
                with(&[DoctorBegin, DoctorPassed, RollbackBegin]),
                Old,
                Missing,
                Some(rb(true)),
            ),
            // A placed-new record with the old binary in place: restore path already ran; restart.
            (upto(6), Old, Missing, Some(rb(true))),
            // Nothing adds up.
            (upto(6), New, Missing, None),
            (upto(6), Missing, Missing, None),
            (upto(6), other(), other(), None),
            (upto(3), other(), Missing, None),
            (vec![SwapBegin], Old, Missing, None),
            (vec![UpdateBegin, Unknown], Old, Missing, None),
            // With a database snapshot: nothing to restore while the new binary never ran.
            (
                vec![UpdateBegin, DbSnapshot],
                Old,
                Missing,
                Some(RecoveryPlan::Discard),
            ),
            (db_all[..5].to_vec(), Old, Old, Some(RecoveryPlan::Discard)),
            // From the moment the new binary may have run, the snapshot goes back.
            (db_all[..6].to_vec(), New, Old, Some(rbdb(true))),
            (db_all.clone(), New, Old, Some(rbdb(true))),
            (db_with(&restarts[..1]), New, Old, Some(rbdb(true))),
            (db_with(&restarts), New, Old, Some(rbdb(true))),
            (
                db_with(&[RestartHelperBegin, RollbackBegin, RollbackRestored]),
                Old,
                Missing,
                Some(rbdb(true)),
            ),
            // Killed while putting it back: do it again.
            (
                db_with(&[
                    RestartHelperBegin,
                    RollbackBegin,
                    RollbackRestored,
                    DbRestoreBegin,
                ]),
                Old,
                Missing,
                Some(rbdb(true)),
            ),
            // Put back: the old daemon may have written to it since; only restart.
            (
                db_with(&[
                    RestartHelperBegin,
                    RollbackBegin,
                    RollbackRestored,
                    DbRestoreBegin,
                    DbRestored,
                ]),
                Old,
                Missing,
                Some(rbdb(false)),
            ),
            (
                db_with(&[
                    RestartHelperBegin,
                    RollbackBegin,
                    RollbackRestored,
                    DbRestoreBegin,
                    DbRestored,
                    RollbackRestartBegin,
                ]),
                Old,
                Missing,
                Some(rbdb(false)),
            ),
            // Doctor passed: the migrated database stays with the new version.
            (
                db_with(&[
                    RestartHelperBegin,
                    RestartHelperDone,
                    RestartDaemonBegin,
                    RestartDaemonDone,
                    DoctorBegin,
                    DoctorPassed,
                ]),
                New,
                Old,
                Some(RecoveryPlan::Finish),
            ),
            // A restore without a snapshot does not add up.
            (
                with(&[RestartHelperBegin, RollbackBegin, DbRestoreBegin]),
                Old,
                Missing,
                None,
            ),
        ];
        for (i, (steps, real, previous, want)) in cases.into_iter().enumerate() {
            let mut records = journal(&steps);
            if steps.first() != Some(&UpdateBegin) {
                for r in &mut records {
                    r.info = None;
                }
            }
            let got = decide(&records, &DiskState { real, previous });
            match want {
                Some(w) => assert_eq!(got, w, "case {i}: {steps:?}"),
                None => assert!(
                    matches!(got, RecoveryPlan::Manual { .. }),
                    "case {i}: {steps:?} gave {got:?}"
                ),
            }
        }
    }

    #[test]
    fn a_snapshot_record_that_says_nothing_is_manual_repair() {
        use Step::*;
        let mut records = journal(&[
            UpdateBegin,
            DbSnapshot,
            SwapCopyBegin,
            SwapCopyDone,
            SwapBegin,
            SwapSavedOld,
            SwapPlacedNew,
        ]);
        records[1].db = None;
        let disk = DiskState {
            real: New,
            previous: Old,
        };
        assert!(matches!(
            decide(&records, &disk),
            RecoveryPlan::Manual { .. }
        ));
        assert_eq!(
            db_snapshot(&journal(&[UpdateBegin, DbSnapshot])),
            Some(snap())
        );
        // The record's on-disk form.
        let line = serde_json::to_string(&rec(DbSnapshot)).unwrap();
        assert!(line.starts_with("{\"step\":\"db.snapshot\""), "{line}");
        assert!(
            line.contains("\"db\":{\"file\":\"state.db.snapshot\",\"sha256\":\"cc\""),
            "{line}"
        );
    }

    #[test]
    fn create_append_read_open() {
        let dir = TempDir::new("journal");
        let layout = Layout::under(dir.path());
        std::fs::create_dir_all(layout.updates_dir()).unwrap();
        assert!(!pending(&layout).unwrap());
        let mut j = Journal::create(&layout, info()).unwrap();
        j.append(Step::SwapBegin).unwrap();
        assert!(pending(&layout).unwrap());
        let e = Journal::create(&layout, info()).unwrap_err().to_string();
        assert!(e.contains("interrupted update"), "{e}");
        drop(j);
        // A torn write, then resume: the next record starts on its own line.
        let mut f = OpenOptions::new().append(true).open(path(&layout)).unwrap();
        f.write_all(b"{\"step\":\"swap.sa").unwrap();
        let mut j = Journal::open(&layout).unwrap();
        assert_eq!(j.info(), &info());
        assert_eq!(j.db_snapshot(), None);
        j.record_db_snapshot(snap()).unwrap();
        assert_eq!(j.db_snapshot(), Some(&snap()));
        assert_eq!(Journal::open(&layout).unwrap().db_snapshot(), Some(&snap()));
        j.append(Step::RollbackBegin).unwrap();
        j.append(Step::RollbackDone).unwrap();
        let steps: Vec<Step> = Journal::read(&layout)
            .unwrap()
            .iter()
            .map(|r| r.step)
            .collect();
        assert_eq!(
            steps,
            [
                Step::UpdateBegin,
                Step::SwapBegin,
                Step::DbSnapshot,
                Step::RollbackBegin,
                Step::RollbackDone
            ]
        );
        assert!(!pending(&layout).unwrap());
        Journal::create(&layout, info()).unwrap();
        assert_eq!(Journal::read(&layout).unwrap().len(), 1);
    }

    #[test]
    fn open_needs_begin() {
        let dir = TempDir::new("journal-nobegin");
        let layout = Layout::under(dir.path());
        std::fs::create_dir_all(layout.updates_dir()).unwrap();
        std::fs::write(path(&layout), "{\"step\":\"swap.begin\",\"at\":\"x\"}\n").unwrap();
        assert!(Journal::open(&layout).is_err());
        assert!(matches!(
            recovery_plan(&Journal::read(&layout).unwrap(), &layout),
            RecoveryPlan::Manual { .. }
        ));
    }
}
