//! Release signature verification: a base64 ASN.1 DER ECDSA P-256 / SHA-256 signature over the
//! exact bytes of `SHA256SUMS` (the `cosign sign-blob` format, and what `openssl dgst -sha256 -sign`
//! makes), checked with ring against trusted public keys.
//!
//! Trusted keys are embedded at compile time, with room for two (current and next) so the signing
//! key can rotate without a flag day: release N+1 ships signed by the current key while embedding
//! the next one. Tests and the smoke suite pass a key file instead (hidden `--pubkey-file`).
//! While the embedded key is the PLACEHOLDER, every update is refused: this module must never
//! fall back to "unverified".

use std::path::{Path, PathBuf};

use base64::Engine;
use ring::signature::{UnparsedPublicKey, ECDSA_P256_SHA256_ASN1};

use crate::error::{Context, Error, Result};

/// Marker that starts a placeholder key constant.
pub const PLACEHOLDER_MARKER: &str = "PLACEHOLDER";

/// The current release signing key (SubjectPublicKeyInfo PEM).
///
/// PLACEHOLDER: replace with the output of `packaging/release.sh --key KEY.pem --print-pubkey`.
pub const EMBEDDED_KEY_CURRENT: &str =
    "PLACEHOLDER: no release signing key has been embedded in this build";

/// The next release signing key during a rotation, or empty.
pub const EMBEDDED_KEY_NEXT: &str = "";

/// Largest signature file accepted, in bytes (the download cap is the same).
pub const SIGNATURE_MAX: usize = super::download::SIGNATURE_MAX as usize;

/// The fixed DER prefix of a P-256 SubjectPublicKeyInfo: SEQUENCE { SEQUENCE { OID ecPublicKey,
/// OID prime256v1 }, BIT STRING (66 bytes, 0 unused bits) }, followed by the 65-byte point.
const SPKI_P256_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];
const POINT_LEN: usize = 65;

/// A trusted ECDSA P-256 public key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    label: String,
    point: [u8; POINT_LEN],
}

impl PublicKey {
    /// Where this key came from ("embedded current key", a file path, …).
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The key from one DER SubjectPublicKeyInfo.
    pub fn from_spki_der(label: &str, der: &[u8]) -> Result<PublicKey> {
        let bad = |why: &str| {
            Error::new(format!("reading public key {label}"), why).hint(
                "release keys are ECDSA P-256 public keys in PEM (`openssl pkey -in KEY -pubout`)",
            )
        };
        if der.len() != SPKI_P256_PREFIX.len() + POINT_LEN
            || der[..SPKI_P256_PREFIX.len()] != SPKI_P256_PREFIX
        {
            return Err(bad("not an ECDSA P-256 SubjectPublicKeyInfo"));
        }
        let mut point = [0u8; POINT_LEN];
        point.copy_from_slice(&der[SPKI_P256_PREFIX.len()..]);
        if point[0] != 0x04 {
            return Err(bad("not an uncompressed P-256 point"));
        }
        Ok(PublicKey {
            label: label.to_string(),
            point,
        })
    }

    /// Every `PUBLIC KEY` block in a PEM text (at least one).
    pub fn from_pem(label: &str, pem: &str) -> Result<Vec<PublicKey>> {
        const BEGIN: &str = "-----BEGIN PUBLIC KEY-----";
        const END: &str = "-----END PUBLIC KEY-----";
        let what = || format!("reading public key {label}");
        let mut keys = Vec::new();
        let mut rest = pem;
        while let Some(start) = rest.find(BEGIN) {
            let body_start = start + BEGIN.len();
            let end = rest[body_start..]
                .find(END)
                .ok_or_else(|| Error::new(what(), "PEM block has no END line"))?;
            let body: String = rest[body_start..body_start + end]
                .chars()
                .filter(|c| !c.is_whitespace())
                .collect();
            let der = base64::engine::general_purpose::STANDARD
                .decode(body.as_bytes())
                .map_err(|e| Error::new(what(), format!("PEM body is not base64 ({e})")))?;
            keys.push(PublicKey::from_spki_der(label, &der)?);
            rest = &rest[body_start + end + END.len()..];
        }
        if keys.is_empty() {
            let e = Error::new(what(), "no `BEGIN PUBLIC KEY` block found");
            return Err(if pem.contains("PRIVATE KEY") {
                e.hint(
                    "that is a private key; give its public half: openssl pkey -in KEY.pem -pubout",
                )
            } else {
                e.hint("expected an ECDSA P-256 public key in PEM form")
            });
        }
        Ok(keys)
    }

