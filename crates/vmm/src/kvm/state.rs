//! Capturing and restoring the KVM state of a paused VM: every vCPU's
//! registers and local state, and the VM-wide interrupt controllers and clock.
//!
//! What a vCPU carries (x86-64): general registers, special registers,
//! XSAVE area (FPU/SSE/AVX; the legacy FPU struct when XSAVE is missing),
//! XCRs, local APIC, the MSRs KVM lists as saveable, MP state, pending
//! events, debug registers, CPUID and the TSC frequency. The VM: PIC master
//! and slave, IOAPIC, PIT and kvmclock.
//!
//! The guest TSC and kvmclock are one clock to a Linux guest: its watchdog
//! drops the `tsc` clocksource when the two disagree. Restoring each as a
//! value (IA32_TSC, then KVM_SET_CLOCK) makes them disagree by however long
//! the restore took between the two calls. So both are saved with the host
//! TSC reading they belong to, and [`sync_tsc`] sets every vCPU's TSC after
//! kvmclock, from a (kvmclock, host TSC) pair read back from KVM, so that the
//! guest sees them advance together however long the restore takes.

use std::sync::OnceLock;

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_device_attr, kvm_irqchip, kvm_lapic_state,
    kvm_mp_state, kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs,
    kvm_xsave, CpuId, Msrs, KVM_CLOCK_HOST_TSC, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_VCPU_TSC_CTRL, KVM_VCPU_TSC_OFFSET,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};
use vmm_sys_util::ioctl::{ioctl, ioctl_with_ref};
use vmm_sys_util::{ioctl_io_nr, ioctl_iow_nr};

use super::msrs::MSR_IA32_TSC;

// vCPU device attributes (kvm-ioctls has them for arm64 only) and the
// VM-wide TSC frequency.
ioctl_iow_nr!(
    KVM_SET_DEVICE_ATTR,
    kvm_bindings::KVMIO,
    0xe1,
    kvm_device_attr
);
ioctl_iow_nr!(
    KVM_GET_DEVICE_ATTR,
    kvm_bindings::KVMIO,
    0xe2,
    kvm_device_attr
);
ioctl_iow_nr!(
    KVM_HAS_DEVICE_ATTR,
    kvm_bindings::KVMIO,
    0xe3,
    kvm_device_attr
);
ioctl_io_nr!(KVM_GET_TSC_KHZ, kvm_bindings::KVMIO, 0xa3);

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
    /// The guest TSC (IA32_TSC) with the host TSC at that read.
    pub tsc_sample: Option<TscSample>,
    /// The vCPU's TSC offset (KVM_VCPU_TSC_OFFSET), when KVM has that attribute.
    pub tsc_offset: Option<u64>,
}

/// A guest TSC value and the host TSC at the moment it held.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TscSample {
    /// Guest TSC.
    pub guest: u64,
    /// Host TSC (the middle of two host reads around the ioctl).
    pub host: u64,
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
    /// The host TSC when kvmclock read `clock`: KVM's own reading when it
    /// gives one (`KVM_CLOCK_HOST_TSC`, with its master clock), else the
    /// middle of two host reads around KVM_GET_CLOCK.
    pub clock_host_tsc: u64,
    /// The host TSC frequency in kHz (KVM_GET_TSC_KHZ on the VM), when known.
    pub host_tsc_khz: Option<u32>,
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

