//! The helper's network methods against real kernel objects, each test inside a network namespace
//! it creates (`ip netns add`) and deletes: bridge and gateway address, the tap's owner, master and
//! isolation flag, the `inet banger` rules and NAT elements read back with `nft -j`, teardown, and
//! every refusal leaving the namespace exactly as it was. Never touches the root namespace.

mod common;

use banger::net::{link, nft, tap_name};
use banger::rpc::client::{self, CallError};
use banger::rpc::ErrorCode;
use common::*;
use serde_json::{json, Value};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The uid the taps must belong to (no passwd entry needed: iproute2 then prints the number).
const OWNER: u32 = 4242;

fn skip_reason() -> Option<String> {
    if !is_root() {
        return Some("needs root (network namespaces, taps, nftables)".into());
    }
    for (tool, arg) in [("ip", "-V"), ("nft", "--version")] {
        if !have(tool, arg) {
            return Some(format!(
                "`{tool}` is not installed (scripts/deps.sh installs it)"
            ));
        }
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        return Some("/dev/net/tun is missing (modprobe tun)".into());
    }
    None
}

macro_rules! need_netns {
    ($name:expr) => {
        if let Some(why) = skip_reason() {
            eprintln!("SKIP: {}: {why}", $name);
            return;
        }
    };
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A network namespace, deleted on drop, with a helper running inside it.
struct Ns {
    name: String,
    bed: Bed,
    helper: Option<Server>,
}

impl Ns {
    fn new(tag: &str) -> Ns {
        let name = format!(
            "bgt-{tag}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst)
        );
        let o = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .unwrap();
        assert!(o.status.success(), "ip netns add: {}", stderr(&o));
        let bed = Bed::new(&format!("net-{tag}"));
        let l = bed.layout();
        std::fs::create_dir_all(l.etc_dir()).unwrap();
        banger::system::install_toml::save(
            &l,
            &banger::system::install_toml::InstallInfo {
                owner_user: "bangertest".into(),
                owner_uid: OWNER,
                owner_gid: OWNER,
                owner_home: "/nonexistent".into(),
                version: "0.0.0".into(),
                commit: "test".into(),
                built_at: "2026-01-01T00:00:00Z".into(),
                installed_at: "2026-01-01T00:00:00Z".into(),
            },
        )
        .unwrap();
        let mut ns = Ns {
            name,
            bed,
            helper: None,
        };
        ns.start_helper();
        ns
    }

    fn start_helper(&mut self) {
        let sock = self.bed.layout().helper_socket();
        let _ = std::fs::remove_file(&sock);
        self.helper = Some(
            self.bed
                .spawn_in(Some(&self.name), "bangerd-root", &sock, &[]),
        );
    }

    fn restart_helper(&mut self) {
        if let Some(mut h) = self.helper.take() {
            h.sigterm_and_wait();
        }
        self.start_helper();
    }

    fn call(&self, method: &str, params: Value) -> Result<Value, CallError> {
        client::call(&self.bed.layout().helper_socket(), method, params)
    }

    fn out(&self, args: &[&str]) -> String {
        let o = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args)
            .output()
            .unwrap();
        assert!(o.status.success(), "{args:?}: {}", stderr(&o));
        stdout(&o)
    }

    fn links(&self) -> Vec<link::Link> {
        link::parse(&self.out(&["ip", "-d", "-j", "addr", "show"])).unwrap()
    }

    fn link(&self, name: &str) -> Option<link::Link> {
        self.links().into_iter().find(|l| l.name == name)
    }

    /// Raw `nft -j list table inet banger`, or None when the table is absent.
    fn table_json(&self) -> Option<String> {
        let o = Command::new("ip")
            .args([
                "netns", "exec", &self.name, "nft", "-j", "list", "table", "inet", "banger",
            ])
            .output()
            .unwrap();
        o.status.success().then(|| stdout(&o))
    }

    fn table(&self) -> nft::TableState {
        self.table_json()
            .map(|j| nft::parse(&j).unwrap())
            .unwrap_or_default()
    }

    /// Every nftables table in the namespace (to prove nothing outside `inet banger`).
    fn tables(&self) -> String {
        self.out(&["nft", "list", "tables"])
    }

    fn ip_forward(&self) -> String {
        self.out(&["cat", "/proc/sys/net/ipv4/ip_forward"])
            .trim()
            .to_string()
    }

    /// Everything a refusal must leave alone.
    fn snapshot(&self) -> (Vec<String>, Option<String>, String, String) {
        let mut names: Vec<String> = self
            .links()
            .into_iter()
            .map(|l| {
                format!(
                    "{} {:?} {:?} {:?} {}",
                    l.name, l.kind, l.master, l.ipv4, l.up
                )
            })
            .collect();
        names.sort();
        (names, self.table_json(), self.tables(), self.ip_forward())
    }
}

