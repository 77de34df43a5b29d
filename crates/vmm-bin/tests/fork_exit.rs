//! Host tests: a fork server reaps its children and records how each ended
//! (`exit.json` in the child's directory) before reaping it.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{ControlledVm, ForkServer, ForkedVm, TempDir, TestVm};
use proto::control::{ChildExit, ControlRequest, ControlResponse, SnapshotMode, EXIT_FILE};
use proto::guest::{GuestRequest, GuestResponse};
use serde_json::json;

/// A built-in guest snapshotted into `snap`; the exit status of its VMM
/// once shut down over its control socket (what the VMM's shutdown path
/// returns).
fn make_snapshot(snap: &Path) -> i32 {
    let mut vm = TestVm::start(&["--builtin", "--mem-mib", "32", "--console", "none"]);
    common::snapshot(&mut vm, snap, SnapshotMode::Full);
    assert_eq!(vm.call(ControlRequest::Shutdown), ControlResponse::Ok);
    let status = common::wait_exit(&mut vm.child, Duration::from_secs(10));
    status.code().expect("the VMM exits, it is not killed")
}

/// Waits (up to 10 s) until `pid` is reaped: no /proc entry at all, not
/// even a zombie's.
fn wait_reaped(pid: i32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Path::new(&format!("/proc/{pid}")).exists() {
        assert!(
            Instant::now() < deadline,
            "process {pid} was not reaped: {}",
            std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The `exit.json` in `dir`, read at once (no wait: it must be there as
/// soon as the process is reaped).
fn recorded_exit(dir: &Path) -> ChildExit {
    let path = dir.join(EXIT_FILE);
    let bytes = std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "{} is missing once its child is reaped: {e}",
            path.display()
        )
    });
    serde_json::from_slice(&bytes).unwrap()
}

/// Kills `kid` and waits until it is reaped.
fn kill_and_wait(kid: &ForkedVm) {
    // SAFETY: kill has no memory-safety preconditions; the pid is a child
    // the fork server started for this test.
    assert_eq!(unsafe { libc::kill(kid.pid, libc::SIGKILL) }, 0);
    wait_reaped(kid.pid);
}

/// Processes whose parent is `pid`, with their state letter.
fn children_with_state(pid: i32) -> Vec<(i32, char)> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|p| {
            let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
            let mut fields = stat.rsplit_once(") ")?.1.split_whitespace();
            let state = fields.next()?.chars().next()?;
            let ppid: i32 = fields.next()?.parse().ok()?;
            (ppid == pid).then_some((p, state))
        })
        .collect()
}

fn assert_no_zombies(server: &ForkServer) {
    let zombies: Vec<_> = children_with_state(server.pid())
        .into_iter()
        .filter(|&(_, state)| state == 'Z')
        .collect();
    assert!(
        zombies.is_empty(),
        "the fork server has zombie children: {zombies:?}"
    );
}

/// Whether any thread of `pid` blocks or ignores SIGCHLD, and whether it
/// holds a signalfd. KVM's own worker threads in the process (`kvm-*`,
/// which block every signal) are not the VMM's.
fn sigchld_blocked_or_signalfd(pid: i32) -> (bool, bool) {
    let bit = 1u64 << (libc::SIGCHLD - 1);
    let mask = |status: &str, field: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
            .unwrap()
    };
    let blocked = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .map(|t| std::fs::read_to_string(t.unwrap().path().join("status")).unwrap())
        .filter(|s| !s.starts_with("Name:\tkvm-"))
        .any(|s| (mask(&s, "SigBlk:") | mask(&s, "SigIgn:")) & bit != 0);
    let signalfd = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .any(|l| l.to_string_lossy().contains("signalfd"));
    (blocked, signalfd)
}

