//! The worker crate's integration tests, one binary.

mod device;
mod intent;
mod refit;
mod stops;
