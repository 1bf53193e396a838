//! The recorder: feeds the job store from the events stream `<prefix>.events.log` (every
//! event and audit record) and `<prefix>.dead.recorder` (a copy of every dead letter).
//!
//! Stream entries are recorded in batches (up to [`BATCH`], or what arrived within
//! [`LINGER`] of the first) in one store transaction each, **together with the offset of
//! the batch's last entry** ([`crate::store::StreamPosition`]); a session starts reading at
//! the stored offset + 1, so a crash can neither skip an entry nor record one twice. A
//! store failure ends the session: the next one reads again from the stored offset.
//! Duplicates are harmless anyway (the store is idempotent on `(job_id, run, seq)`) and
//! order does not matter (the projection is order-free), so several replicas may read the
//! stream at once; the stored offset only moves forward, except when the stream no longer
//! reaches it: deleted and declared again, its offsets start at 0, and a session that finds
//! its last offset short of the stored one resets the position and reads the stream from
//! its first entry ([`Recorder::check_position`]). An entry that cannot be recorded
//! (undecodable, a major version this build does not read, ids that are not ids) is parked
//! in the store with the reason, in the batch's transaction, and counted; so is one the
//! store itself refuses for what it holds (a batch refused that way is recorded again entry
//! by entry, to find it), and counted
//! (`trainyard_events_parked_total`); `trainyard events reprocess` records it later.
//!
//! Releases before this one fed the recorder through a quorum queue `<prefix>.recorder`
//! bound to the events exchange; [`legacy`] drains what such a release left there, once.

mod legacy;
mod letters;
pub mod stream;

pub use letters::{dead_letter, DELIVERY_LIMIT_REASON};

use std::time::Duration;

use futures::StreamExt;
use lapin::{
    message::Delivery,
    options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable},
};
use tokio_util::sync::CancellationToken;
use trainyard_common::reconnect::{self, ReconnectPolicy, SessionEnd};
use trainyard_common::{amqp::connect, codec, metrics::ControlMetrics, topology::Topology, CommonError, JobEvent};

use crate::store::{DeadLetter, ParkedEvent, Recorded, Store, StoreError};

/// Most event deliveries recorded in one store transaction.
pub const BATCH: usize = 1024;

/// How long a batch waits for more events after its first: a tenth of a second of
/// delay in the job store buys several times fewer transactions under load.
pub const LINGER: Duration = Duration::from_millis(100);

/// Stream entries the broker may have in flight to the recorder (two batches: one
/// being recorded while the next arrives).
pub const PREFETCH: u16 = 2 * BATCH as u16;

/// Reconnect backoff of the control plane's broker sessions (recorder, trigger listener).
pub const CONTROL_PLANE_RECONNECT: ReconnectPolicy =
    ReconnectPolicy { base: Duration::from_millis(200), max: Duration::from_secs(10), healthy_after: Duration::from_secs(30) };

/// Errors of the recorder.
#[derive(Debug, thiserror::Error)]
pub enum RecorderError {
    /// Broker trouble.
    #[error(transparent)]
    Broker(#[from] CommonError),
    /// Store trouble.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A delivery from the events stream without its offset.
    #[error("an entry of {stream} came without its offset (header x-stream-offset)")]
    NoOffset {
        /// The stream.
        stream: String,
    },
}

/// Runs a control-plane `session` until `shutdown` (or until it returns `Ok`), again after
/// each loss with [`CONTROL_PLANE_RECONNECT`]'s backoff; each loss is logged as `what`'s and
/// counted in `metrics`' `trainyard_amqp_reconnects_total`.
pub(crate) async fn run_reconnecting<E, F, Fut>(what: &str, shutdown: &CancellationToken, metrics: Option<&ControlMetrics>, mut session: F)
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), E>>,
{
    let session = || {
        let fut = session();
        async move {
            match fut.await {
                Ok(()) => SessionEnd::Shutdown,
                Err(e) => SessionEnd::Lost(e),
            }
        }
    };
    reconnect::run(CONTROL_PLANE_RECONNECT, shutdown, session, |e, delay| {
        tracing::warn!(error = %e, "{what} session ended; reconnecting in {delay:?}");
        if let Some(m) = metrics {
            m.reconnects_total.inc();
        }
    })
    .await
}

