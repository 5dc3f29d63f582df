//! Per-VM network names, all derived from the VM id so the daemon and the helper never disagree.
//!
//! Pure functions; they never touch the host.

use super::config::Subnet;
use std::net::Ipv4Addr;

/// Prefix of every banger tap: the helper only ever touches interfaces with this prefix.
pub const TAP_PREFIX: &str = "bgr-";

/// `bgr-` + the first 10 hex chars of the VM id (VM ids are 12 lowercase hex chars).
///
/// Fits IFNAMSIZ (15 bytes). An id shorter than 10 characters is used whole.
pub fn tap_name(vm_id: &str) -> String {
    let n = vm_id.char_indices().nth(10).map_or(vm_id.len(), |(i, _)| i);
    format!("{TAP_PREFIX}{}", &vm_id[..n])
}

/// `02:` + 5 bytes derived from the VM id (locally administered, unicast), lowercase,
/// colon-separated.
///
/// The bytes are the id's first 10 hex digits when it has them (so the MAC reads like the tap
/// name); any other id is hashed (FNV-1a) into 5 bytes.
pub fn mac_for(vm_id: &str) -> String {
    let hex10 = vm_id.len() >= 10 && vm_id.as_bytes()[..10].iter().all(u8::is_ascii_hexdigit);
    let bytes: [u8; 5] = if hex10 {
        let mut b = [0u8; 5];
        for (i, out) in b.iter_mut().enumerate() {
            *out = u8::from_str_radix(&vm_id[2 * i..2 * i + 2], 16).unwrap_or(0);
        }
        b
    } else {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for byte in vm_id.bytes() {
            h ^= u64::from(byte);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        let a = h.to_be_bytes();
        [a[3], a[4], a[5], a[6], a[7]]
    };
    let mut s = String::from("02");
    for b in bytes {
        s.push_str(&format!(":{b:02x}"));
    }
    s
}

/// Kernel argument `ip=<ip>::<gateway>:<netmask>:<hostname>:eth0:off`.
pub fn kernel_ip_arg(ip: Ipv4Addr, subnet: &Subnet, hostname: &str) -> String {
    format!(
        "ip={ip}::{}:{}:{hostname}:eth0:off",
        subnet.gateway(),
        subnet.netmask()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_name_table() {
        for (id, tap) in [
            ("0123456789ab", "bgr-0123456789"),
            ("abcdefabcdef", "bgr-abcdefabcd"),
            ("a", "bgr-a"),
            ("vm-1", "bgr-vm-1"),
            ("0123456789", "bgr-0123456789"),
        ] {
            assert_eq!(tap_name(id), tap, "{id}");
            assert!(tap_name(id).len() <= 15);
        }
        assert!(tap_name(&"a".repeat(63)).len() <= 15);
    }

    #[test]
    fn mac_table() {
        for (id, mac) in [
            ("0123456789ab", "02:01:23:45:67:89"),
            ("abcdefabcdef", "02:ab:cd:ef:ab:cd"),
            ("ffffffffffff", "02:ff:ff:ff:ff:ff"),
        ] {
            assert_eq!(mac_for(id), mac, "{id}");
        }
        for id in ["a", "vm-1", "0123456789ab", "zzzzzzzzzzzz"] {
            let m = mac_for(id);
            assert_eq!(m.len(), 17, "{m}");
            assert!(m.starts_with("02:"), "{m}");
            assert_eq!(m, m.to_lowercase());
            assert_eq!(m.split(':').count(), 6);
            let first = u8::from_str_radix(&m[..2], 16).unwrap();
            assert_eq!(first & 0b11, 0b10, "locally administered unicast: {m}");
        }
        assert_ne!(mac_for("vm-1"), mac_for("vm-2"));
        assert_eq!(mac_for("vm-1"), mac_for("vm-1"));
    }

    #[test]
    fn kernel_ip_arg_table() {
        let s = Subnet::parse("172.30.0.0/24").unwrap();
        assert_eq!(
            kernel_ip_arg("172.30.0.2".parse().unwrap(), &s, "vm-a"),
            "ip=172.30.0.2::172.30.0.1:255.255.255.0:vm-a:eth0:off"
        );
        let s = Subnet::parse("10.8.0.0/16").unwrap();
        assert_eq!(
            kernel_ip_arg("10.8.3.4".parse().unwrap(), &s, "h"),
            "ip=10.8.3.4::10.8.0.1:255.255.0.0:h:eth0:off"
        );
    }
}
