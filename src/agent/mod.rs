//! The guest-agent protocol: what the in-guest agent answers and how the host asks.
//!
//! Owns the request/response lines (one JSON request line → one JSON response line), the request
//! handler shared by the real agent (`banger-vsock-agent`, on AF_VSOCK port [`AGENT_VSOCK_PORT`])
//! and the test stand-in VMM, the host side of Firecracker's vsock handshake, and the console
//! readiness line of guests without the agent. Submodules: [`cmdline`] (the guest's configuration
//! from the kernel command line), [`prepare`] (what the agent does to the guest at start),
//! [`guest_files`] (its unit and the sshd drop-in, for images),
//! [`ports`] (listening TCP sockets), [`reconfigure`] (a restored guest's new identity). It never listens on AF_VSOCK itself (that is the agent role's
//! wiring) and never executes anything a request names: the method table is fixed.
//!
//! Wire format (protocol [`PROTOCOL_VERSION`]; a request may carry `"v"`, the protocol it speaks,
//! and one newer than the agent's is refused):
//! `{"method":"hello"}` → `{"ok":true,"result":{"protocol":2,"boot_id":"…","instance_id":"<32 hex>","host_key":"ssh-ed25519 AAAA…","hostname":"…"}}`
//! (plus `"problems":[…]` when the agent's start-up preparation refused or failed something;
//! protocol 1 agents send no `instance_id`);
//! `{"method":"reconfigure","v":2,"params":{"name":"…","ip":"10.x.y.z/NN","gateway":"…","mac":"02:…","key":"<base64>"}}`
//! → `{"ok":true,"result":{"instance_id":"<new 32 hex>","boot_id":"…"}}` once applied (see
//! [`reconfigure`]); a refused one changes nothing;
//! `{"method":"ports"}` → `{"ok":true,"result":{"ports":[{"address":"0.0.0.0","port":22,"process":"sshd"},…]}}`;
//! `{"method":"health"}` → `{"ok":true,"result":{"status":"ok"}}`;
//! `{"method":"boot_id"}` → `{"ok":true,"result":{"boot_id":"…"}}`;
//! `{"method":"uname"}` → `{"ok":true,"result":{"sysname":"Linux","release":"…","machine":"x86_64"}}`;
//! anything else → `{"ok":false,"error":"…"}`.

pub mod cmdline;
pub mod guest_files;
pub mod ports;
pub mod prepare;
pub mod reconfigure;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::{Context, Error, Result};

/// The guest vsock port the agent listens on.
pub const AGENT_VSOCK_PORT: u32 = 52;

/// The protocol this agent speaks; `hello` reports it. Bumped when an answer changes shape.
/// 2: `hello` reports `instance_id`; `reconfigure`.
pub const PROTOCOL_VERSION: u32 = 2;

/// The requests the agent answers.
pub const METHODS: [&str; 6] = [
    "hello",
    "ports",
    "health",
    "boot_id",
    "uname",
    "reconfigure",
];

/// The oldest protocol that has `method`: what the host sends as `"v"`, so agents of older images
/// keep answering what they can.
pub fn method_version(method: &str) -> u32 {
    match method {
        "reconfigure" => 2,
        _ => 1,
    }
}

/// Where Linux keeps the current boot's id.
pub const BOOT_ID_PATH: &str = "/proc/sys/kernel/random/boot_id";

/// Where Linux shows the running hostname.
pub const HOSTNAME_PATH: &str = "/proc/sys/kernel/hostname";

/// The sshd ed25519 host public key, relative to the guest's root.
pub const HOST_KEY_PUB: &str = "etc/ssh/ssh_host_ed25519_key.pub";

/// Longest request line the agent reads; longer lines are refused.
pub const MAX_LINE: usize = 64 * 1024;

/// Default bound on a host-side agent call (connect, handshake, request, answer).
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// The prefix of the console readiness line, followed by the boot id.
pub const READY_PREFIX: &str = "banger-guest: ready boot_id=";

/// Where the agent gets a value from.
#[derive(Debug, Clone)]
pub enum Source {
    /// Read it from this file on every request (trimmed).
    File(PathBuf),
    /// Serve this fixed value (the stand-in VMM's fake guest, tests).
    Fixed(String),
    /// Serve this value, which a `reconfigure` may change (the stand-in's fake guest's hostname).
    Shared(Arc<Mutex<String>>),
}

/// The boot id's source (Linux: [`BOOT_ID_PATH`]).
pub type BootIdSource = Source;

impl Source {
    fn read(&self) -> std::result::Result<String, String> {
        match self {
            Source::Fixed(v) => Ok(v.clone()),
            Source::Shared(v) => v
                .lock()
                .map(|v| v.clone())
                .map_err(|_| "the value's lock is poisoned".to_string()),
            Source::File(p) => std::fs::read_to_string(p)
                .map(|s| s.trim().to_string())
                .map_err(|e| format!("reading {}: {e}", p.display())),
        }
    }
}

/// What the handler reads from its surroundings; injectable so tests and the stand-in can serve
/// their own answers. Clones share the instance id (a `reconfigure` on one connection is seen by
/// every later one).
#[derive(Debug, Clone)]
pub struct AgentEnv {
    /// The boot id.
    pub boot_id: Source,
    /// The sshd ed25519 host public key line (`ssh-ed25519 AAAA… [comment]`).
    pub host_key: Source,
    /// The hostname.
    pub hostname: Source,
    /// The proc directory whose `net/tcp{,6}` `ports` reads; `None`: a guest with no sockets
    /// (the stand-in's).
    pub proc_dir: Option<PathBuf>,
    /// What the start-up preparation refused or failed, reported by `hello`.
    pub problems: Vec<String>,
    /// This agent's instance id: made at start, replaced by every successful `reconfigure`.
    pub instance_id: Arc<Mutex<String>>,
    /// How `reconfigure` changes the guest.
    pub configurer: Arc<dyn reconfigure::Configurer>,
    /// Remove eth0's old addresses only after the `reconfigure` answer is written: set for the
    /// TCP test transport, which rides eth0 itself.
    pub defer_address_removal: bool,
}

