//! The guest routes (streamed and interactive exec, background processes,
//! files) through a real daemon to a real forkd-agent.
//!
//! The sandbox is a built-in guest's; the test then puts a host-run
//! forkd-agent at the sandbox's vsock socket path (`--vsock-handshake`:
//! it answers the VMM's `CONNECT` handshake), so every byte goes through
//! the daemon, the agent client and the agent exactly as with a Linux
//! guest, and the agent's processes and files are the host's, which the
//! test can check directly. The lab runs the same routes against a Linux
//! guest.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use common::{tail, Config, Daemon, TempDir};
use serde_json::{json, Value};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// forkd-agent, built beside this test's binaries by `cargo test --workspace`.
fn agent_binary() -> PathBuf {
    let path = common::vmm_binary().with_file_name("forkd-agent");
    assert!(
        path.is_file(),
        "{} is missing: run `cargo test --workspace` (or `cargo build -p forkd-agent` first)",
        path.display()
    );
    path
}

/// forkd-agent serving a sandbox's vsock socket path (answering the VMM's
/// handshake, `--vsock-handshake`), as `uid` (None: root).
struct HostAgent {
    child: Child,
}

impl HostAgent {
    /// Replaces the VM's vsock socket at `vsock` with the agent.
    fn splice(vsock: &Path, uid: Option<u32>) -> HostAgent {
        use std::os::unix::process::CommandExt;
        wait_for(vsock);
        std::fs::remove_file(vsock).unwrap();
        let mut cmd = Command::new(agent_binary());
        cmd.arg("--unix")
            .arg(vsock)
            .arg("--vsock-handshake")
            .arg("--no-interpreter")
            .stdin(Stdio::null())
            .stderr(Stdio::null());
        if let Some(uid) = uid {
            // Its socket's directory must take its socket: a fresh one.
            let dir = vsock.parent().unwrap();
            std::os::unix::fs::chown(dir, Some(uid), Some(uid)).unwrap();
            cmd.uid(uid).gid(uid);
        }
        let child = cmd.spawn().unwrap();
        let start = Instant::now();
        while UnixStream::connect(vsock).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "agent did not come up"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        HostAgent { child }
    }
}

impl Drop for HostAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits for the VMM to have made its vsock socket (just after the spawn
/// answers), so that the one put there instead is not replaced.
fn wait_for(vsock: &Path) {
    let start = Instant::now();
    while !vsock.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{} never appeared",
            vsock.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The vsock socket the daemon recorded for sandbox `id`.
fn vsock_of(d: &Daemon, id: &str) -> PathBuf {
    let db = rusqlite::Connection::open(d.state.join("forkd.db")).unwrap();
    let path: String = db
        .query_row(
            "SELECT vsock_socket FROM sandboxes WHERE id = ?1",
            [id],
            |r| r.get(0),
        )
        .unwrap();
    PathBuf::from(path)
}

/// Reads the `CONNECT <port>\n` line and answers `OK 1\n`.
fn handshake(c: &mut UnixStream) -> bool {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while c.read_exact(&mut b).is_ok() {
        if b[0] == b'\n' {
            return line.starts_with(b"CONNECT ") && c.write_all(b"OK 1\n").is_ok();
        }
        line.push(b[0]);
    }
    false
}

/// Replaces the VM's vsock socket with an agent that answers ping as
/// protocol 1 and fails the test's request if anything else arrives.
fn splice_v1_agent(vsock: &Path) {
    use proto::agent::{read_frame, write_frame, Pong, Reply, Request, MAX_FRAME};
    wait_for(vsock);
    std::fs::remove_file(vsock).unwrap();
    let listener = UnixListener::bind(vsock).unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut c) = conn else { return };
            if !handshake(&mut c) {
                continue;
            }
            let Ok(f) = read_frame(&mut c, MAX_FRAME) else {
                continue;
            };
            let reply = match f.parse::<Request>() {
                Ok(Request::Ping) => Reply::Pong(Pong {
                    version: "0.0.1".into(),
                    protocol: 1,
                    uptime_ms: 1,
                    interpreter_ready: false,
                    interpreter_error: None,
                    guest: "guest: linux".into(),
                    pid: Some(1),
                }),
                other => Reply::error(
                    proto::agent::ErrorCode::Internal,
                    format!("a protocol 1 agent was sent {other:?}"),
                ),
            };
            let _ = write_frame(&mut c, &reply, &[]);
        }
    });
}

