//! What a spawn or a branch request may ask, checked without touching the
//! store, a process or the disk: pure functions of the request and the
//! state it names, so every rule is a unit test.

use proto::api::{
    cpu_millis, BranchMode, BranchRequest, SnapshotInfo, SnapshotStatus, SpawnRequest,
    CPU_LIMIT_MAX, CPU_LIMIT_MIN, DISK_QUOTA_MIB_MAX, IO_LIMIT_MIBPS_MAX, MAX_SPAWN,
    PIDS_LIMIT_MAX, PIDS_LIMIT_MIN,
};
use proto::control::Limits;

use crate::cgroup::Controller;
use crate::error::{ApiError, ApiResult};

/// Smallest memory cap: below it a VMM cannot even start.
pub const MIN_MEMORY_LIMIT_MIB: u64 = 32;
/// Largest memory cap (1 TiB): more is no cap at all, and as bytes it
/// would overflow what the cgroup files take.
pub const MAX_MEMORY_LIMIT_MIB: u64 = 1 << 20;

/// The request on its own: `n` in range.
pub fn spawn_request(req: &SpawnRequest) -> ApiResult<()> {
    if !(1..=MAX_SPAWN).contains(&req.n) {
        return Err(ApiError::bad_request(format!(
            "n = {} is out of range: spawn 1 to {MAX_SPAWN} sandboxes a request",
            req.n
        )));
    }
    if let Some(labels) = &req.labels {
        proto::api::check_labels(labels).map_err(ApiError::bad_request)?;
    }
    if let Some(t) = req.timeout_secs {
        sandbox_timeout(t)?;
    }
    if req.on_timeout.is_some() && req.timeout_secs.is_none() {
        return Err(ApiError::bad_request(
            "on_timeout says what timeout_secs does: give timeout_secs too",
        ));
    }
    Ok(())
}

/// A sandbox timeout in range.
pub fn sandbox_timeout(secs: u64) -> ApiResult<u64> {
    if !(1..=proto::api::MAX_SANDBOX_TIMEOUT_SECS).contains(&secs) {
        return Err(ApiError::bad_request(format!(
            "timeout_secs {secs} is out of range: 1 to {} (30 days)",
            proto::api::MAX_SANDBOX_TIMEOUT_SECS
        )));
    }
    Ok(secs)
}

/// The label filters of `GET /v1/sandboxes` (`label=KEY=VALUE`, repeated:
/// all must match) and its `all` flag, from the query string.
pub fn list_query(query: Option<&str>) -> ApiResult<(bool, Vec<(String, String)>)> {
    let mut all = false;
    let mut labels = Vec::new();
    for (k, v) in serde_urlencoded::from_str::<Vec<(String, String)>>(query.unwrap_or(""))
        .map_err(|e| ApiError::bad_request(format!("bad query: {e}")))?
    {
        match k.as_str() {
            "all" => {
                all = match v.as_str() {
                    "" | "true" | "1" => true,
                    "false" | "0" => false,
                    _ => {
                        return Err(ApiError::bad_request(format!(
                            "all={v:?}: use true or false"
                        )))
                    }
                }
            }
            "label" => {
                let (lk, lv) = v.split_once('=').ok_or_else(|| {
                    ApiError::bad_request(format!("label={v:?}: give it as KEY=VALUE"))
                })?;
                labels.push((lk.to_owned(), lv.to_owned()));
            }
            _ => {
                return Err(ApiError::bad_request(format!(
                    "unknown parameter {k:?} (known: all, label)"
                )))
            }
        }
    }
    if labels.len() > proto::api::MAX_LABELS {
        return Err(ApiError::bad_request(format!(
            "at most {} label filters",
            proto::api::MAX_LABELS
        )));
    }
    Ok((all, labels))
}

