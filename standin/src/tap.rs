//! The stand-in's tap: opens a named, existing tap device the way Firecracker's virtio-net device
//! does (`/dev/net/tun`, `TUNSETIFF` with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, then
//! `TUNSETVNETHDRSZ`), and keeps the descriptor for as long as the VM holds it. Failures carry
//! Firecracker's error text, so a tap its owner cannot open fails here as it would in production.
//!
//! It must never create or change an interface: Firecracker run by root would create a transient
//! tap for a missing name; banger runs Firecracker as the owner, who cannot, so the stand-in answers
//! a missing name as the owner's Firecracker does (EPERM) whoever runs it, and tests running as
//! root never leave an interface in a namespace they did not make.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Where Firecracker opens the tun/tap clone device.
pub const TUN_PATH: &str = "/dev/net/tun";

/// `IFNAMSIZ`: names are at most 15 bytes plus the NUL.
const IFACE_NAME_MAX_LEN: usize = 16;

/// `sizeof(struct virtio_net_hdr_v1)`, what Firecracker sets with `TUNSETVNETHDRSZ`.
const VNET_HDR_LEN: libc::c_int = 12;

/// Why a tap could not be opened, displayed as Firecracker's `TapError` (wrapped by the caller in
/// Firecracker's `NetError` text).
#[derive(Debug)]
pub enum TapError {
    /// `/dev/net/tun` could not be opened.
    OpenTun(io::Error),
    /// The name does not fit `IFNAMSIZ`.
    InvalidIfname,
    /// `TUNSETIFF` failed (no such tap and not allowed to create one, not its owner, busy, not a tap).
    IfreqExecute(io::Error, String),
    /// `TUNSETVNETHDRSZ` failed.
    SetSizeOfVnetHdr(io::Error),
}

impl std::fmt::Display for TapError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TapError::OpenTun(e) => write!(f, "Couldn't open /dev/net/tun: {e}"),
            TapError::InvalidIfname => write!(f, "Invalid interface name"),
            TapError::IfreqExecute(e, name) => write!(
                f,
                "Error while creating ifreq structure: {e}. Invalid TUN/TAP Backend provided by {name}. Check our documentation on setting up the network devices."
            ),
            TapError::SetSizeOfVnetHdr(e) => {
                write!(f, "Error while setting size of the vnet header: {e}")
            }
        }
    }
}

impl TapError {
    /// The `NetError` Firecracker wraps this in (`TapOpen` for all but the header size).
    pub fn net_error(&self) -> String {
        match self {
            TapError::SetSizeOfVnetHdr(_) => format!("Setting vnet header size failed: {self}"),
            _ => format!("Open tap device failed: {self}"),
        }
    }
}

/// An open tap: the queue is attached to the device until this is dropped.
#[derive(Debug)]
pub struct Tap {
    /// Held, never read: the stand-in moves no packets, but the open queue is what makes the tap
    /// busy and its carrier up, as under Firecracker. (The TCG engine hands it to QEMU, which
    /// does move the guest's packets through it.)
    _queue: File,
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self._queue.as_raw_fd()
    }
}

impl Tap {
    /// Opens the existing tap `name` through Firecracker's clone device.
    pub fn open_named(name: &str) -> Result<Tap, TapError> {
        Tap::open_named_via(Path::new(TUN_PATH), name)
    }

