//! The RPC server: a smol accept loop over a Unix socket.
//!
//! Every connection's peer is checked with `SO_PEERCRED` against an allow-list of uids before a
//! byte is read; the request is read under a size cap and a deadline; the handler runs on smol's
//! blocking pool; the response is written under a deadline; one JSON log line is written per RPC.
//! On stop the listener closes at once and in-flight requests get a bounded time to finish.
//!
//! Limits: at most `max_connections` connections are held at once. When a new one arrives at the
//! cap, the connection that has waited longest without sending its request is closed (idle
//! reaping), so a peer holding thousands of silent connections cannot lock other clients out or
//! run the server out of file descriptors; when every held connection is running a call, the new
//! one is answered `busy` at once. A client that never reads its response is cut off after
//! `write_deadline`.

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
    /// Deadline for writing one response.
    pub write_deadline: Duration,
    /// Most connections held at once (see the module doc).
    pub max_connections: usize,
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
            write_deadline: proto::WRITE_DEADLINE,
            max_connections: proto::MAX_CONNECTIONS,
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
        let conns = Arc::new(Connections::default());
        let cfg = Arc::new(cfg);
        let mut reaped_since_log = 0usize;
        let mut last_reap_log: Option<Instant> = None;
        loop {
            let accept = async { Some(listener.accept().await) };
            let stopped = async {
                let _ = stop.recv().await;
                None
            };
            match smol::future::or(accept, stopped).await {
                Some(Ok((stream, _))) => {
                    let admit = if conns.len() < cfg.max_connections {
                        Admit::Serve
                    } else if conns.reap_oldest_idle() {
                        reaped_since_log += 1;
                        Admit::Serve
                    } else {
                        Admit::Busy
                    };
                    if reaped_since_log > 0
                        && last_reap_log.is_none_or(|t| t.elapsed() >= REAP_LOG_EVERY)
                    {
                        crate::logging::log(
                            "warn",
                            cfg.role,
                            "connection cap reached: closed idle connections",
                            json!({"reaped": reaped_since_log, "max_connections": cfg.max_connections}),
                        );
                        reaped_since_log = 0;
                        last_reap_log = Some(Instant::now());
                    }
                    inflight.fetch_add(1, Ordering::SeqCst);
                    let guard = InFlight(inflight.clone());
                    let (cfg, handler) = (cfg.clone(), handler.clone());
                    let conn = conns.register();
                    smol::spawn(async move {
                        let _guard = guard;
                        match admit {
                            Admit::Serve => connection(stream, &cfg, handler, conn).await,
                            Admit::Busy => {
                                drop(conn);
                                refuse_busy(stream, &cfg).await;
                            }
                        }
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

/// How often a "closed idle connections" line may be logged.
const REAP_LOG_EVERY: Duration = Duration::from_secs(1);
/// How long a `busy` refusal may take to write and to drain: short, because refused connections
/// are not counted against the cap and must not pile up.
const BUSY_DEADLINE: Duration = Duration::from_millis(200);

enum Admit {
    Serve,
    Busy,
}

/// The connections a server holds, for the cap and idle reaping.
#[derive(Default)]
struct Connections {
    next: AtomicUsize,
    held: std::sync::Mutex<std::collections::HashMap<usize, Held>>,
}

struct Held {
    /// When it was accepted.
    since: Instant,
    /// Still waiting for its request (only these are reaped).
    idle: Arc<std::sync::atomic::AtomicBool>,
    /// Closes it while it waits.
    reap: smol::channel::Sender<()>,
}

/// One held connection: its registry entry is removed when this drops.
struct Conn {
    id: usize,
    conns: Arc<Connections>,
    idle: Arc<std::sync::atomic::AtomicBool>,
    reaped: smol::channel::Receiver<()>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.conns.lock().remove(&self.id);
    }
}

impl Connections {
    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<usize, Held>> {
        // A panic while holding this lock leaves a plain map behind: keep using it.
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn len(&self) -> usize {
        self.lock().len()
    }

    fn register(self: &Arc<Self>) -> Conn {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let idle = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let (tx, rx) = smol::channel::bounded(1);
        self.lock().insert(
            id,
            Held {
                since: Instant::now(),
                idle: idle.clone(),
                reap: tx,
            },
        );
        Conn {
            id,
            conns: self.clone(),
            idle,
            reaped: rx,
        }
    }

    /// Closes the connection that has waited longest for its request; false when none waits.
    fn reap_oldest_idle(&self) -> bool {
        let mut held = self.lock();
        let oldest = held
            .iter()
            .filter(|(_, h)| h.idle.load(Ordering::SeqCst))
            .min_by_key(|(_, h)| h.since)
            .map(|(id, _)| *id);
        match oldest.and_then(|id| held.remove(&id)) {
            Some(h) => {
                h.idle.store(false, Ordering::SeqCst);
                let _ = h.reap.try_send(());
                true
            }
            None => false,
        }
    }
}

/// Answers a connection over the cap `busy` (under the write deadline) and closes it.
async fn refuse_busy(stream: Async<UnixStream>, cfg: &ServerConfig) {
    let mut stream = stream;
    let mut e = RpcError::new(
        ErrorCode::Busy,
        format!(
            "the server holds {} connections, all running calls; retry shortly",
            cfg.max_connections
        ),
    );
    e.op_id = proto::new_op_id();
    let mut body = serde_json::to_vec(&Response::failure(e)).unwrap_or_default();
    body.push(b'\n');
    let write = async {
        let _ = stream.write_all(&body).await;
        let _ = stream.flush().await;
    };
    smol::future::or(write, async {
        smol::Timer::after(BUSY_DEADLINE).await;
    })
    .await;
    discard_rest(&mut stream, cfg, BUSY_DEADLINE).await;
    crate::logging::error(
        cfg.role,
        "connection refused: busy",
        json!({"max_connections": cfg.max_connections}),
    );
}

/// Closing a Unix socket with unread input resets it and the peer loses our answer, so discard
/// what is left of a refused request (bounded in bytes and time) before closing.
async fn discard_rest(stream: &mut Async<UnixStream>, cfg: &ServerConfig, within: Duration) {
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
        smol::Timer::after(within).await;
    })
    .await;
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
    Reaped,
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

async fn connection(
    stream: Async<UnixStream>,
    cfg: &ServerConfig,
    handler: Arc<dyn Handler>,
    conn: Conn,
) {
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
        let reaped = async {
            let _ = conn.reaped.recv().await;
            Err(ReadError::Reaped)
        };
        let read = smol::future::or(read_request(&mut stream, cfg.max_request), reaped);
        let got = smol::future::or(read, timeout).await;
        conn.idle.store(false, Ordering::SeqCst);
        if matches!(got, Err(ReadError::Reaped)) {
            // Closed to make room at the connection cap: nothing to answer, nothing to log.
            return;
        }
        match got {
            Err(ReadError::TooLarge) => Err(RpcError::bad_request(format!(
                "request larger than {} bytes",
                cfg.max_request
            ))),
            Err(ReadError::Timeout) => Err(RpcError::bad_request(format!(
                "request not received within {} ms",
                cfg.read_deadline.as_millis()
            ))),
            Err(ReadError::Io(e)) => Err(RpcError::bad_request(format!("reading request: {e}"))),
            Err(ReadError::Reaped) => return,
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
    let write = async { stream.write_all(&body).await.is_ok() && stream.flush().await.is_ok() };
    let write_ok = smol::future::or(write, async {
        smol::Timer::after(cfg.write_deadline).await;
        false
    })
    .await;
    drop(conn);
    if code.is_some() {
        discard_rest(&mut stream, cfg, Duration::from_secs(1)).await;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rpc::client::{self, CallError};
    use crate::system::testutil::TempDir;
    use std::io::{Read, Write};

    /// `ping` answers at once; `big` answers 8 MiB; `hold` blocks until `release` is called.
    struct Test {
        gate: std::sync::Mutex<std::sync::mpsc::Receiver<()>>,
        holding: Arc<AtomicUsize>,
    }

    impl Handler for Test {
        fn handle(&self, call: &Call, _params: Value) -> Result<Value, RpcError> {
            match call.method.as_str() {
                "ping" => Ok(json!({"pong": true})),
                "big" => Ok(json!("x".repeat(8 << 20))),
                "hold" => {
                    self.holding.fetch_add(1, Ordering::SeqCst);
                    let _ = self
                        .gate
                        .lock()
                        .unwrap()
                        .recv_timeout(Duration::from_secs(30));
                    Ok(json!(null))
                }
                m => Err(RpcError::new(ErrorCode::UnknownMethod, m)),
            }
        }
    }

    struct Running {
        _dir: TempDir,
        socket: std::path::PathBuf,
        stop: smol::channel::Sender<()>,
        release: std::sync::mpsc::Sender<()>,
        holding: Arc<AtomicUsize>,
        thread: Option<std::thread::JoinHandle<()>>,
    }

    impl Drop for Running {
        fn drop(&mut self) {
            for _ in 0..8 {
                let _ = self.release.send(());
            }
            let _ = self.stop.try_send(());
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        }
    }

    fn start(tune: impl FnOnce(&mut ServerConfig)) -> Running {
        let dir = TempDir::new();
        let socket = dir.path().join("s.sock");
        let listener = bind(&socket, 0o600, None).unwrap();
        let me = rustix::process::geteuid().as_raw();
        let mut cfg = ServerConfig::new("test", vec![me]);
        cfg.drain_timeout = Duration::from_millis(100);
        tune(&mut cfg);
        let (release, gate) = std::sync::mpsc::channel();
        let (stop, stop_rx) = smol::channel::bounded(1);
        let holding = Arc::new(AtomicUsize::new(0));
        let handler = Arc::new(Test {
            gate: std::sync::Mutex::new(gate),
            holding: holding.clone(),
        });
        let thread = std::thread::spawn(move || {
            serve(listener, cfg, handler, stop_rx).unwrap();
        });
        Running {
            _dir: dir,
            socket,
            stop,
            release,
            holding,
            thread: Some(thread),
        }
    }

    fn ping(r: &Running) -> Result<Value, CallError> {
        client::call_with_timeout(&r.socket, "ping", json!({}), Duration::from_secs(5))
    }

    /// Silent connections far over the cap: the server closes the oldest ones, a new client is
    /// answered, and the reaped ones see their connection closed without an answer.
    #[test]
    fn silent_connections_over_the_cap_are_reaped_and_a_new_client_is_served() {
        let r = start(|c| c.max_connections = 4);
        let mut held: Vec<UnixStream> = (0..20)
            .map(|_| UnixStream::connect(&r.socket).unwrap())
            .collect();
        let started = Instant::now();
        assert_eq!(ping(&r).unwrap(), json!({"pong": true}));
        eprintln!(
            "ping past 20 silent connections (cap 4) answered in {:?}",
            started.elapsed()
        );
        // The oldest silent connection was closed: EOF, no answer.
        held[0]
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut buf = Vec::new();
        held[0].read_to_end(&mut buf).unwrap();
        assert!(buf.is_empty(), "{}", String::from_utf8_lossy(&buf));
        held.clear();
    }

    /// When every held connection is running a call, a new one is answered `busy` at once.
    #[test]
    fn at_the_cap_with_every_connection_busy_a_new_one_is_answered_busy() {
        let r = start(|c| c.max_connections = 2);
        let holders: Vec<_> = (0..2)
            .map(|_| {
                let s = r.socket.clone();
                std::thread::spawn(move || {
                    client::call_with_timeout(&s, "hold", json!({}), Duration::from_secs(30))
                })
            })
            .collect();
        // Once both calls are running (no longer idle), a ping is refused `busy`.
        let deadline = Instant::now() + Duration::from_secs(10);
        while r.holding.load(Ordering::SeqCst) < 2 {
            assert!(Instant::now() < deadline, "the two calls never started");
            std::thread::sleep(Duration::from_millis(5));
        }
        let Err(CallError::Rpc(e)) = ping(&r) else {
            panic!("a ping over the cap with every connection busy was not refused");
        };
        assert_eq!(e.code, ErrorCode::Busy, "{e:?}");
        assert!(e.message.contains("holds 2 connections"), "{e:?}");
        for _ in 0..2 {
            r.release.send(()).unwrap();
        }
        for h in holders {
            h.join().unwrap().unwrap();
        }
        assert!(ping(&r).is_ok());
    }

    /// A client that asks for a large answer and never reads it is cut off at the write deadline:
    /// what it reads afterwards is a truncated answer followed by end of stream.
    #[test]
    fn a_client_that_never_reads_is_cut_off_at_the_write_deadline() {
        let r = start(|c| c.write_deadline = Duration::from_millis(200));
        let mut s = UnixStream::connect(&r.socket).unwrap();
        s.write_all(b"{\"v\":1,\"method\":\"big\",\"params\":{}}\n")
            .unwrap();
        // Not a byte read until the server has hung up (a fixed sleep raced a loaded machine, on
        // which the answer could still be in the making when the client started reading).
        use std::os::fd::AsRawFd;
        let mut pfd = libc::pollfd {
            fd: s.as_raw_fd(),
            events: libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, 60_000) };
        assert!(
            n == 1 && pfd.revents & (libc::POLLRDHUP | libc::POLLHUP) != 0,
            "the server did not hang up on a client that does not read (poll {n}, revents {:#x})",
            pfd.revents
        );
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got);
        assert!(
            got.len() < 8 << 20,
            "the whole answer ({} bytes) arrived",
            got.len()
        );
        eprintln!(
            "a non-reading client got {} bytes before the cut",
            got.len()
        );
        assert!(ping(&r).is_ok());
    }
}
