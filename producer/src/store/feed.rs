//! The change feed behind the console's live stream: jobs whose events were
//! recorded after a cursor, oldest change first.
//!
//! The cursor is `job_events.recorded_at` (the control plane's clock when it
//! recorded the event, microseconds), indexed, so a tail query that finds
//! nothing new costs one index probe even with a million jobs in the store.

use sqlx::{AssertSqlSafe, Row};

use super::{q, types, JobRow, Store, StoreError};

/// A job that changed, with the cursor of its latest recorded event.
#[derive(Debug, Clone)]
pub struct Change {
    /// The job as it is now.
    pub job: JobRow,
    /// When its latest event was recorded (microseconds): the stream's event id.
    pub cursor: i64,
}

impl Store {
    /// Up to `limit` jobs with an event recorded after `cursor` (microseconds), by recording time.
    pub async fn changed_since(&self, cursor: i64, limit: i64) -> Result<Vec<Change>, StoreError> {
        let sql = format!(
            "SELECT {}, rec FROM jobs JOIN (SELECT job_id AS jid, MAX(recorded_at) AS rec FROM job_events \
             WHERE recorded_at > $1 GROUP BY job_id ORDER BY rec LIMIT {}) changed ON jobs.job_id = changed.jid ORDER BY rec",
            types::JOB_COLUMNS,
            limit.clamp(1, 1000)
        );
        let rows = sqlx::query(AssertSqlSafe(sql)).bind(cursor).fetch_all(&self.pool).await.map_err(q("read the change feed"))?;
        rows.iter().map(|r| Ok(Change { job: types::job_row(r)?, cursor: r.get::<i64, _>("rec") })).collect()
    }

    /// The cursor of the latest recorded event (0 for an empty store).
    pub async fn feed_head(&self) -> Result<i64, StoreError> {
        let row =
            sqlx::query("SELECT MAX(recorded_at) FROM job_events").fetch_one(&self.pool).await.map_err(q("read the change feed head"))?;
        Ok(row.try_get::<Option<i64>, _>(0).ok().flatten().unwrap_or(0))
    }
}
