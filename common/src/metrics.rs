//! Every Prometheus metric name and label of trainyard, defined once.
//!
//! The Grafana dashboard, alert rules and autoscaling manifests in `k8s/` are checked
//! against the series the binaries really export (`k8s/components/monitoring/series.txt`,
//! written by `tests/tests/e2e/series.rs`, read by `scripts/validate-k8s.sh`), not against
//! [`ALL_NAMES`]: a name here proves nothing until a registry exports it.

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

/// Jobs finished by a worker, by type and final status of the attempt.
pub const JOBS_TOTAL: &str = "trainyard_jobs_total";
/// Attempt duration in seconds, by type and outcome.
pub const JOB_DURATION_SECONDS: &str = "trainyard_job_duration_seconds";
/// Jobs running on this worker now, by type.
pub const JOBS_RUNNING: &str = "trainyard_jobs_running";
/// Free job slots on this worker.
pub const WORKER_FREE_SLOTS: &str = "trainyard_worker_free_slots";
/// Messages dead-lettered as poison (undecodable, invalid, oversized), by type and reason.
pub const POISON_TOTAL: &str = "trainyard_poison_messages_total";
/// Retries scheduled, by type.
pub const RETRIES_TOTAL: &str = "trainyard_retries_total";
/// Deliveries a worker handed back to their queue as a fresh copy because, waiting for a slot,
/// they could no longer finish before the broker's consumer timeout, by type.
pub const DELIVERIES_RELEASED_TOTAL: &str = "trainyard_deliveries_released_total";
/// Reconnects to the broker.
pub const RECONNECTS_TOTAL: &str = "trainyard_amqp_reconnects_total";
/// Jobs that could run now, by type: ready + running + held by busy workers + waiting for admission
/// and allowed by their bots' limits. The autoscaling signal (control plane).
pub const JOBS_DEMAND: &str = "trainyard_jobs_demand";
/// Jobs waiting for admission, by type, whether or not their bots' limits let them run (not those
/// latest wins will supersede: they are passed on as soon as their cancel marker exists) (control plane).
pub const JOBS_ADMISSION_WAITING: &str = "trainyard_jobs_admission_waiting";
/// Ready messages in the work queue, by type (control plane).
pub const QUEUE_READY: &str = "trainyard_queue_ready";
/// Messages in the dead-letter queue, by type (control plane).
pub const QUEUE_DEAD: &str = "trainyard_queue_dead";
/// Consumers of the work queue, by type: each worker consumes every priority tier of the types it
/// runs, so this is the most consumers of one tier queue (control plane).
pub const QUEUE_CONSUMERS: &str = "trainyard_queue_consumers";
/// Events written to the job store (control plane).
pub const EVENTS_RECORDED_TOTAL: &str = "trainyard_events_recorded_total";
/// Events the recorder could not record and parked with the reason (control plane).
pub const EVENTS_PARKED_TOTAL: &str = "trainyard_events_parked_total";
/// Times the recorder found the events stream short of its stored position (deleted and
/// declared again) and read it again from its first entry (control plane).
pub const STREAM_RESTARTS_TOTAL: &str = "trainyard_stream_restarts_total";
/// Jobs submitted by the control plane, by type and trigger kind.
pub const JOBS_SUBMITTED_TOTAL: &str = "trainyard_jobs_submitted_total";
/// Seconds per training epoch, by device.
pub const TRAINING_EPOCH_SECONDS: &str = "trainyard_training_epoch_seconds";
/// Promotion decisions recorded, by status ([`PROMOTION_STATUSES`]) (control plane).
pub const PROMOTIONS_TOTAL: &str = "trainyard_promotions_total";

