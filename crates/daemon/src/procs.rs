//! Processes the daemon tracks by pid: is it still the process we started,
//! stopping it, reaping it and knowing how it ended, and finding the ones
//! no record names by where they log.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use proto::control::ChildExit;

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

/// Makes `dir` (which must not exist) for a snapshot the jailed VMM of
/// pid `pid` writes: it may not make one in the snapshot store itself, so
/// it gets it empty and its own (its uid is known from its pid, whether or
/// not it has dropped root yet), and puts the snapshot together inside.
/// The VMM sees nothing of the host but its own directory, so `dir` is
/// bound into its jail too ([`jailfs::bind_into`]).
pub fn hand_over(dir: &Path, pid: i32) -> std::io::Result<()> {
    let id = proto::control::jail_id(pid);
    std::fs::create_dir(dir)?;
    std::os::unix::fs::chown(dir, Some(id), Some(id))?;
    jailfs::bind_into(pid, dir)
}

/// Gives a snapshot a jailed VMM wrote ([`hand_over`]) back to root, its
/// directory and every file in it, and takes it out of the jail of `pid`
/// (when that VMM still runs): the VMM, which runs on, may no longer
/// change what other sandboxes fork from.
pub fn take_back(dir: &Path, pid: i32) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        std::os::unix::fs::lchown(entry?.path(), Some(0), Some(0))?;
    }
    std::os::unix::fs::chown(dir, Some(0), Some(0))?;
    jailfs::unbind_from(pid, dir)
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

/// Makes this process the reaper of its descendants' orphans: a VMM whose
/// fork server died is re-parented here (not to init), so its exit status
/// still reaches the daemon ([`reap`]).
pub fn become_subreaper() -> std::io::Result<()> {
    // SAFETY: PR_SET_CHILD_SUBREAPER takes an integer flag; no memory.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Reaps `pid` if it is a child of this process that started at `ticks`
/// and has ended, and says how it ended; `None` when it runs, or is not
/// this process's child. Never waits for any other process: the daemon's
/// own commands are waited for by whoever started them, and the start
/// time tells a VMM from one of them that reused its pid (a zombie keeps
/// its pid and start time until it is reaped).
pub fn reap(pid: i32, ticks: u64) -> Option<ChildExit> {
    if pid <= 0 || start_ticks(pid) != Some(ticks) {
        return None;
    }
    let mut status = 0;
    // SAFETY: waitpid on one positive pid with WNOHANG writes only
    // `status`, a valid i32.
    let got = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
    (got == pid)
        .then(|| ChildExit::from_wait_status(pid, status))
        .flatten()
}

/// Every child of this process (from each thread's
/// `/proc/self/task/<tid>/children`: an orphan is re-parented to a thread
/// of its subreaper).
pub fn children() -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return out;
    };
    for task in tasks.flatten() {
        if let Ok(text) = std::fs::read_to_string(task.path().join("children")) {
            out.extend(
                text.split_whitespace()
                    .filter_map(|p| p.parse::<i32>().ok()),
            );
        }
    }
    out
}

/// The name (`comm`) and state letter of process `pid`.
pub fn name_and_state(pid: i32) -> Option<(String, char)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let name = stat.get(open + 1..close)?.to_owned();
    let state = stat[close + 1..]
        .split_whitespace()
        .next()?
        .chars()
        .next()?;
    Some((name, state))
}

/// A process found by where its stderr goes: every forkd-vmm the daemon
/// starts logs to a file in its own directory (`<dir>/vmm.log`, or a fork
/// server's `run/<name>.fork.log`), so the log names the process's owner
/// even when no record does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Found {
    /// Its pid.
    pub pid: i32,
    /// Its start time (clock ticks after boot).
    pub ticks: u64,
    /// Its stderr's file.
    pub log: PathBuf,
}

/// Every live process whose stderr is a file under one of `roots`.
pub fn logging_under(roots: &[&Path]) -> Vec<Found> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    let me = std::process::id() as i32;
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(log) = std::fs::read_link(format!("/proc/{pid}/fd/2")) else {
            continue;
        };
        if !roots.iter().any(|r| log.starts_with(r)) {
            continue;
        }
        if let Some(ticks) = start_ticks(pid).filter(|&t| alive(pid, t)) {
            out.push(Found { pid, ticks, log });
        }
    }
    out
}

/// Kills `pid` (if it is still the process that started at `ticks`) and
/// reaps it when it is this process's child.
pub fn kill_and_reap(pid: i32, ticks: u64) {
    kill(pid, ticks, Duration::from_secs(5));
    let deadline = Instant::now() + Duration::from_millis(200);
    // A child of a fork server that still runs is reaped by it: this only
    // waits for it to be gone.
    while reap(pid, ticks).is_none() && start_ticks(pid) == Some(ticks) && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// How a VMM ended as its fork server (or the daemon) recorded it in its
/// directory; `None` when nobody did, or the record is not `pid`'s.
pub fn exit_record(dir: &Path, pid: i32) -> Option<ChildExit> {
    use std::io::Read;
    let mut text = Vec::new();
    std::fs::File::open(dir.join(proto::control::EXIT_FILE))
        .ok()?
        .take(4096)
        .read_to_end(&mut text)
        .ok()?;
    serde_json::from_slice::<ChildExit>(&text)
        .ok()
        .filter(|e| e.pid == pid)
}

/// Writes `exit` as `dir`'s exit record (atomically: a temporary file,
/// then a rename), unless one is there already.
pub fn write_exit_record(dir: &Path, exit: &ChildExit) {
    let path = dir.join(proto::control::EXIT_FILE);
    if path.exists() {
        return;
    }
    let tmp = dir.join(format!(".{}.tmp", proto::control::EXIT_FILE));
    let text = serde_json::to_vec(exit).expect("an exit record serialises");
    if std::fs::write(&tmp, text).is_ok() {
        let _ = std::fs::rename(&tmp, &path);
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

    #[test]
    fn a_killed_child_is_reaped_with_its_signal_and_found_by_its_log() {
        let dir = std::env::temp_dir().join(format!("forkd-procs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("vmm.log");
        let child = std::process::Command::new("sleep")
            .arg("60")
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let ticks = start_ticks(pid).unwrap();
        assert!(children().contains(&pid));
        let found = logging_under(&[&dir]);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!((found[0].pid, found[0].ticks), (pid, ticks));
        assert_eq!(found[0].log, log);
        assert!(logging_under(&[Path::new("/nonexistent")]).is_empty());
        assert_eq!(reap(pid, ticks), None, "it runs");
        assert_eq!(reap(pid, ticks + 1), None, "not that process");
        // SAFETY: signalling our own child.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let deadline = Instant::now() + Duration::from_secs(5);
        let exit = loop {
            if let Some(exit) = reap(pid, ticks) {
                break exit;
            }
            assert!(Instant::now() < deadline, "not reaped");
            std::thread::sleep(Duration::from_millis(5));
        };
        assert_eq!(exit.signal, Some(libc::SIGKILL));
        assert_eq!(exit.code, None);
        // Recorded once, read back only for its own pid.
        write_exit_record(&dir, &exit);
        write_exit_record(
            &dir,
            &ChildExit {
                pid,
                code: Some(0),
                signal: None,
            },
        );
        assert_eq!(exit_record(&dir, pid), Some(exit));
        assert_eq!(exit_record(&dir, pid + 1), None);
        std::mem::forget(child);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
