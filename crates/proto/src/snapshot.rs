//! `snapshot.json`: what a snapshot directory says about itself, written
//! by forkd-vmm and read by forkd-vmm, forkd-daemon and the tools. One
//! definition of the schema, the file names and the size limit.
//!
//! ```text
//! <dir>/vmstate        vCPU, VM and device state (forkd-vmm's format)
//! <dir>/memory         guest RAM, regions back to back, sparse where zero
//! <dir>/memory.diff    a diff snapshot's changed pages (with memory.diffmap)
//! <dir>/snapshot.json  this metadata, written last
//! ```
//!
//! The file is untrusted input to every reader: [`read_meta`] bounds its
//! size and checks its version; forkd-vmm checks the rest (tap names, the
//! vmstate agreeing with it) before it restores.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Version of the snapshot directory layout and metadata.
pub const META_VERSION: u32 = 1;
/// Name of the vmstate file.
pub const VMSTATE_FILE: &str = "vmstate";
/// Name of the memory file.
pub const MEMORY_FILE: &str = "memory";
/// Name of the metadata file.
pub const META_FILE: &str = "snapshot.json";
/// A diff snapshot's changed pages, at their offsets (sparse).
pub const DIFF_FILE: &str = "memory.diff";
/// Which pages `memory.diff` holds (a checksummed bitmap, written and read by the VMM).
pub const DIFF_MAP_FILE: &str = "memory.diffmap";
/// Largest metadata file accepted.
pub const MAX_META_BYTES: u64 = 1 << 20;

/// One file of a snapshot as `forkd-vmm verify` hashed it: its identity
/// then, so a reader can tell whether the file changed since (any of these
/// differs) without hashing it again.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileIdentity {
    /// Its name in the snapshot directory.
    pub name: String,
    /// `st_ino`.
    pub inode: u64,
    /// `st_size`.
    pub size: u64,
    /// `st_mtime` in nanoseconds since the epoch.
    pub mtime_ns: i128,
    /// `st_ctime` in nanoseconds since the epoch.
    pub ctime_ns: i128,
}

/// What `forkd-vmm verify --snapshot DIR` prints (one JSON line) when
/// every file the snapshot's `snapshot.json` hashes has that content; a
/// mismatch exits 1 naming the file, and prints nothing on stdout.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verified {
    /// The files checked, with their identity as read (taken before the
    /// hash, and checked unchanged after it).
    pub files: Vec<FileIdentity>,
    /// Bytes read and hashed.
    pub bytes_hashed: u64,
    /// How long it took, in microseconds.
    pub micros: u64,
}

/// What kind of guest a snapshot holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GuestKind {
    /// The built-in guest.
    Builtin,
    /// A Linux kernel.
    Linux,
}

impl GuestKind {
    /// Whether the VM gets an in-kernel PIT: Linux calibrates with it, the
    /// built-in guest never programs a timer.
    pub fn needs_pit(self) -> bool {
        self == GuestKind::Linux
    }
}

impl GuestKind {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            GuestKind::Builtin => "builtin",
            GuestKind::Linux => "linux",
        }
    }
}

/// One drive of a snapshot: the layers a child stacks its own CoW layer on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotDisk {
    /// Base image (not copied into the snapshot); `None`: a blank disk.
    pub base: Option<PathBuf>,
    /// Size of a blank disk.
    pub size: u64,
    /// Frozen layers, bottom to top. A bare file name is in this
    /// snapshot's directory; an absolute path belongs to the snapshot this
    /// one was taken from (it must outlive this one).
    pub layers: Vec<PathBuf>,
    /// The drive refuses writes (it has no layer of its own).
    pub read_only: bool,
}

/// One network interface of a snapshot: the tap the VM used, which every
/// child attaches to by the same name, each in a network namespace of its
/// own (see `RestoreConfig::netns` in the builder).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotNet {
    /// The tap device's name.
    pub tap: String,
    /// The guest's MAC address, `06:00:ac:10:00:02` (the guest has it
    /// cached; a child keeps it).
    pub mac: String,
}

impl SnapshotNet {
    /// What a snapshot records of an interface on tap `tap`.
    pub fn new(tap: &str, mac: &[u8; 6]) -> Self {
        SnapshotNet {
            tap: tap.to_owned(),
            mac: format_mac(mac),
        }
    }
}

