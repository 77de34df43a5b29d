//! Host-side client of the guest agent protocol ([`proto::agent`]).
//!
//! A [`Client`] names a [`Target`] (the agent's Unix socket on the host, or
//! a forkd-vmm vsock Unix socket plus a guest port) and opens one
//! connection per request. The guest is untrusted, so every step is bounded:
//!
//! - every connection has a deadline for the whole operation (ping, stat and
//!   list: [`ClientConfig::request_timeout`]; exec and eval: their own
//!   timeout plus [`ClientConfig::grace`]; file transfers:
//!   [`ClientConfig::transfer_timeout`]), enforced on every read and write,
//!   so a guest that trickles bytes cannot stretch it;
//! - each single read or write also stalls at most [`ClientConfig::io_timeout`];
//! - frames larger than [`ClientConfig::max_frame`] are refused before
//!   anything is allocated for them; exec output is only collected up to a
//!   caller-given limit, and file reads stop at the caller's `max_bytes`.
//!
//! Kept apart from `proto` (which holds only types and the frame codec
//! shared with the guest) so that the agent does not carry socket,
//! handshake and timeout policy it never uses, and the daemon and CLI get
//! one small crate to depend on.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use proto::agent::{
    read_frame, write_frame, Entry, ErrorCode, EvalRequest, EvalResult, ExecRequest, ExitStatus,
    FrameError, ListRequest, Pong, ReadRequest, Reply, Request, StatRequest, WriteRequest, CHUNK,
    MAX_FRAME,
};

pub use proto::agent;

mod procs;
pub use procs::{Event, Hangup, SessionReader, SessionWriter};

/// Where the agent listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// The agent's own Unix socket (an agent running on the host).
    Unix(PathBuf),
    /// A forkd-vmm vsock Unix socket: connect, send `CONNECT <port>\n`,
    /// expect `OK <host port>\n`.
    Vsock {
        /// The VM's vsock Unix socket.
        uds: PathBuf,
        /// The agent's vsock port in the guest.
        port: u32,
    },
}

/// Timeouts and limits of a [`Client`].
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Connecting, including the vsock handshake.
    pub connect_timeout: Duration,
    /// Longest a single read or write may block.
    pub io_timeout: Duration,
    /// Whole ping, stat, list or poweroff.
    pub request_timeout: Duration,
    /// Whole file read or write.
    pub transfer_timeout: Duration,
    /// Added to an exec's or eval's own timeout for the whole operation.
    pub grace: Duration,
    /// Largest frame accepted from the guest (at most [`MAX_FRAME`]).
    pub max_frame: usize,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            connect_timeout: Duration::from_secs(5),
            io_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(60),
            transfer_timeout: Duration::from_secs(30 * 60),
            grace: Duration::from_secs(10),
            max_frame: MAX_FRAME,
        }
    }
}

/// What went wrong talking to the agent.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be reached.
    #[error("cannot connect to the agent socket {path}: {source}; is the VM (or the agent) running and the path right?")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The vsock `CONNECT`/`OK` exchange failed.
    #[error("vsock handshake on {path} for port {port} failed: {detail}; is forkd-agent listening on that port in the guest?")]
    Handshake {
        /// The socket path.
        path: PathBuf,
        /// The guest port.
        port: u32,
        /// What was wrong.
        detail: String,
    },
    /// The guest did not finish in time.
    #[error("{op}: the agent did not finish within {after:?} (it is stalled or hostile); the connection was dropped")]
    Timeout {
        /// The operation.
        op: &'static str,
        /// The deadline it had.
        after: Duration,
    },
    /// The agent answered an error frame.
    #[error("{op}: the agent answered an error ({code:?}): {message}")]
    Agent {
        /// The operation.
        op: &'static str,
        /// Its category.
        code: ErrorCode,
        /// Its message.
        message: String,
    },
    /// The agent broke the protocol.
    #[error("{op}: protocol violation by the agent: {detail}; the agent is broken or hostile")]
    Protocol {
        /// The operation.
        op: &'static str,
        /// What it did.
        detail: String,
    },
    /// A frame could not be read or written.
    #[error("{op}: {source}")]
    Frame {
        /// The operation.
        op: &'static str,
        /// Why.
        source: FrameError,
    },
    /// More data than the caller allowed.
    #[error("{op}: more than the {limit} bytes allowed; raise the limit or stream the data")]
    TooLarge {
        /// The operation.
        op: &'static str,
        /// The limit.
        limit: u64,
    },
    /// The request is not valid before anything is sent.
    #[error("{op}: invalid request: {detail}")]
    Invalid {
        /// The operation.
        op: &'static str,
        /// What is wrong.
        detail: String,
    },
    /// The caller's callback asked to stop.
    #[error("{op}: cancelled by the caller; the agent kills the process")]
    Cancelled {
        /// The operation.
        op: &'static str,
    },
    /// Reading the caller's input or writing its output failed.
    #[error("{op}: local I/O failed: {source}")]
    Local {
        /// The operation.
        op: &'static str,
        /// Why.
        source: io::Error,
    },
}

