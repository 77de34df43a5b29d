//! What a spawn or a branch request may ask, checked without touching the
//! store, a process or the disk: pure functions of the request and the
//! state it names, so every rule is a unit test.

use proto::api::{
    BranchMode, BranchRequest, SnapshotInfo, SnapshotStatus, SpawnRequest, MAX_SPAWN,
};

use crate::error::{ApiError, ApiResult};

/// Smallest memory cap: below it a VMM cannot even start.
pub const MIN_MEMORY_LIMIT_MIB: u64 = 32;

/// The request on its own: `n` in range, a memory cap the host can apply.
pub fn spawn_request(req: &SpawnRequest, has_cgroups: bool) -> ApiResult<()> {
    if !(1..=MAX_SPAWN).contains(&req.n) {
        return Err(ApiError::bad_request(format!(
            "n = {} is out of range: spawn 1 to {MAX_SPAWN} sandboxes a request",
            req.n
        )));
    }
    if let Some(mib) = req.memory_limit_mib {
        if mib < MIN_MEMORY_LIMIT_MIB {
            return Err(ApiError::bad_request(format!(
                "memory_limit_mib {mib} is too small: at least {MIN_MEMORY_LIMIT_MIB}"
            )));
        }
        if !has_cgroups {
            return Err(ApiError::bad_request(
                "memory_limit_mib needs the memory cgroup controller, which this host does not have (see `forkd doctor`)",
            ));
        }
    }
    Ok(())
}

/// The request against its snapshot: ready and bootable; returns whether
/// each child gets a network namespace of its own (what the request says,
/// or, left out, whether the snapshot has a network interface: its
/// children cannot share one tap).
pub fn spawn_from(req: &SpawnRequest, snap: &SnapshotInfo) -> ApiResult<bool> {
    if snap.status != SnapshotStatus::Ready || !snap.bootable {
        return Err(ApiError::conflict(format!(
            "snapshot {:?} is {}{}; spawn from a ready snapshot",
            snap.tag,
            snap.status.as_str(),
            snap.warning
                .as_deref()
                .map(|w| format!(" ({w})"))
                .unwrap_or_default()
        )));
    }
    match (req.per_child_netns, snap.network) {
        (None, network) => Ok(network),
        (Some(a), network) if a == network => Ok(a),
        (Some(_), true) => Err(ApiError::bad_request(format!(
            "snapshot {:?} has a network interface, and each child needs a network namespace of its own for it (every child keeps the parent's addresses): leave per_child_netns out or set it true",
            snap.tag
        ))),
        (Some(_), false) => Err(ApiError::bad_request(format!(
            "snapshot {:?} has no network interface to put in a namespace: make one with network: true (forkd snapshot --network), or leave per_child_netns out",
            snap.tag
        ))),
    }
}

/// What a valid branch request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BranchPlan {
    /// full, diff or live.
    pub mode: BranchMode,
    /// Answer once the snapshot is complete.
    pub wait: bool,
}

