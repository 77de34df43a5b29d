//! Fork benchmark: N children of a built-in-guest snapshot, wall clock from
//! the fork request to a running `forkd-vmm fork-server` (the snapshot
//! already parsed, as the daemon keeps it) until every child has answered
//! ping, and each child's private memory once all are up; next to the
//! bare-KVM floor for the same N and memory size, measured in the same run
//! (N VMs created one after another in one thread: create VM, memslot,
//! irqchip, vCPU, set registers).
//!
//! Run: cargo build --release --workspace && target/release/fork [--children 100] [--mem-mib 128 1024]

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
}

fn main() {
    let args = Args::parse();
    let vmm = bench::vmm_binary(args.vmm);
    let kvm = kvm_ioctls::Kvm::new().expect("this benchmark needs /dev/kvm");
    let work = std::env::temp_dir().join(format!("forkd-bench-fork-{}", std::process::id()));
    std::fs::create_dir_all(&work).unwrap();

    for &mem_mib in &args.mem_mib {
        let snap = work.join(format!("snap-{mem_mib}"));
        make_snapshot(&vmm, &work, &snap, mem_mib, args.warm_mib);

        let floor = floor(&kvm, args.children, mem_mib);
        let out = work.join(format!("kids-{mem_mib}"));
        let (wall, pids, clients) = fork_and_ping(&vmm, &snap, args.children, &out);
        let private: Vec<u64> = pids.iter().map(|&p| private_bytes(p)).collect();
        let avg = private.iter().sum::<u64>() as f64 / private.len() as f64;
        let max = *private.iter().max().unwrap();
        for mut c in clients {
            let _ = c.call(&ControlRequest::Shutdown);
        }

        println!(
            "fork {} children, built-in guest, {mem_mib} MiB ({} MiB warm)",
            args.children, args.warm_mib
        );
        println!(
            "  bare-KVM floor, {} VMs in one thread:   {:>9.1} ms",
            args.children,
            ms(floor)
        );
        println!(
            "  fork-server request to all answering:  {:>9.1} ms",
            ms(wall)
        );
        println!("  ratio: {:.2}x the floor", ms(wall) / ms(floor));
        println!(
            "  private memory per child: avg {:.0} KiB, max {} KiB",
            avg / 1024.0,
            max / 1024
        );
        let _ = std::fs::remove_dir_all(&out);
        let _ = std::fs::remove_dir_all(&snap);
    }
    let _ = std::fs::remove_dir_all(&work);
}

/// Boots a parent, writes `warm_mib` of memory, snapshots it paused.
fn make_snapshot(vmm: &Path, work: &Path, snap: &Path, mem_mib: u64, warm_mib: u64) {
    let sock = work.join("parent.sock");
    let mut parent = Command::new(vmm)
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
        })
        .unwrap(),
    );
    let _ = c.call(&ControlRequest::Shutdown);
    let _ = parent.wait();
}

/// N bare VMs of `mem_mib`, created one after another and kept until all exist.
fn floor(kvm: &kvm_ioctls::Kvm, n: u32, mem_mib: u64) -> Duration {
    // Warm-up VM, not counted.
    drop(bare_kvm_vm(kvm, (mem_mib as usize) << 20));
    let start = Instant::now();
    let vms: Vec<_> = (0..n)
        .map(|_| bare_kvm_vm(kvm, (mem_mib as usize) << 20).1)
        .collect();
    let elapsed = start.elapsed();
    drop(vms);
    elapsed
}

fn fork_and_ping(
    vmm: &Path,
    snap: &Path,
    n: u32,
    out: &Path,
) -> (Duration, Vec<i32>, Vec<ControlClient>) {
    use std::io::{BufRead, BufReader, Write};
    let sock = out.with_extension("fork.sock");
    let mut server = Command::new(vmm)
        .args(["fork-server", "--snapshot"])
        .arg(snap)
        .arg("--socket")
        .arg(&sock)
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn forkd-vmm fork-server");
    let ask = |req: &ForkRequest| -> ForkResponse {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut s = loop {
            match std::os::unix::net::UnixStream::connect(&sock) {
                Ok(s) => break s,
                Err(e) => {
                    assert!(Instant::now() < deadline, "fork server did not start: {e}");
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        };
        let mut line = serde_json::to_vec(req).unwrap();
        line.push(b'\n');
        s.write_all(&line).unwrap();
        let mut answer = String::new();
        BufReader::new(s).read_line(&mut answer).unwrap();
        serde_json::from_str(&answer).unwrap()
    };
    // The server is up (its snapshot parsed) before the clock starts.
    assert!(ask(&ForkRequest::Fork {
        n: 1,
        out_dir: out.join("warm"),
        paused: false,
        console_log: false,
        memfd: false,
    })
    .is_ok());
    let start = Instant::now();
    let request = ForkRequest::Fork {
        n,
        out_dir: out.to_owned(),
        paused: false,
        console_log: false,
        memfd: false,
    };
    let children: Vec<(i32, PathBuf)> = match ask(&request) {
        ForkResponse::Forked { children } => children
            .into_iter()
            .map(|c| (c.pid, c.control_socket))
            .collect(),
        other => panic!("fork failed: {other:?}"),
    };
    // Ping from two threads, one per core.
    let halves: Vec<Vec<(i32, PathBuf)>> = vec![
        children.iter().step_by(2).cloned().collect(),
        children.iter().skip(1).step_by(2).cloned().collect(),
    ];
    let clients: Vec<ControlClient> = std::thread::scope(|s| {
        let handles: Vec<_> = halves
            .into_iter()
            .map(|half| {
                s.spawn(move || {
                    half.into_iter()
                        .map(|(_, sock)| {
                            let mut c = bench::connect_control(&sock, Duration::from_secs(60));
                            let r = c
                                .call(&ControlRequest::Guest {
                                    request: GuestRequest::Ping,
                                    timeout_ms: Some(10_000),
                                })
                                .unwrap();
                            assert!(matches!(r, ControlResponse::Guest { .. }), "{r:?}");
                            c
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    let wall = start.elapsed();
    let _ = ask(&ForkRequest::Shutdown);
    let _ = server.wait();
    // The warm-up child.
    if let Ok(mut c) =
        ControlClient::connect(&out.join("warm/0/control.sock"), Duration::from_secs(5))
    {
        let _ = c.call(&ControlRequest::Shutdown);
    }
    (wall, children.iter().map(|c| c.0).collect(), clients)
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
