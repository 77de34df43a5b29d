//! Split virtqueues: strict descriptor-chain parsing, reading and writing a
//! chain's buffers, and the queue's snapshot state.
//!
//! Ring bookkeeping is the rust-vmm `virtio-queue` crate's [`Queue`]
//! (version 0.18 builds against the workspace's vm-memory 0.18): it reads
//! the available ring, writes the used ring and implements notification
//! suppression. Its `DescriptorChain` iterator, though, ends silently when
//! a chain loops, names a descriptor past the table, or points at a bad
//! indirect table, so a truncated chain is indistinguishable from a
//! complete one (a block request would then write its status byte into a
//! data buffer). We take only the chain's head index from it and walk the
//! chain here, where every malformation is a [`ChainError`]:
//!
//! - a head or `next` index past the table, a chain longer than the queue
//!   (which is how a loop shows), an unreadable descriptor table;
//! - an indirect descriptor inside an indirect table or with NEXT set, an
//!   indirect table whose length is zero, not a multiple of 16, longer than
//!   the queue, or outside guest memory;
//! - a buffer not wholly inside guest memory, a chain of more than 4 GiB
//!   in total, a device-readable buffer after a device-writable one.
//!
//! Every guest-memory access goes through vm-memory's checked `Bytes`
//! methods, so a hostile address is an error, never a host memory access.

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor as RawDesc;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use crate::memory::GuestMemoryMmap;

/// Size of one descriptor in a table.
const DESC_SIZE: u64 = 16;

/// Why a descriptor chain was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// A head or `next` index past the end of the table it indexes.
    #[error("descriptor index {index} is past the end of a table of {size} descriptors")]
    IndexOutOfRange {
        /// The index.
        index: u16,
        /// Descriptors in the table.
        size: u16,
    },
    /// More descriptors than the table holds: the chain loops.
    #[error("the chain has more than {0} descriptors: it loops")]
    TooLong(u16),
    /// A descriptor could not be read from guest memory.
    #[error("cannot read the descriptor at {0:#x}: it is outside guest memory")]
    DescriptorUnreadable(u64),
    /// An indirect descriptor inside an indirect table.
    #[error("an indirect table refers to another indirect table")]
    NestedIndirect,
    /// An indirect descriptor with NEXT set.
    #[error("an indirect descriptor has the NEXT flag set")]
    IndirectWithNext,
    /// An indirect table of a wrong size.
    #[error("indirect table of {len} bytes: must be a non-zero multiple of 16 holding at most {max} descriptors")]
    IndirectBadLength {
        /// Its length in bytes.
        len: u32,
        /// Most descriptors allowed.
        max: u16,
    },
    /// A buffer not wholly inside guest memory.
    #[error("buffer [{addr:#x}, +{len:#x}) is not inside guest memory")]
    BufferOutOfRange {
        /// Start.
        addr: u64,
        /// Length.
        len: u32,
    },
    /// Buffers adding up to more than 4 GiB.
    #[error("the chain's buffers add up to more than 4 GiB")]
    TotalTooLarge,
    /// A device-readable buffer after a device-writable one.
    #[error("a device-readable buffer follows a device-writable one")]
    ReadableAfterWritable,
}

/// One buffer of a chain, already checked to lie inside guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buffer {
    /// Guest address.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable (else device-readable).
    pub writable: bool,
}

/// A validated descriptor chain: its head index (what goes into the used
/// ring) and its buffers, device-readable ones first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DescriptorChain {
    /// Head descriptor index.
    pub head: u16,
    /// The buffers, in chain order.
    pub buffers: Vec<Buffer>,
}

