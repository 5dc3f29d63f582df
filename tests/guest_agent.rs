//! The real agent binary (`banger-vsock-agent`) against a temp guest root and a fake kernel
//! command line, listening on a Unix socket (no vhost-vsock here): start-up preparation with the
//! real `ssh-keygen`, readiness through sd_notify, and the protocol over the socket; `reconfigure`
//! for real in a network namespace of the test's own (a veth `eth0`).

mod common;

use base64::Engine;
use common::*;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

const OWNER_KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAILf5oszbHqEb+6X3j8hlzlMXxaLuKBJTgVM/l0kQlrAO owner@host";

/// Starts the agent on `root` with `cmdline`, waits for its READY=1 and returns it with its socket.
fn start_agent(bed: &Bed, tag: &str, root: &Path, cmdline: &str) -> (Server, PathBuf) {
    start_agent_in(bed, tag, root, cmdline, None)
}

/// [`start_agent`], in network namespace `ns` (`ip netns exec`) reconfiguring its `eth0`.
fn start_agent_in(
    bed: &Bed,
    tag: &str,
    root: &Path,
    cmdline: &str,
    ns: Option<&str>,
) -> (Server, PathBuf) {
    let cmdline_file = bed.root.join(format!("{tag}-cmdline"));
    std::fs::write(&cmdline_file, format!("{cmdline}\n")).unwrap();
    let sock = bed.root.join(format!("{tag}.sock"));
    let nsock = bed.root.join(format!("{tag}-notify.sock"));
    let rx = UnixDatagram::bind(&nsock).unwrap();
    rx.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let log = bed.root.join(format!("{tag}.log"));
    let mut cmd = match ns {
        Some(ns) => {
            let mut c = std::process::Command::new("ip");
            c.args(["netns", "exec", ns])
                .arg(bed.bin.join("banger-vsock-agent"))
                .args(["--iface", "eth0"]);
            c
        }
        None => bed.cmd("banger-vsock-agent"),
    };
    let child = cmd
        .args(["--unix".as_ref(), sock.as_os_str()])
        .args(["--root".as_ref(), root.as_os_str()])
        .args(["--cmdline".as_ref(), cmdline_file.as_os_str()])
        .args(["--proc", "/proc"])
        .env("NOTIFY_SOCKET", &nsock)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let server = Server { child, log };
    let mut buf = [0u8; 64];
    let n = rx
        .recv(&mut buf)
        .unwrap_or_else(|e| panic!("no READY=1 within 60s ({e}); log:\n{}", server.log_text()));
    assert_eq!(&buf[..n], b"READY=1");
    // READY=1 comes after the socket listens.
    assert!(sock.exists(), "READY=1 before {} exists", sock.display());
    (server, sock)
}

/// One connection; `ask` sends a line and returns the decoded answer line.
struct Conn(BufReader<UnixStream>);

