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
//!   one per snapshot).
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

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use proto::control::{ForkRequest, ForkResponse, ForkedChild, MAX_REQUEST_BYTES};
use vmm::builder::{self, PreparedRestore, RestoreConfig, RestoreRam};
use vmm::devices::serial::ConsoleOutput;
use vmm::devices::virtio::manager::DeviceState;
use vmm::devices::virtio::net::tap::MAX_NETNS_LEN;
use vmm::snapshot::PreparedSnapshot;

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
    /// A network namespace (under /var/run/netns) per child: give it once
    /// per child, in order. Child i attaches each network interface of
    /// the snapshot to the tap of the name `snapshot.json` records, made
    /// beforehand in the i-th namespace. Needed with -n above 1 when the
    /// snapshot has network interfaces (a tap serves one VM); without it,
    /// a single child attaches in this process's namespace.
    #[arg(long = "netns", value_name = "NS")]
    netns: Vec<String>,
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
}

/// `forkd-vmm fork`.
pub fn fork(args: ForkArgs) -> Result<ExitCode, BoxError> {
    let forker = Forker::new(&args.snapshot)?;
    let children = forker.spawn(
        args.count,
        &args.out_dir,
        ChildOptions {
            paused: args.paused,
            console_log: args.console_log,
            memfd: args.memfd,
        },
        &args.netns,
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

/// `forkd-vmm fork-server`: one request per connection, served in order on
/// the main thread (forking needs a single-threaded process); between
/// requests, the pool is refilled one child at a time.
pub fn fork_server(args: ForkServerArgs) -> Result<ExitCode, BoxError> {
    if args.pool > MAX_CHILDREN {
        return Err(format!(
            "a pool of {} is out of range: keep 0 to {MAX_CHILDREN} children",
            args.pool
        )
        .into());
    }
    let forker = Forker::new(&args.snapshot)?;
    // Children are reaped by the kernel: nobody waits for them here.
    // SAFETY: setting a signal disposition has no memory-safety preconditions.
    unsafe { libc::signal(libc::SIGCHLD, libc::SIG_IGN) };
    let listener = crate::control::bind(&args.socket)?;
    listener.set_nonblocking(true)?;
    let mut staging = args.socket.clone().into_os_string();
    staging.push(".pool");
    let mut pool = Pool::new(args.pool as usize, PathBuf::from(staging))?;
    loop {
        // While the pool is short, only look for a request; otherwise wait
        // for one, or for a parked child to die.
        let refill = pool.refill_wanted();
        let mut fds: Vec<libc::pollfd> = std::iter::once(listener.as_raw_fd())
            .chain(pool.parked.iter().map(|p| p.link.as_raw_fd()))
            .map(|fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        let timeout = match refill {
            Refill::Now => 0,
            Refill::After(wait) => wait.as_millis().clamp(1, 1000) as libc::c_int,
            Refill::No => -1,
        };
        // SAFETY: `fds` is a valid array of pollfd of the length given.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
        if ready < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(format!("fork server: cannot wait for requests: {e}").into());
        }
        // A parked child says when it is ready, and nothing else: a link
        // that reads as closed means the child died.
        let readable: Vec<usize> = fds[1..]
            .iter()
            .enumerate()
            .filter(|(_, f)| f.revents != 0)
            .map(|(i, _)| i)
            .collect();
        pool.check(&readable);
        pool.check_started();
        if fds[0].revents != 0 {
            match listener.accept() {
                Ok((stream, _)) => {
                    // Accepted sockets do not inherit O_NONBLOCK on Linux.
                    if serve_one(&forker, &mut pool, stream, listener.as_raw_fd()) {
                        break;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => eprintln!("forkd-vmm fork-server: cannot accept a request: {e}"),
            }
        } else if matches!(refill, Refill::Now) {
            pool.add_one(&forker, &[listener.as_raw_fd()]);
        }
    }
    let _ = std::fs::remove_file(&args.socket);
    pool.remove_staging();
    Ok(ExitCode::SUCCESS)
}

/// Answers one request; true when the server should stop. The children
/// close the server's listening socket (`listener`) and this connection.
fn serve_one(forker: &Forker, pool: &mut Pool, stream: UnixStream, listener: RawFd) -> bool {
    // A client that sends nothing must not stall the server.
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let mut line = Vec::new();
    let read = BufReader::new(&stream)
        .take(MAX_REQUEST_BYTES as u64)
        .read_until(b'\n', &mut line);
    let (response, stop) = match read.map_err(|e| e.to_string()).and_then(|_| {
        serde_json::from_slice::<ForkRequest>(&line).map_err(|e| format!("bad request: {e}"))
    }) {
        Ok(ForkRequest::Fork {
            n,
            out_dir,
            paused,
            console_log,
            memfd,
            netns,
        }) => {
            match forker.spawn(
                n,
                &out_dir,
                ChildOptions {
                    paused,
                    console_log,
                    memfd,
                },
                &netns,
                &[listener, stream.as_raw_fd()],
                Some(pool),
            ) {
                Ok(children) => (ForkResponse::Forked { children }, false),
                Err(e) => (
                    ForkResponse::Error {
                        message: e.to_string(),
                    },
                    false,
                ),
            }
        }
        Ok(ForkRequest::Shutdown) => (ForkResponse::Ok, true),
        Err(message) => (ForkResponse::Error { message }, false),
    };
    let mut out = serde_json::to_vec(&response).expect("responses serialise");
    out.push(b'\n');
    let _ = (&stream).write_all(&out);
    stop
}

/// What every child of one fork request gets.
#[derive(Clone, Copy)]
struct ChildOptions {
    /// Start paused.
    paused: bool,
    /// Keep the console in `console.log`.
    console_log: bool,
    /// RAM in a memfd holding a copy of the snapshot's memory.
    memfd: bool,
}

/// A parsed snapshot, ready to fork children of, and what every child
/// would otherwise open for itself.
struct Forker {
    snapshot: PreparedSnapshot,
    has_vsock: bool,
    /// /dev/kvm, opened once: children create their VMs through it.
    kvm: Arc<vmm::kvm::vm::Kvm>,
    /// /dev/null, opened once: children's stdin and stdout.
    null: std::fs::File,
}

impl Forker {
    fn new(dir: &Path) -> Result<Self, BoxError> {
        let threads = std::fs::read_dir("/proc/self/task")?.count();
        if threads != 1 {
            return Err(
                format!("a fork parent must be single-threaded, it has {threads} threads").into(),
            );
        }
        let snapshot = PreparedSnapshot::load(dir)?;
        vmm::kvm::vcpu::install_kick_handler();
        warm_up_threads();
        let has_vsock = snapshot
            .state
            .devices
            .virtio
            .iter()
            .any(|d| matches!(d.device, DeviceState::Vsock(_)));
        Ok(Forker {
            snapshot,
            has_vsock,
            kvm: Arc::new(vmm::kvm::vm::open_kvm()?),
            null: std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/null")
                .map_err(|e| format!("cannot open /dev/null: {e}"))?,
        })
    }

    /// What the child in `dir` gets of its own, its taps in `netns`.
    fn child_config(
        &self,
        dir: &Path,
        options: ChildOptions,
        netns: Option<&str>,
    ) -> RestoreConfig {
        RestoreConfig {
            console: if options.console_log {
                ConsoleOutput::File(dir.join(CONSOLE_LOG))
            } else {
                ConsoleOutput::Sink
            },
            paused: options.paused,
            drive_layers: (0..self.snapshot.meta.disks.len())
                .map(|j| dir.join(format!("disk{j}.cow")))
                .collect(),
            vsock_uds: self.has_vsock.then(|| dir.join("vsock.sock")),
            netns: netns.map(str::to_owned),
            // The copy happens in the child, after the fork: children copy
            // in parallel and the parent stays small.
            ram: if options.memfd {
                RestoreRam::Memfd
            } else {
                RestoreRam::SnapshotFile
            },
        }
    }

    /// Forks `n` children under `out_dir`, or hands out parked children
    /// of `pool` for as many as it has and the options allow; child i
    /// attaches its network interfaces in `netns[i]` (none given: in this
    /// process's namespace, for one child only). Each new child closes
    /// `close_in_child` (descriptors of the parent's that are none of a
    /// child's business) and the pool's links.
    fn spawn(
        &self,
        n: u32,
        out_dir: &Path,
        options: ChildOptions,
        netns: &[String],
        close_in_child: &[RawFd],
        mut pool: Option<&mut Pool>,
    ) -> Result<Vec<ForkedChild>, BoxError> {
        if !(1..=MAX_CHILDREN).contains(&n) {
            return Err(format!("{n} children is out of range: start 1 to {MAX_CHILDREN}").into());
        }
        crate::net::check_namespaces(&self.snapshot, n, netns)?;
        std::fs::create_dir_all(out_dir)
            .map_err(|e| format!("cannot create {}: {e}", out_dir.display()))?;
        // Flushed before every fork so no buffered output is written twice.
        std::io::stdout().flush()?;
        if let Some(pool) = pool.as_deref_mut() {
            // Which parked children are ready, once for the whole request.
            pool.refresh();
        }
        let mut children = Vec::with_capacity(n as usize);
        for index in 0..n {
            let dir = out_dir.join(index.to_string());
            let control_socket = dir.join("control.sock");
            let ns = netns.get(index as usize).map(String::as_str);
            let pooled = match pool.as_deref_mut() {
                Some(pool) if !options.memfd => pool.hand_out(&dir, options, ns)?,
                _ => None,
            };
            let pid = match pooled {
                Some(pid) => pid,
                None => {
                    let listener = make_child_dir(&dir)?;
                    let links: Vec<RawFd> = pool.as_deref().map_or_else(Vec::new, Pool::links);
                    let close: Vec<RawFd> = close_in_child.iter().copied().chain(links).collect();
                    self.fork_cold(&dir, options, ns, listener, &close)?
                }
            };
            children.push(ForkedChild {
                index,
                pid,
                vsock_socket: self.has_vsock.then(|| dir.join("vsock.sock")),
                dir,
                control_socket,
            });
        }
        Ok(children)
    }

    /// Forks a child that restores from scratch and serves on `listener`.
    fn fork_cold(
        &self,
        dir: &Path,
        options: ChildOptions,
        netns: Option<&str>,
        listener: UnixListener,
        close_in_child: &[RawFd],
    ) -> Result<i32, BoxError> {
        let cfg = self.child_config(dir, options, netns);
        // SAFETY: this process is single-threaded (checked when the Forker
        // was made; nothing here starts threads), so the child is a complete
        // copy of it and may go on running Rust code.
        match unsafe { libc::fork() } {
            -1 => Err(format!("fork failed: {}", std::io::Error::last_os_error()).into()),
            0 => {
                close_all(close_in_child);
                std::process::exit(child(
                    self,
                    dir,
                    listener,
                    None,
                    &cfg,
                    None,
                    &crate::control::Workers::new(),
                ))
            }
            pid => Ok(pid),
        }
    }
}

/// Starts and joins two threads, once, before any fork: what the first
/// threads of a process set up (glibc's cache of thread stacks and its
/// per-thread malloc arenas, Rust's lookup of optional libc symbols,
/// stdio locking) is then inherited by every child, which starts its own
/// threads (a vCPU, a control connection) without doing it again. The
/// process is single-threaded again when this returns.
fn warm_up_threads() {
    let threads: Vec<_> = (0..2)
        .map(|i| {
            std::thread::Builder::new()
                .name(format!("warm-up{i}"))
                .spawn(|| std::hint::black_box(vec![0u8; 64]).len())
        })
        .collect();
    for t in threads.into_iter().flatten() {
        let _ = t.join();
    }
}

/// Creates a child's directory `dir` and binds its control socket there,
/// before the child runs: the socket exists when the caller hears of the
/// child, and early clients wait in its backlog.
fn make_child_dir(dir: &Path) -> Result<UnixListener, BoxError> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    Ok(crate::control::bind(&dir.join("control.sock"))?)
}

/// Closes descriptors a child inherited from the server and has no use for.
fn close_all(fds: &[RawFd]) {
    for &fd in fds {
        // SAFETY: the descriptor is the parent's, inherited and unused here.
        unsafe { libc::close(fd) };
    }
}

/// Children forked ahead of requests, each parked with its restore prepared.
struct Pool {
    /// How many to keep.
    target: usize,
    /// Where pooled children make their directories ahead (`<pid>/`).
    staging: PathBuf,
    /// Oldest first (the likeliest to be ready).
    parked: VecDeque<Parked>,
    /// When a parked child last died without being handed out: refills
    /// slow down after that, so a restore that cannot succeed (its
    /// snapshot gone, KVM refusing) does not turn into a fork loop.
    last_loss: Option<Instant>,
    /// Pooled children prepare at `SCHED_IDLE` (this process may raise a
    /// thread back from it).
    idle_prepare: bool,
    /// New pooled children make their `console.log` ahead too: the last
    /// request that took pooled children asked for one (the daemon's do).
    stage_console: bool,
    /// The links of children handed out that do not run yet (each closes
    /// its end once its machine runs), and since when the oldest waits.
    starting: Vec<OwnedFd>,
    starting_since: Option<Instant>,
    /// No refill before this: the children handed out last are up and
    /// taking their first requests.
    settle_until: Option<Instant>,
    /// Children handed out since the pool last refilled.
    handed_out: usize,
}

/// One parked child.
struct Parked {
    pid: i32,
    /// The server's end of the child's link: the order goes here, and its
    /// closing (the server gone) tells a parked child to exit.
    link: OwnedFd,
    /// It said it is ready: restore prepared, directory staged.
    ready: bool,
}

/// What the pool wants of the server's loop.
enum Refill {
    /// A child now.
    Now,
    /// A child, but not before this wait (a parked child died lately).
    After(Duration),
    /// Nothing: the pool is full.
    No,
}

/// Pause between refills after a parked child died unasked.
const REFILL_BACKOFF: Duration = Duration::from_secs(1);

/// Longest a refill waits for the children handed out to run.
const STARTING_WAIT: Duration = Duration::from_secs(1);

/// How often the server looks whether the children handed out run.
const STARTING_LOOK: Duration = Duration::from_millis(5);

/// How long a refill waits after those children run, per child: about
/// what a child's first answer costs in CPU on the development machine
/// (0.3-0.4 ms), halved for its two cores.
const SETTLE_PER_CHILD: Duration = Duration::from_micros(200);

/// Most a refill waits after the children handed out run.
const MAX_SETTLE: Duration = Duration::from_millis(200);

impl Pool {
    /// A pool of `target` children staging their directories in `staging`
    /// (made afresh; whatever a server before this one left there goes).
    fn new(target: usize, staging: PathBuf) -> Result<Self, BoxError> {
        if target > 0 {
            let _ = std::fs::remove_dir_all(&staging);
            std::fs::create_dir_all(&staging).map_err(|e| {
                format!(
                    "cannot create the pool's staging directory {}: {e}",
                    staging.display()
                )
            })?;
        }
        Ok(Pool {
            target,
            staging,
            parked: VecDeque::with_capacity(target),
            last_loss: None,
            idle_prepare: target > 0 && idle_is_reversible(),
            stage_console: false,
            starting: Vec::new(),
            starting_since: None,
            settle_until: None,
            handed_out: 0,
        })
    }

    /// Lets the parked children go (their links close: they remove their
    /// staged directories and exit) and removes the staging directory,
    /// trying for a while: a child may still be making its directory,
    /// which it cannot do once the staging directory is gone.
    fn remove_staging(&mut self) {
        self.parked.clear();
        if self.target == 0 {
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        while std::fs::remove_dir_all(&self.staging).is_err()
            && self.staging.exists()
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn refill_wanted(&self) -> Refill {
        if self.parked.len() >= self.target {
            return Refill::No;
        }
        // A refill waits for the children just handed out: the forks, KVM
        // VMs and files it makes run at SCHED_IDLE but in long stretches of
        // kernel code that a kernel without preemption does not cut short,
        // so they would delay those children on their way to answering.
        // Their links are looked at every STARTING_LOOK, not waited on: one
        // wake-up of the server per child would cost the children CPU.
        if let Some(since) = self.starting_since {
            let waited = since.elapsed();
            if waited < STARTING_WAIT {
                return Refill::After((STARTING_WAIT - waited).min(STARTING_LOOK));
            }
        }
        if let Some(until) = self.settle_until {
            let now = Instant::now();
            if now < until {
                return Refill::After(until - now);
            }
        }
        match self.last_loss.map(|t| t.elapsed()) {
            Some(since) if since < REFILL_BACKOFF => Refill::After(REFILL_BACKOFF - since),
            _ => Refill::Now,
        }
    }

    /// The server's ends of every link, for a new child to close.
    fn links(&self) -> Vec<RawFd> {
        self.parked
            .iter()
            .map(|p| p.link.as_raw_fd())
            .chain(self.starting.iter().map(|l| l.as_raw_fd()))
            .collect()
    }

    /// Drops the links of children handed out that closed them (they run,
    /// or died), in one poll without waiting; when none is left, the
    /// refill waits a little longer, for the first requests those children
    /// take (the daemon's first ping follows the answer at once).
    fn check_started(&mut self) {
        if self.starting.is_empty() {
            return;
        }
        let mut fds: Vec<libc::pollfd> = self
            .starting
            .iter()
            .map(|l| libc::pollfd {
                fd: l.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: `fds` is a valid array of pollfd of the length given; no wait.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 0) };
        if n > 0 {
            for i in (0..fds.len()).rev() {
                if fds[i].revents != 0 && matches!(read_link(&self.starting[i]), LinkNews::Closed) {
                    self.starting.swap_remove(i);
                }
            }
        }
        self.update_starting();
    }

    /// After a change to `starting`: start or end the wait for it.
    fn update_starting(&mut self) {
        if !self.starting.is_empty() {
            if self
                .starting_since
                .is_some_and(|t| t.elapsed() >= STARTING_WAIT)
            {
                // Stuck children do not hold the pool empty for ever.
                self.starting.clear();
            } else {
                self.starting_since.get_or_insert_with(Instant::now);
                return;
            }
        }
        if self.starting_since.take().is_some() {
            let settle = SETTLE_PER_CHILD * self.handed_out.min(MAX_CHILDREN as usize) as u32;
            self.settle_until = Some(Instant::now() + settle.min(MAX_SETTLE));
            self.handed_out = 0;
        }
    }

    /// Reads what the parked children at `indices` (of `parked`,
    /// ascending) said: that they are ready, or (their link closed) that
    /// they died, which drops them.
    fn check(&mut self, indices: &[usize]) {
        for &i in indices.iter().rev() {
            // Everything there is: its "ready" may be followed by its end.
            loop {
                match read_link(&self.parked[i].link) {
                    LinkNews::Ready => self.parked[i].ready = true,
                    LinkNews::Nothing => break,
                    LinkNews::Closed => {
                        let gone = self.parked.remove(i).expect("an index of parked");
                        eprintln!(
                            "forkd-vmm fork-server: pooled child {} ended before it was asked for",
                            gone.pid
                        );
                        let _ = std::fs::remove_dir_all(self.staging.join(gone.pid.to_string()));
                        self.last_loss = Some(Instant::now());
                        break;
                    }
                }
            }
        }
    }

    /// Reads what every parked child said since the last look, without
    /// waiting.
    fn refresh(&mut self) {
        let said: Vec<usize> = (0..self.parked.len())
            .filter(|&i| {
                let mut fd = libc::pollfd {
                    fd: self.parked[i].link.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd; no wait.
                unsafe { libc::poll(&mut fd, 1, 0) > 0 }
            })
            .collect();
        self.check(&said);
    }

    /// Forks one more parked child (whose restore is prepared in the
    /// child, in parallel with whatever the server does next).
    fn add_one(&mut self, forker: &Forker, close_in_child: &[RawFd]) {
        let (ours, theirs) = match link_pair() {
            Ok(pair) => pair,
            Err(e) => {
                eprintln!("forkd-vmm fork-server: cannot make a pooled child's link: {e}");
                self.last_loss = Some(Instant::now());
                return;
            }
        };
        // The fork itself and the child from its first instruction run
        // where nothing else wants the CPU: a refill right after an answer
        // must not slow the children just handed out.
        if self.idle_prepare {
            let _ = set_scheduler(0, libc::SCHED_IDLE);
        }
        // SAFETY: this process is single-threaded (checked when the Forker
        // was made), so the child is a complete copy of it and may go on
        // running Rust code.
        let pid = unsafe { libc::fork() };
        if self.idle_prepare && pid != 0 {
            if let Err(e) = set_scheduler(0, libc::SCHED_OTHER) {
                eprintln!("forkd-vmm fork-server: cannot leave SCHED_IDLE: {e}");
            }
        }
        match pid {
            -1 => {
                eprintln!(
                    "forkd-vmm fork-server: cannot fork a pooled child: {}",
                    std::io::Error::last_os_error()
                );
                self.last_loss = Some(Instant::now());
            }
            0 => {
                close_all(close_in_child);
                close_all(&self.links());
                drop(ours);
                std::process::exit(pooled_child(
                    forker,
                    theirs,
                    self.idle_prepare,
                    &self.staging,
                    self.stage_console,
                ))
            }
            pid => self.parked.push_back(Parked {
                pid,
                link: ours,
                ready: false,
            }),
        }
    }

    /// Hands a parked child the child directory `dir`: the oldest ready
    /// one, whose staged directory becomes `dir` by a rename, or else the
    /// oldest one, for which `dir` and its control socket are made here.
    /// Its pid, or None when the pool is empty.
    fn hand_out(
        &mut self,
        dir: &Path,
        options: ChildOptions,
        netns: Option<&str>,
    ) -> Result<Option<i32>, BoxError> {
        self.stage_console = options.console_log;
        while !self.parked.is_empty() {
            let at = self.parked.iter().position(|p| p.ready).unwrap_or(0);
            let parked = self.parked.remove(at).expect("an index of parked");
            if self.idle_prepare {
                // A child still preparing finishes at normal priority (it
                // raises itself when it reads the order, too late for that).
                let _ = set_scheduler(parked.pid, libc::SCHED_OTHER);
            }
            let staged = self.staging.join(parked.pid.to_string());
            // An empty directory in the way is replaced; anything else
            // (files in it, another file system) takes the slower way.
            let renamed = parked.ready && std::fs::rename(&staged, dir).is_ok();
            let listener = if renamed {
                None
            } else {
                Some(make_child_dir(dir)?)
            };
            match send_order(
                &parked.link,
                dir,
                options,
                netns,
                listener.as_ref().map(|l| l.as_fd()),
            ) {
                // The child closes its end once it runs.
                Ok(()) => {
                    self.starting.push(parked.link);
                    self.handed_out += 1;
                    self.update_starting();
                    return Ok(Some(parked.pid));
                }
                // It died since the last look (EPIPE, ECONNRESET): the next one.
                Err(e) => {
                    eprintln!(
                        "forkd-vmm fork-server: pooled child {} cannot take a request: {e}",
                        parked.pid
                    );
                    let _ = std::fs::remove_dir_all(if renamed { dir } else { &staged });
                }
            }
        }
        Ok(None)
    }
}

/// What a parked child's link holds, read without waiting.
enum LinkNews {
    /// Its one-byte "ready" message.
    Ready,
    /// Its end: the child is gone.
    Closed,
    /// Nothing (more) yet.
    Nothing,
}

fn read_link(link: &OwnedFd) -> LinkNews {
    let mut byte = 0u8;
    // SAFETY: `byte` is a valid one-byte buffer; no wait.
    let n = unsafe {
        libc::recv(
            link.as_raw_fd(),
            (&mut byte as *mut u8).cast(),
            1,
            libc::MSG_DONTWAIT,
        )
    };
    match n {
        1.. => LinkNews::Ready,
        0 => LinkNews::Closed,
        _ => match std::io::Error::last_os_error().kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted => LinkNews::Nothing,
            _ => LinkNews::Closed,
        },
    }
}

/// A `SOCK_SEQPACKET` pair (one order is one message; a closed end reads
/// as end of file), close-on-exec: (the server's end, the child's end).
fn link_pair() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [-1; 2];
    // SAFETY: `fds` is a valid array of two ints for the new descriptors.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: socketpair succeeded: both descriptors are new and ours alone.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Option bits of an order.
const ORDER_PAUSED: u8 = 1;
const ORDER_CONSOLE_LOG: u8 = 2;
/// An order's header: the option byte and the length of the namespace name.
const ORDER_HEADER: usize = 2;
/// Longest order: its header, a network namespace name and a directory path.
const MAX_ORDER: usize = ORDER_HEADER + MAX_NETNS_LEN + libc::PATH_MAX as usize;

/// Sends a parked child its order: one message of an option byte, the
/// length of the network namespace's name (0: none), the name, and the
/// directory's path, carrying the control socket's listener when the
/// server made it (the child's own staged one otherwise).
fn send_order(
    link: &OwnedFd,
    dir: &Path,
    options: ChildOptions,
    netns: Option<&str>,
    listener: Option<std::os::fd::BorrowedFd<'_>>,
) -> std::io::Result<()> {
    let path = dir.as_os_str().as_bytes();
    let ns = netns.unwrap_or("").as_bytes();
    if ns.len() > MAX_NETNS_LEN {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("the network namespace name {netns:?} is too long"),
        ));
    }
    if ORDER_HEADER + ns.len() + path.len() > MAX_ORDER {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("the child directory {} is too long a path", dir.display()),
        ));
    }
    let mut data = Vec::with_capacity(ORDER_HEADER + ns.len() + path.len());
    data.push(
        if options.paused { ORDER_PAUSED } else { 0 }
            | if options.console_log {
                ORDER_CONSOLE_LOG
            } else {
                0
            },
    );
    data.push(ns.len() as u8);
    data.extend_from_slice(ns);
    data.extend_from_slice(path);
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: data.len(),
    };
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) } as usize;
    let mut control = vec![0u8; space];
    // SAFETY: msghdr is plain old data; every field used is set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if let Some(listener) = listener {
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: `msg` points at `control`, which has room for one cmsghdr
        // carrying one descriptor (CMSG_SPACE above); CMSG_FIRSTHDR is
        // non-null for a control buffer that large, and CMSG_DATA points
        // inside it.
        unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            (*cmsg).cmsg_level = libc::SOL_SOCKET;
            (*cmsg).cmsg_type = libc::SCM_RIGHTS;
            (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as _;
            std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), listener.as_raw_fd());
        }
    }
    // SAFETY: `msg` and what it points at are valid for the call; MSG_NOSIGNAL
    // turns a dead peer into EPIPE instead of a signal.
    let sent = unsafe { libc::sendmsg(link.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if sent < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// An order as a parked child reads it.
struct Order {
    /// The child's directory.
    dir: PathBuf,
    options: ChildOptions,
    /// The network namespace its taps are in (`None`: the server's).
    netns: Option<String>,
    /// The control socket the server made, when it did not rename the
    /// child's staged directory.
    listener: Option<UnixListener>,
}

/// Waits for this parked child's order: `None` when the server closed the
/// link without one (it is gone).
fn receive_order(link: &OwnedFd) -> std::io::Result<Option<Order>> {
    let mut data = vec![0u8; MAX_ORDER];
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) } as usize;
    let mut control = vec![0u8; space];
    loop {
        let mut iov = libc::iovec {
            iov_base: data.as_mut_ptr().cast(),
            iov_len: data.len(),
        };
        // SAFETY: msghdr is plain old data; every field used is set below.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        // SAFETY: `msg` points at buffers that live across the call.
        let n = unsafe { libc::recvmsg(link.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Ok(None);
        }
        // SAFETY: recvmsg filled `msg`; CMSG_FIRSTHDR/CMSG_DATA stay within
        // `control` (msg_controllen says how much of it is valid).
        let fd = unsafe {
            let cmsg = libc::CMSG_FIRSTHDR(&msg);
            if cmsg.is_null()
                || (*cmsg).cmsg_level != libc::SOL_SOCKET
                || (*cmsg).cmsg_type != libc::SCM_RIGHTS
            {
                None
            } else {
                Some(std::ptr::read_unaligned(
                    libc::CMSG_DATA(cmsg).cast::<RawFd>(),
                ))
            }
        };
        // SAFETY: the descriptor arrived with the message: it is new in this
        // process and ours alone.
        let listener = fd.map(|fd| unsafe { UnixListener::from_raw_fd(fd) });
        let n = n as usize;
        let malformed =
            || std::io::Error::new(std::io::ErrorKind::InvalidData, "a malformed order");
        if msg.msg_flags & libc::MSG_TRUNC != 0 || n < ORDER_HEADER {
            return Err(malformed());
        }
        let options = ChildOptions {
            paused: data[0] & ORDER_PAUSED != 0,
            console_log: data[0] & ORDER_CONSOLE_LOG != 0,
            memfd: false,
        };
        let path_at = ORDER_HEADER + usize::from(data[1]);
        if path_at >= n {
            return Err(malformed());
        }
        let netns = match &data[ORDER_HEADER..path_at] {
            [] => None,
            name => Some(String::from_utf8(name.to_vec()).map_err(|_| malformed())?),
        };
        let dir = PathBuf::from(std::ffi::OsStr::from_bytes(&data[path_at..n]));
        return Ok(Some(Order {
            dir,
            options,
            netns,
            listener,
        }));
    }
}

/// Sets the scheduling policy of thread `tid` (0: the calling thread),
/// with static priority 0 (what `SCHED_OTHER` and `SCHED_IDLE` take).
fn set_scheduler(tid: libc::pid_t, policy: libc::c_int) -> std::io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid sched_param for the call.
    if unsafe { libc::sched_setscheduler(tid, policy, &param) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Whether a thread of this process that went to `SCHED_IDLE` may come
/// back to `SCHED_OTHER` (CAP_SYS_NICE or a high enough RLIMIT_NICE):
/// tried on the calling thread, which ends where it started.
fn idle_is_reversible() -> bool {
    // SAFETY: sched_getscheduler has no memory-safety preconditions.
    if unsafe { libc::sched_getscheduler(0) } != libc::SCHED_OTHER {
        return false;
    }
    if set_scheduler(0, libc::SCHED_IDLE).is_err() {
        return false;
    }
    if set_scheduler(0, libc::SCHED_OTHER).is_ok() {
        return true;
    }
    eprintln!(
        "forkd-vmm fork-server: this process cannot raise a thread back from SCHED_IDLE \
         (no CAP_SYS_NICE) and stays there; run it as root"
    );
    false
}

/// A pooled child: prepares its restore (at `SCHED_IDLE`, from its fork,
/// when `idle`) and
/// its directory under `staging`, says it is ready, parks until the server
/// hands it a request (or goes away), then becomes that request's child,
/// at normal priority.
fn pooled_child(
    forker: &Forker,
    link: OwnedFd,
    idle: bool,
    staging: &Path,
    stage_console: bool,
) -> i32 {
    // SAFETY: restoring the default disposition has no preconditions; a
    // fork server ignores SIGCHLD and its children must not inherit that.
    unsafe { libc::signal(libc::SIGCHLD, libc::SIG_DFL) };
    // Whoever reads the server's stdout must not wait for parked children;
    // stderr stays the server's until the child has a directory, so a
    // restore that cannot be prepared is reported in the server's log.
    for to in [0, 1] {
        // SAFETY: both descriptors are open; dup2 replaces `to` atomically.
        unsafe { libc::dup2(forker.null.as_raw_fd(), to) };
    }
    // Its own session now: the server's terminal signals do not reach it.
    // SAFETY: setsid has no memory-safety preconditions.
    unsafe { libc::setsid() };
    // SAFETY: getpid has no preconditions.
    let staged = staging.join(unsafe { libc::getpid() }.to_string());
    let ahead = match prepare_pooled(forker, &staged, stage_console) {
        Ok(p) => p,
        Err(e) => {
            eprintln!(
                "forkd-vmm pooled child: cannot prepare a restore of {}: {e}",
                forker.snapshot.dir.display()
            );
            let _ = std::fs::remove_dir_all(&staged);
            return 2;
        }
    };
    set_name(POOLED_NAME);
    // A closed link (the server gone) fails the send; the wait below sees it.
    // SAFETY: a one-byte buffer; MSG_NOSIGNAL turns a closed peer into EPIPE.
    unsafe {
        libc::send(
            link.as_raw_fd(),
            b"R".as_ptr().cast(),
            1,
            libc::MSG_NOSIGNAL,
        )
    };
    let order = receive_order(&link);
    if idle {
        // This thread first, then the threads it started while idle.
        let threads = ahead.prepared.vcpu_thread_ids().into_iter();
        let threads = threads.chain([ahead.worker]);
        for tid in std::iter::once(0).chain(threads) {
            if let Err(e) = set_scheduler(tid, libc::SCHED_OTHER) {
                eprintln!("forkd-vmm pooled child: cannot leave SCHED_IDLE: {e}");
            }
        }
    }
    set_name("forkd-vmm");
    match order {
        Ok(Some(order)) => {
            let mut cfg = forker.child_config(&order.dir, order.options, order.netns.as_deref());
            let (listener, log) = match order.listener {
                // The server renamed the staged directory to `order.dir`.
                None => {
                    if stage_console && !order.options.console_log {
                        let _ = std::fs::remove_file(order.dir.join(CONSOLE_LOG));
                    }
                    if stage_console && order.options.console_log {
                        // The console opened ahead, in the directory now
                        // at `order.dir`: said so by naming it as it was.
                        cfg.console = ahead.console.clone();
                    }
                    (ahead.listener, Some(ahead.log))
                }
                // The server made the directory and socket: ours go.
                Some(listener) => {
                    drop(ahead.listener);
                    let _ = std::fs::remove_dir_all(&staged);
                    (listener, None)
                }
            };
            child(
                forker,
                &order.dir,
                listener,
                log,
                &cfg,
                Some(Handed {
                    prepared: ahead.prepared,
                    link,
                }),
                &ahead.workers,
            )
        }
        // The server is gone: nobody will ask for this child.
        Ok(None) => {
            let _ = std::fs::remove_dir_all(&staged);
            0
        }
        Err(e) => {
            eprintln!("forkd-vmm pooled child: cannot take its order: {e}");
            let _ = std::fs::remove_dir_all(&staged);
            2
        }
    }
}

/// What a pooled child makes ahead.
struct Ahead<'a> {
    /// Its restore, with its vCPU threads started (each has made its first
    /// KVM_RUN) and its devices made ([`PreparedRestore::make_ahead`]).
    prepared: PreparedRestore<'a>,
    /// The console its devices were made with: its staged `console.log`
    /// or nowhere.
    console: ConsoleOutput,
    /// Its control connection workers, one started.
    workers: crate::control::Workers,
    /// The kernel thread id of that worker.
    worker: libc::pid_t,
    /// Its control socket, bound in its staged directory.
    listener: UnixListener,
    /// Its `vmm.log`, open in its staged directory.
    log: std::fs::File,
}

/// Makes what a pooled child makes ahead, its directory as `staged` (with
/// an empty `console.log` when `stage_console`).
fn prepare_pooled<'a>(
    forker: &'a Forker,
    staged: &Path,
    stage_console: bool,
) -> Result<Ahead<'a>, String> {
    // Not create_dir_all: once the server has removed the staging
    // directory (it is stopping), no child makes it again.
    std::fs::create_dir(staged).map_err(|e| format!("cannot create {}: {e}", staged.display()))?;
    let listener = crate::control::bind(&staged.join("control.sock")).map_err(|e| e.to_string())?;
    let log = open_log(staged).map_err(|e| format!("cannot create its vmm.log: {e}"))?;
    // Creates the console log when staged.
    let console = if stage_console {
        ConsoleOutput::File(staged.join(CONSOLE_LOG))
    } else {
        ConsoleOutput::Sink
    };
    // Devices and identity first: the vCPU threads may run the guest
    // ahead to its first wait, which must see them.
    let mut prepared = builder::prepare_restore(
        &forker.snapshot,
        forker.kvm.clone(),
        RestoreRam::SnapshotFile,
    )
    .and_then(|p| p.make_ahead(&console))
    .map_err(|e| e.to_string())?;
    prepared.start_vcpu_threads().map_err(|e| e.to_string())?;
    let workers = crate::control::Workers::new();
    let worker = workers
        .start_one()
        .map_err(|e| format!("cannot start a control worker: {e}"))?;
    Ok(Ahead {
        prepared,
        console,
        workers,
        worker,
        listener,
        log,
    })
}

