//! Typed bodies of the Firecracker API subset banger speaks, field for field from
//! `../shared/firecracker/api-v1.16.1.yaml` (v1.16.1).
//!
//! Request bodies deny unknown fields, as Firecracker's own (serde `deny_unknown_fields`) do, so the
//! test stand-in can parse with these very types and reject what Firecracker rejects. Optional
//! fields are omitted from the JSON when `None`, never sent as `null`. Response bodies
//! ([`InstanceInfo`], [`FirecrackerVersion`], [`Fault`]) accept unknown fields, so a newer
//! Firecracker that adds a field still parses.
//!
//! Integer widths follow Firecracker's implementation where the spec only says `integer`
//! (`vcpu_count` is a `u8`, `guest_cid` a `u32`, `mtu` a `u16`).

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Deserializer, Serialize};

/// `PUT /boot-source`: the guest kernel, its command line and an optional initrd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    /// Host path of the kernel image (an ELF vmlinux on x86_64). Required.
    pub kernel_image_path: PathBuf,
    /// Kernel command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
    /// Host path of an initrd image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<PathBuf>,
}

/// Block device caching strategy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CacheType {
    /// Flushes are ignored (the default).
    Unsafe,
    /// Flushes reach the host file.
    Writeback,
}

/// Block device IO engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum IoEngine {
    /// Synchronous IO (the default).
    Sync,
    /// io_uring (host kernels newer than 5.10.51).
    Async,
}

/// A token bucket of a [`RateLimiter`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenBucket {
    /// Initial burst size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub one_time_burst: Option<u64>,
    /// Milliseconds to refill the bucket.
    pub refill_time: u64,
    /// Bucket capacity.
    pub size: u64,
}

/// An IO rate limiter with independent bandwidth and ops buckets.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimiter {
    /// Bytes as tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<TokenBucket>,
    /// Operations as tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ops: Option<TokenBucket>,
}

/// `PUT /drives/{drive_id}`: a block device. The path id is taken from `drive_id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Drive {
    /// Drive id; must equal the id in the request path.
    pub drive_id: String,
    /// Partition UUID of the root partition (only with `is_root_device`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partuuid: Option<String>,
    /// Whether this is the guest's root device.
    pub is_root_device: bool,
    /// Caching strategy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_type: Option<CacheType>,
    /// Read-only (virtio-block).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub is_read_only: Option<bool>,
    /// Backing file on the host (virtio-block).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_on_host: Option<PathBuf>,
    /// IO rate limiter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiter>,
    /// IO engine (virtio-block).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_engine: Option<IoEngine>,
    /// vhost-user-block backend socket (instead of `path_on_host`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<PathBuf>,
}

/// Deprecated static CPU templates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub enum CpuTemplate {
    C3,
    T2,
    T2S,
    T2CL,
    T2A,
    V1N1,
    None,
}

/// Huge pages backing guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum HugePages {
    /// Ordinary pages.
    None,
    /// 2 MiB hugetlbfs pages.
    #[serde(rename = "2M")]
    Hugetlbfs2M,
}

/// `PUT /machine-config`: vCPUs, memory and CPU features.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfiguration {
    /// Number of vCPUs, 1..=32 (1 or even with SMT).
    pub vcpu_count: u8,
    /// Guest memory in MiB.
    pub mem_size_mib: u64,
    /// Simultaneous multithreading.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smt: Option<bool>,
    /// Dirty page tracking (diff snapshots).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub track_dirty_pages: Option<bool>,
    /// Deprecated CPU template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<CpuTemplate>,
    /// Huge pages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub huge_pages: Option<HugePages>,
}

/// `PUT /network-interfaces/{iface_id}`: a virtio-net device backed by a tap. The path id is taken
/// from `iface_id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterface {
    /// Interface id; must equal the id in the request path.
    pub iface_id: String,
    /// Host tap device name.
    pub host_dev_name: String,
    /// Guest MAC address, `xx:xx:xx:xx:xx:xx`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<String>,
    /// MTU advertised to the guest, 68..=65535.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u16>,
    /// Receive rate limiter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimiter>,
    /// Transmit rate limiter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimiter>,
}

