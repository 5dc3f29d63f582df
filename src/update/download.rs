//! Capped HTTP downloads that hash as bytes arrive.
//!
//! Caps are enforced on the bytes actually read, never on what `Content-Length` claims (a
//! `Content-Length` above the cap only fails sooner). A download to a file that fails for any
//! reason leaves no partial file behind. The [`Fetcher`] trait is the seam the update flow's tests
//! replace; [`HttpFetcher`] is the real one (ureq).

use std::fs::{File, OpenOptions};
use std::io::{IsTerminal, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// Largest `manifest.json` accepted.
pub const MANIFEST_MAX: u64 = 1 << 20;
/// Largest `SHA256SUMS` accepted.
pub const SHA256SUMS_MAX: u64 = 16 << 10;
/// Largest `SHA256SUMS.sig` accepted.
pub const SIGNATURE_MAX: u64 = 1 << 10;
/// Largest release tarball accepted.
pub const TARBALL_MAX: u64 = 256 << 20;

/// How long to wait for a connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// How long one read may stall before the download fails.
pub const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// An open response body.
pub struct Body {
    /// The bytes.
    pub reader: Box<dyn Read + Send>,
    /// What the server claims the length is (informational: progress, early refusal).
    pub content_length: Option<u64>,
}

/// Opens URLs. The update flow takes one of these so its tests need no network.
pub trait Fetcher {
    /// GETs `url`; a non-2xx status is an error. `what` names the artifact for messages.
    fn get(&self, url: &str, what: &str) -> Result<Body>;
}

/// The real fetcher: ureq with bounded connect and read timeouts.
pub struct HttpFetcher {
    agent: ureq::Agent,
}

impl Default for HttpFetcher {
    fn default() -> Self {
        HttpFetcher::new()
    }
}

impl HttpFetcher {
    /// A fetcher with [`CONNECT_TIMEOUT`] and [`READ_TIMEOUT`].
    pub fn new() -> Self {
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(CONNECT_TIMEOUT)
            .timeout_read(READ_TIMEOUT)
            .user_agent(&format!("banger/{}", crate::buildinfo::VERSION))
            .build();
        HttpFetcher { agent }
    }
}

impl Fetcher for HttpFetcher {
    fn get(&self, url: &str, what: &str) -> Result<Body> {
        let ctx = || format!("downloading {what} from {url}");
        match self.agent.get(url).call() {
            Ok(resp) => {
                let content_length = resp
                    .header("Content-Length")
                    .and_then(|v| v.trim().parse::<u64>().ok());
                Ok(Body {
                    reader: Box::new(resp.into_reader()),
                    content_length,
                })
            }
            Err(ureq::Error::Status(code, resp)) => Err(Error::new(
                ctx(),
                format!("HTTP {code} {}", resp.status_text()),
            )
            .hint(if code == 404 {
                "the release manifest points at a missing file; the release is incomplete or the manifest URL is wrong"
            } else {
                "the release server refused the request; try again later"
            })),
            Err(ureq::Error::Transport(t)) => {
                Err(Error::new(ctx(), t).hint("check the network and the manifest URL"))
            }
        }
    }
}

/// A finished download to a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Downloaded {
    /// Where it is.
    pub path: PathBuf,
    /// How many bytes.
    pub bytes: u64,
    /// Lower-case hex SHA-256 of those bytes, computed as they arrived.
    pub sha256: String,
}

fn too_big(what: &str, url: &str, cap: u64) -> Error {
    Error::new(
        format!("downloading {what} from {url}"),
        format!("it is larger than the {cap}-byte limit"),
    )
    .hint("the release artifact is not what banger expects; do not install it")
}

/// Copies `body` to `out`, at most `cap` bytes, hashing on the way; `progress` sees
/// `(bytes so far, claimed total)`.
fn pump(
    mut body: Body,
    what: &str,
    url: &str,
    cap: u64,
    out: &mut dyn Write,
    mut progress: Option<&mut dyn FnMut(u64, Option<u64>)>,
) -> Result<(u64, String)> {
    if body.content_length.is_some_and(|n| n > cap) {
        return Err(too_big(what, url, cap));
    }
    let ctx = || format!("downloading {what} from {url}");
    let mut hasher = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 64 * 1024];
    let mut total: u64 = 0;
    loop {
        let n = match body.reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Error::new(ctx(), e).hint("check the network and try again")),
        };
        total += n as u64;
        if total > cap {
            return Err(too_big(what, url, cap));
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n])
            .map_err(|e| Error::new(ctx(), format!("writing: {e}")))?;
        if let Some(p) = progress.as_mut() {
            p(total, body.content_length);
        }
    }
    if let Some(claimed) = body.content_length {
        if claimed != total {
            return Err(Error::new(
                ctx(),
                format!("the connection ended after {total} of {claimed} bytes"),
            )
            .hint("try again"));
        }
    }
    Ok((total, hex::encode(hasher.finish())))
}

/// Removes the file on drop unless disarmed.
struct RemoveOnDrop<'a>(Option<&'a Path>);

