//! forkd-vmm: runs one microVM in this process, driven over a control socket.

mod control;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use vmm::builder::{self, BootSource, MachineConfig};
use vmm::devices::serial::ConsoleOutput;
use vmm::kvm::vcpu::ExitReason;
use vmm::memory::Backend;

#[derive(Parser)]
#[command(name = "forkd-vmm", version, about = "Runs one forkd microVM on KVM")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a microVM: a Linux kernel, or the built-in guest.
    Run(RunArgs),
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
    /// What backs guest RAM.
    #[arg(long, value_enum, default_value_t = MemoryBackend::Anonymous)]
    memory_backend: MemoryBackend,
    /// Where the serial console goes: `stdout`, `none`, or a file path.
    #[arg(long, default_value = "stdout")]
    console: String,
    /// Unix socket to serve the control protocol on (created; removed on exit).
    #[arg(long)]
    control_socket: Option<PathBuf>,
}

#[derive(Clone, Copy, ValueEnum)]
enum MemoryBackend {
    /// Private anonymous memory.
    Anonymous,
    /// A memfd mapped shared (needed for live BRANCH).
    Memfd,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => match run(args) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("forkd-vmm: {e}");
                ExitCode::from(2)
            }
        },
    }
}

fn run(args: RunArgs) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let console = match args.console.as_str() {
        "stdout" => ConsoleOutput::Stdout,
        "none" => ConsoleOutput::Sink,
        path => ConsoleOutput::File(PathBuf::from(path)),
    };
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
        },
        boot,
        console,
    };
    // Bind before booting so a client can connect as soon as the socket exists.
    let listener = args
        .control_socket
        .as_deref()
        .map(control::bind)
        .transpose()?;
    let machine = std::sync::Arc::new(builder::build_for_boot(&cfg)?);
    if let Some(listener) = listener {
        control::serve(listener, machine.clone())?;
    }
    let reason = machine.wait_for_exit();
    if let Some(path) = &args.control_socket {
        let _ = std::fs::remove_file(path);
    }
    Ok(match reason {
        ExitReason::Requested | ExitReason::GuestReset | ExitReason::GuestPowerOff => {
            ExitCode::SUCCESS
        }
        other => {
            eprintln!("forkd-vmm: the VM stopped: {other}");
            ExitCode::FAILURE
        }
    })
}
