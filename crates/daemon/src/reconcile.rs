//! At start, the store, the processes and the files are made to agree,
//! both ways:
//!
//! - every record of something unfinished is finished or removed: a
//!   sandbox recorded `starting` (its spawn was cut short) is ended and
//!   forgotten; a snapshot recorded `pending` is registered when its
//!   directory is complete, else removed; a `running` sandbox whose VMM
//!   ended is recorded as exited; a live copy still being written is
//!   followed again;
//! - everything found that no record explains is ended or removed: a
//!   process whose log is in the state directory (a VMM of a sandbox
//!   nobody recorded, a source VM of a snapshot being made, a fork
//!   server's parked child), a sandbox or snapshot directory, a build
//!   directory, a cgroup or a network namespace named with this daemon's
//!   instance id.
//!
//! Fork servers a previous daemon left running (it leaves those with
//! running children, which they still reap and record) are adopted when
//! they serve a ready snapshot with this daemon's forkd-vmm; the others
//! are stopped. Each action is logged.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use proto::api::{SandboxState, SnapshotStatus};
use proto::control::{ControlRequest, ControlResponse};

use crate::daemon::Daemon;
use crate::error::StartError;
use crate::sandboxes::{release, remove_tree};
use crate::store::SnapshotRow;
use crate::{cgroup, driver, netns, procs};

/// What a reconciliation did, for its log line and tests.
#[derive(Debug, Default)]
struct Tally {
    kept: usize,
    exited: usize,
    unfinished_spawns: usize,
    killed: usize,
    dirs_removed: usize,
    snapshots_finished: usize,
    snapshots_removed: usize,
    cgroups_removed: usize,
    namespaces_removed: usize,
    fork_servers_adopted: usize,
}

/// A fork server a previous run left, adopted.
struct Adopted {
    socket: PathBuf,
    log: PathBuf,
    pid: i32,
}

/// A live copy to follow again once the runtime serves.
type Copy = (String, PathBuf, crate::store::SandboxRow);

impl Daemon {
    /// Reconciles the state directory with the store (see the module
    /// documentation), then follows again the live copies still being
    /// written.
    pub async fn recover(self: &Arc<Self>) -> Result<(), StartError> {
        let this = self.clone();
        let copies = tokio::task::spawn_blocking(move || this.reconcile())
            .await
            .map_err(|e| StartError::Recover(e.to_string()))??;
        for (tag, dir, source) in copies {
            let permit = self.branch_slots.clone().try_acquire_owned().ok();
            self.metrics.branches_in_flight.inc();
            let guard = crate::sandboxes::scopeguard(self.clone());
            let this = self.clone();
            tokio::spawn(async move {
                this.watch_copy(&tag, &dir, &source).await;
                drop(permit);
                drop(guard);
            });
        }
        Ok(())
    }

