//! Fitting one network of a run: the bag (sparse CPU path or device path) and the
//! word-order model, each with its own checkpoint, resume, progress and cancellation.
//!
//! A stage resumes only from a checkpoint its own path wrote for the same data and
//! settings; any other checkpoint is refused with a log line saying why, and the
//! stage starts afresh. Checkpoints are written in the background while the next
//! epoch trains; each write waits for the previous one, and the stage for the last.

use std::{
    cell::RefCell,
    sync::atomic::{AtomicBool, Ordering},
};

use burn::tensor::backend::AutodiffBackend;
use serde_json::json;

use super::{
    checkpoint::{self, EpochLog, Resumable, PATH_SPARSE},
    device::{gpu_memory_in_use, DeviceSpec},
    device_train::{train_device, DeviceData, RunId},
    env::RunEnv,
    features::Featurizer,
    nets::{ConvNet, ConvShape, DenseBag},
    params::Hyper,
    predict::BagNet,
    seq::{Padded, SeqFeaturizer},
    sparse::EmbeddingBag,
    train::{train, Hooks, RunLog, TrainData, TrainError},
};
use crate::handler::JobError;

/// Key (under the run's prefix) of the bag's checkpoint (and of a word-order model trained alone).
pub const CHECKPOINT_KEY: &str = "checkpoints/latest.ckpt";
/// Key of the word-order model's checkpoint in an ensemble.
pub const CONV_CHECKPOINT_KEY: &str = "checkpoints/conv.ckpt";
/// Key of the checkpoint of the bag retrained on train + validation (`refit`).
pub const REFIT_CHECKPOINT_KEY: &str = "checkpoints/refit.ckpt";
/// Every checkpoint a run may write.
pub const CHECKPOINT_KEYS: [&str; 3] = [CHECKPOINT_KEY, CONV_CHECKPOINT_KEY, REFIT_CHECKPOINT_KEY];

/// The bag's device training path.
pub const PATH_DEVICE_BAG: &str = "device-bag";
/// The word-order model's training path.
pub const PATH_CONV: &str = "conv";

/// How a stage went.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StageSummary {
    /// `bag`, `conv` or `bag-refit`.
    pub model: &'static str,
    /// The training path (`sparse`, `device-bag`, `conv`).
    pub path: &'static str,
    /// Epochs run, including those before a resume.
    pub epochs_run: usize,
    /// The epoch whose weights were kept.
    pub best_epoch: usize,
    /// Did early stopping end it?
    pub stopped_early: bool,
    /// The epoch a checkpoint resumed from.
    pub resumed_from_epoch: Option<usize>,
    /// Every epoch.
    #[serde(skip)]
    pub log: Vec<EpochLog>,
}

/// What a stage needs besides its data.
pub struct Stage<'a> {
    /// The network's name in logs, progress and the result (`bag`, `conv`, `bag-refit`).
    pub name: &'static str,
    /// The run.
    pub env: &'a RunEnv,
    /// Settings.
    pub hyper: &'a Hyper,
    /// The concrete device (`cpu` or `cuda:N`).
    pub device: DeviceSpec,
    /// Fingerprint of the run (data, labels, settings).
    pub fingerprint: String,
    /// Where its checkpoint lives.
    pub checkpoint_key: &'static str,
}

fn job_error(e: TrainError) -> JobError {
    match e {
        TrainError::Cancelled(_) => JobError::cancelled(e.to_string()),
        TrainError::Diverged(_) => JobError::permanent(e.to_string()),
        TrainError::Checkpoint { .. } | TrainError::Record(_) | TrainError::Resume(_) => JobError::transient(e.to_string()),
    }
}

