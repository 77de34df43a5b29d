//! Protocol 2's process operations on one connection: an interactive exec
//! (a session the host talks to while the process runs), `spawn`, `wait`,
//! `procs`, `signal` and `stdin`.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use proto::agent::{
    read_frame, valid_signal, write_frame, ErrorCode, ExecRequest, PtySize, Reply, ResizeRequest,
    SignalRequest, StdinRequest, WaitRequest, MAX_FRAME, MAX_PROCS,
};

use crate::launch::{launch, ETC};
use crate::log::log;
use crate::procs::{kill_and_forget, table, Proc, ProcError, Stream, Taken, MAX_STDIN_QUEUED};
use crate::reply::{send_error, Outcome};

/// How long the host has to finish a frame it started during a session.
const FRAME_TIMEOUT: Duration = Duration::from_secs(10);

fn proc_error(conn: &mut UnixStream, e: ProcError) -> Outcome {
    match e {
        ProcError::Full => send_error(
            conn,
            ErrorCode::Busy,
            format!("the agent tracks {MAX_PROCS} processes already: wait for or kill one"),
        ),
        ProcError::NotFound(pid) => send_error(
            conn,
            ErrorCode::NotFound,
            format!(
                "no process {pid} started by spawn or an interactive exec (already waited for?)"
            ),
        ),
        ProcError::Launch((code, message)) => send_error(conn, code, message),
    }
}

fn start(
    req: &ExecRequest,
    stdin: Vec<u8>,
    attached: bool,
) -> Result<std::sync::Arc<Proc>, ProcError> {
    // A spawn's timeout of 0 means none; an exec always has one.
    let deadline = match (attached, req.timeout_ms) {
        (false, 0) => None,
        (_, ms) => Some(Duration::from_millis(ms)),
    };
    table().start(
        || launch(req, true, Path::new(ETC)),
        req.args.clone(),
        stdin,
        attached,
        deadline,
    )
}

/// An interactive exec: `started`, then output and exit, taking stdin,
/// signal and resize frames from the host meanwhile.
pub fn interactive(conn: &mut UnixStream, req: ExecRequest, stdin: Vec<u8>) -> Outcome {
    let p = match start(&req, stdin, true) {
        Ok(p) => p,
        Err(e) => return proc_error(conn, e),
    };
    if write_frame(conn, &Reply::Started { pid: p.pid }, &[]).is_err() {
        return gone(&p, req.detach_on_close);
    }
    relay(conn, &p, None, req.detach_on_close)
}

/// `spawn`: start a process in the background.
pub fn spawn(conn: &mut UnixStream, req: ExecRequest, stdin: Vec<u8>) -> Outcome {
    match start(&req, stdin, false) {
        Ok(p) => match write_frame(conn, &Reply::Spawned { pid: p.pid }, &[]) {
            Ok(()) => Outcome::Done,
            Err(_) => Outcome::HostGone,
        },
        Err(e) => proc_error(conn, e),
    }
}

/// `wait`: the kept and further output of a tracked process, then its exit.
pub fn wait(conn: &mut UnixStream, req: WaitRequest) -> Outcome {
    let p = match table().get(req.pid) {
        Ok(p) => p,
        Err(e) => return proc_error(conn, e),
    };
    if !p.attach(true) {
        return send_error(
            conn,
            ErrorCode::Busy,
            format!("process {} already has a collector attached", req.pid),
        );
    }
    let deadline = Instant::now() + Duration::from_millis(req.timeout_ms);
    relay(conn, &p, Some(deadline), true)
}

/// `procs`.
pub fn procs(conn: &mut UnixStream) -> Outcome {
    match write_frame(
        conn,
        &Reply::Procs {
            procs: table().list(),
        },
        &[],
    ) {
        Ok(()) => Outcome::Done,
        Err(_) => Outcome::HostGone,
    }
}

/// `signal`.
pub fn signal(conn: &mut UnixStream, req: SignalRequest) -> Outcome {
    if !valid_signal(req.signal) {
        return send_error(
            conn,
            ErrorCode::BadRequest,
            format!("signal {} is not a signal number (1 to 64)", req.signal),
        );
    }
    match table().get(req.pid) {
        Ok(p) => {
            p.signal(req.signal);
            ok(conn)
        }
        Err(e) => proc_error(conn, e),
    }
}

/// `resize`.
pub fn resize(conn: &mut UnixStream, req: ResizeRequest) -> Outcome {
    let size = PtySize {
        rows: req.rows,
        cols: req.cols,
    };
    if let Err(m) = size.check() {
        return send_error(conn, ErrorCode::BadRequest, m);
    }
    match table().get(req.pid) {
        Ok(p) => match p.resize(size) {
            Ok(true) => ok(conn),
            Ok(false) => send_error(
                conn,
                ErrorCode::BadRequest,
                format!("process {} has no terminal to resize", req.pid),
            ),
            Err(e) => send_error(conn, ErrorCode::Io, format!("resize failed: {e}")),
        },
        Err(e) => proc_error(conn, e),
    }
}