impl DescriptorChain {
    /// Walks the chain starting at `head` in the descriptor table at
    /// `table` of `size` entries.
    pub fn parse(
        mem: &GuestMemoryMmap,
        table: GuestAddress,
        size: u16,
        head: u16,
    ) -> Result<Self, ChainError> {
        let mut buffers = Vec::new();
        let mut total: u64 = 0;
        let mut seen_writable = false;
        // Direct table first; switch to an indirect table at most once.
        let (mut table, mut size, mut index, mut indirect) = (table, size, head, false);
        // Total descriptors in the chain, indirect ones included, are bounded
        // by the queue size (virtio 1.2, 2.7.5.3.1).
        let limit = size;
        let mut count: u16 = 0;
        loop {
            if index >= size {
                return Err(ChainError::IndexOutOfRange { index, size });
            }
            if count >= limit {
                return Err(ChainError::TooLong(limit));
            }
            count += 1;
            let at = table
                .checked_add(u64::from(index) * DESC_SIZE)
                .ok_or(ChainError::DescriptorUnreadable(table.raw_value()))?;
            let desc: RawDesc = mem
                .read_obj(at)
                .map_err(|_| ChainError::DescriptorUnreadable(at.raw_value()))?;
            let flags = desc.flags();
            if u32::from(flags) & VRING_DESC_F_INDIRECT != 0 {
                if indirect {
                    return Err(ChainError::NestedIndirect);
                }
                if u32::from(flags) & VRING_DESC_F_NEXT != 0 {
                    return Err(ChainError::IndirectWithNext);
                }
                let len = desc.len();
                let entries = u64::from(len) / DESC_SIZE;
                if len == 0 || u64::from(len) % DESC_SIZE != 0 || entries > u64::from(limit) {
                    return Err(ChainError::IndirectBadLength { len, max: limit });
                }
                if !in_memory(mem, desc.addr(), len as usize) {
                    return Err(ChainError::BufferOutOfRange {
                        addr: desc.addr().raw_value(),
                        len,
                    });
                }
                // `entries <= limit`, so it fits in a u16.
                table = desc.addr();
                size = entries as u16;
                index = 0;
                indirect = true;
                // The table's own entries are bounded by the queue size
                // again (a loop inside it shows as too many descriptors).
                count = 0;
                continue;
            }
            let writable = u32::from(flags) & VRING_DESC_F_WRITE != 0;
            if writable {
                seen_writable = true;
            } else if seen_writable {
                return Err(ChainError::ReadableAfterWritable);
            }
            let len = desc.len();
            if len > 0 && !in_memory(mem, desc.addr(), len as usize) {
                return Err(ChainError::BufferOutOfRange {
                    addr: desc.addr().raw_value(),
                    len,
                });
            }
            total += u64::from(len);
            if total > u64::from(u32::MAX) {
                return Err(ChainError::TotalTooLarge);
            }
            buffers.push(Buffer {
                addr: desc.addr(),
                len,
                writable,
            });
            if u32::from(flags) & VRING_DESC_F_NEXT == 0 {
                return Ok(DescriptorChain { head, buffers });
            }
            index = desc.next();
        }
    }

    /// Total bytes of the device-readable buffers.
    pub fn readable_len(&self) -> u64 {
        self.buffers
            .iter()
            .filter(|b| !b.writable)
            .map(|b| u64::from(b.len))
            .sum()
    }

    /// Total bytes of the device-writable buffers.
    pub fn writable_len(&self) -> u64 {
        self.buffers
            .iter()
            .filter(|b| b.writable)
            .map(|b| u64::from(b.len))
            .sum()
    }

    /// A cursor over the device-readable buffers.
    pub fn reader<'a>(&self, mem: &'a GuestMemoryMmap) -> Cursor<'a> {
        Cursor::new(
            mem,
            self.buffers
                .iter()
                .filter(|b| !b.writable)
                .copied()
                .collect(),
        )
    }

    /// A cursor over the device-writable buffers.
    pub fn writer<'a>(&self, mem: &'a GuestMemoryMmap) -> Cursor<'a> {
        Cursor::new(
            mem,
            self.buffers
                .iter()
                .filter(|b| b.writable)
                .copied()
                .collect(),
        )
    }
}

/// Errors moving bytes through a [`Cursor`].
#[derive(Debug, thiserror::Error)]
pub enum CursorError {
    /// Guest memory refused the access (cannot happen for validated
    /// buffers unless memory was unplugged).
    #[error("guest memory access failed: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

/// Reads or writes a sequence of guest buffers as one byte stream.
#[derive(Debug)]
pub struct Cursor<'a> {
    mem: &'a GuestMemoryMmap,
    buffers: Vec<Buffer>,
    /// Index of the current buffer and offset within it.
    idx: usize,
    off: u32,
    /// Bytes moved so far.
    done: u64,
}

