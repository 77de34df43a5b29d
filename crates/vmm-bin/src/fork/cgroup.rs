//! A cgroup per child (`fork-server --cgroup-parent DIR`, once per
//! hierarchy): the server makes the group and writes its limits, and the
//! child joins it as the first thing it does, before it prepares or runs
//! anything, so all it uses is counted there.
//!
//! What it costs (bench/RESULTS.md): making a group and joining it are
//! the dear steps (a `mkdir` and, above all, a migration, each a few
//! hundred microseconds on cgroup v1), writing a limit is cheap. A pooled
//! child does both while it is made, ahead of requests, with the limits
//! of the last request; handing it out writes only the limits a request
//! changes. A child forked when asked (no pool, or a memfd child) takes
//! one of a few groups the server makes between requests
//! ([`SPARE_GROUPS`]), so its request pays for its migration only.

use std::path::{Path, PathBuf};

use proto::control::Limits;

/// The CFS period the CPU quota is a share of.
const CPU_PERIOD_US: u64 = 100_000;

/// Groups kept made ahead for children forked when asked: a request for
/// one child (the common case without a pool) finds its group ready.
pub(super) const SPARE_GROUPS: usize = 4;

/// One parent directory (a daemon's group in one hierarchy), and which
/// limits its groups can take.
#[derive(Debug)]
struct Parent {
    dir: PathBuf,
    v2: bool,
    memory: bool,
    cpu: bool,
    pids: bool,
    /// v2 `io`, v1 `blkio` (its throttle files).
    io: bool,
}

impl Parent {
    fn open(dir: &Path) -> Result<Parent, String> {
        if !dir.is_dir() {
            return Err(format!(
                "--cgroup-parent {}: not a directory of a mounted cgroup hierarchy",
                dir.display()
            ));
        }
        // v2: a group's controllers are those its parent hands down.
        let v2 = dir.join("cgroup.controllers").exists();
        let (memory, cpu, pids, io) = if v2 {
            let on = std::fs::read_to_string(dir.join("cgroup.subtree_control")).map_err(|e| {
                format!("cannot read {}/cgroup.subtree_control: {e}", dir.display())
            })?;
            let on = |c: &str| on.split_whitespace().any(|x| x == c);
            (on("memory"), on("cpu"), on("pids"), on("io"))
        } else {
            let has = |f: &str| dir.join(f).exists();
            (
                has("memory.limit_in_bytes"),
                has("cpu.cfs_quota_us"),
                has("pids.max"),
                has("blkio.throttle.write_bps_device"),
            )
        };
        Ok(Parent {
            dir: dir.to_owned(),
            v2,
            memory,
            cpu,
            pids,
            io,
        })
    }

    /// A v1 blkio mount and nothing else: a group is made there only for
    /// a child with a disk cap. Joining another v1 hierarchy is one more
    /// migration per child (about 1 ms a sandbox in a spawn of 100
    /// through the API here), which a child without a cap need not pay.
    fn only_for_io(&self) -> bool {
        !self.v2 && self.io && !self.memory && !self.cpu && !self.pids
    }

    /// The files and values that give a group `limits` (None: unlimited),
    /// and its CPU weight by `vcpus`, for the controllers this parent has.
    fn settings(&self, limits: &Limits, vcpus: u64) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        let or_max = |v: Option<u64>, max: &str| v.map_or(max.to_owned(), |v| v.to_string());
        if self.memory {
            let bytes = limits.memory_mib.map(|m| m.saturating_mul(1 << 20));
            if self.v2 {
                out.push(("memory.max", or_max(bytes, "max")));
            } else {
                out.push(("memory.limit_in_bytes", or_max(bytes, "-1")));
            }
        }
        if self.cpu {
            let quota = limits
                .cpu_millis
                .map(|m| (u64::from(m) * CPU_PERIOD_US / 1000).max(1000));
            if self.v2 {
                out.push((
                    "cpu.max",
                    format!("{} {CPU_PERIOD_US}", or_max(quota, "max")),
                ));
                out.push(("cpu.weight", (100 * vcpus).clamp(1, 10_000).to_string()));
            } else {
                out.push(("cpu.cfs_period_us", CPU_PERIOD_US.to_string()));
                out.push(("cpu.cfs_quota_us", or_max(quota, "-1")));
                out.push(("cpu.shares", (1024 * vcpus).clamp(2, 262_144).to_string()));
            }
        }
        if self.pids {
            out.push(("pids.max", or_max(limits.pids, "max")));
        }
        if let (true, Some(io)) = (self.io, limits.io) {
            out.extend(self.io_settings(io.major, io.minor, Some(io.bytes_per_sec)));
        }
        out
    }

    /// The files and values that cap (or, `None`, uncap) disk bandwidth on
    /// `major:minor`.
    fn io_settings(&self, major: u32, minor: u32, bps: Option<u64>) -> Vec<(&'static str, String)> {
        if self.v2 {
            let b = bps.map_or("max".to_owned(), |b| b.to_string());
            vec![("io.max", format!("{major}:{minor} rbps={b} wbps={b}"))]
        } else {
            // v1 takes 0 as "no rule for this device".
            let b = bps.unwrap_or(0);
            vec![
                (
                    "blkio.throttle.read_bps_device",
                    format!("{major}:{minor} {b}"),
                ),
                (
                    "blkio.throttle.write_bps_device",
                    format!("{major}:{minor} {b}"),
                ),
            ]
        }
    }
}

