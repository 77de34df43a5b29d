//! BRANCH benchmark: the pause window of a built-in guest that writes
//! continuously, over 20 branches per mode, next to its baseline measured
//! in the same run: a diff branch against a full branch of the same VM.
//!
//! - full: the guest stamps all of its warm memory; every branch writes it all.
//! - diff: the guest stamps a 10 MiB window (its working set); every branch
//!   writes what changed since the previous one.
//! - live, waiting (memfd RAM): the guest stamps all of its warm memory;
//!   RAM is pre-copied while it runs and the pause holds the CPU and device
//!   state and the pages dirtied since the last round.
//! - live, not waiting (`wait: false`): the pause holds the CPU state and
//!   the write-protect arm, the copy runs after under write protection.
//!   Baseline in the same run: the bare `UFFDIO_WRITEPROTECT` of the same
//!   amount of populated memfd memory, done by this process.
//! - both live modes on 2 MiB huge pages (memfd-hugetlb RAM; the benchmark
//!   reserves the huge pages and gives them back), with their own bare arm.
//!
//! For the live modes it also prints the longest write-protect stall the
//! copy recorded (fault read to release) and the longest stall of the guest
//! seen from outside: a thread of this benchmark reads the guest's stamp
//! counter from the VMM's memory (/proc/PID/mem) every ~20 us during each
//! branch request and keeps the longest time it did not move. That one
//! includes the pause itself and any time the vCPU thread waited for a CPU.
//!
//! Run: cargo build --release --workspace && target/release/branch [--mem-mib 1536] [--rounds 20]
//! [--modes full,diff,live,live-nowait,huge,huge-nowait]
//!
//! `--against OTHER_VMM`: instead, live `wait: false` branches of two
//! forkd-vmm builds (`--vmm` and OTHER_VMM), one VM each, in alternation:
//! only the VM being branched runs (the other is paused), and the order
//! flips every round, so the machine's drift falls on both alike. Prints
//! both pauses and the median of the paired differences.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bench::{ms, Stats};
use clap::Parser;
use proto::control::{ControlClient, ControlRequest, ControlResponse, SnapshotMode};
use proto::guest::GuestRequest;
use vmm::boot::builtin::abi;
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
    /// Modes to run, comma separated: full, diff, live, live-nowait, huge,
    /// huge-nowait (live on 2 MiB pages).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "full,diff,live,live-nowait,huge,huge-nowait"
    )]
    modes: Vec<String>,
    /// Print every live branch: its pause, answer time, and when in the
    /// request the guest's longest stall began.
    #[arg(long)]
    verbose: bool,
    /// Compare the live `wait: false` pause of `--vmm` with this forkd-vmm,
    /// paired (see the module docs); the modes are not run.
    #[arg(long)]
    against: Option<PathBuf>,
}

struct Vm {
    child: std::process::Child,
    client: ControlClient,
}

impl Vm {
    fn start(vmm: &Path, work: &Path, mem_mib: u64, backend: &str) -> Vm {
        let sock = work.join("vm.sock");
        let child = bench::start_builtin(vmm, &sock, mem_mib, &["--memory-backend", backend]);
        let client = bench::connect_control(&sock, Duration::from_secs(600));
        Vm { child, client }
    }

