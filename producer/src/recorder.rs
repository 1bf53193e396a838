//! The recorder: feeds the job store from `<prefix>.recorder` (every event)
//! and `<prefix>.dead.recorder` (a copy of every dead letter).
//!
//! Events are recorded in batches (up to [`BATCH`], or what arrived within
//! [`LINGER`] of the first, in one store transaction), acked together only after the store has them; a
//! store failure nacks the whole batch back to the queue. Duplicates are harmless (the store is idempotent) and
//! order does not matter (the projection is order-free), so several replicas
//! may consume the same queues. An event that cannot be recorded (undecodable, a
//! major version this build does not read, ids that are not ids) is parked in the
//! store with the reason, in the batch's transaction, and counted
//! (`trainyard_events_parked_total`); `trainyard events reprocess` records it later.

use std::time::Duration;

use futures::StreamExt;
use lapin::{
    message::Delivery,
    options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable},
};
use tokio_util::sync::CancellationToken;
use trainyard_common::reconnect::{self, ReconnectPolicy, SessionEnd};
use trainyard_common::{
    amqp::connect, codec, event::DEAD_LETTER_SEQ, headers, metrics::ControlMetrics, topology::Topology, CommonError, ErrorInfo, ErrorKind,
    JobEvent, JobSpec, JobStatus, WorkerInfo,
};

use base64::Engine;
use trainyard_common::job::{valid_bot_name, valid_job_type};

use crate::store::{DeadLetter, ParkedEvent, Store, StoreError};

/// Most event deliveries recorded in one store transaction.
pub const BATCH: usize = 256;

/// How long a batch waits for more events after its first: a few milliseconds of
/// delay in the job store buy several times fewer transactions under load.
pub const LINGER: Duration = Duration::from_millis(20);

/// Event deliveries the broker may have in flight to the recorder (two batches: one
/// being recorded while the next arrives).
pub const PREFETCH: u16 = 512;

/// Reconnect backoff of the control plane's broker sessions (recorder, trigger listener).
pub const CONTROL_PLANE_RECONNECT: ReconnectPolicy =
    ReconnectPolicy { base: Duration::from_millis(200), max: Duration::from_secs(10), healthy_after: Duration::from_secs(30) };

/// Reason recorded for a letter the broker dead-lettered by itself.
pub const DELIVERY_LIMIT_REASON: &str = "delivery limit reached (crash loop?)";

