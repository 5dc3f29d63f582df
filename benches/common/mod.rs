//! Helpers shared by the benchmarks.
#![allow(dead_code)]

use banger::rpc::client;
use serde_json::json;
use std::path::Path;
use std::time::{Duration, Instant};

/// Resident set size of `pid` in KiB (0 if unknown).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Waits (bounded) until `method` answers on `sock`.
pub fn wait_call(sock: &Path, method: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while client::call(sock, method, json!({})).is_err() {
        assert!(
            Instant::now() < deadline,
            "{} never answered",
            sock.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}
