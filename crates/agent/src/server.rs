//! The listening side: accept connections (vsock in a guest, a Unix socket
//! on the host), read one request per connection and answer it, each on its
//! own thread. Nothing a connection does can stop the accept loop.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use proto::agent::{
    read_frame, write_frame, ErrorCode, FrameError, Pong, Reply, Request, MAX_EXEC_STDIN,
    MAX_FRAME, OPS, PROTOCOL_VERSION,
};

use crate::config::Config;
use crate::interp::Interpreter;
use crate::log::log;
use crate::reply::{send_error, Outcome};
use crate::{exec, files, session};

/// How long the host has to send its request after connecting.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a write to the host may block (the host stopped reading).
pub const SEND_TIMEOUT: Duration = Duration::from_secs(60);
/// Connections served at once; more are answered `busy`.
const MAX_ACTIVE: usize = 64;

/// What accepts host connections.
pub enum Listener {
    /// A Unix socket (host tests).
    Unix(UnixListener),
    /// An AF_VSOCK socket (in a guest).
    Vsock(OwnedFd),
}

impl Listener {
    /// Binds a Unix socket at `path`, replacing a stale one.
    pub fn unix(path: &Path) -> io::Result<Listener> {
        let _ = std::fs::remove_file(path);
        Ok(Listener::Unix(UnixListener::bind(path)?))
    }

    /// Listens on vsock `port` for any CID.
    pub fn vsock(port: u32) -> io::Result<Listener> {
        // SAFETY: plain socket(2); the result is checked.
        let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh socket nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_vm is plain data; all-zero is a valid start.
        let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
        addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
        addr.svm_port = port;
        addr.svm_cid = libc::VMADDR_CID_ANY;
        use std::os::fd::AsRawFd;
        // SAFETY: `addr` is a valid sockaddr_vm and its size is passed.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_vm).cast(),
                std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: listen(2) on a bound socket we own.
        if unsafe { libc::listen(fd.as_raw_fd(), 128) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Listener::Vsock(fd))
    }

    /// Waits for the next connection.
    pub fn accept(&self) -> io::Result<UnixStream> {
        match self {
            Listener::Unix(l) => Ok(l.accept()?.0),
            Listener::Vsock(fd) => {
                use std::os::fd::AsRawFd;
                // SAFETY: accept4 on a listening socket we own; no address wanted.
                let c = unsafe {
                    libc::accept4(
                        fd.as_raw_fd(),
                        std::ptr::null_mut(),
                        std::ptr::null_mut(),
                        libc::SOCK_CLOEXEC,
                    )
                };
                if c < 0 {
                    return Err(io::Error::last_os_error());
                }
                // SAFETY: `c` is a fresh connected socket nobody else owns.
                let fd = unsafe { OwnedFd::from_raw_fd(c) };
                // A stream socket of another family: read, write, poll,
                // shutdown and the SO_*TIMEO options are family-independent,
                // which is all the agent uses of it.
                Ok(UnixStream::from(fd))
            }
        }
    }
}

/// Reads forkd-vmm's `CONNECT <port>\n` (byte by byte, at most 64) and
/// answers `OK <port>\n`, as the VMM's vsock socket does; false when the
/// host sent something else or went away.
fn answer_handshake(conn: &mut UnixStream, port: u32) -> bool {
    use std::io::{Read, Write};
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.len() < 64 {
        if conn.read_exact(&mut b).is_err() {
            return false;
        }
        if b[0] == b'\n' {
            let ok = line.starts_with(b"CONNECT ");
            return ok && conn.write_all(format!("OK {port}\n").as_bytes()).is_ok();
        }
        line.push(b[0]);
    }
    false
}

/// The agent's shared state.
pub struct Agent {
    /// Configuration.
    pub cfg: Config,
    /// When the agent started.
    pub started: Instant,
    /// The warm interpreter, unless disabled.
    pub interp: Option<Arc<Interpreter>>,
    active: AtomicUsize,
    /// Called after a poweroff was answered.
    pub power_off: fn(&Agent),
}

impl Agent {
    /// New shared state.
    pub fn new(cfg: Config, interp: Option<Arc<Interpreter>>, power_off: fn(&Agent)) -> Agent {
        Agent {
            cfg,
            started: Instant::now(),
            interp,
            active: AtomicUsize::new(0),
            power_off,
        }
    }