    /// All public keys in a PEM file, which must pass [`read_key_file`]'s trust checks.
    pub fn from_file(path: &Path) -> Result<Vec<PublicKey>> {
        let text = read_key_file(path)?;
        PublicKey::from_pem(&path.display().to_string(), &text)
    }

    /// The SubjectPublicKeyInfo DER of this key (what `openssl pkey -pubin -outform DER` prints).
    pub fn spki_der(&self) -> Vec<u8> {
        let mut der = SPKI_P256_PREFIX.to_vec();
        der.extend_from_slice(&self.point);
        der
    }

    /// The key as a SubjectPublicKeyInfo PEM block (64-column base64, what `openssl pkey -pubout`
    /// writes).
    pub fn pem(&self) -> String {
        let b64 = base64::engine::general_purpose::STANDARD.encode(self.spki_der());
        let mut out = String::from("-----BEGIN PUBLIC KEY-----\n");
        for line in b64.as_bytes().chunks(64) {
            out.push_str(&String::from_utf8_lossy(line));
            out.push('\n');
        }
        out.push_str("-----END PUBLIC KEY-----\n");
        out
    }

    /// `SHA256:<hex>` of the key's DER SubjectPublicKeyInfo: the same as
    /// `openssl pkey -pubin -in KEY.pem -outform DER | sha256sum`.
    pub fn fingerprint(&self) -> String {
        let d = ring::digest::digest(&ring::digest::SHA256, &self.spki_der());
        format!("SHA256:{}", hex::encode(d.as_ref()))
    }
}

/// Largest key file read, in bytes (two PEM keys are well under 1 KiB).
const KEY_FILE_MAX: u64 = 64 << 10;

/// Reads a `--pubkey-file`, refusing (and saying why) unless it is a regular file owned by root
/// (or by the user running banger, when that is not root) that neither group nor others may write:
/// a key file anyone else can change would let them choose which releases root installs. Opened
/// `O_NOFOLLOW|O_NONBLOCK` (a planted link or FIFO is refused, never followed or waited on) and
/// checked with `fstat` on the opened file, so the checks and the read see the same file.
pub fn read_key_file(path: &Path) -> Result<String> {
    read_key_file_as(path, rustix::process::geteuid().as_raw())
}

fn read_key_file_as(path: &Path, euid: u32) -> Result<String> {
    use rustix::fs::{FileType, Mode, OFlags, CWD};
    use std::io::Read;
    let what = || format!("trusting the --pubkey-file {}", path.display());
    let hint = "use a key file owned by root with mode 0644 or tighter, e.g. sudo install -o root -m 0644 KEY.pub.pem /etc/banger/";
    let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC;
    let fd = rustix::fs::openat(CWD, path, flags, Mode::empty()).map_err(|e| {
        let why = if e == rustix::io::Errno::LOOP {
            "it is a symlink (name the key file itself)".to_string()
        } else {
            e.to_string()
        };
        Error::new(what(), why).hint(hint)
    })?;
    let st = rustix::fs::fstat(&fd).ctx(what)?;
    let kind = FileType::from_raw_mode(st.st_mode);
    if kind != FileType::RegularFile {
        return Err(
            Error::new(what(), format!("it is not a regular file (a {kind:?})")).hint(hint),
        );
    }
    if st.st_uid != 0 && st.st_uid != euid {
        return Err(Error::new(
            what(),
            format!(
                "it is owned by uid {}, not by root{}",
                st.st_uid,
                if euid == 0 {
                    String::new()
                } else {
                    format!(" or uid {euid}")
                }
            ),
        )
        .hint(hint));
    }
    let mode = st.st_mode & 0o7777;
    if mode & 0o022 != 0 {
        return Err(Error::new(
            what(),
            format!(
                "its mode {mode:04o} lets {} write it",
                match mode & 0o022 {
                    0o020 => "its group",
                    0o002 => "everyone",
                    _ => "its group and everyone",
                }
            ),
        )
        .hint(hint));
    }
    let mut text = String::new();
    std::fs::File::from(fd)
        .take(KEY_FILE_MAX)
        .read_to_string(&mut text)
        .ctx(|| format!("reading public key file {}", path.display()))?;
    Ok(text)
}

