//! The daemon's RPC parameters: one typed struct per method, read with [`parse`].
//!
//! This is the wire contract the CLI speaks (DESIGN §4). Every struct refuses unknown fields, so a
//! typo or a field from a newer client never silently does nothing; a wrong type is refused with
//! the field's name. Values are range-checked by the method that owns them (sizes, names), never
//! here. Nothing in this module touches state.

use crate::rpc::RpcError;
use serde::de::value::{MapAccessDeserializer, MapDeserializer};
use serde::de::{DeserializeOwned, Error as _, IntoDeserializer};
use serde::{Deserialize, Deserializer};
use serde_json::Value;

/// Reads `params` (an object, or null for "none") as `T`. A refusal names `method` and the field.
pub fn parse<T: DeserializeOwned>(method: &str, params: &Value) -> Result<T, RpcError> {
    static EMPTY: std::sync::OnceLock<serde_json::Map<String, Value>> = std::sync::OnceLock::new();
    let map = match params {
        Value::Null => EMPTY.get_or_init(serde_json::Map::new),
        Value::Object(m) => m,
        _ => return Err(RpcError::bad_request("params must be an object")),
    };
    let mut de = MapDeserializer::new(
        map.iter()
            .map(|(k, v)| (k.as_str(), Field { key: k, value: v })),
    );
    T::deserialize(MapAccessDeserializer::new(&mut de))
        .and_then(|t| de.end().map(|()| t))
        .map_err(|e: serde_json::Error| {
            RpcError::bad_request(format!("invalid parameters for {method}: {e}"))
        })
}

/// One parameter's value; its errors name the parameter (serde's own say only what was expected).
struct Field<'a> {
    key: &'a str,
    value: &'a Value,
}

impl<'de> Deserializer<'de> for Field<'de> {
    type Error = serde_json::Error;

    fn deserialize_any<V: serde::de::Visitor<'de>>(self, v: V) -> Result<V::Value, Self::Error> {
        let key = self.key;
        self.value
            .deserialize_any(v)
            .map_err(|e| serde_json::Error::custom(format!("`{key}`: {e}")))
    }

    fn deserialize_option<V: serde::de::Visitor<'de>>(self, v: V) -> Result<V::Value, Self::Error> {
        match self.value {
            Value::Null => v.visit_none(),
            _ => v.visit_some(self),
        }
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf unit unit_struct newtype_struct seq tuple
        tuple_struct map struct enum identifier ignored_any
    }
}

impl<'de> IntoDeserializer<'de, serde_json::Error> for Field<'de> {
    type Deserializer = Self;
    fn into_deserializer(self) -> Self {
        self
    }
}

/// Methods without parameters (`{}` or null).
#[derive(Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NoParams {}

/// `vm.create`.
#[derive(Debug, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct VmCreate {
    /// VM name (generated when absent or empty).
    pub name: Option<String>,
    /// Image (the only one when absent).
    pub image: Option<String>,
    /// vCPUs (default 1).
    pub vcpu: Option<u64>,
    /// Memory in MiB (default 512).
    pub memory_mib: Option<u64>,
    /// Boot it now (default true).
    pub start: Option<bool>,
    /// Let the guest reach outside networks through the host (default false).
    pub nat: Option<bool>,
    /// Restore this snapshot instead of booting an image (with `image`, `vcpu`, `memory_mib`
    /// absent: the snapshot fixes them).
    pub from: Option<String>,
}

/// `vm.snapshot`.
#[derive(Debug, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct VmSnapshot {
    /// VM name or id.
    pub vm: String,
    /// Snapshot name (generated when absent or empty).
    #[serde(rename = "as")]
    pub name: Option<String>,
    /// Stop the VM afterwards instead of resuming it (default false).
    pub stop: Option<bool>,
}

/// `snapshot.show`, `snapshot.rm`: one snapshot by name or id.
#[derive(Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRef {
    /// Snapshot name or id.
    pub snapshot: String,
}

/// `vm.start`, `vm.restart`, `vm.show`: one VM by name or id.
#[derive(Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VmRef {
    /// VM name or id.
    pub vm: String,
}

/// `vm.stop`.
#[derive(Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VmStop {
    /// VM name or id.
    pub vm: String,
    /// Seconds to wait for a graceful stop before killing (default 10).
    pub timeout_s: Option<u64>,
}

/// `vm.kill`.
#[derive(Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VmKill {
    /// VM name or id.
    pub vm: String,
    /// TERM, KILL, INT or HUP (default KILL).
    pub signal: Option<String>,
}

