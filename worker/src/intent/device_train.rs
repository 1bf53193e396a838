//! The training loop of models that run wholly on a burn device ([`DeviceNet`]):
//! the bag's device path and the word-order model, on CUDA or on ndarray.
//!
//! Per step only the batch's ids, weights and labels go to the device; forward,
//! backward (the embedding table's gradient included) and burn's Adam run there,
//! and the loss stays there until the epoch ends. Dropout is drawn by the
//! backend's RNG, seeded per epoch from the job's seed. After every epoch, as in
//! the sparse path ([`super::train`]): validation accuracy (arg-max on the device,
//! only the predicted labels come back), early stopping with the best weights kept,
//! a checkpoint (`TYCKPT02`, tagged with the path) and a progress report.

use std::time::Instant;

use rand::rngs::StdRng;

use burn::{
    module::AutodiffModule,
    optim::{AdamConfig, GradientsParams, Optimizer},
    record::Recorder,
    tensor::{
        backend::{AutodiffBackend, Backend},
        Tensor,
    },
};

use super::{
    checkpoint::{self, CheckpointMeta, DeviceCheckpoint},
    model::{BytesRecorder, Head},
    nets::{batch_tensors, load_bytes, load_record, record_bytes, DeviceNet},
    params::Hyper,
    seq::Padded,
    train::{drop_row, epoch_log, epoch_order, learning_rate, rec_err, resume_err, Hooks, RunLog, TrainError},
};

/// Training and validation rows as fixed-width ids, with their labels.
#[derive(Debug, Clone)]
pub struct DeviceData {
    /// Training rows.
    pub x_train: Padded,
    /// Their labels.
    pub y_train: Vec<usize>,
    /// Validation rows (may be empty).
    pub x_val: Padded,
    /// Their labels.
    pub y_val: Vec<usize>,
}

/// A model trained on a device (best validation epoch, inference form) and how the run went.
#[derive(Debug)]
pub struct DeviceTrained<M> {
    /// The model.
    pub model: M,
    /// How the run went.
    pub run: RunLog,
}

/// Rows per forward pass outside training.
const EVAL_CHUNK: usize = 1024;

/// Class probabilities (`rows × labels`, row-major) of every row of `x`.
pub fn device_probabilities<B: Backend, M: DeviceNet<B>>(model: &M, x: &Padded, device: &B::Device) -> Vec<f32> {
    let all: Vec<usize> = (0..x.rows()).collect();
    let mut out = Vec::new();
    for chunk in all.chunks(EVAL_CHUNK) {
        let (ids, w) = x.gather(chunk);
        let (ids, w) = batch_tensors::<B>(ids, w, chunk.len(), device);
        let p = burn::tensor::activation::softmax(model.logits(ids, w, 0.0), 1);
        out.extend(super::model::to_vec(p));
    }
    out
}

/// Arg-max accuracy on `(x, y)`, computed on the device; 0 without rows.
fn accuracy<B: Backend, M: DeviceNet<B>>(model: &M, x: &Padded, y: &[usize], device: &B::Device) -> f64 {
    if y.is_empty() {
        return 0.0;
    }
    let all: Vec<usize> = (0..x.rows()).collect();
    let mut right = 0usize;
    for chunk in all.chunks(EVAL_CHUNK) {
        let (ids, w) = x.gather(chunk);
        let (ids, w) = batch_tensors::<B>(ids, w, chunk.len(), device);
        let pred = model.logits(ids, w, 0.0).argmax(1);
        let pred: Vec<i64> = pred.into_data().convert::<i64>().to_vec().expect("int tensor data");
        right += chunk.iter().zip(&pred).filter(|(&i, &p)| y[i] as i64 == p).count();
    }
    right as f64 / y.len() as f64
}

/// One epoch of steps over the training data in the epoch's order; returns the model and
/// the epoch's summed loss (the loss stays on the device until the epoch ends).
fn train_epoch<B, M, O>(
    cfg: &Hyper,
    data: &DeviceData,
    epoch: usize,
    mut model: M,
    optim: &mut O,
    device: &B::Device,
    cancelled: &(dyn Fn() -> bool + Sync),
) -> Result<(M, f64), TrainError>
where
    B: AutodiffBackend,
    M: AutodiffModule<B> + DeviceNet<B>,
    O: Optimizer<M, B>,
{
    let n = data.y_train.len();
    let steps_per_epoch = n.div_ceil(cfg.batch_size).max(1);
    let total_steps = steps_per_epoch * cfg.epochs;
    B::seed(device, cfg.seed ^ (epoch as u64).wrapping_mul(0xA24B_AED4_963E_E407));
    let mut loss_sum = Tensor::<B::InnerBackend, 1>::zeros([1], device);
    let (order, mut rng) = epoch_order(cfg.seed, epoch, n);
    for (i, batch) in order.chunks(cfg.batch_size).enumerate() {
        if cancelled() {
            return Err(TrainError::Cancelled(epoch));
        }
        let lr = learning_rate(cfg.lr, (epoch - 1) * steps_per_epoch + i, total_steps);
        let (ids, mut w) = data.x_train.gather(batch);
        // Only the bag takes `feature_dropout` (the word-order model refuses it).
        drop_features(&mut w, batch.len(), cfg.feature_dropout, &mut rng);
        let (ids, w) = batch_tensors::<B>(ids, w, batch.len(), device);
        let targets: Vec<i64> = batch.iter().map(|&i| data.y_train[i] as i64).collect();
        let loss = Head::<B>::loss(model.logits(ids, w, cfg.dropout), &targets, cfg.label_smoothing, device);
        loss_sum = loss_sum + loss.clone().inner().mul_scalar(batch.len() as f32);
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(lr, model, grads);
    }
    Ok((model, f64::from(super::model::to_vec(loss_sum)[0])))
}

