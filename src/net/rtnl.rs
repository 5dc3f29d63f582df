//! A minimal rtnetlink client for the helper's hot path: read one link, create a bridge, add an
//! IPv4 address, set up/master/alias/port isolation, delete a link — in-process, in the calling
//! thread's network namespace, with no `ip` spawn (each spawn costs milliseconds on a busy host).
//!
//! It speaks only the messages listed here, always as complete requests with an ack; it never
//! dumps or changes anything it was not asked to by name or index.

use crate::error::{Error, Result};
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const NETLINK_ROUTE: i32 = 0;
pub(super) const NLM_F_REQUEST: u16 = 0x1;
pub(super) const NLM_F_ACK: u16 = 0x4;
const NLM_F_EXCL: u16 = 0x200;
pub(super) const NLM_F_CREATE: u16 = 0x400;
const NLM_F_DUMP: u16 = 0x300;
pub(super) const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLA_F_NESTED: u16 = 0x8000;
const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const RTM_GETLINK: u16 = 18;
const RTM_NEWADDR: u16 = 20;
const RTM_GETADDR: u16 = 22;
const RTM_NEWNEIGH: u16 = 28;
const NLM_F_REPLACE: u16 = 0x100;
const AF_BRIDGE: u8 = 7;
const NDA_LLADDR: u16 = 2;
const NUD_NOARP: u16 = 0x40;
const NTF_MASTER: u8 = 0x04;
const NTF_STICKY: u8 = 0x40;
const IFLA_IFNAME: u16 = 3;
const IFLA_MASTER: u16 = 10;
const IFLA_LINKINFO: u16 = 18;
const IFLA_IFALIAS: u16 = 20;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_INFO_DATA: u16 = 2;
const IFLA_INFO_SLAVE_KIND: u16 = 4;
const IFLA_INFO_SLAVE_DATA: u16 = 5;
const IFLA_TUN_OWNER: u16 = 1;
const IFLA_TUN_TYPE: u16 = 3;
const IFLA_TUN_PERSIST: u16 = 6;
const IFLA_BRPORT_ISOLATED: u16 = 33;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const IFF_UP: u32 = 1;
const AF_INET: u8 = 2;
const TUN_TYPE_TAP: u8 = 2;

/// One link as rtnetlink reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NlLink {
    /// Interface index.
    pub index: u32,
    /// Name.
    pub name: String,
    /// Administratively up.
    pub up: bool,
    /// `IFLA_INFO_KIND` (`bridge`, `tun`, …).
    pub kind: Option<String>,
    /// A tun device in tap mode.
    pub is_tap: bool,
    /// A tun device's owner uid (`None`: no owner set).
    pub tun_owner: Option<u32>,
    /// A persistent tun device.
    pub persist: bool,
    /// Index of the master (bridge).
    pub master: Option<u32>,
    /// Bridge port isolation.
    pub isolated: Option<bool>,
    /// Interface alias.
    pub alias: Option<String>,
}

/// A netlink message being built (header first, length filled in by [`Msg::done`]); shared with
/// [`super::nfnl`].
pub(super) struct Msg(pub(super) Vec<u8>);

