//! Why a dataset cannot be used: every error names the file, and the line or split when it can.

use trainyard_common::paths::PathError;

use super::MAX_DATASET_BYTES;

/// A dataset that cannot be used. Always permanent: retrying will not fix the file.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DatasetError {
    /// The path is refused.
    #[error("dataset path refused: {0}")]
    Path(#[from] PathError),
    /// No such file.
    #[error("dataset {0:?} not found under the data root")]
    NotFound(String),
    /// Reading failed.
    #[error("failed to read dataset {file:?}: {reason}")]
    Io {
        /// The file.
        file: String,
        /// The cause.
        reason: String,
    },
    /// A malformed row or document.
    #[error("dataset {file:?}, line {line}: {reason}")]
    Parse {
        /// The file.
        file: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// The format could not be guessed.
    #[error("cannot tell the format of {0:?}; set `format` to clinc, csv or jsonl")]
    UnknownFormat(String),
    /// A dataset file over [`MAX_DATASET_BYTES`].
    #[error("dataset {file:?} is {bytes} bytes, over the {} MiB a worker reads", MAX_DATASET_BYTES >> 20)]
    TooLarge {
        /// The file.
        file: String,
        /// Its size.
        bytes: u64,
    },
    /// One split named in two lists.
    #[error("split {split:?} is named in both {lists}: name each split once")]
    SplitTwice {
        /// The split.
        split: String,
        /// The two lists.
        lists: String,
    },
    /// Splits named for a file of plain rows (csv, jsonl), which has none.
    #[error("dataset {file:?} is plain rows (csv or jsonl): it has no splits, so it cannot take the {which} the job names")]
    NoSplits {
        /// The file.
        file: String,
        /// The parameters that name splits.
        which: String,
    },
    /// A required split is missing.
    #[error("dataset {file:?} lacks the splits {wanted:?} the job names (it has {found:?})")]
    MissingSplit {
        /// The file.
        file: String,
        /// Splits looked for.
        wanted: Vec<String>,
        /// Splits present.
        found: Vec<String>,
    },
    /// No examples.
    #[error("the {0} set is empty")]
    Empty(&'static str),
    /// Fewer than two classes.
    #[error("the training set has a single class ({0:?}); a classifier needs at least two")]
    OneClass(String),
    /// Labels to evaluate that training never saw.
    #[error("the {split} set has labels that are not in the training set: {labels:?}")]
    UnknownLabels {
        /// Which set.
        split: &'static str,
        /// Up to 10 such labels.
        labels: Vec<String>,
    },
}
