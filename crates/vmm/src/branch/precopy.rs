//! Pre-copy: the live BRANCH of a caller that waits for its snapshot.
//!
//! The guest keeps running while its RAM is copied into the snapshot's
//! `memory` file. KVM's dirty log (read without resetting it: manual
//! dirty-log protection) and the VMM's own dirty bitmap (device writes)
//! say which pages changed behind the copy; those are copied again, round
//! after round, until what is left is small or stops shrinking. Then the
//! machine pauses, and in the pause the pages written since the last round
//! (the residue) are copied to memory, vCPU and device state saved, and the
//! guest resumes; the residue goes to the file after. The snapshot is RAM
//! as it was in that final pause. When the guest dirties memory about as
//! fast as it is copied, the rounds leave too much for a short pause: the
//! machine then gives the pre-copy up before pausing
//! ([`Precopy::converged`]) for a write-protect arm made while the guest
//! runs. A residue that still grows too large by the pause is
//! write-protected in it and copied after it ([`Ending::Protect`]).
//!
//! Why every page ends up as it was in the pause: a page's bit is cleared
//! in KVM's log (and the page write-protected in KVM's MMU) just before the
//! page is read, so a guest write after or during the read sets the bit
//! again and the page is read again, in a later round or in the pause. KVM
//! sets a page's bit whenever it maps the page writable, and a page it does
//! not map writable cannot be written by the guest. Device writes land in
//! the VMM's bitmap (after the data), which is taken at the start of every
//! round and in the pause, where device workers stand still.
//!
//! There is no write protection and no fault for the VMM to serve, so the
//! guest never waits for the copier. It pays KVM's dirty logging instead:
//! its first write to a page after the page's bit was cleared exits to KVM
//! (about 10 us on the PVM development hosts), and each reset holds KVM's
//! MMU lock for one chunk of pages.
//!
//! In the pause, [`Precopy::end_in_pause`] reads KVM's log (a bitmap copy)
//! and resets the residue's bits, cheap as only the residue is dirty, so
//! the next diff snapshot stacks on this one; a residue left to the
//! write-protected copy has its bits reset page by page before release.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use crate::kvm::vm::Vm;
use crate::memory::{data_extents, Backend, GuestRam};

const PAGE: usize = 4096;
const PAGE_SIZE: u64 = PAGE as u64;

/// Errors of a pre-copy.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// KVM cannot read its dirty log without resetting it.
    #[error(
        "pre-copy needs KVM's manual dirty-log protection (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2), \
         which this host's KVM does not offer"
    )]
    NoManualDirtyLog,
    /// Reading or resetting KVM's dirty log failed.
    #[error("cannot read or reset KVM's dirty log: {0}")]
    DirtyLog(String),
    /// Finding the guest memfd's data failed.
    #[error("cannot find which parts of the guest memfd hold data: {0}")]
    Extents(#[source] io::Error),
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
    /// The dirty bitmaps do not match guest RAM.
    #[error("the dirty bitmaps cover {got} regions but guest RAM has {want}")]
    Bitmaps {
        /// Bitmaps given.
        got: usize,
        /// Regions of RAM.
        want: usize,
    },
}

/// When the rounds stop.
#[derive(Clone, Copy, Debug)]
pub struct PrecopyOptions {
    /// Stop once at most this many pages are dirty: the pause copies them
    /// (default 1024 pages, 4 MiB, about a millisecond of memcpy).
    pub residue_pages: u64,
    /// The most pages the pause copies; a larger residue is left to a
    /// write-protected copy after the pause (default 4096 pages, 16 MiB).
    pub pause_copy_pages: u64,
    /// Rounds at most, the first (all of RAM) included (default 12).
    pub max_rounds: u32,
    /// Stop when a round's dirty set is more than this percentage of the
    /// previous round's: the guest dirties memory about as fast as it is
    /// copied, and more rounds would not shorten the pause (default 80).
    pub max_ratio_percent: u64,
    /// Pages per KVM_CLEAR_DIRTY_LOG and per staged file write (a multiple
    /// of 64; default 1024, 4 MiB).
    pub chunk_pages: u64,
    /// Give the pre-copy up when the rounds leave more than
    /// `pause_copy_pages` dirty (see [`Precopy::converged`]; default true).
    /// Off, such a residue is write-protected in the pause (tests).
    pub abandon: bool,
}

