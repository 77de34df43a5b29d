//! The command line.

use std::path::PathBuf;

use clap::{ArgGroup, Args, Parser, Subcommand};

/// Default daemon URL.
pub const DEFAULT_URL: &str = "http://127.0.0.1:8889";
/// Default state directory of a daemon `forkd quickstart` starts.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/forkd";

/// forkd: fork KVM microVMs like processes (a client of forkd-daemon).
#[derive(Debug, Parser)]
#[command(name = "forkd", version, propagate_version = true)]
pub struct Cli {
    /// Options every command takes.
    #[command(flatten)]
    pub global: Global,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// How to reach the daemon, and how to print.
#[derive(Debug, Args)]
#[command(next_help_heading = "Global options")]
pub struct Global {
    /// The daemon's URL (http:// or https://).
    #[arg(long, env = "FORKD_URL", default_value = DEFAULT_URL, global = true)]
    pub daemon_url: String,
    /// Bearer token for a daemon started with --token-file.
    #[arg(long, env = "FORKD_TOKEN", hide_env_values = true, global = true)]
    pub daemon_token: Option<String>,
    /// File whose first line is the token (takes precedence over --daemon-token).
    #[arg(long, env = "FORKD_TOKEN_FILE", value_name = "PATH", global = true)]
    pub daemon_token_file: Option<PathBuf>,
    /// PEM certificate(s) to trust for an https daemon (e.g. its self-signed one).
    #[arg(long, env = "FORKD_CA_CERT", value_name = "PATH", global = true)]
    pub ca_cert: Option<PathBuf>,
    /// Print the daemon's JSON answer (or the command's figures) instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    /// Longest wait for one answer from the daemon, in seconds.
    #[arg(
        long,
        env = "FORKD_TIMEOUT",
        value_name = "SECS",
        default_value_t = 300,
        global = true
    )]
    pub timeout: u64,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Make a snapshot: boot a guest (Linux or built-in) and wait for its
    /// agent, or branch a running sandbox.
    Snapshot(SnapshotArgs),
    /// Fork sandboxes from a snapshot and print them.
    Spawn(SpawnArgs),
    /// Fork N sandboxes, time it, ping every one, then kill them all.
    Fork(ForkArgs),
    /// List the sandboxes.
    Ls(LsArgs),
    /// List the snapshots.
    Images,
    /// Kill sandboxes.
    Kill(KillArgs),
    /// Delete a snapshot.
    Rmi(RmiArgs),
    /// Show a snapshot: sizes and its place in a diff chain.
    SnapshotInfo(TagArg),
    /// Flatten a snapshot (and its diff chain) into a new one.
    Compact(CompactArgs),
    /// Run a program in a sandbox; exits with its exit code.
    Exec(ExecArgs),
    /// Evaluate code in a sandbox's warm interpreter.
    Eval(EvalArgs),
    /// Ask a sandbox's guest agent to answer.
    Ping(IdArg),
    /// Attach this terminal to a shell (or ARGS) in a sandbox, on a
    /// pseudo-terminal of this one's size.
    Shell(ShellArgs),
    /// Copy a file into or out of a sandbox: `forkd cp ./a ID:/tmp/a`,
    /// `forkd cp ID:/tmp/a ./a` (`-`: standard input or output).
    Cp(CpArgs),
    /// List a directory in a sandbox: `forkd ls-files ID:/tmp`.
    LsFiles(LsFilesArgs),
    /// The processes started in a sandbox in the background or by streams.
    Ps(IdArg),
    /// Pause a sandbox's VMM (memory and files kept, no CPU used).
    Pause(IdArg),
    /// Let a paused sandbox run, or restore a suspended one.
    Resume(IdArg),
    /// Set a sandbox's deadline SECS from now.
    Timeout(TimeoutArgs),
    /// What a sandbox uses now: CPU, memory, disk layer, network.
    Stats(IdArg),
    /// Show the client's and the daemon's versions.
    Version,
    /// Where the daemon keeps its state and snapshots.
    Where,
    /// List what crashed runs left in the state directory (temporary
    /// snapshot directories of processes that are gone, source VMs' build
    /// directories nothing uses); remove them with --yes.
    Cleanup(CleanupArgs),
    /// Check this host for what forkd needs (no daemon needed).
    Doctor(DoctorArgs),
    /// Snapshot a guest, fork 100 children, ping them all, print the times,
    /// clean up (starts a daemon for the run when none answers).
    Quickstart(QuickstartArgs),
}

