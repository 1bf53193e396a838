//! Route handlers.

use axum::{
    extract::{Path, Query, State},
    http::{header, StatusCode},
    response::{IntoResponse, Response},
    Extension, Json,
};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use trainyard_common::{control::CancelRequest, models::ProductionEntry, JobEvent, JobSpec, JobStatus, Trigger, TriggerKind};
use utoipa::{IntoParams, ToSchema};

use super::{
    doc::Document,
    errors::{AuthResponses, BodyResponses, ScopeResponses, UnavailableResponses},
    ApiError, ApiState, Caller, ErrorBody,
};
use crate::{
    ops::{BotModels, JobDetail, ReplayRequest},
    store::{DeadLetter, JobCursor, JobFilter, JobRow},
};

type ApiResult<T> = Result<T, ApiError>;

/// `GET /openapi.json`: this document, generated from the code.
#[utoipa::path(get, path = "/openapi.json", tag = "service",
    responses((status = 200, description = "the OpenAPI 3.1 document of this API", content_type = "application/json", body = Object)))]
pub async fn openapi(Extension(doc): Extension<Document>) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], doc.0.as_str().to_string()).into_response()
}

/// `GET /healthz`: the process answers.
#[utoipa::path(get, path = "/healthz", tag = "service", responses((status = 200, description = "`ok`", content_type = "text/plain", body = String)))]
pub async fn healthz() -> &'static str {
    "ok"
}

/// `GET /metrics`: Prometheus metrics.
#[utoipa::path(get, path = "/metrics", tag = "service",
    responses((status = 200, description = "Prometheus text format 0.0.4", content_type = "text/plain", body = String)))]
pub async fn metrics(State(s): State<ApiState>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], trainyard_common::metrics::render(&s.registry)).into_response()
}

/// `GET /readyz`: the job store and the broker answer.
#[utoipa::path(get, path = "/readyz", tag = "service",
    responses((status = 200, description = "`ready`", content_type = "text/plain", body = String),
        (status = 503, description = "the job store or the broker does not answer", body = ErrorBody)))]
pub async fn readyz(State(s): State<ApiState>) -> Response {
    if let Err(e) = s.ops.store.is_empty().await {
        return ApiError(StatusCode::SERVICE_UNAVAILABLE, format!("job store: {e}")).into_response();
    }
    if let Err(e) = s.ops.submitter.declare_shared().await {
        return ApiError(StatusCode::SERVICE_UNAVAILABLE, format!("broker: {e}")).into_response();
    }
    "ready".into_response()
}

/// Query of `GET /v1/jobs`; an unknown parameter is refused.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only this status.
    #[param(value_type = Option<JobStatus>)]
    status: Option<String>,
    /// Only this job type.
    #[serde(rename = "type")]
    job_type: Option<String>,
    /// Only this bot.
    bot: Option<String>,
    /// Only jobs triggered this way.
    #[param(value_type = Option<TriggerKind>)]
    trigger: Option<String>,
    /// RFC 3339: only jobs created at or after.
    since: Option<DateTime<Utc>>,
    /// RFC 3339: only jobs created before.
    until: Option<DateTime<Utc>>,
    /// Job id prefix.
    q: Option<String>,
    /// The `X-Next-Cursor` of the previous page.
    before: Option<String>,
    /// Page size, 1 to 10,000 (default 100).
    limit: Option<i64>,
}

/// `GET /v1/jobs`: a page of jobs, newest first; when the page is full, the
/// `X-Next-Cursor` header carries the `before` of the next one.
#[utoipa::path(get, path = "/jobs", tag = "jobs", security(("bearer" = [])), params(ListQuery),
    responses((status = 200, description = "a page of jobs, newest first", body = Vec<JobRow>,
            headers(("X-Next-Cursor" = String, description = "when the page is full: the `before` of the next page"))),
        (status = 400, description = "a bad query: an unknown parameter, a status or trigger no job has, a `limit` outside 1 to \
            10,000, a bad time or cursor", body = ErrorBody),
        AuthResponses, UnavailableResponses))]
pub async fn list_jobs(State(s): State<ApiState>, Query(q): Query<ListQuery>) -> ApiResult<Response> {
    let bad = crate::ops::OpsError::BadRequest;
    let before = q.before.as_deref().map(str::parse::<JobCursor>).transpose().map_err(bad)?;
    let filter = JobFilter {
        status: q.status.as_deref().map(str::parse).transpose().map_err(bad)?,
        job_type: q.job_type,
        bot: q.bot,
        trigger: q.trigger.as_deref().map(str::parse).transpose().map_err(bad)?,
        since: q.since,
        until: q.until,
        id_prefix: q.q,
        before,
        limit: q.limit.unwrap_or(100),
    };
    let jobs = s.ops.list(&filter).await?;
    let next = filter.next_cursor(&jobs);
    Ok(with_next_cursor(Json(jobs).into_response(), next))
}

