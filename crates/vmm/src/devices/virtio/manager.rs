//! Attaching a VM's virtio devices: each gets a virtio-mmio window on the
//! MMIO bus (`layout::VIRTIO_MMIO_START + n * layout::VIRTIO_MMIO_SIZE`),
//! an interrupt line from GSI [`FIRST_IRQ`] upward raised through an irqfd,
//! an ioeventfd per queue on its QueueNotify register, and a
//! `virtio_mmio.device=` fragment for a Linux kernel's command line.
//!
//! Devices are attached in a fixed order (rng, drives, vsock, nets), so a
//! restore given the same configuration puts every device back in the
//! window and on the line the guest knows; [`VirtioDevices::restore`] also
//! takes the saved windows and lines from the snapshot and checks them.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use kvm_ioctls::IoEventAddress;
use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use super::block::{Block, BlockConfig, BlockState, DiskStack, Frozen, LayerError};
use super::mmio::{
    cmdline_fragment, lock, MmioState, MmioTransport, TransportError, QUEUE_NOTIFY_OFFSET,
};
use super::net::{Net, NetConfig, NetState, Tap};
use super::persist::PersistError;
use super::rng::{Rng, RngState};
use super::vsock::{Vsock, VsockState};
use super::{Interrupt, VirtioDevice};
use crate::boot::layout;
use crate::devices::bus::{Bus, BusDevice};
use crate::devices::gate::{Closed, DeviceGate};
use crate::devices::persist::Persist;
use crate::kvm::vm::Vm;
use crate::memory::GuestMemoryMmap;

/// The first interrupt line (GSI) of virtio devices; COM1 has 4.
pub const FIRST_IRQ: u32 = 5;
/// The last usable line: the IOAPIC has 24 pins.
pub const LAST_IRQ: u32 = 23;

/// Where a VM's virtio interrupts go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IrqRoute {
    /// Into the in-kernel irqchip through an irqfd per device (a guest
    /// kernel takes them).
    #[default]
    Irqchip,
    /// Nowhere in KVM: the interrupt eventfds are left for the VMM to wait
    /// on ([`VirtioDevices::interrupt_evts`]); the built-in guest, which has
    /// no interrupt delivery, is woken by a relay instead.
    Relay,
}

/// The vsock device's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockConfig {
    /// The Unix socket host processes connect to.
    pub uds_path: PathBuf,
    /// The guest's CID (3 or more).
    pub cid: u64,
}

/// The virtio devices of a VM.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VirtioConfig {
    /// A virtio-rng device.
    pub rng: bool,
    /// Block devices, in order (the guest sees vda, vdb, ...).
    pub drives: Vec<BlockConfig>,
    /// A vsock device.
    pub vsock: Option<VsockConfig>,
    /// Network interfaces.
    pub nets: Vec<NetConfig>,
}

impl VirtioConfig {
    /// Whether no device is configured.
    pub fn is_empty(&self) -> bool {
        !self.rng && self.drives.is_empty() && self.vsock.is_none() && self.nets.is_empty()
    }
}

/// Errors attaching or restoring devices.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// More devices than interrupt lines.
    #[error("{0} virtio devices are too many: at most {max} fit on interrupt lines {FIRST_IRQ}-{LAST_IRQ}", max = LAST_IRQ - FIRST_IRQ + 1)]
    TooMany(usize),
    /// A drive could not be opened.
    #[error("drive {index}: {source}")]
    Drive {
        /// Which drive.
        index: usize,
        /// Why.
        source: LayerError,
    },
    /// The vsock device could not be set up.
    #[error("vsock: {0}")]
    Vsock(#[from] super::vsock::VsockError),
    /// A tap could not be opened.
    #[error("network interface {index}: {source}")]
    Net {
        /// Which interface.
        index: usize,
        /// Why.
        source: super::net::TapError,
    },
    /// KVM refused an irqfd or ioeventfd.
    #[error("cannot wire virtio device {index} to KVM: {reason}")]
    Kvm {
        /// Which device.
        index: usize,
        /// Why.
        reason: String,
    },
    /// The transport could not be created.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The window could not go on the bus.
    #[error("cannot map virtio device {index}: {reason}")]
    Bus {
        /// Which device.
        index: usize,
        /// Why.
        reason: String,
    },
    /// A device's saved state does not fit.
    #[error("virtio device {index}: {source}")]
    Restore {
        /// Which device.
        index: usize,
        /// Why.
        source: PersistError,
    },
    /// The snapshot's device list does not match the backends given.
    #[error("the snapshot has {what}; restore with the same devices it was taken with")]
    Mismatch {
        /// What differs.
        what: String,
    },
}