/// The cgroup limits a spawn's children get: each the request's, or else
/// the daemon's default; each in range and with its controller on this
/// host (`has`). The daemon's defaults are checked the same way at its
/// start (`what` names where a value came from).
pub fn limits(
    req: &SpawnRequest,
    defaults: &Limits,
    has: impl Fn(Controller) -> bool,
    io_disk: Option<(u32, u32)>,
) -> ApiResult<Limits> {
    let asked =
        Limits {
            memory_mib: req.memory_limit_mib,
            cpu_millis: match req.cpu_limit {
                Some(cpus) if !(CPU_LIMIT_MIN..=CPU_LIMIT_MAX).contains(&cpus) => {
                    return Err(ApiError::bad_request(format!(
                        "cpu_limit {cpus} is out of range: {CPU_LIMIT_MIN} to {CPU_LIMIT_MAX} CPUs"
                    )))
                }
                cpus => cpus.map(cpu_millis),
            },
            pids: req.pids_limit,
            io: match (req.io_limit_mibps, io_disk) {
                (None, _) => None,
                (Some(m), _) if !(1..=IO_LIMIT_MIBPS_MAX).contains(&m) => {
                    return Err(ApiError::bad_request(format!(
                        "io_limit_mibps {m} is out of range: 1 to {IO_LIMIT_MIBPS_MAX}"
                    )))
                }
                (Some(_), None) => return Err(ApiError::bad_request(
                    "io_limit_mibps caps the disk that holds the daemon's sandboxes, and their \
                     directory is on a file system with no block device (a tmpfs, an overlay): \
                     leave it out, or put the state directory on a disk",
                )),
                (Some(m), Some((major, minor))) => Some(proto::control::IoLimit {
                    major,
                    minor,
                    bytes_per_sec: m << 20,
                }),
            },
        };
    let checks: [(Option<u64>, &str, std::ops::RangeInclusive<u64>, Controller); 2] = [
        (
            asked.memory_mib,
            "memory_limit_mib",
            MIN_MEMORY_LIMIT_MIB..=MAX_MEMORY_LIMIT_MIB,
            Controller::Memory,
        ),
        (
            asked.pids,
            "pids_limit",
            PIDS_LIMIT_MIN..=PIDS_LIMIT_MAX,
            Controller::Pids,
        ),
    ];
    for (value, field, range, _) in &checks {
        if let Some(v) = value {
            if !range.contains(v) {
                return Err(ApiError::bad_request(format!(
                    "{field} {v} is out of range: {} to {}",
                    range.start(),
                    range.end()
                )));
            }
        }
    }
    let wanted = [
        (
            asked.memory_mib.is_some(),
            "memory_limit_mib",
            Controller::Memory,
        ),
        (asked.cpu_millis.is_some(), "cpu_limit", Controller::Cpu),
        (asked.pids.is_some(), "pids_limit", Controller::Pids),
        (asked.io.is_some(), "io_limit_mibps", Controller::Io),
    ];
    for (given, field, c) in wanted {
        if given && !has(c) {
            return Err(ApiError::bad_request(format!(
                "{field} needs the {} cgroup controller, which this host does not have (see `forkd doctor`)",
                c.name()
            )));
        }
    }
    Ok(Limits {
        memory_mib: asked.memory_mib.or(defaults.memory_mib),
        cpu_millis: asked.cpu_millis.or(defaults.cpu_millis),
        pids: asked.pids.or(defaults.pids),
        io: asked.io.or(defaults.io),
    })
}

/// The disk quota (MiB) a spawn's children get: the request's, in range,
/// or else the daemon's default.
pub fn disk_quota(req: &SpawnRequest, default: Option<u64>) -> ApiResult<Option<u64>> {
    match req.disk_quota_mib {
        Some(q) if !(1..=DISK_QUOTA_MIB_MAX).contains(&q) => Err(ApiError::bad_request(format!(
            "disk_quota_mib {q} is out of range: 1 to {DISK_QUOTA_MIB_MAX}"
        ))),
        Some(q) => Ok(Some(q)),
        None => Ok(default),
    }
}

/// What a spawn gives its children, decided by its snapshot, and what of
/// the request it could not give as asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpawnPlan {
    /// Each child gets a network namespace of its own.
    pub per_child_netns: bool,
    /// What the request asked that the children do not get as asked.
    pub warning: Option<String>,
}

