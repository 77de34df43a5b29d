//! Lab tests: each runs one scenario of the nested lab (`lab/run <scenario>`),
//! a real Linux guest booted by this forkd-vmm inside a QEMU TCG level-1 VM
//! with an emulated SVM CPU. Slow (minutes; the first run also builds the
//! guest kernel and rootfs into the cache), so they run one at a time and
//! stream the lab's output as they go.
//!
//! They fail, never skip, when the lab cannot run here: qemu-system-x86,
//! busybox-static and friends come from `.ci/setup`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Instant;

/// The scenarios, one test each (checked against `lab/run --list`).
const SCENARIOS: &[&str] = &[
    "linux-boot",
    "linux-rootfs",
    "agent",
    "snapshot-fork",
    "branch-live",
    "daemon",
];

/// One lab at a time: each wants most of this machine.
static LAB: Mutex<()> = Mutex::new(());

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("crates/vmm-bin sits two levels below the repository")
        .to_path_buf()
}

fn run_scenario(name: &str) {
    let _one_at_a_time = LAB.lock().unwrap_or_else(|e| e.into_inner());
    let has_qemu = Command::new("sh")
        .args(["-c", "command -v qemu-system-x86_64"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        has_qemu,
        "qemu-system-x86_64 is missing: the lab tests need the Debian package \
         qemu-system-x86 (run .ci/setup, which installs what the lab needs)"
    );
    let start = Instant::now();
    eprintln!("lab test {name}: lab/run {name} (streams the lab's output; minutes)");
    // The lab's output goes straight to this process's stdout/stderr, so it
    // shows as it happens (cargo captures only the test's own prints).
    let mut lab = Command::new(repo().join("lab/run"));
    lab.arg(name)
        .env("FORKD_VMM", env!("CARGO_BIN_EXE_forkd-vmm"));
    if name == "daemon" {
        // The daemon and the CLI of this build, beside forkd-vmm.
        let dir = Path::new(env!("CARGO_BIN_EXE_forkd-vmm")).parent().unwrap();
        for (var, bin) in [("FORKD_DAEMON", "forkd-daemon"), ("FORKD_CLI", "forkd")] {
            let path = dir.join(bin);
            assert!(
                path.is_file(),
                "{} is missing: the daemon lab test needs it; run `cargo test --workspace`, which builds it",
                path.display()
            );
            lab.env(var, path);
        }
        // The published forkd-mcp, here on the host, drives the daemon in
        // level 1 through the lab's port forward (compat/lab_linux.py).
        let venv = std::env::var_os("FORKD_COMPAT_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/var/cache/forkd/compat"))
            .join("current/forkd-mcp-0.2.1/bin");
        assert!(
            venv.join("forkd-mcp").is_file(),
            "{} is missing: run compat/setup (.ci/setup does) for the daemon lab test's host step",
            venv.display()
        );
        // Then this build's CLI and sandbox routes against the Linux guest
        // (lab/host/sandbox_api.py: streams, stdin, a terminal, files).
        lab.env(
            "LAB_HOST_STEP",
            format!(
                "{py} {mcp_step} {mcp} && {py} {api_step} {cli}",
                py = venv.join("python").display(),
                mcp_step = repo().join("compat/lab_linux.py").display(),
                mcp = venv.join("forkd-mcp").display(),
                api_step = repo().join("lab/host/sandbox_api.py").display(),
                cli = dir.join("forkd").display(),
            ),
        );
    }
    let status = lab.status().expect("cannot start lab/run");
    let secs = start.elapsed().as_secs();
    let what = match status.code() {
        Some(0) => {
            eprintln!("lab test {name}: PASS in {secs} s");
            return;
        }
        Some(1) => "the scenario failed (its LAB-RESULT line above says why)",
        Some(2) => "the lab could not be set up (the error is above)",
        Some(3) => "level 1 printed no result (crashed or timed out)",
        _ => "lab/run ended abnormally",
    };
    panic!("lab scenario {name}: {what}; lab/run exited with {status} after {secs} s");
}

#[test]
fn lab_linux_boot() {
    run_scenario("linux-boot");
}

#[test]
fn lab_linux_rootfs() {
    run_scenario("linux-rootfs");
}

/// forkd-agent as PID 1 over vsock: ping, exec, eval in the warm
/// interpreter, a file round trip (issues 4 and 5).
#[test]
fn lab_agent() {
    run_scenario("agent");
}

/// A Linux guest warmed, snapshotted and forked into 5 children that
/// answer from the warm interpreter and keep their writes apart (issue 6).
#[test]
fn lab_snapshot_fork() {
    run_scenario("snapshot-fork");
}

/// A Linux guest on memfd RAM branched live (and then diff) while a
/// process appends a counter to a file on its disk; 2 children of each
/// branch continue the count from the branch point, gap-free, while the
/// source runs on (issue 7).
#[test]
fn lab_branch_live() {
    run_scenario("branch-live");
}

/// forkd-daemon inside the lab serves a Linux snapshot over the v1 REST
/// API through the forkd CLI: snapshot once the agent answers, spawn,
/// exec, eval, a diff branch and a child of it (issue 8); then forkd-mcp on
/// the host makes a Linux snapshot through the lab's port forward and
/// drives its child (issue 15), and this build's CLI drives the sandbox
/// API on its children: a streamed exec, stdin to a running cat, python3
/// -i on a terminal, 200 MiB each way, env and cwd, a deadline (issue 18).
#[test]
fn lab_daemon() {
    run_scenario("daemon");
}

#[test]
fn every_lab_scenario_has_a_test() {
    let out = Command::new(repo().join("lab/run"))
        .arg("--list")
        .output()
        .expect("cannot start lab/run --list");
    assert!(out.status.success(), "lab/run --list failed: {out:?}");
    let listed: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect();
    let mut expected: Vec<String> = SCENARIOS.iter().map(|s| s.to_string()).collect();
    let mut got = listed.clone();
    expected.sort();
    got.sort();
    assert_eq!(
        got, expected,
        "lab/scenarios and the tests in crates/vmm-bin/tests/lab.rs differ: add a test per scenario"
    );
}
