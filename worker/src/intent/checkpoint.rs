//! Training checkpoints: everything needed to continue a run where it stopped.
//!
//! One object per model of a job, `<prefix>/checkpoints/latest.ckpt` (the word-order
//! model of an ensemble: `checkpoints/conv.ckpt`; the bag of a `refit`:
//! `checkpoints/refit.ckpt`), replaced atomically
//! after every epoch (plus `latest.json`, its metadata, for people): the
//! embedding table with its Adam moments, the head and its optimizer state (burn
//! records), the early-stopping state and the epoch log. A run is resumed only
//! when the checkpoint's fingerprint (data, features, labels, settings) matches.
//!
//! Layout: `TYCKPT01`, then sections, each a little-endian `u64` length and its bytes:
//! meta JSON, table shape + step, weights, first moments, second moments, head
//! record, optimizer record, best weights (may be empty), best head record (may be empty).
//!
//! A model trained wholly on a burn device ([`super::device_train`]) writes
//! `TYCKPT02`: meta JSON, model record, optimizer record, best model record (may be
//! empty). The meta's `path` says which training path wrote it; a checkpoint is
//! resumed only by the same path ([`Resumable::path`]), and refused with a message
//! saying why by another.

use serde::{Deserialize, Serialize};

use super::sparse::EmbeddingBag;

const MAGIC: &[u8; 8] = b"TYCKPT01";
const MAGIC_DEVICE: &[u8; 8] = b"TYCKPT02";

/// The training path of the bag model on the CPU: sparse table in Rust, head in burn.
pub const PATH_SPARSE: &str = "sparse";

fn sparse_path() -> String {
    PATH_SPARSE.into()
}

/// One epoch of training, as reported and logged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochLog {
    /// 1-based epoch.
    pub epoch: usize,
    /// Most epochs of the run.
    pub epochs: usize,
    /// Mean training loss.
    pub loss: f64,
    /// Validation accuracy after the epoch.
    pub val_accuracy: f64,
    /// Training throughput.
    pub examples_per_s: f64,
    /// Wall time of the epoch (training and validation).
    pub seconds: f64,
}

/// The small part of a checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointMeta {
    /// What the run trains on and how; a mismatch means "start afresh".
    pub fingerprint: String,
    /// Completed epochs.
    pub epoch: usize,
    /// Epoch of the best validation accuracy so far (0: none).
    pub best_epoch: usize,
    /// Best validation accuracy so far.
    pub best_val: f64,
    /// Epochs since the last improvement.
    pub stale: usize,
    /// The epochs so far.
    pub log: Vec<EpochLog>,
    /// The training path that wrote it ([`PATH_SPARSE`], `device-bag`, `conv`).
    #[serde(default = "sparse_path")]
    pub path: String,
}

impl CheckpointMeta {
    /// The state of a run on training path `path` that has trained no epoch yet.
    pub fn new(fingerprint: &str, path: &str) -> Self {
        Self { fingerprint: fingerprint.into(), epoch: 0, best_epoch: 0, best_val: -1.0, stale: 0, log: Vec::new(), path: path.into() }
    }

    /// Records a finished epoch and moves early stopping on. `true` when its weights are the
    /// best so far; without validation data every epoch is, so the last one is kept.
    pub fn end_epoch(&mut self, log: EpochLog, has_val: bool) -> bool {
        let best = !has_val || log.val_accuracy > self.best_val + 1e-9;
        if best {
            (self.best_val, self.best_epoch, self.stale) = (log.val_accuracy, log.epoch, 0);
        } else {
            self.stale += 1;
        }
        self.epoch = log.epoch;
        self.log.push(log);
        best
    }

    /// Has early stopping ended the run: no better epoch for `patience` epochs?
    pub fn patience_spent(&self, patience: usize) -> bool {
        self.stale >= patience
    }

    /// Are the best weights an earlier epoch's than the last one trained's?
    pub fn best_is_earlier(&self) -> bool {
        self.best_epoch != self.epoch
    }
}

/// A checkpoint of a model trained wholly on a burn device.
#[derive(Debug, Clone)]
pub struct DeviceCheckpoint {
    /// Metadata.
    pub meta: CheckpointMeta,
    /// The model (burn record bytes).
    pub model: Vec<u8>,
    /// Its optimizer state (burn record bytes).
    pub optim: Vec<u8>,
    /// The best model, when the best epoch is not the last one (burn record bytes).
    pub best: Option<Vec<u8>>,
}

/// Any checkpoint.
#[derive(Debug, Clone)]
pub enum Resumable {
    /// Written by the sparse CPU path.
    Sparse(Checkpoint),
    /// Written by a device path.
    Device(DeviceCheckpoint),
}

