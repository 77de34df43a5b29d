//! Compaction: a snapshot and the chain it stands on, flattened into one
//! self-contained full snapshot.
//!
//! A diff snapshot needs its parent (and the parent's parent, ...) for its
//! memory, and any snapshot may stack its drives on frozen layers that live
//! in the snapshots it was taken from. [`compact`] writes a new snapshot
//! directory that holds everything itself:
//!
//! ```text
//! <dst>/memory             the source's memory, assembled if it is a diff
//!                          (sparse: zero pages are holes)
//! <dst>/vmstate            the source's, byte for byte
//! <dst>/disk<i>.<j>.layer  layer j (bottom to top) of drive i
//! <dst>/snapshot.json      kind full, no parent, written last
//! ```
//!
//! Frozen layers are never written again, so each is hard-linked into the
//! new directory when it is on the same file system (nothing is copied, and
//! deleting the snapshot it came from leaves the link's data in place) and
//! copied, sparse, otherwise. Layers are kept as they are, not merged: each
//! names the one below it (its header's parent id), which a child's own
//! layer continues, so their order and content are what they were.
//!
//! A drive's base image is not part of any snapshot (see
//! [`SnapshotDisk::base`]) and stays where it is.
//!
//! The new `memory_hash` is the content hash every full snapshot has (BLAKE3
//! over (page index, page) of every non-zero page). For a full source it
//! must equal the source's, which is checked; a diff's hash is a chain hash
//! (parent's hash and changed pages), so the compacted snapshot of a diff
//! has a new one, and a diff taken later over the compacted snapshot names
//! that one.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Component, Path, PathBuf};

use super::{
    copy_sparse, data_extents, format, io_err, is_zero, temp_dir_beside, Error, Pending,
    PreparedSnapshot, SnapshotDisk, SnapshotKind, SnapshotMeta, SnapshotStatus, VmState, MAX_RUN,
    MEMORY_FILE, PAGE, VMSTATE_FILE,
};
use crate::devices::virtio::block::DiskStack;

