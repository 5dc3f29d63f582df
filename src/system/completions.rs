//! Shell completion for the installed `banger`: a small loader per shell, written where that
//! shell looks for packaged completions — only for shells whose directory exists on this host.
//!
//! Each loader asks the installed binary for its script when the shell first completes `banger`
//! (`banger completion <shell>`), so completion always matches the binary, also after a
//! `banger update` that added commands. Owns writing and removing exactly those three files;
//! it never creates a shell's directory.

use std::path::PathBuf;

use super::fsutil;
use crate::error::Result;
use crate::layout::Layout;

/// (file, contents) for every shell, given the installed link.
fn loaders(layout: &Layout) -> Vec<(PathBuf, String)> {
    let bin = layout.link("banger");
    let bin = bin.display();
    vec![
        (
            layout.bash_completion_dir().join("banger"),
            format!(
                "# banger's bash completion, from the installed binary (always its own commands).\n\
                 eval \"$('{bin}' completion bash 2>/dev/null)\"\n"
            ),
        ),
        (
            layout.zsh_completion_dir().join("_banger"),
            format!(
                "#compdef banger\n\
                 # banger's zsh completion, from the installed binary (always its own commands).\n\
                 eval \"$('{bin}' completion zsh 2>/dev/null)\"\n"
            ),
        ),
        (
            layout.fish_completion_dir().join("banger.fish"),
            format!(
                "# banger's fish completion, from the installed binary (always its own commands).\n\
                 '{bin}' completion fish 2>/dev/null | source\n"
            ),
        ),
    ]
}

/// Writes each loader whose shell directory exists (0644) unless it is already in place; returns
/// the files written.
pub fn install(layout: &Layout) -> Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    for (path, text) in loaders(layout) {
        let Some(dir) = path.parent() else { continue };
        if !dir.is_dir() {
            continue;
        }
        if fsutil::read_if_exists(&path)?.as_deref() == Some(text.as_bytes()) {
            continue;
        }
        fsutil::write_atomic(&path, text.as_bytes(), 0o644)?;
        written.push(path);
    }
    Ok(written)
}

/// Removes the loaders; returns the files removed.
pub fn uninstall(layout: &Layout) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    for (path, _) in loaders(layout) {
        if fsutil::remove_file_if_exists(&path)? {
            removed.push(path);
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::system::testutil::TempDir;
    use std::fs;

    #[test]
    fn only_existing_shell_dirs_get_a_loader_idempotently() {
        let t = TempDir::new();
        let l = Layout::under(t.path());
        assert!(install(&l).unwrap().is_empty(), "no shell dirs: nothing");
        assert!(!l.bash_completion_dir().exists(), "a shell dir was created");
        fs::create_dir_all(l.bash_completion_dir()).unwrap();
        fs::create_dir_all(l.fish_completion_dir()).unwrap();
        let w = install(&l).unwrap();
        assert_eq!(
            w,
            [
                l.bash_completion_dir().join("banger"),
                l.fish_completion_dir().join("banger.fish")
            ]
        );
        assert!(install(&l).unwrap().is_empty(), "second install rewrote");
        let bash = fs::read_to_string(&w[0]).unwrap();
        assert!(bash.contains(&format!("'{}' completion bash", l.link("banger").display())));
        assert_eq!(uninstall(&l).unwrap(), w);
        assert!(uninstall(&l).unwrap().is_empty());
        assert!(
            l.bash_completion_dir().is_dir(),
            "the shell's dir must stay"
        );
    }

    /// The bash loader, sourced by a real bash with a `banger` that prints a completion function,
    /// registers it.
    #[test]
    fn bash_loader_registers_the_binarys_completion() {
        if !std::path::Path::new("/bin/bash").exists() {
            eprintln!("SKIP: bash_loader_registers_the_binarys_completion: no bash");
            return;
        }
        let t = TempDir::new();
        let l = Layout::under(t.path());
        fs::create_dir_all(l.bash_completion_dir()).unwrap();
        fs::create_dir_all(l.bin_dir()).unwrap();
        let fake = l.link("banger");
        fs::write(
            &fake,
            "#!/bin/sh\n[ \"$1 $2\" = 'completion bash' ] && echo '_banger() { :; }; complete -F _banger banger'\n",
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&fake, fs::Permissions::from_mode(0o755)).unwrap();
        install(&l).unwrap();
        let out = std::process::Command::new("/bin/bash")
            .arg("-c")
            .arg(format!(
                "source '{}' && complete -p banger",
                l.bash_completion_dir().join("banger").display()
            ))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains("-F _banger"));
    }
}
