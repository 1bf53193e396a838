//! The operators' web console, served by the control plane at `/`.
//!
//! Plain HTML, CSS and JavaScript embedded in the binary (`include_str!`): no
//! Node toolchain to build or run it. The page talks to the HTTP API like any
//! client: it signs in with an API token (a form, or `/#token=…`, which it
//! removes from the address bar), keeps the token in the tab's
//! `sessionStorage`, calls `/v1/…` with it as a bearer token, and follows
//! `/v1/stream` (server-sent events, authenticated by the session cookie) so
//! that no view polls. Actions the token's scope does not allow are not offered;
//! the API refuses them anyway.
//!
//! `/jobs/{id}` serves the same page, opened on that job.

use axum::{
    extract::Path,
    http::{header, StatusCode},
    response::{Html, IntoResponse, Response},
};
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::api::ApiState;

const INDEX: &str = include_str!("index.html");

/// The embedded assets: (file name, content type, content).
const ASSETS: &[(&str, &str, &str)] = &[
    ("console.css", "text/css; charset=utf-8", include_str!("console.css")),
    ("app.js", "text/javascript; charset=utf-8", include_str!("app.js")),
    ("jobs.js", "text/javascript; charset=utf-8", include_str!("jobs.js")),
    ("job.js", "text/javascript; charset=utf-8", include_str!("job.js")),
    ("admin.js", "text/javascript; charset=utf-8", include_str!("admin.js")),
    ("queues.js", "text/javascript; charset=utf-8", include_str!("queues.js")),
    ("workers.js", "text/javascript; charset=utf-8", include_str!("workers.js")),
    ("audit.js", "text/javascript; charset=utf-8", include_str!("audit.js")),
    ("schedules.js", "text/javascript; charset=utf-8", include_str!("schedules.js")),
];

/// The console's routes: the page at `/` and `/jobs/{id}`, its assets under `/console/`.
pub fn router() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new().routes(routes!(index)).routes(routes!(job_page)).routes(routes!(asset))
}

/// `GET /`: the console.
#[utoipa::path(get, path = "/", tag = "console",
    responses((status = 200, description = "the console's page (signs in with its form or `/#token=`)", content_type = "text/html", body = String)))]
async fn index() -> Response {
    ([(header::CACHE_CONTROL, "no-cache")], Html(INDEX)).into_response()
}

/// `GET /jobs/{id}`: the console, opened on one job.
#[utoipa::path(get, path = "/jobs/{id}", tag = "console", params(("id" = String, Path, description = "job id")),
    responses((status = 200, description = "the console's page", content_type = "text/html", body = String)))]
async fn job_page() -> Response {
    index().await
}

/// `GET /console/{file}`: an embedded asset.
#[utoipa::path(get, path = "/console/{file}", tag = "console", params(("file" = String, Path, description = "asset file name")),
    responses((status = 200, description = "the asset", content((String = "text/javascript"), (String = "text/css"))),
        (status = 404, description = "no such asset", body = crate::api::ErrorBody)))]
async fn asset(Path(file): Path<String>) -> Response {
    match ASSETS.iter().find(|(name, _, _)| *name == file) {
        Some((_, ty, body)) => ([(header::CONTENT_TYPE, *ty), (header::CACHE_CONTROL, "no-cache")], *body).into_response(),
        None => crate::api::ApiError(StatusCode::NOT_FOUND, format!("no console asset {file:?}")).into_response(),
    }
}