/// Body of `POST /v1/jobs`; an unknown field is refused.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SubmitBody {
    /// A job type this control plane knows.
    job_type: String,
    /// The bot.
    bot: String,
    /// Per-type parameters (default `{}`).
    #[serde(default)]
    params: Option<serde_json::Value>,
    /// Attempts allowed in total.
    max_attempts: Option<u32>,
    /// Wall-clock limit of one attempt, seconds.
    timeout_s: Option<u64>,
    /// Submitting the same key again is the same job: once the store has it, it is answered
    /// (200, with its status) and not published again.
    idempotency_key: Option<String>,
}

/// A job submitted (`POST /v1/jobs`, and `retry` with `retry_of`).
#[derive(Debug, Serialize, ToSchema)]
pub struct Submitted {
    /// The new job.
    job_id: String,
    /// The job it retries.
    #[serde(skip_serializing_if = "Option::is_none")]
    retry_of: Option<String>,
    /// Its type.
    job_type: String,
    /// Its bot.
    bot: String,
    /// `queued`; for an idempotency key naming a job the store already has, that job's status.
    status: JobStatus,
}

impl Submitted {
    fn new(spec: &JobSpec, retry_of: Option<String>, status: JobStatus) -> Self {
        Self { job_id: spec.job_id.clone(), retry_of, job_type: spec.job_type.clone(), bot: spec.bot.clone(), status }
    }
}

/// `POST /v1/jobs`: submits a job (confirmed by the broker before the answer).
#[utoipa::path(post, path = "/jobs", tag = "jobs", security(("bearer" = [])), request_body = SubmitBody,
    responses((status = 201, description = "queued", body = Submitted),
        (status = 200, description = "the idempotency key names a job the store already has (the same work): that job, not published again", body = Submitted),
        (status = 409, description = "the idempotency key was used for a job of another type, bot or params", body = ErrorBody),
        BodyResponses, ScopeResponses, UnavailableResponses))]
pub async fn submit(
    State(s): State<ApiState>,
    Extension(caller): Extension<Caller>,
    headers: axum::http::HeaderMap,
    Json(b): Json<SubmitBody>,
) -> ApiResult<Response> {
    let params = b.params.unwrap_or_else(|| serde_json::json!({}));
    let mut spec = JobSpec::new(b.job_type, b.bot, params, Trigger { kind: TriggerKind::Api, source: caller.name.clone() });
    if let Some(n) = b.max_attempts {
        spec.max_attempts = n;
    }
    if let Some(t) = b.timeout_s {
        spec.timeout_s = t;
    }
    if let Some(key) = b.idempotency_key {
        spec.set_idempotency_key(&key).map_err(crate::ops::OpsError::BadRequest)?;
    }
    // A caller's W3C trace context goes on with the job (the worker logs its trace id).
    // More than one `traceparent` is no trace context (W3C): the job starts a trace of its own.
    let mut sent = headers.get_all(trainyard_common::headers::TRACEPARENT).iter();
    let traceparent = match (sent.next(), sent.next()) {
        (Some(one), None) => one.to_str().ok(),
        _ => None,
    };
    let done = s.ops.submit_traced(spec, traceparent).await?;
    if let Some(status) = done.known {
        return Ok((StatusCode::OK, Json(Submitted::new(&done.spec, None, status))).into_response());
    }
    if let Some(m) = &s.metrics {
        m.jobs_submitted.with_label_values(&[done.spec.job_type.as_str(), "api"]).inc();
    }
    Ok((StatusCode::CREATED, Json(Submitted::new(&done.spec, None, JobStatus::Queued))).into_response())
}

/// `GET /v1/jobs/{id}`: everything about one job.
#[utoipa::path(get, path = "/jobs/{id}", tag = "jobs", security(("bearer" = [])), params(("id" = String, Path, description = "job id")),
    responses((status = 200, description = "the job, its events and outputs", body = JobDetail),
        (status = 404, description = "no such job", body = ErrorBody), AuthResponses, UnavailableResponses))]
pub async fn show_job(State(s): State<ApiState>, Path(id): Path<String>) -> ApiResult<Response> {
    Ok(Json(s.ops.show(&id).await?).into_response())
}

