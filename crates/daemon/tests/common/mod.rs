//! A real forkd-daemon process on loopback, and an HTTP client for it.

#![allow(dead_code)]

pub mod machine;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// A self-signed certificate for 127.0.0.1 and localhost, written into
/// `dir`: its path, its key's path and its PEM, as `Config::tls` takes them.
pub fn self_signed_tls(dir: &Path) -> (PathBuf, PathBuf, String) {
    let cert =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
    let cert_path = dir.join("cert.pem");
    let key_path = dir.join("key.pem");
    let pem = cert.cert.pem();
    std::fs::write(&cert_path, &pem).unwrap();
    std::fs::write(&key_path, cert.key_pair.serialize_pem()).unwrap();
    (cert_path, key_path, pem)
}

/// A directory removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let dir = std::env::temp_dir().join(format!(
            "forkd-daemon-{name}-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// forkd-vmm, built beside this test's binaries by `cargo test --workspace`.
pub fn vmm_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let path = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("forkd-vmm"))
        .unwrap();
    assert!(
        path.is_file(),
        "{} is missing: the daemon tests need forkd-vmm; run `cargo test --workspace` (or `cargo build -p forkd-vmm` first)",
        path.display()
    );
    path
}

/// A running daemon.
pub struct Daemon {
    child: Option<Child>,
    pub url: String,
    pub state: PathBuf,
    pub log: PathBuf,
    pub token: Option<String>,
    pub ca_pem: Option<String>,
}

/// How to start one.
#[derive(Default, Clone)]
pub struct Config {
    pub token: Option<String>,
    pub audit_log: Option<PathBuf>,
    pub tls: Option<(PathBuf, PathBuf, String)>,
    pub branch_concurrency: Option<u32>,
    pub bind: Option<String>,
    pub netns_pool: Option<u32>,
    /// Environment variables the daemon gets (e.g. FORKD_FAILPOINTS).
    pub env: Vec<(String, String)>,
    /// Further `serve` arguments.
    pub args: Vec<String>,
    pub header_timeout_secs: Option<u64>,
    pub idle_timeout_secs: Option<u64>,
    pub max_connections: Option<u32>,
}

