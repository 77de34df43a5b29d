//! The Intel MultiProcessor Specification 1.4 table, which is how a Linux
//! guest without ACPI finds its CPUs, IOAPIC and interrupt routing.
//!
//! Written at [`layout::MPTABLE_START`] (the last KiB of base memory, where
//! Linux scans for it):
//!
//! ```text
//! +0   floating pointer structure ("_MP_", 16 bytes) -> configuration table
//! +16  configuration table header ("PCMP", 44 bytes)
//!      processor entries (20 bytes each), then 8-byte entries:
//!      bus (ISA), IOAPIC, I/O interrupts IRQ 0..=23, local interrupts LINT0/LINT1
//! ```

use std::mem::size_of;

use vm_memory::{ByteValued, Bytes, GuestAddress};

use super::{layout, Error};
use crate::memory::GuestMemoryMmap;

/// MP spec revision we claim (1.4).
const SPEC_REV: u8 = 4;
/// Local APIC version reported for every CPU (integrated APIC).
const LAPIC_VERSION: u8 = 0x14;
/// IOAPIC version reported (82093AA-compatible, what KVM emulates).
const IOAPIC_VERSION: u8 = 0x11;
/// Number of IOAPIC pins (KVM's in-kernel IOAPIC has 24).
const IOAPIC_PINS: u8 = 24;
/// ID of the only bus.
const ISA_BUS_ID: u8 = 0;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;

/// Processor entry flag: enabled.
const CPU_ENABLED: u8 = 1 << 0;
/// Processor entry flag: bootstrap processor.
const CPU_BOOTSTRAP: u8 = 1 << 1;
/// CPU signature: family 6 (stepping/model 0).
const CPU_SIGNATURE: u32 = 6 << 8;
/// CPUID.1:EDX feature flags reported: FPU and APIC.
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);
/// IOAPIC entry flag: usable.
const IOAPIC_ENABLED: u8 = 1;

/// Interrupt type: vectored interrupt (from the IOAPIC redirection entry).
const INT_TYPE_INT: u8 = 0;
/// Interrupt type: non-maskable interrupt.
const INT_TYPE_NMI: u8 = 1;
/// Interrupt type: external (8259) interrupt.
const INT_TYPE_EXTINT: u8 = 3;
/// Polarity/trigger: conforms to the bus (edge/high for ISA).
const INT_FLAGS_CONFORM: u16 = 0;
/// Local interrupt destination meaning every local APIC.
const ALL_LOCAL_APICS: u8 = 0xff;

/// MP floating pointer structure.
#[repr(C, packed)]
#[derive(Clone, Copy, Default, Debug)]
struct MpFloatingPointer {
    signature: [u8; 4],
    config_table: u32,
    length_paragraphs: u8,
    spec_rev: u8,
    checksum: u8,
    feature1: u8,
    feature2: u8,
    feature3_5: [u8; 3],
}

/// MP configuration table header.
#[repr(C, packed)]
#[derive(Clone, Copy, Default, Debug)]
struct MpConfigHeader {
    signature: [u8; 4],
    base_table_length: u16,
    spec_rev: u8,
    checksum: u8,
    oem_id: [u8; 8],
    product_id: [u8; 12],
    oem_table: u32,
    oem_table_size: u16,
    entry_count: u16,
    lapic_address: u32,
    extended_table_length: u16,
    extended_table_checksum: u8,
    reserved: u8,
}

/// Processor entry.
#[repr(C, packed)]
#[derive(Clone, Copy, Default, Debug)]
struct MpProcessor {
    entry_type: u8,
    lapic_id: u8,
    lapic_version: u8,
    flags: u8,
    signature: u32,
    features: u32,
    reserved: [u32; 2],
}

/// Bus entry.
#[repr(C, packed)]
#[derive(Clone, Copy, Default, Debug)]
struct MpBus {
    entry_type: u8,
    bus_id: u8,
    bus_type: [u8; 6],
}

/// I/O APIC entry.
#[repr(C, packed)]
#[derive(Clone, Copy, Default, Debug)]
struct MpIoApic {
    entry_type: u8,
    apic_id: u8,
    version: u8,
    flags: u8,
    address: u32,
}

/// I/O interrupt assignment entry and local interrupt assignment entry (same layout).
#[repr(C, packed)]
#[derive(Clone, Copy, Default, Debug)]
struct MpInterrupt {
    entry_type: u8,
    interrupt_type: u8,
    flags: u16,
    source_bus: u8,
    source_irq: u8,
    dest_apic: u8,
    dest_pin: u8,
}