impl Drop for RemoveOnDrop<'_> {
    fn drop(&mut self) {
        if let Some(p) = self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Downloads `url` into `dest` (created 0600, replacing a file already there), at most `cap`
/// bytes, hashing as it goes, fsynced. On any failure `dest` does not exist afterwards.
pub fn to_file(
    fetcher: &dyn Fetcher,
    url: &str,
    what: &str,
    dest: &Path,
    cap: u64,
    progress: Option<&mut dyn FnMut(u64, Option<u64>)>,
) -> Result<Downloaded> {
    let ctx = || format!("downloading {what} to {}", dest.display());
    match std::fs::remove_file(dest) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::new(ctx(), e)),
    }
    let body = fetcher.get(url, what)?;
    let mut file: File = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(dest)
        .map_err(|e| Error::new(ctx(), e))?;
    let mut guard = RemoveOnDrop(Some(dest));
    let (bytes, sha256) = pump(body, what, url, cap, &mut file, progress)?;
    file.sync_all().map_err(|e| Error::new(ctx(), e))?;
    guard.0 = None;
    Ok(Downloaded {
        path: dest.to_path_buf(),
        bytes,
        sha256,
    })
}

/// Downloads a small file (manifest, SHA256SUMS, signature) into memory, at most `cap` bytes.
pub fn to_memory(fetcher: &dyn Fetcher, url: &str, what: &str, cap: u64) -> Result<Vec<u8>> {
    let body = fetcher.get(url, what)?;
    let mut out = Vec::new();
    pump(body, what, url, cap, &mut out, None)?;
    Ok(out)
}

/// One progress line: `label: 1.5 MiB / 10.0 MiB (15%)`, or without the total when unknown.
pub fn render_progress(label: &str, done: u64, total: Option<u64>) -> String {
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    match total {
        Some(t) if t > 0 => format!(
            "{label}: {:.1} MiB / {:.1} MiB ({}%)",
            mib(done),
            mib(t),
            (done.min(t) * 100) / t
        ),
        _ => format!("{label}: {:.1} MiB", mib(done)),
    }
}

/// A progress line on stderr, redrawn at most ten times a second, only when stderr is a TTY.
pub struct TtyProgress {
    label: String,
    enabled: bool,
    last: Option<Instant>,
    drawn: bool,
}

impl TtyProgress {
    /// A printer for `label`; silent unless stderr is a terminal.
    pub fn stderr(label: &str) -> Self {
        TtyProgress {
            label: label.to_string(),
            enabled: std::io::stderr().is_terminal(),
            last: None,
            drawn: false,
        }
    }

    /// Feed `(bytes so far, total if known)`; pass as the progress callback.
    pub fn update(&mut self, done: u64, total: Option<u64>) {
        if !self.enabled {
            return;
        }
        let now = Instant::now();
        let due = self
            .last
            .is_none_or(|t| now.duration_since(t) >= Duration::from_millis(100));
        if due || total == Some(done) {
            self.last = Some(now);
            self.drawn = true;
            eprint!("\r\x1b[2K{}", render_progress(&self.label, done, total));
        }
    }

    /// Ends the line if anything was drawn.
    pub fn finish(&mut self) {
        if self.drawn {
            eprintln!();
            self.drawn = false;
        }
    }
}

#[cfg(test)]
pub(crate) mod testserver {
    //! A tiny real HTTP/1.1 server on 127.0.0.1 for tests.
    use std::collections::HashMap;
    use std::io::{BufRead, BufReader, Write};
    use std::net::TcpListener;
    use std::sync::{Arc, Mutex};

    /// How to answer one path.
    #[derive(Clone)]
    pub struct Route {
        pub status: u16,
        pub body: Vec<u8>,
        /// `None`: honest Content-Length; `Some(None)`: no Content-Length (close-delimited);
        /// `Some(Some(n))`: claim `n`.
        pub length: Option<Option<u64>>,
    }

    impl Route {
        pub fn ok(body: impl Into<Vec<u8>>) -> Route {
            Route {
                status: 200,
                body: body.into(),
                length: None,
            }
        }
    }

    pub struct Server {
        pub base: String,
        routes: Arc<Mutex<HashMap<String, Route>>>,
    }

