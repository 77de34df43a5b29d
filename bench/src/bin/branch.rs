//! BRANCH benchmark: the pause window of a built-in guest that writes
//! continuously, over 20 branches per mode, next to its baseline measured
//! in the same run: a diff branch against a full branch of the same VM.
//!
//! - full: the guest stamps all of its warm memory; every branch writes it all.
//! - diff: the guest stamps a 10 MiB window (its working set); every branch
//!   writes what changed since the previous one.
//! - live (memfd RAM): the guest stamps all of its warm memory; the pause
//!   holds the CPU state and the write-protect arm, the copy runs after.
//!   Baseline in the same run: the bare `UFFDIO_WRITEPROTECT` of the same
//!   amount of populated memfd memory, done by this process.
//! - live on 2 MiB huge pages (memfd-hugetlb RAM; the benchmark reserves the
//!   huge pages and gives them back): the same, with its own bare arm.
//!
//! Run: cargo build --release --workspace && target/release/branch [--mem-mib 1536] [--rounds 20]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use bench::Stats;
use clap::Parser;
use proto::control::{ControlClient, ControlRequest, ControlResponse, SnapshotMode};
use proto::guest::GuestRequest;
use vmm::memory::uffd::Uffd;
use vmm::memory::{Backend, GuestRam};

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
    fn start(vmm: &Path, work: &Path, mem_mib: u64, backend: &str) -> Vm {
        let sock = work.join("vm.sock");
        let child = Command::new(vmm)
            .args([
                "run",
                "--builtin",
                "--console",
                "none",
                "--mem-mib",
                &mem_mib.to_string(),
                "--memory-backend",
                backend,
            ])
            .arg("--control-socket")
            .arg(&sock)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn forkd-vmm");
        let client = bench::connect_control(&sock, Duration::from_secs(600));
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

    /// Branches into `dir`; returns the pause window and, for live, the
    /// longest write-protect stall of the copy.
    fn branch(&mut self, dir: &Path, mode: SnapshotMode) -> (Duration, Option<Duration>) {
        let req = ControlRequest::Snapshot {
            dir: dir.to_owned(),
            leave_paused: false,
            mode,
            wait: true,
        };
        match self.client.call(&req).unwrap() {
            ControlResponse::Snapshot {
                pause_ms: Some(ms),
                meta,
            } => (
                Duration::from_secs_f64(ms / 1e3),
                meta["live_copy"]["max_fault_stall_us"]
                    .as_u64()
                    .map(Duration::from_micros),
            ),
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

fn rounds(vm: &mut Vm, work: &Path, mode: SnapshotMode, n: usize) -> (Stats, Option<Duration>) {
    let mut pauses = Vec::with_capacity(n);
    let mut stall: Option<Duration> = None;
    let mut previous: Option<PathBuf> = None;
    for i in 0..n {
        let dir = work.join(format!("{mode:?}-{i}"));
        let (pause, s) = vm.branch(&dir, mode);
        pauses.push(pause);
        stall = stall.max(s);
        // A diff stacks on the previous branch: keep one generation.
        if let Some(p) = previous.replace(dir) {
            let _ = std::fs::remove_dir_all(p);
        }
    }
    if let Some(p) = previous {
        let _ = std::fs::remove_dir_all(p);
    }
    (Stats::of(&pauses), stall)
}

/// The bare write-protect arm of `mib` MiB of populated memfd memory of
/// `backend`, `n` times (each undone before the next).
fn bare_wp_arm(mib: u64, n: usize, backend: Backend) -> Stats {
    use vm_memory::{Bytes, GuestAddress};
    let ram = GuestRam::new(mib, backend).expect("memfd RAM");
    let page = [0x5au8; 4096];
    for (gpa, _, len) in ram.slots() {
        for off in (0..len).step_by(4096) {
            ram.memory()
                .write_slice(&page, GuestAddress(gpa + off))
                .unwrap();
        }
    }
    let uffd = Uffd::new().expect("userfaultfd write-protect");
    for (_, host, len) in ram.slots() {
        uffd.register_wp(host, len).unwrap();
    }
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let start = std::time::Instant::now();
        for (_, host, len) in ram.slots() {
            uffd.write_protect(host, len, true).unwrap();
        }
        samples.push(start.elapsed());
        for (_, host, len) in ram.slots() {
            uffd.write_protect(host, len, false).unwrap();
        }
    }
    Stats::of(&samples)
}

/// A VM of `backend` RAM whose guest has filled its warm memory and keeps
/// rewriting all of it, pass after pass.
fn warm_vm(vmm: &Path, work: &Path, args: &Args, backend: &str) -> Vm {
    let mut vm = Vm::start(vmm, work, args.mem_mib, backend);
    vm.guest(GuestRequest::Fill {
        seed: 1,
        seq: 1,
        mib: args.warm_mib,
        offset_mib: 0,
    });
    vm.guest(GuestRequest::StampStart {
        mib: args.warm_mib,
        offset_mib: 0,
    });
    vm
}

fn main() {
    let args = Args::parse();
    let vmm = bench::vmm_binary(args.vmm.clone());
    let work = args
        .work_dir
        .clone()
        .unwrap_or_else(std::env::temp_dir)
        .join(format!("forkd-bench-branch-{}", std::process::id()));
    std::fs::create_dir_all(&work).unwrap();

    // full: the guest rewrites all of its warm memory, pass after pass.
    let mut vm = warm_vm(&vmm, &work, &args, "anonymous");
    let (full, _) = rounds(&mut vm, &work, SnapshotMode::Full, args.rounds);
    vm.guest(GuestRequest::StampStop);

    // diff: the guest's working set is a window; each branch stacks on the last.
    vm.guest(GuestRequest::StampStart {
        mib: args.diff_mib,
        offset_mib: 0,
    });
    let base = work.join("diff-base");
    vm.branch(&base, SnapshotMode::Full);
    let (diff, _) = rounds(&mut vm, &work, SnapshotMode::Diff, args.rounds);
    let _ = std::fs::remove_dir_all(&base);
    drop(vm);

    // live: memfd RAM, the guest rewriting all of its warm memory.
    let mut vm = warm_vm(&vmm, &work, &args, "memfd");
    let (live, stall) = rounds(&mut vm, &work, SnapshotMode::Live, args.rounds);
    drop(vm);
    let bare = bare_wp_arm(args.warm_mib, args.rounds, Backend::Memfd);

    // live on 2 MiB huge pages (reserved here, given back at the end).
    let reserve = std::fs::read_to_string("/proc/sys/vm/nr_hugepages").unwrap_or_default();
    let pages = args.mem_mib / 2 + 64;
    std::fs::write("/proc/sys/vm/nr_hugepages", pages.to_string())
        .expect("reserving huge pages needs root");
    let mut vm = warm_vm(&vmm, &work, &args, "memfd-hugetlb");
    let (huge, huge_stall) = rounds(&mut vm, &work, SnapshotMode::Live, args.rounds);
    drop(vm);
    let huge_bare = bare_wp_arm(args.warm_mib, args.rounds, Backend::HugeMemfd);
    let _ = std::fs::write("/proc/sys/vm/nr_hugepages", reserve.trim());

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
    println!("  live (guest rewriting {} MiB):  {live}", args.warm_mib);
    println!(
        "  live copy: longest write-protect stall {:.3} ms",
        stall.map_or(0.0, |d| d.as_secs_f64() * 1e3)
    );
    println!(
        "  bare write-protect arm of {} MiB populated memfd: {bare}",
        args.warm_mib
    );
    println!(
        "  live / bare arm (p50): {:.2}; live / full (p50): {:.4}",
        live.p50.as_secs_f64() / bare.p50.as_secs_f64(),
        live.p50.as_secs_f64() / full.p50.as_secs_f64()
    );
    println!("  live on 2 MiB huge pages:       {huge}");
    println!(
        "  live copy on huge pages: longest write-protect stall {:.3} ms",
        huge_stall.map_or(0.0, |d| d.as_secs_f64() * 1e3)
    );
    println!("  bare write-protect arm, huge pages: {huge_bare}");
    println!(
        "  huge live / 4 KiB live (p50): {:.4}; huge live / full (p50): {:.5}",
        huge.p50.as_secs_f64() / live.p50.as_secs_f64(),
        huge.p50.as_secs_f64() / full.p50.as_secs_f64()
    );
    let _ = std::fs::remove_dir_all(&work);
}