impl Msg {
    pub(super) fn new(kind: u16, flags: u16) -> Msg {
        let mut v = vec![0u8; 16];
        v[4..6].copy_from_slice(&kind.to_ne_bytes());
        v[6..8].copy_from_slice(&flags.to_ne_bytes());
        v[8..12].copy_from_slice(&1u32.to_ne_bytes());
        Msg(v)
    }
    fn ifinfo(mut self, index: u32, flags: u32, change: u32) -> Msg {
        let mut h = [0u8; 16];
        h[4..8].copy_from_slice(&(index as i32).to_ne_bytes());
        h[8..12].copy_from_slice(&flags.to_ne_bytes());
        h[12..16].copy_from_slice(&change.to_ne_bytes());
        self.0.extend_from_slice(&h);
        self
    }
    fn pad(&mut self) {
        while !self.0.len().is_multiple_of(4) {
            self.0.push(0);
        }
    }
    pub(super) fn attr(mut self, kind: u16, data: &[u8]) -> Msg {
        let len = (4 + data.len()) as u16;
        self.0.extend_from_slice(&len.to_ne_bytes());
        self.0.extend_from_slice(&kind.to_ne_bytes());
        self.0.extend_from_slice(data);
        self.pad();
        self
    }
    pub(super) fn str_attr(self, kind: u16, s: &str) -> Msg {
        let mut d = s.as_bytes().to_vec();
        d.push(0);
        self.attr(kind, &d)
    }
    pub(super) fn nest(mut self, kind: u16, inner: impl FnOnce(Msg) -> Msg) -> Msg {
        let start = self.0.len();
        self.0.extend_from_slice(&[0, 0]);
        self.0
            .extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
        self = inner(self);
        let len = (self.0.len() - start) as u16;
        self.0[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        self
    }
    pub(super) fn done(mut self) -> Vec<u8> {
        let len = self.0.len() as u32;
        self.0[0..4].copy_from_slice(&len.to_ne_bytes());
        self.0
    }
}

pub(super) fn attrs(mut b: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = vec![];
    while b.len() >= 4 {
        let len = u16::from_ne_bytes([b[0], b[1]]) as usize;
        let kind = u16::from_ne_bytes([b[2], b[3]]) & !NLA_F_NESTED & 0x3fff;
        if len < 4 || len > b.len() {
            break;
        }
        out.push((kind, &b[4..len]));
        let next = (len + 3) & !3;
        b = if next >= b.len() { &[] } else { &b[next..] };
    }
    out
}

fn cstr(b: &[u8]) -> String {
    String::from_utf8_lossy(b.split(|c| *c == 0).next().unwrap_or(&[])).into_owned()
}

fn u32_of(b: &[u8]) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(..4)?.try_into().ok()?))
}

