//! The daemon's state and what it shares between requests: the store, the
//! forkd-vmm binary, the fork servers, the tags being made, the branch cap.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tokio::sync::Semaphore;

use crate::audit::AuditLog;
use crate::auth::Auth;
use crate::cgroup::Hierarchy;
use crate::driver::{ForkServer, Vmm};
use crate::error::{ApiError, ApiResult, StartError};
use crate::metrics::Metrics;
use crate::store::Store;

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
        if ours {
            std::fs::set_permissions(&paths.state, std::fs::Permissions::from_mode(0o700))
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
    /// One permit per branch allowed to write at once.
    pub branch_slots: Arc<Semaphore>,
    /// The cap, for messages.
    pub branch_concurrency: usize,
    /// Network namespaces made ahead of networked spawns.
    pub netns_pool: Arc<crate::netns::Pool>,
    fork_servers: Mutex<HashMap<String, Arc<ForkServer>>>,
    /// Held while a tag's fork server starts.
    fork_server_starts: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    in_flight: Arc<Mutex<HashSet<String>>>,
    agents_seen: Mutex<HashSet<String>>,
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

/// A tag claimed by a request that is making a snapshot of that name;
/// released when dropped.
pub struct TagClaim {
    tag: String,
    set: Arc<Mutex<HashSet<String>>>,
}

impl Drop for TagClaim {
    fn drop(&mut self) {
        lock(&self.set).remove(&self.tag);
    }
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
        let metrics = Metrics::new();
        metrics
            .branch_concurrency_cap
            .set(opts.branch_concurrency as i64);
        Ok(Daemon {
            store,
            vmm: opts.vmm,
            paths,
            metrics,
            auth: opts.auth,
            audit: opts.audit,
            cgroups: Hierarchy::detect(),
            branch_slots: Arc::new(Semaphore::new(opts.branch_concurrency)),
            branch_concurrency: opts.branch_concurrency,
            netns_pool: Arc::new(crate::netns::Pool::new(opts.netns_pool)),
            fork_servers: Mutex::new(HashMap::new()),
            fork_server_starts: Mutex::new(HashMap::new()),
            in_flight: Arc::new(Mutex::new(HashSet::new())),
            agents_seen: Mutex::new(HashSet::new()),
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

    /// Claims `tag` for a request that will make a snapshot of that name:
    /// 409 when the tag exists or another request is making it.
    pub fn claim_tag(&self, tag: &str) -> ApiResult<TagClaim> {
        if !proto::api::valid_tag(tag) {
            return Err(ApiError::bad_request(format!(
                "tag {tag:?} is not valid: use 1 to 64 of A-Z a-z 0-9 _ -"
            )));
        }
        if self.store.snapshot(tag)?.is_some() {
            return Err(ApiError::conflict(format!(
                "snapshot {tag:?} exists; pick another tag or delete it first"
            )));
        }
        if !lock(&self.in_flight).insert(tag.to_owned()) {
            return Err(ApiError::conflict(format!(
                "snapshot {tag:?} is being made by another request"
            )));
        }
        // Check again: a request that just finished may have added it.
        if self.store.snapshot(tag)?.is_some() {
            lock(&self.in_flight).remove(tag);
            return Err(ApiError::conflict(format!("snapshot {tag:?} exists")));
        }
        Ok(TagClaim {
            tag: tag.to_owned(),
            set: self.in_flight.clone(),
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

    /// Stops the fork server of `tag`, if any.
    pub fn stop_fork_server(&self, tag: &str) {
        if let Some(server) = lock(&self.fork_servers).remove(tag) {
            server.stop();
        }
    }

    /// Stops every fork server (at shutdown; sandboxes run on).
    pub fn stop_fork_servers(&self) {
        let servers: Vec<_> = lock(&self.fork_servers).drain().collect();
        for (_, server) in servers {
            server.stop();
        }
    }

    /// Whether sandbox `id`'s agent has answered since this daemon started.
    pub fn agent_seen(&self, id: &str) -> bool {
        lock(&self.agents_seen).contains(id)
    }

    /// Records that sandbox `id`'s agent has answered.
    pub fn mark_agent_seen(&self, id: &str) {
        lock(&self.agents_seen).insert(id.to_owned());
    }

    /// Forgets sandbox `id` (killed or gone).
    pub fn forget_agent(&self, id: &str) {
        lock(&self.agents_seen).remove(id);
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
