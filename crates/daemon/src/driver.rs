//! Driving forkd-vmm processes: a source VM booted to be snapshotted, the
//! control socket of a running VM, and a fork server per snapshot (the
//! pre-initialised process that forks children of it).
//!
//! Everything here blocks; the API calls it from `spawn_blocking`.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use agent_client::{Client, ClientConfig, Target};
use proto::agent::{Pong, DEFAULT_VSOCK_PORT};
use proto::control::{
    ControlClient, ControlRequest, ControlResponse, ForkRequest, ForkResponse, ForkedChild,
};

use crate::procs;

/// What went wrong driving a forkd-vmm process. Its message says which
/// process, which file or socket, and what the VMM answered.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The forkd-vmm binary is not where it was looked for.
    #[error("{0}")]
    NoBinary(String),
    /// A file or directory of the VM's could not be made.
    #[error("cannot create {}: {source}", path.display())]
    Create {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The binary did not start.
    #[error("cannot start {} {what}: {source}", binary.display())]
    Start {
        /// forkd-vmm.
        binary: PathBuf,
        /// Its subcommand.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A VMM's (or fork server's) socket did not take the connection.
    #[error("cannot reach the {what} at {}: {source}", socket.display())]
    Unreachable {
        /// "VMM" or "fork server".
        what: &'static str,
        /// Its socket.
        socket: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// It took the request but gave no whole answer.
    #[error("the {what} at {} did not answer: {detail}", socket.display())]
    NoAnswer {
        /// "VMM" or "fork server".
        what: &'static str,
        /// Its socket.
        socket: PathBuf,
        /// What happened instead.
        detail: String,
    },
    /// It answered with an error of its own.
    #[error("{0}")]
    Refused(String),
    /// It answered, but not what the request asks for.
    #[error("{what}: unexpected answer {answer}")]
    Unexpected {
        /// The request.
        what: &'static str,
        /// The answer, as debug text.
        answer: String,
    },
    /// A fork server ended, or did not come up in time, or forked fewer
    /// children than asked.
    #[error("{0}")]
    ForkServer(String),
}

/// The forkd-vmm binary.
#[derive(Clone, Debug)]
pub struct Vmm {
    binary: PathBuf,
    /// Children each fork server keeps ready (`fork-server --pool`).
    fork_pool: u32,
    /// Where fork servers put their children's cgroups
    /// (`fork-server --cgroup-parent`), and the limits they make a parked
    /// child's group with before a request says.
    cgroups: Option<(Vec<PathBuf>, proto::control::Limits)>,
    /// Whether its VMMs run under their seccomp filters (the default;
    /// `forkd-daemon --no-seccomp` turns them off).
    seccomp: bool,
    /// The disk quota of the VMs it boots to make snapshots, in MiB.
    source_disk_quota_mib: Option<u64>,
    /// Whether the fork servers jail their children (the default;
    /// `forkd-daemon --no-jail` turns it off).
    jail: bool,
}

impl Vmm {
    /// `explicit`, or `forkd-vmm` next to this executable, or on `PATH`.
    pub fn find(explicit: Option<PathBuf>) -> Result<Vmm, Error> {
        if let Some(path) = explicit {
            if path.is_file() {
                return Ok(Vmm {
                    binary: path,
                    fork_pool: 0,
                    cgroups: None,
                    seccomp: true,
                    source_disk_quota_mib: None,
                    jail: true,
                });
            }
            return Err(Error::NoBinary(format!(
                "--vmm-binary {}: no such file",
                path.display()
            )));
        }
        let beside = std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent().map(|d| d.join("forkd-vmm")));
        let on_path = std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join("forkd-vmm"))
                .find(|p| p.is_file())
        });
        beside
            .filter(|p| p.is_file())
            .or(on_path)
            .map(|binary| Vmm {
                binary,
                fork_pool: 0,
                cgroups: None,
                seccomp: true,
                source_disk_quota_mib: None,
                jail: true,
            })
            .ok_or_else(|| {
                Error::NoBinary("cannot find forkd-vmm next to forkd-daemon or on PATH; build it (cargo build --release) or pass --vmm-binary".into())
            })
    }

    /// Fork servers put each child in a cgroup of its own under each of
    /// `parents`, parked children's made with `limits`.
    pub fn with_cgroups(mut self, parents: Vec<PathBuf>, limits: proto::control::Limits) -> Vmm {
        self.cgroups = Some((parents, limits));
        self
    }

    /// `fork-server`'s arguments for [`Vmm::with_cgroups`].
    fn cgroup_args(&self) -> Vec<std::ffi::OsString> {
        let mut out = Vec::new();
        let Some((parents, limits)) = &self.cgroups else {
            return out;
        };
        for p in parents {
            out.push("--cgroup-parent".into());
            out.push(p.clone().into_os_string());
        }
        let values = [
            ("--memory-limit-mib", limits.memory_mib),
            ("--cpu-limit-millis", limits.cpu_millis.map(u64::from)),
            ("--pids-limit", limits.pids),
        ];
        for (flag, value) in values {
            if let Some(v) = value {
                out.push(format!("{flag}={v}").into());
            }
        }
        if let Some(io) = limits.io {
            out.push(format!("--io-limit={}:{}={}", io.major, io.minor, io.bytes_per_sec).into());
        }
        out
    }

    /// Fork servers keep `n` children ready ahead of requests (0: none).
    pub fn with_fork_pool(mut self, n: u32) -> Vmm {
        self.fork_pool = n;
        self
    }

    /// Its VMMs run without seccomp filters (`seccomp` false): for
    /// debugging only.
    pub fn with_seccomp(mut self, seccomp: bool) -> Vmm {
        self.seccomp = seccomp;
        self
    }

    /// The VMs it boots to make snapshots write at most `mib` MiB into
    /// their disk layers (None: no quota).
    pub fn with_source_disk_quota(mut self, mib: Option<u64>) -> Vmm {
        self.source_disk_quota_mib = mib;
        self
    }

    /// Whether its VMMs run under their seccomp filters.
    pub fn seccomp(&self) -> bool {
        self.seccomp
    }

    /// Its fork servers' children keep root (`jail` false): for
    /// debugging only.
    pub fn with_jail(mut self, jail: bool) -> Vmm {
        self.jail = jail;
        self
    }

    /// Whether its fork servers jail their children.
    pub fn jail(&self) -> bool {
        self.jail
    }

    /// The arguments every VMM it starts takes (`run`, `fork-server`).
    fn vmm_args(&self) -> impl Iterator<Item = &'static str> {
        [
            (!self.seccomp).then_some("--seccomp=off"),
            (!self.jail).then_some("--jail=off"),
        ]
        .into_iter()
        .flatten()
    }

    /// The binary's path.
    pub fn binary(&self) -> &Path {
        &self.binary
    }
}