// SAFETY: each struct is #[repr(C, packed)] made only of integers and integer
// arrays, so it has no padding and every bit pattern is a valid value.
unsafe impl ByteValued for MpFloatingPointer {}
// SAFETY: as above: packed, integer fields only, no padding, any bits valid.
unsafe impl ByteValued for MpConfigHeader {}
// SAFETY: as above: packed, integer fields only, no padding, any bits valid.
unsafe impl ByteValued for MpProcessor {}
// SAFETY: as above: packed, integer fields only, no padding, any bits valid.
unsafe impl ByteValued for MpBus {}
// SAFETY: as above: packed, integer fields only, no padding, any bits valid.
unsafe impl ByteValued for MpIoApic {}
// SAFETY: as above: packed, integer fields only, no padding, any bits valid.
unsafe impl ByteValued for MpInterrupt {}

/// Bytes the whole MP table (floating pointer included) takes for `num_cpus`.
fn table_size(num_cpus: u8) -> u64 {
    (size_of::<MpFloatingPointer>()
        + size_of::<MpConfigHeader>()
        + usize::from(num_cpus) * size_of::<MpProcessor>()
        + size_of::<MpBus>()
        + size_of::<MpIoApic>()
        + (usize::from(IOAPIC_PINS) + 2) * size_of::<MpInterrupt>()) as u64
}

/// The two's-complement byte that makes `bytes` sum to 0 mod 256.
fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |s, b| s.wrapping_add(*b))
        .wrapping_neg()
}

