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
//! - An event the recorder cannot record is parked (`parked_events`, written in
//!   the same transaction as the batch it came with) with the reason, to be listed
//!   and re-recorded later ([`parked`]).
//! - A store can be rebuilt from the `events.log` stream (see `rebuild`).

mod parked;
pub mod projection;
pub mod schema;
mod types;

use std::{
    collections::{BTreeMap, HashMap},
    path::Path,
};

use chrono::{DateTime, Utc};
use projection::Projection;
use sqlx::{
    any::{AnyPoolOptions, AnyRow},
    AnyPool, AssertSqlSafe, Row,
};
use trainyard_common::{JobEvent, JobSpec, JobStatus};

pub use types::{from_micros, micros, text as escape_text, DeadLetter, JobFilter, JobRow, ParkedEvent};

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

impl StoreError {
    /// Can trying again fix this? `false` for what the data itself causes (a value the
    /// database refuses, one too large for an index, a constraint, a document that does
    /// not decode): retrying such a write only blocks what queues behind it.
    pub fn retryable(&self) -> bool {
        let StoreError::Query { source, .. } = self else { return matches!(self, StoreError::Open { .. }) };
        match source {
            sqlx::Error::Database(db) => {
                let code = db.code().unwrap_or_default();
                // SQLite: extended result codes; the primary code is the low byte.
                if let Ok(n) = code.parse::<i64>() {
                    // TOOBIG (18), CONSTRAINT (19), MISMATCH (20), RANGE (25)
                    return !matches!(n & 0xff, 18 | 19 | 20 | 25);
                }
                // PostgreSQL SQLSTATE classes: 22 data exception, 23 integrity, 54 program limit (index row size).
                !(code.starts_with("22") || code.starts_with("23") || code.starts_with("54"))
            }
            sqlx::Error::Encode(_) | sqlx::Error::Decode(_) | sqlx::Error::ColumnDecode { .. } | sqlx::Error::TypeNotFound { .. } => false,
            _ => true,
        }
    }
}

fn q(what: impl Into<String>) -> impl FnOnce(sqlx::Error) -> StoreError {
    let what = what.into();
    move |source| StoreError::Query { what, source }
}

/// Most rows one multi-row statement carries (8 parameters each: well under the
/// parameter limits of SQLite, 32,766, and PostgreSQL, 65,535).
const ROWS_PER_STATEMENT: usize = 256;

/// `n` placeholders numbered from `start`: `$start, …` on PostgreSQL; plain `?` on SQLite,
/// where sqlx binds numbered ones by a name look-up per parameter (quadratic in long lists).
fn placeholders(backend: Backend, start: usize, n: usize) -> String {
    match backend {
        Backend::Sqlite => vec!["?"; n].join(", "),
        Backend::Postgres => (start..start + n).map(|i| format!("${i}")).collect::<Vec<_>>().join(", "),
    }
}

/// `rows` parenthesised groups of `cols` placeholders (`($1, $2), ($3, $4)`), each
/// followed by the literal `tail` columns when it is not empty.
fn values_list(backend: Backend, rows: usize, cols: usize, tail: &str) -> String {
    let tail = if tail.is_empty() { String::new() } else { format!(", {tail}") };
    (0..rows).map(|r| format!("({}{tail})", placeholders(backend, r * cols + 1, cols))).collect::<Vec<_>>().join(", ")
}

