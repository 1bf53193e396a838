//! Dead letters: recorded from the dead-letter queues, listed, marked replayed.

use chrono::{DateTime, Utc};
use sqlx::AssertSqlSafe;

use super::{micros, q, types, DeadLetter, Store, StoreError};

impl Store {
    /// Records a dead letter (idempotent on its id; a later one for the same id replaces it).
    pub async fn record_dead_letter(&self, dl: &DeadLetter) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO dead_letters (id, job_id, job_type, bot, reason, kind, attempt, broker_dead_lettered, body_preview, at, replayed_at, body) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, NULL, $11) ON CONFLICT (id) DO UPDATE SET reason = excluded.reason, \
             kind = excluded.kind, attempt = excluded.attempt, broker_dead_lettered = excluded.broker_dead_lettered, at = excluded.at, \
             replayed_at = NULL, body = excluded.body",
        )
        // Text as received, with what the database refuses (NUL) escaped.
        .bind(types::text(&dl.id))
        .bind(dl.job_id.as_deref().map(types::text))
        .bind(types::text(&dl.job_type))
        .bind(dl.bot.as_deref().map(types::text))
        .bind(types::text(&dl.reason))
        .bind(types::text(&dl.kind))
        .bind(i64::from(dl.attempt))
        .bind(i64::from(dl.broker_dead_lettered))
        .bind(types::text(&dl.body_preview))
        .bind(micros(dl.at))
        .bind(dl.body.clone())
        .execute(&self.pool)
        .await
        .map_err(q(format!("record dead letter {}", dl.id)))?;
        Ok(())
    }

    /// Dead letters not replayed yet, newest first, optionally of one job type.
    pub async fn dead_letters(&self, job_type: Option<&str>) -> Result<Vec<DeadLetter>, StoreError> {
        let cols = "id, job_id, job_type, bot, reason, kind, attempt, broker_dead_lettered, body_preview, at, replayed_at, body";
        let rows = match job_type {
            Some(t) => {
                sqlx::query(AssertSqlSafe(format!(
                    "SELECT {cols} FROM dead_letters WHERE replayed_at IS NULL AND job_type = $1 ORDER BY at DESC"
                )))
                .bind(t.to_string())
                .fetch_all(&self.pool)
                .await
            }
            None => {
                sqlx::query(AssertSqlSafe(format!("SELECT {cols} FROM dead_letters WHERE replayed_at IS NULL ORDER BY at DESC")))
                    .fetch_all(&self.pool)
                    .await
            }
        }
        .map_err(q("list dead letters"))?;
        Ok(rows.iter().map(types::dead_letter).collect())
    }

    /// Marks the dead letter of `id` as replayed.
    pub async fn mark_replayed(&self, id: &str, at: DateTime<Utc>) -> Result<(), StoreError> {
        sqlx::query("UPDATE dead_letters SET replayed_at = $1 WHERE id = $2")
            .bind(micros(at))
            .bind(id)
            .execute(&self.pool)
            .await
            .map_err(q(format!("mark dead letter {id} replayed")))?;
        Ok(())
    }
}
