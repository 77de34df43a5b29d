//! Booting a Linux kernel directly in 64-bit mode: load the kernel (ELF
//! vmlinux or bzImage), initrd and command line, write boot_params, the MP
//! table, GDT/IDT and identity page tables, and set up the boot vCPU.
//!
//! This follows the 64-bit boot protocol (Documentation/arch/x86/boot.rst):
//! the boot CPU enters the kernel in long mode with paging on, flat
//! segments, interrupts off and `rsi` pointing at boot_params.

use std::fs::File;
use std::path::{Path, PathBuf};

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};
use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{load_cmdline, BzImage, Elf, KernelLoader, KernelLoaderResult};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::gdt::{segment_from_gdt, write_gdt_and_idt, LINUX_GDT};
use super::{layout, mptable, paging, Error};
use crate::memory::GuestMemoryMmap;

/// Command line used when the user gives none: serial console on the 8250,
/// reboot through the i8042 (`reboot=k`, which the VMM turns into a VM exit),
/// exit on panic, and no probing for hardware a microVM does not have.
pub const DEFAULT_CMDLINE: &str =
    "console=ttyS0 reboot=k panic=1 pci=off nomodule i8042.noaux i8042.nomux i8042.dumbkbd";

/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type of reserved memory.
pub const E820_RESERVED: u32 = 2;

/// CR0.PE: protected mode.
pub const CR0_PE: u64 = 1 << 0;
/// CR0.ET: extension type (always 1 on modern CPUs).
pub const CR0_ET: u64 = 1 << 4;
/// CR0.NE: native x87 error reporting (what Linux uses; also fixed to 1 under VMX).
pub const CR0_NE: u64 = 1 << 5;
/// CR0.PG: paging.
pub const CR0_PG: u64 = 1 << 31;
/// CR4.PAE: physical address extension (required for long mode).
pub const CR4_PAE: u64 = 1 << 5;
/// EFER.LME: long mode enable.
pub const EFER_LME: u64 = 1 << 8;
/// EFER.LMA: long mode active.
pub const EFER_LMA: u64 = 1 << 10;

/// `boot_flag` value every boot_params carries.
const BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// `header` value: "HdrS".
const HDRS_MAGIC: u32 = 0x5372_6448;
/// `type_of_loader`: a boot loader without an assigned ID.
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// `kernel_alignment` when the kernel gives none (vmlinux): 16 MiB.
const DEFAULT_KERNEL_ALIGNMENT: u32 = 0x0100_0000;
/// `xloadflags` bit: the kernel has the legacy 64-bit entry point at load + 0x200.
const XLF_KERNEL_64: u16 = 1 << 0;
/// Offset of the 64-bit entry point in a bzImage's protected-mode kernel.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// Identity-mapped range the Linux boot CPU starts with.
const LINUX_IDENTITY_MAP_TOP: u64 = 1 << 30;
/// x87 control word after FNINIT.
const FPU_FCW: u16 = 0x37f;
/// MXCSR after reset: all SSE exceptions masked.
const FPU_MXCSR: u32 = 0x1f80;
/// RFLAGS with only the always-one bit 1 set (interrupts off).
const RFLAGS_RESERVED: u64 = 0x2;
const PAGE_SIZE: u64 = 0x1000;

/// What to boot: the user's choice of kernel, initrd and command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinuxBootConfig {
    /// An uncompressed ELF vmlinux or a bzImage.
    pub kernel: PathBuf,
    /// Optional initial ramdisk, copied as is into guest RAM.
    pub initrd: Option<PathBuf>,
    /// The kernel command line ([`DEFAULT_CMDLINE`] is a sensible start).
    pub cmdline: String,
}

/// Where the boot vCPU starts executing the loaded kernel (64-bit entry).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelEntry {
    /// Guest-physical (= identity-mapped virtual) address of the 64-bit entry point.
    pub entry: GuestAddress,
}

