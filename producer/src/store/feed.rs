//! The change feed behind the console's live stream: jobs whose events were
//! recorded after a cursor, oldest change first.
//!
//! The cursor is `job_events.recorded_at` (the control plane's clock when it
//! recorded the event, microseconds), indexed, so a tail query that finds
//! nothing new costs one index probe even with a million jobs in the store.

use sqlx::{AssertSqlSafe, Row};

use super::{q, types, JobRow, Store, StoreError};

/// The most jobs [`Store::changed_at`] answers: a recorder batch holds at most 1,024 events,
/// and replicas recording in the same microsecond are rare.
pub const SAME_CURSOR_MAX: i64 = 10_000;

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
        self.changes("recorded_at > $1", "", cursor, limit.clamp(1, 1000)).await
    }

    /// Every job whose latest event was recorded at `cursor`, up to [`SAME_CURSOR_MAX`]: a
    /// whole recorder batch is stamped with one time, and a page of [`Store::changed_since`]
    /// full of one cursor cannot say where it stopped among them.
    pub async fn changed_at(&self, cursor: i64) -> Result<Vec<Change>, StoreError> {
        self.changes("recorded_at >= $1", "HAVING MAX(recorded_at) = $1", cursor, SAME_CURSOR_MAX).await
    }

    async fn changes(&self, filter: &str, having: &str, cursor: i64, limit: i64) -> Result<Vec<Change>, StoreError> {
        let sql = format!(
            "SELECT {}, rec FROM jobs JOIN (SELECT job_id AS jid, MAX(recorded_at) AS rec FROM job_events \
             WHERE {filter} GROUP BY job_id {having} ORDER BY rec LIMIT {limit}) changed ON jobs.job_id = changed.jid ORDER BY rec",
            types::JOB_COLUMNS,
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
