//! The Firecracker API client: HTTP/1.1 over one VM's API Unix socket, typed with [`super::models`].
//!
//! Owns the wire mechanics (request framing, response parsing with `httparse`, `Content-Length`,
//! timeouts) and the mapping of Firecracker's error bodies to [`ApiError`], whose message carries
//! Firecracker's `fault_message` verbatim. It never launches, signals or finds a VMM process: that
//! belongs to the launch code, which hands this client a socket path.
//!
//! Every call opens its own connection and is bounded by the client's timeout, so a wedged VMM can
//! delay a caller by at most that long per request.

use std::fmt;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::models::{
    ActionType, BootSource, Drive, Fault, FirecrackerVersion, InstanceActionInfo, InstanceInfo,
    Logger, MachineConfiguration, Metrics, NetworkInterface, PartialDrive, SerialDevice,
    SnapshotCreateParams, SnapshotLoadParams, Vm, VmState, Vsock,
};
use crate::error::{Context, Error, Result};

/// Default per-request timeout (connect, write, read).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest response the client accepts; Firecracker's answers are a few hundred bytes.
pub const MAX_RESPONSE: usize = 1 << 20;

const MAX_HEADERS: usize = 32;

/// A failed API call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiError {
    /// Firecracker answered with a non-2xx status.
    Fault {
        /// The request, e.g. `PUT /boot-source`.
        request: String,
        /// HTTP status code.
        status: u16,
        /// Firecracker's `fault_message`, verbatim (or the raw body if it had none).
        fault_message: String,
    },
    /// The request never got an HTTP answer (socket, timeout, malformed response, bad JSON).
    Transport(Error),
}

impl ApiError {
    /// The HTTP status of a fault, `None` for transport failures.
    pub fn status(&self) -> Option<u16> {
        match self {
            ApiError::Fault { status, .. } => Some(*status),
            ApiError::Transport(_) => None,
        }
    }

    /// Firecracker's `fault_message`, `None` for transport failures.
    pub fn fault_message(&self) -> Option<&str> {
        match self {
            ApiError::Fault { fault_message, .. } => Some(fault_message),
            ApiError::Transport(_) => None,
        }
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ApiError::Fault {
                request,
                status,
                fault_message,
            } => write!(f, "Firecracker {request}: {status}: {fault_message}"),
            ApiError::Transport(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for ApiError {}

impl From<ApiError> for Error {
    fn from(e: ApiError) -> Error {
        match e {
            ApiError::Fault {
                request,
                status,
                fault_message,
            } => Error::new(
                format!("Firecracker {request}"),
                format!("{status}: {fault_message}"),
            ),
            ApiError::Transport(e) => e,
        }
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> ApiError {
        ApiError::Transport(e)
    }
}

/// An HTTP response, as far as the client cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Body bytes (exactly `Content-Length` of them).
    pub body: Vec<u8>,
}

/// The parsed head of a response: status, body length and where the body starts.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Head {
    status: u16,
    content_length: Option<usize>,
    head_len: usize,
}

/// Parses a response head from `buf`; `Ok(None)` if more bytes are needed.
fn parse_head(buf: &[u8]) -> Result<Option<Head>> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let head_len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(Error::new("parsing the Firecracker API response head", e)),
    };
    let status = resp
        .code
        .ok_or_else(|| Error::new("parsing the Firecracker API response head", "no status"))?;
    let mut content_length = None;
    for h in resp.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            let v = std::str::from_utf8(h.value)
                .ok()
                .and_then(|s| s.trim().parse::<usize>().ok())
                .ok_or_else(|| {
                    Error::new(
                        "parsing the Firecracker API response head",
                        format!("bad Content-Length {:?}", String::from_utf8_lossy(h.value)),
                    )
                })?;
            content_length = Some(v);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(Error::new(
                "parsing the Firecracker API response head",
                "Transfer-Encoding is not supported (Firecracker always sends Content-Length)",
            ));
        }
    }
    Ok(Some(Head {
        status,
        content_length,
        head_len,
    }))
}

/// Whether a response with this status has no body by definition.
fn bodyless(status: u16) -> bool {
    status == 204 || status == 304 || (100..200).contains(&status)
}

