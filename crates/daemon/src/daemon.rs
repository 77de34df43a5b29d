//! The daemon's state and what it shares between requests: the store, the
//! forkd-vmm binary, the fork servers, the tags being made, the branch cap.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio::sync::Semaphore;

use crate::audit::AuditLog;
use crate::auth::Auth;
use crate::cgroup::{Controller, Hierarchy};
use crate::driver::{ForkServer, Vmm};
use crate::error::{ApiError, ApiResult, StartError};
use crate::metrics::Metrics;
use crate::store::{SnapshotRow, Store};

/// Where things live under the state directory.
#[derive(Clone, Debug)]
pub struct Paths {
    /// The state directory.
    pub state: PathBuf,
    /// `snapshots/<tag>/`.
    pub snapshots: PathBuf,
    /// `sandboxes/<batch>/<i>/`.
    pub sandboxes: PathBuf,
    /// `run/`: fork server sockets and logs, source VMs being snapshotted.
    pub run: PathBuf,
}

impl Paths {
    /// The layout under `state` (created), snapshots under
    /// `snapshot_root` when given.
    pub fn create(state: &Path, snapshot_root: Option<&Path>) -> Result<Paths, StartError> {
        let state = std::path::absolute(state).map_err(|source| StartError::Io {
            what: "cannot resolve the state directory",
            path: state.to_owned(),
            source,
        })?;
        let snapshots = match snapshot_root {
            Some(root) => std::path::absolute(root).map_err(|source| StartError::Io {
                what: "cannot resolve the snapshot root",
                path: root.to_owned(),
                source,
            })?,
            None => state.join("snapshots"),
        };
        let paths = Paths {
            snapshots,
            sandboxes: state.join("sandboxes"),
            run: state.join("run"),
            state,
        };
        // Guest memory, vmstate and the database are the sandboxes' secrets:
        // the state directory is the daemon's alone (what it and its VMMs
        // create inside is 0600/0700 by the umask main() sets). A shared
        // directory (world-writable or sticky, as /tmp) is left as it is:
        // `--state-dir /tmp` must not close /tmp to everyone else.
        use std::os::unix::fs::PermissionsExt;
        let ours =
            std::fs::metadata(&paths.state).map_or(true, |m| m.permissions().mode() & 0o1002 == 0);
        for dir in [&paths.state, &paths.snapshots, &paths.sandboxes, &paths.run] {
            std::fs::create_dir_all(dir).map_err(|source| StartError::Io {
                what: "cannot create",
                path: dir.to_owned(),
                source,
            })?;
        }
        // Jailed VMMs (uids of their own) pass through to their own
        // directories below: others may search these, never list them.
        for dir in [&paths.snapshots, &paths.sandboxes, &paths.run] {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711)).map_err(
                |source| StartError::Io {
                    what: "cannot set the permissions of",
                    path: dir.to_owned(),
                    source,
                },
            )?;
        }
        if ours {
            std::fs::set_permissions(&paths.state, std::fs::Permissions::from_mode(0o711))
                .map_err(|source| StartError::Io {
                    what: "cannot restrict",
                    path: paths.state.clone(),
                    source,
                })?;
        } else if std::fs::metadata(&paths.state).is_ok_and(|m| m.permissions().mode() & 0o077 != 0)
        {
            tracing::warn!(
                "the state directory {} is shared (world-writable or sticky), so it is left as it \
                 is; its snapshots/, sandboxes/ and run/ are forkd's alone",
                paths.state.display()
            );
        }
        Ok(paths)
    }

    /// The directory of snapshot `tag`.
    pub fn snapshot(&self, tag: &str) -> PathBuf {
        self.snapshots.join(tag)
    }
}

