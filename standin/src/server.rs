//! The stand-in's process: the API socket (HTTP/1.1, keep-alive, Firecracker's payload limit), the
//! console line after boot, the vsock muxer's host-initiated handshake, and socket cleanup on exit.

use std::ffi::CString;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicPtr, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use banger::agent::{self, cmdline, AgentEnv};

use crate::cli::Options;
use crate::machine::{After, Answer, Machine, MAX_PAYLOAD};

/// Paths the signal handler unlinks (leaked C strings; null when unset).
static API_SOCK: AtomicPtr<libc::c_char> = AtomicPtr::new(std::ptr::null_mut());
static VSOCK_SOCK: AtomicPtr<libc::c_char> = AtomicPtr::new(std::ptr::null_mut());

fn remember(slot: &AtomicPtr<libc::c_char>, path: &Path) {
    if let Ok(c) = CString::new(path.as_os_str().as_bytes()) {
        // The previous string is leaked on purpose: a signal handler may be reading it.
        slot.store(c.into_raw(), Ordering::SeqCst);
    }
}

fn unlink_remembered() {
    for slot in [&API_SOCK, &VSOCK_SOCK] {
        let p = slot.load(Ordering::SeqCst);
        if !p.is_null() {
            // SAFETY: `p` came from `CString::into_raw` and is never freed, so it is a valid
            // NUL-terminated string; unlink(2) is async-signal-safe.
            unsafe { libc::unlink(p) };
        }
    }
}

extern "C" fn on_terminate(sig: libc::c_int) {
    unlink_remembered();
    // Die by the signal itself, as Firecracker (which does not catch SIGTERM) would.
    // SAFETY: signal(2) and raise(3) are async-signal-safe; restoring the default disposition
    // makes the raise terminate the process.
    unsafe {
        libc::signal(sig, libc::SIG_DFL);
        libc::raise(sig);
    }
}

fn install_signal_handlers() {
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        // SAFETY: `on_terminate` only calls async-signal-safe functions and reads atomics.
        unsafe {
            libc::signal(
                sig,
                on_terminate as extern "C" fn(libc::c_int) as libc::sighandler_t,
            )
        };
    }
}

pub(crate) fn exit_clean(code: i32) -> ! {
    unlink_remembered();
    let _ = std::io::stdout().flush();
    std::process::exit(code)
}

/// A fresh UUID-shaped boot id from the kernel's random pool.
fn fresh_boot_id() -> String {
    let mut b = [0u8; 16];
    let filled = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b));
    if filled.is_err() {
        // Still unique per process and moment, which is all a boot id must be here.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        b = (t ^ ((std::process::id() as u128) << 64)).to_le_bytes();
    }
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Binds the API socket and serves until the guest "reboots" or a signal ends the process.
pub fn run(opts: Options) -> Result<(), String> {
    let listener = UnixListener::bind(&opts.api_sock).map_err(|e| {
        format!(
            "Failed to open the API socket at {}: {e}. Check that it is not already used.",
            opts.api_sock.display()
        )
    })?;
    remember(&API_SOCK, &opts.api_sock);
    crate::tcg::init(&opts.api_sock);
    install_signal_handlers();

    let machine = Arc::new(Mutex::new(Machine::new(&opts.id)));
    for conn in listener.incoming() {
        match conn {
            Ok(s) => {
                let m = Arc::clone(&machine);
                thread::spawn(move || serve_api_connection(s, &m));
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("accepting on the API socket: {e}")),
        }
    }
    Ok(())
}

fn write_answer(s: &mut UnixStream, a: &Answer) -> std::io::Result<()> {
    let reason = match a.status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        _ => "Internal Server Error",
    };
    let mut out = format!(
        "HTTP/1.1 {} {reason}\r\nServer: Firecracker API\r\nConnection: keep-alive\r\n",
        a.status
    );
    match &a.body {
        Some(b) => out.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
            b.len()
        )),
        None => out.push_str("\r\n"),
    }
    s.write_all(out.as_bytes())
}

/// One parsed request, or why there is none.
enum Incoming {
    Request {
        method: String,
        path: String,
        body: Vec<u8>,
    },
    /// Malformed or too large: answer and close.
    Bad(Answer),
    Closed,
}