/// A typed handle on an attached device, for operations beyond the
/// transport (saving state, freezing a drive's layer).
#[derive(Clone)]
pub enum DeviceHandle {
    /// virtio-rng.
    Rng(Arc<Mutex<Rng>>),
    /// virtio-block.
    Block(Arc<Mutex<Block>>),
    /// virtio-vsock.
    Vsock(Arc<Mutex<Vsock>>),
    /// virtio-net.
    Net(Arc<Mutex<Net>>),
}

/// One attached device.
pub struct AttachedDevice {
    /// Base address of its window.
    pub base: u64,
    /// Its interrupt line.
    pub irq: u32,
    /// The device.
    pub handle: DeviceHandle,
    /// Its transport (on the MMIO bus).
    pub transport: Arc<Mutex<MmioTransport>>,
}

/// The saved state of one device's device model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceState {
    /// virtio-rng.
    Rng(RngState),
    /// virtio-block.
    Block(BlockState),
    /// virtio-vsock.
    Vsock(VsockState),
    /// virtio-net.
    Net(NetState),
}

/// The saved state of one attached device. Plain data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachedState {
    /// Window base address.
    pub base: u64,
    /// Interrupt line.
    pub irq: u32,
    /// Transport registers.
    pub mmio: MmioState,
    /// The device model.
    pub device: DeviceState,
}

/// What a restored VM's devices run on: its own host-side resources.
#[derive(Default)]
pub struct RestoreBackends {
    /// One disk per saved drive, in order (a child's: the snapshot's frozen
    /// layers with a CoW layer of its own).
    pub drives: Vec<DiskStack>,
    /// The vsock socket path (each VM its own).
    pub vsock_uds: Option<PathBuf>,
    /// One tap per saved interface, in order.
    pub taps: Vec<Tap>,
}

/// A VM's attached virtio devices.
#[derive(Default)]
pub struct VirtioDevices {
    /// In attachment order.
    pub devices: Vec<AttachedDevice>,
    /// The gate every device worker passes through.
    gate: Arc<DeviceGate>,
    /// Where interrupts go.
    route: IrqRoute,
}

impl VirtioDevices {
    /// Creates the devices `cfg` describes and puts them on `bus`. With a
    /// `vm`, interrupts go through irqfds and queue notifications through
    /// ioeventfds; without one (tests), notifications take the MMIO exit
    /// path and interrupts only set the eventfd.
    pub fn attach(
        cfg: &VirtioConfig,
        vm: Option<&Vm>,
        mem: &GuestMemoryMmap,
        bus: &mut Bus,
    ) -> Result<Self, AttachError> {
        Self::attach_routed(cfg, vm, IrqRoute::Irqchip, mem, bus)
    }

    /// [`VirtioDevices::attach`] with interrupts going where `route` says.
    pub fn attach_routed(
        cfg: &VirtioConfig,
        vm: Option<&Vm>,
        route: IrqRoute,
        mem: &GuestMemoryMmap,
        bus: &mut Bus,
    ) -> Result<Self, AttachError> {
        let count =
            usize::from(cfg.rng) + cfg.drives.len() + cfg.vsock.iter().count() + cfg.nets.len();
        check_count(count)?;
        let mut devs = VirtioDevices {
            route,
            ..VirtioDevices::default()
        };
        if cfg.rng {
            devs.add(
                DeviceHandle::Rng(Arc::new(Mutex::new(Rng::new()))),
                vm,
                mem,
                bus,
                None,
            )?;
        }
        for (index, d) in cfg.drives.iter().enumerate() {
            let b = Block::new(d).map_err(|source| AttachError::Drive { index, source })?;
            devs.add(
                DeviceHandle::Block(Arc::new(Mutex::new(b))),
                vm,
                mem,
                bus,
                None,
            )?;
        }
        if let Some(v) = &cfg.vsock {
            let dev = Vsock::new(v.cid, &v.uds_path)?;
            devs.add(
                DeviceHandle::Vsock(Arc::new(Mutex::new(dev))),
                vm,
                mem,
                bus,
                None,
            )?;
        }
        for (index, n) in cfg.nets.iter().enumerate() {
            let dev = Net::new(n).map_err(|source| AttachError::Net { index, source })?;
            devs.add(
                DeviceHandle::Net(Arc::new(Mutex::new(dev))),
                vm,
                mem,
                bus,
                None,
            )?;
        }
        Ok(devs)
    }

