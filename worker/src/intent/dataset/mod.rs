//! Datasets: where they are, how they are read, how they are split.
//!
//! Three formats ([`Format`]): CLINC150-style JSON (named splits of `[text, label]`
//! pairs; CLINC's `oos_*` splits carry the `oos` label), CSV with a header
//! (`text,label`, columns mappable) and JSONL (`{"text": …, "intent": …}` per
//! line). Paths are relative to the data root and may not leave it.
//!
//! Training data without a test split gets a holdout chosen by each row's content (the same
//! rows for every job: [`content_holdout`]); without a validation split, a stratified holdout
//! drawn with the job's seed. Every malformed input is a [`DatasetError`], which the handlers
//! turn into a permanent job error.

mod error;
mod holdout;
mod parse;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use trainyard_common::paths::resolve_under;

pub use self::{
    error::DatasetError,
    holdout::{content_holdout, stratified_holdout},
};

/// One labelled utterance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Example {
    /// The utterance.
    pub text: String,
    /// Its intent.
    pub label: String,
}

impl Example {
    /// An example.
    pub fn new(text: impl Into<String>, label: impl Into<String>) -> Self {
        Self { text: text.into(), label: label.into() }
    }
}

/// A dataset file format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// CLINC150 JSON: `{"train": [[text, label], …], "val": …, "test": …, "oos_train": …}`.
    Clinc,
    /// CSV with a header row.
    Csv,
    /// One JSON object per line.
    Jsonl,
}

/// Where the data is and how to read it (part of a job's `params`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct DatasetSpec {
    /// Path relative to the data root (`TRAINYARD_DATA_DIR`), or `file:` + such a path.
    pub dataset: String,
    /// Optional separate test set (same rules).
    #[serde(default)]
    pub test_dataset: Option<String>,
    /// `clinc|csv|jsonl`; guessed from the extension, then the content, when absent.
    #[serde(default)]
    pub format: Option<Format>,
    /// CSV/JSONL field of the utterance. Default `text`.
    #[serde(default)]
    pub text_column: Option<String>,
    /// CSV/JSONL field of the label. Default `label` (CSV), `intent` then `label` (JSONL).
    #[serde(default)]
    pub label_column: Option<String>,
    /// CLINC splits to train on. Default `["train", "oos_train"]`.
    #[serde(default)]
    pub train_splits: Option<Vec<String>>,
    /// CLINC splits to validate on. Default `["val", "oos_val"]`.
    #[serde(default)]
    pub val_splits: Option<Vec<String>>,
    /// CLINC splits to test on. Default `["test", "oos_test"]`.
    #[serde(default)]
    pub test_splits: Option<Vec<String>>,
}

/// The parsed content of one dataset file.
#[derive(Debug, Clone)]
pub enum Raw {
    /// Named splits (CLINC JSON).
    Named(BTreeMap<String, Vec<Example>>),
    /// Plain rows (CSV, JSONL).
    Rows(Vec<Example>),
}

/// Train/validation/test examples, ready to use.
#[derive(Debug, Clone, Default)]
pub struct Splits {
    /// Training examples.
    pub train: Vec<Example>,
    /// Validation examples (early stopping, OOS threshold).
    pub val: Vec<Example>,
    /// Test examples (metrics, promotion gate).
    pub test: Vec<Example>,
    /// How the splits were made, for the log.
    pub notes: Vec<String>,
}