/// Jobs whose latest recorded status is `started` or `progress`, by type (control plane).
pub const JOBS_RUNNING_RECORDED: &str = "trainyard_jobs_running_recorded";
/// Jobs in the job store by type and current status (control plane).
pub const JOBS_BY_STATUS: &str = "trainyard_jobs_by_status";
/// Age in seconds of the oldest job still `queued`, by type; 0 when none (control plane).
pub const OLDEST_WAITING_SECONDS: &str = "trainyard_oldest_waiting_job_seconds";
/// Time from submission to final status, by type and final status (control plane).
pub const JOB_TOTAL_DURATION_SECONDS: &str = "trainyard_job_total_duration_seconds";
/// Jobs that reached a final status, by type and status, as recorded (control plane).
pub const JOBS_FINISHED_TOTAL: &str = "trainyard_jobs_finished_total";
/// Dead letters recorded, by type and kind (control plane).
pub const DEAD_LETTERS_TOTAL: &str = "trainyard_dead_letters_total";
/// Schedule fires claimed and published by this replica, by schedule (control plane).
pub const SCHEDULE_FIRES_TOTAL: &str = "trainyard_schedule_fires_total";
/// Trigger events received, by rule and outcome (`fired`, `debounced`, `parked`; rule `none` for an event no rule could read or matches) (control plane).
pub const TRIGGER_EVENTS_TOTAL: &str = "trainyard_trigger_events_total";
/// HTTP requests of the control-plane API, by route and status code.
pub const HTTP_REQUESTS_TOTAL: &str = "trainyard_http_requests_total";

/// Every metric name above.
pub const ALL_NAMES: &[&str] = &[
    JOBS_TOTAL,
    JOB_DURATION_SECONDS,
    JOBS_RUNNING,
    WORKER_FREE_SLOTS,
    POISON_TOTAL,
    RETRIES_TOTAL,
    DELIVERIES_RELEASED_TOTAL,
    RECONNECTS_TOTAL,
    JOBS_DEMAND,
    JOBS_ADMISSION_WAITING,
    QUEUE_READY,
    QUEUE_DEAD,
    QUEUE_CONSUMERS,
    EVENTS_RECORDED_TOTAL,
    EVENTS_PARKED_TOTAL,
    STREAM_RESTARTS_TOTAL,
    JOBS_SUBMITTED_TOTAL,
    TRAINING_EPOCH_SECONDS,
    PROMOTIONS_TOTAL,
    JOBS_RUNNING_RECORDED,
    JOBS_BY_STATUS,
    OLDEST_WAITING_SECONDS,
    JOB_TOTAL_DURATION_SECONDS,
    JOBS_FINISHED_TOTAL,
    DEAD_LETTERS_TOTAL,
    SCHEDULE_FIRES_TOTAL,
    TRIGGER_EVENTS_TOTAL,
    HTTP_REQUESTS_TOTAL,
];

/// Label: job type.
pub const L_JOB_TYPE: &str = "job_type";
/// Label: status or outcome.
pub const L_STATUS: &str = "status";
/// Label: reason.
pub const L_REASON: &str = "reason";

/// The metrics a worker exports.
#[derive(Debug, Clone)]
pub struct WorkerMetrics {
    /// See [`JOBS_TOTAL`].
    pub jobs_total: IntCounterVec,
    /// See [`JOB_DURATION_SECONDS`].
    pub job_duration: HistogramVec,
    /// See [`JOBS_RUNNING`].
    pub jobs_running: IntGaugeVec,
    /// See [`WORKER_FREE_SLOTS`].
    pub free_slots: IntGauge,
    /// See [`POISON_TOTAL`].
    pub poison_total: IntCounterVec,
    /// See [`RETRIES_TOTAL`].
    pub retries_total: IntCounterVec,
    /// See [`DELIVERIES_RELEASED_TOTAL`].
    pub released_total: IntCounterVec,
    /// See [`RECONNECTS_TOTAL`].
    pub reconnects_total: prometheus::IntCounter,
    /// See [`TRAINING_EPOCH_SECONDS`].
    pub epoch_seconds: HistogramVec,
}

