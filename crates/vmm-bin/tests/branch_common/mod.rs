//! What the BRANCH tests share: branching through the control socket, the
//! fill-pattern check of one instant, and huge-page reservations.

#![allow(dead_code)]

use std::path::Path;

use crate::common::{ControlledVm, TempDir, TestVm};
use proto::control::{ControlRequest, ControlResponse, SnapshotMode};
use proto::guest::GuestRequest;

/// Guest RAM of the test VMs, in MiB.
pub const MEM_MIB: u64 = 128;

/// Branches into `dir`, waiting; returns the snapshot's metadata.
pub fn branch(vm: &mut TestVm, dir: &Path, mode: SnapshotMode) -> serde_json::Value {
    branch_waiting(vm, dir, mode, true)
}

/// Branches into `dir`; with `wait: false` (live only) waits for the copy
/// to end and returns the final metadata. A live branch's metadata names
/// the copy method: pre-copy when the caller waits, write protection when
/// it does not.
pub fn branch_waiting(
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
        measure_diff: false,
    }) {
        ControlResponse::Snapshot { meta, .. } => serde_json::to_value(meta).unwrap(),
        other => panic!("{mode:?} branch failed: {other:?}"),
    };
    let meta = if wait { meta } else { wait_ready(dir) };
    assert_eq!(meta["status"], "ready", "{meta}");
    if mode == SnapshotMode::Live {
        let copy = &meta["live_copy"];
        if wait {
            // Pre-copy, or, when its rounds did not converge, the
            // write-protected copy armed before the pause.
            let abandoned = copy["method"] == "write_protect"
                && copy["precopy_round_pages"]
                    .as_array()
                    .is_some_and(|r| !r.is_empty());
            assert!(copy["method"] == "precopy" || abandoned, "{meta}");
        } else {
            assert_eq!(copy["method"], "write_protect", "{meta}");
        }
    }
    meta
}

/// Polls the snapshot in `dir` until it is no longer `writing`.
pub fn wait_ready(dir: &Path) -> serde_json::Value {
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

pub const FILL_MIB: u64 = 100;
pub const FILL_SEED: u64 = 0x5eed;

/// Reads a snapshot's memory as a child would map it (a diff assembled
/// first) and checks that the first [`FILL_MIB`] MiB of the guest's scratch
/// memory hold fill pattern `new` up to some word and pattern `old` from
/// there on: a sequential fill caught at one instant. Returns the words of
/// `new`.
pub fn fill_boundary(dir: &Path, new: u64, old: u64) -> u64 {
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
/// the branch must hold it as of one instant. Returns the live branches'
/// metadata.
pub fn writes_after_live_branches_reach_the_next_diff(
    backend: &str,
    wait: bool,
) -> Vec<serde_json::Value> {
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
    let (mut caught_mid_fill, mut overlapped) = (0, 0);
    let mut metas = Vec::new();
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
            metas.push(branch_waiting(&mut vm, &live, SnapshotMode::Live, true));
            writer.join().unwrap();
            let b = fill_boundary(&live, seq + 1, seq);
            caught_mid_fill += u32::from(b > 0 && b < FILL_MIB << 17);
        } else {
            match vm.call(ControlRequest::Snapshot {
                dir: live.clone(),
                leave_paused: false,
                mode: SnapshotMode::Live,
                wait: false,
                measure_diff: false,
            }) {
                ControlResponse::Snapshot { meta, .. } => {
                    assert_eq!(meta.status, proto::snapshot::SnapshotStatus::Writing)
                }
                other => panic!("{other:?}"),
            }
            vm.guest(fill(seq + 1));
            let meta = wait_ready(&live);
            assert_eq!(meta["status"], "ready", "{meta}");
            // The fill usually overlaps the copy (its writes fault); a copy
            // can also end first.
            overlapped += u32::from(meta["live_copy"]["faults"].as_u64().unwrap() > 0);
            assert_eq!(fill_boundary(&live, seq + 1, seq), 0);
            metas.push(meta);
        }
        let diff = tmp.path().join(format!("diff{seq}"));
        branch(&mut vm, &diff, SnapshotMode::Diff);
        assert_eq!(fill_boundary(&diff, seq + 1, seq), FILL_MIB << 17);
    }
    if wait {
        eprintln!("{backend}: {caught_mid_fill} of 3 pre-copies caught the fill midway");
    } else {
        eprintln!("{backend}: the fill faulted during {overlapped} of 3 write-protected copies");
    }
    vm.shutdown();
    metas
}

/// Runs `f` with `pages` 2 MiB huge pages free, and gives the reserve
/// back as it was afterwards (also when `f` panics). Tests of this file
/// that need huge pages take turns: one giving its reserve back must not
/// pull the pages from under another.
pub fn with_huge_pages(pages: u64, f: impl FnOnce()) {
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
pub fn reserve_huge_pages(pages: u64) -> String {
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