/// `forkd snapshot`.
#[derive(Debug, Args)]
#[command(group(
    ArgGroup::new("source").required(true).args(["builtin", "kernel", "from_sandbox"])
))]
pub struct SnapshotArgs {
    /// The new snapshot's tag ([A-Za-z0-9_-], up to 64).
    #[arg(value_name = "TAG")]
    pub tag_pos: Option<String>,
    /// The new snapshot's tag (same as the positional TAG).
    #[arg(long = "tag", value_name = "TAG", conflicts_with = "tag_pos")]
    pub tag_opt: Option<String>,
    /// Snapshot the built-in guest (boots on any KVM, PVM included).
    #[arg(long)]
    pub builtin: bool,
    /// Linux kernel (vmlinux or bzImage) in the daemon's images directory
    /// (its name there, or its full path).
    #[arg(long, value_name = "PATH", requires = "rootfs")]
    pub kernel: Option<String>,
    /// Root filesystem image (forkd-agent as init) in the daemon's images
    /// directory.
    #[arg(long, value_name = "PATH", requires = "kernel")]
    pub rootfs: Option<String>,
    /// Let the guest write its root filesystem (through a copy-on-write layer).
    #[arg(long, requires = "kernel")]
    pub rw: bool,
    /// Extra kernel command line arguments.
    #[arg(long, value_name = "ARGS", requires = "kernel")]
    pub kernel_args: Option<String>,
    /// Give the guest a network interface (172.16.0.2, the host side
    /// 172.16.0.1 in a network namespace); its children each get a
    /// namespace of their own with the same addresses.
    #[arg(long, conflicts_with_all = ["from_sandbox", "tap"])]
    pub network: bool,
    /// Put the guest's network interface on this host tap (made and
    /// addressed by you); its children each get a namespace holding a tap
    /// like it.
    #[arg(
        long,
        env = "FORKD_TAP",
        value_name = "DEV",
        conflicts_with = "from_sandbox"
    )]
    pub tap: Option<String>,
    /// Guest RAM in MiB.
    #[arg(
        long,
        visible_alias = "mem-size-mib",
        value_name = "MIB",
        conflicts_with = "from_sandbox"
    )]
    pub mem_mib: Option<u64>,
    /// vCPUs.
    #[arg(long, conflicts_with = "from_sandbox")]
    pub vcpus: Option<u8>,
    /// Longest wait for the guest agent to answer, in seconds.
    #[arg(long, value_name = "SECS", conflicts_with = "from_sandbox")]
    pub boot_wait_secs: Option<u64>,
    /// Branch this running sandbox instead (POST /v1/sandboxes/ID/branch).
    #[arg(long, value_name = "ID")]
    pub from_sandbox: Option<String>,
    /// Branch: store only the pages changed since the sandbox's snapshot.
    #[arg(long, conflicts_with_all = ["live", "builtin", "kernel"])]
    pub diff: bool,
    /// Branch: pause only to arm write protection; copy RAM while it runs.
    #[arg(long, conflicts_with_all = ["builtin", "kernel"])]
    pub live: bool,
    /// Branch: answer as soon as the sandbox runs again (status `writing`).
    #[arg(long, conflicts_with_all = ["builtin", "kernel"])]
    pub no_wait: bool,
}

impl SnapshotArgs {
    /// The tag given, positional or `--tag`.
    pub fn tag(&self) -> Option<&str> {
        self.tag_pos.as_deref().or(self.tag_opt.as_deref())
    }
}

