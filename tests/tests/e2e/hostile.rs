//! Hostile input: a deterministic corpus of 1,000 malformed job messages —
//! random bytes, truncated msgpack, wrong types, huge strings, deep nesting,
//! unknown params, bad UUIDs and versions, foreign content types, oversized
//! bodies, invalid UTF-8, job type mismatches, bad params and dataset paths
//! that try to leave the data root. Every one must end in a dead-letter queue
//! with a reason, the worker must stay up, and valid jobs after them must run.
//! Also: the params validation of every built-in job type, fed the same
//! corpus and random mutations of valid params, never panics.

use std::time::{Duration, Instant};

use lapin::BasicProperties;
use serde_json::{json, Value};
use trainyard::store::Store;
use trainyard_common::{artifacts::keys, codec, headers, JobSpec, JobStatus};

use crate::support::Env;

/// Number of malformed messages.
const CORPUS: usize = 1000;
/// The worker's message size limit in this test.
const LIMIT: usize = 64 * 1024;

/// xorshift64*: a small deterministic generator, so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// One malformed message: which queue it goes to, its body and content type.
struct Hostile {
    kind: &'static str,
    queue: &'static str,
    body: Vec<u8>,
    content_type: Option<String>,
}

fn valid(job_type: &str, params: Value) -> JobSpec {
    let mut s = JobSpec::new(job_type, "hostile-bot", params, trainyard_common::Trigger::manual("hostile"));
    s.max_attempts = 1;
    s
}

fn as_value(spec: &JobSpec) -> Value {
    serde_json::to_value(spec).unwrap()
}

fn msgpack(v: &Value) -> Vec<u8> {
    codec::to_msgpack(v).unwrap()
}

fn jsonb(v: &Value) -> Vec<u8> {
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

fn corpus() -> Vec<Hostile> {
    let mut rng = Rng(0x7261_696e_7961_7264);
    (0..CORPUS).map(|i| hostile(i, &mut rng)).collect()
}

/// 1,000 malformed messages on SQLite: see [`hostile_corpus`].
#[tokio::test]
async fn a_thousand_malformed_messages_are_dead_lettered_and_recorded_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    hostile_corpus(&format!("sqlite://{}/trainyard.db", dir.path().display())).await;
}

/// 1,000 malformed messages on PostgreSQL, which refuses NUL in text: see [`hostile_corpus`].
#[tokio::test]
async fn a_thousand_malformed_messages_are_dead_lettered_and_recorded_on_postgres() {
    let schema = crate::support::PgSchema::new().await;
    hostile_corpus(&schema.url).await;
    schema.drop().await;
}

