//! Schedule fires: claimed once across replicas, published, reclaimed when a claim goes stale.

use chrono::{DateTime, Utc};
use sqlx::{any::AnyRow, Row};

use super::{from_micros, micros, q, Store, StoreError};

impl Store {
    /// Claims the fire of `schedule` at `fire_at` for `job_id`. Exactly one
    /// caller, across all replicas sharing the store, gets `true`.
    pub async fn claim_schedule_fire(&self, schedule: &str, fire_at: DateTime<Utc>, job_id: &str) -> Result<bool, StoreError> {
        self.claim_schedule_fire_at(schedule, fire_at, job_id, Utc::now()).await
    }

    /// [`Store::claim_schedule_fire`] with the claim's time given.
    pub async fn claim_schedule_fire_at(
        &self,
        schedule: &str,
        fire_at: DateTime<Utc>,
        job_id: &str,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let n = sqlx::query(
            "INSERT INTO schedule_fires (schedule, fire_at, job_id, claimed_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (schedule, fire_at) DO NOTHING",
        )
        .bind(schedule)
        .bind(micros(fire_at))
        .bind(job_id)
        .bind(micros(now))
        .execute(&self.pool)
        .await
        .map_err(q(format!("claim the fire of schedule {schedule} at {fire_at}")))?
        .rows_affected();
        Ok(n == 1)
    }

    /// Fires of `schedule` claimed but not published, whose claim is older than `stale`
    /// (the replica that claimed them failed to publish, or died): (fire time, job id).
    pub async fn unpublished_fires(&self, schedule: &str, stale: DateTime<Utc>) -> Result<Vec<(DateTime<Utc>, String)>, StoreError> {
        let rows = sqlx::query(
            "SELECT fire_at, job_id FROM schedule_fires WHERE schedule = $1 AND published_at IS NULL AND claimed_at <= $2 ORDER BY fire_at",
        )
        .bind(schedule)
        .bind(micros(stale))
        .fetch_all(&self.pool)
        .await
        .map_err(q(format!("list unpublished fires of schedule {schedule}")))?;
        Ok(rows.iter().map(|r: &AnyRow| (from_micros(r.get::<i64, _>(0)), r.get::<String, _>(1))).collect())
    }

    /// Takes over the publication of an unpublished fire whose claim is older than
    /// `stale`, as of `now`. Exactly one caller across replicas gets `true` per lease.
    pub async fn reclaim_fire(
        &self,
        schedule: &str,
        fire_at: DateTime<Utc>,
        stale: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let n = sqlx::query(
            "UPDATE schedule_fires SET claimed_at = $1 WHERE schedule = $2 AND fire_at = $3 AND published_at IS NULL AND claimed_at <= $4",
        )
        .bind(micros(now))
        .bind(schedule)
        .bind(micros(fire_at))
        .bind(micros(stale))
        .execute(&self.pool)
        .await
        .map_err(q(format!("reclaim the fire of schedule {schedule} at {fire_at}")))?
        .rows_affected();
        Ok(n == 1)
    }

    /// Notes that a claimed fire was published.
    pub async fn mark_fire_published(&self, schedule: &str, fire_at: DateTime<Utc>) -> Result<(), StoreError> {
        sqlx::query("UPDATE schedule_fires SET published_at = $1 WHERE schedule = $2 AND fire_at = $3")
            .bind(micros(Utc::now()))
            .bind(schedule)
            .bind(micros(fire_at))
            .execute(&self.pool)
            .await
            .map_err(q(format!("mark the fire of schedule {schedule} published")))?;
        Ok(())
    }

    /// The latest claimed fire time of `schedule`.
    pub async fn last_schedule_fire(&self, schedule: &str) -> Result<Option<DateTime<Utc>>, StoreError> {
        let row = sqlx::query("SELECT MAX(fire_at) FROM schedule_fires WHERE schedule = $1")
            .bind(schedule)
            .fetch_one(&self.pool)
            .await
            .map_err(q(format!("read the last fire of schedule {schedule}")))?;
        Ok(row.get::<Option<i64>, _>(0).map(from_micros))
    }

    /// Fires of `schedule` claimed so far: (fire time, job id), oldest first.
    pub async fn schedule_fires(&self, schedule: &str) -> Result<Vec<(DateTime<Utc>, String)>, StoreError> {
        let rows = sqlx::query("SELECT fire_at, job_id FROM schedule_fires WHERE schedule = $1 ORDER BY fire_at")
            .bind(schedule)
            .fetch_all(&self.pool)
            .await
            .map_err(q(format!("list the fires of schedule {schedule}")))?;
        Ok(rows.iter().map(|r: &AnyRow| (from_micros(r.get::<i64, _>(0)), r.get::<String, _>(1))).collect())
    }
}

/// A fire or a match as the console shows it: (time, job id, the job's status when recorded).
pub type Fired = (DateTime<Utc>, String, Option<String>);

/// How many of a trigger kind's newest jobs [`Store::triggered_jobs`] looks through.
pub const TRIGGERED_SCAN: i64 = 10_000;

impl Store {
    /// The newest `limit` fires of `schedule` (fire time, job id, its job's status), newest first.
    pub async fn recent_schedule_fires(&self, schedule: &str, limit: i64) -> Result<Vec<Fired>, StoreError> {
        let rows = sqlx::query(
            "SELECT f.fire_at, f.job_id, j.status FROM schedule_fires f LEFT JOIN jobs j ON j.job_id = f.job_id \
             WHERE f.schedule = $1 ORDER BY f.fire_at DESC LIMIT $2",
        )
        .bind(schedule)
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(q(format!("list the recent fires of schedule {schedule}")))?;
        Ok(rows.iter().map(|r: &AnyRow| (from_micros(r.get::<i64, _>(0)), r.get::<String, _>(1), r.get::<Option<String>, _>(2))).collect())
    }

    /// The newest `limit` jobs triggered by `kind` from `source` (submission time, job id,
    /// status), newest first, among the [`TRIGGERED_SCAN`] newest jobs of that kind: the
    /// `(trigger_kind, created_at, job_id)` index bounds the read whatever the store's size.
    pub async fn triggered_jobs(&self, kind: &str, source: &str, limit: i64) -> Result<Vec<Fired>, StoreError> {
        let rows = sqlx::query(
            "SELECT created_at, job_id, status FROM (SELECT created_at, job_id, status, trigger_source FROM jobs \
             WHERE trigger_kind = $1 ORDER BY created_at DESC, job_id DESC LIMIT $2) recent \
             WHERE trigger_source = $3 ORDER BY created_at DESC, job_id DESC LIMIT $4",
        )
        .bind(kind)
        .bind(TRIGGERED_SCAN)
        .bind(source)
        .bind(limit)
        .fetch_all(&self.pool)
        .await
        .map_err(q(format!("list the jobs triggered by {source}")))?;
        Ok(rows.iter().map(|r: &AnyRow| (from_micros(r.get::<i64, _>(0)), r.get::<String, _>(1), r.get::<Option<String>, _>(2))).collect())
    }
}
