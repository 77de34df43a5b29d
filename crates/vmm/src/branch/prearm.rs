//! The write-protect arm of a live BRANCH, moved before the pause.
//!
//! A live branch whose caller does not wait copies RAM after the pause
//! under write protection ([`crate::branch::live`]), so all of RAM must be
//! write-protected when the guest resumes. Arming it inside the pause costs
//! the page-table walk of every page (tens of milliseconds for 1.5 GiB of
//! 4 KiB pages) and, on a host whose KVM shadow-pages guest memory (PVM),
//! KVM dropping its mapping of every page the guest touched (about 10 ms
//! for 1.4 GiB even on 2 MiB pages).
//!
//! [`Prearm::start`] does that work while the guest still runs: it
//! write-protects all of RAM and a tracker thread releases every block the
//! guest (or a device) then writes to, at once, remembering which. In the
//! pause, [`Prearm::rearm`] protects again only what was released: the
//! granules the guest wrote between the arm and the pause. Every other
//! granule has stayed protected, so unchanged, since the arm. Either way,
//! when the guest resumes all of RAM is protected and holds its content
//! as of the pause, and the copy proceeds as before.
//!
//! The guest pays a write-protect fault per block it writes before the
//! pause (released at once, no copy), and the caller waits for the arm
//! before the pause starts. The arm goes a chunk at a time: KVM holds back
//! the guest's faults in a range while the range's protection changes.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::live::{
    disarm, release_outside, validate, validate_granule, wait_for_fault, Error, Region,
};
use crate::memory::uffd::{Uffd, WpFault};

/// Bytes write-protected per call of the arm (a multiple of any granule).
const ARM_CHUNK: u64 = 32 << 20;

/// What the pre-arm did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrearmReport {
    /// The arm of all of RAM, before the pause.
    pub armed: Duration,
    /// Write-protect faults released before the pause.
    pub faults: u64,
    /// Granules protected again in the pause.
    pub rearmed_granules: u64,
    /// That re-arm.
    pub rearm: Duration,
}

struct Shared {
    uffd: Arc<Uffd>,
    regions: Vec<Region>,
    granule: u64,
    /// Bytes released around a fault: an aligned block of at least a
    /// granule, so a writer with locality faults once per block.
    block: u64,
    /// Per region, one bit per granule released since the arm.
    released: Vec<Vec<AtomicU64>>,
    stop: AtomicBool,
    /// eventfd that wakes the tracker from poll.
    wake: OwnedFd,
    error: Mutex<Option<Error>>,
    faults: AtomicU64,
}

