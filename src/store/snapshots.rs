//! Rows for snapshots and the snapshot-related columns of VMs (`vms.snapshot_id`,
//! `vms.instance_id`): typed reads and writes, nothing about files or VMMs.

use super::{db_error, Store, Vm};
use crate::error::{Error, Result};
use rusqlite::{params, OptionalExtension, Row};
use serde::{Deserialize, Serialize};

/// A snapshot as recorded.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Snapshot {
    /// Stable id (directory name under `snapshots/`).
    pub id: String,
    /// User-facing unique name.
    pub name: String,
    /// Name of the VM it was taken from (at the time).
    pub source_vm: String,
    /// Kernel the source VM booted.
    pub kernel: String,
    /// Image the source VM was made from.
    pub image: Option<String>,
    /// vCPUs (a restore has the same).
    pub vcpu: u32,
    /// Memory in MiB (a restore has the same).
    pub memory_mib: u32,
    /// Whether the guest runs banger's agent (a restore reconfigures it over vsock).
    pub agent: bool,
    /// The Firecracker version that wrote it (`GET /version`); a restore needs the same.
    pub firecracker_version: String,
    /// The guest's boot id at the snapshot (every clone shares it).
    pub boot_id: Option<String>,
    /// Its directory.
    pub dir: String,
    /// Bytes allocated on disk (memory, state, disk clone).
    pub size_bytes: u64,
    /// Creation time.
    pub created_at: String,
}

/// (vm id, snapshot name if it still exists, agent instance id), from [`Store::vm_origins`].
pub type VmOrigin = (String, Option<String>, Option<String>);

const COLUMNS: &str = "id, name, source_vm, kernel, image, vcpu, memory_mib, agent, \
     firecracker_version, boot_id, dir, size_bytes, created_at";

fn from_row(r: &Row<'_>) -> rusqlite::Result<Snapshot> {
    Ok(Snapshot {
        id: r.get(0)?,
        name: r.get(1)?,
        source_vm: r.get(2)?,
        kernel: r.get(3)?,
        image: r.get(4)?,
        vcpu: r.get(5)?,
        memory_mib: r.get(6)?,
        agent: r.get(7)?,
        firecracker_version: r.get(8)?,
        boot_id: r.get(9)?,
        dir: r.get(10)?,
        size_bytes: r.get::<_, i64>(11)?.max(0) as u64,
        created_at: r.get(12)?,
    })
}

