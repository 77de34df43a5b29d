//! Host tests: snapshot files are read-only once complete, and each kind
//! of snapshot so written verifies (`forkd-vmm verify`).

mod branch_common;
mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::{fork_children, ControlledVm, Pattern, TempDir, TestVm};
use proto::control::SnapshotMode;

/// The mode bits of every regular file in `dir`, by name (hidden files,
/// which only a writer in progress leaves, are reported too).
fn modes(dir: &Path) -> Vec<(String, u32)> {
    let mut m: Vec<(String, u32)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().unwrap().is_file())
        .map(|e| {
            let mode = e.metadata().unwrap().permissions().mode() & 0o7777;
            (e.file_name().into_string().unwrap(), mode)
        })
        .collect();
    m.sort();
    m
}

/// `forkd-vmm verify` finds every hashed file of `dir` as recorded.
fn assert_verifies(dir: &Path) {
    let (code, _, err) = common::verify_snapshot(dir);
    assert_eq!(code, Some(0), "verify of {}: {err}", dir.display());
}

/// Every file of the snapshot in `dir` is 0400, and these are among them.
fn assert_sealed(dir: &Path, expected: &[&str]) {
    let m = modes(dir);
    for name in expected {
        assert!(
            m.iter().any(|(n, _)| n == name),
            "{} has no {name}: {m:?}",
            dir.display()
        );
    }
    assert!(
        m.iter().all(|&(_, mode)| mode == 0o400),
        "{}: {m:?}",
        dir.display()
    );
}

#[test]
fn snapshot_files_are_read_only_once_complete() {
    let tmp = TempDir::new("sealed");
    let base = tmp.path().join("base.img");
    std::fs::write(&base, vec![7u8; 1 << 20]).unwrap();
    let drive = format!(
        "{},cow={}",
        base.display(),
        tmp.path().join("vm.cow").display()
    );
    let mut vm = TestVm::start(&[
        "--builtin",
        "--mem-mib",
        "32",
        "--console",
        "none",
        "--memory-backend",
        "memfd",
        "--drive",
        &drive,
    ]);
    let pattern = Pattern { seed: 5 };
    vm.guest(pattern.fill(1, 2, 0));
    let full = tmp.path().join("full");
    common::snapshot(&mut vm, &full, SnapshotMode::Full);
    assert_sealed(
        &full,
        &["memory", "vmstate", "snapshot.json", "disk0.layer"],
    );

    vm.guest(pattern.fill(2, 1, 0));
    let diff = tmp.path().join("diff");
    common::snapshot(&mut vm, &diff, SnapshotMode::Diff);
    let diff_files = [
        "memory.diff",
        "memory.diffmap",
        "vmstate",
        "snapshot.json",
        "disk0.layer",
    ];
    assert_sealed(&diff, &diff_files);

    // Live, waited for (pre-copy) and not (sealed when the copy ends).
    for (name, wait) in [("live", true), ("live-nowait", false)] {
        let dir = tmp.path().join(name);
        branch_common::branch_waiting(&mut vm, &dir, SnapshotMode::Live, wait);
        assert_sealed(&dir, &["memory", "vmstate", "snapshot.json", "disk0.layer"]);
        assert_verifies(&dir);
    }
    vm.shutdown();

    // A diff's memory, assembled on first use, joins them; the snapshot
    // still restores, and verifies.
    let kids = fork_children(&diff, 1, &tmp.path().join("kids"), &[]);
    let mut assembled = diff_files.to_vec();
    assembled.push("memory");
    assert_sealed(&diff, &assembled);
    for kid in kids {
        kid.shutdown();
    }
    assert_verifies(&full);
    assert_verifies(&diff);

    // Compacted: the same.
    let compact = tmp.path().join("compact");
    let (code, err) = common::run_to_exit(&[
        "compact",
        "--snapshot",
        diff.to_str().unwrap(),
        "--to",
        compact.to_str().unwrap(),
    ]);
    assert_eq!(code, Some(0), "{err}");
    assert_sealed(
        &compact,
        &["memory", "vmstate", "snapshot.json", "disk0.0.layer"],
    );
    assert_verifies(&compact);
}
