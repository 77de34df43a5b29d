//! The KVM VM: memory slots, in-kernel irqchip and PIT, irqfds.

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};
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

/// Opens /dev/kvm with an error that says what to do when it is missing.
pub fn open_kvm() -> Result<Kvm, Error> {
    Kvm::new().map_err(Error::OpenKvm)
}

/// A KVM VM with its RAM registered and its interrupt controllers created.
pub struct Vm {
    fd: VmFd,
}

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
        Ok(Vm { fd })
    }

    /// The VM file descriptor.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// Pages the guest wrote since the last call (or since the slots were
    /// registered), one bitmap per slot in `ram.slots()` order, and clears
    /// KVM's log.
    pub fn take_dirty_log(&self, ram: &GuestRam) -> Result<Vec<Vec<u64>>, Error> {
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
