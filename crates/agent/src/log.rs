//! Logging to stderr (the console when the agent is PID 1). Never panics:
//! a failed log write is dropped.

/// Writes one line, prefixed with `forkd-agent: `, to stderr.
macro_rules! log {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), "forkd-agent: {}", format_args!($($arg)*));
    }};
}
pub(crate) use log;
