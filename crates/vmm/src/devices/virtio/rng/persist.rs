//! virtio-rng snapshot state.

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_ids::VIRTIO_ID_RNG;

use super::device::{Rng, QUEUE_SIZE};
use crate::devices::virtio::persist::{PersistError, VirtioState};

/// What a snapshot keeps of a virtio-rng device. Plain data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngState {
    /// Features and queues.
    pub virtio: VirtioState,
}

impl crate::devices::persist::Persist for Rng {
    type State = RngState;
    /// Nothing: the entropy comes from the host's kernel.
    type RestoreArgs = ();
    type Error = PersistError;

    /// Saves the device's state.
    fn save(&self) -> RngState {
        RngState {
            virtio: VirtioState::save(
                VIRTIO_ID_RNG,
                Self::AVAIL_FEATURES,
                self.acked_features,
                &self.queues,
            ),
        }
    }

    /// Rebuilds a device from saved state (unactivated: the transport
    /// activates it when its saved status says DRIVER_OK).
    fn restore(state: &RngState, (): ()) -> Result<Self, PersistError> {
        let queues = state
            .virtio
            .restore(VIRTIO_ID_RNG, Self::AVAIL_FEATURES, &[QUEUE_SIZE])?;
        Ok(Rng {
            acked_features: state.virtio.acked_features,
            queues,
            active: None,
        })
    }
}
