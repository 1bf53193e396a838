//! Job parameters of `intent-train` and `intent-eval`, with their documented defaults.
//!
//! Unknown parameters are rejected (checked by hand: serde's `flatten` cannot deny them); every range is
//! checked in [`TrainParams::parse`] / [`EvalParams::parse`] so `validate()`
//! stays cheap and a bad job dies at once with a clear message.

use serde::{Deserialize, Serialize};

use super::{dataset::DatasetSpec, device::DeviceSpec, promotion::GateRules};
use crate::handler::JobError;

/// `promote`: may a passing model replace production by itself?
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum PromoteMode {
    /// Promote when the gate passes (default).
    #[default]
    Auto,
    /// Never promote; report what the gate would decide.
    Manual,
}

/// `model`: which networks a run trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum ModelKind {
    /// The bag of word and character n-grams (default; fast on the CPU).
    #[default]
    #[serde(rename = "bag")]
    Bag,
    /// The word-order model: convolutions over word and subword embeddings.
    #[serde(rename = "conv")]
    Conv,
    /// Both, trained one after the other; their probabilities are averaged.
    #[serde(rename = "bag+conv")]
    BagConv,
}

impl ModelKind {
    /// Does it include the bag network?
    pub fn has_bag(self) -> bool {
        matches!(self, Self::Bag | Self::BagConv)
    }
    /// Does it include the word-order network?
    pub fn has_conv(self) -> bool {
        matches!(self, Self::Conv | Self::BagConv)
    }
}

impl std::fmt::Display for ModelKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Bag => "bag",
            Self::Conv => "conv",
            Self::BagConv => "bag+conv",
        })
    }
}

/// Model and optimisation settings (all have defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Hyper {
    /// `bag` (default), `conv` or `bag+conv`.
    pub model: ModelKind,
    /// Word-order model: embedding width. Default 128.
    pub conv_dim: usize,
    /// Word-order model: filters per convolution width (1, 2 and 3 tokens). Default 256.
    pub conv_filters: usize,
    /// Word-order model: tokens per utterance (longer ones are cut). Default 24.
    pub max_tokens: usize,
    /// Most epochs (early stopping usually ends sooner). Default 12.
    pub epochs: usize,
    /// Seed of every random choice (split, init, shuffling, dropout). Default 42.
    pub seed: u64,
    /// Examples per step. Default 64.
    pub batch_size: usize,
    /// Adam learning rate (linearly decayed to 10% over `epochs`). Default 0.002.
    pub lr: f64,
    /// Hidden (embedding bag) width. Default 256.
    pub hidden: usize,
    /// Dropout on the hidden layer. Default 0.3.
    pub dropout: f32,
    /// Share of an utterance's n-gram features dropped at random in training. Default 0.
    pub feature_dropout: f32,
    /// Label smoothing of the cross-entropy. Default 0.
    pub label_smoothing: f32,
    /// Epochs without validation improvement before stopping. Default 3.
    pub patience: usize,
    /// Word n-grams up to this order (1 = unigrams). Default 2.
    pub word_ngrams: usize,
    /// Smallest character n-gram inside word boundaries (0 disables). Default 2.
    pub char_ngram_min: usize,
    /// Largest character n-gram. Default 5.
    pub char_ngram_max: usize,
    /// Minimum number of training utterances a feature must occur in. Default 2.
    pub min_df: usize,
    /// Word and character n-grams are L2-normalised apart and the characters weighted
    /// by this (see `FeatureConfig::char_weight`); `null`: one norm over all n-grams.
    /// Default 0.7.
    pub char_weight: Option<f32>,
    /// Share of train held out for validation when the data has no validation split. Default 0.1.
    pub val_fraction: f64,
    /// Share held out for test when the data has no test split. Default 0.2.
    pub test_fraction: f64,
    /// OOS confidence threshold: a number in 0..1 fixes it; absent = tuned on validation
    /// (only when the data has an `oos` label).
    pub oos_threshold: Option<f32>,
    /// The out-of-scope label. Default `oos`.
    pub oos_label: String,
    /// After the run has chosen on validation what it can (epochs, ensemble weights, OOS
    /// threshold), retrain the bag on train + validation for its best epoch count and
    /// answer with that bag. Needs a model with a bag and a validation set. Default false
    /// (and then left out of the settings' JSON, so fingerprints of older runs still match).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub refit: bool,
}

