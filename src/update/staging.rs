//! The staging dir and tarball extraction (in progress).
