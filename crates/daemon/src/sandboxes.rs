//! Sandboxes: forked from a snapshot's fork server, driven through their
//! control socket and guest agent, branched, killed, and re-adopted by a
//! restarted daemon.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agent_client::ClientConfig;
use proto::api::{
    BranchMode, BranchRequest, EvalResponse, ExecResponse, SandboxInfo, SandboxState, SnapshotInfo,
    SnapshotStatus, SpawnRequest,
};
use proto::control::{ControlRequest, ControlResponse, SnapshotMode};

use crate::daemon::{AgentKind, Daemon};
use crate::error::{ApiError, ApiResult, Kind};
use crate::store::{SandboxRow, SnapshotRow};
use crate::util::{now_unix, random_hex};
use crate::{driver, netns, procs, validate};

/// Longest exec or eval a request may ask for.
const MAX_RUN_SECS: u64 = 3600;
/// Most output an exec answer carries (stdout and stderr together).
const MAX_EXEC_OUTPUT: usize = 16 << 20;
/// How long a new child has to create its vsock socket.
const VSOCK_APPEAR: Duration = Duration::from_secs(5);

/// Answer of a branch: the snapshot, and whether its copy still runs.
pub struct Branched {
    /// The new snapshot.
    pub info: SnapshotInfo,
    /// True when it is `writing` (the answer is 202).
    pub accepted: bool,
}

impl Daemon {
    /// `POST /v1/sandboxes`.
    pub async fn spawn(self: &Arc<Self>, req: SpawnRequest) -> ApiResult<Vec<SandboxInfo>> {
        let started = Instant::now();
        validate::spawn_request(&req)?;
        let limits = validate::limits(
            &req,
            &self.default_limits,
            |c| self.cgroups.as_ref().is_some_and(|h| h.has(c)),
            self.io_disk,
        )?;
        let disk_quota_mib = validate::disk_quota(&req, self.default_disk_quota_mib)?;
        let snap = self.existing_snapshot(&req.snapshot_tag)?;
        let plan = validate::spawn_from(&req, &snap.info)?;
        // A live-forkable child holds a private copy of the snapshot's
        // memory (from the huge page pool instead with `hugepages`); a
        // copy-on-write child, the pages it writes, which the reserves
        // leave room for.
        let private = req.live_fork == Some(true) && req.hugepages != Some(true);
        let per_child = if private {
            snap.info.mem_mib.unwrap_or(0)
        } else {
            0
        };
        let what = format!("a spawn of {}", req.n);
        self.reserve
            .check_memory(per_child.saturating_mul(u64::from(req.n)), &what)?;
        self.reserve.check_disk(&self.paths.sandboxes, 0, &what)?;
        let per_child_netns = plan.per_child_netns;
        let this = self.clone();
        let rows = tokio::task::spawn_blocking(move || {
            this.fork_children(&req, &snap, plan, limits, disk_quota_mib)
        })
        .await;
        if per_child_netns {
            self.refill_netns_pool();
        }
        let rows = rows??;
        let secs = started.elapsed().as_secs_f64();
        self.metrics.spawn_seconds.observe(secs);
        self.metrics
            .spawn_child_seconds
            .observe(secs / rows.len() as f64);
        Ok(rows.into_iter().map(|r| r.info).collect())
    }

