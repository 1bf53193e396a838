//! Worker heartbeats: what a live worker tells the control plane every few seconds.
//!
//! Workers publish a [`Heartbeat`] (JSON) to the heartbeats exchange
//! ([`crate::topology::Topology::heartbeats_exchange`], fanout, not durable: a heartbeat is only
//! worth its freshness) and a last one with `goodbye` set on a clean shutdown. Nothing records
//! them: the control plane keeps the latest of each worker in memory and shows a worker as gone
//! when nothing came for [`MISSED_BEATS`] intervals. They never go to the events exchange, whose
//! every message the recorder and the events stream keep.

use chrono::{DateTime, Utc};
use lapin::Channel;
use serde::{Deserialize, Serialize};

use crate::{topology::Topology, CommonError, WorkerInfo};

/// Default seconds between two heartbeats of a worker.
pub const DEFAULT_INTERVAL_S: u64 = 5;
/// A worker is gone when this many intervals passed without a heartbeat.
pub const MISSED_BEATS: u32 = 3;
/// The longest interval a worker may choose: gone is then shown within 30 s.
pub const MAX_INTERVAL_S: u64 = 10;

/// One heartbeat of a worker.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Heartbeat {
    /// The worker's id and attributes (`node`, `gpu`, … as in events).
    pub worker: WorkerInfo,
    /// Host name of the machine or container.
    pub host: String,
    /// Pod name, on Kubernetes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// Job types it consumes.
    pub job_types: Vec<String>,
    /// Training device setting (`auto`, `cpu`, `cuda:0`, …).
    pub device: String,
    /// Jobs it may run at once, all job types together.
    pub slots: usize,
    /// Jobs it runs now.
    pub slots_in_use: usize,
    /// Ids of the jobs it runs now.
    pub current_jobs: Vec<String>,
    /// Jobs delivered to it and not started yet, by job type: held for a free slot (its
    /// prefetch on each priority tier). The broker counts them neither ready nor running, so
    /// the control plane adds them to the demand (0 from a worker before this field).
    #[serde(default)]
    pub waiting: std::collections::BTreeMap<String, usize>,
    /// The worker's release.
    pub version: String,
    /// Seconds until its next heartbeat.
    pub interval_s: u64,
    /// When it was sent.
    pub sent_at: DateTime<Utc>,
    /// The last one: the worker stops cleanly.
    #[serde(default)]
    pub goodbye: bool,
}

impl Heartbeat {
    /// The jobs of `job_type` it may run at once: its slots are the same number per job type it
    /// consumes (`--concurrency`), so a share of the total; 0 for a type it does not consume.
    pub fn slots_for(&self, job_type: &str) -> usize {
        match self.job_types.iter().any(|t| t == job_type) {
            true => self.slots / self.job_types.len(),
            false => 0,
        }
    }
}

/// Declares the heartbeats exchange (fanout, not durable, idempotent).
pub async fn declare_exchange(ch: &Channel, topology: &Topology) -> Result<String, CommonError> {
    let name = topology.heartbeats_exchange();
    crate::amqp::declare_fleeting_fanout(ch, &name).await?;
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A worker of two types with concurrency 2 beats 4 slots: 2 for each (the fair-share window
    /// of one type counted all 4).
    #[test]
    fn slots_are_per_job_type() {
        let beat = Heartbeat { job_types: vec!["noop".into(), "intent-eval".into()], slots: 4, ..Default::default() };
        assert_eq!((beat.slots_for("noop"), beat.slots_for("intent-eval"), beat.slots_for("intent-train")), (2, 2, 0));
    }
}
