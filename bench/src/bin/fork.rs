//! Fork benchmark: N children of a built-in-guest snapshot, wall clock from
//! the fork request to a running `forkd-vmm fork-server` (the snapshot
//! already parsed, as the daemon keeps it) until every child has answered
//! ping, and each child's private memory once all are up; next to the
//! bare-KVM floor for the same N and memory size, measured in the same run
//! (N VMs created one after another in one thread: create VM, memslot,
//! irqchip, vCPU, set registers).
//!
//! Two figures per size: cold (every child forked on request) and pooled
//! (`fork-server --pool N`, full when the request comes: the children's
//! KVM VMs, memory slots and vCPUs were made ahead; the request hands them
//! out). For the pool it also reports how long it takes to refill after
//! the answer and what a parked child holds while it waits. Each run
//! measures the floor, cold and pooled in turn; with `--runs R` the medians
//! follow.
//!
//! With `--unjailed-too`, each run measures cold and pooled children again
//! from a fork server started with `--jail=off` (children that stay root in
//! the host's mount namespace, under the same seccomp filters): what the
//! jail costs, in the same run.
//!
//! Run: cargo build --release --workspace && target/release/fork [--children 100] [--mem-mib 128 1024] [--runs 5] [--unjailed-too]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bench::{bare_kvm_vm, ms};
use clap::Parser;
use proto::control::{
    ControlClient, ControlRequest, ControlResponse, ForkRequest, ForkResponse, SnapshotMode,
};
use proto::guest::GuestRequest;

#[derive(Parser)]
struct Args {
    /// Children per run.
    #[arg(long, default_value_t = 100)]
    children: u32,
    /// Guest memory sizes to measure, in MiB.
    #[arg(long, num_args = 1.., default_values_t = [128u64, 1024])]
    mem_mib: Vec<u64>,
    /// MiB the parent writes before the snapshot (its warm state).
    #[arg(long, default_value_t = 32)]
    warm_mib: u64,
    /// forkd-vmm binary (default: next to this benchmark).
    #[arg(long)]
    vmm: Option<PathBuf>,
    /// Runs per size (each: floor, cold, pooled); medians are printed after.
    #[arg(long, default_value_t = 1)]
    runs: u32,
    /// Skip the pooled measurement.
    #[arg(long)]
    no_pool: bool,
    /// Skip the cold measurement (the floor and the pool only: quicker,
    /// and a profile of the run sees only pooled children).
    #[arg(long, conflicts_with = "no_pool")]
    no_cold: bool,
    /// Where the children's directories (control socket, log) go: a
    /// directory under this one (default: the system temp dir). Each child
    /// creates a directory, a socket and a log file, so the file system's
    /// cost of creating files is part of the figure.
    #[arg(long)]
    out_dir: Option<PathBuf>,
    /// Also measure cold and pooled children with the jail off.
    #[arg(long)]
    unjailed_too: bool,
}

/// One run's figures.
#[derive(Clone, Copy, Default)]
struct Run {
    floor: Duration,
    cold: Option<Duration>,
    pooled: Option<Duration>,
    refill: Option<Duration>,
    /// The same with the jail off (`--unjailed-too`).
    cold_off: Option<Duration>,
    pooled_off: Option<Duration>,
}

/// CPU time spent on a request, from the kernel's per-thread accounting:
/// a figure the other processes on a shared machine move much less than
/// the wall clock (they take CPUs away, not add work).
#[derive(Clone, Copy, Default)]
struct Cpu {
    /// The fork server, from the request to its answer.
    server: Duration,
    /// The children, from the request (or, pooled, from parking) until
    /// all answered.
    children: Duration,
    /// When the fork server's answer came (the rest is the children
    /// starting and answering their pings).
    answer: Duration,
}