/// The server's parents; each child's group has the same name in each.
#[derive(Debug)]
pub(super) struct Cgroups {
    parents: Vec<Parent>,
    /// The snapshot's vCPUs: the CPU weight.
    vcpus: u64,
    /// Names are `vmm-<server pid>-<n>`.
    prefix: String,
    next: std::cell::Cell<u64>,
    /// Groups made ahead, with the limits they were made with.
    spare: std::cell::RefCell<Vec<(Group, Limits)>>,
}

impl Cgroups {
    /// Groups under `parents`, for children of a guest with `vcpus`.
    pub(super) fn new(parents: &[PathBuf], vcpus: u64) -> Result<Option<Cgroups>, String> {
        if parents.is_empty() {
            return Ok(None);
        }
        Ok(Some(Cgroups {
            parents: parents
                .iter()
                .map(|p| Parent::open(p))
                .collect::<Result<_, _>>()?,
            vcpus,
            prefix: format!("vmm-{}", std::process::id()),
            next: std::cell::Cell::new(0),
            spare: Default::default(),
        }))
    }

    /// Refuses `limits` that no parent's controllers can apply.
    pub(super) fn check(&self, limits: &Limits) -> Result<(), String> {
        let has = |f: fn(&Parent) -> bool| self.parents.iter().any(f);
        for (asked, present, what) in [
            (limits.memory_mib.is_some(), has(|p| p.memory), "memory"),
            (limits.cpu_millis.is_some(), has(|p| p.cpu), "cpu"),
            (limits.pids.is_some(), has(|p| p.pids), "pids"),
            (limits.io.is_some(), has(|p| p.io), "io"),
        ] {
            if asked && !present {
                return Err(format!(
                    "a {what} limit was asked for, and no --cgroup-parent has the {what} controller"
                ));
            }
        }
        Ok(())
    }

    /// Makes a new group with `limits` under every parent (under a
    /// blkio-only parent, only with a disk cap: [`Parent::only_for_io`]).
    pub(super) fn make(&self, limits: &Limits) -> Result<Group, String> {
        self.check(limits)?;
        let n = self.next.get();
        self.next.set(n + 1);
        let group = Group {
            name: format!("{}-{n}", self.prefix),
            dirs: self
                .parents
                .iter()
                .map(|p| p.dir.join(format!("{}-{n}", self.prefix)))
                .collect(),
        };
        for (parent, dir) in self.parents.iter().zip(&group.dirs) {
            if parent.only_for_io() && limits.io.is_none() {
                continue;
            }
            if let Err(e) = make_group_dir(parent, dir, limits, self.vcpus) {
                group.remove();
                return Err(e);
            }
        }
        Ok(group)
    }

    /// A group with `limits` for a child forked now: a spare one when
    /// there is one (its limits changed where they differ), else a new
    /// one. A spare that cannot be used (removed meanwhile: a restarted
    /// daemon removes empty groups) is dropped for a new one.
    pub(super) fn take(&self, limits: &Limits) -> Result<Group, String> {
        self.check(limits)?;
        let spare = self.spare.borrow_mut().pop();
        if let Some((group, had)) = spare {
            let made = |(p, d): (&Parent, &PathBuf)| d.is_dir() || p.only_for_io();
            if self.change(&group, &had, limits, None).is_ok()
                && self.parents.iter().zip(&group.dirs).all(made)
            {
                return Ok(group);
            }
            group.remove();
        }
        self.make(limits)
    }

    /// Makes spare groups with `limits` up to [`SPARE_GROUPS`]; those
    /// made with other limits are kept (taking one changes them).
    pub(super) fn make_spares(&self, limits: &Limits) {
        while self.spare.borrow().len() < SPARE_GROUPS {
            match self.make(limits) {
                Ok(group) => self.spare.borrow_mut().push((group, *limits)),
                Err(e) => {
                    eprintln!("forkd-vmm fork-server: cannot make a cgroup ahead: {e}");
                    return;
                }
            }
        }
    }

