//! The kernel from packaging/kernel/ really boots: under `qemu-system-x86_64 -M microvm -accel tcg`
//! (PVH entry, virtio-mmio, serial console) it reaches the root mount without a disk, and with an
//! image made by `image build`'s library it reaches systemd and the serial getty's login prompt.
//! Prints the times (tests never assert on them). SKIPs with the reason when QEMU, the cached
//! kernel (`packaging/kernel/build.sh --cached-only`), root, debootstrap or a mirror is missing.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_banger");
/// TCG on a busy 2-core host is slow; this bounds a hung boot, it is not a performance claim.
const BOOT_LIMIT: Duration = Duration::from_secs(300);

fn skip(test: &str, why: &str) {
    eprintln!("SKIP: kernel_boot::{test}: {why}");
}

/// The cached kernel: `BANGER_TEST_KERNEL`, else what build.sh has cached for this recipe.
fn kernel() -> Result<PathBuf, String> {
    if let Some(k) = std::env::var_os("BANGER_TEST_KERNEL") {
        return Ok(PathBuf::from(k));
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/kernel/build.sh");
    let o = Command::new(&script)
        .arg("--cached-only")
        .output()
        .map_err(|e| format!("running {}: {e}", script.display()))?;
    if !o.status.success() {
        return Err(String::from_utf8_lossy(&o.stderr).trim().to_string());
    }
    let dir = String::from_utf8_lossy(&o.stdout).trim().to_string();
    Ok(Path::new(&dir).join("vmlinux"))
}

fn have_qemu() -> bool {
    banger::guest::have("qemu-system-x86_64")
}

/// A QEMU process whose console output arrives with the time since start; killed on drop.
struct Qemu {
    child: Child,
    chunks: mpsc::Receiver<(Duration, Vec<u8>)>,
    start: Instant,
    /// All console output so far, and where the last match ended.
    text: String,
    pos: usize,
}

impl Qemu {
    fn boot(kernel: &Path, append: &str, disk: Option<&Path>) -> Qemu {
        let mut c = Command::new("qemu-system-x86_64");
        // acpi=off: with ACPI, this kernel under TCG on a loaded host hangs right after "tsc:
        // Unable to calibrate against PIT" (IO-APIC timer setup); without it QEMU passes the
        // virtio-mmio devices on the command line (VIRTIO_MMIO_CMDLINE_DEVICES) and it boots.
        c.args([
            "-M",
            "microvm,acpi=off",
            "-accel",
            "tcg",
            "-m",
            "512",
            "-smp",
            "1",
        ])
        .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
        .args(["-serial", "stdio", "-kernel"])
        .arg(kernel)
        .args(["-append", append]);
        if let Some(d) = disk {
            c.arg("-drive")
                .arg(format!("id=root,file={},format=raw,if=none", d.display()))
                .args(["-device", "virtio-blk-device,drive=root"]);
        }
        let mut child = c
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting qemu-system-x86_64");
        let mut out = child.stdout.take().unwrap();
        let (tx, chunks) = mpsc::channel();
        let start = Instant::now();
        std::thread::spawn(move || {
            // Raw chunks, not lines: a getty prompt ends without a newline.
            let mut buf = [0u8; 4096];
            loop {
                match out.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if tx.send((start.elapsed(), buf[..n].to_vec())).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        Qemu {
            child,
            chunks,
            start,
            text: String::new(),
            pos: 0,
        }
    }

    /// Waits until the console shows `needle` (after the previous match); returns when.
    fn wait_for(&mut self, needle: &str) -> Result<Duration, String> {
        let mut at = self.start.elapsed();
        loop {
            if let Some(i) = self.text[self.pos..].find(needle) {
                self.pos += i + needle.len();
                return Ok(at);
            }
            let left = BOOT_LIMIT.saturating_sub(self.start.elapsed());
            match self.chunks.recv_timeout(left) {
                Ok((t, bytes)) => {
                    at = t;
                    self.text.push_str(&String::from_utf8_lossy(&bytes));
                }
                Err(_) => {
                    let tail: String = self
                        .text
                        .chars()
                        .rev()
                        .take(3000)
                        .collect::<Vec<_>>()
                        .into_iter()
                        .rev()
                        .collect();
                    return Err(format!(
                        "no `{needle}` on the console within {}s (or QEMU exited); it ended with:\n{tail}",
                        BOOT_LIMIT.as_secs()
                    ));
                }
            }
        }
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn kernel_boots_to_the_root_mount() {
    if !have_qemu() {
        return skip(
            "kernel_boots_to_the_root_mount",
            "qemu-system-x86_64 is not installed",
        );
    }
    let k = match kernel() {
        Ok(k) => k,
        Err(why) => return skip("kernel_boots_to_the_root_mount", &why),
    };
    let mut q = Qemu::boot(&k, "console=ttyS0 reboot=k panic=1", None);
    let linux = q.wait_for("Linux version 6.1").unwrap();
    let vfs = q.wait_for("VFS: Unable to mount root").unwrap();
    eprintln!(
        "kernel boot (TCG, no disk): banner at {:.2}s, root mount attempt at {:.2}s",
        linux.as_secs_f64(),
        vfs.as_secs_f64()
    );
}

#[test]
fn kernel_and_built_image_reach_systemd_and_a_serial_login() {
    let t = "kernel_and_built_image_reach_systemd_and_a_serial_login";
    if !have_qemu() {
        return skip(t, "qemu-system-x86_64 is not installed");
    }
    let k = match kernel() {
        Ok(k) => k,
        Err(why) => return skip(t, &why),
    };
    if !rustix::process::geteuid().is_root() || !banger::guest::have("debootstrap") {
        return skip(t, "building the image needs root and debootstrap");
    }
    let Some(mirror) = banger::guest::mirror::host_mirror(Path::new("/etc/apt"), "bookworm") else {
        return skip(t, "no Debian bookworm mirror in /etc/apt/sources.list(.d)");
    };
    let root = std::env::temp_dir().join(format!("banger-kboot-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let layout = banger::layout::Layout::under(&root);
    std::fs::create_dir_all(layout.cache_dir()).unwrap();
    std::fs::create_dir_all("/var/tmp/banger-cache/debootstrap").unwrap();
    std::os::unix::fs::symlink(
        "/var/tmp/banger-cache/debootstrap",
        layout.debootstrap_cache_dir(),
    )
    .unwrap();
    let req = banger::guest::build::Request {
        name: "kboot".into(),
        recipe: banger::guest::debootstrap::Recipe::new("bookworm", &mirror, &[]).unwrap(),
        size: 1 << 30,
    };
    let inputs = banger::guest::customize::Inputs {
        agent: Path::new(BIN),
        ..Default::default()
    };
    let quiet = banger::guest::progress::Progress::new(false);
    let built = banger::guest::build::build(&layout, &req, &inputs, &quiet).unwrap();

    let mut q = Qemu::boot(
        &k,
        "console=ttyS0 root=/dev/vda rw reboot=k panic=1",
        Some(&built.image),
    );
    let linux = q.wait_for("Linux version 6.1");
    let systemd = linux.and_then(|_| q.wait_for("systemd 252"));
    let login = systemd.clone().and_then(|_| q.wait_for("login:"));
    drop(q);
    drop(built);
    let _ = std::fs::remove_dir_all(&root);
    let (systemd, login) = (systemd.unwrap(), login.unwrap());
    eprintln!(
        "guest boot (TCG, 1 vCPU, 512 MiB): systemd at {:.2}s, serial login prompt at {:.2}s",
        systemd.as_secs_f64(),
        login.as_secs_f64()
    );
}
