//! Crash consistency on a real daemon and real built-in guests: the
//! daemon killed (SIGKILL, at chosen state transitions and at random
//! moments), VMMs and fork servers killed, a VMM OOM-killed, two daemons
//! on one host. After each, the API's view and the machine agree (no VMM,
//! directory, namespace or cgroup the API does not list) and the tag or
//! snapshot involved is usable.

mod common;

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::machine::{assert_agrees, processes_logging_under};
use common::{kill_all, Config, Daemon, TempDir};
use serde_json::{json, Value};

/// Polls `what` until it holds, for up to 30 s.
fn eventually(what: &str, mut holds: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !holds() {
        assert!(Instant::now() < deadline, "{what}: not within 30 s");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn kill9(pid: i64) {
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
}

fn spawn(d: &Daemon, body: Value) -> Vec<Value> {
    d.expect("POST", "/v1/sandboxes", Some(body), 201)
        .as_array()
        .unwrap()
        .clone()
}

fn sandbox(d: &Daemon, id: &str) -> (u16, Value) {
    d.call("GET", &format!("/v1/sandboxes/{id}"), None)
}

/// The sandbox's state once it is not `running` (polled).
fn ended(d: &Daemon, id: &str) -> Value {
    let mut last = Value::Null;
    eventually(&format!("sandbox {id} reads as exited"), || {
        last = sandbox(d, id).1;
        last["state"] == "exited"
    });
    last
}

/// The fork server processes of the daemon whose state is `state`: a
/// `forkd-vmm fork-server` of one of its snapshots that logs to a
/// `.fork.log` and whose parent is not one (a child it forked shares its
/// command line, and its log until the child opens its own; a child whose
/// server died is the daemon's, and logs to its own).
fn fork_servers(state: &Path) -> Vec<i64> {
    let logs_as_server = |pid: i64| {
        std::fs::read_link(format!("/proc/{pid}/fd/2"))
            .is_ok_and(|l| l.to_string_lossy().ends_with(".fork.log"))
    };
    let cmdline = |pid: i64| {
        std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
            .unwrap_or_default()
    };
    let is_server = |pid: i64| {
        let c = cmdline(pid);
        c.contains(" fork-server ") && c.contains(&state.to_string_lossy().into_owned())
    };
    let parent = |pid: i64| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| {
                s.rsplit_once(')')
                    .and_then(|(_, r)| r.split_whitespace().nth(1).map(str::to_owned))
            })
            .and_then(|p| p.parse::<i64>().ok())
            .unwrap_or(0)
    };
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_string_lossy().parse::<i64>().ok())
        .filter(|&pid| is_server(pid) && !is_server(parent(pid)) && logs_as_server(pid))
        .collect()
}

/// Sends one request line to a VMM's control socket; its answer, if any.
fn control(socket: &Path, request: Value, wait: Duration) -> Option<Value> {
    let mut s = UnixStream::connect(socket).ok()?;
    s.set_read_timeout(Some(wait)).unwrap();
    writeln!(s, "{request}").ok()?;
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(&s), &mut line).ok()?;
    serde_json::from_str(&line).ok()
}

fn sandbox_dir(state: &Path, id: &str) -> PathBuf {
    let (batch, i) = id.rsplit_once('-').unwrap();
    state.join("sandboxes").join(batch).join(i)
}