    /// Accepts and serves connections forever.
    pub fn serve(self: &Arc<Self>, listener: &Listener) {
        loop {
            let conn = match listener.accept() {
                Ok(c) => c,
                Err(e) => {
                    log!("accept failed: {e}");
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
            };
            let me = self.clone();
            if me.active.fetch_add(1, Ordering::SeqCst) >= MAX_ACTIVE {
                me.active.fetch_sub(1, Ordering::SeqCst);
                let mut conn = conn;
                let _ = conn.set_write_timeout(Some(Duration::from_secs(1)));
                send_error(
                    &mut conn,
                    ErrorCode::Busy,
                    format!("the agent is serving {MAX_ACTIVE} connections; retry later"),
                );
                continue;
            }
            let r = std::thread::Builder::new()
                .name("conn".into())
                .spawn(move || {
                    let outcome = catch_unwind(AssertUnwindSafe(|| me.handle(conn)));
                    me.active.fetch_sub(1, Ordering::SeqCst);
                    match outcome {
                        Ok(Outcome::PowerOff) => (me.power_off)(&me),
                        Ok(_) => {}
                        Err(_) => log!("a request handler panicked; still serving"),
                    }
                });
            if let Err(e) = r {
                self.active.fetch_sub(1, Ordering::SeqCst);
                log!("no thread for a connection: {e}");
            }
        }
    }

    fn handle(&self, mut conn: UnixStream) -> Outcome {
        let _ = conn.set_read_timeout(Some(REQUEST_TIMEOUT));
        let _ = conn.set_write_timeout(Some(SEND_TIMEOUT));
        if self.cfg.vsock_handshake && !answer_handshake(&mut conn, self.cfg.vsock_port) {
            return Outcome::HostGone;
        }
        let frame = match read_frame(&mut conn, MAX_FRAME) {
            Ok(f) => f,
            Err(FrameError::Closed) => return Outcome::HostGone,
            Err(e) if e.is_timeout() => {
                return send_error(
                    &mut conn,
                    ErrorCode::Timeout,
                    format!("no request within {REQUEST_TIMEOUT:?}"),
                )
            }
            Err(e) => return send_error(&mut conn, ErrorCode::BadRequest, e.to_string()),
        };
        let value: serde_json::Value = match serde_json::from_slice(&frame.json) {
            Ok(v) => v,
            Err(e) => {
                return send_error(
                    &mut conn,
                    ErrorCode::BadRequest,
                    format!("request is not JSON: {e}"),
                )
            }
        };
        let Some(op) = value.get("op").and_then(|o| o.as_str()) else {
            return send_error(
                &mut conn,
                ErrorCode::BadRequest,
                "request has no \"op\" string field",
            );
        };
        if !OPS.contains(&op) {
            return send_error(
                &mut conn,
                ErrorCode::Unsupported,
                format!(
                    "op {op:?} is not supported by this guest (ops: {})",
                    OPS.join(", ")
                ),
            );
        }
        let req: Request = match serde_json::from_value(value.clone()) {
            Ok(r) => r,
            Err(e) => {
                return send_error(
                    &mut conn,
                    ErrorCode::BadRequest,
                    format!("malformed {op} request: {e}"),
                )
            }
        };
        if !frame.data.is_empty()
            && !matches!(
                req,
                Request::Exec(_) | Request::Spawn(_) | Request::Stdin(_)
            )
        {
            return send_error(
                &mut conn,
                ErrorCode::BadRequest,
                format!("{op} takes no binary part"),
            );
        }
        match req {
            Request::Ping => {
                let (ready, error) = match &self.interp {
                    Some(i) => i.readiness(),
                    None => (false, Some("the interpreter is disabled".to_string())),
                };
                let pong = Reply::Pong(Pong {
                    version: env!("CARGO_PKG_VERSION").to_string(),
                    protocol: PROTOCOL_VERSION,
                    uptime_ms: self.started.elapsed().as_millis() as u64,
                    interpreter_ready: ready,
                    interpreter_error: error,
                    guest: self.cfg.guest.clone(),
                    pid: Some(std::process::id()),
                });
                match write_frame(&mut conn, &pong, &[]) {
                    Ok(()) => Outcome::Done,
                    Err(_) => Outcome::HostGone,
                }
            }
            Request::Exec(req) => {
                if frame.data.len() > MAX_EXEC_STDIN {
                    return send_error(
                        &mut conn,
                        ErrorCode::TooLarge,
                        format!("exec stdin is limited to {MAX_EXEC_STDIN} bytes"),
                    );
                }
                if req.interactive {
                    session::interactive(&mut conn, req, frame.data)
                } else {
                    exec::exec(&mut conn, req, frame.data)
                }
            }
            Request::Spawn(req) => {
                if frame.data.len() > MAX_EXEC_STDIN {
                    return send_error(
                        &mut conn,
                        ErrorCode::TooLarge,
                        format!("spawn stdin is limited to {MAX_EXEC_STDIN} bytes"),
                    );
                }
                session::spawn(&mut conn, req, frame.data)
            }
            Request::Procs => session::procs(&mut conn),
            Request::Signal(req) => session::signal(&mut conn, req),
            Request::Stdin(req) => session::stdin(&mut conn, req, &frame.data),
            Request::Wait(req) => session::wait(&mut conn, req),
            Request::Resize(req) => session::resize(&mut conn, req),
            Request::Mkdir(req) => files::mkdir(&mut conn, req),
            Request::Remove(req) => files::remove(&mut conn, req),
            Request::Rename(req) => files::rename(&mut conn, req),
            Request::Eval(req) => match &self.interp {
                Some(i) => {
                    let reply = i.eval(&req.code, Duration::from_millis(req.timeout_ms));
                    match write_frame(&mut conn, &reply, &[]) {
                        Ok(()) => Outcome::Done,
                        Err(FrameError::TooLarge { .. }) => send_error(
                            &mut conn,
                            ErrorCode::TooLarge,
                            "the eval answer does not fit in a frame",
                        ),
                        Err(_) => Outcome::HostGone,
                    }
                }
                None => send_error(
                    &mut conn,
                    ErrorCode::Unsupported,
                    "eval is not available: the agent runs without an interpreter",
                ),
            },
            Request::Read(req) => files::read(&mut conn, req),
            Request::Write(req) => files::write(&mut conn, req),
            Request::List(req) => files::list(&mut conn, req),
            Request::Stat(req) => files::stat(&mut conn, req),
            Request::Poweroff => match write_frame(&mut conn, &Reply::Ok, &[]) {
                Ok(()) | Err(_) => Outcome::PowerOff,
            },
        }
    }
}