/// `GET /v1/jobs/{id}/events`: a job's events, in order.
#[utoipa::path(get, path = "/jobs/{id}/events", tag = "jobs", security(("bearer" = [])), params(("id" = String, Path, description = "job id")),
    responses((status = 200, description = "its events, in order", body = Vec<JobEvent>),
        (status = 404, description = "no such job", body = ErrorBody), AuthResponses, UnavailableResponses))]
pub async fn job_events(State(s): State<ApiState>, Path(id): Path<String>) -> ApiResult<Response> {
    if s.ops.store.job(&id).await.map_err(crate::ops::OpsError::from)?.is_none() {
        return Err(crate::ops::OpsError::NotFound(format!("no job {id:?} in the job store")).into());
    }
    Ok(Json(s.ops.store.events(&id).await.map_err(crate::ops::OpsError::from)?).into_response())
}

/// Query of `GET /v1/jobs/{id}/logs`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct LogsQuery {
    /// One attempt's log (default: every saved one, each after a header line).
    attempt: Option<u32>,
}

/// `GET /v1/jobs/{id}/logs`: the saved logs of a job's attempts; while the job runs, without
/// `attempt`, also the running attempt's live lines that this control plane holds.
#[utoipa::path(get, path = "/jobs/{id}/logs", tag = "jobs", security(("bearer" = [])),
    params(("id" = String, Path, description = "job id"), LogsQuery),
    responses((status = 200, content_type = "text/plain", body = String,
            description = "the log text: with `attempt`, that attempt's saved log; without, each saved log after a line \
                `==> attempt N <==`, and while the job runs, the running attempt's live lines held by this control plane \
                (its newest 256 KiB) after a line `==> attempt N (running: its lines so far) <==`"),
        (status = 400, description = "a bad query: an unknown parameter, `attempt` not a number", body = ErrorBody),
        (status = 404, description = "no saved log for this job or attempt (and no live lines of a running attempt)", body = ErrorBody),
        AuthResponses, UnavailableResponses))]
pub async fn job_logs(State(s): State<ApiState>, Path(id): Path<String>, Query(q): Query<LogsQuery>) -> ApiResult<Response> {
    let saved = s.ops.logs(&id, q.attempt).await;
    let live = if q.attempt.is_none() { running_attempt_log(&s, &id).await? } else { None };
    let text = match (saved, live) {
        (Ok(saved), live) => saved + live.as_deref().unwrap_or_default(),
        (Err(crate::ops::OpsError::NotFound(_)), Some(live)) => live,
        (Err(e), _) => return Err(e.into()),
    };
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response())
}

/// The live lines held of the job's running attempt, after a header line; `None` when the job is
/// finished, none are held, or that attempt has a saved log already.
async fn running_attempt_log(s: &ApiState, id: &str) -> Result<Option<String>, crate::ops::OpsError> {
    let Some(live) = s.live_logs.since(id, None) else { return Ok(None) };
    if s.ops.store.job(id).await?.is_none_or(|job| job.status.is_terminal()) || s.ops.log_attempts(id).await?.contains(&live.attempt) {
        return Ok(None);
    }
    let gap = if live.offset > 0 { format!("[… the first {} bytes are no longer held …]\n", live.offset) } else { String::new() };
    Ok(Some(format!("==> attempt {} (running: its lines so far) <==\n{gap}{}", live.attempt, live.text)))
}

/// An optional JSON body: none is `T::default()`; one sent without its JSON content type is a
/// 415 (it used to be ignored, and what it asked for with it).
pub struct OptionalJson<T>(pub T);

impl<T: serde::de::DeserializeOwned + Default, S: Send + Sync> axum::extract::FromRequest<S> for OptionalJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, ApiError> {
        let ct = req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        let body = axum::body::Bytes::from_request(req, state).await.map_err(|e| ApiError(e.status(), e.body_text()))?;
        if body.is_empty() {
            return Ok(Self(T::default()));
        }
        if ct.split(';').next().map(str::trim) != Some("application/json") {
            return Err(ApiError(StatusCode::UNSUPPORTED_MEDIA_TYPE, format!("the body must be application/json, not {ct:?}")));
        }
        Ok(Self(Json::<T>::from_bytes(&body).map_err(|e| ApiError(e.status(), e.body_text()))?.0))
    }
}

/// Optional body of `POST /v1/jobs/{id}/cancel`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReasonBody {
    /// Why, for the audit trail.
    #[serde(default)]
    reason: String,
}

