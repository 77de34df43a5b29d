//! `forkd quickstart`: snapshot a guest (or reuse the snapshot), fork N
//! children, ping every one, print the times, kill them; with a daemon of
//! its own for the run when none answers at the URL.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use proto::api::{CreateSnapshot, SnapshotDetail, SnapshotInfo, SnapshotStatus, SpawnRequest};
use serde::Serialize;

use crate::args::QuickstartArgs;
use crate::client::{routes, Client, ClientOptions};
use crate::commands::{snapshot_timeout, Outcome};
use crate::error::CliError;
use crate::fanout::{spawn_ping_kill, ForkFigures};
use crate::format::{duration, ms};
use crate::progress;

/// Tag of the built-in guest's quickstart snapshot.
pub const BUILTIN_TAG: &str = "quickstart-builtin";
/// Tag of the Linux image's quickstart snapshot.
pub const LINUX_TAG: &str = "quickstart-linux";

/// The executable `name` next to the running `forkd`.
pub fn sibling(name: &str) -> Result<PathBuf, CliError> {
    let exe = std::env::current_exe()
        .map_err(|e| CliError::Other(format!("cannot tell where forkd is: {e}")))?;
    let dir = exe.parent().unwrap_or(Path::new("."));
    let p = dir.join(name);
    if p.is_file() {
        Ok(p)
    } else {
        Err(CliError::Other(format!(
            "{name} is not next to forkd (looked for {}): build it with \
             `cargo build --release --workspace`, or start a daemon yourself and set FORKD_URL",
            p.display()
        )))
    }
}

/// A loopback port nothing listens on (at the time of asking).
pub fn free_port() -> Result<u16, CliError> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| CliError::Other(format!("no free loopback port: {e}")))?;
    Ok(l.local_addr()
        .map_err(|e| CliError::Other(e.to_string()))?
        .port())
}

/// The last `n` lines of a file, indented (or why it cannot be read).
pub fn log_tail(path: &Path, n: usize) -> String {
    match std::fs::read(path) {
        Ok(b) => {
            let text = String::from_utf8_lossy(&b);
            let lines: Vec<&str> = text.lines().collect();
            let start = lines.len().saturating_sub(n);
            if lines.is_empty() {
                "  (empty)".into()
            } else {
                lines[start..]
                    .iter()
                    .map(|l| format!("  {l}"))
                    .collect::<Vec<_>>()
                    .join("\n")
            }
        }
        Err(e) => format!("  (cannot read it: {e})"),
    }
}

/// A forkd-daemon this process started; stopped (SIGTERM, then a wait)
/// when dropped.
pub struct LocalDaemon {
    child: Option<Child>,
    /// Where it serves.
    pub url: String,
    /// Its standard output and error.
    pub log: PathBuf,
}

