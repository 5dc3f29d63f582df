//! Listening TCP sockets of the guest, read from `/proc/net/tcp` and `/proc/net/tcp6`.
//!
//! Owns the parser of those tables (rows in state `0A`, LISTEN; addresses as the kernel prints
//! them: each 32-bit word in host byte order) and the cheap lookup of the owning process through
//! `/proc/<pid>/fd` socket links. It only reads under the proc directory it is given.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

use serde::Serialize;

/// The kernel's TCP state number for LISTEN.
const TCP_LISTEN: &str = "0A";

/// One listening TCP socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Listener {
    /// The local address it listens on (`0.0.0.0` / `::` for any).
    pub address: IpAddr,
    /// The local port.
    pub port: u16,
    /// The socket's inode (what `/proc/<pid>/fd` links name).
    #[serde(skip)]
    pub inode: u64,
    /// The owning process's `comm`, when one was found.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub process: Option<String>,
}

/// Parses one row of `/proc/net/tcp{,6}`: `Ok(None)` for the header and non-LISTEN rows,
/// `Err` for a row that is not in the kernel's format.
pub fn parse_row(line: &str) -> Result<Option<Listener>, String> {
    let f: Vec<&str> = line.split_ascii_whitespace().collect();
    if f.is_empty() || f[0] == "sl" {
        return Ok(None);
    }
    if f.len() < 10 || !f[0].ends_with(':') {
        return Err(format!("not a /proc/net/tcp row: {:?}", clip(line)));
    }
    if f[3].len() != 2 || !f[3].bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("bad state {:?} in row {:?}", f[3], clip(line)));
    }
    if !f[3].eq_ignore_ascii_case(TCP_LISTEN) {
        return Ok(None);
    }
    let (addr, port) = f[1]
        .split_once(':')
        .ok_or_else(|| format!("bad local address {:?}", clip(f[1])))?;
    let port = u16::from_str_radix(port, 16)
        .ok()
        .filter(|_| port.len() == 4)
        .ok_or_else(|| format!("bad port {:?} in row {:?}", clip(port), clip(line)))?;
    let address = parse_addr(addr)
        .ok_or_else(|| format!("bad address {:?} in row {:?}", clip(addr), clip(line)))?;
    let inode = f[9]
        .parse()
        .map_err(|_| format!("bad inode {:?} in row {:?}", clip(f[9]), clip(line)))?;
    Ok(Some(Listener {
        address,
        port,
        inode,
        process: None,
    }))
}

/// The kernel prints an address as 32-bit words with `%08X`, each word in host byte order.
fn parse_addr(hex: &str) -> Option<IpAddr> {
    if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let word = |i: usize| u32::from_str_radix(&hex[i * 8..i * 8 + 8], 16).ok();
    match hex.len() {
        8 => Some(IpAddr::V4(Ipv4Addr::from(word(0)?.to_ne_bytes()))),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b[i * 4..i * 4 + 4].copy_from_slice(&word(i)?.to_ne_bytes());
            }
            Some(IpAddr::V6(Ipv6Addr::from(b)))
        }
        _ => None,
    }
}

fn clip(s: &str) -> String {
    s.chars().take(120).collect()
}

/// Parses a whole table: the listeners, and one problem line per malformed row (skipped).
pub fn parse_table(text: &str) -> (Vec<Listener>, Vec<String>) {
    let mut out = Vec::new();
    let mut problems = Vec::new();
    for line in text.lines() {
        match parse_row(line) {
            Ok(Some(l)) => out.push(l),
            Ok(None) => {}
            Err(e) => problems.push(e),
        }
    }
    (out, problems)
}

/// What `ports` answers: listeners sorted by port then address, and skipped-row problems.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Ports {
    /// Listening sockets.
    pub ports: Vec<Listener>,
    /// Rows that could not be parsed, and tables that could not be read (empty when all is well).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<String>,
}

