//! Snapshots: a paused machine written to a directory, and read back for
//! restore.
//!
//! ```text
//! <dir>/vmstate        vCPU, VM and device state (see [`format`])
//! <dir>/memory         guest RAM, regions back to back, sparse where zero
//! <dir>/snapshot.json  metadata (see [`SnapshotMeta`]), written last
//! ```
//!
//! `snapshot.json`'s schema is a contract between processes and lives in
//! [`proto::snapshot`]; it is re-exported here.
//!
//! A snapshot is written into a temporary sibling directory and renamed into
//! place only when complete and synced, so a crash never leaves a directory
//! that looks like a snapshot. [`compact`] flattens a snapshot and the chain
//! it stands on into a self-contained full one, written the same way. A
//! diff snapshot's flat memory is assembled once, on first use
//! ([`ensure_memory`], in `assemble`). Once complete, every file of a
//! snapshot is read-only ([`SEALED_MODE`]). [`verify`] checks the files
//! against the hashes `snapshot.json` records.

mod assemble;
mod compact;
pub mod format;
mod load;
mod meta;
mod page_hash;
mod verify;
mod write;

pub use assemble::ensure_memory;
pub use compact::compact;
pub use load::PreparedSnapshot;
use meta::*;
pub use meta::{read_meta, write_meta};
pub use proto::snapshot::{
    GuestKind, LiveCopyStats, ParentRef, SnapshotDisk, SnapshotKind, SnapshotMeta, SnapshotNet,
    SnapshotStatus, DIFF_FILE, DIFF_MAP_FILE, MEMORY_FILE, META_FILE, META_VERSION, VMSTATE_FILE,
};
pub use verify::{verify, VerifyError};
use write::*;
pub use write::{
    finish_live, measure_diff, prepare, stage, DiffMap, DriveCapture, MemoryCapture, Pending,
    Staged, SEALED_MODE,
};

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::devices::i8042::I8042State;
use crate::devices::serial::SerialConsoleState;
use crate::devices::virtio::block::DiskConfig;
use crate::devices::virtio::manager::AttachedState;
use crate::kvm::state::{VcpuState, VmKvmState};
use crate::memory::data_extents;

const PAGE: usize = 4096;
/// Longest run of pages written in one call.
const MAX_RUN: usize = 8 << 20;

/// State of the devices.
#[derive(Debug, Serialize, Deserialize)]
pub struct DeviceStates {
    /// COM1.
    pub serial: SerialConsoleState,
    /// The i8042.
    pub i8042: I8042State,
    /// The virtio devices, in attachment order.
    pub virtio: Vec<AttachedState>,
}

impl DiskConfig {
    /// The stack a child of the snapshot in `dir` opens for drive `disk`,
    /// writing into its own `cow` layer (none for a read-only drive) of at
    /// most `quota` bytes of data.
    pub fn for_child(
        disk: &SnapshotDisk,
        dir: &Path,
        cow: PathBuf,
        quota: Option<u64>,
    ) -> DiskConfig {
        DiskConfig {
            base: disk.base.clone(),
            size: disk.size,
            frozen: disk.layers.iter().map(|l| dir.join(l)).collect(),
            cow: (!disk.read_only).then_some(cow),
            read_only: disk.read_only,
            quota,
        }
    }
}

/// Everything in `vmstate`.
#[derive(Debug, Serialize, Deserialize)]
pub struct VmState {
    /// Guest RAM in MiB.
    pub mem_mib: u64,
    /// The guest.
    pub guest: GuestKind,
    /// Every vCPU, in index order.
    pub vcpus: Vec<VcpuState>,
    /// Interrupt controllers and clock.
    pub vm: VmKvmState,
    /// Devices.
    pub devices: DeviceStates,
}

