//! The daemon's state: a SQLite database (WAL) under the state directory.
//!
//! Snapshots, their dependencies and the sandboxes live here, so a
//! restarted daemon knows what it had. The schema is versioned with
//! `PRAGMA user_version`; `MIGRATIONS` brings an older file up to date.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use proto::api::{SandboxInfo, SnapshotInfo, SnapshotStatus};
use rusqlite::{params, Connection, OptionalExtension, Row};

/// Schema steps, applied in order; a database at `user_version` N has had
/// the first N applied.
const MIGRATIONS: &[&str] = &[
    // 1: snapshots, their dependencies, sandboxes.
    "CREATE TABLE snapshots (
        tag TEXT PRIMARY KEY,
        dir TEXT NOT NULL,
        created_at_unix INTEGER NOT NULL,
        branched_from TEXT,
        pause_ms REAL,
        status TEXT NOT NULL,
        bootable INTEGER NOT NULL,
        warning TEXT,
        kind TEXT NOT NULL,
        guest TEXT NOT NULL,
        mem_mib INTEGER NOT NULL,
        parent_tag TEXT,
        parent_content_hash TEXT,
        source_pid INTEGER
    );
    CREATE TABLE snapshot_deps (
        tag TEXT NOT NULL,
        depends_on TEXT NOT NULL,
        PRIMARY KEY (tag, depends_on)
    );
    CREATE INDEX snapshot_deps_by_parent ON snapshot_deps (depends_on);
    CREATE TABLE sandboxes (
        id TEXT PRIMARY KEY,
        snapshot_tag TEXT NOT NULL,
        base_tag TEXT NOT NULL,
        dir TEXT NOT NULL,
        control_socket TEXT NOT NULL,
        vsock_socket TEXT,
        pid INTEGER NOT NULL,
        pid_start_ticks INTEGER NOT NULL,
        created_at_unix INTEGER NOT NULL,
        memory_limit_mib INTEGER,
        cgroup TEXT,
        live_fork INTEGER NOT NULL
    );",
    // 2: network interfaces (a snapshot's, a sandbox's namespace and address).
    "ALTER TABLE snapshots ADD COLUMN network INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE sandboxes ADD COLUMN netns TEXT;
    ALTER TABLE sandboxes ADD COLUMN guest_addr TEXT;",
    // 3: every network namespace the daemon made and has not removed, so a
    // restart finds those a crash left behind.
    "CREATE TABLE netns (name TEXT PRIMARY KEY);",
    // 4: upstream's answer fields: what a diff cost, a sandbox's branches,
    // and what a spawn did not give as asked.
    "ALTER TABLE snapshots ADD COLUMN diff_ms INTEGER;
    ALTER TABLE snapshots ADD COLUMN diff_physical_bytes INTEGER;
    ALTER TABLE snapshots ADD COLUMN diff_logical_bytes INTEGER;
    ALTER TABLE sandboxes ADD COLUMN branch_count INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE sandboxes ADD COLUMN last_branch_memory_path TEXT;
    ALTER TABLE sandboxes ADD COLUMN hugepages INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE sandboxes ADD COLUMN warning TEXT;
    ALTER TABLE snapshots ADD COLUMN tap TEXT;
    ALTER TABLE snapshots ADD COLUMN tap_mac TEXT;
    ALTER TABLE snapshots ADD COLUMN tap_addr TEXT;",
    // 5: crash consistency. A sandbox is recorded `starting` before its VMM
    // exists and kept `exited` (with how it ended) after; a snapshot is
    // recorded `pending` before its directory exists; which of a
    // snapshot's files were verified, as they were then; the daemon's
    // instance id, which names what it makes outside the state directory.
    "ALTER TABLE sandboxes ADD COLUMN state TEXT NOT NULL DEFAULT 'running';
    ALTER TABLE sandboxes ADD COLUMN exit_code INTEGER;
    ALTER TABLE sandboxes ADD COLUMN signal INTEGER;
    ALTER TABLE sandboxes ADD COLUMN oom_killed INTEGER;
    ALTER TABLE sandboxes ADD COLUMN exited_at_unix INTEGER;
    ALTER TABLE sandboxes ADD COLUMN exit_detail TEXT;
    ALTER TABLE snapshots ADD COLUMN pending INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE snapshots ADD COLUMN verified TEXT;
    CREATE TABLE daemon (key TEXT PRIMARY KEY, value TEXT NOT NULL);",
    // 6: a sandbox's CPU and task caps (the memory cap has its column).
    "ALTER TABLE sandboxes ADD COLUMN cpu_limit_millis INTEGER;
    ALTER TABLE sandboxes ADD COLUMN pids_limit INTEGER;",
    // 7: a sandbox's disk quota.
    "ALTER TABLE sandboxes ADD COLUMN disk_quota_mib INTEGER;",
    // 8: a sandbox's disk bandwidth cap.
    "ALTER TABLE sandboxes ADD COLUMN io_limit_mibps INTEGER;",
    // 9: a sandbox's labels (a JSON object), its deadline and what the
    // deadline does, and (once suspended) the snapshot that keeps it.
    "ALTER TABLE sandboxes ADD COLUMN labels TEXT;
    ALTER TABLE sandboxes ADD COLUMN deadline_unix INTEGER;
    ALTER TABLE sandboxes ADD COLUMN on_timeout TEXT;
    ALTER TABLE sandboxes ADD COLUMN timeout_secs INTEGER;
    ALTER TABLE sandboxes ADD COLUMN suspended_tag TEXT;
    CREATE TABLE workspaces (
        name TEXT PRIMARY KEY,
        id TEXT NOT NULL,
        source_snapshot_tag TEXT NOT NULL,
        current_state_tag TEXT,
        status TEXT NOT NULL,
        live_sandbox_id TEXT,
        created_at_unix INTEGER NOT NULL,
        last_active_unix INTEGER NOT NULL,
        last_branch_memory_path TEXT,
        per_child_netns INTEGER NOT NULL,
        memory_limit_mib INTEGER
    );",
];

/// What the store could not do.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite failed.
    #[error("state database: {0}")]
    Sql(#[from] rusqlite::Error),
    /// The file is from a newer daemon.
    #[error("the state database {path} has schema version {found}, newer than this daemon's {known}; run the newer forkd-daemon or move the state directory away")]
    TooNew {
        /// The file.
        path: PathBuf,
        /// Its version.
        found: u32,
        /// Ours.
        known: u32,
    },
}

