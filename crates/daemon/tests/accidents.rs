//! Accidents a careless or hostile client causes, on a real daemon and
//! real built-in guests: after each, the API's view and the machine agree
//! (every VMM and snapshot directory under the state directory is one the
//! API lists) and the tag involved is usable.

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{kill_all, Config, Daemon, TempDir};
use serde_json::{json, Value};

/// Sends a request and hangs up `after` it is sent, without reading the
/// answer (a client that gives up).
fn hang_up(d: &Daemon, method: &str, path: &str, body: Option<Value>, after: Duration) {
    let addr = d.url.trim_start_matches("http://");
    let mut s = TcpStream::connect(addr).unwrap();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    std::thread::sleep(after);
    drop(s);
}

/// Polls `what` until it holds, for up to 60 s.
fn eventually(what: &str, mut holds: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !holds() {
        assert!(Instant::now() < deadline, "{what}: not within 60 s");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The processes whose standard error is a file under `dir` (every VMM
/// of a sandbox writes its `vmm.log` there).
fn processes_logging_under(dir: &Path) -> BTreeSet<i64> {
    let mut pids = BTreeSet::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i64>() else {
            continue;
        };
        if let Ok(target) = std::fs::read_link(entry.path().join("fd/2")) {
            if target.starts_with(dir) {
                pids.insert(pid);
            }
        }
    }
    pids
}

fn listed_pids(d: &Daemon) -> BTreeSet<i64> {
    d.expect("GET", "/v1/sandboxes", None, 200)
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["pid"].as_i64().unwrap())
        .collect()
}

fn listed_tags(d: &Daemon) -> BTreeSet<String> {
    d.expect("GET", "/v1/snapshots", None, 200)
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["status"] == "ready")
        .map(|s| s["tag"].as_str().unwrap().to_owned())
        .collect()
}

