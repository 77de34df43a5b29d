//! BRANCH's three modes behind one entry, [`Machine::snapshot`]: the pause,
//! what is captured inside it, and what happens after it.
//!
//! - **full**: every page of RAM written in the pause.
//! - **diff**: only the pages written since the base snapshot (KVM's dirty
//!   log and the VMM's own writes), stacked on that base.
//! - **live**: the pause holds CPU, device and disk state only. A caller
//!   that waits gets a pre-copy ([`super::precopy`]); one that does not gets
//!   a write-protected copy ([`super::live`]) armed before the pause
//!   ([`super::prearm`]) and finished in the background.
//!
//! Every mode freezes the writable drives' copy-on-write layers in the
//! pause, and makes the new snapshot the base of the next diff.

use std::path::Path;
use std::sync::{Arc, Mutex};

use proto::control::{DiffCost, SnapshotMode};

use super::live::{self, LiveCopy, LiveCopyOptions, Region, ReleaseHook};
use super::prearm::Prearm;
use super::precopy::{self, Ending, Precopy, PrecopyOptions, Residue};
use crate::devices::persist::Persist;
use crate::kvm::state;
use crate::machine::{Error, Machine};
use crate::memory::uffd;
use crate::memory::{Backend, HUGE_PAGE};
use crate::snapshot::{
    self, DeviceStates, DriveCapture, LiveCopyStats, MemoryCapture, ParentRef, SnapshotMeta,
    SnapshotNet, VmState,
};

/// What a write-protect fault before the pause releases: the aligned
/// block around it (a writer with locality faults once per block; the
/// pause re-protects whole blocks).
const PREARM_BLOCK: usize = 256 << 10;

/// A snapshot written, and how long the VM was paused for it.
#[derive(Debug)]
pub struct Snapshotted {
    /// Its metadata.
    pub meta: SnapshotMeta,
    /// From the pause request to the VM running again (`None` when it was
    /// paused before or was left paused).
    pub pause: Option<std::time::Duration>,
    /// What the diff cost: a diff's own, or the one a full snapshot
    /// measured when asked.
    pub diff: Option<DiffCost>,
}

/// What the pause window produced: the snapshot's files (not yet
/// committed), a live copy still to run, a pre-copy's residue, and the
/// diff's cost.
struct Captured {
    pending: snapshot::Pending,
    copy: Option<LiveCopy>,
    residue: Option<Residue>,
    diff: Option<DiffCost>,
}

/// How a pre-copy ended.
enum PrecopyOutcome {
    /// The snapshot is made.
    Done(Box<Snapshotted>),
    /// The rounds did not converge; nothing was written and the VM never
    /// paused. The pages each round copied, for the record.
    Abandoned { rounds: Vec<u64> },
}

