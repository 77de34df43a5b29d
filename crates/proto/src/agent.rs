//! The guest agent protocol: what the host says to forkd-agent (or to the
//! built-in guest) over vsock, and what it answers.
//!
//! # Transport
//!
//! A stream connection: AF_VSOCK port 1024 in a guest (the host reaches it
//! through forkd-vmm's vsock Unix socket: write `CONNECT 1024\n`, read
//! `OK <host port>\n`, then frames follow on the same stream), or a Unix
//! socket when the agent runs on the host for tests.
//!
//! **One request per connection.** The host connects, sends one request
//! frame (plus, for `write`, the data frames), reads the answer frames until
//! the final one, and both sides close. vsock connections are cheap, a
//! connection has no state to resynchronise after an error, and closing the
//! connection is the cancel signal: when the host goes away during `exec`,
//! the agent kills the process group. During `exec` the host must neither
//! send anything after the request nor shut down its write half: the agent
//! takes either as a cancel.
//!
//! # Frame layout
//!
//! Every message either way is one frame:
//!
//! ```text
//! offset 0   u32 little-endian  json_len   length of the JSON part, >= 2
//! offset 4   u32 little-endian  data_len   length of the binary part, may be 0
//! offset 8   json_len bytes     a UTF-8 JSON object (no trailing NUL or newline needed)
//! then       data_len bytes     raw bytes (stdout/stderr/file chunks, exec stdin)
//! ```
//!
//! `json_len + data_len` must not exceed [`MAX_FRAME`] (1 MiB); a reader
//! checks the two lengths *before* allocating and refuses a larger frame (a
//! hostile peer cannot make it allocate more). After a refused or malformed
//! frame the stream cannot be resynchronised: the agent answers one error
//! frame and closes the connection, and keeps serving new connections.
//!
//! The JSON object of a request has an `"op"` field; the JSON object of
//! every other frame (answers, and the data/end frames the host sends during
//! `write`) has a `"kind"` field. Unknown fields are ignored by both sides;
//! optional fields may be omitted.
//!
//! # Operations
//!
//! `→` is host to guest, `←` guest to host; `+data` means the frame's binary
//! part carries bytes.
//!
//! | op | request (→) | answer (←) |
//! | --- | --- | --- |
//! | ping | `{"op":"ping"}` | `{"kind":"pong","version":"0.1.0","protocol":1,"uptime_ms":123,"interpreter_ready":true,"guest":"guest: linux"}` |
//! | exec | `{"op":"exec","args":["sh","-c","echo hi"],"env":{"K":"V"},"cwd":"/tmp","timeout_ms":10000}` `+data` = stdin (may be empty) | any number of `{"kind":"stdout"}+data` / `{"kind":"stderr"}+data` as output comes, then `{"kind":"exit","code":0,"signal":null,"timed_out":false,"duration_ms":5}` |
//! | eval | `{"op":"eval","code":"1+1","timeout_ms":10000}` | `{"kind":"eval","result":"2","error":null,"exit_code":0,"stdout":"","stderr":""}` |
//! | read | `{"op":"read","path":"/x","offset":0,"max_bytes":1048576}` | `{"kind":"file","size":N}` then `{"kind":"data"}+data`..., then `{"kind":"end","bytes":N}` |
//! | write | `{"op":"write","path":"/x","mode":420,"append":false,"create_dirs":false}` | `{"kind":"ready"}`; then → `{"kind":"data"}+data`..., → `{"kind":"end"}`; ← `{"kind":"written","bytes":N}` |
//! | list | `{"op":"list","path":"/","max_entries":10000}` | `{"kind":"entries","entries":[Entry...]}`..., then `{"kind":"end","truncated":false}` |
//! | stat | `{"op":"stat","path":"/x","follow_symlinks":true}` | `{"kind":"stat","entry":Entry}` |
//! | poweroff | `{"op":"poweroff"}` | `{"kind":"ok"}`, then the guest powers off |
//!
//! Optional request fields and their defaults: exec `env` `{}` (added to the
//! agent's environment), `cwd` the agent's, `timeout_ms` 60000; eval
//! `timeout_ms` 60000; read `offset` 0, `max_bytes` [`DEFAULT_MAX_READ_BYTES`];
//! write `mode` 0o644 (420), `append` false, `create_dirs` false; list
//! `max_entries` 10000; stat `follow_symlinks` true.
//!
//! An `Entry` is `{"name":"a.txt","file_type":"file","size":3,"mode":420,"mtime_unix":1700000000,"uid":0,"gid":0}`;
//! `file_type` is one of `file`, `dir`, `symlink`, `other`; `mode` holds the
//! permission bits (`st_mode & 0o7777`). For `stat`, `name` is the path asked.
//!
//! An exec exit frame has `code` (the exit status, or null when a signal
//! ended the process) and `signal` (the signal number, or null). On timeout
//! the agent kills the whole process group with SIGKILL and answers
//! `"timed_out":true` with `"signal":9`. Output is sent as it is read,
//! in chunks of at most [`CHUNK`] bytes.
//!
//! Eval runs Python code in one long-lived interpreter: globals persist
//! between calls. If the code ends in an expression, `result` is its `repr`
//! (null when it is `None`); `stdout`/`stderr` are what the code printed;
//! an exception gives `exit_code` 1 and `error` the traceback; `sys.exit(n)`
//! gives `exit_code` n. A guest that only does arithmetic may leave out
//! `stdout` and `stderr`.
//!
//! # Protocol 2
//!
//! A version 2 agent answers ping with `"protocol":2` and adds what follows.
//! A version 1 agent ignores fields it does not know, so a host must not
//! send a version 2 field or op to an agent that answered `"protocol":1`
//! (or no protocol): it would run the command without them. [`Request::protocol`]
//! says which version a request needs.
//!
//! New exec fields: `user` (a user name from the guest's `/etc/passwd`, or
//! a decimal uid: the process runs with that uid, its gid and groups, and
//! `HOME`/`USER`/`LOGNAME` set), `pty` (`{"rows":24,"cols":80}`: the
//! process gets a new session on a pseudo-terminal; its output comes as
//! `stdout` frames), `interactive` and `detach_on_close`.
//!
//! An **interactive** exec (`"interactive":true`) is a session: the agent
//! first answers `{"kind":"started","pid":N}`, then output and exit as
//! usual, and the host may send, while it runs:
//!
//! | frame (→) | effect |
//! | --- | --- |
//! | `{"kind":"stdin"}+data` | bytes for the process's stdin (or terminal) |
//! | `{"kind":"stdin_end"}` | close its stdin (on a terminal: send the EOF character) |
//! | `{"kind":"signal","signal":15}` | signal its process group |
//! | `{"kind":"resize","rows":40,"cols":120}` | resize its terminal |
//!
//! When the host closes the connection, the agent kills the process group,
//! unless the request said `"detach_on_close":true`: the process then goes
//! on in the background, like a `spawn`ed one, and `wait` collects it.
//!
//! | op | request (→) | answer (←) |
//! | --- | --- | --- |
//! | spawn | exec's fields (`timeout_ms` 0: no deadline), `+data` = stdin | `{"kind":"spawned","pid":N}`; the process runs in the background, its output kept (at most [`BG_OUTPUT_MAX`] bytes, the oldest dropped) |
//! | procs | `{"op":"procs"}` | `{"kind":"procs","procs":[ProcInfo...]}` |
//! | signal | `{"op":"signal","pid":N,"signal":15}` | `{"kind":"ok"}` |
//! | stdin | `{"op":"stdin","pid":N,"eof":false}` `+data` | `{"kind":"ok"}` |
//! | wait | `{"op":"wait","pid":N,"timeout_ms":10000}` | the kept and further `stdout`/`stderr` frames, then `exit` (the process is then forgotten); error `timeout` leaves it running. Output is handed over once: a later wait gets only what came after |
//! | resize | `{"op":"resize","pid":N,"rows":40,"cols":120}` | `{"kind":"ok"}`; error `bad_request` when it has no terminal |
//! | mkdir | `{"op":"mkdir","path":"/a/b","parents":false,"mode":493}` | `{"kind":"ok"}` |
//! | remove | `{"op":"remove","path":"/a","recursive":false}` | `{"kind":"ok"}` |
//! | rename | `{"op":"rename","from":"/a","to":"/b"}` | `{"kind":"ok"}` |
//!
//! `signal`, `stdin`, `wait` and `resize` reach only processes this agent started
//! with `spawn` or an interactive exec (a `ProcInfo` is `{"pid":N,"args":[...],"running":true,"exit":null,"started_unix":1700000000,"pty":false,"kept_bytes":0}`);
//! any other pid is `not_found`. The agent tracks at most [`MAX_PROCS`]
//! such processes (running, or ended and not yet waited for); one more is
//! `busy`. A `remove` of a directory needs `recursive`; `mkdir` of an
//! existing directory is an error unless `parents`.
//!
//! # Errors
//!
//! Any step may be answered by an error frame, which ends the operation:
//!
//! ```text
//! {"kind":"error","code":"unsupported","message":"op \"list\" is not supported by this guest"}
//! ```
//!
//! `code` is one of [`ErrorCode`]'s names (`unsupported`, `bad_request`,
//! `not_found`, `permission_denied`, `too_large`, `timeout`, `busy`, `io`,
//! `internal`); readers treat a missing or unknown code as `internal`.
//! An op the guest does not implement (or does not know) is answered with
//! code `unsupported` and a message saying so; that is the only thing a
//! minimal guest (such as the built-in one, which does ping, eval of integer
//! arithmetic and a few exec builtins) needs for the rest.