/// Parses a MAC address written `aa:bb:cc:dd:ee:ff` (as `snapshot.json` and
/// forkd-vmm's `--mac` take it).
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in mac.iter_mut() {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// Writes `mac` as [`parse_mac`] reads it: `06:00:ac:10:00:02`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// How a snapshot stores memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotKind {
    /// `memory` holds all of guest RAM.
    #[default]
    Full,
    /// `memory.diff` holds the pages that changed since `parent` (listed in
    /// `memory.diffmap`); `memory` is assembled from the parent's once, on
    /// first use, and then shared by every child.
    Diff,
}

impl SnapshotKind {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            SnapshotKind::Full => "full",
            SnapshotKind::Diff => "diff",
        }
    }
}

/// The snapshot a diff snapshot stacks on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParentRef {
    /// Its directory (absolute).
    pub dir: PathBuf,
    /// Its `memory_hash` when the diff was taken; a parent whose hash no
    /// longer matches is refused.
    pub memory_hash: String,
}

/// Status of a snapshot (in `snapshot.json` and in the REST API).
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotStatus {
    /// Memory is still being written (a live BRANCH with `wait: false`);
    /// cannot be restored.
    Writing,
    /// Complete; children can be spawned.
    Ready,
    /// The write did not complete; nothing can be restored from it.
    Failed,
}

impl SnapshotStatus {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            SnapshotStatus::Writing => "writing",
            SnapshotStatus::Ready => "ready",
            SnapshotStatus::Failed => "failed",
        }
    }
}

/// `snapshot.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotMeta {
    /// Layout version ([`META_VERSION`]).
    pub version: u32,
    /// Seconds since the epoch.
    pub created_at_unix: u64,
    /// The guest.
    pub guest: GuestKind,
    /// Guest RAM in MiB.
    pub mem_mib: u64,
    /// vCPU count.
    pub vcpus: u8,
    /// Logical size of `memory` in bytes.
    pub memory_bytes: u64,
    /// Bytes of `memory` that hold data (the rest are holes).
    pub memory_data_bytes: u64,
    /// BLAKE3 over (page index, page) of every non-zero page, hex.
    pub memory_hash: String,
    /// BLAKE3 of the vmstate file, hex.
    pub vmstate_hash: String,
    /// Whether it can be restored.
    pub status: SnapshotStatus,
    /// Whether a child can be restored from it (as opposed to a layer only).
    pub bootable: bool,
    /// The drives, in order.
    #[serde(default)]
    pub disks: Vec<SnapshotDisk>,
    /// The network interfaces, in order (left out when there are none:
    /// older snapshots read unchanged).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nets: Vec<SnapshotNet>,
    /// Full or diff.
    #[serde(default)]
    pub kind: SnapshotKind,
    /// The snapshot a diff stacks on.
    #[serde(default)]
    pub parent: Option<ParentRef>,
    /// How a live snapshot's background copy went.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub live_copy: Option<LiveCopyStats>,
}

/// What a live snapshot's copy did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveCopyStats {
    /// Write-protect faults: guest (or device) writes that reached a page
    /// before the copy was done with it (none for a pre-copy).
    pub faults: u64,
    /// The longest a faulting writer waited, in microseconds.
    pub max_fault_stall_us: u64,
    /// Faults whose page the bulk copier had claimed and not yet copied:
    /// the fault handler copied it instead of waiting for the copier.
    #[serde(default, skip_serializing_if = "no_takeovers")]
    pub takeovers: u64,
    /// From the copy's start to the file written and synced, in milliseconds.
    pub duration_ms: u64,
    /// How memory was copied: `precopy` (while the guest ran, before the
    /// pause, for a caller that waits) or `write_protect` (after the pause,
    /// under write protection). Absent in older snapshots: write_protect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// Pre-copy: pages copied in each round while the guest ran. With
    /// `method` `write_protect`, a pre-copy that did not converge (the
    /// guest dirtied memory as fast as it was copied) and was abandoned
    /// for a write-protected copy armed before the pause.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub precopy_round_pages: Vec<u64>,
    /// Pre-copy: pages dirty at the pause (the residue), copied in it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub residue_pages: Option<u64>,
    /// Pre-copy: the residue was too large for the pause and was copied
    /// after it under write protection (`faults` and `max_fault_stall_us`
    /// are that copy's).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub residue_write_protected: bool,
}

fn no_takeovers(n: &u64) -> bool {
    *n == 0
}

