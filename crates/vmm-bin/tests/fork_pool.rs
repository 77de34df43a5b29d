//! Host tests: a fork server's pool of children prepared ahead of requests
//! (`forkd-vmm fork-server --pool N`).

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{comm, process_alive, ControlledVm, ForkServer, Pattern, TempDir, TestVm};
use proto::agent;
use proto::control::{ControlClient, ControlRequest, ControlResponse, RunState, SnapshotMode};
use proto::guest::{GuestRequest, GuestResponse};
use serde_json::json;

/// A built-in guest with a vsock device, 16 MiB of pattern 1 written and
/// snapshotted into `snap` (the parent is shut down); its identity.
fn make_snapshot(snap: &Path, vsock_dir: &Path) -> (u64, u64) {
    let uds = vsock_dir.join("parent-vsock.sock");
    let mut vm = TestVm::start(&[
        "--builtin",
        "--mem-mib",
        "64",
        "--console",
        "none",
        "--vsock-uds",
        uds.to_str().unwrap(),
    ]);
    vm.guest(Pattern { seed: 7 }.fill(1, 16, 0));
    let id = identity(vm.guest(GuestRequest::Identity));
    common::snapshot(&mut vm, snap, SnapshotMode::Full);
    vm.shutdown();
    id
}

fn identity(r: GuestResponse) -> (u64, u64) {
    match r {
        GuestResponse::Identity {
            boot_id,
            generation,
        } => (boot_id, generation),
        other => panic!("{other:?}"),
    }
}

