//! An `intent-train` run from params to result: load and split the data, fit the
//! features, train (resuming from a checkpoint), tune the OOS threshold on
//! validation, evaluate on test, write the model and reports, run the promotion gate.
//!
//! Synchronous and CPU-heavy: callers run it on a dedicated thread.

use std::collections::BTreeMap;

use burn::tensor::backend::AutodiffBackend;
use serde_json::{json, Value};

use super::{
    checkpoint,
    dataset::Example,
    device::{CpuBackend, DeviceSpec},
    env::RunEnv,
    eval::{gate_against_production, write_evaluation},
    features::{FeatureConfig, Featurizer},
    params::{PromoteMode, TrainParams},
    predict::{decide, probabilities, ModelConfig, Predictor, MODEL_FORMAT},
    promotion::{set_production, ProductionEntry},
    train::{train, Hooks, TrainData, TrainError},
};
use crate::handler::JobError;

/// Key (under the run's prefix) of the checkpoint.
pub const CHECKPOINT_KEY: &str = "checkpoints/latest.ckpt";

fn permanent(e: impl std::fmt::Display) -> JobError {
    JobError::permanent(e.to_string())
}

/// Label indices of examples, given the sorted label list.
fn label_ids(examples: &[Example], labels: &[String]) -> Vec<usize> {
    examples.iter().map(|e| labels.binary_search(&e.label).expect("labels validated against training")).collect()
}

fn texts(examples: &[Example]) -> Vec<&str> {
    examples.iter().map(|e| e.text.as_str()).collect()
}

