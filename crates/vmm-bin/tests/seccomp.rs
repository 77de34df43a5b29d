//! Host tests: every thread of a VMM (booted, restored, forked, pooled)
//! runs under a seccomp filter, and a forbidden call ends the VMM with
//! status 159 and a line naming the thread and the call.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{ForkServer, TempDir, TestVm};
use proto::control::{
    ChildExit, ControlRequest, ControlResponse, SnapshotMode, EXIT_FILE,
    SECCOMP_VIOLATION_EXIT_CODE,
};
use proto::guest::GuestRequest;
use serde_json::json;

/// `Name: value` fields of `/proc/<pid>/task/<tid>/status` for every
/// thread of `pid`: (thread name, Seccomp, NoNewPrivs).
fn threads(pid: i32) -> Vec<(String, String, String)> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap();
    let mut out = Vec::new();
    for task in tasks.flatten() {
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
            continue; // a thread that just ended
        };
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_owned())
                .unwrap_or_default()
        };
        out.push((field("Name:"), field("Seccomp:"), field("NoNewPrivs:")));
    }
    out
}

/// Every thread of `pid` is filtered with no_new_privs, and the thread
/// kinds in `expect` are among them.
fn assert_all_filtered(pid: i32, what: &str, expect: &[&str]) {
    let seen = threads(pid);
    for (name, seccomp, nnp) in &seen {
        assert_eq!(
            seccomp, "2",
            "{what}: thread {name} is not filtered: {seen:?}"
        );
        assert_eq!(
            nnp, "1",
            "{what}: thread {name} lacks no_new_privs: {seen:?}"
        );
    }
    for prefix in expect {
        assert!(
            seen.iter().any(|(n, _, _)| n.starts_with(prefix)),
            "{what}: no {prefix} thread among {seen:?}"
        );
    }
}

/// A booted built-in guest with a vsock device, after a guest request
/// (its vCPU ran, its device worker started, a control worker served).
fn booted(args: &[&str]) -> (TestVm, TempDir) {
    let uds_dir = TempDir::new("seccomp-vsock");
    let uds = uds_dir.path().join("v.sock");
    let mut all = vec![
        "--builtin",
        "--mem-mib",
        "32",
        "--console",
        "none",
        "--vsock-uds",
    ];
    all.push(uds.to_str().unwrap());
    all.extend_from_slice(args);
    let mut vm = TestVm::start(&all);
    vm.call(ControlRequest::Guest {
        request: GuestRequest::Ping,
        timeout_ms: None,
    });
    (vm, uds_dir)
}

/// Waits (up to 10 s) for `dir/exit.json`.
fn wait_exit_file(dir: &Path) -> ChildExit {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(bytes) = std::fs::read(dir.join(EXIT_FILE)) {
            return serde_json::from_slice(&bytes).unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "no {EXIT_FILE} in {}",
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn every_thread_of_a_booted_a_snapshotting_and_a_forked_vmm_is_filtered() {
    let (mut vm, _uds) = booted(&[]);
    let pid = vm.child.id() as i32;
    assert_all_filtered(pid, "a booted VMM", &["forkd-vmm", "vcpu0", "control-conn"]);
    // A full, a diff and a live branch (memfd RAM): the copy threads take
    // their filter under the control filter and the VM runs on.
    let tmp = TempDir::new("seccomp-snap");
    let snap = tmp.path().join("snap");
    common::snapshot(&mut vm, &snap, SnapshotMode::Full);
    common::snapshot(&mut vm, &tmp.path().join("diff"), SnapshotMode::Diff);
    assert_all_filtered(pid, "a VMM that snapshotted", &["vcpu0"]);
    vm.shutdown();

    let (mut live, _uds) = booted(&["--memory-backend", "memfd"]);
    common::snapshot(&mut live, &tmp.path().join("live"), SnapshotMode::Live);
    assert_all_filtered(
        live.child.id() as i32,
        "a VMM that branched live",
        &["vcpu0"],
    );
    live.shutdown();

    // Forked children, from a pool and not.
    let server = ForkServer::start(&snap, tmp.path().join("fork.sock"), 1);
    let parked = server.wait_parked(1);
    let out = tmp.path().join("kids");
    let mut kids = server.fork(2, &out, json!({}));
    for kid in &mut kids {
        kid.call(ControlRequest::Guest {
            request: GuestRequest::Ping,
            timeout_ms: None,
        });
        assert_all_filtered(kid.pid, "a forked child", &["forkd-vmm", "vcpu0"]);
    }
    assert!(
        kids.iter().any(|k| parked.contains(&k.pid)),
        "one child came from the pool"
    );
    // The fork server itself is not a VMM: it keeps no filter.
    assert!(threads(server.pid()).iter().all(|(_, s, _)| s == "0"));
}

#[test]
fn a_forbidden_call_ends_a_forked_vmm_with_159_and_names_the_call() {
    let tmp = TempDir::new("seccomp-kill");
    let snap = tmp.path().join("snap");
    let (mut vm, _uds) = booted(&[]);
    common::snapshot(&mut vm, &snap, SnapshotMode::Full);
    vm.shutdown();
    let server = ForkServer::start(&snap, tmp.path().join("fork.sock"), 0);
    let mut kids = server.fork(1, &tmp.path().join("kids"), json!({}));
    let mut kid = kids.pop().unwrap();
    // No answer: the VMM is gone before it could write one.
    let answer = kid.client.call(&ControlRequest::SeccompSelfTest);
    assert!(answer.is_err(), "{answer:?}");
    let exit = wait_exit_file(&kid.dir);
    assert_eq!(exit.code, Some(SECCOMP_VIOLATION_EXIT_CODE), "{exit:?}");
    let log = std::fs::read_to_string(kid.dir.join("vmm.log")).unwrap();
    assert!(
        log.contains("thread control-conn made a forbidden system call (number 59)"),
        "{log}"
    );
}

#[test]
fn each_thread_kinds_filter_ends_a_forbidden_call() {
    for kind in ["control", "vcpu", "device", "copy"] {
        let out = Command::new(common::vmm_bin())
            .args(["seccomp-self-test", "--thread", kind])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(SECCOMP_VIOLATION_EXIT_CODE),
            "{kind}: {stdout} {stderr}"
        );
        assert_eq!(
            stdout,
            format!("confined {kind}\n"),
            "allowed calls still work"
        );
        assert!(
            stderr.contains("made a forbidden system call (number 59)"),
            "{stderr}"
        );
    }
}

#[test]
fn without_filters_the_self_test_says_the_call_went_through() {
    let (mut vm, _uds) = booted(&["--seccomp", "off"]);
    let pid = vm.child.id() as i32;
    assert!(threads(pid).iter().all(|(_, s, _)| s == "0"));
    match vm.call(ControlRequest::SeccompSelfTest) {
        ControlResponse::Error { message } => {
            assert!(message.contains("went through"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    vm.shutdown();
}
