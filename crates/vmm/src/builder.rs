//! Assembling a microVM. Every machine is put together here: RAM, the KVM
//! VM, devices, the guest's boot structures, vCPUs and their threads.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::VcpuFd;
use vmm_sys_util::eventfd::EventFd;

use crate::boot::builtin::{self, channel::Channel};
use crate::boot::{layout, linux};
use crate::devices::bus::{Bus, BusDevice, BusError};
use crate::devices::i8042::{I8042, I8042_BASE, I8042_LEN};
use crate::devices::serial::{
    ConsoleOutput, SerialConsole, SerialError, COM1_BASE, COM1_IRQ, COM1_LEN,
};
use crate::kvm::vcpu::{self, RunControl, VcpuIo};
use crate::kvm::{cpuid, msrs, vm};
use crate::machine::Machine;
use crate::memory::{self, Backend, GuestRam};

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
        }
    }
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
    /// A vCPU could not be created or configured.
    #[error("cannot set up vCPU {id}: {reason}")]
    Vcpu {
        /// Which vCPU.
        id: u8,
        /// Why.
        reason: String,
    },
    /// A thread could not be started.
    #[error("cannot start a thread: {0}")]
    Thread(std::io::Error),
}

fn device_err(device: &'static str) -> impl Fn(String) -> BuildError {
    move |reason| BuildError::Device { device, reason }
}

/// Boots a fresh machine from `cfg`.
pub fn build_for_boot(cfg: &MachineConfig) -> Result<Machine, BuildError> {
    let kvm = vm::open_kvm()?;
    let max = kvm.get_max_vcpus().min(usize::from(layout::MAX_VCPUS));
    if cfg.vcpus == 0 || usize::from(cfg.vcpus) > max {
        return Err(BuildError::VcpuCount {
            asked: cfg.vcpus,
            max,
        });
    }
    let ram = GuestRam::new(cfg.mem_mib, cfg.backend.clone())?;
    let vm = vm::Vm::new(&kvm, &ram)?;

    let reset_evt = EventFd::new(0).map_err(|e| device_err("i8042")(e.to_string()))?;
    let pio = legacy_devices(&vm, &cfg.console, &reset_evt)?;

    let mem = ram.memory();
    let (channel, entry) = match &cfg.boot {
        BootSource::Builtin => {
            let entry = builtin::load(mem, ram.size(), cfg.vcpus, random_u64())?;
            (
                Some(Arc::new(Channel::new(mem.clone()))),
                Entry::Builtin(entry),
            )
        }
        BootSource::Linux(linux_cfg) => (
            None,
            Entry::Linux(linux::load_linux(mem, linux_cfg, cfg.vcpus)?),
        ),
    };

    let supported = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| BuildError::Vcpu {
            id: 0,
            reason: format!("cannot read KVM's CPUID list: {e}"),
        })?;
    let mut vcpus = Vec::with_capacity(usize::from(cfg.vcpus));
    for id in 0..cfg.vcpus {
        vcpus.push(create_vcpu(&vm, id, cfg.vcpus, &supported, &entry)?);
    }

    let control = Arc::new(RunControl::new(channel.clone()));
    let io = VcpuIo {
        pio: Arc::new(pio),
        mmio: Arc::new(Bus::new()),
        channel: channel.clone(),
    };
    let mut vcpu_threads = Vec::with_capacity(vcpus.len());
    for (id, fd) in vcpus.into_iter().enumerate() {
        let (io, control) = (io.clone(), control.clone());
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || vcpu::run_vcpu(fd, id as u8, io, control))
            .map_err(BuildError::Thread)?;
        vcpu_threads.push(thread);
    }
    control.wait_until_started(vcpu_threads.len());
    let reset_watcher = {
        let (evt, control) = (
            reset_evt
                .try_clone()
                .map_err(|e| device_err("i8042")(e.to_string()))?,
            control.clone(),
        );
        std::thread::Builder::new()
            .name("reset".into())
            .spawn(move || {
                // Blocks until the guest pulls the reset line or the machine is dropped.
                let _ = evt.read();
                control.stop(vcpu::ExitReason::GuestReset);
            })
            .map_err(BuildError::Thread)?
    };
    Ok(Machine {
        vcpu_threads,
        reset_watcher: Some(reset_watcher),
        reset_evt,
        control,
        channel,
        vm,
        ram,
        num_vcpus: cfg.vcpus,
    })
}

