//! banger's one error shape: what failed, why, and what the operator should do next.
//!
//! Every user-facing failure renders as `<what failed>: <why> (<what to do>)`, so the message alone
//! tells the operator where to look. Library modules build these with [`Error::new`] or the
//! [`Context`] extension; the CLI prefixes `banger: ` and maps [`Error::exit_code`].

use std::fmt;

/// A failure with enough context to act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    /// What failed, e.g. "reading /etc/banger/install.toml".
    pub what: String,
    /// Why it failed (the underlying cause).
    pub why: String,
    /// What to do next, if we know.
    pub hint: Option<String>,
    /// Process exit code for the CLI: 1 for failures, 2 for usage errors.
    pub code: i32,
}

/// Shorthand result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A failure: `what` failed because `why`.
    pub fn new(what: impl Into<String>, why: impl fmt::Display) -> Self {
        Error {
            what: what.into(),
            why: why.to_string(),
            hint: None,
            code: 1,
        }
    }

    /// A usage error (exit 2).
    pub fn usage(what: impl Into<String>, why: impl fmt::Display) -> Self {
        Error {
            code: 2,
            ..Error::new(what, why)
        }
    }

    /// Adds what the operator should do next.
    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// The CLI exit code for this error.
    pub fn exit_code(&self) -> i32 {
        self.code
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.what, self.why)?;
        if let Some(h) = &self.hint {
            write!(f, " ({h})")?;
        }
        Ok(())
    }
}

impl std::error::Error for Error {}

/// Attach "what failed" context to any displayable error.
pub trait Context<T> {
    /// On error, wrap it as `what: <original error>`.
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T, E: fmt::Display> Context<T> for std::result::Result<T, E> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::new(what(), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_what_why_hint() {
        let e = Error::new("reading /x", "No such file").hint("run sudo banger system install");
        assert_eq!(
            e.to_string(),
            "reading /x: No such file (run sudo banger system install)"
        );
        assert_eq!(e.exit_code(), 1);
        assert_eq!(Error::usage("a", "b").exit_code(), 2);
    }

    #[test]
    fn context_wraps() {
        let r: std::result::Result<(), std::io::Error> =
            Err(std::io::Error::new(std::io::ErrorKind::NotFound, "gone"));
        let e = r.ctx(|| "opening f".into()).unwrap_err();
        assert_eq!(e.to_string(), "opening f: gone");
    }
}
