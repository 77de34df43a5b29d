//! Where sandboxes' cgroups go, and what the daemon does with them.
//!
//! Every sandbox's VMM is in a group of its own, under the daemon's group
//! `forkd/<instance>` of each hierarchy that holds a controller forkd
//! limits: memory, cpu, pids, io (v1: blkio). On a unified (v2) hierarchy that is one
//! mount; on v1 each controller has its own (this host's development
//! machine: `/sys/fs/cgroup/{memory,cpu,pids}`), and the group of a
//! sandbox has the same name under each. The fork server makes the groups
//! and its children join them before their guests run (`forkd-vmm
//! fork-server --cgroup-parent`); the daemon makes the daemon's groups,
//! hands their paths to fork servers, reads a group's OOM kills, and
//! removes groups with their sandboxes. The daemon itself, and its fork
//! servers, stay in the groups they were started in, apart from the
//! sandboxes'.

use std::path::{Path, PathBuf};

/// A group could not be made or set up.
#[derive(Debug, thiserror::Error)]
#[error("cannot set up the cgroup at {}: {source}", path.display())]
pub struct Error {
    /// The file or directory.
    pub path: PathBuf,
    /// Why.
    #[source]
    pub source: std::io::Error,
}

/// A controller whose limits a sandbox may have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Controller {
    /// `memory_limit_mib`.
    Memory,
    /// `cpu_limit`, and the weight by vCPUs.
    Cpu,
    /// `pids_limit`.
    Pids,
    /// `io_limit_mibps` (v2 `io`, v1 `blkio`).
    Io,
}

impl Controller {
    /// Every controller, memory first: the group recorded for a sandbox
    /// is its memory group when there is one (where OOM kills are read).
    pub const ALL: [Controller; 4] = [
        Controller::Memory,
        Controller::Cpu,
        Controller::Pids,
        Controller::Io,
    ];

    /// Its name in v2's `cgroup.controllers` and `cgroup.subtree_control`.
    pub fn name(self) -> &'static str {
        match self {
            Controller::Memory => "memory",
            Controller::Cpu => "cpu",
            Controller::Pids => "pids",
            Controller::Io => "io",
        }
    }

    /// Its name as a v1 mount's option in `/proc/mounts`.
    pub fn v1_name(self) -> &'static str {
        match self {
            Controller::Io => "blkio",
            c => c.name(),
        }
    }
}

/// One mounted hierarchy forkd uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    /// Where it is mounted.
    pub dir: PathBuf,
    /// cgroup v2 (unified).
    pub v2: bool,
    /// The controllers forkd uses from it.
    pub controllers: Vec<Controller>,
}

/// The hierarchies that hold the controllers forkd uses on this host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hierarchy {
    /// Memory's first, when it has one.
    pub mounts: Vec<Mount>,
}

impl Hierarchy {
    /// This host's, or None when it has none of the controllers.
    pub fn detect() -> Option<Hierarchy> {
        let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
        Self::from_mounts(&mounts, |dir| {
            std::fs::read_to_string(dir.join("cgroup.controllers")).ok()
        })
    }