/// The e820 map `(addr, size, type)` Linux gets for `mem_bytes` of RAM laid
/// out by [`layout::ram_ranges`]: RAM below the MP table, the MP table's
/// KiB of EBDA reserved, nothing in the legacy hole `[EBDA_END, HIMEM_START)`,
/// RAM from [`layout::HIMEM_START`] to the end of low RAM, and the RAM above
/// 4 GiB if any. The MMIO gap is left out (a hole, not RAM).
pub fn e820_entries(mem_bytes: u64) -> Vec<(u64, u64, u32)> {
    let mut map = Vec::new();
    let ranges = layout::ram_ranges(mem_bytes);
    let low_end = ranges.first().map(|(s, l)| s + l).unwrap_or(0);
    let base_end = low_end.min(layout::MPTABLE_START);
    if base_end > 0 {
        map.push((0, base_end, E820_RAM));
    }
    map.push((
        layout::MPTABLE_START,
        layout::EBDA_END - layout::MPTABLE_START,
        E820_RESERVED,
    ));
    if low_end > layout::HIMEM_START {
        map.push((layout::HIMEM_START, low_end - layout::HIMEM_START, E820_RAM));
    }
    for &(start, len) in ranges.iter().skip(1) {
        map.push((start, len, E820_RAM));
    }
    map
}

/// Loads the kernel, initrd and command line of `cfg` into `mem` and writes
/// every structure the boot CPU needs: boot_params at
/// [`layout::ZERO_PAGE_START`], the MP table for `num_cpus`, the GDT/IDT and
/// the identity page tables at [`layout::LINUX_PML4_START`] (first GiB).
///
/// The kernel is tried as an ELF vmlinux first (loaded at its physical
/// addresses, which must be at or above [`layout::HIMEM_START`]), then as a
/// bzImage (its protected-mode part loaded at [`layout::HIMEM_START`]). The
/// initrd goes page-aligned at the top of low RAM, below the MMIO gap and the
/// kernel's `initrd_addr_max`.
pub fn load_linux(
    mem: &GuestMemoryMmap,
    cfg: &LinuxBootConfig,
    num_cpus: u8,
) -> Result<KernelEntry, Error> {
    let cmdline = check_cmdline(&cfg.cmdline)?;

    let mut kernel = File::open(&cfg.kernel).map_err(|source| Error::File {
        what: "kernel",
        path: cfg.kernel.clone(),
        source,
    })?;
    let himem = Some(GuestAddress(layout::HIMEM_START));
    let loaded = match Elf::load(mem, None, &mut kernel, himem) {
        Ok(r) => r,
        Err(elf) => {
            BzImage::load(mem, himem, &mut kernel, himem).map_err(|bzimage| Error::NotAKernel {
                path: cfg.kernel.clone(),
                elf,
                bzimage,
            })?
        }
    };
    let (entry, kernel_end) = kernel_entry_and_end(&loaded, &cfg.kernel)?;

    let mut params = boot_params::default();
    match loaded.setup_header {
        Some(hdr) => params.hdr = hdr,
        None => {
            params.hdr.boot_flag = BOOT_FLAG_MAGIC;
            params.hdr.header = HDRS_MAGIC;
            params.hdr.kernel_alignment = DEFAULT_KERNEL_ALIGNMENT;
        }
    }
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;

    // Command line: within the kernel's own limit when its header states one.
    let cmdline_len = cmdline
        .as_cstring()
        .map_err(Error::Cmdline)?
        .as_bytes()
        .len();
    if loaded.setup_header.is_some() && params.hdr.version >= 0x0206 {
        let max = params.hdr.cmdline_size as usize;
        if max != 0 && cmdline_len > max {
            return Err(Error::CmdlineTooLong {
                len: cmdline_len,
                max,
            });
        }
    }
    load_cmdline(mem, GuestAddress(layout::CMDLINE_START), &cmdline)
        .map_err(Error::CmdlineWrite)?;
    params.hdr.cmd_line_ptr = layout::CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32;

    let mem_bytes: u64 = mem.iter().map(|r| r.len()).sum();
    if let Some(path) = &cfg.initrd {
        let initrd_max = loaded
            .setup_header
            .filter(|h| h.version >= 0x0203 && h.initrd_addr_max != 0)
            .map(|h| u64::from(h.initrd_addr_max) + 1);
        let (addr, size) = load_initrd(mem, path, mem_bytes, kernel_end, initrd_max)?;
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }

    let e820 = e820_entries(mem_bytes);
    for (slot, &(addr, size, kind)) in params.e820_table.iter_mut().zip(&e820) {
        *slot = boot_e820_entry {
            addr,
            size,
            r#type: kind,
        };
    }
    // At most four entries: always fits the zero page's table of 128.
    params.e820_entries = e820.len() as u8;

    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new(&params, GuestAddress(layout::ZERO_PAGE_START)),
        mem,
    )
    .map_err(Error::BootParams)?;

    mptable::write_mptable(mem, num_cpus)?;
    write_gdt_and_idt(mem, &LINUX_GDT)?;
    let tables =
        paging::write_identity_map(mem, layout::LINUX_PML4_START, LINUX_IDENTITY_MAP_TOP, false)?;
    debug_assert!(layout::LINUX_PML4_START + tables <= layout::CMDLINE_START);

    Ok(KernelEntry { entry })
}

