//! Virtio devices on the virtio-mmio transport (version 2, modern only).
//!
//! The house, one room per concern:
//!
//! - [`queue`]: split virtqueues. Ring bookkeeping (available and used
//!   rings, notification suppression) is the rust-vmm `virtio-queue`
//!   crate's `Queue`; descriptor chains are parsed by our own strict parser,
//!   which turns every malformed chain into an error (see its module doc).
//! - [`mmio`]: the virtio-mmio register window a device sits behind on the
//!   MMIO bus, its status state machine, and the worker thread that runs an
//!   activated device.
//! - One folder per device, each with the same rooms: `device.rs` (the
//!   device model: features, config space, queue processing) and
//!   `persist.rs` (its snapshot state, a plain serde struct, with `save` and
//!   `restore`), plus what only that device needs (`block::layers`,
//!   `net::tap`, `vsock::packet`).
//! - [`manager`]: attaches a VM's devices (windows, interrupt lines, irqfds
//!   and ioeventfds, the kernel command line) and saves, restores and
//!   freezes them together.
//!
//! Threading: a device is a plain state machine behind a mutex. Once the
//! driver sets DRIVER_OK, the transport starts one worker thread per device
//! that waits (epoll) on the device's queue-notify eventfds and on whatever
//! host file descriptors the device registers (sockets, tap), and calls into
//! the device under its mutex. Queue notifications reach those eventfds
//! either through a KVM ioeventfd (no VM exit to userspace) or through the
//! QueueNotify register write, whichever the VM was built with. Saving state
//! takes the same mutex, so it never sees a half-processed request.

pub mod block;
pub mod manager;
pub mod mmio;
pub mod net;
pub mod persist;
pub mod queue;
pub mod rng;
pub mod vsock;

#[cfg(test)]
pub(crate) mod test_utils;

use std::os::unix::io::RawFd;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::Queue;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::memory::GuestMemoryMmap;

/// Feature bit every device offers and every driver must accept: the device
/// speaks virtio 1.x (modern) only.
pub const VIRTIO_F_VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;

/// Interrupt status bit: a queue has new used buffers.
pub const INT_VRING: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;
/// Interrupt status bit: the device configuration changed.
pub const INT_CONFIG: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_CONFIG;

/// The interrupt line of one device: the interrupt status register the
/// driver reads and acknowledges, and the eventfd that raises the line
/// (registered as an irqfd with the in-kernel irqchip).
#[derive(Debug)]
pub struct Interrupt {
    status: AtomicU32,
    evt: EventFd,
}

impl Interrupt {
    /// An interrupt that fires `evt` (an irqfd, or a plain eventfd in tests).
    pub fn new(evt: EventFd) -> Self {
        Interrupt {
            status: AtomicU32::new(0),
            evt,
        }
    }

    /// Tells the driver that a queue has new used buffers.
    pub fn signal_used_queue(&self) {
        self.signal(INT_VRING);
    }

    /// Tells the driver that the configuration space changed.
    pub fn signal_config_change(&self) {
        self.signal(INT_CONFIG);
    }

    fn signal(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::SeqCst);
        // A full eventfd counter (2^64 - 2 pending writes) is the only
        // failure, and then the line is already raised.
        let _ = self.evt.write(1);
    }

    /// The interrupt status register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// The driver acknowledges the bits in `bits`.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Sets the status register (restore) and raises the line if any bit is set.
    pub fn restore_status(&self, status: u32) {
        self.status.store(status, Ordering::SeqCst);
        if status != 0 {
            let _ = self.evt.write(1);
        }
    }

    /// The eventfd behind the line.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

/// Device tokens start here in the worker's epoll set; below are the
/// transport's own (queue notifications and the stop event).
const DEVICE_TOKEN_BASE: u64 = 1 << 32;

/// Lets an activated device add its host file descriptors (sockets, tap) to
/// the epoll set of its worker thread. Events on them come back to
/// [`VirtioDevice::process_event`] with the token the device chose.
#[derive(Clone, Debug)]
pub struct EventRegistry {
    epoll: Arc<Epoll>,
}

impl EventRegistry {
    pub(crate) fn new(epoll: Arc<Epoll>) -> Self {
        EventRegistry { epoll }
    }

    fn ctl(
        &self,
        op: ControlOperation,
        fd: RawFd,
        token: u64,
        events: EventSet,
    ) -> std::io::Result<()> {
        let token = token
            .checked_add(DEVICE_TOKEN_BASE)
            .ok_or_else(|| std::io::Error::other("device event token out of range"))?;
        self.epoll.ctl(op, fd, EpollEvent::new(events, token))
    }

