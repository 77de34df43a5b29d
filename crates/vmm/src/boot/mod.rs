//! Getting a guest ready to run: the memory map, and the two ways in
//! (a Linux kernel, or the built-in guest).

pub mod gdt;
pub mod layout;
pub mod linux;
pub mod mptable;
pub mod paging;
