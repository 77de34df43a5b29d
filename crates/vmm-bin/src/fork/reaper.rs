//! How a fork server's children ended: each one's status recorded in its
//! directory (`exit.json`) before it is reaped.
//!
//! The server blocks SIGCHLD and reads it from a signalfd in its poll loop
//! (a handler would run in the middle of a fork, and SIG_IGN makes the
//! kernel discard the status). For every child that has ended it reads the
//! status without reaping (`waitid` with `WNOWAIT`), writes
//! `<dir>/exit.json` (a temporary file, then a rename) and only then reaps
//! it: whoever sees the process gone finds the file already there, unless
//! the directory itself is gone. Children whose directory the server does
//! not know (parked in the pool and never handed out) are reaped without a
//! record.
//!
//! The file is not synced: like the processes it describes, it matters
//! until the host restarts, and an fsync per exit would hold up the
//! server's requests behind the disk.

use std::collections::HashMap;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use proto::control::{ChildExit, EXIT_FILE};

/// A fork server's view of its children's ends.
pub(super) struct Reaper {
    /// SIGCHLD, blocked, read here.
    signals: OwnedFd,
    /// Where each child handed out lives, by pid.
    dirs: HashMap<i32, PathBuf>,
}

impl Reaper {
    /// Blocks SIGCHLD in this (single-threaded) process, gives it its
    /// default disposition (a parent that ignored it would have this
    /// process inherit that, and the kernel would then reap children
    /// unasked) and opens a signalfd for it.
    pub(super) fn new() -> std::io::Result<Self> {
        let set = sigchld_set();
        // SAFETY: `set` is an initialised sigset_t; the old mask is not wanted.
        let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(std::io::Error::from_raw_os_error(rc));
        }
        // SAFETY: setting a signal disposition has no memory-safety preconditions.
        unsafe { libc::signal(libc::SIGCHLD, libc::SIG_DFL) };
        // SAFETY: `set` is an initialised sigset_t; -1 asks for a new descriptor.
        let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Reaper {
            // SAFETY: `fd` was just returned by signalfd and is owned by nobody else.
            signals: unsafe { OwnedFd::from_raw_fd(fd) },
            dirs: HashMap::new(),
        })
    }

    /// The descriptor that is readable when a child may have ended: for
    /// the server's poll, and for every child to close.
    pub(super) fn fd(&self) -> RawFd {
        self.signals.as_raw_fd()
    }

    /// Records that child `pid` lives in `dir`: its end is written there.
    pub(super) fn track(&mut self, pid: i32, dir: &Path) {
        self.dirs.insert(pid, dir.to_owned());
    }

    /// Reads the pending signals, then records and reaps every child that
    /// has ended, one at a time.
    pub(super) fn reap(&mut self) {
        let mut buf = [0u8; 8 * std::mem::size_of::<libc::signalfd_siginfo>()];
        // Only for the wake-up: the children are found by waitid below,
        // since signals of the same number coalesce.
        // SAFETY: `buf` is writable for its length.
        while unsafe { libc::read(self.fd(), buf.as_mut_ptr().cast(), buf.len()) } > 0 {}
        while let Some((pid, exit)) = next_ended() {
            if let (Some(dir), Some(exit)) = (self.dirs.remove(&pid), exit) {
                if let Err(e) = write_exit(&dir, &exit) {
                    eprintln!(
                        "forkd-vmm fork-server: cannot record how child {pid} ended in {}: {e}",
                        dir.display()
                    );
                }
            }
            // SAFETY: a null status pointer is allowed; `pid` is a child
            // that has ended (waitid said so), so this does not block.
            if unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG) } <= 0 {
                eprintln!(
                    "forkd-vmm fork-server: cannot reap child {pid}: {}",
                    std::io::Error::last_os_error()
                );
                return;
            }
        }
    }
}

/// A set holding only SIGCHLD.
fn sigchld_set() -> libc::sigset_t {
    // SAFETY: sigemptyset initialises the set it is given; sigaddset adds a
    // valid signal number to it.
    unsafe {
        let mut set = std::mem::zeroed::<libc::sigset_t>();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGCHLD);
        set
    }
}

