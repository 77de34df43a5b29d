//! A small userfaultfd wrapper for write-protect tracking (live BRANCH).
//!
//! Only what live BRANCH needs: open a userfaultfd with the write-protect
//! features for shmem (memfd `MAP_SHARED` guest RAM), register ranges in
//! write-protect mode, set or clear write protection, wake blocked writers,
//! and read write-protect faults without blocking.
//!
//! The structures and ioctl numbers mirror the kernel UAPI header
//! `linux/userfaultfd.h`. The numbers are built here with the `_IOR`/`_IOWR`
//! encoding of `asm-generic/ioctl.h` (direction in bits 30-31, argument size
//! in bits 16-29, type `0xAA` in bits 8-15, command number in bits 0-7); a
//! unit test checks them against the literal values and another against the
//! installed C header compiled with gcc.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

/// Size of a host page; write protection works at this granularity.
pub const PAGE_SIZE: u64 = 4096;

/// `UFFD_API`: the only API version.
const UFFD_API: u64 = 0xAA;
/// `UFFDIO`: the ioctl type byte.
const UFFDIO: u32 = 0xAA;

const IOC_WRITE: u32 = 1;
const IOC_READ: u32 = 2;

/// `_IOC(dir, type, nr, size)` from `asm-generic/ioctl.h`.
const fn ioc(dir: u32, nr: u32, size: usize) -> u32 {
    (dir << 30) | ((size as u32) << 16) | (UFFDIO << 8) | nr
}

// Command numbers (`_UFFDIO_*`) from linux/userfaultfd.h.
const NR_REGISTER: u32 = 0x00;
const NR_UNREGISTER: u32 = 0x01;
const NR_WAKE: u32 = 0x02;
const NR_WRITEPROTECT: u32 = 0x06;
const NR_API: u32 = 0x3F;

/// `UFFDIO_API = _IOWR(UFFDIO, 0x3F, struct uffdio_api)` = 0xC018AA3F.
const UFFDIO_API: u32 = ioc(IOC_READ | IOC_WRITE, NR_API, size_of::<UffdioApi>());
/// `UFFDIO_REGISTER = _IOWR(UFFDIO, 0x00, struct uffdio_register)` = 0xC020AA00.
const UFFDIO_REGISTER: u32 = ioc(
    IOC_READ | IOC_WRITE,
    NR_REGISTER,
    size_of::<UffdioRegister>(),
);
/// `UFFDIO_UNREGISTER = _IOR(UFFDIO, 0x01, struct uffdio_range)` = 0x8010AA01.
const UFFDIO_UNREGISTER: u32 = ioc(IOC_READ, NR_UNREGISTER, size_of::<UffdioRange>());
/// `UFFDIO_WAKE = _IOR(UFFDIO, 0x02, struct uffdio_range)` = 0x8010AA02.
const UFFDIO_WAKE: u32 = ioc(IOC_READ, NR_WAKE, size_of::<UffdioRange>());
/// `UFFDIO_WRITEPROTECT = _IOWR(UFFDIO, 0x06, struct uffdio_writeprotect)` = 0xC018AA06.
const UFFDIO_WRITEPROTECT: u32 = ioc(
    IOC_READ | IOC_WRITE,
    NR_WRITEPROTECT,
    size_of::<UffdioWriteprotect>(),
);

/// `UFFD_FEATURE_PAGEFAULT_FLAG_WP` (Linux 5.7): write-protect on anonymous memory.
pub const FEATURE_PAGEFAULT_FLAG_WP: u64 = 1 << 0;
/// `UFFD_FEATURE_WP_HUGETLBFS_SHMEM` (Linux 5.19): write-protect on shmem and hugetlbfs.
pub const FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
/// `UFFD_FEATURE_WP_UNPOPULATED` (Linux 6.4): protect never-touched pages too.
pub const FEATURE_WP_UNPOPULATED: u64 = 1 << 13;

