//! Snapshot benchmark (not a test; needs root): with the tiny guest, `vm create --from SNAP` →
//! running through daemon + helper (its own tap, address, disk clone; median of 20) beside the raw
//! `PUT /snapshot/load` (resume_vm) of the same snapshot files in a bare VMM, and a cold
//! `vm create`; the snapshot's size on disk (sparse) beside its memory size. The helper runs in a
//! network namespace of its own. The VMM is `BANGER_TEST_FIRECRACKER` or the stand-in. Run with
//! `cargo bench --bench snapshot` (scripts/bench.sh), or, without a release build,
//! `BANGER_BENCH_BIN=target/x86_64-unknown-linux-gnu/debug/banger cargo bench --profile dev --bench snapshot`.

mod common;
#[path = "../tests/guest/mod.rs"]
mod guest;

use common::VmBench;

use banger::rpc::client;
use banger::vmm::api::{wait_for_socket, Client};
use banger::vmm::models::{SnapshotLoadParams, VsockOverride};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn call(sock: &Path, method: &str, params: Value) -> Value {
    client::call_with_timeout(sock, method, params, Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("{method}: {e:?}"))
}

/// Spawn of a bare VMM → API socket → `PUT /snapshot/load` with resume_vm (no network: the
/// snapshot's VM had its tap, which the raw load cannot open, so the bench snapshot is taken of
/// a VM booted by hand without one). Returns milliseconds.
fn raw_load(vmm: &Path, dir: &Path, snap: &Path, ns: &str) -> f64 {
    let api = dir.join("raw.sock");
    let vsock = dir.join("raw-vsock.sock");
    let _ = std::fs::remove_file(&api);
    let _ = std::fs::remove_file(&vsock);
    let t = Instant::now();
    let mut child = common::spawn_raw_vmm(vmm, &api, Some(ns), Stdio::null());
    wait_for_socket(&api, Duration::from_secs(10)).expect("api socket");
    let mut load = SnapshotLoadParams::from_files(snap.join("vmstate"), snap.join("memory"));
    load.resume_vm = Some(true);
    load.vsock_override = Some(VsockOverride { uds_path: vsock });
    Client::new(&api)
        .load_snapshot(&load)
        .expect("snapshot load");
    let ms = t.elapsed().as_secs_f64() * 1000.0;
    let _ = child.kill();
    let _ = child.wait();
    ms
}

