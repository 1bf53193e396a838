//! A trained model ready to answer: featurizers, networks, labels and the OOS rule.
//!
//! Saved as objects under a model prefix: `config.json` ([`ModelConfig`]: the model
//! kind, labels, sizes, the fitted featurizers, the OOS label and threshold), and
//! one burn record per network: `model.bin` (the bag, [`IntentNet`]) and `conv.bin`
//! (the word-order [`ConvNet`]). An ensemble averages its networks' probabilities.

use burn::tensor::backend::Backend;
use serde::{Deserialize, Serialize};
use trainyard_common::models::MODEL_CONFIG;

use super::{
    device_train::device_probabilities,
    features::{Csr, Featurizer},
    model::{to_vec, Head, IntentNet},
    nets::{load_bytes, record_bytes, ConvNet, ConvShape},
    params::ModelKind,
    seq::{Padded, SeqFeaturizer},
    sparse::EmbeddingBag,
};

/// Version of bag-only model files (what builds before the word-order model read).
pub const MODEL_FORMAT: u32 = 1;
/// Version of model files with a word-order network.
pub const MODEL_FORMAT_CONV: u32 = 2;

/// How an ensemble combines its networks' probabilities.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Combine {
    /// Weighted arithmetic mean (what models written before `geometric` existed use).
    #[default]
    Mean,
    /// Weighted geometric mean, renormalised per row: a weighted sum of log-probabilities,
    /// so a network that rules a label out counts for more than in the mean.
    Geometric,
}

/// `config.json` of a model.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelConfig {
    /// [`MODEL_FORMAT`] or [`MODEL_FORMAT_CONV`].
    pub format: u32,
    /// Which networks (absent in format 1: the bag).
    #[serde(default)]
    pub model: ModelKind,
    /// Output labels, in output order.
    pub labels: Vec<String>,
    /// Hidden width of the bag.
    pub hidden: usize,
    /// The out-of-scope label, when the training data had one.
    pub oos_label: Option<String>,
    /// Below this top probability the prediction is the OOS label.
    pub oos_threshold: Option<f32>,
    /// The bag's fitted featurizer.
    #[serde(default)]
    pub features: Option<Featurizer>,
    /// The word-order model's fitted featurizer.
    #[serde(default)]
    pub seq: Option<SeqFeaturizer>,
    /// The word-order model's embedding width and filters per width.
    #[serde(default)]
    pub conv: Option<(usize, usize)>,
    /// Weight of each network's probabilities in an ensemble (bag first); absent: equal.
    #[serde(default)]
    pub weights: Option<Vec<f32>>,
    /// How an ensemble combines them (absent: the arithmetic mean).
    #[serde(default)]
    pub combine: Combine,
}

impl ModelConfig {
    /// The format these networks need.
    pub fn format_for(model: ModelKind) -> u32 {
        if model.has_conv() {
            MODEL_FORMAT_CONV
        } else {
            MODEL_FORMAT
        }
    }

    /// Shape of the word-order network, when there is one.
    pub fn conv_shape(&self) -> Option<ConvShape> {
        let (seq, (dim, filters)) = (self.seq.as_ref()?, self.conv?);
        Some(ConvShape {
            vocab: seq.vocab(),
            dim,
            filters,
            tokens: seq.config.max_tokens,
            subwords: seq.config.subwords,
            labels: self.labels.len(),
        })
    }
}

/// An intent and its probability.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scored {
    /// The intent.
    pub intent: String,
    /// Its probability.
    pub probability: f32,
}

/// Probabilities (`rows × labels`, row-major) of every row of `x`, in chunks.
pub fn probabilities<B: Backend>(emb: &EmbeddingBag, head: &Head<B>, x: &Csr, labels: usize, device: &B::Device) -> Vec<f32> {
    const CHUNK: usize = 2048;
    let mut out = Vec::with_capacity(x.rows() * labels);
    let all: Vec<usize> = (0..x.rows()).collect();
    for chunk in all.chunks(CHUNK) {
        let bag = emb.forward(x, chunk);
        out.extend(head.probabilities(bag, chunk.len(), emb.dim, device));
    }
    out
}