#[test]
fn a_fork_servers_children_leave_how_they_ended_before_they_are_reaped() {
    let tmp = TempDir::new("exit");
    let snap = tmp.path().join("snap");
    let shutdown_code = make_snapshot(&snap);
    let server = ForkServer::start(&snap, tmp.path().join("fork.sock"), 0);
    let mut kids = server.fork(3, &tmp.path().join("a"), json!({}));
    for kid in &mut kids {
        assert!(matches!(
            kid.guest(GuestRequest::Ping),
            GuestResponse::Pong { .. }
        ));
        // A VMM runs as one started afresh would: SIGCHLD neither blocked
        // nor ignored, and no descriptor of the server's signals.
        assert_eq!(sigchld_blocked_or_signalfd(kid.pid), (false, false));
    }
    assert!(!kids[0].dir.join(EXIT_FILE).exists(), "written too early");

    // Killed: the signal, by the time the process is gone.
    kill_and_wait(&kids[0]);
    assert_eq!(
        recorded_exit(&kids[0].dir),
        ChildExit {
            pid: kids[0].pid,
            code: None,
            signal: Some(libc::SIGKILL),
        }
    );

    // Shut down over its control socket: the status the VMM exits with.
    let (pid, dir) = (kids[1].pid, kids[1].dir.clone());
    assert_eq!(kids[1].call(ControlRequest::Shutdown), ControlResponse::Ok);
    wait_reaped(pid);
    assert_eq!(
        recorded_exit(&dir),
        ChildExit {
            pid,
            code: Some(shutdown_code),
            signal: None,
        }
    );
    assert_eq!(shutdown_code, 0);

    // Its directory removed before it was killed: reaped all the same, and
    // the server serves on.
    std::fs::remove_dir_all(&kids[2].dir).unwrap();
    kill_and_wait(&kids[2]);
    assert!(!kids[2].dir.exists());
    let mut more = server.fork(1, &tmp.path().join("b"), json!({}));
    assert!(matches!(
        more[0].guest(GuestRequest::Ping),
        GuestResponse::Pong { .. }
    ));
    assert_no_zombies(&server);
    let pid = more[0].pid;
    more.pop().unwrap().shutdown();
    wait_reaped(pid);
    assert_eq!(recorded_exit(&tmp.path().join("b/0")).code, Some(0));
    assert_no_zombies(&server);
}

#[test]
fn pooled_children_are_recorded_in_the_requests_directory_and_all_are_reaped() {
    let tmp = TempDir::new("exit-pool");
    let snap = tmp.path().join("snap");
    make_snapshot(&snap);
    let server = ForkServer::start(&snap, tmp.path().join("fork.sock"), 2);
    let parked = server.wait_parked(2);
    for &p in &parked {
        assert_eq!(sigchld_blocked_or_signalfd(p), (false, false));
    }

    // Handed out, then killed: recorded where the request put it.
    let mut kids = server.fork(1, &tmp.path().join("a"), json!({}));
    assert!(parked.contains(&kids[0].pid), "not a pooled child");
    assert!(matches!(
        kids[0].guest(GuestRequest::Ping),
        GuestResponse::Pong { .. }
    ));
    assert_eq!(kids[0].dir, tmp.path().join("a/0"));
    kill_and_wait(&kids[0]);
    assert_eq!(
        recorded_exit(&kids[0].dir),
        ChildExit {
            pid: kids[0].pid,
            code: None,
            signal: Some(libc::SIGKILL),
        }
    );

    // Killed while parked (never handed out): reaped, and nothing written
    // anywhere (its staged directory goes).
    let parked = server.wait_parked(2);
    // SAFETY: kill has no memory-safety preconditions; a parked child of
    // the server this test started.
    assert_eq!(unsafe { libc::kill(parked[0], libc::SIGKILL) }, 0);
    wait_reaped(parked[0]);
    let staged = server.socket.with_extension("sock.pool");
    let deadline = Instant::now() + Duration::from_secs(10);
    while staged.join(parked[0].to_string()).exists() {
        assert!(Instant::now() < deadline, "the staged directory stays");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_no_zombies(&server);
    // The pool refills and serves.
    server.wait_parked(2);
    let mut more = server.fork(1, &tmp.path().join("b"), json!({}));
    let pid = more[0].pid;
    more.pop().unwrap().shutdown();
    wait_reaped(pid);
    assert_eq!(recorded_exit(&tmp.path().join("b/0")).code, Some(0));
    assert_no_zombies(&server);
}
