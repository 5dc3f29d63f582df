//! Runs `ip` and `nft` with argument vectors (never a shell string) and turns failures into
//! errors naming the command and its stderr.

use crate::error::{Error, Result};
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

/// The iproute2 tool.
pub const IP: &str = "ip";
/// The nftables tool.
pub const NFT: &str = "nft";

/// What a finished command left behind.
pub struct Ran {
    /// Exit status was zero.
    pub ok: bool,
    /// Standard output.
    pub stdout: String,
    /// Standard error, trimmed.
    pub stderr: String,
}

/// Where `ip`/`nft` live when they are not on `PATH` (a user's PATH often lacks the sbin dirs).
const FALLBACK_DIRS: [&str; 4] = ["/usr/sbin", "/sbin", "/usr/bin", "/bin"];

/// `prog` found on `PATH`, else in the usual system directories, else `prog` itself.
pub fn resolve(prog: &str) -> PathBuf {
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    on_path
        .into_iter()
        .chain(FALLBACK_DIRS.iter().map(PathBuf::from))
        .map(|d| d.join(prog))
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(prog))
}

/// Runs `prog args…`, feeding `stdin` if given; fails only when the program cannot be run.
pub fn run(prog: &str, args: &[&str], stdin: Option<&str>) -> Result<Ran> {
    let shown = || format!("running `{prog} {}`", args.join(" "));
    let mut c = Command::new(resolve(prog));
    c.args(args)
        .env("LC_ALL", "C")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = c.spawn().map_err(|e| {
        Error::new(shown(), e).hint(format!(
            "install {} (sudo apt-get install iproute2 nftables)",
            prog
        ))
    })?;
    if let Some(text) = stdin {
        if let Some(mut w) = child.stdin.take() {
            w.write_all(text.as_bytes())
                .map_err(|e| Error::new(shown(), format!("writing its input: {e}")))?;
        }
    }
    let out = child
        .wait_with_output()
        .map_err(|e| Error::new(shown(), e))?;
    Ok(Ran {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
    })
}

/// Runs `prog args…` and requires success; the error carries its stderr.
pub fn check(prog: &str, args: &[&str], stdin: Option<&str>) -> Result<String> {
    let r = run(prog, args, stdin)?;
    if r.ok {
        Ok(r.stdout)
    } else {
        Err(Error::new(
            format!("running `{prog} {}`", args.join(" ")),
            if r.stderr.is_empty() {
                "failed without a message".to_string()
            } else {
                r.stderr.replace('\n', "; ")
            },
        ))
    }
}
