//! The stand-in's VM: configuration state and the API's rules. The only socket it touches is the
//! vsock device's host-side listener, bound at `PUT /vsock` as Firecracker binds it.
//!
//! Every request goes through [`Machine::handle`], which parses bodies with banger's own API models
//! (deny-unknown-fields, exact integer widths, like Firecracker's serde types) and then applies the
//! rules Firecracker applies: ids in paths, files that must exist, value ranges, pre-boot-only
//! configuration, actions in the right state. Fault messages are Firecracker's where we know them.
//! A network interface opens its tap at PUT, as Firecracker does, and holds it while the VM lives
//! (see [`crate::tap`]).

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use banger::vmm::models::{
    ActionType, BootSource, Drive, FirecrackerVersion, HugePages, InstanceActionInfo, InstanceInfo,
    InstanceState, Logger, MachineConfiguration, Metrics, NetworkInterface, SerialDevice, Vsock,
};
use serde::de::DeserializeOwned;

use crate::tap::Tap;

/// The Firecracker version the stand-in impersonates.
pub const VERSION: &str = "1.16.1";

/// Firecracker's default request payload limit (`--http-api-max-payload-size`).
pub const MAX_PAYLOAD: usize = 51200;

pub(crate) const POST_BOOT: &str =
    "The requested operation is not supported after starting the microVM.";
pub(crate) const PRE_BOOT: &str =
    "The requested operation is not supported before starting the microVM.";

/// What the server must do after answering.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum After {
    /// Nothing.
    Nothing,
    /// The guest booted: print the console line, serve vsock.
    Booted,
    /// The guest rebooted (Ctrl+Alt+Del): exit 0.
    Exit,
    /// A snapshot was loaded: serve vsock with the recorded boot id (no console line).
    Restored,
    /// A snapshot load failed: exit 1 after answering, as Firecracker does.
    ExitFailed,
}

/// An HTTP answer: status and optional JSON body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// Status code.
    pub status: u16,
    /// JSON body, if any.
    pub body: Option<String>,
}

impl Answer {
    pub(crate) fn no_content() -> Self {
        Answer {
            status: 204,
            body: None,
        }
    }

    fn json<T: serde::Serialize>(v: &T) -> Self {
        match serde_json::to_string(v) {
            Ok(body) => Answer {
                status: 200,
                body: Some(body),
            },
            Err(e) => Answer::fault(500, format!("encoding the answer: {e}")),
        }
    }

    /// A fault with Firecracker's body shape.
    pub fn fault(status: u16, msg: impl Into<String>) -> Self {
        Answer {
            status,
            body: Some(serde_json::json!({ "fault_message": msg.into() }).to_string()),
        }
    }
}

/// The configured (and perhaps booted) VM.
#[derive(Debug)]
pub struct Machine {
    /// Instance id (`--id`).
    pub id: String,
    /// Boot source, once configured.
    pub boot_source: Option<BootSource>,
    /// Machine configuration (Firecracker's defaults until PUT).
    pub machine: MachineConfiguration,
    /// Block devices, in insertion order.
    pub drives: Vec<Drive>,
    /// Network interfaces and their open taps, in insertion order.
    pub nets: Vec<(NetworkInterface, Tap)>,
    /// The vsock device and its bound host-side listener, once configured.
    pub vsock: Option<(Vsock, UnixListener)>,
    /// Metrics file, once configured.
    pub metrics: Option<PathBuf>,
    /// The serial console's configuration (`PUT /serial`), once configured.
    pub serial: Option<SerialDevice>,
    /// Whether InstanceStart (or a snapshot load) succeeded.
    pub started: bool,
    /// Whether `PATCH /vm` Paused (or a load without `resume_vm`) stopped the vCPUs.
    pub paused: bool,
    /// Whether a boot-specific resource was configured (a snapshot load is refused then).
    pub boot_path: bool,
    /// The guest's boot id once booted (or restored).
    pub boot_id: Option<String>,
    /// The guest agent's instance id recorded by a snapshot this VM was restored from.
    pub instance_id: Option<String>,
    /// The fake guest agent's live instance id (changed by `reconfigure`), once it serves.
    pub agent_instance: Option<std::sync::Arc<std::sync::Mutex<String>>>,
}