struct Bed {
    _tmp: TempDir,
    d: Daemon,
    /// Sandboxes: behind a root agent, behind a nobody agent, behind a
    /// protocol 1 agent, and the built-in guest itself.
    root: String,
    nobody: String,
    v1: String,
    builtin: String,
    work: PathBuf,
    _agents: Vec<HostAgent>,
}

fn bed(name: &str) -> Bed {
    let tmp = TempDir::new(name);
    let d = Daemon::start(&tmp.path().join("state"), &Config::default());
    d.builtin_snapshot("g", json!({}));
    let kids = d.expect(
        "POST",
        "/v1/sandboxes",
        Some(json!({"snapshot_tag": "g", "n": 4})),
        201,
    );
    let ids: Vec<String> = kids
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["id"].as_str().unwrap().to_string())
        .collect();
    let work = tmp.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&work, std::fs::Permissions::from_mode(0o777)).unwrap();
    let root_agent = HostAgent::splice(&vsock_of(&d, &ids[0]), None);
    let nobody_agent = HostAgent::splice(&vsock_of(&d, &ids[1]), Some(65534));
    splice_v1_agent(&vsock_of(&d, &ids[2]));
    Bed {
        root: ids[0].clone(),
        nobody: ids[1].clone(),
        v1: ids[2].clone(),
        builtin: ids[3].clone(),
        work,
        d,
        _tmp: tmp,
        _agents: vec![root_agent, nobody_agent],
    }
}

fn url(d: &Daemon, path: &str) -> String {
    format!("{}{path}", d.url)
}

/// A streamed exec's response, as lines read one at a time.
fn stream(d: &Daemon, id: &str, body: Value) -> impl Iterator<Item = Value> {
    let r = d
        .agent()
        .post(&url(d, &format!("/v1/sandboxes/{id}/exec/stream")))
        .send_json(body)
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(
        r.headers()["content-type"].to_str().unwrap(),
        "application/x-ndjson"
    );
    BufReader::new(r.into_body().into_reader())
        .lines()
        .map(|l| serde_json::from_str::<Value>(&l.unwrap()).unwrap())
}

fn alive(pid: i64) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid as i32, 0) == 0 }
}

fn output(events: &[Value], kind: &str) -> Vec<u8> {
    events
        .iter()
        .filter(|e| e["type"] == kind)
        .flat_map(|e| B64.decode(e["data"].as_str().unwrap()).unwrap())
        .collect()
}