    /// Forks the children, each in a network namespace of its own when
    /// the plan says, on huge pages when asked and the host has them, and
    /// each in a cgroup of its own with `limits` when the host has
    /// cgroups (blocking); each child's disk layer holds at most
    /// `disk_quota_mib`.
    fn fork_children(
        &self,
        req: &SpawnRequest,
        row: &SnapshotRow,
        plan: validate::SpawnPlan,
        limits: proto::control::Limits,
        disk_quota_mib: Option<u64>,
    ) -> ApiResult<Vec<SandboxRow>> {
        let snap = &row.info;
        let validate::SpawnPlan {
            per_child_netns,
            warning,
        } = plan;
        let mem_mib = snap.mem_mib.unwrap_or(0);
        let (huge_pages, huge_warning) =
            validate::huge_pages(req, mem_mib, crate::util::free_huge_pages());
        let warning = match (warning, huge_warning) {
            (Some(a), Some(b)) => Some(format!("{a}; {b}")),
            (a, b) => a.or(b),
        };
        self.check_integrity(row)?;
        let server = self.fork_server(&snap.tag, Path::new(&snap.dir))?;
        let batch = random_hex(4);
        // Removed again if the fork fails; the sandboxes own them after.
        let mut namespaces = netns::Namespaces::new(&self.store);
        if per_child_netns {
            // A snapshot made on a host tap: each namespace repeats it.
            // Otherwise forkd's own link, made ahead first (--netns-pool).
            let tap = match &snap.tap {
                Some(name) => crate::snapshots::tap_of(row).ok_or_else(|| {
                    ApiError::internal(format!(
                        "snapshot {:?} was made on tap {name:?} but its record of that tap is unreadable",
                        snap.tag
                    ))
                })?,
                None => {
                    namespaces.adopt(self.netns_pool.take(req.n as usize));
                    netns::TapSpec::forkd()
                }
            };
            for i in namespaces.names().len() as u32..req.n {
                let name = format!("{}{batch}-{i}", netns::prefix(&self.instance));
                namespaces.add_with(name, &tap)?;
            }
        }
        let out_dir = self.paths.sandboxes.join(&batch);
        // Huge pages are a memfd's: such a child can be live-branched too.
        let live_fork = req.live_fork.unwrap_or(false) || huge_pages;
        // Recorded before they exist: a crash from here on leaves records
        // a restart reconciles with what it finds.
        let now = now_unix();
        let rows: Vec<SandboxRow> = (0..req.n)
            .map(|i| {
                let dir = out_dir.join(i.to_string());
                let netns = namespaces.names().get(i as usize).cloned();
                SandboxRow {
                    info: SandboxInfo {
                        id: format!("{batch}-{i}"),
                        snapshot_tag: snap.tag.clone(),
                        guest_addr: netns.as_ref().map(|_| proto::api::GUEST_ADDR.to_owned()),
                        netns,
                        created_at_unix: now,
                        memory_limit_mib: limits.memory_mib,
                        cpu_limit: limits.cpu_millis.map(|m| f64::from(m) / 1000.0),
                        pids_limit: limits.pids,
                        io_limit_mibps: limits.io.map(|io| io.bytes_per_sec >> 20),
                        disk_quota_mib,
                        live_fork,
                        hugepages: huge_pages,
                        warning: warning.clone(),
                        state: SandboxState::Starting,
                        labels: req.labels.clone().unwrap_or_default(),
                        timeout_secs: req.timeout_secs,
                        deadline_unix: req.timeout_secs.map(|t| now + t),
                        on_timeout: req.timeout_secs.map(|_| req.on_timeout.unwrap_or_default()),
                        ..SandboxInfo::default()
                    },
                    base_tag: snap.tag.clone(),
                    control_socket: dir.join("control.sock"),
                    dir,
                    vsock_socket: None,
                    pid_start_ticks: 0,
                    cgroup: None,
                    suspended_tag: None,
                }
            })
            .collect();
        self.store.insert_sandboxes(&rows)?;
        let mut recorded = Recorded {
            daemon: self,
            rows,
            out_dir: &out_dir,
            kept: false,
        };
        crate::failpoint::hit("spawn.recorded");
        let children = server
            .fork(&proto::control::ForkRequest::Fork {
                n: req.n,
                out_dir: out_dir.clone(),
                paused: false,
                console_log: true,
                memfd: live_fork,
                netns: namespaces.names().to_vec(),
                huge_pages,
                prewarm: req.prewarm.unwrap_or(false),
                limits,
                disk_quota_mib,
            })
            .map_err(|e| ApiError::from(e).with_context("fork failed"))?;
        crate::failpoint::hit("spawn.forked");
        let mut failure = None;
        for child in children {
            let Some(row) = recorded.rows.get_mut(child.index as usize) else {
                failure.get_or_insert(ApiError::internal(format!(
                    "the fork server answered for child {} of {}",
                    child.index, req.n
                )));
                continue;
            };
            row.info.pid = child.pid;
            row.pid_start_ticks = procs::start_ticks(child.pid).unwrap_or(0);
            row.dir = child.dir;
            row.control_socket = child.control_socket;
            row.vsock_socket = child.vsock_socket;
            row.info.state = SandboxState::Running;
            // Its memory group (or first): where OOM kills are read, and
            // the name of its group in every hierarchy.
            row.cgroup = match (&child.cgroup, &self.cgroups) {
                (Some(name), Some(h)) => h.groups(&self.instance, name).into_iter().next(),
                _ => None,
            };
            row.info.cgroup = row.cgroup.as_deref().and_then(crate::cgroup::shown);
        }
        if let Some(e) = failure {
            return Err(e);
        }
        self.store.start_sandboxes(&recorded.rows)?;
        let rows = recorded.keep();
        namespaces.keep();
        Ok(rows)
    }

