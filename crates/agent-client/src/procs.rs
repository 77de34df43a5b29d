//! Protocol 2's operations: interactive exec sessions, background
//! processes (spawn, procs, signal, stdin, wait) and mkdir, remove,
//! rename. Send them only to an agent that answered ping with protocol 2
//! ([`proto::agent::Request::protocol`]): an older agent ignores the new
//! exec fields and would run the command without them.

use std::time::{Duration, Instant};

use proto::agent::{
    ExecRequest, ExitStatus, MkdirRequest, ProcInfo, PtySize, RemoveRequest, RenameRequest, Reply,
    Request, ResizeRequest, SignalRequest, StdinRequest, WaitRequest, CHUNK, MAX_EXEC_STDIN,
    MAX_FRAME,
};

use crate::{Client, ClientError, Conn, Result, Stream};

/// What an interactive exec sends the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A chunk of output.
    Output(Stream, Vec<u8>),
    /// The process ended; nothing follows.
    Exit(ExitStatus),
}

/// The receiving half of an interactive exec.
pub struct SessionReader {
    conn: Conn,
    done: bool,
}

/// The sending half of an interactive exec: stdin, signals, resizes.
/// Dropping both halves closes the connection, which kills the process
/// (or leaves it running, with `detach_on_close`).
pub struct SessionWriter {
    conn: Conn,
}

/// Closes a session's connection from any thread (both halves at once),
/// which the agent takes as the host going away.
pub struct Hangup(std::os::unix::net::UnixStream);

impl Hangup {
    /// Shuts the connection down; harmless once it has ended.
    pub fn hang_up(&self) {
        let _ = self.0.shutdown(std::net::Shutdown::Both);
    }
}

impl SessionReader {
    /// A handle that closes this session's connection.
    pub fn hangup(&self) -> Result<Hangup> {
        self.conn
            .stream
            .try_clone()
            .map(Hangup)
            .map_err(|source| ClientError::Local { op: "exec", source })
    }

    /// The next output chunk or the exit; after the exit, a protocol error.
    pub fn next_event(&mut self) -> Result<Event> {
        if self.done {
            return Err(ClientError::Protocol {
                op: "exec",
                detail: "read past the exit".into(),
            });
        }
        match self.conn.recv()? {
            (Reply::Stdout, data) => Ok(Event::Output(Stream::Stdout, data)),
            (Reply::Stderr, data) => Ok(Event::Output(Stream::Stderr, data)),
            (Reply::Exit(s), _) => {
                self.done = true;
                Ok(Event::Exit(s))
            }
            (other, _) => Err(self.conn.unexpected("stdout, stderr or exit", &other)),
        }
    }
}

impl SessionWriter {
    /// Bytes for the process's stdin, in frames of at most [`CHUNK`].
    pub fn stdin(&mut self, data: &[u8]) -> Result<()> {
        for part in data.chunks(CHUNK) {
            self.conn.send(&Reply::Stdin, part)?;
        }
        Ok(())
    }

    /// Closes the process's stdin (on a terminal: the EOF character).
    pub fn close_stdin(&mut self) -> Result<()> {
        self.conn.send(&Reply::StdinEnd, &[])
    }

    /// Signals the process group.
    pub fn signal(&mut self, signal: i32) -> Result<()> {
        if !proto::agent::valid_signal(signal) {
            return Err(ClientError::Invalid {
                op: "exec",
                detail: format!("signal {signal} is not 1 to 64"),
            });
        }
        self.conn.send(&Reply::Signal { signal }, &[])
    }

    /// Resizes the terminal.
    pub fn resize(&mut self, size: PtySize) -> Result<()> {
        size.check()
            .map_err(|detail| ClientError::Invalid { op: "exec", detail })?;
        self.conn.send(
            &Reply::Resize {
                rows: size.rows,
                cols: size.cols,
            },
            &[],
        )
    }
}

/// Checks an exec or spawn request and its stdin before anything is sent.
pub(crate) fn checked(op: &'static str, req: &ExecRequest, stdin: &[u8]) -> Result<()> {
    req.check()
        .map_err(|detail| ClientError::Invalid { op, detail })?;
    if stdin.len() > MAX_EXEC_STDIN {
        return Err(ClientError::TooLarge {
            op,
            limit: MAX_EXEC_STDIN as u64,
        });
    }
    Ok(())
}

impl Client {
    /// Starts an interactive exec (`req.interactive` is set for the
    /// caller): the process's pid and the two halves of its session. The
    /// session lasts at most the exec's timeout plus the grace; a read
    /// waits as long as that for output (a terminal may be idle).
    pub fn session(
        &self,
        req: &ExecRequest,
        stdin: &[u8],
    ) -> Result<(i32, SessionReader, SessionWriter)> {
        let mut req = req.clone();
        req.interactive = true;
        checked("exec", &req, stdin)?;
        let budget = Duration::from_millis(req.timeout_ms) + self.cfg.grace;
        let mut c = self.connect("exec", budget)?;
        c.io_timeout = budget;
        c.send(&Request::Exec(req), stdin)?;
        let pid = match c.recv()? {
            (Reply::Started { pid }, _) => pid,
            (other, _) => return Err(c.unexpected("started", &other)),
        };
        let write_half = c
            .stream
            .try_clone()
            .map_err(|source| ClientError::Local { op: "exec", source })?;
        let writer = Conn {
            stream: write_half,
            deadline: c.deadline,
            io_timeout: self.cfg.io_timeout,
            op: "exec",
            budget,
            max_frame: MAX_FRAME,
        };
        Ok((
            pid,
            SessionReader {
                conn: c,
                done: false,
            },
            SessionWriter { conn: writer },
        ))
    }

