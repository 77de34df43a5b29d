//! The pool of children made ahead (`fork-server --pool N`): parking,
//! handing out, refilling, and each parked child's link.

use std::collections::VecDeque;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use proto::control::Limits;

use super::cgroup::Group;
use super::child::{idle_is_reversible, pooled_child, set_scheduler};
use super::forker::{close_all, make_child_dir, Forker};
use super::order::{link_pair, read_link, send_order, LinkNews};
#[cfg(test)]
use super::order::{READY, RUN_AHEAD_REFUSED};
use super::reaper::restore_child_signals;
use super::{BoxError, ChildOptions, MAX_CHILDREN};

/// Children forked ahead of requests, each parked with its restore prepared.
pub(super) struct Pool {
    /// How many to keep.
    target: usize,
    /// Where pooled children make their directories ahead (`<pid>/`).
    staging: PathBuf,
    /// Oldest first (the likeliest to be ready).
    pub(super) parked: VecDeque<Parked>,
    /// When a parked child last died without being handed out: refills
    /// slow down after that, so a restore that cannot succeed (its
    /// snapshot gone, KVM refusing) does not turn into a fork loop.
    last_loss: Option<Instant>,
    /// Pooled children prepare at `SCHED_IDLE` (this process may raise a
    /// thread back from it).
    idle_prepare: bool,
    /// New pooled children make their `console.log` ahead too: the last
    /// request that took pooled children asked for one (the daemon's do).
    stage_console: bool,
    /// The links of children handed out that do not run yet (each closes
    /// its end once its machine runs), and since when the oldest waits.
    starting: Vec<OwnedFd>,
    starting_since: Option<Instant>,
    /// No refill before this: the children handed out last are up and
    /// taking their first requests.
    settle_until: Option<Instant>,
    /// Children handed out since the pool last refilled.
    handed_out: usize,
    /// The cgroup limits new pooled children's groups get: the last
    /// request's (the daemon's are its defaults, mostly).
    pub(super) limits: Limits,
    /// Groups of parked children that died, not removable yet (their
    /// process was still leaving them): tried again at the next look.
    stale_groups: Vec<Group>,
    /// New pooled children run an idle built-in guest ahead to its first
    /// wait; false once one could not (its guest met a device on the way:
    /// the snapshot's state, so the same for every child of it).
    run_ahead: bool,
}

/// One parked child.
pub(super) struct Parked {
    pid: i32,
    /// The server's end of the child's link: the order goes here, and its
    /// closing (the server gone) tells a parked child to exit.
    pub(super) link: OwnedFd,
    /// It said it is ready: restore prepared, directory staged.
    ready: bool,
    /// Its cgroup (it joined it first thing), and the limits it has.
    group: Option<(Group, Limits)>,
}

/// What the pool wants of the server's loop.
pub(super) enum Refill {
    /// A child now.
    Now,
    /// A child, but not before this wait (a parked child died lately).
    After(Duration),
    /// Nothing: the pool is full.
    No,
}

/// Pause between refills after a parked child died unasked.
pub(super) const REFILL_BACKOFF: Duration = Duration::from_secs(1);

/// Longest a refill waits for the children handed out to run.
pub(super) const STARTING_WAIT: Duration = Duration::from_secs(1);

/// How often the server looks whether the children handed out run.
pub(super) const STARTING_LOOK: Duration = Duration::from_millis(5);

/// How long a refill waits after those children run, per child: about
/// what a child's first answer costs in CPU on the development machine
/// (0.3-0.4 ms), halved for its two cores.
pub(super) const SETTLE_PER_CHILD: Duration = Duration::from_micros(200);

/// Most a refill waits after the children handed out run.
pub(super) const MAX_SETTLE: Duration = Duration::from_millis(200);

impl Pool {
    /// A pool of `target` children staging their directories in `staging`
    /// (made afresh; whatever a server before this one left there goes).
    pub(super) fn new(target: usize, staging: PathBuf) -> Result<Self, BoxError> {
        // Absolute: a jailed child's directory is bound at its own path.
        let staging = std::path::absolute(&staging)
            .map_err(|e| format!("the pool's staging directory {}: {e}", staging.display()))?;
        if target > 0 {
            let _ = std::fs::remove_dir_all(&staging);
            std::fs::create_dir_all(&staging)
                .and_then(|()| crate::jail::let_through(&staging))
                .map_err(|e| {
                    format!(
                        "cannot create the pool's staging directory {}: {e}",
                        staging.display()
                    )
                })?;
        }
        Ok(Pool {
            target,
            staging,
            parked: VecDeque::with_capacity(target),
            last_loss: None,
            // A jailed child may not leave SCHED_IDLE by itself (no
            // CAP_SYS_NICE, and RLIMIT_NICE cannot be raised without
            // CAP_SYS_RESOURCE): this server raises each of its threads
            // when it hands it out (`raise`).
            idle_prepare: target > 0 && idle_is_reversible(),
            stage_console: false,
            starting: Vec::new(),
            starting_since: None,
            settle_until: None,
            handed_out: 0,
            limits: Limits::default(),
            stale_groups: Vec::new(),
            run_ahead: true,
        })
    }

