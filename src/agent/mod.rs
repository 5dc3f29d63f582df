//! The guest-agent protocol: what the in-guest agent answers and how the host asks.
//!
//! Owns the request/response lines (one JSON request line → one JSON response line), the request
//! handler shared by the real agent (`banger-vsock-agent`, on AF_VSOCK port [`AGENT_VSOCK_PORT`])
//! and the test stand-in VMM, the host side of Firecracker's vsock handshake, and the console
//! readiness line of guests without the agent. It never listens on AF_VSOCK itself (that is the
//! agent role's wiring) and never executes anything a request names: the method table is fixed.
//!
//! Wire format:
//! `{"method":"health"}` → `{"ok":true,"result":{"status":"ok"}}`;
//! `{"method":"boot_id"}` → `{"ok":true,"result":{"boot_id":"…"}}`;
//! `{"method":"uname"}` → `{"ok":true,"result":{"sysname":"Linux","release":"…","machine":"x86_64"}}`;
//! anything else → `{"ok":false,"error":"…"}`.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::{Context, Error, Result};

/// The guest vsock port the agent listens on.
pub const AGENT_VSOCK_PORT: u32 = 52;

/// Where Linux keeps the current boot's id.
pub const BOOT_ID_PATH: &str = "/proc/sys/kernel/random/boot_id";

/// Longest request line the agent reads; longer lines are refused.
pub const MAX_LINE: usize = 64 * 1024;

/// Default bound on a host-side agent call (connect, handshake, request, answer).
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// The prefix of the console readiness line, followed by the boot id.
pub const READY_PREFIX: &str = "banger-guest: ready boot_id=";

/// Where the agent gets the boot id from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootIdSource {
    /// Read it from this file on every request (Linux: [`BOOT_ID_PATH`]).
    File(PathBuf),
    /// Serve this fixed id (the stand-in VMM's fake guest, tests).
    Fixed(String),
}

/// What the handler reads from its surroundings; injectable so tests and the stand-in can serve
/// their own boot id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentEnv {
    /// The boot id's source.
    pub boot_id: BootIdSource,
}

impl Default for AgentEnv {
    fn default() -> Self {
        AgentEnv {
            boot_id: BootIdSource::File(PathBuf::from(BOOT_ID_PATH)),
        }
    }
}

#[derive(Deserialize)]
struct Request {
    method: String,
}

fn ok(result: Value) -> String {
    json!({"ok": true, "result": result}).to_string()
}

fn fail(error: impl std::fmt::Display) -> String {
    json!({"ok": false, "error": error.to_string()}).to_string()
}

/// Answers one request line with one response line (no trailing newline).
pub fn handle_line(line: &str, env: &AgentEnv) -> String {
    let req: Request = match serde_json::from_str(line.trim()) {
        Ok(r) => r,
        Err(e) => return fail(format!("bad request: {e}")),
    };
    match req.method.as_str() {
        "health" => ok(json!({"status": "ok"})),
        "boot_id" => match &env.boot_id {
            BootIdSource::Fixed(id) => ok(json!({"boot_id": id})),
            BootIdSource::File(p) => match std::fs::read_to_string(p) {
                Ok(s) => ok(json!({"boot_id": s.trim()})),
                Err(e) => fail(format!("reading {}: {e}", p.display())),
            },
        },
        "uname" => {
            let u = rustix::system::uname();
            ok(json!({
                "sysname": u.sysname().to_string_lossy(),
                "release": u.release().to_string_lossy(),
                "machine": u.machine().to_string_lossy(),
            }))
        }
        other => fail(format!(
            "unknown method {other:?} (known: health, boot_id, uname)"
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
    let req = json!({"method": method}).to_string();
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

    fn env_with(boot_id: &str, tag: &str) -> (AgentEnv, PathBuf) {
        let p = std::env::temp_dir().join(format!("banger-agent-{tag}-{}", std::process::id()));
        std::fs::write(&p, format!("{boot_id}\n")).unwrap();
        (
            AgentEnv {
                boot_id: BootIdSource::File(p.clone()),
            },
            p,
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
        let _ = std::fs::remove_file(p);
        let r = v(r#"{"method":"boot_id"}"#);
        assert_eq!(r["ok"], false);
        let fixed = AgentEnv {
            boot_id: BootIdSource::Fixed("feedface".into()),
        };
        assert_eq!(
            handle_line(r#"{"method":"boot_id"}"#, &fixed),
            r#"{"ok":true,"result":{"boot_id":"feedface"}}"#
        );
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
            for _ in 0..2 {
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
        let e = agent_call(&sock, 53, "health").unwrap_err();
        assert!(
            e.why.contains("closed the connection during the handshake"),
            "{e}"
        );
        h.join().unwrap();
        let _ = std::fs::remove_file(&sock);
        let _ = std::fs::remove_file(p);
    }
}
