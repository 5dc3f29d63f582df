//! Firecracker VMMs: API client, process launch/find/reap, guest images.
//!
//! - [`api`]/[`models`]: the HTTP client for one VM's API socket and the typed API bodies (shared
//!   with the test stand-in VMM).
//! - [`identity`]: who a running VMM is (pid + start time + comm) and `handles.json`.
//! - [`launch`]: starting a VMM detached (the root helper's job), signalling and cleaning up.
//! - [`scope`]: registering a held VMM as its own transient systemd scope over D-Bus.
//! - [`disk`]: per-VM copy-on-write root filesystems.

pub mod api;
pub mod disk;
pub mod identity;
pub mod launch;
pub mod models;
pub mod scope;
