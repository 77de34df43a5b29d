//! Boot benchmark: time from starting a forkd-vmm process to the built-in
//! guest's first answer, next to the bare-KVM floor (create VM, memslot,
//! irqchip, vCPU, set registers) measured in the same run.
//!
//! Run: cargo run --release -p bench --bin boot -- [--runs 30] [--mem-mib 128]

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bench::{bare_kvm_vm, ms, Stats};
use clap::Parser;
use proto::control::{ControlClient, ControlRequest, ControlResponse};
use proto::guest::GuestRequest;

#[derive(Parser)]
struct Args {
    /// Boots to measure.
    #[arg(long, default_value_t = 30)]
    runs: usize,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 128)]
    mem_mib: u64,
    /// forkd-vmm binary (default: next to this benchmark).
    #[arg(long)]
    vmm: Option<PathBuf>,
}

fn main() {
    let args = Args::parse();
    let vmm = bench::vmm_binary(args.vmm);
    let kvm = kvm_ioctls::Kvm::new().expect("this benchmark needs /dev/kvm");
    let dir = std::env::temp_dir().join(format!("forkd-bench-boot-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();

    // Warm up both paths once (page cache, KVM module state).
    bare_kvm_vm(&kvm, (args.mem_mib as usize) << 20);
    boot_to_answer(&vmm, &dir, args.mem_mib);

    let mut floor = Vec::new();
    let mut boot = Vec::new();
    // Interleave so both see the same machine load.
    for _ in 0..args.runs {
        floor.push(bare_kvm_vm(&kvm, (args.mem_mib as usize) << 20).0);
        boot.push(boot_to_answer(&vmm, &dir, args.mem_mib));
    }
    let (f, b) = (Stats::of(&floor), Stats::of(&boot));
    println!(
        "boot to first answer, built-in guest, {} MiB, {} runs",
        args.mem_mib, args.runs
    );
    println!("  bare-KVM floor (in process):     {f}");
    println!("  forkd-vmm spawn to ping answer:  {b}");
    println!("  ratio (p50): {:.1}x the floor", ms(b.p50) / ms(f.p50));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Spawns forkd-vmm, waits for its control socket, and asks the guest to ping.
fn boot_to_answer(vmm: &PathBuf, dir: &std::path::Path, mem_mib: u64) -> Duration {
    let sock = dir.join("control.sock");
    let start = Instant::now();
    let mut child = Command::new(vmm)
        .args(["run", "--builtin", "--console", "none", "--mem-mib"])
        .arg(mem_mib.to_string())
        .arg("--control-socket")
        .arg(&sock)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn forkd-vmm");
    let mut client = loop {
        match ControlClient::connect(&sock, Duration::from_secs(10)) {
            Ok(c) => break c,
            Err(_) => {
                assert!(
                    child.try_wait().unwrap().is_none(),
                    "forkd-vmm exited early"
                );
                assert!(
                    start.elapsed() < Duration::from_secs(10),
                    "forkd-vmm did not start"
                );
                std::thread::sleep(Duration::from_micros(50));
            }
        }
    };
    let r = client
        .call(&ControlRequest::Guest {
            request: GuestRequest::Ping,
            timeout_ms: Some(5000),
        })
        .expect("ping");
    let elapsed = start.elapsed();
    assert!(
        matches!(r, ControlResponse::Guest { .. }),
        "unexpected answer {r:?}"
    );
    let _ = client.call(&ControlRequest::Shutdown);
    let _ = child.wait();
    elapsed
}