/// The snapshot directories on disk (not the temporary ones).
fn snapshot_dirs(state: &Path) -> BTreeSet<String> {
    std::fs::read_dir(state.join("snapshots"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect()
}

#[test]
fn a_client_that_hangs_up_leaves_nothing_the_api_does_not_list() {
    let tmp = TempDir::new("hangup");
    let state = tmp.path().join("state");
    let d = Daemon::start(&state, &Config::default());
    // A snapshot request given up at once: made and registered anyway.
    hang_up(
        &d,
        "POST",
        "/v1/snapshots",
        Some(json!({"tag": "h", "builtin": true})),
        Duration::from_millis(5),
    );
    eventually("the given-up snapshot is registered", || {
        listed_tags(&d).contains("h")
    });

    // A spawn of 12 given up after 30 ms: all 12 are the API's.
    hang_up(
        &d,
        "POST",
        "/v1/sandboxes",
        Some(json!({"snapshot_tag": "h", "n": 12})),
        Duration::from_millis(30),
    );
    eventually("the given-up spawn's 12 sandboxes are listed", || {
        listed_pids(&d).len() == 12
    });
    eventually(
        "the VMMs under the state directory are the ones the API lists",
        || processes_logging_under(&state.join("sandboxes")) == listed_pids(&d),
    );

    // A branch given up at once: registered, and its tag usable.
    let id = d.expect("GET", "/v1/sandboxes", None, 200)[0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    hang_up(
        &d,
        "POST",
        &format!("/v1/sandboxes/{id}/branch"),
        Some(json!({"tag": "hb"})),
        Duration::from_millis(5),
    );
    eventually("the given-up branch is registered", || {
        listed_tags(&d).contains("hb")
    });
    assert_eq!(
        snapshot_dirs(&state),
        listed_tags(&d),
        "snapshot directories the API does not list"
    );
    let kid = d.expect(
        "POST",
        "/v1/sandboxes",
        Some(json!({"snapshot_tag": "hb"})),
        201,
    );
    let k = kid[0]["id"].as_str().unwrap();
    d.expect("POST", &format!("/v1/sandboxes/{k}/ping"), None, 200);

    // A kill given up at once: the VMM goes with its record.
    hang_up(
        &d,
        "DELETE",
        &format!("/v1/sandboxes/{id}"),
        None,
        Duration::from_millis(1),
    );
    eventually("the given-up kill is done", || {
        !listed_pids(&d).is_empty() && d.call("GET", &format!("/v1/sandboxes/{id}"), None).0 == 404
    });
    kill_all(&d);
    eventually("no VMM is left under the state directory", || {
        processes_logging_under(&state.join("sandboxes")).is_empty()
    });
}

/// A second daemon on the same state directory would kill the first's fork
/// servers: it is refused, naming the first; the first goes on. What the
/// daemon keeps there is its owner's alone.
#[test]
fn one_daemon_a_state_directory_and_its_files_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = TempDir::new("lock");
    let state = tmp.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).unwrap();
    let d = Daemon::start(&state, &Config::default());
    // Searchable (jailed VMMs pass through to their own directories),
    // never listable or writable by anyone else.
    assert_eq!(
        std::fs::metadata(&state).unwrap().permissions().mode() & 0o777,
        0o711,
        "the daemon leaves its state directory open"
    );
    let err = Daemon::try_start(&state, &Config::default())
        .err()
        .expect("a second daemon on one state directory starts");
    assert!(
        err.contains("another forkd-daemon") && err.contains(&d.pid().to_string()),
        "{err}"
    );
    d.builtin_snapshot("p", json!({}));
    let kid = d.expect(
        "POST",
        "/v1/sandboxes",
        Some(json!({"snapshot_tag": "p"})),
        201,
    );
    let id = kid[0]["id"].as_str().unwrap();
    d.expect("POST", &format!("/v1/sandboxes/{id}/ping"), None, 200);
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&state), 0o711);
    assert_eq!(mode(&state.join("forkd.db")), 0o600);
    // A snapshot's files are read-only once written.
    for f in [
        "snapshots/p/memory",
        "snapshots/p/vmstate",
        "snapshots/p/snapshot.json",
    ] {
        assert_eq!(mode(&state.join(f)), 0o400, "{f}");
    }
    assert_eq!(mode(&state.join("snapshots/p")), 0o700);
    for dir in ["snapshots", "sandboxes"] {
        assert_eq!(mode(&state.join(dir)), 0o711, "{dir}");
    }
    // The sandbox's own directory is its jailed VMM's, and its alone.
    let (batch, index) = id.rsplit_once('-').unwrap();
    let own = state.join("sandboxes").join(batch).join(index);
    let pid = kid[0]["pid"].as_i64().unwrap();
    let uid = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(&own).unwrap());
    assert_eq!(uid, (1 << 30) + pid as u32, "{}", own.display());
    assert_eq!(mode(&own), 0o700);
    kill_all(&d);
}

/// The fork-server processes `daemon` started for the snapshot in `dir`:
/// by their command line, and their log (a VMM a server forked shares
/// its command line, and once the server is gone its parent: the daemon
/// is the subreaper; but it logs to its own `vmm.log`).
fn fork_servers_of(daemon: i32, dir: &str) -> Vec<i64> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i64>() else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<i32>().ok());
        let server_log = std::fs::read_link(entry.path().join("fd/2"))
            .is_ok_and(|l| l.to_string_lossy().ends_with(".fork.log"));
        if cmdline.contains(" fork-server ")
            && cmdline.contains(dir)
            && ppid == Some(daemon)
            && server_log
        {
            pids.push(pid);
        }
    }
    pids
}

