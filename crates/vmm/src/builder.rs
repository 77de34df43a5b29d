//! Assembling a microVM. Every machine is put together here, through one of
//! two doors that share every step they have in common (RAM, the KVM VM,
//! legacy devices, vCPU threads), so a restore cannot forget what a boot
//! sets up:
//!
//! - [`build_for_boot`]: a fresh guest (the built-in one or a Linux kernel);
//! - [`build_from_snapshot`]: a child of a snapshot, its RAM mapped
//!   copy-on-write from the snapshot's memory file (or, to be live-BRANCHed
//!   in turn, a copy of it in a memfd: see [`RestoreRam`]).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::{Kvm, VcpuFd};
use vmm_sys_util::eventfd::EventFd;

use crate::boot::builtin::{self, channel::Channel};
use crate::boot::{layout, linux};
use crate::devices::bus::{Bus, BusDevice, BusError};
use crate::devices::i8042::{I8042, I8042_BASE, I8042_LEN};
use crate::devices::persist::Persist;
use crate::devices::serial::{ConsoleOutput, SerialConsole, COM1_BASE, COM1_IRQ, COM1_LEN};
use crate::devices::virtio::block::DiskStack;
use crate::devices::virtio::manager::{
    DeviceState, IrqRoute, RestoreBackends, VirtioConfig, VirtioDevices,
};
use crate::devices::virtio::net::Tap;
use crate::kvm::state::{self, StateError};
use crate::kvm::vcpu::{self, RunControl, VcpuIo};
use crate::kvm::{cpuid, msrs, vm};
use crate::machine::Machine;
use crate::memory::uffd::{self, Uffd};
use crate::memory::{self, Backend, GuestRam};
use crate::random::random_u64;
use crate::snapshot::{DeviceStates, GuestKind, ParentRef, PreparedSnapshot};

/// What the guest is.
#[derive(Clone, Debug)]
pub enum BootSource {
    /// The built-in guest program.
    Builtin,
    /// A Linux kernel.
    Linux(linux::LinuxBootConfig),
}

/// Everything needed to boot a machine.
#[derive(Clone, Debug)]
pub struct MachineConfig {
    /// Guest RAM in MiB.
    pub mem_mib: u64,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// What backs guest RAM.
    pub backend: Backend,
    /// The guest.
    pub boot: BootSource,
    /// Where the serial console goes.
    pub console: ConsoleOutput,
    /// Virtio devices (on the MMIO bus; a Linux guest is told of them on
    /// its command line).
    pub virtio: VirtioConfig,
}

impl MachineConfig {
    /// The built-in guest with `mem_mib` MiB and one vCPU, console discarded.
    pub fn builtin(mem_mib: u64) -> Self {
        MachineConfig {
            mem_mib,
            vcpus: 1,
            backend: Backend::Anonymous,
            boot: BootSource::Builtin,
            console: ConsoleOutput::Sink,
            virtio: VirtioConfig::default(),
        }
    }
}

/// What a restored child gets of its own.
#[derive(Clone, Debug)]
pub struct RestoreConfig {
    /// Where its serial console goes.
    pub console: ConsoleOutput,
    /// Start with every vCPU paused (resume through the control socket).
    pub paused: bool,
    /// The child's own copy-on-write layer for each of the snapshot's
    /// drives, in order (created; must not exist yet).
    pub drive_layers: Vec<PathBuf>,
    /// The child's vsock socket, when the snapshot has a vsock device.
    pub vsock_uds: Option<PathBuf>,
    /// The network namespace (a name under /var/run/netns) in which each
    /// of the snapshot's network interfaces attaches to the tap its
    /// `snapshot.json` names: a tap made there beforehand (persistent,
    /// with its address), never created here. `None`: this process's
    /// namespace. Siblings need a namespace each: a tap serves one VM.
    pub netns: Option<String>,
    /// What the child's RAM is.
    pub ram: RestoreRam,
    /// Fault every page of RAM in for reading before the vCPUs run
    /// ([`crate::memory::GuestRam::populate_read`]), so the child's first
    /// snapshot reads RAM without page faults (spawn pays for it instead).
    pub prewarm: bool,
    /// The most data, in bytes, each of the child's own CoW layers may
    /// hold (see [`crate::devices::virtio::block::DiskConfig::quota`]).
    pub disk_quota: Option<u64>,
    /// The snapshot's taps, attached already (one `/dev/net/tun`
    /// descriptor per network interface, in order), by a process allowed
    /// to enter `netns`: the child attaches none itself. `None`: it
    /// attaches them.
    pub taps: Option<Arc<Vec<std::fs::File>>>,
    /// A userfaultfd made already, for RAM that can be live-branched (a
    /// process that gave up the privilege to make one makes it first).
    /// `None`: made when needed.
    pub uffd: Option<Arc<Uffd>>,
}

/// What a restored child's RAM is. Either way the child's first diff
/// BRANCH stacks on the snapshot it was restored from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RestoreRam {
    /// The snapshot's memory file mapped `MAP_PRIVATE` ([`Backend::File`]):
    /// nothing is copied, every sibling shares the page cache and each
    /// child's writes are its own. Cannot be live-BRANCHed.
    #[default]
    SnapshotFile,
    /// A fresh memfd mapped `MAP_SHARED` ([`Backend::Memfd`]) holding a
    /// copy of the memory file's data, registered with userfaultfd as a
    /// booted memfd VM is: the child can be live-BRANCHed. The copy costs
    /// time at restore (with the memory file in the page cache, 40-50 ms for
    /// 100 MiB of data and about 0.5 s for 1 GiB on the 2-core development
    /// machine, against 3-8 ms for a mapped file) and the child keeps its
    /// own memory for every page of data.
    Memfd,
    /// The same on 2 MiB huge pages ([`Backend::HugeMemfd`]): a cheaper
    /// live-BRANCH arm; needs huge pages reserved for the whole RAM.
    HugeMemfd,
}