impl Default for AgentEnv {
    fn default() -> Self {
        AgentEnv {
            boot_id: Source::File(PathBuf::from(BOOT_ID_PATH)),
            host_key: Source::File(Path::new("/").join(HOST_KEY_PUB)),
            hostname: Source::File(PathBuf::from(HOSTNAME_PATH)),
            proc_dir: Some(PathBuf::from("/proc")),
            problems: Vec::new(),
            instance_id: Arc::new(Mutex::new(reconfigure::new_instance_id())),
            configurer: Arc::new(reconfigure::System::guest()),
            defer_address_removal: false,
        }
    }
}

impl AgentEnv {
    /// The stand-in's fake guest: fixed boot id and host key, a hostname only `reconfigure`
    /// changes, no listening sockets.
    pub fn fixed(boot_id: &str, host_key: &str, hostname: &str) -> Self {
        let name = Arc::new(Mutex::new(hostname.to_string()));
        AgentEnv {
            boot_id: Source::Fixed(boot_id.into()),
            host_key: Source::Fixed(host_key.into()),
            hostname: Source::Shared(name.clone()),
            proc_dir: None,
            problems: Vec::new(),
            instance_id: Arc::new(Mutex::new(reconfigure::new_instance_id())),
            configurer: Arc::new(reconfigure::InMemory { hostname: name }),
            defer_address_removal: false,
        }
    }

    /// The current instance id.
    pub fn instance_id(&self) -> std::result::Result<String, String> {
        self.instance_id
            .lock()
            .map(|v| v.clone())
            .map_err(|_| "the instance id lock is poisoned".to_string())
    }
}

/// The `hello` answer, as the host decodes it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Hello {
    /// The agent's protocol version.
    pub protocol: u32,
    /// The guest's boot id.
    pub boot_id: String,
    /// The guest's sshd ed25519 host public key, `ssh-ed25519 AAAA…` (no comment).
    pub host_key: String,
    /// The guest's hostname.
    pub hostname: String,
    /// What the agent's start-up preparation refused or failed.
    #[serde(default)]
    pub problems: Vec<String>,
    /// The agent's instance id (protocol 2; `None` from a protocol 1 agent). Clones of one
    /// snapshot share the boot id; the same VM has the same boot id and instance id.
    #[serde(default)]
    pub instance_id: Option<String>,
}

/// The `reconfigure` answer.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Reconfigured {
    /// The agent's new instance id.
    pub instance_id: String,
    /// The guest's boot id (unchanged: the kernel did not boot again).
    pub boot_id: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Request {
    method: String,
    #[serde(default)]
    v: Option<u32>,
    #[serde(default)]
    params: Option<Value>,
}

fn ok(result: Value) -> String {
    json!({"ok": true, "result": result}).to_string()
}

fn fail(error: impl std::fmt::Display) -> String {
    json!({"ok": false, "error": error.to_string()}).to_string()
}

