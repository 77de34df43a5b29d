//! Streaming exec and background processes: the bodies of
//! `/v1/sandboxes/{id}/exec/stream`, `/exec/ws` and `/processes`.
//!
//! Output bytes travel exactly: base64 in JSON, raw in WebSocket binary
//! messages. These routes need a guest agent speaking protocol 2; the
//! daemon answers 501 for a sandbox whose snapshot holds an older agent.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::agent::PtySize;

/// Start a process: `POST /v1/sandboxes/{id}/exec/stream`, the first
/// message of `GET /v1/sandboxes/{id}/exec/ws`, and
/// `POST /v1/sandboxes/{id}/processes`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ProcessRequest {
    /// The program and its arguments.
    pub args: Vec<String>,
    /// Variables added to its environment.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Its working directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// The guest user it runs as (a name or uid; default root).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Kill it after this many seconds. Default: 60 for a stream, none for
    /// a background process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u64>,
    /// Bytes, base64, for its stdin at the start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin_base64: Option<String>,
    /// Run it on a pseudo-terminal of this size (its output is then all
    /// `stdout`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pty: Option<PtySize>,
    /// Streams only: when the client goes away, leave the process running
    /// (collect it with `/processes/{pid}/wait`) instead of killing it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub detach: bool,
}

/// How a process ended.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ProcessExit {
    /// As buffered exec's: the exit status, 128 + the signal, or -1 when timed out.
    pub exit_code: i32,
    /// The exit status, when it exited.
    pub code: Option<i32>,
    /// The signal that ended it.
    pub signal: Option<i32>,
    /// It ran past its timeout and was killed.
    pub timed_out: bool,
    /// How long it ran, in milliseconds.
    pub duration_ms: u64,
    /// Output dropped while nobody collected it (a background process
    /// keeps its newest 1 MiB).
    #[serde(default)]
    pub dropped_bytes: u64,
}

impl ProcessExit {
    /// The REST view of the agent's exit status.
    pub fn from_agent(s: &crate::agent::ExitStatus) -> ProcessExit {
        let exit_code = match (s.code, s.signal) {
            _ if s.timed_out => -1,
            (Some(code), _) => code,
            (None, Some(sig)) => 128 + sig,
            (None, None) => -1,
        };
        ProcessExit {
            exit_code,
            code: s.code,
            signal: s.signal,
            timed_out: s.timed_out,
            duration_ms: s.duration_ms,
            dropped_bytes: s.dropped_bytes,
        }
    }
}

/// One line of a `/exec/stream` answer (newline-delimited JSON), or one
/// text message of `/exec/ws`: `started` first, output as it comes, then
/// `exit` or `error`, which end the stream. A stream also sends
/// `keepalive` while the process is quiet; clients skip types they do not
/// know.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ExecEvent {
    /// The process started.
    Started {
        /// Its pid in the guest, for `/processes/{pid}/...`.
        pid: i32,
    },
    /// Output on stdout (or the terminal), base64 (WebSocket: a binary
    /// message whose first byte is 1).
    Stdout {
        /// The bytes, base64.
        data: String,
    },
    /// Output on stderr, base64 (WebSocket: a binary message whose first
    /// byte is 2).
    Stderr {
        /// The bytes, base64.
        data: String,
    },
    /// It ended.
    Exit(ProcessExit),
    /// Nothing happened for a second (streams only; ignore it).
    Keepalive,
    /// The stream failed; `status` is the HTTP status the failure would
    /// have had before the stream began.
    Error {
        /// What went wrong.
        error: String,
        /// Its HTTP status.
        status: u16,
    },
}

/// First byte of a WebSocket binary message carrying stdout.
pub const WS_STDOUT: u8 = 1;
/// First byte of a WebSocket binary message carrying stderr.
pub const WS_STDERR: u8 = 2;

/// A `/exec/ws` client text message after the first (a binary message
/// from the client is stdin bytes as they are).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ExecInput {
    /// Bytes for its stdin, base64.
    Stdin {
        /// The bytes, base64.
        data: String,
    },
    /// Close its stdin (on a terminal: end of file, ^D).
    StdinEnd,
    /// Signal its process group.
    Signal {
        /// Signal number, 1 to 64.
        signal: i32,
    },
    /// Resize its terminal.
    Resize {
        /// Rows, 1 to 1000.
        rows: u16,
        /// Columns, 1 to 1000.
        cols: u16,
    },
}

/// Answer to `POST /v1/sandboxes/{id}/processes` (201).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Spawned {
    /// Its pid in the guest.
    pub pid: i32,
}

/// One of `GET /v1/sandboxes/{id}/processes`: a process started in the
/// background or by a stream, running or ended and not yet waited for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ProcessInfo {
    /// Its pid in the guest.
    pub pid: i32,
    /// What it runs.
    pub args: Vec<String>,
    /// Still running.
    pub running: bool,
    /// How it ended, once it has.
    pub exit: Option<ProcessExit>,
    /// When it started (the guest's clock), seconds since the epoch.
    pub started_unix: i64,
    /// It runs on a terminal.
    pub pty: bool,
    /// Output kept for `wait`, in bytes.
    pub kept_bytes: u64,
}

impl ProcessInfo {
    /// The REST view of the agent's description.
    pub fn from_agent(p: &crate::agent::ProcInfo) -> ProcessInfo {
        ProcessInfo {
            pid: p.pid,
            args: p.args.clone(),
            running: p.running,
            exit: p.exit.as_ref().map(ProcessExit::from_agent),
            started_unix: p.started_unix,
            pty: p.pty,
            kept_bytes: p.kept_bytes,
        }
    }
}

/// `POST /v1/sandboxes/{id}/processes/{pid}/signal`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SignalRequest {
    /// Signal number, 1 to 64 (15 TERM, 9 KILL, 2 INT).
    pub signal: i32,
}

/// `POST /v1/sandboxes/{id}/processes/{pid}/resize`.
pub type ResizeRequest = PtySize;

/// `POST /v1/sandboxes/{id}/processes/{pid}/wait`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WaitRequest {
    /// Wait at most this long (default 30, at most 3600); when it is still
    /// running then, the answer says `running` with the output so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u64>,
}

/// Answer to wait: the output not collected before, and the exit once it
/// has ended (the process is then forgotten).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WaitResponse {
    /// Still running at the timeout.
    pub running: bool,
    /// stdout, base64.
    pub stdout: String,
    /// stderr, base64.
    pub stderr: String,
    /// How it ended, unless it still runs.
    pub exit: Option<ProcessExit>,
}
