//! forkd-agent-cli: a command-line client of the guest agent, for scripts
//! (the nested lab's scenarios) and for poking a VM by hand.
//!
//! ```text
//! forkd-agent-cli (--vsock-uds PATH [--port N] | --unix PATH)
//!                 [--timeout-ms N] [--wait-ms N] COMMAND
//! COMMAND: ping | exec ARGS... | eval CODE | write LOCAL REMOTE | read REMOTE LOCAL
//! ```
//!
//! Every command but `exec` prints the agent's answer as one JSON object
//! on stdout, with `client_ms` added (wall time of the request as seen
//! here). `exec` streams the guest process's stdout and stderr to its own
//! and exits with the guest's exit code (128+N for signal N, 124 when the
//! agent killed it at the timeout). `eval` exits 1 when the code raised.
//! `--wait-ms N` first retries `ping` until the agent answers, for at most
//! N ms (boot readiness without a fixed sleep). Errors go to stderr with
//! exit status 1 (2 for a usage error).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use agent_client::agent::{ExecRequest, WriteRequest, DEFAULT_VSOCK_PORT};
use agent_client::{Client, ClientConfig, ClientError, Stream, Target};

const USAGE: &str = "usage: forkd-agent-cli (--vsock-uds PATH [--port N] | --unix PATH) \
[--timeout-ms N] [--wait-ms N] [--max-bytes N] \
(ping | exec ARGS... | eval CODE | write LOCAL REMOTE | read REMOTE LOCAL)";

