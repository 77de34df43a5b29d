//! Guest RAM and its three backends.
//!
//! | backend | mapping | used for |
//! | --- | --- | --- |
//! | [`Backend::Anonymous`] | private anonymous | a plain boot |
//! | [`Backend::Memfd`] | memfd, `MAP_SHARED` | a VM that may be live-BRANCHed (userfaultfd write-protect needs shmem) |
//! | [`Backend::HugeMemfd`] | memfd on hugetlbfs (2 MiB pages), `MAP_SHARED` | the same, with a write-protect arm 512x cheaper; needs reserved huge pages |
//! | [`Backend::File`] | a snapshot's memory file, `MAP_PRIVATE` | a restored child: page cache shared, writes private |
//!
//! Whatever the backend, RAM is laid out by [`layout::ram_ranges`]: one region
//! below the 32-bit MMIO gap and, for large guests, one above 4 GiB. A file
//! or memfd backs both regions back to back (low region at offset 0).
//!
//! A restored child whose RAM must be memfd (so it can be live-BRANCHed in
//! turn) gets a fresh memfd holding a copy of the snapshot's memory file
//! ([`GuestRam::copy_of_file`]): only the file's data extents are copied, so
//! its holes stay holes of the memfd (no memory used for never-touched RAM).

use std::fs::File;
use std::path::{Path, PathBuf};

use vm_memory::bitmap::{AtomicBitmap, NewBitmap};
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MmapRegion};

pub mod layout;
pub mod uffd;

/// Guest memory as the rest of the VMM sees it: regions mapped in this
/// process, every access bounds-checked by vm-memory, and every write the
/// VMM itself makes (devices filling buffers, rings) recorded in a dirty
/// bitmap per region, the complement of KVM's dirty log of guest writes.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<AtomicBitmap>;
/// One mapped region of guest memory.
pub type GuestRegionMmap = vm_memory::GuestRegionMmap<AtomicBitmap>;

/// Where guest RAM comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Backend {
    /// Private anonymous memory.
    Anonymous,
    /// A memfd mapped `MAP_SHARED`.
    Memfd,
    /// A memfd of 2 MiB hugetlbfs pages mapped `MAP_SHARED`.
    HugeMemfd,
    /// A file (a snapshot's `memory`) mapped `MAP_PRIVATE`.
    File(PathBuf),
}

impl Backend {
    /// Short name for status output: `anonymous`, `memfd` or `file`.
    pub fn kind(&self) -> &'static str {
        match self {
            Backend::Anonymous => "anonymous",
            Backend::Memfd => "memfd",
            Backend::HugeMemfd => "memfd-hugetlb",
            Backend::File(_) => "file",
        }
    }
}