use std::collections::BTreeMap;
use std::io::{Read, Write};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Version of this protocol, answered by `ping`.
pub const PROTOCOL_VERSION: u32 = 2;
/// The first protocol version: what agents inside older snapshots speak.
pub const PROTOCOL_V1: u32 = 1;
/// Processes an agent tracks for `spawn`/interactive exec at once.
pub const MAX_PROCS: usize = 64;
/// Output a background process keeps for `wait`, stdout and stderr together (1 MiB).
pub const BG_OUTPUT_MAX: usize = 1 << 20;
/// Longest `user` name.
pub const MAX_USER_LEN: usize = 64;
/// Largest terminal side, in rows or columns.
pub const MAX_PTY_SIDE: u16 = 1000;
/// What the built-in guest answers as `guest` in its pong.
pub const BUILTIN_GUEST: &str = "guest: builtin";
/// Default vsock port of the agent.
pub const DEFAULT_VSOCK_PORT: u32 = 1024;
/// Largest frame, JSON and binary parts together (1 MiB).
pub const MAX_FRAME: usize = 1 << 20;
/// Size of the frame header.
pub const HEADER_LEN: usize = 8;
/// Largest binary part a sender puts in a data/stdout/stderr frame (256 KiB).
pub const CHUNK: usize = 256 * 1024;
/// Largest stdin the host may put in an exec request (the frame limit minus room for the JSON).
pub const MAX_EXEC_STDIN: usize = MAX_FRAME - 64 * 1024;
/// Default `max_bytes` of a read.
pub const DEFAULT_MAX_READ_BYTES: u64 = 64 << 20;
/// Default exec and eval timeout in milliseconds.
pub const DEFAULT_TIMEOUT_MS: u64 = 60_000;
/// Default `max_entries` of a list.
pub const DEFAULT_MAX_LIST_ENTRIES: u64 = 10_000;
/// Entries per `entries` frame the agent sends.
pub const LIST_BATCH: usize = 512;