/// Errors building a machine.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// vCPU count out of range.
    #[error("{asked} vCPUs is out of range: this host supports 1 to {max}")]
    VcpuCount {
        /// Asked for.
        asked: u8,
        /// Most supported.
        max: usize,
    },
    /// KVM could not be opened or set up.
    #[error(transparent)]
    Kvm(#[from] vm::Error),
    /// The VMM could not be confined before its threads start.
    #[error("cannot confine the VMM before its threads start: {0}")]
    Confine(String),
    /// Guest memory could not be set up.
    #[error(transparent)]
    Memory(#[from] memory::Error),
    /// A device could not be set up.
    #[error("cannot set up the {device}: {reason}")]
    Device {
        /// Which device.
        device: &'static str,
        /// Why.
        reason: String,
    },
    /// The Linux kernel could not be loaded.
    #[error(transparent)]
    Linux(#[from] crate::boot::Error),
    /// The built-in guest could not be loaded.
    #[error(transparent)]
    Builtin(#[from] builtin::Error),
    /// A vCPU run ahead of its start met something other than its wait
    /// (a device access): the guest ran, so this restore is spent; every
    /// later restore of the snapshot must start without running ahead.
    #[error("vCPU {id} cannot be run ahead to its wait: {reason}")]
    RunAhead {
        /// Which vCPU.
        id: u8,
        /// What it met.
        reason: String,
    },
    /// A vCPU could not be created or configured.
    #[error("cannot set up vCPU {id}: {reason}")]
    Vcpu {
        /// Which vCPU.
        id: u8,
        /// Why.
        reason: String,
    },
    /// Saved KVM state was refused.
    #[error("cannot restore the snapshot's CPU state: {0}")]
    State(#[from] StateError),
    /// A thread could not be started.
    #[error("cannot start a thread: {0}")]
    Thread(std::io::Error),
}

fn device_err(device: &'static str) -> impl Fn(String) -> BuildError {
    move |reason| BuildError::Device { device, reason }
}

/// Boots a fresh machine from `cfg`.
pub fn build_for_boot(cfg: &MachineConfig) -> Result<Machine, BuildError> {
    build_for_boot_confined(cfg, None)
}

/// What a VMM runs once everything root may open is open (its files, taps,
/// userfaultfd) and before its first thread starts: its jail.
pub type Confine = Box<dyn FnOnce() -> Result<(), String> + Send>;

/// [`build_for_boot`], running `confine` once the machine holds every
/// file it opens and before any thread of it starts.
pub fn build_for_boot_confined(
    cfg: &MachineConfig,
    confine: Option<Confine>,
) -> Result<Machine, BuildError> {
    let kvm = vm::open_kvm()?;
    let max = kvm.get_max_vcpus().min(usize::from(layout::MAX_VCPUS));
    if cfg.vcpus == 0 || usize::from(cfg.vcpus) > max {
        return Err(BuildError::VcpuCount {
            asked: cfg.vcpus,
            max,
        });
    }
    let ram = GuestRam::new(cfg.mem_mib, cfg.backend.clone())?;
    let guest = match cfg.boot {
        BootSource::Builtin => GuestKind::Builtin,
        BootSource::Linux(_) => GuestKind::Linux,
    };
    let mut parts = Parts::new(Arc::new(kvm), ram, guest, &cfg.console, None)?;
    parts.confine = confine;
    let virtio = VirtioDevices::attach_routed(
        &cfg.virtio,
        Some(&parts.vm),
        irq_route(guest),
        parts.ram.memory(),
        &mut parts.mmio,
    )
    .map_err(|e| device_err("virtio devices")(e.to_string()))?;

    let mem = parts.ram.memory();
    let entry = match &cfg.boot {
        BootSource::Builtin => Entry::Builtin(builtin::load(
            mem,
            parts.ram.size(),
            cfg.vcpus,
            random_u64(),
        )?),
        BootSource::Linux(linux_cfg) => {
            let mut linux_cfg = linux_cfg.clone();
            let fragments = virtio.cmdline();
            if !fragments.is_empty() {
                linux_cfg.cmdline = format!("{} {fragments}", linux_cfg.cmdline);
            }
            Entry::Linux(linux::load_linux(mem, &linux_cfg, cfg.vcpus)?)
        }
    };
    let supported = parts
        .kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| BuildError::Vcpu {
            id: 0,
            reason: format!("cannot read KVM's CPUID list: {e}"),
        })?;
    let mut vcpus = Vec::with_capacity(usize::from(cfg.vcpus));
    for id in 0..cfg.vcpus {
        let fd = parts.create_vcpu(id)?;
        configure_vcpu(&fd, id, cfg.vcpus, &supported, &entry)?;
        vcpus.push(fd);
    }
    parts.start(guest, vcpus, virtio, false, None)
}

/// Restores a child of `snapshot`: RAM maps the memory file `MAP_PRIVATE`
/// (page cache shared with every sibling, writes private) or holds a copy
/// of it in a memfd, as `cfg.ram` says; CPU and device state come from the
/// parsed vmstate.
pub fn build_from_snapshot(
    snapshot: &PreparedSnapshot,
    cfg: &RestoreConfig,
) -> Result<Machine, BuildError> {
    prepare_restore(snapshot, Arc::new(vm::open_kvm()?), cfg.ram)?.finish(cfg)
}

/// The part of a restore that is the same for every child of a snapshot
/// and takes most of its time: guest RAM mapped, the KVM VM with its memory
/// slots and interrupt controller, and the vCPUs created with their saved
/// state. A fork server's pooled child makes this ahead of any request and
/// waits; [`PreparedRestore::finish`] then adds what is the child's own
/// (devices with its console, drive layers and vsock socket, a new VM
/// generation, the clock) and starts it.
pub struct PreparedRestore<'a> {
    snapshot: &'a PreparedSnapshot,
    /// The VM, bare or with its legacy devices made ahead.
    core: Core,
    vcpus: Vec<VcpuFd>,
    /// vCPU threads started ahead ([`PreparedRestore::start_vcpu_threads`]),
    /// one per vCPU in order, or none.
    waiting: Vec<WaitingVcpuThread>,
}

/// A prepared restore's VM.
enum Core {
    /// RAM and the VM, nothing more yet.
    Bare {
        kvm: Arc<Kvm>,
        ram: GuestRam,
        vm: vm::Vm,
    },
    /// With what [`PreparedRestore::make_ahead`] adds.
    Ahead(Box<MadeAhead>),
}

/// What [`PreparedRestore::make_ahead`] made.
struct MadeAhead {
    /// The VM with its legacy devices (restored) and the irqchip's and
    /// PIT's state set.
    parts: Parts,
    /// Where the serial console writes.
    console: ConsoleOutput,
    /// The TSC method that held on a sync ahead.
    tsc: state::TscMethod,
}

/// What a vCPU thread started ahead of its machine waits for.
type VcpuStart = (VcpuFd, VcpuIo, Arc<RunControl>);

/// A vCPU thread started ahead of its machine: it has made its vCPU's first
/// `KVM_RUN` (without entering the guest) and waits for the machine.
struct WaitingVcpuThread {
    go: std::sync::mpsc::SyncSender<VcpuStart>,
    handle: std::thread::JoinHandle<()>,
    tid: libc::pid_t,
}

/// The shared part of a restore of `snapshot` with RAM as `ram` says, on
/// the open /dev/kvm `kvm` (a fork server opens it once for all its
/// children). The VM must be created in the process that will run it: KVM
/// ties a VM to the address space of its creator.
pub fn prepare_restore(
    snapshot: &PreparedSnapshot,
    kvm: Arc<Kvm>,
    ram: RestoreRam,
) -> Result<PreparedRestore<'_>, BuildError> {
    let state = &snapshot.state;
    let ram = match ram {
        RestoreRam::SnapshotFile => GuestRam::map_file(state.mem_mib, &snapshot.memory)?,
        // Copied before the VM exists: KVM's dirty log starts clean, so a
        // diff holds only what changes from here, as for a mapped file.
        RestoreRam::Memfd => GuestRam::copy_of(state.mem_mib, Backend::Memfd, &snapshot.memory)?,
        RestoreRam::HugeMemfd => {
            GuestRam::copy_of(state.mem_mib, Backend::HugeMemfd, &snapshot.memory)?
        }
    };
    let vm = vm::Vm::new(&kvm, &ram, state.guest.needs_pit())?;
    let mut vcpus = Vec::with_capacity(state.vcpus.len());
    for saved in &state.vcpus {
        let fd = create_vcpu(&vm, saved.id)?;
        // Everything but the clock, which restarts when the child does
        // (`finish`), as after a pause.
        state::restore_vcpu(&fd, saved)?;
        vcpus.push(fd);
    }
    Ok(PreparedRestore {
        snapshot,
        core: Core::Bare { kvm, ram, vm },
        vcpus,
        waiting: Vec::new(),
    })
}

impl PreparedRestore<'_> {
    /// Starts the vCPU threads now, before the machine: each makes its
    /// vCPU's first `KVM_RUN` without entering the guest (KVM's per-thread
    /// and once-per-VM work on a first run, see
    /// [`vcpu::adopt_without_running`]) and then waits, so `finish` only
    /// hands them their machine. For a process that prepares a restore
    /// ahead of time (a fork server's pooled child): thread creation leaves
    /// the path from a request to a running child.
    ///
    /// With `may_run_ahead`, an idle built-in guest is also run ahead to
    /// its first wait (see `runs_ahead`); a guest that meets
    /// a device on its way fails this with [`BuildError::RunAhead`].
    pub fn start_vcpu_threads(&mut self, may_run_ahead: bool) -> Result<(), BuildError> {
        if !self.waiting.is_empty() {
            return Ok(());
        }
        /// Why a thread could not take its vCPU over: the first `KVM_RUN`
        /// (or its filter), or the run ahead.
        enum Refused {
            Adopt(String),
            RunAhead(String),
        }
        type Back = (usize, libc::pid_t, VcpuFd, Result<(), Refused>);
        let (back_tx, back_rx) = std::sync::mpsc::channel::<Back>();
        let mut started = Vec::with_capacity(self.vcpus.len());
        let run_ahead = may_run_ahead && self.runs_ahead();
        for (id, mut fd) in std::mem::take(&mut self.vcpus).into_iter().enumerate() {
            let (go, wait) = std::sync::mpsc::sync_channel::<VcpuStart>(1);
            let back = back_tx.clone();
            let handle = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || {
                    let mut adopted = crate::seccomp::enter(crate::seccomp::Kind::Vcpu)
                        .map_err(|e| e.to_string())
                        .and_then(|()| vcpu::adopt_without_running(&mut fd))
                        .map_err(Refused::Adopt);
                    if adopted.is_ok() && run_ahead {
                        adopted = vcpu::run_ahead_to_wait(&mut fd, builtin_port_ahead)
                            .map_err(Refused::RunAhead);
                    }
                    // SAFETY: gettid has no preconditions.
                    let tid = unsafe { libc::gettid() };
                    let sent = back.send((id, tid, fd, adopted));
                    // The receiver counts senders: this one is done.
                    drop(back);
                    if sent.is_err() {
                        return;
                    }
                    // No message: the prepared restore was dropped.
                    if let Ok((fd, io, control)) = wait.recv() {
                        vcpu::run_vcpu(fd, id as u8, io, control);
                    }
                })
                .map_err(BuildError::Thread)?;
            started.push((go, handle));
        }
        drop(back_tx);
        let mut back: Vec<Back> = back_rx.iter().collect();
        if back.len() != started.len() {
            return Err(BuildError::Thread(std::io::Error::other(
                "a vCPU thread ended before it took its vCPU",
            )));
        }
        back.sort_by_key(|(id, _, _, _)| *id);
        let mut refused = None;
        for ((id, tid, fd, adopted), (go, handle)) in back.into_iter().zip(started) {
            match adopted {
                Ok(()) => {}
                Err(Refused::Adopt(reason)) => {
                    refused.get_or_insert(BuildError::Vcpu {
                        id: id as u8,
                        reason: format!("cannot take it over ahead of its start: {reason}"),
                    });
                }
                Err(Refused::RunAhead(reason)) => {
                    refused.get_or_insert(BuildError::RunAhead {
                        id: id as u8,
                        reason,
                    });
                }
            }
            self.vcpus.push(fd);
            self.waiting.push(WaitingVcpuThread { go, handle, tid });
        }
        refused.map_or(Ok(()), Err)
    }

    /// Makes ahead what does not depend on the moment of the start nor on
    /// the child's own files (for a process that prepares a restore ahead
    /// of time, a fork server's pooled child): the legacy devices with
    /// their saved state and the serial console writing to `console`, the
    /// irqchip's and PIT's state, a new VM generation (each prepared
    /// restore is a new child, whenever it starts), and a first clock and
    /// TSC sync, which tells [`PreparedRestore::finish`] the method that
    /// holds on this host. The clock itself is set again at the start.
    pub fn make_ahead(mut self, console: &ConsoleOutput) -> Result<Self, BuildError> {
        let Core::Bare { kvm, ram, vm } = self.core else {
            return Ok(self);
        };
        let state = &self.snapshot.state;
        let parts = Parts::with_vm(kvm, ram, vm, console, Some(&state.devices))?;
        if state.guest == GuestKind::Builtin {
            builtin::set_generation(parts.ram.memory(), random_u64())?;
        }
        state::restore_vm_chips(parts.vm.fd(), &state.vm)?;
        state::restore_vm_clock(parts.vm.fd(), &state.vm)?;
        let tsc = state::sync_tsc(parts.vm.fd(), &self.vcpus, &state.vcpus, &state.vm)?;
        self.core = Core::Ahead(Box::new(MadeAhead {
            parts,
            console: console.clone(),
            tsc: tsc.method,
        }));
        Ok(self)
    }

    /// Whether the vCPU threads started ahead run the guest ahead to its
    /// first wait ([`vcpu::run_ahead_to_wait`]): only the built-in guest,
    /// whose idle loop reads neither the clock nor a device, once its
    /// devices and identity are made ([`PreparedRestore::make_ahead`]),
    /// and only when every vCPU was idle at the snapshot
    /// ([`idle_at_wait`]). A guest that was running (a counter, say) is
    /// not run ahead: it would run on.
    fn runs_ahead(&self) -> bool {
        let state = &self.snapshot.state;
        let Core::Ahead(ahead) = &self.core else {
            return false;
        };
        let mem = ahead.parts.ram.memory();
        state.guest == GuestKind::Builtin
            && state.vcpus.iter().all(|v| {
                let op = v.regs.rip.checked_sub(1).and_then(|at| {
                    vm_memory::Bytes::read_obj::<u8>(mem, vm_memory::GuestAddress(at)).ok()
                });
                idle_at_wait(&v.regs, op)
            })
    }

    /// How many device threads its machine starts (a worker per virtio
    /// device, and the built-in guest's interrupt relay): a process that
    /// prepares ahead starts them ahead ([`crate::seccomp::start_ahead`]).
    pub fn device_threads(&self) -> usize {
        let state = &self.snapshot.state;
        state.devices.virtio.len() + usize::from(state.guest == GuestKind::Builtin)
    }

    /// The kernel thread ids of the vCPU threads started ahead (empty
    /// before [`PreparedRestore::start_vcpu_threads`]): a caller that
    /// changed their scheduling before they run (they inherit the policy
    /// of the thread that started them) sets it back through these.
    pub fn vcpu_thread_ids(&self) -> Vec<libc::pid_t> {
        self.waiting.iter().map(|w| w.tid).collect()
    }

    /// Completes the restore with the child's own resources and starts it.
    /// When the devices were made ahead ([`PreparedRestore::make_ahead`]),
    /// the console is the one made then if `cfg.console` equals it, and
    /// is opened again otherwise.
    pub fn finish(self, cfg: &RestoreConfig) -> Result<Machine, BuildError> {
        let PreparedRestore {
            snapshot,
            core,
            vcpus,
            waiting,
        } = self;
        let state = &snapshot.state;
        let (mut parts, tsc_first) = match core {
            Core::Bare { kvm, ram, vm } => {
                let parts = Parts::with_vm(kvm, ram, vm, &cfg.console, Some(&state.devices))?;
                if state.guest == GuestKind::Builtin {
                    builtin::set_generation(parts.ram.memory(), random_u64())?;
                }
                state::restore_vm_chips(parts.vm.fd(), &state.vm)?;
                (parts, None)
            }
            Core::Ahead(ahead) => {
                let MadeAhead {
                    parts,
                    console,
                    tsc,
                } = *ahead;
                if console != cfg.console {
                    parts.reopen_console(&cfg.console, &state.devices)?;
                }
                (parts, Some(tsc))
            }
        };
        if cfg.prewarm {
            let took = parts
                .ram
                .populate_read()
                .map_err(|e| device_err("guest RAM")(format!("cannot prewarm it: {e}")))?;
            tracing::info!("prewarmed guest RAM in {took:?}");
        }
        let backends = restore_backends(snapshot, cfg)?;
        parts.uffd_ahead = cfg.uffd.clone();
        let virtio = VirtioDevices::restore_routed(
            &state.devices.virtio,
            backends,
            Some(&parts.vm),
            irq_route(state.guest),
            parts.ram.memory(),
            &mut parts.mmio,
        )
        .map_err(|e| device_err("virtio devices")(e.to_string()))?;
        state::restore_vm_clock(parts.vm.fd(), &state.vm)?;
        // After kvmclock, so the guest TSC is set against the clock KVM now has.
        let tsc = state::sync_tsc_from(parts.vm.fd(), &vcpus, &state.vcpus, &state.vm, tsc_first)?;
        if let Some(skew) = tsc
            .worst_skew_ns
            .filter(|s| s.abs() > state::TSC_SKEW_TOLERANCE_NS)
        {
            tracing::warn!(
                "the restored guest TSC and kvmclock disagree by {skew} ns ({:?}); \
                 a Linux guest may stop using the TSC as its clocksource",
                tsc.method
            );
        }
        let base = ParentRef {
            dir: std::path::absolute(&snapshot.dir).unwrap_or_else(|_| snapshot.dir.clone()),
            memory_hash: snapshot.meta.memory_hash.clone(),
        };
        parts.start_with(state.guest, vcpus, waiting, virtio, cfg.paused, Some(base))
    }
}