impl LocalDaemon {
    /// Starts `bin serve --bind 127.0.0.1:<free port> --state-dir DIR` with
    /// its output in `log`, and waits up to `wait` for `/healthz`.
    pub fn start(
        bin: &Path,
        state_dir: &Path,
        log: &Path,
        wait: Duration,
    ) -> Result<Self, CliError> {
        let port = free_port()?;
        let bind = format!("127.0.0.1:{port}");
        let out = File::create(log).map_err(|e| {
            CliError::Other(format!(
                "cannot write the daemon log {}: {e}",
                log.display()
            ))
        })?;
        let err = out
            .try_clone()
            .map_err(|e| CliError::Other(e.to_string()))?;
        let child = Command::new(bin)
            .arg("serve")
            .arg("--bind")
            .arg(&bind)
            .arg("--state-dir")
            .arg(state_dir)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| CliError::Other(format!("cannot start {}: {e}", bin.display())))?;
        let mut d = LocalDaemon {
            child: Some(child),
            url: format!("http://{bind}"),
            log: log.to_path_buf(),
        };
        d.wait_healthy(wait)?;
        Ok(d)
    }

    fn wait_healthy(&mut self, wait: Duration) -> Result<(), CliError> {
        let probe = Client::new(&ClientOptions {
            url: self.url.clone(),
            token: None,
            ca_cert: None,
            timeout: Duration::from_secs(1),
        })?;
        let deadline = Instant::now() + wait;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    return Err(CliError::Other(format!(
                        "forkd-daemon exited ({status}) before it answered; the end of its log ({}):\n{}",
                        self.log.display(),
                        log_tail(&self.log, 20)
                    )));
                }
            }
            if probe.get(routes::HEALTHZ).is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                self.stop();
                return Err(CliError::Other(format!(
                    "forkd-daemon did not answer {}/healthz within {} s; the end of its log ({}):\n{}",
                    self.url,
                    wait.as_secs(),
                    self.log.display(),
                    log_tail(&self.log, 20)
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, then up to 20 s for it to exit, then SIGKILL. Idempotent.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        // SAFETY: signalling our own child, which has not been reaped.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for LocalDaemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What a quickstart measured.
#[derive(Debug, Serialize)]
pub struct QuickstartFigures {
    /// The daemon used.
    pub daemon_url: String,
    /// Whether quickstart started it for the run.
    pub daemon_started: bool,
    /// `builtin` or `linux`.
    pub guest: &'static str,
    /// Whether the snapshot was there already.
    pub snapshot_reused: bool,
    /// How long making it took (absent when reused).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot_ms: Option<f64>,
    /// Guest RAM, when the daemon says.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mem_mib: Option<u64>,
    /// Spawn, ping, kill.
    #[serde(flatten)]
    pub fork: ForkFigures,
}

impl QuickstartFigures {
    /// The figures for people.
    pub fn summary(&self) -> String {
        let guest = if self.guest == "builtin" {
            "the built-in guest"
        } else {
            "a Linux guest"
        };
        let mem = self
            .mem_mib
            .map(|m| format!(", {m} MiB"))
            .unwrap_or_default();
        let daemon = if self.daemon_started {
            format!("{} (started for this run)", self.daemon_url)
        } else {
            self.daemon_url.clone()
        };
        let snap = match self.snapshot_ms {
            Some(t) => format!(
                "snapshot {} made in {}{mem}\n",
                self.fork.snapshot_tag,
                duration(Duration::from_secs_f64(t / 1e3))
            ),
            None => format!("snapshot {} reused{mem}\n", self.fork.snapshot_tag),
        };
        format!(
            "forkd quickstart: {} children of {guest}, daemon at {daemon}\n{snap}{}",
            self.fork.n,
            self.fork.summary()
        )
    }
}

/// The snapshot to fork: reused when there and ready (unless `fresh`),
/// else made. Returns it and how long making it took.
fn ensure_snapshot(
    client: &Client,
    req: &CreateSnapshot,
    fresh: bool,
    show_progress: bool,
) -> Result<(SnapshotInfo, Option<Duration>), CliError> {
    match client.get(&routes::snapshot_info(&req.tag)) {
        Ok(a) => {
            let d: SnapshotDetail = a.parse()?;
            if !fresh && d.info.status == SnapshotStatus::Ready && d.info.bootable {
                return Ok((d.info, None));
            }
            client.delete(&routes::snapshot(&req.tag, false, false))?;
        }
        Err(e) if e.is_not_found() => {}
        Err(e) => return Err(e),
    }
    let what = if req.builtin {
        "the built-in guest"
    } else {
        "the Linux guest"
    };
    let sp = show_progress.then(|| {
        progress::spinner(format!(
            "booting {what}, waiting for its agent, snapshotting it as {}",
            req.tag
        ))
    });
    let t0 = Instant::now();
    let r = client
        .with_timeout(snapshot_timeout(client, req.boot_wait_secs))
        .post(routes::SNAPSHOTS, req);
    let took = t0.elapsed();
    if let Some(sp) = sp {
        sp.finish_and_clear();
    }
    Ok((r?.parse()?, Some(took)))
}

/// The quickstart against a daemon that answers.
fn run_against(
    client: &Client,
    a: &QuickstartArgs,
    daemon_started: bool,
    show_progress: bool,
) -> Result<QuickstartFigures, CliError> {
    let req = if a.image {
        CreateSnapshot {
            tag: LINUX_TAG.into(),
            kernel: a.kernel.clone(),
            rootfs: a.rootfs.clone(),
            mem_size_mib: a.mem_mib,
            ..Default::default()
        }
    } else {
        CreateSnapshot {
            tag: BUILTIN_TAG.into(),
            builtin: true,
            mem_size_mib: a.mem_mib,
            ..Default::default()
        }
    };
    let (info, made_in) = ensure_snapshot(client, &req, a.fresh, show_progress)?;
    let spawn = SpawnRequest {
        snapshot_tag: info.tag.clone(),
        n: a.n,
        ..SpawnRequest::default()
    };
    let ping_wait = Duration::from_secs(if a.image { 120 } else { 30 });
    let fork = spawn_ping_kill(client, &spawn, ping_wait, Duration::ZERO, show_progress)?;
    Ok(QuickstartFigures {
        daemon_url: client.base().to_string(),
        daemon_started,
        guest: if a.image { "linux" } else { "builtin" },
        snapshot_reused: made_in.is_none(),
        snapshot_ms: made_in.map(ms),
        mem_mib: info.mem_mib,
        fork,
    })
}

/// `forkd quickstart`.
pub fn quickstart(
    opts: &ClientOptions,
    a: &QuickstartArgs,
    json: bool,
    show_progress: bool,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Outcome {
    let client = Client::new(opts)?;
    let mut daemon = None;
    let client = match client
        .with_timeout(Duration::from_secs(3))
        .get(routes::HEALTHZ)
    {
        Ok(_) => client,
        Err(CliError::Unreachable { .. }) => {
            let bin = sibling("forkd-daemon")?;
            std::fs::create_dir_all(&a.state_dir).map_err(|e| {
                CliError::Other(format!(
                    "cannot make the state directory {}: {e}; set FORKD_STATE_DIR (or \
                     --state-dir) to a directory you can write",
                    a.state_dir.display()
                ))
            })?;
            let log = a.state_dir.join("quickstart-daemon.log");
            writeln!(
                err,
                "no daemon answers at {}: starting {} (state in {}, log in {})",
                client.base(),
                bin.display(),
                a.state_dir.display(),
                log.display()
            )?;
            let sp = show_progress.then(|| progress::spinner("waiting for forkd-daemon"));
            let started = LocalDaemon::start(
                &bin,
                &a.state_dir,
                &log,
                Duration::from_secs(a.daemon_start_secs),
            );
            if let Some(sp) = sp {
                sp.finish_and_clear();
            }
            let d = started?;
            let c = Client::new(&ClientOptions {
                url: d.url.clone(),
                token: opts.token.clone(),
                ca_cert: None,
                timeout: opts.timeout,
            })?;
            daemon = Some(d);
            c
        }
        Err(e) => return Err(e),
    };
    let result = run_against(&client, a, daemon.is_some(), show_progress);
    if let Some(mut d) = daemon {
        d.stop();
    }
    let figures = result?;
    if json {
        writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(&figures).expect("serializable")
        )?;
    } else {
        write!(out, "{}", figures.summary())?;
    }
    Ok(if figures.fork.all_good() { 0 } else { 1 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_tails_keep_the_last_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("log");
        std::fs::write(&p, "a\nb\nc\nd\n").unwrap();
        assert_eq!(log_tail(&p, 2), "  c\n  d");
        assert_eq!(log_tail(&p, 10), "  a\n  b\n  c\n  d");
        std::fs::write(&p, "").unwrap();
        assert_eq!(log_tail(&p, 2), "  (empty)");
        assert!(log_tail(&dir.path().join("none"), 2).contains("cannot read"));
    }

    #[test]
    fn a_daemon_that_exits_at_once_is_reported_with_its_log() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("fake-daemon");
        std::fs::write(
            &bin,
            "#!/bin/sh\necho \"fake daemon: cannot open $5\" >&2\nexit 3\n",
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        let log = dir.path().join("d.log");
        let e = LocalDaemon::start(&bin, Path::new("/state"), &log, Duration::from_secs(10))
            .err()
            .expect("it exits");
        let s = e.to_string();
        assert!(s.contains("exited"), "{s}");
        assert!(s.contains("fake daemon: cannot open /state"), "{s}");
    }

    #[test]
    fn a_daemon_that_never_answers_is_stopped_after_the_wait() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("silent-daemon");
        std::fs::write(&bin, "#!/bin/sh\necho listening nowhere\nexec sleep 60\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        let log = dir.path().join("d.log");
        let t0 = Instant::now();
        let e = LocalDaemon::start(&bin, dir.path(), &log, Duration::from_millis(300))
            .err()
            .expect("it never answers");
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "stopped by SIGTERM, not SIGKILL"
        );
        let s = e.to_string();
        assert!(s.contains("did not answer"), "{s}");
        assert!(s.contains("listening nowhere"), "{s}");
    }

    #[test]
    fn the_summary_names_the_guest_and_the_figures() {
        let f = QuickstartFigures {
            daemon_url: "http://127.0.0.1:1".into(),
            daemon_started: true,
            guest: "builtin",
            snapshot_reused: false,
            snapshot_ms: Some(1500.0),
            mem_mib: Some(128),
            fork: ForkFigures {
                snapshot_tag: BUILTIN_TAG.into(),
                n: 100,
                spawned: 100,
                spawn_ms: 120.0,
                spawn_per_child_ms: 1.2,
                answered: 100,
                ping_all_ms: 40.0,
                ready_all_ms: 160.0,
                ping_failures: vec![],
                killed: 100,
                kill_ms: 80.0,
                kill_failures: vec![],
            },
        };
        let s = f.summary();
        assert!(s.contains("100 children of the built-in guest"), "{s}");
        assert!(s.contains("(started for this run)"), "{s}");
        assert!(
            s.contains("snapshot quickstart-builtin made in 1.50 s, 128 MiB"),
            "{s}"
        );
        assert!(
            s.contains("100 children of quickstart-builtin in 120 ms (1.2 ms per child)"),
            "{s}"
        );
        assert!(s.contains("100/100 answered"), "{s}");
        let v = serde_json::to_value(&f).unwrap();
        assert_eq!(v["spawn_ms"], 120.0);
        assert_eq!(v["snapshot_tag"], BUILTIN_TAG);
        assert_eq!(v["daemon_started"], true);
    }
}
