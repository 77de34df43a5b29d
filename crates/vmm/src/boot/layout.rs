//! The guest-physical memory map of an x86-64 forkd microVM.
//!
//! ```text
//! 0x0000_0500  GDT (4 entries), IDT right after it
//! 0x0000_2000  built-in guest: boot-info page        (see builtin::abi)
//! 0x0000_3000  built-in guest: mailbox page
//! 0x0000_7000  boot_params ("zero page") for a Linux guest
//! 0x0000_8ff0  initial stack pointer of a Linux boot CPU
//! 0x0000_9000  Linux identity page tables: PML4, PDPT, PD (first 1 GiB)
//! 0x0002_0000  kernel command line (up to CMDLINE_MAX_SIZE)
//! 0x0002_2000  built-in guest: user-accessible identity page tables
//! 0x0007_0000  built-in guest: vCPU stacks, 4 KiB each
//! 0x0009_fc00  MP table (in the EBDA, where Linux scans for it)
//! 0x000a_0000  legacy VGA/BIOS hole: reserved in the e820 map
//! 0x0010_0000  kernel (or built-in guest program) load address
//! ...          RAM up to min(size, MMIO_GAP_START)
//! 0xc000_0000  32-bit MMIO gap: virtio-mmio devices, IOAPIC, LAPIC, TSS
//! 0x1_0000_0000 the rest of RAM when it does not fit below the gap
//! ```

/// Where the GDT lives.
pub const GDT_START: u64 = 0x500;
/// Where the (empty) IDT lives, right after the GDT.
pub const IDT_START: u64 = 0x520;
/// The Linux boot_params ("zero page").
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer of a Linux boot CPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// PML4 of the identity page tables used to enter a Linux kernel in 64-bit mode.
pub const LINUX_PML4_START: u64 = 0x9000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Longest command line we accept (the kernel's own limit may be smaller).
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// The MP table, inside the extended BIOS data area.
pub const MPTABLE_START: u64 = 0x9fc00;
/// Start of the legacy hole (EBDA end / VGA / BIOS ROM), reserved in e820.
pub const EBDA_END: u64 = 0xa0000;
/// First byte past the legacy hole; kernels load here.
pub const HIMEM_START: u64 = 0x10_0000;

pub use crate::memory::layout::{
    ram_end, ram_ranges, MAX_MEM_MIB, MIN_MEM_MIB, MMIO_GAP_END, MMIO_GAP_START,
};

/// First virtio-mmio device window; each device takes one `VIRTIO_MMIO_SIZE`.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// Size of one virtio-mmio device window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// IOAPIC base address (fixed by the in-kernel irqchip).
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Local APIC base address.
pub const APIC_START: u64 = 0xfee0_0000;
/// KVM's three-page TSS region (required on Intel, harmless elsewhere).
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
/// KVM's identity-map page for real-mode emulation on Intel (one page below the TSS).
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// Most vCPUs a forkd microVM can have (APIC IDs, MP table and stacks are sized for it).
pub const MAX_VCPUS: u8 = 32;

#[cfg(test)]
mod tests {
    use super::*;

    // The fixed structures must not overlap: checked when the crate compiles.
    const _: () = {
        assert!(GDT_START + 4 * 8 <= IDT_START);
        assert!(ZERO_PAGE_START + 4096 <= BOOT_STACK_POINTER);
        assert!(LINUX_PML4_START + 3 * 4096 <= CMDLINE_START);
        assert!(CMDLINE_START + CMDLINE_MAX_SIZE as u64 <= MPTABLE_START);
        assert!(MPTABLE_START < EBDA_END && EBDA_END <= HIMEM_START);
        assert!(KVM_IDENTITY_MAP_ADDRESS + 4096 <= KVM_TSS_ADDRESS);
        assert!(VIRTIO_MMIO_START >= MMIO_GAP_START && IOAPIC_START < MMIO_GAP_END);
    };
}
