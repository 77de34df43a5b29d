//! Identity-mapped 4-level page tables, so a vCPU can start directly in
//! 64-bit long mode.
//!
//! Layout written at `pml4` (all pages 4 KiB):
//!
//! ```text
//! pml4 + 0x0000            PML4: entry 0 -> PDPT
//! pml4 + 0x1000            PDPT: entry i -> page directory i
//! pml4 + 0x2000 + i*0x1000 page directory i: 512 x 2 MiB pages for [i GiB, i+1 GiB)
//! ```

use vm_memory::{Bytes, GuestAddress};

use super::Error;
use crate::memory::GuestMemoryMmap;

/// Size of one page-table page.
const PAGE_SIZE: u64 = 0x1000;
/// Bytes mapped by one page directory (512 x 2 MiB).
const GIB: u64 = 1 << 30;
/// Bytes mapped by one large page-directory entry.
const LARGE_PAGE: u64 = 2 << 20;
/// Most bytes one PDPT (512 page directories) can map.
const MAX_TOP: u64 = 512 * GIB;

/// Page-table entry bit: present.
pub const PTE_PRESENT: u64 = 1 << 0;
/// Page-table entry bit: writable.
pub const PTE_WRITABLE: u64 = 1 << 1;
/// Page-table entry bit: user-accessible (U/S).
pub const PTE_USER: u64 = 1 << 2;
/// Page-directory entry bit: maps a 2 MiB page (PS).
pub const PTE_LARGE: u64 = 1 << 7;

/// Writes identity page tables at guest address `pml4` mapping `[0, top)`
/// (`top` rounded up to a whole GiB) with present, writable 2 MiB pages, and
/// with the user bit on every level when `user` is true.
///
/// `pml4` must be 4 KiB-aligned and `top` in `1..=512 GiB`. Returns how many
/// bytes of page tables were written from `pml4`: `(2 + ceil(top / 1 GiB)) *
/// 4 KiB`, so the caller can check they end before whatever follows.
pub fn write_identity_map(
    mem: &GuestMemoryMmap,
    pml4: u64,
    top: u64,
    user: bool,
) -> Result<u64, Error> {
    if top == 0 || top > MAX_TOP {
        return Err(Error::PageTableTop { top });
    }
    if pml4 % PAGE_SIZE != 0 {
        return Err(Error::PageTableAlign { pml4 });
    }
    let flags = PTE_PRESENT | PTE_WRITABLE | if user { PTE_USER } else { 0 };
    let num_pds = top.div_ceil(GIB);
    let pdpt = pml4 + PAGE_SIZE;
    let first_pd = pdpt + PAGE_SIZE;

    let mut page = [0u64; 512];
    page[0] = pdpt | flags;
    write_page(mem, pml4, &page, "PML4")?;

    page = [0u64; 512];
    for (i, entry) in page.iter_mut().take(num_pds as usize).enumerate() {
        *entry = (first_pd + i as u64 * PAGE_SIZE) | flags;
    }
    write_page(mem, pdpt, &page, "page-directory-pointer table")?;

    for pd in 0..num_pds {
        for (j, entry) in page.iter_mut().enumerate() {
            *entry = (pd * GIB + j as u64 * LARGE_PAGE) | flags | PTE_LARGE;
        }
        write_page(mem, first_pd + pd * PAGE_SIZE, &page, "page directory")?;
    }
    Ok((2 + num_pds) * PAGE_SIZE)
}

/// Writes one page of little-endian entries at `addr`.
fn write_page(
    mem: &GuestMemoryMmap,
    addr: u64,
    entries: &[u64; 512],
    what: &'static str,
) -> Result<(), Error> {
    let mut bytes = [0u8; PAGE_SIZE as usize];
    for (chunk, entry) in bytes.chunks_exact_mut(8).zip(entries) {
        chunk.copy_from_slice(&entry.to_le_bytes());
    }
    mem.write_slice(&bytes, GuestAddress(addr))
        .map_err(|source| Error::GuestWrite { what, addr, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MEM: usize = 8 << 20;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap()
    }

    /// Walks the tables like the MMU; returns the physical address and whether
    /// every level had the user bit.
    fn translate(mem: &GuestMemoryMmap, pml4: u64, va: u64) -> Option<(u64, bool)> {
        let read = |table: u64, index: u64| -> u64 {
            mem.read_obj(GuestAddress((table & !0xfff & ((1 << 52) - 1)) + index * 8))
                .unwrap()
        };
        let e4 = read(pml4, (va >> 39) & 0x1ff);
        if e4 & PTE_PRESENT == 0 {
            return None;
        }
        let e3 = read(e4, (va >> 30) & 0x1ff);
        if e3 & PTE_PRESENT == 0 || e3 & PTE_LARGE != 0 {
            return None;
        }
        let e2 = read(e3, (va >> 21) & 0x1ff);
        if e2 & PTE_PRESENT == 0 || e2 & PTE_LARGE == 0 {
            return None;
        }
        for e in [e4, e3, e2] {
            assert_ne!(e & PTE_WRITABLE, 0);
        }
        let user = [e4, e3, e2].iter().all(|e| e & PTE_USER != 0);
        let any_user = [e4, e3, e2].iter().any(|e| e & PTE_USER != 0);
        assert_eq!(user, any_user, "U bit must be on all levels or none");
        Some((
            (e2 & !(LARGE_PAGE - 1) & ((1 << 52) - 1)) | (va & (LARGE_PAGE - 1)),
            user,
        ))
    }

    #[test]
    fn linux_map_is_three_pages_and_identity() {
        let m = mem();
        let pml4 = crate::boot::layout::LINUX_PML4_START;
        assert_eq!(
            write_identity_map(&m, pml4, 1 << 30, false).unwrap(),
            3 * 4096
        );
        for va in [0u64, 2 << 20, 0x1234_5678, (1 << 30) - 1] {
            assert_eq!(translate(&m, pml4, va), Some((va, false)));
        }
        assert_eq!(translate(&m, pml4, 1 << 30), None);
    }

    #[test]
    fn user_map_over_several_gib() {
        let m = mem();
        let top = (5 << 30) + 4096; // rounded up to 6 GiB
        assert_eq!(
            write_identity_map(&m, 0x22000, top, true).unwrap(),
            8 * 4096
        );
        for va in [0u64, 2 << 20, (1 << 30) + (4 << 20), top - 1, (6 << 30) - 1] {
            assert_eq!(translate(&m, 0x22000, va), Some((va, true)));
        }
        assert_eq!(translate(&m, 0x22000, 6 << 30), None);
    }

    #[test]
    fn rejects_bad_top_and_alignment() {
        let m = mem();
        assert!(matches!(
            write_identity_map(&m, 0x9000, 0, false),
            Err(Error::PageTableTop { top: 0 })
        ));
        assert!(matches!(
            write_identity_map(&m, 0x9000, (512 << 30) + 1, false),
            Err(Error::PageTableTop { .. })
        ));
        // Exactly 512 GiB is the largest accepted: 2 + 512 pages.
        assert_eq!(
            write_identity_map(&m, 0x9000, 512 << 30, false).unwrap(),
            514 * 4096
        );
        assert!(matches!(
            write_identity_map(&m, 0x9010, 1 << 30, false),
            Err(Error::PageTableAlign { pml4: 0x9010 })
        ));
    }

    #[test]
    fn fails_cleanly_past_end_of_ram() {
        let m = mem();
        assert!(matches!(
            write_identity_map(&m, MEM as u64 - 0x1000, 1 << 30, false),
            Err(Error::GuestWrite { .. })
        ));
    }
}
