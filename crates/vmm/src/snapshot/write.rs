//! Writing a snapshot: staging its directory, the memory file (full or
//! diff), the drives' frozen layers, and the commit that renames it into
//! place whole.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use proto::control::DiffCost;

use crate::devices::virtio::block::{DiskConfig, Frozen};
use crate::memory::{data_extents, GuestMemoryMmap};

use super::page_hash::PageHasher;
use super::*;

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
    staged.memory = Some(blank_memory_file(&staged.tmp, mem)?.0);
    Ok(staged)
}

/// `<tmp>/memory`, new, sparse and as long as all of RAM, open for a copy
/// to fill; and that length.
fn blank_memory_file(tmp: &Path, mem: &GuestMemoryMmap) -> Result<(File, u64), Error> {
    let path = tmp.join(MEMORY_FILE);
    let total: u64 = mem.iter().map(|r| r.len()).sum();
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(io_err(&path))?;
    f.set_len(total).map_err(io_err(&path))?;
    Ok((f, total))
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
    pub(in crate::snapshot) tmp: PathBuf,
    pub(in crate::snapshot) dir: PathBuf,
    pub(in crate::snapshot) meta: SnapshotMeta,
    pub(in crate::snapshot) memory: Option<File>,
}

impl Pending {
    /// The metadata it will be committed with.
    pub fn meta(&self) -> &SnapshotMeta {
        &self.meta
    }

