//! Rows for VMs, images and kernels: typed structs and their reads and writes.

use super::{db_error, Store};
use crate::error::{Error, Result};
use rusqlite::{params, OptionalExtension, Row};
use serde::{Deserialize, Serialize};

/// A VM as recorded.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Vm {
    /// Stable id (directory name under `vms/`).
    pub id: String,
    /// User-facing unique name.
    pub name: String,
    /// Image it was created from.
    pub image: Option<String>,
    /// vCPUs.
    pub vcpu: u32,
    /// Memory in MiB.
    pub memory_mib: u32,
    /// Where the VM is in its life (stored as its lowercase name).
    pub state: VmState,
    /// VMM pid while running.
    pub pid: Option<i32>,
    /// VMM start time (clock ticks since boot) while running.
    pub start_time: Option<u64>,
    /// VMM comm while running.
    pub comm: Option<String>,
    /// Guest boot id of the current boot.
    pub boot_id: Option<String>,
    /// Guest IPv4 address, kept for the VM's life (unique; `None` only for VMs recorded before
    /// guest networking, until their next start).
    pub ip: Option<String>,
    /// Guest MAC (derived from the id).
    pub mac: Option<String>,
    /// Whether the guest may reach outside networks through the host (NAT).
    pub nat: bool,
    /// Creation time.
    pub created_at: String,
    /// Last change.
    pub updated_at: String,
}

/// A VM's state. Stored in `vms.state` as the lowercase name ([`VmState::as_str`]); the column
/// has no CHECK so a later state needs no table rebuild.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    /// Recorded, disk prepared, never started.
    Created,
    /// Its VMM is being launched and configured, or the guest is booting.
    Starting,
    /// Its VMM runs and the guest was ready.
    Running,
    /// Being stopped.
    Stopping,
    /// No VMM.
    Stopped,
    /// The daemon cannot tell whether its VMM still runs: reported, never killed.
    Unknown,
}

impl VmState {
    /// Every state, for tables and tests.
    pub const ALL: [VmState; 6] = [
        VmState::Created,
        VmState::Starting,
        VmState::Running,
        VmState::Stopping,
        VmState::Stopped,
        VmState::Unknown,
    ];

    /// The name stored in the database and shown to users.
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Created => "created",
            VmState::Starting => "starting",
            VmState::Running => "running",
            VmState::Stopping => "stopping",
            VmState::Stopped => "stopped",
            VmState::Unknown => "unknown",
        }
    }

    /// The state named `s`, if banger knows it.
    pub fn parse(s: &str) -> Option<VmState> {
        VmState::ALL.into_iter().find(|v| v.as_str() == s)
    }
}

impl std::fmt::Display for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl rusqlite::types::ToSql for VmState {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        Ok(self.as_str().into())
    }
}

impl rusqlite::types::FromSql for VmState {
    /// A state this binary does not know (written by a newer banger before a rollback) reads as
    /// `unknown`: such a VM is reported and left alone, never guessed about.
    fn column_result(v: rusqlite::types::ValueRef<'_>) -> rusqlite::types::FromSqlResult<Self> {
        v.as_str()
            .map(|s| VmState::parse(s).unwrap_or(VmState::Unknown))
    }
}

/// An image: a root filesystem and the kernel to boot it with.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Image {
    /// Name.
    pub name: String,
    /// Path of the image's root filesystem (each VM copies it).
    pub rootfs: String,
    /// Kernel name.
    pub kernel: Option<String>,
    /// When set, readiness is this console line prefix instead of the guest agent.
    pub ready_pattern: Option<String>,
    /// Import time.
    pub created_at: String,
    /// How it was made (`imported from PATH`, `built: debian ...`); `None` for images recorded
    /// before schema 3.
    #[serde(default)]
    pub origin: Option<String>,
}

/// A guest kernel.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Kernel {
    /// Name.
    pub name: String,
    /// Path of the kernel image.
    pub path: String,
    /// Import time.
    pub created_at: String,
}

const VM_COLUMNS: &str =
    "id, name, image, vcpu, memory_mib, state, pid, start_time, comm, boot_id, \
     created_at, updated_at, ip, mac, nat";