fn read_request(s: &mut UnixStream, buf: &mut Vec<u8>) -> Incoming {
    let mut chunk = [0u8; 4096];
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(buf) {
            Ok(httparse::Status::Complete(head_len)) => {
                let method = req.method.unwrap_or("").to_string();
                let path = req.path.unwrap_or("").to_string();
                let mut len = 0usize;
                for h in req.headers.iter() {
                    if h.name.eq_ignore_ascii_case("content-length") {
                        match std::str::from_utf8(h.value)
                            .ok()
                            .and_then(|v| v.trim().parse().ok())
                        {
                            Some(n) => len = n,
                            None => {
                                return Incoming::Bad(Answer::fault(
                                    400,
                                    "Invalid value. Key:Content-Length",
                                ))
                            }
                        }
                    } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                        return Incoming::Bad(Answer::fault(
                            400,
                            "Unsupported header. Key:Transfer-Encoding",
                        ));
                    }
                }
                if len > MAX_PAYLOAD {
                    return Incoming::Bad(Answer::fault(
                        400,
                        format!(
                            "Request payload with size {len} is larger than the limit of {MAX_PAYLOAD} allowed by server."
                        ),
                    ));
                }
                while buf.len() < head_len + len {
                    match s.read(&mut chunk) {
                        Ok(0) | Err(_) => return Incoming::Closed,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let body = buf[head_len..head_len + len].to_vec();
                buf.drain(..head_len + len);
                return Incoming::Request { method, path, body };
            }
            Ok(httparse::Status::Partial) => {
                if buf.len() > 16 * 1024 {
                    return Incoming::Bad(Answer::fault(400, "Request head too large."));
                }
            }
            Err(e) => {
                return Incoming::Bad(Answer::fault(400, format!("Invalid HTTP request: {e}")))
            }
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return Incoming::Closed,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

fn serve_api_connection(mut s: UnixStream, machine: &Mutex<Machine>) {
    let mut buf = Vec::new();
    loop {
        let (method, path, body) = match read_request(&mut s, &mut buf) {
            Incoming::Request { method, path, body } => (method, path, body),
            Incoming::Bad(a) => {
                let _ = write_answer(&mut s, &a);
                return;
            }
            Incoming::Closed => return,
        };
        let mut m = match machine.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        let (mut answer, after) = m.handle(&method, &path, &body);
        match after {
            After::Nothing => {}
            After::Booted => {
                m.boot_id = Some(fresh_boot_id());
                match boot(&m) {
                    Ok(instance) => m.agent_instance = instance,
                    Err(fault) => {
                        m.started = false;
                        answer = fault;
                    }
                }
            }
            After::Restored => m.agent_instance = serve_restored(&m),
            After::ExitFailed => {
                // Firecracker answers a failed load, then exits with status 1.
                thread::spawn(|| {
                    thread::sleep(Duration::from_millis(50));
                    exit_clean(1);
                });
            }
            After::Exit if crate::tcg::engine().is_some() => {
                // A real guest: it reboots (and QEMU, then the stand-in, exits) by itself.
                if let Some(Err(e)) = crate::tcg::engine().map(|e| e.ctrl_alt_del()) {
                    eprintln!("stand-in: TCG engine: Ctrl+Alt+Del: {e}");
                }
            }
            After::Exit => {
                // Firecracker answers, then exits when the guest resets; do the same, shortly.
                thread::spawn(|| {
                    thread::sleep(Duration::from_millis(50));
                    exit_clean(0);
                });
            }
        }
        drop(m);
        if write_answer(&mut s, &answer).is_err() {
            return;
        }
    }
}

/// The stand-in's "guest" sshd host key: a fixed ed25519 public key made once for the stand-in
/// (its private half was thrown away). Only the stand-in ever serves it; no real guest has it.
pub const STANDIN_HOST_KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGposxU1u8AlmBpcq3yn+btS1uQymLutYq90E6gMTcpH";

/// The "guest's" hostname when its boot args carry no valid `banger.name=`.
pub const STANDIN_HOSTNAME: &str = "banger-standin";

/// What the "guest" does once started: a real kernel boots under QEMU ([`crate::tcg`]); otherwise
/// the stand-in says it is ready on the serial console ([`crate::serial`], which also plays the
/// flooding test guest) and serves its agent on vsock. That agent answers
/// `hello` with [`STANDIN_HOST_KEY`] and the boot args' `banger.name=` (as the real agent would set
/// it), and `ports` with no sockets.
fn boot(m: &Machine) -> Result<Option<Arc<Mutex<String>>>, Answer> {
    if let Some(qemu) = crate::tcg::engages(m) {
        if m.serial.as_ref().is_some_and(|s| *s != Default::default()) {
            eprintln!("firecracker (banger stand-in): TCG engine: QEMU's console goes to stdout; PUT /serial's path and rate limiter are not applied to it");
        }
        crate::tcg::start(m, &qemu, |code| exit_clean(code)).map_err(|e| {
            Answer::fault(
                400,
                format!("Cannot start microvm: the stand-in's TCG engine failed: {e}"),
            )
        })?;
        if let Some((v, l)) = &m.vsock {
            remember(&VSOCK_SOCK, &v.uds_path);
            match l.try_clone() {
                // Connections go to the guest's own agent (see `vsock_connection`); this env
                // is never served.
                Ok(l) => {
                    thread::spawn(move || serve_vsock(l, AgentEnv::default()));
                }
                Err(e) => eprintln!("firecracker (banger stand-in): vsock listener: {e}"),
            }
        }
        return Ok(None);
    }
    // Opened at boot, as Firecracker opens `serial_out_path`: a bad path fails InstanceStart.
    let mut console = crate::serial::Console::open(m.serial.as_ref())
        .map_err(|e| Answer::fault(400, format!("Cannot start microvm: {e}")))?;
    let boot_id = m.boot_id.clone().unwrap_or_else(fresh_boot_id);
    let mut instance = None;
    if let Some((v, l)) = &m.vsock {
        remember(&VSOCK_SOCK, &v.uds_path);
        match l.try_clone() {
            Ok(l) => {
                let args = m
                    .boot_source
                    .as_ref()
                    .and_then(|b| b.boot_args.as_deref())
                    .unwrap_or("");
                let name = cmdline::parse(args)
                    .name
                    .unwrap_or_else(|| STANDIN_HOSTNAME.to_string());
                let env = AgentEnv::fixed(&boot_id, STANDIN_HOST_KEY, &name);
                instance = Some(Arc::clone(&env.instance_id));
                thread::spawn(move || serve_vsock(l, env));
            }
            Err(e) => eprintln!("firecracker (banger stand-in): vsock listener: {e}"),
        }
    }
    console.write(format!("{}\n", agent::ready_line(&boot_id)).as_bytes());
    let kernel = m
        .boot_source
        .as_ref()
        .map(|b| b.kernel_image_path.as_path());
    if kernel.is_some_and(crate::serial::is_flood_kernel) {
        thread::spawn(move || console.flood());
    }
    Ok(instance)
}

/// After a snapshot load (tiny engine): the "guest" resumes where it was, so no console line; its
/// agent answers on the (possibly overridden) vsock socket with the boot id and instance id the
/// snapshot recorded (until a `reconfigure` replaces the latter). Returns the live instance id.
fn serve_restored(m: &Machine) -> Option<Arc<Mutex<String>>> {
    let boot_id = m.boot_id.clone().unwrap_or_else(fresh_boot_id);
    let (v, l) = m.vsock.as_ref()?;
    remember(&VSOCK_SOCK, &v.uds_path);
    if crate::tcg::active() {
        // A real guest restored by the TCG engine: connections go to its own agent (see
        // `vsock_connection`); this env is never served.
        match l.try_clone() {
            Ok(l) => {
                thread::spawn(move || serve_vsock(l, AgentEnv::default()));
            }
            Err(e) => eprintln!("firecracker (banger stand-in): vsock listener: {e}"),
        }
        return None;
    }
    match l.try_clone() {
        Ok(l) => {
            let args = m
                .boot_source
                .as_ref()
                .and_then(|b| b.boot_args.as_deref())
                .unwrap_or("");
            let name = cmdline::parse(args)
                .name
                .unwrap_or_else(|| STANDIN_HOSTNAME.to_string());
            let env = AgentEnv::fixed(&boot_id, STANDIN_HOST_KEY, &name);
            if let (Some(id), Ok(mut live)) = (&m.instance_id, env.instance_id.lock()) {
                live.clone_from(id);
            }
            let instance = Arc::clone(&env.instance_id);
            thread::spawn(move || serve_vsock(l, env));
            Some(instance)
        }
        Err(e) => {
            eprintln!("firecracker (banger stand-in): vsock listener: {e}");
            None
        }
    }
}

/// Host-side port numbers Firecracker hands out for host-initiated connections start at 2^30.
static NEXT_HOST_PORT: AtomicU32 = AtomicU32::new(1 << 30);

fn serve_vsock(l: UnixListener, env: AgentEnv) {
    for conn in l.incoming() {
        let Ok(s) = conn else { continue };
        let env = env.clone();
        thread::spawn(move || vsock_connection(s, &env));
    }
}

fn vsock_connection(mut s: UnixStream, env: &AgentEnv) {
    if s.set_read_timeout(Some(Duration::from_secs(10))).is_err() {
        return;
    }
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.len() <= 32 {
        match s.read(&mut b) {
            Ok(1) if b[0] == b'\n' => break,
            Ok(1) => line.push(b[0]),
            _ => return,
        }
    }
    let port = std::str::from_utf8(&line)
        .ok()
        .and_then(|l| l.strip_prefix("CONNECT "))
        .and_then(|p| p.trim().parse::<u32>().ok());
    if crate::tcg::active() {
        // A real guest: its agent's port through the tap, or refused (closed) like a guest's RST;
        // a loaded snapshot not resumed yet has no running guest to answer.
        let Some(engine) = crate::tcg::engine() else {
            return;
        };
        let Some(guest) = port.and_then(|p| engine.connect_guest(p)) else {
            return;
        };
        let host_port = NEXT_HOST_PORT.fetch_add(1, Ordering::SeqCst);
        if s.write_all(format!("OK {host_port}\n").as_bytes()).is_ok() {
            let _ = s.set_read_timeout(None);
            engine.splice(s, guest);
        }
        return;
    }
    // Only the agent listens in this "guest"; any other port is refused the way Firecracker
    // reports a guest's RST: by closing the connection.
    if port != Some(agent::AGENT_VSOCK_PORT) {
        return;
    }
    let host_port = NEXT_HOST_PORT.fetch_add(1, Ordering::SeqCst);
    if s.write_all(format!("OK {host_port}\n").as_bytes()).is_err() {
        return;
    }
    let _ = s.set_read_timeout(None);
    let _ = agent::serve_connection(s, env);
}