const REGISTER_MODE_WP: u64 = 1 << 1;
const WRITEPROTECT_MODE_WP: u64 = 1 << 0;
const WRITEPROTECT_MODE_DONTWAKE: u64 = 1 << 1;
const EVENT_PAGEFAULT: u8 = 0x12;
const PAGEFAULT_FLAG_WRITE: u64 = 1 << 0;
const PAGEFAULT_FLAG_WP: u64 = 1 << 1;

/// `struct uffdio_api`.
#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

/// `struct uffdio_range`.
#[repr(C)]
struct UffdioRange {
    start: u64,
    len: u64,
}

/// `struct uffdio_register`.
#[repr(C)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

/// `struct uffdio_writeprotect`.
#[repr(C)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

/// `struct uffd_msg` (packed, 32 bytes), as far as a page fault needs:
/// event, 7 reserved bytes, then `arg.pagefault.{flags, address, ptid}`.
#[repr(C)]
#[derive(Clone, Copy)]
struct UffdMsg {
    event: u8,
    reserved: [u8; 7],
    flags: u64,
    address: u64,
    tail: u64,
}

/// Errors from userfaultfd, each naming what the kernel refused.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The userfaultfd(2) system call failed.
    #[error(
        "userfaultfd(2) failed: {0}; unprivileged processes need \
         sysctl vm.unprivileged_userfaultfd=1 or CAP_SYS_PTRACE, and the kernel needs \
         CONFIG_USERFAULTFD"
    )]
    Open(#[source] io::Error),
    /// UFFDIO_API failed outright.
    #[error("UFFDIO_API handshake failed: {0}")]
    Api(#[source] io::Error),
    /// The kernel lacks a feature live BRANCH needs.
    #[error(
        "the kernel does not offer userfaultfd write-protect on shmem/memfd memory \
         (needs features {missing:#x}, kernel offers {offered:#x}): live BRANCH needs \
         Linux 5.19 or newer built with CONFIG_PTE_MARKER_UFFD_WP; use a full or diff \
         BRANCH on this host"
    )]
    MissingFeatures {
        /// Feature bits asked for but not offered.
        missing: u64,
        /// Feature bits the kernel offers.
        offered: u64,
    },
    /// UFFDIO_REGISTER failed.
    #[error(
        "UFFDIO_REGISTER in write-protect mode refused for {len:#x} bytes at {addr:#x}: \
         {source}; the range must be page aligned, fully mapped, and shmem (memfd \
         MAP_SHARED) or anonymous memory not registered with another userfaultfd"
    )]
    Register {
        /// Start of the range.
        addr: u64,
        /// Length of the range.
        len: u64,
        /// The OS error.
        source: io::Error,
    },
    /// Registration succeeded but the range cannot be write-protected.
    #[error(
        "the kernel registered {len:#x} bytes at {addr:#x} but offers no \
         UFFDIO_WRITEPROTECT on it (ioctls {ioctls:#x}): this memory type does not \
         support write-protect on this kernel"
    )]
    NoWriteProtect {
        /// Start of the range.
        addr: u64,
        /// Length of the range.
        len: u64,
        /// The ioctls the kernel offers on the range.
        ioctls: u64,
    },
    /// UFFDIO_UNREGISTER failed.
    #[error("UFFDIO_UNREGISTER of {len:#x} bytes at {addr:#x} failed: {source}")]
    Unregister {
        /// Start of the range.
        addr: u64,
        /// Length of the range.
        len: u64,
        /// The OS error.
        source: io::Error,
    },
    /// UFFDIO_WRITEPROTECT failed.
    #[error(
        "UFFDIO_WRITEPROTECT ({}) of {len:#x} bytes at {addr:#x} failed: {source}; \
         the range must be page aligned and registered in write-protect mode",
        if *on { "protect" } else { "unprotect" }
    )]
    WriteProtect {
        /// Start of the range.
        addr: u64,
        /// Length of the range.
        len: u64,
        /// Protecting (true) or releasing (false).
        on: bool,
        /// The OS error.
        source: io::Error,
    },
    /// UFFDIO_WAKE failed.
    #[error("UFFDIO_WAKE of {len:#x} bytes at {addr:#x} failed: {source}")]
    Wake {
        /// Start of the range.
        addr: u64,
        /// Length of the range.
        len: u64,
        /// The OS error.
        source: io::Error,
    },
    /// Reading the userfaultfd failed.
    #[error("reading userfaultfd events failed: {0}")]
    Read(#[source] io::Error),
    /// An event other than a page fault arrived (none is enabled).
    #[error("unexpected userfaultfd event {0:#x}: only page faults are enabled")]
    UnexpectedEvent(u8),
}

