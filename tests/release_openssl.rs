//! The release builder (`packaging/release.sh`) and banger's verifier agree: what openssl signs,
//! banger accepts; what is tampered with, banger rejects; and `openssl dgst -verify` accepts the
//! builder's signature (the `cosign sign-blob` format is the same bytes).

use std::ffi::OsStr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

mod common;

use banger::update::manifest::Manifest;
use banger::update::sha256sums::Sha256Sums;
use banger::update::signature::{self, PublicKey};
use banger::update::staging::{self, ExtractSpec};
use base64::Engine;
use common::{have, TempDir};

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/release.sh")
}

/// `bash <builder> <args>` in `dir`.
fn bash(builder: &Path, dir: &Path, args: &[&OsStr]) -> std::process::Output {
    Command::new("bash")
        .arg(builder)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("running bash {}: {e}", builder.display()))
}

fn release(dir: &Path, args: &[&str]) -> std::process::Output {
    let args: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
    bash(&script(), dir, &args)
}

fn ok(out: &std::process::Output) {
    assert!(
        out.status.success(),
        "release.sh failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn builder_signatures_verify_with_banger_and_openssl() {
    if !have("openssl", "version") {
        println!("SKIP: openssl not found");
        return;
    }
    let tmp = TempDir::new("sig");
    let dir = &tmp.0;
    let payload = dir.join("payload");
    std::fs::write(&payload, b"#!/bin/sh\necho 'banger stand-in'\n").unwrap();
    let p = payload.to_str().unwrap();

    ok(&release(
        dir,
        &[
            "--version",
            "v0.9.1",
            "--out",
            "out",
            "--key",
            "key.pem",
            "--gen-key",
            "--binary",
            p,
        ],
    ));
    let rel = dir.join("out/v0.9.1");
    // A script payload is no banger build: it has no keys to check install.sh against, so the
    // release is made without install.sh.
    assert!(!dir.join("out/install.sh").exists());
    let tar_name = "banger-v0.9.1-linux-amd64.tar.gz";
    let sums_bytes = std::fs::read(rel.join("SHA256SUMS")).unwrap();
    let sig = std::fs::read(rel.join("SHA256SUMS.sig")).unwrap();
    let pub_pem = dir.join("key.pub.pem");

    // --print-pubkey prints the same public key --gen-key wrote.
    let printed = release(dir, &["--key", "key.pem", "--print-pubkey"]);
    ok(&printed);
    assert_eq!(
        String::from_utf8_lossy(&printed.stdout),
        std::fs::read_to_string(&pub_pem).unwrap()
    );

    // banger's verifier accepts the builder's signature...
    let keys = PublicKey::from_file(&pub_pem).unwrap();
    signature::verify(&keys, &sums_bytes, &sig).expect("banger rejects what openssl signed");

    // ...and rejects tampered SHA256SUMS, a tampered signature and a different key.
    let mut tampered = sums_bytes.clone();
    tampered[0] = if tampered[0] == b'0' { b'1' } else { b'0' };
    let e = signature::verify(&keys, &tampered, &sig)
        .unwrap_err()
        .to_string();
    assert!(e.contains("does not verify"), "{e}");
    let mut extra = sums_bytes.clone();
    extra.extend_from_slice(format!("{}  evil\n", "0".repeat(64)).as_bytes());
    assert!(signature::verify(&keys, &extra, &sig).is_err());
    assert!(signature::verify(&keys, &sums_bytes, &sig[..sig.len() / 2]).is_err());
    ok(&release(
        dir,
        &["--key", "other.pem", "--gen-key", "--print-pubkey"],
    ));
    let other = PublicKey::from_file(&dir.join("other.pub.pem")).unwrap();
    assert!(signature::verify(&other, &sums_bytes, &sig).is_err());
    // Rotation: either trusted key may sign.
    let both: Vec<PublicKey> = other.iter().chain(&keys).cloned().collect();
    assert!(signature::verify(&both, &sums_bytes, &sig).is_ok());

    // openssl itself accepts the DER signature the builder made (cosign's blob format).
    let der = base64::engine::general_purpose::STANDARD
        .decode(String::from_utf8(sig.clone()).unwrap().trim())
        .unwrap();
    std::fs::write(dir.join("sig.der"), &der).unwrap();
    let openssl_verify = |file: &Path| {
        Command::new("openssl")
            .args(["dgst", "-sha256", "-verify"])
            .arg(&pub_pem)
            .arg("-signature")
            .arg(dir.join("sig.der"))
            .arg(file)
            .output()
            .unwrap()
    };
    let v = openssl_verify(&rel.join("SHA256SUMS"));
    assert!(
        v.status.success(),
        "openssl -verify: {}",
        String::from_utf8_lossy(&v.stderr)
    );
    assert!(String::from_utf8_lossy(&v.stdout).contains("Verified OK"));
    std::fs::write(dir.join("tampered"), &tampered).unwrap();
    let v = openssl_verify(&dir.join("tampered"));
    assert!(
        !v.status.success(),
        "openssl accepted a tampered SHA256SUMS"
    );

    // SHA256SUMS names the tarball with its real hash, and the tarball is exactly `banger`, 0755.
    let sums = Sha256Sums::parse(&sums_bytes).unwrap();
    let tarball = rel.join(tar_name);
    let actual = banger::update::sha256_file(&tarball).unwrap();
    staging::verify_hash(tar_name, &actual, &sums).unwrap();
    let files = staging::extract(&tarball, &dir.join("x"), &ExtractSpec::default()).unwrap();
    assert_eq!(
        std::fs::read(&files[0]).unwrap(),
        std::fs::read(&payload).unwrap()
    );
    assert_eq!(
        std::fs::metadata(&files[0]).unwrap().permissions().mode() & 0o7777,
        0o755
    );

    // The manifest parses with banger's parser; relative URLs resolve against its location.
    let murl = "http://127.0.0.1:8000/manifest.json";
    let m = Manifest::parse(&std::fs::read(dir.join("out/manifest.json")).unwrap(), murl).unwrap();
    let t = m.target(None).unwrap();
    assert_eq!(t.version.to_string(), "v0.9.1");
    assert_eq!(t.tarball_file_name().unwrap(), tar_name);
    assert_eq!(t.sha256sums_url, "http://127.0.0.1:8000/v0.9.1/SHA256SUMS");

    // A second release merges in; --no-latest keeps latest_stable; --base-url makes absolute URLs.
    ok(&release(
        dir,
        &[
            "--version",
            "0.9.2",
            "--out",
            "out",
            "--key",
            "key.pem",
            "--binary",
            p,
            "--no-latest",
            "--base-url",
            "https://dl.test/rel/",
        ],
    ));
    let m = Manifest::parse(&std::fs::read(dir.join("out/manifest.json")).unwrap(), murl).unwrap();
    assert_eq!(m.known_versions(), "v0.9.2, v0.9.1");
    assert_eq!(m.latest_stable.to_string(), "v0.9.1");
    assert_eq!(
        m.target(Some("v0.9.2")).unwrap().sha256sums_sig_url,
        "https://dl.test/rel/v0.9.2/SHA256SUMS.sig"
    );

    // Refusals: an existing release, an existing key under --gen-key, a bad version.
    let e = run_builder(&script(), dir, "out", "v0.9.1", &payload);
    assert!(!e.status.success());
    assert!(String::from_utf8_lossy(&e.stderr).contains("already exists"));
    let e = release(dir, &["--key", "key.pem", "--gen-key", "--print-pubkey"]);
    assert!(String::from_utf8_lossy(&e.stderr).contains("refusing to overwrite"));
    let e = run_builder(&script(), dir, "out", "v1/../x", &payload);
    assert!(!e.status.success());
}

/// A copy of the release builder and the installer in `dir/packaging/`, the installer's
/// RELEASE_KEYS block holding `keys` (PEM text; empty = no key, the placeholder state).
fn packaging_copy(dir: &Path, keys: &str) -> PathBuf {
    let pk = dir.join("packaging");
    std::fs::create_dir_all(&pk).unwrap();
    std::fs::copy(script(), pk.join("release.sh")).unwrap();
    let install = std::fs::read_to_string(installer()).unwrap();
    let (begin, end) = ("# BEGIN RELEASE KEYS\n", "# END RELEASE KEYS\n");
    let (Some(b), Some(e)) = (install.find(begin), install.find(end)) else {
        panic!("packaging/install.sh has no {begin:?} ... {end:?} block");
    };
    std::fs::write(
        pk.join("install.sh"),
        format!(
            "{}{begin}RELEASE_KEYS='{keys}'\n{}",
            &install[..b],
            &install[e..]
        ),
    )
    .unwrap();
    pk.join("release.sh")
}

fn installer() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/install.sh")
}

