//! Snapshots: made from a booted guest, registered with their chain,
//! described, compacted and deleted.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use proto::api::{
    CreateSnapshot, SnapshotDetail, SnapshotInfo, SnapshotStatus, DEFAULT_BOOT_WAIT_SECS,
    MAX_BOOT_WAIT_SECS,
};
use proto::snapshot::{SnapshotKind, SnapshotMeta};

use crate::daemon::Daemon;
use crate::driver::{GuestLink, SourceGuest, SourceVm};
use crate::error::{ApiError, ApiResult};
use crate::images::Images;
use crate::netns::TapSpec;
use crate::store::SnapshotRow;
use crate::util::random_hex;

/// Guest RAM bounds a snapshot request may ask for.
const MEM_MIB: std::ops::RangeInclusive<u64> = 16..=65536;
/// Most vCPUs a snapshot's guest may have.
const MAX_VCPUS: u8 = 64;

/// What a snapshot request asks to boot, checked.
struct Plan {
    guest: SourceGuest,
    mem_mib: u64,
    vcpus: u8,
    boot_wait: Duration,
    network: bool,
    /// The host tap the guest's interface goes on (`tap`).
    tap: Option<String>,
}

fn plan(req: &CreateSnapshot, images: &Images) -> ApiResult<Plan> {
    let guest =
        match (req.builtin, &req.kernel, &req.rootfs) {
            (true, None, None) => SourceGuest::Builtin,
            (true, _, _) => {
                return Err(ApiError::bad_request(
                    "builtin: true boots the built-in guest; leave out kernel and rootfs",
                ))
            }
            (false, Some(kernel), Some(rootfs)) => SourceGuest::Linux {
                kernel: images.resolve("kernel", kernel)?,
                rootfs: images.resolve("rootfs", rootfs)?,
                rw: req.rw.unwrap_or(false),
                extra_args: req.kernel_args.clone(),
            },
            (false, _, _) => return Err(ApiError::bad_request(
                "give kernel and rootfs (files in the daemon's images directory), or builtin: true",
            )),
        };
    let default_mem = if req.builtin { 128 } else { 256 };
    let mem_mib = req.mem_size_mib.unwrap_or(default_mem);
    if !MEM_MIB.contains(&mem_mib) {
        return Err(ApiError::bad_request(format!(
            "mem_size_mib {mem_mib} is out of range: {} to {}",
            MEM_MIB.start(),
            MEM_MIB.end()
        )));
    }
    let vcpus = req.vcpus.unwrap_or(1);
    if !(1..=MAX_VCPUS).contains(&vcpus) {
        return Err(ApiError::bad_request(format!(
            "vcpus {vcpus} is out of range: 1 to {MAX_VCPUS}"
        )));
    }
    // Upstream slept this long and then snapshotted; here it bounds the
    // wait for the agent, which ends as soon as the agent answers. Its
    // 0 ("no sleep") is the default wait.
    let wait = match req.boot_wait_secs {
        None | Some(0) => DEFAULT_BOOT_WAIT_SECS,
        Some(secs) => secs,
    };
    if wait > MAX_BOOT_WAIT_SECS {
        return Err(ApiError::bad_request(format!(
            "boot_wait_secs {wait} is out of range: 0 to {MAX_BOOT_WAIT_SECS}"
        )));
    }
    if let Some(tap) = &req.tap {
        if req.network {
            return Err(ApiError::bad_request(
                "give network (a link forkd makes) or tap (one you made), not both",
            ));
        }
        netif::check_ifname(tap).map_err(|e| ApiError::bad_request(format!("tap {tap:?}: {e}")))?;
    }
    Ok(Plan {
        guest,
        mem_mib,
        vcpus,
        boot_wait: Duration::from_secs(wait),
        network: req.network,
        tap: req.tap.clone(),
    })
}