    fn control(&mut self, request: ControlRequest) {
        let r = self.client.call(&request).unwrap();
        assert!(matches!(r, ControlResponse::Ok), "{request:?}: {r:?}");
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

    /// Branches into `dir` (for live without `wait`, then waits for the
    /// copy to end); returns what the branch took.
    fn branch(&mut self, dir: &Path, mode: SnapshotMode, wait: bool) -> Branch {
        let req = ControlRequest::Snapshot {
            dir: dir.to_owned(),
            leave_paused: false,
            mode,
            wait,
            measure_diff: false,
        };
        let start = Instant::now();
        let (pause, meta) = match self.client.call(&req).unwrap() {
            ControlResponse::Snapshot {
                pause_ms: Some(ms),
                meta,
                ..
            } => (
                Duration::from_secs_f64(ms / 1e3),
                serde_json::to_value(meta).unwrap(),
            ),
            other => panic!("{mode:?} branch failed: {other:?}"),
        };
        let answered = start.elapsed();
        let meta = if wait { meta } else { wait_ready(dir) };
        let copy = &meta["live_copy"];
        Branch {
            pause,
            answered,
            fault_stall: copy["max_fault_stall_us"]
                .as_u64()
                .map(Duration::from_micros),
            takeovers: copy["takeovers"].as_u64().unwrap_or(0),
            residue_pages: copy["residue_pages"].as_u64(),
            rounds: copy["precopy_round_pages"].as_array().map(Vec::len),
        }
    }

    /// Nanoseconds the VMM's vCPU thread has spent waiting for a CPU
    /// (runnable, not running), from /proc/PID/task/TID/schedstat.
    fn vcpu_run_delay(&self) -> Duration {
        let pid = self.child.id();
        for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
            let dir = task.unwrap().path();
            let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
            if comm.trim() == "vcpu0" {
                let stat = std::fs::read_to_string(dir.join("schedstat")).unwrap();
                let wait: u64 = stat.split_whitespace().nth(1).unwrap().parse().unwrap();
                return Duration::from_nanos(wait);
            }
        }
        panic!("no vcpu0 thread in the VMM");
    }

    /// Where the guest's stamp counter is in this VMM process's memory.
    fn stamp_counter(&self) -> GuestWord {
        GuestWord::find(self.child.id(), abi::INFO_ADDR + abi::INFO_STAMP_COUNT)
    }
}

/// What one branch took.
struct Branch {
    /// The pause window, as forkd-vmm reports it.
    pause: Duration,
    /// From the request to the answer.
    answered: Duration,
    /// Live: the longest write-protect stall the copy recorded.
    fault_stall: Option<Duration>,
    /// Live: faults where the handler took pages over from the bulk copier.
    takeovers: u64,
    /// Live pre-copy: pages copied in the pause, and rounds before it.
    residue_pages: Option<u64>,
    rounds: Option<usize>,
}

/// Polls the snapshot in `dir` until its copy has ended; returns its metadata.
fn wait_ready(dir: &Path) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let meta: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("snapshot.json")).unwrap()).unwrap();
        match meta["status"].as_str() {
            Some("ready") => return meta,
            Some("writing") => {
                assert!(Instant::now() < deadline, "the live copy never finished");
                std::thread::sleep(Duration::from_millis(10));
            }
            other => panic!("the live copy ended {other:?}: {meta}"),
        }
    }
}

/// A word of guest RAM read from outside: through /proc/PID/mem of the
/// VMM process at the host address of its guest RAM mapping (the memfd
/// named `forkd-guest-ram`, low region at offset 0).
struct GuestWord {
    mem: std::fs::File,
    host_addr: u64,
}

impl GuestWord {
    fn find(pid: u32, guest_addr: u64) -> GuestWord {
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
        let base = maps
            .lines()
            .find_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.len() >= 6 && f[5].contains("forkd-guest-ram") && f[2] == "00000000")
                    .then(|| u64::from_str_radix(f[0].split('-').next().unwrap(), 16).unwrap())
            })
            .expect("the VMM's guest RAM mapping (memfd forkd-guest-ram)");
        let mem = std::fs::File::open(format!("/proc/{pid}/mem"))
            .expect("reading another process's memory needs root or ptrace rights");
        GuestWord {
            mem,
            host_addr: base + guest_addr,
        }
    }

    fn read(&self) -> u64 {
        use std::os::unix::fs::FileExt;
        let mut b = [0u8; 8];
        self.mem.read_exact_at(&mut b, self.host_addr).unwrap();
        u64::from_le_bytes(b)
    }
}

/// Samples a guest counter every ~20 us on a thread until
/// [`StallWatch::stop`]; keeps the longest time it surely did not change:
/// from the end of the first read that saw a value to the start of the
/// last read that saw the same value. (A read can itself be held up, e.g.
/// while the VMM walks its memfd with SEEK_HOLE; a held-up read that finds
/// the counter moved is not a stall of the guest.)
struct StallWatch {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<(Duration, Duration)>,
}

