//! `banger vm …`, `banger image …`, `banger kernel …`: VM lifecycle and the images VMs boot from.
//!
//! Thin: every verb is one daemon RPC; this module validates names early (the daemon checks them
//! again), shows long operations' stages live on a TTY, and formats results.

use crate::error::{Error, Result};
use crate::layout::Layout;
use crate::rpc::client;
use crate::termsafe as term;
use argh::{ArgsInfo, FromArgs};
use serde_json::{json, Value};
use std::io::Write;
use std::time::Duration;

/// How long a create/start/restart may take end to end.
const LONG_CALL: Duration = Duration::from_secs(300);

#[derive(FromArgs, ArgsInfo)]
/// Create, run, inspect and remove VMs.
#[argh(
    subcommand,
    name = "vm",
    example = "banger vm run --rm                  # create, boot, shell; deleted afterwards",
    example = "banger vm create --name dev --image debian",
    example = "banger vm ssh dev                   # or: banger vm exec dev -- uname -a",
    example = "banger vm create --name web --nat",
    example = "banger vm snapshot dev --as warm     # then: banger vm create --from warm",
    example = "banger vm list",
    example = "banger vm stop dev && banger vm delete dev"
)]
pub struct VmCmd {
    #[argh(subcommand)]
    cmd: VmSub,
}

#[derive(FromArgs, ArgsInfo)]
#[argh(subcommand)]
enum VmSub {
    Create(CreateCmd),
    Start(StartCmd),
    Stop(StopCmd),
    Kill(KillCmd),
    Restart(RestartCmd),
    Delete(DeleteCmd),
    List(ListCmd),
    Ps(PsCmd),
    Show(ShowCmd),
    Logs(LogsCmd),
    Snapshot(SnapshotVmCmd),
    Run(super::run::RunCmd),
    Ssh(super::enter::SshCmd),
    Exec(super::enter::ExecCmd),
    Ports(super::enter::PortsCmd),
}

#[derive(FromArgs, ArgsInfo)]
/// Create a VM from an image and start it (unless --no-start), or restore one from a snapshot
/// (--from); returns once the guest is ready.
#[argh(
    subcommand,
    name = "create",
    example = "banger vm create --name dev --image debian --vcpu 2 --memory 1024",
    example = "banger vm create --from warm --name try-1   # a clone of snapshot `warm`"
)]
struct CreateCmd {
    /// VM name: 1-63 of a-z, 0-9, '-', no leading or trailing '-' (default: generated)
    #[argh(option)]
    name: Option<String>,
    /// image to boot (default: the only image, if there is exactly one)
    #[argh(option)]
    image: Option<String>,
    /// number of vCPUs (default 1)
    #[argh(option)]
    vcpu: Option<u32>,
    /// memory in MiB (default 512)
    #[argh(option)]
    memory: Option<u32>,
    /// restore this snapshot (see `banger snapshot list`) instead of booting an image: the new VM
    /// gets its own disk clone, address and name, in milliseconds; image, vCPUs and memory are
    /// the snapshot's
    #[argh(option)]
    from: Option<String>,
    /// create the VM but do not start it
    #[argh(switch)]
    no_start: bool,
    /// let the guest reach outside networks through the host (NAT); guests are otherwise
    /// limited to the host bridge
    #[argh(switch)]
    nat: bool,
}

#[derive(FromArgs, ArgsInfo)]
/// Snapshot a running VM: paused for the snapshot (memory, device state and a copy-on-write clone
/// of its disk), then resumed (or stopped with --stop). Restore it with `vm create --from`.
#[argh(
    subcommand,
    name = "snapshot",
    example = "banger vm snapshot dev --as warm",
    example = "banger vm create --from warm        # as many clones as you like",
    note = "Snapshots are bound to the Firecracker version that wrote them; see `banger snapshot list`."
)]
struct SnapshotVmCmd {
    /// VM name or id
    #[argh(positional)]
    vm: String,
    /// snapshot name: 1-63 of a-z, 0-9, '-' (default: <vm>-<4 hex digits>)
    #[argh(option, long = "as")]
    name: Option<String>,
    /// stop the VM after the snapshot instead of resuming it
    #[argh(switch)]
    stop: bool,
}

