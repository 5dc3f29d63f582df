//! The guest's banger configuration from the kernel command line (`/proc/cmdline`).
//!
//! Owns the tokenizer (the kernel's own rules from `lib/cmdline.c`: space-separated, double quotes
//! group spaces and are stripped around a value, parsing stops at `--`, a repeated key's last value
//! wins) and the validation of banger's two keys: `banger.name=` (the hostname) and `banger.key=`
//! (base64 of the owner's authorized_keys line). A refused value is dropped with a problem line
//! saying why; it never reaches the hostname or authorized_keys. It never touches the system.

use base64::Engine;

/// Longest `banger.name=` value accepted (one DNS label, which is also banger's VM name rule).
pub const MAX_NAME: usize = 63;

/// Longest `banger.key=` value accepted, in base64 bytes (an ed25519 line is ~140; the whole x86
/// kernel command line is 2048).
pub const MAX_KEY_B64: usize = 1024;

/// Longest command line read from the file (the kernel's own cap is far below this).
pub const MAX_CMDLINE: usize = 64 * 1024;

/// Where Linux shows the command line the kernel booted with.
pub const CMDLINE_PATH: &str = "/proc/cmdline";

/// What banger asked of this guest on its command line, validated.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuestConfig {
    /// The hostname to set (`banger.name=`), when given and valid.
    pub name: Option<String>,
    /// The authorized_keys line for root (decoded `banger.key=`, without newline), when valid.
    pub authorized_key: Option<String>,
    /// `banger.agent_tcp=PORT`: also serve the agent on TCP PORT (any address). Test-only: the
    /// stand-in's QEMU engine has no vsock device and reaches the agent through the tap instead.
    pub agent_tcp: Option<u16>,
    /// Why a given value was refused, one line each.
    pub problems: Vec<String>,
}

/// Splits a command line into `(param, value)` pairs exactly as the kernel's `next_arg` does,
/// stopping at a bare `--` (what follows belongs to init).
pub fn tokenize(cmdline: &str) -> Vec<(String, Option<String>)> {
    let b = cmdline.as_bytes();
    let mut out = Vec::new();
    let mut pos = skip_spaces(b, 0);
    while pos < b.len() {
        let mut start = pos;
        let (mut in_quote, mut quoted) = (false, false);
        if b[start] == b'"' {
            start += 1;
            in_quote = true;
            quoted = true;
        }
        let mut i = start;
        let mut equals = None;
        while i < b.len() {
            if b[i].is_ascii_whitespace() && !in_quote {
                break;
            }
            if equals.is_none() && b[i] == b'=' {
                equals = Some(i);
            }
            if b[i] == b'"' {
                in_quote = !in_quote;
            }
            i += 1;
        }
        // [start, end) is the argument; the kernel drops a closing quote in the two cases below.
        let mut end = i;
        let (param, val) = match equals {
            None => {
                if quoted && end > start && b[end - 1] == b'"' {
                    end -= 1;
                }
                (&b[start..end], None)
            }
            Some(eq) => {
                let mut vs = eq + 1;
                if vs < b.len() && b[vs] == b'"' && vs < end {
                    vs += 1;
                    if b[end - 1] == b'"' && end > vs {
                        end -= 1;
                    }
                } else if quoted && end > vs && b[end - 1] == b'"' {
                    end -= 1;
                }
                (&b[start..eq], Some(&b[vs..end.max(vs)]))
            }
        };
        let param = String::from_utf8_lossy(param).into_owned();
        if val.is_none() && param == "--" {
            break;
        }
        out.push((param, val.map(|v| String::from_utf8_lossy(v).into_owned())));
        pos = skip_spaces(b, i);
    }
    out
}

fn skip_spaces(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && b[i].is_ascii_whitespace() {
        i += 1;
    }
    i
}