impl Store {
    /// Records a snapshot; a taken name is `already exists`.
    pub fn snapshot_insert(&self, s: &Snapshot) -> Result<()> {
        let r = self.conn.execute(
            &format!(
                "INSERT INTO snapshots ({COLUMNS}) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13)"
            ),
            params![
                s.id,
                s.name,
                s.source_vm,
                s.kernel,
                s.image,
                s.vcpu,
                s.memory_mib,
                s.agent,
                s.firecracker_version,
                s.boot_id,
                s.dir,
                s.size_bytes as i64,
                s.created_at
            ],
        );
        match r {
            Ok(_) => Ok(()),
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                Err(Error::new(
                    format!("recording snapshot `{}`", s.name),
                    "a snapshot with that name already exists",
                )
                .hint("pick another --as, or remove the old one with `banger snapshot rm`"))
            }
            Err(e) => Err(db_error(&self.path, "recording a snapshot in", e)),
        }
    }

    /// The snapshot whose name or id is `r`.
    pub fn snapshot_get(&self, r: &str) -> Result<Option<Snapshot>> {
        self.conn
            .query_row(
                &format!("SELECT {COLUMNS} FROM snapshots WHERE name = ?1 OR id = ?1 LIMIT 1"),
                [r],
                from_row,
            )
            .optional()
            .map_err(|e| db_error(&self.path, "reading a snapshot from", e))
    }

    /// Every snapshot, by creation time then name.
    pub fn snapshot_list(&self) -> Result<Vec<Snapshot>> {
        let mut st = self
            .conn
            .prepare_cached(&format!(
                "SELECT {COLUMNS} FROM snapshots ORDER BY created_at, name"
            ))
            .map_err(|e| db_error(&self.path, "listing snapshots in", e))?;
        let rows = st
            .query_map([], from_row)
            .and_then(|it| it.collect::<rusqlite::Result<Vec<_>>>())
            .map_err(|e| db_error(&self.path, "listing snapshots in", e));
        rows
    }

    /// Removes a snapshot row.
    pub fn snapshot_delete(&self, id: &str) -> Result<()> {
        self.conn
            .execute("DELETE FROM snapshots WHERE id = ?1", [id])
            .map(drop)
            .map_err(|e| db_error(&self.path, "deleting a snapshot from", e))
    }

    /// Inserts VM `vm`, restored from snapshot `snapshot_id`, with the address `pick` chooses:
    /// [`Store::vm_insert_allocating`] and its origin in one transaction (one commit on the
    /// restore's path instead of two, and never a restored VM recorded without its snapshot).
    pub fn vm_insert_restored(
        &self,
        vm: &mut Vm,
        snapshot_id: &str,
        pick: impl FnOnce(&[String]) -> Result<String>,
    ) -> Result<()> {
        self.vm_insert_allocating_then(vm, pick, |s, vm| {
            s.vm_set_origin(&vm.id, Some(snapshot_id), None)
        })
    }

    /// [`Store::vm_update`] and [`Store::vm_set_origin`] in one transaction: a restored VM becomes
    /// running with its identity, boot id and agent instance id in one commit.
    pub fn vm_update_with_origin(
        &self,
        vm: &Vm,
        snapshot_id: Option<&str>,
        instance_id: Option<&str>,
    ) -> Result<()> {
        let tx = rusqlite::Transaction::new_unchecked(
            &self.conn,
            rusqlite::TransactionBehavior::Immediate,
        )
        .map_err(|e| db_error(&self.path, "updating a VM in", e))?;
        self.vm_update(vm)?;
        self.vm_set_origin(&vm.id, snapshot_id, instance_id)?;
        tx.commit()
            .map_err(|e| db_error(&self.path, "updating a VM in", e))
    }

    /// Records where VM `vm_id` came from (`None`: booted) and its agent's instance id.
    pub fn vm_set_origin(
        &self,
        vm_id: &str,
        snapshot_id: Option<&str>,
        instance_id: Option<&str>,
    ) -> Result<()> {
        self.conn
            .execute(
                "UPDATE vms SET snapshot_id = ?2, instance_id = ?3 WHERE id = ?1",
                params![vm_id, snapshot_id, instance_id],
            )
            .map(drop)
            .map_err(|e| db_error(&self.path, "recording a VM's origin in", e))
    }

    /// VM `vm_id`'s snapshot id and agent instance id (both `None` for a booted VM).
    pub fn vm_origin(&self, vm_id: &str) -> Result<(Option<String>, Option<String>)> {
        self.conn
            .query_row(
                "SELECT snapshot_id, instance_id FROM vms WHERE id = ?1",
                [vm_id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map(|o| o.unwrap_or((None, None)))
            .map_err(|e| db_error(&self.path, "reading a VM's origin from", e))
    }

    /// For every VM restored from a snapshot: (vm id, the snapshot's name if it still exists,
    /// the agent's instance id).
    pub fn vm_origins(&self) -> Result<Vec<VmOrigin>> {
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT vms.id, snapshots.name, vms.instance_id FROM vms \
                 LEFT JOIN snapshots ON vms.snapshot_id = snapshots.id \
                 WHERE vms.snapshot_id IS NOT NULL",
            )
            .map_err(|e| db_error(&self.path, "listing VM origins in", e))?;
        let rows = st
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .and_then(|it| it.collect::<rusqlite::Result<Vec<_>>>())
            .map_err(|e| db_error(&self.path, "listing VM origins in", e));
        rows
    }

    /// Names and states of the VMs restored from snapshot `snapshot_id`.
    pub fn snapshot_clones(&self, snapshot_id: &str) -> Result<Vec<(String, String)>> {
        let mut st = self
            .conn
            .prepare_cached("SELECT name, state FROM vms WHERE snapshot_id = ?1 ORDER BY name")
            .map_err(|e| db_error(&self.path, "listing a snapshot's VMs in", e))?;
        let rows = st
            .query_map([snapshot_id], |r| Ok((r.get(0)?, r.get(1)?)))
            .and_then(|it| it.collect::<rusqlite::Result<Vec<_>>>())
            .map_err(|e| db_error(&self.path, "listing a snapshot's VMs in", e));
        rows
    }
}