impl Default for Hyper {
    fn default() -> Self {
        Self {
            model: ModelKind::Bag,
            conv_dim: 128,
            conv_filters: 256,
            max_tokens: 24,
            epochs: 12,
            seed: 42,
            batch_size: 64,
            lr: 0.002,
            hidden: 256,
            dropout: 0.3,
            feature_dropout: 0.0,
            label_smoothing: 0.0,
            patience: 3,
            word_ngrams: 2,
            char_ngram_min: 2,
            char_ngram_max: 5,
            min_df: 2,
            char_weight: Some(0.7),
            val_fraction: 0.1,
            test_fraction: 0.2,
            oos_threshold: None,
            oos_label: "oos".into(),
            refit: false,
        }
    }
}

/// Parameters of an `intent-train` job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainParams {
    /// The dataset (format, columns, splits).
    #[serde(flatten)]
    pub data: DatasetSpec,
    /// `auto` (default: the worker's default device), `cpu`, `cuda` or `cuda:N`.
    #[serde(default)]
    pub device: DeviceSpec,
    /// `auto` (default) or `manual`.
    #[serde(default)]
    pub promote: PromoteMode,
    /// Promotion rules.
    #[serde(default)]
    pub gate: GateRules,
    /// Model and optimisation settings, given flat in `params`.
    #[serde(flatten)]
    pub hyper: Hyper,
}

/// Which model an `intent-eval` job evaluates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalParams {
    /// The dataset; its test split(s) are used, or every row when it has none.
    #[serde(flatten)]
    pub data: DatasetSpec,
    /// A job id whose model to evaluate; absent = the bot's production model.
    #[serde(default)]
    pub model: Option<String>,
}

/// Settings of the word-order model only.
const CONV_KEYS: &[&str] = &["conv_dim", "conv_filters", "max_tokens"];
/// Settings of the bag only.
const BAG_KEYS: &[&str] = &["hidden", "word_ngrams", "char_ngram_min", "char_ngram_max", "char_weight", "feature_dropout"];

/// Refuses settings of a network `model` does not train: they were ignored in silence (a
/// `conv_dim` with the default model `bag` tuned nothing).
fn refuse_unused(params: &serde_json::Value, model: ModelKind) -> Result<(), JobError> {
    for (has, keys, network) in [(model.has_conv(), CONV_KEYS, "word-order model"), (model.has_bag(), BAG_KEYS, "bag")] {
        let given: Vec<&str> = keys.iter().copied().filter(|k| params.get(k).is_some()).collect();
        if !has && !given.is_empty() {
            return Err(bad(
                "intent-train",
                format!("{} set(s) the {network}, and model {model} has none: leave it out, or set model", given.join(", ")),
            ));
        }
    }
    Ok(())
}

/// The parameters of a train job beside its dataset and model settings.
#[derive(Deserialize)]
struct TrainOther {
    #[serde(default)]
    device: DeviceSpec,
    #[serde(default)]
    promote: PromoteMode,
    #[serde(default)]
    gate: GateRules,
}

/// The parameters of an eval job beside its dataset.
#[derive(Deserialize)]
struct EvalOther {
    #[serde(default)]
    model: Option<String>,
}