impl Daemon {
    /// `POST /v1/snapshots`: boots the guest, waits for its agent to
    /// answer, snapshots it and ends it.
    pub async fn create_snapshot(self: &Arc<Self>, req: CreateSnapshot) -> ApiResult<SnapshotInfo> {
        let plan = plan(&req, &self.images)?;
        // Upstream answers 400 for a create onto an existing tag (branch
        // and compact answer 409, as claim_tag does).
        if proto::api::valid_tag(&req.tag)
            && self.store.snapshot(&req.tag)?.is_some_and(|s| !s.pending)
        {
            return Err(ApiError::bad_request(format!(
                "snapshot {:?} exists; delete it first or pick another tag",
                req.tag
            )));
        }
        // The host tap as it is now: what every child's namespace repeats.
        let host_tap = match &plan.tap {
            Some(name) => Some(TapSpec::of_host_tap(name).map_err(|e| {
                ApiError::bad_request(format!(
                    "tap {name:?}: {e} (make it first, e.g. `ip tuntap add mode tap name {name}`, and give it an address)"
                ))
            })?),
            None => None,
        };
        // A VM of the guest's RAM runs until its memory file is written.
        self.reserve.check_memory(plan.mem_mib, "a snapshot")?;
        self.reserve
            .check_disk(&self.paths.snapshots, plan.mem_mib, "a snapshot")?;
        let dst = self.paths.snapshot(&req.tag);
        let mut pending = SnapshotRow::pending(&req.tag, &dst);
        if let Some(tap) = &host_tap {
            pending.info.tap = Some(tap.name.clone());
            pending.tap_mac = Some(proto::snapshot::format_mac(&tap.mac));
            pending.tap_addr = tap.addr_text();
        }
        pending.info.kind = Some("full".into());
        pending.info.guest = Some(if req.builtin { "builtin" } else { "linux" }.into());
        pending.info.mem_mib = Some(plan.mem_mib);
        pending.info.network = plan.network || plan.tap.is_some();
        let claim = self.claim_tag(pending)?;
        let this = self.clone();
        let tag = req.tag.clone();
        let row = tokio::task::spawn_blocking(move || -> ApiResult<SnapshotRow> {
            let build = this
                .paths
                .run
                .join(format!("build-{tag}-{}", random_hex(4)));
            let result = (|| {
                // The source VM's namespace goes when it does (the guard
                // is dropped after the VM).
                let mut netns = crate::netns::Namespaces::new(&this.store);
                if plan.network {
                    netns.add(format!(
                        "{}b{}",
                        crate::netns::prefix(&this.instance),
                        random_hex(4)
                    ))?;
                }
                let link = match (&plan.tap, netns.names().first()) {
                    (Some(tap), _) => Some(GuestLink::HostTap(tap)),
                    (None, Some(ns)) => Some(GuestLink::Namespace(ns)),
                    (None, None) => None,
                };
                let mut vm = SourceVm::boot(
                    &this.vmm,
                    &plan.guest,
                    plan.mem_mib,
                    plan.vcpus,
                    &build,
                    link,
                )?;
                crate::failpoint::hit("create.booted");
                let pong = vm.wait_for_agent(plan.boot_wait).map_err(ApiError::from)?;
                tracing::info!(tag, guest = pong.guest, "agent answered; snapshotting");
                vm.snapshot(&dst)?;
                drop(vm);
                crate::failpoint::hit("snapshot.written");
                let mut row = this.row_from_dir(&tag, &dst, None, None, None)?;
                if let Some(tap) = host_tap {
                    row.info.tap = Some(tap.name.clone());
                    row.tap_mac = Some(proto::snapshot::format_mac(&tap.mac));
                    row.tap_addr = tap.addr_text();
                }
                row.info.warning = pong.interpreter_error.map(|e| {
                    format!(
                        "the guest's warm interpreter failed to start, so eval will not work: {e}"
                    )
                });
                Ok(row)
            })();
            crate::sandboxes::remove_tree(&build);
            result
        })
        .await??;
        claim.finish(&row)?;
        self.verify_in_background(&row.info.tag);
        if row.info.network {
            self.refill_netns_pool();
        }
        Ok(row.info)
    }

