//! `banger vm ssh`, `banger vm exec`, `banger vm ports`: getting into a running guest.
//!
//! Asks the daemon where the VM is, then runs the system's `ssh` with banger's key and banger's
//! known_hosts ([`crate::ssh::command`]): the guest's host key was pinned by the daemon from its
//! agent, so nothing is trusted on first use and the user's `~/.ssh` is never involved. stdin,
//! stdout and stderr are the user's own; the exit status is the remote command's.

use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use argh::{ArgsInfo, FromArgs};
use serde_json::{json, Value};

use crate::error::{Context, Error, Result};
use crate::layout::Layout;
use crate::rpc::client;
use crate::ssh::command::{exit_code, SshCommand, Tty};
use crate::ssh::known_hosts::KnownHosts;

#[derive(FromArgs, ArgsInfo)]
/// Open a shell in a running VM over SSH, or run one command there.
#[argh(
    subcommand,
    name = "ssh",
    example = "A root shell in VM dev:\n  banger vm ssh dev",
    example = "One command (its exit status is banger's):\n  banger vm ssh dev -- uname -a",
    note = "banger runs your system's ssh with banger's own key and known_hosts, where the daemon pinned the guest's host key when it booted; a changed host key is refused. A terminal is allocated only when stdin is one. Exit status 255 is ssh's own failure. For plain `ssh dev.vm`, see `banger ssh-config`."
)]
pub struct SshCmd {
    /// VM name or id
    #[argh(positional)]
    vm: String,
    /// command to run instead of a shell (after `--`)
    #[argh(positional, greedy)]
    command: Vec<String>,
}

#[derive(FromArgs, ArgsInfo)]
/// Run one command in a running VM; its stdin, stdout, stderr and exit status are banger's.
#[argh(
    subcommand,
    name = "exec",
    example = "banger vm exec dev -- sh -c 'exit 7'; echo $?   # prints 7",
    example = "Pipe data through the guest:\n  echo hello | banger vm exec dev -- tr a-z A-Z",
    note = "Words after `--` reach the guest exactly as given (quoting is preserved). A terminal is allocated only when stdin is one, so pipes and scripts get clean stdout and stderr. Exit status 255 is ssh's own failure (see its message). For a shell, use `banger vm ssh`."
)]
pub struct ExecCmd {
    /// VM name or id
    #[argh(positional)]
    vm: String,
    /// the command and its arguments (after `--`)
    #[argh(positional, greedy)]
    command: Vec<String>,
}

#[derive(FromArgs, ArgsInfo)]
/// List the TCP ports VMs listen on, as the guest agent sees them.
#[argh(
    subcommand,
    name = "ports",
    example = "banger vm ports dev",
    example = "banger vm ports dev web --json",
    note = "Each listener prints as NAME.vm:PORT (reach it from this host by the VM's address, or by NAME.vm once `banger ssh-config --install` is done for ssh)."
)]
pub struct PortsCmd {
    /// VM names or ids
    #[argh(positional)]
    vms: Vec<String>,
    /// print JSON
    #[argh(switch)]
    json: bool,
}

fn socket() -> std::path::PathBuf {
    Layout::from_env().daemon_socket()
}

/// Where a running VM answers SSH.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    /// The VM's name.
    pub name: String,
    /// Its guest address.
    pub ip: String,
}

/// Looks the VM up and checks it can be entered: running, with an address and a pinned host key.
pub(crate) fn target(vm: &str) -> Result<Target> {
    let what = format!("connecting to VM `{vm}`");
    let v =
        client::call(&socket(), "vm.show", json!({"vm": vm})).map_err(|e| e.into_error(&what))?;
    target_of(&v["vm"], &Layout::from_env())
}

