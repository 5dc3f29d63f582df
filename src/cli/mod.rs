//! The `banger` command tree (argh) and its output formatting.
//!
//! Each command group lives in its own module and returns `Result<i32>`; this module maps errors
//! to `banger: <what failed>: <why> (<what to do>)` on stderr with exit 1 (usage errors exit 2).

mod completion;
mod daemon;
mod doctor;
mod enter;
mod image_build;
mod run;
mod snapshot;
mod ssh_config;
mod system;
mod update;
mod vm;

use crate::error::{Error, Result};
use argh::{ArgsInfo, FromArgs};

#[derive(FromArgs, ArgsInfo)]
/// banger: one-command development sandboxes on Firecracker microVMs.
#[argh(
    example = "Install banger on this host for user alice (once, as root):\n  sudo banger system install --owner alice",
    example = "Check that everything is in order:\n  banger doctor",
    example = "A fresh VM and a root shell in it, deleted when you leave:\n  banger vm run --rm",
    example = "Is the daemon up?\n  banger daemon status",
    example = "Is a newer banger out? Install it (VMs keep running):\n  banger update --check\n  sudo banger update",
    note = "Run `banger <command> --help` for a command's options. `banger --version` prints one line."
)]
struct Top {
    #[argh(subcommand)]
    cmd: Cmd,
}

#[derive(FromArgs, ArgsInfo)]
#[argh(subcommand)]
enum Cmd {
    Version(VersionCmd),
    Daemon(daemon::DaemonCmd),
    Doctor(doctor::DoctorCmd),
    System(system::SystemCmd),
    Vm(vm::VmCmd),
    Image(vm::ImageCmd),
    Snapshot(snapshot::SnapshotCmd),
    Kernel(vm::KernelCmd),
    Update(update::UpdateCmd),
    SshConfig(ssh_config::SshConfigCmd),
    Completion(completion::CompletionCmd),
}

#[derive(FromArgs, ArgsInfo)]
/// Print this binary's build identity as three lines: version, commit, built_at.
#[argh(subcommand, name = "version")]
struct VersionCmd {}

/// Runs the CLI with `args` (argv[0] first); returns the exit code.
pub fn run(args: Vec<String>) -> i32 {
    if args.len() == 2 && (args[1] == "--version" || args[1] == "-V") {
        return crate::applets::print_version();
    }
    // Hidden: the release signing keys compiled in, for packaging/release.sh's check.
    if args.len() == 2 && args[1] == "--release-keys" {
        return match crate::update::signature::release_keys_report() {
            Ok(text) => {
                print!("{text}");
                0
            }
            Err(e) => {
                eprintln!("banger: {e}");
                1
            }
        };
    }
    let top: Top = match crate::applets::parse_args(&args) {
        Ok(t) => t,
        Err(code) => return code,
    };
    let result = match top.cmd {
        Cmd::Version(_) => {
            print!("{}", crate::buildinfo::BuildInfo::current().three_lines());
            Ok(0)
        }
        Cmd::Daemon(c) => daemon::run(c),
        Cmd::Doctor(c) => doctor::run(c),
        Cmd::System(c) => system::run(c),
        Cmd::Vm(c) => vm::run(c),
        Cmd::Image(c) => vm::run_image(c),
        Cmd::Snapshot(c) => snapshot::run(c),
        Cmd::Kernel(c) => vm::run_kernel(c),
        Cmd::Update(c) => update::run(c),
        Cmd::SshConfig(c) => ssh_config::run(c),
        Cmd::Completion(c) => completion::run(c),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            // An error can carry the daemon's and a guest's words (a console tail, a fault).
            eprintln!("banger: {}", crate::termsafe::plain(&e.to_string()));
            e.exit_code()
        }
    }
}

/// Refuses unless running as root, telling the user the exact command to re-run.
pub(crate) fn require_root(what: &str, command: &str) -> Result<()> {
    if rustix::process::geteuid().is_root() {
        Ok(())
    } else {
        Err(Error::new(what.to_string(), "root is required").hint(format!("run: sudo {command}")))
    }
}

/// True when stdout is a terminal.
pub(crate) fn stdout_is_tty() -> bool {
    use std::io::IsTerminal;
    std::io::stdout().is_terminal()
}