/// A request: the first frame of a connection, host to guest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Is the agent alive, and what is it?
    Ping,
    /// Run a process; the frame's binary part is its stdin.
    Exec(ExecRequest),
    /// Run Python code in the warm interpreter.
    Eval(EvalRequest),
    /// Stream a file to the host.
    Read(ReadRequest),
    /// Stream a file from the host.
    Write(WriteRequest),
    /// List a directory.
    List(ListRequest),
    /// Describe one path.
    Stat(StatRequest),
    /// Power the guest off (or reboot it, as the agent is configured).
    Poweroff,
    /// Start a process in the background (protocol 2).
    Spawn(ExecRequest),
    /// The processes the agent tracks (protocol 2).
    Procs,
    /// Signal a tracked process's group (protocol 2).
    Signal(SignalRequest),
    /// Bytes for a tracked process's stdin (protocol 2); the frame's binary part.
    Stdin(StdinRequest),
    /// Collect a tracked process's output and exit (protocol 2).
    Wait(WaitRequest),
    /// Resize a tracked process's terminal (protocol 2).
    Resize(ResizeRequest),
    /// Make a directory (protocol 2).
    Mkdir(MkdirRequest),
    /// Remove a file or directory (protocol 2).
    Remove(RemoveRequest),
    /// Rename a path (protocol 2).
    Rename(RenameRequest),
}

/// The `op` names of protocol 1.
pub const OPS_V1: &[&str] = &[
    "ping", "exec", "eval", "read", "write", "list", "stat", "poweroff",
];

/// The `op` names this protocol defines (an agent answers any other with `unsupported`).
pub const OPS: &[&str] = &[
    "ping", "exec", "eval", "read", "write", "list", "stat", "poweroff", "spawn", "procs",
    "signal", "stdin", "wait", "resize", "mkdir", "remove", "rename",
];

impl Request {
    /// The `op` name of the request.
    pub fn op(&self) -> &'static str {
        match self {
            Request::Ping => "ping",
            Request::Exec(_) => "exec",
            Request::Eval(_) => "eval",
            Request::Read(_) => "read",
            Request::Write(_) => "write",
            Request::List(_) => "list",
            Request::Stat(_) => "stat",
            Request::Poweroff => "poweroff",
            Request::Spawn(_) => "spawn",
            Request::Procs => "procs",
            Request::Signal(_) => "signal",
            Request::Stdin(_) => "stdin",
            Request::Wait(_) => "wait",
            Request::Resize(_) => "resize",
            Request::Mkdir(_) => "mkdir",
            Request::Remove(_) => "remove",
            Request::Rename(_) => "rename",
        }
    }

    /// The protocol version an agent must answer ping with to be sent this
    /// request: 2 for a new op or an exec with a version 2 field, else 1.
    pub fn protocol(&self) -> u32 {
        match self {
            Request::Exec(e) if !e.is_v1() => PROTOCOL_VERSION,
            r if OPS_V1.contains(&r.op()) => PROTOCOL_V1,
            _ => PROTOCOL_VERSION,
        }
    }
}

fn default_timeout_ms() -> u64 {
    DEFAULT_TIMEOUT_MS
}
fn default_max_read() -> u64 {
    DEFAULT_MAX_READ_BYTES
}
fn default_mode() -> u32 {
    0o644
}
fn default_max_entries() -> u64 {
    DEFAULT_MAX_LIST_ENTRIES
}
fn default_true() -> bool {
    true
}

