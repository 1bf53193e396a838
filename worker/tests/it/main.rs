//! The worker crate's integration tests, one binary.

mod device;
mod gate;
mod hooked;
mod intent;
mod refit;
mod stops;
