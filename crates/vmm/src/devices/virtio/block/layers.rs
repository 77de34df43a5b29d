//! The disk behind a virtio-block device: a stack of layers.
//!
//! ```text
//!   top      writable CoW layer (this VM's; one writer, locked)
//!   lower    frozen CoW layers (shared by every VM forked from them)
//!   base     raw image, opened read-only (shared)
//! ```
//!
//! A read of a cluster comes from the topmost layer holding it, else from
//! the base image, else reads as zeros. A write goes to the top layer; the
//! first write to a cluster copies it up (the cluster's current content
//! merged with the new bytes). Children of one snapshot open the same base
//! and frozen layers read-only and each writes only its own top layer.
//! [`DiskStack::freeze_top`] freezes the top layer (its header says so and
//! it is never written again) and continues on a new, empty layer above
//! it: a snapshot or BRANCH keeps the frozen one.
//!
//! A drive with no CoW layer is either read-only or writes straight into
//! its raw image (a plain writable drive; it cannot be frozen).
//!
//! # Layer file format (version 1)
//!
//! All integers little-endian.
//!
//! ```text
//! offset 0, one 4 KiB header block:
//!    0  magic          8 bytes, "FRKDCOW\0"
//!    8  version        u32 = 1
//!   12  flags          u32, bit 0: frozen (never written again)
//!   16  cluster_size   u32, a power of two from 4 KiB to 1 MiB
//!   20  reserved       u32 = 0
//!   24  virtual_size   u64, the disk's size in bytes
//!   32  layer_id       u64, random, names this layer
//!   40  parent_id      u64, layer_id of the layer below (0: the base image)
//!   48  table_offset   u64 = 4096
//!   56  table_entries  u64 = ceil(virtual_size / cluster_size)
//!   64  data_offset    u64, table end rounded up to a cluster
//!   72  checksum       u64, FNV-1a 64 of bytes 0..72
//! table_offset: table_entries u64 entries; entry i is the file offset of
//!   cluster i's data in this layer, or 0 when this layer does not hold it
//! data_offset: data clusters, in allocation order
//! ```
//!
//! # Crash safety
//!
//! The table on disk only ever points at data that is on disk:
//!
//! - A write to a cluster this layer already holds goes in place.
//! - A write to a cluster it does not hold yet goes to a newly allocated
//!   cluster past the last one in use; the new table entry is kept in
//!   memory only.
//! - [`DiskStack::flush`] (the guest's FLUSH, a freeze, or closing the
//!   drive) first fdatasyncs the data, then writes the table entries that
//!   changed, then fdatasyncs again.
//!
//! A crash therefore loses at most the writes since the last flush that
//! needed new clusters (their clusters are unreferenced and are reused:
//! allocation restarts after the last cluster the table references), and
//! never leaves the table pointing at unwritten data. In-place writes to
//! already-held clusters behave like a disk's volatile write cache.
//! A header is written once at creation and once when frozen (a single
//! sector-aligned write, then fdatasync).

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// The magic at the start of a layer file.
pub const LAYER_MAGIC: [u8; 8] = *b"FRKDCOW\0";
/// The format version written and understood.
pub const LAYER_VERSION: u32 = 1;
/// Cluster size of new layers.
pub const DEFAULT_CLUSTER_SIZE: u32 = 64 * 1024;
/// Largest virtual disk a layer describes (2 TiB: a 256 MiB table at most).
pub const MAX_VIRTUAL_SIZE: u64 = 2 << 40;

const HEADER_SIZE: u64 = 4096;
const FLAG_FROZEN: u32 = 1;
const MIN_CLUSTER: u32 = 4096;
const MAX_CLUSTER: u32 = 1 << 20;

/// Errors of the layer stack.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    /// An I/O error on a file of the stack.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// A layer file is not one, or is damaged.
    #[error("{path} is not a usable forkd CoW layer: {reason}")]
    BadLayer {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Layers stacked in an order they were not made for.
    #[error("{path} was made on top of layer {expected:#x}, but is stacked on {found:#x}; give the layers bottom to top, as they were created")]
    WrongParent {
        /// The layer.
        path: PathBuf,
        /// Its recorded parent.
        expected: u64,
        /// What it is stacked on.
        found: u64,
    },
    /// A lower layer that is not frozen, or a top layer that is.
    #[error("{path}: {reason}")]
    FrozenState {
        /// The layer.
        path: PathBuf,
        /// What is wrong.
        reason: &'static str,
    },
    /// Another process writes this layer.
    #[error("{0} is in use by another VM: a CoW layer has exactly one writer; give this VM its own layer")]
    Locked(PathBuf),
    /// A write to a read-only stack.
    #[error("the drive is read-only")]
    ReadOnly,
    /// An access past the end of the disk.
    #[error("access of {len} bytes at {offset} is past the end of the {size}-byte disk")]
    OutOfRange {
        /// Byte offset.
        offset: u64,
        /// Length.
        len: u64,
        /// Disk size.
        size: u64,
    },
    /// Freezing a stack with no CoW layer.
    #[error(
        "this drive has no CoW layer to freeze: give it one (--cow-layer) to snapshot its disk"
    )]
    NothingToFreeze,
    /// A bad disk size.
    #[error(
        "a disk of {0} bytes is not supported: it must be at least 512 bytes and at most 2 TiB"
    )]
    Size(u64),
    /// A write that needs a new cluster in a CoW layer holding its quota.
    #[error("{path} holds its quota of {quota} bytes of data: the write is refused")]
    Quota {
        /// The layer.
        path: PathBuf,
        /// The quota, in bytes.
        quota: u64,
    },
}

