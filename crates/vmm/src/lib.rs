//! forkd's microVM monitor as a library.
//!
//! - [`kvm`]: the VM and its vCPUs (CPUID, MSRs, run loop, pause/resume).
//! - [`memory`]: guest RAM and its three backends.
//! - [`boot`]: the memory map, Linux boot structures and the built-in guest.
//! - [`devices`]: the port-I/O and MMIO buses and the legacy devices.
//! - [`builder`]: assembles a machine; [`machine`]: a running one.
//! - [`random`]: randomness from the kernel, for every layer.
//! - [`seccomp`]: the system calls each kind of thread may make.
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
pub mod seccomp;
pub mod snapshot;
