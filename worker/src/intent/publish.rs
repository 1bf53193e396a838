//! The end of an `intent-train` run: evaluate the fitted model on the test split, write it and
//! its reports, run the promotion gate, and make the job's result.

use std::collections::BTreeMap;

use burn::tensor::backend::AutodiffBackend;
use serde_json::{json, Value};

use super::{
    device::DeviceSpec,
    env::RunEnv,
    eval::{gate_against_production, write_evaluation},
    features::Featurizer,
    fit::{StageSummary, CHECKPOINT_KEY, CONV_CHECKPOINT_KEY, REFIT_CHECKPOINT_KEY},
    metrics::Metrics,
    params::{Hyper, ModelKind, PromoteMode, TrainParams},
    pipeline::{stop_if_cancelled, texts, Prepared},
    predict::Predictor,
    promotion::{set_production, GateDecision, ProductionEntry, Promotion, Replacing},
};
use crate::handler::JobError;

/// Evaluates `predictor` on the test split, writes the model, the reports and
/// `training_log.json`, runs the promotion gate, and returns the job's result.
pub(super) fn finish<B: AutodiffBackend>(
    env: &RunEnv,
    params: &TrainParams,
    spec: DeviceSpec,
    prep: &Prepared,
    predictor: &Predictor<B::InnerBackend>,
    stages: &[StageSummary],
) -> Result<Value, JobError> {
    let h = &params.hyper;
    let test_texts = texts(&prep.splits.test);
    let truth: Vec<String> = prep.splits.test.iter().map(|e| e.label.clone()).collect();
    let predicted = predictor.predict(&test_texts);
    let about = [("device", spec.to_string()), ("model", h.model.to_string())];
    stop_if_cancelled(env, "writing the model")?;
    let (metrics, outputs) = write_evaluation(env, &truth, &predicted, prep.oos_label.as_deref(), &about)?;
    write_model(env, predictor)?;
    let log: Vec<_> = stages.iter().flat_map(|s| s.log.clone()).collect();
    env.put_json("training_log.json", &log)?;
    let model_key = env.key("model");
    let decision = gate_and_promote(env, params, &metrics, &test_texts, &truth, &model_key)?;
    let promotion_key = env.put_json("promotion.json", &decision)?;
    let artifacts = artifact_keys(env, h, outputs, &model_key, promotion_key);
    let last = stages.last().expect("at least one network");
    Ok(json!({
        "accuracy": metrics.accuracy,
        "macro_f1": metrics.macro_f1,
        "in_scope_accuracy": metrics.in_scope_accuracy,
        "oos_recall": metrics.oos_recall,
        "oos_threshold": predictor.config.oos_threshold,
        "labels": prep.labels.len(),
        "features": predictor.config.features.as_ref().map(Featurizer::dim),
        "train_examples": prep.splits.train.len(),
        "validation_examples": prep.splits.val.len(),
        "test_examples": prep.splits.test.len(),
        "epochs_run": log.len(),
        "best_epoch": last.best_epoch,
        "stopped_early": last.stopped_early,
        "resumed_from_epoch": stages.iter().find_map(|s| s.resumed_from_epoch),
        "stages": stages,
        "device": spec.to_string(),
        "model_kind": h.model.to_string(),
        "seconds": env.elapsed(),
        "top_confusions": metrics.top_confusions.iter().take(5).collect::<Vec<_>>(),
        "promotion": decision,
        "model": model_key,
        "artifacts": artifacts,
    }))
}

/// Writes the model's files under `model/`, its config last: a job stopped while writing its
/// first model leaves none with a config, which a promotion by hand refuses. The config an
/// earlier run of the job left is not taken away first: that model may be the bot's production
/// model, and it would read as missing (and stay so, were this run to fail).
fn write_model<B: burn::tensor::backend::Backend>(env: &RunEnv, predictor: &Predictor<B>) -> Result<(), JobError> {
    for (name, bytes) in predictor.to_files().map_err(JobError::transient)? {
        env.put(&format!("model/{name}"), bytes)?;
    }
    Ok(())
}

/// The keys of everything the run wrote, by name (`outputs`: the evaluation's).
fn artifact_keys(
    env: &RunEnv,
    h: &Hyper,
    outputs: BTreeMap<&'static str, String>,
    model_key: &str,
    promotion_key: String,
) -> BTreeMap<&'static str, String> {
    let mut artifacts = outputs;
    artifacts.insert("model", model_key.to_string());
    artifacts.insert("promotion", promotion_key);
    artifacts.insert("training_log", env.key("training_log.json"));
    artifacts.insert("log", env.key("training.log"));
    artifacts.insert("checkpoint", env.key(CHECKPOINT_KEY));
    if h.model == ModelKind::BagConv {
        artifacts.insert("conv_checkpoint", env.key(CONV_CHECKPOINT_KEY));
    }
    if h.refit {
        artifacts.insert("refit_checkpoint", env.key(REFIT_CHECKPOINT_KEY));
    }
    artifacts
}

/// How many times the gate runs again when production changes between its comparison and its
/// promotion (another job's gate or an operator promoted meanwhile) before the job is retried.
const GATE_ROUNDS: usize = 3;

/// Runs the promotion gate against the bot's production model and promotes when it passes and
/// may, in place of the model it was compared with only: when another model was made production
/// meanwhile, the gate runs again against that one.
fn gate_and_promote(
    env: &RunEnv,
    params: &TrainParams,
    metrics: &Metrics,
    test_texts: &[&str],
    truth: &[String],
    model_key: &str,
) -> Result<GateDecision, JobError> {
    for _ in 0..GATE_ROUNDS {
        let (mut decision, compared) = gate_against_production(env, &params.gate, metrics, test_texts, truth)?;
        decision.mode = match params.promote {
            PromoteMode::Auto => "auto".into(),
            PromoteMode::Manual => "manual".into(),
        };
        let Some(models) = env.models.as_ref().filter(|_| decision.passed && params.promote == PromoteMode::Auto && env.apply_promotion)
        else {
            return Ok(log_verdict(env, decision));
        };
        stop_if_cancelled(env, "promoting the model")?;
        let entry = ProductionEntry {
            bot: env.bot.clone(),
            job_id: env.job_id.clone(),
            model: model_key.to_string(),
            metrics: trainyard_common::models::headline(&serde_json::to_value(metrics).unwrap_or_default()),
            promoted_at: chrono::Utc::now(),
            reason: decision.reasons.join("; "),
        };
        let replacing = Replacing::Only(compared.as_deref());
        match env.rt.block_on(set_production(models, &env.bot, entry, replacing)).map_err(super::eval::registry_error)? {
            Promotion::Made | Promotion::AlreadyProduction => {
                decision.promoted = true;
                return Ok(log_verdict(env, decision));
            }
            Promotion::Moved { production } => env.log(format!(
                "promotion: production became {} during the gate: gating again against it",
                production.as_deref().unwrap_or("no model")
            )),
        }
    }
    Err(JobError::transient(format!("the bot's production model changed during each of {GATE_ROUNDS} gates: nothing promoted")))
}

/// Logs the gate's verdict; returns the decision.
fn log_verdict(env: &RunEnv, decision: GateDecision) -> GateDecision {
    let verdict = match (decision.passed, decision.promoted) {
        (true, true) => "promoted to production".to_string(),
        (true, false) => {
            format!("passed the gate, not promoted (promote={}{})", decision.mode, if env.apply_promotion { "" } else { ", local run" })
        }
        (false, _) => "rejected by the gate".to_string(),
    };
    env.log(format!("promotion: {verdict}: {}", decision.reasons.join("; ")));
    decision
}
