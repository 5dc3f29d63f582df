//! Guest networking: config, address plan, names; helper-side plumbing.
//!
//! [`config`] reads and validates `[network]` of `/etc/banger/config.toml` (bridge name, subnet)
//! and owns the address arithmetic; [`names`] derives every per-VM name (tap, MAC, kernel `ip=`
//! argument) from the VM id alone, so the daemon and the helper always agree without passing names
//! around. Neither module touches the host.
//!
//! The helper-side plumbing ([`plumb`], over [`rtnl`], [`tap`], [`nft`], [`nfnl`], [`forward`] and [`cmd`];
//! [`link`] reads iproute2's JSON for doctor and tests)
//! owns the kernel objects: the bridge, one persistent tap per running VM, the nftables table
//! `inet banger` and `net.ipv4.ip_forward`. Only the root helper (and uninstall, as root) calls
//! it; it must never touch an interface or table that is not banger's.

pub mod cmd;
pub mod config;
pub mod forward;
pub mod link;
pub mod names;
pub mod nfnl;
pub mod nft;
pub mod plumb;
pub mod rtnl;
pub mod tap;

pub use config::{check_bridge_name, NetConfig, Subnet, DEFAULT_BRIDGE, DEFAULT_SUBNET};
pub use names::{kernel_ip_arg, mac_for, tap_name};
