//! Rebuilding the job store from the `<prefix>.events.log` stream.
//!
//! Reads the stream from its first offset into an empty store, or from a time into
//! a restored backup ([`rebuild_since`]: recording is idempotent on
//! `(job_id, run, seq)`, so what the backup already has is recorded once), and
//! stops when caught up: when no event arrived for `idle` (the stream's tail).

use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::StreamExt;
use lapin::{
    options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions},
    types::{AMQPValue, FieldTable},
};
use trainyard_common::{amqp::connect, codec, topology::Topology, CommonError, JobEvent};

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
    /// Entries that were not events.
    pub skipped: u64,
}

/// Replays the audit stream into `store`, which must be empty.
pub async fn rebuild(store: &Store, topology: &Topology, url: &str, idle: Duration) -> Result<RebuildReport, RebuildError> {
    if !store.is_empty().await? {
        return Err(RebuildError::NotEmpty);
    }
    replay(store, topology, url, idle, AMQPValue::LongString("first".into())).await
}

/// Replays the audit stream from `since` into `store`, which may hold jobs: a backup restored
/// into it, taken after `since`. Events the backup already has are duplicates (no-ops); the
/// ones recorded after the backup was taken are recorded now.
pub async fn rebuild_since(
    store: &Store,
    topology: &Topology,
    url: &str,
    idle: Duration,
    since: DateTime<Utc>,
) -> Result<RebuildReport, RebuildError> {
    // A stream offset by time: seconds since the epoch; the broker starts at the chunk holding it.
    replay(store, topology, url, idle, AMQPValue::Timestamp(since.timestamp().max(0) as u64)).await
}

async fn replay(store: &Store, topology: &Topology, url: &str, idle: Duration, offset: AMQPValue) -> Result<RebuildReport, RebuildError> {
    let conn = connect(url, "trainyard-rebuild").await?;
    let ch = conn.create_channel().await.map_err(CommonError::amqp("open a channel"))?;
    topology.declare_shared(&ch).await?;
    ch.basic_qos(500, BasicQosOptions::default()).await.map_err(CommonError::amqp("set prefetch"))?;
    let mut args = FieldTable::default();
    args.insert("x-stream-offset".into(), offset);
    let mut consumer = ch
        .basic_consume(topology.events_log().into(), "trainyard-rebuild".into(), BasicConsumeOptions::default(), args)
        .await
        .map_err(CommonError::amqp(format!("consume {}", topology.events_log())))?;
    let mut report = RebuildReport::default();
    while let Ok(Some(d)) = tokio::time::timeout(idle, consumer.next()).await {
        let d = d.map_err(CommonError::amqp("read the events stream"))?;
        report.read += 1;
        let ct = d.properties.content_type().as_ref().map(|s| s.as_str());
        if crate::audit::is_audit(&d.properties) {
            match crate::audit::decode(ct, &d.data) {
                Ok(record) => {
                    store.record_audit(std::slice::from_ref(&record)).await?;
                    report.audit += 1;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "skipping an audit record that cannot be read");
                    report.skipped += 1;
                }
            }
            d.acker.ack(BasicAckOptions::default()).await.map_err(CommonError::amqp("ack a stream entry"))?;
            continue;
        }
        match codec::decode::<JobEvent>(ct, &d.data) {
            Ok(ev) => {
                if store.record_event(&ev).await? {
                    report.recorded += 1;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "skipping a stream entry that is not an event");
                report.skipped += 1;
            }
        }
        // Streams need acks for credit; the offset is not tracked.
        d.acker.ack(BasicAckOptions::default()).await.map_err(CommonError::amqp("ack a stream entry"))?;
    }
    let _ = conn.close(200, "caught up".into()).await;
    Ok(report)
}