/// Opens (creating) `<dir>/vmm.log` for appending.
fn open_log(dir: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("vmm.log"))
}

/// Sets this process's name (`comm`, at most 15 bytes).
fn set_name(name: &str) {
    let mut buf = [0u8; 16];
    let len = name.len().min(15);
    buf[..len].copy_from_slice(&name.as_bytes()[..len]);
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16
    // bytes, which `buf` is.
    unsafe { libc::prctl(libc::PR_SET_NAME, buf.as_ptr()) };
}

/// What a pooled child brings to [`child`] from its wait.
struct Handed<'a> {
    /// Its restore, made ahead.
    prepared: PreparedRestore<'a>,
    /// Its link to the server, closed once the machine runs: the server
    /// waits for that before it refills its pool.
    link: OwnedFd,
}

/// The child: detach from the parent's session and standard streams,
/// restore (finishing the restore `handed` over when it was made ahead),
/// serve until the VM ends.
fn child(
    forker: &Forker,
    dir: &Path,
    listener: UnixListener,
    log: Option<std::fs::File>,
    cfg: &RestoreConfig,
    handed: Option<Handed<'_>>,
    workers: &crate::control::Workers,
) -> i32 {
    let snapshot = &forker.snapshot;
    let socket = dir.join("control.sock");
    // SAFETY: restoring the default disposition has no preconditions; a
    // fork server ignores SIGCHLD and its children must not inherit that.
    unsafe { libc::signal(libc::SIGCHLD, libc::SIG_DFL) };
    if let Err(e) = detach(dir, &forker.null, log) {
        eprintln!("forkd-vmm child: {e}");
        return 2;
    }
    let (prepared, link) = match handed {
        Some(h) => (Some(h.prepared), Some(h.link)),
        None => (None, None),
    };
    let built = match prepared {
        Some(p) => p.finish(cfg),
        None => builder::prepare_restore(snapshot, forker.kvm.clone(), cfg.ram)
            .and_then(|p| p.finish(cfg)),
    };
    match built {
        Ok(machine) => {
            drop(link);
            let code =
                crate::serve_until_exit(Arc::new(machine), Some(listener), Some(&socket), workers);
            if code == ExitCode::SUCCESS {
                0
            } else {
                1
            }
        }
        Err(e) => {
            eprintln!(
                "forkd-vmm child: cannot restore {}: {e}",
                snapshot.dir.display()
            );
            let _ = std::fs::remove_file(&socket);
            2
        }
    }
}

/// New session (the parent's terminal signals no longer reach the child);
/// stdin and stdout to /dev/null, stderr to `<dir>/vmm.log` (`log` when it
/// is open already), so whoever reads the parent's output sees its end
/// when the parent returns.
fn detach(dir: &Path, null: &std::fs::File, log: Option<std::fs::File>) -> std::io::Result<()> {
    // SAFETY: setsid has no memory-safety preconditions (a pooled child is
    // a session leader already, and this fails harmlessly).
    unsafe { libc::setsid() };
    let log = match log {
        Some(log) => log,
        None => open_log(dir)?,
    };
    for (from, to) in [(null, 0), (null, 1), (&log, 2)] {
        // SAFETY: both descriptors are open; dup2 replaces `to` atomically.
        if unsafe { libc::dup2(from.as_raw_fd(), to) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}