fn io_err(path: &Path) -> impl Fn(io::Error) -> LayerError + '_ {
    move |source| LayerError::Io {
        path: path.to_owned(),
        source,
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// A layer's header fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    flags: u32,
    cluster_size: u32,
    virtual_size: u64,
    layer_id: u64,
    parent_id: u64,
    table_entries: u64,
    data_offset: u64,
}

impl Header {
    fn new(virtual_size: u64, cluster_size: u32, parent_id: u64) -> Self {
        let table_entries = virtual_size.div_ceil(u64::from(cluster_size));
        let table_end = HEADER_SIZE + table_entries * 8;
        Header {
            flags: 0,
            cluster_size,
            virtual_size,
            layer_id: random_id(),
            parent_id,
            table_entries,
            data_offset: table_end.next_multiple_of(u64::from(cluster_size)),
        }
    }

    fn encode(&self) -> [u8; HEADER_SIZE as usize] {
        let mut b = [0u8; HEADER_SIZE as usize];
        b[0..8].copy_from_slice(&LAYER_MAGIC);
        b[8..12].copy_from_slice(&LAYER_VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&self.flags.to_le_bytes());
        b[16..20].copy_from_slice(&self.cluster_size.to_le_bytes());
        b[24..32].copy_from_slice(&self.virtual_size.to_le_bytes());
        b[32..40].copy_from_slice(&self.layer_id.to_le_bytes());
        b[40..48].copy_from_slice(&self.parent_id.to_le_bytes());
        b[48..56].copy_from_slice(&HEADER_SIZE.to_le_bytes());
        b[56..64].copy_from_slice(&self.table_entries.to_le_bytes());
        b[64..72].copy_from_slice(&self.data_offset.to_le_bytes());
        let sum = fnv1a(&b[0..72]);
        b[72..80].copy_from_slice(&sum.to_le_bytes());
        b
    }

    fn decode(b: &[u8; HEADER_SIZE as usize]) -> Result<Self, String> {
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        if b[0..8] != LAYER_MAGIC {
            return Err("wrong magic".into());
        }
        if u32_at(8) != LAYER_VERSION {
            return Err(format!(
                "format version {} (this build reads version {LAYER_VERSION})",
                u32_at(8)
            ));
        }
        if u64_at(72) != fnv1a(&b[0..72]) {
            return Err("header checksum mismatch".into());
        }
        let h = Header {
            flags: u32_at(12),
            cluster_size: u32_at(16),
            virtual_size: u64_at(24),
            layer_id: u64_at(32),
            parent_id: u64_at(40),
            table_entries: u64_at(56),
            data_offset: u64_at(64),
        };
        let cs = h.cluster_size;
        if !cs.is_power_of_two() || !(MIN_CLUSTER..=MAX_CLUSTER).contains(&cs) {
            return Err(format!("cluster size {cs}"));
        }
        if h.virtual_size == 0 || h.virtual_size > MAX_VIRTUAL_SIZE {
            return Err(format!("virtual size {}", h.virtual_size));
        }
        if u64_at(48) != HEADER_SIZE
            || h.table_entries != h.virtual_size.div_ceil(u64::from(cs))
            || h.data_offset != (HEADER_SIZE + h.table_entries * 8).next_multiple_of(u64::from(cs))
        {
            return Err("table geometry does not match the disk size".into());
        }
        Ok(h)
    }
}

fn random_id() -> u64 {
    loop {
        let id = crate::random::random_u64();
        if id != 0 {
            return id;
        }
    }
}

/// One CoW layer file.
#[derive(Debug)]
struct Layer {
    path: PathBuf,
    file: File,
    header: Header,
    /// Cluster index -> file offset of its data (0: not in this layer).
    table: Vec<u64>,
    /// Table entries changed since the last flush.
    dirty: BTreeSet<u64>,
    /// Where the next new cluster goes.
    next_alloc: u64,
    /// Data written since the last fdatasync.
    unsynced: bool,
}

impl Layer {
    fn create(path: &Path, virtual_size: u64, parent_id: u64) -> Result<Self, LayerError> {
        let e = io_err(path);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(&e)?;
        lock_file(&file, path, true)?;
        let header = Header::new(virtual_size, DEFAULT_CLUSTER_SIZE, parent_id);
        // Size first (the table reads as zeros: nothing held), header last.
        file.set_len(header.data_offset).map_err(&e)?;
        file.write_all_at(&header.encode(), 0).map_err(&e)?;
        file.sync_all().map_err(&e)?;
        // Make the new file's directory entry durable too.
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(Layer {
            path: path.to_owned(),
            file,
            table: vec![0; header.table_entries as usize],
            dirty: BTreeSet::new(),
            next_alloc: header.data_offset,
            header,
            unsynced: false,
        })
    }