impl DatasetSpec {
    /// The parameter names this struct reads.
    pub const KEYS: &'static [&'static str] =
        &["dataset", "test_dataset", "format", "text_column", "label_column", "train_splits", "val_splits", "test_splits"];
    /// Those an evaluation reads: it has no training or validation rows to name.
    pub const EVAL_KEYS: &'static [&'static str] = &["dataset", "test_dataset", "format", "text_column", "label_column", "test_splits"];

    /// A spec for a dataset path with every default.
    pub fn new(dataset: impl Into<String>) -> Self {
        Self { dataset: dataset.into(), ..Self::default() }
    }

    /// Cheap checks (no I/O): the paths are relative and stay under the root.
    pub fn check(&self) -> Result<(), DatasetError> {
        let dummy = Path::new("/nonexistent-trainyard-root");
        resolve_under(dummy, &self.dataset)?;
        if let Some(t) = &self.test_dataset {
            resolve_under(dummy, t)?;
        }
        // A split named in two lists goes to the first: the second then reported it missing.
        let mut seen: BTreeMap<&str, &str> = BTreeMap::new();
        for (list, names) in self.split_lists().into_iter().filter_map(|(l, n)| n.map(|n| (l, n))) {
            for name in names {
                if let Some(first) = seen.insert(name.as_str(), list) {
                    return Err(DatasetError::SplitTwice { split: name.clone(), lists: format!("{first} and {list}") });
                }
            }
        }
        Ok(())
    }

    fn read(&self, root: &Path, rel: &str) -> Result<Raw, DatasetError> {
        let path = resolve(root, rel)?;
        let io = |e: std::io::Error| DatasetError::Io { file: rel.into(), reason: e.to_string() };
        let size = std::fs::metadata(&path).map_err(io)?.len();
        if size > MAX_DATASET_BYTES {
            return Err(DatasetError::TooLarge { file: rel.into(), bytes: size });
        }
        let read = std::fs::read(&path).map_err(io)?;
        // A UTF-8 byte-order mark (some editors write one) is not part of the data.
        let bytes = read.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&read);
        let format = match self.format {
            Some(f) => f,
            None => guess_format(&path, bytes).ok_or_else(|| DatasetError::UnknownFormat(rel.into()))?,
        };
        match format {
            Format::Clinc => parse::clinc(rel, bytes).map(Raw::Named),
            Format::Csv => parse::csv(rel, bytes, self.text_column.as_deref(), self.label_column.as_deref()).map(Raw::Rows),
            Format::Jsonl => parse::jsonl(rel, bytes, self.text_column.as_deref(), self.label_column.as_deref()).map(Raw::Rows),
        }
    }

    /// Loads the training, validation and test sets under `root`.
    pub fn load_for_training(&self, root: &Path, seed: u64, val_fraction: f64, test_fraction: f64) -> Result<Splits, DatasetError> {
        let mut s = Splits::default();
        match self.read(root, &self.dataset)? {
            Raw::Named(mut named) => {
                let wanted = self.train_splits.clone().unwrap_or_else(|| vec!["train".into(), "oos_train".into()]);
                let need = if self.train_splits.is_some() { Need::Each } else { Need::Any };
                s.train = take_splits(&self.dataset, &mut named, &wanted, need)?;
                let val = self.val_splits.clone().unwrap_or_else(|| vec!["val".into(), "oos_val".into()]);
                // Splits the job names must exist; the default ones may be absent (held out instead).
                s.val = take_splits(&self.dataset, &mut named, &val, Need::each_if(self.val_splits.is_some()))?;
                let test = self.test_splits.clone().unwrap_or_else(|| vec!["test".into(), "oos_test".into()]);
                // With a `test_dataset`, `test_splits` names its splits (those of `dataset` are only kept out of training).
                let [_, _, (_, test_here)] = self.split_lists();
                s.test = take_splits(&self.dataset, &mut named, &test, Need::each_if(test_here.is_some()))?;
            }
            Raw::Rows(rows) => {
                refuse_splits_of_rows(&self.dataset, &self.split_lists())?;
                s.train = rows;
            }
        }
        if s.train.is_empty() {
            return Err(DatasetError::Empty("training"));
        }
        if let Some(t) = &self.test_dataset {
            s.test = self.load_eval_set(root, t)?;
            s.notes.push(format!("test set: {t}"));
        }
        // Test rows the job named (a file, or splits) and found empty are an error: the gate would
        // decide on a holdout of the training data instead, which nobody asked for.
        if s.test.is_empty() && (self.test_dataset.is_some() || self.split_lists()[2].1.is_some()) {
            return Err(DatasetError::Empty("test"));
        }
        if s.test.is_empty() {
            let (keep, held) = content_holdout(std::mem::take(&mut s.train), test_fraction);
            s.train = keep;
            s.test = held;
            s.notes.push(format!("test set: {:.0}% holdout of the training data, chosen by each row's content", test_fraction * 100.0));
        }
        if s.val.is_empty() && val_fraction > 0.0 {
            let (keep, held) = stratified_holdout(std::mem::take(&mut s.train), val_fraction, seed.wrapping_add(1));
            s.train = keep;
            s.val = held;
            s.notes.push(format!(
                "validation set: stratified {:.0}% holdout of the training data (seed {})",
                val_fraction * 100.0,
                seed.wrapping_add(1)
            ));
        }
        validate(&s)?;
        Ok(s)
    }

    /// Loads the examples to evaluate on: `test_dataset` when given, else the test
    /// splits of `dataset` (each split `test_splits` names must be there), else all of its rows.
    pub fn load_for_eval(&self, root: &Path) -> Result<Vec<Example>, DatasetError> {
        let rel = self.test_dataset.as_deref().unwrap_or(&self.dataset);
        let v = self.load_eval_set(root, rel)?;
        if v.is_empty() {
            return Err(DatasetError::Empty("test"));
        }
        Ok(v)
    }

    /// The split lists the job names for `dataset`, by parameter (`test_splits` names the
    /// splits of `test_dataset` when there is one).
    fn split_lists(&self) -> [(&'static str, Option<&Vec<String>>); 3] {
        let test = self.test_splits.as_ref().filter(|_| self.test_dataset.is_none());
        [("train_splits", self.train_splits.as_ref()), ("val_splits", self.val_splits.as_ref()), ("test_splits", test)]
    }

    fn load_eval_set(&self, root: &Path, rel: &str) -> Result<Vec<Example>, DatasetError> {
        match self.read(root, rel)? {
            Raw::Rows(rows) => {
                refuse_splits_of_rows(rel, &[("test_splits", self.test_splits.as_ref())])?;
                Ok(rows)
            }
            Raw::Named(mut named) => {
                let test = self.test_splits.clone().unwrap_or_else(|| vec!["test".into(), "oos_test".into()]);
                // Splits the job names must be there: a typo would evaluate on every row, the
                // training rows included. Without names, the test splits, else every row.
                let v = take_splits(rel, &mut named, &test, Need::each_if(self.test_splits.is_some()))?;
                if v.is_empty() {
                    Ok(named.into_values().flatten().collect())
                } else {
                    Ok(v)
                }
            }
        }
    }
}

