//! Reading jobs: one job, its events, filtered lists and the counts behind the metrics.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use sqlx::{AssertSqlSafe, Row};
use trainyard_common::{JobEvent, JobStatus};

use super::{from_micros, micros, q, types, JobFilter, JobRow, Store, StoreError};

/// A bound value of a built query.
enum Arg {
    Text(String),
    Int(i64),
}

impl Store {
    /// One job.
    pub async fn job(&self, job_id: &str) -> Result<Option<JobRow>, StoreError> {
        let row = sqlx::query(AssertSqlSafe(format!("SELECT {} FROM jobs WHERE job_id = $1", types::JOB_COLUMNS)))
            .bind(job_id)
            .fetch_optional(&self.pool)
            .await
            .map_err(q(format!("read job {job_id}")))?;
        row.as_ref().map(types::job_row).transpose()
    }

    /// All events of a job, every run, in order.
    pub async fn events(&self, job_id: &str) -> Result<Vec<JobEvent>, StoreError> {
        let rows = sqlx::query("SELECT body FROM job_events WHERE job_id = $1 ORDER BY run, seq")
            .bind(job_id)
            .fetch_all(&self.pool)
            .await
            .map_err(q(format!("read the events of job {job_id}")))?;
        rows.iter().map(|r| types::from_json::<JobEvent>("event", &r.get::<String, _>(0))).collect()
    }

    /// Jobs matching `filter`, newest first (`created_at DESC, job_id DESC`), from
    /// `filter.before` on. Each filter has an index ending in `(created_at, job_id)`
    /// (migration 5), so a page reads about `limit` index entries whatever the store's size.
    pub async fn list_jobs(&self, filter: &JobFilter) -> Result<Vec<JobRow>, StoreError> {
        let mut sql = format!("SELECT {} FROM jobs WHERE 1 = 1", types::JOB_COLUMNS);
        let mut args: Vec<Arg> = Vec::new();
        let mut cond = |sql_part: &str, values: Vec<Arg>| {
            let mut part = sql_part.to_string();
            for v in values {
                args.push(v);
                part = part.replacen('?', &format!("${}", args.len()), 1);
            }
            sql.push_str(" AND ");
            sql.push_str(&part);
        };
        if let Some(s) = filter.status {
            cond("status = ?", vec![Arg::Text(s.as_str().into())]);
        }
        for (column, value) in [("job_type", &filter.job_type), ("bot", &filter.bot)] {
            if let Some(v) = value {
                cond(&format!("{column} = ?"), vec![Arg::Text(v.clone())]);
            }
        }
        if let Some(k) = filter.trigger {
            cond("trigger_kind = ?", vec![Arg::Text(k.to_string())]);
        }
        if let Some(t) = filter.since {
            cond("created_at >= ?", vec![Arg::Int(micros(t))]);
        }
        if let Some(t) = filter.until {
            cond("created_at < ?", vec![Arg::Int(micros(t))]);
        }
        if let Some(p) = filter.id_prefix.as_deref().filter(|p| !p.is_empty()) {
            // The range uses the primary key (byte order: SQLite, PostgreSQL with a C collation);
            // `substr` keeps the match exact under any collation.
            let range = vec![Arg::Text(p.into()), Arg::Text(format!("{p}\u{10FFFF}")), Arg::Text(p.into())];
            cond(&format!("job_id >= ? AND job_id < ? AND substr(job_id, 1, {}) = ?", p.chars().count()), range);
        }
        if let Some(c) = &filter.before {
            cond("(created_at, job_id) < (?, ?)", vec![Arg::Int(c.created_at), Arg::Text(c.job_id.clone())]);
        }
        sql.push_str(&format!(" ORDER BY created_at DESC, job_id DESC LIMIT {}", filter.page_size()));
        let mut query = sqlx::query(AssertSqlSafe(sql)).persistent(false);
        for a in args {
            query = match a {
                Arg::Text(t) => query.bind(t),
                Arg::Int(i) => query.bind(i),
            };
        }
        let rows = query.fetch_all(&self.pool).await.map_err(q("list jobs"))?;
        rows.iter().map(types::job_row).collect()
    }

    /// Jobs running now (latest status `started` or `progress`), by job type.
    pub async fn running_by_type(&self) -> Result<BTreeMap<String, i64>, StoreError> {
        let rows = sqlx::query("SELECT job_type, COUNT(*) FROM jobs WHERE status IN ('started', 'progress') GROUP BY job_type")
            .fetch_all(&self.pool)
            .await
            .map_err(q("count running jobs"))?;
        Ok(rows.iter().map(|r| (r.get::<String, _>(0), r.get::<i64, _>(1))).collect())
    }

    /// Jobs by status, for the metrics.
    pub async fn count_by_type_and_status(&self) -> Result<Vec<(String, JobStatus, i64)>, StoreError> {
        let rows = sqlx::query("SELECT job_type, status, COUNT(*) FROM jobs GROUP BY job_type, status")
            .fetch_all(&self.pool)
            .await
            .map_err(q("count jobs by status"))?;
        Ok(rows.iter().filter_map(|r| Some((r.get::<String, _>(0), r.get::<String, _>(1).parse().ok()?, r.get::<i64, _>(2)))).collect())
    }

    /// The oldest job still `queued`, by job type (submission time).
    pub async fn oldest_queued_by_type(&self) -> Result<BTreeMap<String, DateTime<Utc>>, StoreError> {
        let rows = sqlx::query("SELECT job_type, MIN(created_at) FROM jobs WHERE status = 'queued' GROUP BY job_type")
            .fetch_all(&self.pool)
            .await
            .map_err(q("find the oldest queued jobs"))?;
        Ok(rows.iter().map(|r| (r.get::<String, _>(0), from_micros(r.get::<i64, _>(1)))).collect())
    }

    /// Is the store empty (no job)? One row looked up, not every row counted: `GET /readyz`
    /// asks this on every probe, whatever the store's size.
    pub async fn is_empty(&self) -> Result<bool, StoreError> {
        let row = sqlx::query("SELECT job_id FROM jobs LIMIT 1").fetch_optional(&self.pool).await.map_err(q("look for a job"))?;
        Ok(row.is_none())
    }
}
