//! forkd-daemon: the forkd v1 REST API over forkd-vmm processes.
//!
//! - [`api`]: routes, auth and audit layer.
//! - [`daemon`]: shared state; [`snapshots`] and [`sandboxes`]: what the
//!   routes do.
//! - [`store`]: SQLite state; [`driver`]: driving forkd-vmm processes;
//!   [`procs`]: tracking them by pid.
//! - [`auth`], [`audit`], [`metrics`], [`cgroup`], [`netns`] (a network
//!   namespace per guest with a network interface), [`util`] (ids, time).
//! - [`error`]: the one error the service layer returns, and its status;
//!   [`validate`]: the request rules, as pure functions.

pub mod api;
pub mod audit;
pub mod auth;
pub mod cgroup;
pub mod daemon;
pub mod driver;
pub mod error;
pub mod metrics;
pub mod netns;
pub mod procs;
pub mod sandboxes;
pub mod serve;
pub mod snapshots;
pub mod store;
pub mod util;
pub mod validate;
