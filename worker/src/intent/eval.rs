//! Evaluation: the reports every run writes (metrics, confusion matrix JSON and
//! PNG), loading a stored model, comparing against a bot's production model,
//! and the `intent-eval` job.

use std::collections::BTreeMap;

use burn::backend::NdArray;
use serde_json::{json, Value};
use trainyard_common::{artifacts::ArtifactStore, models, ErrorKind};

use super::{
    env::RunEnv,
    metrics::{evaluate, Metrics},
    params::EvalParams,
    plot::confusion_png,
    predict::Predictor,
    promotion::{decide, GateDecision, GateRules},
};
use crate::handler::JobError;

/// The inference backend of stored models: the CPU.
pub type InferenceBackend = NdArray;

/// How many confusions `metrics.json` lists.
pub const TOP_CONFUSIONS: usize = 20;

/// Computes the metrics (with `about`'s `device` and `model`, when given) and writes `metrics.json`, `confusion_matrix.json` and
/// `confusion_matrix.png`; returns the metrics and the keys written.
pub fn write_evaluation(
    env: &RunEnv,
    truth: &[String],
    predicted: &[String],
    oos_label: Option<&str>,
    about: &[(&str, String)],
) -> Result<(Metrics, BTreeMap<&'static str, String>), JobError> {
    let met: std::collections::BTreeSet<&str> = truth.iter().chain(predicted).map(String::as_str).collect();
    super::limits::check_labels(met.len(), "the test rows and the model's answers have")?;
    let (mut metrics, cm) = evaluate(truth, predicted, oos_label, TOP_CONFUSIONS);
    for (k, v) in about {
        match *k {
            "device" => metrics.device = Some(v.clone()),
            "model" => metrics.model = Some(v.clone()),
            _ => {}
        }
    }
    let mut keys = BTreeMap::new();
    keys.insert("metrics", env.put_json("metrics.json", &metrics)?);
    keys.insert("confusion_matrix", env.put_json("confusion_matrix.json", &cm)?);
    let png = confusion_png(&cm).map_err(JobError::transient)?;
    keys.insert("confusion_matrix_png", env.put("confusion_matrix.png", png)?);
    let mut line = format!("test: accuracy {:.4}, macro-F1 {:.4}", metrics.accuracy, metrics.macro_f1);
    if let (Some(i), Some(r)) = (metrics.in_scope_accuracy, metrics.oos_recall) {
        line.push_str(&format!(", in-scope accuracy {i:.4}, OOS recall {r:.4}"));
    }
    env.log(line);
    for c in metrics.top_confusions.iter().take(5) {
        env.log(format!("  confusion: {} -> {} ({}x)", c.label, c.predicted, c.count));
    }
    Ok((metrics, keys))
}

/// Loads the model stored under `prefix` (`model.bin` + `config.json`) for CPU inference.
pub fn load_predictor(rt: &tokio::runtime::Handle, store: &ArtifactStore, prefix: &str) -> Result<Predictor<InferenceBackend>, JobError> {
    let get = |name: &str| {
        let key = format!("{prefix}/{name}");
        rt.block_on(store.get(&key))
            .map_err(|e| JobError::transient(e.to_string()))?
            .ok_or_else(|| JobError::permanent(format!("no model at {key}")))
    };
    let mut failure = None;
    let mut read = |name: &str| match get(name) {
        Ok(b) => Ok(b.to_vec()),
        Err(e) => {
            let msg = e.message.clone();
            failure = Some(e);
            Err(msg)
        }
    };
    let loaded = Predictor::from_files(&mut read, &Default::default());
    match (loaded, failure) {
        (Ok(p), _) => Ok(p),
        // The store failed (or a file is missing): keep that error's disposition.
        (Err(_), Some(e)) => Err(JobError { kind: e.kind, message: format!("model {prefix}: {}", e.message) }),
        (Err(e), None) => Err(JobError::permanent(format!("model {prefix}: {e}"))),
    }
}

/// Loads a model from a local directory (`DIR/config.json` or `DIR/model/config.json`, and the networks beside it).
pub fn load_predictor_dir(dir: &std::path::Path) -> Result<Predictor<InferenceBackend>, String> {
    let dir = if dir.join("config.json").is_file() { dir.to_path_buf() } else { dir.join("model") };
    let mut read = |n: &str| std::fs::read(dir.join(n)).map_err(|e| format!("failed to read {}: {e}", dir.join(n).display()));
    Predictor::from_files(&mut read, &Default::default())
}

