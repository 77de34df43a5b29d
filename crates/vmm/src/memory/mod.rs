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

use std::fs::File;
use std::path::{Path, PathBuf};

use vm_memory::bitmap::{AtomicBitmap, NewBitmap};
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MmapRegion};

use crate::boot::layout;

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
                Some(open_memory_file(path, size)?),
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
