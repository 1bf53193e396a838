//! An `intent-train` run from params to result, as named stages:
//! [`resolve`] the device → [`prepare`] the data → fit the networks ([`super::fit`]) →
//! tune the ensemble weights and the OOS threshold on validation → with `refit`, retrain
//! the bag on train + validation for its best epoch count (it replaces the first bag; the
//! weights and threshold stay) → evaluate on test and write the model and reports → run
//! the promotion gate.
//!
//! Synchronous and CPU-heavy (or GPU-bound): callers run it on a dedicated thread.

use burn::tensor::backend::AutodiffBackend;
use serde_json::Value;

use super::{
    dataset::{Example, Splits},
    device::{self, CpuBackend, DeviceSpec, Host},
    env::RunEnv,
    features::{FeatureConfig, Featurizer},
    fit::{Stage, StageSummary},
    limits::{check_bag, check_conv, check_labels},
    params::{Hyper, ModelKind, TrainParams},
    predict::{average, decide, probabilities, tune_weights, BagNet, Combine, ModelConfig, Predictor},
    seq::{SeqConfig, SeqFeaturizer},
    train::TrainData,
};
use crate::handler::JobError;

pub use super::fit::{CHECKPOINT_KEY, CHECKPOINT_KEYS, CONV_CHECKPOINT_KEY, REFIT_CHECKPOINT_KEY};

fn permanent(e: impl std::fmt::Display) -> JobError {
    JobError::permanent(e.to_string())
}

/// Label indices of examples, given the sorted label list.
fn label_ids(examples: &[Example], labels: &[String]) -> Vec<usize> {
    examples.iter().map(|e| labels.binary_search(&e.label).expect("labels validated against training")).collect()
}

pub(super) fn texts(examples: &[Example]) -> Vec<&str> {
    examples.iter().map(|e| e.text.as_str()).collect()
}

/// A stable digest of what a run trains on and is validated on, to refuse foreign
/// checkpoints: the settings, the labels, the feature count and every training and validation
/// row, each field length-prefixed (a resumed run keeps its best validation accuracy and
/// patience, which mean nothing on other validation rows).
fn fingerprint(hyper: &Hyper, labels: &[String], dim: usize, train: &[Example], val: &[Example]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    let mut eat = |bytes: &[u8]| {
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    };
    eat(b"trainyard checkpoint fingerprint 2");
    eat(serde_json::to_string(hyper).unwrap_or_default().as_bytes());
    for l in labels {
        eat(l.as_bytes());
    }
    eat(&(dim as u64).to_le_bytes());
    for (split, rows) in [(&b"train"[..], train), (b"validation", val)] {
        eat(split);
        eat(&(rows.len() as u64).to_le_bytes());
        for e in rows {
            eat(e.text.as_bytes());
            eat(e.label.as_bytes());
        }
    }
    format!("{:x}", h.finalize())
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

/// The device a job trains on, on this worker: the job's `device`, else the worker's default
/// (see [`device::resolve`]).
pub fn resolve(env: &RunEnv, params: &TrainParams) -> Result<DeviceSpec, JobError> {
    device::resolve(params.device, env.default_device, Host::current(), &env.worker).map_err(JobError::permanent)
}

/// Runs an `intent-train` job. Call on a dedicated thread.
pub fn train_job(env: &RunEnv, params: &TrainParams) -> Result<Value, JobError> {
    let device = resolve(env, params)?;
    match device {
        #[cfg(feature = "cuda")]
        DeviceSpec::Cuda(i) => {
            let dev = burn::backend::cuda::CudaDevice::new(i);
            // The CUDA backend reports failures (out of memory above all) by panicking:
            // they are transient here, so the job is retried, possibly on another worker.
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run::<device::CudaBackend>(env, params, device, &dev, false)))
                .unwrap_or_else(|panic| Err(cuda_failure(device, panic.as_ref())))
        }
        _ => run::<CpuBackend>(env, params, device, &Default::default(), false),
    }
}

/// A transient error for a panic of the CUDA backend, naming an out-of-memory condition as such.
pub fn cuda_failure(device: DeviceSpec, panic: &(dyn std::any::Any + Send)) -> JobError {
    let msg = panic.downcast_ref::<String>().cloned().or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default();
    let lower = msg.to_lowercase();
    if lower.contains("out of memory") || lower.contains("outofmemory") || lower.contains("out_of_memory") {
        JobError::transient(format!("CUDA out of memory on {device}: {msg}"))
    } else {
        JobError::transient(format!("the CUDA backend failed on {device}: {msg}"))
    }
}