/// Checks an ed25519 public key line and returns its first two fields (type and key).
pub fn ed25519_public_key(line: &str) -> std::result::Result<String, String> {
    let mut f = line.split_ascii_whitespace();
    let (ty, blob) = (f.next().unwrap_or(""), f.next().unwrap_or(""));
    if ty != "ssh-ed25519" {
        return Err(format!("not an ssh-ed25519 public key (type {ty:?})"));
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(blob)
        .map_err(|e| format!("ssh-ed25519 key is not base64: {e}"))?;
    // string "ssh-ed25519" (4 + 11 bytes), then string key (4 + 32 bytes).
    if raw.len() != 51 || &raw[..15] != b"\0\0\0\x0bssh-ed25519" || raw[15..19] != [0, 0, 0, 32] {
        return Err("ssh-ed25519 key blob is malformed".into());
    }
    Ok(format!("{ty} {blob}"))
}

fn hello(env: &AgentEnv) -> std::result::Result<Value, String> {
    let boot_id = env.boot_id.read()?;
    let host_key = match &env.host_key {
        Source::File(p) => {
            let line = env.host_key.read().map_err(|e| {
                format!(
                    "{e} (the agent makes the sshd host key at start with ssh-keygen -t ed25519; see its log)"
                )
            })?;
            ed25519_public_key(&line).map_err(|e| format!("{}: {e}", p.display()))?
        }
        Source::Fixed(_) | Source::Shared(_) => ed25519_public_key(&env.host_key.read()?)?,
    };
    let hostname = env.hostname.read()?;
    let mut v = json!({
        "protocol": PROTOCOL_VERSION,
        "boot_id": boot_id,
        "instance_id": env.instance_id()?,
        "host_key": host_key,
        "hostname": hostname,
    });
    if !env.problems.is_empty() {
        v["problems"] = json!(env.problems);
    }
    Ok(v)
}

/// `reconfigure`: validate everything, then apply under the instance id's lock (one at a time),
/// then a new instance id. Returns the answer and what is left to do once it is written.
fn reconfigure_guest(
    params: Option<Value>,
    env: &AgentEnv,
) -> (String, Option<reconfigure::Deferred>) {
    let r: reconfigure::Reconfigure = match params.map(serde_json::from_value) {
        Some(Ok(r)) => r,
        Some(Err(e)) => return (fail(format!("reconfigure refused: bad params: {e}; nothing was changed")), None),
        None => {
            return (
                fail("reconfigure refused: no params (want name, ip, gateway, mac, key); nothing was changed"),
                None,
            )
        }
    };
    let v = match r.validate() {
        Ok(v) => v,
        Err(e) => {
            return (
                fail(format!("reconfigure refused: {e}; nothing was changed")),
                None,
            )
        }
    };
    let boot_id = match env.boot_id.read() {
        Ok(b) => b,
        Err(e) => {
            return (
                fail(format!("reconfigure refused: {e}; nothing was changed")),
                None,
            )
        }
    };
    let Ok(mut id) = env.instance_id.lock() else {
        return (
            fail("reconfigure refused: the instance id lock is poisoned; nothing was changed"),
            None,
        );
    };
    match env.configurer.apply(&v, env.defer_address_removal) {
        Ok(after) => {
            *id = reconfigure::instance_id_for(&v);
            (ok(json!({"instance_id": *id, "boot_id": boot_id})), after)
        }
        Err(e) => (
            fail(format!(
                "reconfigure failed: {e} (the guest may be partly reconfigured and keeps its instance id; retry)"
            )),
            None,
        ),
    }
}

/// Answers one request line with one response line (no trailing newline). Work a `reconfigure`
/// leaves for after its answer is done before returning.
pub fn handle_line(line: &str, env: &AgentEnv) -> String {
    let (answer, after) = handle_request(line, env);
    if let Some(f) = after {
        if let Err(e) = f() {
            crate::logging::error(
                "agent",
                "reconfigure, after the answer",
                json!({"error": e}),
            );
        }
    }
    answer
}

/// One request line → one answer line, and the work to run once the answer is written.
fn handle_request(line: &str, env: &AgentEnv) -> (String, Option<reconfigure::Deferred>) {
    let req: Request = match serde_json::from_str(line.trim()) {
        Ok(r) => r,
        Err(e) => return (fail(format!("bad request: {e}")), None),
    };
    if let Some(v) = req.v {
        if v > PROTOCOL_VERSION {
            return (fail(format!(
                "protocol version {v} not supported (this agent speaks {PROTOCOL_VERSION}; update the guest image)"
            )), None);
        }
    }
    if req.method == "reconfigure" {
        return reconfigure_guest(req.params, env);
    }
    if req.params.is_some() {
        return (
            fail(format!("method {:?} takes no params", req.method)),
            None,
        );
    }
    let answer = match req.method.as_str() {
        "hello" => hello(env).map_or_else(fail, ok),
        "ports" => match &env.proc_dir {
            Some(p) => ok(json!(ports::listening(p))),
            None => ok(json!(ports::Ports::default())),
        },
        "health" => ok(json!({"status": "ok"})),
        "boot_id" => env
            .boot_id
            .read()
            .map_or_else(fail, |id| ok(json!({"boot_id": id}))),
        "uname" => {
            let u = rustix::system::uname();
            ok(json!({
                "sysname": u.sysname().to_string_lossy(),
                "release": u.release().to_string_lossy(),
                "machine": u.machine().to_string_lossy(),
            }))
        }
        other => fail(format!(
            "unknown method {other:?} (known: {})",
            METHODS.join(", ")
        )),
    };
    (answer, None)
}

/// Serves request lines on one connection until the peer closes it: each line gets one answer
/// line. A line longer than [`MAX_LINE`] is answered with an error and ends the connection.
pub fn serve_connection<S: Read + Write>(stream: S, env: &AgentEnv) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = Vec::new();
        let n = (&mut reader)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut line)?;
        if n == 0 {
            return Ok(());
        }
        if line.len() > MAX_LINE {
            let answer = fail(format!("request line longer than {MAX_LINE} bytes"));
            reader
                .get_mut()
                .write_all(format!("{answer}\n").as_bytes())?;
            return Ok(());
        }
        let (answer, after) = match std::str::from_utf8(&line) {
            Ok(s) => handle_request(s, env),
            Err(_) => (fail("bad request: not UTF-8"), None),
        };
        let written = reader
            .get_mut()
            .write_all(format!("{answer}\n").as_bytes())
            .and_then(|()| reader.get_mut().flush());
        if let Some(f) = after {
            if let Err(e) = f() {
                crate::logging::error(
                    "agent",
                    "reconfigure, after the answer",
                    json!({"error": e}),
                );
            }
        }
        written?;
    }
}

/// Reads one `\n`-terminated line, byte by byte so nothing after it is consumed, at most `cap`
/// bytes. `Ok(None)` when the peer closed first.
fn read_line_exact(s: &mut UnixStream, cap: usize) -> std::io::Result<Option<String>> {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        match s.read(&mut b) {
            Ok(0) => return Ok(None),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        if b[0] == b'\n' {
            return Ok(Some(String::from_utf8_lossy(&line).into_owned()));
        }
        line.push(b[0]);
        if line.len() > cap {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("line longer than {cap} bytes"),
            ));
        }
    }
}

