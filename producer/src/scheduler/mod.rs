//! Cron schedules. Each fire has a deterministic job id (UUID v5 of the
//! schedule name and fire time) and is claimed in the job store before it is
//! published (`schedule_fires`, unique on schedule + fire time): replicas
//! sharing a store never fire a schedule twice.
//!
//! A fire whose publication failed (broker down at fire time) stays claimed but
//! unpublished; every tick retries such fires whose claim is older than
//! [`RETRY_AFTER`], taking the retry over with a conditional update so that one
//! replica at a time publishes it, until it is published. The claim is a lease:
//! it is stamped when its publish starts (not when the tick started), a publish
//! is given up after [`PUBLISH_TIMEOUT`], well inside the lease, and noting a
//! published fire is tried a few times before the lease can run out, so no other
//! replica publishes a fire while its first publish may still land.
//!
//! The clock is injected: [`Scheduler::tick`] takes `now`, so the logic is
//! tested without sleeping.

mod times;

use std::{collections::HashMap, time::Duration};

use chrono::{DateTime, Utc};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use trainyard_common::{metrics::ControlMetrics, JobSpec};

pub use times::{due, Due, GRACE};

use crate::{
    config::{parse_cron, MissedFire, ScheduleConfig},
    store::Store,
    submit::Submitter,
};

/// A claimed fire still unpublished this long after its claim is retried (by any replica).
pub const RETRY_AFTER: chrono::TimeDelta = chrono::TimeDelta::seconds(30);

/// How long one publish of a fire may take before it is given up (and retried after
/// [`RETRY_AFTER`]): a broker failing over can hold a confirm for seconds.
pub const PUBLISH_TIMEOUT: Duration = Duration::from_secs(15);

/// How long one attempt to note a published fire may take: with its retries (~3 s of waits)
/// all of them stay inside what the lease leaves after the publish.
pub const NOTE_TIMEOUT: Duration = Duration::from_secs(2);

/// Errors of a scheduler tick.
#[derive(Debug, thiserror::Error)]
pub enum ScheduleError {
    /// Store trouble.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// Broker trouble.
    #[error("failed to publish the fire of schedule {schedule} at {at}: {source}")]
    Publish {
        /// Schedule.
        schedule: String,
        /// Fire time.
        at: DateTime<Utc>,
        /// Cause.
        source: trainyard_common::CommonError,
    },
    /// The broker did not confirm within [`PUBLISH_TIMEOUT`].
    #[error("the fire of schedule {schedule} at {at} was not confirmed within {} s; retried after the claim's lease", PUBLISH_TIMEOUT.as_secs())]
    PublishTimedOut {
        /// Schedule.
        schedule: String,
        /// Fire time.
        at: DateTime<Utc>,
    },
}

struct Parsed {
    cfg: ScheduleConfig,
    cron: cron::Schedule,
    tz: chrono_tz::Tz,
}

/// Fires cron schedules.
pub struct Scheduler {
    schedules: Vec<Parsed>,
    store: Store,
    submitter: Submitter,
    metrics: Option<ControlMetrics>,
    last: Mutex<HashMap<String, DateTime<Utc>>>,
    /// When it first ticked: fires missed after it were missed while it ran.
    running_since: std::sync::OnceLock<DateTime<Utc>>,
}

impl std::fmt::Debug for Scheduler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler").field("schedules", &self.schedules.len()).finish_non_exhaustive()
    }
}

/// The job id of the fire of `schedule` at `at`: the same on every replica.
pub fn fire_job_id(schedule: &str, at: DateTime<Utc>) -> String {
    uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_URL, format!("trainyard-schedule:{schedule}@{}", at.to_rfc3339()).as_bytes()).to_string()
}

/// The first fire time of `cfg` after `after`; `None` for an expression that never fires again
/// or a schedule the config loader would refuse.
pub fn next_fire(cfg: &ScheduleConfig, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
    let cron = parse_cron(&cfg.cron).ok()?;
    let tz = cfg.timezone.parse::<chrono_tz::Tz>().ok()?;
    // Bound first: the iterator borrows `cron`, which a tail expression would outlive.
    let next = times::after(&cron, tz, after).next();
    next
}

