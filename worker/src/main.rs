//! `trainyard-worker`: see the crate docs.
fn main() {}
