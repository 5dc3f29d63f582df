//! The guest-agent protocol: what the in-guest agent answers and how the host asks.
//!
//! Owns the request/response lines (one JSON request line → one JSON response line), the request
//! handler shared by the real agent (`banger-vsock-agent`, on AF_VSOCK port [`AGENT_VSOCK_PORT`])
//! and the test stand-in VMM, the host side of Firecracker's vsock handshake, and the console
//! readiness line of guests without the agent. Submodules: [`cmdline`] (the guest's configuration
//! from the kernel command line), [`prepare`] (what the agent does to the guest at start),
//! [`guest_files`] (its unit and the sshd drop-in, for images),
//! [`ports`] (listening TCP sockets). It never listens on AF_VSOCK itself (that is the agent role's
//! wiring) and never executes anything a request names: the method table is fixed.
//!
//! Wire format (protocol [`PROTOCOL_VERSION`]; a request may carry `"v"`, the protocol it speaks,
//! and one newer than the agent's is refused):
//! `{"method":"hello"}` → `{"ok":true,"result":{"protocol":1,"boot_id":"…","host_key":"ssh-ed25519 AAAA…","hostname":"…"}}`
//! (plus `"problems":[…]` when the agent's start-up preparation refused or failed something);
//! `{"method":"ports"}` → `{"ok":true,"result":{"ports":[{"address":"0.0.0.0","port":22,"process":"sshd"},…]}}`;
//! `{"method":"health"}` → `{"ok":true,"result":{"status":"ok"}}`;
//! `{"method":"boot_id"}` → `{"ok":true,"result":{"boot_id":"…"}}`;
//! `{"method":"uname"}` → `{"ok":true,"result":{"sysname":"Linux","release":"…","machine":"x86_64"}}`;
//! anything else → `{"ok":false,"error":"…"}`.

pub mod cmdline;
pub mod guest_files;
pub mod ports;
pub mod prepare;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::{Context, Error, Result};

/// The guest vsock port the agent listens on.
pub const AGENT_VSOCK_PORT: u32 = 52;

/// The protocol this agent speaks; `hello` reports it. Bumped when an answer changes shape.
pub const PROTOCOL_VERSION: u32 = 1;

/// The requests the agent answers.
pub const METHODS: [&str; 5] = ["hello", "ports", "health", "boot_id", "uname"];

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
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// Read it from this file on every request (trimmed).
    File(PathBuf),
    /// Serve this fixed value (the stand-in VMM's fake guest, tests).
    Fixed(String),
}

/// The boot id's source (Linux: [`BOOT_ID_PATH`]).
pub type BootIdSource = Source;

impl Source {
    fn read(&self) -> std::result::Result<String, String> {
        match self {
            Source::Fixed(v) => Ok(v.clone()),
            Source::File(p) => std::fs::read_to_string(p)
                .map(|s| s.trim().to_string())
                .map_err(|e| format!("reading {}: {e}", p.display())),
        }
    }
}

/// What the handler reads from its surroundings; injectable so tests and the stand-in can serve
/// their own answers.
#[derive(Debug, Clone, PartialEq, Eq)]
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
}

impl Default for AgentEnv {
    fn default() -> Self {
        AgentEnv {
            boot_id: Source::File(PathBuf::from(BOOT_ID_PATH)),
            host_key: Source::File(Path::new("/").join(HOST_KEY_PUB)),
            hostname: Source::File(PathBuf::from(HOSTNAME_PATH)),
            proc_dir: Some(PathBuf::from("/proc")),
            problems: Vec::new(),
        }
    }
}

impl AgentEnv {
    /// The stand-in's fake guest: fixed boot id, host key and hostname, no listening sockets.
    pub fn fixed(boot_id: &str, host_key: &str, hostname: &str) -> Self {
        AgentEnv {
            boot_id: Source::Fixed(boot_id.into()),
            host_key: Source::Fixed(host_key.into()),
            hostname: Source::Fixed(hostname.into()),
            proc_dir: None,
            problems: Vec::new(),
        }
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
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Request {
    method: String,
    #[serde(default)]
    v: Option<u32>,
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
        Source::Fixed(k) => ed25519_public_key(k)?,
    };
    let hostname = env.hostname.read()?;
    let mut v = json!({
        "protocol": PROTOCOL_VERSION,
        "boot_id": boot_id,
        "host_key": host_key,
        "hostname": hostname,
    });
    if !env.problems.is_empty() {
        v["problems"] = json!(env.problems);
    }
    Ok(v)
}

/// Answers one request line with one response line (no trailing newline).
pub fn handle_line(line: &str, env: &AgentEnv) -> String {
    let req: Request = match serde_json::from_str(line.trim()) {
        Ok(r) => r,
        Err(e) => return fail(format!("bad request: {e}")),
    };
    if let Some(v) = req.v {
        if v > PROTOCOL_VERSION {
            return fail(format!(
                "protocol version {v} not supported (this agent speaks {PROTOCOL_VERSION}; update the guest image)"
            ));
        }
    }
    match req.method.as_str() {
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
    }
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
        let answer = match std::str::from_utf8(&line) {
            Ok(s) => handle_line(s, env),
            Err(_) => fail("bad request: not UTF-8"),
        };
        reader
            .get_mut()
            .write_all(format!("{answer}\n").as_bytes())?;
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
    let what = || format!("guest agent call {method:?} via {}", uds_path.display());
    let mut s = vsock_connect(uds_path, port, DEFAULT_CALL_TIMEOUT)?;
    let req = json!({"method": method, "v": PROTOCOL_VERSION}).to_string();
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

/// Calls `hello` on the agent at guest vsock `port` behind `uds_path` (protocol
/// [`PROTOCOL_VERSION`]) and decodes the answer.
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
    Ok(h)
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
            },
            d,
        )
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
            "unknown method \"exec\" (known: hello, ports, health, boot_id, uname)"
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
            "protocol": PROTOCOL_VERSION,
            "boot_id": "0f3a9c1e-5b7d-4e2a-9c8b-1a2b3c4d5e6f",
            "host_key": HOST_KEY,
            "hostname": "dev",
        }});
        assert_eq!(v(r#"{"method":"hello"}"#, &env), want);
        assert_eq!(v(r#"{"method":"hello","v":1}"#, &env), want);
        let r = v(r#"{"method":"hello","v":2}"#, &env);
        assert!(
            r["error"]
                .as_str()
                .is_some_and(|e| e.contains("protocol version 2 not supported")),
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
            for _ in 0..3 {
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
            }
        );
        let e = agent_call(&sock, 53, "health").unwrap_err();
        assert!(
            e.why.contains("closed the connection during the handshake"),
            "{e}"
        );
        h.join().unwrap();
        let _ = std::fs::remove_file(&sock);
        let _ = std::fs::remove_dir_all(p);
    }
}
