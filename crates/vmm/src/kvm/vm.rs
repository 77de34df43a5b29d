//! The KVM VM: memory slots, in-kernel irqchip and PIT, irqfds.

use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY,
};
pub use kvm_ioctls::Kvm;
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

use crate::boot::layout;
use crate::memory::GuestRam;

/// Errors creating or configuring the VM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// /dev/kvm could not be opened.
    #[error(
        "cannot open /dev/kvm: {0}. KVM is not available here: load kvm_intel, kvm_amd or \
         kvm_pvm, and run as root or as a member of the kvm group"
    )]
    OpenKvm(kvm_ioctls::Error),
    /// KVM_CREATE_VM failed.
    #[error("KVM refused to create a VM: {0}")]
    CreateVm(kvm_ioctls::Error),
    /// A memory slot was refused.
    #[error("KVM refused memory slot {slot} ({len:#x} bytes at guest {gpa:#x}): {source}")]
    MemorySlot {
        /// Slot number.
        slot: u32,
        /// Guest address.
        gpa: u64,
        /// Length.
        len: u64,
        /// The KVM error.
        source: kvm_ioctls::Error,
    },
    /// A VM set-up ioctl failed.
    #[error("KVM refused to {what}: {source}")]
    Setup {
        /// What was being set up.
        what: &'static str,
        /// The KVM error.
        source: kvm_ioctls::Error,
    },
}

/// Resets ranges of a VM's dirty log; see [`Vm::dirty_log_clearer`].
#[derive(Debug)]
pub struct DirtyLogClearer {
    fd: OwnedFd,
}

impl DirtyLogClearer {
    /// Resets the log of pages `first..first + count` of `slot` (a slot of
    /// `slot_pages` pages) and write-protects them in KVM's MMU, so each
    /// one's next write is logged; see [`Vm::clear_dirty_log`].
    pub fn clear_pages(
        &self,
        slot: u32,
        slot_pages: u64,
        first: u64,
        count: u64,
    ) -> Result<(), Error> {
        let end = (first + count).min(slot_pages);
        if first >= end {
            return Ok(());
        }
        let w0 = first / 64;
        let mut bits = vec![0u64; (end.div_ceil(64) - w0) as usize];
        for p in first..end {
            bits[(p / 64 - w0) as usize] |= 1 << (p % 64);
        }
        let num_pages = (bits.len() as u64 * 64).min(slot_pages - w0 * 64);
        clear_dirty_log(self.fd.as_raw_fd(), slot, w0 * 64, num_pages, &bits)
    }
}

/// KVM_CLEAR_DIRTY_LOG on the VM descriptor `fd`; see [`Vm::clear_dirty_log`].
fn clear_dirty_log(
    fd: RawFd,
    slot: u32,
    first_page: u64,
    num_pages: u64,
    bits: &[u64],
) -> Result<(), Error> {
    assert!(
        bits.len() as u64 * 64 >= num_pages,
        "the bitmap is shorter than the range"
    );
    if num_pages == 0 {
        return Ok(());
    }
    let mut clear = kvm_bindings::kvm_clear_dirty_log {
        slot,
        num_pages: num_pages as u32,
        first_page,
        ..Default::default()
    };
    clear.__bindgen_anon_1.dirty_bitmap = bits.as_ptr() as *mut libc::c_void;
    // SAFETY: KVM_CLEAR_DIRTY_LOG reads a `struct kvm_clear_dirty_log`
    // (mirrored by the binding) and `num_pages` bits from `dirty_bitmap`,
    // which points at `bits`, live and at least `num_pages` bits long for
    // the call; the kernel does not write through it.
    let rc = unsafe { libc::ioctl(fd, KVM_CLEAR_DIRTY_LOG, &clear) };
    if rc < 0 {
        return Err(Error::Setup {
            what: "clear the dirty log (KVM_CLEAR_DIRTY_LOG)",
            source: kvm_ioctls::Error::last(),
        });
    }
    Ok(())
}