impl Shared {
    /// Remembers the block around `addr` as released, then releases it.
    fn release(&self, addr: u64) -> Result<(), Error> {
        let Some((i, r)) = self
            .regions
            .iter()
            .enumerate()
            .find(|(_, r)| addr >= r.host_addr && addr < r.host_addr + r.len)
        else {
            return release_outside(&self.uffd, self.granule, addr);
        };
        let off = (addr - r.host_addr) & !(self.block - 1);
        let len = self.block.min(r.len - off);
        let (g0, g1) = (off / self.granule, (off + len) / self.granule);
        for g in g0..g1 {
            self.released[i][(g / 64) as usize].fetch_or(1 << (g % 64), Ordering::AcqRel);
        }
        self.uffd.write_protect(r.host_addr + off, len, false)?;
        self.faults.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Releases every queued fault; returns how many there were.
    fn drain(&self, batch: &mut [WpFault]) -> Result<usize, Error> {
        let n = self.uffd.read_events(batch)?;
        for f in &batch[..n] {
            self.release(f.addr)?;
        }
        Ok(n)
    }

    fn signal(&self) {
        let one = 1u64;
        // SAFETY: writes 8 bytes from a live u64 to our eventfd.
        let _ = unsafe {
            libc::write(
                std::os::fd::AsRawFd::as_raw_fd(&self.wake),
                (&one as *const u64).cast(),
                8,
            )
        };
    }
}

/// All of RAM write-protected ahead of the pause, with a thread releasing
/// what the guest writes meanwhile. Dropped without [`Prearm::rearm`], it
/// stops the thread and releases everything.
pub struct Prearm {
    shared: Arc<Shared>,
    tracker: Option<JoinHandle<()>>,
    armed: Duration,
    /// Set once `rearm` has handed the protection on.
    done: bool,
}

impl Prearm {
    /// Write-protects every region (registered with `uffd`, `granule_bytes`
    /// the write-protect granule as for [`crate::branch::live::LiveCopyOptions`])
    /// while the guest runs, and from then on releases at once every aligned
    /// block of `block_bytes` (at least a granule) the guest writes to,
    /// remembering it. On failure nothing is left protected.
    pub fn start(
        uffd: Arc<Uffd>,
        regions: &[Region],
        granule_bytes: usize,
        block_bytes: usize,
    ) -> Result<Prearm, Error> {
        validate(regions)?;
        validate_granule(regions, granule_bytes)?;
        let granule = granule_bytes as u64;
        let block = (block_bytes as u64).next_power_of_two().max(granule);
        // SAFETY: eventfd takes only flags; the result is checked.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if efd < 0 {
            return Err(Error::Spawn(io::Error::last_os_error()));
        }
        let shared = Arc::new(Shared {
            uffd,
            regions: regions.to_vec(),
            granule,
            block,
            released: regions
                .iter()
                .map(|r| {
                    (0..(r.len / granule).div_ceil(64))
                        .map(|_| AtomicU64::new(0))
                        .collect()
                })
                .collect(),
            stop: AtomicBool::new(false),
            // SAFETY: a new descriptor that nothing else owns.
            wake: unsafe { OwnedFd::from_raw_fd(efd) },
            error: Mutex::new(None),
            faults: AtomicU64::new(0),
        });
        // The tracker runs before the arm: the guest's first write to an
        // armed page must not wait for the rest of the arm.
        let sh = shared.clone();
        let tracker = std::thread::Builder::new()
            .name("live-prearm".into())
            .spawn(move || {
                crate::seccomp::enter_or_exit(crate::seccomp::Kind::Copy);
                super::nice_this_thread(super::FAULT_THREAD_NICE, "live pre-arm tracker");
                let run = || -> Result<(), Error> {
                    let mut batch = [WpFault {
                        addr: 0,
                        write: false,
                        wp: false,
                    }; 64];
                    while !sh.stop.load(Ordering::SeqCst) {
                        if sh.drain(&mut batch)? == 0 {
                            wait_for_fault(&sh.uffd, &sh.wake)?;
                        }
                    }
                    Ok(())
                };
                let failed = match std::panic::catch_unwind(AssertUnwindSafe(run)) {
                    Ok(Ok(())) => None,
                    Ok(Err(e)) => Some(e),
                    Err(_) => Some(Error::Panicked("pre-arm tracker")),
                };
                if let Some(e) = failed {
                    sh.error
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .get_or_insert(e);
                    // Never leave a writer blocked.
                    let _ = disarm(&sh.uffd, &sh.regions);
                }
            })
            .map_err(Error::Spawn)?;
        let mut prearm = Prearm {
            shared,
            tracker: Some(tracker),
            armed: Duration::ZERO,
            done: false,
        };
        let start = Instant::now();
        for r in regions {
            // A chunk at a time: while a write-protect change runs, KVM
            // lets no fault in its range complete (its MMU notifier is in
            // progress), so one call over all of RAM would stall the guest
            // for the whole walk. On failure, drop stops the tracker and
            // releases everything.
            let chunk = ARM_CHUNK.max(granule);
            let mut off = 0;
            while off < r.len {
                let len = chunk.min(r.len - off);
                prearm
                    .shared
                    .uffd
                    .write_protect(r.host_addr + off, len, true)?;
                off += len;
            }
        }
        prearm.armed = start.elapsed();
        Ok(prearm)
    }