/// A write-protect fault reported by the kernel: a thread wrote to a
/// protected page and sleeps until the page is released.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WpFault {
    /// Page-aligned address of the faulting page.
    pub addr: u64,
    /// The fault was a write (always, for write-protect faults).
    pub write: bool,
    /// The fault was caused by write protection (not a missing page).
    pub wp: bool,
}

/// An open userfaultfd, non-blocking, with the write-protect features for
/// shmem negotiated. Closing it (drop) unregisters every range and wakes
/// every blocked thread.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
    features: u64,
}

/// Issues a userfaultfd ioctl on `fd` with `arg`.
///
/// # Safety
/// `req` must be an ioctl whose argument is a `T` the kernel reads and/or
/// writes in place.
unsafe fn uffd_ioctl<T>(fd: RawFd, req: u32, arg: &mut T) -> io::Result<()> {
    // SAFETY: the caller guarantees `req` takes a pointer to a `T`; `arg`
    // is a valid, exclusive reference for the duration of the call.
    let rc = unsafe { libc::ioctl(fd, req as libc::c_ulong, arg as *mut T) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn open_raw() -> Result<OwnedFd, Error> {
    // SAFETY: userfaultfd takes only flags; the result is checked.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
    if fd < 0 {
        return Err(Error::Open(io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

fn handshake(fd: &OwnedFd, features: u64) -> io::Result<UffdioApi> {
    let mut api = UffdioApi {
        api: UFFD_API,
        features,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API takes a `struct uffdio_api`, mirrored by `UffdioApi`.
    unsafe { uffd_ioctl(fd.as_raw_fd(), UFFDIO_API, &mut api) }?;
    Ok(api)
}

impl Uffd {
    /// Features required for write-protect on memfd (shmem) memory.
    pub const REQUIRED_FEATURES: u64 = FEATURE_PAGEFAULT_FLAG_WP | FEATURE_WP_HUGETLBFS_SHMEM;

    /// Opens a userfaultfd (`O_CLOEXEC | O_NONBLOCK`) and negotiates
    /// write-protect on shmem, plus `WP_UNPOPULATED` when offered. Fails
    /// with [`Error::MissingFeatures`] on a kernel that cannot write-protect
    /// shmem.
    pub fn new() -> Result<Uffd, Error> {
        // Ask what the kernel offers first: a refused UFFDIO_API says
        // nothing about which feature was missing.
        let probe = open_raw()?;
        let offered = handshake(&probe, 0).map_err(Error::Api)?.features;
        drop(probe);
        let missing = Self::REQUIRED_FEATURES & !offered;
        if missing != 0 {
            return Err(Error::MissingFeatures { missing, offered });
        }
        let features = Self::REQUIRED_FEATURES | (offered & FEATURE_WP_UNPOPULATED);
        let fd = open_raw()?;
        let api = handshake(&fd, features).map_err(Error::Api)?;
        if api.ioctls & (1 << NR_REGISTER) == 0 {
            return Err(Error::Api(io::Error::other(format!(
                "the kernel offers no UFFDIO_REGISTER (ioctls {:#x})",
                api.ioctls
            ))));
        }
        Ok(Uffd { fd, features })
    }

    /// The negotiated feature bits.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// Registers `[addr, addr + len)` in write-protect mode. Nothing is
    /// protected until [`Uffd::write_protect`].
    pub fn register_wp(&self, addr: u64, len: u64) -> Result<(), Error> {
        let mut reg = UffdioRegister {
            range: UffdioRange { start: addr, len },
            mode: REGISTER_MODE_WP,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER takes a `struct uffdio_register`, mirrored
        // by `UffdioRegister`; registering does not touch the memory.
        unsafe { uffd_ioctl(self.fd.as_raw_fd(), UFFDIO_REGISTER, &mut reg) }
            .map_err(|source| Error::Register { addr, len, source })?;
        if reg.ioctls & (1 << NR_WRITEPROTECT) == 0 {
            let _ = self.unregister(addr, len);
            return Err(Error::NoWriteProtect {
                addr,
                len,
                ioctls: reg.ioctls,
            });
        }
        Ok(())
    }

    /// Unregisters `[addr, addr + len)`, waking any thread blocked on it.
    pub fn unregister(&self, addr: u64, len: u64) -> Result<(), Error> {
        let mut range = UffdioRange { start: addr, len };
        // SAFETY: UFFDIO_UNREGISTER takes a `struct uffdio_range`.
        unsafe { uffd_ioctl(self.fd.as_raw_fd(), UFFDIO_UNREGISTER, &mut range) }
            .map_err(|source| Error::Unregister { addr, len, source })
    }

    /// Write-protects (`on`) or releases (`!on`) `[addr, addr + len)`.
    /// Releasing also wakes every thread blocked on a fault in the range.
    pub fn write_protect(&self, addr: u64, len: u64, on: bool) -> Result<(), Error> {
        self.writeprotect_mode(addr, len, on, if on { WRITEPROTECT_MODE_WP } else { 0 })
    }

    /// Releases `[addr, addr + len)` without waking blocked threads; pair
    /// with [`Uffd::wake`].
    pub fn unprotect_nowake(&self, addr: u64, len: u64) -> Result<(), Error> {
        self.writeprotect_mode(addr, len, false, WRITEPROTECT_MODE_DONTWAKE)
    }

    fn writeprotect_mode(&self, addr: u64, len: u64, on: bool, mode: u64) -> Result<(), Error> {
        loop {
            let mut wp = UffdioWriteprotect {
                range: UffdioRange { start: addr, len },
                mode,
            };
            // SAFETY: UFFDIO_WRITEPROTECT takes a `struct uffdio_writeprotect`,
            // mirrored by `UffdioWriteprotect`; it changes page protection only.
            match unsafe { uffd_ioctl(self.fd.as_raw_fd(), UFFDIO_WRITEPROTECT, &mut wp) } {
                Ok(()) => return Ok(()),
                // EAGAIN: the address space is changing under a
                // non-cooperative event; the call is safe to repeat.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(Error::WriteProtect {
                        addr,
                        len,
                        on,
                        source,
                    })
                }
            }
        }
    }

    /// Wakes threads blocked on faults in `[addr, addr + len)`.
    pub fn wake(&self, addr: u64, len: u64) -> Result<(), Error> {
        let mut range = UffdioRange { start: addr, len };
        // SAFETY: UFFDIO_WAKE takes a `struct uffdio_range`.
        unsafe { uffd_ioctl(self.fd.as_raw_fd(), UFFDIO_WAKE, &mut range) }
            .map_err(|source| Error::Wake { addr, len, source })
    }

    /// Reads one pending fault, or `None` when none is pending.
    pub fn read_event(&self) -> Result<Option<WpFault>, Error> {
        let mut one = [WpFault {
            addr: 0,
            write: false,
            wp: false,
        }];
        Ok((self.read_events(&mut one)? == 1).then_some(one[0]))
    }

    /// Reads up to `out.len()` pending faults in one system call; returns
    /// how many were read (0 when none is pending).
    pub fn read_events(&self, out: &mut [WpFault]) -> Result<usize, Error> {
        const BATCH: usize = 64;
        let mut msgs = [UffdMsg {
            event: 0,
            reserved: [0; 7],
            flags: 0,
            address: 0,
            tail: 0,
        }; BATCH];
        let want = out.len().min(BATCH);
        if want == 0 {
            return Ok(0);
        }
        let n = loop {
            // SAFETY: `msgs` is a writable buffer of `want` messages; the
            // kernel writes whole 32-byte `uffd_msg` records into it.
            let n = unsafe {
                libc::read(
                    self.fd.as_raw_fd(),
                    msgs.as_mut_ptr().cast(),
                    want * size_of::<UffdMsg>(),
                )
            };
            if n >= 0 {
                break n as usize / size_of::<UffdMsg>();
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::WouldBlock => return Ok(0),
                io::ErrorKind::Interrupted => continue,
                _ => return Err(Error::Read(e)),
            }
        };
        for (msg, slot) in msgs[..n].iter().zip(out.iter_mut()) {
            if msg.event != EVENT_PAGEFAULT {
                return Err(Error::UnexpectedEvent(msg.event));
            }
            *slot = WpFault {
                addr: msg.address & !(PAGE_SIZE - 1),
                write: msg.flags & PAGEFAULT_FLAG_WRITE != 0,
                wp: msg.flags & PAGEFAULT_FLAG_WP != 0,
            };
        }
        Ok(n)
    }
}

impl AsFd for Uffd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Uffd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::fs::File;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    /// A memfd of `len` bytes mapped `MAP_SHARED`, unmapped on drop.
    pub(crate) struct SharedMem {
        pub file: File,
        pub addr: u64,
        pub len: u64,
    }

    impl SharedMem {
        pub(crate) fn new(len: u64) -> SharedMem {
            // SAFETY: valid NUL-terminated name; result checked.
            let fd = unsafe { libc::memfd_create(c"uffd-test".as_ptr(), libc::MFD_CLOEXEC) };
            assert!(fd >= 0, "memfd_create: {}", io::Error::last_os_error());
            // SAFETY: a fresh descriptor nothing else owns.
            let file = unsafe { File::from_raw_fd(fd) };
            file.set_len(len).unwrap();
            // SAFETY: shared mapping of the whole memfd at a kernel-chosen address.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    fd,
                    0,
                )
            };
            assert_ne!(p, libc::MAP_FAILED, "{}", io::Error::last_os_error());
            SharedMem {
                file,
                addr: p as u64,
                len,
            }
        }
    }

    impl Drop for SharedMem {
        fn drop(&mut self) {
            // SAFETY: the mapping made in `new`; no reference to it outlives `self`.
            unsafe { libc::munmap(self.addr as *mut libc::c_void, self.len as usize) };
        }
    }

    #[test]
    fn ioctl_numbers_match_the_header_values() {
        assert_eq!(UFFDIO_API, 0xC018_AA3F);
        assert_eq!(UFFDIO_REGISTER, 0xC020_AA00);
        assert_eq!(UFFDIO_UNREGISTER, 0x8010_AA01);
        assert_eq!(UFFDIO_WAKE, 0x8010_AA02);
        assert_eq!(UFFDIO_WRITEPROTECT, 0xC018_AA06);
        assert_eq!(size_of::<UffdMsg>(), 32);
    }

    #[test]
    fn ioctl_numbers_match_the_installed_c_header() {
        let dir = std::env::temp_dir().join(format!("uffd-hdr-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let src = dir.join("n.c");
        std::fs::write(
            &src,
            "#include <sys/ioctl.h>\n#include <linux/userfaultfd.h>\n#include <stdio.h>\n\
             int main(void){printf(\"%lx %lx %lx %lx %lx %lu\\n\",\
             (unsigned long)UFFDIO_API,(unsigned long)UFFDIO_REGISTER,\
             (unsigned long)UFFDIO_UNREGISTER,(unsigned long)UFFDIO_WAKE,\
             (unsigned long)UFFDIO_WRITEPROTECT,(unsigned long)sizeof(struct uffd_msg));return 0;}\n",
        )
        .unwrap();
        let bin = dir.join("n");
        let out = std::process::Command::new("gcc")
            .arg("-o")
            .arg(&bin)
            .arg(&src)
            .output()
            .expect("gcc (with linux/userfaultfd.h) is needed to check the ioctl numbers");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = std::process::Command::new(&bin).output().unwrap();
        let got = String::from_utf8(out.stdout).unwrap();
        let want = format!(
            "{UFFDIO_API:x} {UFFDIO_REGISTER:x} {UFFDIO_UNREGISTER:x} {UFFDIO_WAKE:x} \
             {UFFDIO_WRITEPROTECT:x} {}\n",
            size_of::<UffdMsg>()
        );
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(got, want);
    }

    #[test]
    fn kernel_offers_write_protect_on_shmem() {
        let uffd = Uffd::new().unwrap_or_else(|e| panic!("live BRANCH unsupported: {e}"));
        assert_eq!(
            uffd.features() & Uffd::REQUIRED_FEATURES,
            Uffd::REQUIRED_FEATURES
        );
        assert_eq!(uffd.read_event().unwrap(), None, "no fault pending");
    }

    #[test]
    fn register_refuses_unaligned_ranges_with_a_clear_error() {
        let uffd = Uffd::new().unwrap();
        let mem = SharedMem::new(1 << 20);
        let err = uffd.register_wp(mem.addr + 1, PAGE_SIZE).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("UFFDIO_REGISTER") && msg.contains("page aligned"),
            "{msg}"
        );
        let err = uffd.write_protect(mem.addr, PAGE_SIZE, true).unwrap_err();
        assert!(err.to_string().contains("registered"), "{err}");
    }

    /// A write to a protected page blocks until the page is released, the
    /// handler sees the fault at the right address, and a write after the
    /// release goes through without a fault.
    #[test]
    fn a_protected_write_waits_for_release() {
        let uffd = Arc::new(Uffd::new().unwrap());
        let mem = SharedMem::new(1 << 20);
        uffd.register_wp(mem.addr, mem.len).unwrap();
        uffd.write_protect(mem.addr, mem.len, true).unwrap();
        let target = mem.addr + 5 * PAGE_SIZE;
        let done = Arc::new(AtomicBool::new(false));
        let writer = {
            let done = done.clone();
            std::thread::spawn(move || {
                // SAFETY: `target` lies inside the live test mapping, which
                // outlives this thread (joined below).
                unsafe { std::ptr::write_volatile((target + 8) as *mut u64, 42) };
                done.store(true, Ordering::SeqCst);
            })
        };
        let start = Instant::now();
        let fault = loop {
            if let Some(f) = uffd.read_event().unwrap() {
                break f;
            }
            assert!(start.elapsed() < Duration::from_secs(10), "no fault seen");
            std::thread::sleep(Duration::from_millis(1));
        };
        assert_eq!(fault.addr, target);
        assert!(fault.wp && fault.write, "{fault:?}");
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            !done.load(Ordering::SeqCst),
            "the write finished while protected"
        );
        uffd.write_protect(fault.addr, PAGE_SIZE, false).unwrap();
        writer.join().unwrap();
        assert!(done.load(Ordering::SeqCst));
        // SAFETY: inside the live mapping.
        let written = unsafe { std::ptr::read_volatile((target + 8) as *const u64) };
        assert_eq!(written, 42);
        // Released page: writes go straight through.
        // SAFETY: inside the live mapping.
        unsafe { std::ptr::write_volatile(target as *mut u64, 7) };
        assert_eq!(uffd.read_event().unwrap(), None);
    }

    /// DONTWAKE release followed by an explicit wake.
    #[test]
    fn release_without_wake_then_wake() {
        let uffd = Arc::new(Uffd::new().unwrap());
        let mem = SharedMem::new(64 * PAGE_SIZE);
        uffd.register_wp(mem.addr, mem.len).unwrap();
        // Unpopulated pages are protected too (memfd hole).
        uffd.write_protect(mem.addr, mem.len, true).unwrap();
        let target = mem.addr + 3 * PAGE_SIZE;
        let writer = std::thread::spawn(move || {
            // SAFETY: inside the test mapping, which outlives the thread.
            unsafe { std::ptr::write_volatile(target as *mut u8, 1) };
        });
        let start = Instant::now();
        let fault = loop {
            if let Some(f) = uffd.read_event().unwrap() {
                break f;
            }
            assert!(start.elapsed() < Duration::from_secs(10), "no fault seen");
            std::thread::sleep(Duration::from_millis(1));
        };
        assert_eq!(fault.addr, target);
        uffd.unprotect_nowake(target, PAGE_SIZE).unwrap();
        uffd.wake(target, PAGE_SIZE).unwrap();
        writer.join().unwrap();
    }
}