    /// Rebuilds saved devices on `backends` and puts them on `bus` at their
    /// saved windows and lines; devices the guest had activated start
    /// working at once.
    pub fn restore(
        saved: &[AttachedState],
        backends: RestoreBackends,
        vm: Option<&Vm>,
        mem: &GuestMemoryMmap,
        bus: &mut Bus,
    ) -> Result<Self, AttachError> {
        Self::restore_routed(saved, backends, vm, IrqRoute::Irqchip, mem, bus)
    }

    /// [`VirtioDevices::restore`] with interrupts going where `route` says.
    pub fn restore_routed(
        saved: &[AttachedState],
        mut backends: RestoreBackends,
        vm: Option<&Vm>,
        route: IrqRoute,
        mem: &GuestMemoryMmap,
        bus: &mut Bus,
    ) -> Result<Self, AttachError> {
        check_count(saved.len())?;
        let drives = saved
            .iter()
            .filter(|s| matches!(s.device, DeviceState::Block(_)))
            .count();
        let nets = saved
            .iter()
            .filter(|s| matches!(s.device, DeviceState::Net(_)))
            .count();
        if drives != backends.drives.len() || nets != backends.taps.len() {
            return Err(AttachError::Mismatch {
                what: format!(
                    "{drives} drives and {nets} network interfaces, {} disks and {} taps were given",
                    backends.drives.len(),
                    backends.taps.len()
                ),
            });
        }
        let mut disks = backends.drives.drain(..);
        let mut taps = backends.taps.drain(..);
        let mut devs = VirtioDevices {
            route,
            ..VirtioDevices::default()
        };
        for (index, s) in saved.iter().enumerate() {
            let err = |source| AttachError::Restore { index, source };
            let handle = match &s.device {
                DeviceState::Rng(st) => {
                    DeviceHandle::Rng(Arc::new(Mutex::new(Rng::restore(st, ()).map_err(err)?)))
                }
                DeviceState::Block(st) => {
                    let disk = disks.next().expect("counted above");
                    DeviceHandle::Block(Arc::new(Mutex::new(
                        Block::restore(st, disk).map_err(err)?,
                    )))
                }
                DeviceState::Vsock(st) => {
                    let path = backends
                        .vsock_uds
                        .clone()
                        .ok_or_else(|| AttachError::Mismatch {
                            what: "a vsock device but no socket path was given for it".into(),
                        })?;
                    DeviceHandle::Vsock(Arc::new(Mutex::new(
                        Vsock::restore(st, path.clone()).map_err(err)?,
                    )))
                }
                DeviceState::Net(st) => {
                    let tap = taps.next().expect("counted above");
                    DeviceHandle::Net(Arc::new(Mutex::new(Net::restore(st, tap).map_err(err)?)))
                }
            };
            let expected = slot(index);
            if (s.base, s.irq) != expected {
                return Err(AttachError::Mismatch {
                    what: format!(
                        "device {index} at {:#x} on line {}, where this VMM puts it at {:#x} on line {}",
                        s.base, s.irq, expected.0, expected.1
                    ),
                });
            }
            devs.add(handle, vm, mem, bus, Some(&s.mmio))?;
        }
        Ok(devs)
    }

