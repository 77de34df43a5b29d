//! The forkd v1 REST API: request and answer bodies, shared by
//! forkd-daemon (which serves them) and the `forkd` CLI (which sends them).
//!
//! The shapes are the published v1 surface (DESIGN.md); fields this
//! implementation adds are optional on the way in and skipped on the way
//! out when absent, so v1 clients see what they expect. Request bodies
//! take fields they do not know (upstream's clients may send newer ones);
//! the daemon ignores them and logs them at debug level.

use serde::{Deserialize, Serialize};

mod files;
mod process;
mod workspace;
pub use files::*;
pub use process::*;
pub use workspace::*;

/// The API version string `GET /version` reports.
pub const API_VERSION: &str = "v1";
/// Default address of the daemon.
pub const DEFAULT_BIND: &str = "127.0.0.1:8889";
/// Most sandboxes one `POST /v1/sandboxes` starts.
pub const MAX_SPAWN: u32 = 1000;
/// Longest tag.
pub const MAX_TAG_LEN: usize = 64;

/// Whether `tag` is a valid snapshot tag: `^[A-Za-z0-9_-]{1,64}$`.
pub fn valid_tag(tag: &str) -> bool {
    (1..=MAX_TAG_LEN).contains(&tag.len())
        && tag
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Every error answer: `{"error": "..."}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorBody {
    /// What went wrong and what to do.
    pub error: String,
}

/// `GET /healthz`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Health {
    /// Always true when the daemon answers.
    pub ok: bool,
}

/// `GET /version`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Version {
    /// The daemon's version.
    pub version: String,
    /// `v1`.
    pub api: String,
    /// Extension: the daemon's state directory (`forkd where`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_dir: Option<String>,
    /// Extension: where its snapshots live.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_root: Option<String>,
    /// Extension: its instance id, which names the cgroups
    /// (`forkd/<instance>/`) and network namespaces (`forkd-<instance>-*`)
    /// it makes outside its state directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
}

/// `POST /v1/snapshots`: boot a guest, wait for its agent, snapshot it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CreateSnapshot {
    /// The new snapshot's tag.
    pub tag: String,
    /// Linux kernel (ELF vmlinux or bzImage) in the daemon's images
    /// directory (`--images-dir`): its path there, or its full path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    /// Root filesystem image (with forkd-agent as init) in the daemon's
    /// images directory, named as `kernel` is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rootfs: Option<String>,
    /// Let the guest write to the rootfs (through a copy-on-write layer; the
    /// image itself is never written).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rw: Option<bool>,
    /// Longest wait for the guest agent to answer, in seconds: the
    /// snapshot is taken as soon as it answers, never after a fixed sleep.
    /// 0 or left out: [`DEFAULT_BOOT_WAIT_SECS`]. At most
    /// [`MAX_BOOT_WAIT_SECS`] (upstream's 0 to 60 fall inside).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_wait_secs: Option<u64>,
    /// Guest RAM (default 256 MiB; 128 MiB for the built-in guest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_size_mib: Option<u64>,
    /// vCPUs (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpus: Option<u8>,
    /// Extension: snapshot the built-in guest instead of a kernel + rootfs.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub builtin: bool,
    /// Extension: extra kernel command line arguments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_args: Option<String>,
    /// Extension: give the guest a network interface (virtio-net on a tap
    /// in a namespace of its own, the guest at [`GUEST_ADDR`], the host
    /// side at [`HOST_ADDR`]). Its children each get a namespace of their
    /// own with the same addresses (`per_child_netns`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub network: bool,
    /// A host tap (in the daemon's network namespace) for the guest's
    /// network interface, made and addressed by the caller. The snapshot
    /// records it; each child gets a namespace of its own with a tap of
    /// that name and the same addresses, as with `network`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap: Option<String>,
}

/// Longest wait for a new snapshot's guest agent when the request leaves
/// `boot_wait_secs` out (or gives 0).
pub const DEFAULT_BOOT_WAIT_SECS: u64 = 60;
/// Longest `boot_wait_secs`.
pub const MAX_BOOT_WAIT_SECS: u64 = 3600;

/// The guest's address on a snapshot made with `network: true`, and on
/// every child of it (each in its own network namespace).
pub const GUEST_ADDR: &str = "172.16.0.2";
/// The host side of the guest's link (the tap in the namespace).
pub const HOST_ADDR: &str = "172.16.0.1";
/// Prefix length of the guest's link.
pub const NET_PREFIX: u8 = 30;

/// Status of a snapshot: the same as `snapshot.json`'s.
pub use crate::snapshot::SnapshotStatus;

/// A snapshot, as every snapshot route answers it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SnapshotInfo {
    /// Its tag.
    pub tag: String,
    /// Its directory on the daemon's host.
    pub dir: String,
    /// When it was made.
    pub created_at_unix: u64,
    /// The sandbox it was branched from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub branched_from: Option<String>,
    /// How long the source was paused for it, in whole milliseconds
    /// (rounded), as upstream answers it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause_ms: Option<u64>,
    /// Extension: the same pause in microseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause_us: Option<u64>,
    /// What a diff of the source's memory took (a diff branch, or a full
    /// one with `measure_diff`): milliseconds writing it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diff_ms: Option<u64>,
    /// ... bytes it takes on disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diff_physical_bytes: Option<u64>,
    /// ... bytes of guest memory it covers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diff_logical_bytes: Option<u64>,
    /// writing, ready or failed.
    pub status: SnapshotStatus,
    /// Whether children can be spawned from it.
    pub bootable: bool,
    /// Something the user should know (e.g. why a copy failed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
    /// Extension: `full` or `diff`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Extension: the guest (`builtin` or `linux`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest: Option<String>,
    /// Extension: guest RAM in MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_mib: Option<u64>,
    /// Extension: the guest has a network interface; its children each get
    /// a network namespace of their own.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub network: bool,
    /// Extension: the host tap it was made on (`tap` at create); each
    /// child's namespace has a tap of that name, MAC and address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap: Option<String>,
}

/// `GET /v1/snapshots/:tag/info`: [`SnapshotInfo`] and its place in a chain.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SnapshotDetail {
    /// The snapshot.
    #[serde(flatten)]
    pub info: SnapshotInfo,
    /// Guest RAM the snapshot represents.
    pub memory_logical_bytes: u64,
    /// Bytes of memory it stores on disk (its own, not its parent's).
    pub memory_physical_bytes: u64,
    /// Size of its vmstate file.
    pub vmstate_bytes: u64,
    /// The snapshot it depends on (memory diff or disk layers).
    pub parent_tag: Option<String>,
    /// The parent's memory content hash when this one was taken.
    pub parent_content_hash: Option<String>,
    /// Ancestors counted up to a root (0 for a root).
    pub chain_depth: u32,
    /// Root first, the direct parent last (as upstream).
    pub ancestors: Vec<String>,
    /// Snapshots that depend on this one directly.
    pub dependents: Vec<String>,
    /// Extension: its files were found to have the content its
    /// `snapshot.json` records (`forkd-vmm verify`, in the background once
    /// it is registered) and have not changed since.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub verified: bool,
}

/// `POST /v1/snapshots/:tag/compact`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CompactRequest {
    /// Tag of the flat copy.
    pub to: String,
}

/// Least `cpu_limit` a spawn may ask for, in CPUs.
pub const CPU_LIMIT_MIN: f64 = 0.01;
/// Most `cpu_limit` a spawn may ask for, in CPUs.
pub const CPU_LIMIT_MAX: f64 = 1024.0;
/// Least `pids_limit`: a VMM's own threads (its vCPUs, control
/// connections, device workers) must fit.
pub const PIDS_LIMIT_MIN: u64 = 64;
/// Most `pids_limit` (the kernel's `pid_max` ceiling).
pub const PIDS_LIMIT_MAX: u64 = 1 << 22;
/// Most `disk_quota_mib` (a disk's largest size, 2 TiB).
pub const DISK_QUOTA_MIB_MAX: u64 = 2 << 20;
/// Most `io_limit_mibps` (100 GiB/s: past any disk's).
pub const IO_LIMIT_MIBPS_MAX: u64 = 100 << 10;

/// `cpu_limit` (in CPUs) in thousandths of a CPU, as cgroups are given
/// it (0.01 is 10).
pub fn cpu_millis(cpus: f64) -> u32 {
    (cpus * 1000.0).round().clamp(0.0, u32::MAX as f64) as u32
}

/// `POST /v1/sandboxes`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SpawnRequest {
    /// The snapshot to fork.
    pub snapshot_tag: String,
    /// How many (1 to [`MAX_SPAWN`]).
    #[serde(default = "one")]
    pub n: u32,
    /// Give every child its own network namespace holding the tap its
    /// network interface is attached to. The snapshot decides: a child
    /// of a snapshot with a network interface always gets one (children
    /// cannot share a tap), one without never does. A value that says
    /// otherwise (the published clients always send `false`) is not
    /// refused: each child's answer carries a `warning` saying what it got.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_child_netns: Option<bool>,
    /// Memory cap for each child's VMM process (cgroup), in MiB. Left
    /// out: the daemon's `--default-memory-limit-mib`, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_limit_mib: Option<u64>,
    /// Extension: CPU cap for each child's VMM process, in CPUs (0.5 is
    /// half of one CPU's time, 2 two CPUs' worth; [`CPU_LIMIT_MIN`] to
    /// [`CPU_LIMIT_MAX`]), enforced by the CFS quota of its cgroup. Left
    /// out: the daemon's `--default-cpu-limit`, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_limit: Option<f64>,
    /// Extension: most tasks (threads) each child's VMM process may have
    /// (its cgroup's `pids.max`; [`PIDS_LIMIT_MIN`], what a VMM needs, to
    /// [`PIDS_LIMIT_MAX`]). Left out: the daemon's `--default-pids-limit`
    /// (1024 unless configured).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids_limit: Option<u64>,
    /// Extension: most data, in MiB, each child's own copy-on-write disk
    /// layer may hold (1 to [`DISK_QUOTA_MIB_MAX`]): a guest write past it
    /// fails as an I/O error and the host file stops growing. Left out:
    /// the daemon's `--default-disk-quota-mib` (4096 unless configured).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_quota_mib: Option<u64>,
    /// Extension: most MiB per second each child's VMM may read, and as
    /// many write, on the block device that holds the daemon's sandboxes
    /// (their disk layers): its cgroup's `io.max` (v2) or
    /// `blkio.throttle.*_bps_device` (v1); 1 to [`IO_LIMIT_MIBPS_MAX`].
    /// Refused where that directory is on no block device (a tmpfs, an
    /// overlay). Left out: the daemon's `--default-io-limit-mibps`, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_limit_mibps: Option<u64>,
    /// Children whose RAM is a private copy in a memfd, so they can be
    /// live-branched (costs a copy of the snapshot's memory per child).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub live_fork: Option<bool>,
    /// Fault each child's RAM in right after its restore, before the
    /// answer, so its first BRANCH does not pay for it (costs spawn time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prewarm: Option<bool>,
    /// Guest RAM on 2 MiB huge pages (a private copy per child in a
    /// hugetlb memfd, which can also be live-branched). When the host has
    /// too few free, the children get 4 KiB pages and a `warning`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hugepages: Option<bool>,
    /// Extension: the children's labels (at most [`MAX_LABELS`]; see
    /// [`check_labels`]), for `GET /v1/sandboxes?label=KEY=VALUE`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<std::collections::BTreeMap<String, String>>,
    /// Extension: end each child this many seconds after its spawn (1 to
    /// [`MAX_SANDBOX_TIMEOUT_SECS`]) unless extended; none without.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u64>,
    /// Extension: what the deadline does: `kill` (the default) ends the
    /// VMM; `pause` keeps the sandbox as a diff snapshot and ends the VMM,
    /// leaving it `suspended` (`POST /v1/sandboxes/{id}/resume` restores
    /// it under its id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_timeout: Option<OnTimeout>,
}

/// Most labels a sandbox has.
pub const MAX_LABELS: usize = 32;
/// Longest label key.
pub const MAX_LABEL_KEY: usize = 63;
/// Longest label value.
pub const MAX_LABEL_VALUE: usize = 256;
/// Longest sandbox timeout: 30 days.
pub const MAX_SANDBOX_TIMEOUT_SECS: u64 = 30 * 24 * 3600;

/// Checks labels: at most [`MAX_LABELS`]; keys 1 to [`MAX_LABEL_KEY`]
/// bytes of `A-Z a-z 0-9 . _ / -`, starting with a letter or digit;
/// values at most [`MAX_LABEL_VALUE`] bytes, no control characters.
pub fn check_labels(labels: &std::collections::BTreeMap<String, String>) -> Result<(), String> {
    if labels.len() > MAX_LABELS {
        return Err(format!(
            "{} labels: a sandbox has at most {MAX_LABELS}",
            labels.len()
        ));
    }
    for (k, v) in labels {
        let key_ok = (1..=MAX_LABEL_KEY).contains(&k.len())
            && k.as_bytes()[0].is_ascii_alphanumeric()
            && k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'/' | b'-'));
        if !key_ok {
            return Err(format!(
                "label key {:?} is not valid: 1 to {MAX_LABEL_KEY} of A-Z a-z 0-9 . _ / -, starting with a letter or digit",
                k.chars().take(80).collect::<String>()
            ));
        }
        if v.len() > MAX_LABEL_VALUE || v.chars().any(char::is_control) {
            return Err(format!(
                "label {k:?}'s value is not valid: at most {MAX_LABEL_VALUE} bytes, no control characters"
            ));
        }
    }
    Ok(())
}

/// What a sandbox's deadline does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum OnTimeout {
    /// End its VMM; the sandbox reads `exited`.
    #[default]
    Kill,
    /// Keep it as a diff snapshot and end its VMM: `suspended`, resumable.
    Pause,
}

impl OnTimeout {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            OnTimeout::Kill => "kill",
            OnTimeout::Pause => "pause",
        }
    }

    /// From the wire name.
    pub fn parse(s: &str) -> Option<OnTimeout> {
        match s {
            "kill" => Some(OnTimeout::Kill),
            "pause" => Some(OnTimeout::Pause),
            _ => None,
        }
    }
}

/// `GET /v1/sandboxes/{id}/stats`: what a sandbox uses now. A figure the
/// host cannot read (the VMM has ended, no network) is absent.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SandboxStats {
    /// The sandbox.
    pub id: String,
    /// Where it is in its life.
    pub state: SandboxState,
    /// Seconds since its spawn.
    pub uptime_secs: u64,
    /// CPU time its VMM has used (guest and VMM together), in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_seconds: Option<f64>,
    /// Its VMM's resident memory, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_rss_bytes: Option<u64>,
    /// Resident memory only it maps (its own writes), in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_private_bytes: Option<u64>,
    /// Resident memory it shares (the snapshot's pages other children map
    /// too), in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_shared_bytes: Option<u64>,
    /// Bytes its own copy-on-write disk layers hold on the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_layer_bytes: Option<u64>,
    /// Bytes its guest received on its network interface.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net_rx_bytes: Option<u64>,
    /// Bytes its guest sent on its network interface.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net_tx_bytes: Option<u64>,
}

/// `POST /v1/sandboxes/{id}/timeout`: a new deadline, this many seconds
/// from now.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TimeoutRequest {
    /// Seconds from now, 1 to [`MAX_SANDBOX_TIMEOUT_SECS`].
    pub timeout_secs: u64,
}

fn one() -> u32 {
    1
}

/// A sandbox: one forked microVM. Upstream's fields are always there
/// (null when unset); the extensions only when they say something.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SandboxInfo {
    /// Its id.
    pub id: String,
    /// The snapshot it was forked from.
    pub snapshot_tag: String,
    /// Its network namespace (a name under /var/run/netns); null without.
    #[serde(default)]
    pub netns: Option<String>,
    /// Its guest's network address, reachable from inside `netns`; null
    /// without a network interface.
    #[serde(default)]
    pub guest_addr: Option<String>,
    /// When it was spawned.
    pub created_at_unix: u64,
    /// Its forkd-vmm process.
    pub pid: i32,
    /// Its memory cap; null without one.
    #[serde(default)]
    pub memory_limit_mib: Option<u64>,
    /// Extension: its CPU cap, in CPUs (the request's, or the daemon's
    /// default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_limit: Option<f64>,
    /// Extension: its VMM's task cap (the request's, or the daemon's
    /// default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids_limit: Option<u64>,
    /// Extension: the most data its own disk layers may hold, in MiB (the
    /// request's, or the daemon's default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_quota_mib: Option<u64>,
    /// Extension: its VMM's disk bandwidth cap each way, in MiB/s (the
    /// request's, or the daemon's default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_limit_mibps: Option<u64>,
    /// Extension: its VMM's cgroup, as a path inside each cgroup hierarchy
    /// (`forkd/<instance>/<group>`: the same under the memory, cpu and
    /// pids controllers of a v1 host, one group on v2); absent when the
    /// host has no cgroups.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
    /// Whether it has been branched.
    #[serde(default)]
    pub has_branched: bool,
    /// How many branches of it were made.
    #[serde(default)]
    pub branch_count: u32,
    /// The memory file of its latest branch; null before the first.
    #[serde(default)]
    pub last_branch_memory_path: Option<String>,
    /// Extension: whether its RAM can be live-branched.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub live_fork: bool,
    /// Extension: its RAM is on 2 MiB huge pages.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub hugepages: bool,
    /// Extension: something the request asked that it did not get as
    /// asked (e.g. huge pages the host did not have, or a namespace
    /// `per_child_netns: false` said not to make).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
    /// Extension: `running`, or `exited` once its VMM has ended (kept until
    /// it is deleted or the daemon's retention time passes; the list shows
    /// exited sandboxes only with `?all=true`).
    #[serde(default)]
    pub state: SandboxState,
    /// Extension: an exited sandbox's VMM exit status, when it exited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// Extension: the signal that ended an exited sandbox's VMM, when one
    /// did (9 for a kill).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    /// Extension: whether the kernel's OOM killer ended it (its memory
    /// cap's cgroup counted the kill); set once it has exited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oom_killed: Option<bool>,
    /// Extension: when its end was noticed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exited_at_unix: Option<u64>,
    /// Extension: what is known of its end beyond the status: the tail of
    /// its VMM's log, or that nobody saw its status (it ended while the
    /// daemon was down and its fork server was gone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_detail: Option<String>,
    /// Extension: its labels.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub labels: std::collections::BTreeMap<String, String>,
    /// Extension: its timeout in seconds (from its spawn, its last
    /// extension or its resume); absent without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u64>,
    /// Extension: when its deadline falls, seconds since the epoch; absent
    /// without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_unix: Option<u64>,
    /// Extension: what its deadline does; absent without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_timeout: Option<OnTimeout>,
    /// Extension: the snapshot that keeps it while it is `suspended`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub suspended_tag: Option<String>,
}

/// Where a sandbox is in its life.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum SandboxState {
    /// Recorded, its VMM being started (not listed; a restart removes it).
    Starting,
    /// Its VMM runs.
    #[default]
    Running,
    /// Its VMM is paused (`POST /v1/sandboxes/{id}/pause`): memory and
    /// files kept, no CPU used; `/resume` lets it run.
    Paused,
    /// Kept as a snapshot, its VMM ended (`on_timeout: pause`);
    /// `/resume` restores it under its id.
    Suspended,
    /// Its VMM has ended.
    Exited,
}

impl SandboxState {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            SandboxState::Starting => "starting",
            SandboxState::Running => "running",
            SandboxState::Paused => "paused",
            SandboxState::Suspended => "suspended",
            SandboxState::Exited => "exited",
        }
    }

    /// Whether its VMM is alive (running or paused).
    pub fn has_vmm(self) -> bool {
        matches!(self, SandboxState::Running | SandboxState::Paused)
    }

    /// From the wire name.
    pub fn parse(s: &str) -> Option<SandboxState> {
        Some(match s {
            "starting" => SandboxState::Starting,
            "running" => SandboxState::Running,
            "paused" => SandboxState::Paused,
            "suspended" => SandboxState::Suspended,
            "exited" => SandboxState::Exited,
            _ => return None,
        })
    }
}

/// `POST /v1/sandboxes/:id/ping`: `pong: true` and the agent's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PingResponse {
    /// Always true: the agent answered.
    pub pong: bool,
    /// What the agent said (with upstream's `pid` when it has one).
    #[serde(flatten)]
    pub agent: crate::agent::Pong,
}

/// `POST /v1/sandboxes/:id/exec`: run a command and answer its whole
/// output.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ExecRequest {
    /// The program and its arguments.
    pub args: Vec<String>,
    /// Longest run, in seconds (default 60).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u64>,
    /// Extension: text given to the program's standard input.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<String>,
    /// Extension: bytes, base64, given to its standard input (not with `stdin`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin_base64: Option<String>,
    /// Extension: variables added to its environment.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub env: std::collections::BTreeMap<String, String>,
    /// Extension: its working directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// Extension: the guest user it runs as (a name or uid; default the agent's, root).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Extension: how `stdout` and `stderr` are sent back: `utf8` (the
    /// default; bytes that are not UTF-8 are replaced) or `base64` (exact).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoding: Option<Encoding>,
}

/// How output bytes travel in a JSON string.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    /// As text; bytes that are not UTF-8 are replaced (U+FFFD).
    #[default]
    Utf8,
    /// Exactly, as standard base64 with padding.
    Base64,
}

/// Answer to exec.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ExecResponse {
    /// Its standard output (lossy UTF-8, or base64 with `encoding: base64`).
    pub stdout: String,
    /// Its standard error (lossy UTF-8, or base64 with `encoding: base64`).
    pub stderr: String,
    /// Its exit code (128 + signal when killed by one, -1 when timed out).
    pub exit_code: i32,
    /// Extension: the signal that ended it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    /// Extension: it ran past `timeout_secs` and was killed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub timed_out: bool,
    /// Extension: how long it ran, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// Extension: `base64` when `stdout` and `stderr` are base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoding: Option<Encoding>,
}

/// `POST /v1/sandboxes/:id/eval`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct EvalRequest {
    /// Code for the agent's warm interpreter.
    pub code: String,
    /// Extension: longest run, in seconds (default 60).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u64>,
}

/// Answer to eval.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct EvalResponse {
    /// The value of the last expression, as text.
    pub result: Option<String>,
    /// The error raised, as text.
    pub error: Option<String>,
    /// 0 on success, 1 on error.
    pub exit_code: i32,
}

/// How a branch captures memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum BranchMode {
    /// All of RAM while paused.
    Full,
    /// Pages changed since the sandbox's snapshot, while paused.
    Diff,
    /// Paused only to save state and write-protect RAM; copied while running.
    Live,
}

/// `POST /v1/sandboxes/:id/branch`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BranchRequest {
    /// The new snapshot's tag (default: generated).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// full (default), diff or live.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<BranchMode>,
    /// Legacy: `diff: true` is `mode: diff` (true with `mode` is an error).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diff: Option<bool>,
    /// Legacy: `live: true` is `mode: live` (true with `mode` is an error).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub live: Option<bool>,
    /// A full branch that also reports what a diff would have cost
    /// (`diff_ms`, `diff_physical_bytes`, `diff_logical_bytes`); with a
    /// diff or live branch it is an error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub measure_diff: Option<bool>,
    /// Answer once the snapshot is complete (default). With false, a live
    /// branch answers 202 as soon as the sandbox runs again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait: Option<bool>,
    /// The snapshot a diff stacks on; must be the sandbox's own snapshot
    /// (the only base its dirty log is kept against).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_tag: Option<String>,
}

impl BranchRequest {
    /// The mode asked for, or why the request is contradictory: `mode`
    /// with a legacy flag set true, or more than one of `diff`, `live` and
    /// `measure_diff` (a flag set false says nothing).
    pub fn resolved_mode(&self) -> Result<BranchMode, String> {
        let (diff, live) = (self.diff == Some(true), self.live == Some(true));
        let measure = self.measure_diff == Some(true);
        let mode = match (self.mode, diff, live) {
            (Some(_), true, _) | (Some(_), _, true) => {
                return Err("give either mode or a legacy flag (diff, live), not both: \
                     mode: \"diff\" is diff: true, mode: \"live\" is live: true"
                    .into())
            }
            (Some(m), false, false) => m,
            (None, true, true) => {
                return Err("diff and live are exclusive: a branch has one mode".into())
            }
            (None, true, false) => BranchMode::Diff,
            (None, false, true) => BranchMode::Live,
            (None, false, false) => BranchMode::Full,
        };
        if measure && mode != BranchMode::Full {
            return Err(format!(
                "measure_diff measures a diff beside a full branch; a {} branch cannot take it \
                 (a diff branch reports its own diff_ms and diff sizes)",
                match mode {
                    BranchMode::Diff => "diff",
                    _ => "live",
                }
            ));
        }
        Ok(mode)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_follow_the_published_pattern() {
        assert!(valid_tag("a"));
        assert!(valid_tag("py-3_12"));
        assert!(valid_tag(&"x".repeat(64)));
        assert!(!valid_tag(""));
        assert!(!valid_tag(&"x".repeat(65)));
        assert!(!valid_tag("a/b"));
        assert!(!valid_tag("a.b"));
        assert!(!valid_tag("é"));
    }

    #[test]
    fn branch_mode_resolves_the_legacy_flag() {
        let r: BranchRequest = serde_json::from_str(r#"{"diff":true}"#).unwrap();
        assert_eq!(r.resolved_mode(), Ok(BranchMode::Diff));
        let r: BranchRequest = serde_json::from_str(r#"{}"#).unwrap();
        assert_eq!(r.resolved_mode(), Ok(BranchMode::Full));
        let r: BranchRequest = serde_json::from_str(r#"{"mode":"live","wait":false}"#).unwrap();
        assert_eq!(r.resolved_mode(), Ok(BranchMode::Live));
        assert!(serde_json::from_str::<BranchRequest>(r#"{"mode":"fast"}"#).is_err());
    }

    /// Upstream's rules: a legacy flag set false says nothing; set true it
    /// conflicts with `mode` and with the other flags; `measure_diff` goes
    /// with a full branch only.
    #[test]
    fn branch_mode_follows_upstreams_legacy_rules() {
        let mode = |body: &str| {
            serde_json::from_str::<BranchRequest>(body)
                .unwrap()
                .resolved_mode()
        };
        assert_eq!(
            mode(r#"{"mode":"full","diff":false}"#),
            Ok(BranchMode::Full)
        );
        assert_eq!(
            mode(r#"{"mode":"live","live":false,"diff":false}"#),
            Ok(BranchMode::Live)
        );
        assert_eq!(mode(r#"{"live":true}"#), Ok(BranchMode::Live));
        assert_eq!(mode(r#"{"measure_diff":true}"#), Ok(BranchMode::Full));
        assert_eq!(
            mode(r#"{"mode":"full","measure_diff":true}"#),
            Ok(BranchMode::Full)
        );
        assert_eq!(
            mode(r#"{"measure_diff":false,"diff":true}"#),
            Ok(BranchMode::Diff)
        );
        for bad in [
            r#"{"mode":"full","diff":true}"#,
            r#"{"mode":"diff","diff":true}"#,
            r#"{"mode":"full","live":true}"#,
            r#"{"diff":true,"live":true}"#,
            r#"{"diff":true,"measure_diff":true}"#,
            r#"{"mode":"diff","measure_diff":true}"#,
            r#"{"live":true,"measure_diff":true}"#,
            r#"{"mode":"live","measure_diff":true}"#,
        ] {
            assert!(mode(bad).is_err(), "{bad} must be refused");
        }
    }

    /// Fields a client of ours does not know are taken (and ignored), as
    /// upstream does; the published clients' own fields are understood.
    #[test]
    fn request_bodies_take_unknown_and_upstream_fields() {
        let r: SpawnRequest = serde_json::from_str(r#"{"snapshot_tag":"t"}"#).unwrap();
        assert_eq!(r.n, 1);
        let r: SpawnRequest = serde_json::from_str(
            r#"{"snapshot_tag":"t","n":2,"per_child_netns":false,"memory_limit_mib":256,
                "prewarm":true,"live_fork":false,"hugepages":true,"from_the_future":[1]}"#,
        )
        .unwrap();
        assert_eq!(
            (r.n, r.per_child_netns, r.prewarm, r.hugepages),
            (2, Some(false), Some(true), Some(true))
        );
        let c: CreateSnapshot = serde_json::from_str(
            r#"{"tag":"t","kernel":"k","rootfs":"r","rw":false,"tap":"tap7","boot_wait_secs":10,"x":0}"#,
        )
        .unwrap();
        assert_eq!(
            (c.tap.as_deref(), c.boot_wait_secs),
            (Some("tap7"), Some(10))
        );
        let b: BranchRequest =
            serde_json::from_str(r#"{"measure_diff":true,"parent_tag":"p","y":{}}"#).unwrap();
        assert_eq!(
            (b.measure_diff, b.parent_tag.as_deref()),
            (Some(true), Some("p"))
        );
        serde_json::from_str::<ExecRequest>(r#"{"args":["a"],"z":1}"#).unwrap();
        serde_json::from_str::<EvalRequest>(r#"{"code":"1","z":1}"#).unwrap();
        serde_json::from_str::<CompactRequest>(r#"{"to":"b","z":1}"#).unwrap();
    }

    /// Upstream's SandboxInfo fields are always there, null when unset;
    /// ours only when they say something.
    #[test]
    fn sandbox_info_always_carries_upstreams_fields() {
        let info = SandboxInfo {
            id: "a-0".into(),
            snapshot_tag: "t".into(),
            pid: 7,
            ..SandboxInfo::default()
        };
        let v = serde_json::to_value(&info).unwrap();
        for key in [
            "netns",
            "guest_addr",
            "memory_limit_mib",
            "last_branch_memory_path",
        ] {
            assert!(v[key].is_null() && v.get(key).is_some(), "{key}: {v}");
        }
        assert_eq!(
            (v["has_branched"].as_bool(), v["branch_count"].as_u64()),
            (Some(false), Some(0))
        );
        assert_eq!(v["pid"], 7);
        for key in ["live_fork", "hugepages", "warning"] {
            assert!(v.get(key).is_none(), "{key}: {v}");
        }
    }

    /// pause_ms is an integer, as upstream's clients read it.
    #[test]
    fn pause_ms_is_an_integer() {
        let v = serde_json::json!({"tag":"t","dir":"/d","created_at_unix":1,"pause_ms":2,
            "pause_us":1500,"status":"ready","bootable":true});
        let info: SnapshotInfo = serde_json::from_value(v.clone()).unwrap();
        assert_eq!((info.pause_ms, info.pause_us), (Some(2), Some(1500)));
        assert_eq!(serde_json::to_value(&info).unwrap(), v);
        assert!(serde_json::from_value::<SnapshotInfo>(
            serde_json::json!({"tag":"t","dir":"/d","created_at_unix":1,"pause_ms":1.5,
                "status":"ready","bootable":true})
        )
        .is_err());
    }

    #[test]
    fn ping_answers_pong_beside_the_agents_fields() {
        let agent: crate::agent::Pong = serde_json::from_value(serde_json::json!({
            "version": "1", "protocol": 1, "uptime_ms": 5, "interpreter_ready": true,
            "guest": "linux", "pid": 1
        }))
        .unwrap();
        let v = serde_json::to_value(PingResponse { pong: true, agent }).unwrap();
        assert_eq!(
            (v["pong"].as_bool(), v["pid"].as_u64()),
            (Some(true), Some(1))
        );
        assert_eq!(v["guest"], "linux");
    }

    #[test]
    fn snapshot_detail_flattens_the_info() {
        let d = SnapshotDetail {
            info: SnapshotInfo {
                tag: "t".into(),
                dir: "/d".into(),
                created_at_unix: 1,
                branched_from: None,
                pause_ms: None,
                pause_us: None,
                diff_ms: None,
                diff_physical_bytes: None,
                diff_logical_bytes: None,
                status: SnapshotStatus::Ready,
                bootable: true,
                warning: None,
                kind: None,
                guest: None,
                mem_mib: None,
                network: false,
                tap: None,
            },
            memory_logical_bytes: 4096,
            memory_physical_bytes: 0,
            vmstate_bytes: 10,
            parent_tag: None,
            parent_content_hash: None,
            chain_depth: 0,
            ancestors: vec![],
            dependents: vec![],
            verified: false,
        };
        let v = serde_json::to_value(&d).unwrap();
        assert_eq!(v["tag"], "t");
        assert_eq!(v["status"], "ready");
        assert_eq!(v["chain_depth"], 0);
        let back: SnapshotDetail = serde_json::from_value(v).unwrap();
        assert_eq!(back, d);
    }
}
