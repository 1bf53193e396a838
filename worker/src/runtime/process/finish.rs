//! How an attempt ends: its outcome made durable (outcome record, retry copy or dead
//! letter, and the event, each confirmed by the broker), then the ack.

use lapin::{
    message::Delivery,
    options::{BasicAckOptions, BasicNackOptions},
    types::FieldTable,
    BasicProperties,
};
use trainyard_common::{
    amqp::lasting_properties,
    artifacts::{keys, ArtifactStore},
    codec, headers,
    job::Priority,
    topology::jobs_routing_key,
    CommonError, ErrorInfo, ErrorKind, JobStatus,
};

use super::{publish_event, Attempt, Outcome};
use crate::{
    handler::JobError,
    runtime::{
        disposition::{decide, Disposition},
        session::SessionCtx,
        store_retry::StoreRetry,
        Shared,
    },
};

/// Logs a success with the result's headline metrics as fields: the dashboard's accuracy
/// panel reads `accuracy` (and the job span's `bot`) from this line in Loki.
fn log_succeeded(elapsed: f64, result: Option<&serde_json::Value>) {
    let metric = |k: &str| result.and_then(|r| r.get(k)).and_then(serde_json::Value::as_f64);
    match (metric("accuracy"), metric("macro_f1")) {
        (Some(accuracy), f1) => tracing::info!(duration_s = elapsed, accuracy, macro_f1 = f1, "job succeeded"),
        (None, _) => tracing::info!(duration_s = elapsed, "job succeeded"),
    }
}

pub(super) async fn finish_succeeded(
    d: &Delivery,
    at: &Attempt,
    shared: &Shared,
    sctx: &SessionCtx,
    value: serde_json::Value,
    elapsed: f64,
) -> Result<(), CommonError> {
    let mut ev = at.event(shared, JobStatus::Succeeded);
    let mut value = value;
    if let Some(obj) = value.as_object_mut() {
        obj.entry("duration_s").or_insert(elapsed.into());
    }
    ev.result = Some(value);
    let outcome = bytes::Bytes::from(codec::to_json(&Outcome { event: ev.clone() })?);
    let (store, key) = (&shared.config.artifacts, keys::outcome(&at.spec.job_id));
    let key = key.as_str();
    let retry = at.store_retry(shared, sctx);
    if retry.run("record the outcome", || store.put_if_absent(key, outcome.clone())).await? {
        publish_event(sctx, shared, &ev).await?;
        shared.metrics.jobs_total.with_label_values(&[at.spec.job_type.as_str(), "succeeded"]).inc();
        log_succeeded(elapsed, ev.result.as_ref());
    } else {
        // Another delivery recorded it first, or an earlier try of this one whose reply was lost
        // (a store error after the write): publish what is recorded, never a second result.
        tracing::warn!("the outcome was already recorded; publishing the recorded event, not a second result");
        match read_outcome(&retry, store, key).await? {
            Recorded::Outcome(recorded) => publish_event(sctx, shared, &at.recorded(recorded.event)).await?,
            Recorded::Unreadable(reason) => return dead_unreadable(d, at, shared, sctx, reason).await,
            Recorded::Absent => {
                let reason = format!("the job's outcome record {key} was there when it was written and gone when it was read");
                return dead_unreadable(d, at, shared, sctx, reason).await;
            }
        }
    }
    ack(d, sctx).await
}

/// What the outcome record of a job says.
pub(super) enum Recorded {
    Outcome(Box<Outcome>),
    /// No record: the job has not succeeded.
    Absent,
    /// It cannot be read (why, for the dead letter): the job may have run, so it is not run
    /// again, and it is not acked as done either; a person decides.
    Unreadable(String),
}

