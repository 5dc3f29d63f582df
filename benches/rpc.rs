//! RPC and footprint benchmark (not a test): starts bangerd and bangerd-root under a temp layout,
//! measures the `ping` round trip (median/p99 of 1,000), RPCs/s with 8 concurrent clients, and the
//! idle RSS of both. Run with `cargo bench --bench rpc` (or scripts/bench.sh).

mod common;

use banger::rpc::client;
use common::{rss_kib, wait_call};
use serde_json::json;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn main() {
    let bin = std::env::var("BANGER_BENCH_BIN").unwrap_or_else(|_| {
        let p = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("target/x86_64-unknown-linux-gnu/release/banger");
        p.to_string_lossy().into_owned()
    });
    let root = std::env::temp_dir().join(format!("banger-bench-{}", std::process::id()));
    let bindir = root.join("bin");
    std::fs::create_dir_all(&bindir).expect("temp dir");
    for r in ["bangerd", "bangerd-root"] {
        std::os::unix::fs::symlink(&bin, bindir.join(r)).expect("link");
    }
    let layout = banger::layout::Layout::under(&root);
    let spawn = |role: &str| {
        Command::new(bindir.join(role))
            .env("BANGER_ROOT", &root)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn")
    };
    let mut d = spawn("bangerd");
    let mut h = spawn("bangerd-root");
    wait_call(&layout.daemon_socket(), "ping");
    wait_call(&layout.helper_socket(), "priv.ping");
    let sock = layout.daemon_socket();

    for _ in 0..100 {
        client::call(&sock, "ping", json!({})).expect("ping");
    }
    let mut samples: Vec<f64> = (0..1000)
        .map(|_| {
            let t = Instant::now();
            client::call(&sock, "ping", json!({})).expect("ping");
            t.elapsed().as_secs_f64() * 1000.0
        })
        .collect();
    samples.sort_by(|a, b| a.total_cmp(b));
    println!(
        "ping round trip: median {:.3} ms, p99 {:.3} ms (1000 calls)",
        samples[500], samples[990]
    );

    let per_client = 2000;
    let t = Instant::now();
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let sock = sock.clone();
            std::thread::spawn(move || {
                for _ in 0..per_client {
                    client::call(&sock, "ping", json!({})).expect("ping");
                }
            })
        })
        .collect();
    for th in threads {
        th.join().expect("client thread");
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "throughput: {:.0} RPC/s with 8 concurrent clients ({} calls in {secs:.2}s)",
        (8 * per_client) as f64 / secs,
        8 * per_client
    );

    std::thread::sleep(Duration::from_millis(500));
    println!(
        "idle RSS: bangerd {} KiB, bangerd-root {} KiB",
        rss_kib(d.id()),
        rss_kib(h.id())
    );
    let _ = d.kill();
    let _ = h.kill();
    let _ = d.wait();
    let _ = h.wait();
    let _ = std::fs::remove_dir_all(&root);
}