/// What can go wrong in the CLI itself.
#[derive(Debug, thiserror::Error)]
enum CliError {
    /// The command line is wrong.
    #[error("{0}\n{USAGE}")]
    Usage(String),
    /// The agent call failed.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The agent did not answer ping in the wait window.
    #[error("the agent did not answer ping within {ms} ms; last error: {last}")]
    NotReady {
        /// The wait window.
        ms: u64,
        /// The last attempt's error.
        last: ClientError,
    },
    /// A local file could not be used.
    #[error("{path}: {source}")]
    Local {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// The parsed command line.
#[derive(Debug)]
struct Opts {
    target: Target,
    timeout: Duration,
    wait: Option<Duration>,
    max_bytes: u64,
    command: Vec<String>,
}

fn parse(args: &[String]) -> Result<Opts, CliError> {
    let mut uds = None;
    let mut unix = None;
    let mut port = DEFAULT_VSOCK_PORT;
    let mut timeout_ms = 60_000u64;
    let mut wait = None;
    let mut max_bytes = 1u64 << 30;
    let mut i = 0;
    let num = |v: Option<&String>, name: &str| -> Result<u64, CliError> {
        v.and_then(|s| s.parse().ok())
            .ok_or_else(|| CliError::Usage(format!("{name} takes a number")))
    };
    while i < args.len() && args[i].starts_with("--") {
        let v = args.get(i + 1);
        match args[i].as_str() {
            "--vsock-uds" => uds = v.map(PathBuf::from),
            "--unix" => unix = v.map(PathBuf::from),
            "--port" => port = num(v, "--port")? as u32,
            "--timeout-ms" => timeout_ms = num(v, "--timeout-ms")?,
            "--wait-ms" => wait = Some(Duration::from_millis(num(v, "--wait-ms")?)),
            "--max-bytes" => max_bytes = num(v, "--max-bytes")?,
            "--" => {
                i += 1;
                break;
            }
            other => return Err(CliError::Usage(format!("unknown option {other}"))),
        }
        if v.is_none() {
            return Err(CliError::Usage(format!("{} needs a value", args[i])));
        }
        i += 2;
    }
    let target = match (uds, unix) {
        (Some(uds), None) => Target::Vsock { uds, port },
        (None, Some(p)) => Target::Unix(p),
        _ => {
            return Err(CliError::Usage(
                "name the agent with exactly one of --vsock-uds PATH or --unix PATH".into(),
            ))
        }
    };
    let command = args[i..].to_vec();
    let arity_ok = match command.first().map(String::as_str) {
        Some("ping") => command.len() == 1,
        Some("exec") => command.len() >= 2,
        Some("eval") => command.len() == 2,
        Some("write") | Some("read") => command.len() == 3,
        Some(other) => return Err(CliError::Usage(format!("unknown command {other}"))),
        None => return Err(CliError::Usage("no command".into())),
    };
    if !arity_ok {
        return Err(CliError::Usage(format!(
            "wrong number of arguments for {}",
            command[0]
        )));
    }
    Ok(Opts {
        target,
        timeout: Duration::from_millis(timeout_ms),
        wait,
        max_bytes,
        command,
    })
}

/// Prints `answer` as JSON with `client_ms` added.
fn print_json(answer: impl serde::Serialize, started: Instant) {
    let mut v = serde_json::to_value(answer).expect("answers serialise");
    if let Some(o) = v.as_object_mut() {
        let ms = started.elapsed().as_secs_f64() * 1e3;
        o.insert(
            "client_ms".into(),
            serde_json::json!((ms * 10.0).round() / 10.0),
        );
    }
    println!("{v}");
}

/// Pings until the agent answers or `wait` passes.
fn wait_ready(opts: &Opts, wait: Duration) -> Result<(), CliError> {
    let deadline = Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let cfg = ClientConfig {
            connect_timeout: left.clamp(Duration::from_millis(100), Duration::from_secs(5)),
            request_timeout: left.clamp(Duration::from_millis(100), Duration::from_secs(10)),
            ..ClientConfig::default()
        };
        match Client::with_config(opts.target.clone(), cfg).ping() {
            Ok(_) => return Ok(()),
            Err(last) if Instant::now() >= deadline => {
                return Err(CliError::NotReady {
                    ms: wait.as_millis() as u64,
                    last,
                })
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

fn run(opts: Opts) -> Result<ExitCode, CliError> {
    if let Some(wait) = opts.wait {
        wait_ready(&opts, wait)?;
    }
    let cfg = ClientConfig {
        request_timeout: opts.timeout,
        ..ClientConfig::default()
    };
    let client = Client::with_config(opts.target.clone(), cfg);
    let started = Instant::now();
    let cmd = &opts.command;
    match cmd[0].as_str() {
        "ping" => print_json(client.ping()?, started),
        "eval" => {
            let r = client.eval(&cmd[1], opts.timeout)?;
            let failed = r.exit_code != 0 || r.error.is_some();
            print_json(&r, started);
            if failed {
                return Ok(ExitCode::FAILURE);
            }
        }
        "exec" => {
            let req = ExecRequest {
                timeout_ms: opts.timeout.as_millis() as u64,
                ..ExecRequest::new(cmd[1..].to_vec())
            };
            let status = client.exec(&req, &[], |stream, data| {
                let r = match stream {
                    Stream::Stdout => std::io::stdout().write_all(data),
                    Stream::Stderr => std::io::stderr().write_all(data),
                };
                r.is_ok()
            })?;
            let _ = std::io::stdout().flush();
            let code = match (status.timed_out, status.code, status.signal) {
                (true, _, _) => 124,
                (false, Some(c), _) => c,
                (false, None, Some(s)) => 128 + s,
                (false, None, None) => 1,
            };
            return Ok(ExitCode::from(code.clamp(0, 255) as u8));
        }
        "write" => {
            let local = PathBuf::from(&cmd[1]);
            let mut f = std::fs::File::open(&local).map_err(|source| CliError::Local {
                path: local.clone(),
                source,
            })?;
            let req = WriteRequest {
                path: cmd[2].clone(),
                mode: 0o644,
                append: false,
                create_dirs: true,
            };
            let bytes = client.write_from(&req, &mut f)?;
            print_json(
                serde_json::json!({"kind": "written", "bytes": bytes}),
                started,
            );
        }
        "read" => {
            let local = PathBuf::from(&cmd[2]);
            let mut f = std::fs::File::create(&local).map_err(|source| CliError::Local {
                path: local.clone(),
                source,
            })?;
            let bytes = client.read_to(&cmd[1], 0, opts.max_bytes, &mut f)?;
            f.sync_all().map_err(|source| CliError::Local {
                path: local,
                source,
            })?;
            print_json(serde_json::json!({"kind": "read", "bytes": bytes}), started);
        }
        _ => unreachable!("checked by parse"),
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "-h" || a == "--help") {
        println!("{USAGE}");
        return ExitCode::SUCCESS;
    }
    let result = parse(&args).and_then(run);
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("forkd-agent-cli: {e}");
            ExitCode::from(if matches!(e, CliError::Usage(_)) {
                2
            } else {
                1
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strs(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn parses_targets_and_commands() {
        let o = parse(&strs(&[
            "--vsock-uds",
            "/v.sock",
            "--wait-ms",
            "500",
            "exec",
            "uname",
            "-a",
        ]))
        .unwrap();
        assert_eq!(
            o.target,
            Target::Vsock {
                uds: "/v.sock".into(),
                port: 1024
            }
        );
        assert_eq!(o.wait, Some(Duration::from_millis(500)));
        assert_eq!(o.command, strs(&["exec", "uname", "-a"]));
        let o = parse(&strs(&["--unix", "/a", "--", "eval", "1+1"])).unwrap();
        assert_eq!(o.target, Target::Unix("/a".into()));
        assert!(parse(&strs(&["ping"])).is_err(), "no target");
        assert!(parse(&strs(&["--unix", "/a", "eval"])).is_err(), "no code");
        assert!(parse(&strs(&["--unix", "/a", "frob"])).is_err());
        assert!(parse(&strs(&["--unix", "/a", "--port"])).is_err());
        assert!(parse(&strs(&["--unix", "/a", "--port", "x", "ping"])).is_err());
    }
}
