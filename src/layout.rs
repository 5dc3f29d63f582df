//! Every host path banger touches, derived from one root.
//!
//! Production uses `/`; tests and the smoke suite set `BANGER_ROOT` (or build a [`Layout`] under a
//! temp dir) and the very same code runs without touching `/usr/local`, `/etc` or `/var`.
//! No other module may spell a host path: ask the `Layout`.

use std::path::{Path, PathBuf};

/// Environment variable that relocates the whole layout (tests, smoke suite).
pub const ROOT_ENV: &str = "BANGER_ROOT";

/// Names of the installed links in `/usr/local/bin`.
pub const LINK_NAMES: [&str; 3] = ["banger", "bangerd", "bangerd-root"];

/// Unit name of the owner daemon.
pub const DAEMON_UNIT: &str = "bangerd.service";
/// Unit name of the root helper.
pub const HELPER_UNIT: &str = "bangerd-root.service";

/// The host layout: one root, every path below it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    root: PathBuf,
}

impl Layout {
    /// The production layout rooted at `/`.
    pub fn system() -> Self {
        Layout {
            root: PathBuf::from("/"),
        }
    }

    /// A layout rooted at `root` (tests).
    pub fn under(root: impl Into<PathBuf>) -> Self {
        Layout { root: root.into() }
    }

    /// `BANGER_ROOT` if set and non-empty, else the system layout.
    pub fn from_env() -> Self {
        match std::env::var_os(ROOT_ENV) {
            Some(r) if !r.is_empty() => Layout::under(PathBuf::from(r)),
            _ => Layout::system(),
        }
    }

    /// True when this is the real `/` layout.
    pub fn is_system(&self) -> bool {
        self.root == Path::new("/")
    }

    /// The root every path hangs from.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn at(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    /// `/usr/local/lib/banger`: holds the one real binary.
    pub fn lib_dir(&self) -> PathBuf {
        self.at("usr/local/lib/banger")
    }
    /// `/usr/local/lib/banger/banger`: the real file the links point at.
    pub fn binary(&self) -> PathBuf {
        self.lib_dir().join("banger")
    }
    /// `/usr/local/lib/banger/banger.previous`: the one backup kept during an update.
    pub fn binary_previous(&self) -> PathBuf {
        self.lib_dir().join("banger.previous")
    }
    /// `/usr/local/bin`.
    pub fn bin_dir(&self) -> PathBuf {
        self.at("usr/local/bin")
    }
    /// `/usr/local/bin/<name>`.
    pub fn link(&self, name: &str) -> PathBuf {
        self.bin_dir().join(name)
    }

    /// `/etc/banger`.
    pub fn etc_dir(&self) -> PathBuf {
        self.at("etc/banger")
    }
    /// `/etc/banger/install.toml`.
    pub fn install_toml(&self) -> PathBuf {
        self.etc_dir().join("install.toml")
    }
    /// `/etc/banger/config.toml` (optional daemon config).
    pub fn config_toml(&self) -> PathBuf {
        self.etc_dir().join("config.toml")
    }

    /// `/etc/apt`: read by `image build` for the mirror this host already uses.
    pub fn apt_dir(&self) -> PathBuf {
        self.at("etc/apt")
    }

    /// `/var/lib/banger`: state owned by the owner user.
    pub fn state_dir(&self) -> PathBuf {
        self.at("var/lib/banger")
    }
    /// `/var/lib/banger/state.db`.
    pub fn state_db(&self) -> PathBuf {
        self.state_dir().join("state.db")
    }
    /// `/var/lib/banger/images`.
    pub fn images_dir(&self) -> PathBuf {
        self.state_dir().join("images")
    }
    /// `/var/lib/banger/kernels`.
    pub fn kernels_dir(&self) -> PathBuf {
        self.state_dir().join("kernels")
    }
    /// `/var/lib/banger/vms`.
    pub fn vms_dir(&self) -> PathBuf {
        self.state_dir().join("vms")
    }
    /// `/var/lib/banger/vms/<id>`.
    pub fn vm_dir(&self, id: &str) -> PathBuf {
        self.vms_dir().join(id)
    }

    /// `/var/lib/banger/snapshots`.
    pub fn snapshots_dir(&self) -> PathBuf {
        self.state_dir().join("snapshots")
    }
    /// `/var/lib/banger/snapshots/<id>`: one snapshot's vmstate, memory and disk clone.
    pub fn snapshot_dir(&self, id: &str) -> PathBuf {
        self.snapshots_dir().join(id)
    }

    /// `/var/lib/banger/ssh`: banger's own SSH material (0700, the owner's).
    pub fn ssh_dir(&self) -> PathBuf {
        self.state_dir().join("ssh")
    }
    /// `/var/lib/banger/ssh/id_ed25519`: the install's one SSH key (OpenSSH format, 0600).
    pub fn ssh_key(&self) -> PathBuf {
        self.ssh_dir().join("id_ed25519")
    }
    /// `/var/lib/banger/ssh/id_ed25519.pub`: its public half.
    pub fn ssh_key_pub(&self) -> PathBuf {
        self.ssh_dir().join("id_ed25519.pub")
    }
    /// `/var/lib/banger/ssh/known_hosts`: guests' pinned host keys (never the user's own file).
    pub fn ssh_known_hosts(&self) -> PathBuf {
        self.ssh_dir().join("known_hosts")
    }
    /// `/var/lib/banger/ssh/config`: the daemon's generated `Host <name>.vm` blocks.
    pub fn ssh_config(&self) -> PathBuf {
        self.ssh_dir().join("config")
    }
    /// `<home>/.ssh/config` of a user whose home is `home` (an absolute path such as
    /// `/home/alice`), relocated under the root like every other path.
    pub fn user_ssh_config(&self, home: &Path) -> PathBuf {
        let rel = home.strip_prefix("/").unwrap_or(home);
        self.root.join(rel).join(".ssh").join("config")
    }