    /// The hierarchies `mounts` (as `/proc/self/mounts` says them) hold;
    /// `controllers(dir)` reads a v2 mount's `cgroup.controllers`. A
    /// controller available on v2 is taken from there, else from the v1
    /// mount that has it (a host may mix them).
    pub fn from_mounts(
        mounts: &str,
        controllers: impl Fn(&Path) -> Option<String>,
    ) -> Option<Hierarchy> {
        let mut v2: Option<Mount> = None;
        let mut v1: Vec<Mount> = Vec::new();
        for line in mounts.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [_, dir, fstype, options, ..] = fields[..] else {
                continue;
            };
            let dir = PathBuf::from(unescape_mount(dir));
            match fstype {
                "cgroup2" if v2.is_none() => {
                    let text = controllers(&dir).unwrap_or_default();
                    let have: Vec<&str> = text.split_whitespace().collect();
                    let used: Vec<Controller> = Controller::ALL
                        .into_iter()
                        .filter(|c| have.contains(&c.name()))
                        .collect();
                    if !used.is_empty() {
                        v2 = Some(Mount {
                            dir,
                            v2: true,
                            controllers: used,
                        });
                    }
                }
                "cgroup" => {
                    let opts: Vec<&str> = options.split(',').collect();
                    let used: Vec<Controller> = Controller::ALL
                        .into_iter()
                        .filter(|c| opts.contains(&c.v1_name()))
                        .collect();
                    if !used.is_empty() {
                        v1.push(Mount {
                            dir,
                            v2: false,
                            controllers: used,
                        });
                    }
                }
                _ => {}
            }
        }
        let mut mounts: Vec<Mount> = v2.into_iter().collect();
        for mut m in v1 {
            m.controllers
                .retain(|c| !mounts.iter().any(|o| o.controllers.contains(c)));
            if !m.controllers.is_empty() {
                mounts.push(m);
            }
        }
        let memory_first = |m: &Mount| !m.controllers.contains(&Controller::Memory);
        mounts.sort_by_key(memory_first);
        (!mounts.is_empty()).then_some(Hierarchy { mounts })
    }

    /// Whether `c` is here.
    pub fn has(&self, c: Controller) -> bool {
        self.mounts.iter().any(|m| m.controllers.contains(&c))
    }

    /// The group holding the sandboxes of the daemon whose instance id is
    /// `instance`, in each hierarchy: `forkd/<instance>`, so a daemon
    /// reconciles only its own. Memory's first.
    pub fn daemon_groups(&self, instance: &str) -> Vec<PathBuf> {
        self.mounts
            .iter()
            .map(|m| m.dir.join("forkd").join(instance))
            .collect()
    }

    /// Makes the daemon's groups (`daemon_groups`), and on v2 hands the
    /// controllers down to them: a controller reaches a group's children
    /// only when every level above enables it (the root, which an init
    /// system such as systemd has done already and a bare host not,
    /// `forkd` and the daemon's own group). Returns the controllers that
    /// could not be handed down (a v2 controller may be refused, e.g.
    /// cpu while a real-time task is in a group below), with why; those
    /// are then not available.
    pub fn prepare(&mut self, instance: &str) -> Result<Vec<(Controller, Error)>, Error> {
        let mut refused = Vec::new();
        for m in &mut self.mounts {
            let group = m.dir.join("forkd").join(instance);
            if !m.v2 {
                std::fs::create_dir_all(&group).map_err(|e| cg_err(&group, e))?;
                continue;
            }
            let levels = [m.dir.clone(), m.dir.join("forkd"), group];
            for (i, level) in levels.iter().enumerate() {
                if i > 0 && !level.exists() {
                    std::fs::create_dir(level).map_err(|e| cg_err(level, e))?;
                }
                let ctl = level.join("cgroup.subtree_control");
                let on = std::fs::read_to_string(&ctl).map_err(|e| cg_err(&ctl, e))?;
                let mut kept = Vec::new();
                for c in std::mem::take(&mut m.controllers) {
                    if on.split_whitespace().any(|x| x == c.name()) {
                        kept.push(c);
                        continue;
                    }
                    match std::fs::write(&ctl, format!("+{}", c.name())) {
                        Ok(()) => kept.push(c),
                        Err(e) => refused.push((c, cg_err(&ctl, e))),
                    }
                }
                m.controllers = kept;
            }
        }
        self.mounts.retain(|m| !m.controllers.is_empty());
        Ok(refused)
    }

    /// A sandbox's group named `name` in each hierarchy.
    pub fn groups(&self, instance: &str, name: &str) -> Vec<PathBuf> {
        self.daemon_groups(instance)
            .into_iter()
            .map(|g| g.join(name))
            .collect()
    }
}

