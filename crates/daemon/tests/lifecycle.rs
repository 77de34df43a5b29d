//! A sandbox's life through the daemon with the built-in guest: pause and
//! resume, deadlines (kill, and suspend to a snapshot resumed under the
//! same id), labels, stats and the per-sandbox metrics.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::{Config, Daemon, TempDir};
use proto::control::{ControlClient, ControlRequest, ControlResponse};
use proto::guest::GuestRequest;
use serde_json::{json, Value};
use vmm::boot::builtin::abi;

/// Where the built-in guest keeps its running counter.
const COUNTER: u64 = abi::INFO_ADDR + abi::INFO_COUNTER;

fn control_socket(d: &Daemon, id: &str) -> PathBuf {
    let db = rusqlite::Connection::open(d.state.join("forkd.db")).unwrap();
    let p: String = db
        .query_row(
            "SELECT control_socket FROM sandboxes WHERE id = ?1",
            [id],
            |r| r.get(0),
        )
        .unwrap();
    PathBuf::from(p)
}

fn call(d: &Daemon, id: &str, req: ControlRequest) -> ControlResponse {
    let mut c = ControlClient::connect(&control_socket(d, id), Duration::from_secs(5)).unwrap();
    c.call(&req).unwrap()
}

fn counter(d: &Daemon, id: &str) -> u64 {
    match call(
        d,
        id,
        ControlRequest::Peek {
            addr: COUNTER,
            len: 8,
        },
    ) {
        ControlResponse::Peek { hex } => {
            let bytes: Vec<u8> = (0..8)
                .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
                .collect();
            u64::from_le_bytes(bytes.try_into().unwrap())
        }
        other => panic!("{other:?}"),
    }
}

fn start_counter(d: &Daemon, id: &str) {
    let r = call(
        d,
        id,
        ControlRequest::Guest {
            request: GuestRequest::CounterStart,
            timeout_ms: None,
        },
    );
    assert!(matches!(r, ControlResponse::Guest { .. }), "{r:?}");
    let t = Instant::now();
    while counter(d, id) == 0 {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the counter never moved"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Whether `pid` runs (a zombie, ended and not yet reaped by its fork
/// server, does not).
fn alive(pid: i64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(')')
            .is_some_and(|(_, r)| !r.trim_start().starts_with('Z'))
    })
}