/// The host TSC.
fn host_tsc() -> u64 {
    // SAFETY: RDTSC has no memory effects; every x86-64 CPU has it and
    // Linux leaves it usable in user mode (KVM's host TSC is the same counter).
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Runs `read` between two host TSC reads; the host TSC at the read is
/// taken as their middle.
fn with_host_tsc<T>(read: impl FnOnce() -> T) -> (T, u64) {
    let before = host_tsc();
    let value = read();
    let after = host_tsc();
    (value, before.wrapping_add(after.wrapping_sub(before) / 2))
}

/// The vCPU's TSC now, with the host TSC it belongs to.
fn sample_tsc(vcpu: &VcpuFd) -> Result<TscSample, kvm_ioctls::Error> {
    let entry = kvm_msr_entry {
        index: MSR_IA32_TSC,
        ..Default::default()
    };
    let mut msrs = Msrs::from_entries(&[entry]).expect("one MSR fits");
    let (read, host) = with_host_tsc(|| vcpu.get_msrs(&mut msrs));
    if read? != 1 {
        return Err(kvm_ioctls::Error::new(libc::EIO));
    }
    Ok(TscSample {
        guest: msrs.as_slice()[0].data,
        host,
    })
}

/// Writes the vCPU's IA32_TSC.
fn write_tsc(vcpu: &VcpuFd, value: u64) -> Result<(), kvm_ioctls::Error> {
    let entry = kvm_msr_entry {
        index: MSR_IA32_TSC,
        data: value,
        ..Default::default()
    };
    let msrs = Msrs::from_entries(&[entry]).expect("one MSR fits");
    match vcpu.set_msrs(&msrs)? {
        1 => Ok(()),
        _ => Err(kvm_ioctls::Error::new(libc::EINVAL)),
    }
}

/// kvmclock now, with the host TSC it belongs to.
fn sample_clock(vm: &VmFd) -> Result<(kvm_clock_data, u64), kvm_ioctls::Error> {
    let (clock, host) = with_host_tsc(|| vm.get_clock());
    let clock = clock?;
    if clock.flags & KVM_CLOCK_HOST_TSC != 0 {
        // KVM computed the clock from this very reading: exact.
        return Ok((clock, clock.host_tsc));
    }
    Ok((clock, host))
}

/// The host TSC frequency KVM gives new vCPUs (KVM_GET_TSC_KHZ on the VM,
/// Linux 6.0 and later).
fn vm_tsc_khz(vm: &VmFd) -> Option<u32> {
    // SAFETY: KVM_GET_TSC_KHZ takes no argument and returns the frequency
    // or -1; `vm` is a valid VM fd.
    let khz = unsafe { ioctl(vm, KVM_GET_TSC_KHZ()) };
    u32::try_from(khz).ok().filter(|&k| k > 0)
}

fn tsc_offset_attr(value: &mut u64) -> kvm_device_attr {
    kvm_device_attr {
        flags: 0,
        group: KVM_VCPU_TSC_CTRL,
        attr: u64::from(KVM_VCPU_TSC_OFFSET),
        addr: value as *mut u64 as u64,
    }
}

/// Whether KVM has the vCPU TSC offset attribute (Linux 5.16 and later).
fn has_tsc_offset(vcpu: &VcpuFd) -> bool {
    let mut unused = 0;
    let attr = tsc_offset_attr(&mut unused);
    // SAFETY: KVM_HAS_DEVICE_ATTR reads the kvm_device_attr it is given
    // (and nothing at `addr`); `vcpu` is a valid vCPU fd.
    unsafe { ioctl_with_ref(vcpu, KVM_HAS_DEVICE_ATTR(), &attr) == 0 }
}

/// The vCPU's TSC offset, when KVM has the attribute.
fn get_tsc_offset(vcpu: &VcpuFd) -> Option<u64> {
    if !has_tsc_offset(vcpu) {
        return None;
    }
    let mut value = 0u64;
    let attr = tsc_offset_attr(&mut value);
    // SAFETY: KVM_GET_DEVICE_ATTR writes one u64 at `attr.addr`, which
    // points at `value`, alive and writable for the call.
    let ret = unsafe { ioctl_with_ref(vcpu, KVM_GET_DEVICE_ATTR(), &attr) };
    (ret == 0).then_some(value)
}

/// Sets the vCPU's TSC offset (guest TSC = host TSC + offset when the
/// guest TSC is not scaled).
fn set_tsc_offset(vcpu: &VcpuFd, mut value: u64) -> Result<(), kvm_ioctls::Error> {
    let attr = tsc_offset_attr(&mut value);
    // SAFETY: KVM_SET_DEVICE_ATTR reads one u64 at `attr.addr`, which
    // points at `value`, alive for the call.
    let ret = unsafe { ioctl_with_ref(vcpu, KVM_SET_DEVICE_ATTR(), &attr) };
    if ret == 0 {
        Ok(())
    } else {
        Err(kvm_ioctls::Error::last())
    }
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
        tsc_sample: sample_tsc(vcpu).ok(),
        tsc_offset: get_tsc_offset(vcpu),
    })
}