/// Reads banger's keys from a command line; the last occurrence of a key wins, as in the kernel.
pub fn parse(cmdline: &str) -> GuestConfig {
    let mut name = None;
    let mut key = None;
    let mut tcp = None;
    for (param, val) in tokenize(cmdline) {
        match param.as_str() {
            "banger.name" => name = Some(val.unwrap_or_default()),
            "banger.key" => key = Some(val.unwrap_or_default()),
            "banger.agent_tcp" => tcp = Some(val.unwrap_or_default()),
            _ => {}
        }
    }
    let mut cfg = GuestConfig::default();
    if let Some(t) = tcp {
        match t.parse::<u16>() {
            Ok(p) if p > 0 => cfg.agent_tcp = Some(p),
            _ => cfg.problems.push(format!(
                "banger.agent_tcp={:?} is not a TCP port (1-65535); serving on vsock only",
                t.chars().take(16).collect::<String>()
            )),
        }
    }
    if let Some(n) = name {
        match check_name("banger.name", &n) {
            Ok(()) => cfg.name = Some(n),
            Err(e) => cfg.problems.push(e),
        }
    }
    if let Some(k) = key {
        match decode_key("banger.key", &k) {
            Ok(line) => cfg.authorized_key = Some(line),
            Err(e) => cfg.problems.push(e),
        }
    }
    cfg
}

/// Reads and parses the command line file at `path` (production: [`CMDLINE_PATH`]).
pub fn read(path: &std::path::Path) -> crate::error::Result<GuestConfig> {
    use std::io::Read;
    let what = || format!("reading the kernel command line {}", path.display());
    let f = std::fs::File::open(path).map_err(|e| crate::error::Error::new(what(), e))?;
    let mut buf = Vec::new();
    f.take(MAX_CMDLINE as u64 + 1)
        .read_to_end(&mut buf)
        .map_err(|e| crate::error::Error::new(what(), e))?;
    if buf.len() > MAX_CMDLINE {
        return Err(crate::error::Error::new(
            what(),
            format!("longer than {MAX_CMDLINE} bytes; not a kernel command line"),
        ));
    }
    Ok(parse(&String::from_utf8_lossy(&buf)))
}

/// A hostname banger will set: the VM name rule (1-63 of a-z, 0-9, '-', no leading or trailing
/// '-'), which is also a valid DNS label. `label` names the value in the error (`banger.name`).
pub(crate) fn check_name(label: &str, n: &str) -> Result<(), String> {
    if n.len() > MAX_NAME {
        return Err(format!(
            "{label} is {} bytes, over the {MAX_NAME}-byte cap of a hostname label; hostname left unchanged",
            n.len()
        ));
    }
    crate::helper::validate::vm_id(n).map(drop).map_err(|_| {
        format!(
            "{label}={n:?} is not a valid hostname (1-63 of a-z, 0-9 and '-', not starting or ending with '-'); hostname left unchanged"
        )
    })
}

