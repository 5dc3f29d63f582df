//! `banger ssh-config [--install|--uninstall]`: plain `ssh NAME.vm` through banger's generated
//! ssh config, included from the user's `~/.ssh/config` inside a fence banger can find again.
//!
//! The fence editing is [`crate::ssh::include`]'s; this module picks the user's file (from
//! `$HOME`, relocated under the layout's root like every path) and reports what happened.

use std::path::PathBuf;

use argh::{ArgsInfo, FromArgs};

use crate::error::{Error, Result};
use crate::layout::Layout;
use crate::ssh::include::{self, Outcome};

#[derive(FromArgs, ArgsInfo)]
/// Let plain `ssh NAME.vm` reach VMs: show, install or remove the Include of banger's ssh config.
#[argh(
    subcommand,
    name = "ssh-config",
    example = "See what would be added to ~/.ssh/config:\n  banger ssh-config",
    example = "Add it (idempotent), then use plain ssh, scp, rsync or your editor's remote mode:\n  banger ssh-config --install\n  ssh dev.vm",
    example = "Take it out again (your own lines stay as they are):\n  banger ssh-config --uninstall",
    note = "The daemon keeps /var/lib/banger/ssh/config with a `Host NAME.vm` block per VM (address, user root, banger's key and known_hosts, strict host key checking). --install puts a fenced Include at the top of ~/.ssh/config (creating it 0600 if missing); a symlinked ~/.ssh/config is refused."
)]
pub struct SshConfigCmd {
    /// add the Include to ~/.ssh/config
    #[argh(switch)]
    install: bool,
    /// remove exactly banger's fenced lines from ~/.ssh/config
    #[argh(switch)]
    uninstall: bool,
}

fn user_config(layout: &Layout) -> Result<PathBuf> {
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
        .ok_or_else(|| {
            Error::new("finding your ~/.ssh/config", "HOME is not set")
                .hint("run it as yourself, with HOME set")
        })?;
    if !home.is_absolute() {
        return Err(Error::new(
            "finding your ~/.ssh/config",
            format!("HOME ({}) is not an absolute path", home.display()),
        ));
    }
    Ok(layout.user_ssh_config(&home))
}

/// `banger ssh-config`.
pub fn run(c: SshConfigCmd) -> Result<i32> {
    if c.install && c.uninstall {
        return Err(Error::usage(
            "banger ssh-config",
            "--install and --uninstall exclude each other",
        ));
    }
    let layout = Layout::from_env();
    let config = user_config(&layout)?;
    let generated = layout.ssh_config();
    if c.install {
        match include::install(&config, &generated)? {
            Outcome::AlreadyInstalled => {
                println!("already installed at the top of {}", config.display())
            }
            _ => println!(
                "added banger's Include at the top of {}; now `ssh NAME.vm` reaches VM NAME",
                config.display()
            ),
        }
        return Ok(0);
    }
    if c.uninstall {
        match include::uninstall(&config)? {
            Outcome::Removed => println!("removed banger's lines from {}", config.display()),
            _ => println!(
                "nothing to remove: {} has no banger lines",
                config.display()
            ),
        }
        return Ok(0);
    }
    let installed = include::is_installed(&config)?;
    println!(
        "banger's ssh config: {} (one `Host NAME.vm` block per VM, kept by the daemon)",
        generated.display()
    );
    if installed {
        println!("{} includes it: `ssh NAME.vm` works.", config.display());
    } else {
        println!(
            "`banger ssh-config --install` would add these lines at the top of {}:\n",
            config.display()
        );
        print!("{}", include::fence(&generated)?);
    }
    Ok(0)
}
