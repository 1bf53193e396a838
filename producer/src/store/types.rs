//! Rows of the job store and their JSON shapes.

use chrono::{DateTime, TimeZone, Utc};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use sqlx::{any::AnyRow, Row};
use trainyard_common::{job::Priority, ErrorInfo, JobSpec, JobStatus, Trigger, TriggerKind, WorkerInfo};

use super::StoreError;

/// Microseconds since the Unix epoch, as stored.
pub fn micros(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

/// The time of stored microseconds.
pub fn from_micros(us: i64) -> DateTime<Utc> {
    Utc.timestamp_micros(us).single().unwrap_or_default()
}

pub(crate) fn to_json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "null".into())
}

pub(crate) fn from_json<T: DeserializeOwned>(what: &'static str, s: &str) -> Result<T, StoreError> {
    serde_json::from_str(s).map_err(|e| StoreError::Decode { what, reason: e.to_string() })
}

/// A job as the store knows it (the projection of its events).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JobRow {
    /// The job id.
    pub job_id: String,
    /// Its type.
    pub job_type: String,
    /// Its bot.
    pub bot: String,
    /// Current status.
    pub status: JobStatus,
    /// Attempts made so far.
    pub attempts: u32,
    /// Dead-letter replays of this job (0: never replayed).
    pub run: u32,
    /// Who or what triggered it (known once its `queued` event is recorded).
    pub trigger: Option<Trigger>,
    /// When it was submitted.
    pub submitted_at: Option<DateTime<Utc>>,
    /// When the store first heard of it.
    pub created_at: DateTime<Utc>,
    /// Time of its latest event.
    pub updated_at: DateTime<Utc>,
    /// When its first attempt started.
    pub started_at: Option<DateTime<Utc>>,
    /// When it reached its final status.
    pub finished_at: Option<DateTime<Utc>>,
    /// The worker of its latest event that had one.
    pub worker: Option<WorkerInfo>,
    /// Latest live progress.
    pub progress: Option<serde_json::Value>,
    /// Result, once succeeded.
    pub result: Option<serde_json::Value>,
    /// Latest error.
    pub error: Option<ErrorInfo>,
    /// The exact job, for audit and replay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<JobSpec>,
    /// Its priority tier (from the spec; `normal` until its `queued` event is recorded).
    #[serde(default)]
    pub priority: Priority,
    /// Its coalescing key (from the spec).
    #[serde(default)]
    pub coalesce_key: Option<String>,
    /// The newer job with the same coalescing key that replaced it (status `superseded`).
    #[serde(default)]
    pub superseded_by: Option<String>,
    /// For a `queued` job listed by bot (`jobs list --bot B`): how many ready jobs of its
    /// type a worker starts before it (higher tiers, then its tier in submit order).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_position: Option<u64>,
    /// Listed by bot, for a type with admission (fair share, per-bot limit): the bot's usage
    /// of that type against its limit and share.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bot_usage: Option<crate::admission::state::BotUsage>,
}

pub(crate) const JOB_COLUMNS: &str = "job_id, job_type, bot, status, attempts, run, trigger_kind, trigger_source, submitted_at, \
     created_at, updated_at, started_at, finished_at, worker, progress, result, error, spec";

fn opt_json<T: DeserializeOwned>(row: &AnyRow, col: &str, what: &'static str) -> Result<Option<T>, StoreError> {
    row.try_get::<Option<String>, _>(col)
        .map_err(|e| StoreError::Decode { what, reason: e.to_string() })?
        .map(|s| from_json(what, &s))
        .transpose()
}

fn col<'r, T: sqlx::Decode<'r, sqlx::Any> + sqlx::Type<sqlx::Any>>(row: &'r AnyRow, name: &'static str) -> Result<T, StoreError> {
    row.try_get(name).map_err(|e| StoreError::Decode { what: name, reason: e.to_string() })
}

