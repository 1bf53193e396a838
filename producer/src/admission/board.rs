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
use futures::StreamExt;
use lapin::{
    options::{BasicConsumeOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions},
    types::FieldTable,
    Channel, ExchangeKind,
};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use trainyard_common::{amqp::connect, topology::Topology, CommonError};

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
    /// Jobs admitted and not finished.
    pub admitted: u64,
    /// With fair share: how many may be admitted and unfinished in all.
    pub window: Option<u64>,
    /// Bots with jobs admitted or waiting.
    pub bots: BTreeMap<String, BotUsage>,
}

/// The exchange snapshots are published on.
pub fn exchange(topology: &Topology) -> String {
    format!("{}.admission", topology.prefix())
}

/// Declares the snapshot exchange (fanout, not durable: a snapshot is only worth a few seconds).
pub async fn declare_exchange(ch: &Channel, topology: &Topology) -> Result<String, CommonError> {
    let name = exchange(topology);
    ch.exchange_declare(name.as_str().into(), ExchangeKind::Fanout, ExchangeDeclareOptions::default(), FieldTable::default())
        .await
        .map_err(CommonError::amqp(format!("declare exchange {name}")))?;
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
        crate::recorder::run_reconnecting("admission snapshots", &shutdown, None, || self.session(url, topology, &shutdown)).await
    }

    async fn session(&self, url: &str, topology: &Topology, shutdown: &CancellationToken) -> Result<(), CommonError> {
        let conn = connect(url, "trainyard-admission-board").await?;
        let ch = conn.create_channel().await.map_err(CommonError::amqp("open a channel"))?;
        let exchange = declare_exchange(&ch, topology).await?;
        let own = QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() };
        let queue = ch.queue_declare("".into(), own, FieldTable::default()).await.map_err(CommonError::amqp("declare a snapshot queue"))?;
        let name = queue.name().as_str().to_string();
        ch.queue_bind(name.as_str().into(), exchange.as_str().into(), "".into(), QueueBindOptions::default(), FieldTable::default())
            .await
            .map_err(CommonError::amqp(format!("bind {name} to {exchange}")))?;
        let no_ack = BasicConsumeOptions { no_ack: true, ..Default::default() };
        let mut consumer = ch
            .basic_consume(name.as_str().into(), "".into(), no_ack, FieldTable::default())
            .await
            .map_err(CommonError::amqp(format!("consume {name}")))?;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => {
                    let _ = conn.close(200, "shutdown".into()).await;
                    return Ok(());
                }
                next = consumer.next() => {
                    let Some(d) = next else { return Err(CommonError::ConsumerEnded { queue: name }) };
                    let d = d.map_err(CommonError::amqp("receive an admission snapshot"))?;
                    match serde_json::from_slice::<Snapshot>(&d.data) {
                        Ok(snap) => self.record(snap),
                        Err(e) => tracing::warn!(error = %e, "ignored a message on the admission exchange that is not a snapshot"),
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(at: DateTime<Utc>, waiting: u64) -> Snapshot {
        let bots = BTreeMap::from([("a".to_string(), BotUsage { running: 2, waiting, limit: Some(2), weight: 1, share: 1.0 })]);
        Snapshot { job_type: "noop".into(), at, waiting, admitted: 2, window: Some(6), bots }
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
}
