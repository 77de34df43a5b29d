//! Many requests at once: spawn, ping every child, kill them all.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::ProgressBar;
use proto::api::{SandboxInfo, SpawnRequest};
use serde::Serialize;

use crate::client::{routes, Client};
use crate::error::CliError;
use crate::format::ms;
use crate::progress;

/// Requests in flight at once when pinging or killing many sandboxes.
pub const THREADS: usize = 16;

/// `f` over `items` on up to `threads` threads; results in the items' order.
pub fn parallel_map<T: Sync, R: Send>(
    items: &[T],
    threads: usize,
    bar: Option<&ProgressBar>,
    f: impl Fn(&T) -> R + Sync,
) -> Vec<R> {
    let next = AtomicUsize::new(0);
    let results: Vec<Mutex<Option<R>>> = items.iter().map(|_| Mutex::new(None)).collect();
    std::thread::scope(|s| {
        for _ in 0..threads.max(1).min(items.len()) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= items.len() {
                    break;
                }
                let r = f(&items[i]);
                *results[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
                if let Some(b) = bar {
                    b.inc(1);
                }
            });
        }
    });
    results
        .into_iter()
        .map(|m| {
            m.into_inner()
                .unwrap_or_else(|e| e.into_inner())
                .expect("every item was mapped")
        })
        .collect()
}

/// A request about one sandbox that failed.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Failure {
    /// The sandbox.
    pub id: String,
    /// Why.
    pub error: String,
}

/// Whether a failed ping is worth another try (the guest may not be up yet).
fn retryable(e: &CliError) -> bool {
    matches!(e.status(), Some(409 | 425 | 429 | 500..=599))
}

/// Pings `id` until it answers or `deadline`; returns when it answered.
pub fn ping_until(client: &Client, id: &str, deadline: Instant) -> Result<Instant, CliError> {
    let path = routes::sandbox_op(id, routes::SandboxOp::Ping);
    loop {
        match client.post(&path, &serde_json::json!({})) {
            Ok(_) => return Ok(Instant::now()),
            Err(e) if retryable(&e) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(e) => return Err(e),
        }
    }
}

/// Kills every sandbox in `ids`; a sandbox already gone counts as killed.
pub fn kill_all(client: &Client, ids: &[String], bar: Option<&ProgressBar>) -> Vec<Failure> {
    parallel_map(ids, THREADS, bar, |id| {
        match client.delete(&routes::sandbox(id)) {
            Ok(_) => None,
            Err(e) if e.is_not_found() => None,
            Err(e) => Some(Failure {
                id: id.clone(),
                error: e.to_string(),
            }),
        }
    })
    .into_iter()
    .flatten()
    .collect()
}

/// What a spawn-ping-kill run measured.
#[derive(Debug, Clone, Serialize)]
pub struct ForkFigures {
    /// The snapshot forked.
    pub snapshot_tag: String,
    /// Children asked for.
    pub n: u32,
    /// Children the daemon started.
    pub spawned: usize,
    /// The spawn request, wall clock.
    pub spawn_ms: f64,
    /// `spawn_ms / spawned`.
    pub spawn_per_child_ms: f64,
    /// Children that answered a ping.
    pub answered: usize,
    /// From the spawn's answer to the last child's ping answer.
    pub ping_all_ms: f64,
    /// From the spawn request to the last child's ping answer.
    pub ready_all_ms: f64,
    /// Children that did not answer.
    pub ping_failures: Vec<Failure>,
    /// Children killed.
    pub killed: usize,
    /// Killing them all, wall clock.
    pub kill_ms: f64,
    /// Children that could not be killed.
    pub kill_failures: Vec<Failure>,
}

impl ForkFigures {
    /// The run as lines for people.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "spawn   {} children of {} in {} ({} per child)\n",
            self.spawned,
            self.snapshot_tag,
            crate::format::duration(Duration::from_secs_f64(self.spawn_ms / 1e3)),
            crate::format::duration(Duration::from_secs_f64(self.spawn_per_child_ms / 1e3)),
        );
        s.push_str(&format!(
            "ping    {}/{} answered, the last {} after the spawn returned ({} from the spawn request)\n",
            self.answered,
            self.spawned,
            crate::format::duration(Duration::from_secs_f64(self.ping_all_ms / 1e3)),
            crate::format::duration(Duration::from_secs_f64(self.ready_all_ms / 1e3)),
        ));
        for f in self.ping_failures.iter().take(5) {
            s.push_str(&format!("        no answer from {}: {}\n", f.id, f.error));
        }
        s.push_str(&format!(
            "kill    {}/{} in {}\n",
            self.killed,
            self.spawned,
            crate::format::duration(Duration::from_secs_f64(self.kill_ms / 1e3)),
        ));
        for f in self.kill_failures.iter().take(5) {
            s.push_str(&format!("        could not kill {}: {}\n", f.id, f.error));
        }
        s
    }

    /// Whether every child answered and was killed.
    pub fn all_good(&self) -> bool {
        self.spawned == self.n as usize
            && self.ping_failures.is_empty()
            && self.kill_failures.is_empty()
    }
}

