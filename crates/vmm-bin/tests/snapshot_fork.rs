//! Host tests: snapshot, restore and fork with the built-in guest.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{fork_children, run_to_exit, wait_for_counter_above, ControlledVm, TempDir, TestVm};
use proto::control::{ControlRequest, ControlResponse, RunState, SnapshotMode};
use proto::guest::{GuestRequest, GuestResponse};
use vmm::boot::builtin::{abi, pattern_word};

const COUNTER: u64 = abi::INFO_ADDR + abi::INFO_COUNTER;

fn identity(r: GuestResponse) -> (u64, u64) {
    match r {
        GuestResponse::Identity {
            boot_id,
            generation,
        } => (boot_id, generation),
        other => panic!("{other:?}"),
    }
}

fn verified(r: GuestResponse) -> u64 {
    match r {
        GuestResponse::Verified { bad_words, .. } => bad_words,
        other => panic!("{other:?}"),
    }
}

/// Boots a guest, fills 16 MiB with (seed 5, seq 1), starts its counter
/// when `counter` (then children spin: keep it off for many children),
/// pauses it and snapshots it to `dir`. Returns the parent's counter at the
/// pause and its identity.
fn make_snapshot(dir: &Path, mem_mib: &str, counter: bool) -> (u64, (u64, u64)) {
    let mut vm = TestVm::start(&["--builtin", "--mem-mib", mem_mib, "--console", "none"]);
    vm.guest(GuestRequest::Fill {
        seed: 5,
        seq: 1,
        mib: 16,
        offset_mib: 0,
    });
    let id = identity(vm.guest(GuestRequest::Identity));
    if counter {
        vm.guest(GuestRequest::CounterStart);
        wait_for_counter_above(|| vm.peek_u64(COUNTER), 0);
    }
    assert_eq!(vm.call(ControlRequest::Pause), ControlResponse::Ok);
    let counter = vm.peek_u64(COUNTER);
    match vm.call(ControlRequest::Snapshot {
        dir: dir.to_owned(),
        leave_paused: true,
        mode: SnapshotMode::Full,
        wait: true,
        measure_diff: false,
    }) {
        ControlResponse::Snapshot { meta, .. } => {
            assert_eq!(meta.status, proto::snapshot::SnapshotStatus::Ready);
            assert_eq!(meta.guest, proto::snapshot::GuestKind::Builtin);
            assert!(meta.memory_data_bytes >= 16 << 20);
        }
        other => panic!("snapshot failed: {other:?}"),
    }
    // Left paused as asked: the counter has not moved.
    assert_eq!(vm.status().state, RunState::Paused);
    assert_eq!(vm.peek_u64(COUNTER), counter);
    assert_eq!(vm.call(ControlRequest::Resume), ControlResponse::Ok);
    assert!(matches!(
        vm.guest(GuestRequest::Ping),
        GuestResponse::Pong { .. }
    ));
    vm.shutdown();
    (counter, id)
}

#[test]
fn a_child_continues_exactly_where_the_parent_paused() {
    let tmp = TempDir::new("snap-continue");
    let snap = tmp.path().join("snap");
    let (counter, (boot_id, parent_gen)) = make_snapshot(&snap, "64", true);
    let mut kids = fork_children(&snap, 2, &tmp.path().join("kids"), &["--paused"]);
    let mut generations = vec![parent_gen];
    for kid in &mut kids {
        assert_eq!(kid.status().state, RunState::Paused);
        assert_eq!(kid.status().memory_backend, "file");
        assert_eq!(
            kid.peek_u64(COUNTER),
            counter,
            "a paused child holds the counter of the pause instant"
        );
        assert_eq!(kid.call(ControlRequest::Resume), ControlResponse::Ok);
        // The guest was mid-loop with its counter running: it carries on.
        wait_for_counter_above(|| kid.peek_u64(COUNTER), counter);
        let (kid_boot, kid_gen) = identity(kid.guest(GuestRequest::Identity));
        assert_eq!(
            kid_boot, boot_id,
            "memory (and the boot id in it) is inherited"
        );
        generations.push(kid_gen);
        assert_eq!(
            verified(kid.guest(GuestRequest::Verify {
                seed: 5,
                seq: 1,
                mib: 16,
                offset_mib: 0
            })),
            0
        );
    }
    generations.sort();
    generations.dedup();
    assert_eq!(
        generations.len(),
        3,
        "every restore gets a new VM generation"
    );
    for kid in kids {
        kid.shutdown();
    }
}

