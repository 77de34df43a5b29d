//! BRANCH: capturing a running VM into a new snapshot.
//!
//! - [`live`]: the live mode's memory engine: write-protect arm inside the
//!   pause window, then a background copy that lets guest writes proceed.

pub mod live;
