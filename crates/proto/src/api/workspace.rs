//! Upstream forkd's workspaces: a named, long-lived sandbox that can be
//! suspended to a snapshot and resumed from it (`/v1/workspaces`), with
//! upstream's field names.

use serde::{Deserialize, Serialize};

/// Where a workspace is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum WorkspaceStatus {
    /// It has a live sandbox (`live_sandbox_id`).
    Running,
    /// No sandbox; `current_state_tag` keeps it and `resume` spawns from it.
    Suspended,
    /// Its sandbox ended without a suspend (killed, or gone with the
    /// daemon): `resume` starts again from the last suspend, or from the
    /// source snapshot.
    Stale,
}

impl WorkspaceStatus {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            WorkspaceStatus::Running => "running",
            WorkspaceStatus::Suspended => "suspended",
            WorkspaceStatus::Stale => "stale",
        }
    }

    /// From the wire name.
    pub fn parse(s: &str) -> Option<WorkspaceStatus> {
        match s {
            "running" => Some(WorkspaceStatus::Running),
            "suspended" => Some(WorkspaceStatus::Suspended),
            "stale" => Some(WorkspaceStatus::Stale),
            _ => None,
        }
    }

    /// As upstream's messages name it (`Running`).
    pub fn title(self) -> &'static str {
        match self {
            WorkspaceStatus::Running => "Running",
            WorkspaceStatus::Suspended => "Suspended",
            WorkspaceStatus::Stale => "Stale",
        }
    }
}

/// `POST /v1/workspaces`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CreateWorkspaceRequest {
    /// Its name, unique: `^[A-Za-z0-9_-]{1,64}$`.
    pub name: String,
    /// The snapshot its first sandbox is forked from.
    pub snapshot_tag: String,
    /// Its sandboxes get a network namespace each.
    #[serde(default)]
    pub per_child_netns: bool,
    /// Its sandboxes' memory cap, in MiB.
    #[serde(default)]
    pub memory_limit_mib: Option<u64>,
}

/// A workspace, as upstream answers it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WorkspaceInfo {
    /// Its id (`ws-` and its first sandbox's id).
    pub id: String,
    /// Its name.
    pub name: String,
    /// The snapshot it was created from.
    pub source_snapshot_tag: String,
    /// The snapshot its last suspend wrote; absent before the first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_state_tag: Option<String>,
    /// Where it is.
    pub status: WorkspaceStatus,
    /// Its sandbox, while `running`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub live_sandbox_id: Option<String>,
    /// When it was created.
    pub created_at_unix: u64,
    /// When it was last created, suspended or resumed.
    pub last_active_unix: u64,
    /// The memory file of its last suspend's snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_branch_memory_path: Option<String>,
}

/// `POST /v1/workspaces/{name}/suspend` (an empty body: a full snapshot).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SuspendWorkspaceRequest {
    /// Write only the memory changed since its sandbox's snapshot (a diff
    /// branch, a short pause) instead of all of it.
    #[serde(default)]
    pub diff: bool,
}
