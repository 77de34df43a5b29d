//! What runs inside a sandbox's guest, through its agent: streamed and
//! interactive exec, background processes, and file transfer.
//!
//! The agent client is blocking and the API is async; each operation runs
//! its agent connection on a blocking thread and meets the async side
//! through bounded channels, so a slow client slows the guest (never the
//! daemon's memory) and a client that goes away closes the connection,
//! which the agent takes as the end (or, if asked, the detach) of the
//! process.

use std::io::{self, Read, Write};
use std::sync::Arc;
use std::time::Duration;

use agent_client::agent::{self, PtySize};
use agent_client::{ClientConfig, ClientError, Event, Stream};
use axum::body::Bytes;
use base64::Engine;
use proto::api::{
    ExecEvent, FileList, ProcessExit, ProcessInfo, ProcessRequest, Uploaded, WaitResponse,
    MAX_PATH_LEN,
};
use tokio::sync::mpsc;

use crate::daemon::Daemon;
use crate::error::{ApiError, ApiResult, Kind};

/// Longest a streamed, interactive or background process may run (a day).
pub const MAX_SESSION_SECS: u64 = 24 * 3600;
/// Default run time of a streamed or interactive exec.
const DEFAULT_STREAM_SECS: u64 = 60;
/// Default and longest wait for a background process.
const DEFAULT_WAIT_SECS: u64 = 30;
const MAX_WAIT_SECS: u64 = 3600;
/// Most output one wait answer carries (it is base64 in JSON).
const MAX_WAIT_OUTPUT: usize = 16 << 20;
/// Largest file a download moves (it streams; this only bounds the agent).
const MAX_DOWNLOAD: u64 = 1 << 40;
/// Chunks in flight between the agent and an HTTP body, each direction.
const CHANNEL_CHUNKS: usize = 8;

/// `b` as standard base64.
pub fn encode_b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// The base64 of request field `field`, decoded (400 when it is not base64).
pub fn decode_b64(field: &str, s: &str) -> ApiResult<Vec<u8>> {
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .map_err(|e| ApiError::bad_request(format!("{field} is not standard base64: {e}")))
}

/// Checks a guest path from a request: absolute, bounded, no NUL.
pub fn guest_path(field: &str, p: &str) -> ApiResult<()> {
    if !p.starts_with('/') || p.len() > MAX_PATH_LEN || p.contains('\0') {
        return Err(ApiError::bad_request(format!(
            "{field} {:?} is not an absolute guest path (at most {MAX_PATH_LEN} bytes, no NUL)",
            truncate(p)
        )));
    }
    Ok(())
}

