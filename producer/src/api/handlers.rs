//! Route handlers.

use axum::{
    extract::{Path, Query, State},
    http::{header, StatusCode},
    response::{IntoResponse, Response},
    Extension, Json,
};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use trainyard_common::{JobSpec, JobStatus, Trigger, TriggerKind};

use super::{ApiError, ApiState, Caller};
use crate::{
    ops::ReplayRequest,
    store::{JobCursor, JobFilter},
};

type ApiResult<T> = Result<T, ApiError>;

const OPENAPI: &str = include_str!("openapi.json");

pub async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

pub async fn metrics(State(s): State<ApiState>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], trainyard_common::metrics::render(&s.registry)).into_response()
}

pub async fn readyz(State(s): State<ApiState>) -> Response {
    if let Err(e) = s.ops.store.is_empty().await {
        return (StatusCode::SERVICE_UNAVAILABLE, format!("job store: {e}")).into_response();
    }
    if let Err(e) = s.ops.submitter.declare_shared().await {
        return (StatusCode::SERVICE_UNAVAILABLE, format!("broker: {e}")).into_response();
    }
    "ready".into_response()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    status: Option<JobStatus>,
    #[serde(rename = "type")]
    job_type: Option<String>,
    bot: Option<String>,
    trigger: Option<TriggerKind>,
    since: Option<DateTime<Utc>>,
    until: Option<DateTime<Utc>>,
    /// Job id prefix.
    q: Option<String>,
    /// The `X-Next-Cursor` of the previous page.
    before: Option<String>,
    limit: Option<i64>,
}

/// `GET /v1/jobs`: a page of jobs, newest first; when the page is full, the
/// `X-Next-Cursor` header carries the `before` of the next one.
pub async fn list_jobs(State(s): State<ApiState>, Query(q): Query<ListQuery>) -> ApiResult<Response> {
    let before = q.before.as_deref().map(str::parse::<JobCursor>).transpose().map_err(crate::ops::OpsError::BadRequest)?;
    let filter = JobFilter {
        status: q.status,
        job_type: q.job_type,
        bot: q.bot,
        trigger: q.trigger,
        since: q.since,
        until: q.until,
        id_prefix: q.q,
        before,
        limit: q.limit.unwrap_or(100),
    };
    let jobs = s.ops.list(&filter).await?;
    let next = filter.next_cursor(&jobs);
    let mut resp = Json(jobs).into_response();
    if let Some(c) = next.and_then(|c| header::HeaderValue::from_str(&c.to_string()).ok()) {
        resp.headers_mut().insert("x-next-cursor", c);
    }
    Ok(resp)
}

/// Body of `POST /v1/jobs`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubmitBody {
    job_type: String,
    bot: String,
    #[serde(default)]
    params: Option<serde_json::Value>,
    max_attempts: Option<u32>,
    timeout_s: Option<u64>,
    idempotency_key: Option<String>,
}

pub async fn submit(State(s): State<ApiState>, Extension(caller): Extension<Caller>, Json(b): Json<SubmitBody>) -> ApiResult<Response> {
    let params = b.params.unwrap_or_else(|| serde_json::json!({}));
    let mut spec = JobSpec::new(b.job_type, b.bot, params, Trigger { kind: TriggerKind::Api, source: caller.name.clone() });
    if let Some(n) = b.max_attempts {
        spec.max_attempts = n;
    }
    if let Some(t) = b.timeout_s {
        spec.timeout_s = t;
    }
    if let Some(key) = b.idempotency_key {
        spec.job_id = uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_URL, format!("trainyard:{key}").as_bytes()).to_string();
        spec.idempotency_key = Some(key);
    }
    let spec = s.ops.submit(spec).await?;
    if let Some(m) = &s.metrics {
        m.jobs_submitted.with_label_values(&[spec.job_type.as_str(), "api"]).inc();
    }
    let body = serde_json::json!({"job_id": spec.job_id, "job_type": spec.job_type, "bot": spec.bot, "status": "queued"});
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

