//! Property tests (proptest) for the parsers that read bytes from outside the process: the RPC
//! envelope, the release manifest, `SHA256SUMS`, signature and public-key decoding, release
//! tarball staging, `--version` output, and the guest agent's `reconfigure` request.
//!
//! Each property runs [`cases`] cases: 64 under `cargo test`, `PROPTEST_CASES` when set
//! (`scripts/fuzz.sh` runs each in a loop for a bounded time). Properties say what must always
//! hold (no panic; a refusal changes nothing outside its own directory; what was written is read
//! back), never a particular error text. Failures are not persisted into the source tree: the
//! shrunk failing input is printed instead.

use proptest::prelude::*;
use proptest::test_runner::Config;

/// Cases per property: `PROPTEST_CASES`, else 64.
fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64)
}

fn config() -> Config {
    Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    }
}

/// Bytes that are often almost-JSON: fragments of the real grammar glued together.
fn jsonish() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        Just("{".to_string()),
        Just("}".to_string()),
        Just("[".to_string()),
        Just("]".to_string()),
        Just(",".to_string()),
        Just(":".to_string()),
        Just("\"v\"".to_string()),
        Just("1".to_string()),
        Just("\"method\"".to_string()),
        Just("\"params\"".to_string()),
        Just("\"op_id\"".to_string()),
        Just("null".to_string()),
        Just("\"\\u0000\"".to_string()),
        Just("1e999".to_string()),
        Just("-0".to_string()),
        "\"[ -~]{0,12}\"",
        "[ -~]{0,6}",
    ];
    prop_oneof![
        proptest::collection::vec(piece, 0..24).prop_map(|v| v.concat().into_bytes()),
        proptest::collection::vec(any::<u8>(), 0..256),
    ]
}

mod rpc_envelope {
    use super::*;
    use crate::rpc::proto::{parse_request, Request, PROTOCOL_VERSION};
    use serde_json::{json, Value};

    proptest! {
        #![proptest_config(config())]

        /// Any bytes: an answer, never a panic; what is accepted is a well-formed request.
        #[test]
        fn rpc_envelope_any_bytes(bytes in jsonish()) {
            if let Ok(req) = parse_request(&bytes) {
                prop_assert_eq!(req.v, PROTOCOL_VERSION);
                prop_assert!(!req.method.is_empty() && req.method.len() <= 128);
                prop_assert!(req.params.is_object() || req.params.is_null());
            }
        }

        /// What a client serializes, the server parses back unchanged.
        #[test]
        fn rpc_envelope_round_trip(
            method in "[a-z][a-z._]{0,40}",
            keys in proptest::collection::btree_map("[a-z_]{1,8}", "[ -~]{0,16}", 0..6),
            op_id in proptest::option::of("op-[0-9a-f]{1,20}"),
        ) {
            let params = Value::Object(keys.into_iter().map(|(k, v)| (k, json!(v))).collect());
            let req = Request { v: PROTOCOL_VERSION, method, params, op_id };
            let mut bytes = serde_json::to_vec(&req).unwrap();
            prop_assert_eq!(parse_request(&bytes).unwrap(), req.clone());
            bytes.push(b'\n');
            let line = &bytes[..bytes.len() - 1];
            prop_assert_eq!(parse_request(line).unwrap(), req);
        }
    }
}

mod manifest {
    use super::*;
    use crate::update::manifest::Manifest;

    const URL: &str = "https://releases.example.test/banger/manifest.json";

    fn url() -> impl Strategy<Value = String> {
        prop_oneof![
            "https://[a-z.]{1,12}/[a-z0-9./-]{0,20}banger-[0-9.]{1,8}\\.tar\\.gz",
            "[a-z0-9./-]{0,20}",
            "/[a-z0-9./-]{0,20}",
            "(ftp|file|javascript)://[ -~]{0,20}",
            "//[a-z.]{1,12}/x",
            "[ -~]{0,40}",
        ]
    }

    fn manifest_json() -> impl Strategy<Value = Vec<u8>> {
        let version = prop_oneof!["v?[0-9]{1,3}\\.[0-9]{1,3}\\.[0-9]{1,3}", "[ -~]{0,10}"];
        let release = (version.clone(), url(), url(), url());
        (
            prop_oneof![Just(1u64), 0u64..4],
            version,
            proptest::collection::vec(release, 0..5),
        )
            .prop_map(|(schema, latest, releases)| {
                let releases: Vec<_> = releases
                    .into_iter()
                    .map(|(v, t, s, g)| {
                        serde_json::json!({"version": v, "tarball_url": t, "sha256sums_url": s, "sha256sums_sig_url": g})
                    })
                    .collect();
                serde_json::to_vec(&serde_json::json!({
                    "schema_version": schema,
                    "latest_stable": latest,
                    "releases": releases,
                }))
                .unwrap()
            })
    }