/// Reads `<proc>/net/tcp` and `<proc>/net/tcp6` (a missing table, e.g. a kernel without IPv6,
/// counts as empty) and names each socket's process from `<proc>/<pid>/fd`.
pub fn listening(proc: &Path) -> Ports {
    let mut all = Ports::default();
    for table in ["tcp", "tcp6"] {
        let p = proc.join("net").join(table);
        match std::fs::read_to_string(&p) {
            Ok(text) => {
                let (l, problems) = parse_table(&text);
                all.ports.extend(l);
                all.problems.extend(
                    problems
                        .into_iter()
                        .map(|e| format!("{}: {e}", p.display())),
                );
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => all.problems.push(format!("reading {}: {e}", p.display())),
        }
    }
    let wanted: HashSet<u64> = all
        .ports
        .iter()
        .map(|l| l.inode)
        .filter(|&i| i != 0)
        .collect();
    let owners = socket_owners(proc, &wanted);
    for l in &mut all.ports {
        l.process = owners.get(&l.inode).cloned();
    }
    all.ports.sort_by_key(|l| (l.port, l.address));
    all
}

/// Maps socket inodes in `wanted` to the `comm` of a process holding them, scanning
/// `<proc>/<pid>/fd`; processes that vanish or cannot be read are skipped.
fn socket_owners(proc: &Path, wanted: &HashSet<u64>) -> HashMap<u64, String> {
    let mut found = HashMap::new();
    if wanted.is_empty() {
        return found;
    }
    let Ok(procs) = std::fs::read_dir(proc) else {
        return found;
    };
    for p in procs.flatten() {
        let name = p.file_name();
        if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(p.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(target) = std::fs::read_link(fd.path()) else {
                continue;
            };
            let Some(inode) = target
                .to_str()
                .and_then(|t| t.strip_prefix("socket:["))
                .and_then(|t| t.strip_suffix(']'))
                .and_then(|t| t.parse::<u64>().ok())
            else {
                continue;
            };
            if wanted.contains(&inode) && !found.contains_key(&inode) {
                if let Ok(comm) = std::fs::read_to_string(p.path().join("comm")) {
                    found.insert(inode, comm.trim_end().to_string());
                }
            }
        }
        if found.len() == wanted.len() {
            break;
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER4: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode";
    const HEADER6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode";

    fn l(addr: &str, port: u16, inode: u64) -> Option<Listener> {
        Some(Listener {
            address: addr.parse().unwrap(),
            port,
            inode,
            process: None,
        })
    }

    #[test]
    fn row_table() {
        let ok: &[(&str, Option<Listener>)] = &[
            (HEADER4, None),
            (HEADER6, None),
            ("", None),
            // sshd on any IPv4 address, port 22.
            ("   0: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 15673 1 0000000000000000 100 0 0 10 0", l("0.0.0.0", 22, 15673)),
            // 127.0.0.1:8080.
            ("   1: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 20001 1 00000000e344a785 100 0 0 10 0", l("127.0.0.1", 8080, 20001)),
            // 172.30.0.2:5432 (a guest address).
            ("   2: 02001EAC:1538 00000000:0000 0A 00000000:00000000 00:00000000 00000000   105        0 3141 1 00000000e344a785 100 0 0 10 0", l("172.30.0.2", 5432, 3141)),
            // Established and TIME_WAIT rows are not listeners.
            ("   3: 020200C0:D226 507100CB:0050 01 00000000:00000000 00:00000000 00000000     0        0 777 3 000000008f5b4ff6 20 4 30 10 -1", None),
            ("   4: 020200C0:D228 507100CB:0050 06 00000000:00000000 03:000015C7 00000000     0        0 0 3 00000000e742523a", None),
            // IPv6 any, port 22.
            ("   0: 00000000000000000000000000000000:0016 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 15675 1 0000000000000000 100 0 0 10 0", l("::", 22, 15675)),
            // ::1 port 631.
            ("   1: 00000000000000000000000001000000:0277 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1811 1 0000000000000000 100 0 0 10 0", l("::1", 631, 1811)),
            // IPv4-mapped ::ffff:127.0.0.1 port 3000.
            ("   2: 0000000000000000FFFF00000100007F:0BB8 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 4242 1 0000000000000000 100 0 0 10 0", l("::ffff:127.0.0.1", 3000, 4242)),
            // fe80::1 (link-local) port 80, lower-case hex.
            ("   3: 000080fe000000000000000001000000:0050 00000000000000000000000000000000:0000 0a 00000000:00000000 00:00000000 00000000     0        0 99 1 0000000000000000 100 0 0 10 0", l("fe80::1", 80, 99)),
        ];
        for (line, want) in ok {
            assert_eq!(parse_row(line).as_ref(), Ok(want), "{line:?}");
        }
        let bad: &[(&str, &str)] = &[
            ("garbage", "not a /proc/net/tcp row"),
            ("   0: 00000000:0016 00000000:0000", "not a /proc/net/tcp row"),
            ("   0: 0000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 1 1", "bad address"),
            ("   0: 0000000G:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 1 1", "bad address"),
            ("   0: 00000000-0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 1 1", "bad local address"),
            ("   0: 00000000:16 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 1 1", "bad port"),
            ("   0: 00000000:FFFFF 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 1 1", "bad port"),
            ("   0: 00000000:0016 00000000:0000 XY 00000000:00000000 00:00000000 00000000 0 0 1 1", "bad state"),
            ("   0: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 x 1", "bad inode"),
            ("   0 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 1 1", "not a /proc/net/tcp row"),
        ];
        for (line, want) in bad {
            let e = parse_row(line).unwrap_err();
            assert!(e.contains(want), "{line:?}: {e}");
        }
    }

    #[test]
    fn table_keeps_good_rows_and_reports_bad_ones() {
        let text = format!(
            "{HEADER4}\n   0: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0\nnonsense row\n   1: 020200C0:D226 507100CB:0050 01 00000000:00000000 00:00000000 00000000     0        0 2 3 0 20 4 30 10 -1\n"
        );
        let (ls, problems) = parse_table(&text);
        assert_eq!(ls, vec![l("0.0.0.0", 22, 1).unwrap()]);
        assert_eq!(problems.len(), 1, "{problems:?}");
    }

    /// A fake proc tree: tables, and one process holding one of the sockets.
    #[test]
    fn listening_reads_both_tables_and_names_owners() {
        let root = std::env::temp_dir().join(format!("banger-ports-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("net")).unwrap();
        std::fs::create_dir_all(root.join("4242/fd")).unwrap();
        std::fs::create_dir_all(root.join("self")).unwrap();
        std::fs::write(root.join("4242/comm"), "sshd\n").unwrap();
        std::os::unix::fs::symlink("socket:[15675]", root.join("4242/fd/3")).unwrap();
        std::os::unix::fs::symlink("/dev/null", root.join("4242/fd/0")).unwrap();
        std::fs::write(
            root.join("net/tcp"),
            format!("{HEADER4}\n   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 20001 1 0 100 0 0 10 0\n"),
        )
        .unwrap();
        // No tcp6 yet: a kernel without IPv6.
        let p = listening(&root);
        assert_eq!(p.ports, vec![l("127.0.0.1", 8080, 20001).unwrap()]);
        assert!(p.problems.is_empty(), "{:?}", p.problems);
        std::fs::write(
            root.join("net/tcp6"),
            format!("{HEADER6}\n   0: 00000000000000000000000000000000:0016 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 15675 1 0 100 0 0 10 0\nbroken\n"),
        )
        .unwrap();
        let p = listening(&root);
        let mut ssh = l("::", 22, 15675).unwrap();
        ssh.process = Some("sshd".into());
        assert_eq!(p.ports, vec![ssh, l("127.0.0.1", 8080, 20001).unwrap()]);
        assert_eq!(p.problems.len(), 1);
        assert!(p.problems[0].contains("tcp6"), "{:?}", p.problems);
        let v = serde_json::to_value(&p).unwrap();
        assert_eq!(
            v["ports"][0],
            serde_json::json!({"address": "::", "port": 22, "process": "sshd"})
        );
        assert_eq!(
            v["ports"][1],
            serde_json::json!({"address": "127.0.0.1", "port": 8080})
        );
        std::fs::remove_dir_all(&root).unwrap();
    }
}