impl PrecopyOptions {
    /// The defaults, with any of `residue_pages`, `pause_copy_pages`,
    /// `max_rounds`, `max_ratio_percent`, `chunk_pages` and `abandon` (as
    /// 0 or 1) overridden by the environment variable `FORKD_PRECOPY`
    /// (comma-separated `name=value` pairs, e.g.
    /// `pause_copy_pages=0,max_rounds=1`), for tuning and for tests. An
    /// unknown name or a bad value is logged and ignored.
    pub fn from_env() -> Self {
        let spec = std::env::var("FORKD_PRECOPY").unwrap_or_default();
        let (o, errors) = Self::parse(&spec);
        for e in errors {
            tracing::warn!("FORKD_PRECOPY: {e}; ignored");
        }
        o
    }

    /// The defaults overridden by `spec` (see [`PrecopyOptions::from_env`]),
    /// and what in it was not understood.
    fn parse(spec: &str) -> (Self, Vec<String>) {
        let mut o = PrecopyOptions::default();
        let mut errors = Vec::new();
        for kv in spec.split(',').map(str::trim).filter(|kv| !kv.is_empty()) {
            let Some((name, value)) = kv.split_once('=') else {
                errors.push(format!("'{kv}' is not name=value"));
                continue;
            };
            let Ok(v) = value.trim().parse::<u64>() else {
                errors.push(format!("'{kv}': the value is not a number"));
                continue;
            };
            match name.trim() {
                "residue_pages" => o.residue_pages = v,
                "pause_copy_pages" => o.pause_copy_pages = v,
                "max_rounds" => o.max_rounds = v.clamp(1, 1000) as u32,
                "max_ratio_percent" => o.max_ratio_percent = v,
                "chunk_pages" => o.chunk_pages = v.max(64),
                "abandon" => o.abandon = v != 0,
                other => errors.push(format!("unknown setting '{other}'")),
            }
        }
        (o, errors)
    }
}

impl Default for PrecopyOptions {
    fn default() -> Self {
        PrecopyOptions {
            residue_pages: 1024,
            pause_copy_pages: 4096,
            max_rounds: 12,
            max_ratio_percent: 80,
            chunk_pages: 1024,
            abandon: true,
        }
    }
}

/// What a pre-copy did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PrecopyReport {
    /// Pages copied by each round while the guest ran (the first round
    /// copies every page that holds data).
    pub round_pages: Vec<u64>,
    /// Pages dirty at the pause: copied in it, or after it under write
    /// protection when more than [`PrecopyOptions::pause_copy_pages`].
    pub residue_pages: u64,
    /// The rounds, before the pause.
    pub rounds: Duration,
    /// Copying the residue to memory, in the pause.
    pub residue_copy: Duration,
}

/// One KVM memory slot of guest RAM.
struct Slot {
    host_addr: u64,
    pages: u64,
    file_offset: u64,
}

/// How the pause ends a pre-copy.
pub enum Ending {
    /// The residue, copied to memory: write it with [`Precopy::finish`].
    Copied(Residue),
    /// A residue too large to copy in the pause: these pages (per slot,
    /// bit i: page i) must be copied after it under write protection
    /// ([`crate::branch::live::LiveCopyOptions::only`], armed with
    /// [`crate::branch::live::arm_pages`]). Their dirty-log bits are left
    /// set: reset each page's just before its first release.
    Protect(Vec<Vec<u64>>),
}

/// The pages copied in the pause, waiting to be written.
pub struct Residue {
    /// (slot, page) of each, in order.
    pages: Vec<(usize, u64)>,
    /// Their content, a page each, in the same order.
    data: Vec<u8>,
}

impl Residue {
    /// Pages held.
    pub fn len(&self) -> usize {
        self.pages.len()
    }

    /// Whether it holds no page.
    pub fn is_empty(&self) -> bool {
        self.pages.is_empty()
    }
}

/// A pre-copy of a machine's RAM into a snapshot's memory file.
pub struct Precopy<'a> {
    vm: &'a Vm,
    ram: &'a GuestRam,
    out: File,
    slots: Vec<Slot>,
    /// Per slot, the pages written to the file with non-zero data: a page
    /// that is zero when copied again must then be written as zeros.
    in_file: Vec<Vec<u64>>,
    /// Per slot, pages the VMM wrote (taken from its bitmap) that are not
    /// copied yet.
    carry: Vec<Vec<u64>>,
    staging: Vec<u8>,
    /// Memory for the residue, touched before the pause so that copying
    /// into it takes no page faults there.
    residue_buf: Vec<u8>,
    options: PrecopyOptions,
    report: PrecopyReport,
    /// Pages dirty when the rounds stopped.
    left: u64,
}

