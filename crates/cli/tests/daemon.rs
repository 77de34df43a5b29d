//! The `forkd` binary against a real forkd-daemon on a loopback port, with
//! the built-in guest on this host's /dev/kvm.
//!
//! forkd-daemon and forkd-vmm are taken from the target directory this test
//! runs from (`cargo test --workspace` builds them there).

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The target directory's profile folder (`target/debug`), where cargo puts
/// the workspace's binaries.
fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/debug/deps/<test> -> target/debug
    exe.parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps")
        .to_path_buf()
}

/// A workspace binary next to the test, or a failure that names it.
fn workspace_bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.is_file(),
        "{name} is not at {}: build it first (`cargo test --workspace` or \
         `cargo build -p forkd-daemon -p vmm-bin`, with the same CARGO_TARGET_DIR)",
        p.display()
    );
    p
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A forkd-daemon for one test; its sandboxes are killed and it is stopped
/// on drop.
struct Daemon {
    child: Option<Child>,
    url: String,
    dir: tempfile::TempDir,
    ca: Option<PathBuf>,
    token: Option<String>,
}

impl Daemon {
    fn start(token: Option<&str>, tls: bool) -> Daemon {
        let daemon_bin = workspace_bin("forkd-daemon");
        workspace_bin("forkd-vmm");
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut cmd = Command::new(&daemon_bin);
        cmd.arg("serve")
            .arg("--bind")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--state-dir")
            .arg(dir.path().join("state"));
        if let Some(t) = token {
            let f = dir.path().join("token");
            std::fs::write(&f, format!("{t}\n")).unwrap();
            cmd.arg("--token-file").arg(f);
        }
        let mut ca = None;
        if tls {
            let c =
                rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()])
                    .unwrap();
            let cert = dir.path().join("cert.pem");
            let key = dir.path().join("key.pem");
            std::fs::write(&cert, c.cert.pem()).unwrap();
            std::fs::write(&key, c.key_pair.serialize_pem()).unwrap();
            cmd.arg("--tls-cert").arg(&cert).arg("--tls-key").arg(&key);
            ca = Some(cert);
        }
        let log = std::fs::File::create(dir.path().join("daemon.log")).unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut d = Daemon {
            child: Some(child),
            url: format!("{}://127.0.0.1:{port}", if tls { "https" } else { "http" }),
            dir,
            ca,
            token: token.map(str::to_string),
        };
        // It listens once its state is open and its sandboxes re-adopted.
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = d.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("forkd-daemon exited ({status}):\n{}", d.log());
            }
            assert!(
                Instant::now() < deadline,
                "forkd-daemon never listened:\n{}",
                d.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        d
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    /// `forkd` with this daemon's URL, token and CA in its environment.
    fn forkd(&self, args: &[&str]) -> Output {
        self.forkd_with_stdin(args, None)
    }

    /// [`Daemon::forkd`] with `stdin` as its standard input.
    fn forkd_with_stdin(&self, args: &[&str], stdin: Option<&[u8]>) -> Output {
        let mut env = vec![("FORKD_URL", self.url.clone())];
        if let Some(t) = &self.token {
            env.push(("FORKD_TOKEN", t.clone()));
        }
        if let Some(c) = &self.ca {
            env.push(("FORKD_CA_CERT", c.display().to_string()));
        }
        forkd_fed(args, &env, stdin)
    }

    /// Puts forkd-agent (run on this host, answering the VMM's vsock
    /// handshake) where sandbox `id`'s vsock socket is, so the guest
    /// commands reach a real agent.
    fn splice_agent(&self, id: &str) -> Child {
        let db = rusqlite::Connection::open(self.dir.path().join("state/forkd.db")).unwrap();
        let vsock: String = db
            .query_row(
                "SELECT vsock_socket FROM sandboxes WHERE id = ?1",
                [id],
                |r| r.get(0),
            )
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !Path::new(&vsock).exists() {
            assert!(Instant::now() < deadline, "{vsock} never appeared");
            std::thread::sleep(Duration::from_millis(10));
        }
        std::fs::remove_file(&vsock).unwrap();
        let child = Command::new(workspace_bin("forkd-agent"))
            .args(["--unix", &vsock, "--vsock-handshake", "--no-interpreter"])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        while std::os::unix::net::UnixStream::connect(&vsock).is_err() {
            assert!(Instant::now() < deadline, "the agent never listened");
            std::thread::sleep(Duration::from_millis(10));
        }
        child
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // Sandboxes outlive a stopped daemon (it re-adopts them): kill them first.
        let _ = self.forkd(&["kill", "--all"]);
        if let Some(mut child) = self.child.take() {
            // SAFETY: signalling our own child, not yet reaped.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs the `forkd` binary with only the `env` given of the FORKD_ variables.
fn forkd(args: &[&str], env: &[(&str, String)]) -> Output {
    forkd_fed(args, env, None)
}

/// [`forkd`] with `stdin` (none: /dev/null).
fn forkd_fed(args: &[&str], env: &[(&str, String)], stdin: Option<&[u8]>) -> Output {
    use std::io::Write;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_forkd"));
    for (k, _) in std::env::vars() {
        if k.starts_with("FORKD_") {
            cmd.env_remove(k);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    let Some(input) = stdin else {
        return cmd.stdin(Stdio::null()).output().unwrap();
    };
    let mut child = cmd.stdin(Stdio::piped()).spawn().unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts `forkd` exited with `code`, showing its output otherwise.
#[track_caller]
fn expect_code(o: &Output, code: i32, what: &str) {
    assert_eq!(
        o.status.code(),
        Some(code),
        "{what}: exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        stdout(o),
        stderr(o)
    );
}

#[test]
fn the_commands_drive_a_real_daemon() {
    let d = Daemon::start(None, false);

    let o = d.forkd(&["snapshot", "--builtin", "t"]);
    expect_code(&o, 0, "snapshot --builtin t");
    assert!(
        stdout(&o).starts_with("snapshot t is ready"),
        "{}",
        stdout(&o)
    );

    let o = d.forkd(&["spawn", "--tag", "t", "-n", "3", "-q"]);
    expect_code(&o, 0, "spawn");
    let ids: Vec<String> = stdout(&o).lines().map(str::to_string).collect();
    assert_eq!(ids.len(), 3, "{}", stdout(&o));

    let o = d.forkd(&["ping", &ids[0]]);
    expect_code(&o, 0, "ping");
    assert!(stdout(&o).contains("guest: builtin"), "{}", stdout(&o));

    let o = d.forkd(&["exec", &ids[0], "--", "echo", "hello", "forkd"]);
    expect_code(&o, 0, "exec echo");
    assert_eq!(stdout(&o), "hello forkd\n");
    let o = d.forkd(&["exec", &ids[1], "--", "false"]);
    expect_code(&o, 1, "exec false exits with the guest's code");

    let o = d.forkd(&["eval", &ids[2], "40 + 2"]);
    expect_code(&o, 0, "eval");
    assert_eq!(stdout(&o).trim(), "42");

    let o = d.forkd(&["ls"]);
    expect_code(&o, 0, "ls");
    assert!(stdout(&o).starts_with("ID "), "{}", stdout(&o));
    for id in &ids {
        assert!(
            stdout(&o).contains(id.as_str()),
            "{} missing from\n{}",
            id,
            stdout(&o)
        );
    }
    let o = d.forkd(&["ls", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 3);

    let o = d.forkd(&["snapshot", "--from-sandbox", &ids[0], "--diff", "b1"]);
    expect_code(&o, 0, "diff branch");
    assert!(stdout(&o).contains("diff"), "{}", stdout(&o));

    let o = d.forkd(&["images"]);
    expect_code(&o, 0, "images");
    let table = stdout(&o);
    let b1 = table
        .lines()
        .find(|l| l.starts_with("b1 "))
        .expect("b1 listed");
    assert!(
        b1.contains("ready") && b1.contains("diff") && b1.ends_with(" t"),
        "{table}"
    );
    let t = table
        .lines()
        .find(|l| l.starts_with("t "))
        .expect("t listed");
    assert!(t.ends_with(" -"), "{table}");

    let o = d.forkd(&["snapshot-info", "b1"]);
    expect_code(&o, 0, "snapshot-info");
    assert!(
        stdout(&o).contains("chain depth    1 (t)"),
        "{}",
        stdout(&o)
    );

    let o = d.forkd(&["rmi", "t"]);
    expect_code(&o, 1, "rmi of a snapshot with a dependent");
    assert!(stderr(&o).starts_with("forkd: "), "{}", stderr(&o));
    assert!(stderr(&o).contains("(HTTP 409)"), "{}", stderr(&o));

    let o = d.forkd(&["kill", &ids[0]]);
    expect_code(&o, 0, "kill one");
    assert_eq!(stdout(&o), format!("killed {}\n", ids[0]));
    let o = d.forkd(&["ping", &ids[0]]);
    expect_code(&o, 1, "ping a killed sandbox");
    assert!(stderr(&o).contains("(HTTP 404)"), "{}", stderr(&o));
    let o = d.forkd(&["kill", "--all"]);
    expect_code(&o, 0, "kill --all");
    assert_eq!(stdout(&o).lines().count(), 2, "{}", stdout(&o));
    let o = d.forkd(&["ls", "-q"]);
    assert_eq!(stdout(&o), "");

    let o = d.forkd(&["rmi", "t", "--cascade"]);
    expect_code(&o, 0, "rmi --cascade");
    let o = d.forkd(&["images", "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v, serde_json::json!([]));

    let o = d.forkd(&["quickstart", "-n", "10"]);
    expect_code(&o, 0, "quickstart -n 10");
    let out = stdout(&o);
    assert!(out.contains("snapshot quickstart-builtin made in"), "{out}");
    assert!(out.contains("10/10 answered"), "{out}");
    assert!(!out.contains("started for this run"), "{out}");
    let o = d.forkd(&["quickstart", "-n", "10", "--json"]);
    expect_code(&o, 0, "quickstart again");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["snapshot_reused"], true);
    assert_eq!(v["answered"], 10);
    assert_eq!(v["killed"], 10);
    let o = d.forkd(&["ls", "-q"]);
    assert_eq!(stdout(&o), "", "quickstart leaves no sandbox behind");
}

#[test]
fn token_and_tls_errors_say_what_to_pass() {
    let d = Daemon::start(Some("forkd-test-token-0123456789"), true);
    let url = d.url.clone();
    let ca = d.ca.clone().unwrap().display().to_string();

    let o = forkd(&["ls"], &[("FORKD_URL", url.clone())]);
    expect_code(&o, 1, "untrusted certificate");
    assert!(stderr(&o).contains("--ca-cert"), "{}", stderr(&o));

    let o = forkd(&["--ca-cert", &ca, "ls"], &[("FORKD_URL", url.clone())]);
    expect_code(&o, 1, "no token");
    assert!(stderr(&o).contains("(HTTP 401)"), "{}", stderr(&o));
    assert!(stderr(&o).contains("FORKD_TOKEN"), "{}", stderr(&o));

    let token_file = d.dir.path().join("token").display().to_string();
    let o = forkd(
        &["--ca-cert", &ca, "--daemon-token-file", &token_file, "ls"],
        &[("FORKD_URL", url.clone())],
    );
    expect_code(&o, 0, "token file and CA");

    let o = d.forkd(&["version"]);
    expect_code(&o, 0, "version");
    assert!(stdout(&o).contains("(API v1)"), "{}", stdout(&o));
}

#[test]
fn an_absent_daemon_is_reported_with_what_to_do() {
    let url = format!("http://127.0.0.1:{}", free_port());
    let o = forkd(&["ls"], &[("FORKD_URL", url.clone())]);
    expect_code(&o, 1, "no daemon");
    let e = stderr(&o);
    assert!(
        e.starts_with(&format!("forkd: cannot reach forkd-daemon at {url}")),
        "{e}"
    );
    assert!(
        e.contains("forkd-daemon serve") && e.contains("FORKD_URL"),
        "{e}"
    );
}

#[test]
fn quickstart_starts_and_stops_its_own_daemon() {
    // forkd finds forkd-daemon next to itself: both are in the target dir.
    workspace_bin("forkd-daemon");
    workspace_bin("forkd-vmm");
    let state = tempfile::tempdir().unwrap();
    let env = [
        ("FORKD_URL", format!("http://127.0.0.1:{}", free_port())),
        ("FORKD_STATE_DIR", state.path().display().to_string()),
    ];
    let o = forkd(&["quickstart", "-n", "10", "--json"], &env);
    expect_code(&o, 0, "quickstart with its own daemon");
    assert!(stderr(&o).contains("starting"), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["daemon_started"], true);
    assert_eq!(v["snapshot_reused"], false);
    assert_eq!(v["answered"], 10);
    // The daemon it started is gone.
    let url = v["daemon_url"].as_str().unwrap();
    let addr = url.trim_start_matches("http://");
    assert!(TcpStream::connect(addr).is_err(), "{url} still answers");

    // A second run reuses the snapshot in the same state directory.
    let o = forkd(&["quickstart", "-n", "10"], &env);
    expect_code(&o, 0, "second quickstart");
    let out = stdout(&o);
    assert!(out.contains("snapshot quickstart-builtin reused"), "{out}");
    assert!(out.contains("(started for this run)"), "{out}");
    assert!(out.contains("10/10 answered"), "{out}");
}

/// Upstream CLI users' habits: `--mem-size-mib`, `where`, `kill --tag`,
/// `rmi` of several tags, `fork --settle-secs` ended by SIGTERM (as
/// upstream's Python `Sandbox` ends it), `cleanup`.
#[test]
fn upstream_cli_habits_work() {
    let d = Daemon::start(None, false);
    for tag in ["u", "v"] {
        let o = d.forkd(&["snapshot", "--builtin", tag, "--mem-size-mib", "128"]);
        expect_code(&o, 0, "snapshot --mem-size-mib");
    }
    let o = d.forkd(&["where"]);
    expect_code(&o, 0, "where");
    let state = d.dir.path().join("state");
    assert!(
        stdout(&o).contains(&format!("state      {}", state.display())),
        "{}",
        stdout(&o)
    );
    assert!(stdout(&o).contains("snapshots  "), "{}", stdout(&o));

    expect_code(
        &d.forkd(&["spawn", "--tag", "u", "--n", "2"]),
        0,
        "spawn --n",
    );
    expect_code(&d.forkd(&["spawn", "--tag", "v"]), 0, "spawn v");
    let o = d.forkd(&["kill", "--tag", "u"]);
    expect_code(&o, 0, "kill --tag");
    assert_eq!(stdout(&o).lines().count(), 2, "{}", stdout(&o));
    let o = d.forkd(&["ls", "--json"]);
    let left: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(left.as_array().unwrap().len(), 1, "{left}");
    assert_eq!(left[0]["snapshot_tag"], "v");
    expect_code(&d.forkd(&["kill", "--all"]), 0, "kill --all");

    // fork keeps its child until SIGTERM, then kills it.
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_forkd"));
    let fork = cmd
        .args(["fork", "--tag", "u", "--n", "1", "--settle-secs", "600"])
        .env("FORKD_URL", &d.url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let o = d.forkd(&["ls", "-q"]);
        if stdout(&o).lines().count() == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "fork's child never appeared");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Pinged and settling: still there a moment later.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(stdout(&d.forkd(&["ls", "-q"])).lines().count(), 1);
    // SAFETY: signalling our own child, not yet reaped.
    unsafe { libc::kill(fork.id() as libc::pid_t, libc::SIGTERM) };
    let out = fork.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(stdout(&d.forkd(&["ls", "-q"])), "", "fork left its child");

    let o = d.forkd(&["rmi", "u", "v"]);
    expect_code(&o, 0, "rmi of two tags");
    assert_eq!(stdout(&o), "deleted u\ndeleted v\n");

    // What a crash leaves: listed, removed only with --yes.
    let stale = state.join("snapshots/.w.tmp-999999999");
    std::fs::create_dir_all(&stale).unwrap();
    let args = ["cleanup", "--state-dir", state.to_str().unwrap()];
    let o = d.forkd(&args);
    expect_code(&o, 0, "cleanup");
    assert!(stdout(&o).contains(".w.tmp-999999999"), "{}", stdout(&o));
    assert!(stale.exists());
    let o = d.forkd(&[&args[..], &["--yes"]].concat());
    expect_code(&o, 0, "cleanup --yes");
    assert!(!stale.exists());
    let o = d.forkd(&args);
    assert!(stdout(&o).starts_with("nothing stale"), "{}", stdout(&o));
}

#[test]
fn the_guest_and_lifecycle_commands() {
    let d = Daemon::start(None, false);
    expect_code(&d.forkd(&["snapshot", "--builtin", "t"]), 0, "snapshot");
    let o = d.forkd(&[
        "spawn",
        "--tag",
        "t",
        "--label",
        "team=x",
        "--timeout-secs",
        "600",
        "-q",
    ]);
    expect_code(&o, 0, "spawn with a label");
    let id = stdout(&o).trim().to_string();
    let o = d.forkd(&["ls", "--label", "team=x", "-q"]);
    assert_eq!(stdout(&o).trim(), id);
    let o = d.forkd(&["ls", "--label", "team=y", "-q"]);
    assert_eq!(stdout(&o), "");

    // Life: pause, resume, a new deadline, stats.
    let o = d.forkd(&["pause", &id]);
    expect_code(&o, 0, "pause");
    assert!(
        stdout(&o).starts_with(&format!("{id} paused")),
        "{}",
        stdout(&o)
    );
    let o = d.forkd(&["exec", &id, "--", "true"]);
    expect_code(&o, 1, "exec in a paused sandbox");
    assert!(stderr(&o).contains("(HTTP 409)"), "{}", stderr(&o));
    let o = d.forkd(&["resume", &id]);
    assert!(
        stdout(&o).starts_with(&format!("{id} running")),
        "{}",
        stdout(&o)
    );
    let o = d.forkd(&["timeout", &id, "100"]);
    expect_code(&o, 0, "timeout");
    assert!(stdout(&o).contains("deadline in"), "{}", stdout(&o));
    let o = d.forkd(&["stats", &id]);
    expect_code(&o, 0, "stats");
    assert!(
        stdout(&o).contains("cpu ") && stdout(&o).contains("private "),
        "{}",
        stdout(&o)
    );

    // Inside: a real agent behind the sandbox's vsock socket.
    let mut agent = d.splice_agent(&id);
    let o = d.forkd(&[
        "exec",
        &id,
        "-e",
        "A=1",
        "--cwd",
        "/tmp",
        "--",
        "sh",
        "-c",
        "echo $A; pwd",
    ]);
    expect_code(&o, 0, "exec with env and cwd");
    assert_eq!(stdout(&o), "1\n/tmp\n");
    let o = d.forkd(&[
        "exec",
        "--stream",
        &id,
        "--",
        "sh",
        "-c",
        "printf '\\377\\000'; exit 4",
    ]);
    expect_code(&o, 4, "exec --stream");
    assert_eq!(o.stdout, b"\xff\x00");

    let work = d.dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let src = work.join("in.bin");
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&src, &data).unwrap();
    let guest_dir = format!("{}:{}/g/", id, work.display());
    let o = d.forkd(&["cp", "-p", src.to_str().unwrap(), &guest_dir]);
    expect_code(&o, 0, "cp in");
    assert_eq!(std::fs::read(work.join("g/in.bin")).unwrap(), data);
    let back = work.join("back.bin");
    let from = format!("{}:{}/g/in.bin", id, work.display());
    expect_code(
        &d.forkd(&["cp", &from, back.to_str().unwrap()]),
        0,
        "cp out",
    );
    assert_eq!(std::fs::read(&back).unwrap(), data);
    let o = d.forkd(&["cp", &format!("{id}:/no/such/file"), back.to_str().unwrap()]);
    expect_code(&o, 1, "cp of a missing file");
    assert!(stderr(&o).contains("(HTTP 404)"), "{}", stderr(&o));
    assert_eq!(
        std::fs::read(&back).unwrap(),
        data,
        "a failed copy leaves the old file"
    );
    let o = d.forkd(&["ls-files", &format!("{}:{}/g", id, work.display())]);
    expect_code(&o, 0, "ls-files");
    assert!(
        stdout(&o).contains("in.bin") && stdout(&o).contains("300000"),
        "{}",
        stdout(&o)
    );

    // A shell fed from a pipe (no terminal here: 24x80).
    let o = d.forkd_with_stdin(&["shell", &id], Some(b"stty size; echo $((6*7))\nexit 3\n"));
    expect_code(&o, 3, "shell");
    assert!(
        stdout(&o).contains("42") && stdout(&o).contains("24 80"),
        "{}",
        stdout(&o)
    );
    let o = d.forkd(&["ps", &id]);
    expect_code(&o, 0, "ps");
    assert!(stdout(&o).starts_with("PID"), "{}", stdout(&o));
    let _ = agent.kill();
    let _ = agent.wait();
}
