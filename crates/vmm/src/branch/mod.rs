//! BRANCH: capturing a running VM into a new snapshot.
//!
//! - [`live`]: the live mode's write-protect engine: arm inside the pause
//!   window, then a background copy that lets guest writes proceed (a live
//!   branch whose caller does not wait).
//! - [`precopy`]: the live mode for a caller that waits: RAM copied while
//!   the guest runs, tracked by KVM's dirty log, and only what changed
//!   since the last round copied in the pause.

pub mod live;
pub mod precopy;