/// What the daemon is configured with.
pub struct Options {
    /// The forkd-vmm binary.
    pub vmm: Vmm,
    /// The state directory.
    pub state_dir: PathBuf,
    /// Where snapshots live, when not `<state_dir>/snapshots`.
    pub snapshot_root: Option<PathBuf>,
    /// The token, when auth is on.
    pub auth: Option<Auth>,
    /// The audit log, when configured.
    pub audit: Option<AuditLog>,
    /// Most branches writing at once.
    pub branch_concurrency: usize,
    /// Network namespaces kept ready ahead of networked spawns.
    pub netns_pool: usize,
    /// How long an exited sandbox stays readable before it is forgotten.
    pub exited_retention: std::time::Duration,
    /// Where kernels and root filesystems must be (default
    /// `<state_dir>/images`).
    pub images_dir: Option<PathBuf>,
    /// The cgroup limits of a sandbox whose spawn asks for none.
    pub default_limits: DefaultLimits,
    /// Disk and memory kept free: requests that would eat into them are
    /// refused.
    pub reserve: crate::reserve::Reserve,
}

/// The daemon's default cgroup limits (`--default-*-limit*`).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct DefaultLimits {
    /// Memory, in MiB.
    pub memory_mib: Option<u64>,
    /// CPU time, in CPUs.
    pub cpu: Option<f64>,
    /// Tasks of a VMM process. None: [`DEFAULT_PIDS_LIMIT`] where the
    /// host has the pids controller; 0: no limit.
    pub pids: Option<u64>,
    /// Data a sandbox's own disk layers may hold, in MiB. None:
    /// [`DEFAULT_DISK_QUOTA_MIB`]; 0: no quota.
    pub disk_quota_mib: Option<u64>,
    /// Disk bandwidth, in MiB/s each way. None: no cap.
    pub io_mibps: Option<u64>,
}

/// The disk quota of a sandbox when neither its spawn nor the daemon's
/// configuration says: room for a guest's package installs and scratch
/// files, and a bound that keeps a few hundred sandboxes writing junk from
/// filling an ordinary host disk before the reserve refuses new ones.
pub const DEFAULT_DISK_QUOTA_MIB: u64 = 4096;

/// The task limit of a sandbox's VMM when neither its spawn nor the
/// daemon's configuration says: far above what a VMM uses (its vCPUs, a
/// thread per control connection, device workers; tens), and a bound on
/// what a VMM gone wrong (or made to go wrong) can start.
pub const DEFAULT_PIDS_LIMIT: u64 = 1024;

/// What a sandbox's agent is, from its first answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AgentKind {
    /// The protocol version it speaks.
    pub protocol: u32,
    /// It is the built-in guest (ping, eval of arithmetic, a few exec builtins).
    pub builtin: bool,
}

/// The daemon.
pub struct Daemon {
    /// Its database.
    pub store: Store,
    /// forkd-vmm.
    pub vmm: Vmm,
    /// Its directories.
    pub paths: Paths,
    /// Its metrics.
    pub metrics: Metrics,
    /// The token, when auth is on.
    pub auth: Option<Auth>,
    /// The audit log, when configured.
    pub audit: Option<AuditLog>,
    /// The memory controller for sandbox caps, if the host has one.
    pub cgroups: Option<Hierarchy>,
    /// The limits of a sandbox whose spawn asks for none.
    pub default_limits: proto::control::Limits,
    /// The disk that holds the sandboxes' directories, which an
    /// `io_limit_mibps` caps; `None` on a file system with no block device.
    pub io_disk: Option<(u32, u32)>,
    /// The disk quota of a sandbox whose spawn asks for none (MiB).
    pub default_disk_quota_mib: Option<u64>,
    /// Disk and memory kept free.
    pub reserve: crate::reserve::Reserve,
    /// One permit per branch allowed to write at once.
    pub branch_slots: Arc<Semaphore>,
    /// The cap, for messages.
    pub branch_concurrency: usize,
    /// Network namespaces made ahead of networked spawns.
    pub netns_pool: Arc<crate::netns::Pool>,
    /// Where the kernels and root filesystems snapshot requests name are.
    pub images: crate::images::Images,
    /// This daemon's instance id (see [`Store::instance_id`]).
    pub instance: String,
    /// How long an exited sandbox stays readable.
    pub exited_retention: std::time::Duration,
    fork_servers: Mutex<HashMap<String, Arc<ForkServer>>>,
    /// Held while a tag's fork server starts.
    fork_server_starts: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    agents_seen: Mutex<HashMap<String, AgentKind>>,
    /// Wakes the deadline loop when a deadline is set.
    pub deadlines: tokio::sync::Notify,
    /// The state directory's lock, held as long as the daemon runs.
    _lock: StateLock,
}

