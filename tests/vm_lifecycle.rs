//! VM lifecycle end to end through the real daemon and root helper (under a temp layout, as root),
//! against the stand-in VMM or, with `BANGER_TEST_FIRECRACKER`, a real Firecracker booting the
//! tiny guest. Proves: create → running → stop → start (new boot_id) → restart → delete; VMs
//! survive daemon and helper restarts untouched (their taps included); a VM that died while the
//! daemon was down is stopped and cleaned (its tap too); bad specs leave nothing behind;
//! concurrent creates never collide (names, pids, addresses); each VM gets the lowest free
//! address, a tap on the bridge while it runs, and the address back after delete.
//!
//! The helper runs in a network namespace each test makes (`ip netns exec`): the bridge, taps and
//! nftables rules never touch the machine's own network. The daemon and the CLI stay outside and
//! reach it over its Unix socket; the VMMs it launches inherit its namespace. No install.toml is
//! written, so there is no owner user: the helper runs VMMs as root and makes taps root's, and
//! root can open this machine's 0600 /dev/net/tun. A non-root owner (whose VMM needs a tun device
//! it may open) is the smoke suite's case, in containers with a /dev/net/tun of their own.

mod common;
#[path = "guest/mod.rs"]
mod guest;
#[path = "vmhost/mod.rs"]
mod vmhost;

use banger::net::{mac_for, tap_name};
use banger::rpc::client::{self, CallError};
use banger::rpc::ErrorCode;
use common::*;
use guest::READY;
use serde_json::{json, Value};
use std::time::Duration;
use vmhost::{alive, Host};

impl Host {
    fn call(&self, method: &str, params: Value) -> Result<Value, CallError> {
        client::call_with_timeout(
            &self.bed.layout().daemon_socket(),
            method,
            params,
            Duration::from_secs(120),
        )
    }

    fn list(&self) -> Vec<Value> {
        let v: Value = serde_json::from_str(&self.ok(&["vm", "list", "--json"])).unwrap();
        v.as_array().unwrap().clone()
    }

    fn image(&self) -> &'static str {
        "tiny"
    }
}

#[test]
fn image_list_shows_size_and_origin() {
    let Some(h) = Host::with_tiny_guest("image_list_shows_size_and_origin", "imglist", None) else {
        return;
    };
    let rootfs = h.bed.root.join("rootfs.img");
    let table = h.ok(&["image", "list"]);
    eprintln!("{table}");
    let header = table.lines().next().unwrap_or_default();
    assert!(
        header.contains("SIZE") && header.contains("ORIGIN"),
        "{table}"
    );
    let row = table
        .lines()
        .find(|l| l.starts_with("tiny "))
        .unwrap_or_else(|| panic!("no row for `tiny`: {table}"));
    assert!(row.contains("/1M "), "allocated/apparent size: {row}");
    assert!(
        row.ends_with(&format!("imported from {}", rootfs.display())),
        "{row}"
    );
    let v: Value = serde_json::from_str(&h.ok(&["image", "list", "--json"])).unwrap();
    let tiny = v
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == "tiny")
        .unwrap();
    assert_eq!(tiny["size_bytes"], 1 << 20, "{tiny}");
    assert!(tiny["disk_bytes"].as_u64().unwrap() <= 1 << 20, "{tiny}");
    assert_eq!(
        tiny["origin"],
        format!("imported from {}", rootfs.display()),
        "{tiny}"
    );
}

