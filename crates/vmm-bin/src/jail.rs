//! The jail of a forked VMM (`forkd-vmm --jail on`, the default for the
//! children of `fork` and `fork-server`): a child first gets what only
//! root may open (its taps, in its network namespace; a userfaultfd that
//! catches KVM's faults; its cgroup, which the server made), then gives
//! up root for good, before it starts a thread or runs its guest:
//!
//! - a mount namespace of its own whose root holds only its directory and
//!   a procfs of its own process ([`jailfs::enter`]); a branch's directory
//!   is bound in by the privileged side while it is written
//!   ([`jailfs::bind_into`]), and so is a pooled child's directory when
//!   the server has to make one at hand-out (a staged directory renamed
//!   is the one its jail holds already);
//! - a uid and gid of its own ([`proto::control::jail_id`]: a base plus
//!   its pid). One VMM cannot signal, trace or open the files of another,
//!   nor of the host's users; its own directory is made its own.
//! - no capabilities (none permitted, none in the bounding or ambient
//!   set), so a VMM taken over cannot get root's back;
//! - no core dumps and at most [`MAX_FILES`] descriptors. A jailed child
//!   could not leave `SCHED_IDLE` by itself, so a pool prepares jailed
//!   children at normal priority.
//!
//! Credentials are per thread on Linux: that is why the drop comes while
//! the child has one thread (a thread started before would keep root).
//! The process's memory limit, CPU limit and task limit are its cgroup's.

use std::io;
use std::path::Path;
use std::sync::OnceLock;

/// Most descriptors a jailed VMM may have open: its devices, control
/// connections and snapshot files take tens.
pub const MAX_FILES: u64 = 4096;

static ON: OnceLock<bool> = OnceLock::new();

/// Chooses, once, whether this process jails the children it forks.
pub fn configure(on: bool) {
    let _ = ON.set(on);
}

/// Whether children are jailed.
pub fn on() -> bool {
    ON.get().copied().unwrap_or(false)
}

/// Lets jailed VMMs pass through `dir` to their own directories below it
/// (others may search it, not list it), when children are jailed.
pub fn let_through(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if !on() {
        return Ok(());
    }
    let mode = std::fs::metadata(dir)?.permissions().mode();
    if mode & 0o001 == 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode | 0o001))?;
    }
    Ok(())
}

/// The uid and gid of the jailed VMM of pid `pid`.
pub fn id_of(pid: libc::pid_t) -> u32 {
    proto::control::jail_id(pid)
}

/// Gives up root for good (see the module's note), making `dir`, the
/// child's directory (absolute), and what is in it its own first, and the
/// only directory it sees.
/// Only a process with one thread may call it. Returns the uid it runs as.
pub fn drop_root(dir: &Path) -> io::Result<u32> {
    one_thread()?;
    // SAFETY: getpid has no preconditions.
    let id = id_of(unsafe { libc::getpid() });
    let fail = |what: &str| {
        let e = io::Error::last_os_error();
        io::Error::new(e.kind(), format!("jail: {what}: {e}"))
    };
    // The directory and what the VMM made in it as root (its sockets,
    // logs, disk layers): a snapshot reads its layers back by path.
    let chown = |path: &Path| {
        std::os::unix::fs::lchown(path, Some(id), Some(id))
            .map_err(|e| io::Error::new(e.kind(), format!("jail: chown {}: {e}", path.display())))
    };
    chown(dir)?;
    for entry in std::fs::read_dir(dir)? {
        chown(&entry?.path())?;
    }
    jailfs::enter(dir)?;
    // Only lowered (raising a hard limit needs CAP_SYS_RESOURCE, which a
    // container's root may not have).
    for (resource, value) in [(libc::RLIMIT_CORE, 0), (libc::RLIMIT_NOFILE, MAX_FILES)] {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: `lim` is a valid rlimit for the call to fill.
        if unsafe { libc::getrlimit(resource, &mut lim) } != 0 {
            return Err(fail("getrlimit"));
        }
        let value = value.min(lim.rlim_max);
        let lim = libc::rlimit {
            rlim_cur: value,
            rlim_max: value,
        };
        // SAFETY: `lim` is a valid rlimit for the call.
        if unsafe { libc::setrlimit(resource, &lim) } != 0 {
            return Err(fail("setrlimit"));
        }
    }
    // The bounding set, while CAP_SETPCAP is still held; the kernel says
    // EINVAL past its last capability.
    for cap in 0..64 {
        // SAFETY: PR_CAPBSET_DROP takes a capability number.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } != 0 {
            if io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
                break;
            }
            return Err(fail("PR_CAPBSET_DROP"));
        }
    }
    // SAFETY: prctl with constant arguments.
    if unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    } != 0
    {
        return Err(fail("PR_CAP_AMBIENT_CLEAR_ALL"));
    }
    // SAFETY: an empty list of supplementary groups.
    if unsafe { libc::setgroups(0, std::ptr::null()) } != 0 {
        return Err(fail("setgroups"));
    }
    // SAFETY: plain id changes. All three ids of each: nothing to go back
    // to. Leaving uid 0 clears the permitted and effective capabilities.
    if unsafe { libc::setresgid(id, id, id) } != 0 {
        return Err(fail("setresgid"));
    }
    // SAFETY: as above.
    if unsafe { libc::setresuid(id, id, id) } != 0 {
        return Err(fail("setresuid"));
    }
    // A VMM whose credentials changed is not dumpable, so /proc/self is
    // root's; its own files there (its status, its tasks) stay readable
    // (0444), and nobody but root may trace it, which is what we want.
    check_dropped(id)?;
    Ok(id)
}

/// Fails unless this process has one thread. A helper thread that was
/// joined (one that attached a tap in another network namespace) can
/// still be listed for a moment while the kernel finishes its exit, so
/// a second thread is given [`THREAD_EXIT_WAIT`] to go.
fn one_thread() -> io::Result<()> {
    let deadline = std::time::Instant::now() + THREAD_EXIT_WAIT;
    loop {
        let threads = std::fs::read_dir("/proc/self/task")?.count();
        if threads == 1 {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            return Err(io::Error::other(format!(
                "jail: this process has {threads} threads; it may give up root only with one (a thread started before would keep root)"
            )));
        }
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
}

/// How long [`one_thread`] waits for a joined thread to be gone.
const THREAD_EXIT_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

/// Fails unless this thread runs as `id` with no capabilities.
fn check_dropped(id: u32) -> io::Result<()> {
    let status = std::fs::read_to_string("/proc/thread-self/status")?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
            .unwrap_or("")
            .to_owned()
    };
    let caps_gone = ["CapPrm:", "CapEff:", "CapBnd:", "CapAmb:"]
        .iter()
        .all(|f| field(f).bytes().all(|b| b == b'0'));
    let uid_ok = field("Uid:")
        .split_whitespace()
        .all(|u| u == id.to_string());
    if caps_gone && uid_ok {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "jail: after the drop this thread has uids {} and capabilities {} (permitted), {} (bounding)",
            field("Uid:"),
            field("CapPrm:"),
            field("CapBnd:")
        )))
    }
}
