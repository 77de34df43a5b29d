//! forkd-vmm: runs one microVM in this process, driven over a control socket.

mod control;
mod fork;
mod jail;
mod net;
mod seccomp;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use vmm::builder::{self, BootSource, MachineConfig};
use vmm::devices::serial::ConsoleOutput;
use vmm::devices::virtio::block::{BlockConfig, DiskConfig};
use vmm::devices::virtio::manager::{VirtioConfig, VsockConfig};
use vmm::devices::virtio::net::{parse_mac, NetConfig};
use vmm::kvm::vcpu::ExitReason;
use vmm::memory::Backend;

#[derive(Parser)]
#[command(name = "forkd-vmm", version, about = "Runs one forkd microVM on KVM")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// The seccomp filters of the VMM's threads (a VMM started by `run`,
    /// `restore`, `fork` or `fork-server`): `on` ends a VMM that makes a
    /// system call its thread's filter forbids (exit status 159, its log
    /// naming the call); `log` lets the call through and has the kernel
    /// log it (the audit log, dmesg), to find what a new code path needs;
    /// `off` runs unconfined, for debugging only.
    #[arg(long, global = true, value_enum, env = "FORKD_SECCOMP", default_value_t = seccomp::Mode::Enforce)]
    seccomp: seccomp::Mode,
    /// The jail of the children of `fork` and `fork-server` (and of `run`
    /// and `restore` given `--jail-dir`): `on` has each give up root (a uid of its own, no
    /// capabilities, a root holding only its directory) once it holds
    /// what only root may open, before its guest runs; `off` leaves them
    /// root in the host's mount namespace, for debugging only.
    #[arg(long, global = true, value_enum, env = "FORKD_JAIL", default_value_t = Jail::On)]
    jail: Jail,
}

/// `--jail`.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Jail {
    On,
    Off,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a microVM: a Linux kernel, or the built-in guest.
    Run(Box<RunArgs>),
    /// Restore one microVM from a snapshot directory.
    Restore(RestoreArgs),
    /// Start N children of a snapshot: the snapshot is read and checked
    /// once, then this process forks once per child. Prints one JSON line
    /// per child ({"index", "pid", "dir", "control_socket"}) and returns;
    /// the children keep running until shut down.
    Fork(fork::ForkArgs),
    /// Hold a snapshot read and checked, and fork children of it on request
    /// (JSON lines on a Unix socket: `{"op":"fork","n":N,"out_dir":D}`,
    /// optionally with `"paused"`, `"console_log"` and `"memfd"` true, and
    /// `"netns"`, a network namespace per child). How each child ended is
    /// written to `exit.json` in its directory before the child is reaped.
    ForkServer(fork::ForkServerArgs),
    /// Flatten a snapshot and the chain it stands on into one
    /// self-contained full snapshot (memory assembled, every frozen drive
    /// layer brought in) and print its snapshot.json.
    Compact(CompactArgs),
    /// Send one JSON request to a control socket and print the JSON
    /// response (exit status 1 when the response is an error).
    Ctl(CtlArgs),
    /// Hash every file a snapshot's snapshot.json records a hash for and
    /// compare. Exit status 0: every file matches, one JSON line on stdout
    /// (the files with their identity as hashed, bytes hashed, time taken);
    /// 1: a file does not match (stderr names it, with what was expected
    /// and found); 3: the snapshot cannot be verified, so cannot be
    /// restored either (a file missing or unreadable, snapshot.json bad or
    /// not ready); 4: a file changed while it was hashed (verify again);
    /// 2: a usage error.
    Verify(VerifyArgs),
    /// Check that a thread kind's seccomp filter is in force: a thread
    /// takes the filter, prints `confined <kind>`, then makes a call no
    /// filter allows. Exit status 159 with a line on stderr naming the
    /// call: the filter works; 1: the call went through.
    SeccompSelfTest(SeccompSelfTestArgs),
}

#[derive(Args)]
struct SeccompSelfTestArgs {
    /// The kind of thread whose filter to test.
    #[arg(long, value_enum)]
    thread: ThreadKind,
}

#[derive(Clone, Copy, ValueEnum)]
enum ThreadKind {
    Control,
    Vcpu,
    Device,
    Copy,
}

#[derive(Args)]
struct VerifyArgs {
    /// The snapshot directory.
    #[arg(long)]
    snapshot: PathBuf,
}

