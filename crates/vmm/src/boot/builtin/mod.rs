//! The built-in guest: a tiny program (guest/builtin) embedded in forkd-vmm
//! that boots in microseconds on any KVM, including a PVM host where only
//! user-mode guest code runs natively.
//!
//! It is entered directly in 64-bit mode at CPL3 with IOPL=3, so it can do
//! port I/O, over identity page tables with the user bit set. There is no
//! guest kernel: no interrupts, no IDT. It idles by blocking in a port read
//! and talks to the VMM through the mailbox page ([`channel`]).

pub mod abi;
pub mod channel;

use kvm_bindings::kvm_mp_state;
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use super::linux::{CR0_ET, CR0_PE, CR0_PG, CR4_PAE, EFER_LMA, EFER_LME};
use super::{gdt, layout, paging};
use crate::memory::GuestMemoryMmap;

/// The guest program, built from guest/builtin by build.rs.
pub static PROGRAM: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/builtin-guest.elf"));

/// GDT of the built-in guest: null, kernel 64-bit code (unused, there for
/// completeness), user 64-bit code, user data.
fn gdt_table() -> [u64; 4] {
    [
        0,
        gdt::gdt_entry(0xa09b, 0, 0xfffff),
        gdt::gdt_entry(0xa0fb, 0, 0xfffff),
        gdt::gdt_entry(0xc0f3, 0, 0xfffff),
    ]
}
const USER_CODE_INDEX: u8 = 2;
const USER_DATA_INDEX: u8 = 3;

/// RFLAGS at entry: IOPL=3 (port I/O allowed at CPL3), reserved bit 1, IF=0.
const ENTRY_RFLAGS: u64 = 0x3002;