    proptest! {
        #![proptest_config(config())]

        /// Any bytes: an answer, never a panic.
        #[test]
        fn manifest_any_bytes(bytes in jsonish()) {
            let _ = Manifest::parse(&bytes, URL);
        }

        /// Manifest-shaped input: what is accepted only points at http(s) URLs with a file name,
        /// and its latest_stable is one of its releases.
        #[test]
        fn manifest_accepted_is_sound(bytes in manifest_json()) {
            if let Ok(m) = Manifest::parse(&bytes, URL) {
                prop_assert!(m.find(&m.latest_stable).is_some());
                for r in &m.releases {
                    for u in [&r.tarball_url, &r.sha256sums_url, &r.sha256sums_sig_url] {
                        prop_assert!(u.starts_with("https://") || u.starts_with("http://"), "{}", u);
                        prop_assert!(!u.chars().any(char::is_whitespace), "{}", u);
                    }
                    prop_assert!(r.tarball_file_name().is_ok());
                }
            }
        }
    }
}

mod sha256sums {
    use super::*;
    use crate::update::sha256sums::Sha256Sums;

    proptest! {
        #![proptest_config(config())]

        /// Any bytes: an answer, never a panic; every accepted digest is 64 lowercase hex digits.
        #[test]
        fn sha256sums_any_bytes(bytes in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..512),
            "([0-9a-fA-F]{60,68}[ *]{1,3}[ -~]{0,20}\n|SHA256 \\([ -~]{0,12}\\) = [0-9a-f]{64}\n|#[ -~]{0,10}\n|\r\n){0,6}"
                .prop_map(String::into_bytes),
        ]) {
            if let Ok(s) = Sha256Sums::parse(&bytes) {
                for e in s.entries() {
                    prop_assert_eq!(e.digest.len(), 64);
                    prop_assert!(e.digest.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
                }
            }
        }

        /// What `sha256sum` writes (both line styles, CRLF or not) is read back exactly.
        #[test]
        fn sha256sums_round_trip(
            entries in proptest::collection::btree_map("[A-Za-z0-9._-]{1,40}", "[0-9a-f]{64}", 1..8),
            binary_marker in any::<bool>(),
            crlf in any::<bool>(),
        ) {
            let eol = if crlf { "\r\n" } else { "\n" };
            let text: String = entries
                .iter()
                .map(|(name, d)| format!("{d} {}{name}{eol}", if binary_marker { "*" } else { " " }))
                .collect();
            let s = Sha256Sums::parse(text.as_bytes()).unwrap();
            prop_assert_eq!(s.entries().len(), entries.len());
            for (name, d) in &entries {
                prop_assert_eq!(s.lookup(name), Some(d.as_str()));
            }
        }
    }
}

mod signature {
    use super::*;
    use crate::update::signature::{der_shape, verify, PublicKey};
    use base64::Engine;

    const K1: &str = "-----BEGIN PUBLIC KEY-----
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEJ3her3wCpzUIXdtg++xDg6NM6/cE
e+suE9oolR+kvZCmBDJ6zFTeQQqhdqqVLEuA3oEf8iJwfE5oZUliYMfAmA==
-----END PUBLIC KEY-----
";
    const SIG: &str = "MEQCICbVxTcozCk4PKypsfxIgVgw3WZ3L/VLxcqoF/RO8bMPAiAD071vFRN4H0mucD7GUgOaOvEKRAI6h3AulW2mdlpuHg==";
    const MSG: &[u8] = b"hello SHA256SUMS\n";