/// Declares a durable quorum queue with one active consumer at a time across the control
/// plane's replicas (the others wait as standbys).
pub(crate) async fn declare_single_consumer_queue(ch: &lapin::Channel, queue: &str) -> Result<(), CommonError> {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
    args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
    ch.queue_declare(queue.into(), QueueDeclareOptions { durable: true, ..Default::default() }, args)
        .await
        .map_err(CommonError::amqp(format!("declare {queue}")))?;
    Ok(())
}

/// Consumes the events stream and the dead-letter recorder queue into the store.
#[derive(Debug, Clone)]
pub struct Recorder {
    store: Store,
    topology: Topology,
    url: String,
    metrics: Option<ControlMetrics>,
}

impl Recorder {
    /// A recorder writing to `store`, consuming from the broker at `url`.
    pub fn new(store: Store, topology: Topology, url: &str, metrics: Option<ControlMetrics>) -> Self {
        Self { store, topology, url: url.to_string(), metrics }
    }

    /// Runs until `shutdown`, reconnecting with backoff ([`CONTROL_PLANE_RECONNECT`]) when the broker goes away.
    pub async fn run(&self, shutdown: CancellationToken) {
        run_reconnecting("recorder", &shutdown, self.metrics.as_ref(), || self.session(&shutdown)).await
    }

