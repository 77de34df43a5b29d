//! Model-specific registers: the values a 64-bit Linux guest expects at
//! boot, and the list of MSRs KVM can save and restore (for snapshots).

use kvm_bindings::{kvm_msr_entry, Msrs};

/// SYSENTER target code segment.
pub const MSR_IA32_SYSENTER_CS: u32 = 0x174;
/// SYSENTER target stack pointer.
pub const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
/// SYSENTER target instruction pointer.
pub const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
/// SYSCALL/SYSRET segment selectors.
pub const MSR_STAR: u32 = 0xc000_0081;
/// 64-bit SYSCALL target.
pub const MSR_LSTAR: u32 = 0xc000_0082;
/// Compatibility-mode SYSCALL target.
pub const MSR_CSTAR: u32 = 0xc000_0083;
/// RFLAGS mask applied by SYSCALL (SFMASK).
pub const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
/// Value SWAPGS exchanges with GS base.
pub const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
/// Time-stamp counter.
pub const MSR_IA32_TSC: u32 = 0x10;
/// Miscellaneous feature enables.
pub const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
/// Default memory type for ranges no MTRR covers, and the MTRR enable bit.
pub const MSR_IA32_MTRR_DEF_TYPE: u32 = 0x2ff;

/// IA32_MISC_ENABLE bit 0: fast-string operations (REP MOVS/STOS) enabled.
pub const MISC_ENABLE_FAST_STRING: u64 = 1 << 0;
/// IA32_MTRR_DEF_TYPE bit 11: MTRRs enabled.
pub const MTRR_ENABLE: u64 = 1 << 11;
/// Memory type write-back.
pub const MTRR_MEM_TYPE_WB: u64 = 0x6;

/// Why MSRs could not be set or listed.
#[derive(Debug, thiserror::Error)]
pub enum MsrError {
    /// The MSR list does not fit KVM's fixed-size array.
    #[error("cannot build the list of {count} MSRs for KVM: {source:?}; this is a forkd bug")]
    Build {
        /// How many MSRs were being passed.
        count: usize,
        /// What the FAM wrapper reported.
        source: vmm_sys_util::fam::Error,
    },
    /// KVM_SET_MSRS failed as a whole.
    #[error("KVM_SET_MSRS failed: {0}; check that /dev/kvm supports this vCPU model")]
    Set(#[source] kvm_ioctls::Error),
    /// KVM set only the first `set` MSRs of the list.
    #[error(
        "KVM set only {set} of {total} boot MSRs and refused MSR {index:#x}; \
         this host's KVM does not support it, so drop it from the boot list"
    )]
    Refused {
        /// Number of the first MSR KVM refused.
        index: u32,
        /// How many KVM did set.
        set: usize,
        /// How many were passed.
        total: usize,
    },
    /// KVM_GET_MSR_INDEX_LIST failed.
    #[error("KVM_GET_MSR_INDEX_LIST failed: {0}; check that /dev/kvm is a working KVM")]
    IndexList(#[source] kvm_ioctls::Error),
}

/// The MSRs a 64-bit Linux boot CPU expects set: SYSENTER and SYSCALL
/// targets cleared (Linux installs its own), KERNEL_GS_BASE and the TSC at 0,
/// fast strings enabled, and MTRRs enabled with write-back as the default type
/// (all of RAM cacheable; Linux keeps it).
pub fn boot_msr_entries() -> Vec<kvm_msr_entry> {
    [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_IA32_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_MEM_TYPE_WB),
    ]
    .into_iter()
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect()
}

/// Writes [`boot_msr_entries`] into `vcpu` with KVM_SET_MSRS. KVM stops at the
/// first MSR it refuses; that one is named in the error.
pub fn set_boot_msrs(vcpu: &kvm_ioctls::VcpuFd) -> Result<(), MsrError> {
    let entries = boot_msr_entries();
    let msrs = Msrs::from_entries(&entries).map_err(|source| MsrError::Build {
        count: entries.len(),
        source,
    })?;
    let set = vcpu.set_msrs(&msrs).map_err(MsrError::Set)?;
    if set < entries.len() {
        return Err(MsrError::Refused {
            index: entries[set].index,
            set,
            total: entries.len(),
        });
    }
    Ok(())
}

/// The MSRs KVM can save and restore on this host (KVM_GET_MSR_INDEX_LIST).
pub fn supported_msr_list(kvm: &kvm_ioctls::Kvm) -> Result<Vec<u32>, MsrError> {
    let list = kvm.get_msr_index_list().map_err(MsrError::IndexList)?;
    Ok(list.as_slice().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_msrs_are_distinct() {
        let entries = boot_msr_entries();
        let mut indices: Vec<u32> = entries.iter().map(|e| e.index).collect();
        indices.sort_unstable();
        indices.dedup();
        assert_eq!(indices.len(), entries.len());
        let def = entries
            .iter()
            .find(|e| e.index == MSR_IA32_MTRR_DEF_TYPE)
            .unwrap();
        assert_eq!(def.data, 0x806);
    }

    fn kvm() -> kvm_ioctls::Kvm {
        assert!(
            std::path::Path::new("/dev/kvm").exists(),
            "/dev/kvm is missing: this host test needs KVM (run on a KVM host as a user with access)"
        );
        kvm_ioctls::Kvm::new().expect("open /dev/kvm")
    }

    /// Host test: needs /dev/kvm and fails (not skips) without it.
    #[test]
    fn msr_index_list_is_nonempty() {
        let list = supported_msr_list(&kvm()).unwrap();
        assert!(list.contains(&MSR_LSTAR), "{list:x?}");
    }

    /// Host test: needs /dev/kvm and fails (not skips) without it.
    #[test]
    fn kvm_accepts_the_boot_msrs() {
        let kvm = kvm();
        let vm = kvm.create_vm().expect("KVM_CREATE_VM");
        let vcpu = vm.create_vcpu(0).expect("KVM_CREATE_VCPU");
        set_boot_msrs(&vcpu).unwrap();
        let mut back = Msrs::from_entries(&boot_msr_entries()).unwrap();
        let read = vcpu.get_msrs(&mut back).unwrap();
        assert_eq!(read, boot_msr_entries().len());
        for e in back.as_slice() {
            if e.index == MSR_IA32_MTRR_DEF_TYPE {
                assert_eq!(e.data, MTRR_ENABLE | MTRR_MEM_TYPE_WB);
            }
        }
    }
}
