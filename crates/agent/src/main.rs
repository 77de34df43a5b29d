//! forkd-agent: PID 1 of forkd's Linux guests and the guest side of the
//! agent protocol ([`proto::agent`]).
//!
//! ```text
//! forkd-agent [--unix PATH [--vsock-handshake] | --vsock-port N] [--python PYTHON] [--no-interpreter]
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
//! With `--vsock-handshake` its Unix socket first answers forkd-vmm's vsock
//! handshake (`CONNECT <port>` / `OK <port>`), so it can stand in for a
//! VM's vsock socket behind the daemon.

mod children;
mod config;
mod exec;
mod files;
mod init;
mod interp;
mod launch;
mod log;
mod net;
mod procs;
mod reply;
mod server;
mod session;
mod user;

use std::sync::Arc;
use std::time::Duration;

use config::Config;
use log::log;
use server::{Agent, Listener};

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
