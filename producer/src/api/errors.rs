//! The API's one error shape, `{"error": "<why>"}`, and its place in the API document.
//!
//! Handlers answer errors with [`ApiError`]; [`json_errors`] turns every other error response
//! (axum's extractor rejections, a body over the limit, an unknown route, a wrong method: plain
//! text or empty) into the same shape, so that a client reads one error body everywhere, as the
//! document says. The `*Responses` types are the error responses many routes share, for the
//! routes' `responses(...)` in the document.

use std::collections::BTreeMap;

use axum::{
    body::Body,
    extract::Request,
    http::{header, HeaderValue, StatusCode},
    middleware::Next,
    response::{IntoResponse, Response},
    Json,
};
use serde::Serialize;
use utoipa::{
    openapi::{response::ResponseBuilder, Content, HeaderBuilder, Ref, RefOr},
    IntoResponses, ToSchema,
};

use crate::ops::OpsError;

/// The body of every error response.
#[derive(Debug, Clone, Serialize, serde::Deserialize, ToSchema)]
pub struct ErrorBody {
    /// What went wrong, for a person.
    pub error: String,
}

/// An error response: a status and a message.
#[derive(Debug)]
pub struct ApiError(pub StatusCode, pub String);

impl From<OpsError> for ApiError {
    fn from(e: OpsError) -> Self {
        let code = status(&e);
        if code == StatusCode::SERVICE_UNAVAILABLE {
            tracing::error!(error = %e, "API request failed");
        }
        ApiError(code, e.to_string())
    }
}

/// The status an error answers: a request that failed partway answers as its failure.
fn status(e: &OpsError) -> StatusCode {
    match e {
        OpsError::NotFound(_) => StatusCode::NOT_FOUND,
        OpsError::Conflict(_) => StatusCode::CONFLICT,
        OpsError::BadRequest(_) => StatusCode::BAD_REQUEST,
        OpsError::Store(_) | OpsError::Common(_) => StatusCode::SERVICE_UNAVAILABLE,
        OpsError::Partial { source, .. } => status(source),
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(ErrorBody { error: self.1 })).into_response()
    }
}

/// A 401 asking for a bearer token.
pub fn unauthorized(msg: &str) -> Response {
    let mut resp = ApiError(StatusCode::UNAUTHORIZED, msg.to_string()).into_response();
    resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    resp
}

/// Route middleware of `/v1/`, after the token check: a request whose path or query holds a NUL
/// character (`%00`; a raw one cannot be in a URI) is refused with a 400 before its handler.
/// No id, bot, type or filter holds one, and PostgreSQL refuses NUL in text: it answered 503,
/// a store failure, for a caller's mistake.
pub async fn refuse_nul(req: Request, next: Next) -> Response {
    let nul = req.uri().path_and_query().is_some_and(|pq| pq.as_str().as_bytes().windows(3).any(|w| w.eq_ignore_ascii_case(b"%00")));
    if nul {
        return ApiError(
            StatusCode::BAD_REQUEST,
            "the request's path or query holds a NUL character (%00), which no id, name or filter has".into(),
        )
        .into_response();
    }
    next.run(req).await
}

/// The longest error body [`json_errors`] reads to wrap.
const WRAP_LIMIT: usize = 64 * 1024;

/// Middleware: an error response (4xx, 5xx) that is not JSON gets its text (or the status's
/// reason when it has none) wrapped as an [`ErrorBody`]; its other headers are kept.
pub async fn json_errors(req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    let status = resp.status();
    let is_json = resp.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    let text = match axum::body::to_bytes(body, WRAP_LIMIT).await {
        Ok(b) if !b.is_empty() => String::from_utf8_lossy(&b).trim().to_string(),
        _ => status.canonical_reason().unwrap_or("error").to_lowercase(),
    };
    let json = serde_json::to_vec(&ErrorBody { error: text }).unwrap_or_default();
    parts.headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(json))
}

/// A response of `status` with an [`ErrorBody`].
pub fn error_response(description: &str) -> ResponseBuilder {
    ResponseBuilder::new().description(description).content("application/json", Content::new(Some(Ref::from_schema_name("ErrorBody"))))
}

fn responses(list: &[(&str, &str)]) -> BTreeMap<String, RefOr<utoipa::openapi::response::Response>> {
    list.iter().map(|(code, d)| (code.to_string(), RefOr::T(error_response(d).build()))).collect()
}

/// 401 of a route that needs a bearer token (any scope).
pub struct AuthResponses;

impl IntoResponses for AuthResponses {
    fn responses() -> BTreeMap<String, RefOr<utoipa::openapi::response::Response>> {
        let www = HeaderBuilder::new().schema(<String as utoipa::PartialSchema>::schema()).description(Some("`Bearer`")).build();
        let unauthorized = error_response("missing or invalid bearer token").header("WWW-Authenticate", www).build();
        [("401".to_string(), RefOr::T(unauthorized))].into()
    }
}

/// 401 and 403 of a route that needs a scope above `read`.
pub struct ScopeResponses;

impl IntoResponses for ScopeResponses {
    fn responses() -> BTreeMap<String, RefOr<utoipa::openapi::response::Response>> {
        let mut r = AuthResponses::responses();
        r.extend(responses(&[("403", "the token's scope does not allow this")]));
        r
    }
}

/// The refusals of a JSON request body.
pub struct BodyResponses;

impl IntoResponses for BodyResponses {
    fn responses() -> BTreeMap<String, RefOr<utoipa::openapi::response::Response>> {
        responses(&[
            ("400", "malformed JSON, or a request the operation refuses (the error says why)"),
            ("413", "the body is over the limit (`--body-limit`, default 256 KiB)"),
            ("415", "the body is not `application/json`"),
            ("422", "the JSON does not have the fields this route takes"),
        ])
    }
}

/// 503 of a route that reads the job store, the artifact store or the broker.
pub struct UnavailableResponses;

impl IntoResponses for UnavailableResponses {
    fn responses() -> BTreeMap<String, RefOr<utoipa::openapi::response::Response>> {
        responses(&[("503", "the job store, the artifact store or the broker failed (the error says which)")])
    }
}
