//! The job store: a projection of the event stream into SQL (sqlx `Any`).
//!
//! SQLite by default (`sqlite://PATH`, the file is created when missing), or
//! PostgreSQL (`postgres://…`) for several control-plane replicas; the same
//! portable SQL runs on both. The schema is embedded ([`schema`]) and applied
//! at start-up.
//!
//! - Events are inserted idempotently on `(job_id, run, seq)`: a redelivered
//!   event is a no-op. `run` counts dead-letter replays of the same job id
//!   (0 until the first replay), so a replayed job's new events never collide
//!   with the old ones.
//! - The job row is recomputed from the events of its current run
//!   ([`projection`]): terminal statuses win, the latest by `seq` among the rest.
//! - A store can be rebuilt from the `events.log` stream (see `rebuild`).

pub mod projection;
pub mod schema;
mod types;

use std::{collections::BTreeMap, path::Path};

use chrono::{DateTime, Utc};
use sqlx::{
    any::{AnyPoolOptions, AnyRow},
    AnyPool, AssertSqlSafe, Row,
};
use trainyard_common::{JobEvent, JobStatus};

pub use types::{from_micros, micros, DeadLetter, JobFilter, JobRow};

/// Default store, under the data directory of the control plane.
pub const DEFAULT_DATABASE_URL: &str = "sqlite://./.trainyard/trainyard.db";

/// Errors of the job store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The URL names no supported database.
    #[error("unsupported database URL {0:?} (expected sqlite://PATH or postgres://…)")]
    Url(String),
    /// Connecting failed.
    #[error("failed to open the job store at {url}: {source}")]
    Open {
        /// The URL, credentials redacted.
        url: String,
        /// The cause.
        source: sqlx::Error,
    },
    /// A query failed.
    #[error("failed to {what}: {source}")]
    Query {
        /// What we were doing.
        what: String,
        /// The cause.
        source: sqlx::Error,
    },
    /// A stored document did not decode.
    #[error("failed to decode stored {what}: {reason}")]
    Decode {
        /// Which document.
        what: &'static str,
        /// Why.
        reason: String,
    },
}

fn q(what: impl Into<String>) -> impl FnOnce(sqlx::Error) -> StoreError {
    let what = what.into();
    move |source| StoreError::Query { what, source }
}

/// What [`Store::record_events`] did with one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recorded {
    /// `false` when the event was already recorded (a duplicate).
    pub new: bool,
    /// For a new terminal event of the job's current run: when the job was submitted (its duration's start).
    pub since: Option<DateTime<Utc>>,
}

/// Which database is behind the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// An SQLite file.
    Sqlite,
    /// PostgreSQL.
    Postgres,
}

/// A handle on the job store. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
}