type Reply = (Answer, After);

pub(crate) fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, Answer> {
    if body.is_empty() {
        return Err(Answer::fault(400, "Empty PUT request."));
    }
    serde_json::from_slice(body).map_err(|e| {
        Answer::fault(
            400,
            format!("An error occurred when deserializing the json body of a request: {e}."),
        )
    })
}

/// Firecracker's resource id rule.
fn checked_id(id: &str) -> Result<(), Answer> {
    if id.is_empty() {
        return Err(Answer::fault(400, "The ID cannot be empty."));
    }
    if id.len() > 64 || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(Answer::fault(
            400,
            "API Resource IDs can only contain alphanumeric characters and underscores.",
        ));
    }
    Ok(())
}

fn open_err(path: &Path, write: bool) -> Option<std::io::Error> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .open(path)
        .err()
}

fn valid_mac(mac: &str) -> bool {
    let parts: Vec<&str> = mac.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()))
}

impl Machine {
    /// A fresh, unconfigured VM named `id`.
    pub fn new(id: &str) -> Self {
        Machine {
            id: id.to_string(),
            boot_source: None,
            machine: MachineConfiguration {
                vcpu_count: 1,
                mem_size_mib: 128,
                smt: Some(false),
                track_dirty_pages: Some(false),
                cpu_template: None,
                huge_pages: Some(HugePages::None),
            },
            drives: Vec::new(),
            nets: Vec::new(),
            vsock: None,
            metrics: None,
            serial: None,
            started: false,
            paused: false,
            boot_path: false,
            boot_id: None,
            instance_id: None,
            agent_instance: None,
        }
    }

    fn state(&self) -> InstanceState {
        if self.started && self.paused {
            InstanceState::Paused
        } else if self.started {
            InstanceState::Running
        } else {
            InstanceState::NotStarted
        }
    }

    /// Answers one request. `path` is the request target (query strings are not used by the API).
    pub fn handle(&mut self, method: &str, path: &str, body: &[u8]) -> Reply {
        let invalid = || {
            (
                Answer::fault(
                    400,
                    format!("Invalid request method and/or path: {method} {path}."),
                ),
                After::Nothing,
            )
        };
        let trimmed = path.trim_start_matches('/').trim_end_matches('/');
        let segs: Vec<&str> = if trimmed.is_empty() {
            vec![]
        } else {
            trimmed.split('/').collect()
        };
        let r = match (method, segs.as_slice()) {
            ("GET", []) => Ok((
                Answer::json(&InstanceInfo {
                    app_name: "Firecracker".into(),
                    id: self.id.clone(),
                    state: self.state(),
                    vmm_version: VERSION.into(),
                }),
                After::Nothing,
            )),
            ("GET", ["version"]) => Ok((
                Answer::json(&FirecrackerVersion {
                    firecracker_version: VERSION.into(),
                }),
                After::Nothing,
            )),
            ("GET", ["machine-config"]) => Ok((Answer::json(&self.machine), After::Nothing)),
            ("PUT", ["actions"]) => self.put_action(body),
            ("PUT", ["boot-source"]) => parse(body).and_then(|b| self.put_boot_source(b)),
            ("PUT", ["machine-config"]) => parse(body).and_then(|b| self.put_machine_config(b)),
            ("PUT", ["drives", id]) => checked_id(id)
                .and_then(|_| parse(body))
                .and_then(|b| self.put_drive(id, b)),
            ("PUT", ["network-interfaces", id]) => checked_id(id)
                .and_then(|_| parse(body))
                .and_then(|b| self.put_net(id, b)),
            ("PUT", ["vsock"]) => parse(body).and_then(|b| self.put_vsock(b)),
            ("PUT", ["logger"]) => parse(body).and_then(|b| self.put_logger(b)),
            ("PUT", ["metrics"]) => parse(body).and_then(|b| self.put_metrics(b)),
            ("PUT", ["serial"]) => parse(body).and_then(|b| self.put_serial(b)),
            ("PATCH", ["vm"]) => self.patch_vm(body),
            ("PATCH", ["drives", id]) => checked_id(id).and_then(|_| self.patch_drive(id, body)),
            ("PUT", ["snapshot", "create"]) => self.create_snapshot(body),
            ("PUT", ["snapshot", "load"]) => self.load_snapshot(body),
            ("PATCH", ["network-interfaces", _] | ["machine-config"])
            | (
                "PUT" | "PATCH" | "GET",
                ["balloon" | "cpu-config" | "pmem" | "mmds" | "entropy" | "serial" | "hotplug", ..],
            )
            | ("GET", ["vm", "config"]) => Err(Answer::fault(
                400,
                format!(
                    "{method} {path} is valid Firecracker API but not served by the banger stand-in VMM"
                ),
            )),
            _ => return invalid(),
        };
        let boot_specific = matches!(
            segs.first().copied(),
            Some("boot-source" | "machine-config" | "drives" | "network-interfaces" | "vsock")
        );
        if method == "PUT" && boot_specific && matches!(&r, Ok((a, _)) if a.status == 204) {
            self.boot_path = true;
        }
        r.unwrap_or_else(|a| (a, After::Nothing))
    }

