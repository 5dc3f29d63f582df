//! VM benchmark (not a test; needs root): `vm create` → running through daemon + helper (guest
//! network included: tap, bridge, `eth0`, `ip=`), beside the raw VMM start of the same guest
//! without a network; `vm.list` with 40 running VMs and with 1,000 rows; daemon and helper RSS
//! with 40 running VMs. The helper runs in a network namespace of its own. The VMM is `BANGER_TEST_FIRECRACKER` or the stand-in (built by
//! scripts/bench.sh). Run with `cargo bench --bench vm`.

mod common;
#[path = "../tests/guest/mod.rs"]
mod guest;

use common::{rss_kib, VmBench};

use banger::rpc::client;
use banger::vmm::api::{wait_for_socket, Client};
use banger::vmm::models::{Drive, Vsock};
use serde_json::json;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Raw start of the VMM with the same config banger uses: spawn → API → InstanceStart → ready line.
fn raw_start(vmm: &Path, dir: &Path, kernel: &Path, rootfs: &Path) -> f64 {
    let api = dir.join("raw.sock");
    let vsock = dir.join("raw-vsock.sock");
    let _ = std::fs::remove_file(&api);
    let _ = std::fs::remove_file(&vsock);
    let t = Instant::now();
    let mut child: Child = common::spawn_raw_vmm(vmm, &api, None, Stdio::piped());
    wait_for_socket(&api, Duration::from_secs(10)).expect("api socket");
    let c = Client::new(&api);
    guest::configure(&c, kernel, "console=ttyS0 reboot=k panic=1 pci=off");
    c.put_drive(&Drive {
        drive_id: "rootfs".into(),
        partuuid: None,
        is_root_device: true,
        cache_type: None,
        is_read_only: Some(false),
        path_on_host: Some(rootfs.to_path_buf()),
        rate_limiter: None,
        io_engine: None,
        socket: None,
    })
    .expect("drive");
    c.put_vsock(&Vsock {
        guest_cid: 3,
        uds_path: vsock,
        vsock_id: None,
    })
    .expect("vsock");
    c.instance_start().expect("start");
    let out = child.stdout.take().expect("stdout");
    for line in BufReader::new(out).lines() {
        if line
            .map(|l| banger::agent::parse_ready_line(&l).is_some())
            .unwrap_or(false)
        {
            break;
        }
    }
    let ms = t.elapsed().as_secs_f64() * 1000.0;
    let _ = child.kill();
    let _ = child.wait();
    ms
}

fn main() {
    let Some(VmBench {
        mut host,
        vmm,
        helper,
        daemon,
        kernel,
        rootfs,
    }) = VmBench::start("vm", "vmbench", guest::build_tiny_guest)
    else {
        return;
    };
    let (root, layout) = (host.root.clone(), host.layout.clone());
    let sock = layout.daemon_socket();

    let raw: Vec<f64> = (0..10)
        .map(|_| raw_start(&vmm, &root, &kernel, &rootfs))
        .collect();
    // Each VM is deleted (untimed) before the next, so every create runs on an idle host, as
    // each raw start did.
    let banger: Vec<f64> = (0..10)
        .map(|i| {
            let t = Instant::now();
            client::call_with_timeout(
                &sock,
                "vm.create",
                json!({"name": format!("b{i}"), "image": "i", "memory_mib": 128}),
                Duration::from_secs(60),
            )
            .expect("vm.create");
            let ms = t.elapsed().as_secs_f64() * 1000.0;
            client::call_with_timeout(
                &sock,
                "vm.delete",
                json!({"vms": [format!("b{i}")]}),
                Duration::from_secs(60),
            )
            .expect("vm.delete");
            ms
        })
        .collect();
    let (r, b) = (median(raw), median(banger));
    println!("VMM start to ready, raw (no network): median {r:.1} ms; banger vm create to running (network included): median {b:.1} ms; ratio {:.2}x (10 each, {})", b / r, vmm.display());

    // 40 VMs, 8 creates at a time (as the smoke suite's net_many_vms does).
    let t = Instant::now();
    let names: Vec<String> = (0..40).map(|i| format!("m{i}")).collect();
    for batch in names.chunks(8) {
        let threads: Vec<_> = batch
            .iter()
            .map(|name| {
                let (sock, name) = (sock.clone(), name.clone());
                std::thread::spawn(move || {
                    client::call_with_timeout(
                        &sock,
                        "vm.create",
                        json!({"name": name, "image": "i", "memory_mib": 128}),
                        Duration::from_secs(120),
                    )
                    .expect("vm.create")
                })
            })
            .collect();
        for th in threads {
            th.join().expect("create thread");
        }
    }
    println!(
        "40 VMs created 8 at a time: {:.0} ms in all",
        t.elapsed().as_secs_f64() * 1000.0
    );
    let list: Vec<f64> = (0..30)
        .map(|_| {
            let t = Instant::now();
            let v = client::call(&sock, "vm.list", json!({})).expect("vm.list");
            let vms = v["vms"].as_array().map(Vec::len);
            assert_eq!(vms, Some(40));
            t.elapsed().as_secs_f64() * 1000.0
        })
        .collect();
    println!(
        "vm.list with 40 running VMs: median {:.2} ms (30 calls, RPC round trip and a /proc check per VM included)",
        median(list)
    );
    println!(
        "RSS with 40 running VMs: bangerd {} KiB, bangerd-root {} KiB",
        rss_kib(daemon),
        rss_kib(helper)
    );
    let t = Instant::now();
    client::call_with_timeout(
        &sock,
        "vm.delete",
        json!({"vms": names}),
        Duration::from_secs(300),
    )
    .expect("delete");
    println!(
        "deleting the 40 (stop, net_down, disk): {:.0} ms in all",
        t.elapsed().as_secs_f64() * 1000.0
    );

    // 1,000 rows: written straight into the store while the daemon is stopped.
    host.stop_daemon(daemon);
    {
        let store = banger::store::Store::open(&layout.state_db()).expect("store");
        for i in 0..1000 {
            let now = banger::clock::now_rfc3339();
            store
                .vm_insert(&banger::store::Vm {
                    id: format!("{i:012x}"),
                    name: format!("row-{i}"),
                    image: Some("i".into()),
                    vcpu: 1,
                    memory_mib: 128,
                    state: banger::store::VmState::Stopped,
                    pid: None,
                    start_time: None,
                    comm: None,
                    boot_id: None,
                    ip: None,
                    mac: None,
                    nat: false,
                    created_at: now.clone(),
                    updated_at: now,
                })
                .expect("insert");
        }
    }
    host.start("bangerd");
    let list: Vec<f64> = (0..30)
        .map(|_| {
            let t = Instant::now();
            let v = client::call(&sock, "vm.list", json!({})).expect("vm.list");
            assert_eq!(v["vms"].as_array().map(Vec::len), Some(1000));
            t.elapsed().as_secs_f64() * 1000.0
        })
        .collect();
    println!(
        "vm.list with 1000 rows: median {:.2} ms (30 calls, RPC round trip included)",
        median(list)
    );
}
