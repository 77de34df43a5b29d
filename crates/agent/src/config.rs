//! The agent's configuration: its command line, and as init the `forkd.*`
//! kernel parameters (see the crate's documentation).

use std::path::PathBuf;

use crate::init::{self, ShutdownMode};
use crate::log::log;
use crate::net;

/// The agent's configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub(crate) unix: Option<PathBuf>,
    pub(crate) vsock_port: u32,
    pub(crate) python: String,
    pub(crate) interpreter: bool,
    pub(crate) warm: Vec<String>,
    pub(crate) warm_file: Option<PathBuf>,
    pub(crate) shutdown: ShutdownMode,
    pub(crate) guest: String,
    pub(crate) init: bool,
    pub(crate) volumes: Vec<init::Volume>,
    pub(crate) net: Option<net::NetConfig>,
    /// On `--unix`, answer forkd-vmm's vsock handshake (`CONNECT <port>`,
    /// `OK <port>`) before the frames, so the socket stands in for a VM's.
    pub(crate) vsock_handshake: bool,
}

const USAGE: &str = "usage: forkd-agent [--unix PATH [--vsock-handshake] | --vsock-port N] [--python PYTHON] [--no-interpreter] [--warm CODE]... [--warm-file FILE] [--shutdown reboot|poweroff] [--guest NAME] [--init]";

fn parse_shutdown(s: &str) -> Result<ShutdownMode, String> {
    match s {
        "reboot" => Ok(ShutdownMode::Reboot),
        "poweroff" => Ok(ShutdownMode::Poweroff),
        _ => Err(format!("shutdown mode {s:?}: use reboot or poweroff")),
    }
}

impl Config {
    pub(crate) fn parse(args: &[String], pid1: bool) -> Result<Config, String> {
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
            vsock_handshake: false,
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
                "--vsock-handshake" => c.vsock_handshake = true,
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
    pub(crate) fn warm_code(&self) -> Option<String> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

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
