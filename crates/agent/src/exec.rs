//! `exec` (not interactive): run a process in its own process group,
//! stream its output as it comes, kill the group at the timeout or when
//! the host goes away.

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use proto::agent::{write_frame, ErrorCode, ExecRequest, ExitStatus, Reply, CHUNK};

use crate::children::kill_group;
use crate::launch::{launch, ETC};
use crate::log::log;
use crate::reply::{send_error, Outcome};

/// How long output is still read after the process exited (background
/// processes may hold the pipes open).
const DRAIN_AFTER_EXIT: Duration = Duration::from_millis(300);

/// Runs one exec request on `conn`.
pub fn exec(conn: &mut UnixStream, req: ExecRequest, stdin: Vec<u8>) -> Outcome {
    let l = match launch(&req, !stdin.is_empty(), Path::new(ETC)) {
        Ok(l) => l,
        Err((code, message)) => return send_error(conn, code, message),
    };
    let (start, slot, pid) = (l.started, l.slot, l.pid);
    if let Some(mut pipe) = l.stdin {
        // A thread, so a process that writes before reading cannot deadlock us.
        let r = std::thread::Builder::new()
            .name("exec-stdin".into())
            .spawn(move || {
                let _ = pipe.write_all(&stdin);
            });
        if let Err(e) = r {
            log!("exec: no thread for stdin: {e}");
        }
    }
    // On a terminal, `out` is its master side and `err` is none.
    let (mut out, mut err) = (l.out, l.err);
    let deadline = start + Duration::from_millis(req.timeout_ms);
    let mut timed_out = false;
    let mut exited_at: Option<Instant> = None;
    let mut buf = vec![0u8; CHUNK.min(64 * 1024)];
    let mut host_gone = false;
    loop {
        let now = Instant::now();
        if exited_at.is_none() && slot.status().is_some() {
            exited_at = Some(now);
        }
        if out.is_none() && err.is_none() && exited_at.is_some() {
            break;
        }
        if let Some(t) = exited_at {
            if now >= t + DRAIN_AFTER_EXIT {
                break;
            }
        }
        if !timed_out && exited_at.is_none() && now >= deadline {
            timed_out = true;
            kill_group(pid, libc::SIGKILL);
        }
        let wake = match exited_at {
            Some(t) => t + DRAIN_AFTER_EXIT,
            None if !timed_out => deadline,
            None => now + Duration::from_millis(100),
        };
        let wait_ms = wake
            .saturating_duration_since(now)
            .as_millis()
            .clamp(1, 1000) as i32;
        let mut fds = vec![
            pollfd(conn.as_raw_fd()),
            // The notify pipe stays readable once set: stop watching it then.
            pollfd(if exited_at.is_none() {
                slot.notify_fd()
            } else {
                -1
            }),
            pollfd(out.as_ref().map_or(-1, |p| p.as_raw_fd())),
            pollfd(err.as_ref().map_or(-1, |p| p.as_raw_fd())),
        ];
        // SAFETY: `fds` is a valid array of pollfd of the length given.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, wait_ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            log!("exec: poll failed: {e}");
            break;
        }
        if fds[0].revents != 0 {
            // The host sent something or closed: either way it cancels.
            host_gone = true;
            break;
        }
        for (i, kind) in [(2usize, Reply::Stdout), (3, Reply::Stderr)] {
            if fds[i].revents == 0 {
                continue;
            }
            let pipe = if i == 2 { &mut out } else { &mut err };
            let Some(p) = pipe.as_mut() else { continue };
            match p.read(&mut buf) {
                // End of file, or EIO: a terminal whose every slave side has closed.
                Ok(0) | Err(_) => *pipe = None,
                Ok(n) => {
                    if write_frame(conn, &kind, &buf[..n]).is_err() {
                        host_gone = true;
                    }
                }
            }
        }
        if host_gone {
            break;
        }
    }
    drop(out);
    drop(err);
    if host_gone {
        kill_group(pid, libc::SIGKILL);
        slot.wait_timeout(Duration::from_secs(5));
        return Outcome::HostGone;
    }
    let status = match slot.wait_timeout(Duration::from_secs(10)) {
        Some(s) => s,
        None => {
            kill_group(pid, libc::SIGKILL);
            match slot.wait_timeout(Duration::from_secs(5)) {
                Some(s) => s,
                None => {
                    return send_error(
                        conn,
                        ErrorCode::Internal,
                        format!("process {pid} did not end after SIGKILL"),
                    )
                }
            }
        }
    };
    let (code, signal) = if libc::WIFEXITED(status) {
        (Some(libc::WEXITSTATUS(status)), None)
    } else if libc::WIFSIGNALED(status) {
        (None, Some(libc::WTERMSIG(status)))
    } else {
        (None, None)
    };
    let exit = Reply::Exit(ExitStatus {
        code,
        signal,
        timed_out,
        duration_ms: start.elapsed().as_millis() as u64,
        dropped_bytes: 0,
    });
    match write_frame(conn, &exit, &[]) {
        Ok(()) => Outcome::Done,
        Err(_) => Outcome::HostGone,
    }
}

fn pollfd(fd: i32) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}
