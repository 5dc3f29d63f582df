//! An ed25519 public key in OpenSSH's forms: the wire blob, the one-line `ssh-ed25519 AAAA…` text
//! (authorized_keys, known_hosts, `.pub`) and the `SHA256:…` fingerprint ssh prints. Only ed25519:
//! banger's key is ed25519 and the guest agent reports the guest's ed25519 host key.

use std::fmt;

use base64::Engine;

/// The OpenSSH key type name.
pub const ED25519: &str = "ssh-ed25519";

/// An ed25519 public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublicKey([u8; 32]);

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.fingerprint())
    }
}

/// Appends an SSH wire `string` (u32 big-endian length, then the bytes).
pub(crate) fn put_string(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    out.extend_from_slice(bytes);
}

/// Reads SSH wire values from a byte slice; every read is bounds-checked.
pub(crate) struct Reader<'a>(pub(crate) &'a [u8]);

impl<'a> Reader<'a> {
    pub(crate) fn u32(&mut self) -> Result<u32, String> {
        if self.0.len() < 4 {
            return Err("truncated (expected a 32-bit length)".into());
        }
        let (head, rest) = self.0.split_at(4);
        self.0 = rest;
        Ok(u32::from_be_bytes([head[0], head[1], head[2], head[3]]))
    }
    pub(crate) fn string(&mut self) -> Result<&'a [u8], String> {
        let n = self.u32()? as usize;
        if self.0.len() < n {
            return Err(format!(
                "truncated (a {n}-byte field, {} bytes left)",
                self.0.len()
            ));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
}

impl PublicKey {
    /// The key from its 32 raw bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        PublicKey(bytes)
    }

    /// The 32 raw bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The SSH wire blob: `string "ssh-ed25519"`, `string key`.
    pub fn blob(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(51);
        put_string(&mut out, ED25519.as_bytes());
        put_string(&mut out, &self.0);
        out
    }

    /// Decodes a wire blob; anything but exactly one ed25519 key is refused.
    pub fn from_blob(blob: &[u8]) -> Result<Self, String> {
        let mut r = Reader(blob);
        let ty = r.string()?;
        if ty != ED25519.as_bytes() {
            return Err(format!(
                "key type is {:?}, not {ED25519}",
                String::from_utf8_lossy(ty)
            ));
        }
        let key = r.string()?;
        let key: [u8; 32] = key
            .try_into()
            .map_err(|_| format!("an {ED25519} key is 32 bytes, this one {}", key.len()))?;
        if !r.0.is_empty() {
            return Err(format!("{} unexpected bytes after the key", r.0.len()));
        }
        Ok(PublicKey(key))
    }

    /// Parses `ssh-ed25519 <base64 blob> [comment]` (one line; surrounding whitespace ignored).
    pub fn parse(line: &str) -> Result<Self, String> {
        let line = line.trim();
        if line.contains('\n') || line.contains('\r') {
            return Err("a public key is one line".into());
        }
        let mut fields = line.split_ascii_whitespace();
        let ty = fields.next().ok_or("empty public key")?;
        if ty != ED25519 {
            return Err(format!("key type is {ty:?}, not {ED25519}"));
        }
        let b64 = fields.next().ok_or("no key after the type")?;
        let blob = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|e| format!("key is not base64: {e}"))?;
        Self::from_blob(&blob)
    }

    /// `ssh-ed25519 <base64 blob>` (no comment).
    pub fn to_openssh(&self) -> String {
        format!(
            "{ED25519} {}",
            base64::engine::general_purpose::STANDARD.encode(self.blob())
        )
    }

    /// `SHA256:<unpadded base64 of the blob's SHA-256>`, as `ssh-keygen -l` prints it.
    pub fn fingerprint(&self) -> String {
        let d = ring::digest::digest(&ring::digest::SHA256, &self.blob());
        format!(
            "SHA256:{}",
            base64::engine::general_purpose::STANDARD_NO_PAD.encode(d.as_ref())
        )
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_openssh())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A real `ssh-keygen -t ed25519` public key and the fingerprint `ssh-keygen -lf` printed for it.
    pub(crate) const SAMPLE: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAINoo0kKtbtHDIGm8c6G+sbyuo6Wv8ekueuZk2YiWhEux test@host";
    const SAMPLE_FP: &str = "SHA256:CYj1cEUqjesRQqMqtDYVIOjcm3aeSPD8T7goINRQyAs";

    #[test]
    fn parse_table() {
        let ok = [
            SAMPLE,
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAINoo0kKtbtHDIGm8c6G+sbyuo6Wv8ekueuZk2YiWhEux",
            "  ssh-ed25519\tAAAAC3NzaC1lZDI1NTE5AAAAINoo0kKtbtHDIGm8c6G+sbyuo6Wv8ekueuZk2YiWhEux  \n",
        ];
        for l in ok {
            let k = PublicKey::parse(l).unwrap_or_else(|e| panic!("{l:?}: {e}"));
            assert_eq!(
                k.to_openssh(),
                "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAINoo0kKtbtHDIGm8c6G+sbyuo6Wv8ekueuZk2YiWhEux"
            );
        }
        let bad = [
            ("", "empty"),
            ("ssh-ed25519", "no key"),
            ("ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQ", "not ssh-ed25519"),
            ("ssh-ed25519 !!!", "not base64"),
            // Blob says ssh-rsa under an ed25519 label.
            ("ssh-ed25519 AAAAB3NzaC1yc2EAAAADAQAB", "not ssh-ed25519"),
            // Truncated blob.
            ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAINoo0kKt", "truncated"),
            ("ssh-ed25519 AAAA\nssh-ed25519 AAAA", "one line"),
        ];
        for (l, want) in bad {
            let e = PublicKey::parse(l).unwrap_err();
            assert!(e.contains(want), "{l:?}: {e}");
        }
    }

    #[test]
    fn fingerprint_matches_ssh_keygen() {
        assert_eq!(PublicKey::parse(SAMPLE).unwrap().fingerprint(), SAMPLE_FP);
    }

    #[test]
    fn blob_round_trip_and_trailing_bytes_refused() {
        let k = PublicKey::from_bytes([7; 32]);
        assert_eq!(PublicKey::from_blob(&k.blob()).unwrap(), k);
        let mut long = k.blob();
        long.push(0);
        assert!(PublicKey::from_blob(&long)
            .unwrap_err()
            .contains("unexpected"));
    }
}
