//! Chain benchmark: spawning from the head of a diff chain next to a flat
//! snapshot of the same state, measured in the same run.
//!
//! A built-in guest parent writes `--warm-mib` and is snapshotted in full,
//! then writes `--step-mib` more (a new seed each time) before each of D
//! diff snapshots, each stacked on the one before. `forkd-vmm compact` of
//! the last one (the chain head) is the flat copy of the same state. For
//! each, two figures:
//!
//! - first fork: `forkd-vmm fork -n 1` started on the snapshot just made,
//!   until its child answers ping: reading the snapshot and, for the
//!   chain, assembling its flat memory (once; later forks reuse it);
//! - steady state: N children from a running `forkd-vmm fork-server`
//!   (snapshot already parsed), from the request until every child has
//!   answered ping (as `fork` measures it), `--runs` times, chain and flat
//!   alternating; medians.
//!
//! Each first child is checked: `verify` of every seeded fill still in
//! place (the warm one and the last one of each diff step) must find no bad
//! word, in the chain's child and the flat one's.
//!
//! Run: cargo build --release -p bench -p vmm-bin && target/release/chain [--children 100] [--mem-mib 128 1024] [--depth 1 4 16] [--runs 3]

use std::cell::RefCell;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bench::ms;
use clap::Parser;
use proto::control::{
    ControlClient, ControlRequest, ControlResponse, ForkRequest, ForkResponse, ForkedChild,
    SnapshotMode,
};
use proto::guest::{GuestRequest, GuestResponse};

#[derive(Parser)]
struct Args {
    /// Children per steady-state request.
    #[arg(long, default_value_t = 100)]
    children: u32,
    /// Guest memory sizes to measure, in MiB.
    #[arg(long, num_args = 1.., default_values_t = [128u64, 1024])]
    mem_mib: Vec<u64>,
    /// Chain depths (diff snapshots over the full one) to measure.
    #[arg(long, num_args = 1.., default_values_t = [1u32, 4, 16])]
    depth: Vec<u32>,
    /// MiB the parent writes before the full snapshot.
    #[arg(long, default_value_t = 32)]
    warm_mib: u64,
    /// MiB the parent writes before each diff snapshot.
    #[arg(long, default_value_t = 4)]
    step_mib: u64,
    /// Steady-state runs per snapshot (chain and flat alternate).
    #[arg(long, default_value_t = 3)]
    runs: u32,
    /// forkd-vmm binary (default: next to this benchmark).
    #[arg(long)]
    vmm: Option<PathBuf>,
}

/// Scratch memory the benchmark leaves alone below the top of guest RAM
/// (the built-in guest's scratch starts a few MiB in).
const SCRATCH_MARGIN_MIB: u64 = 16;

/// One seeded fill: what `verify` checks later.
#[derive(Clone, Copy, Debug)]
struct Fill {
    seed: u64,
    offset_mib: u64,
    mib: u64,
}

/// The figures of one (memory size, depth).
struct Row {
    mem_mib: u64,
    depth: u32,
    first_chain: Duration,
    first_flat: Duration,
    compact: Duration,
    steady_chain: Duration,
    steady_flat: Duration,
    verified_mib: u64,
}

/// Everything the benchmark starts and makes, undone on drop (also when a
/// check fails and the benchmark unwinds): processes still running are
/// killed, by pid, only while they are still this forkd-vmm; the work
/// directory is removed.
struct Cleanup {
    vmm: PathBuf,
    work: PathBuf,
    pids: RefCell<Vec<i32>>,
}

impl Cleanup {
    fn track(&self, pid: i32) {
        self.pids.borrow_mut().push(pid);
    }

    /// Whether `pid` is still a process running our forkd-vmm.
    fn is_ours(&self, pid: i32) -> bool {
        std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|exe| exe == self.vmm)
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let pids: Vec<i32> = self
            .pids
            .take()
            .into_iter()
            .filter(|&p| self.is_ours(p))
            .collect();
        for &pid in &pids {
            // SAFETY: kill has no memory-safety preconditions; the pid was
            // checked just above to be one of our forkd-vmm processes.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        // Until all are gone, reaping those that are our own children
        // (waitpid is a no-op, ECHILD, for the others).
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            for &pid in &pids {
                // SAFETY: a null status pointer is allowed.
                unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG) };
            }
            if !pids
                .iter()
                .any(|p| Path::new(&format!("/proc/{p}")).exists())
            {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let _ = std::fs::remove_dir_all(&self.work);
    }
}

