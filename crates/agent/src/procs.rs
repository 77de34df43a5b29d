//! Tracked processes (protocol 2): those started by `spawn` or an
//! interactive exec, reachable by pid for `signal`, `stdin` and `wait`.
//!
//! Each has one pump thread that owns its pipes: it reads output into a
//! bounded queue, writes queued stdin as the process takes it, and records
//! the exit. Whoever collects the output (an interactive exec's connection,
//! or a `wait`) takes it from the queue. While a collector is attached a
//! full queue stops the pump (the process then blocks on its output, as it
//! would on a slow terminal); with none attached the oldest output is
//! dropped and counted, so a forgotten process cannot fill the guest's
//! memory.

use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use proto::agent::{ExitStatus, ProcInfo, PtySize, BG_OUTPUT_MAX, MAX_PROCS};

use crate::children::{kill_group, Slot};
use crate::launch::{self, Launched};
use crate::log::log;

/// How long output is still read after the process exited (processes it
/// left behind may hold the pipes open).
const DRAIN_AFTER_EXIT: Duration = Duration::from_millis(300);
/// Largest read from a pipe at once.
const READ_CHUNK: usize = 64 * 1024;
/// Most stdin queued for a process that is not reading it.
pub const MAX_STDIN_QUEUED: usize = 4 << 20;
/// The terminal's end-of-file character (^D), sent for a stdin end on a terminal.
const VEOF: u8 = 4;

/// Which output a chunk is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stream {
    /// stdout (or the terminal).
    Stdout,
    /// stderr.
    Stderr,
}

/// What the pump and the collectors share.
#[derive(Default)]
struct State {
    chunks: VecDeque<(Stream, Vec<u8>)>,
    kept: usize,
    dropped: u64,
    attached: bool,
    stdin: Vec<u8>,
    stdin_eof: bool,
    stdin_closed: bool,
    exit: Option<ExitStatus>,
    timed_out: bool,
}

/// A tracked process.
pub struct Proc {
    /// Its pid (and process group).
    pub pid: i32,
    args: Vec<String>,
    started_unix: i64,
    pty: Option<File>,
    state: Mutex<State>,
    /// The pump waits here for room in a full queue.
    room: Condvar,
    /// Readable when there is new output or the process ended (for a
    /// collector's poll); written by the pump.
    news: Pipe,
    /// Wakes the pump (stdin queued, a collector left).
    wake: Pipe,
}

/// A non-blocking pipe used as a level-triggered wake-up.
struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded: both fds are open and owned by nobody else.
        let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        Ok(Pipe { r, w })
    }

    fn poke(&self) {
        // SAFETY: writes one byte from a valid buffer to an fd we own (a
        // full pipe is already readable, so EAGAIN is fine).
        unsafe { libc::write(self.w.as_raw_fd(), [1u8].as_ptr().cast(), 1) };
    }

    fn drain(&self) {
        let mut buf = [0u8; 64];
        // SAFETY: reads into a valid buffer of the length given, from an
        // fd we own; non-blocking, so it stops at empty.
        while unsafe { libc::read(self.r.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) } > 0 {}
    }
}

/// The table of tracked processes.
pub struct Table {
    procs: Mutex<BTreeMap<i32, Arc<Proc>>>,
}

static TABLE: OnceLock<Table> = OnceLock::new();

/// The process-wide table.
pub fn table() -> &'static Table {
    TABLE.get_or_init(|| Table {
        procs: Mutex::new(BTreeMap::new()),
    })
}

/// Why a tracked process could not be started or reached.
#[derive(Debug)]
pub enum ProcError {
    /// [`MAX_PROCS`] are tracked.
    Full,
    /// No tracked process has that pid.
    NotFound(i32),
    /// It did not start.
    Launch(launch::LaunchError),
}

