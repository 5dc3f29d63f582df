//! Which VMM the VM tests run against: `BANGER_TEST_FIRECRACKER` (a real Firecracker) or the
//! stand-in built from the workspace.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// Environment variable naming a real Firecracker binary.
pub const ENV: &str = "BANGER_TEST_FIRECRACKER";

/// Which VMM binary to test, and whether it is banger's stand-in; `Err` is the SKIP reason.
pub fn find_vmm() -> Result<(PathBuf, bool), String> {
    let path = match std::env::var_os(ENV) {
        Some(p) if !p.is_empty() => {
            let p = PathBuf::from(p);
            // Asked for explicitly: a wrong path is a broken setup, not a reason to skip.
            assert!(p.is_file(), "{ENV}={} is not a file", p.display());
            if let Err(e) = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/kvm")
            {
                return Err(format!("{ENV} is set but /dev/kvm is not usable here: {e}"));
            }
            p
        }
        _ => build_standin()?,
    };
    if !path.is_file() {
        return Err(format!("stand-in VMM {} does not exist", path.display()));
    }
    let help = Command::new(&path)
        .arg("--help")
        .output()
        .map_err(|e| format!("running {} --help: {e}", path.display()))?;
    let standin = String::from_utf8_lossy(&help.stdout).contains("banger stand-in");
    Ok((path, standin))
}

/// Builds the stand-in (`cargo build -p banger-fc-standin`, a no-op when fresh; once per test
/// binary) and returns its path, next to the banger binary this test was built with.
fn build_standin() -> Result<PathBuf, String> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let mut cmd = Command::new(&cargo);
            cmd.args(["build", "-q", "-p", "banger-fc-standin"])
                .current_dir(env!("CARGO_MANIFEST_DIR"));
            // Variables cargo set for this test would look like changed build inputs to some
            // build scripts (ring watches CARGO_MANIFEST_DIR and OUT_DIR) and force a rebuild
            // every time.
            cmd.env_remove("OUT_DIR");
            for (k, _) in std::env::vars_os() {
                let k = k.to_string_lossy();
                if k.starts_with("CARGO_")
                    && !k.starts_with("CARGO_HOME")
                    && !k.starts_with("CARGO_TARGET_DIR")
                {
                    cmd.env_remove(&*k);
                }
            }
            let out = cmd
                .output()
                .map_err(|e| format!("stand-in VMM not built and cargo could not run: {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "stand-in VMM did not build: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
            let bin_dir = Path::new(env!("CARGO_BIN_EXE_banger"))
                .parent()
                .ok_or("no directory for the banger binary")?;
            Ok(bin_dir.join("firecracker"))
        })
        .clone()
}

/// Whether `vmm` opens the tap it is given at `PUT /network-interfaces` as Firecracker does
/// (a real Firecracker always does). A stand-in is asked in namespace `ns`: one that opens taps
/// refuses a tap that does not exist; an older one accepts any valid name. Nothing is created.
pub fn opens_taps(vmm: &Path, standin: bool, ns: &super::NetNs, dir: &Path) -> bool {
    use banger::vmm::api::{wait_for_socket, Client};
    use banger::vmm::models::NetworkInterface;
    if !standin {
        return true;
    }
    let sock = dir.join("tap-probe.sock");
    let _ = std::fs::remove_file(&sock);
    let mut child = Command::new("ip")
        .args(["netns", "exec", &ns.name])
        .arg(vmm)
        .arg("--api-sock")
        .arg(&sock)
        .args(["--id", "tap-probe"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawning the stand-in");
    wait_for_socket(&sock, std::time::Duration::from_secs(10)).expect("stand-in API socket");
    let r = Client::new(&sock).put_network_interface(&NetworkInterface {
        iface_id: "eth0".into(),
        host_dev_name: "bgr-no-such".into(),
        guest_mac: None,
        mtu: None,
        rx_rate_limiter: None,
        tx_rate_limiter: None,
    });
    let _ = child.kill();
    let _ = child.wait();
    r.is_err()
}
