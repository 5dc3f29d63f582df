//! `banger-vsock-agent`: the in-guest agent. At start it prepares the guest from the kernel command
//! line ([`crate::agent::cmdline`], [`crate::agent::prepare`]: hostname, root's authorized key, sshd
//! host keys), then listens on AF_VSOCK port 52 (any CID) and answers banger's line protocol
//! ([`crate::agent`]): hello, ports, health, boot_id, uname, and reconfigure (a guest restored
//! from a snapshot told its new name, address, MAC and key; [`crate::agent::reconfigure`]). One
//! thread per connection. systemd
//! hears READY=1 once the preparation is done and the socket listens (the unit is Type=notify and
//! ordered before sshd, so sshd starts with host keys).
//!
//! With `banger.agent_tcp=PORT` on the kernel command line it also serves on TCP PORT: a test-only
//! transport for the stand-in's QEMU engine, which has no vsock device and reaches the guest
//! through its tap instead (a missing vsock device is then not fatal). A `reconfigure` arriving
//! over TCP removes eth0's old address only after its answer is written (the answer leaves
//! through that address).
//!
//! It runs as root inside the guest and answers only fixed questions: it executes nothing a
//! request names. `--root`, `--cmdline`, `--proc`, `--iface` and `--unix` exist for tests: with a
//! root other than `/` the kernel hostname is left alone, and no interface is reconfigured unless
//! `--iface` names one.

use crate::agent::prepare::{self, HostnameSetter, KernelHostname};
use crate::agent::{self, cmdline, AgentEnv, Source, AGENT_VSOCK_PORT};
use argh::FromArgs;
use std::fs::File;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

const ROLE: &str = "banger-vsock-agent";

#[derive(FromArgs)]
/// banger's guest agent: prepares the guest from the kernel command line (banger.name=,
/// banger.key=), then answers the host over vsock (hello, ports, health, boot_id, uname,
/// reconfigure). Runs
/// inside a VM, started by banger-vsock-agent.service; it is the same static binary as banger.
struct Args {
    /// vsock port to listen on (default 52)
    #[argh(option, default = "AGENT_VSOCK_PORT")]
    port: u32,
    /// listen on this Unix socket instead of vsock (tests)
    #[argh(option)]
    unix: Option<PathBuf>,
    /// the guest's root directory (default /; another root leaves the kernel hostname alone)
    #[argh(option, default = "PathBuf::from(\"/\")")]
    root: PathBuf,
    /// the kernel command line file (default /proc/cmdline)
    #[argh(option, default = "PathBuf::from(cmdline::CMDLINE_PATH)")]
    cmdline: PathBuf,
    /// the proc directory (default /proc)
    #[argh(option, default = "PathBuf::from(\"/proc\")")]
    proc: PathBuf,
    /// the interface reconfigure changes (default eth0 with root /, none otherwise: tests run
    /// the agent in a network namespace of their own and name its interface)
    #[argh(option)]
    iface: Option<String>,
    /// print the version and exit
    #[argh(switch)]
    version: bool,
}

/// With a root other than `/` (tests), the kernel's hostname is not the guest's to change.
struct NotTheKernel;

impl HostnameSetter for NotTheKernel {
    fn set(&self, _name: &str) -> std::io::Result<()> {
        Ok(())
    }
}

/// A socket the agent serves on.
enum Listener {
    Vsock(OwnedFd),
    Unix(std::os::unix::net::UnixListener),
    Tcp(std::net::TcpListener),
}

impl Listener {
    fn accept(&self) -> std::io::Result<File> {
        match self {
            Listener::Vsock(l) => accept(l).map(File::from),
            Listener::Unix(l) => l.accept().map(|(s, _)| File::from(OwnedFd::from(s))),
            Listener::Tcp(l) => l.accept().map(|(s, _)| File::from(OwnedFd::from(s))),
        }
    }
}