/// The predicted label index of each probability row: the arg-max, or `oos` when the
/// top probability is below `threshold`.
pub fn decide(probs: &[f32], labels: usize, oos: Option<usize>, threshold: Option<f32>) -> Vec<usize> {
    probs
        .chunks(labels)
        .map(|row| {
            let (best, p) = row.iter().enumerate().fold((0, f32::MIN), |acc, (i, &p)| if p > acc.1 { (i, p) } else { acc });
            match (oos, threshold) {
                (Some(o), Some(t)) if p < t => o,
                _ => best,
            }
        })
        .collect()
}

/// The bag network in inference form.
#[derive(Debug, Clone)]
pub struct BagNet<B: Backend> {
    /// The embedding table (weights only).
    pub emb: EmbeddingBag,
    /// The head.
    pub head: Head<B>,
}

/// A loaded model.
#[derive(Debug)]
pub struct Predictor<B: Backend> {
    /// Its configuration.
    pub config: ModelConfig,
    /// The bag network, when the model has one.
    pub bag: Option<BagNet<B>>,
    /// The word-order network, when the model has one.
    pub conv: Option<ConvNet<B>>,
    /// Where the networks run.
    pub device: B::Device,
}

/// Weighted combination (`how`) of probability matrices of one shape, `labels` per row
/// (`weights`: one per part, absent = equal). One part comes back as it is.
pub fn average(parts: &[Vec<f32>], labels: usize, weights: Option<&[f32]>, how: Combine) -> Vec<f32> {
    if let [one] = parts {
        return one.clone();
    }
    let equal = vec![1.0; parts.len()];
    let w = weights.filter(|w| w.len() == parts.len()).unwrap_or(&equal);
    let total: f32 = w.iter().sum::<f32>().max(f32::MIN_POSITIVE);
    let mut acc = vec![0.0f32; parts.first().map_or(0, Vec::len)];
    for (p, &wi) in parts.iter().zip(w) {
        match how {
            Combine::Mean => acc.iter_mut().zip(p).for_each(|(a, b)| *a += wi / total * b),
            Combine::Geometric => acc.iter_mut().zip(p).for_each(|(a, b)| *a += wi / total * b.max(1e-30).ln()),
        }
    }
    if how == Combine::Geometric {
        for row in acc.chunks_mut(labels.max(1)) {
            let top = row.iter().copied().fold(f32::MIN, f32::max);
            row.iter_mut().for_each(|v| *v = (*v - top).exp());
            let sum: f32 = row.iter().sum();
            row.iter_mut().for_each(|v| *v /= sum);
        }
    }
    acc
}

/// The ensemble weight of the first of two networks that maximises arg-max accuracy on `y`
/// when combined by `how` (0.2–0.8 in steps of 0.05; ties go to the weight nearest 0.5).
/// Returns `[w, 1 - w]`.
pub fn tune_weights(parts: &[Vec<f32>], labels: usize, y: &[usize], how: Combine) -> Vec<f32> {
    let mut best = (0.5f32, 0usize);
    for step in 0..=12 {
        let w = 0.2 + 0.05 * step as f32;
        let p = average(parts, labels, Some(&[w, 1.0 - w]), how);
        let right = decide(&p, labels, None, None).iter().zip(y).filter(|(a, b)| a == b).count();
        if right > best.1 || (right == best.1 && (w - 0.5).abs() < (best.0 - 0.5).abs()) {
            best = (w, right);
        }
    }
    vec![best.0, 1.0 - best.0]
}

impl<B: Backend> Predictor<B> {
    /// Index of the OOS label, if any.
    pub fn oos_index(&self) -> Option<usize> {
        let o = self.config.oos_label.as_deref()?;
        self.config.labels.iter().position(|l| l == o)
    }

