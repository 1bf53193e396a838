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

mod corpus;
use corpus::{as_value, corpus, jsonb, msgpack, Rng, CORPUS, LIMIT};

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

/// `trainyard dlq list --json` on `db_url`, in one page of the most a page holds.
async fn dlq_list(db_url: &str, env: &Env) -> Value {
    let out = tokio::process::Command::new(crate::support::bin("trainyard"))
        .args(["dlq", "list", "--json", "--limit", "10000"])
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

/// A message whose headers fill the frame but for a hundred bytes: the worker's dead letter of
/// it carries only trainyard's headers and a note of what it dropped, so its header frame fits.
/// (The copy carried all of them plus the reason: 131,394 bytes, over the 131,072 a client
/// takes. The broker routed it, and every consumer it reached lost its connection on "frame
/// too large": here the test's own `submit --wait`-style watch; in a control plane, the
/// dead-letter recorder, on each delivery of it.)
#[tokio::test]
async fn a_message_with_headers_that_fill_the_frame_is_dead_lettered_by_the_worker() {
    let env = Env::new(&["noop"]).await;
    let w = env.spawn_worker(&["noop"], |_| {});
    let mut filler = lapin::types::FieldTable::default();
    headers::set_str(&mut filler, "x-filler", "f".repeat(130_950));
    let props = BasicProperties::default().with_content_type(codec::MSGPACK.into()).with_headers(filler);
    env.publish_raw("noop", b"\xc1 not msgpack", props).await;
    let after = env.spec("noop", json!({"sleep_ms": 1}));
    let events = env.run_job(&after, Duration::from_secs(60)).await;
    assert_eq!(events.last().unwrap().status, JobStatus::Succeeded);
    let dead = env.topo.dead_queue("noop");
    let ch = env.conn.create_channel().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let letter = loop {
        let got = ch.basic_get(dead.as_str().into(), lapin::options::BasicGetOptions { no_ack: true }).await.unwrap();
        match got {
            Some(letter) => break letter,
            None if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(200)).await,
            None => panic!("no dead letter in {dead}"),
        }
    };
    let hdrs = letter.delivery.properties.headers().as_ref();
    assert_eq!(headers::string(hdrs, headers::DEAD_KIND).as_deref(), Some("poison"), "dead-lettered by the worker, not the broker");
    assert!(headers::string(hdrs, headers::HEADERS_DROPPED).is_some() && headers::string(hdrs, "x-filler").is_none());
    assert_eq!(headers::delivery_count(hdrs), 0, "never redelivered: the session was not lost");
    w.stop().await;
    env.cleanup().await;
}

/// A message published with a per-message `expiration` keeps its dead letter: the worker's copy
/// goes without the expiration (the broker drops it from its own dead letters too). The copy
/// kept it, and expired from the dead-letter queue, which has no dead-letter exchange, before
/// anyone could replay it or, with the control plane down that long, record it.
#[tokio::test]
async fn a_dead_letter_outlives_its_messages_expiration() {
    let env = Env::new(&["noop"]).await;
    let w = env.spawn_worker(&["noop"], |_| {});
    let props = BasicProperties::default().with_content_type(codec::MSGPACK.into()).with_expiration("3000".into());
    env.publish_raw("noop", b"\xc1 not msgpack", props).await;
    let dead = env.topo.dead_queue("noop");
    let deadline = Instant::now() + Duration::from_secs(30);
    while env.ready(&dead).await == 0 {
        assert!(Instant::now() < deadline, "no dead letter in {dead}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(env.ready(&dead).await, 1, "the dead letter is still there after the message's expiration");
    // The worker's letter, not one the broker made when the message expired before the worker took it.
    let ch = env.conn.create_channel().await.unwrap();
    let letter = ch.basic_get(dead.as_str().into(), lapin::options::BasicGetOptions { no_ack: true }).await.unwrap().unwrap();
    let props = &letter.delivery.properties;
    assert_eq!(headers::string(props.headers().as_ref(), headers::DEAD_KIND).as_deref(), Some("poison"), "the worker's letter");
    assert_eq!(props.expiration(), &None);
    w.stop().await;
    env.cleanup().await;
}