/// Runs the gate: evaluates the bot's production model (if any, and not this job's) on the
/// same test set and applies the rules. Returns the decision and the production model's job
/// as read (the one a promotion may replace).
///
/// A failure to read the bot's model registry: a record this build cannot decode stays so on
/// every retry (each retried job trained again before failing the same way), so it is a
/// permanent error naming the fault; the store failing is transient.
pub(super) fn registry_error(e: trainyard_common::CommonError) -> JobError {
    match e {
        trainyard_common::CommonError::Codec(c) => {
            JobError::permanent(format!("the bot's model registry holds a record that cannot be read ({c}): repair or remove it"))
        }
        e => JobError::transient(e.to_string()),
    }
}

/// A production model the store cannot read now is a transient error (the job is retried):
/// judged on the minimum alone, a worse model would replace it for an outage. One that is
/// not there or does not load (a permanent error) cannot be compared with; the gate then
/// checks the minimum only, and says so.
pub fn gate_against_production(
    env: &RunEnv,
    rules: &GateRules,
    candidate: &Metrics,
    texts: &[&str],
    truth: &[String],
) -> Result<(GateDecision, Option<String>), JobError> {
    let Some(store) = &env.models else {
        let mut d = decide(rules, candidate, None);
        d.reasons.push("no model store to compare against".into());
        return Ok((d, None));
    };
    let prod = env.rt.block_on(models::production(store, &env.bot)).map_err(registry_error)?;
    let read = prod.as_ref().map(|p| p.job_id.clone());
    let Some(prod) = prod.filter(|p| p.job_id != env.job_id) else {
        let mut d = decide(rules, candidate, None);
        if read.as_deref() == Some(env.job_id.as_str()) {
            // An earlier delivery of this job promoted its model, and this run trained again
            // (its outcome was not recorded): there is no other model to compare with.
            let why = "the bot's production model is this job's own (an earlier delivery of it promoted it): the minimum only";
            if let Some(i) = d.reasons.iter().position(|r| r.starts_with("no production model")) {
                d.reasons[i] = why.into();
            }
        }
        return Ok((d, read));
    };
    match load_predictor(&env.rt, store, &prod.model) {
        Ok(p) => {
            let predicted = p.predict(texts);
            let (pm, _) = evaluate(truth, &predicted, p.config.oos_label.as_deref(), TOP_CONFUSIONS);
            env.log(format!("production model {} on the same test set: accuracy {:.4}", prod.job_id, pm.accuracy));
            Ok((decide(rules, candidate, Some((&prod.job_id, &pm))), read))
        }
        Err(e) if e.kind == ErrorKind::Transient => {
            Err(JobError::transient(format!("the gate could not read production model {}: {}", prod.job_id, e.message)))
        }
        Err(e) => {
            env.log(format!("production model {} could not be loaded ({}); gate uses the minimum only", prod.job_id, e.message));
            let mut d = decide(rules, candidate, None);
            d.reasons.push(format!("production model {} could not be loaded: {}", prod.job_id, e.message));
            Ok((d, read))
        }
    }
}

/// Runs an `intent-eval` job. Call on a dedicated thread.
pub fn eval_job(env: &RunEnv, params: &EvalParams) -> Result<Value, JobError> {
    let store = env.models.as_ref().unwrap_or(&env.store);
    let (job, prefix) = match &params.model {
        Some(job) => (job.clone(), models::model_prefix(job)),
        None => {
            let p = env
                .rt
                .block_on(models::production(store, &env.bot))
                .map_err(registry_error)?
                .ok_or_else(|| JobError::permanent(format!("bot {:?} has no production model; give `model` (a job id)", env.bot)))?;
            (p.job_id, p.model)
        }
    };
    env.log(format!("intent-eval job {}: model {prefix} (job {job})", env.job_id));
    let predictor = load_predictor(&env.rt, store, &prefix)?;
    let examples = params.data.load_for_eval(&env.data_dir).map_err(|e| JobError::permanent(e.to_string()))?;
    let texts: Vec<&str> = examples.iter().map(|e| e.text.as_str()).collect();
    let truth: Vec<String> = examples.iter().map(|e| e.label.clone()).collect();
    let predicted = predictor.predict(&texts);
    let about = [("model", predictor.config.model.to_string())];
    let (metrics, keys) = write_evaluation(env, &truth, &predicted, predictor.config.oos_label.as_deref(), &about)?;
    let unknown: Vec<&String> = truth.iter().filter(|t| !predictor.config.labels.contains(t)).collect();
    if !unknown.is_empty() {
        env.log(format!("{} test examples have labels the model does not know (counted as errors)", unknown.len()));
    }
    env.put("eval.log", env.log_text())?;
    Ok(json!({
        "accuracy": metrics.accuracy,
        "macro_f1": metrics.macro_f1,
        "in_scope_accuracy": metrics.in_scope_accuracy,
        "oos_recall": metrics.oos_recall,
        "test_examples": metrics.test_examples,
        "model": prefix,
        "model_job_id": job,
        "top_confusions": metrics.top_confusions.iter().take(5).collect::<Vec<_>>(),
        "artifacts": keys,
    }))
}
