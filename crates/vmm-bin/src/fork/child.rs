//! A child's life after the fork: parked in the pool, or started at once.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use vmm::builder::{self, PreparedRestore, RestoreConfig, RestoreRam};
use vmm::devices::serial::ConsoleOutput;

use super::forker::Forker;
use super::order::{receive_order, READY, RUN_AHEAD_REFUSED};
use super::{CONSOLE_LOG, POOLED_NAME};

/// Sets the scheduling policy of thread `tid` (0: the calling thread),
/// with static priority 0 (what `SCHED_OTHER` and `SCHED_IDLE` take).
pub(super) fn set_scheduler(tid: libc::pid_t, policy: libc::c_int) -> std::io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid sched_param for the call.
    if unsafe { libc::sched_setscheduler(tid, policy, &param) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Whether a thread of this process that went to `SCHED_IDLE` may come
/// back to `SCHED_OTHER` (CAP_SYS_NICE or a high enough RLIMIT_NICE):
/// tried on the calling thread, which ends where it started.
pub(super) fn idle_is_reversible() -> bool {
    // SAFETY: sched_getscheduler has no memory-safety preconditions.
    if unsafe { libc::sched_getscheduler(0) } != libc::SCHED_OTHER {
        return false;
    }
    if set_scheduler(0, libc::SCHED_IDLE).is_err() {
        return false;
    }
    if set_scheduler(0, libc::SCHED_OTHER).is_ok() {
        return true;
    }
    eprintln!(
        "forkd-vmm fork-server: this process cannot raise a thread back from SCHED_IDLE \
         (no CAP_SYS_NICE) and stays there; run it as root"
    );
    false
}

/// A pooled child: prepares its restore (at `SCHED_IDLE`, from its fork,
/// when `idle`) and
/// its directory under `staging`, says it is ready, parks until the server
/// hands it a request (or goes away), then becomes that request's child,
/// at normal priority.
pub(super) fn pooled_child(
    forker: &Forker,
    link: OwnedFd,
    idle: bool,
    staging: &Path,
    stage_console: bool,
    run_ahead: bool,
) -> i32 {
    // Whoever reads the server's stdout must not wait for parked children;
    // stderr stays the server's until the child has a directory, so a
    // restore that cannot be prepared is reported in the server's log.
    for to in [0, 1] {
        // SAFETY: both descriptors are open; dup2 replaces `to` atomically.
        unsafe { libc::dup2(forker.null.as_raw_fd(), to) };
    }
    // Its own session now: the server's terminal signals do not reach it.
    // SAFETY: setsid has no memory-safety preconditions.
    unsafe { libc::setsid() };
    // SAFETY: getpid has no preconditions.
    let staged = staging.join(unsafe { libc::getpid() }.to_string());
    let ahead = match prepare_pooled(forker, &staged, stage_console, run_ahead) {
        Ok(p) => p,
        Err(e) => {
            if matches!(e, PrepareError::RunAhead(_)) {
                // SAFETY: a one-byte buffer; MSG_NOSIGNAL turns a closed
                // peer into EPIPE.
                unsafe {
                    libc::send(
                        link.as_raw_fd(),
                        [RUN_AHEAD_REFUSED].as_ptr().cast(),
                        1,
                        libc::MSG_NOSIGNAL,
                    )
                };
            }
            eprintln!(
                "forkd-vmm pooled child: cannot prepare a restore of {}: {e}",
                forker.snapshot.dir.display()
            );
            let _ = std::fs::remove_dir_all(&staged);
            return 2;
        }
    };
    vmm::seccomp::set_thread_name(POOLED_NAME);
    // A closed link (the server gone) fails the send; the wait below sees it.
    // SAFETY: a one-byte buffer; MSG_NOSIGNAL turns a closed peer into EPIPE.
    unsafe {
        libc::send(
            link.as_raw_fd(),
            [READY].as_ptr().cast(),
            1,
            libc::MSG_NOSIGNAL,
        )
    };
    let order = receive_order(&link);
    // A jailed child may not; its server raised every thread already.
    if idle && !crate::jail::on() {
        // This thread first, then the threads it started while idle.
        let threads = ahead.prepared.vcpu_thread_ids().into_iter();
        let threads = threads.chain([ahead.worker]);
        for tid in std::iter::once(0).chain(threads) {
            if let Err(e) = set_scheduler(tid, libc::SCHED_OTHER) {
                eprintln!("forkd-vmm pooled child: cannot leave SCHED_IDLE (thread {tid}): {e}");
            }
        }
    }
    vmm::seccomp::set_thread_name("forkd-vmm");
    match order {
        Ok(Some(order)) => {
            // A jailed child sees its directory where it was staged: the
            // server renamed it to `order.dir` on the host, the same
            // directory, and binds nothing more in for that.
            let own = if order.listener.is_none() && crate::jail::on() {
                staged.as_path()
            } else {
                order.dir.as_path()
            };
            let mut cfg = forker.child_config(own, order.options, order.netns.as_deref());
            if !forker.snapshot.meta.nets.is_empty() {
                cfg.taps = Some(Arc::new(order.taps));
            }
            let (listener, log) = match order.listener {
                // The server renamed the staged directory to `order.dir`.
                None => {
                    if stage_console && !order.options.console_log {
                        let _ = std::fs::remove_file(own.join(CONSOLE_LOG));
                    }
                    if stage_console && order.options.console_log {
                        // The console opened ahead, in the directory now
                        // at `order.dir`: said so by naming it as it was.
                        cfg.console = ahead.console.clone();
                    }
                    (ahead.listener, Some(ahead.log))
                }
                // The server made the directory and socket: ours go.
                Some(listener) => {
                    drop(ahead.listener);
                    let _ = std::fs::remove_dir_all(&staged);
                    (listener, None)
                }
            };
            child(
                forker,
                own,
                listener,
                log,
                &cfg,
                Some(Handed {
                    prepared: ahead.prepared,
                    link,
                }),
                &ahead.workers,
            )
        }
        // The server is gone: nobody will ask for this child.
        Ok(None) => {
            let _ = std::fs::remove_dir_all(&staged);
            0
        }
        Err(e) => {
            eprintln!("forkd-vmm pooled child: cannot take its order: {e}");
            let _ = std::fs::remove_dir_all(&staged);
            2
        }
    }
}

/// Why a pooled child could not make its restore ahead.
#[derive(Debug, thiserror::Error)]
pub(super) enum PrepareError {
    /// Its guest, run ahead to its first wait, met a device on the way
    /// (so would every sibling's).
    #[error("{0}")]
    RunAhead(String),
    /// Anything else.
    #[error("{0}")]
    Other(String),
}

/// What a pooled child makes ahead.
pub(super) struct Ahead<'a> {
    /// Its restore, with its vCPU threads started (each has made its first
    /// KVM_RUN) and its devices made ([`PreparedRestore::make_ahead`]).
    prepared: PreparedRestore<'a>,
    /// The console its devices were made with: its staged `console.log`
    /// or nowhere.
    console: ConsoleOutput,
    /// Its control connection workers, one started.
    workers: crate::control::Workers,
    /// The kernel thread id of that worker.
    worker: libc::pid_t,
    /// Its control socket, bound in its staged directory.
    listener: UnixListener,
    /// Its `vmm.log`, open in its staged directory.
    log: std::fs::File,
}

