//! `banger-vsock-agent`: the in-guest agent. Listens on AF_VSOCK port 52 (any CID) and answers
//! banger's line protocol ([`crate::agent`]): health, boot_id, uname. One thread per connection.
//!
//! It runs as root inside the guest and answers only fixed questions: it executes nothing.

use crate::agent::{self, AgentEnv, AGENT_VSOCK_PORT};
use argh::FromArgs;
use std::fs::File;
use std::os::fd::{FromRawFd, OwnedFd};

#[derive(FromArgs)]
/// banger's guest agent: answers the host over vsock (readiness, boot_id, uname). Runs inside a
/// VM, started by the guest's init; it is the same static binary as banger.
struct Args {
    /// vsock port to listen on (default 52)
    #[argh(option, default = "AGENT_VSOCK_PORT")]
    port: u32,
    /// print the version and exit
    #[argh(switch)]
    version: bool,
}

/// Entry point of the agent role.
pub fn main(args: Vec<String>) -> i32 {
    let a: Args = match super::parse_args(&args) {
        Ok(a) => a,
        Err(code) => return code,
    };
    if a.version {
        return super::print_version();
    }
    let listener = match listen(a.port) {
        Ok(l) => l,
        Err(e) => {
            eprintln!(
                "banger-vsock-agent: listening on vsock port {}: {e} (is this a VM with a vsock device? the agent runs only inside banger guests)",
                a.port
            );
            return 1;
        }
    };
    crate::logging::info(
        "banger-vsock-agent",
        "listening",
        serde_json::json!({"port": a.port}),
    );
    let env = std::sync::Arc::new(AgentEnv::default());
    loop {
        match accept(&listener) {
            Ok(conn) => {
                let env = env.clone();
                std::thread::spawn(move || {
                    let _ = agent::serve_connection(File::from(conn), &env);
                });
            }
            Err(e) => {
                crate::logging::error(
                    "banger-vsock-agent",
                    "accept failed",
                    serde_json::json!({"error": e.to_string()}),
                );
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        }
    }
}

/// A listening AF_VSOCK stream socket on `port`, any CID.
fn listen(port: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a freshly created, valid descriptor that nothing else owns.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_vm is plain old data; all-zero is a valid starting value.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_port = port;
    addr.svm_cid = libc::VMADDR_CID_ANY;
    // SAFETY: `addr` is a valid sockaddr_vm and the length passed is its exact size.
    let rc = unsafe {
        libc::bind(
            fd,
            std::ptr::addr_of!(addr).cast::<libc::sockaddr>(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a bound socket owned by `owned`.
    if unsafe { libc::listen(fd, 16) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(owned)
}

fn accept(listener: &OwnedFd) -> std::io::Result<OwnedFd> {
    use std::os::fd::AsRawFd;
    // SAFETY: accepting on a valid listening socket; null address pointers are allowed.
    let fd = unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a freshly accepted descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}