    /// Probabilities of each text over the labels (`texts × labels`): the networks' combined.
    pub fn probabilities(&self, texts: &[&str]) -> Vec<f32> {
        let mut parts = Vec::new();
        if let (Some(bag), Some(f)) = (&self.bag, &self.config.features) {
            parts.push(probabilities(&bag.emb, &bag.head, &f.transform(texts), self.config.labels.len(), &self.device));
        }
        if let (Some(conv), Some(seq)) = (&self.conv, &self.config.seq) {
            let x: Padded = seq.transform(texts);
            parts.push(device_probabilities(conv, &x, &self.device));
        }
        average(&parts, self.config.labels.len(), self.config.weights.as_deref(), self.config.combine)
    }

    /// The predicted label of each text (OOS rule applied).
    pub fn predict(&self, texts: &[&str]) -> Vec<String> {
        let p = self.probabilities(texts);
        decide(&p, self.config.labels.len(), self.oos_index(), self.config.oos_threshold)
            .into_iter()
            .map(|i| self.config.labels[i].clone())
            .collect()
    }

    /// The `k` most probable intents of `text`, and the decision (OOS rule applied).
    pub fn top_k(&self, text: &str, k: usize) -> (String, Vec<Scored>) {
        let p = self.probabilities(&[text]);
        let decision = self.config.labels[decide(&p, p.len(), self.oos_index(), self.config.oos_threshold)[0]].clone();
        let mut scored: Vec<Scored> =
            self.config.labels.iter().zip(&p).map(|(l, &q)| Scored { intent: l.clone(), probability: q }).collect();
        scored.sort_by(|a, b| b.probability.total_cmp(&a.probability).then_with(|| a.intent.cmp(&b.intent)));
        scored.truncate(k);
        (decision, scored)
    }

    /// The model files by name: `config.json`, and `model.bin` and/or `conv.bin`.
    pub fn to_files(&self) -> Result<Vec<(&'static str, Vec<u8>)>, String> {
        let mut out = Vec::new();
        if let Some(bag) = &self.bag {
            let net = IntentNet::new(bag.emb.weight.clone(), bag.emb.rows, bag.emb.dim, bag.head.clone(), &self.device);
            out.push(("model.bin", net.to_bytes().map_err(|e| e.to_string())?));
        }
        if let Some(conv) = &self.conv {
            out.push(("conv.bin", record_bytes(conv.clone()).map_err(|e| e.to_string())?));
        }
        // Last: a model with its config is complete (`models::MODEL_CONFIG`).
        out.push((MODEL_CONFIG, serde_json::to_vec(&self.config).map_err(|e| e.to_string())?));
        Ok(out)
    }

