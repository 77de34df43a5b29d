//! Segment descriptors: encoding GDT entries, decoding them into the
//! `kvm_segment`s KVM wants in `kvm_sregs`, and writing the GDT and an empty
//! IDT into guest RAM.
//!
//! A descriptor is 8 bytes (Intel SDM vol. 3, 3.4.5):
//!
//! ```text
//! bits  0..16  limit 15:0        bits 40..44  type
//! bits 16..40  base 23:0         bit  44      S (code/data, not system)
//! bits 48..52  limit 19:16       bits 45..47  DPL
//! bits 56..64  base 31:24        bit  47      P (present)
//!                                bit  52 AVL, 53 L (64-bit code), 54 D/B, 55 G (4 KiB units)
//! ```
//!
//! `flags` as taken by [`gdt_entry`] packs bits 40..56 of the descriptor into a
//! `u16`, with the limit nibble (bits 8..12 of `flags`) ignored: e.g. `0xa09b`
//! is G=1 L=1 P=1 DPL=0 S=1 type=0xb (execute/read, accessed).

use kvm_bindings::kvm_segment;
use vm_memory::{Bytes, GuestAddress};

use super::{layout, Error};
use crate::memory::GuestMemoryMmap;

/// Encodes a segment descriptor from its access/flags word (descriptor bits
/// 40..56, limit nibble ignored), 32-bit base and 20-bit limit.
pub fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let flags = u64::from(flags & 0xf0ff);
    let base = u64::from(base);
    let limit = u64::from(limit & 0x000f_ffff);
    ((base & 0xff00_0000) << 32)
        | (flags << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0xffff)
}

