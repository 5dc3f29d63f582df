//! The `ssh` command banger runs to enter a guest: its argument vector, the quoting of the remote
//! command, and what its exit status means.
//!
//! The argv never reads the user's ssh configuration (`-F none`) and pins everything:
//! banger's key only (`IdentitiesOnly`), banger's known_hosts only (the global one is `none`),
//! `StrictHostKeyChecking=yes` (never trust on first use), public-key authentication only (a
//! refused key fails instead of prompting for a password), the ed25519 host key the agent reported.
//! ssh joins the words after the destination with spaces and hands the result to the guest's login
//! shell, so the remote command is quoted here into one shell string that the guest's shell splits
//! back into exactly the caller's words. It never runs anything itself: the CLI does.

use std::ffi::OsString;
use std::path::Path;

use crate::error::{Error, Result};

/// The exit status ssh uses for its own failures (connection, authentication, host key).
pub const SSH_FAILED: i32 = 255;

/// Seconds ssh waits for the guest to accept the connection and send its banner. A guest on the
/// local bridge usually answers in milliseconds, but an emulated one on a busy host needed more
/// than 10 s for sshd's first banner; an address that answers nothing is caught before ssh runs
/// (the CLI's short TCP probe), so this bound only has to stop a hung guest.
pub const CONNECT_TIMEOUT_S: u32 = 60;

/// How many times ssh tries to connect, a second apart (`ConnectionAttempts`), within the one
/// [`CONNECT_TIMEOUT_S`] budget. A guest refuses for a moment after its agent is ready (sshd is
/// still starting); ssh retrying quietly covers that without banger probing port 22 first: a probe
/// connection costs the guest a whole sshd start for nothing (seconds under emulation, measured
/// by the smoke suite's `guest_ssh_bench`).
pub const CONNECT_ATTEMPTS: u32 = 30;

/// Whether the remote side gets a terminal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tty {
    /// `-t`: a pseudo-terminal (stdin is a terminal).
    Yes,
    /// `-T`: plain pipes (stdin is not a terminal: scripts, pipes, coding agents).
    No,
}

impl Tty {
    /// `Yes` exactly when this process's stdin is a terminal.
    pub fn from_stdin() -> Tty {
        use std::io::IsTerminal;
        if std::io::stdin().is_terminal() {
            Tty::Yes
        } else {
            Tty::No
        }
    }
}

/// Everything one ssh invocation needs.
#[derive(Debug, Clone)]
pub struct SshCommand<'a> {
    /// banger's private key.
    pub key: &'a Path,
    /// banger's known_hosts.
    pub known_hosts: &'a Path,
    /// The guest's address.
    pub host: &'a str,
    /// A port other than 22 (tests against a local sshd).
    pub port: Option<u16>,
    /// Terminal or not.
    pub tty: Tty,
    /// The remote command's words; `None` for a login shell.
    pub command: Option<&'a [String]>,
}

impl SshCommand<'_> {
    /// The argument vector, `ssh` first, retrying the connection [`CONNECT_ATTEMPTS`] times.
    pub fn argv(&self) -> Result<Vec<OsString>> {
        self.argv_attempts(CONNECT_ATTEMPTS)
    }

    /// [`SshCommand::argv`] with `attempts` connection attempts (1: fail at once, for a guest that
    /// does not answer at all, where each attempt would wait for ARP to give up).
    pub fn argv_attempts(&self, attempts: u32) -> Result<Vec<OsString>> {
        let opt = |k: &str, v: &str| vec!["-o".to_string(), format!("{k}={v}")];
        let mut a: Vec<String> = vec!["ssh".into(), "-F".into(), "none".into()];
        a.push("-i".into());
        a.push(config_path(self.key)?);
        a.extend(opt("UserKnownHostsFile", &config_path(self.known_hosts)?));
        a.extend(opt("GlobalKnownHostsFile", "none"));
        a.extend(opt("StrictHostKeyChecking", "yes"));
        a.extend(opt("IdentitiesOnly", "yes"));
        a.extend(opt("PreferredAuthentications", "publickey"));
        a.extend(opt("HostKeyAlgorithms", "ssh-ed25519"));
        a.extend(opt("LogLevel", "ERROR"));
        // Not TCP's minutes-long give-up (see CONNECT_TIMEOUT_S).
        a.extend(opt("ConnectTimeout", &CONNECT_TIMEOUT_S.to_string()));
        a.extend(opt("ConnectionAttempts", &attempts.max(1).to_string()));
        if let Some(p) = self.port {
            a.push("-p".into());
            a.push(p.to_string());
        }
        a.push(match self.tty {
            Tty::Yes => "-t".into(),
            Tty::No => "-T".into(),
        });
        if self.host.is_empty()
            || self.host.starts_with('-')
            || self.host.contains(char::is_whitespace)
        {
            return Err(Error::new(
                "building the ssh command",
                format!("bad host {:?}", self.host),
            ));
        }
        a.push(format!("root@{}", self.host));
        if let Some(words) = self.command {
            if words.is_empty() {
                return Err(Error::usage(
                    "building the ssh command",
                    "no remote command after `--`",
                ));
            }
            a.push("--".into());
            a.push(quote_words(words));
        }
        Ok(a.into_iter().map(OsString::from).collect())
    }
}

