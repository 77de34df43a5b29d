//! virtio-block snapshot state.

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;

use super::device::{Block, QUEUE_SIZE};
use super::layers::DiskStack;
use crate::devices::virtio::persist::{PersistError, VirtioState};

/// What a snapshot keeps of a virtio-block device. Plain data. The disk's
/// content is not in it: it is the frozen layer stack the snapshot keeps
/// (see [`Block::freeze_layer`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    /// Features and queues.
    pub virtio: VirtioState,
    /// Disk size in 512-byte sectors (the guest has it cached).
    pub capacity: u64,
    /// The drive was read-only.
    pub read_only: bool,
    /// Serial/ID string.
    pub id: String,
}

impl crate::devices::persist::Persist for Block {
    type State = BlockState;
    /// The drive's layers, opened for this child.
    type RestoreArgs = DiskStack;
    type Error = PersistError;

    /// Saves the device's state.
    fn save(&self) -> BlockState {
        BlockState {
            virtio: VirtioState::save(
                VIRTIO_ID_BLOCK,
                Self::features_for(self.disk.read_only()),
                self.acked_features,
                &self.queues,
            ),
            capacity: self.capacity(),
            read_only: self.disk.read_only(),
            id: self.id.clone(),
        }
    }

    /// Rebuilds a device from saved state over `disk`, which must have the
    /// size and mode the guest knows (a child opens the snapshot's frozen
    /// layers with a CoW layer of its own).
    fn restore(state: &BlockState, disk: DiskStack) -> Result<Self, PersistError> {
        if disk.size() / 512 != state.capacity || disk.read_only() != state.read_only {
            return Err(PersistError::Backend(format!(
                "the disk has {} sectors ({}), the snapshot's guest knows {} ({})",
                disk.size() / 512,
                if disk.read_only() {
                    "read-only"
                } else {
                    "writable"
                },
                state.capacity,
                if state.read_only {
                    "read-only"
                } else {
                    "writable"
                },
            )));
        }
        let queues = state.virtio.restore(
            VIRTIO_ID_BLOCK,
            Self::features_for(state.read_only),
            &[QUEUE_SIZE],
        )?;
        let mut b = Block::with_disk(disk, state.id.clone());
        b.queues = queues;
        b.acked_features = state.virtio.acked_features;
        Ok(b)
    }
}
