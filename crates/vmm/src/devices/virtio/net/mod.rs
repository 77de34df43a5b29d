//! virtio-net on a tap device.

mod device;
mod persist;
pub mod tap;

pub use device::{format_mac, parse_mac, Net, NetConfig};
pub use persist::NetState;
pub use tap::{check_netns_name, Tap, TapError};