fn vm_from_row(r: &Row<'_>) -> rusqlite::Result<Vm> {
    Ok(Vm {
        id: r.get(0)?,
        name: r.get(1)?,
        image: r.get(2)?,
        vcpu: r.get(3)?,
        memory_mib: r.get(4)?,
        state: r.get(5)?,
        pid: r.get(6)?,
        start_time: r.get::<_, Option<i64>>(7)?.map(|v| v as u64),
        comm: r.get(8)?,
        boot_id: r.get(9)?,
        created_at: r.get(10)?,
        updated_at: r.get(11)?,
        ip: r.get(12)?,
        mac: r.get(13)?,
        nat: r.get(14)?,
    })
}

impl Store {
    /// Inserts a new VM; a taken name is `already exists`, a taken address is refused too.
    pub fn vm_insert(&self, vm: &Vm) -> Result<()> {
        let r = self.conn.execute(
            &format!(
                "INSERT INTO vms ({VM_COLUMNS}) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10,?11,?12,?13,?14,?15)"
            ),
            params![
                vm.id,
                vm.name,
                vm.image,
                vm.vcpu,
                vm.memory_mib,
                vm.state,
                vm.pid,
                vm.start_time.map(|v| v as i64),
                vm.comm,
                vm.boot_id,
                vm.created_at,
                vm.updated_at,
                vm.ip,
                vm.mac,
                vm.nat
            ],
        );
        match r {
            Ok(_) => Ok(()),
            Err(rusqlite::Error::SqliteFailure(e, Some(msg)))
                if e.code == rusqlite::ErrorCode::ConstraintViolation && msg.contains("vms.ip") =>
            {
                Err(Error::new(
                    format!("creating VM `{}`", vm.name),
                    format!(
                        "address {} is already another VM's",
                        vm.ip.as_deref().unwrap_or("-")
                    ),
                ))
            }
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                Err(Error::new(
                    format!("creating VM `{}`", vm.name),
                    "a VM with that name already exists",
                )
                .hint("pick another --name, or delete the old one with `banger vm delete`"))
            }
            Err(e) => Err(db_error(&self.path, "recording a VM in", e)),
        }
    }

    /// Inserts a new VM with the address `pick` chooses from every address already recorded, in
    /// one `BEGIN IMMEDIATE` transaction: no other writer can take the same address in between
    /// (and the unique index refuses it if one did). Sets `vm.ip`.
    pub fn vm_insert_allocating(
        &self,
        vm: &mut Vm,
        pick: impl FnOnce(&[String]) -> Result<String>,
    ) -> Result<()> {
        self.vm_insert_allocating_then(vm, pick, |_, _| Ok(()))
    }

    /// [`Store::vm_insert_allocating`], then `more` in the same transaction.
    pub(crate) fn vm_insert_allocating_then(
        &self,
        vm: &mut Vm,
        pick: impl FnOnce(&[String]) -> Result<String>,
        more: impl FnOnce(&Store, &Vm) -> Result<()>,
    ) -> Result<()> {
        let tx = rusqlite::Transaction::new_unchecked(
            &self.conn,
            rusqlite::TransactionBehavior::Immediate,
        )
        .map_err(|e| db_error(&self.path, "locking for an address in", e))?;
        let taken = self.vm_addresses()?;
        vm.ip = Some(pick(&taken)?);
        self.vm_insert(vm)?;
        more(self, vm)?;
        tx.commit()
            .map_err(|e| db_error(&self.path, "recording a VM in", e))
    }

    /// Gives VM `id`, which has no address yet (recorded before guest networking), the address
    /// `pick` chooses and the MAC `mac`, in one transaction like [`Store::vm_insert_allocating`].
    /// Returns the address.
    pub fn vm_assign_address(
        &self,
        id: &str,
        mac: &str,
        pick: impl FnOnce(&[String]) -> Result<String>,
    ) -> Result<String> {
        let tx = rusqlite::Transaction::new_unchecked(
            &self.conn,
            rusqlite::TransactionBehavior::Immediate,
        )
        .map_err(|e| db_error(&self.path, "locking for an address in", e))?;
        let ip = pick(&self.vm_addresses()?)?;
        let n = self
            .conn
            .execute(
                "UPDATE vms SET ip = ?2, mac = ?3, updated_at = ?4 WHERE id = ?1 AND ip IS NULL",
                params![id, ip, mac, crate::clock::now_rfc3339()],
            )
            .map_err(|e| db_error(&self.path, "recording a VM's address in", e))?;
        if n != 1 {
            return Err(Error::new(
                format!("recording an address for VM {id}"),
                "it is gone or already has one",
            ));
        }
        tx.commit()
            .map_err(|e| db_error(&self.path, "recording a VM's address in", e))?;
        Ok(ip)
    }

    /// Whether a VM's id starts with the first `n` characters of `id` (its tap name is made of them).
    pub fn vm_id_prefix_taken(&self, id: &str, n: usize) -> Result<bool> {
        let prefix: String = id.chars().take(n).collect();
        self.conn
            .query_row(
                "SELECT 1 FROM vms WHERE substr(id, 1, ?2) = ?1 LIMIT 1",
                params![prefix, n as i64],
                |_| Ok(()),
            )
            .optional()
            .map(|r| r.is_some())
            .map_err(|e| db_error(&self.path, "reading VM ids from", e))
    }

    /// Every guest address recorded for a VM.
    pub fn vm_addresses(&self) -> Result<Vec<String>> {
        let mut st = self
            .conn
            .prepare_cached("SELECT ip FROM vms WHERE ip IS NOT NULL")
            .map_err(|e| db_error(&self.path, "listing VM addresses in", e))?;
        let rows = st
            .query_map([], |r| r.get(0))
            .and_then(|it| it.collect::<rusqlite::Result<Vec<String>>>())
            .map_err(|e| db_error(&self.path, "listing VM addresses in", e));
        rows
    }

    /// Writes every mutable field of `vm` (state, identity, boot id) and bumps `updated_at`.
    pub fn vm_update(&self, vm: &Vm) -> Result<()> {
        self.conn
            .execute(
                "UPDATE vms SET state=?2, pid=?3, start_time=?4, comm=?5, boot_id=?6, updated_at=?7 WHERE id=?1",
                params![
                    vm.id,
                    vm.state,
                    vm.pid,
                    vm.start_time.map(|v| v as i64),
                    vm.comm,
                    vm.boot_id,
                    crate::clock::now_rfc3339()
                ],
            )
            .map(drop)
            .map_err(|e| db_error(&self.path, "updating a VM in", e))
    }

    /// The VM whose name or id is `r`.
    pub fn vm_get(&self, r: &str) -> Result<Option<Vm>> {
        self.conn
            .query_row(
                &format!("SELECT {VM_COLUMNS} FROM vms WHERE name = ?1 OR id = ?1 LIMIT 1"),
                [r],
                vm_from_row,
            )
            .optional()
            .map_err(|e| db_error(&self.path, "reading a VM from", e))
    }

    /// Every VM, by creation time then name.
    pub fn vm_list(&self) -> Result<Vec<Vm>> {
        let mut st = self
            .conn
            .prepare_cached(&format!(
                "SELECT {VM_COLUMNS} FROM vms ORDER BY created_at, name"
            ))
            .map_err(|e| db_error(&self.path, "listing VMs in", e))?;
        let rows = st
            .query_map([], vm_from_row)
            .and_then(|it| it.collect::<rusqlite::Result<Vec<_>>>())
            .map_err(|e| db_error(&self.path, "listing VMs in", e));
        rows
    }

    /// Removes a VM row.
    pub fn vm_delete(&self, id: &str) -> Result<()> {
        self.conn
            .execute("DELETE FROM vms WHERE id = ?1", [id])
            .map(drop)
            .map_err(|e| db_error(&self.path, "deleting a VM from", e))
    }

    /// Records a kernel (replacing one of the same name).
    pub fn kernel_put(&self, k: &Kernel) -> Result<()> {
        self.conn
            .execute(
                "INSERT INTO kernels (name, path, created_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT(name) DO UPDATE SET path = excluded.path, created_at = excluded.created_at",
                params![k.name, k.path, k.created_at],
            )
            .map(drop)
            .map_err(|e| db_error(&self.path, "recording a kernel in", e))
    }

    /// The kernel named `name`.
    pub fn kernel_get(&self, name: &str) -> Result<Option<Kernel>> {
        self.conn
            .query_row(
                "SELECT name, path, created_at FROM kernels WHERE name = ?1",
                [name],
                |r| {
                    Ok(Kernel {
                        name: r.get(0)?,
                        path: r.get(1)?,
                        created_at: r.get(2)?,
                    })
                },
            )
            .optional()
            .map_err(|e| db_error(&self.path, "reading a kernel from", e))
    }

    /// Every kernel by name.
    pub fn kernel_list(&self) -> Result<Vec<Kernel>> {
        let mut st = self
            .conn
            .prepare_cached("SELECT name, path, created_at FROM kernels ORDER BY name")
            .map_err(|e| db_error(&self.path, "listing kernels in", e))?;
        let rows = st
            .query_map([], |r| {
                Ok(Kernel {
                    name: r.get(0)?,
                    path: r.get(1)?,
                    created_at: r.get(2)?,
                })
            })
            .and_then(|it| it.collect::<rusqlite::Result<Vec<_>>>())
            .map_err(|e| db_error(&self.path, "listing kernels in", e));
        rows
    }

    /// Removes a kernel; refused while an image uses it.
    pub fn kernel_delete(&self, name: &str) -> Result<bool> {
        match self
            .conn
            .execute("DELETE FROM kernels WHERE name = ?1", [name])
        {
            Ok(n) => Ok(n > 0),
            Err(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::ConstraintViolation =>
            {
                Err(Error::new(
                    format!("removing kernel `{name}`"),
                    "an image still uses it",
                )
                .hint("remove the images that use it first (`banger image list`)"))
            }
            Err(e) => Err(db_error(&self.path, "deleting a kernel from", e)),
        }
    }

    /// Records an image (replacing one of the same name).
    pub fn image_put(&self, i: &Image) -> Result<()> {
        self.conn
            .execute(
                "INSERT INTO images (name, rootfs, kernel, ready_pattern, created_at, origin)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT(name) DO UPDATE SET rootfs = excluded.rootfs, kernel = excluded.kernel,
                 ready_pattern = excluded.ready_pattern, created_at = excluded.created_at,
                 origin = excluded.origin",
                params![
                    i.name,
                    i.rootfs,
                    i.kernel,
                    i.ready_pattern,
                    i.created_at,
                    i.origin
                ],
            )
            .map(drop)
            .map_err(|e| db_error(&self.path, "recording an image in", e))
    }

    /// The image named `name`.
    pub fn image_get(&self, name: &str) -> Result<Option<Image>> {
        self.conn
            .query_row(
                "SELECT name, rootfs, kernel, ready_pattern, created_at, origin FROM images WHERE name = ?1",
                [name],
                image_from_row,
            )
            .optional()
            .map_err(|e| db_error(&self.path, "reading an image from", e))
    }

    /// Every image by name.
    pub fn image_list(&self) -> Result<Vec<Image>> {
        let mut st = self
            .conn
            .prepare_cached(
                "SELECT name, rootfs, kernel, ready_pattern, created_at, origin FROM images ORDER BY name",
            )
            .map_err(|e| db_error(&self.path, "listing images in", e))?;
        let rows = st
            .query_map([], image_from_row)
            .and_then(|it| it.collect::<rusqlite::Result<Vec<_>>>())
            .map_err(|e| db_error(&self.path, "listing images in", e));
        rows
    }

    /// Removes an image row.
    pub fn image_delete(&self, name: &str) -> Result<bool> {
        self.conn
            .execute("DELETE FROM images WHERE name = ?1", [name])
            .map(|n| n > 0)
            .map_err(|e| db_error(&self.path, "deleting an image from", e))
    }
}

fn image_from_row(r: &Row<'_>) -> rusqlite::Result<Image> {
    Ok(Image {
        name: r.get(0)?,
        rootfs: r.get(1)?,
        kernel: r.get(2)?,
        ready_pattern: r.get(3)?,
        created_at: r.get(4)?,
        origin: r.get(5)?,
    })
}
