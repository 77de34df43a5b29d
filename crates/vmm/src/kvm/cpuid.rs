//! The CPUID a vCPU sees: what KVM supports on this host
//! (`Kvm::get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)`), with the topology
//! leaves rewritten so each vCPU reports its own APIC id and the VM looks like
//! one package of `num_vcpus` single-thread cores.
//!
//! KVM's supported list already carries the KVM paravirtual leaves
//! (`0x4000_0000` "KVMKVMKVM" signature and `0x4000_0001` features such as
//! kvm-clock), so nothing is added for them here.

use kvm_bindings::{
    kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX, KVM_MAX_CPUID_ENTRIES,
};

/// Leaf 0x1: version and feature information.
const LEAF_FEATURES: u32 = 0x1;
/// Leaf 0x4: deterministic cache parameters (Intel).
const LEAF_CACHE_PARAMS: u32 = 0x4;
/// Leaf 0x6: thermal and power management.
const LEAF_THERMAL_POWER: u32 = 0x6;
/// Leaf 0xB: extended topology enumeration.
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
/// Leaf 0x1F: V2 extended topology enumeration.
const LEAF_EXT_TOPOLOGY_V2: u32 = 0x1f;

/// Leaf 0x1 ECX bit 31: running under a hypervisor.
const ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 0x1 ECX bit 24: the local APIC timer has TSC-deadline mode.
/// `KVM_GET_SUPPORTED_CPUID` never reports it (api.rst: it is announced by
/// `KVM_CAP_TSC_DEADLINE_TIMER` instead); KVM's in-kernel local APIC, which
/// every forkd VM has, emulates it.
const ECX_TSC_DEADLINE: u32 = 1 << 24;
/// Leaf 0x1 EDX bit 28: EBX[23:16] (logical processor count) is valid.
const EDX_HTT: u32 = 1 << 28;
/// Leaf 0x1 EBX[15:8]: CLFLUSH line size in 8-byte units (64 bytes).
const CLFLUSH_LINE_QWORDS: u32 = 8;

/// Leaf 0xB/0x1F ECX[15:8] level type: SMT (threads of a core).
const LEVEL_TYPE_SMT: u32 = 1;
/// Leaf 0xB/0x1F ECX[15:8] level type: core.
const LEVEL_TYPE_CORE: u32 = 2;
/// Topology subleaves written: SMT, core and the invalid one ending the list.
const TOPOLOGY_SUBLEAVES: u32 = 3;