impl Daemon {
    /// Starts `forkd-daemon serve` on a free loopback port with its state
    /// in `state`, and waits until it listens.
    pub fn start(state: &Path, cfg: &Config) -> Daemon {
        Self::try_start(state, cfg).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Like [`Daemon::start`], but a daemon that exits is an error with its log.
    pub fn try_start(state: &Path, cfg: &Config) -> Result<Daemon, String> {
        std::fs::create_dir_all(state).unwrap();
        let log = state.join(format!("daemon-{:016x}.log", rand_u64()));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_forkd-daemon"));
        cmd.arg("serve")
            .arg("--bind")
            .arg(cfg.bind.as_deref().unwrap_or("127.0.0.1:0"))
            .arg("--state-dir")
            .arg(state)
            .arg("--vmm-binary")
            .arg(vmm_binary())
            .arg("--shutdown-grace-secs")
            .arg("5");
        if let Some(token) = &cfg.token {
            let file = state.join("token");
            std::fs::write(&file, format!("{token}\n")).unwrap();
            cmd.arg("--token-file").arg(file);
        }
        if let Some(audit) = &cfg.audit_log {
            cmd.arg("--audit-log").arg(audit);
        }
        if let Some((cert, key, _)) = &cfg.tls {
            cmd.arg("--tls-cert").arg(cert).arg("--tls-key").arg(key);
        }
        if let Some(n) = cfg.branch_concurrency {
            cmd.arg("--branch-concurrency").arg(n.to_string());
        }
        if let Some(n) = cfg.netns_pool {
            cmd.arg("--netns-pool").arg(n.to_string());
        }
        cmd.args(&cfg.args);
        cmd.envs(cfg.env.iter().map(|(k, v)| (k, v)));
        if let Some(n) = cfg.header_timeout_secs {
            cmd.arg("--header-timeout-secs").arg(n.to_string());
        }
        if let Some(n) = cfg.idle_timeout_secs {
            cmd.arg("--idle-timeout-secs").arg(n.to_string());
        }
        if let Some(n) = cfg.max_connections {
            cmd.arg("--max-connections").arg(n.to_string());
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start forkd-daemon");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if let Some(url) = forkd_daemon::serve::served_url(&text) {
                let url = url.to_string();
                return Ok(Daemon {
                    child: Some(child),
                    url,
                    state: state.to_owned(),
                    log,
                    token: cfg.token.clone(),
                    ca_pem: cfg.tls.as_ref().map(|t| t.2.clone()),
                });
            }
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!("forkd-daemon exited ({status}):\n{text}"));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return Err(format!("forkd-daemon did not come up in 60 s:\n{text}"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Its pid.
    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    /// SIGKILL (a crash: nothing is cleaned up), and wait for it to be gone.
    pub fn kill_hard(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Waits up to `wait` for the daemon to end by itself (a failpoint
    /// killed it); its exit status.
    pub fn wait_end(&mut self, wait: Duration) -> Option<std::process::ExitStatus> {
        let child = self.child.as_mut()?;
        let deadline = Instant::now() + wait;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM, then wait for it to exit; returns whether it exited 0.
    pub fn stop(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return true;
        };
        // SAFETY: signalling our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status.success();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kills every sandbox it lists, ignoring every error (for a test that
    /// is failing: a second panic would abort the test binary).
    fn try_kill_all(&self) {
        let agent = self.agent();
        let auth = self.token.as_ref().map(|t| format!("Bearer {t}"));
        let with_auth = |mut r: ureq::RequestBuilder<ureq::typestate::WithoutBody>| {
            if let Some(a) = &auth {
                r = r.header("Authorization", a);
            }
            r
        };
        let Ok(mut listed) = with_auth(agent.get(format!("{}/v1/sandboxes", self.url))).call()
        else {
            return;
        };
        let text = listed.body_mut().read_to_string().unwrap_or_default();
        let list: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        for id in list
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s["id"].as_str())
        {
            let _ = with_auth(agent.delete(format!("{}/v1/sandboxes/{id}", self.url))).call();
        }
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn agent(&self) -> ureq::Agent {
        let mut config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(300)));
        if let Some(pem) = &self.ca_pem {
            let cert = ureq::tls::Certificate::from_pem(pem.as_bytes())
                .unwrap()
                .to_owned();
            config = config.tls_config(
                ureq::tls::TlsConfig::builder()
                    .root_certs(ureq::tls::RootCerts::Specific(std::sync::Arc::new(vec![
                        cert,
                    ])))
                    .build(),
            );
        }
        config.build().new_agent()
    }

    /// Sends a request with the daemon's token (if any); returns the status
    /// and the body parsed as JSON (Null when empty, a string when not JSON).
    pub fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        self.call_with(method, path, body, self.token.as_deref())
    }

    /// Like [`Daemon::call`] with an explicit token (None: no header).
    pub fn call_with(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
        token: Option<&str>,
    ) -> (u16, Value) {
        let (status, text) = self.raw(method, path, body, token);
        let value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        (status, value)
    }

    /// The status and body text.
    pub fn raw(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
        token: Option<&str>,
    ) -> (u16, String) {
        let url = format!("{}{path}", self.url);
        let agent = self.agent();
        let auth = token.map(|t| format!("Bearer {t}"));
        let result = match (method, body) {
            ("GET", _) => {
                let mut r = agent.get(&url);
                if let Some(a) = &auth {
                    r = r.header("Authorization", a);
                }
                r.call()
            }
            ("DELETE", _) => {
                let mut r = agent.delete(&url);
                if let Some(a) = &auth {
                    r = r.header("Authorization", a);
                }
                r.call()
            }
            ("POST", body) => {
                let mut r = agent.post(&url);
                if let Some(a) = &auth {
                    r = r.header("Authorization", a);
                }
                match body {
                    Some(b) => r.send_json(b),
                    None => r.send_empty(),
                }
            }
            (m, _) => panic!("method {m} not supported by the test client"),
        };
        let mut response = result.unwrap_or_else(|e| panic!("{method} {url}: {e}"));
        let status = response.status().as_u16();
        let text = response.body_mut().read_to_string().unwrap_or_default();
        (status, text)
    }

    /// Like [`Daemon::call`], asserting the status.
    /// Makes the built-in guest's snapshot `tag` (with the request's
    /// other fields from `extra`, an object) and answers it.
    pub fn builtin_snapshot(&self, tag: &str, extra: Value) -> Value {
        let mut req = serde_json::json!({"tag": tag, "builtin": true});
        if let (Some(req), Value::Object(extra)) = (req.as_object_mut(), extra) {
            req.extend(extra);
        }
        self.expect("POST", "/v1/snapshots", Some(req), 201)
    }

    pub fn expect(&self, method: &str, path: &str, body: Option<Value>, want: u16) -> Value {
        let (status, value) = self.call(method, path, body);
        assert_eq!(
            status,
            want,
            "{method} {path}: {value}\ndaemon log tail:\n{}",
            tail(&self.log_text(), 3000)
        );
        value
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // A failed test leaves no VMs (or their network namespaces) behind.
        if std::thread::panicking() && self.child.is_some() {
            self.try_kill_all();
        }
        self.stop();
    }
}

/// The last `n` bytes of `s`.
pub fn tail(s: &str, n: usize) -> &str {
    let mut start = s.len().saturating_sub(n);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

fn rand_u64() -> u64 {
    let mut b = [0u8; 8];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .unwrap();
    u64::from_le_bytes(b)
}

/// Kills every sandbox the daemon lists (cleanup between steps).
pub fn kill_all(d: &Daemon) {
    let (_, list) = d.call("GET", "/v1/sandboxes", None);
    for sb in list.as_array().cloned().unwrap_or_default() {
        let id = sb["id"].as_str().unwrap().to_string();
        d.call("DELETE", &format!("/v1/sandboxes/{id}"), None);
    }
}
