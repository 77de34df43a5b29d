//! BRANCH benchmark: the pause window of a built-in guest that writes
//! continuously, over 20 branches per mode, next to its baseline measured
//! in the same run: a diff branch against a full branch of the same VM.
//!
//! - full: the guest stamps all of its warm memory; every branch writes it all.
//! - diff: the guest stamps a 10 MiB window (its working set); every branch
//!   writes what changed since the previous one.
//!
//! Run: cargo build --release --workspace && target/release/branch [--mem-mib 1536] [--rounds 20]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use bench::Stats;
use clap::Parser;
use proto::control::{ControlClient, ControlRequest, ControlResponse, SnapshotMode};
use proto::guest::GuestRequest;

#[derive(Parser)]
struct Args {
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 1536)]
    mem_mib: u64,
    /// MiB the guest fills before branching (its warm state).
    #[arg(long, default_value_t = 1400)]
    warm_mib: u64,
    /// MiB the guest keeps writing during diff branches.
    #[arg(long, default_value_t = 10)]
    diff_mib: u64,
    /// Branches per mode.
    #[arg(long, default_value_t = 20)]
    rounds: usize,
    /// Directory for the snapshots (default: the system temp dir).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// forkd-vmm binary (default: next to this benchmark).
    #[arg(long)]
    vmm: Option<PathBuf>,
}

struct Vm {
    child: std::process::Child,
    client: ControlClient,
}

impl Vm {
    fn start(vmm: &Path, work: &Path, mem_mib: u64) -> Vm {
        let sock = work.join("vm.sock");
        let child = Command::new(vmm)
            .args([
                "run",
                "--builtin",
                "--console",
                "none",
                "--mem-mib",
                &mem_mib.to_string(),
            ])
            .arg("--control-socket")
            .arg(&sock)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn forkd-vmm");
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let client = loop {
            match ControlClient::connect(&sock, Duration::from_secs(600)) {
                Ok(c) => break c,
                Err(e) => {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "forkd-vmm did not start: {e}"
                    );
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
        };
        Vm { child, client }
    }

    fn guest(&mut self, request: GuestRequest) {
        let r = self
            .client
            .call(&ControlRequest::Guest {
                request,
                timeout_ms: Some(600_000),
            })
            .unwrap();
        assert!(matches!(r, ControlResponse::Guest { .. }), "{r:?}");
    }

    /// Branches into `dir` and returns the pause window.
    fn branch(&mut self, dir: &Path, mode: SnapshotMode) -> Duration {
        let req = ControlRequest::Snapshot {
            dir: dir.to_owned(),
            leave_paused: false,
            mode,
            wait: true,
        };
        match self.client.call(&req).unwrap() {
            ControlResponse::Snapshot {
                pause_ms: Some(ms), ..
            } => Duration::from_secs_f64(ms / 1e3),
            other => panic!("{mode:?} branch failed: {other:?}"),
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.client.call(&ControlRequest::Shutdown);
        let _ = self.child.wait();
    }
}

fn rounds(vm: &mut Vm, work: &Path, mode: SnapshotMode, n: usize) -> Stats {
    let mut pauses = Vec::with_capacity(n);
    let mut previous: Option<PathBuf> = None;
    for i in 0..n {
        let dir = work.join(format!("{mode:?}-{i}"));
        pauses.push(vm.branch(&dir, mode));
        // A diff stacks on the previous branch: keep one generation.
        if let Some(p) = previous.replace(dir) {
            let _ = std::fs::remove_dir_all(p);
        }
    }
    if let Some(p) = previous {
        let _ = std::fs::remove_dir_all(p);
    }
    Stats::of(&pauses)
}

fn main() {
    let args = Args::parse();
    let vmm = args
        .vmm
        .unwrap_or_else(|| std::env::current_exe().unwrap().with_file_name("forkd-vmm"));
    assert!(
        vmm.exists(),
        "{} not found: cargo build --release --workspace",
        vmm.display()
    );
    let work = args
        .work_dir
        .unwrap_or_else(std::env::temp_dir)
        .join(format!("forkd-bench-branch-{}", std::process::id()));
    std::fs::create_dir_all(&work).unwrap();

    let mut vm = Vm::start(&vmm, &work, args.mem_mib);
    vm.guest(GuestRequest::Fill {
        seed: 1,
        seq: 1,
        mib: args.warm_mib,
        offset_mib: 0,
    });

    // full: the guest rewrites all of its warm memory, pass after pass.
    vm.guest(GuestRequest::StampStart {
        mib: args.warm_mib,
        offset_mib: 0,
    });
    let full = rounds(&mut vm, &work, SnapshotMode::Full, args.rounds);
    vm.guest(GuestRequest::StampStop);

    // diff: the guest's working set is a window; each branch stacks on the last.
    vm.guest(GuestRequest::StampStart {
        mib: args.diff_mib,
        offset_mib: 0,
    });
    let base = work.join("diff-base");
    vm.branch(&base, SnapshotMode::Full);
    let diff = rounds(&mut vm, &work, SnapshotMode::Diff, args.rounds);
    let _ = std::fs::remove_dir_all(&base);
    drop(vm);

    println!(
        "BRANCH pause window, built-in guest, {} MiB RAM ({} MiB warm), {} branches per mode",
        args.mem_mib, args.warm_mib, args.rounds
    );
    println!("  full (guest rewriting {} MiB):  {full}", args.warm_mib);
    println!("  diff (guest rewriting {} MiB):    {diff}", args.diff_mib);
    println!(
        "  diff / full (p50): {:.3}",
        diff.p50.as_secs_f64() / full.p50.as_secs_f64()
    );
    let _ = std::fs::remove_dir_all(&work);
}
