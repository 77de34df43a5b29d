//! Devices: the buses they sit on and the legacy devices, and the one
//! trait for snapshot state ([`persist::Persist`]).

pub mod bus;
pub mod gate;
pub mod i8042;
pub mod persist;
pub mod serial;
pub mod virtio;
