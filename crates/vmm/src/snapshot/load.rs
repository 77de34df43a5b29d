//! A snapshot read once and checked, ready to restore children from.

use std::path::{Path, PathBuf};

use super::*;

/// A snapshot read and checked once, ready to restore any number of
/// children from (state parsed, nothing left to validate per child).
pub struct PreparedSnapshot {
    /// The directory.
    pub dir: PathBuf,
    /// Its metadata.
    pub meta: SnapshotMeta,
    /// Its decoded vmstate.
    pub state: VmState,
    /// Its memory file, open: a process that forks children of it opens
    /// it once, and a child maps it even once the snapshot is deleted.
    pub memory: crate::memory::MemoryFile,
    /// Each drive's base image and frozen layers, open, for the same
    /// reasons ([`crate::devices::virtio::block::DiskStack::open_with`]).
    pub disks: Vec<crate::devices::virtio::block::OpenedLower>,
}

impl PreparedSnapshot {
    /// Reads and checks the snapshot in `dir`: metadata, status, vmstate
    /// checksum and version, and that the memory file has the right size.
    pub fn load(dir: &Path) -> Result<Self, Error> {
        let meta = read_meta(dir)?;
        if meta.status != SnapshotStatus::Ready {
            return Err(Error::NotReady {
                path: dir.to_owned(),
                status: meta.status,
            });
        }
        let meta = ensure_memory(dir)?;
        let state: VmState =
            format::read_file(&dir.join(VMSTATE_FILE)).map_err(|source| Error::Format {
                path: dir.to_owned(),
                source,
            })?;
        let inconsistent = |reason: String| Error::Inconsistent {
            path: dir.to_owned(),
            reason,
        };
        if state.mem_mib != meta.mem_mib || state.vcpus.len() != usize::from(meta.vcpus) {
            return Err(inconsistent(
                "vmstate and snapshot.json disagree on memory size or vCPU count".into(),
            ));
        }
        nets_match(&meta.nets, &state.devices.virtio).map_err(inconsistent)?;
        if state.vcpus.is_empty()
            || state
                .vcpus
                .iter()
                .enumerate()
                .any(|(i, v)| usize::from(v.id) != i)
        {
            return Err(inconsistent(
                "vCPU states are missing or out of order".into(),
            ));
        }
        let mem_path = dir.join(MEMORY_FILE);
        let file = std::fs::File::open(&mem_path).map_err(io_err(&mem_path))?;
        let len = file.metadata().map_err(io_err(&mem_path))?.len();
        if len != state.mem_mib << 20 {
            return Err(inconsistent(format!(
                "memory file is {len} bytes but the VM has {} bytes of RAM (truncated?)",
                state.mem_mib << 20
            )));
        }
        let disks = meta
            .disks
            .iter()
            .enumerate()
            .map(|(drive, d)| {
                for layer in &d.layers {
                    super::compact::layer_path(dir, drive, layer)?;
                }
                let cfg = DiskConfig::for_child(d, dir, PathBuf::new(), None);
                crate::devices::virtio::block::OpenedLower::open(&cfg).map_err(|source| {
                    Error::Disk {
                        path: dir.to_owned(),
                        drive,
                        source,
                    }
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(PreparedSnapshot {
            dir: dir.to_owned(),
            meta,
            state,
            memory: crate::memory::MemoryFile::from_open(mem_path, file),
            disks,
        })
    }

    /// Path of the memory file.
    pub fn memory_path(&self) -> PathBuf {
        self.dir.join(MEMORY_FILE)
    }
}
