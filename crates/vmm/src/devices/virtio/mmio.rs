//! The virtio-mmio transport, version 2 (virtio 1.2, section 4.2.2): the
//! register window a device sits behind on the MMIO bus.
//!
//! A Linux guest finds each window through `virtio_mmio.device=` on its
//! command line (see [`cmdline_fragment`]). Registers are 32 bits wide and
//! accessed with 32-bit loads and stores; the device-specific configuration
//! space from offset 0x100 may be accessed at any width. Accesses of other
//! widths to the registers read as zero and are ignored on write.
//!
//! The status register follows the driver's initialisation sequence:
//! ACKNOWLEDGE, DRIVER, then feature negotiation closed by FEATURES_OK
//! (refused, i.e. not set, when the driver's features are not a subset of
//! the offer or lack VIRTIO_F_VERSION_1), queue set-up, then DRIVER_OK,
//! which activates the device and starts its worker thread. Out-of-order
//! status writes are ignored; writing 0 resets the device.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

use crate::devices::gate::DeviceGate;

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_bindings::virtio_mmio::*;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::QueueT;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::{
    ActivateContext, EventRegistry, Interrupt, VirtioDevice, DEVICE_TOKEN_BASE, VIRTIO_F_VERSION_1,
};
use crate::devices::bus::BusDevice;
use crate::memory::GuestMemoryMmap;

/// "virt" in little-endian.
pub const MMIO_MAGIC: u32 = 0x7472_6976;
/// The transport version implemented (modern).
pub const MMIO_VERSION: u32 = 2;
/// Vendor ID reported: "FRKD".
pub const VENDOR_ID: u32 = u32::from_le_bytes(*b"FRKD");
/// Offset of the QueueNotify register (for ioeventfds).
pub const QUEUE_NOTIFY_OFFSET: u64 = VIRTIO_MMIO_QUEUE_NOTIFY as u64;
/// Offset of the device-specific configuration space.
pub const CONFIG_OFFSET: u64 = VIRTIO_MMIO_CONFIG as u64;

const STOP_TOKEN: u64 = DEVICE_TOKEN_BASE - 1;

/// The kernel command-line fragment that makes a Linux guest (with
/// CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES) probe a device window.
pub fn cmdline_fragment(base: u64, size: u64, irq: u32) -> String {
    format!("virtio_mmio.device={}K@{:#x}:{}", size / 1024, base, irq)
}

/// The transport's snapshot state. Plain data.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioState {
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// Features the driver has written so far.
    pub driver_features: u64,
    /// QueueSel.
    pub queue_select: u32,
    /// Status.
    pub status: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// InterruptStatus.
    pub interrupt_status: u32,
}

/// The running worker of an activated device.
struct Worker {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A virtio device behind a virtio-mmio register window.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    queue_evts: Vec<EventFd>,
    state: MmioState,
    worker: Option<Worker>,
    name: String,
    gate: Arc<DeviceGate>,
    /// A driver can fail activation over and over: logged through this.
    log_limit: crate::logger::RateLimit,
}

/// Errors creating a transport.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// An eventfd, epoll set or thread could not be created.
    #[error("cannot create the {what} of a virtio device: {source}; the process may be out of file descriptors (ulimit -n)")]
    Os {
        /// What.
        what: &'static str,
        /// Why.
        source: std::io::Error,
    },
}

/// Locks a device; a device that panicked under its lock is still the best
/// state there is, so poisoning is ignored.
pub(crate) fn lock<T: ?Sized>(d: &Mutex<T>) -> MutexGuard<'_, T> {
    d.lock().unwrap_or_else(PoisonError::into_inner)
}

