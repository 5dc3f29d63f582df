//! Building guest root filesystems (`banger image build`): the debootstrap cache, the
//! customisation that makes a Debian tree a banger guest, the ext4 maker, and the flow that runs
//! them in a private scratch directory.
//!
//! Runs as root on the host, only under the `Layout`'s cache directory; it talks to no daemon
//! (the CLI imports the result) and never touches a cached tree in place.

pub mod build;
pub mod customize;
pub mod debootstrap;
pub mod ext4;
pub mod mirror;
pub mod progress;

/// True when `tool` is an executable on `PATH`.
pub fn have(tool: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|paths| {
        std::env::split_paths(&paths).any(|d| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::metadata(d.join(tool))
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    })
}
