//! Firecracker VMMs: API client, process launch/find/reap, guest images.

pub mod identity;
pub mod launch;