#[test]
fn children_write_privately() {
    let tmp = TempDir::new("snap-private");
    let snap = tmp.path().join("snap");
    make_snapshot(&snap, "32", false);
    let memory = snap.join("memory");
    let before = std::fs::read(&memory).unwrap();
    let mut kids = fork_children(&snap, 2, &tmp.path().join("kids"), &[]);
    let (a, b) = kids.split_at_mut(1);
    let (a, b) = (&mut a[0], &mut b[0]);
    a.guest(GuestRequest::Fill {
        seed: 5,
        seq: 2,
        mib: 16,
        offset_mib: 0,
    });
    assert_eq!(
        verified(a.guest(GuestRequest::Verify {
            seed: 5,
            seq: 2,
            mib: 16,
            offset_mib: 0
        })),
        0
    );
    // The sibling still sees the snapshot's pattern, and so does the file.
    assert_eq!(
        verified(b.guest(GuestRequest::Verify {
            seed: 5,
            seq: 1,
            mib: 16,
            offset_mib: 0
        })),
        0
    );
    let addr = abi::SCRATCH_START + 4096;
    assert_eq!(b.peek_u64(addr), pattern_word(5, 1, addr));
    assert_eq!(a.peek_u64(addr), pattern_word(5, 2, addr));
    assert!(
        std::fs::read(&memory).unwrap() == before,
        "the snapshot's memory file changed"
    );
    for kid in kids {
        kid.shutdown();
    }
}

#[test]
fn a_hundred_children_of_one_snapshot_all_answer_ping() {
    let tmp = TempDir::new("snap-hundred");
    let snap = tmp.path().join("snap");
    make_snapshot(&snap, "32", false);
    let mut kids = fork_children(&snap, 100, &tmp.path().join("kids"), &[]);
    let mut pids: Vec<i32> = kids.iter().map(|k| k.pid).collect();
    pids.sort();
    pids.dedup();
    assert_eq!(pids.len(), 100);
    for kid in &mut kids {
        assert!(matches!(
            kid.guest(GuestRequest::Ping),
            GuestResponse::Pong { .. }
        ));
    }
    for kid in kids {
        kid.shutdown();
    }
}

#[test]
fn restore_subcommand_runs_one_child() {
    let tmp = TempDir::new("snap-restore");
    let snap = tmp.path().join("snap");
    let (counter, _) = make_snapshot(&snap, "32", true);
    let snap_arg = snap.to_str().unwrap();
    let mut vm = TestVm::start_subcommand(
        "restore",
        &["--snapshot", snap_arg, "--console", "none", "--paused"],
    );
    assert_eq!(vm.status().state, RunState::Paused);
    assert_eq!(vm.peek_u64(COUNTER), counter);
    assert_eq!(vm.call(ControlRequest::Resume), ControlResponse::Ok);
    assert!(matches!(
        vm.guest(GuestRequest::Ping),
        GuestResponse::Pong { .. }
    ));
    vm.shutdown();
}

