//! Host tests: `forkd-vmm verify` of real snapshots of the built-in guest.

mod common;

use std::os::unix::fs::FileExt;
use std::path::Path;

use common::{verify_snapshot as verify, ControlledVm, Pattern, TempDir, TestVm};
use proto::control::SnapshotMode;
use proto::snapshot::Verified;

/// A verify that must succeed: its one JSON line.
fn verified(dir: &Path) -> Verified {
    let (code, out, err) = verify(dir);
    assert_eq!(code, Some(0), "verify of {} failed: {err}", dir.display());
    assert_eq!(out.lines().count(), 1, "{out}");
    serde_json::from_str(&out).unwrap()
}

/// A verify that must find `file` wrong: its stderr.
fn mismatch(dir: &Path, file: &str) -> String {
    let (code, out, err) = verify(dir);
    assert_eq!(code, Some(1), "{file}: stdout {out}, stderr {err}");
    assert!(out.is_empty(), "{out}");
    assert!(
        err.contains(&format!(
            ": {file} does not hold what snapshot.json records: expected"
        )),
        "{file}: {err}"
    );
    err
}

/// Where the first non-zero byte of `path` is (a page with data).
fn first_data_byte(path: &Path) -> u64 {
    let bytes = std::fs::read(path).unwrap();
    bytes
        .iter()
        .position(|&b| b != 0)
        .expect("a file with data") as u64
}

/// Flips one byte of `path` at `at` (root writes read-only files).
fn flip(path: &Path, at: u64) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0x01], at).unwrap();
}

fn names(v: &Verified) -> Vec<&str> {
    v.files.iter().map(|f| f.name.as_str()).collect()
}

#[test]
fn a_fresh_full_snapshot_verifies_and_a_flipped_byte_names_its_file() {
    let tmp = TempDir::new("verify-full");
    let mut vm = TestVm::start(&["--builtin", "--mem-mib", "32", "--console", "none"]);
    vm.guest(Pattern { seed: 3 }.fill(1, 4, 0));
    let snap = tmp.path().join("snap");
    let meta = common::snapshot(&mut vm, &snap, SnapshotMode::Full);
    vm.shutdown();

    let first = verified(&snap);
    assert_eq!(names(&first), ["vmstate", "memory"]);
    let data = meta["memory_data_bytes"].as_u64().unwrap();
    let vmstate = std::fs::metadata(snap.join("vmstate")).unwrap().len();
    assert_eq!(first.bytes_hashed, data + vmstate);
    assert_eq!(first.files[1].size, 32 << 20);
    // Unchanged: the same identities the second time.
    assert_eq!(verified(&snap).files, first.files);

    let memory = snap.join("memory");
    let at = first_data_byte(&memory);
    flip(&memory, at);
    mismatch(&snap, "memory");
    flip(&memory, at);
    verified(&snap);

    flip(&snap.join("vmstate"), 40);
    mismatch(&snap, "vmstate");
    flip(&snap.join("vmstate"), 40);
    verified(&snap);

    // Truncated: named, with both sizes.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&memory)
        .unwrap();
    f.set_len(16 << 20).unwrap();
    let err = mismatch(&snap, "memory");
    assert!(
        err.contains(&format!("expected {} bytes", 32 << 20))
            && err.contains(&format!("found {} bytes (truncated", 16 << 20)),
        "{err}"
    );

    // What cannot be verified at all exits 3, saying why.
    let (code, out, err) = verify(&tmp.path().join("none"));
    assert_eq!(code, Some(3));
    assert!(out.is_empty() && err.contains("snapshot.json"), "{err}");
    std::fs::write(snap.join("snapshot.json"), "{").unwrap();
    let (code, _, err) = verify(&snap);
    assert_eq!(code, Some(3));
    assert!(err.contains("snapshot.json is invalid"), "{err}");
}

#[test]
fn a_diff_snapshot_verifies_and_a_flipped_byte_of_its_diff_names_it() {
    let tmp = TempDir::new("verify-diff");
    let mut vm = TestVm::start(&["--builtin", "--mem-mib", "32", "--console", "none"]);
    let pattern = Pattern { seed: 4 };
    vm.guest(pattern.fill(1, 4, 0));
    common::snapshot(&mut vm, &tmp.path().join("s0"), SnapshotMode::Full);
    vm.guest(pattern.fill(2, 1, 2));
    let diff = tmp.path().join("s1");
    common::snapshot(&mut vm, &diff, SnapshotMode::Diff);
    vm.shutdown();

    let ok = verified(&diff);
    assert_eq!(names(&ok), ["vmstate", "memory.diffmap", "memory.diff"]);
    assert_eq!(verified(&diff).files, ok.files);

    // Only listed pages have data in a diff: the first data byte is one.
    let pages = diff.join("memory.diff");
    let at = first_data_byte(&pages);
    flip(&pages, at);
    mismatch(&diff, "memory.diff");
    flip(&pages, at);
    verified(&diff);

    let map = diff.join("memory.diffmap");
    flip(&map, 30);
    let err = mismatch(&diff, "memory.diffmap");
    assert!(err.contains("checksum"), "{err}");
    flip(&map, 30);
    verified(&diff);

    // Truncated: refused, naming it.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&pages)
        .unwrap();
    f.set_len(4096).unwrap();
    let err = mismatch(&diff, "memory.diff");
    assert!(err.contains("truncated"), "{err}");
}