/// The data of a run, split and labelled.
pub(super) struct Prepared {
    pub(super) splits: Splits,
    pub(super) labels: Vec<String>,
    pub(super) oos_label: Option<String>,
    oos: Option<usize>,
    y_train: Vec<usize>,
    y_val: Vec<usize>,
}

/// Loads and splits the data and fixes the label order.
fn prepare(env: &RunEnv, params: &TrainParams) -> Result<Prepared, JobError> {
    let h = &params.hyper;
    let splits = params.data.load_for_training(&env.data_dir, h.seed, h.val_fraction, h.test_fraction).map_err(permanent)?;
    for n in &splits.notes {
        env.log(n.clone());
    }
    let mut labels: Vec<String> = splits.train.iter().map(|e| e.label.clone()).collect();
    labels.sort();
    labels.dedup();
    check_labels(labels.len(), "the training rows have")?;
    let oos_label = labels.contains(&h.oos_label).then(|| h.oos_label.clone());
    let oos = oos_label.as_ref().and_then(|o| labels.iter().position(|l| l == o));
    if h.oos_threshold.is_some() && oos.is_none() {
        // The threshold would be dropped in silence (a label spelt `OOS` turned the OOS handling off).
        return Err(JobError::permanent(format!(
            "oos_threshold is set, but no training label is oos_label {:?} (labels are case-sensitive): set oos_label to the \
             data's out-of-scope label, or leave oos_threshold out",
            h.oos_label
        )));
    }
    env.log(format!(
        "data: {} train, {} validation, {} test examples, {} labels{}",
        splits.train.len(),
        splits.val.len(),
        splits.test.len(),
        labels.len(),
        if oos.is_some() { format!(" (with out-of-scope label {:?})", h.oos_label) } else { String::new() }
    ));
    let (y_train, y_val) = (label_ids(&splits.train, &labels), label_ids(&splits.val, &labels));
    Ok(Prepared { splits, labels, oos_label, oos, y_train, y_val })
}

/// The fitted networks of a run, in inference form, and their validation probabilities.
struct Fitted<B: AutodiffBackend> {
    predictor: Predictor<B::InnerBackend>,
    val_probs: Vec<f32>,
    stages: Vec<StageSummary>,
}

/// What every stage of a run shares.
struct Ctx<'a, B: AutodiffBackend> {
    env: &'a RunEnv,
    params: &'a TrainParams,
    prep: &'a Prepared,
    spec: DeviceSpec,
    device: &'a B::Device,
    /// The bag takes the device path even on the CPU.
    force_device_bag: bool,
}

/// A fitted bag and its featurizer.
type BagFit<B> = (BagNet<B>, Featurizer, StageSummary);