/// Makes what a pooled child makes ahead, its directory as `staged` (with
/// an empty `console.log` when `stage_console`), its guest run ahead to
/// its first wait when it can be and `run_ahead`.
pub(super) fn prepare_pooled<'a>(
    forker: &'a Forker,
    staged: &Path,
    stage_console: bool,
    run_ahead: bool,
) -> Result<Ahead<'a>, PrepareError> {
    let other = PrepareError::Other;
    // Not create_dir_all: once the server has removed the staging
    // directory (it is stopping), no child makes it again.
    std::fs::create_dir(staged)
        .map_err(|e| other(format!("cannot create {}: {e}", staged.display())))?;
    let listener =
        crate::control::bind(&staged.join("control.sock")).map_err(|e| other(e.to_string()))?;
    let log = open_log(staged).map_err(|e| other(format!("cannot create its vmm.log: {e}")))?;
    if crate::jail::on() {
        // Before any thread: its taps come with its order, from the server.
        crate::jail::drop_root(staged).map_err(|e| other(e.to_string()))?;
    }
    // Creates the console log when staged.
    let console = if stage_console {
        ConsoleOutput::File(staged.join(CONSOLE_LOG))
    } else {
        ConsoleOutput::Sink
    };
    // Devices and identity first: the vCPU threads may run the guest
    // ahead to its first wait, which must see them.
    let mut prepared = builder::prepare_restore(
        &forker.snapshot,
        forker.kvm.clone(),
        RestoreRam::SnapshotFile,
    )
    .and_then(|p| p.make_ahead(&console))
    .map_err(|e| other(e.to_string()))?;
    // Device threads take their filters here, off the request's path.
    vmm::seccomp::start_ahead(vmm::seccomp::Kind::Device, prepared.device_threads())
        .map_err(|e| other(format!("cannot start its device threads: {e}")))?;
    prepared
        .start_vcpu_threads(run_ahead)
        .map_err(|e| match e {
            builder::BuildError::RunAhead { .. } => PrepareError::RunAhead(e.to_string()),
            e => other(e.to_string()),
        })?;
    let workers = crate::control::Workers::new();
    let worker = workers
        .start_one()
        .map_err(|e| other(format!("cannot start a control worker: {e}")))?;
    Ok(Ahead {
        prepared,
        console,
        workers,
        worker,
        listener,
        log,
    })
}

