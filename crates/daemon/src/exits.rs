//! Sandboxes whose VMM ended: noticed on every read and by a reaper
//! thread, recorded with how they ended (exit status or signal, and
//! whether their cgroup's OOM killer did it), their resources released,
//! and forgotten once the retention time has passed.
//!
//! How a VMM ended comes from, in order: the `exit.json` its fork server
//! wrote before reaping it; the daemon's own `waitpid` (a VMM whose fork
//! server died is re-parented to the daemon, its subreaper); or nobody
//! (it ended while the daemon was down, after its fork server): `status
//! unknown`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use proto::control::ChildExit;

use crate::daemon::Daemon;
use crate::error::ApiResult;
use crate::store::{Ended, SandboxRow};
use crate::util::now_unix;
use crate::{cgroup, procs};

/// How often the reaper looks.
const REAPER_TICK: Duration = Duration::from_millis(500);
/// How long a reader waits for a fork server to write the record of a
/// child that has just ended (it writes before it reaps).
const RECORD_WAIT: Duration = Duration::from_millis(300);

impl Daemon {
    /// `row` as it is now: a running sandbox whose VMM has ended is
    /// recorded as exited first (blocking: a few file reads, and the
    /// release of its directory, cgroup and namespace).
    pub fn observe(&self, row: SandboxRow) -> ApiResult<SandboxRow> {
        if !row.info.state.has_vmm() || procs::alive(row.info.pid, row.pid_start_ticks) {
            return Ok(row);
        }
        self.settle_exit(&row, None)?;
        Ok(self.store.sandbox(&row.info.id)?.unwrap_or(row))
    }

    /// Records how sandbox `row`'s VMM ended and releases what it held;
    /// `status` when the caller reaped it already. Only the first caller
    /// for a sandbox releases (the reaper and a request may race).
    pub fn settle_exit(&self, row: &SandboxRow, status: Option<ChildExit>) -> ApiResult<()> {
        let (pid, ticks) = (row.info.pid, row.pid_start_ticks);
        let status = status.or_else(|| how_it_ended(row));
        let oom_killed = row
            .cgroup
            .as_deref()
            .and_then(cgroup::oom_kills)
            .is_some_and(|n| n > 0);
        let log = procs::log_tail(&row.dir.join("vmm.log"), 300);
        let detail = match status {
            Some(s) if s.code == Some(proto::control::SECCOMP_VIOLATION_EXIT_CODE) => {
                Some(format!(
                "seccomp violation: its VMM made a system call its thread's filter forbids and \
                 was ended (a bug, or a guest exploiting one); its log ends: {log}"
            ))
            }
            Some(_) if log.is_empty() => None,
            Some(_) => Some(log),
            None => Some(format!(
                "status unknown: its VMM (pid {pid}) ended while nobody was there to see how \
                 (the daemon was down and its fork server gone){}",
                if log.is_empty() {
                    String::new()
                } else {
                    format!("; its log ends: {log}")
                }
            )),
        };
        let end = Ended {
            code: status.and_then(|s| s.code),
            signal: status.and_then(|s| s.signal),
            oom_killed,
            at_unix: now_unix(),
            detail,
        };
        if !self.store.set_exited(&row.info.id, &end)? {
            return Ok(());
        }
        tracing::warn!(
            id = row.info.id,
            pid,
            code = end.code,
            signal = end.signal,
            oom_killed,
            "sandbox's VMM ended"
        );
        self.forget_agent(&row.info.id);
        // A zombie of this process must not outlive its record.
        procs::kill_and_reap(pid, ticks);
        crate::sandboxes::release(&self.store, row);
        Ok(())
    }

    /// Starts the reaper: every tick it reaps the daemon's own children
    /// among the sandboxes' VMMs (those whose fork server died), records
    /// every sandbox whose VMM ended, reaps parked pool children orphaned
    /// by a dead fork server, and forgets exited sandboxes older than the
    /// retention time.
    pub fn start_reaper(self: &Arc<Self>) {
        let this = self.clone();
        let started = std::thread::Builder::new()
            .name("reaper".into())
            .spawn(move || loop {
                let tick = Instant::now();
                this.reap_once();
                std::thread::sleep(REAPER_TICK.saturating_sub(tick.elapsed()));
            });
        if let Err(e) = started {
            tracing::error!(
                "cannot start the reaper thread: {e}; ended sandboxes are noticed only when read"
            );
        }
    }

    /// One pass of the reaper.
    pub fn reap_once(&self) {
        let rows = match self.store.sandboxes() {
            Ok(rows) => rows,
            Err(e) => {
                tracing::error!("reaper: {e}");
                return;
            }
        };
        for row in rows {
            if !row.info.state.has_vmm() {
                continue;
            }
            let reaped = procs::reap(row.info.pid, row.pid_start_ticks);
            if let Some(exit) = &reaped {
                procs::write_exit_record(&row.dir, exit);
            }
            if reaped.is_some() || !procs::alive(row.info.pid, row.pid_start_ticks) {
                if let Err(e) = self.settle_exit(&row, reaped) {
                    tracing::error!(id = row.info.id, "reaper: {e}");
                }
            }
        }
        // Parked pool children of a fork server that died come here and
        // exit; nobody else waits for them.
        for pid in procs::children() {
            if matches!(procs::name_and_state(pid), Some((name, 'Z')) if name == POOLED_NAME) {
                if let Some(ticks) = procs::start_ticks(pid) {
                    procs::reap(pid, ticks);
                }
            }
        }
        let cutoff = now_unix().saturating_sub(self.exited_retention.as_secs());
        match self.store.exited_before(cutoff) {
            Ok(ids) => {
                for id in ids {
                    if let Err(e) = self.store.delete_sandbox(&id) {
                        tracing::error!(id, "reaper: cannot forget an exited sandbox: {e}");
                    }
                }
            }
            Err(e) => tracing::error!("reaper: {e}"),
        }
    }
}

/// The name a parked pool child has (forkd-vmm's `POOLED_NAME`).
const POOLED_NAME: &str = "forkd-pooled";

/// How `row`'s VMM ended, from its exit record or the daemon's own wait.
fn how_it_ended(row: &SandboxRow) -> Option<ChildExit> {
    let pid = row.info.pid;
    let deadline = Instant::now() + RECORD_WAIT;
    loop {
        if let Some(exit) = procs::exit_record(&row.dir, pid) {
            return Some(exit);
        }
        if let Some(exit) = procs::reap(pid, row.pid_start_ticks) {
            procs::write_exit_record(&row.dir, &exit);
            return Some(exit);
        }
        // Still a zombie: its parent (a fork server) is about to record
        // and reap it.
        let zombie = procs::start_ticks(pid) == Some(row.pid_start_ticks);
        if !zombie || Instant::now() >= deadline {
            return procs::exit_record(&row.dir, pid);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}
