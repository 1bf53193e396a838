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
//! - The recorder's offset in the `events.log` stream is kept in the same transaction
//!   as the entries it recorded ([`offsets`]): it resumes where it stopped.
//! - A store can be rebuilt from the `events.log` stream (see `rebuild`).

mod admission;
mod audit;
mod dead_letters;
mod feed;
mod fresh;
mod offsets;
mod parked;
mod positions;
pub mod projection;
mod queries;
mod record;
mod schedule;
pub mod schema;
mod types;

use std::path::Path;

use chrono::{DateTime, Utc};
use sqlx::{any::AnyPoolOptions, AnyPool, AssertSqlSafe, Row};

pub use audit::AuditFilter;
pub use feed::Change;
pub use offsets::{BatchRecorded, StreamBatch, StreamPosition};
pub use parked::Unparked;
pub use types::{check_limit, from_micros, micros, text as escape_text, DeadLetter, JobCursor, JobFilter, JobRow, ParkedEvent, MAX_PAGE};

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
    /// The store holds what its own writes never make (events of a job without a row): a
    /// retry finds the same, so the write is refused as for what it holds.
    #[error("the job store is inconsistent: {0}")]
    Inconsistent(String),
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
                // PostgreSQL SQLSTATE classes: 22 data exception, 23 integrity, 54 program limit
                // (index row size). Told apart by the error's type, not the code's form: most
                // SQLSTATEs are digits too ("23505"), which read as a SQLite code would be retried.
                if db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>().is_some() {
                    return !(code.starts_with("22") || code.starts_with("23") || code.starts_with("54"));
                }
                // SQLite: extended result codes; the primary code is the low byte:
                // TOOBIG (18), CONSTRAINT (19), MISMATCH (20), RANGE (25).
                code.parse::<i64>().map_or(true, |n| !matches!(n & 0xff, 18 | 19 | 20 | 25))
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
