//! # trainyard-common
//!
//! What the producer (`trainyard`) and the worker (`trainyard-worker`) share:
//!
//! - [`job`]: the [`JobSpec`](job::JobSpec) wire contract and its validation;
//! - [`event`]: [`JobEvent`](event::JobEvent), one per state change of a job;
//! - [`codec`]: msgpack (as a map) / JSON encoding chosen by content type;
//! - [`topology`]: every exchange and queue name, declared idempotently;
//! - [`amqp`]: connecting (with credentials redacted) and confirmed publishing;
//! - [`control`]: cancel requests to workers;
//! - [`config`]: environment settings with laptop defaults;
//! - [`artifacts`]: the artifact store (object_store, local directory by default);
//! - [`metrics`]: every Prometheus metric name and label, defined once;
//! - [`models`]: bots' production pointers and promotion history;
//! - [`heartbeat`]: what live workers publish every few seconds for the console;
//! - [`reconnect`]: the one reconnect loop (backoff, jitter, reset) of every broker session;
//! - [`version`]: [`SchemaVersion`](version::SchemaVersion), the contract version;
//! - [`error`]: the error types of this layer.
#![deny(missing_docs)]

pub mod amqp;
pub mod artifacts;
pub mod codec;
pub mod config;
pub mod control;
pub mod error;
pub mod event;
pub mod headers;
pub mod heartbeat;
pub mod job;
pub mod livelog;
pub mod metrics;
pub mod models;
pub mod paths;
pub mod reconnect;
pub mod topology;
pub mod version;

pub use error::{CodecError, CommonError};
pub use event::{ErrorInfo, ErrorKind, JobEvent, JobStatus, WorkerInfo};
pub use job::{JobSpec, Trigger, TriggerKind};
