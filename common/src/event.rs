//! [`JobEvent`]: one record per state change of a job.
//!
//! Events are published (confirmed) to the `trainyard.events` topic exchange
//! with routing key `<job_type>.<status>`; the stream `trainyard.events.log`
//! keeps them all (the audit log), and the recorder reads it into the job store.
//!
//! The contract is versioned like the job's ([`SchemaVersion`]): readers accept
//! unknown fields, unknown statuses and error kinds (read as `unknown`) and every
//! minor version of their major; [`JobEvent::check`] says why an event cannot be
//! recorded (a major version this build does not read, ids that are not ids), and
//! the recorder parks such an event with that reason instead of dropping it.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::{
    job::{valid_bot_name, valid_job_type, JobSpec},
    version::SchemaVersion,
};

/// The lifecycle of a job.
///
/// `queued → started → progress* → succeeded`, or after a failed attempt
/// `retrying → (started …)`, ending in `succeeded`, `failed` (attempts used up
/// on transient errors or timeouts), `dead` (permanent error, poison message,
/// delivery limit), `cancelled` or `superseded` (a newer job with the same
/// coalescing key replaced it before it ran).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    /// Published and confirmed by the broker.
    Queued,
    /// An attempt started on a worker.
    Started,
    /// Live progress of a running attempt.
    Progress,
    /// Finished with a result. Terminal.
    Succeeded,
    /// Attempts used up. Terminal; the message is kept in the dead-letter queue.
    Failed,
    /// An attempt failed and another one is scheduled.
    Retrying,
    /// Permanently failed. Terminal; the message is kept in the dead-letter queue.
    Dead,
    /// Cancelled on request. Terminal.
    Cancelled,
    /// Replaced by a newer job with the same coalescing key before it ran (or, when the
    /// job type's policy says so, while it ran). Terminal; `result.superseded_by` names it.
    Superseded,
    /// A status this build does not know (a newer minor version wrote it). Never
    /// terminal; the job's row keeps the status of its other events.
    #[serde(other)]
    Unknown,
}

impl JobStatus {
    /// Every status, in lifecycle order.
    pub const ALL: [JobStatus; 9] = [
        JobStatus::Queued,
        JobStatus::Started,
        JobStatus::Progress,
        JobStatus::Succeeded,
        JobStatus::Failed,
        JobStatus::Retrying,
        JobStatus::Dead,
        JobStatus::Cancelled,
        JobStatus::Superseded,
    ];

    /// Is this a final status?
    pub fn is_terminal(self) -> bool {
        matches!(self, JobStatus::Succeeded | JobStatus::Failed | JobStatus::Dead | JobStatus::Cancelled | JobStatus::Superseded)
    }

    /// The lower-case name, as on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Started => "started",
            JobStatus::Progress => "progress",
            JobStatus::Succeeded => "succeeded",
            JobStatus::Failed => "failed",
            JobStatus::Retrying => "retrying",
            JobStatus::Dead => "dead",
            JobStatus::Cancelled => "cancelled",
            JobStatus::Superseded => "superseded",
            JobStatus::Unknown => "unknown",
        }
    }
}

impl std::fmt::Display for JobStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for JobStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        JobStatus::ALL.into_iter().chain([JobStatus::Unknown]).find(|st| st.as_str() == s).ok_or_else(|| {
            format!("unknown status {s:?} (one of queued, started, progress, succeeded, failed, retrying, dead, cancelled, superseded)")
        })
    }
}

/// How an error should be handled; also reported in events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ErrorKind {
    /// Might work next time: retried with backoff.
    Transient,
    /// Will never work (bad params, missing dataset): dead at once.
    Permanent,
    /// The attempt ran past `timeout_s`: retried like a transient error.
    Timeout,
    /// Stopped on request: never retried.
    Cancelled,
    /// A kind this build does not know (a newer minor version wrote it).
    #[serde(other)]
    Unknown,
}

/// An error as reported in an event. Unknown fields are ignored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorInfo {
    /// Its disposition class.
    pub kind: ErrorKind,
    /// What failed, with which input.
    pub message: String,
}

/// The worker that ran an attempt, with its attributes (`node`, `gpu`, …). Unknown fields are ignored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct WorkerInfo {
    /// Unique worker id (host name and process id, or pod name).
    pub id: String,
    /// Attributes such as `node` and `gpu`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub attributes: BTreeMap<String, String>,
}

/// One state change of a job.
///
/// Never `deny_unknown_fields`: an event of a newer minor version (a worker one
/// release ahead during a rolling upgrade) must still be recorded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobEvent {
    /// Contract version: omitted means 1.0, and 1.0 is written by leaving it out, so
    /// that readers of the release before (which refused unknown fields) still read it.
    #[serde(default, skip_serializing_if = "SchemaVersion::is_current")]
    pub version: SchemaVersion,
    /// The job (a UUID string).
    pub job_id: String,
    /// Orders the events of one job; see [`event_seq`]. `(job_id, seq)` is unique.
    pub seq: u64,
    /// The job type.
    pub job_type: String,
    /// The bot.
    pub bot: String,
    /// The new status.
    pub status: JobStatus,
    /// The attempt this event belongs to (1-based; 0 for `queued`).
    pub attempt: u32,
    /// The run of the job this event belongs to: 0 as submitted, one more after each
    /// dead-letter replay (from the job message's `x-trainyard-run` header). `None` only
    /// in events of releases before runs were carried; the store then files the event by time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<u32>,
    /// The worker, for events published by one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<WorkerInfo>,
    /// When it happened.
    pub at: DateTime<Utc>,
    /// Live progress (`progress` events): free-form, e.g. epoch, loss, accuracy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<serde_json::Value>,
    /// The result (`succeeded` events), or the retry delay (`retrying`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    /// The error (`retrying`, `failed`, `dead`, `cancelled`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorInfo>,
    /// The exact job, on `queued` events, for audit and replay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<JobSpec>,
}

