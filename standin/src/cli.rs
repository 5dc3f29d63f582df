//! Firecracker's command line, as far as the stand-in honours it: the flags banger passes work,
//! logging and timing flags are accepted and ignored, unknown flags are refused with Firecracker's
//! argument-parsing exit code.

use std::path::PathBuf;

use crate::machine::VERSION;

/// Firecracker's exit code for argument parsing errors (`FcExitCode::ArgParsing`).
pub const EXIT_ARG_PARSING: u8 = 153;

/// What to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// `--api-sock`.
    pub api_sock: PathBuf,
    /// `--id`.
    pub id: String,
}

/// The outcome of parsing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// Serve the API.
    Run(Options),
    /// Print this and exit 0 (`--version`, `--help`).
    Exit(String),
}

const USAGE: &str = "firecracker (banger stand-in for Firecracker v1.16.1; test use only)

Usage: firecracker --api-sock PATH [--id ID]

Accepted and ignored: --level, --log-path, --module, --metrics-path, --seccomp-filter,
--start-time-us, --start-time-cpu-us, --parent-cpu-time-us, --http-api-max-payload-size,
--mmds-size-limit, --show-level, --show-log-origin, --boot-timer, --no-seccomp, --enable-pci.";

/// Flags that take a value the stand-in ignores.
const IGNORED_WITH_VALUE: &[&str] = &[
    "--level",
    "--log-path",
    "--module",
    "--metrics-path",
    "--seccomp-filter",
    "--start-time-us",
    "--start-time-cpu-us",
    "--parent-cpu-time-us",
    "--http-api-max-payload-size",
    "--mmds-size-limit",
];

/// Switches the stand-in ignores.
const IGNORED_SWITCHES: &[&str] = &[
    "--show-level",
    "--show-log-origin",
    "--boot-timer",
    "--no-seccomp",
    "--enable-pci",
];

/// Firecracker flags that change what the process is; the stand-in does not do them.
const UNSUPPORTED: &[&str] = &[
    "--no-api",
    "--config-file",
    "--metadata",
    "--describe-snapshot",
];

fn arg_err(msg: String) -> (u8, String) {
    (
        EXIT_ARG_PARSING,
        format!("Arguments parsing error: {msg}\n\nFor more information try --help."),
    )
}

/// Parses Firecracker's arguments (without argv[0]).
pub fn parse(args: &[String]) -> Result<Parsed, (u8, String)> {
    let mut api_sock = None;
    let mut id = "anonymous-instance".to_string();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || {
            it.next().cloned().ok_or_else(|| {
                arg_err(format!(
                    "The argument '{a}' requires a value, but none was supplied"
                ))
            })
        };
        match a.as_str() {
            "--version" => return Ok(Parsed::Exit(format!("Firecracker v{VERSION}"))),
            "--help" | "-h" => return Ok(Parsed::Exit(USAGE.to_string())),
            "--api-sock" => api_sock = Some(PathBuf::from(value()?)),
            "--id" => {
                let v = value()?;
                if v.is_empty()
                    || v.len() > 64
                    || !v.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                {
                    return Err((
                        1,
                        format!("Invalid instance ID: {v:?} (1-64 alphanumeric characters or '-')"),
                    ));
                }
                id = v;
            }
            f if IGNORED_WITH_VALUE.contains(&f) => {
                value()?;
            }
            f if IGNORED_SWITCHES.contains(&f) => {}
            f if UNSUPPORTED.contains(&f) => {
                return Err((1, format!("the banger stand-in VMM does not support {f}")))
            }
            other => {
                return Err(arg_err(format!(
                "Found argument '{other}' which wasn't expected, or isn't valid in this context."
            )))
            }
        }
    }
    let Some(api_sock) = api_sock else {
        return Err(arg_err(
            "the stand-in needs --api-sock PATH (it never defaults to /run/firecracker.socket)"
                .into(),
        ));
    };
    Ok(Parsed::Run(Options { api_sock, id }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Result<Parsed, (u8, String)> {
        parse(&args.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn table() {
        assert_eq!(
            p(&["--version"]).unwrap(),
            Parsed::Exit("Firecracker v1.16.1".into())
        );
        assert_eq!(
            p(&[
                "--api-sock",
                "/s",
                "--id",
                "vm-1",
                "--level",
                "Debug",
                "--boot-timer"
            ])
            .unwrap(),
            Parsed::Run(Options {
                api_sock: "/s".into(),
                id: "vm-1".into()
            })
        );
        assert_eq!(
            p(&["--api-sock", "/s"]).unwrap(),
            Parsed::Run(Options {
                api_sock: "/s".into(),
                id: "anonymous-instance".into()
            })
        );
        for bad in [
            &["--api-sock", "/s", "--bogus"][..],
            &["--api-sock"],
            &[],
            &["--api-sock", "/s", "--level"],
        ] {
            let (code, msg) = p(bad).unwrap_err();
            assert_eq!(code, EXIT_ARG_PARSING, "{bad:?}");
            assert!(msg.starts_with("Arguments parsing error: "), "{msg}");
        }
        assert_eq!(p(&["--api-sock", "/s", "--id", "a b"]).unwrap_err().0, 1);
        assert_eq!(p(&["--api-sock", "/s", "--no-api"]).unwrap_err().0, 1);
    }
}
