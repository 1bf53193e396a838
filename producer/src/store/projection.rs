//! The job row as a projection of its events, safe against any arrival order.
//!
//! Events of one run of a job are folded in `seq` order; a terminal status
//! (`succeeded`, `failed`, `dead`, `cancelled`) wins over any later or earlier
//! non-terminal one, and among the rest the latest by `seq` wins; a status this
//! build does not know (`unknown`, from a newer minor version) sets the row's
//! status only when the run has no other. The same set
//! of events gives the same row whatever order they arrived in.

use chrono::{DateTime, Utc};
use trainyard_common::{ErrorInfo, JobEvent, JobStatus, WorkerInfo};

/// What the events of one run say about a job.
#[derive(Debug, Clone, PartialEq)]
pub struct Projection {
    /// Current status.
    pub status: JobStatus,
    /// The `seq` of the event that set it.
    pub status_seq: u64,
    /// Attempts made so far (highest attempt seen).
    pub attempts: u32,
    /// The worker of the latest event that had one.
    pub worker: Option<WorkerInfo>,
    /// The latest progress.
    pub progress: Option<serde_json::Value>,
    /// The result of a `succeeded` (or `superseded`) event.
    pub result: Option<serde_json::Value>,
    /// The error of the status event, or of the latest event that had one.
    pub error: Option<ErrorInfo>,
    /// When the first attempt started.
    pub started_at: Option<DateTime<Utc>>,
    /// When the job reached its terminal status.
    pub finished_at: Option<DateTime<Utc>>,
    /// Time of the latest event.
    pub updated_at: DateTime<Utc>,
}

/// Folds the events of one run. `None` when there are none.
pub fn project<'a>(events: impl IntoIterator<Item = &'a JobEvent>) -> Option<Projection> {
    let mut sorted: Vec<&JobEvent> = events.into_iter().collect();
    sorted.sort_by_key(|e| e.seq);
    let last = *sorted.last()?;
    let status_event = sorted
        .iter()
        .rev()
        .find(|e| e.status.is_terminal())
        .or_else(|| sorted.iter().rev().find(|e| e.status != JobStatus::Unknown))
        .copied()
        .unwrap_or(last);
    let mut p = Projection {
        status: status_event.status,
        status_seq: status_event.seq,
        attempts: sorted.iter().map(|e| e.attempt).max().unwrap_or(0),
        worker: None,
        progress: None,
        result: None,
        error: None,
        started_at: sorted.iter().filter(|e| e.status == JobStatus::Started).map(|e| e.at).min(),
        finished_at: status_event.status.is_terminal().then_some(status_event.at),
        updated_at: sorted.iter().map(|e| e.at).max().unwrap_or(last.at),
    };
    for e in &sorted {
        if e.worker.is_some() {
            p.worker = e.worker.clone();
        }
        if e.progress.is_some() {
            p.progress = e.progress.clone();
        }
        if e.error.is_some() {
            p.error = e.error.clone();
        }
    }
    if status_event.error.is_some() {
        p.error = status_event.error.clone();
    }
    if matches!(status_event.status, JobStatus::Succeeded | JobStatus::Superseded) {
        // A superseded job's result names the job that replaced it.
        p.result = status_event.result.clone();
        p.error = None;
    }
    Some(p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use trainyard_common::{event::event_seq, JobSpec, Trigger};

    fn ev(spec: &JobSpec, status: JobStatus, attempt: u32, n: u32) -> JobEvent {
        let seq = if status == JobStatus::Queued { 0 } else { event_seq(attempt, 0, n) };
        JobEvent::new(spec, status, attempt, seq)
    }

    #[test]
    fn any_order_gives_the_same_projection() {
        let spec = JobSpec::new("noop", "b", serde_json::json!({}), Trigger::manual("t"));
        let mut done = ev(&spec, JobStatus::Succeeded, 1, 3);
        done.result = Some(serde_json::json!({"ok": true}));
        let events =
            vec![ev(&spec, JobStatus::Queued, 0, 0), ev(&spec, JobStatus::Started, 1, 0), ev(&spec, JobStatus::Progress, 1, 1), done];
        let forward = project(&events).unwrap();
        let mut backward = events.clone();
        backward.reverse();
        assert_eq!(project(&backward).unwrap(), forward);
        assert_eq!(forward.status, JobStatus::Succeeded);
        assert_eq!(forward.attempts, 1);
        assert_eq!(forward.result, Some(serde_json::json!({"ok": true})));
        // A late progress event (higher seq, e.g. redelivery) does not undo a terminal status.
        let mut late = events.clone();
        late.push(ev(&spec, JobStatus::Progress, 1, 9));
        assert_eq!(project(&late).unwrap().status, JobStatus::Succeeded);
    }

    #[test]
    fn latest_non_terminal_wins_without_terminal() {
        let spec = JobSpec::new("noop", "b", serde_json::json!({}), Trigger::manual("t"));
        let events = vec![ev(&spec, JobStatus::Retrying, 1, 2), ev(&spec, JobStatus::Started, 2, 0), ev(&spec, JobStatus::Started, 1, 0)];
        let p = project(&events).unwrap();
        assert_eq!((p.status, p.attempts), (JobStatus::Started, 2));
        assert!(project(&[]).is_none());
        // A status of a newer minor version is kept as an event but does not hide the known one.
        let mut later = events.clone();
        later.push(ev(&spec, JobStatus::Unknown, 2, 5));
        assert_eq!(project(&later).unwrap().status, JobStatus::Started);
        assert_eq!(project(&later[3..]).unwrap().status, JobStatus::Unknown);
    }
}
