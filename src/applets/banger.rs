//! The `banger` role.

/// Entry point.
pub fn main(_args: Vec<String>) -> i32 {
    0
}