/// The request against its snapshot: ready and bootable. Each child gets a
/// network namespace exactly when the snapshot has a network interface
/// (its children cannot share one tap, and without one a namespace holds
/// nothing); a `per_child_netns` that says otherwise is not refused (the
/// published clients always send `false`), the plan's warning says what
/// the children got.
pub fn spawn_from(req: &SpawnRequest, snap: &SnapshotInfo) -> ApiResult<SpawnPlan> {
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
    let warning = match (req.per_child_netns, snap.network) {
        (Some(false), true) => Some(format!(
            "per_child_netns: false was asked, but snapshot {:?} has a network interface, which \
             its children cannot share (each keeps the parent's addresses): every child got a \
             network namespace of its own (see netns)",
            snap.tag
        )),
        (Some(true), false) => Some(format!(
            "per_child_netns: true was asked, but snapshot {:?} has no network interface to put \
             in a namespace: the children have none (snapshot with network: true for one)",
            snap.tag
        )),
        _ => None,
    };
    Ok(SpawnPlan {
        per_child_netns: snap.network,
        warning,
    })
}

/// Size of the huge pages `hugepages: true` asks for, in MiB.
pub const HUGE_PAGE_MIB: u64 = 2;

/// Whether children asked for `hugepages` get them: `n` children of
/// `mem_mib` each need that much RAM in free 2 MiB pages (`free`: the
/// host's, `None` when it has no hugetlbfs). When they do not fit, the
/// children get 4 KiB pages and the warning says why (as upstream: the
/// spawn goes on).
pub fn huge_pages(req: &SpawnRequest, mem_mib: u64, free: Option<u64>) -> (bool, Option<String>) {
    if req.hugepages != Some(true) {
        return (false, None);
    }
    let need = u64::from(req.n).saturating_mul(mem_mib.div_ceil(HUGE_PAGE_MIB));
    match free {
        Some(free) if free >= need => (true, None),
        Some(free) => (
            false,
            Some(format!(
                "hugepages: the host has {free} free 2 MiB huge pages and {} children of {mem_mib} \
                 MiB need {need}: their RAM is on 4 KiB pages (reserve more in \
                 /proc/sys/vm/nr_hugepages)",
                req.n
            )),
        ),
        None => (
            false,
            Some(
                "hugepages: this host has no 2 MiB huge pages (no hugetlbfs): the RAM is on 4 KiB \
                 pages"
                    .into(),
            ),
        ),
    }
}

/// What a valid branch request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BranchPlan {
    /// full, diff or live.
    pub mode: BranchMode,
    /// Answer once the snapshot is complete.
    pub wait: bool,
    /// A full branch that also measures what a diff would have cost.
    pub measure_diff: bool,
}

/// The branch request on its own, checked before anything is looked up (as
/// upstream: a contradictory body is 400 whether or not the sandbox
/// exists).
pub fn branch_body(req: &BranchRequest) -> ApiResult<BranchPlan> {
    let mode = req.resolved_mode().map_err(ApiError::bad_request)?;
    let wait = req.wait.unwrap_or(true);
    if !wait && mode != BranchMode::Live {
        return Err(ApiError::bad_request(
            "wait: false applies to live branches only (full and diff write while paused)",
        ));
    }
    Ok(BranchPlan {
        mode,
        wait,
        measure_diff: req.measure_diff == Some(true),
    })
}