/// [`target`] from a VM's JSON (as `vm.show` and `vm.create` return it).
pub(crate) fn target_of(vm: &Value, layout: &Layout) -> Result<Target> {
    let name = vm["name"].as_str().unwrap_or_default().to_string();
    let what = || format!("connecting to VM `{name}`");
    let state = vm["state"].as_str().unwrap_or("unknown");
    if state != "running" {
        return Err(Error::new(what(), format!("it is {state}, not running"))
            .hint(format!("start it with `banger vm start {name}`")));
    }
    let Some(ip) = vm["ip"].as_str().map(String::from) else {
        return Err(
            Error::new(what(), "it has no network address").hint(format!(
                "restart it with `banger vm restart {name}` so it gets one"
            )),
        );
    };
    let kh = KnownHosts::for_layout(layout);
    if kh.pinned(&ip)?.is_none() {
        return Err(Error::new(
            what(),
            format!(
                "no host key is pinned for it in {} (banger never trusts a key on first use, and \
                 the guest's agent did not report one)",
                kh.path().display()
            ),
        )
        .hint(format!(
            "boot an image made by `sudo banger image build`, which has the agent; `banger vm logs {name}` shows the guest's console"
        )));
    }
    Ok(Target { name, ip })
}

/// Ctrl-C, TERM and HUP while a child runs: banger keeps going (so it can report the child's
/// status, or delete a `--rm` VM), the child gets them as usual. Handlers, not SIG_IGN: an ignored
/// signal would stay ignored in `ssh` across exec.
pub(crate) struct Interrupts {
    seen: Arc<AtomicBool>,
    _signals: Option<std::thread::JoinHandle<()>>,
}

impl Interrupts {
    /// Starts catching; `on_first` is printed to stderr at the first signal.
    pub(crate) fn catch(on_first: Option<String>) -> Result<Interrupts> {
        use async_signal::{Signal, Signals};
        let mut signals = Signals::new([Signal::Int, Signal::Term, Signal::Hup])
            .ctx(|| "installing Ctrl-C handlers".into())?;
        let seen = Arc::new(AtomicBool::new(false));
        let flag = seen.clone();
        let t = std::thread::spawn(move || {
            use smol::stream::StreamExt;
            smol::block_on(async {
                while signals.next().await.is_some() {
                    if !flag.swap(true, Ordering::SeqCst) {
                        if let Some(m) = &on_first {
                            eprintln!("\nbanger: {m}");
                        }
                    }
                }
            })
        });
        Ok(Interrupts {
            seen,
            _signals: Some(t),
        })
    }

    /// Whether a signal arrived.
    pub(crate) fn seen(&self) -> bool {
        self.seen.load(Ordering::SeqCst)
    }
}