#[test]
fn streamed_exec_stdin_env_exact_bytes_and_disconnects() {
    let b = bed("stream");
    let d = &b.d;
    let id = &b.root;

    // The first line arrives before the process ends.
    let start = Instant::now();
    let mut lines = stream(
        d,
        id,
        json!({"args": ["sh", "-c", "for i in 1 2 3; do echo $i; sleep 1; done"]}),
    );
    assert_eq!(lines.next().unwrap()["type"], "started");
    let first = lines.next().unwrap();
    let first_at = start.elapsed();
    assert_eq!(first["type"], "stdout");
    assert_eq!(B64.decode(first["data"].as_str().unwrap()).unwrap(), b"1\n");
    assert!(
        first_at < Duration::from_millis(900),
        "first line after {first_at:?}"
    );
    let rest: Vec<Value> = lines.collect();
    assert_eq!(output(&rest, "stdout"), b"2\n3\n");
    let exit = rest.last().unwrap();
    assert_eq!(
        (exit["type"].as_str(), exit["exit_code"].as_i64()),
        (Some("exit"), Some(0))
    );
    assert!(start.elapsed() >= Duration::from_secs(2));

    // Stdin while it runs, through the process's pid; env and cwd apply;
    // output bytes arrive exactly.
    let cwd = b.work.to_string_lossy().into_owned();
    let mut lines = stream(
        d,
        id,
        json!({"args": ["sh", "-c", "printf '\\377\\000\\001'; echo \"$GREETING\"; pwd; cat"],
               "env": {"GREETING": "hi"}, "cwd": cwd}),
    );
    let started = lines.next().unwrap();
    let pid = started["pid"].as_i64().unwrap();
    let (s, v) = d.call(
        "POST",
        &format!("/v1/sandboxes/{id}/processes/{pid}/stdin?eof=true"),
        None,
    );
    assert_eq!(s, 204, "{v}");
    let rest: Vec<Value> = lines.collect();
    let out = output(&rest, "stdout");
    assert_eq!(
        out,
        [&b"\xff\x00\x01hi\n"[..], cwd.as_bytes(), b"\n"].concat()
    );
    assert_eq!(rest.last().unwrap()["exit_code"], 0);

    let mut lines = stream(d, id, json!({"args": ["cat"]}));
    let pid = lines.next().unwrap()["pid"].as_i64().unwrap();
    let r = d
        .agent()
        .post(&url(
            d,
            &format!("/v1/sandboxes/{id}/processes/{pid}/stdin?eof=true"),
        ))
        .send(&b"from the client\n"[..])
        .unwrap();
    assert_eq!(r.status().as_u16(), 204);
    let rest: Vec<Value> = lines.collect();
    assert_eq!(output(&rest, "stdout"), b"from the client\n");

    // Buffered exec keeps bytes exactly with encoding base64, and takes
    // env, cwd, user and base64 stdin.
    let v = d.expect(
        "POST",
        &format!("/v1/sandboxes/{id}/exec"),
        Some(
            json!({"args": ["sh", "-c", "cat; id -u"], "encoding": "base64",
                    "stdin_base64": B64.encode(b"\x00\xfe"), "user": "nobody"}),
        ),
        200,
    );
    assert_eq!(v["encoding"], "base64");
    assert_eq!(
        B64.decode(v["stdout"].as_str().unwrap()).unwrap(),
        b"\x00\xfe65534\n"
    );
    assert_eq!(v["exit_code"], 0);
    let (s, v) = d.call(
        "POST",
        &format!("/v1/sandboxes/{id}/exec"),
        Some(json!({"args": ["true"], "stdin": "x", "stdin_base64": "eA=="})),
    );
    assert_eq!(s, 400, "{v}");

    // A client that goes away ends the process...
    let mut lines = stream(d, id, json!({"args": ["sleep", "30"]}));
    let pid = lines.next().unwrap()["pid"].as_i64().unwrap();
    assert!(alive(pid));
    drop(lines);
    let t = Instant::now();
    while alive(pid) {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{pid} outlived its client"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // ... unless it asked to detach; wait collects it then.
    let mut lines = stream(
        d,
        id,
        json!({"args": ["sh", "-c", "sleep 4; echo done"], "detach": true}),
    );
    let pid = lines.next().unwrap()["pid"].as_i64().unwrap();
    drop(lines);
    std::thread::sleep(Duration::from_millis(300));
    assert!(alive(pid), "a detached process ends with its client");
    // Until the daemon notices the client has gone (a keepalive write
    // fails: within about 2 s), the stream still collects the output, and
    // a wait answers 503.
    let t = Instant::now();
    let w = loop {
        let (s, w) = d.call(
            "POST",
            &format!("/v1/sandboxes/{id}/processes/{pid}/wait"),
            Some(json!({"timeout_secs": 20})),
        );
        match s {
            200 => break w,
            503 if t.elapsed() < Duration::from_secs(5) => {
                std::thread::sleep(Duration::from_millis(200))
            }
            _ => panic!("{s}: {w}"),
        }
    };
    assert_eq!(w["running"], false);
    assert_eq!(
        B64.decode(w["stdout"].as_str().unwrap()).unwrap(),
        b"done\n"
    );
    assert_eq!(w["exit"]["exit_code"], 0);

    // A missing program is the guest's not-found, before the stream starts.
    let (s, v) = d.call(
        "POST",
        &format!("/v1/sandboxes/{id}/exec/stream"),
        Some(json!({"args": ["/no/such/program"]})),
    );
    assert_eq!(s, 404, "{v}");
}

#[test]
fn background_processes_and_what_older_agents_cannot_do() {
    let b = bed("procs");
    let d = &b.d;
    let id = &b.root;
    let base = format!("/v1/sandboxes/{id}/processes");
    let v = d.expect(
        "POST",
        &base,
        Some(json!({"args": ["sh", "-c", "echo up; exec sleep 60"]})),
        201,
    );
    let pid = v["pid"].as_i64().unwrap();
    let list = d.expect("GET", &base, None, 200);
    let p = list
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["pid"] == pid)
        .unwrap_or_else(|| panic!("{pid} not listed: {list}"));
    assert_eq!(
        (p["running"].as_bool(), p["args"][0].as_str()),
        (Some(true), Some("sh"))
    );
    // A short wait answers what came so far; it still runs.
    let w = d.expect(
        "POST",
        &format!("{base}/{pid}/wait"),
        Some(json!({"timeout_secs": 1})),
        200,
    );
    assert_eq!(w["running"], true);
    assert_eq!(B64.decode(w["stdout"].as_str().unwrap()).unwrap(), b"up\n");
    for (body, want) in [(json!({"signal": 0}), 400), (json!({"signal": 15}), 204)] {
        let (s, v) = d.call("POST", &format!("{base}/{pid}/signal"), Some(body));
        assert_eq!(s, want, "{v}");
    }
    let w = d.expect("POST", &format!("{base}/{pid}/wait"), None, 200);
    assert_eq!(
        (w["running"].as_bool(), w["exit"]["signal"].as_i64()),
        (Some(false), Some(15))
    );
    assert_eq!(w["exit"]["exit_code"], 128 + 15);
    // Collected: forgotten.
    for (m, path, body) in [
        ("POST", format!("{base}/{pid}/wait"), None),
        (
            "POST",
            format!("{base}/{pid}/signal"),
            Some(json!({"signal": 9})),
        ),
        (
            "POST",
            format!("{base}/999999/resize"),
            Some(json!({"rows": 5, "cols": 5})),
        ),
    ] {
        let (s, v) = d.call(m, &path, body);
        assert_eq!(s, 404, "{path}: {v}");
    }
    let (s, v) = d.call("POST", &format!("{base}/x/wait"), None);
    assert_eq!(s, 400, "{v}");
    let (s, v) = d.call(
        "POST",
        &base,
        Some(json!({"args": ["true"], "detach": true})),
    );
    assert_eq!(s, 400, "{v}");

    // A protocol 1 agent: refused before anything reaches it, saying why.
    for (path, body) in [
        (
            format!("/v1/sandboxes/{}/exec/stream", b.v1),
            json!({"args": ["true"]}),
        ),
        (
            format!("/v1/sandboxes/{}/processes", b.v1),
            json!({"args": ["true"]}),
        ),
        (
            format!("/v1/sandboxes/{}/files/mkdir", b.v1),
            json!({"path": "/x"}),
        ),
        (
            format!("/v1/sandboxes/{}/exec", b.v1),
            json!({"args": ["id"], "user": "nobody"}),
        ),
    ] {
        let (s, v) = d.call("POST", &path, Some(body));
        assert_eq!(s, 501, "{path}: {v}");
        let e = v["error"].as_str().unwrap();
        assert!(
            e.contains("unsupported by this snapshot's agent (protocol 1): rebuild the snapshot"),
            "{e}"
        );
    }
    // The built-in guest says what it is.
    let (s, v) = d.call(
        "POST",
        &format!("/v1/sandboxes/{}/exec/stream", b.builtin),
        Some(json!({"args": ["true"]})),
    );
    assert_eq!(s, 501, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("built-in guest"),
        "{v}"
    );
    // Its buffered exec still works.
    let v = d.expect(
        "POST",
        &format!("/v1/sandboxes/{}/exec", b.builtin),
        Some(json!({"args": ["echo", "still", "here"]})),
        200,
    );
    assert_eq!(v["exit_code"], 0, "{v}");
}

