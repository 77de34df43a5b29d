//! Live BRANCH engine benchmark, without a VM: memfd guest RAM (as
//! `GuestRam` makes it for a live-branchable VM), fully populated, with
//! writer threads stamping random pages continuously. Per round: the
//! writers are paused (the vCPU pause), the RAM is armed (write-protected),
//! the writers resume and the live copy runs to the end.
//!
//! Printed: arm time p50/p90/max over the rounds next to the bare
//! `UFFDIO_WRITEPROTECT` of the same memory measured in the same run
//! (interleaved), copy time and throughput, and the longest fault stall
//! both as the handler saw it (fault read to release) and as the writers
//! saw it (one store's wall time).
//!
//! Run: cargo build --release -p bench && target/release/wp_arm [--mem-mib 1536] [--rounds 20]
//! (output goes to /dev/shm by default, so the copy is measured without the
//! disk; `--out-dir` on a disk adds the final fsync, reported separately).
//!
//! `--hugetlb` backs the RAM with a hugetlbfs memfd of 2 MiB pages instead
//! (`MFD_HUGETLB`, one region) and copies with a 2 MiB write-protect
//! granule. It needs that many huge pages reserved first, e.g. for 1.5 GiB:
//! `echo 800 > /proc/sys/vm/nr_hugepages` (write the old value back after).
//!
//! `--kvm` measures instead what this host's KVM adds to the arm: the RAM
//! of a built-in guest VM run in this process (memfd RAM, or huge pages with
//! `--hugetlb`, reserved by the benchmark and given back), that the guest
//! has filled and keeps stamping, so KVM maps every page. See [`kvm_floor`].

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bench::{ms, Stats};
use clap::Parser;
use vmm::branch::live::{arm, LiveCopy, LiveCopyOptions, Region, HUGE_2M_GRANULE, PAGE_GRANULE};
use vmm::branch::prearm::Prearm;
use vmm::memory::uffd::Uffd;
use vmm::memory::{Backend, GuestRam};

#[derive(Parser)]
struct Args {
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 1536)]
    mem_mib: u64,
    /// Arm-and-copy rounds (and bare write-protect samples).
    #[arg(long, default_value_t = 20)]
    rounds: usize,
    /// Writer threads (the machine has 2 cores: one writer leaves one core
    /// for the copier and the fault handler).
    #[arg(long, default_value_t = 1)]
    writers: usize,
    /// Bulk copy chunk in KiB.
    #[arg(long, default_value_t = 4096)]
    chunk_kib: usize,
    /// Fault handler block in KiB (4..256).
    #[arg(long, default_value_t = 256)]
    fault_block_kib: usize,
    /// Keep the bulk copier at normal priority.
    #[arg(long)]
    no_nice: bool,
    /// Directory for the memory file.
    #[arg(long, default_value = "/dev/shm")]
    out_dir: PathBuf,
    /// Back the RAM with a hugetlbfs memfd of 2 MiB pages (2 MiB
    /// write-protect granule) instead of shmem; needs reserved huge pages
    /// (vm.nr_hugepages).
    #[arg(long)]
    hugetlb: bool,
    /// Measure the arm of a running VM's RAM (KVM-mapped, guest-touched)
    /// next to the bare arm of unmapped RAM, and KVM's dirty-log
    /// operations, instead of the copy engine.
    #[arg(long)]
    kvm: bool,
    /// With --kvm: MiB the guest fills and keeps stamping.
    #[arg(long, default_value_t = 1400)]
    warm_mib: u64,
}

/// The RAM under test: `GuestRam`'s memfd, or a hugetlbfs memfd mapped here.
enum Ram {
    Shmem(GuestRam),
    Huge { file: File, addr: u64, len: u64 },
}

