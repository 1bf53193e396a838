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
mod doc;
pub mod errors;
mod handlers;
pub mod queues;
mod schedules;
pub mod session;
mod stream;

use std::sync::Arc;

use axum::{
    extract::{DefaultBodyLimit, Request, State},
    http::{Method, StatusCode},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    Extension, Json, Router,
};
use prometheus::Registry;
use tower_http::limit::RequestBodyLimitLayer;
use trainyard_common::metrics::ControlMetrics;
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::ops::Ops;
pub use auth::{Scope, Tokens};
use errors::AuthResponses;
pub use errors::{ApiError, ErrorBody};

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
    /// The live log lines of running attempts, from the workers.
    pub live_logs: crate::livelogs::LiveLogs,
    /// The schedules and trigger rules this control plane runs.
    pub control: Arc<crate::config::ControlConfig>,
}

/// The caller of a `/v1/` request, for the audit trail.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The token's name.
    pub name: String,
    /// Its scope.
    pub scope: Scope,
}

/// The router, with a body limit of `body_limit` bytes, and the API document made from the
/// same registrations (served at `/openapi.json`): a route is added with `routes!` of a handler
/// annotated with `#[utoipa::path]`, so it is in the document by construction (`tests/it/openapi.rs`
/// checks that every route the router serves is documented, and every documented response).
pub fn router(state: ApiState, body_limit: usize) -> Router {
    let (app, document) = documented_router(state.clone()).split_for_parts();
    // Like axum's own refusal of overlapping routes: a programming error, caught by any test that starts the router.
    if let Err(e) = doc::check_documented(&app, &document) {
        panic!("{e}");
    }
    let document = Arc::new(document.to_pretty_json().expect("the API document serializes"));
    app.route_layer(middleware::from_fn_with_state(state.clone(), count_requests))
        .layer(Extension(doc::Document(document)))
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(RequestBodyLimitLayer::new(body_limit))
        .layer(middleware::from_fn(errors::json_errors))
        .with_state(state)
}

/// Every route, with its part of the API document.
fn documented_router(state: ApiState) -> OpenApiRouter<ApiState> {
    let v1 = OpenApiRouter::new()
        .routes(routes!(handlers::list_jobs, handlers::submit))
        .routes(routes!(handlers::show_job))
        .routes(routes!(handlers::job_events))
        .routes(routes!(handlers::job_logs))
        .routes(routes!(handlers::cancel))
        .routes(routes!(handlers::retry))
        .routes(routes!(queues::queues))
        .routes(routes!(workers))
        .routes(routes!(schedules::schedules))
        .routes(routes!(schedules::triggers))
        .routes(routes!(handlers::audit))
        .routes(routes!(handlers::dlq_list))
        .routes(routes!(handlers::dlq_replay))
        .routes(routes!(handlers::bot_usage))
        .routes(routes!(handlers::models))
        .routes(routes!(handlers::rollback))
        .routes(routes!(handlers::promote))
        // After the token check: a caller without one is told so first.
        .route_layer(middleware::from_fn(errors::refuse_nul))
        .route_layer(middleware::from_fn_with_state(state, require_token));
    OpenApiRouter::with_openapi(doc::base())
        .routes(routes!(handlers::healthz))
        .routes(routes!(handlers::readyz))
        .routes(routes!(handlers::metrics))
        .routes(routes!(handlers::openapi))
        .routes(routes!(session::sign_in, session::sign_out))
        .routes(routes!(stream::stream))
        .nest("/v1", v1)
        .merge(crate::console::router())
}

/// `GET /v1/workers`: every worker heard from in the last minutes, live ones first.
#[utoipa::path(get, path = "/workers", tag = "workers", security(("bearer" = [])),
    responses((status = 200, description = "the workers, live ones first", body = Vec<crate::workers::WorkerRow>), AuthResponses))]
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
        return errors::unauthorized(msg);
    };
    let needed = required_scope(req.method(), req.uri().path());
    if token.scope < needed {
        let msg = format!("token {:?} has scope {:?}; this needs {:?}", token.name, token.scope, needed);
        return ApiError(StatusCode::FORBIDDEN, msg).into_response();
    }
    req.extensions_mut().insert(Caller { name: token.name.clone(), scope: token.scope });
    next.run(req).await
}
