//! A snapshot's files checked against the hashes its `snapshot.json`
//! records, by `forkd-vmm verify`: once in the background after the
//! snapshot is registered (and, after a restart, for every snapshot not
//! verified yet), and again, before a child is forked, whenever a file's
//! identity (inode, size, mtime, ctime) is not the one last verified.
//! The spawn path pays a few `stat` calls; only a file that changed costs
//! a hash on it. A snapshot whose files do not match is marked `failed`
//! with what did not match, and its fork server stopped.

use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use proto::api::SnapshotStatus;
use proto::snapshot::{FileIdentity, Verified};

use crate::daemon::Daemon;
use crate::error::{ApiError, ApiResult};
use crate::store::SnapshotRow;

/// One background verification at a time: they read whole memory files.
static BACKGROUND: Mutex<()> = Mutex::new(());

/// What a verification found.
#[derive(Debug)]
pub enum Outcome {
    /// Every file has the recorded content.
    Intact(Vec<FileIdentity>),
    /// A file is missing, unreadable or not what was hashed, or the
    /// metadata is bad (forkd-vmm's message says which).
    Corrupt(String),
    /// forkd-vmm verify did not run, or answered unreadably.
    NotRun(String),
}

/// `forkd-vmm verify`'s exit status for a file that changed while it was
/// hashed.
const CHANGED: i32 = 4;

/// Runs `forkd-vmm verify` on the snapshot in `dir` (blocking; at a lower
/// CPU priority when `background`).
pub fn verify(vmm: &Path, dir: &Path, background: bool) -> Outcome {
    let mut cmd = Command::new(vmm);
    cmd.arg("verify")
        .arg("--snapshot")
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if background {
        // SAFETY: the closure runs in the child between fork and exec and
        // only calls setpriority, which is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                libc::setpriority(libc::PRIO_PROCESS, 0, 10);
                Ok(())
            });
        }
    }
    // A file that changed while it was hashed is hashed again, once.
    let mut out = match cmd.output() {
        Ok(out) => out,
        Err(e) => return Outcome::NotRun(format!("cannot run forkd-vmm verify: {e}")),
    };
    if out.status.code() == Some(CHANGED) {
        out = match cmd.output() {
            Ok(out) => out,
            Err(e) => return Outcome::NotRun(format!("cannot run forkd-vmm verify: {e}")),
        };
    }
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    match out.status.code() {
        Some(0) => match serde_json::from_slice::<Verified>(&out.stdout) {
            Ok(v) => Outcome::Intact(v.files),
            Err(e) => Outcome::NotRun(format!("forkd-vmm verify answered unreadably: {e}")),
        },
        // 1: a file does not have its hash; 3: one is missing or
        // unreadable, or snapshot.json is bad: either way no child can be
        // restored from it as it was taken. Anything else (a usage error
        // of an older forkd-vmm) says nothing of the files.
        Some(1) | Some(3) => Outcome::Corrupt(stderr),
        _ => Outcome::NotRun(format!(
            "forkd-vmm verify ended with {}: {stderr}",
            out.status
        )),
    }
}

/// Whether every file in `files` (in `dir`) still has that identity.
pub fn unchanged(dir: &Path, files: &[FileIdentity]) -> bool {
    files.iter().all(|f| {
        std::fs::metadata(dir.join(&f.name)).is_ok_and(|m| {
            m.ino() == f.inode
                && m.size() == f.size
                && nanos(m.mtime(), m.mtime_nsec()) == f.mtime_ns
                && nanos(m.ctime(), m.ctime_nsec()) == f.ctime_ns
        })
    })
}

fn nanos(secs: i64, nsec: i64) -> i128 {
    secs as i128 * 1_000_000_000 + nsec as i128
}

impl Daemon {
    /// Verifies snapshot `tag` on a thread of its own, after the ones
    /// queued before it.
    pub fn verify_in_background(self: &Arc<Self>, tag: &str) {
        let (this, which) = (self.clone(), tag.to_owned());
        let started = std::thread::Builder::new()
            .name("verify".into())
            .spawn(move || {
                let _one = BACKGROUND.lock().unwrap_or_else(|e| e.into_inner());
                if let Ok(Some(row)) = this.store.snapshot(&which) {
                    if row.info.status == SnapshotStatus::Ready && row.verified.is_none() {
                        let _ = this.verify_now(&row, true);
                    }
                }
            });
        if let Err(e) = started {
            tracing::warn!(
                tag,
                "cannot start a verification: {e}; it is done on first use"
            );
        }
    }

    /// Before a child of `row` is forked: its files are as last verified,
    /// or verified again now (blocking). 409 when they do not match; a
    /// snapshot not verified yet (its background check still runs) goes
    /// ahead.
    pub fn check_integrity(&self, row: &SnapshotRow) -> ApiResult<()> {
        let Some(files) = &row.verified else {
            return Ok(());
        };
        if unchanged(Path::new(&row.info.dir), files) {
            return Ok(());
        }
        tracing::warn!(
            tag = row.info.tag,
            "a file of the snapshot changed since it was verified; verifying it again"
        );
        self.verify_now(row, false)
    }

    /// Verifies `row` now and records the outcome.
    fn verify_now(&self, row: &SnapshotRow, background: bool) -> ApiResult<()> {
        let tag = &row.info.tag;
        match verify(self.vmm.binary(), Path::new(&row.info.dir), background) {
            Outcome::Intact(files) => {
                self.store.set_verified(tag, Some(&files))?;
                Ok(())
            }
            Outcome::Corrupt(why) => {
                tracing::error!(tag, "snapshot is corrupt: {why}");
                self.store.set_verified(tag, None)?;
                self.store.set_snapshot_status(
                    tag,
                    SnapshotStatus::Failed,
                    Some(&format!(
                        "its files do not have the content it was taken with: {why}"
                    )),
                )?;
                self.stop_fork_server(tag);
                Err(ApiError::conflict(format!(
                    "snapshot {tag:?} is corrupt ({why}); it is marked failed: delete it and make it again"
                )))
            }
            Outcome::NotRun(why) if background => {
                tracing::warn!(tag, "snapshot not verified: {why}; it is when a file changes or the daemon restarts");
                Ok(())
            }
            Outcome::NotRun(why) => Err(ApiError::internal(format!(
                "snapshot {tag:?} changed since it was verified and cannot be verified again: {why}"
            ))),
        }
    }
}
