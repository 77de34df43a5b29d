//! What the daemon adds to the guest routes: streamed exec's first byte,
//! buffered exec, and file throughput each way, through the REST API
//! (`/exec/stream`, `/exec`, `PUT`/`GET /files`) next to the same
//! operations sent straight to the agent by the agent client, in the same
//! run, alternating.
//!
//! The agent is forkd-agent run on this host at a built-in sandbox's vsock
//! socket path (`--vsock-handshake`: it answers the VMM's handshake), so
//! the daemon reaches it exactly as it reaches a guest's, and the direct
//! client connects to the same socket: the difference between the two is
//! the daemon (HTTP, the async/blocking bridge, base64 of stream output).
//! Neither side crosses a real vsock here (this machine boots no Linux
//! guest); the lab's host step times the same file transfer against a real
//! guest (lab/host/sandbox_api.py).
//!
//! ```sh
//! cargo build --release --workspace
//! target/release/guest_api --rounds 20 --file-mib 256
//! ```

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use agent_client::agent::ExecRequest;
use agent_client::{Client, Event, Target};
use bench::{ms, Stats};
use clap::Parser;
use serde_json::{json, Value};

#[derive(Parser)]
#[command(about = "Guest routes through the daemon vs straight to the agent")]
struct Args {
    /// Rounds of each latency measurement.
    #[arg(long, default_value_t = 20)]
    rounds: usize,
    /// Size of the file moved each way, in MiB (twice: once each path).
    #[arg(long, default_value_t = 256)]
    file_mib: u64,
    /// Directory holding forkd-daemon, forkd-vmm and forkd-agent (default:
    /// next to this program).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        // SAFETY: our own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

fn http() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(600)))
        .build()
        .into()
}

fn post(url: &str, body: Value) -> Value {
    let mut r = http().post(url).send_json(body).unwrap();
    let text = r.body_mut().read_to_string().unwrap();
    assert!(r.status().is_success(), "POST {url}: {text}");
    serde_json::from_str(&text).unwrap_or(Value::Null)
}

/// A stream of `n` bytes of a fixed pattern.
struct Zeroish {
    left: u64,
}

impl Read for Zeroish {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = (buf.len() as u64).min(self.left) as usize;
        for (i, b) in buf[..n].iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        self.left -= n as u64;
        Ok(n)
    }
}

