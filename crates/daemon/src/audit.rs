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

/// One audited request: upstream's fields (`ts`, `method`, `path`,
/// `status`, `latency_us`, `ua`) and ours.
#[derive(Debug, Serialize)]
pub struct Entry<'a> {
    /// When, as RFC 3339 UTC to the second (upstream's field).
    pub ts: String,
    /// Seconds since the epoch, with milliseconds.
    pub time: f64,
    /// The client.
    pub remote: Option<SocketAddr>,
    /// HTTP method.
    pub method: &'a str,
    /// Path, without the query, at most [`MAX_FIELD`] bytes.
    pub path: &'a str,
    /// Answer status.
    pub status: u16,
    /// Time to the answer's head, in milliseconds.
    pub latency_ms: f64,
    /// The same in whole microseconds (upstream's field).
    pub latency_us: u64,
    /// The client's User-Agent, or "" (upstream's field).
    pub ua: &'a str,
    /// The token's id, when one was presented and accepted.
    pub token_id: Option<&'a str>,
}

impl AuditLog {
    /// Opens `path` for appending (created with mode 0600, and its
    /// directory with it).
    pub fn open(path: &Path) -> Result<AuditLog, OpenError> {
        use std::os::unix::fs::OpenOptionsExt;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| OpenError {
                path: dir.to_owned(),
                source,
            })?;
        }
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

/// Longest path or User-Agent an audit line keeps, in bytes.
pub const MAX_FIELD: usize = 256;

/// `s` cut to [`MAX_FIELD`] bytes (at a character boundary), marked when
/// cut.
pub fn bounded(s: &str) -> String {
    if s.len() <= MAX_FIELD {
        return s.to_owned();
    }
    let mut end = MAX_FIELD;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...(cut, {} bytes)", &s[..end], s.len())
}

/// `at` as RFC 3339 UTC to the second (`2026-12-07T03:17:11Z`), as
/// upstream's audit lines have it.
pub fn rfc3339(at: std::time::SystemTime) -> String {
    let at = time::OffsetDateTime::from(at);
    at.replace_nanosecond(0)
        .unwrap_or(at)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| "outside-time-range".into())
}

/// Seconds since the epoch as a float.
pub fn now_secs() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_fields_are_cut_at_a_character() {
        assert_eq!(bounded("/v1/x"), "/v1/x");
        let long = format!("/{}", "é".repeat(200));
        let cut = bounded(&long);
        assert!(cut.len() < MAX_FIELD + 40, "{cut}");
        assert!(cut.ends_with("...(cut, 401 bytes)"), "{cut}");
    }

    #[test]
    fn timestamps_are_rfc3339_to_the_second() {
        let at = std::time::UNIX_EPOCH + Duration::from_millis(1_796_613_431_250);
        assert_eq!(rfc3339(at), "2026-12-07T03:17:11Z");
        assert_eq!(rfc3339(std::time::UNIX_EPOCH), "1970-01-01T00:00:00Z");
    }

    #[test]
    fn a_line_has_upstreams_fields_and_ours() {
        let dir = std::env::temp_dir().join(format!("forkd-audit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("sub/audit.log");
        let log = AuditLog::open(&path).expect("the directory is made");
        log.record(&Entry {
            ts: rfc3339(std::time::SystemTime::now()),
            time: now_secs(),
            remote: None,
            method: "GET",
            path: "/version",
            status: 200,
            latency_ms: 0.125,
            latency_us: 125,
            ua: "curl/8",
            token_id: None,
        });
        let line: serde_json::Value =
            serde_json::from_str(std::fs::read_to_string(&path).unwrap().trim()).unwrap();
        for key in [
            "ts",
            "method",
            "path",
            "status",
            "latency_us",
            "ua",
            "time",
            "latency_ms",
        ] {
            assert!(line.get(key).is_some(), "{key} in {line}");
        }
        assert_eq!(
            (line["latency_us"].as_u64(), line["ua"].as_str()),
            (Some(125), Some("curl/8"))
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