#[derive(FromArgs, ArgsInfo)]
/// Start a stopped VM; returns once the guest is ready.
#[argh(subcommand, name = "start")]
struct StartCmd {
    /// VM name or id
    #[argh(positional)]
    vm: String,
}

#[derive(FromArgs, ArgsInfo)]
/// Stop a VM and start it again: a new boot with a new boot_id.
#[argh(subcommand, name = "restart")]
struct RestartCmd {
    /// VM name or id
    #[argh(positional)]
    vm: String,
}

#[derive(FromArgs, ArgsInfo)]
/// Stop a VM gracefully (Ctrl-Alt-Del), killing it after --timeout seconds if it does not stop.
#[argh(subcommand, name = "stop")]
struct StopCmd {
    /// VM name or id
    #[argh(positional)]
    vm: String,
    /// seconds to wait for a graceful stop before killing (default 10; 0 kills at once)
    #[argh(option, default = "10")]
    timeout: u64,
}

#[derive(FromArgs, ArgsInfo)]
/// Send a signal to a VM's VMM process (default KILL): TERM, KILL, INT or HUP.
#[argh(subcommand, name = "kill")]
struct KillCmd {
    /// VM name or id
    #[argh(positional)]
    vm: String,
    /// signal: TERM, KILL, INT or HUP (default KILL)
    #[argh(option, default = "String::from(\"KILL\")")]
    signal: String,
}

#[derive(FromArgs, ArgsInfo)]
/// Delete VMs and their disks (a running VM is killed first: nothing of it survives the delete).
#[argh(subcommand, name = "delete")]
struct DeleteCmd {
    /// VM names or ids
    #[argh(positional, greedy)]
    vms: Vec<String>,
}

#[derive(FromArgs, ArgsInfo)]
/// List VMs.
#[argh(subcommand, name = "list")]
struct ListCmd {
    /// print JSON
    #[argh(switch)]
    json: bool,
}

#[derive(FromArgs, ArgsInfo)]
/// List VMs (same as `vm list`).
#[argh(subcommand, name = "ps")]
struct PsCmd {
    /// print JSON
    #[argh(switch)]
    json: bool,
}

#[derive(FromArgs, ArgsInfo)]
/// Show one VM: state, VMM identity, guest boot_id, files.
#[argh(subcommand, name = "show")]
struct ShowCmd {
    /// VM name or id
    #[argh(positional)]
    vm: String,
    /// print JSON
    #[argh(switch)]
    json: bool,
}

#[derive(FromArgs, ArgsInfo)]
/// Print a VM's console log; -f keeps following it. Control characters and escape sequences
/// from the guest are shown escaped (newlines, tabs and colours are kept); --raw prints the
/// console as it is.
#[argh(subcommand, name = "logs")]
struct LogsCmd {
    /// VM name or id
    #[argh(positional)]
    vm: String,
    /// keep printing new output until interrupted
    #[argh(switch, short = 'f')]
    follow: bool,
    /// print the console's bytes unescaped (the guest's escape sequences reach your terminal)
    #[argh(switch)]
    raw: bool,
}

/// Validates a VM name as the daemon will: 1–63 of a-z, 0-9, '-', no leading/trailing '-'.
pub fn check_name(name: &str) -> Result<()> {
    crate::helper::validate::vm_id(name).map(drop).map_err(|_| {
        Error::usage(
            format!("VM name `{name}`"),
            "names are 1-63 characters of a-z, 0-9 and '-', not starting or ending with '-'",
        )
        .hint("pick a name like dev-1")
    })
}

fn socket() -> std::path::PathBuf {
    Layout::from_env().daemon_socket()
}

fn call(method: &str, params: Value, what: &str) -> Result<Value> {
    client::call(&socket(), method, params).map_err(|e| e.into_error(what))
}

/// A long call: on a TTY, a thread shows the operation's stage while we wait.
pub(super) fn long_call(method: &str, params: Value, what: &str, target: &str) -> Result<Value> {
    use std::io::IsTerminal;
    let sock = socket();
    let live = std::io::stderr().is_terminal();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = live.then(|| {
        let (sock, done, target) = (sock.clone(), done.clone(), target.to_string());
        std::thread::spawn(move || watch_stages(&sock, &done, &target))
    });
    let r = client::call_with_timeout(&sock, method, params, LONG_CALL);
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    if let Some(w) = watcher {
        let _ = w.join();
    }
    r.map_err(|e| e.into_error(what))
}

