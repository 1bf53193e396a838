//! Every replica's view of admission: the active admitter of each job type publishes a snapshot
//! (bots' usage, jobs waiting) every second on `<prefix>.admission` (fanout, not durable); each
//! replica keeps the latest per type in memory, for the API, `jobs list --bot` and the demand
//! gauge. A snapshot older than [`STALE_AFTER`] is ignored (its admitter is gone).

use std::{
    collections::BTreeMap,
    sync::{Arc, RwLock},
    time::Duration,
};

use chrono::{DateTime, Utc};
use lapin::Channel;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use trainyard_common::{topology::Topology, CommonError};

use super::state::BotUsage;

/// A snapshot is ignored after this long without a newer one.
pub const STALE_AFTER: Duration = Duration::from_secs(10);

/// What the active admitter of one job type publishes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// The job type.
    pub job_type: String,
    /// When it was taken.
    pub at: DateTime<Utc>,
    /// Jobs waiting for admission that will run (not those latest wins will supersede).
    pub waiting: u64,
    /// Of those, the ones bots' limits let run now ([`Admission::runnable`](super::state::Admission::runnable));
    /// absent from a snapshot of a release before it (then `waiting` stands for it).
    #[serde(default)]
    pub runnable: Option<u64>,
    /// Jobs admitted and not finished.
    pub admitted: u64,
    /// With fair share: how many may be admitted and unfinished in all.
    pub window: Option<u64>,
    /// Bots with jobs admitted or waiting.
    pub bots: BTreeMap<String, BotUsage>,
}

impl Snapshot {
    /// What it adds to the autoscaling demand: the waiting jobs that could run now.
    pub fn demand(&self) -> u64 {
        self.runnable.unwrap_or(self.waiting)
    }
}

/// The exchange snapshots are published on.
pub fn exchange(topology: &Topology) -> String {
    format!("{}.admission", topology.prefix())
}

/// Declares the snapshot exchange (fanout, not durable: a snapshot is only worth a few seconds).
pub async fn declare_exchange(ch: &Channel, topology: &Topology) -> Result<String, CommonError> {
    let name = exchange(topology);
    trainyard_common::amqp::declare_fleeting_fanout(ch, &name).await?;
    Ok(name)
}

/// The latest snapshot of each job type.
#[derive(Debug, Clone, Default)]
pub struct AdmissionBoard {
    latest: Arc<RwLock<BTreeMap<String, Snapshot>>>,
}

impl AdmissionBoard {
    /// Keeps `snap` if it is newer than what the board holds for its type.
    pub fn record(&self, snap: Snapshot) {
        if let Ok(mut latest) = self.latest.write() {
            if latest.get(&snap.job_type).is_none_or(|old| old.at <= snap.at) {
                latest.insert(snap.job_type.clone(), snap);
            }
        }
    }

    /// The live snapshot of `job_type`.
    pub fn get(&self, job_type: &str) -> Option<Snapshot> {
        let snap = self.latest.read().ok()?.get(job_type)?.clone();
        let age = (Utc::now() - snap.at).to_std().unwrap_or_default();
        (age < STALE_AFTER).then_some(snap)
    }

    /// One bot's usage of every job type with admission (a bot with nothing admitted or
    /// waiting is listed with zeros for the types whose snapshot is live).
    pub fn bot(&self, bot: &str) -> BTreeMap<String, BotUsage> {
        let types: Vec<String> = self.latest.read().map(|l| l.keys().cloned().collect()).unwrap_or_default();
        types.iter().filter_map(|t| Some((t.clone(), self.get(t)?.bots.get(bot).cloned().unwrap_or_default()))).collect()
    }

    /// Consumes the snapshot exchange until `shutdown`, reconnecting when lost.
    pub async fn run(&self, url: &str, topology: &Topology, shutdown: CancellationToken) {
        crate::fanout::run("admission-board", url, &exchange(topology), None, shutdown, |body| {
            match serde_json::from_slice::<Snapshot>(body) {
                Ok(snap) => self.record(snap),
                Err(e) => tracing::warn!(error = %e, "ignored a message on the admission exchange that is not a snapshot"),
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(at: DateTime<Utc>, waiting: u64) -> Snapshot {
        let bots = BTreeMap::from([("a".to_string(), BotUsage { running: 2, waiting, limit: Some(2), weight: 1, share: 1.0 })]);
        Snapshot { job_type: "noop".into(), at, waiting, runnable: Some(0), admitted: 2, window: Some(6), bots }
    }

    #[test]
    fn the_newest_live_snapshot_is_shown_and_a_stale_one_is_not() {
        let board = AdmissionBoard::default();
        let now = Utc::now();
        board.record(snap(now, 5));
        board.record(snap(now - chrono::Duration::seconds(1), 9));
        assert_eq!(board.get("noop").map(|s| s.waiting), Some(5), "an older snapshot does not replace a newer one");
        assert_eq!(board.bot("a")["noop"].limit, Some(2));
        assert_eq!(board.bot("nobody")["noop"], BotUsage::default(), "a bot without jobs: zeros");
        let stale = AdmissionBoard::default();
        stale.record(snap(now - chrono::Duration::seconds(11), 5));
        assert!(stale.get("noop").is_none() && stale.bot("a").is_empty(), "an admitter gone for 10 s shows nothing");
    }

    #[test]
    fn a_snapshot_of_the_release_before_reads_its_waiting_jobs_as_runnable() {
        let old = r#"{"job_type":"noop","at":"2026-12-01T00:00:00Z","waiting":7,"admitted":1,"window":null,"bots":{}}"#;
        let snap: Snapshot = serde_json::from_str(old).unwrap();
        assert_eq!((snap.waiting, snap.runnable, snap.demand()), (7, None, 7));
        assert_eq!(Snapshot { runnable: Some(2), ..snap }.demand(), 2);
    }
}
