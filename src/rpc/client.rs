//! A blocking RPC client: one request, one response, bounded by a timeout.

use super::proto::{self, Request, Response, RpcError};
use crate::error::Error;
use serde_json::Value;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Default time a call may take end to end.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a call failed.
#[derive(Debug)]
pub enum CallError {
    /// Nobody is listening on the socket (missing, refused).
    NotRunning {
        /// The socket tried.
        socket: PathBuf,
        /// The connect error.
        source: std::io::Error,
    },
    /// Permission denied on the socket file.
    Denied {
        /// The socket tried.
        socket: PathBuf,
    },
    /// The connection broke or timed out.
    Io(std::io::Error),
    /// The server answered with an error.
    Rpc(RpcError),
    /// The server's answer was not a valid response.
    BadResponse(String),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::NotRunning { socket, source } => {
                write!(f, "nothing answers on {} ({source})", socket.display())
            }
            CallError::Denied { socket } => write!(f, "permission denied on {}", socket.display()),
            CallError::Io(e) => write!(f, "connection failed: {e}"),
            CallError::Rpc(e) => write!(f, "{e}"),
            CallError::BadResponse(m) => write!(f, "invalid response: {m}"),
        }
    }
}

impl CallError {
    /// Converts into a user-facing error for `what`, with the next step for the daemon socket.
    pub fn into_error(self, what: &str) -> Error {
        let hint = match &self {
            CallError::NotRunning { .. } => {
                Some("is the daemon running? check `banger system status`; start it with `sudo banger system restart`")
            }
            CallError::Denied { .. } => {
                Some("only the owner user and root may talk to banger; see `banger doctor`")
            }
            _ => None,
        };
        let e = Error::new(what, &self);
        match hint {
            Some(h) => e.hint(h),
            None => e,
        }
    }
}

/// Calls `method` with `params` on `socket` with the default timeout.
pub fn call(socket: &Path, method: &str, params: Value) -> Result<Value, CallError> {
    call_with_timeout(socket, method, params, DEFAULT_TIMEOUT)
}

/// Calls `method` with `params`, giving up after `timeout` on any read or write.
pub fn call_with_timeout(
    socket: &Path,
    method: &str,
    params: Value,
    timeout: Duration,
) -> Result<Value, CallError> {
    let body = request_body(method, params)?;
    let resp = exchange(socket, &body, timeout)?;
    match resp {
        Response {
            ok: true,
            result: Some(v),
            ..
        } => Ok(v),
        Response { ok: true, .. } => Ok(Value::Null),
        Response { error: Some(e), .. } => Err(CallError::Rpc(e)),
        _ => Err(CallError::BadResponse(
            "ok:false without an error object".into(),
        )),
    }
}

/// Like [`call_with_timeout`], but hands back the result as unparsed JSON (for large answers a
/// caller only prints).
pub fn call_raw(
    socket: &Path,
    method: &str,
    params: Value,
    timeout: Duration,
) -> Result<Box<serde_json::value::RawValue>, CallError> {
    #[derive(serde::Deserialize)]
    struct RawResponse {
        ok: bool,
        #[serde(default)]
        result: Option<Box<serde_json::value::RawValue>>,
        #[serde(default)]
        error: Option<RpcError>,
    }
    let body = request_body(method, params)?;
    let bytes = exchange_bytes(socket, &body, timeout)?;
    let resp: RawResponse =
        serde_json::from_slice(&bytes).map_err(|e| CallError::BadResponse(e.to_string()))?;
    match resp {
        RawResponse {
            ok: true,
            result: Some(r),
            ..
        } => Ok(r),
        RawResponse { error: Some(e), .. } => Err(CallError::Rpc(e)),
        _ => Err(CallError::BadResponse("no result and no error".into())),
    }
}

fn request_body(method: &str, params: Value) -> Result<Vec<u8>, CallError> {
    let req = Request {
        v: proto::PROTOCOL_VERSION,
        method: method.to_string(),
        params,
        op_id: Some(proto::new_op_id()),
    };
    let mut body = serde_json::to_vec(&req).map_err(|e| CallError::BadResponse(e.to_string()))?;
    body.push(b'\n');
    Ok(body)
}

/// Sends raw bytes and parses one response (used by tests to send malformed requests).
pub fn exchange(socket: &Path, body: &[u8], timeout: Duration) -> Result<Response, CallError> {
    let buf = exchange_bytes(socket, body, timeout)?;
    serde_json::from_slice(&buf).map_err(|e| CallError::BadResponse(e.to_string()))
}

/// Sends raw bytes and returns the raw response.
fn exchange_bytes(socket: &Path, body: &[u8], timeout: Duration) -> Result<Vec<u8>, CallError> {
    let mut s = UnixStream::connect(socket).map_err(|e| match e.kind() {
        std::io::ErrorKind::PermissionDenied => CallError::Denied {
            socket: socket.to_path_buf(),
        },
        _ => CallError::NotRunning {
            socket: socket.to_path_buf(),
            source: e,
        },
    })?;
    s.set_read_timeout(Some(timeout)).map_err(CallError::Io)?;
    s.set_write_timeout(Some(timeout)).map_err(CallError::Io)?;
    // A server that refuses early (oversized, unauthorized) may close before we finish writing;
    // its answer is still waiting to be read, so a broken pipe here is not the end.
    if let Err(e) = s.write_all(body) {
        if e.kind() != std::io::ErrorKind::BrokenPipe
            && e.kind() != std::io::ErrorKind::ConnectionReset
        {
            return Err(CallError::Io(e));
        }
    }
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut buf = Vec::new();
    (&mut s)
        .take(proto::MAX_RESPONSE_BYTES as u64 + 1)
        .read_to_end(&mut buf)
        .map_err(CallError::Io)?;
    if buf.len() > proto::MAX_RESPONSE_BYTES {
        return Err(CallError::BadResponse("response too large".into()));
    }
    if buf.is_empty() {
        return Err(CallError::BadResponse(
            "the server closed the connection without answering".into(),
        ));
    }
    Ok(buf)
}