impl ClientError {
    /// True when the guest ran out of time.
    pub fn is_timeout(&self) -> bool {
        matches!(self, ClientError::Timeout { .. })
    }
}

/// Result of client calls.
pub type Result<T> = std::result::Result<T, ClientError>;

/// Which output stream a chunk came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

/// Collected result of an exec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExecOutput {
    /// All stdout.
    pub stdout: Vec<u8>,
    /// All stderr.
    pub stderr: Vec<u8>,
    /// How it ended.
    pub status: ExitStatus,
}

/// A directory listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listing {
    /// The entries, in the guest's order.
    pub entries: Vec<Entry>,
    /// The listing stopped at `max_entries`.
    pub truncated: bool,
}

/// A client of one agent.
#[derive(Clone, Debug)]
pub struct Client {
    target: Target,
    cfg: ClientConfig,
}

/// One connection with a deadline applied to every read and write.
struct Conn {
    stream: UnixStream,
    deadline: Instant,
    io_timeout: Duration,
    op: &'static str,
    budget: Duration,
    max_frame: usize,
}

impl Conn {
    fn step_timeout(&self) -> io::Result<Duration> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "operation deadline passed",
            ));
        }
        Ok(left.min(self.io_timeout).max(Duration::from_millis(1)))
    }

    fn timeout(&self) -> ClientError {
        ClientError::Timeout {
            op: self.op,
            after: self.budget,
        }
    }

    fn frame_err(&self, e: FrameError) -> ClientError {
        if e.is_timeout() || Instant::now() >= self.deadline {
            return self.timeout();
        }
        ClientError::Frame {
            op: self.op,
            source: e,
        }
    }

    fn send<T: serde::Serialize + ?Sized>(&mut self, msg: &T, data: &[u8]) -> Result<()> {
        write_frame(self, msg, data).map_err(|e| self.frame_err(e))
    }

    /// Reads one answer; an error frame becomes [`ClientError::Agent`].
    fn recv(&mut self) -> Result<(Reply, Vec<u8>)> {
        let max = self.max_frame;
        let frame = read_frame(self, max).map_err(|e| match e {
            FrameError::Closed => ClientError::Protocol {
                op: self.op,
                detail: "the agent closed the connection without answering".into(),
            },
            e => self.frame_err(e),
        })?;
        let reply: Reply = frame.parse().map_err(|e| ClientError::Protocol {
            op: self.op,
            detail: format!("unreadable answer: {e}"),
        })?;
        if let Reply::Error(e) = reply {
            return Err(ClientError::Agent {
                op: self.op,
                code: e.code,
                message: e.message,
            });
        }
        Ok((reply, frame.data))
    }

    fn unexpected(&self, what: &str, got: &Reply) -> ClientError {
        ClientError::Protocol {
            op: self.op,
            detail: format!("expected {what}, got {got:?}"),
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let t = self.step_timeout()?;
        self.stream.set_read_timeout(Some(t))?;
        self.stream.read(buf)
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let t = self.step_timeout()?;
        self.stream.set_write_timeout(Some(t))?;
        self.stream.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Connects a Unix stream socket, giving up at `deadline` (a full listen
/// backlog would otherwise block a plain connect indefinitely).
fn connect_unix(path: &Path, deadline: Instant) -> io::Result<UnixStream> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data; all-zero is a valid start.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path too long (max 107 bytes) or contains NUL",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: plain socket(2), checked below.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    loop {
        // SAFETY: `addr` is a valid sockaddr_un and its size is passed.
        let r = unsafe {
            libc::connect(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_un).cast(),
                std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
            )
        };
        if r == 0 {
            break;
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EINTR) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(2));
            }
            Some(libc::EAGAIN) => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the listener's backlog stayed full until the connect timeout",
                ))
            }
            _ => return Err(e),
        }
    }
    let stream = UnixStream::from(fd);
    stream.set_nonblocking(false)?;
    Ok(stream)
}

