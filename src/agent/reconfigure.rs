//! The `reconfigure` request (agent protocol 2): a guest restored from a snapshot wakes up with the
//! snapshot's identity, and the host tells it its own: hostname, eth0's MAC, address and default
//! route, root's authorized key.
//!
//! Owns the request's parameters ([`Reconfigure`], as they travel), their validation
//! ([`Reconfigure::validate`], the same rules on both ends, before anything is touched), the
//! instance id a successful reconfigure replaces ([`new_instance_id`]), and the two ways a guest is
//! changed ([`Configurer`]): [`System`] (a real guest: `sethostname`, files under its root, `ip`
//! from iproute2, which every banger image has) and [`InMemory`] (the stand-in VMM's fake guest).
//! It never runs anything but `ip` with arguments it built from validated values, and never touches
//! another interface than the one it was given.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::agent::{cmdline, prepare};

/// The interface a banger guest has (Firecracker's first virtio-net device).
pub const GUEST_IFACE: &str = "eth0";

/// The parameters of `reconfigure`, as they travel (strings, validated by [`Self::validate`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reconfigure {
    /// The VM's name: the new hostname (banger's VM name rule).
    pub name: String,
    /// The new address with its prefix length, `10.x.y.z/NN`, in a private range.
    pub ip: String,
    /// The new default gateway, inside `ip`'s subnet.
    pub gateway: String,
    /// eth0's new MAC, `02:xx:xx:xx:xx:xx` (unicast).
    pub mac: String,
    /// Base64 of root's authorized_keys line, as in `banger.key=`.
    pub key: String,
    /// 64 hex digits of fresh host randomness, mixed into the guest kernel's random pool before
    /// it reseeds: clones of one snapshot share the generator state, and what only the clone's
    /// identity would add is guessable. Optional on the wire (a host that sends none still works).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<String>,
}

/// A [`Reconfigure`] that passed validation: what the guest applies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Validated {
    /// The hostname.
    pub name: String,
    /// The address.
    pub ip: Ipv4Addr,
    /// Its prefix length (8-30).
    pub prefix: u8,
    /// The default gateway.
    pub gateway: Ipv4Addr,
    /// The MAC, lowercase `xx:xx:xx:xx:xx:xx`.
    pub mac: String,
    /// The decoded authorized_keys line (no newline).
    pub authorized_key: String,
    /// The host's seed, decoded (32 bytes), if it sent one.
    pub seed: Option<[u8; 32]>,
}

/// The private IPv4 blocks (RFC 1918) a guest's address and gateway must be in.
const PRIVATE: [(Ipv4Addr, u8); 3] = [
    (Ipv4Addr::new(10, 0, 0, 0), 8),
    (Ipv4Addr::new(172, 16, 0, 0), 12),
    (Ipv4Addr::new(192, 168, 0, 0), 16),
];

fn mask(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix))
    }
}

fn in_net(a: Ipv4Addr, net: Ipv4Addr, prefix: u8) -> bool {
    u32::from(a) & mask(prefix) == u32::from(net) & mask(prefix)
}

/// `a.b.c.d/NN` with NN 8-30, the whole subnet inside one private block, and the address neither
/// the subnet's network nor its broadcast address.
fn parse_ip(s: &str) -> Result<(Ipv4Addr, u8), String> {
    let (a, p) = s
        .split_once('/')
        .ok_or_else(|| format!("ip {s:?} has no prefix length (want a.b.c.d/NN)"))?;
    let ip: Ipv4Addr = a
        .parse()
        .map_err(|_| format!("ip {s:?} is not an IPv4 address (want a.b.c.d/NN)"))?;
    let prefix: u8 = match p.parse() {
        Ok(n) if (8..=30).contains(&n) && !p.starts_with('0') => n,
        _ => return Err(format!("ip {s:?}: prefix length {p:?} is not 8-30")),
    };
    if !PRIVATE
        .iter()
        .any(|&(net, bits)| prefix >= bits && in_net(ip, net, bits))
    {
        return Err(format!(
            "ip {s:?} is not inside a private range (10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16)"
        ));
    }
    let host = u32::from(ip) & !mask(prefix);
    if host == 0 || host == !mask(prefix) {
        return Err(format!(
            "ip {s:?} is its subnet's network or broadcast address"
        ));
    }
    Ok((ip, prefix))
}