/// Sends one control request, waiting at most `timeout`.
pub fn control(
    socket: &Path,
    request: &ControlRequest,
    timeout: Duration,
) -> Result<ControlResponse, Error> {
    let mut client =
        ControlClient::connect(socket, timeout).map_err(|source| Error::Unreachable {
            what: "VMM",
            socket: socket.to_owned(),
            source,
        })?;
    client.call(request).map_err(|e| Error::NoAnswer {
        what: "VMM",
        socket: socket.to_owned(),
        detail: e.to_string(),
    })
}

/// An agent client for the VM whose vsock socket is `uds`.
pub fn agent(uds: &Path, cfg: ClientConfig) -> Client {
    Client::with_config(
        Target::Vsock {
            uds: uds.to_owned(),
            port: DEFAULT_VSOCK_PORT,
        },
        cfg,
    )
}

/// What guest a source VM boots.
#[derive(Clone, Debug)]
pub enum SourceGuest {
    /// The built-in guest.
    Builtin,
    /// A Linux kernel with a root filesystem.
    Linux {
        /// Kernel image.
        kernel: PathBuf,
        /// Root filesystem image (never written: the guest writes a layer).
        rootfs: PathBuf,
        /// Mount the root filesystem read-write.
        rw: bool,
        /// Extra kernel arguments.
        extra_args: Option<String>,
    },
}

/// Why a source VM's agent never answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootError {
    /// The VMM exited first (its log's tail is in the message).
    Exited(String),
    /// The guest did not answer within the wait.
    Silent(String),
}

