use std::fs::File;
use std::io;
use std::os::fd::FromRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::*;
use crate::memory::uffd::tests::SharedMem;
use crate::memory::uffd::{Uffd, PAGE_SIZE};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, AtomicUsize};

const MIB: u64 = 1 << 20;

fn uffd() -> Arc<Uffd> {
    Arc::new(Uffd::new().unwrap_or_else(|e| panic!("live BRANCH needs uffd-wp on shmem: {e}")))
}

struct TempDir(PathBuf);

impl TempDir {
    pub(super) fn new(name: &str) -> TempDir {
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

    /// Stops the writers; fails (rather than hangs) if one stays blocked:
    /// a writer left waiting on a write-protect fault after the copy ended
    /// is a release or wake the engine missed.
    fn stop(self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        let deadline = Instant::now() + Duration::from_secs(30);
        for t in self.threads {
            while !t.is_finished() {
                assert!(
                    Instant::now() < deadline,
                    "a writer is still blocked 30 s after the copy ended: a write-protect \
                     fault was never released or woken (its thread is {:?})",
                    t.thread().id()
                );
                std::thread::sleep(Duration::from_millis(5));
            }
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
        let src = unsafe { std::slice::from_raw_parts(r.host_addr as *const u8, r.len as usize) };
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
            chunk_bytes: [256 << 10, 1 << 20, 4 << 20, 8 << 20, 3 << 20][iteration as usize % 5],
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
        let copy = unsafe { LiveCopy::start_with(uffd.clone(), &regions, file, options) }.unwrap();
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
