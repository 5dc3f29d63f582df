//! `banger image build` for real: root, debootstrap from this host's own apt mirror, `mkfs.ext4 -d`,
//! imported through a real daemon under a temp layout. The debootstrap cache is shared with later
//! runs (and CI) under /var/tmp/banger-cache/debootstrap, so only the first run downloads.
//! Refusals are checked to leave nothing behind. SKIPs (with the reason) without root, debootstrap,
//! mkfs.ext4 or a Debian mirror in /etc/apt.

mod common;
#[path = "guest/mod.rs"]
mod guest;

use common::{is_root, stderr, stdout, Bed, Server};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Instant;

const SHARED_CACHE: &str = "/var/tmp/banger-cache/debootstrap";

struct Host {
    bed: Bed,
    _daemon: Server,
    mirror: String,
}

impl Host {
    fn new(name: &str) -> Option<Host> {
        let skip = |why: &str| {
            eprintln!("SKIP: image_build::{name}: {why}");
            None
        };
        if !is_root() {
            return skip("needs root");
        }
        for tool in ["debootstrap", "mkfs.ext4", "debugfs", "setpriv"] {
            if !banger::guest::have(tool) {
                return skip(&format!("{tool} is not installed"));
            }
        }
        let Some(mirror) = banger::guest::mirror::host_mirror(Path::new("/etc/apt"), "bookworm")
        else {
            return skip("no Debian bookworm mirror in /etc/apt/sources.list(.d)");
        };
        let bed = Bed::new(name);
        let cache_parent = bed.layout().debootstrap_cache_dir();
        std::fs::create_dir_all(cache_parent.parent().unwrap()).unwrap();
        std::fs::create_dir_all(SHARED_CACHE).unwrap();
        std::os::unix::fs::symlink(SHARED_CACHE, &cache_parent).unwrap();
        let daemon = spawn_daemon_as_nobody(&bed);
        let h = Host {
            bed,
            _daemon: daemon,
            mirror,
        };
        let kernel = guest::build_tiny_guest(&h.bed.root).expect("building the tiny guest");
        h.ok(&["kernel", "import", "k1", kernel.to_str().unwrap()]);
        Some(h)
    }

    fn run(&self, args: &[&str]) -> Output {
        self.bed.run("banger", args)
    }

    fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(o.status.success(), "banger {args:?}: {}", stderr(&o));
        stdout(&o)
    }

    fn images(&self) -> Vec<String> {
        let v: Value = serde_json::from_str(&self.ok(&["image", "list", "--json"])).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .map(|i| i["name"].as_str().unwrap().to_string())
            .collect()
    }

    /// Scratch left by builds: must be empty after every build, failed or not.
    fn scratch(&self) -> Vec<String> {
        std::fs::read_dir(self.bed.layout().image_build_dir())
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn build(&self, name: &str, extra: &[&str]) -> Output {
        let mut args = vec!["image", "build", name, "--mirror", &self.mirror];
        args.extend_from_slice(extra);
        self.run(&args)
    }
}

/// The daemon runs as an unprivileged owner, as in production: the image the root CLI hands
/// it must be readable by that user, nobody else.
fn spawn_daemon_as_nobody(bed: &Bed) -> Server {
    use std::os::unix::process::CommandExt;
    let owned = std::process::Command::new("chown")
        .args(["-R", "65534:65534"])
        .arg(&bed.root)
        .status()
        .unwrap();
    assert!(owned.success());
    let log = bed.root.join("bangerd.log");
    let child = bed
        .cmd("bangerd")
        .uid(65534)
        .gid(65534)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let server = Server { child, log };
    let sock = bed.layout().daemon_socket();
    let deadline = Instant::now() + std::time::Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(
            Instant::now() < deadline,
            "bangerd did not answer on {} within 20s: {}",
            sock.display(),
            server.log_text()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    server
}

fn debugfs(image: &Path, request: &str) -> String {
    let o = std::process::Command::new("debugfs")
        .args(["-R", request])
        .arg(image)
        .output()
        .unwrap();
    stdout(&o)
}

fn image_file(h: &Host, name: &str) -> PathBuf {
    h.bed.layout().images_dir().join(name).join("rootfs.ext4")
}

#[test]
fn refusals_before_any_work_create_nothing() {
    let Some(h) = Host::new("refusals") else {
        return;
    };
    let rootfs = h.bed.root.join("small.img");
    std::fs::write(&rootfs, vec![0u8; 1 << 20]).unwrap();
    h.ok(&[
        "image",
        "import",
        "taken",
        "--rootfs",
        rootfs.to_str().unwrap(),
        "--kernel",
        "k1",
    ]);
    let before = h.images();
    let cases: &[(&[&str], i32, &str)] = &[
        (
            &["image", "build", "taken"],
            1,
            "an image with that name exists",
        ),
        (&["image", "build", "Bad_Name"], 2, "image name `Bad_Name`"),
        (&["image", "build", "dev", "--size", "2X"], 2, "--size"),
        (&["image", "build", "dev", "--size", "1M"], 2, "too small"),
        (
            &["image", "build", "dev", "--kernel", "nosuch"],
            2,
            "no kernel named `nosuch`",
        ),
        (
            &["image", "build", "dev", "--package", "Bad,pkg"],
            2,
            "--package Bad,pkg",
        ),
        (
            &["image", "build", "dev", "--suite", "../etc"],
            2,
            "--suite",
        ),
        (
            &["image", "build", "dev", "--mirror", "ftp://x"],
            2,
            "--mirror",
        ),
    ];
    for (args, code, msg) in cases {
        let o = h.run(args);
        assert_eq!(o.status.code(), Some(*code), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(msg), "{args:?}: {}", stderr(&o));
        assert!(h.scratch().is_empty(), "{args:?} left {:?}", h.scratch());
    }
    // Not root: refused before anything, with the command to re-run.
    let o = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(h.bed.bin.join("banger"))
        .args(["image", "build", "dev"])
        .env("BANGER_ROOT", &h.bed.root)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("root is required")
            && stderr(&o).contains("sudo banger image build dev"),
        "{}",
        stderr(&o)
    );
    assert_eq!(h.images(), before);
    assert!(
        !h.bed.layout().image_build_dir().exists(),
        "no scratch dir was even created"
    );
}

