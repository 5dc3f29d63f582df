//! `banger vm run`: one command from nothing to a shell (or a command) in a fresh VM.
//!
//! Creates the VM through the daemon (which boots it and pins its host key), waits for its sshd,
//! then runs ssh like `vm ssh`/`vm exec`. `--rm` deletes the VM afterwards, also after Ctrl-C, but
//! never a VM whose guest did not become ready: that one is kept for `vm logs`. Without `--rm` the
//! last line says the VM is still running and how to stop it; `-d` prints how to get in and returns.

use std::time::Duration;

use argh::{ArgsInfo, FromArgs};
use serde_json::json;

use super::enter::{self, Interrupts};
use crate::error::{Error, Result};
use crate::layout::Layout;
use crate::rpc::client;

/// How long a fresh guest's sshd may take to accept connections after its agent is ready.
const SSHD_WAIT: Duration = Duration::from_secs(60);

#[derive(FromArgs, ArgsInfo)]
/// Create a VM, wait until it is ready, and open a shell in it (or run one command).
#[argh(
    subcommand,
    name = "run",
    example = "A throwaway root shell, deleted when you leave it:\n  banger vm run --rm",
    example = "Run one command in a fresh VM and delete it (exit status is the command's):\n  banger vm run --rm -- sh -c 'uname -a; exit 7'",
    example = "Start a named VM with internet access in the background:\n  banger vm run -d --name dev --nat\n  banger vm ssh dev",
    note = "Without --rm the VM keeps running after the shell or command ends; the last line says how to get back in and how to delete it. With --rm it is deleted afterwards, also after Ctrl-C, but not when the guest never became ready: then it is kept so `banger vm logs NAME` can show why. -d cannot be combined with --rm or a command."
)]
pub struct RunCmd {
    /// VM name: 1-63 of a-z, 0-9, '-' (default: generated)
    #[argh(option)]
    name: Option<String>,
    /// image to boot (default: the only image, if there is exactly one)
    #[argh(option)]
    image: Option<String>,
    /// number of vCPUs (default 1)
    #[argh(option, default = "1")]
    vcpu: u32,
    /// memory in MiB (default 512)
    #[argh(option, default = "512")]
    memory: u32,
    /// let the guest reach outside networks through this host (NAT)
    #[argh(switch)]
    nat: bool,
    /// restore this snapshot instead of booting an image (its image, vCPUs and memory; see
    /// `banger vm create --from`)
    #[argh(option)]
    from: Option<String>,
    /// delete the VM when the shell or command ends
    #[argh(switch)]
    rm: bool,
    /// detach: create and boot the VM, print how to enter it, and return
    #[argh(switch, short = 'd')]
    detach: bool,
    /// command to run instead of a shell (after `--`)
    #[argh(positional, greedy)]
    command: Vec<String>,
}

/// Refuses flag combinations that cannot mean anything (exit 2), before anything is created.
fn check(c: &RunCmd) -> Result<()> {
    if c.detach && c.rm {
        return Err(Error::usage(
            "running a VM",
            "-d and --rm contradict each other (a detached VM is kept)",
        )
        .hint("drop one of them"));
    }
    if c.detach && !c.command.is_empty() {
        return Err(Error::usage(
            "running a VM",
            "-d cannot run a command (nothing would wait for it)",
        )
        .hint("create with -d, then `banger vm exec NAME -- …`"));
    }
    if let Some(n) = &c.name {
        super::vm::check_name(n)?;
    }
    crate::daemon::vms::check_size(u64::from(c.vcpu), u64::from(c.memory))
        .map_err(|why| Error::usage("running a VM", why))
}

fn delete(name: &str) -> Result<()> {
    let sock = Layout::from_env().daemon_socket();
    client::call_with_timeout(
        &sock,
        "vm.delete",
        json!({"vms": [name]}),
        Duration::from_secs(120),
    )
    .map_err(|e| e.into_error(&format!("deleting VM `{name}`")))?;
    eprintln!("banger: deleted VM {name}");
    Ok(())
}

fn exists(name: &str) -> bool {
    let sock = Layout::from_env().daemon_socket();
    client::call(&sock, "vm.show", json!({"vm": name})).is_ok()
}

