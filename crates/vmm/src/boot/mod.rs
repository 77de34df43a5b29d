//! Getting a guest ready to run: the memory map, and the two ways in
//! (a Linux kernel, or the built-in guest).

pub mod builtin;
pub mod gdt;
pub mod layout;
pub mod linux;
pub mod mptable;
pub mod paging;

use std::path::PathBuf;

/// Why a boot structure (GDT, page tables, MP table, kernel, initrd, command
/// line, boot_params, boot vCPU state) could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A boot structure could not be written into guest RAM.
    #[error(
        "cannot write the {what} at guest address {addr:#x}: {source}; \
         the VM needs at least {min} MiB of RAM starting at guest address 0",
        min = layout::MIN_MEM_MIB
    )]
    GuestWrite {
        /// Which structure.
        what: &'static str,
        /// Where it was being written.
        addr: u64,
        /// What vm-memory reported.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// The GDT handed to `write_gdt_and_idt` does not fit before the IDT.
    #[error(
        "a GDT of {entries} entries does not fit between {start:#x} and the IDT at {idt:#x}; \
         use at most {max} entries",
        start = layout::GDT_START,
        idt = layout::IDT_START,
        max = (layout::IDT_START - layout::GDT_START) / 8
    )]
    GdtTooBig {
        /// Number of descriptors requested.
        entries: usize,
    },
    /// The identity map was asked to cover nothing, or more than one PDPT can map.
    #[error(
        "identity page tables cannot map {top:#x} bytes: the mapped size must be \
         more than 0 and at most 512 GiB; check the VM's memory size"
    )]
    PageTableTop {
        /// Requested end of the identity map.
        top: u64,
    },
    /// The page tables were asked to start at an address that is not page-aligned.
    #[error(
        "page tables must start on a 4 KiB boundary, but {pml4:#x} is not; fix the PML4 address"
    )]
    PageTableAlign {
        /// Requested PML4 address.
        pml4: u64,
    },
    /// The vCPU count is outside what the MP table supports.
    #[error(
        "cannot describe {num_cpus} vCPUs in the MP table: use between 1 and {max} vCPUs",
        max = layout::MAX_VCPUS
    )]
    MpTableCpus {
        /// Requested vCPU count.
        num_cpus: u8,
    },
    /// The MP table does not fit in the EBDA.
    #[error(
        "the MP table needs {size} bytes but only {room} fit between {start:#x} and {end:#x}; \
         use fewer vCPUs",
        room = layout::EBDA_END - layout::MPTABLE_START,
        start = layout::MPTABLE_START,
        end = layout::EBDA_END
    )]
    MpTableTooBig {
        /// Bytes the table would take.
        size: u64,
    },
    /// A kernel or initrd file could not be opened or read.
    #[error("cannot read the {what} {path}: {source}; check the path and its permissions")]
    File {
        /// "kernel" or "initrd".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What the OS reported.
        #[source]
        source: std::io::Error,
    },
    /// The kernel file is neither format linux-loader understands.
    #[error(
        "{path} is not a Linux kernel: neither an ELF vmlinux ({elf}) nor a bzImage ({bzimage}); \
         pass an uncompressed x86-64 vmlinux or an arch/x86/boot/bzImage"
    )]
    NotAKernel {
        /// The file.
        path: PathBuf,
        /// Why it did not load as an ELF.
        elf: linux_loader::loader::Error,
        /// Why it did not load as a bzImage.
        bzimage: linux_loader::loader::Error,
    },
    /// The bzImage has no 64-bit entry point.
    #[error(
        "{path} is a bzImage without a 64-bit entry point (boot protocol 2.12+ with \
         XLF_KERNEL_64 required); use an x86-64 kernel built in the last decade"
    )]
    NotA64BitKernel {
        /// The file.
        path: PathBuf,
    },
    /// The initrd does not fit in guest RAM between the kernel and its upper limit.
    #[error(
        "the initrd {path} ({size} bytes) does not fit in guest RAM between the end of the kernel \
         ({kernel_end:#x}) and {limit:#x}; give the VM more memory or use a smaller initrd"
    )]
    InitrdTooBig {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// First byte after the kernel.
        kernel_end: u64,
        /// Highest address (exclusive) the initrd may reach.
        limit: u64,
    },
    /// The kernel command line is too long.
    #[error(
        "the kernel command line is {len} bytes long but at most {max} are allowed; shorten it"
    )]
    CmdlineTooLong {
        /// Its length, without the terminating NUL.
        len: usize,
        /// The largest length accepted.
        max: usize,
    },
    /// The kernel command line contains a NUL byte.
    #[error("the kernel command line contains a NUL byte; remove it")]
    CmdlineNul,
    /// linux-loader refused the command line.
    #[error("invalid kernel command line: {0}; use printable ASCII and balanced quotes")]
    Cmdline(linux_loader::cmdline::Error),
    /// Writing the command line into guest RAM failed.
    #[error("cannot write the kernel command line to guest RAM: {0}")]
    CmdlineWrite(linux_loader::loader::Error),
    /// Writing boot_params (the zero page) failed.
    #[error("cannot write boot_params (the zero page) to guest RAM: {0}")]
    BootParams(linux_loader::configurator::Error),
    /// A KVM ioctl setting up the boot vCPU failed.
    #[error("KVM refused {what} for the boot vCPU: {source}")]
    Vcpu {
        /// The ioctl.
        what: &'static str,
        /// What KVM reported.
        #[source]
        source: kvm_ioctls::Error,
    },
}