    fn open(path: &Path, writable: bool) -> Result<Self, LayerError> {
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .map_err(io_err(path))?;
        Self::from_file(path, file, writable)
    }

    /// The layer whose file `file` was opened at `path`.
    fn from_file(path: &Path, file: File, writable: bool) -> Result<Self, LayerError> {
        let e = io_err(path);
        let bad = |reason: String| LayerError::BadLayer {
            path: path.to_owned(),
            reason,
        };
        let mut hb = [0u8; HEADER_SIZE as usize];
        file.read_exact_at(&mut hb, 0)
            .map_err(|err| bad(format!("cannot read its header: {err}")))?;
        let header = Header::decode(&hb).map_err(bad)?;
        if writable && header.flags & FLAG_FROZEN != 0 {
            return Err(LayerError::FrozenState {
                path: path.to_owned(),
                reason: "this layer is frozen (part of a snapshot); give the VM a new CoW layer on top of it",
            });
        }
        lock_file(&file, path, writable)?;
        let file_len = file.metadata().map_err(&e)?.len();
        let table_bytes = header.table_entries * 8;
        if file_len < HEADER_SIZE + table_bytes {
            return Err(bad(format!(
                "file of {file_len} bytes is shorter than its table"
            )));
        }
        let mut raw = vec![0u8; table_bytes as usize];
        file.read_exact_at(&mut raw, HEADER_SIZE).map_err(&e)?;
        let cs = u64::from(header.cluster_size);
        let mut table = Vec::with_capacity(header.table_entries as usize);
        let mut next_alloc = header.data_offset;
        for (i, c) in raw.chunks_exact(8).enumerate() {
            let off = u64::from_le_bytes(c.try_into().unwrap());
            if off != 0 {
                let valid = off >= header.data_offset
                    && (off - header.data_offset) % cs == 0
                    && off.checked_add(cs).is_some_and(|end| end <= file_len);
                if !valid {
                    return Err(bad(format!(
                        "table entry {i} points at {off:#x}, outside its data area"
                    )));
                }
                next_alloc = next_alloc.max(off + cs);
            }
            table.push(off);
        }
        Ok(Layer {
            path: path.to_owned(),
            file,
            header,
            table,
            dirty: BTreeSet::new(),
            next_alloc,
            unsynced: false,
        })
    }

    fn frozen(&self) -> bool {
        self.header.flags & FLAG_FROZEN != 0
    }

    fn cluster_size(&self) -> u64 {
        u64::from(self.header.cluster_size)
    }

    /// Makes every write so far durable: data, then the table entries that
    /// point at it.
    fn flush(&mut self) -> Result<(), LayerError> {
        let e = io_err(&self.path);
        if self.unsynced || !self.dirty.is_empty() {
            self.file.sync_data().map_err(&e)?;
            self.unsynced = false;
        }
        if self.dirty.is_empty() {
            return Ok(());
        }
        // Write the dirty entries in runs of adjacent ones.
        let dirty: Vec<u64> = std::mem::take(&mut self.dirty).into_iter().collect();
        let mut i = 0;
        while i < dirty.len() {
            let mut j = i + 1;
            while j < dirty.len() && dirty[j] == dirty[j - 1] + 1 {
                j += 1;
            }
            let mut buf = Vec::with_capacity((j - i) * 8);
            for &c in &dirty[i..j] {
                buf.extend_from_slice(&self.table[c as usize].to_le_bytes());
            }
            self.file
                .write_all_at(&buf, HEADER_SIZE + dirty[i] * 8)
                .map_err(&e)?;
            i = j;
        }
        self.file.sync_data().map_err(&e)
    }

    fn freeze(&mut self) -> Result<(), LayerError> {
        self.flush()?;
        self.header.flags |= FLAG_FROZEN;
        let e = io_err(&self.path);
        self.file
            .write_all_at(&self.header.encode(), 0)
            .map_err(&e)?;
        self.file.sync_data().map_err(&e)
    }
}

fn lock_file(file: &File, path: &Path, exclusive: bool) -> Result<(), LayerError> {
    let op = if exclusive {
        libc::LOCK_EX
    } else {
        libc::LOCK_SH
    } | libc::LOCK_NB;
    // SAFETY: flock on a file descriptor we own; no memory is involved.
    if unsafe { libc::flock(file.as_raw_fd(), op) } != 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(LayerError::Locked(path.to_owned()));
        }
        return Err(io_err(path)(err));
    }
    Ok(())
}

/// How a drive's disk is put together.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiskConfig {
    /// The raw base image (read-only unless the drive is writable and has
    /// no CoW layer). `None`: a blank disk of `size` bytes.
    pub base: Option<PathBuf>,
    /// Size of a blank disk (ignored with a base image).
    pub size: u64,
    /// Frozen CoW layers, bottom to top.
    pub frozen: Vec<PathBuf>,
    /// This VM's writable CoW layer, created when it does not exist.
    pub cow: Option<PathBuf>,
    /// Refuse writes.
    pub read_only: bool,
    /// The most data the writable CoW layer may hold, in bytes (a write
    /// that needs a cluster past it fails: the guest sees an I/O error
    /// and the host file stops growing). `None`: as much as the disk's
    /// size. A new top after a freeze starts empty under the same quota.
    pub quota: Option<u64>,
}

