//! A memory cap per sandbox: a cgroup holding its VMM process.
//!
//! cgroup v2 (a unified hierarchy at /sys/fs/cgroup, `memory.max`) when the
//! memory controller is there, else cgroup v1's memory hierarchy
//! (`memory.limit_in_bytes`). Sandboxes go under a `forkd` group.

use std::path::{Path, PathBuf};

/// A group could not be made, capped or filled.
#[derive(Debug, thiserror::Error)]
#[error("cannot set up the memory cgroup at {}: {source}", path.display())]
pub struct Error {
    /// The file or directory.
    pub path: PathBuf,
    /// Why.
    #[source]
    pub source: std::io::Error,
}

/// Which hierarchy holds the memory controller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Hierarchy {
    /// cgroup v2 at this mount.
    V2(PathBuf),
    /// cgroup v1's memory controller at this mount.
    V1(PathBuf),
}

impl Hierarchy {
    /// The memory controller on this host, if any.
    pub fn detect() -> Option<Hierarchy> {
        let v2 = Path::new("/sys/fs/cgroup");
        if std::fs::read_to_string(v2.join("cgroup.controllers"))
            .is_ok_and(|c| c.split_whitespace().any(|x| x == "memory"))
        {
            return Some(Hierarchy::V2(v2.to_owned()));
        }
        let v1 = Path::new("/sys/fs/cgroup/memory");
        v1.join("memory.limit_in_bytes")
            .exists()
            .then(|| Hierarchy::V1(v1.to_owned()))
    }

    /// Creates the group for sandbox `id`, caps it at `mib` and moves `pid`
    /// into it; returns its directory.
    pub fn confine(&self, id: &str, mib: u64, pid: i32) -> Result<PathBuf, Error> {
        let (root, limit_file) = match self {
            Hierarchy::V2(root) => (root, "memory.max"),
            Hierarchy::V1(root) => (root, "memory.limit_in_bytes"),
        };
        let parent = root.join("forkd");
        if let Hierarchy::V2(_) = self {
            // The memory controller reaches `forkd`'s children only when
            // every level above hands it down: the root (which an init
            // system such as systemd has done already, a bare host not)
            // and `forkd` itself.
            enable_memory(root)?;
            if !parent.exists() {
                std::fs::create_dir_all(&parent).map_err(|e| cg_err(&parent, e))?;
            }
            enable_memory(&parent)?;
        }
        let dir = parent.join(id);
        std::fs::create_dir_all(&dir).map_err(|e| cg_err(&dir, e))?;
        let bytes = mib.saturating_mul(1 << 20);
        std::fs::write(dir.join(limit_file), bytes.to_string())
            .map_err(|e| cg_err(&dir.join(limit_file), e))?;
        std::fs::write(dir.join("cgroup.procs"), pid.to_string())
            .map_err(|e| cg_err(&dir.join("cgroup.procs"), e))?;
        Ok(dir)
    }
}

/// Removes a sandbox's group once its processes are gone. A process that
/// has just been killed leaves the group a moment after it stops running
/// (EBUSY until then), so this retries for up to a second; a group that
/// still holds a process after that stays, and the log says so.
pub fn remove(dir: &Path) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e)
                if e.raw_os_error() == Some(libc::EBUSY)
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            Err(e) => {
                tracing::warn!("cannot remove cgroup {}: {e}", dir.display());
                return;
            }
        }
    }
}

/// Hands the memory controller down to `dir`'s children (cgroup v2), when
/// it does not already.
fn enable_memory(dir: &Path) -> Result<(), Error> {
    let ctl = dir.join("cgroup.subtree_control");
    let on = std::fs::read_to_string(&ctl)
        .map_err(|e| cg_err(&ctl, e))?
        .split_whitespace()
        .any(|c| c == "memory");
    if !on {
        std::fs::write(&ctl, "+memory").map_err(|e| cg_err(&ctl, e))?;
    }
    Ok(())
}

fn cg_err(path: &Path, source: std::io::Error) -> Error {
    Error {
        path: path.to_owned(),
        source,
    }
}
