//! `GET /v1/queues`: per job type, what the control plane's demand loop last measured
//! (`serve.rs`, every few seconds): ready messages, jobs recorded as running, demand, consumers
//! of the work queue (workers consuming it), dead letters waiting in the dead-letter queue, the
//! age of the oldest queued job, and the counters of submitted and finished jobs (clients derive
//! rates from two readings). Read
//! from the metrics registry, so it costs no query; the live stream pushes it too.

use std::collections::BTreeMap;

use axum::{extract::State, Json};
use prometheus::Registry;
use serde_json::{Map, Value};
use trainyard_common::metrics as m;

use super::ApiState;

/// The gauges and counters shown, by metric name: (field, label whose value is added to the field's name).
const FIELDS: &[(&str, &str, Option<&str>)] = &[
    (m::QUEUE_READY, "ready", None),
    (m::JOBS_RUNNING_RECORDED, "running", None),
    (m::JOBS_DEMAND, "demand", None),
    (m::QUEUE_DEAD, "dead_letters", None),
    (m::QUEUE_CONSUMERS, "consumers", None),
    (m::OLDEST_WAITING_SECONDS, "oldest_waiting_s", None),
    (m::JOBS_SUBMITTED_TOTAL, "submitted", None),
    (m::JOBS_FINISHED_TOTAL, "finished", Some("status")),
];

/// Per job type, the measured values.
pub fn snapshot(registry: &Registry) -> BTreeMap<String, Map<String, Value>> {
    let mut out: BTreeMap<String, Map<String, Value>> = BTreeMap::new();
    for fam in registry.gather() {
        let Some((_, field, by)) = FIELDS.iter().find(|(name, _, _)| *name == fam.name()) else { continue };
        for metric in fam.get_metric() {
            let label = |n: &str| metric.get_label().iter().find(|l| l.name() == n).map(|l| l.value().to_string());
            let Some(job_type) = label("job_type") else { continue };
            let value = metric.get_gauge().get_value() + metric.get_counter().get_value();
            let row = out.entry(job_type).or_default();
            match by.and_then(label) {
                Some(sub) => {
                    let sums = row.entry(*field).or_insert_with(|| Value::Object(Map::new()));
                    let prev = sums.get(&sub).and_then(Value::as_f64).unwrap_or(0.0);
                    sums[sub.as_str()] = Value::from(prev + value);
                }
                None => {
                    let prev = row.get(*field).and_then(Value::as_f64).unwrap_or(0.0);
                    row.insert(field.to_string(), Value::from(prev + value));
                }
            }
        }
    }
    out
}

/// One job type's figures in `GET /v1/queues` (present once measured).
#[derive(utoipa::ToSchema)]
#[allow(dead_code)] // only its schema is used: the figures are built from the metrics registry
pub struct QueueFigures {
    /// Messages ready in its queues.
    ready: Option<f64>,
    /// Jobs recorded as running.
    running: Option<f64>,
    /// Ready plus running.
    demand: Option<f64>,
    /// Consumers of its work queue.
    consumers: Option<f64>,
    /// Dead letters waiting.
    dead_letters: Option<f64>,
    /// Age of the oldest queued job, seconds.
    oldest_waiting_s: Option<f64>,
    /// Jobs submitted (a counter).
    submitted: Option<f64>,
    /// Jobs finished, by status (counters).
    finished: Option<BTreeMap<String, f64>>,
}

/// `GET /v1/queues`.
#[utoipa::path(get, path = "/queues", tag = "ops", security(("bearer" = [])),
    responses((status = 200, description = "per job type, the figures last measured", body = BTreeMap<String, QueueFigures>),
        super::errors::AuthResponses))]
pub async fn queues(State(s): State<ApiState>) -> Json<BTreeMap<String, Map<String, Value>>> {
    Json(snapshot(&s.registry))
}