    fn reconcile(self: &Arc<Self>) -> Result<Vec<Copy>, StartError> {
        let mut t = Tally::default();
        let adopted = self.settle_fork_servers(&mut t);
        // Where forkd-vmm processes log (not the state directory's root,
        // where a supervisor may put the daemon's own log).
        let found = procs::logging_under(&[&self.paths.sandboxes, &self.paths.run]);

        // Sandboxes: the records first.
        let mut live_dirs = HashSet::new();
        let mut live_pids = HashSet::new();
        let mut live_cgroups = HashSet::new();
        for row in self.store.sandboxes()? {
            match row.info.state {
                SandboxState::Starting => {
                    for f in found.iter().filter(|f| f.log.starts_with(&row.dir)) {
                        procs::kill_and_reap(f.pid, f.ticks);
                        t.killed += 1;
                    }
                    release(&self.store, &row);
                    self.store.delete_sandbox(&row.info.id)?;
                    tracing::warn!(
                        id = row.info.id,
                        "reconcile: removed a sandbox whose spawn was cut short"
                    );
                    t.unfinished_spawns += 1;
                }
                s if s.has_vmm() && answers(&row) => {
                    live_dirs.insert(row.dir.clone());
                    live_pids.insert(row.info.pid);
                    live_cgroups.extend(row.cgroup.clone());
                    t.kept += 1;
                }
                SandboxState::Running | SandboxState::Paused => {
                    // Gone, or there but deaf to its control socket: ended.
                    if procs::alive(row.info.pid, row.pid_start_ticks) {
                        tracing::warn!(
                            id = row.info.id,
                            "reconcile: its VMM runs but does not answer; killing it"
                        );
                        procs::kill_and_reap(row.info.pid, row.pid_start_ticks);
                    }
                    self.settle_exit(&row, None)
                        .map_err(|e| StartError::Recover(e.message))?;
                    t.exited += 1;
                }
                // Kept as a snapshot: nothing of it runs.
                SandboxState::Suspended => {}
                SandboxState::Exited => release(&self.store, &row),
            }
        }

        // Processes no record explains.
        // A fork server is known by its pid, not its log: a child it has
        // just forked logs there too until it opens its own.
        let servers: HashSet<i32> = adopted.iter().map(|a| a.pid).collect();
        let staging: Vec<PathBuf> = adopted
            .iter()
            .map(|a| driver::pool_staging(&a.socket))
            .collect();
        // A sandbox is known by its record's pid too: a pooled child may
        // still log to its fork server's log when it is handed out (a
        // pool prepares at low priority).
        for f in &found {
            let explained = f.log.parent().is_some_and(|d| live_dirs.contains(d))
                || live_pids.contains(&f.pid)
                || servers.contains(&f.pid)
                || staging.iter().any(|s| f.log.starts_with(s));
            if !explained && procs::alive(f.pid, f.ticks) {
                tracing::warn!(
                    pid = f.pid,
                    log = %f.log.display(),
                    "reconcile: killing a process no record explains"
                );
                procs::kill_and_reap(f.pid, f.ticks);
                t.killed += 1;
            }
        }

        // Sandbox directories no running sandbox has.
        for batch in subdirs(&self.paths.sandboxes) {
            for child in subdirs(&batch) {
                if !live_dirs.contains(&child) {
                    tracing::warn!(dir = %child.display(), "reconcile: removing a directory no sandbox has");
                    remove_tree(&child);
                    t.dirs_removed += 1;
                }
            }
            let _ = std::fs::remove_dir(&batch);
        }
        // Build directories of snapshots being made, and what fork
        // servers that are gone left.
        let keep_in_run: HashSet<PathBuf> = adopted
            .iter()
            .flat_map(|a| {
                let pidfile = a.log.with_extension("pid");
                [
                    a.socket.clone(),
                    a.log.clone(),
                    pidfile,
                    driver::pool_staging(&a.socket),
                ]
            })
            .collect();
        for entry in std::fs::read_dir(&self.paths.run)
            .into_iter()
            .flatten()
            .flatten()
        {
            let path = entry.path();
            if keep_in_run.contains(&path) {
                continue;
            }
            tracing::warn!(path = %path.display(), "reconcile: removing what no run left behind");
            if path.is_dir() {
                remove_tree(&path);
            } else {
                let _ = std::fs::remove_file(&path);
            }
            t.dirs_removed += 1;
        }

        // Snapshots.
        let mut copies = Vec::new();
        let mut registered = HashSet::new();
        for snap in self.store.snapshots()? {
            let dir = PathBuf::from(&snap.info.dir);
            if snap.pending {
                match self.finish_pending(&snap) {
                    Some(copy) => {
                        registered.insert(dir);
                        copies.extend(copy);
                        t.snapshots_finished += 1;
                    }
                    None => t.snapshots_removed += 1,
                }
                continue;
            }
            registered.insert(dir.clone());
            if !dir.join(proto::snapshot::META_FILE).exists() {
                if snap.info.status != SnapshotStatus::Failed {
                    self.store.set_snapshot_status(
                        &snap.info.tag,
                        SnapshotStatus::Failed,
                        Some("its directory is gone"),
                    )?;
                }
                continue;
            }
            if snap.info.status == SnapshotStatus::Writing {
                copies.extend(self.copy_to_follow(&snap)?);
            }
        }
        for dir in subdirs(&self.paths.snapshots) {
            let ours = dir
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(proto::api::valid_tag);
            if ours && !registered.contains(&dir) {
                tracing::warn!(dir = %dir.display(), "reconcile: removing a snapshot directory no record names");
                remove_tree(&dir);
                t.dirs_removed += 1;
            }
        }

        // Snapshots not verified yet (made before this start, or whose
        // check was cut short) are, in the background.
        for snap in self.store.snapshots()? {
            if snap.info.status == SnapshotStatus::Ready && snap.verified.is_none() {
                self.verify_in_background(&snap.info.tag);
            }
        }

        // cgroups and namespaces named with this daemon's instance id.
        // A group is named alike in every hierarchy: a live sandbox's by
        // its record, an adopted fork server's parked children's by the
        // server's pid (`vmm-<pid>-<n>`).
        let live_names: HashSet<std::ffi::OsString> = live_cgroups
            .iter()
            .filter_map(|g: &PathBuf| g.file_name().map(|n| n.to_owned()))
            .collect();
        let servers_prefixes: Vec<String> =
            adopted.iter().map(|a| format!("vmm-{}-", a.pid)).collect();
        if let Some(h) = &self.cgroups {
            let groups = h
                .daemon_groups(&self.instance)
                .iter()
                .flat_map(|d| cgroup::groups_under(d))
                .collect::<Vec<_>>();
            for group in groups {
                let name = group.file_name().unwrap_or_default();
                // (An empty one is a parked child's that died, or one of
                // a child whose spawn was cut short and was killed above.)
                let parked = name
                    .to_str()
                    .is_some_and(|n| servers_prefixes.iter().any(|p| n.starts_with(p)))
                    && !cgroup::procs(&group).is_empty();
                if live_names.contains(name) || parked {
                    continue;
                }
                for pid in cgroup::procs(&group) {
                    if let Some(ticks) = procs::start_ticks(pid) {
                        procs::kill_and_reap(pid, ticks);
                        t.killed += 1;
                    }
                }
                tracing::warn!(group = %group.display(), "reconcile: removing a cgroup no sandbox has");
                cgroup::remove(&group);
                t.cgroups_removed += 1;
            }
        }
        t.namespaces_removed += netns::remove_orphans(&self.store)?;
        t.namespaces_removed +=
            netns::remove_unrecorded(&self.store, &netns::prefix(&self.instance))?.len();

        tracing::info!(
            kept = t.kept,
            exited = t.exited,
            unfinished_spawns = t.unfinished_spawns,
            killed = t.killed,
            removed = t.dirs_removed,
            snapshots_finished = t.snapshots_finished,
            snapshots_removed = t.snapshots_removed,
            cgroups_removed = t.cgroups_removed,
            namespaces_removed = t.namespaces_removed,
            fork_servers_adopted = t.fork_servers_adopted,
            instance = self.instance,
            "reconciled the state directory with the store"
        );
        Ok(copies)
    }

