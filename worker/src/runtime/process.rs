//! Handling one delivery, from bytes to a durable outcome and an ack.
//!
//! Order of operations for every outcome: make it durable first (outcome
//! record, retry copy or dead letter, and the event, each confirmed by the
//! broker), then ack. If a broker operation on that path fails the delivery is
//! not acked; the session ends and the broker redelivers it. An artifact-store
//! failure is retried for that delivery alone ([`super::store_retry`]). A
//! redelivered job whose outcome is already recorded is acked without running again.

use std::{
    sync::{
        atomic::{AtomicU32, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use lapin::{message::Delivery, options::BasicNackOptions};
use serde::{Deserialize, Serialize};
use tracing::Instrument;
use trainyard_common::{
    artifacts::keys,
    codec,
    control::CancelRequest,
    event::event_seq,
    headers,
    topology::{DELIVERY_LIMIT, DELIVERY_LIMIT_REASON},
    CodecError, CommonError, ErrorInfo, ErrorKind, JobEvent, JobSpec, JobStatus,
};

use super::{
    disposition::Disposition, joblog::JobLogs, running, session::SessionCtx, store_retry::StoreRetry, tiers::Waiting, Registration, Shared,
};
use crate::handler::{JobContext, JobError, JobHandler, Progress, SlotHold};

mod finish;
use finish::{ack, dead_unreadable, finish_as, finish_failed, finish_succeeded, hand_back, poison, read_outcome, requeue, Recorded};

/// What a job's outcome record ([`keys::outcome`]) holds: the `succeeded` event, republished
/// as is when a finished job is delivered again.
#[derive(Debug, Serialize, Deserialize)]
pub struct Outcome {
    /// The `succeeded` event (with the result).
    pub event: JobEvent,
}

/// One attempt of a job, and the sequence of its events.
struct Attempt {
    spec: JobSpec,
    attempt: u32,
    /// The job's run (dead-letter replays), from the message; every event carries it.
    run: u32,
    redelivery: u32,
    n: AtomicU32,
    /// When the delivery arrived (the broker's consumer timeout runs from then).
    received: tokio::time::Instant,
}

impl Attempt {
    /// Store operations of this delivery, retried while the store fails.
    fn store_retry<'a>(&'a self, shared: &Shared, sctx: &'a SessionCtx) -> StoreRetry<'a> {
        StoreRetry::new(&self.spec.job_id, self.received, shared.config.consumer_timeout, &sctx.stop_jobs)
    }

    fn event(&self, shared: &Shared, status: JobStatus) -> JobEvent {
        let n = self.n.fetch_add(1, Ordering::SeqCst);
        let mut ev = JobEvent::new(&self.spec, status, self.attempt, event_seq(self.attempt, self.redelivery, n));
        ev.worker = Some(shared.config.worker.clone());
        ev.run = Some(self.run);
        ev
    }

    /// The recorded outcome's event, filed under this delivery's run: a job replayed after it
    /// succeeded (a crash loop between the outcome record and the ack) ends that run succeeded too.
    fn recorded(&self, event: JobEvent) -> JobEvent {
        JobEvent { run: Some(self.run), ..event }
    }
}

/// Handles one delivery from the queue of `job_type`. Never panics the worker:
/// whatever the bytes, the delivery ends acked with a durable outcome, or
/// unacked for the broker to redeliver when the session is lost.
pub(crate) async fn handle(waiting: Waiting, job_type: String, shared: Arc<Shared>, sctx: SessionCtx) {
    let Waiting { delivery, arrived, .. } = waiting;
    settle(&delivery, arrived, &job_type, &shared, &sctx).await;
    sctx.held.release(&job_type, delivery.delivery_tag);
}

/// Hands a delivery that waited for a slot too long back to its queue as a fresh copy
/// ([`fits`]); on failure the session ends and the broker redelivers it.
pub(crate) async fn release(waiting: Waiting, job_type: &str, shared: &Shared, sctx: &SessionCtx) {
    let Waiting { delivery, arrived, priority, .. } = waiting;
    if let Err(e) = hand_back(&delivery, arrived, priority, job_type, shared, sctx).await {
        tracing::warn!(job_type = %job_type, error = %e, "could not hand a waiting delivery back; ending the session");
        sctx.lost.cancel();
    }
    sctx.held.release(job_type, delivery.delivery_tag);
}

/// Handles a delivery to the end: acked, requeued, or left for the broker with a lost session.
async fn settle(delivery: &Delivery, arrived: tokio::time::Instant, job_type: &str, shared: &Arc<Shared>, sctx: &SessionCtx) {
    match handle_inner(delivery, arrived, job_type, shared, sctx).await {
        Ok(()) => {}
        // The store failed past its retries (shutdown, or the consumer timeout near): this
        // delivery alone goes back to the queue; the session and the other jobs go on.
        Err(e @ CommonError::Artifacts { .. }) => {
            tracing::warn!(job_type = %job_type, error = %e, "artifact store unavailable; requeueing this delivery");
            if sctx.lost.is_cancelled() {
                return;
            }
            let nack = delivery.acker.nack(BasicNackOptions { requeue: true, multiple: false }).await;
            if let Err(e) = nack {
                tracing::warn!(job_type = %job_type, error = %e, "could not requeue the delivery; ending the session");
                sctx.lost.cancel();
            }
        }
        Err(e) => {
            tracing::warn!(job_type = %job_type, error = %e, "could not make an outcome durable; leaving the delivery for redelivery");
            sctx.lost.cancel();
        }
    }
}

async fn handle_inner(
    d: &Delivery,
    received: tokio::time::Instant,
    job_type: &str,
    shared: &Arc<Shared>,
    sctx: &SessionCtx,
) -> Result<(), CommonError> {
    let hdrs = d.properties.headers().as_ref();
    let content_type = d.properties.content_type().as_ref().map(|s| s.as_str().to_string());
    let spec = match codec::decode_job(content_type.as_deref(), &d.data, shared.config.max_message_bytes) {
        Ok(spec) if spec.job_type != job_type => {
            let reason = format!("job_type {:?} does not match the queue's job type {job_type:?}", spec.job_type);
            return poison(d, job_type, shared, sctx, "mismatch", &reason, Some(&spec.job_id)).await;
        }
        Ok(spec) => spec,
        Err(e) => {
            let class = match e {
                CodecError::TooLarge { .. } => "oversized",
                CodecError::ContentType(_) => "content_type",
                CodecError::Invalid { .. } => "invalid",
                _ => "undecodable",
            };
            let job_id = d.properties.message_id().as_ref().map(|s| s.as_str().to_string());
            return poison(d, job_type, shared, sctx, class, &e.to_string(), job_id.as_deref()).await;
        }
    };
    let attempt = Attempt {
        attempt: headers::attempt(hdrs),
        run: headers::run(hdrs),
        redelivery: headers::delivery_count(hdrs),
        n: AtomicU32::new(0),
        received,
        spec,
    };
    let span = job_span(&attempt, job_type, hdrs);
    let result = run_attempt(d, &attempt, shared, sctx).instrument(span).await;
    // Lines logged in the span on paths that save no attempt log (a duplicate delivery's
    // ack, a job cancelled before it started) would otherwise stay in the capture buffer for ever.
    shared.logs.take(&JobLogs::key(&attempt.spec.job_id, attempt.attempt));
    result
}

/// The span every line of an attempt is logged in: `job_id`, `job_type`, `bot`, `attempt`, and
/// the `trace_id` of the job's W3C `traceparent` header when it has a valid one (the submitter's
/// trace: an API caller's own when it sent one), so that one log query finds the worker's lines
/// of the jobs one request submitted.
fn job_span(at: &Attempt, job_type: &str, hdrs: Option<&lapin::types::FieldTable>) -> tracing::Span {
    let trace_id = headers::trace_id(hdrs);
    tracing::info_span!("job", job_id = %at.spec.job_id, job_type = %job_type, bot = %at.spec.bot, attempt = at.attempt, trace_id)
}

/// One delivery of a job: answered from its outcome record or cancel marker when it has one,
/// ended at once when it cannot run here, else run.
async fn run_attempt(d: &Delivery, at: &Attempt, shared: &Arc<Shared>, sctx: &SessionCtx) -> Result<(), CommonError> {
    let spec = &at.spec;
    let store = &shared.config.artifacts;
    // Effectively once: a job whose outcome is recorded is not run again; nor one
    // cancelled before it started. For a fresh job on a local store this is two
    // `stat`s on the calling thread: no outcome file, no directory of the job.
    // A failing store is retried for this delivery alone (`store_retry`).
    let retry = at.store_retry(shared, sctx);
    let id = spec.job_id.as_str();
    let cancel = shared.cancels.register(id, sctx.stop_jobs.child_token());
    let records = retry.run("look up the outcome record and a cancel marker", || store.job_records(id)).await?;
    let recorded = match &records.outcome {
        Some(key) => read_outcome(&retry, store, key).await?,
        None => Recorded::Absent,
    };
    match recorded {
        Recorded::Outcome(outcome) => {
            tracing::info!(redelivery = at.redelivery, "job already succeeded; acking the duplicate delivery");
            publish_event(sctx, shared, &at.recorded(outcome.event)).await?;
            return ack(d, sctx).await;
        }
        Recorded::Unreadable(reason) => return dead_unreadable(d, at, shared, sctx, reason).await,
        Recorded::Absent => {}
    }
    if records.cancel_marker || cancel.requested() {
        return end_cancelled_before_start(d, at, shared, sctx, &retry).await;
    }
    if i64::from(at.redelivery) > DELIVERY_LIMIT {
        // The broker ends a crash loop at its delivery limit, but counts a handed-back copy's
        // deliveries from none: the deliveries before the copy count here.
        let message = format!(
            "{DELIVERY_LIMIT_REASON}: delivered {} times, the broker's limit is {DELIVERY_LIMIT} redeliveries",
            i64::from(at.redelivery) + 1
        );
        return finish_as(d, at, shared, sctx, JobError::permanent(message), Disposition::Dead).await;
    }
    let Some(handler) = shared.registry.get(&spec.job_type) else {
        return finish_failed(d, at, shared, sctx, JobError::permanent(format!("unknown job type {:?}", spec.job_type))).await;
    };
    let valid = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| handler.validate(&spec.params)));
    if let Err(e) = valid.unwrap_or_else(|p| Err(JobError::panicked(&*p))) {
        return finish_failed(d, at, shared, sctx, JobError::permanent(e.message)).await;
    }
    let consumer_timeout = shared.config.consumer_timeout;
    if let Some(message) = beyond_consumer_timeout(spec.timeout_s, consumer_timeout) {
        // `failed` (a setting to change, not a malformed job), once, at once.
        return finish_as(d, at, shared, sctx, JobError::permanent(message), Disposition::Failed).await;
    }
    if !fits(at.received.elapsed(), spec.timeout_s, consumer_timeout) {
        return hand_back(d, at.received, spec.priority, &spec.job_type, shared, sctx).await;
    }
    execute(d, at, shared, sctx, handler.as_ref(), cancel).await
}

/// Runs the job's handler and ends the attempt by its result: published, recorded, acked
/// (or requeued when a shutdown or a lost session stopped it).
async fn execute(
    d: &Delivery,
    at: &Attempt,
    shared: &Arc<Shared>,
    sctx: &SessionCtx,
    handler: &dyn JobHandler,
    cancel: Registration<'_>,
) -> Result<(), CommonError> {
    let spec = &at.spec;
    let token = cancel.token.clone();
    let (progress, progress_rx) = Progress::channel();
    let ctx = JobContext {
        spec: spec.clone(),
        attempt: at.attempt,
        run: at.run,
        redelivery: at.redelivery,
        artifacts: shared.config.artifacts.clone(),
        data_dir: shared.config.data_dir.clone(),
        cancel: token.clone(),
        progress,
        worker: shared.config.worker.clone(),
        slot: SlotHold::default(),
    };
    let slot = ctx.slot.clone();
    let mut started = at.event(shared, JobStatus::Started);
    if at.redelivery > 0 {
        started.progress = Some(serde_json::json!({"redelivery": at.redelivery}));
    }
    publish_event(sctx, shared, &started).await?;
    tracing::info!(redelivery = at.redelivery, "job started");
    shared.job_started(&spec.job_type);
    let t0 = Instant::now();

    // Progress events go out while the job runs, in order, before the final one.
    let forward = running::forward_progress(shared.clone(), sctx.clone(), at.event(shared, JobStatus::Progress), progress_rx);
    // Later events of this attempt sort after every progress event.
    at.n.store(1 << 20, Ordering::SeqCst);
    let consumer_timeout = shared.config.consumer_timeout;
    let (mut result, timed_out) = running::run_with_timeout(handler, ctx, &token, spec.timeout_s, running::unwind(consumer_timeout)).await;
    let _ = tokio::time::timeout(running::progress_wait(consumer_timeout), forward).await;
    let cancelled_by_user = cancel.requested();
    drop(cancel);
    let elapsed = t0.elapsed().as_secs_f64();

    if cancelled_by_user && result.is_err() {
        result = Err(JobError::cancelled("cancelled on request"));
    } else if result.is_err() && !timed_out && sctx.stop_jobs.is_cancelled() {
        // Stopped by shutdown or a lost session, not by its own failure: requeue.
        save_log(shared, at).await;
        let requeued = requeue(d, at, sctx).await;
        free_slot(shared, spec, slot).await;
        return requeued;
    }
    let status = match &result {
        Ok(_) => "succeeded",
        Err(e) if e.kind == ErrorKind::Cancelled => "cancelled",
        Err(_) => "failed",
    };
    shared.metrics.job_duration.with_label_values(&[spec.job_type.as_str(), status]).observe(elapsed);
    let finished = match result {
        Ok(value) => finish_succeeded(d, at, shared, sctx, value, elapsed).await,
        Err(e) => finish_failed(d, at, shared, sctx, e).await,
    };
    // After the outcome, so the log ends with how the attempt ended ("retry scheduled",
    // "job dead-lettered"); a log is best effort and never holds up the ack.
    save_log(shared, at).await;
    free_slot(shared, spec, slot).await;
    finished
}

/// Counts the attempt's slot free once no work of it runs: a thread that outlived its attempt
/// (timed out while it ignored its stop) keeps the slot, in the heartbeat's count and for the
/// next job, until it stops.
async fn free_slot(shared: &Shared, spec: &JobSpec, slot: SlotHold) {
    slot.released(&spec.job_id).await;
    shared.job_finished(&spec.job_type);
}

/// Ends a job cancelled before it started: `superseded` when coalescing wrote the marker
/// naming the newer job, else `cancelled`. The marker's presence is the request: one that
/// cannot be read is a plain cancel.
async fn end_cancelled_before_start(
    d: &Delivery,
    at: &Attempt,
    shared: &Arc<Shared>,
    sctx: &SessionCtx,
    retry: &StoreRetry<'_>,
) -> Result<(), CommonError> {
    let key = keys::cancel_marker(&at.spec.job_id);
    let marker = match retry.run("read the cancel marker", || shared.config.artifacts.get_json::<CancelRequest>(&key)).await {
        Err(CommonError::Codec(e)) => {
            tracing::warn!(key = %key, error = %e, "unreadable cancel marker; cancelling the job");
            None
        }
        read => read?,
    };
    let ev = match marker.as_ref().and_then(CancelRequest::superseded_by) {
        Some(newer) => {
            let mut ev = at.event(shared, JobStatus::Superseded);
            ev.result = Some(serde_json::json!({ "superseded_by": newer }));
            ev
        }
        None => {
            let mut ev = at.event(shared, JobStatus::Cancelled);
            ev.error = Some(ErrorInfo { kind: ErrorKind::Cancelled, message: "cancelled before it started".into() });
            ev
        }
    };
    publish_event(sctx, shared, &ev).await?;
    ack(d, sctx).await
}

pub(super) async fn publish_event(sctx: &SessionCtx, shared: &Shared, ev: &JobEvent) -> Result<(), CommonError> {
    trainyard_common::amqp::publish_event(&sctx.publish, &shared.config.topology, ev).await
}

async fn save_log(shared: &Shared, at: &Attempt) {
    let key = JobLogs::key(&at.spec.job_id, at.attempt);
    let captured = shared.logs.take(&key);
    if captured.text.is_empty() {
        return;
    }
    // Only the runtime's routine lines: the job's events already say all of it (and
    // skipping the file saves a write per job on the hot path).
    if !captured.notable && at.redelivery == 0 {
        return;
    }
    let mut text = captured.text;
    let store_key = keys::attempt_log(&at.spec.job_id, at.attempt);
    // A redelivered attempt appends to what an earlier run of it wrote.
    if at.redelivery > 0 {
        if let Ok(Some(old)) = shared.config.artifacts.get(&store_key).await {
            text = format!("{}--- redelivery {} ---\n{text}", String::from_utf8_lossy(&old), at.redelivery);
        }
    }
    if let Err(e) = shared.config.artifacts.put(&store_key, text).await {
        tracing::warn!(error = %e, "failed to save the attempt log");
    }
}

/// The part of the broker's consumer timeout a job's `timeout_s` may not use: what follows the
/// timeout (the job unwinding, its outcome recorded and published, the ack) and a delivery's
/// wait between two looks of the dispatcher ([`super::tiers::sweep_every`]).
pub(crate) fn margin(consumer_timeout: Duration) -> Duration {
    consumer_timeout / 10
}

/// Whether a job of `timeout_s` whose delivery arrived `waited` ago can still run to its
/// timeout and end before the broker's consumer timeout closes the channel.
pub(crate) fn fits(waited: Duration, timeout_s: u64, consumer_timeout: Duration) -> bool {
    waited.saturating_add(Duration::from_secs(timeout_s)).saturating_add(margin(consumer_timeout)) <= consumer_timeout
}

/// The longest `timeout_s` a worker runs under `consumer_timeout`: what is left once the
/// [`margin`] is kept, and a wait for a slot of up to one sweep of the dispatcher
/// ([`super::tiers::sweep_every`]), so that a job started soon after its delivery fits.
pub(crate) fn longest_timeout(consumer_timeout: Duration) -> Duration {
    consumer_timeout.saturating_sub(margin(consumer_timeout)).saturating_sub(super::tiers::sweep_every(consumer_timeout))
}

/// Why a job of `timeout_s` cannot run under a broker that closes a channel whose delivery
/// stays unacked for `consumer_timeout`: the broker would requeue it mid-run, again and
/// again. `None` when it fits ([`longest_timeout`]).
fn beyond_consumer_timeout(timeout_s: u64, consumer_timeout: Duration) -> Option<String> {
    let (limit, most) = (consumer_timeout.as_secs(), longest_timeout(consumer_timeout).as_secs());
    (timeout_s > most).then(|| {
        format!(
            "timeout_s {timeout_s} exceeds {most}s, the longest job the broker's consumer timeout of {limit}s leaves room for \
             (a job may wait for a slot, and must end, before it): the broker would close the channel and requeue the job \
             mid-run; lower the job's timeout_s, or raise the broker's consumer_timeout and this worker's \
             --consumer-timeout-s (TRAINYARD_CONSUMER_TIMEOUT_S) together"
        )
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{beyond_consumer_timeout, fits};

    #[test]
    fn a_job_fits_when_its_wait_its_timeout_and_a_tenth_of_the_consumer_timeout_do() {
        let ct = Duration::from_secs(1800);
        assert!(fits(Duration::ZERO, 1620, ct), "nine tenths, started at once");
        assert!(!fits(Duration::ZERO, 1621, ct));
        assert!(fits(Duration::from_secs(120), 1500, ct), "the default timeout after two minutes' wait");
        assert!(!fits(Duration::from_secs(121), 1500, ct));
        assert!(!fits(Duration::MAX, 0, ct), "no overflow");
        // Refused: what would not fit after one sweep's wait (60 s here).
        assert!(beyond_consumer_timeout(1560, ct).is_none() && fits(Duration::from_secs(60), 1560, ct));
        let refused = beyond_consumer_timeout(1561, ct).expect("no room to wait for a slot");
        assert!(refused.contains("timeout_s 1561 exceeds 1560s") && refused.contains("consumer timeout of 1800s"), "{refused}");
        assert!(beyond_consumer_timeout(1800, ct).is_some(), "at the limit there is no time left to end the job");
        assert_eq!(super::longest_timeout(Duration::from_secs(60)), Duration::from_secs(51), "a tenth and a 3-s sweep kept");
    }
}