/// An exclusive lock on a state directory (`<state>/daemon.lock`, flock):
/// two daemons on one state directory would kill each other's fork servers
/// and race on its files. Released when the process ends, however it ends.
pub struct StateLock(#[allow(dead_code)] std::fs::File);

impl StateLock {
    /// Takes the lock of `state`, or says which process holds it.
    pub fn take(state: &Path) -> Result<StateLock, StartError> {
        use std::io::{Read, Seek, Write};
        use std::os::fd::AsRawFd;
        let path = state.join("daemon.lock");
        let io = |what: &'static str| {
            let path = path.clone();
            move |source| StartError::Io { what, path, source }
        };
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io("cannot open"))?;
        // SAFETY: flock on a descriptor this function owns; no memory involved.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(io("cannot lock")(e));
            }
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            return Err(StartError::Config(format!(
                "another forkd-daemon (pid {}) uses the state directory {}: stop it, or give this one another --state-dir",
                holder.trim(),
                state.display()
            )));
        }
        file.set_len(0).map_err(io("cannot write"))?;
        file.rewind().map_err(io("cannot write"))?;
        writeln!(file, "{}", std::process::id()).map_err(io("cannot write"))?;
        Ok(StateLock(file))
    }
}

/// A tag claimed by a request that is making a snapshot of that name: its
/// row is in the store, `pending`, before anything is written. Dropped
/// before [`TagClaim::finish`] (the request failed), the row and whatever
/// was written in the snapshot's directory go.
pub struct TagClaim {
    daemon: Arc<Daemon>,
    tag: String,
    dir: PathBuf,
    done: bool,
}

impl TagClaim {
    /// Records the finished snapshot (its row as its directory says).
    pub fn finish(mut self, row: &SnapshotRow) -> ApiResult<()> {
        self.done = true;
        if self.daemon.store.finish_snapshot(row)? {
            Ok(())
        } else {
            Err(ApiError::internal(format!(
                "snapshot {:?}: its record vanished while it was being made",
                self.tag
            )))
        }
    }
}

impl Drop for TagClaim {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        if let Err(e) = self.daemon.store.delete_snapshot(&self.tag) {
            tracing::error!(
                tag = self.tag,
                "cannot remove a failed snapshot's record: {e}"
            );
            return;
        }
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!("cannot remove {}: {e}", self.dir.display());
            }
        }
    }
}

