//! Kill points for crash tests: `FORKD_FAILPOINTS=spawn.forked,...` names
//! state transitions at which the daemon kills itself with SIGKILL, as a
//! power cut or an OOM kill would, so tests can check that a restart
//! reconciles what each point leaves behind. Unset (always, outside
//! tests), a point costs one load of a value read once.
//!
//! The points, in the order a request passes them:
//!
//! - `spawn.recorded`: the sandboxes are recorded `starting`, no VMM yet;
//! - `spawn.forked`: their VMMs run, the records still say `starting`;
//! - `snapshot.recorded`: a snapshot's tag is recorded `pending`;
//! - `create.booted`: a new snapshot's source VM runs;
//! - `snapshot.written`: the snapshot's directory is complete, its record
//!   still `pending`;
//! - `delete.unregistered`: a deleted snapshot's record is gone, its
//!   directory not yet.

use std::sync::OnceLock;

/// The environment variable naming the points.
pub const ENV: &str = "FORKD_FAILPOINTS";

fn armed() -> &'static [String] {
    static ARMED: OnceLock<Vec<String>> = OnceLock::new();
    ARMED.get_or_init(|| {
        std::env::var(ENV)
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(str::to_owned)
            .collect()
    })
}

/// Kills the daemon here if `point` is armed.
pub fn hit(point: &str) {
    if armed().iter().any(|p| p == point) {
        eprintln!("forkd-daemon: failpoint {point}: killing myself");
        // SAFETY: kill of this process's own pid; no memory involved.
        unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    }
}
