//! The bus that port-I/O and MMIO exits are dispatched on.
//!
//! A [`Bus`] maps non-overlapping address ranges `[base, base + len)` to
//! devices. The VM builds one bus for port I/O and one for MMIO before its
//! vCPUs start, then shares each through an `Arc<Bus>`: lookups take `&self`
//! and only the target device's own mutex is locked, so vCPUs hitting
//! different devices never contend.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

/// A device that answers guest accesses to its range on a [`Bus`].
///
/// `offset` is relative to the base address the device was inserted at;
/// the bus guarantees that `offset + data.len()` lies within the device's
/// range. Access widths are whatever the guest used (1, 2, 4 or 8 bytes in
/// practice); a device decides what to do with widths it does not support,
/// but must never panic on them.
pub trait BusDevice: Send {
    /// Handles a guest read of `data.len()` bytes at `offset`.
    ///
    /// The device must fill `data` completely: registers it does not
    /// implement read as zeros or as all-ones (`0xff`), as the device defines.
    fn read(&mut self, offset: u64, data: &mut [u8]);

    /// Handles a guest write of `data` at `offset`. Writes to registers the
    /// device does not implement are ignored.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors from building a [`Bus`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// A device range must cover at least one address.
    #[error("cannot insert a device with an empty range at {base:#x}: length must be at least 1")]
    ZeroLength {
        /// The requested base address.
        base: u64,
    },
    /// `base + len` does not fit in 64 bits.
    #[error("device range at {base:#x} with length {len:#x} runs past the end of the 64-bit address space")]
    Overflow {
        /// The requested base address.
        base: u64,
        /// The requested length.
        len: u64,
    },
    /// The new range overlaps a device already on the bus.
    #[error(
        "device range [{new_base:#x}, {new_end:#x}) overlaps the existing device range [{old_base:#x}, {old_end:#x})"
    )]
    Overlap {
        /// Start of the refused range.
        new_base: u64,
        /// End (exclusive) of the refused range.
        new_end: u64,
        /// Start of the range already on the bus.
        old_base: u64,
        /// End (exclusive) of the range already on the bus.
        old_end: u64,
    },
}

