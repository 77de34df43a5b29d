//! `forkd cleanup`: what crashed runs left in a daemon's state directory.
//! Local, like `doctor`: it reads the directory and the process table,
//! never the daemon. Without `--yes` it only lists.
//!
//! Stale, and safe to remove:
//! - `snapshots/.<tag>.tmp-<pid>` and `.<tag>.measure-<pid>`: a snapshot
//!   being written, or a diff being measured, by forkd-vmm process `<pid>`,
//!   which is gone (a finished snapshot is renamed into place, a
//!   measurement removed).
//! - `run/build-<tag>-<hex>`: a source VM booted for a snapshot, which the
//!   daemon removes once the snapshot is made, when no running process
//!   names it on its command line (the source VM's forkd-vmm does).

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::args::CleanupArgs;
use crate::commands::Outcome;

/// One thing found, and why it is stale.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Stale {
    /// The directory.
    pub path: PathBuf,
    /// Why nothing needs it.
    pub why: String,
}

/// Whether process `pid` exists.
fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// The owner's pid of a temporary snapshot directory name
/// (`.<tag>.tmp-<pid>` or `.<tag>.measure-<pid>`).
pub fn temp_owner(name: &str) -> Option<u32> {
    let rest = name.strip_prefix('.')?;
    let (_, pid) = rest
        .rsplit_once(".tmp-")
        .or_else(|| rest.rsplit_once(".measure-"))?;
    pid.parse().ok()
}

/// Every running process's command line, NUL-separated arguments joined
/// with spaces.
fn command_lines() -> Vec<String> {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .collect()
}

/// What is stale under `state`, given whether a pid runs and the command
/// lines of the running processes.
pub fn find(state: &Path, alive: impl Fn(u32) -> bool, cmdlines: &[String]) -> Vec<Stale> {
    let mut found = Vec::new();
    let entries = |dir: PathBuf| {
        let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
            .map(|rd| rd.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        v.sort();
        v
    };
    for path in entries(state.join("snapshots")) {
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        if let Some(pid) = temp_owner(&name) {
            if !alive(pid) {
                found.push(Stale {
                    why: format!("a snapshot written by process {pid}, which is gone"),
                    path,
                });
            }
        }
    }
    for path in entries(state.join("run")) {
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        if !name.starts_with("build-") || !path.is_dir() {
            continue;
        }
        let text = path.to_string_lossy();
        if !cmdlines.iter().any(|c| c.contains(text.as_ref())) {
            found.push(Stale {
                why: "a source VM's directory that no running process uses".into(),
                path,
            });
        }
    }
    found
}

/// `forkd cleanup [--yes]`.
pub fn cleanup(a: &CleanupArgs, json: bool, out: &mut dyn Write) -> Outcome {
    let found = find(&a.state_dir, alive, &command_lines());
    let mut failed = Vec::new();
    if a.yes {
        for s in &found {
            if let Err(e) = std::fs::remove_dir_all(&s.path) {
                failed.push(format!("{}: {e}", s.path.display()));
            }
        }
    }
    if json {
        let v = serde_json::json!({"stale": found, "removed": a.yes, "failed": failed});
        writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(&v).expect("serializable")
        )?;
    } else if found.is_empty() {
        writeln!(out, "nothing stale in {}", a.state_dir.display())?;
    } else {
        for s in &found {
            writeln!(out, "{}  {}", s.path.display(), s.why)?;
        }
        if a.yes {
            writeln!(
                out,
                "removed {} of {}",
                found.len() - failed.len(),
                found.len()
            )?;
        } else {
            writeln!(
                out,
                "{} stale; remove them with forkd cleanup --yes",
                found.len()
            )?;
        }
    }
    for f in &failed {
        writeln!(out, "forkd: cannot remove {f}")?;
    }
    Ok(if failed.is_empty() { 0 } else { 1 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temporary_snapshot_names_say_their_owner() {
        assert_eq!(temp_owner(".b1.tmp-4242"), Some(4242));
        assert_eq!(temp_owner(".a.b.measure-7"), Some(7));
        assert_eq!(temp_owner("b1"), None);
        assert_eq!(temp_owner(".b1.tmp-x"), None);
        assert_eq!(temp_owner("b1.tmp-3"), None);
    }

    #[test]
    fn only_what_nothing_uses_is_stale() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path();
        for d in [
            "snapshots/base",
            "snapshots/.b1.tmp-100",
            "snapshots/.b2.tmp-200",
            "snapshots/.b3.measure-100",
            "run/build-x-aaaa",
            "run/build-y-bbbb",
        ] {
            std::fs::create_dir_all(state.join(d)).unwrap();
        }
        std::fs::write(state.join("run/build-z.log"), "").unwrap();
        let running = format!(
            "forkd-vmm run --control-socket {}/run/build-y-bbbb/control.sock",
            state.display()
        );
        let found = find(state, |pid| pid == 200, &[running]);
        let paths: Vec<String> = found
            .iter()
            .map(|s| s.path.strip_prefix(state).unwrap().display().to_string())
            .collect();
        assert_eq!(
            paths,
            [
                "snapshots/.b1.tmp-100",
                "snapshots/.b3.measure-100",
                "run/build-x-aaaa"
            ]
        );
    }
}
