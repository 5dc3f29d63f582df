//! The `banger` role: the command-line interface (see [`crate::cli`]).

/// Entry point of the CLI role.
pub fn main(args: Vec<String>) -> i32 {
    crate::cli::run(args)
}