fn main() {
    let a = Args::parse();
    let bin = a.bin_dir.clone().unwrap_or_else(|| {
        std::env::current_exe()
            .unwrap()
            .parent()
            .unwrap()
            .to_path_buf()
    });
    for b in ["forkd-daemon", "forkd-vmm", "forkd-agent"] {
        assert!(
            bin.join(b).is_file(),
            "{} is missing: cargo build --release --workspace",
            bin.join(b).display()
        );
    }
    let tmp = std::env::temp_dir().join(format!("forkd-bench-guest-{}", std::process::id()));
    let state = tmp.join("state");
    std::fs::create_dir_all(&state).unwrap();
    let log = state.join("daemon.log");
    let daemon = Proc(
        Command::new(bin.join("forkd-daemon"))
            .args(["serve", "--bind", "127.0.0.1:0", "--state-dir"])
            .arg(&state)
            .arg("--vmm-binary")
            .arg(bin.join("forkd-vmm"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let url = loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if let Some(u) = forkd_daemon::serve::served_url(&text) {
            break u.to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "the daemon did not start:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    post(
        &format!("{url}/v1/snapshots"),
        json!({"tag": "g", "builtin": true}),
    );
    let kids = post(&format!("{url}/v1/sandboxes"), json!({"snapshot_tag": "g"}));
    let id = kids[0]["id"].as_str().unwrap().to_owned();
    let store = forkd_daemon::store::Store::open(&state.join("forkd.db")).unwrap();
    let vsock = store.sandbox(&id).unwrap().unwrap().vsock_socket.unwrap();
    while !vsock.exists() {
        std::thread::sleep(Duration::from_millis(5));
    }
    std::fs::remove_file(&vsock).unwrap();
    let _agent = Proc(
        Command::new(bin.join("forkd-agent"))
            .arg("--unix")
            .arg(&vsock)
            .args(["--vsock-handshake", "--no-interpreter"])
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let direct = Client::new(Target::Vsock {
        uds: vsock.clone(),
        port: agent_client::agent::DEFAULT_VSOCK_PORT,
    });
    while direct.ping().is_err() {
        std::thread::sleep(Duration::from_millis(5));
    }
    let sb = format!("{url}/v1/sandboxes/{id}");
    // The daemon's first contact pings and remembers the agent.
    post(&format!("{sb}/ping"), json!({}));
    println!(
        "guest_api: {} rounds; agent on the host at sandbox {id}'s vsock socket",
        a.rounds
    );

    let args = || {
        vec![
            "sh".to_string(),
            "-c".to_string(),
            "echo x; sleep 0.05".to_string(),
        ]
    };
    let (mut first_direct, mut first_api) = (Vec::new(), Vec::new());
    let (mut exec_direct, mut exec_api) = (Vec::new(), Vec::new());
    for _ in 0..a.rounds {
        // Streamed exec: request sent to the first output byte.
        let t = Instant::now();
        let (_, mut r, _w) = direct.session(&ExecRequest::new(args()), b"").unwrap();
        loop {
            if let Event::Output(..) = r.next_event().unwrap() {
                break;
            }
        }
        first_direct.push(t.elapsed());
        while !matches!(r.next_event().unwrap(), Event::Exit(_)) {}

        let t = Instant::now();
        let resp = http()
            .post(&format!("{sb}/exec/stream"))
            .send_json(json!({"args": args()}))
            .unwrap();
        let mut lines = BufReader::new(resp.into_body().into_reader()).lines();
        loop {
            let l = lines.next().unwrap().unwrap();
            if l.contains("\"stdout\"") {
                break;
            }
        }
        first_api.push(t.elapsed());
        for l in lines {
            if l.unwrap().contains("\"exit\"") {
                break;
            }
        }

        // Buffered exec of `true`.
        let t = Instant::now();
        direct
            .exec_collect(&ExecRequest::new(vec!["true".into()]), b"", 1 << 20)
            .unwrap();
        exec_direct.push(t.elapsed());
        let t = Instant::now();
        post(&format!("{sb}/exec"), json!({"args": ["true"]}));
        exec_api.push(t.elapsed());
    }
    let show = |what: &str, d: &[Duration], api: &[Duration]| {
        let (sd, sa) = (Stats::of(d), Stats::of(api));
        println!("{what:<26} direct {sd}");
        println!(
            "{:<26} daemon {sa}  (+{:.3} ms p50)",
            "",
            ms(sa.p50) - ms(sd.p50)
        );
    };
    show("streamed exec, 1st byte", &first_direct, &first_api);
    show("buffered exec of true", &exec_direct, &exec_api);

    // Files: a.file_mib each way, direct and through the daemon, in /dev/shm
    // (the same sink for both, no disk in the figure).
    let bytes = a.file_mib << 20;
    let path = format!("/dev/shm/forkd-bench-{}.bin", std::process::id());
    let mibps = |d: Duration| (bytes as f64 / 1048576.0) / d.as_secs_f64();
    let t = Instant::now();
    let req = agent_client::agent::WriteRequest {
        path: path.clone(),
        mode: 0o600,
        append: false,
        create_dirs: false,
    };
    direct
        .write_from(&req, &mut Zeroish { left: bytes })
        .unwrap();
    let up_direct = t.elapsed();
    let t = Instant::now();
    let n = direct
        .read_to(&path, 0, u64::MAX, &mut std::io::sink())
        .unwrap();
    let down_direct = t.elapsed();
    assert_eq!(n, bytes);
    let files = format!("{sb}/files?path={}", proto::routes::seg(&path));
    let t = Instant::now();
    let r = http()
        .put(&files)
        .send(ureq::SendBody::from_owned_reader(Zeroish { left: bytes }))
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    let up_api = t.elapsed();
    let t = Instant::now();
    let r = http().get(&files).call().unwrap();
    let n = std::io::copy(&mut r.into_body().into_reader(), &mut std::io::sink()).unwrap();
    let down_api = t.elapsed();
    assert_eq!(n, bytes);
    let _ = std::fs::remove_file(&path);
    println!(
        "upload {} MiB               direct {:>7.0} MiB/s   daemon {:>7.0} MiB/s  ({:.2}x)",
        a.file_mib,
        mibps(up_direct),
        mibps(up_api),
        up_api.as_secs_f64() / up_direct.as_secs_f64()
    );
    println!(
        "download {} MiB             direct {:>7.0} MiB/s   daemon {:>7.0} MiB/s  ({:.2}x)",
        a.file_mib,
        mibps(down_direct),
        mibps(down_api),
        down_api.as_secs_f64() / down_direct.as_secs_f64()
    );
    let _ = http().delete(&sb).call();
    drop(daemon);
    let _ = std::fs::remove_dir_all(&tmp);
}