    /// DER-ish signatures: the real one with bytes changed, cut or added, or random bytes.
    fn der_like() -> impl Strategy<Value = Vec<u8>> {
        let real = base64::engine::general_purpose::STANDARD
            .decode(SIG)
            .unwrap();
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..80),
            (0..real.len(), any::<u8>()).prop_map({
                let real = real.clone();
                move |(i, b)| {
                    let mut v = real.clone();
                    if v[i] == b {
                        v[i] ^= 1
                    } else {
                        v[i] = b
                    }
                    v
                }
            }),
            (0..real.len()).prop_map({
                let real = real.clone();
                move |n| real[..n].to_vec()
            }),
            proptest::collection::vec(any::<u8>(), 1..8).prop_map(move |tail| {
                let mut v = real.clone();
                v.extend(tail);
                v
            }),
        ]
    }

    proptest! {
        #![proptest_config(config())]

        /// No signature but the real one verifies; none panics; the shape check never panics.
        #[test]
        fn signature_decoding(der in der_like(), raw in proptest::collection::vec(any::<u8>(), 0..200)) {
            let keys = PublicKey::from_pem("K1", K1).unwrap();
            let _ = der_shape(&der);
            let b64 = base64::engine::general_purpose::STANDARD.encode(&der);
            prop_assert!(verify(&keys, MSG, b64.as_bytes()).is_err());
            prop_assert!(verify(&keys, MSG, &raw).is_err());
        }

        /// Any text as a PEM key file: keys or an error, never a panic.
        #[test]
        fn public_key_pem_any_text(
            body in proptest::collection::vec(any::<u8>(), 0..120),
            wrap in any::<bool>(),
        ) {
            let text = if wrap {
                format!(
                    "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
                    base64::engine::general_purpose::STANDARD.encode(&body)
                )
            } else {
                String::from_utf8_lossy(&body).into_owned()
            };
            if let Ok(keys) = PublicKey::from_pem("k", &text) {
                for k in keys {
                    prop_assert_eq!(k.spki_der().len(), 91);
                }
            }
        }
    }
}

mod staging {
    use super::*;
    use crate::update::staging::{extract, ExtractSpec};
    use std::io::Write;
    use std::path::{Path, PathBuf};

    /// One raw tar entry: a name (any bytes, `..` and absolute paths included), a type, a link
    /// target and content.
    #[derive(Debug, Clone, PartialEq)]
    struct RawEntry {
        name: Vec<u8>,
        kind: u8,
        link: Vec<u8>,
        data: Vec<u8>,
    }

