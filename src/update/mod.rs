//! `banger update`: manifest, SHA256SUMS, signature, download, staging, swap, journal, flow.
