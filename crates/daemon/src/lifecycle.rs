//! A sandbox's life beyond spawn and delete: pause and resume (its VMM
//! stopped and started, memory and files kept), its deadline (killed, or
//! suspended into a diff snapshot, when it passes), and the restore of a
//! suspended sandbox under its own id.

use std::sync::Arc;
use std::time::Duration;

use proto::api::{BranchMode, BranchRequest, OnTimeout, SandboxInfo, SandboxState, SpawnRequest};
use proto::control::{ControlRequest, ControlResponse};

use crate::daemon::Daemon;
use crate::error::{ApiError, ApiResult, Kind};
use crate::sandboxes::{release, stop_sandbox};
use crate::store::{Ended, SandboxRow};
use crate::util::{now_unix, random_hex};
use crate::{driver, validate};

/// How often the deadline loop looks, at most (it sleeps less when a
/// deadline is nearer).
const DEADLINE_TICK: Duration = Duration::from_secs(1);
/// How long a pause or resume may take.
const CONTROL_WAIT: Duration = Duration::from_secs(10);

impl Daemon {
    /// `POST /v1/sandboxes/:id/pause`: stops its vCPUs (no snapshot); a
    /// paused sandbox answers as it is.
    pub async fn pause(self: &Arc<Self>, id: &str) -> ApiResult<SandboxInfo> {
        let row = self.live_sandbox(id, true).await?;
        if row.info.state == SandboxState::Paused {
            return Ok(row.info);
        }
        self.control_ok(&row, ControlRequest::Pause, "pause")
            .await?;
        self.store
            .set_state(id, &[SandboxState::Running], SandboxState::Paused)?;
        self.sandbox_info(id).await
    }

    /// `POST /v1/sandboxes/:id/resume`: lets a paused sandbox run again,
    /// or restores a suspended one under its id (with a new deadline when
    /// it had a timeout); a running one answers as it is.
    pub async fn resume(self: &Arc<Self>, id: &str) -> ApiResult<SandboxInfo> {
        let row = self.existing_sandbox(id)?;
        match row.info.state {
            SandboxState::Suspended => return self.restore_suspended(row).await,
            SandboxState::Paused => {}
            _ => {
                let row = self.running_sandbox(id).await?;
                return Ok(row.info);
            }
        }
        let row = self.live_sandbox(id, true).await?;
        self.control_ok(&row, ControlRequest::Resume, "resume")
            .await?;
        self.store
            .set_state(id, &[SandboxState::Paused], SandboxState::Running)?;
        self.sandbox_info(id).await
    }

    /// `POST /v1/sandboxes/:id/timeout`: a new deadline `secs` from now.
    pub async fn set_timeout(self: &Arc<Self>, id: &str, secs: u64) -> ApiResult<SandboxInfo> {
        validate::sandbox_timeout(secs)?;
        let row = self.existing_sandbox(id)?;
        match row.info.state {
            SandboxState::Running | SandboxState::Paused | SandboxState::Suspended => {}
            _ => {
                self.running_sandbox(id).await?;
            }
        }
        self.store.set_timeout(id, secs, now_unix())?;
        self.deadlines.notify_one();
        self.sandbox_info(id).await
    }