#[test]
fn a_terminal_over_a_websocket() {
    use tungstenite::Message;
    let b = bed("ws");
    let d = &b.d;
    let ws_url = format!(
        "{}/v1/sandboxes/{}/exec/ws",
        d.url.replacen("http://", "ws://", 1),
        b.root
    );
    let (mut ws, resp) = tungstenite::connect(&ws_url).unwrap();
    assert_eq!(resp.status().as_u16(), 101);
    ws.send(Message::text(
        json!({"args": ["sh", "-i"], "pty": {"rows": 30, "cols": 100}, "env": {"PS1": "$ "}})
            .to_string(),
    ))
    .unwrap();
    let mut text_events = Vec::new();
    let mut screen = Vec::new();
    let mut read_until = |ws: &mut tungstenite::WebSocket<_>,
                          needle: &str,
                          screen: &mut Vec<u8>| {
        let t = Instant::now();
        while !String::from_utf8_lossy(screen).contains(needle) {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "no {needle:?} in {}",
                String::from_utf8_lossy(screen)
            );
            match ws.read().unwrap() {
                Message::Binary(b) => {
                    assert_eq!(b[0], proto::api::WS_STDOUT, "a terminal has one stream");
                    screen.extend_from_slice(&b[1..]);
                }
                Message::Text(t) => text_events.push(serde_json::from_str::<Value>(&t).unwrap()),
                _ => {}
            }
        }
    };
    ws.send(Message::binary(&b"tty; stty size; echo $((6*7))\n"[..]))
        .unwrap();
    read_until(&mut ws, "42", &mut screen);
    let text = String::from_utf8_lossy(&screen).into_owned();
    assert!(
        text.contains("/dev/pts/") && text.contains("30 100"),
        "{text}"
    );
    ws.send(Message::text(
        json!({"type": "resize", "rows": 50, "cols": 132}).to_string(),
    ))
    .unwrap();
    ws.send(Message::text(
        json!({"type": "stdin", "data": B64.encode(b"stty size\n")}).to_string(),
    ))
    .unwrap();
    read_until(&mut ws, "50 132", &mut screen);
    ws.send(Message::binary(&b"exit 3\n"[..])).unwrap();
    let exit = loop {
        match ws.read() {
            Ok(Message::Text(t)) => {
                let v: Value = serde_json::from_str(&t).unwrap();
                if v["type"] == "exit" {
                    break v;
                }
                text_events.push(v);
            }
            Ok(_) => {}
            Err(e) => panic!("closed before the exit: {e}"),
        }
    };
    assert_eq!(exit["exit_code"], 3, "{exit}");
    assert_eq!(text_events[0]["type"], "started", "{text_events:?}");

    // A bad control message ends the session with an error event.
    let (mut ws, _) = tungstenite::connect(&ws_url).unwrap();
    ws.send(Message::text(json!({"args": ["sleep", "30"]}).to_string()))
        .unwrap();
    let started: Value = match ws.read().unwrap() {
        Message::Text(t) => serde_json::from_str(&t).unwrap(),
        m => panic!("{m:?}"),
    };
    let pid = started["pid"].as_i64().unwrap();
    ws.send(Message::text(
        json!({"type": "signal", "signal": 99}).to_string(),
    ))
    .unwrap();
    let err: Value = match ws.read().unwrap() {
        Message::Text(t) => serde_json::from_str(&t).unwrap(),
        m => panic!("{m:?}"),
    };
    assert_eq!(
        (err["type"].as_str(), err["status"].as_u64()),
        (Some("error"), Some(400))
    );
    let t = Instant::now();
    while alive(pid) {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{pid} outlived its WebSocket"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Peak resident memory of `pid` in KiB since the last reset.
fn peak_kib(pid: i32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

fn reset_peak(pid: i32) {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").unwrap();
}

/// A stream of `total` bytes: 4 MiB blocks of random data, each stamped
/// with its index (so a lost or repeated block shows).
struct Pattern {
    block: Vec<u8>,
    total: u64,
    pos: u64,
}

const BLOCK: usize = 4 << 20;

impl Pattern {
    fn new(total: u64) -> Pattern {
        let mut block = vec![0u8; BLOCK];
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for chunk in block.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
        }
        Pattern {
            block,
            total,
            pos: 0,
        }
    }

    fn byte_at(&self, pos: u64) -> u8 {
        let (n, off) = (pos / BLOCK as u64, (pos % BLOCK as u64) as usize);
        if off < 8 {
            n.to_le_bytes()[off]
        } else {
            self.block[off]
        }
    }

    /// Whether `got` is the pattern from `at`.
    fn matches(&self, at: u64, got: &[u8]) -> bool {
        let mut i = 0;
        while i < got.len() {
            let pos = at + i as u64;
            let off = (pos % BLOCK as u64) as usize;
            let run = (BLOCK - off).min(got.len() - i);
            if off < 8 {
                if got[i] != self.byte_at(pos) {
                    return false;
                }
                i += 1;
                continue;
            }
            if got[i..i + run] != self.block[off..off + run] {
                return false;
            }
            i += run;
        }
        true
    }
}

impl Read for Pattern {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.total - self.pos;
        let n = (buf.len() as u64).min(left) as usize;
        let off = (self.pos % BLOCK as u64) as usize;
        let n = n.min(BLOCK - off);
        if n == 0 {
            return Ok(0);
        }
        if off < 8 {
            let m = n.min(8 - off);
            for (j, b) in buf[..m].iter_mut().enumerate() {
                *b = self.byte_at(self.pos + j as u64);
            }
            self.pos += m as u64;
            return Ok(m);
        }
        buf[..n].copy_from_slice(&self.block[off..off + n]);
        self.pos += n as u64;
        Ok(n)
    }
}