pub(crate) fn job_row(row: &AnyRow) -> Result<JobRow, StoreError> {
    let status: String = col(row, "status")?;
    let trigger_kind: Option<String> = col(row, "trigger_kind")?;
    let trigger = match trigger_kind {
        Some(k) => Some(Trigger {
            kind: serde_json::from_value::<TriggerKind>(serde_json::Value::String(k))
                .map_err(|e| StoreError::Decode { what: "trigger_kind", reason: e.to_string() })?,
            source: col::<Option<String>>(row, "trigger_source")?.unwrap_or_default(),
        }),
        None => None,
    };
    let spec: Option<JobSpec> = opt_json(row, "spec", "spec")?;
    let result: Option<serde_json::Value> = opt_json(row, "result", "result")?;
    let status: JobStatus = status.parse().map_err(|reason| StoreError::Decode { what: "status", reason })?;
    let superseded_by =
        (status == JobStatus::Superseded).then(|| result.as_ref()?.get("superseded_by")?.as_str().map(str::to_string)).flatten();
    Ok(JobRow {
        priority: spec.as_ref().map(|s| s.priority).unwrap_or_default(),
        coalesce_key: spec.as_ref().and_then(|s| s.coalesce_key.clone()),
        superseded_by,
        queue_position: None,
        bot_usage: None,
        job_id: col(row, "job_id")?,
        job_type: col(row, "job_type")?,
        bot: col(row, "bot")?,
        status,
        attempts: col::<i64>(row, "attempts")?.max(0) as u32,
        run: col::<i64>(row, "run")?.max(0) as u32,
        trigger,
        submitted_at: col::<Option<i64>>(row, "submitted_at")?.map(from_micros),
        created_at: from_micros(col(row, "created_at")?),
        updated_at: from_micros(col(row, "updated_at")?),
        started_at: col::<Option<i64>>(row, "started_at")?.map(from_micros),
        finished_at: col::<Option<i64>>(row, "finished_at")?.map(from_micros),
        worker: opt_json(row, "worker", "worker")?,
        progress: opt_json(row, "progress", "progress")?,
        result,
        error: opt_json(row, "error", "error")?,
        spec,
    })
}

/// Filter of `jobs list`: every field narrows the list; pages continue with [`JobCursor`].
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct JobFilter {
    /// Only this status.
    pub status: Option<JobStatus>,
    /// Only this job type.
    pub job_type: Option<String>,
    /// Only this bot.
    pub bot: Option<String>,
    /// Only jobs triggered this way.
    #[serde(default)]
    pub trigger: Option<TriggerKind>,
    /// Only jobs created at or after this time.
    pub since: Option<DateTime<Utc>>,
    /// Only jobs created before this time.
    #[serde(default)]
    pub until: Option<DateTime<Utc>>,
    /// Only jobs whose id starts with this text.
    #[serde(default)]
    pub id_prefix: Option<String>,
    /// Only jobs after this one in the list's order (the next page).
    #[serde(default)]
    pub before: Option<JobCursor>,
    /// At most this many (newest first).
    pub limit: i64,
}

/// The largest page of `jobs list` and the audit trail.
pub const MAX_PAGE: i64 = 10_000;

/// Refuses a `limit` outside 1..=[`MAX_PAGE`], naming it.
pub fn check_limit(limit: i64) -> Result<(), String> {
    if (1..=MAX_PAGE).contains(&limit) {
        Ok(())
    } else {
        Err(format!("limit {limit} is out of range: a page holds 1 to {MAX_PAGE}"))
    }
}

impl JobFilter {
    /// The page size in effect: `limit` within 1..=10,000.
    pub fn page_size(&self) -> i64 {
        self.limit.clamp(1, MAX_PAGE)
    }

    /// Refuses what would list nothing for a reason the caller cannot see: a status or trigger
    /// kind this build does not know (no row has one), a `limit` outside 1..=10,000.
    pub fn check(&self) -> Result<(), String> {
        if self.status == Some(JobStatus::Unknown) {
            return Err(format!("status \"unknown\" is not one a job has: {}", known(JobStatus::ALL.iter())));
        }
        if self.trigger == Some(TriggerKind::Unknown) {
            return Err(format!("trigger \"unknown\" is not one a job has: {}", known(TriggerKind::ALL.iter())));
        }
        check_limit(self.limit)
    }

