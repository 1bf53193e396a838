//! # trainyard-worker
//!
//! Consumes jobs from RabbitMQ and runs them:
//! - [`handler`]: the [`JobHandler`](handler::JobHandler) trait, job context and registry;
//! - [`handlers`]: built-in job types (`noop`, and the intent training types);
//! - [`intent`]: intent classification on burn (`intent-train`, `intent-eval`, the `train`/`predict` CLI);
//! - [`runtime`]: the consumer runtime (prefetch = free slots, ack after the
//!   outcome is durable, retries, dead letters, reconnects, graceful shutdown).
#![deny(missing_docs)]

pub mod handler;
pub mod handlers;
pub mod intent;
pub mod k8s;
pub mod runtime;
