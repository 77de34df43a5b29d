//! BRANCH: capturing a running VM into a new snapshot.
//!
//! - [`capture`]: the one entry ([`crate::machine::Machine::snapshot`])
//!   for all three modes (full, diff, live): the pause, what is captured
//!   inside it, and what is finished after it.
//! - [`live`]: the live mode's write-protect engine: arm inside the pause
//!   window, then a background copy that lets guest writes proceed (a live
//!   branch whose caller does not wait).
//! - [`prearm`]: that engine's arm done before the pause, the guest
//!   running, so the pause re-protects only what the guest wrote since.
//! - [`precopy`]: the live mode for a caller that waits: RAM copied while
//!   the guest runs, tracked by KVM's dirty log, and only what changed
//!   since the last round copied in the pause.

pub mod capture;
pub mod live;
pub mod prearm;
pub mod precopy;

/// Nice value of the threads that serve a vCPU's write-protect fault (the
/// fault handler and the pre-arm tracker): a vCPU waits on them, so they
/// should win a contended CPU over the copy and the rest of the machine.
pub(crate) const FAULT_THREAD_NICE: i32 = -10;

/// Nice value of the background copiers (bulk copy, pre-copy rounds): on a
/// small machine the vCPU and the fault handler must win.
pub(crate) const COPY_THREAD_NICE: i32 = 10;

/// Sets the calling thread's nice value. Raising priority (a negative
/// value) needs CAP_SYS_NICE (forkd-vmm runs as root under the daemon);
/// without it the error is returned, and the callers log it and go on at
/// the default priority: only latency under load is lost, never data.
pub(crate) fn set_thread_nice(nice: i32) -> std::io::Result<()> {
    // SAFETY: gettid and setpriority on the calling thread's own id touch
    // no memory of ours.
    let rc = unsafe {
        let tid = libc::gettid() as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, nice)
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// [`set_thread_nice`] for a thread that goes on either way; the first
/// failure in the process is logged.
pub(crate) fn nice_this_thread(nice: i32, what: &str) {
    static WARNED: std::sync::Once = std::sync::Once::new();
    if let Err(e) = set_thread_nice(nice) {
        WARNED.call_once(|| {
            tracing::warn!(
                "{what}: cannot set nice {nice} ({e}); BRANCH threads run at the \
                 default priority, so a vCPU may wait longer for them on a busy host"
            )
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn thread_nice() -> i32 {
        // SAFETY: getpriority on the calling thread's own id.
        unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t) }
    }

    #[test]
    fn fault_threads_run_above_and_copiers_below_the_default() {
        std::thread::spawn(|| {
            set_thread_nice(COPY_THREAD_NICE).unwrap();
            assert_eq!(thread_nice(), COPY_THREAD_NICE);
        })
        .join()
        .unwrap();
        // Tests run as root, as forkd-vmm does under the daemon.
        std::thread::spawn(|| {
            set_thread_nice(FAULT_THREAD_NICE)
                .expect("raising a thread's priority needs root (CAP_SYS_NICE)");
            assert_eq!(thread_nice(), FAULT_THREAD_NICE);
        })
        .join()
        .unwrap();
        // Only the thread changed.
        assert_eq!(thread_nice(), 0);
    }
}
