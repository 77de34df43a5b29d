//! `/v1/workspaces` routes, as upstream answers them.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use proto::api::{CreateWorkspaceRequest, SuspendWorkspaceRequest, WorkspaceInfo};

use super::{Body, RawBody};
use crate::daemon::Daemon;
use crate::error::ApiResult;

/// `POST /v1/workspaces` → 201.
pub async fn create(
    State(daemon): State<Arc<Daemon>>,
    Body(req): Body<CreateWorkspaceRequest>,
) -> ApiResult<(StatusCode, Json<WorkspaceInfo>)> {
    Ok((
        StatusCode::CREATED,
        Json(daemon.create_workspace(req).await?),
    ))
}

/// `GET /v1/workspaces`: a bare array, by name.
pub async fn list(State(daemon): State<Arc<Daemon>>) -> ApiResult<Json<Vec<WorkspaceInfo>>> {
    Ok(Json(daemon.list_workspaces().await?))
}

/// `GET /v1/workspaces/:name`.
pub async fn get(
    State(daemon): State<Arc<Daemon>>,
    Path(name): Path<String>,
) -> ApiResult<Json<WorkspaceInfo>> {
    Ok(Json(daemon.workspace(&name).await?))
}

/// `DELETE /v1/workspaces/:name` → 204.
pub async fn delete(
    State(daemon): State<Arc<Daemon>>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    daemon.delete_workspace(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /v1/workspaces/:name/suspend`; an empty body is a full snapshot.
pub async fn suspend(
    State(daemon): State<Arc<Daemon>>,
    Path(name): Path<String>,
    RawBody(body): RawBody,
) -> ApiResult<Json<WorkspaceInfo>> {
    let req: SuspendWorkspaceRequest = if body.iter().all(u8::is_ascii_whitespace) {
        SuspendWorkspaceRequest::default()
    } else {
        super::parse_body(&body)?
    };
    Ok(Json(daemon.suspend_workspace(&name, req).await?))
}

/// `POST /v1/workspaces/:name/resume` (its body, if any, is not read).
pub async fn resume(
    State(daemon): State<Arc<Daemon>>,
    Path(name): Path<String>,
) -> ApiResult<Json<WorkspaceInfo>> {
    Ok(Json(daemon.resume_workspace(&name).await?))
}
