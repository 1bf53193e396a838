//! The training loop, generic over a burn [`AutodiffBackend`].
//!
//! Per step: the embedding bag runs on the CPU ([`EmbeddingBag::forward`]); its
//! output enters burn as a leaf tensor that requires a gradient; burn computes
//! the head's loss, its parameter gradients (stepped by burn's Adam) and the
//! gradient w.r.t. the bag output, which drives the sparse lazy-Adam update of
//! the table. Dropout masks come from our own seeded RNG, so a run depends only
//! on its seed (not on burn's global RNG, nor on other runs in the process).
//!
//! After every epoch: validation accuracy, early stopping (best weights kept),
//! a checkpoint through the caller's hook, a progress report. A run restarted
//! from a checkpoint continues exactly where it stopped.

use std::time::Instant;

use burn::{
    module::{AutodiffModule, Module},
    optim::{adaptor::OptimizerAdaptor, Adam, AdamConfig, GradientsParams, Optimizer},
    record::Recorder,
    tensor::backend::AutodiffBackend,
};
use rand::{rngs::StdRng, seq::SliceRandom, Rng, SeedableRng};

use super::{
    checkpoint::{self, Checkpoint, CheckpointMeta, EpochLog},
    features::Csr,
    model::{tensor2, to_vec, BytesRecorder, Head},
    nets::load_record,
    params::Hyper,
    predict::{decide, probabilities},
    sparse::{AdamParams, EmbeddingBag},
};

/// Featurised data: training and validation matrices and label indices.
#[derive(Debug, Clone)]
pub struct TrainData {
    /// Training rows.
    pub x_train: Csr,
    /// Their labels.
    pub y_train: Vec<usize>,
    /// Validation rows (may be empty).
    pub x_val: Csr,
    /// Their labels.
    pub y_val: Vec<usize>,
    /// Number of labels.
    pub labels: usize,
    /// Number of features.
    pub features: usize,
}

/// Why training stopped without a model.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrainError {
    /// Cancellation was requested.
    #[error("training cancelled during epoch {0}")]
    Cancelled(usize),
    /// Saving a checkpoint failed.
    #[error("failed to save the checkpoint of epoch {epoch}: {reason}")]
    Checkpoint {
        /// The epoch.
        epoch: usize,
        /// The cause.
        reason: String,
    },
    /// A burn record could not be (de)serialised.
    #[error("{0}")]
    Record(String),
    /// The checkpoint to resume from holds weights this build does not load (a record format
    /// an upgrade changed): the stage starts afresh rather than fail every attempt on it.
    #[error("the checkpoint's weights do not load: {0}")]
    Resume(String),
    /// The loss is no longer a number: the run diverged, and every attempt would.
    #[error("the training loss is not a number after epoch {0}: training diverged; try a lower `lr`")]
    Diverged(usize),
}

/// The callbacks of a run.
pub struct Hooks<'a> {
    /// Is cancellation requested? Checked before every step.
    pub cancelled: &'a (dyn Fn() -> bool + Sync),
    /// Called with the encoded checkpoint after every epoch.
    pub save: &'a mut dyn FnMut(usize, Vec<u8>) -> Result<(), String>,
    /// Called after every epoch (after its checkpoint is saved).
    pub progress: &'a mut dyn FnMut(&EpochLog),
}

/// How a training run went (either path).
#[derive(Debug, Clone)]
pub struct RunLog {
    /// Every epoch (including those before a resume).
    pub log: Vec<EpochLog>,
    /// The epoch a checkpoint resumed from, if any.
    pub resumed_from_epoch: Option<usize>,
    /// The epoch whose weights were kept.
    pub best_epoch: usize,
    /// Did early stopping end the run?
    pub stopped_early: bool,
}

/// A trained model (best validation epoch) and how the run went.
#[derive(Debug)]
pub struct Trained<B: AutodiffBackend> {
    /// The table, weights only.
    pub emb: EmbeddingBag,
    /// The head, for inference.
    pub head: Head<B::InnerBackend>,
    /// How the run went.
    pub run: RunLog,
}

/// A burn record error as a training error.
pub(crate) fn rec_err(e: impl std::fmt::Display) -> TrainError {
    TrainError::Record(e.to_string())
}

/// A checkpoint's record that does not load, as a training error.
pub(crate) fn resume_err(e: impl std::fmt::Display) -> TrainError {
    TrainError::Resume(e.to_string())
}

