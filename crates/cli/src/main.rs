//! forkd: the command-line client of forkd-daemon.

mod args;
mod cleanup;
mod client;
mod commands;
mod doctor;
mod error;
mod fanout;
mod format;
mod guest;
mod progress;
mod quickstart;
#[cfg(test)]
mod testserver;

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;

use args::{Cli, Command};
use client::{Client, ClientOptions};
use commands::{Ctx, Outcome};
use error::CliError;

fn client_options(g: &args::Global) -> Result<ClientOptions, CliError> {
    Ok(ClientOptions {
        url: g.daemon_url.clone(),
        token: client::resolve_token(g.daemon_token.as_deref(), g.daemon_token_file.as_deref())?,
        ca_cert: g.ca_cert.clone(),
        timeout: Duration::from_secs(g.timeout.max(1)),
    })
}

fn doctor(g: &args::Global, a: &args::DoctorArgs, out: &mut dyn Write) -> Outcome {
    // The daemon check is one of many: a bad token or CA file must not stop the others.
    let opts = client_options(g).unwrap_or(ClientOptions {
        url: g.daemon_url.clone(),
        token: None,
        ca_cert: None,
        timeout: Duration::from_secs(3),
    });
    let client = Client::new(&opts).or_else(|_| {
        Client::new(&ClientOptions {
            url: args::DEFAULT_URL.into(),
            ca_cert: None,
            ..opts.clone()
        })
    })?;
    let checks = doctor::run_all(&a.state_dir, &client);
    let failed = checks.iter().any(|c| c.level == doctor::Level::Fail);
    if g.json {
        writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(&checks).expect("serializable")
        )?;
    } else {
        for c in &checks {
            writeln!(out, "{}", c.line())?;
        }
    }
    Ok(u8::from(failed))
}

fn run(cli: Cli) -> Outcome {
    // Unlocked handles: progress bars draw to standard error from their own
    // thread, which must not wait for a lock this one holds.
    let mut out = std::io::stdout();
    let mut err = std::io::stderr();
    let progress = err.is_terminal();
    let g = &cli.global;
    match &cli.command {
        Command::Doctor(a) => return doctor(g, a, &mut out),
        Command::Cleanup(a) => return cleanup::cleanup(a, g.json, &mut out),
        Command::Quickstart(a) => {
            let opts = client_options(g)?;
            return quickstart::quickstart(&opts, a, g.json, progress, &mut out, &mut err);
        }
        _ => {}
    }
    let mut ctx = Ctx {
        client: Client::new(&client_options(g)?)?,
        json: g.json,
        progress,
        out: &mut out,
        err: &mut err,
    };
    match &cli.command {
        Command::Snapshot(a) => commands::snapshot(&mut ctx, a),
        Command::Spawn(a) => commands::spawn(&mut ctx, a),
        Command::Fork(a) => commands::fork(&mut ctx, a),
        Command::Ls(a) => commands::ls(&mut ctx, a),
        Command::Images => commands::images(&mut ctx),
        Command::Kill(a) => commands::kill(&mut ctx, a),
        Command::Rmi(a) => commands::rmi(&mut ctx, a),
        Command::SnapshotInfo(a) => commands::snapshot_info(&mut ctx, a),
        Command::Compact(a) => commands::compact(&mut ctx, a),
        Command::Exec(a) => commands::exec(&mut ctx, a),
        Command::Eval(a) => commands::eval(&mut ctx, a),
        Command::Ping(a) => commands::ping(&mut ctx, a),
        Command::Shell(a) => guest::shell(&mut ctx, a),
        Command::Cp(a) => guest::cp(&mut ctx, a),
        Command::LsFiles(a) => guest::ls_files(&mut ctx, a),
        Command::Ps(a) => guest::ps(&mut ctx, a),
        Command::Pause(a) => guest::pause(&mut ctx, a),
        Command::Resume(a) => guest::resume(&mut ctx, a),
        Command::Timeout(a) => guest::timeout(&mut ctx, a),
        Command::Stats(a) => guest::stats(&mut ctx, a),
        Command::Version => commands::version(&mut ctx),
        Command::Where => commands::where_(&mut ctx),
        Command::Doctor(_) | Command::Quickstart(_) | Command::Cleanup(_) => {
            unreachable!("handled above")
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            let _ = std::io::stdout().flush();
            eprintln!("forkd: {e}");
            ExitCode::FAILURE
        }
    }
}
