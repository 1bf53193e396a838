//! A trained model ready to answer: featurizer, table, head, labels and the OOS rule.
//!
//! Saved as two objects under a model prefix: `model.bin` (the burn record of
//! [`IntentNet`]) and `config.json` ([`ModelConfig`]: labels, sizes, the fitted
//! featurizer, the OOS label and threshold).

use burn::tensor::backend::Backend;
use serde::{Deserialize, Serialize};

use super::{
    features::{Csr, Featurizer},
    model::{to_vec, Head, IntentNet},
    sparse::EmbeddingBag,
};

/// Version of the model files this build writes and reads.
pub const MODEL_FORMAT: u32 = 1;

/// `config.json` of a model.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelConfig {
    /// [`MODEL_FORMAT`].
    pub format: u32,
    /// Output labels, in output order.
    pub labels: Vec<String>,
    /// Hidden width.
    pub hidden: usize,
    /// The out-of-scope label, when the training data had one.
    pub oos_label: Option<String>,
    /// Below this top probability the prediction is the OOS label.
    pub oos_threshold: Option<f32>,
    /// The fitted featurizer.
    pub features: Featurizer,
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

/// A loaded model.
#[derive(Debug)]
pub struct Predictor<B: Backend> {
    /// Its configuration.
    pub config: ModelConfig,
    /// The embedding table (weights only).
    pub emb: EmbeddingBag,
    /// The head.
    pub head: Head<B>,
    /// Where the head runs.
    pub device: B::Device,
}

impl<B: Backend> Predictor<B> {
    /// Index of the OOS label, if any.
    pub fn oos_index(&self) -> Option<usize> {
        let o = self.config.oos_label.as_deref()?;
        self.config.labels.iter().position(|l| l == o)
    }

    /// Probabilities of each text over the labels (`texts × labels`).
    pub fn probabilities(&self, texts: &[&str]) -> Vec<f32> {
        let x = self.config.features.transform(texts);
        probabilities(&self.emb, &self.head, &x, self.config.labels.len(), &self.device)
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

    /// The model files: `model.bin` (burn record) and `config.json`.
    pub fn to_files(&self) -> Result<(Vec<u8>, Vec<u8>), String> {
        let net = IntentNet::new(self.emb.weight.clone(), self.emb.rows, self.emb.dim, self.head.clone(), &self.device);
        let bin = net.to_bytes().map_err(|e| e.to_string())?;
        let cfg = serde_json::to_vec(&self.config).map_err(|e| e.to_string())?;
        Ok((bin, cfg))
    }

    /// Loads the model files written by [`to_files`](Self::to_files).
    pub fn from_files(bin: Vec<u8>, config: &[u8], device: &B::Device) -> Result<Self, String> {
        let mut config: ModelConfig = serde_json::from_slice(config).map_err(|e| format!("bad model config.json: {e}"))?;
        if config.format != MODEL_FORMAT {
            return Err(format!("model format {} is not supported (this build reads {MODEL_FORMAT})", config.format));
        }
        config.features.build_index();
        let (f, h, l) = (config.features.dim(), config.hidden, config.labels.len());
        let net = IntentNet::<B>::from_bytes(bin, f, h, l, device).map_err(|e| e.to_string())?;
        let emb = EmbeddingBag::from_weights(f, h, to_vec(net.embedding.val()));
        Ok(Self { config, emb, head: net.head, device: device.clone() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decide_applies_the_threshold() {
        let probs = [0.7, 0.2, 0.1, 0.4, 0.35, 0.25];
        assert_eq!(decide(&probs, 3, Some(2), None), vec![0, 0]);
        assert_eq!(decide(&probs, 3, Some(2), Some(0.5)), vec![0, 2]);
        assert_eq!(decide(&probs, 3, None, Some(0.5)), vec![0, 0]);
    }
}
