//! SQLite state (`state.db`): open with WAL/busy timeout/foreign keys, numbered forward-only
//! migrations, and read-only compatibility classification for `bangerd --check-migrations`.
//!
//! This module owns the schema and every write to the file. It must never overwrite or
//! "repair" a file it cannot read, and never touch a database that records migrations this
//! binary does not know (it is older than the data). [`check`] and [`open_read_only`] never write.
//! [`backup`] snapshots the database for `banger update` and puts a snapshot back on rollback.

pub mod backup;
mod compat;
mod migrations;
mod ops;
mod records;
mod snapshots;

#[cfg(test)]
pub(crate) use compat::check_with;
pub use compat::{check, open_read_only, Compat};
pub use migrations::{Migration, LATEST, MIGRATIONS};
pub use ops::{Operation, StageTime};
pub use records::{Image, Kernel, Vm, VmState};
pub use snapshots::Snapshot;

use rusqlite::{Connection, ErrorCode, OpenFlags};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{Context, Error, Result};

/// How long a statement waits for another connection's lock before failing.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The read-write state database, migrated to this binary's schema.
#[derive(Debug)]
pub struct Store {
    conn: Connection,
    path: PathBuf,
    applied: Vec<u32>,
}

impl Store {
    /// Opens (creating it, mode 0600, if missing) the database at `path`, sets WAL, a 5 s busy
    /// timeout and foreign keys, and applies pending migrations, each in its own transaction.
    ///
    /// The parent directory must exist. A database that records migrations this binary does not
    /// know, or a file that is not a usable SQLite database, is refused and left byte-for-byte
    /// unchanged.
    pub fn open(path: &Path) -> Result<Store> {
        Store::open_with(path, MIGRATIONS)
    }

    pub(crate) fn open_with(path: &Path, migrations: &[Migration]) -> Result<Store> {
        let what = || format!("opening state database {}", path.display());
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        if !parent.is_dir() {
            return Err(Error::new(
                what(),
                format!("directory {} does not exist", parent.display()),
            )
            .hint("run `sudo banger system install`, which creates the state directory"));
        }

        // Classify read-only first, so a newer or corrupt database is refused before this
        // process opens it for writing (which would at least switch its journal mode).
        if let Compat::Incompatible { unknown, .. } = compat::check_with(path, migrations)? {
            return Err(migrations::incompatible_error(path, &unknown));
        }

        // An empty file is a valid empty database; creating it ourselves sets its mode (SQLite
        // would use 0644), and the -wal/-shm files inherit it.
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
        {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e).ctx(|| format!("creating state database {}", path.display())),
        }

        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let mut conn =
            Connection::open_with_flags(path, flags).map_err(|e| db_error(path, "opening", e))?;
        conn.busy_timeout(BUSY_TIMEOUT)
            .map_err(|e| db_error(path, "configuring", e))?;
        let mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .map_err(|e| db_error(path, "setting WAL mode on", e))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(Error::new(
                format!("setting WAL mode on state database {}", path.display()),
                format!("SQLite kept journal mode {mode:?}"),
            )
            .hint("keep the state directory on a local filesystem that supports shared memory (not NFS)"));
        }
        conn.pragma_update(None, "foreign_keys", true)
            .map_err(|e| db_error(path, "enabling foreign keys on", e))?;
        // WAL + NORMAL: a commit survives a crash of banger (what restarts and updates are about)
        // without an fsync per commit; only a power cut can drop the last few, and reconcile
        // re-derives VM liveness from /proc and handles.json anyway.
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(|e| db_error(path, "setting synchronous=NORMAL on", e))?;

        let applied = migrations::apply(&mut conn, path, migrations)?;
        Ok(Store {
            conn,
            path: path.to_path_buf(),
            applied,
        })
    }

    /// The underlying connection, for the modules that own the other tables' queries.
    pub fn conn(&self) -> &rusqlite::Connection {
        &self.conn
    }

    /// The database file this store was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The migration versions this `open` applied (empty when the schema was already current),
    /// for the daemon's start-up log.
    pub fn migrations_applied(&self) -> &[u32] {
        &self.applied
    }
}

/// Wraps a SQLite error as `<verb> state database <path>: <why> (<hint>)`, with a hint chosen
/// from the error code.
pub(crate) fn db_error(path: &Path, verb: &str, e: rusqlite::Error) -> Error {
    let err = Error::new(format!("{verb} state database {}", path.display()), &e);
    match e.sqlite_error_code() {
        Some(ErrorCode::NotADatabase | ErrorCode::DatabaseCorrupt) => err.hint(
            "the file is not a usable SQLite database; banger never overwrites it: move it aside \
             (keep it for recovery) and start bangerd again to begin with empty state",
        ),
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => err.hint(
            "another process held the database lock for more than 5 s; is a second bangerd running?",
        ),
        Some(ErrorCode::CannotOpen | ErrorCode::PermissionDenied | ErrorCode::ReadOnly) => err
            .hint("check the owner and mode of the file and its directory (bangerd runs as the owner user)"),
        Some(ErrorCode::DiskFull) => err.hint("free space on the state filesystem"),
        _ => err,
    }
}

#[cfg(test)]
mod tests;
