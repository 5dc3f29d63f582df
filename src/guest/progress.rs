//! Progress lines for long builds: `[  12.3s] stage…` on stderr when it is a terminal, nothing
//! otherwise (scripts and CI logs get only the result and errors).

use std::io::Write;
use std::time::Instant;

/// Prints stages with the time since the build started.
#[derive(Debug)]
pub struct Progress {
    start: Instant,
    live: bool,
}

impl Progress {
    /// Live when stderr is a terminal.
    pub fn for_stderr() -> Progress {
        use std::io::IsTerminal;
        Progress::new(std::io::stderr().is_terminal())
    }

    /// Live or quiet, as told.
    pub fn new(live: bool) -> Progress {
        Progress {
            start: Instant::now(),
            live,
        }
    }

    /// Seconds since the start.
    pub fn elapsed_s(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    /// The line for `stage` at the current time.
    pub fn line(&self, stage: &str) -> String {
        format!("[{:>6.1}s] {stage}", self.elapsed_s())
    }

    /// Shows `stage` (when live).
    pub fn stage(&self, stage: &str) {
        if self.live {
            let mut e = std::io::stderr();
            let _ = writeln!(e, "{}", self.line(stage));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_has_elapsed_and_stage() {
        let p = Progress::new(false);
        let l = p.line("debootstrap bookworm");
        assert!(
            l.starts_with('[') && l.contains("s] debootstrap bookworm"),
            "{l}"
        );
    }
}
