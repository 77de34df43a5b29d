//! Where guest RAM lies in guest-physical space: below the 32-bit MMIO gap
//! and, past it, from 4 GiB. The memory backends lay RAM out by it; the
//! rest of the memory map (boot structures, device windows) is in
//! `boot::layout`, which re-exports these.

/// Start of the 32-bit MMIO gap. RAM above this goes above 4 GiB.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO gap (4 GiB).
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;

/// Smallest guest RAM we accept, in MiB.
pub const MIN_MEM_MIB: u64 = 8;
/// Largest guest RAM we accept, in MiB (64 GiB: one PDPT of identity maps covers it).
pub const MAX_MEM_MIB: u64 = 64 * 1024;

/// The guest-physical RAM ranges `(start, len)` for `mem_bytes` of RAM:
/// one below the MMIO gap and, when RAM does not fit there, one from 4 GiB.
pub fn ram_ranges(mem_bytes: u64) -> Vec<(u64, u64)> {
    if mem_bytes <= MMIO_GAP_START {
        vec![(0, mem_bytes)]
    } else {
        vec![
            (0, MMIO_GAP_START),
            (MMIO_GAP_END, mem_bytes - MMIO_GAP_START),
        ]
    }
}

/// One past the highest guest-physical RAM address for `mem_bytes` of RAM.
pub fn ram_end(mem_bytes: u64) -> u64 {
    ram_ranges(mem_bytes)
        .last()
        .map(|(start, len)| start + len)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_ram_is_one_range_below_the_gap() {
        assert_eq!(ram_ranges(128 << 20), vec![(0, 128 << 20)]);
        assert_eq!(ram_end(128 << 20), 128 << 20);
    }

    #[test]
    fn ram_exactly_up_to_the_gap_is_one_range() {
        assert_eq!(ram_ranges(MMIO_GAP_START), vec![(0, MMIO_GAP_START)]);
    }

    #[test]
    fn large_ram_skips_the_mmio_gap() {
        let r = ram_ranges(4 << 30);
        assert_eq!(r, vec![(0, MMIO_GAP_START), (MMIO_GAP_END, 1 << 30)]);
        assert_eq!(ram_end(4 << 30), MMIO_GAP_END + (1 << 30));
    }
}
