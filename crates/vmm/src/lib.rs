//! forkd's microVM monitor as a library.
//!
//! - [`kvm`]: the VM and its vCPUs (CPUID, MSRs, run loop, pause/resume).
//! - [`memory`]: guest RAM and its three backends.
//! - [`boot`]: the memory map, Linux boot structures and the built-in guest.
//! - [`devices`]: the port-I/O and MMIO buses and the legacy devices.
//! - [`builder`]: assembles a machine; [`machine`]: a running one.
//! - [`random`]: randomness from the kernel, for every layer.
//! - [`logger`]: diagnostics through `tracing`, rate-limited where a guest
//!   can trigger them.

pub mod boot;
pub mod branch;
pub mod builder;
pub mod devices;
pub mod kvm;
pub mod logger;
pub mod machine;
pub mod memory;
pub mod random;
pub mod snapshot;