/// Feature dropout on padded rows ([`drop_row`], as the sparse path's), `rows` rows of `w`.
fn drop_features(w: &mut [f32], rows: usize, drop: f32, rng: &mut StdRng) {
    if drop <= 0.0 || rows == 0 {
        return;
    }
    for row in w.chunks_mut(w.len() / rows) {
        drop_row(row, drop, rng);
    }
}

/// Which run a checkpoint belongs to: the training path and the fingerprint of data and settings.
#[derive(Debug, Clone, Copy)]
pub struct RunId<'a> {
    /// `device-bag` or `conv`.
    pub path: &'a str,
    /// See `pipeline::fingerprint`.
    pub fingerprint: &'a str,
}

/// Trains `init` (or the model in `resume`, when it was written by the same run)
/// and returns the best epoch's model.
pub fn train_device<B, M>(
    cfg: &Hyper,
    run: RunId<'_>,
    data: &DeviceData,
    init: M,
    resume: Option<DeviceCheckpoint>,
    device: &B::Device,
    hooks: Hooks<'_>,
) -> Result<DeviceTrained<M::InnerModule>, TrainError>
where
    B: AutodiffBackend,
    M: AutodiffModule<B> + DeviceNet<B>,
    M::InnerModule: DeviceNet<B::InnerBackend>,
{
    let recorder = BytesRecorder::default();
    let mut model = init;
    let mut optim = AdamConfig::new().with_epsilon(1e-8).init::<B, M>();
    let mut meta = CheckpointMeta::new(run.fingerprint, run.path);
    let mut best: Option<Vec<u8>> = None;
    let mut resumed_from_epoch = None;
    if let Some(ck) = resume.filter(|ck| ck.meta.fingerprint == run.fingerprint && ck.meta.path == run.path) {
        model = load_bytes(model, ck.model.clone(), device).map_err(resume_err)?;
        optim = optim.load_record(load_record(ck.optim, device).map_err(resume_err)?);
        best = ck.best.or_else(|| (ck.meta.best_epoch > 0).then(|| ck.model.clone()));
        // The best weights load at the end: found unloadable there, every attempt would fail.
        if let Some(b) = &best {
            load_bytes(model.clone(), b.clone(), device).map_err(resume_err)?;
        }
        resumed_from_epoch = Some(ck.meta.epoch);
        meta = ck.meta;
    }
    let n = data.y_train.len();
    let cancelled = hooks.cancelled;
    for epoch in meta.epoch + 1..=cfg.epochs {
        if meta.patience_spent(cfg.patience) {
            break;
        }
        let t0 = Instant::now();
        let (trained, loss_sum) = train_epoch(cfg, data, epoch, model, &mut optim, device, cancelled)?;
        model = trained;
        let train_secs = t0.elapsed().as_secs_f64();
        let val = accuracy(&model.valid(), &data.x_val, &data.y_val, device);
        let model_bytes = record_bytes(model.clone()).map_err(rec_err)?;
        let log = epoch_log(cfg, epoch, n, loss_sum, val, train_secs, t0)?;
        if meta.end_epoch(log.clone(), !data.y_val.is_empty()) {
            best = Some(model_bytes.clone());
        }
        let optim_bytes = recorder.record(optim.to_record(), ()).map_err(rec_err)?;
        let best_part = best.as_deref().filter(|_| meta.best_is_earlier());
        let bytes = checkpoint::encode_device(&meta, &model_bytes, &optim_bytes, best_part);
        (hooks.save)(epoch, bytes).map_err(|reason| TrainError::Checkpoint { epoch, reason })?;
        (hooks.progress)(&log);
    }
    if let Some(b) = best.filter(|_| meta.best_is_earlier()) {
        model = load_bytes(model, b, device).map_err(rec_err)?;
    }
    Ok(DeviceTrained { model: model.valid(), run: RunLog::ended(meta, resumed_from_epoch, cfg) })
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;

    use super::*;

    /// The device path drops features as the sparse path does (it ignored `feature_dropout`).
    #[test]
    fn feature_dropout_drops_and_rescales_and_keeps_one_feature_a_row() {
        let row = [0.5, 0.25, 0.125, 0.0];
        let mut w: Vec<f32> = row.repeat(500);
        let mut rng = StdRng::seed_from_u64(1);
        drop_features(&mut w, 500, 0.0, &mut rng);
        assert_eq!(w, row.repeat(500), "no dropout, no change");
        drop_features(&mut w, 500, 0.5, &mut rng);
        let (mut kept, mut dropped) = (0, 0);
        for r in w.chunks(4) {
            assert_eq!(r[3], 0.0, "padding stays padding");
            assert!(r.iter().any(|v| *v != 0.0), "a row keeps a feature: {r:?}");
            for (v, was) in r.iter().zip(row).take(3) {
                assert!(*v == 0.0 || *v == was * 2.0, "dropped or scaled by 1 / (1 - 0.5): {v} from {was}");
                if *v == 0.0 {
                    dropped += 1
                } else {
                    kept += 1
                }
            }
        }
        assert!((600..900).contains(&dropped) && kept + dropped == 1500, "about half dropped: {dropped} of 1500");
    }
}