    fn stop_tracker(&mut self) -> Result<(), Error> {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.signal();
        if let Some(t) = self.tracker.take() {
            if t.join().is_err() {
                return Err(Error::Panicked("pre-arm tracker"));
            }
        }
        match self
            .shared
            .error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// In the pause (vCPUs stopped, device workers quiesced): stops the
    /// tracker, releases the faults still queued, then write-protects again
    /// every granule released since the arm. Afterwards all of RAM is
    /// protected and holds its content as of now, as after
    /// [`crate::branch::live::arm`]. On failure nothing is left protected.
    pub fn rearm(mut self) -> Result<PrearmReport, Error> {
        let result = self.rearm_inner();
        if result.is_err() {
            let _ = disarm(&self.shared.uffd, &self.shared.regions);
        }
        self.done = true;
        result
    }

    fn rearm_inner(&mut self) -> Result<PrearmReport, Error> {
        self.stop_tracker()?;
        let sh = &self.shared;
        let mut batch = [WpFault {
            addr: 0,
            write: false,
            wp: false,
        }; 64];
        while sh.drain(&mut batch)? > 0 {}
        let start = Instant::now();
        let mut rearmed = 0;
        for (r, bits) in sh.regions.iter().zip(&sh.released) {
            let granules = r.len / sh.granule;
            let is_set =
                |g: u64| bits[(g / 64) as usize].load(Ordering::Acquire) & (1 << (g % 64)) != 0;
            let mut g = 0;
            while g < granules {
                if !is_set(g) {
                    // Skip clear words at once.
                    g = if bits[(g / 64) as usize].load(Ordering::Acquire) == 0 {
                        (g / 64 + 1) * 64
                    } else {
                        g + 1
                    };
                    continue;
                }
                let first = g;
                while g < granules && is_set(g) {
                    g += 1;
                }
                sh.uffd.write_protect(
                    r.host_addr + first * sh.granule,
                    (g - first) * sh.granule,
                    true,
                )?;
                rearmed += g - first;
            }
        }
        Ok(PrearmReport {
            armed: self.armed,
            faults: sh.faults.load(Ordering::Relaxed),
            rearmed_granules: rearmed,
            rearm: start.elapsed(),
        })
    }
}

impl Drop for Prearm {
    fn drop(&mut self) {
        if self.tracker.is_some() {
            let _ = self.stop_tracker();
        }
        if !self.done {
            let _ = disarm(&self.shared.uffd, &self.shared.regions);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::branch::live::{LiveCopy, PAGE_GRANULE};
    use crate::memory::uffd::tests::SharedMem;
    use crate::memory::uffd::PAGE_SIZE;
    use std::fs::File;

    const MIB: u64 = 1 << 20;

    /// Writers that stamp their own sequence into pages chosen at random,
    /// and can be paused between two stores, like vCPUs.
    struct Writers {
        stop: Arc<AtomicBool>,
        pause: Arc<AtomicBool>,
        parked: Arc<AtomicU64>,
        threads: Vec<JoinHandle<()>>,
    }

    impl Writers {
        fn start(n: u64, region: Region) -> Writers {
            let stop = Arc::new(AtomicBool::new(false));
            let pause = Arc::new(AtomicBool::new(false));
            let parked = Arc::new(AtomicU64::new(0));
            let threads = (0..n)
                .map(|t| {
                    let (stop, pause, parked) = (stop.clone(), pause.clone(), parked.clone());
                    std::thread::spawn(move || {
                        let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ (t + 1);
                        let mut seq = 0u64;
                        while !stop.load(Ordering::Relaxed) {
                            if pause.load(Ordering::Acquire) {
                                parked.fetch_add(1, Ordering::AcqRel);
                                while pause.load(Ordering::Acquire) {
                                    std::hint::spin_loop();
                                }
                                parked.fetch_sub(1, Ordering::AcqRel);
                            }
                            x ^= x << 13;
                            x ^= x >> 7;
                            x ^= x << 17;
                            let page = x % (region.len / PAGE_SIZE);
                            seq += 1;
                            let a = region.host_addr + page * PAGE_SIZE + t * 8;
                            // SAFETY: inside the test mapping, which outlives
                            // the writers.
                            unsafe { (a as *mut u64).write_volatile(seq) };
                        }
                    })
                })
                .collect();
            Writers {
                stop,
                pause,
                parked,
                threads,
            }
        }

        fn pause(&self) {
            self.pause.store(true, Ordering::Release);
            while self.parked.load(Ordering::Acquire) < self.threads.len() as u64 {
                std::hint::spin_loop();
            }
        }

        fn resume(&self) {
            self.pause.store(false, Ordering::Release);
        }

        fn stop(self) {
            self.stop.store(true, Ordering::Relaxed);
            self.resume();
            for t in self.threads {
                t.join().unwrap();
            }
        }
    }

    /// Arm ahead while writers run, pause them, re-arm, resume, copy: the
    /// file holds memory as it was at the pause, writers touched between
    /// the arm and the pause included.
    #[test]
    fn a_prearm_then_rearm_copies_memory_as_of_the_pause() {
        let uffd = Arc::new(Uffd::new().unwrap());
        let dir = std::env::temp_dir().join(format!("prearm-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for round in 0..4u64 {
            let mem = SharedMem::new(64 * MIB);
            let region = Region {
                host_addr: mem.addr,
                len: mem.len,
                file_offset: 0,
            };
            uffd.register_wp(region.host_addr, region.len).unwrap();
            for p in 0..region.len / PAGE_SIZE {
                // SAFETY: inside the test mapping.
                unsafe { ((region.host_addr + p * PAGE_SIZE) as *mut u64).write_volatile(p + 1) };
            }
            let writers = Writers::start(2, region);
            let prearm = Prearm::start(
                uffd.clone(),
                &[region],
                PAGE_GRANULE,
                [4096, 256 << 10][round as usize % 2],
            )
            .unwrap();
            std::thread::sleep(Duration::from_millis(20 + 10 * round));
            writers.pause();
            let report = prearm.rearm().unwrap();
            // SAFETY: the writers are parked and the memory protected.
            let expected = unsafe {
                std::slice::from_raw_parts(region.host_addr as *const u8, region.len as usize)
            }
            .to_vec();
            writers.resume();
            let path = dir.join(format!("memory{round}"));
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)
                .unwrap();
            file.set_len(region.len).unwrap();
            // SAFETY: `mem` outlives the copy (waited for below).
            let copy = unsafe { LiveCopy::start(uffd.clone(), &[region], file) };
            let copied = copy.and_then(LiveCopy::wait);
            writers.stop();
            let copied = copied.unwrap();
            let got = std::fs::read(&path).unwrap();
            let at = got
                .chunks(4096)
                .zip(expected.chunks(4096))
                .position(|(a, b)| a != b);
            assert_eq!(at, None, "round {round}: {report:?} {copied:?}");
            assert!(report.faults > 0, "the writers never hit the pre-arm");
            assert!(report.rearmed_granules > 0, "{report:?}");
            eprintln!("round {round}: {report:?}, copy faults {}", copied.faults);
            uffd.unregister(region.host_addr, region.len).unwrap();
            drop(File::open(&path));
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Dropped without a re-arm (a pause that failed), nothing stays
    /// protected.
    #[test]
    fn a_dropped_prearm_releases_everything() {
        let uffd = Arc::new(Uffd::new().unwrap());
        let mem = SharedMem::new(8 * MIB);
        let region = Region {
            host_addr: mem.addr,
            len: mem.len,
            file_offset: 0,
        };
        uffd.register_wp(region.host_addr, region.len).unwrap();
        let prearm = Prearm::start(uffd.clone(), &[region], PAGE_GRANULE, 4096).unwrap();
        drop(prearm);
        let writer = std::thread::spawn(move || {
            for p in (0..region.len).step_by(PAGE_SIZE as usize) {
                // SAFETY: inside the test mapping, which outlives the
                // thread (joined below, or the test fails first).
                unsafe { ((region.host_addr + p) as *mut u8).write_volatile(1) };
            }
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        while !writer.is_finished() {
            assert!(Instant::now() < deadline, "a page stayed write-protected");
            std::thread::sleep(Duration::from_millis(5));
        }
        writer.join().unwrap();
    }
}