/// Errors setting up guest RAM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Size out of range.
    #[error(
        "guest memory of {mib} MiB is out of range: choose between {} and {} MiB",
        layout::MIN_MEM_MIB,
        layout::MAX_MEM_MIB
    )]
    SizeOutOfRange {
        /// The size asked for.
        mib: u64,
    },
    /// memfd_create or ftruncate failed.
    #[error("cannot create a {mib} MiB memfd for guest memory: {source}")]
    Memfd {
        /// The size asked for.
        mib: u64,
        /// The OS error.
        source: std::io::Error,
    },
    /// Huge-page RAM must be a whole number of huge pages.
    #[error("guest memory on 2 MiB huge pages must be a multiple of 2 MiB, {mib} MiB is not")]
    HugeSize {
        /// The size asked for.
        mib: u64,
    },
    /// Not enough huge pages reserved.
    #[error(
        "cannot map {mib} MiB of guest memory on 2 MiB huge pages: {source}; reserve enough \
         (e.g. `echo {pages} > /proc/sys/vm/nr_hugepages` as root, more if other VMs use them)"
    )]
    HugePages {
        /// The size asked for.
        mib: u64,
        /// Huge pages it needs.
        pages: u64,
        /// The OS error.
        source: vm_memory::mmap::MmapRegionError,
    },
    /// The memory file could not be opened.
    #[error("cannot open guest memory file {path}: {source}")]
    OpenFile {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The memory file is not the size the VM needs.
    #[error(
        "guest memory file {path} holds {actual} bytes but the VM has {expected} bytes of RAM: \
         the file is truncated or belongs to another VM"
    )]
    FileSize {
        /// The file.
        path: PathBuf,
        /// Bytes in the file.
        actual: u64,
        /// Bytes the VM needs.
        expected: u64,
    },
    /// mmap failed.
    #[error("cannot map {len} bytes of guest memory: {source}")]
    Mmap {
        /// The size of the region.
        len: u64,
        /// vm-memory's error.
        source: vm_memory::mmap::MmapRegionError,
    },
    /// The regions do not form a valid guest memory.
    #[error("guest memory regions are invalid: {0}")]
    Regions(#[from] vm_memory::GuestRegionCollectionError),
    /// A memory file can be copied into memfd RAM only.
    #[error(
        "guest memory file {path} can be copied into memfd RAM only, not {backend} RAM: choose \
         memfd or memfd-hugetlb, or map the file itself"
    )]
    CopyBackend {
        /// The file.
        path: PathBuf,
        /// The backend asked for.
        backend: &'static str,
    },
    /// Copying the memory file into memfd RAM failed.
    #[error("cannot copy guest memory file {path} into memfd RAM: {source}")]
    Copy {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// A snapshot's memory file, opened (and its size checked) once: a fork
/// server's children map or copy it through this descriptor, so a
/// snapshot deleted meanwhile (or a directory a child may not open) does
/// not fail them.
#[derive(Debug)]
pub struct MemoryFile {
    /// Where it was opened (for messages and [`Backend::File`]).
    pub path: PathBuf,
    file: File,
}

impl MemoryFile {
    /// Opens the memory file at `path`, which must hold `size` bytes.
    pub fn open(path: &Path, size: u64) -> Result<MemoryFile, Error> {
        Ok(MemoryFile {
            path: path.to_owned(),
            file: open_memory_file(path, size)?,
        })
    }

    /// The memory file `file`, opened at `path` by the caller (who checked
    /// its size).
    pub fn from_open(path: PathBuf, file: File) -> MemoryFile {
        MemoryFile { path, file }
    }

    /// A descriptor of its own (for a mapping).
    fn dup(&self) -> Result<File, Error> {
        self.file.try_clone().map_err(|source| Error::OpenFile {
            path: self.path.clone(),
            source,
        })
    }
}

/// Guest RAM: the mapped regions and what backs them.
pub struct GuestRam {
    memory: GuestMemoryMmap,
    backend: Backend,
    /// The memfd or file behind the mapping, kept for snapshots and BRANCH.
    file: Option<File>,
    size: u64,
}

impl GuestRam {
    /// Maps `mib` MiB of guest RAM from `backend`.
    pub fn new(mib: u64, backend: Backend) -> Result<Self, Error> {
        Self::with_file(mib, backend, None)
    }

    /// Maps `mib` MiB of guest RAM from the open memory file `file`
    /// (`MAP_PRIVATE`, as [`Backend::File`]).
    pub fn map_file(mib: u64, file: &MemoryFile) -> Result<Self, Error> {
        let actual = file.file.metadata().map_or(0, |m| m.len());
        if actual != mib << 20 {
            return Err(Error::FileSize {
                path: file.path.clone(),
                actual,
                expected: mib << 20,
            });
        }
        Self::with_file(mib, Backend::File(file.path.clone()), Some(file.dup()?))
    }

    /// [`GuestRam::new`], a [`Backend::File`]'s file `opened` already.
    fn with_file(mib: u64, backend: Backend, opened: Option<File>) -> Result<Self, Error> {
        if !(layout::MIN_MEM_MIB..=layout::MAX_MEM_MIB).contains(&mib) {
            return Err(Error::SizeOutOfRange { mib });
        }
        let size = mib << 20;
        let (file, flags) = match &backend {
            Backend::Anonymous => (
                None,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            ),
            Backend::Memfd => (Some(create_memfd(size, mib, false)?), libc::MAP_SHARED),
            Backend::HugeMemfd => {
                if size % HUGE_PAGE != 0 {
                    return Err(Error::HugeSize { mib });
                }
                (Some(create_memfd(size, mib, true)?), libc::MAP_SHARED)
            }
            Backend::File(path) => (
                Some(match opened {
                    Some(f) => f,
                    None => open_memory_file(path, size)?,
                }),
                libc::MAP_PRIVATE | libc::MAP_NORESERVE,
            ),
        };
        let mut regions = Vec::new();
        let mut file_offset = 0u64;
        for (start, len) in layout::ram_ranges(size) {
            let bitmap = AtomicBitmap::with_len(len as usize);
            let mut builder =
                vm_memory::mmap::MmapRegionBuilder::new_with_bitmap(len as usize, bitmap)
                    .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                    .with_mmap_flags(flags);
            if let Some(f) = &file {
                let clone = f
                    .try_clone()
                    .map_err(|source| Error::Memfd { mib, source })?;
                builder = builder.with_file_offset(FileOffset::new(clone, file_offset));
            }
            let mapping: MmapRegion<AtomicBitmap> = builder.build().map_err(|source| {
                if backend == Backend::HugeMemfd {
                    Error::HugePages {
                        mib,
                        pages: size / HUGE_PAGE,
                        source,
                    }
                } else {
                    Error::Mmap { len, source }
                }
            })?;
            regions.push(
                GuestRegionMmap::new(mapping, GuestAddress(start))
                    .expect("guest RAM ranges end below 2^64"),
            );
            file_offset += len;
        }
        Ok(GuestRam {
            memory: GuestMemoryMmap::from_regions(regions)?,
            backend,
            file,
            size,
        })
    }

    /// Maps `mib` MiB of fresh memfd RAM (`backend`: [`Backend::Memfd`] or
    /// [`Backend::HugeMemfd`]) holding a copy of the memory file at `path`
    /// (a snapshot's `memory`: regions back to back, as this type lays them
    /// out). Only the file's data extents are copied (SEEK_DATA/SEEK_HOLE):
    /// its holes stay memfd holes, which read as zero and use no memory.
    ///
    /// Shmem memfds are filled with `sendfile(2)` (page cache to memfd in
    /// the kernel; `copy_file_range(2)` refuses to cross file systems),
    /// huge-page memfds, which take no `write`, by reading into the mapping.
    /// Neither goes through the dirty bitmap of [`GuestRam::take_vmm_dirty`]
    /// nor, the VM not existing yet, KVM's dirty log: a diff BRANCH of the
    /// machine holds only what changed after the copy.
    pub fn copy_of_file(mib: u64, backend: Backend, path: &Path) -> Result<Self, Error> {
        Self::copy_of(mib, backend, &MemoryFile::open(path, mib << 20)?)
    }

    /// [`GuestRam::copy_of_file`] from the open memory file `file`.
    pub fn copy_of(mib: u64, backend: Backend, file: &MemoryFile) -> Result<Self, Error> {
        let path = &file.path;
        if !matches!(backend, Backend::Memfd | Backend::HugeMemfd) {
            return Err(Error::CopyBackend {
                path: path.to_owned(),
                backend: backend.kind(),
            });
        }
        let src = file.dup()?;
        let ram = GuestRam::new(mib, backend)?;
        let copy_err = |source| Error::Copy {
            path: path.to_owned(),
            source,
        };
        let size = ram.size;
        let extents: Vec<(u64, u64)> = data_extents(&src)
            .map_err(copy_err)?
            .into_iter()
            .filter(|&(start, _)| start < size)
            .map(|(start, end)| (start, end.min(size)))
            .collect();
        let copied = match ram.backend {
            Backend::Memfd => {
                let memfd = ram.file.as_ref().expect("memfd RAM has its memfd");
                match sendfile_extents(&src, memfd, &extents) {
                    // A kernel whose shmem takes no splice: copy by hand.
                    Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS)) => {
                        ram.read_extents_into(&src, &extents)
                    }
                    other => other,
                }
            }
            _ => ram.read_extents_into(&src, &extents),
        };
        copied.map_err(copy_err)?;
        Ok(ram)
    }

    /// Reads the file ranges `extents` of `src` straight into the mapped
    /// regions at the same offsets of the RAM layout. Only for RAM that no
    /// VM, vCPU or device uses yet (see the SAFETY note).
    fn read_extents_into(&self, src: &File, extents: &[(u64, u64)]) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        let mut region_offset = 0u64;
        for region in self.memory.iter() {
            let len = region.len();
            let (lo, hi) = (region_offset, region_offset + len);
            // SAFETY: the region is a live mapping of `len` bytes owned by
            // `self`; the machine does not exist yet (no vCPU, no device, no
            // KVM memory slot), so nothing else reads or writes it while this
            // exclusive view exists.
            let bytes = unsafe { std::slice::from_raw_parts_mut(region.as_ptr(), len as usize) };
            for &(start, end) in extents {
                let (start, end) = (start.max(lo), end.min(hi));
                let mut at = start;
                while at < end {
                    let n = (end - at).min(COPY_CHUNK);
                    let from = (at - lo) as usize;
                    src.read_exact_at(&mut bytes[from..from + n as usize], at)?;
                    at += n;
                }
            }
            region_offset = hi;
        }
        Ok(())
    }

    /// The mapped guest memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// What backs the memory.
    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    /// The memfd or file behind the mapping, if any.
    pub fn file(&self) -> Option<&File> {
        self.file.as_ref()
    }

    /// Total RAM in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Pages the VMM itself wrote since the last call (devices filling
    /// guest buffers and rings), one bitmap per region, and clears them.
    pub fn take_vmm_dirty(&self) -> Vec<Vec<u64>> {
        self.memory
            .iter()
            .map(|r| r.get_mmap().bitmap().get_and_reset())
            .collect()
    }

    /// Maps every page of RAM into this process's page tables now, without
    /// writing any (`MADV_POPULATE_READ`): a copy-on-write mapping of a
    /// snapshot's memory file gets the page cache's pages (holes read as
    /// zero pages), so a later full read of RAM (a snapshot) takes no page
    /// faults. Pages the guest wrote stay its own. On a kernel without
    /// `MADV_POPULATE_READ` (before 5.14) each page is read once instead.
    /// Returns how long it took.
    pub fn populate_read(&self) -> std::io::Result<std::time::Duration> {
        let started = std::time::Instant::now();
        for (_, host, len) in self.slots() {
            // SAFETY: `host..host + len` is one of this RAM's live mappings;
            // MADV_POPULATE_READ only faults pages in for reading (it never
            // changes their contents or the mapping).
            let rc = unsafe {
                libc::madvise(
                    host as *mut libc::c_void,
                    len as usize,
                    libc::MADV_POPULATE_READ,
                )
            };
            if rc == 0 {
                continue;
            }
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINVAL) {
                return Err(e);
            }
            for offset in (0..len).step_by(uffd::PAGE_SIZE as usize) {
                // SAFETY: inside the live mapping; a volatile read of one
                // byte faults the page in and is not optimised away.
                unsafe { std::ptr::read_volatile((host + offset) as *const u8) };
            }
        }
        Ok(started.elapsed())
    }

    /// `(guest address, host address, length)` of every region, in order,
    /// for registering KVM memory slots.
    pub fn slots(&self) -> Vec<(u64, u64, u64)> {
        self.memory
            .iter()
            .map(|r| (r.start_addr().0, r.as_ptr() as u64, r.len()))
            .collect()
    }
}