#[derive(Args)]
struct CtlArgs {
    /// The VM's control socket.
    #[arg(long)]
    control_socket: PathBuf,
    /// Longest wait for the response, in seconds.
    #[arg(long, default_value_t = 600)]
    timeout_secs: u64,
    /// The request, e.g. '{"op":"status"}'.
    request: String,
}

#[derive(Args)]
struct CompactArgs {
    /// The snapshot to compact (must be ready; left as it is).
    #[arg(long)]
    snapshot: PathBuf,
    /// The compacted snapshot's directory (must not exist).
    #[arg(long)]
    to: PathBuf,
}

#[derive(Args)]
struct RestoreArgs {
    /// Snapshot directory.
    #[arg(long)]
    snapshot: PathBuf,
    /// Where the serial console goes: `stdout`, `none`, or a file path.
    #[arg(long, default_value = "stdout")]
    console: String,
    /// Unix socket to serve the control protocol on (created; removed on exit).
    #[arg(long)]
    control_socket: Option<PathBuf>,
    /// Start paused: vCPUs wait for `resume` on the control socket.
    #[arg(long)]
    paused: bool,
    /// Fault guest RAM in for reading before the vCPUs run, so the first
    /// snapshot reads RAM without page faults.
    #[arg(long)]
    prewarm: bool,
    /// This VM's own copy-on-write layer for each of the snapshot's
    /// drives, in order (repeat the flag; created, must not exist).
    #[arg(long = "cow-layer")]
    cow_layers: Vec<PathBuf>,
    /// The most data each of this VM's own copy-on-write layers may hold,
    /// in MiB: a write that needs more fails in the guest as an I/O error
    /// and the layer stops growing. Default: no quota.
    #[arg(long, value_name = "MIB", value_parser = clap::value_parser!(u64).range(1..=proto::api::DISK_QUOTA_MIB_MAX))]
    disk_quota_mib: Option<u64>,
    /// This VM's vsock socket (needed when the snapshot has a vsock device).
    #[arg(long)]
    vsock_uds: Option<PathBuf>,
    /// What backs guest RAM. Default: the snapshot's memory file mapped
    /// copy-on-write (nothing copied). `memfd` or `memfd-hugetlb` copy its
    /// data into a memfd so the VM can be live-BRANCHed in turn.
    #[arg(long, value_enum)]
    memory_backend: Option<MemoryBackend>,
    /// Network namespace (under /var/run/netns) holding the taps this VM
    /// attaches to: one per network interface of the snapshot, of the name
    /// its `snapshot.json` records, made beforehand (`ip -n NS tuntap add
    /// dev NAME mode tap`). Default: this process's namespace.
    #[arg(long, value_name = "NS")]
    netns: Option<String>,
    /// With `--jail on` (the default), jail this VMM as a forked child is,
    /// once it holds its taps and userfaultfd and before its guest runs:
    /// this directory (absolute; its sockets, console and layers go
    /// there) becomes its own and the only one it sees, and it gives up
    /// root.
    #[arg(long)]
    jail_dir: Option<PathBuf>,
}