    /// Loads the model files written by [`to_files`](Self::to_files); `read` returns a file's bytes by name.
    pub fn from_files(read: &mut dyn FnMut(&str) -> Result<Vec<u8>, String>, device: &B::Device) -> Result<Self, String> {
        let mut config: ModelConfig = serde_json::from_slice(&read(MODEL_CONFIG)?).map_err(|e| format!("bad model config.json: {e}"))?;
        if config.format != MODEL_FORMAT && config.format != MODEL_FORMAT_CONV {
            return Err(format!(
                "model format {} is not supported (this build reads {MODEL_FORMAT} and {MODEL_FORMAT_CONV})",
                config.format
            ));
        }
        let bag = match config.features.as_mut().filter(|_| config.model.has_bag()) {
            Some(f) => {
                f.build_index();
                let (fd, h, l) = (f.dim(), config.hidden, config.labels.len());
                let net = IntentNet::<B>::from_bytes(read("model.bin")?, fd, h, l, device).map_err(|e| e.to_string())?;
                Some(BagNet { emb: EmbeddingBag::from_weights(fd, h, to_vec(net.embedding.val())), head: net.head })
            }
            None if config.model.has_bag() => return Err("model config.json has no bag featurizer".into()),
            None => None,
        };
        if let Some(seq) = config.seq.as_mut() {
            seq.build_index();
        }
        let conv = match config.conv_shape().filter(|_| config.model.has_conv()) {
            Some(shape) => Some(load_bytes(ConvNet::skeleton(shape, device), read("conv.bin")?, device).map_err(|e| e.to_string())?),
            None if config.model.has_conv() => return Err("model config.json has no word-order featurizer or shape".into()),
            None => None,
        };
        Ok(Self { config, bag, conv, device: device.clone() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ensemble_weights() {
        let a = vec![0.9, 0.1, 0.2, 0.8];
        let b = vec![0.3, 0.7, 0.6, 0.4];
        let mean = Combine::Mean;
        assert_eq!(average(&[a.clone(), b.clone()], 2, None, mean), vec![0.6, 0.4, 0.4, 0.6]);
        let w = average(&[a.clone(), b.clone()], 2, Some(&[0.25, 0.75]), mean);
        assert!((w[0] - 0.45).abs() < 1e-6 && (w[1] - 0.55).abs() < 1e-6, "{w:?}");
        // `a` is right on both rows when the labels are [0, 1]: every weight above 1/3 for it gets
        // both right, and the one nearest 0.5 wins. With labels [1, 0] only `b` is right, and `a`'s weight
        // must stay at or below 1/4 (at 1/4 the second row ties, and a tie goes to the first label).
        let tuned = tune_weights(&[a.clone(), b.clone()], 2, &[0, 1], mean);
        assert!((tuned[0] - 0.5).abs() < 1e-6, "{tuned:?}");
        let tuned = tune_weights(&[a, b], 2, &[1, 0], mean);
        assert!((tuned[0] - 0.25).abs() < 1e-6, "{tuned:?}");
    }

    #[test]
    fn geometric_combination_is_a_renormalised_weighted_product() {
        let a = vec![0.5, 0.5, 0.0, 0.9, 0.05, 0.05];
        let b = vec![0.8, 0.1, 0.1, 0.5, 0.4, 0.1];
        let g = average(&[a.clone(), b.clone()], 3, Some(&[0.25, 0.75]), Combine::Geometric);
        for r in 0..2 {
            let raw: Vec<f32> = (0..3).map(|i| a[r * 3 + i].max(1e-30).powf(0.25) * b[r * 3 + i].powf(0.75)).collect();
            let sum: f32 = raw.iter().sum();
            for i in 0..3 {
                assert!((g[r * 3 + i] - raw[i] / sum).abs() < 1e-5, "row {r}: {g:?}");
            }
        }
        // A label one network rules out is out: the mean would give it 0.075.
        assert!(g[2] < 1e-6, "{g:?}");
        // Row 2, equal weights: both networks prefer label 0; the product is surer of it than the mean.
        let m = average(&[a.clone(), b.clone()], 3, Some(&[0.5, 0.5]), Combine::Mean);
        let p = average(&[a, b], 3, Some(&[0.5, 0.5]), Combine::Geometric);
        assert!((m[3] - 0.7).abs() < 1e-6 && (p[3] - 0.7597).abs() < 1e-3, "{m:?} {p:?}");
        assert!((p[3..].iter().sum::<f32>() - 1.0).abs() < 1e-5, "{p:?}");
        assert_eq!(average(&[vec![0.2, 0.8]], 2, None, Combine::Geometric), vec![0.2, 0.8], "one part as it is");
        // Models written before `combine` existed read as the mean.
        let old = r#"{"format": 2, "model": "bag+conv", "labels": ["a"], "hidden": 4, "oos_label": null, "oos_threshold": null}"#;
        assert_eq!(serde_json::from_str::<ModelConfig>(old).unwrap().combine, Combine::Mean);
    }

    #[test]
    fn decide_applies_the_threshold() {
        let probs = [0.7, 0.2, 0.1, 0.4, 0.35, 0.25];
        assert_eq!(decide(&probs, 3, Some(2), None), vec![0, 0]);
        assert_eq!(decide(&probs, 3, Some(2), Some(0.5)), vec![0, 2]);
        assert_eq!(decide(&probs, 3, None, Some(0.5)), vec![0, 0]);
    }
}