    fn add(
        &mut self,
        handle: DeviceHandle,
        vm: Option<&Vm>,
        mem: &GuestMemoryMmap,
        bus: &mut Bus,
        saved: Option<&MmioState>,
    ) -> Result<(), AttachError> {
        let index = self.devices.len();
        let (base, irq) = slot(index);
        let kvm_err = |reason: String| AttachError::Kvm { index, reason };
        let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| kvm_err(e.to_string()))?;
        if let (Some(vm), IrqRoute::Irqchip) = (vm, self.route) {
            vm.register_irqfd(&evt, irq)
                .map_err(|e| kvm_err(e.to_string()))?;
        }
        let (device, name): (Arc<Mutex<dyn VirtioDevice>>, &str) = match &handle {
            DeviceHandle::Rng(d) => (d.clone(), "virtio-rng"),
            DeviceHandle::Block(d) => (d.clone(), "virtio-blk"),
            DeviceHandle::Vsock(d) => (d.clone(), "virtio-vsock"),
            DeviceHandle::Net(d) => (d.clone(), "virtio-net"),
        };
        let mut transport =
            MmioTransport::new(device, mem.clone(), Arc::new(Interrupt::new(evt)), name)?;
        if let Some(vm) = vm {
            for (i, qevt) in transport.queue_evts().iter().enumerate() {
                vm.fd()
                    .register_ioevent(
                        qevt,
                        &IoEventAddress::Mmio(base + QUEUE_NOTIFY_OFFSET),
                        i as u32,
                    )
                    .map_err(|e| kvm_err(format!("ioeventfd for queue {i}: {e}")))?;
            }
        }
        transport.set_gate(self.gate.clone());
        if let Some(s) = saved {
            transport.restore(s)?;
        }
        let transport = Arc::new(Mutex::new(transport));
        bus.insert(
            transport.clone() as Arc<Mutex<dyn BusDevice>>,
            base,
            layout::VIRTIO_MMIO_SIZE,
        )
        .map_err(|e| AttachError::Bus {
            index,
            reason: e.to_string(),
        })?;
        self.devices.push(AttachedDevice {
            base,
            irq,
            handle,
            transport,
        });
        Ok(())
    }

    /// A copy of every device's interrupt eventfd, in attachment order (what
    /// a relay waits on when the route is [`IrqRoute::Relay`]).
    pub fn interrupt_evts(&self) -> std::io::Result<Vec<EventFd>> {
        self.devices
            .iter()
            .map(|d| lock(&d.transport).interrupt().eventfd().try_clone())
            .collect()
    }

    /// The `virtio_mmio.device=` fragments for a Linux command line,
    /// space-separated (empty without devices).
    pub fn cmdline(&self) -> String {
        self.devices
            .iter()
            .map(|d| cmdline_fragment(d.base, layout::VIRTIO_MMIO_SIZE, d.irq))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Stops every device worker between two pieces of work, until the
    /// returned guard is dropped: with the vCPUs paused too, nothing writes
    /// guest memory or device state.
    pub fn quiesce(&self) -> Closed<'_> {
        self.gate.close()
    }

    /// Saves every device (call with the vCPUs paused and the devices quiesced).
    pub fn save(&self) -> Vec<AttachedState> {
        self.devices
            .iter()
            .map(|d| AttachedState {
                base: d.base,
                irq: d.irq,
                mmio: lock(&d.transport).save(),
                device: match &d.handle {
                    DeviceHandle::Rng(x) => DeviceState::Rng(lock(x).save()),
                    DeviceHandle::Block(x) => DeviceState::Block(lock(x).save()),
                    DeviceHandle::Vsock(x) => DeviceState::Vsock(lock(x).save()),
                    DeviceHandle::Net(x) => DeviceState::Net(lock(x).save()),
                },
            })
            .collect()
    }

    /// The block devices, in order.
    pub fn drives(&self) -> Vec<Arc<Mutex<Block>>> {
        self.devices
            .iter()
            .filter_map(|d| match &d.handle {
                DeviceHandle::Block(b) => Some(b.clone()),
                _ => None,
            })
            .collect()
    }

    /// The network interfaces, in order: each one's tap name and the
    /// guest's MAC address.
    pub fn nets(&self) -> Vec<(String, [u8; 6])> {
        self.devices
            .iter()
            .filter_map(|d| match &d.handle {
                DeviceHandle::Net(n) => {
                    let n = lock(n);
                    Some((n.tap().name().to_owned(), n.mac()))
                }
                _ => None,
            })
            .collect()
    }

    /// Freezes every drive's CoW layer (drive `i` continues on
    /// `new_tops[i]`); what a snapshot or BRANCH keeps of the disks. Call
    /// with the vCPUs paused.
    pub fn freeze_drives(&self, new_tops: &[PathBuf]) -> Result<Vec<Frozen>, AttachError> {
        let drives = self.drives();
        if drives.len() != new_tops.len() {
            return Err(AttachError::Mismatch {
                what: format!(
                    "{} drives, {} new layers were given",
                    drives.len(),
                    new_tops.len()
                ),
            });
        }
        drives
            .iter()
            .zip(new_tops)
            .enumerate()
            .map(|(index, (d, p))| {
                lock(d)
                    .freeze_layer(p)
                    .map_err(|source| AttachError::Drive { index, source })
            })
            .collect()
    }
}

