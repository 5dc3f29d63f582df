//! The NAT set's elements over nf_tables netlink: make an address's element of
//! `inet banger nat_guests` exactly present (with the VM id as its comment) or absent — what
//! `nft -f -` did with `add element` / `delete element` lines, in-process, without the nft binary's
//! start-up and cache dump, and without a change when the element is already as wanted.
//!
//! Measured here: reading one element or the set is ~0.05 ms and adding one ~0.1 ms, but a
//! transaction that deletes an element waits for the kernel's RCU grace period (8–24 ms). Every VM
//! start needs its address's element absent (no NAT) or present; almost always it already is, so
//! [`set_exactly`] reads first and deletes only what is really there — read from the kernel each
//! time (never cached: an element planted behind the helper's back is found and removed).
//!
//! It speaks only `NFT_MSG_GETSETELEM` / `NFT_MSG_GETSET` (reads of that one set) and
//! `NFT_MSG_NEWSETELEM` / `NFT_MSG_DELSETELEM` on it inside a `NFNL_MSG_BATCH_BEGIN`/`END` pair
//! (one nf_tables transaction: all or nothing), every message acknowledged. The table, chains and
//! rules stay with [`super::nft`] (rare, off the hot path), as does reading the whole table back.

use super::nft::{NAT_SET, TABLE};
use super::rtnl::{
    attrs, os_err, send, socket, Msg, NLMSG_ERROR, NLM_F_ACK, NLM_F_CREATE, NLM_F_REQUEST,
};
use crate::error::{Error, Result};
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};

const NETLINK_NETFILTER: i32 = 12;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFT_MSG_GETSET: u16 = 10;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_GETSETELEM: u16 = 13;
const NFT_MSG_DELSETELEM: u16 = 14;
const NFPROTO_INET: u8 = 1;
const NFTA_SET_TABLE: u16 = 1;
const NFTA_SET_NAME: u16 = 2;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_USERDATA: u16 = 6;
const NFTA_DATA_VALUE: u16 = 1;
/// libnftnl's user-data tag for an element's comment (what `nft` writes and lists).
const NFTNL_UDATA_SET_ELEM_COMMENT: u8 = 0;

/// One change to the NAT set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change<'a> {
    /// `add element … { ip comment "id" }` (an element already there is kept as it is).
    Add(Ipv4Addr, &'a str),
    /// `delete element … { ip }` (fails when it is not there).
    Delete(Ipv4Addr),
}

/// The changes that make `ip`'s element exactly `nat` (for VM `id`), whatever was there: `add`
/// then `delete` always succeeds while the set exists (and fails when it does not), then `add`
/// again for NAT.
pub fn exactly(ip: Ipv4Addr, id: &str, nat: bool) -> Vec<Change<'_>> {
    let mut v = vec![Change::Add(ip, id), Change::Delete(ip)];
    if nat {
        v.push(Change::Add(ip, id));
    }
    v
}

/// Header of an nfnetlink message: `nlmsghdr` then `nfgenmsg` (family, version 0, resource id in
/// network byte order).
fn nfmsg(kind: u16, flags: u16, family: u8, res_id: u16) -> Msg {
    let mut m = Msg::new(kind, flags);
    m.0.extend_from_slice(&[family, 0]);
    m.0.extend_from_slice(&res_id.to_be_bytes());
    m
}

/// The comment as libnftnl stores it: one TLV, NUL-terminated (longer ones are cut to fit a u8).
fn comment_udata(comment: &str) -> Vec<u8> {
    let text = &comment.as_bytes()[..comment.len().min(254)];
    let mut v = vec![NFTNL_UDATA_SET_ELEM_COMMENT, (text.len() + 1) as u8];
    v.extend_from_slice(text);
    v.push(0);
    v
}

/// An acknowledged nf_tables request of `kind` (an `NFT_MSG_*`) for the inet family.
fn request(kind: u16, flags: u16) -> Msg {
    nfmsg(
        (NFNL_SUBSYS_NFTABLES << 8) | kind,
        NLM_F_REQUEST | NLM_F_ACK | flags,
        NFPROTO_INET,
        0,
    )
}

/// A set-element message of `kind` naming `ip`'s element of the NAT set (with `comment`).
fn element_msg(kind: u16, flags: u16, ip: Ipv4Addr, comment: Option<&str>) -> Vec<u8> {
    request(kind, flags)
        .str_attr(NFTA_SET_ELEM_LIST_TABLE, TABLE)
        .str_attr(NFTA_SET_ELEM_LIST_SET, NAT_SET)
        .nest(NFTA_SET_ELEM_LIST_ELEMENTS, |m| {
            m.nest(NFTA_LIST_ELEM, |m| {
                let m = m.nest(NFTA_SET_ELEM_KEY, |m| m.attr(NFTA_DATA_VALUE, &ip.octets()));
                match comment {
                    Some(id) => m.attr(NFTA_SET_ELEM_USERDATA, &comment_udata(id)),
                    None => m,
                }
            })
        })
        .done()
}

