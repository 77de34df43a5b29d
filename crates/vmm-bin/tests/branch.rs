//! BRANCH consistency: the built-in guest stamps every page of its memory
//! with a pass number, continuously, while the VM is branched; a branch
//! must hold memory exactly as it was at the pause instant (the stamp
//! invariant holds in the snapshot's memory file and inside its children).

mod branch_common;
mod common;

use std::path::Path;

use branch_common::{
    branch, branch_waiting, with_huge_pages, writes_after_live_branches_reach_the_next_diff,
    MEM_MIB,
};
use common::{fork_children, ControlledVm, TempDir, TestVm};
use proto::control::{ControlRequest, ControlResponse, SnapshotMode};
use proto::guest::{GuestRequest, GuestResponse};
use vmm::boot::builtin::stamp_violations;

const STAMP_MIB: u64 = 96;

/// Checks the stamp invariant in the snapshot's memory file (assembling a
/// diff first, as a restore would) and returns (pass, cursor) found there.
fn check_memory_file(dir: &Path) -> (u64, u64) {
    vmm::snapshot::ensure_memory(dir).unwrap();
    let bytes = std::fs::read(dir.join("memory")).unwrap();
    assert_eq!(bytes.len() as u64, MEM_MIB << 20);
    let word =
        |addr: u64| u64::from_le_bytes(bytes[addr as usize..addr as usize + 8].try_into().unwrap());
    let (bad, pass, cursor) = stamp_violations(MEM_MIB << 20, word);
    assert_eq!(
        bad,
        0,
        "{}: {bad} pages are not as they were at the pause instant",
        dir.display()
    );
    assert!(pass >= 2, "the stamper had not started");
    (pass, cursor)
}

fn branch_many_times(mode: SnapshotMode, rounds: usize) {
    branch_many_times_on(mode, rounds, "memfd");
}

fn branch_many_times_on(mode: SnapshotMode, rounds: usize, backend: &str) {
    branch_many_times_waiting(mode, rounds, backend, true);
}

fn branch_many_times_waiting(mode: SnapshotMode, rounds: usize, backend: &str, wait: bool) {
    branch_many_times_stamping(mode, rounds, backend, wait, (STAMP_MIB, 0), 0, &[]);
}

/// Branches `rounds` times while the guest stamps `stamp` (MiB, offset
/// MiB) of its memory, after filling its first `fill_mib` MiB, checking
/// each branch and a child of the last.
fn branch_many_times_stamping(
    mode: SnapshotMode,
    rounds: usize,
    backend: &str,
    wait: bool,
    (stamp_mib, stamp_offset): (u64, u64),
    fill_mib: u64,
    env: &[(&str, &str)],
) {
    let tmp = TempDir::new(&format!("branch-{mode:?}-{backend}-{wait}-{stamp_mib}"));
    let mem = MEM_MIB.to_string();
    let mut vm = TestVm::start_with_env(
        &[
            "--builtin",
            "--mem-mib",
            &mem,
            "--console",
            "none",
            "--memory-backend",
            backend,
        ],
        env,
    );
    if fill_mib > 0 {
        vm.guest(GuestRequest::Fill {
            seed: 3,
            seq: 1,
            mib: fill_mib,
            offset_mib: 0,
        });
    }
    match vm.guest(GuestRequest::StampStart {
        mib: stamp_mib,
        offset_mib: stamp_offset,
    }) {
        GuestResponse::Stamp { pages, .. } => assert_eq!(pages, stamp_mib << 8),
        other => panic!("{other:?}"),
    }
    if mode == SnapshotMode::Diff {
        branch(&mut vm, &tmp.path().join("base"), SnapshotMode::Full);
    }
    let mut seen = Vec::new();
    for round in 0..rounds {
        let dir = tmp.path().join(format!("b{round}"));
        branch_waiting(&mut vm, &dir, mode, wait);
        seen.push(check_memory_file(&dir));
    }
    // Each branch is at or after the one before (never an older instant),
    // and the stamper ran across the series. Two branches in a row may
    // see the same instant: a vCPU resumed by one branch need not get a
    // core before the next pauses it on a loaded host.
    assert!(
        seen.windows(2).all(|w| w[0] <= w[1]),
        "a branch went back in time: {seen:?}"
    );
    assert!(
        seen.first() < seen.last(),
        "the guest did not run across {rounds} branches: {seen:?}"
    );
    // A child of the last branch sees the same instant, and carries on.
    let last = tmp.path().join(format!("b{}", rounds - 1));
    let mut kids = fork_children(&last, 1, &tmp.path().join("kids"), &["--paused"]);
    let kid = &mut kids[0];
    assert_eq!(kid.call(ControlRequest::Resume), ControlResponse::Ok);
    match kid.guest(GuestRequest::StampVerify) {
        GuestResponse::Stamp {
            bad_pages, pass, ..
        } => {
            assert_eq!(bad_pages, 0);
            assert!(pass >= seen.last().unwrap().0);
        }
        other => panic!("{other:?}"),
    }
    kids.pop().unwrap().shutdown();
    vm.shutdown();
}