/// Whether a built-in guest's vCPU with `regs` was idle at its snapshot,
/// `op` being the byte before its `rip`: it had just read a wait port
/// (`in (%dx), %eax`, 0xED, with the port in DX; the built-in guest's
/// memory is identity-mapped) and the wait had answered no device wake-up
/// (EAX holds the answer, completed before the registers were saved). A
/// wait that answered [`builtin::abi::WAKE_DEVICE`] sends the guest to
/// its device's interrupt status register next, an MMIO access that has
/// an effect (it acknowledges) and so cannot be run ahead. A wake-up for
/// the mailbox needs nothing: the guest looks at the mailbox in memory.
fn idle_at_wait(regs: &kvm_bindings::kvm_regs, op: Option<u8>) -> bool {
    let port = regs.rdx & 0xffff;
    let answered = regs.rax & 0xffff_ffff;
    let waited = match port {
        builtin::abi::PORT_WAIT => answered & builtin::abi::WAKE_DEVICE == 0,
        builtin::abi::PORT_PARK => true,
        _ => false,
    };
    waited && op == Some(0xED)
}

/// What the built-in guest's port accesses are to a run ahead of its
/// start: its waits end it; its completion signal (a request in flight at
/// the snapshot, served again) has no effect on a channel nobody has used.
fn builtin_port_ahead(port: u16, read: bool) -> vcpu::AheadPort {
    let port = u64::from(port);
    match (port, read) {
        (builtin::abi::PORT_WAIT | builtin::abi::PORT_PARK, true) => vcpu::AheadPort::Wait,
        (builtin::abi::PORT_DONE, false) => vcpu::AheadPort::NoEffect,
        _ => vcpu::AheadPort::Refuse,
    }
}

