//! Starting an exec'd process: its own process group (or, on a terminal,
//! its own session), pipes or a pseudo-terminal, the user it runs as.
//! Every way the agent runs a command (exec, interactive exec, spawn)
//! starts it here.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Instant;

use proto::agent::{ErrorCode, ExecRequest, PtySize};

use crate::children::{children, Slot};
use crate::reply::io_error_code;
use crate::user;

/// Where the agent reads its user database.
pub const ETC: &str = "/etc";

/// A started process and its ends of the pipes (or terminal).
pub struct Launched {
    /// Its pid, also its process group.
    pub pid: i32,
    /// Where its wait status arrives.
    pub slot: Arc<Slot>,
    /// Its stdin (a pipe, or a copy of the terminal's master side); none
    /// when it was started with stdin from /dev/null.
    pub stdin: Option<File>,
    /// Its stdout, or the terminal's master side.
    pub out: Option<File>,
    /// Its stderr; none on a terminal (the terminal carries both).
    pub err: Option<File>,
    /// The terminal's master side, for resizing.
    pub pty: Option<File>,
    /// When it started.
    pub started: Instant,
}

/// Why a process did not start: an error frame's code and message.
pub type LaunchError = (ErrorCode, String);

/// Starts `req`'s command. `want_stdin` gives it a stdin pipe (otherwise
/// /dev/null; a terminal always has one). `etc` holds the user database.
pub fn launch(req: &ExecRequest, want_stdin: bool, etc: &Path) -> Result<Launched, LaunchError> {
    req.check().map_err(|m| (ErrorCode::BadRequest, m))?;
    let program = &req.args[0];
    let mut cmd = Command::new(program);
    cmd.args(&req.args[1..]);
    if let Some(who) = &req.user {
        let u = user::resolve(who, etc).map_err(|e| (io_error_code(&e), e.to_string()))?;
        user::apply(&mut cmd, &u);
    }
    // The request's variables win over those `user` sets.
    cmd.envs(&req.env);
    if let Some(cwd) = &req.cwd {
        cmd.current_dir(cwd);
    }
    let fail = |e: io::Error| {
        let what = match &req.cwd {
            Some(cwd) => format!("cannot run {program:?} in {cwd:?}: {e}"),
            None => format!("cannot run {program:?}: {e}"),
        };
        (io_error_code(&e), what)
    };
    let mut pty = None;
    match req.pty {
        Some(size) => {
            let (master, slave) = open_pty(size)
                .map_err(|e| (ErrorCode::Io, format!("cannot open a pseudo-terminal: {e}")))?;
            let dup = |fd: &OwnedFd| fd.try_clone().map(Stdio::from).map_err(fail);
            cmd.stdin(dup(&slave)?)
                .stdout(dup(&slave)?)
                .stderr(dup(&slave)?);
            // SAFETY: runs in the child between fork and exec, after the
            // standard library has made the terminal its fds 0-2; setsid
            // and ioctl are async-signal-safe. The new session makes the
            // process a group leader (so the group can be signalled as a
            // whole) with the terminal as its controlling one.
            unsafe {
                cmd.pre_exec(|| {
                    if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            pty = Some(File::from(master));
        }
        None => {
            cmd.stdin(if want_stdin {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        }
    }
    let started = Instant::now();
    let (mut child, slot) = children().spawn(&mut cmd).map_err(fail)?;
    // The parent's copies of the terminal's slave side close with `cmd`.
    drop(cmd);
    let pid = child.id() as i32;
    let (stdin, out, err) = match &pty {
        Some(master) => {
            let copy = |m: &File| m.try_clone().ok();
            (copy(master), copy(master), None)
        }
        None => (
            child.stdin.take().map(|p| File::from(OwnedFd::from(p))),
            child.stdout.take().map(|p| File::from(OwnedFd::from(p))),
            child.stderr.take().map(|p| File::from(OwnedFd::from(p))),
        ),
    };
    Ok(Launched {
        pid,
        slot,
        stdin,
        out,
        err,
        pty,
        started,
    })
}

/// A new pseudo-terminal of `size`: (master, slave), both close-on-exec.
fn open_pty(size: PtySize) -> io::Result<(OwnedFd, OwnedFd)> {
    let (mut master, mut slave) = (-1, -1);
    let ws = winsize(size);
    // SAFETY: openpty fills two ints we own; the name buffer is null (not
    // wanted), the termios null (defaults) and the winsize a valid struct.
    let r = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &ws,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: openpty succeeded: both fds are open and owned by nobody else.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    for fd in [&master, &slave] {
        // SAFETY: fcntl on an fd we own; sets a flag, no memory involved.
        if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok((master, slave))
}

fn winsize(size: PtySize) -> libc::winsize {
    libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

/// Resizes the terminal whose master side is `master`.
pub fn resize(master: &File, size: PtySize) -> io::Result<()> {
    let ws = winsize(size);
    // SAFETY: TIOCSWINSZ reads a valid winsize from the pointer given.
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