/// Whether `pid` is gone within a few seconds (a suspended sandbox's VMM
/// is stopped just after the state is recorded).
fn ends(pid: i64) -> bool {
    let t = Instant::now();
    while alive(pid) {
        if t.elapsed() > Duration::from_secs(5) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

fn spawn(d: &Daemon, body: Value) -> Vec<Value> {
    d.expect("POST", "/v1/sandboxes", Some(body), 201)
        .as_array()
        .unwrap()
        .clone()
}

fn get(d: &Daemon, id: &str) -> Value {
    d.expect("GET", &format!("/v1/sandboxes/{id}"), None, 200)
}

fn wait_state(d: &Daemon, id: &str, state: &str, within: Duration) -> Value {
    let t = Instant::now();
    loop {
        let v = get(d, id);
        if v["state"] == state {
            return v;
        }
        assert!(
            t.elapsed() < within,
            "{id} not {state} after {within:?}: {v}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn ids(v: &Value) -> Vec<String> {
    let mut out: Vec<String> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect();
    out.sort();
    out
}

#[test]
fn pause_resume_labels_and_stats() {
    let tmp = TempDir::new("life");
    let d = Daemon::start(&tmp.path().join("state"), &Config::default());
    d.builtin_snapshot("g", json!({}));
    let a = spawn(
        &d,
        json!({"snapshot_tag": "g", "n": 2, "labels": {"team": "a", "run": "7"}}),
    );
    let b = spawn(&d, json!({"snapshot_tag": "g", "labels": {"team": "b"}}));
    assert_eq!(a[0]["labels"]["team"], "a");
    let a_ids = ids(&Value::Array(a.clone()));

    // Labels filter; all must match.
    assert_eq!(
        ids(&d.expect("GET", "/v1/sandboxes?label=team%3Da", None, 200)),
        a_ids
    );
    assert_eq!(
        ids(&d.expect("GET", "/v1/sandboxes?label=team=b", None, 200)),
        vec![b[0]["id"].as_str().unwrap().to_string()]
    );
    assert!(ids(&d.expect("GET", "/v1/sandboxes?label=team=a&label=run=8", None, 200)).is_empty());
    assert_eq!(
        ids(&d.expect("GET", "/v1/sandboxes?label=team=a&label=run=7", None, 200)),
        a_ids
    );
    for bad in ["/v1/sandboxes?label=team", "/v1/sandboxes?colour=red"] {
        let (s, v) = d.call("GET", bad, None);
        assert_eq!(s, 400, "{bad}: {v}");
    }
    let many: serde_json::Map<String, Value> =
        (0..33).map(|i| (format!("k{i}"), json!("v"))).collect();
    for labels in [
        json!({"-bad": "x"}),
        json!({"k": "a\nb"}),
        Value::Object(many),
    ] {
        let (s, v) = d.call(
            "POST",
            "/v1/sandboxes",
            Some(json!({"snapshot_tag": "g", "labels": labels})),
        );
        assert_eq!(s, 400, "{v}");
    }

    // Pause stops the guest's counter; resume restarts it.
    let id = a[0]["id"].as_str().unwrap();
    start_counter(&d, id);
    let v = d.expect("POST", &format!("/v1/sandboxes/{id}/pause"), None, 200);
    assert_eq!(v["state"], "paused");
    let c1 = counter(&d, id);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(counter(&d, id), c1, "the counter moved while paused");
    let (s, v) = d.call(
        "POST",
        &format!("/v1/sandboxes/{id}/exec"),
        Some(json!({"args": ["true"]})),
    );
    assert_eq!(s, 409, "{v}");
    assert!(v["error"].as_str().unwrap().contains("paused"), "{v}");
    assert_eq!(
        ids(&d.expect("GET", "/v1/sandboxes?label=team=a", None, 200)),
        a_ids,
        "a paused sandbox is listed"
    );
    // Pausing again answers as it is; a branch keeps it paused.
    d.expect("POST", &format!("/v1/sandboxes/{id}/pause"), None, 200);
    d.expect(
        "POST",
        &format!("/v1/sandboxes/{id}/branch"),
        Some(json!({"tag": "while-paused"})),
        201,
    );
    assert_eq!(get(&d, id)["state"], "paused");
    assert_eq!(counter(&d, id), c1, "the branch let the guest run");
    let v = d.expect("POST", &format!("/v1/sandboxes/{id}/resume"), None, 200);
    assert_eq!(v["state"], "running");
    let t = Instant::now();
    while counter(&d, id) == c1 {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the counter did not restart"
        );
        std::thread::sleep(Duration::from_millis(10));
    }

    // Stats: plausible figures for a running built-in guest.
    let s = d.expect("GET", &format!("/v1/sandboxes/{id}/stats"), None, 200);
    assert_eq!(
        (s["id"].as_str(), s["state"].as_str()),
        (Some(id), Some("running"))
    );
    let cpu = s["cpu_seconds"].as_f64().unwrap();
    assert!(cpu > 0.0 && cpu < 600.0, "{s}");
    let rss = s["memory_rss_bytes"].as_u64().unwrap();
    assert!(rss > 1 << 20 && rss < 4 << 30, "{s}");
    assert!(
        s["memory_private_bytes"].as_u64().unwrap() + s["memory_shared_bytes"].as_u64().unwrap()
            <= rss,
        "{s}"
    );
    assert!(s["uptime_secs"].as_u64().unwrap() < 600, "{s}");
    assert!(
        s.get("net_rx_bytes").is_none(),
        "no network, no network figures: {s}"
    );
    let metrics = d.expect("GET", "/metrics", None, 200);
    let text = metrics.as_str().unwrap();
    assert!(
        text.contains(&format!("forkd_sandbox_cpu_seconds{{sandbox=\"{id}\"}}")),
        "{text}"
    );
    assert!(text.contains("forkd_sandbox_metrics_omitted 0"), "{text}");
}

#[test]
fn deadlines_kill_extend_and_suspend_to_a_resumable_snapshot() {
    let tmp = TempDir::new("deadline");
    let d = Daemon::start(&tmp.path().join("state"), &Config::default());
    d.builtin_snapshot("g", json!({}));
    let (s, v) = d.call(
        "POST",
        "/v1/sandboxes",
        Some(json!({"snapshot_tag": "g", "on_timeout": "pause"})),
    );
    assert_eq!(s, 400, "on_timeout without timeout_secs: {v}");
    let (s, v) = d.call(
        "POST",
        "/v1/sandboxes",
        Some(json!({"snapshot_tag": "g", "timeout_secs": 0})),
    );
    assert_eq!(s, 400, "{v}");

    let killed = spawn(&d, json!({"snapshot_tag": "g", "timeout_secs": 2}));
    let extended = spawn(&d, json!({"snapshot_tag": "g", "timeout_secs": 2}));
    let suspended = spawn(
        &d,
        json!({"snapshot_tag": "g", "timeout_secs": 2, "on_timeout": "pause", "labels": {"k": "v"}}),
    );
    let (kid, eid, sid) = (
        killed[0]["id"].as_str().unwrap(),
        extended[0]["id"].as_str().unwrap(),
        suspended[0]["id"].as_str().unwrap(),
    );
    assert_eq!(killed[0]["on_timeout"], "kill");
    assert!(killed[0]["deadline_unix"].as_u64().is_some());
    let v = d.expect(
        "POST",
        &format!("/v1/sandboxes/{eid}/timeout"),
        Some(json!({"timeout_secs": 60})),
        200,
    );
    assert_eq!(v["timeout_secs"], 60);
    start_counter(&d, sid);
    let before = counter(&d, sid);

    // The forgotten one ends at its deadline.
    let v = wait_state(&d, kid, "exited", Duration::from_secs(10));
    assert!(
        v["exit_detail"].as_str().unwrap().contains("deadline"),
        "{v}"
    );
    assert!(ends(killed[0]["pid"].as_i64().unwrap()));

    // The suspended one: its VMM ended, kept as a snapshot.
    let v = wait_state(&d, sid, "suspended", Duration::from_secs(15));
    assert!(v.get("deadline_unix").is_none(), "{v}");
    let kept = v["suspended_tag"].as_str().unwrap().to_string();
    d.expect("GET", &format!("/v1/snapshots/{kept}/info"), None, 200);
    assert!(ends(suspended[0]["pid"].as_i64().unwrap()));
    assert_eq!(
        ids(&d.expect("GET", "/v1/sandboxes?label=k=v", None, 200)),
        vec![sid.to_string()]
    );
    let (s, v) = d.call(
        "POST",
        &format!("/v1/sandboxes/{sid}/exec"),
        Some(json!({"args": ["true"]})),
    );
    assert_eq!(s, 409, "{v}");
    assert!(v["error"].as_str().unwrap().contains("suspended"), "{v}");

    // The extended one still runs.
    assert_eq!(get(&d, eid)["state"], "running");

    // Resume: the same id, a new VMM, the counter going on from where it was.
    let v = d.expect("POST", &format!("/v1/sandboxes/{sid}/resume"), None, 200);
    assert_eq!(
        (v["id"].as_str(), v["state"].as_str()),
        (Some(sid), Some("running"))
    );
    assert_ne!(v["pid"], suspended[0]["pid"]);
    assert_eq!(v["labels"]["k"], "v");
    assert!(v.get("suspended_tag").is_none(), "{v}");
    assert_eq!(v["created_at_unix"], suspended[0]["created_at_unix"]);
    let deadline = v["deadline_unix"].as_u64().unwrap();
    assert!(
        deadline > suspended[0]["deadline_unix"].as_u64().unwrap(),
        "a new deadline: {v}"
    );
    let after = counter(&d, sid);
    assert!(
        after >= before,
        "the counter went back: {before} -> {after}"
    );
    let t = Instant::now();
    while counter(&d, sid) == after {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the restored counter does not run"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // Deleted while suspended, its snapshot goes with it.
    d.expect(
        "POST",
        &format!("/v1/sandboxes/{sid}/timeout"),
        Some(json!({"timeout_secs": 1})),
        200,
    );
    wait_state(&d, sid, "suspended", Duration::from_secs(15));
    let tags_before = d.expect("GET", "/v1/snapshots", None, 200);
    d.expect("DELETE", &format!("/v1/sandboxes/{sid}"), None, 204);
    let tags_after = d.expect("GET", "/v1/snapshots", None, 200);
    assert_eq!(
        tags_after.as_array().unwrap().len() + 1,
        tags_before.as_array().unwrap().len(),
        "{tags_before}\n{tags_after}"
    );
}

#[test]
fn the_per_sandbox_metrics_name_at_most_100_sandboxes() {
    let tmp = TempDir::new("cardinality");
    let d = Daemon::start(&tmp.path().join("state"), &Config::default());
    d.builtin_snapshot("g", json!({}));
    spawn(&d, json!({"snapshot_tag": "g", "n": 103}));
    let metrics = d.expect("GET", "/metrics", None, 200);
    let text = metrics.as_str().unwrap();
    let series = text
        .lines()
        .filter(|l| l.starts_with("forkd_sandbox_memory_private_bytes{"))
        .count();
    assert_eq!(series, 100, "{text}");
    assert!(text.contains("forkd_sandbox_metrics_omitted 3"), "{text}");
}

#[test]
fn workspaces_suspend_and_resume_their_counter_as_upstream_answers() {
    let tmp = TempDir::new("workspaces");
    let d = Daemon::start(&tmp.path().join("state"), &Config::default());
    d.builtin_snapshot("g", json!({}));
    let w = d.expect(
        "POST",
        "/v1/workspaces",
        Some(json!({"name": "w1", "snapshot_tag": "g"})),
        201,
    );
    assert_eq!(
        (w["status"].as_str(), w["source_snapshot_tag"].as_str()),
        (Some("running"), Some("g"))
    );
    assert!(w.get("current_state_tag").is_none(), "{w}");
    let sb = w["live_sandbox_id"].as_str().unwrap().to_string();
    assert_eq!(w["id"], format!("ws-{sb}"));
    assert_eq!(get(&d, &sb)["labels"]["forkd.workspace"], "w1");
    for (body, want) in [
        (json!({"name": "w1", "snapshot_tag": "g"}), 409),
        (json!({"name": "bad name", "snapshot_tag": "g"}), 400),
        (json!({"name": "w2", "snapshot_tag": "nope"}), 404),
        (json!({"name": "w2"}), 422),
    ] {
        let (s, v) = d.call("POST", "/v1/workspaces", Some(body));
        assert_eq!(s, want, "{v}");
    }
    let (s, v) = d.call("POST", "/v1/workspaces/w1/resume", Some(json!({})));
    assert_eq!(s, 400, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("already Running"),
        "{v}"
    );

    // Suspend (full) and resume: the counter goes on from where it was.
    start_counter(&d, &sb);
    let w = d.expect("POST", "/v1/workspaces/w1/suspend", Some(json!({})), 200);
    assert_eq!(w["status"], "suspended");
    assert!(w.get("live_sandbox_id").is_none(), "{w}");
    let state1 = w["current_state_tag"].as_str().unwrap().to_string();
    assert!(
        w["last_branch_memory_path"]
            .as_str()
            .unwrap()
            .starts_with('/'),
        "{w}"
    );
    let (s, _) = d.call("GET", &format!("/v1/sandboxes/{sb}"), None);
    assert_eq!(s, 404, "the suspended workspace's sandbox is gone");
    let (s, v) = d.call("POST", "/v1/workspaces/w1/suspend", None);
    assert_eq!(s, 400, "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("is Suspended, not Running"),
        "{v}"
    );
    let w = d.expect("POST", "/v1/workspaces/w1/resume", None, 200);
    assert_eq!(w["status"], "running");
    let sb2 = w["live_sandbox_id"].as_str().unwrap().to_string();
    assert_ne!(sb2, sb);
    assert_eq!(get(&d, &sb2)["snapshot_tag"], state1);
    let c1 = counter(&d, &sb2);
    assert!(c1 > 0, "the counter restarted from zero");
    let t = Instant::now();
    while counter(&d, &sb2) == c1 {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the resumed counter does not run"
        );
        std::thread::sleep(Duration::from_millis(10));
    }

    // A diff suspend stacks on the last state, which is kept.
    let w = d.expect(
        "POST",
        "/v1/workspaces/w1/suspend",
        Some(json!({"diff": true})),
        200,
    );
    let state2 = w["current_state_tag"].as_str().unwrap().to_string();
    assert_ne!(state2, state1);
    d.expect("GET", &format!("/v1/snapshots/{state1}/info"), None, 200);
    let w = d.expect("POST", "/v1/workspaces/w1/resume", None, 200);
    let sb3 = w["live_sandbox_id"].as_str().unwrap().to_string();
    assert!(counter(&d, &sb3) >= c1);

    // A workspace whose sandbox was killed reads stale; resume starts it
    // again from its last suspend.
    d.expect("DELETE", &format!("/v1/sandboxes/{sb3}"), None, 204);
    let w = d.expect("GET", "/v1/workspaces/w1", None, 200);
    assert_eq!(w["status"], "stale");
    assert!(w.get("live_sandbox_id").is_none(), "{w}");
    let w = d.expect("POST", "/v1/workspaces/w1/resume", None, 200);
    let sb4 = w["live_sandbox_id"].as_str().unwrap().to_string();
    assert_eq!(get(&d, &sb4)["snapshot_tag"], state2);

    // List: a bare array by name; delete: sandbox and state gone, source kept.
    d.expect(
        "POST",
        "/v1/workspaces",
        Some(json!({"name": "a0", "snapshot_tag": "g"})),
        201,
    );
    let names: Vec<String> = d
        .expect("GET", "/v1/workspaces", None, 200)
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["a0", "w1"]);
    d.expect("DELETE", "/v1/workspaces/w1", None, 204);
    let (s, _) = d.call("GET", "/v1/workspaces/w1", None);
    assert_eq!(s, 404);
    let (s, _) = d.call("GET", &format!("/v1/sandboxes/{sb4}"), None);
    assert_eq!(s, 404);
    let (s, _) = d.call("GET", &format!("/v1/snapshots/{state2}/info"), None);
    assert_eq!(s, 404, "the state snapshot goes with its workspace");
    let (s, _) = d.call("GET", &format!("/v1/snapshots/{state1}/info"), None);
    assert_eq!(s, 404, "and the earlier one it stacked on");
    d.expect("GET", "/v1/snapshots/g/info", None, 200);
    let (s, v) = d.call("DELETE", "/v1/workspaces/w1", None);
    assert_eq!(s, 404, "{v}");
    assert_eq!(v["error"], "workspace w1 not found");
}
