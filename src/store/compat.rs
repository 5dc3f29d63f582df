//! Read-only classification of a state database against this binary's migrations, for
//! `bangerd --check-migrations` and `banger doctor`.
//!
//! Nothing here may write: not the database, not its directory. Opening a WAL database with
//! `SQLITE_OPEN_READONLY` alone still creates `-wal` and `-shm` files (and leaves them behind),
//! so when no `-wal`/`-journal` file exists — no process has the database open and there is no
//! unfinished transaction, so the main file holds everything — we open it `immutable=1`, which
//! takes no locks and creates nothing. When a `-wal` exists (a daemon is running, or one died),
//! we must read through it, so we open plainly read-only and use the files that are there.

use rusqlite::{Connection, OpenFlags};
use std::fmt::Write as _;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::db_error;
use super::migrations::{self, Migration, MIGRATIONS};
use crate::error::{Context, Error, Result};

/// How a state database relates to this binary's migrations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compat {
    /// Every migration this binary knows is applied and there are no others.
    Compatible {
        /// The database's schema version (= this binary's latest).
        version: u32,
    },
    /// Some of this binary's migrations are not applied yet; opening will apply them.
    Pending {
        /// Highest version the database records (0 when it records none).
        db_version: u32,
        /// Highest version this binary knows.
        latest: u32,
    },
    /// No database file yet: opening will create it and apply every migration.
    Missing {
        /// Highest version this binary knows.
        latest: u32,
    },
    /// The database records migrations this binary does not know: it is older than the data
    /// and must not touch it.
    Incompatible {
        /// The unknown versions, ascending.
        unknown: Vec<u32>,
        /// Highest version this binary knows.
        latest: u32,
    },
}

impl Compat {
    /// Exit code for `bangerd --check-migrations`: 0 compatible, 1 pending or missing,
    /// 2 incompatible.
    pub fn exit_code(&self) -> i32 {
        match self {
            Compat::Compatible { .. } => 0,
            Compat::Pending { .. } | Compat::Missing { .. } => 1,
            Compat::Incompatible { .. } => 2,
        }
    }

    /// One human line, e.g. `compatible: schema 1 of 1`.
    pub fn line(&self) -> String {
        match self {
            Compat::Compatible { version } => format!("compatible: schema {version} of {version}"),
            Compat::Pending { db_version, latest } => {
                format!("pending: database at {db_version}, this binary applies up to {latest}")
            }
            Compat::Missing { latest } => format!(
                "missing: no database yet ({latest} migration{} pending)",
                plural(*latest as usize)
            ),
            Compat::Incompatible { unknown, .. } => format!(
                "incompatible: database has migration{} {} unknown to this binary (it is newer than this binary)",
                plural(unknown.len()),
                migrations::join(unknown)
            ),
        }
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// Classifies the database at `path` against this binary's migrations, strictly read-only: a
/// missing file is [`Compat::Missing`] and is not created; a valid SQLite file without
/// `schema_migrations` is version 0, pending. A file that is not a usable SQLite database is an
/// error naming the path.
pub fn check(path: &Path) -> Result<Compat> {
    check_with(path, MIGRATIONS)
}

pub(crate) fn check_with(path: &Path, migrations: &[Migration]) -> Result<Compat> {
    if !exists(path)? {
        return Ok(Compat::Missing {
            latest: migrations.last().map_or(0, |m| m.version),
        });
    }
    let applied = read_applied(path)?;
    Ok(migrations::classify(migrations, &applied))
}

/// Opens the database at `path` read-only for inspection (doctor), creating no file where
/// avoidable (see the module doc). A missing file or a file that is not a usable SQLite
/// database is an error naming the path.
pub fn open_read_only(path: &Path) -> Result<Connection> {
    if !exists(path)? {
        return Err(Error::new(
            format!("opening state database {}", path.display()),
            "no such file",
        )
        .hint("the daemon creates it on first start; run `sudo banger system install`"));
    }
    let conn = open_ro(path, !has_sidecar(path))?;
    probe(&conn, path)?;
    Ok(conn)
}

/// Reads the applied versions; if we read the main file alone and a writer appeared meanwhile,
/// reads again through its WAL.
fn read_applied(path: &Path) -> Result<Vec<u32>> {
    let immutable = !has_sidecar(path);
    let applied = read_applied_once(path, immutable)?;
    if immutable && has_sidecar(path) {
        return read_applied_once(path, false);
    }
    Ok(applied)
}

fn read_applied_once(path: &Path, immutable: bool) -> Result<Vec<u32>> {
    let conn = open_ro(path, immutable)?;
    probe(&conn, path)?;
    let applied = migrations::applied_versions(&conn)
        .map_err(|e| db_error(path, "reading schema_migrations of", e))?;
    Ok(applied.unwrap_or_default())
}

pub(super) fn open_ro(path: &Path, immutable: bool) -> Result<Connection> {
    let params = if immutable {
        "mode=ro&immutable=1"
    } else {
        "mode=ro"
    };
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY
        | OpenFlags::SQLITE_OPEN_URI
        | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(uri(path, params), flags)
        .map_err(|e| db_error(path, "opening read-only", e))?;
    // A reader waits for a writer's checkpoint rather than failing the check.
    conn.busy_timeout(super::BUSY_TIMEOUT)
        .map_err(|e| db_error(path, "configuring", e))?;
    Ok(conn)
}

/// SQLite opens lazily; reading the schema forces the header check, so a file that is not a
/// database fails here, naming the path, rather than on some later query.
pub(super) fn probe(conn: &Connection, path: &Path) -> Result<()> {
    conn.query_row("SELECT count(*) FROM sqlite_master", [], |r| {
        r.get::<_, i64>(0)
    })
    .map(drop)
    .map_err(|e| db_error(path, "reading", e))
}

fn exists(path: &Path) -> Result<bool> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(true),
        Ok(_) => Err(Error::new(
            format!("opening state database {}", path.display()),
            "not a regular file",
        )
        .hint("move it aside; banger keeps its state in a regular file")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e).ctx(|| format!("inspecting state database {}", path.display())),
    }
}

