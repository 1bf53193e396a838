//! Intent training end to end on small synthetic data: accuracy, artifacts,
//! checkpoint → kill → resume, promotion gate and history, malformed datasets,
//! path confinement, `intent-eval`, the local `train` CLI.

use std::path::Path;

use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use trainyard_common::{artifacts::ArtifactStore, models, ErrorKind, JobSpec, Trigger, WorkerInfo};
use trainyard_worker::{
    handler::{JobContext, JobError, JobHandler, Progress},
    intent::{
        env::RunEnv,
        metrics::{ClassMetrics, Metrics},
        params::TrainParams,
        pipeline::train_job,
        promotion::{decide, GateRules},
        IntentEval, IntentTrain,
    },
};

const INTENTS: &[(&str, &[&str])] = &[
    ("balance", &["balance", "account", "money", "funds", "much", "left"]),
    ("transfer", &["transfer", "send", "move", "wire", "pay", "recipient"]),
    ("weather", &["weather", "rain", "sunny", "forecast", "temperature", "umbrella"]),
    ("alarm", &["alarm", "wake", "clock", "morning", "remind", "ring"]),
    ("music", &["music", "song", "play", "playlist", "album", "volume"]),
];
const FILLER: &[&str] = &["please", "can", "you", "i", "want", "to", "the", "my", "now", "tell", "me", "what", "is"];
const OTHER: &[&str] = &["pizza", "dinosaur", "poem", "football", "galaxy", "recipe", "painting", "movie", "robot", "ocean"];

/// A tiny deterministic generator (no shared RNG state between tests).
struct Lcg(u64);
impl Lcg {
    fn next(&mut self, n: usize) -> usize {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((self.0 >> 33) % n as u64) as usize
    }
}

/// `per_class` utterances per intent plus as many out-of-scope ones, as CSV rows.
pub(super) fn synthetic_rows(per_class: usize, seed: u64) -> Vec<(String, String)> {
    let mut rng = Lcg(seed);
    let mut rows = Vec::new();
    for i in 0..per_class {
        for (label, words) in INTENTS {
            let mut w: Vec<&str> = (0..3).map(|_| FILLER[rng.next(FILLER.len())]).collect();
            w.insert(rng.next(w.len() + 1), words[rng.next(words.len())]);
            w.insert(rng.next(w.len() + 1), words[rng.next(words.len())]);
            rows.push((w.join(" "), label.to_string()));
        }
        let mut w: Vec<&str> = (0..3).map(|_| FILLER[rng.next(FILLER.len())]).collect();
        w.insert(rng.next(w.len() + 1), OTHER[(i + rng.next(OTHER.len())) % OTHER.len()]);
        rows.push((w.join(" "), "oos".to_string()));
    }
    rows
}

pub(super) fn write_csv(dir: &Path, name: &str, rows: &[(String, String)]) {
    let mut s = String::from("text,label\n");
    for (t, l) in rows {
        s.push_str(&format!("{t},{l}\n"));
    }
    std::fs::write(dir.join(name), s).unwrap();
}

pub(super) struct Fixture {
    pub(super) data: tempfile::TempDir,
    pub(super) store: ArtifactStore,
}

pub(super) fn fixture() -> Fixture {
    let data = tempfile::tempdir().unwrap();
    write_csv(data.path(), "bank.csv", &synthetic_rows(40, 1));
    Fixture { data, store: ArtifactStore::open("memory://").unwrap() }
}

pub(super) fn spec(job_id: &str, job_type: &str, bot: &str, params: Value) -> JobSpec {
    JobSpec {
        version: Default::default(),
        job_id: job_id.into(),
        job_type: job_type.into(),
        bot: bot.into(),
        params,
        trigger: Trigger::manual("test"),
        submitted_at: chrono::Utc::now(),
        max_attempts: 3,
        timeout_s: 600,
        idempotency_key: None,
        priority: Default::default(),
        coalesce_key: None,
    }
}

pub(super) fn ctx(f: &Fixture, spec: JobSpec, redelivery: u32) -> (JobContext, tokio::sync::mpsc::UnboundedReceiver<Value>) {
    let (progress, rx) = Progress::channel();
    let ctx = JobContext {
        spec,
        attempt: 1,
        run: 0,
        redelivery,
        artifacts: f.store.clone(),
        data_dir: f.data.path().to_path_buf(),
        cancel: CancellationToken::new(),
        progress,
        worker: WorkerInfo { id: "worker-under-test".into(), ..WorkerInfo::default() },
        slot: Default::default(),
    };
    (ctx, rx)
}

