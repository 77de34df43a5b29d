//! Snapshot state shared by every virtio device: what the driver
//! negotiated and the queues. Each device's own state struct embeds a
//! [`VirtioState`] next to its device-specific fields.

use serde::{Deserialize, Serialize};
use virtio_queue::Queue;

use super::queue::{restore_queue, save_queue, QueueRestoreError, QueueState};

/// The transport-independent part of a device's state. Plain data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioState {
    /// virtio device ID.
    pub device_type: u32,
    /// Features offered.
    pub avail_features: u64,
    /// Features the driver accepted.
    pub acked_features: u64,
    /// The queues.
    pub queues: Vec<QueueState>,
}

/// Errors restoring a device from saved state.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    /// The state is for another kind of device.
    #[error("saved state is for virtio device type {saved}, not {expected}; the snapshot's device list does not match this VM's")]
    DeviceType {
        /// In the snapshot.
        saved: u32,
        /// This device.
        expected: u32,
    },
    /// The device offers different features now.
    #[error("saved state accepted features {acked:#x} that this device does not offer (it offers {offered:#x}); restore with the same device configuration")]
    Features {
        /// Accepted in the snapshot.
        acked: u64,
        /// Offered now.
        offered: u64,
    },
    /// Wrong number of queues.
    #[error("saved state has {saved} queues, this device has {expected}")]
    QueueCount {
        /// In the snapshot.
        saved: usize,
        /// This device.
        expected: usize,
    },
    /// A queue's state is invalid.
    #[error(transparent)]
    Queue(#[from] QueueRestoreError),
    /// The device's host side could not be recreated.
    #[error("cannot recreate the device's host side: {0}")]
    Backend(String),
}

impl VirtioState {
    /// Saves the common state.
    pub fn save(device_type: u32, avail: u64, acked: u64, queues: &[Queue]) -> Self {
        VirtioState {
            device_type,
            avail_features: avail,
            acked_features: acked,
            queues: queues.iter().map(save_queue).collect(),
        }
    }

    /// Checks the state against a device of `device_type` offering `avail`
    /// with queues of `max_sizes`, and rebuilds its queues.
    pub fn restore(
        &self,
        device_type: u32,
        avail: u64,
        max_sizes: &[u16],
    ) -> Result<Vec<Queue>, PersistError> {
        if self.device_type != device_type {
            return Err(PersistError::DeviceType {
                saved: self.device_type,
                expected: device_type,
            });
        }
        if self.acked_features & !avail != 0 {
            return Err(PersistError::Features {
                acked: self.acked_features,
                offered: avail,
            });
        }
        if self.queues.len() != max_sizes.len() {
            return Err(PersistError::QueueCount {
                saved: self.queues.len(),
                expected: max_sizes.len(),
            });
        }
        self.queues
            .iter()
            .zip(max_sizes)
            .map(|(q, &max)| restore_queue(q, max).map_err(PersistError::from))
            .collect()
    }
}