/// Waits until `ip`:22 accepts a TCP connection: up to `refused` while the guest actively refuses
/// (it is up, sshd is still starting), up to `silent` while nothing answers (no route, no ARP
/// reply), and not past `stop()` turning true (Ctrl-C). Returns whether it was accepted; either
/// way the caller may run ssh, which then says what is wrong in its own words. Only `vm run` waits
/// so, once, for a guest it just booted: every probe costs the guest an sshd start, so `vm ssh` and
/// `vm exec` leave a still-starting sshd to ssh's own quiet retries (see [`run_ssh`]).
pub(crate) fn wait_sshd(
    ip: &str,
    refused: Duration,
    silent: Duration,
    stop: &dyn Fn() -> bool,
) -> bool {
    let Ok(addr) = format!("{ip}:22").parse::<SocketAddr>() else {
        return false;
    };
    let start = Instant::now();
    loop {
        let err = match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
            Ok(_) => return true,
            Err(e) => e,
        };
        let budget = if err.kind() == std::io::ErrorKind::ConnectionRefused {
            refused
        } else {
            silent
        };
        if start.elapsed() >= budget || stop() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A port where nothing listens in a guest (tcpmux): its kernel refuses a connection at once.
const CLOSED_PORT: u16 = 1;
/// How long [`guest_answers`] waits for the guest's kernel.
const ANSWER_WAIT: Duration = Duration::from_secs(2);

/// Whether the guest's network stack answers at all: a TCP connection to [`CLOSED_PORT`] is
/// refused by the guest's kernel (or accepted, if something listens there) without waking any
/// process in the guest, unlike a probe of port 22, which costs the guest a whole sshd start.
/// Silence for `wait` (no ARP reply, no route) or a guest firewall dropping the port: no.
pub(crate) fn guest_answers(ip: &str, wait: Duration) -> bool {
    let Ok(addr) = format!("{ip}:{CLOSED_PORT}").parse::<SocketAddr>() else {
        return false;
    };
    match TcpStream::connect_timeout(&addr, wait) {
        Ok(_) => true,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionRefused,
    }
}

/// Runs ssh into `t` (a shell when `command` is `None`) and returns the exit code for banger.
/// A guest that answers gets ssh's quiet retries while its sshd may still be starting
/// ([`crate::ssh::command::CONNECT_ATTEMPTS`]); one that does not gets a single attempt, so ssh
/// says what is wrong in seconds instead of retrying a silent address for minutes.
pub(crate) fn run_ssh(t: &Target, command: Option<&[String]>) -> Result<i32> {
    let attempts = if guest_answers(&t.ip, ANSWER_WAIT) {
        crate::ssh::command::CONNECT_ATTEMPTS
    } else {
        1
    };
    let layout = Layout::from_env();
    let (key, kh) = (layout.ssh_key(), layout.ssh_known_hosts());
    let argv = SshCommand {
        key: &key,
        known_hosts: &kh,
        host: &t.ip,
        port: None,
        tty: Tty::from_stdin(),
        command,
    }
    .argv_attempts(attempts)?;
    let _catch = Interrupts::catch(None)?;
    let status = std::process::Command::new(&argv[0])
        .args(&argv[1..])
        .status()
        .map_err(|e| {
            let e = Error::new(format!("running ssh to VM `{}`", t.name), e);
            if e.why.contains("No such file") {
                e.hint("install OpenSSH's client: sudo apt-get install openssh-client")
            } else {
                e
            }
        })?;
    let (code, note) = exit_code(status, &t.name);
    if let Some(n) = note {
        eprintln!("banger: {n}");
    }
    Ok(code)
}

/// `banger vm ssh`.
pub fn ssh(c: SshCmd) -> Result<i32> {
    let t = target(&c.vm)?;
    run_ssh(&t, (!c.command.is_empty()).then_some(c.command.as_slice()))
}

/// `banger vm exec`.
pub fn exec(c: ExecCmd) -> Result<i32> {
    if c.command.is_empty() {
        return Err(Error::usage(
            format!("running a command in VM `{}`", c.vm),
            "no command given",
        )
        .hint(format!(
            "put it after `--`: banger vm exec {} -- uname -a (for a shell: banger vm ssh {})",
            c.vm, c.vm
        )));
    }
    let t = target(&c.vm)?;
    run_ssh(&t, Some(&c.command))
}

/// `banger vm ports`.
pub fn ports(c: PortsCmd) -> Result<i32> {
    if c.vms.is_empty() {
        return Err(Error::usage("listing VM ports", "no VM named")
            .hint("banger vm ports NAME… (see `banger vm list`)"));
    }
    let mut all = Vec::new();
    for vm in &c.vms {
        let v = client::call(&socket(), "vm.ports", json!({"vm": vm}))
            .map_err(|e| e.into_error(&format!("listing the ports of VM `{vm}`")))?;
        let name = v["vm"].as_str().unwrap_or(vm).to_string();
        for p in v["ports"].as_array().into_iter().flatten() {
            let port = p["port"].as_u64().unwrap_or(0);
            all.push(json!({
                "vm": name,
                "endpoint": format!("{}:{port}", crate::ssh::host_alias(&name)),
                "ip": v["ip"],
                "address": p["address"],
                "port": port,
                "process": p["process"],
            }));
        }
    }
    if c.json {
        println!(
            "{}",
            crate::termsafe::json(&json!({"ports": all}).to_string())
        );
    } else {
        // Process names come from the guest.
        print!("{}", crate::termsafe::plain(&ports_table(&all)));
    }
    Ok(0)
}

fn ports_table(rows: &[Value]) -> String {
    let mut out = format!("{:<28} {:<24} {}\n", "ENDPOINT", "LISTENING ON", "PROCESS");
    for r in rows {
        out.push_str(&format!(
            "{:<28} {:<24} {}\n",
            r["endpoint"].as_str().unwrap_or(""),
            r["address"].as_str().unwrap_or(""),
            r["process"].as_str().unwrap_or("-"),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_refusals_say_what_to_do() {
        let t = crate::system::testutil::TempDir::new();
        let l = Layout::under(t.path());
        let cases = [
            (
                json!({"name": "dev", "state": "stopped", "ip": "172.30.0.2"}),
                "banger vm start dev",
            ),
            (
                json!({"name": "dev", "state": "running"}),
                "no network address",
            ),
            (
                json!({"name": "dev", "state": "running", "ip": "172.30.0.2"}),
                "no host key is pinned",
            ),
        ];
        for (vm, want) in cases {
            let e = target_of(&vm, &l).unwrap_err().to_string();
            assert!(e.contains(want), "{vm}: {e}");
        }
        let kh = KnownHosts::for_layout(&l);
        kh.pin(&crate::ssh::known_hosts::Pin::for_vm(
            "aaaaaaaaaaaa",
            "dev",
            "172.30.0.2",
            crate::ssh::PublicKey::from_bytes([1; 32]),
        ))
        .unwrap();
        let t = target_of(
            &json!({"name": "dev", "state": "running", "ip": "172.30.0.2"}),
            &l,
        )
        .unwrap();
        assert_eq!((t.name.as_str(), t.ip.as_str()), ("dev", "172.30.0.2"));
    }

    /// Port 22 on loopback: accepted when something listens (a test listener when the port is
    /// free), refused until the budget runs out otherwise. Loopback only.
    #[test]
    fn wait_sshd_accepts_or_gives_up_on_refusal() {
        let listener = std::net::TcpListener::bind("127.0.0.1:22");
        let listening = listener.is_ok()
            || TcpStream::connect_timeout(
                &"127.0.0.1:22".parse().unwrap(),
                Duration::from_millis(200),
            )
            .is_ok();
        if listening {
            assert!(wait_sshd(
                "127.0.0.1",
                Duration::ZERO,
                Duration::ZERO,
                &|| false
            ));
            drop(listener);
        } else {
            eprintln!("SKIP: wait_sshd accept case: cannot listen on 127.0.0.1:22 (not root)");
        }
        // Nothing listens on 127.0.0.2:22 unless someone bound 0.0.0.0:22: refused, given up.
        let other = "127.0.0.2:22".parse().unwrap();
        if TcpStream::connect_timeout(&other, Duration::from_millis(200)).is_err() {
            assert!(!wait_sshd(
                "127.0.0.2",
                Duration::from_millis(200),
                Duration::ZERO,
                &|| false
            ));
            // Ctrl-C ends a long wait at once.
            assert!(!wait_sshd(
                "127.0.0.2",
                Duration::from_secs(3600),
                Duration::ZERO,
                &|| true
            ));
        } else {
            eprintln!("SKIP: wait_sshd refusal case: something listens on 0.0.0.0:22");
        }
        assert!(!wait_sshd(
            "not an address",
            Duration::ZERO,
            Duration::ZERO,
            &|| false
        ));
    }

    /// Loopback only: a refused port is a guest (here: a kernel) that answers.
    #[test]
    fn guest_answers_when_its_kernel_refuses() {
        let closed = format!("127.0.0.1:{CLOSED_PORT}").parse().unwrap();
        if TcpStream::connect_timeout(&closed, Duration::from_millis(200)).is_err() {
            assert!(guest_answers("127.0.0.1", Duration::from_secs(1)));
        } else {
            eprintln!(
                "SKIP: guest_answers refusal case: something listens on 127.0.0.1:{CLOSED_PORT}"
            );
        }
        assert!(!guest_answers("not an address", Duration::ZERO));
    }

    #[test]
    fn ports_table_shows_endpoints() {
        let rows = [
            json!({"endpoint": "dev.vm:22", "address": "0.0.0.0", "process": "sshd"}),
            json!({"endpoint": "dev.vm:8080", "address": "::", "process": null}),
        ];
        let t = ports_table(&rows);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("ENDPOINT"));
        assert!(lines[1].starts_with("dev.vm:22 ") && lines[1].ends_with("sshd"));
        assert!(lines[2].starts_with("dev.vm:8080 ") && lines[2].ends_with("-"));
    }
}
