//! `forkd-vmm fork`: N children of one snapshot from one pre-initialised
//! process.
//!
//! The snapshot is read and checked once (metadata, vmstate checksum and
//! decode, memory file size); then this process, still single-threaded,
//! binds each child's control socket and forks. A child only creates its
//! KVM VM, maps the memory file copy-on-write, restores its vCPUs and
//! devices from the already-parsed state and starts serving. The parent
//! prints one JSON line per child and returns; the children run on.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;
use vmm::builder::{self, RestoreConfig};
use vmm::devices::serial::ConsoleOutput;
use vmm::snapshot::PreparedSnapshot;

/// Most children one call starts.
pub const MAX_CHILDREN: u32 = 1000;

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
}

pub fn fork(args: ForkArgs) -> Result<ExitCode, Box<dyn std::error::Error>> {
    if !(1..=MAX_CHILDREN).contains(&args.count) {
        return Err(format!(
            "-n {} is out of range: start 1 to {MAX_CHILDREN} children",
            args.count
        )
        .into());
    }
    let threads = std::fs::read_dir("/proc/self/task")?.count();
    if threads != 1 {
        return Err(
            format!("the fork parent must be single-threaded, it has {threads} threads").into(),
        );
    }
    let snapshot = PreparedSnapshot::load(&args.snapshot)?;
    let has_vsock = snapshot.state.devices.virtio.iter().any(|d| {
        matches!(
            d.device,
            vmm::devices::virtio::manager::DeviceState::Vsock(_)
        )
    });
    std::fs::create_dir_all(&args.out_dir)
        .map_err(|e| format!("cannot create {}: {e}", args.out_dir.display()))?;
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    for index in 0..args.count {
        let dir = args.out_dir.join(index.to_string());
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let socket = dir.join("control.sock");
        // Bound here, before the fork: the socket exists when this command
        // returns, and early clients wait in its backlog.
        let listener = crate::control::bind(&socket)?;
        // The child's own disk layers and vsock socket, when the snapshot has drives / vsock.
        let drive_layers: Vec<PathBuf> = (0..snapshot.meta.disks.len())
            .map(|j| dir.join(format!("disk{j}.cow")))
            .collect();
        let vsock = has_vsock.then(|| dir.join("vsock.sock"));
        let console = if args.console_log {
            ConsoleOutput::File(dir.join("console.log"))
        } else {
            ConsoleOutput::Sink
        };
        stdout.flush()?;
        // SAFETY: this process is single-threaded (checked above), so the
        // child is a complete copy of it and may go on running Rust code.
        let pid = unsafe { libc::fork() };
        match pid {
            -1 => return Err(format!("fork failed: {}", std::io::Error::last_os_error()).into()),
            0 => {
                let cfg = RestoreConfig {
                    console,
                    paused: args.paused,
                    drive_layers: drive_layers.clone(),
                    vsock_uds: vsock.clone(),
                };
                let code = child(&snapshot, &dir, listener, &socket, &cfg);
                std::process::exit(code);
            }
            pid => {
                drop(listener);
                let line = serde_json::json!({
                    "index": index,
                    "pid": pid,
                    "dir": dir,
                    "control_socket": socket,
                    "vsock_socket": vsock,
                });
                writeln!(stdout, "{line}")?;
            }
        }
    }
    stdout.flush()?;
    Ok(ExitCode::SUCCESS)
}

/// The child: detach from the parent's session and standard streams,
/// restore, serve until the VM ends.
fn child(
    snapshot: &PreparedSnapshot,
    dir: &Path,
    listener: std::os::unix::net::UnixListener,
    socket: &Path,
    cfg: &RestoreConfig,
) -> i32 {
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
