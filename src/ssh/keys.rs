//! The install's one SSH key: `/var/lib/banger/ssh/id_ed25519` (+ `.pub`), made on first need.
//!
//! Owns generating, writing and loading that key, and the forms guests get it in: the
//! authorized_keys line and its base64 for the kernel argument `banger.key=`. It never reads or
//! writes anything in a user's `~/.ssh`.
//!
//! The key is generated in-process with `ring` (already a dependency, used for update signatures)
//! and written in OpenSSH's own private-key container (`openssh-key-v1`, unencrypted), which is a
//! few dozen lines. We chose that over running `ssh-keygen` because the daemon then needs no
//! OpenSSH package at all, creation is one atomic step we control (a complete temp file
//! hard-linked into place, so a crash never leaves half a key and two concurrent first uses end
//! with one key: the loser adopts the winner's), and there is no child process or its output to
//! interpret. A test checks the result with the real `ssh-keygen -y` when it is installed.
//!
//! Files: the directory is 0700, the private key 0600 (a looser key is refused: it may have been
//! read by others), the `.pub` 0644 and always rewritten from the private key if it disagrees.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use base64::Engine;
use ring::rand::SecureRandom;
use ring::signature::KeyPair;

use super::files;
use super::pubkey::{put_string, PublicKey, Reader, ED25519};
use crate::error::{Error, Result};
use crate::layout::Layout;

const MAGIC: &[u8] = b"openssh-key-v1\0";
const BEGIN: &str = "-----BEGIN OPENSSH PRIVATE KEY-----";
const END: &str = "-----END OPENSSH PRIVATE KEY-----";
/// The comment stored in the key and its `.pub`.
pub const COMMENT: &str = "banger";

/// The install's SSH key, loaded: where the private half is and what the public half is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnerKey {
    /// Path of the private key (what `ssh -i` gets).
    pub path: PathBuf,
    /// The public half.
    pub public: PublicKey,
}

impl OwnerKey {
    /// Loads the key, creating it (and the directory) first if there is none yet.
    pub fn ensure(layout: &Layout) -> Result<OwnerKey> {
        files::ensure_private_dir(&layout.ssh_dir())?;
        let path = layout.ssh_key();
        if files::read_regular(&path)?.is_none() {
            let (text, _) = generate()?;
            // false: another process or thread made it first; we load theirs below.
            files::create_once(&path, text.as_bytes(), 0o600)?;
        }
        let key = Self::load(layout)?;
        key.sync_pub(&layout.ssh_key_pub())?;
        Ok(key)
    }

    /// Loads an existing key; a missing one is an error saying who makes it.
    pub fn load(layout: &Layout) -> Result<OwnerKey> {
        let path = layout.ssh_key();
        let what = || format!("reading banger's SSH key {}", path.display());
        let Some(bytes) = files::read_regular(&path)? else {
            return Err(Error::new(what(), "it does not exist yet").hint(
                "the daemon makes it when it creates a VM; create one with `banger vm create`",
            ));
        };
        let md = std::fs::symlink_metadata(&path).map_err(|e| Error::new(what(), e))?;
        if md.mode() & 0o077 != 0 {
            return Err(Error::new(
                what(),
                format!(
                    "its mode is {:04o}; a private key readable by others may have leaked",
                    md.mode() & 0o777
                ),
            )
            .hint(format!(
                "if you trust it, run `chmod 600 {0}`; otherwise delete {0} and {0}.pub and recreate your VMs",
                path.display()
            )));
        }
        let text = String::from_utf8(bytes).map_err(|_| Error::new(what(), "it is not text"))?;
        let public = parse_private(&text).map_err(|e| {
            Error::new(what(), e).hint(format!(
                "move {} aside; banger makes a new key (recreate your VMs to give them the new key)",
                path.display()
            ))
        })?;
        Ok(OwnerKey { path, public })
    }

    /// The authorized_keys line: `ssh-ed25519 AAAA… banger`.
    pub fn authorized_keys_line(&self) -> String {
        format!("{} {COMMENT}", self.public.to_openssh())
    }

    /// The kernel argument value for `banger.key=`: standard base64 of the authorized_keys line
    /// (no newline), which the guest agent decodes into root's authorized_keys.
    pub fn kernel_arg_value(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(self.authorized_keys_line())
    }