    /// Watches `fd` for `events` (level-triggered), reporting `token`.
    pub fn add(&self, fd: RawFd, token: u64, events: EventSet) -> std::io::Result<()> {
        self.ctl(ControlOperation::Add, fd, token, events)
    }

    /// Changes what `fd` is watched for.
    pub fn modify(&self, fd: RawFd, token: u64, events: EventSet) -> std::io::Result<()> {
        self.ctl(ControlOperation::Modify, fd, token, events)
    }

    /// Stops watching `fd`.
    pub fn remove(&self, fd: RawFd) -> std::io::Result<()> {
        self.epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default())
    }
}

/// What a device gets when the driver sets DRIVER_OK.
#[derive(Clone, Debug)]
pub struct ActivateContext {
    /// Guest memory, for the device's queues and buffers.
    pub mem: GuestMemoryMmap,
    /// The device's interrupt line.
    pub interrupt: Arc<Interrupt>,
    /// Where the device registers its host file descriptors.
    pub events: EventRegistry,
}

/// Errors activating a device.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver set DRIVER_OK with a queue the device needs not ready.
    #[error("queue {0} is not ready or its rings lie outside guest memory; the driver must set it up before DRIVER_OK")]
    QueueNotReady(usize),
    /// The device's host side could not be set up.
    #[error("cannot start the device's host side: {0}")]
    Backend(String),
}

/// A virtio device model, driven by a transport.
///
/// The device owns its queues; the transport configures them through
/// [`VirtioDevice::queues_mut`] while the driver sets them up, and hands
/// the device guest memory and its interrupt at activation.
pub trait VirtioDevice: Send {
    /// The virtio device ID (`virtio_ids`).
    fn device_type(&self) -> u32;
    /// Features the device offers.
    fn avail_features(&self) -> u64;
    /// Features the driver accepted.
    fn acked_features(&self) -> u64;
    /// Records the features the driver accepted (a subset of the offer).
    fn set_acked_features(&mut self, features: u64);
    /// The device's queues.
    fn queues(&self) -> &[Queue];
    /// The device's queues, to configure.
    fn queues_mut(&mut self) -> &mut [Queue];
    /// Reads the device-specific configuration space. `offset + data.len()`
    /// may exceed it: bytes past its end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific configuration space (ignored unless the
    /// device has writable fields).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// Starts the device: the driver set DRIVER_OK.
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError>;
    /// Whether the device is activated.
    fn is_activated(&self) -> bool;
    /// The driver notified queue `index` (or the device is asked to look at
    /// it again after a restore).
    fn process_queue(&mut self, index: usize);
    /// A host file descriptor the device registered is ready.
    fn process_event(&mut self, _token: u64, _events: EventSet) {}
    /// Returns the device to its pre-activation state (the driver wrote 0
    /// to Status). Host connections are closed; queues are reset by the
    /// transport.
    fn reset(&mut self);
}

/// The [`VirtioDevice`] accessors every device implements the same way,
/// over its `acked_features: u64` and `queues: Vec<Queue>` fields. Used
/// inside each device's `impl VirtioDevice` block.
macro_rules! virtio_common_accessors {
    () => {
        fn acked_features(&self) -> u64 {
            self.acked_features
        }
        fn set_acked_features(&mut self, features: u64) {
            self.acked_features = features;
        }
        fn queues(&self) -> &[Queue] {
            &self.queues
        }
        fn queues_mut(&mut self) -> &mut [Queue] {
            &mut self.queues
        }
    };
}
pub(crate) use virtio_common_accessors;

/// Copies the part of `config` that `[offset, offset + data.len())` covers
/// into `data`; bytes past the end of `config` read as zero.
pub(crate) fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(offset) = usize::try_from(offset) else {
        return;
    };
    if offset >= config.len() {
        return;
    }
    let n = data.len().min(config.len() - offset);
    data[..n].copy_from_slice(&config[offset..offset + n]);
}

/// Adds a used buffer to `queue` and raises the interrupt if the driver
/// wants one. A failure means the used ring is outside guest memory: the
/// driver broke the queue, and the device can only stop using it.
pub(crate) fn complete(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    interrupt: &Interrupt,
    head: u16,
    len: u32,
) -> Result<(), virtio_queue::Error> {
    use virtio_queue::QueueT;
    queue.add_used(mem, head, len)?;
    if queue.needs_notification(mem)? {
        interrupt.signal_used_queue();
    }
    Ok(())
}
