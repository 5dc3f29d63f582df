//! The `banger` command tree (argh) and its output formatting.