impl Drop for Ns {
    fn drop(&mut self) {
        self.helper.take();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

fn rpc_code(r: Result<Value, CallError>) -> (ErrorCode, String) {
    match r {
        Err(CallError::Rpc(e)) => (e.code, e.message),
        other => panic!("expected an RPC error, got {other:?}"),
    }
}

const A: &str = "0a0a0a0a0a01";
const B: &str = "0b0b0b0b0b02";

#[test]
fn net_up_builds_bridge_tap_and_rules_and_net_down_removes_them() {
    need_netns!("net_up_builds_bridge_tap_and_rules_and_net_down_removes_them");
    let ns = Ns::new("up");
    assert_eq!(ns.ip_forward(), "0");
    let r = ns
        .call(
            "priv.net_up",
            json!({"id": A, "ip": "172.30.0.2", "nat": false}),
        )
        .unwrap();
    assert_eq!(r, json!({"tap": tap_name(A), "bridge": "banger0"}));

    let br = ns.link("banger0").expect("bridge created");
    assert_eq!(br.kind.as_deref(), Some("bridge"));
    assert!(br.up, "bridge up");
    assert_eq!(br.ipv4, vec![("172.30.0.1".parse().unwrap(), 24)]);

    let t = ns.link(&tap_name(A)).expect("tap created");
    assert_eq!(t.kind.as_deref(), Some("tun"));
    assert_eq!(t.tun_type.as_deref(), Some("tap"));
    assert_eq!(
        t.tun_owner.as_deref(),
        Some(OWNER.to_string().as_str()),
        "tap owner"
    );
    assert!(t.persist, "persistent");
    assert_eq!(t.master.as_deref(), Some("banger0"));
    assert_eq!(t.isolated, Some(true), "port isolation");
    assert!(t.up);
    // The kernel's own record of the owner, through the namespace's sysfs.
    let owner = ns.out(&["cat", &format!("/sys/class/net/{}/owner", tap_name(A))]);
    assert_eq!(owner.trim(), OWNER.to_string());

    let st = ns.table();
    assert!(st.present && st.set_present);
    assert!(st.rules_current("banger0"), "{st:?}");
    assert!(st.nat.is_empty(), "no NAT for a non-NAT VM: {:?}", st.nat);
    let raw = ns.table_json().unwrap();
    assert!(raw.contains("\"masquerade\""), "{raw}");
    assert!(
        raw.contains("\"established\"") && raw.contains("\"related\""),
        "{raw}"
    );
    let tables = ns.tables();
    assert_eq!(
        tables.trim(),
        "table inet banger",
        "nothing outside the table"
    );
    assert_eq!(ns.ip_forward(), "0", "no NAT VM: forwarding untouched");

    // A NAT VM: its address alone is in the set; forwarding on.
    ns.call(
        "priv.net_up",
        json!({"id": B, "ip": "172.30.0.3", "nat": true}),
    )
    .unwrap();
    let st = ns.table();
    assert_eq!(
        st.nat,
        vec![("172.30.0.3".parse().unwrap(), Some(B.to_string()))]
    );
    assert_eq!(ns.ip_forward(), "1");
    assert!(ns.link(&tap_name(B)).unwrap().isolated == Some(true));

    // Down: tap and element gone, forwarding restored, the other VM untouched.
    ns.call("priv.net_down", json!({"id": B})).unwrap();
    assert!(ns.link(&tap_name(B)).is_none(), "tap removed");
    assert!(ns.table().nat.is_empty());
    assert_eq!(ns.ip_forward(), "0", "forwarding restored");
    assert!(ns.link(&tap_name(A)).is_some());
    ns.call("priv.net_down", json!({"id": B})).unwrap();
    ns.call("priv.net_down", json!({"id": A})).unwrap();
    assert!(ns.link(&tap_name(A)).is_none());
    ns.call("priv.net_down", json!({"id": A})).unwrap();

    // Purge: bridge and table gone.
    ns.call(
        "priv.net_up",
        json!({"id": A, "ip": "172.30.0.2", "nat": true}),
    )
    .unwrap();
    ns.call("priv.net_purge", json!({})).unwrap();
    assert!(ns.link("banger0").is_none());
    assert!(ns.link(&tap_name(A)).is_none());
    assert!(ns.table_json().is_none());
    assert_eq!(ns.tables().trim(), "");
    assert_eq!(ns.ip_forward(), "0");
    ns.call("priv.net_purge", json!({})).unwrap();
}

#[test]
fn net_up_is_idempotent_and_survives_helper_restarts() {
    need_netns!("net_up_is_idempotent_and_survives_helper_restarts");
    let mut ns = Ns::new("idem");
    let up = json!({"id": A, "ip": "172.30.0.2", "nat": true});
    ns.call("priv.net_up", up.clone()).unwrap();
    let tap = ns.link(&tap_name(A)).unwrap();
    let rules = ns.table_json().unwrap();
    for _ in 0..3 {
        ns.restart_helper();
        assert_eq!(
            ns.link(&tap_name(A)).unwrap(),
            tap,
            "restart touched the tap"
        );
        assert_eq!(ns.table_json().unwrap(), rules, "restart touched the rules");
        ns.call("priv.net_up", up.clone()).unwrap();
        assert_eq!(ns.link(&tap_name(A)).unwrap().ifindex, tap.ifindex);
        assert_eq!(
            ns.table_json().unwrap(),
            rules,
            "repeated net_up changed the table"
        );
    }
    // The NAT bit follows the last net_up for the VM.
    ns.call(
        "priv.net_up",
        json!({"id": A, "ip": "172.30.0.2", "nat": false}),
    )
    .unwrap();
    assert!(ns.table().nat.is_empty());
    assert_eq!(ns.ip_forward(), "0");
    assert_eq!(ns.link(&tap_name(A)).unwrap().ifindex, tap.ifindex);
    // The whole table deleted by hand: the next net_up notices (its transaction fails) and
    // re-asserts the rules.
    ns.out(&["nft", "delete", "table", "inet", "banger"]);
    ns.call(
        "priv.net_up",
        json!({"id": B, "ip": "172.30.0.3", "nat": true}),
    )
    .unwrap();
    let st = ns.table();
    assert!(st.rules_current("banger0"), "{st:?}");
    assert_eq!(
        st.nat_of(B),
        vec!["172.30.0.3".parse::<std::net::Ipv4Addr>().unwrap()]
    );
    // A chain flushed by hand is only re-checked by a new helper process (doctor FAILs meanwhile);
    // its first net_up puts the rules back.
    ns.out(&["nft", "flush", "chain", "inet", "banger", "input"]);
    assert!(!ns.table().rules_current("banger0"));
    ns.restart_helper();
    ns.call(
        "priv.net_up",
        json!({"id": B, "ip": "172.30.0.3", "nat": true}),
    )
    .unwrap();
    assert!(ns.table().rules_current("banger0"));
    assert_eq!(
        ns.table().nat.len(),
        1,
        "elements kept across the re-assert"
    );
}

/// Runs `f` on a thread that has entered `ns` (setns moves only the calling thread).
fn in_ns<T: Send>(ns: &Ns, f: impl FnOnce() -> T + Send) -> T {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(format!("/run/netns/{}", ns.name)).unwrap();
    std::thread::scope(|sc| {
        sc.spawn(|| {
            // SAFETY: setns only reads the fd, which stays open for the call.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .unwrap()
    })
}

#[test]
fn nat_elements_are_read_first_and_only_what_differs_changes() {
    need_netns!("nat_elements_are_read_first_and_only_what_differs_changes");
    use banger::net::nfnl::{self, Change};
    let ns = Ns::new("nfnl");
    let ip: std::net::Ipv4Addr = "172.30.0.9".parse().unwrap();
    // No table yet: reading and changing are errors, and nothing is created.
    in_ns(&ns, || {
        assert!(nfnl::element(ip).is_err());
        let e = nfnl::set_exactly(ip, A, true).unwrap_err();
        assert!(e.to_string().contains("nat_guests"), "{e}");
    });
    assert!(
        ns.table_json().is_none(),
        "a failed change created the table"
    );
    ns.call(
        "priv.net_up",
        json!({"id": A, "ip": "172.30.0.2", "nat": false}),
    )
    .unwrap();
    let nat = |ns: &Ns| ns.table().nat;
    in_ns(&ns, || {
        // Absent and wanted absent: nothing to change.
        assert_eq!(nfnl::element(ip).unwrap(), None);
        assert_eq!(nfnl::set_exactly(ip, A, false).unwrap(), vec![]);
    });
    // Planted behind the helper's back with another VM's id: read from the kernel, replaced.
    let plant = |elem: &str| {
        ns.out(&[
            "nft",
            "add",
            "element",
            "inet",
            "banger",
            "nat_guests",
            elem,
        ]);
    };
    plant("{ 172.30.0.9 comment \"someone\" }");
    in_ns(&ns, || {
        assert_eq!(nfnl::element(ip).unwrap(), Some(Some("someone".into())));
        assert_eq!(
            nfnl::set_exactly(ip, A, true).unwrap(),
            vec![Change::Add(ip, A), Change::Delete(ip), Change::Add(ip, A)]
        );
    });
    // What nft lists is what netlink wrote (the comment included).
    assert_eq!(nat(&ns), vec![(ip, Some(A.to_string()))]);
    in_ns(&ns, || {
        assert_eq!(
            nfnl::set_exactly(ip, A, true).unwrap(),
            vec![],
            "already so"
        );
        assert_eq!(
            nfnl::set_exactly(ip, A, false).unwrap(),
            vec![Change::Add(ip, A), Change::Delete(ip)]
        );
    });
    assert_eq!(nat(&ns), vec![]);
    // One without a comment is found too, and removed.
    plant("{ 172.30.0.9 }");
    in_ns(&ns, || {
        assert_eq!(nfnl::element(ip).unwrap(), Some(None));
        assert_eq!(nfnl::set_exactly(ip, A, false).unwrap().len(), 2);
    });
    assert_eq!(nat(&ns), vec![]);
    // The set's other elements are never touched.
    ns.call(
        "priv.net_up",
        json!({"id": B, "ip": "172.30.0.3", "nat": true}),
    )
    .unwrap();
    in_ns(&ns, || {
        nfnl::set_exactly(ip, A, true).unwrap();
        nfnl::set_exactly(ip, A, false).unwrap();
    });
    assert_eq!(
        nat(&ns),
        vec![("172.30.0.3".parse().unwrap(), Some(B.to_string()))]
    );
}

#[test]
fn refusals_create_nothing() {
    need_netns!("refusals_create_nothing");
    let ns = Ns::new("refuse");
    let before = ns.snapshot();
    for (params, want) in [
        (
            json!({"id": "A", "ip": "172.30.0.2", "nat": false}),
            "VM id",
        ),
        (
            json!({"id": "../x", "ip": "172.30.0.2", "nat": false}),
            "VM id",
        ),
        (json!({"id": "", "ip": "172.30.0.2", "nat": false}), "VM id"),
        (
            json!({"id": A, "ip": "172.30.1.2", "nat": false}),
            "not a guest address",
        ),
        (
            json!({"id": A, "ip": "10.0.0.2", "nat": false}),
            "not a guest address",
        ),
        (json!({"id": A, "ip": "172.30.0.1", "nat": false}), "bridge"),
        (
            json!({"id": A, "ip": "172.30.0.0", "nat": false}),
            "not a guest address",
        ),
        (
            json!({"id": A, "ip": "172.30.0.255", "nat": false}),
            "not a guest address",
        ),
        (json!({"id": A, "ip": "nope", "nat": false}), "IPv4"),
        (json!({"id": A, "ip": "172.30.0.2", "nat": "yes"}), "nat"),
        (json!({"id": A, "ip": "172.30.0.2"}), "nat"),
        (
            json!({"id": A, "ip": "172.30.0.2", "nat": false, "tap_only": "yes"}),
            "tap_only",
        ),
        (
            json!({"id": A, "ip": "172.30.0.2", "nat": false, "dev": "eth0"}),
            "dev",
        ),
        (json!(null), "missing"),
    ] {
        let (code, msg) = rpc_code(ns.call("priv.net_up", params.clone()));
        assert_eq!(code, ErrorCode::BadRequest, "{params}: {msg}");
        assert!(msg.contains(want), "{params}: {msg}");
        assert_eq!(ns.snapshot(), before, "{params} changed something");
    }
    for params in [json!({"id": "A"}), json!({"id": A, "ip": "x"}), json!({})] {
        let (code, _) = rpc_code(ns.call("priv.net_down", params.clone()));
        assert_eq!(code, ErrorCode::BadRequest, "{params}");
    }
    let (code, _) = rpc_code(ns.call("priv.net_purge", json!({"all": true})));
    assert_eq!(code, ErrorCode::BadRequest);
    assert_eq!(ns.snapshot(), before);

    // A bad config: refused naming the key, nothing created.
    let cfg = ns.bed.layout().config_toml();
    for (text, key) in [
        ("[network]\nsubnet = \"8.8.8.0/24\"\n", "network.subnet"),
        ("[network]\nbridge = \"eth9\"\n", "network.bridge"),
        ("[network]\nbridges = \"banger0\"\n", "network.bridges"),
    ] {
        std::fs::write(&cfg, text).unwrap();
        let (_, msg) = rpc_code(ns.call(
            "priv.net_up",
            json!({"id": A, "ip": "172.30.0.2", "nat": false}),
        ));
        assert!(msg.contains(key), "{text}: {msg}");
        assert_eq!(ns.snapshot(), before, "{text} changed something");
    }
    // The configured subnet is the one checked.
    std::fs::write(
        &cfg,
        "[network]\nbridge = \"banger-t\"\nsubnet = \"10.77.0.0/16\"\n",
    )
    .unwrap();
    let (_, msg) = rpc_code(ns.call(
        "priv.net_up",
        json!({"id": A, "ip": "172.30.0.2", "nat": false}),
    ));
    assert!(msg.contains("10.77.0.0/16"), "{msg}");
    assert_eq!(ns.snapshot(), before);
    let r = ns
        .call(
            "priv.net_up",
            json!({"id": A, "ip": "10.77.3.4", "nat": false}),
        )
        .unwrap();
    assert_eq!(r["bridge"], "banger-t");
    assert_eq!(
        ns.link("banger-t").unwrap().ipv4,
        vec![("10.77.0.1".parse().unwrap(), 16)]
    );
}

#[test]
fn a_tap_belongs_to_one_vm() {
    need_netns!("a_tap_belongs_to_one_vm");
    let ns = Ns::new("clash");
    // Two ids with the same first 10 characters map to the same tap name.
    let (one, two) = ("0c0c0c0c0c01", "0c0c0c0c0c02");
    assert_eq!(tap_name(one), tap_name(two));
    ns.call(
        "priv.net_up",
        json!({"id": one, "ip": "172.30.0.2", "nat": true}),
    )
    .unwrap();
    let before = ns.snapshot();
    let (_, msg) = rpc_code(ns.call(
        "priv.net_up",
        json!({"id": two, "ip": "172.30.0.3", "nat": true}),
    ));
    assert!(msg.contains(one), "{msg}");
    let (_, msg) = rpc_code(ns.call("priv.net_down", json!({"id": two})));
    assert!(msg.contains(one), "{msg}");
    assert_eq!(ns.snapshot(), before);
    assert_eq!(ns.table().nat_of(one).len(), 1);
}

#[test]
fn an_interface_that_is_not_banger_s_is_refused() {
    need_netns!("an_interface_that_is_not_banger_s_is_refused");
    let ns = Ns::new("foreign");
    // Something else already holds the bridge's name.
    ns.out(&["ip", "tuntap", "add", "dev", "banger0", "mode", "tap"]);
    let before = ns.snapshot();
    let (_, msg) = rpc_code(ns.call(
        "priv.net_up",
        json!({"id": A, "ip": "172.30.0.2", "nat": false}),
    ));
    assert!(msg.contains("not a bridge"), "{msg}");
    assert_eq!(ns.snapshot(), before);
    // Purge leaves it alone too (not a bridge).
    ns.call("priv.net_purge", json!({})).unwrap();
    assert!(ns.link("banger0").is_some());
}

/// The system python (a user's shims under /root would not be readable by the test uids).
const SYS_PYTHON: &str = "/usr/bin/python3";

/// Opens `tap` as `uid` the way Firecracker does (TUNSETIFF, IFF_TAP|IFF_NO_PI|IFF_VNET_HDR).
fn open_tap_as(ns: &Ns, tap: &str, uid: u32) -> std::process::Output {
    const PY: &str = "import fcntl, os, struct, sys\n\
fd = os.open('/dev/net/tun', os.O_RDWR)\n\
fcntl.ioctl(fd, 0x400454ca, struct.pack('16sh22x', sys.argv[1].encode(), 0x0002 | 0x1000 | 0x4000))\n";
    let (u, g) = (format!("--reuid={uid}"), format!("--regid={uid}"));
    Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns.name,
            "setpriv",
            &u,
            &g,
            "--clear-groups",
        ])
        .args([SYS_PYTHON, "-c", PY, tap])
        .output()
        .unwrap()
}

#[test]
fn only_the_owner_can_open_the_tap() {
    need_netns!("only_the_owner_can_open_the_tap");
    use std::os::unix::fs::MetadataExt;
    let mode = std::fs::metadata("/dev/net/tun")
        .map(|m| m.mode())
        .unwrap_or(0);
    if mode & 0o006 != 0o006
        || !std::path::Path::new(SYS_PYTHON).exists()
        || !have("setpriv", "--version")
    {
        eprintln!(
            "SKIP: only_the_owner_can_open_the_tap: needs /dev/net/tun mode 0666 (scripts/deps.sh), {SYS_PYTHON} and setpriv"
        );
        return;
    }
    let ns = Ns::new("owner");
    ns.call(
        "priv.net_up",
        json!({"id": A, "ip": "172.30.0.2", "nat": false}),
    )
    .unwrap();
    let o = open_tap_as(&ns, &tap_name(A), OWNER);
    assert!(
        o.status.success(),
        "the owner could not open its tap: {}",
        stderr(&o)
    );
    let o = open_tap_as(&ns, &tap_name(A), OWNER + 1);
    assert!(!o.status.success(), "another user opened the owner's tap");
    assert!(
        stderr(&o).contains("Operation not permitted"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn doctor_network_row_sees_the_namespace() {
    need_netns!("doctor_network_row_sees_the_namespace");
    let ns = Ns::new("doctor");
    let row = |ns: &Ns| -> Value {
        let o = Command::new("ip")
            .args(["netns", "exec", &ns.name])
            .arg(ns.bed.bin.join("banger"))
            .args(["doctor", "--json"])
            .env("BANGER_ROOT", &ns.bed.root)
            .output()
            .unwrap();
        let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
        v["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "network")
            .cloned()
            .unwrap()
    };
    let details = |r: &Value| r["details"].to_string();
    let r = row(&ns);
    assert!(details(&r).contains("bridge banger0 is absent"), "{r}");
    ns.call(
        "priv.net_up",
        json!({"id": A, "ip": "172.30.0.2", "nat": true}),
    )
    .unwrap();
    let r = row(&ns);
    let d = details(&r);
    assert!(d.contains("1 VM tap(s), 1 with NAT"), "{r}");
    assert!(d.contains("ip_forward = 1"), "{r}");
    assert!(
        d.contains("table inet banger present, 1 NAT address(es)"),
        "{r}"
    );
    // The table deleted behind banger's back while a VM runs: FAIL.
    ns.out(&["nft", "delete", "table", "inet", "banger"]);
    let r = row(&ns);
    assert_eq!(r["level"], "FAIL", "{r}");
    assert!(details(&r).contains("missing while VMs run"), "{r}");
    // A bad config: FAIL naming the key.
    std::fs::write(
        ns.bed.layout().config_toml(),
        "[network]\nsubnet = \"10.0.0.0/8\"\n",
    )
    .unwrap();
    let r = row(&ns);
    assert_eq!(r["level"], "FAIL", "{r}");
    assert!(details(&r).contains("network.subnet"), "{r}");
}

fn csum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for c in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A guest's ICMP echo request to the bridge address, as it would leave the VM: virtio-net header
/// (10 zero bytes: the tap was opened with IFF_VNET_HDR), Ethernet, IPv4, ICMP.
fn echo_frame(dst_mac: [u8; 6], src: [u8; 4], dst: [u8; 4], seq: u16) -> Vec<u8> {
    let mut icmp = vec![8, 0, 0, 0, 0x12, 0x34];
    icmp.extend_from_slice(&seq.to_be_bytes());
    icmp.extend_from_slice(b"banger-isolation");
    let c = csum(&icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let mut ip = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 1, 0, 0];
    ip[2..4].copy_from_slice(&((20 + icmp.len()) as u16).to_be_bytes());
    ip.extend_from_slice(&src);
    ip.extend_from_slice(&dst);
    let c = csum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let mut f = vec![0u8; 10];
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&[0x02, 0x0a, 0x0a, 0x0a, 0x0a, 0x0a]);
    f.extend_from_slice(&[0x08, 0x00]);
    f.extend_from_slice(&ip);
    f.extend_from_slice(&icmp);
    f
}

/// Counts, for `ms`, frames the host sends the guest in answer: an ARP request for the guest's
/// address or an IPv4 packet from the bridge address to the guest's.
fn answers(tap: &std::fs::File, guest: [u8; 4], host: [u8; 4], ms: u64) -> usize {
    use std::io::Read;
    let deadline = Instant::now() + Duration::from_millis(ms);
    let mut n = 0;
    let mut buf = [0u8; 2048];
    let mut r = tap;
    while Instant::now() < deadline {
        match r.read(&mut buf) {
            Ok(len) if len > 10 + 14 => {
                let f = &buf[10..len];
                let ethertype = [f[12], f[13]];
                let arp_for_guest =
                    ethertype == [0x08, 0x06] && f.len() >= 42 && f[38..42] == guest;
                // Unicast to the guest only: the bridge's own IGMP reports are not answers.
                let ip_from_host = ethertype == [0x08, 0x00]
                    && f.len() >= 34
                    && f[26..30] == host
                    && f[30..34] == guest;
                if arp_for_guest || ip_from_host {
                    n += 1;
                }
            }
            Ok(_) => {}
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
    n
}

#[test]
fn a_guest_cannot_reach_the_host() {
    need_netns!("a_guest_cannot_reach_the_host");
    use std::io::Write;
    use std::os::fd::AsRawFd;
    let ns = Ns::new("isolate");
    ns.call(
        "priv.net_up",
        json!({"id": A, "ip": "172.30.0.2", "nat": false}),
    )
    .unwrap();
    let v: Value =
        serde_json::from_str(&ns.out(&["ip", "-j", "link", "show", "dev", "banger0"])).unwrap();
    let mac: Vec<u8> = v[0]["address"]
        .as_str()
        .unwrap()
        .split(':')
        .map(|h| u8::from_str_radix(h, 16).unwrap())
        .collect();
    let mac: [u8; 6] = mac.try_into().unwrap();
    let tap = tap_name(A);
    let (guest, host) = ([172, 30, 0, 2], [172, 30, 0, 1]);
    let (blocked, open) = in_ns(&ns, move || {
        // Attach to the tap as the VMM would (root may attach to the owner's tap).
        let mut t = banger::net::tap::open_like_firecracker(&tap).unwrap();
        // SAFETY: fcntl on an fd this thread owns.
        unsafe { libc::fcntl(t.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
        std::thread::sleep(Duration::from_millis(200));
        let _ = answers(&t, guest, host, 100);
        t.write_all(&echo_frame(mac, guest, host, 1)).unwrap();
        let blocked = answers(&t, guest, host, 1000);
        // Control: without banger's input rules the very same packet is answered.
        let o = Command::new("nft")
            .args(["flush", "chain", "inet", "banger", "input"])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        t.write_all(&echo_frame(mac, guest, host, 2)).unwrap();
        let open = answers(&t, guest, host, 1000);
        (blocked, open)
    });
    assert_eq!(blocked, 0, "the host answered a guest's new connection");
    assert!(
        open > 0,
        "control: without the rules the host should have answered"
    );
}

#[test]
fn guests_cannot_reach_each_other() {
    need_netns!("guests_cannot_reach_each_other");
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;
    let ns = Ns::new("ports");
    for (id, ip) in [(A, "172.30.0.2"), (B, "172.30.0.3")] {
        ns.call("priv.net_up", json!({"id": id, "ip": ip, "nat": true}))
            .unwrap();
    }
    let (ta, tb) = (tap_name(A), tap_name(B));
    let (isolated, control) = in_ns(&ns, move || {
        let mut a = banger::net::tap::open_like_firecracker(&ta).unwrap();
        let mut b = banger::net::tap::open_like_firecracker(&tb).unwrap();
        // SAFETY: fcntl on an fd this thread owns.
        unsafe { libc::fcntl(b.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
        std::thread::sleep(Duration::from_millis(200));
        // A frame from A addressed to everyone, with a marker B can recognise.
        let mut frame = vec![0u8; 10];
        frame.extend_from_slice(&[0xff; 6]);
        frame.extend_from_slice(&[0x02, 0x0a, 0x0a, 0x0a, 0x0a, 0x0a]);
        frame.extend_from_slice(&[0x88, 0xb5]); // local experimental ethertype
        frame.extend_from_slice(b"banger-port-isolation-probe..................");
        let seen = |b: &mut std::fs::File, a: &mut std::fs::File| {
            let mut buf = [0u8; 2048];
            while b.read(&mut buf).is_ok() {}
            a.write_all(&frame).unwrap();
            let deadline = Instant::now() + Duration::from_millis(800);
            let mut n = 0;
            while Instant::now() < deadline {
                match b.read(&mut buf) {
                    Ok(len) if buf[..len].windows(12).any(|w| w == b"banger-port-") => n += 1,
                    Ok(_) => {}
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
            n
        };
        let isolated = seen(&mut b, &mut a);
        // Control: with isolation off on both ports the same frame reaches B.
        for t in [&ta, &tb] {
            let o = Command::new("ip")
                .args([
                    "link",
                    "set",
                    "dev",
                    t,
                    "type",
                    "bridge_slave",
                    "isolated",
                    "off",
                ])
                .output()
                .unwrap();
            assert!(o.status.success(), "{}", stderr(&o));
        }
        let control = seen(&mut b, &mut a);
        (isolated, control)
    });
    assert_eq!(
        isolated, 0,
        "guest B received guest A's frame through the bridge"
    );
    assert!(
        control > 0,
        "control: without isolation B should have received it"
    );
}

#[test]
fn only_nat_guests_are_forwarded_and_masqueraded() {
    need_netns!("only_nat_guests_are_forwarded_and_masqueraded");
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;
    let ns = Ns::new("nat");
    ns.call(
        "priv.net_up",
        json!({"id": A, "ip": "172.30.0.2", "nat": true}),
    )
    .unwrap();
    ns.call(
        "priv.net_up",
        json!({"id": B, "ip": "172.30.0.3", "nat": false}),
    )
    .unwrap();
    // The namespace's "uplink": a plain tap with an address, and a fixed neighbour behind it.
    for args in [
        &["ip", "tuntap", "add", "dev", "uplink0", "mode", "tap"][..],
        &["ip", "addr", "add", "192.168.77.1/24", "dev", "uplink0"],
        &["ip", "link", "set", "dev", "uplink0", "up"],
        &[
            "ip",
            "neigh",
            "add",
            "192.168.77.2",
            "lladdr",
            "02:77:77:77:77:77",
            "dev",
            "uplink0",
            "nud",
            "permanent",
        ],
    ] {
        ns.out(args);
    }
    let v: Value =
        serde_json::from_str(&ns.out(&["ip", "-j", "link", "show", "dev", "banger0"])).unwrap();
    let mac: [u8; 6] = v[0]["address"]
        .as_str()
        .unwrap()
        .split(':')
        .map(|h| u8::from_str_radix(h, 16).unwrap())
        .collect::<Vec<u8>>()
        .try_into()
        .unwrap();
    let (ta, tb) = (tap_name(A), tap_name(B));
    let outside = [192, 168, 77, 2];
    // Each guest pings the outside address; what leaves the uplink is collected by source.
    let sources = in_ns(&ns, move || {
        let mut up = banger::net::tap::open_like_firecracker("uplink0").unwrap();
        // SAFETY: fcntl on an fd this thread owns.
        unsafe { libc::fcntl(up.as_raw_fd(), libc::F_SETFL, libc::O_NONBLOCK) };
        let mut a = banger::net::tap::open_like_firecracker(&ta).unwrap();
        let mut b = banger::net::tap::open_like_firecracker(&tb).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        let mut out = vec![];
        for (t, src) in [(&mut a, [172, 30, 0, 2]), (&mut b, [172, 30, 0, 3])] {
            let mut buf = [0u8; 2048];
            while up.read(&mut buf).is_ok() {}
            t.write_all(&echo_frame(mac, src, outside, 7)).unwrap();
            let deadline = Instant::now() + Duration::from_millis(1000);
            let mut seen: Vec<[u8; 4]> = vec![];
            while Instant::now() < deadline {
                match up.read(&mut buf) {
                    Ok(len) if len >= 10 + 34 => {
                        let f = &buf[10..len];
                        if f[12..14] == [0x08, 0x00] && f[30..34] == outside {
                            seen.push(f[26..30].try_into().unwrap());
                        }
                    }
                    Ok(_) => {}
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
            out.push(seen);
        }
        out
    });
    assert_eq!(
        sources[0],
        vec![[192, 168, 77, 1]],
        "the NAT guest's packet leaves once, masqueraded to the uplink's address"
    );
    assert!(
        sources[1].is_empty(),
        "a non-NAT guest was forwarded: {:?}",
        sources[1]
    );
}

/// Each VM's MAC is pinned to its own bridge port (static, sticky): a frame another port sends
/// with that source address does not move it — a clone restored from a snapshot wakes with the
/// source VM's MAC, and must not pull the host's packets for a still-running source to itself.
/// Control: an address nobody pinned is learned on the port that sent it.
#[test]
fn a_vm_s_mac_stays_on_its_port() {
    need_netns!("a_vm_s_mac_stays_on_its_port");
    use std::io::Write;
    let ns = Ns::new("fdb");
    for (id, ip) in [(A, "172.30.0.2"), (B, "172.30.0.3")] {
        ns.call("priv.net_up", json!({"id": id, "ip": ip, "nat": false}))
            .unwrap();
    }
    let (ta, tb) = (tap_name(A), tap_name(B));
    let mac_a = banger::net::mac_for(A);
    let fdb = |ns: &Ns, mac: &str| -> Vec<Value> {
        let v: Value =
            serde_json::from_str(&ns.out(&["bridge", "-j", "fdb", "show", "br", "banger0"]))
                .unwrap();
        v.as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["mac"] == mac)
            .cloned()
            .collect()
    };
    let pinned = fdb(&ns, &mac_a);
    assert_eq!(pinned.len(), 1, "{pinned:?}");
    assert_eq!(pinned[0]["ifname"], ta.as_str(), "{pinned:?}");
    assert_eq!(pinned[0]["state"], "static", "{pinned:?}");
    assert!(
        pinned[0]["flags"]
            .as_array()
            .is_some_and(|f| f.iter().any(|x| x == "sticky")),
        "{pinned:?}"
    );
    // Idempotent: a second net_up leaves one entry.
    ns.call(
        "priv.net_up",
        json!({"id": A, "ip": "172.30.0.2", "nat": false}),
    )
    .unwrap();
    assert_eq!(fdb(&ns, &mac_a).len(), 1);
    let mac_bytes = |m: &str| -> [u8; 6] {
        let v: Vec<u8> = m
            .split(':')
            .map(|h| u8::from_str_radix(h, 16).unwrap())
            .collect();
        v.try_into().unwrap()
    };
    let stranger = "02:0b:0b:0b:0b:0b";
    let (a_bytes, s_bytes) = (mac_bytes(&mac_a), mac_bytes(stranger));
    in_ns(&ns, move || {
        let mut t = banger::net::tap::open_like_firecracker(&tb).unwrap();
        for src in [a_bytes, s_bytes] {
            // A broadcast from B's port with `src` as its source address (after the 10-byte
            // virtio-net header: destination, then source).
            let mut frame = echo_frame([0xff; 6], [172, 30, 0, 3], [172, 30, 0, 1], 1);
            frame[16..22].copy_from_slice(&src);
            t.write_all(&frame).unwrap();
        }
        // Held open until the bridge has seen both.
        std::thread::sleep(Duration::from_millis(300));
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while fdb(&ns, stranger).is_empty() {
        assert!(
            Instant::now() < deadline,
            "control: the bridge never learned the stranger's MAC from {}",
            tap_name(B)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(fdb(&ns, stranger)[0]["ifname"], tap_name(B).as_str());
    let after = fdb(&ns, &mac_a);
    assert_eq!(after.len(), 1, "{after:?}");
    assert_eq!(
        after[0]["ifname"],
        tap_name(A).as_str(),
        "A's MAC moved to the port that sent it: {after:?}"
    );
}