/// Restores a vCPU from `state`, in the order KVM needs: CPUID and TSC
/// frequency first, then registers, FPU, APIC, MSRs and events last (they
/// may depend on the mode the registers establish).
///
/// The TSC itself (IA32_TSC) is left to [`sync_tsc`], after kvmclock: a
/// value written here would also make KVM treat that later write as a
/// resynchronisation of this one and keep this offset.
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
        .filter(|&&(index, _)| index != MSR_IA32_TSC)
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
    let (clock, clock_host_tsc) = sample_clock(vm).map_err(vm_err("read kvmclock"))?;
    Ok(VmKvmState {
        irqchips,
        pit: if with_pit {
            Some(vm.get_pit2().map_err(vm_err("read the PIT"))?)
        } else {
            None
        },
        clock,
        clock_host_tsc,
        host_tsc_khz: vm_tsc_khz(vm),
    })
}

/// Restores the VM-wide state (after the irqchip and PIT exist).
pub fn restore_vm(vm: &VmFd, state: &VmKvmState) -> Result<(), StateError> {
    restore_vm_chips(vm, state)?;
    restore_vm_clock(vm, state)
}

/// The irqchip and PIT part of [`restore_vm`]: what does not depend on
/// the moment (a prepared restore sets it ahead of its start).
pub fn restore_vm_chips(vm: &VmFd, state: &VmKvmState) -> Result<(), StateError> {
    for chip in &state.irqchips {
        vm.set_irqchip(chip).map_err(vm_err("set the irqchip"))?;
    }
    if let Some(pit) = &state.pit {
        vm.set_pit2(pit).map_err(vm_err("set the PIT"))?;
    }
    Ok(())
}

/// The kvmclock part of [`restore_vm`].
pub fn restore_vm_clock(vm: &VmFd, state: &VmKvmState) -> Result<(), StateError> {
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

/// How [`sync_tsc`] brought the guest TSC in line with kvmclock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TscMethod {
    /// Every vCPU's TSC offset (KVM_VCPU_TSC_OFFSET), computed from the
    /// (kvmclock, host TSC) pair KVM read back: independent of timing.
    Offset,
    /// IA32_TSC written with its value for the host TSC read just before the
    /// write (KVM without the offset attribute, or with a scaled TSC).
    Msr,
    /// KVM keeps the guest TSC whatever is written (PVM runs guests on the
    /// host TSC): kvmclock is set again to follow the guest TSC instead, so
    /// the guest sees the time since the snapshot pass.
    ClockFollowsTsc,
    /// The snapshot lacks the TSC frequency or a TSC reading: the TSC is
    /// restored as a value, as before this pairing existed (TSC and kvmclock
    /// skewed by the time between the two restores).
    Values,
}

/// What [`sync_tsc`] did and how close the result is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TscSync {
    /// The method that held.
    pub method: TscMethod,
    /// The largest |guest TSC - kvmclock| change since the snapshot over
    /// the vCPUs, in ns, measured after the restore (none for `Values`).
    pub worst_skew_ns: Option<i64>,
}

/// Above this, a TSC write did not take effect (KVM ignored it). Well above
/// what measuring costs (two ioctls, even under emulation), well below the
/// skew a restore leaves otherwise.
pub const TSC_SKEW_TOLERANCE_NS: i64 = 200_000;

fn scale(value: i64, num: u32, den: u32) -> i64 {
    (i128::from(value) * i128::from(num) / i128::from(den.max(1))) as i64
}

fn ns_to_cycles(ns: i64, khz: u32) -> i64 {
    scale(ns, khz, 1_000_000)
}

fn cycles_to_ns(cycles: i64, khz: u32) -> i64 {
    scale(cycles, 1_000_000, khz)
}

/// The vCPU's guest TSC when kvmclock read `vm.clock`, from what was saved.
fn tsc_at_clock(vcpu: &VcpuState, vm: &VmKvmState) -> Option<u64> {
    let sample = vcpu.tsc_sample?;
    let guest_khz = vcpu.tsc_khz?;
    if let Some(offset) = vcpu.tsc_offset {
        // Unscaled, guest TSC = host TSC + offset exactly (the sample must
        // agree; a scaled TSC is off by far more than a millisecond).
        let off = sample.guest.wrapping_sub(sample.host.wrapping_add(offset)) as i64;
        if off.unsigned_abs() < u64::from(guest_khz) {
            return Some(vm.clock_host_tsc.wrapping_add(offset));
        }
    }
    let host_khz = vm.host_tsc_khz.unwrap_or(guest_khz);
    let host_delta = vm.clock_host_tsc.wrapping_sub(sample.host) as i64;
    Some(
        sample
            .guest
            .wrapping_add(scale(host_delta, guest_khz, host_khz) as u64),
    )
}

