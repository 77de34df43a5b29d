//! A diff snapshot's flat `memory`, assembled once, on first use.
//!
//! A diff holds only the pages that changed since its parent (`memory.diff`
//! at their offsets, listed in `memory.diffmap`). Its flat memory is the
//! nearest ancestor's flat `memory` (a full snapshot's, or a diff's already
//! assembled) with every diff above it applied in order, oldest first, and
//! is written once, next to the diff, for every later restore to map.
//!
//! Only the head is written: a chain of D diffs costs one copy of the
//! ancestor's data, the diffs' pages and one sync, not D of each (the
//! layers between are assembled when they are restored themselves, if
//! ever). Every link is still checked: each parent must be `ready`, the
//! same size, and have the `memory_hash` its child was taken over.

use std::collections::HashSet;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::{
    copy_sparse, format, io_err, read_meta, seal, DiffMap, Error, SnapshotKind, SnapshotMeta,
    SnapshotStatus, DIFF_FILE, DIFF_MAP_FILE, MAX_RUN, MEMORY_FILE, PAGE,
};

/// Most diffs a chain may stack between a snapshot and its nearest flat
/// ancestor: `snapshot.json` is untrusted, so the walk down is bounded.
const MAX_CHAIN: usize = 4096;

/// Makes sure the snapshot in `dir` has a flat `memory` file: a diff
/// snapshot's is assembled from its nearest ancestor with one (see the
/// module) and kept for every later restore. Returns the metadata.
pub fn ensure_memory(dir: &Path) -> Result<SnapshotMeta, Error> {
    let meta = read_meta(dir)?;
    if meta.kind == SnapshotKind::Full || dir.join(MEMORY_FILE).exists() {
        return Ok(meta);
    }
    let (base, diffs) = chain_to_flat(dir, &meta)?;
    let tmp = dir.join(format!(".{MEMORY_FILE}.tmp-{}", std::process::id()));
    let result = (|| {
        copy_sparse(&base.join(MEMORY_FILE), &tmp)?;
        let out = std::fs::OpenOptions::new()
            .write(true)
            .open(&tmp)
            .map_err(io_err(&tmp))?;
        let mut buf = vec![0u8; MAX_RUN];
        // Oldest first: a page a later diff changed again ends up as it has it.
        for diff in diffs.iter().rev() {
            apply_diff(diff, meta.memory_bytes, &out, &tmp, &mut buf)?;
        }
        // Complete: read-only like the rest of the snapshot.
        seal(&tmp)?;
        out.sync_all().map_err(io_err(&tmp))?;
        std::fs::rename(&tmp, dir.join(MEMORY_FILE)).map_err(io_err(dir))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map(|()| meta)
}

/// Walks down from the diff in `dir` (whose metadata is `meta`, and which
/// has no flat memory) to the nearest ancestor that has one, checking every
/// link. Returns that ancestor's directory and the diffs above it, `dir`
/// first.
fn chain_to_flat(dir: &Path, meta: &SnapshotMeta) -> Result<(PathBuf, Vec<PathBuf>), Error> {
    let mut diffs = vec![dir.to_owned()];
    let mut seen = HashSet::from([std::path::absolute(dir).map_err(io_err(dir))?]);
    let mut child = meta.clone();
    loop {
        let at = diffs.last().expect("the chain starts with dir");
        let inconsistent = |reason: String| Error::Inconsistent {
            path: at.clone(),
            reason,
        };
        let parent = child
            .parent
            .as_ref()
            .ok_or_else(|| inconsistent("a diff snapshot without a parent".into()))?;
        let parent_meta = read_meta(&parent.dir)?;
        if parent_meta.status != SnapshotStatus::Ready {
            return Err(Error::NotReady {
                path: parent.dir.clone(),
                status: parent_meta.status,
            });
        }
        if parent_meta.memory_hash != parent.memory_hash {
            return Err(inconsistent(format!(
                "its parent {} no longer has the memory it was taken over (hash {} != {})",
                parent.dir.display(),
                parent_meta.memory_hash,
                parent.memory_hash
            )));
        }
        if parent_meta.memory_bytes != meta.memory_bytes {
            return Err(inconsistent(
                "parent and diff disagree on the memory size".into(),
            ));
        }
        if parent_meta.kind == SnapshotKind::Full || parent.dir.join(MEMORY_FILE).exists() {
            return Ok((parent.dir.clone(), diffs));
        }
        let key = std::path::absolute(&parent.dir).map_err(io_err(&parent.dir))?;
        if !seen.insert(key) {
            return Err(inconsistent(format!(
                "its chain of parents loops back to {}",
                parent.dir.display()
            )));
        }
        if diffs.len() >= MAX_CHAIN {
            return Err(inconsistent(format!(
                "more than {MAX_CHAIN} diffs stand between it and a snapshot with flat memory: \
                 compact the chain (forkd-vmm compact)"
            )));
        }
        diffs.push(parent.dir.clone());
        child = parent_meta;
    }
}

/// Writes the changed pages of the diff in `dir` into `out` (at `out_path`,
/// for errors), a run of consecutive pages per read and write.
fn apply_diff(
    dir: &Path,
    memory_bytes: u64,
    out: &File,
    out_path: &Path,
    buf: &mut [u8],
) -> Result<(), Error> {
    let map: DiffMap =
        format::read_file(&dir.join(DIFF_MAP_FILE)).map_err(|source| Error::Format {
            path: dir.to_owned(),
            source,
        })?;
    if map.pages != memory_bytes / PAGE as u64 || map.bits.len() as u64 != map.pages.div_ceil(64) {
        return Err(Error::Inconsistent {
            path: dir.to_owned(),
            reason: "memory.diffmap does not cover the memory".into(),
        });
    }
    let diff_path = dir.join(DIFF_FILE);
    let diff = File::open(&diff_path).map_err(io_err(&diff_path))?;
    for (first, count) in map.runs((buf.len() / PAGE) as u64) {
        let bytes = &mut buf[..count as usize * PAGE];
        let at = first * PAGE as u64;
        diff.read_exact_at(bytes, at).map_err(io_err(&diff_path))?;
        out.write_all_at(bytes, at).map_err(io_err(out_path))?;
    }
    Ok(())
}

impl DiffMap {
    /// The changed pages as runs (first page, page count) in order, none
    /// longer than `max` pages.
    pub(super) fn runs(&self, max: u64) -> Vec<(u64, u64)> {
        let max = max.max(1);
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for (w, &word) in self.bits.iter().enumerate() {
            let mut bits = word;
            while bits != 0 {
                let page = w as u64 * 64 + u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                if page >= self.pages {
                    return runs;
                }
                match runs.last_mut() {
                    Some((first, count)) if *first + *count == page && *count < max => *count += 1,
                    _ => runs.push((page, 1)),
                }
            }
        }
        runs
    }
}

#[cfg(test)]
mod tests {
    use super::super::{write_diff, write_memory, write_meta, ParentRef};
    use super::*;
    use crate::memory::GuestMemoryMmap;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn runs_join_consecutive_pages_up_to_the_limit() {
        let mut map = DiffMap {
            pages: 200,
            bits: vec![0; 4],
        };
        for p in [0u64, 1, 2, 5, 63, 64, 65, 66, 67, 130, 199] {
            map.bits[(p / 64) as usize] |= 1 << (p % 64);
        }
        // A bit past the last page (a corrupt map) is not a page.
        map.bits[3] |= 1 << 63;
        assert_eq!(
            map.runs(3),
            [(0, 3), (5, 1), (63, 3), (66, 2), (130, 1), (199, 1)]
        );
        assert_eq!(map.runs(100)[2], (63, 5));
    }

    struct Tmp(PathBuf);
    impl Drop for Tmp {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn meta(memory_bytes: u64, hash: &str, parent: Option<ParentRef>) -> SnapshotMeta {
        crate::snapshot::test_meta(memory_bytes, hash, "", parent)
    }

    /// The guest memory as one flat image (regions back to back).
    fn image(mem: &GuestMemoryMmap, dir: &Path) -> Vec<u8> {
        let path = dir.join("image");
        write_memory(&path, mem).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        bytes
    }

    #[test]
    fn a_chain_head_is_assembled_alone_from_the_nearest_flat_ancestor() {
        let tmp = Tmp(std::env::temp_dir().join(format!("forkd-assemble-{}", std::process::id())));
        let _ = std::fs::remove_dir_all(&tmp.0);
        std::fs::create_dir_all(&tmp.0).unwrap();
        let s = |i: usize| tmp.0.join(format!("s{i}"));
        let low = 2 << 20;
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), low),
            (GuestAddress(1 << 32), 1 << 20),
        ])
        .unwrap();
        let total = (low + (1 << 20)) as u64;
        let high = |off: u64| GuestAddress((1 << 32) + off);
        for p in 0..64u64 {
            mem.write_obj(0xa0a0_0000u32 + p as u32, GuestAddress(p * 4096))
                .unwrap();
        }
        mem.write_obj(0x77u8, high(0x3000)).unwrap();
        std::fs::create_dir_all(s(0)).unwrap();
        let (_, _, hash0) = write_memory(&s(0).join(MEMORY_FILE), &mem).unwrap();
        write_meta(&s(0), &meta(total, &hash0, None)).unwrap();

        // Each diff changes pages (runs, single pages, a page zeroed, one in
        // the high region); diff 3 changes again a page diff 1 changed.
        let pages_low = (low / 4096) as u64;
        let steps: [&[(u64, u32)]; 3] = [
            &[(1, 1), (2, 1), (3, 1), (40, 1), (pages_low + 3, 1)],
            &[(2, 2), (10, 2), (11, 2), (12, 0)],
            &[(1, 3), (63, 3), (pages_low + 100, 3)],
        ];
        let mut hash = hash0;
        let mut images = vec![image(&mem, &tmp.0)];
        for (i, step) in steps.iter().enumerate() {
            let mut dirty = vec![vec![0u64; (pages_low / 64) as usize], vec![0u64; 4]];
            for &(page, value) in *step {
                let (region, index, addr) = if page < pages_low {
                    (0, page, GuestAddress(page * 4096))
                } else {
                    (1, page - pages_low, high((page - pages_low) * 4096))
                };
                mem.write_slice(&[value as u8; 4096], addr).unwrap();
                dirty[region][(index / 64) as usize] |= 1 << (index % 64);
            }
            let dir = s(i + 1);
            std::fs::create_dir_all(&dir).unwrap();
            let (_, _, diff_hash) = write_diff(&dir, &mem, &dirty).unwrap();
            let parent = ParentRef {
                dir: s(i),
                memory_hash: hash.clone(),
            };
            hash = format!("{hash}+{diff_hash}");
            write_meta(&dir, &meta(total, &hash, Some(parent))).unwrap();
            images.push(image(&mem, &tmp.0));
        }

        ensure_memory(&s(3)).unwrap();
        assert!(std::fs::read(s(3).join(MEMORY_FILE)).unwrap() == images[3]);
        for i in [1, 2] {
            assert!(
                !s(i).join(MEMORY_FILE).exists(),
                "the head is assembled alone: s{i} in between must not be"
            );
        }
        assert!(!std::fs::read_dir(s(3)).unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .contains(".tmp")));

        // A layer assembled since is the nearest flat ancestor: s2 is built
        // on s1's memory, not s0's (spoiled here where no diff wrote).
        ensure_memory(&s(1)).unwrap();
        assert!(std::fs::read(s(1).join(MEMORY_FILE)).unwrap() == images[1]);
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(s(0).join(MEMORY_FILE))
            .unwrap();
        f.write_all_at(&[0xee; 4096], 30 * 4096).unwrap();
        ensure_memory(&s(2)).unwrap();
        assert!(std::fs::read(s(2).join(MEMORY_FILE)).unwrap() == images[2]);

        // A chain of parents that loops is refused, not walked forever.
        for (me, other) in [(4, 5), (5, 4)] {
            std::fs::create_dir_all(s(me)).unwrap();
            let parent = ParentRef {
                dir: s(other),
                memory_hash: "x".into(),
            };
            write_meta(&s(me), &meta(total, "x", Some(parent))).unwrap();
        }
        let err = ensure_memory(&s(4)).unwrap_err();
        assert!(err.to_string().contains("loops back"), "{err}");
    }
}