fn main() {
    let args = Args::parse();
    let vmm = bench::vmm_binary(args.vmm);
    let kvm = kvm_ioctls::Kvm::new().expect("this benchmark needs /dev/kvm");
    let name = format!("forkd-bench-fork-{}", std::process::id());
    // Snapshots stay on the temp dir's file system whatever --out-dir says:
    // children map their memory file.
    let work = std::env::temp_dir().join(&name);
    let kids_root = args
        .out_dir
        .as_ref()
        .map_or_else(|| work.clone(), |d| d.join(&name));
    std::fs::create_dir_all(&kids_root).unwrap();
    std::fs::create_dir_all(&work).unwrap();

    for &mem_mib in &args.mem_mib {
        let snap = work.join(format!("snap-{mem_mib}"));
        make_snapshot(&vmm, &work, &snap, mem_mib, args.warm_mib);
        println!(
            "fork {} children, built-in guest, {mem_mib} MiB ({} MiB warm), children's directories in {}",
            args.children,
            args.warm_mib,
            kids_root.display()
        );
        let mut runs = Vec::new();
        for run in 0..args.runs.max(1) {
            let (floor, floor_cpu) = floor(&kvm, args.children, mem_mib);
            let out = kids_root.join(format!("kids-{mem_mib}-{run}"));

            let n = f64::from(args.children);
            println!(
                "  run {}: bare-KVM floor, {} VMs in one thread: {:>8.1} ms (CPU {:.0} us a VM)",
                run + 1,
                args.children,
                ms(floor),
                ms(floor_cpu) * 1e3 / n
            );
            let cpu_line = |c: Cpu| {
                format!(
                    "answer at {:.1} ms; CPU a child: server {:.0} us + child {:.0} us",
                    ms(c.answer),
                    ms(c.server) * 1e3 / n,
                    ms(c.children) * 1e3 / n
                )
            };
            let mut this = Run {
                floor,
                ..Run::default()
            };
            // Private memory of running children: the cold ones', else the pooled ones'.
            let mut private: Vec<u64> = Vec::new();
            let modes: &[bool] = if args.unjailed_too {
                &[true, false]
            } else {
                &[true]
            };
            for &jailed in modes {
                let (label, note, extra): (&str, &str, &[&str]) = if jailed {
                    ("", "", &[])
                } else {
                    ("nojail-", " (jail off)", &["--jail=off"])
                };
                if !args.no_cold {
                    let server = Server::start(
                        &vmm,
                        &snap,
                        &out.with_extension(format!("{label}fork.sock")),
                        0,
                        extra,
                    );
                    server.warm_up(&out.join(format!("{label}warm")));
                    let (cold, cold_cpu, pids, clients) =
                        server.fork_and_ping(args.children, &out.join(format!("{label}cold")));
                    private = pids.iter().map(|&p| private_bytes(p)).collect();
                    shut_down(clients, &pids);
                    server.stop();
                    *if jailed {
                        &mut this.cold
                    } else {
                        &mut this.cold_off
                    } = Some(cold);
                    println!(
                        "    cold{note}:   request to all answering   {:>8.1} ms  {:.2}x the floor  ({})",
                        ms(cold),
                        ms(cold) / ms(floor),
                        cpu_line(cold_cpu)
                    );
                }
                if !args.no_pool {
                    let before = kernel_memory_bytes();
                    let server = Server::start(
                        &vmm,
                        &snap,
                        &out.with_extension(format!("{label}pool.sock")),
                        args.children,
                        extra,
                    );
                    let parked = server.wait_parked(args.children as usize, &[]);
                    // Settle: the last parked child may still be finishing up.
                    std::thread::sleep(Duration::from_millis(200));
                    let kernel = kernel_memory_bytes().saturating_sub(before);
                    let parked_private: u64 = parked.iter().map(|&p| private_bytes(p)).sum();
                    let (pooled, pooled_cpu, pids, clients) =
                        server.fork_and_ping(args.children, &out.join(format!("{label}pooled")));
                    if private.is_empty() {
                        private = pids.iter().map(|&p| private_bytes(p)).collect();
                    }
                    let refill_from = server.last_answer.get();
                    server.wait_parked(args.children as usize, &pids);
                    let refill = refill_from.map(|t| t.elapsed());
                    shut_down(clients, &pids);
                    server.stop();
                    if jailed {
                        this.pooled = Some(pooled);
                        this.refill = refill;
                    } else {
                        this.pooled_off = Some(pooled);
                    }
                    println!(
                        "    pooled{note}: request to all answering   {:>8.1} ms  {:.2}x the floor  ({})",
                        ms(pooled),
                        ms(pooled) / ms(floor),
                        cpu_line(pooled_cpu)
                    );
                    if let Some(r) = refill {
                        println!(
                            "    pool refilled ({} children) {:.1} ms after the answer",
                            args.children,
                            ms(r)
                        );
                    }
                    println!(
                        "    a parked child holds {:.0} KiB private memory and about {:.0} KiB of kernel memory (VM, memory slot, vCPU, page tables)",
                        parked_private as f64 / parked.len() as f64 / 1024.0,
                        kernel as f64 / parked.len() as f64 / 1024.0
                    );
                }
            }
            if let Some(&max) = private.iter().max() {
                let avg = private.iter().sum::<u64>() as f64 / private.len() as f64;
                println!(
                    "    private memory per running child: avg {:.0} KiB, max {} KiB",
                    avg / 1024.0,
                    max / 1024
                );
            }
            runs.push(this);
            let _ = std::fs::remove_dir_all(&out);
        }
        if runs.len() > 1 {
            let median = |f: &dyn Fn(&Run) -> Option<Duration>| -> Option<Duration> {
                let mut v: Vec<Duration> = runs.iter().filter_map(f).collect();
                v.sort();
                (!v.is_empty()).then(|| v[v.len() / 2])
            };
            let floor = median(&|r| Some(r.floor)).unwrap();
            let ratios = |f: &dyn Fn(&Run) -> Option<Duration>| -> Option<f64> {
                let mut v: Vec<f64> = runs
                    .iter()
                    .filter_map(|r| f(r).map(|d| ms(d) / ms(r.floor)))
                    .collect();
                v.sort_by(f64::total_cmp);
                (!v.is_empty()).then(|| v[v.len() / 2])
            };
            println!("  medians of {} runs:", runs.len());
            println!("    floor  {:>8.1} ms", ms(floor));
            if let (Some(c), Some(ratio)) = (median(&|r| r.cold), ratios(&|r| r.cold)) {
                println!("    cold   {:>8.1} ms  (median ratio {ratio:.2}x)", ms(c));
            }
            if let (Some(p), Some(ratio)) = (median(&|r| r.pooled), ratios(&|r| r.pooled)) {
                println!("    pooled {:>8.1} ms  (median ratio {ratio:.2}x)", ms(p));
            }
            if let Some(r) = median(&|r| r.refill) {
                println!("    refill {:>8.1} ms", ms(r));
            }
            // The jail's cost: each run's jailed figure over its unjailed one.
            let jail_ratio = |on: &dyn Fn(&Run) -> Option<Duration>,
                              off: &dyn Fn(&Run) -> Option<Duration>|
             -> Option<(Duration, f64)> {
                let mut v: Vec<f64> = runs
                    .iter()
                    .filter_map(|r| Some(ms(on(r)?) / ms(off(r)?)))
                    .collect();
                v.sort_by(f64::total_cmp);
                Some((median(off)?, *v.get(v.len() / 2)?))
            };
            if let Some((c, ratio)) = jail_ratio(&|r| r.cold, &|r| r.cold_off) {
                println!(
                    "    cold, jail off   {:>8.1} ms  (median jailed/unjailed {ratio:.2}x)",
                    ms(c)
                );
            }
            if let Some((p, ratio)) = jail_ratio(&|r| r.pooled, &|r| r.pooled_off) {
                println!(
                    "    pooled, jail off {:>8.1} ms  (median jailed/unjailed {ratio:.2}x)",
                    ms(p)
                );
            }
        }
        let _ = std::fs::remove_dir_all(&snap);
    }
    let _ = std::fs::remove_dir_all(&work);
    let _ = std::fs::remove_dir_all(&kids_root);
}