/// Connects to guest vsock `port` through Firecracker's host-side socket `uds_path`
/// (`CONNECT <port>\n` → `OK <hostport>\n`). The stream keeps `timeout` as its read and write
/// timeout.
pub fn vsock_connect(uds_path: &Path, port: u32, timeout: Duration) -> Result<UnixStream> {
    let what = || {
        format!(
            "connecting to guest vsock port {port} via {}",
            uds_path.display()
        )
    };
    let mut s = UnixStream::connect(uds_path)
        .map_err(|e| Error::new(what(), e).hint("is the VM running with a vsock device?"))?;
    s.set_read_timeout(Some(timeout)).ctx(what)?;
    s.set_write_timeout(Some(timeout)).ctx(what)?;
    s.write_all(format!("CONNECT {port}\n").as_bytes())
        .ctx(what)?;
    let line = match read_line_exact(&mut s, 64) {
        Ok(Some(l)) => l,
        Ok(None) => {
            return Err(Error::new(
                what(),
                "the VMM closed the connection during the handshake (nothing listens on that port in the guest yet)",
            ))
        }
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            return Err(Error::new(
                what(),
                format!("no handshake answer within {timeout:?}"),
            ))
        }
        Err(e) => return Err(Error::new(what(), e)),
    };
    match parse_ok_line(&line) {
        Some(_) => Ok(s),
        None => Err(Error::new(
            what(),
            format!("unexpected handshake answer {line:?} (want \"OK <port>\")"),
        )),
    }
}

/// Parses the handshake answer `OK <hostport>`.
fn parse_ok_line(line: &str) -> Option<u32> {
    line.trim_end_matches('\r')
        .strip_prefix("OK ")
        .and_then(|p| p.trim().parse().ok())
}

/// Calls `method` on the agent at guest vsock `port` behind `uds_path`, bounded by
/// [`DEFAULT_CALL_TIMEOUT`]; returns the `result` value, or the agent's error as an [`Error`].
pub fn agent_call(uds_path: &Path, port: u32, method: &str) -> Result<Value> {
    agent_call_with(uds_path, port, method, None, DEFAULT_CALL_TIMEOUT)
}

/// [`agent_call`] with `params` and a bound of its own. The request says the oldest protocol
/// that has `method` ([`method_version`]).
pub fn agent_call_with(
    uds_path: &Path,
    port: u32,
    method: &str,
    params: Option<Value>,
    timeout: Duration,
) -> Result<Value> {
    let what = || format!("guest agent call {method:?} via {}", uds_path.display());
    let mut s = vsock_connect(uds_path, port, timeout)?;
    let mut req = json!({"method": method, "v": method_version(method)});
    if let Some(p) = params {
        req["params"] = p;
    }
    let req = req.to_string();
    s.write_all(format!("{req}\n").as_bytes()).ctx(what)?;
    let line = match read_line_exact(&mut s, MAX_LINE) {
        Ok(Some(l)) => l,
        Ok(None) => {
            return Err(Error::new(
                what(),
                "the agent closed the connection without an answer",
            ))
        }
        Err(e) => return Err(Error::new(what(), e)),
    };
    let resp: Value =
        serde_json::from_str(&line).ctx(|| format!("{}: decoding the answer {line:?}", what()))?;
    match resp.get("ok").and_then(Value::as_bool) {
        Some(true) => Ok(resp.get("result").cloned().unwrap_or(Value::Null)),
        Some(false) => Err(Error::new(
            what(),
            resp.get("error")
                .and_then(Value::as_str)
                .unwrap_or("the agent failed without saying why"),
        )),
        None => Err(Error::new(what(), format!("malformed answer {line:?}"))),
    }
}

/// Calls `hello` on the agent at guest vsock `port` behind `uds_path` and decodes the answer
/// (protocol 1 or 2; an instance id, when there is one, must be 32 hex digits).
pub fn call_hello(uds_path: &Path, port: u32) -> Result<Hello> {
    let v = agent_call(uds_path, port, "hello")?;
    let h: Hello = serde_json::from_value(v.clone()).ctx(|| {
        format!(
            "guest agent call \"hello\" via {}: decoding the answer {v}",
            uds_path.display()
        )
    })?;
    ed25519_public_key(&h.host_key).map_err(|e| {
        Error::new(
            format!("guest agent call \"hello\" via {}", uds_path.display()),
            format!("host key {:?}: {e}", h.host_key),
        )
    })?;
    if let Some(id) = &h.instance_id {
        if !reconfigure::is_instance_id(id) {
            return Err(Error::new(
                format!("guest agent call \"hello\" via {}", uds_path.display()),
                format!("instance id {id:?} is not 32 hex digits"),
            ));
        }
    }
    Ok(h)
}

/// Tells the agent behind `uds_path` (port [`AGENT_VSOCK_PORT`]) its guest's new identity and
/// waits, up to `timeout`, for it to be applied. `r` is validated here first, by the agent's own
/// rules: a refused request never leaves the host.
pub fn reconfigure(
    uds_path: &Path,
    r: &reconfigure::Reconfigure,
    timeout: Duration,
) -> Result<Reconfigured> {
    let what = || format!("reconfiguring the guest via {}", uds_path.display());
    r.validate()
        .map_err(|e| Error::new(what(), e).hint("nothing was sent to the guest"))?;
    let params = serde_json::to_value(r).ctx(what)?;
    let v = agent_call_with(
        uds_path,
        AGENT_VSOCK_PORT,
        "reconfigure",
        Some(params),
        timeout,
    )?;
    let got: Reconfigured =
        serde_json::from_value(v.clone()).ctx(|| format!("{}: decoding the answer {v}", what()))?;
    if !reconfigure::is_instance_id(&got.instance_id) {
        return Err(Error::new(
            what(),
            format!(
                "the agent answered instance id {:?}, not 32 hex digits",
                got.instance_id
            ),
        ));
    }
    Ok(got)
}

/// The console readiness line for `boot_id` (without the newline).
pub fn ready_line(boot_id: &str) -> String {
    format!("{READY_PREFIX}{boot_id}")
}

/// Extracts the boot id from a console readiness line: `banger-guest: ready boot_id=<id>`, where
/// `<id>` is 1–64 hex digits and dashes (a UUID or the tiny guest's 16 hex digits). The marker may
/// follow other text on the line (a kernel log prefix); trailing whitespace and `\r` are ignored.
pub fn parse_ready_line(line: &str) -> Option<String> {
    parse_ready_line_with(line, READY_PREFIX)
}

