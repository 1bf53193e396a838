//! Reading the events stream `<prefix>.events.log` from an offset: the recorder and
//! `store rebuild` both consume it this way (a RabbitMQ stream over AMQP 0.9.1: prefetch,
//! manual acks for credit, `x-stream-offset` to start) and sort what they read into a
//! [`StreamBatch`] recorded in one transaction with the position it reached.

use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::StreamExt;
use lapin::{
    message::Delivery,
    options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions},
    types::{AMQPValue, FieldTable},
    Channel, Connection, Consumer,
};
use trainyard_common::{headers, topology::Topology, CommonError, JobEvent};

use crate::store::{BatchRecorded, ParkedEvent, Recorded, Store, StoreError, StreamBatch};

/// The argument that says where a stream consumer starts, and the header that gives
/// each delivery's offset.
pub const STREAM_OFFSET: &str = "x-stream-offset";

/// Where to start reading the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// At its first entry still kept.
    First,
    /// At its last chunk: the entries written last, a few or many.
    Last,
    /// At the entry after this offset.
    After(i64),
    /// At the chunk holding this time (entries a little before it may come too).
    Since(DateTime<Utc>),
}

impl Start {
    /// From a stored position: after it, or from the first entry when there is none.
    pub fn after(position: Option<i64>) -> Self {
        position.map_or(Start::First, Start::After)
    }

    fn argument(self) -> AMQPValue {
        match self {
            Start::First => AMQPValue::LongString("first".into()),
            Start::Last => AMQPValue::LongString("last".into()),
            Start::After(offset) => AMQPValue::LongLongInt(offset.saturating_add(1)),
            // Seconds since the epoch: the broker starts at the chunk holding it.
            Start::Since(t) => AMQPValue::Timestamp(t.timestamp().max(0) as u64),
        }
    }
}

/// Consumes the events stream from `start` on `ch` with `prefetch` unacked entries at most.
pub async fn subscribe(ch: &Channel, topology: &Topology, start: Start, prefetch: u16, tag: &str) -> Result<Consumer, CommonError> {
    ch.basic_qos(prefetch, BasicQosOptions::default()).await.map_err(CommonError::amqp("set prefetch"))?;
    let mut args = FieldTable::default();
    args.insert(STREAM_OFFSET.into(), start.argument());
    let stream = topology.events_log();
    ch.basic_consume(stream.as_str().into(), tag.into(), BasicConsumeOptions::default(), args)
        .await
        .map_err(CommonError::amqp(format!("consume {stream} from {start:?}")))
}

/// How long [`last_offset_until`] waits for another entry before it takes the stream as
/// ending at the last one it read (or as empty when none came).
pub const PROBE_IDLE: Duration = Duration::from_millis(1000);

/// The events stream's last offset, or the first one at or past `until` it reads, whichever
/// comes first; `None` when the stream is empty. Reads the stream's last chunk (`last`) on a
/// channel of its own, closed after: when the stream reaches `until` that chunk holds an
/// offset at or past it and the answer comes at once; otherwise it comes after
/// [`PROBE_IDLE`] without another entry, or after twice that in all, so that a new stream
/// that keeps growing is not followed up to `until` (which would skip all it holds).
pub async fn last_offset_until(conn: &Connection, topology: &Topology, until: i64) -> Result<Option<i64>, CommonError> {
    let ch = conn.create_channel().await.map_err(CommonError::amqp("open a channel"))?;
    let mut entries = subscribe(&ch, topology, Start::Last, 256, "").await?;
    let stream = topology.events_log();
    let mut last = None;
    let deadline = tokio::time::Instant::now() + 2 * PROBE_IDLE;
    let next_wait = || (tokio::time::Instant::now() + PROBE_IDLE).min(deadline);
    while let Ok(Some(d)) = tokio::time::timeout_at(next_wait(), entries.next()).await {
        let d = d.map_err(CommonError::amqp(format!("read the last chunk of {stream}")))?;
        // Acks give a stream consumer credit for more.
        d.acker.ack(BasicAckOptions::default()).await.map_err(CommonError::amqp("ack a stream entry"))?;
        last = last.max(offset(&d));
        if last.is_some_and(|l| l >= until) {
            break;
        }
    }
    let _ = ch.close(200, "read the last chunk".into()).await;
    Ok(last)
}

/// Where to read the events stream on from, given a `stored` position in it: after it, or
/// from the first entry (`None`) when the stream ends before it. A stream deleted and
/// declared again starts its offsets at 0, and reading after `stored` would skip every entry
/// of the new stream up to it; the position is reset then (logged as an error). Entries read
/// twice are recorded once. A stream that reaches `stored` costs one read of its last chunk;
/// one that does not, [`PROBE_IDLE`]. The recorder and `store rebuild --since` both start so.
pub async fn read_on_from<E: From<CommonError> + From<StoreError>>(
    conn: &Connection,
    topology: &Topology,
    store: &Store,
    stored: i64,
) -> Result<Option<i64>, E> {
    let last = last_offset_until(conn, topology, stored).await?;
    if last.is_some_and(|l| l >= stored) {
        return Ok(Some(stored));
    }
    let stream = topology.events_log();
    let reset = store.reset_stream_position(&stream, stored).await?;
    tracing::error!(
        stream,
        stored_offset = stored,
        stream_last_offset = ?last,
        position_reset = reset,
        "{stream} ends before the stored offset {stored}: it was deleted and declared again \
         (what the old stream held past that offset went with it); recording the new one from its first entry"
    );
    Ok(None)
}