/// Parses one complete response from `buf` (head plus body). `Ok(None)` means incomplete.
/// Without `Content-Length`, a body-carrying response runs to the end of `buf` (`eof` says whether
/// the peer closed).
fn parse_response(buf: &[u8], eof: bool) -> Result<Option<Response>> {
    let Some(head) = parse_head(buf)? else {
        return Ok(None);
    };
    let rest = &buf[head.head_len..];
    let len = match head.content_length {
        Some(n) => n,
        None if bodyless(head.status) => 0,
        None if eof => rest.len(),
        None => return Ok(None),
    };
    if len > MAX_RESPONSE {
        return Err(Error::new(
            "reading the Firecracker API response",
            format!("body of {len} bytes exceeds the {MAX_RESPONSE}-byte cap"),
        ));
    }
    if rest.len() < len {
        return Ok(None);
    }
    Ok(Some(Response {
        status: head.status,
        body: rest[..len].to_vec(),
    }))
}

/// Turns a non-2xx response into [`ApiError::Fault`], keeping `fault_message` verbatim.
fn fault_of(request: &str, resp: &Response) -> ApiError {
    let fault_message = match serde_json::from_slice::<Fault>(&resp.body) {
        Ok(f) => f.fault_message,
        Err(_) if resp.body.is_empty() => "(empty body)".to_string(),
        Err(_) => String::from_utf8_lossy(&resp.body).into_owned(),
    };
    ApiError::Fault {
        request: request.to_string(),
        status: resp.status,
        fault_message,
    }
}

/// A client for one VM's Firecracker API socket.
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
    timeout: Duration,
}