fn change_msg(c: &Change<'_>, seq: u32) -> Vec<u8> {
    let mut m = match c {
        Change::Add(ip, id) => element_msg(NFT_MSG_NEWSETELEM, NLM_F_CREATE, *ip, Some(id)),
        Change::Delete(ip) => element_msg(NFT_MSG_DELSETELEM, 0, *ip, None),
    };
    m[8..12].copy_from_slice(&seq.to_ne_bytes());
    m
}

/// The whole batch: begin, one message per change (sequence numbers `seq`…), end.
fn batch(changes: &[Change<'_>], seq: u32) -> Vec<u8> {
    let mut out = nfmsg(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, 0, NFNL_SUBSYS_NFTABLES).done();
    for (i, c) in changes.iter().enumerate() {
        out.extend_from_slice(&change_msg(c, seq + i as u32));
    }
    out.extend_from_slice(
        &nfmsg(NFNL_MSG_BATCH_END, NLM_F_REQUEST, 0, NFNL_SUBSYS_NFTABLES).done(),
    );
    out
}

/// What to say about a failed change: the kernel's errno, with the one everybody meets explained.
fn refusal(errno: i32) -> Error {
    let e = std::io::Error::from_raw_os_error(errno);
    let err = Error::new(
        format!("changing the NAT set {NAT_SET} of nftables table inet {TABLE}"),
        e,
    );
    if errno == libc::ENOENT {
        err.hint("the table or its set is missing; the helper re-creates them on the next net_up")
    } else {
        err
    }
}

/// The non-ack messages of an answer: `(type, payload)`.
type Answers = Vec<(u16, Vec<u8>)>;

/// A netfilter netlink socket of the calling thread's network namespace.
struct Sock {
    fd: OwnedFd,
}

impl Sock {
    fn open() -> Result<Sock> {
        let fd = socket(NETLINK_NETFILTER, "nf_tables netlink")?;
        // A kernel that never answers must not hang a VM start: 5 s, then an error.
        let tv = libc::timeval {
            tv_sec: 5,
            tv_usec: 0,
        };
        // SAFETY: setsockopt with a live timeval of the size given.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            );
        }
        Ok(Sock { fd })
    }

    /// Sends `msg` (one request or one batch holding `acks` acknowledged messages) and collects
    /// the answers' `(type, payload)` until all are acked. An error answer is `Err(errno)`.
    fn talk(
        &self,
        what: &str,
        msg: &[u8],
        acks: usize,
    ) -> Result<std::result::Result<Answers, i32>> {
        send(&self.fd, msg, || format!("{what}: sending to nf_tables"))?;
        // Every message is answered (ack 0 or its error); a batch that fails as a whole (its
        // commit, or its framing) is answered with one error. Done at the first error or when
        // all are acked.
        let (mut acked, mut out) = (0usize, vec![]);
        let mut buf = vec![0u8; 16 * 1024];
        while acked < acks {
            // SAFETY: receives into a live buffer of buf.len() bytes.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(os_err(format!("{what}: reading nf_tables' answer")));
            }
            let mut b = &buf[..n as usize];
            while b.len() >= 16 {
                let len = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize;
                let kind = u16::from_ne_bytes([b[4], b[5]]);
                if len < 16 || len > b.len() {
                    return Err(Error::new(
                        format!("{what}: reading nf_tables' answer"),
                        "malformed netlink message",
                    ));
                }
                if kind == NLMSG_ERROR {
                    let code = b
                        .get(16..20)
                        .map(|c| i32::from_ne_bytes([c[0], c[1], c[2], c[3]]))
                        .unwrap_or(-libc::EIO);
                    if code != 0 {
                        return Ok(Err(-code));
                    }
                    acked += 1;
                } else {
                    out.push((kind, b[16..len].to_vec()));
                }
                let next = (len + 3) & !3;
                b = if next >= b.len() { &[] } else { &b[next..] };
            }
        }
        Ok(Ok(out))
    }
}