/// Reads the part of `params` made of `keys` (a flattened struct: serde's `flatten` loses which
/// field failed, so each part is read on its own), naming the parameter a value does not fit.
fn part<T: serde::de::DeserializeOwned>(what: &str, params: &serde_json::Value, keys: &[&str]) -> Result<T, JobError> {
    let obj = params.as_object().ok_or_else(|| bad(what, "params must be a JSON object"))?;
    let sub: serde_json::Map<String, serde_json::Value> =
        obj.iter().filter(|(k, _)| keys.contains(&k.as_str())).map(|(k, v)| (k.clone(), v.clone())).collect();
    serde_path_to_error::deserialize(serde_json::Value::Object(sub)).map_err(|e| match e.path().to_string() {
        path if path == "." => bad(what, e.inner()),
        path => bad(what, format!("`{path}`: {}", e.inner())),
    })
}

fn bad(what: &str, reason: impl std::fmt::Display) -> JobError {
    JobError::permanent(format!("invalid {what} params: {reason}"))
}

/// Keys that `Hyper` (flattened) accepts: serde's `flatten` disables `deny_unknown_fields`, so unknown keys are checked by hand.
const HYPER_KEYS: &[&str] = &[
    "model",
    "conv_dim",
    "conv_filters",
    "max_tokens",
    "epochs",
    "seed",
    "batch_size",
    "lr",
    "hidden",
    "dropout",
    "feature_dropout",
    "label_smoothing",
    "patience",
    "word_ngrams",
    "char_ngram_min",
    "char_ngram_max",
    "min_df",
    "char_weight",
    "val_fraction",
    "test_fraction",
    "oos_threshold",
    "oos_label",
    "refit",
];

fn check_keys(what: &str, params: &serde_json::Value, allowed: &[&[&str]]) -> Result<(), JobError> {
    let obj = params.as_object().ok_or_else(|| bad(what, "params must be a JSON object"))?;
    for k in obj.keys() {
        if !allowed.iter().any(|set| set.contains(&k.as_str())) {
            let mut all: Vec<&str> = allowed.iter().flat_map(|s| s.iter().copied()).collect();
            all.sort_unstable();
            return Err(bad(what, format!("unknown parameter `{k}`; known: {}", all.join(", "))));
        }
    }
    Ok(())
}

impl TrainParams {
    /// Parses and checks `params` of an `intent-train` job.
    pub fn parse(params: &serde_json::Value) -> Result<Self, JobError> {
        const OTHER_KEYS: &[&str] = &["device", "promote", "gate"];
        check_keys("intent-train", params, &[DatasetSpec::KEYS, HYPER_KEYS, OTHER_KEYS])?;
        let other: TrainOther = part("intent-train", params, OTHER_KEYS)?;
        let p = Self {
            data: part("intent-train", params, DatasetSpec::KEYS)?,
            device: other.device,
            promote: other.promote,
            gate: other.gate,
            hyper: part("intent-train", params, HYPER_KEYS)?,
        };
        p.data.check().map_err(|e| bad("intent-train", e))?;
        p.gate.check().map_err(|e| bad("intent-train", e))?;
        let h = &p.hyper;
        let checks: [(bool, String); 19] = [
            ((8..=1024).contains(&h.conv_dim), format!("conv_dim {} must be in 8..=1024", h.conv_dim)),
            ((8..=2048).contains(&h.conv_filters), format!("conv_filters {} must be in 8..=2048", h.conv_filters)),
            ((3..=256).contains(&h.max_tokens), format!("max_tokens {} must be in 3..=256", h.max_tokens)),
            (h.char_weight.is_none_or(|w| w > 0.0 && w <= 10.0), "char_weight must be in (0, 10]".to_string()),
            ((0.0..0.95).contains(&h.feature_dropout), format!("feature_dropout {} must be in [0, 0.95)", h.feature_dropout)),
            ((0.0..0.5).contains(&h.label_smoothing), format!("label_smoothing {} must be in [0, 0.5)", h.label_smoothing)),
            (h.epochs >= 1 && h.epochs <= 1000, format!("epochs {} must be in 1..=1000", h.epochs)),
            (h.batch_size >= 1 && h.batch_size <= 4096, format!("batch_size {} must be in 1..=4096", h.batch_size)),
            (h.lr > 0.0 && h.lr < 10.0, format!("lr {} must be in (0, 10)", h.lr)),
            (h.hidden >= 1 && h.hidden <= 4096, format!("hidden {} must be in 1..=4096", h.hidden)),
            ((0.0..0.95).contains(&h.dropout), format!("dropout {} must be in [0, 0.95)", h.dropout)),
            (h.patience >= 1, "patience must be at least 1".to_string()),
            ((1..=4).contains(&h.word_ngrams), format!("word_ngrams {} must be in 1..=4", h.word_ngrams)),
            (
                h.char_ngram_min == 0 || (h.char_ngram_min <= h.char_ngram_max && h.char_ngram_max <= 8),
                format!("char n-gram range {}..={} must satisfy min <= max <= 8 (min 0 disables)", h.char_ngram_min, h.char_ngram_max),
            ),
            (h.min_df >= 1, "min_df must be at least 1".to_string()),
            ((0.0..0.9).contains(&h.val_fraction), format!("val_fraction {} must be in [0, 0.9)", h.val_fraction)),
            (h.test_fraction > 0.0 && h.test_fraction < 0.9, format!("test_fraction {} must be in (0, 0.9)", h.test_fraction)),
            (h.oos_threshold.is_none_or(|t| (0.0..=1.0).contains(&t)), "oos_threshold must be in 0..=1".to_string()),
            (!h.refit || h.model.has_bag(), format!("refit retrains the bag, and model {} has none", h.model)),
        ];
        for (ok, msg) in checks {
            if !ok {
                return Err(bad("intent-train", msg));
            }
        }
        refuse_unused(params, h.model)?;
        Ok(p)
    }
}