impl Client {
    /// A client for the API socket at `socket`, with [`DEFAULT_TIMEOUT`].
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Client {
            socket: socket.into(),
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// The same client with another per-request timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The API socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// `PUT /boot-source`.
    pub fn put_boot_source(&self, body: &BootSource) -> Result<(), ApiError> {
        self.put("/boot-source", body)
    }

    /// `PUT /drives/{drive_id}`, the id taken from `body.drive_id`.
    pub fn put_drive(&self, body: &Drive) -> Result<(), ApiError> {
        self.put(&format!("/drives/{}", body.drive_id), body)
    }

    /// `PUT /machine-config`.
    pub fn put_machine_config(&self, body: &MachineConfiguration) -> Result<(), ApiError> {
        self.put("/machine-config", body)
    }

    /// `PUT /network-interfaces/{iface_id}`, the id taken from `body.iface_id`.
    pub fn put_network_interface(&self, body: &NetworkInterface) -> Result<(), ApiError> {
        self.put(&format!("/network-interfaces/{}", body.iface_id), body)
    }

    /// `PUT /vsock`.
    pub fn put_vsock(&self, body: &Vsock) -> Result<(), ApiError> {
        self.put("/vsock", body)
    }

    /// `PUT /serial` (pre-boot only): the serial console's output path and rate limiter.
    pub fn put_serial(&self, body: &SerialDevice) -> Result<(), ApiError> {
        self.put("/serial", body)
    }

    /// `PUT /logger`.
    pub fn put_logger(&self, body: &Logger) -> Result<(), ApiError> {
        self.put("/logger", body)
    }

    /// `PUT /metrics`.
    pub fn put_metrics(&self, body: &Metrics) -> Result<(), ApiError> {
        self.put("/metrics", body)
    }

    /// `PUT /actions` with `action_type`.
    pub fn action(&self, action_type: ActionType) -> Result<(), ApiError> {
        self.put("/actions", &InstanceActionInfo { action_type })
    }

    /// `PUT /actions` InstanceStart: boots the configured guest.
    pub fn instance_start(&self) -> Result<(), ApiError> {
        self.action(ActionType::InstanceStart)
    }

    /// `PUT /actions` SendCtrlAltDel: asks the guest to reboot, which ends the VMM.
    pub fn send_ctrl_alt_del(&self) -> Result<(), ApiError> {
        self.action(ActionType::SendCtrlAltDel)
    }

    /// `PUT /actions` FlushMetrics.
    pub fn flush_metrics(&self) -> Result<(), ApiError> {
        self.action(ActionType::FlushMetrics)
    }

    /// `GET /`: id, state, versions.
    pub fn instance_info(&self) -> Result<InstanceInfo, ApiError> {
        self.get("/")
    }

    /// `GET /version`.
    pub fn version(&self) -> Result<FirecrackerVersion, ApiError> {
        self.get("/version")
    }

    /// `PATCH /vm`: pauses or resumes the vCPUs (post-boot).
    pub fn patch_vm(&self, state: VmState) -> Result<(), ApiError> {
        self.send("PATCH", "/vm", &Vm { state })
    }

    /// `PATCH /vm` Paused.
    pub fn pause(&self) -> Result<(), ApiError> {
        self.patch_vm(VmState::Paused)
    }

    /// `PATCH /vm` Resumed.
    pub fn resume(&self) -> Result<(), ApiError> {
        self.patch_vm(VmState::Resumed)
    }

    /// `PATCH /drives/{drive_id}` (post-boot), the id taken from `body.drive_id`.
    pub fn patch_drive(&self, body: &PartialDrive) -> Result<(), ApiError> {
        self.send("PATCH", &format!("/drives/{}", body.drive_id), body)
    }

    /// `PUT /snapshot/create` (the VM must be Paused).
    pub fn create_snapshot(&self, body: &SnapshotCreateParams) -> Result<(), ApiError> {
        self.put("/snapshot/create", body)
    }

    /// `PUT /snapshot/load` (a fresh VMM only). On failure Firecracker exits.
    pub fn load_snapshot(&self, body: &SnapshotLoadParams) -> Result<(), ApiError> {
        self.put("/snapshot/load", body)
    }

    /// `PUT path` with any JSON body; for callers (and tests) that need a body the typed
    /// methods cannot express.
    pub fn put_json(&self, path: &str, body: &serde_json::Value) -> Result<(), ApiError> {
        self.put(path, body)
    }

    fn put<T: Serialize + ?Sized>(&self, path: &str, body: &T) -> Result<(), ApiError> {
        self.send("PUT", path, body)
    }

    fn send<T: Serialize + ?Sized>(
        &self,
        method: &str,
        path: &str,
        body: &T,
    ) -> Result<(), ApiError> {
        let request = format!("{method} {path}");
        let json = serde_json::to_vec(body).ctx(|| format!("encoding the body of {request}"))?;
        let resp = self.request(method, path, Some(&json))?;
        if (200..300).contains(&resp.status) {
            Ok(())
        } else {
            Err(fault_of(&request, &resp))
        }
    }

    fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ApiError> {
        let request = format!("GET {path}");
        let resp = self.request("GET", path, None)?;
        if !(200..300).contains(&resp.status) {
            return Err(fault_of(&request, &resp));
        }
        Ok(serde_json::from_slice(&resp.body).ctx(|| {
            format!(
                "decoding Firecracker's answer to {request} ({})",
                String::from_utf8_lossy(&resp.body)
            )
        })?)
    }

    /// Sends one request on a fresh connection and reads one response, whatever its status.
    pub fn request(&self, method: &str, path: &str, body: Option<&[u8]>) -> Result<Response> {
        let what = || {
            format!(
                "Firecracker API {method} {path} on {}",
                self.socket.display()
            )
        };
        let mut stream = UnixStream::connect(&self.socket).map_err(|e| {
            Error::new(what(), e).hint("is the VMM running? its console log says why it stopped")
        })?;
        stream.set_read_timeout(Some(self.timeout)).ctx(what)?;
        stream.set_write_timeout(Some(self.timeout)).ctx(what)?;

        let mut req =
            format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n");
        if let Some(b) = body {
            req.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                b.len()
            ));
        }
        req.push_str("\r\n");
        let mut out = req.into_bytes();
        out.extend_from_slice(body.unwrap_or_default());
        stream.write_all(&out).ctx(what)?;

        let deadline = Instant::now() + self.timeout;
        let mut buf = Vec::with_capacity(512);
        let mut chunk = [0u8; 4096];
        loop {
            if Instant::now() > deadline {
                return Err(Error::new(
                    what(),
                    format!("no complete answer within {:?}", self.timeout),
                ));
            }
            let n = match stream.read(&mut chunk) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(Error::new(
                        what(),
                        format!("no complete answer within {:?}", self.timeout),
                    ))
                }
                Err(e) => return Err(Error::new(what(), e)),
            };
            buf.extend_from_slice(&chunk[..n]);
            if buf.len() > MAX_RESPONSE + 64 * 1024 {
                return Err(Error::new(what(), "response exceeds the size cap"));
            }
            if let Some(resp) = parse_response(&buf, n == 0).map_err(|e| Error::new(what(), e))? {
                return Ok(resp);
            }
            if n == 0 {
                return Err(Error::new(
                    what(),
                    "connection closed before a complete response",
                ));
            }
        }
    }
}