    /// `GET /v1/sandboxes`: the running ones (upstream's meaning), or with
    /// `all` the exited ones too. A sandbox whose VMM has ended is
    /// recorded as exited on the way.
    pub async fn list_sandboxes(
        self: &Arc<Self>,
        all: bool,
        labels: Vec<(String, String)>,
    ) -> ApiResult<Vec<SandboxInfo>> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            for row in this.store.sandboxes()? {
                let row = this.observe(row)?;
                let shown = match row.info.state {
                    SandboxState::Running | SandboxState::Paused | SandboxState::Suspended => true,
                    SandboxState::Exited => all,
                    SandboxState::Starting => false,
                };
                let labelled = labels
                    .iter()
                    .all(|(k, v)| row.info.labels.get(k) == Some(v));
                if shown && labelled {
                    out.push(row.info);
                }
            }
            Ok(out)
        })
        .await?
    }

    /// `GET /v1/sandboxes/:id`: as it is now (exited, if its VMM ended).
    pub async fn sandbox_info(self: &Arc<Self>, id: &str) -> ApiResult<SandboxInfo> {
        let row = self.existing_sandbox(id)?;
        let this = self.clone();
        Ok(tokio::task::spawn_blocking(move || this.observe(row))
            .await??
            .info)
    }

    /// A sandbox by id (in any state), or 404.
    pub fn existing_sandbox(&self, id: &str) -> ApiResult<SandboxRow> {
        if id.is_empty()
            || id.len() > 64
            || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(ApiError::bad_request(format!("{id:?} is not a sandbox id")));
        }
        self.store
            .sandbox(id)?
            .ok_or_else(|| ApiError::not_found(format!("no sandbox {id:?}")))
    }

    /// A sandbox that is running, or 404 / 409 (starting, paused,
    /// suspended, or exited: how).
    pub(crate) async fn running_sandbox(self: &Arc<Self>, id: &str) -> ApiResult<SandboxRow> {
        self.live_sandbox(id, false).await
    }

    /// A sandbox whose VMM is alive: running, or paused when `paused_ok`;
    /// else 404 / 409 saying what it is and what to do.
    pub(crate) async fn live_sandbox(
        self: &Arc<Self>,
        id: &str,
        paused_ok: bool,
    ) -> ApiResult<SandboxRow> {
        let row = self.existing_sandbox(id)?;
        // Blocking when its VMM has just ended (its end is recorded first).
        let this = self.clone();
        let row = tokio::task::spawn_blocking(move || this.observe(row)).await??;
        match row.info.state {
            SandboxState::Running => Ok(row),
            SandboxState::Paused if paused_ok => Ok(row),
            SandboxState::Paused => Err(ApiError::conflict(format!(
                "sandbox {id:?} is paused: POST /v1/sandboxes/{id}/resume first"
            ))),
            SandboxState::Suspended => Err(ApiError::conflict(format!(
                "sandbox {id:?} is suspended (kept as snapshot {:?}, no VMM): POST /v1/sandboxes/{id}/resume restores it",
                row.suspended_tag.as_deref().unwrap_or("?")
            ))),
            SandboxState::Starting => Err(ApiError::conflict(format!(
                "sandbox {id:?} is still starting; try again in a moment"
            ))),
            SandboxState::Exited => Err(ApiError::conflict(format!(
                "sandbox {id:?} is not running: its VMM {}; delete it and spawn a new one",
                how_ended(&row.info)
            ))),
        }
    }

    /// `DELETE /v1/sandboxes/:id`: ends it if it runs, and forgets it.
    pub async fn kill(self: &Arc<Self>, id: &str) -> ApiResult<()> {
        let row = self.existing_sandbox(id)?;
        if row.info.state == SandboxState::Starting {
            return Err(ApiError::conflict(format!(
                "sandbox {id:?} is still starting; delete it once its spawn has answered"
            )));
        }
        self.forget_agent(id);
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            // Ended first, then forgotten: a crash in between leaves a
            // record of a VMM that is gone, which reads as exited.
            match row.info.state {
                s if s.has_vmm() => stop_sandbox(&this.store, &row),
                SandboxState::Suspended => this.drop_suspended(&row),
                _ => release(&this.store, &row),
            }
            this.store.delete_sandbox(&row.info.id)
        })
        .await??;
        Ok(())
    }

    /// The agent client of a running sandbox, what its agent is, and, on
    /// the first contact since this daemon started, the answer to the ping
    /// that settled it.
    ///
    /// A restored guest resets its vsock connections when it notices the
    /// device's transport reset; a connection made just before that is
    /// dropped unanswered. Pings are safe to repeat, so the first contact
    /// with a sandbox is a ping retried until the agent answers; only then
    /// does a request that is not safe to repeat go out.
    pub(crate) async fn agent_of(
        self: &Arc<Self>,
        id: &str,
        cfg: ClientConfig,
    ) -> ApiResult<(agent_client::Client, AgentKind, Option<proto::agent::Pong>)> {
        let row = self.running_sandbox(id).await?;
        let uds = row.vsock_socket.clone().ok_or_else(|| {
            ApiError::conflict(format!(
                "sandbox {id:?} has no vsock device, so no guest agent to talk to"
            ))
        })?;
        let seen = self.agent_seen(id);
        let (probe, sid) = (uds.clone(), id.to_owned());
        let pong = tokio::task::spawn_blocking(move || {
            if !procs::wait_for_path(&probe, VSOCK_APPEAR) {
                return Err(ApiError::new(
                    Kind::BadGateway,
                    format!(
                        "sandbox {sid:?}: its vsock socket {} never appeared",
                        probe.display()
                    ),
                ));
            }
            if seen.is_some() {
                return Ok(None);
            }
            let client = driver::agent(&probe, quick_agent());
            wait_for_agent(&client, AGENT_SETTLE)
                .map(Some)
                .map_err(|e| {
                    ApiError::from(e).with_context(&format!(
                        "sandbox {sid:?}'s agent did not answer within {} s",
                        AGENT_SETTLE.as_secs()
                    ))
                })
        })
        .await??;
        let kind = match (&pong, seen) {
            (Some(p), _) => self.mark_agent_seen(id, p),
            (None, Some(k)) => k,
            (None, None) => unreachable!("an unseen agent is pinged"),
        };
        Ok((driver::agent(&uds, cfg), kind, pong))
    }

    /// The agent client of a running sandbox whose agent speaks protocol 2;
    /// 501 for an older agent (or the built-in guest), naming `what` was
    /// asked.
    pub async fn agent_v2(
        self: &Arc<Self>,
        id: &str,
        cfg: ClientConfig,
        what: &str,
    ) -> ApiResult<agent_client::Client> {
        let (client, kind, _) = self.agent_of(id, cfg).await?;
        require_protocol(kind, proto::agent::PROTOCOL_VERSION, what)?;
        Ok(client)
    }

    /// `POST /v1/sandboxes/:id/ping`: the agent's answer.
    pub async fn ping(self: &Arc<Self>, id: &str) -> ApiResult<proto::agent::Pong> {
        match self.agent_of(id, quick_agent()).await? {
            (_, _, Some(pong)) => Ok(pong),
            (client, _, None) => Ok(tokio::task::spawn_blocking(move || client.ping()).await??),
        }
    }

    /// `POST /v1/sandboxes/:id/exec`.
    pub async fn exec(
        self: &Arc<Self>,
        id: &str,
        req: proto::api::ExecRequest,
    ) -> ApiResult<ExecResponse> {
        let secs = run_secs(req.timeout_secs)?;
        let stdin = match (req.stdin, req.stdin_base64) {
            (Some(_), Some(_)) => {
                return Err(ApiError::bad_request(
                    "give stdin or stdin_base64, not both",
                ))
            }
            (Some(text), None) => text.into_bytes(),
            (None, Some(b64)) => crate::guest::decode_b64("stdin_base64", &b64)?,
            (None, None) => Vec::new(),
        };
        let agent_req = proto::agent::ExecRequest {
            env: req.env,
            cwd: req.cwd,
            user: req.user,
            timeout_ms: secs * 1000,
            ..proto::agent::ExecRequest::new(req.args)
        };
        agent_req.check().map_err(ApiError::bad_request)?;
        let (client, kind, _) = self.agent_of(id, ClientConfig::default()).await?;
        require_protocol(
            kind,
            proto::agent::Request::Exec(agent_req.clone()).protocol(),
            "exec with user",
        )?;
        let out = tokio::task::spawn_blocking(move || {
            client.exec_collect(&agent_req, &stdin, MAX_EXEC_OUTPUT)
        })
        .await??;
        let exit = proto::api::ProcessExit::from_agent(&out.status);
        let base64 = req.encoding == Some(proto::api::Encoding::Base64);
        let text = |b: &[u8]| match base64 {
            true => crate::guest::encode_b64(b),
            false => String::from_utf8_lossy(b).into_owned(),
        };
        Ok(ExecResponse {
            stdout: text(&out.stdout),
            stderr: text(&out.stderr),
            exit_code: exit.exit_code,
            signal: exit.signal,
            timed_out: exit.timed_out,
            duration_ms: Some(exit.duration_ms),
            encoding: base64.then_some(proto::api::Encoding::Base64),
        })
    }

    /// `POST /v1/sandboxes/:id/eval`.
    pub async fn eval(
        self: &Arc<Self>,
        id: &str,
        req: proto::api::EvalRequest,
    ) -> ApiResult<EvalResponse> {
        let secs = run_secs(req.timeout_secs)?;
        let (client, _, _) = self.agent_of(id, ClientConfig::default()).await?;
        let r =
            tokio::task::spawn_blocking(move || client.eval(&req.code, Duration::from_secs(secs)))
                .await??;
        Ok(EvalResponse {
            result: r.result,
            error: r.error,
            exit_code: r.exit_code,
        })
    }

    /// `POST /v1/sandboxes/:id/branch`.
    ///
    /// Checked in upstream's order: the body (400), the tag (400), a free
    /// branch slot (503), the tag not taken (409), and only then the
    /// sandbox (404, or 409 when its VMM has ended) and what the body asks
    /// of it (400).
    pub async fn branch(self: &Arc<Self>, id: &str, req: BranchRequest) -> ApiResult<Branched> {
        let started = Instant::now();
        let plan = validate::branch_body(&req)?;
        let validate::BranchPlan {
            mode,
            wait,
            measure_diff,
        } = plan;
        let tag = req
            .tag
            .clone()
            .unwrap_or_else(|| format!("{id}-{}", random_hex(3)));
        if !proto::api::valid_tag(&tag) {
            return Err(ApiError::bad_request(format!(
                "tag {tag:?} is not valid: use 1 to 64 of A-Z a-z 0-9 _ -"
            )));
        }
        let permit = self.branch_slots.clone().try_acquire_owned().map_err(|_| {
            ApiError::unavailable(format!(
                "{} branches are being written (the daemon's --branch-concurrency); retry when one ends",
                self.branch_concurrency
            ))
        })?;
        let dir = self.paths.snapshot(&tag);
        let mut pending = SnapshotRow::pending(&tag, &dir);
        pending.info.branched_from = Some(id.to_owned());
        pending.info.kind = Some(
            if mode == BranchMode::Diff {
                "diff"
            } else {
                "full"
            }
            .into(),
        );
        let claim = self.claim_tag(pending)?;
        // A paused sandbox is branched as it is, and stays paused.
        let sandbox = self.live_sandbox(id, true).await?;
        // Its memory file is at most the guest's RAM.
        let mem_mib = self
            .store
            .snapshot(&sandbox.info.snapshot_tag)?
            .and_then(|s| s.info.mem_mib)
            .unwrap_or(0);
        self.reserve
            .check_disk(&self.paths.snapshots, mem_mib, "a branch")?;
        if let Some(parent) = &req.parent_tag {
            self.existing_snapshot(parent)?;
        }
        validate::branch_of(&plan, &req, id, &sandbox.base_tag, sandbox.info.live_fork)?;
        // A diff stacks on the sandbox's base; deleted (as upstream allows
        // while sandboxes run), a diff would be `ready` yet never spawn.
        if mode == BranchMode::Diff
            && self
                .store
                .snapshot(&sandbox.base_tag)?
                .is_none_or(|s| s.info.status != SnapshotStatus::Ready)
        {
            return Err(ApiError::conflict(format!(
                "sandbox {id:?}'s diffs stack on snapshot {:?}, which is deleted or not ready: take a full branch first (mode: full), then diffs stack on that",
                sandbox.base_tag
            )));
        }
        self.metrics.branches_in_flight.inc();
        let in_flight = scopeguard(self.clone());
        let request = ControlRequest::Snapshot {
            dir: dir.clone(),
            leave_paused: sandbox.info.state == SandboxState::Paused,
            mode: match mode {
                BranchMode::Full => SnapshotMode::Full,
                BranchMode::Diff => SnapshotMode::Diff,
                BranchMode::Live => SnapshotMode::Live,
            },
            wait,
            measure_diff,
        };
        let socket = sandbox.control_socket.clone();
        if self.vmm.jail() {
            // Off the async workers: binding into the VMM's jail starts a
            // thread, and waits for a VMM still entering its jail.
            let (to, pid) = (dir.clone(), sandbox.info.pid);
            tokio::task::spawn_blocking(move || procs::hand_over(&to, pid))
                .await?
                .map_err(|e| {
                    ApiError::internal(format!(
                        "cannot make the branch's directory {}: {e}",
                        dir.display()
                    ))
                })?;
        }
        let answer = tokio::task::spawn_blocking(move || {
            driver::control(&socket, &request, Duration::from_secs(1800))
        })
        .await??;
        let (pause_ms, diff) = match answer {
            ControlResponse::Snapshot { pause_ms, diff, .. } => (pause_ms, diff),
            ControlResponse::Error { message } => {
                return Err(ApiError::new(
                    Kind::Refused,
                    format!("the sandbox's VMM refused the branch: {message}"),
                ))
            }
            other => {
                return Err(ApiError::internal(format!(
                    "branch: unexpected VMM answer {other:?}"
                )))
            }
        };
        let mut row = self.row_from_dir(&tag, &dir, Some(id), pause_ms, diff)?;
        if row.info.status != SnapshotStatus::Writing {
            self.take_back(&dir, sandbox.info.pid)?;
        }
        // A branch of a child of a host-tap snapshot records that tap too.
        for from in [&sandbox.base_tag, &sandbox.info.snapshot_tag] {
            if let Some(src) = self.store.snapshot(from)?.filter(|s| s.info.tap.is_some()) {
                crate::snapshots::inherit_tap(&mut row, &src);
                break;
            }
        }
        if let Some(ms) = pause_ms {
            self.metrics.branch_pause_seconds.observe(ms / 1000.0);
        }
        let accepted = row.info.status == SnapshotStatus::Writing;
        if accepted {
            row.source_pid = Some(sandbox.info.pid);
        }
        crate::failpoint::hit("snapshot.written");
        claim.finish(&row)?;
        self.record_branch(id, &row)?;
        self.metrics
            .branch_seconds
            .observe(started.elapsed().as_secs_f64());
        if !accepted {
            self.verify_in_background(&tag);
        }
        if accepted {
            // The permit and the in-flight count go with the copy.
            let this = self.clone();
            let watched = sandbox.clone();
            tokio::spawn(async move {
                this.watch_copy(&tag, &dir, &watched).await;
                drop(permit);
                drop(in_flight);
            });
        }
        Ok(Branched {
            info: row.info,
            accepted,
        })
    }

    /// Gives the branch in `dir` back to root and out of the jail of VMM
    /// `pid` ([`procs::take_back`]).
    fn take_back(&self, dir: &Path, pid: i32) -> ApiResult<()> {
        procs::take_back(dir, pid).map_err(|e| {
            ApiError::internal(format!(
                "cannot take the branch {} back from its VMM: {e}",
                dir.display()
            ))
        })
    }

    /// Records that sandbox `id` was branched into `row`: its next diff
    /// stacks on it.
    pub fn record_branch(&self, id: &str, row: &SnapshotRow) -> ApiResult<()> {
        let memory = match row.info.kind.as_deref() {
            Some("diff") => proto::snapshot::DIFF_FILE,
            _ => proto::snapshot::MEMORY_FILE,
        };
        let path = Path::new(&row.info.dir).join(memory);
        self.store
            .record_branch(id, &row.info.tag, &path.to_string_lossy())?;
        Ok(())
    }

    /// Follows a live copy until its snapshot is ready or failed, and
    /// records the outcome.
    pub async fn watch_copy(self: &Arc<Self>, tag: &str, dir: &Path, source: &SandboxRow) {
        loop {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let status = proto::snapshot::read_meta(dir).map(|m| m.status);
            let outcome = match status {
                Ok(SnapshotStatus::Writing) => {
                    if procs::alive(source.info.pid, source.pid_start_ticks) {
                        continue;
                    }
                    Err("the source sandbox's VMM ended before the copy did".to_string())
                }
                Ok(SnapshotStatus::Ready) => Ok(()),
                Ok(SnapshotStatus::Failed) => Err(format!(
                    "the copy failed: {}",
                    procs::log_tail(&source.dir.join("vmm.log"), 400)
                )),
                Err(e) => Err(format!("the snapshot's metadata is unreadable: {e}")),
            };
            let outcome =
                outcome.and_then(|()| self.take_back(dir, source.info.pid).map_err(|e| e.message));
            let recorded = match &outcome {
                Ok(()) => self
                    .store
                    .set_snapshot_ready(tag)
                    .inspect(|()| self.verify_in_background(tag)),
                Err(why) => self
                    .store
                    .set_snapshot_status(tag, SnapshotStatus::Failed, Some(why)),
            };
            if let Err(e) = recorded {
                tracing::error!(tag, "cannot record the end of a copy: {e}");
            }
            return;
        }
    }
}

