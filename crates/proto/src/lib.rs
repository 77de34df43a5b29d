//! Types shared across forkd processes.
//!
//! - [`api`]: the forkd v1 REST API's bodies (forkd-daemon and the CLI).
//! - [`agent`]: the guest agent protocol on vsock (length-prefixed JSON frames
//!   with a binary part), spoken by forkd-agent and the built-in guest.
//! - [`control`]: forkd-vmm's control socket (one JSON object per line each way).
//! - [`guest`]: requests a guest answers (the built-in guest today; the
//!   agent protocol on vsock grows from these).
//! - [`routes`]: the REST API's paths (the daemon's router, its clients).
//! - [`snapshot`]: `snapshot.json`, a snapshot directory's metadata (written
//!   by forkd-vmm, read by every process).

pub mod agent;
pub mod api;
pub mod control;
pub mod guest;
pub mod routes;
pub mod snapshot;