impl Resumable {
    /// Its metadata.
    pub fn meta(&self) -> &CheckpointMeta {
        match self {
            Self::Sparse(c) => &c.meta,
            Self::Device(c) => &c.meta,
        }
    }
    /// The training path that wrote it.
    pub fn path(&self) -> &str {
        &self.meta().path
    }
}

/// Serialises a device checkpoint.
pub fn encode_device(meta: &CheckpointMeta, model: &[u8], optim: &[u8], best: Option<&[u8]>) -> Vec<u8> {
    let mut out = Vec::with_capacity(model.len() * 2 + optim.len() + 4096);
    out.extend_from_slice(MAGIC_DEVICE);
    section(&mut out, &serde_json::to_vec(meta).expect("checkpoint meta serialises"));
    section(&mut out, model);
    section(&mut out, optim);
    section(&mut out, best.unwrap_or(&[]));
    out
}

/// Parses any checkpoint written by [`encode`] or [`encode_device`].
pub fn decode_any(bytes: &[u8]) -> Result<Resumable, String> {
    if bytes.len() >= 8 && &bytes[..8] == MAGIC_DEVICE {
        let mut r = Reader { bytes: &bytes[8..] };
        let meta: CheckpointMeta = serde_json::from_slice(r.next()?).map_err(|e| format!("bad checkpoint metadata: {e}"))?;
        let (model, optim, best) = (r.next()?.to_vec(), r.next()?.to_vec(), r.next()?.to_vec());
        return Ok(Resumable::Device(DeviceCheckpoint { meta, model, optim, best: (!best.is_empty()).then_some(best) }));
    }
    decode(bytes).map(Resumable::Sparse)
}

/// A decoded checkpoint.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// Metadata.
    pub meta: CheckpointMeta,
    /// The table and its moments.
    pub emb: EmbeddingBag,
    /// The head (burn record bytes).
    pub head: Vec<u8>,
    /// The head's optimizer state (burn record bytes).
    pub optim: Vec<u8>,
    /// The best weights, when the best epoch is not the last one: table and head record.
    pub best: Option<(Vec<f32>, Vec<u8>)>,
}

fn section(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
    out.extend_from_slice(bytes);
}

fn floats(out: &mut Vec<u8>, v: &[f32]) {
    out.extend_from_slice(&((v.len() * 4) as u64).to_le_bytes());
    out.reserve(v.len() * 4);
    for f in v {
        out.extend_from_slice(&f.to_le_bytes());
    }
}

/// Serialises a checkpoint from borrowed parts.
pub fn encode(meta: &CheckpointMeta, emb: &EmbeddingBag, head: &[u8], optim: &[u8], best: Option<(&[f32], &[u8])>) -> Vec<u8> {
    let mut out = Vec::with_capacity(emb.weight.len() * 12 + head.len() + optim.len() + 4096);
    out.extend_from_slice(MAGIC);
    section(&mut out, &serde_json::to_vec(meta).expect("checkpoint meta serialises"));
    let shape: Vec<u8> = [emb.rows as u64, emb.dim as u64, emb.step].iter().flat_map(|v| v.to_le_bytes()).collect();
    section(&mut out, &shape);
    floats(&mut out, &emb.weight);
    floats(&mut out, &emb.m);
    floats(&mut out, &emb.v);
    section(&mut out, head);
    section(&mut out, optim);
    floats(&mut out, best.map(|b| b.0).unwrap_or(&[]));
    section(&mut out, best.map(|b| b.1).unwrap_or(&[]));
    out
}

struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn next(&mut self) -> Result<&'a [u8], String> {
        if self.bytes.len() < 8 {
            return Err("truncated checkpoint".into());
        }
        let n = u64::from_le_bytes(self.bytes[..8].try_into().expect("8 bytes")) as usize;
        let rest = &self.bytes[8..];
        if rest.len() < n {
            return Err("truncated checkpoint".into());
        }
        self.bytes = &rest[n..];
        Ok(&rest[..n])
    }
    fn floats(&mut self) -> Result<Vec<f32>, String> {
        let b = self.next()?;
        Ok(b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))).collect())
    }
}

