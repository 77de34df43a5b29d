//! virtio-block over a stack of copy-on-write layers.

mod device;
pub mod layers;
mod persist;

pub use device::{Block, BlockConfig, BLOCK_ID_LEN};
pub use layers::{DiskConfig, DiskStack, Frozen, LayerError, OpenedLower};
pub use persist::BlockState;