#[derive(Args)]
struct RunArgs {
    /// Boot the built-in guest instead of a kernel.
    #[arg(long, conflicts_with_all = ["kernel", "initrd", "cmdline"])]
    builtin: bool,
    /// Linux kernel: an ELF vmlinux or a bzImage.
    #[arg(long, required_unless_present = "builtin")]
    kernel: Option<PathBuf>,
    /// Initial ramdisk for the kernel.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line (default: a serial-console microVM line).
    #[arg(long)]
    cmdline: Option<String>,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 128)]
    mem_mib: u64,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    /// With `--jail on` (the default), jail this VMM as a forked child
    /// is, once its machine is built and before its guest runs: this
    /// directory (absolute; its control socket, console and layers go
    /// there) becomes its own and the only one it sees, and it gives up
    /// root. The daemon's source VMs run so.
    #[arg(long)]
    jail_dir: Option<PathBuf>,
    /// What backs guest RAM.
    #[arg(long, value_enum, default_value_t = MemoryBackend::Anonymous)]
    memory_backend: MemoryBackend,
    /// Where the serial console goes: `stdout`, `none`, or a file path.
    #[arg(long, default_value = "stdout")]
    console: String,
    /// Unix socket to serve the control protocol on (created; removed on exit).
    #[arg(long)]
    control_socket: Option<PathBuf>,
    /// A virtio block drive: `PATH[,ro][,cow=LAYER][,id=SERIAL]`. PATH is a
    /// raw image; with a CoW layer it is read-only and writes go to the
    /// layer (created if missing); without one, writes go to PATH unless
    /// `ro`. Repeat for more drives.
    #[arg(long = "drive", value_name = "PATH[,ro][,cow=LAYER][,id=SERIAL]")]
    drives: Vec<String>,
    /// A drive whose image path is taken whole, commas and all (the first
    /// drive; `--drive` specs follow it). Its layer is --cow-layer.
    #[arg(long, value_name = "PATH")]
    drive_image: Option<PathBuf>,
    /// The first drive's copy-on-write layer (same as `cow=` in --drive).
    #[arg(long)]
    cow_layer: Option<PathBuf>,
    /// The most data each of this VM's own copy-on-write layers may hold,
    /// in MiB: a write that needs more fails in the guest as an I/O error
    /// and the layer stops growing. Default: no quota.
    #[arg(long, value_name = "MIB", value_parser = clap::value_parser!(u64).range(1..=proto::api::DISK_QUOTA_MIB_MAX))]
    disk_quota_mib: Option<u64>,
    /// A virtio-vsock device whose host side listens on this Unix socket
    /// (connect and send `CONNECT <port>\n`; guest connections to host
    /// port P go to `<PATH>_<P>`).
    #[arg(long)]
    vsock_uds: Option<PathBuf>,
    /// The guest's vsock CID.
    #[arg(long, default_value_t = 3, requires = "vsock_uds")]
    vsock_cid: u64,
    /// A virtio-net device on this tap device (created if missing).
    #[arg(long, requires = "mac")]
    tap: Option<String>,
    /// The guest's MAC address, `aa:bb:cc:dd:ee:ff`.
    #[arg(long, requires = "tap")]
    mac: Option<String>,
    /// Network namespace (under /var/run/netns) to create the tap in.
    #[arg(long, requires = "tap")]
    netns: Option<String>,
    /// A virtio-rng device fed from the host's getrandom.
    #[arg(long)]
    rng: bool,
}

/// The virtio devices `args` asks for.
fn virtio_config(args: &RunArgs) -> Result<VirtioConfig, String> {
    let mut cfg = VirtioConfig {
        rng: args.rng,
        ..Default::default()
    };
    if args.cow_layer.is_some() && args.drive_image.is_none() && args.drives.is_empty() {
        return Err("--cow-layer is the first drive's layer: give --drive-image or --drive".into());
    }
    if let Some(image) = &args.drive_image {
        cfg.drives.push(BlockConfig {
            disk: DiskConfig {
                base: Some(image.clone()),
                cow: args.cow_layer.clone(),
                ..Default::default()
            },
            id: "forkd0".into(),
        });
    }
    let first = cfg.drives.len();
    for (i, spec) in args.drives.iter().enumerate() {
        let i = i + first;
        let mut parts = spec.split(',');
        let path = parts.next().filter(|p| !p.is_empty()).ok_or_else(|| {
            format!("--drive {spec:?}: give the image path first, e.g. --drive disk.img,ro")
        })?;
        let mut drive = BlockConfig {
            disk: DiskConfig {
                base: Some(PathBuf::from(path)),
                ..Default::default()
            },
            id: format!("forkd{i}"),
        };
        for opt in parts {
            match opt.split_once('=') {
                None if opt == "ro" => drive.disk.read_only = true,
                Some(("cow", p)) => drive.disk.cow = Some(PathBuf::from(p)),
                Some(("id", id)) => drive.id = id.to_owned(),
                _ => {
                    return Err(format!(
                        "--drive {spec:?}: unknown option {opt:?} (known: ro, cow=PATH, id=SERIAL)"
                    ))
                }
            }
        }
        if i == 0 {
            if let Some(layer) = &args.cow_layer {
                drive.disk.cow = Some(layer.clone());
            }
        }
        cfg.drives.push(drive);
    }
    for drive in &mut cfg.drives {
        drive.disk.quota = args.disk_quota_mib.map(|m| m << 20);
    }
    if let Some(uds) = &args.vsock_uds {
        cfg.vsock = Some(VsockConfig {
            uds_path: uds.clone(),
            cid: args.vsock_cid,
        });
    }
    if let (Some(tap), Some(mac)) = (&args.tap, &args.mac) {
        let mac = parse_mac(mac).ok_or_else(|| {
            format!("--mac {mac:?}: write it as six hex pairs, aa:bb:cc:dd:ee:ff")
        })?;
        cfg.nets.push(NetConfig {
            tap: tap.clone(),
            netns: args.netns.clone(),
            mac,
        });
    }
    Ok(cfg)
}