    /// Lets the parked children go (their links close: they remove their
    /// staged directories and exit) and removes the staging directory and
    /// their cgroups, trying for a while: a child may still be making its
    /// directory, which it cannot do once the staging directory is gone,
    /// and leaves its group only as it exits.
    pub(super) fn remove_staging(&mut self) {
        let parked = std::mem::take(&mut self.parked);
        self.stale_groups
            .extend(parked.into_iter().filter_map(|p| p.group.map(|(g, _)| g)));
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let staged = self.target == 0
                || std::fs::remove_dir_all(&self.staging).is_ok()
                || !self.staging.exists();
            self.stale_groups.retain(|g| !g.remove());
            if (staged && self.stale_groups.is_empty()) || Instant::now() >= deadline {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub(super) fn refill_wanted(&self) -> Refill {
        if self.parked.len() >= self.target {
            return Refill::No;
        }
        // A refill waits for the children just handed out: the forks, KVM
        // VMs and files it makes run at SCHED_IDLE but in long stretches of
        // kernel code that a kernel without preemption does not cut short,
        // so they would delay those children on their way to answering.
        // Their links are looked at every STARTING_LOOK, not waited on: one
        // wake-up of the server per child would cost the children CPU.
        if let Some(since) = self.starting_since {
            let waited = since.elapsed();
            if waited < STARTING_WAIT {
                return Refill::After((STARTING_WAIT - waited).min(STARTING_LOOK));
            }
        }
        if let Some(until) = self.settle_until {
            let now = Instant::now();
            if now < until {
                return Refill::After(until - now);
            }
        }
        match self.last_loss.map(|t| t.elapsed()) {
            Some(since) if since < REFILL_BACKOFF => Refill::After(REFILL_BACKOFF - since),
            _ => Refill::Now,
        }
    }

    /// The server's ends of every link, for a new child to close.
    pub(super) fn links(&self) -> Vec<RawFd> {
        self.parked
            .iter()
            .map(|p| p.link.as_raw_fd())
            .chain(self.starting.iter().map(|l| l.as_raw_fd()))
            .collect()
    }

    /// Drops the links of children handed out that closed them (they run,
    /// or died), in one poll without waiting; when none is left, the
    /// refill waits a little longer, for the first requests those children
    /// take (the daemon's first ping follows the answer at once).
    pub(super) fn check_started(&mut self) {
        if self.starting.is_empty() {
            return;
        }
        let mut fds: Vec<libc::pollfd> = self
            .starting
            .iter()
            .map(|l| libc::pollfd {
                fd: l.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: `fds` is a valid array of pollfd of the length given; no wait.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 0) };
        if n > 0 {
            for i in (0..fds.len()).rev() {
                if fds[i].revents != 0 && matches!(read_link(&self.starting[i]), LinkNews::Closed) {
                    self.starting.swap_remove(i);
                }
            }
        }
        self.update_starting();
    }

    /// After a change to `starting`: start or end the wait for it.
    fn update_starting(&mut self) {
        if !self.starting.is_empty() {
            if self
                .starting_since
                .is_some_and(|t| t.elapsed() >= STARTING_WAIT)
            {
                // Stuck children do not hold the pool empty for ever.
                self.starting.clear();
            } else {
                self.starting_since.get_or_insert_with(Instant::now);
                return;
            }
        }
        if self.starting_since.take().is_some() {
            let settle = SETTLE_PER_CHILD * self.handed_out.min(MAX_CHILDREN as usize) as u32;
            self.settle_until = Some(Instant::now() + settle.min(MAX_SETTLE));
            self.handed_out = 0;
        }
    }

    /// Reads what the parked children at `indices` (of `parked`,
    /// ascending) said: that they are ready, or (their link closed) that
    /// they died, which drops them.
    pub(super) fn check(&mut self, indices: &[usize]) {
        for &i in indices.iter().rev() {
            // Everything there is: its "ready" may be followed by its end.
            loop {
                match read_link(&self.parked[i].link) {
                    LinkNews::Ready => self.parked[i].ready = true,
                    LinkNews::RunAheadRefused => {
                        if std::mem::replace(&mut self.run_ahead, false) {
                            eprintln!(
                                "forkd-vmm fork-server: pooled child {} could not run its guest \
                                 ahead to its first wait (it met a device on the way); pooled \
                                 children of this snapshot start without running ahead",
                                self.parked[i].pid
                            );
                        }
                    }
                    LinkNews::Nothing => break,
                    LinkNews::Closed => {
                        let gone = self.parked.remove(i).expect("an index of parked");
                        eprintln!(
                            "forkd-vmm fork-server: pooled child {} ended before it was asked for",
                            gone.pid
                        );
                        let _ = std::fs::remove_dir_all(self.staging.join(gone.pid.to_string()));
                        self.stale_groups.extend(gone.group.map(|(g, _)| g));
                        self.last_loss = Some(Instant::now());
                        break;
                    }
                }
            }
        }
    }

    /// Reads what every parked child said since the last look, without
    /// waiting.
    pub(super) fn refresh(&mut self) {
        let said: Vec<usize> = (0..self.parked.len())
            .filter(|&i| {
                let mut fd = libc::pollfd {
                    fd: self.parked[i].link.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd; no wait.
                unsafe { libc::poll(&mut fd, 1, 0) > 0 }
            })
            .collect();
        self.check(&said);
    }

    /// Forks one more parked child (whose restore is prepared in the
    /// child, in parallel with whatever the server does next).
    pub(super) fn add_one(&mut self, forker: &Forker, close_in_child: &[RawFd]) {
        self.stale_groups.retain(|g| !g.remove());
        let group = match forker.cgroups.as_ref().map(|c| c.make(&self.limits)) {
            None => None,
            Some(Ok(g)) => Some(g),
            Some(Err(e)) => {
                eprintln!("forkd-vmm fork-server: cannot make a pooled child's cgroup: {e}");
                self.last_loss = Some(Instant::now());
                return;
            }
        };
        let (ours, theirs) = match link_pair() {
            Ok(pair) => pair,
            Err(e) => {
                eprintln!("forkd-vmm fork-server: cannot make a pooled child's link: {e}");
                self.stale_groups.extend(group);
                self.last_loss = Some(Instant::now());
                return;
            }
        };
        // The fork itself and the child from its first instruction run
        // where nothing else wants the CPU: a refill right after an answer
        // must not slow the children just handed out.
        if self.idle_prepare {
            let _ = set_scheduler(0, libc::SCHED_IDLE);
        }
        // SAFETY: this process is single-threaded (checked when the Forker
        // was made), so the child is a complete copy of it and may go on
        // running Rust code.
        let pid = unsafe { libc::fork() };
        if self.idle_prepare && pid != 0 {
            if let Err(e) = set_scheduler(0, libc::SCHED_OTHER) {
                eprintln!("forkd-vmm fork-server: cannot leave SCHED_IDLE: {e}");
            }
        }
        match pid {
            -1 => {
                eprintln!(
                    "forkd-vmm fork-server: cannot fork a pooled child: {}",
                    std::io::Error::last_os_error()
                );
                self.stale_groups.extend(group);
                self.last_loss = Some(Instant::now());
            }
            0 => {
                if let Some(group) = &group {
                    if let Err(e) = group.enter() {
                        eprintln!("forkd-vmm pooled child: {e}");
                        std::process::exit(2);
                    }
                }
                restore_child_signals();
                close_all(close_in_child);
                close_all(&self.links());
                drop(ours);
                std::process::exit(pooled_child(
                    forker,
                    theirs,
                    self.idle_prepare,
                    &self.staging,
                    self.stage_console,
                    self.run_ahead,
                ))
            }
            pid => self.parked.push_back(Parked {
                pid,
                link: ours,
                ready: false,
                group: group.map(|g| (g, self.limits)),
            }),
        }
    }

    /// Hands a parked child the child directory `dir`: the oldest ready
    /// one, whose staged directory becomes `dir` by a rename, or else the
    /// oldest one, for which `dir` and its control socket are made here.
    /// Its cgroup, if any, gets `limits` first. Its pid and group's
    /// name, or None when the pool is empty.
    pub(super) fn hand_out(
        &mut self,
        forker: &Forker,
        dir: &Path,
        options: ChildOptions,
        netns: Option<&str>,
        limits: &Limits,
    ) -> Result<Option<(i32, Option<String>)>, BoxError> {
        self.stage_console = options.console_log;
        self.limits = *limits;
        if self.parked.is_empty() {
            return Ok(None);
        }
        // A parked child may not enter the namespace: its taps are
        // attached here, once, before any child is touched (a failure
        // leaves the pool as it was; an order that cannot be sent does
        // not use them up).
        let taps = forker.open_taps(netns)?;
        while !self.parked.is_empty() {
            let at = self.parked.iter().position(|p| p.ready).unwrap_or(0);
            let parked = self.parked.remove(at).expect("an index of parked");
            if let (Some((group, had)), Some(cgroups)) = (&parked.group, &forker.cgroups) {
                // Dropped on an error: the child sees its link close and
                // exits; its group goes once it has.
                if let Err(e) = cgroups.change(group, had, limits, Some(parked.pid)) {
                    self.stale_groups.push(group.clone());
                    return Err(e.into());
                }
            }
            if self.idle_prepare {
                // A child still preparing finishes at normal priority (it
                // raises itself when it reads the order, too late for that,
                // and not at all when jailed).
                raise(parked.pid);
            }
            let staged = self.staging.join(parked.pid.to_string());
            // An empty directory in the way is replaced; anything else
            // (files in it, another file system) takes the slower way.
            let renamed = parked.ready && std::fs::rename(&staged, dir).is_ok();
            let listener = if renamed {
                None
            } else {
                let listener = make_child_dir(dir)?;
                if crate::jail::on() {
                    // The jailed child writes its files there.
                    let id = crate::jail::id_of(parked.pid);
                    std::os::unix::fs::chown(dir, Some(id), Some(id))?;
                }
                Some(listener)
            };
            if crate::jail::on() && !renamed {
                // Its jail holds its staged directory (which, renamed, is
                // its final one: it goes on using the staged path); one
                // made for it here is bound in before it learns the path.
                if let Err(e) = jailfs::bind_into(parked.pid, dir) {
                    let _ = std::fs::remove_dir_all(dir);
                    let _ = std::fs::remove_dir_all(&staged);
                    self.stale_groups.extend(parked.group.map(|(g, _)| g));
                    return Err(e.into());
                }
            }
            match send_order(
                &parked.link,
                dir,
                options,
                netns,
                listener.as_ref().map(|l| l.as_fd()),
                &taps,
            ) {
                // The child closes its end once it runs.
                Ok(()) => {
                    if !renamed {
                        // Not the child's to remove when jailed (the
                        // staging directory is this server's).
                        let _ = std::fs::remove_dir_all(&staged);
                    }
                    self.starting.push(parked.link);
                    self.handed_out += 1;
                    self.update_starting();
                    return Ok(Some((parked.pid, parked.group.map(|(g, _)| g.name))));
                }
                // It died since the last look (EPIPE, ECONNRESET): the next one.
                Err(e) => {
                    eprintln!(
                        "forkd-vmm fork-server: pooled child {} cannot take a request: {e}",
                        parked.pid
                    );
                    let _ = std::fs::remove_dir_all(if renamed { dir } else { &staged });
                    self.stale_groups.extend(parked.group.map(|(g, _)| g));
                }
            }
        }
        Ok(None)
    }
}

/// Puts every thread of pooled child `pid` back at `SCHED_OTHER`: its
/// main thread first (threads it starts from then on inherit that), then
/// each one it started while idle.
fn raise(pid: libc::pid_t) {
    let _ = set_scheduler(pid, libc::SCHED_OTHER);
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return;
    };
    for tid in tasks.filter_map(|t| t.ok()?.file_name().to_str()?.parse().ok()) {
        if tid != pid {
            let _ = set_scheduler(tid, libc::SCHED_OTHER);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pooled child that says its guest could not be run ahead, then
    /// ends: the pool drops it and runs no later child's guest ahead.
    #[test]
    fn a_refused_run_ahead_stops_running_ahead_for_later_children() {
        let staging = std::env::temp_dir().join(format!("forkd-pool-test-{}", std::process::id()));
        let mut pool = Pool::new(2, staging.clone()).unwrap();
        assert!(pool.run_ahead);
        let (ours, theirs) = link_pair().unwrap();
        pool.parked.push_back(Parked {
            pid: 1,
            link: ours,
            ready: false,
            group: None,
        });
        let (ready_ours, ready_theirs) = link_pair().unwrap();
        pool.parked.push_back(Parked {
            pid: 2,
            link: ready_ours,
            ready: false,
            group: None,
        });
        for (link, byte) in [(&theirs, RUN_AHEAD_REFUSED), (&ready_theirs, READY)] {
            // SAFETY: a one-byte buffer on an open socket.
            let sent = unsafe { libc::send(link.as_raw_fd(), [byte].as_ptr().cast(), 1, 0) };
            assert_eq!(sent, 1);
        }
        drop(theirs);
        pool.check(&[0, 1]);
        assert!(
            !pool.run_ahead,
            "later children start without running ahead"
        );
        assert_eq!(pool.parked.len(), 1, "the refusing child is gone");
        assert!(pool.parked[0].ready, "its sibling stays, ready");
        let _ = std::fs::remove_dir_all(&staging);
    }
}