/// The CPUID for vCPU `vcpu_id` of a VM with `num_vcpus` vCPUs, derived
/// from `supported` (KVM's supported list for this host):
///
/// - leaf 0x1: EBX = initial APIC id `vcpu_id` (31:24), `num_vcpus` logical
///   processors (23:16), 64-byte CLFLUSH (15:8), brand index kept; ECX gets the
///   hypervisor and TSC-deadline bits (without the latter a Linux guest
///   calibrates its APIC timer against the PIT at boot, ~100 ms, and drops
///   the APIC timer altogether when that calibration fails); EDX HTT set iff
///   `num_vcpus > 1`;
/// - leaf 0x4: EAX\[31:26\] (addressable core IDs - 1) = `num_vcpus` rounded up
///   to a power of two, minus 1, on every valid cache subleaf;
/// - leaf 0x6: zeroed (no thermal or power management in a VM);
/// - leaves 0xB and 0x1F (each only if `supported` has it): subleaf 0 is the
///   SMT level (1 thread, shift 0), subleaf 1 the core level (`num_vcpus`
///   processors, shift `ceil(log2(num_vcpus))`), subleaf 2 ends the list;
///   EDX = x2APIC id `vcpu_id` on every subleaf. Missing subleaves are added.
///
/// Every other leaf is left as KVM reports it. The result never exceeds
/// `KVM_MAX_CPUID_ENTRIES` entries: if the list is full, only the subleaves
/// already present are rewritten (KVM then answers zeros, i.e. "invalid
/// level", for the missing ones).
pub fn vcpu_cpuid(supported: &CpuId, vcpu_id: u8, num_vcpus: u8) -> CpuId {
    let num_vcpus = u32::from(num_vcpus.max(1));
    let vcpu_id = u32::from(vcpu_id);
    let mut cpuid = supported.clone();

    let mut topology_leaves = Vec::new();
    for e in cpuid.as_mut_slice() {
        match e.function {
            LEAF_FEATURES => {
                e.ebx = (e.ebx & 0xff)
                    | (CLFLUSH_LINE_QWORDS << 8)
                    | (num_vcpus << 16)
                    | (vcpu_id << 24);
                e.ecx |= ECX_HYPERVISOR | ECX_TSC_DEADLINE;
                if num_vcpus > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE_PARAMS if e.eax & 0x1f != 0 => {
                let cores_minus_one = num_vcpus.next_power_of_two() - 1;
                e.eax = (e.eax & 0x03ff_ffff) | (cores_minus_one << 26);
            }
            LEAF_THERMAL_POWER => {
                (e.eax, e.ebx, e.ecx, e.edx) = (0, 0, 0, 0);
            }
            LEAF_EXT_TOPOLOGY | LEAF_EXT_TOPOLOGY_V2 => {
                *e = topology_entry(e.function, e.index, vcpu_id, num_vcpus);
                if !topology_leaves.contains(&e.function) {
                    topology_leaves.push(e.function);
                }
            }
            _ => {}
        }
    }

    for function in topology_leaves {
        for index in 0..TOPOLOGY_SUBLEAVES {
            let present = cpuid
                .as_slice()
                .iter()
                .any(|e| e.function == function && e.index == index);
            if !present && cpuid.as_slice().len() < KVM_MAX_CPUID_ENTRIES {
                // Cannot fail: there is room for one more entry.
                let _ = cpuid.push(topology_entry(function, index, vcpu_id, num_vcpus));
            }
        }
    }
    cpuid
}

/// Subleaf `index` of extended-topology leaf `function` (0xB or 0x1F) for a
/// package of `num_vcpus` single-thread cores.
fn topology_entry(function: u32, index: u32, vcpu_id: u32, num_vcpus: u32) -> kvm_cpuid_entry2 {
    // Bits of the x2APIC id below the package: enough for num_vcpus cores.
    let core_shift = num_vcpus.next_power_of_two().trailing_zeros();
    let (eax, ebx, level_type) = match index {
        0 => (0, 1, LEVEL_TYPE_SMT),
        1 => (core_shift, num_vcpus, LEVEL_TYPE_CORE),
        _ => (0, 0, 0),
    };
    kvm_cpuid_entry2 {
        function,
        index,
        flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
        eax,
        ebx,
        ecx: (level_type << 8) | (index & 0xff),
        edx: vcpu_id,
        padding: [0; 3],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(
        function: u32,
        index: u32,
        eax: u32,
        ebx: u32,
        ecx: u32,
        edx: u32,
    ) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            flags: 0,
            eax,
            ebx,
            ecx,
            edx,
            padding: [0; 3],
        }
    }

    fn synthetic() -> CpuId {
        CpuId::from_entries(&[
            entry(0, 0, 0x1f, 0x756e_6547, 0x6c65_746e, 0x4965_6e69),
            entry(1, 0, 0x000906ea, 0xff12_3405, 0x7ffa_fbff, 0x0fab_fbff),
            entry(4, 0, 0x1c00_4121, 0, 0, 0),
            entry(4, 1, 0x1c00_4143, 0, 0, 0),
            entry(4, 2, 0, 0, 0, 0),
            entry(6, 0, 0x77, 0x2, 0x9, 0),
            entry(7, 0, 0, 0x1234, 0, 0),
            // KVM >= 5.x reports only subleaf 0, zeroed.
            entry(0xb, 0, 0, 0, 0, 0),
            entry(0x1f, 0, 1, 2, 0x100, 7),
            entry(0x1f, 1, 4, 16, 0x201, 7),
            entry(0x4000_0000, 0, 0x4000_0001, 0x4b4d_564b, 0x564b_4d56, 0x4d),
        ])
        .unwrap()
    }

    fn find(c: &CpuId, function: u32, index: u32) -> kvm_cpuid_entry2 {
        *c.as_slice()
            .iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap_or_else(|| panic!("leaf {function:#x}.{index} missing"))
    }

    #[test]
    fn leaf1_identity_and_flags() {
        let c = vcpu_cpuid(&synthetic(), 3, 4);
        let e = find(&c, 1, 0);
        assert_eq!(e.ebx >> 24, 3);
        assert_eq!((e.ebx >> 16) & 0xff, 4);
        assert_eq!((e.ebx >> 8) & 0xff, 8);
        assert_eq!(e.ebx & 0xff, 0x05);
        assert_ne!(e.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(e.ecx & ECX_TSC_DEADLINE, 0);
        assert_ne!(e.edx & EDX_HTT, 0);
        assert_eq!(e.eax, 0x000906ea);

        let single = find(&vcpu_cpuid(&synthetic(), 0, 1), 1, 0);
        assert_eq!(single.edx & EDX_HTT, 0);
        assert_eq!(single.ebx >> 16, 1);
    }

    #[test]
    fn cache_leaf_core_count() {
        let c = vcpu_cpuid(&synthetic(), 0, 6);
        assert_eq!(find(&c, 4, 0).eax >> 26, 7);
        assert_eq!(find(&c, 4, 0).eax & 0x03ff_ffff, 0x4121);
        assert_eq!(find(&c, 4, 1).eax >> 26, 7);
        assert_eq!(find(&c, 4, 2).eax, 0, "the terminating subleaf stays zero");
        assert_eq!(find(&vcpu_cpuid(&synthetic(), 0, 1), 4, 0).eax >> 26, 0);
    }

    #[test]
    fn thermal_leaf_cleared_and_others_kept() {
        let c = vcpu_cpuid(&synthetic(), 0, 2);
        let e = find(&c, 6, 0);
        assert_eq!((e.eax, e.ebx, e.ecx, e.edx), (0, 0, 0, 0));
        assert_eq!(find(&c, 7, 0).ebx, 0x1234);
        assert_eq!(find(&c, 0x4000_0000, 0).ebx, 0x4b4d_564b);
    }

    #[test]
    fn topology_leaves() {
        for function in [0xb, 0x1f] {
            let c = vcpu_cpuid(&synthetic(), 5, 6);
            let smt = find(&c, function, 0);
            let core = find(&c, function, 1);
            let end = find(&c, function, 2);
            assert_eq!((smt.eax, smt.ebx, smt.ecx), (0, 1, 0x100));
            assert_eq!((core.eax, core.ebx, core.ecx), (3, 6, 0x201));
            assert_eq!((end.eax, end.ebx, end.ecx), (0, 0, 2));
            for e in [smt, core, end] {
                assert_eq!(e.edx, 5);
                assert_eq!(e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX, 1);
            }
            let count = c
                .as_slice()
                .iter()
                .filter(|e| e.function == function)
                .count();
            assert_eq!(count, 3);
        }
        // Shift widths: 1 -> 0, 2 -> 1, 32 -> 5, 5 -> 3.
        for (n, shift) in [(1u8, 0u32), (2, 1), (32, 5), (5, 3)] {
            assert_eq!(find(&vcpu_cpuid(&synthetic(), 0, n), 0xb, 1).eax, shift);
        }
    }

    #[test]
    fn absent_leaves_stay_absent() {
        let c = CpuId::from_entries(&[entry(1, 0, 0, 0, 0, 0)]).unwrap();
        let out = vcpu_cpuid(&c, 1, 2);
        assert_eq!(out.as_slice().len(), 1);
    }

    #[test]
    fn a_full_list_does_not_grow() {
        let mut entries: Vec<_> = (0..KVM_MAX_CPUID_ENTRIES as u32 - 1)
            .map(|i| entry(0x8000_0100 + i, 0, 0, 0, 0, 0))
            .collect();
        entries.push(entry(0xb, 0, 0, 0, 0, 0));
        let out = vcpu_cpuid(&CpuId::from_entries(&entries).unwrap(), 7, 8);
        assert_eq!(out.as_slice().len(), KVM_MAX_CPUID_ENTRIES);
        assert_eq!(find(&out, 0xb, 0).edx, 7);
    }

    /// Host test: needs /dev/kvm and fails (not skips) without it.
    #[test]
    fn kvm_accepts_the_result() {
        assert!(
            std::path::Path::new("/dev/kvm").exists(),
            "/dev/kvm is missing: this host test needs KVM (run on a KVM host as a user with access)"
        );
        let kvm = kvm_ioctls::Kvm::new().expect("open /dev/kvm");
        // vcpu_cpuid announces the TSC-deadline timer: KVM must emulate it.
        assert!(
            kvm.check_extension(kvm_ioctls::Cap::TscDeadlineTimer),
            "this KVM lacks KVM_CAP_TSC_DEADLINE_TIMER"
        );
        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .expect("KVM_GET_SUPPORTED_CPUID");
        let vm = kvm.create_vm().expect("KVM_CREATE_VM");
        for id in 0..2u8 {
            let vcpu = vm.create_vcpu(u64::from(id)).expect("KVM_CREATE_VCPU");
            let cpuid = vcpu_cpuid(&supported, id, 2);
            vcpu.set_cpuid2(&cpuid).expect("KVM_SET_CPUID2");
            let back = vcpu
                .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
                .expect("KVM_GET_CPUID2");
            let leaf1 = back.as_slice().iter().find(|e| e.function == 1).unwrap();
            assert_eq!(leaf1.ebx >> 24, u32::from(id));
            assert_ne!(leaf1.ecx & ECX_TSC_DEADLINE, 0);
        }
    }
}
