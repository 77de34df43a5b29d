//! The fault handler: a guest write to a page not yet copied copies it
//! first, and waiting for faults.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::time::Instant;

use crate::memory::uffd::{self, Uffd, WpFault, PAGE_SIZE};

use super::*;

/// The fault thread: answers write-protect faults until the copy ends or
/// stops, copying each faulting page (or block) before it releases it.
pub(super) fn handle_faults(sh: &Shared, block_pages: u64) -> Result<(), Error> {
    let mut batch = [WpFault {
        addr: 0,
        write: false,
        wp: false,
    }; 64];
    let mut pending: Vec<(u64, Vec<u8>)> = Vec::new();
    let mut pool: Vec<Vec<u8>> = Vec::new();
    loop {
        if sh.stop.load(Ordering::SeqCst) {
            return Ok(());
        }
        let n = sh.uffd.read_events(&mut batch)?;
        if n == 0 {
            // Every page is released by the time the bulk copier finishes,
            // so once it has and the queue is empty no fault can come.
            if sh.bulk_done.load(Ordering::SeqCst) {
                return Ok(());
            }
            wait_readable(sh)?;
            continue;
        }
        let read_at = Instant::now();
        for f in &batch[..n] {
            if sh.stop.load(Ordering::SeqCst) {
                return Ok(());
            }
            release_fault(sh, f.addr, block_pages, &mut pending, &mut pool)?;
            let stall = read_at.elapsed().as_nanos() as u64;
            sh.max_stall_ns.fetch_max(stall, Ordering::Relaxed);
            sh.faults.fetch_add(1, Ordering::Relaxed);
        }
        for (offset, buf) in pending.drain(..) {
            sh.write(offset, &buf)?;
            pool.push(buf);
        }
    }
}

/// Copies (if nobody has) the pages of the aligned block of `block_pages`
/// (a power of two, at least a granule) holding `addr` and releases the
/// granules this completes: a writer with locality then faults once per
/// block, not once per page. The faulting page's granule is released
/// before returning: pages of it that the bulk copier claimed and has not
/// captured yet are copied and captured here ([`take_over`]).
pub(super) fn release_fault(
    sh: &Shared,
    addr: u64,
    block_pages: u64,
    pending: &mut Vec<(u64, Vec<u8>)>,
    pool: &mut Vec<Vec<u8>>,
) -> Result<(), Error> {
    let Some((rs, page)) = sh.locate(addr) else {
        return release_foreign(sh, addr);
    };
    let g = page / rs.granule_pages;
    let b0 = page & !(block_pages - 1);
    let b1 = (b0 + block_pages).min(rs.pages());
    let mut copied = false;
    // The current run of non-zero owned pages, copied while still protected.
    let mut run: Option<(u64, Vec<u8>)> = None;
    for w in b0 / WORD_PAGES..b1.div_ceil(WORD_PAGES) {
        let mask = span_mask(w, b0, b1) & rs.word_mask(w);
        let owned = mask & !rs.claimed[w as usize].fetch_or(mask, Ordering::AcqRel);
        if owned == 0 {
            continue;
        }
        copied = true;
        let mut bits = owned;
        while bits != 0 {
            let p = w * WORD_PAGES + bits.trailing_zeros() as u64;
            bits &= bits - 1;
            // SAFETY: this thread just claimed the page; its granule stays
            // protected until every page of it is captured, which this page
            // is not yet (only its claimer captures it, and the bulk copier
            // never takes pages over).
            let src = unsafe { rs.page(p) };
            let offset = rs.r.file_offset + p * PAGE_SIZE;
            if is_zero(src) && !sh.write_zeros {
                continue;
            }
            match &mut run {
                Some((start, buf)) if *start + buf.len() as u64 == offset => {
                    buf.extend_from_slice(src)
                }
                _ => {
                    if let Some(done) = run.take() {
                        pending.push(done);
                    }
                    let mut buf = pool.pop().unwrap_or_default();
                    buf.clear();
                    buf.extend_from_slice(src);
                    run = Some((offset, buf));
                }
            }
        }
        let captured = rs.capture(w, owned);
        debug_assert_eq!(captured.pages, owned, "only the claimer captures its pages");
        rs.release_captured(sh, &captured)?;
    }
    pending.extend(run);
    if copied {
        sh.fault_copies.fetch_add(1, Ordering::Relaxed);
    }
    if !rs.granule_captured(g) {
        take_over(sh, rs, g, pending, pool)?;
    }
    // Every page of the granule is captured now, by this thread or the bulk
    // copier. Releasing it again is skipped if the bulk copier did (the
    // `released` bit makes the release hook run once).
    if !rs.release(&sh.uffd, sh.before_release.as_ref(), g, 1)? {
        // Another thread released the granule, and its release woke the
        // writers blocked on it then. This writer's fault may have been
        // queued after that wake (it began while the page was still
        // protected, and a page released clean stays read-only, which
        // the kernel counts as a reason to wait): nobody else would ever
        // wake it.
        sh.uffd.wake(addr & !(PAGE_SIZE - 1), PAGE_SIZE)?;
    }
    Ok(())
}

