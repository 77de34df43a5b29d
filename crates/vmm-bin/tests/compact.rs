//! Compaction: a chain (full, diff, diff) made by running built-in guests
//! is flattened into one snapshot that restores, with its memory and its
//! drive's content, once every ancestor is gone.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::{fork_children, snapshot, ControlledVm, Pattern, TempDir, TestVm};
use proto::control::SnapshotMode;
use vmm::devices::virtio::block::{DiskConfig, DiskStack};

const DISK_BYTES: usize = 4 << 20;

const PATTERN: Pattern = Pattern { seed: 9 };

/// What each snapshot of the chain holds, and the VMs carry from one to the next.
fn verify_chain(vm: &mut impl ControlledVm) {
    PATTERN.verify(vm, 1, 4, 0);
    PATTERN.verify(vm, 2, 2, 4);
    PATTERN.verify(vm, 1, 2, 6);
    PATTERN.verify(vm, 3, 1, 8);
    PATTERN.verify(vm, 1, 7, 9);
}

/// Writes `bytes` at `offset` into the CoW layer `cow` over `frozen` (what
/// a guest's disk write would leave there; the built-in guest has no disk
/// driver). The layer is created if missing and closed before a VM opens it.
fn write_layer(base: &Path, frozen: &[PathBuf], cow: &Path, offset: u64, bytes: &[u8]) {
    let mut disk = DiskStack::open(&DiskConfig {
        base: Some(base.to_owned()),
        size: 0,
        frozen: frozen.to_vec(),
        cow: Some(cow.to_owned()),
        read_only: false,
        quota: None,
    })
    .unwrap();
    disk.write_at(bytes, offset).unwrap();
    disk.flush().unwrap();
}