#[test]
fn builds_imports_and_caches() {
    let Some(h) = Host::new("build") else {
        return;
    };
    let t = Instant::now();
    let o = h.build("dev", &[]);
    let first = t.elapsed();
    assert!(o.status.success(), "{}", stderr(&o));
    let summary = stdout(&o);
    assert!(
        summary.starts_with("built image dev: 2.0G ext4"),
        "{summary}"
    );
    // Quiet when stderr is not a terminal.
    assert!(stderr(&o).is_empty(), "{}", stderr(&o));
    assert!(h.scratch().is_empty(), "{:?}", h.scratch());

    let v: Value = serde_json::from_str(&h.ok(&["image", "list", "--json"])).unwrap();
    let dev = v
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == "dev")
        .unwrap();
    assert_eq!(dev["kernel"], "k1");
    let img = image_file(&h, "dev");
    let meta = std::fs::metadata(&img).unwrap();
    assert_eq!(meta.len(), 2 << 30);
    use std::os::unix::fs::MetadataExt;
    assert_eq!(meta.uid(), 65534, "the daemon (the owner) made its copy");
    let used = meta.blocks() * 512;

    // What is inside, read without mounting.
    let agent = debugfs(&img, "stat /usr/local/bin/banger-vsock-agent");
    assert!(agent.contains("Mode:  0755"), "{agent}");
    // The agent is this very banger (debug sections stripped): it runs and says so.
    let dumped = h.bed.root.join("agent-out/banger-vsock-agent");
    std::fs::create_dir_all(dumped.parent().unwrap()).unwrap();
    debugfs(
        &img,
        &format!(
            "dump /usr/local/bin/banger-vsock-agent {}",
            dumped.display()
        ),
    );
    std::fs::set_permissions(&dumped, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let v = std::process::Command::new(&dumped)
        .arg("--version")
        .output()
        .unwrap();
    let mine = h.ok(&["--version"]);
    assert_eq!(stdout(&v), mine, "{}", stderr(&v));
    let ssh = debugfs(&img, "ls /etc/ssh");
    assert!(
        ssh.contains("sshd_config.d") && !ssh.contains("ssh_host_"),
        "{ssh}"
    );
    let dropin = debugfs(&img, "cat /etc/ssh/sshd_config.d/banger.conf");
    assert!(dropin.contains("PasswordAuthentication no"), "{dropin}");
    assert_eq!(debugfs(&img, "cat /etc/machine-id"), "");
    let wants = debugfs(&img, "ls /etc/systemd/system/multi-user.target.wants");
    assert!(wants.contains("banger-vsock-agent.service"), "{wants}");
    let getty = debugfs(&img, "ls /etc/systemd/system/getty.target.wants");
    assert!(getty.contains("serial-getty@ttyS0.service"), "{getty}");
    assert!(debugfs(&img, "cat /etc/fstab").contains("/dev/vda / ext4"));
    for bin in [
        "/usr/sbin/sshd",
        "/usr/bin/ip",
        "/lib/systemd/systemd",
        "/usr/bin/udevadm",
    ] {
        let s = debugfs(&img, &format!("stat {bin}"));
        assert!(s.contains("Inode:"), "{bin} missing in the image: {s}");
    }

    // Second build: the debootstrap tree comes from the cache.
    let t = Instant::now();
    let o = h.build("dev2", &["--size", "1536M"]);
    let cached = t.elapsed();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("debootstrap cached"), "{}", stdout(&o));
    assert_eq!(
        std::fs::metadata(image_file(&h, "dev2")).unwrap().len(),
        1536 << 20
    );

    // Too small for this tree: refused after measuring it, saying how much; nothing left.
    let o = h.build("tiny", &["--size", "64M"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("too small") && stderr(&o).contains("use --size"),
        "{}",
        stderr(&o)
    );
    assert!(!h.images().contains(&"tiny".to_string()));
    assert!(h.scratch().is_empty(), "{:?}", h.scratch());

    // debootstrap failing (a mirror that does not exist; no host contacted): its log in the error.
    let o = h.run(&[
        "image",
        "build",
        "broken",
        "--mirror",
        "file:///nonexistent/banger-mirror",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("debootstrap failed") && stderr(&o).contains(".log"),
        "{}",
        stderr(&o)
    );
    assert!(!h.images().contains(&"broken".to_string()));
    assert!(h.scratch().is_empty(), "{:?}", h.scratch());

    eprintln!(
        "image build: first {:.1}s (debootstrap {}), cached {:.1}s; image 2G apparent, {} MiB allocated",
        first.as_secs_f64(),
        if summary.contains("debootstrap fresh") { "fresh" } else { "cached" },
        cached.as_secs_f64(),
        used >> 20
    );
}