/// Six two-digit hex octets separated by `:`, unicast, not all zero; returned lowercase.
fn parse_mac(s: &str) -> Result<String, String> {
    let octets: Vec<&str> = s.split(':').collect();
    let bytes: Option<Vec<u8>> = (octets.len() == 6)
        .then(|| {
            octets
                .iter()
                .map(|o| {
                    (o.len() == 2 && o.bytes().all(|b| b.is_ascii_hexdigit()))
                        .then(|| u8::from_str_radix(o, 16).ok())
                        .flatten()
                })
                .collect()
        })
        .flatten();
    let Some(b) = bytes else {
        return Err(format!(
            "mac {:?} is not a MAC address (want xx:xx:xx:xx:xx:xx)",
            s.chars().take(40).collect::<String>()
        ));
    };
    if b[0] & 1 == 1 {
        return Err(format!("mac {s:?} is a multicast address"));
    }
    if b.iter().all(|&x| x == 0) {
        return Err(format!("mac {s:?} is all zero"));
    }
    Ok(s.to_ascii_lowercase())
}

impl Reconfigure {
    /// Checks every field; the first refusal says which field and why.
    pub fn validate(&self) -> Result<Validated, String> {
        cmdline::check_name("name", &self.name)?;
        let (ip, prefix) = parse_ip(&self.ip)?;
        let gateway: Ipv4Addr = self.gateway.parse().map_err(|_| {
            format!(
                "gateway {:?} is not an IPv4 address",
                self.gateway.chars().take(40).collect::<String>()
            )
        })?;
        if !in_net(gateway, ip, prefix) {
            return Err(format!(
                "gateway {gateway} is not inside {}/{prefix}",
                Ipv4Addr::from(u32::from(ip) & mask(prefix))
            ));
        }
        if gateway == ip {
            return Err(format!("gateway {gateway} is the guest's own address"));
        }
        let host = u32::from(gateway) & !mask(prefix);
        if host == 0 || host == !mask(prefix) {
            return Err(format!(
                "gateway {gateway} is its subnet's network or broadcast address"
            ));
        }
        let mac = parse_mac(&self.mac)?;
        let authorized_key = cmdline::decode_key("key", &self.key)?;
        let seed = match &self.seed {
            None => None,
            Some(h) => {
                let mut b = [0u8; 32];
                match hex::decode_to_slice(h, &mut b) {
                    Ok(()) => Some(b),
                    Err(_) => {
                        return Err(format!(
                            "seed is not 64 hex digits ({} characters given)",
                            h.len()
                        ))
                    }
                }
            }
        };
        Ok(Validated {
            name: self.name.clone(),
            ip,
            prefix,
            gateway,
            mac,
            authorized_key,
            seed,
        })
    }
}

/// A fresh instance id: 32 random lowercase hex digits.
pub fn new_instance_id() -> String {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 16];
    if ring::rand::SystemRandom::new().fill(&mut b).is_err() {
        // No kernel randomness (never seen in a guest): still unique per process and moment.
        let seed = format!(
            "{:?} {} {:?}",
            std::time::SystemTime::now(),
            std::process::id(),
            std::thread::current().id()
        );
        b.copy_from_slice(
            &ring::digest::digest(&ring::digest::SHA256, seed.as_bytes()).as_ref()[..16],
        );
    }
    hex::encode(b)
}

/// The instance id a `reconfigure` gives: the hash of fresh kernel randomness, the clocks and the
/// new identity (name, address, MAC). Clones restored from one snapshot share the kernel's random
/// generator state, so its output alone repeats from clone to clone (found by the smoke suite: two
/// clones drew the same id); their identities never do.
pub fn instance_id_for(v: &Validated) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(new_instance_id().as_bytes());
    ctx.update(format!("{:?}", std::time::SystemTime::now()).as_bytes());
    ctx.update(format!("{:?}", std::time::Instant::now()).as_bytes());
    ctx.update(
        format!(
            "{}\0{}/{}\0{}\0{}",
            v.name, v.ip, v.prefix, v.gateway, v.mac
        )
        .as_bytes(),
    );
    hex::encode(&ctx.finish().as_ref()[..16])
}

