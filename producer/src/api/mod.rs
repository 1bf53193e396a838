//! The HTTP API of the control plane (axum).
//!
//! `/healthz`, `/readyz`, `/metrics`, `/openapi.json` and the console's page
//! ([`crate::console`], at `/` and `/jobs/{id}`) are open; `/v1/session` signs a
//! console in ([`session`]), `/v1/stream` is the live feed ([`stream`], bearer
//! token or session cookie); everything else under `/v1/` needs a bearer token
//! ([`auth`]) whose scope covers the route: `GET` needs `read`; submitting,
//! cancelling and retrying need `submit`; dead-letter replay and model
//! promotion/rollback need `admin`. Request bodies are limited in size.

pub mod auth;
mod handlers;
pub mod queues;
pub mod session;
mod stream;

use std::sync::Arc;

use axum::{
    extract::{DefaultBodyLimit, Request, State},
    http::{header, Method, StatusCode},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
    Json, Router,
};
use prometheus::Registry;
use tower_http::limit::RequestBodyLimitLayer;
use trainyard_common::metrics::ControlMetrics;

use crate::ops::{Ops, OpsError};
pub use auth::{Scope, Tokens};

/// Default limit on a request body.
pub const DEFAULT_BODY_LIMIT: usize = 256 * 1024;

/// What the handlers share.
#[derive(Debug, Clone)]
pub struct ApiState {
    /// The operations.
    pub ops: Ops,
    /// Accepted tokens.
    pub tokens: Arc<Tokens>,
    /// Metrics registry rendered at `/metrics`.
    pub registry: Registry,
    /// Control-plane metrics, when registered.
    pub metrics: Option<ControlMetrics>,
    /// Cancelled when the control plane stops: open live streams end at once.
    pub shutdown: tokio_util::sync::CancellationToken,
    /// The live workers, from their heartbeats.
    pub workers: crate::workers::WorkerTable,
}

/// The caller of a `/v1/` request, for the audit trail.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The token's name.
    pub name: String,
    /// Its scope.
    pub scope: Scope,
}

/// The router, with a body limit of `body_limit` bytes.
pub fn router(state: ApiState, body_limit: usize) -> Router {
    let v1 = Router::new()
        .route("/jobs", get(handlers::list_jobs).post(handlers::submit))
        .route("/jobs/{id}", get(handlers::show_job))
        .route("/jobs/{id}/events", get(handlers::job_events))
        .route("/jobs/{id}/logs", get(handlers::job_logs))
        .route("/jobs/{id}/cancel", post(handlers::cancel))
        .route("/jobs/{id}/retry", post(handlers::retry))
        .route("/queues", get(queues::queues))
        .route("/workers", get(workers))
        .route("/audit", get(handlers::audit))
        .route("/dlq", get(handlers::dlq_list))
        .route("/dlq/replay", post(handlers::dlq_replay))
        .route("/models/{bot}", get(handlers::models))
        .route("/models/{bot}/rollback", post(handlers::rollback))
        .route("/models/promote/{job_id}", post(handlers::promote))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(handlers::readyz))
        .route("/metrics", get(handlers::metrics))
        .route("/openapi.json", get(handlers::openapi))
        .route("/v1/session", post(session::sign_in).delete(session::sign_out))
        .route("/v1/stream", get(stream::stream))
        .nest("/v1", v1)
        .merge(crate::console::router())
        .route_layer(middleware::from_fn_with_state(state.clone(), count_requests))
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(RequestBodyLimitLayer::new(body_limit))
        .with_state(state)
}

/// `GET /v1/workers`: every worker heard from in the last minutes, live ones first.
async fn workers(State(state): State<ApiState>) -> Json<Vec<crate::workers::WorkerRow>> {
    Json(state.workers.rows(chrono::Utc::now()))
}

/// Counts requests by route template (never the raw path: ids would explode the label set).
async fn count_requests(State(state): State<ApiState>, req: Request, next: Next) -> Response {
    let route = req.extensions().get::<axum::extract::MatchedPath>().map(|m| m.as_str().to_string()).unwrap_or_else(|| "other".into());
    let resp = next.run(req).await;
    if let Some(m) = &state.metrics {
        m.http_requests.with_label_values(&[route.as_str(), resp.status().as_str()]).inc();
    }
    resp
}

/// The scope a `/v1/` request needs.
fn required_scope(method: &Method, path: &str) -> Scope {
    if method == Method::GET || method == Method::HEAD {
        Scope::Read
    } else if path.contains("/dlq/") || path.contains("/models/") {
        Scope::Admin
    } else {
        Scope::Submit
    }
}

async fn require_token(State(state): State<ApiState>, mut req: Request, next: Next) -> Response {
    let presented = session::bearer(req.headers());
    let Some(token) = presented.and_then(|p| state.tokens.check(p)) else {
        let msg = if presented.is_none() { "missing bearer token" } else { "invalid token" };
        return (StatusCode::UNAUTHORIZED, [(header::WWW_AUTHENTICATE, "Bearer")], Json(serde_json::json!({"error": msg}))).into_response();
    };
    let needed = required_scope(req.method(), req.uri().path());
    if token.scope < needed {
        let msg = format!("token {:?} has scope {:?}; this needs {:?}", token.name, token.scope, needed);
        return (StatusCode::FORBIDDEN, Json(serde_json::json!({"error": msg}))).into_response();
    }
    req.extensions_mut().insert(Caller { name: token.name.clone(), scope: token.scope });
    next.run(req).await
}

/// An error as a JSON response.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl From<OpsError> for ApiError {
    fn from(e: OpsError) -> Self {
        let code = match &e {
            OpsError::NotFound(_) => StatusCode::NOT_FOUND,
            OpsError::Conflict(_) => StatusCode::CONFLICT,
            OpsError::BadRequest(_) => StatusCode::BAD_REQUEST,
            OpsError::Store(_) | OpsError::Common(_) => StatusCode::SERVICE_UNAVAILABLE,
        };
        if code == StatusCode::SERVICE_UNAVAILABLE {
            tracing::error!(error = %e, "API request failed");
        }
        ApiError(code, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({"error": self.1}))).into_response()
    }
}