/// Writes an MP spec 1.4 table at [`layout::MPTABLE_START`] describing
/// `num_cpus` CPUs (local APIC id = index, CPU 0 the bootstrap processor), one
/// ISA bus, the IOAPIC at [`layout::IOAPIC_START`] with id `num_cpus`, IRQs
/// 0..=23 routed to the IOAPIC pin of the same number, ExtINT on LINT0 and NMI
/// on LINT1.
///
/// Fails if `num_cpus` is 0 or above [`layout::MAX_VCPUS`], or if the table
/// would not end before [`layout::EBDA_END`].
pub fn write_mptable(mem: &GuestMemoryMmap, num_cpus: u8) -> Result<(), Error> {
    if num_cpus == 0 || num_cpus > layout::MAX_VCPUS {
        return Err(Error::MpTableCpus { num_cpus });
    }
    let size = table_size(num_cpus);
    if layout::MPTABLE_START + size > layout::EBDA_END {
        return Err(Error::MpTableTooBig { size });
    }

    // Entries are assembled in a buffer so the checksum can cover them.
    let mut entries: Vec<u8> = Vec::with_capacity(size as usize);
    let mut count: u16 = 0;
    let mut push = |bytes: &[u8]| {
        entries.extend_from_slice(bytes);
        count += 1;
    };
    for cpu in 0..num_cpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOTSTRAP } else { 0 };
        push(
            MpProcessor {
                entry_type: ENTRY_PROCESSOR,
                lapic_id: cpu,
                lapic_version: LAPIC_VERSION,
                flags,
                signature: CPU_SIGNATURE,
                features: CPU_FEATURES,
                reserved: [0; 2],
            }
            .as_slice(),
        );
    }
    push(
        MpBus {
            entry_type: ENTRY_BUS,
            bus_id: ISA_BUS_ID,
            bus_type: *b"ISA   ",
        }
        .as_slice(),
    );
    let ioapic_id = num_cpus;
    push(
        MpIoApic {
            entry_type: ENTRY_IOAPIC,
            apic_id: ioapic_id,
            version: IOAPIC_VERSION,
            flags: IOAPIC_ENABLED,
            address: layout::IOAPIC_START as u32,
        }
        .as_slice(),
    );
    for irq in 0..IOAPIC_PINS {
        push(
            MpInterrupt {
                entry_type: ENTRY_IO_INTERRUPT,
                interrupt_type: INT_TYPE_INT,
                flags: INT_FLAGS_CONFORM,
                source_bus: ISA_BUS_ID,
                source_irq: irq,
                dest_apic: ioapic_id,
                dest_pin: irq,
            }
            .as_slice(),
        );
    }
    for (lint, kind) in [(0u8, INT_TYPE_EXTINT), (1, INT_TYPE_NMI)] {
        push(
            MpInterrupt {
                entry_type: ENTRY_LOCAL_INTERRUPT,
                interrupt_type: kind,
                flags: INT_FLAGS_CONFORM,
                source_bus: ISA_BUS_ID,
                source_irq: 0,
                dest_apic: ALL_LOCAL_APICS,
                dest_pin: lint,
            }
            .as_slice(),
        );
    }

    let fp_addr = layout::MPTABLE_START;
    let header_addr = fp_addr + size_of::<MpFloatingPointer>() as u64;
    let mut header = MpConfigHeader {
        signature: *b"PCMP",
        base_table_length: (size_of::<MpConfigHeader>() + entries.len()) as u16,
        spec_rev: SPEC_REV,
        checksum: 0,
        oem_id: *b"FORKD   ",
        product_id: *b"MICROVM     ",
        oem_table: 0,
        oem_table_size: 0,
        entry_count: count,
        lapic_address: layout::APIC_START as u32,
        extended_table_length: 0,
        extended_table_checksum: 0,
        reserved: 0,
    };
    let mut all = header.as_slice().to_vec();
    all.extend_from_slice(&entries);
    header.checksum = checksum(&all);

    let mut fp = MpFloatingPointer {
        signature: *b"_MP_",
        config_table: header_addr as u32,
        length_paragraphs: 1,
        spec_rev: SPEC_REV,
        checksum: 0,
        // 0: a configuration table is present (no default configuration).
        feature1: 0,
        // IMCR absent: virtual-wire mode.
        feature2: 0,
        feature3_5: [0; 3],
    };
    fp.checksum = checksum(fp.as_slice());

    let write = |bytes: &[u8], addr: u64| {
        mem.write_slice(bytes, GuestAddress(addr))
            .map_err(|source| Error::GuestWrite {
                what: "MP table",
                addr,
                source,
            })
    };
    write(fp.as_slice(), fp_addr)?;
    write(header.as_slice(), header_addr)?;
    write(&entries, header_addr + size_of::<MpConfigHeader>() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap()
    }

    fn sum(mem: &GuestMemoryMmap, addr: u64, len: usize) -> u8 {
        let mut buf = vec![0u8; len];
        mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf.iter().fold(0u8, |s, b| s.wrapping_add(*b))
    }

    #[test]
    fn struct_sizes_match_the_spec() {
        assert_eq!(size_of::<MpFloatingPointer>(), 16);
        assert_eq!(size_of::<MpConfigHeader>(), 44);
        assert_eq!(size_of::<MpProcessor>(), 20);
        assert_eq!(size_of::<MpBus>(), 8);
        assert_eq!(size_of::<MpIoApic>(), 8);
        assert_eq!(size_of::<MpInterrupt>(), 8);
        assert!(layout::MPTABLE_START + table_size(layout::MAX_VCPUS) <= layout::EBDA_END);
    }

    #[test]
    fn table_is_well_formed() {
        for n in [1u8, 4, layout::MAX_VCPUS] {
            let m = mem();
            write_mptable(&m, n).unwrap();
            let fp: MpFloatingPointer = m.read_obj(GuestAddress(layout::MPTABLE_START)).unwrap();
            assert_eq!(&fp.signature, b"_MP_");
            assert_eq!(sum(&m, layout::MPTABLE_START, 16), 0);
            let config = u64::from(fp.config_table);
            assert_eq!(config, layout::MPTABLE_START + 16);

            let h: MpConfigHeader = m.read_obj(GuestAddress(config)).unwrap();
            assert_eq!(&h.signature, b"PCMP");
            let len = usize::from(h.base_table_length);
            assert_eq!(sum(&m, config, len), 0);
            assert_eq!({ h.entry_count }, u16::from(n) + 1 + 1 + 24 + 2);
            assert_eq!(16 + len as u64, table_size(n));

            let mut at = config + 44;
            for cpu in 0..n {
                let p: MpProcessor = m.read_obj(GuestAddress(at)).unwrap();
                assert_eq!(p.entry_type, ENTRY_PROCESSOR);
                assert_eq!(p.lapic_id, cpu);
                assert_eq!(p.flags & CPU_ENABLED, CPU_ENABLED);
                assert_eq!(p.flags & CPU_BOOTSTRAP != 0, cpu == 0);
                at += 20;
            }
            let bus: MpBus = m.read_obj(GuestAddress(at)).unwrap();
            assert_eq!((bus.entry_type, &bus.bus_type), (ENTRY_BUS, b"ISA   "));
            let io: MpIoApic = m.read_obj(GuestAddress(at + 8)).unwrap();
            assert_eq!((io.entry_type, io.apic_id), (ENTRY_IOAPIC, n));
            assert_eq!(u64::from(io.address), layout::IOAPIC_START);
            let last: MpInterrupt = m.read_obj(GuestAddress(at + 16 + 23 * 8)).unwrap();
            assert_eq!(
                (last.source_irq, last.dest_pin, last.dest_apic),
                (23, 23, n)
            );
            let lint1: MpInterrupt = m.read_obj(GuestAddress(at + 16 + 25 * 8)).unwrap();
            assert_eq!(
                (lint1.entry_type, lint1.interrupt_type, lint1.dest_pin),
                (ENTRY_LOCAL_INTERRUPT, INT_TYPE_NMI, 1)
            );
        }
    }

    #[test]
    fn refuses_bad_cpu_counts() {
        let m = mem();
        assert!(matches!(
            write_mptable(&m, 0),
            Err(Error::MpTableCpus { num_cpus: 0 })
        ));
        assert!(matches!(
            write_mptable(&m, layout::MAX_VCPUS + 1),
            Err(Error::MpTableCpus { .. })
        ));
    }
}