/// Errors of the recorder.
#[derive(Debug, thiserror::Error)]
pub enum RecorderError {
    /// Broker trouble.
    #[error(transparent)]
    Broker(#[from] CommonError),
    /// Store trouble.
    #[error(transparent)]
    Store(#[from] StoreError),
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

/// Consumes the recorder queues into the store.
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
        let publish = trainyard_common::amqp::confirm_channel(&conn).await?;
        // Events and dead letters on channels of their own: events are acked in
        // batches (`multiple`), which must never cover an unrecorded dead letter.
        ch.basic_qos(PREFETCH, BasicQosOptions::default()).await.map_err(CommonError::amqp("set prefetch"))?;
        let events = ch
            .basic_consume(self.topology.recorder_queue().into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
            .await
            .map_err(CommonError::amqp(format!("consume {}", self.topology.recorder_queue())))?;
        let dead_ch = conn.create_channel().await.map_err(CommonError::amqp("open a channel"))?;
        dead_ch.basic_qos(16, BasicQosOptions::default()).await.map_err(CommonError::amqp("set prefetch"))?;
        let dead = dead_ch
            .basic_consume(self.topology.dead_recorder_queue().into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
            .await
            .map_err(CommonError::amqp(format!("consume {}", self.topology.dead_recorder_queue())))?;
        tracing::info!("recorder consuming {} and {}", self.topology.recorder_queue(), self.topology.dead_recorder_queue());
        // Up to BATCH deliveries, or what arrived within LINGER of the first, go into one store transaction.
        let batches = tokio_stream::StreamExt::chunks_timeout(events, BATCH, LINGER);
        let publish = &publish;
        let dead_work = dead
            .map(|delivery| async move {
                let delivery = delivery.map_err(CommonError::amqp("receive a dead letter"))?;
                self.settle_dead_letter(&delivery, publish).await
            })
            .buffer_unordered(16);
        tokio::pin!(batches, dead_work);
        let events_ended = || CommonError::ConsumerEnded { queue: self.topology.recorder_queue() };
        let dead_ended = || CommonError::ConsumerEnded { queue: self.topology.dead_recorder_queue() };
        // Two loops polled side by side, never one inside the other's arm: a dead letter's
        // future suspended mid-transaction (holding SQLite's write lock or a pooled connection)
        // while an event batch waits for that lock would stall both until the store timed out.
        let events_loop = async {
            while let Some(batch) = batches.next().await {
                self.settle_events(batch).await?;
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

    /// Records a batch of event deliveries in one transaction, then acks them
    /// all at once; when the store fails, returns them all to the queue.
    async fn settle_events(&self, batch: Vec<lapin::Result<Delivery>>) -> Result<(), RecorderError> {
        let deliveries = batch.into_iter().collect::<Result<Vec<_>, _>>().map_err(CommonError::amqp("receive a delivery"))?;
        let Some(last) = deliveries.iter().max_by_key(|d| d.delivery_tag) else { return Ok(()) };
        let mut events = Vec::with_capacity(deliveries.len());
        let (mut parked, mut audit) = (Vec::new(), Vec::new());
        for d in &deliveries {
            let ct = d.properties.content_type().as_ref().map(|s| s.as_str());
            if crate::audit::is_audit(&d.properties) {
                match crate::audit::decode(ct, &d.data) {
                    Ok(record) => audit.push(record),
                    Err(reason) => parked.push(ParkedEvent::new(d.routing_key.as_str(), ct, &d.data, &reason)),
                }
                continue;
            }
            match decode_event(ct, &d.data) {
                Ok(event) => events.push(event),
                Err(reason) => {
                    // Never dropped: parked with the reason, in the same transaction as the batch.
                    tracing::warn!(reason = %reason, routing_key = %d.routing_key, "parking an event that cannot be recorded");
                    parked.push(ParkedEvent::new(d.routing_key.as_str(), ct, &d.data, &reason));
                }
            }
        }
        tracing::debug!(deliveries = deliveries.len(), "recording a batch");
        // Audit records first (idempotent on their id): a failure after them returns the whole batch.
        let recorded = match self.store.record_audit(&audit).await {
            Ok(()) => self.record_batch(&events, &parked).await,
            Err(e) => Err(e),
        };
        match recorded {
            Ok(()) => {
                last.acker.ack(BasicAckOptions { multiple: true }).await.map_err(CommonError::amqp("ack deliveries"))?;
            }
            Err(e) => {
                tracing::error!(error = %e, events = events.len(), "failed to record events; returning them to the queue");
                tokio::time::sleep(Duration::from_millis(500)).await;
                last.acker.nack(BasicNackOptions { requeue: true, multiple: true }).await.map_err(CommonError::amqp("nack deliveries"))?;
            }
        }
        Ok(())
    }

    /// Records one dead letter and acks it, or nacks it back to the queue when the store
    /// failed for a reason a retry can fix. A letter the store refuses for what it
    /// contains is recorded in a plain form (every text value ASCII-escaped) instead:
    /// requeueing it would block every letter behind it for ever.
    async fn settle_dead_letter(&self, delivery: &Delivery, publish: &lapin::Channel) -> Result<(), RecorderError> {
        let mut outcome = self.handle_dead_letter(delivery, publish).await;
        if let Err(RecorderError::Store(e)) = &outcome {
            if !e.retryable() {
                tracing::error!(error = %e, "the store refuses a dead letter as received; recording it ASCII-escaped");
                let (letter, _) = self.read_dead_letter(delivery);
                outcome = self.store.record_dead_letter(&letter.ascii_escaped(&e.to_string())).await.map_err(RecorderError::from);
            }
        }
        match outcome {
            Ok(()) => {
                delivery.acker.ack(BasicAckOptions::default()).await.map_err(CommonError::amqp("ack a delivery"))?;
            }
            Err(RecorderError::Store(e)) if !e.retryable() => {
                // Not even the plain form: nothing a retry can change. Say so loudly, keep the queue moving.
                tracing::error!(error = %e, routing_key = %delivery.routing_key, "cannot record a dead letter; it stays in its dead-letter queue");
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
            }
        }
        Ok(())
    }

    /// Records one event, updating the metrics.
    pub async fn record(&self, event: &JobEvent) -> Result<(), StoreError> {
        self.record_all(std::slice::from_ref(event)).await
    }

    /// Records events in one transaction, updating the metrics.
    pub async fn record_all(&self, events: &[JobEvent]) -> Result<(), StoreError> {
        self.record_batch(events, &[]).await
    }

    /// Records events and parks `parked` in one transaction, updating the metrics.
    async fn record_batch(&self, events: &[JobEvent], parked: &[ParkedEvent]) -> Result<(), StoreError> {
        if events.is_empty() && parked.is_empty() {
            return Ok(());
        }
        let recorded = self.store.record_batch(events, parked).await?;
        let Some(m) = &self.metrics else { return Ok(()) };
        m.events_parked.inc_by(parked.len() as u64);
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
        Ok(())
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
        self.store.record_dead_letter(&letter).await?;
        if let Some(m) = &self.metrics {
            m.dead_letters.with_label_values(&[letter.job_type.as_str(), letter.kind.as_str()]).inc();
        }
        if let Some(event) = event {
            self.record(&event).await?;
            // In the audit stream too, so that a rebuild records what the store has (a worker's
            // own `dead` event sorts before it; one the broker dead-lettered has no other).
            trainyard_common::amqp::publish_event(publish, &self.topology, &event).await?;
        }
        Ok(())
    }
}

/// Decodes an event delivery and checks that it can be recorded; the reason when not.
pub fn decode_event(content_type: Option<&str>, body: &[u8]) -> Result<JobEvent, String> {
    let event: JobEvent = codec::decode(content_type, body).map_err(|e| format!("undecodable event: {e}"))?;
    event.check()?;
    Ok(event)
}

/// Reads a dead letter: what to list, and the final event of its job (when the job is known).
///
/// A worker's dead letter carries `x-trainyard-dead-reason`/`-kind`; one the
/// broker dead-lettered by itself at the delivery limit has only `x-death`.
/// Kinds `transient` and `timeout` mean the attempts were used up: status
/// `failed`; anything else is `dead`.
///
/// Hostile letters are listed as received: a job id that is not a UUID is kept (the
/// store escapes what it cannot hold) but the letter's id is then a hash of the body
/// and no job is recorded for it, since no worker ever ran such a job; the whole body
/// is kept as base64.
pub fn dead_letter(
    content_type: Option<&str>,
    hdrs: Option<&FieldTable>,
    routing_key: &str,
    body: &[u8],
) -> (DeadLetter, Option<JobEvent>) {
    let spec: Option<JobSpec> = codec::decode(content_type, body).ok().or_else(|| {
        // Content type lost or wrong: try the other encoding.
        codec::decode(Some(codec::JSON), body).ok()
    });
    let by_broker = hdrs.is_some_and(|h| h.inner().contains_key(headers::X_DEATH));
    let worker_reason = headers::string(hdrs, headers::DEAD_REASON);
    let reason = match (&worker_reason, by_broker) {
        (Some(r), _) => r.clone(),
        (None, true) => DELIVERY_LIMIT_REASON.to_string(),
        (None, false) => "dead-lettered without a reason".to_string(),
    };
    let kind =
        headers::string(hdrs, headers::DEAD_KIND).unwrap_or_else(|| if by_broker { "delivery-limit".into() } else { "unknown".into() });
    let attempt = headers::attempt(hdrs);
    let job_id = spec.as_ref().map(|s| s.job_id.clone()).or_else(|| headers::string(hdrs, headers::JOB_ID));
    // A real job's id: one a worker could have run (it refuses any other).
    let real_id = job_id.clone().filter(|id| uuid::Uuid::parse_str(id).is_ok());
    let job_type = spec
        .as_ref()
        .map(|s| s.job_type.clone())
        .filter(|t| valid_job_type(t))
        .or_else(|| valid_job_type(routing_key).then(|| routing_key.to_string()))
        .unwrap_or_else(|| "unknown".into());
    let bot = spec.as_ref().map(|s| s.bot.clone());
    let id = real_id.clone().unwrap_or_else(|| format!("poison-{}", uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, body)));
    let preview: String =
        String::from_utf8_lossy(&body[..body.len().min(256)]).chars().map(|c| if c.is_control() { '.' } else { c }).collect();
    let letter = DeadLetter {
        id,
        job_id: job_id.clone(),
        job_type: job_type.clone(),
        bot: bot.clone(),
        reason: reason.clone(),
        kind: kind.clone(),
        attempt,
        broker_dead_lettered: by_broker && worker_reason.is_none(),
        body_preview: preview,
        body: Some(base64::engine::general_purpose::STANDARD.encode(body)),
        at: chrono::Utc::now(),
        replayed_at: None,
    };
    let event = real_id.map(|job_id| {
        let (status, error_kind) = match kind.as_str() {
            "transient" => (JobStatus::Failed, ErrorKind::Transient),
            "timeout" => (JobStatus::Failed, ErrorKind::Timeout),
            _ => (JobStatus::Dead, ErrorKind::Permanent),
        };
        JobEvent {
            version: Default::default(),
            job_id,
            seq: DEAD_LETTER_SEQ,
            job_type,
            bot: bot.filter(|b| valid_bot_name(b)).unwrap_or_default(),
            status,
            attempt,
            run: Some(headers::run(hdrs)),
            worker: headers::string(hdrs, headers::DEAD_WORKER).map(|id| WorkerInfo { id, attributes: Default::default() }),
            at: chrono::Utc::now(),
            progress: None,
            result: None,
            error: Some(ErrorInfo { kind: error_kind, message: reason }),
            spec: None,
        }
    });
    (letter, event)
}
