//! Children whose RAM is a memfd holding a copy of the snapshot's memory
//! (`restore --memory-backend memfd`, `fork --memfd`, a fork server's
//! `"memfd": true`): they can be live-BRANCHed as a booted memfd VM can,
//! and a diff BRANCH of them stacks on the snapshot they came from.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{
    fork_children, run_to_exit, snapshot, ControlledVm, ForkedVm, Pattern, TempDir, TestVm,
};
use proto::control::{ControlClient, ControlRequest, ControlResponse, SnapshotMode};

const PATTERN: Pattern = Pattern { seed: 11 };

/// Boots a built-in guest of `mem_mib`, fills 16 MiB with pattern 1 and
/// takes a full snapshot of it in `dir`.
fn base_snapshot(dir: &Path, mem_mib: &str) -> serde_json::Value {
    let mut vm = TestVm::start(&["--builtin", "--mem-mib", mem_mib, "--console", "none"]);
    vm.guest(PATTERN.fill(1, 16, 0));
    let meta = snapshot(&mut vm, dir, SnapshotMode::Full);
    vm.shutdown();
    meta
}

fn restore_memfd(snapshot: &Path, backend: &str) -> TestVm {
    TestVm::start_subcommand(
        "restore",
        &[
            "--snapshot",
            snapshot.to_str().unwrap(),
            "--console",
            "none",
            "--memory-backend",
            backend,
        ],
    )
}

fn changed_bytes(meta: &serde_json::Value) -> u64 {
    meta["memory_data_bytes"].as_u64().unwrap()
}

#[test]
fn a_memfd_child_branches_live_and_by_diff() {
    let tmp = TempDir::new("memfd-branch");
    let t = |name: &str| tmp.path().join(name);
    let m0 = base_snapshot(&t("s0"), "64");

    let mut kid = restore_memfd(&t("s0"), "memfd");
    assert_eq!(kid.status().memory_backend, "memfd");
    PATTERN.verify(&mut kid, 1, 16, 0);

    // A diff stacks on the snapshot the child came from, and holds only
    // what the child changed (the copy into the memfd is not a change).
    kid.guest(PATTERN.fill(2, 2, 4));
    let d1 = snapshot(&mut kid, &t("d1"), SnapshotMode::Diff);
    assert_eq!(d1["kind"], "diff");
    assert_eq!(d1["parent"]["dir"], t("s0").to_str().unwrap());
    assert_eq!(d1["parent"]["memory_hash"], m0["memory_hash"]);
    assert!(
        (2 << 20..(2 << 20) + (256 << 10)).contains(&changed_bytes(&d1)),
        "the diff holds {} bytes, expected 2 MiB and a few pages",
        changed_bytes(&d1)
    );

    // A live branch, while the child runs on; then a diff over it.
    kid.guest(PATTERN.fill(3, 1, 8));
    let l1 = snapshot(&mut kid, &t("l1"), SnapshotMode::Live);
    assert_eq!(l1["status"], "ready");
    assert!(l1["live_copy"].is_object());
    // Its content hash is the one a full snapshot of that content has.
    let flat = vmm::snapshot::compact(&t("l1"), &t("l1-flat")).unwrap();
    assert_eq!(flat.memory_hash, l1["memory_hash"].as_str().unwrap());
    kid.guest(PATTERN.fill(4, 1, 10));
    let d2 = snapshot(&mut kid, &t("d2"), SnapshotMode::Diff);
    assert_eq!(d2["parent"]["dir"], t("l1").to_str().unwrap());
    assert_eq!(d2["parent"]["memory_hash"], l1["memory_hash"]);
    assert!(changed_bytes(&d2) < (1 << 20) + (256 << 10));
    PATTERN.verify(&mut kid, 4, 1, 10);
    kid.shutdown();

    // Grandchildren of each branch see it as it was.
    let mut g = fork_children(&t("d1"), 1, &t("gd1"), &[]).remove(0);
    PATTERN.verify(&mut g, 1, 4, 0);
    PATTERN.verify(&mut g, 2, 2, 4);
    PATTERN.verify(&mut g, 1, 10, 6);
    g.shutdown();
    let mut g = fork_children(&t("l1"), 1, &t("gl1"), &[]).remove(0);
    PATTERN.verify(&mut g, 1, 4, 0);
    PATTERN.verify(&mut g, 2, 2, 4);
    PATTERN.verify(&mut g, 1, 2, 6);
    PATTERN.verify(&mut g, 3, 1, 8);
    PATTERN.verify(&mut g, 1, 7, 9);
    g.shutdown();
    let mut g = fork_children(&t("d2"), 1, &t("gd2"), &[]).remove(0);
    PATTERN.verify(&mut g, 2, 2, 4);
    PATTERN.verify(&mut g, 3, 1, 8);
    PATTERN.verify(&mut g, 4, 1, 10);
    g.shutdown();

    // A grandchild of the live branch forked with memfd RAM branches live too.
    let mut g = fork_children(&t("l1"), 1, &t("gl1m"), &["--memfd"]).remove(0);
    assert_eq!(g.status().memory_backend, "memfd");
    PATTERN.verify(&mut g, 3, 1, 8);
    g.guest(PATTERN.fill(5, 1, 12));
    let l2 = snapshot(&mut g, &t("l2"), SnapshotMode::Live);
    assert_eq!(l2["status"], "ready");
    g.shutdown();
    let mut gg = fork_children(&t("l2"), 1, &t("gl2"), &[]).remove(0);
    PATTERN.verify(&mut gg, 2, 2, 4);
    PATTERN.verify(&mut gg, 3, 1, 8);
    PATTERN.verify(&mut gg, 5, 1, 12);
    gg.shutdown();
}

