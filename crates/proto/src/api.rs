//! The forkd v1 REST API: request and answer bodies, shared by
//! forkd-daemon (which serves them) and the `forkd` CLI (which sends them).
//!
//! The shapes are the published v1 surface (DESIGN.md); fields this
//! implementation adds are optional on the way in and skipped on the way
//! out when absent, so v1 clients see what they expect.

use serde::{Deserialize, Serialize};

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
pub struct ErrorBody {
    /// What went wrong and what to do.
    pub error: String,
}

/// `GET /healthz`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// Always true when the daemon answers.
    pub ok: bool,
}

/// `GET /version`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Version {
    /// The daemon's version.
    pub version: String,
    /// `v1`.
    pub api: String,
}

/// `POST /v1/snapshots`: boot a guest, wait for its agent, snapshot it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateSnapshot {
    /// The new snapshot's tag.
    pub tag: String,
    /// Linux kernel (ELF vmlinux or bzImage) on the daemon's host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    /// Root filesystem image on the daemon's host (with forkd-agent as init).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rootfs: Option<String>,
    /// Let the guest write to the rootfs (through a copy-on-write layer; the
    /// image itself is never written).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rw: Option<bool>,
    /// Longest wait for the guest agent to answer, in seconds (default 60).
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
}

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
    /// How long the source was paused for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause_ms: Option<f64>,
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
}

/// `GET /v1/snapshots/:tag/info`: [`SnapshotInfo`] and its place in a chain.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
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
    /// Nearest first.
    pub ancestors: Vec<String>,
    /// Snapshots that depend on this one directly.
    pub dependents: Vec<String>,
}

/// `POST /v1/snapshots/:tag/compact`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompactRequest {
    /// Tag of the flat copy.
    pub to: String,
}

/// `POST /v1/sandboxes`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpawnRequest {
    /// The snapshot to fork.
    pub snapshot_tag: String,
    /// How many (1 to [`MAX_SPAWN`]).
    #[serde(default = "one")]
    pub n: u32,
    /// Give every child its own network namespace holding the tap its
    /// network interface is attached to. Left out, it follows the
    /// snapshot: on when it has a network interface.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_child_netns: Option<bool>,
    /// Memory cap for each child's VMM process (cgroup), in MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_limit_mib: Option<u64>,
    /// Children whose RAM is a private copy in a memfd, so they can be
    /// live-branched (costs a copy of the snapshot's memory per child).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub live_fork: Option<bool>,
}

fn one() -> u32 {
    1
}

/// A sandbox: one forked microVM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxInfo {
    /// Its id.
    pub id: String,
    /// The snapshot it was forked from.
    pub snapshot_tag: String,
    /// Its network namespace (a name under /var/run/netns).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
    /// Its guest's network address, reachable from inside `netns`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_addr: Option<String>,
    /// When it was spawned.
    pub created_at_unix: u64,
    /// Its forkd-vmm process.
    pub pid: i32,
    /// Its memory cap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_limit_mib: Option<u64>,
    /// Extension: whether its RAM can be live-branched.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub live_fork: bool,
}

/// `POST /v1/sandboxes/:id/exec`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    /// The program and its arguments.
    pub args: Vec<String>,
    /// Longest run, in seconds (default 60).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u64>,
    /// Extension: text given to the program's standard input.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<String>,
}

/// Answer to exec.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecResponse {
    /// Its standard output (lossy UTF-8).
    pub stdout: String,
    /// Its standard error (lossy UTF-8).
    pub stderr: String,
    /// Its exit code (128 + signal when killed by one, -1 when timed out).
    pub exit_code: i32,
}

/// `POST /v1/sandboxes/:id/eval`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalRequest {
    /// Code for the agent's warm interpreter.
    pub code: String,
    /// Extension: longest run, in seconds (default 60).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u64>,
}

/// Answer to eval.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
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
#[serde(deny_unknown_fields)]
pub struct BranchRequest {
    /// The new snapshot's tag (default: generated).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// full (default), diff or live.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<BranchMode>,
    /// Legacy: `diff: true` is `mode: diff` (giving both is an error).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diff: Option<bool>,
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
    /// The mode asked for, or why the request is contradictory.
    pub fn resolved_mode(&self) -> Result<BranchMode, String> {
        match (self.mode, self.diff) {
            (Some(_), Some(_)) => Err(
                "give either mode or the legacy diff flag, not both (mode: \"diff\" is diff: true)"
                    .into(),
            ),
            (Some(m), None) => Ok(m),
            (None, Some(true)) => Ok(BranchMode::Diff),
            (None, _) => Ok(BranchMode::Full),
        }
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
        let r: BranchRequest = serde_json::from_str(r#"{"mode":"full","diff":false}"#).unwrap();
        assert!(r.resolved_mode().is_err());
        assert!(serde_json::from_str::<BranchRequest>(r#"{"mode":"fast"}"#).is_err());
    }

    #[test]
    fn spawn_defaults_to_one_and_refuses_unknown_fields() {
        let r: SpawnRequest = serde_json::from_str(r#"{"snapshot_tag":"t"}"#).unwrap();
        assert_eq!(r.n, 1);
        assert!(serde_json::from_str::<SpawnRequest>(r#"{"snapshot_tag":"t","m":1}"#).is_err());
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
                status: SnapshotStatus::Ready,
                bootable: true,
                warning: None,
                kind: None,
                guest: None,
                mem_mib: None,
                network: false,
            },
            memory_logical_bytes: 4096,
            memory_physical_bytes: 0,
            vmstate_bytes: 10,
            parent_tag: None,
            parent_content_hash: None,
            chain_depth: 0,
            ancestors: vec![],
            dependents: vec![],
        };
        let v = serde_json::to_value(&d).unwrap();
        assert_eq!(v["tag"], "t");
        assert_eq!(v["status"], "ready");
        assert_eq!(v["chain_depth"], 0);
        let back: SnapshotDetail = serde_json::from_value(v).unwrap();
        assert_eq!(back, d);
    }
}