/// `PUT /vsock`: the vsock device, proxied through a host Unix socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vsock {
    /// Guest CID, at least 3.
    pub guest_cid: u32,
    /// Host Unix socket Firecracker binds for host-initiated connections.
    pub uds_path: PathBuf,
    /// Deprecated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_id: Option<String>,
}

/// `PUT /serial` (pre-boot only): where the guest's serial console goes and how fast it may
/// write there. Firecracker opens `serial_out_path` (created if missing, without `O_APPEND`) at
/// InstanceStart; without it the console stays on the VMM's stdout. Bytes the guest writes beyond
/// `rate_limiter` are silently dropped (and counted in the `uart.rate_limiter_dropped_bytes`
/// metric); a bucket with `size` or `refill_time` 0 limits nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialDevice {
    /// File or named pipe the serial output is written to (instead of stdout).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial_out_path: Option<PathBuf>,
    /// Token bucket (bytes as tokens) bounding the serial output bandwidth.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<TokenBucket>,
}

/// Firecracker log level (case-insensitive on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[allow(missing_docs)]
pub enum LogLevel {
    Error,
    Warning,
    Info,
    Debug,
    Trace,
    Off,
}

impl<'de> Deserialize<'de> for LogLevel {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ok(match s.to_ascii_lowercase().as_str() {
            "error" => LogLevel::Error,
            "warning" => LogLevel::Warning,
            "info" => LogLevel::Info,
            "debug" => LogLevel::Debug,
            "trace" => LogLevel::Trace,
            "off" => LogLevel::Off,
            _ => {
                return Err(serde::de::Error::unknown_variant(
                    &s,
                    &["Error", "Warning", "Info", "Debug", "Trace", "Off"],
                ))
            }
        })
    }
}

/// `PUT /logger`: where Firecracker writes its own log.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Logger {
    /// Log level.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<LogLevel>,
    /// File or named pipe for the log (must exist).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_path: Option<PathBuf>,
    /// Prefix lines with the level.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_level: Option<bool>,
    /// Prefix lines with file:line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_log_origin: Option<bool>,
    /// Module path filter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
}

/// `PUT /metrics`: where Firecracker flushes its JSON metrics.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    /// File or named pipe for the metrics (must exist).
    pub metrics_path: PathBuf,
}

/// The synchronous actions of `PUT /actions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ActionType {
    /// Flush metrics now.
    FlushMetrics,
    /// Boot the configured guest (pre-boot only).
    InstanceStart,
    /// Press Ctrl+Alt+Del on the guest's i8042 keyboard (x86_64, post-boot only).
    SendCtrlAltDel,
}

impl fmt::Display for ActionType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ActionType::FlushMetrics => "FlushMetrics",
            ActionType::InstanceStart => "InstanceStart",
            ActionType::SendCtrlAltDel => "SendCtrlAltDel",
        })
    }
}

/// `PUT /actions` body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceActionInfo {
    /// Which action.
    pub action_type: ActionType,
}

/// The instance state reported by `GET /`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum InstanceState {
    /// Configured (or not) but not booted.
    #[serde(rename = "Not started")]
    NotStarted,
    /// Booted and running.
    Running,
    /// Paused (snapshots).
    Paused,
}

/// `GET /` response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceInfo {
    /// Application name ("Firecracker").
    pub app_name: String,
    /// Instance id (`--id`).
    pub id: String,
    /// Current state.
    pub state: InstanceState,
    /// VMM version, e.g. "1.16.1".
    pub vmm_version: String,
}

/// `GET /version` response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FirecrackerVersion {
    /// Firecracker build version, e.g. "1.16.1".
    pub firecracker_version: String,
}