/// Dead-letters a job whose outcome record cannot be read, with `reason`: parked where a
/// person sees it (`trainyard dlq list`, a `dead` event), neither run again nor acked as done.
pub(super) async fn dead_unreadable(
    d: &Delivery,
    at: &Attempt,
    shared: &Shared,
    sctx: &SessionCtx,
    reason: String,
) -> Result<(), CommonError> {
    finish_as(d, at, shared, sctx, JobError::permanent(reason), Disposition::Dead).await
}

/// Reads the outcome record at `key`; a store failure is retried.
pub(super) async fn read_outcome(retry: &StoreRetry<'_>, store: &ArtifactStore, key: &str) -> Result<Recorded, CommonError> {
    let unreadable = |why: String| {
        Recorded::Unreadable(format!(
            "the job's outcome record {key} cannot be read ({why}); the job may have run already, so it is not run again: \
             check the record, remove it and replay the job if it should run"
        ))
    };
    match retry.run("read the outcome record", || store.get_json::<Outcome>(key)).await {
        Ok(Some(outcome)) => Ok(Recorded::Outcome(Box::new(outcome))),
        Ok(None) => Ok(Recorded::Absent),
        Err(CommonError::Codec(e)) => Ok(unreadable(e.to_string())),
        Err(e) => Err(e),
    }
}

pub(super) async fn finish_failed(
    d: &Delivery,
    at: &Attempt,
    shared: &Shared,
    sctx: &SessionCtx,
    err: JobError,
) -> Result<(), CommonError> {
    let disposition = decide(err.kind, at.attempt, at.spec.max_attempts, &shared.config.backoff);
    finish_as(d, at, shared, sctx, err, disposition).await
}

/// Makes `disposition` of a failed attempt durable, then acks. `Failed` of a permanent
/// error is a job this worker refuses to run (status `failed`, not retried).
pub(super) async fn finish_as(
    d: &Delivery,
    at: &Attempt,
    shared: &Shared,
    sctx: &SessionCtx,
    err: JobError,
    disposition: Disposition,
) -> Result<(), CommonError> {
    let spec = &at.spec;
    let job_type = spec.job_type.as_str();
    let info = ErrorInfo { kind: err.kind, message: err.message.clone() };
    still_held(sctx, "the outcome of a failed attempt")?;
    match disposition {
        Disposition::Retry { delay_ms, next_attempt } => {
            publish_retry(d, at, shared, sctx, delay_ms, next_attempt).await?;
            let mut ev = at.event(shared, JobStatus::Retrying);
            ev.error = Some(info);
            ev.result = Some(serde_json::json!({"retry_in_ms": delay_ms, "next_attempt": next_attempt}));
            publish_event(sctx, shared, &ev).await?;
            shared.metrics.retries_total.with_label_values(&[job_type]).inc();
            tracing::warn!(error = %err.message, kind = ?err.kind, delay_ms, next_attempt, "attempt failed; retry scheduled");
        }
        Disposition::Failed | Disposition::Dead => {
            let used_up = err.kind != ErrorKind::Permanent;
            let failed = used_up || disposition == Disposition::Failed;
            let reason = if used_up {
                format!("attempts used up ({}/{}): {}", at.attempt, spec.max_attempts, err.message)
            } else {
                err.message.clone()
            };
            let kind = format!("{:?}", err.kind).to_lowercase();
            let status = if failed { JobStatus::Failed } else { JobStatus::Dead };
            let letter = Letter { kind: &kind, reason: &reason, job_id: Some(&spec.job_id), status: Some(status) };
            dead_letter(d, job_type, shared, sctx, letter).await?;
            let mut ev = at.event(shared, status);
            ev.error = Some(ErrorInfo { kind: err.kind, message: reason.clone() });
            publish_event(sctx, shared, &ev).await?;
            shared.metrics.jobs_total.with_label_values(&[job_type, ev.status.as_str()]).inc();
            tracing::error!(reason = %reason, status = %ev.status, "job dead-lettered");
        }
        Disposition::Cancelled => {
            let mut ev = at.event(shared, JobStatus::Cancelled);
            ev.error = Some(info);
            publish_event(sctx, shared, &ev).await?;
            shared.metrics.jobs_total.with_label_values(&[job_type, "cancelled"]).inc();
            tracing::info!("job cancelled");
        }
    }
    ack(d, sctx).await
}

