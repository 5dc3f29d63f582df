//! JSON-lines logging to stderr (journald-friendly): one object per line, never multi-line.

use serde_json::{json, Map, Value};
use std::io::Write;

/// Logs one line: `{"ts":…,"level":…,"role":…,"msg":…, …fields}`.
pub fn log(level: &str, role: &str, msg: &str, fields: Value) {
    let mut obj = Map::new();
    obj.insert("ts".into(), json!(crate::clock::now_rfc3339()));
    obj.insert("level".into(), json!(level));
    obj.insert("role".into(), json!(role));
    obj.insert("msg".into(), json!(msg));
    if let Value::Object(extra) = fields {
        obj.extend(extra);
    }
    let line = Value::Object(obj).to_string();
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "{line}");
}

/// Info-level shorthand.
pub fn info(role: &str, msg: &str, fields: Value) {
    log("info", role, msg, fields);
}

/// Error-level shorthand.
pub fn error(role: &str, msg: &str, fields: Value) {
    log("error", role, msg, fields);
}