impl Client {
    /// A client with default timeouts and limits.
    pub fn new(target: Target) -> Client {
        Self::with_config(target, ClientConfig::default())
    }

    /// A client with the given timeouts and limits.
    pub fn with_config(target: Target, mut cfg: ClientConfig) -> Client {
        cfg.max_frame = cfg.max_frame.min(MAX_FRAME);
        Client { target, cfg }
    }

    /// The configuration.
    pub fn config(&self) -> &ClientConfig {
        &self.cfg
    }

    fn connect(&self, op: &'static str, budget: Duration) -> Result<Conn> {
        let start = Instant::now();
        let connect_deadline = start + self.cfg.connect_timeout;
        let path = match &self.target {
            Target::Unix(p) => p,
            Target::Vsock { uds, .. } => uds,
        };
        let stream =
            connect_unix(path, connect_deadline).map_err(|source| ClientError::Connect {
                path: path.clone(),
                source,
            })?;
        if let Target::Vsock { uds, port } = &self.target {
            handshake(&stream, *port, connect_deadline).map_err(|detail| {
                ClientError::Handshake {
                    path: uds.clone(),
                    port: *port,
                    detail,
                }
            })?;
        }
        Ok(Conn {
            stream,
            deadline: Instant::now() + budget,
            io_timeout: self.cfg.io_timeout,
            op,
            budget,
            max_frame: self.cfg.max_frame,
        })
    }

    /// Asks the agent what it is.
    pub fn ping(&self) -> Result<Pong> {
        let mut c = self.connect("ping", self.cfg.request_timeout)?;
        c.send(&Request::Ping, &[])?;
        match c.recv()? {
            (Reply::Pong(p), _) => Ok(p),
            (other, _) => Err(c.unexpected("pong", &other)),
        }
    }

    /// Runs a process; `on_output` gets each stdout/stderr chunk as it
    /// arrives and returns whether to go on: `false` drops the connection,
    /// which makes the agent kill the process group, and the call answers
    /// [`ClientError::Cancelled`]. An exec timeout is not an error: the
    /// status says `timed_out` (the agent killed the process group).
    pub fn exec(
        &self,
        req: &ExecRequest,
        stdin: &[u8],
        mut on_output: impl FnMut(Stream, &[u8]) -> bool,
    ) -> Result<ExitStatus> {
        procs::checked("exec", req, stdin)?;
        let budget = Duration::from_millis(req.timeout_ms) + self.cfg.grace;
        let mut c = self.connect("exec", budget)?;
        c.send(&Request::Exec(req.clone()), stdin)?;
        loop {
            let go_on = match c.recv()? {
                (Reply::Stdout, data) => on_output(Stream::Stdout, &data),
                (Reply::Stderr, data) => on_output(Stream::Stderr, &data),
                (Reply::Exit(s), _) => return Ok(s),
                (other, _) => return Err(c.unexpected("stdout, stderr or exit", &other)),
            };
            if !go_on {
                return Err(ClientError::Cancelled { op: "exec" });
            }
        }
    }

    /// Runs a process and collects its output, failing with
    /// [`ClientError::TooLarge`] past `max_output` bytes (stdout and stderr
    /// together); the process is killed then.
    pub fn exec_collect(
        &self,
        req: &ExecRequest,
        stdin: &[u8],
        max_output: usize,
    ) -> Result<ExecOutput> {
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        let r = self.exec(req, stdin, |s, d| {
            if stdout.len() + stderr.len() + d.len() > max_output {
                return false;
            }
            match s {
                Stream::Stdout => stdout.extend_from_slice(d),
                Stream::Stderr => stderr.extend_from_slice(d),
            }
            true
        });
        match r {
            Ok(status) => Ok(ExecOutput {
                stdout,
                stderr,
                status,
            }),
            Err(ClientError::Cancelled { .. }) => Err(ClientError::TooLarge {
                op: "exec",
                limit: max_output as u64,
            }),
            Err(e) => Err(e),
        }
    }