/// Puts a copy with the next attempt number in the retry queue of `delay_ms`.
pub(super) async fn publish_retry(
    d: &Delivery,
    at: &Attempt,
    shared: &Shared,
    sctx: &SessionCtx,
    delay_ms: u64,
    next_attempt: u32,
) -> Result<(), CommonError> {
    let topo = &shared.config.topology;
    // Back to the job's own tier after the delay.
    let jobs_key = jobs_routing_key(&at.spec.job_type, at.spec.priority);
    let key = trainyard_common::topology::retry_routing_key(&jobs_key, delay_ms);
    let declared = shared.retry_queues.lock().map(|s| s.contains(&(jobs_key.clone(), delay_ms))).unwrap_or(false);
    if !declared {
        topo.declare_retry_queue(&sctx.publish, &jobs_key, delay_ms).await?;
        if let Ok(mut s) = shared.retry_queues.lock() {
            s.insert((jobs_key, delay_ms));
        }
    }
    // The next attempt's deliveries count from none.
    let mut hdrs = headers::without_delivery_counts(d.properties.headers().as_ref());
    headers::set_int(&mut hdrs, headers::ATTEMPT, i64::from(next_attempt));
    let props = lasting_properties(&d.properties).with_headers(headers::within_copy_budget(hdrs)).with_delivery_mode(2);
    sctx.copies.publish(&sctx.lost, &topo.retry_exchange(), &key, &d.data, props).await
}

/// Dead-letters a message the worker cannot run at all (poison). No event
/// unless the job id is known; the recorder gets the dead letter regardless.
pub(super) async fn poison(
    d: &Delivery,
    job_type: &str,
    shared: &Shared,
    sctx: &SessionCtx,
    class: &str,
    reason: &str,
    job_id: Option<&str>,
) -> Result<(), CommonError> {
    still_held(sctx, "a poison message's dead letter")?;
    tracing::warn!(job_type = %job_type, class, reason, "poison message dead-lettered");
    shared.metrics.poison_total.with_label_values(&[job_type, class]).inc();
    let reason = format!("{class}: {reason}");
    dead_letter(d, job_type, shared, sctx, Letter { kind: "poison", reason: &reason, job_id, status: None }).await?;
    ack(d, sctx).await
}

/// What a dead letter's headers say besides the worker.
pub(super) struct Letter<'a> {
    kind: &'a str,
    reason: &'a str,
    job_id: Option<&'a str>,
    /// The status the job ended with (the recorder records it): `failed` also for a
    /// permanent error that is a setting to change, not a malformed job.
    status: Option<JobStatus>,
}

pub(super) async fn dead_letter(
    d: &Delivery,
    job_type: &str,
    shared: &Shared,
    sctx: &SessionCtx,
    letter: Letter<'_>,
) -> Result<(), CommonError> {
    let mut hdrs: FieldTable = headers::within_copy_budget(d.properties.headers().clone().unwrap_or_default());
    headers::set_str(&mut hdrs, headers::DEAD_REASON, truncate(letter.reason, 4000));
    headers::set_str(&mut hdrs, headers::DEAD_KIND, letter.kind);
    headers::set_str(&mut hdrs, headers::DEAD_WORKER, shared.config.worker.id.clone());
    headers::set_str(&mut hdrs, headers::DEAD_AT, chrono::Utc::now().to_rfc3339());
    if let Some(id) = letter.job_id {
        headers::set_str(&mut hdrs, headers::JOB_ID, truncate(id, 200));
    }
    if let Some(status) = letter.status {
        headers::set_str(&mut hdrs, headers::DEAD_STATUS, status.as_str());
    }
    let props: BasicProperties = lasting_properties(&d.properties).with_headers(hdrs).with_delivery_mode(2);
    sctx.copies.publish(&sctx.lost, &shared.config.topology.dead_exchange(), job_type, &d.data, props).await
}

