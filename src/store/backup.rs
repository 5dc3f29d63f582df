//! A consistent snapshot of `state.db` taken while the daemon runs, and putting one back: what
//! lets `banger update` roll back across a release whose daemon migrates the schema.
//!
//! Owns the two file-level operations on the database that are not the daemon's: [`snapshot`]
//! reads it through SQLite (`VACUUM INTO` on a read-only connection, so the copy is one read
//! transaction across the main file *and* its `-wal` — never a byte copy of a live WAL database,
//! which can catch the two at different moments), and [`restore`] replaces it with a snapshot.
//! [`snapshot`] never writes the database or its directory. [`restore`] must only run while no
//! process has the database open (the updater stops `bangerd` first); it never opens the database.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::compat::{has_sidecar, open_ro, probe, sibling};
use super::db_error;
use crate::error::{Error, Result};

/// Room kept free beyond the snapshot's own size (SQLite's temporary journal of the output, and
/// the filesystem's own slack): 4 MiB.
pub const SPACE_MARGIN: u64 = 4 << 20;

/// Owner and mode of the database file a snapshot was taken from; [`restore`] gives the file
/// back exactly these (the daemon runs as the owner and must be able to write it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileOwner {
    /// Owner uid.
    pub uid: u32,
    /// Owner gid.
    pub gid: u32,
    /// Permission bits (`0o7777` mask).
    pub mode: u32,
}

/// What [`snapshot`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Size of the snapshot file.
    pub bytes: u64,
    /// Owner and mode of the database it copies.
    pub owner: FileOwner,
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let what = what.into();
    move |e| Error::new(what, e)
}

fn remove_if_exists(p: &Path) -> Result<()> {
    match std::fs::remove_file(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::new(format!("removing {}", p.display()), e)),
    }
}

fn fsync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(format!("syncing directory {}", dir.display())))
}

fn parent(p: &Path) -> PathBuf {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
}

/// Refuses when `free` bytes cannot hold a snapshot of `need` bytes plus [`SPACE_MARGIN`].
pub fn ensure_room(need: u64, free: u64, dir: &Path, db: &Path) -> Result<()> {
    let want = need.saturating_add(SPACE_MARGIN);
    if free >= want {
        return Ok(());
    }
    Err(Error::new(
        format!("snapshotting {} before the update", db.display()),
        format!(
            "{} has {} free; the snapshot needs {} ({} database + {} margin)",
            dir.display(),
            mib(free),
            mib(want),
            mib(need),
            mib(SPACE_MARGIN)
        ),
    )
    .hint(format!(
        "free at least {} on the filesystem of {} and run sudo banger update again; nothing was changed",
        mib(want - free),
        dir.display()
    )))
}

/// Bytes free for root's files on the filesystem holding `dir`.
fn free_bytes(dir: &Path) -> Result<u64> {
    let s = rustix::fs::statvfs(dir).map_err(|e| {
        Error::new(
            format!("checking free space in {}", dir.display()),
            std::io::Error::from(e),
        )
        .hint("nothing was changed; check that the directory exists and is readable")
    })?;
    // Root may use the reserved blocks too, but the snapshot should not eat into them.
    Ok(s.f_bavail.saturating_mul(s.f_frsize))
}