/// `UPDATE jobs SET <set> FROM (VALUES …) AS v WHERE jobs.job_id = v.column1`: one
/// statement updating `rows` jobs, each row `cols` values with the job id first. Both
/// SQLite (3.33+) and PostgreSQL name the columns of a `VALUES` list `column1, column2, …`.
fn update_from_values(backend: Backend, set: &str, rows: usize, cols: usize) -> String {
    format!("UPDATE jobs SET {set} FROM (VALUES {}) AS v WHERE jobs.job_id = v.column1", values_list(backend, rows, cols, ""))
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
    /// Set-based, so a batch costs a handful of statements rather than several per
    /// event: create the missing job rows, read (and on PostgreSQL lock, in `job_id`
    /// order, so concurrent recorders cannot deadlock) their run, insert the events
    /// (`RETURNING` says which were new), then project each touched job once.
    pub async fn record_events(&self, events: &[JobEvent]) -> Result<Vec<Recorded>, StoreError> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let mut tx = self.pool.begin().await.map_err(q("begin recording events"))?;
        let out = self.record_events_in(&mut tx, events).await?;
        tx.commit().await.map_err(q("commit recorded events"))?;
        Ok(out)
    }

    /// [`Store::record_events`] inside the caller's transaction.
    async fn record_events_in(&self, tx: &mut sqlx::AnyConnection, events: &[JobEvent]) -> Result<Vec<Recorded>, StoreError> {
        let mut out = vec![Recorded { new: false, since: None }; events.len()];
        if events.is_empty() {
            return Ok(out);
        }
        let now = micros(Utc::now());
        // The first event of each job stands for it when its row is created.
        let mut jobs: BTreeMap<&str, &JobEvent> = BTreeMap::new();
        for e in events {
            jobs.entry(e.job_id.as_str()).or_insert(e);
        }
        let ids: Vec<&str> = jobs.keys().copied().collect();
        // A write first, so SQLite takes its write lock now rather than failing to upgrade later.
        for chunk in jobs.values().collect::<Vec<_>>().chunks(ROWS_PER_STATEMENT) {
            let sql = format!(
                "INSERT INTO jobs (job_id, job_type, bot, status, status_seq, attempts, created_at, updated_at, run, run_since) \
                 VALUES {} ON CONFLICT (job_id) DO NOTHING",
                values_list(self.backend, chunk.len(), 8, "0, 0")
            );
            let mut query = sqlx::query(AssertSqlSafe(sql)).persistent(false);
            for e in chunk {
                query = query
                    .bind(&e.job_id)
                    .bind(&e.job_type)
                    .bind(&e.bot)
                    .bind(e.status.as_str())
                    .bind(e.seq as i64)
                    .bind(i64::from(e.attempt))
                    .bind(micros(e.at))
                    .bind(micros(e.at));
            }
            query.execute(&mut *tx).await.map_err(q("create job rows"))?;
        }
        // job_id → (run, run_since, when the job was submitted as far as the row knows)
        let mut state: HashMap<String, (i64, i64, i64)> = HashMap::with_capacity(ids.len());
        let lock = if self.backend == Backend::Postgres { " FOR UPDATE" } else { "" };
        let sql = format!(
            "SELECT job_id, run, run_since, COALESCE(submitted_at, created_at) FROM jobs WHERE job_id IN ({{}}) ORDER BY job_id{lock}"
        );
        for r in self.select_in(tx, &sql, &ids, "read job rows").await? {
            state.insert(r.get(0), (r.get(1), r.get(2), r.get(3)));
        }
        // The run each event belongs to: one from before the latest replay belongs to the previous run.
        let event_runs: Vec<i64> = events
            .iter()
            .map(|e| {
                let (run, run_since, _) = state[e.job_id.as_str()];
                if run > 0 && micros(e.at) < run_since {
                    run - 1
                } else {
                    run
                }
            })
            .collect();
        // Each (job, run, seq) once; later copies in the batch are duplicates.
        let mut keyed: HashMap<(&str, i64, u64), usize> = HashMap::with_capacity(events.len());
        for (i, e) in events.iter().enumerate() {
            keyed.entry((e.job_id.as_str(), event_runs[i], e.seq)).or_insert(i);
        }
        let mut unique: Vec<((&str, i64, u64), usize)> = keyed.into_iter().collect();
        unique.sort_unstable();
        for chunk in unique.chunks(ROWS_PER_STATEMENT) {
            let sql = format!(
                "INSERT INTO job_events (job_id, run, seq, status, attempt, at, body, recorded_at) VALUES {} \
                 ON CONFLICT (job_id, run, seq) DO NOTHING RETURNING job_id, run, seq",
                values_list(self.backend, chunk.len(), 8, "")
            );
            let mut query = sqlx::query(AssertSqlSafe(sql)).persistent(false);
            for &((_, run, _), i) in chunk {
                let e = &events[i];
                let body = serde_json::to_string(e).map_err(|err| StoreError::Decode { what: "event", reason: err.to_string() })?;
                query = query
                    .bind(&e.job_id)
                    .bind(run)
                    .bind(e.seq as i64)
                    .bind(e.status.as_str())
                    .bind(i64::from(e.attempt))
                    .bind(micros(e.at))
                    .bind(body)
                    .bind(now);
            }
            let index: HashMap<(&str, i64, u64), usize> = chunk.iter().copied().collect();
            for r in query.fetch_all(&mut *tx).await.map_err(q("insert events"))? {
                let (job_id, run, seq): (String, i64, i64) = (r.get(0), r.get(1), r.get(2));
                if let Some(&i) = index.get(&(job_id.as_str(), run, seq as u64)) {
                    out[i].new = true;
                }
            }
        }
        // Jobs with new events of their current run: store the spec, project the row.
        let mut touched: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        let mut specs = Vec::new();
        for (i, e) in events.iter().enumerate().filter(|(i, _)| out[*i].new) {
            if event_runs[i] == state[e.job_id.as_str()].0 {
                touched.entry(e.job_id.as_str()).or_default().push(i);
            }
            if let Some(spec) = &e.spec {
                specs.push((e.job_id.as_str(), spec));
            }
        }
        self.update_specs(tx, &specs).await?;
        let touched_ids: Vec<&str> = touched.keys().copied().collect();
        let mut run_events: HashMap<String, Vec<JobEvent>> = HashMap::with_capacity(touched_ids.len());
        let sql = "SELECT job_id, run, body FROM job_events WHERE job_id IN ({}) ORDER BY job_id, seq";
        for r in self.select_in(tx, sql, &touched_ids, "read events").await? {
            let job_id: String = r.get(0);
            if r.get::<i64, _>(1) == state[job_id.as_str()].0 {
                let event = types::from_json::<JobEvent>("event", &r.get::<String, _>(2))?;
                run_events.entry(job_id).or_default().push(event);
            }
        }
        let projections: Vec<(&str, Projection)> = touched
            .keys()
            .filter_map(|&job_id| projection::project(run_events.get(job_id).map(Vec::as_slice).unwrap_or_default()).map(|p| (job_id, p)))
            .collect();
        self.update_projections(tx, &projections).await?;
        for (job_id, new_events) in touched {
            let run = run_events.get(job_id).map(Vec::as_slice).unwrap_or_default();
            // A job's duration starts at its submission: the `queued` event's spec, else the row.
            let since = run.iter().find_map(|e| e.spec.as_ref().map(|s| s.submitted_at)).unwrap_or_else(|| from_micros(state[job_id].2));
            for i in new_events.into_iter().filter(|&i| events[i].status.is_terminal()) {
                out[i].since = Some(since);
            }
        }
        Ok(out)
    }

    /// Runs `sql` (whose `{}` stands for the list of `ids`) over `ids` in chunks; all the rows.
    async fn select_in(&self, conn: &mut sqlx::AnyConnection, sql: &str, ids: &[&str], what: &str) -> Result<Vec<AnyRow>, StoreError> {
        let mut out = Vec::new();
        for chunk in ids.chunks(ROWS_PER_STATEMENT) {
            let text = sql.replacen("{}", &placeholders(self.backend, 1, chunk.len()), 1);
            let query = chunk.iter().fold(sqlx::query(AssertSqlSafe(text)).persistent(false), |q, id| q.bind(*id));
            out.extend(query.fetch_all(&mut *conn).await.map_err(q(what))?);
        }
        Ok(out)
    }

    /// Stores each job's spec (from its `queued` event) in its row: one statement per chunk.
    async fn update_specs(&self, conn: &mut sqlx::AnyConnection, specs: &[(&str, &JobSpec)]) -> Result<(), StoreError> {
        let set =
            "spec = v.column2, trigger_kind = v.column3, trigger_source = v.column4, submitted_at = v.column5, created_at = v.column5";
        for chunk in specs.chunks(ROWS_PER_STATEMENT) {
            let mut query = sqlx::query(AssertSqlSafe(update_from_values(self.backend, set, chunk.len(), 5))).persistent(false);
            for (job_id, spec) in chunk {
                let spec_json = serde_json::to_string(spec).map_err(|err| StoreError::Decode { what: "spec", reason: err.to_string() })?;
                query = query
                    .bind(*job_id)
                    .bind(spec_json)
                    .bind(spec.trigger.kind.to_string())
                    .bind(spec.trigger.source.clone())
                    .bind(micros(spec.submitted_at));
            }
            query.execute(&mut *conn).await.map_err(q("store job specs"))?;
        }
        Ok(())
    }

    /// Writes each job's projection of its current-run events into its row: one statement per chunk.
    async fn update_projections(&self, conn: &mut sqlx::AnyConnection, rows: &[(&str, Projection)]) -> Result<(), StoreError> {
        let set = "status = v.column2, status_seq = v.column3, attempts = v.column4, worker = v.column5, progress = v.column6, \
                   result = v.column7, error = v.column8, started_at = v.column9, finished_at = v.column10, updated_at = v.column11";
        for chunk in rows.chunks(ROWS_PER_STATEMENT) {
            let mut query = sqlx::query(AssertSqlSafe(update_from_values(self.backend, set, chunk.len(), 11))).persistent(false);
            for (job_id, p) in chunk {
                query = query
                    .bind(*job_id)
                    .bind(p.status.as_str())
                    .bind(p.status_seq as i64)
                    .bind(i64::from(p.attempts))
                    .bind(p.worker.as_ref().map(types::to_json))
                    .bind(p.progress.as_ref().map(types::to_json))
                    .bind(p.result.as_ref().map(types::to_json))
                    .bind(p.error.as_ref().map(types::to_json))
                    .bind(p.started_at.map(micros))
                    .bind(p.finished_at.map(micros))
                    .bind(micros(p.updated_at));
            }
            query.execute(&mut *conn).await.map_err(q("update job rows"))?;
        }
        Ok(())
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
        let mut query = sqlx::query(AssertSqlSafe(sql)).persistent(false);
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

#[cfg(test)]
mod sql_tests {
    use super::*;

    #[test]
    fn placeholder_lists() {
        assert_eq!(placeholders(Backend::Postgres, 3, 2), "$3, $4");
        assert_eq!(placeholders(Backend::Sqlite, 3, 2), "?, ?");
        assert_eq!(values_list(Backend::Postgres, 2, 2, ""), "($1, $2), ($3, $4)");
        assert_eq!(values_list(Backend::Postgres, 1, 3, "0, 0"), "($1, $2, $3, 0, 0)");
        assert_eq!(values_list(Backend::Sqlite, 2, 1, "0"), "(?, 0), (?, 0)");
    }
}