#[test]
fn a_fork_server_gives_memfd_ram_on_request() {
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixStream;
    let tmp = TempDir::new("memfd-server");
    let t = |name: &str| tmp.path().join(name);
    base_snapshot(&t("s0"), "32");
    let sock = t("fork.sock");
    let mut server = std::process::Command::new(common::vmm_bin())
        .args(["fork-server", "--snapshot"])
        .arg(t("s0"))
        .arg("--socket")
        .arg(&sock)
        .stdin(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let ask = |line: String| -> serde_json::Value {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let mut s = loop {
            match UnixStream::connect(&sock) {
                Ok(s) => break s,
                Err(_) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                Err(e) => panic!("fork server did not start: {e}"),
            }
        };
        s.write_all(line.as_bytes()).unwrap();
        s.write_all(b"\n").unwrap();
        let mut answer = String::new();
        BufReader::new(s).read_line(&mut answer).unwrap();
        serde_json::from_str(&answer).unwrap()
    };
    let child = |r: &serde_json::Value| -> ForkedVm {
        assert_eq!(r["result"], "forked", "{r}");
        let k = &r["children"][0];
        let sock = PathBuf::from(k["control_socket"].as_str().unwrap());
        ForkedVm {
            pid: k["pid"].as_i64().unwrap() as i32,
            client: ControlClient::connect(&sock, Duration::from_secs(30)).unwrap(),
            dir: PathBuf::from(k["dir"].as_str().unwrap()),
        }
    };
    let request = |out: &str, memfd: bool| {
        let mut r = serde_json::json!({"op": "fork", "n": 1, "out_dir": t(out)});
        if memfd {
            r["memfd"] = true.into();
        }
        r.to_string()
    };
    // Without the field, as before: the memory file, mapped.
    let mut mapped = child(&ask(request("a", false)));
    assert_eq!(mapped.status().memory_backend, "file");
    let r = mapped.call(ControlRequest::Snapshot {
        dir: t("nolive"),
        leave_paused: false,
        mode: SnapshotMode::Live,
        wait: true,
        measure_diff: false,
    });
    assert!(
        matches!(r, ControlResponse::Error { ref message } if message.contains("memfd")),
        "{r:?}"
    );
    let mut memfd = child(&ask(request("b", true)));
    assert_eq!(memfd.status().memory_backend, "memfd");
    PATTERN.verify(&mut memfd, 1, 16, 0);
    memfd.guest(PATTERN.fill(2, 1, 16));
    snapshot(&mut memfd, &t("live"), SnapshotMode::Live);
    assert_eq!(ask(r#"{"op":"shutdown"}"#.into())["result"], "ok");
    assert!(server.wait().unwrap().success());
    mapped.shutdown();
    memfd.shutdown();
    let mut g = fork_children(&t("live"), 1, &t("g"), &[]).remove(0);
    PATTERN.verify(&mut g, 1, 16, 0);
    PATTERN.verify(&mut g, 2, 1, 16);
    g.shutdown();
}

#[test]
fn restore_refuses_anonymous_ram_with_a_reason() {
    let (code, err) = run_to_exit(&[
        "restore",
        "--snapshot",
        "/nonexistent",
        "--memory-backend",
        "anonymous",
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("does not apply to a restore") && err.contains("memfd"),
        "{err}"
    );
}

/// Makes sure `pages` 2 MiB huge pages are free, reserving more if needed
/// (tests run as root). Returns the reserve as it was, to give back.
fn reserve_huge_pages(pages: u64) -> String {
    let before = std::fs::read_to_string("/proc/sys/vm/nr_hugepages").unwrap();
    let meminfo = |field: &str| -> u64 {
        std::fs::read_to_string("/proc/meminfo")
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    let free = meminfo("HugePages_Free:");
    if free < pages {
        let total = meminfo("HugePages_Total:");
        std::fs::write(
            "/proc/sys/vm/nr_hugepages",
            (total + pages - free).to_string(),
        )
        .expect(
            "this test needs 2 MiB huge pages and root to reserve them (/proc/sys/vm/nr_hugepages)",
        );
    }
    let now = meminfo("HugePages_Free:");
    assert!(
        now >= pages,
        "this test needs {pages} free 2 MiB huge pages, the kernel gave {now}"
    );
    before
}

#[test]
fn a_child_on_huge_page_memfd_ram_branches_live() {
    let tmp = TempDir::new("memfd-huge");
    let t = |name: &str| tmp.path().join(name);
    base_snapshot(&t("s0"), "32");
    let before = reserve_huge_pages(16);
    let mut kid = restore_memfd(&t("s0"), "memfd-hugetlb");
    assert_eq!(kid.status().memory_backend, "memfd-hugetlb");
    PATTERN.verify(&mut kid, 1, 16, 0);
    kid.guest(PATTERN.fill(2, 1, 16));
    let l1 = snapshot(&mut kid, &t("l1"), SnapshotMode::Live);
    assert_eq!(l1["status"], "ready");
    kid.shutdown();
    let _ = std::fs::write("/proc/sys/vm/nr_hugepages", before.trim());
    let mut g = fork_children(&t("l1"), 1, &t("g"), &[]).remove(0);
    PATTERN.verify(&mut g, 1, 16, 0);
    PATTERN.verify(&mut g, 2, 1, 16);
    g.shutdown();
}
