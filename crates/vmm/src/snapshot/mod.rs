//! Snapshots: a paused machine written to a directory, and read back for
//! restore.
//!
//! ```text
//! <dir>/vmstate        vCPU, VM and device state (see [`format`])
//! <dir>/memory         guest RAM, regions back to back, sparse where zero
//! <dir>/snapshot.json  metadata (see [`SnapshotMeta`]), written last
//! ```
//!
//! `snapshot.json`'s schema is a contract between processes and lives in
//! [`proto::snapshot`]; it is re-exported here.
//!
//! A snapshot is written into a temporary sibling directory and renamed into
//! place only when complete and synced, so a crash never leaves a directory
//! that looks like a snapshot. [`compact`] flattens a snapshot and the chain
//! it stands on into a self-contained full one, written the same way. A
//! diff snapshot's flat memory is assembled once, on first use
//! ([`ensure_memory`], in `assemble`).

mod assemble;
mod compact;
pub mod format;

pub use assemble::ensure_memory;
pub use compact::compact;
pub use proto::snapshot::{
    GuestKind, LiveCopyStats, ParentRef, SnapshotDisk, SnapshotKind, SnapshotMeta, SnapshotNet,
    SnapshotStatus, DIFF_FILE, DIFF_MAP_FILE, MEMORY_FILE, META_FILE, META_VERSION, VMSTATE_FILE,
};

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::devices::i8042::I8042State;
use crate::devices::serial::SerialConsoleState;
use crate::devices::virtio::block::{DiskConfig, Frozen};
use crate::devices::virtio::manager::{AttachedState, DeviceState};
use crate::devices::virtio::net::{self, format_mac, parse_mac};
use crate::kvm::state::{VcpuState, VmKvmState};
use crate::memory::{data_extents, GuestMemoryMmap};

const PAGE: usize = 4096;
/// Longest run of pages written in one call.
const MAX_RUN: usize = 8 << 20;

/// State of the devices.
#[derive(Debug, Serialize, Deserialize)]
pub struct DeviceStates {
    /// COM1.
    pub serial: SerialConsoleState,
    /// The i8042.
    pub i8042: I8042State,
    /// The virtio devices, in attachment order.
    pub virtio: Vec<AttachedState>,
}

impl DiskConfig {
    /// The stack a child of the snapshot in `dir` opens for drive `disk`,
    /// writing into its own `cow` layer (none for a read-only drive).
    pub fn for_child(disk: &SnapshotDisk, dir: &Path, cow: PathBuf) -> DiskConfig {
        DiskConfig {
            base: disk.base.clone(),
            size: disk.size,
            frozen: disk.layers.iter().map(|l| dir.join(l)).collect(),
            cow: (!disk.read_only).then_some(cow),
            read_only: disk.read_only,
        }
    }
}

/// Everything in `vmstate`.
#[derive(Debug, Serialize, Deserialize)]
pub struct VmState {
    /// Guest RAM in MiB.
    pub mem_mib: u64,
    /// The guest.
    pub guest: GuestKind,
    /// Every vCPU, in index order.
    pub vcpus: Vec<VcpuState>,
    /// Interrupt controllers and clock.
    pub vm: VmKvmState,
    /// Devices.
    pub devices: DeviceStates,
}

/// Errors writing or reading a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// File system error.
    #[error("snapshot {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Destination exists.
    #[error("snapshot directory {0} already exists: choose another or delete it first")]
    Exists(PathBuf),
    /// Bad vmstate.
    #[error("snapshot {path}: {source}")]
    Format {
        /// The snapshot directory.
        path: PathBuf,
        /// What is wrong with its vmstate.
        source: format::FormatError,
    },
    /// Bad metadata.
    #[error("snapshot {path}: snapshot.json is invalid ({reason}): the snapshot is corrupt or from another version")]
    Meta {
        /// The snapshot directory.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// Not restorable.
    #[error("snapshot {path} is {status:?}, not ready: it cannot be restored")]
    NotReady {
        /// The snapshot directory.
        path: PathBuf,
        /// Its status.
        status: SnapshotStatus,
    },
    /// vmstate and metadata disagree.
    #[error("snapshot {path}: {reason}: the snapshot is corrupt")]
    Inconsistent {
        /// The snapshot directory.
        path: PathBuf,
        /// What disagrees.
        reason: String,
    },
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_owned(),
        source,
    }
}

