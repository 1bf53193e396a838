//! `GET /v1/stream`: the console's live feed, as server-sent events.
//!
//! A `queues` event carries the figures of `GET /v1/queues`, and a `workers` event the rows of
//! `GET /v1/workers` (from the workers' heartbeats), every [`QUEUES_EVERY`]. A stream of one job
//! (`?job=ID`) also carries `log` events: the live log lines of its running attempt
//! ([`crate::livelogs`]), `{attempt, offset, text, worker}`, the whole held text first, then
//! what is new at each tick (a page joins them by offset).
//! Each `job` event carries a job row (without its spec) that changed, with the
//! recording time of its latest event as the event id. The stream tails the job
//! store's change feed ([`crate::store::Store::changed_since`]) every
//! [`TICK`], so it sees what any control-plane replica recorded, and a client
//! that reconnects with `Last-Event-ID` (browsers do by themselves, after a
//! restart too) gets every change it missed. A fresh stream starts with a
//! `hello` event whose id is the feed's head: a page that loads its data after
//! `hello` misses nothing. The stream ends after `max_s` seconds (at most 30) so
//! that generic clients never hang; the `retry` field asks browsers to reconnect
//! after one second. It also ends when the control plane stops, so that open pages
//! never hold a shutdown up.
//!
//! Authentication: a bearer token, or the session cookie of [`super::session`]
//! (an `EventSource` cannot send headers). Any scope may read the stream.

use std::{collections::VecDeque, convert::Infallible, time::Duration};

use axum::{
    extract::{Query, State},
    http::{HeaderMap, StatusCode},
    response::{
        sse::{Event, KeepAlive},
        IntoResponse, Response, Sse,
    },
};
use futures::stream;
use serde::Deserialize;
use tokio::time::Instant;

use super::{session, ApiState};
use crate::store::Store;

/// How often the stream looks for changes.
pub const TICK: Duration = Duration::from_millis(500);
/// The longest a stream stays open.
pub const MAX_OPEN: Duration = Duration::from_secs(30);
/// How often the stream sends the queues' figures (the demand loop measures them every few seconds).
pub const QUEUES_EVERY: Duration = Duration::from_secs(2);
const BATCH: i64 = 200;

/// Query of `GET /v1/stream`; an unknown parameter is refused.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct StreamQuery {
    /// Only changes of this job.
    job: Option<String>,
    /// Close after this many seconds (1–30, default 30).
    max_s: Option<u64>,
}

fn error(code: StatusCode, msg: impl Into<String>) -> Response {
    super::ApiError(code, msg.into()).into_response()
}

/// `GET /v1/stream`.
#[utoipa::path(get, path = "/v1/stream", tag = "console", security(("bearer" = []), ("session" = [])),
    params(StreamQuery, ("Last-Event-ID" = Option<String>, Header, description = "resume after this event id (browsers send it on reconnect)")),
    responses((status = 200, content_type = "text/event-stream", body = String,
            description = "server-sent events: `hello`/`resume` first, then `job` (a job row, id = its change cursor), `queues`, `workers` and, \
                for one job, `log`; `error` then the end when the store fails; ends after `max_s`"),
        (status = 400, description = "a bad query, `max_s` outside 1..=30, or a bad `Last-Event-ID`", body = super::ErrorBody),
        (status = 401, description = "neither a valid bearer token nor a valid session cookie", body = super::ErrorBody),
        super::errors::UnavailableResponses))]
pub async fn stream(
    State(s): State<ApiState>,
    headers: HeaderMap,
    query: Result<Query<StreamQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let authorized = match session::bearer(&headers) {
        Some(presented) => s.tokens.check(presented).is_some(),
        None => session::cookie(&headers).and_then(|c| session::verify(&s.tokens, c, chrono::Utc::now())).is_some(),
    };
    if !authorized {
        return super::errors::unauthorized("the stream needs a bearer token or a session cookie from POST /v1/session");
    }
    let Query(q) = match query {
        Ok(q) => q,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("bad stream query: {}", e.body_text())),
    };
    let max = match q.max_s {
        Some(n) if !(1..=30).contains(&n) => return error(StatusCode::BAD_REQUEST, format!("max_s must be 1 to 30 seconds, not {n}")),
        Some(n) => Duration::from_secs(n),
        None => MAX_OPEN,
    };
    let last = headers.get("last-event-id").map(|v| v.to_str().ok().and_then(|v| v.trim().parse::<i64>().ok()));
    let (cursor, hello) = match last {
        Some(Some(c)) => (c, false),
        Some(None) => return error(StatusCode::BAD_REQUEST, "Last-Event-ID must be an event id of this stream (an integer)"),
        None => match s.ops.store.feed_head().await {
            Ok(head) => (head, true),
            Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        },
    };
    let mut tail = Tail {
        store: s.ops.store.clone(),
        job: q.job,
        cursor,
        pending: VecDeque::new(),
        deadline: Instant::now() + max,
        shutdown: s.shutdown.clone(),
        registry: s.registry.clone(),
        workers: s.workers.clone(),
        queues_at: Instant::now(),
        live_logs: s.live_logs.clone(),
        log_shown: None,
    };
    // `hello` for a fresh stream (load the page's data now), `resume` after a reconnect.
    let first = Event::default().retry(Duration::from_secs(1)).event(if hello { "hello" } else { "resume" });
    tail.pending.push_back(first.id(cursor.to_string()).data("{}"));
    Sse::new(stream::unfold(tail, Tail::next)).keep_alive(KeepAlive::new().interval(Duration::from_secs(10))).into_response()
}