/// A snapshot row: the API's view plus what the daemon keeps for itself.
#[derive(Clone, Debug, PartialEq)]
pub struct SnapshotRow {
    /// What the API answers.
    pub info: SnapshotInfo,
    /// The snapshot it depends on most directly (a diff's parent, or the
    /// snapshot whose disk layers it stacks on).
    pub parent_tag: Option<String>,
    /// The parent's memory hash when this one was taken (diffs).
    pub parent_content_hash: Option<String>,
    /// For a `writing` snapshot: the VMM process doing the copy.
    pub source_pid: Option<i32>,
    /// Every snapshot it needs files of.
    pub depends_on: Vec<String>,
    /// Made on a host tap (`info.tap`): that tap's MAC and `a.b.c.d/p`
    /// address, which every child's namespace repeats.
    pub tap_mac: Option<String>,
    /// See `tap_mac`.
    pub tap_addr: Option<String>,
    /// Recorded before its files exist: the request making it has not
    /// finished (a restart finishes it from its directory, or removes it).
    pub pending: bool,
    /// Its files as `forkd-vmm verify` last found them intact; `None`
    /// until then.
    pub verified: Option<Vec<proto::snapshot::FileIdentity>>,
}

impl SnapshotRow {
    /// The row of a snapshot about to be made in `dir`, recorded before
    /// anything is written (`writing`, `pending`); the request making it
    /// fills in what it knows, and replaces it with what the finished
    /// directory says.
    pub fn pending(tag: &str, dir: &Path) -> SnapshotRow {
        SnapshotRow {
            info: SnapshotInfo {
                tag: tag.to_owned(),
                dir: dir.to_string_lossy().into_owned(),
                created_at_unix: crate::util::now_unix(),
                branched_from: None,
                pause_ms: None,
                pause_us: None,
                diff_ms: None,
                diff_physical_bytes: None,
                diff_logical_bytes: None,
                status: SnapshotStatus::Writing,
                bootable: false,
                warning: None,
                kind: None,
                guest: None,
                mem_mib: None,
                network: false,
                tap: None,
            },
            parent_tag: None,
            parent_content_hash: None,
            source_pid: None,
            depends_on: Vec::new(),
            tap_mac: None,
            tap_addr: None,
            pending: true,
            verified: None,
        }
    }
}

/// A sandbox row.
#[derive(Clone, Debug, PartialEq)]
pub struct SandboxRow {
    /// What the API answers.
    pub info: SandboxInfo,
    /// The snapshot a diff branch of it is taken against (its snapshot, or
    /// its latest branch).
    pub base_tag: String,
    /// Its directory (control socket, logs, disk layers).
    pub dir: PathBuf,
    /// Its VMM's control socket.
    pub control_socket: PathBuf,
    /// Its vsock socket (the guest agent).
    pub vsock_socket: Option<PathBuf>,
    /// The process start time (clock ticks after boot), which tells the
    /// VMM from a later process that reused its pid.
    pub pid_start_ticks: u64,
    /// Its memory cgroup directory.
    pub cgroup: Option<PathBuf>,
    /// The snapshot that keeps it while it is `suspended`.
    pub suspended_tag: Option<String>,
}

/// How a sandbox's VMM ended.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ended {
    /// Its exit status, when it exited.
    pub code: Option<i32>,
    /// The signal that ended it, when one did.
    pub signal: Option<i32>,
    /// Whether its cgroup counted an OOM kill.
    pub oom_killed: bool,
    /// When it was noticed (seconds since the epoch).
    pub at_unix: u64,
    /// Its VMM log's tail, or why its status is unknown.
    pub detail: Option<String>,
}

/// The database. One connection behind a mutex: every statement is short.
pub struct Store {
    conn: Mutex<Connection>,
}