#[test]
fn full_branches_are_consistent_under_concurrent_writes() {
    branch_many_times(SnapshotMode::Full, 8);
}

#[test]
fn diff_branches_are_consistent_under_concurrent_writes() {
    branch_many_times(SnapshotMode::Diff, 8);
}

#[test]
fn live_branches_are_consistent_under_concurrent_writes() {
    // The guest stamps as fast as it can: the pre-copy does not converge
    // and is abandoned for write protection armed before the pause...
    branch_many_times(SnapshotMode::Live, 8);
    // ...or, told not to give up, ends with its residue write-protected in
    // the pause (or copied there, when the stamper was slow).
    branch_many_times_stamping(
        SnapshotMode::Live,
        8,
        "memfd",
        true,
        (STAMP_MIB, 0),
        0,
        &[("FORKD_PRECOPY", "abandon=0")],
    );
}

/// The write-protected copy (a caller that does not wait), many times.
#[test]
fn live_branches_without_wait_are_consistent_under_concurrent_writes() {
    branch_many_times_waiting(SnapshotMode::Live, 6, "memfd", false);
}

/// The same with a small window stamped over and over near the end of RAM
/// (the bulk copy reaches it last), behind filled memory (the arm before
/// the pause takes a while, the guest writing meanwhile): the guest
/// rewrites the blocks it wrote between that arm and the pause soon after
/// the pause, so any of them the pause failed to protect again shows.
#[test]
fn live_branches_without_wait_of_a_hot_window_are_consistent() {
    branch_many_times_stamping(SnapshotMode::Live, 8, "memfd", false, (2, 110), 100, &[]);
    with_huge_pages(MEM_MIB / 2, || {
        branch_many_times_stamping(
            SnapshotMode::Live,
            8,
            "memfd-hugetlb",
            false,
            (2, 110),
            100,
            &[],
        )
    });
}

/// A diff after a live branch holds exactly the pages written after the
/// live branch's pause: the live copy (pre-copy when the caller waits,
/// write protection when it does not) leaves KVM's dirty log reset as of
/// its snapshot instant, no write lost. The guest stamps all the while;
/// every snapshot of the chain, assembled as a child would map it, must
/// hold one instant.
fn diffs_after_live_branches_on(backend: &str) {
    let tmp = TempDir::new(&format!("branch-live-diff-{backend}"));
    let mem = MEM_MIB.to_string();
    let mut vm = TestVm::start(&[
        "--builtin",
        "--mem-mib",
        &mem,
        "--console",
        "none",
        "--memory-backend",
        backend,
    ]);
    vm.guest(GuestRequest::StampStart {
        mib: STAMP_MIB,
        offset_mib: 0,
    });
    let mut last = None;
    for round in 0..6 {
        let wait = round % 2 == 0;
        let live = tmp.path().join(format!("live{round}"));
        branch_waiting(&mut vm, &live, SnapshotMode::Live, wait);
        let at_live = check_memory_file(&live);
        for d in 0..2 {
            let diff = tmp.path().join(format!("diff{round}-{d}"));
            let meta = branch(&mut vm, &diff, SnapshotMode::Diff);
            assert_eq!(meta["kind"], "diff");
            let at_diff = check_memory_file(&diff);
            assert!(at_diff > at_live, "the guest did not run: {at_diff:?}");
            last = Some(diff);
        }
    }
    // A child of the chain's head carries on from the same instant.
    let last = last.unwrap();
    let mut kids = fork_children(&last, 1, &tmp.path().join("kids"), &["--paused"]);
    let kid = &mut kids[0];
    assert_eq!(kid.call(ControlRequest::Resume), ControlResponse::Ok);
    match kid.guest(GuestRequest::StampVerify) {
        GuestResponse::Stamp { bad_pages, .. } => assert_eq!(bad_pages, 0),
        other => panic!("{other:?}"),
    }
    kids.pop().unwrap().shutdown();
    vm.shutdown();
}

