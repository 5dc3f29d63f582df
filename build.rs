//! Stamps banger's build identity (version, git commit, build time) into the binary.
//!
//! - version: `BANGER_VERSION` if set (the release builder sets it), else Cargo's package version.
//! - commit: `BANGER_COMMIT` if set, else `git rev-parse HEAD`, else "unknown".
//! - built_at: `SOURCE_DATE_EPOCH` if set (reproducible builds), else now; RFC 3339 UTC.
use std::process::Command;

// The same RFC 3339 formatter the binary uses, compiled into the build script.
#[path = "src/clock.rs"]
#[allow(dead_code)]
mod clock;

fn main() {
    println!("cargo:rerun-if-env-changed=BANGER_VERSION");
    println!("cargo:rerun-if-env-changed=BANGER_COMMIT");
    println!("cargo:rerun-if-env-changed=SOURCE_DATE_EPOCH");
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/refs/heads");
    println!("cargo:rerun-if-changed=src/clock.rs");

    let version = std::env::var("BANGER_VERSION")
        .ok()
        .filter(|v| !v.trim().is_empty())
        .map(|v| v.trim().trim_start_matches('v').to_string())
        .unwrap_or_else(|| std::env::var("CARGO_PKG_VERSION").unwrap_or_else(|_| "0.0.0".into()));
    let commit = std::env::var("BANGER_COMMIT")
        .ok()
        .filter(|c| !c.trim().is_empty())
        .or_else(git_commit)
        .unwrap_or_else(|| "unknown".into());
    let epoch = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.trim().parse::<i64>().ok())
        .unwrap_or_else(clock::now_epoch);
    println!("cargo:rustc-env=BANGER_BUILD_VERSION={version}");
    println!("cargo:rustc-env=BANGER_BUILD_COMMIT={commit}");
    println!(
        "cargo:rustc-env=BANGER_BUILD_TIME={}",
        clock::rfc3339(epoch)
    );
}

fn git_commit() -> Option<String> {
    let out = Command::new("git")
        .args(["rev-parse", "HEAD"])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!s.is_empty()).then_some(s)
}