#[test]
fn damaged_snapshots_are_refused_with_a_reason() {
    let tmp = TempDir::new("snap-damaged");
    let snap = tmp.path().join("snap");
    make_snapshot(&snap, "32", false);
    let copy = |name: &str| {
        let d = tmp.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        for f in ["vmstate", "memory", "snapshot.json"] {
            std::fs::copy(snap.join(f), d.join(f)).unwrap();
        }
        d
    };
    // A flipped byte in the vmstate.
    let corrupt = copy("corrupt");
    let mut bytes = std::fs::read(corrupt.join("vmstate")).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(corrupt.join("vmstate"), bytes).unwrap();
    // A truncated memory file.
    let truncated = copy("truncated");
    std::fs::OpenOptions::new()
        .write(true)
        .open(truncated.join("memory"))
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    // A snapshot still being written.
    let writing = copy("writing");
    let meta = std::fs::read_to_string(writing.join("snapshot.json")).unwrap();
    std::fs::write(
        writing.join("snapshot.json"),
        meta.replace("\"ready\"", "\"writing\""),
    )
    .unwrap();
    let missing = tmp.path().join("missing");
    let out = tmp.path().join("out");
    for (dir, expect) in [
        (&corrupt, "corrupt"),
        (&truncated, "truncated"),
        (&writing, "not ready"),
        (&missing, "snapshot.json"),
    ] {
        let d = dir.to_str().unwrap();
        let (code, err) = run_to_exit(&["restore", "--snapshot", d, "--console", "none"]);
        assert_eq!(code, Some(2), "{d}: {err}");
        assert!(err.contains(expect), "{d}: expected {expect:?} in {err:?}");
        let (code, err) = run_to_exit(&[
            "fork",
            "--snapshot",
            d,
            "-n",
            "2",
            "--out-dir",
            out.to_str().unwrap(),
        ]);
        assert_eq!(code, Some(2), "{d}: {err}");
        assert!(
            err.contains(expect),
            "fork {d}: expected {expect:?} in {err:?}"
        );
    }
    let (code, err) = run_to_exit(&[
        "fork",
        "--snapshot",
        snap.to_str().unwrap(),
        "-n",
        "0",
        "--out-dir",
        "/tmp/x",
    ]);
    assert_eq!(code, Some(2));
    assert!(err.contains("out of range"), "{err}");
}

#[test]
fn drives_are_frozen_into_the_snapshot_and_each_child_gets_its_own_layer() {
    let tmp = TempDir::new("snap-disks");
    let base = tmp.path().join("base.img");
    let pattern: Vec<u8> = (0..(4u32 << 20)).map(|i| (i % 251) as u8).collect();
    std::fs::write(&base, &pattern).unwrap();
    let cow = tmp.path().join("parent.cow");
    let drive = format!("{},cow={},id=root", base.display(), cow.display());
    let vsock = tmp.path().join("parent.vsock");
    let mut vm = TestVm::start(&[
        "--builtin",
        "--mem-mib",
        "32",
        "--console",
        "none",
        "--rng",
        "--drive",
        &drive,
        "--vsock-uds",
        vsock.to_str().unwrap(),
    ]);
    let snap = tmp.path().join("snap");
    let meta = match vm.call(ControlRequest::Snapshot {
        dir: snap.clone(),
        leave_paused: false,
        mode: SnapshotMode::Full,
        wait: true,
        measure_diff: false,
    }) {
        ControlResponse::Snapshot { meta, .. } => serde_json::to_value(meta).unwrap(),
        other => panic!("{other:?}"),
    };
    // The parent's layer is now the snapshot's (linked in), and the parent
    // runs on a fresh layer beside it.
    assert_eq!(meta["disks"][0]["layers"][0], "disk0.layer");
    assert_eq!(meta["disks"][0]["base"], base.to_str().unwrap());
    let frozen = std::fs::read(snap.join("disk0.layer")).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        std::fs::metadata(&cow).unwrap().ino(),
        std::fs::metadata(snap.join("disk0.layer")).unwrap().ino()
    );
    let parent_layers: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("parent.") && n.ends_with(".layer"))
        .collect();
    assert_eq!(
        parent_layers.len(),
        1,
        "the parent continues on one new layer: {parent_layers:?}"
    );
    assert!(matches!(
        vm.guest(GuestRequest::Ping),
        GuestResponse::Pong { .. }
    ));
    vm.shutdown();

    let mut kids = fork_children(&snap, 2, &tmp.path().join("kids"), &[]);
    for kid in &mut kids {
        assert!(matches!(
            kid.guest(GuestRequest::Ping),
            GuestResponse::Pong { .. }
        ));
        assert!(
            kid.dir.join("disk0.cow").exists(),
            "each child has its own layer"
        );
        assert!(
            kid.dir.join("vsock.sock").exists(),
            "each child has its own vsock socket"
        );
    }
    for kid in kids {
        kid.shutdown();
    }
    assert_eq!(
        std::fs::read(snap.join("disk0.layer")).unwrap(),
        frozen,
        "a frozen layer never changes"
    );
    assert_eq!(
        std::fs::read(&base).unwrap(),
        pattern,
        "the base image never changes"
    );

    // A restore without the layers the snapshot's drives need is refused.
    let (code, err) = run_to_exit(&[
        "restore",
        "--snapshot",
        snap.to_str().unwrap(),
        "--console",
        "none",
    ]);
    assert_eq!(code, Some(2));
    assert!(err.contains("copy-on-write layers"), "{err}");
}