/// Validates the user's command line and parses it with linux-loader.
fn check_cmdline(raw: &str) -> Result<Cmdline, Error> {
    if raw.contains('\0') {
        return Err(Error::CmdlineNul);
    }
    // The limit counts the terminating NUL.
    if raw.len() >= layout::CMDLINE_MAX_SIZE {
        return Err(Error::CmdlineTooLong {
            len: raw.len(),
            max: layout::CMDLINE_MAX_SIZE - 1,
        });
    }
    Cmdline::try_from(raw, layout::CMDLINE_MAX_SIZE).map_err(Error::Cmdline)
}

/// The 64-bit entry point of a loaded kernel and the first byte it may still
/// use (a bzImage decompresses in place up to `load + init_size`).
fn kernel_entry_and_end(
    loaded: &KernelLoaderResult,
    path: &Path,
) -> Result<(GuestAddress, u64), Error> {
    match loaded.setup_header {
        None => Ok((loaded.kernel_load, loaded.kernel_end)),
        Some(hdr) => {
            if hdr.version < 0x020c || hdr.xloadflags & XLF_KERNEL_64 == 0 {
                return Err(Error::NotA64BitKernel {
                    path: path.to_path_buf(),
                });
            }
            let load = loaded.kernel_load.0;
            let end = loaded.kernel_end.max(load + u64::from(hdr.init_size));
            Ok((GuestAddress(load + BZIMAGE_64BIT_ENTRY_OFFSET), end))
        }
    }
}

/// Copies the initrd at `path` page-aligned to the highest place that ends
/// below low RAM's end, the MMIO gap and `addr_limit`, and above `kernel_end`.
/// Returns its address and size.
fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    mem_bytes: u64,
    kernel_end: u64,
    addr_limit: Option<u64>,
) -> Result<(u64, u64), Error> {
    let data = std::fs::read(path).map_err(|source| Error::File {
        what: "initrd",
        path: path.to_path_buf(),
        source,
    })?;
    let size = data.len() as u64;
    let mut limit = mem_bytes.min(layout::MMIO_GAP_START);
    if let Some(max) = addr_limit {
        limit = limit.min(max);
    }
    let lowest = kernel_end.div_ceil(PAGE_SIZE) * PAGE_SIZE;
    let too_big = || Error::InitrdTooBig {
        path: path.to_path_buf(),
        size,
        kernel_end,
        limit,
    };
    let addr = limit.checked_sub(size).ok_or_else(too_big)? & !(PAGE_SIZE - 1);
    if addr < lowest {
        return Err(too_big());
    }
    mem.write_slice(&data, GuestAddress(addr))
        .map_err(|source| Error::GuestWrite {
            what: "initrd",
            addr,
            source,
        })?;
    Ok((addr, size))
}