/// Errors preparing the built-in guest.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The embedded program did not load.
    #[error("cannot load the built-in guest program: {0}")]
    Load(#[from] linux_loader::loader::Error),
    /// A boot structure did not fit.
    #[error("cannot set up the built-in guest: {0}")]
    Boot(#[from] super::Error),
    /// Guest memory write failed.
    #[error("cannot write the built-in guest's boot info: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
    /// A vCPU register ioctl failed.
    #[error("cannot set up vCPU {vcpu} for the built-in guest: {source}")]
    Vcpu {
        /// Which vCPU.
        vcpu: u8,
        /// The KVM error.
        source: kvm_ioctls::Error,
    },
    /// The embedded program overlaps the guest's virtio area.
    #[error("the built-in guest program ends at {end:#x}, past {max:#x} where its virtio area starts; rebuild it smaller or move the area in abi.rs")]
    ProgramTooLarge {
        /// Where the program ends.
        end: u64,
        /// Where it must end by.
        max: u64,
    },
    /// Too many vCPUs for the stack area.
    #[error("the built-in guest runs on 1 to {max} vCPUs, asked for {asked}")]
    TooManyVcpus {
        /// Limit.
        max: u64,
        /// Asked.
        asked: u8,
    },
}

/// Where the built-in guest starts.
#[derive(Clone, Copy, Debug)]
pub struct Entry {
    /// First instruction.
    pub rip: u64,
}

/// Loads the program and writes its boot structures: GDT, page tables over
/// all of RAM and the 32-bit MMIO gap (where the virtio-mmio windows are),
/// and the boot-info page.
pub fn load(
    mem: &GuestMemoryMmap,
    mem_bytes: u64,
    num_vcpus: u8,
    boot_id: u64,
) -> Result<Entry, Error> {
    use linux_loader::loader::{Elf, KernelLoader};
    if num_vcpus == 0 || num_vcpus > layout::MAX_VCPUS {
        return Err(Error::TooManyVcpus {
            max: u64::from(layout::MAX_VCPUS),
            asked: num_vcpus,
        });
    }
    let mut image = std::io::Cursor::new(PROGRAM);
    let loaded = Elf::load(mem, None, &mut image, Some(GuestAddress(abi::LOAD_ADDR)))?;
    if loaded.kernel_end > abi::PROGRAM_END_MAX {
        return Err(Error::ProgramTooLarge {
            end: loaded.kernel_end,
            max: abi::PROGRAM_END_MAX,
        });
    }

    gdt::write_gdt_and_idt(mem, &gdt_table())?;
    let top = layout::ram_end(mem_bytes).max(layout::MMIO_GAP_END);
    let tables = paging::write_identity_map(mem, abi::PAGE_TABLES_ADDR, top, true)?;
    debug_assert!(abi::PAGE_TABLES_ADDR + tables <= lowest_stack());

    let ranges = layout::ram_ranges(mem_bytes);
    let low_end = ranges[0].1;
    let high = ranges.get(1).map_or(0, |r| r.1);
    let info = |off: u64| GuestAddress(abi::INFO_ADDR + off);
    mem.write_obj(abi::INFO_MAGIC_VALUE, info(abi::INFO_MAGIC))?;
    mem.write_obj(low_end, info(abi::INFO_LOW_RAM_END))?;
    mem.write_obj(high, info(abi::INFO_HIGH_RAM_SIZE))?;
    mem.write_obj(u64::from(num_vcpus), info(abi::INFO_NUM_VCPUS))?;
    mem.write_obj(boot_id, info(abi::INFO_BOOT_ID))?;
    set_generation(mem, boot_id)?;
    mem.write_obj(0u64, info(abi::INFO_COUNTER))?;
    Ok(Entry {
        rip: loaded.kernel_load.0,
    })
}

/// Gives the guest a new VM generation value (at boot, and in every
/// restored child before its vCPUs run).
pub fn set_generation(mem: &GuestMemoryMmap, generation: u64) -> Result<(), Error> {
    mem.write_obj(
        generation,
        GuestAddress(abi::INFO_ADDR + abi::INFO_VM_GENERATION),
    )?;
    Ok(())
}

/// Puts vCPU `id` at the program's entry in 64-bit user mode with its own
/// stack. Secondary vCPUs are made runnable directly (there is no guest
/// kernel to send them INIT/SIPI).
pub fn setup_vcpu(vcpu: &VcpuFd, id: u8, entry: Entry) -> Result<(), Error> {
    let err = |source| Error::Vcpu { vcpu: id, source };
    let mut sregs = vcpu.get_sregs().map_err(err)?;
    let table = gdt_table();
    let user = |index: u8| {
        let mut seg = gdt::segment_from_gdt(table[usize::from(index)], index);
        seg.selector |= 3; // RPL 3
        seg
    };
    sregs.cs = user(USER_CODE_INDEX);
    let data = user(USER_DATA_INDEX);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.gdt.base = layout::GDT_START;
    sregs.gdt.limit = (table.len() * 8 - 1) as u16;
    sregs.idt.base = layout::IDT_START;
    sregs.idt.limit = 7;
    sregs.cr3 = abi::PAGE_TABLES_ADDR;
    sregs.cr4 = CR4_PAE;
    sregs.cr0 = CR0_PE | CR0_ET | CR0_PG;
    sregs.efer = EFER_LME | EFER_LMA;
    vcpu.set_sregs(&sregs).map_err(err)?;

    let regs = kvm_bindings::kvm_regs {
        rip: entry.rip,
        // As if `call`ed: the C entry expects RSP + 8 to be 16-byte aligned.
        rsp: abi::STACKS_TOP - u64::from(id) * abi::STACK_SIZE - 8,
        rdi: u64::from(id),
        rflags: ENTRY_RFLAGS,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(err)?;
    if id != 0 {
        vcpu.set_mp_state(kvm_mp_state {
            mp_state: kvm_bindings::KVM_MP_STATE_RUNNABLE,
        })
        .map_err(err)?;
    }
    Ok(())
}

/// Bottom of the stack of the highest-numbered vCPU.
const fn lowest_stack() -> u64 {
    abi::STACKS_TOP - layout::MAX_VCPUS as u64 * abi::STACK_SIZE
}

/// The fill pattern's 64-bit word at guest address `addr` for (`seed`, `seq`):
/// the same function as `pattern_word` in guest/builtin/main.c, so the host
/// can check guest memory (or a snapshot's memory file) from outside.
pub fn pattern_word(seed: u64, seq: u64, addr: u64) -> u64 {
    let mut z = seed ^ seq.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ addr;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Checks the page stamper's invariant (see [`abi::INFO_STAMP_COUNT`]) in a
/// memory image of a built-in guest, read through `word(guest address)`,
/// from outside the guest (e.g. in a snapshot's memory file). Returns the
/// pages that break it (0 for an image of one instant) and the (pass,
/// cursor) the image holds.
pub fn stamp_violations(mem_bytes: u64, mut word: impl FnMut(u64) -> u64) -> (u64, u64, u64) {
    let n = word(abi::INFO_ADDR + abi::INFO_STAMP_COUNT);
    let base = word(abi::INFO_ADDR + abi::INFO_STAMP_BASE);
    let pages = word(abi::INFO_ADDR + abi::INFO_STAMP_PAGES);
    if pages == 0 {
        return (0, 0, 0);
    }
    let (pass, cursor) = (n / pages + 1, n % pages);
    let low_room = layout::ram_ranges(mem_bytes)[0]
        .1
        .saturating_sub(abi::SCRATCH_START);
    let bad = (0..pages)
        .filter(|&i| {
            let offset = (base + i) << 12;
            let addr = if offset < low_room {
                abi::SCRATCH_START + offset
            } else {
                layout::MMIO_GAP_END + (offset - low_room)
            };
            let want = if i < cursor { pass } else { pass - 1 };
            let got = word(addr);
            (got != want && !(i == cursor && got == pass)) || word(addr + 8) != addr
        })
        .count() as u64;
    (bad, pass, cursor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn program_is_a_static_elf_at_the_load_address() {
        assert_eq!(&PROGRAM[..4], b"\x7fELF");
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let entry = load(&mem, 16 << 20, 2, 42).unwrap();
        assert!(entry.rip >= abi::LOAD_ADDR && entry.rip < abi::PROGRAM_END_MAX);
        let magic: u64 = mem.read_obj(GuestAddress(abi::INFO_ADDR)).unwrap();
        assert_eq!(magic, abi::INFO_MAGIC_VALUE);
        let id: u64 = mem
            .read_obj(GuestAddress(abi::INFO_ADDR + abi::INFO_BOOT_ID))
            .unwrap();
        assert_eq!(id, 42);
        let low: u64 = mem
            .read_obj(GuestAddress(abi::INFO_ADDR + abi::INFO_LOW_RAM_END))
            .unwrap();
        assert_eq!(low, 16 << 20);
    }

    // The fixed structures fit together: checked when the tests compile.
    const _: () = {
        // Page tables for the largest guest end before the lowest stack.
        let pages = 2 + layout::MAX_MEM_MIB.div_ceil(1024) + 1;
        assert!(abi::PAGE_TABLES_ADDR + pages * 4096 <= lowest_stack());
        assert!(layout::CMDLINE_START + layout::CMDLINE_MAX_SIZE as u64 <= abi::PAGE_TABLES_ADDR);
        assert!(abi::STACKS_TOP <= layout::MPTABLE_START);
        assert!(abi::MAILBOX_ADDR + 4096 <= layout::ZERO_PAGE_START);
        assert!(abi::INFO_ADDR + 4096 <= abi::MAILBOX_ADDR);
        // The virtio area lies between the program and scratch memory, and
        // its pieces do not overlap.
        assert!(abi::LOAD_ADDR < abi::PROGRAM_END_MAX);
        assert!(abi::VIRTIO_AREA_END <= abi::SCRATCH_START);
        assert!(abi::VQ_AVAIL_OFFSET >= 16 * abi::VSOCK_RX_NUM);
        assert!(abi::VQ_USED_OFFSET - abi::VQ_AVAIL_OFFSET >= 6 + 2 * abi::VSOCK_RX_NUM);
        assert!(0x2000 - abi::VQ_USED_OFFSET >= 6 + 8 * abi::VSOCK_RX_NUM);
        assert!(abi::VSOCK_RX_NUM >= abi::VSOCK_TX_NUM && abi::VSOCK_RX_NUM >= abi::VSOCK_EV_NUM);
        assert!(abi::VSOCK_TXQ_ADDR >= abi::VSOCK_RXQ_ADDR + 0x2000);
        assert!(abi::VSOCK_EVQ_ADDR >= abi::VSOCK_TXQ_ADDR + 0x2000);
        assert!(abi::VSOCK_EV_BUFS >= abi::VSOCK_EVQ_ADDR + 0x2000);
        assert!(abi::VSOCK_RX_BUFS >= abi::VSOCK_EV_BUFS + 8 * abi::VSOCK_EV_NUM);
        // The windows the guest probes are the ones the device manager uses.
        assert!(abi::VIRTIO_MMIO_BASE == layout::VIRTIO_MMIO_START);
        assert!(abi::VIRTIO_MMIO_WINDOW == layout::VIRTIO_MMIO_SIZE);
        assert!(
            abi::VIRTIO_MMIO_COUNT
                == (crate::devices::virtio::manager::LAST_IRQ
                    - crate::devices::virtio::manager::FIRST_IRQ
                    + 1) as u64
        );
        assert!(abi::AGENT_PORT == proto::agent::DEFAULT_VSOCK_PORT as u64);
        assert!(abi::AGENT_MAX_FRAME == proto::agent::MAX_FRAME as u64);
        assert!(abi::WAKE_MAILBOX == 1 && abi::WAKE_DEVICE == 2);
    };

    #[test]
    fn stamp_checker_accepts_an_instant_and_catches_a_stale_page() {
        let mem_bytes = 4u64 << 20;
        let mut image = vec![0u64; (mem_bytes / 8) as usize];
        let pages = 16u64;
        let n = 3 * pages + 5; // pass 4, cursor 5
        let info = |off: u64| ((abi::INFO_ADDR + off) / 8) as usize;
        image[info(abi::INFO_STAMP_COUNT)] = n;
        image[info(abi::INFO_STAMP_PAGES)] = pages;
        for i in 0..pages {
            let addr = abi::SCRATCH_START + (i << 12);
            image[(addr / 8) as usize] = if i < 5 { 4 } else { 3 };
            image[(addr / 8 + 1) as usize] = addr;
        }
        let check = |img: &Vec<u64>| stamp_violations(mem_bytes, |a| img[(a / 8) as usize]);
        assert_eq!(check(&image), (0, 4, 5));
        // The page at the cursor may already hold the new pass.
        let at_cursor = ((abi::SCRATCH_START + (5 << 12)) / 8) as usize;
        image[at_cursor] = 4;
        assert_eq!(check(&image).0, 0);
        // Any other page out of step is caught.
        let stale = ((abi::SCRATCH_START + (2 << 12)) / 8) as usize;
        image[stale] = 3;
        assert_eq!(check(&image).0, 1);
        image[stale] = 4;
        image[stale + 1] = 0; // wrong address word
        assert_eq!(check(&image).0, 1);
    }

    #[test]
    fn too_many_vcpus_are_refused() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        assert!(matches!(
            load(&mem, 16 << 20, 200, 0),
            Err(Error::TooManyVcpus { .. })
        ));
    }

    #[test]
    fn pattern_depends_on_every_input() {
        let w = pattern_word(1, 2, 0x20_0000);
        assert_ne!(w, pattern_word(2, 2, 0x20_0000));
        assert_ne!(w, pattern_word(1, 3, 0x20_0000));
        assert_ne!(w, pattern_word(1, 2, 0x20_0008));
        assert_eq!(w, pattern_word(1, 2, 0x20_0000));
    }
}
