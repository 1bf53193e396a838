//! # trainyard (producer)
//!
//! The producer side of trainyard: submitting jobs ([`submit`]) over a pool of
//! confirm-mode channels ([`pool`]). The command-line interface lives in the binary.
//! Never links burn: training lives in `trainyard-worker`.
#![deny(missing_docs)]

pub mod pool;
pub mod submit;