/// `vm.delete`.
#[derive(Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VmDelete {
    /// VM names or ids; all must exist, or nothing is deleted.
    pub vms: Vec<String>,
}

/// `vm.logs`.
#[derive(Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VmLogs {
    /// VM name or id.
    pub vm: String,
    /// Console byte offset to read from (default 0).
    pub offset: Option<u64>,
}

/// `image.import`.
#[derive(Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ImageImport {
    /// Image name.
    pub name: String,
    /// Absolute path of the root filesystem to copy.
    pub rootfs: String,
    /// Kernel name.
    pub kernel: String,
    /// Console readiness prefix for guests without the agent.
    pub ready_console: Option<String>,
    /// How the image was made, shown by `image list` (at most 512 bytes, no control characters);
    /// the daemon records `imported from <rootfs>` when absent.
    pub origin: Option<String>,
}

/// `kernel.import`.
#[derive(Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct KernelImport {
    /// Kernel name.
    pub name: String,
    /// Absolute path of the vmlinux to copy.
    pub path: String,
}

/// `image.rm`, `kernel.rm`.
#[derive(Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NameRef {
    /// The object's name.
    pub name: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn err<T: DeserializeOwned + std::fmt::Debug>(p: Value) -> String {
        parse::<T>("m", &p).unwrap_err().message
    }

    #[test]
    fn accepted_table() {
        assert_eq!(parse::<NoParams>("m", &json!(null)).unwrap(), NoParams {});
        assert_eq!(parse::<NoParams>("m", &json!({})).unwrap(), NoParams {});
        assert_eq!(
            parse::<VmCreate>("m", &json!({"name": "a", "vcpu": 2, "image": null})).unwrap(),
            VmCreate {
                name: Some("a".into()),
                vcpu: Some(2),
                ..VmCreate::default()
            }
        );
        assert_eq!(
            parse::<VmSnapshot>("m", &json!({"vm": "a", "as": "warm", "stop": true})).unwrap(),
            VmSnapshot {
                vm: "a".into(),
                name: Some("warm".into()),
                stop: Some(true)
            }
        );
        assert!(parse::<VmSnapshot>("m", &json!({"vm": "a", "name": "warm"})).is_err());
        assert!(parse::<SnapshotRef>("m", &json!({"snapshot": 1})).is_err());
        assert_eq!(
            parse::<VmCreate>("m", &json!({"from": "warm"}))
                .unwrap()
                .from
                .as_deref(),
            Some("warm")
        );
        assert_eq!(
            parse::<VmDelete>("m", &json!({"vms": ["a", "b"]})).unwrap(),
            VmDelete {
                vms: vec!["a".into(), "b".into()]
            }
        );
        assert_eq!(
            parse::<VmStop>("m", &json!({"vm": "a", "timeout_s": 3})).unwrap(),
            VmStop {
                vm: "a".into(),
                timeout_s: Some(3)
            }
        );
    }

    #[test]
    fn refused_table() {
        // (params, what the message must say)
        let create: &[(Value, &str)] = &[
            (json!({"name": "ok", "cmd": "x"}), "unknown field `cmd`"),
            (
                json!({"vcpu": "two"}),
                "`vcpu`: invalid type: string \"two\"",
            ),
            (json!({"vcpu": -1}), "`vcpu`: invalid value: integer `-1`"),
            (json!({"memory_mib": 1.5}), "`memory_mib`: invalid type"),
            (json!({"start": "yes"}), "`start`: invalid type"),
            (
                json!({"nat": "yes"}),
                "`nat`: invalid type: string \"yes\", expected a boolean",
            ),
            (json!({"name": 7}), "`name`: invalid type: integer `7`"),
            (json!([1]), "params must be an object"),
            (json!("x"), "params must be an object"),
        ];
        for (p, want) in create {
            let m = err::<VmCreate>(p.clone());
            assert!(m.contains(want), "{p}: {m}");
        }
        let m = err::<VmRef>(json!({}));
        assert!(m.contains("missing field `vm`"), "{m}");
        let m = err::<VmDelete>(json!({"vms": ["a", 1]}));
        assert!(m.contains("`vms`: invalid type: integer `1`"), "{m}");
        let m = err::<VmDelete>(json!({"vms": "a"}));
        assert!(m.contains("`vms`: invalid type: string"), "{m}");
        let m = err::<NoParams>(json!({"x": 1}));
        assert!(m.contains("unknown field `x`"), "{m}");
        let m = err::<VmKill>(json!({"vm": "a", "signal": 9}));
        assert!(m.starts_with("invalid parameters for m: `signal`"), "{m}");
    }
}
