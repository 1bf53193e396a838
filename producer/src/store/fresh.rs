//! The row a job would have if this batch held all its events: written as it is created,
//! so a job whose events all arrive in one batch (most jobs, under load) costs one row
//! write and its index entries once, instead of a bare row, then its spec, then its
//! projection (each rewriting the row and the indexes on the columns it sets).
//!
//! A job has a row exactly when it has recorded events (both are written in one
//! transaction, and neither is ever deleted), so a row this batch creates has no events
//! but the batch's: its projection from them is the one the store would compute.

use std::collections::{BTreeMap, HashSet};

use chrono::{DateTime, Utc};
use trainyard_common::{JobEvent, JobSpec};

use super::{from_micros, micros, projection, projection::Projection};

/// A job's row as this batch alone makes it.
pub(super) struct FreshRow<'a> {
    pub job_id: &'a str,
    pub job_type: &'a str,
    pub bot: &'a str,
    /// The newest run among the batch's events (a replay's), 0 without one.
    pub run: i64,
    /// When that run's first event happened; 0 for run 0 (as a row created at run 0 has).
    pub run_since: i64,
    /// The spec of the last of the batch's events that carries one.
    pub spec: Option<&'a JobSpec>,
    pub projection: Projection,
    /// The submission time with a spec, else the earliest event's time.
    pub created_at: i64,
    /// The submission time a terminal event of `run` reports (its duration's start): the
    /// spec among that run's events, else `created_at`.
    pub since: DateTime<Utc>,
}

/// The run an event belongs to in a row created by its batch (events of releases before
/// runs were carried belong to run 0 there).
pub(super) fn run_of(e: &JobEvent) -> i64 {
    e.run.map(i64::from).unwrap_or(0)
}

/// The fresh row of each job of `events`, by job id. Later copies of one `(job, run, seq)`
/// are duplicates and ignored, as the store ignores them.
pub(super) fn rows(events: &[JobEvent]) -> BTreeMap<&str, FreshRow<'_>> {
    let mut by_job: BTreeMap<&str, Vec<&JobEvent>> = BTreeMap::new();
    let mut seen = HashSet::with_capacity(events.len());
    for e in events {
        if seen.insert((e.job_id.as_str(), run_of(e), e.seq)) {
            by_job.entry(e.job_id.as_str()).or_default().push(e);
        }
    }
    by_job.into_iter().map(|(job_id, evs)| (job_id, row(&evs))).collect()
}

fn row<'a>(evs: &[&'a JobEvent]) -> FreshRow<'a> {
    let first = evs[0];
    let run = evs.iter().map(|e| run_of(e)).max().unwrap_or(0);
    let of_run: Vec<&JobEvent> = evs.iter().copied().filter(|e| run_of(e) == run).collect();
    let run_since = if run > 0 { of_run.iter().map(|e| micros(e.at)).min().unwrap_or(0) } else { 0 };
    let spec = evs.iter().rev().find_map(|e| e.spec.as_ref());
    let created_at = spec.map_or_else(|| evs.iter().map(|e| micros(e.at)).min().unwrap_or(0), |s| micros(s.submitted_at));
    // The run's first event (by seq) that carries a spec, as the store reads a run's events.
    let run_spec = of_run.iter().filter_map(|e| e.spec.as_ref().map(|s| (e.seq, s.submitted_at))).min_by_key(|(seq, _)| *seq);
    let since = run_spec.map_or_else(|| from_micros(created_at), |(_, at)| at);
    FreshRow {
        job_id: &first.job_id,
        job_type: &first.job_type,
        bot: &first.bot,
        run,
        run_since,
        spec,
        projection: projection::project(of_run).expect("a job of the batch has an event"),
        created_at,
        since,
    }
}

#[cfg(test)]
mod tests {
    use trainyard_common::{JobStatus, Trigger};

    use super::*;

    fn spec() -> JobSpec {
        JobSpec::new("noop", "b", serde_json::json!({}), Trigger::manual("t"))
    }

    #[test]
    fn a_whole_job_in_one_batch_is_its_final_row() {
        let s = spec();
        let started = JobEvent::new(&s, JobStatus::Started, 1, 1);
        let mut done = JobEvent::new(&s, JobStatus::Succeeded, 1, 2);
        done.result = Some(serde_json::json!({"ok": true}));
        // Out of order, with a duplicate.
        let events = vec![started.clone(), done.clone(), JobEvent::queued(&s), started];
        let rows = rows(&events);
        let row = &rows[s.job_id.as_str()];
        assert_eq!((row.projection.status, row.projection.attempts, row.run, row.run_since), (JobStatus::Succeeded, 1, 0, 0));
        assert_eq!(row.projection.result, done.result);
        assert_eq!(row.spec.map(|x| &x.job_id), Some(&s.job_id));
        assert_eq!((row.created_at, row.since), (micros(s.submitted_at), s.submitted_at));
    }

    #[test]
    fn only_the_newest_run_makes_the_row() {
        let s = spec();
        let old = JobEvent::new(&s, JobStatus::Failed, 1, 5);
        let mut replayed = JobEvent::new(&s, JobStatus::Started, 1, 1);
        replayed.run = Some(2);
        replayed.at = old.at + chrono::Duration::seconds(3);
        let events = [replayed.clone(), old.clone()];
        let rows = rows(&events);
        let row = &rows[s.job_id.as_str()];
        assert_eq!((row.run, row.run_since, row.projection.status), (2, micros(replayed.at), JobStatus::Started));
        assert!(row.spec.is_none());
        assert_eq!((row.created_at, row.since), (micros(old.at), from_micros(micros(old.at))), "no spec: created at its earliest event");
    }
}