/// Boots a parent, writes `warm_mib` of memory, snapshots it paused.
fn make_snapshot(vmm: &Path, work: &Path, snap: &Path, mem_mib: u64, warm_mib: u64) {
    let sock = work.join("parent.sock");
    let mut parent = bench::start_builtin(vmm, &sock, mem_mib, &[]);
    let mut c = bench::connect_control(&sock, Duration::from_secs(60));
    let fill = GuestRequest::Fill {
        seed: 1,
        seq: 1,
        mib: warm_mib,
        offset_mib: 0,
    };
    expect_ok(
        c.call(&ControlRequest::Guest {
            request: fill,
            timeout_ms: Some(60_000),
        })
        .unwrap(),
    );
    expect_ok(
        c.call(&ControlRequest::Snapshot {
            dir: snap.to_owned(),
            leave_paused: true,
            mode: SnapshotMode::Full,
            wait: true,
            measure_diff: false,
        })
        .unwrap(),
    );
    let _ = c.call(&ControlRequest::Shutdown);
    let _ = parent.wait();
}

/// N bare VMs of `mem_mib`, created one after another and kept until all exist.
/// Returns the wall clock and this thread's CPU time.
fn floor(kvm: &kvm_ioctls::Kvm, n: u32, mem_mib: u64) -> (Duration, Duration) {
    // Warm-up VM, not counted.
    drop(bare_kvm_vm(kvm, (mem_mib as usize) << 20));
    let start = Instant::now();
    let cpu = thread_cpu();
    let vms: Vec<_> = (0..n)
        .map(|_| bare_kvm_vm(kvm, (mem_mib as usize) << 20).1)
        .collect();
    let (elapsed, cpu) = (start.elapsed(), thread_cpu() - cpu);
    drop(vms);
    (elapsed, cpu)
}