fn watch_stages(sock: &std::path::Path, done: &std::sync::atomic::AtomicBool, target: &str) {
    let mut last = String::new();
    let mut err = std::io::stderr();
    while !done.load(std::sync::atomic::Ordering::SeqCst) {
        if let Ok(v) = client::call_with_timeout(
            sock,
            "daemon.operations.list",
            json!({}),
            Duration::from_secs(2),
        ) {
            let stage = v["operations"]
                .as_array()
                .and_then(|ops| {
                    ops.iter()
                        .rev()
                        .find(|o| o["target"] == target && o["done"] == false)
                })
                .and_then(|o| o["stage"].as_str())
                .unwrap_or("")
                .to_string();
            if !stage.is_empty() && stage != last {
                let _ = write!(err, "\r\x1b[2K  {target}: {stage}…");
                let _ = err.flush();
                last = stage;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if !last.is_empty() {
        let _ = write!(err, "\r\x1b[2K");
    }
}

/// Runs a `vm` subcommand.
pub fn run(c: VmCmd) -> Result<i32> {
    match c.cmd {
        VmSub::Create(c) => {
            if let Some(n) = &c.name {
                check_name(n)?;
            }
            let target = c.name.clone().unwrap_or_default();
            let params = match &c.from {
                Some(snap) => {
                    if c.image.is_some() || c.vcpu.is_some() || c.memory.is_some() || c.no_start {
                        return Err(Error::usage(
                            "creating a VM from a snapshot",
                            "--from takes the snapshot's image, vCPUs and memory and always starts the VM",
                        )
                        .hint("drop --image, --vcpu, --memory and --no-start"));
                    }
                    check_name(snap).map_err(|_| {
                        Error::usage(
                            format!("snapshot name `{snap}`"),
                            "not a valid snapshot name",
                        )
                        .hint("see `banger snapshot list`")
                    })?;
                    json!({"name": c.name, "from": snap, "nat": c.nat})
                }
                None => {
                    let (vcpu, memory) = (c.vcpu.unwrap_or(1), c.memory.unwrap_or(512));
                    crate::daemon::vms::check_size(u64::from(vcpu), u64::from(memory))
                        .map_err(|why| Error::usage("creating a VM", why))?;
                    json!({"name": c.name, "image": c.image, "vcpu": vcpu, "memory_mib": memory, "start": !c.no_start, "nat": c.nat})
                }
            };
            let v = long_call("vm.create", params, "creating a VM", &target)?;
            println!("{}", term::plain(&summary(&v)));
            Ok(0)
        }
        VmSub::Snapshot(c) => {
            if let Some(n) = &c.name {
                check_name(n).map_err(|_| {
                    Error::usage(
                        format!("snapshot name `{n}`"),
                        "names are 1-63 characters of a-z, 0-9 and '-', not starting or ending with '-'",
                    )
                })?;
            }
            let v = long_call(
                "vm.snapshot",
                json!({"vm": c.vm, "as": c.name, "stop": c.stop}),
                &format!("snapshotting VM `{}`", c.vm),
                &c.vm,
            )?;
            let line = format!(
                "snapshot {} of {}: {} memory ({} on disk), disk {}; {}",
                s(&v, "name"),
                s(&v, "source_vm"),
                super::snapshot::mib(v["memory_mib"].as_u64().unwrap_or(0) << 20),
                super::snapshot::mib(v["size_bytes"].as_u64().unwrap_or(0)),
                s(&v, "disk_copy"),
                summary(&v["vm"])
            );
            println!("{}", term::plain(&line));
            Ok(0)
        }
        VmSub::Run(c) => super::run::run(c),
        VmSub::Ssh(c) => super::enter::ssh(c),
        VmSub::Exec(c) => super::enter::exec(c),
        VmSub::Ports(c) => super::enter::ports(c),
        VmSub::Start(r) => one_long("vm.start", &r.vm, "starting"),
        VmSub::Restart(r) => one_long("vm.restart", &r.vm, "restarting"),
        VmSub::Stop(s) => {
            let v = long_call(
                "vm.stop",
                json!({"vm": s.vm, "timeout_s": s.timeout}),
                &format!("stopping VM `{}`", s.vm),
                &s.vm,
            )?;
            println!("{}", term::plain(&summary(&v)));
            Ok(0)
        }
        VmSub::Kill(k) => {
            crate::helper::validate::signal(&k.signal)
                .map_err(|e| Error::usage("--signal", e.message))?;
            let v = call(
                "vm.kill",
                json!({"vm": k.vm, "signal": k.signal}),
                &format!("signalling VM `{}`", k.vm),
            )?;
            println!("{}", term::plain(&summary(&v)));
            Ok(0)
        }
        VmSub::Delete(d) => {
            if d.vms.is_empty() {
                return Err(Error::usage("deleting VMs", "name at least one VM"));
            }
            let v = long_call("vm.delete", json!({"vms": d.vms}), "deleting VMs", "")?;
            for name in v["deleted"].as_array().into_iter().flatten() {
                println!("deleted {}", term::plain(name.as_str().unwrap_or("?")));
            }
            Ok(0)
        }
        VmSub::List(ListCmd { json }) | VmSub::Ps(PsCmd { json }) => {
            let raw = client::call_raw(&socket(), "vm.list", json!({}), client::DEFAULT_TIMEOUT)
                .map_err(|e| e.into_error("listing VMs"))?;
            if json {
                // Printed as the daemon wrote it: no parse and re-encode of a long list.
                #[derive(serde::Deserialize)]
                struct List<'a> {
                    #[serde(borrow)]
                    vms: &'a serde_json::value::RawValue,
                }
                let l: List<'_> = serde_json::from_str(raw.get())
                    .map_err(|e| Error::new("reading the daemon's VM list", e))?;
                println!("{}", term::json(l.vms.get()));
            } else {
                let v: Value = serde_json::from_str(raw.get())
                    .map_err(|e| Error::new("reading the daemon's VM list", e))?;
                print!("{}", term::plain(&table(&v["vms"])));
            }
            Ok(0)
        }
        VmSub::Show(s) => {
            let v = call(
                "vm.show",
                json!({"vm": s.vm}),
                &format!("showing VM `{}`", s.vm),
            )?;
            if s.json {
                println!("{}", term::json(&v.to_string()));
            } else {
                print!("{}", term::plain(&details(&v)));
            }
            Ok(0)
        }
        VmSub::Logs(l) => logs(&l.vm, l.follow, l.raw),
    }
}

fn one_long(method: &str, vm: &str, verb: &str) -> Result<i32> {
    let v = long_call(method, json!({"vm": vm}), &format!("{verb} VM `{vm}`"), vm)?;
    println!("{}", term::plain(&summary(&v)));
    Ok(0)
}

fn s<'a>(v: &'a Value, k: &str) -> &'a str {
    v.get(k).and_then(Value::as_str).unwrap_or("-")
}