/// Copies and captures the pages of granule `g` that the bulk copier
/// claimed but has not captured (it is in the middle of a word there, or
/// was preempted in it), so the faulting writer does not wait for that
/// low-priority thread. They are still protected: `g` is released only
/// once all its pages are captured. The pages the bulk copier captures
/// meanwhile stay its own and this thread's copies of them are dropped.
pub(super) fn take_over(
    sh: &Shared,
    rs: &RegionState,
    g: u64,
    pending: &mut Vec<(u64, Vec<u8>)>,
    pool: &mut Vec<Vec<u8>>,
) -> Result<(), Error> {
    let (p0, p1) = (g * rs.granule_pages, (g + 1) * rs.granule_pages);
    let mut took = false;
    for w in p0 / WORD_PAGES..p1.div_ceil(WORD_PAGES) {
        let want = span_mask(w, p0, p1)
            & rs.word_mask(w)
            & !rs.captured[w as usize].load(Ordering::Acquire);
        if want == 0 {
            continue;
        }
        took = true;
        let mut copies: Vec<(u64, Vec<u8>)> = Vec::with_capacity(want.count_ones() as usize);
        let mut bits = want;
        while bits != 0 {
            let p = w * WORD_PAGES + bits.trailing_zeros() as u64;
            bits &= bits - 1;
            let mut buf = pool.pop().unwrap_or_default();
            buf.resize(PAGE, 0);
            rs.copy_page(p, &mut buf);
            copies.push((p, buf));
        }
        let captured = rs.capture(w, want);
        for (p, buf) in copies {
            let ours = captured.pages & (1 << (p % WORD_PAGES)) != 0;
            if ours && (sh.write_zeros || !is_zero(&buf)) {
                pending.push((rs.r.file_offset + p * PAGE_SIZE, buf));
            } else {
                pool.push(buf);
            }
        }
        rs.release_captured(sh, &captured)?;
    }
    if took {
        sh.takeovers.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}

/// The bits of word `w` for pages `first..end`.
pub(super) fn span_mask(w: u64, first: u64, end: u64) -> u64 {
    let lo = first.max(w * WORD_PAGES) - w * WORD_PAGES;
    let hi = end.min((w + 1) * WORD_PAGES) - w * WORD_PAGES;
    if hi - lo == WORD_PAGES {
        !0
    } else {
        ((1u64 << (hi - lo)) - 1) << lo
    }
}

/// Releases a fault outside the copied regions: not ours to copy, but never
/// leave a writer hanging. Tries the aligned granule around it (regions are
/// granule aligned, so it cannot reach into one; hugetlbfs refuses less),
/// then the page alone.
pub(super) fn release_foreign(sh: &Shared, addr: u64) -> Result<(), Error> {
    release_outside(&sh.uffd, sh.granule_bytes, addr)
}

/// [`release_foreign`] for any user of `uffd` with write-protect granule
/// `gb` bytes.
pub(crate) fn release_outside(uffd: &Uffd, gb: u64, addr: u64) -> Result<(), Error> {
    if gb > PAGE_SIZE && uffd.write_protect(addr & !(gb - 1), gb, false).is_ok() {
        return Ok(());
    }
    uffd.write_protect(addr, PAGE_SIZE, false)?;
    Ok(())
}

/// Sleeps until the userfaultfd has a fault or the eventfd was signalled.
pub(super) fn wait_readable(sh: &Shared) -> Result<(), Error> {
    wait_for_fault(&sh.uffd, &sh.wake)
}

/// Sleeps (at most a second) until `uffd` has a fault or the eventfd
/// `wake` was signalled, and consumes the signal.
pub(crate) fn wait_for_fault(uffd: &Uffd, wake: &OwnedFd) -> Result<(), Error> {
    let mut fds = [
        libc::pollfd {
            fd: uffd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: wake.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    // SAFETY: `fds` is a valid array of two pollfd for the call's duration.
    let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, 1000) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(Error::Uffd(uffd::Error::Read(e)));
        }
    }
    if fds[1].revents & libc::POLLIN != 0 {
        let mut v = 0u64;
        // SAFETY: reads 8 bytes into a live u64 from our eventfd.
        let _ = unsafe { libc::read(wake.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
    }
    Ok(())
}