/// Decodes descriptor `entry`, stored at GDT index `table_index`, into the
/// segment register state KVM expects.
///
/// The selector is `table_index * 8 | DPL`: TI = 0 (GDT) and the requested
/// privilege level equal to the descriptor's DPL, so ring-0 descriptors (all of
/// [`LINUX_GDT`]) get an RPL of 0. The limit is returned in bytes: with G=1
/// it is scaled to 4 KiB units (`limit << 12 | 0xfff`). A non-present
/// descriptor is marked unusable.
pub fn segment_from_gdt(entry: u64, table_index: u8) -> kvm_segment {
    let bit = |n: u32| ((entry >> n) & 1) as u8;
    let base = ((entry >> 16) & 0x00ff_ffff) | (((entry >> 56) & 0xff) << 24);
    let raw_limit = ((entry & 0xffff) | (((entry >> 48) & 0xf) << 16)) as u32;
    let g = bit(55);
    let limit = if g == 1 {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    let dpl = ((entry >> 45) & 0x3) as u8;
    let present = bit(47);
    kvm_segment {
        base,
        limit,
        selector: (u16::from(table_index) << 3) | u16::from(dpl),
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl,
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g,
        avl: bit(52),
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

/// The GDT a Linux boot CPU starts with, flat 4 GiB segments:
/// 0 null, 1 64-bit ring-0 code (selector 0x08), 2 ring-0 data (0x10),
/// 3 a busy 64-bit TSS (0x18; VM entry in long mode requires a busy TSS in TR,
/// Linux loads its own before using it).
pub const LINUX_GDT: [u64; 4] = [
    0,
    0x00af_9b00_0000_ffff, // gdt_entry(0xa09b, 0, 0xfffff)
    0x00cf_9300_0000_ffff, // gdt_entry(0xc093, 0, 0xfffff)
    0x008f_8b00_0000_ffff, // gdt_entry(0x808b, 0, 0xfffff)
];

/// Writes `gdt` at [`layout::GDT_START`] and an empty (all-zero, 8-byte) IDT
/// at [`layout::IDT_START`]. The GDT must fit before the IDT.
pub fn write_gdt_and_idt(mem: &GuestMemoryMmap, gdt: &[u64]) -> Result<(), Error> {
    if gdt.len() as u64 * 8 > layout::IDT_START - layout::GDT_START {
        return Err(Error::GdtTooBig { entries: gdt.len() });
    }
    for (i, entry) in gdt.iter().enumerate() {
        let addr = layout::GDT_START + i as u64 * 8;
        mem.write_obj(*entry, GuestAddress(addr))
            .map_err(|source| Error::GuestWrite {
                what: "GDT",
                addr,
                source,
            })?;
    }
    mem.write_obj(0u64, GuestAddress(layout::IDT_START))
        .map_err(|source| Error::GuestWrite {
            what: "IDT",
            addr: layout::IDT_START,
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_encodings() {
        assert_eq!(gdt_entry(0xa09b, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(gdt_entry(0xc093, 0, 0xfffff), 0x00cf_9300_0000_ffff);
        assert_eq!(gdt_entry(0x808b, 0, 0xfffff), 0x008f_8b00_0000_ffff);
        assert_eq!(gdt_entry(0, 0, 0), 0);
        // Base split across bits 16..40 and 56..64, limit across 0..16 and 48..52.
        assert_eq!(
            gdt_entry(0x4093, 0x1234_5678, 0xabcde),
            0x124a_9334_5678_bcde
        );
    }

    #[test]
    fn linux_gdt_matches_its_flags() {
        assert_eq!(LINUX_GDT[1], gdt_entry(0xa09b, 0, 0xfffff));
        assert_eq!(LINUX_GDT[2], gdt_entry(0xc093, 0, 0xfffff));
        assert_eq!(LINUX_GDT[3], gdt_entry(0x808b, 0, 0xfffff));
    }

    #[test]
    fn decode_code64() {
        let s = segment_from_gdt(LINUX_GDT[1], 1);
        assert_eq!(s.selector, 0x08);
        assert_eq!(s.base, 0);
        assert_eq!(s.limit, 0xffff_ffff);
        assert_eq!(
            (s.type_, s.present, s.dpl, s.db, s.s, s.l, s.g, s.avl),
            (0xb, 1, 0, 0, 1, 1, 1, 0)
        );
        assert_eq!(s.unusable, 0);
    }

    #[test]
    fn decode_data_and_tss() {
        let d = segment_from_gdt(LINUX_GDT[2], 2);
        assert_eq!(
            (d.selector, d.type_, d.s, d.db, d.l, d.g),
            (0x10, 3, 1, 1, 0, 1)
        );
        let t = segment_from_gdt(LINUX_GDT[3], 3);
        assert_eq!((t.selector, t.type_, t.s, t.present), (0x18, 0xb, 0, 1));
        assert_eq!(segment_from_gdt(0, 0).unusable, 1);
    }

    #[test]
    fn decode_roundtrips_fields() {
        // Byte granularity: the limit is taken as is; DPL 3 shows in the selector.
        let e = gdt_entry(0x40f3, 0xdead_b000, 0x12345);
        let s = segment_from_gdt(e, 5);
        assert_eq!(s.base, 0xdead_b000);
        assert_eq!(s.limit, 0x12345);
        assert_eq!(
            (s.type_, s.dpl, s.present, s.s, s.db, s.g, s.l),
            (3, 3, 1, 1, 1, 0, 0)
        );
        assert_eq!(s.selector, (5 * 8) | 3);
        // Page granularity: limit scaled by 4 KiB.
        let s = segment_from_gdt(gdt_entry(0x8093, 0, 0xf), 2);
        assert_eq!(s.limit, 0xffff);
        // AVL.
        assert_eq!(segment_from_gdt(gdt_entry(0x1093, 0, 0), 2).avl, 1);
    }

    #[test]
    fn writes_gdt_and_idt() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        mem.write_obj(0xffff_ffff_ffff_ffffu64, GuestAddress(layout::IDT_START))
            .unwrap();
        write_gdt_and_idt(&mem, &LINUX_GDT).unwrap();
        for (i, e) in LINUX_GDT.iter().enumerate() {
            let got: u64 = mem
                .read_obj(GuestAddress(layout::GDT_START + i as u64 * 8))
                .unwrap();
            assert_eq!(got, *e);
        }
        let idt: u64 = mem.read_obj(GuestAddress(layout::IDT_START)).unwrap();
        assert_eq!(idt, 0);
        assert!(matches!(
            write_gdt_and_idt(&mem, &[0; 5]),
            Err(Error::GdtTooBig { entries: 5 })
        ));
    }
}