/// `exec`: run `args[0]` (looked up in `PATH`) with `args[1..]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    /// Program and arguments; must not be empty.
    pub args: Vec<String>,
    /// Variables added to (or replacing those of) the agent's environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory (default: the agent's).
    #[serde(default)]
    pub cwd: Option<String>,
    /// Kill the process group after this many milliseconds.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Run as this user: a name in the guest's `/etc/passwd` or a decimal
    /// uid (protocol 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Run on a new pseudo-terminal of this size (protocol 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pty: Option<PtySize>,
    /// A session: `started` first, and stdin/signal/resize frames from the
    /// host while it runs (protocol 2).
    #[serde(default, skip_serializing_if = "is_false")]
    pub interactive: bool,
    /// When the host closes an interactive session, leave the process
    /// running in the background instead of killing it (protocol 2).
    #[serde(default, skip_serializing_if = "is_false")]
    pub detach_on_close: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl ExecRequest {
    /// A plain exec of `args` with every other field at its default.
    pub fn new(args: Vec<String>) -> ExecRequest {
        ExecRequest {
            args,
            env: BTreeMap::new(),
            cwd: None,
            timeout_ms: DEFAULT_TIMEOUT_MS,
            user: None,
            pty: None,
            interactive: false,
            detach_on_close: false,
        }
    }

    /// Whether a protocol 1 agent would run this as asked (no version 2 field set).
    pub fn is_v1(&self) -> bool {
        self.user.is_none() && self.pty.is_none() && !self.interactive && !self.detach_on_close
    }

    /// Checks the fields a guest cannot check for the host: a non-empty
    /// `args`, a bounded `user`, a terminal size in range, and
    /// `detach_on_close` only on an interactive exec.
    pub fn check(&self) -> Result<(), String> {
        if self.args.is_empty() {
            return Err("args is empty: give the program and its arguments".into());
        }
        if let Some(u) = &self.user {
            if u.is_empty() || u.len() > MAX_USER_LEN || u.contains(['\0', ':', '\n', '/']) {
                return Err(format!(
                    "user {u:?} is not a user name or uid (1 to {MAX_USER_LEN} bytes, no ':', '/', NUL or newline)"
                ));
            }
        }
        if let Some(p) = &self.pty {
            p.check()?;
        }
        if self.detach_on_close && !self.interactive {
            return Err("detach_on_close needs an interactive exec".into());
        }
        Ok(())
    }
}

/// A terminal's size.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PtySize {
    /// Rows, 1 to [`MAX_PTY_SIDE`].
    pub rows: u16,
    /// Columns, 1 to [`MAX_PTY_SIDE`].
    pub cols: u16,
}

impl PtySize {
    /// Both sides in 1..=[`MAX_PTY_SIDE`].
    pub fn check(&self) -> Result<(), String> {
        let ok = |v: u16| (1..=MAX_PTY_SIDE).contains(&v);
        if ok(self.rows) && ok(self.cols) {
            Ok(())
        } else {
            Err(format!(
                "terminal size {}x{} is out of range: rows and cols are 1 to {MAX_PTY_SIDE}",
                self.rows, self.cols
            ))
        }
    }
}

/// `signal`: signal a tracked process's group.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignalRequest {
    /// The process (its group has the same id).
    pub pid: i32,
    /// Signal number, 1 to 64.
    pub signal: i32,
}

/// `stdin`: bytes (the frame's binary part) for a tracked process.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StdinRequest {
    /// The process.
    pub pid: i32,
    /// Close its stdin after these bytes.
    #[serde(default)]
    pub eof: bool,
}

/// `wait`: collect a tracked process.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WaitRequest {
    /// The process.
    pub pid: i32,
    /// Give up (error `timeout`, the process left running) after this long.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

/// `resize`: resize a tracked process's terminal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResizeRequest {
    /// The process.
    pub pid: i32,
    /// Rows, 1 to [`MAX_PTY_SIDE`].
    pub rows: u16,
    /// Columns, 1 to [`MAX_PTY_SIDE`].
    pub cols: u16,
}

/// `mkdir`: make a directory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MkdirRequest {
    /// Absolute path.
    pub path: String,
    /// Make missing parents too, and accept an existing directory.
    #[serde(default)]
    pub parents: bool,
    /// Permission bits (before the umask).
    #[serde(default = "default_dir_mode")]
    pub mode: u32,
}

fn default_dir_mode() -> u32 {
    0o755
}

/// `remove`: remove a file, link or directory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoveRequest {
    /// Absolute path.
    pub path: String,
    /// Remove a directory with what it holds.
    #[serde(default)]
    pub recursive: bool,
}

/// `rename`: rename(2) within the guest (replaces a file at `to`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenameRequest {
    /// Absolute path now.
    pub from: String,
    /// Absolute path after.
    pub to: String,
}

/// A process the agent tracks (`procs`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcInfo {
    /// Its pid (and process group).
    pub pid: i32,
    /// What it runs.
    pub args: Vec<String>,
    /// Still running.
    pub running: bool,
    /// How it ended, once it has.
    #[serde(default)]
    pub exit: Option<ExitStatus>,
    /// When it started, seconds since the epoch (the guest's clock).
    #[serde(default)]
    pub started_unix: i64,
    /// It runs on a pseudo-terminal.
    #[serde(default)]
    pub pty: bool,
    /// Output kept for `wait`, in bytes.
    #[serde(default)]
    pub kept_bytes: u64,
}

/// `eval`: Python code for the warm interpreter.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvalRequest {
    /// Source code; if it ends in an expression, its repr is the result.
    pub code: String,
    /// Interrupt the code after this many milliseconds.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

/// `read`: stream a regular file to the host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReadRequest {
    /// Absolute path in the guest.
    pub path: String,
    /// Start here.
    #[serde(default)]
    pub offset: u64,
    /// Refuse (code `too_large`) a file with more than this many bytes past `offset`.
    #[serde(default = "default_max_read")]
    pub max_bytes: u64,
}

/// `write`: stream a file from the host (written to a temporary file and
/// renamed into place at the end, unless `append`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteRequest {
    /// Absolute path in the guest.
    pub path: String,
    /// Permission bits of a created file.
    #[serde(default = "default_mode")]
    pub mode: u32,
    /// Append to the file instead of replacing it.
    #[serde(default)]
    pub append: bool,
    /// Create missing parent directories.
    #[serde(default)]
    pub create_dirs: bool,
}