/// One vCPU's target: its guest TSC at the saved kvmclock instant.
#[derive(Clone, Copy)]
struct Anchor {
    tsc: u64,
    khz: u32,
}

struct Clock<'a> {
    vm: &'a VmFd,
    /// kvmclock at the snapshot.
    saved: u64,
    /// Host TSC frequency (the guest's when KVM does not say).
    host_khz: Option<u32>,
}

impl Clock<'_> {
    /// The guest TSC `a` must read when kvmclock reads `clock`.
    fn target(&self, a: Anchor, clock: u64) -> u64 {
        let since = clock.wrapping_sub(self.saved) as i64;
        a.tsc.wrapping_add(ns_to_cycles(since, a.khz) as u64)
    }

    /// kvmclock at host TSC `host`, from a (kvmclock, host TSC) pair.
    fn at(&self, pair: (u64, u64), host: u64, khz: u32) -> u64 {
        let delta = host.wrapping_sub(pair.1) as i64;
        pair.0
            .wrapping_add(cycles_to_ns(delta, self.host_khz.unwrap_or(khz)) as u64)
    }

    fn sample(&self) -> Result<(u64, u64), StateError> {
        let (clock, host) = sample_clock(self.vm).map_err(vm_err("read kvmclock back"))?;
        Ok((clock.clock, host))
    }

    /// How far each vCPU's TSC is from where kvmclock says it should be, in
    /// ns (positive: the TSC is ahead); the largest in magnitude.
    fn worst_skew(&self, vcpus: &[VcpuFd], anchors: &[Anchor]) -> Result<i64, StateError> {
        let mut worst = 0i64;
        for (i, (fd, &a)) in vcpus.iter().zip(anchors).enumerate() {
            let s = sample_tsc(fd).map_err(vcpu_err(i as u8, "read the TSC back"))?;
            let pair = self.sample()?;
            let expected = self.target(a, self.at(pair, s.host, a.khz));
            let skew = cycles_to_ns(s.guest.wrapping_sub(expected) as i64, a.khz);
            if skew.unsigned_abs() > worst.unsigned_abs() {
                worst = skew;
            }
        }
        Ok(worst)
    }
}

/// Brings every vCPU's TSC in line with kvmclock after a restore: call it
/// after [`restore_vm`] (kvmclock set), with the vCPUs restored by
/// [`restore_vcpu`] and not yet running. kvmclock is read back with its host
/// TSC and each guest TSC set to the value it had relative to kvmclock at the
/// snapshot, so both advance together whatever the restore's timing.
///
/// Tries, in order: the TSC offset attribute (exact); IA32_TSC written for
/// the host TSC of the moment; and when KVM ignores both (PVM), kvmclock set
/// to follow the guest TSC. A snapshot without TSC readings (no TSC
/// frequency from KVM) gets the saved IA32_TSC value, as before.
pub fn sync_tsc(
    vm: &VmFd,
    vcpus: &[VcpuFd],
    saved: &[VcpuState],
    state: &VmKvmState,
) -> Result<TscSync, StateError> {
    sync_tsc_from(vm, vcpus, saved, state, None)
}

/// [`sync_tsc`], starting from method `first` (the one that held on an
/// earlier sync of the same VM: a prepared restore syncs ahead, and on
/// this PVM host the two methods before `ClockFollowsTsc` cost about as
/// much again as the one that holds).
pub fn sync_tsc_from(
    vm: &VmFd,
    vcpus: &[VcpuFd],
    saved: &[VcpuState],
    state: &VmKvmState,
    first: Option<TscMethod>,
) -> Result<TscSync, StateError> {
    let sync = set_tsc(vm, vcpus, saved, state, first)?;
    // KVM arms the TSC-deadline timer for the guest TSC at the MSR write:
    // written by restore_vcpu, before the TSC moved, it would fire when the
    // new vCPU's TSC reaches the deadline (the source's uptime later) and the
    // guest's timers would stand still until then. Arm it again.
    for (fd, v) in vcpus.iter().zip(saved) {
        let entries = tsc_deadline_entries(v);
        if entries.is_empty() {
            continue;
        }
        let msrs = Msrs::from_entries(&entries).expect("one MSR entry fits");
        let set = fd
            .set_msrs(&msrs)
            .map_err(vcpu_err(v.id, "re-arm the TSC deadline"))?;
        if set != entries.len() {
            return Err(StateError {
                what: "re-arm the TSC deadline",
                whom: format!("vCPU {}", v.id),
                source: kvm_ioctls::Error::new(libc::EINVAL),
            });
        }
    }
    Ok(sync)
}