/// `SessionLost` once the delivery's session is known lost: its ack would be refused and the
/// broker delivers it again, so a copy published now (a retry, a dead letter, a hand-back)
/// would be a second live job beside the redelivery (two attempts, or a dead letter and a run).
fn still_held(sctx: &SessionCtx, what: &'static str) -> Result<(), CommonError> {
    if sctx.lost.is_cancelled() {
        Err(CommonError::SessionLost { what })
    } else {
        Ok(())
    }
}

pub(super) async fn ack(d: &Delivery, sctx: &SessionCtx) -> Result<(), CommonError> {
    still_held(sctx, "the ack")?;
    d.acker.ack(BasicAckOptions::default()).await.map(|_| ()).map_err(CommonError::amqp("ack a delivery"))
}

/// Hands a delivery back to its queue as a fresh copy: the same body and properties published
/// to the work exchange with the routing key of its tier, `priority` (confirmed), then the
/// original acked. The
/// broker's consumer timeout starts again with the copy, which waits at the back of its tier
/// queue; no attempt is spent and no event published.
pub(super) async fn hand_back(
    d: &Delivery,
    arrived: tokio::time::Instant,
    priority: Priority,
    job_type: &str,
    shared: &Shared,
    sctx: &SessionCtx,
) -> Result<(), CommonError> {
    still_held(sctx, "the hand-back")?;
    let (exchange, key) = (shared.config.topology.jobs_exchange(), jobs_routing_key(job_type, priority));
    let props =
        lasting_properties(&d.properties).with_headers(headers::within_copy_budget(headers::fresh_copy(d.properties.headers().as_ref())));
    sctx.copies.publish(&sctx.lost, &exchange, &key, &d.data, props).await?;
    ack(d, sctx).await?;
    shared.metrics.released_total.with_label_values(&[job_type]).inc();
    let job_id = d.properties.message_id().as_ref().map(|s| s.as_str().to_string());
    tracing::info!(
        job_type,
        job_id = job_id.as_deref().unwrap_or("(none)"),
        waited_s = arrived.elapsed().as_secs(),
        "delivery handed back as a fresh copy: waiting for a slot, it could no longer end before the broker's consumer timeout"
    );
    Ok(())
}

pub(super) async fn requeue(d: &Delivery, at: &Attempt, sctx: &SessionCtx) -> Result<(), CommonError> {
    if sctx.lost.is_cancelled() {
        tracing::info!("session lost; the broker will redeliver the job");
        return Ok(());
    }
    tracing::info!(attempt = at.attempt, "job stopped by shutdown; requeueing it");
    d.acker.nack(BasicNackOptions { requeue: true, multiple: false }).await.map(|_| ()).map_err(CommonError::amqp("requeue a delivery"))
}

