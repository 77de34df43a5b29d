//! forkd-daemon: serves the forkd v1 REST API.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use forkd_daemon::serve::{serve, ServeArgs};

#[derive(Parser)]
#[command(
    name = "forkd-daemon",
    version,
    about = "Serves the forkd v1 REST API over forkd-vmm microVMs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the API until SIGTERM or SIGINT (sandboxes keep running and
    /// are re-adopted by the next start).
    Serve(Box<ServeArgs>),
}

fn main() -> ExitCode {
    // Everything the daemon and the forkd-vmm processes it starts create
    // (guest memory, vmstate, the database, logs) is for their owner only.
    // SAFETY: umask only sets this process's file mode creation mask.
    unsafe { libc::umask(0o077) };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FORKD_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let Command::Serve(args) = cli.command;
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("forkd-daemon: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let result = runtime.block_on(serve(*args));
    // A request still booting a guest for a snapshot is not waited for
    // past this; its half-made snapshot never reaches the registry.
    runtime.shutdown_timeout(std::time::Duration::from_secs(10));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("forkd-daemon: {e}");
            ExitCode::from(2)
        }
    }
}