/// Validation accuracy (arg-max) of the current weights; 0 with no validation data.
fn val_accuracy<B: AutodiffBackend>(emb: &EmbeddingBag, head: &Head<B>, data: &TrainData, device: &B::Device) -> f64 {
    if data.y_val.is_empty() {
        return 0.0;
    }
    let inner = head.valid();
    let p = probabilities(emb, &inner, &data.x_val, data.labels, &device.clone());
    let pred = decide(&p, data.labels, None, None);
    pred.iter().zip(&data.y_val).filter(|(a, b)| a == b).count() as f64 / data.y_val.len() as f64
}

impl RunLog {
    /// How a run whose last state is `meta` went.
    pub(crate) fn ended(meta: CheckpointMeta, resumed_from_epoch: Option<usize>, cfg: &Hyper) -> Self {
        let stopped_early = meta.patience_spent(cfg.patience) && meta.epoch < cfg.epochs;
        Self { best_epoch: meta.best_epoch, log: meta.log, resumed_from_epoch, stopped_early }
    }
}

/// The log of `epoch`, which trained `n` examples to a summed loss of `loss_sum` in
/// `train_secs` and began at `started`, with its validation accuracy; an error when the loss
/// is not a finite number (it went into the checkpoint as `null`, which no resume reads).
pub(crate) fn epoch_log(
    cfg: &Hyper,
    epoch: usize,
    n: usize,
    loss_sum: f64,
    val_accuracy: f64,
    train_secs: f64,
    started: Instant,
) -> Result<EpochLog, TrainError> {
    if !loss_sum.is_finite() {
        return Err(TrainError::Diverged(epoch));
    }
    Ok(EpochLog {
        epoch,
        epochs: cfg.epochs,
        loss: loss_sum / n.max(1) as f64,
        val_accuracy,
        examples_per_s: n as f64 / train_secs.max(1e-9),
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Trains (or resumes from `resume`) and returns the best model.
pub fn train<B: AutodiffBackend>(
    cfg: &Hyper,
    data: &TrainData,
    fingerprint: &str,
    resume: Option<Checkpoint>,
    device: &B::Device,
    mut hooks: Hooks<'_>,
) -> Result<Trained<B>, TrainError> {
    let recorder = BytesRecorder::default();
    let mut run = SparseRun::<B>::start(cfg, data, fingerprint, resume, device)?;
    let n = data.y_train.len();
    let total_steps = n.div_ceil(cfg.batch_size).max(1) * cfg.epochs;
    for epoch in run.meta.epoch + 1..=cfg.epochs {
        if run.meta.patience_spent(cfg.patience) {
            break;
        }
        let t0 = Instant::now();
        let loss_sum;
        (run, loss_sum) = run.train_epoch(cfg, data, epoch, total_steps, device, hooks.cancelled)?;
        let train_secs = t0.elapsed().as_secs_f64();
        let val = val_accuracy(&run.emb, &run.head, data, device);
        let log = epoch_log(cfg, epoch, n, loss_sum, val, train_secs, t0)?;
        run.end_epoch(log, data, &recorder, &mut hooks)?;
    }
    run.finish(cfg, device)
}

/// A run on the sparse path: the table, the head and its optimizer, early stopping and the
/// best weights so far.
struct SparseRun<B: AutodiffBackend> {
    emb: EmbeddingBag,
    head: Head<B>,
    optim: OptimizerAdaptor<Adam, Head<B>, B>,
    meta: CheckpointMeta,
    /// The best epoch's table weights and head record, when they are known.
    best: Option<(Vec<f32>, Vec<u8>)>,
    resumed_from_epoch: Option<usize>,
}

impl<B: AutodiffBackend> SparseRun<B> {
    /// A fresh run from the seed, or `resume` when the same run wrote it.
    fn start(cfg: &Hyper, data: &TrainData, fingerprint: &str, resume: Option<Checkpoint>, device: &B::Device) -> Result<Self, TrainError> {
        let mut init_rng = StdRng::seed_from_u64(cfg.seed);
        let scale = (3.0 / cfg.hidden as f32).sqrt() * 0.1;
        let emb = EmbeddingBag::new(data.features, cfg.hidden, scale, &mut init_rng);
        let head = Head::<B>::init(cfg.hidden, data.labels, &mut init_rng, device);
        let optim = AdamConfig::new().with_epsilon(1e-8).init::<B, Head<B>>();
        let meta = CheckpointMeta::new(fingerprint, checkpoint::PATH_SPARSE);
        let fresh = Self { emb, head, optim, meta, best: None, resumed_from_epoch: None };
        let fits = |ck: &Checkpoint| {
            ck.meta.fingerprint == fingerprint
                && ck.meta.path == checkpoint::PATH_SPARSE
                && ck.emb.rows == data.features
                && ck.emb.dim == cfg.hidden
        };
        match resume.filter(fits) {
            Some(ck) => fresh.resume(ck, device),
            None => Ok(fresh),
        }
    }

    /// Takes the weights, optimizer state and early stopping of `ck`.
    fn resume(mut self, ck: Checkpoint, device: &B::Device) -> Result<Self, TrainError> {
        self.head = self.head.load_record(load_record(ck.head.clone(), device).map_err(resume_err)?);
        self.optim = self.optim.load_record(load_record(ck.optim, device).map_err(resume_err)?);
        self.best = ck.best.or_else(|| (ck.meta.best_epoch > 0).then(|| (ck.emb.weight.clone(), ck.head.clone())));
        // The best head loads at the end: found unloadable there, every attempt would fail.
        if let Some((_, best)) = &self.best {
            load_record::<B, <Head<B> as Module<B>>::Record>(best.clone(), device).map_err(resume_err)?;
        }
        self.emb = ck.emb;
        self.resumed_from_epoch = Some(ck.meta.epoch);
        self.meta = ck.meta;
        Ok(self)
    }

    /// Trains one epoch and returns the run and its summed loss. The run goes in and out by
    /// value because burn's optimizer step takes the head by value.
    fn train_epoch(
        mut self,
        cfg: &Hyper,
        data: &TrainData,
        epoch: usize,
        total_steps: usize,
        device: &B::Device,
        cancelled: &(dyn Fn() -> bool + Sync),
    ) -> Result<(Self, f64), TrainError> {
        let (order, mut rng) = epoch_order(cfg.seed, epoch, data.y_train.len());
        let keep = 1.0 - cfg.dropout;
        let mut loss_sum = 0.0f64;
        for batch in order.chunks(cfg.batch_size) {
            if cancelled() {
                return Err(TrainError::Cancelled(epoch));
            }
            let lr = learning_rate(cfg.lr, self.emb.step as usize, total_steps);
            let b = batch.len();
            let x = batch_rows(&data.x_train, batch, cfg.feature_dropout, &mut rng);
            let rows: Vec<usize> = (0..b).collect();
            let bag_t = tensor2::<B>(self.emb.forward(&x, &rows), b, cfg.hidden, device).require_grad();
            let mask = (cfg.dropout > 0.0).then(|| {
                let m: Vec<f32> = (0..b * cfg.hidden).map(|_| if rng.random::<f32>() < keep { 1.0 / keep } else { 0.0 }).collect();
                tensor2::<B>(m, b, cfg.hidden, device)
            });
            let targets: Vec<i64> = batch.iter().map(|&i| data.y_train[i] as i64).collect();
            let loss = Head::<B>::loss(self.head.forward(bag_t.clone(), mask), &targets, cfg.label_smoothing, device);
            let grads = loss.backward();
            let g_bag = bag_t.grad(&grads).map(to_vec).unwrap_or_else(|| vec![0.0; b * cfg.hidden]);
            let params = GradientsParams::from_grads(grads, &self.head);
            self.head = self.optim.step(lr, self.head, params);
            self.emb.update(&x, &rows, &g_bag, lr as f32, AdamParams::default());
            loss_sum += f64::from(to_vec(loss.detach())[0]) * b as f64;
        }
        Ok((self, loss_sum))
    }

    /// Ends an epoch: early stopping, the best weights, the checkpoint, the progress report.
    fn end_epoch(&mut self, log: EpochLog, data: &TrainData, recorder: &BytesRecorder, hooks: &mut Hooks<'_>) -> Result<(), TrainError> {
        let epoch = log.epoch;
        let head_bytes = recorder.record(self.head.clone().into_record(), ()).map_err(rec_err)?;
        if self.meta.end_epoch(log.clone(), !data.y_val.is_empty()) {
            self.best = Some((self.emb.weight.clone(), head_bytes.clone()));
        }
        let optim_bytes = recorder.record(self.optim.to_record(), ()).map_err(rec_err)?;
        // The best weights travel separately only when they are not the current ones.
        let best_part = self.best.as_ref().filter(|_| self.meta.best_is_earlier()).map(|(w, h)| (w.as_slice(), h.as_slice()));
        let bytes = checkpoint::encode(&self.meta, &self.emb, &head_bytes, &optim_bytes, best_part);
        (hooks.save)(epoch, bytes).map_err(|reason| TrainError::Checkpoint { epoch, reason })?;
        (hooks.progress)(&log);
        Ok(())
    }

    /// The best epoch's model (weights only) and how the run went.
    fn finish(self, cfg: &Hyper, device: &B::Device) -> Result<Trained<B>, TrainError> {
        let Self { mut emb, head, meta, best, resumed_from_epoch, .. } = self;
        let head = match best.filter(|_| meta.best_is_earlier()) {
            Some((weight, h)) => {
                emb.weight = weight;
                head.load_record(load_record(h, device).map_err(rec_err)?)
            }
            None => head,
        };
        emb.m = Vec::new();
        emb.v = Vec::new();
        Ok(Trained { emb, head: head.valid(), run: RunLog::ended(meta, resumed_from_epoch, cfg) })
    }
}

/// The shuffled example order of an epoch and the RNG it leaves (for dropout), from the job's seed.
pub fn epoch_order(seed: u64, epoch: usize, n: usize) -> (Vec<usize>, StdRng) {
    let mut rng = StdRng::seed_from_u64(seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut rng);
    (order, rng)
}

/// The learning rate at `step` of `total`: `base`, decayed linearly to 10% of it.
pub fn learning_rate(base: f64, step: usize, total: usize) -> f64 {
    base * (1.0 - 0.9 * step as f64 / total.max(1) as f64).max(0.1)
}

/// The rows of `batch` as their own matrix, with feature dropout ([`drop_row`]).
fn batch_rows(x: &Csr, batch: &[usize], drop: f32, rng: &mut StdRng) -> Csr {
    let mut out = Csr { indptr: Vec::with_capacity(batch.len() + 1), ..Csr::default() };
    out.indptr.push(0);
    let mut kept = Vec::new();
    for &r in batch {
        let (idx, val) = x.row(r);
        kept.clear();
        kept.extend_from_slice(val);
        drop_row(&mut kept, drop, rng);
        for (&j, &v) in idx.iter().zip(&kept) {
            if drop <= 0.0 || v != 0.0 {
                out.indices.push(j);
                out.values.push(v);
            }
        }
        out.indptr.push(out.indices.len());
    }
    out
}

/// Feature dropout of one row's weights, in place, for both training paths: each non-zero
/// weight is dropped (set to 0) with probability `drop` and the kept ones are scaled by
/// `1 / (1 - drop)`; a row that would lose all of them keeps its largest, scaled. Zeros (a
/// padded row's empty slots) draw nothing and stay 0.
pub(super) fn drop_row(vals: &mut [f32], drop: f32, rng: &mut StdRng) {
    if drop <= 0.0 {
        return;
    }
    let scale = 1.0 / (1.0 - drop);
    let Some(largest) = (0..vals.len()).filter(|&k| vals[k] != 0.0).max_by(|&a, &b| vals[a].total_cmp(&vals[b])) else {
        return;
    };
    let kept_largest = vals[largest] * scale;
    let mut kept = false;
    for v in vals.iter_mut().filter(|v| **v != 0.0) {
        if rng.random::<f32>() >= drop {
            *v *= scale;
            kept = true;
        } else {
            *v = 0.0;
        }
    }
    if !kept {
        vals[largest] = kept_largest;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_stopped_early_only_when_its_patience_ran_out_before_the_last_epoch() {
        let cfg = Hyper { epochs: 5, patience: 2, ..Hyper::default() };
        let meta = |epoch, stale| CheckpointMeta { epoch, stale, best_epoch: 1, ..CheckpointMeta::new("f", "conv") };
        assert!(RunLog::ended(meta(3, 2), Some(2), &cfg).stopped_early);
        assert!(!RunLog::ended(meta(5, 2), None, &cfg).stopped_early, "the last epoch ran: the run ended, not stopped early");
        assert!(!RunLog::ended(meta(5, 0), None, &cfg).stopped_early);
        let run = RunLog::ended(meta(3, 1), Some(2), &cfg);
        assert_eq!((run.stopped_early, run.best_epoch, run.resumed_from_epoch), (false, 1, Some(2)));
    }

    /// An epoch whose loss is not a finite number ends the run as diverged (a permanent error
    /// naming `lr`): logged, the loss went into the checkpoint as `null`, which no resume read,
    /// so every retry began again at epoch 0.
    #[test]
    fn an_epoch_whose_loss_is_not_a_number_is_a_diverged_run() {
        let cfg = Hyper::default();
        for bad in [f64::NAN, f64::INFINITY] {
            let e = epoch_log(&cfg, 4, 10, bad, 0.5, 1.0, Instant::now()).unwrap_err();
            assert!(matches!(e, TrainError::Diverged(4)), "{e}");
            assert!(e.to_string().contains("`lr`"), "{e}");
        }
        let log = epoch_log(&cfg, 4, 10, 5.0, 0.5, 1.0, Instant::now()).unwrap();
        assert_eq!((log.epoch, log.loss), (4, 0.5));
        let meta = serde_json::to_vec(&log).unwrap();
        assert!(serde_json::from_slice::<EpochLog>(&meta).is_ok(), "a finite loss reads back");
    }
}