impl EvalParams {
    /// Parses and checks `params` of an `intent-eval` job.
    pub fn parse(params: &serde_json::Value) -> Result<Self, JobError> {
        // `train_splits` and `val_splits` are refused, not ignored: an evaluation reads test rows only.
        check_keys("intent-eval", params, &[DatasetSpec::EVAL_KEYS, &["model"]])?;
        let p = Self {
            data: part("intent-eval", params, DatasetSpec::EVAL_KEYS)?,
            model: part::<EvalOther>("intent-eval", params, &["model"])?.model,
        };
        p.data.check().map_err(|e| bad("intent-eval", e))?;
        if let Some(m) = &p.model {
            if m.is_empty() || !m.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
                return Err(bad("intent-eval", format!("model {m:?} must be a job id (letters, digits, - and _)")));
            }
        }
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn defaults_and_rejections() {
        let p = TrainParams::parse(&json!({"dataset": "clinc150/data_small.json", "epochs": 3, "seed": 7})).unwrap();
        assert_eq!(p.hyper.epochs, 3);
        assert_eq!(p.hyper.seed, 7);
        assert_eq!(p.hyper.batch_size, 64);
        assert_eq!(p.promote, PromoteMode::Auto);
        assert_eq!(p.device, DeviceSpec::Auto);
        assert_eq!(p.hyper.model, ModelKind::Bag);
        let conv = TrainParams::parse(&json!({"dataset": "x.csv", "model": "bag+conv", "device": "cuda"})).unwrap();
        assert_eq!((conv.hyper.model, conv.device), (ModelKind::BagConv, DeviceSpec::Cuda(0)));
        let e = TrainParams::parse(&json!({"dataset": "x.csv", "model": "transformer"})).unwrap_err();
        assert!(e.message.contains("transformer"), "{}", e.message);
        assert!(TrainParams::parse(&json!({"dataset": "x.csv", "max_tokens": 2})).is_err());
        assert!(!p.hyper.refit);
        assert!(TrainParams::parse(&json!({"dataset": "x.csv", "model": "bag+conv", "refit": true})).unwrap().hyper.refit);
        let e = TrainParams::parse(&json!({"dataset": "x.csv", "model": "conv", "refit": true})).unwrap_err();
        assert!(e.message.contains("refit retrains the bag, and model conv has none"), "{}", e.message);
        let e = TrainParams::parse(&json!({"dataset": "x.csv", "epochz": 3})).unwrap_err();
        assert!(e.message.contains("unknown parameter `epochz`"), "{}", e.message);
        assert!(TrainParams::parse(&json!({"epochs": 3})).unwrap_err().message.contains("dataset"));
        assert!(TrainParams::parse(&json!({"dataset": "x.csv", "epochs": 0})).is_err());
        assert!(TrainParams::parse(&json!({"dataset": "x.csv", "promote": "sometimes"})).is_err());
        assert!(TrainParams::parse(&json!({"dataset": "x.csv", "format": "xml"})).is_err());
        assert!(TrainParams::parse(&json!({"dataset": "x.csv", "gate": {"min_accuracy": 2.0}})).is_err());
        assert!(TrainParams::parse(&json!({"dataset": "x.csv", "gate": {"min_acc": 0.5}})).is_err());
        assert_eq!(p.hyper.char_weight, Some(0.7));
        let e = TrainParams::parse(&json!({"dataset": "x.csv", "char_weight": 0.0})).unwrap_err();
        assert!(e.message.contains("char_weight"), "{}", e.message);
        assert!(TrainParams::parse(&json!({"dataset": "x.csv", "char_weight": 11.0})).is_err());
        assert_eq!(TrainParams::parse(&json!({"dataset": "x.csv", "char_weight": null})).unwrap().hyper.char_weight, None);
        assert!(EvalParams::parse(&json!({"dataset": "x.csv", "model": "../x"})).is_err());
        assert!(EvalParams::parse(&json!({"dataset": "x.csv", "epochs": 3})).is_err());
        for split in ["train_splits", "val_splits"] {
            let e = EvalParams::parse(&json!({"dataset": "x.json", split: ["val"]})).unwrap_err();
            assert!(e.message.contains(split), "an evaluation reads test rows only: {}", e.message);
        }
        assert_eq!(EvalParams::parse(&json!({"dataset": "x.csv", "model": "j-1"})).unwrap().model.as_deref(), Some("j-1"));
    }