/// The layer stack of one drive.
#[derive(Debug)]
pub struct DiskStack {
    base: Option<(PathBuf, File, u64)>,
    base_writable: bool,
    lower: Vec<Layer>,
    top: Option<Layer>,
    virtual_size: u64,
    read_only: bool,
    quota: Option<u64>,
}

/// What a freeze leaves behind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frozen {
    /// The layer that was frozen (now read-only forever).
    pub frozen: PathBuf,
    /// The stack below the new top: base, then frozen layers bottom to top.
    /// A child forked from this point opens this stack with its own CoW layer.
    pub chain: DiskConfig,
}

/// The read-only files below a drive's CoW layer (its base image and
/// frozen layers), opened once by a process that restores many children
/// of one snapshot: each child's stack reads through these descriptors
/// (see [`DiskStack::open_with`]), so a snapshot deleted meanwhile does not
/// fail it.
#[derive(Debug)]
pub struct OpenedLower {
    base: Option<File>,
    frozen: Vec<File>,
}

impl OpenedLower {
    /// Opens, read-only, the base and frozen layers `cfg` names.
    pub fn open(cfg: &DiskConfig) -> Result<OpenedLower, LayerError> {
        let open = |p: &PathBuf| File::open(p).map_err(io_err(p));
        Ok(OpenedLower {
            base: cfg.base.as_ref().map(open).transpose()?,
            frozen: cfg.frozen.iter().map(open).collect::<Result<_, _>>()?,
        })
    }
}

/// A descriptor of its own for a file opened ahead.
fn dup(file: &File, path: &Path) -> Result<File, LayerError> {
    file.try_clone().map_err(io_err(path))
}

impl DiskStack {
    /// Opens (and, for a missing CoW layer, creates) the stack `cfg` describes.
    pub fn open(cfg: &DiskConfig) -> Result<Self, LayerError> {
        Self::open_with(cfg, None)
    }

    /// [`DiskStack::open`], reading the base and frozen layers through
    /// `opened` when given (opened by [`OpenedLower::open`] from the same
    /// configuration; a drive that writes its base opens that itself).
    pub fn open_with(cfg: &DiskConfig, opened: Option<&OpenedLower>) -> Result<Self, LayerError> {
        let base_writable = !cfg.read_only && cfg.cow.is_none();
        if let Some(l) = opened {
            if l.frozen.len() != cfg.frozen.len() || l.base.is_some() != cfg.base.is_some() {
                return Err(LayerError::FrozenState {
                    path: cfg
                        .frozen
                        .first()
                        .or(cfg.base.as_ref())
                        .cloned()
                        .unwrap_or_default(),
                    reason: "the files opened ahead are not this drive's stack",
                });
            }
        }
        let base = match &cfg.base {
            Some(p) => {
                let ahead = opened
                    .and_then(|l| l.base.as_ref())
                    .filter(|_| !base_writable);
                let f = match ahead {
                    Some(f) => dup(f, p)?,
                    None => OpenOptions::new()
                        .read(true)
                        .write(base_writable)
                        .open(p)
                        .map_err(io_err(p))?,
                };
                let len = f.metadata().map_err(io_err(p))?.len();
                Some((p.clone(), f, len))
            }
            None => None,
        };
        let virtual_size = base.as_ref().map_or(cfg.size, |b| b.2);
        if !(512..=MAX_VIRTUAL_SIZE).contains(&virtual_size) {
            return Err(LayerError::Size(virtual_size));
        }
        let mut lower = Vec::new();
        let mut parent = 0u64;
        for (i, p) in cfg.frozen.iter().enumerate() {
            let l = match opened {
                Some(o) => Layer::from_file(p, dup(&o.frozen[i], p)?, false)?,
                None => Layer::open(p, false)?,
            };
            check_layer(&l, parent, virtual_size)?;
            if !l.frozen() {
                return Err(LayerError::FrozenState {
                    path: p.clone(),
                    reason:
                        "a lower layer must be frozen (it may still be some VM's writable layer)",
                });
            }
            parent = l.header.layer_id;
            lower.push(l);
        }
        let top = match &cfg.cow {
            Some(p) if cfg.read_only => {
                // A read-only drive may still read through its layer.
                let l = Layer::open(p, false)?;
                check_layer(&l, parent, virtual_size)?;
                Some(l)
            }
            Some(p) => {
                let l = match Layer::open(p, true) {
                    Err(LayerError::Io { source, .. })
                        if source.kind() == io::ErrorKind::NotFound =>
                    {
                        Layer::create(p, virtual_size, parent)?
                    }
                    other => other?,
                };
                check_layer(&l, parent, virtual_size)?;
                Some(l)
            }
            None => None,
        };
        Ok(DiskStack {
            base,
            base_writable,
            lower,
            top,
            virtual_size,
            read_only: cfg.read_only,
            quota: cfg.quota,
        })
    }

