//! Rebuilding the job store from the `<prefix>.events.log` stream.
//!
//! Reads the stream from its first offset into an empty store, or into a restored backup
//! ([`rebuild_since`]: recording is idempotent on `(job_id, run, seq)`, so what the backup
//! already has is recorded once) from the backup's stored stream position, else from a
//! time, and stops when caught up: when no entry arrived for `idle` (the stream's tail).
//! It reads and records as the recorder does ([`crate::recorder::stream`]: batches, each in
//! one transaction with the stream position), so `trainyard serve` afterwards resumes
//! where the rebuild stopped instead of reading the stream again.

use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::StreamExt;
use lapin::options::BasicAckOptions;
use trainyard_common::{amqp::connect, topology::Topology, CommonError};

use crate::recorder::{
    stream::{self, Start},
    BATCH, LINGER, PREFETCH,
};
use crate::store::{Store, StoreError};

/// Errors of a rebuild.
#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    /// The store already has jobs.
    #[error("the job store is not empty; rebuild into an empty store (a new database or file)")]
    NotEmpty,
    /// Broker trouble.
    #[error(transparent)]
    Broker(#[from] CommonError),
    /// Store trouble.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a rebuild did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct RebuildReport {
    /// Stream entries read.
    pub read: u64,
    /// Events recorded (new).
    pub recorded: u64,
    /// Audit records (operator actions) read.
    pub audit: u64,
    /// Entries that could not be recorded (parked, listed by `trainyard events parked`).
    pub skipped: u64,
}

/// Replays the audit stream into `store`, which must be empty.
pub async fn rebuild(store: &Store, topology: &Topology, url: &str, idle: Duration) -> Result<RebuildReport, RebuildError> {
    if !store.is_empty().await? {
        return Err(RebuildError::NotEmpty);
    }
    replay(store, topology, url, idle, Start::First).await
}

/// Replays the audit stream into `store`, which may hold jobs: a backup restored into it,
/// taken after `since`. It reads on from the backup's stream position when the backup has
/// one (everything before it is in the backup), else from `since`. Events the backup
/// already has are duplicates (no-ops); the ones recorded after it was taken are recorded now.
pub async fn rebuild_since(
    store: &Store,
    topology: &Topology,
    url: &str,
    idle: Duration,
    since: DateTime<Utc>,
) -> Result<RebuildReport, RebuildError> {
    let position = store.stream_position(&topology.events_log()).await?;
    let start = position.map_or(Start::Since(since), |p| Start::After(p.last_offset));
    replay(store, topology, url, idle, start).await
}

async fn replay(store: &Store, topology: &Topology, url: &str, idle: Duration, start: Start) -> Result<RebuildReport, RebuildError> {
    let conn = connect(url, "trainyard-rebuild").await?;
    let ch = conn.create_channel().await.map_err(CommonError::amqp("open a channel"))?;
    topology.declare_shared(&ch).await?;
    let consumer = stream::subscribe(&ch, topology, start, PREFETCH, "trainyard-rebuild").await?;
    let batches = tokio_stream::StreamExt::chunks_timeout(consumer, BATCH, LINGER);
    tokio::pin!(batches);
    let stream = topology.events_log();
    let mut report = RebuildReport::default();
    while let Ok(Some(batch)) = tokio::time::timeout(idle, batches.next()).await {
        let deliveries = batch.into_iter().collect::<Result<Vec<_>, _>>().map_err(CommonError::amqp("read the events stream"))?;
        let Some(last) = deliveries.iter().max_by_key(|d| d.delivery_tag) else { continue };
        let batch = stream::sort(&deliveries);
        let recorded = store.record_stream_batch(Some(&stream), &batch).await?;
        report.read += batch.entries;
        report.recorded += recorded.iter().filter(|r| r.new).count() as u64;
        report.audit += batch.audit.len() as u64;
        report.skipped += batch.parked.len() as u64;
        // A stream's acks give credit only; the position is in the store.
        last.acker.ack(BasicAckOptions { multiple: true }).await.map_err(CommonError::amqp("ack stream entries"))?;
    }
    let _ = conn.close(200, "caught up".into()).await;
    Ok(report)
}
