//! Bounding what a guest can make the host store: a VM's `console.log` and `firecracker.log`.
//!
//! Owns `[vm]` of `/etc/banger/config.toml` (`console_log_max`, default 16 MiB; `console_rate`,
//! default 32 KiB/s), the serial rate limiter derived from them (sent as `PUT /serial` before
//! boot), and the daemon's rotation of both logs. It never touches a file outside `vms/<id>/`,
//! never follows a symlink there, and never signals or restarts a VMM.
//!
//! Two bounds work together:
//! - **Rate**: Firecracker drops serial bytes beyond a token bucket of `console_rate` bytes per
//!   second (bucket size `console_rate`, one-time burst 4 × `console_rate` for the boot messages),
//!   so `console.log` grows at most that fast, whatever the guest does.
//! - **Size**: every [`ROTATE_INTERVAL`] the daemon rotates a log that has reached half of
//!   `console_log_max` into `<name>.1` (one previous file kept, the older one replaced). Rotating
//!   at half leaves the other half for what the rate limiter lets through before the next look
//!   (config refuses a cap under 16 × the rate), so a rotated file stays under the cap. While the
//!   daemon is down nothing rotates; the first look after it starts does, and `.1` then keeps only
//!   the newest `console_log_max` bytes.
//!
//! **Copy-then-truncate.** The VMM holds the log open and keeps writing through that descriptor, so
//! renaming the file would only rename what it writes to. Instead the daemon copies the file's
//! tail into `<name>.1.tmp`, copies whatever arrived meanwhile, truncates the file to 0 through its
//! own descriptor and renames the copy to `<name>.1`. Bytes the VMM writes between that last copy
//! and the truncation (microseconds) are lost. `console.log` is the VMM's stdout, opened by the
//! helper with `O_APPEND`, so after the truncation the VMM writes at offset 0 again.
//! Firecracker opens `--log-path` itself without `O_APPEND`: after a truncation its next line
//! lands at its old offset, leaving a hole (no disk blocks) before it. So a log's size here is
//! the smaller of its length and its allocated bytes, and the copy starts at the first data after
//! the hole (`SEEK_DATA`): the disk space stays bounded; the file's length can read larger.
//! Firecracker's own log is bounded by Firecracker itself: v1.16.1 rate-limits its warnings and
//! errors per call site (10 per 5 s); a guest writing to an unmapped port in a tight loop grew
//! `firecracker.log` by 1.2 KB in 3 s here. The rotation bounds it like the console.

use crate::error::{Context, Error, Result};
use crate::layout::Layout;
use crate::store::{Store, VmState};
use crate::vmm::launch::{CONSOLE_LOG, VMM_LOG};
use crate::vmm::models::{SerialDevice, TokenBucket};
use rustix::fs::{FileType, Mode, OFlags};
use std::collections::HashSet;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// `vm.console_log_max` when unset.
pub const DEFAULT_MAX: u64 = 16 << 20;
/// `vm.console_rate` when unset (bytes per second).
pub const DEFAULT_RATE: u64 = 32 << 10;
/// How often the daemon looks at every VM's logs.
pub const ROTATE_INTERVAL: Duration = Duration::from_secs(1);
/// The cap must be at least this many times the rate (see the module doc).
const MIN_CAP_PER_RATE: u64 = 16;
/// The smallest `console_rate` accepted.
const MIN_RATE: u64 = 1 << 10;
const KEYS: [&str; 2] = ["console_log_max", "console_rate"];
const SIZE_FORM: &str =
    "bytes as an integer or a string like \"16M\", \"512K\", \"1G\" (powers of 1024)";

/// The validated `[vm]` section's log settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConsoleConfig {
    /// Largest size of `console.log`, `firecracker.log` and each one's `.1`, in bytes.
    pub max_bytes: u64,
    /// Bytes per second the guest's serial console may write.
    pub rate: u64,
}

impl Default for ConsoleConfig {
    fn default() -> Self {
        ConsoleConfig {
            max_bytes: DEFAULT_MAX,
            rate: DEFAULT_RATE,
        }
    }
}

/// `s` in bytes: digits, optionally followed by `K`, `M` or `G` (×1024ⁿ, any case) and an optional
/// `B` or `iB`.
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let digits = t.bytes().take_while(u8::is_ascii_digit).count();
    if digits == 0 {
        return Err("no number".into());
    }
    let n: u64 = t[..digits].parse().map_err(|_| "number too large")?;
    let unit = t[digits..].to_ascii_lowercase();
    let shift = match unit.as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        _ => return Err(format!("unknown unit {:?}", &t[digits..])),
    };
    n.checked_mul(1 << shift)
        .ok_or_else(|| "number too large".to_string())
}