    /// `GET /v1/sandboxes/:id/stats`.
    pub async fn stats(self: &Arc<Self>, id: &str) -> ApiResult<proto::api::SandboxStats> {
        let row = self.existing_sandbox(id)?;
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let row = this.observe(row)?;
            Ok(crate::stats::sample(&row))
        })
        .await?
    }

    async fn control_ok(
        self: &Arc<Self>,
        row: &SandboxRow,
        request: ControlRequest,
        what: &str,
    ) -> ApiResult<()> {
        let socket = row.control_socket.clone();
        let answer =
            tokio::task::spawn_blocking(move || driver::control(&socket, &request, CONTROL_WAIT))
                .await??;
        match answer {
            ControlResponse::Ok => Ok(()),
            ControlResponse::Error { message } => Err(ApiError::new(
                Kind::Refused,
                format!(
                    "sandbox {:?}'s VMM refused to {what}: {message}",
                    row.info.id
                ),
            )),
            other => Err(ApiError::internal(format!(
                "sandbox {:?}'s VMM answered {what} with {other:?}",
                row.info.id
            ))),
        }
    }

    /// Restores a suspended sandbox from its snapshot under its own id:
    /// a child of that snapshot with the sandbox's caps and labels takes
    /// over its record.
    async fn restore_suspended(self: &Arc<Self>, row: SandboxRow) -> ApiResult<SandboxInfo> {
        let id = row.info.id.clone();
        let tag = row
            .suspended_tag
            .clone()
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                ApiError::internal(format!("sandbox {id:?} is suspended without a snapshot"))
            })?;
        let info = &row.info;
        let req = SpawnRequest {
            snapshot_tag: tag,
            n: 1,
            memory_limit_mib: info.memory_limit_mib,
            cpu_limit: info.cpu_limit,
            pids_limit: info.pids_limit,
            disk_quota_mib: info.disk_quota_mib,
            io_limit_mibps: info.io_limit_mibps,
            live_fork: info.live_fork.then_some(true),
            timeout_secs: info.timeout_secs,
            on_timeout: info.on_timeout,
            ..SpawnRequest::default()
        };
        let kids = self.spawn(req).await?;
        let new_id = kids
            .first()
            .map(|k| k.id.clone())
            .ok_or_else(|| ApiError::internal("a spawn of one answered none"))?;
        self.store.take_over(&id, &new_id)?;
        self.forget_agent(&new_id);
        self.forget_agent(&id);
        tracing::info!(id, from = new_id, "restored a suspended sandbox");
        self.sandbox_info(&id).await
    }

    /// Suspends a sandbox whose deadline passed with `on_timeout: pause`:
    /// a diff branch (a full one when its diff base is gone), then its VMM
    /// ended; the sandbox reads `suspended`.
    async fn suspend(self: &Arc<Self>, row: &SandboxRow) -> ApiResult<()> {
        let id = &row.info.id;
        let tag = format!("{}-s{}", short(id), random_hex(3));
        let diff = BranchRequest {
            tag: Some(tag.clone()),
            mode: Some(BranchMode::Diff),
            ..BranchRequest::default()
        };
        match self.branch(id, diff).await {
            Ok(_) => {}
            Err(e) if e.kind == Kind::Conflict && e.message.contains("take a full branch") => {
                let full = BranchRequest {
                    tag: Some(tag.clone()),
                    mode: Some(BranchMode::Full),
                    ..BranchRequest::default()
                };
                self.branch(id, full).await?;
            }
            Err(e) => return Err(e),
        }
        // Recorded first, so the reaper leaves it alone (a read in the
        // next milliseconds may see `suspended` while the VMM is stopping).
        if !self.store.set_suspended(id, &tag)? {
            return Ok(());
        }
        let (this, row) = (self.clone(), row.clone());
        tokio::task::spawn_blocking(move || stop_sandbox(&this.store, &row)).await?;
        self.forget_agent(id);
        tracing::info!(id, tag, "suspended a sandbox at its deadline");
        Ok(())
    }

    /// Ends a sandbox whose deadline passed: its VMM stopped, then the
    /// sandbox recorded `exited` with a detail saying why (also when the
    /// reaper recorded the end first), so `exited` is never read while the
    /// VMM still runs.
    fn expire(&self, row: &SandboxRow) -> ApiResult<()> {
        let detail = format!(
            "ended at its deadline ({} s after its spawn, last extension or resume)",
            row.info.timeout_secs.unwrap_or(0)
        );
        stop_sandbox(&self.store, row);
        let end = Ended {
            code: None,
            signal: None,
            oom_killed: false,
            at_unix: now_unix(),
            detail: Some(detail.clone()),
        };
        if !self.store.set_exited(&row.info.id, &end)? {
            self.store.set_exit_detail(&row.info.id, &detail)?;
        }
        self.forget_agent(&row.info.id);
        tracing::info!(id = row.info.id, "ended a sandbox at its deadline");
        Ok(())
    }

    /// One pass: every sandbox whose deadline has passed is ended or
    /// suspended. Answers how long to sleep before the next pass.
    pub async fn enforce_deadlines(self: &Arc<Self>) -> Duration {
        let now = now_unix();
        let due = match self.store.due(now) {
            Ok(d) => d,
            Err(e) => {
                tracing::error!("deadlines: {e}");
                return DEADLINE_TICK;
            }
        };
        for row in due {
            let r = match row.info.on_timeout.unwrap_or_default() {
                OnTimeout::Kill => {
                    let (this, row) = (self.clone(), row.clone());
                    tokio::task::spawn_blocking(move || this.expire(&row))
                        .await
                        .map_err(ApiError::from)
                        .and_then(|r| r)
                }
                OnTimeout::Pause => self.suspend(&row).await,
            };
            if let Err(e) = r {
                // Tried again next pass (a busy branch slot is 503).
                tracing::warn!(id = row.info.id, "deadline: {}", e.message);
            }
        }
        match self.store.next_deadline() {
            Ok(Some(t)) if t > now => Duration::from_secs(t - now).min(DEADLINE_TICK),
            _ => DEADLINE_TICK,
        }
    }

    /// Runs [`Daemon::enforce_deadlines`] until the daemon ends; woken
    /// early when a deadline is set.
    pub async fn deadline_loop(self: Arc<Self>) {
        loop {
            let wait = self.enforce_deadlines().await;
            let _ = tokio::time::timeout(wait, self.deadlines.notified()).await;
        }
    }

    /// Removes a deleted suspended sandbox's snapshot (nothing else uses
    /// it unless a branch stacked on it).
    pub fn drop_suspended(&self, row: &SandboxRow) {
        release(&self.store, row);
        let Some(tag) = row.suspended_tag.as_deref().filter(|t| !t.is_empty()) else {
            return;
        };
        match self.store.dependents(tag) {
            Ok(deps) if deps.is_empty() => {
                if let Ok(Some(snap)) = self.store.snapshot(tag) {
                    crate::sandboxes::remove_tree(std::path::Path::new(&snap.info.dir));
                    let _ = self.store.delete_snapshot(tag);
                }
            }
            _ => tracing::info!(
                tag,
                "kept a deleted sandbox's suspend snapshot: others stack on it"
            ),
        }
    }
}

/// The first part of a sandbox id short enough to prefix a tag.
fn short(id: &str) -> &str {
    &id[..id.len().min(48)]
}
