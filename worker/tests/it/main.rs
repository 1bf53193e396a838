//! The worker crate's integration tests, one binary.

mod intent;