/// The plan against sandbox `id`, whose diffs are taken against
/// `base_tag` and whose RAM is in a memfd when `live_fork`.
pub fn branch_of(
    plan: &BranchPlan,
    req: &BranchRequest,
    id: &str,
    base_tag: &str,
    live_fork: bool,
) -> ApiResult<()> {
    if let Some(parent) = &req.parent_tag {
        if plan.mode != BranchMode::Diff {
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
    if plan.mode == BranchMode::Live && !live_fork {
        return Err(ApiError::bad_request(format!(
            "a live branch needs the sandbox's RAM in a memfd; sandbox {id:?} was not spawned with live_fork: true (use mode full or diff, or spawn with live_fork)"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spawn(n: u32) -> SpawnRequest {
        SpawnRequest {
            snapshot_tag: "s".into(),
            n,
            ..SpawnRequest::default()
        }
    }

    fn snap(status: SnapshotStatus, bootable: bool, network: bool) -> SnapshotInfo {
        SnapshotInfo {
            tag: "s".into(),
            dir: "/d".into(),
            created_at_unix: 0,
            branched_from: None,
            pause_ms: None,
            pause_us: None,
            diff_ms: None,
            diff_physical_bytes: None,
            diff_logical_bytes: None,
            status,
            bootable,
            warning: None,
            kind: None,
            guest: None,
            mem_mib: None,
            network,
            tap: None,
        }
    }

    fn bad(r: ApiResult<impl std::fmt::Debug>, status: u16, needle: &str) {
        let e = r.unwrap_err();
        assert_eq!(e.status().as_u16(), status, "{e}");
        assert!(e.message.contains(needle), "{e}");
    }

    #[test]
    fn a_disk_quota_is_the_request_s_in_range_or_the_default() {
        let mut r = spawn(1);
        assert_eq!(disk_quota(&r, Some(4096)).unwrap(), Some(4096));
        assert_eq!(disk_quota(&r, None).unwrap(), None);
        r.disk_quota_mib = Some(DISK_QUOTA_MIB_MAX);
        assert_eq!(disk_quota(&r, None).unwrap(), Some(DISK_QUOTA_MIB_MAX));
        for q in [0, DISK_QUOTA_MIB_MAX + 1] {
            r.disk_quota_mib = Some(q);
            bad(disk_quota(&r, Some(1)), 400, "disk_quota_mib");
        }
    }

    #[test]
    fn spawn_counts() {
        assert!(spawn_request(&spawn(1)).is_ok());
        assert!(spawn_request(&spawn(MAX_SPAWN)).is_ok());
        bad(spawn_request(&spawn(0)), 400, "out of range");
        bad(spawn_request(&spawn(MAX_SPAWN + 1)), 400, "out of range");
    }

    #[test]
    fn limits_are_the_request_s_or_the_defaults_in_range_and_on_this_host() {
        let all = |_: Controller| true;
        let none = Limits::default();
        let mut r = spawn(1);
        assert_eq!(limits(&r, &none, all, None).unwrap(), none);
        r.memory_limit_mib = Some(MIN_MEMORY_LIMIT_MIB - 1);
        bad(
            limits(&r, &none, all, None),
            400,
            "memory_limit_mib 31 is out of range",
        );
        r.memory_limit_mib = Some(u64::MAX);
        bad(limits(&r, &none, all, None), 400, "out of range");
        r.memory_limit_mib = Some(MAX_MEMORY_LIMIT_MIB);
        assert!(limits(&r, &none, all, None).is_ok());
        r.memory_limit_mib = Some(256);
        bad(
            limits(&r, &none, |c| c != Controller::Memory, None),
            400,
            "memory_limit_mib needs the memory cgroup controller",
        );

        let defaults = Limits {
            memory_mib: Some(512),
            cpu_millis: Some(2000),
            pids: Some(1024),
            io: None,
        };
        let mut r = spawn(1);
        r.cpu_limit = Some(0.5);
        r.pids_limit = Some(PIDS_LIMIT_MIN);
        assert_eq!(
            limits(&r, &defaults, all, None).unwrap(),
            Limits {
                memory_mib: Some(512),
                cpu_millis: Some(500),
                pids: Some(PIDS_LIMIT_MIN),
                io: None,
            }
        );
        for cpus in [
            0.0,
            0.009,
            CPU_LIMIT_MAX + 1.0,
            f64::NAN,
            f64::INFINITY,
            -1.0,
        ] {
            r.cpu_limit = Some(cpus);
            bad(limits(&r, &none, all, None), 400, "cpu_limit");
        }
        r.cpu_limit = Some(CPU_LIMIT_MIN);
        assert_eq!(limits(&r, &none, all, None).unwrap().cpu_millis, Some(10));
        bad(
            limits(&r, &none, |c| c != Controller::Cpu, None),
            400,
            "the cpu cgroup controller",
        );
        r.pids_limit = Some(PIDS_LIMIT_MIN - 1);
        bad(
            limits(&r, &none, all, None),
            400,
            "pids_limit 63 is out of range",
        );
        // A disk cap: on the sandboxes' disk, in range, with its
        // controller, and refused where that directory has no disk.
        let mut r = spawn(1);
        r.io_limit_mibps = Some(8);
        assert_eq!(
            limits(&r, &none, all, Some((254, 0))).unwrap().io,
            Some(proto::control::IoLimit {
                major: 254,
                minor: 0,
                bytes_per_sec: 8 << 20
            })
        );
        bad(limits(&r, &none, all, None), 400, "no block device");
        bad(
            limits(&r, &none, |c| c != Controller::Io, Some((254, 0))),
            400,
            "the io cgroup controller",
        );
        for m in [0, IO_LIMIT_MIBPS_MAX + 1] {
            r.io_limit_mibps = Some(m);
            bad(limits(&r, &none, all, Some((8, 0))), 400, "io_limit_mibps");
        }
        // A default whose controller is missing is the start's business:
        // a request that asks for nothing is not refused for it.
        let r = spawn(1);
        assert_eq!(limits(&r, &defaults, |_| false, None).unwrap(), defaults);
    }

    #[test]
    fn spawn_needs_a_ready_snapshot_and_the_snapshot_decides_namespaces() {
        let plan = |netns: Option<bool>, network: bool| {
            let mut r = spawn(2);
            r.per_child_netns = netns;
            spawn_from(&r, &snap(SnapshotStatus::Ready, true, network))
        };
        for (asked, network) in [
            (None, false),
            (None, true),
            (Some(true), true),
            (Some(false), false),
        ] {
            assert_eq!(
                plan(asked, network),
                Ok(SpawnPlan {
                    per_child_netns: network,
                    warning: None
                })
            );
        }
        // The published clients' default on a networked snapshot: the
        // children get their namespaces anyway, and are told.
        let p = plan(Some(false), true).unwrap();
        assert!(p.per_child_netns);
        assert!(p.warning.unwrap().contains("namespace of its own"));
        let p = plan(Some(true), false).unwrap();
        assert!(!p.per_child_netns);
        assert!(p.warning.unwrap().contains("no network interface"));
        let r = spawn(2);
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
    }

    #[test]
    fn huge_pages_fit_or_fall_back_with_a_warning() {
        let mut r = spawn(3);
        assert_eq!(huge_pages(&r, 128, Some(0)), (false, None), "not asked");
        r.hugepages = Some(true);
        // 3 children of 128 MiB: 192 pages of 2 MiB; 129 MiB rounds up.
        assert_eq!(huge_pages(&r, 128, Some(192)), (true, None));
        assert_eq!(huge_pages(&r, 129, Some(195)), (true, None));
        let (on, warning) = huge_pages(&r, 128, Some(191));
        assert!(!on);
        assert!(warning
            .unwrap()
            .contains("191 free 2 MiB huge pages and 3 children of 128 MiB need 192"));
        let (on, warning) = huge_pages(&r, 128, None);
        assert!(!on && warning.unwrap().contains("no 2 MiB huge pages"));
    }

    fn branch_req(
        mode: Option<BranchMode>,
        wait: Option<bool>,
        parent: Option<&str>,
    ) -> BranchRequest {
        BranchRequest {
            mode,
            wait,
            parent_tag: parent.map(str::to_owned),
            ..BranchRequest::default()
        }
    }

    #[test]
    fn branch_modes_bases_and_waiting() {
        let plan = |r: &BranchRequest, live_fork| {
            let p = branch_body(r)?;
            branch_of(&p, r, "sb", "base", live_fork).map(|()| p)
        };
        assert_eq!(
            plan(&branch_req(None, None, None), false),
            Ok(BranchPlan {
                mode: BranchMode::Full,
                wait: true,
                measure_diff: false,
            })
        );
        let mut legacy = branch_req(None, None, None);
        legacy.diff = Some(true);
        assert_eq!(plan(&legacy, false).unwrap().mode, BranchMode::Diff);
        legacy.mode = Some(BranchMode::Full);
        bad(plan(&legacy, false), 400, "not both");
        let mut measured = branch_req(None, None, None);
        measured.measure_diff = Some(true);
        assert!(plan(&measured, false).unwrap().measure_diff);
        measured.mode = Some(BranchMode::Diff);
        bad(plan(&measured, false), 400, "measure_diff");
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
                wait: false,
                measure_diff: false,
            })
        );
        // The body alone decides this one, before any sandbox is looked up.
        bad(
            branch_body(&branch_req(Some(BranchMode::Diff), Some(false), None)),
            400,
            "live branches only",
        );
    }
}