fn truncate(s: &str) -> &str {
    match s.char_indices().nth(80) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// A run time in seconds: `asked`, or `default`, within 1..=`max`.
fn secs(asked: Option<u64>, default: u64, max: u64) -> ApiResult<u64> {
    let s = asked.unwrap_or(default);
    if !(1..=max).contains(&s) {
        return Err(ApiError::bad_request(format!(
            "timeout_secs {s} is out of range: 1 to {max}"
        )));
    }
    Ok(s)
}

/// The agent's exec request for a REST process request, checked, and its
/// initial stdin. `timeout_ms` 0 means none (background processes only).
fn agent_request(req: ProcessRequest, timeout_ms: u64) -> ApiResult<(agent::ExecRequest, Vec<u8>)> {
    if let Some(cwd) = &req.cwd {
        guest_path("cwd", cwd)?;
    }
    let stdin = match &req.stdin_base64 {
        Some(b) => decode_b64("stdin_base64", b)?,
        None => Vec::new(),
    };
    if stdin.len() > agent::MAX_EXEC_STDIN {
        return Err(ApiError::new(
            Kind::PayloadTooLarge,
            format!(
                "stdin_base64 holds {} bytes, more than the {} a request takes: send the rest to /processes/{{pid}}/stdin",
                stdin.len(),
                agent::MAX_EXEC_STDIN
            ),
        ));
    }
    let r = agent::ExecRequest {
        env: req.env,
        cwd: req.cwd,
        user: req.user,
        pty: req.pty,
        timeout_ms,
        ..agent::ExecRequest::new(req.args)
    };
    r.check().map_err(ApiError::bad_request)?;
    Ok((r, stdin))
}

/// What a running session sends: output, then the exit.
#[derive(Debug)]
pub enum Out {
    /// A chunk of output.
    Output(Stream, Vec<u8>),
    /// The process ended.
    Exit(ProcessExit),
}

/// An event of a running session, or the failure that ended it.
pub type SessionItem = Result<Out, ApiError>;

/// The newline-delimited JSON event for `item` (output as base64).
pub fn event_of(item: SessionItem) -> ExecEvent {
    match item {
        Ok(Out::Output(Stream::Stdout, d)) => ExecEvent::Stdout {
            data: encode_b64(&d),
        },
        Ok(Out::Output(Stream::Stderr, d)) => ExecEvent::Stderr {
            data: encode_b64(&d),
        },
        Ok(Out::Exit(e)) => ExecEvent::Exit(e),
        Err(e) => ExecEvent::Error {
            status: e.status().as_u16(),
            error: e.message,
        },
    }
}

/// What a session's client sends while it runs.
#[derive(Debug)]
pub enum Input {
    /// stdin bytes.
    Stdin(Vec<u8>),
    /// Close stdin.
    StdinEnd,
    /// Signal the process group.
    Signal(i32),
    /// Resize the terminal.
    Resize(PtySize),
}

/// A running interactive exec: its pid, its events (`started` is not
/// among them: the caller sends it), and where its input goes. Dropping
/// `events` ends the session (the agent kills the process, or leaves it
/// running when it was started with `detach`).
pub struct Session {
    /// The process's pid in the guest.
    pub pid: i32,
    /// Output and the exit (or an error), in order; ends after the last.
    pub events: mpsc::Receiver<SessionItem>,
    /// Stdin, signals, resizes.
    pub input: mpsc::Sender<Input>,
}

impl Daemon {
    /// Starts an interactive exec in sandbox `id` (streams and WebSocket).
    pub async fn exec_session(
        self: &Arc<Self>,
        id: &str,
        req: ProcessRequest,
    ) -> ApiResult<Session> {
        let s = secs(req.timeout_secs, DEFAULT_STREAM_SECS, MAX_SESSION_SECS)?;
        let detach = req.detach;
        let (mut areq, stdin) = agent_request(req, s * 1000)?;
        areq.interactive = true;
        areq.detach_on_close = detach;
        let client = self
            .agent_v2(id, ClientConfig::default(), "streaming exec")
            .await?;
        let (pid, mut reader, mut writer) =
            tokio::task::spawn_blocking(move || client.session(&areq, &stdin))
                .await?
                .map_err(ApiError::from_guest)?;
        let hangup = reader.hangup().map_err(ApiError::from_guest)?;
        let (ev_tx, ev_rx) = mpsc::channel::<SessionItem>(CHANNEL_CHUNKS);
        let (in_tx, mut in_rx) = mpsc::channel::<Input>(CHANNEL_CHUNKS);
        // The client went away (its receiver dropped): end the connection.
        let watch = ev_tx.clone();
        tokio::spawn(async move {
            watch.closed().await;
            hangup.hang_up();
        });
        std::thread::Builder::new()
            .name("session-out".into())
            .spawn(move || loop {
                let item = match reader.next_event() {
                    Ok(Event::Output(stream, d)) => Ok(Out::Output(stream, d)),
                    Ok(Event::Exit(s)) => Ok(Out::Exit(ProcessExit::from_agent(&s))),
                    Err(e) => Err(ApiError::from_guest(e)),
                };
                let last = !matches!(item, Ok(Out::Output(..)));
                if ev_tx.blocking_send(item).is_err() || last {
                    return;
                }
            })
            .map_err(|e| ApiError::internal(format!("no thread for a session: {e}")))?;
        std::thread::Builder::new()
            .name("session-in".into())
            .spawn(move || {
                while let Some(input) = in_rx.blocking_recv() {
                    let r = match input {
                        Input::Stdin(d) => writer.stdin(&d),
                        Input::StdinEnd => writer.close_stdin(),
                        Input::Signal(s) => writer.signal(s),
                        Input::Resize(size) => writer.resize(size),
                    };
                    if let Err(e) = r {
                        tracing::debug!(pid, "session input not delivered: {e}");
                    }
                }
            })
            .map_err(|e| ApiError::internal(format!("no thread for a session: {e}")))?;
        Ok(Session {
            pid,
            events: ev_rx,
            input: in_tx,
        })
    }

    /// `POST /v1/sandboxes/:id/processes`: starts a background process.
    pub async fn start_process(self: &Arc<Self>, id: &str, req: ProcessRequest) -> ApiResult<i32> {
        if req.detach {
            return Err(ApiError::bad_request(
                "detach is for streams: a background process always runs on its own",
            ));
        }
        let ms = match req.timeout_secs {
            None => 0,
            t => secs(t, 0, MAX_SESSION_SECS)? * 1000,
        };
        let (areq, stdin) = agent_request(req, ms)?;
        let client = self
            .agent_v2(id, ClientConfig::default(), "background processes")
            .await?;
        blocking(move || client.spawn(&areq, &stdin)).await
    }

    /// `GET /v1/sandboxes/:id/processes`.
    pub async fn list_processes(self: &Arc<Self>, id: &str) -> ApiResult<Vec<ProcessInfo>> {
        let client = self
            .agent_v2(id, ClientConfig::default(), "background processes")
            .await?;
        let procs = blocking(move || client.procs()).await?;
        Ok(procs.iter().map(ProcessInfo::from_agent).collect())
    }

    /// `POST /v1/sandboxes/:id/processes/:pid/signal`.
    pub async fn signal_process(self: &Arc<Self>, id: &str, pid: i32, sig: i32) -> ApiResult<()> {
        if !agent::valid_signal(sig) {
            return Err(ApiError::bad_request(format!(
                "signal {sig} is not a signal number (1 to 64)"
            )));
        }
        let client = self
            .agent_v2(id, ClientConfig::default(), "signalling processes")
            .await?;
        blocking(move || client.signal(pid, sig)).await
    }

    /// `POST /v1/sandboxes/:id/processes/:pid/resize`.
    pub async fn resize_process(
        self: &Arc<Self>,
        id: &str,
        pid: i32,
        size: PtySize,
    ) -> ApiResult<()> {
        size.check().map_err(ApiError::bad_request)?;
        let client = self
            .agent_v2(id, ClientConfig::default(), "terminals")
            .await?;
        blocking(move || client.resize(pid, size)).await
    }

    /// `POST /v1/sandboxes/:id/processes/:pid/stdin`.
    pub async fn process_stdin(
        self: &Arc<Self>,
        id: &str,
        pid: i32,
        data: Bytes,
        eof: bool,
    ) -> ApiResult<()> {
        let client = self
            .agent_v2(id, ClientConfig::default(), "process stdin")
            .await?;
        blocking(move || {
            let mut chunks = data.chunks(agent::MAX_EXEC_STDIN).peekable();
            if chunks.peek().is_none() {
                return client.stdin(pid, &[], eof);
            }
            while let Some(c) = chunks.next() {
                client.stdin(pid, c, eof && chunks.peek().is_none())?;
            }
            Ok(())
        })
        .await
    }

    /// `POST /v1/sandboxes/:id/processes/:pid/wait`.
    pub async fn wait_process(
        self: &Arc<Self>,
        id: &str,
        pid: i32,
        timeout_secs: Option<u64>,
    ) -> ApiResult<WaitResponse> {
        let s = secs(timeout_secs, DEFAULT_WAIT_SECS, MAX_WAIT_SECS)?;
        let client = self
            .agent_v2(id, ClientConfig::default(), "background processes")
            .await?;
        tokio::task::spawn_blocking(move || {
            let (mut out, mut err) = (Vec::new(), Vec::new());
            let r = client.wait(pid, Duration::from_secs(s), |stream, d| {
                match stream {
                    Stream::Stdout => out.extend_from_slice(d),
                    Stream::Stderr => err.extend_from_slice(d),
                }
                out.len() + err.len() < MAX_WAIT_OUTPUT
            });
            let exit = match r {
                Ok(status) => Some(ProcessExit::from_agent(&status)),
                // Still running: answer what came so far.
                Err(ClientError::Agent {
                    code: agent::ErrorCode::Timeout,
                    ..
                })
                | Err(ClientError::Cancelled { .. }) => None,
                Err(e) => return Err(ApiError::from_guest(e)),
            };
            Ok(WaitResponse {
                running: exit.is_none(),
                stdout: encode_b64(&out),
                stderr: encode_b64(&err),
                exit,
            })
        })
        .await?
    }

    /// `GET /v1/sandboxes/:id/files?path=`: the file's size, then its
    /// bytes in chunks (an error mid-way ends the channel with it).
    pub async fn download(
        self: &Arc<Self>,
        id: &str,
        path: String,
        offset: u64,
    ) -> ApiResult<(u64, mpsc::Receiver<io::Result<Bytes>>)> {
        guest_path("path", &path)?;
        let (client, _, _) = self.agent_of(id, ClientConfig::default()).await?;
        let (size_tx, size_rx) = tokio::sync::oneshot::channel::<ApiResult<u64>>();
        let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(CHANNEL_CHUNKS);
        tokio::task::spawn_blocking(move || {
            let mut size_tx = Some(size_tx);
            let mut out = ChannelWriter { tx: tx.clone() };
            let r = client.read_with(
                &path,
                offset,
                MAX_DOWNLOAD,
                &mut |size| {
                    if let Some(s) = size_tx.take() {
                        let _ = s.send(Ok(size));
                    }
                    Ok(())
                },
                &mut out,
            );
            if let Err(e) = r {
                match size_tx.take() {
                    Some(s) => {
                        let _ = s.send(Err(ApiError::from_guest(e)));
                    }
                    None => {
                        let _ = tx.blocking_send(Err(io::Error::other(e.to_string())));
                    }
                }
            }
        });
        let size = size_rx
            .await
            .map_err(|_| ApiError::internal("the download's thread ended without an answer"))??;
        Ok((size, rx))
    }

    /// `PUT /v1/sandboxes/:id/files?path=`: the body's chunks into a file.
    pub async fn upload(
        self: &Arc<Self>,
        id: &str,
        req: agent::WriteRequest,
        body: axum::body::Body,
    ) -> ApiResult<Uploaded> {
        use futures_util::StreamExt;
        guest_path("path", &req.path)?;
        let (client, _, _) = self.agent_of(id, ClientConfig::default()).await?;
        let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(CHANNEL_CHUNKS);
        let mut stream = body.into_data_stream();
        tokio::spawn(async move {
            while let Some(chunk) = stream.next().await {
                let item =
                    chunk.map_err(|e| io::Error::other(format!("the upload broke off: {e}")));
                let failed = item.is_err();
                if tx.send(item).await.is_err() || failed {
                    return;
                }
            }
        });
        let path = req.path.clone();
        let bytes = tokio::task::spawn_blocking(move || {
            let mut input = ChannelReader {
                rx,
                current: Bytes::new(),
            };
            client.write_from(&req, &mut input)
        })
        .await?
        .map_err(ApiError::from_guest)?;
        Ok(Uploaded { path, bytes })
    }

    /// `GET /v1/sandboxes/:id/files/list?path=`.
    pub async fn list_files(
        self: &Arc<Self>,
        id: &str,
        path: String,
        max_entries: Option<u64>,
    ) -> ApiResult<FileList> {
        guest_path("path", &path)?;
        let max = max_entries.unwrap_or(agent::DEFAULT_MAX_LIST_ENTRIES);
        if !(1..=agent::DEFAULT_MAX_LIST_ENTRIES).contains(&max) {
            return Err(ApiError::bad_request(format!(
                "max_entries {max} is out of range: 1 to {}",
                agent::DEFAULT_MAX_LIST_ENTRIES
            )));
        }
        let (client, _, _) = self.agent_of(id, ClientConfig::default()).await?;
        let l = blocking(move || client.list(&path, max)).await?;
        Ok(FileList {
            entries: l.entries,
            truncated: l.truncated,
        })
    }

    /// `GET /v1/sandboxes/:id/files/stat?path=`.
    pub async fn stat_file(
        self: &Arc<Self>,
        id: &str,
        path: String,
        follow: bool,
    ) -> ApiResult<agent::Entry> {
        guest_path("path", &path)?;
        let (client, _, _) = self.agent_of(id, ClientConfig::default()).await?;
        blocking(move || client.stat(&path, follow)).await
    }

    /// `POST /v1/sandboxes/:id/files/mkdir`.
    pub async fn mkdir(self: &Arc<Self>, id: &str, req: proto::api::MkdirRequest) -> ApiResult<()> {
        guest_path("path", &req.path)?;
        let mode = req.mode.unwrap_or(0o755);
        if mode > 0o7777 {
            return Err(ApiError::bad_request(format!(
                "mode {mode:o} has bits beyond 7777 (octal)"
            )));
        }
        let client = self.agent_v2(id, ClientConfig::default(), "mkdir").await?;
        blocking(move || client.mkdir(&req.path, req.parents, mode)).await
    }

    /// `DELETE /v1/sandboxes/:id/files?path=`.
    pub async fn remove_file(
        self: &Arc<Self>,
        id: &str,
        path: String,
        recursive: bool,
    ) -> ApiResult<()> {
        guest_path("path", &path)?;
        let client = self.agent_v2(id, ClientConfig::default(), "remove").await?;
        blocking(move || client.remove(&path, recursive)).await
    }

    /// `POST /v1/sandboxes/:id/files/rename`.
    pub async fn rename_file(
        self: &Arc<Self>,
        id: &str,
        req: proto::api::RenameRequest,
    ) -> ApiResult<()> {
        guest_path("from", &req.from)?;
        guest_path("to", &req.to)?;
        let client = self.agent_v2(id, ClientConfig::default(), "rename").await?;
        blocking(move || client.rename(&req.from, &req.to)).await
    }
}

/// Runs a blocking agent call, its failure mapped as the guest saw it.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> agent_client::Result<T> + Send + 'static,
) -> ApiResult<T> {
    tokio::task::spawn_blocking(f)
        .await?
        .map_err(ApiError::from_guest)
}

/// A download's sink: each write is a chunk for the HTTP body; fails once
/// the client has gone (which ends the agent's read).
struct ChannelWriter {
    tx: mpsc::Sender<io::Result<Bytes>>,
}

impl Write for ChannelWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.tx
            .blocking_send(Ok(Bytes::copy_from_slice(buf)))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the client went away"))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// An upload's source: the HTTP body's chunks; an error when the body
/// broke off (which drops the agent's write, leaving no partial file).
struct ChannelReader {
    rx: mpsc::Receiver<io::Result<Bytes>>,
    current: Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(b)) => self.current = b,
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current[..n]);
        self.current = self.current.slice(n..);
        Ok(n)
    }
}