/// A killed VMM reads as exited with signal 9 on every read, also when its
/// fork server died first (the daemon is its subreaper then); the list
/// shows it only with `?all=true`; it is forgotten after the retention
/// time or when deleted.
#[test]
fn a_dead_vmm_reads_as_exited_with_its_signal_then_is_forgotten() {
    let tmp = TempDir::new("exited");
    let state = tmp.path().join("state");
    let d = Daemon::start(
        &state,
        &Config {
            args: vec!["--exited-retention-secs".into(), "4".into()],
            ..Config::default()
        },
    );
    d.builtin_snapshot("x", json!({}));
    let kids = spawn(&d, json!({"snapshot_tag": "x", "n": 3}));
    let ids: Vec<String> = kids
        .iter()
        .map(|k| k["id"].as_str().unwrap().to_owned())
        .collect();
    let pid = |i: usize| kids[i]["pid"].as_i64().unwrap();
    for k in &kids {
        assert_eq!(k["state"], "running", "{k}");
    }

    // Killed while its fork server runs: the server recorded the signal.
    kill9(pid(0));
    let a = ended(&d, &ids[0]);
    assert_eq!(a["signal"], 9, "{a}");
    assert!(a.get("exit_code").is_none(), "{a}");
    assert_eq!(a["oom_killed"], false, "{a}");
    assert!(a["exited_at_unix"].is_u64(), "{a}");
    let (s, v) = d.call(
        "POST",
        &format!("/v1/sandboxes/{}/exec", ids[0]),
        Some(json!({"args": ["true"]})),
    );
    assert_eq!(s, 409, "{v}");
    assert!(v["error"].as_str().unwrap().contains("signal 9"), "{v}");
    let listed = d.expect("GET", "/v1/sandboxes", None, 200);
    assert_eq!(
        listed.as_array().unwrap().len(),
        2,
        "running only: {listed}"
    );
    let all = d.expect("GET", "/v1/sandboxes?all=true", None, 200);
    assert_eq!(all.as_array().unwrap().len(), 3, "{all}");
    assert!(
        !sandbox_dir(&state, &ids[0]).exists(),
        "its directory is released"
    );
    assert_agrees(&d, "after a VMM was killed");

    // The fork server killed first: its children are the daemon's now.
    let servers = fork_servers(&state);
    assert_eq!(servers.len(), 1, "{servers:?}");
    kill9(servers[0]);
    eventually("the fork server is gone", || {
        fork_servers(&state).is_empty()
    });
    kill9(pid(1));
    let b = ended(&d, &ids[1]);
    assert_eq!(b["signal"], 9, "after its fork server died: {b}");
    // Noticed without a read: the reaper. Nothing is left of it.
    assert!(processes_logging_under(&sandbox_dir(&state, &ids[1])).is_empty());

    // A shutdown asked of the VMM itself: an exit status, not a signal.
    let c_socket = sandbox_dir(&state, &ids[2]).join("control.sock");
    control(&c_socket, json!({"op": "shutdown"}), Duration::from_secs(5));
    let c = ended(&d, &ids[2]);
    assert!(c["exit_code"].is_i64(), "{c}");
    assert!(c.get("signal").is_none(), "{c}");

    // Deleted: gone at once. The others: gone once the retention passes.
    d.expect("DELETE", &format!("/v1/sandboxes/{}", ids[1]), None, 204);
    assert_eq!(sandbox(&d, &ids[1]).0, 404);
    eventually("an exited sandbox is forgotten after the retention", || {
        sandbox(&d, &ids[0]).0 == 404
    });
    assert_agrees(&d, "after the retention");
}

/// A capped VMM that writes more than its cap is OOM-killed: the cgroup's
/// count says so.
#[test]
fn an_oom_kill_is_told_from_the_cgroup() {
    let tmp = TempDir::new("oom");
    let state = tmp.path().join("state");
    let d = Daemon::start(&state, &Config::default());
    d.builtin_snapshot("o", json!({"mem_size_mib": 256}));
    let kid = spawn(&d, json!({"snapshot_tag": "o", "memory_limit_mib": 48}));
    let id = kid[0]["id"].as_str().unwrap();
    // The guest writes 160 MiB of its RAM: every page a private copy the
    // cgroup is charged for.
    let socket = sandbox_dir(&state, id).join("control.sock");
    let fill = json!({"op": "guest", "timeout_ms": 60000,
        "request": {"op": "fill", "seed": 1, "seq": 1, "mib": 160}});
    let answer = control(&socket, fill, Duration::from_secs(60));
    let v = ended(&d, id);
    assert_eq!(v["oom_killed"], true, "{v} (the fill answered {answer:?})");
    assert_eq!(v["signal"], 9, "{v}");
    assert_agrees(&d, "after an OOM kill");
}