impl<'a> Cursor<'a> {
    fn new(mem: &'a GuestMemoryMmap, buffers: Vec<Buffer>) -> Self {
        Cursor {
            mem,
            buffers,
            idx: 0,
            off: 0,
            done: 0,
        }
    }

    /// Bytes left.
    pub fn remaining(&self) -> u64 {
        let total: u64 = self.buffers.iter().map(|b| u64::from(b.len)).sum();
        total - self.done
    }

    /// Bytes moved so far.
    pub fn done(&self) -> u64 {
        self.done
    }

    fn step<F>(&mut self, want: usize, mut f: F) -> Result<usize, CursorError>
    where
        F: FnMut(GuestAddress, usize, usize) -> Result<(), vm_memory::GuestMemoryError>,
    {
        let mut moved = 0usize;
        while moved < want && self.idx < self.buffers.len() {
            let b = self.buffers[self.idx];
            let left = (b.len - self.off) as usize;
            if left == 0 {
                self.idx += 1;
                self.off = 0;
                continue;
            }
            let n = left.min(want - moved);
            // In range: the buffer was checked against guest memory when
            // the chain was parsed, and `off + n <= len`.
            f(b.addr.unchecked_add(u64::from(self.off)), moved, n)?;
            moved += n;
            self.off += n as u32;
            self.done += n as u64;
        }
        Ok(moved)
    }

    /// Copies up to `buf.len()` bytes out of the guest buffers; returns how many.
    pub fn read(&mut self, buf: &mut [u8]) -> Result<usize, CursorError> {
        let mem = self.mem;
        self.step(buf.len(), |addr, at, n| {
            mem.read_slice(&mut buf[at..at + n], addr)
        })
    }

    /// Copies up to `buf.len()` bytes into the guest buffers; returns how many.
    pub fn write(&mut self, buf: &[u8]) -> Result<usize, CursorError> {
        let mem = self.mem;
        self.step(buf.len(), |addr, at, n| {
            mem.write_slice(&buf[at..at + n], addr)
        })
    }

    /// Skips `n` bytes; returns how many were skipped.
    pub fn skip(&mut self, n: usize) -> usize {
        self.step(n, |_, _, _| Ok(())).unwrap_or(0)
    }
}

/// Takes the next available chain from `queue` and validates it.
///
/// `None` when the queue has nothing new (or is unusable). `Some(Err)` for a
/// malformed chain: the chain is consumed, and the caller should return its
/// head to the used ring with length 0 so the driver gets it back.
pub fn pop_chain(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
) -> Option<(u16, Result<DescriptorChain, ChainError>)> {
    let head = queue.pop_descriptor_chain(mem)?.head_index();
    let parsed = DescriptorChain::parse(mem, GuestAddress(queue.desc_table()), queue.size(), head);
    Some((head, parsed))
}

/// Whether the driver has made buffers available that the device has not
/// taken yet.
pub fn has_available(queue: &Queue, mem: &GuestMemoryMmap) -> bool {
    if !queue.ready() {
        return false;
    }
    match queue.avail_idx(mem, std::sync::atomic::Ordering::Acquire) {
        Ok(idx) => idx.0 != queue.next_avail(),
        Err(_) => false,
    }
}

/// A queue's snapshot state: what the driver configured and how far the
/// device got. Plain data; [`restore_queue`] validates it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueState {
    /// Largest size the device offers.
    pub max_size: u16,
    /// Size the driver chose.
    pub size: u16,
    /// The driver set QueueReady.
    pub ready: bool,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Available ring address.
    pub avail_ring: u64,
    /// Used ring address.
    pub used_ring: u64,
    /// Next available-ring entry the device will take.
    pub next_avail: u16,
    /// Next used-ring entry the device will write.
    pub next_used: u16,
    /// VIRTIO_F_RING_EVENT_IDX was negotiated.
    pub event_idx: bool,
}

