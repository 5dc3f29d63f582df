//! Guest networking: config, address plan, names; helper-side plumbing.
//!
//! [`config`] reads and validates `[network]` of `/etc/banger/config.toml` (bridge name, subnet)
//! and owns the address arithmetic; [`names`] derives every per-VM name (tap, MAC, kernel `ip=`
//! argument) from the VM id alone, so the daemon and the helper always agree without passing names
//! around. Neither module touches the host: the kernel objects are the helper's business.

pub mod config;
pub mod names;

pub use config::{check_bridge_name, NetConfig, Subnet, DEFAULT_BRIDGE, DEFAULT_SUBNET};
pub use names::{kernel_ip_arg, mac_for, tap_name};