/// Waits until something accepts connections on the Unix socket at `path`, polling every 10 ms,
/// for at most `timeout`. The error names the socket and how long it waited.
pub fn wait_for_socket(path: &Path, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let err = match UnixStream::connect(path) {
            Ok(_) => return Ok(()),
            Err(e) => e,
        };
        if Instant::now() >= deadline {
            let why = format!("nothing accepted connections within {timeout:?} (last: {err})");
            return Err(Error::new(
                format!("waiting for the Firecracker API socket {}", path.display()),
                why,
            )
            .hint("check the VMM's console log for why it did not start"));
        }
        // A refused connect costs microseconds; a coarse poll would add up to its interval to
        // every start and restore.
        thread::sleep(Duration::from_millis(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn parses_content_length_body() {
        let raw = b"HTTP/1.1 200 \r\nServer: Firecracker API\r\nContent-Type: application/json\r\nContent-Length: 31\r\n\r\n{\"firecracker_version\":\"1.16.1\"}";
        // Content-Length 31 cuts one byte short of the 32-byte body: parsing honours the header.
        let r = parse_response(raw, false).unwrap().unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.body.len(), 31);
        let raw =
            b"HTTP/1.1 200 OK\r\ncontent-length: 32\r\n\r\n{\"firecracker_version\":\"1.16.1\"}";
        let r = parse_response(raw, false).unwrap().unwrap();
        let v: FirecrackerVersion = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v.firecracker_version, "1.16.1");
    }

    #[test]
    fn incomplete_until_all_bytes_arrive() {
        let full = b"HTTP/1.1 400 \r\nContent-Length: 10\r\n\r\n0123456789";
        for cut in [5, 20, full.len() - 1] {
            assert_eq!(
                parse_response(&full[..cut], false).unwrap(),
                None,
                "cut {cut}"
            );
        }
        assert!(parse_response(full, false).unwrap().is_some());
    }

    #[test]
    fn no_content_204() {
        let r = parse_response(b"HTTP/1.1 204 \r\nServer: Firecracker API\r\n\r\n", false)
            .unwrap()
            .unwrap();
        assert_eq!(
            r,
            Response {
                status: 204,
                body: vec![]
            }
        );
    }

    #[test]
    fn no_content_length_reads_to_eof() {
        let raw = b"HTTP/1.1 500 \r\n\r\noops";
        assert_eq!(parse_response(raw, false).unwrap(), None);
        assert_eq!(parse_response(raw, true).unwrap().unwrap().body, b"oops");
    }

    #[test]
    fn malformed_heads_are_errors() {
        for raw in [
            &b"HTTX/1.1 200\r\n\r\n"[..],
            b"HTTP/1.1 200 \r\nContent-Length: x\r\n\r\n",
            b"HTTP/1.1 200 \r\nTransfer-Encoding: chunked\r\n\r\n",
            b"HTTP/1.1 200 \r\nContent-Length: 99999999999\r\n\r\n",
        ] {
            assert!(
                parse_response(raw, false).is_err(),
                "{:?}",
                String::from_utf8_lossy(raw)
            );
        }
    }

    #[test]
    fn fault_message_surfaces_verbatim() {
        let msg = "An error occurred when deserializing the json body of a request: missing field `kernel_image_path` at line 1 column 2.";
        let body = serde_json::to_vec(&Fault {
            fault_message: msg.into(),
        })
        .unwrap();
        let e = fault_of("PUT /boot-source", &Response { status: 400, body });
        assert_eq!(e.status(), Some(400));
        assert_eq!(e.fault_message(), Some(msg));
        let err: Error = e.into();
        assert_eq!(err.what, "Firecracker PUT /boot-source");
        assert_eq!(err.why, format!("400: {msg}"));
        // A body that is not a fault still reaches the operator.
        let e = fault_of(
            "GET /",
            &Response {
                status: 500,
                body: b"boom".to_vec(),
            },
        );
        assert_eq!(e.fault_message(), Some("boom"));
    }

    /// A one-shot server answering `answer` to whatever it receives; returns the request bytes.
    fn serve_once(dir: &Path, answer: Vec<u8>) -> (PathBuf, thread::JoinHandle<Vec<u8>>) {
        let sock = dir.join("api.sock");
        let l = UnixListener::bind(&sock).unwrap();
        let h = thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut req = vec![0u8; 4096];
            let n = s.read(&mut req).unwrap();
            req.truncate(n);
            // Dribble the answer to exercise reassembly.
            for part in answer.chunks(7) {
                s.write_all(part).unwrap();
                thread::sleep(Duration::from_millis(1));
            }
            req
        });
        (sock, h)
    }

    fn tempdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("banger-api-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn client_round_trip_and_fault() {
        let d = tempdir("rt");
        let (sock, h) = serve_once(
            &d,
            b"HTTP/1.1 204 \r\nServer: Firecracker API\r\n\r\n".to_vec(),
        );
        Client::new(&sock).instance_start().unwrap();
        let req = String::from_utf8(h.join().unwrap()).unwrap();
        assert!(req.starts_with("PUT /actions HTTP/1.1\r\n"), "{req}");
        assert!(req.contains("Content-Length: 31\r\n"), "{req}");
        assert!(
            req.ends_with("\r\n\r\n{\"action_type\":\"InstanceStart\"}"),
            "{req}"
        );
        std::fs::remove_file(&sock).unwrap();

        let body = r#"{"fault_message":"Cannot start microvm without kernel configuration."}"#;
        let answer = format!(
            "HTTP/1.1 400 \r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let (sock, h) = serve_once(&d, answer.into_bytes());
        let e = Client::new(&sock).instance_start().unwrap_err();
        h.join().unwrap();
        assert_eq!(e.status(), Some(400));
        assert_eq!(
            e.fault_message(),
            Some("Cannot start microvm without kernel configuration.")
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn snapshot_calls_use_the_spec_methods() {
        use crate::vmm::models::{SnapshotCreateParams, SnapshotLoadParams, SnapshotType};
        let d = tempdir("snap");
        let ok = b"HTTP/1.1 204 \r\n\r\n".to_vec();
        let sock = d.join("api.sock");
        type Call = Box<dyn Fn(&Client) -> Result<(), ApiError>>;
        let cases: Vec<(&str, Call)> = vec![
            ("PATCH /vm HTTP/1.1", Box::new(|c| c.pause())),
            ("PATCH /vm HTTP/1.1", Box::new(|c| c.resume())),
            (
                "PUT /snapshot/create HTTP/1.1",
                Box::new(|c| {
                    c.create_snapshot(&SnapshotCreateParams {
                        mem_file_path: "/m".into(),
                        snapshot_path: "/s".into(),
                        snapshot_type: Some(SnapshotType::Full),
                    })
                }),
            ),
            (
                "PUT /snapshot/load HTTP/1.1",
                Box::new(|c| {
                    c.load_snapshot(&SnapshotLoadParams::from_files("/s".into(), "/m".into()))
                }),
            ),
            (
                "PATCH /drives/rootfs HTTP/1.1",
                Box::new(|c| {
                    c.patch_drive(&crate::vmm::models::PartialDrive {
                        drive_id: "rootfs".into(),
                        path_on_host: Some("/d".into()),
                        rate_limiter: None,
                    })
                }),
            ),
        ];
        for (want, call) in cases {
            let _ = std::fs::remove_file(&sock);
            let (sock, h) = serve_once(&d, ok.clone());
            call(&Client::new(&sock)).unwrap();
            let req = String::from_utf8(h.join().unwrap()).unwrap();
            assert!(req.starts_with(want), "{want}: {req}");
        }
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn wait_for_socket_is_bounded_and_says_what() {
        let d = tempdir("wait");
        let sock = d.join("never.sock");
        let e = wait_for_socket(&sock, Duration::from_millis(50)).unwrap_err();
        assert!(e.what.contains("never.sock"), "{e}");
        assert!(e.why.contains("50ms"), "{e}");
        let _l = UnixListener::bind(&sock).unwrap();
        wait_for_socket(&sock, Duration::from_millis(50)).unwrap();
        std::fs::remove_dir_all(&d).unwrap();
    }
}