/// A sandbox's VMM runs under seccomp filters (every thread), and one
/// that makes a forbidden call reads as exited with status 159 and a
/// detail naming the call; `--no-seccomp` runs VMMs unfiltered.
#[test]
fn a_seccomp_violation_ends_the_sandbox_and_says_why() {
    let tmp = TempDir::new("seccomp");
    let state = tmp.path().join("state");
    let d = Daemon::start(&state, &Config::default());
    d.builtin_snapshot("s", json!({}));
    let kid = spawn(&d, json!({"snapshot_tag": "s"}));
    let (id, pid) = (
        kid[0]["id"].as_str().unwrap(),
        kid[0]["pid"].as_i64().unwrap(),
    );
    // Once it answers, its machine is built and every thread confined.
    d.expect("POST", &format!("/v1/sandboxes/{id}/ping"), None, 200);
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap();
    for task in tasks.flatten() {
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        if !status.is_empty() {
            assert!(status.contains("\nSeccomp:\t2\n"), "{status}");
        }
    }
    let socket = sandbox_dir(&state, id).join("control.sock");
    let answer = control(
        &socket,
        json!({"op": "seccomp_self_test"}),
        Duration::from_secs(10),
    );
    assert_eq!(answer, None, "the VMM ends before it answers");
    let v = ended(&d, id);
    assert_eq!(v["exit_code"], 159, "{v}");
    let detail = v["exit_detail"].as_str().unwrap_or_default();
    assert!(
        detail.starts_with("seccomp violation:")
            && detail.contains("control-conn made a forbidden system call (number 59)"),
        "{v}"
    );
    assert_agrees(&d, "after a seccomp violation");
    drop(d);

    let state = tmp.path().join("state-off");
    let d = Daemon::start(
        &state,
        &Config {
            args: vec!["--no-seccomp".into()],
            ..Config::default()
        },
    );
    d.builtin_snapshot("s", json!({}));
    let kid = spawn(&d, json!({"snapshot_tag": "s"}));
    let pid = kid[0]["pid"].as_i64().unwrap();
    let id = kid[0]["id"].as_str().unwrap();
    d.expect("POST", &format!("/v1/sandboxes/{id}/ping"), None, 200);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(status.contains("\nSeccomp:\t0\n"), "{status}");
    let socket = sandbox_dir(&state, id).join("control.sock");
    let answer = control(
        &socket,
        json!({"op": "seccomp_self_test"}),
        Duration::from_secs(10),
    );
    let message = answer
        .as_ref()
        .and_then(|a| a["message"].as_str())
        .unwrap_or_default();
    assert!(message.contains("went through"), "{answer:?}");
}

