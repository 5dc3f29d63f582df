//! Putting the staged binary in place, putting the old one back, and dropping the backup.
//!
//! The real binary's path never stops naming a complete, runnable banger:
//! 1. the staged binary is copied next to the real one as `banger.new` (same directory, so the
//!    final step is a same-filesystem rename even when the staging dir is on another filesystem),
//!    fsynced;
//! 2. the old binary is saved as `banger.previous` with a hard link (a copy if the filesystem has
//!    no hard links) — the same end state as DESIGN §8's "rename the real file to `.previous`",
//!    without a window in which the real path is missing;
//! 3. `rename(banger.new, banger)` replaces the real file in one atomic step; the directory is
//!    fsynced.
//!
//! Every step is journalled before and after. [`restore`] and [`commit`] look at the disk (by hash)
//! rather than trust the journal, so both can be re-run after a crash at any point. This module
//! never restarts anything and never touches a running VM.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::fsync_dir;
use super::journal::{DiskState, FileState, Journal, Step};
use crate::error::{Error, Result};
use crate::layout::Layout;

/// `banger.new`: where the staged binary is copied before the rename (next to the real file).
pub fn incoming_path(layout: &Layout) -> PathBuf {
    layout.lib_dir().join("banger.new")
}

fn io_err(what: String) -> impl FnOnce(std::io::Error) -> Error {
    move |e| Error::new(what, e)
}

fn remove_if_exists(p: &Path) -> Result<()> {
    match std::fs::remove_file(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::new(format!("removing {}", p.display()), e)),
    }
}

/// Copies `from` to `to` (created 0755, replacing), fsynced; returns the SHA-256 of what was written.
fn copy_durably(from: &Path, to: &Path) -> Result<String> {
    let what = || format!("copying {} to {}", from.display(), to.display());
    remove_if_exists(to)?;
    let mut src = std::fs::File::open(from).map_err(io_err(what()))?;
    let mut dst = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o700)
        .open(to)
        .map_err(io_err(what()))?;
    let mut hasher = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = src.read(&mut buf).map_err(io_err(what()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        dst.write_all(&buf[..n]).map_err(io_err(what()))?;
    }
    dst.set_permissions(std::fs::Permissions::from_mode(0o755))
        .map_err(io_err(what()))?;
    dst.sync_all().map_err(io_err(what()))?;
    Ok(hex::encode(hasher.finish()))
}

/// The individual actions of [`swap_in`], in order; tests stop after any of them.
const SWAP_ACTIONS: usize = 9;

fn swap_action(layout: &Layout, staged: &Path, journal: &mut Journal, i: usize) -> Result<()> {
    let dir = layout.lib_dir();
    let real = layout.binary();
    let previous = layout.binary_previous();
    let incoming = incoming_path(layout);
    match i {
        0 => journal.append(Step::SwapCopyBegin),
        1 => {
            let got = copy_durably(staged, &incoming)?;
            if got != journal.info().new_sha256 {
                remove_if_exists(&incoming)?;
                return Err(Error::new(
                    format!("placing {}", incoming.display()),
                    format!(
                        "the staged binary's sha256 {got} is not the verified {}",
                        journal.info().new_sha256
                    ),
                )
                .hint("the staging dir changed under the update; run sudo banger update again"));
            }
            fsync_dir(&dir)
        }
        2 => journal.append(Step::SwapCopyDone),
        3 => journal.append(Step::SwapBegin),
        4 => {
            remove_if_exists(&previous)?;
            if std::fs::hard_link(&real, &previous).is_err() {
                copy_durably(&real, &previous)?;
            }
            fsync_dir(&dir)
        }
        5 => journal.append(Step::SwapSavedOld),
        6 => {
            std::fs::rename(&incoming, &real).map_err(io_err(format!(
                "renaming {} to {}",
                incoming.display(),
                real.display()
            )))?;
            fsync_dir(&dir)
        }
        7 => journal.append(Step::SwapPlacedNew),
        _ => journal.append(Step::SwapDone),
    }
}

fn swap_in_until(layout: &Layout, staged: &Path, journal: &mut Journal, stop: usize) -> Result<()> {
    let real = layout.binary();
    let info = journal.info().clone();
    let now = super::sha256_file(&real)?;
    if now != info.old_sha256 {
        return Err(Error::new(
            format!("swapping {}", real.display()),
            format!(
                "it changed since the update started (sha256 {now}, expected {})",
                info.old_sha256
            ),
        )
        .hint("something else replaced banger meanwhile; run sudo banger update again"));
    }
    for i in 0..SWAP_ACTIONS.min(stop) {
        swap_action(layout, staged, journal, i)?;
    }
    Ok(())
}

/// Puts the staged binary at the real path, keeping the old one as `.previous`, journalling each
/// step. The journal's `update.begin` hashes must match the real binary and the staged one.
pub fn swap_in(layout: &Layout, staged: &Path, journal: &mut Journal) -> Result<()> {
    swap_in_until(layout, staged, journal, SWAP_ACTIONS)
}

