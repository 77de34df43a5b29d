//! vCPUs: their threads, the run loop and exit handling, and the
//! pause/resume/stop protocol shared by all vCPUs of a VM.
//!
//! Getting a vCPU out of `KVM_RUN` from another thread takes a signal: each
//! vCPU thread records a pointer to its `kvm_run.immediate_exit` in a
//! thread-local, and the (otherwise empty) handler of [`kick_signal`] sets
//! it. Whether the signal lands inside `KVM_RUN` (which then returns EINTR)
//! or just before it (which then returns at once), the vCPU comes back to
//! the top of its loop and sees what was asked.

use std::any::Any;
use std::cell::Cell;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Once};
use std::time::{Duration, Instant};

use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::eventfd::EventFd;

/// Why a VM stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// Shut down on request from the control socket.
    Requested,
    /// The guest reset itself (i8042 reset, triple fault, or a reset system event).
    GuestReset,
    /// The guest powered off (a shutdown system event).
    GuestPowerOff,
    /// The built-in guest reported a fatal error.
    GuestPanic(u32),
    /// A vCPU halted with no way to wake it.
    Halted,
    /// KVM or the VMM failed.
    Error(String),
}

impl std::fmt::Display for ExitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitReason::Requested => write!(f, "shut down on request"),
            ExitReason::GuestReset => write!(f, "the guest reset (reboot or triple fault)"),
            ExitReason::GuestPowerOff => write!(f, "the guest powered off"),
            ExitReason::GuestPanic(code) => {
                write!(f, "the built-in guest panicked with code {code}")
            }
            ExitReason::Halted => write!(f, "a vCPU halted with interrupts off"),
            ExitReason::Error(e) => write!(f, "error: {e}"),
        }
    }
}

const WANT_RUN: u8 = 0;
const WANT_PAUSE: u8 = 1;
const WANT_STOP: u8 = 2;

/// Work for paused vCPU threads: each runs it on its own vCPU and leaves
/// the result in its slot.
type VcpuTask = Arc<dyn Fn(u8, &mut VcpuFd) -> Box<dyn Any + Send> + Send + Sync>;

#[derive(Default)]
struct Shared {
    /// The current task for paused vCPUs, and its generation.
    task: Option<(u64, VcpuTask)>,
    /// Results of the current task, by vCPU index.
    task_results: Vec<Option<Box<dyn Any + Send>>>,
    /// vCPU threads parked in the pause loop.
    paused: usize,
    /// vCPU threads alive: counted from their spawn
    /// ([`RunControl::expect_vcpus`]), not from when they first run, so
    /// nobody has to wait for a new thread to be scheduled before a pause
    /// reaches it.
    alive: usize,
    /// pthread ids of vCPU threads in their run loop, for kicking. A thread
    /// not in the list yet has not read [`RunControl`]'s wish: it will.
    threads: Vec<libc::pthread_t>,
    exit_reason: Option<ExitReason>,
}

/// Errors of pause and resume.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Not every vCPU stopped in time.
    #[error("{paused} of {alive} vCPUs paused within {waited:?}; the VM is left pausing, resume it or shut it down")]
    PauseTimeout {
        /// vCPUs paused.
        paused: usize,
        /// vCPUs alive.
        alive: usize,
        /// How long we waited.
        waited: Duration,
    },
    /// The VM has stopped.
    #[error("the VM has stopped ({0})")]
    Stopped(ExitReason),
    /// Resume of a VM that is not paused.
    #[error("the VM is not paused")]
    NotPaused,
}

/// Where a vCPU's I/O exits go. The builder implements it over the
/// machine's device buses (and the built-in guest's ports); the vCPU knows
/// neither.
pub trait ExitHandler: Send + Sync {
    /// A port read: fill `data` (all ones where nothing answers).
    fn pio_read(&self, port: u16, data: &mut [u8]);
    /// A port write; `Some` ends the VM for that reason.
    fn pio_write(&self, port: u16, data: &[u8]) -> Option<ExitReason>;
    /// An MMIO read: fill `data` (all ones where nothing answers).
    fn mmio_read(&self, addr: u64, data: &mut [u8]);
    /// An MMIO write.
    fn mmio_write(&self, addr: u64, data: &[u8]);
}