/// Runs `act` against a daemon that kills itself at `point`, then starts
/// it again on the same state and checks that the API and the machine
/// agree. The act's own answer is not looked at: the daemon is gone
/// before it answers.
fn crash_at(state: &Path, point: &str, act: impl FnOnce(&Daemon) + Send) -> Daemon {
    let mut d = Daemon::start(
        state,
        &Config {
            env: vec![("FORKD_FAILPOINTS".into(), point.into())],
            ..Config::default()
        },
    );
    let pid = d.pid();
    let gone = || {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| {
            s.rsplit_once(')')
                .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
        })
    };
    std::thread::scope(|s| {
        s.spawn(|| {
            // The request fails when the daemon dies under it.
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| act(&d)));
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        while !gone() {
            assert!(
                Instant::now() < deadline,
                "the daemon did not stop at failpoint {point}:\n{}",
                common::tail(&d.log_text(), 3000)
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    });
    let log = d.log_text();
    assert!(
        log.contains(&format!("failpoint {point}")),
        "the daemon ended, but not at {point}:\n{}",
        common::tail(&log, 3000)
    );
    d.wait_end(Duration::from_secs(5));
    let d = Daemon::start(state, &Config::default());
    assert_agrees(&d, &format!("after a crash at {point}"));
    d
}

/// The daemon killed at each state transition of a spawn, a branch, a
/// snapshot and a delete: a restart finishes what was complete and
/// removes what was not, and every tag involved is usable again.
#[test]
fn kill_points_leave_what_a_restart_reconciles() {
    let tmp = TempDir::new("killpoints");
    let state = tmp.path().join("state");
    let d = Daemon::start(&state, &Config::default());
    d.builtin_snapshot("base", json!({"network": true}));
    drop(d);
    let spawn3 = |d: &Daemon| {
        d.call(
            "POST",
            "/v1/sandboxes",
            Some(json!({"snapshot_tag": "base", "n": 3, "memory_limit_mib": 256})),
        );
    };
    // A spawn cut short before or after its VMMs started: none is left.
    for point in ["spawn.recorded", "spawn.forked"] {
        let d = crash_at(&state, point, spawn3);
        let listed = d.expect("GET", "/v1/sandboxes?all=true", None, 200);
        assert_eq!(listed, json!([]), "after {point}");
    }

    // A branch cut short before it was taken: the tag is free again.
    let d = Daemon::start(&state, &Config::default());
    let id = spawn(&d, json!({"snapshot_tag": "base"}))[0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    drop(d);
    let branch = |tag: &'static str| {
        let id = id.clone();
        move |d: &Daemon| {
            d.call(
                "POST",
                &format!("/v1/sandboxes/{id}/branch"),
                Some(json!({"tag": tag})),
            );
        }
    };
    let d = crash_at(&state, "snapshot.recorded", branch("t1"));
    assert_eq!(d.call("GET", "/v1/snapshots/t1/info", None).0, 404);
    drop(d);
    // ... and once it was written: registered, and the sandbox's next
    // diff stacks on it.
    let d = crash_at(&state, "snapshot.written", branch("t2"));
    let t2 = d.expect("GET", "/v1/snapshots/t2/info", None, 200);
    assert_eq!(t2["status"], "ready", "{t2}");
    assert_eq!(t2["branched_from"], id.as_str(), "{t2}");
    let diff = d.expect(
        "POST",
        &format!("/v1/sandboxes/{id}/branch"),
        Some(json!({"tag": "t2d", "mode": "diff"})),
        201,
    );
    assert_eq!(diff["kind"], "diff");
    let info = d.expect("GET", "/v1/snapshots/t2d/info", None, 200);
    assert_eq!(info["parent_tag"], "t2", "{info}");
    d.expect(
        "POST",
        &format!("/v1/sandboxes/{id}/branch"),
        Some(json!({"tag": "t1"})),
        201,
    );
    let g = spawn(&d, json!({"snapshot_tag": "t2d"}));
    let g = g[0]["id"].as_str().unwrap();
    d.expect("POST", &format!("/v1/sandboxes/{g}/ping"), None, 200);
    kill_all(&d);
    drop(d);

    // A snapshot cut short with its source VM booted: no VM, no build
    // directory, the tag free.
    let create = |tag: &'static str| {
        move |d: &Daemon| {
            d.call(
                "POST",
                "/v1/snapshots",
                Some(json!({"tag": tag, "builtin": true, "network": true})),
            );
        }
    };
    let d = crash_at(&state, "create.booted", create("c1"));
    assert_eq!(d.call("GET", "/v1/snapshots/c1/info", None).0, 404);
    d.builtin_snapshot("c1", json!({}));
    drop(d);
    let d = crash_at(&state, "snapshot.written", create("c2"));
    let c2 = d.expect("GET", "/v1/snapshots/c2/info", None, 200);
    assert_eq!(c2["status"], "ready", "{c2}");
    assert_eq!(c2["network"], true, "{c2}");
    let k = spawn(&d, json!({"snapshot_tag": "c2"}));
    d.expect(
        "POST",
        &format!("/v1/sandboxes/{}/ping", k[0]["id"].as_str().unwrap()),
        None,
        200,
    );
    kill_all(&d);
    drop(d);

    // A delete cut short between its record and its files.
    let d = crash_at(&state, "delete.unregistered", |d| {
        d.call("DELETE", "/v1/snapshots/c2", None);
    });
    assert_eq!(d.call("GET", "/v1/snapshots/c2/info", None).0, 404);
    d.builtin_snapshot("c2", json!({}));
    assert_agrees(&d, "at the end");
}

/// A small deterministic generator (xorshift), seeded from the clock and
/// printed, so a failing run can be repeated.
struct Rng(u64);