/// Decrements the in-flight gauge when dropped.
pub struct InFlight(Arc<Daemon>);

pub(crate) fn scopeguard(d: Arc<Daemon>) -> InFlight {
    InFlight(d)
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.metrics.branches_in_flight.dec();
    }
}

/// How an exited sandbox's VMM ended, for messages: "was killed by signal
/// 9 (the OOM killer)", "exited with status 1", ...
pub fn how_ended(info: &SandboxInfo) -> String {
    let oom = if info.oom_killed == Some(true) {
        " (the OOM killer, at its memory cap)"
    } else {
        ""
    };
    match (info.exit_code, info.signal) {
        (_, Some(sig)) => format!("was killed by signal {sig}{oom}"),
        (Some(code), None) => format!("exited with status {code}{oom}"),
        (None, None) => format!("ended, status unknown{oom}"),
    }
}

/// Refuses (501) what an agent of `kind` cannot do: a request needing
/// protocol `needed`.
pub fn require_protocol(kind: AgentKind, needed: u32, what: &str) -> ApiResult<()> {
    if kind.protocol >= needed {
        return Ok(());
    }
    let message = if kind.builtin {
        format!("{what} is unsupported by the built-in guest (it answers ping, eval of integer arithmetic and a few exec builtins): use a snapshot of a Linux guest with forkd-agent")
    } else {
        format!(
            "{what} is unsupported by this snapshot's agent (protocol {}): rebuild the snapshot with a forkd-agent speaking protocol {needed}",
            kind.protocol
        )
    };
    Err(ApiError::new(Kind::NotImplemented, message))
}