/// [`parse_ready_line`] for an image's own console marker `prefix`, followed by the boot id.
pub fn parse_ready_line_with(line: &str, prefix: &str) -> Option<String> {
    let at = line.find(prefix)?;
    let id = line[at + prefix.len()..].trim();
    is_boot_id(id).then(|| id.to_string())
}

/// A boot id as guests print it: 1–64 hex digits and dashes, at least one digit.
pub fn is_boot_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id.chars().all(|c| c.is_ascii_hexdigit() || c == '-')
        && id.chars().any(|c| c.is_ascii_hexdigit())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    const HOST_KEY: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGposxU1u8AlmBpcq3yn+btS1uQymLutYq90E6gMTcpH";

    /// An env reading files under a fresh temp dir: boot id, host key, hostname, an empty proc.
    fn env_with(boot_id: &str, tag: &str) -> (AgentEnv, PathBuf) {
        let d = std::env::temp_dir().join(format!("banger-agent-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("proc/net")).unwrap();
        std::fs::write(d.join("boot_id"), format!("{boot_id}\n")).unwrap();
        std::fs::write(d.join("key.pub"), format!("{HOST_KEY} root@buildhost\n")).unwrap();
        std::fs::write(d.join("hostname"), "dev\n").unwrap();
        (
            AgentEnv {
                boot_id: Source::File(d.join("boot_id")),
                host_key: Source::File(d.join("key.pub")),
                hostname: Source::File(d.join("hostname")),
                proc_dir: Some(d.join("proc")),
                problems: Vec::new(),
                instance_id: Arc::new(Mutex::new("0".repeat(32))),
                configurer: Arc::new(Recorder::default()),
                defer_address_removal: false,
            },
            d,
        )
    }

    /// A configurer that records what it was asked (and refuses when told to); with deferral,
    /// the deferred step records `after <name>`.
    #[derive(Debug, Default)]
    struct Recorder {
        calls: Arc<Mutex<Vec<String>>>,
        refuse: bool,
    }

    impl reconfigure::Configurer for Recorder {
        fn apply(
            &self,
            v: &reconfigure::Validated,
            defer: bool,
        ) -> std::result::Result<Option<reconfigure::Deferred>, String> {
            if self.refuse {
                return Err("ip: RTNETLINK answers: Operation not permitted".into());
            }
            self.calls.lock().unwrap().push(format!(
                "{} {}/{} {} {}",
                v.name, v.ip, v.prefix, v.gateway, v.mac
            ));
            Ok(defer.then(|| {
                let calls = self.calls.clone();
                let name = v.name.clone();
                Box::new(move || {
                    calls.lock().unwrap().push(format!("after {name}"));
                    Ok(())
                }) as reconfigure::Deferred
            }))
        }
    }

    const OWNER_LINE: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAILf5oszbHqEb+6X3j8hlzlMXxaLuKBJTgVM/l0kQlrAO owner@host";

    fn reconf_params(name: &str, ip: &str) -> Value {
        json!({
            "name": name,
            "ip": ip,
            "gateway": "172.30.0.1",
            "mac": "02:00:00:00:00:09",
            "key": base64::engine::general_purpose::STANDARD.encode(OWNER_LINE),
        })
    }

    #[test]
    fn ready_line_table() {
        let uuid = "0f3a9c1e-5b7d-4e2a-9c8b-1a2b3c4d5e6f";
        let cases: &[(&str, Option<&str>)] = &[
            (
                "banger-guest: ready boot_id=00112233aabbccdd",
                Some("00112233aabbccdd"),
            ),
            (
                "banger-guest: ready boot_id=00112233aabbccdd\r",
                Some("00112233aabbccdd"),
            ),
            (
                "banger-guest: ready boot_id=00112233AABBCCDD  \n",
                Some("00112233AABBCCDD"),
            ),
            (&format!("banger-guest: ready boot_id={uuid}"), Some(uuid)),
            (
                &format!("[    1.234] banger-guest: ready boot_id={uuid}"),
                Some(uuid),
            ),
            ("banger-guest: ready boot_id=", None),
            ("banger-guest: ready boot_id=---", None),
            ("banger-guest: ready boot_id=xyz", None),
            ("banger-guest: ready boot_id=abc def", None),
            ("banger-guest: ready", None),
            ("Linux version 6.1", None),
            ("", None),
            (
                &format!("banger-guest: ready boot_id={}", "a".repeat(65)),
                None,
            ),
        ];
        for (line, want) in cases {
            assert_eq!(parse_ready_line(line).as_deref(), *want, "{line:?}");
        }
        assert_eq!(parse_ready_line(&ready_line(uuid)).as_deref(), Some(uuid));
    }

    #[test]
    fn handler_table() {
        let (env, p) = env_with("11111111-2222-3333-4444-555555555555", "table");
        let v = |line: &str| -> Value { serde_json::from_str(&handle_line(line, &env)).unwrap() };
        assert_eq!(
            v(r#"{"method":"health"}"#),
            json!({"ok":true,"result":{"status":"ok"}})
        );
        assert_eq!(
            v(r#"{"method":"boot_id"}"#),
            json!({"ok":true,"result":{"boot_id":"11111111-2222-3333-4444-555555555555"}})
        );
        let u = v("{\"method\":\"uname\"}\n");
        assert_eq!(u["ok"], true);
        assert_eq!(u["result"]["sysname"], "Linux");
        assert!(u["result"]["release"]
            .as_str()
            .is_some_and(|s| !s.is_empty()));
        assert!(u["result"]["machine"]
            .as_str()
            .is_some_and(|s| !s.is_empty()));
        for bad in [
            r#"{"method":"exec"}"#,
            "not json",
            r#"{"m":"health"}"#,
            r#"{"method":5}"#,
            "",
        ] {
            let r = v(bad);
            assert_eq!(r["ok"], false, "{bad}");
            assert!(r["error"].as_str().is_some_and(|s| !s.is_empty()), "{bad}");
        }
        let r = v(r#"{"method":"exec"}"#);
        assert_eq!(
            r["error"],
            "unknown method \"exec\" (known: hello, ports, health, boot_id, uname, reconfigure)"
        );
        assert_eq!(
            v(r#"{"method":"health","params":{}}"#)["error"],
            "method \"health\" takes no params"
        );
        assert!(v(r#"{"method":"hello","extra":1}"#)["error"]
            .as_str()
            .is_some_and(|e| e.contains("unknown field")));
        let _ = std::fs::remove_dir_all(&p);
        let r = v(r#"{"method":"boot_id"}"#);
        assert_eq!(r["ok"], false);
        let fixed = AgentEnv::fixed("feedface", HOST_KEY, "vm");
        assert_eq!(
            handle_line(r#"{"method":"boot_id"}"#, &fixed),
            r#"{"ok":true,"result":{"boot_id":"feedface"}}"#
        );
    }

    #[test]
    fn hello_and_ports_table() {
        let (mut env, d) = env_with("0f3a9c1e-5b7d-4e2a-9c8b-1a2b3c4d5e6f", "hello");
        let v = |line: &str, env: &AgentEnv| -> Value {
            serde_json::from_str(&handle_line(line, env)).unwrap()
        };
        let want = json!({"ok": true, "result": {
            "protocol": 2,
            "boot_id": "0f3a9c1e-5b7d-4e2a-9c8b-1a2b3c4d5e6f",
            "instance_id": "0".repeat(32),
            "host_key": HOST_KEY,
            "hostname": "dev",
        }});
        assert_eq!(v(r#"{"method":"hello"}"#, &env), want);
        assert_eq!(v(r#"{"method":"hello","v":1}"#, &env), want);
        assert_eq!(v(r#"{"method":"hello","v":2}"#, &env), want);
        let r = v(r#"{"method":"hello","v":3}"#, &env);
        assert!(
            r["error"]
                .as_str()
                .is_some_and(|e| e.contains("protocol version 3 not supported")),
            "{r}"
        );
        // Start-up problems travel with hello.
        env.problems = vec!["banger.key is not base64".into()];
        assert_eq!(
            v(r#"{"method":"hello"}"#, &env)["result"]["problems"],
            json!(["banger.key is not base64"])
        );
        env.problems.clear();
        // The ports of an empty proc: none; then one listener.
        assert_eq!(
            v(r#"{"method":"ports"}"#, &env),
            json!({"ok": true, "result": {"ports": []}})
        );
        std::fs::write(
            d.join("proc/net/tcp"),
            "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 15673 1 0000000000000000 100 0 0 10 0\n",
        )
        .unwrap();
        assert_eq!(
            v(r#"{"method":"ports"}"#, &env),
            json!({"ok": true, "result": {"ports": [{"address": "0.0.0.0", "port": 22}]}})
        );
        // A bad or missing host key: hello fails and says where it looked.
        std::fs::write(d.join("key.pub"), "ssh-rsa AAAAB3NzaC1yc2E= root@x\n").unwrap();
        let r = v(r#"{"method":"hello"}"#, &env);
        assert!(
            r["error"]
                .as_str()
                .is_some_and(|e| e.contains("key.pub") && e.contains("not an ssh-ed25519")),
            "{r}"
        );
        std::fs::remove_file(d.join("key.pub")).unwrap();
        let r = v(r#"{"method":"hello"}"#, &env);
        assert!(
            r["error"]
                .as_str()
                .is_some_and(|e| e.contains("ssh-keygen -t ed25519")),
            "{r}"
        );
        // The stand-in's fixed guest.
        let fixed = AgentEnv::fixed("feedface", HOST_KEY, "vm");
        assert_eq!(
            v(r#"{"method":"hello"}"#, &fixed)["result"]["hostname"],
            "vm"
        );
        assert_eq!(
            v(r#"{"method":"ports"}"#, &fixed),
            json!({"ok": true, "result": {"ports": []}})
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn ed25519_key_table() {
        let cases: &[(&str, Result<&str, &str>)] = &[
            (HOST_KEY, Ok(HOST_KEY)),
            (&format!("{HOST_KEY} root@host\n"), Ok(HOST_KEY)),
            ("ssh-rsa AAAAB3NzaC1yc2E=", Err("not an ssh-ed25519")),
            ("", Err("not an ssh-ed25519")),
            ("ssh-ed25519 !!!", Err("not base64")),
            ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5", Err("malformed")),
        ];
        for (line, want) in cases {
            match (ed25519_public_key(line), want) {
                (Ok(got), Ok(w)) => assert_eq!(got, *w),
                (Err(e), Err(w)) => assert!(e.contains(w), "{line:?}: {e}"),
                (got, _) => panic!("{line:?}: {got:?}"),
            }
        }
    }

    #[test]
    fn oversize_and_garbage_lines_get_errors() {
        let (env, d) = env_with("abc", "lines");
        let (a, b) = UnixStream::pair().unwrap();
        let h = std::thread::spawn(move || serve_connection(b, &env));
        let mut a2 = a.try_clone().unwrap();
        let mut r = BufReader::new(a);
        let mut line = String::new();
        a2.write_all(b"\xff\xfe\n").unwrap();
        r.read_line(&mut line).unwrap();
        assert!(line.contains("not UTF-8"), "{line}");
        line.clear();
        a2.write_all(b"{\"method\":\"health\"}\n").unwrap();
        r.read_line(&mut line).unwrap();
        assert!(line.contains("\"ok\":true"), "{line}");
        line.clear();
        a2.write_all(&vec![b'x'; MAX_LINE + 10]).unwrap();
        r.read_line(&mut line).unwrap();
        assert!(line.contains("longer than"), "{line}");
        // The agent then ends the connection.
        line.clear();
        assert_eq!(r.read_line(&mut line).unwrap(), 0);
        h.join().unwrap().unwrap();
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn ok_line() {
        assert_eq!(parse_ok_line("OK 1073741824"), Some(1073741824));
        assert_eq!(parse_ok_line("OK 5\r"), Some(5));
        assert_eq!(parse_ok_line("ERR"), None);
        assert_eq!(parse_ok_line("OK x"), None);
    }

    /// A fake Firecracker vsock muxer: handshake, then the agent handler.
    #[test]
    fn host_call_through_handshake() {
        let (env, p) = env_with("abcdef0123456789", "call");
        let sock = std::env::temp_dir().join(format!("banger-agent-v-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&sock);
        let l = UnixListener::bind(&sock).unwrap();
        let h = std::thread::spawn(move || {
            for _ in 0..5 {
                let (mut s, _) = l.accept().unwrap();
                let line = read_line_exact(&mut s, 64).unwrap().unwrap();
                if line == format!("CONNECT {AGENT_VSOCK_PORT}") {
                    s.write_all(b"OK 1073741824\n").unwrap();
                    serve_connection(s, &env).unwrap();
                }
                // Any other port: close, as Firecracker does when the guest refuses.
            }
        });
        let r = agent_call(&sock, AGENT_VSOCK_PORT, "boot_id").unwrap();
        assert_eq!(r, json!({"boot_id":"abcdef0123456789"}));
        let hello = call_hello(&sock, AGENT_VSOCK_PORT).unwrap();
        assert_eq!(
            hello,
            Hello {
                protocol: PROTOCOL_VERSION,
                boot_id: "abcdef0123456789".into(),
                host_key: HOST_KEY.into(),
                hostname: "dev".into(),
                problems: vec![],
                instance_id: Some("0".repeat(32)),
            }
        );
        // reconfigure: a refused request never leaves the host (no connection is made for it).
        let r: reconfigure::Reconfigure =
            serde_json::from_value(reconf_params("clone-2", "172.30.0.9/24")).unwrap();
        let bad = reconfigure::Reconfigure {
            ip: "8.8.8.8/24".into(),
            ..r.clone()
        };
        let e = super::reconfigure(&sock, &bad, DEFAULT_CALL_TIMEOUT).unwrap_err();
        assert!(e.why.contains("not inside a private range"), "{e}");
        let got = super::reconfigure(&sock, &r, DEFAULT_CALL_TIMEOUT).unwrap();
        assert_eq!(got.boot_id, "abcdef0123456789");
        assert!(reconfigure::is_instance_id(&got.instance_id));
        assert_ne!(got.instance_id, "0".repeat(32));
        let hello = call_hello(&sock, AGENT_VSOCK_PORT).unwrap();
        assert_eq!(hello.instance_id, Some(got.instance_id));
        let e = agent_call(&sock, 53, "health").unwrap_err();
        assert!(
            e.why.contains("closed the connection during the handshake"),
            "{e}"
        );
        h.join().unwrap();
        let _ = std::fs::remove_file(&sock);
        let _ = std::fs::remove_dir_all(p);
    }

    #[test]
    fn reconfigure_applies_and_refusals_change_nothing() {
        let (mut env, d) = env_with("0f3a9c1e-5b7d-4e2a-9c8b-1a2b3c4d5e6f", "reconf");
        let rec = Arc::new(Recorder::default());
        let calls = rec.calls.clone();
        env.configurer = rec;
        let v = |line: &str, env: &AgentEnv| -> Value {
            serde_json::from_str(&handle_line(line, env)).unwrap()
        };
        let req =
            |params: Value| json!({"method": "reconfigure", "v": 2, "params": params}).to_string();
        let before = env.instance_id().unwrap();
        // Refusals: an error naming the problem, the configurer never called, the id kept.
        let mut unknown = reconf_params("a", "172.30.0.9/24");
        unknown["dns"] = json!("10.0.0.1");
        let mut numeric = reconf_params("a", "172.30.0.9/24");
        numeric["mac"] = json!(2);
        let cases: Vec<(String, &str)> = vec![
            (r#"{"method":"reconfigure"}"#.into(), "no params"),
            (req(json!("x")), "bad params"),
            (req(json!({})), "bad params: missing field"),
            (req(unknown), "unknown field `dns`"),
            (req(numeric), "bad params: invalid type"),
            (
                req(reconf_params("Bad_Name", "172.30.0.9/24")),
                "not a valid hostname",
            ),
            (req(reconf_params("a", "172.30.0.9")), "no prefix length"),
            (
                req(reconf_params("a", "172.31.0.9/24")),
                "gateway 172.30.0.1 is not inside",
            ),
            (
                req(reconf_params("a", "1.2.3.4/24")),
                "not inside a private range",
            ),
        ];
        for (line, want) in &cases {
            let r = v(line, &env);
            let e = r["error"].as_str().unwrap_or_default();
            assert!(e.contains(want), "{line}: {r}");
            assert!(
                e.starts_with("reconfigure refused: ") && e.ends_with("nothing was changed"),
                "{r}"
            );
        }
        let r = v(&json!({"method": "reconfigure", "v": 3, "params": reconf_params("a", "172.30.0.9/24")}).to_string(), &env);
        assert!(
            r["error"].as_str().unwrap().contains("protocol version 3"),
            "{r}"
        );
        assert!(calls.lock().unwrap().is_empty());
        assert_eq!(env.instance_id().unwrap(), before);

        // A configurer failure: said, and the id is kept.
        let failing = AgentEnv {
            configurer: Arc::new(Recorder {
                refuse: true,
                ..Recorder::default()
            }),
            ..env.clone()
        };
        let r = v(&req(reconf_params("a", "172.30.0.9/24")), &failing);
        assert!(
            r["error"]
                .as_str()
                .unwrap()
                .contains("Operation not permitted"),
            "{r}"
        );
        assert_eq!(env.instance_id().unwrap(), before);

        // Applied: a new id, seen by every clone of the env (later connections).
        let r = v(&req(reconf_params("clone-1", "172.30.0.9/24")), &env);
        assert_eq!(r["ok"], true, "{r}");
        let id = r["result"]["instance_id"].as_str().unwrap().to_string();
        assert!(reconfigure::is_instance_id(&id) && id != before, "{r}");
        assert_eq!(
            r["result"]["boot_id"],
            "0f3a9c1e-5b7d-4e2a-9c8b-1a2b3c4d5e6f"
        );
        assert_eq!(
            *calls.lock().unwrap(),
            ["clone-1 172.30.0.9/24 172.30.0.1 02:00:00:00:00:09"]
        );
        let later = env.clone();
        assert_eq!(
            v(r#"{"method":"hello"}"#, &later)["result"]["instance_id"],
            id
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// The stand-in's fake guest: reconfigure changes the hostname hello reports.
    #[test]
    fn fixed_guest_reconfigure() {
        let env = AgentEnv::fixed("feedface", HOST_KEY, "vm");
        let first = env.instance_id().unwrap();
        assert!(reconfigure::is_instance_id(&first));
        let line =
            json!({"method": "reconfigure", "params": reconf_params("clone-3", "10.1.2.3/24")})
                .to_string();
        let r: Value = serde_json::from_str(&handle_line(&line, &env)).unwrap();
        assert!(r["error"].as_str().unwrap().contains("gateway"), "{r}");
        let mut p = reconf_params("clone-3", "10.1.2.3/24");
        p["gateway"] = json!("10.1.2.1");
        let line = json!({"method": "reconfigure", "params": p}).to_string();
        let r: Value = serde_json::from_str(&handle_line(&line, &env)).unwrap();
        assert_eq!(r["result"]["boot_id"], "feedface");
        let h: Value =
            serde_json::from_str(&handle_line(r#"{"method":"hello"}"#, &env.clone())).unwrap();
        assert_eq!(h["result"]["hostname"], "clone-3");
        assert_eq!(h["result"]["instance_id"], r["result"]["instance_id"]);
        assert_ne!(h["result"]["instance_id"], first.as_str());
    }

    /// Over the TCP transport the old address goes only once the answer is out: the deferred step
    /// waits for the test to have read the answer (a step run before the write would time out).
    #[test]
    fn deferred_step_runs_after_the_answer() {
        let (mut env, d) = env_with("abc", "defer");
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let rx = Arc::new(Mutex::new(rx));
        #[derive(Debug)]
        struct Waits(
            Arc<Mutex<std::sync::mpsc::Receiver<()>>>,
            Arc<Mutex<Vec<String>>>,
        );
        impl reconfigure::Configurer for Waits {
            fn apply(
                &self,
                _v: &reconfigure::Validated,
                defer: bool,
            ) -> std::result::Result<Option<reconfigure::Deferred>, String> {
                assert!(defer);
                let (rx, log) = (self.0.clone(), self.1.clone());
                Ok(Some(Box::new(move || {
                    let got = rx.lock().unwrap().recv_timeout(Duration::from_secs(20));
                    log.lock()
                        .unwrap()
                        .push(format!("after: answer read first: {}", got.is_ok()));
                    Ok(())
                })))
            }
        }
        let log = Arc::new(Mutex::new(Vec::new()));
        env.configurer = Arc::new(Waits(rx, log.clone()));
        env.defer_address_removal = true;
        let (a, b) = UnixStream::pair().unwrap();
        let h = std::thread::spawn(move || serve_connection(b, &env));
        let mut w = a.try_clone().unwrap();
        let mut r = BufReader::new(a);
        let line = json!({"method": "reconfigure", "params": reconf_params("c", "172.30.0.9/24")});
        w.write_all(format!("{line}\n").as_bytes()).unwrap();
        let mut answer = String::new();
        r.read_line(&mut answer).unwrap();
        assert!(answer.contains("\"ok\":true"), "{answer}");
        tx.send(()).unwrap();
        drop(w);
        drop(r);
        h.join().unwrap().unwrap();
        assert_eq!(*log.lock().unwrap(), ["after: answer read first: true"]);
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// A protocol 1 agent's hello (no instance id) still decodes; the host asks each method at
    /// the oldest protocol that has it.
    #[test]
    fn protocol_1_answers_stay_readable() {
        let h: Hello = serde_json::from_value(json!({
            "protocol": 1, "boot_id": "b", "host_key": HOST_KEY, "hostname": "old",
        }))
        .unwrap();
        assert_eq!(h.instance_id, None);
        assert_eq!(h.protocol, 1);
        for m in ["hello", "ports", "health", "boot_id", "uname"] {
            assert_eq!(method_version(m), 1, "{m}");
        }
        assert_eq!(method_version("reconfigure"), 2);
    }
}
