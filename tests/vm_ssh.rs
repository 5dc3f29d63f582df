//! SSH plumbing end to end through the real daemon, root helper and CLI (under a temp layout, as
//! root), with the stand-in VMM whose "guest" agent answers `hello` with a fixed, marked host key:
//! the daemon passes `banger.name=`/`banger.key=` at boot, pins the agent's host key in banger's
//! own known_hosts, keeps the generated ssh config in step, refuses a changed host key loudly (the
//! VM is stopped, nothing re-pinned), forgets the pins at delete; `vm ports`, `vm run`'s usage
//! errors, `vm exec`'s exit status when ssh itself fails. (Real sshd in a real guest: the smoke
//! suite's TCG scenarios.)
//!
//! `vm exec` end to end: a real sshd plays the guest's sshd at the VM's address inside the test's
//! namespace (the stand-in has none), with the test re-pinning that sshd's host key as the agent
//! would have reported it. With `BANGER_SSH_BENCH=1` it also prints `vm exec NAME -- true` against
//! plain `ssh` with the same options (median of 20) — numbers, never asserted.
//!
//! The helper runs in a network namespace of the test's own; every command that connects to a
//! guest address runs inside it too, so no packet reaches the machine's own network.

mod common;
#[path = "guest/mod.rs"]
mod guest;
#[path = "sshd/mod.rs"]
mod sshd;
#[path = "vmhost/mod.rs"]
mod vmhost;

use common::*;
use serde_json::Value;
use std::process::{Command, Output};
use vmhost::{median, time_ms, Host};

/// The stand-in guest's host key (standin/src/server.rs `STANDIN_HOST_KEY`).
const STANDIN_HOST_KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGposxU1u8AlmBpcq3yn+btS1uQymLutYq90E6gMTcpH";

/// A host with the stand-in VMM and the tiny guest imported as image `agent` (its "guest" agent is
/// the stand-in's own); `None` after a SKIP.
fn host(test: &str, tag: &str) -> Option<Host> {
    let h = Host::start(test, tag)?;
    if !h.standin {
        eprintln!("SKIP: {test}: needs the stand-in VMM's agent (the tiny guest has none)");
        return None;
    }
    let kernel = guest::build_tiny_guest(&h.bed.root).expect("building the tiny guest");
    h.ok(&["kernel", "import", "tiny", kernel.to_str().unwrap()]);
    h.import_agent_image("tiny");
    Some(h)
}

