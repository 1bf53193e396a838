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
    optim::{AdamConfig, GradientsParams, Optimizer},
    record::Recorder,
    tensor::backend::AutodiffBackend,
};
use rand::{rngs::StdRng, seq::SliceRandom, Rng, SeedableRng};

use super::{
    checkpoint::{self, Checkpoint, CheckpointMeta, EpochLog},
    features::Csr,
    model::{tensor2, to_vec, BytesRecorder, Head},
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

/// Trains (or resumes from `resume`) and returns the best model.
pub fn train<B: AutodiffBackend>(
    cfg: &Hyper,
    data: &TrainData,
    fingerprint: &str,
    resume: Option<Checkpoint>,
    device: &B::Device,
    hooks: Hooks<'_>,
) -> Result<Trained<B>, TrainError> {
    let mut init_rng = StdRng::seed_from_u64(cfg.seed);
    let scale = (3.0 / cfg.hidden as f32).sqrt() * 0.1;
    let mut emb = EmbeddingBag::new(data.features, cfg.hidden, scale, &mut init_rng);
    let mut head = Head::<B>::init(cfg.hidden, data.labels, &mut init_rng, device);
    let mut optim = AdamConfig::new().with_epsilon(1e-8).init::<B, Head<B>>();
    let recorder = BytesRecorder::default();
    let mut meta = CheckpointMeta {
        fingerprint: fingerprint.into(),
        epoch: 0,
        best_epoch: 0,
        best_val: -1.0,
        stale: 0,
        log: Vec::new(),
        path: checkpoint::PATH_SPARSE.into(),
    };
    let mut best: Option<(Vec<f32>, Vec<u8>)> = None;
    let mut resumed_from_epoch = None;
    let fits = |ck: &Checkpoint| {
        ck.meta.fingerprint == fingerprint
            && ck.meta.path == checkpoint::PATH_SPARSE
            && ck.emb.rows == data.features
            && ck.emb.dim == cfg.hidden
    };
    if let Some(ck) = resume.filter(fits) {
        let head_rec = Recorder::<B>::load(&recorder, ck.head.clone(), device).map_err(rec_err)?;
        head = head.load_record(head_rec);
        let optim_rec = Recorder::<B>::load(&recorder, ck.optim, device).map_err(rec_err)?;
        optim = optim.load_record(optim_rec);
        best = ck.best.or_else(|| (ck.meta.best_epoch > 0).then(|| (ck.emb.weight.clone(), ck.head.clone())));
        emb = ck.emb;
        resumed_from_epoch = Some(ck.meta.epoch);
        meta = ck.meta;
    }
    let n = data.y_train.len();
    let steps_per_epoch = n.div_ceil(cfg.batch_size).max(1);
    let total_steps = steps_per_epoch * cfg.epochs;
    let adam = AdamParams::default();
    let keep = 1.0 - cfg.dropout;
    let mut stopped_early = false;
    let start_epoch = meta.epoch + 1;
    if meta.stale >= cfg.patience {
        stopped_early = true;
    }
    for epoch in start_epoch..=cfg.epochs {
        if stopped_early {
            break;
        }
        let t0 = Instant::now();
        let (order, mut rng) = epoch_order(cfg.seed, epoch, n);
        let mut loss_sum = 0.0f64;
        for batch in order.chunks(cfg.batch_size) {
            if (hooks.cancelled)() {
                return Err(TrainError::Cancelled(epoch));
            }
            let lr = learning_rate(cfg.lr, emb.step as usize, total_steps);
            let b = batch.len();
            let x = batch_rows(&data.x_train, batch, cfg.feature_dropout, &mut rng);
            let rows: Vec<usize> = (0..b).collect();
            let bag = emb.forward(&x, &rows);
            let bag_t = tensor2::<B>(bag, b, cfg.hidden, device).require_grad();
            let mask = (cfg.dropout > 0.0).then(|| {
                let m: Vec<f32> = (0..b * cfg.hidden).map(|_| if rng.random::<f32>() < keep { 1.0 / keep } else { 0.0 }).collect();
                tensor2::<B>(m, b, cfg.hidden, device)
            });
            let targets: Vec<i64> = batch.iter().map(|&i| data.y_train[i] as i64).collect();
            let logits = head.forward(bag_t.clone(), mask);
            let loss = Head::<B>::loss(logits, &targets, cfg.label_smoothing, device);
            let grads = loss.backward();
            let g_bag = bag_t.grad(&grads).map(to_vec).unwrap_or_else(|| vec![0.0; b * cfg.hidden]);
            let params = GradientsParams::from_grads(grads, &head);
            head = optim.step(lr, head, params);
            emb.update(&x, &rows, &g_bag, lr as f32, adam);
            loss_sum += f64::from(to_vec(loss.detach())[0]) * b as f64;
        }
        let train_secs = t0.elapsed().as_secs_f64();
        let val = val_accuracy(&emb, &head, data, device);
        let head_bytes = recorder.record(head.clone().into_record(), ()).map_err(rec_err)?;
        // Without validation data every epoch is the best so far: the last one is kept.
        if data.y_val.is_empty() || val > meta.best_val + 1e-9 {
            meta.best_val = val;
            meta.best_epoch = epoch;
            meta.stale = 0;
            best = Some((emb.weight.clone(), head_bytes.clone()));
        } else {
            meta.stale += 1;
        }
        let log = EpochLog {
            epoch,
            epochs: cfg.epochs,
            loss: loss_sum / n.max(1) as f64,
            val_accuracy: val,
            examples_per_s: n as f64 / train_secs.max(1e-9),
            seconds: t0.elapsed().as_secs_f64(),
        };
        meta.epoch = epoch;
        meta.log.push(log.clone());
        let optim_bytes = recorder.record(optim.to_record(), ()).map_err(rec_err)?;
        // The best weights travel separately only when they are not the current ones.
        let best_part = best.as_ref().filter(|_| meta.best_epoch != epoch).map(|(w, h)| (w.as_slice(), h.as_slice()));
        let bytes = checkpoint::encode(&meta, &emb, &head_bytes, &optim_bytes, best_part);
        (hooks.save)(epoch, bytes).map_err(|reason| TrainError::Checkpoint { epoch, reason })?;
        (hooks.progress)(&log);
        if meta.stale >= cfg.patience {
            stopped_early = epoch < cfg.epochs;
            break;
        }
    }
    // Restore the best epoch's weights when a later epoch is the last one.
    let head_inner;
    if let Some((w, h)) = best.filter(|_| meta.best_epoch != meta.epoch) {
        emb.weight = w;
        let rec = Recorder::<B>::load(&recorder, h, device).map_err(rec_err)?;
        head_inner = head.load_record(rec).valid();
    } else {
        head_inner = head.valid();
    }
    emb.m = Vec::new();
    emb.v = Vec::new();
    let run = RunLog { log: meta.log, resumed_from_epoch, best_epoch: meta.best_epoch, stopped_early };
    Ok(Trained { emb, head: head_inner, run })
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

/// The rows of `batch` as their own matrix, each feature kept with probability
/// `1 - drop` (kept values scaled by `1 / (1 - drop)`; a row keeps at least its strongest feature).
fn batch_rows(x: &Csr, batch: &[usize], drop: f32, rng: &mut StdRng) -> Csr {
    let mut out = Csr { indptr: Vec::with_capacity(batch.len() + 1), ..Csr::default() };
    out.indptr.push(0);
    let scale = 1.0 / (1.0 - drop);
    for &r in batch {
        let (idx, val) = x.row(r);
        let start = out.indices.len();
        for (&j, &v) in idx.iter().zip(val) {
            if drop <= 0.0 || rng.random::<f32>() >= drop {
                out.indices.push(j);
                out.values.push(v * scale);
            }
        }
        if out.indices.len() == start && !idx.is_empty() {
            let k = (0..idx.len()).max_by(|&a, &b| val[a].total_cmp(&val[b])).unwrap_or(0);
            out.indices.push(idx[k]);
            out.values.push(val[k] * scale);
        }
        out.indptr.push(out.indices.len());
    }
    out
}