impl Store {
    /// Opens (creating and migrating) the database at `path`.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let version: u32 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        let known = MIGRATIONS.len() as u32;
        if version > known {
            return Err(StoreError::TooNew {
                path: path.to_owned(),
                found: version,
                known,
            });
        }
        for (i, step) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            let tx = conn.unchecked_transaction()?;
            tx.execute_batch(step)?;
            tx.pragma_update(None, "user_version", (i + 1) as u32)?;
            tx.commit()?;
        }
        Ok(Store {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves SQLite consistent (each
        // change is a statement or a transaction), so go on.
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a snapshot; false when the tag is taken.
    pub fn insert_snapshot(&self, row: &SnapshotRow) -> Result<bool, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let added = insert_snapshot_in(&tx, row)?;
        tx.commit()?;
        Ok(added)
    }

    /// Replaces a pending snapshot's row with what its finished directory
    /// says (its dependencies too) and clears `pending`, in one
    /// transaction; false when the row is gone (deleted meanwhile).
    pub fn finish_snapshot(&self, row: &SnapshotRow) -> Result<bool, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute(
            "DELETE FROM snapshot_deps WHERE tag = ?1",
            params![row.info.tag],
        )?;
        if tx.execute(
            "DELETE FROM snapshots WHERE tag = ?1",
            params![row.info.tag],
        )? == 0
        {
            return Ok(false);
        }
        let done = SnapshotRow {
            pending: false,
            ..row.clone()
        };
        insert_snapshot_in(&tx, &done)?;
        tx.commit()?;
        Ok(true)
    }

    /// Records which files of a snapshot were verified, as they were then
    /// (`None`: forget it, verify again).
    pub fn set_verified(
        &self,
        tag: &str,
        files: Option<&[proto::snapshot::FileIdentity]>,
    ) -> Result<(), StoreError> {
        self.conn().execute(
            "UPDATE snapshots SET verified = ?2 WHERE tag = ?1",
            params![tag, verified_text(files)],
        )?;
        Ok(())
    }

    /// Sets a snapshot's status (and warning, when given).
    pub fn set_snapshot_status(
        &self,
        tag: &str,
        status: SnapshotStatus,
        warning: Option<&str>,
    ) -> Result<(), StoreError> {
        self.conn().execute(
            "UPDATE snapshots SET status = ?2, warning = COALESCE(?3, warning),
                bootable = CASE WHEN ?2 = 'ready' THEN bootable ELSE 0 END
             WHERE tag = ?1",
            params![tag, status.as_str(), warning],
        )?;
        Ok(())
    }

    /// Marks a snapshot ready and bootable.
    pub fn set_snapshot_ready(&self, tag: &str) -> Result<(), StoreError> {
        self.conn().execute(
            "UPDATE snapshots SET status = 'ready', bootable = 1, source_pid = NULL WHERE tag = ?1",
            params![tag],
        )?;
        Ok(())
    }

    /// One snapshot.
    pub fn snapshot(&self, tag: &str) -> Result<Option<SnapshotRow>, StoreError> {
        let conn = self.conn();
        let row = conn
            .query_row(
                &format!("{SNAPSHOT_SELECT} WHERE tag = ?1"),
                params![tag],
                snapshot_row,
            )
            .optional()?;
        row.map(|r| with_deps(&conn, r)).transpose()
    }

    /// Every snapshot, oldest first.
    pub fn snapshots(&self) -> Result<Vec<SnapshotRow>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "{SNAPSHOT_SELECT} ORDER BY created_at_unix, rowid"
        ))?;
        let rows = stmt
            .query_map([], snapshot_row)?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter().map(|r| with_deps(&conn, r)).collect()
    }

    /// The snapshot whose directory is `dir`.
    pub fn snapshot_tag_by_dir(&self, dir: &Path) -> Result<Option<String>, StoreError> {
        Ok(self
            .conn()
            .query_row(
                "SELECT tag FROM snapshots WHERE dir = ?1",
                params![dir.to_string_lossy()],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// Snapshots that depend on `tag` directly.
    pub fn dependents(&self, tag: &str) -> Result<Vec<String>, StoreError> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare("SELECT tag FROM snapshot_deps WHERE depends_on = ?1 ORDER BY tag")?;
        let tags = stmt
            .query_map(params![tag], |r| r.get(0))?
            .collect::<Result<Vec<String>, _>>()?;
        Ok(tags)
    }

    /// Removes a snapshot row (its dependency edges both ways go too).
    pub fn delete_snapshot(&self, tag: &str) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute("DELETE FROM snapshots WHERE tag = ?1", params![tag])?;
        tx.execute(
            "DELETE FROM snapshot_deps WHERE tag = ?1 OR depends_on = ?1",
            params![tag],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Adds sandboxes, all or none.
    pub fn insert_sandboxes(&self, rows: &[SandboxRow]) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        {
            let mut stmt = tx.prepare(
                "INSERT INTO sandboxes (id, snapshot_tag, base_tag, dir, control_socket,
                    vsock_socket, pid, pid_start_ticks, created_at_unix, memory_limit_mib,
                    cgroup, live_fork, netns, guest_addr, hugepages, warning, state,
                    cpu_limit_millis, pids_limit, disk_quota_mib, io_limit_mibps, labels,
                    deadline_unix, on_timeout, timeout_secs)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16,
                    ?17, ?18, ?19, ?20, ?21, ?22, ?23, ?24, ?25)",
            )?;
            for r in rows {
                stmt.execute(params![
                    r.info.id,
                    r.info.snapshot_tag,
                    r.base_tag,
                    r.dir.to_string_lossy(),
                    r.control_socket.to_string_lossy(),
                    r.vsock_socket.as_ref().map(|p| p.to_string_lossy()),
                    r.info.pid,
                    r.pid_start_ticks as i64,
                    r.info.created_at_unix as i64,
                    r.info.memory_limit_mib.map(|m| m as i64),
                    r.cgroup.as_ref().map(|p| p.to_string_lossy()),
                    r.info.live_fork,
                    r.info.netns,
                    r.info.guest_addr,
                    r.info.hugepages,
                    r.info.warning,
                    r.info.state.as_str(),
                    r.info.cpu_limit.map(proto::api::cpu_millis),
                    r.info.pids_limit.map(|n| n.min(i64::MAX as u64) as i64),
                    r.info.disk_quota_mib.map(|n| n.min(i64::MAX as u64) as i64),
                    r.info.io_limit_mibps.map(|n| n.min(i64::MAX as u64) as i64),
                    labels_json(&r.info.labels),
                    r.info.deadline_unix.map(|n| n.min(i64::MAX as u64) as i64),
                    r.info.on_timeout.map(|o| o.as_str()),
                    r.info.timeout_secs.map(|n| n.min(i64::MAX as u64) as i64),
                ])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Records that sandboxes recorded `starting` run: their process and
    /// where their files are, as the fork answered. All or none.
    pub fn start_sandboxes(&self, rows: &[SandboxRow]) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        {
            let mut stmt = tx.prepare(
                "UPDATE sandboxes SET state = 'running', pid = ?2, pid_start_ticks = ?3, dir = ?4,
                    control_socket = ?5, vsock_socket = ?6, cgroup = ?7
                 WHERE id = ?1 AND state = 'starting'",
            )?;
            for r in rows {
                stmt.execute(params![
                    r.info.id,
                    r.info.pid,
                    r.pid_start_ticks as i64,
                    r.dir.to_string_lossy(),
                    r.control_socket.to_string_lossy(),
                    r.vsock_socket.as_ref().map(|p| p.to_string_lossy()),
                    r.cgroup.as_ref().map(|p| p.to_string_lossy()),
                ])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Moves a sandbox from one of `from` to `to`; false when it was in
    /// none of them.
    pub fn set_state(
        &self,
        id: &str,
        from: &[proto::api::SandboxState],
        to: proto::api::SandboxState,
    ) -> Result<bool, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let now: Option<String> = tx
            .query_row(
                "SELECT state FROM sandboxes WHERE id = ?1",
                params![id],
                |r| r.get(0),
            )
            .optional()?;
        let moved = match now.as_deref().and_then(proto::api::SandboxState::parse) {
            Some(s) if from.contains(&s) => {
                tx.execute(
                    "UPDATE sandboxes SET state = ?2 WHERE id = ?1",
                    params![id, to.as_str()],
                )?;
                true
            }
            _ => false,
        };
        tx.commit()?;
        Ok(moved)
    }

    /// Sets a sandbox's timeout and, when its VMM runs, its deadline
    /// (`timeout_secs` from `now_unix`; a suspended sandbox's starts at its
    /// resume), keeping what the deadline does (kill, unless it said).
    pub fn set_timeout(
        &self,
        id: &str,
        timeout_secs: u64,
        now_unix: u64,
    ) -> Result<(), StoreError> {
        let t = timeout_secs.min(i64::MAX as u64 / 2) as i64;
        self.conn().execute(
            "UPDATE sandboxes SET timeout_secs = ?2,
                deadline_unix = CASE WHEN state IN ('running', 'paused') THEN ?3 ELSE NULL END,
                on_timeout = COALESCE(on_timeout, 'kill')
             WHERE id = ?1",
            params![id, t, (now_unix.min(i64::MAX as u64 / 2) as i64) + t],
        )?;
        Ok(())
    }

    /// Records a sandbox as suspended: kept as snapshot `tag`, no deadline.
    pub fn set_suspended(&self, id: &str, tag: &str) -> Result<bool, StoreError> {
        Ok(self.conn().execute(
            "UPDATE sandboxes SET state = 'suspended', suspended_tag = ?2, deadline_unix = NULL
             WHERE id = ?1 AND state IN ('running', 'paused')",
            params![id, tag],
        )? == 1)
    }

    /// Gives the sandbox `new_id` (just restored from `old_id`'s
    /// suspended snapshot) the id, creation time and labels of `old_id`,
    /// whose record it replaces. One transaction: either both records are
    /// there as they were, or one, under the old id.
    pub fn take_over(&self, old_id: &str, new_id: &str) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let (created, labels): (i64, Option<String>) = tx.query_row(
            "SELECT created_at_unix, labels FROM sandboxes WHERE id = ?1",
            params![old_id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        tx.execute("DELETE FROM sandboxes WHERE id = ?1", params![old_id])?;
        tx.execute(
            "UPDATE sandboxes SET id = ?1, created_at_unix = ?2, labels = ?3 WHERE id = ?4",
            params![old_id, created, labels, new_id],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Sandboxes with a live VMM whose deadline is at or before `now_unix`.
    pub fn due(&self, now_unix: u64) -> Result<Vec<SandboxRow>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&format!(
            "{SANDBOX_SELECT} WHERE deadline_unix IS NOT NULL AND deadline_unix <= ?1
                AND state IN ('running', 'paused')"
        ))?;
        let rows = stmt
            .query_map(params![now_unix.min(i64::MAX as u64) as i64], sandbox_row)?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// The earliest deadline of a sandbox with a live VMM.
    pub fn next_deadline(&self) -> Result<Option<u64>, StoreError> {
        let t: Option<i64> = self.conn().query_row(
            "SELECT MIN(deadline_unix) FROM sandboxes WHERE state IN ('running', 'paused')",
            [],
            |r| r.get(0),
        )?;
        Ok(t.map(|t| t.max(0) as u64))
    }

    /// Records how a sandbox's VMM ended; false when it was not running
    /// (already recorded, or gone).
    pub fn set_exited(&self, id: &str, end: &Ended) -> Result<bool, StoreError> {
        Ok(self.conn().execute(
            "UPDATE sandboxes SET state = 'exited', exit_code = ?2, signal = ?3, oom_killed = ?4,
                exited_at_unix = ?5, exit_detail = ?6
             WHERE id = ?1 AND state != 'exited'",
            params![
                id,
                end.code,
                end.signal,
                end.oom_killed,
                end.at_unix as i64,
                end.detail
            ],
        )? == 1)
    }

    /// Replaces an exited sandbox's `exit_detail` (the daemon ended it and
    /// says why, whoever recorded the end first).
    pub fn set_exit_detail(&self, id: &str, detail: &str) -> Result<(), StoreError> {
        self.conn().execute(
            "UPDATE sandboxes SET exit_detail = ?2 WHERE id = ?1 AND state = 'exited'",
            params![id, detail],
        )?;
        Ok(())
    }

    /// Sandboxes that exited before `unix` (seconds), to forget.
    pub fn exited_before(&self, unix: u64) -> Result<Vec<String>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT id FROM sandboxes WHERE state = 'exited' AND exited_at_unix < ?1 ORDER BY id",
        )?;
        let ids = stmt
            .query_map(params![unix as i64], |r| r.get(0))?
            .collect::<Result<Vec<String>, _>>()?;
        Ok(ids)
    }

    /// The daemon's instance id: made once per state directory (8 hex
    /// digits), it names the cgroups and network namespaces this daemon
    /// makes, so two daemons on one host each reconcile only their own.
    pub fn instance_id(&self) -> Result<String, StoreError> {
        let conn = self.conn();
        let made = crate::util::random_hex(4);
        conn.execute(
            "INSERT OR IGNORE INTO daemon (key, value) VALUES ('instance', ?1)",
            params![made],
        )?;
        Ok(
            conn.query_row("SELECT value FROM daemon WHERE key = 'instance'", [], |r| {
                r.get(0)
            })?,
        )
    }

    /// One sandbox.
    pub fn sandbox(&self, id: &str) -> Result<Option<SandboxRow>, StoreError> {
        Ok(self
            .conn()
            .query_row(
                &format!("{SANDBOX_SELECT} WHERE id = ?1"),
                params![id],
                sandbox_row,
            )
            .optional()?)
    }

    /// Every sandbox, oldest first.
    pub fn sandboxes(&self) -> Result<Vec<SandboxRow>, StoreError> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare(&format!("{SANDBOX_SELECT} ORDER BY created_at_unix, rowid"))?;
        let rows = stmt
            .query_map([], sandbox_row)?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// The sandboxes spawned from snapshot `tag` that are not known to
    /// have exited.
    pub fn running_from(&self, tag: &str) -> Result<Vec<String>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT id FROM sandboxes WHERE snapshot_tag = ?1 AND state != 'exited' ORDER BY id",
        )?;
        let ids = stmt
            .query_map(params![tag], |r| r.get(0))?
            .collect::<Result<Vec<String>, _>>()?;
        Ok(ids)
    }

    /// Number of sandboxes.
    pub fn sandbox_count(&self) -> Result<u64, StoreError> {
        Ok(self
            .conn()
            .query_row("SELECT COUNT(*) FROM sandboxes", [], |r| r.get::<_, i64>(0))?
            as u64)
    }

    /// Number of snapshots.
    pub fn snapshot_count(&self) -> Result<u64, StoreError> {
        Ok(self
            .conn()
            .query_row("SELECT COUNT(*) FROM snapshots", [], |r| r.get::<_, i64>(0))?
            as u64)
    }

    /// Records a branch of a sandbox: the snapshot its next diff branch is
    /// taken against, one more branch, and the branch's memory file.
    pub fn record_branch(
        &self,
        id: &str,
        base_tag: &str,
        memory_path: &str,
    ) -> Result<(), StoreError> {
        self.conn().execute(
            "UPDATE sandboxes SET base_tag = ?2, branch_count = branch_count + 1,
                last_branch_memory_path = ?3 WHERE id = ?1",
            params![id, base_tag, memory_path],
        )?;
        Ok(())
    }

    /// Removes a sandbox row.
    pub fn delete_sandbox(&self, id: &str) -> Result<(), StoreError> {
        self.conn()
            .execute("DELETE FROM sandboxes WHERE id = ?1", params![id])?;
        Ok(())
    }

    /// Records a network namespace about to be made; false if it is
    /// recorded already.
    pub fn add_netns(&self, name: &str) -> Result<bool, StoreError> {
        Ok(self.conn().execute(
            "INSERT OR IGNORE INTO netns (name) VALUES (?1)",
            params![name],
        )? == 1)
    }

    /// Whether network namespace `name` is recorded.
    pub fn netns_recorded(&self, name: &str) -> Result<bool, StoreError> {
        Ok(self
            .conn()
            .query_row("SELECT 1 FROM netns WHERE name = ?1", params![name], |_| {
                Ok(())
            })
            .optional()?
            .is_some())
    }

    /// Forgets a network namespace that is gone.
    pub fn remove_netns(&self, name: &str) -> Result<(), StoreError> {
        self.conn()
            .execute("DELETE FROM netns WHERE name = ?1", params![name])?;
        Ok(())
    }

    /// The network namespaces made and not removed that no sandbox that
    /// is starting or running names.
    pub fn orphan_netns(&self) -> Result<Vec<String>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT name FROM netns WHERE name NOT IN
                (SELECT netns FROM sandboxes WHERE netns IS NOT NULL AND state != 'exited')
             ORDER BY name",
        )?;
        let names = stmt
            .query_map([], |r| r.get(0))?
            .collect::<Result<Vec<String>, _>>()?;
        Ok(names)
    }
}