/// A snapshot's fork server killed: the next spawns, racing, start one
/// new server between them (its own socket: the dead one's cleanup cannot
/// take it) and all succeed.
#[test]
fn a_dead_fork_server_is_replaced_once_under_racing_spawns() {
    let tmp = TempDir::new("forkserver");
    let state = tmp.path().join("state");
    let d = Daemon::start(&state, &Config::default());
    let snap = d.builtin_snapshot("f", json!({}));
    let dir = snap["dir"].as_str().unwrap().to_owned();
    d.expect(
        "POST",
        "/v1/sandboxes",
        Some(json!({"snapshot_tag": "f"})),
        201,
    );
    let first = fork_servers_of(d.pid(), &dir);
    assert_eq!(first.len(), 1, "{first:?}");
    // SAFETY: signalling a process by pid; it is this test's daemon's child.
    unsafe { libc::kill(first[0] as libc::pid_t, libc::SIGKILL) };
    eventually("the fork server is gone", || {
        !Path::new(&format!("/proc/{}/cmdline", first[0])).exists()
            || std::fs::read(format!("/proc/{}/cmdline", first[0]))
                .unwrap_or_default()
                .is_empty()
    });
    let answers: Vec<u16> = std::thread::scope(|s| {
        let spawns: Vec<_> = (0..4)
            .map(|_| {
                s.spawn(|| {
                    d.call("POST", "/v1/sandboxes", Some(json!({"snapshot_tag": "f"})))
                        .0
                })
            })
            .collect();
        spawns.into_iter().map(|t| t.join().unwrap()).collect()
    });
    assert_eq!(answers, [201; 4], "{}", common::tail(&d.log_text(), 2000));
    let now = fork_servers_of(d.pid(), &dir);
    assert_eq!(now.len(), 1, "one fork server after racing starts: {now:?}");
    assert_ne!(now, first);
    assert_eq!(listed_pids(&d).len(), 5);
    // (A spawn answers once its children are forked; each then opens its
    // own log.)
    eventually("the VMMs on the machine are the listed ones", || {
        processes_logging_under(&state.join("sandboxes")) == listed_pids(&d)
    });
    kill_all(&d);
}

/// What a careless client sends: answered in JSON with a 4xx, and audited
/// in a line of bounded size with no query string (a token put there
/// stays out of the log).
#[test]
fn careless_requests_answer_json_and_audit_lines_stay_small() {
    let tmp = TempDir::new("careless");
    let audit = tmp.path().join("audit.jsonl");
    let d = Daemon::start(
        &tmp.path().join("state"),
        &Config {
            audit_log: Some(audit.clone()),
            ..Default::default()
        },
    );
    // A body over the limit (sent raw: the daemon answers and closes before
    // it has all of it).
    let addr = d.url.trim_start_matches("http://");
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let len = 3 << 20;
    write!(
        c,
        "POST /v1/sandboxes/x-0/branch HTTP/1.1\r\nHost: {addr}\r\n\
         Content-Type: application/json\r\nContent-Length: {len}\r\n\r\n"
    )
    .unwrap();
    let _ = c.write_all(&vec![b' '; len]);
    let mut answer = String::new();
    let _ = std::io::Read::read_to_string(&mut c, &mut answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("{\"error\":"), "not a JSON error: {answer}");
    let (s, v) = d.call(
        "POST",
        "/v1/snapshots",
        Some(json!({"tag": "v", "builtin": true, "vcpus": 200})),
    );
    assert_eq!(s, 400, "{v}");
    let (s, v) = d.call(
        "POST",
        "/v1/sandboxes",
        Some(json!({"snapshot_tag": "v", "memory_limit_mib": u64::MAX})),
    );
    assert_eq!(s, 400, "{v}");
    let (s, _) = d.call("GET", &format!("/v1/{}", "a".repeat(60_000)), None);
    assert_eq!(s, 404);
    d.call("GET", "/v1/snapshots?token=secret-in-the-query", None);
    let log = std::fs::read_to_string(&audit).unwrap();
    assert!(!log.contains("secret-in-the-query"), "{log}");
    for line in log.lines() {
        assert!(line.len() < 1024, "an audit line of {} bytes", line.len());
    }
    assert!(log.contains("(cut, 60004 bytes)"), "{log}");
}