/// `n` bytes the way [`parse_size`] reads them back (`16M`, `512K`, `1000`).
pub fn format_size(n: u64) -> String {
    for (shift, unit) in [(30, "G"), (20, "M"), (10, "K")] {
        if n >= 1 << shift && n.is_multiple_of(1 << shift) {
            return format!("{}{unit}", n >> shift);
        }
    }
    n.to_string()
}

impl ConsoleConfig {
    /// `[vm]` of `layout.config_toml()`; a missing file or section gives the defaults. A bad value
    /// is an error naming the key, the value and the allowed form; unknown keys are refused.
    pub fn load(layout: &Layout) -> Result<ConsoleConfig> {
        let path = layout.config_toml();
        match std::fs::read(&path) {
            Ok(b) => {
                let text = String::from_utf8(b).map_err(|_| {
                    Error::new(format!("reading {}", path.display()), "not UTF-8")
                        .hint("fix or remove the file")
                })?;
                Self::parse_from(&text, &path.display().to_string())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ConsoleConfig::default()),
            Err(e) => Err(Error::new(format!("reading {}", path.display()), e)
                .hint("check the file's permissions")),
        }
    }

    /// Parses config.toml text (only `[vm]` is read).
    pub fn parse(text: &str) -> Result<ConsoleConfig> {
        Self::parse_from(text, "config.toml")
    }

    fn parse_from(text: &str, origin: &str) -> Result<ConsoleConfig> {
        let doc: toml::Table = toml::from_str(text).map_err(|e| {
            Error::new(format!("parsing {origin}"), e.message().trim())
                .hint("fix the TOML syntax or remove the file")
        })?;
        let mut cfg = ConsoleConfig::default();
        let Some(section) = doc.get("vm") else {
            return Ok(cfg);
        };
        let Some(section) = section.as_table() else {
            return Err(
                Error::new(format!("{origin}: vm"), "must be a table ([vm])").hint(format!(
                    "write the settings under a [vm] header in {origin}"
                )),
            );
        };
        if let Some(k) = section.keys().find(|k| !KEYS.contains(&k.as_str())) {
            return Err(Error::new(
                format!("{origin}: vm.{k}"),
                format!(
                    "unknown key (allowed: {})",
                    KEYS.map(|k| format!("vm.{k}")).join(", ")
                ),
            )
            .hint(format!("remove it from {origin}")));
        }
        let size = |key: &str| -> Result<Option<u64>> {
            let bad = |v: &str, why: &str| {
                Error::new(
                    format!("{origin}: vm.{key} = {v}"),
                    format!("{why}; allowed: {SIZE_FORM}"),
                )
                .hint(format!(
                    "fix vm.{key} in {origin}, or remove it to use the default"
                ))
            };
            match section.get(key) {
                None => Ok(None),
                Some(toml::Value::Integer(i)) => u64::try_from(*i)
                    .map(Some)
                    .map_err(|_| bad(&i.to_string(), "negative")),
                Some(toml::Value::String(s)) => parse_size(s)
                    .map(Some)
                    .map_err(|why| bad(&format!("{s:?}"), &why)),
                Some(v) => Err(bad(&v.to_string(), "not a size")),
            }
        };
        if let Some(n) = size("console_log_max")? {
            cfg.max_bytes = n;
        }
        if let Some(n) = size("console_rate")? {
            cfg.rate = n;
        }
        if cfg.rate < MIN_RATE {
            return Err(Error::new(
                format!("{origin}: vm.console_rate = {}", format_size(cfg.rate)),
                format!("below the minimum of {}", format_size(MIN_RATE)),
            )
            .hint(format!("raise vm.console_rate in {origin}")));
        }
        let floor = cfg.rate.saturating_mul(MIN_CAP_PER_RATE);
        if cfg.max_bytes < floor {
            return Err(Error::new(
                format!(
                    "{origin}: vm.console_log_max = {}",
                    format_size(cfg.max_bytes)
                ),
                format!(
                    "below {MIN_CAP_PER_RATE} × vm.console_rate ({}), the room rotation needs to keep \
                     a rate-limited console under the cap",
                    format_size(floor)
                ),
            )
            .hint(format!(
                "raise vm.console_log_max or lower vm.console_rate in {origin}"
            )));
        }
        Ok(cfg)
    }