/// `list`: the entries of a directory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListRequest {
    /// Absolute path of the directory.
    pub path: String,
    /// Stop after this many entries (the end frame then says `truncated`).
    #[serde(default = "default_max_entries")]
    pub max_entries: u64,
}

/// `stat`: describe one path.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatRequest {
    /// Absolute path.
    pub path: String,
    /// Describe a symlink's target rather than the link.
    #[serde(default = "default_true")]
    pub follow_symlinks: bool,
}

/// Type of a directory entry.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileType {
    /// Regular file.
    File,
    /// Directory.
    Dir,
    /// Symbolic link.
    Symlink,
    /// Anything else (device, socket, fifo).
    Other,
}

/// One file's description (a `list` entry or a `stat` answer).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// File name (for `stat`, the path asked). Non-UTF-8 bytes are replaced.
    pub name: String,
    /// Type.
    pub file_type: FileType,
    /// Size in bytes.
    pub size: u64,
    /// Permission bits (`st_mode & 0o7777`).
    pub mode: u32,
    /// Modification time, seconds since the epoch.
    #[serde(default)]
    pub mtime_unix: i64,
    /// Owner.
    #[serde(default)]
    pub uid: u32,
    /// Group.
    #[serde(default)]
    pub gid: u32,
}

/// Every frame that is not a request: the guest's answers, and the data and
/// end frames the host sends during `write`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Reply {
    /// Answer to ping.
    Pong(Pong),
    /// A chunk of the process's stdout (in the binary part).
    Stdout,
    /// A chunk of the process's stderr (in the binary part).
    Stderr,
    /// The process ended; last frame of an exec.
    Exit(ExitStatus),
    /// Answer to eval.
    Eval(EvalResult),
    /// Start of a read: the file's size when opened.
    File {
        /// Bytes the file had past the requested offset.
        size: u64,
    },
    /// A chunk of file content (in the binary part); both directions.
    Data,
    /// End of a stream: after a read's data (`bytes` sent), after a write's
    /// data (host to guest, no fields), after a list (`truncated`).
    End {
        /// Bytes sent (read).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        bytes: Option<u64>,
        /// The list stopped at `max_entries`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        truncated: Option<bool>,
    },
    /// The agent is ready for a write's data.
    Ready,
    /// A write finished: the file is in place.
    Written {
        /// Bytes written.
        bytes: u64,
    },
    /// A batch of directory entries.
    Entries {
        /// The entries.
        entries: Vec<Entry>,
    },
    /// Answer to stat.
    Stat {
        /// The description.
        entry: Entry,
    },
    /// Plain success (poweroff, and protocol 2's signal, stdin, mkdir, remove, rename).
    Ok,
    /// An interactive exec started (protocol 2): the first answer.
    Started {
        /// Its pid (and process group).
        pid: i32,
    },
    /// A spawn started (protocol 2).
    Spawned {
        /// Its pid (and process group).
        pid: i32,
    },
    /// Answer to procs (protocol 2).
    Procs {
        /// The tracked processes.
        procs: Vec<ProcInfo>,
    },
    /// Host to guest during an interactive exec: stdin bytes (binary part).
    Stdin,
    /// Host to guest during an interactive exec: close stdin.
    StdinEnd,
    /// Host to guest during an interactive exec: signal the process group.
    Signal {
        /// Signal number, 1 to 64.
        signal: i32,
    },
    /// Host to guest during an interactive exec: resize the terminal.
    Resize {
        /// Rows.
        rows: u16,
        /// Columns.
        cols: u16,
    },
    /// The operation failed; no more frames follow.
    Error(ErrorReply),
}

/// Answer to `ping`.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pong {
    /// Agent version.
    #[serde(default)]
    pub version: String,
    /// Protocol version ([`PROTOCOL_VERSION`]).
    #[serde(default)]
    pub protocol: u32,
    /// Milliseconds since the agent started.
    #[serde(default)]
    pub uptime_ms: u64,
    /// The warm interpreter has started and run its warm-up recipe.
    #[serde(default)]
    pub interpreter_ready: bool,
    /// Why the interpreter is not ready, if it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interpreter_error: Option<String>,
    /// What the guest is: `guest: linux`, `guest: builtin`.
    pub guest: String,
    /// The agent's process id in the guest (1 as init); none from the
    /// built-in guest. Upstream's ping answer has it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
}

/// How an exec'd process ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    /// Exit status, or None when a signal ended it.
    pub code: Option<i32>,
    /// The signal that ended it.
    #[serde(default)]
    pub signal: Option<i32>,
    /// The agent killed it at the timeout.
    #[serde(default)]
    pub timed_out: bool,
    /// Wall time from spawn to exit.
    #[serde(default)]
    pub duration_ms: u64,
    /// Output of a background process dropped because more than
    /// [`BG_OUTPUT_MAX`] bytes waited to be collected (protocol 2).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub dropped_bytes: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Whether `signal` is a signal number a host may send (1 to 64).
pub fn valid_signal(signal: i32) -> bool {
    (1..=64).contains(&signal)
}

