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
    branch_waiting(vm, dir, mode, true)
}

/// Branches into `dir`; with `wait: false` (live only) waits for the copy
/// to end and returns the final metadata. A live branch's metadata names
/// the copy method: pre-copy when the caller waits, write protection when
/// it does not.
fn branch_waiting(
    vm: &mut TestVm,
    dir: &Path,
    mode: SnapshotMode,
    wait: bool,
) -> serde_json::Value {
    let meta = match vm.call(ControlRequest::Snapshot {
        dir: dir.to_owned(),
        leave_paused: false,
        mode,
        wait,
    }) {
        ControlResponse::Snapshot { meta, .. } => meta,
        other => panic!("{mode:?} branch failed: {other:?}"),
    };
    let meta = if wait { meta } else { wait_ready(dir) };
    assert_eq!(meta["status"], "ready", "{meta}");
    if mode == SnapshotMode::Live {
        let method = if wait { "precopy" } else { "write_protect" };
        assert_eq!(meta["live_copy"]["method"], method, "{meta}");
    }
    meta
}

/// Polls the snapshot in `dir` until it is no longer `writing`.
fn wait_ready(dir: &Path) -> serde_json::Value {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let m: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("snapshot.json")).unwrap()).unwrap();
        if m["status"] != "writing" {
            return m;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the live copy never finished"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
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
    branch_many_times_waiting(mode, rounds, backend, true);
}

fn branch_many_times_waiting(mode: SnapshotMode, rounds: usize, backend: &str, wait: bool) {
    let tmp = TempDir::new(&format!("branch-{mode:?}-{backend}-{wait}"));
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
        branch_waiting(&mut vm, &dir, mode, wait);
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

/// The write-protected copy (a caller that does not wait), many times.
#[test]
fn live_branches_without_wait_are_consistent_under_concurrent_writes() {
    branch_many_times_waiting(SnapshotMode::Live, 6, "memfd", false);
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

const FILL_MIB: u64 = 100;
const FILL_SEED: u64 = 0x5eed;

/// Reads a snapshot's memory as a child would map it (a diff assembled
/// first) and checks that the first [`FILL_MIB`] MiB of the guest's scratch
/// memory hold fill pattern `new` up to some word and pattern `old` from
/// there on: a sequential fill caught at one instant. Returns the words of
/// `new`.
fn fill_boundary(dir: &Path, new: u64, old: u64) -> u64 {
    use vmm::boot::builtin::{abi, pattern_word};
    vmm::snapshot::ensure_memory(dir).unwrap();
    let bytes = std::fs::read(dir.join("memory")).unwrap();
    let words = FILL_MIB << 17;
    let addr = |i: u64| abi::SCRATCH_START + i * 8;
    let word = |i: u64| {
        let a = addr(i) as usize;
        u64::from_le_bytes(bytes[a..a + 8].try_into().unwrap())
    };
    let boundary = (0..words)
        .find(|&i| word(i) != pattern_word(FILL_SEED, new, addr(i)))
        .unwrap_or(words);
    let later: Vec<u64> = (boundary..words)
        .filter(|&i| word(i) != pattern_word(FILL_SEED, old, addr(i)))
        .collect();
    assert!(
        later.is_empty(),
        "{}: not one instant of a sequential fill: pattern {new} up to {:#x}, then pattern \
         {old} but for {} words ({} of them pattern {new}), the first at {:#x}: writes \
         before the snapshot's instant are missing from it",
        dir.display(),
        addr(boundary),
        later.len(),
        later
            .iter()
            .filter(|&&i| word(i) == pattern_word(FILL_SEED, new, addr(i)))
            .count(),
        addr(later[0])
    );
    boundary
}

/// Every guest write after a live branch's instant is in the next diff:
/// the live copy resets KVM's dirty log as of its instant and loses no
/// write made after it. The guest rewrites its memory once, a page at a
/// time, so a lost dirty bit leaves a stale page that no later write
/// hides. Without `wait` (write-protected copy) the rewrite starts right
/// after the branch returns and runs during the copy; with `wait`
/// (pre-copy) it runs from another connection during the pre-copy, and
/// the branch must hold it as of one instant.
fn writes_after_live_branches_reach_the_next_diff(backend: &str, wait: bool) {
    let tmp = TempDir::new(&format!("branch-live-fill-{backend}-{wait}"));
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
    let fill = |seq: u64| GuestRequest::Fill {
        seed: FILL_SEED,
        seq,
        mib: FILL_MIB,
        offset_mib: 0,
    };
    vm.guest(fill(1));
    let socket = vm.dir.path().join("control.sock");
    let mut caught_mid_fill = 0;
    for seq in 1..4 {
        let live = tmp.path().join(format!("live{seq}"));
        if wait {
            let writer = {
                let (socket, request) = (socket.clone(), fill(seq + 1));
                std::thread::spawn(move || {
                    let mut c = proto::control::ControlClient::connect(
                        &socket,
                        std::time::Duration::from_secs(120),
                    )
                    .unwrap();
                    let r = c
                        .call(&ControlRequest::Guest {
                            request,
                            timeout_ms: Some(120_000),
                        })
                        .unwrap();
                    assert!(matches!(r, ControlResponse::Guest { .. }), "{r:?}");
                })
            };
            branch_waiting(&mut vm, &live, SnapshotMode::Live, true);
            writer.join().unwrap();
            let b = fill_boundary(&live, seq + 1, seq);
            caught_mid_fill += u32::from(b > 0 && b < FILL_MIB << 17);
        } else {
            match vm.call(ControlRequest::Snapshot {
                dir: live.clone(),
                leave_paused: false,
                mode: SnapshotMode::Live,
                wait: false,
            }) {
                ControlResponse::Snapshot { meta, .. } => assert_eq!(meta["status"], "writing"),
                other => panic!("{other:?}"),
            }
            vm.guest(fill(seq + 1));
            let meta = wait_ready(&live);
            assert_eq!(meta["status"], "ready", "{meta}");
            assert!(meta["live_copy"]["faults"].as_u64().unwrap() > 0, "{meta}");
            assert_eq!(fill_boundary(&live, seq + 1, seq), 0);
        }
        let diff = tmp.path().join(format!("diff{seq}"));
        branch(&mut vm, &diff, SnapshotMode::Diff);
        assert_eq!(fill_boundary(&diff, seq + 1, seq), FILL_MIB << 17);
    }
    eprintln!("{backend}, wait {wait}: {caught_mid_fill} of 3 pre-copies caught the fill midway");
    vm.shutdown();
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

/// Runs `f` with `pages` 2 MiB huge pages free, and gives the reserve
/// back as it was afterwards (also when `f` panics). Tests of this file
/// that need huge pages take turns: one giving its reserve back must not
/// pull the pages from under another.
fn with_huge_pages(pages: u64, f: impl FnOnce()) {
    static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());
    struct GiveBack(String);
    impl Drop for GiveBack {
        fn drop(&mut self) {
            let _ = std::fs::write("/proc/sys/vm/nr_hugepages", self.0.trim());
        }
    }
    let _turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
    let _give_back = GiveBack(reserve_huge_pages(pages));
    f();
}

/// Makes sure `pages` 2 MiB huge pages are free, reserving more if needed
/// (tests run as root); fails saying why when the kernel cannot. Returns
/// the reserve as it was, to give back.
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
    with_huge_pages(MEM_MIB / 2, || {
        branch_many_times_on(SnapshotMode::Live, 8, "memfd-hugetlb")
    });
}
