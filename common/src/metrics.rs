//! Every Prometheus metric name and label of trainyard, defined once.
//!
//! The Grafana dashboard, alert rules and autoscaling manifests in `k8s/` are
//! tested against [`ALL_NAMES`].

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
/// Reconnects to the broker.
pub const RECONNECTS_TOTAL: &str = "trainyard_amqp_reconnects_total";
/// Ready + running jobs by type: the autoscaling signal (control plane).
pub const JOBS_DEMAND: &str = "trainyard_jobs_demand";
/// Ready messages in the work queue, by type (control plane).
pub const QUEUE_READY: &str = "trainyard_queue_ready";
/// Messages in the dead-letter queue, by type (control plane).
pub const QUEUE_DEAD: &str = "trainyard_queue_dead";
/// Events written to the job store (control plane).
pub const EVENTS_RECORDED_TOTAL: &str = "trainyard_events_recorded_total";
/// Jobs submitted by the control plane, by type and trigger kind.
pub const JOBS_SUBMITTED_TOTAL: &str = "trainyard_jobs_submitted_total";
/// Seconds per training epoch, by device.
pub const TRAINING_EPOCH_SECONDS: &str = "trainyard_training_epoch_seconds";
/// Promotion decisions by outcome (`promoted`, `rejected`, `manual`).
pub const PROMOTIONS_TOTAL: &str = "trainyard_promotions_total";

/// Every metric name above.
pub const ALL_NAMES: &[&str] = &[
    JOBS_TOTAL,
    JOB_DURATION_SECONDS,
    JOBS_RUNNING,
    WORKER_FREE_SLOTS,
    POISON_TOTAL,
    RETRIES_TOTAL,
    RECONNECTS_TOTAL,
    JOBS_DEMAND,
    QUEUE_READY,
    QUEUE_DEAD,
    EVENTS_RECORDED_TOTAL,
    JOBS_SUBMITTED_TOTAL,
    TRAINING_EPOCH_SECONDS,
    PROMOTIONS_TOTAL,
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
        registry.register(Box::new(m.reconnects_total.clone()))?;
        registry.register(Box::new(m.epoch_seconds.clone()))?;
        for t in job_types {
            m.jobs_running.with_label_values(&[t.as_str()]).set(0);
            m.retries_total.with_label_values(&[t.as_str()]);
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