impl Table {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<i32, Arc<Proc>>> {
        self.procs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts and tracks a process. `attached`: a collector is there from
    /// the start (an interactive exec). `deadline`: kill its group then.
    pub fn start(
        &self,
        launched: impl FnOnce() -> Result<Launched, launch::LaunchError>,
        args: Vec<String>,
        stdin: Vec<u8>,
        attached: bool,
        deadline: Option<Duration>,
    ) -> Result<Arc<Proc>, ProcError> {
        let mut procs = self.lock();
        if procs.len() >= MAX_PROCS {
            return Err(ProcError::Full);
        }
        let l = launched().map_err(ProcError::Launch)?;
        let (news, wake) = match (Pipe::new(), Pipe::new()) {
            (Ok(n), Ok(w)) => (n, w),
            (Err(e), _) | (_, Err(e)) => {
                kill_group(l.pid, libc::SIGKILL);
                return Err(ProcError::Launch((
                    proto::agent::ErrorCode::Io,
                    format!("no pipe to track the process: {e}"),
                )));
            }
        };
        let p = Arc::new(Proc {
            pid: l.pid,
            args,
            started_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64),
            pty: l.pty.as_ref().and_then(|m| m.try_clone().ok()),
            state: Mutex::new(State {
                attached,
                stdin,
                ..State::default()
            }),
            room: Condvar::new(),
            news,
            wake,
        });
        procs.insert(p.pid, p.clone());
        drop(procs);
        let me = p.clone();
        let deadline = deadline.map(|d| l.started + d);
        let r = std::thread::Builder::new()
            .name("pump".into())
            .spawn(move || pump(&me, l, deadline));
        if let Err(e) = r {
            log!("no pump thread for process {}: {e}", p.pid);
            kill_group(p.pid, libc::SIGKILL);
        }
        Ok(p)
    }

    /// The tracked process `pid`.
    pub fn get(&self, pid: i32) -> Result<Arc<Proc>, ProcError> {
        self.lock()
            .get(&pid)
            .cloned()
            .ok_or(ProcError::NotFound(pid))
    }

    /// Forgets `pid` (its exit was collected).
    pub fn forget(&self, pid: i32) {
        self.lock().remove(&pid);
    }

    /// Every tracked process.
    pub fn list(&self) -> Vec<ProcInfo> {
        let procs: Vec<Arc<Proc>> = self.lock().values().cloned().collect();
        procs.iter().map(|p| p.info()).collect()
    }
}

/// What a collector got from [`Proc::take`].
pub enum Taken {
    /// Output chunks, in order.
    Output(Vec<(Stream, Vec<u8>)>),
    /// The process ended and all its output was taken.
    Exit(ExitStatus),
    /// Nothing yet.
    Nothing,
}

impl Proc {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Its description for `procs`.
    pub fn info(&self) -> ProcInfo {
        let s = self.lock();
        ProcInfo {
            pid: self.pid,
            args: self.args.clone(),
            running: s.exit.is_none(),
            exit: s.exit.clone(),
            started_unix: self.started_unix,
            pty: self.pty.is_some(),
            kept_bytes: s.kept as u64,
        }
    }

    /// Readable when [`Proc::take`] has something new.
    pub fn news_fd(&self) -> RawFd {
        self.news.r.as_raw_fd()
    }

    /// Takes the queued output, or the exit once everything was taken.
    pub fn take(&self) -> Taken {
        self.news.drain();
        let mut s = self.lock();
        if !s.chunks.is_empty() {
            s.kept = 0;
            let out: Vec<_> = s.chunks.drain(..).collect();
            self.room.notify_all();
            return Taken::Output(out);
        }
        match &s.exit {
            Some(e) => Taken::Exit(ExitStatus {
                dropped_bytes: s.dropped,
                ..e.clone()
            }),
            None => Taken::Nothing,
        }
    }

    /// Attaches or detaches a collector. Only one may be attached: a
    /// second attach answers false.
    pub fn attach(&self, on: bool) -> bool {
        let mut s = self.lock();
        if on && s.attached {
            return false;
        }
        s.attached = on;
        self.room.notify_all();
        true
    }