/// This host's cgroup hierarchies, made ready for the sandboxes of daemon
/// `instance`, and the default limits in `asked` checked against them:
/// a configured default whose controller is missing keeps the daemon from
/// starting; the built-in task limit applies where the pids controller is.
fn cgroups(
    instance: &str,
    asked: &DefaultLimits,
    io_disk: Option<(u32, u32)>,
) -> Result<(Option<Hierarchy>, proto::control::Limits), StartError> {
    let mut hierarchy = Hierarchy::detect();
    if let Some(h) = &mut hierarchy {
        let refused = h.prepare(instance).map_err(|e| {
            StartError::Config(format!(
                "{e}; the daemon needs to make its sandboxes' cgroups (run it as root)"
            ))
        })?;
        for (c, why) in refused {
            tracing::warn!(
                "the {} cgroup controller cannot be handed down to sandboxes ({why}): their {} limits are unavailable",
                c.name(),
                c.name()
            );
        }
    }
    let has = |c: Controller| hierarchy.as_ref().is_some_and(|h| h.has(c));
    let pids = match asked.pids {
        None if has(Controller::Pids) => Some(DEFAULT_PIDS_LIMIT),
        None | Some(0) => None,
        Some(n) => Some(n),
    };
    if asked.pids.is_none() && !has(Controller::Pids) {
        tracing::warn!(
            "this host has no pids cgroup controller: sandboxes' VMMs have no task limit"
        );
    }
    let req = proto::api::SpawnRequest {
        memory_limit_mib: asked.memory_mib,
        cpu_limit: asked.cpu,
        pids_limit: pids,
        io_limit_mibps: asked.io_mibps,
        ..Default::default()
    };
    let defaults = crate::validate::limits(&req, &proto::control::Limits::default(), has, io_disk)
        .map_err(|e| StartError::Config(format!("a default limit: {}", e.message)))?;
    Ok((hierarchy, defaults))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Daemon {
    /// Opens the state directory and store (no re-adoption yet; see
    /// [`Daemon::recover`]).
    pub fn open(opts: Options) -> Result<Daemon, StartError> {
        // The lock first: a second daemon must not touch anything.
        std::fs::create_dir_all(&opts.state_dir).map_err(|source| StartError::Io {
            what: "cannot create",
            path: opts.state_dir.clone(),
            source,
        })?;
        let lock = StateLock::take(&opts.state_dir)?;
        let paths = Paths::create(&opts.state_dir, opts.snapshot_root.as_deref())?;
        let store = Store::open(&paths.state.join("forkd.db"))?;
        let instance = store.instance_id()?;
        let images_dir = opts
            .images_dir
            .clone()
            .unwrap_or_else(|| paths.state.join("images"));
        let images = crate::images::Images::open(&images_dir).map_err(|source| StartError::Io {
            what: "cannot open the images directory",
            path: images_dir,
            source,
        })?;
        let io_disk = crate::cgroup::disk_of(&paths.sandboxes);
        let (cgroups, default_limits) = cgroups(&instance, &opts.default_limits, io_disk)?;
        let default_disk_quota_mib = match opts.default_limits.disk_quota_mib {
            None => Some(DEFAULT_DISK_QUOTA_MIB),
            Some(0) => None,
            Some(q) if q <= proto::api::DISK_QUOTA_MIB_MAX => Some(q),
            Some(q) => {
                return Err(StartError::Config(format!(
                    "--default-disk-quota-mib {q} is out of range: 0 (none) to {}",
                    proto::api::DISK_QUOTA_MIB_MAX
                )))
            }
        };
        let vmm = opts.vmm.with_source_disk_quota(default_disk_quota_mib);
        let vmm = match &cgroups {
            Some(h) => vmm.with_cgroups(h.daemon_groups(&instance), default_limits),
            None => vmm,
        };
        let metrics = Metrics::new();
        metrics
            .branch_concurrency_cap
            .set(opts.branch_concurrency as i64);
        Ok(Daemon {
            store,
            vmm,
            paths,
            metrics,
            auth: opts.auth,
            audit: opts.audit,
            cgroups,
            default_limits,
            io_disk,
            default_disk_quota_mib,
            reserve: opts.reserve,
            branch_slots: Arc::new(Semaphore::new(opts.branch_concurrency)),
            branch_concurrency: opts.branch_concurrency,
            netns_pool: Arc::new(crate::netns::Pool::new(
                opts.netns_pool,
                crate::netns::prefix(&instance),
            )),
            images,
            instance,
            exited_retention: opts.exited_retention,
            fork_servers: Mutex::new(HashMap::new()),
            fork_server_starts: Mutex::new(HashMap::new()),
            agents_seen: Mutex::new(HashMap::new()),
            deadlines: tokio::sync::Notify::new(),
            _lock: lock,
        })
    }

    /// Refills the network namespace pool in the background (when it is
    /// on): after a networked spawn took some, or once a networked
    /// snapshot exists.
    ///
    /// The refill runs on a thread of its own at nice 10: right after a
    /// spawn the children restoring and the first requests to them come
    /// first.
    pub fn refill_netns_pool(self: &Arc<Self>) {
        if !self.netns_pool.enabled() {
            return;
        }
        let this = self.clone();
        let spawned = std::thread::Builder::new()
            .name("netns-pool".into())
            .spawn(move || {
                // SAFETY: setpriority on the calling thread's own id (a
                // lower priority needs no privilege); touches no memory.
                unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 10) };
                this.netns_pool.refill(&this.store)
            });
        if let Err(e) = spawned {
            tracing::warn!("network namespace pool: cannot start a refill: {e}");
        }
    }

    /// Claims the tag of `pending` (a row recorded before anything of the
    /// snapshot exists, see [`SnapshotRow::pending`]) for the request
    /// making it: 409 when the tag exists or another request is making it.
    pub fn claim_tag(self: &Arc<Self>, pending: SnapshotRow) -> ApiResult<TagClaim> {
        let tag = pending.info.tag.clone();
        if !proto::api::valid_tag(&tag) {
            return Err(ApiError::bad_request(format!(
                "tag {tag:?} is not valid: use 1 to 64 of A-Z a-z 0-9 _ -"
            )));
        }
        if !self.store.insert_snapshot(&pending)? {
            let being_made = self.store.snapshot(&tag)?.is_some_and(|r| r.pending);
            return Err(ApiError::conflict(if being_made {
                format!("snapshot {tag:?} is being made by another request")
            } else {
                format!("snapshot {tag:?} exists; pick another tag or delete it first")
            }));
        }
        crate::failpoint::hit("snapshot.recorded");
        Ok(TagClaim {
            daemon: self.clone(),
            tag,
            dir: PathBuf::from(&pending.info.dir),
            done: false,
        })
    }

    /// The fork server of snapshot `tag` (started if it is not running).
    /// Blocking.
    pub fn fork_server(
        &self,
        tag: &str,
        dir: &Path,
    ) -> Result<Arc<ForkServer>, crate::driver::Error> {
        let running = |servers: &HashMap<String, Arc<ForkServer>>| {
            servers.get(tag).filter(|s| s.alive()).cloned()
        };
        if let Some(server) = running(&lock(&self.fork_servers)) {
            return Ok(server);
        }
        // One start per tag at a time (spawns racing after a restart wait
        // for the first), outside the servers' map lock: loading a big
        // snapshot takes a while and other snapshots' spawns must not wait.
        let starting = lock(&self.fork_server_starts)
            .entry(tag.to_owned())
            .or_default()
            .clone();
        let _one = lock(&starting);
        if let Some(server) = running(&lock(&self.fork_servers)) {
            return Ok(server);
        }
        // A dead one (killed, crashed) is replaced; it had a socket of its
        // own, so stopping it cannot take the new one's.
        let server = Arc::new(ForkServer::start(&self.vmm, dir, &self.paths.run, tag)?);
        if let Some(old) = lock(&self.fork_servers).insert(tag.to_owned(), server.clone()) {
            old.stop();
        }
        Ok(server)
    }

    /// Removes the empty cgroups that fork servers no longer running made
    /// (`vmm-<server pid>-<n>`): a server that died part way through a
    /// batch, or before its parked children took their groups, leaves
    /// them. Groups with a process in them, and those of servers that
    /// run, are left (a running server may have made one its next child
    /// has not joined yet).
    pub fn sweep_cgroups(&self) {
        let Some(h) = &self.cgroups else {
            return;
        };
        let running: Vec<String> = lock(&self.fork_servers)
            .values()
            .filter(|s| s.alive())
            .map(|s| format!("vmm-{}-", s.pid()))
            .collect();
        for group in h
            .daemon_groups(&self.instance)
            .iter()
            .flat_map(|d| crate::cgroup::groups_under(d))
        {
            let name = group.file_name().and_then(|n| n.to_str()).unwrap_or("");
            let made_by_a_server = name.starts_with("vmm-");
            if made_by_a_server
                && !running.iter().any(|p| name.starts_with(p))
                && crate::cgroup::procs(&group).is_empty()
            {
                let _ = std::fs::remove_dir(&group);
            }
        }
    }

    /// Stops the fork server of `tag`, if any.
    pub fn stop_fork_server(&self, tag: &str) {
        if let Some(server) = lock(&self.fork_servers).remove(tag) {
            server.stop();
        }
    }

    /// Takes over a fork server a previous daemon started (see
    /// [`crate::reconcile`]).
    pub fn adopt_fork_server(&self, tag: &str, server: ForkServer) {
        if let Some(old) = lock(&self.fork_servers).insert(tag.to_owned(), Arc::new(server)) {
            old.stop();
        }
    }

    /// At shutdown: stops the fork servers no running sandbox was spawned
    /// from, and leaves the others running for the next start to adopt:
    /// a fork server records how each of its children ends, and a stopped
    /// one's children would end with nobody to see how.
    pub fn stop_idle_fork_servers(&self) {
        let servers: Vec<_> = lock(&self.fork_servers).drain().collect();
        for (tag, server) in servers {
            if self
                .store
                .running_from(&tag)
                .is_ok_and(|ids| ids.is_empty())
                || !server.alive()
            {
                server.stop();
            } else {
                tracing::info!(tag, "leaving the fork server of a snapshot with running sandboxes for the next start");
            }
        }
    }

    /// What sandbox `id`'s agent said when it first answered since this
    /// daemon started; none before that.
    pub fn agent_seen(&self, id: &str) -> Option<AgentKind> {
        lock(&self.agents_seen).get(id).copied()
    }

    /// Records that sandbox `id`'s agent has answered `pong`.
    pub fn mark_agent_seen(&self, id: &str, pong: &proto::agent::Pong) -> AgentKind {
        let kind = AgentKind {
            protocol: pong.protocol,
            builtin: pong.guest == proto::agent::BUILTIN_GUEST,
        };
        lock(&self.agents_seen).insert(id.to_owned(), kind);
        kind
    }

    /// Forgets sandbox `id` (killed or gone).
    pub fn forget_agent(&self, id: &str) {
        lock(&self.agents_seen).remove(id);
    }

    /// Samples the live sandboxes for the per-sandbox metrics (blocking:
    /// a few `/proc` reads each), the oldest [`crate::metrics::PER_SANDBOX_MAX`].
    pub fn refresh_sandbox_metrics(&self) {
        let Ok(mut rows) = self.store.sandboxes() else {
            return;
        };
        rows.retain(|r| r.info.state.has_vmm());
        rows.sort_by(|a, b| {
            (a.info.created_at_unix, &a.info.id).cmp(&(b.info.created_at_unix, &b.info.id))
        });
        let omitted = rows.len().saturating_sub(crate::metrics::PER_SANDBOX_MAX);
        rows.truncate(crate::metrics::PER_SANDBOX_MAX);
        let samples: Vec<_> = rows.iter().map(crate::stats::sample).collect();
        self.metrics.per_sandbox.set(&samples);
        self.metrics.per_sandbox_omitted.set(omitted as i64);
    }

    /// Updates the gauges read from the store.
    pub fn refresh_gauges(&self) {
        if let Ok(n) = self.store.snapshot_count() {
            self.metrics.snapshots.set(n as i64);
        }
        if let Ok(n) = self.store.sandbox_count() {
            self.metrics.sandboxes.set(n as i64);
        }
        self.metrics
            .netns_pool_ready
            .set(self.netns_pool.len() as i64);
    }
}