#[test]
fn create_stop_start_restart_delete() {
    let Some(h) = Host::with_tiny_guest("create_stop_start_restart_delete", "life", None) else {
        return;
    };
    let out = h.ok(&["vm", "create", "--name", "a", "--image", h.image()]);
    assert!(out.contains("a running boot_id="), "{out}");
    let v1 = h.show("a");
    assert_eq!(v1["state"], "running");
    assert!(alive(&v1), "VMM not alive: {v1}");
    let boot1 = v1["boot_id"].as_str().unwrap().to_string();
    // The VMM runs detached: its own session.
    let pid = v1["pid"].as_i64().unwrap() as i32;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    assert_eq!(
        fields[3],
        pid.to_string(),
        "VMM is not a session leader: {stat}"
    );
    // The console carries the ready line with that boot id.
    let logs = h.ok(&["vm", "logs", "a"]);
    assert!(logs.contains(&format!("{READY}{boot1}")), "{logs}");

    h.ok(&["vm", "stop", "a", "--timeout", "5"]);
    let v2 = h.show("a");
    assert_eq!(v2["state"], "stopped");
    assert!(!alive(&v1), "VMM still alive after stop");

    h.ok(&["vm", "start", "a"]);
    let v3 = h.show("a");
    assert_eq!(v3["state"], "running");
    let boot3 = v3["boot_id"].as_str().unwrap().to_string();
    assert_ne!(boot1, boot3, "a new boot must have a new boot_id");

    h.ok(&["vm", "restart", "a"]);
    let v4 = h.show("a");
    assert_ne!(v4["boot_id"].as_str().unwrap(), boot3);
    assert!(alive(&v4));

    // Operations were recorded with stages and finished.
    let ops = h.call("daemon.operations.list", json!({})).unwrap();
    let kinds: Vec<&str> = ops["operations"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|o| o["kind"].as_str())
        .collect();
    assert!(
        kinds.contains(&"vm.create") && kinds.contains(&"vm.start"),
        "{kinds:?}"
    );
    assert!(
        ops["operations"]
            .as_array()
            .unwrap()
            .iter()
            .all(|o| o["done"] == true),
        "{ops}"
    );

    h.ok(&["vm", "delete", "a"]);
    assert!(!alive(&v4));
    // A running VM is killed at once by delete (its disk goes with it): no Ctrl-Alt-Del wait.
    let ops = h.call("daemon.operations.list", json!({})).unwrap();
    let stop = ops["operations"]
        .as_array()
        .unwrap()
        .iter()
        .rev()
        .find(|o| o["kind"] == "vm.stop")
        .expect("delete stopped the VM")
        .clone();
    let stages: Vec<&str> = stop["timings"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["stage"].as_str())
        .collect();
    assert!(stages.contains(&"killing the VMM"), "{stop}");
    assert!(!stages.contains(&"asking the guest to shut down"), "{stop}");
    assert!(h.list().is_empty());
    assert!(std::fs::read_dir(h.bed.layout().vms_dir())
        .unwrap()
        .next()
        .is_none());
    let o = h.run(&["vm", "show", "a"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("no VM named `a`"), "{}", stderr(&o));
    assert!(
        h.ns.links_with_prefix("bgr-").is_empty(),
        "a tap outlived its VM"
    );
}

#[test]
fn network_addresses_taps_and_reuse() {
    let Some(h) = Host::with_tiny_guest("network_addresses_taps_and_reuse", "net", None) else {
        return;
    };
    h.ok(&["vm", "create", "--name", "n1", "--image", h.image()]);
    let n1 = h.show("n1");
    let id = n1["id"].as_str().unwrap();
    assert_eq!(n1["ip"], "172.30.0.2", "the lowest guest address: {n1}");
    assert_eq!(n1["mac"], mac_for(id));
    assert_eq!(n1["tap"], tap_name(id));
    assert_eq!(n1["nat"], false);
    // The tap exists in the helper's namespace while the VM runs, on the bridge, and the VMM
    // holds it open (it was given it through PUT /network-interfaces/eth0).
    let tap = h.tap(&n1).expect("no tap while the VM runs");
    assert_eq!(tap["master"], "banger0", "{tap}");
    h.assert_vmm_holds_tap(&n1);
    // vm list --json reports the same, and the table has the address.
    let listed = h.list();
    for k in ["ip", "mac", "tap", "nat"] {
        assert_eq!(listed[0][k], n1[k], "vm list --json {k}");
    }
    assert!(h.ok(&["vm", "list"]).contains("172.30.0.2"));

    // A NAT VM, not started: the next address, its NAT bit, no tap yet.
    h.ok(&[
        "vm",
        "create",
        "--name",
        "n2",
        "--image",
        h.image(),
        "--nat",
        "--no-start",
    ]);
    let n2 = h.show("n2");
    assert_eq!(n2["ip"], "172.30.0.3");
    assert_eq!(n2["nat"], true);
    assert!(h.tap(&n2).is_none(), "a VM that never started has a tap");

    // Stop: the tap goes, the address stays; start: the same address and tap again.
    h.ok(&["vm", "stop", "n1", "--timeout", "5"]);
    assert!(h.tap(&n1).is_none(), "tap still there after stop");
    assert_eq!(h.show("n1")["ip"], "172.30.0.2");
    h.ok(&["vm", "start", "n1"]);
    assert_eq!(h.show("n1")["ip"], "172.30.0.2");
    assert!(h.tap(&n1).is_some(), "no tap after start");
    h.ok(&["vm", "start", "n2"]);
    assert!(h.tap(&n2).is_some());

    // Delete frees the address; the next VM gets it back.
    h.ok(&["vm", "delete", "n1"]);
    assert!(h.tap(&n1).is_none(), "tap outlived delete");
    h.ok(&["vm", "create", "--name", "n3", "--image", h.image()]);
    assert_eq!(h.show("n3")["ip"], "172.30.0.2", "address not reused");
    assert_eq!(h.show("n2")["ip"], "172.30.0.3");

    h.ok(&["vm", "delete", "n2", "n3"]);
    assert!(h.list().is_empty());
    assert!(
        h.ns.links_with_prefix("bgr-").is_empty(),
        "taps left: {:?}",
        h.ns.links_with_prefix("bgr-")
    );
}

#[test]
fn a_failed_boot_takes_its_network_down() {
    let Some(h) = Host::with_tiny_guest("a_failed_boot_takes_its_network_down", "failboot", None)
    else {
        return;
    };
    // An image whose kernel file vanished after import: the VMM refuses it while the helper has
    // already made the tap.
    let kernel = h.bed.layout().kernels_dir().join("tiny").join("vmlinux");
    let spare = h.bed.root.join("vmlinux-spare");
    std::fs::copy(&kernel, &spare).unwrap();
    h.ok(&["kernel", "import", "gone", spare.to_str().unwrap()]);
    h.ok(&[
        "image",
        "import",
        "broken",
        "--rootfs",
        h.bed.root.join("rootfs.img").to_str().unwrap(),
        "--kernel",
        "gone",
        "--ready-console",
        READY,
    ]);
    std::fs::remove_file(h.bed.layout().kernels_dir().join("gone").join("vmlinux")).unwrap();
    let o = h.run(&["vm", "create", "--name", "b", "--image", "broken"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let b = h.show("b");
    assert_eq!(b["state"], "stopped", "{b}");
    assert!(b["pid"].is_null());
    assert!(
        h.ns.links_with_prefix("bgr-").is_empty(),
        "the failed boot left its tap: {:?}",
        h.ns.links_with_prefix("bgr-")
    );
    // It keeps its address; once it can boot, it boots with it.
    std::fs::copy(
        &spare,
        h.bed.layout().kernels_dir().join("gone").join("vmlinux"),
    )
    .unwrap();
    h.ok(&["vm", "start", "b"]);
    assert_eq!(h.show("b")["ip"], b["ip"]);
    assert!(h.tap(&b).is_some());
    h.ok(&["vm", "delete", "b"]);
}

#[test]
fn an_exhausted_subnet_is_a_clear_error_and_records_nothing() {
    let Some(h) = Host::with_tiny_guest(
        "an_exhausted_subnet_is_a_clear_error_and_records_nothing",
        "full",
        Some("[network]\nsubnet = \"10.77.0.0/29\"\n"),
    ) else {
        return;
    };
    // A /29 has 5 guest addresses (.2-.6): the bridge takes .1.
    for i in 0..5 {
        h.ok(&[
            "vm",
            "create",
            "--name",
            &format!("f{i}"),
            "--image",
            h.image(),
            "--no-start",
        ]);
        assert_eq!(h.show(&format!("f{i}"))["ip"], format!("10.77.0.{}", i + 2));
    }
    let o = h.run(&[
        "vm",
        "create",
        "--name",
        "f5",
        "--image",
        h.image(),
        "--no-start",
    ]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    for part in [
        "subnet 10.77.0.0/29 is exhausted",
        "[network]",
        "config.toml",
        "10.77.0.0/28",
    ] {
        assert!(e.contains(part), "missing {part:?} in: {e}");
    }
    assert_eq!(h.list().len(), 5, "the refused create left a row");
    // One delete makes room again, at the freed address; a started VM boots on it.
    h.ok(&["vm", "delete", "f2"]);
    h.ok(&["vm", "create", "--name", "f5", "--image", h.image()]);
    let f5 = h.show("f5");
    assert_eq!(f5["ip"], "10.77.0.4");
    assert!(h.tap(&f5).is_some());
    h.ok(&["vm", "delete", "f0", "f1", "f3", "f4", "f5"]);
    assert!(h.ns.links_with_prefix("bgr-").is_empty());
}

#[test]
fn bad_network_config_stops_the_daemon_before_it_binds() {
    if !is_root() {
        eprintln!("SKIP: bad_network_config_stops_the_daemon_before_it_binds: needs root like the other daemon tests");
        return;
    }
    for (toml, key) in [
        ("[network]\nbridge = \"eth0\"\n", "network.bridge"),
        ("[network]\nsubnet = \"8.8.8.0/24\"\n", "network.subnet"),
        ("[network]\nsubnet = \"172.30.0.1/24\"\n", "network.subnet"),
        ("[network]\nbridges = \"banger0\"\n", "network.bridges"),
    ] {
        let bed = Bed::new("badnet");
        let layout = bed.layout();
        std::fs::create_dir_all(layout.etc_dir()).unwrap();
        std::fs::write(layout.config_toml(), toml).unwrap();
        let o = bed.run("bangerd", &[]);
        assert_eq!(o.status.code(), Some(1), "{toml}: {}", stderr(&o));
        assert!(stderr(&o).contains(key), "{toml}: {}", stderr(&o));
        assert!(!layout.daemon_socket().exists(), "{toml}: socket bound");
        assert!(!layout.state_db().exists(), "{toml}: state opened");
    }
}

#[test]
fn agent_readiness_reports_guest_boot_id() {
    let Some(h) = Host::with_tiny_guest("agent_readiness_reports_guest_boot_id", "agent", None)
    else {
        return;
    };
    if !h.standin {
        eprintln!("SKIP: agent readiness needs a guest with the agent (the tiny guest has none)");
        return;
    }
    h.ok(&["vm", "create", "--name", "ag", "--image", "agent"]);
    let v = h.show("ag");
    let boot = v["boot_id"].as_str().unwrap();
    // The agent's answer matches what the guest printed on its console.
    let logs = h.ok(&["vm", "logs", "ag"]);
    assert!(logs.contains(&format!("{READY}{boot}")), "{logs}");
    h.ok(&["vm", "delete", "ag"]);
}

#[test]
fn vms_survive_daemon_and_helper_restarts() {
    let Some(mut h) =
        Host::with_tiny_guest("vms_survive_daemon_and_helper_restarts", "survive", None)
    else {
        return;
    };
    h.ok(&["vm", "create", "--name", "s", "--image", h.image()]);
    let before = h.show("s");
    let tap_before = h.tap(&before).expect("tap");
    for round in 0..3 {
        h.stop_helper();
        h.start_helper();
        h.stop_daemon();
        assert!(
            alive(&before),
            "round {round}: VM died while the daemon was down"
        );
        h.start_daemon();
        let after = h.show("s");
        assert_eq!(after["state"], "running", "round {round}: {after}");
        for k in ["pid", "start_time", "comm", "boot_id", "ip", "mac", "tap"] {
            assert_eq!(before[k], after[k], "round {round}: {k} changed");
        }
        // The very same tap (not removed and re-made), still on the bridge, still held.
        let tap = h.tap(&after).expect("tap gone after restarts");
        assert_eq!(tap["ifindex"], tap_before["ifindex"], "round {round}");
        assert_eq!(tap["master"], "banger0");
        h.assert_vmm_holds_tap(&after);
    }
    // And the re-adopted VM still stops normally.
    h.ok(&["vm", "stop", "s"]);
    assert!(!alive(&before));
    assert!(h.tap(&before).is_none(), "tap outlived stop");
}

#[test]
fn vm_that_died_while_daemon_was_down_is_stopped_and_cleaned() {
    let Some(mut h) = Host::with_tiny_guest(
        "vm_that_died_while_daemon_was_down_is_stopped_and_cleaned",
        "died",
        None,
    ) else {
        return;
    };
    h.ok(&["vm", "create", "--name", "d", "--image", h.image()]);
    let v = h.show("d");
    assert!(h.tap(&v).is_some());
    h.stop_daemon();
    let pid = rustix::process::Pid::from_raw(v["pid"].as_i64().unwrap() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::Kill).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while alive(&v) {
        assert!(std::time::Instant::now() < deadline, "VMM did not die");
        std::thread::sleep(Duration::from_millis(10));
    }
    h.start_daemon();
    let after = h.show("d");
    assert_eq!(after["state"], "stopped", "{after}");
    assert!(after["pid"].is_null());
    let dir = h.bed.layout().vm_dir(after["id"].as_str().unwrap());
    assert!(!dir.join("fc.sock").exists(), "API socket not cleaned");
    assert!(h.tap(&v).is_none(), "reconcile left the gone VM's tap");
    assert_eq!(after["ip"], v["ip"], "a stopped VM keeps its address");
    // It starts again like any stopped VM.
    h.ok(&["vm", "start", "d"]);
    h.ok(&["vm", "delete", "d"]);
}

#[test]
fn invalid_specs_are_rejected_and_leave_nothing() {
    let Some(h) = Host::with_tiny_guest(
        "invalid_specs_are_rejected_and_leave_nothing",
        "invalid",
        None,
    ) else {
        return;
    };
    for args in [
        vec!["vm", "create", "--vcpu", "0"],
        vec!["vm", "create", "--memory", "0"],
        vec!["vm", "create", "--memory", "8"],
        vec!["vm", "create", "--vcpu", "33"],
        vec!["vm", "create", "--name", "Bad_Name"],
        vec!["vm", "create", "--name", "-x"],
    ] {
        let o = h.run(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).starts_with("banger: "), "{}", stderr(&o));
    }
    // The daemon checks again, whatever a client sends.
    for params in [
        json!({"name": "ok", "vcpu": 0}),
        json!({"name": "ok", "memory_mib": 0}),
        json!({"name": "UPPER"}),
        json!({"name": "a".repeat(64)}),
        json!({"name": "ok", "vcpu": "two"}),
        json!({"name": "ok", "nat": "yes"}),
        json!({"name": "ok", "cmd": "x"}),
        json!({"name": "ok", "image": "nope"}),
    ] {
        match h.call("vm.create", params.clone()) {
            Err(CallError::Rpc(e)) => assert!(
                matches!(e.code, ErrorCode::BadRequest | ErrorCode::NotFound),
                "{params}: {e:?}"
            ),
            other => panic!("{params}: {other:?}"),
        }
    }
    assert!(h.list().is_empty(), "a rejected create left a row");
    assert!(
        h.ns.links_with_prefix("bgr-").is_empty(),
        "a rejected create made a tap"
    );
    // A kernel that is not an ELF image is refused at import, not at boot.
    let not_elf = h.bed.root.join("bzImage");
    std::fs::write(&not_elf, b"MZ not an elf").unwrap();
    let o = h.run(&["kernel", "import", "bz", not_elf.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("not an ELF kernel image"),
        "{}",
        stderr(&o)
    );
    assert!(!h.bed.layout().kernels_dir().join("bz").exists());
    assert!(std::fs::read_dir(h.bed.layout().vms_dir())
        .unwrap()
        .next()
        .is_none());
    // A taken name is refused and the first VM is untouched.
    h.ok(&[
        "vm",
        "create",
        "--name",
        "one",
        "--image",
        h.image(),
        "--no-start",
    ]);
    match h.call("vm.create", json!({"name": "one", "image": h.image()})) {
        Err(CallError::Rpc(e)) => assert_eq!(e.code, ErrorCode::AlreadyExists),
        other => panic!("{other:?}"),
    }
    assert_eq!(h.list().len(), 1);
    h.ok(&["vm", "delete", "one"]);
}

#[test]
fn concurrent_creates_never_collide() {
    let Some(h) = Host::with_tiny_guest("concurrent_creates_never_collide", "conc", None) else {
        return;
    };
    let sock = h.bed.layout().daemon_socket();
    let image = h.image();
    let threads: Vec<_> = (0..8)
        .map(|i| {
            let sock = sock.clone();
            std::thread::spawn(move || {
                let params = if i % 2 == 0 {
                    json!({"name": format!("c{i}"), "image": image})
                } else {
                    json!({"image": image})
                };
                client::call_with_timeout(&sock, "vm.create", params, Duration::from_secs(120))
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap().expect("concurrent create");
    }
    let vms = h.list();
    assert_eq!(vms.len(), 8);
    let mut names: Vec<&str> = vms.iter().map(|v| v["name"].as_str().unwrap()).collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), 8);
    let mut pids: Vec<i64> = vms.iter().map(|v| v["pid"].as_i64().unwrap()).collect();
    pids.sort();
    pids.dedup();
    assert_eq!(pids.len(), 8);
    assert!(vms.iter().all(|v| v["state"] == "running" && alive(v)));
    let mut ips: Vec<&str> = vms.iter().map(|v| v["ip"].as_str().unwrap()).collect();
    ips.sort();
    ips.dedup();
    assert_eq!(ips.len(), 8, "two VMs share an address: {ips:?}");
    let expected: Vec<String> = (2..10).map(|i| format!("172.30.0.{i}")).collect();
    let mut got: Vec<String> = ips.iter().map(|s| s.to_string()).collect();
    got.sort_by_key(|ip| ip.rsplit('.').next().unwrap().parse::<u8>().unwrap());
    assert_eq!(got, expected, "not the 8 lowest addresses");
    assert_eq!(h.ns.links_with_prefix("bgr-").len(), 8);
    let mut args = vec!["vm", "delete"];
    args.extend(names.iter());
    h.ok(&args);
    assert!(h.list().is_empty());
    assert!(h.ns.links_with_prefix("bgr-").is_empty());
}
