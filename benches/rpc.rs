//! RPC and footprint benchmark (not a test): starts bangerd and bangerd-root under a temp layout,
//! measures the `ping` round trip (median/p99 of 1,000), RPCs/s with 8 concurrent clients, and the
//! idle RSS of both. Run with `cargo bench --bench rpc` (or scripts/bench.sh).

mod common;

use banger::rpc::client;
use common::{rss_kib, Host};
use serde_json::json;
use std::time::{Duration, Instant};

fn main() {
    let mut host = Host::new("bench", &[]);
    let d = host.start("bangerd");
    let h = host.start("bangerd-root");
    let sock = host.layout.daemon_socket();

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
        rss_kib(d),
        rss_kib(h)
    );
}
