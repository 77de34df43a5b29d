//! What is on the machine for one daemon, to check against what its API
//! lists: VMM processes (by the file their stderr goes to), directories,
//! network namespaces and cgroups named with its instance id.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use super::Daemon;

/// The processes whose standard error is a file under `dir` (every VMM of
/// a sandbox writes its `vmm.log` there).
pub fn processes_logging_under(dir: &Path) -> BTreeSet<i64> {
    let mut pids = BTreeSet::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i64>() else {
            continue;
        };
        if let Ok(target) = std::fs::read_link(entry.path().join("fd/2")) {
            let zombie = std::fs::read_to_string(entry.path().join("stat")).is_ok_and(|s| {
                s.rsplit_once(')')
                    .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
            });
            if target.starts_with(dir) && !zombie {
                pids.insert(pid);
            }
        }
    }
    pids
}

/// Names in `dir` (empty when it is not there).
pub fn names_in(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .map(|e| {
            e.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// What the API and the machine say, side by side.
#[derive(Debug, PartialEq, Eq)]
pub struct View {
    pub vmm_pids: BTreeSet<i64>,
    pub sandbox_dirs: BTreeSet<String>,
    pub snapshot_dirs: BTreeSet<String>,
    pub namespaces: BTreeSet<String>,
    pub cgroups: BTreeSet<String>,
    pub build_dirs: BTreeSet<String>,
}

/// The daemon's instance id (`GET /version`).
pub fn instance(d: &Daemon) -> String {
    d.expect("GET", "/version", None, 200)["instance"]
        .as_str()
        .expect("the daemon names its instance")
        .to_owned()
}

/// (what the API lists, what is on the machine).
pub fn views(d: &Daemon) -> (View, View) {
    let state = &d.state;
    let inst = instance(d);
    let sandboxes = d.expect("GET", "/v1/sandboxes", None, 200);
    let sandboxes = sandboxes.as_array().unwrap();
    let snapshots = d.expect("GET", "/v1/snapshots", None, 200);
    let api = View {
        vmm_pids: sandboxes
            .iter()
            .map(|s| s["pid"].as_i64().unwrap())
            .collect(),
        sandbox_dirs: sandboxes
            .iter()
            .map(|s| {
                let (batch, i) = s["id"].as_str().unwrap().rsplit_once('-').unwrap();
                format!("{batch}/{i}")
            })
            .collect(),
        snapshot_dirs: snapshots
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["tag"].as_str().unwrap().to_owned())
            .collect(),
        namespaces: sandboxes
            .iter()
            .filter_map(|s| s["netns"].as_str().map(str::to_owned))
            .collect(),
        cgroups: sandboxes
            .iter()
            .filter_map(|s| s["cgroup"].as_str())
            .map(|g| g.rsplit('/').next().unwrap().to_owned())
            .collect(),
        build_dirs: BTreeSet::new(),
    };
    let sandbox_root = state.join("sandboxes");
    let machine = View {
        vmm_pids: processes_logging_under(&sandbox_root),
        sandbox_dirs: names_in(&sandbox_root)
            .into_iter()
            .flat_map(|b| {
                names_in(&sandbox_root.join(&b))
                    .into_iter()
                    .map(move |i| format!("{b}/{i}"))
            })
            .collect(),
        snapshot_dirs: names_in(&state.join("snapshots")),
        namespaces: names_in(Path::new("/var/run/netns"))
            .into_iter()
            .filter(|n| n.starts_with(&format!("forkd-{inst}-")))
            .collect(),
        // Every hierarchy a sandbox's group may be in: a group holding a
        // process in one of them shows. (Empty ones are a fork server's,
        // made ahead for its next children.)
        cgroups: [
            "/sys/fs/cgroup/memory/forkd",
            "/sys/fs/cgroup/cpu/forkd",
            "/sys/fs/cgroup/pids/forkd",
            "/sys/fs/cgroup/forkd",
        ]
        .iter()
        .map(|root| Path::new(root).join(&inst))
        .flat_map(|group| {
            names_in(&group).into_iter().filter(move |n| {
                std::fs::read_to_string(group.join(n).join("cgroup.procs"))
                    .is_ok_and(|p| !p.trim().is_empty())
            })
        })
        .collect(),
        build_dirs: names_in(&state.join("run"))
            .into_iter()
            .filter(|n| n.starts_with("build-"))
            .collect(),
    };
    (api, machine)
}

/// Waits (up to 30 s) until the API's view and the machine's agree, and
/// fails showing both if they do not.
pub fn assert_agrees(d: &Daemon, when: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (api, machine) = views(d);
        if api == machine {
            return;
        }
        if Instant::now() > deadline {
            panic!(
                "{when}: the API and the machine disagree\n  api:     {api:?}\n  machine: {machine:?}\ndaemon log tail:\n{}",
                super::tail(&d.log_text(), 4000)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
