//! # trainyard (producer)
//!
//! The producer side of trainyard: submitting jobs ([`submit`]) over a pool of
//! confirm-mode channels ([`pool`]), and the control plane:
//!
//! - [`store`]: the job store, a projection of the event stream (SQLite or PostgreSQL);
//! - [`recorder`]: feeds the store from the `events.log` stream (from its stored offset) and `dead.recorder`;
//! - [`scheduler`] and [`triggers`]: cron schedules and event triggers ([`config`]);
//! - [`coalesce`]: latest wins among jobs that share a coalescing key;
//! - [`admission`]: fair share between bots and per-bot limits (jobs admitted to the workers);
//! - [`ops`]: job management shared by the CLI and the HTTP [`api`];
//! - [`serve`]: all of it in one process, with the demand metrics loop;
//! - [`rebuild`]: the store rebuilt from the audit stream; [`progress`]: `submit --wait`'s bar.
//!
//! The command-line interface lives in the binary.
//! Never links burn: training lives in `trainyard-worker`.
#![deny(missing_docs)]

pub mod admission;
pub mod api;
pub mod audit;
pub mod coalesce;
pub mod config;
pub mod console;
pub mod cron_expr;
pub mod fanout;
pub mod livelogs;
pub mod ops;
pub mod pool;
pub mod progress;
pub mod rebuild;
pub mod recorder;
pub mod scheduler;
pub mod serve;
pub mod store;
pub mod submit;
pub mod triggers;
pub mod workers;