fn main() {
    let args = Args::parse();
    let vmm = bench::vmm_binary(args.vmm.clone())
        .canonicalize()
        .expect("the forkd-vmm binary's path");
    let work = std::env::temp_dir().join(format!("forkd-bench-chain-{}", std::process::id()));
    std::fs::create_dir_all(&work).unwrap();
    let cleanup = Cleanup {
        vmm: vmm.clone(),
        work: work.clone(),
        pids: RefCell::new(Vec::new()),
    };
    let mut rows = Vec::new();
    for &mem_mib in &args.mem_mib {
        for &depth in &args.depth {
            let dir = work.join(format!("m{mem_mib}-d{depth}"));
            std::fs::create_dir_all(&dir).unwrap();
            rows.push(measure(&args, &cleanup, &dir, mem_mib, depth));
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    println!();
    println!(
        "| RAM | depth | first fork: chain | flat | ratio | compact | steady ({} children): chain | flat | ratio | checked |",
        args.children
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for r in &rows {
        println!(
            "| {} MiB | {} | {:.1} ms | {:.1} ms | {:.2}x | {:.1} ms | {:.1} ms | {:.1} ms | {:.2}x | {} MiB |",
            r.mem_mib,
            r.depth,
            ms(r.first_chain),
            ms(r.first_flat),
            ms(r.first_chain) / ms(r.first_flat),
            ms(r.compact),
            ms(r.steady_chain),
            ms(r.steady_flat),
            ms(r.steady_chain) / ms(r.steady_flat),
            r.verified_mib,
        );
    }
    drop(cleanup);
}

/// Makes a chain of `depth` diffs at `mem_mib` in `dir` and its flat copy,
/// and measures both.
fn measure(args: &Args, cleanup: &Cleanup, dir: &Path, mem_mib: u64, depth: u32) -> Row {
    let vmm = &cleanup.vmm;
    let (head, fills) = make_chain(args, cleanup, dir, mem_mib, depth);
    let verified_mib: u64 = fills.iter().map(|f| f.mib).sum();
    println!(
        "chain {mem_mib} MiB, depth {depth} ({} MiB warm, then {} MiB before each diff), {} children a request",
        args.warm_mib, args.step_mib, args.children
    );

    let first_chain = first_fork(cleanup, &head, &dir.join("first-chain"), &fills);
    let flat = dir.join("flat");
    let started = Instant::now();
    let status = Command::new(vmm)
        .args(["compact", "--snapshot"])
        .arg(&head)
        .arg("--to")
        .arg(&flat)
        .stdout(Stdio::null())
        .status()
        .expect("run forkd-vmm compact");
    let compact = started.elapsed();
    assert!(status.success(), "forkd-vmm compact failed: {status}");
    let first_flat = first_fork(cleanup, &flat, &dir.join("first-flat"), &fills);
    println!(
        "  first fork (fork -n 1 until ping): chain {:>8.1} ms  flat {:>8.1} ms  {:.2}x  (compact of the head afterwards {:.1} ms); {} fills ({verified_mib} MiB) verified in both children",
        ms(first_chain),
        ms(first_flat),
        ms(first_chain) / ms(first_flat),
        ms(compact),
        fills.len()
    );

    let mut chain_runs = Vec::new();
    let mut flat_runs = Vec::new();
    for run in 0..args.runs.max(1) {
        // Alternate which goes first: neither always follows the other's teardown.
        let order: [(&Path, bool); 2] = if run % 2 == 0 {
            [(&head, true), (&flat, false)]
        } else {
            [(&flat, false), (&head, true)]
        };
        let mut this = [Duration::ZERO; 2];
        for (snap, is_chain) in order {
            let tag = if is_chain { "chain" } else { "flat" };
            let out = dir.join(format!("{tag}-{run}"));
            let wall = steady(cleanup, snap, &out, args.children);
            let _ = std::fs::remove_dir_all(&out);
            this[usize::from(!is_chain)] = wall;
        }
        println!(
            "  steady, run {}: chain {:>8.1} ms  flat {:>8.1} ms  {:.2}x",
            run + 1,
            ms(this[0]),
            ms(this[1]),
            ms(this[0]) / ms(this[1])
        );
        chain_runs.push(this[0]);
        flat_runs.push(this[1]);
    }
    let (steady_chain, steady_flat) = (median(&chain_runs), median(&flat_runs));
    println!(
        "  steady, median of {}: chain {:>8.1} ms  flat {:>8.1} ms  {:.2}x",
        chain_runs.len(),
        ms(steady_chain),
        ms(steady_flat),
        ms(steady_chain) / ms(steady_flat)
    );
    Row {
        mem_mib,
        depth,
        first_chain,
        first_flat,
        compact,
        steady_chain,
        steady_flat,
        verified_mib,
    }
}

/// Boots a parent of `mem_mib`, fills `warm_mib`, snapshots it in full,
/// then `depth` times fills `step_mib` (a seed of its own, the next slot
/// of scratch memory, wrapping) and takes a diff snapshot. Returns the
/// chain head and the fills still in place there.
fn make_chain(
    args: &Args,
    cleanup: &Cleanup,
    dir: &Path,
    mem_mib: u64,
    depth: u32,
) -> (PathBuf, Vec<Fill>) {
    let room = mem_mib.saturating_sub(SCRATCH_MARGIN_MIB);
    let slots = room.saturating_sub(args.warm_mib) / args.step_mib.max(1);
    assert!(
        args.warm_mib <= room && (depth == 0 || slots > 0),
        "{mem_mib} MiB of RAM holds neither {} MiB warm plus {} MiB steps: choose smaller ones",
        args.warm_mib,
        args.step_mib
    );
    let sock = dir.join("parent.sock");
    let mut parent = bench::start_builtin(&cleanup.vmm, &sock, mem_mib, &[]);
    cleanup.track(parent.id() as i32);
    let mut c = bench::connect_control(&sock, Duration::from_secs(120));
    let warm = Fill {
        seed: 1,
        offset_mib: 0,
        mib: args.warm_mib,
    };
    // Slot i of the diff steps holds the last fill written there.
    let mut steps: Vec<Option<Fill>> = vec![None; slots as usize];
    fill(&mut c, warm);
    snapshot(&mut c, &dir.join("d0"), SnapshotMode::Full);
    for k in 1..=u64::from(depth) {
        let slot = (k - 1) % slots;
        let f = Fill {
            seed: 100 + k,
            offset_mib: args.warm_mib + slot * args.step_mib,
            mib: args.step_mib,
        };
        fill(&mut c, f);
        snapshot(&mut c, &dir.join(format!("d{k}")), SnapshotMode::Diff);
        steps[slot as usize] = Some(f);
    }
    let _ = c.call(&ControlRequest::Shutdown);
    let _ = parent.wait();
    let fills = std::iter::once(warm)
        .chain(steps.into_iter().flatten())
        .filter(|f| f.mib > 0)
        .collect();
    (dir.join(format!("d{depth}")), fills)
}

fn fill(c: &mut ControlClient, f: Fill) {
    if f.mib == 0 {
        return;
    }
    let r = c
        .call(&ControlRequest::Guest {
            request: GuestRequest::Fill {
                seed: f.seed,
                seq: 1,
                mib: f.mib,
                offset_mib: f.offset_mib,
            },
            timeout_ms: Some(60_000),
        })
        .expect("fill");
    assert!(
        matches!(
            r,
            ControlResponse::Guest {
                response: GuestResponse::Filled { .. }
            }
        ),
        "fill {f:?}: {r:?}"
    );
}

fn snapshot(c: &mut ControlClient, dir: &Path, mode: SnapshotMode) {
    let r = c
        .call(&ControlRequest::Snapshot {
            dir: dir.to_owned(),
            leave_paused: false,
            mode,
            wait: true,
            measure_diff: false,
        })
        .expect("snapshot");
    assert!(
        matches!(r, ControlResponse::Snapshot { .. }),
        "snapshot {}: {r:?}",
        dir.display()
    );
}

/// `forkd-vmm fork -n 1` on `snap`, from its start until its child answers
/// ping; then checks `fills` in the child and shuts it down.
fn first_fork(cleanup: &Cleanup, snap: &Path, out: &Path, fills: &[Fill]) -> Duration {
    let started = Instant::now();
    let mut fork = Command::new(&cleanup.vmm)
        .args(["fork", "-n", "1", "--snapshot"])
        .arg(snap)
        .arg("--out-dir")
        .arg(out)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn forkd-vmm fork");
    cleanup.track(fork.id() as i32);
    let mut line = String::new();
    BufReader::new(fork.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(
        !line.is_empty(),
        "forkd-vmm fork on {} printed no child (see its stderr)",
        snap.display()
    );
    let child: ForkedChild = serde_json::from_str(&line).expect("a child as JSON");
    cleanup.track(child.pid);
    let mut c = bench::connect_control(&child.control_socket, Duration::from_secs(60));
    ping(&mut c);
    let elapsed = started.elapsed();
    let _ = fork.wait();
    for f in fills {
        let r = c
            .call(&ControlRequest::Guest {
                request: GuestRequest::Verify {
                    seed: f.seed,
                    seq: 1,
                    mib: f.mib,
                    offset_mib: f.offset_mib,
                },
                timeout_ms: Some(60_000),
            })
            .expect("verify");
        assert!(
            matches!(
                r,
                ControlResponse::Guest {
                    response: GuestResponse::Verified { bad_words: 0, .. }
                }
            ),
            "a child of {} does not hold fill {f:?}: {r:?}",
            snap.display()
        );
    }
    let _ = c.call(&ControlRequest::Shutdown);
    wait_gone(&[child.pid]);
    let _ = std::fs::remove_dir_all(out);
    elapsed
}

fn ping(c: &mut ControlClient) {
    let r = c
        .call(&ControlRequest::Guest {
            request: GuestRequest::Ping,
            timeout_ms: Some(10_000),
        })
        .expect("ping");
    assert!(matches!(r, ControlResponse::Guest { .. }), "ping: {r:?}");
}

/// A fork server on `snap`: one warm-up child (not counted), then `n`
/// children in one request, from the request until all answered ping
/// (two client threads, one per core). Everything is shut down after.
fn steady(cleanup: &Cleanup, snap: &Path, out: &Path, n: u32) -> Duration {
    let sock = out.with_extension("sock");
    let mut server = Command::new(&cleanup.vmm)
        .args(["fork-server", "--snapshot"])
        .arg(snap)
        .arg("--socket")
        .arg(&sock)
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn forkd-vmm fork-server");
    cleanup.track(server.id() as i32);
    let warm = forked(
        cleanup,
        bench::ask_fork_server(&sock, &bench::fork_request(1, &out.join("warm"))),
    );
    let mut c = bench::connect_control(&warm[0].control_socket, Duration::from_secs(10));
    ping(&mut c);
    let _ = c.call(&ControlRequest::Shutdown);
    wait_gone(&[warm[0].pid]);

    let start = Instant::now();
    let children = forked(
        cleanup,
        bench::ask_fork_server(&sock, &bench::fork_request(n, &out.join("kids"))),
    );
    let sockets: Vec<&Path> = children
        .iter()
        .map(|c| c.control_socket.as_path())
        .collect();
    let clients = bench::ping_all(&sockets);
    let wall = start.elapsed();
    for mut c in clients {
        let _ = c.call(&ControlRequest::Shutdown);
    }
    let pids: Vec<i32> = children.iter().map(|c| c.pid).collect();
    wait_gone(&pids);
    let _ = bench::ask_fork_server(&sock, &ForkRequest::Shutdown);
    let _ = server.wait();
    wall
}

/// The children of a fork server's answer (each tracked for clean-up).
fn forked(cleanup: &Cleanup, answer: ForkResponse) -> Vec<ForkedChild> {
    match answer {
        ForkResponse::Forked { children } => {
            for c in &children {
                cleanup.track(c.pid);
            }
            children
        }
        other => panic!("fork failed: {other:?}"),
    }
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

fn median(v: &[Duration]) -> Duration {
    let mut s = v.to_vec();
    s.sort();
    s[s.len() / 2]
}
