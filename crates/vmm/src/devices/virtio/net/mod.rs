//! virtio-net on a tap device.

mod device;
mod persist;
pub mod tap;

pub use device::{parse_mac, Net, NetConfig};
pub use persist::NetState;
pub use tap::{Tap, TapError};