    /// The disk's size in bytes.
    pub fn size(&self) -> u64 {
        self.virtual_size
    }

    /// Whether writes are refused.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The most data its writable layer may hold, in bytes.
    pub fn quota(&self) -> Option<u64> {
        self.quota
    }

    /// The stack as a [`DiskConfig`] (paths of base and layers).
    pub fn config(&self) -> DiskConfig {
        DiskConfig {
            base: self.base.as_ref().map(|b| b.0.clone()),
            size: self.virtual_size,
            frozen: self.lower.iter().map(|l| l.path.clone()).collect(),
            cow: self.top.as_ref().map(|l| l.path.clone()),
            read_only: self.read_only,
            quota: self.quota,
        }
    }

    fn check(&self, offset: u64, len: usize) -> Result<(), LayerError> {
        let len = len as u64;
        match offset.checked_add(len) {
            Some(end) if end <= self.virtual_size => Ok(()),
            _ => Err(LayerError::OutOfRange {
                offset,
                len,
                size: self.virtual_size,
            }),
        }
    }

    /// Reads `buf.len()` bytes at `offset` through the stack.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), LayerError> {
        self.check(offset, buf.len())?;
        let cs = self.cluster_size();
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let in_cluster = (cs - pos % cs) as usize;
            let n = in_cluster.min(buf.len() - done);
            self.read_below(self.layers_top_down(), &mut buf[done..done + n], pos)?;
            done += n;
        }
        Ok(())
    }

    /// Layers from the top down.
    fn layers_top_down(&self) -> impl Iterator<Item = &Layer> + '_ {
        self.top.iter().chain(self.lower.iter().rev())
    }

    /// The cluster size the stack works in (the layers'; any power of two
    /// when there are none).
    fn cluster_size(&self) -> u64 {
        self.layers_top_down()
            .map(Layer::cluster_size)
            .min()
            .unwrap_or(u64::from(DEFAULT_CLUSTER_SIZE))
    }

    /// Reads a range within one cluster from the first of `layers` that
    /// holds it, else the base, else zeros.
    fn read_below<'a>(
        &'a self,
        layers: impl Iterator<Item = &'a Layer>,
        buf: &mut [u8],
        pos: u64,
    ) -> Result<(), LayerError> {
        for l in layers {
            let cs = l.cluster_size();
            let off = l.table[(pos / cs) as usize];
            if off != 0 {
                return l
                    .file
                    .read_exact_at(buf, off + pos % cs)
                    .map_err(io_err(&l.path));
            }
        }
        buf.fill(0);
        if let Some((path, f, len)) = &self.base {
            if pos < *len {
                let n = ((*len - pos) as usize).min(buf.len());
                f.read_exact_at(&mut buf[..n], pos).map_err(io_err(path))?;
            }
        }
        Ok(())
    }

    /// Writes `buf` at `offset` into the top layer (or the raw image of a
    /// writable drive without layers).
    pub fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<(), LayerError> {
        if self.read_only {
            return Err(LayerError::ReadOnly);
        }
        self.check(offset, buf.len())?;
        let Some(top) = &self.top else {
            let (path, f, _) = self.base.as_ref().ok_or(LayerError::ReadOnly)?;
            return f.write_all_at(buf, offset).map_err(io_err(path));
        };
        let cs = top.cluster_size();
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let n = ((cs - pos % cs) as usize).min(buf.len() - done);
            self.write_cluster(&buf[done..done + n], pos)?;
            done += n;
        }
        Ok(())
    }

    /// Writes within one cluster of the top layer, copying it up first if
    /// the top layer does not hold it yet.
    fn write_cluster(&mut self, data: &[u8], pos: u64) -> Result<(), LayerError> {
        let top = self.top.as_ref().expect("caller checked");
        let cs = top.cluster_size();
        let cluster = pos / cs;
        let held = top.table[cluster as usize];
        if held != 0 {
            return top
                .file
                .write_all_at(data, held + pos % cs)
                .map_err(io_err(&top.path));
        }
        if let Some(quota) = self.quota {
            if top.next_alloc - top.header.data_offset + cs > quota {
                return Err(LayerError::Quota {
                    path: top.path.clone(),
                    quota,
                });
            }
        }
        // Copy-up: the cluster's current content, merged with the write.
        let start = cluster * cs;
        let len = cs.min(self.virtual_size - start) as usize;
        let mut content = vec![0u8; cs as usize];
        if data.len() < len {
            self.read_below(self.lower.iter().rev(), &mut content[..len], start)?;
        }
        let at = (pos - start) as usize;
        content[at..at + data.len()].copy_from_slice(data);
        let top = self.top.as_mut().expect("caller checked");
        let off = top.next_alloc;
        top.file
            .write_all_at(&content, off)
            .map_err(io_err(&top.path))?;
        top.next_alloc += cs;
        top.table[cluster as usize] = off;
        top.dirty.insert(cluster);
        top.unsynced = true;
        Ok(())
    }

    /// Makes every completed write durable (fdatasync of data, then of the
    /// metadata pointing at it).
    pub fn flush(&mut self) -> Result<(), LayerError> {
        if let Some(top) = &mut self.top {
            return top.flush();
        }
        if let (true, Some((path, f, _))) = (self.base_writable, &self.base) {
            f.sync_data().map_err(io_err(path))?;
        }
        Ok(())
    }

    /// Freezes the top layer and continues on a new empty layer created at
    /// `new_top`. The frozen layer is never written again; it and the layers
    /// below it are the disk's state at this instant.
    pub fn freeze_top(&mut self, new_top: &Path) -> Result<Frozen, LayerError> {
        let Some(top) = &mut self.top else {
            return Err(LayerError::NothingToFreeze);
        };
        if self.read_only {
            return Err(LayerError::ReadOnly);
        }
        top.freeze()?;
        let next = Layer::create(new_top, self.virtual_size, top.header.layer_id)?;
        let old = self.top.replace(next).expect("checked above");
        let frozen = old.path.clone();
        // Keep reading it, now as a lower layer with a shared lock.
        lock_file(&old.file, &old.path, false)?;
        self.lower.push(old);
        let mut chain = self.config();
        chain.cow = None;
        Ok(Frozen { frozen, chain })
    }
}

