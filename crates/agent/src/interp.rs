//! The warm interpreter: one long-lived `python3` running an embedded driver
//! script that executes every eval in one globals dict. It starts (and runs
//! the warm-up recipe) when the agent starts, so a snapshot taken once ping
//! says `interpreter_ready` carries the warmed interpreter to every child.

use std::io;
use std::os::fd::AsRawFd;
use std::process::{ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proto::agent::{read_frame, write_frame, ErrorCode, EvalResult, Reply, MAX_FRAME};

use crate::children::{children, kill_group, kill_pid, Slot};
use crate::log::log;
use std::os::unix::process::CommandExt;

/// The driver script run by `python3 -c`.
const DRIVER: &str = include_str!("driver.py");
/// How long an interrupted eval has to answer before the interpreter is killed.
const INTERRUPT_GRACE: Duration = Duration::from_secs(3);
/// How long the warm-up recipe may run.
const WARM_TIMEOUT: Duration = Duration::from_secs(900);

struct Proc {
    pid: i32,
    slot: Arc<Slot>,
    to: ChildStdin,
    from: ChildStdout,
}

/// The interpreter and its state.
pub struct Interpreter {
    python: String,
    warm: Option<String>,
    proc: Mutex<Option<Proc>>,
    ready: AtomicBool,
    error: Mutex<Option<String>>,
}

enum RunError {
    /// Could not talk to the interpreter; it is gone.
    Dead(String),
    /// Killed at the timeout; state lost.
    Killed,
}

impl Interpreter {
    /// An interpreter run by `python` and warmed by `warm` (not started yet).
    pub fn new(python: String, warm: Option<String>) -> Arc<Interpreter> {
        Arc::new(Interpreter {
            python,
            warm,
            proc: Mutex::new(None),
            ready: AtomicBool::new(false),
            error: Mutex::new(None),
        })
    }

    /// Starts the interpreter and runs the warm-up on a background thread.
    pub fn start_background(self: &Arc<Self>) {
        let me = self.clone();
        let r = std::thread::Builder::new()
            .name("interp-start".into())
            .spawn(move || {
                let mut g = me.proc.lock().unwrap_or_else(|e| e.into_inner());
                me.ensure_started(&mut g);
            });
        if let Err(e) = r {
            log!("no thread to start the interpreter: {e}");
        }
    }

    /// (ready, why not).
    pub fn readiness(&self) -> (bool, Option<String>) {
        let err = self.error.lock().unwrap_or_else(|e| e.into_inner()).clone();
        (self.ready.load(Ordering::SeqCst), err)
    }

    fn set_error(&self, e: Option<String>) {
        *self.error.lock().unwrap_or_else(|e| e.into_inner()) = e;
    }

    fn spawn(&self) -> io::Result<Proc> {
        let mut cmd = Command::new(&self.python);
        cmd.arg("-c")
            .arg(DRIVER)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .process_group(0);
        let (mut child, slot) = children().spawn(&mut cmd)?;
        let to = child.stdin.take().expect("stdin is piped");
        let from = child.stdout.take().expect("stdout is piped");
        Ok(Proc {
            pid: child.id() as i32,
            slot,
            to,
            from,
        })
    }

    /// Starts the interpreter if it is not running, and warms it.
    fn ensure_started(&self, g: &mut Option<Proc>) -> bool {
        if let Some(p) = g.as_ref() {
            if p.slot.status().is_none() {
                return true;
            }
            *g = None;
        }
        self.ready.store(false, Ordering::SeqCst);
        let mut p = match self.spawn() {
            Ok(p) => p,
            Err(e) => {
                let msg = format!("cannot start {:?}: {e}", self.python);
                log!("{msg}");
                self.set_error(Some(msg));
                return false;
            }
        };
        if let Some(code) = &self.warm {
            let t = Instant::now();
            match run(&mut p, code, WARM_TIMEOUT) {
                Ok(r) if r.exit_code == 0 => {
                    log!("interpreter warmed in {} ms", t.elapsed().as_millis());
                    self.set_error(None);
                }
                Ok(r) => {
                    let msg = format!(
                        "the warm-up recipe failed (exit code {}): {}",
                        r.exit_code,
                        r.error.unwrap_or_default()
                    );
                    log!("{msg}");
                    self.set_error(Some(msg));
                    *g = Some(p);
                    return true;
                }
                Err(RunError::Dead(e)) => {
                    let msg = format!("the interpreter died during warm-up: {e}");
                    log!("{msg}");
                    self.set_error(Some(msg));
                    return false;
                }
                Err(RunError::Killed) => {
                    let msg = "the warm-up recipe ran past its timeout".to_string();
                    log!("{msg}");
                    self.set_error(Some(msg));
                    return false;
                }
            }
        } else {
            self.set_error(None);
        }
        *g = Some(p);
        self.ready.store(true, Ordering::SeqCst);
        true
    }

    /// Runs `code`; the answer is an eval frame or an error frame.
    pub fn eval(&self, code: &str, timeout: Duration) -> Reply {
        let mut g = self.proc.lock().unwrap_or_else(|e| e.into_inner());
        if !self.ensure_started(&mut g) {
            let why = self.readiness().1.unwrap_or_default();
            return Reply::error(
                ErrorCode::Internal,
                format!("the interpreter is not available: {why}"),
            );
        }
        let p = g.as_mut().expect("started above");
        match run(p, code, timeout) {
            Ok(r) => Reply::Eval(r),
            Err(RunError::Dead(e)) => {
                stop(p);
                *g = None;
                self.ready.store(false, Ordering::SeqCst);
                Reply::error(
                    ErrorCode::Internal,
                    format!("the interpreter died ({e}); it restarts on the next eval, without its state"),
                )
            }
            Err(RunError::Killed) => {
                *g = None;
                self.ready.store(false, Ordering::SeqCst);
                Reply::error(
                    ErrorCode::Timeout,
                    format!(
                        "the eval ran past {} ms and did not stop when interrupted; the interpreter was killed and restarts on the next eval, without its state",
                        timeout.as_millis()
                    ),
                )
            }
        }
    }
}

fn stop(p: &Proc) {
    kill_group(p.pid, libc::SIGKILL);
    p.slot.wait_timeout(Duration::from_secs(5));
}

/// Waits until `fd` is readable or `timeout` passes.
fn readable(fd: i32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = left.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n > 0 {
            return true;
        }
        if n == 0 || Instant::now() >= deadline {
            return false;
        }
    }
}

fn run(p: &mut Proc, code: &str, timeout: Duration) -> Result<EvalResult, RunError> {
    let req = serde_json::json!({ "code": code });
    write_frame(&mut p.to, &req, &[]).map_err(|e| RunError::Dead(e.to_string()))?;
    let fd = p.from.as_raw_fd();
    let mut interrupted = false;
    if !readable(fd, timeout) {
        interrupted = true;
        kill_pid(p.pid, libc::SIGINT);
        if !readable(fd, INTERRUPT_GRACE) {
            stop(p);
            return Err(RunError::Killed);
        }
    }
    let frame = read_frame(&mut p.from, MAX_FRAME).map_err(|e| RunError::Dead(e.to_string()))?;
    let mut r: EvalResult = frame
        .parse()
        .map_err(|e| RunError::Dead(format!("bad answer from the driver: {e}")))?;
    if interrupted && r.error.is_none() {
        r.error = Some(format!("the eval ran past {} ms", timeout.as_millis()));
        r.exit_code = 1;
    }
    Ok(r)
}