/// The whole disk (`major`, `minor`) that holds the file system of
/// `path`, as a cgroup's I/O cap names it (the kernel throttles disks, not
/// partitions); `None` when that file system is on no block device (a
/// tmpfs, an overlay) or sysfs does not say.
pub fn disk_of(path: &Path) -> Option<(u32, u32)> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(path).ok()?.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let sys = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
    if !sys.exists() {
        return None;
    }
    if !sys.join("partition").exists() {
        return Some((major, minor));
    }
    // A partition's directory sits in its disk's.
    let disk = std::fs::read_to_string(sys.join("../dev")).ok()?;
    let (ma, mi) = disk.trim().split_once(':')?;
    Some((ma.parse().ok()?, mi.parse().ok()?))
}

/// `/proc/self/mounts` writes a space in a path as `\040` (and a tab,
/// newline and backslash as their octal codes).
fn unescape_mount(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    let mut rest = field;
    while let Some(at) = rest.find('\\') {
        out.push_str(&rest[..at]);
        let code = rest.get(at + 1..at + 4);
        match code.and_then(|c| u8::from_str_radix(c, 8).ok()) {
            Some(b) => {
                out.push(b as char);
                rest = &rest[at + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[at + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// How many times the kernel's OOM killer killed a process of the group
/// at `dir` (cgroup v2 `memory.events`, v1 `memory.oom_control`: both say
/// `oom_kill N`); `None` when the file does not say.
pub fn oom_kills(dir: &Path) -> Option<u64> {
    ["memory.events", "memory.oom_control"]
        .iter()
        .find_map(|f| std::fs::read_to_string(dir.join(f)).ok())
        .and_then(|text| oom_kill_count(&text))
}

fn oom_kill_count(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|n| n.trim().parse().ok())
}

/// The processes in the group at `dir`.
pub fn procs(dir: &Path) -> Vec<i32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// The sandbox groups under a daemon's group.
pub fn groups_under(daemon_group: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(daemon_group)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

/// What the API shows of a sandbox's recorded group: its path inside
/// every hierarchy, `forkd/<instance>/<group>`.
pub fn shown(recorded: &Path) -> Option<String> {
    let parts: Vec<&str> = recorded
        .iter()
        .rev()
        .take(3)
        .map(|c| c.to_str())
        .collect::<Option<_>>()?;
    match parts[..] {
        [name, instance, "forkd"] => Some(format!("forkd/{instance}/{name}")),
        _ => None,
    }
}

/// Removes the group a sandbox's record names (its memory group, or its
/// first) and the groups of the same name beside it in the other
/// hierarchies of `hierarchy`.
pub fn remove_sandbox_group(hierarchy: Option<&Hierarchy>, recorded: &Path) {
    let sibling = |mount: &Mount| -> Option<PathBuf> {
        let inside = recorded.strip_prefix(&mount.dir).ok()?;
        Some(inside.to_owned())
    };
    let inside = hierarchy.and_then(|h| h.mounts.iter().find_map(sibling));
    match (hierarchy, inside) {
        (Some(h), Some(inside)) => {
            for m in &h.mounts {
                remove(&m.dir.join(&inside));
            }
        }
        _ => remove(recorded),
    }
}

/// Removes a sandbox's group once its processes are gone. A process that
/// has just been killed leaves the group a moment after it stops running
/// (EBUSY until then), so this retries for up to a second; a group that
/// still holds a process after that stays, and the log says so.
pub fn remove(dir: &Path) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e)
                if e.raw_os_error() == Some(libc::EBUSY)
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            Err(e) => {
                tracing::warn!("cannot remove cgroup {}: {e}", dir.display());
                return;
            }
        }
    }
}

fn cg_err(path: &Path, source: std::io::Error) -> Error {
    Error {
        path: path.to_owned(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oom_kills_are_read_from_either_version() {
        let v2 = "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\noom_group_kill 0\n";
        let v1 = "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n";
        assert_eq!(oom_kill_count(v2), Some(1));
        assert_eq!(oom_kill_count(v1), Some(2));
        assert_eq!(oom_kill_count("oom 1\n"), None);
    }

    #[test]
    fn the_disk_of_a_tmpfs_is_none_and_of_a_disk_its_whole_disk() {
        assert_eq!(disk_of(Path::new("/proc")), None);
        assert_eq!(disk_of(Path::new("/dev/shm")), None);
        // Whatever holds / here, if a block device, is a whole disk.
        if let Some((major, minor)) = disk_of(Path::new("/")) {
            let sys = format!("/sys/dev/block/{major}:{minor}");
            assert!(Path::new(&sys).exists() && !Path::new(&sys).join("partition").exists());
        }
    }

    /// This development host's mounts: v1 controllers, and an empty v2
    /// hierarchy beside them.
    const HYBRID: &str = "\
tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0
cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0
cgroup /sys/fs/cgroup/cpuacct cgroup rw,relatime,cpuacct 0 0
cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0
cgroup /sys/fs/cgroup/pids cgroup rw,relatime,pids 0 0
cgroup /sys/fs/cgroup/systemd cgroup rw,relatime,name=systemd 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
";

    #[test]
    fn hierarchies_are_read_from_the_mounts_memory_first() {
        let h = Hierarchy::from_mounts(HYBRID, |_| Some(String::new())).unwrap();
        let dirs: Vec<&Path> = h.mounts.iter().map(|m| m.dir.as_path()).collect();
        assert_eq!(
            dirs,
            [
                "/sys/fs/cgroup/memory",
                "/sys/fs/cgroup/cpu",
                "/sys/fs/cgroup/pids"
            ]
            .map(Path::new)
        );
        assert!(h.mounts.iter().all(|m| !m.v2 && m.controllers.len() == 1));
        assert_eq!(
            h.groups("i1", "vmm-7-0")[2],
            Path::new("/sys/fs/cgroup/pids/forkd/i1/vmm-7-0")
        );

        // Unified: one mount, what its cgroup.controllers lists.
        let unified = "cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid 0 0\n";
        let h = Hierarchy::from_mounts(unified, |_| Some("cpuset cpu io memory pids\n".into()))
            .unwrap();
        assert_eq!(h.mounts.len(), 1);
        assert!(h.mounts[0].v2);
        assert_eq!(h.mounts[0].controllers, Controller::ALL);

        // Mixed: v2 holds memory, v1 the rest; a v1 mount of a
        // controller v2 has is not used.
        let mixed = "cgroup2 /cg2 cgroup2 rw 0 0\ncgroup /cg1/cpu,cpuacct cgroup rw,cpu,cpuacct 0 0\ncgroup /cg1/memory cgroup rw,memory 0 0\n";
        let h = Hierarchy::from_mounts(mixed, |_| Some("memory".into())).unwrap();
        assert_eq!(h.mounts.len(), 2);
        assert_eq!(h.mounts[0].dir, Path::new("/cg2"));
        assert_eq!(h.mounts[1].dir, Path::new("/cg1/cpu,cpuacct"));
        assert_eq!(h.mounts[1].controllers, [Controller::Cpu]);
        assert!(!h.has(Controller::Pids));

        assert_eq!(
            Hierarchy::from_mounts("proc /proc proc rw 0 0\n", |_| None),
            None
        );
        assert_eq!(
            shown(Path::new("/sys/fs/cgroup/memory/forkd/i1/vmm-7-0")).as_deref(),
            Some("forkd/i1/vmm-7-0")
        );
        assert_eq!(shown(Path::new("/elsewhere/x")), None);
        assert_eq!(
            unescape_mount(r"/sys/fs/cgroup/with\040space\\x"),
            r"/sys/fs/cgroup/with space\\x"
        );
    }
}