    fn name() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            Just(b"banger".to_vec()),
            Just(b"./banger".to_vec()),
            Just(b"../victim/banger".to_vec()),
            Just(b"/tmp/banger-proptest-escape".to_vec()),
            Just(b"a/../../victim/x".to_vec()),
            Just(b"banger/".to_vec()),
            "[a-z./]{1,20}".prop_map(String::into_bytes),
            proptest::collection::vec(any::<u8>(), 1..40),
        ]
    }

    fn entry() -> impl Strategy<Value = RawEntry> {
        (
            name(),
            prop_oneof![
                Just(b'0'),
                Just(b'1'),
                Just(b'2'),
                Just(b'3'),
                Just(b'5'),
                Just(b'6'),
                any::<u8>()
            ],
            prop_oneof![
                Just(b"../victim".to_vec()),
                Just(b"/etc/passwd".to_vec()),
                "[a-z./]{0,12}".prop_map(String::into_bytes)
            ],
            proptest::collection::vec(any::<u8>(), 0..64),
        )
            .prop_map(|(name, kind, link, data)| RawEntry {
                name,
                kind,
                link,
                data,
            })
    }

    /// The one entry a release holds.
    fn good() -> RawEntry {
        RawEntry {
            name: b"banger".to_vec(),
            kind: b'0',
            link: Vec::new(),
            data: b"#!/bin/true\n".to_vec(),
        }
    }

    /// A gzip'd tar of `entries`, names and links written raw into the header (no sanitizing).
    fn archive(entries: &[RawEntry], cut: Option<usize>) -> Vec<u8> {
        let mut tar = Vec::new();
        for e in entries {
            let mut h = tar::Header::new_old();
            {
                let old = h.as_old_mut();
                let n = e.name.len().min(99);
                old.name[..n].copy_from_slice(&e.name[..n]);
                let l = e.link.len().min(99);
                old.linkname[..l].copy_from_slice(&e.link[..l]);
                old.linkflag[0] = e.kind;
            }
            h.set_mode(0o755);
            h.set_size(e.data.len() as u64);
            h.set_cksum();
            tar.extend_from_slice(h.as_bytes());
            tar.extend_from_slice(&e.data);
            tar.resize(tar.len().div_ceil(512) * 512, 0);
        }
        tar.extend_from_slice(&[0u8; 1024]);
        if let Some(c) = cut {
            tar.truncate(c % (tar.len() + 1));
        }
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&tar).unwrap();
        gz.finish().unwrap()
    }

    /// Every path under `root`, links not followed.
    fn walk(root: &Path, out: &mut Vec<PathBuf>) {
        if let Ok(rd) = std::fs::read_dir(root) {
            for e in rd.flatten() {
                let p = e.path();
                out.push(p.clone());
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    walk(&p, out);
                }
            }
        }
    }

    proptest! {
        #![proptest_config(config())]

        /// Arbitrary archives (and arbitrary bytes as an archive): extraction never panics and
        /// never creates anything outside the staging dir; on success the staging dir holds
        /// exactly the one expected regular file.
        #[test]
        fn staging_arbitrary_archives(
            entries in prop_oneof![
                proptest::collection::vec(entry(), 0..5),
                Just(vec![good()]),
                proptest::collection::vec(entry(), 0..3).prop_map(|mut v| { v.push(good()); v }),
            ],
            cut in proptest::option::of(any::<usize>()),
            garbage in proptest::option::of(proptest::collection::vec(any::<u8>(), 0..200)),
        ) {
            let t = crate::system::testutil::TempDir::new();
            let tarball = t.path().join("release.tar.gz");
            let well_formed = garbage.is_none() && cut.is_none() && entries == [good()];
            let bytes = garbage.unwrap_or_else(|| archive(&entries, cut));
            std::fs::write(&tarball, &bytes).unwrap();
            std::fs::create_dir(t.path().join("victim")).unwrap();
            let stage = t.path().join("stage");
            let spec = ExtractSpec { files: &["banger"], max_file_bytes: 32 };
            let result = extract(&tarball, &stage, &spec);
            let mut all = Vec::new();
            walk(t.path(), &mut all);
            for p in &all {
                prop_assert!(
                    p == &tarball || p == &t.path().join("victim") || p.starts_with(&stage),
                    "{} was created outside the staging dir", p.display()
                );
            }
            prop_assert!(!Path::new("/tmp/banger-proptest-escape").exists());
            prop_assert!(!well_formed || result.is_ok(), "a well-formed release was refused: {:?}", result);
            match result {
                Ok(files) => {
                    prop_assert_eq!(files, vec![stage.join("banger")]);
                    let meta = std::fs::symlink_metadata(stage.join("banger")).unwrap();
                    prop_assert!(meta.file_type().is_file());
                    prop_assert!(meta.len() <= 32);
                    prop_assert_eq!(std::fs::read_dir(&stage).unwrap().count(), 1);
                }
                Err(_) => prop_assert!(!stage.exists(), "a refused archive leaves no staging dir"),
            }
        }
    }
}

mod version_output {
    use super::*;
    use crate::buildinfo::{parse_one_line_version, BuildInfo};

    proptest! {
        #![proptest_config(config())]

        /// `banger version` and `--version` output read back into what was printed.
        #[test]
        fn version_output_round_trip(
            version in "[0-9]{1,3}\\.[0-9]{1,3}\\.[0-9]{1,3}(-[a-z0-9.]{1,10})?",
            commit in "[0-9a-f]{7,40}|unknown",
            built_at in "[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9:]{8}Z",
        ) {
            let b = BuildInfo { version: version.clone(), commit, built_at };
            prop_assert_eq!(BuildInfo::parse(&b.three_lines()).unwrap(), b.clone());
            prop_assert_eq!(parse_one_line_version(&b.one_line()), Some(version));
        }

        /// Any text: an answer, never a panic; a parsed version is never empty and has no space.
        #[test]
        fn version_output_any_text(text in "[ -~\n\t]{0,200}|(version|commit|built_at|banger)[: ][ -~]{0,20}\n?") {
            if let Ok(b) = BuildInfo::parse(&text) {
                for f in [&b.version, &b.commit, &b.built_at] {
                    prop_assert!(!f.contains('\n') && f.trim() == f.as_str(), "{:?}", f);
                }
                prop_assert!(!b.commit.is_empty() && !b.built_at.is_empty());
            }
            if let Some(v) = parse_one_line_version(&text) {
                prop_assert!(!v.chars().any(char::is_whitespace));
            }
        }
    }
}

mod agent_reconfigure {
    use super::*;
    use crate::agent::reconfigure::{Configurer, Deferred, Reconfigure, Validated};
    use crate::agent::{handle_line, AgentEnv};
    use serde_json::{json, Value};
    use std::sync::{Arc, Mutex};

    /// Counts what reached the guest.
    #[derive(Debug, Default)]
    struct Count(Mutex<Vec<Validated>>);