    /// Starts a process in the background; `req.timeout_ms` 0 means no
    /// deadline. Answers its pid.
    pub fn spawn(&self, req: &ExecRequest, stdin: &[u8]) -> Result<i32> {
        checked("spawn", req, stdin)?;
        let mut c = self.connect("spawn", self.cfg.request_timeout)?;
        c.send(&Request::Spawn(req.clone()), stdin)?;
        match c.recv()? {
            (Reply::Spawned { pid }, _) => Ok(pid),
            (other, _) => Err(c.unexpected("spawned", &other)),
        }
    }

    /// The processes the agent tracks.
    pub fn procs(&self) -> Result<Vec<ProcInfo>> {
        let mut c = self.connect("procs", self.cfg.request_timeout)?;
        c.send(&Request::Procs, &[])?;
        match c.recv()? {
            (Reply::Procs { procs }, _) => Ok(procs),
            (other, _) => Err(c.unexpected("procs", &other)),
        }
    }

    /// Signals a tracked process's group.
    pub fn signal(&self, pid: i32, signal: i32) -> Result<()> {
        self.simple(
            "signal",
            Request::Signal(SignalRequest { pid, signal }),
            &[],
        )
    }

    /// Bytes (at most [`MAX_EXEC_STDIN`] per call) for a tracked process's
    /// stdin, and with `eof` its end.
    pub fn stdin(&self, pid: i32, data: &[u8], eof: bool) -> Result<()> {
        if data.len() > MAX_EXEC_STDIN {
            return Err(ClientError::TooLarge {
                op: "stdin",
                limit: MAX_EXEC_STDIN as u64,
            });
        }
        self.simple("stdin", Request::Stdin(StdinRequest { pid, eof }), data)
    }

    /// Collects a tracked process: `on_output` gets its kept and further
    /// output (false stops collecting, leaving it running: answers
    /// [`ClientError::Cancelled`]), then its exit. After `timeout` the
    /// agent answers a `timeout` error and leaves it running.
    pub fn wait(
        &self,
        pid: i32,
        timeout: Duration,
        mut on_output: impl FnMut(Stream, &[u8]) -> bool,
    ) -> Result<ExitStatus> {
        let req = WaitRequest {
            pid,
            timeout_ms: timeout.as_millis() as u64,
        };
        let budget = timeout + self.cfg.grace;
        let mut c = self.connect("wait", budget)?;
        c.io_timeout = budget;
        c.send(&Request::Wait(req), &[])?;
        let deadline = Instant::now() + budget;
        loop {
            let go_on = match c.recv()? {
                (Reply::Stdout, d) => on_output(Stream::Stdout, &d),
                (Reply::Stderr, d) => on_output(Stream::Stderr, &d),
                (Reply::Exit(s), _) => return Ok(s),
                (other, _) => return Err(c.unexpected("stdout, stderr or exit", &other)),
            };
            if !go_on || Instant::now() > deadline {
                return Err(ClientError::Cancelled { op: "wait" });
            }
        }
    }

    /// Resizes a tracked process's terminal.
    pub fn resize(&self, pid: i32, size: PtySize) -> Result<()> {
        size.check().map_err(|detail| ClientError::Invalid {
            op: "resize",
            detail,
        })?;
        let req = ResizeRequest {
            pid,
            rows: size.rows,
            cols: size.cols,
        };
        self.simple("resize", Request::Resize(req), &[])
    }

    /// Makes a directory (`parents`: and the missing ones above, and
    /// accept an existing one).
    pub fn mkdir(&self, path: &str, parents: bool, mode: u32) -> Result<()> {
        let req = MkdirRequest {
            path: path.into(),
            parents,
            mode,
        };
        self.simple("mkdir", Request::Mkdir(req), &[])
    }

    /// Removes a file, link or (empty, or with `recursive`) directory.
    pub fn remove(&self, path: &str, recursive: bool) -> Result<()> {
        let req = RemoveRequest {
            path: path.into(),
            recursive,
        };
        self.simple("remove", Request::Remove(req), &[])
    }

    /// Renames a path in the guest.
    pub fn rename(&self, from: &str, to: &str) -> Result<()> {
        let req = RenameRequest {
            from: from.into(),
            to: to.into(),
        };
        self.simple("rename", Request::Rename(req), &[])
    }

    /// A request answered by `ok`.
    fn simple(&self, op: &'static str, req: Request, data: &[u8]) -> Result<()> {
        let mut c = self.connect(op, self.cfg.request_timeout)?;
        c.send(&req, data)?;
        match c.recv()? {
            (Reply::Ok, _) => Ok(()),
            (other, _) => Err(c.unexpected("ok", &other)),
        }
    }
}
