//! The live BRANCH memory engine: write-protect arm, then a background copy
//! of guest RAM into the snapshot's `memory` file while the guest runs.
//!
//! Sequence (the machine drives it): pause the vCPUs, save CPU and device
//! state, write-protect RAM, resume, then [`LiveCopy::start`] and later
//! [`LiveCopy::wait`]. The protection is either [`arm`] in the pause (or
//! [`arm_pages`] for a pre-copy's residue), or armed before the pause with
//! the guest running and completed in it ([`super::prearm`]), which keeps
//! KVM's walk of its mappings out of the pause. The file ends up holding
//! RAM exactly as it was at the instant the protection was complete.
//!
//! Two threads share the work and coordinate only through atomics per
//! region: two bitmaps (one bit per 4 KiB page, 64 pages per word) and,
//! when the write-protect granule is larger than a page, one counter per
//! granule:
//!
//! - `claimed`: set (fetch_or) by whoever takes a page first. Exactly one
//!   thread owns each page, and only the owner reads it, while it is still
//!   write-protected, so the content read is the arm-instant content.
//! - `captured`: set by the owner once the page's content is safe in the
//!   owner's private buffer.
//! - `uncaptured`: per granule, the pages of it not yet captured. Owners
//!   subtract what they capture; the one that brings it to zero releases
//!   the granule.
//!
//! The granule ([`LiveCopyOptions::granule_bytes`]) is the unit of every
//! release (write protection cleared, blocked writers woken): 4 KiB on
//! shmem, 2 MiB on hugetlbfs, where `UFFDIO_WRITEPROTECT` only accepts whole
//! huge pages. A granule is released only once every page in it is
//! captured, so claiming and capturing stay per 4 KiB page and the argument
//! above holds whatever the granule: a page is read only by its owner and
//! only before its granule is released, and a release never happens before
//! every page it covers has been read.
//!
//! The bulk copier walks the regions in order, a chunk (default 4 MiB) at a
//! time. Per 64-page word it claims every unclaimed page, copies the
//! non-zero ones into a staging buffer, marks them captured and releases
//! the granules this completed; when the chunk is done it writes its
//! non-zero runs to the file with large `pwrite`s (zero pages stay holes).
//! With 4 KiB granules a writer that hits a page the bulk copier owns
//! therefore waits at most one word's memcpy, never a disk write or the
//! whole chunk; with larger granules it waits at most for the granule.
//!
//! The fault handler polls the userfaultfd. For a fault in granule G it
//! claims every unclaimed page of the fault block holding it (the aligned
//! block of `max(fault_block_bytes, granule_bytes)`), copies them, marks
//! them captured and releases the granules this completed. If G is still
//! not complete, the bulk copier claimed pages of it and has not captured
//! them yet: it is in the middle of one word, or was preempted there (it
//! runs at a low priority, so on a busy host that can last milliseconds).
//! The handler does not wait for it: it copies those pages too, which are
//! still protected (G is not released before all of them are captured),
//! and captures them itself. `captured` is set with `fetch_or`, so exactly
//! one thread captures each page, and only the capturer's copy is written:
//! the bulk copier drops the pages taken from under it, whose content it
//! may have read after the release. The handler's copies go to the file
//! after the release. A page's copy is written only if its reader captured
//! it, and a granule is released only after every page of it was captured,
//! so no written copy can hold a write made after the arm. There is no
//! lock on the fault path, and no wait for the bulk copier.
//!
//! On any error both threads stop and every region is released, so the
//! guest never stays write-protected; [`LiveCopy`]'s drop does the same.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::memory::uffd::{self, Uffd, WpFault, PAGE_SIZE};

const PAGE: usize = PAGE_SIZE as usize;
/// Pages per bitmap word: the bulk copier's claim-copy unit.
const WORD_PAGES: u64 = 64;
/// The default write-protect granule: one 4 KiB page (shmem).
pub const PAGE_GRANULE: usize = PAGE;
/// The write-protect granule of 2 MiB hugetlbfs memory.
pub const HUGE_2M_GRANULE: usize = 2 << 20;

/// One stretch of guest RAM to copy: a `MAP_SHARED` mapping registered for
/// write-protect with the [`Uffd`] in use, and where it goes in the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    /// Start of the mapping in this process (page aligned).
    pub host_addr: u64,
    /// Length in bytes (page aligned, non-zero).
    pub len: u64,
    /// Offset of the region in the output file (page aligned). When a
    /// source memfd is given ([`LiveCopyOptions::source`]), also the
    /// region's offset in that memfd.
    pub file_offset: u64,
}

/// Tuning and optional inputs of a live copy.
#[derive(Debug)]
pub struct LiveCopyOptions {
    /// The memfd behind the regions (at the regions' `file_offset`s, as
    /// `GuestRam` lays them out). With it the bulk copier skips memfd holes
    /// (never-touched RAM) with `SEEK_DATA`/`SEEK_HOLE` instead of reading
    /// them through the mapping, which would allocate shmem pages for them.
    pub source: Option<File>,
    /// Bytes the bulk copier stages per sequential write (rounded to a
    /// multiple of 256 KiB; default 4 MiB).
    pub chunk_bytes: usize,
    /// Bytes the fault handler copies and releases around a faulting page
    /// (the aligned block holding it, pages nobody took yet; a power of two
    /// from 4 KiB to 256 KiB; default 256 KiB). Larger blocks mean fewer
    /// faults for a writer with locality, smaller ones a shorter stall.
    /// The block is never smaller than [`LiveCopyOptions::granule_bytes`].
    pub fault_block_bytes: usize,
    /// The write-protect granule of the regions' memory: every release
    /// (write protection cleared, writers woken) covers whole, aligned
    /// granules, and a granule is released only once every page of it is
    /// captured. [`PAGE_GRANULE`] (4 KiB, the default) for shmem memfd RAM;
    /// [`HUGE_2M_GRANULE`] for hugetlbfs (`MFD_HUGETLB`) RAM with 2 MiB
    /// pages, where the kernel refuses to release part of a huge page. A
    /// power of two, at least 4 KiB, dividing every region's address,
    /// length and file offset; [`LiveCopy::start_with`] refuses anything
    /// else.
    pub granule_bytes: usize,
    /// Run the bulk copier at a lower CPU priority (nice +10) so the fault
    /// handler, whose latency is a vCPU's stall, wins a contended CPU.
    /// Default true.
    pub nice_bulk: bool,
    /// Called before pages are released (their write protection cleared)
    /// for the first time, by whichever copier thread releases them; a
    /// failure fails the copy. The machine resets KVM's dirty log of the
    /// pages here, so the log holds exactly the writes made after the arm:
    /// none can have reached a page before its release.
    pub before_release: Option<ReleaseHook>,
    /// Copy only these pages (per region, bit i: page i of the region):
    /// the file already holds every other page as the copy must leave it,
    /// from a pre-copy. Arm with [`arm_pages`] and the same bitmaps. A
    /// selected page that is zero is written as zeros (the file may hold
    /// older data there), and the file need not be empty.
    pub only: Option<Vec<Vec<u64>>>,
    /// For tests: the bulk copier sleeps this long between claiming a word
    /// and capturing it, as a preempted copier would (default zero).
    pub bulk_hold: Duration,
}

/// A hook called with (region index, first page of the region, page count)
/// before those pages are released; see [`LiveCopyOptions::before_release`].
#[derive(Clone)]
pub struct ReleaseHook(pub Arc<dyn Fn(usize, u64, u64) -> Result<(), String> + Send + Sync>);