/// Which keys to trust.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// The keys compiled into this binary.
    Embedded,
    /// A PEM file (hidden `--pubkey-file`, tests and smoke suite).
    File(PathBuf),
}

/// Loads the keys `source` names.
pub fn trusted_keys(source: &KeySource) -> Result<Vec<PublicKey>> {
    match source {
        KeySource::Embedded => keys_from_consts(&[
            ("embedded current key", EMBEDDED_KEY_CURRENT),
            ("embedded next key", EMBEDDED_KEY_NEXT),
        ]),
        KeySource::File(p) => PublicKey::from_file(p),
    }
}

/// Header line of [`release_keys_report`].
pub const RELEASE_KEYS_HEADER: &str = "banger release keys:";

/// What the hidden `banger --release-keys` prints: `banger release keys: N`, then the N keys this
/// build trusts as PEM (a PLACEHOLDER build trusts none: N is 0). `packaging/release.sh` compares
/// it with the keys embedded in `packaging/install.sh` and refuses to publish when they differ.
pub fn release_keys_report() -> Result<String> {
    report_from_consts(&[
        ("embedded current key", EMBEDDED_KEY_CURRENT),
        ("embedded next key", EMBEDDED_KEY_NEXT),
    ])
}

fn report_from_consts(consts: &[(&str, &str)]) -> Result<String> {
    match keys_from_consts(consts) {
        Ok(keys) => {
            let mut out = format!("{RELEASE_KEYS_HEADER} {}\n", keys.len());
            for k in &keys {
                out.push_str(&k.pem());
            }
            Ok(out)
        }
        Err(_)
            if consts
                .iter()
                .any(|(_, pem)| pem.trim_start().starts_with(PLACEHOLDER_MARKER)) =>
        {
            Ok(format!(
                "{RELEASE_KEYS_HEADER} 0 (this build has a PLACEHOLDER key and verifies no release)\n"
            ))
        }
        Err(e) => Err(e),
    }
}

/// The embedded key constants to keys; a placeholder refuses everything.
fn keys_from_consts(consts: &[(&str, &str)]) -> Result<Vec<PublicKey>> {
    let mut keys = Vec::new();
    for (label, pem) in consts {
        if pem.trim().is_empty() {
            continue;
        }
        if pem.trim_start().starts_with(PLACEHOLDER_MARKER) {
            return Err(Error::new(
                "verifying the release signature",
                format!("this build of banger has a PLACEHOLDER {label}, so it cannot verify any release and refuses to update"),
            )
            .hint("maintainer: embed the real public key in src/update/signature.rs (packaging/release.sh --key KEY.pem --print-pubkey prints it); operator: install a released build of banger"));
        }
        keys.extend(PublicKey::from_pem(label, pem)?);
    }
    if keys.is_empty() {
        return Err(Error::new(
            "verifying the release signature",
            "no release signing key is embedded in this build",
        )
        .hint("maintainer: embed the public key in src/update/signature.rs"));
    }
    Ok(keys)
}

