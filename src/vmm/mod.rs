//! Firecracker VMMs: API client, process launch/find/reap, guest images.
//!
//! So far: [`api`], the HTTP client for one VM's API socket, and [`models`], the typed API bodies
//! (shared with the test stand-in VMM, which parses requests with the very same types).

pub mod api;
pub mod models;