    fn pre_boot(&self) -> Result<(), Answer> {
        if self.started {
            Err(Answer::fault(400, POST_BOOT))
        } else {
            Ok(())
        }
    }

    fn put_action(&mut self, body: &[u8]) -> Result<Reply, Answer> {
        let a: InstanceActionInfo = parse(body)?;
        match a.action_type {
            ActionType::FlushMetrics if !self.started => Err(Answer::fault(
                400,
                "The requested operation is not supported before starting the microVM.",
            )),
            ActionType::FlushMetrics => {
                if let Some(p) = &self.metrics {
                    let line = format!(
                        "{{\"stand_in\":{{\"flushes\":1,\"running\":{}}}}}\n",
                        self.started
                    );
                    let w = std::fs::OpenOptions::new()
                        .append(true)
                        .open(p)
                        .and_then(|mut f| std::io::Write::write_all(&mut f, line.as_bytes()));
                    if let Err(e) = w {
                        return Err(Answer::fault(400, format!("Failed to write metrics: {e}")));
                    }
                }
                Ok((Answer::no_content(), After::Nothing))
            }
            ActionType::InstanceStart => {
                self.pre_boot()?;
                let Some(bs) = &self.boot_source else {
                    return Err(Answer::fault(
                        400,
                        "Cannot start microvm without kernel configuration.",
                    ));
                };
                let kernel_ok = std::fs::read(&bs.kernel_image_path)
                    .map(|k| k.len() > 64 && k.starts_with(b"\x7fELF") && k[4] == 2)
                    .unwrap_or(false);
                if !kernel_ok {
                    return Err(Answer::fault(
                        400,
                        "Cannot load kernel due to invalid memory configuration or invalid kernel image: \
                         the kernel is not a loadable ELF64 image",
                    ));
                }
                self.started = true;
                Ok((Answer::no_content(), After::Booted))
            }
            ActionType::SendCtrlAltDel => {
                if !self.started {
                    return Err(Answer::fault(400, PRE_BOOT));
                }
                Ok((Answer::no_content(), After::Exit))
            }
        }
    }

    fn put_boot_source(&mut self, b: BootSource) -> Result<Reply, Answer> {
        self.pre_boot()?;
        if let Some(e) = open_err(&b.kernel_image_path, false) {
            return Err(Answer::fault(
                400,
                format!("The kernel file cannot be opened: {e}"),
            ));
        }
        if let Some(initrd) = &b.initrd_path {
            if let Some(e) = open_err(initrd, false) {
                return Err(Answer::fault(
                    400,
                    format!("The initrd file cannot be opened due to invalid path or invalid permissions. {e}"),
                ));
            }
        }
        self.boot_source = Some(b);
        Ok((Answer::no_content(), After::Nothing))
    }

