//! Checking a snapshot's files against what its `snapshot.json` records
//! (`forkd-vmm verify`), after the fact: a snapshot is registered when it
//! is written, and verified in the background.
//!
//! What is checked, per file, with the hash defined where the file is
//! written (the functions are the writer's own):
//!
//! - `vmstate`: BLAKE3 of the file (`vmstate_hash`).
//! - `memory` of a full snapshot: its size (`memory_bytes`) and content
//!   hash (`memory_hash`, BLAKE3 over (page index, page) of every non-zero
//!   page; only the file's data extents are read, holes are zero pages).
//! - `memory.diffmap` of a diff: its checksummed envelope, and that it
//!   covers `memory_bytes`.
//! - `memory.diff` of a diff: its size, and its changed pages. A diff's
//!   `memory_hash` is a chain hash, BLAKE3 of the parent's `memory_hash`
//!   (recorded in this `snapshot.json`, `parent.memory_hash`) followed by
//!   the hash of the changed pages; both parts come from this directory,
//!   so it is re-derived whole without reading the parent.
//!
//! Not checked, because nothing records their content: a diff's flat
//! `memory` (assembled on first use from the parent's; it matches only the
//! parent chain, which is verified snapshot by snapshot), frozen drive
//! layers (their own headers tie each to the one below), and
//! `snapshot.json` itself (the source of every expectation).
//!
//! Every file's identity (inode, size, mtime, ctime) is taken when it is
//! opened and checked unchanged after its hash, through the descriptor and
//! the name both: a file rewritten or replaced meanwhile fails the check
//! ("verify again") rather than pass on content it no longer has. The
//! identities are reported, so a reader can later tell whether a file
//! changed since without hashing it again.
//!
//! `snapshot.json` is hostile input: it is read bounded (`read_meta`),
//! its sizes are checked against the VM size limits before any is used,
//! its hashes must be BLAKE3 hex, and no file name is taken from it (only
//! the fixed names above, in the snapshot directory).

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use proto::snapshot::{FileIdentity, Verified};

use super::{
    chain_hash, format, hash_diff_file, hash_memory_file, read_meta, DiffMap, Error, SnapshotKind,
    SnapshotMeta, SnapshotStatus, DIFF_FILE, DIFF_MAP_FILE, MEMORY_FILE, PAGE, VMSTATE_FILE,
};
use crate::memory::layout::{MAX_MEM_MIB, MIN_MEM_MIB};

/// Bytes a read of `vmstate` asks for (as the memory's, see `HASH_READ`).
const READ_CHUNK: usize = 1 << 20;

/// Why a snapshot did not verify.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// A file does not hold what `snapshot.json` records: the snapshot is
    /// corrupt (or was changed) and must not be restored.
    #[error(
        "snapshot {dir}: {file} does not hold what snapshot.json records: expected {expected}, \
         found {found}; the snapshot is corrupt: delete it, or take it again"
    )]
    Mismatch {
        /// The snapshot directory.
        dir: PathBuf,
        /// The file's name in it.
        file: &'static str,
        /// What `snapshot.json` says.
        expected: String,
        /// What the file has.
        found: String,
    },
    /// A file changed (or was replaced) while it was being hashed.
    #[error("snapshot {dir}: {file} changed while being verified; verify again")]
    Changed {
        /// The snapshot directory.
        dir: PathBuf,
        /// The file's name in it.
        file: &'static str,
    },
    /// The snapshot is not ready: nothing it records is final yet (or, when
    /// it failed, ever will be).
    #[error(
        "snapshot {dir} is {}, not ready: verify it once it is ready (a failed snapshot never \
         will be: delete it)",
        status.as_str()
    )]
    NotReady {
        /// The snapshot directory.
        dir: PathBuf,
        /// Its status.
        status: SnapshotStatus,
    },
    /// The snapshot cannot be verified: unreadable, a bad `snapshot.json`.
    #[error(transparent)]
    Snapshot(#[from] Error),
}

