//! The durable mirror of the daemon's operations registry (the live registry stays in the
//! daemon; this is what survives a restart and what `daemon.operations.list` can page back to).

use rusqlite::Row;
use serde::{Deserialize, Serialize};

use super::{db_error, Store};
use crate::error::Result;

/// One long-running piece of work (vm create/start, image build), as DESIGN §4 describes.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Operation {
    /// Unique id, e.g. `op-…`.
    pub id: String,
    /// What kind of work, e.g. `vm.create`.
    pub kind: String,
    /// The step it is at (or ended at).
    pub stage: String,
    /// What it works on (a VM or image name), if anything.
    pub target: Option<String>,
    /// RFC 3339 start time.
    pub started_at: String,
    /// RFC 3339 end time, once done.
    pub finished_at: Option<String>,
    /// Whether it has finished (successfully or not).
    pub done: bool,
    /// Why it failed, if it did.
    pub error: Option<String>,
    /// How long each finished stage took, in order (the daemon's memory and its log only: the
    /// stored row keeps the stage, not the timings, so this is empty for a row read back).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub timings: Vec<StageTime>,
}

/// One finished stage of an operation and how long it took.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct StageTime {
    /// The stage's name (as [`Operation::stage`] showed it).
    pub stage: String,
    /// Its duration in milliseconds.
    pub ms: f64,
    /// True for work that ran beside the stages (its time overlaps theirs).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub concurrent: bool,
}

const COLUMNS: &str = "id, kind, stage, target, started_at, finished_at, done, error";

fn from_row(r: &Row<'_>) -> rusqlite::Result<Operation> {
    Ok(Operation {
        id: r.get(0)?,
        kind: r.get(1)?,
        stage: r.get(2)?,
        target: r.get(3)?,
        started_at: r.get(4)?,
        finished_at: r.get(5)?,
        done: r.get(6)?,
        error: r.get(7)?,
        timings: Vec::new(),
    })
}

impl Store {
    /// Records a new operation; an id already present is an error.
    pub fn op_insert(&self, op: &Operation) -> Result<()> {
        self.conn
            .execute(
                &format!(
                    "INSERT INTO operations ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"
                ),
                rusqlite::params![
                    op.id,
                    op.kind,
                    op.stage,
                    op.target,
                    op.started_at,
                    op.finished_at,
                    op.done,
                    op.error
                ],
            )
            .map(drop)
            .map_err(|e| db_error(&self.path, &format!("recording operation {} in", op.id), e))
    }

    /// Writes the operation's current state, inserting it if it is not recorded yet. Keeps the
    /// row's insertion order, so [`Store::op_list`] stays stable.
    pub fn op_update(&self, op: &Operation) -> Result<()> {
        self.conn
            .execute(
                &format!(
                    "INSERT INTO operations ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                     ON CONFLICT (id) DO UPDATE SET
                        kind = excluded.kind, stage = excluded.stage, target = excluded.target,
                        started_at = excluded.started_at, finished_at = excluded.finished_at,
                        done = excluded.done, error = excluded.error"
                ),
                rusqlite::params![
                    op.id,
                    op.kind,
                    op.stage,
                    op.target,
                    op.started_at,
                    op.finished_at,
                    op.done,
                    op.error
                ],
            )
            .map(drop)
            .map_err(|e| db_error(&self.path, &format!("updating operation {} in", op.id), e))
    }

    /// Up to `limit` operations, newest first (by start time, then by insertion).
    pub fn op_list(&self, limit: usize) -> Result<Vec<Operation>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let read = || -> rusqlite::Result<Vec<Operation>> {
            let mut stmt = self.conn.prepare(&format!(
                "SELECT {COLUMNS} FROM operations ORDER BY started_at DESC, rowid DESC LIMIT ?1"
            ))?;
            let rows = stmt.query_map([limit], from_row)?;
            rows.collect()
        };
        read().map_err(|e| db_error(&self.path, "listing operations in", e))
    }

    /// Marks every operation not yet done as done with `error` and finished now; returns how
    /// many. For daemon start-up: work that was in flight when the previous daemon stopped will
    /// never finish, and must not hold `banger update` back forever.
    pub fn op_fail_unfinished(&self, error: &str) -> Result<usize> {
        self.conn
            .execute(
                "UPDATE operations SET done = 1, error = ?1, finished_at = ?2 WHERE done = 0",
                rusqlite::params![error, crate::clock::now_rfc3339()],
            )
            .map_err(|e| db_error(&self.path, "closing unfinished operations in", e))
    }
}
