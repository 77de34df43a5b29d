//! Where each kind of thread takes its seccomp filter.
//!
//! The library starts the threads; the binary decides what they may call
//! (forkd-vmm's `seccomp` module compiles one filter per [`Kind`] and
//! hands them over with [`install`]). Each thread takes its kind's filter
//! as its first step ([`enter`]): vCPU threads before their first
//! `KVM_RUN`, device workers before their first event, copy threads
//! before their first page. A process that never installs filters (a unit
//! test, a library user) runs its threads unfiltered.
//!
//! Filters stack: a thread keeps its creator's filter and adds its own.
//! vCPU threads start device workers (a driver sets DRIVER_OK from a
//! vCPU); control threads start copy threads.

use std::sync::{mpsc, Mutex, OnceLock};
use std::thread::JoinHandle;

use seccompiler::BpfProgram;

/// The kinds of thread, each with a filter of its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The main thread once the machine is built, and the control
    /// connection workers: snapshots, branches, guest requests.
    Control,
    /// A vCPU thread: `KVM_RUN` and the device emulation on its exits.
    Vcpu,
    /// A virtio device worker (its queues, its backend: a file, a tap,
    /// the vsock's Unix sockets), and the built-in guest's interrupt
    /// relay.
    Device,
    /// A live branch's copy threads (fault handling, bulk copy, pre-copy,
    /// the finish after the pause).
    Copy,
}

impl Kind {
    /// Every kind.
    pub const ALL: [Kind; 4] = [Kind::Control, Kind::Vcpu, Kind::Device, Kind::Copy];
}

/// A filter the kernel refused.
#[derive(Debug, thiserror::Error)]
#[error(
    "cannot install the seccomp filter of {kind:?} threads: {source} (a kernel without \
     CONFIG_SECCOMP_FILTER cannot confine a VMM; --seccomp off is for debugging only)"
)]
pub struct Error {
    /// The thread's kind.
    pub kind: Kind,
    /// Why.
    #[source]
    pub source: seccompiler::Error,
}

static FILTERS: OnceLock<Vec<(Kind, BpfProgram)>> = OnceLock::new();

thread_local! {
    /// The filter the calling thread took last, or inherited.
    static ENTERED: std::cell::Cell<Option<Kind>> = const { std::cell::Cell::new(None) };
}

/// The kind whose filter the calling thread holds last ([`enter`] or
/// [`inherited`]); `None` for a thread without one.
pub fn entered() -> Option<Kind> {
    ENTERED.with(|e| e.get())
}

/// Records that the calling thread holds `kind`'s filter already: its
/// creator held it (a filter passes to the threads a thread starts), and
/// taking it again would only cost time.
pub fn inherited(kind: Kind) {
    ENTERED.with(|e| e.set(Some(kind)));
}

/// Hands over the filters of this process (once; a later call is
/// ignored and says so with `false`). A forked child keeps them.
pub fn install(filters: Vec<(Kind, BpfProgram)>) -> bool {
    FILTERS.set(filters).is_ok()
}

/// Whether filters were installed.
pub fn installed() -> bool {
    FILTERS.get().is_some_and(|f| !f.is_empty())
}

/// Gives the calling thread `kind`'s filter (nothing when none was
/// installed). Once it returns `Ok`, the thread and every thread it
/// starts are confined for good; `no_new_privs` is set first.
pub fn enter(kind: Kind) -> Result<(), Error> {
    let Some(program) = FILTERS
        .get()
        .and_then(|f| f.iter().find(|(k, _)| *k == kind))
        .map(|(_, p)| p)
    else {
        return Ok(());
    };
    seccompiler::apply_filter(program).map_err(|source| Error { kind, source })?;
    inherited(kind);
    Ok(())
}

/// Work for a thread started ahead.
type Job = Box<dyn FnOnce() + Send>;

/// A thread started ahead that holds its kind's filter and waits for the
/// work of a thread of that kind ([`spawn`]).
struct Waiting {
    kind: Kind,
    job: mpsc::SyncSender<Job>,
    handle: JoinHandle<()>,
}