/// Verifies the snapshot in `dir` (see the module): every file its
/// `snapshot.json` records a hash for has that content. Returns what was
/// hashed, with each file's identity.
pub fn verify(dir: &Path) -> Result<Verified, VerifyError> {
    let started = Instant::now();
    let meta = read_meta(dir)?;
    check_meta(dir, &meta)?;
    let mut files = Files {
        dir,
        identities: Vec::new(),
        bytes_hashed: 0,
    };
    files.check(VMSTATE_FILE, |f, _| {
        let (bytes, hash) = hash_whole(f)?;
        Ok((bytes, expect_hash(&meta.vmstate_hash, hash)))
    })?;
    match meta.kind {
        SnapshotKind::Full => files.check(MEMORY_FILE, |f, size| {
            if let Some(wrong) = expect_size(meta.memory_bytes, size) {
                return Ok((0, Some(wrong)));
            }
            let (data, hash) = hash_memory_file(f)?;
            Ok((data, expect_hash(&meta.memory_hash, hash)))
        })?,
        SnapshotKind::Diff => {
            let map = files.check_map(&meta)?;
            let parent_hash = &meta.parent.as_ref().expect("checked").memory_hash;
            files.check(DIFF_FILE, |f, size| {
                if let Some(wrong) = expect_size(meta.memory_bytes, size) {
                    return Ok((0, Some(wrong)));
                }
                let (changed, diff_hash) = hash_diff_file(f, &map)?;
                Ok((
                    changed,
                    expect_hash(&meta.memory_hash, chain_hash(parent_hash, &diff_hash)),
                ))
            })?
        }
    }
    Ok(Verified {
        files: files.identities,
        bytes_hashed: files.bytes_hashed,
        micros: started.elapsed().as_micros() as u64,
    })
}

/// Refuses a `snapshot.json` whose expectations cannot be checked: not
/// ready, sizes outside what a VM can have, hashes that are not BLAKE3.
fn check_meta(dir: &Path, meta: &SnapshotMeta) -> Result<(), VerifyError> {
    if meta.status != SnapshotStatus::Ready {
        return Err(VerifyError::NotReady {
            dir: dir.to_owned(),
            status: meta.status,
        });
    }
    let bad = |reason: String| Error::Meta {
        path: dir.to_owned(),
        reason,
    };
    if !(MIN_MEM_MIB..=MAX_MEM_MIB).contains(&meta.mem_mib)
        || meta.memory_bytes != meta.mem_mib << 20
    {
        return Err(VerifyError::from(bad(format!(
            "mem_mib {} and memory_bytes {} are not a VM's RAM ({MIN_MEM_MIB} to {MAX_MEM_MIB} \
             MiB, memory_bytes the same in bytes)",
            meta.mem_mib, meta.memory_bytes
        ))));
    }
    let mut hashes = vec![
        ("vmstate_hash", &meta.vmstate_hash),
        ("memory_hash", &meta.memory_hash),
    ];
    match (meta.kind, &meta.parent) {
        (SnapshotKind::Full, _) => {}
        (SnapshotKind::Diff, Some(parent)) => {
            hashes.push(("parent.memory_hash", &parent.memory_hash))
        }
        (SnapshotKind::Diff, None) => {
            return Err(bad("a diff snapshot without a parent".into()).into())
        }
    }
    for (field, hash) in hashes {
        if !is_blake3_hex(hash) {
            return Err(bad(format!("{field} is not a BLAKE3 hash (64 hex digits)")).into());
        }
    }
    Ok(())
}

fn is_blake3_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Expected vs found, for a mismatch (None when they agree).
type Wrong = Option<(String, String)>;

fn expect_hash(expected: &str, found: String) -> Wrong {
    (found != expected).then(|| (format!("hash {expected}"), format!("hash {found}")))
}

fn expect_size(expected: u64, found: u64) -> Wrong {
    (found != expected).then(|| {
        (
            format!("{expected} bytes"),
            format!("{found} bytes (truncated or extended)"),
        )
    })
}

/// The files verified so far, in one snapshot directory.
struct Files<'a> {
    dir: &'a Path,
    identities: Vec<FileIdentity>,
    bytes_hashed: u64,
}

