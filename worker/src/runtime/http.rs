//! `/healthz`, `/readyz` and `/metrics` of a worker.

use std::{net::SocketAddr, sync::Arc};

use axum::{extract::State, http::StatusCode, routing::get, Router};
use tokio_util::sync::CancellationToken;

type Ready = Arc<dyn Fn() -> bool + Send + Sync>;

#[derive(Clone)]
struct AppState {
    registry: prometheus::Registry,
    ready: Ready,
}

/// The router: `/healthz` (process alive), `/readyz` (connected to the broker), `/metrics`.
pub fn router(registry: prometheus::Registry, ready: Ready) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(AppState { registry, ready })
}

async fn readyz(State(s): State<AppState>) -> (StatusCode, &'static str) {
    if (s.ready)() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not connected to the broker\n")
    }
}

async fn metrics(State(s): State<AppState>) -> ([(axum::http::HeaderName, &'static str); 1], String) {
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], trainyard_common::metrics::render(&s.registry))
}

/// Binds `addr` and serves until `shutdown` fires. Returns the bound address.
pub async fn serve(addr: SocketAddr, router: Router, shutdown: CancellationToken) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        let res = axum::serve(listener, router).with_graceful_shutdown(async move { shutdown.cancelled().await }).await;
        if let Err(e) = res {
            tracing::warn!(error = %e, "metrics server stopped");
        }
    });
    Ok(local)
}
