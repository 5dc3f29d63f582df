//! A real OpenSSH server for tests, run by the test itself inside a network namespace the test
//! owns (`ip netns exec`), listening on an address of that namespace only: the SSH traffic never
//! leaves it. Host key and authorized_keys live in the test's temp dir; killed on drop.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The sshd binary, or `Err(skip reason)`.
pub fn sshd_binary() -> Result<PathBuf, String> {
    let p = PathBuf::from("/usr/sbin/sshd");
    if p.exists() {
        Ok(p)
    } else {
        Err("no /usr/sbin/sshd (scripts/deps.sh installs openssh-server)".into())
    }
}

/// A running sshd.
pub struct Sshd {
    child: Child,
    /// Its log (sshd -e writes to stderr).
    pub log: PathBuf,
    /// Its ed25519 host public key line (`ssh-ed25519 AAAA…`).
    pub host_key: String,
    dir: PathBuf,
}

impl Sshd {
    /// Starts sshd in netns `ns` on `addr`:22, letting in root with `authorized` (a public key line).
    pub fn start(ns: &str, addr: &str, dir: &Path, authorized: &str) -> Sshd {
        let bin = sshd_binary().expect("sshd present (callers SKIP otherwise)");
        std::fs::create_dir_all(dir).unwrap();
        let hk = dir.join("host_ed25519");
        let _ = std::fs::remove_file(&hk);
        let _ = std::fs::remove_file(dir.join("host_ed25519.pub"));
        let out = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "test-sshd", "-f"])
            .arg(&hk)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let host_key = std::fs::read_to_string(dir.join("host_ed25519.pub")).unwrap();
        let host_key = host_key
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ");
        let ak = dir.join("authorized_keys");
        std::fs::write(&ak, format!("{authorized}\n")).unwrap();
        let cfg = dir.join("sshd_config");
        std::fs::write(
            &cfg,
            format!(
                "ListenAddress {addr}\nPort 22\nHostKey {}\nPidFile none\nAuthorizedKeysFile {}\n\
                 StrictModes no\nPermitRootLogin prohibit-password\nPasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\nUsePAM no\nPrintMotd no\nPrintLastLog no\n",
                hk.display(),
                ak.display()
            ),
        )
        .unwrap();
        // sshd's compiled-in privilege separation directory (the package's unit makes it).
        let _ = std::fs::create_dir_all("/run/sshd");
        let log = dir.join("sshd.log");
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(&bin)
            .args(["-D", "-e", "-f"])
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let s = Sshd {
            child,
            log,
            host_key,
            dir: dir.to_path_buf(),
        };
        s.wait_listening(ns, addr);
        s
    }

    fn wait_listening(&self, ns: &str, addr: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let out = Command::new("ip")
                .args(["netns", "exec", ns, "ss", "-Hltn"])
                .output()
                .unwrap();
            if String::from_utf8_lossy(&out.stdout).contains(&format!("{addr}:22")) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "sshd did not listen on {addr}:22 within 10s: {}",
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What sshd logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
