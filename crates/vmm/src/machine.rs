//! A running microVM: its RAM, KVM VM, devices and vCPU threads, and the
//! operations the control socket offers on it. Snapshotting it (BRANCH, in
//! each mode) is [`crate::branch::capture`]'s.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use proto::control::{RunState, VmStatus, MAX_PEEK_BYTES};
use proto::guest::{GuestRequest, GuestResponse};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use kvm_ioctls::Kvm;

use crate::boot::builtin::channel::{self, Channel};
use crate::branch::{live, precopy};
use crate::devices::i8042::I8042;
use crate::devices::serial::SerialConsole;
use crate::devices::virtio::manager::VirtioDevices;
use crate::kvm::state::StateError;
use crate::kvm::vcpu::{ControlError, ExitReason, RunControl};
use crate::kvm::vm::Vm;
use crate::memory::uffd::Uffd;
use crate::memory::GuestRam;
use crate::snapshot::{self, GuestKind, ParentRef, SnapshotMeta};

pub use crate::branch::capture::Snapshotted;

/// How long a pause may take before it is reported as failed.
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors of operations on a running machine.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Pause or resume failed.
    #[error(transparent)]
    Control(#[from] ControlError),
    /// Talking to the guest failed.
    #[error(transparent)]
    Guest(#[from] channel::Error),
    /// The guest is not one the VMM can talk to directly.
    #[error("this VM runs a Linux guest: talk to its agent over vsock instead")]
    NoChannel,
    /// Capturing KVM state failed.
    #[error("cannot capture the VM's state: {0}")]
    State(#[from] StateError),
    /// Writing the snapshot failed.
    #[error(transparent)]
    Snapshot(#[from] snapshot::Error),
    /// Live BRANCH needs memfd RAM.
    #[error(
        "a live snapshot needs guest RAM in a memfd: start the VM with --memory-backend memfd (or memfd-hugetlb)"
    )]
    LiveNeedsMemfd,
    /// One live copy at a time.
    #[error("a live snapshot of this VM is still copying memory: wait for it to finish")]
    LiveInFlight,
    /// The live copy failed to start.
    #[error("the live copy failed: {0}")]
    Live(#[from] live::Error),
    /// The pre-copy of a live snapshot failed.
    #[error("the live pre-copy failed: {0}")]
    Precopy(#[from] precopy::Error),
    /// measure_diff goes with a full snapshot only.
    #[error("measure_diff measures a diff beside a full snapshot; ask it with mode full")]
    MeasureNotFull,
    /// A diff needs a snapshot to stack on.
    #[error("a diff snapshot needs a base: this VM has neither been restored from a snapshot nor snapshotted since it booted (or its last snapshot failed); take a full snapshot first")]
    NoBase,
    /// KVM's dirty log could not be read.
    #[error("cannot read which pages changed: {0}")]
    DirtyLog(String),
    /// A drive could not be frozen.
    #[error("cannot freeze a drive for the snapshot: {0}")]
    Disk(String),
    /// A peek out of bounds.
    #[error("cannot read {len} bytes of guest memory at {addr:#x}: {reason}")]
    Peek {
        /// Address.
        addr: u64,
        /// Length.
        len: u64,
        /// Why.
        reason: String,
    },
}

/// A running microVM.
pub struct Machine {
    // Field order is drop order: vCPU threads are joined (in Drop) before the
    // VM and then the RAM that its memory slots point into go away.
    pub(crate) vcpu_threads: Vec<JoinHandle<()>>,
    /// The i8042's reset line (non-blocking): watched by whoever waits for
    /// the machine (see [`Machine::event_fds`]), not by a thread of its own.
    pub(crate) reset_evt: EventFd,
    pub(crate) control: Arc<RunControl>,
    pub(crate) channel: Option<Arc<Channel>>,
    pub(crate) serial: Arc<Mutex<SerialConsole>>,
    pub(crate) i8042: Arc<Mutex<I8042>>,
    pub(crate) virtio: VirtioDevices,
    /// The snapshot this VM's memory was last captured as (or restored
    /// from): what a diff snapshot stacks on.
    pub(crate) base: Arc<Mutex<Option<ParentRef>>>,
    /// The userfaultfd guest RAM is registered with (memfd RAM only).
    pub(crate) uffd: Option<Arc<Uffd>>,
    /// The thread finishing a live copy started with `wait: false`.
    pub(crate) live: Mutex<Option<JoinHandle<Result<SnapshotMeta, Error>>>>,
    pub(crate) guest: GuestKind,
    pub(crate) kvm: Arc<Kvm>,
    pub(crate) vm: Vm,
    pub(crate) ram: GuestRam,
    pub(crate) num_vcpus: u8,
}

impl Machine {
    /// Stops every vCPU with consistent state.
    pub fn pause(&self) -> Result<(), Error> {
        Ok(self.control.pause(PAUSE_TIMEOUT)?)
    }

    /// Resumes a paused machine.
    pub fn resume(&self) -> Result<(), Error> {
        Ok(self.control.resume()?)
    }

    /// Ends the machine (its vCPU threads stop; [`Machine::wait_for_exit`] returns).
    pub fn shutdown(&self) {
        self.control.stop(ExitReason::Requested);
    }

    /// Blocks until the machine has stopped, and says why. Acts on the
    /// guest's reset line meanwhile.
    pub fn wait_for_exit(&self) -> ExitReason {
        loop {
            if let Some(reason) = self.handle_events() {
                return reason;
            }
            let mut fds = self.event_fds().map(|fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            });
            // SAFETY: `fds` is a valid array of pollfd of the length given.
            unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        }
    }

    /// What a thread that waits for the machine along with descriptors of
    /// its own (the control socket's listener) polls for readability: the
    /// guest's reset line and the machine's stop notice. When one is
    /// readable, call [`Machine::handle_events`]. Polling these instead of
    /// a watcher thread per machine saves every forked child a thread.
    pub fn event_fds(&self) -> [RawFd; 2] {
        [
            self.reset_evt.as_raw_fd(),
            self.control.exit_evt().as_raw_fd(),
        ]
    }

    /// Stops the machine if the guest pulled its reset line; once it has
    /// stopped (for any reason), waits for its vCPU threads to end and says
    /// why. Never blocks on a running machine.
    pub fn handle_events(&self) -> Option<ExitReason> {
        if self.reset_evt.read().is_ok() {
            self.control.stop(ExitReason::GuestReset);
        }
        self.control
            .exit_reason()
            .map(|_| self.control.wait_for_exit())
    }

    /// Why the machine stopped, once it has.
    pub fn exit_reason(&self) -> Option<ExitReason> {
        self.control.exit_reason()
    }

    /// The guest RAM.
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// The KVM VM.
    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    /// The userfaultfd guest RAM is registered with for live BRANCH (memfd
    /// RAM only), for benchmarks that measure the bare arm of a VM's RAM.
    pub fn live_uffd(&self) -> Option<Arc<Uffd>> {
        self.uffd.clone()
    }

    /// What the machine is doing.
    pub fn status(&self) -> VmStatus {
        let exit_reason = self.control.exit_reason();
        let state = if exit_reason.is_some() {
            RunState::Stopped
        } else if self.control.is_paused() {
            RunState::Paused
        } else {
            RunState::Running
        };
        VmStatus {
            state,
            vcpus: self.num_vcpus,
            mem_mib: self.ram.size() >> 20,
            memory_backend: self.ram.backend().kind().to_owned(),
            rss_bytes: process_rss_bytes().unwrap_or(0),
            exit_reason: exit_reason.map(|r| r.to_string()),
            disk_quota_bytes: self
                .virtio
                .drives()
                .iter()
                .find_map(|d| d.lock().unwrap_or_else(|p| p.into_inner()).disk().quota()),
            disk_quota_refusals: self
                .virtio
                .drives()
                .iter()
                .map(|d| d.lock().unwrap_or_else(|p| p.into_inner()).quota_refusals())
                .sum(),
        }
    }

    /// Sends a request to the built-in guest.
    pub fn guest_request(
        &self,
        request: &GuestRequest,
        timeout: Duration,
    ) -> Result<GuestResponse, Error> {
        let ch = self.channel.as_ref().ok_or(Error::NoChannel)?;
        Ok(ch.request(request, timeout)?)
    }

    /// Faults every page of guest RAM in for reading (see
    /// [`GuestRam::populate_read`]): a restored child's first snapshot then
    /// reads RAM without page faults. How long it took.
    pub fn prewarm(&self) -> std::io::Result<Duration> {
        self.ram.populate_read()
    }

    /// Reads up to [`MAX_PEEK_BYTES`] of guest memory.
    pub fn peek(&self, addr: u64, len: u64) -> Result<Vec<u8>, Error> {
        let fail = |reason: String| Error::Peek { addr, len, reason };
        if len > MAX_PEEK_BYTES {
            return Err(fail(format!("at most {MAX_PEEK_BYTES} bytes at a time")));
        }
        let mut buf = vec![0u8; len as usize];
        self.ram
            .memory()
            .read_slice(&mut buf, GuestAddress(addr))
            .map_err(|e| fail(e.to_string()))?;
        Ok(buf)
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        // A live copy reads guest RAM: it must end before the RAM goes.
        if let Some(t) = self.live.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = t.join();
        }
        self.control.stop(ExitReason::Requested);
        for t in self.vcpu_threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Resident set size of this process, from /proc/self/statm.
pub fn process_rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * page.max(0) as u64)
}