fn summary(v: &Value) -> String {
    let mut out = format!("{} {}", s(v, "name"), s(v, "state"));
    if let Some(b) = v.get("boot_id").and_then(Value::as_str) {
        out.push_str(&format!(" boot_id={b}"));
    }
    if let Some(p) = v.get("pid").and_then(Value::as_i64) {
        out.push_str(&format!(" pid={p}"));
    }
    if let Some(sn) = v.get("snapshot").and_then(Value::as_str) {
        out.push_str(&format!(" from={sn}"));
    }
    out
}

fn table(vms: &Value) -> String {
    let mut out = format!(
        "{:<20} {:<14} {:<10} {:<15} {:<3} {:>4} {:>7} {:>8}  {:<16} {}\n",
        "NAME", "ID", "STATE", "IP", "NAT", "CPU", "MEM", "PID", "IMAGE", "SNAPSHOT"
    );
    for v in vms.as_array().into_iter().flatten() {
        out.push_str(&format!(
            "{:<20} {:<14} {:<10} {:<15} {:<3} {:>4} {:>7} {:>8}  {:<16} {}\n",
            s(v, "name"),
            s(v, "id"),
            s(v, "state"),
            s(v, "ip"),
            if v["nat"] == true { "on" } else { "-" },
            v["vcpu"].as_u64().unwrap_or(0),
            format!("{}M", v["memory_mib"].as_u64().unwrap_or(0)),
            v["pid"]
                .as_i64()
                .map(|p| p.to_string())
                .unwrap_or_else(|| "-".into()),
            s(v, "image"),
            s(v, "snapshot"),
        ));
    }
    out
}