impl Rng {
    fn from_clock(what: &str) -> Rng {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
            | 1;
        eprintln!("{what}: seed {seed}");
        Rng(seed)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// The daemon killed at random moments during spawns of 20 (a restart
/// reconciles each time), and the fork server killed at random moments
/// of a batch (the spawn undoes what it started).
#[test]
fn a_daemon_killed_at_random_moments_during_spawns_loses_nothing() {
    let tmp = TempDir::new("randomkill");
    let state = tmp.path().join("state");
    let mut rng = Rng::from_clock("random kills");
    let d = Daemon::start(&state, &Config::default());
    d.builtin_snapshot("r", json!({}));
    // The first spawn starts the fork server.
    spawn(&d, json!({"snapshot_tag": "r"}));
    kill_all(&d);
    drop(d);
    for round in 0..6 {
        let mut d = Daemon::start(&state, &Config::default());
        let after = Duration::from_millis(10 + rng.below(80));
        std::thread::scope(|s| {
            let url = d.url.clone();
            s.spawn(move || {
                let _ = ureq::post(format!("{url}/v1/sandboxes"))
                    .send_json(json!({"snapshot_tag": "r", "n": 20}));
            });
            std::thread::sleep(after);
            d.kill_hard();
        });
        let d = Daemon::start(&state, &Config::default());
        assert_agrees(&d, &format!("round {round}, daemon killed after {after:?}"));
        // The snapshot still spawns.
        spawn(&d, json!({"snapshot_tag": "r"}));
        kill_all(&d);

        // The fork server killed in the middle of a batch: the spawn
        // fails or not, and nothing of it is left unlisted either way.
        let after = Duration::from_millis(5 + rng.below(40));
        let answer = std::thread::scope(|s| {
            let t = s.spawn(|| {
                d.call(
                    "POST",
                    "/v1/sandboxes",
                    Some(json!({"snapshot_tag": "r", "n": 20})),
                )
            });
            std::thread::sleep(after);
            for pid in fork_servers(&state) {
                kill9(pid);
            }
            t.join().unwrap()
        });
        assert!(
            answer.0 == 201 || answer.0 >= 500,
            "round {round}: {answer:?}"
        );
        eprintln!(
            "round {round}: fork server killed after {after:?}: {}",
            answer.0
        );
        assert_agrees(
            &d,
            &format!(
                "round {round}, fork server killed after {after:?}: {}",
                answer.0
            ),
        );
        spawn(&d, json!({"snapshot_tag": "r"}));
        kill_all(&d);
    }
}

/// Two daemons with two state directories on one host: one killed in the
/// middle of a spawn and restarted reconciles only what is its own; the
/// other's sandboxes, namespaces and cgroups are untouched.
#[test]
fn two_daemons_on_one_host_reconcile_only_their_own() {
    let tmp = TempDir::new("twodaemons");
    let (sa, sb) = (tmp.path().join("a"), tmp.path().join("b"));
    let b = Daemon::start(&sb, &Config::default());
    let d = Daemon::start(&sa, &Config::default());
    for (x, tag) in [(&d, "na"), (&b, "nb")] {
        x.builtin_snapshot(tag, json!({"network": true}));
    }
    drop(d);
    let theirs = spawn(
        &b,
        json!({"snapshot_tag": "nb", "n": 2, "memory_limit_mib": 256}),
    );
    let a = crash_at(&sa, "spawn.forked", |a| {
        a.call(
            "POST",
            "/v1/sandboxes",
            Some(json!({"snapshot_tag": "na", "n": 2, "memory_limit_mib": 256})),
        );
    });
    assert_eq!(a.expect("GET", "/v1/sandboxes", None, 200), json!([]));
    assert_ne!(common::machine::instance(&a), common::machine::instance(&b));
    for k in &theirs {
        let id = k["id"].as_str().unwrap();
        b.expect("POST", &format!("/v1/sandboxes/{id}/ping"), None, 200);
    }
    assert_agrees(&b, "the other daemon");
    let listed = b.expect("GET", "/v1/sandboxes", None, 200);
    assert_eq!(listed.as_array().unwrap().len(), 2, "{listed}");
    kill_all(&b);
}

/// A snapshot with running sandboxes is not deleted unless forced.
#[test]
fn a_snapshot_with_running_sandboxes_is_deleted_only_when_forced() {
    let tmp = TempDir::new("rmi");
    let d = Daemon::start(&tmp.path().join("state"), &Config::default());
    d.builtin_snapshot("busy", json!({}));
    let kid = spawn(&d, json!({"snapshot_tag": "busy"}));
    let id = kid[0]["id"].as_str().unwrap();
    let (s, v) = d.call("DELETE", "/v1/snapshots/busy", None);
    assert_eq!(s, 409, "{v}");
    let msg = v["error"].as_str().unwrap();
    assert!(msg.contains(id) && msg.contains("force=true"), "{v}");
    d.expect("DELETE", "/v1/snapshots/busy?force=true", None, 204);
    // It runs on.
    d.expect("POST", &format!("/v1/sandboxes/{id}/ping"), None, 200);
    kill_all(&d);
}

/// VMMs that end while the daemon is down: one whose fork server lived
/// on (the next start adopts the server, which recorded the signal), and
/// one whose fork server was gone too (nobody saw how: status unknown).
#[test]
fn ends_while_the_daemon_was_down_are_told_as_far_as_known() {
    let tmp = TempDir::new("downtime");
    let state = tmp.path().join("state");
    let mut d = Daemon::start(&state, &Config::default());
    for tag in ["kept", "lost"] {
        d.builtin_snapshot(tag, json!({}));
    }
    let kept = spawn(&d, json!({"snapshot_tag": "kept", "n": 2}));
    let lost = spawn(&d, json!({"snapshot_tag": "lost"}));
    let servers = fork_servers(&state);
    assert_eq!(servers.len(), 2, "{servers:?}");
    let lost_server = servers
        .iter()
        .copied()
        .find(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains("/snapshots/lost"))
        })
        .unwrap();
    d.kill_hard();
    kill9(lost_server);
    eventually("the lost server is gone", || {
        fork_servers(&state).len() == 1
    });
    kill9(kept[0]["pid"].as_i64().unwrap());
    kill9(lost[0]["pid"].as_i64().unwrap());
    eventually("both VMMs are gone", || {
        [&kept[0], &lost[0]].iter().all(|k| {
            let pid = k["pid"].as_i64().unwrap();
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_err()
        })
    });
    let d = Daemon::start(&state, &Config::default());
    let k = ended(&d, kept[0]["id"].as_str().unwrap());
    assert_eq!(k["signal"], 9, "its adopted fork server saw it: {k}");
    let l = ended(&d, lost[0]["id"].as_str().unwrap());
    assert!(
        l.get("signal").is_none() && l.get("exit_code").is_none(),
        "{l}"
    );
    assert!(
        l["exit_detail"]
            .as_str()
            .unwrap()
            .contains("status unknown"),
        "{l}"
    );
    // The survivor still answers, and the adopted server still forks.
    let id = kept[1]["id"].as_str().unwrap();
    d.expect("POST", &format!("/v1/sandboxes/{id}/ping"), None, 200);
    let more = spawn(&d, json!({"snapshot_tag": "kept"}));
    assert_eq!(fork_servers(&state).len(), 1, "the adopted one served it");
    let m = more[0]["id"].as_str().unwrap();
    d.expect("POST", &format!("/v1/sandboxes/{m}/ping"), None, 200);
    assert_agrees(&d, "after the restart");
    kill_all(&d);
}