/// The whole disk a child of the snapshot in `dir` sees.
fn disk_content(dir: &Path, meta: &serde_json::Value) -> Vec<u8> {
    let disk = &meta["disks"][0];
    let disk = DiskStack::open(&DiskConfig {
        base: Some(PathBuf::from(disk["base"].as_str().unwrap())),
        size: 0,
        frozen: disk["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| dir.join(l.as_str().unwrap()))
            .collect(),
        cow: None,
        read_only: true,
        quota: None,
    })
    .unwrap();
    let mut bytes = vec![0u8; DISK_BYTES];
    disk.read_at(&mut bytes, 0).unwrap();
    bytes
}

/// `forkd-vmm compact`: its exit status, stdout and stderr.
fn compact(src: &Path, dst: &Path) -> (bool, String, String) {
    let out = Command::new(common::vmm_bin())
        .args(["compact", "--snapshot"])
        .arg(src)
        .arg("--to")
        .arg(dst)
        .stdin(Stdio::null())
        .output()
        .expect("spawn forkd-vmm compact");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn restore(snapshot: &Path, cow: &Path) -> TestVm {
    TestVm::start_subcommand(
        "restore",
        &[
            "--snapshot",
            snapshot.to_str().unwrap(),
            "--console",
            "none",
            "--cow-layer",
            cow.to_str().unwrap(),
        ],
    )
}

#[test]
fn a_compacted_chain_restores_without_its_ancestors() {
    let tmp = TempDir::new("compact");
    let t = |name: &str| tmp.path().join(name);
    let base = t("base.img");
    let pattern: Vec<u8> = (0..DISK_BYTES as u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&base, &pattern).unwrap();

    // s0: a full snapshot of a booted guest whose disk layer holds "A".
    write_layer(&base, &[], &t("parent.cow"), 0x10000, &[b'A'; 5000]);
    let drive = format!("{},cow={}", base.display(), t("parent.cow").display());
    let mut vm = TestVm::start(&[
        "--builtin",
        "--mem-mib",
        "64",
        "--console",
        "none",
        "--drive",
        &drive,
    ]);
    vm.guest(PATTERN.fill(1, 16, 0));
    let m0 = snapshot(&mut vm, &t("s0"), SnapshotMode::Full);
    vm.shutdown();

    // s1: a diff of a child of s0 that wrote memory and "B" on its disk.
    let s0_layer = t("s0").join("disk0.layer");
    write_layer(
        &base,
        std::slice::from_ref(&s0_layer),
        &t("kid1.cow"),
        0x30000,
        b"B",
    );
    let mut kid = restore(&t("s0"), &t("kid1.cow"));
    PATTERN.verify(&mut kid, 1, 16, 0);
    kid.guest(PATTERN.fill(2, 2, 4));
    let m1 = snapshot(&mut kid, &t("s1"), SnapshotMode::Diff);
    kid.shutdown();
    assert_eq!(m1["kind"], "diff");
    assert_eq!(m1["parent"]["memory_hash"], m0["memory_hash"]);

    // s2: a diff of a grandchild, which overwrote "A" with "C".
    let s1_layer = t("s1").join("disk0.layer");
    write_layer(
        &base,
        &[s0_layer.clone(), s1_layer.clone()],
        &t("kid2.cow"),
        0x10000,
        &[b'C'; 100],
    );
    let mut kid = restore(&t("s1"), &t("kid2.cow"));
    kid.guest(PATTERN.fill(3, 1, 8));
    let m2 = snapshot(&mut kid, &t("s2"), SnapshotMode::Diff);
    kid.shutdown();
    assert_eq!(m2["kind"], "diff");
    let s2_layers: Vec<&str> = m2["disks"][0]["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap())
        .collect();
    assert_eq!(
        s2_layers,
        [
            s0_layer.to_str().unwrap(),
            s1_layer.to_str().unwrap(),
            "disk0.layer"
        ],
        "the chain's layers live in its ancestors"
    );

    let disk = disk_content(&t("s2"), &m2);
    assert_eq!(&disk[0x10000..0x10064], &[b'C'; 100]);
    assert_eq!(&disk[0x10064..0x11388], &[b'A'; 5000 - 100]);
    assert_eq!(disk[0x30000], b'B');
    assert_eq!(&disk[..0x10000], &pattern[..0x10000]);

    let (ok, out, err) = compact(&t("s2"), &t("flat"));
    assert!(ok, "compact failed: {err}");
    let flat: serde_json::Value = serde_json::from_str(&out).unwrap();
    let on_disk: serde_json::Value =
        serde_json::from_slice(&std::fs::read(t("flat").join("snapshot.json")).unwrap()).unwrap();
    assert_eq!(flat, on_disk, "compact prints the snapshot.json it wrote");
    assert_eq!(flat["kind"], "full");
    assert_eq!(flat["parent"], serde_json::Value::Null);
    assert_eq!(flat["status"], "ready");
    assert_eq!(flat["vmstate_hash"], m2["vmstate_hash"]);
    assert_eq!(
        flat["disks"][0]["layers"],
        serde_json::json!(["disk0.0.layer", "disk0.1.layer", "disk0.2.layer"])
    );
    assert_eq!(flat["disks"][0]["base"], base.to_str().unwrap());
    let memory = std::fs::read(t("s2").join("memory")).unwrap();
    assert_eq!(std::fs::read(t("flat").join("memory")).unwrap(), memory);
    assert_eq!(
        std::fs::read(t("flat").join("vmstate")).unwrap(),
        std::fs::read(t("s2").join("vmstate")).unwrap()
    );
    assert!(!t("flat").join("memory.diff").exists());

    // Everything but the base image and the compacted snapshot goes.
    for entry in std::fs::read_dir(tmp.path()).unwrap() {
        let path = entry.unwrap().path();
        if path == base || path == t("flat") {
            continue;
        }
        if path.is_dir() {
            std::fs::remove_dir_all(&path).unwrap();
        } else {
            std::fs::remove_file(&path).unwrap();
        }
    }
    assert_eq!(disk_content(&t("flat"), &flat), disk);

    // A child of it has the chain's memory, and a diff over it chains.
    let mut kid = restore(&t("flat"), &t("kid3.cow"));
    verify_chain(&mut kid);
    kid.guest(PATTERN.fill(4, 1, 12));
    let m3 = snapshot(&mut kid, &t("s3"), SnapshotMode::Diff);
    kid.shutdown();
    assert_eq!(m3["parent"]["dir"], t("flat").to_str().unwrap());
    assert_eq!(m3["parent"]["memory_hash"], flat["memory_hash"]);
    let mut grandkids = fork_children(&t("s3"), 1, &t("k3"), &[]);
    let g = &mut grandkids[0];
    PATTERN.verify(g, 1, 4, 0);
    PATTERN.verify(g, 2, 2, 4);
    PATTERN.verify(g, 3, 1, 8);
    PATTERN.verify(g, 4, 1, 12);
    grandkids.pop().unwrap().shutdown();

    // A full snapshot compacts to the same content hash.
    let (ok, out, err) = compact(&t("flat"), &t("flat2"));
    assert!(ok, "{err}");
    let flat2: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(flat2["memory_hash"], flat["memory_hash"]);
    assert_eq!(disk_content(&t("flat2"), &flat2), disk);

    // Refusals, each with its reason.
    let (ok, _, err) = compact(&t("flat"), &t("flat2"));
    assert!(!ok && err.contains("already exists"), "{err}");
    let fake = |name: &str, edit: &dyn Fn(&mut serde_json::Value)| -> PathBuf {
        let dir = t(name);
        std::fs::create_dir(&dir).unwrap();
        for f in std::fs::read_dir(t("flat")).unwrap() {
            let name = f.unwrap().file_name();
            if name != "snapshot.json" {
                std::fs::hard_link(t("flat").join(&name), dir.join(&name)).unwrap();
            }
        }
        let mut meta = flat.clone();
        edit(&mut meta);
        std::fs::write(dir.join("snapshot.json"), meta.to_string()).unwrap();
        dir
    };
    let writing = fake("writing", &|m| m["status"] = "writing".into());
    let (ok, _, err) = compact(&writing, &t("out1"));
    assert!(!ok && err.contains("not ready"), "{err}");
    let escaping = fake("escaping", &|m| {
        m["disks"][0]["layers"][0] = "../flat/disk0.0.layer".into()
    });
    let (ok, _, err) = compact(&escaping, &t("out2"));
    assert!(!ok && err.contains("neither an absolute path"), "{err}");
    let missing = fake("missing", &|m| {
        m["disks"][0]["layers"][0] = t("gone.layer").to_str().unwrap().into()
    });
    let (ok, _, err) = compact(&missing, &t("out3"));
    assert!(!ok && err.contains("gone.layer"), "{err}");
    let tampered = fake("tampered", &|m| {
        m["memory_hash"] = "0".repeat(64).into();
    });
    let (ok, _, err) = compact(&tampered, &t("out4"));
    assert!(!ok && err.contains("does not have the content"), "{err}");
    for out in ["out1", "out2", "out3", "out4"] {
        assert!(!t(out).exists(), "a refused compaction leaves nothing");
    }
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(
        leftovers.is_empty(),
        "temporary directories left: {leftovers:?}"
    );
}