#[derive(Clone, Copy, ValueEnum)]
enum MemoryBackend {
    /// Private anonymous memory.
    Anonymous,
    /// A memfd mapped shared (needed for live BRANCH).
    Memfd,
    /// A memfd of 2 MiB huge pages mapped shared: live BRANCH arms in
    /// microseconds; needs huge pages reserved (/proc/sys/vm/nr_hugepages).
    MemfdHugetlb,
}

/// The library's diagnostics go to standard error (the VMM's `vmm.log`
/// when the daemon or a fork server starts it), at the level `FORKD_LOG`
/// names (error, warn, info, debug, trace; default info). A plain level,
/// not a filter expression: the subscriber costs next to nothing at start,
/// which every restored child pays.
fn init_logging() {
    let level = std::env::var("FORKD_LOG")
        .ok()
        .and_then(|v| v.parse::<tracing_subscriber::filter::LevelFilter>().ok())
        .unwrap_or(tracing_subscriber::filter::LevelFilter::INFO);
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_ansi(false)
        .with_writer(std::io::stderr)
        .init();
}

fn main() -> ExitCode {
    init_logging();
    let cli = Cli::parse();
    let vmm_command = matches!(
        cli.command,
        Command::Run(_) | Command::Restore(_) | Command::Fork(_) | Command::ForkServer(_)
    );
    if vmm_command {
        // Compiled once, before any thread starts; a fork server's
        // children inherit them.
        if let Err(e) = seccomp::configure(cli.seccomp) {
            eprintln!("forkd-vmm: {e}");
            return ExitCode::from(2);
        }
        jail::configure(cli.jail == Jail::On);
    }
    let result = match cli.command {
        Command::Run(args) => run(*args),
        Command::Restore(args) => restore(args),
        Command::Fork(args) => fork::fork(args),
        Command::ForkServer(args) => fork::fork_server(args),
        Command::Compact(args) => compact(args),
        Command::Ctl(args) => ctl(args),
        Command::Verify(args) => verify(args),
        Command::SeccompSelfTest(args) => seccomp_self_test(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("forkd-vmm: {e}");
            ExitCode::from(2)
        }
    }
}

/// `forkd-vmm ctl`: one request, its response on stdout.
fn ctl(args: CtlArgs) -> Result<ExitCode, Box<dyn std::error::Error>> {
    use proto::control::{ControlClient, ControlRequest, ControlResponse};
    let request: ControlRequest = serde_json::from_str(&args.request)
        .map_err(|e| format!("the request is not a control request: {e}"))?;
    let timeout = std::time::Duration::from_secs(args.timeout_secs.max(1));
    let mut client = ControlClient::connect(&args.control_socket, timeout).map_err(|e| {
        format!(
            "cannot connect to the control socket {}: {e}",
            args.control_socket.display()
        )
    })?;
    let response = client.call(&request)?;
    println!("{}", serde_json::to_string(&response)?);
    Ok(match response {
        ControlResponse::Error { .. } => ExitCode::FAILURE,
        _ => ExitCode::SUCCESS,
    })
}

/// Parses `--console`.
fn console_output(arg: &str) -> ConsoleOutput {
    match arg {
        "stdout" => ConsoleOutput::Stdout,
        "none" => ConsoleOutput::Sink,
        path => ConsoleOutput::File(PathBuf::from(path)),
    }
}

/// `forkd-vmm compact`: the compacted snapshot's metadata on stdout.
fn compact(args: CompactArgs) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let meta = vmm::snapshot::compact(&args.snapshot, &args.to)?;
    println!("{}", serde_json::to_string_pretty(&meta)?);
    Ok(ExitCode::SUCCESS)
}