    /// Runs Python code in the agent's warm interpreter.
    pub fn eval(&self, code: &str, timeout: Duration) -> Result<EvalResult> {
        let req = EvalRequest {
            code: code.to_string(),
            timeout_ms: timeout.as_millis() as u64,
        };
        // The agent interrupts, then waits a few seconds more before killing.
        let budget = timeout + Duration::from_secs(5) + self.cfg.grace;
        let mut c = self.connect("eval", budget)?;
        c.send(&Request::Eval(req), &[])?;
        match c.recv()? {
            (Reply::Eval(r), _) => Ok(r),
            (other, _) => Err(c.unexpected("eval", &other)),
        }
    }

    /// Streams the file at `path` (from `offset`) into `out`, refusing a
    /// file with more than `max_bytes` to read. Returns the bytes written.
    pub fn read_to(
        &self,
        path: &str,
        offset: u64,
        max_bytes: u64,
        out: &mut dyn Write,
    ) -> Result<u64> {
        self.read_with(path, offset, max_bytes, &mut |_| Ok(()), out)
    }

    /// [`Client::read_to`], telling `on_size` the size the agent announced
    /// before the first byte (an error from it ends the read).
    pub fn read_with(
        &self,
        path: &str,
        offset: u64,
        max_bytes: u64,
        on_size: &mut dyn FnMut(u64) -> io::Result<()>,
        out: &mut dyn Write,
    ) -> Result<u64> {
        let mut c = self.connect("read", self.cfg.transfer_timeout)?;
        let req = ReadRequest {
            path: path.to_string(),
            offset,
            max_bytes,
        };
        c.send(&Request::Read(req), &[])?;
        let size = match c.recv()? {
            (Reply::File { size }, _) => size,
            (other, _) => return Err(c.unexpected("file", &other)),
        };
        if size > max_bytes {
            return Err(ClientError::Protocol {
                op: "read",
                detail: format!("announced {size} bytes, over the {max_bytes} asked for"),
            });
        }
        on_size(size).map_err(|source| ClientError::Local { op: "read", source })?;
        let mut total = 0u64;
        loop {
            match c.recv()? {
                (Reply::Data, data) => {
                    total += data.len() as u64;
                    if total > size {
                        return Err(ClientError::Protocol {
                            op: "read",
                            detail: format!("sent more than the {size} bytes it announced"),
                        });
                    }
                    out.write_all(&data)
                        .map_err(|source| ClientError::Local { op: "read", source })?;
                }
                (Reply::End { bytes, .. }, _) => {
                    if bytes.is_some_and(|b| b != total) {
                        return Err(ClientError::Protocol {
                            op: "read",
                            detail: format!("end says {bytes:?} bytes, {total} arrived"),
                        });
                    }
                    return Ok(total);
                }
                (other, _) => return Err(c.unexpected("data or end", &other)),
            }
        }
    }

    /// Reads a whole file into memory (at most `max_bytes`).
    pub fn read(&self, path: &str, max_bytes: u64) -> Result<Vec<u8>> {
        let mut v = Vec::new();
        self.read_to(path, 0, max_bytes, &mut v)?;
        Ok(v)
    }