/// Opens (creating) `<dir>/vmm.log` for appending.
pub(super) fn open_log(dir: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("vmm.log"))
}

/// What a pooled child brings to [`child`] from its wait.
pub(super) struct Handed<'a> {
    /// Its restore, made ahead.
    prepared: PreparedRestore<'a>,
    /// Its link to the server, closed once the machine runs: the server
    /// waits for that before it refills its pool.
    link: OwnedFd,
}

/// The child: detach from the parent's session and standard streams,
/// restore (finishing the restore `handed` over when it was made ahead),
/// serve until the VM ends.
pub(super) fn child(
    forker: &Forker,
    dir: &Path,
    listener: UnixListener,
    log: Option<std::fs::File>,
    cfg: &RestoreConfig,
    handed: Option<Handed<'_>>,
    workers: &crate::control::Workers,
) -> i32 {
    let snapshot = &forker.snapshot;
    let socket = dir.join("control.sock");
    if let Err(e) = detach(dir, &forker.null, log) {
        eprintln!("forkd-vmm child: {e}");
        return 2;
    }
    let (prepared, link) = match handed {
        Some(h) => (Some(h.prepared), Some(h.link)),
        None => (None, None),
    };
    let built = match prepared {
        Some(p) => p.finish(cfg),
        None => builder::prepare_restore(snapshot, forker.kvm.clone(), cfg.ram)
            .and_then(|p| p.finish(cfg)),
    };
    match built {
        Ok(machine) => {
            drop(link);
            if let Err(e) = crate::confine_main_thread() {
                eprintln!("forkd-vmm child: {e}");
                let _ = std::fs::remove_file(&socket);
                return 2;
            }
            let code =
                crate::serve_until_exit(Arc::new(machine), Some(listener), Some(&socket), workers);
            if code == ExitCode::SUCCESS {
                0
            } else {
                1
            }
        }
        Err(e) => {
            eprintln!(
                "forkd-vmm child: cannot restore {}: {e}",
                snapshot.dir.display()
            );
            let _ = std::fs::remove_file(&socket);
            2
        }
    }
}

/// New session (the parent's terminal signals no longer reach the child);
/// stdin and stdout to /dev/null, stderr to `<dir>/vmm.log` (`log` when it
/// is open already), so whoever reads the parent's output sees its end
/// when the parent returns.
pub(super) fn detach(
    dir: &Path,
    null: &std::fs::File,
    log: Option<std::fs::File>,
) -> std::io::Result<()> {
    // SAFETY: setsid has no memory-safety preconditions (a pooled child is
    // a session leader already, and this fails harmlessly).
    unsafe { libc::setsid() };
    let log = match log {
        Some(log) => log,
        None => open_log(dir)?,
    };
    for (from, to) in [(null, 0), (null, 1), (&log, 2)] {
        // SAFETY: both descriptors are open; dup2 replaces `to` atomically.
        if unsafe { libc::dup2(from.as_raw_fd(), to) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}