/// Longest a new sandbox's agent may take to answer its first ping.
const AGENT_SETTLE: Duration = Duration::from_secs(30);

/// Pings until the agent answers; a timeout or the agent's own error ends
/// the wait at once, a refused or dropped connection is retried.
fn wait_for_agent(
    client: &agent_client::Client,
    wait: Duration,
) -> Result<proto::agent::Pong, agent_client::ClientError> {
    let deadline = Instant::now() + wait;
    loop {
        match client.ping() {
            Ok(pong) => return Ok(pong),
            Err(e @ agent_client::ClientError::Timeout { .. })
            | Err(e @ agent_client::ClientError::Agent { .. }) => return Err(e),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Agent timeouts for a ping.
fn quick_agent() -> ClientConfig {
    ClientConfig {
        request_timeout: Duration::from_secs(10),
        ..ClientConfig::default()
    }
}

/// An exec or eval timeout, checked.
fn run_secs(asked: Option<u64>) -> ApiResult<u64> {
    let secs = asked.unwrap_or(60);
    if !(1..=MAX_RUN_SECS).contains(&secs) {
        return Err(ApiError::bad_request(format!(
            "timeout_secs {secs} is out of range: 1 to {MAX_RUN_SECS}"
        )));
    }
    Ok(secs)
}

/// Sandboxes recorded `starting` by a spawn that has not finished: if it
/// fails, every VMM it started is ended and every record, directory,
/// cgroup and namespace goes.
struct Recorded<'a> {
    daemon: &'a Daemon,
    rows: Vec<SandboxRow>,
    out_dir: &'a Path,
    kept: bool,
}

impl Recorded<'_> {
    /// The spawn succeeded: the records stand.
    fn keep(mut self) -> Vec<SandboxRow> {
        self.kept = true;
        std::mem::take(&mut self.rows)
    }
}

impl Drop for Recorded<'_> {
    fn drop(&mut self) {
        if self.kept {
            return;
        }
        for row in &self.rows {
            stop_sandbox(&self.daemon.store, row);
            if let Err(e) = self.daemon.store.delete_sandbox(&row.info.id) {
                tracing::error!(
                    id = row.info.id,
                    "cannot remove a failed spawn's record: {e}"
                );
            }
        }
        // A fork server that died mid-batch may have started children it
        // never answered for: found by their logs.
        for found in procs::logging_under(&[self.out_dir]) {
            procs::kill_and_reap(found.pid, found.ticks);
        }
        remove_tree(self.out_dir);
        // And the groups it made for them.
        self.daemon.sweep_cgroups();
    }
}

