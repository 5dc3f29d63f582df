//! The stand-in's serial console (`PUT /serial`): where the "guest's" console bytes go (the
//! `serial_out_path` file, else stdout) and Firecracker's token bucket in front of it, so bytes
//! beyond the configured rate are dropped exactly as Firecracker's UART drops them.
//!
//! The stand-in runs no guest code (see `main.rs`), so what its "guest" writes is produced here:
//! the readiness line, and — when the configured kernel is the flooding test guest
//! (`tests/guest/tiny_guest_flood.S`, recognised by [`FLOOD_LINE`] in its image) — the same endless
//! flood of that line the real guest writes under Firecracker. It never writes anywhere else.
//!
//! The bucket is Firecracker's `rate_limiter::TokenBucket` (v1.16.1) for one-byte requests, which
//! is what the UART makes (one `out` per byte): the one-time burst is spent first, then the
//! budget; an empty budget is refilled by the time elapsed since the last refill
//! (`size` tokens per `refill_time` ms, never above `size`); a bucket with `size` or
//! `refill_time` 0 limits nothing.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use banger::vmm::models::{SerialDevice, TokenBucket};

/// The line the flooding test guest writes forever (also the marker of its image).
pub const FLOOD_LINE: &[u8] = b"banger-guest: flood 0123456789abcdefghijklmnopqrstuvwxyz\n";

/// How many bytes the stand-in's flooding "guest" offers per 10 ms (about 400 KiB/s: far above any
/// limit banger sets, far below what would starve the test machine).
const FLOOD_CHUNK: usize = 4096;

/// Firecracker's token bucket, for byte-sized requests.
#[derive(Debug, Clone)]
pub struct Bucket {
    size: u64,
    one_time_burst: u64,
    refill_time_ms: u64,
    budget: u64,
    last_update: Instant,
}

impl Bucket {
    /// The bucket for `tb`, or `None` when it limits nothing (`size` or `refill_time` 0), as
    /// Firecracker's `TokenBucket::new` decides.
    pub fn new(tb: &TokenBucket, now: Instant) -> Option<Bucket> {
        if tb.size == 0 || tb.refill_time == 0 {
            return None;
        }
        Some(Bucket {
            size: tb.size,
            one_time_burst: tb.one_time_burst.unwrap_or(0),
            refill_time_ms: tb.refill_time,
            // Firecracker's bucket starts full.
            budget: tb.size,
            last_update: now,
        })
    }

    fn replenish(&mut self, now: Instant) {
        let delta = now.saturating_duration_since(self.last_update).as_nanos();
        let full = u128::from(self.refill_time_ms) * 1_000_000;
        if delta >= full {
            self.budget = self.size;
            self.last_update = now;
            return;
        }
        let tokens = delta * u128::from(self.size) / full;
        if tokens == 0 {
            return;
        }
        // Carry the fraction of a token over, as Firecracker does (round the time used up).
        let used_ns = (tokens * full).div_ceil(u128::from(self.size));
        self.last_update += Duration::from_nanos(u64::try_from(used_ns).unwrap_or(u64::MAX));
        self.budget = (self.budget + u64::try_from(tokens).unwrap_or(u64::MAX)).min(self.size);
    }

    /// How many of `n` bytes written one by one at `now` pass (the first ones do; the rest are
    /// dropped).
    pub fn admit(&mut self, n: u64, now: Instant) -> u64 {
        let mut passed = 0;
        let from_burst = self.one_time_burst.min(n);
        if from_burst > 0 {
            self.one_time_burst -= from_burst;
            self.last_update = now;
            passed += from_burst;
        }
        let mut want = n - passed;
        let take = want.min(self.budget);
        self.budget -= take;
        passed += take;
        want -= take;
        if want > 0 {
            self.replenish(now);
            let take = want.min(self.budget);
            self.budget -= take;
            passed += take;
        }
        passed
    }
}

/// The serial console of a booted stand-in "guest".
#[derive(Debug)]
pub struct Console {
    out: Option<File>,
    bucket: Option<Bucket>,
    /// Bytes dropped by the rate limiter (Firecracker's `uart.rate_limiter_dropped_bytes`).
    pub dropped: u64,
}

impl Console {
    /// Opens the console `cfg` describes, as Firecracker does at InstanceStart: `serial_out_path`
    /// created if missing and opened read-write, non-blocking, without `O_APPEND`; stdout without
    /// one.
    pub fn open(cfg: Option<&SerialDevice>) -> Result<Console, String> {
        let out = match cfg.and_then(|c| c.serial_out_path.as_deref()) {
            Some(p) => Some(open_out(p)?),
            None => None,
        };
        Ok(Console {
            out,
            bucket: cfg
                .and_then(|c| c.rate_limiter.as_ref())
                .and_then(|tb| Bucket::new(tb, Instant::now())),
            dropped: 0,
        })
    }

