//! virtio-net snapshot state.

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;

use super::device::{Net, QUEUE_SIZE};
use super::tap::Tap;
use crate::devices::virtio::persist::{PersistError, VirtioState};

/// What a snapshot keeps of a virtio-net device. Plain data. Frames in
/// flight are not kept (a network may drop frames); the tap is the restored
/// VM's own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    /// Features and queues.
    pub virtio: VirtioState,
    /// The guest's MAC address (the guest has it cached).
    pub mac: [u8; 6],
}

impl crate::devices::persist::Persist for Net {
    type State = NetState;
    /// The tap the restored interface attaches to.
    type RestoreArgs = Tap;
    type Error = PersistError;

    /// Saves the device's state.
    fn save(&self) -> NetState {
        NetState {
            virtio: VirtioState::save(
                VIRTIO_ID_NET,
                Self::AVAIL_FEATURES,
                self.acked_features,
                &self.queues,
            ),
            mac: self.mac,
        }
    }

    /// Rebuilds a device from saved state on `tap`. The MAC is the saved
    /// one: the guest already knows it.
    fn restore(state: &NetState, tap: Tap) -> Result<Self, PersistError> {
        let queues = state
            .virtio
            .restore(VIRTIO_ID_NET, Self::AVAIL_FEATURES, &[QUEUE_SIZE; 2])?;
        let mut n = Net::with_tap(tap, state.mac);
        n.queues = queues;
        n.acked_features = state.virtio.acked_features;
        Ok(n)
    }
}