fn main() {
    let Some(VmBench { host, vmm, .. }) =
        VmBench::start("snapshot", "snapbench", guest::build_tiny_guest)
    else {
        return;
    };
    let ns = host.netns().unwrap_or_default().to_string();
    let (root, layout) = (host.root.clone(), host.layout.clone());
    let sock = layout.daemon_socket();

    // Cold creates, each deleted (untimed) before the next.
    let cold: Vec<f64> = (0..10)
        .map(|i| {
            let t = Instant::now();
            call(
                &sock,
                "vm.create",
                json!({"name": format!("cold{i}"), "image": "i", "memory_mib": 128}),
            );
            let ms = t.elapsed().as_secs_f64() * 1000.0;
            call(&sock, "vm.delete", json!({"vms": [format!("cold{i}")]}));
            ms
        })
        .collect();

    call(
        &sock,
        "vm.create",
        json!({"name": "src", "image": "i", "memory_mib": 128}),
    );
    let t = Instant::now();
    let snap = call(&sock, "vm.snapshot", json!({"vm": "src", "as": "warm"}));
    let snap_ms = t.elapsed().as_secs_f64() * 1000.0;
    let dir = PathBuf::from(snap["dir"].as_str().unwrap_or_default());
    let du = |p: &Path| {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(p).map(|m| m.blocks() * 512).unwrap_or(0)
    };

    // The raw load needs the snapshot's tap name free of any VM and present: the raw VMM opens
    // the recorded tap (the source VM's), so the source is stopped and its tap made again here.
    // Restores and raw loads then alternate, so both see the same machine load.
    call(&sock, "vm.stop", json!({"vm": "src"}));
    let tap = banger::net::tap_name(snap_src_id(&sock).as_str());
    let made = Command::new("ip")
        .args([
            "netns", "exec", &ns, "ip", "tuntap", "add", "dev", &tap, "mode", "tap",
        ])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    let mut stages = StageTimes::default();
    let mut raw = Vec::new();
    let restores: Vec<f64> = (0..20)
        .map(|i| {
            let t = Instant::now();
            call(
                &sock,
                "vm.create",
                json!({"name": format!("r{i}"), "from": "warm"}),
            );
            let ms = t.elapsed().as_secs_f64() * 1000.0;
            stages.add(&sock, &format!("r{i}"));
            call(&sock, "vm.delete", json!({"vms": [format!("r{i}")]}));
            if made {
                raw.push(raw_load(&vmm, &root, &dir, &ns));
            }
            ms
        })
        .collect();

    let (c, r) = (median(cold), median(restores.clone()));
    println!("VMM: {}", vmm.display());
    println!(
        "load average (1, 5, 15 min) at the end: {}",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!(
        "vm snapshot (pause, disk clone, full snapshot of 128 MiB, sparse, resume): {snap_ms:.1} ms"
    );
    println!(
        "snapshot on disk: memory {} MiB apparent, {:.1} KiB allocated; whole snapshot dir {:.1} KiB (du)",
        std::fs::metadata(dir.join("memory")).map(|m| m.len() >> 20).unwrap_or(0),
        du(&dir.join("memory")) as f64 / 1024.0,
        (du(&dir.join("memory")) + du(&dir.join("vmstate")) + du(&dir.join("rootfs.ext4"))) as f64 / 1024.0
    );
    println!("cold vm create → running: median {c:.1} ms (10)");
    println!(
        "vm create --from warm → running: median {r:.1} ms (20; min {:.1}, max {:.1})",
        restores.iter().cloned().fold(f64::MAX, f64::min),
        restores.iter().cloned().fold(0.0, f64::max)
    );
    stages.print();
    if raw.is_empty() {
        println!("raw PUT /snapshot/load: not measured (could not make tap {tap} in {ns})");
    } else {
        let pairs = median(restores.iter().zip(&raw).map(|(r, w)| r / w).collect());
        let rw = median(raw);
        println!(
            "raw spawn + PUT /snapshot/load (resume_vm) of the same files, alternating with the restores: median {rw:.1} ms (20)"
        );
        println!(
            "ratio restore/raw load: {:.2}x (median of each restore over the raw load after it: {pairs:.2}x); restore/cold create: {:.2}x",
            r / rw,
            r / c
        );
    }
}

/// The daemon's per-stage timings of each restore (`daemon.operations.list`), by stage name in the
/// order first seen.
#[derive(Default)]
struct StageTimes {
    order: Vec<(String, bool)>,
    ms: std::collections::HashMap<String, Vec<f64>>,
    /// Each restore's sequential stages summed: the daemon's own time for it.
    totals: Vec<f64>,
}

impl StageTimes {
    fn add(&mut self, sock: &Path, target: &str) {
        let ops = call(sock, "daemon.operations.list", json!({}));
        let Some(op) = ops["operations"].as_array().and_then(|o| {
            o.iter()
                .rev()
                .find(|o| o["kind"] == "vm.create" && o["target"] == target)
        }) else {
            return;
        };
        let mut total = 0.0;
        for t in op["timings"].as_array().into_iter().flatten() {
            let (Some(stage), Some(ms)) = (t["stage"].as_str(), t["ms"].as_f64()) else {
                continue;
            };
            if !t["concurrent"].as_bool().unwrap_or(false) {
                total += ms;
            }
            if !self.ms.contains_key(stage) {
                let concurrent = t["concurrent"].as_bool().unwrap_or(false);
                self.order.push((stage.to_string(), concurrent));
            }
            self.ms.entry(stage.to_string()).or_default().push(ms);
        }
        self.totals.push(total);
    }

    fn print(&self) {
        println!("restore stages (daemon's operation timings; median ms of 20):");
        let mut sum = 0.0;
        for (stage, concurrent) in &self.order {
            let m = median(self.ms[stage].clone());
            if !concurrent {
                sum += m;
            }
            let mark = if *concurrent {
                " (beside the stages)"
            } else {
                ""
            };
            println!("  {m:7.2}  {stage}{mark}");
        }
        println!("  {sum:7.2}  sum of the sequential stages' medians");
        if !self.totals.is_empty() {
            println!(
                "  {:7.2}  median of each restore's sequential stages summed (the daemon's part; the rest of the end-to-end time is the RPC and what precedes the operation)",
                median(self.totals.clone())
            );
        }
    }
}

fn snap_src_id(sock: &Path) -> String {
    let v = call(sock, "vm.show", json!({"vm": "src"}));
    v["vm"]["id"].as_str().unwrap_or_default().to_string()
}
