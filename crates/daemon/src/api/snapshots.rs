//! `/v1/snapshots` routes.

use std::sync::Arc;

use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::Json;
use proto::api::{CompactRequest, CreateSnapshot, SnapshotDetail, SnapshotInfo};

use super::{to_the_end, Body};
use crate::daemon::Daemon;
use crate::error::{ApiError, ApiResult};

/// `POST /v1/snapshots` → 201.
pub async fn create(
    State(daemon): State<Arc<Daemon>>,
    Body(req): Body<CreateSnapshot>,
) -> ApiResult<(StatusCode, Json<SnapshotInfo>)> {
    let info = to_the_end(async move { daemon.create_snapshot(req).await }).await?;
    Ok((StatusCode::CREATED, Json(info)))
}

/// `GET /v1/snapshots`.
pub async fn list(State(daemon): State<Arc<Daemon>>) -> ApiResult<Json<Vec<SnapshotInfo>>> {
    Ok(Json(daemon.list_snapshots()?))
}

/// `GET /v1/snapshots/:tag/info`.
pub async fn info(
    State(daemon): State<Arc<Daemon>>,
    Path(tag): Path<String>,
) -> ApiResult<Json<SnapshotDetail>> {
    Ok(Json(daemon.snapshot_detail(&tag)?))
}

/// `DELETE /v1/snapshots/:tag[?cascade=true|?force=true]` → 204.
pub async fn delete(
    State(daemon): State<Arc<Daemon>>,
    Path(tag): Path<String>,
    RawQuery(query): RawQuery,
) -> ApiResult<StatusCode> {
    let (mut cascade, mut force) = (false, false);
    for pair in query
        .as_deref()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (key, value) = pair.split_once('=').unwrap_or((pair, "true"));
        let flag = match value {
            "true" | "1" => true,
            "false" | "0" => false,
            _ => {
                return Err(ApiError::bad_request(format!(
                    "{key}={value:?}: use true or false"
                )))
            }
        };
        match key {
            "cascade" => cascade = flag,
            "force" => force = flag,
            _ => {
                return Err(ApiError::bad_request(format!(
                    "unknown parameter {key:?} (known: cascade, force)"
                )))
            }
        }
    }
    to_the_end(async move { daemon.delete_snapshot(&tag, cascade, force).await }).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /v1/snapshots/:tag/compact` → 200 (as upstream).
pub async fn compact(
    State(daemon): State<Arc<Daemon>>,
    Path(tag): Path<String>,
    Body(req): Body<CompactRequest>,
) -> ApiResult<Json<SnapshotInfo>> {
    let info = to_the_end(async move { daemon.compact(&tag, &req.to).await }).await?;
    Ok(Json(info))
}