pub async fn show_job(State(s): State<ApiState>, Path(id): Path<String>) -> ApiResult<Response> {
    Ok(Json(s.ops.show(&id).await?).into_response())
}

pub async fn job_events(State(s): State<ApiState>, Path(id): Path<String>) -> ApiResult<Response> {
    if s.ops.store.job(&id).await.map_err(crate::ops::OpsError::from)?.is_none() {
        return Err(crate::ops::OpsError::NotFound(format!("no job {id:?} in the job store")).into());
    }
    Ok(Json(s.ops.store.events(&id).await.map_err(crate::ops::OpsError::from)?).into_response())
}

#[derive(Debug, Deserialize)]
pub struct LogsQuery {
    attempt: Option<u32>,
}

pub async fn job_logs(State(s): State<ApiState>, Path(id): Path<String>, Query(q): Query<LogsQuery>) -> ApiResult<Response> {
    let text = s.ops.logs(&id, q.attempt).await?;
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response())
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReasonBody {
    #[serde(default)]
    reason: String,
}

pub async fn cancel(
    State(s): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    body: Option<Json<ReasonBody>>,
) -> ApiResult<Response> {
    let reason = body.map(|b| b.0.reason).unwrap_or_default();
    let req = s.ops.cancel(&id, &caller.name, &reason).await?;
    Ok((StatusCode::ACCEPTED, Json(req)).into_response())
}

pub async fn retry(State(s): State<ApiState>, Extension(caller): Extension<Caller>, Path(id): Path<String>) -> ApiResult<Response> {
    let spec = s.ops.retry(&id, &caller.name, TriggerKind::Api).await?;
    let body = serde_json::json!({"job_id": spec.job_id, "retry_of": id, "job_type": spec.job_type, "bot": spec.bot, "status": "queued"});
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

#[derive(Debug, Deserialize)]
pub struct DlqQuery {
    #[serde(rename = "type")]
    job_type: Option<String>,
}

/// `GET /v1/audit`: the audit trail, newest first.
pub async fn audit(State(s): State<ApiState>, Query(f): Query<crate::store::AuditFilter>) -> ApiResult<Response> {
    Ok(Json(s.ops.audit_trail(&f).await?).into_response())
}

pub async fn dlq_list(State(s): State<ApiState>, Query(q): Query<DlqQuery>) -> ApiResult<Response> {
    Ok(Json(s.ops.dead_letters(q.job_type.as_deref()).await?).into_response())
}

pub async fn dlq_replay(
    State(s): State<ApiState>,
    Extension(caller): Extension<Caller>,
    Json(req): Json<ReplayRequest>,
) -> ApiResult<Response> {
    let replayed = s.ops.replay(&req, &caller.name).await?;
    Ok(Json(serde_json::json!({"replayed": replayed})).into_response())
}

pub async fn models(State(s): State<ApiState>, Path(bot): Path<String>) -> ApiResult<Response> {
    Ok(Json(s.ops.models(&bot).await?).into_response())
}

pub async fn promote(State(s): State<ApiState>, Extension(caller): Extension<Caller>, Path(job_id): Path<String>) -> ApiResult<Response> {
    let entry = s.ops.promote(&job_id, &caller.name).await?;
    if let Some(m) = &s.metrics {
        m.promotions.with_label_values(&["manual"]).inc();
    }
    Ok(Json(entry).into_response())
}

pub async fn rollback(State(s): State<ApiState>, Extension(caller): Extension<Caller>, Path(bot): Path<String>) -> ApiResult<Response> {
    let now = s.ops.rollback(&bot, &caller.name).await?;
    if let Some(m) = &s.metrics {
        m.promotions.with_label_values(&["rollback"]).inc();
    }
    Ok(Json(serde_json::json!({"bot": bot, "production": now})).into_response())
}