/// CPU time of the calling thread.
fn thread_cpu() -> Duration {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `t` is a valid timespec for the call to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}

/// CPU time of every live thread of process `pid` (from schedstat).
fn process_cpu(pid: i32) -> Duration {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Duration::ZERO;
    };
    let ns: u64 = tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    Duration::from_nanos(ns)
}

/// A `forkd-vmm fork-server` on the benchmark's snapshot.
struct Server {
    child: std::process::Child,
    sock: PathBuf,
    /// When the last answer came.
    last_answer: std::cell::Cell<Option<Instant>>,
}

impl Server {
    fn start(vmm: &Path, snap: &Path, sock: &Path, pool: u32, extra: &[&str]) -> Server {
        let child = Command::new(vmm)
            .args(["fork-server", "--snapshot"])
            .arg(snap)
            .arg("--socket")
            .arg(sock)
            // Left out when 0: the option is new, older binaries refuse it.
            .args((pool > 0).then(|| format!("--pool={pool}")))
            .args(extra)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn forkd-vmm fork-server");
        Server {
            child,
            sock: sock.to_owned(),
            last_answer: std::cell::Cell::new(None),
        }
    }

    fn ask(&self, req: &ForkRequest) -> ForkResponse {
        let answer = bench::ask_fork_server(&self.sock, req);
        self.last_answer.set(Some(Instant::now()));
        answer
    }

    /// One child, so the server is up (its snapshot parsed) before a clock
    /// starts; shut down at once.
    fn warm_up(&self, out: &Path) {
        match self.ask(&bench::fork_request(1, out)) {
            ForkResponse::Forked { children } => {
                let mut c =
                    bench::connect_control(&children[0].control_socket, Duration::from_secs(10));
                let _ = c.call(&ControlRequest::Shutdown);
            }
            other => panic!("fork failed: {other:?}"),
        }
    }