/// `forkd spawn`.
#[derive(Debug, Args)]
pub struct SpawnArgs {
    /// The snapshot to fork.
    #[arg(long, value_name = "TAG")]
    pub tag: String,
    /// How many sandboxes (1 to 1000).
    #[arg(short, long = "n", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub n: u32,
    /// Children whose RAM can be live-branched (a private copy of the snapshot's memory each).
    #[arg(long)]
    pub live_fork: bool,
    /// Memory cap for each child (cgroup), in MiB (default: the daemon's).
    #[arg(long, value_name = "MIB")]
    pub memory_limit_mib: Option<u64>,
    /// CPU cap for each child, in CPUs (0.5: half of one; default: the
    /// daemon's).
    #[arg(long, value_name = "CPUS")]
    pub cpu_limit: Option<f64>,
    /// Most tasks each child's VMM may have (default: the daemon's).
    #[arg(long, value_name = "N")]
    pub pids_limit: Option<u64>,
    /// Most data each child's own disk layer may hold, in MiB (default:
    /// the daemon's); a guest write past it fails as an I/O error.
    #[arg(long, value_name = "MIB")]
    pub disk_quota_mib: Option<u64>,
    /// Most MiB/s each child's VMM may read, and as many write, on the
    /// daemon's disk (default: the daemon's).
    #[arg(long, value_name = "MIBPS")]
    pub io_limit_mibps: Option<u64>,
    /// Give every child its own network namespace (the default, and a
    /// must, for a snapshot with a network interface).
    #[arg(long)]
    pub per_child_netns: bool,
    /// Fault each child's RAM in right after its restore, so its first
    /// branch does not pay for it.
    #[arg(long)]
    pub prewarm: bool,
    /// Guest RAM on 2 MiB huge pages (4 KiB, with a warning, when the
    /// host has too few free).
    #[arg(long)]
    pub hugepages: bool,
    /// A label for each child (repeat it); `forkd ls --label KEY=VALUE`
    /// finds them.
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// End each child this many seconds after its spawn (`forkd timeout`
    /// extends it).
    #[arg(long, value_name = "SECS")]
    pub timeout_secs: Option<u64>,
    /// What the deadline does: kill, or pause (kept as a snapshot,
    /// `forkd resume` restores it).
    #[arg(long, value_name = "WHAT", value_parser = ["kill", "pause"], requires = "timeout_secs")]
    pub on_timeout: Option<String>,
    /// Print only the sandbox ids, one a line.
    #[arg(short, long)]
    pub quiet: bool,
}

/// `KEY=VALUE`.
pub fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

/// `forkd fork`.
#[derive(Debug, Args)]
pub struct ForkArgs {
    /// The snapshot to fork.
    #[arg(long, value_name = "TAG")]
    pub tag: String,
    /// How many sandboxes (1 to 1000).
    #[arg(short, long = "n", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub n: u32,
    /// Children whose RAM can be live-branched.
    #[arg(long)]
    pub live_fork: bool,
    /// Memory cap for each child (cgroup), in MiB.
    #[arg(long, value_name = "MIB")]
    pub memory_limit_mib: Option<u64>,
    /// Fault each child's RAM in right after its restore.
    #[arg(long)]
    pub prewarm: bool,
    /// Guest RAM on 2 MiB huge pages.
    #[arg(long)]
    pub hugepages: bool,
    /// Keep the children running this long after they answered, then kill
    /// them (SIGTERM or SIGINT ends the wait early; they are killed then
    /// too). 0: kill them at once.
    #[arg(long, value_name = "SECS", default_value_t = 0)]
    pub settle_secs: u64,
}

/// `forkd ls`.
#[derive(Debug, Args)]
pub struct LsArgs {
    /// Print only the sandbox ids, one a line.
    #[arg(short, long)]
    pub quiet: bool,
    /// Also the sandboxes whose VMM has exited (kept for the daemon's
    /// --exited-retention-secs), with how each ended.
    #[arg(short, long)]
    pub all: bool,
    /// Only those with this label (repeat it: all must match).
    #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
}

/// `forkd shell`.
#[derive(Debug, Args)]
pub struct ShellArgs {
    /// The sandbox.
    #[arg(value_name = "ID")]
    pub id: String,
    /// The guest user it runs as (a name or uid).
    #[arg(long, value_name = "USER")]
    pub user: Option<String>,
    /// Its working directory in the guest.
    #[arg(long, value_name = "DIR")]
    pub cwd: Option<String>,
    /// A variable for its environment (repeat it).
    #[arg(long = "env", short = 'e', value_name = "KEY=VALUE", value_parser = parse_label)]
    pub env: Vec<(String, String)>,
    /// What to run (default: `sh -l`), after `--`.
    #[arg(
        value_name = "ARGS",
        trailing_var_arg = true,
        allow_hyphen_values = true
    )]
    pub args: Vec<String>,
}

