//! forkd's microVM monitor as a library.
//!
//! - [`kvm`]: the VM and its vCPUs (CPUID, MSRs, run loop).
//! - [`memory`]: guest RAM and its three backends.
//! - [`boot`]: the memory map, Linux boot structures and the built-in guest.
//! - [`devices`]: the port-I/O and MMIO buses and the legacy devices.

pub mod boot;
pub mod devices;
pub mod kvm;
pub mod memory;