    /// The cursor of the page after `page` (a page this filter listed), when `page` is full.
    pub fn next_cursor(&self, page: &[JobRow]) -> Option<JobCursor> {
        page.last().filter(|_| page.len() as i64 >= self.page_size()).map(JobCursor::after)
    }
}

fn known<T: std::fmt::Display>(values: impl Iterator<Item = T>) -> String {
    format!("one of {}", values.map(|v| v.to_string()).collect::<Vec<_>>().join(", "))
}

/// A position in the job list (`created_at DESC, job_id DESC`): the last job of a page.
/// Written `<created_at µs since the epoch>:<job_id>`. The dead-letter list pages the same
/// way, by the letter's `at` and `id` ([`JobCursor::after_letter`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobCursor {
    /// Creation time of the last job listed, µs since the epoch.
    pub created_at: i64,
    /// Its id.
    pub job_id: String,
}

impl JobCursor {
    /// The cursor that continues after `job`.
    pub fn after(job: &JobRow) -> Self {
        Self { created_at: micros(job.created_at), job_id: job.job_id.clone() }
    }
    /// The cursor that continues after the dead letter `letter`.
    pub fn after_letter(letter: &DeadLetter) -> Self {
        Self { created_at: micros(letter.at), job_id: letter.id.clone() }
    }
}

impl std::fmt::Display for JobCursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.created_at, self.job_id)
    }
}

impl std::str::FromStr for JobCursor {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("bad cursor {s:?}: {why} (expected <created_at µs>:<job_id>, as returned in X-Next-Cursor)");
        let (at, id) = s.split_once(':').ok_or_else(|| bad("no ':'"))?;
        let created_at = at.parse::<i64>().map_err(|_| bad("the time is not an integer"))?;
        if id.is_empty() {
            return Err(bad("no job id"));
        }
        Ok(Self { created_at, job_id: id.to_string() })
    }
}

/// A dead letter, as recorded from `<prefix>.dead.recorder`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DeadLetter {
    /// The job id when known, else a hash of the body (`poison-…`).
    pub id: String,
    /// The job, when its id is known.
    pub job_id: Option<String>,
    /// Its job type (from the body, the routing key, or `unknown`).
    pub job_type: String,
    /// Its bot, when known.
    pub bot: Option<String>,
    /// Why it was dead-lettered.
    pub reason: String,
    /// The worker's `permanent`, `transient`, `timeout`, `poison` (and the others it names), or
    /// the broker's `delivery-limit`, `expired`, `rejected`, `maxlen` or `broker`.
    pub kind: String,
    /// The attempt it died on.
    pub attempt: u32,
    /// The run of its job it died in (0 before any replay).
    #[serde(default)]
    pub run: u32,
    /// Dead-lettered by the broker itself (`x-death`, delivery limit), not by a worker.
    pub broker_dead_lettered: bool,
    /// The first bytes of the body, for debugging poison messages.
    pub body_preview: String,
    /// The whole body as received, base64 (standard alphabet, padded); absent for letters recorded before it was kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    /// When it was recorded.
    pub at: DateTime<Utc>,
    /// When it was replayed (then it no longer lists).
    pub replayed_at: Option<DateTime<Utc>>,
}

impl DeadLetter {
    /// This letter with every text value ASCII-escaped (`\u{0}`, `\u{e9}`, …) and cut
    /// to 1,000 characters, and `why` the store refused it as received added to the
    /// reason: a form any database takes. The body stays as base64.
    pub fn ascii_escaped(&self, why: &str) -> DeadLetter {
        let esc = |s: &str| s.escape_default().take(1000).collect::<String>();
        DeadLetter {
            id: if self.id.is_ascii() && self.id.len() <= 200 {
                self.id.clone()
            } else {
                format!("escaped-{}", uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, self.id.as_bytes()))
            },
            job_id: self.job_id.as_deref().map(esc),
            job_type: esc(&self.job_type),
            bot: self.bot.as_deref().map(esc),
            reason: format!("{} (recorded escaped: {})", esc(&self.reason), esc(why)),
            kind: esc(&self.kind),
            attempt: self.attempt,
            run: self.run,
            broker_dead_lettered: self.broker_dead_lettered,
            body_preview: esc(&self.body_preview),
            body: self.body.clone(),
            at: self.at,
            replayed_at: self.replayed_at,
        }
    }
}