fn check_layer(l: &Layer, parent: u64, virtual_size: u64) -> Result<(), LayerError> {
    if l.header.parent_id != parent {
        return Err(LayerError::WrongParent {
            path: l.path.clone(),
            expected: l.header.parent_id,
            found: parent,
        });
    }
    if l.header.virtual_size != virtual_size {
        return Err(LayerError::BadLayer {
            path: l.path.clone(),
            reason: format!(
                "it describes a {}-byte disk, the base is {virtual_size} bytes",
                l.header.virtual_size
            ),
        });
    }
    Ok(())
}

impl Drop for DiskStack {
    fn drop(&mut self) {
        // Closing a drive is a flush: what the guest wrote is kept.
        let _ = self.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "forkd-layers-{name}-{}-{:x}",
            std::process::id(),
            random_id()
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn base_image(dir: &Path, size: usize) -> PathBuf {
        let p = dir.join("base.img");
        let data: Vec<u8> = (0..size).map(|i| (i / 512) as u8 ^ 0x5a).collect();
        std::fs::write(&p, data).unwrap();
        p
    }

    fn read(s: &DiskStack, off: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        s.read_at(&mut b, off).unwrap();
        b
    }

    #[test]
    fn children_of_one_base_see_it_and_write_privately() {
        let dir = tmpdir("children");
        let base = base_image(&dir, 1 << 20);
        let orig = std::fs::read(&base).unwrap();
        let cfg = |n: &str| DiskConfig {
            base: Some(base.clone()),
            cow: Some(dir.join(n)),
            ..Default::default()
        };
        let mut a = DiskStack::open(&cfg("a.cow")).unwrap();
        let mut b = DiskStack::open(&cfg("b.cow")).unwrap();
        assert_eq!(a.size(), 1 << 20);
        assert_eq!(read(&a, 0, 1 << 20), orig);
        a.write_at(&[1u8; 100], 70_000).unwrap();
        b.write_at(&[2u8; 5000], 65_000).unwrap();
        // Each sees its own write over the base, around it the base.
        let ra = read(&a, 60_000, 20_000);
        assert_eq!(&ra[10_000..10_100], &[1u8; 100]);
        assert_eq!(&ra[..10_000], &orig[60_000..70_000]);
        assert_eq!(&ra[10_100..], &orig[70_100..80_000]);
        let rb = read(&b, 60_000, 20_000);
        assert_eq!(&rb[5_000..10_000], &[2u8; 5000]);
        assert_eq!(&rb[10_000..10_100], &orig[70_000..70_100]);
        a.flush().unwrap();
        drop((a, b));
        assert_eq!(
            std::fs::read(&base).unwrap(),
            orig,
            "the base is never written"
        );
        // Reopened, the writes are there.
        let a = DiskStack::open(&cfg("a.cow")).unwrap();
        assert_eq!(read(&a, 70_000, 100), vec![1u8; 100]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// Writes within clusters the layer holds go on; a write that needs a
    /// cluster past the quota fails, and the file stops growing, the
    /// refused write leaving nothing of itself behind.
    #[test]
    fn a_layer_at_its_quota_refuses_new_clusters_and_stops_growing() {
        let dir = tmpdir("quota");
        let base = base_image(&dir, 1 << 20);
        let cs = u64::from(DEFAULT_CLUSTER_SIZE);
        let cfg = DiskConfig {
            base: Some(base.clone()),
            cow: Some(dir.join("q.cow")),
            quota: Some(2 * cs + cs / 2),
            ..Default::default()
        };
        let mut s = DiskStack::open(&cfg).unwrap();
        s.write_at(&[7u8; 10], 0).unwrap();
        s.write_at(&[8u8; 10], 3 * cs).unwrap();
        let len = std::fs::metadata(dir.join("q.cow")).unwrap().len();
        let err = s.write_at(&[9u8; 10], 5 * cs).unwrap_err();
        assert!(
            matches!(err, LayerError::Quota { quota, .. } if quota == 2 * cs + cs / 2),
            "{err}"
        );
        assert_eq!(std::fs::metadata(dir.join("q.cow")).unwrap().len(), len);
        // Rewrites of held clusters are not new data.
        s.write_at(&[6u8; 10], 3 * cs + 100).unwrap();
        assert_eq!(read(&s, 5 * cs, 10), read_base(&base, 5 * cs, 10));
        s.flush().unwrap();
        drop(s);
        // Reopened, the quota counts what the layer holds already.
        let mut s = DiskStack::open(&cfg).unwrap();
        assert!(matches!(
            s.write_at(&[9u8; 1], 7 * cs),
            Err(LayerError::Quota { .. })
        ));
        assert_eq!(read(&s, 3 * cs + 100, 10), vec![6u8; 10]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn read_base(base: &Path, off: u64, len: usize) -> Vec<u8> {
        std::fs::read(base).unwrap()[off as usize..off as usize + len].to_vec()
    }

    #[test]
    fn frozen_layer_never_changes_and_children_fork_from_it() {
        let dir = tmpdir("freeze");
        let base = base_image(&dir, 256 << 10);
        let mut s = DiskStack::open(&DiskConfig {
            base: Some(base.clone()),
            cow: Some(dir.join("l1.cow")),
            ..Default::default()
        })
        .unwrap();
        s.write_at(&[7u8; 4096], 8192).unwrap();
        let f = s.freeze_top(&dir.join("l2.cow")).unwrap();
        assert_eq!(f.frozen, dir.join("l1.cow"));
        assert_eq!(f.chain.frozen, vec![dir.join("l1.cow")]);
        let frozen_bytes = std::fs::read(dir.join("l1.cow")).unwrap();
        // The source keeps running on l2.
        s.write_at(&[8u8; 4096], 8192).unwrap();
        s.write_at(&[9u8; 10], 200_000).unwrap();
        s.flush().unwrap();
        assert_eq!(read(&s, 8192, 4096), vec![8u8; 4096]);
        assert_eq!(std::fs::read(dir.join("l1.cow")).unwrap(), frozen_bytes);
        // A child forked from the freeze sees the state at the freeze.
        let mut child_cfg = f.chain.clone();
        child_cfg.cow = Some(dir.join("child.cow"));
        let mut c = DiskStack::open(&child_cfg).unwrap();
        assert_eq!(read(&c, 8192, 4096), vec![7u8; 4096]);
        c.write_at(&[1u8; 1], 8192).unwrap();
        assert_eq!(read(&c, 8192, 2), vec![1, 7]);
        drop(c);
        assert_eq!(std::fs::read(dir.join("l1.cow")).unwrap(), frozen_bytes);
        // A frozen layer is refused as a writable top; an unfrozen one as a lower layer.
        let err = DiskStack::open(&DiskConfig {
            base: Some(base.clone()),
            cow: Some(dir.join("l1.cow")),
            ..Default::default()
        })
        .unwrap_err();
        assert!(matches!(err, LayerError::FrozenState { .. }), "{err}");
        drop(s);
        let err = DiskStack::open(&DiskConfig {
            base: Some(base.clone()),
            frozen: vec![dir.join("l1.cow"), dir.join("l2.cow")],
            ..Default::default()
        })
        .unwrap_err();
        assert!(matches!(err, LayerError::FrozenState { .. }), "{err}");
        // Layers in the wrong order are refused.
        let err = DiskStack::open(&DiskConfig {
            base: Some(base),
            frozen: vec![],
            cow: Some(dir.join("l2.cow")),
            ..Default::default()
        })
        .unwrap_err();
        assert!(matches!(err, LayerError::WrongParent { .. }), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn one_writer_per_layer() {
        let dir = tmpdir("lock");
        let cfg = DiskConfig {
            size: 1 << 20,
            cow: Some(dir.join("x.cow")),
            ..Default::default()
        };
        let _a = DiskStack::open(&cfg).unwrap();
        assert!(matches!(DiskStack::open(&cfg), Err(LayerError::Locked(_))));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn read_only_and_bounds() {
        let dir = tmpdir("ro");
        let base = base_image(&dir, 64 << 10);
        let mut s = DiskStack::open(&DiskConfig {
            base: Some(base.clone()),
            read_only: true,
            ..Default::default()
        })
        .unwrap();
        assert!(matches!(s.write_at(&[0], 0), Err(LayerError::ReadOnly)));
        let mut b = [0u8; 2];
        assert!(matches!(
            s.read_at(&mut b, (64 << 10) - 1),
            Err(LayerError::OutOfRange { .. })
        ));
        assert!(matches!(
            s.read_at(&mut b, u64::MAX),
            Err(LayerError::OutOfRange { .. })
        ));
        assert!(matches!(
            s.freeze_top(&dir.join("n")),
            Err(LayerError::NothingToFreeze)
        ));
        // Raw writable drive: writes land in the image.
        let mut w = DiskStack::open(&DiskConfig {
            base: Some(base.clone()),
            ..Default::default()
        })
        .unwrap();
        w.write_at(b"hi", 10).unwrap();
        w.flush().unwrap();
        assert_eq!(&std::fs::read(&base).unwrap()[10..12], b"hi");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn damaged_layers_are_refused() {
        let dir = tmpdir("bad");
        let p = dir.join("l.cow");
        let cfg = DiskConfig {
            size: 1 << 20,
            cow: Some(p.clone()),
            ..Default::default()
        };
        let mut s = DiskStack::open(&cfg).unwrap();
        s.write_at(&[3u8; 10], 0).unwrap();
        drop(s);
        let good = std::fs::read(&p).unwrap();
        // Flipped header byte: checksum.
        let mut bad = good.clone();
        bad[30] ^= 1;
        std::fs::write(&p, &bad).unwrap();
        assert!(matches!(
            DiskStack::open(&cfg),
            Err(LayerError::BadLayer { .. })
        ));
        // Table entry pointing past the file.
        let mut bad = good.clone();
        bad[4096..4104].copy_from_slice(&(1u64 << 40).to_le_bytes());
        std::fs::write(&p, &bad).unwrap();
        assert!(matches!(
            DiskStack::open(&cfg),
            Err(LayerError::BadLayer { .. })
        ));
        // Truncated.
        std::fs::write(&p, &good[..100]).unwrap();
        assert!(matches!(
            DiskStack::open(&cfg),
            Err(LayerError::BadLayer { .. })
        ));
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// The child side of the crash test: writes generations into the layer
    /// and reports each one after its flush returned, until killed.
    #[test]
    #[ignore = "run by crash_loses_at_most_unflushed_writes in a child process"]
    fn crash_child() {
        let Ok(path) = std::env::var("FORKD_CRASH_LAYER") else {
            return;
        };
        let mut s = DiskStack::open(&DiskConfig {
            size: CRASH_DISK,
            cow: Some(PathBuf::from(path)),
            ..Default::default()
        })
        .unwrap();
        use std::io::Write;
        let mut out = std::io::stdout();
        for g in 1u64.. {
            // Generation g writes block g % N with a pattern naming g; every
            // third generation is flushed and reported.
            let blk = g % CRASH_BLOCKS;
            s.write_at(&pattern(g), blk * CRASH_BLOCK).unwrap();
            if g % 3 == 0 {
                s.flush().unwrap();
                writeln!(out, "flushed {g}").unwrap();
                out.flush().unwrap();
            }
        }
    }

    const CRASH_DISK: u64 = 8 << 20;
    const CRASH_BLOCK: u64 = 4096;
    const CRASH_BLOCKS: u64 = 64;

    fn pattern(g: u64) -> Vec<u8> {
        let mut v = vec![0u8; CRASH_BLOCK as usize];
        for (i, c) in v.chunks_exact_mut(8).enumerate() {
            c.copy_from_slice(&(g ^ ((i as u64) << 40)).to_le_bytes());
        }
        v
    }

    #[test]
    fn crash_loses_at_most_unflushed_writes() {
        use std::io::BufRead;
        let dir = tmpdir("crash");
        let layer = dir.join("crash.cow");
        let exe = std::env::current_exe().unwrap();
        let mut child = std::process::Command::new(exe)
            .args([
                "--exact",
                "devices::virtio::block::layers::tests::crash_child",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("FORKD_CRASH_LAYER", &layer)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let mut last_flushed = 0u64;
        while last_flushed < 300 {
            let line = lines.next().expect("child wrote progress").unwrap();
            if let Some(g) = line.strip_prefix("flushed ") {
                last_flushed = g.trim().parse().unwrap();
            }
        }
        // SIGKILL mid-stream: no destructor, no final flush.
        child.kill().unwrap();
        child.wait().unwrap();
        let s = DiskStack::open(&DiskConfig {
            size: CRASH_DISK,
            cow: Some(layer),
            ..Default::default()
        })
        .expect("the layer opens cleanly after a crash");
        for blk in 0..CRASH_BLOCKS {
            let got = read(&s, blk * CRASH_BLOCK, CRASH_BLOCK as usize);
            // The newest generation for this block that was flushed and reported.
            let flushed = (1..=last_flushed).rev().find(|g| g % CRASH_BLOCKS == blk);
            let g = u64::from_le_bytes(got[..8].try_into().unwrap());
            if g == 0 && got.iter().all(|&b| b == 0) {
                assert!(
                    flushed.is_none(),
                    "block {blk}: flushed generation {flushed:?} lost"
                );
                continue;
            }
            assert_eq!(got, pattern(g), "block {blk} holds a torn or foreign write");
            assert_eq!(
                g % CRASH_BLOCKS,
                blk,
                "block {blk} holds another block's data"
            );
            if let Some(f) = flushed {
                assert!(
                    g >= f,
                    "block {blk}: has generation {g}, but {f} was flushed"
                );
            }
        }
        std::fs::remove_dir_all(dir).unwrap();
    }
}