fn words(pages: u64) -> usize {
    pages.div_ceil(64) as usize
}

fn count(bits: &[Vec<u64>]) -> u64 {
    bits.iter()
        .flatten()
        .map(|w| u64::from(w.count_ones()))
        .sum()
}

fn or_into(into: &mut [Vec<u64>], from: &[Vec<u64>]) {
    for (a, b) in into.iter_mut().zip(from) {
        for (x, y) in a.iter_mut().zip(b) {
            *x |= y;
        }
    }
}

impl<'a> Precopy<'a> {
    /// A pre-copy of `ram` (the RAM of `vm`, one KVM slot per region, as
    /// [`Vm::new`] registers it) into `out`, a fresh memory file sized to
    /// all of RAM (holes everywhere).
    pub fn new(
        vm: &'a Vm,
        ram: &'a GuestRam,
        out: File,
        options: PrecopyOptions,
    ) -> Result<Self, Error> {
        if !vm.manual_dirty_log() {
            return Err(Error::NoManualDirtyLog);
        }
        let mut file_offset = 0;
        let slots: Vec<Slot> = ram
            .slots()
            .into_iter()
            .map(|(_, host_addr, len)| {
                let s = Slot {
                    host_addr,
                    pages: len / PAGE_SIZE,
                    file_offset,
                };
                file_offset += len;
                s
            })
            .collect();
        let zeros = || slots.iter().map(|s| vec![0u64; words(s.pages)]).collect();
        let chunk_pages = options.chunk_pages.next_multiple_of(64).max(64);
        Ok(Precopy {
            vm,
            ram,
            out,
            in_file: zeros(),
            carry: zeros(),
            staging: vec![0u8; chunk_pages as usize * PAGE],
            residue_buf: Vec::new(),
            options: PrecopyOptions {
                chunk_pages,
                ..options
            },
            slots,
            report: PrecopyReport::default(),
            left: 0,
        })
    }

    /// Copies RAM while the guest runs: first every page that holds data,
    /// then, round after round, the pages dirtied since they were copied,
    /// until few are left or their number stops shrinking (see
    /// [`PrecopyOptions`]). Call [`Precopy::end_in_pause`] in the pause
    /// that follows.
    pub fn run(&mut self) -> Result<(), Error> {
        let start = Instant::now();
        // Device writes from now on are caught by the bitmap; everything
        // before is data in the memfd.
        let vmm = self.ram.take_vmm_dirty();
        let mut set = self.data_pages()?;
        or_into(&mut set, &vmm);
        let mut previous = count(&set);
        self.copy_round(&set)?;
        self.report.round_pages.push(previous);
        let left = loop {
            let mut set = self.read_kvm_log()?;
            let vmm = self.ram.take_vmm_dirty();
            or_into(&mut self.carry, &vmm);
            or_into(&mut set, &self.carry);
            let n = count(&set);
            let rounds = self.report.round_pages.len() as u32;
            if n <= self.options.residue_pages
                || rounds >= self.options.max_rounds
                || n * 100 > previous * self.options.max_ratio_percent
            {
                break n;
            }
            for c in &mut self.carry {
                c.fill(0);
            }
            self.copy_round(&set)?;
            self.report.round_pages.push(n);
            previous = n;
        };
        self.left = left;
        // Room for about twice what is dirty now, within what the pause copies.
        let pages = (left * 2)
            .max(self.options.residue_pages)
            .min(self.options.pause_copy_pages);
        self.residue_buf = vec![0u8; pages as usize * PAGE];
        for page in self.residue_buf.chunks_mut(PAGE) {
            // SAFETY: a plain write into our own buffer; volatile so that
            // the page is really touched (faulted in) now.
            unsafe { std::ptr::write_volatile(page.as_mut_ptr(), 0) };
        }
        self.report.rounds = start.elapsed();
        Ok(())
    }