    /// For a diff: what its files cost, written in `write_us`.
    pub fn diff_cost(&self, write_us: u64) -> Result<DiffCost, Error> {
        diff_cost(&self.tmp, write_us)
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
    ///
    /// Every file is left read-only (`seal_files`) but a live snapshot's
    /// `memory`, which its copy is still filling (`finish_live` seals it).
    pub fn commit(self) -> Result<SnapshotMeta, Error> {
        let result = (|| {
            let filling: &[&str] = match self.meta.status {
                SnapshotStatus::Writing => &[MEMORY_FILE],
                _ => &[],
            };
            seal_files(&self.tmp, filling)?;
            for entry in std::fs::read_dir(&self.tmp).map_err(io_err(&self.tmp))? {
                let path = entry.map_err(io_err(&self.tmp))?.path();
                File::open(&path)
                    .and_then(|f| f.sync_all())
                    .map_err(io_err(&path))?;
            }
            write_meta(&self.tmp, &self.meta)?;
            sync_dir(&self.tmp)?;
            if self.tmp.parent() == Some(self.dir.as_path()) {
                // Put together inside a directory handed over: its files
                // move up, `snapshot.json` last, which makes it one.
                let mut names: Vec<_> = std::fs::read_dir(&self.tmp)
                    .map_err(io_err(&self.tmp))?
                    .map(|e| e.map(|e| e.file_name()))
                    .collect::<Result<_, _>>()
                    .map_err(io_err(&self.tmp))?;
                names.sort_by_key(|n| n == proto::snapshot::META_FILE);
                for name in names {
                    std::fs::rename(self.tmp.join(&name), self.dir.join(&name))
                        .map_err(io_err(&self.dir))?;
                }
                std::fs::remove_dir(&self.tmp).map_err(io_err(&self.tmp))?;
                return sync_dir(&self.dir);
            }
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
/// in: a hidden sibling of `dir`, on the same file system, so the final
/// rename is atomic; or, when `dir` is an empty directory its caller
/// handed over (one made where this process may not make one: a jailed
/// VMM's), a hidden directory inside it, whose files move up at the end.
/// `dir` must not exist otherwise.
pub(super) fn temp_dir_beside(dir: &Path) -> Result<PathBuf, Error> {
    if dir.exists() {
        let empty = std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_none());
        if !dir.is_dir() || !empty {
            return Err(Error::Exists(dir.to_owned()));
        }
        let tmp = dir.join(format!(".tmp-{}", std::process::id()));
        std::fs::create_dir(&tmp).map_err(io_err(&tmp))?;
        return Ok(tmp);
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
    std::fs::create_dir_all(&tmp).map_err(|e| match e.kind() {
        std::io::ErrorKind::PermissionDenied => Error::NotPermitted(dir.to_owned()),
        _ => io_err(&tmp)(e),
    })?;
    Ok(tmp)
}

pub(super) fn write_into(
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
            let (f, total) = blank_memory_file(tmp, mem)?;
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
            (
                SnapshotKind::Diff,
                Some(parent.clone()),
                (total, data, chain_hash(&parent.memory_hash, &diff_hash)),
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
            // Sealed before it is said to be ready: a reader that sees
            // `ready` (a verify) sees the file as it stays.
            seal(&dir.join(MEMORY_FILE))?;
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

/// Bytes a file is read in to be hashed: large enough that a read costs
/// little per byte, small enough that the buffer is still in the core's
/// cache when it is hashed. On the development machine 1 MiB reads hashed
/// a warm 1 GiB memory file in 0.37-0.41 s and 8 MiB reads in 0.85-0.93 s
/// (the copy out of the page cache took most of the difference), with
/// 128 KiB and 256 KiB no better than 1 MiB.
const HASH_READ: usize = 1 << 20;

/// (data bytes, content hash) of a memory file, defined as for
/// [`write_memory`]: BLAKE3 over (page index, page) of every non-zero page.
/// Only the file's data extents are read, [`HASH_READ`] at a time.
pub(super) fn hash_memory_file(file: &File) -> std::io::Result<(u64, String)> {
    let mut hasher = PageHasher::new();
    let mut data = 0u64;
    let mut buf = vec![0u8; HASH_READ];
    for (start, end) in data_extents(file)? {
        let mut at = start;
        while at < end {
            let n = ((end - at) as usize).min(buf.len());
            file.read_exact_at(&mut buf[..n], at)?;
            for (i, page) in buf[..n].chunks_exact(PAGE).enumerate() {
                if !is_zero(page) {
                    hasher.page((at + (i * PAGE) as u64) / PAGE as u64, page);
                    data += PAGE as u64;
                }
            }
            at += n as u64;
        }
    }
    Ok((data, hasher.finish()))
}

/// Mode of a snapshot's files once they are complete: readable by their
/// owner, written by nobody. A snapshot is never changed in place (a diff's
/// `memory` is a new file, a status change a new `snapshot.json`), so a
/// process that opens one for writing is wrong, and is refused (when it is
/// not root).
pub const SEALED_MODE: u32 = 0o400;

/// Gives `path` [`SEALED_MODE`]. Descriptors open already keep their access.
pub(super) fn seal(path: &Path) -> Result<(), Error> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(SEALED_MODE))
        .map_err(io_err(path))
}

/// Seals ([`seal`]) every regular file in the snapshot directory `dir` but
/// those named in `except`. A drive layer hard-linked in is the same file
/// as the VM's frozen layer, which is never written again either.
pub(super) fn seal_files(dir: &Path, except: &[&str]) -> Result<(), Error> {
    for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        let regular = entry.file_type().map_err(io_err(&entry.path()))?.is_file();
        if regular && !except.iter().any(|name| entry.file_name() == *name) {
            seal(&entry.path())?;
        }
    }
    Ok(())
}

/// Links drive `index`'s frozen layer into the snapshot directory `tmp` as
/// `disk<index>.layer` and describes the drive's stack.
pub(super) fn capture_disk(
    tmp: &Path,
    index: usize,
    drive: &DriveCapture,
) -> Result<SnapshotDisk, Error> {
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

pub(super) fn sync_dir(dir: &Path) -> Result<(), Error> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

/// Writes every region of `mem` back to back into a new sparse file at
/// `path`: runs of non-zero pages are written, zero pages stay holes.
/// Returns (logical bytes, data bytes, content hash).
pub(super) fn write_memory(
    path: &Path,
    mem: &GuestMemoryMmap,
) -> Result<(u64, u64, String), Error> {
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
pub(super) fn write_diff(
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

/// A diff snapshot's `memory_hash`: its content is its parent's content
/// (`parent_hash`, the parent's `memory_hash`) plus the changed pages
/// (`diff_hash`, as [`write_diff`] and [`hash_diff_file`] compute it),
/// hashed as the two hex strings one after the other.
pub(super) fn chain_hash(parent_hash: &str, diff_hash: &str) -> String {
    let mut h = blake3::Hasher::new();
    h.update(parent_hash.as_bytes());
    h.update(diff_hash.as_bytes());
    h.finalize().to_hex().to_string()
}

/// (bytes of changed pages, hash of the changed pages) of a written diff:
/// the pages `map` lists, read from the diff file `diff` (a hole reads as
/// the zero page it stands for), hashed as [`write_diff`] hashes them.
/// Consecutive pages are read together, up to [`HASH_READ`] a read.
pub(super) fn hash_diff_file(diff: &File, map: &DiffMap) -> std::io::Result<(u64, String)> {
    let mut hasher = PageHasher::new();
    let mut changed = 0u64;
    let mut buf = vec![0u8; HASH_READ];
    for (first, count) in map.runs((HASH_READ / PAGE) as u64) {
        let bytes = &mut buf[..count as usize * PAGE];
        diff.read_exact_at(bytes, first * PAGE as u64)?;
        for (i, page) in bytes.chunks_exact(PAGE).enumerate() {
            hasher.page(first + i as u64, page);
            changed += PAGE as u64;
        }
    }
    Ok((changed, hasher.finish()))
}

/// What the diff files in `dir` cost, written in `write_us`: the memory
/// file's apparent size (sparse: all of RAM, as upstream reports a diff's
/// logical size) and the bytes the memory file and its page map take.
pub(super) fn diff_cost(dir: &Path, write_us: u64) -> Result<DiffCost, Error> {
    use std::os::unix::fs::MetadataExt;
    let stat = |name: &str| {
        let path = dir.join(name);
        std::fs::metadata(&path).map_err(io_err(&path))
    };
    let (diff, map) = (stat(DIFF_FILE)?, stat(DIFF_MAP_FILE)?);
    Ok(DiffCost {
        write_us,
        physical_bytes: (diff.blocks() + map.blocks()) * 512,
        logical_bytes: diff.len(),
    })
}

/// Writes the diff a diff snapshot of `mem` with `dirty` pages would write,
/// in a scratch directory beside `dir` (inside it when it was handed over,
/// as a snapshot is put together there), and removes it again: what `measure_diff`
/// reports beside a full snapshot. Call in the pause.
pub fn measure_diff(
    dir: &Path,
    mem: &GuestMemoryMmap,
    dirty: &[Vec<u64>],
) -> Result<DiffCost, Error> {
    let scratch = if dir.is_dir() {
        dir.join(format!(".measure-{}", std::process::id()))
    } else {
        let name = dir
            .file_name()
            .map_or_else(|| "snapshot".into(), |n| n.to_string_lossy().into_owned());
        dir.with_file_name(format!(".{name}.measure-{}", std::process::id()))
    };
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).map_err(io_err(&scratch))?;
    let started = std::time::Instant::now();
    let cost = write_diff(&scratch, mem, dirty)
        .and_then(|_| diff_cost(&scratch, started.elapsed().as_micros() as u64));
    let _ = std::fs::remove_dir_all(&scratch);
    cost
}

/// Copies `from` to a new file `to`, keeping holes as holes.
pub(super) fn copy_sparse(from: &Path, to: &Path) -> Result<(), Error> {
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

pub(super) fn is_zero(page: &[u8]) -> bool {
    // SAFETY: reinterpreting initialised bytes as u128 is valid for any
    // bit pattern; align_to handles the unaligned head and tail.
    let (head, body, tail) = unsafe { page.align_to::<u128>() };
    head.iter().all(|&b| b == 0) && body.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}