impl WorkerMetrics {
    /// Creates and registers the worker metrics, each job type at 0.
    pub fn new(registry: &Registry, job_types: &[String]) -> prometheus::Result<Self> {
        let m = Self {
            jobs_total: IntCounterVec::new(Opts::new(JOBS_TOTAL, "Job attempts finished, by type and outcome."), &[L_JOB_TYPE, L_STATUS])?,
            job_duration: HistogramVec::new(
                HistogramOpts::new(JOB_DURATION_SECONDS, "Duration of job attempts.")
                    .buckets(vec![0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0]),
                &[L_JOB_TYPE, L_STATUS],
            )?,
            jobs_running: IntGaugeVec::new(Opts::new(JOBS_RUNNING, "Jobs running on this worker."), &[L_JOB_TYPE])?,
            free_slots: IntGauge::new(WORKER_FREE_SLOTS, "Free job slots on this worker.")?,
            poison_total: IntCounterVec::new(Opts::new(POISON_TOTAL, "Messages dead-lettered as poison."), &[L_JOB_TYPE, L_REASON])?,
            retries_total: IntCounterVec::new(Opts::new(RETRIES_TOTAL, "Retries scheduled."), &[L_JOB_TYPE])?,
            released_total: IntCounterVec::new(
                Opts::new(DELIVERIES_RELEASED_TOTAL, "Deliveries handed back as a fresh copy before the broker's consumer timeout."),
                &[L_JOB_TYPE],
            )?,
            reconnects_total: prometheus::IntCounter::new(RECONNECTS_TOTAL, "Reconnects to the broker.")?,
            epoch_seconds: HistogramVec::new(
                HistogramOpts::new(TRAINING_EPOCH_SECONDS, "Seconds per training epoch.")
                    .buckets(vec![0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0]),
                &["device"],
            )?,
        };
        registry.register(Box::new(m.jobs_total.clone()))?;
        registry.register(Box::new(m.job_duration.clone()))?;
        registry.register(Box::new(m.jobs_running.clone()))?;
        registry.register(Box::new(m.free_slots.clone()))?;
        registry.register(Box::new(m.poison_total.clone()))?;
        registry.register(Box::new(m.retries_total.clone()))?;
        registry.register(Box::new(m.released_total.clone()))?;
        registry.register(Box::new(m.reconnects_total.clone()))?;
        registry.register(Box::new(m.epoch_seconds.clone()))?;
        for t in job_types {
            m.jobs_running.with_label_values(&[t.as_str()]).set(0);
            m.retries_total.with_label_values(&[t.as_str()]);
            m.released_total.with_label_values(&[t.as_str()]);
        }
        Ok(m)
    }
}

/// Label: schedule name.
pub const L_SCHEDULE: &str = "schedule";
/// Label: trigger rule name.
pub const L_RULE: &str = "rule";
/// Label: trigger kind (`manual`, `schedule`, `event`, `api`).
pub const L_TRIGGER: &str = "trigger";

/// The `status` values of [`PROMOTIONS_TOTAL`]: a training's gate decision (`promoted`: passed
/// and made production; `held`: passed, but promotion is manual or was not applied;
/// `rejected`: failed the gate) and an operator's `manual` promotion or `rollback`.
pub const PROMOTION_STATUSES: [&str; 5] = ["promoted", "held", "rejected", "manual", "rollback"];

/// The metrics the control plane (`trainyard serve`) exports.
#[derive(Debug, Clone)]
pub struct ControlMetrics {
    /// See [`JOBS_DEMAND`]: jobs that could run now, the autoscaling signal.
    pub jobs_demand: IntGaugeVec,
    /// See [`JOBS_ADMISSION_WAITING`].
    pub admission_waiting: IntGaugeVec,
    /// See [`QUEUE_READY`].
    pub queue_ready: IntGaugeVec,
    /// See [`QUEUE_DEAD`].
    pub queue_dead: IntGaugeVec,
    /// See [`QUEUE_CONSUMERS`].
    pub queue_consumers: IntGaugeVec,
    /// See [`JOBS_RUNNING_RECORDED`].
    pub jobs_running: IntGaugeVec,
    /// See [`JOBS_BY_STATUS`].
    pub jobs_by_status: IntGaugeVec,
    /// See [`OLDEST_WAITING_SECONDS`].
    pub oldest_waiting: prometheus::GaugeVec,
    /// See [`JOB_TOTAL_DURATION_SECONDS`].
    pub job_duration: HistogramVec,
    /// See [`JOBS_FINISHED_TOTAL`].
    pub jobs_finished: IntCounterVec,
    /// See [`EVENTS_RECORDED_TOTAL`].
    pub events_recorded: IntCounterVec,
    /// See [`EVENTS_PARKED_TOTAL`]; exported from start-up, at 0.
    pub events_parked: prometheus::IntCounter,
    /// See [`STREAM_RESTARTS_TOTAL`]; exported from start-up, at 0.
    pub stream_restarts: prometheus::IntCounter,
    /// See [`RECONNECTS_TOTAL`]: the recorder's and the trigger listener's reconnects.
    pub reconnects_total: prometheus::IntCounter,
    /// See [`DEAD_LETTERS_TOTAL`].
    pub dead_letters: IntCounterVec,
    /// See [`JOBS_SUBMITTED_TOTAL`].
    pub jobs_submitted: IntCounterVec,
    /// See [`SCHEDULE_FIRES_TOTAL`].
    pub schedule_fires: IntCounterVec,
    /// See [`TRIGGER_EVENTS_TOTAL`].
    pub trigger_events: IntCounterVec,
    /// See [`HTTP_REQUESTS_TOTAL`].
    pub http_requests: IntCounterVec,
    /// See [`PROMOTIONS_TOTAL`]; every status exported from start-up, at 0.
    pub promotions: IntCounterVec,
}

