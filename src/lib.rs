//! banger: one-command development sandboxes on Firecracker microVMs, with a signed self-updater.
//!
//! One binary plays four roles (see [`applets`]); the library modules below know nothing about argv.
#![warn(missing_docs)]

pub mod agent;
pub mod applets;
pub mod buildinfo;
pub mod cli;
pub mod clock;
pub mod daemon;
pub mod error;
pub mod guest;
pub mod helper;
pub mod layout;
pub mod logging;
pub mod net;
pub mod rpc;
pub mod sdnotify;
pub mod ssh;
pub mod store;
pub mod system;
pub mod termsafe;
pub mod update;
pub mod vmm;

#[cfg(test)]
mod proptests;
