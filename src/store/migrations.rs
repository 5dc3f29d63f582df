//! The numbered, forward-only migration table and the code that applies it.
//!
//! A migration, once released, is never edited, renumbered or removed: a database records which
//! versions it has, and a binary that sees a version it does not know must refuse the database
//! rather than guess. A new schema change is a new row at the end of [`MIGRATIONS`].

use rusqlite::{Connection, OptionalExtension, TransactionBehavior};
use std::path::Path;

use super::compat::Compat;
use super::db_error;
use crate::error::{Error, Result};

/// One schema step: applied in its own transaction and recorded in `schema_migrations`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Migration {
    /// Position in the sequence, starting at 1, contiguous.
    pub version: u32,
    /// Short human name, recorded beside the version.
    pub name: &'static str,
    /// SQL run inside the migration's transaction (may hold several statements).
    pub sql: &'static str,
}

/// Every migration this binary knows, in order.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "baseline",
        sql: BASELINE,
    },
    Migration {
        version: 2,
        name: "vm_network",
        sql: VM_NETWORK,
    },
    Migration {
        version: 3,
        name: "image_origin",
        sql: IMAGE_ORIGIN,
    },
    Migration {
        version: 4,
        name: "snapshots",
        sql: SNAPSHOTS,
    },
];

/// The highest schema version this binary applies.
pub const LATEST: u32 = MIGRATIONS[MIGRATIONS.len() - 1].version;

// `vms.image` deliberately has no foreign key: a VM's disk is its own copy, so removing an image
// must not be blocked by (or cascade into) the VMs made from it. Images do reference kernels: an
// image without its kernel cannot boot. `vms.state` has no CHECK so later issues can add states
// without rebuilding the table.
const BASELINE: &str = "
CREATE TABLE kernels (
    name        TEXT PRIMARY KEY,
    path        TEXT NOT NULL,
    created_at  TEXT NOT NULL
);

CREATE TABLE images (
    name           TEXT PRIMARY KEY,
    rootfs         TEXT NOT NULL,
    kernel         TEXT REFERENCES kernels(name) ON DELETE RESTRICT,
    ready_pattern  TEXT,
    created_at     TEXT NOT NULL
);

CREATE TABLE vms (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    image       TEXT,
    vcpu        INTEGER NOT NULL CHECK (vcpu > 0),
    memory_mib  INTEGER NOT NULL CHECK (memory_mib > 0),
    state       TEXT NOT NULL,
    pid         INTEGER,
    start_time  INTEGER,
    comm        TEXT,
    boot_id     TEXT,
    created_at  TEXT NOT NULL,
    updated_at  TEXT NOT NULL
);

CREATE TABLE operations (
    id           TEXT PRIMARY KEY,
    kind         TEXT NOT NULL,
    stage        TEXT NOT NULL,
    target       TEXT,
    started_at   TEXT NOT NULL,
    finished_at  TEXT,
    done         INTEGER NOT NULL DEFAULT 0 CHECK (done IN (0, 1)),
    error        TEXT
);
CREATE INDEX operations_by_start ON operations (started_at);
";

// Issue 8: each VM's guest address (unique: the index is the backstop behind the daemon's
// allocation in one transaction), its MAC and its NAT bit. SQLite cannot add a UNIQUE column, so
// the uniqueness is an index; NULLs (VMs created before this migration, which get an address at
// their next start) never collide.
const VM_NETWORK: &str = "
ALTER TABLE vms ADD COLUMN ip TEXT;
ALTER TABLE vms ADD COLUMN mac TEXT;
ALTER TABLE vms ADD COLUMN nat INTEGER NOT NULL DEFAULT 0 CHECK (nat IN (0, 1));
CREATE UNIQUE INDEX vms_by_ip ON vms (ip);
";

// Issue 9: how an image was made (`built: debian bookworm from ...`, `imported from /path`), shown
// by `banger image list`. Nullable: images imported before this migration have no record of it.
const IMAGE_ORIGIN: &str = "
ALTER TABLE images ADD COLUMN origin TEXT;
";

// Issue 12: snapshots of running VMs (memory, device state, a disk clone) and the VMs restored
// from them. `firecracker_version` is the VMM that wrote the snapshot: Firecracker refuses (or
// worse) to load another version's, so a restore checks it first. `vms.snapshot_id` has no foreign
// key: deleting a snapshot is refused while running clones exist (the daemon checks), and a
// stopped clone's own disk does not need the snapshot. `vms.instance_id` is the guest agent's
// per-restore identity (clones of one snapshot share a boot_id).
const SNAPSHOTS: &str = "
CREATE TABLE snapshots (
    id                   TEXT PRIMARY KEY,
    name                 TEXT NOT NULL UNIQUE,
    source_vm            TEXT NOT NULL,
    kernel               TEXT NOT NULL,
    image                TEXT,
    vcpu                 INTEGER NOT NULL CHECK (vcpu > 0),
    memory_mib           INTEGER NOT NULL CHECK (memory_mib > 0),
    agent                INTEGER NOT NULL CHECK (agent IN (0, 1)),
    firecracker_version  TEXT NOT NULL,
    boot_id              TEXT,
    dir                  TEXT NOT NULL,
    size_bytes           INTEGER NOT NULL DEFAULT 0,
    created_at           TEXT NOT NULL
);
ALTER TABLE vms ADD COLUMN snapshot_id TEXT;
ALTER TABLE vms ADD COLUMN instance_id TEXT;
";

const SCHEMA_TABLE: &str = "CREATE TABLE IF NOT EXISTS schema_migrations (
    version     INTEGER PRIMARY KEY,
    name        TEXT NOT NULL,
    applied_at  TEXT NOT NULL
)";