#[test]
fn a_fork_server_forks_batches_on_request() {
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixStream;
    let tmp = TempDir::new("snap-server");
    let snap = tmp.path().join("snap");
    make_snapshot(&snap, "32", false);
    let sock = tmp.path().join("fork.sock");
    let mut server = std::process::Command::new(common::vmm_bin())
        .args([
            "fork-server",
            "--snapshot",
            snap.to_str().unwrap(),
            "--socket",
            sock.to_str().unwrap(),
        ])
        .stdin(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let ask = |line: &str| -> serde_json::Value {
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
    let mut all = Vec::new();
    for (batch, n) in [("a", 3), ("b", 2)] {
        let out = tmp.path().join(batch);
        let r = ask(&format!(
            r#"{{"op":"fork","n":{n},"out_dir":{:?}}}"#,
            out.to_str().unwrap()
        ));
        assert_eq!(r["result"], "forked", "{r}");
        let kids = r["children"].as_array().unwrap();
        assert_eq!(kids.len(), n);
        for k in kids {
            let sock = std::path::PathBuf::from(k["control_socket"].as_str().unwrap());
            let client =
                proto::control::ControlClient::connect(&sock, Duration::from_secs(30)).unwrap();
            all.push(common::ForkedVm {
                pid: k["pid"].as_i64().unwrap() as i32,
                client,
                dir: std::path::PathBuf::from(k["dir"].as_str().unwrap()),
            });
        }
    }
    // Bad requests get an error, and the server keeps serving.
    assert_eq!(
        ask(r#"{"op":"fork","n":0,"out_dir":"/tmp/x"}"#)["result"],
        "error"
    );
    assert_eq!(ask("not json")["result"], "error");
    assert_eq!(ask(r#"{"op":"shutdown"}"#)["result"], "ok");
    assert!(server.wait().unwrap().success());
    // The children outlive the server.
    for kid in &mut all {
        assert!(matches!(
            kid.guest(GuestRequest::Ping),
            GuestResponse::Pong { .. }
        ));
    }
    for kid in all {
        kid.shutdown();
    }
}

fn snapshot(
    vm_call: &mut dyn FnMut(ControlRequest) -> ControlResponse,
    dir: &Path,
    mode: SnapshotMode,
) -> serde_json::Value {
    match vm_call(ControlRequest::Snapshot {
        dir: dir.to_owned(),
        leave_paused: false,
        mode,
        wait: true,
        measure_diff: false,
    }) {
        ControlResponse::Snapshot { meta, .. } => serde_json::to_value(meta).unwrap(),
        other => panic!("snapshot failed: {other:?}"),
    }
}

fn fill(seq: u64, mib: u64, offset_mib: u64) -> GuestRequest {
    GuestRequest::Fill {
        seed: 5,
        seq,
        mib,
        offset_mib,
    }
}

fn verify(seq: u64, mib: u64, offset_mib: u64) -> GuestRequest {
    GuestRequest::Verify {
        seed: 5,
        seq,
        mib,
        offset_mib,
    }
}

#[test]
fn diff_snapshots_hold_only_changed_pages_and_chain() {
    let tmp = TempDir::new("snap-diff");
    let mut vm = TestVm::start(&["--builtin", "--mem-mib", "64", "--console", "none"]);
    // No base yet: a diff is refused with a reason.
    let r = vm.call(ControlRequest::Snapshot {
        dir: tmp.path().join("nobase"),
        leave_paused: false,
        mode: SnapshotMode::Diff,
        wait: true,
        measure_diff: false,
    });
    assert!(
        matches!(r, ControlResponse::Error { ref message } if message.contains("full snapshot first")),
        "{r:?}"
    );

    vm.guest(fill(1, 16, 0));
    let s0 = tmp.path().join("s0");
    let m0 = snapshot(&mut |r| vm.call(r), &s0, SnapshotMode::Full);
    vm.guest(fill(2, 2, 4));
    let s1 = tmp.path().join("s1");
    let m1 = snapshot(&mut |r| vm.call(r), &s1, SnapshotMode::Diff);
    assert_eq!(m1["kind"], "diff");
    assert_eq!(m1["parent"]["memory_hash"], m0["memory_hash"]);
    let changed = m1["memory_data_bytes"].as_u64().unwrap();
    assert!(
        (2 << 20..(2 << 20) + (256 << 10)).contains(&changed),
        "diff holds {changed} bytes, expected 2 MiB and a few pages"
    );
    assert!(
        !s1.join("memory").exists(),
        "a diff is assembled on first use, not in the pause"
    );
    vm.shutdown();

    // Children of the diff see the parent's pages with the diff on top.
    let mut kids = fork_children(&s1, 2, &tmp.path().join("k1"), &[]);
    assert!(
        s1.join("memory").exists(),
        "assembled once for all children"
    );
    for kid in &mut kids {
        assert_eq!(verified(kid.guest(verify(1, 4, 0))), 0);
        assert_eq!(verified(kid.guest(verify(2, 2, 4))), 0);
        assert_eq!(verified(kid.guest(verify(1, 10, 6))), 0);
    }
    // A child's diff stacks on the snapshot it came from.
    let kid = &mut kids[0];
    kid.guest(fill(3, 1, 8));
    let s2 = tmp.path().join("s2");
    let m2 = snapshot(&mut |r| kid.call(r), &s2, SnapshotMode::Diff);
    assert_eq!(m2["parent"]["dir"], s1.to_str().unwrap());
    let changed = m2["memory_data_bytes"].as_u64().unwrap();
    assert!(
        changed < (1 << 20) + (256 << 10),
        "the child's diff holds {changed} bytes"
    );
    for kid in kids {
        kid.shutdown();
    }
    let mut grandkids = fork_children(&s2, 1, &tmp.path().join("k2"), &[]);
    let g = &mut grandkids[0];
    assert_eq!(verified(g.guest(verify(1, 4, 0))), 0);
    assert_eq!(verified(g.guest(verify(2, 2, 4))), 0);
    assert_eq!(verified(g.guest(verify(1, 2, 6))), 0);
    assert_eq!(verified(g.guest(verify(3, 1, 8))), 0);
    assert_eq!(verified(g.guest(verify(1, 7, 9))), 0);
    for g in grandkids {
        g.shutdown();
    }

    // A parent whose memory changed under a diff is refused.
    std::fs::remove_file(s2.join("memory")).unwrap();
    let meta_path = s1.join("snapshot.json");
    let meta = std::fs::read_to_string(&meta_path).unwrap();
    let hash = m1["memory_hash"].as_str().unwrap();
    std::fs::write(&meta_path, meta.replace(hash, &"0".repeat(hash.len()))).unwrap();
    let (code, err) = run_to_exit(&[
        "restore",
        "--snapshot",
        s2.to_str().unwrap(),
        "--console",
        "none",
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("no longer has the memory"), "{err}");
}
