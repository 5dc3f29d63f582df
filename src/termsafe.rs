//! Making text from the daemon or a guest safe to show on a terminal.
//!
//! A guest writes whatever it likes to its console, and the daemon's answers carry guest- and
//! network-derived text (boot ids, process names, console tails in errors, release versions). On
//! root's or the user's terminal, control characters in that text are commands: OSC sequences
//! set the window title or the clipboard, cursor moves and erases rewrite what was shown before,
//! and so on. So every such string goes through this module before it reaches stdout or stderr:
//!
//! - [`plain`]: keeps newlines and tabs; every other control character is shown escaped.
//! - [`json`]: JSON text (`--json` output) with the characters JSON encoders leave raw inside
//!   strings (DEL, C1, bidi controls) written as `\uNNNN` escapes: the same JSON value, inert on a
//!   terminal.
//! - [`console`] (for `banger vm logs`): also keeps `\r\n` line ends and colour (SGR) sequences
//!   `ESC [ <digits ; :> m`; every other escape sequence, a lone `\r`, BEL and the rest are
//!   shown escaped.
//!
//! "Escaped" is visible and unambiguous: C0 controls and DEL as `\xNN`, C1 controls and the
//! Unicode bidirectional controls (which reorder what the reader sees) as `\u{NNNN}`. Text
//! without any of these comes back unchanged and unallocated. This module never writes to the
//! terminal itself and never drops a character: what was there is shown, just not obeyed.

use std::borrow::Cow;
use std::fmt::Write;

/// The longest SGR parameter list kept as colour (real ones are a few bytes).
const MAX_SGR_PARAMS: usize = 64;