/// `POST /v1/jobs/{id}/cancel`: asks the workers to cancel a job.
#[utoipa::path(post, path = "/jobs/{id}/cancel", tag = "jobs", security(("bearer" = [])), params(("id" = String, Path, description = "job id")),
    request_body(content = Option<ReasonBody>, description = "optional: why"),
    responses((status = 202, description = "the cancel request, sent", body = CancelRequest),
        (status = 409, description = "the job has already finished", body = ErrorBody),
        BodyResponses, ScopeResponses, UnavailableResponses))]
pub async fn cancel(
    State(s): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    OptionalJson(body): OptionalJson<ReasonBody>,
) -> ApiResult<Response> {
    let req = s.ops.cancel(&id, &caller.name, &body.reason).await?;
    Ok((StatusCode::ACCEPTED, Json(req)).into_response())
}

/// `POST /v1/jobs/{id}/retry`: submits a finished job again as a new job (same type, bot, params, tier and coalescing key).
#[utoipa::path(post, path = "/jobs/{id}/retry", tag = "jobs", security(("bearer" = [])), params(("id" = String, Path, description = "job id")),
    responses((status = 201, description = "the new job, queued", body = Submitted),
        (status = 200, description = "the job's last retry, not finished yet: that job, nothing published", body = Submitted),
        (status = 404, description = "no such job", body = ErrorBody),
        (status = 409, description = "the job has not finished, or has no recorded spec", body = ErrorBody),
        ScopeResponses, UnavailableResponses))]
pub async fn retry(State(s): State<ApiState>, Extension(caller): Extension<Caller>, Path(id): Path<String>) -> ApiResult<Response> {
    let done = s.ops.retry(&id, &caller.name, TriggerKind::Api).await?;
    let code = if done.known.is_some() { StatusCode::OK } else { StatusCode::CREATED };
    Ok((code, Json(Submitted::new(&done.spec, Some(id), done.known.unwrap_or(JobStatus::Queued)))).into_response())
}

/// Query of `GET /v1/dlq`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DlqQuery {
    /// Only this job type.
    #[serde(rename = "type")]
    job_type: Option<String>,
    /// The `X-Next-Cursor` of the previous page.
    before: Option<String>,
    /// Page size, 1 to 10,000 (default 100).
    limit: Option<i64>,
}

/// `GET /v1/audit`: the audit trail, newest first.
#[utoipa::path(get, path = "/audit", tag = "ops", security(("bearer" = [])), params(crate::store::AuditFilter),
    responses((status = 200, description = "the audit trail, newest first", body = Vec<crate::audit::AuditRecord>),
        (status = 400, description = "a bad query: an unknown parameter, `limit` not a number or outside 1 to 10,000", body = ErrorBody), AuthResponses, UnavailableResponses))]
pub async fn audit(State(s): State<ApiState>, Query(f): Query<crate::store::AuditFilter>) -> ApiResult<Response> {
    Ok(Json(s.ops.audit_trail(&f).await?).into_response())
}

/// `GET /v1/dlq`: a page of the dead letters not replayed yet, newest first; when the page is
/// full, the `X-Next-Cursor` header carries the `before` of the next one.
#[utoipa::path(get, path = "/dlq", tag = "ops", security(("bearer" = [])), params(DlqQuery),
    responses((status = 200, description = "a page of the dead letters not replayed yet, newest first", body = Vec<DeadLetter>,
            headers(("X-Next-Cursor" = String, description = "when the page is full: the `before` of the next page"))),
        (status = 400, description = "a bad query: an unknown parameter, a `limit` outside 1 to 10,000, a bad cursor", body = ErrorBody),
        AuthResponses, UnavailableResponses))]
pub async fn dlq_list(State(s): State<ApiState>, Query(q): Query<DlqQuery>) -> ApiResult<Response> {
    let before = q.before.as_deref().map(str::parse::<JobCursor>).transpose().map_err(crate::ops::OpsError::BadRequest)?;
    let (letters, next) = s.ops.dead_letters(q.job_type.as_deref(), before.as_ref(), q.limit.unwrap_or(100)).await?;
    Ok(with_next_cursor(Json(letters).into_response(), next))
}

/// `resp` with the `X-Next-Cursor` header when there is a next page.
fn with_next_cursor(mut resp: Response, next: Option<JobCursor>) -> Response {
    if let Some(c) = next.and_then(|c| header::HeaderValue::from_str(&c.to_string()).ok()) {
        resp.headers_mut().insert("x-next-cursor", c);
    }
    resp
}

