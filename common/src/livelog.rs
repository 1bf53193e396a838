//! Live log lines of running attempts: what a worker's job writes, on its way to the console
//! while the attempt runs (the whole log is saved in the artifact store when it ends).
//!
//! Workers publish [`LogChunk`]s (JSON) to the logs exchange ([`exchange`], `P.logs`, fanout,
//! not durable) every [`EVERY`] while an attempt has new lines. A chunk carries its byte offset
//! in the attempt's log, so a reader that got chunks twice or missed some can tell. Best effort,
//! like heartbeats: a chunk that cannot be published is not sent again, and nothing records
//! them; the attempt's saved log is the record.

use std::time::Duration;

use lapin::Channel;
use serde::{Deserialize, Serialize};

use crate::{topology::Topology, CommonError};

/// How often a worker publishes the new lines of its running attempts.
pub const EVERY: Duration = Duration::from_millis(500);
/// Most bytes of log text in one chunk.
pub const MAX_CHUNK: usize = 64 * 1024;

/// New log text of one attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogChunk {
    /// The job.
    pub job_id: String,
    /// The attempt (1-based).
    pub attempt: u32,
    /// Byte offset of `text` in the attempt's log.
    pub offset: u64,
    /// The lines (whole lines, unless cut at [`MAX_CHUNK`]).
    pub text: String,
    /// The worker running it.
    pub worker: String,
    /// Which making of the attempt's log on that worker: the same attempt delivered to the
    /// same worker again (after a lost connection) makes a new log, sent from offset 0 with a
    /// higher number, which a reader starts again from (0 from a worker before this field).
    #[serde(default)]
    pub making: u64,
}

/// The logs exchange of `topology`: `<prefix>.logs`.
pub fn exchange(topology: &Topology) -> String {
    format!("{}.logs", topology.prefix())
}

/// Declares the logs exchange (fanout, not durable, idempotent).
pub async fn declare_exchange(ch: &Channel, topology: &Topology) -> Result<String, CommonError> {
    let name = exchange(topology);
    crate::amqp::declare_fleeting_fanout(ch, &name).await?;
    Ok(name)
}