/// Writes a consistent copy of the database at `db` to `dest` (0600, fsynced, its directory
/// fsynced), reading it through SQLite while the daemon may be writing. `Ok(None)` when there is
/// no database (nothing to copy). Checks first that `dest`'s filesystem can hold it; on any
/// failure nothing is left at `dest` and the database is untouched.
pub fn snapshot(db: &Path, dest: &Path) -> Result<Option<Snapshot>> {
    let meta = match std::fs::metadata(db) {
        Ok(m) if m.is_file() => m,
        Ok(_) => {
            return Err(Error::new(
                format!("snapshotting {}", db.display()),
                "not a regular file",
            )
            .hint("move it aside; banger keeps its state in a regular file"))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::new(format!("inspecting {}", db.display()), e)),
    };
    let owner = FileOwner {
        uid: meta.uid(),
        gid: meta.gid(),
        mode: meta.mode() & 0o7777,
    };
    let dir = parent(dest);
    let partial = sibling(dest, ".partial");
    remove_if_exists(dest)?;
    if let Err(e) = copy_through_sqlite(db, &partial, &dir) {
        let _ = remove_if_exists(&partial);
        let _ = remove_if_exists(&sibling(&partial, "-journal"));
        return Err(e);
    }
    let finish = || -> Result<u64> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&partial)
            .map_err(io(format!("opening {}", partial.display())))?;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))
            .and_then(|()| f.sync_all())
            .map_err(io(format!("syncing {}", partial.display())))?;
        let bytes = f
            .metadata()
            .map_err(io(format!("inspecting {}", partial.display())))?
            .len();
        std::fs::rename(&partial, dest).map_err(io(format!(
            "renaming {} to {}",
            partial.display(),
            dest.display()
        )))?;
        fsync_dir(&dir)?;
        Ok(bytes)
    };
    match finish() {
        Ok(bytes) => Ok(Some(Snapshot { bytes, owner })),
        Err(e) => {
            let _ = remove_if_exists(&partial);
            let _ = remove_if_exists(dest);
            Err(e)
        }
    }
}

/// `VACUUM INTO out` from a read-only connection: one read transaction, so a consistent state
/// even while a writer commits. When no `-wal` exists the database is read `immutable` (creating
/// no `-wal`/`-shm` as root); if a writer appeared meanwhile, it is read again through its WAL.
fn copy_through_sqlite(db: &Path, out: &Path, dir: &Path) -> Result<()> {
    let out_str = out.to_str().ok_or_else(|| {
        Error::new(
            format!("snapshotting {}", db.display()),
            format!("the snapshot path {} is not UTF-8", out.display()),
        )
    })?;
    let once = |immutable: bool| -> Result<()> {
        remove_if_exists(out)?;
        let conn = open_ro(db, immutable)?;
        probe(&conn, db)?;
        let pages: u64 = conn
            .query_row("PRAGMA page_count", [], |r| r.get(0))
            .map_err(|e| db_error(db, "sizing", e))?;
        let page_size: u64 = conn
            .query_row("PRAGMA page_size", [], |r| r.get(0))
            .map_err(|e| db_error(db, "sizing", e))?;
        ensure_room(pages.saturating_mul(page_size), free_bytes(dir)?, dir, db)?;
        // The output is fsynced once, whole, by the caller before anyone relies on it; SQLite's
        // own syncs while writing it only cost time (a third of it on a 300 MiB database).
        conn.pragma_update(None, "synchronous", "OFF")
            .map_err(|e| db_error(db, "configuring the snapshot of", e))?;
        conn.execute("VACUUM INTO ?1", [out_str])
            .map(drop)
            .map_err(|e| {
                let full = e.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull);
                let err = Error::new(
                    format!("snapshotting {} into {}", db.display(), out.display()),
                    &e,
                );
                if full {
                    err.hint(format!(
                        "free space on the filesystem of {} and run sudo banger update again; nothing was changed",
                        dir.display()
                    ))
                } else {
                    err.hint("nothing was changed; see the error above")
                }
            })
    };
    let immutable = !has_sidecar(db);
    once(immutable)?;
    if immutable && has_sidecar(db) {
        once(false)?;
    }
    Ok(())
}