impl StallWatch {
    fn start(word: GuestWord) -> StallWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                // SAFETY: PR_SET_TIMERSLACK on this thread only; 1 ns slack
                // lets the short sleeps below be short.
                unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1, 0, 0, 0) };
                let start = Instant::now();
                // `since`: the end of the first read that saw `last`.
                let (mut last, mut since) = (word.read(), Instant::now());
                let (mut longest, mut began) = (Duration::ZERO, Duration::ZERO);
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_micros(20));
                    let before = Instant::now();
                    let v = word.read();
                    if v != last {
                        (last, since) = (v, Instant::now());
                    } else if before.saturating_duration_since(since) > longest {
                        (longest, began) = (before - since, since - start);
                    }
                }
                (longest, began)
            })
        };
        StallWatch { stop, thread }
    }

    /// The longest stall, and when it began after the start.
    fn stop(self) -> (Duration, Duration) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.client.call(&ControlRequest::Shutdown);
        let _ = self.child.wait();
    }
}

/// What `n` branches of one mode took.
struct Rounds {
    pause: Stats,
    /// Request to answer.
    answered: Stats,
    /// Live: per branch, the longest write-protect stall its copy recorded;
    /// and the takeovers of all of them.
    fault_stall: Option<Stats>,
    takeovers: u64,
    /// Live: per branch, the longest the guest's counter stood still during
    /// the request, seen from outside (includes the pause).
    guest_stall: Option<Stats>,
    /// Pre-copy: pages copied in the pause (median, max) and rounds (median).
    residue: Option<(u64, u64)>,
    precopy_rounds: Option<usize>,
}

impl std::fmt::Display for Rounds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "pause {}", self.pause)?;
        write!(f, "\n      answered after: {}", self.answered)?;
        if let Some(s) = &self.fault_stall {
            write!(
                f,
                "\n      longest write-protect stall per branch: {s}; takeovers from the bulk copier: {}",
                self.takeovers
            )?;
        }
        if let Some(s) = &self.guest_stall {
            write!(
                f,
                "\n      longest guest stall seen from outside (incl. pause): {s}"
            )?;
        }
        if let (Some((p50, max)), Some(r)) = (self.residue, self.precopy_rounds) {
            write!(
                f,
                "\n      pre-copy: {r} rounds (median), residue p50 {p50} pages, max {max} pages"
            )?;
        }
        Ok(())
    }
}