enum Entry {
    Builtin(builtin::Entry),
    Linux(linux::KernelEntry),
}

/// The serial console on COM1 (interrupt through an irqfd) and the i8042.
fn legacy_devices(
    vm: &vm::Vm,
    console: &ConsoleOutput,
    reset_evt: &EventFd,
) -> Result<Bus, BuildError> {
    let serial_err = device_err("serial console");
    let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| serial_err(e.to_string()))?;
    vm.register_irqfd(&irq, COM1_IRQ)?;
    let out = console
        .open()
        .map_err(|e: SerialError| serial_err(e.to_string()))?;
    let serial: Arc<Mutex<dyn BusDevice>> = Arc::new(Mutex::new(SerialConsole::new(irq, out)));
    let i8042_evt = reset_evt
        .try_clone()
        .map_err(|e| device_err("i8042")(e.to_string()))?;
    let i8042: Arc<Mutex<dyn BusDevice>> = Arc::new(Mutex::new(I8042::new(i8042_evt)));
    let mut pio = Bus::new();
    let bus_err = |e: BusError| device_err("port I/O bus")(e.to_string());
    pio.insert(serial, u64::from(COM1_BASE), COM1_LEN)
        .map_err(bus_err)?;
    pio.insert(i8042, u64::from(I8042_BASE), I8042_LEN)
        .map_err(bus_err)?;
    Ok(pio)
}

fn create_vcpu(
    vm: &vm::Vm,
    id: u8,
    num_vcpus: u8,
    supported: &kvm_bindings::CpuId,
    entry: &Entry,
) -> Result<VcpuFd, BuildError> {
    let fail = |what: &str, e: &dyn std::fmt::Display| BuildError::Vcpu {
        id,
        reason: format!("{what}: {e}"),
    };
    let fd = vm
        .fd()
        .create_vcpu(u64::from(id))
        .map_err(|e| fail("KVM_CREATE_VCPU", &e))?;
    fd.set_cpuid2(&cpuid::vcpu_cpuid(supported, id, num_vcpus))
        .map_err(|e| fail("KVM_SET_CPUID2", &e))?;
    match entry {
        Entry::Builtin(entry) => builtin::setup_vcpu(&fd, id, *entry)?,
        Entry::Linux(entry) => {
            msrs::set_boot_msrs(&fd).map_err(|e| fail("boot MSRs", &e))?;
            vcpu::set_lint(&fd).map_err(|e| fail("local APIC LINT pins", &e))?;
            if id == 0 {
                linux::setup_linux_vcpu(&fd, entry)?;
            }
        }
    }
    Ok(fd)
}

/// A random value from the kernel (per-boot identity).
pub fn random_u64() -> u64 {
    let mut buf = [0u8; 8];
    // SAFETY: `buf` is a valid writable buffer of the given length.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    assert_eq!(n, 8, "getrandom of 8 bytes does not fail on Linux");
    u64::from_le_bytes(buf)
}

/// Builds the machine path for a kernel, for callers that take paths.
pub fn linux_boot(kernel: PathBuf, initrd: Option<PathBuf>, cmdline: Option<String>) -> BootSource {
    BootSource::Linux(linux::LinuxBootConfig {
        kernel,
        initrd,
        cmdline: cmdline.unwrap_or_else(|| linux::DEFAULT_CMDLINE.to_owned()),
    })
}