/// In a child just forked from a fork server: SIGCHLD unblocked, with its
/// default disposition, as a VMM process started afresh has it (the
/// signalfd is among the descriptors the child closes).
pub(super) fn restore_child_signals() {
    let set = sigchld_set();
    // SAFETY: `set` is an initialised sigset_t; the old mask is not wanted.
    unsafe { libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut()) };
    // SAFETY: setting a signal disposition has no memory-safety preconditions.
    unsafe { libc::signal(libc::SIGCHLD, libc::SIG_DFL) };
}

/// A child that has ended and is not reaped yet (left so), with how it
/// ended; None when there is none.
fn next_ended() -> Option<(i32, Option<ChildExit>)> {
    loop {
        // SAFETY: all-zero is a valid siginfo_t; waitid leaves si_pid 0
        // when no child has ended (WNOHANG).
        let mut info = unsafe { std::mem::zeroed::<libc::siginfo_t>() };
        // SAFETY: `info` is a writable siginfo_t.
        let rc = unsafe {
            libc::waitid(
                libc::P_ALL,
                0,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            )
        };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            // ECHILD: no children at all.
            return None;
        }
        // SAFETY: waitid filled `info` for a child's state change (or left
        // it zeroed), where si_pid and si_status are the fields set.
        let (pid, status) = unsafe { (info.si_pid(), info.si_status()) };
        if pid == 0 {
            return None;
        }
        return Some((pid, exit_of(pid, info.si_code, status)));
    }
}

/// How child `pid` ended, from waitid's `si_code` and `si_status`: an
/// exit status, or the signal that killed it (with or without a core).
fn exit_of(pid: i32, code: i32, status: i32) -> Option<ChildExit> {
    let (code, signal) = match code {
        libc::CLD_EXITED => (Some(status), None),
        libc::CLD_KILLED | libc::CLD_DUMPED => (None, Some(status)),
        _ => return None,
    };
    Some(ChildExit { pid, code, signal })
}

/// Writes `exit` to `<dir>/exit.json` atomically: a temporary file in
/// `dir`, then a rename. A directory that is gone (its owner removed it
/// after killing the child) is not an error: there is nobody to tell.
fn write_exit(dir: &Path, exit: &ChildExit) -> std::io::Result<()> {
    let tmp = dir.join(format!(".{EXIT_FILE}.tmp"));
    let written = std::fs::File::create(&tmp).and_then(|mut f| {
        let mut line = serde_json::to_vec(exit).expect("a ChildExit serialises");
        line.push(b'\n');
        f.write_all(&line)
    });
    match written.and_then(|()| std::fs::rename(&tmp, dir.join(EXIT_FILE))) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let _ = std::fs::remove_file(&tmp);
            Ok(())
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waitid_codes_become_an_exit_status_or_a_signal() {
        let exit = |code, status| exit_of(7, code, status);
        assert_eq!(
            exit(libc::CLD_EXITED, 3),
            Some(ChildExit {
                pid: 7,
                code: Some(3),
                signal: None
            })
        );
        assert_eq!(exit(libc::CLD_KILLED, 9).unwrap().signal, Some(9));
        assert_eq!(exit(libc::CLD_DUMPED, 11).unwrap().signal, Some(11));
        assert_eq!(exit(libc::CLD_STOPPED, 19), None);
    }

    #[test]
    fn the_record_lands_whole_and_a_vanished_directory_is_no_error() {
        let dir = std::env::temp_dir().join(format!("forkd-reaper-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let exit = ChildExit {
            pid: 42,
            code: None,
            signal: Some(9),
        };
        write_exit(&dir, &exit).unwrap();
        let read: ChildExit =
            serde_json::from_slice(&std::fs::read(dir.join(EXIT_FILE)).unwrap()).unwrap();
        assert_eq!(read, exit);
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [EXIT_FILE], "no temporary file is left");
        std::fs::remove_dir_all(&dir).unwrap();
        write_exit(&dir, &exit).unwrap();
        assert!(!dir.exists());
    }
}
