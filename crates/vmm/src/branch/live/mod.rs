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

mod arm;
mod copier;
mod engine;
mod fault;
#[cfg(test)]
mod tests;
mod tracker;

use std::fs::File;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use crate::memory::uffd::{self, PAGE_SIZE};

pub use arm::{arm, arm_pages, disarm};
pub(crate) use arm::{validate, validate_granule};
use copier::*;
pub use engine::LiveCopy;
use fault::*;
pub(crate) use fault::{release_outside, wait_for_fault};
use tracker::*;

const PAGE: usize = PAGE_SIZE as usize;
/// Pages per bitmap word: the bulk copier's claim-copy unit.
const WORD_PAGES: u64 = 64;
/// The default write-protect granule: one 4 KiB page (shmem).
pub const PAGE_GRANULE: usize = PAGE;
/// The write-protect granule of 2 MiB hugetlbfs memory.
pub const HUGE_2M_GRANULE: usize = 2 << 20;

/// One stretch of guest RAM to copy: a `MAP_SHARED` mapping registered for
/// write-protect with the [`Uffd`](crate::memory::uffd::Uffd) in use, and where it goes in the file.
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

impl Region {
    /// Guest RAM's mappings `(guest address, host address, length)` as
    /// regions of one file, back to back in order (the layout of a
    /// snapshot's memory file and of a memfd holding all of RAM).
    pub fn back_to_back(slots: &[(u64, u64, u64)]) -> Vec<Region> {
        let mut offset = 0;
        slots
            .iter()
            .map(|&(_, host_addr, len)| {
                let r = Region {
                    host_addr,
                    len,
                    file_offset: offset,
                };
                offset += len;
                r
            })
            .collect()
    }
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
