//! Verify benchmark: how long `forkd-vmm verify` takes on a full snapshot
//! of the built-in guest, next to reading the same files with `cat` to
//! /dev/null, the page cache warm for both, measured in the same run.
//!
//! For each `--mem-mib`, a built-in guest writes a pattern over its scratch
//! memory (all of RAM but the last `--margin-mib`, so the memory file is
//! mostly data, not holes) and is snapshotted in full. Both commands are
//! run once to warm the page cache, then `--runs` times each, alternating
//! which goes first; wall clock from spawn to exit, medians. Two
//! in-process floors, in the same runs, show where verify's time goes:
//! reading the files in 1 MiB reads (the read size verify uses), and the
//! same reads hashed with plain BLAKE3 over the bytes (no per-page framing
//! or zero-page test: about the fastest a BLAKE3 of this data is on one
//! core).
//!
//! Run: cargo build --release -p bench -p vmm-bin && target/release/verify [--mem-mib 128 1024] [--runs 7]

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bench::{ms, Stats};
use clap::Parser;
use proto::control::{ControlRequest, ControlResponse, SnapshotMode};
use proto::guest::GuestRequest;
use proto::snapshot::Verified;

#[derive(Parser)]
struct Args {
    /// Guest memory sizes to measure, in MiB.
    #[arg(long, num_args = 1.., default_values_t = [128u64, 1024])]
    mem_mib: Vec<u64>,
    /// Timed runs of each command per size.
    #[arg(long, default_value_t = 7)]
    runs: usize,
    /// MiB at the top of guest RAM the guest does not fill (its scratch
    /// memory starts a few MiB in).
    #[arg(long, default_value_t = 16)]
    margin_mib: u64,
    /// forkd-vmm binary (default: next to this benchmark).
    #[arg(long)]
    vmm: Option<PathBuf>,
}

/// The files a full snapshot's verify reads.
const FILES: [&str; 2] = ["vmstate", "memory"];

/// Read size of the in-process floors (verify's).
const CHUNK: usize = 1 << 20;

/// The work directory and a VM still running, undone on drop (also when a
/// check fails and the benchmark unwinds).
struct Cleanup {
    work: PathBuf,
    vm: Option<Child>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(mut vm) = self.vm.take() {
            let _ = vm.kill();
            let _ = vm.wait();
        }
        let _ = std::fs::remove_dir_all(&self.work);
    }
}

fn main() {
    let args = Args::parse();
    let vmm = bench::vmm_binary(args.vmm.clone());
    let work = std::env::temp_dir().join(format!("forkd-bench-verify-{}", std::process::id()));
    std::fs::create_dir_all(&work).unwrap();
    let mut cleanup = Cleanup {
        work: work.clone(),
        vm: None,
    };
    println!("load before: {}", loadavg());
    for &mem_mib in &args.mem_mib {
        let snap = work.join(format!("snap-{mem_mib}"));
        make_snapshot(&vmm, &mut cleanup, &snap, mem_mib, args.margin_mib);
        measure(&vmm, &snap, mem_mib, args.runs);
    }
    println!("load after: {}", loadavg());
}

/// A built-in guest of `mem_mib` fills all of its scratch memory but
/// `margin_mib` and is snapshotted in full into `snap`, then shut down.
fn make_snapshot(vmm: &Path, cleanup: &mut Cleanup, snap: &Path, mem_mib: u64, margin_mib: u64) {
    let sock = cleanup.work.join(format!("vm-{mem_mib}.sock"));
    cleanup.vm = Some(bench::start_builtin(vmm, &sock, mem_mib, &[]));
    let mut c = bench::connect_control(&sock, Duration::from_secs(600));
    let fill = GuestRequest::Fill {
        seed: 0xbe7c,
        seq: 1,
        mib: mem_mib.saturating_sub(margin_mib),
        offset_mib: 0,
    };
    let r = c
        .call(&ControlRequest::Guest {
            request: fill,
            timeout_ms: Some(300_000),
        })
        .expect("fill");
    assert!(matches!(r, ControlResponse::Guest { .. }), "fill: {r:?}");
    let r = c
        .call(&ControlRequest::Snapshot {
            dir: snap.to_owned(),
            leave_paused: false,
            mode: SnapshotMode::Full,
            wait: true,
            measure_diff: false,
        })
        .expect("snapshot");
    assert!(matches!(r, ControlResponse::Snapshot { .. }), "{r:?}");
    let _ = c.call(&ControlRequest::Shutdown);
    if let Some(mut vm) = cleanup.vm.take() {
        let _ = vm.wait();
    }
}