/// The versions recorded in `schema_migrations`, ascending; `None` when the table is absent
/// (a valid SQLite file that banger never migrated). Reads only.
pub(crate) fn applied_versions(conn: &Connection) -> rusqlite::Result<Option<Vec<u32>>> {
    let has_table = conn
        .query_row(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'",
            [],
            |_| Ok(()),
        )
        .optional()?
        .is_some();
    if !has_table {
        return Ok(None);
    }
    let mut stmt = conn.prepare("SELECT version FROM schema_migrations ORDER BY version")?;
    let rows = stmt.query_map([], |r| r.get::<_, u32>(0))?;
    rows.collect::<rusqlite::Result<Vec<u32>>>().map(Some)
}

/// Classifies the versions a database records against a migration list.
pub(crate) fn classify(migrations: &[Migration], applied: &[u32]) -> Compat {
    let latest = migrations.last().map_or(0, |m| m.version);
    let mut unknown: Vec<u32> = applied
        .iter()
        .copied()
        .filter(|v| !migrations.iter().any(|m| m.version == *v))
        .collect();
    if !unknown.is_empty() {
        unknown.sort_unstable();
        unknown.dedup();
        return Compat::Incompatible { unknown, latest };
    }
    let db_version = applied.iter().copied().max().unwrap_or(0);
    if migrations.iter().all(|m| applied.contains(&m.version)) {
        Compat::Compatible {
            version: db_version,
        }
    } else {
        Compat::Pending { db_version, latest }
    }
}

/// The error for a database that knows migrations this binary does not.
pub(crate) fn incompatible_error(path: &Path, unknown: &[u32]) -> Error {
    Error::new(
        format!("opening state database {}", path.display()),
        format!(
            "it records schema migrations {} that this binary does not know (it was written by a newer banger)",
            join(unknown)
        ),
    )
    .hint("run the newer banger again (or `sudo banger update`); the database was left unchanged")
}

/// Applies every pending migration of `migrations`, each in its own `BEGIN IMMEDIATE`
/// transaction that re-reads `schema_migrations` first, so two processes opening the same file
/// at once never apply a step twice. Returns the versions applied now.
pub(crate) fn apply(
    conn: &mut Connection,
    path: &Path,
    migrations: &[Migration],
) -> Result<Vec<u32>> {
    let already = applied_versions(conn)
        .map_err(|e| db_error(path, "reading schema_migrations of", e))?
        .unwrap_or_default();
    match classify(migrations, &already) {
        Compat::Compatible { .. } => return Ok(Vec::new()),
        Compat::Incompatible { unknown, .. } => return Err(incompatible_error(path, &unknown)),
        Compat::Pending { .. } | Compat::Missing { .. } => {}
    }

    let mut done = Vec::new();
    for m in migrations {
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| db_error(path, "locking for migration", e))?;
        tx.execute_batch(SCHEMA_TABLE)
            .map_err(|e| db_error(path, "creating schema_migrations in", e))?;
        let applied = applied_versions(&tx)
            .map_err(|e| db_error(path, "reading schema_migrations of", e))?
            .unwrap_or_default();
        if let Compat::Incompatible { unknown, .. } = classify(migrations, &applied) {
            return Err(incompatible_error(path, &unknown));
        }
        if applied.contains(&m.version) {
            continue; // dropping `tx` rolls back the no-op CREATE TABLE IF NOT EXISTS
        }
        tx.execute_batch(m.sql).map_err(|e| {
            db_error(
                path,
                &format!("applying migration {} ({}) to", m.version, m.name),
                e,
            )
        })?;
        tx.execute(
            "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?1, ?2, ?3)",
            rusqlite::params![m.version, m.name, crate::clock::now_rfc3339()],
        )
        .map_err(|e| db_error(path, "recording migration in", e))?;
        tx.commit()
            .map_err(|e| db_error(path, "committing migration to", e))?;
        done.push(m.version);
    }
    Ok(done)
}

/// `[2, 3]` as `2,3`.
pub(crate) fn join(versions: &[u32]) -> String {
    versions
        .iter()
        .map(u32::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_contiguous_from_one_with_names() {
        for (i, m) in MIGRATIONS.iter().enumerate() {
            assert_eq!(
                m.version as usize,
                i + 1,
                "migration {} out of order",
                m.name
            );
            assert!(!m.name.trim().is_empty());
            assert!(!m.sql.trim().is_empty());
        }
        assert_eq!(LATEST as usize, MIGRATIONS.len());
    }

    #[test]
    fn classify_table() {
        const M: &[Migration] = &[
            Migration {
                version: 1,
                name: "a",
                sql: "",
            },
            Migration {
                version: 2,
                name: "b",
                sql: "",
            },
            Migration {
                version: 3,
                name: "c",
                sql: "",
            },
        ];
        let cases: &[(&[u32], Compat)] = &[
            (
                &[],
                Compat::Pending {
                    db_version: 0,
                    latest: 3,
                },
            ),
            (
                &[1],
                Compat::Pending {
                    db_version: 1,
                    latest: 3,
                },
            ),
            (
                &[1, 2],
                Compat::Pending {
                    db_version: 2,
                    latest: 3,
                },
            ),
            (&[1, 2, 3], Compat::Compatible { version: 3 }),
            (
                &[1, 2, 3, 4],
                Compat::Incompatible {
                    unknown: vec![4],
                    latest: 3,
                },
            ),
            (
                &[1, 999, 4],
                Compat::Incompatible {
                    unknown: vec![4, 999],
                    latest: 3,
                },
            ),
        ];
        for (applied, want) in cases {
            assert_eq!(&classify(M, applied), want, "applied {applied:?}");
        }
    }
}