impl std::fmt::Display for BootError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BootError::Exited(m) | BootError::Silent(m) => f.write_str(m),
        }
    }
}

/// Where a source VM's network interface goes.
#[derive(Clone, Copy, Debug)]
pub enum GuestLink<'a> {
    /// forkd's tap ([`crate::netns::TAP`]) in this network namespace; a
    /// Linux guest's agent configures the guest's side.
    Namespace(&'a str),
    /// A host tap the caller made, in the daemon's namespace; the guest's
    /// side is the guest's own business (its image or kernel arguments).
    HostTap(&'a str),
}

/// A VM booted to be snapshotted, in its own directory.
pub struct SourceVm {
    child: Child,
    dir: PathBuf,
    control_socket: PathBuf,
    vsock_socket: PathBuf,
    /// It gives up root in a jail of its own (the daemon's `--no-jail`
    /// not given).
    jailed: bool,
}

impl SourceVm {
    /// Boots `guest` with `mem_mib` and `vcpus` in `dir` (created), with a
    /// network interface on `link` when given.
    pub fn boot(
        vmm: &Vmm,
        guest: &SourceGuest,
        mem_mib: u64,
        vcpus: u8,
        dir: &Path,
        link: Option<GuestLink<'_>>,
    ) -> Result<SourceVm, Error> {
        std::fs::create_dir_all(dir).map_err(|source| Error::Create {
            path: dir.to_owned(),
            source,
        })?;
        let control_socket = dir.join("control.sock");
        let vsock_socket = dir.join("vsock.sock");
        let log_path = dir.join("vmm.log");
        let log = std::fs::File::create(&log_path).map_err(|source| Error::Create {
            path: log_path,
            source,
        })?;
        let mut cmd = Command::new(vmm.binary());
        cmd.arg("run")
            .args(vmm.vmm_args())
            .args(
                vmm.source_disk_quota_mib
                    .map(|m| format!("--disk-quota-mib={m}")),
            )
            .arg("--mem-mib")
            .arg(mem_mib.to_string())
            .arg("--vcpus")
            .arg(vcpus.to_string())
            .arg("--control-socket")
            .arg(&control_socket)
            .arg("--vsock-uds")
            .arg(&vsock_socket)
            .arg("--console")
            .arg(dir.join("console.log"))
            // Jailed in `dir` unless the daemon runs with --no-jail.
            .arg("--jail-dir")
            .arg(dir);
        match link {
            Some(GuestLink::Namespace(ns)) => {
                cmd.args(["--tap", crate::netns::TAP, "--netns", ns]);
            }
            Some(GuestLink::HostTap(tap)) => {
                cmd.args(["--tap", tap]);
            }
            None => {}
        }
        if link.is_some() {
            cmd.args(["--mac", crate::netns::GUEST_MAC]);
        }
        match guest {
            SourceGuest::Builtin => {
                cmd.arg("--builtin");
            }
            SourceGuest::Linux {
                kernel,
                rootfs,
                rw,
                extra_args,
            } => {
                let mut cmdline = format!(
                    "console=ttyS0 reboot=k panic=-1 root=/dev/vda {} rootfstype=ext4",
                    if *rw { "rw" } else { "ro" }
                );
                if let Some(GuestLink::Namespace(_)) = link {
                    cmdline.push(' ');
                    cmdline.push_str(&crate::netns::guest_kernel_arg());
                }
                if let Some(extra) = extra_args {
                    cmdline.push(' ');
                    cmdline.push_str(extra);
                }
                // The image is never written: the guest's writes go to a
                // layer that the snapshot freezes. Each path is an
                // argument of its own, taken whole (a `--drive` spec would
                // split one at a comma).
                cmd.arg("--kernel")
                    .arg(kernel)
                    .arg("--drive-image")
                    .arg(rootfs)
                    .arg("--cow-layer")
                    .arg(dir.join("rootfs.cow"))
                    .arg("--cmdline")
                    .arg(cmdline)
                    .arg("--rng");
            }
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .process_group(0);
        let child = cmd.spawn().map_err(|source| Error::Start {
            binary: vmm.binary().to_owned(),
            what: "run",
            source,
        })?;
        Ok(SourceVm {
            child,
            jailed: vmm.jail,
            dir: dir.to_owned(),
            control_socket,
            vsock_socket,
        })
    }

    /// Waits until the guest agent answers a ping (never a fixed sleep) and
    /// its warm interpreter is ready or has failed, at most `wait`. The
    /// built-in guest has no interpreter: its first answer is enough.
    pub fn wait_for_agent(&mut self, wait: Duration) -> Result<Pong, BootError> {
        let deadline = Instant::now() + wait;
        let client = agent(
            &self.vsock_socket,
            ClientConfig {
                connect_timeout: Duration::from_secs(1),
                io_timeout: Duration::from_secs(1),
                request_timeout: Duration::from_secs(2),
                ..ClientConfig::default()
            },
        );
        let mut last_error = String::from("its vsock socket never appeared");
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(BootError::Exited(format!(
                    "the VM exited ({status}) before its agent answered; {}",
                    self.context()
                )));
            }
            if self.vsock_socket.exists() {
                match client.ping() {
                    Ok(pong) if settled(&pong) => return Ok(pong),
                    Ok(_) => {
                        last_error = "the agent answers; its interpreter is still warming up".into()
                    }
                    Err(e) => last_error = e.to_string(),
                }
            }
            if Instant::now() >= deadline {
                return Err(BootError::Silent(format!(
                    "the guest agent did not answer within {} s (last: {last_error}); {}",
                    wait.as_secs(),
                    self.context()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Snapshots the VM into `dst` (which must not exist) and leaves it
    /// paused; returns the snapshot's metadata.
    pub fn snapshot(&self, dst: &Path) -> Result<proto::snapshot::SnapshotMeta, Error> {
        // A jailed VMM writes into a directory made for it and bound into
        // its jail, given back to root once written.
        let pid = self.child.id() as i32;
        let jail_err = |e: std::io::Error| Error::Create {
            path: dst.to_owned(),
            source: e,
        };
        if self.jailed {
            procs::hand_over(dst, pid).map_err(jail_err)?;
        }
        let meta = self.snapshot_into(dst)?;
        if self.jailed {
            procs::take_back(dst, pid).map_err(jail_err)?;
        }
        Ok(meta)
    }

    fn snapshot_into(&self, dst: &Path) -> Result<proto::snapshot::SnapshotMeta, Error> {
        let request = ControlRequest::Snapshot {
            dir: dst.to_owned(),
            leave_paused: true,
            mode: Default::default(),
            wait: true,
            measure_diff: false,
        };
        match control(&self.control_socket, &request, Duration::from_secs(600))? {
            ControlResponse::Snapshot { meta, .. } => Ok(*meta),
            ControlResponse::Error { message } => {
                Err(Error::Refused(format!("snapshot failed: {message}")))
            }
            other => Err(Error::Unexpected {
                what: "snapshot",
                answer: format!("{other:?}"),
            }),
        }
    }

    /// A summary of the VM's logs for an error message.
    pub fn context(&self) -> String {
        let console = procs::log_tail(&self.dir.join("console.log"), 1500);
        let log = procs::log_tail(&self.dir.join("vmm.log"), 800);
        format!("console tail: [{console}] vmm log tail: [{log}]")
    }
}

impl Drop for SourceVm {
    /// Ends the VM (it has served its purpose or failed) and reaps it.
    fn drop(&mut self) {
        let _ = control(
            &self.control_socket,
            &ControlRequest::Shutdown,
            Duration::from_secs(2),
        );
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether a guest is ready to be snapshotted: the built-in guest at once,
/// a Linux guest once its agent's warm interpreter is up (or has failed,
/// which the snapshot reports as a warning).
fn settled(pong: &Pong) -> bool {
    pong.guest == proto::agent::BUILTIN_GUEST
        || pong.interpreter_ready
        || pong.interpreter_error.is_some()
}

/// A `forkd-vmm fork-server` holding one snapshot.
pub struct ForkServer {
    socket: PathBuf,
    log: PathBuf,
    pidfile: PathBuf,
    pid: i32,
    ticks: u64,
}

/// Longest a fork server may take to load its snapshot (a diff's memory is
/// assembled on the first load).
const FORK_SERVER_START: Duration = Duration::from_secs(300);
/// Longest a fork batch may take.
const FORK_BATCH: Duration = Duration::from_secs(300);

impl ForkServer {
    /// Starts a fork server for the snapshot in `snapshot_dir`, its socket
    /// and log under `run_dir` named after `name`.
    pub fn start(
        vmm: &Vmm,
        snapshot_dir: &Path,
        run_dir: &Path,
        name: &str,
    ) -> Result<ForkServer, Error> {
        // A socket, log and pid file of its own (a server replaced after it
        // died must not share a path with its successor).
        let name = format!("{name}-{}", crate::util::random_hex(3));
        let socket = run_dir.join(format!("{name}.fork.sock"));
        let log_path = run_dir.join(format!("{name}.fork.log"));
        let log = std::fs::File::create(&log_path).map_err(|source| Error::Create {
            path: log_path.clone(),
            source,
        })?;
        let mut child = Command::new(vmm.binary())
            .arg("fork-server")
            .args(vmm.vmm_args())
            .arg("--snapshot")
            .arg(snapshot_dir)
            .arg("--socket")
            .arg(&socket)
            // Left out when 0, as before the option existed.
            .args((vmm.fork_pool > 0).then(|| format!("--pool={}", vmm.fork_pool)))
            .args(vmm.cgroup_args())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .process_group(0)
            .spawn()
            .map_err(|source| Error::Start {
                binary: vmm.binary().to_owned(),
                what: "fork-server",
                source,
            })?;
        let pid = child.id() as i32;
        let ticks = procs::start_ticks(pid).unwrap_or(0);
        let deadline = Instant::now() + FORK_SERVER_START;
        // Ready when a connection is accepted: the socket file appears at
        // bind(), a moment before listen(), and a connect in between is
        // refused. The probe connection sends nothing; the server answers
        // it with an error and goes on.
        while UnixStream::connect(&socket).is_err() {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(Error::ForkServer(format!(
                    "the fork server for {} exited ({status}): {}",
                    snapshot_dir.display(),
                    procs::log_tail(&log_path, 1500)
                )));
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Error::ForkServer(format!(
                    "the fork server for {} did not come up within {} s",
                    snapshot_dir.display(),
                    FORK_SERVER_START.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        // Reaped by a thread of its own; the server itself lives on.
        std::thread::spawn(move || child.wait());
        let pidfile = run_dir.join(format!("{name}.fork.pid"));
        let _ = std::fs::write(&pidfile, format!("{pid} {ticks}\n"));
        Ok(ForkServer {
            socket,
            log: log_path,
            pidfile,
            pid,
            ticks,
        })
    }

    /// Its process id.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Whether the server still runs.
    pub fn alive(&self) -> bool {
        procs::alive(self.pid, self.ticks)
    }

    /// Sends `request` (a [`ForkRequest::Fork`] of `n` children into
    /// `out_dir/<i>/`, child `i` with its network interface in namespace
    /// `netns[i]` when given) and returns the children.
    pub fn fork(&self, request: &ForkRequest) -> Result<Vec<ForkedChild>, Error> {
        let ForkRequest::Fork { n, .. } = *request else {
            return Err(Error::Unexpected {
                what: "fork",
                answer: "a request that is not a fork".into(),
            });
        };
        let unreachable = |source| Error::Unreachable {
            what: "fork server",
            socket: self.socket.clone(),
            source,
        };
        let no_answer = |detail: String| Error::NoAnswer {
            what: "fork server",
            socket: self.socket.clone(),
            detail,
        };
        let stream = UnixStream::connect(&self.socket).map_err(unreachable)?;
        stream
            .set_read_timeout(Some(FORK_BATCH))
            .and_then(|()| stream.set_write_timeout(Some(Duration::from_secs(10))))
            .map_err(unreachable)?;
        let mut line = serde_json::to_vec(request).expect("a fork request serialises");
        line.push(b'\n');
        (&stream)
            .write_all(&line)
            .map_err(|e| no_answer(format!("cannot send the request: {e}")))?;
        let mut answer = Vec::new();
        BufReader::new(&stream)
            .take(16 << 20)
            .read_until(b'\n', &mut answer)
            .map_err(|e| no_answer(e.to_string()))?;
        match serde_json::from_slice::<ForkResponse>(&answer) {
            Ok(ForkResponse::Forked { children }) if children.len() == n as usize => Ok(children),
            Ok(ForkResponse::Forked { children }) => Err(Error::ForkServer(format!(
                "the fork server started {} children of {n}",
                children.len()
            ))),
            Ok(ForkResponse::Error { message }) => Err(Error::Refused(message)),
            Ok(other) => Err(Error::Unexpected {
                what: "fork",
                answer: format!("{other:?}"),
            }),
            Err(e) => Err(no_answer(format!(
                "unreadable answer ({e}): {}",
                String::from_utf8_lossy(&answer)
            ))),
        }
    }

    /// Stops the server (its children run on; the children of its pool,
    /// if any, exit with it).
    pub fn stop(&self) {
        procs::kill(self.pid, self.ticks, Duration::from_secs(2));
        for file in [&self.socket, &self.pidfile, &self.log] {
            let _ = std::fs::remove_file(file);
        }
        let _ = std::fs::remove_dir_all(pool_staging(&self.socket));
    }
}

/// Where a fork server with a pool stages its children's directories
/// (`forkd-vmm fork-server --pool`: next to its socket).
pub fn pool_staging(socket: &Path) -> PathBuf {
    let mut staging = socket.as_os_str().to_owned();
    staging.push(".pool");
    PathBuf::from(staging)
}

/// The fork servers a previous daemon left running in `run_dir` (their
/// `.fork.pid` files), each with the tag it serves; `None` in place of
/// the server when its pid file does not parse.
pub fn left_fork_servers(run_dir: &Path) -> Vec<(String, Option<ForkServer>, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(run_dir) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let pidfile = entry.path();
        let Some(name) = pidfile
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".fork.pid"))
            .map(str::to_owned)
        else {
            continue;
        };
        // `<tag>-<6 hex>` (see ForkServer::start).
        let tag = name
            .rsplit_once('-')
            .map_or(name.as_str(), |(t, _)| t)
            .to_owned();
        let ids = std::fs::read_to_string(&pidfile).ok().and_then(|text| {
            let mut it = text.split_whitespace().map(|s| s.parse::<u64>());
            match (it.next(), it.next()) {
                (Some(Ok(pid)), Some(Ok(ticks))) if pid > 0 && pid <= i32::MAX as u64 => {
                    Some((pid as i32, ticks))
                }
                _ => None,
            }
        });
        let server = ids.map(|(pid, ticks)| ForkServer {
            socket: run_dir.join(format!("{name}.fork.sock")),
            log: run_dir.join(format!("{name}.fork.log")),
            pidfile: pidfile.clone(),
            pid,
            ticks,
        });
        out.push((tag, server, pidfile));
    }
    out
}

impl ForkServer {
    /// Whether it runs `binary` (not an older forkd-vmm an upgrade
    /// replaced, whose `/proc/<pid>/exe` reads "... (deleted)").
    pub fn runs(&self, binary: &Path) -> bool {
        let exe = std::fs::read_link(format!("/proc/{}/exe", self.pid));
        let ours = std::fs::canonicalize(binary);
        matches!((exe, ours), (Ok(a), Ok(b)) if a == b) && self.alive()
    }

    /// Waits until the server has answered every request it took before
    /// this call: it serves one request at a time, in order, so the answer
    /// to an empty request comes after the batch a dead daemon asked for
    /// (whose children must all exist before they are reconciled).
    pub fn barrier(&self) -> Result<(), Error> {
        let unreachable = |source| Error::Unreachable {
            what: "fork server",
            socket: self.socket.clone(),
            source,
        };
        let stream = UnixStream::connect(&self.socket).map_err(unreachable)?;
        stream
            .set_read_timeout(Some(FORK_BATCH))
            .and_then(|()| stream.set_write_timeout(Some(Duration::from_secs(10))))
            .map_err(unreachable)?;
        (&stream).write_all(b"\n").map_err(unreachable)?;
        let mut answer = Vec::new();
        BufReader::new(&stream)
            .take(64 << 10)
            .read_until(b'\n', &mut answer)
            .map_err(unreachable)?;
        Ok(())
    }

    /// Its log file.
    pub fn log(&self) -> &Path {
        &self.log
    }

    /// Its socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }
}