    /// A registry row for the snapshot written in `dir`: its dependencies
    /// come from its metadata (a diff's parent, disk layers of another
    /// snapshot), named by the tags of the directories they are in.
    pub fn row_from_dir(
        &self,
        tag: &str,
        dir: &Path,
        branched_from: Option<&str>,
        pause_ms: Option<f64>,
        diff: Option<proto::control::DiffCost>,
    ) -> ApiResult<SnapshotRow> {
        let meta = proto::snapshot::read_meta(dir).map_err(|e| {
            ApiError::internal(format!("the new snapshot's metadata is unreadable: {e}"))
        })?;
        let (parent_tag, parent_hash, depends_on) = self.dependencies(&meta)?;
        let status = meta.status;
        Ok(SnapshotRow {
            info: SnapshotInfo {
                tag: tag.to_owned(),
                dir: dir.to_string_lossy().into_owned(),
                created_at_unix: meta.created_at_unix,
                branched_from: branched_from.map(str::to_owned),
                pause_ms: pause_ms.map(|ms| ms.round().max(0.0) as u64),
                pause_us: pause_ms.map(|ms| (ms * 1000.0).round().max(0.0) as u64),
                diff_ms: diff.map(|d| (d.write_us + 500) / 1000),
                diff_physical_bytes: diff.map(|d| d.physical_bytes),
                diff_logical_bytes: diff.map(|d| d.logical_bytes),
                status,
                bootable: meta.bootable && status == SnapshotStatus::Ready,
                warning: None,
                kind: Some(meta.kind.as_str().into()),
                guest: Some(meta.guest.as_str().into()),
                mem_mib: Some(meta.mem_mib),
                network: !meta.nets.is_empty(),
                tap: None,
            },
            parent_tag,
            parent_content_hash: parent_hash,
            source_pid: None,
            depends_on,
            tap_mac: None,
            tap_addr: None,
            pending: false,
            verified: None,
        })
    }

    /// (parent tag, parent hash, every snapshot `meta` needs files of).
    #[allow(clippy::type_complexity)]
    fn dependencies(
        &self,
        meta: &SnapshotMeta,
    ) -> ApiResult<(Option<String>, Option<String>, Vec<String>)> {
        let mut deps = Vec::new();
        let mut parent_tag = None;
        let mut parent_hash = None;
        if let Some(parent) = &meta.parent {
            let tag = self.store.snapshot_tag_by_dir(&parent.dir)?;
            // A diff over a directory no record names (a branch that
            // failed, or was cut short by a crash, and was removed) could
            // never be restored.
            if tag.is_none() {
                return Err(ApiError::conflict(format!(
                    "the diff stacks on {}, which is not a registered snapshot (a branch that                      failed or was interrupted): take a full branch first (mode: full), then                      diffs stack on that",
                    parent.dir.display()
                )));
            }
            parent_hash = Some(parent.memory_hash.clone());
            parent_tag = tag.clone();
            deps.extend(tag);
        }
        for disk in &meta.disks {
            for layer in disk.layers.iter().filter(|l| l.is_absolute()) {
                if let Some(tag) = self.tag_owning(layer)? {
                    if !deps.contains(&tag) {
                        deps.push(tag);
                    }
                }
            }
        }
        if parent_tag.is_none() {
            parent_tag = deps.first().cloned();
        }
        Ok((parent_tag, parent_hash, deps))
    }

    /// The snapshot whose directory holds `file`.
    fn tag_owning(&self, file: &Path) -> ApiResult<Option<String>> {
        match file.parent() {
            Some(dir) => Ok(self.store.snapshot_tag_by_dir(dir)?),
            None => Ok(None),
        }
    }

    /// `GET /v1/snapshots`.
    pub fn list_snapshots(&self) -> ApiResult<Vec<SnapshotInfo>> {
        Ok(self
            .store
            .snapshots()?
            .into_iter()
            .map(|r| r.info)
            .collect())
    }

    /// `GET /v1/snapshots/:tag/info`.
    pub fn snapshot_detail(&self, tag: &str) -> ApiResult<SnapshotDetail> {
        let row = self.existing_snapshot(tag)?;
        let dir = PathBuf::from(&row.info.dir);
        let meta = proto::snapshot::read_meta(&dir).ok();
        let own_memory = match meta.as_ref().map(|m| m.kind) {
            Some(SnapshotKind::Diff) => dir.join(proto::snapshot::DIFF_FILE),
            _ => dir.join(proto::snapshot::MEMORY_FILE),
        };
        let mut ancestors = Vec::new();
        let mut seen = HashSet::from([tag.to_owned()]);
        let mut next = row.parent_tag.clone();
        while let Some(t) = next {
            if !seen.insert(t.clone()) {
                break;
            }
            next = self.store.snapshot(&t)?.and_then(|r| r.parent_tag);
            ancestors.push(t);
        }
        // Root first, the direct parent last (upstream's order).
        ancestors.reverse();
        Ok(SnapshotDetail {
            memory_logical_bytes: meta.as_ref().map_or(0, |m| m.memory_bytes),
            memory_physical_bytes: std::fs::metadata(&own_memory).map_or(0, |m| m.blocks() * 512),
            vmstate_bytes: std::fs::metadata(dir.join(proto::snapshot::VMSTATE_FILE))
                .map_or(0, |m| m.len()),
            parent_tag: row.parent_tag.clone(),
            parent_content_hash: row.parent_content_hash.clone(),
            chain_depth: ancestors.len() as u32,
            ancestors,
            dependents: self.store.dependents(tag)?,
            verified: row
                .verified
                .as_deref()
                .is_some_and(|files| crate::integrity::unchanged(&dir, files)),
            info: row.info,
        })
    }