    /// Queues stdin bytes (and, with `eof`, the end of stdin). Fails when
    /// the process's stdin is closed or too much is already queued.
    pub fn give_stdin(&self, data: &[u8], eof: bool) -> Result<(), String> {
        let mut s = self.lock();
        if s.stdin_closed || (s.stdin_eof && !data.is_empty()) {
            return Err(format!("process {}'s stdin is closed", self.pid));
        }
        if s.stdin.len() + data.len() > MAX_STDIN_QUEUED {
            return Err(format!(
                "process {} is not reading its stdin: {} bytes are already queued (limit {MAX_STDIN_QUEUED})",
                self.pid,
                s.stdin.len()
            ));
        }
        s.stdin.extend_from_slice(data);
        s.stdin_eof |= eof;
        drop(s);
        self.wake.poke();
        Ok(())
    }

    /// Bytes of stdin queued and not yet taken by the process.
    pub fn stdin_queued(&self) -> usize {
        self.lock().stdin.len()
    }

    /// Signals its process group.
    pub fn signal(&self, sig: i32) {
        if self.lock().exit.is_none() {
            kill_group(self.pid, sig);
        }
    }

    /// Resizes its terminal; false when it has none.
    pub fn resize(&self, size: PtySize) -> io::Result<bool> {
        match &self.pty {
            Some(m) => launch::resize(m, size).map(|()| true),
            None => Ok(false),
        }
    }

    /// Whether it has ended.
    pub fn ended(&self) -> bool {
        self.lock().exit.is_some()
    }
}

fn pollfd(fd: RawFd, events: i16) -> libc::pollfd {
    libc::pollfd {
        fd,
        events,
        revents: 0,
    }
}

/// The pump: output into the queue, queued stdin into the process, the
/// exit into the state, the deadline enforced.
fn pump(p: &Proc, l: Launched, deadline: Option<Instant>) {
    let Launched {
        pid,
        slot,
        stdin,
        mut out,
        mut err,
        pty,
        started,
    } = l;
    let on_pty = pty.is_some();
    let mut stdin = stdin.and_then(|f| set_nonblocking(f).ok());
    let mut exited_at: Option<Instant> = None;
    let mut buf = vec![0u8; READ_CHUNK];
    loop {
        let now = Instant::now();
        if exited_at.is_none() && slot.status().is_some() {
            exited_at = Some(now);
        }
        let drained = out.is_none() && err.is_none();
        if exited_at.is_some_and(|t| drained || now >= t + DRAIN_AFTER_EXIT) {
            break;
        }
        if let Some(d) = deadline {
            if exited_at.is_none() && now >= d {
                let mut s = p.lock();
                if !s.timed_out {
                    s.timed_out = true;
                    kill_group(pid, libc::SIGKILL);
                }
            }
        }
        feed_stdin(p, &mut stdin, on_pty);
        wait_for_room(p, &slot);
        let stdin_pending = stdin.is_some() && !p.lock().stdin.is_empty();
        let mut fds = [
            pollfd(
                if exited_at.is_none() {
                    slot.notify_fd()
                } else {
                    -1
                },
                libc::POLLIN,
            ),
            pollfd(p.wake.r.as_raw_fd(), libc::POLLIN),
            pollfd(out.as_ref().map_or(-1, |f| f.as_raw_fd()), libc::POLLIN),
            pollfd(err.as_ref().map_or(-1, |f| f.as_raw_fd()), libc::POLLIN),
            pollfd(
                if stdin_pending {
                    stdin.as_ref().map_or(-1, |f| f.as_raw_fd())
                } else {
                    -1
                },
                libc::POLLOUT,
            ),
        ];
        let wake_at = match (exited_at, deadline) {
            (Some(t), _) => t + DRAIN_AFTER_EXIT,
            (None, Some(d)) if d > now => d,
            _ => now + Duration::from_secs(1),
        };
        let wait_ms = wake_at
            .saturating_duration_since(now)
            .as_millis()
            .clamp(1, 1000) as i32;
        // SAFETY: `fds` is a valid array of pollfd of the length given.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, wait_ms) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                log!("pump of {pid}: poll failed: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
            continue;
        }
        if fds[1].revents != 0 {
            p.wake.drain();
        }
        for (i, stream) in [(2usize, Stream::Stdout), (3, Stream::Stderr)] {
            if fds[i].revents == 0 {
                continue;
            }
            let pipe = if i == 2 { &mut out } else { &mut err };
            let Some(f) = pipe.as_mut() else { continue };
            match f.read(&mut buf) {
                Ok(n) if n > 0 => keep(p, stream, &buf[..n]),
                // A terminal's master shares its copy's O_NONBLOCK.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // End of file, or EIO: a terminal whose every slave side has closed.
                _ => *pipe = None,
            }
        }
    }
    drop((out, err, stdin));
    let status = slot.wait_timeout(Duration::from_secs(10)).or_else(|| {
        kill_group(pid, libc::SIGKILL);
        slot.wait_timeout(Duration::from_secs(5))
    });
    let (code, signal) = match status {
        Some(s) if libc::WIFEXITED(s) => (Some(libc::WEXITSTATUS(s)), None),
        Some(s) if libc::WIFSIGNALED(s) => (None, Some(libc::WTERMSIG(s))),
        _ => (None, None),
    };
    let mut s = p.lock();
    s.exit = Some(ExitStatus {
        code,
        signal,
        timed_out: s.timed_out,
        duration_ms: started.elapsed().as_millis() as u64,
        dropped_bytes: 0,
    });
    s.stdin_closed = true;
    drop(s);
    p.news.poke();
}

