//! The vsock device's log of connections it ends on its own.
//!
//! Every connection the device closes or refuses without being asked to
//! (a failed host socket, a guest that breaks the protocol, a host reader
//! that stopped reading while the guest's last bytes waited) is one line in
//! the VMM's log, naming the connection, the reason and the bytes for the
//! host that were dropped. A guest can open and break connections at will,
//! so the lines are rate-limited per device, and the next line that gets
//! through says how many were held back.

use std::time::{Duration, Instant};

/// Lines let through in one window.
const BURST: u32 = 20;
/// The window.
const WINDOW: Duration = Duration::from_secs(10);

/// Where lines go: the VMM's standard error (its `vmm.log`), or a test's
/// collector.
pub(super) type Sink = Box<dyn FnMut(&str) + Send>;

/// A rate-limited log for one device.
pub(super) struct ConnLog {
    sink: Sink,
    window_start: Option<Instant>,
    in_window: u32,
    suppressed: u64,
}

impl std::fmt::Debug for ConnLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnLog")
            .field("in_window", &self.in_window)
            .field("suppressed", &self.suppressed)
            .finish_non_exhaustive()
    }
}

impl ConnLog {
    /// Lines go to standard error, prefixed as the VMM's other lines are.
    pub(super) fn stderr() -> Self {
        Self::with_sink(Box::new(|line| eprintln!("forkd-vmm: vsock: {line}")))
    }

    pub(super) fn with_sink(sink: Sink) -> Self {
        ConnLog {
            sink,
            window_start: None,
            in_window: 0,
            suppressed: 0,
        }
    }

    /// Logs `line` unless this window's lines are spent.
    pub(super) fn line(&mut self, line: std::fmt::Arguments<'_>) {
        self.line_at(Instant::now(), line);
    }

    fn line_at(&mut self, now: Instant, line: std::fmt::Arguments<'_>) {
        match self.window_start {
            Some(start) if now.duration_since(start) < WINDOW => {}
            _ => {
                self.window_start = Some(now);
                self.in_window = 0;
            }
        }
        if self.in_window >= BURST {
            self.suppressed += 1;
            return;
        }
        self.in_window += 1;
        if self.suppressed > 0 {
            let held = std::mem::take(&mut self.suppressed);
            (self.sink)(&format!(
                "{line} ({held} earlier connection events not logged: more than {BURST} in {} s)",
                WINDOW.as_secs()
            ));
        } else {
            (self.sink)(&line.to_string());
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
    fn a_burst_is_cut_and_the_next_window_counts_what_was_held() {
        let (mut log, lines) = collecting();
        let t0 = Instant::now();
        for i in 0..(BURST + 7) {
            log.line_at(
                t0 + Duration::from_millis(u64::from(i)),
                format_args!("event {i}"),
            );
        }
        {
            let l = lines.lock().unwrap();
            assert_eq!(l.len(), BURST as usize);
            assert_eq!(l[0], "event 0");
        }
        log.line_at(t0 + WINDOW + Duration::from_secs(1), format_args!("later"));
        let l = lines.lock().unwrap();
        assert_eq!(l.len(), BURST as usize + 1);
        assert!(
            l.last()
                .unwrap()
                .starts_with("later (7 earlier connection events not logged"),
            "{l:?}"
        );
    }
}
