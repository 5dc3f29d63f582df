//! The crash-safe update journal (in progress).
