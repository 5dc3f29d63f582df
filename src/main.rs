//! Entry point: dispatches on the basename of argv[0] to one of banger's roles. Nothing else.

fn main() {
    std::process::exit(banger::applets::dispatch(std::env::args_os().collect()));
}