#[test]
fn diff_chains_on_live_branches_are_consistent_under_concurrent_writes() {
    diffs_after_live_branches_on("memfd");
}

#[test]
fn writes_after_a_live_branch_without_wait_reach_the_next_diff() {
    writes_after_live_branches_reach_the_next_diff("memfd", false);
}

#[test]
fn writes_during_and_after_a_precopied_live_branch_are_exact() {
    writes_after_live_branches_reach_the_next_diff("memfd", true);
}

#[test]
fn writes_after_live_branches_on_huge_pages_reach_the_next_diff() {
    with_huge_pages(MEM_MIB / 2, || {
        writes_after_live_branches_reach_the_next_diff("memfd-hugetlb", false);
        writes_after_live_branches_reach_the_next_diff("memfd-hugetlb", true);
    });
}

#[test]
fn a_live_branch_without_wait_is_writing_until_its_copy_ends() {
    let tmp = TempDir::new("branch-nowait");
    let mem = MEM_MIB.to_string();
    let mut vm = TestVm::start(&[
        "--builtin",
        "--mem-mib",
        &mem,
        "--console",
        "none",
        "--memory-backend",
        "memfd",
    ]);
    vm.guest(GuestRequest::StampStart {
        mib: STAMP_MIB,
        offset_mib: 0,
    });
    let dir = tmp.path().join("live");
    let meta = match vm.call(ControlRequest::Snapshot {
        dir: dir.clone(),
        leave_paused: false,
        mode: SnapshotMode::Live,
        wait: false,
        measure_diff: false,
    }) {
        ControlResponse::Snapshot { meta, pause_ms, .. } => {
            assert!(pause_ms.is_some());
            meta
        }
        other => panic!("{other:?}"),
    };
    assert_eq!(meta.status, proto::snapshot::SnapshotStatus::Writing);
    // A second live branch while this one copies is refused.
    let r = vm.call(ControlRequest::Snapshot {
        dir: tmp.path().join("second"),
        leave_paused: false,
        mode: SnapshotMode::Live,
        wait: true,
        measure_diff: false,
    });
    if let ControlResponse::Error { message } = &r {
        assert!(message.contains("still copying"), "{message}");
    }
    // It becomes ready, and is then consistent.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let m: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("snapshot.json")).unwrap()).unwrap();
        match m["status"].as_str().unwrap() {
            "ready" => break,
            "writing" => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the live copy never finished"
                );
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => panic!("live copy ended {other}"),
        }
    }
    check_memory_file(&dir);
    vm.shutdown();
}

#[test]
fn live_branch_needs_memfd_ram() {
    let tmp = TempDir::new("branch-anon");
    let mut vm = TestVm::start(&["--builtin", "--mem-mib", "32", "--console", "none"]);
    let r = vm.call(ControlRequest::Snapshot {
        dir: tmp.path().join("x"),
        leave_paused: false,
        mode: SnapshotMode::Live,
        wait: true,
        measure_diff: false,
    });
    assert!(
        matches!(r, ControlResponse::Error { ref message } if message.contains("--memory-backend memfd")),
        "{r:?}"
    );
    vm.shutdown();
}

#[test]
fn live_branches_on_huge_pages_are_consistent_under_concurrent_writes() {
    with_huge_pages(MEM_MIB / 2, || {
        branch_many_times_on(SnapshotMode::Live, 8, "memfd-hugetlb")
    });
}
