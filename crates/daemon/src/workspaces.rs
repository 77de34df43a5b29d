//! Upstream's workspaces (`/v1/workspaces`): a named sandbox that is
//! suspended into a snapshot (its sandbox ended) and resumed from it, as
//! often as wanted, across daemon restarts.
//!
//! A workspace is recorded before its first sandbox exists: a crash
//! between leaves a `running` workspace without a live sandbox, which the
//! next read finds `stale` (as it finds one whose sandbox was killed), and
//! `resume` starts it again from its last suspend.

use std::collections::BTreeMap;
use std::sync::Arc;

use proto::api::{
    valid_tag, BranchMode, BranchRequest, CreateWorkspaceRequest, SandboxState, SpawnRequest,
    SuspendWorkspaceRequest, WorkspaceInfo, WorkspaceStatus,
};

use crate::daemon::Daemon;
use crate::error::{ApiError, ApiResult};
use crate::store::WorkspaceRow;
use crate::util::{now_unix, random_hex};

/// The label a workspace's sandboxes carry: the workspace's name.
pub const WORKSPACE_LABEL: &str = "forkd.workspace";

impl Daemon {
    /// `POST /v1/workspaces` → 201: records the workspace, then spawns its
    /// sandbox.
    pub async fn create_workspace(
        self: &Arc<Self>,
        req: CreateWorkspaceRequest,
    ) -> ApiResult<WorkspaceInfo> {
        if !valid_tag(&req.name) {
            return Err(ApiError::bad_request(
                "workspace name must be 1-64 chars, ASCII alnum or dash/underscore",
            ));
        }
        if !valid_tag(&req.snapshot_tag) {
            return Err(ApiError::bad_request(
                "snapshot_tag must be 1-64 chars, ASCII alnum or dash/underscore",
            ));
        }
        self.existing_snapshot(&req.snapshot_tag)?;
        let now = now_unix();
        let mut row = WorkspaceRow {
            info: WorkspaceInfo {
                id: format!("ws-{}", random_hex(8)),
                name: req.name.clone(),
                source_snapshot_tag: req.snapshot_tag.clone(),
                current_state_tag: None,
                status: WorkspaceStatus::Running,
                live_sandbox_id: None,
                created_at_unix: now,
                last_active_unix: now,
                last_branch_memory_path: None,
            },
            per_child_netns: req.per_child_netns,
            memory_limit_mib: req.memory_limit_mib,
        };
        if !self.store.insert_workspace(&row)? {
            return Err(ApiError::conflict(format!(
                "workspace {} already exists; DELETE first",
                req.name
            )));
        }
        let sandbox = match self.workspace_sandbox(&row, &req.snapshot_tag).await {
            Ok(id) => id,
            Err(e) => {
                self.store.delete_workspace(&req.name)?;
                return Err(e);
            }
        };
        row.info.id = format!("ws-{}", &sandbox[..sandbox.len().min(16)]);
        row.info.live_sandbox_id = Some(sandbox);
        self.store.update_workspace(&row.info)?;
        Ok(row.info)
    }

    /// Spawns a workspace's sandbox from `tag`; its id.
    async fn workspace_sandbox(self: &Arc<Self>, w: &WorkspaceRow, tag: &str) -> ApiResult<String> {
        let req = SpawnRequest {
            snapshot_tag: tag.to_owned(),
            n: 1,
            per_child_netns: w.per_child_netns.then_some(true),
            memory_limit_mib: w.memory_limit_mib,
            labels: Some(BTreeMap::from([(
                WORKSPACE_LABEL.to_owned(),
                w.info.name.clone(),
            )])),
            ..SpawnRequest::default()
        };
        let kids = self.spawn(req).await?;
        kids.into_iter()
            .next()
            .map(|k| k.id)
            .ok_or_else(|| ApiError::internal("a spawn of one answered none"))
    }

    /// A workspace by name, `stale` once its sandbox is no longer live; 404.
    pub async fn workspace(self: &Arc<Self>, name: &str) -> ApiResult<WorkspaceInfo> {
        let row = self
            .store
            .workspace(name)?
            .ok_or_else(|| ApiError::not_found(format!("workspace {name} not found")))?;
        self.settle_workspace(row.info).await
    }

    /// `GET /v1/workspaces`: every workspace, by name.
    pub async fn list_workspaces(self: &Arc<Self>) -> ApiResult<Vec<WorkspaceInfo>> {
        let mut out = Vec::new();
        for row in self.store.workspaces()? {
            out.push(self.settle_workspace(row.info).await?);
        }
        Ok(out)
    }

