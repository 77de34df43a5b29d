//! The per-page tracker (which pages are claimed, captured, released) and
//! the state the copier and the fault handler share.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::memory::uffd::{Uffd, WpFault, PAGE_SIZE};

use super::*;

pub(super) struct RegionState {
    pub(super) r: Region,
    /// Index of the region in the copy's list.
    index: usize,
    pub(super) claimed: Vec<AtomicU64>,
    pub(super) captured: Vec<AtomicU64>,
    /// Pages per write-protect granule (a power of two).
    pub(super) granule_pages: u64,
    /// Per granule, its pages not yet captured; empty for one-page
    /// granules, where a page's `captured` bit says the same.
    uncaptured: Vec<AtomicU64>,
    /// One bit per granule, set by the one release that releases it: the
    /// bulk copier and a fault handler waiting on it may both try, and the
    /// release hook must run once, before the granule is first writable.
    released: Vec<AtomicU64>,
}

impl RegionState {
    /// `granule_pages` must be a power of two dividing the region's pages.
    /// With `only`, the pages it does not select start claimed and captured
    /// (nothing to copy), and granules without a selected page start
    /// released (they were never protected).
    pub(super) fn new(r: Region, index: usize, granule_pages: u64, only: Option<&[u64]>) -> Self {
        let pages = r.len / PAGE_SIZE;
        let words = pages.div_ceil(WORD_PAGES);
        // The pages of word `w`, and those of them to copy: all, or those
        // `only` selects. The others start claimed and captured.
        let in_region = |w: u64| {
            let n = (pages - w * WORD_PAGES).min(WORD_PAGES);
            if n == WORD_PAGES {
                !0
            } else {
                (1u64 << n) - 1
            }
        };
        let selected =
            |w: u64| in_region(w) & only.map_or(!0, |b| b.get(w as usize).copied().unwrap_or(0));
        let bits = || {
            (0..words)
                .map(|w| AtomicU64::new(in_region(w) & !selected(w)))
                .collect()
        };
        let granules = pages / granule_pages;
        // Pages of granule `g` to copy.
        let pending = |g: u64| -> u64 {
            let first = g * granule_pages;
            if granule_pages >= WORD_PAGES {
                (first / WORD_PAGES..(first + granule_pages) / WORD_PAGES)
                    .map(|w| u64::from(selected(w).count_ones()))
                    .sum()
            } else {
                let w = selected(first / WORD_PAGES) >> (first % WORD_PAGES);
                u64::from((w & ((1 << granule_pages) - 1)).count_ones())
            }
        };
        let uncaptured = if granule_pages > 1 {
            (0..granules).map(|g| AtomicU64::new(pending(g))).collect()
        } else {
            Vec::new()
        };
        let released = (0..granules.div_ceil(64))
            .map(|w| {
                let mut b = 0u64;
                for g in w * 64..(w * 64 + 64).min(granules) {
                    if pending(g) == 0 {
                        b |= 1 << (g % 64);
                    }
                }
                AtomicU64::new(b)
            })
            .collect();
        RegionState {
            r,
            index,
            claimed: bits(),
            captured: bits(),
            granule_pages,
            uncaptured,
            released,
        }
    }

    fn granule_bytes(&self) -> u64 {
        self.granule_pages * PAGE_SIZE
    }

    /// Marks `copied` (pages of word `w` the caller read while they were
    /// protected) captured. Returns the pages this call captured (those of
    /// `copied` nobody captured before: only their copies may be written,
    /// the others may have been read after their release) and the granules
    /// it completed: the index of a first granule and a bit mask of
    /// granules counted from it, each of which the caller must release.
    pub(super) fn capture(&self, w: u64, copied: u64) -> Captured {
        let owned = copied & !self.captured[w as usize].fetch_or(copied, Ordering::AcqRel);
        let gp = self.granule_pages;
        if gp == 1 {
            return Captured {
                pages: owned,
                first_granule: w * WORD_PAGES,
                granules: owned,
            };
        }
        // Exactly one owner's subtraction reaches zero: that owner releases
        // the granule, after every page of it was read (AcqRel orders the
        // other owners' reads before it).
        let done_with = |g: u64, n: u64| {
            n != 0 && self.uncaptured[g as usize].fetch_sub(n, Ordering::AcqRel) == n
        };
        if gp >= WORD_PAGES {
            let g = w * WORD_PAGES / gp;
            return Captured {
                pages: owned,
                first_granule: g,
                granules: done_with(g, owned.count_ones() as u64) as u64,
            };
        }
        let first = w * WORD_PAGES / gp;
        let one = (1u64 << gp) - 1;
        let mut done = 0u64;
        for k in 0..WORD_PAGES / gp {
            let n = ((owned >> (k * gp)) & one).count_ones() as u64;
            if done_with(first + k, n) {
                done |= 1 << k;
            }
        }
        Captured {
            pages: owned,
            first_granule: first,
            granules: done,
        }
    }