    /// Removes the spare groups (the server is ending).
    pub(super) fn remove_spares(&self) {
        for (group, _) in self.spare.borrow_mut().drain(..) {
            group.remove();
        }
    }

    /// Changes `group`'s limits from `from` to `to`: only the files whose
    /// value differs are written. A blkio-only group made now for a disk
    /// cap takes process `member` (the group's child, already running)
    /// when given; a child not forked yet joins it itself.
    pub(super) fn change(
        &self,
        group: &Group,
        from: &Limits,
        to: &Limits,
        member: Option<libc::pid_t>,
    ) -> Result<(), String> {
        if from == to {
            return Ok(());
        }
        self.check(to)?;
        for (parent, dir) in self.parents.iter().zip(&group.dirs) {
            if parent.only_for_io() && !dir.is_dir() {
                if to.io.is_some() {
                    make_group_dir(parent, dir, to, self.vcpus)?;
                    if let Some(pid) = member {
                        std::fs::write(dir.join("cgroup.procs"), pid.to_string()).map_err(|e| {
                            format!("cannot move process {pid} into {}: {e}", dir.display())
                        })?;
                    }
                }
                continue;
            }
            let before = parent.settings(from, self.vcpus);
            let mut after = parent.settings(to, self.vcpus);
            // A cap on a device no longer capped (or capped on another)
            // is lifted first: `to` alone does not name that device.
            if let (true, Some(was)) = (parent.io, from.io) {
                if to
                    .io
                    .is_none_or(|now| (now.major, now.minor) != (was.major, was.minor))
                {
                    let lift = parent.io_settings(was.major, was.minor, None);
                    after.splice(0..0, lift);
                }
            }
            for (file, value) in after {
                if before.contains(&(file, value.clone())) {
                    continue;
                }
                std::fs::write(dir.join(file), &value)
                    .map_err(|e| format!("cannot set {}/{file} to {value}: {e}", dir.display()))?;
            }
        }
        Ok(())
    }
}

/// Makes group directory `dir` under `parent` with `limits`.
fn make_group_dir(parent: &Parent, dir: &Path, limits: &Limits, vcpus: u64) -> Result<(), String> {
    std::fs::create_dir(dir)
        .map_err(|e| format!("cannot make the cgroup {}: {e}", dir.display()))?;
    for (file, value) in parent.settings(limits, vcpus) {
        std::fs::write(dir.join(file), &value)
            .map_err(|e| format!("cannot set {}/{file} to {value}: {e}", dir.display()))?;
    }
    Ok(())
}

/// One child's group, by name under each parent.
#[derive(Debug, Clone)]
pub(super) struct Group {
    pub(super) name: String,
    dirs: Vec<PathBuf>,
}

impl Group {
    /// Moves the calling process (all its threads) into the group (where
    /// it is made: a blkio-only part is made only for a disk cap).
    pub(super) fn enter(&self) -> Result<(), String> {
        for dir in self.dirs.iter().filter(|d| d.is_dir()) {
            // "0" is the writer itself.
            std::fs::write(dir.join("cgroup.procs"), "0")
                .map_err(|e| format!("cannot join the cgroup {}: {e}", dir.display()))?;
        }
        Ok(())
    }