fn rounds(
    vm: &mut Vm,
    work: &Path,
    mode: SnapshotMode,
    wait: bool,
    n: usize,
    verbose: bool,
) -> Rounds {
    let mut branches = Vec::with_capacity(n);
    let mut guest_stalls = Vec::new();
    let mut previous: Option<PathBuf> = None;
    for i in 0..n {
        let dir = work.join(format!("{mode:?}-{wait}-{i}"));
        let watch = (mode == SnapshotMode::Live).then(|| StallWatch::start(vm.stamp_counter()));
        let delay0 = vm.vcpu_run_delay();
        let b = vm.branch(&dir, mode, wait);
        let run_delay = vm.vcpu_run_delay() - delay0;
        if let Some(w) = watch {
            let (stall, began) = w.stop();
            guest_stalls.push(stall);
            if verbose {
                println!(
                    "    {mode:?} wait {wait}: pause {:.3} ms, answered {:.1} ms, guest stall \
                     {:.3} ms from {:.1} ms, vCPU waited for a CPU {:.1} ms in all, residue \
                     {:?} after {:?} rounds",
                    ms(b.pause),
                    ms(b.answered),
                    ms(stall),
                    ms(began),
                    ms(run_delay),
                    b.residue_pages,
                    b.rounds
                );
            }
        }
        branches.push(b);
        // A diff stacks on the previous branch: keep one generation.
        if let Some(p) = previous.replace(dir) {
            let _ = std::fs::remove_dir_all(p);
        }
    }
    if let Some(p) = previous {
        let _ = std::fs::remove_dir_all(p);
    }
    let pauses: Vec<Duration> = branches.iter().map(|b| b.pause).collect();
    let answered: Vec<Duration> = branches.iter().map(|b| b.answered).collect();
    let mut residue: Vec<u64> = branches.iter().filter_map(|b| b.residue_pages).collect();
    residue.sort();
    let mut precopy_rounds: Vec<usize> = branches.iter().filter_map(|b| b.rounds).collect();
    precopy_rounds.sort();
    Rounds {
        pause: Stats::of(&pauses),
        answered: Stats::of(&answered),
        fault_stall: {
            let stalls: Vec<Duration> = branches.iter().filter_map(|b| b.fault_stall).collect();
            (!stalls.is_empty()).then(|| Stats::of(&stalls))
        },
        takeovers: branches.iter().map(|b| b.takeovers).sum(),
        guest_stall: (!guest_stalls.is_empty()).then(|| Stats::of(&guest_stalls)),
        residue: (!residue.is_empty())
            .then(|| (residue[residue.len() / 2], residue[residue.len() - 1])),
        precopy_rounds: (!precopy_rounds.is_empty())
            .then(|| precopy_rounds[precopy_rounds.len() / 2]),
    }
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

/// `--against`: the live `wait: false` pause of two builds, paired.
fn paired(args: &Args, vmm: &Path, against: &Path, work: &Path) {
    let dirs = [work.join("a"), work.join("b")];
    for d in &dirs {
        std::fs::create_dir_all(d).unwrap();
    }
    let mut vms = [
        warm_vm(vmm, &dirs[0], args, "memfd"),
        warm_vm(against, &dirs[1], args, "memfd"),
    ];
    vms[1].control(ControlRequest::Pause);
    let mut running = 0;
    let mut pauses = [Vec::new(), Vec::new()];
    for i in 0..args.rounds {
        let order = if i % 2 == 0 { [0, 1] } else { [1, 0] };
        for k in order {
            if running != k {
                vms[running].control(ControlRequest::Pause);
                vms[k].control(ControlRequest::Resume);
                running = k;
            }
            // The guest back at its writing before the branch.
            std::thread::sleep(Duration::from_millis(300));
            let dir = dirs[k].join(format!("branch-{i}"));
            let b = vms[k].branch(&dir, SnapshotMode::Live, false);
            pauses[k].push(b.pause);
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    let diffs: Vec<f64> = pauses[0]
        .iter()
        .zip(&pauses[1])
        .map(|(a, b)| ms(*a) - ms(*b))
        .collect();
    let mut sorted = diffs.clone();
    sorted.sort_by(f64::total_cmp);
    let above = diffs.iter().filter(|d| **d > 0.0).count();
    println!(
        "  live, wait: false, paired over {} rounds (guest rewriting {} MiB):\n    \
         {}: pause {}\n    {}: pause {}\n    \
         paired difference (first - second): median {:+.3} ms, first slower in {above} of {}",
        args.rounds,
        args.warm_mib,
        vmm.display(),
        Stats::of(&pauses[0]),
        against.display(),
        Stats::of(&pauses[1]),
        sorted[sorted.len() / 2],
        diffs.len()
    );
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
    if let Some(against) = &args.against {
        println!(
            "BRANCH pause window, built-in guest, {} MiB RAM ({} MiB warm), two builds paired",
            args.mem_mib, args.warm_mib
        );
        paired(&args, &vmm, against, &work);
        let _ = std::fs::remove_dir_all(&work);
        return;
    }
    let runs = |m: &str| args.modes.iter().any(|x| x == m);
    println!(
        "BRANCH pause window, built-in guest, {} MiB RAM ({} MiB warm), {} branches per mode",
        args.mem_mib, args.warm_mib, args.rounds
    );

    let mut full = None;
    if runs("full") || runs("diff") {
        // full: the guest rewrites all of its warm memory, pass after pass.
        let mut vm = warm_vm(&vmm, &work, &args, "anonymous");
        if runs("full") {
            let r = rounds(
                &mut vm,
                &work,
                SnapshotMode::Full,
                true,
                args.rounds,
                args.verbose,
            );
            println!("  full (guest rewriting {} MiB): {r}", args.warm_mib);
            full = Some(r.pause);
        }
        if runs("diff") {
            // diff: the guest's working set is a window; each branch stacks on the last.
            vm.guest(GuestRequest::StampStop);
            vm.guest(GuestRequest::StampStart {
                mib: args.diff_mib,
                offset_mib: 0,
            });
            let base = work.join("diff-base");
            vm.branch(&base, SnapshotMode::Full, true);
            let r = rounds(
                &mut vm,
                &work,
                SnapshotMode::Diff,
                true,
                args.rounds,
                args.verbose,
            );
            println!("  diff (guest rewriting {} MiB): {r}", args.diff_mib);
            if let Some(f) = full {
                println!(
                    "  diff / full (p50): {:.3}",
                    r.pause.p50.as_secs_f64() / f.p50.as_secs_f64()
                );
            }
            let _ = std::fs::remove_dir_all(&base);
        }
    }

    // live: memfd RAM, the guest rewriting all of its warm memory.
    // The floor of the guest stalls: the same sampling of the same guest
    // with no branch running (the machine's own scheduling noise).
    let quiet = |vm: &Vm| {
        let samples: Vec<Duration> = (0..args.rounds)
            .map(|_| {
                let w = StallWatch::start(vm.stamp_counter());
                std::thread::sleep(Duration::from_millis(500));
                w.stop().0
            })
            .collect();
        println!(
            "  longest guest stall with no branch running (same sampling, {} x 0.5 s): {}",
            args.rounds,
            Stats::of(&samples)
        );
    };
    let live = |vm: &mut Vm, what: &str, wait: bool| {
        let r = rounds(
            vm,
            &work,
            SnapshotMode::Live,
            wait,
            args.rounds,
            args.verbose,
        );
        println!("  {what} (guest rewriting {} MiB): {r}", args.warm_mib);
        r.pause
    };
    let mut live_4k = None;
    if runs("live") || runs("live-nowait") {
        let mut vm = warm_vm(&vmm, &work, &args, "memfd");
        quiet(&vm);
        if runs("live") {
            live_4k = Some(live(&mut vm, "live, waiting: pre-copy", true));
        }
        if runs("live-nowait") {
            live(&mut vm, "live, wait: false: write-protect copy", false);
        }
        drop(vm);
        let bare = bare_wp_arm(args.warm_mib, args.rounds, Backend::Memfd);
        println!(
            "  bare write-protect arm of {} MiB populated memfd (no VM): {bare}",
            args.warm_mib
        );
    }

    if runs("huge") || runs("huge-nowait") {
        // 2 MiB huge pages (reserved here, given back at the end).
        let reserve = std::fs::read_to_string("/proc/sys/vm/nr_hugepages").unwrap_or_default();
        let pages = args.mem_mib / 2 + 64;
        std::fs::write("/proc/sys/vm/nr_hugepages", pages.to_string())
            .expect("reserving huge pages needs root");
        let mut vm = warm_vm(&vmm, &work, &args, "memfd-hugetlb");
        quiet(&vm);
        if runs("huge") {
            let huge = live(&mut vm, "live on 2 MiB pages, waiting: pre-copy", true);
            if let Some(l) = live_4k {
                println!(
                    "  pre-copy, huge / 4 KiB pages (p50): {:.2}",
                    huge.p50.as_secs_f64() / l.p50.as_secs_f64()
                );
            }
        }
        if runs("huge-nowait") {
            live(
                &mut vm,
                "live on 2 MiB pages, wait: false: write-protect copy",
                false,
            );
        }
        drop(vm);
        let huge_bare = bare_wp_arm(args.warm_mib, args.rounds, Backend::HugeMemfd);
        let _ = std::fs::write("/proc/sys/vm/nr_hugepages", reserve.trim());
        println!("  bare write-protect arm, huge pages (no VM): {huge_bare}");
    }
    let _ = std::fs::remove_dir_all(&work);
}