impl Stage<'_> {
    fn run_id<'b>(&'b self, path: &'b str) -> RunId<'b> {
        RunId { path, fingerprint: &self.fingerprint }
    }

    /// The stage's checkpoint when it can resume from it; otherwise `None`, with the reason logged.
    fn resume(&self, path: &str) -> Result<Option<Resumable>, JobError> {
        if !self.env.resume {
            return Ok(None);
        }
        let Some(bytes) = self.env.get(self.checkpoint_key)? else { return Ok(None) };
        match checkpoint::decode_any(&bytes) {
            Ok(ck) if ck.meta().fingerprint != self.fingerprint => {
                self.env.log("a checkpoint exists but was made for other data or settings: starting afresh");
                Ok(None)
            }
            Ok(ck) if ck.path() != path => {
                self.env.log(format!(
                    "refusing the checkpoint of epoch {}: it was written by the {} training path, and this run trains on the {path} path \
                     (device {}); starting afresh",
                    ck.meta().epoch,
                    ck.path(),
                    self.device
                ));
                Ok(None)
            }
            Ok(ck) => {
                self.env.log(format!("resuming from the checkpoint of epoch {} ({} path)", ck.meta().epoch, ck.path()));
                Ok(Some(ck))
            }
            Err(e) => {
                self.env.log(format!("ignoring an unreadable checkpoint ({e}): starting afresh"));
                Ok(None)
            }
        }
    }

    /// Runs `train` from `resume`, with hooks; when the checkpoint's weights do not load,
    /// says so and runs it again from the start: a retry would read the same checkpoint and
    /// fail again, every attempt, and the job could never succeed.
    fn train_from<C, T>(&self, resume: Option<C>, train: impl Fn(Option<C>, Hooks<'_>) -> Result<T, TrainError>) -> Result<T, JobError> {
        match self.with_hooks(|hooks| train(resume, hooks))? {
            Err(TrainError::Resume(e)) => {
                self.env.log(format!("the checkpoint's weights do not load ({e}): starting afresh"));
                self.with_hooks(|hooks| train(None, hooks))?.map_err(job_error)
            }
            out => out.map_err(job_error),
        }
    }

    /// Runs `body` with hooks that save checkpoints, report progress (tagged with the
    /// model and device) and honour cancellation and `stop_after_epoch`. The outer error is a
    /// checkpoint that was not saved.
    fn with_hooks<T>(&self, body: impl FnOnce(Hooks<'_>) -> Result<T, TrainError>) -> Result<Result<T, TrainError>, JobError> {
        let (env, model) = (self.env, self.name);
        let cut = AtomicBool::new(false);
        let cancelled = || env.cancel.is_cancelled() || cut.load(Ordering::Relaxed);
        let pending: RefCell<Option<tokio::task::JoinHandle<Result<(), String>>>> = RefCell::default();
        let wait_pending = || -> Result<(), String> {
            match pending.borrow_mut().take() {
                Some(h) => env.rt.block_on(h).map_err(|e| format!("checkpoint writer failed: {e}"))?,
                None => Ok(()),
            }
        };
        let mut save = |epoch: usize, bytes: Vec<u8>| -> Result<(), String> {
            wait_pending()?;
            let key = env.key(self.checkpoint_key);
            let (store, meta_key) = (env.store.clone(), format!("{}.json", key.trim_end_matches(".ckpt")));
            let meta =
                serde_json::to_vec(&json!({"epoch": epoch, "fingerprint": self.fingerprint, "model": model})).map_err(|e| e.to_string())?;
            *pending.borrow_mut() = Some(env.rt.spawn(async move {
                store.put(&key, bytes).await.map_err(|e| e.to_string())?;
                store.put(&meta_key, meta).await.map_err(|e| e.to_string())
            }));
            Ok(())
        };
        let device = self.device.to_string();
        let mut progress = |l: &EpochLog| {
            let memory = gpu_memory_in_use(self.device);
            env.log(format!(
                "{model} epoch {}/{} on {device}: loss {:.4}, validation accuracy {:.4}, {:.0} examples/s, {:.2}s{}",
                l.epoch,
                l.epochs,
                l.loss,
                l.val_accuracy,
                l.examples_per_s,
                l.seconds,
                memory.map(|b| format!(", GPU memory in use {:.1} MiB", b as f64 / 1048576.0)).unwrap_or_default()
            ));
            let mut p = json!({
                "epoch": l.epoch, "epochs": l.epochs, "loss": l.loss, "val_accuracy": l.val_accuracy,
                "examples_per_s": l.examples_per_s, "epoch_seconds": l.seconds, "device": device, "model": model,
            });
            if let Some(b) = memory {
                p["gpu_memory_bytes"] = json!(b);
            }
            env.progress.report(p);
            if env.stop_after_epoch == Some(l.epoch) {
                cut.store(true, Ordering::Relaxed);
            }
        };
        let out = body(Hooks { cancelled: &cancelled, save: &mut save, progress: &mut progress });
        wait_pending().map_err(|e| JobError::transient(format!("failed to save a checkpoint: {e}")))?;
        Ok(out)
    }

    /// Trains the bag: the sparse path on the CPU, the device path elsewhere (or when `force_device`).
    pub fn fit_bag<B: AutodiffBackend>(
        &self,
        feats: &Featurizer,
        data: &TrainData,
        device: &B::Device,
        force_device: bool,
    ) -> Result<(BagNet<B::InnerBackend>, StageSummary), JobError> {
        let h = self.hyper;
        if self.device == DeviceSpec::Cpu && !force_device {
            let resume = match self.resume(PATH_SPARSE)? {
                Some(Resumable::Sparse(ck)) => Some(ck),
                _ => None,
            };
            let t = self.train_from(resume, |resume, hooks| train::<B>(h, data, &self.fingerprint, resume, device, hooks))?;
            let summary = summary(self.name, PATH_SPARSE, t.run);
            return Ok((BagNet { emb: t.emb, head: t.head }, summary));
        }
        let resume = match self.resume(PATH_DEVICE_BAG)? {
            Some(Resumable::Device(ck)) => Some(ck),
            _ => None,
        };
        let width = data.x_train.longest_row().max(data.x_val.longest_row());
        super::limits::check_padded_rows(data.x_train.rows() + data.x_val.rows(), width, h)?;
        let dd = DeviceData {
            x_train: Padded::from_csr(&data.x_train),
            y_train: data.y_train.clone(),
            x_val: Padded::from_csr(&data.x_val),
            y_val: data.y_val.clone(),
        };
        let mut rng = rand::SeedableRng::seed_from_u64(h.seed);
        let init = DenseBag::<B>::init(feats.dim(), h.hidden, data.labels, &mut rng, device);
        let t = self
            .train_from(resume, |resume, hooks| train_device(h, self.run_id(PATH_DEVICE_BAG), &dd, init.clone(), resume, device, hooks))?;
        let emb = EmbeddingBag::from_weights(feats.dim(), h.hidden, t.model.table_rows());
        let summary = summary(self.name, PATH_DEVICE_BAG, t.run);
        Ok((BagNet { emb, head: t.model.head }, summary))
    }

    /// Trains the word-order model on `device`.
    pub fn fit_conv<B: AutodiffBackend>(
        &self,
        seq: &SeqFeaturizer,
        train_texts: (&Padded, &[usize]),
        val: (&Padded, &[usize]),
        labels: usize,
        device: &B::Device,
    ) -> Result<(ConvNet<B::InnerBackend>, StageSummary), JobError> {
        let h = self.hyper;
        let resume = match self.resume(PATH_CONV)? {
            Some(Resumable::Device(ck)) => Some(ck),
            _ => None,
        };
        let dd =
            DeviceData { x_train: train_texts.0.clone(), y_train: train_texts.1.to_vec(), x_val: val.0.clone(), y_val: val.1.to_vec() };
        let shape = ConvShape {
            vocab: seq.vocab(),
            dim: h.conv_dim,
            filters: h.conv_filters,
            tokens: seq.config.max_tokens,
            subwords: seq.config.subwords,
            labels,
        };
        let mut rng = rand::SeedableRng::seed_from_u64(h.seed ^ 0xC0_4E);
        let init = ConvNet::<B>::init(shape, &mut rng, device);
        let t =
            self.train_from(resume, |resume, hooks| train_device(h, self.run_id(PATH_CONV), &dd, init.clone(), resume, device, hooks))?;
        let summary = summary(self.name, PATH_CONV, t.run);
        Ok((t.model, summary))
    }
}

fn summary(model: &'static str, path: &'static str, run: RunLog) -> StageSummary {
    StageSummary {
        model,
        path,
        epochs_run: run.log.len(),
        best_epoch: run.best_epoch,
        stopped_early: run.stopped_early,
        resumed_from_epoch: run.resumed_from_epoch,
        log: run.log,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trainyard_common::ErrorKind;

    /// A diverged run fails for good (every attempt would diverge again); a checkpoint that does
    /// not load, or one not saved, is worth another attempt.
    #[test]
    fn a_diverged_run_is_permanent_and_an_unloadable_checkpoint_transient() {
        assert_eq!(job_error(TrainError::Diverged(3)).kind, ErrorKind::Permanent);
        assert_eq!(job_error(TrainError::Resume("bad bytes".into())).kind, ErrorKind::Transient);
        assert_eq!(job_error(TrainError::Checkpoint { epoch: 2, reason: "503".into() }).kind, ErrorKind::Transient);
        assert_eq!(job_error(TrainError::Cancelled(1)).kind, ErrorKind::Cancelled);
    }
}
