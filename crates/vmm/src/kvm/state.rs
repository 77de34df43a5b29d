//! Capturing and restoring the KVM state of a paused VM: every vCPU's
//! registers and local state, and the VM-wide interrupt controllers and clock.
//!
//! What a vCPU carries (x86-64): general registers, special registers,
//! XSAVE area (FPU/SSE/AVX; the legacy FPU struct when XSAVE is missing),
//! XCRs, local APIC, the MSRs KVM lists as saveable, MP state, pending
//! events, debug registers, CPUID and the TSC frequency. The VM: PIC master
//! and slave, IOAPIC, PIT and kvmclock.

use std::sync::OnceLock;

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
    CpuId, Msrs, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

/// Errors capturing or restoring KVM state.
#[derive(Debug, thiserror::Error)]
#[error("KVM refused to {what} for {whom}: {source}")]
pub struct StateError {
    /// The operation.
    pub what: &'static str,
    /// `vCPU n` or `the VM`.
    pub whom: String,
    /// KVM's error.
    pub source: kvm_ioctls::Error,
}

fn vcpu_err(id: u8, what: &'static str) -> impl Fn(kvm_ioctls::Error) -> StateError {
    move |source| StateError {
        what,
        whom: format!("vCPU {id}"),
        source,
    }
}

fn vm_err(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> StateError {
    move |source| StateError {
        what,
        whom: "the VM".into(),
        source,
    }
}

/// One vCPU's state.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// vCPU index (also its APIC ID).
    pub id: u8,
    /// CPUID the vCPU was given.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// TSC frequency in kHz, when KVM reports one.
    pub tsc_khz: Option<u32>,
    /// General registers.
    pub regs: kvm_regs,
    /// Special registers.
    pub sregs: kvm_sregs,
    /// XSAVE area.
    pub xsave: Option<kvm_xsave>,
    /// Legacy FPU state as raw bytes (only when XSAVE is unavailable).
    pub fpu: Option<Vec<u8>>,
    /// Extended control registers.
    pub xcrs: Option<kvm_xcrs>,
    /// Local APIC.
    pub lapic: kvm_lapic_state,
    /// Saveable MSRs as (index, value).
    pub msrs: Vec<(u32, u64)>,
    /// MP state.
    pub mp_state: kvm_mp_state,
    /// Pending exceptions, interrupts, NMIs.
    pub events: kvm_vcpu_events,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
}

/// The VM-wide state: interrupt controllers and clock.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmKvmState {
    /// PIC master, PIC slave, IOAPIC, in that order.
    pub irqchips: Vec<kvm_irqchip>,
    /// The PIT, when the VM has one.
    pub pit: Option<kvm_pit_state2>,
    /// kvmclock.
    pub clock: kvm_clock_data,
}

/// The MSRs KVM says it can save and that this host actually lets us read
/// back, probed once per process.
pub fn saveable_msrs(kvm: &Kvm, vcpu: &VcpuFd) -> &'static [u32] {
    static LIST: OnceLock<Vec<u32>> = OnceLock::new();
    LIST.get_or_init(|| {
        let Ok(list) = kvm.get_msr_index_list() else {
            return Vec::new();
        };
        // Probe one at a time: KVM_GET_MSRS stops at the first MSR it
        // refuses, and some listed MSRs depend on CPU features this guest
        // does not have.
        list.as_slice()
            .iter()
            .copied()
            .filter(|&index| {
                let entry = kvm_msr_entry {
                    index,
                    ..Default::default()
                };
                Msrs::from_entries(&[entry])
                    .ok()
                    .and_then(|mut m| vcpu.get_msrs(&mut m).ok())
                    == Some(1)
            })
            .collect()
    })
}

/// The XCRs to save or restore: none when KVM reported none. On a host
/// without XSAVE, `KVM_GET_XCRS` succeeds with `nr_xcrs == 0` while
/// `KVM_SET_XCRS` fails with EINVAL, so an empty set is never restored.
fn xcrs_worth_keeping(xcrs: Option<kvm_xcrs>) -> Option<kvm_xcrs> {
    xcrs.filter(|x| x.nr_xcrs > 0)
}