    /// A registered snapshot, or 404.
    pub fn existing_snapshot(&self, tag: &str) -> ApiResult<SnapshotRow> {
        if !proto::api::valid_tag(tag) {
            return Err(ApiError::bad_request(format!(
                "tag {tag:?} is not valid: use 1 to 64 of A-Z a-z 0-9 _ -"
            )));
        }
        self.store
            .snapshot(tag)?
            .ok_or_else(|| ApiError::not_found(format!("no snapshot {tag:?}")))
    }

    /// `DELETE /v1/snapshots/:tag`: refused while others depend on it,
    /// unless `cascade` (they go too) or `force` (they are marked failed).
    pub async fn delete_snapshot(
        self: &Arc<Self>,
        tag: &str,
        cascade: bool,
        force: bool,
    ) -> ApiResult<()> {
        if cascade && force {
            return Err(ApiError::bad_request(
                "give cascade or force, not both: cascade deletes the dependents, force leaves them broken",
            ));
        }
        let row = self.existing_snapshot(tag)?;
        let running = self.store.running_from(tag)?;
        if !running.is_empty() && !force {
            let shown: Vec<_> = running.iter().take(5).collect();
            return Err(ApiError::conflict(format!(
                "{} running sandbox(es) were spawned from snapshot {tag:?} ({shown:?}{}); kill them first, or pass ?force=true (they run on, but take a full branch before a diff)",
                running.len(),
                if running.len() > shown.len() { ", ..." } else { "" }
            )));
        }
        let dependents = self.store.dependents(tag)?;
        if !dependents.is_empty() && !cascade && !force {
            return Err(ApiError::conflict(format!(
                "snapshot {tag:?} has dependents {dependents:?}; delete them first, or pass ?cascade=true (delete them too) or ?force=true (leave them failed)"
            )));
        }
        // Everything to delete, dependents before what they depend on.
        let mut order = vec![row];
        if cascade {
            let mut i = 0;
            while i < order.len() {
                for dep in self.store.dependents(&order[i].info.tag)? {
                    if !order.iter().any(|r| r.info.tag == dep) {
                        order.extend(self.store.snapshot(&dep)?);
                    }
                }
                i += 1;
            }
            order.reverse();
        }
        if let Some(busy) = order
            .iter()
            .find(|r| r.info.status == SnapshotStatus::Writing)
        {
            return Err(ApiError::conflict(format!(
                "snapshot {:?} is still being written; wait until it is ready or failed",
                busy.info.tag
            )));
        }
        if force {
            for dep in &dependents {
                self.store.set_snapshot_status(
                    dep,
                    SnapshotStatus::Failed,
                    Some(&format!(
                        "snapshot {tag:?}, which it depends on, was deleted"
                    )),
                )?;
                self.stop_fork_server(dep);
            }
        }
        for r in order {
            self.stop_fork_server(&r.info.tag);
            self.store.delete_snapshot(&r.info.tag)?;
            crate::failpoint::hit("delete.unregistered");
            let dir = PathBuf::from(&r.info.dir);
            tokio::task::spawn_blocking(move || std::fs::remove_dir_all(&dir))
                .await?
                .or_else(|e| match e.kind() {
                    std::io::ErrorKind::NotFound => Ok(()),
                    _ => Err(ApiError::internal(format!(
                        "snapshot {:?} is unregistered but its directory could not be removed: {e}",
                        r.info.tag
                    ))),
                })?;
        }
        Ok(())
    }