/// Puts the old binary back at the real path (from `.previous` unless it is already there),
/// removes `.previous` and `banger.new`, journalling `rollback.begin` and `rollback.restored`.
/// Safe to re-run after a crash at any point. Restarting the units is the caller's job.
pub fn restore(layout: &Layout, journal: &mut Journal) -> Result<()> {
    restore_until(layout, journal, usize::MAX)
}

fn restore_until(layout: &Layout, journal: &mut Journal, stop: usize) -> Result<()> {
    let info = journal.info().clone();
    let dir = layout.lib_dir();
    let real = layout.binary();
    let previous = layout.binary_previous();
    if stop == 0 {
        return Ok(());
    }
    journal.append(Step::RollbackBegin)?;
    let disk = DiskState::inspect(layout, &info);
    match (&disk.real, &disk.previous) {
        // Hard-linked `.previous` or an already restored binary: `rename` between two links of
        // one inode is a no-op, so drop the extra name instead.
        (FileState::Old, _) => remove_if_exists(&previous)?,
        (_, FileState::Old) => {
            if stop == 1 {
                return Ok(());
            }
            std::fs::rename(&previous, &real).map_err(io_err(format!(
                "restoring {} to {}",
                previous.display(),
                real.display()
            )))?
        }
        (r, p) => {
            return Err(Error::new(
                format!("rolling back {}", real.display()),
                format!(
                    "the previous binary is not available (real binary: {r:?}, .previous: {p:?})"
                ),
            )
            .hint(format!(
                "reinstall banger v{} by hand; the update journal is {}",
                info.from,
                journal.file_path().display()
            )))
        }
    }
    remove_if_exists(&incoming_path(layout))?;
    fsync_dir(&dir)?;
    if stop == 2 {
        return Ok(());
    }
    journal.append(Step::RollbackRestored)
}