/// Which of the `due` fires to fire under `policy`: those on time; with `fire_once`, also the
/// latest missed one when none is on time. A missed fire that came due after `running_since`
/// (when this scheduler first ticked) is fired late whatever the policy, beside those on time:
/// its ticks failed or came late (a store failing over, a paused VM), and the policy is for
/// fires missed while no control plane ran; a fire claimed but not published (a broker outage)
/// is published late the same way.
pub fn select_fires(due: &Due, policy: MissedFire, running_since: DateTime<Utc>) -> Vec<DateTime<Utc>> {
    let mut out = due.on_time.clone();
    match due.latest_missed {
        Some(t) if t > running_since => out.insert(0, t),
        Some(t) if policy == MissedFire::FireOnce && out.is_empty() => out.push(t),
        _ => {}
    }
    out
}

impl Scheduler {
    /// A scheduler of `schedules` (already validated by the config loader; bad ones are skipped with an error log).
    pub fn new(schedules: Vec<ScheduleConfig>, store: Store, submitter: Submitter, metrics: Option<ControlMetrics>) -> Self {
        let schedules = schedules
            .into_iter()
            .filter_map(|cfg| match (parse_cron(&cfg.cron), cfg.timezone.parse::<chrono_tz::Tz>()) {
                (Ok(cron), Ok(tz)) => Some(Parsed { cfg, cron, tz }),
                (Err(e), _) => {
                    tracing::error!(schedule = %cfg.name, error = %e, "schedule ignored");
                    None
                }
                (_, Err(e)) => {
                    tracing::error!(schedule = %cfg.name, error = %e, "schedule ignored");
                    None
                }
            })
            .collect();
        Self { schedules, store, submitter, metrics, last: Mutex::new(HashMap::new()), running_since: Default::default() }
    }

    /// Fires what is due at `now`; returns the jobs this instance published.
    /// The first tick of a schedule starts from its last recorded fire (so
    /// missed fires apply), or from `now` when it never fired.
    pub async fn tick(&self, now: DateTime<Utc>) -> Result<Vec<JobSpec>, ScheduleError> {
        // A claim is stamped when its publish starts: the earlier fires of a tick take time.
        let started = std::time::Instant::now();
        let claim_time = || now + chrono::TimeDelta::from_std(started.elapsed()).unwrap_or_default();
        let mut published = Vec::new();
        let mut failed = None;
        let mut last = self.last.lock().await;
        let running_since = *self.running_since.get_or_init(|| now);
        for s in &self.schedules {
            // Fires claimed earlier whose publication failed: until published.
            let stale = now - RETRY_AFTER;
            for (at, job_id) in self.store.unpublished_fires(&s.cfg.name, stale).await? {
                if !self.store.reclaim_fire(&s.cfg.name, at, stale, claim_time()).await? {
                    continue; // Another replica is retrying it.
                }
                match self.publish_unless_known(s, at, job_id).await {
                    Ok(spec) => published.extend(spec),
                    Err(e) => failed = Some(e),
                }
            }
            let from = match last.get(&s.cfg.name) {
                Some(t) => *t,
                None => self.store.last_schedule_fire(&s.cfg.name).await?.unwrap_or(now),
            };
            for at in select_fires(&due(&s.cron, s.tz, from, now), s.cfg.missed, running_since) {
                let job_id = fire_job_id(&s.cfg.name, at);
                if !self.store.claim_schedule_fire_at(&s.cfg.name, at, &job_id, claim_time()).await? {
                    continue; // Another replica has it.
                }
                match self.publish_unless_known(s, at, job_id).await {
                    Ok(spec) => published.extend(spec),
                    // Claimed, not published: a later tick retries it.
                    Err(e) => failed = Some(e),
                }
            }
            last.insert(s.cfg.name.clone(), now);
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(published),
        }
    }

    /// Publishes a fire this replica claimed, unless the store already has its job: a retried
    /// claim whose publish landed (confirmed late, or its note failed), or a fire after a
    /// restore from a backup (claims are not rebuilt, jobs are, from the stream), which was
    /// claimed again as missed. Publishing it again would run the job twice, at once while
    /// the first copy is queued or running.
    async fn publish_unless_known(&self, s: &Parsed, at: DateTime<Utc>, job_id: String) -> Result<Option<JobSpec>, ScheduleError> {
        if self.store.job(&job_id).await?.is_some() {
            self.note_published(s, at).await?;
            return Ok(None);
        }
        self.publish(s, at, job_id).await.map(Some)
    }