impl Machine {
    /// Writes a snapshot of the machine to `dir` (which must not exist):
    /// pauses it if it is running, captures every vCPU (on its own thread),
    /// the VM's interrupt controllers and clock, the devices and RAM, and
    /// then returns it to running unless `leave_paused`. With
    /// `measure_diff` (full only), the pause also writes the diff a diff
    /// snapshot would have written, and drops it, to report its cost.
    pub fn snapshot(
        &self,
        dir: &Path,
        leave_paused: bool,
        mode: SnapshotMode,
        wait: bool,
        measure_diff: bool,
    ) -> Result<Snapshotted, Error> {
        if measure_diff && mode != SnapshotMode::Full {
            return Err(Error::MeasureNotFull);
        }
        let has_base = self
            .base
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some();
        if mode == SnapshotMode::Diff && !has_base {
            return Err(Error::NoBase);
        }
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        if live.as_ref().is_some_and(|t| !t.is_finished()) {
            return Err(Error::LiveInFlight);
        }
        if mode == SnapshotMode::Live && self.uffd.is_none() {
            return Err(Error::LiveNeedsMemfd);
        }
        // A caller that waits gets the snapshot as of a pause inside its
        // request either way: pre-copy makes that pause short and spares
        // the guest write-protect faults.
        let mut precopy_rounds = Vec::new();
        if mode == SnapshotMode::Live && wait && self.vm.manual_dirty_log() {
            match self.snapshot_precopy(dir, leave_paused)? {
                PrecopyOutcome::Done(s) => return Ok(*s),
                // The guest dirties memory as fast as it is copied: the
                // write-protected copy below, armed before the pause.
                PrecopyOutcome::Abandoned { rounds } => precopy_rounds = rounds,
            }
        }
        // A write-protected copy is armed before the pause, the guest
        // running; the pause re-protects what the guest wrote meanwhile.
        let prearm = match (mode, &self.uffd) {
            (SnapshotMode::Live, Some(uffd)) => Some(Prearm::start(
                uffd.clone(),
                &self.live_regions(),
                self.live_granule(),
                PREARM_BLOCK,
            )?),
            _ => None,
        };
        let was_running = !self.control.is_paused();
        let start = std::time::Instant::now();
        if was_running {
            self.pause()?;
        }
        let captured = self.capture(dir, mode, None, prearm, measure_diff);
        if was_running && !leave_paused {
            self.resume()?;
        }
        let pause = (was_running && !leave_paused).then(|| start.elapsed());
        let Captured {
            pending,
            copy,
            diff,
            ..
        } = captured?;
        // The VM runs again: the copy threads of the next live branch take
        // their filters now (this one's took those started ahead), then
        // the snapshot is made durable and visible.
        if self.uffd.is_some() {
            if let Err(e) = crate::seccomp::top_up(
                crate::seccomp::Kind::Copy,
                crate::seccomp::COPY_THREADS_IN_PAUSE,
            ) {
                tracing::warn!("cannot start the next live branch's copy threads ahead: {e}");
            }
        }
        let dir = std::path::absolute(dir).unwrap_or_else(|_| dir.to_owned());
        let committed = pending.commit();
        let meta = match (committed, copy) {
            (Ok(meta), None) => meta,
            (Ok(meta), Some(copy)) => {
                // The copy finishes in the background; the snapshot says
                // `writing` until then.
                let finisher = {
                    let (dir, base) = (dir.clone(), self.base_handle());
                    std::thread::Builder::new()
                        .name("live-copy".into())
                        .spawn(move || {
                            crate::seccomp::enter_or_exit(crate::seccomp::Kind::Copy);
                            finish_live_copy(&dir, copy, &base, precopy_rounds)
                        })
                        .map_err(|e| {
                            Error::Disk(format!("cannot start the live copy's thread: {e}"))
                        })?
                };
                if !wait {
                    *live = Some(finisher);
                    return Ok(Snapshotted { meta, pause, diff });
                }
                finisher
                    .join()
                    .map_err(|_| Error::Disk("the live copy's thread panicked".into()))??;
                snapshot::read_meta(&dir)?
            }
            (Err(e), _) => {
                self.forget_base();
                return Err(e.into());
            }
        };
        Ok(Snapshotted { meta, pause, diff })
    }

    /// A live snapshot for a caller that waits: RAM is copied while the
    /// guest runs, round after round of the pages it dirtied, then the
    /// pause holds CPU, device and disk state and the pages written since
    /// the last round (see [`crate::branch::precopy`]). The snapshot is the
    /// VM as it was in that pause, which lies inside the request; its
    /// directory appears complete and `ready`, or not at all. Abandoned
    /// (nothing written, no pause) when the rounds do not converge.
    fn snapshot_precopy(&self, dir: &Path, leave_paused: bool) -> Result<PrecopyOutcome, Error> {
        let started = std::time::Instant::now();
        // The rounds consume KVM's dirty log: until this snapshot is
        // written there is no base a diff could stack on.
        self.forget_base();
        let staged = snapshot::stage(dir, self.ram.memory())?;
        let mut precopy = Precopy::new(
            &self.vm,
            &self.ram,
            staged.memory_file()?,
            PrecopyOptions::from_env(),
        )?;
        precopy::niced("live-precopy", || precopy.run())?;
        if !precopy.converged() {
            // Dropping the staged snapshot removes it.
            return Ok(PrecopyOutcome::Abandoned {
                rounds: precopy.rounds().to_vec(),
            });
        }
        let was_running = !self.control.is_paused();
        let start = std::time::Instant::now();
        if was_running {
            self.pause()?;
        }
        let captured = self.capture(
            dir,
            SnapshotMode::Live,
            Some((&mut precopy, staged)),
            None,
            false,
        );
        if was_running && !leave_paused {
            self.resume()?;
        }
        let pause = (was_running && !leave_paused).then(|| start.elapsed());
        let Captured {
            mut pending,
            copy,
            residue,
            ..
        } = captured?;
        let sealed = precopy::niced("live-precopy", || {
            let mut stats = LiveCopyStats {
                method: Some("precopy".into()),
                ..LiveCopyStats::default()
            };
            let report = match (residue, copy) {
                (Some(residue), _) => precopy.finish(residue)?,
                (None, Some(copy)) => {
                    let copied = copy.wait()?;
                    stats.faults = copied.faults;
                    stats.max_fault_stall_us = copied.max_fault_stall.as_micros() as u64;
                    stats.takeovers = copied.takeovers;
                    stats.residue_write_protected = true;
                    precopy.report()
                }
                (None, None) => unreachable!("a pre-copy ends with a residue or a copy"),
            };
            stats.precopy_round_pages = report.round_pages;
            stats.residue_pages = Some(report.residue_pages);
            pending.seal_memory(started, stats)?;
            Ok::<_, Error>(())
        });
        if let Err(e) = sealed {
            pending.discard();
            return Err(e);
        }
        let meta = pending.commit()?;
        *self.base.lock().unwrap_or_else(|e| e.into_inner()) = Some(ParentRef {
            dir: std::path::absolute(dir).unwrap_or_else(|_| dir.to_owned()),
            memory_hash: meta.memory_hash.clone(),
        });
        Ok(PrecopyOutcome::Done(Box::new(Snapshotted {
            meta,
            pause,
            diff: None,
        })))
    }

