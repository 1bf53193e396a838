//! What the admission step reads from the store when it (re)starts.

use sqlx::Row;

use super::{q, Store, StoreError};

impl Store {
    /// Jobs of `job_type` started on a worker and not finished (`started`, `progress`,
    /// `retrying`): job id and bot.
    pub async fn unfinished_started(&self, job_type: &str) -> Result<Vec<(String, String)>, StoreError> {
        let rows = sqlx::query("SELECT job_id, bot FROM jobs WHERE job_type = $1 AND status IN ('started', 'progress', 'retrying')")
            .bind(job_type)
            .fetch_all(&self.pool)
            .await
            .map_err(q(format!("read the unfinished jobs of {job_type}")))?;
        Ok(rows.iter().map(|r| (r.get::<String, _>(0), r.get::<String, _>(1))).collect())
    }
}