fn resolve(root: &Path, rel: &str) -> Result<PathBuf, DatasetError> {
    let path = resolve_under(root, rel)?;
    if !path.is_file() {
        return Err(DatasetError::NotFound(rel.into()));
    }
    Ok(path)
}

/// The largest dataset file a worker reads (whole, into memory): 512 MiB, some 250 times
/// CLINC150's `data_full.json`.
pub const MAX_DATASET_BYTES: u64 = 512 << 20;

/// Guesses a format from the extension, then from the first bytes.
pub fn guess_format(path: &Path, bytes: &[u8]) -> Option<Format> {
    match path.extension().and_then(|e| e.to_str()).map(|e| e.to_ascii_lowercase()).as_deref() {
        Some("jsonl" | "ndjson") => return Some(Format::Jsonl),
        Some("csv") => return Some(Format::Csv),
        Some("json") => return Some(Format::Clinc),
        _ => {}
    }
    let text = std::str::from_utf8(&bytes[..bytes.len().min(64 * 1024)]).ok()?;
    let trimmed = text.trim_start();
    if trimmed.starts_with('{') {
        let first = trimmed.lines().next().unwrap_or("");
        if serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(first).is_ok() {
            return Some(Format::Jsonl);
        }
        return Some(Format::Clinc);
    }
    let header = trimmed.lines().next()?;
    header.contains(',').then_some(Format::Csv)
}

/// Refuses split names given for a file of plain rows (they were ignored: every row was
/// trained on, or tested on).
fn refuse_splits_of_rows(file: &str, lists: &[(&str, Option<&Vec<String>>)]) -> Result<(), DatasetError> {
    let named: Vec<&str> = lists.iter().filter(|(_, names)| names.is_some()).map(|(list, _)| *list).collect();
    if named.is_empty() {
        return Ok(());
    }
    Err(DatasetError::NoSplits { file: file.into(), which: named.join(", ") })
}