impl JobEvent {
    /// A bare event of run 0 for `spec` with no worker, progress, result or error.
    pub fn new(spec: &JobSpec, status: JobStatus, attempt: u32, seq: u64) -> Self {
        Self {
            version: SchemaVersion::CURRENT,
            job_id: spec.job_id.clone(),
            seq,
            job_type: spec.job_type.clone(),
            bot: spec.bot.clone(),
            status,
            attempt,
            run: Some(0),
            worker: None,
            at: Utc::now(),
            progress: None,
            result: None,
            error: None,
            spec: None,
        }
    }

    /// The `queued` event a producer publishes after the broker confirmed the job.
    pub fn queued(spec: &JobSpec) -> Self {
        let mut event = Self::new(spec, JobStatus::Queued, 0, 0);
        event.at = spec.submitted_at;
        event.spec = Some(spec.clone());
        event
    }

    /// Why this event cannot be recorded, if it cannot: a major version this build
    /// does not read, a job id that is not a UUID, a job type or bot that is not a name.
    pub fn check(&self) -> Result<(), String> {
        if !self.version.readable() {
            return Err(format!("unsupported event schema version {} (this build reads {}.x)", self.version, SchemaVersion::CURRENT.major));
        }
        let shown = |s: &str| s.chars().take(80).collect::<String>();
        if uuid::Uuid::parse_str(&self.job_id).is_err() {
            return Err(format!("job_id {:?} is not a UUID", shown(&self.job_id)));
        }
        if !valid_job_type(&self.job_type) {
            return Err(format!("job_type {:?} is not a job type name", shown(&self.job_type)));
        }
        if !self.bot.is_empty() && !valid_bot_name(&self.bot) {
            return Err(format!("bot {:?} is not a bot name", shown(&self.bot)));
        }
        Ok(())
    }

    /// The routing key on `trainyard.events`: `<job_type>.<status>`.
    pub fn routing_key(&self) -> String {
        format!("{}.{}", self.job_type, self.status)
    }
}

/// Builds the `seq` of an event so that events sort in lifecycle order across
/// attempts and broker redeliveries: attempt, then delivery (redeliveries of
/// the same attempt after a crash), then the n-th event of that run.
pub fn event_seq(attempt: u32, delivery: u32, n: u32) -> u64 {
    (u64::from(attempt.min(0xFFFF)) << 44) | (u64::from(delivery.min(0xF_FFFF)) << 24) | u64::from(n.min(0xFF_FFFF))
}

/// The `seq` used for a `dead` status recorded from a dead letter (it sorts last).
pub const DEAD_LETTER_SEQ: u64 = u64::MAX >> 1;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::Trigger;

    #[test]
    fn seq_orders_attempt_then_delivery_then_n() {
        assert!(event_seq(1, 0, 5) < event_seq(1, 1, 0));
        assert!(event_seq(1, 9, 99) < event_seq(2, 0, 0));
        assert!(event_seq(9, 9, 9) < DEAD_LETTER_SEQ);
    }

    #[test]
    fn event_json_uses_strings_and_lowercase() {
        let spec = JobSpec::new("noop", "b", serde_json::json!({}), Trigger::manual("me"));
        let ev = JobEvent::queued(&spec);
        let json = serde_json::to_value(&ev).unwrap();
        assert_eq!(json["status"], "queued");
        assert!(json["job_id"].is_string());
        assert!(json["at"].as_str().unwrap().contains('T'));
        assert_eq!(ev.routing_key(), "noop.queued");
        assert!(json.get("version").is_none(), "1.0 is written by leaving the field out");
    }

    #[test]
    fn newer_events_are_read_and_other_majors_refused() {
        let spec = JobSpec::new("noop", "b", serde_json::json!({}), Trigger::manual("me"));
        let mut v = serde_json::to_value(JobEvent::new(&spec, JobStatus::Started, 1, 7)).unwrap();
        v["version"] = "1.2".into();
        v["status"] = "paused".into();
        v["gpu_seconds"] = 12.into();
        v["worker"] = serde_json::json!({"id": "w", "zone": "eu"});
        v["error"] = serde_json::json!({"kind": "oom", "message": "m", "code": 137});
        let ev: JobEvent = serde_json::from_value(v.clone()).unwrap();
        assert_eq!((ev.status, ev.error.as_ref().unwrap().kind), (JobStatus::Unknown, ErrorKind::Unknown));
        assert!(!ev.status.is_terminal());
        ev.check().unwrap();
        v["version"] = 2.into();
        let ev: JobEvent = serde_json::from_value(v).unwrap();
        assert!(ev.check().unwrap_err().contains("version 2.0"));
        assert_eq!("unknown".parse::<JobStatus>().unwrap(), JobStatus::Unknown);
    }
}
