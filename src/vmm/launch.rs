//! VMM launch (in progress).