/// Where virtio interrupts go: a guest kernel takes them from the irqchip;
/// the built-in guest, which has no interrupt delivery, is woken through
/// its channel by a relay (see `Parts::start`).
fn irq_route(guest: GuestKind) -> IrqRoute {
    match guest {
        GuestKind::Builtin => IrqRoute::Relay,
        GuestKind::Linux => IrqRoute::Irqchip,
    }
}

/// A child's own host-side resources for the snapshot's devices: each
/// drive opens the snapshot's frozen layers under a CoW layer of the
/// child's, vsock listens on the child's own socket, and each network
/// interface attaches to its tap in the child's namespace.
fn restore_backends(
    snapshot: &PreparedSnapshot,
    cfg: &RestoreConfig,
) -> Result<RestoreBackends, BuildError> {
    let disks = &snapshot.meta.disks;
    if disks.len() != cfg.drive_layers.len() {
        return Err(device_err("virtio-block")(format!(
            "the snapshot has {} drives but {} copy-on-write layers were given for the child",
            disks.len(),
            cfg.drive_layers.len()
        )));
    }
    let drives = disks
        .iter()
        .zip(&cfg.drive_layers)
        .zip(&snapshot.disks)
        .map(|((disk, cow), opened)| {
            DiskStack::open_with(
                &crate::devices::virtio::block::DiskConfig::for_child(
                    disk,
                    &snapshot.dir,
                    cow.clone(),
                    cfg.disk_quota,
                ),
                Some(opened),
            )
            .map_err(|e| device_err("virtio-block")(e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let has_vsock = snapshot
        .state
        .devices
        .virtio
        .iter()
        .any(|d| matches!(d.device, DeviceState::Vsock(_)));
    if has_vsock && cfg.vsock_uds.is_none() {
        return Err(device_err("virtio-vsock")(
            "the snapshot has a vsock device: give the child a vsock socket path".into(),
        ));
    }
    // The count matches the vmstate's (checked when the snapshot was loaded).
    if let Some(opened) = &cfg.taps {
        if opened.len() != snapshot.meta.nets.len() {
            return Err(device_err("virtio-net device")(format!(
                "the snapshot has {} network interfaces but {} taps were opened for the child",
                snapshot.meta.nets.len(),
                opened.len()
            )));
        }
    }
    let taps = snapshot
        .meta
        .nets
        .iter()
        .enumerate()
        .map(|(i, net)| match &cfg.taps {
            Some(opened) => opened[i]
                .try_clone()
                .map(|f| Tap::from_file(f, &net.tap))
                .map_err(|e| device_err("virtio-net device")(format!("tap {:?}: {e}", net.tap))),
            None => {
                Tap::attach(&net.tap, cfg.netns.as_deref()).map_err(|e| net_err(i, &net.tap, e))
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(RestoreBackends {
        drives,
        vsock_uds: cfg.vsock_uds.clone(),
        taps,
    })
}

fn net_err(index: usize, tap: &str, e: crate::devices::virtio::net::TapError) -> BuildError {
    device_err("virtio-net device")(format!("network interface {index} on tap {tap:?}: {e}"))
}

/// Checks, without opening anything, that every tap the children of
/// `snapshot` will attach to exists in network namespace `netns` (this
/// process's when `None`): what a parent that forks children checks
/// before the first fork, so a missing tap is its caller's error rather
/// than a child's that already started.
pub fn check_taps(snapshot: &PreparedSnapshot, netns: Option<&str>) -> Result<(), BuildError> {
    for (i, net) in snapshot.meta.nets.iter().enumerate() {
        Tap::check_present(&net.tap, netns).map_err(|e| net_err(i, &net.tap, e))?;
    }
    Ok(())
}

/// A machine being assembled: what both doors build the same way.
struct Parts {
    kvm: Arc<Kvm>,
    ram: GuestRam,
    vm: vm::Vm,
    pio: Bus,
    /// The MMIO bus (virtio devices).
    mmio: Bus,
    serial: Arc<Mutex<SerialConsole>>,
    /// The serial console's interrupt line (a copy of the UART's).
    serial_irq: EventFd,
    i8042: Arc<Mutex<I8042>>,
    reset_evt: EventFd,
    /// A userfaultfd made ahead for live BRANCH (see [`RestoreConfig::uffd`]).
    uffd_ahead: Option<Arc<Uffd>>,
    /// Run before the first thread starts ([`build_for_boot_confined`]).
    confine: Option<Confine>,
}

impl Parts {
    /// Creates the VM over `ram` and the legacy devices (see [`Parts::with_vm`]).
    fn new(
        kvm: Arc<Kvm>,
        ram: GuestRam,
        guest: GuestKind,
        console: &ConsoleOutput,
        saved: Option<&DeviceStates>,
    ) -> Result<Self, BuildError> {
        let vm = vm::Vm::new(&kvm, &ram, guest.needs_pit())?;
        Self::with_vm(kvm, ram, vm, console, saved)
    }

    /// Adds the legacy devices (fresh, or from saved state) to `vm`: the
    /// serial console on COM1 with its interrupt through an irqfd, and the
    /// i8042 whose reset line ends the machine.
    fn with_vm(
        kvm: Arc<Kvm>,
        ram: GuestRam,
        vm: vm::Vm,
        console: &ConsoleOutput,
        saved: Option<&DeviceStates>,
    ) -> Result<Self, BuildError> {
        let serial_err = device_err("serial console");
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| serial_err(e.to_string()))?;
        vm.register_irqfd(&irq, COM1_IRQ)?;
        let out = console.open().map_err(|e| serial_err(e.to_string()))?;
        let serial_irq = irq.try_clone().map_err(|e| serial_err(e.to_string()))?;
        let serial = match saved {
            Some(s) => SerialConsole::restore(&s.serial, (irq, out))
                .map_err(|e| serial_err(e.to_string()))?,
            None => SerialConsole::new(irq, out),
        };
        let i8042_err = device_err("i8042");
        // Non-blocking: polled by whoever waits for the machine (see
        // `Machine::event_fds`).
        let reset_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| i8042_err(e.to_string()))?;
        let line = reset_evt
            .try_clone()
            .map_err(|e| i8042_err(e.to_string()))?;
        let i8042 = match saved {
            Some(s) => {
                // Its restore cannot fail (the error type is Infallible).
                let Ok(d) = I8042::restore(&s.i8042, line);
                d
            }
            None => I8042::new(line),
        };
        let serial = Arc::new(Mutex::new(serial));
        let i8042 = Arc::new(Mutex::new(i8042));
        let mut pio = Bus::new();
        let bus_err = |e: BusError| device_err("port I/O bus")(e.to_string());
        pio.insert(
            serial.clone() as Arc<Mutex<dyn BusDevice>>,
            u64::from(COM1_BASE),
            COM1_LEN,
        )
        .map_err(bus_err)?;
        pio.insert(
            i8042.clone() as Arc<Mutex<dyn BusDevice>>,
            u64::from(I8042_BASE),
            I8042_LEN,
        )
        .map_err(bus_err)?;
        Ok(Parts {
            kvm,
            ram,
            vm,
            pio,
            mmio: Bus::new(),
            serial,
            serial_irq,
            i8042,
            reset_evt,
            uffd_ahead: None,
            confine: None,
        })
    }

    fn create_vcpu(&self, id: u8) -> Result<VcpuFd, BuildError> {
        create_vcpu(&self.vm, id)
    }

    /// Replaces the serial console (made with another output, not yet
    /// run) by one restored from `saved` again, writing to `console`, on
    /// the same interrupt line.
    fn reopen_console(
        &self,
        console: &ConsoleOutput,
        saved: &DeviceStates,
    ) -> Result<(), BuildError> {
        let serial_err = device_err("serial console");
        let out = console.open().map_err(|e| serial_err(e.to_string()))?;
        let mut serial = self.serial.lock().unwrap_or_else(|e| e.into_inner());
        let irq = self
            .serial_irq
            .try_clone()
            .map_err(|e| serial_err(e.to_string()))?;
        *serial = SerialConsole::restore(&saved.serial, (irq, out))
            .map_err(|e| serial_err(e.to_string()))?;
        Ok(())
    }

    /// Starts a thread per vCPU and hands over the machine. Its vCPU
    /// threads count as running from their spawn: nothing waits for them
    /// to be scheduled, but a VM started paused is handed over once all
    /// have parked. The guest's reset line is watched by whoever waits
    /// for the machine ([`Machine::wait_for_exit`] or a poll on
    /// [`Machine::event_fds`]), not by a thread of its own.
    fn start(
        self,
        guest: GuestKind,
        vcpus: Vec<VcpuFd>,
        virtio: VirtioDevices,
        paused: bool,
        base: Option<ParentRef>,
    ) -> Result<Machine, BuildError> {
        self.start_with(guest, vcpus, Vec::new(), virtio, paused, base)
    }

    /// [`Parts::start`], handing the vCPUs to `waiting` threads (started
    /// ahead, one per vCPU) when there are any instead of spawning threads.
    fn start_with(
        self,
        guest: GuestKind,
        vcpus: Vec<VcpuFd>,
        waiting: Vec<WaitingVcpuThread>,
        virtio: VirtioDevices,
        paused: bool,
        base: Option<ParentRef>,
    ) -> Result<Machine, BuildError> {
        let uffd = register_for_live_branch(&self.ram, self.uffd_ahead.clone())?;
        if let Some(confine) = self.confine {
            confine().map_err(BuildError::Confine)?;
        }
        let channel = (guest == GuestKind::Builtin)
            .then(|| Arc::new(Channel::new(self.ram.memory().clone())));
        if let Some(ch) = &channel {
            let relay_err = |e: std::io::Error| device_err("interrupt relay")(e.to_string());
            let evts = virtio.interrupt_evts().map_err(relay_err)?;
            // No devices, no interrupts to relay: no thread (every child
            // of the fork path pays for each thread it starts).
            if !evts.is_empty() {
                ch.start_relay(evts).map_err(relay_err)?;
            }
        }
        let blocker = channel
            .clone()
            .map(|ch| ch as Arc<dyn crate::kvm::vcpu::Blocker>);
        let control = Arc::new(
            RunControl::new(blocker, paused)
                .map_err(|e| device_err("vCPU run control")(e.to_string()))?,
        );
        let io: VcpuIo = Arc::new(MachineIo {
            pio: self.pio,
            mmio: self.mmio,
            channel: channel.clone(),
        });
        let num_vcpus = vcpus.len() as u8;
        let mut vcpu_threads = Vec::with_capacity(vcpus.len());
        control.expect_vcpus(vcpus.len());
        // Handed to the waiting threads, or else each to a new thread.
        let mut vcpus = vcpus;
        if !waiting.is_empty() {
            assert_eq!(waiting.len(), vcpus.len(), "one waiting thread per vCPU");
            for (fd, thread) in std::mem::take(&mut vcpus).into_iter().zip(waiting) {
                // A thread gone (it cannot be: it waits for this) would
                // leave the VM counting it: stop the VM.
                if thread.go.send((fd, io.clone(), control.clone())).is_err() {
                    control.spawn_failed(1);
                    control.stop(vcpu::ExitReason::Error(
                        "a vCPU thread started ahead ended before its VM started".into(),
                    ));
                }
                vcpu_threads.push(thread.handle);
            }
        }
        for (id, fd) in vcpus.into_iter().enumerate() {
            let (io, run) = (io.clone(), control.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || {
                    if let Err(e) = crate::seccomp::enter(crate::seccomp::Kind::Vcpu) {
                        run.spawn_failed(1);
                        run.stop(vcpu::ExitReason::Error(format!("vCPU thread {id}: {e}")));
                        return;
                    }
                    vcpu::run_vcpu(fd, id as u8, io, run)
                });
            match spawned {
                Ok(thread) => vcpu_threads.push(thread),
                Err(e) => {
                    // The threads already running stop; the rest never will.
                    control.spawn_failed(usize::from(num_vcpus) - id);
                    control.stop(vcpu::ExitReason::Error(format!(
                        "cannot start vCPU thread {id}: {e}"
                    )));
                    return Err(BuildError::Thread(e));
                }
            }
        }
        control.wait_until_parked();
        if uffd.is_some() {
            // A live branch starts copy threads inside its pause: their
            // filters are taken now, not then.
            crate::seccomp::top_up(
                crate::seccomp::Kind::Copy,
                crate::seccomp::COPY_THREADS_IN_PAUSE,
            )
            .map_err(BuildError::Thread)?;
        }
        Ok(Machine {
            vcpu_threads,
            reset_evt: self.reset_evt,
            control,
            channel,
            serial: self.serial,
            i8042: self.i8042,
            virtio,
            base: Arc::new(Mutex::new(base)),
            uffd,
            live: Mutex::new(None),
            guest,
            kvm: self.kvm,
            vm: self.vm,
            ram: self.ram,
            num_vcpus,
        })
    }
}

/// Creates vCPU `id` of `vm`.
fn create_vcpu(vm: &vm::Vm, id: u8) -> Result<VcpuFd, BuildError> {
    vm.fd()
        .create_vcpu(u64::from(id))
        .map_err(|e| BuildError::Vcpu {
            id,
            reason: format!("KVM_CREATE_VCPU: {e}"),
        })
}

/// Memfd RAM is registered for userfaultfd write-protect when the machine
/// is built, so a live BRANCH only has to arm it. Other RAM cannot be
/// live-branched.
fn register_for_live_branch(
    ram: &GuestRam,
    ahead: Option<Arc<Uffd>>,
) -> Result<Option<Arc<Uffd>>, BuildError> {
    if !matches!(ram.backend(), Backend::Memfd | Backend::HugeMemfd) {
        return Ok(None);
    }
    let err = |e: uffd::Error| device_err("userfaultfd for live BRANCH")(e.to_string());
    let uffd = match ahead {
        Some(u) => u,
        None => Arc::new(Uffd::new().map_err(err)?),
    };
    for (_, host, len) in ram.slots() {
        uffd.register_wp(host, len).map_err(err)?;
    }
    Ok(Some(uffd))
}

enum Entry {
    Builtin(builtin::Entry),
    Linux(linux::KernelEntry),
}

fn configure_vcpu(
    fd: &VcpuFd,
    id: u8,
    num_vcpus: u8,
    supported: &kvm_bindings::CpuId,
    entry: &Entry,
) -> Result<(), BuildError> {
    let fail = |what: &str, e: &dyn std::fmt::Display| BuildError::Vcpu {
        id,
        reason: format!("{what}: {e}"),
    };
    fd.set_cpuid2(&cpuid::vcpu_cpuid(supported, id, num_vcpus))
        .map_err(|e| fail("KVM_SET_CPUID2", &e))?;
    match entry {
        Entry::Builtin(entry) => builtin::setup_vcpu(fd, id, *entry)?,
        Entry::Linux(entry) => {
            msrs::set_boot_msrs(fd).map_err(|e| fail("boot MSRs", &e))?;
            vcpu::set_lint(fd).map_err(|e| fail("local APIC LINT pins", &e))?;
            if id == 0 {
                linux::setup_linux_vcpu(fd, entry)?;
            }
        }
    }
    Ok(())
}

/// The boot source for a Linux kernel, with the default command line when none is given.
pub fn linux_boot(kernel: PathBuf, initrd: Option<PathBuf>, cmdline: Option<String>) -> BootSource {
    BootSource::Linux(linux::LinuxBootConfig {
        kernel,
        initrd,
        cmdline: cmdline.unwrap_or_else(|| linux::DEFAULT_CMDLINE.to_owned()),
    })
}

/// A machine's exits: the built-in guest's ports first (when it is the
/// guest), then the port and MMIO buses.
struct MachineIo {
    pio: Bus,
    mmio: Bus,
    channel: Option<Arc<Channel>>,
}

impl vcpu::ExitHandler for MachineIo {
    fn pio_read(&self, port: u16, data: &mut [u8]) {
        match &self.channel {
            Some(ch) if Channel::handles(port) => ch.io_in(port, data),
            _ => {
                if !self.pio.read(u64::from(port), data) {
                    data.fill(0xff);
                }
            }
        }
    }

    fn pio_write(&self, port: u16, data: &[u8]) -> Option<vcpu::ExitReason> {
        match &self.channel {
            Some(ch) if Channel::handles(port) => match ch.io_out(port, data) {
                builtin::channel::OutEffect::GuestPanic(code) => {
                    Some(vcpu::ExitReason::GuestPanic(code))
                }
                builtin::channel::OutEffect::None => None,
            },
            _ => {
                self.pio.write(u64::from(port), data);
                None
            }
        }
    }

    fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        if !self.mmio.read(addr, data) {
            data.fill(0xff);
        }
    }

    fn mmio_write(&self, addr: u64, data: &[u8]) {
        self.mmio.write(addr, data);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::bus::BusDevice;
    use crate::kvm::vcpu::ExitReason;
    use proto::control::{RunState, SnapshotMode};
    use proto::guest::{GuestRequest, GuestResponse};

    #[test]
    fn only_a_vcpu_whose_wait_answered_no_device_wake_up_is_idle() {
        let at = |port: u64, rax: u64| kvm_bindings::kvm_regs {
            rdx: port,
            rax,
            rip: 0x1001,
            ..Default::default()
        };
        let wait = builtin::abi::PORT_WAIT;
        let park = builtin::abi::PORT_PARK;
        let device = builtin::abi::WAKE_DEVICE;
        let mailbox = builtin::abi::WAKE_MAILBOX;
        assert!(idle_at_wait(&at(wait, 0), Some(0xED)));
        assert!(idle_at_wait(&at(wait, mailbox), Some(0xED)));
        // The snapshot caught the wait answered with a device wake-up:
        // the guest's next step is an MMIO read of the interrupt status.
        assert!(!idle_at_wait(&at(wait, device), Some(0xED)));
        assert!(!idle_at_wait(&at(wait, device | mailbox), Some(0xED)));
        // Only EAX holds the answer.
        assert!(idle_at_wait(&at(wait, device << 32), Some(0xED)));
        assert!(idle_at_wait(&at(park, device), Some(0xED)));
        assert!(!idle_at_wait(&at(builtin::abi::PORT_DONE, 0), Some(0xED)));
        assert!(!idle_at_wait(&at(wait, 0), Some(0xEC)));
        assert!(!idle_at_wait(&at(wait, 0), None));
    }

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> Self {
            let p = std::env::temp_dir().join(format!(
                "forkd-builder-{tag}-{}-{}",
                std::process::id(),
                random_u64()
            ));
            std::fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn ping(machine: &Machine) {
        let r = machine
            .guest_request(&GuestRequest::Ping, std::time::Duration::from_secs(10))
            .unwrap();
        assert!(matches!(r, GuestResponse::Pong { .. }), "{r:?}");
    }

    #[test]
    fn a_guest_reset_ends_the_machine_with_no_watcher_thread() {
        let machine = build_for_boot(&MachineConfig::builtin(16)).unwrap();
        ping(&machine);
        assert_eq!(machine.handle_events(), None, "a running machine");
        // What the guest's `out 0x64, 0xfe` does.
        machine
            .i8042
            .lock()
            .unwrap()
            .write(u64::from(0x64 - I8042_BASE), &[0xfe]);
        assert_eq!(machine.wait_for_exit(), ExitReason::GuestReset);
    }

    #[test]
    fn a_prepared_restore_finishes_paused_or_running() {
        let tmp = TempDir::new("prepared");
        let parent = build_for_boot(&MachineConfig::builtin(16)).unwrap();
        ping(&parent);
        parent
            .snapshot(&tmp.0.join("snap"), false, SnapshotMode::Full, true, false)
            .unwrap();
        parent.shutdown();
        assert_eq!(parent.wait_for_exit(), ExitReason::Requested);
        let snap = PreparedSnapshot::load(&tmp.0.join("snap")).unwrap();
        let kvm = Arc::new(vm::open_kvm().unwrap());
        // Dropped unfinished, threads started ahead end with it.
        let mut dropped = prepare_restore(&snap, kvm.clone(), RestoreRam::SnapshotFile).unwrap();
        dropped.start_vcpu_threads(true).unwrap();
        let tid = dropped.vcpu_thread_ids()[0];
        drop(dropped);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::path::Path::new(&format!("/proc/self/task/{tid}")).exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "thread {tid} lives on"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        for (paused, ahead) in [(true, false), (false, false), (true, true), (false, true)] {
            let mut prepared =
                prepare_restore(&snap, kvm.clone(), RestoreRam::SnapshotFile).unwrap();
            if ahead {
                prepared.start_vcpu_threads(true).unwrap();
                assert_eq!(prepared.vcpu_thread_ids().len(), snap.state.vcpus.len());
            }
            let child = prepared
                .finish(&RestoreConfig {
                    console: ConsoleOutput::Sink,
                    paused,
                    drive_layers: Vec::new(),
                    vsock_uds: None,
                    netns: None,
                    prewarm: false,
                    disk_quota: None,
                    taps: None,
                    uffd: None,
                    ram: RestoreRam::SnapshotFile,
                })
                .unwrap();
            if paused {
                // Handed over once its vCPU has parked.
                assert_eq!(child.status().state, RunState::Paused);
                child.resume().unwrap();
            }
            ping(&child);
            // Counted from its spawn, the vCPU thread is reached by a pause.
            child.pause().unwrap();
            assert_eq!(child.status().state, RunState::Paused);
            child.resume().unwrap();
            ping(&child);
            child.shutdown();
            assert_eq!(child.wait_for_exit(), ExitReason::Requested);
        }
    }

    /// A network namespace made for one test, deleted (with the taps in
    /// it) when dropped.
    struct Netns(String);

    impl Netns {
        fn new(tag: &str) -> Self {
            let ns = Netns(format!("forkd-b{tag}-{}", std::process::id()));
            ip(&["netns", "add", &ns.0]);
            ns
        }
    }

    impl Drop for Netns {
        fn drop(&mut self) {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", &self.0])
                .output();
        }
    }

    fn ip(args: &[&str]) {
        let out = std::process::Command::new("ip")
            .args(args)
            .output()
            .expect("this test needs the `ip` command (apt-get install iproute2)");
        assert!(
            out.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    fn a_child_attaches_to_the_tap_its_snapshot_names_in_the_namespace_it_is_given() {
        use crate::devices::virtio::net::{NetConfig, TapError};
        use crate::snapshot::SnapshotNet;
        assert!(
            std::path::Path::new("/dev/net/tun").exists(),
            "this test needs /dev/net/tun (modprobe tun) and root"
        );
        let tmp = TempDir::new("net");
        let mac = [6, 0, 0xac, 0x10, 0, 2];
        let parent_ns = Netns::new("p");
        let mut cfg = MachineConfig::builtin(16);
        cfg.virtio.nets.push(NetConfig {
            tap: "forkd0".into(),
            netns: Some(parent_ns.0.clone()),
            mac,
        });
        let parent = build_for_boot(&cfg).unwrap();
        ping(&parent);
        let dir = tmp.0.join("snap");
        let taken = parent
            .snapshot(&dir, false, SnapshotMode::Full, true, false)
            .unwrap();
        parent.shutdown();
        assert_eq!(parent.wait_for_exit(), ExitReason::Requested);
        let recorded = vec![SnapshotNet {
            tap: "forkd0".into(),
            mac: "06:00:ac:10:00:02".into(),
        }];
        assert_eq!(taken.meta.nets, recorded);
        let snap = PreparedSnapshot::load(&dir).unwrap();
        assert_eq!(snap.meta.nets, recorded);
        let child_cfg = |netns: &Netns| RestoreConfig {
            console: ConsoleOutput::Sink,
            paused: false,
            drive_layers: Vec::new(),
            vsock_uds: None,
            netns: Some(netns.0.clone()),
            prewarm: false,
            disk_quota: None,
            taps: None,
            uffd: None,
            ram: RestoreRam::SnapshotFile,
        };

        // A namespace without the tap: refused, naming both and what to
        // make, and nothing made in its place.
        let empty = Netns::new("e");
        for err in [
            check_taps(&snap, Some(&empty.0)).unwrap_err(),
            build_from_snapshot(&snap, &child_cfg(&empty))
                .err()
                .unwrap(),
        ] {
            let text = err.to_string();
            assert!(
                text.contains("\"forkd0\"")
                    && text.contains(&empty.0)
                    && text.contains("tuntap add dev forkd0 mode tap"),
                "{text}"
            );
        }
        assert!(matches!(
            Tap::check_present("forkd0", Some(&empty.0)),
            Err(TapError::Missing { .. })
        ));

        // A namespace with a persistent tap of that name: the child
        // attaches to it, and holds it (a second attach is refused).
        let kid_ns = Netns::new("k");
        ip(&[
            "-n", &kid_ns.0, "tuntap", "add", "dev", "forkd0", "mode", "tap",
        ]);
        check_taps(&snap, Some(&kid_ns.0)).unwrap();
        let child = build_from_snapshot(&snap, &child_cfg(&kid_ns)).unwrap();
        ping(&child);
        match Tap::attach("forkd0", Some(&kid_ns.0)) {
            Err(TapError::Attach { source, .. }) => {
                assert_eq!(source.raw_os_error(), Some(libc::EBUSY), "{source}")
            }
            other => panic!("a second attach to the child's tap: {other:?}"),
        }
        // The child's own snapshot names the same tap.
        let grand = child
            .snapshot(&tmp.0.join("grand"), false, SnapshotMode::Full, true, false)
            .unwrap();
        assert_eq!(grand.meta.nets, recorded);
        child.shutdown();
        assert_eq!(child.wait_for_exit(), ExitReason::Requested);
        drop(child);
        // Let go with the child: free for the next one.
        Tap::attach("forkd0", Some(&kid_ns.0)).unwrap();
    }

    #[test]
    fn every_way_a_snapshot_is_written_names_the_taps() {
        use crate::devices::virtio::net::NetConfig;
        use crate::snapshot::{self, SnapshotNet, SnapshotStatus};
        assert!(
            std::path::Path::new("/dev/net/tun").exists(),
            "this test needs /dev/net/tun (modprobe tun) and root"
        );
        let tmp = TempDir::new("net-kinds");
        let ns = Netns::new("w");
        let mut cfg = MachineConfig::builtin(16);
        cfg.backend = Backend::Memfd;
        for (i, tap) in ["forkd0", "forkd1"].iter().enumerate() {
            cfg.virtio.nets.push(NetConfig {
                tap: tap.to_string(),
                netns: Some(ns.0.clone()),
                mac: [6, 0, 0xac, 0x10, 0, 2 + i as u8],
            });
        }
        let recorded = vec![
            SnapshotNet {
                tap: "forkd0".into(),
                mac: "06:00:ac:10:00:02".into(),
            },
            SnapshotNet {
                tap: "forkd1".into(),
                mac: "06:00:ac:10:00:03".into(),
            },
        ];
        let vm = build_for_boot(&cfg).unwrap();
        ping(&vm);
        let dir = |name: &str| tmp.0.join(name);
        let taken = |name: &str, mode: SnapshotMode, wait: bool| {
            vm.snapshot(&dir(name), false, mode, wait, false)
                .unwrap()
                .meta
        };
        assert_eq!(taken("full", SnapshotMode::Full, true).nets, recorded);
        assert_eq!(taken("diff", SnapshotMode::Diff, true).nets, recorded);
        // Waiting: pre-copied where KVM allows, else write-protected.
        assert_eq!(taken("live-wait", SnapshotMode::Live, true).nets, recorded);
        // Not waiting: `writing` first, rewritten `ready` by the copy.
        assert_eq!(taken("live", SnapshotMode::Live, false).nets, recorded);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while snapshot::read_meta(&dir("live")).unwrap().status != SnapshotStatus::Ready {
            assert!(
                std::time::Instant::now() < deadline,
                "the live copy did not end"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let compacted = snapshot::compact(&dir("diff"), &dir("compact")).unwrap();
        assert_eq!(compacted.nets, recorded);
        vm.shutdown();
        assert_eq!(vm.wait_for_exit(), ExitReason::Requested);
        for name in ["full", "diff", "live-wait", "live", "compact"] {
            let loaded = PreparedSnapshot::load(&dir(name)).unwrap();
            assert_eq!(loaded.meta.nets, recorded, "{name}");
        }
    }

    /// The guest's VM generation and boot id, asked of the guest.
    fn identity(machine: &Machine) -> (u64, u64) {
        match machine
            .guest_request(&GuestRequest::Identity, std::time::Duration::from_secs(10))
            .unwrap()
        {
            GuestResponse::Identity {
                boot_id,
                generation,
            } => (boot_id, generation),
            r => panic!("{r:?}"),
        }
    }

    #[test]
    fn an_idle_builtin_guest_runs_ahead_to_its_wait_and_a_busy_one_does_not() {
        let tmp = TempDir::new("run-ahead");
        let kvm = Arc::new(vm::open_kvm().unwrap());
        for busy in [false, true] {
            let parent = build_for_boot(&MachineConfig::builtin(16)).unwrap();
            ping(&parent);
            // The guest goes back to its wait after it answers: let it get
            // there (caught on its way, it would not be run ahead).
            std::thread::sleep(std::time::Duration::from_millis(100));
            if busy {
                parent
                    .guest_request(
                        &GuestRequest::CounterStart,
                        std::time::Duration::from_secs(10),
                    )
                    .unwrap();
            }
            let dir = tmp.0.join(format!("snap-{busy}"));
            parent
                .snapshot(&dir, false, SnapshotMode::Full, true, false)
                .unwrap();
            parent.shutdown();
            assert_eq!(parent.wait_for_exit(), ExitReason::Requested);
            let snap = PreparedSnapshot::load(&dir).unwrap();
            for paused in [true, false] {
                let prepared = prepare_restore(&snap, kvm.clone(), RestoreRam::SnapshotFile)
                    .unwrap()
                    .make_ahead(&ConsoleOutput::Sink)
                    .unwrap();
                assert_eq!(prepared.runs_ahead(), !busy, "busy {busy}");
                let mut prepared = prepared;
                prepared.start_vcpu_threads(true).unwrap();
                let child = prepared
                    .finish(&RestoreConfig {
                        console: ConsoleOutput::Sink,
                        paused,
                        drive_layers: Vec::new(),
                        vsock_uds: None,
                        netns: None,
                        prewarm: false,
                        disk_quota: None,
                        taps: None,
                        uffd: None,
                        ram: RestoreRam::SnapshotFile,
                    })
                    .unwrap();
                if paused {
                    assert_eq!(child.status().state, RunState::Paused);
                    // Its wait, reached ahead, completes in the pause: a
                    // snapshot of it restores to a guest that answers (and
                    // is idle in turn, so runs ahead itself).
                    let grand = tmp.0.join(format!("grand-{busy}"));
                    child
                        .snapshot(&grand, true, SnapshotMode::Full, true, false)
                        .unwrap();
                    let grand = PreparedSnapshot::load(&grand).unwrap();
                    let prepared = prepare_restore(&grand, kvm.clone(), RestoreRam::SnapshotFile)
                        .unwrap()
                        .make_ahead(&ConsoleOutput::Sink)
                        .unwrap();
                    assert_eq!(prepared.runs_ahead(), !busy, "grandchild, busy {busy}");
                    let mut prepared = prepared;
                    prepared.start_vcpu_threads(true).unwrap();
                    let grandchild = prepared
                        .finish(&RestoreConfig {
                            console: ConsoleOutput::Sink,
                            paused: false,
                            drive_layers: Vec::new(),
                            vsock_uds: None,
                            netns: None,
                            prewarm: false,
                            disk_quota: None,
                            taps: None,
                            uffd: None,
                            ram: RestoreRam::SnapshotFile,
                        })
                        .unwrap();
                    ping(&grandchild);
                    grandchild.shutdown();
                    assert_eq!(grandchild.wait_for_exit(), ExitReason::Requested);
                    child.resume().unwrap();
                }
                ping(&child);
                child.pause().unwrap();
                child.resume().unwrap();
                ping(&child);
                child.shutdown();
                assert_eq!(child.wait_for_exit(), ExitReason::Requested);
            }
        }
    }

    #[test]
    fn devices_made_ahead_serve_the_console_asked_for_and_a_generation_of_their_own() {
        let tmp = TempDir::new("ahead");
        let parent = build_for_boot(&MachineConfig::builtin(16)).unwrap();
        let (boot_id, parent_gen) = identity(&parent);
        parent
            .snapshot(&tmp.0.join("snap"), false, SnapshotMode::Full, true, false)
            .unwrap();
        parent.shutdown();
        assert_eq!(parent.wait_for_exit(), ExitReason::Requested);
        let snap = PreparedSnapshot::load(&tmp.0.join("snap")).unwrap();
        let kvm = Arc::new(vm::open_kvm().unwrap());
        let file = |name: &str| ConsoleOutput::File(tmp.0.join(name));
        // (console made ahead, console asked for at the start)
        let cases = [
            (ConsoleOutput::Sink, ConsoleOutput::Sink),
            (ConsoleOutput::Sink, file("late.log")),
            (file("ahead.log"), file("ahead.log")),
            (file("unwanted.log"), ConsoleOutput::Sink),
            (file("moved-from.log"), file("moved-to.log")),
        ];
        let mut generations = vec![parent_gen];
        for (i, (ahead, asked)) in cases.into_iter().enumerate() {
            let mut prepared =
                prepare_restore(&snap, kvm.clone(), RestoreRam::SnapshotFile).unwrap();
            prepared.start_vcpu_threads(true).unwrap();
            let prepared = prepared.make_ahead(&ahead).unwrap();
            let child = prepared
                .finish(&RestoreConfig {
                    console: asked.clone(),
                    paused: false,
                    drive_layers: Vec::new(),
                    vsock_uds: None,
                    netns: None,
                    prewarm: false,
                    disk_quota: None,
                    taps: None,
                    uffd: None,
                    ram: RestoreRam::SnapshotFile,
                })
                .unwrap();
            let (kid_boot, kid_gen) = identity(&child);
            assert_eq!(kid_boot, boot_id, "case {i}: the boot id is inherited");
            assert!(
                !generations.contains(&kid_gen),
                "case {i}: generations repeat"
            );
            generations.push(kid_gen);
            // What the guest's UART driver does to send a byte (THR at COM1).
            let byte = b'a' + i as u8;
            child.serial.lock().unwrap().write(0, &[byte]);
            if let ConsoleOutput::File(path) = &asked {
                let text = std::fs::read(path).unwrap();
                assert_eq!(text, [byte], "case {i}: the console asked for has the byte");
            }
            if let (ConsoleOutput::File(path), true) = (&ahead, ahead != asked) {
                let text = std::fs::read(path).unwrap_or_default();
                assert!(
                    text.is_empty(),
                    "case {i}: the console made ahead stays empty"
                );
            }
            child.shutdown();
            assert_eq!(child.wait_for_exit(), ExitReason::Requested);
        }
    }
}
