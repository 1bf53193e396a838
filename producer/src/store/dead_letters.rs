//! Dead letters: recorded from the dead-letter queues, listed, marked replayed.

use chrono::{DateTime, Utc};
use sqlx::AssertSqlSafe;

use super::{micros, q, types, DeadLetter, JobCursor, Store, StoreError};

/// The columns of a dead letter, in the order [`types::dead_letter`] reads them.
const COLS: &str = "id, job_id, job_type, bot, reason, kind, attempt, broker_dead_lettered, body_preview, at, replayed_at, body, run";

impl Store {
    /// Records a dead letter (idempotent on its id). A letter of a later run of its job
    /// replaces the one there and lists again; one of an earlier run than the letter there
    /// changes nothing, and one of a run its job has gone past (replayed while the recorder
    /// had not taken this copy yet) is recorded as replayed: it used to list for good, and
    /// replaying it answered that it is not in its queue. A copy of a letter already marked
    /// replayed, of the same run, leaves the mark.
    pub async fn record_dead_letter(&self, dl: &DeadLetter) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO dead_letters (id, job_id, job_type, bot, reason, kind, attempt, broker_dead_lettered, body_preview, at, \
             replayed_at, body, run) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, \
             CASE WHEN (SELECT run FROM jobs WHERE job_id = $2) > $12 THEN $10 ELSE NULL END, $11, $12) \
             ON CONFLICT (id) DO UPDATE SET job_id = excluded.job_id, job_type = excluded.job_type, bot = excluded.bot, \
             reason = excluded.reason, kind = excluded.kind, attempt = excluded.attempt, \
             broker_dead_lettered = excluded.broker_dead_lettered, body_preview = excluded.body_preview, at = excluded.at, \
             replayed_at = CASE WHEN excluded.run = dead_letters.run THEN COALESCE(dead_letters.replayed_at, excluded.replayed_at) \
             ELSE excluded.replayed_at END, body = excluded.body, run = excluded.run WHERE excluded.run >= dead_letters.run",
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
        .bind(i64::from(dl.run))
        .execute(&self.pool)
        .await
        .map_err(q(format!("record dead letter {}", dl.id)))?;
        Ok(())
    }

    /// Dead letters not replayed yet, newest first, optionally of one job type; their text as
    /// it was recorded: every one, as one page ([`Self::dead_letters_page`]).
    pub async fn dead_letters(&self, job_type: Option<&str>) -> Result<Vec<DeadLetter>, StoreError> {
        self.dead_letters_page(job_type, None, i64::MAX).await
    }

    /// A page of the dead letters not replayed yet, newest first (by `at`, then `id`),
    /// optionally of one job type: at most `limit`, after `before` (the position of the last
    /// letter of the page before, `<at µs>:<id>`). The whole list, bodies and all, made one
    /// answer of any size.
    pub async fn dead_letters_page(
        &self,
        job_type: Option<&str>,
        before: Option<&JobCursor>,
        limit: i64,
    ) -> Result<Vec<DeadLetter>, StoreError> {
        let mut n = 0;
        let mut param = || {
            n += 1;
            format!("${n}")
        };
        let mut conds = vec!["replayed_at IS NULL".to_string()];
        if job_type.is_some() {
            conds.push(format!("job_type = {}", param()));
        }
        if before.is_some() {
            let (at, same_at, id) = (param(), param(), param());
            conds.push(format!("(at < {at} OR (at = {same_at} AND id < {id}))"));
        }
        let sql = format!("SELECT {COLS} FROM dead_letters WHERE {} ORDER BY at DESC, id DESC LIMIT {}", conds.join(" AND "), param());
        let mut query = sqlx::query(AssertSqlSafe(sql));
        if let Some(t) = job_type {
            query = query.bind(types::text(t));
        }
        if let Some(c) = before {
            query = query.bind(c.created_at).bind(c.created_at).bind(types::text(&c.job_id));
        }
        let rows = query.bind(limit).fetch_all(&self.pool).await.map_err(q("list dead letters"))?;
        Ok(rows.iter().map(types::dead_letter).collect())
    }

    /// Marks the dead letter of `id` as replayed.
    pub async fn mark_replayed(&self, id: &str, at: DateTime<Utc>) -> Result<(), StoreError> {
        sqlx::query("UPDATE dead_letters SET replayed_at = $1 WHERE id = $2")
            .bind(micros(at))
            .bind(types::text(id))
            .execute(&self.pool)
            .await
            .map_err(q(format!("mark dead letter {id} replayed")))?;
        Ok(())
    }
}
