//! Guest networking benchmark (not a test): inside a network namespace this process creates and
//! enters (never the root namespace), starts bangerd-root under a temp layout and measures
//! `priv.net_up` / `priv.net_down` (median and p90 of 60 calls each, without and with NAT), the
//! nftables work with 40 NAT VMs up (reading the table back, re-asserting the rules, applying the
//! whole table from scratch), and net_up/net_down at 40 VMs. Needs root; says SKIP otherwise.
//! Run with `cargo bench --bench net` (or scripts/bench.sh).

mod common;

use banger::net::{nfnl, nft};
use banger::rpc::client;
use common::Host;
use serde_json::json;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::time::Instant;

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

fn stats(mut v: Vec<f64>) -> String {
    v.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    format!(
        "median {:.2} ms, p90 {:.2} ms, min {:.2} ms ({} calls)",
        at(0.5),
        at(0.9),
        v[0],
        v.len()
    )
}

/// Creates the namespace `name` and moves this (still single-threaded) process into it.
fn enter_netns(name: &str) {
    let o = Command::new("ip")
        .args(["netns", "add", name])
        .output()
        .expect("ip");
    assert!(o.status.success(), "ip netns add {name}: {:?}", o);
    let f = std::fs::File::open(format!("/run/netns/{name}")).expect("netns file");
    // SAFETY: setns only reads the fd, which stays open for the call; the process has one thread.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
}

fn id(i: usize) -> String {
    format!("{i:010x}be")
}

fn ip(i: usize) -> String {
    format!("172.30.{}.{}", (i + 2) / 256, (i + 2) % 256)
}

fn main() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("SKIP: net bench: needs root (network namespace, taps, nftables)");
        return;
    }
    // Context for every number below: what one process spawn costs on this host right now.
    let spawns: Vec<f64> = (0..30)
        .map(|_| {
            let t = Instant::now();
            let _ = Command::new("/bin/true").status();
            ms(t)
        })
        .collect();
    println!("spawn of /bin/true (host load context): {}", stats(spawns));
    let ns = format!("bgbench-{}", std::process::id());
    enter_netns(&ns);
    let mut host = Host::new("bench-net", &[]);
    let l = host.layout.clone();
    std::fs::create_dir_all(l.etc_dir()).expect("etc");
    std::fs::write(l.config_toml(), "[network]\nsubnet = \"172.30.0.0/16\"\n").expect("config");
    banger::system::install_toml::save(
        &l,
        &banger::system::install_toml::InstallInfo {
            owner_user: "bench".into(),
            owner_uid: 4242,
            owner_gid: 4242,
            owner_home: "/nonexistent".into(),
            version: "0.0.0".into(),
            commit: "bench".into(),
            built_at: "2026-01-01T00:00:00Z".into(),
            installed_at: "2026-01-01T00:00:00Z".into(),
        },
    )
    .expect("install.toml");
    host.start("bangerd-root");
    let sock = l.helper_socket();
    let call = |m: &str, p: serde_json::Value| {
        let t = Instant::now();
        client::call(&sock, m, p).unwrap_or_else(|e| panic!("{m}: {e}"));
        ms(t)
    };

    // First call builds the bridge and the table.
    let first = call(
        "priv.net_up",
        json!({"id": id(999), "ip": ip(999), "nat": false}),
    );
    call("priv.net_down", json!({"id": id(999)}));
    println!("first net_up (creates bridge + table): {first:.2} ms");

    for nat in [false, true] {
        let (mut up, mut down) = (vec![], vec![]);
        for i in 0..60 {
            up.push(call(
                "priv.net_up",
                json!({"id": id(i), "ip": ip(i), "nat": nat}),
            ));
            down.push(call("priv.net_down", json!({"id": id(i)})));
        }
        let tag = if nat { "nat=true " } else { "nat=false" };
        println!("priv.net_up   {tag}: {}", stats(up));
        println!("priv.net_down {tag}: {}", stats(down));
    }

    // 40 NAT VMs up.
    let mut up40 = vec![];
    for i in 0..40 {
        up40.push(call(
            "priv.net_up",
            json!({"id": id(i), "ip": ip(i), "nat": true}),
        ));
    }
    println!("net_up of NAT VMs 1..40: {}", stats(up40));
    let st = nft::read().expect("table");
    assert_eq!(st.nat.len(), 40, "40 NAT elements");
    let reads: Vec<f64> = (0..30)
        .map(|_| {
            let t = Instant::now();
            nft::read().expect("read");
            ms(t)
        })
        .collect();
    println!("nft -j list table (40 NAT VMs): {}", stats(reads));
    let script = nft::ensure_script("banger0");
    let reassert: Vec<f64> = (0..30)
        .map(|_| {
            let t = Instant::now();
            nft::apply(&script).expect("apply");
            ms(t)
        })
        .collect();
    println!(
        "nft apply, rules re-asserted with 40 NAT elements kept: {}",
        stats(reassert)
    );
    let mut full = script.clone();
    for (a, c) in &st.nat {
        full += &nft::add_nat_line(*a, c.as_deref().unwrap_or("x"));
    }
    let scratch: Vec<f64> = (0..20)
        .map(|_| {
            nft::delete_table().expect("delete");
            let t = Instant::now();
            nft::apply(&full).expect("apply");
            ms(t)
        })
        .collect();
    println!(
        "nft apply, whole table from scratch (rules + 40 NAT elements, one transaction): {}",
        stats(scratch)
    );
    let (mut up, mut down) = (vec![], vec![]);
    for i in 100..130 {
        up.push(call(
            "priv.net_up",
            json!({"id": id(i), "ip": ip(i), "nat": true}),
        ));
        down.push(call("priv.net_down", json!({"id": id(i)})));
    }
    println!("priv.net_up   nat=true with 40 NAT VMs up: {}", stats(up));
    println!("priv.net_down nat=true with 40 NAT VMs up: {}", stats(down));
    // The kernel's share of a NAT bit: one nf_tables netlink batch (what net_up sends), no RPC.
    let addr: std::net::Ipv4Addr = "172.30.9.9".parse().expect("address");
    for nat in [true, false] {
        let batches: Vec<f64> = (0..30)
            .map(|_| {
                let t = Instant::now();
                nfnl::apply(&nfnl::exactly(addr, "bench", nat)).expect("nf_tables batch");
                ms(t)
            })
            .collect();
        println!(
            "kernel: NAT element batch over netlink, nat={nat} (with 40 NAT VMs up): {}",
            stats(batches)
        );
    }
    // The kernel's share: creating a persistent tap (ioctls) and deleting it (rtnetlink), no RPC.
    let mut nl = banger::net::rtnl::Rtnl::open().expect("rtnetlink");
    let (mut create, mut delete) = (vec![], vec![]);
    for i in 0..30 {
        let name = format!("bgr-k{i}");
        let t = Instant::now();
        banger::net::tap::create_persistent(&name, 4242).expect("tap");
        create.push(ms(t));
        let t = Instant::now();
        nl.delete(&name).expect("delete");
        delete.push(ms(t));
    }
    println!("kernel: persistent tap create (ioctls): {}", stats(create));
    println!(
        "kernel: tap delete (rtnetlink, waits for unregister): {}",
        stats(delete)
    );
    let t = Instant::now();
    call("priv.net_purge", json!({}));
    println!("priv.net_purge (40 taps, bridge, table): {:.2} ms", ms(t));
    drop(host);
    let _ = Command::new("ip").args(["netns", "del", &ns]).output();
}