impl Files<'_> {
    /// Opens `name`, runs `hash` on it (given its size; it returns the
    /// bytes it hashed and what is wrong, if anything) and checks the file
    /// was the same file, unchanged, throughout.
    fn check(
        &mut self,
        name: &'static str,
        hash: impl FnOnce(&File, u64) -> std::io::Result<(u64, Wrong)>,
    ) -> Result<(), VerifyError> {
        let path = self.dir.join(name);
        let io = |source| Error::Io {
            path: path.clone(),
            source,
        };
        let file = File::open(&path).map_err(io)?;
        let before = identity(name, &file.metadata().map_err(io)?);
        let (bytes, wrong) = hash(&file, before.size).map_err(io)?;
        let after_fd = identity(name, &file.metadata().map_err(io)?);
        let after_name = identity(name, &std::fs::metadata(&path).map_err(io)?);
        if after_fd != before || after_name != before {
            return Err(VerifyError::Changed {
                dir: self.dir.to_owned(),
                file: name,
            });
        }
        if let Some((expected, found)) = wrong {
            return Err(VerifyError::Mismatch {
                dir: self.dir.to_owned(),
                file: name,
                expected,
                found,
            });
        }
        self.identities.push(before);
        self.bytes_hashed += bytes;
        Ok(())
    }

    /// Checks `memory.diffmap` (its checksum, and that it covers the
    /// memory) and returns the map.
    fn check_map(&mut self, meta: &SnapshotMeta) -> Result<DiffMap, VerifyError> {
        let mut map = None;
        self.check(DIFF_MAP_FILE, |f, size| {
            if size > format::MAX_VMSTATE_BYTES {
                let limit = format::MAX_VMSTATE_BYTES;
                let wrong = (format!("at most {limit} bytes"), format!("{size} bytes"));
                return Ok((0, Some(wrong)));
            }
            let mut bytes = Vec::with_capacity(size as usize);
            f.take(size).read_to_end(&mut bytes)?;
            let pages = meta.memory_bytes / PAGE as u64;
            let wrong = match format::decode::<DiffMap>(&bytes) {
                Err(e) => Some(("a page map with a valid checksum".into(), e.to_string())),
                Ok(m) if m.pages != pages || m.bits.len() as u64 != pages.div_ceil(64) => Some((
                    format!("a page map of {pages} pages"),
                    format!("one of {} pages in {} words", m.pages, m.bits.len()),
                )),
                Ok(m) => {
                    map = Some(m);
                    None
                }
            };
            Ok((bytes.len() as u64, wrong))
        })?;
        Ok(map.expect("checked without a mismatch"))
    }
}

/// (bytes, BLAKE3 hex) of everything in `file`, read in large chunks.
fn hash_whole(mut file: &File) -> std::io::Result<(u64, String)> {
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; READ_CHUNK];
    let mut total = 0u64;
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    Ok((total, hasher.finalize().to_hex().to_string()))
}

