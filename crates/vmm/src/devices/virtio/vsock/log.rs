//! The vsock device's log of connections it ends on its own.
//!
//! Every connection the device closes or refuses without being asked to
//! (a failed host socket, a guest that breaks the protocol, a host reader
//! that stopped reading while the guest's last bytes waited) is one line in
//! the VMM's log (target `vsock`), naming the connection, the reason and
//! the bytes for the host that were dropped. A guest can open and break
//! connections at will, so the lines go through a per-device
//! [`RateLimit`], and the next line that gets through says how many were
//! held back.

use crate::logger::RateLimit;

/// Where lines go: the VMM's log, or a test's collector.
pub(super) type Sink = Box<dyn FnMut(&str) + Send>;

/// A rate-limited log for one device.
pub(super) struct ConnLog {
    sink: Sink,
    limit: RateLimit,
}

impl std::fmt::Debug for ConnLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnLog")
            .field("limit", &self.limit)
            .finish_non_exhaustive()
    }
}

impl ConnLog {
    /// Lines go to the VMM's log as warnings.
    pub(super) fn to_log() -> Self {
        Self::with_sink(Box::new(|line| tracing::warn!(target: "vsock", "{line}")))
    }

    pub(super) fn with_sink(sink: Sink) -> Self {
        ConnLog {
            sink,
            limit: RateLimit::per_device(),
        }
    }

    /// Logs `line` unless this window's lines are spent.
    pub(super) fn line(&mut self, line: std::fmt::Arguments<'_>) {
        self.line_at(std::time::Instant::now(), line);
    }

    fn line_at(&mut self, now: std::time::Instant, line: std::fmt::Arguments<'_>) {
        match self.limit.admit_at(now) {
            None => {}
            Some(0) => (self.sink)(&line.to_string()),
            Some(held) => (self.sink)(&format!(
                "{line} ({held} earlier connection events not logged: {})",
                self.limit.describe()
            )),
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// A log whose lines land in the returned vector.
    pub(crate) fn collecting() -> (ConnLog, Arc<Mutex<Vec<String>>>) {
        let lines = Arc::new(Mutex::new(Vec::new()));
        let l = lines.clone();
        (
            ConnLog::with_sink(Box::new(move |s| l.lock().unwrap().push(s.to_owned()))),
            lines,
        )
    }

    #[test]
    fn a_burst_is_cut_and_the_next_line_through_counts_what_was_held() {
        let (mut log, lines) = collecting();
        log.limit = RateLimit::new(2, std::time::Duration::from_secs(10));
        let t0 = std::time::Instant::now();
        for i in 0..5 {
            log.line_at(t0, format_args!("event {i}"));
        }
        assert_eq!(*lines.lock().unwrap(), ["event 0", "event 1"]);
        log.line_at(
            t0 + std::time::Duration::from_secs(11),
            format_args!("later"),
        );
        let l = lines.lock().unwrap();
        assert!(
            l[2].starts_with("later (3 earlier connection events not logged: more than 2 in 10 s)"),
            "{l:?}"
        );
    }
}