/// Adds a snapshot row and its dependency edges inside `tx`; false when
/// the tag is taken.
fn insert_snapshot_in(
    tx: &rusqlite::Transaction<'_>,
    row: &SnapshotRow,
) -> Result<bool, StoreError> {
    let i = &row.info;
    let added = tx.execute(
        "INSERT OR IGNORE INTO snapshots (tag, dir, created_at_unix, branched_from, pause_ms,
                status, bootable, warning, kind, guest, mem_mib, parent_tag, parent_content_hash,
                source_pid, network, diff_ms, diff_physical_bytes, diff_logical_bytes, tap,
                tap_mac, tap_addr, pending, verified)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17,
                ?18, ?19, ?20, ?21, ?22, ?23)",
        params![
            i.tag,
            i.dir,
            i.created_at_unix as i64,
            i.branched_from,
            // Kept in milliseconds with their fraction (the answer has
            // both the whole milliseconds and the microseconds).
            i.pause_us.map(|us| us as f64 / 1000.0),
            i.status.as_str(),
            i.bootable,
            i.warning,
            i.kind.as_deref().unwrap_or("full"),
            i.guest.as_deref().unwrap_or("unknown"),
            i.mem_mib.unwrap_or(0) as i64,
            row.parent_tag,
            row.parent_content_hash,
            row.source_pid,
            i.network,
            i.diff_ms.map(|v| v as i64),
            i.diff_physical_bytes.map(|v| v as i64),
            i.diff_logical_bytes.map(|v| v as i64),
            i.tap,
            row.tap_mac,
            row.tap_addr,
            row.pending,
            verified_text(row.verified.as_deref()),
        ],
    )? == 1;
    if added {
        for dep in &row.depends_on {
            tx.execute(
                "INSERT OR IGNORE INTO snapshot_deps (tag, depends_on) VALUES (?1, ?2)",
                params![i.tag, dep],
            )?;
        }
    }
    Ok(added)
}