/// Answer to `eval` (the `{result, error, exit_code}` of the REST API, plus output).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvalResult {
    /// repr of the final expression's value, if any and not None.
    pub result: Option<String>,
    /// The exception (traceback) or failure, if any.
    pub error: Option<String>,
    /// 0 on success, 1 on an exception, n for `sys.exit(n)`.
    pub exit_code: i32,
    /// What the code printed to stdout (bounded by the agent).
    #[serde(default)]
    pub stdout: String,
    /// What the code printed to stderr (bounded by the agent).
    #[serde(default)]
    pub stderr: String,
}

/// Category of an error frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The guest does not implement this op.
    Unsupported,
    /// The request or a frame is malformed, oversized or out of order.
    BadRequest,
    /// The path or program does not exist.
    NotFound,
    /// The guest refused access.
    PermissionDenied,
    /// Bigger than the limit the host set.
    TooLarge,
    /// The operation ran out of time.
    Timeout,
    /// The agent has too much going on; retry later.
    Busy,
    /// An I/O error in the guest.
    Io,
    /// Anything else (also any code a reader does not know).
    #[serde(other)]
    Internal,
}

fn default_code() -> ErrorCode {
    ErrorCode::Internal
}

/// An error frame's fields.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    /// Category.
    #[serde(default = "default_code")]
    pub code: ErrorCode,
    /// What went wrong, for a human.
    pub message: String,
}

impl Reply {
    /// An error frame with `code` and `message`.
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Reply {
        Reply::Error(ErrorReply {
            code,
            message: message.into(),
        })
    }

    /// The answer to an op this guest does not implement.
    pub fn unsupported(op: &str) -> Reply {
        Self::error(
            ErrorCode::Unsupported,
            format!("op {op:?} is not supported by this guest"),
        )
    }
}

/// A frame that could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The peer announced a frame over the limit.
    #[error("frame of {json_len} + {data_len} bytes exceeds the {max}-byte limit; the peer is broken or hostile, drop the connection")]
    TooLarge {
        /// JSON part length announced.
        json_len: u32,
        /// Binary part length announced.
        data_len: u32,
        /// The limit.
        max: usize,
    },
    /// The JSON part is too short to be an object.
    #[error("frame with a {0}-byte JSON part: a frame needs a JSON object (at least `{{}}`)")]
    EmptyJson(u32),
    /// The JSON part does not parse as the expected message.
    #[error("malformed frame JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// The stream ended cleanly before a frame began.
    #[error("the peer closed the connection before sending a frame")]
    Closed,
    /// The stream failed or ended inside a frame.
    #[error("frame I/O failed: {0}")]
    Io(#[from] std::io::Error),
}

impl FrameError {
    /// True for a read/write timeout (the peer stalled).
    pub fn is_timeout(&self) -> bool {
        matches!(self, FrameError::Io(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut))
    }
}

/// One frame as read: its JSON part, not yet parsed, and its binary part.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RawFrame {
    /// The JSON part.
    pub json: Vec<u8>,
    /// The binary part.
    pub data: Vec<u8>,
}

impl RawFrame {
    /// Parses the JSON part as `T`.
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, FrameError> {
        Ok(serde_json::from_slice(&self.json)?)
    }
}

/// Checks the two lengths of a header against `max` (itself capped at [`MAX_FRAME`]).
pub fn check_header(json_len: u32, data_len: u32, max: usize) -> Result<(), FrameError> {
    let max = max.min(MAX_FRAME);
    if (json_len as u64) + (data_len as u64) > max as u64 {
        return Err(FrameError::TooLarge {
            json_len,
            data_len,
            max,
        });
    }
    if json_len < 2 {
        return Err(FrameError::EmptyJson(json_len));
    }
    Ok(())
}