/// `forkd cp`.
#[derive(Debug, Args)]
pub struct CpArgs {
    /// From: a local path, `-` (standard input), or ID:/guest/path.
    #[arg(value_name = "SRC")]
    pub src: String,
    /// To: a local path (a directory: the same name in it), `-`
    /// (standard output), or ID:/guest/path (ending in /: the same name in it).
    #[arg(value_name = "DST")]
    pub dst: String,
    /// Permission bits of a file copied in, octal (default 644).
    #[arg(long, value_name = "OCTAL")]
    pub mode: Option<String>,
    /// Make the guest directories missing on the way.
    #[arg(short, long)]
    pub parents: bool,
}

/// `forkd ls-files`.
#[derive(Debug, Args)]
pub struct LsFilesArgs {
    /// ID:/guest/directory.
    #[arg(value_name = "ID:PATH")]
    pub target: String,
}

/// `forkd timeout`.
#[derive(Debug, Args)]
pub struct TimeoutArgs {
    /// The sandbox.
    #[arg(value_name = "ID")]
    pub id: String,
    /// Seconds from now.
    #[arg(value_name = "SECS")]
    pub secs: u64,
}

/// `forkd kill`.
#[derive(Debug, Args)]
#[command(group(ArgGroup::new("which").required(true).args(["ids", "all", "tag"])))]
pub struct KillArgs {
    /// The sandboxes.
    #[arg(value_name = "ID")]
    pub ids: Vec<String>,
    /// Every sandbox the daemon runs.
    #[arg(long, conflicts_with_all = ["ids", "tag"])]
    pub all: bool,
    /// Every sandbox forked from this snapshot.
    #[arg(long, value_name = "TAG", conflicts_with = "ids")]
    pub tag: Option<String>,
}

/// `forkd rmi`.
#[derive(Debug, Args)]
pub struct RmiArgs {
    /// The snapshots, deleted in order.
    #[arg(value_name = "TAG", required = true)]
    pub tags: Vec<String>,
    /// Delete the snapshots that depend on it too.
    #[arg(long, conflicts_with = "force")]
    pub cascade: bool,
    /// Delete it even though others depend on it (they become unusable)
    /// or sandboxes spawned from it run (they run on; their next branch
    /// must be a full one).
    #[arg(long)]
    pub force: bool,
}

/// A snapshot tag.
#[derive(Debug, Args)]
pub struct TagArg {
    /// The snapshot.
    #[arg(value_name = "TAG")]
    pub tag: String,
}

/// A sandbox id.
#[derive(Debug, Args)]
pub struct IdArg {
    /// The sandbox.
    #[arg(value_name = "ID")]
    pub id: String,
}

/// `forkd compact`.
#[derive(Debug, Args)]
pub struct CompactArgs {
    /// The snapshot (a diff chain head).
    #[arg(value_name = "TAG")]
    pub tag: String,
    /// Tag of the flat copy.
    #[arg(long, value_name = "NEW")]
    pub to: String,
}

/// `forkd exec`.
#[derive(Debug, Args)]
pub struct ExecArgs {
    /// The sandbox.
    #[arg(value_name = "ID")]
    pub id: String,
    /// Longest run, in seconds (the daemon's default is 60).
    #[arg(long, value_name = "SECS")]
    pub timeout_secs: Option<u64>,
    /// Give this file to the program's standard input (`-`: this one's).
    #[arg(long, value_name = "PATH")]
    pub stdin_file: Option<PathBuf>,
    /// A variable for its environment (repeat it).
    #[arg(long = "env", short = 'e', value_name = "KEY=VALUE", value_parser = parse_label)]
    pub env: Vec<(String, String)>,
    /// Its working directory in the guest.
    #[arg(long, value_name = "DIR")]
    pub cwd: Option<String>,
    /// The guest user it runs as (a name or uid).
    #[arg(long, value_name = "USER")]
    pub user: Option<String>,
    /// Print its output as it comes (the daemon's /exec/stream) instead
    /// of when it ends.
    #[arg(long)]
    pub stream: bool,
    /// The program and its arguments (after `--`).
    #[arg(
        value_name = "ARGS",
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true
    )]
    pub args: Vec<String>,
}