/// The special registers of a CPU entering Linux in 64-bit mode: `base` (as
/// read with KVM_GET_SREGS, for the fields not set here such as the APIC base)
/// with flat segments from [`LINUX_GDT`] (CS = index 1, DS/ES/FS/GS/SS = 2,
/// TR = 3), the GDT and IDT registers, CR0 = PE|ET|NE|PG (caches enabled),
/// CR3 = [`layout::LINUX_PML4_START`], CR4 = PAE and EFER = LME|LMA.
pub fn long_mode_sregs(base: kvm_sregs) -> kvm_sregs {
    let mut s = base;
    s.cs = segment_from_gdt(LINUX_GDT[1], 1);
    let data = segment_from_gdt(LINUX_GDT[2], 2);
    s.ds = data;
    s.es = data;
    s.fs = data;
    s.gs = data;
    s.ss = data;
    s.tr = segment_from_gdt(LINUX_GDT[3], 3);
    s.gdt.base = layout::GDT_START;
    s.gdt.limit = (LINUX_GDT.len() * 8 - 1) as u16;
    s.idt.base = layout::IDT_START;
    s.idt.limit = 7;
    s.cr0 = CR0_PE | CR0_ET | CR0_NE | CR0_PG;
    s.cr3 = layout::LINUX_PML4_START;
    s.cr4 = CR4_PAE;
    s.efer = EFER_LME | EFER_LMA;
    s
}