    async fn session(&self, shutdown: &CancellationToken) -> Result<(), RecorderError> {
        let conn = connect(&self.url, "trainyard-recorder").await?;
        let ch = conn.create_channel().await.map_err(CommonError::amqp("open a channel"))?;
        self.topology.declare_shared(&ch).await?;
        self.drain_legacy_queue(&conn).await?;
        let publish = trainyard_common::amqp::confirm_channel(&conn).await?;
        // Where this session starts: after the last entry the store has.
        let stream = self.topology.events_log();
        let mut after = self.store.stream_position(&stream).await?.map(|p| p.last_offset);
        if let Some(stored) = after {
            after = self.check_position(&conn, stored).await?;
        }
        let events = stream::subscribe(&ch, &self.topology, stream::Start::after(after), PREFETCH, "").await?;
        // Events and dead letters on channels of their own: stream entries are acked in
        // batches (`multiple`), which must never cover an unrecorded dead letter.
        let dead_ch = conn.create_channel().await.map_err(CommonError::amqp("open a channel"))?;
        dead_ch.basic_qos(16, BasicQosOptions::default()).await.map_err(CommonError::amqp("set prefetch"))?;
        let dead = dead_ch
            .basic_consume(self.topology.dead_recorder_queue().into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
            .await
            .map_err(CommonError::amqp(format!("consume {}", self.topology.dead_recorder_queue())))?;
        tracing::info!(after = ?after, "recorder reading {stream} and {}", self.topology.dead_recorder_queue());
        // Up to BATCH entries, or what arrived within LINGER of the first, go into one store transaction.
        let batches = tokio_stream::StreamExt::chunks_timeout(events, BATCH, LINGER);
        let publish = &publish;
        let dead_work = dead
            .map(|delivery| async move {
                let delivery = delivery.map_err(CommonError::amqp("receive a dead letter"))?;
                self.settle_dead_letter(&delivery, publish).await
            })
            .buffer_unordered(16);
        tokio::pin!(batches, dead_work);
        let events_ended = || CommonError::ConsumerEnded { queue: self.topology.events_log() };
        let dead_ended = || CommonError::ConsumerEnded { queue: self.topology.dead_recorder_queue() };
        // Two loops polled side by side, never one inside the other's arm: a dead letter's
        // future suspended mid-transaction (holding SQLite's write lock or a pooled connection)
        // while an event batch waits for that lock would stall both until the store timed out.
        let events_loop = async {
            while let Some(batch) = batches.next().await {
                self.settle_entries(batch, &mut after).await?;
            }
            Err::<(), RecorderError>(events_ended().into())
        };
        let dead_loop = async {
            while let Some(r) = dead_work.next().await {
                r?;
            }
            Err::<(), RecorderError>(dead_ended().into())
        };
        tokio::select! {
            _ = shutdown.cancelled() => {
                let _ = conn.close(200, "shutdown".into()).await;
                Ok(())
            }
            r = events_loop => r,
            r = dead_loop => r,
        }
    }

    /// Where to read on from, given the `stored` position ([`stream::read_on_from`]); a stream
    /// found deleted and declared again is counted in `trainyard_stream_restarts_total`.
    async fn check_position(&self, conn: &lapin::Connection, stored: i64) -> Result<Option<i64>, RecorderError> {
        let after = stream::read_on_from::<RecorderError>(conn, &self.topology, &self.store, stored).await?;
        if let (None, Some(m)) = (after, &self.metrics) {
            m.stream_restarts.inc();
        }
        Ok(after)
    }

    /// Records a batch of stream entries (those after `after`) and the offset of its last
    /// entry in one transaction ([`stream::record_or_park`]), then acks them all at once (a
    /// stream's acks only give credit). When the store fails the session ends, and the next
    /// one reads the stream again from the stored offset.
    async fn settle_entries(&self, batch: Vec<lapin::Result<Delivery>>, after: &mut Option<i64>) -> Result<(), RecorderError> {
        let deliveries = batch.into_iter().collect::<Result<Vec<_>, _>>().map_err(CommonError::amqp("read the events stream"))?;
        let Some(last) = deliveries.iter().max_by_key(|d| d.delivery_tag) else { return Ok(()) };
        let stream = self.topology.events_log();
        let fresh = stream::past(&deliveries, *after).ok_or_else(|| RecorderError::NoOffset { stream: stream.clone() })?;
        if !fresh.is_empty() {
            let filed = stream::record_or_park(&self.store, Some(&stream), &fresh).await?;
            self.count(&filed.events, filed.parked as usize, &filed.recorded);
            *after = Some(filed.last_offset);
        }
        last.acker.ack(BasicAckOptions { multiple: true }).await.map_err(CommonError::amqp("ack stream entries"))?;
        Ok(())
    }

    /// Records one dead letter and its job's final event, then acks it, or nacks it back to the
    /// queue when the store failed for a reason a retry can fix.
    async fn settle_dead_letter(&self, delivery: &Delivery, publish: &lapin::Channel) -> Result<(), RecorderError> {
        match self.handle_dead_letter(delivery, publish).await {
            Ok(()) => {
                delivery.acker.ack(BasicAckOptions::default()).await.map_err(CommonError::amqp("ack a delivery"))?;
            }
            Err(RecorderError::Store(e)) if !e.retryable() => {
                // Not even a park: nothing a retry can change. Say so loudly, keep the queue moving.
                tracing::error!(error = %e, routing_key = %delivery.routing_key, "cannot keep a dead letter's final event; the letter stays in its job type's dead-letter queue");
                delivery.acker.ack(BasicAckOptions::default()).await.map_err(CommonError::amqp("ack a delivery"))?;
            }
            Err(e) => {
                tracing::error!(error = %e, "failed to record a dead letter; returning it to the queue");
                tokio::time::sleep(Duration::from_millis(500)).await;
                delivery
                    .acker
                    .nack(BasicNackOptions { requeue: true, multiple: false })
                    .await
                    .map_err(CommonError::amqp("nack a delivery"))?;
                // Broker trouble (the publishing channel closed) ends the session: a new one
                // reconnects, where going on would return every letter for ever.
                if !matches!(e, RecorderError::Store(_)) {
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Lists a dead letter. A letter the store refuses for what it contains is listed in a
    /// plain form (every text value ASCII-escaped) instead: requeueing it would block every
    /// letter behind it for ever. One refused even so stays in its job type's dead-letter
    /// queue (`<prefix>.dead.<type>`), where the broker's tools show it; its job's final event
    /// is kept all the same.
    async fn list_dead_letter(&self, letter: &DeadLetter) -> Result<(), StoreError> {
        let Err(e) = self.store.record_dead_letter(letter).await else { return Ok(()) };
        if e.retryable() {
            return Err(e);
        }
        tracing::error!(error = %e, "the store refuses a dead letter as received; recording it ASCII-escaped");
        match self.store.record_dead_letter(&letter.ascii_escaped(&e.to_string())).await {
            Err(e) if e.retryable() => Err(e),
            Err(e) => {
                tracing::error!(error = %e, job_id = ?letter.job_id, "cannot list a dead letter; it stays in its job type's dead-letter queue");
                Ok(())
            }
            Ok(()) => Ok(()),
        }
    }

    /// Records one event, updating the metrics.
    pub async fn record(&self, event: &JobEvent) -> Result<(), StoreError> {
        self.record_all(std::slice::from_ref(event)).await
    }

    /// Records events in one transaction, updating the metrics.
    pub async fn record_all(&self, events: &[JobEvent]) -> Result<(), StoreError> {
        let recorded = self.store.record_events(events).await?;
        self.count(events, 0, &recorded);
        Ok(())
    }

    /// Updates the metrics for recorded `events` and `parked` parked entries.
    fn count(&self, events: &[JobEvent], parked: usize, recorded: &[Recorded]) {
        let Some(m) = &self.metrics else { return };
        m.events_parked.inc_by(parked as u64);
        for (event, r) in events.iter().zip(recorded).filter(|(_, r)| r.new) {
            m.events_recorded.with_label_values(&[event.status.as_str()]).inc();
            if let Some(status) = event.result.as_ref().and_then(trainyard_common::models::promotion_status) {
                m.promotions.with_label_values(&[status]).inc();
            }
            if event.status.is_terminal() {
                m.jobs_finished.with_label_values(&[event.job_type.as_str(), event.status.as_str()]).inc();
                if let Some(from) = r.since {
                    let secs = (event.at - from).num_milliseconds().max(0) as f64 / 1000.0;
                    m.job_duration.with_label_values(&[event.job_type.as_str(), event.status.as_str()]).observe(secs);
                }
            }
        }
    }

    fn read_dead_letter(&self, d: &Delivery) -> (DeadLetter, Option<JobEvent>) {
        dead_letter(
            d.properties.content_type().as_ref().map(|s| s.as_str()),
            d.properties.headers().as_ref(),
            d.routing_key.as_str(),
            &d.data,
        )
    }

    async fn handle_dead_letter(&self, d: &Delivery, publish: &lapin::Channel) -> Result<(), RecorderError> {
        let (letter, event) = self.read_dead_letter(d);
        tracing::warn!(job_id = ?letter.job_id, job_type = %letter.job_type, reason = %letter.reason, "dead letter recorded");
        self.list_dead_letter(&letter).await?;
        if let Some(m) = &self.metrics {
            m.dead_letters.with_label_values(&[letter.job_type.as_str(), letter.kind.as_str()]).inc();
        }
        if let Some(event) = event {
            match self.record(&event).await {
                Ok(()) => {}
                // Often the job's only final event (a crash loop the broker dead-lettered): parked
                // where `events parked` shows it and `events reprocess` records it, never dropped.
                Err(e) if !e.retryable() => {
                    tracing::error!(error = %e, job_id = %event.job_id, "the store refuses a dead letter's final event; parking it");
                    let reason = format!("the job store refused the final event of a dead letter: {e}");
                    let parked = ParkedEvent::new(
                        &event.routing_key(),
                        Some(codec::JSON),
                        &codec::to_json(&event).map_err(CommonError::from)?,
                        &reason,
                    );
                    // A letter delivered again parks the same entry: it counts once.
                    let new = self.store.park(&[parked]).await?;
                    self.count(&[], new as usize, &[]);
                }
                Err(e) => return Err(e.into()),
            }
            // In the audit stream too, so that a rebuild records what the store has (a worker's
            // own `dead` event sorts before it; one the broker dead-lettered has no other).
            trainyard_common::amqp::publish_event(publish, &self.topology, &event).await?;
        }
        Ok(())
    }
}

/// Decodes an event delivery and checks that it can be recorded; the reason when not.
pub fn decode_event(content_type: Option<&str>, body: &[u8]) -> Result<JobEvent, String> {
    let event: JobEvent = codec::decode(content_type, body).map_err(|e| match codec::unreadable_version(content_type, body) {
        Some(version) => format!("undecodable event: {version}"),
        None => format!("undecodable event: {e}"),
    })?;
    event.check()?;
    Ok(event)
}

#[cfg(test)]
mod tests {
    use super::decode_event;

    /// A newer major version may change any field: its event is parked for its version, so an
    /// operator reads an upgrade skew, not corruption.
    #[test]
    fn an_event_of_a_newer_major_version_is_refused_for_its_version() {
        let v2 = br#"{"version": 2, "job_id": "1b4e28ba-2fa1-11d2-883f-0016d3cca427", "state": "queued"}"#;
        let e = decode_event(Some("application/json"), v2).unwrap_err();
        assert!(e.contains("unsupported schema version 2.0"), "{e}");
        let v1 = br#"{"version": 1, "job_id": "1b4e28ba-2fa1-11d2-883f-0016d3cca427", "state": "queued"}"#;
        let e = decode_event(Some("application/json"), v1).unwrap_err();
        assert!(e.contains("missing field"), "a readable version's missing field is named: {e}");
    }
}