    /// Adopts the fork servers a previous daemon left that serve a ready
    /// snapshot with this forkd-vmm, stops the rest; the adopted ones.
    fn settle_fork_servers(&self, t: &mut Tally) -> Vec<Adopted> {
        let mut adopted = Vec::new();
        for (tag, server, pidfile) in driver::left_fork_servers(&self.paths.run) {
            let ready = self
                .store
                .snapshot(&tag)
                .ok()
                .flatten()
                .is_some_and(|s| s.info.status == SnapshotStatus::Ready && !s.pending);
            match server {
                // Its children must all exist before they are counted: a
                // batch the dead daemon asked for may still be forking.
                Some(server)
                    if ready && server.runs(self.vmm.binary()) && server.barrier().is_ok() =>
                {
                    tracing::info!(
                        tag,
                        "reconcile: adopted the fork server a previous run left"
                    );
                    adopted.push(Adopted {
                        socket: server.socket().to_owned(),
                        log: server.log().to_owned(),
                        pid: server.pid(),
                    });
                    self.adopt_fork_server(&tag, server);
                    t.fork_servers_adopted += 1;
                }
                Some(server) => server.stop(),
                None => {
                    let _ = std::fs::remove_file(&pidfile);
                }
            }
        }
        adopted
    }

    /// Finishes a snapshot recorded `pending` from its directory, or
    /// removes it: `None` when removed, else the live copy to follow, if
    /// its copy is still being written.
    fn finish_pending(&self, snap: &SnapshotRow) -> Option<Option<Copy>> {
        let tag = &snap.info.tag;
        let dir = PathBuf::from(&snap.info.dir);
        let status = proto::snapshot::read_meta(&dir).map(|m| m.status);
        let finished = match status {
            Ok(SnapshotStatus::Ready) | Ok(SnapshotStatus::Writing) => self
                .row_from_dir(tag, &dir, snap.info.branched_from.as_deref(), None, None)
                .ok(),
            _ => None,
        };
        let Some(mut row) = finished else {
            tracing::warn!(
                tag,
                "reconcile: removing a snapshot whose making was cut short"
            );
            let _ = self.store.delete_snapshot(tag);
            remove_tree(&dir);
            return None;
        };
        row.info.tap = snap.info.tap.clone();
        row.tap_mac = snap.tap_mac.clone();
        row.tap_addr = snap.tap_addr.clone();
        let source = snap
            .info
            .branched_from
            .as_deref()
            .and_then(|id| self.store.sandbox(id).ok().flatten())
            .filter(|s| s.info.state.has_vmm());
        if row.info.status == SnapshotStatus::Writing {
            row.source_pid = source.as_ref().map(|s| s.info.pid);
        }
        if let Err(e) = self.store.finish_snapshot(&row) {
            tracing::error!(tag, "reconcile: cannot register a finished snapshot: {e}");
            return None;
        }
        // Its sandbox's next diff stacks on it: its VMM moved on to it.
        if let Some(source) = &source {
            if let Err(e) = self.record_branch(&source.info.id, &row) {
                tracing::error!(tag, "reconcile: {}", e.message);
            }
        }
        tracing::info!(
            tag,
            "reconcile: registered a snapshot whose request was cut short after it was written"
        );
        let copy = match (row.info.status, source) {
            (SnapshotStatus::Writing, Some(source)) => Some((tag.clone(), dir, source)),
            _ => None,
        };
        Some(copy)
    }