/// Entry point of the agent role.
pub fn main(args: Vec<String>) -> i32 {
    let mut a: Args = match super::parse_args(&args) {
        Ok(a) => a,
        Err(code) => return code,
    };
    if a.version {
        return super::print_version();
    }
    for p in [&mut a.root, &mut a.cmdline, &mut a.proc] {
        match std::path::absolute(&*p) {
            Ok(abs) => *p = abs,
            Err(e) => {
                eprintln!("{ROLE}: using {}: {e} (pass an absolute path)", p.display());
                return 2;
            }
        }
    }
    let in_guest = a.root == Path::new("/");
    let (env, agent_tcp) = prepare_guest(&a, in_guest);
    let listeners = match open_listeners(&a, agent_tcp) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("{ROLE}: {e}");
            return 1;
        }
    };
    if let Err(e) = crate::sdnotify::notify("READY=1") {
        crate::logging::error(
            ROLE,
            "sd_notify failed",
            serde_json::json!({"error": e.to_string()}),
        );
    }
    let threads: Vec<_> = listeners
        .into_iter()
        .map(|l| {
            // Clones share the instance id; only the TCP transport rides eth0.
            let env = std::sync::Arc::new(AgentEnv {
                defer_address_removal: matches!(l, Listener::Tcp(_)),
                ..env.clone()
            });
            std::thread::spawn(move || serve(l, env))
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
    1
}

/// The sockets to serve on: `--unix` alone (tests), else vsock plus TCP when the command line
/// asks for it (the stand-in's QEMU engine). Fails only when there is none at all.
fn open_listeners(a: &Args, agent_tcp: Option<u16>) -> Result<Vec<Listener>, String> {
    if let Some(p) = &a.unix {
        let l = std::os::unix::net::UnixListener::bind(p)
            .map_err(|e| format!("listening on {}: {e}", p.display()))?;
        crate::logging::info(ROLE, "listening", serde_json::json!({"unix": p}));
        return Ok(vec![Listener::Unix(l)]);
    }
    let mut out = Vec::new();
    let mut errors = Vec::new();
    match listen(a.port) {
        Ok(l) => {
            crate::logging::info(ROLE, "listening", serde_json::json!({"vsock_port": a.port}));
            out.push(Listener::Vsock(l));
        }
        Err(e) => errors.push(format!(
            "listening on vsock port {}: {e} (is this a VM with a vsock device? the agent runs only inside banger guests)",
            a.port
        )),
    }
    if let Some(port) = agent_tcp {
        match std::net::TcpListener::bind((std::net::Ipv4Addr::UNSPECIFIED, port)) {
            Ok(l) => {
                crate::logging::info(ROLE, "listening", serde_json::json!({"tcp_port": port}));
                out.push(Listener::Tcp(l));
            }
            Err(e) => errors.push(format!(
                "listening on TCP port {port} (banger.agent_tcp): {e}"
            )),
        }
    }
    if out.is_empty() {
        return Err(errors.join("; "));
    }
    for e in errors {
        crate::logging::error(ROLE, "listener", serde_json::json!({"error": e}));
    }
    Ok(out)
}

/// Accepts on `l` forever, one thread per connection.
fn serve(l: Listener, env: std::sync::Arc<AgentEnv>) {
    loop {
        match l.accept() {
            Ok(conn) => {
                let env = env.clone();
                std::thread::spawn(move || {
                    let _ = agent::serve_connection(conn, &env);
                });
            }
            Err(e) => {
                crate::logging::error(
                    ROLE,
                    "accept failed",
                    serde_json::json!({"error": e.to_string()}),
                );
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        }
    }
}

/// Reads the command line, prepares the guest, logs what happened, and returns what the handler
/// serves from and the test-only TCP port the command line asked for.
fn prepare_guest(a: &Args, in_guest: bool) -> (AgentEnv, Option<u16>) {
    let cfg = match cmdline::read(&a.cmdline) {
        Ok(c) => c,
        Err(e) => cmdline::GuestConfig {
            problems: vec![e.to_string()],
            ..Default::default()
        },
    };
    let opts = prepare::Options {
        root: a.root.clone(),
        owner: (rustix::process::geteuid().is_root()).then_some((0, 0)),
        ..prepare::Options::guest()
    };
    let setter: &dyn HostnameSetter = if in_guest {
        &KernelHostname
    } else {
        &NotTheKernel
    };
    let report = prepare::prepare(&cfg, &opts, setter);
    crate::logging::info(
        ROLE,
        "prepared",
        serde_json::json!({
            "hostname": report.hostname,
            "authorized_key": report.authorized_key,
            "generated_host_keys": report.generated,
        }),
    );
    for p in &report.problems {
        crate::logging::error(ROLE, "preparation", serde_json::json!({"problem": p}));
    }
    let env = AgentEnv {
        boot_id: Source::File(a.proc.join("sys/kernel/random/boot_id")),
        host_key: Source::File(a.root.join(agent::HOST_KEY_PUB)),
        hostname: Source::File(if in_guest {
            a.proc.join("sys/kernel/hostname")
        } else {
            a.root.join("etc/hostname")
        }),
        proc_dir: Some(a.proc.clone()),
        problems: report.problems,
        instance_id: std::sync::Arc::new(std::sync::Mutex::new(
            agent::reconfigure::new_instance_id(),
        )),
        configurer: std::sync::Arc::new(agent::reconfigure::System {
            files: opts,
            kernel_hostname: in_guest,
            ip: std::path::PathBuf::from("ip"),
            iface: a
                .iface
                .clone()
                .or_else(|| in_guest.then(|| agent::reconfigure::GUEST_IFACE.to_string())),
            ipv4_conf: a.proc.join("sys/net/ipv4/conf"),
        }),
        defer_address_removal: false,
    };
    (env, cfg.agent_tcp)
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
