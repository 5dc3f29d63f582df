//! `banger doctor`: read-only health checks.
