//! The `bangerd_root` role.

/// Entry point.
pub fn main(_args: Vec<String>) -> i32 {
    0
}