/// Characters a word may consist of and stay unquoted in any POSIX shell (no `=`: a first word
/// `A=b` would be an assignment, not a command; no `~`, globs, braces or `!`).
fn is_plain(c: char) -> bool {
    c.is_ascii_alphanumeric() || "@%+:,./_-".contains(c)
}

/// One word for a POSIX shell: as is when plain, otherwise in single quotes (a single quote as
/// `'\''`). The empty word is `''`. Newlines, `$`, backquotes and double quotes need no escaping
/// inside single quotes.
pub fn quote_word(w: &str) -> String {
    if !w.is_empty() && w.chars().all(is_plain) {
        return w.to_string();
    }
    format!("'{}'", w.replace('\'', r"'\''"))
}

/// The words as one shell command line that splits back into exactly these words.
pub fn quote_words(words: &[String]) -> String {
    words
        .iter()
        .map(|w| quote_word(w))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A path as an ssh option value (ssh_config file or `-o`): `%` doubled (ssh expands `%` tokens
/// in key and known_hosts paths), double-quoted with `\` and `"` escaped when it holds spaces or
/// quotes. Relative paths (ssh would expand `~`) and newlines are refused.
pub fn config_path(p: &Path) -> Result<String> {
    let what = || format!("using {} in an ssh command", p.display());
    let s = p
        .to_str()
        .ok_or_else(|| Error::new(what(), "the path is not UTF-8"))?;
    if !p.is_absolute() {
        return Err(Error::new(what(), "the path is not absolute"));
    }
    if s.contains(['\n', '\r', '\0']) {
        return Err(Error::new(what(), "the path contains a line break"));
    }
    let s = s.replace('%', "%%");
    if s.contains(|c: char| c.is_whitespace() || "\"'\\#".contains(c)) {
        Ok(format!(
            "\"{}\"",
            s.replace('\\', "\\\\").replace('"', "\\\"")
        ))
    } else {
        Ok(s)
    }
}

/// What ssh's exit status means for banger's caller: the code to exit with, and a note for stderr
/// when the status may be ssh's own failure rather than the remote command's.
pub fn exit_code(status: std::process::ExitStatus, vm: &str) -> (i32, Option<String>) {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(SSH_FAILED), _) => (
            SSH_FAILED,
            Some(format!(
                "ssh to {vm} exited 255: ssh itself failed (connection, authentication or host key: see \
                 its message above), or the remote command exited 255 (check with `banger vm show {vm}` \
                 and `banger vm logs {vm}`)"
            )),
        ),
        (Some(c), _) => (c, None),
        (None, Some(sig)) => (128 + sig, Some(format!("ssh was killed by signal {sig}"))),
        (None, None) => (1, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::process::Command;

    fn words(ws: &[&str]) -> Vec<String> {
        ws.iter().map(|s| s.to_string()).collect()
    }

    const TRICKY: &[&[&str]] = &[
        &["sh", "-c", "exit 7"],
        &["echo", "two  spaces", "tab\there"],
        &["printf", "%s", "it's", "\"double\"", "'single'", "''"],
        &["echo", "$HOME", "${PATH}", "`id`", "$(id)"],
        &["echo", "", "", "empty"],
        &["echo", "line1\nline2", "\n"],
        &[
            "echo",
            "*",
            "?",
            "[a]",
            "~",
            "~root",
            "{a,b}",
            "!x",
            "#not-a-comment",
        ],
        &["A=b", "x;y", "a|b", "a&b", "a>b", "(x)", "\\", "\\'"],
        &["echo", "ünïcødé", "-n", "--", "-"],
    ];

    #[test]
    fn quoting_table() {
        let cases: &[(&[&str], &str)] = &[
            (&["sh", "-c", "exit 7"], "sh -c 'exit 7'"),
            (&["true"], "true"),
            (&[""], "''"),
            (&["it's"], r"'it'\''s'"),
            (&["$HOME"], "'$HOME'"),
            (&["A=b"], "'A=b'"),
            (&["a\nb"], "'a\nb'"),
            (&["/usr/bin/env", "x@y:1,2+3%"], "/usr/bin/env x@y:1,2+3%"),
            (&["~"], "'~'"),
        ];
        for (ws, want) in cases {
            assert_eq!(quote_words(&words(ws)), *want, "{ws:?}");
        }
    }

    /// Each quoted line, given to a real shell as ssh gives it to the guest's login shell, splits
    /// back into exactly the original words.
    #[test]
    fn quoted_words_survive_real_shells() {
        for shell in ["/bin/sh", "/bin/bash", "/bin/dash"] {
            if !Path::new(shell).exists() {
                eprintln!("SKIP: quoted_words_survive_real_shells[{shell}]: not installed");
                continue;
            }
            for ws in TRICKY {
                let ws = words(ws);
                let mut printing = vec!["printf".to_string(), "%s\\0".to_string()];
                printing.extend(ws.iter().cloned());
                let line = quote_words(&printing);
                let out = Command::new(shell).arg("-c").arg(&line).output().unwrap();
                assert!(out.status.success(), "{shell} {line:?}");
                let mut got: Vec<String> = String::from_utf8(out.stdout)
                    .unwrap()
                    .split('\0')
                    .map(String::from)
                    .collect();
                assert_eq!(got.pop().as_deref(), Some(""));
                assert_eq!(got, ws, "{shell} {line:?}");
            }
            // And the exit status of `sh -c 'exit 7'` is the command's.
            let line = quote_words(&words(&["sh", "-c", "exit 7"]));
            let st = Command::new(shell).arg("-c").arg(&line).status().unwrap();
            assert_eq!(st.code(), Some(7));
        }
    }

    #[test]
    fn argv_pins_everything() {
        let key = PathBuf::from("/var/lib/banger/ssh/id_ed25519");
        let kh = PathBuf::from("/var/lib/banger/ssh/known_hosts");
        let cmd = words(&["sh", "-c", "exit 7"]);
        let c = SshCommand {
            key: &key,
            known_hosts: &kh,
            host: "172.30.0.2",
            port: None,
            tty: Tty::No,
            command: Some(&cmd),
        };
        let argv: Vec<String> = c
            .argv()
            .unwrap()
            .into_iter()
            .map(|s| s.into_string().unwrap())
            .collect();
        assert_eq!(
            argv,
            [
                "ssh",
                "-F",
                "none",
                "-i",
                "/var/lib/banger/ssh/id_ed25519",
                "-o",
                "UserKnownHostsFile=/var/lib/banger/ssh/known_hosts",
                "-o",
                "GlobalKnownHostsFile=none",
                "-o",
                "StrictHostKeyChecking=yes",
                "-o",
                "IdentitiesOnly=yes",
                "-o",
                "PreferredAuthentications=publickey",
                "-o",
                "HostKeyAlgorithms=ssh-ed25519",
                "-o",
                "LogLevel=ERROR",
                "-o",
                "ConnectTimeout=60",
                "-o",
                "ConnectionAttempts=30",
                "-T",
                "root@172.30.0.2",
                "--",
                "sh -c 'exit 7'",
            ]
        );
        // A guest that does not answer: one attempt (0 is not a count ssh takes).
        for (n, want) in [
            (1, "ConnectionAttempts=1"),
            (0, "ConnectionAttempts=1"),
            (5, "ConnectionAttempts=5"),
        ] {
            let a: Vec<String> = c
                .argv_attempts(n)
                .unwrap()
                .into_iter()
                .map(|s| s.into_string().unwrap())
                .collect();
            assert!(a.iter().any(|w| w == want), "{n}: {a:?}");
        }
        let shell = SshCommand {
            tty: Tty::Yes,
            command: None,
            port: Some(2222),
            ..c.clone()
        };
        let argv: Vec<String> = shell
            .argv()
            .unwrap()
            .into_iter()
            .map(|s| s.into_string().unwrap())
            .collect();
        assert_eq!(
            argv[argv.len() - 4..],
            ["-p", "2222", "-t", "root@172.30.0.2"]
        );
        // Bad input refused.
        let empty: Vec<String> = vec![];
        let e = SshCommand {
            command: Some(&empty),
            ..c.clone()
        }
        .argv()
        .unwrap_err();
        assert_eq!(e.exit_code(), 2);
        for host in ["", "-oProxyCommand=x", "a b"] {
            assert!(SshCommand { host, ..c.clone() }.argv().is_err(), "{host:?}");
        }
    }

    #[test]
    fn config_path_table() {
        let ok = [
            (
                "/var/lib/banger/ssh/known_hosts",
                "/var/lib/banger/ssh/known_hosts",
            ),
            ("/tmp/a b/k", "\"/tmp/a b/k\""),
            ("/tmp/100%/k", "/tmp/100%%/k"),
            ("/tmp/a\"b'c/k", r#""/tmp/a\"b'c/k""#),
            ("/tmp/a\\b #c", r#""/tmp/a\\b #c""#),
        ];
        for (p, want) in ok {
            assert_eq!(config_path(Path::new(p)).unwrap(), want, "{p}");
        }
        for p in ["relative/k", "~/k", "/tmp/a\nb"] {
            assert!(config_path(Path::new(p)).is_err(), "{p:?}");
        }
    }

    /// ssh itself reads our quoted paths back as the paths we meant (`ssh -G` resolves the
    /// configuration without connecting anywhere).
    #[test]
    fn ssh_parses_our_paths_back() {
        if !Path::new("/usr/bin/ssh").exists() {
            eprintln!("SKIP: ssh_parses_our_paths_back: ssh is not installed (apt-get install openssh-client)");
            return;
        }
        for p in [
            "/tmp/plain/kh",
            "/tmp/a b/kh",
            "/tmp/100%/kh",
            "/tmp/q\"u'o\\te #x/kh",
        ] {
            let kh = PathBuf::from(p);
            let key = PathBuf::from("/tmp/k");
            let c = SshCommand {
                key: &key,
                known_hosts: &kh,
                host: "192.0.2.1",
                port: None,
                tty: Tty::No,
                command: None,
            };
            let mut argv = c.argv().unwrap();
            argv.insert(1, "-G".into());
            let out = Command::new("/usr/bin/ssh")
                .args(&argv[1..])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let cfg = String::from_utf8(out.stdout).unwrap();
            for want in [
                format!("userknownhostsfile {p}"),
                "globalknownhostsfile none".to_string(),
                "stricthostkeychecking true".to_string(),
                "identitiesonly yes".to_string(),
                "connecttimeout 60".to_string(),
                "hostkeyalgorithms ssh-ed25519".to_string(),
                "preferredauthentications publickey".to_string(),
                "user root".to_string(),
                "hostname 192.0.2.1".to_string(),
            ] {
                assert!(cfg.lines().any(|l| l == want), "{want:?} not in:\n{cfg}");
            }
        }
    }

    #[test]
    fn exit_status_meanings() {
        use std::os::unix::process::ExitStatusExt;
        let st = |raw| std::process::ExitStatus::from_raw(raw);
        assert_eq!(exit_code(st(0), "dev"), (0, None));
        assert_eq!(exit_code(st(7 << 8), "dev"), (7, None));
        let (c, note) = exit_code(st(255 << 8), "dev");
        assert_eq!(c, 255);
        assert!(note.unwrap().contains("ssh itself failed"));
        let (c, note) = exit_code(st(9), "dev");
        assert_eq!(c, 137);
        assert!(note.unwrap().contains("signal 9"));
    }
}
