//! Processes the daemon tracks by pid: is it still the process we started,
//! and stopping it.

use std::path::Path;
use std::time::{Duration, Instant};

/// The start time of process `pid` in clock ticks after boot (field 22 of
/// `/proc/<pid>/stat`), or `None` when there is no such process. A pid plus
/// its start time names one process even after the pid is reused.
pub fn start_ticks(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_start_ticks(&stat)
}

/// Field 22 of a `/proc/<pid>/stat` line. The command name (field 2) is in
/// parentheses and may itself hold spaces and parentheses, so fields are
/// counted after the last `)`.
fn parse_start_ticks(stat: &str) -> Option<u64> {
    let after = &stat[stat.rfind(')')? + 1..];
    // After the name come field 3 (state) onwards: 22 is the 20th of those.
    after.split_whitespace().nth(19)?.parse().ok()
}

/// Whether the process `pid` that started at `ticks` still runs (a zombie
/// counts as gone).
pub fn alive(pid: i32, ticks: u64) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat
        .rfind(')')
        .and_then(|i| stat[i + 1..].split_whitespace().next());
    parse_start_ticks(&stat) == Some(ticks) && !matches!(state, Some("Z") | Some("X"))
}

/// Sends SIGKILL to `pid` if it is still the process that started at
/// `ticks`, then waits (bounded) for it to be gone.
pub fn kill(pid: i32, ticks: u64, wait: Duration) {
    if !alive(pid, ticks) {
        return;
    }
    // SAFETY: kill has no memory-safety preconditions; the start-time check
    // above makes it very unlikely the pid was reused in between.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let deadline = Instant::now() + wait;
    while alive(pid, ticks) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Waits until `path` exists, polling; false at the deadline.
pub fn wait_for_path(path: &Path, wait: Duration) -> bool {
    let deadline = Instant::now() + wait;
    loop {
        if path.exists() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The last `max` bytes of a log file, for error messages.
pub fn log_tail(path: &Path, max: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let start = bytes.len().saturating_sub(max);
            String::from_utf8_lossy(&bytes[start..]).trim().to_string()
        }
        Err(_) => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_ticks_skip_a_name_with_spaces_and_parens() {
        let line =
            "123 (a) b (c)) S 1 123 123 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 98765 1000 10";
        assert_eq!(parse_start_ticks(line), Some(98765));
        assert_eq!(parse_start_ticks("garbage"), None);
    }

    #[test]
    fn this_process_is_alive_and_a_wrong_start_time_is_not() {
        let me = std::process::id() as i32;
        let ticks = start_ticks(me).unwrap();
        assert!(alive(me, ticks));
        assert!(!alive(me, ticks + 1));
        assert_eq!(start_ticks(-5), None);
    }

    #[test]
    fn kill_ends_a_child() {
        let mut child = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let ticks = start_ticks(pid).unwrap();
        let waiter = std::thread::spawn(move || child.wait());
        kill(pid, ticks, Duration::from_secs(5));
        assert!(!waiter.join().unwrap().unwrap().success());
        assert!(!alive(pid, ticks));
    }
}