/// Verifies `sig_b64` (base64 of a DER ECDSA P-256 signature; surrounding whitespace allowed) over
/// `data` against `keys`. Returns the key that verified.
pub fn verify<'k>(keys: &'k [PublicKey], data: &[u8], sig_b64: &[u8]) -> Result<&'k PublicKey> {
    let what = "verifying the SHA256SUMS signature";
    let hint = "the release is corrupted or not signed by a trusted key; do not install it";
    if sig_b64.len() > SIGNATURE_MAX {
        return Err(Error::new(
            what,
            format!("the signature is larger than {SIGNATURE_MAX} bytes"),
        )
        .hint(hint));
    }
    let text = std::str::from_utf8(sig_b64)
        .map_err(|_| Error::new(what, "the signature file is not base64 text").hint(hint))?
        .trim();
    if text.is_empty() {
        return Err(Error::new(what, "the signature file is empty").hint(hint));
    }
    let der = base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|e| {
            Error::new(what, format!("the signature is not valid base64 ({e})")).hint(hint)
        })?;
    // A DER ECDSA P-256 signature is 8..=72 bytes; ring re-checks the encoding strictly.
    if !(8..=72).contains(&der.len()) {
        return Err(Error::new(
            what,
            format!(
                "the signature is {} bytes, not a DER ECDSA P-256 signature",
                der.len()
            ),
        )
        .hint(hint));
    }
    der_shape(&der).map_err(|why| Error::new(what, why).hint(hint))?;
    for key in keys {
        if UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, &key.point[..])
            .verify(data, &der)
            .is_ok()
        {
            return Ok(key);
        }
    }
    let labels: Vec<&str> = keys.iter().map(|k| k.label.as_str()).collect();
    Err(Error::new(
        what,
        format!(
            "it does not verify against any trusted key ({})",
            labels.join(", ")
        ),
    )
    .hint(hint))
}