impl Ram {
    fn new(mem_mib: u64, hugetlb: bool) -> Ram {
        if !hugetlb {
            return Ram::Shmem(GuestRam::new(mem_mib, Backend::Memfd).expect("guest RAM"));
        }
        let len = (mem_mib << 20).next_multiple_of(HUGE_2M_GRANULE as u64);
        let flags = libc::MFD_CLOEXEC | libc::MFD_HUGETLB | (21 << libc::MFD_HUGE_SHIFT);
        // SAFETY: valid NUL-terminated name; the result is checked.
        let fd = unsafe { libc::memfd_create(c"wp-arm-hugetlb".as_ptr(), flags) };
        assert!(
            fd >= 0,
            "memfd_create(MFD_HUGETLB): {}",
            io::Error::last_os_error()
        );
        // SAFETY: a fresh descriptor nothing else owns.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(len).expect("sizing the hugetlbfs memfd");
        // SAFETY: a new shared mapping of the whole memfd at an address the
        // kernel picks (huge page aligned for hugetlbfs); the result is checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(
            p,
            libc::MAP_FAILED,
            "mmap of {} MiB of hugetlbfs: {}; reserve 2 MiB pages first \
             (echo N > /proc/sys/vm/nr_hugepages)",
            len >> 20,
            io::Error::last_os_error()
        );
        Ram::Huge {
            file,
            addr: p as u64,
            len,
        }
    }

    /// (host address, length) of each stretch.
    fn slots(&self) -> Vec<(u64, u64)> {
        match self {
            Ram::Shmem(ram) => ram
                .slots()
                .into_iter()
                .map(|(_, host, len)| (host, len))
                .collect(),
            Ram::Huge { addr, len, .. } => vec![(*addr, *len)],
        }
    }

    fn file(&self) -> &File {
        match self {
            Ram::Shmem(ram) => ram.file().expect("memfd RAM"),
            Ram::Huge { file, .. } => file,
        }
    }
}

impl Drop for Ram {
    fn drop(&mut self) {
        if let Ram::Huge { addr, len, .. } = self {
            // SAFETY: the mapping made in `Ram::new`; nothing uses it after
            // the benchmark (the writers and copies are finished).
            unsafe { libc::munmap(*addr as *mut libc::c_void, *len as usize) };
        }
    }
}

