//! `banger update` end to end up to the swap: the real binary, a real signed release made by
//! `packaging/release.sh` with openssl and a throw-away key, served over real HTTP on 127.0.0.1,
//! installed into a temp layout via `BANGER_ROOT`.
//!
//! Every case here stops before any restart (systemd is not available outside the smoke
//! container): `--check`, an unknown `--to`, `--dry-run`, and every bad artifact, each with the
//! installed binary's hash, install.toml and the lib dir unchanged. The swap, restart, doctor and
//! rollback branches are unit-tested with fakes in `src/update/flow.rs` and run under real systemd
//! by the smoke suite.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod common;

use banger::layout::Layout;
use banger::system::install_toml::{self, InstallInfo};
use common::{have, serve, TempDir};

const BIN: &str = env!("CARGO_BIN_EXE_banger");
const TARGET: &str = "v99.1.0";
const OLDER: &str = "v0.0.1";
const MISLABELLED: &str = "v99.2.0";

struct Bed {
    _tmp: TempDir,
    root: PathBuf,
    rel: PathBuf,
    pubkey: PathBuf,
    other_pubkey: PathBuf,
    manifest_url: String,
}

/// A wrapper release binary: claims `version` for `--version`, is the test binary otherwise.
fn wrapper(dir: &Path, version: &str) -> PathBuf {
    let p = dir.join(format!("banger-{version}"));
    std::fs::write(
        &p,
        format!(
            "#!/bin/sh\nif [ \"$1\" = \"--version\" ]; then echo \"banger {version} (commit test, built 2026-01-01T00:00:00Z)\"; exit 0; fi\nexec {BIN} \"$@\"\n"
        ),
    )
    .unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

fn release(bed_dir: &Path, args: &[&str]) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/release.sh");
    let out = Command::new("bash")
        .arg(script)
        .args(args)
        .current_dir(bed_dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "release.sh {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Bed {
    fn new(tag: &str) -> Bed {
        let tmp = TempDir::new(tag);
        let dir = tmp.0.clone();
        let root = dir.join("root");
        let layout = Layout::under(&root);
        std::fs::create_dir_all(layout.lib_dir()).unwrap();
        std::fs::create_dir_all(layout.etc_dir()).unwrap();
        std::fs::copy(BIN, layout.binary()).unwrap();
        let b = banger::buildinfo::BuildInfo::current();
        install_toml::save(
            &layout,
            &InstallInfo {
                owner_user: "root".into(),
                owner_uid: 0,
                owner_gid: 0,
                owner_home: "/root".into(),
                version: b.version,
                commit: b.commit,
                built_at: b.built_at,
                installed_at: "2026-01-01T00:00:00Z".into(),
            },
        )
        .unwrap();

        let rel = dir.join("releases");
        let key = dir.join("key.pem");
        let k = key.to_str().unwrap();
        let out = rel.to_str().unwrap();
        let w = wrapper(&dir, TARGET);
        release(
            &dir,
            &[
                "--gen-key",
                "--key",
                k,
                "--version",
                TARGET,
                "--out",
                out,
                "--binary",
                w.to_str().unwrap(),
            ],
        );
        let w = wrapper(&dir, OLDER);
        release(
            &dir,
            &[
                "--key",
                k,
                "--version",
                OLDER,
                "--out",
                out,
                "--binary",
                w.to_str().unwrap(),
                "--no-latest",
            ],
        );
        // A release whose binary does not say it is that release.
        let w = wrapper(&dir, "v0.0.7");
        release(
            &dir,
            &[
                "--key",
                k,
                "--version",
                MISLABELLED,
                "--out",
                out,
                "--binary",
                w.to_str().unwrap(),
                "--no-latest",
            ],
        );
        let other = dir.join("other.pem");
        release(
            &dir,
            &[
                "--gen-key",
                "--key",
                other.to_str().unwrap(),
                "--print-pubkey",
            ],
        );

        let base = serve(rel.clone());
        Bed {
            _tmp: tmp,
            root,
            pubkey: dir.join("key.pub.pem"),
            other_pubkey: dir.join("other.pub.pem"),
            rel,
            manifest_url: format!("{base}/manifest.json"),
        }
    }

    fn layout(&self) -> Layout {
        Layout::under(&self.root)
    }

    /// `banger update ARGS… --manifest-url … --pubkey-file KEY` under the bed's BANGER_ROOT.
    fn update_with_key(&self, key: Option<&Path>, args: &[&str]) -> Output {
        let mut c = Command::new(BIN);
        c.arg("update")
            .args(args)
            .args(["--manifest-url", &self.manifest_url])
            .env("BANGER_ROOT", &self.root)
            .env_remove("NOTIFY_SOCKET");
        if let Some(k) = key {
            c.arg("--pubkey-file").arg(k);
        }
        c.output().unwrap()
    }

    fn update(&self, args: &[&str]) -> Output {
        self.update_with_key(Some(&self.pubkey), args)
    }

    /// The install: the real binary's bytes hash, install.toml's bytes, the lib dir listing.
    fn snapshot(&self) -> (String, Vec<u8>, Vec<String>) {
        let l = self.layout();
        let mut listing: Vec<String> = std::fs::read_dir(l.lib_dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        listing.sort();
        (
            banger::update::sha256_file(&l.binary()).unwrap(),
            std::fs::read(l.install_toml()).unwrap(),
            listing,
        )
    }

    fn file(&self, rel: &str) -> PathBuf {
        self.rel.join(rel)
    }
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

fn ready() -> bool {
    for (tool, arg) in [
        ("openssl", "version"),
        ("python3", "--version"),
        ("bash", "--version"),
    ] {
        if !have(tool, arg) {
            println!("SKIP: {tool} not found (packaging/release.sh needs it)");
            return false;
        }
    }
    true
}

#[test]
fn check_and_unknown_version_need_no_root_and_change_nothing() {
    if !ready() {
        return;
    }
    let bed = Bed::new("check");
    let before = bed.snapshot();
    let o = bed.update(&["--check"]);
    let running = banger::buildinfo::VERSION;
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(
        stdout(&o),
        format!("update available: v{running} -> {TARGET}\n")
    );

    let o = bed.update(&["--to", "v9.9.9"]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert!(e.contains("banger: choosing the update target v9.9.9: v9.9.9 is not in the release manifest (known versions: v99.2.0, v99.1.0, v0.0.1)"), "{e}");
    assert!(stdout(&o).is_empty());
    assert_eq!(bed.snapshot(), before);
    assert!(!bed.layout().updates_dir().exists());

    let help = Command::new(BIN)
        .args(["update", "--help"])
        .output()
        .unwrap();
    let h = stdout(&help);
    assert!(
        h.contains("--dry-run") && h.contains("sudo banger update"),
        "{h}"
    );
    assert!(
        !h.contains("manifest-url") && !h.contains("pubkey-file"),
        "hidden flags shown:\n{h}"
    );
}

#[test]
fn dry_run_stages_verifies_and_sanity_runs_without_installing() {
    if !ready() {
        return;
    }
    if !is_root() {
        println!("SKIP: --dry-run needs root (the flow refuses without it)");
        return;
    }
    let bed = Bed::new("dry");
    let before = bed.snapshot();
    let o = bed.update(&["--dry-run"]);
    let (out, err) = (stdout(&o), stderr(&o));
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(
        out.starts_with(&format!(
            "dry run: would update v{} -> {TARGET}",
            banger::buildinfo::VERSION
        )),
        "{out}"
    );
    for line in [
        "the daemon is not running; continuing",
        "SHA256SUMS signature verified",
        "matches the signed SHA256SUMS",
        "database: ",
    ] {
        assert!(err.contains(line), "missing {line:?} in:\n{err}");
    }
    assert_eq!(bed.snapshot(), before, "a dry run installs nothing");
    let staged = bed.layout().updates_dir().join("extract/banger");
    assert!(staged.is_file(), "staging is left for inspection");
}

#[test]
fn bad_artifacts_are_refused_with_the_host_unchanged() {
    if !ready() {
        return;
    }
    if !is_root() {
        println!("SKIP: staging needs root (the flow refuses without it)");
        return;
    }
    let bed = Bed::new("bad");
    let before = bed.snapshot();
    let tar = format!("{TARGET}/banger-{TARGET}-linux-amd64.tar.gz");
    let sums = format!("{TARGET}/SHA256SUMS");
    let sig = format!("{TARGET}/SHA256SUMS.sig");

    type Mutate = Box<dyn Fn(&[u8]) -> Vec<u8>>;
    let flip: Mutate = Box::new(|b| {
        let mut b = b.to_vec();
        let i = b.len() / 2;
        b[i] ^= 0x55;
        b
    });
    let cases: Vec<(&str, String, Mutate, &str)> = vec![
        (
            "tampered tarball",
            tar.clone(),
            flip,
            "does not match SHA256SUMS",
        ),
        (
            "tampered SHA256SUMS",
            sums.clone(),
            Box::new(|b| {
                let mut b = b.to_vec();
                b[0] = if b[0] == b'0' { b'1' } else { b'0' };
                b
            }),
            "verifying the SHA256SUMS signature: it does not verify against any trusted key (",
        ),
        (
            "truncated signature",
            sig.clone(),
            // Whole base64 quanta, so what is left decodes: a DER signature cut short.
            Box::new(|b| b[..b.len() / 2 / 4 * 4].to_vec()),
            "verifying the SHA256SUMS signature: the signature is truncated: its DER header says",
        ),
        (
            "garbage signature",
            sig.clone(),
            Box::new(|_| b"this is not a signature".to_vec()),
            "verifying the SHA256SUMS signature: the signature is not valid base64",
        ),
        (
            "oversized signature",
            sig.clone(),
            Box::new(|_| vec![b'A'; 4096]),
            "larger than the 1024-byte limit",
        ),
        (
            "manifest schema_version 2",
            "manifest.json".into(),
            Box::new(|b| {
                String::from_utf8_lossy(b)
                    .replace("\"schema_version\": 1", "\"schema_version\": 2")
                    .into_bytes()
            }),
            "upgrade banger manually",
        ),
    ];
    for (name, file, mutate, want) in cases {
        let p = bed.file(&file);
        let orig = std::fs::read(&p).unwrap();
        std::fs::write(&p, mutate(&orig)).unwrap();
        let o = bed.update(&[]);
        std::fs::write(&p, &orig).unwrap();
        let e = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{name}: {e}");
        assert!(e.contains(want), "{name}: want {want:?} in:\n{e}");
        assert!(
            e.lines().last().unwrap_or("").starts_with("banger: "),
            "{name}: {e}"
        );
        assert_eq!(bed.snapshot(), before, "{name}: host changed");
        assert!(
            !bed.layout().updates_dir().exists(),
            "{name}: staging left behind"
        );
    }

    let wrong_key_want = format!(
        "verifying the SHA256SUMS signature: it does not verify against any trusted key ({})",
        bed.other_pubkey.display()
    );
    let flag_cases: Vec<(&str, Option<&Path>, Vec<&str>, &str)> = vec![
        (
            "wrong key",
            Some(&bed.other_pubkey),
            vec![],
            wrong_key_want.as_str(),
        ),
        ("placeholder embedded key", None, vec![], "PLACEHOLDER"),
        (
            "downgrade",
            Some(&bed.pubkey),
            vec!["--to", OLDER],
            "refusing to downgrade",
        ),
        (
            "mislabelled release",
            Some(&bed.pubkey),
            vec!["--to", MISLABELLED],
            "does not name v99.2.0",
        ),
    ];
    for (name, key, args, want) in flag_cases {
        let o = bed.update_with_key(key, &args);
        let e = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{name}: {e}");
        assert!(e.contains(want), "{name}: want {want:?} in:\n{e}");
        assert_eq!(bed.snapshot(), before, "{name}: host changed");
        assert!(
            !bed.layout().updates_dir().exists(),
            "{name}: staging left behind"
        );
    }

    // After all that, a dry run of the genuine release still goes through.
    let o = bed.update(&["--dry-run"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
}
