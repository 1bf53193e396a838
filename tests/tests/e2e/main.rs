//! End-to-end tests of the job pipeline against the real RabbitMQ on localhost.
//!
//! Every test uses its own topology prefix (`t-<uuid>`), so tests run in
//! parallel on one broker, and deletes what it declared. Tests under
//! `disrupt::` close every broker connection; `scripts/test.sh` runs them in
//! a serial phase of their own, after the others.

mod bindings;
mod browser;
mod coalescing;
mod console;
mod console_live;
mod console_state;
mod disrupt;
mod failover;
mod failures;
mod fairness;
mod follow;
mod hostile;
mod intent;
mod outage;
mod pipeline;
mod processes;
mod rebuild;
mod recording;
mod replicas;
mod security;
mod series;
mod shutdown;
mod support;
mod tenants;
mod workers;
