//! forkd-daemon: the forkd v1 REST API over forkd-vmm processes.
//!
//! - [`api`]: routes, auth and audit layer.
//! - [`daemon`]: shared state; [`snapshots`] and [`sandboxes`]: what the
//!   routes do; [`guest`]: streamed and interactive exec, background
//!   processes and files, through a sandbox's agent; [`lifecycle`]:
//!   pause, resume, deadlines, suspend; [`workspaces`]: upstream's
//!   named, suspendable workspaces.
//! - [`store`]: SQLite state; [`driver`]: driving forkd-vmm processes;
//!   [`procs`]: tracking them by pid.
//! - [`exits`]: noticing that a sandbox's VMM ended, how, and reaping it;
//!   [`reconcile`]: at start, the store, the processes and the files made
//!   to agree; [`failpoint`]: kill points for crash tests;
//!   [`integrity`]: snapshot files checked against their hashes;
//!   [`images`]: where the kernels and root filesystems requests name are.
//! - [`auth`], [`audit`], [`metrics`], [`cgroup`], [`netns`] (a network
//!   namespace per guest with a network interface), [`util`] (ids, time).
//! - [`conn`]: the HTTP(S) server's connections: header and idle
//!   timeouts, the connection cap.
//! - [`error`]: the one error the service layer returns, and its status;
//!   [`validate`]: the request rules, as pure functions.

pub mod api;
pub mod audit;
pub mod auth;
pub mod cgroup;
pub mod conn;
pub mod daemon;
pub mod driver;
pub mod error;
pub mod exits;
pub mod failpoint;
pub mod guest;
pub mod images;
pub mod integrity;
pub mod lifecycle;
pub mod metrics;
pub mod netns;
pub mod procs;
pub mod reconcile;
pub mod reserve;
pub mod sandboxes;
pub mod serve;
pub mod snapshots;
pub mod stats;
pub mod store;
pub mod util;
pub mod validate;
pub mod workspaces;
