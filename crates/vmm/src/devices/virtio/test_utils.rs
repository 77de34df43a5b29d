//! A guest-side virtqueue driver for tests: lays out descriptor tables and
//! rings in a guest memory built by the test, offers chains and reads back
//! the used ring, the way a guest driver would.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use crate::memory::GuestMemoryMmap;

/// 16 MiB of guest memory at address 0.
pub fn guest_memory() -> GuestMemoryMmap {
    guest_memory_of(16 << 20)
}

/// `size` bytes of guest memory at address 0 (untouched pages cost nothing).
pub fn guest_memory_of(size: usize) -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).unwrap()
}

/// A descriptor as the test writes it.
#[derive(Clone, Copy, Debug)]
pub struct D {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

impl D {
    /// A device-readable buffer.
    pub fn r(addr: u64, len: u32) -> Self {
        D {
            addr,
            len,
            flags: 0,
            next: 0,
        }
    }
    /// A device-writable buffer.
    pub fn w(addr: u64, len: u32) -> Self {
        D {
            addr,
            len,
            flags: VRING_DESC_F_WRITE as u16,
            next: 0,
        }
    }
    /// An indirect table of `len` bytes at `addr`.
    pub fn indirect(addr: u64, len: u32) -> Self {
        D {
            addr,
            len,
            flags: VRING_DESC_F_INDIRECT as u16,
            next: 0,
        }
    }
    /// Chained to descriptor `next`.
    pub fn next(mut self, next: u16) -> Self {
        self.flags |= VRING_DESC_F_NEXT as u16;
        self.next = next;
        self
    }
    fn bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&self.addr.to_le_bytes());
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        b[12..14].copy_from_slice(&self.flags.to_le_bytes());
        b[14..16].copy_from_slice(&self.next.to_le_bytes());
        b
    }
}

/// Where the test driver puts one queue's table and rings, and its own
/// bookkeeping of the available ring.
pub struct GuestQueue {
    mem: GuestMemoryMmap,
    /// Descriptor table.
    pub desc_table: GuestAddress,
    /// Available ring.
    pub avail: GuestAddress,
    /// Used ring.
    pub used: GuestAddress,
    /// Entries.
    pub size: u16,
    /// Next free descriptor for [`GuestQueue::add_chain`].
    next_desc: std::cell::Cell<u16>,
    /// Used entries consumed so far.
    used_seen: std::cell::Cell<u16>,
}

impl GuestQueue {
    /// Queue layout at 0x1000 (table), 0x5000 (avail), 0x6000 (used).
    pub fn new(mem: &GuestMemoryMmap, size: u16) -> Self {
        Self::at(mem, size, 0x1000)
    }

    /// Queue layout starting at `base` (needs 0x8000 bytes).
    pub fn at(mem: &GuestMemoryMmap, size: u16, base: u64) -> Self {
        let q = GuestQueue {
            mem: mem.clone(),
            desc_table: GuestAddress(base),
            avail: GuestAddress(base + 0x4000),
            used: GuestAddress(base + 0x6000),
            size,
            next_desc: std::cell::Cell::new(0),
            used_seen: std::cell::Cell::new(0),
        };
        mem.write_slice(&[0u8; 0x8000], GuestAddress(base)).unwrap();
        q
    }

    /// Writes descriptor `i`.
    pub fn set_desc(&self, i: u16, d: D) {
        self.write_table(GuestAddress(self.desc_table.0 + u64::from(i) * 16), &[d]);
    }

    /// Writes descriptors at `at` (an indirect table, or the queue's table).
    pub fn write_table(&self, at: GuestAddress, ds: &[D]) {
        for (i, d) in ds.iter().enumerate() {
            self.mem
                .write_slice(&d.bytes(), GuestAddress(at.0 + i as u64 * 16))
                .unwrap();
        }
    }

    /// Offers the chain starting at descriptor `head` to the device.
    pub fn offer(&self, head: u16) {
        let idx: u16 = self.mem.read_obj(GuestAddress(self.avail.0 + 2)).unwrap();
        let slot = GuestAddress(self.avail.0 + 4 + u64::from(idx % self.size) * 2);
        self.mem.write_obj(head, slot).unwrap();
        self.mem
            .store(
                idx.wrapping_add(1),
                GuestAddress(self.avail.0 + 2),
                Ordering::Release,
            )
            .unwrap();
    }

    /// Writes `ds` as a chain into the next free descriptors (linking them)
    /// and offers it; returns the head index.
    pub fn add_chain(&self, ds: &[D]) -> u16 {
        let head = self.next_desc.get();
        for (i, d) in ds.iter().enumerate() {
            let idx = (head + i as u16) % self.size;
            let d = if i + 1 < ds.len() {
                d.next((idx + 1) % self.size)
            } else {
                *d
            };
            self.set_desc(idx, d);
        }
        self.next_desc.set((head + ds.len() as u16) % self.size);
        self.offer(head);
        head
    }

    /// The used ring's index.
    pub fn used_idx(&self) -> u16 {
        self.mem
            .load(GuestAddress(self.used.0 + 2), Ordering::Acquire)
            .unwrap()
    }

    /// The next used element not yet consumed, if any: (head, len).
    pub fn pop_used(&self) -> Option<(u16, u32)> {
        let seen = self.used_seen.get();
        if self.used_idx() == seen {
            return None;
        }
        let at = GuestAddress(self.used.0 + 4 + u64::from(seen % self.size) * 8);
        let id: u32 = self.mem.read_obj(at).unwrap();
        let len: u32 = self.mem.read_obj(GuestAddress(at.0 + 4)).unwrap();
        self.used_seen.set(seen.wrapping_add(1));
        Some((id as u16, len))
    }

    /// Waits (polling) for the next used element.
    pub fn wait_used(&self, timeout: Duration) -> Option<(u16, u32)> {
        let start = Instant::now();
        loop {
            if let Some(u) = self.pop_used() {
                return Some(u);
            }
            if start.elapsed() > timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Configures a device-side queue to this layout and marks it ready.
    pub fn configure(&self, q: &mut Queue) {
        q.set_size(self.size);
        q.set_desc_table_address(
            Some(self.desc_table.0 as u32),
            Some((self.desc_table.0 >> 32) as u32),
        );
        q.set_avail_ring_address(Some(self.avail.0 as u32), Some(0));
        q.set_used_ring_address(Some(self.used.0 as u32), Some(0));
        q.set_ready(true);
    }

    /// Reads `len` bytes of guest memory.
    pub fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    /// Writes bytes into guest memory.
    pub fn write(&self, addr: u64, data: &[u8]) {
        self.mem.write_slice(data, GuestAddress(addr)).unwrap();
    }
}
