//! Diagnostics: the library logs through `tracing` (forkd-vmm writes it to
//! standard error, its `vmm.log`; `FORKD_LOG` sets the level), never with a
//! bare `eprintln!`. What a guest can make happen at will (a failing disk
//! request, a device activated wrongly, a connection closed) is logged
//! through a [`RateLimit`], so a guest cannot fill the host's disk with
//! the VMM's log.

use std::time::{Duration, Instant};

/// Lets at most `burst` events through per `window` and counts the rest,
/// so the next one let through can say how many were held back.
#[derive(Debug)]
pub struct RateLimit {
    burst: u32,
    window: Duration,
    window_start: Option<Instant>,
    in_window: u32,
    suppressed: u64,
}

impl RateLimit {
    /// 20 events per 10 s: enough to see what happens, too few to flood.
    pub const fn per_device() -> Self {
        Self::new(20, Duration::from_secs(10))
    }

    /// `burst` events per `window`.
    pub const fn new(burst: u32, window: Duration) -> Self {
        RateLimit {
            burst,
            window,
            window_start: None,
            in_window: 0,
            suppressed: 0,
        }
    }

    /// Whether an event now may be logged: `Some(n)` with the events held
    /// back since the last one let through, `None` when this one is held.
    pub fn admit(&mut self) -> Option<u64> {
        self.admit_at(Instant::now())
    }

    /// [`RateLimit::admit`] at a given time.
    pub fn admit_at(&mut self, now: Instant) -> Option<u64> {
        match self.window_start {
            Some(start) if now.duration_since(start) < self.window => {}
            _ => {
                self.window_start = Some(now);
                self.in_window = 0;
            }
        }
        if self.in_window >= self.burst {
            self.suppressed += 1;
            return None;
        }
        self.in_window += 1;
        Some(std::mem::take(&mut self.suppressed))
    }

    /// What the window is, for a message that explains a gap.
    pub fn describe(&self) -> String {
        format!(
            "more than {} in {} s",
            self.burst,
            self.window.as_secs_f32()
        )
    }
}

/// Logs a warning through `limit`, adding how many were held back before it.
#[macro_export]
macro_rules! warn_limited {
    ($limit:expr, $($arg:tt)+) => {
        if let Some(held) = $limit.admit() {
            if held > 0 {
                let why = $limit.describe();
                tracing::warn!("{} ({held} similar events not logged: {why})", format_args!($($arg)+));
            } else {
                tracing::warn!($($arg)+);
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_is_cut_and_the_next_window_counts_what_was_held() {
        let mut l = RateLimit::new(3, Duration::from_secs(10));
        let t0 = Instant::now();
        let admitted: Vec<_> = (0..5)
            .map(|i| l.admit_at(t0 + Duration::from_millis(i)))
            .collect();
        assert_eq!(admitted, [Some(0), Some(0), Some(0), None, None]);
        assert_eq!(l.admit_at(t0 + Duration::from_secs(11)), Some(2));
        assert_eq!(l.admit_at(t0 + Duration::from_secs(11)), Some(0));
    }
}