    /// Where bash-completion looks for a command's script (`/usr/share/bash-completion/completions`).
    pub fn bash_completion_dir(&self) -> PathBuf {
        self.at("usr/share/bash-completion/completions")
    }
    /// zsh's directory for packaged completion functions (`/usr/share/zsh/vendor-completions`).
    pub fn zsh_completion_dir(&self) -> PathBuf {
        self.at("usr/share/zsh/vendor-completions")
    }
    /// fish's directory for packaged completions (`/usr/share/fish/vendor_completions.d`).
    pub fn fish_completion_dir(&self) -> PathBuf {
        self.at("usr/share/fish/vendor_completions.d")
    }

    /// `/var/cache/banger`.
    pub fn cache_dir(&self) -> PathBuf {
        self.at("var/cache/banger")
    }
    /// `/var/cache/banger/updates`: update staging and journal.
    pub fn updates_dir(&self) -> PathBuf {
        self.cache_dir().join("updates")
    }
    /// `/var/cache/banger/debootstrap`: root's cache of debootstrapped trees for `image build`.
    pub fn debootstrap_cache_dir(&self) -> PathBuf {
        self.cache_dir().join("debootstrap")
    }
    /// `/var/cache/banger/image-build`: scratch space of running `image build`s.
    pub fn image_build_dir(&self) -> PathBuf {
        self.cache_dir().join("image-build")
    }

    /// `/run/banger`: the daemon's runtime dir.
    pub fn run_dir(&self) -> PathBuf {
        self.at("run/banger")
    }
    /// `/run/banger/bangerd.sock`.
    pub fn daemon_socket(&self) -> PathBuf {
        self.run_dir().join("bangerd.sock")
    }
    /// `/run/banger-root`: the helper's runtime dir (0711 root).
    pub fn helper_run_dir(&self) -> PathBuf {
        self.at("run/banger-root")
    }
    /// `/run/banger-root/bangerd-root.sock`.
    pub fn helper_socket(&self) -> PathBuf {
        self.helper_run_dir().join("bangerd-root.sock")
    }

    /// `/dev/log`: the system log's datagram socket (journald listens there).
    pub fn syslog_socket(&self) -> PathBuf {
        self.at("dev/log")
    }

    /// `/run/systemd/system`: exists (a directory) exactly when systemd is PID 1 (`sd_booted(3)`).
    pub fn systemd_booted_marker(&self) -> PathBuf {
        self.at("run/systemd/system")
    }
    /// `/etc/systemd/system`.
    pub fn unit_dir(&self) -> PathBuf {
        self.at("etc/systemd/system")
    }
    /// `/etc/systemd/system/<unit>`.
    pub fn unit_file(&self, unit: &str) -> PathBuf {
        self.unit_dir().join(unit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_paths_match_design() {
        let l = Layout::system();
        assert!(l.is_system());
        assert_eq!(l.binary(), Path::new("/usr/local/lib/banger/banger"));
        assert_eq!(
            l.binary_previous(),
            Path::new("/usr/local/lib/banger/banger.previous")
        );
        assert_eq!(l.link("bangerd"), Path::new("/usr/local/bin/bangerd"));
        assert_eq!(l.install_toml(), Path::new("/etc/banger/install.toml"));
        assert_eq!(l.state_db(), Path::new("/var/lib/banger/state.db"));
        assert_eq!(l.ssh_key(), Path::new("/var/lib/banger/ssh/id_ed25519"));
        assert_eq!(
            l.ssh_known_hosts(),
            Path::new("/var/lib/banger/ssh/known_hosts")
        );
        assert_eq!(l.ssh_config(), Path::new("/var/lib/banger/ssh/config"));
        assert_eq!(
            l.user_ssh_config(Path::new("/home/alice")),
            Path::new("/home/alice/.ssh/config")
        );
        assert_eq!(l.updates_dir(), Path::new("/var/cache/banger/updates"));
        assert_eq!(
            l.debootstrap_cache_dir(),
            Path::new("/var/cache/banger/debootstrap")
        );
        assert_eq!(
            l.image_build_dir(),
            Path::new("/var/cache/banger/image-build")
        );
        assert_eq!(l.daemon_socket(), Path::new("/run/banger/bangerd.sock"));
        assert_eq!(
            l.helper_socket(),
            Path::new("/run/banger-root/bangerd-root.sock")
        );
        assert_eq!(
            l.unit_file(DAEMON_UNIT),
            Path::new("/etc/systemd/system/bangerd.service")
        );
    }

    #[test]
    fn temp_root_relocates_everything() {
        let l = Layout::under("/tmp/x");
        assert!(!l.is_system());
        assert_eq!(l.state_db(), Path::new("/tmp/x/var/lib/banger/state.db"));
        assert_eq!(l.vm_dir("ab"), Path::new("/tmp/x/var/lib/banger/vms/ab"));
        assert_eq!(
            l.user_ssh_config(Path::new("/home/alice")),
            Path::new("/tmp/x/home/alice/.ssh/config")
        );
    }
}
