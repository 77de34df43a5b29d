//! The VM and its vCPUs on KVM.

pub mod cpuid;
pub mod msrs;
pub mod state;
pub mod vcpu;
pub mod vm;
