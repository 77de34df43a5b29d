//! Child processes and signals: one thread reaps every child (so the agent
//! can be PID 1 and collect orphans) and hands each status to whoever spawned
//! that child; SIGTERM is forwarded.
//!
//! The registry lock is held across `spawn` and across the reaper's
//! `waitpid(-1)` loop, so the reaper can neither take the status of a
//! child before its spawner has registered it nor race the standard
//! library's own `waitpid` on a child whose `exec` failed.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::log::log;

/// Where a child's wait status arrives.
pub struct Slot {
    status: Mutex<Option<i32>>,
    cv: Condvar,
    /// Becomes readable when the status is in (for `poll`).
    notify_r: OwnedFd,
    notify_w: OwnedFd,
}

impl Slot {
    fn new() -> io::Result<Slot> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both fds are open and owned by nobody else.
        let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        Ok(Slot {
            status: Mutex::new(None),
            cv: Condvar::new(),
            notify_r: r,
            notify_w: w,
        })
    }

    fn set(&self, status: i32) {
        *self.status.lock().unwrap_or_else(|e| e.into_inner()) = Some(status);
        self.cv.notify_all();
        // SAFETY: writes one byte from a valid buffer to an fd we own.
        unsafe { libc::write(self.notify_w.as_raw_fd(), [1u8].as_ptr().cast(), 1) };
    }

    /// The wait status, if the child has been reaped.
    pub fn status(&self) -> Option<i32> {
        *self.status.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits up to `timeout` for the wait status.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        let mut g = self.status.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(s) = *g {
                return Some(s);
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            g = self
                .cv
                .wait_timeout(g, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// An fd that becomes readable once the child is reaped.
    pub fn notify_fd(&self) -> RawFd {
        self.notify_r.as_raw_fd()
    }
}

/// Spawns and reaps child processes.
pub struct Children {
    waiting: Mutex<HashMap<i32, Arc<Slot>>>,
}

static CHILDREN: OnceLock<Children> = OnceLock::new();

/// The process-wide registry.
pub fn children() -> &'static Children {
    CHILDREN.get_or_init(|| Children {
        waiting: Mutex::new(HashMap::new()),
    })
}

impl Children {
    /// Spawns `cmd` and registers it; never call `wait` on the returned
    /// [`Child`], wait on the [`Slot`].
    pub fn spawn(&self, cmd: &mut Command) -> io::Result<(Child, Arc<Slot>)> {
        let slot = Arc::new(Slot::new()?);
        // SAFETY: the closure runs in the child between fork and exec and
        // only calls sigemptyset and pthread_sigmask, which are
        // async-signal-safe; it unblocks the signals the agent blocks for
        // its signal thread (the standard library does not reset the mask).
        unsafe {
            cmd.pre_exec(|| {
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::pthread_sigmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
                Ok(())
            });
        }
        let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        let child = cmd.spawn()?;
        waiting.insert(child.id() as i32, slot.clone());
        Ok((child, slot))
    }

    /// Reaps every child that has exited, handing statuses to their slots
    /// (orphans inherited as PID 1 are just collected).
    pub fn reap(&self) {
        let mut waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let mut status = 0;
            // SAFETY: waitpid writes the status into a valid int.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid <= 0 {
                break;
            }
            if let Some(slot) = waiting.remove(&pid) {
                slot.set(status);
            }
        }
    }
}

/// Signals the agent handles on its signal thread.
const HANDLED: [i32; 4] = [libc::SIGCHLD, libc::SIGTERM, libc::SIGINT, libc::SIGHUP];

fn handled_set() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise and fill a sigset_t we own.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in HANDLED {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

/// Blocks the handled signals in the calling thread; call before any other
/// thread exists so all threads inherit the mask (children get an empty
/// mask back from the standard library's spawn).
pub fn block_signals() {
    let set = handled_set();
    // SAFETY: `set` is an initialised sigset_t; the old mask is not wanted.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
}

/// Starts the signal thread: reaps on SIGCHLD; on SIGTERM forwards it (to
/// every process when PID 1, which keeps serving; otherwise calls `on_exit`).
pub fn start_signal_thread(pid1: bool, on_exit: fn()) -> io::Result<()> {
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let set = handled_set();
            loop {
                let mut sig = 0;
                // SAFETY: `set` is initialised and `sig` is a valid int to fill.
                if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                    continue;
                }
                match sig {
                    libc::SIGCHLD => children().reap(),
                    libc::SIGTERM if pid1 => {
                        log!("SIGTERM: forwarding to all processes");
                        // SAFETY: kill(-1) as PID 1 signals every process but itself.
                        unsafe { libc::kill(-1, libc::SIGTERM) };
                    }
                    libc::SIGTERM | libc::SIGINT | libc::SIGHUP if !pid1 => on_exit(),
                    _ => {}
                }
                // A SIGCHLD may have been merged into another signal's wake-up.
                children().reap();
            }
        })?;
    Ok(())
}

/// Sends `sig` to the process group `pgid`.
pub fn kill_group(pgid: i32, sig: i32) {
    if pgid > 0 {
        // SAFETY: kill with a negative pid signals a process group; no memory involved.
        unsafe { libc::kill(-pgid, sig) };
    }
}

/// Sends `sig` to the process `pid`.
pub fn kill_pid(pid: i32, sig: i32) {
    if pid > 0 {
        // SAFETY: plain kill(2) on a positive pid; no memory involved.
        unsafe { libc::kill(pid, sig) };
    }
}