/// Turns on manual dirty-log protection when KVM offers it, so the dirty
/// log can be read without resetting it and reset a range at a time (live
/// BRANCH pre-copy). Returns whether it is on; without it, reading the log
/// resets it, as before.
fn enable_manual_dirty_log(fd: &VmFd) -> bool {
    let offered = fd.check_extension_raw(kvm_bindings::KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2.into());
    if offered < 0 || offered as u64 & DIRTY_LOG_MANUAL_PROTECT_ENABLE == 0 {
        return false;
    }
    let mut cap = kvm_bindings::kvm_enable_cap {
        cap: kvm_bindings::KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
        ..Default::default()
    };
    // Not KVM_DIRTY_LOG_INITIALLY_SET: pages are write-protected and their
    // bits clear when a slot is created, as without the capability.
    cap.args[0] = DIRTY_LOG_MANUAL_PROTECT_ENABLE;
    fd.enable_cap(&cap).is_ok()
}

/// Opens /dev/kvm with an error that says what to do when it is missing.
pub fn open_kvm() -> Result<Kvm, Error> {
    Kvm::new().map_err(Error::OpenKvm)
}

/// A KVM VM with its RAM registered and its interrupt controllers created.
pub struct Vm {
    fd: VmFd,
    /// KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 is on: reading the dirty log
    /// leaves it as it is, and [`Vm::clear_dirty_log`] re-protects pages.
    manual_dirty_log: bool,
}

/// `KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE`, bit 0 of the capability's argument.
const DIRTY_LOG_MANUAL_PROTECT_ENABLE: u64 = 1;
/// `KVM_CLEAR_DIRTY_LOG = _IOWR(KVMIO, 0xc0, struct kvm_clear_dirty_log)`:
/// direction 3 in bits 30-31, size 24 in bits 16-29, type 0xAE, number 0xc0.
const KVM_CLEAR_DIRTY_LOG: libc::c_ulong = (3 << 30)
    | ((size_of::<kvm_bindings::kvm_clear_dirty_log>() as libc::c_ulong) << 16)
    | (0xAE << 8)
    | 0xc0;