/// With a collector attached and the queue full, waits until the collector
/// takes some (or leaves, or the process ends).
fn wait_for_room(p: &Proc, slot: &Slot) {
    let mut s = p.lock();
    while s.attached && s.kept >= BG_OUTPUT_MAX && slot.status().is_none() {
        s = p
            .room
            .wait_timeout(s, Duration::from_millis(200))
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
}

/// Queues an output chunk; with no collector attached, drops the oldest
/// output past [`BG_OUTPUT_MAX`].
fn keep(p: &Proc, stream: Stream, data: &[u8]) {
    let mut s = p.lock();
    s.kept += data.len();
    s.chunks.push_back((stream, data.to_vec()));
    if !s.attached {
        while s.kept > BG_OUTPUT_MAX {
            let Some((_, old)) = s.chunks.pop_front() else {
                break;
            };
            s.kept -= old.len();
            s.dropped += old.len() as u64;
        }
    }
    drop(s);
    p.news.poke();
}

/// Writes what it can of the queued stdin without blocking; closes stdin
/// (or, on a terminal, sends the EOF character) once an end was asked and
/// everything before it is written.
fn feed_stdin(p: &Proc, stdin: &mut Option<File>, on_pty: bool) {
    let mut s = p.lock();
    let Some(f) = stdin.as_mut() else {
        s.stdin.clear();
        s.stdin_closed = true;
        return;
    };
    while !s.stdin.is_empty() {
        match f.write(&s.stdin) {
            Ok(n) => {
                s.stdin.drain(..n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => {
                // The process closed its stdin.
                s.stdin.clear();
                s.stdin_closed = true;
                *stdin = None;
                return;
            }
        }
    }
    if s.stdin_eof && !s.stdin_closed {
        if on_pty {
            let _ = f.write(&[VEOF]);
            s.stdin_eof = false;
        } else {
            s.stdin_closed = true;
            *stdin = None;
        }
    }
}

fn set_nonblocking(f: File) -> io::Result<File> {
    // SAFETY: fcntl on an fd we own; reads and sets flags, no memory involved.
    unsafe {
        let fl = libc::fcntl(f.as_raw_fd(), libc::F_GETFL);
        if fl < 0 || libc::fcntl(f.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(f)
}

/// Kills the group of a process whose exec connection went away, and
/// forgets it once it has ended.
pub fn kill_and_forget(p: &Arc<Proc>) {
    p.signal(libc::SIGKILL);
    p.attach(false);
    let me = p.clone();
    // The pump records the exit shortly; forget it then, off this thread.
    let _ = std::thread::Builder::new()
        .name("reap".into())
        .spawn(move || {
            let until = Instant::now() + Duration::from_secs(15);
            while !me.ended() && Instant::now() < until {
                std::thread::sleep(Duration::from_millis(20));
            }
            table().forget(me.pid);
        });
}
