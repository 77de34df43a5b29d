//! The control socket: one JSON request per line in, one JSON response per
//! line out, a thread per open connection. Requests are bounded in size.
//!
//! The listener is served by the thread that waits for the machine (the
//! main thread), in one poll with the machine's own events (the guest's
//! reset line, its stop): a VM process runs its vCPU threads, this thread,
//! and a thread per open connection, nothing else. A connection's thread
//! waits for the next connection when its own closes ([`Workers`]): clients
//! that connect again and again do not pay for a thread each time, and a
//! process can start one before it serves (a fork server's pooled child).

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;

use proto::control::{ControlRequest, ControlResponse, MAX_REQUEST_BYTES};
use vmm::kvm::vcpu::ExitReason;
use vmm::machine::Machine;

/// Default wait for a guest answer.
const DEFAULT_GUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Binds the control socket at `path`, replacing a stale socket file.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    UnixListener::bind(path).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot bind the control socket {}: {e}", path.display()),
        )
    })
}

/// The threads that serve control connections, one connection at a time
/// each; one that is done with a connection waits for the next.
pub struct Workers {
    shared: Arc<WorkersShared>,
}

struct WorkersShared {
    state: Mutex<WorkersState>,
    more: Condvar,
    /// The machine they serve: set when serving starts (a worker may be
    /// started before the machine exists).
    machine: OnceLock<Arc<Machine>>,
}

#[derive(Default)]
struct WorkersState {
    /// Accepted connections no worker has taken yet.
    queue: VecDeque<UnixStream>,
    /// Workers waiting for a connection.
    idle: usize,
}

impl Default for Workers {
    fn default() -> Self {
        Self::new()
    }
}

impl Workers {
    /// No worker yet: the first connection starts one.
    pub fn new() -> Self {
        Workers {
            shared: Arc::new(WorkersShared {
                state: Mutex::new(WorkersState::default()),
                more: Condvar::new(),
                machine: OnceLock::new(),
            }),
        }
    }

    /// Starts a worker that waits for a connection; returns its kernel
    /// thread id once it runs (it inherits the caller's scheduling, which
    /// a caller that changes its own afterwards may set back through it).
    pub fn start_one(&self) -> std::io::Result<libc::pid_t> {
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        self.spawn(Some(tid_tx))?;
        tid_rx
            .recv()
            .map_err(|_| std::io::Error::other("a control worker ended as it started"))
    }

    fn spawn(&self, tid: Option<std::sync::mpsc::Sender<libc::pid_t>>) -> std::io::Result<()> {
        let shared = self.shared.clone();
        // A worker started by a confined control thread holds its filter
        // already; one started before the machine was built takes it.
        let inherit = vmm::seccomp::entered() == Some(vmm::seccomp::Kind::Control);
        std::thread::Builder::new()
            .name("control-conn".into())
            .spawn(move || {
                if inherit {
                    vmm::seccomp::inherited(vmm::seccomp::Kind::Control);
                } else {
                    vmm::seccomp::enter_or_exit(vmm::seccomp::Kind::Control);
                }
                if let Some(tid) = tid {
                    // SAFETY: gettid has no preconditions.
                    let _ = tid.send(unsafe { libc::gettid() });
                }
                shared.work();
            })
            .map(drop)
    }

    /// Hands `stream` to an idle worker, or to a new one.
    fn dispatch(&self, stream: UnixStream) -> std::io::Result<()> {
        let mut state = self.shared.lock();
        state.queue.push_back(stream);
        let spawn = state.queue.len() > state.idle;
        drop(state);
        self.shared.more.notify_one();
        if spawn {
            if let Err(e) = self.spawn(None) {
                // Nobody will take it: drop it rather than leave the client waiting.
                self.shared.lock().queue.pop_back();
                return Err(e);
            }
        }
        Ok(())
    }
}

impl WorkersShared {
    fn lock(&self) -> std::sync::MutexGuard<'_, WorkersState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A worker's life: take a connection, serve it, wait for the next.
    fn work(&self) {
        loop {
            let mut state = self.lock();
            let stream = loop {
                if let Some(s) = state.queue.pop_front() {
                    break s;
                }
                state.idle += 1;
                state = self.more.wait(state).unwrap_or_else(|e| e.into_inner());
                state.idle -= 1;
            };
            drop(state);
            match self.machine.get() {
                Some(machine) => connection(stream, machine),
                // Dispatch comes after the machine is set: not reached.
                None => drop(stream),
            }
        }
    }
}

/// Serves `listener` (when there is one) on the calling thread until the
/// machine stops, acting on its events meanwhile; returns why it stopped.
/// Connections are served by `workers`. When the listener fails, the
/// machine is shut down and the reason says so.
pub fn serve_until_exit(
    listener: Option<UnixListener>,
    machine: &Arc<Machine>,
    workers: &Workers,
) -> ExitReason {
    let Some(listener) = listener else {
        return machine.wait_for_exit();
    };
    let _ = workers.shared.machine.set(machine.clone());
    if let Err(e) = listener.set_nonblocking(true) {
        return fail(machine, format!("cannot serve the control socket: {e}"));
    }
    let [reset, exit] = machine.event_fds();
    loop {
        if let Some(reason) = machine.handle_events() {
            return reason;
        }
        let mut fds = [listener.as_raw_fd(), reset, exit].map(|fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        });
        // SAFETY: `fds` is a valid array of pollfd of the length given.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return fail(machine, format!("cannot wait for the control socket: {e}"));
        }
        if fds[0].revents == 0 {
            continue;
        }
        loop {
            match listener.accept() {
                Ok((stream, _)) => {
                    // Accepted sockets do not inherit O_NONBLOCK on Linux.
                    if let Err(e) = workers.dispatch(stream) {
                        eprintln!("forkd-vmm: cannot serve a control connection: {e}");
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                // A client that went away before its turn: next one.
                Err(e) if matches!(e.raw_os_error(), Some(libc::ECONNABORTED | libc::EPROTO)) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                // Out of descriptors or memory for now: the pending clients
                // wait in the backlog; try again shortly rather than spin.
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
                    ) =>
                {
                    std::thread::sleep(Duration::from_millis(10));
                    break;
                }
                Err(e) => return fail(machine, format!("cannot serve the control socket: {e}")),
            }
        }
    }
}

