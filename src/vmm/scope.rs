//! Registering a held VMM process as its own transient systemd scope, over D-Bus.
//!
//! Owns the `StartTransientUnit` call on `org.freedesktop.systemd1` that replaces spawning
//! `systemd-run --scope` (DESIGN §6): the launcher forks the VMM, holds it before exec, and asks
//! systemd here to create `banger-vm-<id>.scope` in `banger.slice` with exactly that pid
//! (`PIDs=[pid]`, plus the `Description` and `CollectMode=inactive-or-failed` systemd-run sets for
//! `--scope --collect`), waits for the start job to finish (`JobRemoved`), and then checks in
//! `/proc/<pid>/cgroup` that the process really sits in the scope. It also owns the process's one
//! D-Bus connection, opened lazily on first use and kept (reopened once if systemd dropped it, as
//! `systemctl daemon-reexec` does).
//!
//! The connection goes to the system bus (`/run/dbus/system_bus_socket`, D-Bus's own fixed path,
//! not a banger path, so it does not come from the `Layout`; [`Endpoints`] lets tests point
//! elsewhere). Not systemd's private socket `/run/systemd/private`, which `systemd-run` uses as
//! root: systemd stamps a well-known name as the sender of every message there, which zbus 5
//! rejects (its reader thread panics on the first reply). Without a bus the launch fails with an
//! error that says so: a VMM never runs outside its scope when systemd runs.
//!
//! It must never register any other pid than the one the caller holds, never start any unit other
//! than a scope, and never let a VMM run outside its scope silently: every failure is an error the
//! launcher answers by killing the held child.

use crate::error::{Error, Result};
use smol::stream::StreamExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;
use zbus::blocking::Connection;
use zbus::zvariant::{OwnedObjectPath, Value};

/// The system bus socket.
pub const SYSTEM_BUS_SOCKET: &str = "/run/dbus/system_bus_socket";
/// systemd's marker directory (`sd_booted(3)`).
const SYSTEMD_MARKER: &str = "/run/systemd/system";

const DESTINATION: &str = "org.freedesktop.systemd1";
const MANAGER_PATH: &str = "/org/freedesktop/systemd1";
const MANAGER_IFACE: &str = "org.freedesktop.systemd1.Manager";
/// Bound on one method call's answer.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Where systemd's D-Bus API is reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoints {
    /// The system bus socket.
    pub system_bus: PathBuf,
}

impl Endpoints {
    /// The host's real system bus ([`SYSTEM_BUS_SOCKET`]).
    pub fn system() -> Self {
        Endpoints {
            system_bus: PathBuf::from(SYSTEM_BUS_SOCKET),
        }
    }
}

/// One scope to create.
#[derive(Debug, Clone)]
pub struct ScopeRequest<'a> {
    /// The unit name, `banger-vm-<id>.scope`.
    pub unit: &'a str,
    /// The slice it goes into.
    pub slice: &'a str,
    /// Its `Description`.
    pub description: String,
    /// The held process to move into it.
    pub pid: u32,
    /// Bound on the start job.
    pub timeout: Duration,
    /// Where `/proc` is, for the membership check.
    pub proc_root: &'a Path,
}

/// The properties of the `StartTransientUnit` call: what `systemd-run --scope --collect
/// --unit=U --slice=S` sends, with the pid given.
pub fn properties<'a>(req: &'a ScopeRequest<'_>) -> Vec<(&'static str, Value<'a>)> {
    vec![
        ("Description", Value::from(req.description.as_str())),
        ("Slice", Value::from(req.slice)),
        ("CollectMode", Value::from("inactive-or-failed")),
        ("PIDs", Value::from(vec![req.pid])),
    ]
}

struct Cached {
    endpoints: Endpoints,
    conn: Connection,
    via: String,
    generation: u64,
}