/// Spawns `req.n` children, pings every one (each until it answers or
/// `ping_wait` passes), keeps them running for `settle`, then kills them
/// Set by SIGTERM, SIGINT or SIGHUP while [`settle_for`] waits.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop_signal(_: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    STOP.store(true, Ordering::SeqCst);
}

/// Waits `settle` (children kept running, as upstream's `fork
/// --settle-secs`), or until SIGTERM, SIGINT or SIGHUP, whichever comes
/// first: the caller then kills the children either way.
fn settle_for(settle: Duration) {
    if settle.is_zero() {
        return;
    }
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic (async-signal-safe);
        // replacing the disposition of these signals is this process's own
        // business while it waits.
        unsafe { libc::signal(sig, on_stop_signal as *const () as libc::sighandler_t) };
    }
    let until = Instant::now() + settle;
    while Instant::now() < until && !STOP.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(50).min(until - Instant::now()));
    }
}

/// all, also when pings fail.
pub fn spawn_ping_kill(
    client: &Client,
    req: &SpawnRequest,
    ping_wait: Duration,
    settle: Duration,
    show_progress: bool,
) -> Result<ForkFigures, CliError> {
    let sp = show_progress.then(|| {
        progress::spinner(format!(
            "forking {} children of {}",
            req.n, req.snapshot_tag
        ))
    });
    let t0 = Instant::now();
    let answer = client.post(routes::SANDBOXES, req);
    let spawn = t0.elapsed();
    if let Some(sp) = sp {
        sp.finish_and_clear();
    }
    let sandboxes: Vec<SandboxInfo> = answer?.parse()?;
    let ids: Vec<String> = sandboxes.into_iter().map(|s| s.id).collect();
    let t_spawned = Instant::now();

    let bar = show_progress.then(|| progress::bar(ids.len() as u64, "ping"));
    let deadline = t_spawned + ping_wait;
    let pings = parallel_map(&ids, THREADS, bar.as_ref(), |id| {
        ping_until(client, id, deadline)
    });
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    let mut last = None::<Instant>;
    let mut ping_failures = Vec::new();
    for (id, r) in ids.iter().zip(pings) {
        match r {
            Ok(at) => last = Some(last.map_or(at, |l| l.max(at))),
            Err(e) => ping_failures.push(Failure {
                id: id.clone(),
                error: e.to_string(),
            }),
        }
    }
    let answered = ids.len() - ping_failures.len();
    let last = last.unwrap_or(t_spawned);
    settle_for(settle);

    let bar = show_progress.then(|| progress::bar(ids.len() as u64, "kill"));
    let tk = Instant::now();
    let kill_failures = kill_all(client, &ids, bar.as_ref());
    let kill = tk.elapsed();
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    let spawned = ids.len();
    Ok(ForkFigures {
        snapshot_tag: req.snapshot_tag.clone(),
        n: req.n,
        spawned,
        spawn_ms: ms(spawn),
        spawn_per_child_ms: if spawned == 0 {
            0.0
        } else {
            ms(spawn) / spawned as f64
        },
        answered,
        ping_all_ms: ms(last.saturating_duration_since(t_spawned)),
        ready_all_ms: ms(last.saturating_duration_since(t0)),
        ping_failures,
        killed: spawned - kill_failures.len(),
        kill_ms: ms(kill),
        kill_failures,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parallel_map_keeps_order_and_runs_everything() {
        let items: Vec<u32> = (0..100).collect();
        let out = parallel_map(&items, 8, None, |x| x * 2);
        assert_eq!(out, (0..100).map(|x| x * 2).collect::<Vec<_>>());
        let none: Vec<u32> = vec![];
        assert!(parallel_map(&none, 8, None, |x| *x).is_empty());
    }

    #[test]
    fn only_transient_ping_errors_are_retried() {
        let api = |status| CliError::Api {
            status,
            message: "x".into(),
        };
        assert!(retryable(&api(503)));
        assert!(retryable(&api(409)));
        assert!(!retryable(&api(404)));
        assert!(!retryable(&api(401)));
        assert!(!retryable(&CliError::Other("x".into())));
    }
}
