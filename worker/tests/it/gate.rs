//! The promotion gate against a production model it cannot read now, and one that changes
//! while it runs.

use std::sync::{
    atomic::{AtomicBool, Ordering::SeqCst},
    Arc,
};

use futures::FutureExt;
use serde_json::json;
use trainyard_common::{
    models::{self, ProductionEntry, Replacing},
    ErrorKind,
};

use crate::{
    hooked::Hooked,
    intent::{fixture, params, train, Fixture},
};

/// A production model the store fails to read (an outage) makes the job transient, to be
/// retried: the gate used to fall back to the minimum alone, and a far worse model replaced it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_production_model_the_store_cannot_read_now_retries_the_job() {
    let failing = Arc::new(AtomicBool::new(false));
    let flag = failing.clone();
    let store = Hooked::new()
        .on_get(move |key| {
            let fail = flag.load(SeqCst) && key.starts_with("jobs/good/model/");
            async move {
                match fail {
                    true => Err(object_store::Error::Generic { store: "test", source: "503 Slow Down".into() }),
                    false => Ok(()),
                }
            }
            .boxed()
        })
        .store();
    let f = Fixture { store, ..fixture() };
    let good = train(&f, "good", "bank", params(json!({}))).await.unwrap();
    assert_eq!(good["promotion"]["promoted"], true, "{good:#}");
    failing.store(true, SeqCst);
    let weak = params(json!({"epochs": 1, "lr": 0.00001, "gate": {"min_accuracy": 0.0}}));
    let err = train(&f, "weak", "bank", weak).await.expect_err("the gate cannot compare");
    assert_eq!(err.kind, ErrorKind::Transient, "{}", err.message);
    assert!(err.message.contains("production model good"), "{}", err.message);
    assert_eq!(models::production(&f.store, "bank").await.unwrap().unwrap().job_id, "good", "nothing promoted");
}

/// A model made production while a training job's gate compared its candidate with the one
/// before is gated against, not replaced unseen (another job's gate or an operator promoting
/// meanwhile used to be overwritten by a model never compared with theirs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_made_production_during_the_gate_is_gated_against() {
    let hooked = Hooked::new();
    let plain = hooked.plain();
    let fired = Arc::new(AtomicBool::new(false));
    // As the next gate reads production (`good`), `better` (a copy of it) is made production.
    let store = hooked
        .on_get(move |key| {
            let fire = key == "jobs/good/model/config.json" && !fired.swap(true, SeqCst);
            let plain = plain.clone();
            async move {
                if fire {
                    for name in ["model.bin", "config.json"] {
                        let bytes = plain.get(&format!("jobs/good/model/{name}")).await.unwrap().unwrap();
                        plain.put(&format!("jobs/better/model/{name}"), bytes).await.unwrap();
                    }
                    let entry = ProductionEntry {
                        bot: "bank".into(),
                        job_id: "better".into(),
                        model: models::model_prefix("better"),
                        metrics: json!({}),
                        promoted_at: chrono::Utc::now(),
                        reason: "by hand, during the gate".into(),
                    };
                    models::set_production(&plain, "bank", entry, Replacing::Any).await.unwrap();
                }
                Ok(())
            }
            .boxed()
        })
        .store();
    let f = Fixture { store, ..fixture() };
    let good = train(&f, "good", "bank", params(json!({}))).await.unwrap();
    assert_eq!(good["promotion"]["promoted"], true, "{good:#}");
    let next = train(&f, "next", "bank", params(json!({}))).await.unwrap();
    assert_eq!(next["promotion"]["production_job_id"], "better", "gated against the new production model: {next:#}");
    assert_eq!(next["promotion"]["promoted"], true, "{next:#}");
    let history = models::history(&f.store, "bank").await.unwrap();
    let froms: Vec<_> = history.records.iter().map(|r| r.from.as_deref()).collect();
    assert_eq!(froms, [None, Some("good"), Some("better")], "each replaced the one before it");
    let log = String::from_utf8(f.store.get("jobs/next/training.log").await.unwrap().unwrap().to_vec()).unwrap();
    assert!(log.contains("production became better during the gate"), "{log}");
}

/// A model's files are written with its config last: a job stopped while writing its first
/// model leaves none with a config, and a promotion by hand refuses it (a half-written model was
/// promoted, and then no gate could load production).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_models_config_is_written_last() {
    let written = Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = written.clone();
    let store = Hooked::new()
        .on_put(move |key, _| {
            if let Some(name) = key.strip_prefix("jobs/ordered/model/") {
                log.lock().unwrap().push(name.to_string());
            }
        })
        .store();
    let f = Fixture { store, ..fixture() };
    let p = json!({"model": "bag+conv", "conv_dim": 16, "conv_filters": 16, "max_tokens": 8, "epochs": 2, "promote": "manual"});
    train(&f, "ordered", "bank", params(p)).await.unwrap();
    let written = written.lock().unwrap().clone();
    assert_eq!(written.last().map(String::as_str), Some(models::MODEL_CONFIG), "{written:?}");
    assert!(written.len() >= 3, "the networks, then the config: {written:?}");
}

/// A job run again after its model was written (its outcome record lost) writes the model
/// again without taking any of it away first: that model may be the bot's production model, and
/// a config deleted first read as missing, and stayed so if the run then failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_run_again_takes_none_of_its_model_away() {
    let deleted = Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = deleted.clone();
    let store = Hooked::new().on_delete(move |key| log.lock().unwrap().push(key.to_string())).store();
    let f = Fixture { store, ..fixture() };
    let first = train(&f, "twice", "bank", params(json!({}))).await.unwrap();
    assert_eq!(first["promotion"]["promoted"], true, "{first:#}");
    let again = train(&f, "twice", "bank", params(json!({}))).await.unwrap();
    assert_eq!(again["promotion"]["promoted"], true, "still production: {again:#}");
    let deleted = deleted.lock().unwrap().clone();
    assert!(!deleted.iter().any(|k| k.starts_with("jobs/twice/model/")), "{deleted:?}");
    assert!(f.store.exists(&format!("jobs/twice/model/{}", models::MODEL_CONFIG)).await.unwrap());
}

/// A production pointer this build cannot decode fails the job for good, naming it: as a
/// transient error every retry trained the whole model again and failed the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_record_that_cannot_be_read_is_a_permanent_error() {
    let f = fixture();
    f.store.put(&trainyard_common::artifacts::keys::production("bank"), "{not json").await.unwrap();
    let e = train(&f, "after-corruption", "bank", params(json!({}))).await.unwrap_err();
    assert_eq!(e.kind, ErrorKind::Permanent, "{}", e.message);
    assert!(e.message.contains("model registry holds a record that cannot be read"), "{}", e.message);
}