/// Why `der` is not shaped like a DER ECDSA signature, `SEQUENCE { INTEGER r, INTEGER s }`, so a
/// truncated or garbled signature is reported as such rather than as "does not verify". ring
/// re-checks the encoding strictly; this only names the reason.
pub fn der_shape(der: &[u8]) -> Result<(), String> {
    /// One DER header at `at`: (tag, content start, content length).
    fn header(der: &[u8], at: usize) -> Option<(u8, usize, usize)> {
        let tag = *der.get(at)?;
        let first = *der.get(at + 1)? as usize;
        match first {
            0..=0x7f => Some((tag, at + 2, first)),
            0x81 => Some((tag, at + 3, *der.get(at + 2)? as usize)),
            _ => None,
        }
    }
    let Some((tag, start, len)) = header(der, 0) else {
        return Err(format!(
            "the signature is {} bytes of which none form a DER header",
            der.len()
        ));
    };
    if tag != 0x30 {
        return Err(format!(
            "the signature is not a DER SEQUENCE (it starts with byte {tag:#04x})"
        ));
    }
    let total = start + len;
    if total > der.len() {
        return Err(format!(
            "the signature is truncated: its DER header says {total} bytes, it has {}",
            der.len()
        ));
    }
    if total < der.len() {
        return Err(format!(
            "the signature has {} bytes after its DER SEQUENCE",
            der.len() - total
        ));
    }
    let mut at = start;
    for part in ["r", "s"] {
        match header(der, at) {
            Some((0x02, s, l)) if l > 0 && s + l <= total => at = s + l,
            _ => {
                return Err(format!(
                    "the signature's DER SEQUENCE does not hold the INTEGER {part}"
                ))
            }
        }
    }
    if at != total {
        return Err("the signature's DER SEQUENCE has more than two INTEGERs".to_string());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const K1: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEJ3her3wCpzUIXdtg++xDg6NM6/cE
e+suE9oolR+kvZCmBDJ6zFTeQQqhdqqVLEuA3oEf8iJwfE5oZUliYMfAmA==
-----END PUBLIC KEY-----
";
    const K2: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEJKUwlwbCahLeTxKCA4Ua4OpwpbVz
wPOESZlRnoRj7kKgunkYMQ0mq6ycIvPPacK1+NknaTAwNcCoVXRCBRhvow==
-----END PUBLIC KEY-----
";
    const P384: &str = "-----BEGIN PUBLIC KEY-----
MHYwEAYHKoZIzj0CAQYFK4EEACIDYgAEHSyew1tWEP8Gvzh53WRQ2Bi4NNZzEx0R
WbRw/CnKLRN4z9OeZNxYv1Ub8RJZxNI9hGvwdCYtmjQSuPlkddJ1KNP9nKte7oXb
5dzL6i6VdO9rktt2d0SGc+ldgTJwWSnZ
-----END PUBLIC KEY-----
";
    /// `printf 'hello SHA256SUMS\n' | openssl dgst -sha256 -sign k1.pem | base64 -w0`
    const MSG: &[u8] = b"hello SHA256SUMS\n";
    const SIG: &str = "MEQCICbVxTcozCk4PKypsfxIgVgw3WZ3L/VLxcqoF/RO8bMPAiAD071vFRN4H0mucD7GUgOaOvEKRAI6h3AulW2mdlpuHg==";

    fn keys(pems: &[&str]) -> Vec<PublicKey> {
        pems.iter()
            .flat_map(|p| PublicKey::from_pem("test", p).unwrap())
            .collect()
    }

    #[test]
    fn accepts_real_openssl_signature() {
        let k = keys(&[K1]);
        assert!(verify(&k, MSG, SIG.as_bytes()).is_ok());
        // Trailing newline as `base64` without -w0 leaves it.
        assert!(verify(&k, MSG, format!("{SIG}\n").as_bytes()).is_ok());
        // Either of two keys (rotation).
        let both = keys(&[K2, K1]);
        assert!(verify(&both, MSG, SIG.as_bytes()).is_ok());
        // Two blocks in one PEM text.
        assert_eq!(
            PublicKey::from_pem("x", &format!("{K1}{K2}"))
                .unwrap()
                .len(),
            2
        );
    }

    /// `--release-keys` prints the keys as openssl writes them (so the release builder can compare
    /// fingerprints), the count first; a placeholder build reports none; a broken key is an error.
    #[test]
    fn release_keys_report_lists_pems() {
        assert_eq!(PublicKey::from_pem("k", K1).unwrap()[0].pem(), K1);
        assert_eq!(
            report_from_consts(&[("c", K1), ("n", K2)]).unwrap(),
            format!("banger release keys: 2\n{K1}{K2}")
        );
        assert_eq!(
            report_from_consts(&[("c", K1), ("n", "")]).unwrap(),
            format!("banger release keys: 1\n{K1}")
        );
        assert_eq!(
            report_from_consts(&[("c", "PLACEHOLDER: none"), ("n", "")]).unwrap(),
            "banger release keys: 0 (this build has a PLACEHOLDER key and verifies no release)\n"
        );
        assert!(report_from_consts(&[("c", P384), ("n", "")]).is_err());
        // This build's own answer is one of those shapes.
        let own = release_keys_report().unwrap();
        assert!(own.starts_with("banger release keys: "), "{own}");
    }

    fn b64(bytes: &[u8]) -> Vec<u8> {
        base64::engine::general_purpose::STANDARD
            .encode(bytes)
            .into_bytes()
    }

    /// Each way a signature can be bad fails for its own stated reason (the exact `why`), not
    /// just with the word "signature" that every one of these errors carries in its `what`.
    #[test]
    fn rejections() {
        let k = PublicKey::from_pem("K1", K1).unwrap();
        let k2 = PublicKey::from_pem("K2", K2).unwrap();
        let both: Vec<PublicKey> = k2.iter().chain(k.iter()).cloned().collect();
        let sig_der = base64::engine::general_purpose::STANDARD
            .decode(SIG)
            .unwrap();
        let mut truncated = SIG.to_string();
        truncated.truncate(40);
        let mut flipped = SIG.as_bytes().to_vec();
        flipped[20] = if flipped[20] == b'A' { b'B' } else { b'A' };
        let mut trailing = sig_der.clone();
        trailing.extend_from_slice(&[0, 0]);
        // SEQUENCE holding only r (s cut off, lengths made consistent).
        let r_len = sig_der[3] as usize;
        let mut only_r = vec![0x30, (2 + r_len) as u8];
        only_r.extend_from_slice(&sig_der[2..4 + r_len]);
        let not_seq: Vec<u8> = std::iter::once(0x31)
            .chain(sig_der[1..].iter().copied())
            .collect();
        let no_key = "it does not verify against any trusted key";
        type Case<'a> = (&'a str, &'a [PublicKey], Vec<u8>, Vec<u8>, String);
        let cases: Vec<Case> = vec![
            (
                "tampered SHA256SUMS",
                &k,
                b"hello SHA256SUMS\r\n".to_vec(),
                SIG.into(),
                format!("{no_key} (K1)"),
            ),
            (
                "empty SHA256SUMS",
                &k,
                b"".to_vec(),
                SIG.into(),
                format!("{no_key} (K1)"),
            ),
            (
                "wrong key",
                &k2,
                MSG.to_vec(),
                SIG.into(),
                format!("{no_key} (K2)"),
            ),
            (
                "no keys",
                &[],
                MSG.to_vec(),
                SIG.into(),
                format!("{no_key} ()"),
            ),
            (
                "truncated signature",
                &both,
                MSG.to_vec(),
                truncated.into_bytes(),
                "the signature is truncated: its DER header says 70 bytes, it has 30".into(),
            ),
            (
                "flipped bit in r",
                &k,
                MSG.to_vec(),
                flipped,
                format!("{no_key} (K1)"),
            ),
            (
                "trailing bytes",
                &k,
                MSG.to_vec(),
                b64(&trailing),
                "the signature has 2 bytes after its DER SEQUENCE".into(),
            ),
            (
                "s missing",
                &k,
                MSG.to_vec(),
                b64(&only_r),
                "the signature's DER SEQUENCE does not hold the INTEGER s".into(),
            ),
            (
                "not a SEQUENCE",
                &k,
                MSG.to_vec(),
                b64(&not_seq),
                "the signature is not a DER SEQUENCE (it starts with byte 0x31)".into(),
            ),
            (
                "garbage text",
                &k,
                MSG.to_vec(),
                b"!!!not base64!!!".to_vec(),
                "the signature is not valid base64 (Invalid symbol 33, offset 0.)".into(),
            ),
            (
                "binary garbage",
                &k,
                MSG.to_vec(),
                b"\xff\xfe".to_vec(),
                "the signature file is not base64 text".into(),
            ),
            (
                "blank",
                &k,
                MSG.to_vec(),
                b"  \n".to_vec(),
                "the signature file is empty".into(),
            ),
            (
                "too short",
                &k,
                MSG.to_vec(),
                b"AAAA".to_vec(),
                "the signature is 3 bytes, not a DER ECDSA P-256 signature".into(),
            ),
            (
                "too large",
                &k,
                MSG.to_vec(),
                vec![b'A'; 2000],
                format!("the signature is larger than {SIGNATURE_MAX} bytes"),
            ),
        ];
        for (case, keys, data, sig, want) in cases {
            let e = verify(keys, &data, &sig).unwrap_err();
            assert_eq!(e.why, want, "{case}");
            assert_eq!(e.what, "verifying the SHA256SUMS signature", "{case}");
            assert!(e.to_string().contains("do not install it"), "{case}: {e}");
        }
        // The good signature still passes the shape check and verifies.
        assert_eq!(der_shape(&sig_der), Ok(()));
        assert!(verify(&both, MSG, SIG.as_bytes()).is_ok());
    }

    #[test]
    fn key_parsing_rejections() {
        let cases = [
            (P384, "not an ECDSA P-256"),
            ("", "no `BEGIN PUBLIC KEY` block"),
            (
                "-----BEGIN EC PRIVATE KEY-----\nAAAA\n-----END EC PRIVATE KEY-----\n",
                "private key",
            ),
            ("-----BEGIN PUBLIC KEY-----\nAAAA\n", "no END line"),
            (
                "-----BEGIN PUBLIC KEY-----\n!!!!\n-----END PUBLIC KEY-----\n",
                "not base64",
            ),
        ];
        for (pem, want) in cases {
            let e = PublicKey::from_pem("k", pem).unwrap_err().to_string();
            assert!(e.contains(want), "want {want:?} in {e}");
        }
    }

    #[test]
    fn placeholder_refuses_every_update() {
        if EMBEDDED_KEY_CURRENT.starts_with(PLACEHOLDER_MARKER) {
            let e = trusted_keys(&KeySource::Embedded).unwrap_err().to_string();
            assert!(e.contains("PLACEHOLDER"), "{e}");
            assert!(e.contains("--print-pubkey"), "{e}");
        }
        let e = keys_from_consts(&[("current", "PLACEHOLDER x"), ("next", K1)])
            .unwrap_err()
            .to_string();
        assert!(e.contains("PLACEHOLDER"), "{e}");
        assert!(keys_from_consts(&[("current", ""), ("next", "")]).is_err());
        assert_eq!(
            keys_from_consts(&[("current", K1), ("next", K2)])
                .unwrap()
                .len(),
            2
        );
        assert_eq!(
            keys_from_consts(&[("current", K1), ("next", "")])
                .unwrap()
                .len(),
            1
        );
    }

    #[test]
    fn key_file_trust_checks() {
        use std::os::unix::fs::PermissionsExt;
        let dir = crate::update::testutil::TempDir::new("sigtrust");
        let p = dir.path().join("k.pub");
        std::fs::write(&p, K1).unwrap();
        let mode =
            |m: u32| std::fs::set_permissions(&p, std::fs::Permissions::from_mode(m)).unwrap();
        let me = rustix::process::geteuid().as_raw();
        let why = |path: &Path, euid: u32| read_key_file_as(path, euid).unwrap_err().why;
        mode(0o644);
        assert_eq!(read_key_file_as(&p, me).unwrap(), K1);
        mode(0o600);
        assert_eq!(read_key_file_as(&p, me).unwrap(), K1);
        mode(0o664);
        assert_eq!(why(&p, me), "its mode 0664 lets its group write it");
        mode(0o646);
        assert_eq!(why(&p, me), "its mode 0646 lets everyone write it");
        mode(0o666);
        assert_eq!(
            why(&p, me),
            "its mode 0666 lets its group and everyone write it"
        );
        mode(0o644);
        // Owned by someone else: refused when root runs the update, and for any other user.
        let other = dir.path().join("other.pub");
        std::fs::write(&other, K1).unwrap();
        if me == 0 {
            std::os::unix::fs::chown(&other, Some(4242), None).unwrap();
            assert_eq!(why(&other, 0), "it is owned by uid 4242, not by root");
            assert_eq!(
                why(&other, 1000),
                "it is owned by uid 4242, not by root or uid 1000"
            );
            assert_eq!(read_key_file_as(&other, 4242).unwrap(), K1);
        } else {
            assert_eq!(
                why(&other, 0),
                format!("it is owned by uid {me}, not by root")
            );
        }
        let link = dir.path().join("link.pub");
        std::os::unix::fs::symlink(&p, &link).unwrap();
        assert_eq!(why(&link, me), "it is a symlink (name the key file itself)");
        let fifo = dir.path().join("fifo.pub");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        assert_eq!(why(&fifo, me), "it is not a regular file (a Fifo)");
        assert_eq!(
            why(dir.path(), me),
            "it is not a regular file (a Directory)"
        );
        // The whole refusal reads `trusting the --pubkey-file <path>: <why> (<what to do>)`.
        let e = read_key_file_as(&link, me).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("trusting the --pubkey-file {}", link.display())),
            "{e}"
        );
        assert!(e.contains("owned by root with mode 0644"), "{e}");
    }

    #[test]
    fn fingerprint_is_sha256_of_the_spki_der() {
        let k = &PublicKey::from_pem("K1", K1).unwrap()[0];
        let body: String = K1.lines().filter(|l| !l.starts_with("-----")).collect();
        let der = base64::engine::general_purpose::STANDARD
            .decode(body)
            .unwrap();
        assert_eq!(k.spki_der(), der);
        let fp = k.fingerprint();
        assert_eq!(
            fp,
            format!(
                "SHA256:{}",
                hex::encode(ring::digest::digest(&ring::digest::SHA256, &der))
            )
        );
        assert_ne!(fp, PublicKey::from_pem("K2", K2).unwrap()[0].fingerprint());
    }

    #[test]
    fn key_file() {
        let dir = crate::update::testutil::TempDir::new("sigkey");
        let p = dir.path().join("k.pub");
        std::fs::write(&p, K1).unwrap();
        let k = trusted_keys(&KeySource::File(p.clone())).unwrap();
        assert_eq!(k[0].label(), p.display().to_string());
        assert!(verify(&k, MSG, SIG.as_bytes()).is_ok());
        assert!(trusted_keys(&KeySource::File(dir.path().join("missing"))).is_err());
    }
}
