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
    let env = std::sync::Arc::new(AgentEnv::default());
    let tcp = std::fs::read_to_string(CMDLINE_PATH)
        .ok()
        .and_then(|c| agent_tcp_port(&c))
        .and_then(|port| serve_tcp(port, env.clone()));
    let listener = match listen(a.port) {
        Ok(l) => l,
        Err(e) => {
            eprintln!(
                "banger-vsock-agent: listening on vsock port {}: {e} (is this a VM with a vsock device? the agent runs only inside banger guests)",
                a.port
            );
            // A test guest without a vsock device (`banger.agent_tcp=`) still answers on TCP.
            if let Some(t) = tcp {
                let _ = t.join();
            }
            return 1;
        }
    };
    crate::logging::info(
        "banger-vsock-agent",
        "listening",
        serde_json::json!({"port": a.port}),
    );
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

/// Where the kernel command line is read from.
const CMDLINE_PATH: &str = "/proc/cmdline";

/// The kernel argument that makes the agent also listen on TCP: test guests only, where the
/// stand-in VMM maps Firecracker's vsock onto the guest's TCP port (DESIGN §13).
pub const AGENT_TCP_ARG: &str = "banger.agent_tcp";

/// The TCP port from `banger.agent_tcp=<port>` on the kernel command line (last one wins, as the
/// kernel does; arguments after `--` belong to init); `None` without one or for a bad port.
pub fn agent_tcp_port(cmdline: &str) -> Option<u16> {
    cmdline
        .split_ascii_whitespace()
        .take_while(|a| *a != "--")
        .filter_map(|a| {
            a.trim_matches('"')
                .strip_prefix(AGENT_TCP_ARG)?
                .strip_prefix('=')
        })
        .last()
        .and_then(|p| p.parse::<u16>().ok())
        .filter(|p| *p != 0)
}

/// Serves the agent protocol on TCP `port` (all IPv4 addresses) in a thread; `None` (logged) when
/// the port cannot be bound.
fn serve_tcp(port: u16, env: std::sync::Arc<AgentEnv>) -> Option<std::thread::JoinHandle<()>> {
    let l = match std::net::TcpListener::bind((std::net::Ipv4Addr::UNSPECIFIED, port)) {
        Ok(l) => l,
        Err(e) => {
            crate::logging::error(
                "banger-vsock-agent",
                "tcp listen failed",
                serde_json::json!({"port": port, "error": e.to_string()}),
            );
            return None;
        }
    };
    crate::logging::info(
        "banger-vsock-agent",
        "listening",
        serde_json::json!({"tcp_port": port}),
    );
    Some(std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(conn) = conn else { continue };
            let env = env.clone();
            std::thread::spawn(move || {
                let _ = agent::serve_connection(conn, &env);
            });
        }
    }))
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

#[cfg(test)]
mod tests {
    use super::agent_tcp_port;

    #[test]
    fn agent_tcp_port_table() {
        let cases: &[(&str, Option<u16>)] = &[
            ("console=ttyS0 banger.agent_tcp=52", Some(52)),
            (
                "banger.agent_tcp=52 quiet banger.agent_tcp=5252",
                Some(5252),
            ),
            ("\"banger.agent_tcp=52\"", Some(52)),
            ("console=ttyS0", None),
            ("banger.agent_tcp=", None),
            ("banger.agent_tcp=0", None),
            ("banger.agent_tcp=70000", None),
            ("banger.agent_tcp=x52", None),
            ("banger.agent_tcpx=52", None),
            ("xbanger.agent_tcp=52", None),
            ("quiet -- banger.agent_tcp=52", None),
            ("", None),
        ];
        for (cmdline, want) in cases {
            assert_eq!(agent_tcp_port(cmdline), *want, "{cmdline:?}");
        }
    }
}