impl Conn {
    fn open(sock: &Path) -> Conn {
        let s = UnixStream::connect(sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        Conn(BufReader::new(s))
    }

    fn ask(&mut self, line: &str) -> Value {
        self.0
            .get_mut()
            .write_all(format!("{line}\n").as_bytes())
            .unwrap();
        let mut answer = String::new();
        self.0.read_line(&mut answer).unwrap();
        serde_json::from_str(&answer).unwrap_or_else(|e| panic!("{answer:?}: {e}"))
    }
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
}

#[test]
fn agent_prepares_the_guest_and_answers_hello_and_ports() {
    if which("ssh-keygen").is_none() {
        eprintln!(
            "SKIP: agent_prepares_the_guest_and_answers_hello_and_ports: ssh-keygen not installed"
        );
        return;
    }
    let bed = Bed::new("gagent");
    let root = bed.root.join("guest");
    std::fs::create_dir_all(root.join("etc/ssh")).unwrap();
    let key = base64::engine::general_purpose::STANDARD.encode(format!("{OWNER_KEY}\n"));
    let (_agent, sock) = start_agent(
        &bed,
        "good",
        &root,
        &format!("console=ttyS0 reboot=k panic=1 ip=172.30.0.2::172.30.0.1:255.255.255.0:agent-it:eth0:off banger.name=agent-it banger.key={key}"),
    );

    // The guest was prepared before the agent said it was ready.
    assert_eq!(
        std::fs::read_to_string(root.join("etc/hostname")).unwrap(),
        "agent-it\n"
    );
    let ak = root.join("root/.ssh/authorized_keys");
    assert_eq!(
        std::fs::read_to_string(&ak).unwrap(),
        format!("{OWNER_KEY}\n")
    );
    assert_eq!(mode(&ak), 0o600);
    assert_eq!(mode(&root.join("root/.ssh")), 0o700);
    if is_root() {
        assert_eq!(std::fs::metadata(&ak).unwrap().uid(), 0);
        assert_eq!(std::fs::metadata(root.join("root/.ssh")).unwrap().uid(), 0);
    } else {
        eprintln!("SKIP: root ownership of authorized_keys: not running as root");
    }
    // Only the ed25519 host key: no slow RSA key at first boot.
    assert!(root.join("etc/ssh/ssh_host_ed25519_key").exists());
    for t in ["rsa", "ecdsa"] {
        assert!(
            !root.join(format!("etc/ssh/ssh_host_{t}_key")).exists(),
            "{t}"
        );
    }
    let host_pub = std::fs::read_to_string(root.join("etc/ssh/ssh_host_ed25519_key.pub")).unwrap();
    let host_key: String = host_pub
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ");

    // A listener of ours that `ports` must report, with this process as its owner.
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = tcp.local_addr().unwrap().port();
    let my_comm = std::fs::read_to_string("/proc/self/comm")
        .unwrap()
        .trim_end()
        .to_string();

    let mut c = Conn::open(&sock);
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    assert_eq!(
        c.ask(r#"{"method":"hello","v":1}"#),
        json!({"ok": true, "result": {
            "protocol": 2,
            "boot_id": boot_id.trim(),
            "instance_id": c.ask(r#"{"method":"hello"}"#)["result"]["instance_id"],
            "host_key": host_key,
            "hostname": "agent-it",
        }})
    );
    // No interface given (the agent runs on another root): reconfigure is refused, and said so.
    let r = c.ask(
        &json!({"method": "reconfigure", "params": {
            "name": "x", "ip": "172.30.0.9/24", "gateway": "172.30.0.1", "mac": "02:00:00:00:00:09",
            "key": base64::engine::general_purpose::STANDARD.encode(OWNER_KEY),
        }})
        .to_string(),
    );
    assert!(
        r["error"]
            .as_str()
            .unwrap()
            .contains("no interface to reconfigure"),
        "{r}"
    );
    assert_eq!(
        std::fs::read_to_string(root.join("etc/hostname")).unwrap(),
        "agent-it\n"
    );
    let ports = c.ask(r#"{"method":"ports"}"#);
    assert_eq!(ports["ok"], true, "{ports}");
    let mine: Vec<&Value> = ports["result"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["port"] == port)
        .collect();
    assert_eq!(
        mine,
        vec![&json!({"address": "127.0.0.1", "port": port, "process": my_comm})],
        "{ports}"
    );
    // Same connection: errors are answers, not crashes.
    let r = c.ask(r#"{"method":"reboot"}"#);
    assert_eq!(
        r["error"],
        "unknown method \"reboot\" (known: hello, ports, health, boot_id, uname, reconfigure)"
    );
    let r = c.ask("}{ not json");
    assert!(
        r["error"].as_str().unwrap().starts_with("bad request"),
        "{r}"
    );
    let r = c.ask(r#"{"method":"hello","v":99}"#);
    assert!(
        r["error"].as_str().unwrap().contains("protocol version 99"),
        "{r}"
    );
    assert_eq!(c.ask(r#"{"method":"health"}"#)["result"]["status"], "ok");
    // The host-side decoder agrees with what the binary serves.
    let hello: banger::agent::Hello =
        serde_json::from_value(c.ask(r#"{"method":"hello"}"#)["result"].clone()).unwrap();
    assert_eq!(hello.host_key, host_key);
    drop(tcp);
}

#[test]
fn refused_command_line_changes_nothing_and_hello_says_why() {
    if which("ssh-keygen").is_none() {
        eprintln!("SKIP: refused_command_line_changes_nothing_and_hello_says_why: ssh-keygen not installed");
        return;
    }
    let bed = Bed::new("gagent-bad");
    let root = bed.root.join("guest");
    std::fs::create_dir_all(root.join("etc/ssh")).unwrap();
    // What the image builder leaves: a placeholder hostname, no root SSH dir.
    std::fs::write(root.join("etc/hostname"), "banger\n").unwrap();
    let not_a_key =
        base64::engine::general_purpose::STANDARD.encode("-----BEGIN OPENSSH PRIVATE KEY-----");
    let (_agent, sock) = start_agent(
        &bed,
        "bad",
        &root,
        &format!("banger.name=Not_A_Host banger.key={not_a_key}"),
    );
    assert_eq!(
        std::fs::read_to_string(root.join("etc/hostname")).unwrap(),
        "banger\n"
    );
    assert!(
        !root.join("root").exists(),
        "a refused key must not create /root"
    );
    let mut c = Conn::open(&sock);
    let h = c.ask(r#"{"method":"hello"}"#);
    assert_eq!(h["ok"], true, "{h}");
    assert_eq!(h["result"]["hostname"], "banger");
    let problems = h["result"]["problems"].as_array().unwrap();
    assert_eq!(problems.len(), 2, "{h}");
    assert!(
        problems[0]
            .as_str()
            .unwrap()
            .contains("banger.name=\"Not_A_Host\" is not a valid hostname"),
        "{h}"
    );
    assert!(
        problems[1]
            .as_str()
            .unwrap()
            .contains("not decode to an OpenSSH public key line"),
        "{h}"
    );
    // Oversize line: an error answer, then the agent ends that connection (and keeps serving).
    c.0.get_mut().write_all(&vec![b'a'; 70 * 1024]).unwrap();
    let mut line = String::new();
    c.0.read_line(&mut line).unwrap();
    assert!(line.contains("longer than 65536 bytes"), "{line}");
    assert_eq!(Conn::open(&sock).ask(r#"{"method":"health"}"#)["ok"], true);
}

fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(tool))
            .find(|p| p.exists())
    })
}

/// `banger.agent_tcp=52` (the stand-in QEMU engine's transport): the agent also serves on TCP.
/// Run in a network namespace of its own, so nothing listens on this machine's network.
#[test]
fn agent_tcp_transport_in_a_private_netns() {
    if !is_root() || which("unshare").is_none() || which("ip").is_none() {
        eprintln!("SKIP: agent_tcp_transport_in_a_private_netns: needs root, unshare and ip");
        return;
    }
    if which("ssh-keygen").is_none() {
        eprintln!("SKIP: agent_tcp_transport_in_a_private_netns: ssh-keygen not installed");
        return;
    }
    let bed = Bed::new("gagent-tcp");
    let root = bed.root.join("guest");
    std::fs::create_dir_all(root.join("etc/ssh")).unwrap();
    let cmdline = bed.root.join("cmdline");
    std::fs::write(&cmdline, "banger.name=tcp-guest banger.agent_tcp=52\n").unwrap();
    let log = bed.root.join("agent.log");
    // vsock is not per network namespace: a port of its own, so it collides with nothing.
    let vsock_port = 40000 + (std::process::id() % 20000);
    let child = std::process::Command::new("unshare")
        .args([
            "-n",
            "sh",
            "-c",
            "ip link set lo up && exec \"$0\" \"$@\"",
            BIN,
        ])
        .args([
            "--role",
            "banger-vsock-agent",
            "--port",
            &vsock_port.to_string(),
        ])
        .args(["--root".as_ref(), root.as_os_str()])
        .args(["--cmdline".as_ref(), cmdline.as_os_str()])
        .env_remove("NOTIFY_SOCKET")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let agent = Server { child, log };
    let ns = format!("/proc/{}/ns/net", agent.pid());
    // Until unshare(1) has run, the child is still in our namespace.
    let ours = std::fs::read_link("/proc/self/ns/net").unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::fs::read_link(&ns).map_or(true, |l| l == ours) {
        assert!(
            std::time::Instant::now() < deadline,
            "the agent never left our network namespace"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    // setns(2) changes only the calling thread: a thread of ours joins the agent's namespace.
    let answer = std::thread::spawn(move || -> Result<Value, String> {
        let f = std::fs::File::open(&ns).map_err(|e| format!("{ns}: {e}"))?;
        rustix::thread::move_into_link_name_space(
            std::os::fd::AsFd::as_fd(&f),
            Some(rustix::thread::LinkNameSpaceType::Network),
        )
        .map_err(|e| format!("setns {ns}: {e}"))?;
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let s = loop {
            match std::net::TcpStream::connect("127.0.0.1:52") {
                Ok(s) => break s,
                Err(e) if std::time::Instant::now() > deadline => {
                    return Err(format!(
                        "connecting to 127.0.0.1:52 in the agent's netns: {e}"
                    ))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut r = BufReader::new(s);
        r.get_mut()
            .write_all(b"{\"method\":\"hello\"}\n")
            .map_err(|e| e.to_string())?;
        let mut line = String::new();
        r.read_line(&mut line).map_err(|e| e.to_string())?;
        serde_json::from_str(&line).map_err(|e| format!("{line:?}: {e}"))
    })
    .join()
    .unwrap();
    let hello = answer.unwrap_or_else(|e| panic!("{e}; agent log:\n{}", agent.log_text()));
    assert_eq!(hello["ok"], true, "{hello}");
    assert_eq!(hello["result"]["hostname"], "tcp-guest");
    assert!(hello["result"]["host_key"]
        .as_str()
        .unwrap()
        .starts_with("ssh-ed25519 "));
    let log = agent.log_text();
    assert!(log.contains("\"tcp_port\":52"), "{log}");
}

/// What `ip -j` says about the namespace's eth0: MAC, IPv4 addresses, default route.
fn eth0_state(ns: &NetNs) -> (String, Vec<String>, Vec<String>) {
    let link = ns.link("eth0").expect("eth0 exists");
    let mac = link["address"].as_str().unwrap().to_string();
    let o = ns.ip(&["-j", "-4", "addr", "show", "dev", "eth0"]);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let addrs = v[0]["addr_info"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| format!("{}/{}", a["local"].as_str().unwrap(), a["prefixlen"]))
        .collect();
    let o = ns.ip(&["-j", "-4", "route", "show", "default"]);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let routes = v
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            format!(
                "via {} dev {}",
                r["gateway"].as_str().unwrap_or("?"),
                r["dev"].as_str().unwrap_or("?")
            )
        })
        .collect();
    (mac, addrs, routes)
}

/// `reconfigure` for real: the agent in a network namespace of the test's own whose `eth0` (one
/// end of a veth pair) has the "snapshot's" address, MAC and route. A refused request changes nothing; a
/// good one changes the hostname, root's key, MAC, address (the old one gone, also when both share
/// a subnet) and route, and gives a new instance id that later connections see.
#[test]
fn reconfigure_changes_the_guest_in_a_private_netns() {
    const TEST: &str = "reconfigure_changes_the_guest_in_a_private_netns";
    if which("ssh-keygen").is_none() {
        eprintln!("SKIP: {TEST}: ssh-keygen not installed");
        return;
    }
    let ns = match NetNs::new("reconf") {
        Ok(ns) => ns,
        Err(why) => {
            eprintln!("SKIP: {TEST}: {why}");
            return;
        }
    };
    for args in [
        &[
            "link",
            "add",
            "eth0",
            "address",
            "02:aa:00:00:00:05",
            "type",
            "veth",
            "peer",
            "name",
            "host0",
        ][..],
        &["link", "set", "host0", "up"],
        &["link", "set", "eth0", "up"],
        &["addr", "add", "172.30.0.5/24", "dev", "eth0"],
        &[
            "route",
            "add",
            "default",
            "via",
            "172.30.0.1",
            "dev",
            "eth0",
        ],
    ] {
        let o = ns.ip(args);
        assert!(o.status.success(), "ip {args:?}: {}", stderr(&o));
    }
    let bed = Bed::new("gagent-reconf");
    let root = bed.root.join("guest");
    std::fs::create_dir_all(root.join("etc/ssh")).unwrap();
    let key = base64::engine::general_purpose::STANDARD.encode(format!("{OWNER_KEY}\n"));
    let (agent, sock) = start_agent_in(
        &bed,
        "reconf",
        &root,
        &format!("banger.name=source-vm banger.key={key}"),
        Some(&ns.name),
    );
    let before = eth0_state(&ns);
    assert_eq!(
        before,
        (
            "02:aa:00:00:00:05".to_string(),
            vec!["172.30.0.5/24".to_string()],
            vec!["via 172.30.0.1 dev eth0".to_string()]
        )
    );
    let mut c = Conn::open(&sock);
    let hello = c.ask(r#"{"method":"hello"}"#);
    let first_id = hello["result"]["instance_id"].as_str().unwrap().to_string();
    let key0 = hello["result"]["host_key"].as_str().unwrap().to_string();
    let host_pub = root.join("etc/ssh/ssh_host_ed25519_key.pub");
    let host_key_on_disk = || {
        let line = std::fs::read_to_string(&host_pub).unwrap();
        line.split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert_eq!(host_key_on_disk(), key0);
    let other_key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGposxU1u8AlmBpcq3yn+btS1uQymLutYq90E6gMTcpH new-owner";
    let params = |name: &str, ip: &str, gw: &str, mac: &str| {
        json!({"method": "reconfigure", "v": 2, "params": {
            "name": name, "ip": ip, "gateway": gw, "mac": mac,
            "key": base64::engine::general_purpose::STANDARD.encode(other_key),
        }})
        .to_string()
    };
    // Refused: nothing changes (network, files, instance id).
    for bad in [
        params(
            "clone-1",
            "172.30.0.9/24",
            "172.30.0.1",
            "03:00:00:00:00:09",
        ),
        params("clone-1", "172.30.0.9/24", "10.0.0.1", "02:00:00:00:00:09"),
        params("Clone", "172.30.0.9/24", "172.30.0.1", "02:00:00:00:00:09"),
    ] {
        let r = c.ask(&bad);
        assert!(
            r["error"]
                .as_str()
                .unwrap()
                .ends_with("nothing was changed"),
            "{r}"
        );
    }
    assert_eq!(eth0_state(&ns), before);
    assert_eq!(
        std::fs::read_to_string(root.join("etc/hostname")).unwrap(),
        "source-vm\n"
    );
    let ak = root.join("root/.ssh/authorized_keys");
    assert_eq!(
        std::fs::read_to_string(&ak).unwrap(),
        format!("{OWNER_KEY}\n")
    );
    assert_eq!(
        c.ask(r#"{"method":"hello"}"#)["result"]["instance_id"],
        first_id.as_str()
    );
    assert_eq!(
        host_key_on_disk(),
        key0,
        "a refused reconfigure kept the host key"
    );

    // Same subnet (the new address starts as a secondary; it must survive the old one's removal).
    let r = c.ask(&params(
        "clone-1",
        "172.30.0.9/24",
        "172.30.0.1",
        "02:BB:00:00:00:09",
    ));
    assert_eq!(r["ok"], true, "{r}\n{}", agent.log_text());
    let id1 = r["result"]["instance_id"].as_str().unwrap().to_string();
    assert_ne!(id1, first_id);
    // A clone gets its own sshd host key (a pair: private half owner-only, hello reports the new
    // public half), and no temporary file is left beside it.
    let key1 = c.ask(r#"{"method":"hello"}"#)["result"]["host_key"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(key1, key0, "the clone kept the snapshot's host key");
    assert_eq!(host_key_on_disk(), key1);
    assert_eq!(mode(&root.join("etc/ssh/ssh_host_ed25519_key")) & 0o077, 0);
    let leftovers: Vec<_> = std::fs::read_dir(root.join("etc/ssh"))
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".banger"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let keygen = std::process::Command::new("ssh-keygen")
        .args(["-y", "-f"])
        .arg(root.join("etc/ssh/ssh_host_ed25519_key"))
        .output()
        .unwrap();
    assert!(keygen.status.success(), "{}", stderr(&keygen));
    assert!(
        String::from_utf8_lossy(&keygen.stdout).starts_with(&key1),
        "the private half does not match the public one"
    );
    assert_eq!(
        eth0_state(&ns),
        (
            "02:bb:00:00:00:09".to_string(),
            vec!["172.30.0.9/24".to_string()],
            vec!["via 172.30.0.1 dev eth0".to_string()]
        )
    );
    assert_eq!(
        std::fs::read_to_string(root.join("etc/hostname")).unwrap(),
        "clone-1\n"
    );
    assert_eq!(
        std::fs::read_to_string(&ak).unwrap(),
        format!("{OWNER_KEY}\n{other_key}\n")
    );
    // Another subnet and gateway; a new connection sees the new id.
    let r = Conn::open(&sock).ask(&params(
        "clone-2",
        "10.20.0.7/16",
        "10.20.255.254",
        "02:cc:00:00:00:07",
    ));
    assert_eq!(r["ok"], true, "{r}\n{}", agent.log_text());
    assert_eq!(
        eth0_state(&ns),
        (
            "02:cc:00:00:00:07".to_string(),
            vec!["10.20.0.7/16".to_string()],
            vec!["via 10.20.255.254 dev eth0".to_string()]
        )
    );
    let h = Conn::open(&sock).ask(r#"{"method":"hello"}"#);
    assert_eq!(h["result"]["instance_id"], r["result"]["instance_id"]);
    assert_eq!(h["result"]["hostname"], "clone-2");
    assert_ne!(h["result"]["instance_id"], id1.as_str());
    let key2 = h["result"]["host_key"].as_str().unwrap();
    assert!(
        key2 != key1 && key2 != key0,
        "each reconfigure makes a new host key"
    );
}