    /// Releases the granules a [`RegionState::capture`] completed.
    pub(super) fn release_captured(&self, sh: &Shared, c: &Captured) -> Result<(), Error> {
        for_each_run(c.granules, |first, n| {
            self.release(
                &sh.uffd,
                sh.before_release.as_ref(),
                c.first_granule + first,
                n,
            )
            .map(drop)
        })
    }

    /// Whether every page of granule `g` is captured.
    pub(super) fn granule_captured(&self, g: u64) -> bool {
        if self.granule_pages == 1 {
            self.captured[(g / WORD_PAGES) as usize].load(Ordering::Acquire)
                & (1 << (g % WORD_PAGES))
                != 0
        } else {
            self.uncaptured[g as usize].load(Ordering::Acquire) == 0
        }
    }

    /// Releases `count` granules from granule `first` (write protection
    /// off, blocked writers woken), calling `hook` on their pages first;
    /// granules another thread released (or is releasing) are skipped: its
    /// release wakes their writers. Returns whether this call released any.
    pub(super) fn release(
        &self,
        uffd: &Uffd,
        hook: Option<&ReleaseHook>,
        first: u64,
        count: u64,
    ) -> Result<bool, Error> {
        let (gp, gb) = (self.granule_pages, self.granule_bytes());
        let mut any = false;
        let mut g = first;
        while g < first + count {
            let (w, lo) = (g / 64, g % 64);
            let n = (64 - lo).min(first + count - g);
            let span = if n == 64 { !0 } else { ((1u64 << n) - 1) << lo };
            let ours = span & !self.released[w as usize].fetch_or(span, Ordering::AcqRel);
            any |= ours != 0;
            for_each_run(ours, |a, k| {
                let g0 = w * 64 + a;
                if let Some(hook) = hook {
                    (hook.0)(self.index, g0 * gp, k * gp).map_err(Error::BeforeRelease)?;
                }
                uffd.write_protect(self.r.host_addr + g0 * gb, k * gb, false)?;
                Ok(())
            })?;
            g += n;
        }
        Ok(any)
    }

    pub(super) fn pages(&self) -> u64 {
        self.r.len / PAGE_SIZE
    }

    /// Bits of word `w` that are pages of this region.
    pub(super) fn word_mask(&self, w: u64) -> u64 {
        let n = (self.pages() - w * WORD_PAGES).min(WORD_PAGES);
        if n == WORD_PAGES {
            !0
        } else {
            (1u64 << n) - 1
        }
    }

    fn page_addr(&self, page: u64) -> u64 {
        self.r.host_addr + page * PAGE_SIZE
    }

    /// The page at `page`, to be read only while it is write-protected and
    /// owned by the caller (claimed, not yet released).
    ///
    /// # Safety
    /// The caller must own the page as described; the region's mapping must
    /// be live (the contract of [`LiveCopy::start`]).
    pub(super) unsafe fn page(&self, page: u64) -> &[u8] {
        // SAFETY: the mapping is live and readable for the whole copy (the
        // caller of `LiveCopy::start` promised it), `page` is in range, and
        // nobody writes the page while it is protected, so the shared
        // slice does not alias a concurrent write.
        unsafe { std::slice::from_raw_parts(self.page_addr(page) as *const u8, PAGE) }
    }

    /// Copies page `page` into `into` (one page long) without assuming it
    /// stays protected: another thread may capture and release it during
    /// the copy (see the module's notes), in which case the caller's
    /// [`RegionState::capture`] does not count the page and the copy is
    /// dropped.
    pub(super) fn copy_page(&self, page: u64, into: &mut [u8]) {
        assert!(page < self.pages() && into.len() == PAGE);
        // SAFETY: the region's mapping is live and readable for the whole
        // copy (the contract of `LiveCopy::start`) and `page` is in range;
        // `into` is a distinct page-long buffer of ours. No reference to
        // guest memory is made: the guest may write the page concurrently
        // once it is released, and then the bytes read are plain data that
        // the capture rule discards.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.page_addr(page) as *const u8,
                into.as_mut_ptr(),
                PAGE,
            )
        }
    }
}

/// What a [`RegionState::capture`] did.
pub(super) struct Captured {
    /// The pages of the word this call captured.
    pub(super) pages: u64,
    /// The granules it completed: `granules` bit i is granule
    /// `first_granule + i`.
    first_granule: u64,
    granules: u64,
}