/// Parses a checkpoint written by [`encode`].
pub fn decode(bytes: &[u8]) -> Result<Checkpoint, String> {
    if bytes.len() < 8 || &bytes[..8] != MAGIC {
        return Err("not a trainyard checkpoint".into());
    }
    let mut r = Reader { bytes: &bytes[8..] };
    let meta: CheckpointMeta = serde_json::from_slice(r.next()?).map_err(|e| format!("bad checkpoint metadata: {e}"))?;
    let shape = r.next()?;
    if shape.len() != 24 {
        return Err("bad checkpoint shape".into());
    }
    let u = |i: usize| u64::from_le_bytes(shape[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
    let (rows, dim, step) = (u(0) as usize, u(1) as usize, u(2));
    let (weight, m, v) = (r.floats()?, r.floats()?, r.floats()?);
    if weight.len() != rows * dim || m.len() != rows * dim || v.len() != rows * dim {
        return Err("checkpoint table sizes do not match its shape".into());
    }
    let head = r.next()?.to_vec();
    let optim = r.next()?.to_vec();
    let best_w = r.floats()?;
    let best_h = r.next()?.to_vec();
    let best = (!best_w.is_empty()).then_some((best_w, best_h));
    Ok(Checkpoint { meta, emb: EmbeddingBag { rows, dim, weight, m, v, step }, head, optim, best })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let meta =
            CheckpointMeta { fingerprint: "f".into(), epoch: 2, best_epoch: 1, best_val: 0.5, stale: 1, log: vec![], path: sparse_path() };
        let emb = EmbeddingBag { rows: 2, dim: 2, weight: vec![1.0, 2.0, 3.0, 4.0], m: vec![0.1; 4], v: vec![0.2; 4], step: 9 };
        let bytes = encode(&meta, &emb, b"head", b"opt", Some((&[5.0, 6.0, 7.0, 8.0], b"besthead")));
        let ck = decode(&bytes).unwrap();
        assert_eq!(ck.meta, meta);
        assert_eq!(ck.emb, emb);
        assert_eq!((ck.head.as_slice(), ck.optim.as_slice()), (&b"head"[..], &b"opt"[..]));
        assert_eq!(ck.best.unwrap().0, vec![5.0, 6.0, 7.0, 8.0]);
        let none = decode(&encode(&meta, &emb, b"h", b"o", None)).unwrap();
        assert!(none.best.is_none());
        assert!(decode(&bytes[..bytes.len() - 3]).is_err());
        assert!(decode(b"garbage!").is_err());
        assert_eq!(decode_any(&bytes).unwrap().path(), PATH_SPARSE);
    }

    #[test]
    fn device_round_trip_and_old_meta() {
        let meta =
            CheckpointMeta { fingerprint: "f".into(), epoch: 3, best_epoch: 2, best_val: 0.7, stale: 1, log: vec![], path: "conv".into() };
        let Resumable::Device(ck) = decode_any(&encode_device(&meta, b"model", b"opt", Some(b"best"))).unwrap() else {
            panic!("a device checkpoint")
        };
        assert_eq!((ck.meta, ck.model, ck.optim, ck.best), (meta.clone(), b"model".to_vec(), b"opt".to_vec(), Some(b"best".to_vec())));
        assert!(decode_any(&encode_device(&meta, b"m", b"o", None)).is_ok_and(|r| matches!(r, Resumable::Device(d) if d.best.is_none())));
        // Checkpoints written before paths existed are the sparse path's.
        let old: CheckpointMeta =
            serde_json::from_str(r#"{"fingerprint":"f","epoch":1,"best_epoch":1,"best_val":0.5,"stale":0,"log":[]}"#).unwrap();
        assert_eq!(old.path, PATH_SPARSE);
    }

    fn epoch(epoch: usize, val_accuracy: f64) -> EpochLog {
        EpochLog { epoch, epochs: 10, loss: 1.0, val_accuracy, examples_per_s: 1.0, seconds: 1.0 }
    }

    #[test]
    fn early_stopping_keeps_the_best_epoch_and_counts_the_ones_after_it() {
        let mut meta = CheckpointMeta::new("f", "conv");
        assert_eq!((meta.epoch, meta.best_epoch, meta.path.as_str()), (0, 0, "conv"));
        assert!(meta.end_epoch(epoch(1, 0.5), true));
        assert!(meta.end_epoch(epoch(2, 0.6), true));
        // No better (a tie is not better): stale, and the best stays epoch 2.
        assert!(!meta.end_epoch(epoch(3, 0.6), true));
        assert!(!meta.end_epoch(epoch(4, 0.55), true));
        assert_eq!((meta.epoch, meta.best_epoch, meta.best_val, meta.stale), (4, 2, 0.6, 2));
        assert!(meta.best_is_earlier());
        assert!(meta.patience_spent(2) && !meta.patience_spent(3));
        // An improvement resets the count.
        assert!(meta.end_epoch(epoch(5, 0.7), true));
        assert_eq!((meta.best_epoch, meta.stale, meta.log.len()), (5, 0, 5));
        assert!(!meta.best_is_earlier());
        // Without validation data every epoch is the best, whatever its accuracy.
        let mut blind = CheckpointMeta::new("f", PATH_SPARSE);
        assert!(blind.end_epoch(epoch(1, 0.0), false) && blind.end_epoch(epoch(2, 0.0), false));
        assert_eq!((blind.best_epoch, blind.stale), (2, 0));
    }
}