pub(super) fn params(extra: Value) -> Value {
    let mut p = json!({"dataset": "bank.csv", "epochs": 8, "seed": 3, "hidden": 32, "batch_size": 16, "lr": 0.01, "patience": 10});
    p.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    p
}

pub(super) async fn train(f: &Fixture, job_id: &str, bot: &str, p: Value) -> Result<Value, JobError> {
    let (c, _rx) = ctx(f, spec(job_id, "intent-train", bot, p), 0);
    IntentTrain::default().run(c).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synthetic_data_trains_to_high_accuracy_with_all_artifacts() {
    let f = fixture();
    let (c, mut rx) = ctx(&f, spec("job-a", "intent-train", "bank", params(json!({}))), 0);
    let res = IntentTrain::default().run(c).await.unwrap();
    assert!(res["accuracy"].as_f64().unwrap() >= 0.9, "{res:#}");
    assert!(res["in_scope_accuracy"].as_f64().unwrap() >= 0.9, "{res:#}");
    assert!(res["oos_recall"].is_f64());
    assert_eq!(res["resumed_from_epoch"], Value::Null);
    assert_eq!(res["promotion"]["promoted"], true, "first model of a bot that meets the minimum is promoted");
    // One progress event per epoch, with the contract's fields.
    let mut epochs = Vec::new();
    while let Ok(p) = rx.try_recv() {
        for k in ["epoch", "epochs", "loss", "val_accuracy", "examples_per_s"] {
            assert!(p.get(k).is_some(), "progress lacks {k}: {p}");
        }
        epochs.push(p["epoch"].as_u64().unwrap());
    }
    assert_eq!(epochs, (1..=res["epochs_run"].as_u64().unwrap()).collect::<Vec<_>>());
    // Artifacts.
    let m: Value = f.store.get_json("jobs/job-a/metrics.json").await.unwrap().unwrap();
    for k in ["accuracy", "macro_f1", "per_class", "in_scope_accuracy", "oos_recall", "top_confusions"] {
        assert!(m.get(k).is_some(), "metrics.json lacks {k}");
    }
    // The test rows are the content holdout of the file's rows (about 20% of each label).
    let rows: Vec<_> = synthetic_rows(40, 1).into_iter().map(|(t, l)| trainyard_worker::intent::dataset::Example::new(t, l)).collect();
    let held = trainyard_worker::intent::dataset::content_holdout(rows, 0.2).1;
    let support = m["per_class"]["balance"]["support"].as_u64().unwrap() as usize;
    assert_eq!(support, held.iter().filter(|e| e.label == "balance").count());
    assert_eq!(res["test_examples"].as_u64().unwrap() as usize, held.len());
    let cm: Value = f.store.get_json("jobs/job-a/confusion_matrix.json").await.unwrap().unwrap();
    assert_eq!(cm["labels"].as_array().unwrap().len(), 6);
    let png = f.store.get("jobs/job-a/confusion_matrix.png").await.unwrap().unwrap();
    assert_eq!(&png[..4], b"\x89PNG");
    for k in ["model/model.bin", "model/config.json", "training.log", "training_log.json", "promotion.json", "checkpoints/latest.ckpt"] {
        assert!(f.store.exists(&format!("jobs/job-a/{k}")).await.unwrap(), "{k} missing");
    }
    assert_eq!(res["artifacts"]["confusion_matrix_png"], "jobs/job-a/confusion_matrix.png");
    let prod = models::production(&f.store, "bank").await.unwrap().unwrap();
    assert_eq!((prod.job_id.as_str(), prod.model.as_str()), ("job-a", "jobs/job-a/model"));
    // Delivered again after its promotion (its outcome not recorded): the gate says the only
    // production model is the job's own, not that the bot has none.
    let (c, _rx) = ctx(&f, spec("job-a", "intent-train", "bank", params(json!({}))), 1);
    let again = IntentTrain::default().run(c).await.unwrap();
    let reasons = again["promotion"]["reasons"].to_string();
    assert!(reasons.contains("this job's own") && !reasons.contains("first model"), "{reasons}");

    // intent-eval of the production model on the same data gives the same test metrics.
    let (c, _rx) = ctx(&f, spec("eval-1", "intent-eval", "bank", json!({"dataset": "bank.csv"})), 0);
    let ev = IntentEval.run(c).await.unwrap();
    assert_eq!(ev["model_job_id"], "job-a");
    assert!(ev["accuracy"].as_f64().unwrap() >= 0.85, "{ev:#}");
    assert!(f.store.exists("jobs/eval-1/confusion_matrix.png").await.unwrap());
    let (c, _rx) = ctx(&f, spec("eval-2", "intent-eval", "bank", json!({"dataset": "bank.csv", "model": "nope"})), 0);
    assert_eq!(IntentEval.run(c).await.unwrap_err().kind, ErrorKind::Permanent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoint_kill_resume_matches_an_uninterrupted_run() {
    let f = fixture();
    let p = params(json!({"epochs": 6, "promote": "manual"}));
    let full = train(&f, "full", "bank", p.clone()).await.unwrap();
    assert_eq!(full["epochs_run"], 6);

    // Crash after epoch 3's checkpoint (the run stops at the next batch, as on a kill).
    let tp = TrainParams::parse(&p).unwrap();
    let (progress, _rx) = Progress::channel();
    let mut env = RunEnv::new(
        f.store.clone(),
        "jobs/cut",
        Some(f.store.clone()),
        f.data.path().to_path_buf(),
        "cut",
        "bank",
        CancellationToken::new(),
        progress,
        tokio::runtime::Handle::current(),
    );
    env.stop_after_epoch = Some(3);
    let err = tokio::task::spawn_blocking(move || train_job(&env, &tp)).await.unwrap().unwrap_err();
    assert_eq!(err.kind, ErrorKind::Cancelled, "{err:?}");
    let meta: Value = f.store.get_json("jobs/cut/checkpoints/latest.json").await.unwrap().unwrap();
    assert_eq!(meta["epoch"], 3);

    // Redelivery of the same job id resumes from epoch 3, not from scratch.
    let (c, mut rx) = ctx(&f, spec("cut", "intent-train", "bank", p.clone()), 1);
    let resumed = IntentTrain::default().run(c).await.unwrap();
    assert_eq!(resumed["resumed_from_epoch"], 3, "{resumed:#}");
    let mut seen = Vec::new();
    while let Ok(p) = rx.try_recv() {
        seen.push(p["epoch"].as_u64().unwrap());
    }
    assert_eq!(seen, vec![4, 5, 6], "only the remaining epochs run");
    assert_eq!(resumed["epochs_run"], 6, "the log carries all epochs");
    let (a, b) = (full["accuracy"].as_f64().unwrap(), resumed["accuracy"].as_f64().unwrap());
    assert!((a - b).abs() <= 0.005, "resumed accuracy {b} vs uninterrupted {a}");
    let la: Value = f.store.get_json("jobs/full/training_log.json").await.unwrap().unwrap();
    let lb: Value = f.store.get_json("jobs/cut/training_log.json").await.unwrap().unwrap();
    let losses = |l: &Value| l.as_array().unwrap().iter().map(|e| e["loss"].as_f64().unwrap()).collect::<Vec<_>>();
    let (la, lb) = (losses(&la), losses(&lb));
    for (x, y) in la.iter().zip(&lb) {
        assert!((x - y).abs() < 1e-6, "same seed, same trajectory: {la:?} vs {lb:?}");
    }
    // promote=manual: passed but not promoted.
    assert_eq!(resumed["promotion"]["promoted"], false);
    assert!(models::production(&f.store, "bank").await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancellation_stops_training() {
    let f = fixture();
    let (c, _rx) = ctx(&f, spec("cancel", "intent-train", "bank", params(json!({"epochs": 50}))), 0);
    c.cancel.cancel();
    let err = IntentTrain::default().run(c).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Cancelled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gate_rejects_a_worse_model_and_rollback_restores() {
    let f = fixture();
    let good = train(&f, "good", "bank", params(json!({}))).await.unwrap();
    assert_eq!(good["promotion"]["promoted"], true);
    // One epoch with a tiny learning rate: far worse than production.
    let bad = train(&f, "bad", "bank", params(json!({"epochs": 1, "lr": 0.00001, "gate": {"min_accuracy": 0.0}}))).await.unwrap();
    assert_eq!(bad["promotion"]["passed"], false, "{bad:#}");
    assert_eq!(bad["promotion"]["production_job_id"], "good");
    let reasons = bad["promotion"]["reasons"].to_string();
    assert!(reasons.contains("FAIL: accuracy") && reasons.contains("production (good)"), "{reasons}");
    assert_eq!(models::production(&f.store, "bank").await.unwrap().unwrap().job_id, "good");
    // A by-hand promotion then a rollback.
    models::promote_job(&f.store, "bank", "bad", "operator override").await.unwrap();
    assert_eq!(models::production(&f.store, "bank").await.unwrap().unwrap().job_id, "bad");
    let back = models::rollback(&f.store, "bank", "bad model", Some("bad")).await.unwrap().unwrap();
    assert_eq!(back.job_id, "good");
    assert_eq!(models::history(&f.store, "bank").await.unwrap().records.len(), 3);
}

fn metrics(acc: f64, recalls: &[(&str, f64)]) -> Metrics {
    Metrics {
        accuracy: acc,
        macro_f1: acc,
        per_class: recalls.iter().map(|(l, r)| (l.to_string(), ClassMetrics { precision: *r, recall: *r, f1: *r, support: 10 })).collect(),
        in_scope_accuracy: None,
        oos_recall: None,
        test_examples: 10 * recalls.len(),
        top_confusions: vec![],
        device: None,
        model: None,
    }
}

#[test]
fn promotion_rules_table() {
    let rules = GateRules { min_accuracy: 0.8, tolerance: 0.01, max_recall_drop: 0.1, min_support: 5 };
    let prod = metrics(0.90, &[("a", 0.9), ("b", 0.9)]);
    #[rustfmt::skip]
    let cases: &[(&str, Metrics, bool, bool)] = &[
        // name, candidate, with production?, passes?
        ("first model above minimum", metrics(0.85, &[("a", 0.85), ("b", 0.85)]), false, true),
        ("first model below minimum", metrics(0.75, &[("a", 0.75), ("b", 0.75)]), false, false),
        ("better than production", metrics(0.93, &[("a", 0.93), ("b", 0.93)]), true, true),
        ("slightly worse, within tolerance", metrics(0.895, &[("a", 0.89), ("b", 0.9)]), true, true),
        ("worse than tolerance", metrics(0.88, &[("a", 0.88), ("b", 0.88)]), true, false),
        ("better overall but one class collapses", metrics(0.95, &[("a", 0.99), ("b", 0.75)]), true, false),
        ("class drop exactly at the limit", metrics(0.91, &[("a", 0.95), ("b", 0.8)]), true, true),
        ("label missing in candidate", metrics(0.91, &[("a", 0.95)]), true, false),
        ("above production but below minimum", metrics(0.79, &[("a", 0.79), ("b", 0.79)]), false, false),
    ];
    for (name, cand, with_prod, passes) in cases {
        let d = decide(&rules, cand, with_prod.then_some(("prod", &prod)));
        assert_eq!(d.passed, *passes, "{name}: {:?}", d.reasons);
        assert_eq!(d.reasons.iter().any(|r| r.starts_with("FAIL")), !passes, "{name}: {:?}", d.reasons);
        assert_eq!(d.production_job_id.is_some(), *with_prod, "{name}");
    }
}

async fn permanent_message(f: &Fixture, p: Value) -> String {
    let err = train(f, "bad-data", "bank", p).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::Permanent, "{err:?}");
    err.message
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_datasets_are_permanent_errors_with_line_numbers() {
    let f = fixture();
    let d = f.data.path();
    std::fs::write(d.join("bad_row.csv"), "text,label\nhello,greet\nbye,bye\ntoo,many,fields\n").unwrap();
    std::fs::write(d.join("empty_text.csv"), "text,label\nhello,greet\n,bye\n").unwrap();
    std::fs::write(d.join("header_only.csv"), "text,label\n").unwrap();
    std::fs::write(d.join("one_class.csv"), "text,label\nhello,greet\nhi,greet\nhey,greet\nyo,greet\nhowdy,greet\n").unwrap();
    std::fs::write(d.join("bad.jsonl"), "{\"text\":\"hi\",\"intent\":\"greet\"}\n{\"text\":\"bye\",\"intent\":\"bye\"}\n{not json\n")
        .unwrap();
    std::fs::write(d.join("missing_field.jsonl"), "{\"text\":\"hi\",\"intent\":\"greet\"}\n{\"text\":\"bye\"}\n").unwrap();
    std::fs::write(d.join("bad.json"), "{\"train\": [[\"hi\", \"greet\"],\n [\"bye\"]]}").unwrap();
    std::fs::write(d.join("other_labels.csv"), "text,label\nhello there,greet\nsee you,bye\n").unwrap();
    std::fs::write(d.join("wrong_columns.csv"), "utterance,intent\nhi,greet\n").unwrap();
    let cases: &[(Value, &[&str])] = &[
        (json!({"dataset": "bad_row.csv"}), &["bad_row.csv", "line 4"]),
        (json!({"dataset": "empty_text.csv"}), &["line 3", "empty text"]),
        (json!({"dataset": "header_only.csv"}), &["training set is empty"]),
        (json!({"dataset": "one_class.csv"}), &["single class", "greet"]),
        (json!({"dataset": "bad.jsonl"}), &["bad.jsonl", "line 3"]),
        (json!({"dataset": "missing_field.jsonl"}), &["line 2", "intent"]),
        (json!({"dataset": "bad.json"}), &["bad.json", "line 2"]),
        (json!({"dataset": "bank.csv", "test_dataset": "other_labels.csv"}), &["not in the training set", "bye", "greet"]),
        (json!({"dataset": "wrong_columns.csv"}), &["line 1", "text_column"]),
        (json!({"dataset": "wrong_columns.csv", "text_column": "utterance", "label_column": "intent"}), &["single class"]),
        (json!({"dataset": "nope.csv"}), &["not found"]),
        (json!({"dataset": "bank.csv", "format": "jsonl"}), &["line 1", "not a JSON object"]),
        // A threshold for an out-of-scope label the data does not have was dropped in silence.
        (json!({"dataset": "bank.csv", "oos_threshold": 0.5, "oos_label": "OOS"}), &["oos_threshold", "\"OOS\""]),
    ];
    for (p, needles) in cases {
        let msg = permanent_message(&f, p.clone()).await;
        for n in *needles {
            assert!(msg.contains(n), "{p}: {msg:?} should mention {n:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_outside_the_data_root_and_bad_params_are_refused() {
    let f = fixture();
    let outside = tempfile::tempdir().unwrap();
    write_csv(outside.path(), "secret.csv", &synthetic_rows(5, 2));
    #[cfg(unix)]
    std::os::unix::fs::symlink(outside.path(), f.data.path().join("link")).unwrap();
    let abs = outside.path().join("secret.csv").display().to_string();
    let bad: Vec<Value> = vec![
        json!({"dataset": "../secret.csv"}),
        json!({"dataset": "a/../../secret.csv"}),
        json!({"dataset": abs}),
        json!({"dataset": "file:///etc/passwd"}),
        json!({"dataset": "bank.csv", "test_dataset": "../x.csv"}),
        json!({"dataset": "bank.csv", "epochz": 3}),
        json!({"dataset": "bank.csv", "device": "tpu"}),
        json!({"dataset": "bank.csv", "promote": "always"}),
    ];
    for p in bad {
        let e = IntentTrain::default().validate(&p).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Permanent, "{p}");
        let e = train(&f, "bad-params", "bank", p.clone()).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::Permanent, "{p}: {e:?}");
    }
    // A symlink out of the root passes the cheap check but is refused when resolved.
    #[cfg(unix)]
    {
        let e = train(&f, "symlink", "bank", json!({"dataset": "link/secret.csv"})).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::Permanent);
        assert!(e.message.contains("outside"), "{}", e.message);
    }
    if !cfg!(feature = "cuda") {
        // A CUDA job on a CPU-only worker: a permanent error naming the worker.
        let e = train(&f, "on-cpu-worker", "bank", params(json!({"device": "cuda:0"}))).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::Permanent);
        assert!(e.message.contains("cuda") && e.message.contains("worker-under-test"), "{}", e.message);
    }
}

#[test]
fn train_cli_writes_reports_to_the_out_dir() {
    let f = fixture();
    let out = tempfile::tempdir().unwrap();
    let job = out.path().join("job.json");
    std::fs::write(&job, json!({"job_type": "intent-train", "bot": "bank", "params": params(json!({"epochs": 2}))}).to_string()).unwrap();
    let args = trainyard_worker::intent::cli::TrainArgs {
        job_file: job.clone(),
        out: Some(out.path().join("run")),
        resume: false,
        device: Some("cpu".into()),
        data_dir: f.data.path().to_path_buf(),
        json: true,
    };
    trainyard_worker::intent::cli::train(args).unwrap();
    let m: Value = serde_json::from_slice(&std::fs::read(out.path().join("run/metrics.json")).unwrap()).unwrap();
    assert!(m["accuracy"].as_f64().unwrap() > 0.5);
    assert!(out.path().join("run/confusion_matrix.json").is_file());
    assert!(out.path().join("run/confusion_matrix.png").is_file());
    assert!(out.path().join("run/model/model.bin").is_file());
    let spec = trainyard_worker::intent::cli::read_job_file(&job).unwrap();
    assert_eq!(spec.job_type, "intent-train");
    assert!(!spec.job_id.is_empty());
    // A stray top-level field, or a job the message format refuses, is an error naming it.
    for (bad, says) in [
        (json!({"job_type": "intent-train", "params": {}, "epochs": 50}), "unknown field(s) [\"epochs\"]"),
        (json!({"job_type": "intent-train", "params": {}, "job_id": "../../x"}), "not a valid job"),
    ] {
        std::fs::write(&job, bad.to_string()).unwrap();
        let e = format!("{:#}", trainyard_worker::intent::cli::read_job_file(&job).unwrap_err());
        assert!(e.contains(says), "{e}");
    }
}

/// Every example job the README names reads as a job and its params as the handler's:
/// a renamed parameter would otherwise surface only when someone runs the example.
#[test]
fn every_example_job_reads_and_its_params_parse() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/jobs");
    let mut seen = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let spec = trainyard_worker::intent::cli::read_job_file(&path).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
        match spec.job_type.as_str() {
            "intent-train" => drop(trainyard_worker::intent::params::TrainParams::parse(&spec.params).unwrap()),
            "intent-eval" => drop(trainyard_worker::intent::params::EvalParams::parse(&spec.params).unwrap()),
            other => panic!("{}: job type {other}", path.display()),
        }
        seen.push(path.file_name().unwrap().to_string_lossy().into_owned());
    }
    seen.sort();
    assert_eq!(seen, ["clinc150-best.json", "clinc150-full.json", "clinc150-small.json"]);
}

/// A checkpoint of this run whose weights do not load (a record format an upgrade changed)
/// is said in the log and training starts afresh: the load failed as a transient error, so
/// every attempt read the same checkpoint and failed again, and the job never succeeded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_whose_weights_do_not_load_starts_the_run_afresh() {
    use trainyard_worker::intent::checkpoint;
    let f = fixture();
    let p = params(json!({"epochs": 3, "promote": "manual"}));
    train(&f, "garbled", "bank", p.clone()).await.unwrap();
    let key = "jobs/garbled/checkpoints/latest.ckpt";
    let ck = checkpoint::decode(&f.store.get(key).await.unwrap().unwrap()).unwrap();
    let garbage = vec![0xA5; ck.head.len()];
    f.store.put(key, checkpoint::encode(&ck.meta, &ck.emb, &garbage, &ck.optim, None)).await.unwrap();
    // Retried (a redelivery): the same job id finds the checkpoint.
    let again = train(&f, "garbled", "bank", p).await.expect("trains afresh");
    assert_eq!(again["resumed_from_epoch"], Value::Null, "{again:#}");
    assert_eq!(again["epochs_run"], 3);
    let log = String::from_utf8(f.store.get("jobs/garbled/training.log").await.unwrap().unwrap().to_vec()).unwrap();
    assert!(log.contains("the checkpoint's weights do not load"), "{log}");
}

/// A checkpoint is resumed only by the run it belongs to: the same job id on other validation
/// rows starts afresh (the fingerprint left validation out, and a resumed run kept a best
/// validation accuracy and patience measured on rows it no longer had).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_made_on_other_validation_rows_is_not_resumed() {
    let f = fixture();
    let rows = synthetic_rows(40, 7);
    let write = |val: &[(String, String)]| {
        let split = |r: &[(String, String)]| r.iter().map(|(t, l)| json!([t, l])).collect::<Vec<_>>();
        let doc = json!({"train": split(&rows[..160]), "val": split(val), "test": split(&rows[200..])});
        std::fs::write(f.data.path().join("splits.json"), doc.to_string()).unwrap();
    };
    let p = params(json!({"dataset": "splits.json", "epochs": 3, "promote": "manual"}));
    write(&rows[160..200]);
    train(&f, "fp", "bank", p.clone()).await.unwrap();
    let same = train(&f, "fp", "bank", p.clone()).await.unwrap();
    assert_eq!(same["resumed_from_epoch"], 3, "the same run resumes: {same:#}");
    let other_val: Vec<_> = synthetic_rows(10, 8);
    write(&other_val);
    let other = train(&f, "fp", "bank", p).await.unwrap();
    assert_eq!(other["resumed_from_epoch"], Value::Null, "{other:#}");
    let log = String::from_utf8(f.store.get("jobs/fp/training.log").await.unwrap().unwrap().to_vec()).unwrap();
    assert!(log.contains("made for other data or settings"), "{log}");
}