fn wait_gone(pids: &[i32], what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    for &p in pids {
        while process_alive(p) {
            assert!(
                Instant::now() < deadline,
                "{what}: process {p} lives on ({}, in {})",
                std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default(),
                std::fs::read_to_string(format!("/proc/{p}/wchan")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Asks the child's guest over its own vsock socket who it is.
fn vsock_identity(uds: &Path) -> (u64, u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut s = loop {
        match UnixStream::connect(uds) {
            Ok(s) => break s,
            Err(e) => {
                assert!(Instant::now() < deadline, "{}: {e}", uds.display());
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    };
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(format!("CONNECT {}\n", agent::DEFAULT_VSOCK_PORT).as_bytes())
        .unwrap();
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while byte[0] != b'\n' {
        s.read_exact(&mut byte).unwrap();
        line.push(byte[0]);
    }
    assert!(
        line.starts_with(b"OK "),
        "{}",
        String::from_utf8_lossy(&line)
    );
    agent::write_raw_frame(&mut s, br#"{"op":"identity"}"#, b"").unwrap();
    let frame = agent::read_frame(&mut s, agent::MAX_FRAME).unwrap();
    identity(serde_json::from_slice(&frame.json).unwrap())
}

#[test]
fn pooled_children_are_distinct_isolated_and_answer_and_the_pool_refills() {
    let tmp = TempDir::new("pool");
    let snap = tmp.path().join("snap");
    let (boot_id, parent_gen) = make_snapshot(&snap, tmp.path());
    let server = ForkServer::start(&snap, tmp.path().join("fork.sock"), 3);
    let first = server.wait_parked(3);

    // Two of three pooled children: they are the parked processes.
    let mut kids = server.fork(2, &tmp.path().join("a"), json!({}));
    for kid in &mut kids {
        assert!(first.contains(&kid.pid), "{} was not parked", kid.pid);
        assert!(matches!(
            kid.guest(GuestRequest::Ping),
            GuestResponse::Pong { .. }
        ));
        // Serving: no longer parked, and detached into its own directory.
        assert_eq!(comm(kid.pid).as_deref(), Some("forkd-vmm"));
        assert!(kid.dir.join("vmm.log").exists());
    }
    assert_ne!(kids[0].pid, kids[1].pid);
    // Each answers as itself: a new generation, the boot id and memory of
    // the snapshot, over its own control and vsock sockets.
    let pattern = Pattern { seed: 7 };
    let mut generations = vec![parent_gen];
    for kid in &mut kids {
        assert_eq!(kid.status().memory_backend, "file");
        let (kid_boot, kid_gen) = identity(kid.guest(GuestRequest::Identity));
        assert_eq!(kid_boot, boot_id);
        assert!(!generations.contains(&kid_gen), "generations repeat");
        generations.push(kid_gen);
        assert_eq!(
            vsock_identity(&kid.dir.join("vsock.sock")),
            (kid_boot, kid_gen),
            "the child's vsock socket reaches the child"
        );
        pattern.verify(kid, 1, 16, 0);
    }
    // Copy-on-write: one child's writes are its own.
    kids[0].guest(pattern.fill(2, 4, 0));
    pattern.verify(&mut kids[0], 2, 4, 0);
    pattern.verify(&mut kids[1], 1, 16, 0);

    // The pool refills after the answer, with new processes.
    let refilled = server.wait_parked(3);
    assert!(
        refilled.iter().all(|p| !kids.iter().any(|k| k.pid == *p)),
        "a handed-out child is still in the pool"
    );

    // More than the pool holds: the rest are forked cold, and all answer;
    // a paused request is honoured by pooled children too.
    let mut more = server.fork(5, &tmp.path().join("b"), json!({"paused": true}));
    let pooled = more.iter().filter(|k| refilled.contains(&k.pid)).count();
    assert_eq!(pooled, 3, "the pool's children go first");
    for kid in &mut more {
        assert_eq!(kid.status().state, RunState::Paused);
        assert_eq!(kid.call(ControlRequest::Resume), ControlResponse::Ok);
        let (_, g) = identity(kid.guest(GuestRequest::Identity));
        assert!(!generations.contains(&g), "generations repeat");
        generations.push(g);
        pattern.verify(kid, 1, 16, 0);
    }
    // The snapshot's memory is unchanged by any of them.
    pattern.verify(&mut kids[1], 1, 16, 0);

    // A memfd request is forked cold, leaving the pool alone.
    let parked = server.wait_parked(3);
    let mut memfd = server.fork(1, &tmp.path().join("c"), json!({"memfd": true}));
    assert!(!parked.contains(&memfd[0].pid));
    assert_eq!(memfd[0].status().memory_backend, "memfd");
    assert_eq!(server.parked().len(), 3);

    for kid in kids.into_iter().chain(more).chain(memfd) {
        kid.shutdown();
    }
}

#[test]
fn parked_children_exit_with_their_server() {
    let tmp = TempDir::new("pool-exit");
    let snap = tmp.path().join("snap");
    make_snapshot(&snap, tmp.path());

    // Killed outright: the parked children see their links close.
    let mut server = ForkServer::start(&snap, tmp.path().join("a.sock"), 2);
    let parked = server.wait_parked(2);
    let mut handed = server.fork(1, &tmp.path().join("a"), json!({}));
    server.wait_parked(2);
    let parked_now = server.parked();
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    wait_gone(&parked_now, "a parked child of a killed server");
    // A child already handed out is no longer the pool's: it runs on.
    assert!(parked.contains(&handed[0].pid));
    assert!(matches!(
        handed[0].guest(GuestRequest::Ping),
        GuestResponse::Pong { .. }
    ));
    handed.pop().unwrap().shutdown();

    // Asked to stop: the same.
    let mut server = ForkServer::start(&snap, tmp.path().join("b.sock"), 2);
    let parked = server.wait_parked(2);
    assert_eq!(server.ask(&json!({"op": "shutdown"}))["result"], "ok");
    assert!(server.child.wait().unwrap().success());
    wait_gone(&parked, "a parked child of a stopped server");
}

#[test]
fn a_pool_out_of_range_is_refused() {
    let tmp = TempDir::new("pool-range");
    let out = Command::new(common::vmm_bin())
        .args(["fork-server", "--snapshot"])
        .arg(tmp.path())
        .arg("--socket")
        .arg(tmp.path().join("s.sock"))
        .args(["--pool", "1001"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("pool of 1001 is out of range"), "{err}");
}

#[test]
fn a_pooled_child_serves_connections_that_come_and_go() {
    let tmp = TempDir::new("pool-conns");
    let snap = tmp.path().join("snap");
    make_snapshot(&snap, tmp.path());
    let server = ForkServer::start(&snap, tmp.path().join("fork.sock"), 1);
    server.wait_parked(1);
    let mut kid = server.fork(1, &tmp.path().join("a"), json!({})).remove(0);
    let sock = kid.dir.join("control.sock");
    let connect = || ControlClient::connect(&sock, Duration::from_secs(30)).unwrap();
    // Several at once (the one started ahead and new ones), each answered.
    let mut open: Vec<ControlClient> = (0..4).map(|_| connect()).collect();
    for c in open.iter_mut().rev() {
        match c.call(&ControlRequest::Status).unwrap() {
            ControlResponse::Status(s) => assert_eq!(s.state, RunState::Running),
            other => panic!("{other:?}"),
        }
    }
    drop(open);
    // One after another: the connections' threads take the next ones.
    for _ in 0..30 {
        let r = connect()
            .call(&ControlRequest::Guest {
                request: GuestRequest::Ping,
                timeout_ms: None,
            })
            .unwrap();
        assert!(matches!(r, ControlResponse::Guest { .. }), "{r:?}");
    }
    let threads = std::fs::read_dir(format!("/proc/{}/task", kid.pid))
        .unwrap()
        .count();
    // A client that reconnects at once may beat the thread of its last
    // connection back to waiting, which then starts another: a few more
    // than were ever open at once, never one per connection.
    assert!(
        threads < 2 + 30 / 2,
        "{threads} threads after 30 connections: the connections' threads are not reused"
    );
    assert!(matches!(
        kid.guest(GuestRequest::Ping),
        GuestResponse::Pong { .. }
    ));
    kid.shutdown();
}

#[test]
fn a_pooled_child_takes_its_staged_directory_or_one_made_for_it() {
    use std::os::unix::fs::MetadataExt;
    let tmp = TempDir::new("pool-dirs");
    let snap = tmp.path().join("snap");
    make_snapshot(&snap, tmp.path());
    let sock = tmp.path().join("fork.sock");
    let staging = tmp.path().join("fork.sock.pool");
    let server = ForkServer::start(&snap, sock, 2);
    let parked = server.wait_parked(2);
    // Each parked child has its directory ready: socket bound, log open.
    let staged_inode = |pid: i32| {
        let dir = staging.join(pid.to_string());
        let deadline = Instant::now() + Duration::from_secs(10);
        while !dir.join("vmm.log").exists() {
            assert!(Instant::now() < deadline, "{} is not staged", dir.display());
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(dir.join("control.sock").exists());
        std::fs::metadata(&dir).unwrap().ino()
    };
    let inodes: Vec<u64> = parked.iter().map(|&p| staged_inode(p)).collect();

    // Same file system: the staged directory is renamed into place.
    let mut a = server.fork(1, &tmp.path().join("a"), json!({}));
    let a_ino = std::fs::metadata(&a[0].dir).unwrap().ino();
    assert!(inodes.contains(&a_ino), "not a staged directory");
    assert!(!staging.join(a[0].pid.to_string()).exists());

    // Another file system (when there is one): made for it; its staged
    // directory goes.
    let shm = Path::new("/dev/shm");
    let elsewhere = TempDir(shm.join(format!("forkd-test-pool-{}", std::process::id())));
    let mut b = Vec::new();
    if shm.is_dir()
        && std::fs::metadata(shm).unwrap().dev() != std::fs::metadata(tmp.path()).unwrap().dev()
    {
        server.wait_parked(2);
        b = server.fork(1, &elsewhere.0.join("b"), json!({}));
        assert!(matches!(
            b[0].guest(GuestRequest::Ping),
            GuestResponse::Pong { .. }
        ));
        assert!(b[0].dir.join("vmm.log").exists());
        let deadline = Instant::now() + Duration::from_secs(10);
        while staging.join(b[0].pid.to_string()).exists() {
            assert!(Instant::now() < deadline, "the staged directory stays");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    // A directory in the way, not empty: made for it, what was there stays.
    server.wait_parked(2);
    let c_dir = tmp.path().join("c").join("0");
    std::fs::create_dir_all(&c_dir).unwrap();
    std::fs::write(c_dir.join("keep"), b"x").unwrap();
    let mut c = server.fork(1, &tmp.path().join("c"), json!({}));
    assert_eq!(std::fs::read(c_dir.join("keep")).unwrap(), b"x");
    for kid in a.iter_mut().chain(b.iter_mut()).chain(c.iter_mut()) {
        assert!(matches!(
            kid.guest(GuestRequest::Ping),
            GuestResponse::Pong { .. }
        ));
        assert!(kid.dir.join("vmm.log").exists());
    }

    // The staging directory goes with the server.
    assert_eq!(server.ask(&json!({"op": "shutdown"}))["result"], "ok");
    let deadline = Instant::now() + Duration::from_secs(10);
    while staging.exists() {
        assert!(Instant::now() < deadline, "{} stays", staging.display());
        std::thread::sleep(Duration::from_millis(5));
    }
    for kid in a.into_iter().chain(b).chain(c) {
        kid.shutdown();
    }
}

#[test]
fn pooled_children_keep_a_console_log_when_asked_and_only_then() {
    let tmp = TempDir::new("pool-console");
    let snap = tmp.path().join("snap");
    make_snapshot(&snap, tmp.path());
    let server = ForkServer::start(&snap, tmp.path().join("fork.sock"), 2);
    server.wait_parked(2);
    let mut kids = Vec::new();
    // Asked for, then (made ahead by the refill) not, then asked for again.
    for (batch, console) in [("a", true), ("b", false), ("c", true)] {
        server.wait_parked(2);
        // Let the refill's children stage what the last request asked for.
        std::thread::sleep(Duration::from_millis(200));
        server.wait_parked(2);
        for mut kid in server.fork(2, &tmp.path().join(batch), json!({"console_log": console})) {
            assert!(matches!(
                kid.guest(GuestRequest::Ping),
                GuestResponse::Pong { .. }
            ));
            assert_eq!(
                kid.dir.join("console.log").exists(),
                console,
                "{batch}: console.log with console_log {console}"
            );
            kids.push(kid);
        }
    }
    for kid in kids {
        kid.shutdown();
    }
}

#[test]
fn a_pooled_child_continues_exactly_where_the_parent_paused() {
    use vmm::boot::builtin::abi;
    const COUNTER: u64 = abi::INFO_ADDR + abi::INFO_COUNTER;
    let tmp = TempDir::new("pool-counter");
    let snap = tmp.path().join("snap");
    let mut vm = TestVm::start(&["--builtin", "--mem-mib", "32", "--console", "none"]);
    vm.guest(GuestRequest::CounterStart);
    common::wait_for_counter_above(|| vm.peek_u64(COUNTER), 0);
    assert_eq!(vm.call(ControlRequest::Pause), ControlResponse::Ok);
    let counter = vm.peek_u64(COUNTER);
    match vm.call(ControlRequest::Snapshot {
        dir: snap.clone(),
        leave_paused: true,
        mode: SnapshotMode::Full,
        wait: true,
        measure_diff: false,
    }) {
        ControlResponse::Snapshot { .. } => {}
        other => panic!("{other:?}"),
    }
    vm.shutdown();
    let server = ForkServer::start(&snap, tmp.path().join("fork.sock"), 2);
    server.wait_parked(2);
    // Parked children made their vCPUs' first KVM_RUN without running the
    // guest: the counter is where the parent left it.
    for mut kid in server.fork(2, &tmp.path().join("a"), json!({"paused": true})) {
        assert_eq!(kid.status().state, RunState::Paused);
        assert_eq!(kid.peek_u64(COUNTER), counter);
        assert_eq!(kid.call(ControlRequest::Resume), ControlResponse::Ok);
        common::wait_for_counter_above(|| kid.peek_u64(COUNTER), counter);
        kid.shutdown();
    }
}

#[test]
fn a_parked_child_that_dies_is_replaced() {
    let tmp = TempDir::new("pool-loss");
    let snap = tmp.path().join("snap");
    make_snapshot(&snap, tmp.path());
    let server = ForkServer::start(&snap, tmp.path().join("fork.sock"), 2);
    let parked = server.wait_parked(2);
    let server_cpu = || {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", server.pid())).unwrap();
        let fields: Vec<u64> = stat
            .rsplit_once(") ")
            .unwrap()
            .1
            .split_whitespace()
            .skip(11)
            .take(2)
            .map(|f| f.parse().unwrap())
            .collect();
        fields[0] + fields[1]
    };
    let cpu_before = server_cpu();
    // SAFETY: SIGKILL to a child of the server this test started.
    unsafe { libc::kill(parked[0], libc::SIGKILL) };
    wait_gone(&parked[..1], "a killed parked child");
    // Noticed and replaced (after the pause that follows a loss).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = server.parked();
        if now.len() == 2 && !now.contains(&parked[0]) {
            break;
        }
        assert!(Instant::now() < deadline, "not replaced: {now:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The server waited rather than spun (clock ticks of 10 ms).
    assert!(
        server_cpu() - cpu_before < 50,
        "the fork server spun after the loss"
    );
    let mut kid = server.fork(1, &tmp.path().join("a"), json!({})).remove(0);
    assert!(matches!(
        kid.guest(GuestRequest::Ping),
        GuestResponse::Pong { .. }
    ));
    kid.shutdown();
}

/// A pids group for a test under the host's pids hierarchy (v1, or the
/// unified one when it has the controller), removed on drop with what is
/// left in it.
struct PidsParent(PathBuf);

impl PidsParent {
    fn new(tag: &str) -> PidsParent {
        let v1 = Path::new("/sys/fs/cgroup/pids");
        let root = if v1.join("pids.max").exists() || v1.join("cgroup.procs").exists() {
            v1.to_owned()
        } else {
            let unified = Path::new("/sys/fs/cgroup");
            let controllers =
                std::fs::read_to_string(unified.join("cgroup.controllers")).unwrap_or_default();
            assert!(
                controllers.split_whitespace().any(|c| c == "pids"),
                "this test needs the pids cgroup controller (v1 at /sys/fs/cgroup/pids, or v2)"
            );
            std::fs::write(unified.join("cgroup.subtree_control"), "+pids").unwrap();
            unified.to_owned()
        };
        let dir = root.join(format!("forkd-test-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        if dir.join("cgroup.subtree_control").exists() {
            std::fs::write(dir.join("cgroup.subtree_control"), "+pids").unwrap();
        }
        PidsParent(dir)
    }

    fn groups(&self) -> Vec<PathBuf> {
        let mut out: Vec<PathBuf> = std::fs::read_dir(&self.0)
            .unwrap()
            .flatten()
            .filter(|e| e.file_type().unwrap().is_dir())
            .map(|e| e.path())
            .collect();
        out.sort();
        out
    }
}

impl Drop for PidsParent {
    fn drop(&mut self) {
        for g in self.groups() {
            let _ = std::fs::remove_dir(g);
        }
        let _ = std::fs::remove_dir(&self.0);
    }
}

fn procs_in(group: &Path) -> Vec<i32> {
    std::fs::read_to_string(group.join("cgroup.procs"))
        .unwrap()
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect()
}

fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ok() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn each_child_is_in_a_cgroup_of_its_own_that_goes_with_it() {
    let tmp = TempDir::new("pool-cgroup");
    let snap = tmp.path().join("snap");
    make_snapshot(&snap, tmp.path());
    let parent = PidsParent::new("pool");
    let parent_arg = parent.0.to_str().unwrap().to_owned();
    let server = ForkServer::start_with_args(
        &snap,
        tmp.path().join("fork.sock"),
        2,
        &["--cgroup-parent", &parent_arg, "--pids-limit", "500"],
    );
    let parked = server.wait_parked(2);
    // Each parked child joined a group of its own, made with the limit
    // given for the first children.
    wait_for("the parked children join their groups", || {
        parent
            .groups()
            .iter()
            .filter(|g| procs_in(g).len() == 1)
            .count()
            == 2
    });
    // Besides them, groups made ahead for children forked when asked: all
    // with that limit.
    for g in parent.groups() {
        assert_eq!(
            std::fs::read_to_string(g.join("pids.max")).unwrap().trim(),
            "500"
        );
        assert!(procs_in(&g).iter().all(|p| parked.contains(p)));
    }
    // Handed out with another limit: its group's changes; named in the answer.
    let r = server.ask(
        &json!({"op": "fork", "n": 1, "out_dir": tmp.path().join("a"),
        "limits": {"pids": 64}}),
    );
    assert_eq!(r["result"], "forked", "{r}");
    let kid = &r["children"][0];
    let group = parent.0.join(kid["cgroup"].as_str().unwrap());
    assert_eq!(procs_in(&group), [kid["pid"].as_i64().unwrap() as i32]);
    assert_eq!(
        std::fs::read_to_string(group.join("pids.max"))
            .unwrap()
            .trim(),
        "64"
    );
    // Every thread of the VMM is in it.
    let tasks = std::fs::read_dir(format!("/proc/{}/task", kid["pid"]))
        .unwrap()
        .count();
    assert_eq!(
        std::fs::read_to_string(group.join("pids.current"))
            .unwrap()
            .trim(),
        tasks.to_string()
    );
    // The limit holds against the VMM itself: asked to start 100 threads
    // more, it gets only what pids.max leaves, and the kernel says no.
    let mut client = ControlClient::connect(
        Path::new(kid["control_socket"].as_str().unwrap()),
        Duration::from_secs(30),
    )
    .unwrap();
    match client
        .call(&ControlRequest::ThreadsSelfTest { threads: 100 })
        .unwrap()
    {
        ControlResponse::Threads {
            started,
            refused: Some(why),
        } => {
            assert!(started + tasks as u32 <= 64, "{started} started");
            assert!(why.contains("Resource temporarily unavailable"), "{why}");
        }
        other => panic!("100 threads under pids.max 64: {other:?}"),
    }
    wait_for("the test's threads end", || {
        std::fs::read_to_string(group.join("pids.current"))
            .unwrap()
            .trim()
            == tasks.to_string()
    });
    drop(client);
    // A memory limit on a server whose parents have no memory controller
    // is refused before anything starts.
    let r = server.ask(
        &json!({"op": "fork", "n": 1, "out_dir": tmp.path().join("b"),
        "limits": {"memory_mib": 64}}),
    );
    assert_eq!(r["result"], "error", "{r}");
    assert!(
        r["message"].as_str().unwrap().contains("memory controller"),
        "{r}"
    );

    // A parked child that dies: its group goes.
    let still = server.wait_parked(2);
    let dead_group = parent
        .groups()
        .into_iter()
        .find(|g| procs_in(g) == [still[0]])
        .unwrap();
    // SAFETY: SIGKILL to a child of the server this test started.
    unsafe { libc::kill(still[0], libc::SIGKILL) };
    wait_for("the dead child's group is removed", || !dead_group.exists());

    let pid = kid["pid"].as_i64().unwrap() as i32;
    // SAFETY: SIGKILL to the child handed out above.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    wait_gone(&[pid], "the child handed out");
}

#[test]
fn groups_are_made_ahead_and_a_stopping_server_removes_those_it_holds() {
    let tmp = TempDir::new("pool-cgroup-stop");
    let snap = tmp.path().join("snap");
    make_snapshot(&snap, tmp.path());
    let parent = PidsParent::new("stop");
    let parent_arg = parent.0.to_str().unwrap().to_owned();
    let server = ForkServer::start_with_args(
        &snap,
        tmp.path().join("fork.sock"),
        2,
        &["--cgroup-parent", &parent_arg],
    );
    server.wait_parked(2);
    wait_for("two groups in use", || {
        parent
            .groups()
            .iter()
            .filter(|g| !procs_in(g).is_empty())
            .count()
            == 2
    });
    // A child forked when asked (memfd children are) takes a group made
    // ahead, and one is made again after the answer.
    let spare_before = parent.groups();
    let r = server.ask(
        &json!({"op": "fork", "n": 1, "out_dir": tmp.path().join("m"),
        "memfd": true}),
    );
    assert_eq!(r["result"], "forked", "{r}");
    let group = parent.0.join(r["children"][0]["cgroup"].as_str().unwrap());
    assert!(
        spare_before.contains(&group),
        "{} was not made ahead",
        group.display()
    );
    wait_for("a spare made again", || {
        parent.groups().len() == spare_before.len() + 1
    });
    let pid = r["children"][0]["pid"].as_i64().unwrap() as i32;
    // SAFETY: SIGKILL to the child forked above.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    wait_gone(&[pid], "the memfd child");
    // Whoever removes a child handed out removes its group.
    wait_for("the memfd child leaves its group", || {
        procs_in(&group).is_empty()
    });
    std::fs::remove_dir(&group).unwrap();
    assert_eq!(server.ask(&json!({"op": "shutdown"}))["result"], "ok");
    wait_for("the parked children's and spare groups are removed", || {
        parent.groups().is_empty()
    });
}

/// A fork server reads its snapshot once and keeps its files open: once
/// the snapshot (memory, frozen disk layer and base image) is deleted,
/// a parked child handed out, a child forked cold and the pool's refill
/// all still restore from it.
#[test]
fn children_restore_from_a_snapshot_deleted_after_the_server_read_it() {
    let tmp = TempDir::new("pool-deleted");
    let snap = tmp.path().join("snap");
    let base = tmp.path().join("base.img");
    std::fs::write(&base, vec![0x5a; 1 << 20]).unwrap();
    let uds = tmp.path().join("parent-vsock.sock");
    let cow = tmp.path().join("parent.cow");
    let mut vm = TestVm::start(&[
        "--builtin",
        "--mem-mib",
        "64",
        "--console",
        "none",
        "--vsock-uds",
        uds.to_str().unwrap(),
        "--drive-image",
        base.to_str().unwrap(),
        "--cow-layer",
        cow.to_str().unwrap(),
    ]);
    common::snapshot(&mut vm, &snap, SnapshotMode::Full);
    vm.shutdown();
    let server = ForkServer::start(&snap, tmp.path().join("fork.sock"), 1);
    let parked = server.wait_parked(1);
    std::fs::remove_dir_all(&snap).unwrap();
    std::fs::remove_file(&base).unwrap();
    std::fs::remove_file(&cow).unwrap();

    let mut kids = server.fork(2, &tmp.path().join("a"), json!({}));
    assert!(
        parked.contains(&kids[0].pid),
        "the first was not the parked one"
    );
    for kid in &mut kids {
        assert!(matches!(
            kid.guest(GuestRequest::Ping),
            GuestResponse::Pong { .. }
        ));
        assert!(
            kid.dir.join("disk0.cow").exists(),
            "no disk layer of its own"
        );
    }
    // The pool refills from the open files too.
    let refill = server.wait_parked(1);
    assert!(!refill.iter().any(|p| kids.iter().any(|k| k.pid == *p)));
    for kid in kids {
        kid.shutdown();
    }
}

/// What `/proc/<pid>/status` says of a process's confinement: its uids,
/// whether every capability set is empty, no_new_privs and seccomp.
fn confinement(pid: i32) -> (String, bool, bool, bool) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap()
            .trim()
            .to_owned()
    };
    let no_caps = ["CapPrm:", "CapEff:", "CapBnd:", "CapAmb:", "CapInh:"]
        .iter()
        .all(|f| field(f).bytes().all(|b| b == b'0'));
    (
        field("Uid:"),
        no_caps,
        field("NoNewPrivs:") == "1",
        field("Seccomp:") == "2",
    )
}

/// Every child of a fork server gives up root before its guest runs,
/// pooled, forked cold or with memfd RAM: a uid and gid of its own (the
/// jail's base plus its pid), no capability, no new privileges, its
/// filters, and a directory of its own; the memfd child is live-branched
/// (its userfaultfd made before the drop). `--jail off` leaves them root.
/// What the root of VMM `pid` holds besides its own directory (`own`, at
/// whatever paths it is bound) and its `/proc`: files, and directories
/// with nothing of its own below them. Read from the host through
/// `/proc/<pid>/root`.
fn jail_holds_else(pid: i32, own: &Path) -> Vec<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let own = std::fs::metadata(own).unwrap();
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    let mut foreign = Vec::new();
    let mut todo = vec![root.clone()];
    while let Some(dir) = todo.pop() {
        let mut holds_own = false;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            if (meta.dev(), meta.ino()) == (own.dev(), own.ino())
                || (dir == root && path.file_name() == Some("proc".as_ref()))
            {
                holds_own = true;
            } else if meta.is_dir() {
                holds_own = true;
                todo.push(path);
            } else {
                foreign.push(path);
            }
        }
        if !holds_own {
            foreign.push(dir);
        }
    }
    foreign
}

#[test]
fn children_are_jailed_pooled_cold_and_memfd_and_not_with_jail_off() {
    let tmp = TempDir::new("jail");
    let snap = tmp.path().join("snap");
    make_snapshot(&snap, tmp.path());
    let server = ForkServer::start(&snap, tmp.path().join("fork.sock"), 1);
    let parked = server.wait_parked(1);
    let mut kids = server.fork(2, &tmp.path().join("a"), json!({}));
    assert!(parked.contains(&kids[0].pid), "the first is the parked one");
    kids.extend(server.fork(1, &tmp.path().join("b"), json!({"memfd": true})));
    for kid in &mut kids {
        assert!(matches!(
            kid.guest(GuestRequest::Ping),
            GuestResponse::Pong { .. }
        ));
        let id = proto::control::jail_id(kid.pid);
        let (uids, no_caps, nnp, seccomp) = confinement(kid.pid);
        assert_eq!(uids, format!("{id}\t{id}\t{id}\t{id}"), "child {}", kid.pid);
        assert!(no_caps && nnp && seccomp, "child {}", kid.pid);
        let owner = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(&kid.dir).unwrap());
        assert_eq!(owner, id, "{}", kid.dir.display());
        let foreign = jail_holds_else(kid.pid, &kid.dir);
        assert!(
            foreign.is_empty(),
            "child {}'s root holds more than its directory and its procfs: {} paths, first {:?}",
            kid.pid,
            foreign.len(),
            &foreign[..foreign.len().min(10)]
        );
    }
    // Not handed a directory, a jailed child cannot make one, and says how.
    let refused = kids[0]
        .client
        .call(&ControlRequest::Snapshot {
            dir: tmp.path().join("not-handed"),
            leave_paused: false,
            mode: SnapshotMode::Full,
            wait: true,
            measure_diff: false,
        })
        .unwrap();
    assert!(
        matches!(&refused, ControlResponse::Error { message } if message.contains("made for it")),
        "{refused:?}"
    );
    let live = common::snapshot(&mut kids[2], &tmp.path().join("live"), SnapshotMode::Live);
    assert_eq!(live["status"], "ready", "{live}");
    for kid in kids {
        kid.shutdown();
    }
    drop(server);

    let server = ForkServer::start_with_args(
        &snap,
        tmp.path().join("fork-off.sock"),
        0,
        &["--jail", "off"],
    );
    let mut kid = server.fork(1, &tmp.path().join("c"), json!({})).remove(0);
    assert!(matches!(
        kid.guest(GuestRequest::Ping),
        GuestResponse::Pong { .. }
    ));
    let (uids, no_caps, _, seccomp) = confinement(kid.pid);
    assert_eq!(
        (uids.as_str(), no_caps, seccomp),
        ("0\t0\t0\t0", false, true)
    );
    assert!(
        Path::new(&format!("/proc/{}/root/etc", kid.pid)).exists(),
        "with the jail off a VMM sees the host's files"
    );
    kid.shutdown();
}

/// Starts `forkd-vmm <args> --jail-dir <dir> --control-socket
/// <dir>/control.sock` and checks, once it answers, that it runs as its
/// jail id with no capabilities, under seccomp, in a root that holds only
/// `dir`.
fn start_jailed(args: &[&str], dir: &Path) -> (std::process::Child, ControlClient) {
    std::fs::create_dir(dir).unwrap();
    let sock = dir.join("control.sock");
    let mut cmd = Command::new(common::vmm_bin());
    // The daemon's umask: what the VMM makes before the drop is root's
    // alone unless the jail hands it over.
    // SAFETY: umask is async-signal-safe and touches no other state.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
            libc::umask(0o077);
            Ok(())
        })
    };
    let mut child = cmd
        .args(args)
        .args(["--console", "none", "--jail-dir"])
        .arg(dir)
        .arg("--control-socket")
        .arg(&sock)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut client = loop {
        if let Ok(c) = ControlClient::connect(&sock, Duration::from_secs(30)) {
            break c;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "forkd-vmm {args:?} exited"
        );
        assert!(Instant::now() < deadline, "no control socket in 20 s");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(matches!(
        client.call(&ControlRequest::Status).unwrap(),
        ControlResponse::Status(_)
    ));
    let id = proto::control::jail_id(pid);
    let (uids, no_caps, nnp, seccomp) = confinement(pid);
    assert_eq!(uids, format!("{id}\t{id}\t{id}\t{id}"), "{args:?}");
    assert!(no_caps && nnp && seccomp, "{args:?}");
    let foreign = jail_holds_else(pid, dir);
    assert!(foreign.is_empty(), "{args:?}: {foreign:?}");
    (child, client)
}

/// `run --jail-dir`, as the daemon boots the VMs it snapshots, and
/// `restore --jail-dir`: once its machine is built (before its guest
/// runs) the VMM gives up root and its root holds only that directory; a
/// snapshot goes into a directory handed over to it.
#[test]
fn booted_and_restored_vms_are_jailed_in_their_directories_with_jail_dir() {
    let tmp = TempDir::new("run-jail");
    let base = std::path::absolute(tmp.path()).unwrap();
    // A drive whose layer the VMM makes as root, before the drop: the
    // snapshot reads it back as the jailed VMM.
    let image = base.join("disk.img");
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    let vm = base.join("vm");
    let layer = vm.join("disk.cow");
    let (mut child, mut client) = start_jailed(
        &[
            "run",
            "--builtin",
            "--drive-image",
            image.to_str().unwrap(),
            "--cow-layer",
            layer.to_str().unwrap(),
        ],
        &vm,
    );
    let snap = base.join("snap");
    common::hand_over(child.id() as i32, &snap);
    let answer = client
        .call(&ControlRequest::Snapshot {
            dir: snap.clone(),
            leave_paused: true,
            mode: SnapshotMode::Full,
            wait: true,
            measure_diff: false,
        })
        .unwrap();
    assert!(
        matches!(answer, ControlResponse::Snapshot { .. }),
        "{answer:?}"
    );
    let _ = client.call(&ControlRequest::Shutdown);
    let _ = child.wait();
    let snap_arg = snap.to_str().unwrap();
    for (name, extra) in [("restored", None), ("restored-memfd", Some("memfd"))] {
        let own_layer = base.join(name).join("disk.cow");
        let own_layer = own_layer.to_str().unwrap();
        let mut args = vec!["restore", "--snapshot", snap_arg, "--cow-layer", own_layer];
        args.extend(extra.map(|b| ["--memory-backend", b]).into_iter().flatten());
        let (mut child, mut client) = start_jailed(&args, &base.join(name));
        let _ = client.call(&ControlRequest::Shutdown);
        let _ = child.wait();
    }
}
