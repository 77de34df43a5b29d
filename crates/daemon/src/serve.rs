//! `forkd-daemon serve`: configuration checks, re-adoption, the HTTP(S)
//! server, graceful shutdown.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;

use crate::audit::AuditLog;
use crate::auth::Auth;
use crate::daemon::{Daemon, Options};
use crate::driver::Vmm;
use crate::error::StartError;

/// `forkd-daemon serve` options. Each of upstream's options also reads
/// upstream's environment variable (a flag given wins).
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Address to listen on. A non-loopback address needs --token-file.
    #[arg(long, env = "FORKD_BIND", default_value = proto::api::DEFAULT_BIND)]
    pub bind: SocketAddr,
    /// Where the database, snapshots and sandboxes live. Upstream's
    /// `--state FILE.json` (its registry file) names the directory that
    /// holds it.
    #[arg(
        long,
        visible_alias = "state",
        env = "FORKD_STATE",
        default_value = "/var/lib/forkd",
        value_parser = state_dir
    )]
    pub state_dir: PathBuf,
    /// Where snapshots live (default: STATE_DIR/snapshots). On the same
    /// file system as the state directory: a snapshot links its sandbox's
    /// disk layers.
    #[arg(long, env = "FORKD_SNAPSHOT_ROOT")]
    pub snapshot_root: Option<PathBuf>,
    /// A file whose first line is the bearer token every route but
    /// /healthz requires (at least 16 bytes, not a placeholder).
    #[arg(long, env = "FORKD_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// TLS certificate chain (PEM); serve HTTPS.
    #[arg(long, env = "FORKD_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, env = "FORKD_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Append a JSON line per request to this file (its directory is
    /// made).
    #[arg(long, env = "FORKD_AUDIT_LOG")]
    pub audit_log: Option<PathBuf>,
    /// Most branches writing at once; more answer 503.
    #[arg(
        long,
        env = "FORKD_BRANCH_CONCURRENCY",
        default_value_t = 4,
        value_parser = clap::value_parser!(u32).range(1..=256)
    )]
    pub branch_concurrency: u32,
    /// The forkd-vmm binary (default: next to forkd-daemon, else on PATH).
    #[arg(long)]
    pub vmm_binary: Option<PathBuf>,
    /// Longest wait for in-flight requests at shutdown, in seconds.
    #[arg(long, default_value_t = 30)]
    pub shutdown_grace_secs: u64,
    /// Children each snapshot's fork server keeps ready ahead of spawn
    /// requests (`forkd-vmm fork-server --pool`): their KVM VMs, memory
    /// slots and vCPUs made, parked until a spawn hands them out. Each
    /// parked child is an idle process holding a VM, for every snapshot
    /// spawned from since the daemon started (what that costs:
    /// bench/RESULTS.md, fork). 0 (the default): none.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=1000))]
    pub fork_pool: u32,
    /// Network namespaces (each with its tap) kept ready ahead of spawns
    /// from snapshots with a network interface, so a spawn of up to N
    /// such children makes none on its request path; made once such a
    /// snapshot exists, refilled after each spawn, removed at shutdown.
    /// Each holds about 250 KiB of kernel memory (bench/netns). 0 (the
    /// default): none.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=1000))]
    pub netns_pool: u32,
    /// How long a sandbox whose VMM ended stays readable (`GET
    /// /v1/sandboxes/ID` answers `state: exited` with how it ended, and
    /// `?all=true` lists it) before it is forgotten (404), in seconds.
    #[arg(
        long,
        env = "FORKD_EXITED_RETENTION_SECS",
        default_value_t = 600,
        value_parser = clap::value_parser!(u64).range(0..=30 * 86400)
    )]
    pub exited_retention_secs: u64,
    /// Where the kernels and root filesystems that snapshot requests name
    /// must be (default: STATE_DIR/images, made if missing). A request
    /// names a file by its path in it or its full path; any other path
    /// (`..`, a link out, elsewhere on the host) is refused.
    #[arg(long, env = "FORKD_IMAGES_DIR")]
    pub images_dir: Option<PathBuf>,
    /// Memory limit, in MiB, of a sandbox whose spawn gives no
    /// `memory_limit_mib` (default: none). Needs the memory cgroup
    /// controller.
    #[arg(long, env = "FORKD_DEFAULT_MEMORY_LIMIT_MIB", value_name = "MIB")]
    pub default_memory_limit_mib: Option<u64>,
    /// CPU limit, in CPUs (0.5: half of one), of a sandbox whose spawn
    /// gives no `cpu_limit` (default: none). Needs the cpu cgroup
    /// controller.
    #[arg(long, env = "FORKD_DEFAULT_CPU_LIMIT", value_name = "CPUS")]
    pub default_cpu_limit: Option<f64>,
    /// Task limit of a sandbox's VMM whose spawn gives no `pids_limit`
    /// (default: 1024 where the pids cgroup controller is; 0: none).
    #[arg(long, env = "FORKD_DEFAULT_PIDS_LIMIT", value_name = "N")]
    pub default_pids_limit: Option<u64>,
    /// Most data, in MiB, a sandbox's own disk layer may hold when its
    /// spawn gives no `disk_quota_mib` (default: 4096; 0: none): a guest
    /// write past it fails as an I/O error.
    #[arg(long, env = "FORKD_DEFAULT_DISK_QUOTA_MIB", value_name = "MIB")]
    pub default_disk_quota_mib: Option<u64>,
    /// Most MiB/s a sandbox's VMM may read, and as many write, on the disk
    /// holding the sandboxes' directory, when its spawn gives no
    /// `io_limit_mibps` (default: no cap). Needs the io (v1: blkio)
    /// cgroup controller and a state directory on a block device.
    #[arg(long, env = "FORKD_DEFAULT_IO_LIMIT_MIBPS", value_name = "MIBPS")]
    pub default_io_limit_mibps: Option<u64>,
    /// MiB of disk kept free under the state directory (and the snapshot
    /// root): a spawn, snapshot, branch or compaction that would leave
    /// less is refused with 503 (a snapshot needs about its guest's RAM).
    /// 0: no reserve.
    #[arg(
        long,
        env = "FORKD_RESERVE_DISK_MIB",
        default_value_t = 512,
        value_name = "MIB"
    )]
    pub reserve_disk_mib: u64,
    /// MiB of memory kept available (MemAvailable): a spawn or snapshot
    /// that would leave less is refused with 503 (a live-forkable child
    /// needs its guest's RAM, a snapshot's source VM too). 0: no reserve.
    #[arg(
        long,
        env = "FORKD_RESERVE_MEMORY_MIB",
        default_value_t = 256,
        value_name = "MIB"
    )]
    pub reserve_memory_mib: u64,
    /// Longest wait, in seconds, for a request's headers, from the accept
    /// (TLS handshake included) or from the first byte after an idle gap
    /// (then never before the idle timeout's end); a connection slower
    /// than that is closed. A request whose headers
    /// are in is never cut, however long its body or answer takes.
    #[arg(
        long,
        env = "FORKD_HEADER_TIMEOUT_SECS",
        default_value_t = 30,
        value_parser = clap::value_parser!(u64).range(1..=3600)
    )]
    pub header_timeout_secs: u64,
    /// Longest gap, in seconds, between an answer and the next request's
    /// first byte on a kept-alive connection; then it is closed.
    #[arg(
        long,
        env = "FORKD_IDLE_TIMEOUT_SECS",
        default_value_t = 60,
        value_parser = clap::value_parser!(u64).range(1..=86400)
    )]
    pub idle_timeout_secs: u64,
    /// Most connections open at once (at least 1). One more is answered
    /// 503 (the usual JSON error, with `Connection: close`) and closed.
    #[arg(
        long,
        env = "FORKD_MAX_CONNECTIONS",
        default_value_t = 1024,
        value_parser = clap::value_parser!(u32).range(1..=1_000_000)
    )]
    pub max_connections: u32,
    /// Run every VMM without its seccomp filters, so a VMM making a system
    /// call its thread's filter forbids is not ended: for debugging only.
    /// The daemon warns at start and `forkd doctor` reports it.
    #[arg(long, env = "FORKD_NO_SECCOMP")]
    pub no_seccomp: bool,
    /// Leave sandboxes' VMMs root (no jail: they keep every capability
    /// and see the host's files),
    /// for debugging only. The daemon warns at start and `forkd doctor`
    /// reports it.
    #[arg(long, env = "FORKD_NO_JAIL")]
    pub no_jail: bool,
}

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn serve(args: ServeArgs) -> Result<(), StartError> {
    let auth = args
        .token_file
        .as_deref()
        .map(Auth::from_file)
        .transpose()?;
    if auth.is_none() && !args.bind.ip().is_loopback() {
        return Err(StartError::Config(format!(
            "refusing to listen on {} without a token: anyone who can reach it could run code; pass --token-file, or bind to 127.0.0.1",
            args.bind
        )));
    }
    let audit = args.audit_log.as_deref().map(AuditLog::open).transpose()?;
    let vmm = Vmm::find(args.vmm_binary.clone())?
        .with_fork_pool(args.fork_pool)
        .with_seccomp(!args.no_seccomp)
        .with_jail(!args.no_jail);
    if args.no_jail {
        tracing::warn!(
            "--no-jail: sandboxes' VMMs run as root with every capability; a guest that breaks \
             out of a device model is root on this host. Debugging only."
        );
    }
    if args.no_seccomp {
        tracing::warn!(
            "--no-seccomp: VMMs run WITHOUT seccomp filters; a guest that breaks out of a \
             device model reaches every system call of a root process. Debugging only."
        );
    }
    let daemon = Arc::new(Daemon::open(Options {
        vmm,
        state_dir: args.state_dir.clone(),
        snapshot_root: args.snapshot_root.clone(),
        auth,
        audit,
        branch_concurrency: args.branch_concurrency as usize,
        netns_pool: args.netns_pool as usize,
        exited_retention: Duration::from_secs(args.exited_retention_secs),
        images_dir: args.images_dir.clone(),
        reserve: crate::reserve::Reserve {
            disk_mib: args.reserve_disk_mib,
            memory_mib: args.reserve_memory_mib,
        },
        default_limits: crate::daemon::DefaultLimits {
            memory_mib: args.default_memory_limit_mib,
            cpu: args.default_cpu_limit,
            pids: args.default_pids_limit,
            disk_quota_mib: args.default_disk_quota_mib,
            io_mibps: args.default_io_limit_mibps,
        },
    })?);
    // A VMM whose fork server died is re-parented here, so its status is
    // still seen (the reaper records it).
    if let Err(e) = crate::procs::become_subreaper() {
        tracing::warn!("cannot become the subreaper of the VMMs: {e}; a VMM whose fork server died ends with its status unknown");
    }
    daemon.recover().await?;
    daemon.start_reaper();
    tokio::spawn(daemon.clone().deadline_loop());
    if daemon.store.snapshots()?.iter().any(|s| s.info.network) {
        daemon.refill_netns_pool();
    }
    let app = crate::api::router(daemon.clone());
    let handle = axum_server::Handle::new();
    let grace = Duration::from_secs(args.shutdown_grace_secs);
    tokio::spawn({
        let handle = handle.clone();
        async move {
            shutdown_signal().await;
            tracing::info!("shutting down: finishing requests in flight");
            handle.graceful_shutdown(Some(grace));
        }
    });
    let scheme = if args.tls_cert.is_some() {
        "https"
    } else {
        "http"
    };
    let listen = |source| StartError::Listen {
        addr: args.bind,
        source,
    };
    let listener = std::net::TcpListener::bind(args.bind).map_err(listen)?;
    listener.set_nonblocking(true).map_err(listen)?;
    // The line a supervisor or test waits for (see [`served_url`]).
    eprintln!(
        "forkd-daemon: {SERVING}{scheme}://{} (state {})",
        listener.local_addr().map_err(listen)?,
        daemon.paths.state.display()
    );
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            let _ = rustls::crypto::ring::default_provider().install_default();
            let tls = axum_server::tls_rustls::RustlsConfig::from_pem_file(cert, key)
                .await
                .map_err(|source| StartError::Tls {
                    cert: cert.clone(),
                    key: key.clone(),
                    source,
                })?;
            Some(tls)
        }
        _ => None,
    };
    let limits = crate::conn::Limits {
        header_timeout: Duration::from_secs(args.header_timeout_secs),
        idle_timeout: Duration::from_secs(args.idle_timeout_secs),
        max_connections: args.max_connections as usize,
    };
    let served = crate::conn::serve(listener, tls, limits, handle, app).await;
    daemon.stop_idle_fork_servers();
    let pool = daemon.clone();
    let _ = tokio::task::spawn_blocking(move || pool.netns_pool.drain(&pool.store)).await;
    served.map_err(StartError::Served)?;
    tracing::info!("stopped; sandboxes keep running and are re-adopted at the next start");
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("a SIGTERM handler can be installed");
    let mut int = signal(SignalKind::interrupt()).expect("a SIGINT handler can be installed");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// `--state-dir`: a directory, or upstream's registry file (`*.json`),