/// `stdin`.
pub fn stdin(conn: &mut UnixStream, req: StdinRequest, data: &[u8]) -> Outcome {
    match table().get(req.pid) {
        Ok(p) => match p.give_stdin(data, req.eof) {
            Ok(()) => ok(conn),
            Err(m) => send_error(conn, ErrorCode::BadRequest, m),
        },
        Err(e) => proc_error(conn, e),
    }
}

fn ok(conn: &mut UnixStream) -> Outcome {
    match write_frame(conn, &Reply::Ok, &[]) {
        Ok(()) => Outcome::Done,
        Err(_) => Outcome::HostGone,
    }
}

/// The host went away: leave the process running (`detach`) or kill it.
fn gone(p: &std::sync::Arc<Proc>, detach: bool) -> Outcome {
    if detach {
        p.attach(false);
    } else {
        kill_and_forget(p);
    }
    Outcome::HostGone
}

/// Sends `p`'s output and exit to the host. For a session (`deadline`
/// none) it also takes the host's frames; for a wait it gives up at the
/// deadline, leaving the process running.
fn relay(
    conn: &mut UnixStream,
    p: &std::sync::Arc<Proc>,
    deadline: Option<Instant>,
    detach: bool,
) -> Outcome {
    let session = deadline.is_none();
    loop {
        match p.take() {
            Taken::Output(chunks) => {
                for (stream, data) in chunks {
                    let kind = match stream {
                        Stream::Stdout => Reply::Stdout,
                        Stream::Stderr => Reply::Stderr,
                    };
                    for part in data.chunks(proto::agent::CHUNK) {
                        if write_frame(conn, &kind, part).is_err() {
                            return gone(p, detach);
                        }
                    }
                }
                continue;
            }
            Taken::Exit(status) => {
                table().forget(p.pid);
                return match write_frame(conn, &Reply::Exit(status), &[]) {
                    Ok(()) => Outcome::Done,
                    Err(_) => Outcome::HostGone,
                };
            }
            Taken::Nothing => {}
        }
        let now = Instant::now();
        if let Some(d) = deadline {
            if now >= d {
                p.attach(false);
                return send_error(
                    conn,
                    ErrorCode::Timeout,
                    format!("process {} is still running; it was left so", p.pid),
                );
            }
        }
        // Stop taking the host's frames while the process is not reading
        // the stdin already queued (the host then blocks, as on a pipe).
        let listen = session && p.stdin_queued() < MAX_STDIN_QUEUED / 2;
        let mut fds = [
            libc::pollfd {
                fd: p.news_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: if listen { conn.as_raw_fd() } else { -1 },
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let wait_ms = deadline.map_or(1000, |d| {
            d.saturating_duration_since(now).as_millis().clamp(1, 1000) as i32
        });
        // SAFETY: `fds` is a valid array of pollfd of the length given.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, wait_ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                log!("relay of {}: poll failed: {e}", p.pid);
                return gone(p, detach);
            }
            continue;
        }
        if fds[1].revents != 0 && !host_frame(conn, p) {
            return gone(p, detach);
        }
    }
}

/// Reads and applies one frame the host sent during a session; false when
/// the host closed the connection or sent something unreadable.
fn host_frame(conn: &mut UnixStream, p: &Proc) -> bool {
    let _ = conn.set_read_timeout(Some(FRAME_TIMEOUT));
    let frame = match read_frame(conn, MAX_FRAME) {
        Ok(f) => f,
        Err(_) => return false,
    };
    let reply: Reply = match frame.parse() {
        Ok(r) => r,
        Err(e) => {
            log!("session of {}: unreadable host frame: {e}", p.pid);
            return false;
        }
    };
    match reply {
        Reply::Stdin => {
            if let Err(m) = p.give_stdin(&frame.data, false) {
                // The process closed its stdin: what it did not read is lost,
                // as on a pipe whose reader has gone.
                log!("session of {}: {m}", p.pid);
            }
        }
        Reply::StdinEnd => {
            let _ = p.give_stdin(&[], true);
        }
        Reply::Signal { signal } if valid_signal(signal) => p.signal(signal),
        Reply::Resize { rows, cols } => {
            let size = PtySize { rows, cols };
            if size.check().is_ok() {
                if let Err(e) = p.resize(size) {
                    log!("session of {}: resize failed: {e}", p.pid);
                }
            }
        }
        other => {
            log!("session of {}: unexpected host frame {other:?}", p.pid);
            return false;
        }
    }
    true
}