/// `forkd eval`.
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// The sandbox.
    #[arg(value_name = "ID")]
    pub id: String,
    /// The code (`-`: read it from standard input).
    #[arg(value_name = "CODE", allow_hyphen_values = true)]
    pub code: String,
    /// Longest run, in seconds.
    #[arg(long, value_name = "SECS")]
    pub timeout_secs: Option<u64>,
}

/// `forkd doctor`.
#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// The daemon's state directory (checked for free space).
    #[arg(long, env = "FORKD_STATE_DIR", value_name = "DIR", default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
}

/// `forkd quickstart`.
#[derive(Debug, Args)]
pub struct QuickstartArgs {
    /// How many children to fork (1 to 1000).
    #[arg(short, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub n: u32,
    /// Use a Linux image (--kernel and --rootfs) instead of the built-in guest.
    #[arg(long, requires_all = ["kernel", "rootfs"])]
    pub image: bool,
    /// Linux kernel for --image.
    #[arg(long, value_name = "PATH", requires = "image")]
    pub kernel: Option<String>,
    /// Root filesystem image for --image.
    #[arg(long, value_name = "PATH", requires = "image")]
    pub rootfs: Option<String>,
    /// Guest RAM in MiB for a new snapshot (the daemon's default otherwise).
    #[arg(long, value_name = "MIB")]
    pub mem_mib: Option<u64>,
    /// State directory of the daemon started when none answers.
    #[arg(long, env = "FORKD_STATE_DIR", value_name = "DIR", default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// Longest wait for a started daemon to answer /healthz, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    pub daemon_start_secs: u64,
    /// Make the snapshot again even when one is there.
    #[arg(long)]
    pub fresh: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("forkd").chain(args.iter().copied()))
    }

    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn global_options_go_anywhere() {
        let c = parse(&[
            "ls",
            "--daemon-url",
            "http://h:1",
            "--json",
            "--timeout",
            "7",
        ])
        .unwrap();
        assert_eq!(c.global.daemon_url, "http://h:1");
        assert!(c.global.json);
        assert_eq!(c.global.timeout, 7);
        let c = parse(&["--daemon-token", "tok", "images"]).unwrap();
        assert_eq!(c.global.daemon_token.as_deref(), Some("tok"));
    }

    #[test]
    fn snapshot_takes_a_positional_or_named_tag() {
        let c = parse(&["snapshot", "--builtin", "t"]).unwrap();
        let Command::Snapshot(s) = c.command else {
            panic!()
        };
        assert!(s.builtin);
        assert_eq!(s.tag(), Some("t"));
        let c = parse(&["snapshot", "--builtin", "--tag", "u"]).unwrap();
        let Command::Snapshot(s) = c.command else {
            panic!()
        };
        assert_eq!(s.tag(), Some("u"));
        assert!(parse(&["snapshot", "--builtin", "t", "--tag", "u"]).is_err());
    }

    #[test]
    fn snapshot_needs_exactly_one_source() {
        assert!(parse(&["snapshot", "t"]).is_err());
        assert!(parse(&[
            "snapshot",
            "--builtin",
            "--kernel",
            "k",
            "--rootfs",
            "r",
            "t"
        ])
        .is_err());
        assert!(
            parse(&["snapshot", "--kernel", "k", "t"]).is_err(),
            "rootfs missing"
        );
        let c = parse(&[
            "snapshot",
            "--kernel",
            "/k",
            "--rootfs",
            "/r",
            "--rw",
            "--mem-mib",
            "512",
            "--vcpus",
            "2",
            "--boot-wait-secs",
            "30",
            "lin",
        ])
        .unwrap();
        let Command::Snapshot(s) = c.command else {
            panic!()
        };
        assert_eq!(s.kernel.as_deref(), Some("/k"));
        assert!(s.rw);
        assert_eq!(
            (s.mem_mib, s.vcpus, s.boot_wait_secs),
            (Some(512), Some(2), Some(30))
        );
    }

    #[test]
    fn branch_options_need_a_sandbox_and_one_mode() {
        let c = parse(&["snapshot", "--from-sandbox", "sb", "--live", "--no-wait"]).unwrap();
        let Command::Snapshot(s) = c.command else {
            panic!()
        };
        assert_eq!(s.from_sandbox.as_deref(), Some("sb"));
        assert!(s.live && s.no_wait && s.tag().is_none());
        assert!(parse(&["snapshot", "--from-sandbox", "sb", "--live", "--diff"]).is_err());
        assert!(parse(&["snapshot", "--builtin", "--diff", "t"]).is_err());
        assert!(parse(&["snapshot", "--kernel", "k", "--rootfs", "r", "--live", "t"]).is_err());
        assert!(parse(&["snapshot", "--builtin", "--no-wait", "t"]).is_err());
        assert!(parse(&["snapshot", "--from-sandbox", "sb", "--mem-mib", "1"]).is_err());
    }

    #[test]
    fn spawn_counts_are_bounded() {
        let c = parse(&["spawn", "--tag", "t", "-n", "1000", "--live-fork"]).unwrap();
        let Command::Spawn(s) = c.command else {
            panic!()
        };
        assert_eq!(s.n, 1000);
        assert!(s.live_fork);
        assert!(parse(&["spawn", "--tag", "t", "-n", "0"]).is_err());
        assert!(parse(&["spawn", "--tag", "t", "-n", "1001"]).is_err());
        assert!(parse(&["spawn", "-n", "2"]).is_err(), "tag is required");
    }

    #[test]
    fn exec_takes_everything_after_the_id() {
        let c = parse(&["exec", "sb-1", "--", "echo", "-n", "--x"]).unwrap();
        let Command::Exec(e) = c.command else {
            panic!()
        };
        assert_eq!(e.id, "sb-1");
        assert_eq!(e.args, ["echo", "-n", "--x"]);
        let c = parse(&["exec", "--timeout-secs", "5", "sb-1", "true"]).unwrap();
        let Command::Exec(e) = c.command else {
            panic!()
        };
        assert_eq!(e.timeout_secs, Some(5));
        assert_eq!(e.args, ["true"]);
        assert!(parse(&["exec", "sb-1"]).is_err());
    }

    #[test]
    fn kill_takes_ids_or_all() {
        let c = parse(&["kill", "a", "b"]).unwrap();
        let Command::Kill(k) = c.command else {
            panic!()
        };
        assert_eq!(k.ids, ["a", "b"]);
        assert!(parse(&["kill", "--all"]).is_ok());
        assert!(parse(&["kill"]).is_err());
        assert!(parse(&["kill", "--all", "a"]).is_err());
    }

    #[test]
    fn rmi_takes_cascade_or_force() {
        assert!(parse(&["rmi", "t", "--cascade"]).is_ok());
        assert!(parse(&["rmi", "t", "--force"]).is_ok());
        assert!(parse(&["rmi", "t", "--cascade", "--force"]).is_err());
    }

    #[test]
    fn quickstart_defaults_to_100_built_in_children() {
        let c = parse(&["quickstart"]).unwrap();
        let Command::Quickstart(q) = c.command else {
            panic!()
        };
        assert_eq!(q.n, 100);
        assert!(!q.image);
        assert!(
            parse(&["quickstart", "--image"]).is_err(),
            "needs kernel and rootfs"
        );
        assert!(
            parse(&["quickstart", "--kernel", "k"]).is_err(),
            "needs --image"
        );
        assert!(parse(&[
            "quickstart",
            "--image",
            "--kernel",
            "k",
            "--rootfs",
            "r",
            "-n",
            "5"
        ])
        .is_ok());
    }

    #[test]
    fn compact_and_eval_parse() {
        let c = parse(&["compact", "head", "--to", "flat"]).unwrap();
        let Command::Compact(a) = c.command else {
            panic!()
        };
        assert_eq!((a.tag.as_str(), a.to.as_str()), ("head", "flat"));
        let c = parse(&["eval", "sb", "-1 + 2"]).unwrap();
        let Command::Eval(e) = c.command else {
            panic!()
        };
        assert_eq!(e.code, "-1 + 2");
    }
}

/// `forkd cleanup`.
#[derive(Debug, Args)]
pub struct CleanupArgs {
    /// The daemon's state directory.
    #[arg(long, env = "FORKD_STATE_DIR", default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
    /// Remove what is listed (without it, nothing is touched).
    #[arg(short, long)]
    pub yes: bool,
}