/// Size of a hugetlbfs page of [`Backend::HugeMemfd`].
pub const HUGE_PAGE: u64 = 2 << 20;
/// Longest single read or `sendfile` of a memory-file copy.
const COPY_CHUNK: u64 = 64 << 20;

/// The `(start, end)` byte ranges of `file` that hold data (everything
/// else is a hole, which reads as zero), from SEEK_DATA/SEEK_HOLE.
pub fn data_extents(file: &File) -> std::io::Result<Vec<(u64, u64)>> {
    use std::os::fd::AsRawFd;
    let len = file.metadata()?.len();
    let seek = |pos: u64, whence: libc::c_int| -> std::io::Result<Option<u64>> {
        // SAFETY: lseek on an open descriptor has no memory-safety preconditions.
        let r = unsafe { libc::lseek(file.as_raw_fd(), pos as libc::off_t, whence) };
        if r >= 0 {
            return Ok(Some(r as u64));
        }
        match std::io::Error::last_os_error() {
            // ENXIO: only a hole is left past `pos`.
            e if e.raw_os_error() == Some(libc::ENXIO) => Ok(None),
            e => Err(e),
        }
    };
    let mut extents = Vec::new();
    let mut pos = 0u64;
    while pos < len {
        let Some(start) = seek(pos, libc::SEEK_DATA)? else {
            break;
        };
        if start >= len {
            break;
        }
        let end = seek(start, libc::SEEK_HOLE)?.unwrap_or(len).min(len);
        extents.push((start, end));
        pos = end;
    }
    Ok(extents)
}