    /// In the pause (vCPUs stopped, device workers quiesced): the residue
    /// is what KVM logged since the last round plus the VMM's writes
    /// (`vmm_dirty`, its bitmap taken in this pause, and those taken
    /// earlier but not copied yet). Up to
    /// [`PrecopyOptions::pause_copy_pages`], its log is reset and it is
    /// copied to memory, to write with [`Precopy::finish`] once the guest
    /// runs again; beyond, it is left to a write-protected copy.
    pub fn end_in_pause(&mut self, vmm_dirty: &[Vec<u64>]) -> Result<Ending, Error> {
        if vmm_dirty.len() != self.slots.len() {
            return Err(Error::Bitmaps {
                got: vmm_dirty.len(),
                want: self.slots.len(),
            });
        }
        let start = Instant::now();
        let mut set = self.read_kvm_log()?;
        or_into(&mut set, &std::mem::take(&mut self.carry));
        or_into(&mut set, vmm_dirty);
        let n = count(&set) as usize;
        self.report.residue_pages = n as u64;
        if n as u64 > self.options.pause_copy_pages {
            return Ok(Ending::Protect(set));
        }
        for (si, (slot, bits)) in self.slots.iter().zip(&set).enumerate() {
            self.vm
                .clear_dirty_log(si as u32, 0, slot.pages, bits)
                .map_err(|e| Error::DirtyLog(e.to_string()))?;
        }
        let mut data = std::mem::take(&mut self.residue_buf);
        if data.len() < n * PAGE {
            data.resize(n * PAGE, 0);
        }
        let mut residue = Residue {
            pages: Vec::with_capacity(n),
            data,
        };
        for (si, (slot, bits)) in self.slots.iter().zip(&set).enumerate() {
            for (w, &word) in bits.iter().enumerate() {
                let mut b = word;
                while b != 0 {
                    let page = w as u64 * 64 + u64::from(b.trailing_zeros());
                    b &= b - 1;
                    if page >= slot.pages {
                        continue;
                    }
                    let at = residue.pages.len() * PAGE;
                    read_page(slot, page, &mut residue.data[at..at + PAGE]);
                    residue.pages.push((si, page));
                }
            }
        }
        residue.data.truncate(residue.pages.len() * PAGE);
        self.report.residue_copy = start.elapsed();
        Ok(Ending::Copied(residue))
    }

    /// Whether the rounds left few enough dirty pages for the pause to copy
    /// them ([`PrecopyOptions::pause_copy_pages`]). When not, the guest
    /// dirties memory about as fast as it is copied, and the residue would
    /// be write-protected in the pause, which on a shadow-paging host costs
    /// KVM a walk of its mappings of every page: better abandon the
    /// pre-copy for a write-protect arm made before the pause.
    pub fn converged(&self) -> bool {
        !self.options.abandon || self.left <= self.options.pause_copy_pages
    }

    /// What the pre-copy did so far.
    pub fn rounds(&self) -> &[u64] {
        &self.report.round_pages
    }

    /// What the pre-copy did, for a residue left to a write-protected copy
    /// (which writes the file itself).
    pub fn report(&self) -> PrecopyReport {
        self.report.clone()
    }

    /// Writes the residue into the memory file (the guest running again)
    /// and says what the pre-copy did. The file then holds RAM as it was
    /// in the pause; the caller syncs it.
    pub fn finish(mut self, residue: Residue) -> Result<PrecopyReport, Error> {
        let mut i = 0;
        while i < residue.pages.len() {
            // A run of consecutive pages of one slot.
            let (si, first) = residue.pages[i];
            let mut j = i + 1;
            while j < residue.pages.len() && residue.pages[j] == (si, first + (j - i) as u64) {
                j += 1;
            }
            self.write_pages(si, first, &residue.data[i * PAGE..j * PAGE])?;
            i = j;
        }
        Ok(self.report)
    }