/// A verified-files column value.
fn verified_text(files: Option<&[proto::snapshot::FileIdentity]>) -> Option<String> {
    files.map(|f| serde_json::to_string(f).expect("identities serialise"))
}

const SNAPSHOT_SELECT: &str = "SELECT tag, dir, created_at_unix, branched_from, pause_ms, status,
    bootable, warning, kind, guest, mem_mib, parent_tag, parent_content_hash, source_pid, network,
    diff_ms, diff_physical_bytes, diff_logical_bytes, tap, tap_mac, tap_addr, pending, verified
    FROM snapshots";

fn snapshot_row(r: &Row<'_>) -> rusqlite::Result<SnapshotRow> {
    let status: String = r.get(5)?;
    let status = match status.as_str() {
        "writing" => SnapshotStatus::Writing,
        "ready" => SnapshotStatus::Ready,
        _ => SnapshotStatus::Failed,
    };
    let mem_mib: i64 = r.get(10)?;
    let pause: Option<f64> = r.get(4)?;
    let count = |i| Ok::<_, rusqlite::Error>(r.get::<_, Option<i64>>(i)?.map(|v| v.max(0) as u64));
    Ok(SnapshotRow {
        info: SnapshotInfo {
            tag: r.get(0)?,
            dir: r.get(1)?,
            created_at_unix: r.get::<_, i64>(2)? as u64,
            branched_from: r.get(3)?,
            pause_ms: pause.map(|ms| ms.round().max(0.0) as u64),
            pause_us: pause.map(|ms| (ms * 1000.0).round().max(0.0) as u64),
            diff_ms: count(15)?,
            diff_physical_bytes: count(16)?,
            diff_logical_bytes: count(17)?,
            status,
            bootable: r.get(6)?,
            warning: r.get(7)?,
            kind: Some(r.get(8)?),
            guest: Some(r.get(9)?),
            mem_mib: (mem_mib > 0).then_some(mem_mib as u64),
            network: r.get(14)?,
            tap: r.get(18)?,
        },
        parent_tag: r.get(11)?,
        parent_content_hash: r.get(12)?,
        source_pid: r.get(13)?,
        depends_on: Vec::new(),
        tap_mac: r.get(19)?,
        tap_addr: r.get(20)?,
        pending: r.get(21)?,
        // A column that does not parse is as good as none: verify again.
        verified: r
            .get::<_, Option<String>>(22)?
            .and_then(|t| serde_json::from_str(&t).ok()),
    })
}

