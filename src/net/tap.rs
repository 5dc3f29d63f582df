//! Creates a persistent tap owned by a given uid with the tun ioctls — the same open Firecracker
//! does (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`), so the VMM can attach to it.
//!
//! The owner is set BEFORE the tap is made persistent, on the same fd: if either step fails, the
//! fd is closed and the kernel removes the (non-persistent) device, so an ownerless persistent tap
//! (which any local user who can open /dev/net/tun could attach to) can never be left behind.

use crate::error::{Error, Result};
use std::os::fd::AsRawFd;

/// The tun clone device (a kernel path, not a banger one).
pub const TUN_DEVICE: &str = "/dev/net/tun";

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
const TUNSETOWNER: libc::c_ulong = 0x4004_54cc;
/// Firecracker's open flags.
pub const IFF_TAP: i16 = 0x0002;
/// No packet information header.
pub const IFF_NO_PI: i16 = 0x1000;
/// virtio-net header (Firecracker needs it).
pub const IFF_VNET_HDR: i16 = 0x4000;
/// Create only: fail if the name exists (0x8000).
const IFF_TUN_EXCL: i16 = i16::MIN;

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: i16,
    _pad: [u8; 22],
}

fn ifreq(name: &str, flags: i16) -> Result<IfReq> {
    let b = name.as_bytes();
    if b.is_empty() || b.len() >= libc::IFNAMSIZ {
        return Err(Error::new(
            format!("tap name `{name}`"),
            "must be 1-15 bytes",
        ));
    }
    let mut r = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags,
        _pad: [0; 22],
    };
    r.name[..b.len()].copy_from_slice(b);
    Ok(r)
}

/// Opens `name` the way Firecracker does; fails like it would (e.g. when the caller does not own
/// the tap). Returns the open fd (the tap stays attached while it is open).
pub fn open_like_firecracker(name: &str) -> Result<std::fs::File> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(TUN_DEVICE)
        .map_err(|e| Error::new(format!("opening {TUN_DEVICE}"), e))?;
    let mut req = ifreq(name, IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)?;
    // SAFETY: TUNSETIFF reads and writes a `struct ifreq` (40 bytes) we own for the whole call.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) };
    if rc < 0 {
        return Err(Error::new(
            format!("attaching to tap {name} (TUNSETIFF)"),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(f)
}

/// Creates the persistent tap `name` owned by `uid`; fails if it already exists.
pub fn create_persistent(name: &str, uid: u32) -> Result<()> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(TUN_DEVICE)
        .map_err(|e| {
            Error::new(format!("opening {TUN_DEVICE}"), e)
                .hint("load the tun module (modprobe tun)")
        })?;
    let fd = f.as_raw_fd();
    let mut req = ifreq(name, IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | IFF_TUN_EXCL)?;
    // SAFETY: TUNSETIFF reads and writes a `struct ifreq` (40 bytes) we own for the whole call.
    if unsafe { libc::ioctl(fd, TUNSETIFF, &mut req as *mut IfReq) } < 0 {
        return Err(Error::new(
            format!("creating tap {name} (TUNSETIFF)"),
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: TUNSETOWNER and TUNSETPERSIST take an integer argument, no pointer.
    if unsafe { libc::ioctl(fd, TUNSETOWNER, libc::c_ulong::from(uid)) } < 0 {
        return Err(Error::new(
            format!("setting the owner of tap {name} to uid {uid} (TUNSETOWNER)"),
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: as above.
    if unsafe { libc::ioctl(fd, TUNSETPERSIST, 1 as libc::c_ulong) } < 0 {
        return Err(Error::new(
            format!("making tap {name} persistent (TUNSETPERSIST)"),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}
