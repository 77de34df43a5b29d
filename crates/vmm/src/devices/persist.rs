//! One trait for everything with snapshot state: the legacy devices and
//! every virtio device. `save` gives plain data (serialised into
//! `vmstate`); `restore` rebuilds the device from that data and from what
//! the host must hand it anew (an eventfd, a tap, a disk stack, a socket
//! path), since a restored child shares no host resource with its parent.
//! The state is untrusted on the way back in: `restore` checks it.

/// A device with snapshot state.
pub trait Persist: Sized {
    /// What a snapshot keeps of it: plain data.
    type State;
    /// What restoring it takes besides its state.
    type RestoreArgs;
    /// Why a restore fails.
    type Error;

    /// Its state, for a snapshot.
    fn save(&self) -> Self::State;

    /// The device rebuilt from `state`, with `args` for its host side.
    fn restore(state: &Self::State, args: Self::RestoreArgs) -> Result<Self, Self::Error>;
}