impl ControlMetrics {
    /// Creates and registers the control-plane metrics; per-type gauges start at 0 for every known type.
    pub fn new(registry: &Registry, job_types: &[String]) -> prometheus::Result<Self> {
        let m = Self {
            jobs_demand: IntGaugeVec::new(
                Opts::new(JOBS_DEMAND, "Jobs that could run now (ready, running, held, admissible), by type (autoscaling signal)."),
                &[L_JOB_TYPE],
            )?,
            admission_waiting: IntGaugeVec::new(
                Opts::new(JOBS_ADMISSION_WAITING, "Jobs waiting for admission that will run, by type, their bots' limits allowing or not."),
                &[L_JOB_TYPE],
            )?,
            queue_ready: IntGaugeVec::new(Opts::new(QUEUE_READY, "Ready messages in the work queue, by type."), &[L_JOB_TYPE])?,
            queue_dead: IntGaugeVec::new(Opts::new(QUEUE_DEAD, "Messages in the dead-letter queue, by type."), &[L_JOB_TYPE])?,
            queue_consumers: IntGaugeVec::new(Opts::new(QUEUE_CONSUMERS, "Consumers of the work queue, by type."), &[L_JOB_TYPE])?,
            jobs_running: IntGaugeVec::new(Opts::new(JOBS_RUNNING_RECORDED, "Jobs recorded as running, by type."), &[L_JOB_TYPE])?,
            jobs_by_status: IntGaugeVec::new(
                Opts::new(JOBS_BY_STATUS, "Jobs in the job store by type and status."),
                &[L_JOB_TYPE, L_STATUS],
            )?,
            oldest_waiting: prometheus::GaugeVec::new(
                Opts::new(OLDEST_WAITING_SECONDS, "Age of the oldest queued job, by type (0 when none)."),
                &[L_JOB_TYPE],
            )?,
            job_duration: HistogramVec::new(
                HistogramOpts::new(JOB_TOTAL_DURATION_SECONDS, "Time from submission to final status.")
                    .buckets(vec![0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 21600.0]),
                &[L_JOB_TYPE, L_STATUS],
            )?,
            jobs_finished: IntCounterVec::new(
                Opts::new(JOBS_FINISHED_TOTAL, "Jobs that reached a final status."),
                &[L_JOB_TYPE, L_STATUS],
            )?,
            events_recorded: IntCounterVec::new(Opts::new(EVENTS_RECORDED_TOTAL, "Events written to the job store."), &[L_STATUS])?,
            events_parked: prometheus::IntCounter::new(
                EVENTS_PARKED_TOTAL,
                "Events the recorder could not record, parked with the reason.",
            )?,
            stream_restarts: prometheus::IntCounter::new(
                STREAM_RESTARTS_TOTAL,
                "Times the recorder found the events stream short of its stored position and read it from the first entry.",
            )?,
            reconnects_total: prometheus::IntCounter::new(RECONNECTS_TOTAL, "Reconnects to the broker.")?,
            dead_letters: IntCounterVec::new(Opts::new(DEAD_LETTERS_TOTAL, "Dead letters recorded."), &[L_JOB_TYPE, L_REASON])?,
            jobs_submitted: IntCounterVec::new(
                Opts::new(JOBS_SUBMITTED_TOTAL, "Jobs submitted by the control plane."),
                &[L_JOB_TYPE, L_TRIGGER],
            )?,
            schedule_fires: IntCounterVec::new(Opts::new(SCHEDULE_FIRES_TOTAL, "Schedule fires published."), &[L_SCHEDULE])?,
            trigger_events: IntCounterVec::new(Opts::new(TRIGGER_EVENTS_TOTAL, "Trigger events received."), &[L_RULE, L_STATUS])?,
            http_requests: IntCounterVec::new(Opts::new(HTTP_REQUESTS_TOTAL, "HTTP API requests."), &["route", "code"])?,
            promotions: IntCounterVec::new(Opts::new(PROMOTIONS_TOTAL, "Promotion decisions recorded, by status."), &[L_STATUS])?,
        };
        registry.register(Box::new(m.jobs_demand.clone()))?;
        registry.register(Box::new(m.admission_waiting.clone()))?;
        registry.register(Box::new(m.queue_ready.clone()))?;
        registry.register(Box::new(m.queue_dead.clone()))?;
        registry.register(Box::new(m.queue_consumers.clone()))?;
        registry.register(Box::new(m.jobs_running.clone()))?;
        registry.register(Box::new(m.jobs_by_status.clone()))?;
        registry.register(Box::new(m.oldest_waiting.clone()))?;
        registry.register(Box::new(m.job_duration.clone()))?;
        registry.register(Box::new(m.jobs_finished.clone()))?;
        registry.register(Box::new(m.events_recorded.clone()))?;
        registry.register(Box::new(m.events_parked.clone()))?;
        registry.register(Box::new(m.stream_restarts.clone()))?;
        registry.register(Box::new(m.reconnects_total.clone()))?;
        registry.register(Box::new(m.dead_letters.clone()))?;
        registry.register(Box::new(m.jobs_submitted.clone()))?;
        registry.register(Box::new(m.schedule_fires.clone()))?;
        registry.register(Box::new(m.trigger_events.clone()))?;
        registry.register(Box::new(m.http_requests.clone()))?;
        registry.register(Box::new(m.promotions.clone()))?;
        // Counters that alerts compare against exist before their first event.
        for status in crate::JobStatus::ALL {
            m.events_recorded.with_label_values(&[status.as_str()]);
        }
        for status in PROMOTION_STATUSES {
            m.promotions.with_label_values(&[status]);
        }
        for t in job_types {
            let t = t.as_str();
            m.jobs_demand.with_label_values(&[t]).set(0);
            m.admission_waiting.with_label_values(&[t]).set(0);
            m.queue_ready.with_label_values(&[t]).set(0);
            m.queue_dead.with_label_values(&[t]).set(0);
            m.queue_consumers.with_label_values(&[t]).set(0);
            m.jobs_running.with_label_values(&[t]).set(0);
            m.oldest_waiting.with_label_values(&[t]).set(0.0);
        }
        Ok(m)
    }
}

/// Renders a registry in the Prometheus text format.
pub fn render(registry: &Registry) -> String {
    use prometheus::Encoder;
    let mut buf = Vec::new();
    let _ = prometheus::TextEncoder::new().encode(&registry.gather(), &mut buf);
    String::from_utf8(buf).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_plane_counters_that_alerts_read_exist_from_start_up() {
        let registry = Registry::new();
        ControlMetrics::new(&registry, &["noop".into()]).unwrap();
        let text = render(&registry);
        for status in crate::JobStatus::ALL {
            let line = format!("{EVENTS_RECORDED_TOTAL}{{status=\"{}\"}} 0", status.as_str());
            assert!(text.contains(&line), "missing {line}");
        }
        for status in PROMOTION_STATUSES {
            let line = format!("{PROMOTIONS_TOTAL}{{status=\"{status}\"}} 0");
            assert!(text.contains(&line), "missing {line}");
        }
    }
}