fn truncate(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::layer::SubscriberExt;

    use super::log_succeeded;

    /// A writer the JSON layer writes its lines into.
    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl Lines {
        fn writer(&self) -> impl Fn() -> Lines + Send + Sync + 'static {
            let lines = self.clone();
            move || lines.clone()
        }
    }

    impl std::io::Write for Lines {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// The Loki query of the dashboard panel whose title starts with `title`.
    fn loki_query(title: &str) -> String {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../k8s/components/monitoring/dashboard.json");
        let dash: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let panel = dash["panels"].as_array().unwrap().iter().find(|p| p["title"].as_str().is_some_and(|t| t.starts_with(title)));
        panel.expect("the dashboard has the panel")["targets"][0]["expr"].as_str().unwrap().to_string()
    }

    /// The text between `start` and the next `end` after it.
    fn between<'a>(s: &'a str, start: &str, end: &str) -> &'a str {
        let from = s.find(start).unwrap_or_else(|| panic!("{start:?} in {s}")) + start.len();
        &s[from..from + s[from..].find(end).unwrap()]
    }

    #[test]
    fn the_dashboards_accuracy_query_reads_the_success_line_of_a_training_job() {
        let lines = Lines::default();
        let subscriber = tracing_subscriber::registry().with(crate::runtime::cli::json_layer(lines.writer()));
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("job", job_id = "j1", job_type = "intent-train", bot = "bot-7", attempt = 1);
            let _in = span.enter();
            log_succeeded(12.5, Some(&serde_json::json!({"accuracy": 0.931, "macro_f1": 0.92, "labels": 151})));
        });
        let text = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
        let line: serde_json::Value = serde_json::from_str(text.trim()).unwrap();

        // `… |= "job succeeded" | json accuracy="accuracy", trained_bot="span.bot" | unwrap accuracy …`,
        // grouped by bot: the line passes the filter and every field the query takes is there.
        let query = loki_query("Accuracy of finished trainings");
        assert!(text.contains(between(&query, "|= \"", "\"")), "the line filter of {query} passes {text}");
        let fields = between(&query, "| json ", " |");
        let mut taken = std::collections::HashMap::new();
        for field in fields.split(", ") {
            let (label, path) = field.split_once('=').unwrap();
            let value = path.trim_matches('"').split('.').fold(&line, |v, part| &v[part]);
            assert!(!value.is_null(), "{path} (for {label}) is in {line}");
            taken.insert(label, value.clone());
        }
        assert_eq!(taken[between(&query, "| unwrap ", " ")], 0.931);
        assert_eq!(taken[between(&query, "max by (", ")")], "bot-7");
        assert_eq!(line["macro_f1"], 0.92);
    }

    #[test]
    fn every_line_of_a_job_carries_the_trace_id_of_its_traceparent() {
        let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
        let line_in_span = |traceparent: Option<&str>| {
            let mut hdrs = lapin::types::FieldTable::default();
            if let Some(tp) = traceparent {
                trainyard_common::headers::set_str(&mut hdrs, trainyard_common::headers::TRACEPARENT, tp);
            }
            let spec = trainyard_common::JobSpec::new("noop", "b", serde_json::json!({}), trainyard_common::Trigger::manual("t"));
            let at = super::super::Attempt {
                spec,
                attempt: 1,
                run: 0,
                redelivery: 0,
                n: Default::default(),
                received: tokio::time::Instant::now(),
            };
            let lines = Lines::default();
            let subscriber = tracing_subscriber::registry().with(crate::runtime::cli::json_layer(lines.writer()));
            tracing::subscriber::with_default(subscriber, || {
                let _in = super::super::job_span(&at, "noop", Some(&hdrs)).entered();
                tracing::info!("a line of the job");
            });
            let text = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
            serde_json::from_str::<serde_json::Value>(text.trim()).unwrap()
        };
        let line = line_in_span(Some(&format!("00-{trace}-00f067aa0ba902b7-01")));
        assert_eq!(line["span"]["trace_id"], trace, "{line}");
        assert_eq!(line["span"]["bot"], "b");
        for missing in [None, Some("00-not-a-trace-01")] {
            let line = line_in_span(missing);
            assert!(line["span"].get("trace_id").is_none() && line["span"]["job_id"].is_string(), "{line}");
        }
    }

    #[test]
    fn a_result_without_metrics_logs_its_success_without_them() {
        let lines = Lines::default();
        let subscriber = tracing_subscriber::registry().with(crate::runtime::cli::json_layer(lines.writer()));
        tracing::subscriber::with_default(subscriber, || log_succeeded(0.1, Some(&serde_json::json!({"echo": 1}))));
        let line: serde_json::Value = serde_json::from_str(String::from_utf8(lines.0.lock().unwrap().clone()).unwrap().trim()).unwrap();
        assert_eq!(line["message"], "job succeeded");
        assert!(line.get("accuracy").is_none(), "{line}");
    }
}
