//! `/v1/snapshots` routes.

use std::sync::Arc;

use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::Json;
use proto::api::{CompactRequest, CreateSnapshot, SnapshotDetail, SnapshotInfo};

use super::Body;
use crate::daemon::Daemon;
use crate::error::ApiResult;

/// `POST /v1/snapshots` → 201.
pub async fn create(
    State(daemon): State<Arc<Daemon>>,
    Body(req): Body<CreateSnapshot>,
) -> ApiResult<(StatusCode, Json<SnapshotInfo>)> {
    let info = daemon.create_snapshot(req).await?;
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
    let [cascade, force] = super::flags(query.as_deref(), ["cascade", "force"])?;
    daemon.delete_snapshot(&tag, cascade, force).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /v1/snapshots/:tag/compact` → 200 (as upstream).
pub async fn compact(
    State(daemon): State<Arc<Daemon>>,
    Path(tag): Path<String>,
    Body(req): Body<CompactRequest>,
) -> ApiResult<Json<SnapshotInfo>> {
    let info = daemon.compact(&tag, &req.to).await?;
    Ok(Json(info))
}