impl<B: AutodiffBackend> Ctx<'_, B> {
    fn stage<'s>(&'s self, name: &'static str, hyper: &'s Hyper, fingerprint: String, checkpoint_key: &'static str) -> Stage<'s> {
        Stage { name, env: self.env, hyper, device: self.spec, fingerprint, checkpoint_key }
    }

    /// Featurises `train` (the featurizer is fitted on it) and `val`, and fits the bag as stage `name`.
    fn fit_bag_on(
        &self,
        (name, key, hyper): (&'static str, &'static str, &Hyper),
        train: &[Example],
        val: &[Example],
    ) -> Result<BagFit<B::InnerBackend>, JobError> {
        let h = hyper;
        let fcfg = FeatureConfig {
            word_ngrams: h.word_ngrams,
            char_min: h.char_ngram_min,
            char_max: h.char_ngram_max,
            min_df: h.min_df,
            char_weight: h.char_weight,
        };
        let train_texts = texts(train);
        let f = Featurizer::fit(fcfg, &train_texts);
        self.env.log(format!(
            "{name} features: {} (word 1..={}-grams, char {}..={}-grams, min_df {}) from {} examples",
            f.dim(),
            h.word_ngrams,
            h.char_ngram_min,
            h.char_ngram_max,
            h.min_df,
            train.len()
        ));
        let labels = &self.prep.labels;
        check_bag(f.dim(), labels.len(), h)?;
        let data = TrainData {
            x_train: f.transform(&train_texts),
            y_train: label_ids(train, labels),
            x_val: f.transform(&texts(val)),
            y_val: label_ids(val, labels),
            labels: labels.len(),
            features: f.dim(),
        };
        // The stage's settings: the refit's epochs are the first fit's best epoch count, and a
        // refit checkpoint of another count (an earlier attempt's first fit) must not be resumed.
        let fp = fingerprint(hyper, labels, f.dim(), train, val);
        let (net, summary) = self.stage(name, h, fp, key).fit_bag::<B>(&f, &data, self.device, self.force_device_bag)?;
        Ok((net, f, summary))
    }

    /// Retrains the bag on train + validation for `epochs` (the first fit's best epoch count).
    fn refit_bag(&self, epochs: usize) -> Result<BagFit<B::InnerBackend>, JobError> {
        let hyper = Hyper { epochs: epochs.max(1), ..self.params.hyper.clone() };
        let all: Vec<Example> = self.prep.splits.train.iter().chain(&self.prep.splits.val).cloned().collect();
        self.env.log(format!("refit: retraining the bag on train + validation ({} examples) for {} epochs", all.len(), hyper.epochs));
        self.fit_bag_on(("bag-refit", REFIT_CHECKPOINT_KEY, &hyper), &all, &[])
    }

    /// Fits every network the run's `model` names, one after the other.
    fn fit_all(&self) -> Result<Fitted<B>, JobError> {
        let (h, prep, device) = (&self.params.hyper, self.prep, self.device);
        let (mut bag, mut conv, mut feats, mut seq) = (None, None, None, None);
        let (mut parts, mut stages) = (Vec::new(), Vec::new());
        if h.model.has_bag() {
            let (net, f, summary) = self.fit_bag_on(("bag", CHECKPOINT_KEY, h), &prep.splits.train, &prep.splits.val)?;
            parts.push(probabilities(&net.emb, &net.head, &f.transform(&texts(&prep.splits.val)), prep.labels.len(), device));
            stages.push(summary);
            (bag, feats) = (Some(net), Some(f));
        }
        if h.model.has_conv() {
            let (train_texts, val_texts) = (texts(&prep.splits.train), texts(&prep.splits.val));
            let s = SeqFeaturizer::fit(SeqConfig { max_tokens: h.max_tokens, subwords: 8, min_df: h.min_df }, &train_texts);
            self.env.log(format!(
                "word-order model: {} words and subwords, {} tokens × {} slots",
                s.vocab() - 1,
                h.max_tokens,
                s.config.subwords
            ));
            check_conv(s.vocab(), prep.labels.len(), train_texts.len() + val_texts.len(), s.config.subwords, h)?;
            let (x_train, x_val) = (s.transform(&train_texts), s.transform(&val_texts));
            let fp = fingerprint(h, &prep.labels, s.vocab(), &prep.splits.train, &prep.splits.val);
            let key = if h.model == ModelKind::Conv { CHECKPOINT_KEY } else { CONV_CHECKPOINT_KEY };
            let (net, summary) = self.stage("conv", h, fp, key).fit_conv::<B>(
                &s,
                (&x_train, &prep.y_train),
                (&x_val, &prep.y_val),
                prep.labels.len(),
                device,
            )?;
            parts.push(super::device_train::device_probabilities(&net, &x_val, device));
            stages.push(summary);
            (conv, seq) = (Some(net), Some(s));
        }
        if h.refit {
            let (net, f, summary) = self.refit_bag(stages[0].best_epoch)?;
            stages.push(summary);
            (bag, feats) = (Some(net), Some(f));
        }
        let config = ModelConfig {
            format: ModelConfig::format_for(h.model),
            model: h.model,
            labels: prep.labels.clone(),
            hidden: h.hidden,
            oos_label: prep.oos_label.clone(),
            oos_threshold: None,
            features: feats,
            seq,
            conv: h.model.has_conv().then_some((h.conv_dim, h.conv_filters)),
            weights: None,
            combine: if parts.len() > 1 { Combine::Geometric } else { Combine::Mean },
        };
        let mut predictor = Predictor { config, bag, conv, device: device.clone() };
        let how = predictor.config.combine;
        if parts.len() == 2 && !prep.y_val.is_empty() {
            let w = tune_weights(&parts, prep.labels.len(), &prep.y_val, how);
            self.env.log(format!("ensemble weights {:.2} (bag) / {:.2} (conv), {how:?} combination, tuned on validation", w[0], w[1]));
            predictor.config.weights = Some(w);
        }
        let val_probs = average(&parts, prep.labels.len(), predictor.config.weights.as_deref(), how);
        Ok(Fitted { predictor, val_probs, stages })
    }
}

