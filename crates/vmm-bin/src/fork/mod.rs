//! Children of a snapshot from one pre-initialised process.
//!
//! The snapshot is read and checked once (metadata, vmstate checksum and
//! decode, memory file size); then this process, still single-threaded,
//! binds each child's control socket and forks. A child only creates its
//! KVM VM, maps the memory file copy-on-write (or, with `memfd`, copies it
//! into a memfd of its own so it can be live-BRANCHed), restores its vCPUs
//! and devices from the already-parsed state and starts serving.
//!
//! - `forkd-vmm fork`: one batch, printed as JSON lines; the command returns
//!   and the children run on.
//! - `forkd-vmm fork-server`: keeps the parsed snapshot and forks a batch
//!   per request on its socket, for as long as it lives (the daemon keeps
//!   one per snapshot). It reaps its children, and writes how each child
//!   it handed out ended (`exit.json` in the child's directory) before
//!   reaping it (see `reaper`).
//!
//! ## The pool (`fork-server --pool N`)
//!
//! Most of a child's start does not depend on the request: the KVM VM,
//! its memory slots (whose cost grows with guest RAM), the interrupt
//! controller, the vCPUs with their saved state, the mapping of the memory
//! file. A KVM VM belongs to the address space of the process that created
//! it, so this cannot be done once in the server; but it can be done ahead
//! of time in a child forked for the purpose. With `--pool N` the server
//! keeps up to N such children parked (their name `forkd-pooled` while
//! they wait). Each also makes its directory ahead, under the server's
//! staging directory (`<socket>.pool/<pid>/`): its control socket bound
//! and its `vmm.log` open. A fork request hands them out first: the server
//! renames the child's staged directory to the one the request names (a
//! rename allocates no inode: creating a directory, a socket and a log per
//! child is the dearest part of a request on some file systems) and tells
//! the child where it now is over its link, a `SOCK_SEQPACKET` socket
//! pair. (A child's `console.log` is made ahead too when the last request
//! asked for one; a child that is not asked for one removes it.) When
//! the rename cannot be done (another file system, a directory
//! in the way) or the child is not ready yet, the server makes the
//! directory and control socket itself and sends the socket along. The
//! child then adds what is its own (console, drive layers, vsock socket,
//! its network interfaces attached to the taps in the network namespace
//! its order names, new VM generation, the clock), starts its vCPU and
//! serves. The pool refills after the answer, one fork at a time between
//! requests. A pooled child prepares at `SCHED_IDLE` priority (when it can
//! be raised back, as root) and is raised to normal when handed out: the
//! refill after an answer runs on CPU time nothing else wants, and does
//! not slow the children just handed out on their way to answering. A
//! parked child whose server goes away (exits, is killed) sees its link
//! closed and exits. Requests for memfd RAM are forked cold.

mod cgroup;
mod child;
mod forker;
mod order;
mod pool;
mod reaper;
mod server;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use forker::Forker;
pub use server::fork_server;

/// Most children one request starts.
pub const MAX_CHILDREN: u32 = 1000;

/// A child's console log in its directory.
const CONSOLE_LOG: &str = "console.log";

/// The name (`comm`) of a pooled child while it waits, restore prepared,
/// for a request: what `ps` shows, and what tests and the benchmark look
/// for to know a pool is full.
pub const POOLED_NAME: &str = "forkd-pooled";

type BoxError = Box<dyn std::error::Error>;

#[derive(Args)]
pub struct ForkArgs {
    /// Snapshot directory.
    #[arg(long)]
    snapshot: PathBuf,
    /// Number of children (1 to 1000).
    #[arg(short = 'n', long = "count", default_value_t = 1)]
    count: u32,
    /// Directory for the children: child i gets `<out-dir>/<i>/` with its
    /// `control.sock`, `vmm.log` (its stderr), `console.log`, a
    /// `disk<j>.cow` layer per drive and `vsock.sock` when the snapshot has them.
    #[arg(long)]
    out_dir: PathBuf,
    /// Keep each child's serial console in `console.log` (default: discard).
    #[arg(long)]
    console_log: bool,
    /// Start every child paused: its vCPUs wait for `resume`.
    #[arg(long)]
    paused: bool,
    /// Give each child a copy of the snapshot's memory in a memfd (mapped
    /// shared) instead of mapping the memory file copy-on-write, so the
    /// child can be live-BRANCHed; each child copies the memory's data.
    #[arg(long)]
    memfd: bool,
    /// With --memfd: the memfd on 2 MiB huge pages (reserve them first:
    /// /proc/sys/vm/nr_hugepages).
    #[arg(long, requires = "memfd")]
    huge_pages: bool,
    /// Each child faults its RAM in for reading right after its restore,
    /// so its first snapshot reads RAM without page faults.
    #[arg(long)]
    prewarm: bool,
    /// A network namespace (under /var/run/netns) per child: give it once
    /// per child, in order. Child i attaches each network interface of
    /// the snapshot to the tap of the name `snapshot.json` records, made
    /// beforehand in the i-th namespace. Needed with -n above 1 when the
    /// snapshot has network interfaces (a tap serves one VM); without it,
    /// a single child attaches in this process's namespace.
    #[arg(long = "netns", value_name = "NS")]
    netns: Vec<String>,
    /// The most data each of each child's own copy-on-write layers may hold,
    /// in MiB: a write that needs more fails in the guest as an I/O error
    /// and the layer stops growing. Default: no quota.
    #[arg(long, value_name = "MIB", value_parser = clap::value_parser!(u64).range(1..=proto::api::DISK_QUOTA_MIB_MAX))]
    disk_quota_mib: Option<u64>,
}