/// The entries of `deliveries` past `after` (all when `None`): a consumer that asked to
/// start after an offset may get a little before it (the broker starts at its chunk).
/// `None` when an entry carries no offset (not a stream's delivery).
pub fn past(deliveries: &[Delivery], after: Option<i64>) -> Option<Vec<&Delivery>> {
    let mut fresh = Vec::with_capacity(deliveries.len());
    for d in deliveries {
        let at = offset(d)?;
        if after.is_none_or(|a| at > a) {
            fresh.push(d);
        }
    }
    Some(fresh)
}

/// What recording a run of stream entries came to.
#[derive(Debug)]
pub struct Filed {
    /// How many entries were read.
    pub entries: u64,
    /// The entries that are job events, and what the store did with each.
    pub events: Vec<JobEvent>,
    /// Beside `events`, one each.
    pub recorded: Vec<Recorded>,
    /// How many entries are audit records.
    pub audit: u64,
    /// How many entries were parked (unreadable, or refused by the store) that were not
    /// parked before.
    pub parked: u64,
    /// The offset of the last entry (-1 when none carries one).
    pub last_offset: i64,
}

impl Filed {
    fn add(&mut self, batch: StreamBatch, recorded: BatchRecorded) {
        self.entries += batch.entries;
        self.audit += batch.audit.len() as u64;
        self.parked += recorded.parked;
        self.last_offset = self.last_offset.max(batch.last_offset);
        self.events.extend(batch.events);
        self.recorded.extend(recorded.events);
    }
}

/// Records `entries` as one batch, with the offset of the last as `stream`'s position when a
/// stream is named (in the same transaction). When the store refuses the batch for what it
/// holds (an error no retry changes), records them again one by one, each with its offset,
/// and parks each entry it refuses with the store's reason, where `trainyard events parked`
/// shows it: read again and again, such an entry would stop its reader for good. The
/// recorder, its upgrade path and `store rebuild` all record so. A failure a retry can fix
/// is returned; what was committed before it stays.
pub async fn record_or_park(store: &Store, stream: Option<&str>, entries: &[&Delivery]) -> Result<Filed, StoreError> {
    let mut filed = Filed { entries: 0, events: Vec::new(), recorded: Vec::new(), audit: 0, parked: 0, last_offset: -1 };
    let batch = sort(entries.iter().copied());
    tracing::debug!(entries = batch.entries, last_offset = batch.last_offset, "recording a batch");
    match store.record_stream_batch(stream, &batch).await {
        Ok(recorded) => {
            filed.add(batch, recorded);
            return Ok(filed);
        }
        Err(e) if e.retryable() => return Err(e),
        Err(e) => {
            tracing::error!(error = %e, entries = batch.entries, "the store refuses a batch of stream entries; recording them one by one")
        }
    }
    for d in entries {
        let one = sort([*d]);
        match store.record_stream_batch(stream, &one).await {
            Ok(recorded) => filed.add(one, recorded),
            Err(e) if e.retryable() => return Err(e),
            Err(e) => {
                tracing::error!(error = %e, routing_key = %d.routing_key, offset = one.last_offset, "the store refuses a stream entry; parking it");
                let refused = parked(d, &format!("the job store refused it: {e}"));
                let recorded = store.record_stream_batch(stream, &refused).await?;
                filed.add(refused, recorded);
            }
        }
    }
    Ok(filed)
}

/// The stream offset of a delivery from a stream.
pub fn offset(d: &Delivery) -> Option<i64> {
    headers::int(d.properties.headers().as_ref(), STREAM_OFFSET)
}

/// Sorts stream deliveries into a batch: job events, audit records, and what cannot be
/// recorded (parked with the reason, never dropped). The batch's last offset is the
/// largest delivery offset (-1 when none carries one: the recorder queue of earlier releases).
pub fn sort<'a>(deliveries: impl IntoIterator<Item = &'a Delivery>) -> StreamBatch {
    let mut batch = StreamBatch { last_offset: -1, ..Default::default() };
    for d in deliveries {
        batch.entries += 1;
        batch.last_offset = batch.last_offset.max(offset(d).unwrap_or(-1));
        let ct = d.properties.content_type().as_ref().map(|s| s.as_str());
        let read = if crate::audit::is_audit(&d.properties) {
            crate::audit::decode(ct, &d.data).map(|r| batch.audit.push(r))
        } else {
            super::decode_event(ct, &d.data).map(|e| batch.events.push(e))
        };
        if let Err(reason) = read {
            tracing::warn!(reason = %reason, routing_key = %d.routing_key, "parking an event that cannot be recorded");
            batch.parked.push(park(d, &reason));
        }
    }
    batch
}

/// A stream entry parked for `reason`, with its offset as the batch's: what is stored
/// instead of an entry the store refuses.
pub fn parked(d: &Delivery, reason: &str) -> StreamBatch {
    StreamBatch { parked: vec![park(d, reason)], last_offset: offset(d).unwrap_or(-1), entries: 1, ..Default::default() }
}

fn park(d: &Delivery, reason: &str) -> ParkedEvent {
    ParkedEvent::new(d.routing_key.as_str(), d.properties.content_type().as_ref().map(|s| s.as_str()), &d.data, reason)
}