    /// The whole kernel argument: `banger.key=<base64>`.
    pub fn kernel_arg(&self) -> String {
        format!("banger.key={}", self.kernel_arg_value())
    }

    /// Writes the `.pub` from the private key when it is missing or says something else.
    fn sync_pub(&self, pub_path: &Path) -> Result<()> {
        let want = format!("{}\n", self.authorized_keys_line());
        if files::read_regular(pub_path)?.as_deref() != Some(want.as_bytes()) {
            files::replace_atomic(pub_path, want.as_bytes(), 0o644, files::Durability::Synced)?;
        }
        Ok(())
    }
}

/// A fresh ed25519 key as OpenSSH private-key text, and its public half.
fn generate() -> Result<(String, PublicKey)> {
    let rng = ring::rand::SystemRandom::new();
    let mut seed = [0u8; 32];
    let mut check = [0u8; 4];
    rng.fill(&mut seed)
        .and_then(|()| rng.fill(&mut check))
        .map_err(|_| Error::new("generating banger's SSH key", "no randomness available"))?;
    let pair = ring::signature::Ed25519KeyPair::from_seed_unchecked(&seed)
        .map_err(|e| Error::new("generating banger's SSH key", e))?;
    let public: [u8; 32] = pair
        .public_key()
        .as_ref()
        .try_into()
        .map_err(|_| Error::new("generating banger's SSH key", "unexpected public key size"))?;
    let public = PublicKey::from_bytes(public);
    Ok((
        encode_private(&seed, &public, u32::from_ne_bytes(check), COMMENT),
        public,
    ))
}

/// OpenSSH's unencrypted private-key container for one ed25519 key (PROTOCOL.key in OpenSSH).
fn encode_private(seed: &[u8; 32], public: &PublicKey, check: u32, comment: &str) -> String {
    let mut private = Vec::new();
    private.extend_from_slice(&check.to_be_bytes());
    private.extend_from_slice(&check.to_be_bytes());
    put_string(&mut private, ED25519.as_bytes());
    put_string(&mut private, public.as_bytes());
    let mut secret = Vec::with_capacity(64);
    secret.extend_from_slice(seed);
    secret.extend_from_slice(public.as_bytes());
    put_string(&mut private, &secret);
    put_string(&mut private, comment.as_bytes());
    // Pad to the "none" cipher's block size of 8 with 1, 2, 3, …
    let mut pad = 1u8;
    while private.len() % 8 != 0 {
        private.push(pad);
        pad += 1;
    }
    let mut out = MAGIC.to_vec();
    put_string(&mut out, b"none");
    put_string(&mut out, b"none");
    put_string(&mut out, b"");
    out.extend_from_slice(&1u32.to_be_bytes());
    put_string(&mut out, &public.blob());
    put_string(&mut out, &private);
    let b64 = base64::engine::general_purpose::STANDARD.encode(out);
    let mut text = format!("{BEGIN}\n");
    for chunk in b64.as_bytes().chunks(70) {
        text.push_str(&String::from_utf8_lossy(chunk));
        text.push('\n');
    }
    text.push_str(END);
    text.push('\n');
    text
}