pub(super) struct Shared {
    pub(super) uffd: Arc<Uffd>,
    pub(super) regions: Vec<RegionState>,
    /// The write-protect granule in bytes.
    pub(super) granule_bytes: u64,
    /// Called before each first release (see [`LiveCopyOptions`]).
    pub(super) before_release: Option<ReleaseHook>,
    /// Zero pages are written too (the file is not empty: see
    /// [`LiveCopyOptions::only`]).
    pub(super) write_zeros: bool,
    pub(super) out: File,
    pub(super) stop: AtomicBool,
    pub(super) bulk_done: AtomicBool,
    /// eventfd that wakes the fault handler from poll.
    pub(super) wake: OwnedFd,
    pub(super) error: Mutex<Option<Error>>,
    pub(super) faults: AtomicU64,
    pub(super) fault_copies: AtomicU64,
    pub(super) takeovers: AtomicU64,
    pub(super) max_stall_ns: AtomicU64,
    /// See [`LiveCopyOptions::bulk_hold`].
    pub(super) bulk_hold: Duration,
    pub(super) bytes_written: AtomicU64,
    pub(super) data_bytes: AtomicU64,
}

impl Shared {
    /// Records the first error, stops both threads and releases all RAM.
    pub(super) fn fail(&self, e: Error) {
        {
            let mut slot = self.error.lock().unwrap_or_else(|p| p.into_inner());
            slot.get_or_insert(e);
        }
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.release_all();
        self.signal();
    }

    pub(super) fn release_all(&self) -> Result<(), Error> {
        let regions: Vec<Region> = self.regions.iter().map(|s| s.r).collect();
        disarm(&self.uffd, &regions)
    }

    /// Releases the granules no copier thread released (none after a
    /// complete copy). Not all of RAM at once: a write-protect change makes
    /// KVM drop its mappings of the range and hold the guest's faults in it
    /// until the change is done, so a release of all of RAM would stall
    /// the guest for the whole page walk and then make it refault every
    /// page.
    pub(super) fn release_rest(&self) -> Result<(), Error> {
        for rs in &self.regions {
            let granules = rs.r.len / rs.granule_bytes();
            let mut g = 0;
            while g < granules {
                let (w, lo) = (g / 64, g % 64);
                let n = (64 - lo).min(granules - g);
                let span = if n == 64 { !0 } else { ((1u64 << n) - 1) << lo };
                let rest = span & !rs.released[w as usize].load(Ordering::Acquire);
                for_each_run(rest, |a, k| {
                    rs.release(&self.uffd, None, w * 64 + a, k).map(drop)
                })?;
                g += n;
            }
        }
        Ok(())
    }

    /// Wakes the writers whose faults no copier thread will read now that
    /// both have ended: a fault queued after the last release's wake waits
    /// for another (see `release_fault`). Every region once, then every
    /// fault still queued (one outside the regions is released as the
    /// fault thread would have). Left open: a writer preempted between
    /// meeting the protection and queuing its fault for longer than this
    /// takes is woken by the next reader of the userfaultfd.
    pub(super) fn wake_late_faults(&self) -> Result<(), Error> {
        for rs in &self.regions {
            self.uffd.wake(rs.r.host_addr, rs.r.len)?;
        }
        let mut batch = [WpFault {
            addr: 0,
            write: false,
            wp: false,
        }; 64];
        loop {
            let n = self.uffd.read_events(&mut batch)?;
            if n == 0 {
                return Ok(());
            }
            for f in &batch[..n] {
                if self.locate(f.addr).is_some() {
                    self.uffd.wake(f.addr & !(PAGE_SIZE - 1), PAGE_SIZE)?;
                } else {
                    super::fault::release_foreign(self, f.addr)?;
                }
            }
        }
    }

    pub(super) fn signal(&self) {
        let one = 1u64;
        // SAFETY: writes 8 bytes from a live u64 to our eventfd.
        let _ = unsafe { libc::write(self.wake.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    pub(super) fn locate(&self, addr: u64) -> Option<(&RegionState, u64)> {
        self.regions.iter().find_map(|s| {
            (addr >= s.r.host_addr && addr < s.r.host_addr + s.r.len)
                .then(|| (s, (addr - s.r.host_addr) / PAGE_SIZE))
        })
    }

    pub(super) fn write(&self, offset: u64, buf: &[u8]) -> Result<(), Error> {
        self.out
            .write_all_at(buf, offset)
            .map_err(|source| Error::Write {
                offset,
                len: buf.len() as u64,
                source,
            })?;
        self.bytes_written
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        self.data_bytes
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        Ok(())
    }
}