fn check_count(n: usize) -> Result<(), AttachError> {
    if n > (LAST_IRQ - FIRST_IRQ + 1) as usize {
        return Err(AttachError::TooMany(n));
    }
    Ok(())
}

/// Window base and interrupt line of device `index`.
fn slot(index: usize) -> (u64, u32) {
    (
        layout::VIRTIO_MMIO_START + index as u64 * layout::VIRTIO_MMIO_SIZE,
        FIRST_IRQ + index as u32,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::block::DiskConfig;
    use crate::devices::virtio::test_utils::guest_memory;

    #[test]
    fn devices_get_windows_lines_and_cmdline() {
        let dir = std::env::temp_dir().join(format!("forkd-mgr-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mem = guest_memory();
        let mut bus = Bus::new();
        let cfg = VirtioConfig {
            rng: true,
            drives: vec![BlockConfig {
                disk: DiskConfig {
                    size: 1 << 20,
                    cow: Some(dir.join("d.cow")),
                    ..Default::default()
                },
                id: "d0".into(),
            }],
            vsock: Some(VsockConfig {
                uds_path: dir.join("v.sock"),
                cid: 3,
            }),
            nets: vec![],
        };
        let devs = VirtioDevices::attach(&cfg, None, &mem, &mut bus).unwrap();
        assert_eq!(
            devs.cmdline(),
            "virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6 \
             virtio_mmio.device=4K@0xd0002000:7"
        );
        // Each window answers with its device ID.
        for (i, id) in [4u32, 2, 19].iter().enumerate() {
            let mut b = [0u8; 4];
            assert!(bus.read(0xd000_0000 + i as u64 * 0x1000, &mut b));
            assert_eq!(u32::from_le_bytes(b), 0x7472_6976);
            assert!(bus.read(0xd000_0008 + i as u64 * 0x1000, &mut b));
            assert_eq!(u32::from_le_bytes(b), *id);
        }
        // Save, then restore onto a fresh bus with new backends.
        let saved = devs.save();
        let frozen = devs.freeze_drives(&[dir.join("d2.cow")]).unwrap();
        drop(devs);
        drop(bus);
        let mut child_disk = frozen[0].chain.clone();
        child_disk.cow = Some(dir.join("child.cow"));
        let mut bus = Bus::new();
        let restored = VirtioDevices::restore(
            &saved,
            RestoreBackends {
                drives: vec![DiskStack::open(&child_disk).unwrap()],
                vsock_uds: Some(dir.join("v2.sock")),
                taps: vec![],
            },
            None,
            &mem,
            &mut bus,
        )
        .unwrap();
        assert_eq!(restored.save(), saved);
        // Missing backends are refused.
        let err = VirtioDevices::restore(
            &saved,
            RestoreBackends::default(),
            None,
            &mem,
            &mut Bus::new(),
        )
        .err()
        .unwrap();
        assert!(matches!(err, AttachError::Mismatch { .. }), "{err}");
        drop(restored);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn too_many_devices_are_refused() {
        let cfg = VirtioConfig {
            drives: vec![BlockConfig::default(); 20],
            ..Default::default()
        };
        let err = VirtioDevices::attach(&cfg, None, &guest_memory(), &mut Bus::new())
            .err()
            .unwrap();
        assert!(matches!(err, AttachError::TooMany(20)));
    }
}