    fn put_machine_config(&mut self, m: MachineConfiguration) -> Result<Reply, Answer> {
        self.pre_boot()?;
        let smt = m.smt.unwrap_or(false);
        if m.vcpu_count == 0
            || m.vcpu_count > 32
            || (smt && m.vcpu_count > 1 && !m.vcpu_count.is_multiple_of(2))
        {
            return Err(Answer::fault(
                400,
                "Machine config error: The number of vCPUs must be greater than 0, less than 32 and must be 1 or an even number if SMT is enabled.",
            ));
        }
        if m.mem_size_mib == 0 {
            return Err(Answer::fault(400, "Machine config error: The memory size (MiB) is either 0, or not a multiple of the configured page size."));
        }
        if m.huge_pages == Some(HugePages::Hugetlbfs2M) && !m.mem_size_mib.is_multiple_of(2) {
            return Err(Answer::fault(
                400,
                "Machine config error: The memory size (MiB) is either 0, or not a multiple of the configured page size.",
            ));
        }
        self.machine = m;
        Ok((Answer::no_content(), After::Nothing))
    }

    fn put_drive(&mut self, path_id: &str, d: Drive) -> Result<Reply, Answer> {
        if d.drive_id != path_id {
            return Err(Answer::fault(
                400,
                "The id from the path does not match the id from the body!",
            ));
        }
        self.pre_boot()?;
        match (&d.path_on_host, &d.socket) {
            (Some(p), None) => {
                if let Some(e) = open_err(p, !d.is_read_only.unwrap_or(false)) {
                    return Err(Answer::fault(
                        400,
                        format!(
                            "Unable to create the virtio block device: Error manipulating the backing file: {e} {}",
                            p.display()
                        ),
                    ));
                }
            }
            (None, Some(_)) => {
                return Err(Answer::fault(
                    400,
                    "vhost-user-block drives are not served by the banger stand-in VMM",
                ))
            }
            _ => {
                return Err(Answer::fault(
                    400,
                    "Unable to create the block device: exactly one of path_on_host (virtio-block) and socket (vhost-user-block) must be set",
                ))
            }
        }
        if d.is_root_device
            && self
                .drives
                .iter()
                .any(|o| o.is_root_device && o.drive_id != d.drive_id)
        {
            return Err(Answer::fault(400, "A root block device already exists!"));
        }
        match self.drives.iter_mut().find(|o| o.drive_id == d.drive_id) {
            Some(o) => *o = d,
            None => self.drives.push(d),
        }
        Ok((Answer::no_content(), After::Nothing))
    }

    /// Firecracker's order: the request checks (id, body, path id = body id), pre-boot, the MAC
    /// in use by another interface, then the device: an interface of the same id is dropped first
    /// (its tap closed), the tap opened, the vnet header sized, and only then the MTU checked.
    fn put_net(&mut self, path_id: &str, n: NetworkInterface) -> Result<Reply, Answer> {
        if n.iface_id != path_id {
            return Err(Answer::fault(
                400,
                format!(
                    "The id from the path [{path_id}] does not match the id from the body [{}]!",
                    n.iface_id
                ),
            ));
        }
        if let Some(mac) = &n.guest_mac {
            if !valid_mac(mac) {
                return Err(Answer::fault(
                    400,
                    "An error occurred when deserializing the json body of a request: The provided MAC address is invalid.",
                ));
            }
        }
        self.pre_boot()?;
        let config_error = |msg: String| Answer::fault(400, format!("Network config error: {msg}"));
        if let Some(mac) = &n.guest_mac {
            let in_use = self.nets.iter().any(|(o, _)| {
                o.iface_id != n.iface_id
                    && o.guest_mac.as_deref().map(str::to_ascii_lowercase)
                        == Some(mac.to_ascii_lowercase())
            });
            if in_use {
                return Err(config_error(format!(
                    "The MAC address is already in use: {}",
                    mac.to_ascii_lowercase()
                )));
            }
        }
        // Firecracker removes the old device before building the new one, so re-putting the same
        // tap works and a failed re-put leaves the interface gone.
        self.nets.retain(|(o, _)| o.iface_id != n.iface_id);
        let tap = Tap::open_named(&n.host_dev_name).map_err(|e| {
            config_error(format!(
                "Could not create the network device: {}",
                e.net_error()
            ))
        })?;
        if let Some(mtu) = n.mtu {
            if mtu < 68 {
                return Err(config_error(format!(
                    "Could not create the network device: MTU {mtu} is out of range [68, 65535]"
                )));
            }
        }
        self.nets.push((n, tap));
        Ok((Answer::no_content(), After::Nothing))
    }