impl Vm {
    /// Creates the VM, registers every RAM region as a memory slot, then
    /// creates the in-kernel irqchip and, when `with_pit`, the PIT.
    ///
    /// The PIT is only for guests that use it (Linux calibrates its clocks
    /// with it): KVM runs each PIT on a kernel thread of its own, and
    /// creating that thread is the dearest step of a VM that needs no timer
    /// (the built-in guest), on the fork path of every child.
    ///
    /// Slots go in before the irqchip: on the development hosts
    /// `KVM_SET_USER_MEMORY_REGION` after `KVM_CREATE_IRQCHIP` took about
    /// 7 ms against about 20 us before it, and this is on the fork path.
    pub fn new(kvm: &Kvm, ram: &GuestRam, with_pit: bool) -> Result<Self, Error> {
        let fd = kvm.create_vm().map_err(Error::CreateVm)?;
        let manual_dirty_log = enable_manual_dirty_log(&fd);
        for (slot, (gpa, hva, len)) in ram.slots().into_iter().enumerate() {
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                // Guest writes are logged from the start, so a diff BRANCH
                // knows what changed since the last snapshot (or restore).
                flags: KVM_MEM_LOG_DIRTY_PAGES,
                guest_phys_addr: gpa,
                memory_size: len,
                userspace_addr: hva,
            };
            // SAFETY: `hva..hva+len` is a live mapping owned by `ram`, which
            // outlives the VM in every caller (the machine holds both and
            // drops the VM first).
            unsafe { fd.set_user_memory_region(region) }.map_err(|source| Error::MemorySlot {
                slot: slot as u32,
                gpa,
                len,
                source,
            })?;
        }
        let setup = |what| move |source| Error::Setup { what, source };
        fd.set_tss_address(layout::KVM_TSS_ADDRESS as usize)
            .map_err(setup("set the TSS address"))?;
        fd.set_identity_map_address(layout::KVM_IDENTITY_MAP_ADDRESS)
            .map_err(setup("set the identity map address"))?;
        fd.create_irq_chip()
            .map_err(setup("create the in-kernel irqchip"))?;
        if with_pit {
            let pit = kvm_pit_config {
                flags: KVM_PIT_SPEAKER_DUMMY,
                ..Default::default()
            };
            fd.create_pit2(pit)
                .map_err(setup("create the in-kernel PIT"))?;
        }
        Ok(Vm {
            fd,
            manual_dirty_log,
        })
    }

    /// The VM file descriptor.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// Pages the guest wrote since the last call (or since the slots were
    /// registered), one bitmap per slot in `ram.slots()` order, and clears
    /// KVM's log (write-protecting those pages again, so their next write
    /// is logged).
    pub fn take_dirty_log(&self, ram: &GuestRam) -> Result<Vec<Vec<u64>>, Error> {
        let logs = self.read_dirty_log(ram)?;
        if self.manual_dirty_log {
            for (slot, (bits, (_, _, len))) in logs.iter().zip(ram.slots()).enumerate() {
                self.clear_dirty_log(slot as u32, 0, len / 4096, bits)?;
            }
        }
        Ok(logs)
    }

    /// Whether KVM leaves the dirty log alone when it is read
    /// (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, enabled when the host has it):
    /// then [`Vm::read_dirty_log`] is a copy of KVM's bitmap, and pages stay
    /// logged (and writable) until [`Vm::clear_dirty_log`].
    pub fn manual_dirty_log(&self) -> bool {
        self.manual_dirty_log
    }

    /// KVM's dirty log, one bitmap per slot in `ram.slots()` order. With
    /// manual protection ([`Vm::manual_dirty_log`]) this only copies the
    /// bitmaps; without it KVM clears the log and write-protects the pages,
    /// as [`Vm::take_dirty_log`] does.
    pub fn read_dirty_log(&self, ram: &GuestRam) -> Result<Vec<Vec<u64>>, Error> {
        ram.slots()
            .iter()
            .enumerate()
            .map(|(slot, &(_, _, len))| {
                self.fd
                    .get_dirty_log(slot as u32, len as usize)
                    .map_err(|source| Error::Setup {
                        what: "read the dirty log",
                        source,
                    })
            })
            .collect()
    }

    /// Clears the dirty bits set in `bits` (bit i: page `first_page + i` of
    /// `slot`, for `num_pages` pages) and write-protects those pages, so the
    /// guest's next write to each is logged again (KVM_CLEAR_DIRTY_LOG;
    /// manual protection only). `first_page` must be a multiple of 64,
    /// `num_pages` a multiple of 64 unless the range ends the slot, and
    /// `bits` at least `num_pages` bits long.
    pub fn clear_dirty_log(
        &self,
        slot: u32,
        first_page: u64,
        num_pages: u64,
        bits: &[u64],
    ) -> Result<(), Error> {
        clear_dirty_log(self.fd.as_raw_fd(), slot, first_page, num_pages, bits)
    }

    /// A handle that resets ranges of this VM's dirty log from any thread
    /// (a duplicate of the VM descriptor), for a copy that outlives the
    /// borrow of the VM. Manual protection only.
    pub fn dirty_log_clearer(&self) -> Result<DirtyLogClearer, Error> {
        // SAFETY: the VM descriptor is open for as long as `self.fd` lives,
        // which covers this borrow; the duplicate is owned separately.
        let fd = unsafe { BorrowedFd::borrow_raw(self.fd.as_raw_fd()) }
            .try_clone_to_owned()
            .map_err(|e| Error::Setup {
                what: "duplicate the VM descriptor",
                source: kvm_ioctls::Error::new(e.raw_os_error().unwrap_or(libc::EBADF)),
            })?;
        Ok(DirtyLogClearer { fd })
    }

    /// Routes writes to `evt` to interrupt line `gsi` of the in-kernel irqchip.
    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), Error> {
        self.fd
            .register_irqfd(evt, gsi)
            .map_err(|source| Error::Setup {
                what: "register an irqfd",
                source,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::Backend;

    #[test]
    fn vm_with_two_memory_regions_is_created() {
        let kvm = open_kvm().expect("this test needs /dev/kvm");
        let ram = GuestRam::new(4096, Backend::Anonymous).unwrap();
        let vm = Vm::new(&kvm, &ram, true).unwrap();
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        vm.register_irqfd(&evt, 4).unwrap();
    }
}