/// Waits until snapshot `tag`'s files have been verified.
fn verified(d: &Daemon, tag: &str) {
    eventually(&format!("snapshot {tag} is verified"), || {
        d.expect("GET", &format!("/v1/snapshots/{tag}/info"), None, 200)["verified"] == true
    });
}

/// Writes a few bytes into `file` at `offset` (root writes a 0400 file).
fn scribble(file: &Path, offset: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(file).unwrap();
    f.write_all_at(b"not what was hashed", offset).unwrap();
}

/// A snapshot whose memory file is overwritten is refused before a child
/// runs from it (409, and it is marked failed), whether this happens
/// before its first spawn or after; a file touched but not changed is
/// verified again and spawns.
#[test]
fn a_corrupted_snapshot_is_refused_before_a_child_runs() {
    let tmp = TempDir::new("corrupt");
    let state = tmp.path().join("state");
    let d = Daemon::start(&state, &Config::default());
    for tag in ["before", "after"] {
        d.builtin_snapshot(tag, json!({}));
        verified(&d, tag);
    }
    let memory = |tag: &str| state.join("snapshots").join(tag).join("memory");
    let mode = std::fs::metadata(memory("before")).unwrap().permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o400,
        "a snapshot's files are read-only once written"
    );

    // Before its first spawn.
    scribble(&memory("before"), 3 << 20);
    let (s, v) = d.call(
        "POST",
        "/v1/sandboxes",
        Some(json!({"snapshot_tag": "before"})),
    );
    assert_eq!(s, 409, "{v}");
    assert!(v["error"].as_str().unwrap().contains("corrupt"), "{v}");
    let info = d.expect("GET", "/v1/snapshots/before/info", None, 200);
    assert_eq!(info["status"], "failed", "{info}");
    assert!(
        info["warning"].as_str().unwrap().contains("memory"),
        "{info}"
    );

    // After it: the first child runs; the next is refused.
    let kid = spawn(&d, json!({"snapshot_tag": "after"}));
    // Touched, not changed: verified again, and it spawns.
    let f = std::fs::File::open(memory("after")).unwrap();
    f.set_modified(std::time::SystemTime::now()).unwrap();
    drop(f);
    spawn(&d, json!({"snapshot_tag": "after"}));
    scribble(&memory("after"), 5 << 20);
    let (s, v) = d.call(
        "POST",
        "/v1/sandboxes",
        Some(json!({"snapshot_tag": "after"})),
    );
    assert_eq!(s, 409, "{v}");
    assert!(v["error"].as_str().unwrap().contains("corrupt"), "{v}");
    // The child made before runs on (its memory is its own copy where it
    // wrote, the file's where it did not: it is the user's to judge).
    assert_eq!(sandbox(&d, kid[0]["id"].as_str().unwrap()).0, 200);
    kill_all(&d);
    assert_agrees(&d, "after the corrupt snapshots");
}