    fn put_vsock(&mut self, v: Vsock) -> Result<Reply, Answer> {
        self.pre_boot()?;
        if v.guest_cid < 3 {
            return Err(Answer::fault(
                400,
                format!("Invalid guest CID {}: must be at least 3.", v.guest_cid),
            ));
        }
        if let Some((old, _)) = self.vsock.take() {
            let _ = std::fs::remove_file(&old.uds_path);
        }
        let l = UnixListener::bind(&v.uds_path).map_err(|e| {
            Answer::fault(
                400,
                format!("Cannot create backend for vsock device: Error binding to the host-side Unix socket: {e}"),
            )
        })?;
        self.vsock = Some((v, l));
        Ok((Answer::no_content(), After::Nothing))
    }

    fn put_logger(&mut self, l: Logger) -> Result<Reply, Answer> {
        self.pre_boot()?;
        if let Some(p) = &l.log_path {
            if let Some(e) = open_err(p, true) {
                return Err(Answer::fault(
                    400,
                    format!("Failed to open target file: {e}"),
                ));
            }
        }
        Ok((Answer::no_content(), After::Nothing))
    }

    fn put_metrics(&mut self, m: Metrics) -> Result<Reply, Answer> {
        self.pre_boot()?;
        if self.metrics.is_some() {
            return Err(Answer::fault(
                400,
                "Reinitialization of metrics not allowed.",
            ));
        }
        if let Some(e) = open_err(&m.metrics_path, true) {
            return Err(Answer::fault(
                400,
                format!("Failed to open target file: {e}"),
            ));
        }
        self.metrics = Some(m.metrics_path);
        Ok((Answer::no_content(), After::Nothing))
    }

