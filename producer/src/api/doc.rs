//! The API document's frame: title, version, security schemes and the error body schema. The
//! paths and their schemas come from the handlers' `#[utoipa::path]` annotations, added by
//! [`super::router`] as it registers each route.

use std::{collections::BTreeSet, sync::Arc};

use utoipa::{
    openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme},
    Modify, OpenApi,
};

use super::errors::ErrorBody;

/// The document as served at `/openapi.json`.
#[derive(Debug, Clone)]
pub struct Document(pub Arc<String>);

#[derive(OpenApi)]
#[openapi(
    info(title = "trainyard control plane", description = "The HTTP API of `trainyard serve`. Every error answers `{\"error\": \"...\"}` (ErrorBody). Any `/v1/` route answers 400 to a path or query holding a NUL character (`%00`)."),
    components(schemas(ErrorBody)),
    modifiers(&SecuritySchemes),
    tags(
        (name = "jobs", description = "submit, list, show, cancel and retry jobs"),
        (name = "ops", description = "queues, dead letters, the audit trail, schedules and triggers"),
        (name = "models", description = "production models: promote and roll back"),
        (name = "workers", description = "live workers, from their heartbeats"),
        (name = "console", description = "the operators' console, its session and live stream"),
        (name = "service", description = "health, readiness, metrics and this document")
    )
)]
struct ApiDoc;

/// `bearer`: an API token (`Authorization: Bearer <token>`); `session`: the console's stream cookie.
struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme("bearer", SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()));
        components.add_security_scheme("session", SecurityScheme::ApiKey(ApiKey::Cookie(ApiKeyValue::new(super::session::COOKIE))));
    }
}

/// The document before the routes are added.
pub fn base() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// The route templates `app` serves, read from its `Debug` form (axum lists its routes there and
/// nowhere else). Empty if a newer axum words it differently: [`check_documented`] refuses that.
pub fn served_paths<S>(app: &axum::Router<S>) -> BTreeSet<String> {
    let text = format!("{app:?}");
    // `Router { path_router: …, fallback_router: … }`: the fallback router's paths are axum's own.
    let mut rest = text.split_once("path_router:").and_then(|(_, r)| r.split_once("fallback_router:")).map_or("", |(r, _)| r);
    let mut paths = BTreeSet::new();
    while let Some(at) = rest.find("RouteId(") {
        rest = &rest[at + "RouteId(".len()..];
        let Some(path) = rest.split_once("): \"").and_then(|(id, tail)| id.bytes().all(|b| b.is_ascii_digit()).then_some(tail)) else {
            continue;
        };
        if let Some((path, _)) = path.split_once('"') {
            if !path.contains("__private__axum") {
                paths.insert(path.to_string());
            }
        }
    }
    paths
}

/// Refuses a router that serves a route the document lacks (or whose routes cannot be read).
pub fn check_documented<S>(app: &axum::Router<S>, document: &utoipa::openapi::OpenApi) -> Result<(), String> {
    let served = served_paths(app);
    let documented: BTreeSet<String> = document.paths.paths.keys().cloned().collect();
    let missing: Vec<&String> = documented.difference(&served).collect();
    if !missing.is_empty() {
        return Err(format!("the router's routes could not be read (documented but not found: {missing:?}; served: {served:?})"));
    }
    let undocumented: Vec<&String> = served.difference(&documented).collect();
    if !undocumented.is_empty() {
        return Err(format!("routes served but not in the API document (add them with `routes!` and `#[utoipa::path]`): {undocumented:?}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use axum::routing::get;
    use utoipa_axum::{router::OpenApiRouter, routes};

    use super::*;
    use crate::api::handlers;

    #[test]
    fn a_route_served_but_not_documented_is_refused() {
        let (app, doc) = OpenApiRouter::<()>::with_openapi(base()).routes(routes!(handlers::healthz)).split_for_parts();
        assert_eq!(served_paths(&app), BTreeSet::from(["/healthz".to_string()]));
        check_documented(&app, &doc).unwrap();
        let nested = OpenApiRouter::<()>::new().route("/hidden/{id}", get(|| async { "x" }));
        let (app, doc) = OpenApiRouter::<()>::with_openapi(base())
            .routes(routes!(handlers::healthz))
            .nest("/v1", nested)
            .route("/extra", get(|| async { "x" }))
            .split_for_parts();
        let err = check_documented(&app, &doc).unwrap_err();
        assert!(err.contains("\"/extra\"") && err.contains("\"/v1/hidden/{id}\""), "{err}");
    }
}