fn with_deps(conn: &Connection, mut row: SnapshotRow) -> Result<SnapshotRow, StoreError> {
    let mut stmt =
        conn.prepare_cached("SELECT depends_on FROM snapshot_deps WHERE tag = ?1 ORDER BY 1")?;
    row.depends_on = stmt
        .query_map(params![row.info.tag], |r| r.get(0))?
        .collect::<Result<Vec<String>, _>>()?;
    Ok(row)
}

/// A workspace as stored: what the API answers, and how to spawn its
/// sandboxes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkspaceRow {
    /// What the API answers.
    pub info: proto::api::WorkspaceInfo,
    /// Its sandboxes get a network namespace each.
    pub per_child_netns: bool,
    /// Its sandboxes' memory cap.
    pub memory_limit_mib: Option<u64>,
}

const WORKSPACE_SELECT: &str = "SELECT name, id, source_snapshot_tag, current_state_tag, status,
    live_sandbox_id, created_at_unix, last_active_unix, last_branch_memory_path, per_child_netns,
    memory_limit_mib FROM workspaces";

fn workspace_row(r: &Row<'_>) -> rusqlite::Result<WorkspaceRow> {
    Ok(WorkspaceRow {
        info: proto::api::WorkspaceInfo {
            name: r.get(0)?,
            id: r.get(1)?,
            source_snapshot_tag: r.get(2)?,
            current_state_tag: r.get(3)?,
            // An unknown word (a newer daemon's) reads as stale.
            status: proto::api::WorkspaceStatus::parse(&r.get::<_, String>(4)?)
                .unwrap_or(proto::api::WorkspaceStatus::Stale),
            live_sandbox_id: r.get(5)?,
            created_at_unix: r.get::<_, i64>(6)?.max(0) as u64,
            last_active_unix: r.get::<_, i64>(7)?.max(0) as u64,
            last_branch_memory_path: r.get(8)?,
        },
        per_child_netns: r.get(9)?,
        memory_limit_mib: r.get::<_, Option<i64>>(10)?.map(|m| m.max(0) as u64),
    })
}

impl Store {
    /// Records a new workspace; false when the name is taken.
    pub fn insert_workspace(&self, w: &WorkspaceRow) -> Result<bool, StoreError> {
        let n = self.conn().execute(
            "INSERT OR IGNORE INTO workspaces (name, id, source_snapshot_tag, current_state_tag,
                status, live_sandbox_id, created_at_unix, last_active_unix,
                last_branch_memory_path, per_child_netns, memory_limit_mib)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            params![
                w.info.name,
                w.info.id,
                w.info.source_snapshot_tag,
                w.info.current_state_tag,
                w.info.status.as_str(),
                w.info.live_sandbox_id,
                w.info.created_at_unix.min(i64::MAX as u64) as i64,
                w.info.last_active_unix.min(i64::MAX as u64) as i64,
                w.info.last_branch_memory_path,
                w.per_child_netns,
                w.memory_limit_mib.map(|m| m.min(i64::MAX as u64) as i64),
            ],
        )?;
        Ok(n == 1)
    }

    /// Writes a workspace's changing fields.
    pub fn update_workspace(&self, w: &proto::api::WorkspaceInfo) -> Result<(), StoreError> {
        self.conn().execute(
            "UPDATE workspaces SET id = ?2, current_state_tag = ?3, status = ?4,
                live_sandbox_id = ?5, last_active_unix = ?6, last_branch_memory_path = ?7
             WHERE name = ?1",
            params![
                w.name,
                w.id,
                w.current_state_tag,
                w.status.as_str(),
                w.live_sandbox_id,
                w.last_active_unix.min(i64::MAX as u64) as i64,
                w.last_branch_memory_path,
            ],
        )?;
        Ok(())
    }

    /// A workspace by name.
    pub fn workspace(&self, name: &str) -> Result<Option<WorkspaceRow>, StoreError> {
        Ok(self
            .conn()
            .query_row(
                &format!("{WORKSPACE_SELECT} WHERE name = ?1"),
                params![name],
                workspace_row,
            )
            .optional()?)
    }

    /// Every workspace, by name.
    pub fn workspaces(&self) -> Result<Vec<WorkspaceRow>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare_cached(&format!("{WORKSPACE_SELECT} ORDER BY name"))?;
        let rows = stmt
            .query_map([], workspace_row)?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// Forgets a workspace.
    pub fn delete_workspace(&self, name: &str) -> Result<(), StoreError> {
        self.conn()
            .execute("DELETE FROM workspaces WHERE name = ?1", params![name])?;
        Ok(())
    }
}

const SANDBOX_SELECT: &str = "SELECT id, snapshot_tag, base_tag, dir, control_socket,
    vsock_socket, pid, pid_start_ticks, created_at_unix, memory_limit_mib, cgroup, live_fork,
    netns, guest_addr, branch_count, last_branch_memory_path, hugepages, warning, state,
    exit_code, signal, oom_killed, exited_at_unix, exit_detail, cpu_limit_millis, pids_limit,
    disk_quota_mib, io_limit_mibps, labels, deadline_unix, on_timeout, suspended_tag,
    timeout_secs
    FROM sandboxes";

/// Labels as stored: a JSON object, or NULL for none.
fn labels_json(labels: &std::collections::BTreeMap<String, String>) -> Option<String> {
    (!labels.is_empty()).then(|| serde_json::to_string(labels).expect("labels serialize"))
}