/// What a snapshot keeps of one drive: the freeze that made its current
/// layer read-only (writable drives), or its unchanged stack (read-only ones).
pub enum DriveCapture {
    /// The drive's top layer was frozen; it goes into the snapshot.
    Frozen(Frozen),
    /// A read-only drive, as configured.
    ReadOnly(DiskConfig),
}

/// What a snapshot keeps of guest RAM.
pub enum MemoryCapture<'a> {
    /// All of it.
    Full,
    /// The pages set in `dirty` (one bitmap per region, bit i = page i),
    /// over `parent`.
    Diff {
        /// The snapshot the pages stack on.
        parent: &'a ParentRef,
        /// Changed pages per region.
        dirty: &'a [Vec<u64>],
    },
    /// Nothing yet: an empty `memory` file of the right size that a live
    /// copy fills after the VM resumes; the snapshot is `writing` until
    /// [`finish_live`] marks it `ready` or `failed`.
    Live,
    /// A memory file made by [`stage`] before the pause, which a live
    /// pre-copy fills; its caller finishes it and calls
    /// [`Pending::seal_memory`] before [`Pending::commit`], so the
    /// snapshot appears only complete, `ready`.
    Staged(Staged),
}

/// A snapshot started before its pause: the temporary directory and an
/// empty `memory` file sized to guest RAM (holes everywhere), for a live
/// pre-copy to fill while the VM runs. [`prepare`] with
/// [`MemoryCapture::Staged`] adds the rest in the pause; dropped unused,
/// it removes its directory.
pub struct Staged {
    tmp: PathBuf,
    memory: Option<File>,
}

