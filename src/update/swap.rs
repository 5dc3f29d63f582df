//! The binary swap (in progress).