/// Decodes `banger.key=`: base64 of exactly one OpenSSH public key line
/// (`<type> <base64 blob> [comment]`) whose blob names the same key type. `label` names the value
/// in the error (`banger.key`).
pub(crate) fn decode_key(label: &str, b64: &str) -> Result<String, String> {
    const NOT: &str = "root's authorized_keys left unchanged";
    if b64.len() > MAX_KEY_B64 {
        return Err(format!(
            "{label} is {} bytes, over the {MAX_KEY_B64}-byte cap; {NOT}",
            b64.len()
        ));
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .map_err(|e| format!("{label} is not base64 ({e}); {NOT}"))?;
    let text =
        String::from_utf8(raw).map_err(|_| format!("{label} does not decode to text; {NOT}"))?;
    let line = text.strip_suffix('\n').unwrap_or(&text);
    if line.contains(['\n', '\r']) {
        return Err(format!(
            "{label} decodes to more than one line; it must be one public key line; {NOT}"
        ));
    }
    if line.chars().any(|c| c.is_control() && c != '\t') {
        return Err(format!(
            "{label} decodes to binary, not an OpenSSH public key line; {NOT}"
        ));
    }
    let mut fields = line.split_ascii_whitespace();
    let ty = fields.next().unwrap_or("");
    let blob = fields.next().unwrap_or("");
    let known = ty.starts_with("ssh-") || ty.starts_with("ecdsa-sha2-") || ty.starts_with("sk-");
    if !known {
        return Err(format!(
            "{label} does not decode to an OpenSSH public key line (`ssh-ed25519 AAAA…`), it starts with {:?}; {NOT}",
            ty.chars().take(24).collect::<String>()
        ));
    }
    let blob_ok = base64::engine::general_purpose::STANDARD
        .decode(blob)
        .ok()
        .and_then(|b| {
            let len = u32::from_be_bytes(b.get(..4)?.try_into().ok()?) as usize;
            Some(b.get(4..4 + len)? == ty.as_bytes())
        })
        .unwrap_or(false);
    if !blob_ok {
        return Err(format!(
            "{label}'s {ty} line has a key blob that is not a {ty} key; {NOT}"
        ));
    }
    Ok(line.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real ed25519 authorized_keys line (`ssh-keygen -t ed25519`), public half only.
    pub(crate) const ED25519_LINE: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAILf5oszbHqEb+6X3j8hlzlMXxaLuKBJTgVM/l0kQlrAO owner@host";

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    #[test]
    fn tokenizer_follows_the_kernel() {
        let t = |s: &str| tokenize(s);
        let p = |k: &str, v: Option<&str>| (k.to_string(), v.map(str::to_string));
        type Params = Vec<(String, Option<String>)>;
        let cases: Vec<(&str, Params)> = vec![
            ("", vec![]),
            ("   \n", vec![]),
            (
                "console=ttyS0 reboot=k panic=1 ro\n",
                vec![
                    p("console", Some("ttyS0")),
                    p("reboot", Some("k")),
                    p("panic", Some("1")),
                    p("ro", None),
                ],
            ),
            (
                r#"a="x y z" b=2"#,
                vec![p("a", Some("x y z")), p("b", Some("2"))],
            ),
            (r#""a=x y" b"#, vec![p("a", Some("x y")), p("b", None)]),
            (r#"a="""#, vec![p("a", Some(""))]),
            (r#"a=" "#, vec![p("a", Some(" "))]),
            ("a= b", vec![p("a", Some("")), p("b", None)]),
            ("a=b=c", vec![p("a", Some("b=c"))]),
            ("x=1 -- banger.name=late", vec![p("x", Some("1"))]),
            (
                "x=1\tbanger.name=dev",
                vec![p("x", Some("1")), p("banger.name", Some("dev"))],
            ),
        ];
        for (line, want) in cases {
            assert_eq!(t(line), want, "{line:?}");
        }
    }

    #[test]
    fn config_table() {
        let key = b64(ED25519_LINE);
        let key_nl = b64(&format!("{ED25519_LINE}\n"));
        let two = b64(&format!("{ED25519_LINE}\n{ED25519_LINE}\n"));
        let rsa_claim =
            b64("ssh-rsa AAAAC3NzaC1lZDI1NTE5AAAAILf5oszbHqEb+6X3j8hlzlMXxaLuKBJTgVM/l0kQlrAO");
        let opts = b64(&format!("command=\"/bin/sh\" {ED25519_LINE}"));
        let long_name = "a".repeat(64);
        let long_key = "A".repeat(MAX_KEY_B64 + 4);
        // (command line, name, key present, problem substrings)
        let cases: Vec<(String, Option<&str>, bool, Vec<&str>)> = vec![
            ("console=ttyS0".into(), None, false, vec![]),
            ("banger.name=dev".into(), Some("dev"), false, vec![]),
            (
                format!("banger.name=dev banger.key={key}"),
                Some("dev"),
                true,
                vec![],
            ),
            (format!("banger.key={key_nl}"), None, true, vec![]),
            (
                format!("\"banger.key={key}\" banger.name=\"a-1\""),
                Some("a-1"),
                true,
                vec![],
            ),
            (
                "banger.name=one banger.name=two".into(),
                Some("two"),
                false,
                vec![],
            ),
            (
                "banger.name=Bad_Name".into(),
                None,
                false,
                vec!["not a valid hostname"],
            ),
            (
                "banger.name=-dev".into(),
                None,
                false,
                vec!["not a valid hostname"],
            ),
            (
                "banger.name=\"my vm\"".into(),
                None,
                false,
                vec!["not a valid hostname"],
            ),
            (
                "banger.name".into(),
                None,
                false,
                vec!["not a valid hostname"],
            ),
            (
                "banger.name=".into(),
                None,
                false,
                vec!["not a valid hostname"],
            ),
            (
                format!("banger.name={long_name}"),
                None,
                false,
                vec!["64 bytes, over the 63-byte cap"],
            ),
            // Last wins even when the last is bad: the earlier good value is not used.
            (
                "banger.name=good banger.name=BAD".into(),
                None,
                false,
                vec!["BAD"],
            ),
            (
                format!("banger.key={long_key}"),
                None,
                false,
                vec!["over the 1024-byte cap"],
            ),
            (
                "banger.key=!!notbase64".into(),
                None,
                false,
                vec!["not base64"],
            ),
            (
                format!("banger.key={}", b64("hello world")),
                None,
                false,
                vec!["not decode to an OpenSSH public key line"],
            ),
            (
                format!("banger.key={two}"),
                None,
                false,
                vec!["more than one line"],
            ),
            (
                format!("banger.key={rsa_claim}"),
                None,
                false,
                vec!["not a ssh-rsa key"],
            ),
            (
                format!("banger.key={opts}"),
                None,
                false,
                vec!["not decode to an OpenSSH public key line"],
            ),
            (
                format!("banger.key={}", b64("ssh-ed25519")),
                None,
                false,
                vec!["not a ssh-ed25519 key"],
            ),
            (
                format!("banger.key={} banger.name=dev", b64("\u{0}\u{1}")),
                Some("dev"),
                false,
                vec!["decodes to binary"],
            ),
            (
                format!("x -- banger.name=dev banger.key={key}"),
                None,
                false,
                vec![],
            ),
        ];
        for (line, name, has_key, problems) in cases {
            let c = parse(&line);
            assert_eq!(c.name.as_deref(), name, "{line}");
            assert_eq!(c.authorized_key.is_some(), has_key, "{line}: {c:?}");
            if has_key {
                assert_eq!(c.authorized_key.as_deref(), Some(ED25519_LINE), "{line}");
            }
            assert_eq!(c.problems.len(), problems.len(), "{line}: {:?}", c.problems);
            for (got, want) in c.problems.iter().zip(&problems) {
                assert!(got.contains(want), "{line}: {got:?} lacks {want:?}");
            }
        }
    }

    #[test]
    fn agent_tcp_port() {
        assert_eq!(parse("banger.agent_tcp=52").agent_tcp, Some(52));
        assert_eq!(
            parse("banger.agent_tcp=52 banger.agent_tcp=53").agent_tcp,
            Some(53)
        );
        assert_eq!(parse("console=ttyS0").agent_tcp, None);
        assert_eq!(parse("banger.agent_tcp=x").agent_tcp, None);
    }

    #[test]
    fn read_from_file() {
        let d = std::env::temp_dir().join(format!("banger-cmdline-{}", std::process::id()));
        std::fs::write(&d, "console=ttyS0 banger.name=vm1\n").unwrap();
        assert_eq!(read(&d).unwrap().name.as_deref(), Some("vm1"));
        std::fs::write(&d, vec![b'a'; MAX_CMDLINE + 1]).unwrap();
        assert!(read(&d).unwrap_err().why.contains("longer than"));
        std::fs::remove_file(&d).unwrap();
        let e = read(&d).unwrap_err();
        assert!(e.what.contains(&d.display().to_string()), "{e}");
    }
}
