//! BRANCH: capturing a running VM into a new snapshot.
//!
//! - [`live`]: the live mode's write-protect engine: arm inside the pause
//!   window, then a background copy that lets guest writes proceed (a live
//!   branch whose caller does not wait).
//! - [`prearm`]: that engine's arm done before the pause, the guest
//!   running, so the pause re-protects only what the guest wrote since.
//! - [`precopy`]: the live mode for a caller that waits: RAM copied while
//!   the guest runs, tracked by KVM's dirty log, and only what changed
//!   since the last round copied in the pause.

pub mod live;
pub mod prearm;
pub mod precopy;