/// Writes `dst` (which must not exist) as a flat, self-contained full
/// snapshot with the content of the snapshot in `src`: the memory of a diff
/// assembled, the vmstate copied, and every frozen drive layer, including
/// those of the snapshots `src` was taken from, brought into `dst` as a
/// file of its own. `src` must be `ready`; it is read only (a diff's flat
/// `memory` is assembled in it first, as a restore would).
///
/// Like every snapshot, `dst` is written in a temporary directory beside it
/// and renamed into place once complete and synced. Returns its metadata.
pub fn compact(src: &Path, dst: &Path) -> Result<SnapshotMeta, Error> {
    if dst.exists() {
        return Err(Error::Exists(dst.to_owned()));
    }
    // Every check a restore makes, and a diff's memory assembled once.
    let snapshot = PreparedSnapshot::load(src)?;
    let layers = plan_layers(src, &snapshot.meta.disks)?;
    let tmp = temp_dir_beside(dst)?;
    match write_compacted(&snapshot, &layers, &tmp) {
        Ok(meta) => Pending {
            tmp,
            dir: dst.to_owned(),
            meta,
            memory: None,
        }
        .commit(),
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}

/// One frozen layer to bring into the compacted snapshot.
struct LayerPlan {
    /// Where it is now.
    from: PathBuf,
    /// Its file name in the compacted snapshot.
    name: PathBuf,
}

/// Where every layer of every drive is, and what it will be called.
/// `snapshot.json` is untrusted: a layer is either absolute (a file of
/// another snapshot) or a bare file name in `src`, nothing else.
fn plan_layers(src: &Path, disks: &[SnapshotDisk]) -> Result<Vec<Vec<LayerPlan>>, Error> {
    disks
        .iter()
        .enumerate()
        .map(|(i, disk)| {
            disk.layers
                .iter()
                .enumerate()
                .map(|(j, layer)| {
                    Ok(LayerPlan {
                        from: layer_path(src, i, layer)?,
                        name: PathBuf::from(format!("disk{i}.{j}.layer")),
                    })
                })
                .collect()
        })
        .collect()
}

/// Where layer `layer` of drive `drive` of the snapshot in `dir` is:
/// `snapshot.json` is untrusted, so a layer is either absolute (a file of
/// another snapshot) or a bare file name in `dir`, nothing else.
pub(super) fn layer_path(dir: &Path, drive: usize, layer: &Path) -> Result<PathBuf, Error> {
    if layer.is_absolute() {
        return Ok(layer.to_owned());
    }
    let mut c = layer.components();
    if matches!((c.next(), c.next()), (Some(Component::Normal(_)), None)) {
        return Ok(dir.join(layer));
    }
    Err(Error::Inconsistent {
        path: dir.to_owned(),
        reason: format!(
            "drive {drive} lists layer {}, which is neither an absolute path nor a file name in \
             the snapshot directory",
            layer.display()
        ),
    })
}

/// Fills `tmp` with the compacted snapshot's files and returns its
/// metadata (not written yet: [`Pending::commit`] does that last).
fn write_compacted(
    snapshot: &PreparedSnapshot,
    layers: &[Vec<LayerPlan>],
    tmp: &Path,
) -> Result<SnapshotMeta, Error> {
    let src = &snapshot.dir;
    let meta = &snapshot.meta;
    let inconsistent = |reason: String| Error::Inconsistent {
        path: src.to_owned(),
        reason,
    };

    let (memory_bytes, memory_data_bytes, memory_hash) =
        copy_memory(&src.join(MEMORY_FILE), &tmp.join(MEMORY_FILE))?;
    if meta.kind == SnapshotKind::Full && memory_hash != meta.memory_hash {
        return Err(inconsistent(format!(
            "its memory file does not have the content snapshot.json records (hash {memory_hash} \
             != {})",
            meta.memory_hash
        )));
    }

    let vmstate = read_vmstate(src)?;
    if blake3::hash(&vmstate).to_hex().as_str() != meta.vmstate_hash {
        return Err(inconsistent(
            "its vmstate file does not have the hash snapshot.json records".into(),
        ));
    }
    let vm_path = tmp.join(VMSTATE_FILE);
    std::fs::write(&vm_path, &vmstate).map_err(io_err(&vm_path))?;

    let mut disks = Vec::with_capacity(meta.disks.len());
    for (i, (disk, plan)) in meta.disks.iter().zip(layers).enumerate() {
        for layer in plan {
            let to = tmp.join(&layer.name);
            link_or_copy(&layer.from, &to).map_err(|e| {
                inconsistent(format!(
                    "cannot bring layer {} of drive {i} into the compacted snapshot ({e}); the \
                     snapshot it belongs to may have been deleted",
                    layer.from.display()
                ))
            })?;
        }
        let disk = SnapshotDisk {
            layers: plan.iter().map(|l| l.name.clone()).collect(),
            ..disk.clone()
        };
        // The stack a child will open: every layer frozen, each on the one
        // below it, all of the disk's size, and the base image readable.
        let mut check =
            crate::devices::virtio::block::DiskConfig::for_child(&disk, tmp, PathBuf::new(), None);
        check.cow = None;
        check.read_only = true;
        DiskStack::open(&check).map_err(|e| {
            inconsistent(format!(
                "drive {i} does not open as the compacted snapshot has it: {e}"
            ))
        })?;
        disks.push(disk);
    }

    Ok(SnapshotMeta {
        memory_bytes,
        memory_data_bytes,
        memory_hash,
        status: SnapshotStatus::Ready,
        disks,
        kind: SnapshotKind::Full,
        parent: None,
        // The rest describes the captured machine, which is the same one:
        // version, creation time, guest, sizes, vmstate hash, bootable and
        // how a live capture's copy went.
        ..meta.clone()
    })
}

/// The vmstate file's bytes, refused past [`format::MAX_VMSTATE_BYTES`]
/// before they are read, and checked to decode.
fn read_vmstate(src: &Path) -> Result<Vec<u8>, Error> {
    let path = src.join(VMSTATE_FILE);
    let file = File::open(&path).map_err(io_err(&path))?;
    let mut bytes = Vec::new();
    file.take(format::MAX_VMSTATE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(io_err(&path))?;
    let format_err = |source| Error::Format {
        path: src.to_owned(),
        source,
    };
    if bytes.len() as u64 > format::MAX_VMSTATE_BYTES {
        return Err(format_err(format::FormatError::TooLarge {
            path,
            len: bytes.len() as u64,
        }));
    }
    format::decode::<VmState>(&bytes).map_err(format_err)?;
    Ok(bytes)
}

/// Hard-links `from` to `to` (a frozen layer is never written again, so
/// both names may share it), or copies it, keeping holes, when they are on
/// different file systems or the link is refused.
fn link_or_copy(from: &Path, to: &Path) -> Result<(), Error> {
    if std::fs::hard_link(from, to).is_ok() {
        return Ok(());
    }
    copy_sparse(from, to)
}

/// Copies the memory file `from` to a new file `to`: zero pages, within
/// the source's data or not, become holes. Returns (logical bytes, data
/// bytes, content hash) with the hash defined as for every full snapshot:
/// BLAKE3 over (page index, page) of every non-zero page.
fn copy_memory(from: &Path, to: &Path) -> Result<(u64, u64, String), Error> {
    let src = File::open(from).map_err(io_err(from))?;
    let len = src.metadata().map_err(io_err(from))?.len();
    let dst = File::create_new(to).map_err(io_err(to))?;
    dst.set_len(len).map_err(io_err(to))?;
    let mut hasher = blake3::Hasher::new();
    let mut data_bytes = 0u64;
    let mut buf = vec![0u8; MAX_RUN];
    for (start, end) in page_extents(&src, len).map_err(io_err(from))? {
        let mut at = start;
        while at < end {
            let n = ((end - at) as usize).min(buf.len());
            let chunk = &mut buf[..n];
            src.read_exact_at(chunk, at).map_err(io_err(from))?;
            let mut run: Option<usize> = None;
            let flush = |s: usize, e: usize| {
                dst.write_all_at(&chunk[s..e], at + s as u64)
                    .map_err(io_err(to))
            };
            for (i, page) in chunk.chunks(PAGE).enumerate() {
                let off = i * PAGE;
                if is_zero(page) {
                    if let Some(s) = run.take() {
                        flush(s, off)?;
                    }
                    continue;
                }
                hasher.update(&((at + off as u64) / PAGE as u64).to_le_bytes());
                hasher.update(page);
                data_bytes += page.len() as u64;
                run.get_or_insert(off);
            }
            if let Some(s) = run {
                flush(s, n)?;
            }
            at += n as u64;
        }
    }
    Ok((len, data_bytes, hasher.finalize().to_hex().to_string()))
}

/// The data extents of `file` widened to whole pages and merged, so every
/// page is read whole and at most once.
fn page_extents(file: &File, len: u64) -> std::io::Result<Vec<(u64, u64)>> {
    let page = PAGE as u64;
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (start, end) in data_extents(file)? {
        let (start, end) = (
            start / page * page,
            end.div_ceil(page).saturating_mul(page).min(len),
        );
        match out.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => out.push((start, end)),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_paths_are_absolute_or_bare_names() {
        let disk = |layers: &[&str]| SnapshotDisk {
            base: None,
            size: 1 << 20,
            layers: layers.iter().map(PathBuf::from).collect(),
            read_only: false,
        };
        let src = Path::new("/snaps/s2");
        let plan = plan_layers(
            src,
            &[
                disk(&["/snaps/s0/disk0.layer", "disk0.layer"]),
                disk(&["disk1.layer"]),
            ],
        )
        .unwrap();
        let names: Vec<Vec<(&Path, &Path)>> = plan
            .iter()
            .map(|d| {
                d.iter()
                    .map(|l| (l.from.as_path(), l.name.as_path()))
                    .collect()
            })
            .collect();
        assert_eq!(
            names,
            vec![
                vec![
                    (
                        Path::new("/snaps/s0/disk0.layer"),
                        Path::new("disk0.0.layer")
                    ),
                    (
                        Path::new("/snaps/s2/disk0.layer"),
                        Path::new("disk0.1.layer")
                    ),
                ],
                vec![(
                    Path::new("/snaps/s2/disk1.layer"),
                    Path::new("disk1.0.layer")
                )],
            ]
        );
        for bad in ["../s0/disk0.layer", "sub/disk0.layer", "./disk0.layer", ""] {
            let err = plan_layers(src, &[disk(&[bad])]).err().unwrap();
            assert!(
                err.to_string().contains("neither an absolute path"),
                "{bad:?}: {err}"
            );
        }
    }

    #[test]
    fn memory_copies_are_sparse_and_hashed_like_full_snapshots() {
        use std::os::unix::fs::MetadataExt;
        let dir = std::env::temp_dir().join(format!("forkd-compact-mem-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let from = dir.join("from");
        let f = File::create(&from).unwrap();
        f.set_len(32 << 20).unwrap();
        // Data, then a zero page written out (data on disk, zero in content),
        // then more data; and data in the last page.
        f.write_all_at(&[7u8; 3 * PAGE], 0x10000).unwrap();
        f.write_all_at(&[0u8; PAGE], 0x13000).unwrap();
        f.write_all_at(&[9u8; 100], 0x14010).unwrap();
        f.write_all_at(&[1u8; PAGE], (32 << 20) - PAGE as u64)
            .unwrap();
        let to = dir.join("to");
        let (len, data, hash) = copy_memory(&from, &to).unwrap();
        assert_eq!(len, 32 << 20);
        assert_eq!(data, 5 * PAGE as u64);
        assert_eq!(std::fs::read(&from).unwrap(), std::fs::read(&to).unwrap());
        assert!(std::fs::metadata(&to).unwrap().blocks() * 512 < 1 << 20);
        let (d2, h2) = super::super::hash_memory_file(&File::open(&to).unwrap()).unwrap();
        assert_eq!((d2, h2), (data, hash));
        // The destination must be new.
        assert!(copy_memory(&from, &to).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
