//! Types shared across forkd processes.
//!
//! - [`control`]: forkd-vmm's control socket (one JSON object per line each way).
//! - [`guest`]: requests a guest answers (the built-in guest today; the
//!   agent protocol on vsock grows from these).

pub mod control;
pub mod guest;