#[test]
fn host_key_pinned_at_boot_refused_when_changed_forgotten_at_delete() {
    let Some(h) = host("host_key_pinned", "ssh-pin") else {
        return;
    };
    let l = h.bed.layout();
    h.ok(&["vm", "create", "--name", "ag", "--image", "agent"]);
    let vm = h.show("ag");
    let (id, ip) = (vm["id"].as_str().unwrap(), vm["ip"].as_str().unwrap());

    // The install's key exists, owner-only, and the guest was told it and its name.
    let key = banger::ssh::OwnerKey::load(&l).expect("the daemon made the key");
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(&key.path).unwrap().mode() & 0o777, 0o600);
    let hello = banger::agent::call_hello(
        &l.vm_dir(id).join("vsock.sock"),
        banger::agent::AGENT_VSOCK_PORT,
    )
    .unwrap();
    assert_eq!(hello.hostname, "ag", "banger.name= reached the guest");

    // Pinned for ag.vm and its address, tagged with the VM id.
    let kh = h.known_hosts();
    assert_eq!(
        kh,
        format!("ag.vm,{ip} {STANDIN_HOST_KEY} banger-vm={id}\n"),
        "{kh}"
    );
    // The generated ssh config has its block.
    let cfg = h.ssh_config();
    assert!(
        cfg.contains(&format!("Host ag.vm\n    HostName {ip}\n")),
        "{cfg}"
    );

    // A restart keeps the same pin (idempotent).
    h.ok(&["vm", "restart", "ag"]);
    assert_eq!(h.known_hosts(), kh);

    // `vm ports`: the agent's (empty) listener list, in both forms.
    let out = h.ok(&["vm", "ports", "ag", "--json"]);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["ports"], serde_json::json!([]), "{out}");
    assert!(h.ok(&["vm", "ports", "ag"]).starts_with("ENDPOINT"));

    // Another key pinned for it (as if the guest's key changed): the next boot is refused loudly,
    // the VM is left stopped and the pin is not replaced.
    let other = banger::ssh::PublicKey::from_bytes([7; 32]).to_openssh();
    std::fs::write(
        l.ssh_known_hosts(),
        format!("ag.vm,{ip} {other} banger-vm={id}\n"),
    )
    .unwrap();
    let o = h.run(&["vm", "restart", "ag"]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert!(err.contains("HOST KEY HAS CHANGED"), "{err}");
    assert!(err.contains("man-in-the-middle"), "{err}");
    assert!(err.contains("banger vm delete ag"), "{err}");
    assert_eq!(h.show("ag")["state"], "stopped");
    assert!(h.known_hosts().contains(&other));

    // `vm ssh` to a stopped VM says how to start it, and runs no ssh.
    let o = h.run(&["vm", "exec", "ag", "--", "true"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("banger vm start ag"), "{}", stderr(&o));

    // Delete forgets the pin and the config block.
    h.ok(&["vm", "delete", "ag"]);
    assert_eq!(h.known_hosts(), "");
    assert!(!h.ssh_config().contains("Host ag.vm"));
}

#[test]
fn exec_reports_sshs_own_failure_and_run_refuses_bad_flags() {
    let Some(h) = host("exec_reports", "ssh-exec") else {
        return;
    };
    // Usage errors: exit 2, nothing created.
    for args in [
        &["vm", "run", "-d", "--rm"][..],
        &["vm", "run", "-d", "--", "true"],
        &["vm", "exec", "nope"],
        &["vm", "run", "--name", "Bad_Name"],
    ] {
        let o = h.run(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
    }
    let v: Value = serde_json::from_str(&h.ok(&["vm", "list", "--json"])).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 0, "{v}");

    // `vm run -d`: creates, boots, prints the name and how to get in, returns.
    let out = h.ok(&["vm", "run", "-d", "--name", "bg", "--image", "agent"]);
    assert_eq!(out, "bg\nbanger vm ssh bg\n");
    assert_eq!(h.show("bg")["state"], "running");
    // Its name is now taken: refused before anything is created, and not "kept for you".
    let o = h.run(&["vm", "run", "-d", "--name", "bg", "--image", "agent"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("already exists"), "{}", stderr(&o));
    assert!(!stderr(&o).contains("was kept"), "{}", stderr(&o));

    // The stand-in's guest has no sshd: ssh itself fails (255), and banger says so. Inside the
    // test's namespace, where the guest address lives.
    let o = h.run_in_ns(&["vm", "exec", "bg", "--", "sh", "-c", "exit 7"]);
    assert_eq!(o.status.code(), Some(255), "{}", stderr(&o));
    assert!(stderr(&o).contains("ssh itself failed"), "{}", stderr(&o));
    h.ok(&["vm", "delete", "bg"]);
}

#[test]
fn vm_exec_through_a_real_sshd_at_the_vms_address() {
    if let Err(why) = sshd::sshd_binary() {
        eprintln!("SKIP: vm_exec_through_a_real_sshd_at_the_vms_address: {why}");
        return;
    }
    let Some(h) = host("vm_exec_through", "ssh-real") else {
        return;
    };
    let l = h.bed.layout();
    h.ok(&["vm", "create", "--name", "ex", "--image", "agent"]);
    let vm = h.show("ex");
    let (id, ip) = (vm["id"].as_str().unwrap(), vm["ip"].as_str().unwrap());
    // The guest's address answers inside the namespace (on its loopback), served by a real sshd
    // that accepts banger's key, as the agent arranges in a real guest.
    assert!(h
        .ns
        .ip(&["addr", "add", &format!("{ip}/32"), "dev", "lo"])
        .status
        .success());
    assert!(h.ns.ip(&["link", "set", "lo", "up"]).status.success());
    let key = banger::ssh::OwnerKey::load(&l).unwrap();
    let sshd = sshd::Sshd::start(
        &h.ns.name,
        ip,
        &h.bed.root.join("sshd"),
        &key.authorized_keys_line(),
    );
    // This sshd's host key in the pin, as if the agent had reported it.
    std::fs::write(
        l.ssh_known_hosts(),
        format!("ex.vm,{ip} {} banger-vm={id}\n", sshd.host_key),
    )
    .unwrap();

    let o = h.run_in_ns(&["vm", "exec", "ex", "--", "sh", "-c", "exit 7"]);
    assert_eq!(
        o.status.code(),
        Some(7),
        "{}\nsshd: {}",
        stderr(&o),
        sshd.log_text()
    );
    let o = h.run_in_ns(&[
        "vm", "exec", "ex", "--", "printf", "%s|", "a b", "it's", "$HOME", "",
    ]);
    assert_eq!(stdout(&o), "a b|it's|$HOME||");
    let o = h.run_in_ns(&["vm", "ssh", "ex", "--", "hostname"]);
    assert!(o.status.success(), "{}", stderr(&o));

    // Plain ssh through the generated config, included from a user's ~/.ssh/config by
    // `ssh-config --install` (ssh reads the file given with -F as it would ~/.ssh/config).
    let o = h.ssh_through_user_config("/home/sshuser", &["ex.vm", "sh", "-c", "'exit 5'"]);
    assert_eq!(o.status.code(), Some(5), "{}", stderr(&o));

    if std::env::var_os("BANGER_SSH_BENCH").is_none() {
        eprintln!("note: set BANGER_SSH_BENCH=1 to time vm exec against plain ssh");
        return;
    }
    let (b, s) = h.exec_vs_ssh_ms("ex", ip);
    eprintln!(
        "BENCH vm exec NAME -- true: median of 20 {b:.1} ms; plain ssh, same options: {s:.1} ms; wrapper overhead {:.1} ms",
        b - s
    );
    // The same, with `ssh` on PATH replaced by /bin/true: banger's own cost, without ssh's
    // noise (a loaded 2-core machine moves ssh's time by tens of ms between runs). In the
    // namespace too: banger's sshd probe connects to the VM's address.
    let stub = h.bed.root.join("stub-path");
    std::fs::create_dir_all(&stub).unwrap();
    std::fs::copy("/bin/true", stub.join("ssh")).unwrap();
    // The stub first on PATH, the rest after it (for `ip`).
    let path = std::env::join_paths(std::iter::once(stub.clone()).chain(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    )))
    .unwrap();
    let argv = h.plain_ssh_argv(ip);
    let (mut banger_ms, mut stub_ms) = (Vec::new(), Vec::new());
    for _ in 0..20 {
        banger_ms.push(time_ms(
            h.cmd_in_ns(&["vm", "exec", "ex", "--", "true"])
                .env("PATH", &path),
        ));
        stub_ms.push(time_ms(
            Command::new("ip")
                .args(["netns", "exec", &h.ns.name])
                .arg(stub.join("ssh"))
                .args(&argv[1..]),
        ));
    }
    let (b, s) = (median(banger_ms), median(stub_ms));
    eprintln!(
        "BENCH wrapper alone (ssh stubbed by /bin/true): vm exec {b:.1} ms, the stub alone {s:.1} ms; overhead {:.1} ms",
        b - s
    );
    // Where the overhead goes: the binary starting, and the one RPC it makes.
    let bare = |args: &[&str]| {
        median(
            (0..20)
                .map(|_| time_ms(h.bed.cmd("banger").args(args)))
                .collect(),
        )
    };
    eprintln!(
        "BENCH parts: `banger version` {:.1} ms, `banger vm show ex --json` {:.1} ms (median of 20)",
        bare(&["version"]),
        bare(&["vm", "show", "ex", "--json"])
    );
}

/// `vm run` with `ssh` on PATH replaced by a stub that records its arguments (the stand-in's guest
/// host key has no private half, so no real sshd can present it): `--rm` deletes the VM after
/// the command and passes its exit status on, also when banger gets Ctrl-C meanwhile; without
/// `--rm` the last line says the VM is still running. A real sshd at the VM's next address is
/// what `vm run` waits for.
#[test]
fn vm_run_waits_for_sshd_runs_the_command_and_removes_the_vm() {
    if let Err(why) = sshd::sshd_binary() {
        eprintln!("SKIP: vm_run_waits_for_sshd_runs_the_command_and_removes_the_vm: {why}");
        return;
    }
    let Some(h) = host("vm_run_waits", "ssh-run") else {
        return;
    };
    let l = h.bed.layout();
    // The first VM gets the subnet's first guest address: make it answer on TCP 22.
    let ip = "172.30.0.2";
    assert!(h.ns.ip(&["link", "set", "lo", "up"]).status.success());
    assert!(h
        .ns
        .ip(&["addr", "add", &format!("{ip}/32"), "dev", "lo"])
        .status
        .success());
    let _sshd = sshd::Sshd::start(&h.ns.name, ip, &h.bed.root.join("sshd"), "");
    let stub = h.bed.root.join("stub");
    std::fs::create_dir_all(&stub).unwrap();
    let args_file = h.bed.root.join("ssh-args");
    let write_stub = |body: &str| {
        let p = stub.join("ssh");
        std::fs::write(
            &p,
            format!(
                "#!/bin/sh\nprintf '%s\\n' \"$@\" > '{}'\n{body}\n",
                args_file.display()
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    };
    let path = format!("{}:/usr/sbin:/usr/bin:/sbin:/bin", stub.display());
    let run = |args: &[&str]| -> Output {
        Command::new("ip")
            .args(["netns", "exec", &h.ns.name])
            .arg(h.bed.bin.join("banger"))
            .args(args)
            .env("BANGER_ROOT", &h.bed.root)
            .env("PATH", &path)
            .output()
            .unwrap()
    };
    let vms = || -> usize {
        let v: Value = serde_json::from_str(&h.ok(&["vm", "list", "--json"])).unwrap();
        v.as_array().unwrap().len()
    };

    // --rm -- command: the command's status, the VM gone afterwards.
    write_stub("exit 7");
    let o = run(&[
        "vm", "run", "--rm", "--name", "r1", "--image", "agent", "--", "sh", "-c", "exit 7",
    ]);
    assert_eq!(o.status.code(), Some(7), "{}", stderr(&o));
    assert!(stderr(&o).contains("deleted VM r1"), "{}", stderr(&o));
    assert_eq!(vms(), 0);
    let args = std::fs::read_to_string(&args_file).unwrap();
    let args: Vec<&str> = args.lines().collect();
    assert_eq!(
        args[args.len() - 3..],
        [format!("root@{ip}").as_str(), "--", "sh -c 'exit 7'"]
    );
    assert!(args.contains(&"StrictHostKeyChecking=yes"), "{args:?}");
    // Its pin went with it.
    assert_eq!(
        std::fs::read_to_string(l.ssh_known_hosts()).unwrap_or_default(),
        ""
    );

    // Ctrl-C (SIGINT to banger) while the command runs: still deleted, still the status.
    write_stub("kill -INT $PPID; sleep 0.2; exit 130");
    let o = run(&[
        "vm", "run", "--rm", "--name", "r2", "--image", "agent", "--", "sleep", "100",
    ]);
    assert_eq!(o.status.code(), Some(130), "{}", stderr(&o));
    assert!(stderr(&o).contains("deleted VM r2"), "{}", stderr(&o));
    assert_eq!(vms(), 0);

    // Without --rm: a shell (no command words), then the VM stays and the last line says so.
    write_stub("exit 0");
    let o = run(&["vm", "run", "--name", "r3", "--image", "agent"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let last = stderr(&o).lines().last().unwrap_or_default().to_string();
    assert!(
        last.contains("VM r3 is still running") && last.contains("banger vm delete r3"),
        "{last}"
    );
    assert_eq!(h.show("r3")["state"], "running");
    let args = std::fs::read_to_string(&args_file).unwrap();
    assert_eq!(args.lines().last(), Some(format!("root@{ip}").as_str()));
    h.ok(&["vm", "delete", "r3"]);
}
