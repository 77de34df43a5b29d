//! What the daemon adds to the fork path: N sandboxes spawned through
//! `POST /v1/sandboxes` and each pinged through `POST /v1/sandboxes/:id/ping`,
//! next to the same N children forked by a `forkd-vmm fork-server` of the
//! same snapshot and pinged straight on their vsock sockets, in the same
//! run. Both count from the request until every guest agent has answered a
//! ping, one ping at a time from one client thread. With `--network`, a
//! third series spawns children of a snapshot with a network interface
//! (a network namespace and tap made per child) next to the plain ones.
//!
//! With `--single N`, instead: N spawn requests of one sandbox each,
//! timed from the request to its answer (recorded and forked, no ping),
//! next to N forks of one child straight from a fork server, alternating.
//!
//! With `--prewarm N`, instead: N pairs of the first child of a fresh
//! 512 MiB snapshot, one spawned with `prewarm: true` and one without (the
//! baseline, in the same run, order alternating), each timed from the
//! spawn request to its agent answering, then its first full branch's
//! pause (the answer's `pause_us`).
//!
//! With `--fork-pool N`, the daemon's fork servers (`--fork-pool`) and
//! the direct one (`--pool`) keep N children parked, and every round
//! starts with both pools full.
//!
//! With `--unconfined-too`, a second daemon started with `--no-seccomp
//! --no-jail` (and a second direct fork server with `--seccomp off --jail
//! off`) spawns the same rounds, alternating with the first, so what the
//! VMMs' confinement (seccomp filters and the jail) costs is measured in
//! the same run (the baseline: unconfined VMMs, as root).
//!
//! ```sh
//! cargo build --release --workspace
//! target/release/api_spawn --children 100 --rounds 5 [--network [--netns-pool 100]] [--fork-pool 100]
//! target/release/api_spawn --children 100 --rounds 5 --fork-pool 100 --unconfined-too
//! target/release/api_spawn --prewarm 5
//! target/release/api_spawn --single 200 [--bin-dir OTHER_BUILD]
//! ```

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use agent_client::{Client, Target};
use bench::{ms, Stats};
use clap::Parser;
use serde_json::{json, Value};

#[derive(Parser)]
#[command(about = "Spawn through the daemon's REST API vs straight from a fork server")]
struct Args {
    /// Sandboxes per round.
    #[arg(long, default_value_t = 100)]
    children: u32,
    /// Rounds of each.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Directory holding forkd-daemon and forkd-vmm (default: next to this program).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Also spawn children of a snapshot with a network interface (a
    /// namespace each); needs iproute2 and /dev/net/tun.
    #[arg(long)]
    network: bool,
    /// With --network: the daemon keeps this many namespaces ready ahead
    /// of spawns (`forkd-daemon serve --netns-pool`); each networked round
    /// starts once the pool is full again.
    #[arg(long, default_value_t = 0, requires = "network")]
    netns_pool: u32,
    /// Only the prewarm series: this many pairs (see the module docs).
    #[arg(long, value_name = "PAIRS")]
    prewarm: Option<usize>,
    /// Only the single-spawn series: this many spawns of one sandbox
    /// each (see the module docs).
    #[arg(long, value_name = "SPAWNS")]
    single: Option<usize>,
    /// Children parked ahead by every fork server, the daemon's and the
    /// direct one; each round starts with the pools full.
    #[arg(long, default_value_t = 0)]
    fork_pool: u32,
    /// Also spawn every round from a daemon whose VMMs are unconfined
    /// (`--no-seccomp --no-jail`) and a direct fork server likewise, in
    /// alternation with the default ones.
    #[arg(long, conflicts_with_all = ["prewarm", "single", "network"])]
    unconfined_too: bool,
}