    /// Writes what the rate limiter lets through of `bytes` (all of them without a limiter).
    pub fn write(&mut self, bytes: &[u8]) {
        let n = match &mut self.bucket {
            Some(b) => {
                usize::try_from(b.admit(bytes.len() as u64, Instant::now())).unwrap_or(bytes.len())
            }
            None => bytes.len(),
        };
        self.dropped += (bytes.len() - n) as u64;
        if n == 0 {
            return;
        }
        // A full pipe or disk loses console bytes, as Firecracker's non-blocking UART output does.
        let _ = match &mut self.out {
            Some(f) => f.write_all(&bytes[..n]).and_then(|_| f.flush()),
            None => {
                let mut o = std::io::stdout().lock();
                o.write_all(&bytes[..n]).and_then(|_| o.flush())
            }
        };
    }

    /// The flooding guest's endless output: [`FLOOD_LINE`] over and over, [`FLOOD_CHUNK`] bytes
    /// every 10 ms, through the rate limiter. Never returns (the process ends with its "guest").
    pub fn flood(mut self) -> ! {
        let text: Vec<u8> = FLOOD_LINE
            .iter()
            .copied()
            .cycle()
            .take(FLOOD_LINE.len() * (FLOOD_CHUNK / FLOOD_LINE.len() + 1))
            .collect();
        let mut at = 0;
        loop {
            let chunk: Vec<u8> = text[at..].iter().copied().take(FLOOD_CHUNK).collect();
            at = (at + chunk.len()) % FLOOD_LINE.len();
            self.write(&chunk);
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn open_out(p: &Path) -> Result<File, String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .custom_flags(libc::O_NONBLOCK)
        .open(p)
        .map_err(|e| format!("Cannot open the serial output file {}: {e}", p.display()))
}

/// Whether `kernel` is the flooding test guest (its image carries [`FLOOD_LINE`]).
pub fn is_flood_kernel(kernel: &Path) -> bool {
    std::fs::read(kernel)
        .map(|k| k.windows(FLOOD_LINE.len()).any(|w| w == FLOOD_LINE))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tb(size: u64, burst: Option<u64>, refill: u64) -> TokenBucket {
        TokenBucket {
            one_time_burst: burst,
            refill_time: refill,
            size,
        }
    }

    #[test]
    fn zero_size_or_refill_limits_nothing() {
        let t0 = Instant::now();
        assert!(Bucket::new(&tb(0, None, 1000), t0).is_none());
        assert!(Bucket::new(&tb(100, None, 0), t0).is_none());
        assert!(Bucket::new(&tb(100, None, 1000), t0).is_some());
    }

    #[test]
    fn burst_then_budget_then_refill_by_time() {
        let t0 = Instant::now();
        let mut b = Bucket::new(&tb(100, Some(50), 1000), t0).unwrap();
        // Burst (50) and the full starting budget (100) pass at once; the rest is dropped.
        assert_eq!(b.admit(400, t0), 150);
        assert_eq!(b.admit(10, t0), 0);
        // A quarter of the refill time gives a quarter of the bucket.
        assert_eq!(b.admit(400, t0 + Duration::from_millis(250)), 25);
        // A full refill time or more refills to `size`, never above.
        assert_eq!(b.admit(400, t0 + Duration::from_secs(10)), 100);
        // Fractions of a token carry over: 3 ms at 100 tokens/s is 0.3 tokens each time.
        let mut b = Bucket::new(&tb(100, None, 1000), t0).unwrap();
        assert_eq!(b.admit(100, t0), 100);
        let mut got = 0;
        for i in 1..=10 {
            got += b.admit(1, t0 + Duration::from_millis(3 * i));
        }
        assert_eq!(got, 3);
    }

    #[test]
    fn sustained_rate_is_the_bucket_rate() {
        // One byte offered every 100 µs for 10 s at 1000 tokens per second, bucket 1000.
        let t0 = Instant::now();
        let mut b = Bucket::new(&tb(1000, None, 1000), t0).unwrap();
        let mut passed = 0;
        for i in 0..100_000u64 {
            passed += b.admit(1, t0 + Duration::from_micros(100 * i));
        }
        // The starting budget plus 10 s of refill, give or take a token.
        assert!((10_990..=11_000).contains(&passed), "{passed}");
    }

    #[test]
    fn console_writes_only_what_passes_to_the_out_file() {
        let dir = std::env::temp_dir().join(format!("standin-serial-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("serial.out");
        let _ = std::fs::remove_file(&p);
        let cfg = SerialDevice {
            serial_out_path: Some(p.clone()),
            rate_limiter: Some(tb(10, None, 60_000)),
        };
        let mut c = Console::open(Some(&cfg)).unwrap();
        c.write(b"0123456789abcdef");
        c.write(b"more");
        assert_eq!(std::fs::read(&p).unwrap(), b"0123456789");
        assert_eq!(c.dropped, 10);
        // Unlimited: everything passes.
        let cfg = SerialDevice {
            serial_out_path: Some(p.clone()),
            rate_limiter: None,
        };
        std::fs::write(&p, b"").unwrap();
        let mut c = Console::open(Some(&cfg)).unwrap();
        c.write(FLOOD_LINE);
        assert_eq!(std::fs::read(&p).unwrap(), FLOOD_LINE);
        // An out path in a missing directory fails the boot, naming the path.
        let cfg = SerialDevice {
            serial_out_path: Some(dir.join("no/such/dir")),
            rate_limiter: None,
        };
        assert!(Console::open(Some(&cfg))
            .unwrap_err()
            .contains("no/such/dir"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