/// Errors writing or reading a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// File system error.
    #[error("snapshot {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Destination exists.
    #[error("snapshot directory {0} already exists: choose another or delete it first")]
    Exists(PathBuf),
    /// This process may not make the snapshot's directory.
    #[error(
        "snapshot {0}: this process may not create it (permission denied); a jailed VMM (a \
         fork server's child) sees only its own directory and writes a snapshot there, or into \
         an empty directory made for it, owned by its uid and bound into its jail \
         (jailfs::bind_into), as the daemon makes one for each branch"
    )]
    NotPermitted(PathBuf),
    /// Bad vmstate.
    #[error("snapshot {path}: {source}")]
    Format {
        /// The snapshot directory.
        path: PathBuf,
        /// What is wrong with its vmstate.
        source: format::FormatError,
    },
    /// Bad metadata.
    #[error("snapshot {path}: snapshot.json is invalid ({reason}): the snapshot is corrupt or from another version")]
    Meta {
        /// The snapshot directory.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// Not restorable.
    #[error("snapshot {path} is {status:?}, not ready: it cannot be restored")]
    NotReady {
        /// The snapshot directory.
        path: PathBuf,
        /// Its status.
        status: SnapshotStatus,
    },
    /// A drive's base image or frozen layer cannot be opened.
    #[error("snapshot {path}: drive {drive}: {source}")]
    Disk {
        /// The snapshot directory.
        path: PathBuf,
        /// Which drive.
        drive: usize,
        /// What failed.
        source: crate::devices::virtio::block::LayerError,
    },
    /// vmstate and metadata disagree.
    #[error("snapshot {path}: {reason}: the snapshot is corrupt")]
    Inconsistent {
        /// The snapshot directory.
        path: PathBuf,
        /// What disagrees.
        reason: String,
    },
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_owned(),
        source,
    }
}