/// Errors restoring a queue.
#[derive(Debug, thiserror::Error)]
pub enum QueueRestoreError {
    /// The saved state does not describe a valid queue.
    #[error("saved queue state is invalid ({0}); the snapshot is corrupt or from an incompatible version")]
    Invalid(virtio_queue::Error),
    /// The saved maximum size is not what this device offers.
    #[error("saved queue has maximum size {saved}, this device offers {offered}")]
    MaxSize {
        /// In the snapshot.
        saved: u16,
        /// Now.
        offered: u16,
    },
}

/// Saves a queue's state.
pub fn save_queue(q: &Queue) -> QueueState {
    let s = q.state();
    QueueState {
        max_size: s.max_size,
        size: s.size,
        ready: s.ready,
        desc_table: s.desc_table,
        avail_ring: s.avail_ring,
        used_ring: s.used_ring,
        next_avail: s.next_avail,
        next_used: s.next_used,
        event_idx: s.event_idx_enabled,
    }
}

/// Rebuilds a queue from its saved state, checking it against the maximum
/// size the device offers.
pub fn restore_queue(s: &QueueState, max_size: u16) -> Result<Queue, QueueRestoreError> {
    if s.max_size != max_size {
        return Err(QueueRestoreError::MaxSize {
            saved: s.max_size,
            offered: max_size,
        });
    }
    let state = virtio_queue::QueueState {
        max_size: s.max_size,
        next_avail: s.next_avail,
        next_used: s.next_used,
        event_idx_enabled: s.event_idx,
        size: s.size,
        ready: s.ready,
        desc_table: s.desc_table,
        avail_ring: s.avail_ring,
        used_ring: s.used_ring,
    };
    Queue::try_from(state).map_err(QueueRestoreError::Invalid)
}

/// New queues of the given maximum sizes.
pub fn new_queues(max_sizes: &[u16]) -> Vec<Queue> {
    max_sizes
        .iter()
        // A power of two no larger than 32768 is always accepted.
        .map(|&s| Queue::new(s).expect("queue maximum sizes are powers of two <= 32768"))
        .collect()
}

