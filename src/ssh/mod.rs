//! Entering a guest over SSH (DESIGN §11): banger's own key, its own known_hosts with each guest's
//! pinned host key, the generated ssh config, the fenced `Include` in the user's `~/.ssh/config`, and
//! the `ssh` argument vector the CLI runs.
//!
//! Everything lives under the [`Layout`](crate::layout::Layout)'s `ssh_dir()`; the user's own
//! `~/.ssh/known_hosts` is never read or written, and `~/.ssh/config` only ever gains or loses
//! banger's fence. Nothing here trusts a host key on first use: keys are pinned from what the guest
//! agent reports over vsock, before any connection.

pub mod command;
mod files;
pub mod include;
pub mod keys;
pub mod known_hosts;
pub mod pubkey;
pub mod ssh_config;

pub use keys::OwnerKey;
pub use pubkey::PublicKey;

/// The DNS-like name a VM answers to in banger's ssh config and known_hosts: `<name>.vm`.
pub fn host_alias(vm_name: &str) -> String {
    format!("{vm_name}.vm")
}