/// The identity of the file `name` whose metadata is `m`.
fn identity(name: &str, m: &std::fs::Metadata) -> FileIdentity {
    let ns = |secs: i64, nanos: i64| i128::from(secs) * 1_000_000_000 + i128::from(nanos);
    FileIdentity {
        name: name.to_owned(),
        inode: m.ino(),
        size: m.size(),
        mtime_ns: ns(m.mtime(), m.mtime_nsec()),
        ctime_ns: ns(m.ctime(), m.ctime_nsec()),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use vm_memory::{Bytes, GuestAddress};

    use super::super::{write_diff, write_memory, write_meta, ParentRef};
    use super::*;
    use crate::memory::GuestMemoryMmap;

    struct Tmp(PathBuf);
    impl Drop for Tmp {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn tmp(tag: &str) -> Tmp {
        let p = std::env::temp_dir().join(format!("forkd-verify-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Tmp(p)
    }

    const MIB: u64 = 8;

    fn meta(memory_hash: String, vmstate_hash: String, parent: Option<ParentRef>) -> SnapshotMeta {
        crate::snapshot::test_meta(MIB << 20, &memory_hash, &vmstate_hash, parent)
    }

    /// A vmstate stand-in (verify hashes it, it does not decode it); its hash.
    fn vmstate(dir: &Path, tag: &[u8]) -> String {
        std::fs::write(dir.join(VMSTATE_FILE), tag).unwrap();
        blake3::hash(tag).to_hex().to_string()
    }

    /// A full snapshot of `mem` in `dir`; its memory hash.
    fn full(dir: &Path, mem: &GuestMemoryMmap) -> String {
        std::fs::create_dir_all(dir).unwrap();
        let (_, _, hash) = write_memory(&dir.join(MEMORY_FILE), mem).unwrap();
        let vm = vmstate(dir, b"full state");
        write_meta(dir, &meta(hash.clone(), vm, None)).unwrap();
        hash
    }

    fn flip(path: &Path, at: u64) {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        let mut b = [0u8];
        f.read_exact_at(&mut b, at).unwrap();
        f.write_all_at(&[b[0] ^ 0x5a], at).unwrap();
    }

    fn mismatch(dir: &Path) -> (&'static str, String) {
        match verify(dir) {
            Err(e @ VerifyError::Mismatch { file, .. }) => (file, e.to_string()),
            other => panic!("expected a mismatch, got {other:?}"),
        }
    }

    fn memory() -> GuestMemoryMmap {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), (MIB << 20) as usize)]).unwrap();
        for p in [0u64, 1, 2, 700, 2047] {
            mem.write_obj(0xfeed_0000u32 + p as u32, GuestAddress(p * 4096 + 8))
                .unwrap();
        }
        mem
    }

    #[test]
    fn a_full_snapshot_verifies_and_a_wrong_byte_names_its_file() {
        let t = tmp("full");
        let dir = t.0.join("s");
        full(&dir, &memory());
        let ok = verify(&dir).unwrap();
        let names: Vec<&str> = ok.files.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, [VMSTATE_FILE, MEMORY_FILE]);
        assert_eq!(ok.bytes_hashed, b"full state".len() as u64 + 5 * 4096);
        // Nothing changed: the same identities again.
        assert_eq!(verify(&dir).unwrap().files, ok.files);

        flip(&dir.join(MEMORY_FILE), 700 * 4096 + 9);
        let (file, text) = mismatch(&dir);
        assert_eq!(file, MEMORY_FILE);
        assert!(
            text.contains("expected hash") && text.contains("found hash"),
            "{text}"
        );
        flip(&dir.join(MEMORY_FILE), 700 * 4096 + 9);
        // A byte written into a hole is data the snapshot did not have.
        flip(&dir.join(MEMORY_FILE), 1500 * 4096);
        assert_eq!(mismatch(&dir).0, MEMORY_FILE);
        flip(&dir.join(MEMORY_FILE), 1500 * 4096);
        verify(&dir).unwrap();

        flip(&dir.join(VMSTATE_FILE), 3);
        assert_eq!(mismatch(&dir).0, VMSTATE_FILE);
        flip(&dir.join(VMSTATE_FILE), 3);

        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(dir.join(MEMORY_FILE))
            .unwrap();
        f.set_len(4 << 20).unwrap();
        let (file, text) = mismatch(&dir);
        assert_eq!(file, MEMORY_FILE);
        assert!(text.contains("truncated"), "{text}");
    }

    #[test]
    fn a_diff_verifies_from_its_own_directory_alone() {
        let t = tmp("diff");
        let mem = memory();
        let parent_hash = full(&t.0.join("s0"), &mem);
        // Pages 1 (rewritten), 3 (new), 700 (zeroed: a hole in the diff).
        let mut dirty = vec![0u64; ((MIB << 20) / 4096 / 64) as usize];
        for (page, value) in [(1u64, 0x11u8), (3, 0x33), (700, 0)] {
            mem.write_slice(&[value; 4096], GuestAddress(page * 4096))
                .unwrap();
            dirty[(page / 64) as usize] |= 1 << (page % 64);
        }
        let dir = t.0.join("s1");
        std::fs::create_dir_all(&dir).unwrap();
        let (_, _, diff_hash) = write_diff(&dir, &mem, &[dirty]).unwrap();
        let vm = vmstate(&dir, b"diff state");
        let parent = ParentRef {
            dir: t.0.join("s0"),
            memory_hash: parent_hash.clone(),
        };
        write_meta(
            &dir,
            &meta(chain_hash(&parent_hash, &diff_hash), vm, Some(parent)),
        )
        .unwrap();

        // The parent is not needed: its hash is in this snapshot.json.
        std::fs::remove_dir_all(t.0.join("s0")).unwrap();
        let ok = verify(&dir).unwrap();
        let names: Vec<&str> = ok.files.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, [VMSTATE_FILE, DIFF_MAP_FILE, DIFF_FILE]);

        // A changed page, and the zeroed page given data.
        for page in [3u64, 700] {
            flip(&dir.join(DIFF_FILE), page * 4096 + 100);
            assert_eq!(mismatch(&dir).0, DIFF_FILE, "page {page}");
            flip(&dir.join(DIFF_FILE), page * 4096 + 100);
        }
        // A page the map does not list is not part of the diff.
        flip(&dir.join(DIFF_FILE), 5 * 4096);
        verify(&dir).unwrap();
        flip(&dir.join(DIFF_FILE), 5 * 4096);

        flip(&dir.join(DIFF_MAP_FILE), 30);
        let (file, text) = mismatch(&dir);
        assert_eq!(file, DIFF_MAP_FILE);
        assert!(text.contains("checksum"), "{text}");
        flip(&dir.join(DIFF_MAP_FILE), 30);
        verify(&dir).unwrap();
    }

    #[test]
    fn a_snapshot_json_that_cannot_be_checked_is_refused_before_any_file_is_read() {
        let t = tmp("meta");
        let dir = t.0.join("s");
        let hash = full(&dir, &memory());
        let vm = blake3::hash(b"full state").to_hex().to_string();
        let good = meta(hash.clone(), vm.clone(), None);
        // vmstate gone: were any file read first, that would be the error.
        std::fs::remove_file(dir.join(VMSTATE_FILE)).unwrap();
        let cases: Vec<(SnapshotMeta, &str)> = vec![
            (
                SnapshotMeta {
                    mem_mib: 0,
                    memory_bytes: 0,
                    ..good.clone()
                },
                "not a VM's RAM",
            ),
            (
                SnapshotMeta {
                    mem_mib: 1 << 40,
                    memory_bytes: 0,
                    ..good.clone()
                },
                "not a VM's RAM",
            ),
            (
                SnapshotMeta {
                    memory_bytes: (MIB << 20) + 1,
                    ..good.clone()
                },
                "not a VM's RAM",
            ),
            (
                SnapshotMeta {
                    memory_hash: "ab".into(),
                    ..good.clone()
                },
                "memory_hash",
            ),
            (
                SnapshotMeta {
                    vmstate_hash: hash.to_uppercase(),
                    ..good.clone()
                },
                "vmstate_hash",
            ),
            (
                SnapshotMeta {
                    kind: SnapshotKind::Diff,
                    ..good.clone()
                },
                "without a parent",
            ),
            (
                SnapshotMeta {
                    status: SnapshotStatus::Writing,
                    ..good.clone()
                },
                "not ready",
            ),
        ];
        for (bad, says) in cases {
            write_meta(&dir, &bad).unwrap();
            let err = verify(&dir).unwrap_err();
            assert!(
                matches!(err, VerifyError::Snapshot(_) | VerifyError::NotReady { .. }),
                "{err}"
            );
            assert!(err.to_string().contains(says), "{says}: {err}");
        }
        std::fs::write(dir.join(super::super::META_FILE), "{").unwrap();
        assert!(matches!(
            verify(&dir),
            Err(VerifyError::Snapshot(Error::Meta { .. }))
        ));
    }

    #[test]
    fn a_file_that_changes_while_it_is_hashed_fails_the_check() {
        let t = tmp("changed");
        let path = t.0.join(VMSTATE_FILE);
        std::fs::write(&path, b"before").unwrap();
        let mut files = Files {
            dir: &t.0,
            identities: Vec::new(),
            bytes_hashed: 0,
        };
        let err = files
            .check(VMSTATE_FILE, |_, _| {
                std::thread::sleep(std::time::Duration::from_millis(5));
                std::fs::write(&path, b"after!").unwrap();
                Ok((6, None))
            })
            .unwrap_err();
        assert!(
            matches!(
                err,
                VerifyError::Changed {
                    file: VMSTATE_FILE,
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("verify again"));
        // Replaced under its name (a rename over it): the same.
        let err = files
            .check(VMSTATE_FILE, |_, _| {
                std::fs::write(t.0.join("new"), b"after!").unwrap();
                std::fs::rename(t.0.join("new"), &path).unwrap();
                Ok((6, None))
            })
            .unwrap_err();
        assert!(matches!(err, VerifyError::Changed { .. }), "{err}");
        assert!(files.identities.is_empty());
    }
}