/// Captures vCPU `id`'s state. The vCPU must not be running.
pub fn save_vcpu(vcpu: &VcpuFd, id: u8, msr_list: &[u32]) -> Result<VcpuState, StateError> {
    let e = |what| vcpu_err(id, what);
    let cpuid = vcpu
        .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(e("read CPUID"))?
        .as_slice()
        .to_vec();
    let (xsave, fpu) = match vcpu.get_xsave() {
        Ok(x) => (Some(x), None),
        Err(_) => {
            let fpu = vcpu.get_fpu().map_err(e("read the FPU"))?;
            // SAFETY: kvm_fpu is plain old data (integers and byte arrays).
            let bytes = unsafe {
                std::slice::from_raw_parts(
                    (&fpu as *const kvm_bindings::kvm_fpu).cast::<u8>(),
                    std::mem::size_of_val(&fpu),
                )
            };
            (None, Some(bytes.to_vec()))
        }
    };
    let mut msrs = Msrs::from_entries(
        &msr_list
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect::<Vec<_>>(),
    )
    .expect("the MSR list fits KVM's limit");
    let read = vcpu.get_msrs(&mut msrs).map_err(e("read MSRs"))?;
    if read != msr_list.len() {
        return Err(StateError {
            what: "read every saveable MSR",
            whom: format!(
                "vCPU {id} (stopped at MSR {:#x})",
                msr_list.get(read).copied().unwrap_or(0)
            ),
            source: kvm_ioctls::Error::new(libc::EIO),
        });
    }
    Ok(VcpuState {
        id,
        cpuid,
        tsc_khz: vcpu.get_tsc_khz().ok(),
        regs: vcpu.get_regs().map_err(e("read registers"))?,
        sregs: vcpu.get_sregs().map_err(e("read special registers"))?,
        xsave,
        fpu,
        xcrs: xcrs_worth_keeping(vcpu.get_xcrs().ok()),
        lapic: vcpu.get_lapic().map_err(e("read the local APIC"))?,
        msrs: msrs.as_slice().iter().map(|m| (m.index, m.data)).collect(),
        mp_state: vcpu.get_mp_state().map_err(e("read the MP state"))?,
        events: vcpu.get_vcpu_events().map_err(e("read pending events"))?,
        debugregs: vcpu.get_debug_regs().map_err(e("read debug registers"))?,
    })
}

/// Restores a vCPU from `state`, in the order KVM needs: CPUID and TSC
/// frequency first, then registers, FPU, APIC, MSRs and events last (they
/// may depend on the mode the registers establish).
pub fn restore_vcpu(vcpu: &VcpuFd, state: &VcpuState) -> Result<(), StateError> {
    let e = |what| vcpu_err(state.id, what);
    if let Some(khz) = state.tsc_khz {
        // Fails on hosts without TSC scaling when the frequency differs; the
        // guest then runs with the host's frequency.
        let _ = vcpu.set_tsc_khz(khz);
    }
    let cpuid = CpuId::from_entries(&state.cpuid).map_err(|_| StateError {
        what: "accept the saved CPUID (too many entries)",
        whom: format!("vCPU {}", state.id),
        source: kvm_ioctls::Error::new(libc::E2BIG),
    })?;
    vcpu.set_cpuid2(&cpuid).map_err(e("set CPUID"))?;
    vcpu.set_mp_state(state.mp_state)
        .map_err(e("set the MP state"))?;
    vcpu.set_regs(&state.regs).map_err(e("set registers"))?;
    vcpu.set_sregs(&state.sregs)
        .map_err(e("set special registers"))?;
    if let Some(xsave) = &state.xsave {
        // SAFETY: the buffer is a kvm_xsave of the legacy 4 KiB size, which
        // KVM_SET_XSAVE reads in full; it came from KVM_GET_XSAVE.
        unsafe { vcpu.set_xsave(xsave) }.map_err(e("set the XSAVE area"))?;
    } else if let Some(bytes) = &state.fpu {
        let mut fpu = kvm_bindings::kvm_fpu::default();
        if bytes.len() != std::mem::size_of_val(&fpu) {
            return Err(StateError {
                what: "accept the saved FPU state (wrong size)",
                whom: format!("vCPU {}", state.id),
                source: kvm_ioctls::Error::new(libc::EINVAL),
            });
        }
        // SAFETY: sizes checked equal above; kvm_fpu is plain old data, any
        // byte pattern is a valid value.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                (&mut fpu as *mut kvm_bindings::kvm_fpu).cast::<u8>(),
                bytes.len(),
            )
        };
        vcpu.set_fpu(&fpu).map_err(e("set the FPU"))?;
    }
    if let Some(xcrs) = xcrs_worth_keeping(state.xcrs) {
        vcpu.set_xcrs(&xcrs).map_err(e("set XCRs"))?;
    }
    vcpu.set_debug_regs(&state.debugregs)
        .map_err(e("set debug registers"))?;
    vcpu.set_lapic(&state.lapic)
        .map_err(e("set the local APIC"))?;
    let entries: Vec<kvm_msr_entry> = state
        .msrs
        .iter()
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    let msrs = Msrs::from_entries(&entries).map_err(|_| StateError {
        what: "accept the saved MSRs (too many)",
        whom: format!("vCPU {}", state.id),
        source: kvm_ioctls::Error::new(libc::E2BIG),
    })?;
    let set = vcpu.set_msrs(&msrs).map_err(e("set MSRs"))?;
    if set != entries.len() {
        return Err(StateError {
            what: "set every saved MSR",
            whom: format!("vCPU {} (refused MSR {:#x})", state.id, entries[set].index),
            source: kvm_ioctls::Error::new(libc::EINVAL),
        });
    }
    vcpu.set_vcpu_events(&state.events)
        .map_err(e("set pending events"))?;
    Ok(())
}