/// The state of one open stream.
struct Tail {
    store: Store,
    job: Option<String>,
    cursor: i64,
    pending: VecDeque<Event>,
    deadline: Instant,
    shutdown: tokio_util::sync::CancellationToken,
    registry: prometheus::Registry,
    workers: crate::workers::WorkerTable,
    queues_at: Instant,
    live_logs: crate::livelogs::LiveLogs,
    /// The live log sent so far: (attempt, worker, offset after it).
    log_shown: Option<crate::livelogs::Shown>,
}

impl Tail {
    async fn next(mut self) -> Option<(Result<Event, Infallible>, Self)> {
        loop {
            if let Some(e) = self.pending.pop_front() {
                return Some((Ok(e), self));
            }
            if Instant::now() >= self.deadline || self.shutdown.is_cancelled() {
                return None;
            }
            tokio::select! {
                _ = tokio::time::sleep_until((Instant::now() + TICK).min(self.deadline)) => self.poll().await,
                _ = self.shutdown.cancelled() => return None,
            }
        }
    }

    /// The jobs changed after the cursor: a page, or, when a whole page shares one cursor (a
    /// recorder batch is stamped with one time), every job of that cursor, so that moving the
    /// cursor past it skips none (it skipped all but the page's 200).
    async fn changes(&self) -> Result<Vec<crate::store::Change>, crate::store::StoreError> {
        let page = self.store.changed_since(self.cursor, BATCH).await?;
        match (page.first(), page.last()) {
            (Some(first), Some(last)) if page.len() as i64 == BATCH && first.cursor == last.cursor => {
                self.store.changed_at(first.cursor).await
            }
            _ => Ok(page),
        }
    }

    /// Queues the changes after the cursor, and every [`QUEUES_EVERY`] the queues' figures; on a
    /// store error, an `error` event and the end.
    async fn poll(&mut self) {
        if Instant::now() >= self.queues_at {
            self.queues_at = Instant::now() + QUEUES_EVERY;
            let data = serde_json::to_string(&super::queues::snapshot(&self.registry)).unwrap_or_else(|_| "{}".into());
            self.pending.push_back(Event::default().event("queues").data(data));
            let data = serde_json::to_string(&self.workers.rows(chrono::Utc::now())).unwrap_or_else(|_| "[]".into());
            self.pending.push_back(Event::default().event("workers").data(data));
        }
        if let Some(live) = self.job.as_deref().and_then(|j| self.live_logs.since(j, self.log_shown.as_ref())) {
            self.log_shown = Some(crate::livelogs::Shown::of(&live));
            let data = serde_json::to_string(&live).unwrap_or_else(|_| "{}".into());
            self.pending.push_back(Event::default().event("log").data(data));
        }
        match self.changes().await {
            Ok(changes) => {
                // A full batch may stop among the jobs of one cursor (a recorder batch shares
                // its stamp): leave that cursor's jobs for the next poll, which reads them all.
                // Sent now, they would carry an id a reconnecting browser resumes after, and
                // the rest of that cursor's jobs would never reach it.
                let full = changes.len() as i64 == BATCH && changes.first().map(|c| c.cursor) < changes.last().map(|c| c.cursor);
                let cut = changes.last().map(|c| c.cursor).filter(|_| full);
                for mut c in changes.into_iter().filter(|c| Some(c.cursor) != cut) {
                    self.cursor = self.cursor.max(c.cursor);
                    if self.job.as_ref().is_some_and(|j| *j != c.job.job_id) {
                        continue;
                    }
                    c.job.spec = None;
                    let data = serde_json::to_string(&c.job).unwrap_or_else(|_| "{}".into());
                    self.pending.push_back(Event::default().event("job").id(c.cursor.to_string()).data(data));
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "the live stream could not read the change feed");
                let data = serde_json::json!({"error": e.to_string()}).to_string();
                self.pending.push_back(Event::default().event("error").data(data));
                self.deadline = Instant::now();
            }
        }
    }
}