    /// Forks `n` children under `out` and pings each (two client threads,
    /// one per core): the time from the request until all answered, the
    /// CPU it took, the children's pids, and their open control connections.
    fn fork_and_ping(&self, n: u32, out: &Path) -> (Duration, Cpu, Vec<i32>, Vec<ControlClient>) {
        // A pooled child did part of its work before the request.
        let server_pid = self.child.id() as i32;
        let before: std::collections::HashMap<i32, Duration> = children_of(server_pid)
            .into_iter()
            .map(|p| (p, process_cpu(p)))
            .collect();
        let server_before = process_cpu(server_pid);
        let start = Instant::now();
        let answer = self.ask(&bench::fork_request(n, out));
        let answered = start.elapsed();
        // Before the pool's refill adds to it.
        let server_cpu = process_cpu(server_pid).saturating_sub(server_before);
        let children: Vec<(i32, PathBuf)> = match answer {
            ForkResponse::Forked { children } => children
                .into_iter()
                .map(|c| (c.pid, c.control_socket))
                .collect(),
            other => panic!("fork failed: {other:?}"),
        };
        let sockets: Vec<&Path> = children.iter().map(|(_, s)| s.as_path()).collect();
        let clients = bench::ping_all(&sockets);
        let wall = start.elapsed();
        let children_cpu = children
            .iter()
            .map(|&(p, _)| {
                process_cpu(p).saturating_sub(before.get(&p).copied().unwrap_or_default())
            })
            .sum();
        let cpu = Cpu {
            server: server_cpu,
            children: children_cpu,
            answer: answered,
        };
        (wall, cpu, children.iter().map(|c| c.0).collect(), clients)
    }

    /// Waits until `n` of the server's children (other than `handed`) are
    /// parked in its pool; returns their pids.
    fn wait_parked(&self, n: usize, handed: &[i32]) -> Vec<i32> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let parked: Vec<i32> = children_of(self.child.id() as i32)
                .into_iter()
                .filter(|p| !handed.contains(p))
                .filter(|p| {
                    std::fs::read_to_string(format!("/proc/{p}/comm"))
                        .is_ok_and(|c| c.trim() == "forkd-pooled")
                })
                .collect();
            if parked.len() >= n {
                return parked;
            }
            assert!(
                Instant::now() < deadline,
                "the pool did not fill: {} of {n} parked",
                parked.len()
            );
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Stops the server and waits until the children it still has (a
    /// pool's parked children, which exit with it) are gone: the next
    /// measurement must not share the machine with 100 VMs' teardown.
    /// Children handed out run on (shut them down first).
    fn stop(mut self) {
        let parked = children_of(self.child.id() as i32);
        let _ = self.ask(&ForkRequest::Shutdown);
        let _ = self.child.wait();
        wait_gone(&parked);
    }
}

/// The child processes of `pid`.
fn children_of(pid: i32) -> Vec<i32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// Shuts the children down and waits until they are gone.
fn shut_down(clients: Vec<ControlClient>, pids: &[i32]) {
    for mut c in clients {
        let _ = c.call(&ControlRequest::Shutdown);
    }
    wait_gone(pids);
}

/// Waits (up to 10 s) until none of `pids` exists any more.
fn wait_gone(pids: &[i32]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while pids
        .iter()
        .any(|p| Path::new(&format!("/proc/{p}")).exists())
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Kernel memory in use machine-wide (slab, vmalloc, page tables, kernel
/// stacks), from /proc/meminfo: what a KVM VM, its memory slots and vCPUs
/// take lives there, not in any process's smaps. Machine-wide, so the
/// difference across a pool fill is an estimate (other processes move it).
fn kernel_memory_bytes() -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    text.lines()
        .filter(|l| {
            ["Slab:", "VmallocUsed:", "PageTables:", "KernelStack:"]
                .iter()
                .any(|k| l.starts_with(k))
        })
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum::<u64>()
        * 1024
}

fn expect_ok(r: ControlResponse) {
    assert!(!matches!(r, ControlResponse::Error { .. }), "{r:?}");
}

/// Private (not shared with any other process) memory of `pid`, from smaps_rollup.
fn private_bytes(pid: i32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with("Private_Clean:") || l.starts_with("Private_Dirty:"))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum::<u64>()
        * 1024
}