fn parse_link(payload: &[u8]) -> Option<NlLink> {
    let hdr = payload.get(..16)?;
    let mut l = NlLink {
        index: u32::from_ne_bytes(hdr[4..8].try_into().ok()?),
        up: u32::from_ne_bytes(hdr[8..12].try_into().ok()?) & IFF_UP != 0,
        ..NlLink::default()
    };
    for (k, v) in attrs(&payload[16..]) {
        match k {
            IFLA_IFNAME => l.name = cstr(v),
            IFLA_MASTER => l.master = u32_of(v),
            IFLA_IFALIAS => l.alias = Some(cstr(v)).filter(|s| !s.is_empty()),
            IFLA_LINKINFO => {
                for (ik, iv) in attrs(v) {
                    match ik {
                        IFLA_INFO_KIND => l.kind = Some(cstr(iv)),
                        IFLA_INFO_DATA => {
                            for (dk, dv) in attrs(iv) {
                                match dk {
                                    IFLA_TUN_OWNER => {
                                        // The kernel reports owner -1 as "none".
                                        l.tun_owner = u32_of(dv).filter(|u| *u != u32::MAX)
                                    }
                                    IFLA_TUN_TYPE => l.is_tap = dv.first() == Some(&TUN_TYPE_TAP),
                                    IFLA_TUN_PERSIST => l.persist = dv.first() == Some(&1),
                                    _ => {}
                                }
                            }
                        }
                        IFLA_INFO_SLAVE_DATA => {
                            for (sk, sv) in attrs(iv) {
                                if sk == IFLA_BRPORT_ISOLATED {
                                    l.isolated = Some(sv.first() == Some(&1));
                                }
                            }
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Some(l)
}

/// A netlink socket of `protocol` in the calling thread's network namespace (shared with
/// [`super::nfnl`]).
pub(super) fn socket(protocol: i32, name: &str) -> Result<OwnedFd> {
    // SAFETY: plain socket(2); the result is checked before it is wrapped.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            protocol,
        )
    };
    if fd < 0 {
        return Err(os_err(format!("opening an {name} socket")));
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sends `msg` (whole netlink messages) to the kernel on `fd`.
pub(super) fn send(fd: &OwnedFd, msg: &[u8], what: impl Fn() -> String) -> Result<()> {
    // SAFETY: sends `msg.len()` bytes from a live buffer to the kernel (zeroed sockaddr_nl).
    let sent = unsafe {
        let mut sa: libc::sockaddr_nl = std::mem::zeroed();
        sa.nl_family = libc::AF_NETLINK as u16;
        libc::sendto(
            fd.as_raw_fd(),
            msg.as_ptr().cast(),
            msg.len(),
            0,
            (&sa as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if sent < 0 {
        return Err(os_err(what()));
    }
    Ok(())
}

/// An rtnetlink socket of the calling thread's network namespace.
pub struct Rtnl {
    fd: OwnedFd,
    seq: u32,
}

pub(super) fn os_err(what: impl Into<String>) -> Error {
    Error::new(what, std::io::Error::last_os_error())
}

impl Rtnl {
    /// Opens the socket.
    pub fn open() -> Result<Rtnl> {
        Ok(Rtnl {
            fd: socket(NETLINK_ROUTE, "rtnetlink")?,
            seq: 0,
        })
    }

    /// Sends one request and collects the answer's payloads (of `want` type) until the ack/done.
    fn talk(&mut self, what: &str, mut msg: Vec<u8>, want: u16) -> Result<Vec<Vec<u8>>> {
        self.seq += 1;
        msg[8..12].copy_from_slice(&self.seq.to_ne_bytes());
        send(&self.fd, &msg, || format!("{what}: sending to rtnetlink"))?;
        let mut out = vec![];
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            // SAFETY: receives into a live buffer of buf.len() bytes.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(os_err(format!("{what}: reading from rtnetlink")));
            }
            let mut b = &buf[..n as usize];
            while b.len() >= 16 {
                let len = u32::from_ne_bytes(b[0..4].try_into().unwrap_or([0; 4])) as usize;
                let kind = u16::from_ne_bytes([b[4], b[5]]);
                let seq = u32::from_ne_bytes(b[8..12].try_into().unwrap_or([0; 4]));
                if len < 16 || len > b.len() {
                    return Err(Error::new(what.to_string(), "malformed rtnetlink answer"));
                }
                let payload = &b[16..len];
                if seq == self.seq {
                    match kind {
                        NLMSG_ERROR => {
                            let code = payload
                                .get(..4)
                                .map(|c| i32::from_ne_bytes(c.try_into().unwrap_or([0; 4])))
                                .unwrap_or(-libc::EIO);
                            if code == 0 {
                                return Ok(out);
                            }
                            return Err(Error::new(
                                what.to_string(),
                                std::io::Error::from_raw_os_error(-code),
                            ));
                        }
                        NLMSG_DONE => return Ok(out),
                        k if k == want => out.push(payload.to_vec()),
                        _ => {}
                    }
                }
                let next = (len + 3) & !3;
                b = if next >= b.len() { &[] } else { &b[next..] };
            }
        }
    }

    /// The link `name`, or `None` when it does not exist.
    pub fn link(&mut self, name: &str) -> Result<Option<NlLink>> {
        let m = Msg::new(RTM_GETLINK, NLM_F_REQUEST | NLM_F_ACK)
            .ifinfo(0, 0, 0)
            .str_attr(IFLA_IFNAME, name)
            .done();
        match self.talk(&format!("reading interface {name}"), m, RTM_NEWLINK) {
            Ok(v) => Ok(v.first().and_then(|p| parse_link(p))),
            Err(e) if e.why.contains("No such device") => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Every link (one dump).
    pub fn links(&mut self) -> Result<Vec<NlLink>> {
        let m = Msg::new(RTM_GETLINK, NLM_F_REQUEST | NLM_F_DUMP)
            .ifinfo(0, 0, 0)
            .done();
        let answers = self.talk("listing interfaces", m, RTM_NEWLINK)?;
        Ok(answers.iter().filter_map(|p| parse_link(p)).collect())
    }

    /// Creates the bridge `name` (down, no address).
    pub fn add_bridge(&mut self, name: &str) -> Result<()> {
        let m = Msg::new(
            RTM_NEWLINK,
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        )
        .ifinfo(0, 0, 0)
        .str_attr(IFLA_IFNAME, name)
        .nest(IFLA_LINKINFO, |m| m.str_attr(IFLA_INFO_KIND, "bridge"))
        .done();
        self.talk(&format!("creating bridge {name}"), m, 0)
            .map(|_| ())
    }

    /// The IPv4 addresses (with prefix) of interface `index`.
    pub fn ipv4_addrs(&mut self, index: u32) -> Result<Vec<(Ipv4Addr, u8)>> {
        let m = Msg::new(RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP);
        let mut m = m;
        m.0.extend_from_slice(&[AF_INET, 0, 0, 0, 0, 0, 0, 0]);
        let answers = self.talk("reading IPv4 addresses", m.done(), RTM_NEWADDR)?;
        let mut out = vec![];
        for p in answers {
            if p.len() < 8 || u32_of(&p[4..8]) != Some(index) {
                continue;
            }
            let prefix = p[1];
            for (k, v) in attrs(&p[8..]) {
                if k == IFA_LOCAL && v.len() == 4 {
                    out.push((Ipv4Addr::new(v[0], v[1], v[2], v[3]), prefix));
                }
            }
        }
        Ok(out)
    }

    /// Adds `ip/prefix` to interface `index`; an address already there is fine.
    pub fn add_ipv4(&mut self, index: u32, ip: Ipv4Addr, prefix: u8) -> Result<()> {
        let mut m = Msg::new(
            RTM_NEWADDR,
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        );
        m.0.extend_from_slice(&[AF_INET, prefix, 0, 0]);
        m.0.extend_from_slice(&index.to_ne_bytes());
        let m = m
            .attr(IFA_LOCAL, &ip.octets())
            .attr(IFA_ADDRESS, &ip.octets());
        match self.talk(
            &format!("adding {ip}/{prefix} to interface {index}"),
            m.done(),
            0,
        ) {
            Err(e) if e.why.contains("exists") => Ok(()),
            r => r.map(|_| ()),
        }
    }

    /// Brings interface `index` up.
    pub fn set_up(&mut self, index: u32) -> Result<()> {
        let m = Msg::new(RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK)
            .ifinfo(index, IFF_UP, IFF_UP)
            .done();
        self.talk(&format!("bringing interface {index} up"), m, 0)
            .map(|_| ())
    }

    /// Enslaves interface `index` to bridge `master` and sets its alias.
    pub fn set_master_alias(&mut self, index: u32, master: u32, alias: &str) -> Result<()> {
        let m = Msg::new(RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK)
            .ifinfo(index, 0, 0)
            .attr(IFLA_MASTER, &master.to_ne_bytes())
            .str_attr(IFLA_IFALIAS, alias)
            .done();
        self.talk(
            &format!("attaching interface {index} to bridge {master}"),
            m,
            0,
        )
        .map(|_| ())
    }

    /// Turns bridge port isolation on for port `index` and brings it up, in one request (the
    /// kernel applies the port setting before the up).
    pub fn isolate_and_up(&mut self, index: u32) -> Result<()> {
        let m = Msg::new(RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK)
            .ifinfo(index, IFF_UP, IFF_UP)
            .nest(IFLA_LINKINFO, |m| {
                m.str_attr(IFLA_INFO_SLAVE_KIND, "bridge")
                    .nest(IFLA_INFO_SLAVE_DATA, |m| m.attr(IFLA_BRPORT_ISOLATED, &[1]))
            })
            .done();
        self.talk(
            &format!("isolating bridge port {index} and bringing it up"),
            m,
            0,
        )
        .map(|_| ())
    }

    /// Pins `mac` to bridge port `index`: a static, sticky forwarding entry (`bridge fdb replace
    /// MAC dev PORT master static sticky`), which frames with that source address arriving on
    /// another port never move. Replaces an entry for `mac` that is there.
    pub fn pin_fdb(&mut self, index: u32, mac: [u8; 6]) -> Result<()> {
        let mut m = Msg::new(
            RTM_NEWNEIGH,
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
        );
        // struct ndmsg: family, pad, pad, ifindex, state, flags, type.
        let mut nd = [0u8; 12];
        nd[0] = AF_BRIDGE;
        nd[4..8].copy_from_slice(&(index as i32).to_ne_bytes());
        nd[8..10].copy_from_slice(&NUD_NOARP.to_ne_bytes());
        nd[10] = NTF_MASTER | NTF_STICKY;
        m.0.extend_from_slice(&nd);
        let m = m.attr(NDA_LLADDR, &mac).done();
        let shown: Vec<String> = mac.iter().map(|b| format!("{b:02x}")).collect();
        self.talk(
            &format!("pinning MAC {} to bridge port {index}", shown.join(":")),
            m,
            0,
        )
        .map(|_| ())
    }

    /// Deletes interface `name`; one already gone is fine.
    pub fn delete(&mut self, name: &str) -> Result<()> {
        let m = Msg::new(RTM_DELLINK, NLM_F_REQUEST | NLM_F_ACK)
            .ifinfo(0, 0, 0)
            .str_attr(IFLA_IFNAME, name)
            .done();
        match self.talk(&format!("removing interface {name}"), m, 0) {
            Err(e) if e.why.contains("No such device") => Ok(()),
            r => r.map(|_| ()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_well_formed() {
        let m = Msg::new(RTM_NEWLINK, NLM_F_REQUEST)
            .ifinfo(7, IFF_UP, IFF_UP)
            .str_attr(IFLA_IFNAME, "abc")
            .nest(IFLA_LINKINFO, |m| m.str_attr(IFLA_INFO_KIND, "bridge"))
            .done();
        assert_eq!(
            u32::from_ne_bytes(m[0..4].try_into().unwrap()) as usize,
            m.len()
        );
        assert!(m.len().is_multiple_of(4));
        let payload = &m[16..];
        let l = parse_link(payload).unwrap();
        assert_eq!(l.index, 7);
        assert!(l.up);
        assert_eq!(l.name, "abc");
        assert_eq!(l.kind.as_deref(), Some("bridge"));
    }

    #[test]
    fn parses_tap_attributes() {
        let m = Msg::new(RTM_NEWLINK, 0)
            .ifinfo(3, 0, 0)
            .str_attr(IFLA_IFNAME, "bgr-x")
            .attr(IFLA_MASTER, &9u32.to_ne_bytes())
            .str_attr(IFLA_IFALIAS, "banger:x")
            .nest(IFLA_LINKINFO, |m| {
                m.str_attr(IFLA_INFO_KIND, "tun")
                    .nest(IFLA_INFO_DATA, |m| {
                        m.attr(IFLA_TUN_OWNER, &4242u32.to_ne_bytes())
                            .attr(IFLA_TUN_TYPE, &[TUN_TYPE_TAP])
                            .attr(IFLA_TUN_PERSIST, &[1])
                    })
                    .nest(IFLA_INFO_SLAVE_DATA, |m| m.attr(IFLA_BRPORT_ISOLATED, &[1]))
            })
            .done();
        let l = parse_link(&m[16..]).unwrap();
        assert_eq!(
            l,
            NlLink {
                index: 3,
                name: "bgr-x".into(),
                up: false,
                kind: Some("tun".into()),
                is_tap: true,
                tun_owner: Some(4242),
                persist: true,
                master: Some(9),
                isolated: Some(true),
                alias: Some("banger:x".into()),
            }
        );
        // Owner -1 means none.
        let m = Msg::new(RTM_NEWLINK, 0)
            .ifinfo(3, 0, 0)
            .nest(IFLA_LINKINFO, |m| {
                m.nest(IFLA_INFO_DATA, |m| {
                    m.attr(IFLA_TUN_OWNER, &u32::MAX.to_ne_bytes())
                })
            })
            .done();
        assert_eq!(parse_link(&m[16..]).unwrap().tun_owner, None);
        assert!(parse_link(&[0u8; 3]).is_none());
    }
}