/// Replaces the database at `db` with `snapshot` (`None`: there was no database before; remove
/// the one that exists now), after removing the `-wal`, `-shm` and `-journal` leftovers so no
/// stale log is replayed onto it. The new file gets `owner`'s uid, gid and mode and lands with one
/// `rename` in `db`'s directory (a hard link of the snapshot, or a copy when it is on another
/// filesystem); the snapshot stays where it is, so a crash at any point can simply run this
/// again. The caller must have stopped every process that has the database open.
pub fn restore(snapshot: Option<&Path>, db: &Path, owner: FileOwner) -> Result<()> {
    let dir = parent(db);
    if snapshot.is_none() && !dir.exists() {
        // No database before, and nothing created one since.
        return Ok(());
    }
    for s in ["-wal", "-shm", "-journal"] {
        remove_if_exists(&sibling(db, s))?;
    }
    let Some(snapshot) = snapshot else {
        remove_if_exists(db)?;
        return fsync_dir(&dir);
    };
    let incoming = sibling(db, ".restore");
    remove_if_exists(&incoming)?;
    if std::fs::hard_link(snapshot, &incoming).is_err() {
        std::fs::copy(snapshot, &incoming).map_err(io(format!(
            "copying {} to {}",
            snapshot.display(),
            incoming.display()
        )))?;
    }
    let what = format!("preparing {}", incoming.display());
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&incoming)
        .map_err(io(what.clone()))?;
    std::os::unix::fs::fchown(&f, Some(owner.uid), Some(owner.gid)).map_err(io(what.clone()))?;
    f.set_permissions(std::fs::Permissions::from_mode(owner.mode))
        .and_then(|()| f.sync_all())
        .map_err(io(what))?;
    std::fs::rename(&incoming, db).map_err(io(format!(
        "renaming {} to {}",
        incoming.display(),
        db.display()
    )))?;
    fsync_dir(&dir)
}

/// Test helper: `path` with `suffix` appended (`state.db` -> `state.db-wal`).
#[cfg(test)]
pub(crate) fn tests_sibling(path: &Path, suffix: &str) -> PathBuf {
    sibling(path, suffix)
}

