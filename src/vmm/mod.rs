//! Firecracker VMMs: API client, process launch/find/reap, guest images.
//!
//! - [`api`]/[`models`]: the HTTP client for one VM's API socket and the typed API bodies (shared
//!   with the test stand-in VMM).
//! - [`disk`]: per-VM copy-on-write root filesystems.

pub mod api;
pub mod disk;
pub mod models;
