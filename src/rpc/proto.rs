//! The request/response envelope, error codes and limits of the wire protocol.
//!
//! Request: `{"v":1,"method":"vm.list","params":{…},"op_id":"op-…"}` terminated by `\n` or EOF.
//! Response: `{"ok":true,"result":…}` or `{"ok":false,"error":{"code":…,"message":…,"op_id":…}}`.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::time::Duration;

/// Protocol version spoken by this binary.
pub const PROTOCOL_VERSION: u32 = 1;
/// Largest request a server reads; a larger one is answered with `bad_request`.
pub const MAX_REQUEST_BYTES: usize = 1 << 20;
/// Largest response a client accepts.
pub const MAX_RESPONSE_BYTES: usize = 64 << 20;
/// How long a server waits for a whole request to arrive.
pub const READ_DEADLINE: Duration = Duration::from_secs(5);
/// How long a server may take to hand a whole response to a client that does not read it.
pub const WRITE_DEADLINE: Duration = Duration::from_secs(10);
/// Most connections one server holds open at once. At the cap, a new connection makes the server
/// close the one that has waited longest without sending its request (idle reaping); when every
/// held connection is running a call, the new one is answered `busy`.
pub const MAX_CONNECTIONS: usize = 256;

/// One request.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Request {
    /// Protocol version; must be [`PROTOCOL_VERSION`].
    pub v: u32,
    /// Method name, e.g. `daemon.status`.
    pub method: String,
    /// Method parameters (an object, or null).
    #[serde(default)]
    pub params: Value,
    /// Caller-chosen operation id; the server makes one when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub op_id: Option<String>,
}

/// Error codes of the protocol.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Malformed, oversized or invalid request.
    BadRequest,
    /// Unsupported protocol version.
    BadVersion,
    /// No such method.
    UnknownMethod,
    /// The named thing does not exist.
    NotFound,
    /// The named thing exists already.
    AlreadyExists,
    /// The peer may not call this server or method.
    Unauthorized,
    /// Something else is in progress.
    Busy,
    /// The method ran and failed.
    OperationFailed,
}

impl ErrorCode {
    /// The wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::BadVersion => "bad_version",
            ErrorCode::UnknownMethod => "unknown_method",
            ErrorCode::NotFound => "not_found",
            ErrorCode::AlreadyExists => "already_exists",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Busy => "busy",
            ErrorCode::OperationFailed => "operation_failed",
        }
    }
}

/// An error response; `op_id` is always set by the server.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RpcError {
    /// Machine-readable code.
    pub code: ErrorCode,
    /// Human message: what failed, why, what to do.
    pub message: String,
    /// The operation id of the failed request.
    #[serde(default)]
    pub op_id: String,
}

impl RpcError {
    /// A new error without an op_id (the server fills it in).
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        RpcError {
            code,
            message: message.into(),
            op_id: String::new(),
        }
    }
    /// `bad_request` shorthand.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadRequest, message)
    }
}

impl std::fmt::Display for RpcError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} [{}", self.message, self.code.as_str())?;
        if !self.op_id.is_empty() {
            write!(f, ", op {}", self.op_id)?;
        }
        write!(f, "]")
    }
}

impl From<crate::error::Error> for RpcError {
    fn from(e: crate::error::Error) -> Self {
        RpcError::new(ErrorCode::OperationFailed, e.to_string())
    }
}

/// One response.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Response {
    /// True on success.
    pub ok: bool,
    /// The result on success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    /// The error on failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<RpcError>,
}

impl Response {
    /// A success response.
    pub fn success(result: Value) -> Self {
        Response {
            ok: true,
            result: Some(result),
            error: None,
        }
    }
    /// A failure response.
    pub fn failure(error: RpcError) -> Self {
        Response {
            ok: false,
            result: None,
            error: Some(error),
        }
    }
}

/// A fresh operation id: `op-` and 12 random hex digits.
pub fn new_op_id() -> String {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 6];
    let rng = ring::rand::SystemRandom::new();
    if rng.fill(&mut b).is_err() {
        // Fall back to time + pid; uniqueness within one host is all we need.
        let t = crate::clock::now_epoch() as u64 ^ u64::from(std::process::id()) << 32;
        return format!("op-{t:012x}");
    }
    format!("op-{}", hex::encode(b))
}

/// Parses and validates one request body.
pub fn parse_request(bytes: &[u8]) -> Result<Request, RpcError> {
    let req: Request = serde_json::from_slice(bytes)
        .map_err(|e| RpcError::bad_request(format!("malformed request: {e}")))?;
    if req.v != PROTOCOL_VERSION {
        return Err(RpcError::new(
            ErrorCode::BadVersion,
            format!(
                "protocol version {} is not supported (this server speaks {PROTOCOL_VERSION}; upgrade the older side)",
                req.v
            ),
        ));
    }
    if req.method.is_empty() || req.method.len() > 128 {
        return Err(RpcError::bad_request("method name is empty or too long"));
    }
    if !(req.params.is_object() || req.params.is_null()) {
        return Err(RpcError::bad_request("params must be an object"));
    }
    Ok(req)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_table() {
        let cases: &[(&str, Option<ErrorCode>)] = &[
            (r#"{"v":1,"method":"ping"}"#, None),
            (
                r#"{"v":1,"method":"ping","params":{},"op_id":"op-1"}"#,
                None,
            ),
            (r#"{"v":2,"method":"ping"}"#, Some(ErrorCode::BadVersion)),
            (r#"{"v":1}"#, Some(ErrorCode::BadRequest)),
            (r#"{"v":1,"method":""}"#, Some(ErrorCode::BadRequest)),
            (
                r#"{"v":1,"method":"x","params":[1]}"#,
                Some(ErrorCode::BadRequest),
            ),
            ("not json", Some(ErrorCode::BadRequest)),
            ("", Some(ErrorCode::BadRequest)),
        ];
        for (input, want) in cases {
            let got = parse_request(input.as_bytes());
            match want {
                None => assert!(got.is_ok(), "{input}: {got:?}"),
                Some(c) => assert_eq!(got.unwrap_err().code, *c, "{input}"),
            }
        }
    }

    #[test]
    fn error_wire_shape() {
        let mut e = RpcError::new(ErrorCode::NotFound, "no vm x");
        e.op_id = "op-1".into();
        let s = serde_json::to_string(&Response::failure(e)).unwrap();
        assert_eq!(
            s,
            r#"{"ok":false,"error":{"code":"not_found","message":"no vm x","op_id":"op-1"}}"#
        );
        assert!(new_op_id().starts_with("op-"));
        assert_ne!(new_op_id(), new_op_id());
    }
}
