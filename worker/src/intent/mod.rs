//! Intent classification on burn: the `intent-train` and `intent-eval` job types.
//!
//! One classifier per bot, built for short utterances and fast CPU training:
//!
//! - [`dataset`]: CLINC150 JSON, CSV and JSONL datasets under the data root, splits, validation;
//! - [`features`]: word and character n-grams, TF-IDF, L2-normalised, as sparse rows;
//! - [`sparse`]: the embedding bag (sparse × dense) and its row-wise lazy Adam, in plain Rust;
//! - [`model`]: the burn modules (head; the whole model as one burn record);
//! - [`train`]: the loop (burn autodiff for the head, sparse updates for the table),
//!   early stopping, checkpoints and resume, cancellation;
//! - [`checkpoint`]: the checkpoint format;
//! - [`predict`]: a loaded model, OOS threshold rule, top-k;
//! - [`metrics`], [`plot`]: metrics, confusion matrix JSON and PNG;
//! - [`promotion`]: the promotion gate (pointer and history formats live in `trainyard_common::models`);
//! - [`pipeline`], [`eval`]: a whole train / eval run; [`env`]: where it reads and writes;
//! - [`handlers`]: the job types; [`cli`]: `trainyard-worker train` and `predict`;
//! - [`params`], [`device`]: job parameters and backend selection (`cpu`, `cuda[:N]`).

pub mod checkpoint;
pub mod cli;
pub mod dataset;
pub mod device;
pub mod env;
pub mod eval;
pub mod features;
pub mod handlers;
pub mod metrics;
pub mod model;
pub mod params;
pub mod pipeline;
pub mod plot;
pub mod predict;
pub mod promotion;
pub mod sparse;
pub mod train;

pub use handlers::{IntentEval, IntentTrain};