/// Whether `len` bytes at `addr` lie inside guest memory.
pub fn in_memory(mem: &GuestMemoryMmap, addr: GuestAddress, len: usize) -> bool {
    GuestMemoryBackend::check_range(mem, addr, len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_utils::{guest_memory, GuestQueue, D};

    fn parse(
        mem: &GuestMemoryMmap,
        q: &GuestQueue,
        head: u16,
    ) -> Result<DescriptorChain, ChainError> {
        DescriptorChain::parse(mem, q.desc_table, q.size, head)
    }

    #[test]
    fn single_and_chained_descriptors() {
        let mem = guest_memory();
        let q = GuestQueue::new(&mem, 16);
        q.set_desc(0, D::r(0x10000, 16).next(1));
        q.set_desc(1, D::r(0x11000, 512).next(2));
        q.set_desc(2, D::w(0x12000, 1));
        let c = parse(&mem, &q, 0).unwrap();
        assert_eq!(c.head, 0);
        assert_eq!(c.buffers.len(), 3);
        assert_eq!(c.readable_len(), 528);
        assert_eq!(c.writable_len(), 1);
        assert!(!c.buffers[1].writable && c.buffers[2].writable);

        q.set_desc(5, D::w(0x13000, 64));
        let c = parse(&mem, &q, 5).unwrap();
        assert_eq!(
            c.buffers,
            vec![Buffer {
                addr: GuestAddress(0x13000),
                len: 64,
                writable: true
            }]
        );
    }

    #[test]
    fn indirect_table() {
        let mem = guest_memory();
        let q = GuestQueue::new(&mem, 16);
        let table = GuestAddress(0x20000);
        q.write_table(
            table,
            &[
                D::r(0x10000, 16).next(1),
                D::r(0x11000, 8).next(2),
                D::w(0x12000, 1),
            ],
        );
        q.set_desc(3, D::indirect(table.0, 3 * 16));
        let c = parse(&mem, &q, 3).unwrap();
        assert_eq!(c.head, 3);
        assert_eq!(c.buffers.len(), 3);
        assert_eq!(c.readable_len(), 24);
        // Direct descriptors before the indirect one are part of the chain.
        q.set_desc(4, D::r(0x14000, 4).next(3));
        assert_eq!(parse(&mem, &q, 4).unwrap().buffers.len(), 4);
    }

    #[test]
    fn loops_are_errors() {
        let mem = guest_memory();
        let q = GuestQueue::new(&mem, 8);
        q.set_desc(0, D::r(0x10000, 1).next(1));
        q.set_desc(1, D::r(0x10000, 1).next(0));
        assert_eq!(parse(&mem, &q, 0), Err(ChainError::TooLong(8)));
        // A descriptor pointing at itself.
        q.set_desc(2, D::r(0x10000, 1).next(2));
        assert_eq!(parse(&mem, &q, 2), Err(ChainError::TooLong(8)));
        // A loop inside an indirect table.
        let table = GuestAddress(0x20000);
        q.write_table(table, &[D::r(0x10000, 1).next(1), D::r(0x10000, 1).next(0)]);
        q.set_desc(3, D::indirect(table.0, 32));
        assert!(matches!(parse(&mem, &q, 3), Err(ChainError::TooLong(_))));
    }

    #[test]
    fn out_of_range_indices_are_errors() {
        let mem = guest_memory();
        let q = GuestQueue::new(&mem, 8);
        assert_eq!(
            parse(&mem, &q, 8),
            Err(ChainError::IndexOutOfRange { index: 8, size: 8 })
        );
        q.set_desc(0, D::r(0x10000, 1).next(200));
        assert_eq!(
            parse(&mem, &q, 0),
            Err(ChainError::IndexOutOfRange {
                index: 200,
                size: 8
            })
        );
        let table = GuestAddress(0x20000);
        q.write_table(table, &[D::r(0x10000, 1).next(2), D::r(0x10000, 1)]);
        q.set_desc(1, D::indirect(table.0, 32));
        assert_eq!(
            parse(&mem, &q, 1),
            Err(ChainError::IndexOutOfRange { index: 2, size: 2 })
        );
    }

    #[test]
    fn buffers_outside_memory_are_errors() {
        let mem = guest_memory();
        let size = mem.last_addr().0 + 1;
        let q = GuestQueue::new(&mem, 8);
        q.set_desc(0, D::r(size, 1));
        assert!(matches!(
            parse(&mem, &q, 0),
            Err(ChainError::BufferOutOfRange { .. })
        ));
        // Straddling the end of memory.
        q.set_desc(0, D::w(size - 8, 16));
        assert!(matches!(
            parse(&mem, &q, 0),
            Err(ChainError::BufferOutOfRange { .. })
        ));
        // Wrapping around the address space.
        q.set_desc(0, D::r(u64::MAX - 4, 16));
        assert!(matches!(
            parse(&mem, &q, 0),
            Err(ChainError::BufferOutOfRange { .. })
        ));
        // An oversized length from a valid address.
        q.set_desc(0, D::w(0x10000, u32::MAX));
        assert!(matches!(
            parse(&mem, &q, 0),
            Err(ChainError::BufferOutOfRange { .. })
        ));
        // A descriptor table outside memory.
        let err = DescriptorChain::parse(&mem, GuestAddress(size), 8, 0).unwrap_err();
        assert_eq!(err, ChainError::DescriptorUnreadable(size));
        let err = DescriptorChain::parse(&mem, GuestAddress(u64::MAX - 8), 8, 1).unwrap_err();
        assert!(matches!(err, ChainError::DescriptorUnreadable(_)));
    }

    #[test]
    fn total_length_over_4gib_is_an_error() {
        // Two overlapping 3 GiB buffers, each inside a (lazily populated)
        // 3 GiB guest memory: each is valid, together they pass 4 GiB.
        let mem = crate::devices::virtio::test_utils::guest_memory_of(3 << 30);
        let q = GuestQueue::new(&mem, 8);
        q.set_desc(0, D::r(0, 3 << 30).next(1));
        q.set_desc(1, D::r(0, 3 << 30));
        assert_eq!(parse(&mem, &q, 0), Err(ChainError::TotalTooLarge));
    }

    #[test]
    fn bad_indirect_tables_are_errors() {
        let mem = guest_memory();
        let q = GuestQueue::new(&mem, 8);
        let table = GuestAddress(0x20000);
        q.write_table(table, &[D::r(0x10000, 1)]);
        // Length not a multiple of 16, zero, or more entries than the queue.
        for len in [0u32, 15, 17, 9 * 16] {
            q.set_desc(0, D::indirect(table.0, len));
            assert!(
                matches!(
                    parse(&mem, &q, 0),
                    Err(ChainError::IndirectBadLength { .. })
                ),
                "len {len}"
            );
        }
        // Indirect with NEXT.
        q.set_desc(0, D::indirect(table.0, 16).next(1));
        assert_eq!(parse(&mem, &q, 0), Err(ChainError::IndirectWithNext));
        // Nested indirect.
        q.write_table(table, &[D::indirect(0x30000, 16)]);
        q.set_desc(0, D::indirect(table.0, 16));
        assert_eq!(parse(&mem, &q, 0), Err(ChainError::NestedIndirect));
        // Table outside guest memory.
        let end = mem.last_addr().0 + 1;
        q.set_desc(0, D::indirect(end - 16, 32));
        assert!(matches!(
            parse(&mem, &q, 0),
            Err(ChainError::BufferOutOfRange { .. })
        ));
    }

    #[test]
    fn readable_after_writable_is_an_error() {
        let mem = guest_memory();
        let q = GuestQueue::new(&mem, 8);
        q.set_desc(0, D::w(0x10000, 1).next(1));
        q.set_desc(1, D::r(0x11000, 1));
        assert_eq!(parse(&mem, &q, 0), Err(ChainError::ReadableAfterWritable));
    }

    #[test]
    fn random_descriptor_tables_never_panic() {
        // Fill the table with pseudo-random bytes many times: every parse
        // must return (Ok or Err) without panicking or reading out of range.
        let mem = guest_memory();
        let q = GuestQueue::new(&mem, 16);
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..2000 {
            let mut table = [0u8; 16 * 16];
            for b in table.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
            // Keep some addresses small so indirect tables are sometimes in range.
            for i in 0..16 {
                if x & (1 << i) != 0 {
                    table[i * 16 + 2..i * 16 + 8].fill(0);
                }
            }
            mem.write_slice(&table, q.desc_table).unwrap();
            for head in 0..17 {
                let _ = parse(&mem, &q, head);
            }
        }
    }

    #[test]
    fn cursor_spans_buffers() {
        let mem = guest_memory();
        let q = GuestQueue::new(&mem, 8);
        q.set_desc(0, D::r(0x10000, 3).next(1));
        q.set_desc(1, D::r(0x11000, 5).next(2));
        q.set_desc(2, D::w(0x12000, 4).next(3));
        q.set_desc(3, D::w(0x13000, 4));
        mem.write_slice(b"abc", GuestAddress(0x10000)).unwrap();
        mem.write_slice(b"defgh", GuestAddress(0x11000)).unwrap();
        let c = parse(&mem, &q, 0).unwrap();
        let mut r = c.reader(&mem);
        let mut buf = [0u8; 10];
        assert_eq!(r.read(&mut buf).unwrap(), 8);
        assert_eq!(&buf[..8], b"abcdefgh");
        let mut w = c.writer(&mem);
        assert_eq!(w.write(b"0123456789").unwrap(), 8);
        let mut out = [0u8; 4];
        mem.read_slice(&mut out, GuestAddress(0x13000)).unwrap();
        assert_eq!(&out, b"4567");
    }

    #[test]
    fn queue_state_round_trips() {
        let mut q = Queue::new(256).unwrap();
        q.set_size(128);
        q.set_desc_table_address(Some(0x1000), Some(0));
        q.set_avail_ring_address(Some(0x2000), Some(0));
        q.set_used_ring_address(Some(0x3000), Some(0));
        q.set_ready(true);
        q.set_next_avail(7);
        q.set_next_used(5);
        let s = save_queue(&q);
        let r = restore_queue(&s, 256).unwrap();
        assert_eq!(save_queue(&r), s);
        assert!(restore_queue(&s, 128).is_err());
        let bad = QueueState { size: 100, ..s };
        assert!(restore_queue(&bad, 256).is_err());
    }
}
