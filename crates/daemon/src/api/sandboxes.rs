//! `/v1/sandboxes` routes.

use std::sync::Arc;

use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::Json;
use proto::api::{
    BranchRequest, EvalRequest, EvalResponse, ExecRequest, ExecResponse, PingResponse, SandboxInfo,
    SnapshotInfo, SpawnRequest,
};

use super::{Body, RawBody};
use crate::daemon::Daemon;
use crate::error::ApiResult;

/// `POST /v1/sandboxes` → 201.
pub async fn spawn(
    State(daemon): State<Arc<Daemon>>,
    Body(req): Body<SpawnRequest>,
) -> ApiResult<(StatusCode, Json<Vec<SandboxInfo>>)> {
    let kids = daemon.spawn(req).await?;
    Ok((StatusCode::CREATED, Json(kids)))
}

/// `GET /v1/sandboxes[?all=true][&label=KEY=VALUE...]`: the live ones
/// (running, paused, suspended), or every one; only those with every
/// label asked.
pub async fn list(
    State(daemon): State<Arc<Daemon>>,
    RawQuery(query): RawQuery,
) -> ApiResult<Json<Vec<SandboxInfo>>> {
    let (all, labels) = crate::validate::list_query(query.as_deref())?;
    Ok(Json(daemon.list_sandboxes(all, labels).await?))
}

/// `GET /v1/sandboxes/:id`: as it is now (`state: exited` once its VMM
/// has ended).
pub async fn get(
    State(daemon): State<Arc<Daemon>>,
    Path(id): Path<String>,
) -> ApiResult<Json<SandboxInfo>> {
    Ok(Json(daemon.sandbox_info(&id).await?))
}

/// `DELETE /v1/sandboxes/:id` → 204.
pub async fn kill(
    State(daemon): State<Arc<Daemon>>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    daemon.kill(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /v1/sandboxes/:id/ping`.
pub async fn ping(
    State(daemon): State<Arc<Daemon>>,
    Path(id): Path<String>,
) -> ApiResult<Json<PingResponse>> {
    Ok(Json(PingResponse {
        pong: true,
        agent: daemon.ping(&id).await?,
    }))
}

/// `POST /v1/sandboxes/:id/exec`.
pub async fn exec(
    State(daemon): State<Arc<Daemon>>,
    Path(id): Path<String>,
    Body(req): Body<ExecRequest>,
) -> ApiResult<Json<ExecResponse>> {
    Ok(Json(daemon.exec(&id, req).await?))
}

/// `POST /v1/sandboxes/:id/eval`.
pub async fn eval(
    State(daemon): State<Arc<Daemon>>,
    Path(id): Path<String>,
    Body(req): Body<EvalRequest>,
) -> ApiResult<Json<EvalResponse>> {
    Ok(Json(daemon.eval(&id, req).await?))
}

/// `POST /v1/sandboxes/:id/branch` → 201, or 202 for a live branch still
/// copying (`wait: false`). An empty body is a full branch.
pub async fn branch(
    State(daemon): State<Arc<Daemon>>,
    Path(id): Path<String>,
    RawBody(body): RawBody,
) -> ApiResult<(StatusCode, Json<SnapshotInfo>)> {
    let req: BranchRequest = if body.iter().all(u8::is_ascii_whitespace) {
        BranchRequest::default()
    } else {
        super::parse_body(&body)?
    };
    let b = daemon.branch(&id, req).await?;
    let status = if b.accepted {
        StatusCode::ACCEPTED
    } else {
        StatusCode::CREATED
    };
    Ok((status, Json(b.info)))
}

/// `POST /v1/sandboxes/:id/pause`.
pub async fn pause(
    State(daemon): State<Arc<Daemon>>,
    Path(id): Path<String>,
) -> ApiResult<Json<SandboxInfo>> {
    Ok(Json(daemon.pause(&id).await?))
}

/// `POST /v1/sandboxes/:id/resume`.
pub async fn resume(
    State(daemon): State<Arc<Daemon>>,
    Path(id): Path<String>,
) -> ApiResult<Json<SandboxInfo>> {
    Ok(Json(daemon.resume(&id).await?))
}

/// `POST /v1/sandboxes/:id/timeout`.
pub async fn timeout(
    State(daemon): State<Arc<Daemon>>,
    Path(id): Path<String>,
    Body(req): Body<proto::api::TimeoutRequest>,
) -> ApiResult<Json<SandboxInfo>> {
    Ok(Json(daemon.set_timeout(&id, req.timeout_secs).await?))
}

/// `GET /v1/sandboxes/:id/stats`.
pub async fn stats(
    State(daemon): State<Arc<Daemon>>,
    Path(id): Path<String>,
) -> ApiResult<Json<proto::api::SandboxStats>> {
    Ok(Json(daemon.stats(&id).await?))
}
