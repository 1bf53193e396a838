//! The job store's schema, embedded, applied in order at start-up.
//!
//! Portable SQL (SQLite and PostgreSQL): `TEXT` and `BIGINT` only; times are
//! microseconds since the Unix epoch; JSON documents are `TEXT`.

/// Migrations: (version, statements). Never edit an applied one; append.
pub const MIGRATIONS: &[(i64, &str)] = &[
    (
        1,
        r#"
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    job_type TEXT NOT NULL,
    bot TEXT NOT NULL,
    status TEXT NOT NULL,
    status_seq BIGINT NOT NULL,
    attempts BIGINT NOT NULL,
    run BIGINT NOT NULL,
    run_since BIGINT NOT NULL,
    trigger_kind TEXT,
    trigger_source TEXT,
    spec TEXT,
    worker TEXT,
    progress TEXT,
    result TEXT,
    error TEXT,
    submitted_at BIGINT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    started_at BIGINT,
    finished_at BIGINT
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status);
CREATE INDEX IF NOT EXISTS jobs_type_created ON jobs (job_type, created_at);
CREATE INDEX IF NOT EXISTS jobs_bot_created ON jobs (bot, created_at);
CREATE TABLE IF NOT EXISTS job_events (
    job_id TEXT NOT NULL,
    run BIGINT NOT NULL,
    seq BIGINT NOT NULL,
    status TEXT NOT NULL,
    attempt BIGINT NOT NULL,
    at BIGINT NOT NULL,
    body TEXT NOT NULL,
    recorded_at BIGINT NOT NULL,
    PRIMARY KEY (job_id, run, seq)
);
CREATE TABLE IF NOT EXISTS dead_letters (
    id TEXT PRIMARY KEY,
    job_id TEXT,
    job_type TEXT NOT NULL,
    bot TEXT,
    reason TEXT NOT NULL,
    kind TEXT NOT NULL,
    attempt BIGINT NOT NULL,
    broker_dead_lettered BIGINT NOT NULL,
    body_preview TEXT NOT NULL,
    at BIGINT NOT NULL,
    replayed_at BIGINT
);
CREATE INDEX IF NOT EXISTS dead_letters_type ON dead_letters (job_type, at);
CREATE TABLE IF NOT EXISTS schedule_fires (
    schedule TEXT NOT NULL,
    fire_at BIGINT NOT NULL,
    job_id TEXT NOT NULL,
    claimed_at BIGINT NOT NULL,
    published_at BIGINT,
    PRIMARY KEY (schedule, fire_at)
)
"#,
    ),
    (
        2,
        r#"
CREATE TABLE IF NOT EXISTS parked_events (
    id TEXT PRIMARY KEY,
    routing_key TEXT NOT NULL,
    content_type TEXT,
    reason TEXT NOT NULL,
    body TEXT NOT NULL,
    at BIGINT NOT NULL
)
"#,
    ),
    (
        3,
        r#"
ALTER TABLE dead_letters ADD COLUMN body TEXT
"#,
    ),
    (
        4,
        r#"
CREATE INDEX IF NOT EXISTS job_events_recorded ON job_events (recorded_at)
"#,
    ),
    (
        5,
        r#"
CREATE INDEX IF NOT EXISTS jobs_created_id ON jobs (created_at, job_id);
CREATE INDEX IF NOT EXISTS jobs_status_created_id ON jobs (status, created_at, job_id);
CREATE INDEX IF NOT EXISTS jobs_type_created_id ON jobs (job_type, created_at, job_id);
CREATE INDEX IF NOT EXISTS jobs_bot_created_id ON jobs (bot, created_at, job_id);
CREATE INDEX IF NOT EXISTS jobs_trigger_created_id ON jobs (trigger_kind, created_at, job_id);
CREATE INDEX IF NOT EXISTS jobs_status_type_created ON jobs (status, job_type, created_at);
DROP INDEX IF EXISTS jobs_status;
DROP INDEX IF EXISTS jobs_type_created;
DROP INDEX IF EXISTS jobs_bot_created
"#,
    ),
    (
        6,
        r#"
CREATE INDEX IF NOT EXISTS jobs_status_type_created_id ON jobs (status, job_type, created_at, job_id);
DROP INDEX IF EXISTS jobs_status_type_created
"#,
    ),
    (
        7,
        r#"
CREATE TABLE IF NOT EXISTS audit (
    id TEXT PRIMARY KEY,
    at BIGINT NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    detail TEXT,
    recorded_at BIGINT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_at ON audit (at, id)
"#,
    ),
    (
        8,
        r#"
CREATE TABLE IF NOT EXISTS stream_positions (
    stream TEXT PRIMARY KEY,
    last_offset BIGINT NOT NULL,
    entries BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
)
"#,
    ),
    (
        9,
        r#"
ALTER TABLE dead_letters ADD COLUMN run BIGINT NOT NULL DEFAULT 0
"#,
    ),
    (
        10,
        r#"
CREATE TABLE IF NOT EXISTS feed_clock (
    id BIGINT PRIMARY KEY,
    last BIGINT NOT NULL
);
INSERT INTO feed_clock (id, last) SELECT 1, COALESCE(MAX(recorded_at), 0) FROM job_events WHERE true ON CONFLICT (id) DO NOTHING
"#,
    ),
];

/// The statements of a migration, split on `;`.
pub fn statements(sql: &str) -> impl Iterator<Item = &str> {
    sql.split(';').map(str::trim).filter(|s| !s.is_empty())
}