impl std::fmt::Debug for ReleaseHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReleaseHook")
    }
}

impl Default for LiveCopyOptions {
    fn default() -> Self {
        LiveCopyOptions {
            source: None,
            chunk_bytes: 4 << 20,
            fault_block_bytes: 256 << 10,
            granule_bytes: PAGE_GRANULE,
            nice_bulk: true,
            before_release: None,
            only: None,
            bulk_hold: Duration::ZERO,
        }
    }
}

/// What a finished live copy did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LiveCopyReport {
    /// Bytes of RAM covered (the sum of the region lengths).
    pub logical_bytes: u64,
    /// Bytes passed to `pwrite`. Every page is written at most once, so
    /// this equals `data_bytes`.
    pub bytes_written: u64,
    /// Bytes of non-zero pages (the rest are holes in the file).
    pub data_bytes: u64,
    /// Write-protect faults handled.
    pub faults: u64,
    /// Faults on pages not yet copied, which the handler copied first.
    pub fault_copies: u64,
    /// Longest time between the handler reading a fault and releasing it.
    pub max_fault_stall: Duration,
    /// Faults whose granule the bulk copier had claimed pages of without
    /// capturing them yet: the handler copied those pages itself instead
    /// of waiting for it.
    pub takeovers: u64,
    /// From start until the file was written and synced.
    pub duration: Duration,
    /// Of `duration`, the final fsync.
    pub sync: Duration,
}

