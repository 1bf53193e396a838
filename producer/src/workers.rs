//! The live workers, from their heartbeats ([`trainyard_common::heartbeat`]).
//!
//! Each control-plane replica consumes the heartbeats exchange from an exclusive, auto-delete
//! queue of its own and keeps the latest heartbeat of every worker in memory ([`WorkerTable`]);
//! nothing is written to the job store. A worker is `gone` when it said goodbye or when nothing
//! came from it for [`MISSED_BEATS`] of its intervals (at most 30 s); gone workers are forgotten
//! after [`FORGET_AFTER`]. A replica that just started knows every live worker after one interval.

use std::{
    collections::BTreeMap,
    sync::{Arc, RwLock},
    time::Duration,
};

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use trainyard_common::{
    heartbeat::{Heartbeat, MISSED_BEATS},
    topology::Topology,
};

/// Gone workers are dropped from the table after this long.
pub const FORGET_AFTER: Duration = Duration::from_secs(600);

/// A worker as the console shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct WorkerRow {
    /// Its latest heartbeat.
    #[serde(flatten)]
    pub beat: Heartbeat,
    /// When this control plane received it.
    pub last_seen: DateTime<Utc>,
    /// `live` or `gone`.
    pub state: &'static str,
}

/// A worker's latest heartbeat and when it arrived.
type Seen = (Heartbeat, DateTime<Utc>);

/// The latest heartbeat of each worker, by worker id.
#[derive(Debug, Clone, Default)]
pub struct WorkerTable {
    seen: Arc<RwLock<BTreeMap<String, Seen>>>,
}

impl WorkerTable {
    /// Records a heartbeat received at `now`.
    pub fn record(&self, beat: Heartbeat, now: DateTime<Utc>) {
        if let Ok(mut seen) = self.seen.write() {
            seen.insert(beat.worker.id.clone(), (beat, now));
            seen.retain(|_, (_, at)| now - *at < chrono::Duration::from_std(FORGET_AFTER).unwrap_or_default());
        }
    }

    /// The jobs live workers hold and have not started, by job type (their heartbeats' `waiting`).
    pub fn waiting_by_type(&self, now: DateTime<Utc>) -> std::collections::BTreeMap<String, i64> {
        let mut out = std::collections::BTreeMap::new();
        for row in self.rows(now).into_iter().filter(|r| r.state == "live") {
            for (t, n) in row.beat.waiting {
                *out.entry(t).or_default() += n as i64;
            }
        }
        out
    }

    /// Every known worker at `now`, live ones first, then by id.
    pub fn rows(&self, now: DateTime<Utc>) -> Vec<WorkerRow> {
        let seen = match self.seen.read() {
            Ok(s) => s.clone(),
            Err(_) => return Vec::new(),
        };
        let mut rows: Vec<WorkerRow> = seen
            .into_values()
            .map(|(beat, last_seen)| {
                let silent = (now - last_seen).num_milliseconds() as f64 / 1000.0;
                let gone = beat.goodbye || silent > (beat.interval_s * u64::from(MISSED_BEATS)) as f64;
                WorkerRow { beat, last_seen, state: if gone { "gone" } else { "live" } }
            })
            .collect();
        rows.sort_by(|a, b| (a.state != "live", &a.beat.worker.id).cmp(&(b.state != "live", &b.beat.worker.id)));
        rows
    }

    /// Consumes the heartbeats exchange into the table until `shutdown`, reconnecting when lost
    /// (not counted in `trainyard_amqp_reconnects_total`, which counts the recorder's and the
    /// trigger listener's: one outage counted once per consumer set off its alert too soon).
    pub async fn run(&self, url: &str, topology: &Topology, shutdown: CancellationToken) {
        crate::fanout::run("heartbeats", url, &topology.heartbeats_exchange(), None, shutdown, |body| {
            match serde_json::from_slice::<Heartbeat>(body) {
                Ok(beat) => self.record(beat, Utc::now()),
                Err(e) => tracing::warn!(error = %e, "ignored a message on the heartbeats exchange that is not a heartbeat"),
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trainyard_common::WorkerInfo;

    fn beat(id: &str, interval_s: u64, goodbye: bool, now: DateTime<Utc>) -> Heartbeat {
        Heartbeat {
            worker: WorkerInfo { id: id.into(), attributes: Default::default() },
            host: "h".into(),
            pod: None,
            job_types: vec!["noop".into()],
            device: "cpu".into(),
            slots: 1,
            slots_in_use: 0,
            current_jobs: vec![],
            waiting: [("noop".to_string(), 2)].into(),
            version: "0".into(),
            interval_s,
            sent_at: now,
            goodbye,
        }
    }

    /// The jobs held and not started are summed over the live workers only.
    #[test]
    fn waiting_jobs_are_summed_over_live_workers() {
        let t0 = Utc::now();
        let table = WorkerTable::default();
        table.record(beat("a", 5, false, t0), t0);
        table.record(beat("b", 5, false, t0), t0);
        table.record(beat("c", 5, true, t0), t0);
        assert_eq!(table.waiting_by_type(t0 + chrono::Duration::seconds(1)), [("noop".to_string(), 4)].into());
        assert!(table.waiting_by_type(t0 + chrono::Duration::seconds(16)).is_empty(), "all gone");
    }

    #[test]
    fn a_worker_is_gone_after_three_missed_intervals_or_a_goodbye_and_forgotten_later() {
        let t0 = Utc::now();
        let table = WorkerTable::default();
        table.record(beat("a", 5, false, t0), t0);
        table.record(beat("b", 5, true, t0), t0);
        let states = |at| table.rows(at).into_iter().map(|r| (r.beat.worker.id, r.state)).collect::<Vec<_>>();
        assert_eq!(states(t0 + chrono::Duration::seconds(14)), [("a".into(), "live"), ("b".to_string(), "gone")]);
        assert_eq!(states(t0 + chrono::Duration::seconds(16)), [("a".into(), "gone"), ("b".to_string(), "gone")]);
        let later = t0 + chrono::Duration::seconds(601);
        table.record(beat("c", 5, false, later), later);
        assert_eq!(states(later), [("c".to_string(), "live")], "gone workers are forgotten after FORGET_AFTER");
    }
}