/// Writers that stamp random pages; pausable like vCPUs.
struct Writers {
    stop: Arc<AtomicBool>,
    pause: Arc<AtomicBool>,
    parked: Arc<AtomicUsize>,
    /// Longest single store in nanoseconds since the last reset.
    max_store_ns: Arc<AtomicU64>,
    writes: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Writers {
    fn start(n: usize, regions: &[Region]) -> Writers {
        let stop = Arc::new(AtomicBool::new(false));
        let pause = Arc::new(AtomicBool::new(false));
        let parked = Arc::new(AtomicUsize::new(0));
        let max_store_ns = Arc::new(AtomicU64::new(0));
        let writes = Arc::new(AtomicU64::new(0));
        let threads = (0..n)
            .map(|t| {
                let regions = regions.to_vec();
                let (stop, pause, parked, max_store_ns, writes) = (
                    stop.clone(),
                    pause.clone(),
                    parked.clone(),
                    max_store_ns.clone(),
                    writes.clone(),
                );
                std::thread::spawn(move || {
                    let mut s = 0x9E37_79B9_7F4A_7C15u64 ^ (t as u64 + 1);
                    let mut seq = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        if pause.load(Ordering::Acquire) {
                            parked.fetch_add(1, Ordering::AcqRel);
                            while pause.load(Ordering::Acquire) {
                                std::hint::spin_loop();
                            }
                            parked.fetch_sub(1, Ordering::AcqRel);
                        }
                        s ^= s << 13;
                        s ^= s >> 7;
                        s ^= s << 17;
                        let r = &regions[(s % regions.len() as u64) as usize];
                        let off = (s >> 8) % (r.len / 8) * 8;
                        seq += 1;
                        let t0 = Instant::now();
                        // SAFETY: inside guest RAM, which outlives the writers.
                        unsafe { ((r.host_addr + off) as *mut u64).write_volatile(seq) };
                        let took = t0.elapsed().as_nanos() as u64;
                        max_store_ns.fetch_max(took, Ordering::Relaxed);
                        writes.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        Writers {
            stop,
            pause,
            parked,
            max_store_ns,
            writes,
            threads,
        }
    }

    /// Stops the writers between two stores, like pausing vCPUs.
    fn pause(&self) {
        self.pause.store(true, Ordering::Release);
        while self.parked.load(Ordering::Acquire) < self.threads.len() {
            std::hint::spin_loop();
        }
    }

    fn resume(&self) {
        self.pause.store(false, Ordering::Release);
    }

    fn finish(self) {
        self.stop.store(true, Ordering::Relaxed);
        self.resume();
        for t in self.threads {
            t.join().unwrap();
        }
    }
}

fn main() {
    let args = Args::parse();
    if args.kvm {
        kvm_floor(&args);
        return;
    }
    let uffd = Arc::new(Uffd::new().unwrap_or_else(|e| panic!("{e}")));
    let ram = Ram::new(args.mem_mib, args.hugetlb);
    let granule = if args.hugetlb {
        HUGE_2M_GRANULE
    } else {
        PAGE_GRANULE
    };
    let mut regions = Vec::new();
    let mut file_offset = 0;
    for (host, len) in ram.slots() {
        regions.push(Region {
            host_addr: host,
            len,
            file_offset,
        });
        file_offset += len;
    }
    let total = file_offset;
    // Populate every page with non-zero data.
    for r in &regions {
        for off in (0..r.len).step_by(4096) {
            // SAFETY: inside guest RAM.
            unsafe { ((r.host_addr + off) as *mut u64).write_volatile(off | 1) };
        }
    }
    for r in &regions {
        uffd.register_wp(r.host_addr, r.len).expect("register");
    }
    println!(
        "wp_arm: {} MiB {} memfd RAM in {} region(s), fully populated, {} writer(s), \
         chunk {} KiB, fault block {} KiB, granule {} KiB, bulk niced {}, output in {}",
        args.mem_mib,
        if args.hugetlb {
            "hugetlbfs (2 MiB pages)"
        } else {
            "shmem"
        },
        regions.len(),
        args.writers,
        args.chunk_kib,
        args.fault_block_kib,
        granule >> 10,
        !args.no_nice,
        args.out_dir.display()
    );

    let writers = Writers::start(args.writers, &regions);
    std::thread::sleep(Duration::from_millis(100));
    let path = args
        .out_dir
        .join(format!("forkd-wp-arm-{}.memory", std::process::id()));
    let (mut bare, mut arms, mut copies, mut copy_only) = (vec![], vec![], vec![], vec![]);
    let (mut max_stall, mut max_store, mut faults, mut fault_copies) =
        (Duration::ZERO, Duration::ZERO, 0u64, 0u64);
    for round in 0..args.rounds {
        // Baseline: the bare ioctl on the same memory, writers paused too.
        writers.pause();
        let t0 = Instant::now();
        for r in &regions {
            uffd.write_protect(r.host_addr, r.len, true).unwrap();
        }
        bare.push(t0.elapsed());
        for r in &regions {
            uffd.write_protect(r.host_addr, r.len, false).unwrap();
        }
        writers.resume();
        std::thread::sleep(Duration::from_millis(20));

        let _ = std::fs::remove_file(&path);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .expect("memory file");
        file.set_len(total).unwrap();
        writers.pause();
        let armed = arm(&uffd, &regions).expect("arm");
        writers.max_store_ns.store(0, Ordering::Relaxed);
        writers.resume();
        let options = LiveCopyOptions {
            source: Some(ram.file().try_clone().unwrap()),
            chunk_bytes: args.chunk_kib << 10,
            fault_block_bytes: args.fault_block_kib << 10,
            granule_bytes: granule,
            nice_bulk: !args.no_nice,
            before_release: None,
            only: None,
            bulk_hold: Duration::ZERO,
        };
        let writes0 = writers.writes.load(Ordering::Relaxed);
        // SAFETY: `ram` outlives the copy (waited for right here).
        let copy =
            unsafe { LiveCopy::start_with(uffd.clone(), &regions, file, options) }.expect("start");
        let report = copy.wait().expect("live copy");
        let store = Duration::from_nanos(writers.max_store_ns.load(Ordering::Relaxed));
        let writes = writers.writes.load(Ordering::Relaxed) - writes0;
        arms.push(armed);
        copies.push(report.duration);
        copy_only.push(report.duration - report.sync);
        max_stall = max_stall.max(report.max_fault_stall);
        max_store = max_store.max(store);
        faults += report.faults;
        fault_copies += report.fault_copies;
        println!(
            "round {round:>2}: arm {:>7.3} ms (bare {:>7.3} ms)  copy {:>8.1} ms (sync {:>6.1} ms) \
             {:>6.2} GiB/s  faults {:>6} (copied first {:>6})  stall: handler {:>7.3} ms, \
             store {:>7.3} ms  writes {}",
            ms(armed),
            ms(bare[round]),
            ms(report.duration),
            ms(report.sync),
            report.logical_bytes as f64 / report.duration.as_secs_f64() / (1u64 << 30) as f64,
            report.faults,
            report.fault_copies,
            ms(report.max_fault_stall),
            ms(store),
            writes,
        );
        drop(File::open(&path));
        let _ = std::fs::remove_file(&path);
    }
    writers.finish();
    let gib = total as f64 / (1u64 << 30) as f64;
    let copy_stats = Stats::of(&copies);
    println!();
    println!("bare UFFDIO_WRITEPROTECT  {}", Stats::of(&bare));
    println!("arm (live::arm)           {}", Stats::of(&arms));
    println!("copy (incl. fsync)        {copy_stats}");
    println!("copy (excl. fsync)        {}", Stats::of(&copy_only));
    println!(
        "copy throughput p50       {:.2} GiB/s ({gib:.2} GiB)",
        gib / copy_stats.p50.as_secs_f64()
    );
    println!(
        "faults {faults} over {} rounds ({fault_copies} copied by the handler first); \
         longest stall: handler {:.3} ms, writer store {:.3} ms",
        args.rounds,
        ms(max_stall),
        ms(max_store)
    );
}

/// Gives the huge-page reserve back as it was when dropped.
struct HugePageReserve(Option<String>);

impl HugePageReserve {
    const PATH: &'static str = "/proc/sys/vm/nr_hugepages";

    /// Makes sure `pages` 2 MiB pages are free, reserving more if needed.
    fn at_least(pages: u64) -> HugePageReserve {
        let meminfo = |field: &str| -> u64 {
            std::fs::read_to_string("/proc/meminfo")
                .unwrap_or_default()
                .lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0)
        };
        let free = meminfo("HugePages_Free:");
        if free >= pages {
            return HugePageReserve(None);
        }
        let before = std::fs::read_to_string(Self::PATH).unwrap_or_default();
        let total = meminfo("HugePages_Total:");
        std::fs::write(Self::PATH, (total + pages - free).to_string())
            .expect("reserving huge pages needs root (/proc/sys/vm/nr_hugepages)");
        HugePageReserve(Some(before))
    }
}

impl Drop for HugePageReserve {
    fn drop(&mut self) {
        if let Some(before) = &self.0 {
            let _ = std::fs::write(Self::PATH, before.trim());
        }
    }
}

/// The guest's stamp count (pages stamped since `stamp_start`).
fn stamp_count(machine: &vmm::machine::Machine) -> u64 {
    use vmm::boot::builtin::abi;
    let b = machine
        .peek(abi::INFO_ADDR + abi::INFO_STAMP_COUNT, 8)
        .expect("peek the stamp count");
    u64::from_le_bytes(b.try_into().unwrap())
}

/// Waits until the guest has stamped `pages` more pages (one full pass:
/// every page written, so KVM maps each one writable again); returns the
/// time it took.
fn wait_for_pass(machine: &vmm::machine::Machine, pages: u64) -> Duration {
    let start = Instant::now();
    let from = stamp_count(machine);
    while stamp_count(machine) < from + pages {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "the guest stopped stamping"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    start.elapsed()
}

/// The floor this host's KVM puts under a live BRANCH pause, measured on
/// the RAM of a running built-in guest that stamps `--warm-mib` MiB pass
/// after pass. Before each round the guest completes a full pass, so
/// KVM's MMU maps every warm page writable (and its dirty bit is set).
/// Then, with the vCPU paused:
///
/// - round A: the write-protect arm of all RAM (`UFFDIO_WRITEPROTECT`),
///   then KVM's dirty log read and cleared after it, then the release;
/// - round B: the dirty log read (with manual protection a copy of KVM's
///   bitmap), cleared (KVM write-protects every page in its MMU), then the
///   arm, then the release;
///
/// alternating, next to the bare arm of the same amount of populated memfd
/// memory that no VM maps (this process, same run). Also printed: the
/// guest's pass time right after an arm (every page refaults into KVM)
/// against its steady pass time.
fn kvm_floor(args: &Args) {
    use vmm::builder::{build_for_boot, MachineConfig};
    let _reserve = args
        .hugetlb
        .then(|| HugePageReserve::at_least(args.mem_mib / 2 + 8));
    let mut cfg = MachineConfig::builtin(args.mem_mib);
    cfg.backend = if args.hugetlb {
        Backend::HugeMemfd
    } else {
        Backend::Memfd
    };
    let machine = build_for_boot(&cfg).unwrap_or_else(|e| panic!("cannot start the VM: {e}"));
    let long = Duration::from_secs(600);
    let fill = proto::guest::GuestRequest::Fill {
        seed: 1,
        seq: 1,
        mib: args.warm_mib,
        offset_mib: 0,
    };
    machine.guest_request(&fill, long).expect("fill");
    let stamp = proto::guest::GuestRequest::StampStart {
        mib: args.warm_mib,
        offset_mib: 0,
    };
    machine.guest_request(&stamp, long).expect("stamp");
    let pages = args.warm_mib << 8;
    let uffd = machine.live_uffd().expect("memfd RAM is registered");
    let vm = machine.vm();
    let slots = machine.ram().slots();
    println!(
        "wp_arm --kvm: {} MiB {} RAM of a built-in guest stamping {} MiB; manual dirty-log \
         protection {}",
        args.mem_mib,
        if args.hugetlb {
            "hugetlbfs (2 MiB pages)"
        } else {
            "shmem"
        },
        args.warm_mib,
        if vm.manual_dirty_log() { "on" } else { "off" }
    );
    let arm_all = |on: bool| {
        let t = Instant::now();
        for &(_, host, len) in &slots {
            uffd.write_protect(host, len, on).expect("write-protect");
        }
        t.elapsed()
    };
    let read_and_clear = || {
        let t = Instant::now();
        let logs = vm.read_dirty_log(machine.ram()).expect("dirty log");
        let read = t.elapsed();
        let dirty: u64 = logs.iter().flatten().map(|w| w.count_ones() as u64).sum();
        let t = Instant::now();
        if vm.manual_dirty_log() {
            for (slot, (bits, &(_, _, len))) in logs.iter().zip(&slots).enumerate() {
                vm.clear_dirty_log(slot as u32, 0, len / 4096, bits)
                    .expect("clear");
            }
        }
        (read, t.elapsed(), dirty)
    };
    let steady = wait_for_pass(&machine, pages);
    let (mut arm_a, mut log_a, mut read_b, mut clear_b, mut arm_b, mut refault) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    let mut dirty_seen = 0;
    for round in 0..args.rounds * 2 {
        wait_for_pass(&machine, pages);
        machine.pause().expect("pause");
        if round % 2 == 0 {
            arm_a.push(arm_all(true));
            let (read, clear, dirty) = read_and_clear();
            log_a.push(read + clear);
            dirty_seen = dirty_seen.max(dirty);
        } else {
            let (read, clear, dirty) = read_and_clear();
            read_b.push(read);
            clear_b.push(clear);
            dirty_seen = dirty_seen.max(dirty);
            arm_b.push(arm_all(true));
        }
        arm_all(false);
        machine.resume().expect("resume");
        refault.push(wait_for_pass(&machine, pages));
    }
    // C: the arm before the pause (the guest running), then the pause's
    // re-arm of what the guest wrote meanwhile (Prearm, as a live branch
    // without wait does it).
    let regions = Region::back_to_back(&slots);
    let granule = if args.hugetlb {
        HUGE_2M_GRANULE
    } else {
        PAGE_GRANULE
    };
    let (mut prearmed, mut rearmed, mut prearm_faults, mut rearmed_granules) =
        (vec![], vec![], 0, 0);
    for _ in 0..args.rounds {
        wait_for_pass(&machine, pages);
        let prearm = Prearm::start(uffd.clone(), &regions, granule, 256 << 10).expect("pre-arm");
        machine.pause().expect("pause");
        let report = prearm.rearm().expect("re-arm");
        arm_all(false);
        machine.resume().expect("resume");
        prearmed.push(report.armed);
        rearmed.push(report.rearm);
        prearm_faults += report.faults;
        rearmed_granules += report.rearmed_granules;
    }
    machine.shutdown();
    machine.wait_for_exit();
    drop(machine);
    let bare = bare_arm(args, args.rounds);
    println!("dirty pages per round (max)                   {dirty_seen}");
    println!(
        "A: arm of the VM's mapped RAM                 {}",
        Stats::of(&arm_a)
    );
    println!(
        "A: dirty log read + clear after the arm       {}",
        Stats::of(&log_a)
    );
    println!(
        "B: dirty log read                             {}",
        Stats::of(&read_b)
    );
    println!(
        "B: dirty log clear (KVM re-protects)          {}",
        Stats::of(&clear_b)
    );
    println!(
        "B: arm after the clear                        {}",
        Stats::of(&arm_b)
    );
    println!(
        "C: arm before the pause, the guest running    {}",
        Stats::of(&prearmed)
    );
    println!(
        "C: re-arm in the pause of what it wrote since {} ({} faults, {} granules in all)",
        Stats::of(&rearmed),
        prearm_faults,
        rearmed_granules
    );
    println!("bare arm of unmapped populated memfd          {bare}");
    println!(
        "guest pass over {} MiB: steady {:.1} ms; right after an arm or clear {}",
        args.warm_mib,
        ms(steady),
        Stats::of(&refault)
    );
    println!(
        "A arm / bare arm (p50): {:.1}x",
        Stats::of(&arm_a).p50.as_secs_f64() / bare.p50.as_secs_f64()
    );
}

/// The bare `UFFDIO_WRITEPROTECT` of `args.warm_mib` MiB of populated
/// memfd memory (huge pages with `--hugetlb`) that no VM maps, `n` times.
fn bare_arm(args: &Args, n: usize) -> Stats {
    let uffd = Uffd::new().expect("userfaultfd");
    let ram = Ram::new(args.warm_mib, args.hugetlb);
    let slots = ram.slots();
    for &(host, len) in &slots {
        for off in (0..len).step_by(4096) {
            // SAFETY: inside the mapping `ram` owns.
            unsafe { ((host + off) as *mut u64).write_volatile(off | 1) };
        }
        uffd.register_wp(host, len).expect("register");
    }
    let samples: Vec<Duration> = (0..n)
        .map(|_| {
            let t = Instant::now();
            for &(host, len) in &slots {
                uffd.write_protect(host, len, true).unwrap();
            }
            let took = t.elapsed();
            for &(host, len) in &slots {
                uffd.write_protect(host, len, false).unwrap();
            }
            took
        })
        .collect();
    Stats::of(&samples)
}