/// `PATCH /drives/{drive_id}` (post-boot): re-points a virtio-block drive at another host file
/// (`PartialDrive` in the spec). The path id is taken from `drive_id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartialDrive {
    /// Drive id; must equal the id in the request path.
    pub drive_id: String,
    /// New backing file on the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_on_host: Option<PathBuf>,
    /// New IO rate limiter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiter>,
}

/// The states `PATCH /vm` sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmState {
    /// Stop the vCPUs (a snapshot needs this).
    Paused,
    /// Run the vCPUs again.
    Resumed,
}

/// `PATCH /vm` body (`Vm` in the spec).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vm {
    /// The state to enter.
    pub state: VmState,
}

/// Full or diff snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotType {
    /// All of guest memory (the default).
    Full,
    /// Only pages dirtied since the last snapshot (developer preview).
    Diff,
}

/// `PUT /snapshot/create` body (`SnapshotCreateParams`): the VM must be Paused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreateParams {
    /// Where guest memory is written.
    pub mem_file_path: PathBuf,
    /// Where the microVM state (devices, vCPUs, configuration) is written.
    pub snapshot_path: PathBuf,
    /// Full (default) or Diff.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_type: Option<SnapshotType>,
}

/// How guest memory is supplied at load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemoryBackendType {
    /// `backend_path` is the memory file (mapped private).
    File,
    /// `backend_path` is a Unix socket of a userfaultfd page server.
    Uffd,
}

/// `MemoryBackend` of [`SnapshotLoadParams`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryBackend {
    /// File or Uffd.
    pub backend_type: MemoryBackendType,
    /// The memory file, or the page server's socket.
    pub backend_path: PathBuf,
}

/// `NetworkOverride`: the tap an interface gets on restore instead of the recorded one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkOverride {
    /// The interface, as recorded in the snapshot.
    pub iface_id: String,
    /// The new host tap.
    pub host_dev_name: String,
}

/// `VsockOverride`: the host socket the vsock device binds on restore instead of the recorded one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockOverride {
    /// The new host-side Unix socket.
    pub uds_path: PathBuf,
}

/// `PUT /snapshot/load` body (`SnapshotLoadParams`): only on a fresh process, before any
/// configuration but the logger and metrics. Exactly one of `mem_file_path` and `mem_backend`
/// must be set (Firecracker checks that after parsing; see [`SnapshotLoadParams::memory`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotLoadParams {
    /// Deprecated alias of `track_dirty_pages`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enable_diff_snapshots: Option<bool>,
    /// Dirty page tracking after the load.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub track_dirty_pages: Option<bool>,
    /// Deprecated: the memory file (only without `mem_backend`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_file_path: Option<PathBuf>,
    /// The memory backend (only without `mem_file_path`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_backend: Option<MemoryBackend>,
    /// The microVM state file.
    pub snapshot_path: PathBuf,
    /// Resume the VM once loaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume_vm: Option<bool>,
    /// Taps to use instead of the recorded ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_overrides: Option<Vec<NetworkOverride>>,
    /// Vsock socket to bind instead of the recorded one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_override: Option<VsockOverride>,
    /// x86_64: advance kvmclock by the wall time since the snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clock_realtime: Option<bool>,
}

/// Firecracker's words when a load body names both or neither memory source.
pub const MEM_BOTH: &str =
    "too many fields: either `mem_backend` or `mem_file_path` exclusively is required.";
/// See [`MEM_BOTH`].
pub const MEM_NEITHER: &str = "missing field: either `mem_backend` or `mem_file_path` is required.";

impl SnapshotLoadParams {
    /// A load of `snapshot_path` with memory from the file `mem_path`, nothing else set.
    pub fn from_files(snapshot_path: PathBuf, mem_path: PathBuf) -> Self {
        SnapshotLoadParams {
            enable_diff_snapshots: None,
            track_dirty_pages: None,
            mem_file_path: None,
            mem_backend: Some(MemoryBackend {
                backend_type: MemoryBackendType::File,
                backend_path: mem_path,
            }),
            snapshot_path,
            resume_vm: None,
            network_overrides: None,
            vsock_override: None,
            clock_realtime: None,
        }
    }

