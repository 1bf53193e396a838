//! The hostile corpus: 1,000 deterministic malformed job messages (see the parent module).

use serde_json::{json, Value};
use trainyard_common::{codec, JobSpec};

/// Number of malformed messages.
pub(super) const CORPUS: usize = 1000;
/// The worker's message size limit in this test.
pub(super) const LIMIT: usize = 64 * 1024;

/// xorshift64*: a small deterministic generator, so a failure reproduces.
pub(super) struct Rng(pub(super) u64);

impl Rng {
    pub(super) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub(super) fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    pub(super) fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// One malformed message: which queue it goes to, its body and content type.
pub(super) struct Hostile {
    pub(super) kind: &'static str,
    pub(super) queue: &'static str,
    pub(super) body: Vec<u8>,
    pub(super) content_type: Option<String>,
}

fn valid(job_type: &str, params: Value) -> JobSpec {
    let mut s = JobSpec::new(job_type, "hostile-bot", params, trainyard_common::Trigger::manual("hostile"));
    s.max_attempts = 1;
    s
}

pub(super) fn as_value(spec: &JobSpec) -> Value {
    serde_json::to_value(spec).unwrap()
}

pub(super) fn msgpack(v: &Value) -> Vec<u8> {
    codec::to_msgpack(v).unwrap()
}

pub(super) fn jsonb(v: &Value) -> Vec<u8> {
    serde_json::to_vec(v).unwrap()
}

/// A JSON object with one field replaced (or removed when `value` is `None`).
fn with_field(base: &JobSpec, field: &str, value: Option<Value>) -> Value {
    let mut v = as_value(base);
    match value {
        Some(x) => v[field] = x,
        None => {
            v.as_object_mut().unwrap().remove(field);
        }
    }
    v
}

/// `n` levels of `[[[...]]]` as msgpack (fixarray of one) around `0`.
fn deep_msgpack_params(n: usize) -> Vec<u8> {
    // A valid job as a msgpack map, whose `params` value is replaced by the nest.
    let spec = valid("noop", json!({}));
    let mut v = as_value(&spec);
    v.as_object_mut().unwrap().remove("params");
    let mut body = msgpack(&v);
    // Bump the map length by one (fixmap: 0x80 | len) and append `params`.
    assert!(body[0] & 0xf0 == 0x80 && body[0] < 0x8f, "expected a fixmap");
    body[0] += 1;
    body.extend_from_slice(&msgpack(&json!("params")));
    body.extend(std::iter::repeat_n(0x91u8, n));
    body.push(0x00);
    body
}

/// The i-th message of the corpus.
fn hostile(i: usize, rng: &mut Rng) -> Hostile {
    let noop = valid("noop", json!({"sleep_ms": 1}));
    let mp = Some(codec::MSGPACK.to_string());
    let js = Some(codec::JSON.to_string());
    let h = |kind, body, content_type: &Option<String>| Hostile { kind, queue: "noop", body, content_type: content_type.clone() };
    match i % 25 {
        0 => {
            let n = rng.below(300);
            h("random bytes", rng.bytes(n), &None)
        }
        1 => {
            let n = rng.below(300);
            h("random bytes as JSON", rng.bytes(n), &js)
        }
        2 => {
            let full = msgpack(&as_value(&noop));
            let cut = rng.below(full.len());
            h("truncated msgpack", full[..cut].to_vec(), &mp)
        }
        3 => {
            let full = jsonb(&as_value(&noop));
            let cut = rng.below(full.len());
            h("truncated JSON", full[..cut].to_vec(), &js)
        }
        4 => {
            let (field, value) = [
                ("job_id", json!(12345)),
                ("bot", json!(["a", "b"])),
                ("max_attempts", json!("three")),
                ("timeout_s", json!(-5)),
                ("params", json!("sleep_ms=5")),
                ("params", json!([1, 2])),
                ("params", Value::Null),
                ("trigger", json!("manual")),
                ("submitted_at", json!(1_700_000_000)),
                ("version", json!("one")),
            ][rng.below(10)]
            .clone();
            let v = with_field(&noop, field, Some(value));
            if rng.below(2) == 0 {
                h("wrong type", msgpack(&v), &mp)
            } else {
                h("wrong type", jsonb(&v), &js)
            }
        }
        5 => {
            // Huge strings that still fit under the limit.
            let big = "x".repeat(LIMIT - 2048);
            let field = ["bot", "job_id", "job_type"][rng.below(3)];
            h("huge string", msgpack(&with_field(&noop, field, Some(json!(big)))), &mp)
        }
        6 => {
            // Deep nesting: over the JSON parser's limit (128), and at/over msgpack's (1024).
            if rng.below(2) == 0 {
                let depth = 200 + rng.below(5000);
                let body = format!(
                    r#"{{"job_id":"{}","job_type":"noop","bot":"b","trigger":{{"kind":"manual"}},"submitted_at":"2026-01-01T00:00:00Z","params":{{"a":{}0{}}}}}"#,
                    noop.job_id,
                    "[".repeat(depth),
                    "]".repeat(depth)
                );
                h("deep nesting JSON", body.into_bytes(), &js)
            } else {
                h("deep nesting msgpack", deep_msgpack_params(1000 + rng.below(20_000)), &mp)
            }
        }
        7 => {
            // Unknown top-level and trigger fields are a newer minor version's, and read; unknown params are refused.
            let v = match rng.below(3) {
                0 => with_field(&noop, "params", Some(json!({"sleep_ms": 1, "rm_rf": "/"}))),
                1 => with_field(&noop, "params", Some(json!({"sleep_ms": 1, "sudo": true}))),
                _ => with_field(&noop, "params", Some(json!({"sleep_ms": 1, "priority": 9}))),
            };
            h("unknown param", if i.is_multiple_of(2) { msgpack(&v) } else { jsonb(&v) }, if i.is_multiple_of(2) { &mp } else { &js })
        }
        8 => {
            let id = ["", "not-a-uuid", "01936f5e-8c4a-7b2e-9d1f", "../../etc/passwd", "01936f5e-8c4a-7b2e-9d1f-3a5b7c9e1f2g", "\u{0}"]
                [rng.below(6)];
            h("bad uuid", jsonb(&with_field(&noop, "job_id", Some(json!(id)))), &js)
        }
        9 => {
            let version = [json!(0), json!(2), json!(99), json!(-1), json!(u64::MAX)][rng.below(5)].clone();
            h("bad version", msgpack(&with_field(&noop, "version", Some(version))), &mp)
        }
        10 => {
            let ct = ["text/plain", "application/xml", "application/octet-stream", "application/jsonx", "msgpack", "\u{1}"][rng.below(6)];
            h("foreign content type", msgpack(&as_value(&noop)), &Some(ct.to_string()))
        }
        11 => {
            let n = LIMIT + 1 + rng.below(64 * 1024);
            let mut body = jsonb(&as_value(&noop));
            body.resize(n, b' ');
            h("oversized", body, &js)
        }
        12 => {
            let mut body = jsonb(&with_field(&noop, "bot", Some(json!("bot-XX"))));
            let at = body.windows(2).position(|w| w == b"XX").unwrap();
            body[at] = 0xff;
            body[at + 1] = 0xfe;
            h("invalid UTF-8 in JSON", body, &js)
        }
        13 => {
            // A valid intent-train job published to the noop queue (and the other way round).
            if i.is_multiple_of(2) {
                h("job type mismatch", msgpack(&as_value(&valid("intent-train", json!({"dataset": "x.json"})))), &mp)
            } else {
                Hostile { kind: "job type mismatch", queue: "intent-train", body: msgpack(&as_value(&noop)), content_type: mp.clone() }
            }
        }
        14 => {
            let bot = ["", "../etc", ".hidden", "a/b", "bot name", "b\u{0}t", &"b".repeat(129)][rng.below(7)].to_string();
            h("bad bot name", jsonb(&with_field(&noop, "bot", Some(json!(bot)))), &js)
        }
        15 => {
            let (field, value) = [
                ("submitted_at", json!("yesterday")),
                ("submitted_at", json!("2026-13-45T99:00:00Z")),
                ("trigger", json!({"source": "no kind"})),
                ("max_attempts", json!(0)),
                ("max_attempts", json!(11)),
                ("timeout_s", json!(0)),
                ("timeout_s", json!(999_999_999)),
                ("job_type", json!("No Such Type")),
            ][rng.below(8)]
            .clone();
            h("schema violation", msgpack(&with_field(&noop, field, Some(value))), &mp)
        }
        16 => {
            let field = ["job_id", "job_type", "bot", "trigger", "submitted_at"][rng.below(5)];
            h("missing field", jsonb(&with_field(&noop, field, None)), &js)
        }
        17 => {
            let body: &[u8] = [&b""[..], b"null", b"[]", b"{}", b"\"job\"", b"NaN", b"\xef\xbb\xbf{}", b"{\"job_id\":"][rng.below(8)];
            h("not a job object", body.to_vec(), &js)
        }
        18 => {
            // Duplicate keys (a bot smuggled past a validator that reads the first).
            let s = String::from_utf8(jsonb(&as_value(&noop))).unwrap();
            let body = s.replacen("\"bot\":", "\"bot\":\"../x\",\"bot\":", 1);
            h("duplicate key", body.into_bytes(), &js)
        }
        19 => {
            let params = [
                json!({"sleep_ms": -1}),
                json!({"sleep_ms": "soon"}),
                json!({"sleep_ms": 1e300}),
                json!({"sleep_ms": 3_600_001}),
                json!({"fail": "sometimes"}),
                json!({"fail_until": -3}),
                json!({"sleep": 5}),
            ][rng.below(7)]
            .clone();
            h("bad noop params", msgpack(&as_value(&valid("noop", params))), &mp)
        }
        20 | 21 => {
            // Dataset paths that leave the data root, or name nothing.
            let dataset = [
                "../../../../etc/passwd",
                "/etc/passwd",
                "file:///etc/shadow",
                "file://host/etc/passwd",
                "clinc150/../../secret.json",
                "C:\\Windows\\win.ini",
                "",
                "escape/passwd",
                "escape",
                "no-such-dir/data.json",
            ][rng.below(10)];
            let params = match rng.below(3) {
                0 => json!({"dataset": dataset, "epochs": 1}),
                1 => json!({"dataset": "ok.json", "test_dataset": dataset, "epochs": 1}),
                _ => json!({"dataset": dataset}),
            };
            Hostile {
                kind: "dataset path",
                queue: "intent-train",
                body: msgpack(&as_value(&valid("intent-train", params))),
                content_type: mp.clone(),
            }
        }
        22 => {
            let params = [
                json!({}),
                json!({"dataset": 7}),
                json!({"dataset": "ok.json", "epochs": -1}),
                json!({"dataset": "ok.json", "epochs": "many"}),
                json!({"dataset": "ok.json", "epochs": 1_000_000_000u64}),
                json!({"dataset": "ok.json", "lr": -0.5}),
                json!({"dataset": "ok.json", "hidden": 0}),
                json!({"dataset": "ok.json", "device": "tpu:9"}),
                json!({"dataset": "ok.json", "batch_size": 0}),
                json!({"dataset": "ok.json", "shell": "rm -rf /"}),
            ][rng.below(10)]
            .clone();
            Hostile {
                kind: "bad intent params",
                queue: "intent-train",
                body: jsonb(&as_value(&valid("intent-train", params))),
                content_type: js.clone(),
            }
        }
        23 => {
            // Random bit flips in a valid job that still decode are fine (they are valid
            // jobs); keep only those that do not.
            let mut body = msgpack(&as_value(&noop));
            loop {
                let mut b = body.clone();
                for _ in 0..1 + rng.below(4) {
                    let at = rng.below(b.len());
                    b[at] ^= 1 << rng.below(8);
                }
                if codec::decode_job(Some(codec::MSGPACK), &b, LIMIT).is_err() {
                    body = b;
                    break;
                }
            }
            h("bit flips", body, &mp)
        }
        _ => {
            // msgpack of the wrong shape: a bare array, a map with integer keys, a string.
            let body = match rng.below(3) {
                0 => msgpack(&json!([1, 2, 3])),
                1 => vec![0x81, 0x01, 0x02],
                _ => msgpack(&json!("job")),
            };
            h("wrong msgpack shape", body, &mp)
        }
    }
}

pub(super) fn corpus() -> Vec<Hostile> {
    let mut rng = Rng(0x7261_696e_7961_7264);
    (0..CORPUS).map(|i| hostile(i, &mut rng)).collect()
}
