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

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use proto::control::{ForkRequest, ForkResponse, ForkedChild, MAX_REQUEST_BYTES};
use vmm::builder::{self, RestoreConfig, RestoreRam};
use vmm::devices::serial::ConsoleOutput;
use vmm::devices::virtio::manager::DeviceState;
use vmm::snapshot::PreparedSnapshot;

/// Most children one request starts.
pub const MAX_CHILDREN: u32 = 1000;

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
}

#[derive(Args)]
pub struct ForkServerArgs {
    /// Snapshot directory.
    #[arg(long)]
    snapshot: PathBuf,
    /// Unix socket to take fork requests on (created; removed on exit).
    #[arg(long)]
    socket: PathBuf,
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
        &[],
    )?;
    let mut stdout = std::io::stdout().lock();
    for child in children {
        writeln!(stdout, "{}", serde_json::to_string(&child)?)?;
    }
    stdout.flush()?;
    Ok(ExitCode::SUCCESS)
}

/// `forkd-vmm fork-server`: one request per connection, served in order on
/// the main thread (forking needs a single-threaded process).
pub fn fork_server(args: ForkServerArgs) -> Result<ExitCode, BoxError> {
    let forker = Forker::new(&args.snapshot)?;
    // Children are reaped by the kernel: nobody waits for them here.
    // SAFETY: setting a signal disposition has no memory-safety preconditions.
    unsafe { libc::signal(libc::SIGCHLD, libc::SIG_IGN) };
    let listener = crate::control::bind(&args.socket)?;
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        if serve_one(&forker, stream, listener.as_raw_fd()) {
            break;
        }
    }
    let _ = std::fs::remove_file(&args.socket);
    Ok(ExitCode::SUCCESS)
}

/// Answers one request; true when the server should stop. The children
/// close the server's listening socket (`listener`) and this connection.
fn serve_one(forker: &Forker, stream: UnixStream, listener: RawFd) -> bool {
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
        }) => {
            match forker.spawn(
                n,
                &out_dir,
                ChildOptions {
                    paused,
                    console_log,
                    memfd,
                },
                &[listener, stream.as_raw_fd()],
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

/// A parsed snapshot, ready to fork children of.
struct Forker {
    snapshot: PreparedSnapshot,
    has_vsock: bool,
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
        let has_vsock = snapshot
            .state
            .devices
            .virtio
            .iter()
            .any(|d| matches!(d.device, DeviceState::Vsock(_)));
        Ok(Forker {
            snapshot,
            has_vsock,
        })
    }

    /// Forks `n` children under `out_dir`; each closes `close_in_child`
    /// (descriptors of the parent's that are none of a child's business).
    fn spawn(
        &self,
        n: u32,
        out_dir: &Path,
        options: ChildOptions,
        close_in_child: &[RawFd],
    ) -> Result<Vec<ForkedChild>, BoxError> {
        if !(1..=MAX_CHILDREN).contains(&n) {
            return Err(format!("{n} children is out of range: start 1 to {MAX_CHILDREN}").into());
        }
        std::fs::create_dir_all(out_dir)
            .map_err(|e| format!("cannot create {}: {e}", out_dir.display()))?;
        // Flushed before every fork so no buffered output is written twice.
        std::io::stdout().flush()?;
        (0..n)
            .map(|index| self.spawn_one(index, out_dir, options, close_in_child))
            .collect()
    }

    fn spawn_one(
        &self,
        index: u32,
        out_dir: &Path,
        options: ChildOptions,
        close_in_child: &[RawFd],
    ) -> Result<ForkedChild, BoxError> {
        let dir = out_dir.join(index.to_string());
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let control_socket = dir.join("control.sock");
        // Bound here, before the fork: the socket exists when the caller
        // hears of the child, and early clients wait in its backlog.
        let listener = crate::control::bind(&control_socket)?;
        let vsock_socket = self.has_vsock.then(|| dir.join("vsock.sock"));
        let cfg = RestoreConfig {
            console: if options.console_log {
                ConsoleOutput::File(dir.join("console.log"))
            } else {
                ConsoleOutput::Sink
            },
            paused: options.paused,
            drive_layers: (0..self.snapshot.meta.disks.len())
                .map(|j| dir.join(format!("disk{j}.cow")))
                .collect(),
            vsock_uds: vsock_socket.clone(),
            // The copy happens in the child, after the fork: children copy
            // in parallel and the parent stays small.
            ram: if options.memfd {
                RestoreRam::Memfd
            } else {
                RestoreRam::SnapshotFile
            },
        };
        // SAFETY: this process is single-threaded (checked when the Forker
        // was made; nothing here starts threads), so the child is a complete
        // copy of it and may go on running Rust code.
        match unsafe { libc::fork() } {
            -1 => Err(format!("fork failed: {}", std::io::Error::last_os_error()).into()),
            0 => {
                for &fd in close_in_child {
                    // SAFETY: the descriptor is the parent's, inherited and unused here.
                    unsafe { libc::close(fd) };
                }
                std::process::exit(child(&self.snapshot, &dir, listener, &control_socket, &cfg))
            }
            pid => Ok(ForkedChild {
                index,
                pid,
                dir,
                control_socket,
                vsock_socket,
            }),
        }
    }
}

/// The child: detach from the parent's session and standard streams,
/// restore, serve until the VM ends.
fn child(
    snapshot: &PreparedSnapshot,
    dir: &Path,
    listener: UnixListener,
    socket: &Path,
    cfg: &RestoreConfig,
) -> i32 {
    // SAFETY: restoring the default disposition has no preconditions; a
    // fork server ignores SIGCHLD and its children must not inherit that.
    unsafe { libc::signal(libc::SIGCHLD, libc::SIG_DFL) };
    if let Err(e) = detach(dir) {
        eprintln!("forkd-vmm child: {e}");
        return 2;
    }
    match builder::build_from_snapshot(snapshot, cfg) {
        Ok(machine) => {
            let code =
                crate::serve_until_exit(std::sync::Arc::new(machine), Some(listener), Some(socket));
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
            let _ = std::fs::remove_file(socket);
            2
        }
    }
}

/// New session (the parent's terminal signals no longer reach the child);
/// stdin and stdout to /dev/null, stderr to `<dir>/vmm.log`, so whoever reads
/// the parent's output sees its end when the parent returns.
fn detach(dir: &Path) -> std::io::Result<()> {
    // SAFETY: setsid has no memory-safety preconditions.
    unsafe { libc::setsid() };
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("vmm.log"))?;
    for (from, to) in [(&null, 0), (&null, 1), (&log, 2)] {
        // SAFETY: both descriptors are open; dup2 replaces `to` atomically.
        if unsafe { libc::dup2(from.as_raw_fd(), to) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}
