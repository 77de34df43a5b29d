//! The engine: a live copy's threads, their start, progress and end.

use std::fs::File;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::memory::uffd::{Uffd, PAGE_SIZE};

use super::*;

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
        // Inside the pause: threads started ahead with their filter
        // (`seccomp::top_up`), when there are.
        use crate::seccomp::{spawn, Kind};
        copy.handler = Some(
            spawn(Kind::Copy, "live-wp-faults".into(), move || {
                crate::branch::nice_this_thread(
                    crate::branch::FAULT_THREAD_NICE,
                    "live write-protect faults",
                );
                match std::panic::catch_unwind(AssertUnwindSafe(|| handle_faults(&sh, block_pages)))
                {
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
            spawn(Kind::Copy, "live-bulk-copy".into(), move || {
                if nice_bulk {
                    crate::branch::nice_this_thread(
                        crate::branch::COPY_THREAD_NICE,
                        "live bulk copy",
                    );
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
        if let Err(e) = sh.release_rest().and_then(|()| sh.wake_late_faults()) {
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