/// Whether `c` must not reach a terminal as itself (newline and tab excepted by the callers).
fn dangerous(c: char) -> bool {
    matches!(c,
        '\0'..='\x1f' | '\x7f' | '\u{80}'..='\u{9f}'
        // Bidi controls: ALM, LRM, RLM, embeddings/overrides, isolates.
        | '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

fn push_escaped(out: &mut String, c: char) {
    let n = c as u32;
    // Writing to a String cannot fail.
    let _ = if n < 0x80 {
        write!(out, "\\x{n:02x}")
    } else {
        write!(out, "\\u{{{n:04x}}}")
    };
}

/// `s` with every control character but `\n` and `\t` escaped.
pub fn plain(s: &str) -> Cow<'_, str> {
    if !s.chars().any(|c| dangerous(c) && c != '\n' && c != '\t') {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        if dangerous(c) && c != '\n' && c != '\t' {
            push_escaped(&mut out, c);
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// JSON text with every control character but the JSON whitespace `\n`, `\t`, `\r` written as a
/// `\uNNNN` escape (inside a string that is the same character; valid JSON has no other raw
/// control characters outside strings).
pub fn json(s: &str) -> Cow<'_, str> {
    let bad = |c: char| dangerous(c) && !matches!(c, '\n' | '\t' | '\r');
    if !s.chars().any(bad) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 16);
    for c in s.chars() {
        if bad(c) {
            let _ = write!(out, "\\u{:04x}", c as u32);
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// The length in bytes of the SGR sequence at the start of `s` (`ESC [ params m`), if it is one.
fn sgr_len(s: &str) -> Option<usize> {
    let rest = s.strip_prefix("\x1b[")?;
    let params = rest
        .bytes()
        .take(MAX_SGR_PARAMS + 1)
        .take_while(|b| b.is_ascii_digit() || *b == b';' || *b == b':')
        .count();
    if params > MAX_SGR_PARAMS {
        return None;
    }
    (rest.as_bytes().get(params) == Some(&b'm')).then_some(2 + params + 1)
}

/// A guest console's text for `banger vm logs`: newlines, tabs, `\r\n` and colour kept; every
/// other control character and escape sequence escaped.
pub fn console(s: &str) -> Cow<'_, str> {
    let needs = s
        .chars()
        .any(|c| dangerous(c) && !matches!(c, '\n' | '\t' | '\r' | '\x1b'))
        || s.match_indices('\r')
            .any(|(i, _)| !s[i + 1..].starts_with('\n'))
        || s.match_indices('\x1b')
            .any(|(i, _)| sgr_len(&s[i..]).is_none());
    if !needs {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 16);
    let mut i = 0;
    while let Some(c) = s[i..].chars().next() {
        let rest = &s[i..];
        if c == '\x1b' {
            if let Some(n) = sgr_len(rest) {
                out.push_str(&rest[..n]);
                i += n;
                continue;
            }
        }
        let keep = match c {
            '\n' | '\t' => true,
            '\r' => rest[1..].starts_with('\n'),
            c => !dangerous(c),
        };
        if keep {
            out.push(c);
        } else {
            push_escaped(&mut out, c);
        }
        i += c.len_utf8();
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn plain_table() {
        for (input, want) in [
            ("hello", "hello"),
            ("two\nlines\tand a tab", "two\nlines\tand a tab"),
            ("", ""),
            ("héllo wörld ✓", "héllo wörld ✓"),
            ("bell\x07", "bell\\x07"),
            ("\x1b[31mred\x1b[0m", "\\x1b[31mred\\x1b[0m"),
            ("\x1b]0;pwned\x07", "\\x1b]0;pwned\\x07"),
            ("cr\roverwrite", "cr\\x0doverwrite"),
            ("crlf\r\n", "crlf\\x0d\n"),
            ("del\x7f", "del\\x7f"),
            ("nul\0", "nul\\x00"),
            ("c1 csi \u{9b}2J", "c1 csi \\u{009b}2J"),
            ("rlo \u{202e}txt.exe", "rlo \\u{202e}txt.exe"),
            ("isolate \u{2066}x\u{2069}", "isolate \\u{2066}x\\u{2069}"),
            ("backslash \\x1b stays", "backslash \\x1b stays"),
        ] {
            assert_eq!(plain(input), want, "{input:?}");
        }
        assert!(matches!(plain("clean text\n"), Cow::Borrowed(_)));
    }

    #[test]
    fn json_is_the_same_value_made_inert() {
        let v = serde_json::json!({"boot_id": "a\u{9b}2J\u{7f}\u{202e}b", "n": 1});
        let text = serde_json::to_string(&v).unwrap();
        assert!(
            text.contains('\u{9b}'),
            "serde_json leaves C1 raw: {text:?}"
        );
        let safe = json(&text);
        assert_eq!(safe, r#"{"boot_id":"a\u009b2J\u007f\u202eb","n":1}"#);
        assert_eq!(serde_json::from_str::<serde_json::Value>(&safe).unwrap(), v);
        let pretty = serde_json::to_string_pretty(&v).unwrap();
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&json(&pretty)).unwrap(),
            v
        );
        assert!(matches!(json("{\"a\": \"b\"}\n"), Cow::Borrowed(_)));
    }

    #[test]
    fn console_table() {
        for (input, want) in [
            ("boot ok\r\n", "boot ok\r\n"),
            ("\t[  OK  ] Started\n", "\t[  OK  ] Started\n"),
            (
                "\x1b[0;32m  OK  \x1b[0m done\n",
                "\x1b[0;32m  OK  \x1b[0m done\n",
            ),
            ("\x1b[m reset", "\x1b[m reset"),
            (
                "\x1b[38:5:196mtruecolour-ish\x1b[0m",
                "\x1b[38:5:196mtruecolour-ish\x1b[0m",
            ),
            // Everything that is not colour is escaped.
            ("\x1b]0;title\x07", "\\x1b]0;title\\x07"),
            ("\x1b]52;c;cGFzdGU=\x1b\\", "\\x1b]52;c;cGFzdGU=\\x1b\\"),
            ("\x1b[2J\x1b[H", "\\x1b[2J\\x1b[H"),
            ("\x1b[1A\x1b[K", "\\x1b[1A\\x1b[K"),
            ("\x1b[?1049h", "\\x1b[?1049h"),
            ("\x1bc", "\\x1bc"),
            ("\x1b", "\\x1b"),
            ("\x1b[31", "\\x1b[31"),
            ("hidden\rshown", "hidden\\x0dshown"),
            ("ding\x07", "ding\\x07"),
            ("back\x08space", "back\\x08space"),
            ("\u{9b}31m c1", "\\u{009b}31m c1"),
            ("\u{9d}0;t\u{9c}", "\\u{009d}0;t\\u{009c}"),
            ("a\u{202e}b", "a\\u{202e}b"),
            ("\r", "\\x0d"),
        ] {
            assert_eq!(console(input), want, "{input:?}");
        }
        let long = format!("\x1b[{}m", "1;".repeat(40));
        assert!(console(&long).starts_with("\\x1b["), "over-long SGR kept");
        assert!(matches!(
            console("plain\r\n\x1b[1mbold\x1b[0m\n"),
            Cow::Borrowed(_)
        ));
    }

    /// What may reach the terminal from [`console`]: no control character but `\n`, `\t`, `\r`
    /// right before `\n`, and ESC only as the start of an SGR sequence.
    fn console_safe(out: &str) -> Result<(), String> {
        let mut i = 0;
        while let Some(c) = out[i..].chars().next() {
            if c == '\x1b' {
                match sgr_len(&out[i..]) {
                    Some(n) => {
                        i += n;
                        continue;
                    }
                    None => return Err(format!("bare ESC at {i}")),
                }
            }
            if c == '\r' && !out[i + 1..].starts_with('\n') {
                return Err(format!("lone CR at {i}"));
            }
            if dangerous(c) && !matches!(c, '\n' | '\t' | '\r') {
                return Err(format!("{c:?} at {i}"));
            }
            i += c.len_utf8();
        }
        Ok(())
    }

    /// Whether the printable characters of `input` appear in `output` in the same order.
    fn printable_kept(input: &str, output: &str) -> bool {
        let mut out = output.chars().filter(|c| !dangerous(*c));
        input
            .chars()
            .filter(|c| !dangerous(*c))
            .all(|c| out.any(|o| o == c))
    }

    /// As src/proptests.rs: `PROPTEST_CASES` cases (default 64), nothing persisted in the tree.
    fn config() -> ProptestConfig {
        ProptestConfig {
            cases: std::env::var("PROPTEST_CASES")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(64),
            failure_persistence: None,
            ..ProptestConfig::default()
        }
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn console_never_lets_a_command_through(s in "(\\PC|[\\x00-\\x1f\\x7f\\u{80}-\\u{9f}\\u{202e}]|\\x1b\\[[0-9;:]{0,4}[mHJK]?)*") {
            let out = console(&s);
            prop_assert!(console_safe(&out).is_ok(), "{:?} -> {:?}: {:?}", s, out, console_safe(&out));
            // Nothing is dropped: every printable character is still there, in order.
            prop_assert!(printable_kept(&s, &out), "{:?} -> {:?}", s, out);
        }

        #[test]
        fn json_keeps_the_value_and_no_control(s in "(\\PC|[\\x00-\\x1f\\x7f\\u{80}-\\u{9f}\\u{2066}])*") {
            let v = serde_json::json!({"s": s, "list": [s]});
            for text in [serde_json::to_string(&v).unwrap(), serde_json::to_string_pretty(&v).unwrap()] {
                let out = json(&text);
                prop_assert!(!out.chars().any(|c| dangerous(c) && !matches!(c, '\n' | '\t' | '\r')), "{:?}", out);
                prop_assert_eq!(serde_json::from_str::<serde_json::Value>(&out).unwrap(), v.clone());
            }
        }

        #[test]
        fn plain_keeps_only_newline_and_tab(s in "(\\PC|[\\x00-\\x1f\\x7f\\u{80}-\\u{9f}\\u{2066}])*") {
            let out = plain(&s);
            prop_assert!(printable_kept(&s, &out), "{:?} -> {:?}", s, out);
            prop_assert!(!out.chars().any(|c| dangerous(c) && c != '\n' && c != '\t'), "{:?} -> {:?}", s, out);
            // Clean input comes back unchanged.
            if !s.chars().any(|c| dangerous(c) && c != '\n' && c != '\t') {
                prop_assert_eq!(out.as_ref(), s.as_str());
            }
        }
    }
}