    fn base_handle(&self) -> Arc<Mutex<Option<ParentRef>>> {
        self.base.clone()
    }

    fn forget_base(&self) {
        *self.base.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// The pause-window part of a snapshot: CPU, device and disk state, and
    /// memory as `mode` says. For live: with `precopy` (the pre-copy and
    /// the snapshot it fills), the residue copied to memory; without, the
    /// write-protect arm (the re-arm of `prearm`, when given), with the
    /// copy returned started. `measure_diff`: see [`Machine::snapshot`].
    fn capture(
        &self,
        dir: &Path,
        mode: SnapshotMode,
        precopy: Option<(&mut Precopy<'_>, snapshot::Staged)>,
        prearm: Option<Prearm>,
        measure_diff: bool,
    ) -> Result<Captured, Error> {
        // Device workers stand still too: they write guest memory.
        let _quiet = self.virtio.quiesce();
        let kvm = self.kvm.clone();
        let vcpus = self
            .control
            .on_paused_vcpus(usize::from(self.num_vcpus), move |id, fd| {
                state::save_vcpu(fd, id, state::saveable_msrs(&kvm, fd))
            })?
            .into_iter()
            .collect::<Result<Vec<_>, _>>()?;
        // What changed since the last snapshot: guest writes (KVM's dirty log)
        // and the VMM's own (devices). Reading both clears them, so until
        // this snapshot is written there is no base to diff against.
        let parent = self.base.lock().unwrap_or_else(|e| e.into_inner()).take();
        // A write-protected live copy resets KVM's log page by page, each
        // page just before its first release, out of the pause (see
        // `live_copy_options`); a pre-copy reads and resets it itself.
        let wp_live = mode == SnapshotMode::Live && precopy.is_none();
        let guest_dirty = if (wp_live && self.vm.manual_dirty_log()) || precopy.is_some() {
            Vec::new()
        } else {
            self.vm
                .take_dirty_log(&self.ram)
                .map_err(|e| Error::DirtyLog(e.to_string()))?
        };
        let vmm_dirty = self.ram.take_vmm_dirty();
        let guest_dirty = if guest_dirty.is_empty() {
            vmm_dirty.iter().map(|v| vec![0; v.len()]).collect()
        } else {
            guest_dirty
        };
        let dirty: Vec<Vec<u64>> = guest_dirty
            .into_iter()
            .zip(vmm_dirty)
            .map(|(g, v)| {
                g.iter()
                    .zip(v.iter().chain(std::iter::repeat(&0)))
                    .map(|(a, b)| a | b)
                    .collect()
            })
            .collect();
        let drives = self.capture_drives()?;
        let state = VmState {
            mem_mib: self.ram.size() >> 20,
            guest: self.guest,
            vcpus,
            vm: state::save_vm(self.vm.fd(), self.guest.needs_pit())?,
            devices: DeviceStates {
                serial: self.serial.lock().unwrap_or_else(|e| e.into_inner()).save(),
                i8042: self.i8042.lock().unwrap_or_else(|e| e.into_inner()).save(),
                virtio: self.virtio.save(),
            },
        };
        let (memory, precopy) = match (mode, precopy) {
            (SnapshotMode::Live, Some((precopy, staged))) => {
                (MemoryCapture::Staged(staged), Some(precopy))
            }
            (SnapshotMode::Full, _) => (MemoryCapture::Full, None),
            (SnapshotMode::Live, None) => (MemoryCapture::Live, None),
            (SnapshotMode::Diff, _) => (
                MemoryCapture::Diff {
                    parent: parent.as_ref().ok_or(Error::NoBase)?,
                    dirty: &dirty,
                },
                None,
            ),
        };
        let nets: Vec<SnapshotNet> = self
            .virtio
            .nets()
            .iter()
            .map(|(tap, mac)| SnapshotNet::new(tap, mac))
            .collect();
        // What a diff of these pages costs: measured apart, before the
        // full snapshot, when asked.
        let measured = if measure_diff {
            Some(snapshot::measure_diff(dir, self.ram.memory(), &dirty)?)
        } else {
            None
        };
        let is_diff = matches!(memory, MemoryCapture::Diff { .. });
        let writing = std::time::Instant::now();
        let mut pending =
            snapshot::prepare(dir, self.ram.memory(), &state, &drives, &nets, memory)?;
        let diff = if is_diff {
            let written = writing.elapsed().as_micros() as u64;
            match pending.diff_cost(written) {
                Ok(cost) => Some(cost),
                Err(e) => {
                    pending.discard();
                    return Err(e.into());
                }
            }
        } else {
            measured
        };
        if let Some(precopy) = precopy {
            // The pages dirtied since the last round: copied here, or, too
            // many for the pause, write-protected and copied after it. The
            // caller finishes the file and sets the base once it is complete.
            let ended = (|| match precopy.end_in_pause(&dirty)? {
                Ending::Copied(residue) => Ok((None, Some(residue))),
                Ending::Protect(only) => {
                    let uffd = self.uffd.as_ref().ok_or(Error::LiveNeedsMemfd)?;
                    let file = pending
                        .take_memory_file()
                        .expect("a staged snapshot has a memory file");
                    let regions = self.live_regions();
                    let mut options = self.live_copy_options()?;
                    live::arm_pages(uffd, &regions, options.granule_bytes, &only)?;
                    options.only = Some(only);
                    // SAFETY: as for the write-protected copy below.
                    let copy =
                        unsafe { LiveCopy::start_with(uffd.clone(), &regions, file, options) }?;
                    Ok((Some(copy), None))
                }
            })();
            return match ended {
                Ok((copy, residue)) => Ok(Captured {
                    pending,
                    copy,
                    residue,
                    diff,
                }),
                Err(e) => {
                    pending.discard();
                    Err(e)
                }
            };
        }
        let copy = match (mode, &self.uffd) {
            (SnapshotMode::Live, Some(uffd)) => {
                let file = pending
                    .take_memory_file()
                    .expect("a live snapshot has a memory file");
                let regions = self.live_regions();
                let options = self.live_copy_options()?;
                match prearm {
                    Some(prearm) => {
                        prearm.rearm()?;
                    }
                    None => {
                        live::arm(uffd, &regions)?;
                    }
                }
                // SAFETY: the regions are this machine's guest RAM mappings,
                // registered with `uffd`; the RAM outlives the copy because
                // the machine joins the copy's thread before it drops (see Drop).
                Some(unsafe { LiveCopy::start_with(uffd.clone(), &regions, file, options) }?)
            }
            _ => None,
        };
        // The new snapshot is the base of the next diff (for a live one, only
        // once its copy succeeds: see finish_live_copy).
        *self.base.lock().unwrap_or_else(|e| e.into_inner()) = Some(ParentRef {
            dir: std::path::absolute(dir).unwrap_or_else(|_| dir.to_owned()),
            memory_hash: pending.meta().memory_hash.clone(),
        });
        Ok(Captured {
            pending,
            copy,
            residue: None,
            diff,
        })
    }

    /// The write-protect granule of this machine's RAM: hugetlbfs
    /// write-protects whole huge pages only.
    fn live_granule(&self) -> usize {
        if *self.ram.backend() == Backend::HugeMemfd {
            HUGE_PAGE as usize
        } else {
            LiveCopyOptions::default().granule_bytes
        }
    }

    /// How this machine's write-protected live copy runs: from the memfd,
    /// in huge-page granules on hugetlbfs, and, with manual dirty-log
    /// protection, resetting KVM's log of each page just before its first
    /// release. No write reaches a page before its release, so the log
    /// then holds exactly the writes after the arm (the next diff's pages)
    /// and the pause never pays for the reset.
    fn live_copy_options(&self) -> Result<LiveCopyOptions, Error> {
        let before_release = if self.vm.manual_dirty_log() {
            let clearer = self
                .vm
                .dirty_log_clearer()
                .map_err(|e| Error::DirtyLog(e.to_string()))?;
            let slot_pages: Vec<u64> = self
                .ram
                .slots()
                .iter()
                .map(|&(_, _, len)| len / uffd::PAGE_SIZE)
                .collect();
            Some(ReleaseHook(Arc::new(move |region, first, count| {
                clearer
                    .clear_pages(region as u32, slot_pages[region], first, count)
                    .map_err(|e| e.to_string())
            })))
        } else {
            None
        };
        Ok(LiveCopyOptions {
            source: self.ram.file().and_then(|f| f.try_clone().ok()),
            granule_bytes: self.live_granule(),
            before_release,
            ..LiveCopyOptions::default()
        })
    }

    /// Guest RAM as the live copy sees it: each region with its offset in
    /// the memory file (and the memfd).
    fn live_regions(&self) -> Vec<Region> {
        Region::back_to_back(&self.ram.slots())
    }

    /// Freezes every writable drive's layer (the VM continues on a fresh
    /// layer beside it, named after the time of the freeze) and describes
    /// read-only drives as they are.
    fn capture_drives(&self) -> Result<Vec<DriveCapture>, Error> {
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        self.virtio
            .drives()
            .iter()
            .map(|drive| {
                let mut drive = drive.lock().unwrap_or_else(|e| e.into_inner());
                let cfg = drive.disk().config();
                match (&cfg.cow, cfg.read_only) {
                    (Some(top), false) => {
                        let next = top.with_extension(format!("{stamp}.layer"));
                        drive
                            .freeze_layer(&next)
                            .map(DriveCapture::Frozen)
                            .map_err(|e| Error::Disk(e.to_string()))
                    }
                    _ if cfg.read_only => Ok(DriveCapture::ReadOnly(cfg)),
                    _ => Err(Error::Disk(
                        "a writable drive without a copy-on-write layer writes its base image \
                         in place and cannot be snapshotted: give it --cow-layer"
                            .into(),
                    )),
                }
            })
            .collect()
    }
}

/// Waits for a live copy, then marks the snapshot `ready` (with its content
/// hash, which becomes the base's) or `failed` (and forgets the base: the
/// next diff must stack on a snapshot that exists). `precopy_rounds`: the
/// rounds of a pre-copy abandoned for this copy, recorded in the stats.
fn finish_live_copy(
    dir: &Path,
    copy: LiveCopy,
    base: &Mutex<Option<ParentRef>>,
    precopy_rounds: Vec<u64>,
) -> Result<SnapshotMeta, Error> {
    let copied = copy
        .wait()
        .map(|r| LiveCopyStats {
            faults: r.faults,
            max_fault_stall_us: r.max_fault_stall.as_micros() as u64,
            takeovers: r.takeovers,
            duration_ms: r.duration.as_millis() as u64,
            method: Some("write_protect".into()),
            precopy_round_pages: precopy_rounds,
            ..LiveCopyStats::default()
        })
        .map_err(|e| e.to_string());
    let finished = snapshot::finish_live(dir, copied);
    let mut base = base.lock().unwrap_or_else(|e| e.into_inner());
    match &finished {
        Ok(meta) => {
            if let Some(b) = base.as_mut().filter(|b| b.dir == dir) {
                b.memory_hash = meta.memory_hash.clone();
            }
        }
        Err(_) => {
            if base.as_ref().is_some_and(|b| b.dir == dir) {
                *base = None;
            }
        }
    }
    Ok(finished?)
}
