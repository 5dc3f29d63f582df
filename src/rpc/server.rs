//! The RPC server: a smol accept loop over a Unix socket.
//!
//! Every connection's peer is checked with `SO_PEERCRED` against an allow-list of uids before a
//! byte is read; the request is read under a size cap and a deadline; the handler runs on smol's
//! blocking pool; one JSON log line is written per RPC. On stop the listener closes at once and
//! in-flight requests get a bounded time to finish.

use super::peer::{peer_of, Peer};
use super::proto::{self, ErrorCode, Response, RpcError};
use crate::error::{Context, Error, Result};
use serde_json::{json, Value};
use smol::io::{AsyncReadExt, AsyncWriteExt};
use smol::Async;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One call as the handler sees it.
#[derive(Debug, Clone)]
pub struct Call {
    /// Method name.
    pub method: String,
    /// Operation id (from the request, or made by the server).
    pub op_id: String,
    /// Who called.
    pub peer: Peer,
}

/// A result ready for the wire: a JSON value, or JSON already serialized (large lists skip the
/// intermediate `Value` tree).
#[derive(Debug)]
pub enum Reply {
    /// A JSON value.
    Json(Value),
    /// Serialized JSON, sent as it is.
    Raw(Box<serde_json::value::RawValue>),
}

/// A method table. Runs on a blocking thread: it may block.
pub trait Handler: Send + Sync + 'static {
    /// Handles one call.
    fn handle(&self, call: &Call, params: Value) -> Result<Value, RpcError>;

    /// Handles one call, possibly answering with pre-serialized JSON. The server calls this.
    fn handle_reply(&self, call: &Call, params: Value) -> Result<Reply, RpcError> {
        self.handle(call, params).map(Reply::Json)
    }
}

/// How a server behaves.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Role name for log lines (`bangerd`, `bangerd-root`).
    pub role: &'static str,
    /// Uids allowed to connect; everyone else gets `unauthorized`.
    pub allowed_uids: Vec<u32>,
    /// Largest request accepted.
    pub max_request: usize,
    /// Deadline for reading one request.
    pub read_deadline: Duration,
    /// How long in-flight requests may run after stop.
    pub drain_timeout: Duration,
}

impl ServerConfig {
    /// Defaults of DESIGN §4 for `role`, allowing `allowed_uids`.
    pub fn new(role: &'static str, allowed_uids: Vec<u32>) -> Self {
        ServerConfig {
            role,
            allowed_uids,
            max_request: proto::MAX_REQUEST_BYTES,
            read_deadline: proto::READ_DEADLINE,
            drain_timeout: Duration::from_secs(10),
        }
    }
}

/// Binds `path` with `mode`, optionally chowned to `owner` (uid, gid).
///
/// A stale socket (nobody answers) is replaced; a live one is an error, so two daemons never
/// share a socket.
pub fn bind(path: &Path, mode: u32, owner: Option<(u32, u32)>) -> Result<UnixListener> {
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(Error::new(
                format!("binding {}", path.display()),
                "another server is already answering on this socket",
            )
            .hint("stop it first, e.g. sudo systemctl stop bangerd"));
        }
        std::fs::remove_file(path).ctx(|| format!("removing stale socket {}", path.display()))?;
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).ctx(|| format!("creating {}", dir.display()))?;
    }
    // Bind under a tight umask so the socket is never briefly world-connectable.
    let old = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o177));
    let bound = UnixListener::bind(path);
    rustix::process::umask(old);
    let listener = bound.ctx(|| format!("binding {}", path.display()))?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(path, Some(uid), Some(gid))
            .ctx(|| format!("chowning {} to {uid}:{gid}", path.display()))?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .ctx(|| format!("setting mode {mode:o} on {}", path.display()))?;
    Ok(listener)
}

/// Serves until `stop` yields (or its senders are dropped), then drains in-flight requests.
pub fn serve(
    listener: UnixListener,
    cfg: ServerConfig,
    handler: Arc<dyn Handler>,
    stop: smol::channel::Receiver<()>,
) -> Result<()> {
    smol::block_on(async move {
        let listener = Async::new(listener).ctx(|| "making the listener non-blocking".into())?;
        let inflight = Arc::new(AtomicUsize::new(0));
        let cfg = Arc::new(cfg);
        loop {
            let accept = async { Some(listener.accept().await) };
            let stopped = async {
                let _ = stop.recv().await;
                None
            };
            match smol::future::or(accept, stopped).await {
                Some(Ok((stream, _))) => {
                    inflight.fetch_add(1, Ordering::SeqCst);
                    let guard = InFlight(inflight.clone());
                    let (cfg, handler) = (cfg.clone(), handler.clone());
                    smol::spawn(async move {
                        let _guard = guard;
                        connection(stream, &cfg, handler).await;
                    })
                    .detach();
                }
                Some(Err(e)) => {
                    crate::logging::error(
                        cfg.role,
                        "accept failed",
                        json!({"error": e.to_string()}),
                    );
                    smol::Timer::after(Duration::from_millis(20)).await;
                }
                None => break,
            }
        }
        drop(listener);
        let deadline = Instant::now() + cfg.drain_timeout;
        while inflight.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            smol::Timer::after(Duration::from_millis(5)).await;
        }
        let left = inflight.load(Ordering::SeqCst);
        if left > 0 {
            crate::logging::error(
                cfg.role,
                "stopped with requests still running",
                json!({"in_flight": left}),
            );
        }
        Ok(())
    })
}