/// A dead letter as [`Store::record_dead_letter`](super::Store::record_dead_letter) was given
/// it: its text is stored escaped ([`text`]).
pub(crate) fn dead_letter(row: &AnyRow) -> DeadLetter {
    let text_at = |i: usize| untext(&row.get::<String, _>(i));
    DeadLetter {
        id: text_at(0),
        job_id: row.get::<Option<String>, _>(1).as_deref().map(untext),
        job_type: text_at(2),
        bot: row.get::<Option<String>, _>(3).as_deref().map(untext),
        reason: text_at(4),
        kind: text_at(5),
        attempt: row.get::<i64, _>(6).max(0) as u32,
        broker_dead_lettered: row.get::<i64, _>(7) != 0,
        body_preview: text_at(8),
        at: from_micros(row.get(9)),
        replayed_at: row.get::<Option<i64>, _>(10).map(from_micros),
        body: row.get(11),
        run: row.get::<i64, _>(12).clamp(0, i64::from(u32::MAX)) as u32,
    }
}

/// An event the recorder could not record, kept with the reason until it can be
/// (`trainyard events parked`, `trainyard events reprocess`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParkedEvent {
    /// A hash of routing key, content type and body: the same delivery parks once.
    pub id: String,
    /// Its routing key on the events exchange (`<job_type>.<status>`).
    pub routing_key: String,
    /// Its content type, if it had one.
    pub content_type: Option<String>,
    /// Why it could not be recorded.
    pub reason: String,
    /// The body exactly as received, base64 (standard alphabet, padded).
    pub body: String,
    /// When it was parked.
    pub at: DateTime<Utc>,
}

impl ParkedEvent {
    /// Parks `body` (received with `routing_key` and `content_type`) for `reason`.
    pub fn new(routing_key: &str, content_type: Option<&str>, body: &[u8], reason: &str) -> Self {
        use base64::Engine;
        let mut key = Vec::with_capacity(body.len() + 64);
        for part in [routing_key.as_bytes(), content_type.unwrap_or("").as_bytes(), body] {
            key.extend_from_slice(&(part.len() as u64).to_be_bytes());
            key.extend_from_slice(part);
        }
        Self {
            id: uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, &key).to_string(),
            routing_key: text(routing_key),
            content_type: content_type.map(text),
            reason: text(reason),
            body: base64::engine::general_purpose::STANDARD.encode(body),
            at: Utc::now(),
        }
    }

    /// The body as received.
    pub fn body_bytes(&self) -> Result<Vec<u8>, StoreError> {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD
            .decode(&self.body)
            .map_err(|e| StoreError::Decode { what: "parked event body", reason: e.to_string() })
    }
}

/// `s` as a database text value: NUL (which PostgreSQL refuses in text) escaped as `\0`,
/// and the backslash escaped so that the escaping is unambiguous.
pub fn text(s: &str) -> String {
    if !s.contains(['\0', '\\']) {
        return s.to_string();
    }
    s.replace('\\', "\\\\").replace('\0', "\\0")
}

/// The text [`text`] stored, as it was given: `\\` a backslash, `\0` a NUL.
pub fn untext(s: &str) -> String {
    if !s.contains('\\') {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match (c, chars.clone().next()) {
            ('\\', Some('\\')) => {
                out.push('\\');
                chars.next();
            }
            ('\\', Some('0')) => {
                out.push('\0');
                chars.next();
            }
            _ => out.push(c),
        }
    }
    out
}

pub(crate) fn parked_event(row: &AnyRow) -> ParkedEvent {
    ParkedEvent {
        id: row.get(0),
        routing_key: row.get(1),
        content_type: row.get(2),
        reason: row.get(3),
        body: row.get(4),
        at: from_micros(row.get(5)),
    }
}