fn details(v: &Value) -> String {
    let vm = &v["vm"];
    let mut out = String::new();
    for k in [
        "name",
        "id",
        "state",
        "image",
        "snapshot",
        "boot_id",
        "ip",
        "mac",
        "tap",
        "nat",
        "created_at",
        "updated_at",
    ] {
        let v = match (k, &vm[k]) {
            ("nat", Value::Bool(true)) => "on",
            ("nat", _) => "off",
            _ => s(vm, k),
        };
        out.push_str(&format!("{k}: {v}\n"));
    }
    out.push_str(&format!(
        "vcpu: {}\nmemory: {} MiB\n",
        vm["vcpu"].as_u64().unwrap_or(0),
        vm["memory_mib"].as_u64().unwrap_or(0)
    ));
    if let Some(p) = vm["pid"].as_i64() {
        out.push_str(&format!(
            "vmm: pid {p}, start time {}, comm {}\n",
            vm["start_time"].as_u64().unwrap_or(0),
            s(vm, "comm")
        ));
    }
    if let Some(d) = v.get("dir").and_then(Value::as_str) {
        out.push_str(&format!("dir: {d}\n"));
    }
    out
}

/// What `vm logs` prints of a chunk of console text: escaped for the terminal unless `raw`.
fn console_text(data: &str, raw: bool) -> std::borrow::Cow<'_, str> {
    if raw {
        std::borrow::Cow::Borrowed(data)
    } else {
        term::console(data)
    }
}