/// `banger vm run`.
pub fn run(c: RunCmd) -> Result<i32> {
    check(&c)?;
    let name = c
        .name
        .clone()
        .unwrap_or_else(|| format!("vm-{}", crate::daemon::shared::random_hex(3)));
    // A name already taken is refused before anything happens, so that a failed create below
    // always concerns a VM this command recorded.
    if exists(&name) {
        return Err(Error::new(
            format!("running VM `{name}`"),
            "a VM with that name already exists",
        )
        .hint(format!(
            "pick another --name, or get into it with `banger vm ssh {name}`"
        )));
    }
    let interrupts = if c.rm {
        Some(Interrupts::catch(Some(format!(
            "interrupted: VM {name} will be deleted as soon as it can be"
        )))?)
    } else {
        None
    };
    let interrupted = || interrupts.as_ref().is_some_and(Interrupts::seen);
    let params = match &c.from {
        Some(snap) if c.image.is_none() => json!({"name": name, "from": snap, "nat": c.nat}),
        Some(_) => {
            return Err(Error::usage(
                "running a VM from a snapshot",
                "--from takes the snapshot's image",
            )
            .hint("drop --image"))
        }
        None => {
            json!({"name": name, "image": c.image, "vcpu": c.vcpu, "memory_mib": c.memory, "start": true, "nat": c.nat})
        }
    };
    let created =
        super::vm::long_call("vm.create", params, &format!("creating VM `{name}`"), &name);
    let vm = match created {
        Ok(v) => v,
        Err(e) => {
            if exists(&name) {
                // Recorded but its guest never became ready: keep it for the post-mortem.
                return Err(e.hint(format!(
                    "VM {name} was kept so you can see why: `banger vm logs {name}`; remove it with `banger vm delete {name}`"
                )));
            }
            return Err(e);
        }
    };
    if interrupted() {
        delete(&name)?;
        return Ok(130);
    }
    if c.detach {
        println!("{name}");
        println!("banger vm ssh {name}");
        return Ok(0);
    }
    // The guest is ready; before ssh can run, its host key must be pinned and sshd listening.
    // A VM that fails here is kept, like one that never became ready: it is what to look at.
    let target = enter::target_of(&vm, &Layout::from_env())
        .and_then(|t| {
            if enter::wait_sshd(&t.ip, SSHD_WAIT, SSHD_WAIT, &interrupted) || interrupted() {
                Ok(t)
            } else {
                Err(Error::new(
                    format!("waiting {}s for sshd in VM `{}` ({}:22)", SSHD_WAIT.as_secs(), t.name, t.ip),
                    "it never accepted a connection",
                ))
            }
        })
        .map_err(|e| {
            e.hint(format!(
                "VM {name} was kept so you can see why: `banger vm logs {name}`; remove it with `banger vm delete {name}`"
            ))
        })?;
    let result = if interrupted() {
        Ok(130)
    } else {
        enter::run_ssh(
            &target,
            (!c.command.is_empty()).then_some(c.command.as_slice()),
        )
    };
    if c.rm {
        delete(&name)?;
    } else if result.is_ok() {
        eprintln!(
            "banger: VM {name} is still running: `banger vm ssh {name}` to get back in, `banger vm delete {name}` to remove it"
        );
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use argh::FromArgs;

    fn parse(args: &[&str]) -> std::result::Result<RunCmd, argh::EarlyExit> {
        RunCmd::from_args(&["run"], args)
    }

    #[test]
    fn flag_table() {
        let ok: &[&[&str]] = &[
            &[],
            &["--rm"],
            &["--rm", "--", "sh", "-c", "exit 7"],
            &["-d", "--name", "dev", "--nat"],
            &[
                "--name", "dev", "--image", "debian", "--vcpu", "2", "--memory", "1024", "--",
                "true",
            ],
        ];
        for a in ok {
            let c = parse(a).unwrap_or_else(|e| panic!("{a:?}: {}", e.output));
            check(&c).unwrap_or_else(|e| panic!("{a:?}: {e}"));
        }
        let c = parse(&["--rm", "--", "sh", "-c", "exit 7"]).unwrap();
        assert_eq!(c.command, ["sh", "-c", "exit 7"]);
        assert!(c.rm && !c.detach);
        let usage: &[(&[&str], &str)] = &[
            (&["-d", "--rm"], "contradict"),
            (&["-d", "--", "true"], "cannot run a command"),
            (&["--name", "Bad_Name"], "names are"),
            (&["--vcpu", "0"], "vcpu"),
            (&["--memory", "1"], "memory"),
        ];
        for (a, want) in usage {
            let e = check(&parse(a).unwrap()).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{a:?}");
            assert!(e.to_string().contains(want), "{a:?}: {e}");
        }
    }
}
