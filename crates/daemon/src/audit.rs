//! The audit log: one JSON object per request, appended to a file.
//!
//! Each line has the time, remote address, method, path, status, latency
//! and the id of the token used (see [`crate::auth`]); never a token,
//! header or body.

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;

/// The audit log could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("cannot open the audit log {}: {source}", path.display())]
pub struct OpenError {
    /// The file.
    pub path: std::path::PathBuf,
    /// Why.
    #[source]
    pub source: std::io::Error,
}

/// An open audit log.
pub struct AuditLog {
    file: Mutex<std::fs::File>,
}

/// One audited request.
#[derive(Debug, Serialize)]
pub struct Entry<'a> {
    /// Seconds since the epoch, with milliseconds.
    pub time: f64,
    /// The client.
    pub remote: Option<SocketAddr>,
    /// HTTP method.
    pub method: &'a str,
    /// Path (with the query, which never carries secrets in this API).
    pub path: &'a str,
    /// Answer status.
    pub status: u16,
    /// Time to the answer's head, in milliseconds.
    pub latency_ms: f64,
    /// The token's id, when one was presented and accepted.
    pub token_id: Option<&'a str>,
}

impl AuditLog {
    /// Opens `path` for appending (created with mode 0600).
    pub fn open(path: &Path) -> Result<AuditLog, OpenError> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
            .map_err(|source| OpenError {
                path: path.to_owned(),
                source,
            })?;
        Ok(AuditLog {
            file: Mutex::new(file),
        })
    }

    /// Appends one line. A failed write is reported on stderr, not to the
    /// client (the request itself succeeded or failed on its own).
    pub fn record(&self, entry: &Entry<'_>) {
        let mut line = serde_json::to_vec(entry).expect("audit entries serialise");
        line.push(b'\n');
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = file.write_all(&line) {
            tracing::error!("cannot write the audit log: {e}");
        }
    }
}

/// Seconds since the epoch as a float.
pub fn now_secs() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs_f64()
}