/// Copies the byte ranges `extents` of `src` to the same offsets of `dst`
/// with `sendfile(2)`, which writes at `dst`'s file position.
fn sendfile_extents(src: &File, dst: &File, extents: &[(u64, u64)]) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    for &(start, end) in extents {
        // SAFETY: lseek on an open descriptor has no memory-safety preconditions.
        if unsafe { libc::lseek(dst.as_raw_fd(), start as libc::off_t, libc::SEEK_SET) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut offset = start as libc::off_t;
        while (offset as u64) < end {
            let n = (end - offset as u64).min(COPY_CHUNK) as usize;
            // SAFETY: both descriptors are open; `offset` is a valid
            // off_t the kernel reads and advances.
            let sent = unsafe { libc::sendfile(dst.as_raw_fd(), src.as_raw_fd(), &mut offset, n) };
            match sent {
                0 => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the file shrank while it was copied",
                    ))
                }
                n if n > 0 => {}
                _ => {
                    let e = std::io::Error::last_os_error();
                    if e.kind() != std::io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
            }
        }
    }
    Ok(())
}

fn create_memfd(size: u64, mib: u64, huge: bool) -> Result<File, Error> {
    use std::os::fd::FromRawFd;
    let name = c"forkd-guest-ram";
    let flags = if huge {
        // 2 MiB pages: log2(2 MiB) in the MFD_HUGE_SHIFT field.
        libc::MFD_CLOEXEC | libc::MFD_HUGETLB | (21 << libc::MFD_HUGE_SHIFT)
    } else {
        libc::MFD_CLOEXEC
    };
    // SAFETY: `name` is a valid NUL-terminated string; the return value is checked.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), flags as libc::c_uint) };
    if fd < 0 {
        return Err(Error::Memfd {
            mib,
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: `fd` was just returned by memfd_create and nothing else owns it.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)
        .map_err(|source| Error::Memfd { mib, source })?;
    Ok(file)
}

fn open_memory_file(path: &Path, size: u64) -> Result<File, Error> {
    let file = File::open(path).map_err(|source| Error::OpenFile {
        path: path.to_owned(),
        source,
    })?;
    let actual = file
        .metadata()
        .map_err(|source| Error::OpenFile {
            path: path.to_owned(),
            source,
        })?
        .len();
    if actual != size {
        return Err(Error::FileSize {
            path: path.to_owned(),
            actual,
            expected: size,
        });
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use vm_memory::Bytes;

    #[test]
    fn sizes_out_of_range_are_refused() {
        for mib in [0, layout::MIN_MEM_MIB - 1, layout::MAX_MEM_MIB + 1] {
            let err = GuestRam::new(mib, Backend::Anonymous).err().unwrap();
            assert!(matches!(err, Error::SizeOutOfRange { .. }), "{err}");
            assert!(err.to_string().contains("MiB"));
        }
    }

    #[test]
    fn anonymous_ram_is_readable_and_writable() {
        let ram = GuestRam::new(16, Backend::Anonymous).unwrap();
        ram.memory()
            .write_obj(0xdead_beefu32, GuestAddress(0x1000))
            .unwrap();
        assert_eq!(
            ram.memory().read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
            0xdead_beef
        );
        assert!(ram
            .memory()
            .read_obj::<u32>(GuestAddress(16 << 20))
            .is_err());
        assert_eq!(ram.slots().len(), 1);
    }

    #[test]
    fn large_ram_has_two_regions_around_the_gap() {
        // NORESERVE anonymous mappings cost nothing until touched.
        let ram = GuestRam::new(4096, Backend::Anonymous).unwrap();
        let slots = ram.slots();
        assert_eq!(slots.len(), 2);
        assert_eq!((slots[0].0, slots[0].2), (0, layout::MMIO_GAP_START));
        assert_eq!(slots[1].0, layout::MMIO_GAP_END);
        assert!(ram
            .memory()
            .read_obj::<u8>(GuestAddress(layout::MMIO_GAP_START))
            .is_err());
        ram.memory()
            .write_obj(7u8, GuestAddress(layout::MMIO_GAP_END))
            .unwrap();
    }

    #[test]
    fn memfd_ram_writes_reach_the_memfd() {
        use std::os::unix::fs::FileExt;
        let ram = GuestRam::new(16, Backend::Memfd).unwrap();
        ram.memory()
            .write_obj(0x1234_5678u32, GuestAddress(0x2000))
            .unwrap();
        let mut buf = [0u8; 4];
        ram.file().unwrap().read_exact_at(&mut buf, 0x2000).unwrap();
        assert_eq!(u32::from_le_bytes(buf), 0x1234_5678);
    }

    #[test]
    fn file_ram_is_copy_on_write() {
        use std::os::unix::fs::FileExt;
        let dir = std::env::temp_dir().join(format!("forkd-mem-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("memory");
        let mut f = File::create(&path).unwrap();
        f.set_len(16 << 20).unwrap();
        f.write_all_at(&[0xaa; 8], 0x3000).unwrap();
        f.flush().unwrap();
        let ram = GuestRam::new(16, Backend::File(path.clone())).unwrap();
        assert_eq!(
            ram.memory().read_obj::<u8>(GuestAddress(0x3000)).unwrap(),
            0xaa
        );
        ram.memory()
            .write_obj(0x55u8, GuestAddress(0x3000))
            .unwrap();
        let mut buf = [0u8; 1];
        File::open(&path)
            .unwrap()
            .read_exact_at(&mut buf, 0x3000)
            .unwrap();
        assert_eq!(buf[0], 0xaa, "a private mapping must not write through");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn free_huge_pages() -> u64 {
        let info = std::fs::read_to_string("/proc/meminfo").unwrap();
        info.lines()
            .find_map(|l| l.strip_prefix("HugePages_Free:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }

    #[test]
    fn huge_page_ram_beyond_the_reserve_is_refused_with_what_to_do() {
        // One more huge page than are free: the mapping's reservation fails.
        let mib = (free_huge_pages() + 1) * 2;
        let err = GuestRam::new(mib.max(layout::MIN_MEM_MIB), Backend::HugeMemfd)
            .err()
            .unwrap();
        assert!(matches!(err, Error::HugePages { .. }), "{err}");
        assert!(err.to_string().contains("nr_hugepages"), "{err}");
        let err = GuestRam::new(9, Backend::HugeMemfd).err().unwrap();
        assert!(matches!(err, Error::HugeSize { mib: 9 }), "{err}");
    }

    /// A sparse 4 GiB memory file (both regions) with data in the low
    /// region, across the region boundary in the file, and at the end.
    fn sparse_memory_file(dir: &Path) -> (PathBuf, Vec<(u64, Vec<u8>)>) {
        use std::os::unix::fs::FileExt;
        let path = dir.join("memory");
        let f = File::create(&path).unwrap();
        f.set_len(4 << 30).unwrap();
        let low = layout::MMIO_GAP_START;
        let writes: Vec<(u64, Vec<u8>)> = vec![
            (0x5000, vec![0x11; 4096]),
            (8 << 20, (0..3 << 20).map(|i| (i % 253) as u8).collect()),
            (low - 4096, vec![0x22; 8192]),
            ((4 << 30) - 4096, vec![0x33; 4096]),
        ];
        for (off, bytes) in &writes {
            f.write_all_at(bytes, *off).unwrap();
        }
        (path, writes)
    }

    /// Checks that `ram` holds `writes` (file offsets) and zero elsewhere
    /// around them, and that its memfd kept the file's holes.
    fn check_copy(ram: &GuestRam, writes: &[(u64, Vec<u8>)]) {
        use std::os::unix::fs::MetadataExt;
        let low = layout::MMIO_GAP_START;
        let guest = |off: u64| {
            if off < low {
                off
            } else {
                off - low + layout::MMIO_GAP_END
            }
        };
        for (off, bytes) in writes {
            let mut got = vec![0u8; bytes.len()];
            // Split where the file crosses from the low region to the high one.
            let split = (low.saturating_sub(*off) as usize).min(got.len());
            let (a, b) = got.split_at_mut(split);
            ram.memory()
                .read_slice(a, GuestAddress(guest(*off)))
                .unwrap();
            ram.memory()
                .read_slice(b, GuestAddress(guest(off + split as u64)))
                .unwrap();
            assert_eq!(&got, bytes, "at file offset {off:#x}");
        }
        assert_eq!(
            ram.memory().read_obj::<u64>(GuestAddress(0x4ff8)).unwrap(),
            0
        );
        // Holes stay holes: a few MiB of the 4 GiB are allocated.
        let memfd = ram.file().unwrap();
        assert!(memfd.metadata().unwrap().blocks() * 512 < 16 << 20);
        assert!(ram.take_vmm_dirty().iter().flatten().all(|&w| w == 0));
    }

    #[test]
    fn a_memory_file_copied_into_memfd_ram_keeps_content_and_holes() {
        let dir = std::env::temp_dir().join(format!("forkd-mem-copy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (path, writes) = sparse_memory_file(&dir);
        let ram = GuestRam::copy_of_file(4096, Backend::Memfd, &path).unwrap();
        assert_eq!(ram.backend(), &Backend::Memfd);
        assert_eq!(ram.slots().len(), 2);
        check_copy(&ram, &writes);
        // A copy, not a mapping: writes stay in the memfd.
        ram.memory()
            .write_obj(0x77u8, GuestAddress(0x5000))
            .unwrap();
        let mut buf = [0u8; 1];
        use std::os::unix::fs::FileExt;
        File::open(&path)
            .unwrap()
            .read_exact_at(&mut buf, 0x5000)
            .unwrap();
        assert_eq!(buf[0], 0x11);

        // The path huge-page RAM takes (reads into the mapping), on shmem.
        let ram = GuestRam::new(4096, Backend::Memfd).unwrap();
        let src = File::open(&path).unwrap();
        ram.read_extents_into(&src, &data_extents(&src).unwrap())
            .unwrap();
        check_copy(&ram, &writes);

        let err = GuestRam::copy_of_file(4096, Backend::Anonymous, &path)
            .err()
            .unwrap();
        assert!(err.to_string().contains("memfd"), "{err}");
        let err = GuestRam::copy_of_file(2048, Backend::Memfd, &path)
            .err()
            .unwrap();
        assert!(matches!(err, Error::FileSize { .. }), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn truncated_memory_file_is_refused() {
        let dir = std::env::temp_dir().join(format!("forkd-mem-trunc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("memory");
        File::create(&path).unwrap().set_len(8 << 20).unwrap();
        let err = GuestRam::new(16, Backend::File(path)).err().unwrap();
        assert!(err.to_string().contains("truncated"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