    /// A live copy recorded `writing`: followed again while its source
    /// runs, else settled from its directory.
    fn copy_to_follow(&self, snap: &SnapshotRow) -> Result<Option<Copy>, StartError> {
        let dir = PathBuf::from(&snap.info.dir);
        let source = snap
            .info
            .branched_from
            .as_deref()
            .and_then(|id| self.store.sandbox(id).ok().flatten())
            .filter(|s| s.info.state.has_vmm());
        if let Some(source) = source {
            return Ok(Some((snap.info.tag.clone(), dir, source)));
        }
        let status = proto::snapshot::read_meta(&dir).map(|m| m.status);
        if matches!(status, Ok(SnapshotStatus::Ready)) {
            self.store.set_snapshot_ready(&snap.info.tag)?;
        } else {
            self.store.set_snapshot_status(
                &snap.info.tag,
                SnapshotStatus::Failed,
                Some("the daemon restarted during the copy and the source VMM is gone"),
            )?;
        }
        Ok(None)
    }
}

/// Whether a running sandbox's VMM is there and answers its control socket.
fn answers(row: &crate::store::SandboxRow) -> bool {
    procs::alive(row.info.pid, row.pid_start_ticks)
        && matches!(
            driver::control(
                &row.control_socket,
                &ControlRequest::Status,
                Duration::from_secs(2)
            ),
            Ok(ControlResponse::Status(_))
        )
}

/// The directories in `dir`.
fn subdirs(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}