/// What `POST /v1/dlq/replay` replayed.
#[derive(Debug, Serialize, ToSchema)]
pub struct Replayed {
    /// The jobs republished.
    replayed: Vec<String>,
}

/// `POST /v1/dlq/replay`: republishes one dead letter, or every one of a job type.
#[utoipa::path(post, path = "/dlq/replay", tag = "ops", security(("bearer" = [])), request_body = ReplayRequest,
    responses((status = 200, description = "the jobs replayed", body = Replayed),
        (status = 404, description = "no dead letter of this job, or no dead-letter queue of this job type", body = ErrorBody),
        BodyResponses, ScopeResponses, UnavailableResponses))]
pub async fn dlq_replay(
    State(s): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Json(req): Json<ReplayRequest>,
) -> ApiResult<Response> {
    let replayed = s.ops.replay(&req, &caller.name).await?;
    Ok(Json(Replayed { replayed }).into_response())
}

/// `GET /v1/bots/{bot}/usage`: per job type with admission, the bot's jobs admitted and
/// waiting against its `max_running_per_bot` and fair share.
#[utoipa::path(get, path = "/bots/{bot}/usage", tag = "ops", security(("bearer" = [])), params(("bot" = String, Path, description = "bot")),
    responses((status = 200, description = "per job type with admission, the bot's usage",
        body = std::collections::BTreeMap<String, crate::admission::state::BotUsage>), AuthResponses))]
pub async fn bot_usage(State(s): State<ApiState>, Path(bot): Path<String>) -> ApiResult<Response> {
    Ok(Json(s.ops.bot_usage(&bot)).into_response())
}

/// `GET /v1/models/{bot}`: a bot's production model and promotion history.
#[utoipa::path(get, path = "/models/{bot}", tag = "models", security(("bearer" = [])), params(("bot" = String, Path, description = "bot")),
    responses((status = 200, description = "production model and history", body = BotModels), AuthResponses, UnavailableResponses))]
pub async fn models(State(s): State<ApiState>, Path(bot): Path<String>) -> ApiResult<Response> {
    Ok(Json(s.ops.models(&bot).await?).into_response())
}

/// `POST /v1/models/promote/{job_id}`: makes a training job's model the bot's production model.
#[utoipa::path(post, path = "/models/promote/{job_id}", tag = "models", security(("bearer" = [])),
    params(("job_id" = String, Path, description = "the training job")),
    responses((status = 200, description = "the new production entry", body = ProductionEntry),
        (status = 404, description = "no such job", body = ErrorBody),
        (status = 409, description = "the job has not succeeded, or has no complete model to promote", body = ErrorBody),
        ScopeResponses, UnavailableResponses))]
pub async fn promote(State(s): State<ApiState>, Extension(caller): Extension<Caller>, Path(job_id): Path<String>) -> ApiResult<Response> {
    let (entry, made) = s.ops.promote(&job_id, &caller.name).await?;
    if let Some(m) = s.metrics.as_ref().filter(|_| made) {
        m.promotions.with_label_values(&["manual"]).inc();
    }
    Ok(Json(entry).into_response())
}

/// What `POST /v1/models/{bot}/rollback` left in production.
#[derive(Debug, Serialize, ToSchema)]
pub struct RolledBack {
    /// The bot.
    bot: String,
    /// Its production model now (`null`: none left).
    production: Option<ProductionEntry>,
}

/// Optional body of `POST /v1/models/{bot}/rollback`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RollbackBody {
    /// Roll back only from this production model (a job id): a request sent twice, or by two
    /// operators at once, then goes back once, not two models.
    #[serde(default)]
    from: Option<String>,
}

/// `POST /v1/models/{bot}/rollback`: the previous production model serves again.
#[utoipa::path(post, path = "/models/{bot}/rollback", tag = "models", security(("bearer" = [])), params(("bot" = String, Path, description = "bot")),
    request_body(content = Option<RollbackBody>, description = "optional: the production model to roll back from"),
    responses((status = 200, description = "the production model now", body = RolledBack),
        (status = 409, description = "the bot has no production model, or it is not the model named by `from`", body = ErrorBody),
        BodyResponses, ScopeResponses, UnavailableResponses))]
pub async fn rollback(
    State(s): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Path(bot): Path<String>,
    OptionalJson(body): OptionalJson<RollbackBody>,
) -> ApiResult<Response> {
    let now = s.ops.rollback(&bot, &caller.name, body.from.as_deref()).await?;
    if let Some(m) = &s.metrics {
        m.promotions.with_label_values(&["rollback"]).inc();
    }
    Ok(Json(RolledBack { bot, production: now }).into_response())
}
