//! How a request's answer ends, shared by every operation: the outcome,
//! an error frame, and the error code for an I/O error.

use std::io;
use std::os::unix::net::UnixStream;

use proto::agent::{write_frame, ErrorCode, Reply};

/// How a request ended.
pub enum Outcome {
    /// Answered (successfully or with an error frame).
    Done,
    /// The host went away or stalled; nothing more can be sent.
    HostGone,
    /// Answered a poweroff: the caller powers off.
    PowerOff,
}

/// Sends an error frame.
pub fn send_error(conn: &mut UnixStream, code: ErrorCode, message: impl Into<String>) -> Outcome {
    match write_frame(conn, &Reply::error(code, message), &[]) {
        Ok(()) => Outcome::Done,
        Err(_) => Outcome::HostGone,
    }
}

/// The error code for an I/O error.
pub fn io_error_code(e: &io::Error) -> ErrorCode {
    match e.kind() {
        io::ErrorKind::NotFound => ErrorCode::NotFound,
        io::ErrorKind::PermissionDenied => ErrorCode::PermissionDenied,
        _ => ErrorCode::Io,
    }
}