/// Ends a sandbox's VMM (asked, then killed) and releases what it held
/// (blocking).
pub fn stop_sandbox(store: &crate::store::Store, row: &SandboxRow) {
    let (pid, ticks) = (row.info.pid, row.pid_start_ticks);
    if pid > 0 && procs::alive(pid, ticks) {
        let _ = driver::control(
            &row.control_socket,
            &ControlRequest::Shutdown,
            Duration::from_millis(500),
        );
        let deadline = Instant::now() + Duration::from_secs(1);
        while procs::alive(pid, ticks) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    if pid > 0 {
        procs::kill_and_reap(pid, ticks);
    }
    release(store, row);
}

/// Removes a sandbox's directory, cgroup and network namespace (its VMM
/// has ended).
pub fn release(store: &crate::store::Store, row: &SandboxRow) {
    remove_tree(&row.dir);
    // The batch directory goes with its last child.
    if let Some(batch) = row.dir.parent() {
        let _ = std::fs::remove_dir(batch);
    }
    if let Some(cg) = &row.cgroup {
        crate::cgroup::remove_sandbox_group(crate::cgroup::Hierarchy::detect().as_ref(), cg);
    }
    if let Some(ns) = &row.info.netns {
        netns::remove(store, ns);
    }
}

/// Removes a directory tree; one that is gone is fine. A fork server may
/// write a child's exit record into it while it goes (ENOTEMPTY): tried
/// again then.
pub fn remove_tree(dir: &Path) {
    for attempt in 0..3 {
        match std::fs::remove_dir_all(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) if attempt == 2 => {
                tracing::warn!("cannot remove {}: {e}", dir.display());
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}
