//! The bulk copier: every page not yet captured, in runs, into the file.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;

use crate::memory::uffd::PAGE_SIZE;

use super::*;

/// Data extents of `file` within `[start, end)`, by SEEK_DATA/SEEK_HOLE.
pub(super) fn data_ranges(
    file: &File,
    start: u64,
    end: u64,
    what: &'static str,
) -> Result<Vec<(u64, u64)>, Error> {
    let fd = file.as_raw_fd();
    let seek = |pos: u64, whence: libc::c_int| -> Result<Option<u64>, Error> {
        // SAFETY: lseek on a descriptor we hold; only the file position changes.
        let r = unsafe { libc::lseek(fd, pos as libc::off_t, whence) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                return Ok(None);
            }
            return Err(Error::Inspect { what, source: e });
        }
        Ok(Some(r as u64))
    };
    let mut out = Vec::new();
    let mut pos = start;
    while pos < end {
        let Some(d) = seek(pos, libc::SEEK_DATA)? else {
            break;
        };
        if d >= end {
            break;
        }
        let h = seek(d, libc::SEEK_HOLE)?.unwrap_or(end).min(end);
        out.push((d, h));
        pos = h;
    }
    Ok(out)
}

pub(super) fn is_zero(page: &[u8]) -> bool {
    // SAFETY: any bit pattern is a valid u64; align_to handles the edges.
    let (head, body, tail) = unsafe { page.align_to::<u64>() };
    head.iter().all(|&b| b == 0) && body.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// Calls `f(first, count)` for every run of consecutive set bits.
pub(super) fn for_each_run(
    mut bits: u64,
    mut f: impl FnMut(u64, u64) -> Result<(), Error>,
) -> Result<(), Error> {
    let mut base = 0u64;
    while bits != 0 {
        let skip = bits.trailing_zeros() as u64;
        bits >>= skip;
        base += skip;
        let run = bits.trailing_ones() as u64;
        f(base, run)?;
        bits = if run == 64 { 0 } else { bits >> run };
        base += run;
    }
    Ok(())
}

pub(super) fn bulk_copy(sh: &Shared, source: Option<&File>, chunk_pages: u64) -> Result<(), Error> {
    let mut staging = vec![0u8; chunk_pages as usize * PAGE];
    let mut present = vec![false; chunk_pages as usize];
    let mut is_data = vec![true; chunk_pages as usize];
    for rs in &sh.regions {
        let pages = rs.pages();
        let base = rs.r.file_offset;
        // The memfd's data extents, read once per region (SEEK_HOLE scans
        // to the end of a data extent, so asking per chunk is quadratic on
        // populated RAM). A page that is a hole now and that this thread
        // later claims was never released, so it was a hole (zero) at arm.
        let extents = match source {
            Some(src) => Some(data_ranges(src, base, base + rs.r.len, "the source memfd")?),
            None => None,
        };
        let mut next_extent = 0usize;
        let mut c0 = 0u64;
        while c0 < pages {
            let c1 = (c0 + chunk_pages).min(pages);
            present.fill(false);
            if let Some(extents) = &extents {
                is_data.fill(false);
                let (lo, hi) = (base + c0 * PAGE_SIZE, base + c1 * PAGE_SIZE);
                while next_extent < extents.len() && extents[next_extent].1 <= lo {
                    next_extent += 1;
                }
                for &(d, h) in &extents[next_extent..] {
                    if d >= hi {
                        break;
                    }
                    let first = (d.max(lo) - base) / PAGE_SIZE;
                    let last = (h.min(hi) - base).div_ceil(PAGE_SIZE);
                    is_data[(first - c0) as usize..(last - c0) as usize].fill(true);
                }
            }
            for w in c0 / WORD_PAGES..c1.div_ceil(WORD_PAGES) {
                if sh.stop.load(Ordering::Relaxed) {
                    return Ok(());
                }
                let mask = rs.word_mask(w);
                let owned = mask & !rs.claimed[w as usize].fetch_or(mask, Ordering::AcqRel);
                if owned == 0 {
                    continue;
                }
                let mut bits = owned;
                while bits != 0 {
                    let page = w * WORD_PAGES + bits.trailing_zeros() as u64;
                    bits &= bits - 1;
                    let slot = (page - c0) as usize;
                    let dst = &mut staging[slot * PAGE..(slot + 1) * PAGE];
                    if !is_data[slot] {
                        // A memfd hole reads as zero.
                        if sh.write_zeros {
                            dst.fill(0);
                            present[slot] = true;
                        }
                        continue;
                    }
                    // The fault handler may take the page over meanwhile
                    // (see the module's notes): copy, do not borrow.
                    rs.copy_page(page, dst);
                    present[slot] = sh.write_zeros || !is_zero(dst);
                }
                if !sh.bulk_hold.is_zero() {
                    std::thread::sleep(sh.bulk_hold);
                }
                let captured = rs.capture(w, owned);
                // Pages the fault handler captured first are its to write.
                let mut taken = owned & !captured.pages;
                while taken != 0 {
                    let page = w * WORD_PAGES + taken.trailing_zeros() as u64;
                    taken &= taken - 1;
                    present[(page - c0) as usize] = false;
                }
                rs.release_captured(sh, &captured)?;
            }
            // Write the chunk's non-zero runs.
            let mut i = 0usize;
            let n = (c1 - c0) as usize;
            while i < n {
                if !present[i] {
                    i += 1;
                    continue;
                }
                let s = i;
                while i < n && present[i] {
                    i += 1;
                }
                let offset = rs.r.file_offset + (c0 + s as u64) * PAGE_SIZE;
                sh.write(offset, &staging[s * PAGE..i * PAGE])?;
            }
            c0 = c1;
        }
    }
    Ok(())
}