/// Test helper: the schema and every row of the database at `db`, one string per line, for
/// comparing two databases by content (page layout may differ).
#[cfg(test)]
pub(crate) fn dump(db: &Path) -> Vec<String> {
    let conn = crate::store::open_read_only(db).unwrap();
    let mut out = Vec::new();
    let mut st = conn
        .prepare("SELECT type, name, ifnull(sql, '') FROM sqlite_master ORDER BY name")
        .unwrap();
    let rows: Vec<(String, String, String)> = st
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    for (ty, name, sql) in rows {
        out.push(format!("{ty} {name} {sql}"));
        if ty == "table" {
            let mut q = conn
                .prepare(&format!("SELECT * FROM \"{name}\" ORDER BY rowid"))
                .unwrap();
            let n = q.column_count();
            let mut rows = q.query([]).unwrap();
            while let Some(r) = rows.next().unwrap() {
                let vals: Vec<String> = (0..n)
                    .map(|i| match r.get_ref(i).unwrap() {
                        rusqlite::types::ValueRef::Null => "NULL".to_string(),
                        rusqlite::types::ValueRef::Integer(v) => v.to_string(),
                        rusqlite::types::ValueRef::Real(v) => v.to_string(),
                        rusqlite::types::ValueRef::Text(t) => {
                            format!("{:?}", String::from_utf8_lossy(t))
                        }
                        rusqlite::types::ValueRef::Blob(b) => format!("x'{}'", hex::encode(b)),
                    })
                    .collect();
                out.push(format!("  {}", vals.join("|")));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{check_with, Migration, Store, MIGRATIONS};
    use crate::update::testutil::TempDir;

    fn add_vm(s: &Store, id: &str) {
        s.conn()
            .execute(
                "INSERT INTO vms (id, name, vcpu, memory_mib, state, created_at, updated_at) \
                 VALUES (?1, ?1, 1, 128, 'running', 't', 't')",
                [id],
            )
            .unwrap();
    }

    #[test]
    fn snapshot_of_a_live_wal_database_has_every_commit_and_restore_puts_it_back() {
        let dir = TempDir::new("backup-live");
        let db = dir.path().join("state.db");
        let dest = dir.path().join("snap.db");
        let live = Store::open(&db).unwrap();
        for i in 0..50 {
            add_vm(&live, &format!("vm{i}"));
        }
        let wal = sibling(&db, "-wal");
        assert!(
            std::fs::metadata(&wal).unwrap().len() > 0,
            "the commits must sit in the WAL for this test to mean anything"
        );
        let before = dump(&db);
        let snap = snapshot(&db, &dest).unwrap().unwrap();
        assert_eq!(snap.bytes, std::fs::metadata(&dest).unwrap().len());
        assert_eq!(
            std::fs::metadata(&dest).unwrap().mode() & 0o777,
            0o600,
            "snapshot mode"
        );
        assert!(!sibling(&dest, ".partial").exists());
        assert_eq!(dump(&dest), before, "snapshot content");
        // The live writer carries on, then a newer schema is applied: both must disappear.
        add_vm(&live, "after");
        drop(live);
        let mut newer = MIGRATIONS.to_vec();
        newer.push(Migration {
            version: crate::store::LATEST + 1,
            name: "test: newer schema",
            sql: "ALTER TABLE vms ADD COLUMN test_col TEXT;",
        });
        let migrated = Store::open_with(&db, &newer).unwrap();
        assert_eq!(check_with(&db, MIGRATIONS).unwrap().exit_code(), 2);
        drop(migrated);
        std::fs::write(sibling(&db, "-wal"), b"stale log").unwrap();
        std::fs::write(sibling(&db, "-shm"), b"stale shm").unwrap();
        restore(Some(&dest), &db, snap.owner).unwrap();
        assert!(!sibling(&db, "-wal").exists() && !sibling(&db, "-shm").exists());
        assert!(!sibling(&db, ".restore").exists());
        let m = std::fs::metadata(&db).unwrap();
        assert_eq!(
            (m.uid(), m.gid(), m.mode() & 0o7777),
            (snap.owner.uid, snap.owner.gid, snap.owner.mode)
        );
        assert_eq!(dump(&db), before, "restored content");
        assert_eq!(check_with(&db, MIGRATIONS).unwrap().exit_code(), 0);
        // Running it again (a crash before the journal said "restored") changes nothing.
        restore(Some(&dest), &db, snap.owner).unwrap();
        assert_eq!(dump(&db), before);
        // The old daemon opens it.
        Store::open(&db).unwrap();
    }

    #[test]
    fn snapshot_during_concurrent_commits_is_one_consistent_state() {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        let dir = TempDir::new("backup-concurrent");
        let db = dir.path().join("state.db");
        Store::open(&db).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let (db, stop) = (db.clone(), stop.clone());
            std::thread::spawn(move || {
                // Another connection (the daemon) commits two rows per transaction, non-stop.
                let mut s = Store::open(&db).unwrap();
                let mut n = 0u64;
                while !stop.load(Ordering::SeqCst) {
                    let tx = s.conn.transaction().unwrap();
                    for k in 0..2 {
                        tx.execute(
                            "INSERT INTO operations (id, kind, stage, started_at) VALUES (?1, 'k', 's', 't')",
                            [format!("op-{n}-{k}")],
                        )
                        .unwrap();
                    }
                    tx.commit().unwrap();
                    n += 1;
                }
                n
            })
        };
        // Let some commits land before and during the snapshots.
        for _ in 0..2000 {
            if dump(&db).len() >= 20 || writer.is_finished() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let mut counts = Vec::new();
        for i in 0..5 {
            let dest = dir.path().join(format!("snap{i}.db"));
            snapshot(&db, &dest).unwrap().unwrap();
            let conn = rusqlite::Connection::open(&dest).unwrap();
            let ok: String = conn
                .query_row("PRAGMA integrity_check", [], |r| r.get(0))
                .unwrap();
            assert_eq!(ok, "ok", "snapshot {i}");
            let rows: i64 = conn
                .query_row("SELECT count(*) FROM operations", [], |r| r.get(0))
                .unwrap();
            assert_eq!(
                rows % 2,
                0,
                "snapshot {i} caught half a transaction ({rows} rows)"
            );
            counts.push(rows);
        }
        stop.store(true, Ordering::SeqCst);
        let commits = writer.join().unwrap();
        assert!(counts[0] > 0, "{counts:?}");
        eprintln!("snapshots saw {counts:?} rows while the writer made {commits} commits");
    }

    #[test]
    fn restore_keeps_the_original_owner_and_mode() {
        let dir = TempDir::new("backup-owner");
        let db = dir.path().join("state.db");
        let dest = dir.path().join("snap.db");
        let s = Store::open(&db).unwrap();
        add_vm(&s, "a");
        drop(s);
        let root = rustix::process::geteuid().is_root();
        let (uid, gid) = if root { (1234, 2345) } else { meta_ids(&db) };
        if root {
            std::os::unix::fs::chown(&db, Some(uid), Some(gid)).unwrap();
        } else {
            eprintln!("SKIP: restore_keeps_the_original_owner_and_mode: not root, owner change not tested (mode is)");
        }
        std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o640)).unwrap();
        let snap = snapshot(&db, &dest).unwrap().unwrap();
        assert_eq!(
            snap.owner,
            FileOwner {
                uid,
                gid,
                mode: 0o640
            }
        );
        std::fs::remove_file(&db).unwrap();
        restore(Some(&dest), &db, snap.owner).unwrap();
        let m = std::fs::metadata(&db).unwrap();
        assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (uid, gid, 0o640));
    }

    fn meta_ids(p: &Path) -> (u32, u32) {
        let m = std::fs::metadata(p).unwrap();
        (m.uid(), m.gid())
    }

    #[test]
    fn no_database_snapshots_to_nothing_and_restores_to_nothing() {
        let dir = TempDir::new("backup-none");
        let db = dir.path().join("state.db");
        let dest = dir.path().join("snap.db");
        assert_eq!(snapshot(&db, &dest).unwrap(), None);
        assert!(!dest.exists());
        Store::open(&db).unwrap();
        assert!(db.exists());
        restore(
            None,
            &db,
            FileOwner {
                uid: 0,
                gid: 0,
                mode: 0o600,
            },
        )
        .unwrap();
        for s in ["", "-wal", "-shm"] {
            assert!(!sibling(&db, s).exists(), "{s}");
        }
    }

    #[test]
    fn a_snapshot_that_cannot_be_written_leaves_nothing_and_the_database_untouched() {
        let dir = TempDir::new("backup-fail");
        let db = dir.path().join("state.db");
        let s = Store::open(&db).unwrap();
        add_vm(&s, "a");
        let before = dump(&db);
        let bytes = std::fs::read(&db).unwrap();
        // The snapshot's directory does not exist: SQLite cannot create the file.
        let dest = dir.path().join("missing-dir").join("snap.db");
        let e = snapshot(&db, &dest).unwrap_err().to_string();
        assert!(e.contains("missing-dir"), "{e}");
        assert!(e.contains("nothing was changed"), "{e}");
        assert!(!dest.exists() && !sibling(&dest, ".partial").exists());
        assert_eq!(std::fs::read(&db).unwrap(), bytes);
        assert_eq!(dump(&db), before);
    }

    #[test]
    fn room_is_checked_with_a_margin() {
        let dir = Path::new("/var/cache/banger/updates");
        let db = Path::new("/var/lib/banger/state.db");
        ensure_room(10 << 20, (10 << 20) + SPACE_MARGIN, dir, db).unwrap();
        let e = ensure_room(10 << 20, 12 << 20, dir, db).unwrap_err();
        let text = e.to_string();
        assert!(
            text.starts_with("snapshotting /var/lib/banger/state.db before the update: /var/cache/banger/updates has 12.0 MiB free; the snapshot needs 14.0 MiB (10.0 MiB database + 4.0 MiB margin)"),
            "{text}"
        );
        assert!(
            text.contains("free at least 2.0 MiB on the filesystem of /var/cache/banger/updates"),
            "{text}"
        );
        assert!(text.contains("nothing was changed"), "{text}");
        assert!(ensure_room(u64::MAX, u64::MAX - 1, dir, db).is_err());
    }
}