    /// Per slot, the pages the guest memfd holds data for (all of them when
    /// RAM is not a memfd). A hole reads as zero, so it needs no copy; a
    /// hole the guest fills later is in KVM's log, whose bits for it this
    /// round does not reset.
    fn data_pages(&self) -> Result<Vec<Vec<u64>>, Error> {
        let all = || {
            self.slots
                .iter()
                .map(|s| {
                    let mut v = vec![!0u64; words(s.pages)];
                    if s.pages % 64 != 0 {
                        *v.last_mut().expect("a slot has pages") = (1 << (s.pages % 64)) - 1;
                    }
                    v
                })
                .collect()
        };
        // A file-backed (MAP_PRIVATE) machine's own pages are not in its file.
        let memfd = match self.ram.backend() {
            Backend::Memfd | Backend::HugeMemfd => self.ram.file(),
            _ => None,
        };
        let Some(memfd) = memfd else {
            return Ok(all());
        };
        let extents = data_extents(memfd).map_err(Error::Extents)?;
        let mut set: Vec<Vec<u64>> = self
            .slots
            .iter()
            .map(|s| vec![0u64; words(s.pages)])
            .collect();
        for (slot, bits) in self.slots.iter().zip(&mut set) {
            let (lo, hi) = (slot.file_offset, slot.file_offset + slot.pages * PAGE_SIZE);
            for &(start, end) in &extents {
                let (start, end) = (start.max(lo), end.min(hi));
                if start >= end {
                    continue;
                }
                let first = (start - lo) / PAGE_SIZE;
                let last = (end - lo).div_ceil(PAGE_SIZE);
                for p in first..last {
                    bits[(p / 64) as usize] |= 1 << (p % 64);
                }
            }
        }
        Ok(set)
    }

    fn read_kvm_log(&self) -> Result<Vec<Vec<u64>>, Error> {
        self.vm
            .read_dirty_log(self.ram)
            .map_err(|e| Error::DirtyLog(e.to_string()))
    }

    /// Copies the pages of `set` (per slot), a chunk at a time: the chunk's
    /// bits are reset in KVM's log (its pages write-protected in KVM's MMU)
    /// just before its pages are read.
    fn copy_round(&mut self, set: &[Vec<u64>]) -> Result<(), Error> {
        let chunk = self.options.chunk_pages;
        for (si, bits) in set.iter().enumerate() {
            let pages = self.slots[si].pages;
            let mut c0 = 0;
            while c0 < pages {
                let c1 = (c0 + chunk).min(pages);
                let masks = &bits[(c0 / 64) as usize..words(c1)];
                if masks.iter().any(|&m| m != 0) {
                    self.vm
                        .clear_dirty_log(si as u32, c0, c1 - c0, masks)
                        .map_err(|e| Error::DirtyLog(e.to_string()))?;
                    self.copy_chunk(si, c0, c1, masks)?;
                }
                c0 = c1;
            }
        }
        Ok(())
    }

    /// Copies the pages of `masks` (bit i: page `c0 + i`) in `[c0, c1)` of
    /// slot `si` into the staging buffer and writes them.
    fn copy_chunk(&mut self, si: usize, c0: u64, c1: u64, masks: &[u64]) -> Result<(), Error> {
        let slot = &self.slots[si];
        let selected = |p: u64| masks[((p - c0) / 64) as usize] & (1 << ((p - c0) % 64)) != 0;
        for p in (c0..c1).filter(|&p| selected(p)) {
            let at = ((p - c0) as usize) * PAGE;
            read_page(slot, p, &mut self.staging[at..at + PAGE]);
        }
        // Write runs of consecutive selected pages.
        let mut p = c0;
        while p < c1 {
            if !selected(p) {
                p += 1;
                continue;
            }
            let s = p;
            while p < c1 && selected(p) {
                p += 1;
            }
            let (a, b) = (((s - c0) as usize) * PAGE, ((p - c0) as usize) * PAGE);
            let staged = std::mem::take(&mut self.staging);
            let written = self.write_pages(si, s, &staged[a..b]);
            self.staging = staged;
            written?;
        }
        Ok(())
    }

