//! Guest RAM.

/// Guest memory as the rest of the VMM sees it: regions mapped in this
/// process, every access bounds-checked by vm-memory.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;
