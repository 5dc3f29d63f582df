//! Allow-list validators for every argument the root helper accepts.
//!
//! Each returns the validated value or a `bad_request` saying exactly what was refused. The helper
//! is never a general root primitive: if a value is not on an allow-list here, it is refused.

use crate::rpc::RpcError;
use serde_json::{Map, Value};
use std::net::Ipv4Addr;

/// Refuses any parameter not in `allowed`; returns the parameter object.
pub fn only_params<'a>(
    params: &'a Value,
    allowed: &[&str],
) -> Result<Option<&'a Map<String, Value>>, RpcError> {
    match params {
        Value::Null => Ok(None),
        Value::Object(m) => {
            let unknown: Vec<&str> = m
                .keys()
                .map(String::as_str)
                .filter(|k| !allowed.contains(k))
                .collect();
            if unknown.is_empty() {
                Ok(Some(m))
            } else {
                Err(RpcError::bad_request(format!(
                    "argument(s) not allowed: {} (allowed: {})",
                    unknown.join(", "),
                    if allowed.is_empty() {
                        "none".to_string()
                    } else {
                        allowed.join(", ")
                    }
                )))
            }
        }
        _ => Err(RpcError::bad_request("params must be an object")),
    }
}

/// A VM id made by banger: 1–63 of `a-z0-9-`, no leading or trailing `-`.
pub fn vm_id(s: &str) -> Result<&str, RpcError> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-');
    if ok {
        Ok(s)
    } else {
        Err(RpcError::bad_request(format!(
            "`{s}` is not a banger VM id (1-63 of a-z, 0-9, '-', no leading or trailing '-')"
        )))
    }
}

/// The required string argument `key`.
pub fn required_str<'a>(m: &'a Map<String, Value>, key: &str) -> Result<&'a str, RpcError> {
    match m.get(key) {
        Some(Value::String(s)) => Ok(s),
        None | Some(Value::Null) => Err(RpcError::bad_request(format!("missing `{key}`"))),
        Some(_) => Err(RpcError::bad_request(format!("`{key}` must be a string"))),
    }
}

/// The required boolean argument `key` (a JSON `true`/`false`, nothing else).
pub fn required_bool(m: &Map<String, Value>, key: &str) -> Result<bool, RpcError> {
    match m.get(key) {
        Some(Value::Bool(b)) => Ok(*b),
        None | Some(Value::Null) => Err(RpcError::bad_request(format!("missing `{key}`"))),
        Some(_) => Err(RpcError::bad_request(format!(
            "`{key}` must be true or false"
        ))),
    }
}

/// A guest address of `subnet`: dotted-quad IPv4 inside it, not its network, gateway (the
/// bridge's) or broadcast address.
pub fn guest_ip(s: &str, subnet: &crate::net::Subnet) -> Result<Ipv4Addr, RpcError> {
    let ip: Ipv4Addr = s
        .parse()
        .map_err(|_| RpcError::bad_request(format!("`{s}` is not an IPv4 address (a.b.c.d)")))?;
    if subnet.is_guest_address(ip) {
        Ok(ip)
    } else if ip == subnet.gateway() {
        Err(RpcError::bad_request(format!(
            "{ip} is the bridge's own address in {subnet}, not a guest address"
        )))
    } else {
        Err(RpcError::bad_request(format!(
            "{ip} is not a guest address of the configured subnet {subnet} (not its network, gateway or broadcast address)"
        )))
    }
}

/// The signals the helper will deliver to a VMM.
pub const SIGNALS: [&str; 4] = ["TERM", "KILL", "INT", "HUP"];

/// One of [`SIGNALS`], with or without the `SIG` prefix.
pub fn signal(s: &str) -> Result<rustix::process::Signal, RpcError> {
    use rustix::process::Signal;
    match s.trim_start_matches("SIG") {
        "TERM" => Ok(Signal::Term),
        "KILL" => Ok(Signal::Kill),
        "INT" => Ok(Signal::Int),
        "HUP" => Ok(Signal::Hup),
        _ => Err(RpcError::bad_request(format!(
            "signal `{s}` is not allowed (allowed: {})",
            SIGNALS.join(", ")
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn vm_id_table() {
        for ok in ["a", "vm-1", "0abc", &"a".repeat(63)] {
            assert!(vm_id(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "-a",
            "a-",
            "A",
            "a_b",
            "a/b",
            "a b",
            "../x",
            &"a".repeat(64),
            "é",
        ] {
            assert!(vm_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn signal_table() {
        for ok in ["TERM", "SIGTERM", "KILL", "SIGKILL", "INT", "HUP"] {
            assert!(signal(ok).is_ok(), "{ok}");
        }
        for bad in ["", "STOP", "SIGSTOP", "9", "term", "USR1", "SIGSEGV"] {
            assert!(signal(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn guest_ip_table() {
        let s = crate::net::Subnet::parse("172.30.0.0/24").unwrap();
        for ok in ["172.30.0.2", "172.30.0.100", "172.30.0.254"] {
            assert_eq!(guest_ip(ok, &s).unwrap().to_string(), ok);
        }
        for bad in [
            "",
            "172.30.0.0",
            "172.30.0.1",
            "172.30.0.255",
            "172.30.1.2",
            "10.0.0.2",
            "172.30.0.02",
            "172.30.0",
            "172.30.0.2/24",
            " 172.30.0.2",
            "::1",
            "localhost",
        ] {
            assert!(guest_ip(bad, &s).is_err(), "{bad:?}");
        }
        assert!(guest_ip("172.30.0.1", &s)
            .unwrap_err()
            .message
            .contains("bridge"));
    }

    #[test]
    fn required_arg_tables() {
        let m = json!({"s": "x", "b": true, "f": false, "n": 1, "z": null, "bs": "true"});
        let m = m.as_object().unwrap();
        assert_eq!(required_str(m, "s").unwrap(), "x");
        for bad in ["b", "n", "z", "missing"] {
            assert!(required_str(m, bad).is_err(), "{bad}");
        }
        assert!(required_bool(m, "b").unwrap());
        assert!(!required_bool(m, "f").unwrap());
        for bad in ["s", "n", "z", "bs", "missing"] {
            assert!(required_bool(m, bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn params_table() {
        assert!(only_params(&json!(null), &[]).is_ok());
        assert!(only_params(&json!({}), &[]).is_ok());
        assert!(only_params(&json!({"id": "a"}), &["id"]).is_ok());
        let e = only_params(&json!({"cmd": "rm -rf /"}), &["id"]).unwrap_err();
        assert!(e.message.contains("cmd"), "{}", e.message);
        assert!(only_params(&json!([1]), &[]).is_err());
        assert!(only_params(&json!("x"), &[]).is_err());
    }
}
