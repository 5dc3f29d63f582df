//! Store tests against real files in a private temp dir.

use super::compat::{check_with, sibling};
use super::*;
use std::sync::atomic::{AtomicU32, Ordering};

/// A unique directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let p = std::env::temp_dir().join(format!(
            "banger-store-test-{}-{}-{nanos}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir(&p).unwrap();
        TempDir(p)
    }
    fn db(&self) -> PathBuf {
        self.0.join("state.db")
    }
    /// The directory's entries, sorted, to prove nothing was created.
    fn entries(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&self.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const M1: Migration = Migration {
    version: 1,
    name: "one",
    sql: "CREATE TABLE a (x INTEGER);",
};
const M2: Migration = Migration {
    version: 2,
    name: "two",
    sql: "ALTER TABLE a ADD COLUMN y TEXT;",
};
const BAD: Migration = Migration {
    version: 2,
    name: "bad",
    sql: "CREATE TABLE half (x INTEGER); THIS IS NOT SQL;",
};

fn pragma(s: &Store, name: &str) -> String {
    s.conn()
        .query_row(&format!("PRAGMA {name}"), [], |r| {
            r.get::<_, rusqlite::types::Value>(0)
        })
        .map(|v| match v {
            rusqlite::types::Value::Integer(i) => i.to_string(),
            rusqlite::types::Value::Text(t) => t,
            other => format!("{other:?}"),
        })
        .unwrap()
}

#[test]
fn open_creates_migrates_and_is_idempotent() {
    let d = TempDir::new();
    let s = Store::open(&d.db()).unwrap();
    let all: Vec<u32> = MIGRATIONS.iter().map(|m| m.version).collect();
    assert_eq!(s.migrations_applied(), all.as_slice());
    let mode = std::fs::metadata(d.db()).unwrap().permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600
    );
    for table in [
        "vms",
        "images",
        "kernels",
        "operations",
        "schema_migrations",
    ] {
        let n: i64 = s
            .conn()
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE type='table' AND name=?1",
                [table],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(n, 1, "table {table}");
    }
    let (name, at): (String, String) = s
        .conn()
        .query_row(
            "SELECT name, applied_at FROM schema_migrations WHERE version = 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(name, "baseline");
    assert!(at.ends_with('Z'), "{at}");
    drop(s);

    let s = Store::open(&d.db()).unwrap();
    assert!(s.migrations_applied().is_empty());
    let n: i64 = s
        .conn()
        .query_row("SELECT count(*) FROM schema_migrations", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, MIGRATIONS.len() as i64);
}

#[test]
fn wal_busy_timeout_and_foreign_keys() {
    let d = TempDir::new();
    let s = Store::open(&d.db()).unwrap();
    assert_eq!(pragma(&s, "journal_mode"), "wal");
    assert_eq!(pragma(&s, "foreign_keys"), "1");
    assert_eq!(pragma(&s, "busy_timeout"), "5000");
    // The foreign key really is enforced: an image cannot name a kernel that does not exist.
    let err = s
        .conn()
        .execute(
            "INSERT INTO images (name, rootfs, kernel, created_at) VALUES ('i', '/r', 'nope', 'now')",
            [],
        )
        .unwrap_err();
    assert_eq!(
        err.sqlite_error_code(),
        Some(rusqlite::ErrorCode::ConstraintViolation)
    );
}

#[test]
fn open_without_parent_dir_says_what_to_do() {
    let d = TempDir::new();
    let p = d.0.join("no-such-dir").join("state.db");
    let e = Store::open(&p).unwrap_err();
    assert!(e.why.contains("does not exist"), "{e}");
    assert!(e.hint.is_some());
    assert!(!p.parent().unwrap().exists());
}

#[test]
fn check_missing_creates_nothing() {
    let d = TempDir::new();
    let c = check(&d.db()).unwrap();
    assert_eq!(c, Compat::Missing { latest: LATEST });
    assert_eq!(c.exit_code(), 1);
    assert!(c.line().starts_with("missing: "));
    assert!(d.entries().is_empty(), "{:?}", d.entries());
    assert!(open_read_only(&d.db()).is_err());
    assert!(d.entries().is_empty());
}

#[test]
fn check_valid_sqlite_without_schema_table_is_pending_from_zero() {
    let d = TempDir::new();
    {
        let c = Connection::open(d.db()).unwrap();
        c.execute_batch("CREATE TABLE unrelated (x)").unwrap();
    }
    let c = check(&d.db()).unwrap();
    assert_eq!(
        c,
        Compat::Pending {
            db_version: 0,
            latest: LATEST
        }
    );
    assert_eq!(c.exit_code(), 1);
    // An empty file is a valid (empty) SQLite database too.
    std::fs::write(d.0.join("empty.db"), b"").unwrap();
    assert_eq!(
        check(&d.0.join("empty.db")).unwrap(),
        Compat::Pending {
            db_version: 0,
            latest: LATEST
        }
    );
}

#[test]
fn check_partially_migrated_is_pending_and_open_finishes_it() {
    let d = TempDir::new();
    assert_eq!(
        Store::open_with(&d.db(), &[M1])
            .unwrap()
            .migrations_applied(),
        &[1]
    );
    let c = check_with(&d.db(), &[M1, M2]).unwrap();
    assert_eq!(
        c,
        Compat::Pending {
            db_version: 1,
            latest: 2
        }
    );
    assert_eq!(
        c.line(),
        "pending: database at 1, this binary applies up to 2"
    );
    let s = Store::open_with(&d.db(), &[M1, M2]).unwrap();
    assert_eq!(s.migrations_applied(), &[2]);
    s.conn()
        .execute("INSERT INTO a (x, y) VALUES (1, 'y')", [])
        .unwrap();
    drop(s);
    assert_eq!(
        check_with(&d.db(), &[M1, M2]).unwrap(),
        Compat::Compatible { version: 2 }
    );
    // The real table, simulated: a baseline DB that lost its row is pending again.
    let s = Store::open(&d.0.join("real.db")).unwrap();
    s.conn()
        .execute("DELETE FROM schema_migrations", [])
        .unwrap();
    drop(s);
    assert_eq!(
        check(&d.0.join("real.db")).unwrap(),
        Compat::Pending {
            db_version: 0,
            latest: LATEST
        }
    );
}

#[test]
fn failed_migration_rolls_back_its_own_step_only() {
    let d = TempDir::new();
    let e = Store::open_with(&d.db(), &[M1, BAD]).unwrap_err();
    assert!(e.what.contains("applying migration 2 (bad)"), "{e}");
    assert_eq!(
        check_with(&d.db(), &[M1, BAD]).unwrap(),
        Compat::Pending {
            db_version: 1,
            latest: 2
        }
    );
    let c = Connection::open(d.db()).unwrap();
    let n: i64 = c
        .query_row(
            "SELECT count(*) FROM sqlite_master WHERE name = 'half'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(
        n, 0,
        "the failed step's first statement must be rolled back"
    );
}

#[test]
fn check_fully_migrated_is_compatible_and_writes_nothing() {
    let d = TempDir::new();
    drop(Store::open(&d.db()).unwrap());
    let before = d.entries();
    assert_eq!(before, vec!["state.db".to_string()]);
    let bytes = std::fs::read(d.db()).unwrap();
    let c = check(&d.db()).unwrap();
    assert_eq!(c, Compat::Compatible { version: LATEST });
    assert_eq!(c.exit_code(), 0);
    assert_eq!(c.line(), format!("compatible: schema {LATEST} of {LATEST}"));
    let ro = open_read_only(&d.db()).unwrap();
    let n: i64 = ro
        .query_row("SELECT count(*) FROM vms", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 0);
    assert!(ro.execute("DELETE FROM vms", []).is_err(), "read-only");
    drop(ro);
    assert_eq!(d.entries(), before, "no -wal/-shm left behind");
    assert_eq!(std::fs::read(d.db()).unwrap(), bytes);
}

#[test]
fn check_sees_through_a_live_writers_wal() {
    let d = TempDir::new();
    let s = Store::open_with(&d.db(), &[M1]).unwrap();
    // Keep a second connection open so the WAL is not checkpointed away, then commit migration 2
    // through the live store: it sits in the -wal only.
    let s2 = Store::open_with(&d.db(), &[M1, M2]).unwrap();
    assert_eq!(s2.migrations_applied(), &[2]);
    assert!(sibling(&d.db(), "-wal").exists());
    assert_eq!(
        check_with(&d.db(), &[M1, M2]).unwrap(),
        Compat::Compatible { version: 2 }
    );
    drop((s, s2));
}

#[test]
fn newer_database_is_incompatible_and_left_unchanged() {
    let d = TempDir::new();
    let s = Store::open(&d.db()).unwrap();
    s.conn()
        .execute(
            "INSERT INTO schema_migrations (version, name, applied_at) VALUES (999, 'future', 'x')",
            [],
        )
        .unwrap();
    drop(s);
    let bytes = std::fs::read(d.db()).unwrap();
    let entries = d.entries();

    let c = check(&d.db()).unwrap();
    assert_eq!(
        c,
        Compat::Incompatible {
            unknown: vec![999],
            latest: LATEST
        }
    );
    assert_eq!(c.exit_code(), 2);
    assert!(c
        .line()
        .starts_with("incompatible: database has migration 999 unknown"));

    let e = Store::open(&d.db()).unwrap_err();
    assert!(e.why.contains("999"), "{e}");
    assert!(e.what.contains(&d.db().display().to_string()), "{e}");
    assert!(e.hint.is_some());
    assert_eq!(std::fs::read(d.db()).unwrap(), bytes);
    assert_eq!(d.entries(), entries);
}

#[test]
fn corrupt_file_is_an_error_naming_the_path_and_is_never_touched() {
    let d = TempDir::new();
    let garbage: Vec<u8> = (0..8192u32).map(|i| (i * 7 + 13) as u8).collect();
    std::fs::write(d.db(), &garbage).unwrap();
    let shown = d.db().display().to_string();

    let e = check(&d.db()).unwrap_err();
    assert!(e.what.contains(&shown), "{e}");
    assert!(
        e.hint.as_deref().unwrap_or("").contains("never overwrites"),
        "{e}"
    );
    let e = open_read_only(&d.db()).unwrap_err();
    assert!(e.what.contains(&shown), "{e}");
    let e = Store::open(&d.db()).unwrap_err();
    assert!(e.what.contains(&shown), "{e}");

    assert_eq!(std::fs::read(d.db()).unwrap(), garbage);
    assert_eq!(d.entries(), vec!["state.db".to_string()]);
}

#[test]
fn operations_round_trip_newest_first() {
    let d = TempDir::new();
    let s = Store::open(&d.db()).unwrap();
    let op = |id: &str, started: &str| Operation {
        id: id.into(),
        kind: "vm.create".into(),
        stage: "queued".into(),
        target: Some("dev".into()),
        started_at: started.into(),
        finished_at: None,
        done: false,
        error: None,
        timings: Vec::new(),
    };
    let a = op("op-a", "2026-01-01T00:00:00Z");
    let b = op("op-b", "2026-01-01T00:00:05Z");
    let c = Operation {
        target: None,
        ..op("op-c", "2026-01-01T00:00:05Z")
    };
    for o in [&a, &b, &c] {
        s.op_insert(o).unwrap();
    }
    assert!(s.op_insert(&a).is_err(), "duplicate id");
    assert_eq!(
        s.op_list(10).unwrap(),
        vec![c.clone(), b.clone(), a.clone()]
    );
    assert_eq!(s.op_list(1).unwrap(), vec![c.clone()]);

    let b_done = Operation {
        stage: "failed".into(),
        finished_at: Some("2026-01-01T00:01:00Z".into()),
        done: true,
        error: Some("boom".into()),
        ..b.clone()
    };
    s.op_update(&b_done).unwrap();
    assert_eq!(
        s.op_list(10).unwrap(),
        vec![c.clone(), b_done.clone(), a.clone()]
    );
    let new = op("op-d", "2026-01-01T00:02:00Z");
    s.op_update(&new).unwrap(); // upsert
    assert_eq!(s.op_list(10).unwrap()[0], new);

    // After a restart, work that was in flight is closed, not left pending forever.
    drop(s);
    let s = Store::open(&d.db()).unwrap();
    assert_eq!(s.op_fail_unfinished("daemon restarted").unwrap(), 3);
    let all = s.op_list(10).unwrap();
    assert!(all.iter().all(|o| o.done && o.finished_at.is_some()));
    assert_eq!(all.iter().find(|o| o.id == "op-b").unwrap(), &b_done);
    assert_eq!(
        all.iter()
            .find(|o| o.id == "op-a")
            .unwrap()
            .error
            .as_deref(),
        Some("daemon restarted")
    );
}

fn vm_row(id: &str, name: &str, state: VmState) -> Vm {
    Vm {
        id: id.into(),
        name: name.into(),
        image: Some("img".into()),
        vcpu: 1,
        memory_mib: 128,
        state,
        pid: None,
        start_time: None,
        comm: None,
        boot_id: None,
        ip: None,
        mac: None,
        nat: false,
        created_at: crate::clock::now_rfc3339(),
        updated_at: crate::clock::now_rfc3339(),
    }
}

#[test]
fn vm_states_are_stored_as_their_names_and_unknown_names_read_as_unknown() {
    let d = TempDir::new();
    let s = Store::open(&d.db()).unwrap();
    for (i, state) in VmState::ALL.into_iter().enumerate() {
        let vm = vm_row(&format!("{i:012x}"), &format!("v{i}"), state);
        s.vm_insert(&vm).unwrap();
        let stored: String = s
            .conn()
            .query_row("SELECT state FROM vms WHERE id = ?1", [&vm.id], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(stored, state.as_str());
        assert_eq!(s.vm_get(&vm.name).unwrap().unwrap().state, state);
        assert_eq!(VmState::parse(state.as_str()), Some(state));
    }
    // A state a newer banger wrote: reported as unknown (left alone), never an unreadable row.
    s.conn()
        .execute("UPDATE vms SET state = 'hibernating' WHERE name = 'v0'", [])
        .unwrap();
    assert_eq!(s.vm_get("v0").unwrap().unwrap().state, VmState::Unknown);
    assert_eq!(s.vm_list().unwrap().len(), VmState::ALL.len());
}

#[test]
fn addresses_are_allocated_in_one_transaction_and_unique() {
    let d = TempDir::new();
    let s = Store::open(&d.db()).unwrap();
    let lowest = |taken: &[String]| -> Result<String> {
        (2..=6)
            .map(|i| format!("10.0.0.{i}"))
            .find(|ip| !taken.contains(ip))
            .ok_or_else(|| Error::new("allocating", "exhausted"))
    };
    for i in 0..5 {
        let mut vm = vm_row(&format!("{i:012x}"), &format!("v{i}"), VmState::Created);
        s.vm_insert_allocating(&mut vm, lowest).unwrap();
        assert_eq!(vm.ip.as_deref(), Some(format!("10.0.0.{}", i + 2).as_str()));
        assert_eq!(s.vm_get(&vm.id).unwrap().unwrap().ip, vm.ip);
    }
    // Exhausted: the picker's error, and no row.
    let mut vm = vm_row("00000000000f", "full", VmState::Created);
    let e = s.vm_insert_allocating(&mut vm, lowest).unwrap_err();
    assert!(e.to_string().contains("exhausted"), "{e}");
    assert!(s.vm_get("full").unwrap().is_none());
    // A picker that ignores what is taken is stopped by the unique index; nothing recorded.
    let mut dup = vm_row("00000000000e", "dup", VmState::Created);
    let e = s
        .vm_insert_allocating(&mut dup, |_| Ok("10.0.0.2".into()))
        .unwrap_err();
    assert!(e.to_string().contains("already another VM's"), "{e}");
    assert!(s.vm_get("dup").unwrap().is_none());
    // Freed at delete, and reused.
    s.vm_delete("000000000001").unwrap();
    let mut again = vm_row("000000000010", "again", VmState::Created);
    s.vm_insert_allocating(&mut again, lowest).unwrap();
    assert_eq!(again.ip.as_deref(), Some("10.0.0.3"));
    // The failed attempts left no transaction open: an ordinary write still works.
    s.vm_update(&again).unwrap();
}

#[test]
fn vm_network_migration_keeps_old_rows_and_addresses_them_later() {
    let d = TempDir::new();
    // A database at schema 1 with one VM, as the previous release left it.
    let s = Store::open_with(&d.db(), &MIGRATIONS[..1]).unwrap();
    s.conn()
        .execute(
            "INSERT INTO vms (id, name, image, vcpu, memory_mib, state, created_at, updated_at)
             VALUES ('0123456789ab', 'old', 'img', 1, 128, 'stopped', 't', 't')",
            [],
        )
        .unwrap();
    drop(s);
    assert_eq!(
        check(&d.db()).unwrap(),
        Compat::Pending {
            db_version: 1,
            latest: LATEST
        }
    );
    let s = Store::open(&d.db()).unwrap();
    assert_eq!(s.migrations_applied(), &[2, 3, 4]);
    let old = s.vm_get("old").unwrap().unwrap();
    assert_eq!((old.ip, old.mac, old.nat), (None, None, false));
    let ip = s
        .vm_assign_address(&old.id, "02:01:23:45:67:89", |_| Ok("10.0.0.2".into()))
        .unwrap();
    assert_eq!(ip, "10.0.0.2");
    let old = s.vm_get("old").unwrap().unwrap();
    assert_eq!(old.ip.as_deref(), Some("10.0.0.2"));
    assert_eq!(old.mac.as_deref(), Some("02:01:23:45:67:89"));
    // Only once: an addressed VM keeps its address.
    assert!(s
        .vm_assign_address(&old.id, "02:00:00:00:00:00", |_| Ok("10.0.0.3".into()))
        .is_err());
    assert_eq!(
        s.vm_get("old").unwrap().unwrap().ip.as_deref(),
        Some("10.0.0.2")
    );
    drop(s);
    assert_eq!(
        check(&d.db()).unwrap(),
        Compat::Compatible { version: LATEST }
    );
}

#[test]
fn image_origin_migration_keeps_old_images_with_no_origin() {
    let d = TempDir::new();
    // A database at schema 2 with one kernel and one image, as the previous release left it.
    let s = Store::open_with(&d.db(), &MIGRATIONS[..2]).unwrap();
    s.conn()
        .execute_batch(
            "INSERT INTO kernels (name, path, created_at) VALUES ('k6', '/k/vmlinux', 't');
             INSERT INTO images (name, rootfs, kernel, ready_pattern, created_at)
             VALUES ('old', '/i/old/rootfs.ext4', 'k6', NULL, 't');",
        )
        .unwrap();
    drop(s);
    assert_eq!(
        check(&d.db()).unwrap(),
        Compat::Pending {
            db_version: 2,
            latest: LATEST
        }
    );
    let s = Store::open(&d.db()).unwrap();
    assert_eq!(s.migrations_applied(), &[3, 4]);
    // The old row reads, with no origin, in both the single read and the list.
    let old = s.image_get("old").unwrap().unwrap();
    assert_eq!(old.origin, None);
    assert_eq!(old.rootfs, "/i/old/rootfs.ext4");
    assert_eq!(s.image_list().unwrap(), vec![old.clone()]);
    // A new row round-trips its origin; replacing it replaces the origin too.
    let mut new = Image {
        name: "new".into(),
        rootfs: "/i/new/rootfs.ext4".into(),
        kernel: Some("k6".into()),
        ready_pattern: None,
        created_at: "t2".into(),
        origin: Some("imported from /tmp/x.ext4".into()),
    };
    s.image_put(&new).unwrap();
    assert_eq!(s.image_get("new").unwrap().as_ref(), Some(&new));
    new.origin = Some("built: debian bookworm".into());
    s.image_put(&new).unwrap();
    assert_eq!(s.image_list().unwrap(), vec![new, old]);
    drop(s);
    assert_eq!(
        check(&d.db()).unwrap(),
        Compat::Compatible { version: LATEST }
    );
}

#[test]
fn id_prefix_lookup() {
    let d = TempDir::new();
    let s = Store::open(&d.db()).unwrap();
    s.vm_insert(&vm_row("0123456789ab", "a", VmState::Created))
        .unwrap();
    assert!(s.vm_id_prefix_taken("0123456789ff", 10).unwrap());
    assert!(!s.vm_id_prefix_taken("0123456780ab", 10).unwrap());
    assert!(!s.vm_id_prefix_taken("ffffffffffff", 10).unwrap());
}

fn snapshot_row(id: &str, name: &str) -> crate::store::Snapshot {
    crate::store::Snapshot {
        id: id.into(),
        name: name.into(),
        source_vm: "src".into(),
        kernel: "k6".into(),
        image: Some("img".into()),
        vcpu: 1,
        memory_mib: 128,
        agent: true,
        firecracker_version: "1.16.1".into(),
        boot_id: Some("b".into()),
        dir: format!("/s/{id}"),
        size_bytes: 4096,
        created_at: crate::clock::now_rfc3339(),
    }
}

#[test]
fn snapshots_migration_keeps_old_vms_as_booted() {
    let d = TempDir::new();
    // A database at schema 3 with one VM, as the previous release left it.
    let s = Store::open_with(&d.db(), &MIGRATIONS[..3]).unwrap();
    s.vm_insert(&vm_row("0123456789ab", "old", VmState::Running))
        .unwrap();
    drop(s);
    assert_eq!(
        check(&d.db()).unwrap(),
        Compat::Pending {
            db_version: 3,
            latest: LATEST
        }
    );
    let s = Store::open(&d.db()).unwrap();
    assert_eq!(s.migrations_applied(), &[4]);
    let old = s.vm_get("old").unwrap().unwrap();
    assert_eq!(old.state, VmState::Running);
    assert_eq!(s.vm_origin(&old.id).unwrap(), (None, None));
    assert!(s.snapshot_list().unwrap().is_empty());

    // Snapshots round-trip; names are unique.
    let snap = snapshot_row("aaaaaaaaaaaa", "warm");
    s.snapshot_insert(&snap).unwrap();
    assert_eq!(s.snapshot_get("warm").unwrap().as_ref(), Some(&snap));
    assert_eq!(
        s.snapshot_get("aaaaaaaaaaaa").unwrap().as_ref(),
        Some(&snap)
    );
    let e = s
        .snapshot_insert(&snapshot_row("bbbbbbbbbbbb", "warm"))
        .unwrap_err();
    assert!(e.why.contains("already exists"), "{e}");
    assert_eq!(s.snapshot_list().unwrap(), vec![snap.clone()]);

    // A clone records its origin; the snapshot lists its clones.
    s.vm_insert(&vm_row("cccccccccccc", "clone", VmState::Running))
        .unwrap();
    s.vm_set_origin("cccccccccccc", Some(&snap.id), Some("i1"))
        .unwrap();
    assert_eq!(
        s.vm_origin("cccccccccccc").unwrap(),
        (Some(snap.id.clone()), Some("i1".into()))
    );
    assert_eq!(
        s.snapshot_clones(&snap.id).unwrap(),
        vec![("clone".to_string(), "running".to_string())]
    );
    assert_eq!(
        s.vm_origins().unwrap(),
        vec![(
            "cccccccccccc".to_string(),
            Some("warm".to_string()),
            Some("i1".to_string())
        )]
    );
    // vm_update leaves the origin alone.
    let c = s.vm_get("clone").unwrap().unwrap();
    s.vm_update(&c).unwrap();
    assert_eq!(
        s.vm_origin("cccccccccccc").unwrap().1.as_deref(),
        Some("i1")
    );
    s.snapshot_delete(&snap.id).unwrap();
    assert!(s.snapshot_get("warm").unwrap().is_none());
    assert_eq!(
        s.vm_origins().unwrap(),
        vec![("cccccccccccc".to_string(), None, Some("i1".to_string()))]
    );
    drop(s);
    assert_eq!(
        check(&d.db()).unwrap(),
        Compat::Compatible { version: LATEST }
    );
}

#[test]
fn a_restored_vm_is_recorded_with_its_origin_in_one_transaction() {
    let d = TempDir::new();
    let s = Store::open(&d.db()).unwrap();
    let snap = snapshot_row("aaaaaaaaaaaa", "warm");
    s.snapshot_insert(&snap).unwrap();
    s.vm_insert(&Vm {
        ip: Some("172.30.0.2".into()),
        ..vm_row("bbbbbbbbbbbb", "booted", VmState::Running)
    })
    .unwrap();

    // The address is picked from the recorded ones; the origin comes with the row.
    let mut vm = vm_row("cccccccccccc", "clone", VmState::Created);
    s.vm_insert_restored(&mut vm, &snap.id, |taken| {
        assert_eq!(taken, ["172.30.0.2".to_string()]);
        Ok("172.30.0.3".into())
    })
    .unwrap();
    assert_eq!(vm.ip.as_deref(), Some("172.30.0.3"));
    assert_eq!(s.vm_get("clone").unwrap().unwrap(), vm);
    assert_eq!(s.vm_origin(&vm.id).unwrap(), (Some(snap.id.clone()), None));

    // A refusal (taken name, failed pick) records neither row nor origin.
    let mut dup = vm_row("dddddddddddd", "clone", VmState::Created);
    let e = s
        .vm_insert_restored(&mut dup, &snap.id, |_| Ok("172.30.0.4".into()))
        .unwrap_err();
    assert!(e.why.contains("already exists"), "{e}");
    let mut none = vm_row("eeeeeeeeeeee", "other", VmState::Created);
    let e = s
        .vm_insert_restored(&mut none, &snap.id, |_| {
            Err(crate::error::Error::new("allocating", "exhausted"))
        })
        .unwrap_err();
    assert!(e.to_string().contains("exhausted"), "{e}");
    assert!(s.vm_get("other").unwrap().is_none());
    assert_eq!(s.vm_list().unwrap().len(), 2);

    // Running, identity, boot id and instance id land together.
    vm.state = VmState::Running;
    vm.pid = Some(42);
    vm.start_time = Some(7);
    vm.comm = Some("firecracker".into());
    vm.boot_id = Some("b00t".into());
    s.vm_update_with_origin(&vm, Some(&snap.id), Some("i-1"))
        .unwrap();
    let got = s.vm_get("clone").unwrap().unwrap();
    assert_eq!(
        (got.state, got.pid, got.boot_id.as_deref()),
        (VmState::Running, Some(42), Some("b00t"))
    );
    assert_eq!(
        s.vm_origin(&vm.id).unwrap(),
        (Some(snap.id.clone()), Some("i-1".into()))
    );
}