/// The process's one connection to systemd (see the module doc), with a generation so a caller
/// that saw it fail drops that one and not a newer one.
static CONNECTION: Mutex<Option<Cached>> = Mutex::new(None);
static GENERATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn connect(ep: &Endpoints) -> std::result::Result<(Connection, String), String> {
    let via = format!("the system bus {}", ep.system_bus.display());
    let stream = UnixStream::connect(&ep.system_bus).map_err(|e| format!("{via}: {e}"))?;
    zbus::blocking::connection::Builder::async_io_unix_stream(stream)
        .method_timeout(CALL_TIMEOUT)
        .build()
        .map(|c| (c, via.clone()))
        .map_err(|e| format!("{via}: {e}"))
}

/// The cached connection for `ep`, opened when there is none (or it was for other endpoints).
/// The error is the reason, with what was tried.
fn connection(ep: &Endpoints) -> std::result::Result<(Connection, String, u64), String> {
    let mut guard = CONNECTION.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(c) = guard.as_ref().filter(|c| &c.endpoints == ep) {
        return Ok((c.conn.clone(), c.via.clone(), c.generation));
    }
    let (conn, via) = connect(ep).map_err(|why| {
        let systemd = if Path::new(SYSTEMD_MARKER).is_dir() {
            format!("systemd runs here ({SYSTEMD_MARKER} exists) but the D-Bus system bus is unreachable")
        } else {
            "the D-Bus system bus is unreachable".to_string()
        };
        format!("{systemd}: {why}")
    })?;
    let generation = GENERATION.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
    *guard = Some(Cached {
        endpoints: ep.clone(),
        conn: conn.clone(),
        via: via.clone(),
        generation,
    });
    Ok((conn, via, generation))
}

fn forget(generation: u64) {
    let mut guard = CONNECTION.lock().unwrap_or_else(|p| p.into_inner());
    if guard.as_ref().is_some_and(|c| c.generation == generation) {
        *guard = None;
    }
}