/// A stable digest of what a run trains on, to refuse foreign checkpoints.
fn fingerprint(params: &TrainParams, labels: &[String], feats: &Featurizer, train: &[Example]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for b in bytes {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    eat(serde_json::to_string(&params.hyper).unwrap_or_default().as_bytes());
    eat(labels.join("\u{1}").as_bytes());
    eat(&(feats.dim() as u64).to_le_bytes());
    for e in train {
        eat(e.text.as_bytes());
        eat(e.label.as_bytes());
    }
    format!("{h:016x}")
}

/// Picks the OOS threshold on validation: the one maximising validation accuracy
/// over all examples, in-scope and OOS alike (arg-max predictions whose
/// probability is below it become OOS; ties go to the lower threshold).
/// Returns the threshold, and the in-scope accuracy and OOS recall it gives.
pub fn tune_threshold(probs: &[f32], labels: usize, y: &[usize], oos: usize) -> (f32, f64, f64) {
    let (n_oos, n_in) = (y.iter().filter(|&&t| t == oos).count(), y.iter().filter(|&&t| t != oos).count());
    let mut best = (0.0f32, 0usize, 0.0, 0.0);
    for step in 0..=95 {
        let t = step as f32 / 100.0;
        let pred = decide(probs, labels, Some(oos), Some(t));
        let (mut ins_ok, mut oos_ok) = (0usize, 0usize);
        for (p, t) in pred.iter().zip(y) {
            if *t == oos {
                oos_ok += usize::from(*p == oos);
            } else {
                ins_ok += usize::from(p == t);
            }
        }
        if step == 0 || ins_ok + oos_ok > best.1 {
            best = (t, ins_ok + oos_ok, ins_ok as f64 / n_in.max(1) as f64, oos_ok as f64 / n_oos.max(1) as f64);
        }
    }
    (best.0, best.2, best.3)
}

/// Runs an `intent-train` job. Call on a dedicated thread.
pub fn train_job(env: &RunEnv, params: &TrainParams) -> Result<Value, JobError> {
    params.device.check().map_err(JobError::permanent)?;
    match params.device {
        DeviceSpec::Cpu => run::<CpuBackend>(env, params, &Default::default()),
        #[cfg(feature = "cuda")]
        DeviceSpec::Cuda(i) => run::<super::device::CudaBackend>(env, params, &burn::backend::cuda::CudaDevice::new(i)),
        #[cfg(not(feature = "cuda"))]
        DeviceSpec::Cuda(_) => unreachable!("checked above"),
    }
}

fn run<B: AutodiffBackend>(env: &RunEnv, params: &TrainParams, device: &B::Device) -> Result<Value, JobError> {
    let h = &params.hyper;
    env.log(format!(
        "intent-train job {} for bot {:?} on {} ({} threads)",
        env.job_id,
        env.bot,
        params.device,
        rayon::current_num_threads()
    ));
    let splits = params.data.load_for_training(&env.data_dir, h.seed, h.val_fraction, h.test_fraction).map_err(permanent)?;
    for n in &splits.notes {
        env.log(n.clone());
    }
    let mut labels: Vec<String> = splits.train.iter().map(|e| e.label.clone()).collect();
    labels.sort();
    labels.dedup();
    let oos_label = labels.contains(&h.oos_label).then(|| h.oos_label.clone());
    let oos = oos_label.as_ref().and_then(|o| labels.iter().position(|l| l == o));
    env.log(format!(
        "data: {} train, {} validation, {} test examples, {} labels{}",
        splits.train.len(),
        splits.val.len(),
        splits.test.len(),
        labels.len(),
        if oos.is_some() { format!(" (with out-of-scope label {:?})", h.oos_label) } else { String::new() }
    ));
    let fcfg = FeatureConfig {
        word_ngrams: h.word_ngrams,
        char_min: h.char_ngram_min,
        char_max: h.char_ngram_max,
        min_df: h.min_df,
        char_weight: h.char_weight,
    };
    let feats = Featurizer::fit(fcfg, &texts(&splits.train));
    let data = TrainData {
        x_train: feats.transform(&texts(&splits.train)),
        y_train: label_ids(&splits.train, &labels),
        x_val: feats.transform(&texts(&splits.val)),
        y_val: label_ids(&splits.val, &labels),
        labels: labels.len(),
        features: feats.dim(),
    };
    env.log(format!(
        "features: {} (word 1..={}-grams, char {}..={}-grams, min_df {})",
        feats.dim(),
        h.word_ngrams,
        h.char_ngram_min,
        h.char_ngram_max,
        h.min_df
    ));
    let fp = fingerprint(params, &labels, &feats, &splits.train);
    let resume = if env.resume {
        match env.get(CHECKPOINT_KEY)? {
            Some(bytes) => match checkpoint::decode(&bytes) {
                Ok(ck) if ck.meta.fingerprint == fp => {
                    env.log(format!("resuming from the checkpoint of epoch {}", ck.meta.epoch));
                    Some(ck)
                }
                Ok(_) => {
                    env.log("a checkpoint exists but was made for other data or settings: starting afresh");
                    None
                }
                Err(e) => {
                    env.log(format!("ignoring an unreadable checkpoint ({e}): starting afresh"));
                    None
                }
            },
            None => None,
        }
    } else {
        None
    };
    let cut = std::sync::atomic::AtomicBool::new(false);
    let cancelled = || env.cancel.is_cancelled() || cut.load(std::sync::atomic::Ordering::Relaxed);
    // Checkpoints are written in the background while the next epoch trains; each
    // write waits for the previous one, and the run waits for the last one.
    let pending: std::cell::RefCell<Option<tokio::task::JoinHandle<Result<(), String>>>> = Default::default();
    let wait_pending = || -> Result<(), String> {
        match pending.borrow_mut().take() {
            Some(h) => env.rt.block_on(h).map_err(|e| format!("checkpoint writer failed: {e}"))?,
            None => Ok(()),
        }
    };
    let mut save = |epoch: usize, bytes: Vec<u8>| -> Result<(), String> {
        wait_pending()?;
        let (store, key, meta_key) = (env.store.clone(), env.key(CHECKPOINT_KEY), env.key("checkpoints/latest.json"));
        let meta = serde_json::to_vec(&json!({"epoch": epoch, "fingerprint": fp})).map_err(|e| e.to_string())?;
        *pending.borrow_mut() = Some(env.rt.spawn(async move {
            store.put(&key, bytes).await.map_err(|e| e.to_string())?;
            store.put(&meta_key, meta).await.map_err(|e| e.to_string())
        }));
        Ok(())
    };
    let mut progress = |l: &checkpoint::EpochLog| {
        env.log(format!(
            "epoch {}/{}: loss {:.4}, validation accuracy {:.4}, {:.0} examples/s, {:.2}s",
            l.epoch, l.epochs, l.loss, l.val_accuracy, l.examples_per_s, l.seconds
        ));
        env.progress.report(json!({
            "epoch": l.epoch, "epochs": l.epochs, "loss": l.loss, "val_accuracy": l.val_accuracy,
            "examples_per_s": l.examples_per_s, "epoch_seconds": l.seconds,
        }));
        if env.stop_after_epoch == Some(l.epoch) {
            cut.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    };
    let hooks = Hooks { cancelled: &cancelled, save: &mut save, progress: &mut progress };
    let trained = train::<B>(h, &data, &fp, resume, device, hooks);
    wait_pending().map_err(|e| JobError::transient(format!("failed to save a checkpoint: {e}")))?;
    let trained = trained.map_err(|e| match e {
        TrainError::Cancelled(_) => JobError::cancelled(e.to_string()),
        TrainError::Checkpoint { .. } | TrainError::Record(_) => JobError::transient(e.to_string()),
    })?;
    env.log(format!(
        "training done: {} epochs{}, best epoch {}",
        trained.log.len(),
        if trained.stopped_early { " (early stop)" } else { "" },
        trained.best_epoch
    ));
    let inner_device = device.clone();
    let threshold = match (oos, h.oos_threshold) {
        (None, _) => None,
        (Some(_), Some(t)) => Some(t),
        (Some(o), None) if !data.y_val.is_empty() => {
            let p = probabilities(&trained.emb, &trained.head, &data.x_val, labels.len(), &inner_device);
            let (t, ins, rec) = tune_threshold(&p, labels.len(), &data.y_val, o);
            env.log(format!("OOS threshold {t:.2} tuned on validation (in-scope accuracy {ins:.4}, OOS recall {rec:.4})"));
            Some(t)
        }
        (Some(_), None) => None,
    };
    let predictor = Predictor::<B::InnerBackend> {
        config: ModelConfig {
            format: MODEL_FORMAT,
            labels: labels.clone(),
            hidden: h.hidden,
            oos_label: oos_label.clone(),
            oos_threshold: threshold,
            features: feats,
        },
        emb: trained.emb,
        head: trained.head,
        device: inner_device,
    };
    // Test.
    let test_texts = texts(&splits.test);
    let truth: Vec<String> = splits.test.iter().map(|e| e.label.clone()).collect();
    let predicted = predictor.predict(&test_texts);
    let (metrics, outputs) = write_evaluation(env, &truth, &predicted, oos_label.as_deref())?;
    // Model.
    let (bin, cfg_json) = predictor.to_files().map_err(JobError::transient)?;
    let model_key = env.key("model");
    env.put("model/model.bin", bin)?;
    env.put("model/config.json", cfg_json)?;
    env.put_json("training_log.json", &trained.log)?;
    // Promotion gate.
    let mut decision = gate_against_production(env, &params.gate, &metrics, &test_texts, &truth)?;
    decision.mode = match params.promote {
        PromoteMode::Auto => "auto".into(),
        PromoteMode::Manual => "manual".into(),
    };
    if decision.passed && params.promote == PromoteMode::Auto && env.apply_promotion {
        if let Some(models) = &env.models {
            let entry = ProductionEntry {
                bot: env.bot.clone(),
                job_id: env.job_id.clone(),
                model: model_key.clone(),
                metrics: trainyard_common::models::headline(&serde_json::to_value(&metrics).unwrap_or_default()),
                promoted_at: chrono::Utc::now(),
                reason: decision.reasons.join("; "),
            };
            env.rt.block_on(set_production(models, &env.bot, entry)).map_err(|e| JobError::transient(e.to_string()))?;
            decision.promoted = true;
        }
    }
    let verdict = match (decision.passed, decision.promoted) {
        (true, true) => "promoted to production".to_string(),
        (true, false) => {
            format!("passed the gate, not promoted (promote={}{})", decision.mode, if env.apply_promotion { "" } else { ", local run" })
        }
        (false, _) => "rejected by the gate".to_string(),
    };
    env.log(format!("promotion: {verdict}: {}", decision.reasons.join("; ")));
    let promotion_key = env.put_json("promotion.json", &decision)?;
    let mut artifacts: BTreeMap<&str, String> = outputs;
    artifacts.insert("model", model_key.clone());
    artifacts.insert("promotion", promotion_key);
    artifacts.insert("training_log", env.key("training_log.json"));
    artifacts.insert("log", env.key("training.log"));
    artifacts.insert("checkpoint", env.key(CHECKPOINT_KEY));
    let result = json!({
        "accuracy": metrics.accuracy,
        "macro_f1": metrics.macro_f1,
        "in_scope_accuracy": metrics.in_scope_accuracy,
        "oos_recall": metrics.oos_recall,
        "oos_threshold": threshold,
        "labels": labels.len(),
        "features": predictor.config.features.dim(),
        "train_examples": splits.train.len(),
        "validation_examples": splits.val.len(),
        "test_examples": splits.test.len(),
        "epochs_run": trained.log.len(),
        "best_epoch": trained.best_epoch,
        "stopped_early": trained.stopped_early,
        "resumed_from_epoch": trained.resumed_from_epoch,
        "device": params.device.to_string(),
        "seconds": env.elapsed(),
        "top_confusions": metrics.top_confusions.iter().take(5).collect::<Vec<_>>(),
        "promotion": decision,
        "model": model_key,
        "artifacts": artifacts,
    });
    env.log(format!("done in {:.1}s", env.elapsed()));
    env.put("training.log", env.log_text())?;
    Ok(result)
}