/// Drops the backup after a successful update: removes `.previous` and any `banger.new`.
/// Idempotent. The caller journals `commit.begin` before and `done` after.
pub fn commit(layout: &Layout) -> Result<()> {
    remove_if_exists(&layout.binary_previous())?;
    remove_if_exists(&incoming_path(layout))?;
    fsync_dir(&layout.lib_dir())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::update::journal::{self, RecoveryPlan, UpdateInfo};
    use crate::update::testutil::TempDir;

    const OLD: &[u8] = b"#!/bin/sh\necho old\n";
    const NEW: &[u8] = b"#!/bin/sh\necho new\n";

    struct Fixture {
        _dir: TempDir,
        layout: Layout,
        staged: PathBuf,
    }

    fn fixture(tag: &str) -> (Fixture, Journal) {
        let dir = TempDir::new(tag);
        let layout = Layout::under(dir.path());
        std::fs::create_dir_all(layout.lib_dir()).unwrap();
        std::fs::create_dir_all(layout.updates_dir()).unwrap();
        std::fs::write(layout.binary(), OLD).unwrap();
        std::fs::set_permissions(layout.binary(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let staged = layout.updates_dir().join("banger");
        std::fs::write(&staged, NEW).unwrap();
        let info = UpdateInfo {
            from: "0.1.0".into(),
            to: "0.2.0".into(),
            old_sha256: crate::update::sha256_reader(OLD).unwrap(),
            new_sha256: crate::update::sha256_reader(NEW).unwrap(),
        };
        let j = Journal::create(&layout, info).unwrap();
        (
            Fixture {
                _dir: dir,
                layout,
                staged,
            },
            j,
        )
    }

    fn lib_listing(l: &Layout) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(l.lib_dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn swap_restore_commit() {
        let (f, mut j) = fixture("swap");
        swap_in(&f.layout, &f.staged, &mut j).unwrap();
        assert_eq!(std::fs::read(f.layout.binary()).unwrap(), NEW);
        assert_eq!(std::fs::read(f.layout.binary_previous()).unwrap(), OLD);
        let mode = std::fs::metadata(f.layout.binary())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o755);
        assert_eq!(lib_listing(&f.layout), ["banger", "banger.previous"]);
        restore(&f.layout, &mut j).unwrap();
        assert_eq!(std::fs::read(f.layout.binary()).unwrap(), OLD);
        assert_eq!(lib_listing(&f.layout), ["banger"]);
        // Again: idempotent.
        restore(&f.layout, &mut j).unwrap();
        assert_eq!(std::fs::read(f.layout.binary()).unwrap(), OLD);

        let (f, mut j) = fixture("swap-commit");
        swap_in(&f.layout, &f.staged, &mut j).unwrap();
        commit(&f.layout).unwrap();
        commit(&f.layout).unwrap();
        assert_eq!(lib_listing(&f.layout), ["banger"]);
        assert_eq!(std::fs::read(f.layout.binary()).unwrap(), NEW);
    }

    #[test]
    fn refuses_changed_inputs() {
        let (f, mut j) = fixture("swap-changed");
        std::fs::write(f.layout.binary(), b"someone else").unwrap();
        let e = swap_in(&f.layout, &f.staged, &mut j)
            .unwrap_err()
            .to_string();
        assert!(e.contains("changed since the update started"), "{e}");

        let (f, mut j) = fixture("swap-staged-changed");
        std::fs::write(&f.staged, b"tampered after verification").unwrap();
        let e = swap_in(&f.layout, &f.staged, &mut j)
            .unwrap_err()
            .to_string();
        assert!(e.contains("is not the verified"), "{e}");
        assert_eq!(std::fs::read(f.layout.binary()).unwrap(), OLD);
        assert_eq!(lib_listing(&f.layout), ["banger"]);
    }

    #[test]
    fn restore_without_previous_is_manual() {
        let (f, mut j) = fixture("swap-lost");
        swap_in(&f.layout, &f.staged, &mut j).unwrap();
        std::fs::remove_file(f.layout.binary_previous()).unwrap();
        let e = restore(&f.layout, &mut j).unwrap_err().to_string();
        assert!(e.contains("previous binary is not available"), "{e}");
        assert!(e.contains("reinstall banger v0.1.0 by hand"), "{e}");
    }

    /// Applies a recovery plan the way the flow will (restarts are the flow's; not modelled).
    fn recover(layout: &Layout) -> RecoveryPlan {
        let records = Journal::read(layout).unwrap();
        let plan = journal::recovery_plan(&records, layout);
        match &plan {
            RecoveryPlan::Nothing => {}
            RecoveryPlan::Discard | RecoveryPlan::RollBack { .. } => {
                let mut j = Journal::open(layout).unwrap();
                restore(layout, &mut j).unwrap();
                j.append(Step::RollbackDone).unwrap();
            }
            RecoveryPlan::Finish => {
                let mut j = Journal::open(layout).unwrap();
                j.append(Step::CommitBegin).unwrap();
                commit(layout).unwrap();
                j.append(Step::Done).unwrap();
            }
            RecoveryPlan::Manual { reason } => panic!("manual: {reason}"),
        }
        plan
    }

    fn assert_exactly(layout: &Layout, want: &[u8], ctx: &str) {
        assert_eq!(std::fs::read(layout.binary()).unwrap(), want, "{ctx}");
        assert_eq!(lib_listing(layout), ["banger"], "{ctx}");
        assert!(!journal::pending(layout).unwrap(), "{ctx}");
    }

    #[test]
    fn killed_at_every_swap_point_recovers_to_old() {
        for stop in 0..=SWAP_ACTIONS {
            let (f, mut j) = fixture("swap-kill");
            swap_in_until(&f.layout, &f.staged, &mut j, stop).unwrap();
            drop(j);
            let plan = recover(&f.layout);
            let want_restart = stop > 6;
            match plan {
                RecoveryPlan::Discard => assert!(stop <= 6 && !want_restart, "stop {stop}"),
                RecoveryPlan::RollBack {
                    restart_services,
                    restore_db: false,
                } => {
                    assert!(stop > 6, "stop {stop}: {plan:?}");
                    assert!(restart_services, "stop {stop}");
                }
                other => panic!("stop {stop}: {other:?}"),
            }
            assert_exactly(&f.layout, OLD, &format!("killed after swap action {stop}"));
            // A second recovery finds nothing to do.
            assert_eq!(recover(&f.layout), RecoveryPlan::Nothing);
        }
    }

    #[test]
    fn killed_after_the_swap_recovers_by_journal() {
        use Step::*;
        let later = [
            RestartHelperBegin,
            RestartHelperDone,
            RestartDaemonBegin,
            RestartDaemonDone,
            DoctorBegin,
            DoctorPassed,
            CommitBegin,
        ];
        for n in 0..=later.len() {
            // With and without the commit's file removal having happened.
            for committed in [false, true] {
                if committed && n < later.len() {
                    continue;
                }
                let (f, mut j) = fixture("swap-kill-late");
                swap_in(&f.layout, &f.staged, &mut j).unwrap();
                for s in &later[..n] {
                    j.append(*s).unwrap();
                }
                if committed {
                    commit(&f.layout).unwrap();
                }
                drop(j);
                let ctx = format!("killed after {:?} (commit ran: {committed})", &later[..n]);
                let plan = recover(&f.layout);
                if n >= 6 {
                    assert_eq!(plan, RecoveryPlan::Finish, "{ctx}");
                    assert_exactly(&f.layout, NEW, &ctx);
                } else {
                    assert_eq!(
                        plan,
                        RecoveryPlan::RollBack {
                            restart_services: true,
                            restore_db: false,
                        },
                        "{ctx}"
                    );
                    assert_exactly(&f.layout, OLD, &ctx);
                }
            }
        }
    }

    #[test]
    fn killed_during_rollback_recovers_to_old() {
        for stop in 0..=3 {
            let (f, mut j) = fixture("swap-kill-rollback");
            swap_in(&f.layout, &f.staged, &mut j).unwrap();
            j.append(Step::RestartHelperBegin).unwrap();
            restore_until(&f.layout, &mut j, stop).unwrap();
            drop(j);
            assert_eq!(
                recover(&f.layout),
                RecoveryPlan::RollBack {
                    restart_services: true,
                    restore_db: false,
                },
                "stop {stop}"
            );
            assert_exactly(&f.layout, OLD, &format!("rollback killed at {stop}"));
        }
    }
}