/// Checks that `r` yields the pattern of `total` bytes; answers the count.
fn check_pattern(r: &mut dyn Read, total: u64) -> u64 {
    let p = Pattern::new(total);
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0u64;
    loop {
        let n = r.read(&mut buf).unwrap();
        if n == 0 {
            return at;
        }
        assert!(
            p.matches(at, &buf[..n]),
            "bytes differ in [{at}, {})",
            at + n as u64
        );
        at += n as u64;
    }
}

#[test]
fn one_gib_each_way_within_the_daemons_memory_budget_and_file_operations() {
    let b = bed("files");
    let d = &b.d;
    let id = &b.root;
    const GIB: u64 = 1 << 30;
    let big = b.work.join("big.bin");
    let big_s = big.to_string_lossy().into_owned();
    let files = |q: &str| url(d, &format!("/v1/sandboxes/{id}/files{q}"));
    let enc = |p: &str| proto::routes::seg(p);

    reset_peak(d.pid());
    let before = peak_kib(d.pid());
    let t = Instant::now();
    let r = d
        .agent()
        .put(&files(&format!("?path={}", enc(&big_s))))
        .send(ureq::SendBody::from_owned_reader(Pattern::new(GIB)))
        .unwrap();
    let up = t.elapsed();
    assert_eq!(r.status().as_u16(), 201);
    assert_eq!(std::fs::metadata(&big).unwrap().len(), GIB);
    assert_eq!(
        check_pattern(&mut std::fs::File::open(&big).unwrap(), GIB),
        GIB
    );

    let t = Instant::now();
    let r = d
        .agent()
        .get(&files(&format!("?path={}", enc(&big_s))))
        .call()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(
        r.headers()["content-length"].to_str().unwrap(),
        GIB.to_string()
    );
    let got = check_pattern(&mut r.into_body().into_reader(), GIB);
    let down = t.elapsed();
    assert_eq!(got, GIB);
    let grew = peak_kib(d.pid()).saturating_sub(before);
    eprintln!(
        "1 GiB up in {up:?}, down in {down:?}; the daemon's peak RSS grew {} MiB",
        grew / 1024
    );
    assert!(
        grew < 64 * 1024,
        "the daemon's peak RSS grew by {grew} KiB moving 1 GiB"
    );
    std::fs::remove_file(&big).unwrap();

    // A failed upload leaves nothing behind: a missing directory is 404.
    let missing = b.work.join("no/such/dir/f").to_string_lossy().into_owned();
    let r = d
        .agent()
        .put(&files(&format!("?path={}", enc(&missing))))
        .send(&b"x"[..])
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
    let r = d
        .agent()
        .put(&files(&format!(
            "?path={}&create_dirs=true&mode=600",
            enc(&missing)
        )))
        .send(&b"x"[..])
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&missing).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // mkdir, list, stat, rename, remove.
    let w = b.work.to_string_lossy().into_owned();
    let p = |s: &str| format!("{w}/{s}");
    let base = format!("/v1/sandboxes/{id}/files");
    d.expect(
        "POST",
        &format!("{base}/mkdir"),
        Some(json!({"path": p("a/b"), "parents": true})),
        204,
    );
    let (s, v) = d.call(
        "POST",
        &format!("{base}/mkdir"),
        Some(json!({"path": p("a/b")})),
    );
    assert_eq!(s, 502, "an existing directory without parents: {v}");
    std::fs::write(b.work.join("a/b/f.txt"), b"hello").unwrap();
    let l = d.expect(
        "GET",
        &format!("{base}/list?path={}", enc(&p("a/b"))),
        None,
        200,
    );
    assert_eq!(l["entries"][0]["name"], "f.txt");
    assert_eq!(
        (l["entries"][0]["size"].as_u64(), l["truncated"].as_bool()),
        (Some(5), Some(false))
    );
    let st = d.expect(
        "GET",
        &format!("{base}/stat?path={}", enc(&p("a"))),
        None,
        200,
    );
    assert_eq!(st["file_type"], "dir");
    d.expect(
        "POST",
        &format!("{base}/rename"),
        Some(json!({"from": p("a/b/f.txt"), "to": p("a/g.txt")})),
        204,
    );
    assert_eq!(std::fs::read(b.work.join("a/g.txt")).unwrap(), b"hello");
    let (s, v) = d.call("DELETE", &format!("{base}?path={}", enc(&p("a"))), None);
    assert_eq!(s, 502, "a directory with content without recursive: {v}");
    assert!(v["error"].as_str().unwrap().contains("recursive"), "{v}");
    d.expect(
        "DELETE",
        &format!("{base}?path={}&recursive=true", enc(&p("a"))),
        None,
        204,
    );
    assert!(!b.work.join("a").exists());

    // The guest's errors, mapped: ENOENT 404, EACCES 403; bad paths 400.
    for (path, want) in [
        (format!("{base}/stat?path={}", enc(&p("gone"))), 404),
        (format!("{base}?path={}", enc(&p("gone"))), 404),
        (format!("{base}/list?path={}", enc(&p("gone"))), 404),
        (format!("{base}/stat?path=relative"), 400),
        (format!("{base}/stat"), 400),
    ] {
        let (s, v) = d.call("GET", &path, None);
        assert_eq!(s, want, "{path}: {v}");
    }
    let nb = format!("/v1/sandboxes/{}/files", b.nobody);
    for path in [
        format!("{nb}?path={}", enc("/etc/shadow")),
        format!("{nb}/list?path={}", enc("/root")),
    ] {
        let (s, v) = d.call("GET", &path, None);
        assert_eq!(s, 403, "{path}: {v}\n{}", tail(&d.log_text(), 2000));
    }
    let (s, v) = d.call(
        "POST",
        &format!("{nb}/mkdir"),
        Some(json!({"path": "/root/nope"})),
    );
    assert_eq!(s, 403, "{v}");
}