/// Mixes the host's seed (secret, fresh per restore), the clone's new identity and the clocks
/// into the kernel's random pool and asks for a reseed (`RNDRESEEDCRNG`), so clones of one
/// snapshot stop drawing the same "random" numbers (sshd's, TLS's). Without a host seed the mix is
/// clone-unique but not secret. Best effort: a failure is logged, never fatal.
fn reseed_kernel_rng(v: &Validated) {
    use std::io::Write;
    const RNDRESEEDCRNG: libc::c_ulong = 0x5207;
    let mix = format!(
        "banger reconfigure {} {}/{} {} {:?} {:?}",
        v.name,
        v.ip,
        v.prefix,
        v.mac,
        std::time::SystemTime::now(),
        std::time::Instant::now()
    );
    let r = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")
        .and_then(|mut f| {
            if let Some(seed) = &v.seed {
                f.write_all(seed)?;
            }
            f.write_all(mix.as_bytes())?;
            use std::os::fd::AsRawFd;
            // SAFETY: RNDRESEEDCRNG takes no argument; the descriptor is open for the call.
            if unsafe { libc::ioctl(f.as_raw_fd(), RNDRESEEDCRNG) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    if let Err(e) = r {
        crate::logging::error(
            "banger-vsock-agent",
            "reseeding the kernel's random generator after a restore",
            serde_json::json!({"error": e.to_string()}),
        );
    }
}

/// An instance id as agents make them: 32 lowercase hex digits.
pub fn is_instance_id(s: &str) -> bool {
    s.len() == 32
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Work left for after the answer is written (see [`Configurer::apply`]).
pub type Deferred = Box<dyn FnOnce() -> Result<(), String> + Send>;

/// How `reconfigure` changes a guest.
pub trait Configurer: Send + Sync + std::fmt::Debug {
    /// Applies `v`. With `defer_address_removal` (the agent's TCP test transport, which rides the
    /// very interface being changed), the removal of eth0's old addresses is returned instead of
    /// done, to run once the answer has left.
    fn apply(&self, v: &Validated, defer_address_removal: bool)
        -> Result<Option<Deferred>, String>;
}

/// The stand-in VMM's fake guest: the hostname `hello` reports changes; there is nothing else.
#[derive(Debug, Clone)]
pub struct InMemory {
    /// The hostname `hello` serves (shared with the env's [`crate::agent::Source::Shared`]).
    pub hostname: Arc<Mutex<String>>,
}

impl Configurer for InMemory {
    fn apply(&self, v: &Validated, _defer: bool) -> Result<Option<Deferred>, String> {
        let mut h = self
            .hostname
            .lock()
            .map_err(|_| "the fake guest's hostname lock is poisoned".to_string())?;
        *h = v.name.clone();
        Ok(None)
    }
}

/// With a root other than `/` (tests), the kernel's hostname is not the guest's to change.
struct FilesOnly;

impl prepare::HostnameSetter for FilesOnly {
    fn set(&self, _name: &str) -> std::io::Result<()> {
        Ok(())
    }
}

/// A real guest: the hostname (kernel and `<root>/etc/hostname`), `<root>/root/.ssh/authorized_keys`
/// (the key added, others kept, as at boot), and the interface through `ip`.
#[derive(Debug, Clone)]
pub struct System {
    /// Where and as whom files are written (the same options as the start-up preparation).
    pub files: prepare::Options,
    /// Whether to call `sethostname(2)` (only with the guest's own root).
    pub kernel_hostname: bool,
    /// The `ip` program.
    pub ip: PathBuf,
    /// The interface to change ([`GUEST_IFACE`] in a guest); `None` refuses every reconfigure
    /// before anything is touched (an agent run on another root in tests must never change the
    /// test machine's network).
    pub iface: Option<String>,
    /// `/proc/sys/net/ipv4/conf`, where `promote_secondaries` is set for the interface.
    pub ipv4_conf: PathBuf,
}

impl System {
    /// A guest's own: root `/`, root-owned files, the kernel hostname, `ip`, eth0.
    pub fn guest() -> Self {
        System {
            files: prepare::Options::guest(),
            kernel_hostname: true,
            ip: PathBuf::from("ip"),
            iface: Some(GUEST_IFACE.to_string()),
            ipv4_conf: PathBuf::from("/proc/sys/net/ipv4/conf"),
        }
    }
}

/// Asks a running sshd to reload (`SIGHUP`: it re-executes itself and loads the host key again;
/// open sessions stay). The pid comes from `<root>/run/sshd.pid` and must name a process called
/// `sshd`. No sshd yet is fine (it loads the new key when it starts); a failure is logged, never
/// fatal: the key on disk is the new one either way, and it is the one `hello` reports.
fn reload_sshd(root: &std::path::Path) {
    if let Err(e) = hup_sshd(&root.join("run/sshd.pid"), &root.join("proc")) {
        crate::logging::error(
            "banger-vsock-agent",
            "telling sshd to load the new host key",
            serde_json::json!({"error": e}),
        );
    }
}

/// Sends `SIGHUP` to the pid in `pid_file` if `<proc_root>/<pid>/comm` is `sshd`; `Ok(None)` when
/// there is no pid file.
fn hup_sshd(
    pid_file: &std::path::Path,
    proc_root: &std::path::Path,
) -> Result<Option<i32>, String> {
    let text = match std::fs::read_to_string(pid_file) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("reading {}: {e}", pid_file.display())),
    };
    let pid = text
        .trim()
        .parse::<i32>()
        .ok()
        .filter(|p| *p > 1)
        .ok_or_else(|| format!("{} holds no pid ({:?})", pid_file.display(), text.trim()))?;
    let comm = std::fs::read_to_string(proc_root.join(format!("{pid}/comm"))).unwrap_or_default();
    if comm.trim_end() != "sshd" {
        return Err(format!(
            "pid {pid} from {} is not sshd ({:?}); not signalled",
            pid_file.display(),
            comm.trim_end()
        ));
    }
    let p = rustix::process::Pid::from_raw(pid).ok_or_else(|| format!("bad pid {pid}"))?;
    rustix::process::kill_process(p, rustix::process::Signal::Hup)
        .map_err(|e| format!("SIGHUP to sshd (pid {pid}): {e}"))?;
    Ok(Some(pid))
}

/// Runs `ip ARGS`; its stderr in the error.
fn run_ip(ip: &std::path::Path, args: &[&str]) -> Result<String, String> {
    let shown = format!("{} {}", ip.display(), args.join(" "));
    let out = Command::new(ip)
        .args(args)
        .output()
        .map_err(|e| format!("running `{shown}`: {e} (is iproute2 installed in the image?)"))?;
    if !out.status.success() {
        return Err(format!(
            "`{shown}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The IPv4 addresses on `iface` (`ip -j -4 addr show dev IFACE`), as `a.b.c.d/NN`.
fn ipv4_addrs(ip: &std::path::Path, iface: &str) -> Result<Vec<String>, String> {
    let out = run_ip(ip, &["-j", "-4", "addr", "show", "dev", iface])?;
    let v: serde_json::Value = serde_json::from_str(out.trim())
        .map_err(|e| format!("reading `ip -j -4 addr show dev {iface}`: {e}: {out:?}"))?;
    let mut addrs = Vec::new();
    for link in v.as_array().into_iter().flatten() {
        for a in link["addr_info"].as_array().into_iter().flatten() {
            if let (Some(l), Some(p)) = (a["local"].as_str(), a["prefixlen"].as_u64()) {
                addrs.push(format!("{l}/{p}"));
            }
        }
    }
    Ok(addrs)
}

/// Removes every IPv4 address on `iface` but `keep`, then sets the default route again (a
/// removed primary address can take routes with it).
fn remove_other_addrs(
    ip: &std::path::Path,
    iface: &str,
    keep: &str,
    gateway: &str,
) -> Result<(), String> {
    for a in ipv4_addrs(ip, iface)? {
        if a != keep {
            run_ip(ip, &["addr", "del", &a, "dev", iface])?;
        }
    }
    run_ip(
        ip,
        &["route", "replace", "default", "via", gateway, "dev", iface],
    )
    .map(drop)
}

impl Configurer for System {
    fn apply(
        &self,
        v: &Validated,
        defer_address_removal: bool,
    ) -> Result<Option<Deferred>, String> {
        let Some(iface) = self.iface.as_deref() else {
            return Err(
                "this agent has no interface to reconfigure (it runs on another root than /; tests pass --iface); nothing was changed"
                    .into(),
            );
        };
        // Milliseconds since the start at each step, for the log line (TCG guests are slow).
        let t0 = std::time::Instant::now();
        let mut steps = serde_json::Map::new();
        let mut lap = |what: &str| {
            steps.insert(what.into(), (t0.elapsed().as_millis() as u64).into());
        };
        let setter: &dyn prepare::HostnameSetter = if self.kernel_hostname {
            &prepare::KernelHostname
        } else {
            &FilesOnly
        };
        prepare::set_hostname(&v.name, &self.files, setter).map_err(|e| e.to_string())?;
        lap("hostname");
        prepare::write_authorized_key(&v.authorized_key, &self.files).map_err(|e| e.to_string())?;
        lap("authorized_key");
        let addr = format!("{}/{}", v.ip, v.prefix);
        let gw = v.gateway.to_string();
        // Live MAC change (virtio-net supports it): no link down, so no route is lost.
        run_ip(&self.ip, &["link", "set", "dev", iface, "address", &v.mac])?;
        lap("mac");
        // The new address may share the old one's subnet and so start as its secondary: it must
        // be promoted, not deleted with it, when the old one goes.
        let promote = self.ipv4_conf.join(iface).join("promote_secondaries");
        std::fs::write(&promote, "1\n")
            .map_err(|e| format!("writing 1 to {}: {e}", promote.display()))?;
        run_ip(&self.ip, &["addr", "replace", &addr, "dev", iface])?;
        run_ip(
            &self.ip,
            &["route", "replace", "default", "via", &gw, "dev", iface],
        )?;
        lap("address_and_route");
        if self.kernel_hostname {
            // The guest's own kernel only (never a test machine's).
            reseed_kernel_rng(v);
            lap("rng_reseed");
        }
        // Clones of one snapshot woke with the source's sshd host key: each gets its own (after
        // the reseed, or all would draw the same one), and sshd is told to load it.
        prepare::replace_host_key(&self.files).map_err(|e| e.to_string())?;
        lap("host_key");
        if self.kernel_hostname {
            reload_sshd(&self.files.root);
            lap("sshd_reload");
        }
        crate::logging::info(
            "banger-vsock-agent",
            "reconfigured",
            serde_json::json!({
                "name": v.name, "address": addr, "mac": v.mac, "ms_at": steps,
                "old_addresses_removed": if defer_address_removal { "after the answer" } else { "now" },
            }),
        );
        if defer_address_removal {
            let (ip, iface) = (self.ip.clone(), iface.to_string());
            return Ok(Some(Box::new(move || {
                remove_other_addrs(&ip, &iface, &addr, &gw)
            })));
        }
        remove_other_addrs(&self.ip, iface, &addr, &gw)?;
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    const LINE: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAILf5oszbHqEb+6X3j8hlzlMXxaLuKBJTgVM/l0kQlrAO owner@host";

    fn good() -> Reconfigure {
        Reconfigure {
            name: "clone-1".into(),
            ip: "172.30.0.7/24".into(),
            gateway: "172.30.0.1".into(),
            mac: "02:AB:cd:00:00:07".into(),
            key: base64::engine::general_purpose::STANDARD.encode(format!("{LINE}\n")),
            seed: Some("ab".repeat(32)),
        }
    }

    #[test]
    fn a_good_request_validates() {
        assert_eq!(
            good().validate().unwrap(),
            Validated {
                name: "clone-1".into(),
                ip: Ipv4Addr::new(172, 30, 0, 7),
                prefix: 24,
                gateway: Ipv4Addr::new(172, 30, 0, 1),
                mac: "02:ab:cd:00:00:07".into(),
                authorized_key: LINE.into(),
                seed: Some([0xab; 32]),
            }
        );
        let unseeded = Reconfigure {
            seed: None,
            ..good()
        };
        assert_eq!(unseeded.validate().unwrap().seed, None);
        for (ip, gw) in [
            ("10.0.0.2/8", "10.255.255.254"),
            ("192.168.7.9/30", "192.168.7.10"),
            ("172.31.255.1/16", "172.31.0.1"),
        ] {
            let r = Reconfigure {
                ip: ip.into(),
                gateway: gw.into(),
                ..good()
            };
            assert!(r.validate().is_ok(), "{ip} via {gw}: {:?}", r.validate());
        }
    }

    #[test]
    fn validation_table() {
        type Edit = fn(&mut Reconfigure);
        let cases: &[(&str, Edit, &str)] = &[
            (
                "empty name",
                |r| r.name = "".into(),
                "name=\"\" is not a valid hostname",
            ),
            (
                "upper name",
                |r| r.name = "Dev".into(),
                "not a valid hostname",
            ),
            (
                "dash name",
                |r| r.name = "-dev".into(),
                "not a valid hostname",
            ),
            (
                "long name",
                |r| r.name = "a".repeat(64),
                "over the 63-byte cap",
            ),
            (
                "dot name",
                |r| r.name = "a.b".into(),
                "not a valid hostname",
            ),
            (
                "no prefix",
                |r| r.ip = "172.30.0.7".into(),
                "no prefix length",
            ),
            (
                "bad ip",
                |r| r.ip = "172.30.0.300/24".into(),
                "not an IPv4 address",
            ),
            ("v6", |r| r.ip = "fd00::7/64".into(), "not an IPv4 address"),
            ("prefix 31", |r| r.ip = "172.30.0.7/31".into(), "not 8-30"),
            ("prefix 7", |r| r.ip = "10.0.0.7/7".into(), "not 8-30"),
            ("prefix junk", |r| r.ip = "172.30.0.7/2x".into(), "not 8-30"),
            ("prefix 024", |r| r.ip = "172.30.0.7/024".into(), "not 8-30"),
            (
                "public",
                |r| r.ip = "8.8.8.8/24".into(),
                "not inside a private range",
            ),
            (
                "wide",
                |r| r.ip = "172.16.0.7/8".into(),
                "not inside a private range",
            ),
            (
                "loopback",
                |r| r.ip = "127.0.0.2/8".into(),
                "not inside a private range",
            ),
            (
                "network",
                |r| r.ip = "172.30.0.0/24".into(),
                "network or broadcast",
            ),
            (
                "broadcast",
                |r| r.ip = "172.30.0.255/24".into(),
                "network or broadcast",
            ),
            (
                "gw junk",
                |r| r.gateway = "gw".into(),
                "gateway \"gw\" is not an IPv4",
            ),
            (
                "gw outside",
                |r| r.gateway = "172.30.1.1".into(),
                "not inside 172.30.0.0/24",
            ),
            (
                "gw is ip",
                |r| r.gateway = "172.30.0.7".into(),
                "own address",
            ),
            (
                "gw bcast",
                |r| r.gateway = "172.30.0.255".into(),
                "network or broadcast",
            ),
            (
                "mac short",
                |r| r.mac = "02:00:00:00:00".into(),
                "not a MAC address",
            ),
            (
                "mac long",
                |r| r.mac = "02:00:00:00:00:01:02".into(),
                "not a MAC address",
            ),
            (
                "mac digits",
                |r| r.mac = "02:00:00:00:00:1".into(),
                "not a MAC address",
            ),
            (
                "mac junk",
                |r| r.mac = "02:00:00:00:00:zz".into(),
                "not a MAC address",
            ),
            (
                "mac dashes",
                |r| r.mac = "02-00-00-00-00-01".into(),
                "not a MAC address",
            ),
            (
                "mac plus",
                |r| r.mac = "02:00:00:00:00:+1".into(),
                "not a MAC address",
            ),
            (
                "multicast",
                |r| r.mac = "03:00:00:00:00:01".into(),
                "multicast",
            ),
            ("zero", |r| r.mac = "00:00:00:00:00:00".into(), "all zero"),
            ("key junk", |r| r.key = "!!".into(), "key is not base64"),
            (
                "key text",
                |r| r.key = "aGVsbG8gd29ybGQ=".into(),
                "key does not decode to an OpenSSH",
            ),
            (
                "short seed",
                |r| r.seed = Some("abcd".into()),
                "seed is not 64 hex digits (4 characters given)",
            ),
            (
                "seed not hex",
                |r| r.seed = Some("zz".repeat(32)),
                "seed is not 64 hex digits",
            ),
        ];
        for (what, edit, want) in cases {
            let mut r = good();
            edit(&mut r);
            let e = r.validate().unwrap_err();
            assert!(e.contains(want), "{what}: {e:?} lacks {want:?}");
        }
    }

    /// Clones share the kernel's generator state; their identities make their ids differ even if
    /// the random part repeats.
    #[test]
    fn instance_ids_follow_the_identity() {
        let a = good().validate().unwrap();
        let b = Validated {
            name: "clone-2".into(),
            ..a.clone()
        };
        let (x, y) = (instance_id_for(&a), instance_id_for(&b));
        assert!(is_instance_id(&x) && is_instance_id(&y), "{x} {y}");
        assert_ne!(x, y);
        assert_ne!(instance_id_for(&a), x);
    }

    #[test]
    fn instance_ids_are_fresh_hex() {
        let a = new_instance_id();
        let b = new_instance_id();
        assert!(is_instance_id(&a), "{a}");
        assert_ne!(a, b);
        for bad in [
            "",
            "ABCDEF00000000000000000000000000",
            &"a".repeat(31),
            &"g".repeat(32),
        ] {
            assert!(!is_instance_id(bad), "{bad}");
        }
    }

    #[test]
    fn in_memory_guest_changes_its_hostname() {
        let h = Arc::new(Mutex::new("old".to_string()));
        let c = InMemory {
            hostname: h.clone(),
        };
        assert!(c
            .apply(&good().validate().unwrap(), true)
            .unwrap()
            .is_none());
        assert_eq!(*h.lock().unwrap(), "clone-1");
    }

    fn err(r: Result<Option<Deferred>, String>) -> String {
        match r {
            Err(e) => e,
            Ok(_) => panic!("expected a refusal"),
        }
    }

    /// The real guest's steps in order, against a recording `ip` and a temp root and conf dir:
    /// files first, then MAC, address, route; the old address removal now or deferred.
    #[test]
    fn system_steps_in_order_and_deferred_removal() {
        use std::os::unix::fs::PermissionsExt;
        let d = std::env::temp_dir().join(format!("banger-reconf-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("conf/eth0")).unwrap();
        std::fs::create_dir_all(d.join("root")).unwrap();
        let log = d.join("ip.log");
        let ip = d.join("ip");
        std::fs::write(
            &ip,
            format!(
                "#!/bin/sh\necho \"$*\" >> {}\ncase \"$*\" in -j*) echo '[{{\"ifname\":\"eth0\",\"addr_info\":[{{\"local\":\"172.30.0.5\",\"prefixlen\":24}},{{\"local\":\"172.30.0.7\",\"prefixlen\":24}}]}}]';; esac\n",
                log.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&ip, std::fs::Permissions::from_mode(0o755)).unwrap();
        // A recording ssh-keygen: writes a pair at its last argument.
        let keygen = d.join("ssh-keygen");
        std::fs::write(
            &keygen,
            format!(
                "#!/bin/sh\nfor a; do f=$a; done\necho \"keygen $(basename \"$f\" | cut -c1-20)\" >> {}\necho private > \"$f\"\necho \"ssh-ed25519 AAAAnew$$\" > \"$f.pub\"\n",
                log.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&keygen, std::fs::Permissions::from_mode(0o755)).unwrap();
        let sys = System {
            files: prepare::Options {
                root: d.join("root"),
                owner: None,
                keygen: keygen.clone(),
            },
            kernel_hostname: false,
            ip: ip.clone(),
            iface: Some("eth0".into()),
            ipv4_conf: d.join("conf"),
        };
        let v = good().validate().unwrap();
        let head = [
            "link set dev eth0 address 02:ab:cd:00:00:07",
            "addr replace 172.30.0.7/24 dev eth0",
            "route replace default via 172.30.0.1 dev eth0",
            "keygen .banger-new-host-key",
        ];
        let tail = [
            "-j -4 addr show dev eth0",
            "addr del 172.30.0.5/24 dev eth0",
            "route replace default via 172.30.0.1 dev eth0",
        ];
        let lines = || -> Vec<String> {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .lines()
                .map(str::to_string)
                .collect()
        };
        let deferred = sys.apply(&v, true).unwrap().expect("removal deferred");
        assert_eq!(lines(), head);
        assert_eq!(
            std::fs::read_to_string(d.join("root/etc/hostname")).unwrap(),
            "clone-1\n"
        );
        assert_eq!(
            std::fs::read_to_string(d.join("root/root/.ssh/authorized_keys")).unwrap(),
            format!("{LINE}\n")
        );
        assert_eq!(
            std::fs::read_to_string(d.join("conf/eth0/promote_secondaries")).unwrap(),
            "1\n"
        );
        let host_pub = d.join("root/etc/ssh/ssh_host_ed25519_key.pub");
        let first_key = std::fs::read_to_string(&host_pub).unwrap();
        assert!(first_key.starts_with("ssh-ed25519 AAAAnew"), "{first_key}");
        deferred().unwrap();
        assert_eq!(lines(), [&head[..], &tail[..]].concat());
        std::fs::remove_file(&log).unwrap();
        assert!(sys.apply(&v, false).unwrap().is_none());
        assert_eq!(lines(), [&head[..], &tail[..]].concat());
        assert_ne!(std::fs::read_to_string(&host_pub).unwrap(), first_key);
        // A failing ssh-keygen is an error naming it; the key in place stays, no temp file left.
        let before = std::fs::read_to_string(&host_pub).unwrap();
        let no_keygen = System {
            files: prepare::Options {
                keygen: PathBuf::from("false"),
                ..sys.files.clone()
            },
            ..sys.clone()
        };
        let e = err(no_keygen.apply(&v, false));
        assert!(e.contains("making a new sshd host key"), "{e}");
        assert_eq!(std::fs::read_to_string(&host_pub).unwrap(), before);
        let names: Vec<String> = std::fs::read_dir(d.join("root/etc/ssh"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        // A failing `ip` stops the steps and says which command.
        let failing = System {
            ip: PathBuf::from("false"),
            ..sys
        };
        let e = err(failing.apply(&v, false));
        assert!(e.contains("`false link set dev eth0 address"), "{e}");
        // No interface: refused before the hostname file is touched.
        std::fs::remove_dir_all(d.join("root/etc")).unwrap();
        let none = System {
            iface: None,
            ..failing
        };
        assert!(err(none.apply(&v, false)).contains("no interface"));
        assert!(!d.join("root/etc").exists());
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// Only a process named `sshd` is signalled; a pid file naming anything else is refused and
    /// that process keeps running; no pid file is no sshd.
    #[test]
    fn sshd_reload_signals_only_sshd() {
        use std::os::unix::process::ExitStatusExt;
        let d = std::env::temp_dir().join(format!("banger-hup-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        let pid_file = d.join("sshd.pid");
        let proc_root = std::path::Path::new("/proc");
        assert_eq!(hup_sshd(&pid_file, proc_root), Ok(None));
        let Some(sleep) = ["/bin/sleep", "/usr/bin/sleep"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
        else {
            eprintln!("SKIP: sshd_reload_signals_only_sshd: no sleep binary");
            return;
        };
        let fake_sshd = d.join("sshd");
        std::fs::copy(sleep, &fake_sshd).unwrap();
        let mut other = Command::new(sleep).arg("30").spawn().unwrap();
        let mut sshd = Command::new(&fake_sshd).arg("30").spawn().unwrap();
        std::fs::write(&pid_file, format!("{}\n", other.id())).unwrap();
        let e = hup_sshd(&pid_file, proc_root).unwrap_err();
        assert!(e.contains("is not sshd"), "{e}");
        assert!(
            other.try_wait().unwrap().is_none(),
            "a non-sshd process was signalled"
        );
        std::fs::write(&pid_file, "garbage\n").unwrap();
        assert!(hup_sshd(&pid_file, proc_root)
            .unwrap_err()
            .contains("holds no pid"));
        std::fs::write(&pid_file, format!("{}\n", sshd.id())).unwrap();
        assert_eq!(hup_sshd(&pid_file, proc_root), Ok(Some(sshd.id() as i32)));
        assert_eq!(sshd.wait().unwrap().signal(), Some(libc::SIGHUP));
        let _ = other.kill();
        let _ = other.wait();
        std::fs::remove_dir_all(&d).unwrap();
    }
}