/// `forkd-vmm verify`: a JSON line on stdout when the snapshot's files
/// match, exit status 1 on a mismatch, 2 (through `main`) when it cannot
/// be verified.
fn verify(args: VerifyArgs) -> Result<ExitCode, Box<dyn std::error::Error>> {
    match vmm::snapshot::verify(&args.snapshot) {
        Ok(verified) => {
            println!("{}", serde_json::to_string(&verified)?);
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            use vmm::snapshot::VerifyError;
            eprintln!("forkd-vmm verify: {e}");
            // A caller tells "corrupt" and "unusable" from "try again" and
            // from its own mistakes (clap's usage errors exit 2).
            Ok(ExitCode::from(match e {
                VerifyError::Mismatch { .. } => 1,
                VerifyError::Changed { .. } => 4,
                VerifyError::NotReady { .. } | VerifyError::Snapshot(_) => 3,
            }))
        }
    }
}

/// `forkd-vmm seccomp-self-test`: returns only when the filter let the
/// forbidden call through.
fn seccomp_self_test(args: SeccompSelfTestArgs) -> Result<ExitCode, Box<dyn std::error::Error>> {
    use vmm::seccomp::Kind;
    let (kind, name) = match args.thread {
        ThreadKind::Control => (Kind::Control, "control"),
        ThreadKind::Vcpu => (Kind::Vcpu, "vcpu"),
        ThreadKind::Device => (Kind::Device, "device"),
        ThreadKind::Copy => (Kind::Copy, "copy"),
    };
    seccomp::configure(seccomp::Mode::Enforce)?;
    let errno = std::thread::Builder::new()
        .name(format!("self-test-{name}"))
        .spawn(move || -> Result<std::io::Error, vmm::seccomp::Error> {
            vmm::seccomp::enter(kind)?;
            // Allowed calls still work under the filter.
            println!("confined {name}");
            Ok(seccomp::forbidden_call())
        })?
        .join()
        .map_err(|_| "the self-test thread panicked")??;
    eprintln!(
        "forkd-vmm seccomp-self-test: the {name} filter let execve through (it failed with \
         {errno}): it does not confine"
    );
    Ok(ExitCode::FAILURE)
}

/// The RAM `restore --memory-backend` asks for.
fn restore_ram(backend: Option<MemoryBackend>) -> Result<builder::RestoreRam, String> {
    match backend {
        None => Ok(builder::RestoreRam::SnapshotFile),
        Some(MemoryBackend::Memfd) => Ok(builder::RestoreRam::Memfd),
        Some(MemoryBackend::MemfdHugetlb) => Ok(builder::RestoreRam::HugeMemfd),
        Some(MemoryBackend::Anonymous) => Err(
            "--memory-backend anonymous does not apply to a restore: a restored VM's RAM is the \
             snapshot's memory file mapped copy-on-write (leave --memory-backend out) or a copy \
             of it in a memfd (memfd, memfd-hugetlb)"
                .into(),
        ),
    }
}

fn restore(args: RestoreArgs) -> Result<ExitCode, Box<dyn std::error::Error>> {
    // Checked before the snapshot is read: a bad flag is the first thing to hear of.
    let ram = restore_ram(args.memory_backend)?;
    if let Some(ns) = &args.netns {
        vmm::devices::virtio::net::check_netns_name(ns).map_err(|e| format!("--netns: {e}"))?;
    }
    let snapshot = vmm::snapshot::PreparedSnapshot::load(&args.snapshot)?;
    let mut cfg = builder::RestoreConfig {
        console: console_output(&args.console),
        paused: args.paused,
        drive_layers: args.cow_layers,
        vsock_uds: args.vsock_uds,
        netns: args.netns,
        ram,
        prewarm: args.prewarm,
        disk_quota: args.disk_quota_mib.map(|m| m << 20),
        taps: None,
        uffd: None,
    };
    let listener = args
        .control_socket
        .as_deref()
        .map(control::bind)
        .transpose()?;
    let machine = match args.jail_dir.filter(|_| jail::on()) {
        Some(dir) => {
            // What only root may open first (as a cold fork child does),
            // then the drop, before any thread starts.
            let kvm = std::sync::Arc::new(vmm::kvm::vm::open_kvm()?);
            let taps = net::open_taps(&snapshot, cfg.netns.as_deref())?;
            if !taps.is_empty() {
                cfg.taps = Some(std::sync::Arc::new(taps));
            }
            if cfg.ram != builder::RestoreRam::SnapshotFile {
                let uffd = vmm::memory::uffd::Uffd::new()
                    .map_err(|e| format!("a userfaultfd for live BRANCH: {e}"))?;
                cfg.uffd = Some(std::sync::Arc::new(uffd));
            }
            jail::drop_root(&dir)?;
            builder::prepare_restore(&snapshot, kvm, cfg.ram)?.finish(&cfg)?
        }
        None => builder::build_from_snapshot(&snapshot, &cfg)?,
    };
    let machine = std::sync::Arc::new(machine);
    confine_main_thread()?;
    Ok(serve_until_exit(
        machine,
        listener,
        args.control_socket.as_deref(),
        &control::Workers::new(),
    ))
}