    /// Writes `data` (whole pages, the content of pages `first..` of slot
    /// `si`) into the file: runs of non-zero pages, and zeros over pages
    /// that held data in the file; zero pages over holes stay holes.
    fn write_pages(&mut self, si: usize, first: u64, data: &[u8]) -> Result<(), Error> {
        let base = self.slots[si].file_offset;
        let in_file = &mut self.in_file[si];
        let n = (data.len() / PAGE) as u64;
        let mut run: Option<u64> = None;
        let flush = |start: u64, end: u64| -> Result<(), Error> {
            let bytes = &data[((start - first) as usize) * PAGE..((end - first) as usize) * PAGE];
            let offset = base + start * PAGE_SIZE;
            self.out
                .write_all_at(bytes, offset)
                .map_err(|source| Error::Write {
                    offset,
                    len: bytes.len() as u64,
                    source,
                })
        };
        for p in first..first + n {
            let page = &data[((p - first) as usize) * PAGE..((p - first) as usize + 1) * PAGE];
            let (w, bit) = ((p / 64) as usize, 1u64 << (p % 64));
            let zero = is_zero(page);
            let write = !zero || in_file[w] & bit != 0;
            if zero {
                in_file[w] &= !bit;
            } else {
                in_file[w] |= bit;
            }
            match (write, run) {
                (true, None) => run = Some(p),
                (false, Some(s)) => {
                    flush(s, p)?;
                    run = None;
                }
                _ => {}
            }
        }
        if let Some(s) = run {
            flush(s, first + n)?;
        }
        Ok(())
    }
}

/// Runs `f` on a thread of its own named `name` at a lower CPU priority
/// (nice +10) and returns its result: the pre-copy and the file work after
/// the pause compete for the CPUs with the guest's vCPU threads, which
/// should win (on a host with few cores a vCPU kept off the CPU is a guest
/// that stalls). A thread that cannot be started runs `f` here instead.
pub fn niced<T: Send>(name: &str, f: impl FnOnce() -> T + Send) -> T {
    let mut f = Some(f);
    let ran = std::thread::scope(|scope| {
        let job = &mut f;
        std::thread::Builder::new()
            .name(name.to_owned())
            .spawn_scoped(scope, move || {
                crate::seccomp::enter_or_exit(crate::seccomp::Kind::Copy);
                super::nice_this_thread(super::COPY_THREAD_NICE, name);
                (job.take().expect("the job runs once"))()
            })
            .ok()
            .map(|t| t.join())
    });
    match ran {
        Some(Ok(v)) => v,
        Some(Err(panic)) => std::panic::resume_unwind(panic),
        None => (f.take().expect("the thread never started"))(),
    }
}

/// Copies page `page` of `slot` into `into` (one page long).
fn read_page(slot: &Slot, page: u64, into: &mut [u8]) {
    debug_assert!(page < slot.pages && into.len() == PAGE);
    let src = (slot.host_addr + page * PAGE_SIZE) as *const u8;
    // SAFETY: `src` is inside the slot's mapping, which the machine keeps
    // for as long as the pre-copy borrows its RAM; `into` is a distinct
    // buffer of one page. The guest may write the page meanwhile (behind
    // the compiler's back, as a device's DMA would): this is a plain byte
    // copy out of the mapping, no Rust reference to guest memory is made,
    // and a copy torn by a write is copied again (the write set the page's
    // dirty bit after the bit was reset).
    unsafe { std::ptr::copy_nonoverlapping(src, into.as_mut_ptr(), PAGE) };
}

fn is_zero(page: &[u8]) -> bool {
    // SAFETY: any bit pattern is a valid u64; align_to handles the edges.
    let (head, body, tail) = unsafe { page.align_to::<u64>() };
    head.iter().all(|&b| b == 0) && body.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_from_a_spec() {
        let (o, errors) = PrecopyOptions::parse("max_rounds=1, pause_copy_pages=0,abandon=0");
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!((o.max_rounds, o.pause_copy_pages, o.abandon), (1, 0, false));
        assert_eq!(o.residue_pages, PrecopyOptions::default().residue_pages);
        let (o, errors) = PrecopyOptions::parse("rounds=3,max_rounds=x,chunk_pages");
        assert_eq!(errors.len(), 3, "{errors:?}");
        assert_eq!(o.max_rounds, PrecopyOptions::default().max_rounds);
        assert!(PrecopyOptions::parse("").1.is_empty());
    }

    #[test]
    fn bit_helpers() {
        assert_eq!(words(1), 1);
        assert_eq!(words(64), 1);
        assert_eq!(words(65), 2);
        let mut a = vec![vec![1u64, 0], vec![4]];
        or_into(&mut a, &[vec![2, 8], vec![1]]);
        assert_eq!(a, vec![vec![3, 8], vec![5]]);
        assert_eq!(count(&a), 5);
        assert!(is_zero(&[0u8; PAGE]));
        let mut p = [0u8; PAGE];
        p[PAGE - 1] = 1;
        assert!(!is_zero(&p));
    }
}