/// Puts the boot vCPU in the state the 64-bit boot protocol requires: FPU
/// reset state, `rip` at `entry`, stack at [`layout::BOOT_STACK_POINTER`],
/// `rsi` at boot_params, interrupts off, and [`long_mode_sregs`].
///
/// For the boot CPU only: the others wait for INIT/SIPI from the kernel.
/// CPUID and MSRs are set separately (`kvm::cpuid`, `kvm::msrs`).
pub fn setup_linux_vcpu(vcpu: &kvm_ioctls::VcpuFd, entry: &KernelEntry) -> Result<(), Error> {
    let vcpu_err = |what: &'static str| move |source| Error::Vcpu { what, source };
    let fpu = kvm_fpu {
        fcw: FPU_FCW,
        mxcsr: FPU_MXCSR,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(vcpu_err("KVM_SET_FPU"))?;
    let regs = kvm_regs {
        rflags: RFLAGS_RESERVED,
        rip: entry.entry.0,
        rsp: layout::BOOT_STACK_POINTER,
        rbp: layout::BOOT_STACK_POINTER,
        rsi: layout::ZERO_PAGE_START,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(vcpu_err("KVM_SET_REGS"))?;
    let base = vcpu.get_sregs().map_err(vcpu_err("KVM_GET_SREGS"))?;
    vcpu.set_sregs(&long_mode_sregs(base))
        .map_err(vcpu_err("KVM_SET_SREGS"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const MEM: usize = 128 << 20;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap()
    }

    /// A file in the temp dir, removed on drop.
    struct TempFile(PathBuf);

    impl TempFile {
        fn new(contents: &[u8]) -> Self {
            static N: AtomicUsize = AtomicUsize::new(0);
            let path = std::env::temp_dir().join(format!(
                "forkd-linux-test-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::write(&path, contents).unwrap();
            TempFile(path)
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    const ELF_LOAD: u64 = 0x20_0000;
    const CODE: [u8; 4] = [0xf4, 0xeb, 0xfd, 0x90]; // hlt; jmp hlt; nop

    /// A minimal ELF64 x86-64 executable: header, one PT_LOAD, `CODE`.
    fn tiny_elf() -> Vec<u8> {
        let mut f = Vec::new();
        // e_ident: magic, ELFCLASS64, little endian, version 1, System V ABI.
        f.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0]);
        f.extend_from_slice(&[0; 8]);
        f.extend_from_slice(&2u16.to_le_bytes()); // e_type: EXEC
        f.extend_from_slice(&0x3eu16.to_le_bytes()); // e_machine: x86-64
        f.extend_from_slice(&1u32.to_le_bytes()); // e_version
        f.extend_from_slice(&ELF_LOAD.to_le_bytes()); // e_entry
        f.extend_from_slice(&64u64.to_le_bytes()); // e_phoff
        f.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
        f.extend_from_slice(&0u32.to_le_bytes()); // e_flags
        f.extend_from_slice(&64u16.to_le_bytes()); // e_ehsize
        f.extend_from_slice(&56u16.to_le_bytes()); // e_phentsize
        f.extend_from_slice(&1u16.to_le_bytes()); // e_phnum
        f.extend_from_slice(&64u16.to_le_bytes()); // e_shentsize
        f.extend_from_slice(&0u16.to_le_bytes()); // e_shnum
        f.extend_from_slice(&0u16.to_le_bytes()); // e_shstrndx
        assert_eq!(f.len(), 64);
        f.extend_from_slice(&1u32.to_le_bytes()); // p_type: PT_LOAD
        f.extend_from_slice(&5u32.to_le_bytes()); // p_flags: R+X
        f.extend_from_slice(&120u64.to_le_bytes()); // p_offset
        f.extend_from_slice(&ELF_LOAD.to_le_bytes()); // p_vaddr
        f.extend_from_slice(&ELF_LOAD.to_le_bytes()); // p_paddr
        f.extend_from_slice(&(CODE.len() as u64).to_le_bytes()); // p_filesz
        f.extend_from_slice(&(CODE.len() as u64).to_le_bytes()); // p_memsz
        f.extend_from_slice(&0x1000u64.to_le_bytes()); // p_align
        assert_eq!(f.len(), 120);
        f.extend_from_slice(&CODE);
        f
    }

    fn config(kernel: &TempFile, initrd: Option<&TempFile>, cmdline: &str) -> LinuxBootConfig {
        LinuxBootConfig {
            kernel: kernel.0.clone(),
            initrd: initrd.map(|f| f.0.clone()),
            cmdline: cmdline.to_string(),
        }
    }

    #[test]
    fn e820_for_128_mib() {
        assert_eq!(
            e820_entries(128 << 20),
            vec![
                (0, 0x9fc00, E820_RAM),
                (0x9fc00, 0x400, E820_RESERVED),
                (0x10_0000, (128 << 20) - 0x10_0000, E820_RAM),
            ]
        );
    }

    #[test]
    fn e820_for_4_gib_skips_the_gap() {
        let map = e820_entries(4 << 30);
        assert_eq!(map.len(), 4);
        assert_eq!(
            map[2],
            (0x10_0000, layout::MMIO_GAP_START - 0x10_0000, E820_RAM)
        );
        assert_eq!(map[3], (layout::MMIO_GAP_END, 1 << 30, E820_RAM));
        for (addr, size, _) in map {
            assert!(addr + size <= layout::MMIO_GAP_START || addr >= layout::MMIO_GAP_END);
        }
        let ram: u64 = e820_entries(4 << 30)
            .iter()
            .filter(|e| e.2 == E820_RAM)
            .map(|e| e.1)
            .sum();
        assert_eq!(
            ram,
            (4 << 30) - (layout::HIMEM_START - layout::MPTABLE_START)
        );
    }

    fn assert_not_a_kernel(contents: &[u8]) {
        let kernel = TempFile::new(contents);
        let err = load_linux(&mem(), &config(&kernel, None, DEFAULT_CMDLINE), 1).unwrap_err();
        assert!(matches!(err, Error::NotAKernel { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains("is not a Linux kernel: neither an ELF vmlinux"),
            "{msg}"
        );
        assert!(msg.contains(&kernel.0.display().to_string()), "{msg}");
    }

    #[test]
    fn truncated_elf_is_refused() {
        let exe = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert_eq!(&exe[..4], b"\x7fELF");
        assert_not_a_kernel(&exe[..64]);
    }

    #[test]
    fn zero_and_random_files_are_refused() {
        assert_not_a_kernel(&[0u8; 8192]);
        // A simple LCG is random enough to be neither format.
        let mut x: u32 = 12345;
        let noise: Vec<u8> = (0..8192)
            .map(|_| {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                (x >> 16) as u8
            })
            .collect();
        assert_not_a_kernel(&noise);
    }

    #[test]
    fn missing_kernel_names_the_file() {
        let cfg = LinuxBootConfig {
            kernel: PathBuf::from("/nonexistent/vmlinux"),
            initrd: None,
            cmdline: String::new(),
        };
        let err = load_linux(&mem(), &cfg, 1).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/vmlinux"), "{err}");
    }

    #[test]
    fn tiny_elf_loads_and_boot_params_read_back() {
        let m = mem();
        let kernel = TempFile::new(&tiny_elf());
        let initrd_data: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
        let initrd = TempFile::new(&initrd_data);
        let entry = load_linux(&m, &config(&kernel, Some(&initrd), DEFAULT_CMDLINE), 2).unwrap();
        assert_eq!(entry.entry, GuestAddress(ELF_LOAD));

        let mut code = [0u8; 4];
        m.read_slice(&mut code, GuestAddress(ELF_LOAD)).unwrap();
        assert_eq!(code, CODE);

        let p: boot_params = m.read_obj(GuestAddress(layout::ZERO_PAGE_START)).unwrap();
        assert_eq!({ p.hdr.cmd_line_ptr }, layout::CMDLINE_START as u32);
        assert_eq!({ p.hdr.cmdline_size }, DEFAULT_CMDLINE.len() as u32);
        assert_eq!({ p.hdr.boot_flag }, BOOT_FLAG_MAGIC);
        assert_eq!({ p.hdr.header }, HDRS_MAGIC);
        assert_eq!(p.hdr.type_of_loader, 0xff);
        assert_eq!({ p.hdr.kernel_alignment }, DEFAULT_KERNEL_ALIGNMENT);
        assert_eq!(p.e820_entries, 3);
        assert_eq!({ p.e820_table[2].addr }, layout::HIMEM_START);

        // Initrd: page-aligned, as high as it fits below the end of RAM.
        let image = u64::from(p.hdr.ramdisk_image);
        assert_eq!({ p.hdr.ramdisk_size }, 5000);
        assert_eq!(image % 4096, 0);
        assert_eq!(image, (MEM as u64 - 5000) & !0xfff);
        let mut back = vec![0u8; 5000];
        m.read_slice(&mut back, GuestAddress(image)).unwrap();
        assert_eq!(back, initrd_data);

        let mut cmdline = vec![0u8; DEFAULT_CMDLINE.len() + 1];
        m.read_slice(&mut cmdline, GuestAddress(layout::CMDLINE_START))
            .unwrap();
        assert_eq!(
            &cmdline[..DEFAULT_CMDLINE.len()],
            DEFAULT_CMDLINE.as_bytes()
        );
        assert_eq!(cmdline[DEFAULT_CMDLINE.len()], 0);

        // The other boot structures are in place.
        let mp: [u8; 4] = m.read_obj(GuestAddress(layout::MPTABLE_START)).unwrap();
        assert_eq!(&mp, b"_MP_");
        let gdt1: u64 = m.read_obj(GuestAddress(layout::GDT_START + 8)).unwrap();
        assert_eq!(gdt1, LINUX_GDT[1]);
        let pml4: u64 = m.read_obj(GuestAddress(layout::LINUX_PML4_START)).unwrap();
        assert_eq!(pml4 & !0xfff, layout::LINUX_PML4_START + 0x1000);
    }

    #[test]
    fn initrd_that_does_not_fit_is_refused() {
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let kernel = TempFile::new(&tiny_elf());
        let initrd = TempFile::new(&vec![0u8; 15 << 20]);
        let err = load_linux(&m, &config(&kernel, Some(&initrd), ""), 1).unwrap_err();
        assert!(matches!(err, Error::InitrdTooBig { .. }), "{err:?}");
    }

    #[test]
    fn bad_cmdlines_are_refused() {
        let kernel = TempFile::new(&tiny_elf());
        let long = "a".repeat(layout::CMDLINE_MAX_SIZE);
        let err = load_linux(&mem(), &config(&kernel, None, &long), 1).unwrap_err();
        assert!(matches!(err, Error::CmdlineTooLong { .. }), "{err:?}");
        let err = load_linux(&mem(), &config(&kernel, None, "a\0b"), 1).unwrap_err();
        assert!(matches!(err, Error::CmdlineNul), "{err:?}");
        // Just under the limit is fine.
        let ok = "a".repeat(layout::CMDLINE_MAX_SIZE - 1);
        load_linux(&mem(), &config(&kernel, None, &ok), 1).unwrap();
    }

    #[test]
    fn long_mode_sregs_fields() {
        let s = long_mode_sregs(kvm_sregs {
            apic_base: 0xfee0_0900,
            ..Default::default()
        });
        assert_eq!(s.apic_base, 0xfee0_0900);
        assert_eq!((s.cs.selector, s.cs.l, s.cs.db), (0x08, 1, 0));
        for seg in [s.ds, s.es, s.fs, s.gs, s.ss] {
            assert_eq!((seg.selector, seg.type_, seg.present), (0x10, 3, 1));
        }
        assert_eq!((s.tr.selector, s.tr.type_), (0x18, 0xb));
        assert_eq!((s.gdt.base, s.gdt.limit), (layout::GDT_START, 31));
        assert_eq!((s.idt.base, s.idt.limit), (layout::IDT_START, 7));
        assert_eq!(s.cr0, 0x8000_0031);
        assert_eq!(s.cr3, layout::LINUX_PML4_START);
        assert_eq!(s.cr4, 0x20);
        assert_eq!(s.efer, 0x500);
    }

    /// Host test: needs /dev/kvm and fails (not skips) without it.
    #[test]
    fn boot_vcpu_state_is_accepted_by_kvm() {
        assert!(
            Path::new("/dev/kvm").exists(),
            "/dev/kvm is missing: this host test needs KVM (run on a KVM host as a user with access)"
        );
        let kvm = kvm_ioctls::Kvm::new().expect("open /dev/kvm");
        let vm = kvm.create_vm().expect("KVM_CREATE_VM");
        let vcpu = vm.create_vcpu(0).expect("KVM_CREATE_VCPU");
        let entry = KernelEntry {
            entry: GuestAddress(0x100_0000),
        };
        setup_linux_vcpu(&vcpu, &entry).unwrap();
        let regs = vcpu.get_regs().unwrap();
        assert_eq!(regs.rip, 0x100_0000);
        assert_eq!(regs.rsi, layout::ZERO_PAGE_START);
        assert_eq!(regs.rsp, layout::BOOT_STACK_POINTER);
        let sregs = vcpu.get_sregs().unwrap();
        assert_eq!(sregs.cr3, layout::LINUX_PML4_START);
        assert_eq!(sregs.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(sregs.cr0 & (CR0_PE | CR0_PG), CR0_PE | CR0_PG);
        assert_eq!(sregs.cs.l, 1);
    }
}