/// Confines the main thread once its machine is built: what it does from
/// here on (serve the control socket, snapshot, branch) is the control
/// filter's.
fn confine_main_thread() -> Result<(), vmm::seccomp::Error> {
    vmm::seccomp::enter(vmm::seccomp::Kind::Control)
}

/// Serves the control socket (if any) with `workers` until the machine
/// stops; removes the socket and turns the exit reason into the process
/// exit code.
fn serve_until_exit(
    machine: std::sync::Arc<vmm::machine::Machine>,
    listener: Option<std::os::unix::net::UnixListener>,
    socket: Option<&std::path::Path>,
    workers: &control::Workers,
) -> ExitCode {
    let reason = control::serve_until_exit(listener, &machine, workers);
    if let Some(path) = socket {
        let _ = std::fs::remove_file(path);
    }
    match reason {
        ExitReason::Requested | ExitReason::GuestReset | ExitReason::GuestPowerOff => {
            ExitCode::SUCCESS
        }
        other => {
            eprintln!("forkd-vmm: the VM stopped: {other}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: RunArgs) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let console = console_output(&args.console);
    let virtio = virtio_config(&args)?;
    let boot = match args.kernel {
        Some(kernel) => builder::linux_boot(kernel, args.initrd, args.cmdline),
        None => BootSource::Builtin,
    };
    let cfg = MachineConfig {
        mem_mib: args.mem_mib,
        vcpus: args.vcpus,
        backend: match args.memory_backend {
            MemoryBackend::Anonymous => Backend::Anonymous,
            MemoryBackend::Memfd => Backend::Memfd,
            MemoryBackend::MemfdHugetlb => Backend::HugeMemfd,
        },
        boot,
        console,
        virtio,
    };
    // Bind before booting so a client can connect as soon as the socket exists.
    let listener = args
        .control_socket
        .as_deref()
        .map(control::bind)
        .transpose()?;
    let confine = args
        .jail_dir
        .filter(|_| jail::on())
        .map(|dir| -> builder::Confine {
            Box::new(move || jail::drop_root(&dir).map(|_| ()).map_err(|e| e.to_string()))
        });
    let machine = std::sync::Arc::new(builder::build_for_boot_confined(&cfg, confine)?);
    confine_main_thread()?;
    Ok(serve_until_exit(
        machine,
        listener,
        args.control_socket.as_deref(),
        &control::Workers::new(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn run_args(argv: &[&str]) -> RunArgs {
        let mut all = vec!["forkd-vmm", "run", "--builtin"];
        all.extend_from_slice(argv);
        match Cli::try_parse_from(all).unwrap().command {
            Command::Run(args) => *args,
            _ => unreachable!(),
        }
    }

    #[test]
    fn a_drive_image_is_taken_whole_and_its_layer_is_the_cow_layer() {
        let cfg = virtio_config(&run_args(&[
            "--drive-image",
            "/img/root,ro",
            "--cow-layer",
            "/d/root,fs.cow",
            "--drive",
            "/img/data,ro",
        ]))
        .unwrap();
        assert_eq!(cfg.drives.len(), 2);
        let first = &cfg.drives[0];
        assert_eq!(first.disk.base.as_deref(), Some(Path::new("/img/root,ro")));
        assert_eq!(first.disk.cow.as_deref(), Some(Path::new("/d/root,fs.cow")));
        assert!(
            !first.disk.read_only,
            "a comma in the path is not an option"
        );
        assert_eq!(first.id, "forkd0");
        let second = &cfg.drives[1];
        assert_eq!(second.disk.base.as_deref(), Some(Path::new("/img/data")));
        assert!(second.disk.read_only);
        assert_eq!(second.disk.cow, None, "--cow-layer is the first drive's");
        assert_eq!(second.id, "forkd1");
        // Without a drive, a layer has nothing to stack on.
        let err = virtio_config(&run_args(&["--cow-layer", "/c"]))
            .err()
            .unwrap();
        assert!(err.contains("--drive-image"), "{err}");
    }
}