/// IA32_TSC_DEADLINE.
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

/// The saved TSC deadline to write again once the TSC is set (none when the
/// timer was not armed: zero disarms, and is what a new vCPU has).
fn tsc_deadline_entries(v: &VcpuState) -> Vec<kvm_msr_entry> {
    v.msrs
        .iter()
        .filter(|&&(index, data)| index == MSR_IA32_TSC_DEADLINE && data != 0)
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect()
}

/// The TSC part of [`sync_tsc`].
fn set_tsc(
    vm: &VmFd,
    vcpus: &[VcpuFd],
    saved: &[VcpuState],
    state: &VmKvmState,
    first: Option<TscMethod>,
) -> Result<TscSync, StateError> {
    let try_offset = matches!(first, None | Some(TscMethod::Offset));
    let try_msr = try_offset || first == Some(TscMethod::Msr);
    let anchors: Option<Vec<Anchor>> = saved
        .iter()
        .map(|v| {
            Some(Anchor {
                tsc: tsc_at_clock(v, state)?,
                khz: v.tsc_khz?,
            })
        })
        .collect();
    let Some(anchors) = anchors else {
        // Fallback, today's behaviour: the TSC as a value, skewed from
        // kvmclock by the time since it was set.
        for (fd, v) in vcpus.iter().zip(saved) {
            if let Some(&(_, value)) = v.msrs.iter().find(|m| m.0 == MSR_IA32_TSC) {
                write_tsc(fd, value).map_err(vcpu_err(v.id, "set the TSC"))?;
            }
        }
        return Ok(TscSync {
            method: TscMethod::Values,
            worst_skew_ns: None,
        });
    };
    let clock = Clock {
        vm,
        saved: state.clock.clock,
        host_khz: vm_tsc_khz(vm).or(state.host_tsc_khz),
    };
    let done = |method, worst: i64| TscSync {
        method,
        worst_skew_ns: Some(worst),
    };

    // The offset attribute: guest TSC = host TSC + offset, so one
    // (kvmclock, host TSC) pair gives every offset, however long the
    // writes take. A scaled TSC fails the check below and falls through.
    if try_offset && vcpus.iter().all(has_tsc_offset) {
        let (now, host) = clock.sample()?;
        for (i, (fd, &a)) in vcpus.iter().zip(&anchors).enumerate() {
            let offset = clock.target(a, now).wrapping_sub(host);
            set_tsc_offset(fd, offset).map_err(vcpu_err(i as u8, "set the TSC offset"))?;
        }
        let worst = clock.worst_skew(vcpus, &anchors)?;
        if worst.abs() <= TSC_SKEW_TOLERANCE_NS {
            return Ok(done(TscMethod::Offset, worst));
        }
    }

    // Without the attribute (before Linux 5.16): IA32_TSC for the host TSC
    // just before each write, off by the write's own latency. KVM keeps the
    // first vCPU's offset for the others when their values match in time.
    if try_msr {
        let pair = clock.sample()?;
        for (i, (fd, &a)) in vcpus.iter().zip(&anchors).enumerate() {
            let value = clock.target(a, clock.at(pair, host_tsc(), a.khz));
            write_tsc(fd, value).map_err(vcpu_err(i as u8, "set the TSC"))?;
        }
        let worst = clock.worst_skew(vcpus, &anchors)?;
        if worst.abs() <= TSC_SKEW_TOLERANCE_NS {
            return Ok(done(TscMethod::Msr, worst));
        }
    }

    // KVM ignored both writes: the guest TSC is the host's. Move kvmclock
    // to it instead (from vCPU 0; they share it), unless that would take
    // kvmclock back before the snapshot (the host rebooted).
    let (fd, a) = (&vcpus[0], anchors[0]);
    let s = sample_tsc(fd).map_err(vcpu_err(0, "read the TSC back"))?;
    let now = host_tsc();
    let guest_now = s.guest.wrapping_add(scale(
        now.wrapping_sub(s.host) as i64,
        a.khz,
        clock.host_khz.unwrap_or(a.khz),
    ) as u64);
    let since = cycles_to_ns(guest_now.wrapping_sub(a.tsc) as i64, a.khz);
    if since >= 0 {
        let value = kvm_clock_data {
            clock: clock.saved.wrapping_add(since as u64),
            ..Default::default()
        };
        vm.set_clock(&value)
            .map_err(vm_err("set kvmclock to the guest TSC"))?;
    }
    let worst = clock.worst_skew(vcpus, &anchors)?;
    Ok(done(TscMethod::ClockFollowsTsc, worst))
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

    /// Guest TSC (in ns at the vCPU's frequency) minus kvmclock, both taken
    /// at one host TSC instant; read with plain ioctls, not the code under test.
    /// Each read is placed at the middle of the host TSC readings around it,
    /// so a thread preempted inside one is off by half the preemption: of
    /// several tries, the one with the tightest bracket is kept (a loaded
    /// machine preempted a single try by 350 us once).
    fn tsc_minus_clock_ns(vm: &VmFd, vcpu: &VcpuFd, khz: u32) -> i128 {
        let entry = kvm_msr_entry {
            index: MSR_IA32_TSC,
            ..Default::default()
        };
        let mut best: Option<(u64, i128)> = None;
        for _ in 0..20 {
            let mut msrs = Msrs::from_entries(&[entry]).unwrap();
            let h0 = host_tsc();
            assert_eq!(vcpu.get_msrs(&mut msrs).unwrap(), 1);
            let h1 = host_tsc();
            let clock = vm.get_clock().unwrap();
            let h2 = host_tsc();
            // Host cycles between the two reads, as guest cycles (unscaled here).
            let between = i128::from(h2 / 2 + h1 / 2) - i128::from(h1 / 2 + h0 / 2);
            let guest = i128::from(msrs.as_slice()[0].data) + between;
            let ns = guest * 1_000_000 / i128::from(khz) - i128::from(clock.clock);
            let width = h2.wrapping_sub(h0);
            if best.is_none_or(|(w, _)| width < w) {
                best = Some((width, ns));
            }
        }
        best.expect("twenty tries").1
    }

    fn fresh_vm(kvm: &Kvm) -> (VmFd, VcpuFd) {
        let vm = kvm.create_vm().unwrap();
        vm.create_irq_chip().unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        let supported = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .unwrap();
        vcpu.set_cpuid2(&supported).unwrap();
        (vm, vcpu)
    }

    /// Host test: a restore that dawdles between the vCPUs and kvmclock
    /// must still leave guest TSC and kvmclock as they were to each other.
    #[test]
    fn tsc_and_kvmclock_keep_their_relation_across_slow_restores() {
        let kvm = open_kvm().expect("this test needs /dev/kvm");
        let (vm, vcpu) = fresh_vm(&kvm);
        let msrs = saveable_msrs(&kvm, &vcpu);
        assert!(msrs.contains(&MSR_IA32_TSC), "IA32_TSC is not saveable");
        vm.set_clock(&kvm_clock_data {
            clock: 5_000_000_000,
            ..Default::default()
        })
        .unwrap();
        let khz = vcpu.get_tsc_khz().expect("KVM reports the TSC frequency");
        let at_save = tsc_minus_clock_ns(&vm, &vcpu, khz);
        let state = save_vcpu(&vcpu, 0, msrs).unwrap();
        let vm_state = save_vm(&vm, false).unwrap();
        let bytes = bitcode::serialize(&(&state, &vm_state)).unwrap();
        let (state, vm_state): (VcpuState, VmKvmState) = bitcode::deserialize(&bytes).unwrap();
        eprintln!(
            "host: TSC offset attribute {}, KVM_CLOCK_HOST_TSC {}, {khz} kHz",
            state.tsc_offset.is_some(),
            vm_state.clock.flags & KVM_CLOCK_HOST_TSC != 0
        );

        let delay = std::time::Duration::from_millis(30);
        // Values only (the old restore): the delay shows up as skew.
        {
            let (vm2, vcpu2) = fresh_vm(&kvm);
            restore_vcpu(&vcpu2, &state).unwrap();
            let saved_tsc = state.msrs.iter().find(|m| m.0 == MSR_IA32_TSC).unwrap().1;
            write_tsc(&vcpu2, saved_tsc).unwrap();
            std::thread::sleep(delay);
            restore_vm(&vm2, &vm_state).unwrap();
            let skew = tsc_minus_clock_ns(&vm2, &vcpu2, khz) - at_save;
            eprintln!("values only, {delay:?} between vCPU and clock: skew {skew} ns");
            assert!(skew >= delay.as_nanos() as i128, "skew {skew} ns");
        }
        // Twice with the pairing, each with its own delay.
        for delay in [delay, 3 * delay] {
            let (vm2, vcpu2) = fresh_vm(&kvm);
            restore_vcpu(&vcpu2, &state).unwrap();
            std::thread::sleep(delay);
            restore_vm(&vm2, &vm_state).unwrap();
            let sync = sync_tsc(
                &vm2,
                std::slice::from_ref(&vcpu2),
                std::slice::from_ref(&state),
                &vm_state,
            )
            .unwrap();
            std::thread::sleep(delay);
            let skew = tsc_minus_clock_ns(&vm2, &vcpu2, khz) - at_save;
            eprintln!(
                "paired, {delay:?} between vCPU and clock: {sync:?}, skew {skew} ns {:?} later",
                delay
            );
            assert!(skew.abs() < 100_000, "skew {skew} ns after {sync:?}");
            let clock = vm2.get_clock().unwrap().clock;
            assert!(clock >= vm_state.clock.clock, "kvmclock went back");
        }
    }

    #[test]
    fn an_armed_tsc_deadline_is_written_again_after_the_tsc() {
        let mut state: VcpuState = {
            let kvm = open_kvm().expect("this test needs /dev/kvm");
            let (_vm, vcpu) = fresh_vm(&kvm);
            save_vcpu(&vcpu, 0, &[]).unwrap()
        };
        state.msrs = vec![(MSR_IA32_TSC, 5), (MSR_IA32_TSC_DEADLINE, 0)];
        assert!(tsc_deadline_entries(&state).is_empty(), "a disarmed timer");
        state.msrs = vec![(MSR_IA32_TSC, 5), (MSR_IA32_TSC_DEADLINE, 9_000)];
        let e = tsc_deadline_entries(&state);
        assert_eq!(e.len(), 1);
        assert_eq!((e[0].index, e[0].data), (MSR_IA32_TSC_DEADLINE, 9_000));
    }

    #[test]
    fn tsc_at_clock_uses_the_offset_when_it_explains_the_sample() {
        let mut state: VcpuState = {
            let kvm = open_kvm().expect("this test needs /dev/kvm");
            let (_vm, vcpu) = fresh_vm(&kvm);
            save_vcpu(&vcpu, 0, &[]).unwrap()
        };
        state.tsc_khz = Some(1_000_000); // 1 cycle per ns
        state.tsc_sample = Some(TscSample {
            guest: 1_000_500,
            host: 1_000_000,
        });
        let vm = VmKvmState {
            irqchips: Vec::new(),
            pit: None,
            clock: kvm_clock_data::default(),
            clock_host_tsc: 3_000_000,
            host_tsc_khz: Some(1_000_000),
        };
        // Offset known and consistent: exact from the clock's host TSC.
        state.tsc_offset = Some(400);
        assert_eq!(tsc_at_clock(&state, &vm), Some(3_000_400));
        // No offset: from the sample, 2 ms of host cycles later.
        state.tsc_offset = None;
        assert_eq!(tsc_at_clock(&state, &vm), Some(3_000_500));
        // A guest TSC at twice the host's frequency advances twice as far.
        state.tsc_khz = Some(2_000_000);
        assert_eq!(tsc_at_clock(&state, &vm), Some(5_000_500));
        // No frequency: nothing to pair.
        state.tsc_khz = None;
        assert_eq!(tsc_at_clock(&state, &vm), None);
    }
}