impl Staged {
    /// The memory file, open for reading and writing (a new descriptor).
    pub fn memory_file(&self) -> Result<File, Error> {
        let path = self.tmp.join(MEMORY_FILE);
        self.memory
            .as_ref()
            .expect("a staged snapshot has its memory file")
            .try_clone()
            .map_err(io_err(&path))
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.tmp.as_os_str().is_empty() {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

/// Starts a snapshot for `dir` (which must not exist) before the pause:
/// see [`Staged`].
pub fn stage(dir: &Path, mem: &GuestMemoryMmap) -> Result<Staged, Error> {
    let tmp = temp_dir_beside(dir)?;
    let mut staged = Staged { tmp, memory: None };
    let path = staged.tmp.join(MEMORY_FILE);
    let total: u64 = mem.iter().map(|r| r.len()).sum();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(io_err(&path))?;
    f.set_len(total).map_err(io_err(&path))?;
    staged.memory = Some(f);
    Ok(staged)
}

/// The page list of a diff snapshot, over all of RAM (regions back to
/// back), one bit per 4 KiB page.
#[derive(Debug, Serialize, Deserialize)]
pub struct DiffMap {
    /// Pages covered.
    pub pages: u64,
    /// The bits, 64 pages a word.
    pub bits: Vec<u64>,
}

/// A snapshot whose files are written (to the page cache) but neither
/// synced nor in place yet: what the pause window produces. [`Pending::commit`]
/// makes it durable and visible, after the VM is running again.
pub struct Pending {
    tmp: PathBuf,
    dir: PathBuf,
    meta: SnapshotMeta,
    memory: Option<File>,
}

impl Pending {
    /// The metadata it will be committed with.
    pub fn meta(&self) -> &SnapshotMeta {
        &self.meta
    }

    /// The `memory` file, open for writing (a live copy's destination).
    pub fn take_memory_file(&mut self) -> Option<File> {
        self.memory.take()
    }

    /// For a snapshot whose memory was staged ([`stage`]) and is now
    /// complete: syncs the memory file, records its data size and content
    /// hash and how the copy went (`duration_ms` from `started` to the file
    /// synced). Call before [`Pending::commit`].
    pub fn seal_memory(
        &mut self,
        started: std::time::Instant,
        mut copied: LiveCopyStats,
    ) -> Result<(), Error> {
        let path = self.tmp.join(MEMORY_FILE);
        let file = File::open(&path).map_err(io_err(&path))?;
        file.sync_all().map_err(io_err(&path))?;
        copied.duration_ms = started.elapsed().as_millis() as u64;
        let (data, hash) = hash_memory_file(&file).map_err(io_err(&path))?;
        self.meta.memory_data_bytes = data;
        self.meta.memory_hash = hash;
        self.meta.live_copy = Some(copied);
        Ok(())
    }

    /// Gives the snapshot up: removes its temporary directory.
    pub fn discard(self) {
        let _ = std::fs::remove_dir_all(&self.tmp);
    }

    /// Syncs every file, writes `snapshot.json` last and renames the
    /// directory into place: a crash before this leaves only a temporary
    /// directory, never one that looks like a snapshot.
    pub fn commit(self) -> Result<SnapshotMeta, Error> {
        let result = (|| {
            for entry in std::fs::read_dir(&self.tmp).map_err(io_err(&self.tmp))? {
                let path = entry.map_err(io_err(&self.tmp))?.path();
                File::open(&path)
                    .and_then(|f| f.sync_all())
                    .map_err(io_err(&path))?;
            }
            write_meta(&self.tmp, &self.meta)?;
            sync_dir(&self.tmp)?;
            std::fs::rename(&self.tmp, &self.dir).map_err(io_err(&self.dir))?;
            // A bare relative name's parent is "": the current directory.
            match self.dir.parent() {
                Some(p) if p.as_os_str().is_empty() => sync_dir(Path::new("."))?,
                Some(p) => sync_dir(p)?,
                None => {}
            }
            Ok(())
        })();
        if result.is_err() {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
        result.map(|()| self.meta)
    }
}

/// Writes a snapshot of a paused machine: memory as `memory` says, the
/// vmstate, and each frozen drive layer hard-linked in (it is never written
/// again, so the running VM and the snapshot share it). Nothing is synced
/// here: this is the part that must happen while the VM is paused; call
/// [`Pending::commit`] once it runs again. `dir` must not exist.
pub fn prepare(
    dir: &Path,
    mem: &GuestMemoryMmap,
    state: &VmState,
    drives: &[DriveCapture],
    nets: &[SnapshotNet],
    memory: MemoryCapture<'_>,
) -> Result<Pending, Error> {
    let tmp = match &memory {
        MemoryCapture::Staged(_) => PathBuf::new(),
        _ => temp_dir_beside(dir)?,
    };
    let (tmp, memory) = match memory {
        // The staged directory is now this snapshot's: its drop no longer
        // removes it (a failure below does).
        MemoryCapture::Staged(mut staged) => {
            let tmp = std::mem::take(&mut staged.tmp);
            (tmp, MemoryCapture::Staged(staged))
        }
        other => (tmp, other),
    };
    match write_into(&tmp, mem, state, drives, nets, memory) {
        Ok((meta, memory)) => Ok(Pending {
            tmp,
            dir: dir.to_owned(),
            meta,
            memory,
        }),
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}

/// Creates the empty temporary directory a snapshot for `dir` is written
/// in (a hidden sibling of `dir`, on the same file system, so the final
/// rename is atomic). `dir` must not exist.
fn temp_dir_beside(dir: &Path) -> Result<PathBuf, Error> {
    if dir.exists() {
        return Err(Error::Exists(dir.to_owned()));
    }
    let name = dir
        .file_name()
        .ok_or_else(|| Error::Io {
            path: dir.to_owned(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a directory name"),
        })?
        .to_string_lossy()
        .into_owned();
    let tmp = dir.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
    Ok(tmp)
}

fn write_into(
    tmp: &Path,
    mem: &GuestMemoryMmap,
    state: &VmState,
    drives: &[DriveCapture],
    nets: &[SnapshotNet],
    memory: MemoryCapture<'_>,
) -> Result<(SnapshotMeta, Option<File>), Error> {
    let disks = drives
        .iter()
        .enumerate()
        .map(|(i, d)| capture_disk(tmp, i, d))
        .collect::<Result<Vec<_>, _>>()?;
    let mut live_file = None;
    let mut status = SnapshotStatus::Ready;
    let (kind, parent, (memory_bytes, memory_data_bytes, memory_hash)) = match memory {
        MemoryCapture::Full => (
            SnapshotKind::Full,
            None,
            write_memory(&tmp.join(MEMORY_FILE), mem)?,
        ),
        MemoryCapture::Live => {
            let path = tmp.join(MEMORY_FILE);
            let total: u64 = mem.iter().map(|r| r.len()).sum();
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)
                .map_err(io_err(&path))?;
            f.set_len(total).map_err(io_err(&path))?;
            live_file = Some(f);
            status = SnapshotStatus::Writing;
            (SnapshotKind::Full, None, (total, 0, String::new()))
        }
        MemoryCapture::Staged(mut staged) => {
            let total: u64 = mem.iter().map(|r| r.len()).sum();
            live_file = staged.memory.take();
            // Complete and hashed before commit (Pending::seal_memory).
            (SnapshotKind::Full, None, (total, 0, String::new()))
        }
        MemoryCapture::Diff { parent, dirty } => {
            let (total, data, diff_hash) = write_diff(tmp, mem, dirty)?;
            // A diff's content is its parent's content plus the changed pages.
            let mut h = blake3::Hasher::new();
            h.update(parent.memory_hash.as_bytes());
            h.update(diff_hash.as_bytes());
            (
                SnapshotKind::Diff,
                Some(parent.clone()),
                (total, data, h.finalize().to_hex().to_string()),
            )
        }
    };

    let vmstate = format::encode(state);
    let vm_path = tmp.join(VMSTATE_FILE);
    let mut f = File::create(&vm_path).map_err(io_err(&vm_path))?;
    f.write_all(&vmstate).map_err(io_err(&vm_path))?;

    let meta = SnapshotMeta {
        version: META_VERSION,
        created_at_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        guest: state.guest,
        mem_mib: state.mem_mib,
        vcpus: state.vcpus.len() as u8,
        memory_bytes,
        memory_data_bytes,
        memory_hash,
        vmstate_hash: blake3::hash(&vmstate).to_hex().to_string(),
        status,
        bootable: true,
        disks,
        nets: nets.to_vec(),
        kind,
        parent,
        live_copy: None,
    };
    Ok((meta, live_file))
}

/// Ends a live snapshot in `dir`: on success the memory file is synced, its
/// content hash computed and the snapshot marked `ready`; on failure it is
/// marked `failed` (and can never be restored).
pub fn finish_live(
    dir: &Path,
    copied: Result<LiveCopyStats, String>,
) -> Result<SnapshotMeta, Error> {
    let mut meta = read_meta(dir)?;
    let copied = copied.map(|stats| meta.live_copy = Some(stats));
    let outcome = copied.and_then(|()| {
        let path = dir.join(MEMORY_FILE);
        let file = File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        file.sync_all()
            .map_err(|e| format!("{}: {e}", path.display()))?;
        hash_memory_file(&file).map_err(|e| format!("{}: {e}", path.display()))
    });
    match outcome {
        Ok((data, hash)) => {
            meta.memory_data_bytes = data;
            meta.memory_hash = hash;
            meta.status = SnapshotStatus::Ready;
            write_meta(dir, &meta)?;
            Ok(meta)
        }
        Err(reason) => {
            meta.status = SnapshotStatus::Failed;
            write_meta(dir, &meta)?;
            Err(Error::Inconsistent {
                path: dir.to_owned(),
                reason: format!("the live copy failed: {reason}"),
            })
        }
    }
}

/// (data bytes, content hash) of a memory file, defined as for
/// [`write_memory`]: BLAKE3 over (page index, page) of every non-zero page.
fn hash_memory_file(file: &File) -> std::io::Result<(u64, String)> {
    let mut hasher = blake3::Hasher::new();
    let mut data = 0u64;
    let mut buf = vec![0u8; MAX_RUN];
    for (start, end) in data_extents(file)? {
        let mut at = start;
        while at < end {
            let n = ((end - at) as usize).min(buf.len());
            file.read_exact_at(&mut buf[..n], at)?;
            for (i, page) in buf[..n].chunks_exact(PAGE).enumerate() {
                if !is_zero(page) {
                    hasher.update(&((at + (i * PAGE) as u64) / PAGE as u64).to_le_bytes());
                    hasher.update(page);
                    data += PAGE as u64;
                }
            }
            at += n as u64;
        }
    }
    Ok((data, hasher.finalize().to_hex().to_string()))
}

/// Links drive `index`'s frozen layer into the snapshot directory `tmp` as
/// `disk<index>.layer` and describes the drive's stack.
fn capture_disk(tmp: &Path, index: usize, drive: &DriveCapture) -> Result<SnapshotDisk, Error> {
    let (chain, own) = match drive {
        DriveCapture::ReadOnly(cfg) => (cfg, None),
        DriveCapture::Frozen(f) => (&f.chain, Some(&f.frozen)),
    };
    let mut layers = Vec::with_capacity(chain.frozen.len());
    for layer in &chain.frozen {
        if Some(layer) == own {
            let name = PathBuf::from(format!("disk{index}.layer"));
            let link = tmp.join(&name);
            std::fs::hard_link(layer, &link)
                .or_else(|_| std::fs::copy(layer, &link).map(|_| ()))
                .map_err(io_err(&link))?;
            layers.push(name);
        } else {
            layers.push(std::path::absolute(layer).map_err(io_err(layer))?);
        }
    }
    Ok(SnapshotDisk {
        base: chain
            .base
            .as_deref()
            .map(std::path::absolute)
            .transpose()
            .map_err(io_err(tmp))?,
        size: chain.size,
        layers,
        read_only: chain.read_only,
    })
}

/// Writes `snapshot.json` in `dir` atomically (temp file, fsync, rename).
pub fn write_meta(dir: &Path, meta: &SnapshotMeta) -> Result<(), Error> {
    proto::snapshot::write_meta(dir, meta).map_err(|e| meta_err(dir, e))
}

/// Reads `snapshot.json` from `dir` ([`proto::snapshot::read_meta`]) and
/// checks what only the VMM knows: every tap name one it can open.
pub fn read_meta(dir: &Path) -> Result<SnapshotMeta, Error> {
    let meta = proto::snapshot::read_meta(dir).map_err(|e| meta_err(dir, e))?;
    check_nets(&meta.nets).map_err(|reason| Error::Meta {
        path: dir.to_owned(),
        reason,
    })?;
    Ok(meta)
}

fn meta_err(dir: &Path, e: proto::snapshot::MetaError) -> Error {
    match e {
        proto::snapshot::MetaError::Io { path, source } => Error::Io { path, source },
        proto::snapshot::MetaError::Invalid { reason, .. } => Error::Meta {
            path: dir.to_owned(),
            reason,
        },
    }
}

/// `nets` of an untrusted `snapshot.json`: every tap name one that
/// [`net::Tap`] opens, every MAC six hex pairs.
fn check_nets(nets: &[SnapshotNet]) -> Result<(), String> {
    for (i, n) in nets.iter().enumerate() {
        net::tap::check_name(&n.tap).map_err(|e| format!("network interface {i}: {e}"))?;
        if parse_mac(&n.mac).is_none() {
            return Err(format!(
                "network interface {i}: MAC {:?} is not six hex pairs (aa:bb:cc:dd:ee:ff)",
                n.mac
            ));
        }
    }
    Ok(())
}

/// Whether `nets` (from `snapshot.json`) describes the vmstate's network
/// devices `saved`: one each, in order, with the same MAC.
fn nets_match(nets: &[SnapshotNet], saved: &[AttachedState]) -> Result<(), String> {
    let macs: Vec<[u8; 6]> = saved
        .iter()
        .filter_map(|d| match &d.device {
            DeviceState::Net(n) => Some(n.mac),
            _ => None,
        })
        .collect();
    if macs.len() != nets.len() {
        return Err(format!(
            "the vmstate has {} network interfaces but snapshot.json names a tap for {}{}",
            macs.len(),
            nets.len(),
            if nets.is_empty() {
                " (a snapshot taken before taps were recorded: take it again)"
            } else {
                ""
            }
        ));
    }
    for (i, (n, mac)) in nets.iter().zip(&macs).enumerate() {
        if parse_mac(&n.mac) != Some(*mac) {
            return Err(format!(
                "network interface {i}: snapshot.json says MAC {} but the vmstate has {}",
                n.mac,
                format_mac(mac)
            ));
        }
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<(), Error> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

/// Writes every region of `mem` back to back into a new sparse file at
/// `path`: runs of non-zero pages are written, zero pages stay holes.
/// Returns (logical bytes, data bytes, content hash).
fn write_memory(path: &Path, mem: &GuestMemoryMmap) -> Result<(u64, u64, String), Error> {
    let file = File::create(path).map_err(io_err(path))?;
    let total: u64 = mem.iter().map(|r| r.len()).sum();
    file.set_len(total).map_err(io_err(path))?;
    let mut hasher = blake3::Hasher::new();
    let mut data_bytes = 0u64;
    let mut file_offset = 0u64;
    for region in mem.iter() {
        let len = region.len() as usize;
        // SAFETY: the region is a live mapping of `len` bytes owned by the
        // guest memory, and every vCPU is paused, so nothing writes to it
        // while this shared view exists.
        let bytes = unsafe { std::slice::from_raw_parts(region.as_ptr() as *const u8, len) };
        let mut run_start: Option<usize> = None;
        let flush = |start: usize, end: usize| -> Result<(), Error> {
            file.write_all_at(&bytes[start..end], file_offset + start as u64)
                .map_err(io_err(path))
        };
        for (i, page) in bytes.chunks_exact(PAGE).enumerate() {
            let off = i * PAGE;
            if is_zero(page) {
                if let Some(s) = run_start.take() {
                    flush(s, off)?;
                }
                continue;
            }
            hasher.update(&((file_offset + off as u64) / PAGE as u64).to_le_bytes());
            hasher.update(page);
            data_bytes += PAGE as u64;
            match run_start {
                Some(s) if off - s >= MAX_RUN => {
                    flush(s, off)?;
                    run_start = Some(off);
                }
                None => run_start = Some(off),
                _ => {}
            }
        }
        if let Some(s) = run_start {
            flush(s, len)?;
        }
        file_offset += len as u64;
    }
    Ok((total, data_bytes, hasher.finalize().to_hex().to_string()))
}

/// Writes the pages set in `dirty` into `<tmp>/memory.diff` at their
/// offsets (zero pages stay holes: a hole reads as zero) and the page list
/// into `<tmp>/memory.diffmap`. Returns (logical bytes, bytes of changed
/// pages, hash of the changed pages).
fn write_diff(
    tmp: &Path,
    mem: &GuestMemoryMmap,
    dirty: &[Vec<u64>],
) -> Result<(u64, u64, String), Error> {
    let path = tmp.join(DIFF_FILE);
    let file = File::create(&path).map_err(io_err(&path))?;
    let total: u64 = mem.iter().map(|r| r.len()).sum();
    file.set_len(total).map_err(io_err(&path))?;
    let mut map = DiffMap {
        pages: total / PAGE as u64,
        bits: vec![0; (total / PAGE as u64).div_ceil(64) as usize],
    };
    let mut hasher = blake3::Hasher::new();
    let mut changed = 0u64;
    let mut file_offset = 0u64;
    for (region, bits) in mem.iter().zip(dirty) {
        let len = region.len() as usize;
        // SAFETY: as in write_memory: a live mapping, vCPUs paused and
        // devices quiesced, so nothing writes it while this view exists.
        let bytes = unsafe { std::slice::from_raw_parts(region.as_ptr() as *const u8, len) };
        let first_page = file_offset / PAGE as u64;
        for page in 0..len / PAGE {
            if bits
                .get(page / 64)
                .is_none_or(|w| w & (1 << (page % 64)) == 0)
            {
                continue;
            }
            let global = first_page + page as u64;
            map.bits[(global / 64) as usize] |= 1 << (global % 64);
            let data = &bytes[page * PAGE..(page + 1) * PAGE];
            hasher.update(&global.to_le_bytes());
            hasher.update(data);
            changed += PAGE as u64;
            if !is_zero(data) {
                file.write_all_at(data, global * PAGE as u64)
                    .map_err(io_err(&path))?;
            }
        }
        file_offset += len as u64;
    }
    let map_path = tmp.join(DIFF_MAP_FILE);
    let mut f = File::create(&map_path).map_err(io_err(&map_path))?;
    f.write_all(&format::encode(&map))
        .map_err(io_err(&map_path))?;
    Ok((total, changed, hasher.finalize().to_hex().to_string()))
}

/// Copies `from` to a new file `to`, keeping holes as holes.
fn copy_sparse(from: &Path, to: &Path) -> Result<(), Error> {
    let src = File::open(from).map_err(io_err(from))?;
    let len = src.metadata().map_err(io_err(from))?.len();
    let dst = File::create(to).map_err(io_err(to))?;
    dst.set_len(len).map_err(io_err(to))?;
    let mut buf = vec![0u8; MAX_RUN];
    for (start, end) in data_extents(&src).map_err(io_err(from))? {
        let mut at = start;
        while at < end {
            let n = ((end - at) as usize).min(buf.len());
            src.read_exact_at(&mut buf[..n], at).map_err(io_err(from))?;
            dst.write_all_at(&buf[..n], at).map_err(io_err(to))?;
            at += n as u64;
        }
    }
    Ok(())
}

fn is_zero(page: &[u8]) -> bool {
    // SAFETY: reinterpreting initialised bytes as u128 is valid for any
    // bit pattern; align_to handles the unaligned head and tail.
    let (head, body, tail) = unsafe { page.align_to::<u128>() };
    head.iter().all(|&b| b == 0) && body.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// A snapshot read and checked once, ready to restore any number of
/// children from (state parsed, nothing left to validate per child).
pub struct PreparedSnapshot {
    /// The directory.
    pub dir: PathBuf,
    /// Its metadata.
    pub meta: SnapshotMeta,
    /// Its decoded vmstate.
    pub state: VmState,
}

impl PreparedSnapshot {
    /// Reads and checks the snapshot in `dir`: metadata, status, vmstate
    /// checksum and version, and that the memory file has the right size.
    pub fn load(dir: &Path) -> Result<Self, Error> {
        let meta = read_meta(dir)?;
        if meta.status != SnapshotStatus::Ready {
            return Err(Error::NotReady {
                path: dir.to_owned(),
                status: meta.status,
            });
        }
        let meta = ensure_memory(dir)?;
        let state: VmState =
            format::read_file(&dir.join(VMSTATE_FILE)).map_err(|source| Error::Format {
                path: dir.to_owned(),
                source,
            })?;
        let inconsistent = |reason: String| Error::Inconsistent {
            path: dir.to_owned(),
            reason,
        };
        if state.mem_mib != meta.mem_mib || state.vcpus.len() != usize::from(meta.vcpus) {
            return Err(inconsistent(
                "vmstate and snapshot.json disagree on memory size or vCPU count".into(),
            ));
        }
        nets_match(&meta.nets, &state.devices.virtio).map_err(inconsistent)?;
        if state.vcpus.is_empty()
            || state
                .vcpus
                .iter()
                .enumerate()
                .any(|(i, v)| usize::from(v.id) != i)
        {
            return Err(inconsistent(
                "vCPU states are missing or out of order".into(),
            ));
        }
        let mem_path = dir.join(MEMORY_FILE);
        let len = std::fs::metadata(&mem_path)
            .map_err(io_err(&mem_path))?
            .len();
        if len != state.mem_mib << 20 {
            return Err(inconsistent(format!(
                "memory file is {len} bytes but the VM has {} bytes of RAM (truncated?)",
                state.mem_mib << 20
            )));
        }
        Ok(PreparedSnapshot {
            dir: dir.to_owned(),
            meta,
            state,
        })
    }

    /// Path of the memory file.
    pub fn memory_path(&self) -> PathBuf {
        self.dir.join(MEMORY_FILE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::net::NetState;
    use crate::devices::virtio::persist::VirtioState;
    use vm_memory::{Bytes, GuestAddress};

    fn meta_with_nets(nets: Vec<SnapshotNet>) -> SnapshotMeta {
        SnapshotMeta {
            version: META_VERSION,
            created_at_unix: 1,
            guest: GuestKind::Builtin,
            mem_mib: 16,
            vcpus: 1,
            memory_bytes: 16 << 20,
            memory_data_bytes: 0,
            memory_hash: String::new(),
            vmstate_hash: String::new(),
            status: SnapshotStatus::Ready,
            bootable: true,
            disks: Vec::new(),
            nets,
            kind: SnapshotKind::Full,
            parent: None,
            live_copy: None,
        }
    }

    /// `snapshot.json` with `nets` replaced by `value`, read back.
    fn read_with_nets(tag: &str, value: serde_json::Value) -> Result<SnapshotMeta, Error> {
        let dir = std::env::temp_dir().join(format!("forkd-snapnets-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut json = serde_json::to_value(meta_with_nets(Vec::new())).unwrap();
        json["nets"] = value;
        std::fs::write(dir.join(META_FILE), json.to_string()).unwrap();
        let read = read_meta(&dir);
        std::fs::remove_dir_all(&dir).unwrap();
        read
    }

    #[test]
    fn nets_are_left_out_when_there_are_none_and_round_trip_otherwise() {
        let none = serde_json::to_value(meta_with_nets(Vec::new())).unwrap();
        assert!(none.get("nets").is_none(), "{none}");
        // An older snapshot.json (no such key) reads with no interfaces.
        let old: SnapshotMeta = serde_json::from_value(none).unwrap();
        assert!(old.nets.is_empty());
        let one = meta_with_nets(vec![SnapshotNet::new("forkd0", &[6, 0, 0xac, 0x10, 0, 2])]);
        let json = serde_json::to_value(&one).unwrap();
        assert_eq!(
            json["nets"],
            serde_json::json!([{"tap": "forkd0", "mac": "06:00:ac:10:00:02"}])
        );
        assert_eq!(serde_json::from_value::<SnapshotMeta>(json).unwrap(), one);
    }

    #[test]
    fn read_meta_refuses_tap_names_a_tap_cannot_have_and_bad_macs() {
        let good = serde_json::json!([{"tap": "forkd0", "mac": "06:00:ac:10:00:02"}]);
        let meta = read_with_nets("good", good).unwrap();
        assert_eq!(meta.nets[0].tap, "forkd0");
        for (tag, tap, mac, says) in [
            ("slash", "../eth0", "06:00:ac:10:00:02", "tap name"),
            ("long", "abcdefghijklmnop", "06:00:ac:10:00:02", "tap name"),
            ("empty", "", "06:00:ac:10:00:02", "tap name"),
            ("space", "a b", "06:00:ac:10:00:02", "tap name"),
            ("mac", "forkd0", "06:00:ac:10:00", "MAC"),
            ("machex", "forkd0", "06:00:ac:10:00:zz", "MAC"),
        ] {
            let err =
                read_with_nets(tag, serde_json::json!([{"tap": tap, "mac": mac}])).expect_err(tag);
            assert!(matches!(err, Error::Meta { .. }), "{tag}: {err}");
            let text = err.to_string();
            assert!(
                text.contains("network interface 0") && text.contains(says),
                "{tag}: {text}"
            );
        }
        // Not a list of interfaces at all.
        assert!(matches!(
            read_with_nets("shape", serde_json::json!("forkd0")),
            Err(Error::Meta { .. })
        ));
    }

    #[test]
    fn nets_must_name_one_tap_per_network_device_of_the_vmstate() {
        let device = |device: DeviceState| AttachedState {
            base: 0,
            irq: 5,
            mmio: Default::default(),
            device,
        };
        let net = |mac: [u8; 6]| {
            device(DeviceState::Net(NetState {
                virtio: VirtioState {
                    device_type: 1,
                    avail_features: 0,
                    acked_features: 0,
                    queues: Vec::new(),
                },
                mac,
            }))
        };
        let (a, b) = ([6, 0, 0, 0, 0, 1], [6, 0, 0, 0, 0, 2]);
        let saved = vec![net(a), net(b)];
        let recorded = |macs: &[[u8; 6]]| -> Vec<SnapshotNet> {
            macs.iter()
                .enumerate()
                .map(|(i, m)| SnapshotNet::new(&format!("tap{i}"), m))
                .collect()
        };
        assert_eq!(nets_match(&recorded(&[a, b]), &saved), Ok(()));
        assert_eq!(nets_match(&[], &[]), Ok(()));
        let missing = nets_match(&[], &saved).unwrap_err();
        assert!(
            missing.contains("has 2 network interfaces") && missing.contains("take it again"),
            "{missing}"
        );
        assert!(nets_match(&recorded(&[a]), &saved).is_err());
        assert!(nets_match(&recorded(&[a, b, a]), &saved).is_err());
        assert!(nets_match(&recorded(&[a]), &[]).is_err());
        // In order: swapped MACs are another machine.
        let swapped = nets_match(&recorded(&[b, a]), &saved).unwrap_err();
        assert!(swapped.contains("network interface 0"), "{swapped}");
    }

    #[test]
    fn memory_file_is_sparse_and_exact() {
        let dir = std::env::temp_dir().join(format!("forkd-snapmem-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 16 << 20),
            (GuestAddress(1 << 32), 4 << 20),
        ])
        .unwrap();
        mem.write_obj(0x1122_3344u32, GuestAddress(0x5000)).unwrap();
        mem.write_obj(0x55u8, GuestAddress((1 << 32) + 0x1fff))
            .unwrap();
        let path = dir.join("memory");
        let (total, data, hash) = write_memory(&path, &mem).unwrap();
        assert_eq!(total, 20 << 20);
        assert_eq!(data, 2 * PAGE as u64);
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len() as u64, total);
        assert_eq!(&bytes[0x5000..0x5004], &0x1122_3344u32.to_le_bytes());
        assert_eq!(bytes[(16 << 20) + 0x1fff], 0x55);
        assert_eq!(bytes.iter().filter(|&&b| b != 0).count(), 5);
        // Holes: the file uses far less disk than its size.
        use std::os::unix::fs::MetadataExt;
        assert!(std::fs::metadata(&path).unwrap().blocks() * 512 < 1 << 20);
        // Same content, same hash; a changed byte, another.
        let (_, _, again) = write_memory(&dir.join("m2"), &mem).unwrap();
        assert_eq!(hash, again);
        mem.write_obj(0x56u8, GuestAddress((1 << 32) + 0x1fff))
            .unwrap();
        let (_, _, changed) = write_memory(&dir.join("m3"), &mem).unwrap();
        assert_ne!(hash, changed);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