/// A stand-in "banger" that answers `--release-keys` the way a build embedding `pems` would.
fn keys_binary(path: &Path, n: usize, pems: &str) {
    std::fs::write(
        path,
        format!(
            "#!/bin/sh\n[ \"$1\" = --release-keys ] || exit 3\ncat <<'KEYS'\nbanger release keys: {n}\n{pems}KEYS\n"
        ),
    )
    .unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// `builder` making release `version` of `binary` into `out`, signed with key.pem.
fn run_builder(
    builder: &Path,
    dir: &Path,
    out: &str,
    version: &str,
    binary: &Path,
) -> std::process::Output {
    let args = [
        "--version",
        version,
        "--out",
        out,
        "--key",
        "key.pem",
        "--binary",
    ];
    let mut args: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
    args.push(binary.as_os_str());
    bash(builder, dir, &args)
}

/// The release builder publishes install.sh only when the keys embedded in it are the keys
/// compiled into the binary, and otherwise refuses before writing anything: no release directory,
/// no manifest, no install.sh.
#[test]
fn builder_refuses_mismatched_installer_keys() {
    if !have("openssl", "version") {
        println!("SKIP: openssl not found");
        return;
    }
    let tmp = TempDir::new("keycheck");
    let dir = &tmp.0;
    ok(&release(
        dir,
        &["--key", "key.pem", "--gen-key", "--print-pubkey"],
    ));
    ok(&release(
        dir,
        &["--key", "other.pem", "--gen-key", "--print-pubkey"],
    ));
    let k = std::fs::read_to_string(dir.join("key.pub.pem")).unwrap();
    let other = std::fs::read_to_string(dir.join("other.pub.pem")).unwrap();
    let fp = |pem: &str| PublicKey::from_pem("k", pem).unwrap()[0].fingerprint();
    let nothing_written = |out: &str| {
        assert!(
            !dir.join(out).exists(),
            "{out} was written by a refused run"
        );
    };

    // The real binary and the real installer agree (today both hold the PLACEHOLDER, no key):
    // packaging/release.sh publishes packaging/install.sh as it is. (A stripped copy of the
    // binary when strip is there: the same keys, a faster gzip.)
    let banger = dir.join("banger");
    let stripped = Command::new("strip")
        .arg("-o")
        .arg(&banger)
        .arg(env!("CARGO_BIN_EXE_banger"))
        .status()
        .is_ok_and(|s| s.success());
    if !stripped {
        std::fs::copy(env!("CARGO_BIN_EXE_banger"), &banger).unwrap();
    }
    let banger = banger.as_path();
    ok(&run_builder(&script(), dir, "out-repo", "v0.1.0", banger));
    assert_eq!(
        std::fs::read(dir.join("out-repo/install.sh")).unwrap(),
        std::fs::read(installer()).unwrap(),
        "the published install.sh is packaging/install.sh"
    );
    let same = packaging_copy(&dir.join("same"), "");

    // The installer embeds a key the binary does not have.
    let extra = packaging_copy(&dir.join("extra"), &k);
    let o = run_builder(&extra, dir, "out-extra", "v0.1.0", banger);
    assert!(!o.status.success(), "published with mismatched keys");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("refusing to publish: the keys embedded in"),
        "{err}"
    );
    assert!(err.contains(&fp(&k)), "names the installer's key: {err}");
    assert!(
        err.contains("binary (banger --release-keys, src/update/signature.rs): "),
        "names the binary's keys: {err}"
    );
    nothing_written("out-extra");

    // The binary embeds a key the installer does not have.
    let bin_k = dir.join("bin-k");
    keys_binary(&bin_k, 1, &k);
    let o = run_builder(&same, dir, "out-missing", "v0.1.0", &bin_k);
    assert!(
        !o.status.success(),
        "published an installer without the binary's key"
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains(&fp(&k)));
    nothing_written("out-missing");

    // Different keys on each side.
    let wrong = packaging_copy(&dir.join("wrong"), &other);
    let o = run_builder(&wrong, dir, "out-wrong", "v0.1.0", &bin_k);
    assert!(!o.status.success(), "published with a different key");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(&fp(&k)) && err.contains(&fp(&other)), "{err}");
    nothing_written("out-wrong");

    // Rotation: two keys on both sides, in any order, match; one of two does not.
    let bin_2 = dir.join("bin-2");
    keys_binary(&bin_2, 2, &format!("{k}{other}"));
    let both = packaging_copy(&dir.join("both"), &format!("{other}{k}"));
    ok(&run_builder(&both, dir, "out-both", "v0.1.0", &bin_2));
    assert!(dir.join("out-both/install.sh").is_file());
    let o = run_builder(&extra, dir, "out-half", "v0.1.0", &bin_2);
    assert!(!o.status.success(), "published with one of two keys");
    nothing_written("out-half");

    // The same key on both sides: published, and the published installer holds it.
    ok(&run_builder(&extra, dir, "out-match", "v0.1.0", &bin_k));
    let published = std::fs::read_to_string(dir.join("out-match/install.sh")).unwrap();
    assert!(published.contains(k.trim()), "{published}");

    // A binary whose answer is inconsistent, or an executable that cannot answer, is refused.
    let liar = dir.join("bin-liar");
    keys_binary(&liar, 2, &k);
    let o = run_builder(&same, dir, "out-liar", "v0.1.0", &liar);
    assert!(String::from_utf8_lossy(&o.stderr).contains("says 2 keys but prints 1"));
    nothing_written("out-liar");
    let o = run_builder(&same, dir, "out-true", "v0.1.0", Path::new("/bin/true"));
    assert!(
        !o.status.success(),
        "published with a binary that printed no keys"
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("cannot compare release keys"));
    nothing_written("out-true");
}

/// shellcheck finds nothing in `script` (SKIP when there is no shellcheck).
fn assert_shellcheck_clean(script: &Path) {
    if !have("shellcheck", "--version") {
        println!("SKIP: shellcheck not found");
        return;
    }
    let out = Command::new("shellcheck").arg(script).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn installer_is_shellcheck_clean() {
    assert_shellcheck_clean(&installer());
}

#[test]
fn builder_is_shellcheck_clean() {
    assert_shellcheck_clean(&script());
}