/// Which of the wanted splits a file must have.
#[derive(Debug, Clone, Copy)]
enum Need {
    /// Each one: the job named them.
    Each,
    /// At least one (the default training splits).
    Any,
    /// None (default splits that may be held out instead).
    Nothing,
}

impl Need {
    fn each_if(named_by_the_job: bool) -> Self {
        if named_by_the_job {
            Need::Each
        } else {
            Need::Nothing
        }
    }
}

fn take_splits(
    file: &str,
    named: &mut BTreeMap<String, Vec<Example>>,
    wanted: &[String],
    need: Need,
) -> Result<Vec<Example>, DatasetError> {
    let missing: Vec<String> = wanted.iter().filter(|w| !named.contains_key(*w)).cloned().collect();
    let short = match need {
        Need::Each => !missing.is_empty(),
        Need::Any => missing.len() == wanted.len(),
        Need::Nothing => false,
    };
    if short {
        return Err(DatasetError::MissingSplit { file: file.into(), wanted: missing, found: named.keys().cloned().collect() });
    }
    Ok(wanted.iter().filter_map(|w| named.remove(w)).flatten().collect())
}

fn validate(s: &Splits) -> Result<(), DatasetError> {
    if s.train.is_empty() {
        return Err(DatasetError::Empty("training"));
    }
    let labels: BTreeSet<&str> = s.train.iter().map(|e| e.label.as_str()).collect();
    if labels.len() < 2 {
        return Err(DatasetError::OneClass(s.train[0].label.clone()));
    }
    if s.test.is_empty() {
        return Err(DatasetError::Empty("test"));
    }
    for (name, set) in [("validation", &s.val), ("test", &s.test)] {
        let unknown: BTreeSet<&str> = set.iter().map(|e| e.label.as_str()).filter(|l| !labels.contains(l)).collect();
        if !unknown.is_empty() {
            return Err(DatasetError::UnknownLabels { split: name, labels: unknown.into_iter().take(10).map(String::from).collect() });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A split the job names must be there: a typo in `test_splits` tested on a holdout of the
    /// training data instead, and the promotion gate decided on it. The default ones may be absent.
    #[test]
    fn named_splits_must_exist_and_default_ones_may_be_absent() {
        let dir = tempfile::tempdir().unwrap();
        let rows: Vec<(String, &str)> = (0..40).map(|i| (format!("utterance {i}"), if i % 2 == 0 { "a" } else { "b" })).collect();
        std::fs::write(dir.path().join("d.json"), serde_json::json!({"train": rows, "test": &rows[..4]}).to_string()).unwrap();
        let spec = |test: Option<&str>, val: Option<&str>| DatasetSpec {
            test_splits: test.map(|t| vec![t.to_string()]),
            val_splits: val.map(|v| vec![v.to_string()]),
            format: Some(Format::Clinc),
            ..DatasetSpec::new("d.json")
        };
        let ok = spec(None, None).load_for_training(dir.path(), u64::MAX, 0.2, 0.2).unwrap();
        assert_eq!(ok.test.len(), 4, "the default test split");
        assert!(!ok.val.is_empty() && ok.notes.iter().any(|n| n.contains("seed 0")), "a holdout, its seed wrapped: {:?}", ok.notes);
        for bad in [spec(Some("tset"), None), spec(None, Some("vla"))] {
            let e = bad.load_for_training(dir.path(), 7, 0.2, 0.2).unwrap_err();
            assert!(matches!(e, DatasetError::MissingSplit { .. }), "{e}");
        }
        // Evaluation too (it used to take every row, the training rows included), and a
        // list of which only some splits exist (the others were dropped in silence).
        let e = spec(Some("tset"), None).load_for_eval(dir.path()).unwrap_err();
        assert!(matches!(&e, DatasetError::MissingSplit { wanted, .. } if wanted == &["tset"]), "{e}");
        let partly = DatasetSpec { test_splits: Some(vec!["test".into(), "oos_tset".into()]), ..spec(None, None) };
        let e = partly.load_for_training(dir.path(), 7, 0.2, 0.2).unwrap_err();
        assert!(matches!(&e, DatasetError::MissingSplit { wanted, .. } if wanted == &["oos_tset"]), "{e}");
        assert_eq!(spec(None, None).load_for_eval(dir.path()).unwrap().len(), 4, "the default test split");
        // A test file or a named test split with no rows is an error, not a holdout of the training data.
        std::fs::write(dir.path().join("t.csv"), "text,label\n").unwrap();
        std::fs::write(dir.path().join("e.json"), serde_json::json!({"train": rows, "test": []}).to_string()).unwrap();
        let empty_file = DatasetSpec { test_dataset: Some("t.csv".into()), ..DatasetSpec::new("d.json") };
        let empty_split = DatasetSpec { test_splits: Some(vec!["test".into()]), ..DatasetSpec::new("e.json") };
        for spec in [empty_file, empty_split] {
            let e = spec.load_for_training(dir.path(), 7, 0.2, 0.2).unwrap_err();
            assert!(matches!(e, DatasetError::Empty("test")), "{e}");
        }
        let holdout = DatasetSpec::new("e.json").load_for_training(dir.path(), 7, 0.2, 0.2).unwrap();
        assert!(!holdout.test.is_empty() && holdout.notes.iter().any(|n| n.contains("content")), "{:?}", holdout.notes);
        // A split in two lists is refused at once (the second list reported it missing).
        let twice = DatasetSpec { train_splits: Some(vec!["train".into()]), ..spec(None, Some("train")) };
        let e = twice.check().unwrap_err();
        assert!(matches!(&e, DatasetError::SplitTwice { split, .. } if split == "train"), "{e}");
        assert!(e.to_string().contains("train_splits and val_splits"), "{e}");
        // A byte-order mark before the JSON is not an error.
        let mut bom = b"\xEF\xBB\xBF".to_vec();
        bom.extend(std::fs::read(dir.path().join("d.json")).unwrap());
        std::fs::write(dir.path().join("bom.json"), bom).unwrap();
        let with_bom = DatasetSpec { format: Some(Format::Clinc), ..DatasetSpec::new("bom.json") };
        assert_eq!(with_bom.load_for_eval(dir.path()).unwrap().len(), 4);
        // A file over the limit is refused before it is read (a sparse file: no disk used).
        std::fs::File::create(dir.path().join("huge.csv")).unwrap().set_len(MAX_DATASET_BYTES + 1).unwrap();
        let e = DatasetSpec::new("huge.csv").load_for_eval(dir.path()).unwrap_err();
        assert!(matches!(e, DatasetError::TooLarge { .. }), "{e}");
        // Plain rows have no splits to name: naming one is an error, not ignored.
        std::fs::write(dir.path().join("rows.csv"), "text,label\nhello,a\nbye,b\n").unwrap();
        let rows = DatasetSpec { test_splits: Some(vec!["test".into()]), format: Some(Format::Csv), ..DatasetSpec::new("rows.csv") };
        for e in [rows.load_for_eval(dir.path()).unwrap_err(), rows.load_for_training(dir.path(), 7, 0.2, 0.2).unwrap_err()] {
            assert!(matches!(&e, DatasetError::NoSplits { which, .. } if which == "test_splits"), "{e}");
        }
    }

    #[test]
    fn guesses_formats() {
        assert_eq!(guess_format(Path::new("x.csv"), b""), Some(Format::Csv));
        assert_eq!(guess_format(Path::new("x.jsonl"), b""), Some(Format::Jsonl));
        assert_eq!(guess_format(Path::new("x.json"), b""), Some(Format::Clinc));
        assert_eq!(guess_format(Path::new("x"), b"{\"text\":\"a\",\"intent\":\"b\"}\n{}"), Some(Format::Jsonl));
        assert_eq!(guess_format(Path::new("x"), b"{\n \"train\": []}"), Some(Format::Clinc));
        assert_eq!(guess_format(Path::new("x"), b"text,label\na,b"), Some(Format::Csv));
        assert_eq!(guess_format(Path::new("x"), b"hello"), None);
    }
}
