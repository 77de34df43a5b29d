//! Devices: the buses they sit on and the legacy devices.

pub mod bus;
pub mod gate;
pub mod i8042;
pub mod serial;
pub mod virtio;