/// Shuts the machine down because its control socket cannot be served.
fn fail(machine: &Machine, message: String) -> ExitReason {
    eprintln!("forkd-vmm: {message}");
    machine.shutdown();
    machine.wait_for_exit()
}

fn connection(stream: UnixStream, machine: &Machine) {
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = Vec::new();
        // Read one byte past the limit to tell an over-long line from a full one.
        match (&mut reader)
            .take(MAX_REQUEST_BYTES as u64 + 1)
            .read_until(b'\n', &mut line)
        {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let mut shutdown = false;
        let response = if line.last() != Some(&b'\n') {
            let too_long = line.len() > MAX_REQUEST_BYTES;
            let message = if too_long {
                format!("request longer than {MAX_REQUEST_BYTES} bytes")
            } else {
                "request not terminated by a newline".to_owned()
            };
            let _ = reply(&mut writer, &ControlResponse::Error { message });
            return;
        } else {
            match serde_json::from_slice::<ControlRequest>(&line) {
                // Answer before shutting down: the process exits right after.
                Ok(ControlRequest::Shutdown) => {
                    shutdown = true;
                    ControlResponse::Ok
                }
                Ok(request) => handle(request, machine),
                Err(e) => ControlResponse::Error {
                    message: format!("bad request: {e}"),
                },
            }
        };
        let replied = reply(&mut writer, &response);
        if shutdown {
            machine.shutdown();
        }
        if replied.is_err() {
            return;
        }
    }
}

fn reply(writer: &mut UnixStream, response: &ControlResponse) -> std::io::Result<()> {
    let mut out = serde_json::to_vec(response)?;
    out.push(b'\n');
    writer.write_all(&out)
}

fn handle(request: ControlRequest, machine: &Machine) -> ControlResponse {
    let error = |e: &dyn std::fmt::Display| ControlResponse::Error {
        message: e.to_string(),
    };
    match request {
        ControlRequest::Pause => machine
            .pause()
            .map_or_else(|e| error(&e), |()| ControlResponse::Ok),
        ControlRequest::Resume => machine
            .resume()
            .map_or_else(|e| error(&e), |()| ControlResponse::Ok),
        ControlRequest::Status => ControlResponse::Status(machine.status()),
        ControlRequest::Shutdown => {
            machine.shutdown();
            ControlResponse::Ok
        }
        ControlRequest::Guest {
            request,
            timeout_ms,
        } => {
            let timeout = timeout_ms.map_or(DEFAULT_GUEST_TIMEOUT, Duration::from_millis);
            match machine.guest_request(&request, timeout) {
                Ok(response) => ControlResponse::Guest { response },
                Err(e) => error(&e),
            }
        }
        ControlRequest::Snapshot {
            dir,
            leave_paused,
            mode,
            wait,
            measure_diff,
        } => match machine.snapshot(&dir, leave_paused, mode, wait, measure_diff) {
            Ok(done) => ControlResponse::Snapshot {
                meta: Box::new(done.meta),
                pause_ms: done.pause.map(|d| d.as_secs_f64() * 1e3),
                diff: done.diff,
            },
            Err(e) => error(&e),
        },
        ControlRequest::Peek { addr, len } => match machine.peek(addr, len) {
            Ok(bytes) => ControlResponse::Peek {
                hex: bytes.iter().map(|b| format!("{b:02x}")).collect(),
            },
            Err(e) => error(&e),
        },
        ControlRequest::ThreadsSelfTest { threads } => {
            threads_self_test(threads.min(proto::control::MAX_SELF_TEST_THREADS))
        }
        ControlRequest::SeccompSelfTest => {
            let errno = crate::seccomp::forbidden_call();
            error(&format!(
                "the forbidden call went through (it failed with {errno}, as an unconfined \
                 process's does): this VMM's filters do not enforce (--seccomp off or log)"
            ))
        }
    }
}

/// [`ControlRequest::ThreadsSelfTest`]: starts up to `n` threads that wait
/// on a gate this thread holds, then opens it and joins them.
fn threads_self_test(n: u32) -> ControlResponse {
    let gate = Arc::new(std::sync::RwLock::new(()));
    let held = gate.write().unwrap_or_else(|p| p.into_inner());
    let mut started = Vec::new();
    let mut refused = None;
    for _ in 0..n {
        let gate = gate.clone();
        // Small stacks: the test is about tasks, not memory.
        match std::thread::Builder::new()
            .stack_size(64 << 10)
            .spawn(move || drop(gate.read()))
        {
            Ok(t) => started.push(t),
            Err(e) => {
                refused = Some(e.to_string());
                break;
            }
        }
    }
    drop(held);
    let count = started.len() as u32;
    for t in started {
        let _ = t.join();
    }
    ControlResponse::Threads {
        started: count,
        refused,
    }
}