/// Captures the VM-wide state (the PIT's when `with_pit`). All vCPUs must be paused.
pub fn save_vm(vm: &VmFd, with_pit: bool) -> Result<VmKvmState, StateError> {
    let mut irqchips = Vec::with_capacity(3);
    for chip_id in [
        KVM_IRQCHIP_PIC_MASTER,
        KVM_IRQCHIP_PIC_SLAVE,
        KVM_IRQCHIP_IOAPIC,
    ] {
        let mut chip = kvm_irqchip {
            chip_id,
            ..Default::default()
        };
        vm.get_irqchip(&mut chip)
            .map_err(vm_err("read the irqchip"))?;
        irqchips.push(chip);
    }
    Ok(VmKvmState {
        irqchips,
        pit: if with_pit {
            Some(vm.get_pit2().map_err(vm_err("read the PIT"))?)
        } else {
            None
        },
        clock: vm.get_clock().map_err(vm_err("read kvmclock"))?,
    })
}

/// Restores the VM-wide state (after the irqchip and PIT exist).
pub fn restore_vm(vm: &VmFd, state: &VmKvmState) -> Result<(), StateError> {
    for chip in &state.irqchips {
        vm.set_irqchip(chip).map_err(vm_err("set the irqchip"))?;
    }
    if let Some(pit) = &state.pit {
        vm.set_pit2(pit).map_err(vm_err("set the PIT"))?;
    }
    let clock = kvm_clock_data {
        clock: state.clock.clock,
        // Only the value is restored: flags such as KVM_CLOCK_TSC_STABLE
        // are KVM's to report, not to be set.
        flags: 0,
        ..Default::default()
    };
    vm.set_clock(&clock).map_err(vm_err("set kvmclock"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kvm::vm::open_kvm;

    #[test]
    fn empty_xcrs_are_neither_kept_nor_restored() {
        // What KVM_GET_XCRS answers on a host without XSAVE (the nested lab's
        // level 1): success, no registers. KVM_SET_XCRS would refuse it.
        let empty = kvm_xcrs::default();
        assert_eq!(xcrs_worth_keeping(Some(empty)), None);
        assert_eq!(xcrs_worth_keeping(None), None);
        let mut one = kvm_xcrs {
            nr_xcrs: 1,
            ..Default::default()
        };
        one.xcrs[0].value = 0x7;
        assert_eq!(xcrs_worth_keeping(Some(one)), Some(one));
    }

    #[test]
    fn vcpu_and_vm_state_roundtrip_through_kvm() {
        let kvm = open_kvm().expect("this test needs /dev/kvm");
        let vm = kvm.create_vm().unwrap();
        vm.create_irq_chip().unwrap();
        vm.create_pit2(Default::default()).unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        let supported = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .unwrap();
        vcpu.set_cpuid2(&supported).unwrap();
        let mut regs = vcpu.get_regs().unwrap();
        regs.rax = 0x1234_5678;
        regs.rip = 0x10_0000;
        vcpu.set_regs(&regs).unwrap();

        let msrs = saveable_msrs(&kvm, &vcpu);
        assert!(!msrs.is_empty(), "KVM lists no saveable MSRs");
        let state = save_vcpu(&vcpu, 0, msrs).unwrap();
        let vm_state = save_vm(&vm, true).unwrap();
        assert_eq!(vm_state.irqchips.len(), 3);

        // Through the wire format and into a fresh VM.
        let bytes = bitcode::serialize(&(&state, &vm_state)).unwrap();
        let (state2, vm_state2): (VcpuState, VmKvmState) = bitcode::deserialize(&bytes).unwrap();
        let vm2 = kvm.create_vm().unwrap();
        vm2.create_irq_chip().unwrap();
        vm2.create_pit2(Default::default()).unwrap();
        let vcpu2 = vm2.create_vcpu(0).unwrap();
        restore_vcpu(&vcpu2, &state2).unwrap();
        restore_vm(&vm2, &vm_state2).unwrap();
        let regs2 = vcpu2.get_regs().unwrap();
        assert_eq!((regs2.rax, regs2.rip), (0x1234_5678, 0x10_0000));
        assert_eq!(vcpu2.get_sregs().unwrap().cr0, state.sregs.cr0);
    }
}