    /// The memory source, checked as Firecracker checks it (exactly one of the two fields); the
    /// error is Firecracker's message.
    pub fn memory(&self) -> Result<MemoryBackend, &'static str> {
        match (&self.mem_file_path, &self.mem_backend) {
            (Some(_), Some(_)) => Err(MEM_BOTH),
            (None, None) => Err(MEM_NEITHER),
            (Some(p), None) => Ok(MemoryBackend {
                backend_type: MemoryBackendType::File,
                backend_path: p.clone(),
            }),
            (None, Some(b)) => Ok(b.clone()),
        }
    }
}

/// Firecracker's error body (`Error` in the spec).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fault {
    /// What went wrong, in Firecracker's words.
    pub fault_message: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn optional_fields_are_omitted_not_null() {
        let b = BootSource {
            kernel_image_path: "/k".into(),
            boot_args: None,
            initrd_path: None,
        };
        assert_eq!(
            serde_json::to_value(&b).unwrap(),
            json!({"kernel_image_path": "/k"})
        );
        let m = MachineConfiguration {
            vcpu_count: 2,
            mem_size_mib: 256,
            smt: None,
            track_dirty_pages: None,
            cpu_template: None,
            huge_pages: Some(HugePages::Hugetlbfs2M),
        };
        assert_eq!(
            serde_json::to_value(&m).unwrap(),
            json!({"vcpu_count": 2, "mem_size_mib": 256, "huge_pages": "2M"})
        );
    }

    #[test]
    fn requests_reject_what_firecracker_rejects() {
        let cases = [
            json!({}),
            json!({"kernel_image_path": 5}),
            json!({"kernel_image_path": "/k", "bogus": 1}),
        ];
        for c in cases {
            assert!(
                serde_json::from_value::<BootSource>(c.clone()).is_err(),
                "{c}"
            );
        }
        assert!(serde_json::from_value::<MachineConfiguration>(
            json!({"vcpu_count": "2", "mem_size_mib": 1})
        )
        .is_err());
        assert!(serde_json::from_value::<MachineConfiguration>(
            json!({"vcpu_count": 256, "mem_size_mib": 1})
        )
        .is_err());
        assert!(
            serde_json::from_value::<InstanceActionInfo>(json!({"action_type": "Reboot"})).is_err()
        );
    }

    #[test]
    fn serial_device_is_the_spec_shape() {
        let s = SerialDevice {
            serial_out_path: None,
            rate_limiter: Some(TokenBucket {
                one_time_burst: Some(4096),
                refill_time: 1000,
                size: 1024,
            }),
        };
        assert_eq!(
            serde_json::to_value(&s).unwrap(),
            json!({"rate_limiter": {"one_time_burst": 4096, "refill_time": 1000, "size": 1024}})
        );
        assert_eq!(
            serde_json::to_value(SerialDevice::default()).unwrap(),
            json!({})
        );
        let ok: SerialDevice = serde_json::from_value(json!({"serial_out_path": "/s"})).unwrap();
        assert_eq!(
            ok.serial_out_path.as_deref(),
            Some(std::path::Path::new("/s"))
        );
        for bad in [
            json!({"rate_limiter": {"size": 1}}),
            json!({"rate_limiter": {"size": -1, "refill_time": 1}}),
            json!({"rate_limiter": {"bandwidth": {"size": 1, "refill_time": 1}}}),
            json!({"serial_out_path": 5}),
            json!({"log_path": "/x"}),
        ] {
            assert!(
                serde_json::from_value::<SerialDevice>(bad.clone()).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn snapshot_bodies_match_the_spec() {
        let mut load = SnapshotLoadParams::from_files("/s/vmstate".into(), "/s/mem".into());
        load.resume_vm = Some(true);
        load.network_overrides = Some(vec![NetworkOverride {
            iface_id: "eth0".into(),
            host_dev_name: "bgr-x".into(),
        }]);
        assert_eq!(
            serde_json::to_value(&load).unwrap(),
            json!({"snapshot_path": "/s/vmstate",
                   "mem_backend": {"backend_type": "File", "backend_path": "/s/mem"},
                   "resume_vm": true,
                   "network_overrides": [{"iface_id": "eth0", "host_dev_name": "bgr-x"}]})
        );
        assert_eq!(load.memory().unwrap().backend_path, PathBuf::from("/s/mem"));
        let create = SnapshotCreateParams {
            mem_file_path: "/s/mem".into(),
            snapshot_path: "/s/vmstate".into(),
            snapshot_type: Some(SnapshotType::Full),
        };
        assert_eq!(
            serde_json::to_value(&create).unwrap(),
            json!({"mem_file_path": "/s/mem", "snapshot_path": "/s/vmstate", "snapshot_type": "Full"})
        );
        assert_eq!(
            serde_json::to_value(Vm {
                state: VmState::Paused
            })
            .unwrap(),
            json!({"state": "Paused"})
        );
        // Rejections: what Firecracker's types reject.
        for bad in [
            json!({"state": "Bogus"}),
            json!({"state": "Paused", "x": 1}),
            json!({}),
        ] {
            assert!(serde_json::from_value::<Vm>(bad.clone()).is_err(), "{bad}");
        }
        for bad in [
            json!({"mem_file_path": "/m"}),
            json!({"snapshot_path": "/s", "mem_backend": {"backend_type": "Disk", "backend_path": "/m"}}),
            json!({"snapshot_path": "/s", "mem_backend": {"backend_type": "File"}}),
            json!({"snapshot_path": "/s", "network_overrides": [{"iface_id": "eth0"}]}),
            json!({"snapshot_path": "/s", "resume_vm": "yes"}),
            json!({"snapshot_path": "/s", "bogus": 1}),
        ] {
            assert!(
                serde_json::from_value::<SnapshotLoadParams>(bad.clone()).is_err(),
                "{bad}"
            );
        }
        assert!(serde_json::from_value::<SnapshotCreateParams>(
            json!({"snapshot_path": "/s", "mem_file_path": "/m", "snapshot_type": "Partial"})
        )
        .is_err());
        let both: SnapshotLoadParams = serde_json::from_value(json!({
            "snapshot_path": "/s", "mem_file_path": "/m",
            "mem_backend": {"backend_type": "File", "backend_path": "/m"}
        }))
        .unwrap();
        assert_eq!(both.memory(), Err(MEM_BOTH));
        let neither: SnapshotLoadParams =
            serde_json::from_value(json!({"snapshot_path": "/s"})).unwrap();
        assert_eq!(neither.memory(), Err(MEM_NEITHER));
    }

    #[test]
    fn wire_names() {
        let s: InstanceState = serde_json::from_value(json!("Not started")).unwrap();
        assert_eq!(s, InstanceState::NotStarted);
        let l: LogLevel = serde_json::from_value(json!("wArNiNg")).unwrap();
        assert_eq!(l, LogLevel::Warning);
        assert_eq!(
            serde_json::to_value(InstanceActionInfo {
                action_type: ActionType::SendCtrlAltDel
            })
            .unwrap(),
            json!({"action_type": "SendCtrlAltDel"})
        );
        // Responses tolerate fields a newer Firecracker may add.
        let i: InstanceInfo = serde_json::from_value(json!({
            "app_name": "Firecracker", "id": "x", "state": "Running", "vmm_version": "1.16.1", "new": 1
        }))
        .unwrap();
        assert_eq!(i.state, InstanceState::Running);
    }
}