impl MmioTransport {
    /// Puts `device` behind a register window. `interrupt` is the line it
    /// raises; `name` names its worker thread.
    pub fn new(
        device: Arc<Mutex<dyn VirtioDevice>>,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
        name: &str,
    ) -> Result<Self, TransportError> {
        let n = lock(&device).queues().len();
        let queue_evts = (0..n)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| TransportError::Os {
                what: "queue eventfd",
                source,
            })?;
        Ok(MmioTransport {
            device,
            mem,
            interrupt,
            queue_evts,
            state: MmioState::default(),
            worker: None,
            name: name.to_owned(),
            gate: Arc::default(),
            log_limit: crate::logger::RateLimit::per_device(),
        })
    }

    /// Makes the device's worker pass through `gate` (shared by all of a
    /// VM's devices, closed while a snapshot runs). Call before activation.
    pub fn set_gate(&mut self, gate: Arc<DeviceGate>) {
        self.gate = gate;
    }

    /// The queue-notify eventfds, one per queue, for ioeventfd registration
    /// (datamatch: the queue index as a 32-bit value at [`QUEUE_NOTIFY_OFFSET`]).
    pub fn queue_evts(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// The device's interrupt.
    pub fn interrupt(&self) -> &Arc<Interrupt> {
        &self.interrupt
    }

    /// The device behind the window.
    pub fn device(&self) -> &Arc<Mutex<dyn VirtioDevice>> {
        &self.device
    }

    /// The status register.
    pub fn status(&self) -> u32 {
        self.state.status
    }

    /// Saves the transport's registers.
    pub fn save(&self) -> MmioState {
        MmioState {
            interrupt_status: self.interrupt.status(),
            ..self.state.clone()
        }
    }

    /// Restores the registers of a transport whose device was restored
    /// already. When the saved status has DRIVER_OK the device's worker is
    /// started, every queue is looked at once (notifications in flight
    /// when the snapshot was taken are not lost), and a pending interrupt
    /// is raised again.
    pub fn restore(&mut self, state: &MmioState) -> Result<(), TransportError> {
        self.state = state.clone();
        self.state.interrupt_status = 0;
        if state.status & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            self.start_worker()?;
            for evt in &self.queue_evts {
                let _ = evt.write(1);
            }
        }
        self.interrupt.restore_status(state.interrupt_status);
        Ok(())
    }

    fn activation_context(&self, epoll: Arc<Epoll>) -> ActivateContext {
        ActivateContext {
            mem: self.mem.clone(),
            interrupt: self.interrupt.clone(),
            events: EventRegistry::new(epoll),
        }
    }

    /// Creates the worker's epoll set with the queue and stop eventfds,
    /// activates the device and starts the worker thread.
    fn start_worker(&mut self) -> Result<(), TransportError> {
        let os = |what| move |source| TransportError::Os { what, source };
        let epoll = Arc::new(Epoll::new().map_err(os("epoll set"))?);
        let stop = EventFd::new(libc::EFD_NONBLOCK).map_err(os("stop eventfd"))?;
        let mut evts = Vec::with_capacity(self.queue_evts.len());
        for (i, evt) in self.queue_evts.iter().enumerate() {
            let evt = evt.try_clone().map_err(os("queue eventfd"))?;
            epoll
                .ctl(
                    ControlOperation::Add,
                    std::os::unix::io::AsRawFd::as_raw_fd(&evt),
                    EpollEvent::new(EventSet::IN, i as u64),
                )
                .map_err(os("epoll registration"))?;
            evts.push(evt);
        }
        epoll
            .ctl(
                ControlOperation::Add,
                std::os::unix::io::AsRawFd::as_raw_fd(&stop),
                EpollEvent::new(EventSet::IN, STOP_TOKEN),
            )
            .map_err(os("epoll registration"))?;
        let ctx = self.activation_context(epoll.clone());
        {
            let mut dev = lock(&self.device);
            if let Err(e) = dev.activate(ctx) {
                drop(dev);
                crate::warn_limited!(self.log_limit, "{}: {e}", self.name);
                self.state.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
                self.interrupt.signal_config_change();
                return Ok(());
            }
        }
        let device = self.device.clone();
        let gate = self.gate.clone();
        let thread = crate::seccomp::spawn(crate::seccomp::Kind::Device, self.name.clone(), {
            move || worker_loop(epoll, evts, device, gate)
        })
        .map_err(os("worker thread"))?;
        self.worker = Some(Worker {
            stop,
            thread: Some(thread),
        });
        Ok(())
    }

    fn reset(&mut self) {
        // Stop the worker first: it must not touch the queues being reset.
        self.worker = None;
        {
            let mut dev = lock(&self.device);
            dev.reset();
            dev.set_acked_features(0);
            for q in dev.queues_mut() {
                q.reset();
            }
        }
        for evt in &self.queue_evts {
            let _ = evt.read();
        }
        self.interrupt.ack(u32::MAX);
        let generation = self.state.config_generation;
        self.state = MmioState {
            config_generation: generation,
            ..MmioState::default()
        };
    }

    fn set_status(&mut self, new: u32) {
        if new == 0 {
            self.reset();
            return;
        }
        let old = self.state.status;
        if new & VIRTIO_CONFIG_S_FAILED != 0 {
            self.state.status = old | VIRTIO_CONFIG_S_FAILED;
            return;
        }
        // The driver only ever adds bits.
        if new & old != old {
            return;
        }
        let added = new & !old;
        let ack = VIRTIO_CONFIG_S_ACKNOWLEDGE;
        let driver = ack | VIRTIO_CONFIG_S_DRIVER;
        let features_ok = driver | VIRTIO_CONFIG_S_FEATURES_OK;
        let driver_ok = features_ok | VIRTIO_CONFIG_S_DRIVER_OK;
        let ok = match added {
            0 => true,
            a if a == VIRTIO_CONFIG_S_ACKNOWLEDGE => new == ack,
            a if a == VIRTIO_CONFIG_S_DRIVER => new == driver,
            a if a == VIRTIO_CONFIG_S_FEATURES_OK => new == features_ok && self.accept_features(),
            a if a == VIRTIO_CONFIG_S_DRIVER_OK => new == driver_ok,
            _ => false,
        };
        if !ok {
            return;
        }
        self.state.status = new;
        if added == VIRTIO_CONFIG_S_DRIVER_OK {
            if let Err(e) = self.start_worker() {
                crate::warn_limited!(self.log_limit, "{}: {e}", self.name);
                self.state.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
                self.interrupt.signal_config_change();
            }
        }
    }

    /// FEATURES_OK: the driver's features must be offered and include VERSION_1.
    fn accept_features(&mut self) -> bool {
        let mut dev = lock(&self.device);
        let offered = dev.avail_features();
        let wanted = self.state.driver_features;
        if wanted & !offered != 0 || wanted & VIRTIO_F_VERSION_1 == 0 {
            return false;
        }
        dev.set_acked_features(wanted);
        let event_idx = wanted & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        for q in dev.queues_mut() {
            q.set_event_idx(event_idx);
        }
        true
    }

    /// Queue registers may be written after FEATURES_OK and before DRIVER_OK.
    fn queue_setup_allowed(&self) -> bool {
        let s = self.state.status;
        s & VIRTIO_CONFIG_S_FEATURES_OK != 0
            && s & (VIRTIO_CONFIG_S_DRIVER_OK | VIRTIO_CONFIG_S_FAILED) == 0
    }

    fn read_register(&self, offset: u32) -> u32 {
        let dev = lock(&self.device);
        let queue = dev.queues().get(self.state.queue_select as usize);
        match offset {
            VIRTIO_MMIO_MAGIC_VALUE => MMIO_MAGIC,
            VIRTIO_MMIO_VERSION => MMIO_VERSION,
            VIRTIO_MMIO_DEVICE_ID => dev.device_type(),
            VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            VIRTIO_MMIO_DEVICE_FEATURES => match self.state.device_features_sel {
                0 => dev.avail_features() as u32,
                1 => (dev.avail_features() >> 32) as u32,
                _ => 0,
            },
            VIRTIO_MMIO_QUEUE_NUM_MAX => queue.map_or(0, |q| u32::from(q.max_size())),
            VIRTIO_MMIO_QUEUE_READY => queue.map_or(0, |q| u32::from(q.ready())),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt.status(),
            VIRTIO_MMIO_STATUS => self.state.status,
            VIRTIO_MMIO_CONFIG_GENERATION => self.state.config_generation,
            // No shared memory regions: length all-ones says "none".
            VIRTIO_MMIO_SHM_LEN_LOW | VIRTIO_MMIO_SHM_LEN_HIGH => u32::MAX,
            VIRTIO_MMIO_SHM_BASE_LOW | VIRTIO_MMIO_SHM_BASE_HIGH => u32::MAX,
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u32, v: u32) {
        match offset {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.state.device_features_sel = v,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.state.driver_features_sel = v,
            VIRTIO_MMIO_DRIVER_FEATURES => {
                let s = self.state.status;
                if s & VIRTIO_CONFIG_S_DRIVER == 0 || s & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
                    return;
                }
                let f = &mut self.state.driver_features;
                match self.state.driver_features_sel {
                    0 => *f = (*f & !0xffff_ffff) | u64::from(v),
                    1 => *f = (*f & 0xffff_ffff) | (u64::from(v) << 32),
                    _ => {}
                }
            }
            VIRTIO_MMIO_QUEUE_SEL => self.state.queue_select = v,
            VIRTIO_MMIO_QUEUE_NOTIFY => {
                if let Some(evt) = self.queue_evts.get(v as usize) {
                    let _ = evt.write(1);
                }
            }
            VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt.ack(v),
            VIRTIO_MMIO_STATUS => self.set_status(v),
            VIRTIO_MMIO_QUEUE_NUM
            | VIRTIO_MMIO_QUEUE_READY
            | VIRTIO_MMIO_QUEUE_DESC_LOW
            | VIRTIO_MMIO_QUEUE_DESC_HIGH
            | VIRTIO_MMIO_QUEUE_AVAIL_LOW
            | VIRTIO_MMIO_QUEUE_AVAIL_HIGH
            | VIRTIO_MMIO_QUEUE_USED_LOW
            | VIRTIO_MMIO_QUEUE_USED_HIGH => self.write_queue_register(offset, v),
            _ => {}
        }
    }

    fn write_queue_register(&mut self, offset: u32, v: u32) {
        if !self.queue_setup_allowed() {
            return;
        }
        let mem = self.mem.clone();
        let mut dev = lock(&self.device);
        let Some(q) = dev.queues_mut().get_mut(self.state.queue_select as usize) else {
            return;
        };
        // Addresses and size are fixed once the queue is ready.
        if q.ready() && offset != VIRTIO_MMIO_QUEUE_READY {
            return;
        }
        match offset {
            // `set_size` ignores sizes that are not powers of two <= max.
            VIRTIO_MMIO_QUEUE_NUM => q.set_size(v.min(u32::from(u16::MAX)) as u16),
            VIRTIO_MMIO_QUEUE_DESC_LOW => q.set_desc_table_address(Some(v), None),
            VIRTIO_MMIO_QUEUE_DESC_HIGH => q.set_desc_table_address(None, Some(v)),
            VIRTIO_MMIO_QUEUE_AVAIL_LOW => q.set_avail_ring_address(Some(v), None),
            VIRTIO_MMIO_QUEUE_AVAIL_HIGH => q.set_avail_ring_address(None, Some(v)),
            VIRTIO_MMIO_QUEUE_USED_LOW => q.set_used_ring_address(Some(v), None),
            VIRTIO_MMIO_QUEUE_USED_HIGH => q.set_used_ring_address(None, Some(v)),
            VIRTIO_MMIO_QUEUE_READY => {
                if v == 1 {
                    // Ready only if the rings lie inside guest memory; the
                    // driver reads QueueReady back and sees the refusal.
                    q.set_ready(true);
                    if !q.is_valid(&mem) {
                        q.set_ready(false);
                    }
                } else if v == 0 {
                    q.set_ready(false);
                }
            }
            _ => {}
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_OFFSET {
            lock(&self.device).read_config(offset - CONFIG_OFFSET, data);
            return;
        }
        if data.len() != 4 || offset % 4 != 0 {
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_register(offset as u32).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_OFFSET {
            let mut dev = lock(&self.device);
            dev.write_config(offset - CONFIG_OFFSET, data);
            drop(dev);
            self.state.config_generation = self.state.config_generation.wrapping_add(1);
            return;
        }
        if data.len() != 4 || offset % 4 != 0 {
            return;
        }
        let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        self.write_register(offset as u32, v);
    }
}

/// The worker of an activated device: waits on its queue eventfds, its
/// host file descriptors and the stop eventfd, and calls into the device.
fn worker_loop(
    epoll: Arc<Epoll>,
    queue_evts: Vec<EventFd>,
    device: Arc<Mutex<dyn VirtioDevice>>,
    gate: Arc<DeviceGate>,
) {
    let mut events = vec![EpollEvent::default(); 64];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::error!("virtio worker: epoll_wait failed: {e}; the device stops");
                return;
            }
        };
        // Work waits while a snapshot holds the gate closed.
        let _passage = gate.pass();
        for ev in &events[..n] {
            let token = ev.data();
            if token == STOP_TOKEN {
                return;
            }
            if let Some(evt) = queue_evts.get(token as usize) {
                let _ = evt.read();
                lock(&device).process_queue(token as usize);
            } else if token >= DEVICE_TOKEN_BASE {
                lock(&device).process_event(token - DEVICE_TOKEN_BASE, ev.event_set());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::persist::Persist;
    use crate::devices::virtio::rng::Rng;
    use crate::devices::virtio::test_utils::{guest_memory, GuestQueue};
    use virtio_bindings::virtio_ids::VIRTIO_ID_RNG;

    fn transport() -> (MmioTransport, GuestMemoryMmap) {
        let mem = guest_memory();
        let dev = Arc::new(Mutex::new(Rng::new()));
        let irq = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        (
            MmioTransport::new(dev, mem.clone(), irq, "test-rng").unwrap(),
            mem,
        )
    }

    fn r(t: &mut MmioTransport, off: u32) -> u32 {
        let mut b = [0u8; 4];
        t.read(u64::from(off), &mut b);
        u32::from_le_bytes(b)
    }

    fn w(t: &mut MmioTransport, off: u32, v: u32) {
        t.write(u64::from(off), &v.to_le_bytes());
    }

    /// Runs the driver's sequence up to FEATURES_OK with `features`.
    fn negotiate(t: &mut MmioTransport, features: u64) -> bool {
        w(t, VIRTIO_MMIO_STATUS, 0);
        w(t, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
        w(
            t,
            VIRTIO_MMIO_STATUS,
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
        );
        w(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        w(t, VIRTIO_MMIO_DRIVER_FEATURES, features as u32);
        w(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        w(t, VIRTIO_MMIO_DRIVER_FEATURES, (features >> 32) as u32);
        let s = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK;
        w(t, VIRTIO_MMIO_STATUS, s);
        r(t, VIRTIO_MMIO_STATUS) == s
    }

    fn setup_queue(t: &mut MmioTransport, q: &GuestQueue) {
        w(t, VIRTIO_MMIO_QUEUE_SEL, 0);
        w(t, VIRTIO_MMIO_QUEUE_NUM, u32::from(q.size));
        w(t, VIRTIO_MMIO_QUEUE_DESC_LOW, q.desc_table.0 as u32);
        w(t, VIRTIO_MMIO_QUEUE_DESC_HIGH, 0);
        w(t, VIRTIO_MMIO_QUEUE_AVAIL_LOW, q.avail.0 as u32);
        w(t, VIRTIO_MMIO_QUEUE_AVAIL_HIGH, 0);
        w(t, VIRTIO_MMIO_QUEUE_USED_LOW, q.used.0 as u32);
        w(t, VIRTIO_MMIO_QUEUE_USED_HIGH, 0);
        w(t, VIRTIO_MMIO_QUEUE_READY, 1);
    }

    #[test]
    fn identification_registers() {
        let (mut t, _) = transport();
        assert_eq!(r(&mut t, VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
        assert_eq!(r(&mut t, VIRTIO_MMIO_VERSION), 2);
        assert_eq!(r(&mut t, VIRTIO_MMIO_DEVICE_ID), VIRTIO_ID_RNG);
        assert_eq!(r(&mut t, VIRTIO_MMIO_VENDOR_ID), VENDOR_ID);
        w(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        assert_eq!(
            r(&mut t, VIRTIO_MMIO_DEVICE_FEATURES),
            1,
            "VERSION_1 is bit 32"
        );
        w(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
        assert_eq!(r(&mut t, VIRTIO_MMIO_DEVICE_FEATURES), 0);
        w(&mut t, VIRTIO_MMIO_QUEUE_SEL, 0);
        assert_eq!(r(&mut t, VIRTIO_MMIO_QUEUE_NUM_MAX), 256);
        w(&mut t, VIRTIO_MMIO_QUEUE_SEL, 1);
        assert_eq!(r(&mut t, VIRTIO_MMIO_QUEUE_NUM_MAX), 0, "no second queue");
        // Narrow register accesses read as zero and do not panic.
        let mut b = [0xaau8; 2];
        t.read(0, &mut b);
        assert_eq!(b, [0, 0]);
        t.write(VIRTIO_MMIO_STATUS as u64, &[1]);
        assert_eq!(r(&mut t, VIRTIO_MMIO_STATUS), 0);
        assert_eq!(
            cmdline_fragment(0xd000_0000, 0x1000, 5),
            "virtio_mmio.device=4K@0xd0000000:5"
        );
    }

    #[test]
    fn feature_negotiation() {
        let (mut t, _) = transport();
        // Without VERSION_1 (legacy), FEATURES_OK is refused.
        assert!(!negotiate(&mut t, 0));
        // A feature that was not offered is refused.
        assert!(!negotiate(&mut t, VIRTIO_F_VERSION_1 | 1 << 5));
        assert!(negotiate(&mut t, VIRTIO_F_VERSION_1));
        assert_eq!(lock(t.device()).acked_features(), VIRTIO_F_VERSION_1);
        // Features are frozen after FEATURES_OK.
        w(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        w(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 0);
        assert_eq!(t.save().driver_features, VIRTIO_F_VERSION_1);
    }

    #[test]
    fn status_state_machine() {
        let (mut t, _) = transport();
        // DRIVER before ACKNOWLEDGE is ignored; so is DRIVER_OK before FEATURES_OK.
        w(&mut t, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_DRIVER);
        assert_eq!(r(&mut t, VIRTIO_MMIO_STATUS), 0);
        w(&mut t, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
        w(
            &mut t,
            VIRTIO_MMIO_STATUS,
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
        );
        w(
            &mut t,
            VIRTIO_MMIO_STATUS,
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_DRIVER_OK,
        );
        assert_eq!(r(&mut t, VIRTIO_MMIO_STATUS), 3);
        // Clearing bits is not a transition.
        w(&mut t, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
        assert_eq!(r(&mut t, VIRTIO_MMIO_STATUS), 3);
        // FAILED sticks on top of whatever was there.
        w(&mut t, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_FAILED);
        assert_eq!(r(&mut t, VIRTIO_MMIO_STATUS), 3 | VIRTIO_CONFIG_S_FAILED);
        // Reset.
        w(&mut t, VIRTIO_MMIO_STATUS, 0);
        assert_eq!(r(&mut t, VIRTIO_MMIO_STATUS), 0);
    }

    #[test]
    fn queue_setup_and_activation_then_reset() {
        let (mut t, mem) = transport();
        let q = GuestQueue::new(&mem, 16);
        // Queue registers before FEATURES_OK are ignored.
        setup_queue(&mut t, &q);
        assert_eq!(r(&mut t, VIRTIO_MMIO_QUEUE_READY), 0);
        assert!(negotiate(&mut t, VIRTIO_F_VERSION_1));
        // A size that is not a power of two is not taken.
        w(&mut t, VIRTIO_MMIO_QUEUE_SEL, 0);
        w(&mut t, VIRTIO_MMIO_QUEUE_NUM, 3);
        assert_eq!(lock(t.device()).queues()[0].size(), 256);
        // Rings outside guest memory: QueueReady stays 0.
        w(&mut t, VIRTIO_MMIO_QUEUE_USED_LOW, 0xffff_f000);
        w(&mut t, VIRTIO_MMIO_QUEUE_USED_HIGH, 0xff);
        w(&mut t, VIRTIO_MMIO_QUEUE_READY, 1);
        assert_eq!(r(&mut t, VIRTIO_MMIO_QUEUE_READY), 0);
        setup_queue(&mut t, &q);
        assert_eq!(r(&mut t, VIRTIO_MMIO_QUEUE_READY), 1);
        {
            let dev = lock(t.device());
            let dq = &dev.queues()[0];
            assert_eq!(dq.size(), 16);
            assert_eq!(dq.desc_table(), q.desc_table.0);
            assert_eq!(dq.avail_ring(), q.avail.0);
            assert_eq!(dq.used_ring(), q.used.0);
        }
        w(&mut t, VIRTIO_MMIO_STATUS, 0xf);
        assert_eq!(r(&mut t, VIRTIO_MMIO_STATUS), 0xf);
        assert!(lock(t.device()).is_activated());
        assert!(t.worker.is_some());

        // The device works end to end: a notify through the register, the
        // worker fills the buffer, the interrupt is raised.
        let head = q.add_chain(&[crate::devices::virtio::test_utils::D::w(0x10_0000, 64)]);
        w(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        let (id, len) = q
            .wait_used(std::time::Duration::from_secs(5))
            .expect("rng answered");
        assert_eq!((id, len), (head, 64));
        assert_eq!(
            r(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS) & INT_VRING_,
            INT_VRING_
        );
        w(&mut t, VIRTIO_MMIO_INTERRUPT_ACK, INT_VRING_);
        assert_eq!(r(&mut t, VIRTIO_MMIO_INTERRUPT_STATUS), 0);

        // Reset: worker gone, device deactivated, queues back to defaults.
        w(&mut t, VIRTIO_MMIO_STATUS, 0);
        assert!(t.worker.is_none());
        assert!(!lock(t.device()).is_activated());
        assert_eq!(r(&mut t, VIRTIO_MMIO_QUEUE_READY), 0);
        assert_eq!(lock(t.device()).acked_features(), 0);
    }

    const INT_VRING_: u32 = super::super::INT_VRING;

    #[test]
    fn save_and_restore_resumes_a_running_device() {
        let mem = guest_memory();
        let dev = Arc::new(Mutex::new(Rng::new()));
        let irq = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        let mut t = MmioTransport::new(dev.clone(), mem.clone(), irq, "rng").unwrap();
        let q = GuestQueue::new(&mem, 16);
        assert!(negotiate(&mut t, VIRTIO_F_VERSION_1));
        setup_queue(&mut t, &q);
        w(&mut t, VIRTIO_MMIO_STATUS, 0xf);
        let mmio = t.save();
        let rng_state = dev.lock().unwrap().save();
        drop(t);

        // A request offered while the snapshot was taken, never notified.
        let head = q.add_chain(&[crate::devices::virtio::test_utils::D::w(0x10_0000, 32)]);
        let dev = Arc::new(Mutex::new(Rng::restore(&rng_state, ()).unwrap()));
        let irq = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        let mut t2 = MmioTransport::new(dev, mem.clone(), irq, "restored").unwrap();
        t2.restore(&mmio).unwrap();
        assert_eq!(r(&mut t2, VIRTIO_MMIO_STATUS), 0xf);
        assert_eq!(
            q.wait_used(std::time::Duration::from_secs(5)),
            Some((head, 32)),
            "the restored device looks at its queues once"
        );
    }
}