/// Applies `changes` to the NAT set as one transaction in the calling thread's network namespace.
pub fn apply(changes: &[Change<'_>]) -> Result<()> {
    if changes.is_empty() {
        return Ok(());
    }
    Sock::open()?
        .talk("changing the NAT set", &batch(changes, 1), changes.len())?
        .map(|_| ())
        .map_err(refusal)
}

/// The element of `ip` in the NAT set: `None` when absent, else its comment (the VM id it was
/// added for; `None` for one without). An error when the table or the set does not exist.
pub fn element(ip: Ipv4Addr) -> Result<Option<Option<String>>> {
    let sock = Sock::open()?;
    let get = element_msg(NFT_MSG_GETSETELEM, 0, ip, None);
    match sock.talk("reading the NAT set", &get, 1)? {
        Ok(answers) => Ok(Some(
            answers
                .iter()
                .filter(|(k, _)| *k == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWSETELEM)
                .find_map(|(_, p)| comment_of(p)),
        )),
        Err(libc::ENOENT) => {
            // No element, or no set at all: ask for the set.
            let set = request(NFT_MSG_GETSET, 0)
                .str_attr(NFTA_SET_TABLE, TABLE)
                .str_attr(NFTA_SET_NAME, NAT_SET)
                .done();
            match sock.talk("reading the NAT set", &set, 1)? {
                Ok(_) => Ok(None),
                Err(errno) => Err(refusal(errno)),
            }
        }
        Err(errno) => Err(refusal(errno)),
    }
}

/// The comment of the (one) element in a `NFT_MSG_NEWSETELEM` answer's payload.
fn comment_of(payload: &[u8]) -> Option<String> {
    let elems = attrs(payload.get(4..)?)
        .into_iter()
        .find(|(k, _)| *k == NFTA_SET_ELEM_LIST_ELEMENTS)?
        .1;
    let elem = attrs(elems)
        .into_iter()
        .find(|(k, _)| *k == NFTA_LIST_ELEM)?
        .1;
    let mut udata = attrs(elem)
        .into_iter()
        .find(|(k, _)| *k == NFTA_SET_ELEM_USERDATA)?
        .1;
    while udata.len() >= 2 {
        let (tag, len) = (udata[0], udata[1] as usize);
        let value = udata.get(2..2 + len)?;
        if tag == NFTNL_UDATA_SET_ELEM_COMMENT {
            let text = value.split(|c| *c == 0).next().unwrap_or(&[]);
            return Some(String::from_utf8_lossy(text).into_owned());
        }
        udata = &udata[2 + len..];
    }
    None
}

/// Makes `ip`'s NAT element exactly `nat` (for VM `id`): reads it first and changes only what
/// differs (a wrong comment is replaced in one transaction). Returns the changes it applied.
/// When the element cannot be read (a kernel without single-element reads, say), the blind
/// transaction does it, as `nft` did: slower, same result, and still an error without the set.
pub fn set_exactly(ip: Ipv4Addr, id: &str, nat: bool) -> Result<Vec<Change<'_>>> {
    let changes = match element(ip).map(|e| (e, nat)) {
        Ok((None, false)) => vec![],
        Ok((None, true)) => vec![Change::Add(ip, id)],
        Ok((Some(c), true)) if c.as_deref() == Some(id) => vec![],
        Ok((Some(_), _)) | Err(_) => exactly(ip, id, nat),
    };
    apply(&changes)?;
    Ok(changes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u16_at(b: &[u8], at: usize) -> u16 {
        u16::from_ne_bytes([b[at], b[at + 1]])
    }
    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_ne_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
    }

    #[test]
    fn a_batch_is_begin_changes_end_each_framed_and_acked() {
        let ip: Ipv4Addr = "172.30.0.7".parse().unwrap();
        let b = batch(&exactly(ip, "vm1", true), 1);
        let mut at = 0;
        let mut kinds = vec![];
        while at < b.len() {
            let len = u32_at(&b, at) as usize;
            assert!(len >= 20 && at + len <= b.len() && len.is_multiple_of(4));
            let (kind, flags) = (u16_at(&b, at + 4), u16_at(&b, at + 6));
            if kind >> 8 == NFNL_SUBSYS_NFTABLES {
                assert_ne!(flags & NLM_F_ACK, 0, "every change is acked");
                assert_eq!(b[at + 16], NFPROTO_INET);
            } else {
                // Batch markers name the subsystem in network byte order.
                assert_eq!(&b[at + 18..at + 20], &NFNL_SUBSYS_NFTABLES.to_be_bytes());
            }
            kinds.push(kind & 0xff);
            at += len;
        }
        assert_eq!(
            kinds,
            [
                NFNL_MSG_BATCH_BEGIN,
                NFT_MSG_NEWSETELEM,
                NFT_MSG_DELSETELEM,
                NFT_MSG_NEWSETELEM,
                NFNL_MSG_BATCH_END
            ]
        );
        assert_eq!(exactly(ip, "vm1", false).len(), 2, "no NAT: add, delete");
    }

    #[test]
    fn an_added_element_carries_its_key_and_the_id_as_comment() {
        let ip: Ipv4Addr = "10.1.2.3".parse().unwrap();
        let m = change_msg(&Change::Add(ip, "abcd"), 9);
        assert_eq!(u32_at(&m, 8), 9, "sequence number");
        let w = |needle: &[u8]| m.windows(needle.len()).any(|x| x == needle);
        assert!(w(&[10, 1, 2, 3]), "key in network order");
        assert!(w(b"banger\0") && w(b"nat_guests\0"));
        assert!(w(&[0, 5, b'a', b'b', b'c', b'd', 0]), "comment TLV");
        let d = change_msg(&Change::Delete(ip), 2);
        assert!(!d.windows(4).any(|x| x == b"abcd"));
        assert_eq!(u16_at(&d, 6) & NLM_F_CREATE, 0);
    }

    #[test]
    fn a_long_comment_is_cut_to_fit() {
        let long = "x".repeat(400);
        let u = comment_udata(&long);
        assert_eq!(u[1] as usize, u.len() - 2);
        assert_eq!(u.last(), Some(&0));
    }
}