fn sandbox_row(r: &Row<'_>) -> rusqlite::Result<SandboxRow> {
    let path = |s: String| PathBuf::from(s);
    let cgroup = r.get::<_, Option<String>>(10)?.map(path);
    Ok(SandboxRow {
        info: SandboxInfo {
            id: r.get(0)?,
            snapshot_tag: r.get(1)?,
            netns: r.get(12)?,
            guest_addr: r.get(13)?,
            created_at_unix: r.get::<_, i64>(8)? as u64,
            pid: r.get(6)?,
            memory_limit_mib: r.get::<_, Option<i64>>(9)?.map(|m| m as u64),
            has_branched: r.get::<_, i64>(14)? > 0,
            branch_count: r.get::<_, i64>(14)?.clamp(0, u32::MAX as i64) as u32,
            last_branch_memory_path: r.get(15)?,
            live_fork: r.get(11)?,
            hugepages: r.get(16)?,
            warning: r.get(17)?,
            // An unknown word (a newer daemon's) reads as exited: nothing
            // is done to a sandbox in a state this daemon does not know.
            state: proto::api::SandboxState::parse(&r.get::<_, String>(18)?)
                .unwrap_or(proto::api::SandboxState::Exited),
            exit_code: r.get(19)?,
            signal: r.get(20)?,
            oom_killed: r.get(21)?,
            exited_at_unix: r.get::<_, Option<i64>>(22)?.map(|t| t.max(0) as u64),
            exit_detail: r.get(23)?,
            cpu_limit: r
                .get::<_, Option<i64>>(24)?
                .map(|m| m.clamp(0, u32::MAX as i64) as f64 / 1000.0),
            pids_limit: r.get::<_, Option<i64>>(25)?.map(|n| n.max(0) as u64),
            disk_quota_mib: r.get::<_, Option<i64>>(26)?.map(|n| n.max(0) as u64),
            io_limit_mibps: r.get::<_, Option<i64>>(27)?.map(|n| n.max(0) as u64),
            cgroup: cgroup.as_deref().and_then(crate::cgroup::shown),
            // Unreadable labels (a hand-edited file) read as none.
            labels: r
                .get::<_, Option<String>>(28)?
                .and_then(|j| serde_json::from_str(&j).ok())
                .unwrap_or_default(),
            deadline_unix: r.get::<_, Option<i64>>(29)?.map(|t| t.max(0) as u64),
            on_timeout: r
                .get::<_, Option<String>>(30)?
                .and_then(|o| proto::api::OnTimeout::parse(&o)),
            timeout_secs: r.get::<_, Option<i64>>(32)?.map(|t| t.max(0) as u64),
            suspended_tag: r
                .get::<_, Option<String>>(31)?
                .filter(|_| r.get::<_, String>(18).is_ok_and(|s| s == "suspended")),
        },
        suspended_tag: r.get(31)?,
        base_tag: r.get(2)?,
        dir: path(r.get(3)?),
        control_socket: path(r.get(4)?),
        vsock_socket: r.get::<_, Option<String>>(5)?.map(path),
        pid_start_ticks: r.get::<_, i64>(7)? as u64,
        cgroup,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(tag: &str, deps: &[&str]) -> SnapshotRow {
        SnapshotRow {
            info: SnapshotInfo {
                tag: tag.into(),
                dir: format!("/s/{tag}"),
                created_at_unix: 7,
                branched_from: None,
                pause_ms: Some(2),
                pause_us: Some(1500),
                diff_ms: Some(3),
                diff_physical_bytes: Some(8192),
                diff_logical_bytes: Some(12288),
                status: SnapshotStatus::Writing,
                bootable: false,
                warning: None,
                kind: Some("diff".into()),
                guest: Some("builtin".into()),
                mem_mib: Some(128),
                network: true,
                tap: Some("tap7".into()),
            },
            parent_tag: deps.first().map(|s| s.to_string()),
            parent_content_hash: None,
            source_pid: Some(42),
            depends_on: deps.iter().map(|s| s.to_string()).collect(),
            tap_mac: Some("06:00:00:00:00:07".into()),
            tap_addr: Some("10.9.0.1/24".into()),
            pending: false,
            verified: Some(vec![proto::snapshot::FileIdentity {
                name: "memory".into(),
                inode: 12,
                size: 4096,
                mtime_ns: 1_700_000_000_123_456_789,
                ctime_ns: -1,
            }]),
        }
    }

    fn temp_db() -> (PathBuf, Store) {
        let dir = std::env::temp_dir().join(format!(
            "forkd-store-test-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let store = Store::open(&dir.join("forkd.db")).unwrap();
        (dir, store)
    }

    #[test]
    fn snapshots_roundtrip_with_their_dependencies() {
        let (dir, store) = temp_db();
        assert!(store.insert_snapshot(&snap("a", &[])).unwrap());
        assert!(store.insert_snapshot(&snap("b", &["a"])).unwrap());
        assert!(
            !store.insert_snapshot(&snap("b", &[])).unwrap(),
            "tag taken"
        );
        let b = store.snapshot("b").unwrap().unwrap();
        assert_eq!(b, snap("b", &["a"]));
        assert_eq!(store.dependents("a").unwrap(), vec!["b".to_string()]);
        store.set_snapshot_ready("b").unwrap();
        let b = store.snapshot("b").unwrap().unwrap();
        assert_eq!(b.info.status, SnapshotStatus::Ready);
        assert!(b.info.bootable);
        assert_eq!(b.source_pid, None);
        store
            .set_snapshot_status("b", SnapshotStatus::Failed, Some("gone"))
            .unwrap();
        let b = store.snapshot("b").unwrap().unwrap();
        assert!(!b.info.bootable);
        assert_eq!(b.info.warning.as_deref(), Some("gone"));
        store.delete_snapshot("a").unwrap();
        assert!(store.dependents("a").unwrap().is_empty());
        assert_eq!(store.snapshot_count().unwrap(), 1);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_pending_snapshot_is_finished_in_one_step_and_a_claim_is_exclusive() {
        let (dir, store) = temp_db();
        let pending = SnapshotRow::pending("p", Path::new("/s/p"));
        assert!(store.insert_snapshot(&pending).unwrap());
        assert!(!store.insert_snapshot(&pending).unwrap(), "claimed once");
        assert!(store.snapshot("p").unwrap().unwrap().pending);
        let mut done = snap("p", &["a"]);
        done.pending = true;
        assert!(store.finish_snapshot(&done).unwrap());
        let got = store.snapshot("p").unwrap().unwrap();
        assert!(!got.pending);
        assert_eq!(got.depends_on, ["a"]);
        assert_eq!(got.verified, done.verified);
        store.set_verified("p", None).unwrap();
        assert_eq!(store.snapshot("p").unwrap().unwrap().verified, None);
        store.delete_snapshot("p").unwrap();
        assert!(!store.finish_snapshot(&done).unwrap(), "gone meanwhile");
        assert!(store.snapshot("p").unwrap().is_none());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_sandbox_goes_from_starting_to_running_to_exited_once() {
        let (dir, store) = temp_db();
        let mut row = SandboxRow {
            info: SandboxInfo {
                id: "b-0".into(),
                snapshot_tag: "s".into(),
                netns: Some("forkd-x-b-0".into()),
                created_at_unix: 1,
                state: proto::api::SandboxState::Starting,
                ..SandboxInfo::default()
            },
            base_tag: "s".into(),
            dir: "/d/0".into(),
            control_socket: "/d/0/control.sock".into(),
            vsock_socket: None,
            pid_start_ticks: 0,
            cgroup: None,
            suspended_tag: None,
        };
        store.insert_sandboxes(std::slice::from_ref(&row)).unwrap();
        assert!(store.add_netns("forkd-x-b-0").unwrap());
        assert!(
            store.orphan_netns().unwrap().is_empty(),
            "a starting sandbox's"
        );
        assert_eq!(store.running_from("s").unwrap(), ["b-0"]);
        row.info.pid = 77;
        row.pid_start_ticks = 5;
        row.vsock_socket = Some("/d/0/vsock.sock".into());
        store.start_sandboxes(std::slice::from_ref(&row)).unwrap();
        let got = store.sandbox("b-0").unwrap().unwrap();
        assert_eq!(got.info.state, proto::api::SandboxState::Running);
        assert_eq!((got.info.pid, got.pid_start_ticks), (77, 5));
        let end = Ended {
            signal: Some(9),
            oom_killed: true,
            at_unix: 100,
            detail: Some("log".into()),
            ..Ended::default()
        };
        assert!(store.set_exited("b-0", &end).unwrap());
        assert!(!store.set_exited("b-0", &end).unwrap(), "recorded once");
        let got = store.sandbox("b-0").unwrap().unwrap();
        assert_eq!(got.info.state, proto::api::SandboxState::Exited);
        assert_eq!(
            (got.info.signal, got.info.exit_code, got.info.oom_killed),
            (Some(9), None, Some(true))
        );
        assert_eq!(store.orphan_netns().unwrap(), ["forkd-x-b-0"]);
        assert!(store.running_from("s").unwrap().is_empty());
        assert!(store.exited_before(100).unwrap().is_empty());
        assert_eq!(store.exited_before(101).unwrap(), ["b-0"]);
        let id = store.instance_id().unwrap();
        assert_eq!(id.len(), 8);
        assert_eq!(store.instance_id().unwrap(), id, "made once");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn namespaces_no_sandbox_names_are_orphans() {
        let (dir, store) = temp_db();
        for n in ["forkd-a-0", "forkd-a-1", "forkd-b-x"] {
            assert!(store.add_netns(n).unwrap());
        }
        assert!(!store.add_netns("forkd-a-0").unwrap(), "recorded twice");
        let mut row = SandboxRow {
            info: SandboxInfo {
                id: "a-0".into(),
                snapshot_tag: "s".into(),
                netns: Some("forkd-a-0".into()),
                guest_addr: Some("172.16.0.2".into()),
                created_at_unix: 1,
                pid: 1,
                memory_limit_mib: None,
                ..SandboxInfo::default()
            },
            base_tag: "s".into(),
            dir: "/d".into(),
            control_socket: "/d/c".into(),
            vsock_socket: None,
            pid_start_ticks: 1,
            cgroup: None,
            suspended_tag: None,
        };
        store.insert_sandboxes(std::slice::from_ref(&row)).unwrap();
        row.info.id = "c-0".into();
        row.info.netns = None;
        store.insert_sandboxes(std::slice::from_ref(&row)).unwrap();
        assert_eq!(store.orphan_netns().unwrap(), ["forkd-a-1", "forkd-b-x"]);
        store.remove_netns("forkd-a-1").unwrap();
        assert_eq!(store.orphan_netns().unwrap(), ["forkd-b-x"]);
        drop(store);
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// A database made by the first schema is brought up to date, its
    /// rows kept.
    #[test]
    fn an_older_schema_is_migrated() {
        let dir = std::env::temp_dir().join(format!("forkd-store-mig-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("forkd.db");
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(MIGRATIONS[0]).unwrap();
        conn.pragma_update(None, "user_version", 1).unwrap();
        conn.execute(
            "INSERT INTO sandboxes VALUES ('old', 'a', 'a', '/d', '/d/c', NULL, 5, 6, 7, NULL, NULL, 0)",
            [],
        )
        .unwrap();
        drop(conn);
        let store = Store::open(&path).unwrap();
        let row = store.sandbox("old").unwrap().expect("the old row is kept");
        assert_eq!((row.info.pid, row.info.netns), (5, None));
        let conn = Connection::open(&path).unwrap();
        let v: u32 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(v as usize, MIGRATIONS.len());
        drop((store, conn));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn reopening_keeps_rows_and_a_newer_schema_is_refused() {
        let (dir, store) = temp_db();
        let row = SandboxRow {
            info: SandboxInfo {
                id: "x1".into(),
                snapshot_tag: "a".into(),
                netns: Some("forkd-x1".into()),
                guest_addr: Some("172.16.0.2".into()),
                created_at_unix: 3,
                pid: 99,
                memory_limit_mib: Some(256),
                live_fork: true,
                hugepages: true,
                warning: Some("w".into()),
                ..SandboxInfo::default()
            },
            base_tag: "a".into(),
            dir: "/d".into(),
            control_socket: "/d/control.sock".into(),
            vsock_socket: None,
            pid_start_ticks: 1234,
            cgroup: None,
            suspended_tag: None,
        };
        store.insert_sandboxes(std::slice::from_ref(&row)).unwrap();
        drop(store);
        let path = dir.join("forkd.db");
        let store = Store::open(&path).unwrap();
        assert_eq!(store.sandbox("x1").unwrap(), Some(row));
        store.record_branch("x1", "b", "/s/b/memory").unwrap();
        store.record_branch("x1", "c", "/s/c/diff").unwrap();
        let after = store.sandbox("x1").unwrap().unwrap();
        assert_eq!(after.base_tag, "c");
        assert_eq!(
            (
                after.info.has_branched,
                after.info.branch_count,
                after.info.last_branch_memory_path.as_deref()
            ),
            (true, 2, Some("/s/c/diff"))
        );
        drop(store);
        let conn = Connection::open(&path).unwrap();
        conn.pragma_update(None, "user_version", 99).unwrap();
        drop(conn);
        let err = Store::open(&path).err().unwrap();
        assert!(err.to_string().contains("newer"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