    /// [`Tap::open_named`] through the tun clone device node at `tun` (tests use a node of their own
    /// with the mode they need; production always uses [`TUN_PATH`]).
    pub fn open_named_via(tun: &Path, name: &str) -> Result<Tap, TapError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(tun)
            .map_err(TapError::OpenTun)?;
        if name.len() >= IFACE_NAME_MAX_LEN {
            return Err(TapError::InvalidIfname);
        }
        let Ok(cname) = CString::new(name) else {
            return Err(TapError::InvalidIfname);
        };
        // Never create (see the module doc): a name with no interface in this network namespace is
        // refused with the error the owner's Firecracker gets from the kernel.
        // SAFETY: `cname` is a valid NUL-terminated string; if_nametoindex only reads it.
        if unsafe { libc::if_nametoindex(cname.as_ptr()) } == 0 {
            return Err(TapError::IfreqExecute(
                io::Error::from_raw_os_error(libc::EPERM),
                name.to_string(),
            ));
        }
        // SAFETY: ifreq is plain old data; all zeroes is a valid value.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
            *dst = src as libc::c_char;
        }
        req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as i16;
        // SAFETY: `file` is an open tun descriptor and `req` a valid ifreq the kernel reads and
        // writes within its size; the result is checked.
        if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) } < 0 {
            return Err(TapError::IfreqExecute(
                io::Error::last_os_error(),
                name.to_string(),
            ));
        }
        let size = VNET_HDR_LEN;
        // SAFETY: `file` is now attached to the tap; the kernel reads one c_int from `size`.
        if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &size) } < 0 {
            return Err(TapError::SetSizeOfVnetHdr(io::Error::last_os_error()));
        }
        Ok(Tap { _queue: file })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::process::Command;

    /// The unprivileged uid the opening thread runs as (taps "owned by another uid" use 4242).
    const OWNER_UID: u32 = 65534;

    fn skip(test: &str, why: &str) {
        eprintln!("SKIP: {test}: {why}");
    }

    fn sh(args: &[&str]) -> Result<(), String> {
        let out = Command::new(args[0])
            .args(&args[1..])
            .output()
            .map_err(|e| format!("{}: {e}", args.join(" ")))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// Interface names in the calling thread's network namespace.
    pub(crate) fn link_names() -> Vec<String> {
        Command::new("ip")
            .args(["-o", "link", "show"])
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .filter_map(|l| l.split(": ").nth(1))
                    .map(|n| n.split('@').next().unwrap_or(n).to_string())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Runs `f` on a thread of its own in a fresh network namespace (only that thread's: the rest
    /// of the test process stays where it was), after `setup` commands run there as root. `f`
    /// gets a private 0666 tun node path. Err is a reason to skip.
    pub(crate) fn in_netns<T: Send + 'static>(
        tag: &str,
        setup: &'static [&'static [&'static str]],
        f: impl FnOnce(&Path) -> T + Send + 'static,
    ) -> Result<T, String> {
        in_netns_as(tag, setup, Some(OWNER_UID), f)
    }

    /// [`in_netns`], staying root when `uid` is None.
    pub(crate) fn in_netns_as<T: Send + 'static>(
        tag: &str,
        setup: &'static [&'static [&'static str]],
        uid: Option<u32>,
        f: impl FnOnce(&Path) -> T + Send + 'static,
    ) -> Result<T, String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("needs root (a network namespace and a tun node of its own)".into());
        }
        if !Path::new(TUN_PATH).exists() {
            return Err(format!("{TUN_PATH} is missing (no tun driver)"));
        }
        let dir = std::env::temp_dir().join(format!("fc-standin-tap-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let node = dir.join("tun");
        let h = std::thread::spawn(move || -> Result<T, String> {
            // SAFETY: unshare(CLONE_NEWNET) moves only the calling thread into a new namespace.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(format!(
                    "unshare(CLONE_NEWNET): {}",
                    io::Error::last_os_error()
                ));
            }
            // Children inherit this thread's namespace.
            for cmd in setup {
                sh(cmd)?;
            }
            let c = CString::new(node.as_os_str().as_encoded_bytes()).map_err(|e| e.to_string())?;
            // SAFETY: `c` is a valid path; mknod creates a char node of the tun device (10:200).
            if unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(10, 200)) }
                != 0
            {
                return Err(format!(
                    "mknod {}: {} (a nodev filesystem?)",
                    node.display(),
                    io::Error::last_os_error()
                ));
            }
            // SAFETY: chmod on our own node, overriding the umask.
            unsafe { libc::chmod(c.as_ptr(), 0o666) };
            // Drop to the owner uid on this thread only (raw syscalls: glibc's setresuid would
            // change every thread of the test process). The effective capabilities go with it.
            if let Some(uid) = uid {
                // SAFETY: plain syscalls on the calling thread's credentials.
                let dropped = unsafe {
                    libc::syscall(libc::SYS_setresgid, uid, uid, uid) == 0
                        && libc::syscall(libc::SYS_setresuid, uid, uid, uid) == 0
                };
                if !dropped {
                    return Err(format!(
                        "dropping to uid {uid}: {}",
                        io::Error::last_os_error()
                    ));
                }
            }
            Ok(f(&node))
        });
        let r = h
            .join()
            .map_err(|_| "the namespace thread panicked".to_string());
        let _ = std::fs::remove_dir_all(&dir);
        r?
    }

    fn err_text(r: Result<Tap, TapError>) -> String {
        match r {
            Ok(_) => "opening it succeeded".to_string(),
            Err(e) => e.net_error(),
        }
    }

    #[test]
    fn opens_an_owned_tap_and_holds_it() {
        const SETUP: &[&[&str]] = &[&[
            "ip", "tuntap", "add", "dev", "bgr-own", "mode", "tap", "user", "65534",
        ]];
        let r = in_netns("own", SETUP, |tun| {
            let tap = Tap::open_named_via(tun, "bgr-own");
            let busy = err_text(Tap::open_named_via(tun, "bgr-own"));
            let held = tap.as_ref().map(|_| ()).map_err(|e| e.net_error());
            // Once the first descriptor is closed the tap can be opened again.
            drop(tap);
            let again = Tap::open_named_via(tun, "bgr-own")
                .map(|_| ())
                .map_err(|e| e.net_error());
            (held, busy, again)
        });
        let (held, busy, again) = match r {
            Ok(v) => v,
            Err(why) => return skip("opens_an_owned_tap_and_holds_it", &why),
        };
        assert_eq!(held, Ok(()), "the owner opens its own tap");
        assert_eq!(
            busy,
            "Open tap device failed: Error while creating ifreq structure: Device or resource busy (os error 16). Invalid TUN/TAP Backend provided by bgr-own. Check our documentation on setting up the network devices."
        );
        assert_eq!(
            again,
            Ok(()),
            "the tap opens again once the first queue is closed"
        );
    }

    #[test]
    fn refuses_what_the_owner_cannot_open() {
        const SETUP: &[&[&str]] = &[
            &[
                "ip",
                "tuntap",
                "add",
                "dev",
                "bgr-other",
                "mode",
                "tap",
                "user",
                "4242",
            ],
            &["ip", "link", "add", "bgr-br", "type", "bridge"],
        ];
        let r = in_netns("refuse", SETUP, |tun| {
            let other = err_text(Tap::open_named_via(tun, "bgr-other"));
            let missing = err_text(Tap::open_named_via(tun, "bgr-missing"));
            let bridge = err_text(Tap::open_named_via(tun, "bgr-br"));
            let long = err_text(Tap::open_named_via(tun, "bgr-0123456789ab"));
            let no_tun = err_text(Tap::open_named_via(
                Path::new("/nonexistent/tun"),
                "bgr-other",
            ));
            (other, missing, bridge, long, no_tun, link_names())
        });
        let (other, missing, bridge, long, no_tun, links) = match r {
            Ok(v) => v,
            Err(why) => return skip("refuses_what_the_owner_cannot_open", &why),
        };
        let fault = |errno: &str, name: &str| {
            format!("Open tap device failed: Error while creating ifreq structure: {errno}. Invalid TUN/TAP Backend provided by {name}. Check our documentation on setting up the network devices.")
        };
        assert_eq!(
            other,
            fault("Operation not permitted (os error 1)", "bgr-other")
        );
        assert_eq!(
            missing,
            fault("Operation not permitted (os error 1)", "bgr-missing")
        );
        assert_eq!(bridge, fault("Invalid argument (os error 22)", "bgr-br"));
        assert_eq!(long, "Open tap device failed: Invalid interface name");
        assert_eq!(
            no_tun,
            "Open tap device failed: Couldn't open /dev/net/tun: No such file or directory (os error 2)"
        );
        // Nothing was created by the refusals: the namespace holds lo and what the test made.
        let mut links = links;
        links.sort();
        assert_eq!(links, ["bgr-br", "bgr-other", "lo"]);
    }
}