impl Store {
    /// Opens (and migrates) the store at `url`: `sqlite://PATH` (created when
    /// missing) or `postgres://…`.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        sqlx::any::install_default_drivers();
        let redacted = trainyard_common::amqp::redact_url(url);
        let open_err = |source| StoreError::Open { url: redacted.clone(), source };
        let (backend, connect_url, max) = if let Some(path) = url.strip_prefix("sqlite://") {
            let file = path.split('?').next().unwrap_or(path);
            if let Some(dir) = Path::new(file).parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(|e| open_err(sqlx::Error::Io(e)))?;
            }
            let sep = if path.contains('?') { '&' } else { '?' };
            let u = if path.contains("mode=") { url.to_string() } else { format!("{url}{sep}mode=rwc") };
            (Backend::Sqlite, u, 4)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            (Backend::Postgres, url.to_string(), 8)
        } else {
            return Err(StoreError::Url(redacted));
        };
        let mut opts = AnyPoolOptions::new().max_connections(max);
        if backend == Backend::Sqlite {
            opts = opts.after_connect(|conn, _| {
                Box::pin(async move {
                    sqlx::query("PRAGMA busy_timeout = 10000").execute(&mut *conn).await?;
                    sqlx::query("PRAGMA journal_mode = WAL").execute(&mut *conn).await?;
                    sqlx::query("PRAGMA synchronous = NORMAL").execute(&mut *conn).await?;
                    Ok(())
                })
            });
        }
        let pool = opts.connect(&connect_url).await.map_err(open_err)?;
        let store = Self { pool, backend };
        store.migrate().await?;
        Ok(store)
    }

    /// The database behind the store.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Closes the pool.
    pub async fn close(&self) {
        self.pool.close().await
    }

    /// Runs one statement as is (administration, tests).
    pub async fn execute_raw(&self, sql: &str) -> Result<u64, StoreError> {
        Ok(sqlx::query(AssertSqlSafe(sql.to_string())).execute(&self.pool).await.map_err(q(format!("run {sql:?}")))?.rows_affected())
    }

    async fn migrate(&self) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await.map_err(q("begin the migration"))?;
        if self.backend == Backend::Postgres {
            // Replicas starting together migrate one at a time.
            sqlx::query("SELECT pg_advisory_xact_lock(7201190001)").execute(&mut *tx).await.map_err(q("lock the schema"))?;
        }
        sqlx::query("CREATE TABLE IF NOT EXISTS trainyard_schema (version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL)")
            .execute(&mut *tx)
            .await
            .map_err(q("create the schema table"))?;
        let applied: Vec<i64> = sqlx::query("SELECT version FROM trainyard_schema")
            .fetch_all(&mut *tx)
            .await
            .map_err(q("read the schema version"))?
            .iter()
            .map(|r| r.get::<i64, _>(0))
            .collect();
        for (version, sql) in schema::MIGRATIONS {
            if applied.contains(version) {
                continue;
            }
            for stmt in schema::statements(sql) {
                sqlx::query(AssertSqlSafe(stmt.to_string())).execute(&mut *tx).await.map_err(q(format!("apply migration {version}")))?;
            }
            sqlx::query("INSERT INTO trainyard_schema (version, applied_at) VALUES ($1, $2)")
                .bind(*version)
                .bind(micros(Utc::now()))
                .execute(&mut *tx)
                .await
                .map_err(q("record the schema version"))?;
        }
        tx.commit().await.map_err(q("commit the migration"))
    }

    /// Records an event. Returns `false` when it was already recorded (a duplicate).
    pub async fn record_event(&self, event: &JobEvent) -> Result<bool, StoreError> {
        Ok(self.record_events(std::slice::from_ref(event)).await?[0].new)
    }

    /// Records a batch of events in one transaction; one [`Recorded`] per event, in order.
    ///
    /// Each job's row is projected once per batch, after all of its events are in.
    /// Jobs are visited in `job_id` order, so concurrent batches on PostgreSQL lock
    /// rows in the same order and cannot deadlock.
    pub async fn record_events(&self, events: &[JobEvent]) -> Result<Vec<Recorded>, StoreError> {
        let now = micros(Utc::now());
        let mut order: Vec<usize> = (0..events.len()).collect();
        order.sort_by(|&a, &b| (&events[a].job_id, events[a].seq).cmp(&(&events[b].job_id, events[b].seq)));
        let mut out = vec![Recorded { new: false, since: None }; events.len()];
        // job_id → (run, index of the job's latest new terminal event in `events`)
        let mut touched: BTreeMap<&str, (i64, Option<usize>)> = BTreeMap::new();
        let mut tx = self.pool.begin().await.map_err(q("begin recording events"))?;
        let mut current: Option<(&str, i64, i64)> = None;
        for i in order {
            let event = &events[i];
            let body = serde_json::to_string(event).map_err(|e| StoreError::Decode { what: "event", reason: e.to_string() })?;
            let (run, run_since) = match current {
                Some((job, run, since)) if job == event.job_id => (run, since),
                _ => {
                    let (run, since) = self.ensure_job(&mut tx, event).await?;
                    current = Some((event.job_id.as_str(), run, since));
                    (run, since)
                }
            };
            // An event from before the latest replay belongs to the previous run.
            let event_run = if run > 0 && micros(event.at) < run_since { run - 1 } else { run };
            let inserted = sqlx::query(
                "INSERT INTO job_events (job_id, run, seq, status, attempt, at, body, recorded_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (job_id, run, seq) DO NOTHING",
            )
            .bind(&event.job_id)
            .bind(event_run)
            .bind(event.seq as i64)
            .bind(event.status.as_str())
            .bind(i64::from(event.attempt))
            .bind(micros(event.at))
            .bind(&body)
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(q(format!("insert event {}/{}", event.job_id, event.seq)))?
            .rows_affected()
                == 1;
            if !inserted {
                continue;
            }
            out[i].new = true;
            if let Some(spec) = &event.spec {
                let spec_json = serde_json::to_string(spec).map_err(|e| StoreError::Decode { what: "spec", reason: e.to_string() })?;
                sqlx::query(
                    "UPDATE jobs SET spec = $1, trigger_kind = $2, trigger_source = $3, submitted_at = $4, created_at = $4 WHERE job_id = $5",
                )
                .bind(spec_json)
                .bind(spec.trigger.kind.to_string())
                .bind(&spec.trigger.source)
                .bind(micros(spec.submitted_at))
                .bind(&event.job_id)
                .execute(&mut *tx)
                .await
                .map_err(q(format!("store the spec of job {}", event.job_id)))?;
            }
            if event_run == run {
                let entry = touched.entry(event.job_id.as_str()).or_insert((run, None));
                if event.status.is_terminal() {
                    entry.1 = Some(i);
                }
            }
        }
        for (job_id, (run, terminal)) in touched {
            self.project(&mut tx, job_id, run).await?;
            if let Some(i) = terminal {
                let row = sqlx::query("SELECT COALESCE(submitted_at, created_at) FROM jobs WHERE job_id = $1")
                    .bind(job_id)
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(q(format!("read job {job_id}")))?;
                out[i].since = Some(from_micros(row.get::<i64, _>(0)));
            }
        }
        tx.commit().await.map_err(q("commit recorded events"))?;
        Ok(out)
    }

    /// Creates the job row of `event` when missing (and locks it on PostgreSQL); returns its `(run, run_since)`.
    async fn ensure_job(&self, conn: &mut sqlx::AnyConnection, event: &JobEvent) -> Result<(i64, i64), StoreError> {
        // A write first, so SQLite takes its write lock now rather than failing to upgrade later.
        sqlx::query(
            "INSERT INTO jobs (job_id, job_type, bot, status, status_seq, attempts, run, run_since, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, 0, 0, $7, $8) ON CONFLICT (job_id) DO NOTHING",
        )
        .bind(&event.job_id)
        .bind(&event.job_type)
        .bind(&event.bot)
        .bind(event.status.as_str())
        .bind(event.seq as i64)
        .bind(i64::from(event.attempt))
        .bind(micros(event.at))
        .bind(micros(event.at))
        .execute(&mut *conn)
        .await
        .map_err(q(format!("create job {}", event.job_id)))?;
        let lock = if self.backend == Backend::Postgres { " FOR UPDATE" } else { "" };
        let row = sqlx::query(AssertSqlSafe(format!("SELECT run, run_since FROM jobs WHERE job_id = $1{lock}")))
            .bind(&event.job_id)
            .fetch_one(&mut *conn)
            .await
            .map_err(q(format!("read job {}", event.job_id)))?;
        Ok((row.get(0), row.get(1)))
    }

    /// Recomputes a job's row from the events of its run `run`.
    async fn project(&self, conn: &mut sqlx::AnyConnection, job_id: &str, run: i64) -> Result<(), StoreError> {
        let events = Self::run_events(conn, job_id, run).await?;
        let Some(p) = projection::project(&events) else { return Ok(()) };
        sqlx::query(
            "UPDATE jobs SET status = $1, status_seq = $2, attempts = $3, worker = $4, progress = $5, result = $6, error = $7, \
             started_at = $8, finished_at = $9, updated_at = $10 WHERE job_id = $11",
        )
        .bind(p.status.as_str())
        .bind(p.status_seq as i64)
        .bind(i64::from(p.attempts))
        .bind(p.worker.as_ref().map(types::to_json))
        .bind(p.progress.as_ref().map(types::to_json))
        .bind(p.result.as_ref().map(types::to_json))
        .bind(p.error.as_ref().map(types::to_json))
        .bind(p.started_at.map(micros))
        .bind(p.finished_at.map(micros))
        .bind(micros(p.updated_at))
        .bind(job_id)
        .execute(&mut *conn)
        .await
        .map_err(q(format!("update job {job_id}")))?;
        Ok(())
    }

    async fn run_events(conn: &mut sqlx::AnyConnection, job_id: &str, run: i64) -> Result<Vec<JobEvent>, StoreError> {
        let rows = sqlx::query("SELECT body FROM job_events WHERE job_id = $1 AND run = $2 ORDER BY seq")
            .bind(job_id)
            .bind(run)
            .fetch_all(&mut *conn)
            .await
            .map_err(q(format!("read the events of job {job_id}")))?;
        rows.iter().map(|r| types::from_json::<JobEvent>("event", &r.get::<String, _>(0))).collect()
    }

    /// Starts a new run of a job (a dead-letter replay): the job is `queued`
    /// again and its new events are kept apart from the old ones.
    pub async fn start_new_run(&self, job_id: &str, at: DateTime<Utc>) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE jobs SET run = run + 1, run_since = $1, status = 'queued', status_seq = 0, attempts = 0, progress = NULL, \
             result = NULL, error = NULL, finished_at = NULL, updated_at = $2 WHERE job_id = $3",
        )
        .bind(micros(at))
        .bind(micros(at))
        .bind(job_id)
        .execute(&self.pool)
        .await
        .map_err(q(format!("start a new run of job {job_id}")))?;
        Ok(())
    }

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

    /// Jobs matching `filter`, newest first.
    pub async fn list_jobs(&self, filter: &JobFilter) -> Result<Vec<JobRow>, StoreError> {
        let mut sql = format!("SELECT {} FROM jobs WHERE 1 = 1", types::JOB_COLUMNS);
        let mut texts: Vec<String> = Vec::new();
        let mut n = 0;
        let mut next = || {
            n += 1;
            n
        };
        if let Some(s) = filter.status {
            sql.push_str(&format!(" AND status = ${}", next()));
            texts.push(s.as_str().into());
        }
        if let Some(t) = &filter.job_type {
            sql.push_str(&format!(" AND job_type = ${}", next()));
            texts.push(t.clone());
        }
        if let Some(b) = &filter.bot {
            sql.push_str(&format!(" AND bot = ${}", next()));
            texts.push(b.clone());
        }
        let since_idx = filter.since.map(|_| next());
        if let Some(i) = since_idx {
            sql.push_str(&format!(" AND created_at >= ${i}"));
        }
        sql.push_str(&format!(" ORDER BY created_at DESC, job_id DESC LIMIT {}", filter.limit.clamp(1, 10_000)));
        let mut query = sqlx::query(AssertSqlSafe(sql));
        for t in texts {
            query = query.bind(t);
        }
        if let Some(since) = filter.since {
            query = query.bind(micros(since));
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

    /// Is the store empty (no job)?
    pub async fn is_empty(&self) -> Result<bool, StoreError> {
        let row = sqlx::query("SELECT COUNT(*) FROM jobs").fetch_one(&self.pool).await.map_err(q("count jobs"))?;
        Ok(row.get::<i64, _>(0) == 0)
    }

    /// Records a dead letter (idempotent on its id; a later one for the same id replaces it).
    pub async fn record_dead_letter(&self, dl: &DeadLetter) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO dead_letters (id, job_id, job_type, bot, reason, kind, attempt, broker_dead_lettered, body_preview, at, replayed_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, NULL) ON CONFLICT (id) DO UPDATE SET reason = excluded.reason, \
             kind = excluded.kind, attempt = excluded.attempt, broker_dead_lettered = excluded.broker_dead_lettered, at = excluded.at, \
             replayed_at = NULL",
        )
        .bind(&dl.id)
        .bind(dl.job_id.clone())
        .bind(&dl.job_type)
        .bind(dl.bot.clone())
        .bind(&dl.reason)
        .bind(&dl.kind)
        .bind(i64::from(dl.attempt))
        .bind(i64::from(dl.broker_dead_lettered))
        .bind(&dl.body_preview)
        .bind(micros(dl.at))
        .execute(&self.pool)
        .await
        .map_err(q(format!("record dead letter {}", dl.id)))?;
        Ok(())
    }

    /// Dead letters not replayed yet, newest first, optionally of one job type.
    pub async fn dead_letters(&self, job_type: Option<&str>) -> Result<Vec<DeadLetter>, StoreError> {
        let cols = "id, job_id, job_type, bot, reason, kind, attempt, broker_dead_lettered, body_preview, at, replayed_at";
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

    /// Claims the fire of `schedule` at `fire_at` for `job_id`. Exactly one
    /// caller, across all replicas sharing the store, gets `true`.
    pub async fn claim_schedule_fire(&self, schedule: &str, fire_at: DateTime<Utc>, job_id: &str) -> Result<bool, StoreError> {
        let n = sqlx::query(
            "INSERT INTO schedule_fires (schedule, fire_at, job_id, claimed_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (schedule, fire_at) DO NOTHING",
        )
        .bind(schedule)
        .bind(micros(fire_at))
        .bind(job_id)
        .bind(micros(Utc::now()))
        .execute(&self.pool)
        .await
        .map_err(q(format!("claim the fire of schedule {schedule} at {fire_at}")))?
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
