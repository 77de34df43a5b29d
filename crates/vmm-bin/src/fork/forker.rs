//! The parsed snapshot children are forked from, and the fork of a batch.

use std::io::Write;
use std::os::fd::RawFd;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::Arc;

use proto::control::ForkedChild;
use vmm::builder::{RestoreConfig, RestoreRam};
use vmm::devices::serial::ConsoleOutput;
use vmm::devices::virtio::manager::DeviceState;
use vmm::snapshot::PreparedSnapshot;

use super::child::child;
use super::pool::Pool;
use super::{BoxError, ChildOptions, CONSOLE_LOG, MAX_CHILDREN};

/// A parsed snapshot, ready to fork children of, and what every child
/// would otherwise open for itself.
pub(super) struct Forker {
    pub(super) snapshot: PreparedSnapshot,
    has_vsock: bool,
    /// /dev/kvm, opened once: children create their VMs through it.
    pub(super) kvm: Arc<vmm::kvm::vm::Kvm>,
    /// /dev/null, opened once: children's stdin and stdout.
    pub(super) null: std::fs::File,
}

impl Forker {
    pub(super) fn new(dir: &Path) -> Result<Self, BoxError> {
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
    pub(super) fn child_config(
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
            prewarm: options.prewarm,
            ram: match (options.memfd, options.huge_pages) {
                (true, true) => RestoreRam::HugeMemfd,
                (true, false) => RestoreRam::Memfd,
                (false, _) => RestoreRam::SnapshotFile,
            },
        }
    }

    /// Forks `n` children under `out_dir`, or hands out parked children
    /// of `pool` for as many as it has and the options allow; child i
    /// attaches its network interfaces in `netns[i]` (none given: in this
    /// process's namespace, for one child only). Each new child closes
    /// `close_in_child` (descriptors of the parent's that are none of a
    /// child's business) and the pool's links.
    pub(super) fn spawn(
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
        if options.huge_pages && !options.memfd {
            return Err("huge_pages is for memfd children (a mapped memory file cannot be on huge pages): give memfd too".into());
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
pub(super) fn warm_up_threads() {
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
pub(super) fn make_child_dir(dir: &Path) -> Result<UnixListener, BoxError> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    Ok(crate::control::bind(&dir.join("control.sock"))?)
}

/// Closes descriptors a child inherited from the server and has no use for.
pub(super) fn close_all(fds: &[RawFd]) {
    for &fd in fds {
        // SAFETY: the descriptor is the parent's, inherited and unused here.
        unsafe { libc::close(fd) };
    }
}