    /// Streams `input` to a file in the guest, as `req` says. Returns the
    /// bytes the agent wrote.
    pub fn write_from(&self, req: &WriteRequest, input: &mut dyn Read) -> Result<u64> {
        let mut c = self.connect("write", self.cfg.transfer_timeout)?;
        c.send(&Request::Write(req.clone()), &[])?;
        match c.recv()? {
            (Reply::Ready, _) => {}
            (other, _) => return Err(c.unexpected("ready", &other)),
        }
        let mut buf = vec![0u8; CHUNK];
        let mut sent = 0u64;
        loop {
            let n = match input.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(ClientError::Local {
                        op: "write",
                        source,
                    })
                }
            };
            if let Err(e) = c.send(&Reply::Data, &buf[..n]) {
                // The agent may have stopped with an error frame: prefer it.
                return Err(agent_error_after(&mut c).unwrap_or(e));
            }
            sent += n as u64;
        }
        let end = Reply::End {
            bytes: None,
            truncated: None,
        };
        if let Err(e) = c.send(&end, &[]) {
            return Err(agent_error_after(&mut c).unwrap_or(e));
        }
        match c.recv()? {
            (Reply::Written { bytes }, _) if bytes == sent => Ok(bytes),
            (Reply::Written { bytes }, _) => Err(ClientError::Protocol {
                op: "write",
                detail: format!("wrote {bytes} bytes of the {sent} sent"),
            }),
            (other, _) => Err(c.unexpected("written", &other)),
        }
    }

    /// Writes `data` to a new file at `path` (mode 0644, replacing it).
    pub fn write(&self, path: &str, data: &[u8]) -> Result<u64> {
        let req = WriteRequest {
            path: path.to_string(),
            mode: 0o644,
            append: false,
            create_dirs: false,
        };
        self.write_from(&req, &mut &data[..])
    }

    /// Lists a directory, at most `max_entries` entries.
    pub fn list(&self, path: &str, max_entries: u64) -> Result<Listing> {
        let mut c = self.connect("list", self.cfg.request_timeout)?;
        let req = ListRequest {
            path: path.to_string(),
            max_entries,
        };
        c.send(&Request::List(req), &[])?;
        let mut entries = Vec::new();
        loop {
            match c.recv()? {
                (Reply::Entries { entries: e }, _) => {
                    if (entries.len() + e.len()) as u64 > max_entries {
                        return Err(ClientError::Protocol {
                            op: "list",
                            detail: format!("sent more than the {max_entries} entries asked for"),
                        });
                    }
                    entries.extend(e);
                }
                (Reply::End { truncated, .. }, _) => {
                    return Ok(Listing {
                        entries,
                        truncated: truncated.unwrap_or(false),
                    })
                }
                (other, _) => return Err(c.unexpected("entries or end", &other)),
            }
        }
    }

    /// Describes one path.
    pub fn stat(&self, path: &str, follow_symlinks: bool) -> Result<Entry> {
        let mut c = self.connect("stat", self.cfg.request_timeout)?;
        let req = StatRequest {
            path: path.to_string(),
            follow_symlinks,
        };
        c.send(&Request::Stat(req), &[])?;
        match c.recv()? {
            (Reply::Stat { entry }, _) => Ok(entry),
            (other, _) => Err(c.unexpected("stat", &other)),
        }
    }

    /// Asks the guest to power off (the agent answers before it goes).
    pub fn poweroff(&self) -> Result<()> {
        let mut c = self.connect("poweroff", self.cfg.request_timeout)?;
        c.send(&Request::Poweroff, &[])?;
        match c.recv()? {
            (Reply::Ok, _) => Ok(()),
            (other, _) => Err(c.unexpected("ok", &other)),
        }
    }
}

/// After a failed send, the error frame the agent may have sent first
/// (read with a short deadline).
fn agent_error_after(c: &mut Conn) -> Option<ClientError> {
    c.deadline = c.deadline.min(Instant::now() + Duration::from_secs(2));
    match c.recv() {
        Err(e @ ClientError::Agent { .. }) => Some(e),
        _ => None,
    }
}

/// The vsock `CONNECT <port>\n` / `OK <n>\n` exchange, byte by byte (nothing
/// past the newline is consumed) and bounded in length and time.
fn handshake(stream: &UnixStream, port: u32, deadline: Instant) -> std::result::Result<(), String> {
    const MAX_LINE: usize = 64;
    let mut s = stream;
    let left = || {
        let l = deadline.saturating_duration_since(Instant::now());
        if l.is_zero() {
            None
        } else {
            Some(l)
        }
    };
    let t = left().ok_or("connect timeout passed before the handshake")?;
    s.set_write_timeout(Some(t)).map_err(|e| e.to_string())?;
    s.write_all(format!("CONNECT {port}\n").as_bytes())
        .map_err(|e| format!("sending CONNECT: {e}"))?;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        let t = left().ok_or("no OK line before the connect timeout")?;
        s.set_read_timeout(Some(t)).map_err(|e| e.to_string())?;
        match s.read(&mut byte) {
            Ok(0) => {
                return Err(format!(
                    "connection closed after {:?} (nothing listening on the port?)",
                    String::from_utf8_lossy(&line)
                ))
            }
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) if line.len() < MAX_LINE => line.push(byte[0]),
            Ok(_) => return Err(format!("answer line longer than {MAX_LINE} bytes")),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err("no OK line before the connect timeout".into())
            }
            Err(e) => return Err(format!("reading the answer: {e}")),
        }
    }
    let line = String::from_utf8_lossy(&line);
    match line.strip_prefix("OK ") {
        Some(n) if n.trim().parse::<u32>().is_ok() => Ok(()),
        _ => Err(format!("expected \"OK <port>\", got {line:?}")),
    }
}
