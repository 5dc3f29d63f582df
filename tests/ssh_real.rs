//! banger's ssh command line against a real OpenSSH server: the key banger generates, its
//! known_hosts pin, the argument vector and the remote-command quoting, end to end.
//!
//! Runs as root: sshd and the client both run inside a network namespace this test creates
//! (loopback only), so no packet touches the machine's own network. Proves: `sh -c 'exit 7'`
//! exits 7; awkward words (quotes, `$`, spaces, newlines, empty) arrive exactly; stdin passes
//! through and stdout/stderr stay separate; a changed host key and a missing pin are refused by
//! ssh (exit 255) and nothing is written to any known_hosts, the user's included.

mod common;
#[path = "sshd/mod.rs"]
mod sshd;

use banger::layout::Layout;
use banger::ssh::command::{SshCommand, Tty};
use banger::ssh::known_hosts::{KnownHosts, Pin};
use banger::ssh::{OwnerKey, PublicKey};
use common::*;
use std::io::Write;
use std::process::{Command, Output, Stdio};

struct Bed {
    ns: NetNs,
    root: TempDir,
    layout: Layout,
    key: OwnerKey,
    sshd: sshd::Sshd,
}

fn bed(tag: &str) -> Option<Bed> {
    if !is_root() {
        eprintln!("SKIP: ssh_real: needs root (network namespace, sshd)");
        return None;
    }
    if let Err(why) = sshd::sshd_binary() {
        eprintln!("SKIP: ssh_real: {why}");
        return None;
    }
    if !have("ssh", "-V") {
        eprintln!("SKIP: ssh_real: no ssh client (apt-get install openssh-client)");
        return None;
    }
    let ns = match NetNs::new(tag) {
        Ok(ns) => ns,
        Err(why) => {
            eprintln!("SKIP: ssh_real: {why}");
            return None;
        }
    };
    assert!(ns.ip(&["link", "set", "lo", "up"]).status.success());
    let root = TempDir::new(&format!("ssh-real-{tag}"));
    let layout = Layout::under(root.0.join("root"));
    let key = OwnerKey::ensure(&layout).unwrap();
    let sshd = sshd::Sshd::start(
        &ns.name,
        "127.0.0.1",
        &root.0.join("sshd"),
        &key.authorized_keys_line(),
    );
    Some(Bed {
        ns,
        root,
        layout,
        key,
        sshd,
    })
}

impl Bed {
    fn pin(&self, key: &str) {
        KnownHosts::for_layout(&self.layout)
            .pin(&Pin {
                vm_id: "aaaaaaaaaaaa".into(),
                vm_name: "real".into(),
                hosts: vec!["real.vm".into(), "127.0.0.1".into()],
                key: PublicKey::parse(key).unwrap(),
            })
            .unwrap();
    }

    /// banger's ssh argv for `words`, run in the namespace with `stdin`; HOME is a temp dir so
    /// the test can prove nothing lands in a user's ~/.ssh.
    fn ssh(&self, words: &[&str], stdin: &[u8]) -> Output {
        let words: Vec<String> = words.iter().map(|s| s.to_string()).collect();
        let (k, kh) = (self.layout.ssh_key(), self.layout.ssh_known_hosts());
        let argv = SshCommand {
            key: &k,
            known_hosts: &kh,
            host: "127.0.0.1",
            port: None,
            tty: Tty::No,
            command: Some(&words),
        }
        .argv()
        .unwrap();
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.ns.name])
            .args(&argv)
            .env("HOME", self.root.0.join("home"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(stdin).unwrap();
        child.wait_with_output().unwrap()
    }
}

#[test]
fn exit_status_quoting_and_io_through_a_real_sshd() {
    let Some(b) = bed("real") else { return };
    b.pin(&b.sshd.host_key);

    let o = b.ssh(&["sh", "-c", "exit 7"], b"");
    assert_eq!(
        o.status.code(),
        Some(7),
        "{}\nsshd: {}",
        stderr(&o),
        b.sshd.log_text()
    );
    assert_eq!(stderr(&o), "", "ssh added noise on stderr");

    let words = [
        "two  spaces",
        "it's",
        "\"double\"",
        "$HOME",
        "`id`",
        "$(id)",
        "",
        "line1\nline2",
        "*",
        "~",
        "A=b",
        "a;b|c&d",
        "\\",
        "-n",
    ];
    let mut cmd = vec!["printf", "%s\\0"];
    cmd.extend(words);
    let o = b.ssh(&cmd, b"");
    assert!(o.status.success(), "{}", stderr(&o));
    let mut got: Vec<String> = String::from_utf8(o.stdout)
        .unwrap()
        .split('\0')
        .map(String::from)
        .collect();
    assert_eq!(got.pop().as_deref(), Some(""));
    assert_eq!(got, words, "the guest's shell did not get the exact words");

    // stdin through, stdout and stderr separate.
    let o = b.ssh(
        &["sh", "-c", "tr a-z A-Z; echo to-stderr >&2; exit 3"],
        b"hello\n",
    );
    assert_eq!(o.status.code(), Some(3));
    assert_eq!(stdout(&o), "HELLO\n");
    assert_eq!(stderr(&o), "to-stderr\n");

    // The user's ~/.ssh was never created.
    assert!(!b.root.0.join("home/.ssh").exists());
}

#[test]
fn changed_or_missing_host_key_is_refused_and_nothing_is_learned() {
    let Some(b) = bed("refuse") else { return };
    let kh = b.layout.ssh_known_hosts();

    // No pin at all: strict checking refuses instead of trusting on first use.
    std::fs::create_dir_all(kh.parent().unwrap()).unwrap();
    std::fs::write(&kh, "").unwrap();
    let o = b.ssh(&["true"], b"");
    assert_eq!(o.status.code(), Some(255));
    assert!(
        stderr(&o).contains("Host key verification failed"),
        "{}",
        stderr(&o)
    );
    assert_eq!(
        std::fs::read_to_string(&kh).unwrap(),
        "",
        "ssh learned a key"
    );

    // Another key pinned (the guest's key changed, or someone is in the middle): refused loudly.
    b.pin(&PublicKey::from_bytes([9; 32]).to_openssh());
    let before = std::fs::read_to_string(&kh).unwrap();
    let o = b.ssh(&["true"], b"");
    assert_eq!(o.status.code(), Some(255));
    let err = stderr(&o);
    assert!(
        err.contains("REMOTE HOST IDENTIFICATION HAS CHANGED"),
        "{err}"
    );
    assert!(err.to_lowercase().contains("man-in-the-middle"), "{err}");
    assert_eq!(std::fs::read_to_string(&kh).unwrap(), before);
    assert!(!b.root.0.join("home/.ssh").exists());
    let _ = &b.key;
}
