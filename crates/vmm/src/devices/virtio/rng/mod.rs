//! virtio-rng: an entropy source fed from the host's getrandom(2).

mod device;
mod persist;

pub use device::Rng;
pub use persist::RngState;