fn logs(vm: &str, follow: bool, raw: bool) -> Result<i32> {
    let mut offset: u64 = 0;
    let mut out = std::io::stdout();
    loop {
        let v = call(
            "vm.logs",
            json!({"vm": vm, "offset": offset}),
            &format!("reading the console of VM `{vm}`"),
        )?;
        let data = v["data"].as_str().unwrap_or("");
        if !data.is_empty() {
            let _ = out.write_all(console_text(data, raw).as_bytes());
            let _ = out.flush();
        }
        offset = v["offset"].as_u64().unwrap_or(offset);
        // The daemon answers in chunks: print all of it, then stop or wait for more.
        if v["more"] == true && !data.is_empty() {
            continue;
        }
        if !follow {
            return Ok(0);
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[derive(FromArgs, ArgsInfo)]
/// Import, list and remove images (a root filesystem plus the kernel to boot it with).
#[argh(
    subcommand,
    name = "image",
    example = "banger image import debian --rootfs ./debian.ext4 --kernel k6"
)]
pub struct ImageCmd {
    #[argh(subcommand)]
    cmd: ImageSub,
}

#[derive(FromArgs, ArgsInfo)]
#[argh(subcommand)]
enum ImageSub {
    Build(super::image_build::ImageBuildCmd),
    Import(ImageImport),
    List(ImageList),
    Rm(ImageRm),
}

#[derive(FromArgs, ArgsInfo)]
/// Import a root filesystem as an image (copied into banger's state).
#[argh(subcommand, name = "import")]
struct ImageImport {
    /// image name
    #[argh(positional)]
    name: String,
    /// root filesystem file (ext4)
    #[argh(option)]
    rootfs: String,
    /// kernel to boot it with (see `banger kernel list`)
    #[argh(option)]
    kernel: String,
    /// for guests without the banger agent: the console line prefix that means "ready"; the rest
    /// of that line is the guest's boot_id
    #[argh(option)]
    ready_console: Option<String>,
}

#[derive(FromArgs, ArgsInfo)]
/// List images.
#[argh(subcommand, name = "list")]
struct ImageList {
    /// print JSON
    #[argh(switch)]
    json: bool,
}

#[derive(FromArgs, ArgsInfo)]
/// Remove an image (VMs made from it keep their own disks).
#[argh(subcommand, name = "rm")]
struct ImageRm {
    /// image name
    #[argh(positional)]
    name: String,
}

/// `image list`'s SIZE cell: allocated/apparent (`217M/2.0G`), `missing` when the daemon could not
/// read the file.
fn image_size(i: &Value) -> String {
    match (i["disk_bytes"].as_u64(), i["size_bytes"].as_u64()) {
        (Some(disk), Some(size)) => format!(
            "{}/{}",
            crate::guest::ext4::human(disk),
            crate::guest::ext4::human(size)
        ),
        _ => "missing".into(),
    }
}

/// `image list`'s table: columns as wide as their widest cell, two spaces apart (a long console
/// prefix or origin never shifts the columns after it out of line).
fn image_table(images: &Value) -> String {
    let mut rows = vec![["NAME", "KERNEL", "SIZE", "READINESS", "ORIGIN"].map(String::from)];
    for i in images.as_array().into_iter().flatten() {
        let ready = i["ready_pattern"]
            .as_str()
            .map(|p| format!("console: {p}"))
            .unwrap_or_else(|| "agent".into());
        rows.push([
            s(i, "name").to_string(),
            s(i, "kernel").to_string(),
            image_size(i),
            ready,
            s(i, "origin").to_string(),
        ]);
    }
    let mut width = [0usize; 5];
    for r in &rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    for r in &rows {
        let mut line = String::new();
        for (c, w) in r.iter().zip(width) {
            line.push_str(&format!("{c:<w$}  "));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Runs an `image` subcommand.
pub fn run_image(c: ImageCmd) -> Result<i32> {
    match c.cmd {
        ImageSub::Build(b) => super::image_build::run(b),
        ImageSub::Import(i) => {
            let rootfs = absolute(&i.rootfs)?;
            let v = long_call(
                "image.import",
                json!({"name": i.name, "rootfs": rootfs, "kernel": i.kernel, "ready_console": i.ready_console}),
                &format!("importing image `{}`", i.name),
                &i.name,
            )?;
            println!("imported image {}", term::plain(s(&v, "name")));
            Ok(0)
        }
        ImageSub::List(l) => {
            let v = call("image.list", json!({}), "listing images")?;
            if l.json {
                println!("{}", term::json(&v["images"].to_string()));
            } else {
                print!("{}", term::plain(&image_table(&v["images"])));
            }
            Ok(0)
        }
        ImageSub::Rm(r) => {
            call(
                "image.rm",
                json!({"name": r.name}),
                &format!("removing image `{}`", r.name),
            )?;
            println!("removed image {}", r.name);
            Ok(0)
        }
    }
}

#[derive(FromArgs, ArgsInfo)]
/// Import, list and remove guest kernels.
#[argh(
    subcommand,
    name = "kernel",
    example = "banger kernel import k6 ./vmlinux"
)]
pub struct KernelCmd {
    #[argh(subcommand)]
    cmd: KernelSub,
}

#[derive(FromArgs, ArgsInfo)]
#[argh(subcommand)]
enum KernelSub {
    Import(KernelImport),
    List(KernelList),
    Rm(KernelRm),
}

#[derive(FromArgs, ArgsInfo)]
/// Import a guest kernel (an uncompressed vmlinux ELF; copied into banger's state).
#[argh(subcommand, name = "import")]
struct KernelImport {
    /// kernel name
    #[argh(positional)]
    name: String,
    /// path of the kernel image
    #[argh(positional)]
    path: String,
}

#[derive(FromArgs, ArgsInfo)]
/// List kernels.
#[argh(subcommand, name = "list")]
struct KernelList {
    /// print JSON
    #[argh(switch)]
    json: bool,
}

#[derive(FromArgs, ArgsInfo)]
/// Remove a kernel no image uses.
#[argh(subcommand, name = "rm")]
struct KernelRm {
    /// kernel name
    #[argh(positional)]
    name: String,
}

/// Runs a `kernel` subcommand.
pub fn run_kernel(c: KernelCmd) -> Result<i32> {
    match c.cmd {
        KernelSub::Import(k) => {
            let path = absolute(&k.path)?;
            let v = call(
                "kernel.import",
                json!({"name": k.name, "path": path}),
                &format!("importing kernel `{}`", k.name),
            )?;
            println!("imported kernel {}", term::plain(s(&v, "name")));
            Ok(0)
        }
        KernelSub::List(l) => {
            let v = call("kernel.list", json!({}), "listing kernels")?;
            if l.json {
                println!("{}", term::json(&v["kernels"].to_string()));
            } else {
                println!("{:<20} PATH", "NAME");
                for k in v["kernels"].as_array().into_iter().flatten() {
                    let row = format!("{:<20} {}", s(k, "name"), s(k, "path"));
                    println!("{}", term::plain(&row));
                }
            }
            Ok(0)
        }
        KernelSub::Rm(r) => {
            call(
                "kernel.rm",
                json!({"name": r.name}),
                &format!("removing kernel `{}`", r.name),
            )?;
            println!("removed kernel {}", r.name);
            Ok(0)
        }
    }
}

fn absolute(p: &str) -> Result<String> {
    let path = std::path::Path::new(p);
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(|e| Error::new("finding the current directory", e))?
            .join(path)
    };
    if !abs.is_file() {
        return Err(
            Error::new(format!("reading {}", abs.display()), "no such file")
                .hint("give the path of an existing file"),
        );
    }
    Ok(abs.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_escape_unless_raw() {
        let evil = "\x1b]0;t\x07\x1b[1mbold\x1b[0m\r\n";
        assert_eq!(
            console_text(evil, false),
            "\\x1b]0;t\\x07\x1b[1mbold\x1b[0m\r\n"
        );
        assert_eq!(console_text(evil, true), evil);
    }

    #[test]
    fn image_table_has_size_and_origin_columns() {
        let images = json!([
            {"name": "dev", "kernel": "k6", "ready_pattern": null, "size_bytes": 2u64 << 30,
             "disk_bytes": 217u64 << 20, "origin": "built: debian bookworm from http://m/debian, 2026-12-01"},
            {"name": "old", "kernel": "k6", "ready_pattern": "banger-guest: ready boot_id=",
             "size_bytes": null, "disk_bytes": null, "origin": null}
        ]);
        let t = image_table(&images);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3, "{t}");
        let col = |l: &str, h: &str| l.get(lines[0].find(h).unwrap()..).unwrap_or("").to_string();
        assert!(col(lines[1], "SIZE").starts_with("217M/2.0G "), "{t}");
        assert!(col(lines[2], "SIZE").starts_with("missing "), "{t}");
        assert_eq!(
            col(lines[1], "ORIGIN"),
            "built: debian bookworm from http://m/debian, 2026-12-01"
        );
        // No origin recorded (imported before schema 3): a dash, in line with the header.
        assert_eq!(col(lines[2], "ORIGIN"), "-");
        assert!(col(lines[2], "READINESS").starts_with("console: banger-guest: ready boot_id="));
    }

    #[test]
    fn list_table_has_ip_and_nat_columns() {
        let vms = json!([
            {"name": "a", "id": "0123456789ab", "state": "running", "ip": "172.30.0.2",
             "nat": true, "vcpu": 1, "memory_mib": 128, "pid": 42, "image": "tiny"},
            {"name": "b", "id": "ba9876543210", "state": "stopped", "ip": null,
             "nat": false, "vcpu": 2, "memory_mib": 512, "pid": null, "image": "tiny",
             "snapshot": "warm"}
        ]);
        let t = table(&vms);
        let lines: Vec<Vec<&str>> = t.lines().map(|l| l.split_whitespace().collect()).collect();
        assert_eq!(
            lines[0],
            ["NAME", "ID", "STATE", "IP", "NAT", "CPU", "MEM", "PID", "IMAGE", "SNAPSHOT"]
        );
        assert_eq!(
            lines[1],
            [
                "a",
                "0123456789ab",
                "running",
                "172.30.0.2",
                "on",
                "1",
                "128M",
                "42",
                "tiny",
                "-"
            ]
        );
        assert_eq!(
            lines[2],
            [
                "b",
                "ba9876543210",
                "stopped",
                "-",
                "-",
                "2",
                "512M",
                "-",
                "tiny",
                "warm"
            ]
        );
    }

    #[test]
    fn details_show_the_network() {
        let v = json!({"vm": {"name": "a", "id": "0123456789ab", "state": "running",
            "ip": "172.30.0.2", "mac": "02:01:23:45:67:89", "tap": "bgr-0123456789", "nat": false,
            "vcpu": 1, "memory_mib": 128}});
        let d = details(&v);
        for line in [
            "ip: 172.30.0.2\n",
            "mac: 02:01:23:45:67:89\n",
            "tap: bgr-0123456789\n",
            "nat: off\n",
        ] {
            assert!(d.contains(line), "{line:?} in {d}");
        }
    }
}