    /// A running workspace whose sandbox is gone (killed, exited, or lost
    /// with a crash) is recorded `stale`.
    async fn settle_workspace(self: &Arc<Self>, mut w: WorkspaceInfo) -> ApiResult<WorkspaceInfo> {
        if w.status != WorkspaceStatus::Running {
            return Ok(w);
        }
        let live = match &w.live_sandbox_id {
            Some(id) => match self.store.sandbox(id)? {
                Some(row) => {
                    let this = self.clone();
                    let row = tokio::task::spawn_blocking(move || this.observe(row)).await??;
                    row.info.state.has_vmm()
                }
                None => false,
            },
            None => false,
        };
        if !live {
            w.status = WorkspaceStatus::Stale;
            w.live_sandbox_id = None;
            self.store.update_workspace(&w)?;
        }
        Ok(w)
    }

    /// `POST /v1/workspaces/:name/suspend`: a branch of its sandbox (full,
    /// or diff), then the sandbox ended; the workspace `suspended` on that
    /// snapshot, and its previous state snapshot removed when nothing
    /// stacks on it.
    pub async fn suspend_workspace(
        self: &Arc<Self>,
        name: &str,
        req: SuspendWorkspaceRequest,
    ) -> ApiResult<WorkspaceInfo> {
        let mut w = self.workspace(name).await?;
        if w.status != WorkspaceStatus::Running {
            return Err(ApiError::bad_request(format!(
                "workspace {name} is {}, not Running — suspend requires a live sandbox",
                w.status.title()
            )));
        }
        let sandbox = w.live_sandbox_id.clone().ok_or_else(|| {
            ApiError::internal("inconsistent state: Running but no live_sandbox_id")
        })?;
        let tag = format!("ws-{}-{}", &name[..name.len().min(50)], random_hex(4));
        let branch = BranchRequest {
            tag: Some(tag.clone()),
            mode: Some(if req.diff {
                BranchMode::Diff
            } else {
                BranchMode::Full
            }),
            ..BranchRequest::default()
        };
        self.branch(&sandbox, branch).await?;
        let memory = self
            .store
            .sandbox(&sandbox)?
            .and_then(|r| r.info.last_branch_memory_path);
        self.kill(&sandbox).await?;
        let previous = w.current_state_tag.replace(tag);
        w.status = WorkspaceStatus::Suspended;
        w.live_sandbox_id = None;
        w.last_active_unix = now_unix();
        w.last_branch_memory_path = memory;
        self.store.update_workspace(&w)?;
        if let Some(old) = previous {
            self.drop_state(&old).await;
        }
        Ok(w)
    }

    /// `POST /v1/workspaces/:name/resume`: a sandbox from its last
    /// suspend (or, never suspended, its source snapshot).
    pub async fn resume_workspace(self: &Arc<Self>, name: &str) -> ApiResult<WorkspaceInfo> {
        let mut w = self.workspace(name).await?;
        if w.status == WorkspaceStatus::Running {
            return Err(ApiError::bad_request(format!(
                "workspace {name} is already Running (sandbox {})",
                w.live_sandbox_id.as_deref().unwrap_or("?")
            )));
        }
        let row = self
            .store
            .workspace(name)?
            .ok_or_else(|| ApiError::not_found(format!("workspace {name} not found")))?;
        let from = w
            .current_state_tag
            .clone()
            .unwrap_or_else(|| w.source_snapshot_tag.clone());
        let sandbox = self.workspace_sandbox(&row, &from).await?;
        w.status = WorkspaceStatus::Running;
        w.live_sandbox_id = Some(sandbox);
        w.last_active_unix = now_unix();
        self.store.update_workspace(&w)?;
        Ok(w)
    }

    /// `DELETE /v1/workspaces/:name` → 204: its sandbox killed, its state
    /// snapshot removed (the source snapshot stays), the record gone.
    pub async fn delete_workspace(self: &Arc<Self>, name: &str) -> ApiResult<()> {
        let w = self
            .store
            .workspace(name)?
            .ok_or_else(|| ApiError::not_found(format!("workspace {name} not found")))?
            .info;
        if let Some(id) = &w.live_sandbox_id {
            match self.existing_sandbox(id) {
                Ok(row) if row.info.state != SandboxState::Starting => self.kill(id).await?,
                _ => {}
            }
        }
        self.store.delete_workspace(name)?;
        if let Some(tag) = &w.current_state_tag {
            self.drop_state(tag).await;
        }
        Ok(())
    }

    /// Removes a workspace's state snapshot, unless something stacks on it
    /// or runs from it (then it is kept, and said so in the log); then the
    /// earlier states it stacked on (diff suspends), as far as they are
    /// this workspace's and free.
    async fn drop_state(self: &Arc<Self>, tag: &str) {
        let mut next = Some(tag.to_owned());
        while let Some(tag) = next.take() {
            let below = match self.store.snapshot(&tag) {
                Ok(Some(row)) => row.depends_on,
                _ => return,
            };
            if let Err(e) = self.delete_snapshot(&tag, false, false).await {
                tracing::info!(tag, "kept a workspace's state snapshot: {}", e.message);
                return;
            }
            // A state tag is `ws-<name>-<hex>`: only those are followed.
            let prefix = &tag[..tag.rfind('-').map_or(0, |i| i + 1)];
            next = below.into_iter().find(|b| b.starts_with(prefix));
        }
    }
}
