//! # trainyard (producer)
//!
//! The producer side of trainyard: submitting jobs ([`submit`]) over a pool of
//! confirm-mode channels ([`pool`]), and the control plane:
//!
//! - [`store`]: the job store, a projection of the event stream (SQLite or PostgreSQL);
//! - [`recorder`]: feeds the store from `recorder` and `dead.recorder`;
//!
//! The command-line interface lives in the binary.
//! Never links burn: training lives in `trainyard-worker`.
#![deny(missing_docs)]

pub mod pool;
pub mod recorder;
pub mod store;
pub mod submit;