/// Reads one frame, refusing one larger than `max` bytes (capped at
/// [`MAX_FRAME`]) before allocating anything for it. A clean end of stream
/// before the first header byte is [`FrameError::Closed`].
pub fn read_frame<R: Read + ?Sized>(r: &mut R, max: usize) -> Result<RawFrame, FrameError> {
    let mut header = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match r.read(&mut header[got..]) {
            Ok(0) if got == 0 => return Err(FrameError::Closed),
            Ok(0) => return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let json_len = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
    let data_len = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes"));
    check_header(json_len, data_len, max)?;
    let mut json = vec![0u8; json_len as usize];
    r.read_exact(&mut json)?;
    let mut data = vec![0u8; data_len as usize];
    r.read_exact(&mut data)?;
    Ok(RawFrame { json, data })
}

/// Writes one frame: `msg` as the JSON part and `data` as the binary part.
/// Refuses (without writing) a frame over [`MAX_FRAME`].
pub fn write_frame<W: Write + ?Sized, T: Serialize + ?Sized>(
    w: &mut W,
    msg: &T,
    data: &[u8],
) -> Result<(), FrameError> {
    let json = serde_json::to_vec(msg)?;
    write_raw_frame(w, &json, data)
}

/// Writes one frame from an already encoded JSON part.
pub fn write_raw_frame<W: Write + ?Sized>(
    w: &mut W,
    json: &[u8],
    data: &[u8],
) -> Result<(), FrameError> {
    let too_large = || FrameError::TooLarge {
        json_len: json.len().min(u32::MAX as usize) as u32,
        data_len: data.len().min(u32::MAX as usize) as u32,
        max: MAX_FRAME,
    };
    let json_len = u32::try_from(json.len()).map_err(|_| too_large())?;
    let data_len = u32::try_from(data.len()).map_err(|_| too_large())?;
    check_header(json_len, data_len, MAX_FRAME)?;
    let mut head = Vec::with_capacity(HEADER_LEN + json.len());
    head.extend_from_slice(&json_len.to_le_bytes());
    head.extend_from_slice(&data_len.to_le_bytes());
    head.extend_from_slice(json);
    w.write_all(&head)?;
    if !data.is_empty() {
        w.write_all(data)?;
    }
    w.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip<T: Serialize>(msg: &T, data: &[u8]) -> RawFrame {
        let mut buf = Vec::new();
        write_frame(&mut buf, msg, data).unwrap();
        read_frame(&mut buf.as_slice(), MAX_FRAME).unwrap()
    }

    #[test]
    fn byte_layout_is_as_documented() {
        let mut buf = Vec::new();
        write_frame(&mut buf, &Request::Ping, b"xy").unwrap();
        let json = br#"{"op":"ping"}"#;
        assert_eq!(&buf[0..4], &(json.len() as u32).to_le_bytes());
        assert_eq!(&buf[4..8], &2u32.to_le_bytes());
        assert_eq!(&buf[8..8 + json.len()], json);
        assert_eq!(&buf[8 + json.len()..], b"xy");
    }

    #[test]
    fn requests_roundtrip_with_documented_names() {
        let exec = Request::Exec(ExecRequest {
            args: vec!["sh".into(), "-c".into(), "echo hi".into()],
            env: [("K".to_string(), "V".to_string())].into(),
            cwd: Some("/tmp".into()),
            timeout_ms: 10_000,
            ..ExecRequest::new(vec![])
        });
        let f = roundtrip(&exec, b"stdin");
        assert_eq!(f.parse::<Request>().unwrap(), exec);
        assert_eq!(f.data, b"stdin");
        let v: serde_json::Value = f.parse().unwrap();
        assert_eq!(v["op"], "exec");
        assert_eq!(v["args"][2], "echo hi");
        assert_eq!(v["timeout_ms"], 10_000);

        // Defaults of optional fields.
        let r: Request = serde_json::from_str(r#"{"op":"exec","args":["true"]}"#).unwrap();
        assert_eq!(r, Request::Exec(ExecRequest::new(vec!["true".into()])));
        let r: Request = serde_json::from_str(r#"{"op":"write","path":"/a"}"#).unwrap();
        assert_eq!(
            r,
            Request::Write(WriteRequest {
                path: "/a".into(),
                mode: 0o644,
                append: false,
                create_dirs: false
            })
        );
        let r: Request = serde_json::from_str(r#"{"op":"read","path":"/a"}"#).unwrap();
        assert_eq!(r.op(), "read");
    }

    #[test]
    fn protocol_2_fields_and_ops_say_so_and_v1_requests_stay_byte_identical() {
        let plain = ExecRequest::new(vec!["true".into()]);
        assert_eq!(
            serde_json::to_string(&Request::Exec(plain.clone())).unwrap(),
            r#"{"op":"exec","args":["true"],"env":{},"cwd":null,"timeout_ms":60000}"#
        );
        assert_eq!(Request::Exec(plain.clone()).protocol(), 1);
        for v2 in [
            ExecRequest {
                user: Some("nobody".into()),
                ..plain.clone()
            },
            ExecRequest {
                pty: Some(PtySize { rows: 24, cols: 80 }),
                ..plain.clone()
            },
            ExecRequest {
                interactive: true,
                ..plain.clone()
            },
        ] {
            assert_eq!(Request::Exec(v2).protocol(), 2);
        }
        for op in OPS {
            let json = match *op {
                "exec" | "spawn" => format!(r#"{{"op":"{op}","args":["x"]}}"#),
                "eval" => r#"{"op":"eval","code":"1"}"#.to_string(),
                "signal" => r#"{"op":"signal","pid":1,"signal":15}"#.to_string(),
                "stdin" | "wait" => format!(r#"{{"op":"{op}","pid":1}}"#),
                "resize" => r#"{"op":"resize","pid":1,"rows":2,"cols":3}"#.to_string(),
                "rename" => r#"{"op":"rename","from":"/a","to":"/b"}"#.to_string(),
                "procs" | "ping" | "poweroff" => format!(r#"{{"op":"{op}"}}"#),
                _ => format!(r#"{{"op":"{op}","path":"/"}}"#),
            };
            let r: Request = serde_json::from_str(&json).unwrap();
            assert_eq!(r.op(), *op);
            let want = if OPS_V1.contains(op) { 1 } else { 2 };
            assert_eq!(r.protocol(), want, "{op}");
        }
        assert!(matches!(
            serde_json::from_str::<Reply>(r#"{"kind":"resize","rows":1,"cols":2}"#).unwrap(),
            Reply::Resize { rows: 1, cols: 2 }
        ));
    }

    #[test]
    fn exec_checks_bound_what_the_guest_cannot() {
        let ok = ExecRequest::new(vec!["x".into()]);
        assert!(ok.check().is_ok());
        assert!(ExecRequest::new(vec![]).check().is_err());
        for bad in ["", "a:b", "a/b", "a\nb", &"u".repeat(MAX_USER_LEN + 1)] {
            let r = ExecRequest {
                user: Some(bad.to_string()),
                ..ok.clone()
            };
            assert!(r.check().is_err(), "{bad:?}");
        }
        for (rows, cols) in [(0, 80), (24, 0), (MAX_PTY_SIDE + 1, 80)] {
            let r = ExecRequest {
                pty: Some(PtySize { rows, cols }),
                ..ok.clone()
            };
            assert!(r.check().is_err(), "{rows}x{cols}");
        }
        let r = ExecRequest {
            detach_on_close: true,
            ..ok.clone()
        };
        assert!(r.check().is_err());
        assert!(valid_signal(9) && !valid_signal(0) && !valid_signal(65));
    }

    #[test]
    fn replies_have_documented_shapes() {
        let j = |r: &Reply| serde_json::to_string(r).unwrap();
        assert_eq!(j(&Reply::Stdout), r#"{"kind":"stdout"}"#);
        assert_eq!(j(&Reply::Data), r#"{"kind":"data"}"#);
        assert_eq!(
            j(&Reply::End {
                bytes: None,
                truncated: None
            }),
            r#"{"kind":"end"}"#
        );
        assert_eq!(
            j(&Reply::unsupported("list")),
            r#"{"kind":"error","code":"unsupported","message":"op \"list\" is not supported by this guest"}"#
        );
        assert_eq!(
            j(&Reply::Exit(ExitStatus {
                code: Some(0),
                signal: None,
                timed_out: false,
                duration_ms: 5,
                dropped_bytes: 0,
            })),
            r#"{"kind":"exit","code":0,"signal":null,"timed_out":false,"duration_ms":5}"#
        );
        // What a minimal C guest writes parses.
        let pong: Reply =
            serde_json::from_str(r#"{"kind":"pong","guest":"guest: builtin"}"#).unwrap();
        assert!(
            matches!(pong, Reply::Pong(p) if p.guest == "guest: builtin" && !p.interpreter_ready)
        );
        let eval: Reply =
            serde_json::from_str(r#"{"kind":"eval","result":"4","error":null,"exit_code":0}"#)
                .unwrap();
        assert!(matches!(eval, Reply::Eval(e) if e.result.as_deref() == Some("4")));
        // Missing or unknown error codes read as internal.
        let e: Reply = serde_json::from_str(r#"{"kind":"error","message":"x"}"#).unwrap();
        assert_eq!(e, Reply::error(ErrorCode::Internal, "x"));
        let e: Reply =
            serde_json::from_str(r#"{"kind":"error","code":"weird","message":"x"}"#).unwrap();
        assert_eq!(e, Reply::error(ErrorCode::Internal, "x"));
    }

    #[test]
    fn oversized_frames_are_refused_before_allocating() {
        let mut buf = Vec::new();
        buf.extend_from_slice(&u32::MAX.to_le_bytes());
        buf.extend_from_slice(&u32::MAX.to_le_bytes());
        let e = read_frame(&mut buf.as_slice(), MAX_FRAME).unwrap_err();
        assert!(matches!(e, FrameError::TooLarge { .. }), "{e}");
        // Sum over the limit, each part under it.
        let mut buf = Vec::new();
        buf.extend_from_slice(&((MAX_FRAME / 2 + 1) as u32).to_le_bytes());
        buf.extend_from_slice(&((MAX_FRAME / 2) as u32).to_le_bytes());
        assert!(matches!(
            read_frame(&mut buf.as_slice(), MAX_FRAME),
            Err(FrameError::TooLarge { .. })
        ));
        // A lower caller limit applies.
        let mut buf = Vec::new();
        write_frame(&mut buf, &Reply::Data, &[0u8; 1000]).unwrap();
        assert!(matches!(
            read_frame(&mut buf.as_slice(), 100),
            Err(FrameError::TooLarge { .. })
        ));
        // The writer refuses too.
        let big = vec![0u8; MAX_FRAME];
        assert!(matches!(
            write_frame(&mut Vec::new(), &Reply::Data, &big),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[test]
    fn truncated_empty_and_malformed_frames() {
        assert!(matches!(
            read_frame(&mut [].as_slice(), MAX_FRAME),
            Err(FrameError::Closed)
        ));
        assert!(matches!(
            read_frame(&mut [1u8, 0].as_slice(), MAX_FRAME),
            Err(FrameError::Io(_))
        ));
        let mut buf = Vec::new();
        buf.extend_from_slice(&0u32.to_le_bytes());
        buf.extend_from_slice(&0u32.to_le_bytes());
        assert!(matches!(
            read_frame(&mut buf.as_slice(), MAX_FRAME),
            Err(FrameError::EmptyJson(0))
        ));
        // Header promises more than the stream holds.
        let mut buf = Vec::new();
        buf.extend_from_slice(&10u32.to_le_bytes());
        buf.extend_from_slice(&0u32.to_le_bytes());
        buf.extend_from_slice(b"{}");
        assert!(matches!(
            read_frame(&mut buf.as_slice(), MAX_FRAME),
            Err(FrameError::Io(_))
        ));
        // Not JSON.
        let mut buf = Vec::new();
        write_raw_frame(&mut buf, b"not json", b"").unwrap();
        let f = read_frame(&mut buf.as_slice(), MAX_FRAME).unwrap();
        assert!(matches!(f.parse::<Request>(), Err(FrameError::Json(_))));
    }
}