    /// A setting of a network the model does not train is refused, naming it.
    #[test]
    fn settings_of_a_network_the_model_lacks_are_refused() {
        let e = TrainParams::parse(&json!({"dataset": "x.csv", "conv_dim": 64, "max_tokens": 12})).unwrap_err();
        assert!(e.message.contains("conv_dim, max_tokens set(s) the word-order model, and model bag has none"), "{}", e.message);
        let e = TrainParams::parse(&json!({"dataset": "x.csv", "model": "conv", "hidden": 64})).unwrap_err();
        assert!(e.message.contains("hidden set(s) the bag, and model conv has none"), "{}", e.message);
        let both = json!({"dataset": "x.csv", "model": "bag+conv", "hidden": 64, "conv_dim": 64, "char_weight": null});
        assert_eq!(TrainParams::parse(&both).unwrap().hyper.conv_dim, 64);
    }

    /// A value of the wrong type names its parameter (serde's `flatten` said only "invalid
    /// type: string, expected usize"), wherever it is.
    #[test]
    fn a_value_of_the_wrong_type_names_its_parameter() {
        for (params, names) in [
            (json!({"dataset": "x.csv", "epochs": "ten"}), "`epochs`: invalid type: string \"ten\""),
            (json!({"dataset": "x.csv", "train_splits": "train"}), "`train_splits`: invalid type"),
            (json!({"dataset": "x.csv", "gate": {"min_accuracy": "high"}}), "`gate.min_accuracy`: invalid type"),
            (json!({"dataset": "x.csv", "device": 3}), "`device`:"),
            (json!({"epochs": 3}), "missing field `dataset`"),
        ] {
            let e = TrainParams::parse(&params).unwrap_err();
            assert!(e.message.starts_with("invalid intent-train params: ") && e.message.contains(names), "{params}: {}", e.message);
        }
        let e = EvalParams::parse(&json!({"dataset": "x.csv", "model": 7})).unwrap_err();
        assert!(e.message.contains("`model`: invalid type: integer `7`"), "{}", e.message);
    }
}
