//! Intent classification on burn: the `intent-train` and `intent-eval` job types.
//!
//! One classifier per bot, built for short utterances and fast CPU training:
//!
//! - [`dataset`]: CLINC150 JSON, CSV and JSONL datasets under the data root, splits, validation;
//! - [`features`]: word and character n-grams, TF-IDF, L2-normalised, as sparse rows;
//! - [`sparse`]: the embedding bag (sparse × dense) and its row-wise lazy Adam, in plain Rust;
//! - [`model`]: the burn modules of the bag (head; the whole model as one burn record);
//! - [`train`]: the bag's CPU loop (burn autodiff for the head, sparse updates for the table),
//!   early stopping, checkpoints and resume, cancellation;
//! - [`seq`], [`nets`], [`device_train`]: fixed-width id rows, the networks that run wholly
//!   on a burn device (the bag's device path and the word-order model), and their loop;
//! - [`fit`]: one network of a run with its checkpoint, resume and progress;
//! - [`checkpoint`]: the checkpoint format;
//! - [`predict`]: a loaded model, OOS threshold rule, top-k;
//! - [`metrics`], [`plot`]: metrics, confusion matrix JSON and PNG;
//! - [`promotion`]: the promotion gate (pointer and history formats live in `trainyard_common::models`);
//! - [`pipeline`], [`eval`]: a whole train / eval run; [`env`]: where it reads and writes;
//! - [`handlers`]: the job types; [`cli`]: `trainyard-worker train` and `predict`;
//! - [`params`], [`device`]: job parameters and device selection (`auto`, `cpu`, `cuda[:N]`).

pub mod checkpoint;
pub mod cli;
pub mod dataset;
pub mod device;
pub mod device_train;
pub mod env;
pub mod eval;
pub mod features;
pub mod fit;
pub mod handlers;
pub mod limits;
pub mod metrics;
pub mod model;
pub mod nets;
pub mod params;
pub mod pipeline;
pub mod plot;
pub mod predict;
pub mod promotion;
pub mod publish;
pub mod seq;
pub mod sparse;
pub mod train;

pub use handlers::{IntentEval, IntentTrain};
