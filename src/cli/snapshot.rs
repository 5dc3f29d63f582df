//! `banger snapshot …`: list, show and remove VM snapshots (taken with `banger vm snapshot`,
//! restored with `banger vm create --from`). Thin: one daemon RPC per verb, formatted here.

use crate::error::{Error, Result};
use crate::layout::Layout;
use crate::rpc::client;
use argh::{ArgsInfo, FromArgs};
use serde_json::{json, Value};

#[derive(FromArgs, ArgsInfo)]
/// List, show and remove snapshots of VMs.
#[argh(
    subcommand,
    name = "snapshot",
    example = "banger vm snapshot dev --as warm     # take one",
    example = "banger vm create --from warm         # restore a clone of it",
    example = "banger snapshot list",
    example = "banger snapshot rm warm",
    note = "A snapshot holds the VM's memory, device state and a copy-on-write clone of its disk, under /var/lib/banger/snapshots. It only loads under the Firecracker version that wrote it."
)]
pub struct SnapshotCmd {
    #[argh(subcommand)]
    cmd: SnapshotSub,
}

#[derive(FromArgs, ArgsInfo)]
#[argh(subcommand)]
enum SnapshotSub {
    List(ListCmd),
    Show(ShowCmd),
    Rm(RmCmd),
}

#[derive(FromArgs, ArgsInfo)]
/// List snapshots: source VM, size on disk, Firecracker version, VMs restored from each.
#[argh(subcommand, name = "list")]
struct ListCmd {
    /// print JSON
    #[argh(switch)]
    json: bool,
}

#[derive(FromArgs, ArgsInfo)]
/// Show one snapshot.
#[argh(subcommand, name = "show")]
struct ShowCmd {
    /// snapshot name or id
    #[argh(positional)]
    snapshot: String,
    /// print JSON
    #[argh(switch)]
    json: bool,
}

#[derive(FromArgs, ArgsInfo)]
/// Remove a snapshot and free its files; refused while VMs restored from it are running.
#[argh(subcommand, name = "rm")]
struct RmCmd {
    /// snapshot name or id
    #[argh(positional)]
    snapshot: String,
}

fn call(method: &str, params: Value, what: &str) -> Result<Value> {
    client::call(&Layout::from_env().daemon_socket(), method, params)
        .map_err(|e| e.into_error(what))
}

/// `bytes` as MiB with one decimal.
pub(super) fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1 << 20))
}

fn s<'a>(v: &'a Value, k: &str) -> &'a str {
    v.get(k).and_then(Value::as_str).unwrap_or("-")
}

fn clone_names(v: &Value) -> String {
    let names: Vec<String> = v["vms"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| format!("{}({})", s(c, "name"), s(c, "state")))
        .collect();
    if names.is_empty() {
        "-".into()
    } else {
        names.join(",")
    }
}

fn table(snaps: &Value) -> String {
    let mut out = format!(
        "{:<20} {:<14} {:<20} {:>7} {:>11}  {:<9} {}\n",
        "NAME", "ID", "SOURCE VM", "MEM", "ON DISK", "FC", "VMS"
    );
    for v in snaps.as_array().into_iter().flatten() {
        out.push_str(&format!(
            "{:<20} {:<14} {:<20} {:>7} {:>11}  {:<9} {}\n",
            s(v, "name"),
            s(v, "id"),
            s(v, "source_vm"),
            format!("{}M", v["memory_mib"].as_u64().unwrap_or(0)),
            mib(v["size_bytes"].as_u64().unwrap_or(0)),
            s(v, "firecracker_version"),
            clone_names(v)
        ));
    }
    out
}

fn details(v: &Value) -> String {
    let mut out = String::new();
    for k in [
        "name",
        "id",
        "source_vm",
        "image",
        "kernel",
        "firecracker_version",
        "boot_id",
        "dir",
        "created_at",
    ] {
        out.push_str(&format!("{k}: {}\n", s(v, k)));
    }
    out.push_str(&format!(
        "vcpu: {}\nmemory: {} MiB\non disk: {}\nagent: {}\nvms: {}\n",
        v["vcpu"].as_u64().unwrap_or(0),
        v["memory_mib"].as_u64().unwrap_or(0),
        mib(v["size_bytes"].as_u64().unwrap_or(0)),
        if v["agent"] == true { "yes" } else { "no" },
        clone_names(v)
    ));
    out
}

/// Runs a `snapshot` subcommand.
pub fn run(c: SnapshotCmd) -> Result<i32> {
    match c.cmd {
        SnapshotSub::List(l) => {
            let v = call("snapshot.list", json!({}), "listing snapshots")?;
            if l.json {
                println!("{}", crate::termsafe::json(&v["snapshots"].to_string()));
            } else {
                print!("{}", crate::termsafe::plain(&table(&v["snapshots"])));
            }
        }
        SnapshotSub::Show(sh) => {
            let v = call(
                "snapshot.show",
                json!({"snapshot": sh.snapshot}),
                &format!("showing snapshot `{}`", sh.snapshot),
            )?;
            if sh.json {
                println!("{}", crate::termsafe::json(&v["snapshot"].to_string()));
            } else {
                print!("{}", crate::termsafe::plain(&details(&v["snapshot"])));
            }
        }
        SnapshotSub::Rm(r) => {
            if r.snapshot.is_empty() {
                return Err(Error::usage("removing a snapshot", "name one snapshot"));
            }
            let v = call(
                "snapshot.rm",
                json!({"snapshot": r.snapshot}),
                &format!("removing snapshot `{}`", r.snapshot),
            )?;
            let line = format!(
                "removed {} (freed {})",
                s(&v, "removed"),
                mib(v["freed_bytes"].as_u64().unwrap_or(0))
            );
            println!("{}", crate::termsafe::plain(&line));
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_the_clones() {
        let v = json!([{"name": "warm", "id": "aaaaaaaaaaaa", "source_vm": "dev", "memory_mib": 128,
            "size_bytes": 3 << 20, "firecracker_version": "1.16.1",
            "vms": [{"name": "a", "state": "running"}, {"name": "b", "state": "stopped"}]}]);
        let t = table(&v);
        assert!(t.starts_with("NAME"), "{t}");
        assert!(t.contains("warm"), "{t}");
        assert!(t.contains("3.0 MiB"), "{t}");
        assert!(t.contains("a(running),b(stopped)"), "{t}");
    }
}
