//! `banger-vsock-agent`: the in-guest agent (readiness, boot_id, uname over AF_VSOCK).
//!
//! Not built yet: it arrives with the VMM issue. Until then it says so and exits 2.

/// Entry point of the agent role.
pub fn main(_args: Vec<String>) -> i32 {
    eprintln!("banger-vsock-agent: not built yet (the guest agent arrives with VM support)");
    2
}
