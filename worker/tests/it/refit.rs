//! Training without validation data, and `refit`: the bag retrained on train +
//! validation after the run has chosen its epochs, ensemble weights and threshold.

use serde_json::{json, Value};
use trainyard_common::ErrorKind;
use trainyard_worker::{handler::JobHandler, intent::IntentEval};

use super::{
    device::conv_params,
    intent::{ctx, fixture, params, spec, train},
};

fn stage_names(res: &Value) -> Vec<&str> {
    res["stages"].as_array().unwrap().iter().map(|s| s["model"].as_str().unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_validation_every_epoch_runs_and_the_last_is_kept() {
    let f = fixture();
    // Patience 1 would stop a run whose validation accuracy never improves after epoch 1.
    let res =
        train(&f, "noval", "bank", params(json!({"val_fraction": 0.0, "epochs": 4, "patience": 1, "promote": "manual"}))).await.unwrap();
    assert_eq!(res["validation_examples"], 0, "{res:#}");
    assert_eq!((res["epochs_run"].as_u64(), res["best_epoch"].as_u64()), (Some(4), Some(4)), "{res:#}");
    assert_eq!(res["stopped_early"], false);
    assert!(res["accuracy"].as_f64().unwrap() >= 0.9, "{res:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refit_retrains_the_bag_on_train_and_validation_and_resumes() {
    let f = fixture();
    let p = conv_params(json!({"model": "bag+conv", "epochs": 5, "refit": true, "promote": "manual"}));
    let res = train(&f, "refit", "bank", p.clone()).await.unwrap();
    assert_eq!(stage_names(&res), ["bag", "conv", "bag-refit"], "{res:#}");
    let (bag, refit) = (&res["stages"][0], &res["stages"][2]);
    assert_eq!(refit["epochs_run"], bag["best_epoch"], "the refit runs the bag's best epoch count: {res:#}");
    assert_eq!(refit["best_epoch"], refit["epochs_run"], "no validation left: the last epoch is kept");
    assert!(res["accuracy"].as_f64().unwrap() >= 0.9, "{res:#}");
    // 240 rows: about 20% test, then 10% of the rest for validation; the refit sees train + validation.
    let (n_train, n_val) = (res["train_examples"].as_u64().unwrap(), res["validation_examples"].as_u64().unwrap());
    assert!(n_val > 0);
    let log = String::from_utf8(f.store.get("jobs/refit/training.log").await.unwrap().unwrap().to_vec()).unwrap();
    let line = format!("retraining the bag on train + validation ({} examples)", n_train + n_val);
    assert!(log.contains(&line), "{log}");
    assert!(log.contains(&format!("bag-refit features: {} ", res["features"])), "the model keeps the refit's featurizer: {log}");
    for k in ["model/model.bin", "model/conv.bin", "checkpoints/latest.ckpt", "checkpoints/conv.ckpt", "checkpoints/refit.ckpt"] {
        assert!(f.store.exists(&format!("jobs/refit/{k}")).await.unwrap(), "{k} missing");
    }
    assert_eq!(res["artifacts"]["refit_checkpoint"], "jobs/refit/checkpoints/refit.ckpt");

    // A redelivery after the last checkpoint resumes every stage, the refit included, and trains nothing.
    let (c, mut rx) = ctx(&f, spec("refit", "intent-train", "bank", p), 1);
    let again = trainyard_worker::intent::IntentTrain::default().run(c).await.unwrap();
    assert_eq!(again["stages"][2]["resumed_from_epoch"], refit["epochs_run"], "{again:#}");
    assert!(rx.try_recv().is_err(), "no epoch ran again");
    let (a, b) = (res["accuracy"].as_f64().unwrap(), again["accuracy"].as_f64().unwrap());
    let one = 1.0 / res["test_examples"].as_f64().unwrap() + 1e-9;
    assert!((a - b).abs() <= one, "resumed {b} vs first {a}: at most one test answer apart");

    // intent-eval reads the refit model like any other (on all 240 rows: the CSV has no test split).
    let (c, _rx) = ctx(&f, spec("eval-refit", "intent-eval", "bank", json!({"dataset": "bank.csv", "model": "refit"})), 0);
    let ev = IntentEval.run(c).await.unwrap();
    assert_eq!((ev["model_job_id"].as_str(), ev["test_examples"].as_u64()), (Some("refit"), Some(240)), "{ev:#}");
    assert!(ev["accuracy"].as_f64().unwrap() >= 0.9, "{ev:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refit_without_validation_data_is_refused() {
    let f = fixture();
    let e = train(&f, "refit-noval", "bank", params(json!({"refit": true, "val_fraction": 0.0}))).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Permanent);
    assert!(e.message.contains("no validation data"), "{}", e.message);
}
