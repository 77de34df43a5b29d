//! virtio-vsock snapshot state.

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;

use super::device::{Vsock, QUEUE_SIZE};
use crate::devices::virtio::persist::{PersistError, VirtioState};

/// What a snapshot keeps of a virtio-vsock device. Plain data.
///
/// Connections are not kept: a restored device starts with none and sends
/// the guest a TRANSPORT_RESET event, so the guest resets the connections
/// it had instead of waiting on them forever.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockState {
    /// Features and queues.
    pub virtio: VirtioState,
    /// The guest's CID.
    pub cid: u64,
}

impl crate::devices::persist::Persist for Vsock {
    type State = VsockState;
    /// The socket the restored device's host side listens on (each VM its own).
    type RestoreArgs = std::path::PathBuf;
    type Error = PersistError;

    /// Saves the device's state.
    fn save(&self) -> VsockState {
        VsockState {
            virtio: VirtioState::save(
                VIRTIO_ID_VSOCK,
                Self::AVAIL_FEATURES,
                self.acked_features,
                &self.queues,
            ),
            cid: self.cid,
        }
    }

    /// Rebuilds a device from saved state, its host side listening on
    /// `uds_path` (each restored VM needs its own path).
    fn restore(state: &VsockState, uds_path: std::path::PathBuf) -> Result<Self, PersistError> {
        let queues =
            state
                .virtio
                .restore(VIRTIO_ID_VSOCK, Self::AVAIL_FEATURES, &[QUEUE_SIZE; 3])?;
        let mut v =
            Vsock::new(state.cid, &uds_path).map_err(|e| PersistError::Backend(e.to_string()))?;
        v.queues = queues;
        v.acked_features = state.virtio.acked_features;
        v.reset_event_due = true;
        Ok(v)
    }
}