/// Why one attempt failed.
enum Failure {
    /// The connection itself failed (closed, I/O): worth one retry on a fresh connection.
    Transport(String),
    /// systemd answered no, or the job did not end in `done`: final.
    Refused(String, &'static str),
}

fn transport_or_refused(e: zbus::Error) -> Failure {
    match e {
        zbus::Error::MethodError(name, msg, _) => {
            let hint = if name.as_str() == "org.freedesktop.systemd1.UnitExists" {
                "a unit of that name is still loaded: if its VMM is gone, `systemctl stop` it"
            } else {
                "see `journalctl -b -u init.scope` for systemd's side"
            };
            Failure::Refused(
                format!("systemd refused: {name}: {}", msg.unwrap_or_default()),
                hint,
            )
        }
        zbus::Error::FDO(e) => Failure::Refused(
            format!("systemd refused: {e}"),
            "see `journalctl -b -u init.scope` for systemd's side",
        ),
        other => Failure::Transport(other.to_string()),
    }
}

/// One `StartTransientUnit` + job wait on `conn`.
fn start_on(conn: &Connection, req: &ScopeRequest<'_>) -> std::result::Result<(), Failure> {
    let rule = zbus::MatchRule::builder()
        .msg_type(zbus::message::Type::Signal)
        .interface(MANAGER_IFACE)
        .and_then(|b| b.member("JobRemoved"))
        .and_then(|b| b.path(MANAGER_PATH))
        .and_then(|b| b.arg(2, req.unit))
        .map_err(|e| Failure::Refused(format!("building the match rule: {e}"), "a bug"))?
        .build();
    let inner = conn.inner();
    zbus::block_on(async {
        // Subscribed before the call, so the job's end cannot slip past.
        let mut removed = zbus::MessageStream::for_match_rule(rule, inner, Some(64))
            .await
            .map_err(transport_or_refused)?;
        let aux: Vec<(&str, Vec<(&str, Value<'_>)>)> = Vec::new();
        let reply = inner
            .call_method(
                Some(DESTINATION),
                MANAGER_PATH,
                Some(MANAGER_IFACE),
                "StartTransientUnit",
                &(req.unit, "fail", properties(req), aux),
            )
            .await
            .map_err(transport_or_refused)?;
        let job: OwnedObjectPath = reply
            .body()
            .deserialize()
            .map_err(|e| Failure::Transport(format!("reading the job path: {e}")))?;
        let wait = async {
            while let Some(msg) = removed.next().await {
                let msg = msg.map_err(|e| Failure::Transport(e.to_string()))?;
                let Ok((_id, path, _unit, result)) =
                    msg.body()
                        .deserialize::<(u32, OwnedObjectPath, String, String)>()
                else {
                    continue;
                };
                if path != job {
                    continue;
                }
                return if result == "done" {
                    Ok(())
                } else {
                    Err(Failure::Refused(
                        format!("its start job ended `{result}`"),
                        "see `journalctl -b -u init.scope` for systemd's side",
                    ))
                };
            }
            Err(Failure::Transport(
                "the connection closed before the start job ended".into(),
            ))
        };
        let timeout = async {
            smol::Timer::after(req.timeout).await;
            Err(Failure::Refused(
                format!("its start job did not end within {:?}", req.timeout),
                "systemd is slow or stuck: see `systemctl list-jobs`",
            ))
        };
        smol::future::or(wait, timeout).await
    })
}

/// Creates the scope of `req` holding `req.pid` and returns once systemd has moved the process
/// in (job done, and `/proc/<pid>/cgroup` agrees).
pub fn start(ep: &Endpoints, req: &ScopeRequest<'_>) -> Result<()> {
    let what = || format!("registering the scope {} for pid {}", req.unit, req.pid);
    let mut last = String::new();
    for attempt in 0..2 {
        let (conn, via, generation) = connection(ep).map_err(|why| {
            Error::new(what(), why).hint(
                "banger needs D-Bus to put VMMs in their scopes: install and start it \
                 (`apt install dbus`, `systemctl status dbus.socket`); no VMM was started",
            )
        })?;
        match start_on(&conn, req) {
            Ok(()) => {
                return match pid_in_scope(req.proc_root, req.pid, req.slice, req.unit) {
                    Ok(true) => Ok(()),
                    Ok(false) => Err(Error::new(
                        what(),
                        format!(
                            "systemd reported the job done, but the process is not in {}",
                            req.unit
                        ),
                    )),
                    Err(e) => Err(e),
                };
            }
            Err(Failure::Transport(why)) => {
                forget(generation);
                last = format!("talking to systemd over {via}: {why}");
                if attempt == 0 {
                    crate::logging::info(
                        "bangerd-root",
                        "systemd connection lost, reconnecting",
                        serde_json::json!({"via": via, "error": why}),
                    );
                }
            }
            Err(Failure::Refused(why, hint)) => return Err(Error::new(what(), why).hint(hint)),
        }
    }
    Err(Error::new(what(), last).hint("check `systemctl status`; no VMM was started"))
}

/// True when `/proc/<pid>/cgroup` puts the process in `<slice>/<unit>`.
pub fn pid_in_scope(proc_root: &Path, pid: u32, slice: &str, unit: &str) -> Result<bool> {
    let path = proc_root.join(pid.to_string()).join("cgroup");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| Error::new(format!("reading {}", path.display()), e))?;
    Ok(cgroup_in_scope(&text, slice, unit))
}

/// True when a `/proc/<pid>/cgroup` text has the systemd hierarchy (cgroup v2 `0::`, or v1's
/// `name=systemd`) ending in `/<slice>/<unit>` (the slice may sit below a container's own cgroup).
pub fn cgroup_in_scope(text: &str, slice: &str, unit: &str) -> bool {
    let want = format!("/{slice}/{unit}");
    text.lines().any(|line| {
        let mut parts = line.splitn(3, ':');
        let (Some(_id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            return false;
        };
        (controllers.is_empty() || controllers == "name=systemd") && path.ends_with(&want)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::system::testutil::TempDir;

    #[test]
    fn properties_are_what_systemd_run_sends() {
        let req = ScopeRequest {
            unit: "banger-vm-a.scope",
            slice: "banger.slice",
            description: "banger VM a".into(),
            pid: 4242,
            timeout: Duration::from_secs(1),
            proc_root: Path::new("/proc"),
        };
        let props = properties(&req);
        let names: Vec<_> = props.iter().map(|(n, _)| *n).collect();
        assert_eq!(names, ["Description", "Slice", "CollectMode", "PIDs"]);
        assert_eq!(props[0].1, Value::from("banger VM a"));
        assert_eq!(props[1].1, Value::from("banger.slice"));
        assert_eq!(props[2].1, Value::from("inactive-or-failed"));
        assert_eq!(props[3].1, Value::from(vec![4242u32]));
        assert_eq!(props[3].1.value_signature().to_string(), "au");
    }

    #[test]
    fn cgroup_membership() {
        let (s, u) = ("banger.slice", "banger-vm-a.scope");
        assert!(cgroup_in_scope(
            "0::/banger.slice/banger-vm-a.scope\n",
            s,
            u
        ));
        // Inside a container without a cgroup namespace, the container's cgroup comes first.
        assert!(cgroup_in_scope(
            "0::/machine.slice/c1.service/payload/banger.slice/banger-vm-a.scope\n",
            s,
            u
        ));
        // cgroup v1 / hybrid: the name=systemd hierarchy.
        assert!(cgroup_in_scope(
            "12:cpu,cpuacct:/\n1:name=systemd:/banger.slice/banger-vm-a.scope\n0::/\n",
            s,
            u
        ));
        assert!(!cgroup_in_scope(
            "0::/banger.slice/banger-vm-b.scope\n",
            s,
            u
        ));
        assert!(!cgroup_in_scope(
            "0::/system.slice/bangerd-root.service\n",
            s,
            u
        ));
        assert!(!cgroup_in_scope(
            "0::/banger.slice/banger-vm-a.scope/sub\n",
            s,
            u
        ));
        // Another controller's hierarchy does not count.
        assert!(!cgroup_in_scope(
            "4:memory:/banger.slice/banger-vm-a.scope\n0::/\n",
            s,
            u
        ));
        assert!(!cgroup_in_scope("", s, u));
    }

    #[test]
    fn unreachable_bus_is_a_clear_error() {
        let t = TempDir::new();
        let req = ScopeRequest {
            unit: "banger-vm-t.scope",
            slice: "banger.slice",
            description: "t".into(),
            pid: std::process::id(),
            timeout: Duration::from_secs(1),
            proc_root: Path::new("/proc"),
        };
        // A socket nobody listens on, and no socket at all.
        let dead = t.path().join("bus");
        drop(std::os::unix::net::UnixListener::bind(&dead).expect("bind"));
        for ep in [
            Endpoints {
                system_bus: dead.clone(),
            },
            Endpoints {
                system_bus: t.path().join("no-bus"),
            },
        ] {
            let e = start(&ep, &req).unwrap_err().to_string();
            assert!(e.contains("registering the scope banger-vm-t.scope"), "{e}");
            assert!(e.contains("system bus is unreachable"), "{e}");
            assert!(e.contains(&ep.system_bus.display().to_string()), "{e}");
            assert!(e.contains("no VMM was started"), "{e}");
            // Nothing cached for a failed connect: the next call tries again.
            assert!(start(&ep, &req).is_err());
        }
    }

    #[test]
    fn pid_in_scope_reads_proc() {
        let t = TempDir::new();
        std::fs::create_dir_all(t.path().join("7")).expect("mkdir");
        std::fs::write(
            t.path().join("7/cgroup"),
            "0::/banger.slice/banger-vm-x.scope\n",
        )
        .expect("write");
        assert!(pid_in_scope(t.path(), 7, "banger.slice", "banger-vm-x.scope").expect("read"));
        assert!(!pid_in_scope(t.path(), 7, "banger.slice", "banger-vm-y.scope").expect("read"));
        let e = pid_in_scope(t.path(), 8, "banger.slice", "banger-vm-x.scope").unwrap_err();
        assert!(e.to_string().contains("8/cgroup"), "{e}");
    }
}