/// Errors of the live copy.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A region is unaligned or empty.
    #[error(
        "region {index} (host {host_addr:#x}, {len:#x} bytes, file offset {file_offset:#x}) \
         must be non-empty and page aligned in address, length and offset"
    )]
    BadRegion {
        /// Index in the list.
        index: usize,
        /// Its host address.
        host_addr: u64,
        /// Its length.
        len: u64,
        /// Its file offset.
        file_offset: u64,
    },
    /// The write-protect granule is not a power of two of at least 4 KiB.
    #[error(
        "write-protect granule of {0} bytes: it must be a power of two of at least 4096 \
         bytes (4096 for shmem, 2 MiB for 2 MiB hugetlbfs pages)"
    )]
    BadGranule(usize),
    /// A region is not aligned to the write-protect granule.
    #[error(
        "region {index} (host {host_addr:#x}, {len:#x} bytes, file offset {file_offset:#x}) \
         is not aligned to the {granule:#x}-byte write-protect granule: its address, length \
         and file offset must all be multiples of it (whole huge pages on hugetlbfs)"
    )]
    GranuleMisaligned {
        /// Index in the list.
        index: usize,
        /// Its host address.
        host_addr: u64,
        /// Its length.
        len: u64,
        /// Its file offset.
        file_offset: u64,
        /// The granule in bytes.
        granule: u64,
    },
    /// Two regions overlap in memory or in the file.
    #[error("regions {0} and {1} overlap in memory or in the file")]
    Overlap(usize, usize),
    /// The output file is shorter than the regions need.
    #[error(
        "the memory file is {len} bytes but the regions end at {need}: \
         size it with set_len before the copy"
    )]
    FileTooShort {
        /// Its length.
        len: u64,
        /// The end of the last region.
        need: u64,
    },
    /// The output file already holds data.
    #[error(
        "the memory file already holds data at offset {0:#x}: the live copy writes only \
         non-zero pages and relies on holes reading as zero, so give it a freshly created \
         file sized with set_len"
    )]
    FileNotEmpty(u64),
    /// Inspecting the output or source file failed.
    #[error("cannot inspect {what}: {source}")]
    Inspect {
        /// Which file and what was asked.
        what: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// A userfaultfd operation failed.
    #[error(transparent)]
    Uffd(#[from] uffd::Error),
    /// Writing the memory file failed.
    #[error("writing {len} bytes at offset {offset:#x} of the memory file failed: {source}")]
    Write {
        /// File offset.
        offset: u64,
        /// Bytes.
        len: u64,
        /// The OS error.
        source: io::Error,
    },
    /// fsync of the memory file failed.
    #[error("fsync of the memory file failed: {0}")]
    Sync(#[source] io::Error),
    /// A copier thread could not be created or its wake-up eventfd failed.
    #[error("cannot start the live copy threads: {0}")]
    Spawn(#[source] io::Error),
    /// A copier thread panicked.
    #[error("the live copy {0} thread panicked")]
    Panicked(&'static str),
    /// The release hook failed.
    #[error("cannot prepare pages for release: {0}")]
    BeforeRelease(String),
}

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
fn granule_selected(bits: &[u64], k: u64, gp: u64) -> bool {
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

struct RegionState {
    r: Region,
    /// Index of the region in the copy's list.
    index: usize,
    claimed: Vec<AtomicU64>,
    captured: Vec<AtomicU64>,
    /// Pages per write-protect granule (a power of two).
    granule_pages: u64,
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
    fn new(r: Region, index: usize, granule_pages: u64, only: Option<&[u64]>) -> Self {
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
    fn capture(&self, w: u64, copied: u64) -> Captured {
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
    fn release_captured(&self, sh: &Shared, c: &Captured) -> Result<(), Error> {
        for_each_run(c.granules, |first, n| {
            self.release(
                &sh.uffd,
                sh.before_release.as_ref(),
                c.first_granule + first,
                n,
            )
        })
    }

    /// Whether every page of granule `g` is captured.
    fn granule_captured(&self, g: u64) -> bool {
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
    /// release wakes their writers.
    fn release(
        &self,
        uffd: &Uffd,
        hook: Option<&ReleaseHook>,
        first: u64,
        count: u64,
    ) -> Result<(), Error> {
        let (gp, gb) = (self.granule_pages, self.granule_bytes());
        let mut g = first;
        while g < first + count {
            let (w, lo) = (g / 64, g % 64);
            let n = (64 - lo).min(first + count - g);
            let span = if n == 64 { !0 } else { ((1u64 << n) - 1) << lo };
            let ours = span & !self.released[w as usize].fetch_or(span, Ordering::AcqRel);
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
        Ok(())
    }

    fn pages(&self) -> u64 {
        self.r.len / PAGE_SIZE
    }

    /// Bits of word `w` that are pages of this region.
    fn word_mask(&self, w: u64) -> u64 {
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
    unsafe fn page(&self, page: u64) -> &[u8] {
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
    fn copy_page(&self, page: u64, into: &mut [u8]) {
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
struct Captured {
    /// The pages of the word this call captured.
    pages: u64,
    /// The granules it completed: `granules` bit i is granule
    /// `first_granule + i`.
    first_granule: u64,
    granules: u64,
}

struct Shared {
    uffd: Arc<Uffd>,
    regions: Vec<RegionState>,
    /// The write-protect granule in bytes.
    granule_bytes: u64,
    /// Called before each first release (see [`LiveCopyOptions`]).
    before_release: Option<ReleaseHook>,
    /// Zero pages are written too (the file is not empty: see
    /// [`LiveCopyOptions::only`]).
    write_zeros: bool,
    out: File,
    stop: AtomicBool,
    bulk_done: AtomicBool,
    /// eventfd that wakes the fault handler from poll.
    wake: OwnedFd,
    error: Mutex<Option<Error>>,
    faults: AtomicU64,
    fault_copies: AtomicU64,
    takeovers: AtomicU64,
    max_stall_ns: AtomicU64,
    /// See [`LiveCopyOptions::bulk_hold`].
    bulk_hold: Duration,
    bytes_written: AtomicU64,
    data_bytes: AtomicU64,
}

impl Shared {
    /// Records the first error, stops both threads and releases all RAM.
    fn fail(&self, e: Error) {
        {
            let mut slot = self.error.lock().unwrap_or_else(|p| p.into_inner());
            slot.get_or_insert(e);
        }
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.release_all();
        self.signal();
    }

    fn release_all(&self) -> Result<(), Error> {
        let regions: Vec<Region> = self.regions.iter().map(|s| s.r).collect();
        disarm(&self.uffd, &regions)
    }

    /// Releases the granules no copier thread released (none after a
    /// complete copy). Not all of RAM at once: a write-protect change makes
    /// KVM drop its mappings of the range and hold the guest's faults in it
    /// until the change is done, so a release of all of RAM would stall
    /// the guest for the whole page walk and then make it refault every
    /// page.
    fn release_rest(&self) -> Result<(), Error> {
        for rs in &self.regions {
            let granules = rs.r.len / rs.granule_bytes();
            let mut g = 0;
            while g < granules {
                let (w, lo) = (g / 64, g % 64);
                let n = (64 - lo).min(granules - g);
                let span = if n == 64 { !0 } else { ((1u64 << n) - 1) << lo };
                let rest = span & !rs.released[w as usize].load(Ordering::Acquire);
                for_each_run(rest, |a, k| rs.release(&self.uffd, None, w * 64 + a, k))?;
                g += n;
            }
        }
        Ok(())
    }

    fn signal(&self) {
        let one = 1u64;
        // SAFETY: writes 8 bytes from a live u64 to our eventfd.
        let _ = unsafe { libc::write(self.wake.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    fn locate(&self, addr: u64) -> Option<(&RegionState, u64)> {
        self.regions.iter().find_map(|s| {
            (addr >= s.r.host_addr && addr < s.r.host_addr + s.r.len)
                .then(|| (s, (addr - s.r.host_addr) / PAGE_SIZE))
        })
    }

    fn write(&self, offset: u64, buf: &[u8]) -> Result<(), Error> {
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

/// A running live copy. Dropping it without [`LiveCopy::wait`] stops the
/// copy and releases all RAM.
pub struct LiveCopy {
    shared: Arc<Shared>,
    bulk: Option<JoinHandle<()>>,
    handler: Option<JoinHandle<()>>,
    started: Instant,
    /// Set once `wait` has released everything.
    finished: bool,
}

impl LiveCopy {
    /// Starts copying `regions` (already armed with [`arm`] on `uffd`) into
    /// `file` with default options. See [`LiveCopy::start_with`].
    ///
    /// # Safety
    /// As for [`LiveCopy::start_with`].
    pub unsafe fn start(
        uffd: Arc<Uffd>,
        regions: &[Region],
        file: File,
    ) -> Result<LiveCopy, Error> {
        // SAFETY: the caller upholds start_with's contract.
        unsafe { Self::start_with(uffd, regions, file, LiveCopyOptions::default()) }
    }

    /// Starts the bulk copier and the fault handler. `file` must be freshly
    /// created and sized (holes everywhere). If starting fails, every region
    /// is released before the error is returned.
    ///
    /// # Safety
    /// Every region must be a readable mapping that stays mapped until
    /// [`LiveCopy::wait`] returns or the `LiveCopy` is dropped, and `uffd`
    /// must be the userfaultfd the regions are registered with.
    pub unsafe fn start_with(
        uffd: Arc<Uffd>,
        regions: &[Region],
        file: File,
        options: LiveCopyOptions,
    ) -> Result<LiveCopy, Error> {
        let started = Instant::now();
        let prepared = Self::prepare(
            regions,
            &file,
            options.granule_bytes,
            options.only.is_none(),
        );
        if let Err(e) = prepared {
            let _ = disarm(&uffd, regions);
            return Err(e);
        }
        let granule_pages = options.granule_bytes as u64 / PAGE_SIZE;
        // SAFETY: eventfd takes only flags; the result is checked.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if efd < 0 {
            let _ = disarm(&uffd, regions);
            return Err(Error::Spawn(io::Error::last_os_error()));
        }
        // SAFETY: a new descriptor that nothing else owns.
        let wake = unsafe { OwnedFd::from_raw_fd(efd) };
        let shared = Arc::new(Shared {
            uffd,
            regions: regions
                .iter()
                .enumerate()
                .map(|(i, &r)| {
                    let only = options.only.as_ref().and_then(|o| o.get(i));
                    RegionState::new(r, i, granule_pages, only.map(Vec::as_slice))
                })
                .collect(),
            granule_bytes: options.granule_bytes as u64,
            before_release: options.before_release,
            write_zeros: options.only.is_some(),
            out: file,
            stop: AtomicBool::new(false),
            bulk_done: AtomicBool::new(false),
            wake,
            error: Mutex::new(None),
            faults: AtomicU64::new(0),
            fault_copies: AtomicU64::new(0),
            takeovers: AtomicU64::new(0),
            max_stall_ns: AtomicU64::new(0),
            bulk_hold: options.bulk_hold,
            bytes_written: AtomicU64::new(0),
            data_bytes: AtomicU64::new(0),
        });
        let mut copy = LiveCopy {
            shared: shared.clone(),
            bulk: None,
            handler: None,
            started,
            finished: false,
        };
        let block_pages = ((options.fault_block_bytes as u64 / PAGE_SIZE).clamp(1, WORD_PAGES))
            .next_power_of_two()
            .max(granule_pages);
        let sh = shared.clone();
        copy.handler = Some(
            std::thread::Builder::new()
                .name("live-wp-faults".into())
                .spawn(move || {
                    super::nice_this_thread(super::FAULT_THREAD_NICE, "live write-protect faults");
                    match std::panic::catch_unwind(AssertUnwindSafe(|| {
                        handle_faults(&sh, block_pages)
                    })) {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => sh.fail(e),
                        Err(_) => sh.fail(Error::Panicked("fault handler")),
                    }
                })
                .map_err(|e| {
                    shared.fail(Error::Spawn(io::Error::other("no thread")));
                    Error::Spawn(e)
                })?,
        );
        let sh = shared.clone();
        let chunk_pages = (options.chunk_bytes as u64 / PAGE_SIZE)
            .next_multiple_of(WORD_PAGES)
            .max(WORD_PAGES);
        let source = options.source;
        let nice_bulk = options.nice_bulk;
        copy.bulk = Some(
            std::thread::Builder::new()
                .name("live-bulk-copy".into())
                .spawn(move || {
                    if nice_bulk {
                        super::nice_this_thread(super::COPY_THREAD_NICE, "live bulk copy");
                    }
                    let run = || bulk_copy(&sh, source.as_ref(), chunk_pages);
                    match std::panic::catch_unwind(AssertUnwindSafe(run)) {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => sh.fail(e),
                        Err(_) => sh.fail(Error::Panicked("bulk copy")),
                    }
                    sh.bulk_done.store(true, Ordering::SeqCst);
                    sh.signal();
                })
                .map_err(|e| {
                    shared.fail(Error::Spawn(io::Error::other("no thread")));
                    Error::Spawn(e)
                })?,
        );
        Ok(copy)
    }

    fn prepare(regions: &[Region], file: &File, granule: usize, empty: bool) -> Result<(), Error> {
        validate(regions)?;
        validate_granule(regions, granule)?;
        let need = regions
            .iter()
            .map(|r| r.file_offset + r.len)
            .max()
            .unwrap_or(0);
        let meta = file.metadata().map_err(|source| Error::Inspect {
            what: "the memory file's size",
            source,
        })?;
        if meta.len() < need {
            return Err(Error::FileTooShort {
                len: meta.len(),
                need,
            });
        }
        // A fresh set_len file has no blocks; if it has some, ask where data is.
        if empty && meta.blocks() > 0 {
            if let Some((start, _)) = data_ranges(file, 0, meta.len(), "the memory file")?.first() {
                return Err(Error::FileNotEmpty(*start));
            }
        }
        Ok(())
    }

    /// Pages of RAM captured so far and in total.
    pub fn progress(&self) -> (u64, u64) {
        let mut done = 0;
        let mut total = 0;
        for s in &self.shared.regions {
            total += s.pages();
            done += s
                .captured
                .iter()
                .map(|w| w.load(Ordering::Relaxed).count_ones() as u64)
                .sum::<u64>();
        }
        (done, total)
    }

    /// Waits for the copy to finish, makes sure all RAM is released (every
    /// granule was, one by one, unless the copy failed) and fsyncs the file.
    pub fn wait(mut self) -> Result<LiveCopyReport, Error> {
        self.join();
        self.finished = true;
        let sh = &self.shared;
        if let Some(e) = sh.error.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = sh.release_all();
            return Err(e);
        }
        if let Err(e) = sh.release_rest() {
            let _ = sh.release_all();
            return Err(e);
        }
        let sync_start = Instant::now();
        sh.out.sync_all().map_err(Error::Sync)?;
        let sync = sync_start.elapsed();
        Ok(LiveCopyReport {
            logical_bytes: sh.regions.iter().map(|s| s.r.len).sum(),
            bytes_written: sh.bytes_written.load(Ordering::Relaxed),
            data_bytes: sh.data_bytes.load(Ordering::Relaxed),
            faults: sh.faults.load(Ordering::Relaxed),
            fault_copies: sh.fault_copies.load(Ordering::Relaxed),
            max_fault_stall: Duration::from_nanos(sh.max_stall_ns.load(Ordering::Relaxed)),
            takeovers: sh.takeovers.load(Ordering::Relaxed),
            duration: self.started.elapsed(),
            sync,
        })
    }

    fn join(&mut self) {
        if let Some(b) = self.bulk.take() {
            if b.join().is_err() {
                self.shared.fail(Error::Panicked("bulk copy"));
            }
        }
        // The bulk thread set bulk_done and signalled; the handler drains and exits.
        if let Some(h) = self.handler.take() {
            if h.join().is_err() {
                self.shared.fail(Error::Panicked("fault handler"));
            }
        }
    }
}

impl Drop for LiveCopy {
    fn drop(&mut self) {
        if self.bulk.is_some() || self.handler.is_some() {
            self.shared.stop.store(true, Ordering::SeqCst);
            self.shared.signal();
            self.join();
        }
        if !self.finished {
            let _ = self.shared.release_all();
        }
    }
}

/// Data extents of `file` within `[start, end)`, by SEEK_DATA/SEEK_HOLE.
fn data_ranges(
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

fn is_zero(page: &[u8]) -> bool {
    // SAFETY: any bit pattern is a valid u64; align_to handles the edges.
    let (head, body, tail) = unsafe { page.align_to::<u64>() };
    head.iter().all(|&b| b == 0) && body.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// Calls `f(first, count)` for every run of consecutive set bits.
fn for_each_run(
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

fn bulk_copy(sh: &Shared, source: Option<&File>, chunk_pages: u64) -> Result<(), Error> {
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

fn handle_faults(sh: &Shared, block_pages: u64) -> Result<(), Error> {
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
fn release_fault(
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
    rs.release(&sh.uffd, sh.before_release.as_ref(), g, 1)
}

/// Copies and captures the pages of granule `g` that the bulk copier
/// claimed but has not captured (it is in the middle of a word there, or
/// was preempted in it), so the faulting writer does not wait for that
/// low-priority thread. They are still protected: `g` is released only
/// once all its pages are captured. The pages the bulk copier captures
/// meanwhile stay its own and this thread's copies of them are dropped.
fn take_over(
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
fn span_mask(w: u64, first: u64, end: u64) -> u64 {
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
fn release_foreign(sh: &Shared, addr: u64) -> Result<(), Error> {
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
fn wait_readable(sh: &Shared) -> Result<(), Error> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::uffd::tests::SharedMem;
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicU8, AtomicUsize};

    const MIB: u64 = 1 << 20;

    fn uffd() -> Arc<Uffd> {
        Arc::new(Uffd::new().unwrap_or_else(|e| panic!("live BRANCH needs uffd-wp on shmem: {e}")))
    }

    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            let dir = std::env::temp_dir().join(format!("live-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }

        fn fresh_file(&self, name: &str, len: u64) -> (PathBuf, File) {
            let path = self.0.join(name);
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)
                .unwrap();
            f.set_len(len).unwrap();
            (path, f)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Runs `f` on a thread and reports whether it finished within `secs`.
    fn finishes_within(secs: u64, f: impl FnOnce() + Send + 'static) -> bool {
        let t = std::thread::spawn(f);
        let deadline = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < deadline {
            if t.is_finished() {
                t.join().unwrap();
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    }

    fn register(uffd: &Uffd, regions: &[Region]) {
        for r in regions {
            uffd.register_wp(r.host_addr, r.len).unwrap();
        }
    }

    /// A memfd of `len` bytes (hugetlbfs with 2 MiB pages if `huge`, else
    /// shmem) mapped `MAP_SHARED` at an address aligned to `align`, so that
    /// memfd offsets and addresses agree modulo `align`.
    fn aligned_memfd(len: u64, align: u64, huge: bool) -> SharedMem {
        let flags = if huge {
            libc::MFD_CLOEXEC | libc::MFD_HUGETLB | (21 << libc::MFD_HUGE_SHIFT)
        } else {
            libc::MFD_CLOEXEC
        };
        // SAFETY: valid NUL-terminated name; result checked.
        let fd = unsafe { libc::memfd_create(c"live-test".as_ptr(), flags) };
        assert!(fd >= 0, "memfd_create: {}", io::Error::last_os_error());
        // SAFETY: a fresh descriptor nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(len).unwrap();
        let span = (len + align) as usize;
        // SAFETY: reserves address space only (no access, no backing).
        let hole = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                span,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(hole, libc::MAP_FAILED, "{}", io::Error::last_os_error());
        let addr = (hole as u64).next_multiple_of(align);
        // SAFETY: replaces part of the reservation just made (nothing else
        // uses it) with a shared mapping of the whole memfd.
        let p = unsafe {
            libc::mmap(
                addr as *mut libc::c_void,
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_FIXED,
                fd,
                0,
            )
        };
        let mapped = io::Error::last_os_error();
        // SAFETY: unmaps the unused head and tail of our own reservation.
        unsafe {
            libc::munmap(hole, (addr - hole as u64) as usize);
            libc::munmap(
                (addr + len) as *mut libc::c_void,
                (hole as u64 + span as u64 - addr - len) as usize,
            );
        }
        assert_ne!(p, libc::MAP_FAILED, "mmap of the memfd: {mapped}");
        SharedMem { file, addr, len }
    }

    /// Enough free 2 MiB huge pages for a test, raising vm.nr_hugepages if
    /// needed; the old value is written back on drop.
    struct HugePages {
        restore: Option<u64>,
    }

    impl HugePages {
        const NR: &'static str = "/proc/sys/vm/nr_hugepages";

        fn meminfo(key: &str) -> u64 {
            let info = std::fs::read_to_string("/proc/meminfo").unwrap();
            info.lines()
                .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
                .unwrap_or_else(|| panic!("no {key} in /proc/meminfo"))
        }

        /// Huge pages free and not promised to an existing mapping.
        fn available() -> u64 {
            Self::meminfo("HugePages_Free").saturating_sub(Self::meminfo("HugePages_Rsvd"))
        }

        fn total() -> u64 {
            let v = std::fs::read_to_string(Self::NR).unwrap();
            v.trim().parse().unwrap()
        }

        fn reserve(need: u64) -> HugePages {
            assert_eq!(
                Self::meminfo("Hugepagesize"),
                2048,
                "the default huge page size is not 2 MiB: /proc/sys/vm/nr_hugepages \
                 does not size the 2 MiB pool"
            );
            let have = Self::available();
            if have >= need {
                return HugePages { restore: None };
            }
            let old = Self::total();
            let want = old + (need - have);
            if let Err(e) = std::fs::write(Self::NR, format!("{want}\n")) {
                panic!(
                    "cannot raise {} from {old} to {want} for {need} free 2 MiB huge pages \
                     (only {have} free): {e}; run the tests as root",
                    Self::NR
                );
            }
            let guard = HugePages { restore: Some(old) };
            let got = Self::available();
            assert!(
                got >= need,
                "the kernel provides only {got} free 2 MiB huge pages after raising {} from \
                 {old} to {want} (now {}); the test needs {need}: the host is short of \
                 contiguous free memory",
                Self::NR,
                Self::total()
            );
            guard
        }
    }

    impl Drop for HugePages {
        fn drop(&mut self) {
            if let Some(old) = self.restore {
                let _ = std::fs::write(Self::NR, format!("{old}\n"));
            }
        }
    }

    /// Every page of every region can be written without blocking.
    fn assert_all_writable(regions: &[Region]) {
        let regions = regions.to_vec();
        assert!(
            finishes_within(20, move || {
                for r in &regions {
                    for p in (0..r.len).step_by(PAGE) {
                        let a = (r.host_addr + p) as *mut u8;
                        // SAFETY: inside a live test mapping.
                        unsafe { a.write_volatile(a.read_volatile()) };
                    }
                }
            }),
            "a write blocked: memory was left write-protected"
        );
    }

    fn xorshift(s: &mut u64) -> u64 {
        *s ^= *s << 13;
        *s ^= *s >> 7;
        *s ^= *s << 17;
        *s
    }

    /// Writers stamping pages (sequence numbers) all over `regions` until stopped.
    struct Writers {
        stop: Arc<AtomicBool>,
        writes: Arc<AtomicUsize>,
        threads: Vec<JoinHandle<()>>,
    }

    impl Writers {
        fn start(n: usize, regions: &[Region], seed: u64) -> Writers {
            let stop = Arc::new(AtomicBool::new(false));
            let writes = Arc::new(AtomicUsize::new(0));
            let threads = (0..n)
                .map(|t| {
                    let regions = regions.to_vec();
                    let (stop, writes) = (stop.clone(), writes.clone());
                    std::thread::spawn(move || {
                        let mut s = seed ^ (t as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                        let mut seq = 0u64;
                        while !stop.load(Ordering::Relaxed) {
                            let r = &regions[(xorshift(&mut s) % regions.len() as u64) as usize];
                            let page = xorshift(&mut s) % (r.len / PAGE_SIZE);
                            let word = xorshift(&mut s) % (PAGE_SIZE / 8);
                            seq += 1;
                            let a = (r.host_addr + page * PAGE_SIZE + word * 8) as *mut u64;
                            // SAFETY: inside a live test mapping (outlives the writers).
                            unsafe { a.write_volatile(seq << 8 | t as u64) };
                            writes.fetch_add(1, Ordering::Relaxed);
                        }
                    })
                })
                .collect();
            Writers {
                stop,
                writes,
                threads,
            }
        }

        fn stop(self) -> usize {
            self.stop.store(true, Ordering::Relaxed);
            for t in self.threads {
                t.join().unwrap();
            }
            self.writes.load(Ordering::Relaxed)
        }
    }

    /// Fills pages with a pattern: some pages stay memfd holes, some are
    /// written as explicit zeros, the rest carry (iteration, page) stamps.
    fn fill(mem: &SharedMem, regions: &[Region], iteration: u64) {
        for r in regions {
            for page in 0..r.len / PAGE_SIZE {
                let kind = (page * 7 + iteration) % 8;
                if kind == 0 {
                    continue; // hole
                }
                let a = (r.host_addr + page * PAGE_SIZE) as *mut u64;
                for word in 0..PAGE_SIZE / 8 {
                    let v = if kind == 1 {
                        0
                    } else {
                        (iteration << 48) ^ (r.file_offset + page * PAGE_SIZE) ^ (word * 0x1111)
                    };
                    // SAFETY: inside the live test mapping.
                    unsafe { a.add(word as usize).write(v) };
                }
            }
        }
        let _ = mem;
    }

    /// The content of `regions` now, laid out as the memory file.
    fn expected_file(regions: &[Region], file_len: u64) -> Vec<u8> {
        let mut out = vec![0u8; file_len as usize];
        for r in regions {
            // SAFETY: a live test mapping; the regions are write-protected
            // and no writer runs yet, so nothing changes it meanwhile.
            let src =
                unsafe { std::slice::from_raw_parts(r.host_addr as *const u8, r.len as usize) };
            out[r.file_offset as usize..(r.file_offset + r.len) as usize].copy_from_slice(src);
        }
        out
    }

    fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
        a.chunks(PAGE)
            .zip(b.chunks(PAGE))
            .position(|(x, y)| x != y)
            .map(|p| p * PAGE)
    }

    /// The file equals RAM at the arm instant, byte for byte, while writers
    /// stamp pages all over both regions during the copy. Ten runs with
    /// different chunk sizes, with and without the source memfd.
    #[test]
    fn copy_equals_memory_at_arm_under_concurrent_writers() {
        consistency(10, PAGE_GRANULE, || SharedMem::new(130 * MIB));
    }

    /// The same with a 64 KiB write-protect granule on shmem: several
    /// granules per bitmap word, released only when whole.
    #[test]
    fn copy_equals_memory_at_arm_with_sub_word_granules() {
        let granule = 64 << 10;
        consistency(4, granule, || {
            aligned_memfd(130 * MIB, granule as u64, false)
        });
    }

    /// The same on hugetlbfs RAM (2 MiB pages) with a 2 MiB granule: the
    /// kernel refuses any release that is not whole huge pages, so a single
    /// misaligned release fails the copy.
    #[test]
    fn copy_equals_memory_at_arm_on_hugetlbfs() {
        // 130 MiB of memfd per iteration, one mapping at a time.
        let _pages = HugePages::reserve(65);
        consistency(5, HUGE_2M_GRANULE, || {
            aligned_memfd(130 * MIB, HUGE_2M_GRANULE as u64, true)
        });
    }

    /// Runs the consistency check `iterations` times on two regions of a
    /// 130 MiB memfd from `new_mem` (aligned to `granule`).
    fn consistency(iterations: u64, granule: usize, new_mem: impl Fn() -> SharedMem) {
        let uffd = uffd();
        let dir = TempDir::new(&format!("consistency-{granule}"));
        let g = granule as u64;
        let (mut faults, mut fault_copies, mut takeovers) = (0, 0, 0);
        for iteration in 0..iterations {
            let mem = new_mem();
            let with_source = iteration % 2 == 0;
            // Region 1's length is not a multiple of 64 pages (a partial
            // bitmap word) unless the granule is a word or more; without a
            // source memfd it also sits at a different offset in the file
            // than in the memfd.
            let regions = [
                Region {
                    host_addr: mem.addr,
                    len: 64 * MIB,
                    file_offset: 0,
                },
                Region {
                    host_addr: mem.addr + 66 * MIB,
                    len: 64 * MIB - (5 * PAGE_SIZE).next_multiple_of(g),
                    file_offset: if with_source { 66 * MIB } else { 64 * MIB },
                },
            ];
            let file_len = regions[1].file_offset + regions[1].len + 3 * g;
            register(&uffd, &regions);
            fill(&mem, &regions, iteration);
            let (path, file) = dir.fresh_file("memory", file_len);

            let armed = arm(&uffd, &regions).unwrap();
            assert!(armed < Duration::from_secs(1));
            let expected = expected_file(&regions, file_len);
            let writers = Writers::start(2, &regions, iteration + 1);
            // The release hook runs once per page, whichever thread
            // releases it (the bulk copier and a fault handler waiting on
            // it may both try).
            let hooked: Arc<Vec<Vec<AtomicU8>>> = Arc::new(
                regions
                    .iter()
                    .map(|r| (0..r.len / PAGE_SIZE).map(|_| AtomicU8::new(0)).collect())
                    .collect(),
            );
            let hook = {
                let hooked = hooked.clone();
                ReleaseHook(Arc::new(move |r, first, count| {
                    for p in first..first + count {
                        if hooked[r][p as usize].fetch_add(1, Ordering::SeqCst) != 0 {
                            return Err(format!("page {p} of region {r} released twice"));
                        }
                    }
                    Ok(())
                }))
            };
            let options = LiveCopyOptions {
                source: with_source.then(|| mem.file.try_clone().unwrap()),
                chunk_bytes: [256 << 10, 1 << 20, 4 << 20, 8 << 20, 3 << 20]
                    [iteration as usize % 5],
                fault_block_bytes: [4 << 10, 256 << 10, 32 << 10][iteration as usize % 3],
                granule_bytes: granule,
                nice_bulk: iteration % 4 != 3,
                before_release: Some(hook),
                only: None,
                // Some copies with a copier that stalls in every word, so
                // the writers' faults take its pages over.
                bulk_hold: if iteration % 3 == 2 {
                    Duration::from_micros(200)
                } else {
                    Duration::ZERO
                },
            };
            // SAFETY: `mem` outlives the copy (waited for below).
            let copy = unsafe { LiveCopy::start_with(uffd.clone(), &regions, file, options) };
            let report = copy.and_then(LiveCopy::wait);
            // Stop the writers before anything can panic: they must not
            // outlive the mapping.
            let writes = writers.stop();
            let report = report.unwrap_or_else(|e| {
                panic!("granule {granule:#x}, iteration {iteration}: the live copy failed: {e}")
            });

            let got = std::fs::read(&path).unwrap();
            assert_eq!(got.len(), expected.len());
            if let Some(at) = first_difference(&got, &expected) {
                panic!(
                    "granule {granule:#x}, iteration {iteration}: the file differs from memory \
                     at the arm instant at file offset {at:#x} ({report:?})"
                );
            }
            let data_pages = expected.chunks(PAGE).filter(|p| !is_zero(p)).count() as u64;
            assert_eq!(report.data_bytes, data_pages * PAGE_SIZE, "{report:?}");
            assert_eq!(report.bytes_written, report.data_bytes);
            assert_eq!(report.logical_bytes, regions[0].len + regions[1].len);
            assert!(writes > 0);
            for (r, pages) in hooked.iter().enumerate() {
                if let Some(p) = pages.iter().position(|n| n.load(Ordering::SeqCst) != 1) {
                    panic!("page {p} of region {r} was never released through the hook");
                }
            }
            faults += report.faults;
            fault_copies += report.fault_copies;
            takeovers += report.takeovers;
            assert_all_writable(&regions);
            eprintln!(
                "granule {granule:#x}, iteration {iteration}: {report:?}, {writes} writes, \
                 arm {armed:?}"
            );
            for r in &regions {
                uffd.unregister(r.host_addr, r.len).unwrap();
            }
        }
        assert!(faults > 0, "the writers never hit a protected page");
        assert!(fault_copies > 0, "the handler never copied a page first");
        assert!(
            takeovers > 0,
            "the handler never took pages over from the bulk copier"
        );
    }

    /// A copy of selected pages only (the rest of the file is already
    /// right, as after a pre-copy): only their granules are protected, and
    /// the file ends up equal to memory at the arm instant, zero pages
    /// among them overwriting older data.
    #[test]
    fn a_copy_of_selected_pages_completes_a_file_that_holds_the_rest() {
        let uffd = uffd();
        let dir = TempDir::new("only");
        for granule in [PAGE_GRANULE, 64 << 10] {
            // Granule-aligned: a 64 KiB granule needs a 64 KiB aligned
            // mapping, which a plain mmap gives only by chance.
            let mem = aligned_memfd(64 * MIB, granule as u64, false);
            let regions = [
                Region {
                    host_addr: mem.addr,
                    len: 32 * MIB,
                    file_offset: 0,
                },
                Region {
                    host_addr: mem.addr + 32 * MIB,
                    len: 32 * MIB,
                    file_offset: 32 * MIB,
                },
            ];
            register(&uffd, &regions);
            fill(&mem, &regions, 1);
            // The "pre-copy": the file holds memory as it is now.
            let (path, file) = dir.fresh_file("memory", 64 * MIB);
            file.write_all_at(&expected_file(&regions, 64 * MIB), 0)
                .unwrap();
            // Then some pages change (some to zero): those are selected.
            let mut only = vec![vec![0u64; (32 * MIB / PAGE_SIZE / 64) as usize]; 2];
            for (r, bits) in regions.iter().zip(&mut only) {
                for page in (0..r.len / PAGE_SIZE).filter(|p| p % 7 == 3 || p % 11 == 5) {
                    let a = (r.host_addr + page * PAGE_SIZE) as *mut u64;
                    let v = if page % 11 == 5 { 0 } else { page ^ 0xabcd };
                    for i in 0..PAGE / 8 {
                        // SAFETY: inside the live test mapping.
                        unsafe { a.add(i).write_volatile(v) };
                    }
                    bits[(page / 64) as usize] |= 1 << (page % 64);
                }
            }
            let expected = expected_file(&regions, 64 * MIB);
            arm_pages(&uffd, &regions, granule, &only).unwrap();
            let writers = Writers::start(2, &regions, 9);
            let options = LiveCopyOptions {
                granule_bytes: granule,
                only: Some(only),
                ..Default::default()
            };
            // SAFETY: `mem` outlives the copy (waited for below).
            let copy = unsafe { LiveCopy::start_with(uffd.clone(), &regions, file, options) };
            let report = copy.and_then(LiveCopy::wait);
            let writes = writers.stop();
            let report = report.unwrap();
            let got = std::fs::read(&path).unwrap();
            if let Some(at) = first_difference(&got, &expected) {
                panic!("granule {granule:#x}: the file differs at {at:#x} ({report:?})");
            }
            assert!(writes > 0);
            assert_all_writable(&regions);
            for r in &regions {
                uffd.unregister(r.host_addr, r.len).unwrap();
            }
            eprintln!("granule {granule:#x}: {report:?}, {writes} writes");
        }
    }

    /// A granule that is not a power of two of at least 4 KiB, or regions
    /// not aligned to it, are refused before the copy starts, with nothing
    /// left protected.
    #[test]
    fn bad_granules_are_refused_and_release_the_arm() {
        let uffd = uffd();
        let dir = TempDir::new("granule");
        let mem = aligned_memfd(8 * MIB, HUGE_2M_GRANULE as u64, false);
        let aligned = [Region {
            host_addr: mem.addr,
            len: 4 * MIB,
            file_offset: 0,
        }];
        let misaligned = [
            // Length not a whole number of granules.
            [Region {
                len: 4 * MIB - PAGE_SIZE,
                ..aligned[0]
            }],
            // Address not on a granule boundary.
            [Region {
                host_addr: mem.addr + 64 * PAGE_SIZE,
                ..aligned[0]
            }],
            // File offset not on a granule boundary.
            [Region {
                file_offset: PAGE_SIZE,
                ..aligned[0]
            }],
        ];
        uffd.register_wp(mem.addr, mem.len).unwrap();
        let start = |regions: &[Region], granule: usize| {
            let (_, file) = dir.fresh_file("memory", 8 * MIB);
            arm(&uffd, regions).unwrap();
            let options = LiveCopyOptions {
                granule_bytes: granule,
                ..Default::default()
            };
            // SAFETY: `mem` outlives the attempt.
            let err = unsafe { LiveCopy::start_with(uffd.clone(), regions, file, options) }
                .err()
                .expect("the copy started");
            assert_all_writable(regions);
            err
        };
        for granule in [0, 2048, 3 * 4096, (2 << 20) + 4096] {
            let err = start(&aligned, granule);
            assert!(matches!(err, Error::BadGranule(g) if g == granule), "{err}");
            assert!(err.to_string().contains("power of two"), "{err}");
        }
        for (i, regions) in misaligned.iter().enumerate() {
            let err = start(regions, HUGE_2M_GRANULE);
            assert!(
                matches!(err, Error::GranuleMisaligned { index: 0, granule, .. }
                    if granule == HUGE_2M_GRANULE as u64),
                "case {i}: {err}"
            );
            let msg = err.to_string();
            assert!(
                msg.contains("not aligned") && msg.contains("0x200000-byte"),
                "{msg}"
            );
            // The same regions are fine with 4 KiB granules.
            arm(&uffd, regions).unwrap();
            let (_, file) = dir.fresh_file("memory", 8 * MIB);
            // SAFETY: `mem` outlives the copy.
            let copy = unsafe { LiveCopy::start(uffd.clone(), regions, file) };
            copy.unwrap().wait().unwrap();
        }
    }

    /// Zero pages and memfd holes become file holes, and with the source
    /// memfd the copier does not populate the memfd's holes.
    #[test]
    fn zero_pages_stay_holes() {
        let uffd = uffd();
        let dir = TempDir::new("sparse");
        for with_source in [true, false] {
            let mem = SharedMem::new(64 * MIB);
            let regions = [Region {
                host_addr: mem.addr,
                len: mem.len,
                file_offset: 0,
            }];
            register(&uffd, &regions);
            // 8 data pages, 8 explicitly zeroed pages, the rest never touched.
            for i in 0..16u64 {
                let a = (mem.addr + i * 997 * PAGE_SIZE) as *mut u8;
                // SAFETY: inside the live mapping.
                unsafe { a.write_volatile(if i % 2 == 0 { 0xa5 } else { 0 }) };
            }
            let memfd_blocks = mem.file.metadata().unwrap().blocks();
            let (path, file) = dir.fresh_file("memory", mem.len);
            arm(&uffd, &regions).unwrap();
            let options = LiveCopyOptions {
                source: with_source.then(|| mem.file.try_clone().unwrap()),
                ..Default::default()
            };
            // SAFETY: `mem` outlives the copy.
            let copy = unsafe { LiveCopy::start_with(uffd.clone(), &regions, file, options) };
            let report = copy.unwrap().wait().unwrap();
            assert_eq!(report.data_bytes, 8 * PAGE_SIZE, "{report:?}");
            let meta = std::fs::metadata(&path).unwrap();
            assert_eq!(meta.len(), 64 * MIB);
            assert!(
                meta.blocks() * 512 <= 1 << 20,
                "file uses {} bytes on disk for 32 KiB of data",
                meta.blocks() * 512
            );
            if with_source {
                assert_eq!(
                    mem.file.metadata().unwrap().blocks(),
                    memfd_blocks,
                    "the copier allocated memfd holes"
                );
            }
            let got = std::fs::read(&path).unwrap();
            for i in 0..16u64 {
                let want = if i % 2 == 0 { 0xa5 } else { 0 };
                assert_eq!(got[(i * 997 * PAGE_SIZE) as usize], want);
            }
            assert_eq!(got.iter().filter(|&&b| b != 0).count(), 8);
        }
    }

    /// A file that refuses writes: the copy fails with the write error,
    /// every page is released, and writers blocked on faults finish.
    #[test]
    fn write_error_releases_everything() {
        let uffd = uffd();
        let dir = TempDir::new("error");
        let mem = SharedMem::new(32 * MIB);
        let regions = [
            Region {
                host_addr: mem.addr,
                len: 16 * MIB,
                file_offset: 0,
            },
            Region {
                host_addr: mem.addr + 16 * MIB,
                len: 16 * MIB,
                file_offset: 16 * MIB,
            },
        ];
        register(&uffd, &regions);
        fill(&mem, &regions, 3);
        let (path, _) = dir.fresh_file("memory", 32 * MIB);
        let read_only = File::open(&path).unwrap();
        arm(&uffd, &regions).unwrap();
        let writers = Writers::start(2, &regions, 99);
        // SAFETY: `mem` outlives the copy.
        let copy = unsafe { LiveCopy::start(uffd.clone(), &regions, read_only) }.unwrap();
        let err = copy.wait().unwrap_err();
        assert!(matches!(err, Error::Write { .. }), "{err}");
        assert!(err.to_string().contains("memory file"), "{err}");
        assert!(
            finishes_within(20, move || {
                writers.stop();
            }),
            "writers hang after a failed copy"
        );
        assert_all_writable(&regions);
        assert_eq!(uffd.read_event().unwrap(), None);
    }

    /// Dropping a running copy releases everything.
    #[test]
    fn drop_releases_everything() {
        let uffd = uffd();
        let dir = TempDir::new("drop");
        let mem = SharedMem::new(64 * MIB);
        let regions = [Region {
            host_addr: mem.addr,
            len: mem.len,
            file_offset: 0,
        }];
        register(&uffd, &regions);
        fill(&mem, &regions, 1);
        let (_, file) = dir.fresh_file("memory", mem.len);
        arm(&uffd, &regions).unwrap();
        // SAFETY: `mem` outlives the copy.
        let copy = unsafe { LiveCopy::start(uffd.clone(), &regions, file) }.unwrap();
        drop(copy);
        assert_all_writable(&regions);
    }

    /// A write to a protected page blocks until the handler has copied the
    /// page; the file holds the old content and the stall is recorded.
    #[test]
    fn protected_write_waits_until_its_page_is_copied() {
        let uffd = uffd();
        let dir = TempDir::new("stall");
        let mem = SharedMem::new(32 * MIB);
        let regions = [
            Region {
                host_addr: mem.addr,
                len: 16 * MIB,
                file_offset: 0,
            },
            Region {
                host_addr: mem.addr + 16 * MIB,
                len: 16 * MIB,
                file_offset: 16 * MIB,
            },
        ];
        register(&uffd, &regions);
        fill(&mem, &regions, 5);
        let target = regions[1].host_addr + 4000 * PAGE_SIZE;
        // SAFETY: inside the live mapping.
        let before = unsafe { (target as *const u64).read_volatile() };
        let (path, file) = dir.fresh_file("memory", 32 * MIB);
        arm(&uffd, &regions).unwrap();
        let done = Arc::new(AtomicBool::new(false));
        let writer = {
            let done = done.clone();
            std::thread::spawn(move || {
                // SAFETY: inside the live mapping, which outlives the thread.
                unsafe { (target as *mut u64).write_volatile(!before) };
                done.store(true, Ordering::SeqCst);
            })
        };
        std::thread::sleep(Duration::from_millis(100));
        assert!(
            !done.load(Ordering::SeqCst),
            "a protected write went through"
        );
        // SAFETY: `mem` outlives the copy.
        let copy = unsafe { LiveCopy::start(uffd.clone(), &regions, file) }.unwrap();
        let report = copy.wait().unwrap();
        writer.join().unwrap();
        assert!(report.faults >= 1, "{report:?}");
        assert!(report.max_fault_stall > Duration::ZERO, "{report:?}");
        let got = std::fs::read(&path).unwrap();
        let off = (regions[1].file_offset + 4000 * PAGE_SIZE) as usize;
        assert_eq!(
            u64::from_ne_bytes(got[off..off + 8].try_into().unwrap()),
            before
        );
        // SAFETY: inside the live mapping.
        assert_eq!(unsafe { (target as *const u64).read_volatile() }, !before);
    }

    /// A writer that hits a word the bulk copier claimed and has not
    /// captured (here it sleeps there, as a preempted copier would) does
    /// not wait for it: the handler copies those pages itself. The file
    /// still holds memory as it was at the arm, every page written once.
    #[test]
    fn a_writer_never_waits_for_a_stalled_bulk_copier() {
        for granule in [PAGE_GRANULE, 64 << 10] {
            let uffd = uffd();
            let dir = TempDir::new(&format!("takeover-{granule}"));
            let mem = aligned_memfd(4 * MIB, granule as u64, false);
            let regions = [Region {
                host_addr: mem.addr,
                len: 4 * MIB,
                file_offset: 0,
            }];
            register(&uffd, &regions);
            fill(&mem, &regions, 11);
            let expected = expected_file(&regions, 4 * MIB);
            let (path, file) = dir.fresh_file("memory", 4 * MIB);
            arm(&uffd, &regions).unwrap();
            let hold = Duration::from_millis(300);
            let options = LiveCopyOptions {
                chunk_bytes: 256 << 10,
                fault_block_bytes: 4 << 10,
                granule_bytes: granule,
                bulk_hold: hold,
                ..LiveCopyOptions::default()
            };
            // SAFETY: `mem` outlives the copy (waited for below).
            let copy =
                unsafe { LiveCopy::start_with(uffd.clone(), &regions, file, options) }.unwrap();
            // The copier claims word 0 (pages 0-63) first and then holds.
            std::thread::sleep(Duration::from_millis(50));
            let target = mem.addr + 17 * PAGE_SIZE;
            let t0 = Instant::now();
            // SAFETY: inside the live mapping.
            unsafe { (target as *mut u64).write_volatile(0x5151) };
            let waited = t0.elapsed();
            let report = copy.wait().unwrap();
            assert!(
                waited < hold / 3,
                "granule {granule:#x}: the writer waited {waited:?} behind the bulk copier's \
                 {hold:?} hold ({report:?})"
            );
            assert!(report.takeovers >= 1, "{report:?}");
            let got = std::fs::read(&path).unwrap();
            assert_eq!(first_difference(&got, &expected), None, "{report:?}");
            assert_eq!(report.bytes_written, report.data_bytes);
            let data_pages = expected.chunks(PAGE).filter(|p| !is_zero(p)).count() as u64;
            assert_eq!(report.data_bytes, data_pages * PAGE_SIZE, "{report:?}");
            uffd.unregister(regions[0].host_addr, regions[0].len)
                .unwrap();
        }
    }

    /// A fault on a protected page outside the copied regions is released.
    #[test]
    fn faults_outside_the_regions_are_released() {
        let uffd = uffd();
        let dir = TempDir::new("outside");
        let mem = SharedMem::new(8 * MIB);
        uffd.register_wp(mem.addr, mem.len).unwrap();
        let regions = [Region {
            host_addr: mem.addr,
            len: 4 * MIB,
            file_offset: 0,
        }];
        let outside = mem.addr + 6 * MIB;
        uffd.write_protect(outside, PAGE_SIZE, true).unwrap();
        let (_, file) = dir.fresh_file("memory", 4 * MIB);
        arm(&uffd, &regions).unwrap();
        // SAFETY: `mem` outlives the copy.
        let copy = unsafe { LiveCopy::start(uffd.clone(), &regions, file) }.unwrap();
        assert!(
            finishes_within(20, move || {
                // SAFETY: inside the live mapping.
                unsafe { (outside as *mut u8).write_volatile(1) };
            }),
            "a write outside the regions hangs"
        );
        copy.wait().unwrap();
    }

    /// Refusals before the copy starts leave nothing protected.
    #[test]
    fn bad_inputs_are_refused_and_release_the_arm() {
        let uffd = uffd();
        let dir = TempDir::new("refuse");
        let mem = SharedMem::new(4 * MIB);
        let regions = [Region {
            host_addr: mem.addr,
            len: mem.len,
            file_offset: 0,
        }];
        register(&uffd, &regions);

        let unaligned = [Region {
            file_offset: 100,
            ..regions[0]
        }];
        assert!(matches!(
            arm(&uffd, &unaligned),
            Err(Error::BadRegion { .. })
        ));
        let overlapping = [
            regions[0],
            Region {
                host_addr: mem.addr + PAGE_SIZE,
                len: PAGE_SIZE,
                file_offset: 8 * MIB,
            },
        ];
        assert!(matches!(
            arm(&uffd, &overlapping),
            Err(Error::Overlap(0, 1))
        ));

        let (_, short) = dir.fresh_file("short", 2 * MIB);
        arm(&uffd, &regions).unwrap();
        // SAFETY: `mem` outlives the attempt.
        let err = unsafe { LiveCopy::start(uffd.clone(), &regions, short) }
            .err()
            .unwrap();
        assert!(matches!(err, Error::FileTooShort { .. }), "{err}");
        assert_all_writable(&regions);

        let (_, used) = dir.fresh_file("used", 4 * MIB);
        used.write_all_at(&[1; 4096], 2 * MIB).unwrap();
        arm(&uffd, &regions).unwrap();
        // SAFETY: `mem` outlives the attempt.
        let err = unsafe { LiveCopy::start(uffd.clone(), &regions, used) }
            .err()
            .unwrap();
        assert!(
            matches!(err, Error::FileNotEmpty(o) if o == 2 * MIB),
            "{err}"
        );
        assert_all_writable(&regions);
    }

    #[test]
    fn runs_of_bits() {
        let mut runs = Vec::new();
        for bits in [0u64, 1, !0, 0b1110_0110, 1 << 63, !0 ^ (1 << 10)] {
            runs.clear();
            for_each_run(bits, |a, n| {
                runs.push((a, n));
                Ok(())
            })
            .unwrap();
            let mut back = 0u64;
            for &(a, n) in &runs {
                back |= if n == 64 { !0 } else { ((1u64 << n) - 1) << a };
            }
            assert_eq!(back, bits, "{runs:?}");
        }
    }
}