    /// The `PUT /serial` body: console on the VMM's stdout (`console.log`), rate-limited.
    pub fn serial(&self) -> SerialDevice {
        SerialDevice {
            serial_out_path: None,
            rate_limiter: Some(TokenBucket {
                one_time_burst: Some(self.rate.saturating_mul(4)),
                refill_time: 1000,
                size: self.rate,
            }),
        }
    }

    /// The size at which a log is rotated (half the cap).
    pub fn rotate_at(&self) -> u64 {
        self.max_bytes / 2
    }
}

/// `<path>.1`, the one previous log kept.
pub fn previous(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_os_string();
    s.push(".1");
    PathBuf::from(s)
}

fn open_log(path: &Path) -> Result<Option<File>> {
    let what = || format!("opening {} to rotate it", path.display());
    let flags =
        OFlags::RDWR | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC;
    let fd = match rustix::fs::open(path, flags, Mode::empty()) {
        Ok(fd) => fd,
        Err(rustix::io::Errno::NOENT) => return Ok(None),
        Err(e) => return Err(Error::new(what(), e)),
    };
    let st = rustix::fs::fstat(&fd).ctx(what)?;
    if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
        return Err(Error::new(what(), "not a regular file").hint("remove it; banger recreates it"));
    }
    Ok(Some(File::from(fd)))
}

/// Bytes of `f` that take disk space: its length, or its allocated blocks when smaller (a file
/// with a hole, see the module doc).
fn used(f: &File) -> Result<(u64, u64)> {
    let st = rustix::fs::fstat(f).ctx(|| "reading a log's size".to_string())?;
    let len = u64::try_from(st.st_size).unwrap_or(0);
    let alloc = u64::try_from(st.st_blocks).unwrap_or(0).saturating_mul(512);
    Ok((len, len.min(alloc)))
}

/// Copies `f[from..to)` to the end of `out`; returns how many bytes.
fn copy_range(f: &File, out: &File, from: u64, to: u64, at: u64) -> std::io::Result<u64> {
    let mut buf = vec![0u8; 64 << 10];
    let mut pos = from;
    while pos < to {
        let want = usize::try_from((to - pos).min(buf.len() as u64)).unwrap_or(buf.len());
        let n = f.read_at(&mut buf[..want], pos)?;
        if n == 0 {
            break;
        }
        out.write_all_at(&buf[..n], at + (pos - from))?;
        pos += n as u64;
    }
    Ok(pos - from)
}

/// Rotates `path` if it has reached `cfg`'s rotation size: its newest bytes (at most the cap) go to
/// `<path>.1` (replacing the older one) and `path` is truncated to 0. Returns the bytes kept in
/// `.1`, or `None` when there was nothing to do (no file, or small enough).
pub fn rotate(path: &Path, cfg: &ConsoleConfig) -> Result<Option<u64>> {
    let Some(f) = open_log(path)? else {
        return Ok(None);
    };
    let (len, used) = used(&f)?;
    if used < cfg.rotate_at() {
        return Ok(None);
    }
    let what = || format!("rotating {}", path.display());
    // The newest `max_bytes`, starting at the first data (skip the hole a non-appending writer
    // left after an earlier truncation).
    let floor = len.saturating_sub(cfg.max_bytes);
    let from = match rustix::fs::seek(&f, rustix::fs::SeekFrom::Data(floor as i64)) {
        Ok(p) => p,
        Err(rustix::io::Errno::NXIO) => len,
        Err(e) => return Err(Error::new(what(), e)),
    };
    let prev = previous(path);
    let mut tmp = prev.as_os_str().to_os_string();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(Error::new(what(), e)),
        _ => {}
    }
    let out = rustix::fs::open(
        &tmp,
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )
    .map(File::from)
    .ctx(|| format!("creating {}", tmp.display()))?;
    let copied = (|| -> std::io::Result<u64> {
        let mut copied = copy_range(&f, &out, from, len, 0)?;
        // What the VMM wrote while we copied (bounded by the rate limiter: a few bytes).
        let now = f.metadata()?.len();
        if now > len {
            copied += copy_range(&f, &out, len, now, copied)?;
        }
        f.set_len(0)?;
        Ok(copied)
    })();
    let copied = match copied {
        Ok(n) => n,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(Error::new(what(), e));
        }
    };
    std::fs::rename(&tmp, &prev)
        .ctx(|| format!("renaming {} to {}", tmp.display(), prev.display()))?;
    Ok(Some(copied))
}