    impl Configurer for Count {
        fn apply(&self, v: &Validated, _defer: bool) -> Result<Option<Deferred>, String> {
            self.0.lock().unwrap().push(v.clone());
            Ok(None)
        }
    }

    const KEY_LINE: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAILf5oszbHqEb+6X3j8hlzlMXxaLuKBJTgVM/l0kQlrAO o";

    /// Fields that are often almost valid.
    fn field() -> impl Strategy<Value = Value> {
        prop_oneof![
            "[a-z0-9-]{0,10}".prop_map(Value::from),
            "(10|172|192|8|127)\\.[0-9]{1,3}\\.[0-9]{1,3}\\.[0-9]{1,3}(/[0-9]{1,3})?"
                .prop_map(Value::from),
            "[0-9a-fA-F]{1,2}(:[0-9a-fA-F]{1,3}){4,6}".prop_map(Value::from),
            Just(Value::from(base64::Engine::encode(
                &base64::engine::general_purpose::STANDARD,
                KEY_LINE
            ))),
            "[ -~]{0,20}".prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            Just(Value::Null),
        ]
    }

    fn request() -> impl Strategy<Value = Vec<u8>> {
        let names = ["name", "ip", "gateway", "mac", "key", "extra"];
        prop_oneof![
            proptest::collection::vec((0usize..6, field()), 0..7).prop_map(move |kv| {
                let params: serde_json::Map<String, Value> =
                    kv.into_iter().map(|(k, v)| (names[k].to_string(), v)).collect();
                json!({"method": "reconfigure", "params": params}).to_string().into_bytes()
            }),
            // A valid request with at most one field replaced: both outcomes are exercised.
            (proptest::option::of((0usize..6, field())), 1u8..200).prop_map(move |(edit, host)| {
                let mut p = json!({
                    "name": "clone-1",
                    "ip": format!("10.0.0.{host}/24"),
                    "gateway": "10.0.0.254",
                    "mac": "02:00:00:00:00:01",
                    "key": base64::Engine::encode(&base64::engine::general_purpose::STANDARD, KEY_LINE),
                });
                if let Some((k, v)) = edit {
                    p[names[k]] = v;
                }
                json!({"method": "reconfigure", "params": p}).to_string().into_bytes()
            }),
            jsonish(),
        ]
    }

    proptest! {
        #![proptest_config(config())]

        /// Any request line: one JSON answer, never a panic. Whatever reaches the guest passed
        /// validation, and the instance id changes exactly when the answer is ok.
        #[test]
        fn reconfigure_any_request(bytes in request()) {
            let count = Arc::new(Count::default());
            let env = AgentEnv {
                configurer: count.clone(),
                ..AgentEnv::fixed("b007", "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGposxU1u8AlmBpcq3yn+btS1uQymLutYq90E6gMTcpH", "vm")
            };
            let before = env.instance_id().unwrap();
            let line = String::from_utf8_lossy(&bytes).replace('\n', " ");
            let answer: Value = serde_json::from_str(&handle_line(&line, &env)).unwrap();
            let ok = answer["ok"].as_bool().unwrap();
            let applied = count.0.lock().unwrap().clone();
            if ok && answer["result"].get("instance_id").is_some() {
                prop_assert_eq!(applied.len(), 1);
                prop_assert_ne!(env.instance_id().unwrap(), before);
                let params: Reconfigure = serde_json::from_value(
                    serde_json::from_str::<Value>(&line).unwrap()["params"].clone(),
                ).unwrap();
                prop_assert_eq!(params.validate().unwrap(), applied[0].clone());
            } else {
                prop_assert!(applied.is_empty());
                prop_assert_eq!(env.instance_id().unwrap(), before);
            }
        }

        /// Validation never panics; what it accepts is in range.
        #[test]
        fn reconfigure_validation(name in "[ -~]{0,70}", ip in "[0-9./]{0,20}", gw in "[0-9.]{0,16}", mac in "[0-9a-fA-F:]{0,20}") {
            let r = Reconfigure { name, ip, gateway: gw, mac, key: base64::Engine::encode(&base64::engine::general_purpose::STANDARD, KEY_LINE) };
            if let Ok(v) = r.validate() {
                prop_assert!((8..=30).contains(&v.prefix));
                prop_assert!(v.ip.is_private());
                prop_assert!(v.gateway.is_private() && v.gateway != v.ip);
                prop_assert_eq!(v.mac.len(), 17);
            }
        }
    }
}