/// The whole run on backend `B` (`force_device_bag`: the bag takes the device path even on the CPU).
pub fn run<B: AutodiffBackend>(
    env: &RunEnv,
    params: &TrainParams,
    spec: DeviceSpec,
    device: &B::Device,
    force_device_bag: bool,
) -> Result<Value, JobError> {
    let h = &params.hyper;
    env.log(format!(
        "intent-train job {} for bot {:?}: model {} on {spec} ({} CPU threads)",
        env.job_id,
        env.bot,
        h.model,
        rayon::current_num_threads()
    ));
    let prep = prepare(env, params)?;
    if h.refit && prep.splits.val.is_empty() {
        return Err(JobError::permanent("refit retrains the bag on train + validation, and this run has no validation data"));
    }
    let ctx = Ctx::<B> { env, params, prep: &prep, spec, device, force_device_bag };
    let Fitted { mut predictor, val_probs, stages } = ctx.fit_all()?;
    stop_if_cancelled(env, "evaluating the model")?;
    env.log(format!("training done: {}", stages_line(&stages)));
    predictor.config.oos_threshold = oos_threshold(env, &prep, h.oos_threshold, &val_probs);
    let result = super::publish::finish::<B>(env, params, spec, &prep, &predictor, &stages)?;
    env.log(format!("done in {:.1}s", env.elapsed()));
    env.put("training.log", env.log_text())?;
    Ok(result)
}

/// Ends a run whose stop was asked for (a cancel, or its timeout: the runtime has recorded
/// that already) before `what`: a training thread the runtime gave up on must not go on to
/// write the model or promote it.
pub(super) fn stop_if_cancelled(env: &RunEnv, what: &str) -> Result<(), JobError> {
    if env.cancel.is_cancelled() {
        return Err(JobError::cancelled(format!("stopped before {what}")));
    }
    Ok(())
}

/// How each network's training went, on one line.
fn stages_line(stages: &[StageSummary]) -> String {
    let stage = |s: &StageSummary| {
        let early = if s.stopped_early { ", early stop" } else { "" };
        format!("{} {} epochs{early} (best {})", s.model, s.epochs_run, s.best_epoch)
    };
    stages.iter().map(stage).collect::<Vec<_>>().join("; ")
}

/// The OOS threshold: none without an OOS label, the job's when it sets one, else tuned on
/// the validation probabilities (none without validation data).
fn oos_threshold(env: &RunEnv, prep: &Prepared, set: Option<f32>, val_probs: &[f32]) -> Option<f32> {
    let oos = prep.oos?;
    if set.is_some() || prep.y_val.is_empty() {
        return set;
    }
    let (t, ins, rec) = tune_threshold(val_probs, prep.labels.len(), &prep.y_val, oos);
    env.log(format!("OOS threshold {t:.2} tuned on validation (in-scope accuracy {ins:.4}, OOS recall {rec:.4})"));
    Some(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuda_panics_are_transient_and_name_out_of_memory() {
        let oom: Box<dyn std::any::Any + Send> = Box::new(String::from("CUDA_ERROR_OUT_OF_MEMORY: out of memory while allocating 2 GiB"));
        let e = cuda_failure(DeviceSpec::Cuda(1), oom.as_ref());
        assert_eq!(e.kind, trainyard_common::ErrorKind::Transient);
        assert!(e.message.starts_with("CUDA out of memory on cuda:1"), "{}", e.message);
        let other: Box<dyn std::any::Any + Send> = Box::new("kernel launch failed");
        let e = cuda_failure(DeviceSpec::Cuda(0), other.as_ref());
        assert_eq!(e.kind, trainyard_common::ErrorKind::Transient);
        assert!(e.message.contains("the CUDA backend failed on cuda:0: kernel launch failed"), "{}", e.message);
    }

    /// A refit's checkpoint names its own epoch count: one an earlier attempt wrote for another
    /// best epoch (5) was resumed by a refit of 3, and its empty loop returned the 5-epoch bag.
    #[test]
    fn a_checkpoint_fingerprint_names_the_stages_epochs() {
        let h = TrainParams::parse(&serde_json::json!({"dataset": "x.csv", "epochs": 20})).unwrap().hyper;
        let rows = [Example::new("hello", "a"), Example::new("bye", "b")];
        let labels = ["a".to_string(), "b".to_string()];
        let print = |epochs| fingerprint(&Hyper { epochs, ..h.clone() }, &labels, 10, &rows, &[]);
        assert_ne!(print(5), print(3));
        assert_eq!(print(5), print(5));
    }
}
