//! BRANCH consistency: the built-in guest stamps every page of its memory
//! with a pass number, continuously, while the VM is branched; a branch
//! must hold memory exactly as it was at the pause instant (the stamp
//! invariant holds in the snapshot's memory file and inside its children).

mod common;

use std::path::Path;

use common::{fork_children, ControlledVm, TempDir, TestVm};
use proto::control::{ControlRequest, ControlResponse, SnapshotMode};
use proto::guest::{GuestRequest, GuestResponse};
use vmm::boot::builtin::stamp_violations;

const MEM_MIB: u64 = 128;
const STAMP_MIB: u64 = 96;

fn branch(vm: &mut TestVm, dir: &Path, mode: SnapshotMode) -> serde_json::Value {
    match vm.call(ControlRequest::Snapshot {
        dir: dir.to_owned(),
        leave_paused: false,
        mode,
        wait: true,
    }) {
        ControlResponse::Snapshot { meta, .. } => meta,
        other => panic!("{mode:?} branch failed: {other:?}"),
    }
}

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
    let tmp = TempDir::new(&format!("branch-{mode:?}-{backend}"));
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
    match vm.guest(GuestRequest::StampStart {
        mib: STAMP_MIB,
        offset_mib: 0,
    }) {
        GuestResponse::Stamp { pages, .. } => assert_eq!(pages, STAMP_MIB << 8),
        other => panic!("{other:?}"),
    }
    if mode == SnapshotMode::Diff {
        branch(&mut vm, &tmp.path().join("base"), SnapshotMode::Full);
    }
    let mut seen = Vec::new();
    for round in 0..rounds {
        let dir = tmp.path().join(format!("b{round}"));
        branch(&mut vm, &dir, mode);
        seen.push(check_memory_file(&dir));
    }
    // The stamper kept running between branches.
    assert!(
        seen.windows(2).all(|w| w[0] != w[1]),
        "the guest did not run between branches: {seen:?}"
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
    branch_many_times(SnapshotMode::Live, 8);
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
    }) {
        ControlResponse::Snapshot { meta, pause_ms } => {
            assert!(pause_ms.is_some());
            meta
        }
        other => panic!("{other:?}"),
    };
    assert_eq!(meta["status"], "writing");
    // A second live branch while this one copies is refused.
    let r = vm.call(ControlRequest::Snapshot {
        dir: tmp.path().join("second"),
        leave_paused: false,
        mode: SnapshotMode::Live,
        wait: true,
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
    });
    assert!(
        matches!(r, ControlResponse::Error { ref message } if message.contains("--memory-backend memfd")),
        "{r:?}"
    );
    vm.shutdown();
}

/// Makes sure `pages` 2 MiB huge pages are free, reserving more if needed
/// (tests run as root); fails saying why when the kernel cannot. Returns
/// the reserve as it was, to give back with [`restore_huge_pages`].
fn reserve_huge_pages(pages: u64) -> String {
    let before = std::fs::read_to_string("/proc/sys/vm/nr_hugepages").unwrap();
    let free = |field: &str| -> u64 {
        std::fs::read_to_string("/proc/meminfo")
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    let have = free("HugePages_Free:");
    if have < pages {
        let total = free("HugePages_Total:");
        std::fs::write(
            "/proc/sys/vm/nr_hugepages",
            (total + pages - have).to_string(),
        )
        .expect(
            "this test needs 2 MiB huge pages and root to reserve them (/proc/sys/vm/nr_hugepages)",
        );
    }
    let now = free("HugePages_Free:");
    assert!(
        now >= pages,
        "this test needs {pages} free 2 MiB huge pages, the kernel gave {now}"
    );
    before
}

#[test]
fn live_branches_on_huge_pages_are_consistent_under_concurrent_writes() {
    let before = reserve_huge_pages(MEM_MIB / 2);
    branch_many_times_on(SnapshotMode::Live, 8, "memfd-hugetlb");
    let _ = std::fs::write("/proc/sys/vm/nr_hugepages", before.trim());
}