/// Something a vCPU thread may block in while handling an exit (the
/// built-in guest's wait port): a pause must get it out, and a stop too.
pub trait Blocker: Send + Sync {
    /// While set, a vCPU blocked (or about to block) returns at once.
    fn set_interrupted(&self, interrupted: bool);
    /// Returns every blocked vCPU for good.
    fn stop(&self);
}

/// The run state all vCPUs of a VM follow.
pub struct RunControl {
    wanted: AtomicU8,
    shared: Mutex<Shared>,
    changed: Condvar,
    blocker: Option<Arc<dyn Blocker>>,
    /// Written once the VM stops (see [`RunControl::exit_evt`]).
    exit_evt: EventFd,
}

impl RunControl {
    /// A run control for a VM whose vCPUs may block in `blocker`; its
    /// vCPUs park before their first instruction when `paused`.
    pub fn new(blocker: Option<Arc<dyn Blocker>>, paused: bool) -> std::io::Result<Self> {
        install_kick_handler();
        if let (Some(b), true) = (&blocker, paused) {
            b.set_interrupted(true);
        }
        Ok(RunControl {
            wanted: AtomicU8::new(if paused { WANT_PAUSE } else { WANT_RUN }),
            shared: Mutex::new(Shared::default()),
            changed: Condvar::new(),
            blocker,
            exit_evt: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    /// Readable once the VM has been told to stop (for whatever reason): a
    /// thread that polls other descriptors too can wait for the end of the
    /// VM with them, then call [`RunControl::wait_for_exit`], which returns
    /// as soon as the vCPU threads are gone.
    pub fn exit_evt(&self) -> &EventFd {
        &self.exit_evt
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn kick_all(&self, shared: &Shared) {
        for &t in &shared.threads {
            // SAFETY: `t` belongs to a vCPU thread that is still running: a
            // thread removes itself from the list (under the same lock we
            // hold) before it exits.
            unsafe { libc::pthread_kill(t, kick_signal()) };
        }
    }

    /// Stops every vCPU with its state consistent and waits until they are.
    pub fn pause(&self, timeout: Duration) -> Result<(), ControlError> {
        let mut shared = self.lock();
        if let Some(r) = &shared.exit_reason {
            return Err(ControlError::Stopped(r.clone()));
        }
        self.wanted.store(WANT_PAUSE, Ordering::SeqCst);
        if let Some(b) = &self.blocker {
            b.set_interrupted(true);
        }
        self.kick_all(&shared);
        let start = Instant::now();
        while shared.paused < shared.alive && shared.exit_reason.is_none() {
            let left = timeout.saturating_sub(start.elapsed());
            if left.is_zero() {
                return Err(ControlError::PauseTimeout {
                    paused: shared.paused,
                    alive: shared.alive,
                    waited: timeout,
                });
            }
            shared = self
                .changed
                .wait_timeout(shared, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        match &shared.exit_reason {
            Some(r) => Err(ControlError::Stopped(r.clone())),
            None => Ok(()),
        }
    }

    /// Lets paused vCPUs run again.
    pub fn resume(&self) -> Result<(), ControlError> {
        let shared = self.lock();
        if let Some(r) = &shared.exit_reason {
            return Err(ControlError::Stopped(r.clone()));
        }
        if self.wanted.load(Ordering::SeqCst) != WANT_PAUSE {
            return Err(ControlError::NotPaused);
        }
        if let Some(b) = &self.blocker {
            b.set_interrupted(false);
        }
        self.wanted.store(WANT_RUN, Ordering::SeqCst);
        self.changed.notify_all();
        Ok(())
    }

    /// Ends the VM: every vCPU leaves its loop. The first reason given wins.
    pub fn stop(&self, reason: ExitReason) {
        let mut shared = self.lock();
        shared.exit_reason.get_or_insert(reason);
        self.wanted.store(WANT_STOP, Ordering::SeqCst);
        if let Some(b) = &self.blocker {
            b.stop();
        }
        self.kick_all(&shared);
        self.changed.notify_all();
        // Cannot fail short of a counter overflow, which a stop never reaches.
        let _ = self.exit_evt.write(1);
    }

    /// Whether every vCPU is parked in the pause loop.
    pub fn is_paused(&self) -> bool {
        let shared = self.lock();
        self.wanted.load(Ordering::SeqCst) == WANT_PAUSE && shared.paused == shared.alive
    }

    /// Why the VM stopped, once it has.
    pub fn exit_reason(&self) -> Option<ExitReason> {
        self.lock().exit_reason.clone()
    }

    /// Blocks until the VM has stopped and every vCPU thread is gone.
    pub fn wait_for_exit(&self) -> ExitReason {
        let mut shared = self.lock();
        loop {
            if let (Some(r), 0) = (&shared.exit_reason, shared.alive) {
                return r.clone();
            }
            shared = self.changed.wait(shared).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Counts `n` vCPU threads about to be spawned as alive, before they
    /// run: a pause from now on waits for them to park, so the spawner
    /// need not wait for them to start. Each must then run [`run_vcpu`];
    /// when fewer were spawned, [`RunControl::spawn_failed`] takes the
    /// others back.
    pub fn expect_vcpus(&self, n: usize) {
        self.lock().alive += n;
    }

    /// Takes back `n` vCPU threads counted by [`RunControl::expect_vcpus`]
    /// that could not be spawned.
    pub fn spawn_failed(&self, n: usize) {
        let mut shared = self.lock();
        shared.alive -= n;
        self.changed.notify_all();
    }

    /// Registers a vCPU thread about to run (call from that thread) for kicks.
    fn enter(&self) {
        let mut shared = self.lock();
        // SAFETY: pthread_self has no preconditions.
        shared.threads.push(unsafe { libc::pthread_self() });
    }

    /// When the VM starts paused, blocks until every vCPU thread has parked
    /// (or the VM stopped), so the VM reports `paused` from then on. A
    /// running VM does not wait: its threads were counted at spawn.
    pub fn wait_until_parked(&self) {
        if self.wanted.load(Ordering::SeqCst) != WANT_PAUSE {
            return;
        }
        let mut shared = self.lock();
        while shared.paused < shared.alive && shared.exit_reason.is_none() {
            shared = self.changed.wait(shared).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Deregisters the calling vCPU thread.
    fn leave(&self) {
        let mut shared = self.lock();
        shared.alive -= 1;
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        shared.threads.retain(|&t| t != me);
        self.changed.notify_all();
    }

    /// Parks the calling vCPU while a pause is wanted, running the tasks
    /// posted by [`RunControl::on_paused_vcpus`]. Returns false when the
    /// vCPU must stop.
    fn park_while_paused(&self, id: u8, vcpu: &mut VcpuFd) -> bool {
        let mut shared = self.lock();
        shared.paused += 1;
        self.changed.notify_all();
        let mut done_gen = shared.task.as_ref().map_or(0, |(g, _)| *g);
        while self.wanted.load(Ordering::SeqCst) == WANT_PAUSE {
            match shared.task.clone() {
                Some((gen, task)) if gen != done_gen => {
                    drop(shared);
                    let result = task(id, vcpu);
                    shared = self.lock();
                    if let Some(slot) = shared.task_results.get_mut(usize::from(id)) {
                        *slot = Some(result);
                    }
                    done_gen = gen;
                    self.changed.notify_all();
                }
                _ => shared = self.changed.wait(shared).unwrap_or_else(|e| e.into_inner()),
            }
        }
        shared.paused -= 1;
        self.wanted.load(Ordering::SeqCst) != WANT_STOP
    }

    /// Runs `task` on every vCPU's own thread while the VM is paused, and
    /// returns the results in vCPU order. The VM must be paused.
    pub fn on_paused_vcpus<R: Send + 'static>(
        &self,
        num_vcpus: usize,
        task: impl Fn(u8, &mut VcpuFd) -> R + Send + Sync + 'static,
    ) -> Result<Vec<R>, ControlError> {
        let mut shared = self.lock();
        if let Some(r) = &shared.exit_reason {
            return Err(ControlError::Stopped(r.clone()));
        }
        if self.wanted.load(Ordering::SeqCst) != WANT_PAUSE || shared.paused != shared.alive {
            return Err(ControlError::NotPaused);
        }
        let gen = shared.task.as_ref().map_or(0, |(g, _)| *g) + 1;
        let erased: VcpuTask =
            Arc::new(move |id, vcpu: &mut VcpuFd| Box::new(task(id, vcpu)) as Box<dyn Any + Send>);
        shared.task = Some((gen, erased));
        shared.task_results = (0..num_vcpus).map(|_| None).collect();
        self.changed.notify_all();
        while shared.task_results.iter().any(Option::is_none) {
            if let Some(r) = &shared.exit_reason {
                return Err(ControlError::Stopped(r.clone()));
            }
            shared = self.changed.wait(shared).unwrap_or_else(|e| e.into_inner());
        }
        let results = std::mem::take(&mut shared.task_results)
            .into_iter()
            .map(|r| {
                *r.expect("checked above")
                    .downcast::<R>()
                    .expect("results have the task's type")
            })
            .collect();
        Ok(results)
    }
}

/// What a vCPU dispatches its exits to.
pub type VcpuIo = Arc<dyn ExitHandler>;

/// The signal that kicks a vCPU thread out of `KVM_RUN`.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

thread_local! {
    /// This thread's `kvm_run.immediate_exit`, while it runs a vCPU.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Only a thread-local read and a byte store: async-signal-safe.
    let p = IMMEDIATE_EXIT.with(|c| c.get());
    if !p.is_null() {
        // SAFETY: the pointer is set by `run_vcpu` on this very thread to the
        // live kvm_run mapping of its vCPU and cleared before that mapping goes.
        unsafe { std::ptr::write_volatile(p, 1) };
    }
}

/// Installs the handler of [`kick_signal`] (once per process; every VM
/// does it when it starts). A process that forks VMs calls it before
/// forking, so its children inherit it.
pub fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler)
            .expect("registering the vCPU kick signal handler cannot fail for a real-time signal");
    });
}

/// Runs `vcpu` on the calling thread until the VM stops.
pub fn run_vcpu(mut vcpu: VcpuFd, id: u8, io: VcpuIo, control: Arc<RunControl>) {
    let immediate_exit: *mut u8 = &mut vcpu.get_kvm_run().immediate_exit;
    IMMEDIATE_EXIT.with(|c| c.set(immediate_exit));
    control.enter();
    loop {
        match control.wanted.load(Ordering::SeqCst) {
            WANT_RUN => {}
            WANT_PAUSE => {
                complete_pending_io(&mut vcpu);
                if control.park_while_paused(id, &mut vcpu) {
                    continue;
                }
                break;
            }
            _ => break,
        }
        if let Some(reason) = run_once(&mut vcpu, id, &io) {
            control.stop(reason);
            break;
        }
    }
    IMMEDIATE_EXIT.with(|c| c.set(std::ptr::null_mut()));
    control.leave();
}

/// Makes the calling thread `vcpu`'s runner, and has KVM do the work of a
/// first entry into the guest, without running guest code. A thread
/// started ahead of its VM's start (a pooled fork child's) pays for it
/// then instead of on the way to the guest's first answer.
///
/// KVM does per-thread work on the first `KVM_RUN` of a vCPU from a new
/// thread, once per VM on the first run of any of its vCPUs (it starts the
/// VM's huge page recovery kernel thread), and loads the vCPU's MMU (with
/// shadow paging, as on PVM, it allocates and fills its caches and builds
/// the roots for the guest's page tables) just before it would enter the
/// guest. This `KVM_RUN` carries a signal that is pending for it only
/// (blocked in the thread, let through by the vCPU's own signal mask):
/// KVM sees it at its last check before entering and returns `EINTR`, the
/// way a vCPU kicked just before entry does. The guest's registers are
/// compared before and after: an error says the guest ran, which no KVM
/// with the entry checks of Linux 5.11 and later does.
pub fn adopt_without_running(vcpu: &mut VcpuFd) -> Result<(), String> {
    let before = vcpu.get_regs().map_err(|e| format!("KVM_GET_REGS: {e}"))?;
    let sig = kick_signal();
    // SAFETY: sigset_t is plain data that sigemptyset/sigaddset initialise.
    let mut only_kick: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut none: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: the sets are valid sigset_t values owned here; pthread_kill
    // targets this very thread; the kick handler does nothing on a thread
    // that does not run a vCPU yet.
    unsafe {
        libc::sigemptyset(&mut only_kick);
        libc::sigaddset(&mut only_kick, sig);
        libc::sigemptyset(&mut none);
        libc::pthread_sigmask(libc::SIG_BLOCK, &only_kick, &mut old);
        libc::pthread_kill(libc::pthread_self(), sig);
    }
    let ran = set_kvm_signal_mask(vcpu, Some(&none))
        .map_err(|e| format!("KVM_SET_SIGNAL_MASK: {e}"))
        .map(|()| vcpu.run().map(|_| ()));
    let _ = set_kvm_signal_mask(vcpu, None);
    // SAFETY: `only_kick` and `old` are valid sets; a zero timeout makes
    // sigtimedwait take the pending signal without waiting.
    unsafe {
        let zero = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        libc::sigtimedwait(&only_kick, std::ptr::null_mut(), &zero);
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
    }
    let after = vcpu.get_regs().map_err(|e| format!("KVM_GET_REGS: {e}"))?;
    match ran? {
        Err(e) if e.errno() == libc::EINTR && before.rip == after.rip => Ok(()),
        Err(e) if e.errno() != libc::EINTR => Err(format!("KVM_RUN: {e}")),
        _ => Err(format!(
            "the guest ran (rip {:#x} to {:#x}) on a KVM_RUN meant to stop before entry",
            before.rip, after.rip
        )),
    }
}

/// What [`run_ahead_to_wait`] does with a port access of the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AheadPort {
    /// A read that waits for work: the guest is idle; the run ahead ends
    /// here, the read answered "nothing" (zero), which the guest takes as
    /// a wake-up without work.
    Wait,
    /// A write with no effect on a machine that has not started (a
    /// completion signal nobody waits for): the guest goes on.
    NoEffect,
    /// Anything else: the guest cannot be run ahead.
    Refuse,
}

/// Longest a guest may run ahead before it waits, in CPU time of the
/// vCPU's thread (a pooled child prepares at `SCHED_IDLE` and may wait
/// long for a CPU): a guest still running then was not idle, and the run
/// ahead fails.
const AHEAD_LIMIT: Duration = Duration::from_millis(200);

/// Runs a restored guest ahead of its machine's start until it waits for
/// work, so that its first entry (with shadow paging, the faults that map
/// the pages of its idle loop) is paid ahead instead of on the way to its
/// first answer. For a guest that was idle at its snapshot (the caller
/// checks) and whose idle loop depends on nothing the start changes (the
/// clock, devices): the built-in guest's. `port(port, is_read)` says what
/// each port access is; the run ends at the first [`AheadPort::Wait`],
/// whose read is left answered zero, to be completed by the vCPU's next
/// `KVM_RUN` (a pause completes it too, as for any wait it interrupts).
/// An error says the guest did something else, or ran on past
/// `AHEAD_LIMIT` (200 ms) of CPU time (stopped by the kick signal).
pub fn run_ahead_to_wait(
    vcpu: &mut VcpuFd,
    port: impl Fn(u16, bool) -> AheadPort,
) -> Result<(), String> {
    install_kick_handler();
    let immediate_exit: *mut u8 = &mut vcpu.get_kvm_run().immediate_exit;
    IMMEDIATE_EXIT.with(|c| c.set(immediate_exit));
    let timer = KickTimer::arm(AHEAD_LIMIT);
    let result = loop {
        match vcpu.run() {
            Ok(VcpuExit::IoIn(p, data)) => match port(p, true) {
                AheadPort::Wait => {
                    data.fill(0);
                    break Ok(());
                }
                _ => break Err(format!("the guest read port {p:#x} on its way to a wait")),
            },
            Ok(VcpuExit::IoOut(p, _)) => match port(p, false) {
                AheadPort::NoEffect => {}
                _ => break Err(format!("the guest wrote port {p:#x} on its way to a wait")),
            },
            Ok(other) => break Err(format!("the guest exited ({other:?}) on its way to a wait")),
            Err(e) if e.errno() == libc::EINTR => {
                break Err(format!(
                    "the guest did not wait within {} ms",
                    AHEAD_LIMIT.as_millis()
                ))
            }
            Err(e) => break Err(format!("KVM_RUN: {e}")),
        }
    };
    drop(timer);
    IMMEDIATE_EXIT.with(|c| c.set(std::ptr::null_mut()));
    vcpu.set_kvm_immediate_exit(0);
    result
}

/// A one-shot timer that sends the kick signal to the calling thread once
/// it has used `after` of CPU time.
struct KickTimer(Option<libc::timer_t>);

impl KickTimer {
    fn arm(after: Duration) -> Self {
        // SAFETY: sigevent is plain data; the fields used are set below.
        let mut ev: libc::sigevent = unsafe { std::mem::zeroed() };
        ev.sigev_notify = libc::SIGEV_THREAD_ID;
        ev.sigev_signo = kick_signal();
        // SAFETY: gettid has no preconditions.
        ev.sigev_notify_thread_id = unsafe { libc::gettid() };
        let mut timer: libc::timer_t = std::ptr::null_mut();
        // SAFETY: `ev` and `timer` are valid for the call.
        if unsafe { libc::timer_create(libc::CLOCK_THREAD_CPUTIME_ID, &mut ev, &mut timer) } < 0 {
            return KickTimer(None);
        }
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: after.as_secs() as libc::time_t,
                tv_nsec: after.subsec_nanos() as libc::c_long,
            },
        };
        // SAFETY: `timer` was just created; `spec` is valid.
        unsafe { libc::timer_settime(timer, 0, &spec, std::ptr::null_mut()) };
        KickTimer(Some(timer))
    }
}

impl Drop for KickTimer {
    fn drop(&mut self) {
        if let Some(timer) = self.0 {
            // SAFETY: the timer is ours and deleted once.
            unsafe { libc::timer_delete(timer) };
        }
    }
}

/// `KVM_SET_SIGNAL_MASK = _IOW(KVMIO, 0x8b, struct kvm_signal_mask)`:
/// direction 1 in bits 30-31, size 4 (a u32 `len`, then the set) in bits
/// 16-29, type 0xAE, number 0x8b.
const KVM_SET_SIGNAL_MASK: libc::c_ulong = (1 << 30) | (4 << 16) | (0xAE << 8) | 0x8b;

/// Sets the signal mask the vCPU's thread has while in `KVM_RUN`
/// (`None`: its own).
fn set_kvm_signal_mask(vcpu: &VcpuFd, mask: Option<&libc::sigset_t>) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    /// `struct kvm_signal_mask` with the kernel's 8-byte sigset of x86-64.
    #[repr(C)]
    struct KvmSignalMask {
        len: u32,
        sigset: [u8; 8],
    }
    let rc = match mask {
        None => {
            // SAFETY: a null argument turns the vCPU's own mask off.
            unsafe {
                libc::ioctl(
                    vcpu.as_raw_fd(),
                    KVM_SET_SIGNAL_MASK,
                    std::ptr::null::<u8>(),
                )
            }
        }
        Some(set) => {
            let mut arg = KvmSignalMask {
                len: 8,
                sigset: [0; 8],
            };
            // SAFETY: glibc's sigset_t is at least 8 bytes, its first 8 the
            // kernel's set on x86-64; both are plain data.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    (set as *const libc::sigset_t).cast::<u8>(),
                    arg.sigset.as_mut_ptr(),
                    8,
                )
            };
            // SAFETY: KVM reads `len` and then `len` bytes of set from `arg`,
            // which holds exactly that, alive for the call.
            unsafe { libc::ioctl(vcpu.as_raw_fd(), KVM_SET_SIGNAL_MASK, &arg) }
        }
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Lets KVM finish an exit it is waiting on (the result of a port read,
/// say) without running guest code, so the registers read while paused are
/// the ones the guest will resume with.
fn complete_pending_io(vcpu: &mut VcpuFd) {
    vcpu.set_kvm_immediate_exit(1);
    let _ = vcpu.run();
    vcpu.set_kvm_immediate_exit(0);
}

/// One `KVM_RUN` and the handling of its exit. `Some` ends the VM.
fn run_once(vcpu: &mut VcpuFd, id: u8, io: &VcpuIo) -> Option<ExitReason> {
    match vcpu.run() {
        Ok(VcpuExit::IoIn(port, data)) => {
            io.pio_read(port, data);
            None
        }
        Ok(VcpuExit::IoOut(port, data)) => io.pio_write(port, data),
        Ok(VcpuExit::MmioRead(addr, data)) => {
            io.mmio_read(addr, data);
            None
        }
        Ok(VcpuExit::MmioWrite(addr, data)) => {
            io.mmio_write(addr, data);
            None
        }
        Ok(VcpuExit::Hlt) => Some(ExitReason::Halted),
        Ok(VcpuExit::Shutdown) => Some(ExitReason::GuestReset),
        Ok(VcpuExit::SystemEvent(kind, _)) => Some(match kind {
            kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => ExitReason::GuestPowerOff,
            _ => ExitReason::GuestReset,
        }),
        Ok(VcpuExit::FailEntry(reason, cpu)) => Some(ExitReason::Error(format!(
            "vCPU {id}: KVM could not enter the guest (hardware reason {reason:#x}, host cpu {cpu})"
        ))),
        Ok(VcpuExit::InternalError) => {
            // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so `internal`
            // is the active member of the exit union.
            let suberror = unsafe { vcpu.get_kvm_run().__bindgen_anon_1.internal.suberror };
            Some(ExitReason::Error(format!(
                "vCPU {id}: KVM internal error (suberror {suberror}); on a PVM host this is \
                 usually an instruction its emulator lacks, run by guest kernel code"
            )))
        }
        Ok(other) => Some(ExitReason::Error(format!(
            "vCPU {id}: unexpected exit {other:?}"
        ))),
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
            vcpu.set_kvm_immediate_exit(0);
            None
        }
        Err(e) => Some(ExitReason::Error(format!("vCPU {id}: KVM_RUN failed: {e}"))),
    }
}

/// Points LINT0 at ExtINT and LINT1 at NMI in the vCPU's local APIC, as the
/// MP table tells a Linux guest (the legacy PIC's output and NMIs).
pub fn set_lint(vcpu: &VcpuFd) -> Result<(), kvm_ioctls::Error> {
    const LVT_LINT0: usize = 0x350;
    const LVT_LINT1: usize = 0x360;
    const DELIVERY_MODE_MASK: u32 = 0x700;
    const DELIVERY_EXTINT: u32 = 0x700;
    const DELIVERY_NMI: u32 = 0x400;
    let mut lapic = vcpu.get_lapic()?;
    let mut set = |offset: usize, mode: u32| {
        let mut raw = [0u8; 4];
        for (i, b) in raw.iter_mut().enumerate() {
            *b = lapic.regs[offset + i] as u8;
        }
        let v = (u32::from_le_bytes(raw) & !DELIVERY_MODE_MASK) | mode;
        for (i, b) in v.to_le_bytes().iter().enumerate() {
            lapic.regs[offset + i] = *b as libc::c_char;
        }
    };
    set(LVT_LINT0, DELIVERY_EXTINT);
    set(LVT_LINT1, DELIVERY_NMI);
    vcpu.set_lapic(&lapic)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kick_timer_counts_the_threads_cpu_time_and_kicks_it() {
        install_kick_handler();
        let mut flag: u8 = 0;
        IMMEDIATE_EXIT.with(|c| c.set(&mut flag));
        let cpu = || {
            let mut t = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            // SAFETY: `t` is a valid timespec for the call.
            unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
            Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
        };
        let start = cpu();
        let timer = KickTimer::arm(Duration::from_millis(20));
        assert!(timer.0.is_some(), "a CPU-time timer can be made");
        // A sleep uses no CPU: no kick.
        std::thread::sleep(Duration::from_millis(50));
        // SAFETY: `flag` is a live local this thread's handler writes.
        assert_eq!(unsafe { std::ptr::read_volatile(&flag) }, 0);
        let deadline = Instant::now() + Duration::from_secs(10);
        // SAFETY: as above.
        while unsafe { std::ptr::read_volatile(&flag) } == 0 {
            assert!(Instant::now() < deadline, "no kick");
            std::hint::spin_loop();
        }
        assert!(cpu() - start >= Duration::from_millis(20));
        drop(timer);
        IMMEDIATE_EXIT.with(|c| c.set(std::ptr::null_mut()));
    }
}