fn main() {
    let args = Args::parse();
    let bin_dir = args.bin_dir.clone().unwrap_or_else(|| {
        std::env::current_exe()
            .unwrap()
            .parent()
            .unwrap()
            .to_owned()
    });
    for b in ["forkd-daemon", "forkd-vmm"] {
        assert!(
            bin_dir.join(b).is_file(),
            "{} not found: build it first (cargo build --release --workspace)",
            bin_dir.join(b).display()
        );
    }
    let tmp = std::env::temp_dir().join(format!("forkd-api-spawn-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let daemon = Daemon::start(
        &bin_dir,
        &tmp.join("state"),
        args.netns_pool,
        args.fork_pool,
        &[],
    );
    if let Some(pairs) = args.prewarm {
        prewarm_series(&daemon, pairs);
        drop(daemon);
        let _ = std::fs::remove_dir_all(&tmp);
        return;
    }
    let snap = daemon.call(
        "POST",
        "/v1/snapshots",
        Some(json!({"tag": "bench", "builtin": true})),
    );
    let snap_dir = PathBuf::from(snap["dir"].as_str().expect("snapshot made"));
    if args.network {
        let net = daemon.call(
            "POST",
            "/v1/snapshots",
            Some(json!({"tag": "bench-net", "builtin": true, "network": true})),
        );
        assert_eq!(net["network"], true, "networked snapshot: {net}");
        api_round(&daemon, "bench-net", 1);
    }
    // Warm both paths (fork server started, page cache filled).
    api_round(&daemon, "bench", 1);
    let server = ForkServer::start(
        &bin_dir,
        &snap_dir,
        &tmp.join("fork.sock"),
        args.fork_pool,
        &[],
    );
    direct_round(&server, &tmp.join("warm"), 1);
    if args.unconfined_too {
        unconfined_series(&args, &bin_dir, &tmp, &daemon, &server);
        drop(server);
        drop(daemon);
        let _ = std::fs::remove_dir_all(&tmp);
        return;
    }
    if let Some(spawns) = args.single {
        single_series(&daemon, &server, &tmp, spawns);
        drop(server);
        drop(daemon);
        let _ = std::fs::remove_dir_all(&tmp);
        return;
    }

    let (mut api, mut direct, mut networked) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..args.rounds {
        if args.network {
            wait_for_pool(&daemon, args.netns_pool);
            networked.push(api_round(&daemon, "bench-net", args.children));
        }
        wait_parked(&tmp, args.fork_pool);
        api.push(api_round(&daemon, "bench", args.children));
        direct.push(direct_round(
            &server,
            &tmp.join(format!("r{round}")),
            args.children,
        ));
    }
    let (a, d) = (Stats::of(&api), Stats::of(&direct));
    println!(
        "{} sandboxes of the built-in guest (128 MiB), request to every agent answering, {} rounds:",
        args.children, args.rounds
    );
    println!("  daemon REST API    {a}");
    println!("  fork server direct {d}");
    println!(
        "  ratio (p50): {:.2}x; daemon overhead {:.3} ms per sandbox",
        ms(a.p50) / ms(d.p50),
        (ms(a.p50) - ms(d.p50)) / args.children as f64
    );
    if args.network {
        let n = Stats::of(&networked);
        let pool = match args.netns_pool {
            0 => String::new(),
            p => format!(" ({p} made ahead)"),
        };
        println!("  daemon REST API, a network namespace per child{pool} {n}");
        println!(
            "  ratio to the daemon without (p50): {:.2}x; {:.3} ms more per sandbox",
            ms(n.p50) / ms(a.p50),
            (ms(n.p50) - ms(a.p50)) / args.children as f64
        );
    }
    drop(server);
    drop(daemon);
    let _ = std::fs::remove_dir_all(&tmp);
}

/// `--unconfined-too`: the rounds of the default daemon and fork server
/// next to those of a daemon and a fork server whose VMMs are unconfined,
/// alternating (which goes first flips every round).
fn unconfined_series(args: &Args, bin_dir: &Path, tmp: &Path, d: &Daemon, server: &ForkServer) {
    let open = Daemon::start(
        bin_dir,
        &tmp.join("state-unconfined"),
        0,
        args.fork_pool,
        &["--no-seccomp", "--no-jail"],
    );
    let snap = open.call(
        "POST",
        "/v1/snapshots",
        Some(json!({"tag": "bench", "builtin": true})),
    );
    let snap_dir = PathBuf::from(snap["dir"].as_str().expect("snapshot made"));
    api_round(&open, "bench", 1);
    let open_server = ForkServer::start(
        bin_dir,
        &snap_dir,
        &tmp.join("fork-unconfined.sock"),
        args.fork_pool,
        &["--seccomp=off", "--jail=off"],
    );
    direct_round(&open_server, &tmp.join("warm-unconfined"), 1);
    // [confined, unconfined] of each.
    let (mut api, mut direct) = ([vec![], vec![]], [vec![], vec![]]);
    for round in 0..args.rounds {
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for k in order {
            let (daemon, server) = if k == 0 {
                (d, server)
            } else {
                (&open, &open_server)
            };
            wait_parked(tmp, args.fork_pool);
            api[k].push(api_round(daemon, "bench", args.children));
            let out = tmp.join(format!("r{round}-{k}"));
            direct[k].push(direct_round(server, &out, args.children));
        }
    }
    println!(
        "{} sandboxes of the built-in guest (128 MiB), request to every agent answering, {} rounds, \
         confined (seccomp filters and the jail) and not:",
        args.children, args.rounds
    );
    let (a, ao) = (Stats::of(&api[0]), Stats::of(&api[1]));
    let (f, fo) = (Stats::of(&direct[0]), Stats::of(&direct[1]));
    println!("  daemon REST API, confined   {a}");
    println!("  daemon REST API, unconfined {ao}");
    println!("  fork server, confined       {f}");
    println!("  fork server, unconfined     {fo}");
    println!(
        "  confined / unconfined (p50): REST API {:.3}x, fork server {:.3}x",
        ms(a.p50) / ms(ao.p50),
        ms(f.p50) / ms(fo.p50)
    );
    drop(open_server);
    drop(open);
}

/// `--single`: what one spawn request of one sandbox costs, from the
/// request to its answer (the sandbox recorded and forked; no ping),
/// through the API and straight from a fork server, alternating.
fn single_series(d: &Daemon, server: &ForkServer, tmp: &Path, spawns: usize) {
    let (mut api, mut direct) = (Vec::new(), Vec::new());
    for i in 0..spawns {
        let start = Instant::now();
        let kid = d.call(
            "POST",
            "/v1/sandboxes",
            Some(json!({"snapshot_tag": "bench"})),
        );
        api.push(start.elapsed());
        let id = kid[0]["id"].as_str().unwrap_or_else(|| panic!("{kid}"));
        d.call("DELETE", &format!("/v1/sandboxes/{id}"), None);
        let out = tmp.join(format!("s{i}"));
        let start = Instant::now();
        let children = server.fork(1, &out);
        direct.push(start.elapsed());
        for (pid, _, _) in children {
            // SAFETY: the child is ours.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let _ = std::fs::remove_dir_all(&out);
    }
    let (a, f) = (Stats::of(&api), Stats::of(&direct));
    println!("one sandbox a request, {spawns} requests, request to answer:");
    println!("  daemon REST API    {a}");
    println!("  fork server direct {f}");
    println!(
        "  the daemon's share (p50): {:.3} ms",
        ms(a.p50) - ms(f.p50)
    );
}

/// `--prewarm`: first children of fresh snapshots, prewarmed or not.
fn prewarm_series(d: &Daemon, pairs: usize) {
    // [plain, prewarmed]: request to agent answering, first branch's pause.
    let (mut ready, mut pause) = ([vec![], vec![]], [vec![], vec![]]);
    for i in 0..pairs {
        let order = if i % 2 == 0 { [0, 1] } else { [1, 0] };
        for k in order {
            let tag = format!("pw{i}{k}");
            let snap = d.call(
                "POST",
                "/v1/snapshots",
                Some(json!({"tag": tag, "builtin": true, "mem_size_mib": 512})),
            );
            assert_eq!(snap["status"], "ready", "{snap}");
            let start = Instant::now();
            let kid = d.call(
                "POST",
                "/v1/sandboxes",
                Some(json!({"snapshot_tag": tag, "prewarm": k == 1})),
            );
            let id = kid[0]["id"].as_str().unwrap_or_else(|| panic!("{kid}"));
            let pong = d.call("POST", &format!("/v1/sandboxes/{id}/ping"), None);
            assert_eq!(pong["pong"], true, "{pong}");
            ready[k].push(start.elapsed());
            let b = d.call(
                "POST",
                &format!("/v1/sandboxes/{id}/branch"),
                Some(json!({"tag": format!("{tag}b")})),
            );
            let us = b["pause_us"].as_u64().unwrap_or_else(|| panic!("{b}"));
            pause[k].push(Duration::from_micros(us));
            d.call("DELETE", &format!("/v1/sandboxes/{id}"), None);
        }
    }
    println!(
        "first child of a fresh 512 MiB built-in snapshot, {pairs} pairs, through the REST API:"
    );
    for (k, what) in ["plain    ", "prewarmed"].iter().enumerate() {
        println!("  {what} spawn to agent answering {}", Stats::of(&ready[k]));
        println!(
            "  {what} first full branch pause   {}",
            Stats::of(&pause[k])
        );
    }
    println!(
        "  first branch pause, prewarmed / plain (p50): {:.2}",
        ms(Stats::of(&pause[1]).p50) / ms(Stats::of(&pause[0]).p50)
    );
}

/// Waits until the daemon's namespace pool holds `n` (its
/// `forkd_netns_pool_ready` gauge).
fn wait_for_pool(d: &Daemon, n: u32) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let metrics = d.text("/metrics");
        let ready = metrics
            .lines()
            .find_map(|l| l.strip_prefix("forkd_netns_pool_ready "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0) as usize;
        if ready >= n as usize {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the namespace pool holds {ready} of {n}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One round through the API: spawn `n` of `tag`, ping each, then kill
/// (not timed).
fn api_round(d: &Daemon, tag: &str, n: u32) -> Duration {
    let start = Instant::now();
    let kids = d.call(
        "POST",
        "/v1/sandboxes",
        Some(json!({"snapshot_tag": tag, "n": n})),
    );
    let ids: Vec<String> = kids
        .as_array()
        .unwrap_or_else(|| panic!("spawn failed: {kids}"))
        .iter()
        .map(|k| k["id"].as_str().unwrap().to_owned())
        .collect();
    for id in &ids {
        let pong = d.call("POST", &format!("/v1/sandboxes/{id}/ping"), None);
        assert_eq!(pong["guest"], "guest: builtin", "{pong}");
    }
    let took = start.elapsed();
    for id in &ids {
        d.call("DELETE", &format!("/v1/sandboxes/{id}"), None);
    }
    took
}

/// One round straight from the fork server: fork, ping each agent on its
/// vsock socket, then shut them down (not timed).
fn direct_round(server: &ForkServer, out: &Path, n: u32) -> Duration {
    let start = Instant::now();
    let children = server.fork(n, out);
    for (_, _, vsock) in &children {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !vsock.exists() {
            assert!(
                Instant::now() < deadline,
                "{} never appeared",
                vsock.display()
            );
            std::thread::sleep(Duration::from_micros(100));
        }
        let client = Client::new(Target::Vsock {
            uds: vsock.clone(),
            port: proto::agent::DEFAULT_VSOCK_PORT,
        });
        // As the daemon does: a connection made before the restored guest
        // has seen its vsock device's reset may be dropped; pings are
        // safe to repeat.
        let mut tries = 0;
        let pong = loop {
            match client.ping() {
                Ok(p) => break p,
                Err(e) if tries >= 50 => panic!("the child's agent does not answer: {e}"),
                Err(_) => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
        };
        assert_eq!(pong.guest, "guest: builtin");
    }
    let took = start.elapsed();
    for (pid, control, _) in &children {
        let _ = proto::control::ControlClient::connect(control, Duration::from_secs(2))
            .and_then(|mut c| c.call(&proto::control::ControlRequest::Shutdown));
        // SAFETY: the child is ours; SIGKILL after a shutdown request is harmless.
        unsafe { libc::kill(*pid, libc::SIGKILL) };
    }
    let _ = std::fs::remove_dir_all(out);
    took
}

/// Waits until every fork server under `tmp` (the daemon's of the bench
/// snapshot and the direct one: their command lines name `tmp`) has
/// `pool` children parked (`forkd-pooled`).
fn wait_parked(tmp: &Path, pool: u32) {
    if pool == 0 {
        return;
    }
    let tmp = tmp.to_string_lossy().into_owned();
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let mut servers = 0;
        let mut full = 0;
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let cmd = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd);
            let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
            if comm.trim() != "forkd-vmm" || !cmd.contains("fork-server") || !cmd.contains(&tmp) {
                continue;
            }
            // A child handed out has its server's command line too (it is
            // a fork): a server's parent is no fork server.
            let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
            let ppid = stat
                .rsplit_once(") ")
                .and_then(|(_, r)| r.split_whitespace().nth(1))
                .unwrap_or("0");
            let parent = std::fs::read(format!("/proc/{ppid}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&parent).contains("fork-server") {
                continue;
            }
            servers += 1;
            let kids = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
                .unwrap_or_default();
            let parked = kids
                .split_whitespace()
                .filter(|k| {
                    std::fs::read_to_string(format!("/proc/{k}/comm"))
                        .is_ok_and(|c| c.trim() == "forkd-pooled")
                })
                .count();
            if parked >= pool as usize {
                full += 1;
            }
        }
        if servers > 0 && full == servers {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the fork pools did not fill in 300 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

struct Daemon {
    child: Child,
    url: String,
}

impl Daemon {
    // The child is waited for by `Daemon`'s Drop, or here when it does not start.
    #[allow(clippy::zombie_processes)]
    fn start(
        bin_dir: &Path,
        state: &Path,
        netns_pool: u32,
        fork_pool: u32,
        extra: &[&str],
    ) -> Daemon {
        std::fs::create_dir_all(state).unwrap();
        let log = state.join("daemon.log");
        let mut child = Command::new(bin_dir.join("forkd-daemon"))
            .args(["serve", "--bind", "127.0.0.1:0", "--state-dir"])
            .arg(state)
            .arg("--netns-pool")
            .arg(netns_pool.to_string())
            .arg(format!("--fork-pool={fork_pool}"))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start forkd-daemon");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if let Some(url) = forkd_daemon::serve::served_url(&text) {
                let url = url.to_owned();
                return Daemon { child, url };
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the daemon did not start:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// A GET's body, as text.
    fn text(&self, path: &str) -> String {
        let addr = self.url.trim_start_matches("http://");
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        answer
            .split_once("\r\n\r\n")
            .map(|x| x.1.to_owned())
            .unwrap_or_default()
    }

    /// One request on a fresh connection; the answer's JSON (Null when empty).
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let addr = self.url.trim_start_matches("http://");
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_nodelay(true).unwrap();
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        let json = answer.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
        if json.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}: {answer}"))
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

struct ForkServer {
    child: Child,
    socket: PathBuf,
}

impl ForkServer {
    fn start(
        bin_dir: &Path,
        snapshot: &Path,
        socket: &Path,
        pool: u32,
        extra: &[&str],
    ) -> ForkServer {
        let child = Command::new(bin_dir.join("forkd-vmm"))
            .arg("fork-server")
            .args(extra)
            .arg("--snapshot")
            .arg(snapshot)
            .arg("--socket")
            .arg(socket)
            .arg(format!("--pool={pool}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("start the fork server");
        let deadline = Instant::now() + Duration::from_secs(30);
        while UnixStream::connect(socket).is_err() {
            assert!(Instant::now() < deadline, "the fork server did not start");
            std::thread::sleep(Duration::from_millis(2));
        }
        ForkServer {
            child,
            socket: socket.to_owned(),
        }
    }

    /// (pid, control socket, vsock socket) of `n` new children.
    fn fork(&self, n: u32, out: &Path) -> Vec<(i32, PathBuf, PathBuf)> {
        let s = UnixStream::connect(&self.socket).unwrap();
        let request = json!({"op": "fork", "n": n, "out_dir": out, "console_log": true});
        (&s).write_all(format!("{request}\n").as_bytes()).unwrap();
        let mut line = String::new();
        BufReader::new(&s).read_line(&mut line).unwrap();
        let answer: Value = serde_json::from_str(&line).unwrap();
        answer["children"]
            .as_array()
            .unwrap_or_else(|| panic!("fork failed: {answer}"))
            .iter()
            .map(|c| {
                (
                    c["pid"].as_i64().unwrap() as i32,
                    PathBuf::from(c["control_socket"].as_str().unwrap()),
                    PathBuf::from(c["vsock_socket"].as_str().expect("a vsock device")),
                )
            })
            .collect()
    }
}

impl Drop for ForkServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}