    /// `POST /v1/snapshots/:tag/compact`: a flat, self-contained copy.
    pub async fn compact(self: &Arc<Self>, tag: &str, to: &str) -> ApiResult<SnapshotInfo> {
        if to == tag {
            return Err(ApiError::bad_request(format!(
                "compact {tag:?} to itself: give another tag for the flat copy"
            )));
        }
        let src = self.existing_snapshot(tag)?;
        if src.info.status != SnapshotStatus::Ready {
            return Err(ApiError::conflict(format!(
                "snapshot {tag:?} is {}; only a ready snapshot can be compacted",
                src.info.status.as_str()
            )));
        }
        self.reserve.check_disk(
            &self.paths.snapshots,
            src.info.mem_mib.unwrap_or(0),
            "a compaction",
        )?;
        let dst = self.paths.snapshot(to);
        let mut pending = SnapshotRow::pending(to, &dst);
        pending.info.kind = Some("full".into());
        pending.info.guest = src.info.guest.clone();
        pending.info.mem_mib = src.info.mem_mib;
        pending.info.network = src.info.network;
        let claim = self.claim_tag(pending)?;
        let this = self.clone();
        let to_owned = to.to_owned();
        let row = tokio::task::spawn_blocking(move || -> ApiResult<SnapshotRow> {
            let out = std::process::Command::new(this.vmm.binary())
                .arg("compact")
                .arg("--snapshot")
                .arg(&src.info.dir)
                .arg("--to")
                .arg(&dst)
                .stdin(std::process::Stdio::null())
                .output()
                .map_err(|e| ApiError::internal(format!("cannot run forkd-vmm compact: {e}")))?;
            if !out.status.success() {
                return Err(ApiError::internal(format!(
                    "forkd-vmm compact failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                )));
            }
            crate::failpoint::hit("snapshot.written");
            let mut row = this.row_from_dir(&to_owned, &dst, None, None, None)?;
            inherit_tap(&mut row, &src);
            Ok(row)
        })
        .await??;
        claim.finish(&row)?;
        self.verify_in_background(&row.info.tag);
        if row.info.network {
            self.refill_netns_pool();
        }
        Ok(row.info)
    }
}

/// The host tap a snapshot was made on, as its children's namespaces
/// repeat it; `None` when it was not made on one (or its record does not
/// parse).
pub fn tap_of(row: &SnapshotRow) -> Option<TapSpec> {
    TapSpec::from_columns(
        row.info.tap.as_deref()?,
        row.tap_mac.as_deref()?,
        row.tap_addr.as_deref(),
    )
}

/// `row` (a branch or compaction of `from`) records `from`'s host tap.
pub fn inherit_tap(row: &mut SnapshotRow, from: &SnapshotRow) {
    row.info.tap = from.info.tap.clone();
    row.tap_mac = from.tap_mac.clone();
    row.tap_addr = from.tap_addr.clone();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_snapshot_request_is_checked_before_anything_boots() {
        let tmp = std::env::temp_dir().join(format!("forkd-plan-{}", std::process::id()));
        let images = Images::open(&tmp).unwrap();
        let plan = |req: &CreateSnapshot| plan(req, &images);
        let ok = plan(&CreateSnapshot {
            tag: "t".into(),
            builtin: true,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(ok.mem_mib, 128);
        assert_eq!(ok.boot_wait, Duration::from_secs(DEFAULT_BOOT_WAIT_SECS));
        // Upstream's bounds (0 to 60) are taken; 0 is the default wait.
        for (secs, wait) in [(0, DEFAULT_BOOT_WAIT_SECS), (10, 10), (60, 60)] {
            let p = plan(&CreateSnapshot {
                tag: "t".into(),
                builtin: true,
                boot_wait_secs: Some(secs),
                ..Default::default()
            })
            .unwrap();
            assert_eq!(p.boot_wait, Duration::from_secs(wait));
        }
        for (req, needle) in [
            (
                CreateSnapshot {
                    tag: "t".into(),
                    ..Default::default()
                },
                "give kernel and rootfs",
            ),
            (
                CreateSnapshot {
                    tag: "t".into(),
                    builtin: true,
                    kernel: Some("/k".into()),
                    ..Default::default()
                },
                "leave out kernel",
            ),
            (
                CreateSnapshot {
                    tag: "t".into(),
                    kernel: Some("/nonexistent/k".into()),
                    rootfs: Some("/nonexistent/r".into()),
                    ..Default::default()
                },
                "cannot be used",
            ),
            (
                CreateSnapshot {
                    tag: "t".into(),
                    builtin: true,
                    mem_size_mib: Some(1 << 20),
                    ..Default::default()
                },
                "out of range",
            ),
            (
                CreateSnapshot {
                    tag: "t".into(),
                    builtin: true,
                    boot_wait_secs: Some(MAX_BOOT_WAIT_SECS + 1),
                    ..Default::default()
                },
                "boot_wait_secs",
            ),
        ] {
            let err = plan(&req).err().expect("refused");
            assert!(err.message.contains(needle), "{}", err.message);
            assert_eq!(err.status(), axum::http::StatusCode::BAD_REQUEST);
        }
    }
}
