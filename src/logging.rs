//! JSON-lines logging to stderr (journald-friendly): one object per line.
