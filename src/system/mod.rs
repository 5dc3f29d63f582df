//! The installed system: install.toml, systemd units, service control, install/uninstall, doctor.
//!
//! Owns everything `sudo banger system …` and `banger doctor` do to (or read from) the host. Every
//! path comes from a [`crate::layout::Layout`]; systemd is reached only through the
//! [`service::ServiceManager`] seam, so the whole install/uninstall story runs in unit tests against a
//! temp root and [`service::FakeServices`]. It never checks for root: that is the CLI's job.

pub mod completions;
pub mod doctor;
mod fsutil;
pub mod install;
pub mod install_toml;
pub mod service;
pub mod units;
pub mod users;

#[cfg(test)]
pub(crate) mod testutil;