#[derive(Args)]
pub struct ForkServerArgs {
    /// Snapshot directory.
    #[arg(long)]
    snapshot: PathBuf,
    /// Unix socket to take fork requests on (created; removed on exit).
    #[arg(long)]
    socket: PathBuf,
    /// Keep up to N children ready ahead of requests: forked, their KVM VM,
    /// memory mapping, memory slots and vCPUs made, parked until a request
    /// hands them out (they then add their own devices, identity and clock,
    /// and run). Each parked child is an idle process holding a KVM VM
    /// (kernel memory for its memory slots grows with guest RAM). 0: none,
    /// every child is forked when asked for.
    #[arg(long, default_value_t = 0)]
    pool: u32,
    /// Put each child in a cgroup of its own under DIR (give it once per
    /// cgroup hierarchy; the group has the same name under each): the
    /// server makes it with the request's limits and the child joins it
    /// before it does anything else. A parked child's group is made with
    /// the last request's limits (before the first, these below) and
    /// changed at hand-out if the request differs.
    #[arg(long = "cgroup-parent", value_name = "DIR")]
    cgroup_parent: Vec<PathBuf>,
    /// The first parked children's memory limit, in MiB.
    #[arg(long, requires = "cgroup_parent")]
    memory_limit_mib: Option<u64>,
    /// The first parked children's CPU limit, in thousandths of a CPU.
    #[arg(long, requires = "cgroup_parent")]
    cpu_limit_millis: Option<u32>,
    /// The first parked children's task limit.
    #[arg(long, requires = "cgroup_parent")]
    pids_limit: Option<u64>,
    /// The first parked children's disk bandwidth cap, each way, on block
    /// device MAJ:MIN.
    #[arg(long, requires = "cgroup_parent", value_name = "MAJ:MIN=BYTES_PER_SEC", value_parser = parse_io_limit)]
    io_limit: Option<proto::control::IoLimit>,
}

/// `--io-limit MAJ:MIN=BYTES_PER_SEC`.
fn parse_io_limit(s: &str) -> Result<proto::control::IoLimit, String> {
    let bad = || format!("{s:?}: give MAJ:MIN=BYTES_PER_SEC, as 8:0=1048576");
    let (dev, bps) = s.split_once('=').ok_or_else(bad)?;
    let (major, minor) = dev.split_once(':').ok_or_else(bad)?;
    Ok(proto::control::IoLimit {
        major: major.parse().map_err(|_| bad())?,
        minor: minor.parse().map_err(|_| bad())?,
        bytes_per_sec: bps.parse().ok().filter(|b| *b > 0).ok_or_else(bad)?,
    })
}

/// `forkd-vmm fork`.
pub fn fork(args: ForkArgs) -> Result<ExitCode, BoxError> {
    let forker = Forker::new(&args.snapshot, &[])?;
    let children = forker.spawn(
        &forker::Batch {
            n: args.count,
            out_dir: &args.out_dir,
            options: ChildOptions {
                paused: args.paused,
                console_log: args.console_log,
                memfd: args.memfd,
                huge_pages: args.huge_pages,
                prewarm: args.prewarm,
                disk_quota_mib: args.disk_quota_mib,
            },
            netns: &args.netns,
            limits: proto::control::Limits::default(),
        },
        &[],
        None,
    )?;
    let mut stdout = std::io::stdout().lock();
    for child in children {
        writeln!(stdout, "{}", serde_json::to_string(&child)?)?;
    }
    stdout.flush()?;
    Ok(ExitCode::SUCCESS)
}

/// What every child of one fork request gets.
#[derive(Clone, Copy, Debug)]
struct ChildOptions {
    /// Start paused.
    paused: bool,
    /// Keep the console in `console.log`.
    console_log: bool,
    /// RAM in a memfd holding a copy of the snapshot's memory.
    memfd: bool,
    /// That memfd on huge pages.
    huge_pages: bool,
    /// Fault RAM in for reading after the restore.
    prewarm: bool,
    /// The most data each of its CoW layers may hold, in MiB.
    disk_quota_mib: Option<u64>,
}