/// Parses an unencrypted OpenSSH ed25519 private key and checks its halves belong together;
/// returns the public half.
fn parse_private(text: &str) -> Result<PublicKey, String> {
    let body = text
        .trim()
        .strip_prefix(BEGIN)
        .and_then(|s| s.strip_suffix(END))
        .ok_or("not an OpenSSH private key (no BEGIN/END OPENSSH PRIVATE KEY lines)")?;
    let b64: String = body.split_ascii_whitespace().collect();
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|e| format!("its body is not base64: {e}"))?;
    let rest = raw
        .strip_prefix(MAGIC)
        .ok_or("not an openssh-key-v1 container")?;
    let mut r = Reader(rest);
    let cipher = r.string()?;
    let kdf = r.string()?;
    let _kdf_options = r.string()?;
    if cipher != b"none" || kdf != b"none" {
        return Err("it is encrypted with a passphrase; banger's key never is".into());
    }
    if r.u32()? != 1 {
        return Err("it holds more than one key".into());
    }
    let public = PublicKey::from_blob(r.string()?)?;
    let mut p = Reader(r.string()?);
    if p.u32()? != p.u32()? {
        return Err("its check integers differ (corrupt)".into());
    }
    if p.string()? != ED25519.as_bytes() {
        return Err("it is not an ed25519 key".into());
    }
    if p.string()? != public.as_bytes() {
        return Err("its private section names another public key".into());
    }
    let secret = p.string()?;
    if secret.len() != 64 || &secret[32..] != public.as_bytes() {
        return Err("its secret key is malformed".into());
    }
    ring::signature::Ed25519KeyPair::from_seed_and_public_key(&secret[..32], public.as_bytes())
        .map_err(|_| "its secret and public halves do not belong together")?;
    Ok(public)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::system::testutil::TempDir;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    fn layout() -> (TempDir, Layout) {
        let t = TempDir::new();
        let l = Layout::under(t.path());
        (t, l)
    }

    #[test]
    fn first_use_makes_an_owner_only_key_then_reuses_it() {
        let (_t, l) = layout();
        let k = OwnerKey::ensure(&l).unwrap();
        assert_eq!(k.path, l.ssh_key());
        assert_eq!(fs::metadata(l.ssh_dir()).unwrap().mode() & 0o777, 0o700);
        assert_eq!(fs::metadata(l.ssh_key()).unwrap().mode() & 0o777, 0o600);
        let text = fs::read_to_string(l.ssh_key()).unwrap();
        assert!(text.starts_with(BEGIN) && text.ends_with(&format!("{END}\n")));
        assert!(text.lines().all(|l| l.len() <= 70));
        assert_eq!(
            fs::read_to_string(l.ssh_key_pub()).unwrap(),
            format!("{} banger\n", k.public.to_openssh())
        );
        // Second use: same key, file untouched.
        let before = fs::metadata(l.ssh_key()).unwrap().ino();
        assert_eq!(OwnerKey::ensure(&l).unwrap(), k);
        assert_eq!(fs::metadata(l.ssh_key()).unwrap().ino(), before);
        assert_eq!(OwnerKey::load(&l).unwrap(), k);
    }

    #[test]
    fn concurrent_first_use_makes_one_key() {
        let (_t, l) = layout();
        let keys: Vec<OwnerKey> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..8)
                .map(|_| s.spawn(|| OwnerKey::ensure(&l).unwrap()))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(keys.iter().all(|k| k == &keys[0]), "{keys:?}");
        // Exactly the key, its .pub: no temp files left.
        let mut names: Vec<String> = fs::read_dir(l.ssh_dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["id_ed25519", "id_ed25519.pub"]);
    }

    #[test]
    fn stale_pub_is_rewritten_from_the_private_key() {
        let (_t, l) = layout();
        let k = OwnerKey::ensure(&l).unwrap();
        fs::write(l.ssh_key_pub(), "ssh-ed25519 something else\n").unwrap();
        OwnerKey::ensure(&l).unwrap();
        assert_eq!(
            fs::read_to_string(l.ssh_key_pub()).unwrap(),
            format!("{}\n", k.authorized_keys_line())
        );
    }

    #[test]
    fn refusals_change_nothing() {
        let (_t, l) = layout();
        OwnerKey::ensure(&l).unwrap();
        let good = fs::read(l.ssh_key()).unwrap();
        // Readable by others: refused, file left as is.
        fs::set_permissions(l.ssh_key(), fs::Permissions::from_mode(0o644)).unwrap();
        let e = OwnerKey::ensure(&l).unwrap_err().to_string();
        assert!(e.contains("0644") && e.contains("chmod 600"), "{e}");
        assert_eq!(fs::read(l.ssh_key()).unwrap(), good);
        // Corrupt: refused with a hint, never silently replaced.
        fs::write(l.ssh_key(), "garbage").unwrap();
        fs::set_permissions(l.ssh_key(), fs::Permissions::from_mode(0o600)).unwrap();
        let e = OwnerKey::ensure(&l).unwrap_err().to_string();
        assert!(e.contains("not an OpenSSH private key"), "{e}");
        assert_eq!(fs::read(l.ssh_key()).unwrap(), b"garbage");
        // A symlink in place of the key: refused.
        fs::remove_file(l.ssh_key()).unwrap();
        std::os::unix::fs::symlink("/etc/hostname", l.ssh_key()).unwrap();
        let e = OwnerKey::ensure(&l).unwrap_err().to_string();
        assert!(e.contains("symlink"), "{e}");
        // Missing: load says who makes it.
        fs::remove_file(l.ssh_key()).unwrap();
        let e = OwnerKey::load(&l).unwrap_err().to_string();
        assert!(e.contains("does not exist yet"), "{e}");
    }

    #[test]
    fn private_parser_table() {
        let (text, public) = generate().unwrap();
        assert_eq!(parse_private(&text).unwrap(), public);
        let (other, _) = generate().unwrap();
        let body = |t: &str| -> Vec<u8> {
            let b: String = t.lines().filter(|l| !l.starts_with("-----")).collect();
            base64::engine::general_purpose::STANDARD.decode(b).unwrap()
        };
        let wrap = |raw: &[u8]| {
            format!(
                "{BEGIN}\n{}\n{END}\n",
                base64::engine::general_purpose::STANDARD.encode(raw)
            )
        };
        let raw = body(&text);
        // Flip a byte in the secret seed: halves no longer match.
        let mut bad_seed = raw.clone();
        let idx = raw.len() - 8 - 64; // inside the private section, before comment+padding
        bad_seed[idx] ^= 1;
        // Swap the public blob for another key's.
        let mut swapped = raw.clone();
        let other_raw = body(&other);
        swapped[..MAGIC.len() + 4 + 4 + 4 + 4 + 4 + 51]
            .copy_from_slice(&other_raw[..MAGIC.len() + 4 + 4 + 4 + 4 + 4 + 51]);
        let mut encrypted = raw.clone();
        encrypted[MAGIC.len() + 4..MAGIC.len() + 8].copy_from_slice(b"aes!");
        let cases: Vec<(String, &str)> = vec![
            ("".into(), "no BEGIN/END"),
            (format!("{BEGIN}\n!!!\n{END}\n"), "not base64"),
            (wrap(b"openssh-key-v0\0"), "not an openssh-key-v1"),
            (wrap(&raw[..40]), "truncated"),
            (wrap(&bad_seed), "do not belong together"),
            (wrap(&swapped), "another public key"),
            (wrap(&encrypted), "encrypted"),
        ];
        for (t, want) in cases {
            let e = parse_private(&t).unwrap_err();
            assert!(e.contains(want), "want {want:?}, got {e:?}");
        }
    }

    #[test]
    fn kernel_arg_decodes_to_the_authorized_keys_line() {
        let (_t, l) = layout();
        let k = OwnerKey::ensure(&l).unwrap();
        let arg = k.kernel_arg();
        let v = arg.strip_prefix("banger.key=").unwrap();
        let line = base64::engine::general_purpose::STANDARD.decode(v).unwrap();
        assert_eq!(String::from_utf8(line).unwrap(), k.authorized_keys_line());
        assert_eq!(
            PublicKey::parse(&k.authorized_keys_line()).unwrap(),
            k.public
        );
    }

    #[test]
    fn openssh_reads_the_key() {
        let Some(keygen) = ["/usr/bin/ssh-keygen", "/bin/ssh-keygen"]
            .iter()
            .find(|p| Path::new(p).exists())
        else {
            eprintln!("SKIP: openssh_reads_the_key: ssh-keygen is not installed (apt-get install openssh-client)");
            return;
        };
        let (_t, l) = layout();
        let k = OwnerKey::ensure(&l).unwrap();
        let out = std::process::Command::new(keygen)
            .arg("-y")
            .arg("-f")
            .arg(&k.path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let derived = String::from_utf8(out.stdout).unwrap();
        assert_eq!(PublicKey::parse(&derived).unwrap(), k.public);
        // And the fingerprint ssh-keygen prints is ours.
        let out = std::process::Command::new(keygen)
            .arg("-l")
            .arg("-f")
            .arg(l.ssh_key_pub())
            .output()
            .unwrap();
        let listing = String::from_utf8(out.stdout).unwrap();
        assert!(listing.contains(&k.public.fingerprint()), "{listing}");
    }
}
