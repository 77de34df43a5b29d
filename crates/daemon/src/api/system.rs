//! `/healthz`, `/version`, `/metrics`.

use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::Json;
use proto::api::{Health, Version, API_VERSION};

use crate::daemon::Daemon;

/// `GET /healthz`: answers as long as the daemon runs (no auth).
pub async fn healthz() -> Json<Health> {
    Json(Health { ok: true })
}

/// `GET /version` (with where the state lives: it needs the token).
pub async fn version(State(daemon): State<Arc<Daemon>>) -> Json<Version> {
    Json(Version {
        version: env!("CARGO_PKG_VERSION").to_string(),
        api: API_VERSION.to_string(),
        state_dir: Some(daemon.paths.state.to_string_lossy().into_owned()),
        snapshot_root: Some(daemon.paths.snapshots.to_string_lossy().into_owned()),
        instance: Some(daemon.instance.clone()),
    })
}

/// What `/metrics` says its body is: Prometheus's text format 0.0.4, as
/// upstream serves it (what the encoder writes beyond it, `# UNIT` and
/// `# EOF`, are comments there).
pub const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// `GET /metrics`: Prometheus text.
pub async fn metrics(State(daemon): State<Arc<Daemon>>) -> impl IntoResponse {
    daemon.refresh_gauges();
    let d = daemon.clone();
    let _ = tokio::task::spawn_blocking(move || d.refresh_sandbox_metrics()).await;
    (
        [(header::CONTENT_TYPE, METRICS_CONTENT_TYPE)],
        daemon.metrics.render(),
    )
}

/// `GET /v1/openapi.json`: this API as an OpenAPI 3 document.
pub async fn openapi() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        super::openapi::json(),
    )
}