/// Times `forkd-vmm verify`, `cat` and the two floors on `snap`.
fn measure(vmm: &Path, snap: &Path, mem_mib: u64, runs: usize) {
    let paths: Vec<PathBuf> = FILES.iter().map(|f| snap.join(f)).collect();
    let bytes: u64 = paths
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    // Warm-up: the page cache holds both files after this.
    let first = verify(vmm, snap).1;
    cat(&paths);
    let (mut t_verify, mut t_inner, mut t_cat, mut t_read, mut t_hash) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for run in 0..runs {
        let mut verify_once = || {
            let (t, v) = verify(vmm, snap);
            t_verify.push(t);
            t_inner.push(Duration::from_micros(v.micros));
        };
        if run % 2 == 0 {
            verify_once();
            t_cat.push(cat(&paths));
        } else {
            t_cat.push(cat(&paths));
            verify_once();
        }
        t_read.push(read_all(&paths, false));
        t_hash.push(read_all(&paths, true));
    }
    let s = |v: &[Duration]| Stats::of(v);
    let (v, i, c, r, h) = (s(&t_verify), s(&t_inner), s(&t_cat), s(&t_read), s(&t_hash));
    println!(
        "\n{mem_mib} MiB guest: files {:.1} MiB, {:.1} MiB of it hashed by verify, {runs} runs",
        bytes as f64 / (1 << 20) as f64,
        first.bytes_hashed as f64 / (1 << 20) as f64
    );
    println!("  cat > /dev/null (process):           {c}");
    println!("  forkd-vmm verify (process):          {v}");
    println!("  verify's own time (its \"micros\"):    {i}");
    println!("  floor: 1 MiB reads (in process):     {r}");
    println!("  floor: reads + plain BLAKE3:         {h}");
    println!(
        "  ratio verify / cat (p50): {:.2}x; verify {:.0} MiB/s",
        ms(v.p50) / ms(c.p50),
        first.bytes_hashed as f64 / (1 << 20) as f64 / v.p50.as_secs_f64()
    );
}

/// Runs `forkd-vmm verify` on `snap`: wall time and its report.
fn verify(vmm: &Path, snap: &Path) -> (Duration, Verified) {
    let start = Instant::now();
    let out = Command::new(vmm)
        .args(["verify", "--snapshot"])
        .arg(snap)
        .stdin(Stdio::null())
        .output()
        .expect("spawn forkd-vmm verify");
    let elapsed = start.elapsed();
    assert!(
        out.status.success(),
        "verify of {} failed: {}",
        snap.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    (
        elapsed,
        serde_json::from_slice(&out.stdout).expect("a Verified line"),
    )
}

/// `cat paths > /dev/null`: wall time.
fn cat(paths: &[PathBuf]) -> Duration {
    let start = Instant::now();
    let status = Command::new("cat")
        .args(paths)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .status()
        .expect("spawn cat");
    let elapsed = start.elapsed();
    assert!(status.success(), "cat failed");
    elapsed
}

/// Reads every byte of `paths` in [`CHUNK`] reads, hashing them with plain
/// BLAKE3 when `hash`: wall time.
fn read_all(paths: &[PathBuf], hash: bool) -> Duration {
    let start = Instant::now();
    let mut buf = vec![0u8; CHUNK];
    for p in paths {
        let f = std::fs::File::open(p).unwrap();
        let len = f.metadata().unwrap().len();
        let mut hasher = blake3::Hasher::new();
        let mut at = 0u64;
        while at < len {
            let n = ((len - at) as usize).min(CHUNK);
            f.read_exact_at(&mut buf[..n], at).unwrap();
            if hash {
                hasher.update(&buf[..n]);
            }
            at += n as u64;
        }
        std::hint::black_box(hasher.finalize());
    }
    start.elapsed()
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}