struct InFlight(Arc<AtomicUsize>);
impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

enum ReadError {
    TooLarge,
    Io(std::io::Error),
    Timeout,
}

async fn read_request(stream: &mut Async<UnixStream>, max: usize) -> Result<Vec<u8>, ReadError> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 8192];
    loop {
        let n = stream.read(&mut chunk).await.map_err(ReadError::Io)?;
        if n == 0 {
            return Ok(buf);
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > max {
            return Err(ReadError::TooLarge);
        }
        if let Some(pos) = buf.iter().position(|&b| b == b'\n') {
            buf.truncate(pos);
            return Ok(buf);
        }
    }
}

async fn connection(stream: Async<UnixStream>, cfg: &ServerConfig, handler: Arc<dyn Handler>) {
    let started = Instant::now();
    let mut stream = stream;
    let peer = match peer_of(stream.get_ref()) {
        Ok(p) => p,
        Err(e) => {
            crate::logging::error(
                cfg.role,
                "peer credentials unavailable",
                json!({"error": e.to_string()}),
            );
            return;
        }
    };
    let mut op_id = proto::new_op_id();
    let mut method = String::new();
    let outcome: Result<Reply, RpcError> = if !cfg.allowed_uids.contains(&peer.uid) {
        Err(RpcError::new(
            ErrorCode::Unauthorized,
            format!(
                "uid {} may not use this socket (only the owner and root may)",
                peer.uid
            ),
        ))
    } else {
        let timeout = async {
            smol::Timer::after(cfg.read_deadline).await;
            Err(ReadError::Timeout)
        };
        match smol::future::or(read_request(&mut stream, cfg.max_request), timeout).await {
            Err(ReadError::TooLarge) => Err(RpcError::bad_request(format!(
                "request larger than {} bytes",
                cfg.max_request
            ))),
            Err(ReadError::Timeout) => Err(RpcError::bad_request(format!(
                "request not received within {} ms",
                cfg.read_deadline.as_millis()
            ))),
            Err(ReadError::Io(e)) => Err(RpcError::bad_request(format!("reading request: {e}"))),
            Ok(bytes) => match proto::parse_request(&bytes) {
                Err(e) => Err(e),
                Ok(req) => {
                    if let Some(id) = req.op_id.filter(|i| !i.is_empty() && i.len() <= 64) {
                        op_id = id;
                    }
                    method = req.method.clone();
                    let call = Call {
                        method: req.method,
                        op_id: op_id.clone(),
                        peer,
                    };
                    smol::unblock(move || handler.handle_reply(&call, req.params)).await
                }
            },
        }
    };
    let (body, code) = match outcome {
        Ok(Reply::Json(v)) => (serde_json::to_vec(&Response::success(v)), None),
        Ok(Reply::Raw(raw)) => {
            let mut b = Vec::with_capacity(raw.get().len() + 24);
            b.extend_from_slice(br#"{"ok":true,"result":"#);
            b.extend_from_slice(raw.get().as_bytes());
            b.push(b'}');
            (Ok(b), None)
        }
        Err(mut e) => {
            e.op_id = op_id.clone();
            let c = e.code.as_str();
            (serde_json::to_vec(&Response::failure(e)), Some(c))
        }
    };
    let mut body = body.unwrap_or_else(|_| {
        br#"{"ok":false,"error":{"code":"operation_failed","message":"response not serializable"}}"#
            .to_vec()
    });
    body.push(b'\n');
    let write_ok = stream.write_all(&body).await.is_ok() && stream.flush().await.is_ok();
    if code.is_some() {
        // Closing a Unix socket with unread input resets it and the peer loses our answer, so
        // discard what is left of a refused request (bounded in bytes and time) before closing.
        let _ = stream.get_ref().shutdown(std::net::Shutdown::Write);
        let drain = async {
            let mut sink = [0u8; 8192];
            let mut left = 2 * cfg.max_request + 8192;
            while left > 0 {
                match stream.read(&mut sink).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => left = left.saturating_sub(n),
                }
            }
        };
        smol::future::or(drain, async {
            smol::Timer::after(Duration::from_secs(1)).await;
        })
        .await;
    }
    crate::logging::info(
        cfg.role,
        "rpc",
        json!({
            "method": method,
            "op_id": op_id,
            "uid": peer.uid,
            "pid": peer.pid,
            "ok": code.is_none(),
            "code": code,
            "duration_ms": started.elapsed().as_secs_f64() * 1000.0,
            "written": write_ok,
        }),
    );
}
