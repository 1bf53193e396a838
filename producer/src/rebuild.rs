//! Rebuilding the job store from the `<prefix>.events.log` stream.
//!
//! Reads the stream from its first offset into an empty store, or into a restored backup
//! ([`rebuild_since`]: recording is idempotent on `(job_id, run, seq)`, so what the backup
//! already has is recorded once) from the backup's stored stream position, else from a
//! time, and stops when caught up: when no entry arrived for `idle` (the stream's tail).
//! A stream deleted and declared again since the backup restarted its offsets at 0: reading
//! on after the backup's position would skip the new stream up to it, so that case (the
//! stream ends before the position, as the recorder checks) reads it from its first entry.
//! It reads and records as the recorder does ([`crate::recorder::stream`]: batches, each in
//! one transaction with the stream position; an entry the store refuses parked), so `trainyard serve` afterwards resumes
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
    /// The restored backup's stream position was past the end of the stream (deleted and
    /// declared again since): the position was forgotten and the stream read from its first entry.
    pub stream_restarted: bool,
}

/// Replays the audit stream into `store`, which must be empty.
pub async fn rebuild(store: &Store, topology: &Topology, url: &str, idle: Duration) -> Result<RebuildReport, RebuildError> {
    if !store.is_empty().await? {
        return Err(RebuildError::NotEmpty);
    }
    let (conn, ch) = open(url, topology).await?;
    replay(&conn, ch, store, topology, idle, Start::First, RebuildReport::default()).await
}

/// Replays the audit stream into `store`, which may hold jobs: a backup restored into it,
/// taken after `since`. It reads on from the backup's stream position when the backup has
/// one (everything before it is in the backup), else from `since`. Events the backup
/// already has are duplicates (no-ops); the ones recorded after it was taken are recorded now.
/// When the stream ends before the backup's position (deleted and declared again since), the
/// position is forgotten and the stream read from its first entry (`stream_restarted`).
pub async fn rebuild_since(
    store: &Store,
    topology: &Topology,
    url: &str,
    idle: Duration,
    since: DateTime<Utc>,
) -> Result<RebuildReport, RebuildError> {
    let (conn, ch) = open(url, topology).await?;
    let mut report = RebuildReport::default();
    let start = match store.stream_position(&topology.events_log()).await? {
        None => Start::Since(since),
        Some(p) => {
            let after = stream::read_on_from::<RebuildError>(&conn, topology, store, p.last_offset).await?;
            report.stream_restarted = after.is_none();
            Start::after(after)
        }
    };
    replay(&conn, ch, store, topology, idle, start, report).await
}

/// A connection to the broker and a channel on it with the shared topology (the events
/// stream among it) declared.
async fn open(url: &str, topology: &Topology) -> Result<(lapin::Connection, lapin::Channel), RebuildError> {
    let conn = connect(url, "trainyard-rebuild").await?;
    let ch = conn.create_channel().await.map_err(CommonError::amqp("open a channel"))?;
    topology.declare_shared(&ch).await?;
    Ok((conn, ch))
}

async fn replay(
    conn: &lapin::Connection,
    ch: lapin::Channel,
    store: &Store,
    topology: &Topology,
    idle: Duration,
    start: Start,
    mut report: RebuildReport,
) -> Result<RebuildReport, RebuildError> {
    let consumer = stream::subscribe(&ch, topology, start, PREFETCH, "trainyard-rebuild").await?;
    let batches = tokio_stream::StreamExt::chunks_timeout(consumer, BATCH, LINGER);
    tokio::pin!(batches);
    let stream = topology.events_log();
    let after = match start {
        Start::After(offset) => Some(offset),
        _ => None,
    };
    while let Ok(Some(batch)) = tokio::time::timeout(idle, batches.next()).await {
        let deliveries = batch.into_iter().collect::<Result<Vec<_>, _>>().map_err(CommonError::amqp("read the events stream"))?;
        let Some(last) = deliveries.iter().max_by_key(|d| d.delivery_tag) else { continue };
        // Entries before the start offset (the broker starts at its chunk) are the backup's.
        let fresh = stream::past(&deliveries, after).unwrap_or_else(|| deliveries.iter().collect());
        if !fresh.is_empty() {
            let filed = stream::record_or_park(store, Some(&stream), &fresh).await?;
            report.read += filed.entries;
            report.recorded += filed.recorded.iter().filter(|r| r.new).count() as u64;
            report.audit += filed.audit;
            report.skipped += filed.parked;
        }
        // A stream's acks give credit only; the position is in the store.
        last.acker.ack(BasicAckOptions { multiple: true }).await.map_err(CommonError::amqp("ack stream entries"))?;
    }
    let _ = conn.close(200, "caught up".into()).await;
    Ok(report)
}