/// A ready built-in snapshot's metadata, for tests: one vCPU,
/// `memory_bytes` of RAM, no drive or network, a diff when it has a
/// `parent`.
#[cfg(test)]
pub(crate) fn test_meta(
    memory_bytes: u64,
    memory_hash: &str,
    vmstate_hash: &str,
    parent: Option<ParentRef>,
) -> SnapshotMeta {
    SnapshotMeta {
        version: META_VERSION,
        created_at_unix: 1,
        guest: GuestKind::Builtin,
        mem_mib: memory_bytes >> 20,
        vcpus: 1,
        memory_bytes,
        memory_data_bytes: 0,
        memory_hash: memory_hash.to_owned(),
        vmstate_hash: vmstate_hash.to_owned(),
        status: SnapshotStatus::Ready,
        bootable: true,
        disks: Vec::new(),
        nets: Vec::new(),
        kind: if parent.is_some() {
            SnapshotKind::Diff
        } else {
            SnapshotKind::Full
        },
        parent,
        live_copy: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::manager::DeviceState;
    use crate::devices::virtio::net::NetState;
    use crate::devices::virtio::persist::VirtioState;
    use crate::memory::GuestMemoryMmap;
    use vm_memory::{Bytes, GuestAddress};

    fn meta_with_nets(nets: Vec<SnapshotNet>) -> SnapshotMeta {
        SnapshotMeta {
            nets,
            ..test_meta(16 << 20, "", "", None)
        }
    }

    /// `snapshot.json` with `nets` replaced by `value`, read back.
    fn read_with_nets(tag: &str, value: serde_json::Value) -> Result<SnapshotMeta, Error> {
        let dir = std::env::temp_dir().join(format!("forkd-snapnets-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut json = serde_json::to_value(meta_with_nets(Vec::new())).unwrap();
        json["nets"] = value;
        std::fs::write(dir.join(META_FILE), json.to_string()).unwrap();
        let read = read_meta(&dir);
        std::fs::remove_dir_all(&dir).unwrap();
        read
    }

    #[test]
    fn nets_are_left_out_when_there_are_none_and_round_trip_otherwise() {
        let none = serde_json::to_value(meta_with_nets(Vec::new())).unwrap();
        assert!(none.get("nets").is_none(), "{none}");
        // An older snapshot.json (no such key) reads with no interfaces.
        let old: SnapshotMeta = serde_json::from_value(none).unwrap();
        assert!(old.nets.is_empty());
        let one = meta_with_nets(vec![SnapshotNet::new("forkd0", &[6, 0, 0xac, 0x10, 0, 2])]);
        let json = serde_json::to_value(&one).unwrap();
        assert_eq!(
            json["nets"],
            serde_json::json!([{"tap": "forkd0", "mac": "06:00:ac:10:00:02"}])
        );
        assert_eq!(serde_json::from_value::<SnapshotMeta>(json).unwrap(), one);
    }

    #[test]
    fn read_meta_refuses_tap_names_a_tap_cannot_have_and_bad_macs() {
        let good = serde_json::json!([{"tap": "forkd0", "mac": "06:00:ac:10:00:02"}]);
        let meta = read_with_nets("good", good).unwrap();
        assert_eq!(meta.nets[0].tap, "forkd0");
        for (tag, tap, mac, says) in [
            ("slash", "../eth0", "06:00:ac:10:00:02", "tap name"),
            ("long", "abcdefghijklmnop", "06:00:ac:10:00:02", "tap name"),
            ("empty", "", "06:00:ac:10:00:02", "tap name"),
            ("space", "a b", "06:00:ac:10:00:02", "tap name"),
            ("mac", "forkd0", "06:00:ac:10:00", "MAC"),
            ("machex", "forkd0", "06:00:ac:10:00:zz", "MAC"),
        ] {
            let err =
                read_with_nets(tag, serde_json::json!([{"tap": tap, "mac": mac}])).expect_err(tag);
            assert!(matches!(err, Error::Meta { .. }), "{tag}: {err}");
            let text = err.to_string();
            assert!(
                text.contains("network interface 0") && text.contains(says),
                "{tag}: {text}"
            );
        }
        // Not a list of interfaces at all.
        assert!(matches!(
            read_with_nets("shape", serde_json::json!("forkd0")),
            Err(Error::Meta { .. })
        ));
    }

    #[test]
    fn nets_must_name_one_tap_per_network_device_of_the_vmstate() {
        let device = |device: DeviceState| AttachedState {
            base: 0,
            irq: 5,
            mmio: Default::default(),
            device,
        };
        let net = |mac: [u8; 6]| {
            device(DeviceState::Net(NetState {
                virtio: VirtioState {
                    device_type: 1,
                    avail_features: 0,
                    acked_features: 0,
                    queues: Vec::new(),
                },
                mac,
            }))
        };
        let (a, b) = ([6, 0, 0, 0, 0, 1], [6, 0, 0, 0, 0, 2]);
        let saved = vec![net(a), net(b)];
        let recorded = |macs: &[[u8; 6]]| -> Vec<SnapshotNet> {
            macs.iter()
                .enumerate()
                .map(|(i, m)| SnapshotNet::new(&format!("tap{i}"), m))
                .collect()
        };
        assert_eq!(nets_match(&recorded(&[a, b]), &saved), Ok(()));
        assert_eq!(nets_match(&[], &[]), Ok(()));
        let missing = nets_match(&[], &saved).unwrap_err();
        assert!(
            missing.contains("has 2 network interfaces") && missing.contains("take it again"),
            "{missing}"
        );
        assert!(nets_match(&recorded(&[a]), &saved).is_err());
        assert!(nets_match(&recorded(&[a, b, a]), &saved).is_err());
        assert!(nets_match(&recorded(&[a]), &[]).is_err());
        // In order: swapped MACs are another machine.
        let swapped = nets_match(&recorded(&[b, a]), &saved).unwrap_err();
        assert!(swapped.contains("network interface 0"), "{swapped}");
    }

    #[test]
    fn memory_file_is_sparse_and_exact() {
        let dir = std::env::temp_dir().join(format!("forkd-snapmem-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 16 << 20),
            (GuestAddress(1 << 32), 4 << 20),
        ])
        .unwrap();
        mem.write_obj(0x1122_3344u32, GuestAddress(0x5000)).unwrap();
        mem.write_obj(0x55u8, GuestAddress((1 << 32) + 0x1fff))
            .unwrap();
        let path = dir.join("memory");
        let (total, data, hash) = write_memory(&path, &mem).unwrap();
        assert_eq!(total, 20 << 20);
        assert_eq!(data, 2 * PAGE as u64);
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len() as u64, total);
        assert_eq!(&bytes[0x5000..0x5004], &0x1122_3344u32.to_le_bytes());
        assert_eq!(bytes[(16 << 20) + 0x1fff], 0x55);
        assert_eq!(bytes.iter().filter(|&&b| b != 0).count(), 5);
        // Holes: the file uses far less disk than its size.
        use std::os::unix::fs::MetadataExt;
        assert!(std::fs::metadata(&path).unwrap().blocks() * 512 < 1 << 20);
        // Same content, same hash; a changed byte, another.
        let (_, _, again) = write_memory(&dir.join("m2"), &mem).unwrap();
        assert_eq!(hash, again);
        mem.write_obj(0x56u8, GuestAddress((1 << 32) + 0x1fff))
            .unwrap();
        let (_, _, changed) = write_memory(&dir.join("m3"), &mem).unwrap();
        assert_ne!(hash, changed);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
