//! forkd-agent: PID 1 of forkd's Linux guests and the guest side of the
//! agent protocol ([`proto::agent`]).
//!
//! ```text
//! forkd-agent [--unix PATH | --vsock-port N] [--python PYTHON] [--no-interpreter]
//!             [--warm CODE]... [--warm-file FILE] [--shutdown reboot|poweroff]
//!             [--guest NAME] [--init]
//! ```
//!
//! As PID 1 (or with `--init`) it mounts proc, sys, devtmpfs, devpts,
//! /dev/shm, /tmp and the volumes of `forkd.volumes=`, and reads these
//! kernel command-line parameters (flags given on its own command line win):
//!
//! - `forkd.port=N`: vsock port (default 1024)
//! - `forkd.volumes=SRC:DEST[:FSTYPE[:OPT+OPT]],...` (see [`init::Volume`])
//! - `forkd.net=ADDR/PREFIX[,GATEWAY[,IFNAME]]`: an IPv4 address (and
//!   default route) for the interface, `eth0` unless named (see
//!   [`net::NetConfig`])
//! - `forkd.warm=FILE`: Python warm-up recipe file (default `/etc/forkd/warm.py` if present)
//! - `forkd.python=PATH`, `forkd.interpreter=0` (no warm interpreter)
//! - `forkd.shutdown=reboot|poweroff`: how `poweroff` leaves (default
//!   `reboot`, the i8042 reset forkd-vmm ends the VM on)
//!
//! Not as PID 1 it serves until SIGTERM/SIGINT or a `poweroff` request,
//! then stops its children and exits: that is how the host tests run it.

mod children;
mod exec;
mod files;
mod init;
mod interp;
mod log;
mod net;
mod server;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use init::ShutdownMode;
use log::log;
use server::{Agent, Listener};

/// The agent's configuration.
#[derive(Clone, Debug)]
pub struct Config {
    unix: Option<PathBuf>,
    vsock_port: u32,
    python: String,
    interpreter: bool,
    warm: Vec<String>,
    warm_file: Option<PathBuf>,
    shutdown: ShutdownMode,
    guest: String,
    init: bool,
    volumes: Vec<init::Volume>,
    net: Option<net::NetConfig>,
}

const USAGE: &str = "usage: forkd-agent [--unix PATH | --vsock-port N] [--python PYTHON] [--no-interpreter] [--warm CODE]... [--warm-file FILE] [--shutdown reboot|poweroff] [--guest NAME] [--init]";

fn parse_shutdown(s: &str) -> Result<ShutdownMode, String> {
    match s {
        "reboot" => Ok(ShutdownMode::Reboot),
        "poweroff" => Ok(ShutdownMode::Poweroff),
        _ => Err(format!("shutdown mode {s:?}: use reboot or poweroff")),
    }
}

impl Config {
    fn parse(args: &[String], pid1: bool) -> Result<Config, String> {
        let mut c = Config {
            unix: None,
            vsock_port: proto::agent::DEFAULT_VSOCK_PORT,
            python: "python3".into(),
            interpreter: true,
            warm: Vec::new(),
            warm_file: None,
            shutdown: ShutdownMode::Reboot,
            guest: "guest: linux".into(),
            init: pid1,
            volumes: Vec::new(),
            net: None,
        };
        let mut explicit = Vec::new();
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let mut val = |name: &str| {
                it.next()
                    .cloned()
                    .ok_or_else(|| format!("{name} needs a value\n{USAGE}"))
            };
            match a.as_str() {
                "--unix" => c.unix = Some(val(a)?.into()),
                "--vsock-port" => {
                    c.vsock_port = val(a)?
                        .parse()
                        .map_err(|_| format!("--vsock-port needs a number\n{USAGE}"))?
                }
                "--python" => c.python = val(a)?,
                "--no-interpreter" => c.interpreter = false,
                "--warm" => c.warm.push(val(a)?),
                "--warm-file" => c.warm_file = Some(val(a)?.into()),
                "--shutdown" => c.shutdown = parse_shutdown(&val(a)?)?,
                "--guest" => c.guest = val(a)?,
                "--init" => c.init = true,
                "-h" | "--help" => return Err(USAGE.to_string()),
                // The kernel hands init the command-line words it does not know.
                other if pid1 => {
                    log!("ignoring argument {other:?}");
                    continue;
                }
                other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
            }
            explicit.push(a.clone());
        }
        if c.init {
            let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
            c.apply_cmdline(&cmdline, &explicit);
        }
        Ok(c)
    }

    /// Takes `forkd.*` kernel parameters for what the command line did not set.
    fn apply_cmdline(&mut self, cmdline: &str, explicit: &[String]) {
        let set = |f: &str| explicit.iter().any(|e| e == f);
        for (k, v) in init::forkd_params(cmdline) {
            match k.as_str() {
                "port" if !set("--vsock-port") => match v.parse() {
                    Ok(p) => self.vsock_port = p,
                    Err(_) => log!("forkd.port={v}: not a number"),
                },
                "volumes" => match init::parse_volumes(&v) {
                    Ok(vols) => self.volumes = vols,
                    Err(e) => log!("forkd.volumes: {e}"),
                },
                "net" => match net::parse(&v) {
                    Ok(n) => self.net = Some(n),
                    Err(e) => log!("forkd.net: {e}"),
                },
                "warm" if !set("--warm-file") => self.warm_file = Some(v.into()),
                "python" if !set("--python") => self.python = v,
                "interpreter" if v == "0" || v == "off" => self.interpreter = false,
                "shutdown" if !set("--shutdown") => match parse_shutdown(&v) {
                    Ok(m) => self.shutdown = m,
                    Err(e) => log!("forkd.shutdown: {e}"),
                },
                _ => {}
            }
        }
        if self.warm_file.is_none() && std::path::Path::new("/etc/forkd/warm.py").exists() {
            self.warm_file = Some("/etc/forkd/warm.py".into());
        }
    }

    /// The warm-up recipe: the `--warm` snippets, then the file.
    fn warm_code(&self) -> Option<String> {
        let mut code = self.warm.join("\n");
        if let Some(f) = &self.warm_file {
            match std::fs::read_to_string(f) {
                Ok(s) => {
                    code.push('\n');
                    code.push_str(&s);
                }
                Err(e) => log!("warm-up file {}: {e}", f.display()),
            }
        }
        (!code.trim().is_empty()).then_some(code)
    }
}