/// Errors reading or writing `snapshot.json`.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    /// File system error.
    #[error("snapshot {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Not a `snapshot.json` this build reads.
    #[error("snapshot {path}: snapshot.json is invalid ({reason}): the snapshot is corrupt or from another version")]
    Invalid {
        /// The snapshot directory.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// Reads `snapshot.json` from `dir`: at most [`MAX_META_BYTES`], of layout
/// [`META_VERSION`].
pub fn read_meta(dir: &Path) -> Result<SnapshotMeta, MetaError> {
    let path = dir.join(META_FILE);
    let io = |source| MetaError::Io {
        path: path.clone(),
        source,
    };
    let f = File::open(&path).map_err(io)?;
    let mut bytes = Vec::new();
    f.take(MAX_META_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    let invalid = |reason: String| MetaError::Invalid {
        path: dir.to_owned(),
        reason,
    };
    if bytes.len() as u64 > MAX_META_BYTES {
        return Err(invalid(format!("larger than {MAX_META_BYTES} bytes")));
    }
    let meta: SnapshotMeta = serde_json::from_slice(&bytes).map_err(|e| invalid(e.to_string()))?;
    if meta.version != META_VERSION {
        return Err(invalid(format!(
            "layout version {} (this build reads {META_VERSION})",
            meta.version
        )));
    }
    Ok(meta)
}

/// Writes `snapshot.json` in `dir` atomically (temp file, fsync, rename).
pub fn write_meta(dir: &Path, meta: &SnapshotMeta) -> Result<(), MetaError> {
    let path = dir.join(META_FILE);
    let tmp = dir.join(format!(".{META_FILE}.tmp"));
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| MetaError::Io { path, source }
    };
    let mut f = File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(&serde_json::to_vec_pretty(meta).expect("metadata serialises"))
        .map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(io(&path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_parsing() {
        assert_eq!(parse_mac("02:00:00:0a:ff:01"), Some([2, 0, 0, 10, 255, 1]));
        assert_eq!(parse_mac("02:00:00:0a:ff"), None);
        assert_eq!(parse_mac("02:00:00:0a:ff:01:02"), None);
        assert_eq!(parse_mac("2:00:00:0a:ff:01"), None);
        assert_eq!(parse_mac("zz:00:00:0a:ff:01"), None);
        let mac = [6, 0, 0xac, 0x10, 0, 2];
        assert_eq!(format_mac(&mac), "06:00:ac:10:00:02");
        assert_eq!(parse_mac(&format_mac(&mac)), Some(mac));
    }

    /// A `snapshot.json` from before drives, taps, diff chains and live
    /// copies existed still reads, with their defaults.
    #[test]
    fn an_old_snapshot_json_still_reads() {
        let dir = std::env::temp_dir().join(format!("proto-meta-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join(META_FILE),
            r#"{"version":1,"created_at_unix":5,"guest":"builtin","mem_mib":64,"vcpus":1,
                "memory_bytes":67108864,"memory_data_bytes":4096,"memory_hash":"ab",
                "vmstate_hash":"cd","status":"ready","bootable":true}"#,
        )
        .unwrap();
        let m = read_meta(&dir).unwrap();
        assert_eq!(
            (m.guest, m.kind, m.status),
            (
                GuestKind::Builtin,
                SnapshotKind::Full,
                SnapshotStatus::Ready
            )
        );
        assert!(
            m.disks.is_empty() && m.nets.is_empty() && m.parent.is_none() && m.live_copy.is_none()
        );
        // Written back, the fields it lacked that are skipped when empty stay out.
        write_meta(&dir, &m).unwrap();
        let back = std::fs::read_to_string(dir.join(META_FILE)).unwrap();
        assert!(
            !back.contains("nets") && !back.contains("live_copy"),
            "{back}"
        );
        assert_eq!(read_meta(&dir).unwrap(), m);
        // Another layout version, garbage and an oversized file are refused.
        std::fs::write(
            dir.join(META_FILE),
            back.replace("\"version\": 1", "\"version\": 2"),
        )
        .unwrap();
        assert!(read_meta(&dir)
            .unwrap_err()
            .to_string()
            .contains("layout version 2"));
        std::fs::write(dir.join(META_FILE), "{").unwrap();
        assert!(matches!(read_meta(&dir), Err(MetaError::Invalid { .. })));
        std::fs::write(dir.join(META_FILE), vec![b' '; MAX_META_BYTES as usize + 1]).unwrap();
        assert!(read_meta(&dir)
            .unwrap_err()
            .to_string()
            .contains("larger than"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