/// Rotates both logs of every VM that is not starting (a starting VM's readiness is read from its
/// console at an offset, which a truncation would move). Errors are logged once per path and
/// message.
pub fn rotate_all(
    layout: &Layout,
    store: &Mutex<Store>,
    cfg: &ConsoleConfig,
    reported: &mut HashSet<String>,
) {
    let vms = match store.lock() {
        Ok(s) => s.vm_list(),
        Err(_) => return,
    };
    let vms = match vms {
        Ok(v) => v,
        Err(e) => {
            if reported.insert(e.to_string()) {
                crate::logging::error(
                    "bangerd",
                    "log rotation: listing VMs",
                    serde_json::json!({"error": e.to_string()}),
                );
            }
            return;
        }
    };
    for vm in vms.iter().filter(|v| v.state != VmState::Starting) {
        let dir = layout.vm_dir(&vm.id);
        for name in [CONSOLE_LOG, VMM_LOG] {
            let path = dir.join(name);
            match rotate(&path, cfg) {
                Ok(Some(kept)) => crate::logging::info(
                    "bangerd",
                    "log rotated",
                    serde_json::json!({"vm": vm.name, "file": path, "kept_in_previous": kept}),
                ),
                Ok(None) => {}
                Err(e) => {
                    if reported.insert(e.to_string()) {
                        crate::logging::error(
                            "bangerd",
                            "log rotation failed",
                            serde_json::json!({"vm": vm.name, "error": e.to_string()}),
                        );
                    }
                }
            }
        }
    }
}

