//! The parsed snapshot children are forked from, and the fork of a batch.

use std::io::Write;
use std::os::fd::RawFd;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::Arc;

use proto::control::{ForkedChild, Limits};
use vmm::builder::{RestoreConfig, RestoreRam};
use vmm::devices::serial::ConsoleOutput;
use vmm::devices::virtio::manager::DeviceState;
use vmm::snapshot::PreparedSnapshot;

use super::cgroup::{Cgroups, Group};
use super::child::child;
use super::pool::Pool;
use super::reaper::restore_child_signals;
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
    /// Where each child's cgroup is made (`--cgroup-parent`), if anywhere.
    pub(super) cgroups: Option<Cgroups>,
}

impl Forker {
    /// The snapshot in `dir`, its children's cgroups under
    /// `cgroup_parents` (none: children stay in this process's groups).
    pub(super) fn new(dir: &Path, cgroup_parents: &[std::path::PathBuf]) -> Result<Self, BoxError> {
        // SAFETY: geteuid cannot fail.
        if crate::jail::on() && unsafe { libc::geteuid() } != 0 {
            return Err(
                "the jail gives each child a uid of its own, which only root may do: \
                 run this as root, or pass --jail off (children then run as this user)"
                    .into(),
            );
        }
        let threads = std::fs::read_dir("/proc/self/task")?.count();
        if threads != 1 {
            return Err(
                format!("a fork parent must be single-threaded, it has {threads} threads").into(),
            );
        }
        let snapshot = PreparedSnapshot::load(dir)?;
        let cgroups = Cgroups::new(cgroup_parents, snapshot.state.vcpus.len() as u64)?;
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
            cgroups,
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
            disk_quota: options.disk_quota_mib.map(|m| m << 20),
            // The jail (crate::jail) fills these in before it drops root.
            taps: None,
            uffd: None,
            ram: match (options.memfd, options.huge_pages) {
                (true, true) => RestoreRam::HugeMemfd,
                (true, false) => RestoreRam::Memfd,
                (false, _) => RestoreRam::SnapshotFile,
            },
        }
    }

    /// The snapshot's taps, attached in `netns` (this process's when
    /// `None`): for a child that may not enter the namespace itself.
    pub(super) fn open_taps(&self, netns: Option<&str>) -> Result<Vec<std::fs::File>, BoxError> {
        Ok(crate::net::open_taps(&self.snapshot, netns)?)
    }

    /// Jails a child forked cold (one thread yet): what it needs root for
    /// first (its taps; a userfaultfd when its RAM can be live-branched),
    /// then the drop.
    fn jail_cold(&self, dir: &Path, cfg: &mut RestoreConfig) -> Result<(), BoxError> {
        if !self.snapshot.meta.nets.is_empty() {
            cfg.taps = Some(Arc::new(self.open_taps(cfg.netns.as_deref())?));
        }
        if cfg.ram != RestoreRam::SnapshotFile {
            let uffd = vmm::memory::uffd::Uffd::new()
                .map_err(|e| format!("a userfaultfd for live BRANCH: {e}"))?;
            cfg.uffd = Some(Arc::new(uffd));
        }
        crate::jail::drop_root(dir)?;
        Ok(())
    }

    /// Starts `batch`: forks its children, or hands out parked children
    /// of `pool` for as many as it has and the options allow. Each new
    /// child closes `close_in_child` (descriptors of the parent's that are
    /// none of a child's business) and the pool's links. On an error part
    /// way, the children started before it (which run on) come with the
    /// error.
    pub(super) fn spawn(
        &self,
        batch: &Batch<'_>,
        close_in_child: &[RawFd],
        mut pool: Option<&mut Pool>,
    ) -> Result<Vec<ForkedChild>, Partial> {
        let Batch {
            n,
            out_dir,
            options,
            netns,
            limits,
        } = *batch;
        let limits = &limits;
        let refuse = |error: BoxError| Partial {
            started: Vec::new(),
            error,
        };
        if !(1..=MAX_CHILDREN).contains(&n) {
            return Err(refuse(
                format!("{n} children is out of range: start 1 to {MAX_CHILDREN}").into(),
            ));
        }
        if options.huge_pages && !options.memfd {
            return Err(refuse("huge_pages is for memfd children (a mapped memory file cannot be on huge pages): give memfd too".into()));
        }
        crate::net::check_namespaces(&self.snapshot, n, netns).map_err(|e| refuse(e.into()))?;
        match &self.cgroups {
            Some(cgroups) => cgroups.check(limits).map_err(|e| refuse(e.into()))?,
            None if !limits.is_none() => {
                return Err(refuse(
                    "cgroup limits were asked for, and this server makes no cgroups: start it with --cgroup-parent".into(),
                ))
            }
            None => {}
        }
        // Absolute: a jailed child's directory is bound at its own path.
        let out_dir = &std::path::absolute(out_dir)
            .map_err(|e| refuse(format!("{}: {e}", out_dir.display()).into()))?;
        std::fs::create_dir_all(out_dir)
            .and_then(|()| crate::jail::let_through(out_dir))
            .map_err(|e| refuse(format!("cannot create {}: {e}", out_dir.display()).into()))?;
        // Flushed before every fork so no buffered output is written twice.
        std::io::stdout().flush().map_err(|e| refuse(e.into()))?;
        if let Some(pool) = pool.as_deref_mut() {
            // Which parked children are ready, once for the whole request.
            pool.refresh();
        }
        let mut children = Vec::with_capacity(n as usize);
        for index in 0..n {
            let dir = out_dir.join(index.to_string());
            let control_socket = dir.join("control.sock");
            let ns = netns.get(index as usize).map(String::as_str);
            let started = self.start_one(
                &dir,
                options,
                ns,
                limits,
                close_in_child,
                pool.as_deref_mut(),
            );
            let (pid, cgroup) = match started {
                Ok(started) => started,
                Err(error) => {
                    return Err(Partial {
                        started: children,
                        error,
                    })
                }
            };
            children.push(ForkedChild {
                index,
                pid,
                vsock_socket: self.has_vsock.then(|| dir.join("vsock.sock")),
                dir,
                control_socket,
                cgroup,
            });
        }
        Ok(children)
    }

    /// Starts the child in `dir`: a parked child of `pool` when there is
    /// one and the options allow, else a new one. Its pid and cgroup's
    /// name.
    fn start_one(
        &self,
        dir: &Path,
        options: ChildOptions,
        netns: Option<&str>,
        limits: &Limits,
        close_in_child: &[RawFd],
        pool: Option<&mut Pool>,
    ) -> Result<(i32, Option<String>), BoxError> {
        let links = match pool {
            Some(pool) if !options.memfd => {
                match pool.hand_out(self, dir, options, netns, limits)? {
                    Some(started) => return Ok(started),
                    None => pool.links(),
                }
            }
            Some(pool) => pool.links(),
            None => Vec::new(),
        };
        let group = self.cgroups.as_ref().map(|c| c.take(limits)).transpose()?;
        let listener = match make_child_dir(dir) {
            Ok(l) => l,
            Err(e) => {
                if let Some(g) = &group {
                    g.remove();
                }
                return Err(e);
            }
        };
        let close: Vec<RawFd> = close_in_child.iter().copied().chain(links).collect();
        match self.fork_cold(dir, options, netns, listener, group.as_ref(), &close) {
            Ok(pid) => Ok((pid, group.map(|g| g.name))),
            Err(e) => {
                if let Some(g) = &group {
                    g.remove();
                }
                Err(e)
            }
        }
    }

    /// Forks a child that restores from scratch and serves on `listener`,
    /// in `group` (which it joins before anything else).
    fn fork_cold(
        &self,
        dir: &Path,
        options: ChildOptions,
        netns: Option<&str>,
        listener: UnixListener,
        group: Option<&Group>,
        close_in_child: &[RawFd],
    ) -> Result<i32, BoxError> {
        let mut cfg = self.child_config(dir, options, netns);
        // SAFETY: this process is single-threaded (checked when the Forker
        // was made; nothing here starts threads), so the child is a complete
        // copy of it and may go on running Rust code.
        match unsafe { libc::fork() } {
            -1 => Err(format!("fork failed: {}", std::io::Error::last_os_error()).into()),
            0 => {
                if let Some(group) = group {
                    if let Err(e) = group.enter() {
                        eprintln!("forkd-vmm child: {e}");
                        std::process::exit(2);
                    }
                }
                restore_child_signals();
                close_all(close_in_child);
                if crate::jail::on() {
                    if let Err(e) = self.jail_cold(dir, &mut cfg) {
                        eprintln!("forkd-vmm child: {e}");
                        std::process::exit(2);
                    }
                }
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

/// One request's children: `n` under `out_dir` (child i in `<i>/`), child
/// i attaching its network interfaces in `netns[i]` (none given: in this
/// process's namespace, for one child only), each in a cgroup of its own
/// with `limits` when the server makes them (limits asked of one that
/// does not are refused).
#[derive(Clone, Copy, Debug)]
pub(super) struct Batch<'a> {
    pub(super) n: u32,
    pub(super) out_dir: &'a Path,
    pub(super) options: ChildOptions,
    pub(super) netns: &'a [String],
    pub(super) limits: Limits,
}

/// A batch that stopped part way: why, and the children started before
/// it, which run on.
pub(super) struct Partial {
    /// Those children, in index order.
    pub(super) started: Vec<ForkedChild>,
    /// What stopped the batch.
    pub(super) error: BoxError,
}

impl std::fmt::Debug for Partial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

impl std::fmt::Display for Partial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.error)?;
        match self.started.len() {
            0 => Ok(()),
            n => write!(f, " ({n} children started before this run on)"),
        }
    }
}

impl std::error::Error for Partial {}

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