    /// `PUT /serial`: pre-boot only, like Firecracker (`ConfigureSerial` is refused after boot).
    /// Firecracker checks nothing else here: it opens `serial_out_path` at InstanceStart (see
    /// [`crate::serial::Console::open`]), and a zero `size` or `refill_time` means "no limit".
    /// A later PUT replaces the earlier one.
    fn put_serial(&mut self, s: SerialDevice) -> Result<Reply, Answer> {
        self.pre_boot()?;
        self.serial = Some(s);
        Ok((Answer::no_content(), After::Nothing))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testdir::tmp;
    use serde_json::{json, Value};

    fn elf(dir: &Path) -> PathBuf {
        let p = dir.join("vmlinux");
        let mut k = b"\x7fELF\x02\x01\x01".to_vec();
        k.resize(128, 0);
        std::fs::write(&p, k).unwrap();
        p
    }

    fn put(m: &mut Machine, path: &str, body: Value) -> (u16, String, After) {
        let (a, after) = m.handle("PUT", path, body.to_string().as_bytes());
        let msg = a
            .body
            .and_then(|b| serde_json::from_str::<Value>(&b).ok())
            .and_then(|v| v["fault_message"].as_str().map(String::from))
            .unwrap_or_default();
        (a.status, msg, after)
    }

    #[test]
    fn spec_rejections() {
        let t = tmp("rej");
        let k = elf(&t.0);
        let mut m = Machine::new("vm1");
        let cases: Vec<(&str, Value, &str)> = vec![
            (
                "/boot-source",
                json!({}),
                "missing field `kernel_image_path`",
            ),
            (
                "/boot-source",
                json!({"kernel_image_path": 7}),
                "invalid type: integer `7`",
            ),
            (
                "/boot-source",
                json!({"kernel_image_path": k, "x": 1}),
                "unknown field `x`",
            ),
            (
                "/boot-source",
                json!({"kernel_image_path": "/nonexistent/k"}),
                "The kernel file cannot be opened",
            ),
            (
                "/machine-config",
                json!({"vcpu_count": 0, "mem_size_mib": 128}),
                "The number of vCPUs must be greater than 0",
            ),
            (
                "/machine-config",
                json!({"vcpu_count": 33, "mem_size_mib": 128}),
                "The number of vCPUs must be greater than 0",
            ),
            (
                "/machine-config",
                json!({"vcpu_count": 3, "mem_size_mib": 128, "smt": true}),
                "The number of vCPUs must be greater than 0",
            ),
            (
                "/machine-config",
                json!({"vcpu_count": "2", "mem_size_mib": 128}),
                "invalid type: string \"2\", expected u8",
            ),
            (
                "/machine-config",
                json!({"vcpu_count": 2}),
                "missing field `mem_size_mib`",
            ),
            (
                "/machine-config",
                json!({"vcpu_count": 2, "mem_size_mib": 0}),
                "The memory size (MiB) is either 0",
            ),
            (
                "/drives/rootfs",
                json!({"drive_id": "other", "is_root_device": true, "path_on_host": k}),
                "does not match",
            ),
            (
                "/drives/rootfs",
                json!({"drive_id": "rootfs", "path_on_host": k}),
                "missing field `is_root_device`",
            ),
            (
                "/drives/rootfs",
                json!({"drive_id": "rootfs", "is_root_device": true, "path_on_host": "/nope"}),
                "Unable to create the virtio block device",
            ),
            (
                "/drives/bad-id",
                json!({"drive_id": "bad-id", "is_root_device": true, "path_on_host": k}),
                "alphanumeric characters and underscores",
            ),
            (
                "/network-interfaces/eth0",
                json!({"iface_id": "eth0"}),
                "missing field `host_dev_name`",
            ),
            (
                "/network-interfaces/eth0",
                json!({"iface_id": "eth1", "host_dev_name": "tap0"}),
                "The id from the path [eth0] does not match the id from the body [eth1]!",
            ),
            (
                "/network-interfaces/eth0",
                json!({"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "zz"}),
                "The provided MAC address is invalid.",
            ),
            (
                "/network-interfaces/eth0",
                json!({"iface_id": "eth0", "host_dev_name": "bgr-0123456789ab"}),
                "Network config error: Could not create the network device: Open tap device failed: ",
            ),
            (
                "/network-interfaces/eth0",
                json!({"iface_id": "eth0", "host_dev_name": "bgr-nosuchtap"}),
                "Network config error: Could not create the network device: Open tap device failed: ",
            ),
            (
                "/vsock",
                json!({"guest_cid": 2, "uds_path": "/tmp/v.sock"}),
                "must be at least 3",
            ),
            (
                "/vsock",
                json!({"uds_path": "/tmp/v.sock"}),
                "missing field `guest_cid`",
            ),
            (
                "/logger",
                json!({"level": "Loud"}),
                "unknown variant `Loud`",
            ),
            ("/metrics", json!({}), "missing field `metrics_path`"),
            (
                "/actions",
                json!({"action_type": "Reboot"}),
                "unknown variant `Reboot`",
            ),
            (
                "/actions",
                json!({"action_type": "SendCtrlAltDel"}),
                PRE_BOOT,
            ),
            (
                "/actions",
                json!({"action_type": "InstanceStart"}),
                "Cannot start microvm without kernel configuration.",
            ),
        ];
        for (path, body, want) in cases {
            let (status, msg, after) = put(&mut m, path, body.clone());
            assert_eq!(status, 400, "{path} {body}");
            assert!(msg.contains(want), "{path} {body}: {msg:?} lacks {want:?}");
            assert_eq!(after, After::Nothing);
        }
        let (a, _) = m.handle("PUT", "/boot-source", b"");
        assert_eq!(a.status, 400);
        assert!(!m.started);
    }

    #[test]
    fn serial_is_pre_boot_only_and_held_to_the_spec() {
        let t = tmp("serial");
        let k = elf(&t.0);
        let mut m = Machine::new("vm1");
        for (body, want) in [
            (
                json!({"rate_limiter": {"size": 1}}),
                "missing field `refill_time`",
            ),
            (
                json!({"rate_limiter": {"size": -1, "refill_time": 1}}),
                "invalid value",
            ),
            (json!({"serial_out_path": 5}), "invalid type"),
            (json!({"log_path": "/x"}), "unknown field `log_path`"),
        ] {
            let (s, msg, _) = put(&mut m, "/serial", body.clone());
            assert_eq!(s, 400, "{body}");
            assert!(msg.contains(want), "{body}: {msg:?} lacks {want:?}");
        }
        assert!(m.serial.is_none(), "a refused PUT configured the serial");
        let limited =
            json!({"rate_limiter": {"size": 4096, "refill_time": 1000, "one_time_burst": 0}});
        assert_eq!(put(&mut m, "/serial", limited).0, 204);
        assert_eq!(
            m.serial
                .as_ref()
                .and_then(|s| s.rate_limiter.as_ref())
                .map(|r| r.size),
            Some(4096)
        );
        // A later PUT replaces the earlier one; an empty body object is valid (stdout, no limit).
        assert_eq!(put(&mut m, "/serial", json!({})).0, 204);
        assert_eq!(m.serial, Some(SerialDevice::default()));
        assert_eq!(
            put(&mut m, "/boot-source", json!({"kernel_image_path": k})).0,
            204
        );
        let (s, _, after) = put(&mut m, "/actions", json!({"action_type": "InstanceStart"}));
        assert_eq!((s, after), (204, After::Booted));
        let (s, msg, _) = put(&mut m, "/serial", json!({}));
        assert_eq!((s, msg.as_str()), (400, POST_BOOT));
    }

    #[test]
    fn unknown_paths_and_methods() {
        let mut m = Machine::new("vm1");
        for (method, path) in [
            ("PUT", "/nope"),
            ("GET", "/drives/x/y/z"),
            ("DELETE", "/"),
            ("POST", "/actions"),
        ] {
            let (a, _) = m.handle(method, path, b"{}");
            assert_eq!(a.status, 400, "{method} {path}");
            assert!(a
                .body
                .unwrap()
                .contains("Invalid request method and/or path"));
        }
    }

    #[test]
    fn boot_lifecycle() {
        let t = tmp("life");
        let k = elf(&t.0);
        let mut m = Machine::new("vm1");
        let (a, _) = m.handle("GET", "/", b"");
        let info: InstanceInfo = serde_json::from_str(&a.body.unwrap()).unwrap();
        assert_eq!(info.state, InstanceState::NotStarted);
        assert_eq!(info.id, "vm1");

        // A file that exists but is no kernel: accepted at PUT, refused at InstanceStart.
        let junk = t.0.join("junk");
        std::fs::write(&junk, b"not a kernel").unwrap();
        assert_eq!(
            put(&mut m, "/boot-source", json!({"kernel_image_path": junk})).0,
            204
        );
        let (s, msg, _) = put(&mut m, "/actions", json!({"action_type": "InstanceStart"}));
        assert_eq!(s, 400);
        assert!(msg.contains("invalid kernel image"), "{msg}");

        assert_eq!(
            put(
                &mut m,
                "/boot-source",
                json!({"kernel_image_path": k, "boot_args": "console=ttyS0"})
            )
            .0,
            204
        );
        assert_eq!(
            put(
                &mut m,
                "/machine-config",
                json!({"vcpu_count": 2, "mem_size_mib": 256})
            )
            .0,
            204
        );
        assert_eq!(put(&mut m, "/drives/rootfs", json!({"drive_id": "rootfs", "is_root_device": true, "is_read_only": true, "path_on_host": k})).0, 204);
        let (s, msg, _) = put(
            &mut m,
            "/drives/data",
            json!({"drive_id": "data", "is_root_device": true, "is_read_only": true, "path_on_host": k}),
        );
        assert_eq!(
            (s, msg.as_str()),
            (400, "A root block device already exists!")
        );
        assert_eq!(
            put(
                &mut m,
                "/vsock",
                json!({"guest_cid": 3, "uds_path": t.0.join("v.sock")})
            )
            .0,
            204
        );
        let metrics = t.0.join("metrics");
        std::fs::write(&metrics, b"").unwrap();
        assert_eq!(
            put(&mut m, "/metrics", json!({"metrics_path": metrics})).0,
            204
        );
        assert_eq!(
            put(&mut m, "/metrics", json!({"metrics_path": metrics})).1,
            "Reinitialization of metrics not allowed."
        );

        let (s, _, after) = put(&mut m, "/actions", json!({"action_type": "InstanceStart"}));
        assert_eq!((s, after), (204, After::Booted));
        let (a, _) = m.handle("GET", "/", b"");
        assert!(a.body.unwrap().contains("\"Running\""));

        for (path, body) in [
            ("/boot-source", json!({"kernel_image_path": k})),
            (
                "/machine-config",
                json!({"vcpu_count": 1, "mem_size_mib": 128}),
            ),
            ("/vsock", json!({"guest_cid": 4, "uds_path": "/tmp/x"})),
            ("/actions", json!({"action_type": "InstanceStart"})),
        ] {
            let (s, msg, _) = put(&mut m, path, body);
            assert_eq!((s, msg.as_str()), (400, POST_BOOT), "{path}");
        }
        assert_eq!(
            put(&mut m, "/actions", json!({"action_type": "FlushMetrics"})).0,
            204
        );
        assert!(std::fs::read_to_string(&metrics)
            .unwrap()
            .contains("\"running\":true"));
        let (s, _, after) = put(&mut m, "/actions", json!({"action_type": "SendCtrlAltDel"}));
        assert_eq!((s, after), (204, After::Exit));
    }

    #[test]
    fn network_interface_holds_its_tap() {
        const SETUP: &[&[&str]] = &[
            &["ip", "tuntap", "add", "dev", "bgr-a", "mode", "tap"],
            &["ip", "tuntap", "add", "dev", "bgr-b", "mode", "tap"],
        ];
        // As root in a namespace of the test's own: Machine opens the real /dev/net/tun.
        let r = crate::tap::tests::in_netns_as("machine", SETUP, None, |_| {
            let t = tmp("net");
            let k = elf(&t.0);
            let mut m = Machine::new("vm1");
            let net = |tap: &str, mac: &str| json!({"iface_id": "eth0", "host_dev_name": tap, "guest_mac": mac});
            let mut out = vec![
                put(
                    &mut m,
                    "/network-interfaces/eth0",
                    net("bgr-a", "02:00:00:00:00:01"),
                ),
                // Re-put of the same interface and tap: the old queue is closed first.
                put(
                    &mut m,
                    "/network-interfaces/eth0",
                    net("bgr-a", "02:00:00:00:00:01"),
                ),
                put(
                    &mut m,
                    "/network-interfaces/eth1",
                    json!({"iface_id": "eth1", "host_dev_name": "bgr-a"}),
                ),
                put(
                    &mut m,
                    "/network-interfaces/eth1",
                    json!({"iface_id": "eth1", "host_dev_name": "bgr-b", "guest_mac": "02:00:00:00:00:01"}),
                ),
                put(
                    &mut m,
                    "/network-interfaces/eth1",
                    json!({"iface_id": "eth1", "host_dev_name": "bgr-b", "mtu": 67}),
                ),
            ];
            let nets_before_boot = m.nets.len();
            put(&mut m, "/boot-source", json!({"kernel_image_path": k}));
            put(&mut m, "/actions", json!({"action_type": "InstanceStart"}));
            out.push(put(
                &mut m,
                "/network-interfaces/eth1",
                json!({"iface_id": "eth1", "host_dev_name": "bgr-b"}),
            ));
            // The held queue keeps bgr-a busy for anyone else while the VM lives.
            let busy = crate::tap::Tap::open_named("bgr-a").is_err();
            drop(m);
            let free = crate::tap::Tap::open_named("bgr-a").is_ok();
            (out, nets_before_boot, busy, free)
        });
        let (out, nets, busy, free) = match r {
            Ok(v) => v,
            Err(why) => {
                eprintln!("SKIP: network_interface_holds_its_tap: {why}");
                return;
            }
        };
        let fault = "Network config error: Could not create the network device: ";
        assert_eq!((out[0].0, out[1].0), (204, 204), "{out:?}");
        assert_eq!(out[2].0, 400);
        assert_eq!(out[2].1, format!("{fault}Open tap device failed: Error while creating ifreq structure: Device or resource busy (os error 16). Invalid TUN/TAP Backend provided by bgr-a. Check our documentation on setting up the network devices."));
        assert_eq!(
            out[3].1,
            "Network config error: The MAC address is already in use: 02:00:00:00:00:01"
        );
        assert_eq!(
            out[4].1,
            format!("{fault}MTU 67 is out of range [68, 65535]")
        );
        assert_eq!(nets, 1, "only eth0 is configured");
        assert_eq!(out[5].1, POST_BOOT);
        assert!(busy, "bgr-a is held while the VM lives");
        assert!(free, "bgr-a is released with the VM");
    }
}
