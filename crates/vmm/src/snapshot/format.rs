//! The `vmstate` file: a versioned, checksummed envelope around the
//! bitcode-encoded machine state.
//!
//! ```text
//! offset 0   magic "FORKDVMS"                      8 bytes
//! offset 8   format version, u32 little-endian
//! offset 12  reserved, u32 zero
//! offset 16  payload length, u64 little-endian
//! offset 24  payload (bitcode of the state)
//! end - 32   BLAKE3 of everything before it
//! ```
//!
//! Snapshot files are untrusted input: the size is checked against a limit
//! before anything is read, and the checksum before anything is decoded.

use std::io::Read;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

/// First bytes of every vmstate file.
pub const MAGIC: [u8; 8] = *b"FORKDVMS";
/// The version this build writes and reads. Version 2 added the TSC and
/// kvmclock pairing (host TSC readings, TSC offsets). The payload is bitcode,
/// which is not self-describing: a field cannot be added with a serde default,
/// so a new field means a new version, and an older file is refused by name.
pub const VERSION: u32 = 2;
/// Largest vmstate file accepted (vCPU state is a few KiB each).
pub const MAX_VMSTATE_BYTES: u64 = 16 << 20;
const HEADER: usize = 24;
const CHECKSUM: usize = 32;

/// Why a vmstate file was refused.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// I/O error.
    #[error("cannot read vmstate file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Too large to be a vmstate file.
    #[error("{path} is {len} bytes, more than a vmstate file can be ({MAX_VMSTATE_BYTES}): it is corrupt or not a vmstate file")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        len: u64,
    },
    /// Wrong magic or too short.
    #[error("not a forkd vmstate file (bad magic or too short): the snapshot is corrupt")]
    BadMagic,
    /// A version this build does not read.
    #[error("vmstate format version {found} is not supported (this build reads version {VERSION}): restore it with the forkd version that wrote it")]
    UnsupportedVersion {
        /// Version in the file.
        found: u32,
    },
    /// Length field does not match the file.
    #[error("vmstate is truncated or has trailing bytes (header says {claimed} payload bytes, file has {actual}): the snapshot is corrupt")]
    Length {
        /// Payload length the header claims.
        claimed: u64,
        /// Payload bytes present.
        actual: u64,
    },
    /// Checksum mismatch.
    #[error("vmstate checksum mismatch: the snapshot is corrupt")]
    Checksum,
    /// Payload did not decode.
    #[error("vmstate payload does not decode: {0}; the snapshot is corrupt")]
    Decode(String),
}

/// Encodes `state` into a complete vmstate file image.
pub fn encode<T: Serialize>(state: &T) -> Vec<u8> {
    let payload = bitcode::serialize(state).expect("machine state always serialises");
    let mut out = Vec::with_capacity(HEADER + payload.len() + CHECKSUM);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&payload);
    let sum = blake3::hash(&out);
    out.extend_from_slice(sum.as_bytes());
    out
}

/// Decodes a vmstate file image, checking magic, version, length and checksum first.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, FormatError> {
    if bytes.len() < HEADER + CHECKSUM || bytes[..8] != MAGIC {
        return Err(FormatError::BadMagic);
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().unwrap());
    if version != VERSION {
        return Err(FormatError::UnsupportedVersion { found: version });
    }
    let claimed = u64::from_le_bytes(bytes[16..24].try_into().unwrap());
    let actual = (bytes.len() - HEADER - CHECKSUM) as u64;
    if claimed != actual {
        return Err(FormatError::Length { claimed, actual });
    }
    let (body, sum) = bytes.split_at(bytes.len() - CHECKSUM);
    if blake3::hash(body).as_bytes() != sum {
        return Err(FormatError::Checksum);
    }
    bitcode::deserialize(&body[HEADER..]).map_err(|e| FormatError::Decode(e.to_string()))
}

/// Reads and decodes the vmstate file at `path`, refusing oversized files
/// before reading them.
pub fn read_file<T: DeserializeOwned>(path: &Path) -> Result<T, FormatError> {
    let io = |source| FormatError::Io {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    if len > MAX_VMSTATE_BYTES {
        return Err(FormatError::TooLarge {
            path: path.to_owned(),
            len,
        });
    }
    let mut bytes = Vec::with_capacity(len as usize);
    file.take(MAX_VMSTATE_BYTES)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    decode(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct S {
        a: u64,
        b: Vec<u8>,
    }

    fn sample() -> Vec<u8> {
        encode(&S {
            a: 7,
            b: vec![1, 2, 3],
        })
    }

    #[test]
    fn roundtrip() {
        assert_eq!(
            decode::<S>(&sample()).unwrap(),
            S {
                a: 7,
                b: vec![1, 2, 3]
            }
        );
    }

    #[test]
    fn every_flipped_bit_is_caught() {
        let good = sample();
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x10;
            assert!(
                decode::<S>(&bad).is_err(),
                "flip at byte {i} went unnoticed"
            );
        }
    }

    #[test]
    fn truncation_and_garbage_are_refused() {
        let good = sample();
        for n in 0..good.len() {
            assert!(decode::<S>(&good[..n]).is_err(), "truncated to {n} bytes");
        }
        assert!(matches!(
            decode::<S>(b"hello world, this is not a vmstate file at all"),
            Err(FormatError::BadMagic)
        ));
    }

    #[test]
    fn other_versions_are_refused_by_name() {
        // Version 1 (before the TSC pairing) and a future version alike.
        for found in [1u32, VERSION + 1] {
            let mut other = sample();
            other[8..12].copy_from_slice(&found.to_le_bytes());
            let err = decode::<S>(&other).unwrap_err();
            assert!(matches!(err, FormatError::UnsupportedVersion { found: f } if f == found));
            assert!(err.to_string().contains(&format!("version {found}")));
        }
    }

    #[test]
    fn oversized_file_is_refused_before_reading() {
        let dir = std::env::temp_dir().join(format!("forkd-fmt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("vmstate");
        std::fs::File::create(&p)
            .unwrap()
            .set_len(MAX_VMSTATE_BYTES + 1)
            .unwrap();
        assert!(matches!(
            read_file::<S>(&p),
            Err(FormatError::TooLarge { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
