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

/// `GET /version`.
pub async fn version() -> Json<Version> {
    Json(Version {
        version: env!("CARGO_PKG_VERSION").to_string(),
        api: API_VERSION.to_string(),
    })
}

/// `GET /metrics`: Prometheus text.
pub async fn metrics(State(daemon): State<Arc<Daemon>>) -> impl IntoResponse {
    daemon.refresh_gauges();
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        daemon.metrics.render(),
    )
}