/// One device on the bus: its length (the base is the map key) and the device.
struct BusEntry {
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// Address ranges mapped to devices; lookups are O(log n).
///
/// Fill it with [`Bus::insert`] while building the VM, then share it as an
/// `Arc<Bus>` with the vCPU threads, which call [`Bus::read`] and
/// [`Bus::write`] concurrently.
#[derive(Default)]
pub struct Bus {
    /// Keyed by base address; ranges never overlap.
    devices: BTreeMap<u64, BusEntry>,
}

impl fmt::Debug for Bus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut list = f.debug_list();
        for (base, entry) in &self.devices {
            list.entry(&format_args!("[{:#x}, {:#x})", base, base + entry.len));
        }
        list.finish()
    }
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Puts `device` at `[base, base + len)`.
    ///
    /// Refuses an empty range, a range whose end does not fit in a `u64`, and
    /// a range overlapping one already on the bus (adjacent ranges are fine).
    pub fn insert(
        &mut self,
        device: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::ZeroLength { base });
        }
        let end = base
            .checked_add(len)
            .ok_or(BusError::Overflow { base, len })?;
        // Ranges on the bus do not overlap, so the only candidate for an
        // overlap is the last range starting before `end`: every earlier one
        // ends at or before that one starts.
        if let Some((&old_base, old)) = self.devices.range(..end).next_back() {
            let old_end = old_base + old.len;
            if old_end > base {
                return Err(BusError::Overlap {
                    new_base: base,
                    new_end: end,
                    old_base,
                    old_end,
                });
            }
        }
        self.devices.insert(base, BusEntry { len, device });
        Ok(())
    }

    /// The device whose range holds all of `[addr, addr + size)`, and the
    /// offset of `addr` within it.
    fn find(&self, addr: u64, size: usize) -> Option<(&BusEntry, u64)> {
        let (&base, entry) = self.devices.range(..=addr).next_back()?;
        let offset = addr - base;
        let size = u64::try_from(size).ok()?;
        // `offset < len` first, so `len - offset` cannot underflow.
        if offset < entry.len && size <= entry.len - offset {
            Some((entry, offset))
        } else {
            None
        }
    }

    /// Dispatches a guest read of `data.len()` bytes at `addr`.
    ///
    /// Returns `false`, leaving `data` untouched, when no single device
    /// covers the whole access (including an access straddling the end of a
    /// device's range); the caller then answers with all-ones.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((entry, offset)) => {
                // A device that panicked while holding its lock is still the
                // best answer we have; do not take the vCPU thread down too.
                let mut device = entry.device.lock().unwrap_or_else(PoisonError::into_inner);
                device.read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a guest write of `data` at `addr`.
    ///
    /// Returns `false` when no single device covers the whole access; the
    /// caller then ignores the write.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((entry, offset)) => {
                let mut device = entry.device.lock().unwrap_or_else(PoisonError::into_inner);
                device.write(offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records the accesses it sees; reads return the low byte of the offset.
    #[derive(Default)]
    struct Recorder {
        reads: Vec<(u64, usize)>,
        writes: Vec<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            self.reads.push((offset, data.len()));
            data.fill(offset as u8);
        }

        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    fn recorder() -> Arc<Mutex<Recorder>> {
        Arc::new(Mutex::new(Recorder::default()))
    }

    #[test]
    fn overlapping_ranges_are_refused() {
        let mut bus = Bus::new();
        bus.insert(recorder(), 0x100, 0x10).unwrap();

        // The exact same range.
        assert_eq!(
            bus.insert(recorder(), 0x100, 0x10),
            Err(BusError::Overlap {
                new_base: 0x100,
                new_end: 0x110,
                old_base: 0x100,
                old_end: 0x110
            })
        );
        // Overlapping the start of the existing range.
        assert_eq!(
            bus.insert(recorder(), 0xf8, 0x9),
            Err(BusError::Overlap {
                new_base: 0xf8,
                new_end: 0x101,
                old_base: 0x100,
                old_end: 0x110
            })
        );
        // Overlapping the end of the existing range.
        assert_eq!(
            bus.insert(recorder(), 0x10f, 0x10),
            Err(BusError::Overlap {
                new_base: 0x10f,
                new_end: 0x11f,
                old_base: 0x100,
                old_end: 0x110
            })
        );
        // Containing it, and contained in it.
        assert!(bus.insert(recorder(), 0x0, 0x1000).is_err());
        assert!(bus.insert(recorder(), 0x104, 0x2).is_err());

        // Adjacent on both sides is fine.
        bus.insert(recorder(), 0xf0, 0x10).unwrap();
        bus.insert(recorder(), 0x110, 0x10).unwrap();
    }

    #[test]
    fn overlap_error_names_both_ranges_in_hex() {
        let mut bus = Bus::new();
        bus.insert(recorder(), 0x3f8, 8).unwrap();
        let msg = bus.insert(recorder(), 0x3fc, 8).unwrap_err().to_string();
        assert!(msg.contains("[0x3fc, 0x404)"), "{msg}");
        assert!(msg.contains("[0x3f8, 0x400)"), "{msg}");
    }

    #[test]
    fn zero_length_is_refused() {
        let mut bus = Bus::new();
        assert_eq!(
            bus.insert(recorder(), 0x60, 0),
            Err(BusError::ZeroLength { base: 0x60 })
        );
    }

    #[test]
    fn end_overflow_is_refused() {
        let mut bus = Bus::new();
        assert_eq!(
            bus.insert(recorder(), u64::MAX - 3, 4),
            Err(BusError::Overflow {
                base: u64::MAX - 3,
                len: 4
            })
        );
        // One byte short of the top is representable.
        bus.insert(recorder(), u64::MAX - 3, 3).unwrap();
        let mut data = [0u8; 1];
        assert!(bus.read(u64::MAX - 1, &mut data));
        assert!(!bus.read(u64::MAX, &mut data));
    }

    #[test]
    fn accesses_reach_the_right_device_at_the_right_offset() {
        let mut bus = Bus::new();
        let a = recorder();
        let b = recorder();
        bus.insert(a.clone(), 0x60, 5).unwrap();
        bus.insert(b.clone(), 0x3f8, 8).unwrap();

        let mut data = [0u8; 1];
        assert!(bus.read(0x64, &mut data));
        assert_eq!(data, [4]);
        assert!(bus.write(0x3f8, b"x"));
        let mut wide = [0u8; 4];
        assert!(bus.read(0x3fc, &mut wide));
        assert_eq!(wide, [4; 4]);
        assert!(bus.write(0x60, &[1, 2]));

        let a = a.lock().unwrap();
        assert_eq!(a.reads, vec![(4, 1)]);
        assert_eq!(a.writes, vec![(0, vec![1, 2])]);
        let b = b.lock().unwrap();
        assert_eq!(b.reads, vec![(4, 4)]);
        assert_eq!(b.writes, vec![(0, vec![b'x'])]);
    }

    #[test]
    fn unknown_addresses_are_not_covered() {
        let mut bus = Bus::new();
        let mut data = [0xaau8; 2];
        assert!(!bus.read(0x80, &mut data));
        assert!(!bus.write(0x80, &[0]));

        bus.insert(recorder(), 0x60, 5).unwrap();
        assert!(!bus.read(0x5f, &mut data));
        assert!(!bus.read(0x65, &mut data));
        assert!(!bus.write(0x0, &[0]));
        assert!(!bus.write(u64::MAX, &[0]));
        // Untouched, so the caller can fill in all-ones itself.
        assert_eq!(data, [0xaa; 2]);
    }

    #[test]
    fn straddling_accesses_are_not_covered() {
        let mut bus = Bus::new();
        let dev = recorder();
        bus.insert(dev.clone(), 0x1000, 0x10).unwrap();
        bus.insert(recorder(), 0x1010, 0x10).unwrap();

        let mut data = [0u8; 4];
        // Last four bytes: fine. One further: straddles into the neighbour.
        assert!(bus.read(0x100c, &mut data));
        assert!(!bus.read(0x100d, &mut data));
        assert!(!bus.write(0x100f, &[0, 0]));
        // Straddling the start from below.
        assert!(!bus.write(0xffe, &[0; 4]));
        assert_eq!(dev.lock().unwrap().reads, vec![(0xc, 4)]);
        assert!(dev.lock().unwrap().writes.is_empty());
    }

    #[test]
    fn poisoned_device_does_not_panic_the_caller() {
        let mut bus = Bus::new();
        let dev = recorder();
        bus.insert(dev.clone(), 0x60, 5).unwrap();

        let poisoner = dev.clone();
        let _ = std::thread::spawn(move || {
            let _guard = poisoner.lock().unwrap();
            panic!("poison the device mutex");
        })
        .join();
        assert!(dev.is_poisoned());

        let mut data = [0u8; 1];
        assert!(bus.read(0x61, &mut data));
        assert_eq!(data, [1]);
        assert!(bus.write(0x62, &[7]));
    }

    #[test]
    fn bus_is_shareable_across_threads() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Bus>();
        assert_send_sync::<Arc<Bus>>();
    }
}