    impl Server {
        pub fn start() -> Server {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let base = format!("http://{}", listener.local_addr().unwrap());
            let routes: Arc<Mutex<HashMap<String, Route>>> = Arc::default();
            let r = routes.clone();
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    let Ok(mut conn) = conn else { continue };
                    let r = r.clone();
                    std::thread::spawn(move || {
                        let mut reader = BufReader::new(conn.try_clone().unwrap());
                        let mut first = String::new();
                        let _ = reader.read_line(&mut first);
                        loop {
                            let mut h = String::new();
                            if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                                break;
                            }
                        }
                        let path = first.split_whitespace().nth(1).unwrap_or("/").to_string();
                        let route = r.lock().unwrap().get(&path).cloned().unwrap_or(Route {
                            status: 404,
                            body: b"not found".to_vec(),
                            length: None,
                        });
                        let reason = if route.status == 200 {
                            "OK"
                        } else {
                            "Not Found"
                        };
                        let mut head = format!(
                            "HTTP/1.1 {} {reason}\r\nConnection: close\r\n",
                            route.status
                        );
                        match route.length {
                            None => head += &format!("Content-Length: {}\r\n", route.body.len()),
                            Some(Some(n)) => head += &format!("Content-Length: {n}\r\n"),
                            Some(None) => {}
                        }
                        head += "\r\n";
                        let _ = conn.write_all(head.as_bytes());
                        let _ = conn.write_all(&route.body);
                    });
                }
            });
            Server { base, routes }
        }

        pub fn route(&self, path: &str, route: Route) -> String {
            self.routes.lock().unwrap().insert(path.to_string(), route);
            format!("{}{path}", self.base)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testserver::{Route, Server};
    use super::*;
    use crate::update::testutil::TempDir;

    #[test]
    fn file_download_hashes_and_reports_progress() {
        let s = Server::start();
        let body: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let url = s.route("/t.tar.gz", Route::ok(body.clone()));
        let dir = TempDir::new("dl-ok");
        let dest = dir.path().join("t.tar.gz");
        let mut seen = Vec::new();
        let mut cb = |d: u64, t: Option<u64>| seen.push((d, t));
        let got = to_file(
            &HttpFetcher::new(),
            &url,
            "the tarball",
            &dest,
            TARBALL_MAX,
            Some(&mut cb),
        )
        .unwrap();
        assert_eq!(got.bytes, body.len() as u64);
        assert_eq!(got.sha256, crate::update::sha256_reader(&body[..]).unwrap());
        assert_eq!(std::fs::read(&dest).unwrap(), body);
        assert_eq!(
            seen.last(),
            Some(&(body.len() as u64, Some(body.len() as u64)))
        );
        assert!(seen.windows(2).all(|w| w[0].0 < w[1].0));
    }

    #[test]
    fn caps_enforced_on_bytes_read_and_no_partial_file() {
        let s = Server::start();
        let dir = TempDir::new("dl-cap");
        let big = vec![7u8; 5000];
        let cases = [
            ("/honest", Route::ok(big.clone())),
            (
                "/no-length",
                Route {
                    status: 200,
                    body: big.clone(),
                    length: Some(None),
                },
            ),
            (
                "/lies-small",
                Route {
                    status: 200,
                    body: big.clone(),
                    length: Some(Some(10_000_000)),
                },
            ),
        ];
        for (path, route) in cases {
            let url = s.route(path, route);
            let dest = dir.path().join("out");
            std::fs::write(&dest, b"stale").unwrap();
            let e =
                to_file(&HttpFetcher::new(), &url, "the tarball", &dest, 4096, None).unwrap_err();
            assert!(
                e.to_string().contains("larger than the 4096-byte limit"),
                "{path}: {e}"
            );
            assert!(!dest.exists(), "{path}: partial file left behind");
            let e = to_memory(&HttpFetcher::new(), &url, "SHA256SUMS", 4096).unwrap_err();
            assert!(e.to_string().contains("4096-byte limit"), "{path}: {e}");
        }
        // Exactly at the cap is fine.
        let url = s.route(
            "/exact",
            Route {
                status: 200,
                body: vec![1u8; 4096],
                length: Some(None),
            },
        );
        assert_eq!(
            to_memory(&HttpFetcher::new(), &url, "x", 4096)
                .unwrap()
                .len(),
            4096
        );
    }

    #[test]
    fn short_body_is_an_error_and_leaves_nothing() {
        let s = Server::start();
        let url = s.route(
            "/short",
            Route {
                status: 200,
                body: vec![1u8; 100],
                length: Some(Some(200)),
            },
        );
        let dir = TempDir::new("dl-short");
        let dest = dir.path().join("out");
        let e = to_file(&HttpFetcher::new(), &url, "the tarball", &dest, 4096, None).unwrap_err();
        assert!(!dest.exists());
        let msg = e.to_string();
        assert!(msg.contains("downloading the tarball"), "{msg}");
    }

    #[test]
    fn not_found_is_clear() {
        let s = Server::start();
        let url = format!("{}/v9.9.9/SHA256SUMS", s.base);
        let dir = TempDir::new("dl-404");
        let dest = dir.path().join("out");
        let e = to_file(&HttpFetcher::new(), &url, "SHA256SUMS", &dest, 4096, None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!("downloading SHA256SUMS from {url}: HTTP 404")),
            "{e}"
        );
        assert!(e.contains("missing file"), "{e}");
        assert!(!dest.exists());
        let e = to_memory(
            &HttpFetcher::new(),
            "http://127.0.0.1:1/x",
            "the manifest",
            10,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("downloading the manifest from http://127.0.0.1:1/x"),
            "{e}"
        );
        assert!(e.contains("check the network"), "{e}");
    }

    #[test]
    fn progress_rendering() {
        assert_eq!(
            render_progress("t", 1 << 20, Some(4 << 20)),
            "t: 1.0 MiB / 4.0 MiB (25%)"
        );
        assert_eq!(render_progress("t", 3 << 19, None), "t: 1.5 MiB");
        assert_eq!(render_progress("t", 5, Some(0)), "t: 0.0 MiB");
    }
}