/// Power off as asked: as PID 1 leave the machine; otherwise stop the
/// children and exit.
fn power_off(agent: &Agent) {
    if agent.cfg.init {
        init::shutdown(agent.cfg.shutdown);
    } else {
        exit_not_pid1();
    }
}

fn exit_not_pid1() {
    // Every child runs in its own process group; signal the groups.
    // Our own group is not theirs: walk /proc for our children.
    let me = std::process::id();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // Field 4 (after the parenthesised name) is the parent pid.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            if ppid == Some(me) {
                children::kill_group(pid, libc::SIGKILL);
            }
        }
    }
    std::process::exit(0);
}

fn run(cfg: Config) {
    let interp = cfg.interpreter.then(|| {
        let i = interp::Interpreter::new(cfg.python.clone(), cfg.warm_code());
        i.start_background();
        i
    });
    let listener = loop {
        let l = match &cfg.unix {
            Some(p) => Listener::unix(p),
            None => Listener::vsock(cfg.vsock_port),
        };
        match l {
            Ok(l) => break l,
            Err(e) if cfg.init => {
                log!("cannot listen ({e}); retrying");
                std::thread::sleep(Duration::from_secs(1));
            }
            Err(e) => {
                log!("cannot listen: {e}");
                std::process::exit(1);
            }
        }
    };
    match &cfg.unix {
        Some(p) => log!("listening on {}", p.display()),
        None => log!("listening on vsock port {}", cfg.vsock_port),
    }
    let agent = Arc::new(Agent::new(cfg, interp, power_off));
    agent.serve(&listener);
}

fn main() {
    // SAFETY: getpid(2) has no arguments.
    let pid1 = unsafe { libc::getpid() } == 1;
    if pid1 {
        init::ensure_std_fds();
        // The forkd.* parameters are read from /proc/cmdline (the kernel
        // hands init no parameter with a dot in it): mount /proc first.
        if let Err(e) = init::mount_proc() {
            log!("mount proc on /proc: {e}; the forkd.* kernel parameters cannot be read");
        }
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cfg = match Config::parse(&args, pid1) {
        Ok(c) => c,
        Err(e) => {
            log!("{e}");
            if !pid1 {
                std::process::exit(2);
            }
            Config::parse(&[], true).expect("the defaults parse")
        }
    };
    if cfg.init {
        // Before any thread: setup sets environment variables.
        init::setup(&cfg.volumes, cfg.net.as_ref());
    }
    children::block_signals();
    if let Err(e) = children::start_signal_thread(pid1, exit_not_pid1) {
        log!("no signal thread: {e}");
        if !pid1 {
            std::process::exit(1);
        }
    }
    loop {
        let c = cfg.clone();
        let r = std::panic::catch_unwind(move || run(c));
        if !pid1 {
            std::process::exit(if r.is_ok() { 0 } else { 101 });
        }
        // PID 1 must never end: that panics the kernel.
        log!(
            "the agent's main loop ended ({}); restarting it",
            if r.is_ok() { "returned" } else { "panicked" }
        );
        std::thread::sleep(Duration::from_secs(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_and_cmdline() {
        let a: Vec<String> = [
            "--unix",
            "/tmp/a.sock",
            "--warm",
            "import os",
            "--shutdown",
            "poweroff",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let c = Config::parse(&a, false).unwrap();
        assert_eq!(c.unix, Some(PathBuf::from("/tmp/a.sock")));
        assert_eq!(c.shutdown, ShutdownMode::Poweroff);
        assert_eq!(c.warm_code().as_deref(), Some("import os"));
        assert!(Config::parse(&["--bogus".to_string()], false).is_err());
        assert!(Config::parse(&["--vsock-port".to_string()], false).is_err());

        let mut c = Config::parse(&["--vsock-port".into(), "5".into()], false).unwrap();
        c.apply_cmdline(
            "forkd.port=9 forkd.shutdown=poweroff forkd.interpreter=0 forkd.volumes=/dev/vdb:/d forkd.net=172.16.0.2/30,172.16.0.1",
            &["--vsock-port".into()],
        );
        assert_eq!(c.vsock_port, 5, "the command line wins");
        assert_eq!(c.shutdown, ShutdownMode::Poweroff);
        assert!(!c.interpreter);
        assert_eq!(c.volumes.len(), 1);
        let net = c.net.expect("forkd.net= is taken");
        assert_eq!((net.ifname.as_str(), net.prefix), ("eth0", 30));
    }
}