    /// Publishes the fire of `s` at `at` (claimed by this replica) and notes it published.
    async fn publish(&self, s: &Parsed, at: DateTime<Utc>, job_id: String) -> Result<JobSpec, ScheduleError> {
        let mut spec = s.cfg.job_spec();
        spec.job_id = job_id;
        let failed = |source| ScheduleError::Publish { schedule: s.cfg.name.clone(), at, source };
        match tokio::time::timeout(PUBLISH_TIMEOUT, self.submitter.submit(&spec)).await {
            Ok(sent) => sent.map_err(failed)?,
            Err(_) => return Err(ScheduleError::PublishTimedOut { schedule: s.cfg.name.clone(), at }),
        }
        self.note_published(s, at).await?;
        if let Some(m) = &self.metrics {
            m.schedule_fires.with_label_values(&[s.cfg.name.as_str()]).inc();
            m.jobs_submitted.with_label_values(&[spec.job_type.as_str(), "schedule"]).inc();
        }
        tracing::info!(schedule = %s.cfg.name, fire_at = %at, job_id = %spec.job_id, "schedule fired");
        Ok(spec)
    }

    /// Notes a published fire, trying up to five times, each attempt bounded by [`NOTE_TIMEOUT`]
    /// and ~3 s of waits in all, so that publish and note stay inside the lease: a store busy
    /// for a moment must not leave the fire unpublished for another replica to publish again.
    async fn note_published(&self, s: &Parsed, at: DateTime<Utc>) -> Result<(), ScheduleError> {
        let mut wait = Duration::from_millis(200);
        loop {
            let noted = tokio::time::timeout(NOTE_TIMEOUT, self.store.mark_fire_published(&s.cfg.name, at)).await;
            let timed_out = || crate::store::StoreError::Query { what: "note a published fire".into(), source: sqlx::Error::PoolTimedOut };
            match noted.unwrap_or_else(|_| Err(timed_out())) {
                Ok(()) => return Ok(()),
                Err(e) if wait <= Duration::from_millis(1600) => {
                    tracing::warn!(schedule = %s.cfg.name, fire_at = %at, error = %e, "noting a published fire failed; trying again");
                    tokio::time::sleep(wait).await;
                    wait *= 2;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Ticks every second until `shutdown`.
    pub async fn run(&self, shutdown: CancellationToken) {
        loop {
            if let Err(e) = self.tick(Utc::now()).await {
                tracing::error!(error = %e, "scheduler tick failed");
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    #[test]
    fn missed_fires_follow_the_policy() {
        let cron = parse_cron("0 * * * *").unwrap();
        let due_at = |now| due(&cron, chrono_tz::UTC, t("2025-12-31T23:30:00Z"), t(now));
        // Started before the last fire, at 23:30, or after it, at 03:10.
        let (before, after) = (t("2025-12-31T23:30:00Z"), t("2026-01-01T03:10:00Z"));
        let on_time = due_at("2026-01-01T02:00:30Z");
        assert_eq!(on_time.latest_missed, Some(t("2026-01-01T01:00:00Z")));
        for policy in [MissedFire::Skip, MissedFire::FireOnce] {
            assert_eq!(select_fires(&on_time, policy, after), vec![t("2026-01-01T02:00:00Z")], "{policy:?}");
        }
        let later = due_at("2026-01-01T03:30:00Z");
        assert!(select_fires(&later, MissedFire::Skip, after).is_empty());
        assert_eq!(select_fires(&later, MissedFire::FireOnce, after), vec![t("2026-01-01T03:00:00Z")]);
        // Running since before it (the store failed at fire time): fired late, not skipped,
        // and beside a fire on time.
        assert_eq!(select_fires(&later, MissedFire::Skip, before), vec![t("2026-01-01T03:00:00Z")]);
        assert_eq!(select_fires(&on_time, MissedFire::Skip, before), vec![t("2026-01-01T01:00:00Z"), t("2026-01-01T02:00:00Z")]);
    }

    #[test]
    fn fire_ids_are_deterministic_and_time_zones_apply() {
        let at = t("2026-03-01T02:00:00Z");
        assert_eq!(fire_job_id("a", at), fire_job_id("a", at));
        assert_ne!(fire_job_id("a", at), fire_job_id("b", at));
        let cfg: ScheduleConfig =
            toml::from_str("name = 'n'\ncron = '0 2 * * *'\ntimezone = 'Europe/Berlin'\njob_type = 'noop'\nbot = 'b'").unwrap();
        assert_eq!(next_fire(&cfg, at), Some(t("2026-03-02T01:00:00Z"))); // 02:00 in Berlin (UTC+1).
    }
}
