//! The files of a sandbox's guest: `/v1/sandboxes/{id}/files...`.
//!
//! `GET /files?path=` streams a file down and `PUT /files?path=` streams
//! one up (the body as it is, any size); the rest are JSON. Paths are
//! absolute paths in the guest. Errors are the guest's: no such file is
//! 404, permission denied 403. These routes (but download, upload, list
//! and stat, which protocol 1 agents have) need a guest agent speaking
//! protocol 2.

use serde::{Deserialize, Serialize};

pub use crate::agent::{Entry, FileType};

/// Longest path a file route takes.
pub const MAX_PATH_LEN: usize = 4096;

/// Query of `GET /files` (download), `GET /files/stat`, `GET /files/list`
/// and `DELETE /files`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::IntoParams))]
pub struct FileQuery {
    /// Absolute path in the guest.
    pub path: String,
    /// Download: start at this byte.
    #[serde(default)]
    pub offset: Option<u64>,
    /// Delete: a directory with what it holds.
    #[serde(default)]
    pub recursive: Option<bool>,
    /// Stat: describe a symlink itself, not its target.
    #[serde(default)]
    pub nofollow: Option<bool>,
    /// List: at most this many entries (default and limit 10000).
    #[serde(default)]
    pub max_entries: Option<u64>,
}

/// Query of `PUT /files` (upload).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::IntoParams))]
pub struct UploadQuery {
    /// Absolute path in the guest; a file there is replaced when the
    /// upload completes (never half-written).
    pub path: String,
    /// Permission bits, octal (default 644).
    #[serde(default)]
    pub mode: Option<String>,
    /// Make missing parent directories.
    #[serde(default)]
    pub create_dirs: Option<bool>,
    /// Append to the file instead of replacing it.
    #[serde(default)]
    pub append: Option<bool>,
}

/// Answer to an upload (201).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Uploaded {
    /// Where it was written.
    pub path: String,
    /// Bytes written.
    pub bytes: u64,
}

/// Answer to `GET /files/list`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct FileList {
    /// The directory's entries, in the guest's order.
    pub entries: Vec<Entry>,
    /// The listing stopped at `max_entries`.
    pub truncated: bool,
}

/// `POST /files/mkdir`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct MkdirRequest {
    /// Absolute path.
    pub path: String,
    /// Make missing parents too, and accept an existing directory.
    #[serde(default)]
    pub parents: bool,
    /// Permission bits (default 0o755 = 493).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<u32>,
}

/// `POST /files/rename`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RenameRequest {
    /// Absolute path now.
    pub from: String,
    /// Absolute path after (a file there is replaced).
    pub to: String,
}
