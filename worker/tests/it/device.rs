//! The device training paths on burn's ndarray backend: the bag's device path
//! agrees with its sparse CPU path, checkpoints are refused across paths, and the
//! word-order model trains, checkpoints, resumes after a kill, evaluates and passes
//! through the promotion gate.

use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use trainyard_common::{models, ErrorKind};
use trainyard_worker::{
    handler::{JobHandler, Progress},
    intent::{
        device::{CpuBackend, DeviceSpec},
        env::RunEnv,
        params::TrainParams,
        pipeline::{run, train_job},
        IntentEval, IntentTrain,
    },
};

use super::intent::{ctx, fixture, params, spec, train, Fixture};

fn env(f: &Fixture, prefix: &str) -> RunEnv {
    let (progress, _rx) = Progress::channel();
    RunEnv::new(
        f.store.clone(),
        format!("jobs/{prefix}"),
        None,
        f.data.path().to_path_buf(),
        prefix,
        "bank",
        CancellationToken::new(),
        progress,
        tokio::runtime::Handle::current(),
    )
}

/// Runs the whole pipeline on ndarray; `device_path`: the bag takes the device path.
async fn run_path(f: &Fixture, prefix: &str, p: Value, device_path: bool, stop_after: Option<usize>) -> Result<Value, String> {
    let tp = TrainParams::parse(&p).map_err(|e| e.message)?;
    let mut e = env(f, prefix);
    e.stop_after_epoch = stop_after;
    tokio::task::spawn_blocking(move || run::<CpuBackend>(&e, &tp, DeviceSpec::Cpu, &Default::default(), device_path))
        .await
        .unwrap()
        .map_err(|e| format!("{:?}: {}", e.kind, e.message))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bag_device_path_agrees_with_the_sparse_path() {
    // CLINC150 data_small: 150 intents, 4,500 + 1,000 test utterances, so one point is 55 answers.
    let f = fixture();
    let clinc = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/clinc150/data_small.json");
    std::fs::copy(clinc, f.data.path().join("small.json")).unwrap();
    let p = json!({"dataset": "small.json", "epochs": 8, "seed": 5, "hidden": 64, "patience": 8, "promote": "manual"});
    let sparse = run_path(&f, "sparse", p.clone(), false, None).await.unwrap();
    let dense = run_path(&f, "dense", p, true, None).await.unwrap();
    let (a, b) = (sparse["in_scope_accuracy"].as_f64().unwrap(), dense["in_scope_accuracy"].as_f64().unwrap());
    assert!(a > 0.8, "a real task, learned: sparse in-scope accuracy {a}");
    assert!((a - b).abs() <= 0.01, "sparse {a} vs device {b}: the two paths must agree within 1 point");
    assert_eq!(sparse["stages"][0]["path"], "sparse");
    assert_eq!(dense["stages"][0]["path"], "device-bag");
    // The same model files either way: the device path's model loads and answers like any other.
    let (c, _rx) = ctx(&f, spec("eval-dense", "intent-eval", "bank", json!({"dataset": "small.json", "model": "dense"})), 0);
    let ev = IntentEval.run(c).await.unwrap();
    let (e, d) = (ev["in_scope_accuracy"].as_f64().unwrap(), dense["in_scope_accuracy"].as_f64().unwrap());
    assert!((e - d).abs() < 0.005, "intent-eval of the stored model {e} vs the run's own test {d}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_resumes_only_on_the_path_that_wrote_it() {
    let f = fixture();
    let p = params(json!({"epochs": 4, "promote": "manual"}));
    // The sparse path stops after epoch 2 (as on a crash) ...
    let err = run_path(&f, "job", p.clone(), false, Some(2)).await.unwrap_err();
    assert!(err.starts_with("Cancelled"), "{err}");
    // ... and a redelivery to a worker on the device path refuses its checkpoint and starts afresh.
    let res = run_path(&f, "job", p.clone(), true, None).await.unwrap();
    assert_eq!(res["resumed_from_epoch"], Value::Null, "{res:#}");
    let log = String::from_utf8(f.store.get("jobs/job/training.log").await.unwrap().unwrap().to_vec()).unwrap();
    assert!(log.contains("refusing the checkpoint of epoch 2: it was written by the sparse training path"), "{log}");
    // Now the checkpoint is the device path's: cut that one, and the device path resumes from it.
    let err = run_path(&f, "job2", p.clone(), true, Some(3)).await.unwrap_err();
    assert!(err.starts_with("Cancelled"), "{err}");
    let res = run_path(&f, "job2", p, true, None).await.unwrap();
    assert_eq!(res["resumed_from_epoch"], 3, "{res:#}");
}

pub(super) fn conv_params(extra: Value) -> Value {
    let mut p = params(json!({"model": "conv", "conv_dim": 32, "conv_filters": 32, "max_tokens": 8, "lr": 0.005}));
    p.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    if p["model"] == "conv" {
        // The bag's setting; the word-order model alone refuses it.
        p.as_object_mut().unwrap().remove("hidden");
    }
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn word_order_model_trains_checkpoints_and_resumes_after_a_kill() {
    let f = fixture();
    let p = conv_params(json!({"epochs": 6, "promote": "manual"}));
    let full = train(&f, "conv-full", "bank", p.clone()).await.unwrap();
    assert!(full["accuracy"].as_f64().unwrap() >= 0.9, "{full:#}");
    assert_eq!((full["model_kind"].as_str(), full["device"].as_str()), (Some("conv"), Some("cpu")));
    let m: Value = f.store.get_json("jobs/conv-full/metrics.json").await.unwrap().unwrap();
    assert_eq!((m["model"].as_str(), m["device"].as_str()), (Some("conv"), Some("cpu")));
    assert!(f.store.exists("jobs/conv-full/model/conv.bin").await.unwrap());
    assert!(!f.store.exists("jobs/conv-full/model/model.bin").await.unwrap(), "no bag in a conv model");

    // Killed after epoch 2's checkpoint, then redelivered: resumes at epoch 3.
    let tp = TrainParams::parse(&p).unwrap();
    let mut e = env(&f, "conv-cut");
    e.models = Some(f.store.clone());
    e.stop_after_epoch = Some(2);
    let err = tokio::task::spawn_blocking(move || train_job(&e, &tp)).await.unwrap().unwrap_err();
    assert_eq!(err.kind, ErrorKind::Cancelled);
    let (c, mut rx) = ctx(&f, spec("conv-cut", "intent-train", "bank", p), 1);
    let resumed = IntentTrain::default().run(c).await.unwrap();
    assert_eq!(resumed["resumed_from_epoch"], 2, "{resumed:#}");
    let mut seen = Vec::new();
    while let Ok(p) = rx.try_recv() {
        assert_eq!((p["model"].as_str(), p["device"].as_str()), (Some("conv"), Some("cpu")), "{p}");
        seen.push(p["epoch"].as_u64().unwrap());
    }
    assert_eq!(seen, vec![3, 4, 5, 6]);
    let (a, b) = (full["accuracy"].as_f64().unwrap(), resumed["accuracy"].as_f64().unwrap());
    assert!((a - b).abs() <= 0.05, "resumed {b} vs uninterrupted {a}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ensemble_passes_the_gate_and_intent_eval_reads_it() {
    let f = fixture();
    let res = train(&f, "ens", "bank", conv_params(json!({"model": "bag+conv", "epochs": 5}))).await.unwrap();
    assert_eq!(res["promotion"]["promoted"], true, "{res:#}");
    let stages: Vec<&str> = res["stages"].as_array().unwrap().iter().map(|s| s["model"].as_str().unwrap()).collect();
    assert_eq!(stages, ["bag", "conv"]);
    for k in ["model/model.bin", "model/conv.bin", "checkpoints/latest.ckpt", "checkpoints/conv.ckpt"] {
        assert!(f.store.exists(&format!("jobs/ens/{k}")).await.unwrap(), "{k} missing");
    }
    let config: Value = f.store.get_json("jobs/ens/model/config.json").await.unwrap().unwrap();
    assert_eq!(config["combine"], "geometric", "an ensemble combines by the weighted geometric mean");
    let (c, _rx) = ctx(&f, spec("eval-ens", "intent-eval", "bank", json!({"dataset": "bank.csv"})), 0);
    let ev = IntentEval.run(c).await.unwrap();
    assert_eq!(ev["model_job_id"], "ens");
    assert!(ev["accuracy"].as_f64().unwrap() >= 0.85, "{ev:#}");
    // A worse word-order model is rejected against the ensemble in production.
    let bad = train(&f, "bad-conv", "bank", conv_params(json!({"epochs": 1, "lr": 0.00001, "gate": {"min_accuracy": 0.0}}))).await.unwrap();
    assert_eq!(bad["promotion"]["passed"], false, "{bad:#}");
    assert_eq!(models::production(&f.store, "bank").await.unwrap().unwrap().job_id, "ens");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_device_uses_the_worker_default() {
    let f = fixture();
    let (c, mut rx) = ctx(&f, spec("auto", "intent-train", "bank", params(json!({"epochs": 1}))), 0);
    let res = IntentTrain { default_device: DeviceSpec::Cpu }.run(c).await.unwrap();
    assert_eq!(res["device"], "cpu");
    assert_eq!(rx.try_recv().unwrap()["device"], "cpu");
    if !cfg!(feature = "cuda") {
        // The job says auto, the worker says cuda, but the build is CPU-only.
        let (c, _rx) = ctx(&f, spec("auto-cuda", "intent-train", "bank", params(json!({"epochs": 1}))), 0);
        let e = IntentTrain { default_device: DeviceSpec::Cuda(0) }.run(c).await.unwrap_err();
        assert_eq!(e.kind, ErrorKind::Permanent);
        assert!(e.message.contains("worker-under-test") && e.message.contains("CPU-only"), "{}", e.message);
    }
}