/// A branch of sandbox `id`, whose diffs are taken against `base_tag` and
/// whose RAM is in a memfd when `live_fork`.
pub fn branch(
    req: &BranchRequest,
    id: &str,
    base_tag: &str,
    live_fork: bool,
) -> ApiResult<BranchPlan> {
    let mode = req.resolved_mode().map_err(ApiError::bad_request)?;
    if let Some(parent) = &req.parent_tag {
        if mode != BranchMode::Diff {
            return Err(ApiError::bad_request(
                "parent_tag names the base of a diff; give it with mode: diff only",
            ));
        }
        if parent != base_tag {
            return Err(ApiError::bad_request(format!(
                "a diff of sandbox {id:?} is taken against {base_tag:?} (its snapshot or its latest branch), not {parent:?}"
            )));
        }
    }
    if mode == BranchMode::Live && !live_fork {
        return Err(ApiError::bad_request(format!(
            "a live branch needs the sandbox's RAM in a memfd; sandbox {id:?} was not spawned with live_fork: true (use mode full or diff, or spawn with live_fork)"
        )));
    }
    let wait = req.wait.unwrap_or(true);
    if !wait && mode != BranchMode::Live {
        return Err(ApiError::bad_request(
            "wait: false applies to live branches only (full and diff write while paused)",
        ));
    }
    Ok(BranchPlan { mode, wait })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spawn(n: u32) -> SpawnRequest {
        SpawnRequest {
            snapshot_tag: "s".into(),
            n,
            per_child_netns: None,
            memory_limit_mib: None,
            live_fork: None,
        }
    }

    fn snap(status: SnapshotStatus, bootable: bool, network: bool) -> SnapshotInfo {
        SnapshotInfo {
            tag: "s".into(),
            dir: "/d".into(),
            created_at_unix: 0,
            branched_from: None,
            pause_ms: None,
            status,
            bootable,
            warning: None,
            kind: None,
            guest: None,
            mem_mib: None,
            network,
        }
    }

    fn bad(r: ApiResult<impl std::fmt::Debug>, status: u16, needle: &str) {
        let e = r.unwrap_err();
        assert_eq!(e.status().as_u16(), status, "{e}");
        assert!(e.message.contains(needle), "{e}");
    }

    #[test]
    fn spawn_counts_and_memory_caps() {
        assert!(spawn_request(&spawn(1), false).is_ok());
        assert!(spawn_request(&spawn(MAX_SPAWN), false).is_ok());
        bad(spawn_request(&spawn(0), true), 400, "out of range");
        bad(
            spawn_request(&spawn(MAX_SPAWN + 1), true),
            400,
            "out of range",
        );
        let mut r = spawn(1);
        r.memory_limit_mib = Some(MIN_MEMORY_LIMIT_MIB - 1);
        bad(spawn_request(&r, true), 400, "too small");
        r.memory_limit_mib = Some(256);
        assert!(spawn_request(&r, true).is_ok());
        bad(spawn_request(&r, false), 400, "cgroup");
    }

    #[test]
    fn spawn_needs_a_ready_snapshot_and_a_namespace_per_networked_child() {
        let r = spawn(2);
        assert_eq!(
            spawn_from(&r, &snap(SnapshotStatus::Ready, true, false)),
            Ok(false)
        );
        assert_eq!(
            spawn_from(&r, &snap(SnapshotStatus::Ready, true, true)),
            Ok(true)
        );
        bad(
            spawn_from(&r, &snap(SnapshotStatus::Writing, true, false)),
            409,
            "is writing",
        );
        bad(
            spawn_from(&r, &snap(SnapshotStatus::Failed, false, false)),
            409,
            "is failed",
        );
        bad(
            spawn_from(&r, &snap(SnapshotStatus::Ready, false, false)),
            409,
            "spawn from a ready",
        );
        let mut r = spawn(2);
        r.per_child_netns = Some(false);
        bad(
            spawn_from(&r, &snap(SnapshotStatus::Ready, true, true)),
            400,
            "needs a network namespace",
        );
        r.per_child_netns = Some(true);
        bad(
            spawn_from(&r, &snap(SnapshotStatus::Ready, true, false)),
            400,
            "no network interface",
        );
        assert_eq!(
            spawn_from(&r, &snap(SnapshotStatus::Ready, true, true)),
            Ok(true)
        );
    }

    fn branch_req(
        mode: Option<BranchMode>,
        wait: Option<bool>,
        parent: Option<&str>,
    ) -> BranchRequest {
        BranchRequest {
            tag: None,
            mode,
            diff: None,
            wait,
            parent_tag: parent.map(str::to_owned),
        }
    }

    #[test]
    fn branch_modes_bases_and_waiting() {
        let plan = |r: &BranchRequest, live_fork| branch(r, "sb", "base", live_fork);
        assert_eq!(
            plan(&branch_req(None, None, None), false),
            Ok(BranchPlan {
                mode: BranchMode::Full,
                wait: true
            })
        );
        let mut legacy = branch_req(None, None, None);
        legacy.diff = Some(true);
        assert_eq!(plan(&legacy, false).unwrap().mode, BranchMode::Diff);
        legacy.mode = Some(BranchMode::Full);
        bad(plan(&legacy, false), 400, "not both");
        assert_eq!(
            plan(
                &branch_req(Some(BranchMode::Diff), None, Some("base")),
                false
            )
            .unwrap()
            .mode,
            BranchMode::Diff
        );
        bad(
            plan(
                &branch_req(Some(BranchMode::Full), None, Some("base")),
                false,
            ),
            400,
            "mode: diff only",
        );
        bad(
            plan(
                &branch_req(Some(BranchMode::Diff), None, Some("other")),
                false,
            ),
            400,
            "taken against \"base\"",
        );
        bad(
            plan(&branch_req(Some(BranchMode::Live), None, None), false),
            400,
            "live_fork: true",
        );
        assert_eq!(
            plan(&branch_req(Some(BranchMode::Live), Some(false), None), true),
            Ok(BranchPlan {
                mode: BranchMode::Live,
                wait: false
            })
        );
        bad(
            plan(
                &branch_req(Some(BranchMode::Diff), Some(false), None),
                false,
            ),
            400,
            "live branches only",
        );
    }
}