    /// Removes the group, once its process is gone; false when some part
    /// could not be removed yet (a process that has just exited may hold
    /// it a moment longer: EBUSY).
    pub(super) fn remove(&self) -> bool {
        let mut all = true;
        for dir in &self.dirs {
            match std::fs::remove_dir(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(_) => all = false,
            }
        }
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parent(v2: bool) -> Parent {
        Parent {
            dir: "/cg".into(),
            v2,
            memory: true,
            cpu: true,
            pids: true,
            io: true,
        }
    }

    #[test]
    fn limits_become_each_version_s_files() {
        let limits = Limits {
            memory_mib: Some(256),
            cpu_millis: Some(500),
            pids: Some(128),
            io: Some(proto::control::IoLimit {
                major: 254,
                minor: 0,
                bytes_per_sec: 4 << 20,
            }),
        };
        let v2 = parent(true).settings(&limits, 2);
        assert_eq!(
            v2,
            [
                ("memory.max", "268435456".to_owned()),
                ("cpu.max", "50000 100000".to_owned()),
                ("cpu.weight", "200".to_owned()),
                ("pids.max", "128".to_owned()),
                ("io.max", "254:0 rbps=4194304 wbps=4194304".to_owned()),
            ]
        );
        assert!(parent(false).settings(&limits, 1).ends_with(&[
            ("blkio.throttle.read_bps_device", "254:0 4194304".to_owned()),
            (
                "blkio.throttle.write_bps_device",
                "254:0 4194304".to_owned()
            ),
        ]));
        let v1 = parent(false).settings(&Limits::default(), 1);
        assert_eq!(
            v1,
            [
                ("memory.limit_in_bytes", "-1".to_owned()),
                ("cpu.cfs_period_us", "100000".to_owned()),
                ("cpu.cfs_quota_us", "-1".to_owned()),
                ("cpu.shares", "1024".to_owned()),
                ("pids.max", "max".to_owned()),
            ]
        );
        // The kernel's least quota is 1 ms.
        let tiny = Limits {
            cpu_millis: Some(1),
            ..Limits::default()
        };
        assert!(parent(false)
            .settings(&tiny, 1)
            .contains(&("cpu.cfs_quota_us", "1000".to_owned())));
    }

    #[test]
    fn a_disk_cap_lifted_or_moved_is_lifted_on_its_old_device() {
        let dir = std::env::temp_dir().join(format!("forkd-cg-io-{}", std::process::id()));
        let group_dir = dir.join("vmm-1-0");
        std::fs::create_dir_all(&group_dir).unwrap();
        let cg = Cgroups {
            parents: vec![Parent {
                dir: dir.clone(),
                ..parent(true)
            }],
            vcpus: 1,
            prefix: "vmm-1".into(),
            next: std::cell::Cell::new(0),
            spare: Default::default(),
        };
        let group = Group {
            name: "vmm-1-0".into(),
            dirs: vec![group_dir.clone()],
        };
        let cap = |major, bps| Limits {
            io: Some(proto::control::IoLimit {
                major,
                minor: 0,
                bytes_per_sec: bps,
            }),
            ..Limits::default()
        };
        let io_max = || std::fs::read_to_string(group_dir.join("io.max")).unwrap();
        cg.change(&group, &Limits::default(), &cap(8, 1024), None)
            .unwrap();
        assert_eq!(io_max(), "8:0 rbps=1024 wbps=1024");
        // Lifted: written as no cap on that device (the kernel keeps a
        // line per device).
        cg.change(&group, &cap(8, 1024), &Limits::default(), None)
            .unwrap();
        assert_eq!(io_max(), "8:0 rbps=max wbps=max");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_blkio_only_group_is_made_for_a_disk_cap_only() {
        let base = std::env::temp_dir().join(format!("forkd-cg-lazy-{}", std::process::id()));
        let (memory, blkio) = (base.join("memory"), base.join("blkio"));
        std::fs::create_dir_all(&memory).unwrap();
        std::fs::create_dir_all(&blkio).unwrap();
        let cg = Cgroups {
            parents: vec![
                Parent {
                    dir: memory.clone(),
                    io: false,
                    cpu: false,
                    pids: false,
                    ..parent(false)
                },
                Parent {
                    dir: blkio.clone(),
                    memory: false,
                    cpu: false,
                    pids: false,
                    ..parent(false)
                },
            ],
            vcpus: 1,
            prefix: "vmm-1".into(),
            next: std::cell::Cell::new(0),
            spare: Default::default(),
        };
        let group = cg.make(&Limits::default()).unwrap();
        assert!(memory.join(&group.name).is_dir());
        assert!(!blkio.join(&group.name).exists(), "no cap, no blkio group");
        let cap = Limits {
            io: Some(proto::control::IoLimit {
                major: 254,
                minor: 0,
                bytes_per_sec: 1 << 20,
            }),
            ..Limits::default()
        };
        cg.change(&group, &Limits::default(), &cap, None).unwrap();
        let write = blkio
            .join(&group.name)
            .join("blkio.throttle.write_bps_device");
        assert_eq!(std::fs::read_to_string(write).unwrap(), "254:0 1048576");
        let _ = std::fs::remove_dir_all(&base);
    }

    #[test]
    fn a_limit_without_its_controller_is_refused() {
        let cg = Cgroups {
            parents: vec![Parent {
                memory: false,
                ..parent(false)
            }],
            vcpus: 1,
            prefix: "vmm-1".into(),
            next: std::cell::Cell::new(0),
            spare: Default::default(),
        };
        let memory = Limits {
            memory_mib: Some(64),
            ..Limits::default()
        };
        let e = cg.check(&memory).unwrap_err();
        assert!(
            e.contains("no --cgroup-parent has the memory controller"),
            "{e}"
        );
        assert!(cg
            .check(&Limits {
                pids: Some(64),
                ..Limits::default()
            })
            .is_ok());
    }
}