/// Deleting a snapshot its sandboxes run from is allowed (as upstream:
/// their memory stays mapped), but a diff that would stack on a deleted
/// base is refused, never made `ready` and unspawnable; a full branch
/// gives the sandbox a base again.
#[test]
fn a_diff_on_a_deleted_base_is_refused_not_made_broken() {
    let tmp = TempDir::new("deletedbase");
    let d = Daemon::start(&tmp.path().join("state"), &Config::default());
    d.builtin_snapshot("r", json!({}));
    let kid = d.expect(
        "POST",
        "/v1/sandboxes",
        Some(json!({"snapshot_tag": "r"})),
        201,
    );
    let id = kid[0]["id"].as_str().unwrap().to_owned();
    d.expect(
        "POST",
        &format!("/v1/sandboxes/{id}/branch"),
        Some(json!({"tag": "rb"})),
        201,
    );
    d.expect("DELETE", "/v1/snapshots/rb", None, 204);
    d.expect("POST", &format!("/v1/sandboxes/{id}/ping"), None, 200);
    let (s, v) = d.call(
        "POST",
        &format!("/v1/sandboxes/{id}/branch"),
        Some(json!({"mode": "diff"})),
    );
    assert_eq!(s, 409, "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("take a full branch first"),
        "{v}"
    );
    d.expect(
        "POST",
        &format!("/v1/sandboxes/{id}/branch"),
        Some(json!({"tag": "rf"})),
        201,
    );
    d.expect(
        "POST",
        &format!("/v1/sandboxes/{id}/branch"),
        Some(json!({"tag": "rd", "mode": "diff"})),
        201,
    );
    let g = d.expect(
        "POST",
        "/v1/sandboxes",
        Some(json!({"snapshot_tag": "rd"})),
        201,
    );
    let g = g[0]["id"].as_str().unwrap();
    d.expect("POST", &format!("/v1/sandboxes/{g}/ping"), None, 200);
    kill_all(&d);
}

/// The daemon keeps disk and memory free: a request that would eat into
/// its reserves is 503 with the figures, and nothing of it is left.
#[test]
fn requests_that_would_eat_into_the_reserves_are_refused_whole() {
    let tmp = TempDir::new("reserve");
    let d = Daemon::start(&tmp.path().join("state"), &Config::default());
    d.builtin_snapshot("r", json!({}));
    // 1000 live-forkable children hold 1000 copies of 128 MiB.
    let (status, v) = d.call(
        "POST",
        "/v1/sandboxes",
        Some(json!({"snapshot_tag": "r", "n": 1000, "live_fork": true})),
    );
    assert_eq!(status, 503, "{v}");
    let msg = v["error"].as_str().unwrap();
    assert!(
        msg.starts_with("a spawn of 1000 refused: ")
            && msg.contains("MiB of memory is free; it needs about 128000 MiB")
            && msg.contains("--reserve-memory-mib"),
        "{msg}"
    );
    common::machine::assert_agrees(&d, "after a spawn refused for memory");
    assert_eq!(d.expect("GET", "/v1/sandboxes", None, 200), json!([]));
    kill_all(&d);

    // A disk reserve larger than any disk: nothing writes.
    let d = Daemon::start(
        &tmp.path().join("state2"),
        &Config {
            args: vec!["--reserve-disk-mib".into(), (1u64 << 40).to_string()],
            ..Default::default()
        },
    );
    let (status, v) = d.call(
        "POST",
        "/v1/snapshots",
        Some(json!({"tag": "r", "builtin": true})),
    );
    assert_eq!(status, 503, "{v}");
    let msg = v["error"].as_str().unwrap();
    assert!(
        msg.starts_with("a snapshot refused: ") && msg.contains("--reserve-disk-mib"),
        "{msg}"
    );
    assert_eq!(d.expect("GET", "/v1/snapshots", None, 200), json!([]));
    common::machine::assert_agrees(&d, "after a snapshot refused for disk");
}
