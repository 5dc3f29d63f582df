//! The daemon's side of one boot: the Firecracker API conversation (machine, kernel, disk,
//! vsock, start) and waiting for the guest to say it is ready.
//!
//! Knows nothing about records or locks: `vms` decides when to boot and what a failure means. It
//! never launches or signals a process itself (that is the root helper's).

use super::shared::{bad, failed};
use crate::agent;
use crate::error::Error;
use crate::rpc::RpcError;
use crate::store::{Image, Kernel, Vm};
use crate::vmm::api::Client;
use crate::vmm::identity::{self, Identity, Liveness};
use crate::vmm::launch::VmFiles;
use crate::vmm::models::{
    BootSource, Drive, MachineConfiguration, NetworkInterface, SerialDevice, Vsock,
};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long a guest has to become ready after InstanceStart.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Environment variable that lengthens [`READY_TIMEOUT`] (whole seconds): a guest emulated under
/// TCG on a busy machine (the stand-in's engine, DESIGN §13) can take minutes to boot.
pub const READY_TIMEOUT_ENV: &str = "BANGER_READY_TIMEOUT_S";

fn ready_timeout() -> Duration {
    std::env::var(READY_TIMEOUT_ENV)
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .filter(|&s| s > 0)
        .map(Duration::from_secs)
        .unwrap_or(READY_TIMEOUT)
}
/// How long the VMM has to open its API socket.
const API_TIMEOUT: Duration = Duration::from_secs(10);
/// Kernel command line for banger guests.
pub const BOOT_ARGS: &str = "console=ttyS0 reboot=k panic=1 pci=off";
/// Guest CID of every VM's vsock device (each VM has its own device and host socket).
const GUEST_CID: u32 = 3;

/// A guest's network as the VMM and the guest kernel see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestNet {
    /// Host tap (made by the helper's `priv.net_up`).
    pub tap: String,
    /// Guest MAC.
    pub mac: String,
    /// Kernel `ip=` argument: address, gateway, netmask, hostname.
    pub ip_arg: String,
}

/// The guest kernel's command line: banger's base arguments, the static address and the guest
/// agent's arguments (`guest`, from [`super::ssh::guest_args`]; empty for none).
pub fn boot_args(net: &GuestNet, guest: &str) -> String {
    if guest.is_empty() {
        format!("{BOOT_ARGS} {}", net.ip_arg)
    } else {
        format!("{BOOT_ARGS} {} {guest}", net.ip_arg)
    }
}

/// The identity the helper recorded for the VMM it just launched.
pub fn read_identity(files: &VmFiles) -> Result<Identity, RpcError> {
    match identity::read_handles(&files.handles).map_err(failed)? {
        Some(h) => Ok(h.identity),
        None => Err(failed(Error::new(
            "launching the VMM",
            format!("the helper recorded no {}", files.handles.display()),
        ))),
    }
}

fn api_error(vm: &Vm) -> impl Fn(crate::vmm::api::ApiError) -> RpcError + '_ {
    move |e| {
        failed(Error::new(
            format!("configuring VM `{}` through Firecracker", vm.name),
            e,
        ))
    }
}

/// Configures the launched VMM's machine, kernel (with the `ip=` argument), serial console
/// (`serial`: its rate limiter, see [`super::console_log`]), root disk and vsock through its API.
/// Needs nothing from the network but its address, so it runs while the helper is still making
/// the tap.
pub fn configure_devices(
    vm: &Vm,
    kernel: &Kernel,
    files: &VmFiles,
    net: &GuestNet,
    guest_args: &str,
    serial: &SerialDevice,
) -> Result<(), RpcError> {
    let api = api_error(vm);
    crate::vmm::api::wait_for_socket(&files.api_socket, API_TIMEOUT).map_err(failed)?;
    let c = Client::new(&files.api_socket);
    let vcpu = u8::try_from(vm.vcpu).map_err(|_| {
        bad(format!(
            "VM `{}` has {} vCPUs (at most 32)",
            vm.name, vm.vcpu
        ))
    })?;
    c.put_machine_config(&MachineConfiguration {
        vcpu_count: vcpu,
        mem_size_mib: u64::from(vm.memory_mib),
        smt: None,
        track_dirty_pages: None,
        cpu_template: None,
        huge_pages: None,
    })
    .map_err(&api)?;
    c.put_boot_source(&BootSource {
        kernel_image_path: PathBuf::from(&kernel.path),
        boot_args: Some(boot_args(net, guest_args)),
        initrd_path: None,
    })
    .map_err(&api)?;
    // The guest's console stays on the VMM's stdout (console.log, opened O_APPEND by the helper);
    // Firecracker drops what the guest writes beyond the rate limiter.
    c.put_serial(serial).map_err(&api)?;
    c.put_drive(&Drive {
        drive_id: "rootfs".into(),
        partuuid: None,
        is_root_device: true,
        cache_type: None,
        is_read_only: Some(false),
        path_on_host: Some(files.dir.join("rootfs.ext4")),
        rate_limiter: None,
        io_engine: None,
        socket: None,
    })
    .map_err(&api)?;
    c.put_vsock(&Vsock {
        guest_cid: GUEST_CID,
        uds_path: files.vsock_uds.clone(),
        vsock_id: None,
    })
    .map_err(&api)?;
    Ok(())
}