/// Starts the daemon's rotation thread: [`rotate_all`] every [`ROTATE_INTERVAL`], for the life of
/// the process.
pub fn spawn_rotator(
    layout: Layout,
    store: Arc<Mutex<Store>>,
    cfg: ConsoleConfig,
) -> Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("log-rotate".into())
        .spawn(move || {
            let mut reported = HashSet::new();
            loop {
                std::thread::sleep(ROTATE_INTERVAL);
                rotate_all(&layout, &store, &cfg, &mut reported);
            }
        })
        .ctx(|| "starting the log rotation thread".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    struct Tmp(PathBuf);
    impl Drop for Tmp {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    fn tmp(tag: &str) -> Tmp {
        let d = std::env::temp_dir().join(format!(
            "banger-logrot-{tag}-{}-{}",
            std::process::id(),
            crate::daemon::shared::random_hex(4)
        ));
        std::fs::create_dir_all(&d).unwrap();
        Tmp(d)
    }

    #[test]
    fn size_table() {
        for (s, want) in [
            ("0", 0),
            ("4096", 4096),
            ("16M", 16 << 20),
            ("16m", 16 << 20),
            ("16MiB", 16 << 20),
            ("16MB", 16 << 20),
            ("512K", 512 << 10),
            ("1G", 1 << 30),
            (" 8k ", 8 << 10),
            ("100b", 100),
        ] {
            assert_eq!(parse_size(s), Ok(want), "{s}");
        }
        for bad in [
            "",
            "M",
            "-1",
            "1.5M",
            "16T",
            "16 M x",
            "99999999999999999999",
            "17179869184G",
        ] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
        for n in [0, 1000, 1 << 10, 3 << 20, 16 << 20, 1 << 30, (1 << 20) + 1] {
            assert_eq!(parse_size(&format_size(n)), Ok(n), "{n}");
        }
    }

    #[test]
    fn config_table() {
        assert_eq!(ConsoleConfig::parse("").unwrap(), ConsoleConfig::default());
        assert_eq!(
            ConsoleConfig::parse("[network]\nbridge = \"banger0\"\n").unwrap(),
            ConsoleConfig::default()
        );
        let c =
            ConsoleConfig::parse("[vm]\nconsole_log_max = \"1M\"\nconsole_rate = 4096\n").unwrap();
        assert_eq!((c.max_bytes, c.rate), (1 << 20, 4096));
        assert_eq!(c.rotate_at(), 512 << 10);
        for (text, want) in [
            (
                "[vm]\nconsole_log_max = \"16Q\"\n",
                "vm.console_log_max = \"16Q\"",
            ),
            ("[vm]\nconsole_log_max = -5\n", "negative"),
            ("[vm]\nconsole_log_max = true\n", "not a size"),
            ("[vm]\nconsole_log_maxx = \"1M\"\n", "vm.console_log_maxx"),
            ("[vm]\nconsole_rate = \"512\"\n", "below the minimum"),
            // 16 × the default rate is 512K.
            (
                "[vm]\nconsole_log_max = \"256K\"\n",
                "16 × vm.console_rate (512K)",
            ),
            ("vm = 3\n", "must be a table"),
            ("[vm\n", "parsing config.toml"),
        ] {
            let e = ConsoleConfig::parse(text).unwrap_err().to_string();
            assert!(e.contains(want), "{text:?}: {e} lacks {want:?}");
        }
    }

    #[test]
    fn serial_body_is_the_rate() {
        let c = ConsoleConfig {
            max_bytes: 1 << 20,
            rate: 8192,
        };
        assert_eq!(
            serde_json::to_value(c.serial()).unwrap(),
            serde_json::json!({"rate_limiter": {"size": 8192, "refill_time": 1000, "one_time_burst": 32768}})
        );
    }

    #[test]
    fn rotates_at_half_the_cap_keeping_one_previous() {
        let t = tmp("rot");
        let cfg = ConsoleConfig {
            max_bytes: 64 << 10,
            rate: 4096,
        };
        let p = t.0.join("console.log");
        assert_eq!(rotate(&p, &cfg).unwrap(), None, "no file: nothing to do");
        // An O_APPEND writer, as the VMM's stdout is.
        let mut w = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&p)
            .unwrap();
        w.write_all(&vec![b'a'; (32 << 10) - 1]).unwrap();
        assert_eq!(rotate(&p, &cfg).unwrap(), None, "under half the cap");
        w.write_all(b"A").unwrap();
        assert_eq!(rotate(&p, &cfg).unwrap(), Some(32 << 10));
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 0);
        assert_eq!(std::fs::read(previous(&p)).unwrap().len(), 32 << 10);
        // The writer goes on at the start of the emptied file.
        w.write_all(&vec![b'b'; 40 << 10]).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 40 << 10);
        assert_eq!(rotate(&p, &cfg).unwrap(), Some(40 << 10));
        let prev = std::fs::read(previous(&p)).unwrap();
        assert!(prev.iter().all(|&b| b == b'b'), "the older .1 was replaced");
        assert!(!t.0.join("console.log.1.tmp").exists());
        // A file far past the cap (the daemon was down): .1 keeps only the newest cap bytes.
        let mut big = vec![b'x'; 200 << 10];
        big.extend_from_slice(&vec![b'y'; 64 << 10]);
        w.write_all(&big).unwrap();
        assert_eq!(rotate(&p, &cfg).unwrap(), Some(64 << 10));
        let prev = std::fs::read(previous(&p)).unwrap();
        assert!(prev.len() == 64 << 10 && prev.iter().all(|&b| b == b'y'));
    }

    #[test]
    fn a_non_appending_writer_leaves_a_hole_that_is_not_counted_or_copied() {
        let t = tmp("hole");
        let cfg = ConsoleConfig {
            max_bytes: 64 << 10,
            rate: 4096,
        };
        let p = t.0.join("firecracker.log");
        // Opened like Firecracker opens --log-path: read-write, no O_APPEND.
        let mut w = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&p)
            .unwrap();
        w.write_all(&vec![b'w'; 40 << 10]).unwrap();
        assert_eq!(rotate(&p, &cfg).unwrap(), Some(40 << 10));
        // Its next line lands at its old offset, after a hole.
        w.write_all(b"after the rotation\n").unwrap();
        let len = std::fs::metadata(&p).unwrap().len();
        assert_eq!(len, (40 << 10) + 19);
        // The hole takes no space and is not "used": no new rotation.
        assert_eq!(rotate(&p, &cfg).unwrap(), None);
        // Once real data reaches half the cap, only data is copied, not the hole.
        w.write_all(&vec![b'z'; 40 << 10]).unwrap();
        let kept = rotate(&p, &cfg).unwrap().expect("rotated");
        let prev = std::fs::read(previous(&p)).unwrap();
        assert_eq!(prev.len() as u64, kept);
        assert!(
            prev.starts_with(b"after the rotation\n"),
            "{:?}",
            &prev[..32]
        );
        assert!(!prev.contains(&0), "the hole was copied");
    }

    #[test]
    fn refuses_symlinks_and_fifos() {
        let t = tmp("odd");
        let cfg = ConsoleConfig {
            max_bytes: 64 << 10,
            rate: 4096,
        };
        let target = t.0.join("elsewhere");
        std::fs::write(&target, vec![b'q'; 64 << 10]).unwrap();
        let link = t.0.join("console.log");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(rotate(&link, &cfg).is_err());
        assert_eq!(std::fs::metadata(&target).unwrap().len(), 64 << 10);
        assert!(!previous(&link).exists());
        let fifo = t.0.join("firecracker.log");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            FileType::Fifo,
            Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        let e = rotate(&fifo, &cfg).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
        assert!(!previous(&fifo).exists());
    }
}
