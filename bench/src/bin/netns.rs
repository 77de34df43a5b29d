//! What a sandbox's network namespace costs: N namespaces made as the
//! daemon makes them (`forkd_daemon::netns::create`: loopback up, a
//! persistent tap with the host side of the guest's link), one after the
//! other (the baseline) and on four threads, with the ratio; and the
//! kernel memory one holds (the growth of `Slab` in /proc/meminfo while N
//! exist), what `forkd-daemon serve --netns-pool` keeps per namespace.
//!
//! ```sh
//! cargo build --release --workspace
//! target/release/netns --count 100 --rounds 3
//! ```

use std::time::{Duration, Instant};

use bench::{ms, Stats};
use clap::Parser;
use forkd_daemon::netns;
use forkd_daemon::store::Store;

#[derive(Parser)]
#[command(
    about = "Network namespaces made one after the other vs on four threads, and their memory"
)]
struct Args {
    /// Namespaces per round.
    #[arg(long, default_value_t = 100)]
    count: usize,
    /// Rounds of each.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

/// Threads of the parallel series.
const THREADS: usize = 4;

fn main() {
    let args = Args::parse();
    let dir = std::env::temp_dir().join(format!("forkd-bench-netns-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let store = Store::open(&dir.join("forkd.db")).expect("a state database");
    let (mut seq, mut par, mut slab) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..args.rounds {
        let names: Vec<String> = (0..args.count)
            .map(|i| format!("forkd-bench-s{round}-{i}"))
            .collect();
        let before = slab_kib();
        let start = Instant::now();
        for n in &names {
            netns::create(&store, n).expect("root and /dev/net/tun");
        }
        seq.push(start.elapsed());
        slab.push(slab_kib().saturating_sub(before) as f64 / args.count as f64);
        remove_all(&store, &names);

        let names: Vec<String> = (0..args.count)
            .map(|i| format!("forkd-bench-p{round}-{i}"))
            .collect();
        let start = Instant::now();
        std::thread::scope(|s| {
            for t in 0..THREADS {
                let (names, store) = (&names, &store);
                s.spawn(move || {
                    for n in names.iter().skip(t).step_by(THREADS) {
                        netns::create(store, n).expect("root and /dev/net/tun");
                    }
                });
            }
        });
        par.push(start.elapsed());
        remove_all(&store, &names);
    }
    let (s, p) = (Stats::of(&seq), Stats::of(&par));
    println!(
        "{} network namespaces with a tap each, {} rounds:",
        args.count, args.rounds
    );
    println!("  one after the other {s}");
    println!("  on {THREADS} threads       {p}");
    println!(
        "  ratio (p50): {:.2}x; {:.3} ms a namespace one after the other",
        ms(p.p50) / ms(s.p50),
        ms(s.p50) / args.count as f64
    );
    slab.sort_by(f64::total_cmp);
    println!(
        "  kernel slab memory a namespace holds: {:.0} KiB (median of {} rounds)",
        slab[slab.len() / 2],
        slab.len()
    );
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `Slab:` of /proc/meminfo, KiB.
fn slab_kib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Slab:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Removes `names` and waits a moment for the kernel's asynchronous
/// clean-up, so the next series starts from the same state.
fn remove_all(store: &Store, names: &[String]) {
    for n in names {
        netns::remove(store, n);
    }
    std::thread::sleep(Duration::from_millis(500));
}