/// which stands for the directory holding it.
fn state_dir(arg: &str) -> Result<PathBuf, String> {
    let path = PathBuf::from(arg);
    if path.extension().is_some_and(|e| e == "json") && !path.is_dir() {
        return match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => Ok(dir.to_owned()),
            _ => Ok(PathBuf::from(".")),
        };
    }
    Ok(path)
}

/// What the daemon's "serving" line says before its URL.
const SERVING: &str = "serving the v1 API on ";

/// The URL a daemon's log says it serves, once the whole line is there (a
/// reader of a log being written may see half a line).
pub fn served_url(log: &str) -> Option<&str> {
    let rest = log.split(SERVING).nth(1)?;
    let (line, _) = rest.split_once('\n')?;
    line.split_whitespace().next()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstreams_state_file_names_its_directory() {
        assert_eq!(
            state_dir("/var/lib/forkd/state.json").unwrap(),
            PathBuf::from("/var/lib/forkd")
        );
        assert_eq!(state_dir("state.json").unwrap(), PathBuf::from("."));
        assert_eq!(
            state_dir("/srv/forkd").unwrap(),
            PathBuf::from("/srv/forkd")
        );
    }

    #[test]
    fn the_url_is_read_only_from_a_whole_line() {
        assert_eq!(served_url(""), None);
        assert_eq!(served_url("forkd-daemon: serving the v1 API on "), None);
        assert_eq!(
            served_url("forkd-daemon: serving the v1 API on http://127.0.0.1:41"),
            None,
            "the line is not finished: the port may be cut short"
        );
        assert_eq!(
            served_url("x\nforkd-daemon: serving the v1 API on http://127.0.0.1:4100 (state /s)\n"),
            Some("http://127.0.0.1:4100")
        );
    }
}
