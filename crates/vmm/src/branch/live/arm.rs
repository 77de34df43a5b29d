//! Arming and disarming write protection over the regions, and the
//! checks of what may be armed.

use std::time::{Duration, Instant};

use crate::memory::uffd::{Uffd, PAGE_SIZE};

use super::*;

pub(crate) fn validate(regions: &[Region]) -> Result<(), Error> {
    let aligned = |v: u64| v % PAGE_SIZE == 0;
    for (index, r) in regions.iter().enumerate() {
        if r.len == 0 || !aligned(r.host_addr) || !aligned(r.len) || !aligned(r.file_offset) {
            return Err(Error::BadRegion {
                index,
                host_addr: r.host_addr,
                len: r.len,
                file_offset: r.file_offset,
            });
        }
    }
    let overlaps = |a0: u64, a1: u64, b0: u64, b1: u64| a0 < b1 && b0 < a1;
    for (i, a) in regions.iter().enumerate() {
        for (j, b) in regions.iter().enumerate().skip(i + 1) {
            if overlaps(
                a.host_addr,
                a.host_addr + a.len,
                b.host_addr,
                b.host_addr + b.len,
            ) || overlaps(
                a.file_offset,
                a.file_offset + a.len,
                b.file_offset,
                b.file_offset + b.len,
            ) {
                return Err(Error::Overlap(i, j));
            }
        }
    }
    Ok(())
}

/// Checks `granule` and that every region is aligned to it.
pub(crate) fn validate_granule(regions: &[Region], granule: usize) -> Result<(), Error> {
    if !granule.is_power_of_two() || granule < PAGE {
        return Err(Error::BadGranule(granule));
    }
    let g = granule as u64;
    for (index, r) in regions.iter().enumerate() {
        if r.host_addr % g != 0 || r.len % g != 0 || r.file_offset % g != 0 {
            return Err(Error::GranuleMisaligned {
                index,
                host_addr: r.host_addr,
                len: r.len,
                file_offset: r.file_offset,
                granule: g,
            });
        }
    }
    Ok(())
}

/// Write-protects every region: one `UFFDIO_WRITEPROTECT` per region. Run
/// it with the vCPUs paused; returns how long the protection took. On
/// failure nothing is left protected.
pub fn arm(uffd: &Uffd, regions: &[Region]) -> Result<Duration, Error> {
    validate(regions)?;
    let start = Instant::now();
    for (i, r) in regions.iter().enumerate() {
        if let Err(e) = uffd.write_protect(r.host_addr, r.len, true) {
            let _ = disarm(uffd, &regions[..=i]);
            return Err(e.into());
        }
    }
    Ok(start.elapsed())
}

/// Write-protects the granules of `regions` that hold a page set in `only`
/// (per region, bit i: page i), for a copy with [`LiveCopyOptions::only`]:
/// one `UFFDIO_WRITEPROTECT` per run of such granules. Run it with the
/// vCPUs paused; returns how long the protection took. On failure nothing
/// is left protected.
pub fn arm_pages(
    uffd: &Uffd,
    regions: &[Region],
    granule_bytes: usize,
    only: &[Vec<u64>],
) -> Result<Duration, Error> {
    validate(regions)?;
    validate_granule(regions, granule_bytes)?;
    let start = Instant::now();
    let g = granule_bytes as u64;
    for (r, bits) in regions.iter().zip(only) {
        let granules = r.len / g;
        let selected = |k: u64| granule_selected(bits, k, g / PAGE_SIZE);
        let mut k = 0;
        while k < granules {
            if !selected(k) {
                k += 1;
                continue;
            }
            let first = k;
            while k < granules && selected(k) {
                k += 1;
            }
            if let Err(e) = uffd.write_protect(r.host_addr + first * g, (k - first) * g, true) {
                let _ = disarm(uffd, regions);
                return Err(e.into());
            }
        }
    }
    Ok(start.elapsed())
}

/// Whether granule `k` (of `gp` pages, a power of two) holds a page set in
/// `bits` (bit i: page i).
pub(super) fn granule_selected(bits: &[u64], k: u64, gp: u64) -> bool {
    let word = |w: u64| bits.get(w as usize).copied().unwrap_or(0);
    if gp >= WORD_PAGES {
        (k * gp / WORD_PAGES..(k + 1) * gp / WORD_PAGES).any(|w| word(w) != 0)
    } else {
        let first = k * gp;
        (word(first / WORD_PAGES) >> (first % WORD_PAGES)) & ((1 << gp) - 1) != 0
    }
}

/// Releases every region and wakes every blocked writer: for a caller that
/// armed but cannot start the copy. Tries every region even if one fails.
pub fn disarm(uffd: &Uffd, regions: &[Region]) -> Result<(), Error> {
    let mut first = None;
    for r in regions {
        if let Err(e) = uffd.write_protect(r.host_addr, r.len, false) {
            first.get_or_insert(e);
        }
    }
    match first {
        Some(e) => Err(e.into()),
        None => Ok(()),
    }
}