/// 1,000 malformed messages: each is dead-lettered with a reason, the worker
/// lives on, and valid jobs published after them succeed; the recorder lists every
/// one (`trainyard dlq list`), its queue drains, and a valid dead letter published
/// after them is recorded within seconds; nothing is written outside the data root.
async fn hostile_corpus(db_url: &str) {
    let env = Env::new(&["noop", "intent-train"]).await;
    env.topo.declare_shared(&env.ch).await.unwrap();
    let store = Store::open(db_url).await.unwrap();
    let recorder = trainyard::recorder::Recorder::new(store.clone(), env.topo.clone(), crate::support::URL, None);
    let stop_recorder = tokio_util::sync::CancellationToken::new();
    let recorder_task = tokio::spawn({
        let stop = stop_recorder.clone();
        async move { recorder.run(stop).await }
    });
    // What the data root's parent holds before: nothing may be written outside the root.
    let outside = tempfile::tempdir().unwrap();
    // A data root with a symlink that points out of it, and one good file name.
    let data = tempfile::tempdir_in(outside.path()).unwrap();
    std::os::unix::fs::symlink("/etc", data.path().join("escape")).unwrap();

    std::fs::write(data.path().join("ok.json"), "{}").unwrap();
    let data_dir = data.path().to_path_buf();
    let w = env.spawn_worker(&["noop", "intent-train"], move |c| {
        c.max_message_bytes = LIMIT;
        c.concurrency = 8;
        c.data_dir = data_dir;
    });
    let t0 = Instant::now();
    let corpus = corpus();
    let mut sent = [0usize; 2];
    for m in &corpus {
        let mut props = BasicProperties::default();
        if let Some(ct) = &m.content_type {
            props = props.with_content_type(ct.as_str().into());
        }
        env.publish_raw(m.queue, &m.body, props).await;
        sent[usize::from(m.queue == "intent-train")] += 1;
    }
    // Valid jobs after the corpus still run.
    let good: Vec<JobSpec> = (0..5).map(|_| env.spec("noop", json!({"sleep_ms": 1}))).collect();
    for spec in &good {
        let events = env.run_job(spec, Duration::from_secs(120)).await;
        assert_eq!(events.last().unwrap().status, JobStatus::Succeeded, "a valid job after the corpus");
    }
    // Jobs of a newer minor version (a field, a trigger field and kind this build does not know) run.
    for (i, content_type) in [codec::JSON, codec::MSGPACK].into_iter().enumerate() {
        let spec = env.spec("noop", json!({"sleep_ms": 1}));
        let mut v = as_value(&spec);
        v["version"] = json!(format!("1.{}", i + 1));
        v["priority"] = json!(7);
        v["trigger"] = json!({"kind": "webhook", "source": "ci", "signed": true});
        let body = if content_type == codec::JSON { jsonb(&v) } else { msgpack(&v) };
        let mut watch = env.watch(&spec).await;
        env.publish_raw("noop", &body, BasicProperties::default().with_content_type(content_type.into())).await;
        let events = crate::support::collect_until_terminal(&mut watch, Duration::from_secs(60)).await;
        assert_eq!(events.last().unwrap().status, JobStatus::Succeeded, "a job of version 1.{} with unknown fields", i + 1);
    }
    // Every malformed message reaches a dead-letter queue.
    let (dq_noop, dq_intent) = (env.topo.dead_queue("noop"), env.topo.dead_queue("intent-train"));
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let n = (env.ready(&dq_noop).await as usize, env.ready(&dq_intent).await as usize);
        if n.0 + n.1 >= CORPUS || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(!w.join.is_finished(), "the worker is still running");
    let mut letters = drain_letters(&env, &dq_noop).await;
    let n_noop = letters.len();
    letters.extend(drain_letters(&env, &dq_intent).await);
    let dead: Vec<(Vec<u8>, Option<String>)> =
        letters.iter().map(|(_, h, body)| (body.clone(), headers::string(h.as_ref(), headers::DEAD_REASON))).collect();
    assert_eq!((n_noop, dead.len() - n_noop), (sent[0], sent[1]), "every malformed message is dead-lettered, per queue");
    assert_eq!(env.ready(&env.topo.jobs_queue("noop")).await + env.ready(&env.topo.jobs_queue("intent-train")).await, 0);
    for (body, reason) in &dead {
        let reason = reason.as_deref().unwrap_or("");
        assert!(!reason.is_empty(), "a dead letter without a reason: {:?}", String::from_utf8_lossy(&body[..body.len().min(200)]));
    }
    // The reasons say what was wrong.
    let reasons: Vec<&str> = dead.iter().filter_map(|d| d.1.as_deref()).collect();
    for needle in [
        "oversized",
        "content_type",
        "does not match",
        "not a UUID",
        "schema version",
        "unknown",
        "leaves its root",
        "absolute",
        "outside its root",
    ] {
        assert!(reasons.iter().any(|r| r.contains(needle)), "no dead-letter reason mentions {needle:?}");
    }
    // Nothing was written outside the data root (its parent holds only the root) nor into it;
    // the good jobs' outcomes exist.
    let beside: Vec<_> = std::fs::read_dir(outside.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(beside, vec![data.path().file_name().unwrap().to_owned()], "written beside the data root");
    let mut inside = dir_listing(data.path());
    inside.sort();
    assert_eq!(inside, ["escape", "ok.json"], "written into the data root");
    for spec in &good {
        assert!(env.artifacts.exists(&keys::outcome(&spec.job_id)).await.unwrap());
    }
    // The recorder lists every letter (hostile ones included, as received), and its queue drains.
    let expected: std::collections::BTreeSet<String> =
        letters.iter().map(|(ct, h, body)| trainyard::recorder::dead_letter(ct.as_deref(), h.as_ref(), "noop", body).0.id).collect();
    let listed_ids = |v: &Value| -> std::collections::BTreeSet<String> {
        v.as_array().unwrap().iter().map(|d| d["id"].as_str().unwrap().to_string()).collect()
    };
    // Polled every 5 s and for up to 300 s: each `dlq list` is a process that opens the store, and
    // in the whole test suite on 2 cores only ~80 of 930 letters were listed after 120 s of 500 ms
    // polling (the test alone passes in ~95 s); why the recorder is that slow under load is not known.
    let deadline = Instant::now() + Duration::from_secs(300);
    let listed = loop {
        let listed = listed_ids(&dlq_list(db_url, &env).await);
        if expected.iter().all(|id| listed.contains(&trainyard::store::escape_text(id))) || Instant::now() > deadline {
            break listed;
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
    };
    let missing: Vec<&String> = expected.iter().filter(|id| !listed.contains(&trainyard::store::escape_text(id))).collect();
    assert!(
        missing.is_empty(),
        "{} of {} dead letters not listed, e.g. {:?}",
        missing.len(),
        expected.len(),
        &missing[..missing.len().min(3)]
    );
    let recorder_q = env.topo.dead_recorder_queue();
    let deadline = Instant::now() + Duration::from_secs(30);
    while env.ready(&recorder_q).await > 0 {
        assert!(Instant::now() < deadline, "{recorder_q} does not drain");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A valid dead letter published after the corpus is recorded within seconds.
    let late = env.spec("noop", json!({"sleep_ms": 1}));
    let mut h = lapin::types::FieldTable::default();
    headers::set_str(&mut h, headers::DEAD_REASON, "late and valid");
    headers::set_str(&mut h, headers::DEAD_KIND, "permanent");
    let props = BasicProperties::default().with_content_type(codec::MSGPACK.into()).with_headers(h);
    trainyard_common::amqp::publish_confirmed(&env.ch, &env.topo.dead_exchange(), "noop", &codec::to_msgpack(&late).unwrap(), props, false)
        .await
        .unwrap();
    let t_late = Instant::now();
    loop {
        if store.dead_letters(None).await.unwrap().iter().any(|d| d.id == late.job_id) {
            break;
        }
        assert!(t_late.elapsed() < Duration::from_secs(10), "a valid dead letter after the corpus is not recorded within 10 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("{} distinct dead letters listed; a later valid one recorded in {:.2}s", expected.len(), t_late.elapsed().as_secs_f64());
    stop_recorder.cancel();
    recorder_task.await.unwrap();
    store.close().await;
    eprintln!("{} malformed messages dead-lettered in {:.1}s", dead.len(), t0.elapsed().as_secs_f64());
    // The corpus covers every kind.
    let kinds: std::collections::BTreeSet<&str> = corpus.iter().map(|m| m.kind).collect();
    assert!(kinds.len() >= 24, "{kinds:?}");
    w.stop().await;
    env.cleanup().await;
}

/// Every message of `queue`: (content type, headers, body).
async fn drain_letters(env: &Env, queue: &str) -> Vec<(Option<String>, Option<lapin::types::FieldTable>, Vec<u8>)> {
    let ch = env.conn.create_channel().await.unwrap();
    let mut out = Vec::new();
    while let Some(msg) = ch.basic_get(queue.into(), lapin::options::BasicGetOptions { no_ack: false }).await.unwrap() {
        let p = &msg.delivery.properties;
        out.push((p.content_type().as_ref().map(|c| c.to_string()), p.headers().clone(), msg.delivery.data.clone()));
        msg.delivery.acker.ack(lapin::options::BasicAckOptions::default()).await.unwrap();
    }
    out
}

/// `trainyard dlq list --json` on `db_url`.
async fn dlq_list(db_url: &str, env: &Env) -> Value {
    let out = tokio::process::Command::new(crate::support::bin("trainyard"))
        .args(["dlq", "list", "--json"])
        .env("TRAINYARD_DATABASE_URL", db_url)
        .env("TRAINYARD_ARTIFACTS", env.artifacts_dir.path())
        .env("TRAINYARD_PREFIX", env.topo.prefix())
        .env("TRAINYARD_AMQP_URL", crate::support::URL)
        .env_remove("TRAINYARD_SERVER")
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "trainyard dlq list: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The names in a directory (not following symlinks into it).
fn dir_listing(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

/// The params validation of every built-in job type, fed the params of the
/// corpus and random mutations of valid params, returns an error or Ok — it
/// never panics (a stable-toolchain complement to the `cargo fuzz` targets).
#[test]
fn params_validation_never_panics() {
    let registry = trainyard_worker::handlers::builtin();
    let types = registry.job_types();
    let mut rng = Rng(42);
    let mut inputs: Vec<Value> = corpus()
        .iter()
        .filter_map(|m| codec::decode::<Value>(m.content_type.as_deref(), &m.body).ok())
        .filter_map(|v| v.get("params").cloned())
        .collect();
    let seeds = [
        json!({"sleep_ms": 5, "fail": "transient", "fail_until": 2}),
        json!({"dataset": "clinc150/data_small.json", "epochs": 3, "lr": 0.002, "seed": 7, "test_dataset": "x.csv"}),
        json!({"dataset": "d.csv", "format": "csv", "text_column": "t", "label_column": "l", "gate": {"min_accuracy": 0.8}}),
    ];
    let atoms = [
        Value::Null,
        json!(-1),
        json!(0),
        json!(u64::MAX),
        json!(1e308),
        json!(-0.0),
        json!(""),
        json!("../../etc/passwd"),
        json!("/abs"),
        json!([]),
        json!({}),
        json!(true),
        json!("cuda:99999999999"),
    ];
    for _ in 0..5000 {
        let mut v = seeds[rng.below(seeds.len())].clone();
        let obj = v.as_object_mut().unwrap();
        for _ in 0..1 + rng.below(3) {
            let keys: Vec<String> = obj.keys().cloned().collect();
            let key = if rng.below(4) == 0 { format!("k{}", rng.below(5)) } else { keys[rng.below(keys.len())].clone() };
            if rng.below(5) == 0 {
                obj.remove(&key);
            } else {
                obj.insert(key, atoms[rng.below(atoms.len())].clone());
            }
        }
        inputs.push(v);
    }
    inputs.extend(atoms.iter().cloned());
    let mut accepted = 0;
    for p in &inputs {
        for t in &types {
            let h = registry.get(t).unwrap();
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| h.validate(p))).expect("validate panicked").is_ok() {
                accepted += 1;
            }
        }
    }
    assert!(accepted > 0 && accepted < inputs.len() * types.len(), "{accepted} of {} accepted", inputs.len() * types.len());
}