static WAITING: Mutex<Vec<Waiting>> = Mutex::new(Vec::new());

/// Starts `n` threads of `kind` ahead: each takes its filter now and
/// waits for the work [`spawn`] hands it. Taking a filter costs about a
/// microsecond per BPF instruction (the kernel checks and compiles the
/// program: 0.4-0.6 ms for these), which a process that prepares its
/// machine ahead of a request (a pooled fork child) pays here instead of
/// on the request's path; a thread started later inherits nothing it
/// would not take again. Nothing to do when no filters were installed.
pub fn start_ahead(kind: Kind, n: usize) -> std::io::Result<()> {
    if !installed() {
        return Ok(());
    }
    let (took, taken) = mpsc::channel::<()>();
    for _ in 0..n {
        let (job, jobs) = mpsc::sync_channel::<Job>(1);
        let took = took.clone();
        let handle = std::thread::Builder::new()
            .name("ahead".into())
            .spawn(move || {
                enter_or_exit(kind);
                let _ = took.send(());
                drop(took);
                // No work (the process ends first): the thread ends.
                if let Ok(work) = jobs.recv() {
                    work();
                }
            })?;
        lock_waiting().push(Waiting { kind, job, handle });
    }
    drop(took);
    // Back once every thread holds its filter: the work is done here,
    // not later beside whatever the process does next.
    for _ in taken.iter() {}
    Ok(())
}

/// Starts threads of `kind` ahead ([`start_ahead`]) until `n` wait.
pub fn top_up(kind: Kind, n: usize) -> std::io::Result<()> {
    let have = lock_waiting().iter().filter(|w| w.kind == kind).count();
    start_ahead(kind, n.saturating_sub(have))
}

/// Copy threads a live branch starts inside its pause (its fault handler
/// and its bulk copy), kept started ahead by a machine that can branch
/// live.
pub const COPY_THREADS_IN_PAUSE: usize = 2;

fn lock_waiting() -> std::sync::MutexGuard<'static, Vec<Waiting>> {
    WAITING.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs `f` on a thread of `kind` named `name` (at most 15 bytes show):
/// one started ahead ([`start_ahead`]) when there is one, else a new
/// thread that takes its filter first.
pub fn spawn(
    kind: Kind,
    name: String,
    f: impl FnOnce() + Send + 'static,
) -> std::io::Result<JoinHandle<()>> {
    let waiting = {
        let mut all = lock_waiting();
        all.iter()
            .position(|w| w.kind == kind)
            .map(|i| all.swap_remove(i))
    };
    let thread_name = name.clone();
    let mut job: Job = Box::new(move || {
        set_thread_name(&thread_name);
        f()
    });
    if let Some(w) = waiting {
        match w.job.send(job) {
            Ok(()) => return Ok(w.handle),
            // It ended (it could not take its filter and the process is
            // ending): a new thread takes the work, and says why.
            Err(mpsc::SendError(back)) => job = back,
        }
    }
    std::thread::Builder::new().name(name).spawn(move || {
        enter_or_exit(kind);
        job()
    })
}

/// Names the calling thread (`comm`, at most 15 bytes; a process's main
/// thread names the process).
pub fn set_thread_name(name: &str) {
    let mut buf = [0u8; 16];
    let len = name.len().min(15);
    buf[..len].copy_from_slice(&name.as_bytes()[..len]);
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16
    // bytes, which `buf` is.
    unsafe { libc::prctl(libc::PR_SET_NAME, buf.as_ptr()) };
}

/// [`enter`] for a thread that has nobody to report a failure to (a
/// device worker, a copy thread, a control worker): a VMM that cannot
/// confine one of its threads says so and ends, rather than run it
/// unconfined.
pub fn enter_or_exit(kind: Kind) {
    if let Err(e) = enter(kind) {
        eprintln!("forkd-vmm: {e}; the VMM stops");
        std::process::exit(1);
    }
}