/// Whether a `-wal` or a (possibly hot) rollback `-journal` sits beside the database; either
/// means the main file alone may not be the whole truth. An unreadable directory counts as yes,
/// which only costs the immutable shortcut.
pub(super) fn has_sidecar(path: &Path) -> bool {
    ["-wal", "-journal"].iter().any(|s| {
        !matches!(std::fs::symlink_metadata(sibling(path, s)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound)
    })
}

pub(crate) fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// A `file:` URI for `path` with `params`, percent-encoding everything but unreserved bytes
/// and `/` (a path may hold `?`, `#` or `%`).
fn uri(path: &Path, params: &str) -> String {
    let mut s = String::from(if path.is_absolute() {
        "file://"
    } else {
        "file:"
    });
    for &b in path.as_os_str().as_bytes() {
        if b.is_ascii_alphanumeric() || b"/-._~".contains(&b) {
            s.push(char::from(b));
        } else {
            let _ = write!(s, "%{b:02X}");
        }
    }
    s.push('?');
    s.push_str(params);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_and_exit_codes() {
        let cases = [
            (
                Compat::Compatible { version: 1 },
                0,
                "compatible: schema 1 of 1",
            ),
            (
                Compat::Pending {
                    db_version: 0,
                    latest: 1,
                },
                1,
                "pending: database at 0, this binary applies up to 1",
            ),
            (
                Compat::Missing { latest: 1 },
                1,
                "missing: no database yet (1 migration pending)",
            ),
            (
                Compat::Missing { latest: 3 },
                1,
                "missing: no database yet (3 migrations pending)",
            ),
            (
                Compat::Incompatible {
                    unknown: vec![2, 3],
                    latest: 1,
                },
                2,
                "incompatible: database has migrations 2,3 unknown to this binary (it is newer than this binary)",
            ),
        ];
        for (c, code, line) in cases {
            assert_eq!(c.exit_code(), code, "{c:?}");
            assert_eq!(c.line(), line);
        }
    }

    #[test]
    fn uri_encodes_odd_paths() {
        assert_eq!(
            uri(Path::new("/var/lib/banger/state.db"), "mode=ro"),
            "file:///var/lib/banger/state.db?mode=ro"
        );
        assert_eq!(
            uri(Path::new("/a b/x?y#z%.db"), "mode=ro"),
            "file:///a%20b/x%3Fy%23z%25.db?mode=ro"
        );
        assert_eq!(uri(Path::new("rel.db"), "m=1"), "file:rel.db?m=1");
    }
}