/// Gives the VMM `eth0` on the VM's tap (which must exist by now: the VMM opens it on this call)
/// and starts the instance.
pub fn attach_net_and_start(vm: &Vm, files: &VmFiles, net: &GuestNet) -> Result<(), RpcError> {
    let api = api_error(vm);
    let c = Client::new(&files.api_socket);
    c.put_network_interface(&NetworkInterface {
        iface_id: "eth0".into(),
        host_dev_name: net.tap.clone(),
        guest_mac: Some(net.mac.clone()),
        mtu: None,
        rx_rate_limiter: None,
        tx_rate_limiter: None,
    })
    .map_err(&api)?;
    c.instance_start().map_err(&api)?;
    Ok(())
}

/// Waits for the guest: its agent over vsock, or the image's console line. Returns its boot_id.
pub fn wait_ready(
    image: &Image,
    files: &VmFiles,
    ident: &Identity,
    proc_root: &Path,
    console_offset: u64,
) -> Result<String, RpcError> {
    let start = Instant::now();
    let mut last = String::from("no answer yet");
    let timeout = ready_timeout();
    while start.elapsed() < timeout {
        if let Liveness::Gone(why) = identity::classify(ident, proc_root) {
            return Err(failed(Error::new(
                "waiting for the guest",
                format!("the VMM exited ({why})"),
            )));
        }
        match &image.ready_pattern {
            Some(prefix) => {
                if let Some(id) = console_ready(&files.console_log, console_offset, prefix) {
                    return Ok(id);
                }
                last = format!("no console line starting with {prefix:?} yet");
            }
            None => match agent::agent_call(&files.vsock_uds, agent::AGENT_VSOCK_PORT, "boot_id") {
                Ok(v) => {
                    if let Some(id) = v.get("boot_id").and_then(Value::as_str) {
                        return Ok(id.to_string());
                    }
                    last = format!("agent answered without a boot_id: {v}");
                }
                Err(e) => last = e.to_string(),
            },
        }
        // A guest is usually ready within tens of milliseconds: look often at first.
        let pause = if start.elapsed() < Duration::from_millis(300) {
            2
        } else {
            20
        };
        std::thread::sleep(Duration::from_millis(pause));
    }
    Err(failed(
        Error::new(
            format!(
                "waiting {}s for the guest to become ready",
                timeout.as_secs()
            ),
            last,
        )
        .hint("see `banger vm logs` for the guest console"),
    ))
}

/// The last `lines` lines of the console, joined with ` | ` (for error messages).
pub fn console_tail(files: &VmFiles, lines: usize) -> String {
    let text = std::fs::read(&files.console_log).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join(" | ")
}

/// Scans `console` from `offset` for a whole line containing `prefix` followed by a boot id
/// (1–64 hex digits and dashes); returns the id. A line still being written (no newline yet) is
/// not read, and text that is not a boot id never counts: a split or garbled line is no answer.
fn console_ready(console: &Path, offset: u64, prefix: &str) -> Option<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(console).ok()?;
    f.seek(SeekFrom::Start(offset)).ok()?;
    let mut buf = Vec::new();
    f.take(4 << 20).read_to_end(&mut buf).ok()?;
    let whole = &buf[..buf.iter().rposition(|&b| b == b'\n')?];
    String::from_utf8_lossy(whole)
        .lines()
        .find_map(|l| agent::parse_ready_line_with(l, prefix))
}
#[cfg(test)]
mod tests {
    use super::{boot_args, console_ready, GuestNet};

    #[test]
    fn boot_args_carry_the_static_address() {
        let subnet = crate::net::Subnet::parse("172.30.0.0/24").unwrap();
        let net = GuestNet {
            tap: "bgr-0123456789".into(),
            mac: "02:01:23:45:67:89".into(),
            ip_arg: crate::net::kernel_ip_arg("172.30.0.7".parse().unwrap(), &subnet, "dev"),
        };
        assert_eq!(
            boot_args(&net, ""),
            "console=ttyS0 reboot=k panic=1 pci=off ip=172.30.0.7::172.30.0.1:255.255.255.0:dev:eth0:off"
        );
        assert_eq!(
            boot_args(&net, "banger.name=dev banger.key=c3No"),
            "console=ttyS0 reboot=k panic=1 pci=off ip=172.30.0.7::172.30.0.1:255.255.255.0:dev:eth0:off banger.name=dev banger.key=c3No"
        );
    }

    #[test]
    fn console_ready_table() {
        let dir = std::env::temp_dir().join(format!("banger-console-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("console.log");
        let prefix = "banger-guest: ready boot_id=";
        let cases: &[(&str, Option<&str>)] = &[
            ("banger-guest: ready boot_id=0123abcd\n", Some("0123abcd")),
            (
                "[ 1.0] banger-guest: ready boot_id=0123-abcd\r\n",
                Some("0123-abcd"),
            ),
            ("noise\nbanger-guest: ready boot_id=ff\nmore\n", Some("ff")),
            // Still being written: not yet.
            ("banger-guest: ready boot_id=0000082", None),
            // A VMM log line split the guest's line: not a boot id.
            (
                "banger-guest: rea2026-11-27T11:37:27 Status code: 204 | dy boot_id=0000\n",
                None,
            ),
            (
                "banger-guest: ready boot_id=2026-11-27T11:42:03.145 Status code: 204\n",
                None,
            ),
            ("banger-guest: ready boot_id=\n", None),
            ("banger-guest: ready boot_id=xyz\n", None),
            ("", None),
        ];
        for (text, want) in cases {
            std::fs::write(&p, text).unwrap();
            assert_eq!(console_ready(&p, 0, prefix).as_deref(), *want, "{text:?}");
        }
        // Only what the current boot wrote counts.
        std::fs::write(&p, "banger-guest: ready boot_id=aa\n").unwrap();
        assert_eq!(console_ready(&p, 31, prefix), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
