//! The virtio-rng device model: one queue of device-writable buffers, each
//! filled with random bytes from the host.

use virtio_bindings::virtio_ids::VIRTIO_ID_RNG;
use virtio_queue::Queue;

use crate::devices::virtio::queue::{self, pop_chain};
use crate::devices::virtio::{
    complete, ActivateContext, ActivateError, VirtioDevice, VIRTIO_F_VERSION_1,
};
use crate::random::fill_random;

/// Entries in the request queue.
pub(super) const QUEUE_SIZE: u16 = 256;
/// Most bytes given per request: a guest asking for more gets this much
/// (the driver asks again), so one request cannot pin the worker.
const MAX_BYTES_PER_REQUEST: usize = 64 * 1024;

/// A virtio entropy device.
pub struct Rng {
    pub(super) acked_features: u64,
    pub(super) queues: Vec<Queue>,
    pub(super) active: Option<ActivateContext>,
}

impl Default for Rng {
    fn default() -> Self {
        Self::new()
    }
}

impl Rng {
    /// A new, unactivated device.
    pub fn new() -> Self {
        Rng {
            acked_features: 0,
            queues: queue::new_queues(&[QUEUE_SIZE]),
            active: None,
        }
    }

    pub(super) const AVAIL_FEATURES: u64 = VIRTIO_F_VERSION_1;

    fn process_requests(&mut self) {
        let Some(ctx) = &self.active else { return };
        let q = &mut self.queues[0];
        let mut buf = vec![0u8; 4096];
        while let Some((head, chain)) = pop_chain(q, &ctx.mem) {
            let mut written = 0u32;
            if let Ok(chain) = chain {
                let mut w = chain.writer(&ctx.mem);
                let mut left = (w.remaining() as usize).min(MAX_BYTES_PER_REQUEST);
                while left > 0 {
                    let n = left.min(buf.len());
                    if fill_random(&mut buf[..n]).is_err() {
                        break;
                    }
                    match w.write(&buf[..n]) {
                        Ok(m) if m > 0 => {
                            written += m as u32;
                            left -= m;
                        }
                        _ => break,
                    }
                }
            }
            if complete(q, &ctx.mem, &ctx.interrupt, head, written).is_err() {
                return;
            }
        }
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }
    fn avail_features(&self) -> u64 {
        Self::AVAIL_FEATURES
    }
    crate::devices::virtio::virtio_common_accessors!();
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        use virtio_queue::QueueT;
        if !self.queues[0].is_valid(&ctx.mem) {
            return Err(ActivateError::QueueNotReady(0));
        }
        self.active = Some(ctx);
        Ok(())
    }
    fn is_activated(&self) -> bool {
        self.active.is_some()
    }
    fn process_queue(&mut self, index: usize) {
        if index == 0 {
            self.process_requests();
        }
    }
    fn reset(&mut self) {
        self.active = None;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use vmm_sys_util::epoll::Epoll;
    use vmm_sys_util::eventfd::EventFd;

    use super::*;
    use crate::devices::virtio::test_utils::{guest_memory, GuestQueue, D};
    use crate::devices::virtio::{EventRegistry, Interrupt};

    #[test]
    fn fills_writable_buffers() {
        let mem = guest_memory();
        let gq = GuestQueue::new(&mem, 16);
        let mut rng = Rng::new();
        gq.configure(&mut rng.queues[0]);
        let irq = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
        rng.activate(ActivateContext {
            mem: mem.clone(),
            interrupt: irq.clone(),
            events: EventRegistry::new(Arc::new(Epoll::new().unwrap())),
        })
        .unwrap();
        let a = gq.add_chain(&[D::w(0x10_0000, 100), D::w(0x10_1000, 28)]);
        // A malformed chain comes back with nothing written and does not
        // stop the queue.
        gq.set_desc(10, D::w(0x10_0000, 1).next(10));
        gq.offer(10);
        // Larger than the per-request cap: capped.
        let c = gq.add_chain(&[D::w(0x20_0000, 100_000)]);
        rng.process_queue(0);
        assert_eq!(gq.pop_used(), Some((a, 128)));
        assert_eq!(gq.pop_used(), Some((10, 0)));
        assert_eq!(gq.pop_used(), Some((c, MAX_BYTES_PER_REQUEST as u32)));
        assert_eq!(irq.status() & crate::devices::virtio::INT_VRING, 1);
        let bytes = gq.read(0x10_0000, 100);
        assert!(bytes.iter().any(|&b| b != 0), "random bytes were written");
        assert!(gq
            .read(0x20_0000 + MAX_BYTES_PER_REQUEST as u64, 16)
            .iter()
            .all(|&b| b == 0));
    }
}
