//! `firecracker` (stand-in): a test-only impersonation of Firecracker v1.16.1 for machines without
//! KVM or a Firecracker binary. Never shipped in a release.
//!
//! It owns exactly what banger's tests need from a VMM process: Firecracker's command line, the API
//! subset banger speaks (held to Firecracker's spec, see [`machine`]), a console line with a fresh
//! boot id after InstanceStart, the vsock handshake answered by banger's real guest-agent
//! handler, and the taps of its network interfaces, opened and held as Firecracker holds them. It
//! never runs guest code itself; with QEMU installed and a real Linux kernel configured, its TCG
//! engine ([`tcg`]) boots that kernel under QEMU instead. One process, a few threads; it exits 0
//! shortly after
//! SendCtrlAltDel (as Firecracker does when its guest reboots), dies by SIGTERM/SIGINT after
//! removing its sockets, and leaves them behind on SIGKILL like the real thing.

mod cli;
mod machine;
mod serial;
mod server;
mod snapshot;
mod tap;
mod tcg;
#[cfg(test)]
mod testdir;

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opts = match cli::parse(&args) {
        Ok(cli::Parsed::Run(o)) => o,
        Ok(cli::Parsed::Exit(msg)) => {
            println!("{msg}");
            return ExitCode::SUCCESS;
        }
        Err((code, msg)) => {
            eprintln!("{msg}");
            return ExitCode::from(code);
        }
    };
    match server::run(opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("firecracker (banger stand-in): {e}");
            ExitCode::from(1)
        }
    }
}
