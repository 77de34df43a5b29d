//! The v1 REST API against a real forkd-daemon on loopback, driving real
//! built-in guest microVMs: every route, its validation and status codes,
//! auth, the audit log, metrics, TLS, and a restart that re-adopts running
//! sandboxes.

mod common;

use common::{kill_all, Config, Daemon, TempDir};
use serde_json::{json, Value};

fn ids(list: &Value) -> Vec<String> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect()
}

fn error_of(v: &Value) -> &str {
    v["error"]
        .as_str()
        .unwrap_or_else(|| panic!("not an error body: {v}"))
}

/// Makes a snapshot of the built-in guest (201 expected).
fn builtin_snapshot(d: &Daemon, tag: &str) -> Value {
    d.expect(
        "POST",
        "/v1/snapshots",
        Some(json!({"tag": tag, "builtin": true})),
        201,
    )
}

/// Spawns `n` sandboxes of `tag` (201 expected); the answer.
fn spawn(d: &Daemon, tag: &str, n: u32) -> Value {
    d.expect(
        "POST",
        "/v1/sandboxes",
        Some(json!({"snapshot_tag": tag, "n": n})),
        201,
    )
}

#[test]
fn auth_audit_metrics_and_the_system_routes() {
    let tmp = TempDir::new("auth");
    let token = "test-token-0123456789abcdef";
    let audit = tmp.path().join("audit.jsonl");
    let d = Daemon::start(
        &tmp.path().join("state"),
        &Config {
            token: Some(token.into()),
            audit_log: Some(audit.clone()),
            ..Default::default()
        },
    );
    // /healthz needs no token; everything else does.
    assert_eq!(
        d.call_with("GET", "/healthz", None, None),
        (200, json!({"ok": true}))
    );
    let (status, body) = d.call_with("GET", "/version", None, None);
    assert_eq!(status, 401);
    assert!(error_of(&body).contains("bearer token"), "{body}");
    let (status, _) = d.call_with(
        "GET",
        "/v1/snapshots",
        None,
        Some("test-token-0123456789abcdeX"),
    );
    assert_eq!(status, 401);
    let version = d.expect("GET", "/version", None, 200);
    assert_eq!(version["api"], "v1");
    assert!(version["version"].as_str().is_some());
    assert_eq!(d.expect("GET", "/v1/snapshots", None, 200), json!([]));
    let (status, body) = d.call("GET", "/v1/nothing-here", None);
    assert_eq!(status, 404);
    error_of(&body);
    let (status, body) = d.call("DELETE", "/v1/sandboxes", None);
    assert_eq!(status, 405);
    error_of(&body);
    // A body that is not JSON, or has a field v1 does not know: 400 as JSON.
    // Upstream's body statuses: a field a newer client sends is ignored
    // (the request goes on: here to its missing guest), a mistyped or
    // missing field is 422 (malformed JSON 400: api::tests).
    let (status, body) = d.call(
        "POST",
        "/v1/snapshots",
        Some(json!({"tag": "x", "colour": 1})),
    );
    assert_eq!(status, 400);
    assert!(error_of(&body).contains("give kernel and rootfs"), "{body}");
    let (status, body) = d.call(
        "POST",
        "/v1/sandboxes",
        Some(json!({"snapshot_tag": "t", "n": "2"})),
    );
    assert_eq!(status, 422, "{body}");
    let (status, body) = d.call("POST", "/v1/sandboxes", Some(json!({"n": 2})));
    assert_eq!(status, 422, "{body}");
    assert!(error_of(&body).contains("snapshot_tag"), "{body}");
    // /healthz/ as well as /healthz, without a token.
    assert_eq!(
        d.call_with("GET", "/healthz/", None, None),
        (200, json!({"ok": true}))
    );

    let (status, text) = d.raw("GET", "/metrics", None, Some(token));
    assert_eq!(status, 200);
    for name in [
        "forkd_snapshots_total 0",
        "forkd_sandboxes_active 0",
        "forkd_branches_in_flight 0",
        "forkd_branch_concurrency_cap 4",
        "forkd_build_info{version=",
        "forkd_spawn_duration_seconds_bucket",
        "forkd_branch_duration_seconds_bucket",
    ] {
        assert!(text.contains(name), "{name} missing from /metrics:\n{text}");
    }

    // One audit line per request, with the token's id and never the token.
    let log = std::fs::read_to_string(&audit).unwrap();
    assert!(
        !log.contains(token),
        "the audit log holds the token:\n{log}"
    );
    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(lines.len() >= 9, "{log}");
    let unauth = &lines[1];
    assert_eq!(unauth["path"], "/version");
    assert_eq!(unauth["status"], 401);
    assert_eq!(unauth["token_id"], Value::Null);
    let authed = lines
        .iter()
        .find(|l| l["path"] == "/version" && l["status"] == 200)
        .expect("the authorised /version is audited");
    assert_eq!(authed["method"], "GET");
    assert!(authed["token_id"].as_str().unwrap().starts_with("tok-"));
    assert!(authed["remote"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert!(authed["latency_ms"].as_f64().unwrap() >= 0.0);
    assert!(authed["time"].as_f64().unwrap() > 1.7e9);
    // Upstream's fields beside ours.
    assert!(authed["latency_us"].as_u64().is_some(), "{authed}");
    assert!(authed["ts"].as_str().unwrap().ends_with('Z'), "{authed}");
    assert!(authed["ua"].is_string(), "{authed}");
}

#[test]
fn a_public_bind_without_a_token_is_refused() {
    let tmp = TempDir::new("public");
    let err = Daemon::try_start(
        tmp.path(),
        &Config {
            bind: Some("0.0.0.0:0".into()),
            ..Default::default()
        },
    )
    .err()
    .expect("the daemon must refuse");
    assert!(err.contains("without a token"), "{err}");
}

#[test]
fn tls_serves_https_with_the_given_certificate() {
    let tmp = TempDir::new("tls");
    let (cert_path, key_path, pem) = common::self_signed_tls(tmp.path());
    let d = Daemon::start(
        &tmp.path().join("state"),
        &Config {
            tls: Some((cert_path, key_path, pem)),
            ..Default::default()
        },
    );
    assert!(d.url.starts_with("https://"), "{}", d.url);
    assert_eq!(d.expect("GET", "/version", None, 200)["api"], "v1");
    // Plain HTTP to the TLS port gets no API answer.
    let plain = d.url.replacen("https://", "http://", 1);
    let r = ureq::get(&format!("{plain}/healthz")).call();
    assert!(r.is_err(), "plain HTTP was answered: {r:?}");
}

#[test]
fn snapshots_sandboxes_and_branches_end_to_end() {
    let tmp = TempDir::new("e2e");
    let d = Daemon::start(&tmp.path().join("state"), &Config::default());

    // Snapshot validation.
    for (body, status, needle) in [
        (json!({"tag": "bad/tag", "builtin": true}), 400, "not valid"),
        (
            json!({"tag": "t", "builtin": true, "kernel": "/k"}),
            400,
            "leave out",
        ),
        (json!({"tag": "t"}), 400, "kernel and rootfs"),
        // Outside the images directory, missing, a directory, `..`: one
        // answer, which tells nothing more of the host's files.
        (
            json!({"tag": "t", "kernel": "/etc/shadow", "rootfs": "/no/r"}),
            400,
            "kernel \"/etc/shadow\" cannot be used: images go in the daemon's images directory",
        ),
        (
            json!({"tag": "t", "kernel": "/no/k", "rootfs": "/no/r"}),
            400,
            "kernel \"/no/k\" cannot be used: images go in the daemon's images directory",
        ),
        (
            json!({"tag": "t", "kernel": "/", "rootfs": "/no/r"}),
            400,
            "kernel \"/\" cannot be used: images go in the daemon's images directory",
        ),
        (
            json!({"tag": "t", "kernel": "../forkd.db", "rootfs": "/no/r"}),
            400,
            "kernel \"../forkd.db\" cannot be used: images go in the daemon's images directory",
        ),
    ] {
        let (s, v) = d.call("POST", "/v1/snapshots", Some(body.clone()));
        assert_eq!(s, status, "{body}: {v}");
        assert!(error_of(&v).contains(needle), "{body}: {v}");
    }

    // The built-in guest, snapshotted once its agent answers.
    let base = d.expect(
        "POST",
        "/v1/snapshots",
        Some(json!({"tag": "base", "builtin": true, "mem_size_mib": 128})),
        201,
    );
    assert_eq!(base["status"], "ready");
    assert_eq!(base["bootable"], true);
    assert_eq!(base["tag"], "base");
    let (s, v) = d.call(
        "POST",
        "/v1/snapshots",
        Some(json!({"tag": "base", "builtin": true})),
    );
    // Upstream: a create onto an existing tag is 400 (a branch onto one 409).
    assert_eq!(s, 400, "{v}");
    let list = d.expect("GET", "/v1/snapshots", None, 200);
    assert_eq!(list.as_array().unwrap().len(), 1);
    let info = d.expect("GET", "/v1/snapshots/base/info", None, 200);
    assert_eq!(info["chain_depth"], 0);
    assert_eq!(info["memory_logical_bytes"], 128u64 << 20);
    assert!(info["vmstate_bytes"].as_u64().unwrap() > 0);
    assert_eq!(d.call("GET", "/v1/snapshots/nope/info", None).0, 404);

    // Spawn validation.
    for (body, status) in [
        (json!({"snapshot_tag": "base", "n": 0}), 400),
        (json!({"snapshot_tag": "base", "n": 1001}), 400),
        (json!({"snapshot_tag": "nope", "n": 1}), 404),
        (json!({"snapshot_tag": "bad tag", "n": 1}), 400),
        (
            json!({"snapshot_tag": "base", "n": 1, "memory_limit_mib": 1}),
            400,
        ),
    ] {
        let (s, v) = d.call("POST", "/v1/sandboxes", Some(body.clone()));
        assert_eq!(s, status, "{body}: {v}");
        error_of(&v);
    }
    // A namespace for a snapshot without a network interface is not
    // refused (upstream never refuses the flag): the child has none, and
    // is told.
    let told = d.expect(
        "POST",
        "/v1/sandboxes",
        Some(json!({"snapshot_tag": "base", "n": 1, "per_child_netns": true})),
        201,
    );
    assert_eq!(told[0]["netns"], Value::Null, "{told}");
    assert!(told[0]["warning"]
        .as_str()
        .unwrap()
        .contains("no network interface"));
    let id = told[0]["id"].as_str().unwrap();
    d.expect("DELETE", &format!("/v1/sandboxes/{id}"), None, 204);

    let kids = spawn(&d, "base", 3);
    let kid_ids = ids(&kids);
    assert_eq!(kid_ids.len(), 3);
    for k in kids.as_array().unwrap() {
        assert_eq!(k["snapshot_tag"], "base");
        assert!(k["pid"].as_i64().unwrap() > 0);
    }
    for id in &kid_ids {
        let pong = d.expect("POST", &format!("/v1/sandboxes/{id}/ping"), None, 200);
        assert_eq!(pong["guest"], "guest: builtin", "{pong}");
    }
    let a = &kid_ids[0];
    let out = d.expect(
        "POST",
        &format!("/v1/sandboxes/{a}/exec"),
        Some(json!({"args": ["echo", "hello", "fork"]})),
        200,
    );
    assert_eq!(out["stdout"], "hello fork\n", "{out}");
    assert_eq!(out["exit_code"], 0);
    let out = d.expect(
        "POST",
        &format!("/v1/sandboxes/{a}/exec"),
        Some(json!({"args": ["false"]})),
        200,
    );
    assert_eq!(out["exit_code"], 1, "{out}");
    let (s, v) = d.call(
        "POST",
        &format!("/v1/sandboxes/{a}/exec"),
        Some(json!({"args": []})),
    );
    assert_eq!(s, 400, "{v}");
    let ev = d.expect(
        "POST",
        &format!("/v1/sandboxes/{a}/eval"),
        Some(json!({"code": "6*7"})),
        200,
    );
    assert_eq!(ev["result"], "42", "{ev}");
    assert_eq!(ev["exit_code"], 0);
    let one = d.expect("GET", &format!("/v1/sandboxes/{a}"), None, 200);
    assert_eq!(one["id"], a.as_str());
    assert_eq!(d.call("GET", "/v1/sandboxes/nope-1", None).0, 404);
    assert_eq!(d.call("POST", "/v1/sandboxes/nope-1/ping", None).0, 404);

    // Branch validation, then a full branch and a diff on top of it.
    let (s, v) = d.call(
        "POST",
        &format!("/v1/sandboxes/{a}/branch"),
        Some(json!({"mode": "diff", "diff": true})),
    );
    assert_eq!(s, 400, "{v}");
    assert!(error_of(&v).contains("not both"), "{v}");
    let (s, v) = d.call(
        "POST",
        &format!("/v1/sandboxes/{a}/branch"),
        Some(json!({"mode": "live"})),
    );
    assert_eq!(s, 400, "{v}");
    assert!(error_of(&v).contains("live_fork"), "{v}");
    let (s, v) = d.call(
        "POST",
        "/v1/sandboxes/nope-1/branch",
        Some(json!({"tag": "x"})),
    );
    assert_eq!(s, 404, "{v}");
    // The body is checked before the sandbox is looked up, as upstream.
    let (s, v) = d.call(
        "POST",
        "/v1/sandboxes/nope-1/branch",
        Some(json!({"mode": "full", "wait": false})),
    );
    assert_eq!(s, 400, "{v}");
    let (s, v) = d.call(
        "POST",
        "/v1/sandboxes/nope-1/branch",
        Some(json!({"mode": "fast"})),
    );
    assert_eq!(s, 422, "{v}");
    let (s, v) = d.call(
        "POST",
        &format!("/v1/sandboxes/{a}/branch"),
        Some(json!({"tag": "base"})),
    );
    assert_eq!(s, 409, "{v}");

    let b1 = d.expect(
        "POST",
        &format!("/v1/sandboxes/{a}/branch"),
        Some(json!({"tag": "b1", "mode": "full"})),
        201,
    );
    assert_eq!(b1["status"], "ready");
    assert_eq!(b1["branched_from"], a.as_str());
    // Whole milliseconds as upstream, microseconds beside them.
    assert!(b1["pause_ms"].is_u64(), "{b1}");
    assert!(b1["pause_us"].as_u64().unwrap() > 0, "{b1}");
    let sb = d.expect("GET", &format!("/v1/sandboxes/{a}"), None, 200);
    assert_eq!(
        (&sb["has_branched"], &sb["branch_count"]),
        (&json!(true), &json!(1)),
        "{sb}"
    );
    assert!(
        sb["last_branch_memory_path"]
            .as_str()
            .unwrap()
            .ends_with("/b1/memory"),
        "{sb}"
    );
    // The diff is taken against the sandbox's latest branch.
    let (s, v) = d.call(
        "POST",
        &format!("/v1/sandboxes/{a}/branch"),
        Some(json!({"tag": "b2", "mode": "diff", "parent_tag": "base"})),
    );
    assert_eq!(s, 400, "{v}");
    let b2 = d.expect(
        "POST",
        &format!("/v1/sandboxes/{a}/branch"),
        Some(json!({"tag": "b2", "diff": true, "parent_tag": "b1"})),
        201,
    );
    assert_eq!(b2["kind"], "diff", "{b2}");
    // What the diff cost, as upstream answers it; a full branch that
    // measures one says the same of the diff it would have been, and stays
    // a full snapshot.
    let m = d.expect(
        "POST",
        &format!("/v1/sandboxes/{a}/branch"),
        Some(json!({"tag": "bm", "measure_diff": true})),
        201,
    );
    assert_eq!(m["kind"], "full", "{m}");
    assert_eq!(m["diff_logical_bytes"], 128u64 << 20, "{m}");
    let measured = m["diff_physical_bytes"].as_u64().unwrap();
    assert!(measured > 0 && measured < 32 << 20, "{m}");
    let scratch: Vec<_> = std::fs::read_dir(d.state.join("snapshots"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(".measure-"))
        .collect();
    assert!(scratch.is_empty(), "the measured diff is left behind");
    assert!(b2["diff_ms"].is_u64(), "{b2}");
    assert_eq!(b2["diff_logical_bytes"], 128u64 << 20, "{b2}");
    let physical = b2["diff_physical_bytes"].as_u64().unwrap();
    assert!(physical > 0 && physical < 32 << 20, "{b2}");
    let info = d.expect("GET", "/v1/snapshots/b2/info", None, 200);
    assert_eq!(info["parent_tag"], "b1", "{info}");
    assert_eq!(info["ancestors"], json!(["b1"]));
    assert_eq!(info["chain_depth"], 1);
    assert!(info["parent_content_hash"].as_str().unwrap().len() >= 32);
    assert!(
        info["memory_physical_bytes"].as_u64().unwrap() < 32 << 20,
        "a diff stores only changed pages: {info}"
    );
    let b1_info = d.expect("GET", "/v1/snapshots/b1/info", None, 200);
    assert_eq!(b1_info["dependents"], json!(["b2"]));

    // A child of the diff chain answers.
    let grand = spawn(&d, "b2", 2);
    for id in ids(&grand) {
        let pong = d.expect("POST", &format!("/v1/sandboxes/{id}/ping"), None, 200);
        assert_eq!(pong["guest"], "guest: builtin");
    }

    // Branch of a sandbox whose VMM died: 409, not a hang or a 500.
    let dead = &kid_ids[1];
    let pid = kids[1]["pid"].as_i64().unwrap() as i32;
    // SAFETY: the sandbox's VMM, a process this test started through the daemon.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    std::thread::sleep(std::time::Duration::from_millis(200));
    let (s, v) = d.call(
        "POST",
        &format!("/v1/sandboxes/{dead}/branch"),
        Some(json!({"tag": "from-dead"})),
    );
    assert_eq!(s, 409, "{v}");
    assert!(error_of(&v).contains("not running"), "{v}");
    let listed = ids(&d.expect("GET", "/v1/sandboxes", None, 200));
    assert!(
        !listed.contains(dead),
        "a dead sandbox is still listed: {listed:?}"
    );
    assert_eq!(listed.len(), 4, "{listed:?}");

    // Deleting a parent: 409 naming the dependents, 400 with both flags,
    // cascade takes the chain.
    let (s, v) = d.call("DELETE", "/v1/snapshots/b1", None);
    assert_eq!(s, 409, "{v}");
    assert!(error_of(&v).contains("b2"), "{v}");
    let (s, v) = d.call("DELETE", "/v1/snapshots/b1?cascade=true&force=true", None);
    assert_eq!(s, 400, "{v}");
    d.expect("DELETE", "/v1/snapshots/b1?cascade=true", None, 204);
    assert_eq!(d.call("GET", "/v1/snapshots/b2/info", None).0, 404);
    assert!(!d.state.join("snapshots/b1").exists());
    assert!(!d.state.join("snapshots/b2").exists());
    assert_eq!(d.call("DELETE", "/v1/snapshots/b1", None).0, 404);

    // Kill: 204, then gone.
    d.expect("DELETE", &format!("/v1/sandboxes/{a}"), None, 204);
    assert_eq!(
        d.call("POST", &format!("/v1/sandboxes/{a}/ping"), None).0,
        404
    );
    assert_eq!(d.call("DELETE", &format!("/v1/sandboxes/{a}"), None).0, 404);
    d.expect("DELETE", "/v1/snapshots/bm", None, 204);

    let (_, metrics) = d.raw("GET", "/metrics", None, None);
    assert!(metrics.contains("forkd_snapshots_total 1"), "{metrics}");
    assert!(
        metrics.contains("forkd_spawn_duration_seconds_count 3"),
        "{metrics}"
    );
    assert!(
        metrics.contains("forkd_branch_duration_seconds_count 3"),
        "{metrics}"
    );
    kill_all(&d);
    assert_eq!(d.expect("GET", "/v1/sandboxes", None, 200), json!([]));
    d.expect("DELETE", "/v1/snapshots/base", None, 204);
}

#[test]
fn a_restarted_daemon_keeps_its_sandboxes_reachable() {
    let tmp = TempDir::new("restart");
    let state = tmp.path().join("state");
    let mut d = Daemon::start(&state, &Config::default());
    builtin_snapshot(&d, "r");
    let kids = spawn(&d, "r", 3);
    let kid_ids = ids(&kids);
    assert!(
        d.stop(),
        "the daemon did not stop cleanly:\n{}",
        d.log_text()
    );
    // While it is down, one sandbox dies.
    let pid = kids[2]["pid"].as_i64().unwrap() as i32;
    // SAFETY: the sandbox's VMM, a process this test started through the daemon.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    std::thread::sleep(std::time::Duration::from_millis(200));

    let d = Daemon::start(&state, &Config::default());
    let listed = ids(&d.expect("GET", "/v1/sandboxes", None, 200));
    assert_eq!(listed, kid_ids[..2].to_vec(), "re-adopted: {listed:?}");
    for id in &listed {
        let pong = d.expect("POST", &format!("/v1/sandboxes/{id}/ping"), None, 200);
        assert_eq!(pong["guest"], "guest: builtin");
    }
    // Spawning works again (a new fork server) and branching a re-adopted
    // sandbox too.
    let more = spawn(&d, "r", 1);
    d.expect(
        "POST",
        &format!("/v1/sandboxes/{}/ping", ids(&more)[0]),
        None,
        200,
    );
    d.expect(
        "POST",
        &format!("/v1/sandboxes/{}/branch", listed[0]),
        Some(json!({"tag": "after-restart"})),
        201,
    );
    kill_all(&d);
}

#[test]
fn the_branch_cap_answers_503() {
    let tmp = TempDir::new("cap");
    let d = Daemon::start(
        &tmp.path().join("state"),
        &Config {
            branch_concurrency: Some(1),
            ..Default::default()
        },
    );
    d.expect(
        "POST",
        "/v1/snapshots",
        Some(json!({"tag": "big", "builtin": true, "mem_size_mib": 1024})),
        201,
    );
    let kids = ids(&spawn(&d, "big", 2));
    // Both requests start together; a full branch of 1 GiB holds its
    // permit for the whole scan of RAM, so they overlap.
    let d = std::sync::Arc::new(d);
    let handles: Vec<_> = kids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let d = d.clone();
            let id = id.clone();
            std::thread::spawn(move || {
                d.call(
                    "POST",
                    &format!("/v1/sandboxes/{id}/branch"),
                    Some(json!({"tag": format!("cap{i}")})),
                )
            })
        })
        .collect();
    let mut statuses: Vec<u16> = handles.into_iter().map(|h| h.join().unwrap().0).collect();
    statuses.sort();
    assert_eq!(statuses, vec![201, 503]);
    kill_all(&d);
}

#[test]
fn a_copy_interrupted_by_a_restart_is_failed_never_ready() {
    let tmp = TempDir::new("interrupted");
    let state = tmp.path().join("state");
    let mut d = Daemon::start(&state, &Config::default());
    builtin_snapshot(&d, "base");
    let kid = ids(&spawn(&d, "base", 1)).remove(0);
    for tag in ["w1", "w2"] {
        d.expect(
            "POST",
            &format!("/v1/sandboxes/{kid}/branch"),
            Some(json!({"tag": tag})),
            201,
        );
    }
    kill_all(&d);
    assert!(d.stop());
    // What a daemon that died during two live copies whose source VMM is
    // gone leaves: rows `writing`; w1's copy did not finish (its
    // snapshot.json says writing), w2's did just before the crash.
    let db = rusqlite::Connection::open(state.join("forkd.db")).unwrap();
    db.execute(
        "UPDATE snapshots SET status = 'writing', bootable = 0 WHERE tag IN ('w1', 'w2')",
        [],
    )
    .unwrap();
    drop(db);
    let meta_path = state.join("snapshots/w1/snapshot.json");
    let mut meta: Value = serde_json::from_slice(&std::fs::read(&meta_path).unwrap()).unwrap();
    meta["status"] = json!("writing");
    std::fs::write(&meta_path, serde_json::to_vec(&meta).unwrap()).unwrap();

    let d = Daemon::start(&state, &Config::default());
    let w1 = d.expect("GET", "/v1/snapshots/w1/info", None, 200);
    assert_eq!(w1["status"], "failed", "{w1}");
    assert_eq!(w1["bootable"], false);
    assert!(
        w1["warning"].as_str().unwrap().contains("restarted"),
        "{w1}"
    );
    let (s, v) = d.call(
        "POST",
        "/v1/sandboxes",
        Some(json!({"snapshot_tag": "w1", "n": 1})),
    );
    assert_eq!(s, 409, "{v}");
    let w2 = d.expect("GET", "/v1/snapshots/w2/info", None, 200);
    assert_eq!(w2["status"], "ready", "{w2}");
    let kids = spawn(&d, "w2", 1);
    d.expect(
        "POST",
        &format!("/v1/sandboxes/{}/ping", ids(&kids)[0]),
        None,
        200,
    );
    kill_all(&d);
}

#[test]
fn live_branches_and_compaction() {
    let tmp = TempDir::new("live");
    let d = Daemon::start(&tmp.path().join("state"), &Config::default());
    builtin_snapshot(&d, "base");
    let kid = d.expect(
        "POST",
        "/v1/sandboxes",
        Some(json!({"snapshot_tag": "base", "n": 1, "live_fork": true})),
        201,
    );
    assert_eq!(kid[0]["live_fork"], true, "{kid}");
    let id = kid[0]["id"].as_str().unwrap().to_string();
    // wait: false applies to live branches only.
    let (s, v) = d.call(
        "POST",
        &format!("/v1/sandboxes/{id}/branch"),
        Some(json!({"mode": "diff", "wait": false})),
    );
    assert_eq!(s, 400, "{v}");

    // Live, answered once the sandbox runs again; the copy finishes behind.
    let (s, live) = d.call(
        "POST",
        &format!("/v1/sandboxes/{id}/branch"),
        Some(json!({"tag": "l1", "mode": "live", "wait": false})),
    );
    assert!(s == 202 || s == 201, "{s}: {live}");
    if s == 202 {
        assert_eq!(live["status"], "writing", "{live}");
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let info = d.expect("GET", "/v1/snapshots/l1/info", None, 200);
        match info["status"].as_str().unwrap() {
            "ready" => break,
            "writing" => {}
            other => panic!("the live copy ended {other}: {info}"),
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still writing: {info}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let (_, metrics) = d.raw("GET", "/metrics", None, None);
    assert!(metrics.contains("forkd_branches_in_flight 0"), "{metrics}");
    // A diff on top of the live branch: a chain l1 <- l2 (l1 holds all of
    // RAM and the built-in guest has no disk, so l1 needs nothing of base).
    d.expect(
        "POST",
        &format!("/v1/sandboxes/{id}/branch"),
        Some(json!({"tag": "l2", "mode": "diff"})),
        201,
    );
    let l2 = d.expect("GET", "/v1/snapshots/l2/info", None, 200);
    assert_eq!(l2["ancestors"], json!(["l1"]), "{l2}");
    assert_eq!(l2["chain_depth"], 1);

    // Compact the head: a flat snapshot that outlives the chain.
    let (s, v) = d.call(
        "POST",
        "/v1/snapshots/l2/compact",
        Some(json!({"to": "l2"})),
    );
    assert_eq!(s, 400, "{v}");
    let (s, v) = d.call(
        "POST",
        "/v1/snapshots/l2/compact",
        Some(json!({"to": "l1"})),
    );
    assert_eq!(s, 409, "{v}");
    let (s, v) = d.call(
        "POST",
        "/v1/snapshots/nope/compact",
        Some(json!({"to": "flat"})),
    );
    assert_eq!(s, 404, "{v}");
    let flat = d.expect(
        "POST",
        "/v1/snapshots/l2/compact",
        Some(json!({"to": "flat"})),
        200,
    );
    assert_eq!(flat["kind"], "full", "{flat}");
    let info = d.expect("GET", "/v1/snapshots/flat/info", None, 200);
    assert_eq!(info["chain_depth"], 0, "{info}");
    assert_eq!(info["parent_tag"], Value::Null);
    kill_all(&d);
    d.expect("DELETE", "/v1/snapshots/l1?cascade=true", None, 204);
    let left: Vec<String> = d
        .expect("GET", "/v1/snapshots", None, 200)
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["tag"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(left, vec!["base".to_string(), "flat".to_string()]);
    let kids = spawn(&d, "flat", 2);
    for id in ids(&kids) {
        let pong = d.expect("POST", &format!("/v1/sandboxes/{id}/ping"), None, 200);
        assert_eq!(pong["guest"], "guest: builtin");
    }
    kill_all(&d);
}

#[test]
fn one_tag_is_made_by_one_request() {
    let tmp = TempDir::new("same-tag");
    let d = std::sync::Arc::new(Daemon::start(&tmp.path().join("state"), &Config::default()));
    let handles: Vec<_> = (0..3)
        .map(|_| {
            let d = d.clone();
            std::thread::spawn(move || {
                d.call(
                    "POST",
                    "/v1/snapshots",
                    Some(json!({"tag": "same", "builtin": true, "mem_size_mib": 512})),
                )
            })
        })
        .collect();
    let mut answers: Vec<(u16, Value)> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    answers.sort_by_key(|a| a.0);
    let statuses: Vec<u16> = answers.iter().map(|a| a.0).collect();
    assert_eq!(statuses, vec![201, 409, 409], "{answers:?}");
    for (_, v) in &answers[1..] {
        let e = error_of(v);
        assert!(e.contains("being made") || e.contains("exists"), "{e}");
    }
    let list = d.expect("GET", "/v1/snapshots", None, 200);
    assert_eq!(list.as_array().unwrap().len(), 1);
    // Nothing half-made is left beside it.
    let left: Vec<_> = std::fs::read_dir(d.state.join("run"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("build-"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// The directory of `pid`'s group of `controller`, from `/proc/<pid>/cgroup`:
/// a v1 hierarchy's (`N:memory:/forkd/...`, mounted at
/// /sys/fs/cgroup/<controller>) or the unified one's (`0::/forkd/...`).
fn group_of(pid: i64, controller: &str) -> std::path::PathBuf {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    for line in text.lines() {
        let mut f = line.splitn(3, ':');
        let (_, ctrls, path) = (f.next(), f.next().unwrap(), f.next().unwrap());
        if ctrls.split(',').any(|c| c == controller) {
            return format!("/sys/fs/cgroup/{controller}{path}").into();
        }
    }
    let unified = text.lines().find_map(|l| l.strip_prefix("0::")).unwrap();
    format!("/sys/fs/cgroup{unified}").into()
}

fn read_trimmed(p: std::path::PathBuf) -> String {
    std::fs::read_to_string(&p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .trim()
        .to_owned()
}

/// A limit file's value in either version: (v1 name, v2 name).
fn limit(dir: &std::path::Path, files: (&str, &str)) -> String {
    let v1 = dir.join(files.0);
    if v1.exists() {
        read_trimmed(v1)
    } else {
        read_trimmed(dir.join(files.1))
    }
}

#[test]
fn limits_put_each_child_in_a_group_of_its_own_pooled_or_not() {
    let tmp = TempDir::new("cgroup");
    let d = Daemon::start(
        &tmp.path().join("state"),
        &Config {
            args: vec!["--fork-pool".into(), "2".into()],
            ..Default::default()
        },
    );
    builtin_snapshot(&d, "base");
    // The first spawn starts the fork server, whose pool then fills: its
    // children's groups are made with the daemon's defaults.
    let first = d.expect(
        "POST",
        "/v1/sandboxes",
        Some(json!({"snapshot_tag": "base"})),
        201,
    );
    let parked = |state: &std::path::Path| -> usize {
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter(|p| {
                let comm = std::fs::read_to_string(p.path().join("comm")).unwrap_or_default();
                let cmd = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
                comm.trim() == "forkd-pooled"
                    && String::from_utf8_lossy(&cmd).contains(&*state.to_string_lossy())
            })
            .count()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while parked(tmp.path()) < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the fork pool never filled"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let mut groups = Vec::new();
    // Pooled children (their groups' limits changed at hand-out) and a
    // memfd child, forked when asked.
    for extra in [json!({"n": 2}), json!({"n": 1, "live_fork": true})] {
        // The disk cap needs the test's temp dir on a block device (this
        // host's root disk), and the io (v1: blkio) controller.
        let mut req = json!({"snapshot_tag": "base", "memory_limit_mib": 256,
            "cpu_limit": 0.5, "pids_limit": 128, "disk_quota_mib": 64, "io_limit_mibps": 8});
        req.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let kids = d.expect("POST", "/v1/sandboxes", Some(req), 201);
        for k in kids.as_array().unwrap() {
            assert_eq!(
                (
                    &k["memory_limit_mib"],
                    &k["cpu_limit"],
                    &k["pids_limit"],
                    &k["disk_quota_mib"],
                    &k["io_limit_mibps"]
                ),
                (&json!(256), &json!(0.5), &json!(128), &json!(64), &json!(8)),
                "{k}"
            );
            let (id, pid) = (k["id"].as_str().unwrap(), k["pid"].as_i64().unwrap());
            // A child joins its group before anything else: once it
            // answers, it is there.
            let pong = d.expect("POST", &format!("/v1/sandboxes/{id}/ping"), None, 200);
            assert_eq!(pong["guest"], "guest: builtin");
            let [memory, cpu, pids] = ["memory", "cpu", "pids"].map(|c| group_of(pid, c));
            let name = memory.file_name().unwrap().to_owned();
            assert!(
                memory.to_string_lossy().contains("/forkd/")
                    && name.to_string_lossy().starts_with("vmm-"),
                "sandbox {id} (pid {pid}) is in no group of its own: {}",
                memory.display()
            );
            for g in [&cpu, &pids] {
                assert_eq!(g.file_name().unwrap(), name, "one name in every hierarchy");
            }
            assert_eq!(
                limit(&memory, ("memory.limit_in_bytes", "memory.max")),
                (256u64 << 20).to_string()
            );
            assert_eq!(read_trimmed(pids.join("pids.max")), "128");
            let quota = limit(&cpu, ("cpu.cfs_quota_us", "cpu.max"));
            assert!(quota == "50000" || quota == "50000 100000", "{quota}");
            // One vCPU: the default weight.
            let weight = limit(&cpu, ("cpu.shares", "cpu.weight"));
            assert!(weight == "1024" || weight == "100", "{weight}");
            // Its threads are there too (all of the process moved).
            let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
                .unwrap()
                .count();
            assert_eq!(
                read_trimmed(pids.join("pids.current")),
                tasks.to_string(),
                "the pids group counts every thread of the VMM"
            );
            // 8 MiB/s each way on the disk under the state directory.
            let io = group_of(pid, "blkio");
            assert_eq!(io.file_name().unwrap(), name, "one name in every hierarchy");
            let (read, write) = if io.join("io.max").exists() {
                let max = read_trimmed(io.join("io.max"));
                (max.clone(), max)
            } else {
                (
                    read_trimmed(io.join("blkio.throttle.read_bps_device")),
                    read_trimmed(io.join("blkio.throttle.write_bps_device")),
                )
            };
            for (cap, want) in [(&read, "8388608"), (&write, "8388608")] {
                assert!(
                    cap.split([' ', '=']).any(|w| w == want),
                    "sandbox {id}'s disk cap is {cap:?}, not {want} bytes/s"
                );
            }
            groups.extend([memory, cpu, pids, io]);
        }
    }
    // No limits asked: the daemon's task limit and disk quota, no memory
    // or CPU cap.
    let k = &first[0];
    assert_eq!(
        (
            &k["memory_limit_mib"],
            &k["pids_limit"],
            &k["disk_quota_mib"]
        ),
        (&json!(null), &json!(1024), &json!(4096))
    );
    let id = k["id"].as_str().unwrap();
    d.expect("POST", &format!("/v1/sandboxes/{id}/ping"), None, 200);
    assert!(k.get("cpu_limit").is_none(), "{k}");
    let pid = k["pid"].as_i64().unwrap();
    assert_eq!(read_trimmed(group_of(pid, "pids").join("pids.max")), "1024");
    let quota = limit(&group_of(pid, "cpu"), ("cpu.cfs_quota_us", "cpu.max"));
    assert!(quota == "-1" || quota.starts_with("max"), "{quota}");
    groups.extend(["memory", "cpu", "pids"].map(|c| group_of(pid, c)));

    // Out of range: refused, nothing started.
    for (body, needle) in [
        (
            json!({"snapshot_tag": "base", "cpu_limit": 0}),
            "cpu_limit 0 is out of range",
        ),
        (
            json!({"snapshot_tag": "base", "pids_limit": 8}),
            "pids_limit 8 is out of range",
        ),
        (
            json!({"snapshot_tag": "base", "disk_quota_mib": 0}),
            "disk_quota_mib 0 is out of range",
        ),
    ] {
        let (status, v) = d.call("POST", "/v1/sandboxes", Some(body));
        assert_eq!(status, 400, "{v}");
        assert!(v["error"].as_str().unwrap().contains(needle), "{v}");
    }
    kill_all(&d);
    for dir in groups {
        assert!(!dir.exists(), "{} is left after the kill", dir.display());
    }
}

/// The link state of the tap `forkd0` inside namespace `ns` (`ip -o link`).
fn tap_in(ns: &str) -> String {
    let out = std::process::Command::new("ip")
        .args(["-n", ns, "-o", "link", "show", "dev", "forkd0"])
        .output()
        .expect("this test needs the `ip` command (iproute2)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_networked_snapshot_gives_each_child_its_own_namespace() {
    let tmp = TempDir::new("netns");
    let d = Daemon::start(&tmp.path().join("state"), &Config::default());
    let snap = d.expect(
        "POST",
        "/v1/snapshots",
        Some(json!({"tag": "net", "builtin": true, "network": true})),
        201,
    );
    assert_eq!(snap["network"], true, "{snap}");
    // The source VM's namespace went with it (the daemon records each
    // namespace it makes until it has removed it).
    let state = tmp.path().join("state");
    let recorded: i64 = rusqlite::Connection::open(state.join("forkd.db"))
        .unwrap()
        .query_row("SELECT count(*) FROM netns", [], |r| r.get(0))
        .unwrap();
    assert_eq!(recorded, 0, "the build namespace is left");

    // Its children cannot share a tap: the published clients' default
    // (per_child_netns: false) gets them their namespaces anyway, and a
    // warning saying so.
    let told = d.expect(
        "POST",
        "/v1/sandboxes",
        Some(json!({"snapshot_tag": "net", "n": 1, "per_child_netns": false})),
        201,
    );
    assert!(told[0]["netns"].as_str().is_some(), "{told}");
    assert!(
        told[0]["warning"]
            .as_str()
            .unwrap()
            .contains("namespace of its own"),
        "{told}"
    );
    let id = told[0]["id"].as_str().unwrap();
    d.expect("DELETE", &format!("/v1/sandboxes/{id}"), None, 204);

    // Left out, per_child_netns follows the snapshot.
    let kids = spawn(&d, "net", 2);
    let mut namespaces = Vec::new();
    for k in kids.as_array().unwrap() {
        let id = k["id"].as_str().unwrap();
        let ns = k["netns"].as_str().expect("a namespace").to_string();
        assert_eq!(k["guest_addr"], "172.16.0.2", "{k}");
        // Running (a spawn answers once the children are forked; they
        // finish restoring on their own).
        let pong = d.expect("POST", &format!("/v1/sandboxes/{id}/ping"), None, 200);
        assert_eq!(pong["guest"], "guest: builtin");
        let link = tap_in(&ns);
        // The child's VMM holds the tap open: it has a carrier.
        assert!(
            link.contains("LOWER_UP") && !link.contains("NO-CARRIER"),
            "{ns}: {link}"
        );
        assert!(link.contains("06:00:ac:10:00:01"), "{ns}: {link}");
        namespaces.push((id.to_string(), ns));
    }
    assert_ne!(namespaces[0].1, namespaces[1].1);
    let listed = d.expect(
        "GET",
        &format!("/v1/sandboxes/{}", namespaces[0].0),
        None,
        200,
    );
    assert_eq!(listed["netns"], namespaces[0].1.as_str());

    // A branch keeps the interface; its children get namespaces too.
    let b = d.expect(
        "POST",
        &format!("/v1/sandboxes/{}/branch", namespaces[0].0),
        Some(json!({"tag": "net-b", "mode": "diff"})),
        201,
    );
    assert_eq!(b["network"], true, "{b}");
    let grandkid = spawn(&d, "net-b", 1);
    let gns = grandkid[0]["netns"].as_str().unwrap().to_string();
    let gid = grandkid[0]["id"].as_str().unwrap();
    d.expect("POST", &format!("/v1/sandboxes/{gid}/ping"), None, 200);
    assert!(tap_in(&gns).contains("LOWER_UP"), "{}", tap_in(&gns));

    // A kill removes the namespace with the sandbox.
    d.expect(
        "DELETE",
        &format!("/v1/sandboxes/{}", namespaces[0].0),
        None,
        204,
    );
    assert!(!std::path::Path::new(&format!("/var/run/netns/{}", namespaces[0].1)).exists());
    kill_all(&d);
    for ns in namespaces.iter().map(|(_, ns)| ns).chain([&gns]) {
        assert!(
            !std::path::Path::new(&format!("/var/run/netns/{ns}")).exists(),
            "{ns} is left after the kill"
        );
    }
}

#[test]
fn a_restart_removes_the_namespaces_no_sandbox_needs() {
    let tmp = TempDir::new("netns-restart");
    let state = tmp.path().join("state");
    let mut d = Daemon::start(&state, &Config::default());
    d.expect(
        "POST",
        "/v1/snapshots",
        Some(json!({"tag": "net", "builtin": true, "network": true})),
        201,
    );
    let kids = spawn(&d, "net", 2);
    let ns: Vec<String> = kids
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["netns"].as_str().unwrap().to_string())
        .collect();
    assert!(
        d.stop(),
        "the daemon did not stop cleanly:\n{}",
        d.log_text()
    );
    // While it is down, one sandbox dies, and a namespace a crashed spawn
    // made (recorded, named by no sandbox) is waiting.
    let pid = kids[1]["pid"].as_i64().unwrap() as i32;
    // SAFETY: the sandbox's VMM, a process this test started through the daemon.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let orphan = format!("forkd-orphan-{}", std::process::id());
    let made = std::process::Command::new("ip")
        .args(["netns", "add", &orphan])
        .status()
        .expect("this test needs the `ip` command (iproute2)");
    assert!(made.success());
    rusqlite::Connection::open(state.join("forkd.db"))
        .unwrap()
        .execute("INSERT INTO netns (name) VALUES (?1)", [&orphan])
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));

    let d = Daemon::start(&state, &Config::default());
    let gone = |n: &str| !std::path::Path::new(&format!("/var/run/netns/{n}")).exists();
    assert!(gone(&orphan), "the orphan namespace is left");
    assert!(gone(&ns[1]), "the dead sandbox's namespace is left");
    assert!(!gone(&ns[0]), "the live sandbox's namespace was removed");
    let id = kids[0]["id"].as_str().unwrap();
    d.expect("POST", &format!("/v1/sandboxes/{id}/ping"), None, 200);
    assert!(tap_in(&ns[0]).contains("LOWER_UP"));
    kill_all(&d);
    assert!(gone(&ns[0]));
}

/// The daemon's record of the namespaces it made and has not removed.
fn recorded_netns(state: &std::path::Path) -> Vec<String> {
    let conn = rusqlite::Connection::open(state.join("forkd.db")).unwrap();
    let mut stmt = conn
        .prepare("SELECT name FROM netns ORDER BY name")
        .unwrap();
    let names = stmt
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<Vec<String>, _>>()
        .unwrap();
    names
}

/// Waits (at most 20 s) until `pred` holds of the recorded namespaces.
fn wait_recorded(state: &std::path::Path, what: &str, pred: impl Fn(&[String]) -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let names = recorded_netns(state);
        if pred(&names) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: recorded {names:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Waits until the daemon's namespace pool holds `want` ready (its
/// `forkd_netns_pool_ready` gauge): a name is recorded before its namespace
/// is made, and made before the pool holds it, so the records run ahead.
fn wait_pool_ready(d: &Daemon, what: &str, want: usize) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let line = format!("forkd_netns_pool_ready {want}\n");
    loop {
        let (status, text) = d.raw("GET", "/metrics", None, None);
        assert_eq!(status, 200, "{text}");
        if text.contains(&line) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: the pool never held {want}:\n{text}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Whether `name` is a pool's namespace (`forkd-<instance>-p<hex>`; a
/// spawn's are `forkd-<instance>-<batch>-<i>`).
fn is_pooled(name: &str) -> bool {
    name.strip_prefix("forkd-")
        .and_then(|rest| rest.split_once('-'))
        .is_some_and(|(_, own)| own.starts_with('p') && !own.contains('-'))
}

#[test]
fn a_namespace_pool_serves_spawns_and_is_removed_at_shutdown() {
    let tmp = TempDir::new("netns-pool");
    let state = tmp.path().join("state");
    let mut d = Daemon::start(
        &state,
        &Config {
            netns_pool: Some(3),
            ..Default::default()
        },
    );
    d.expect(
        "POST",
        "/v1/snapshots",
        Some(json!({"tag": "net", "builtin": true, "network": true})),
        201,
    );
    let pooled = |names: &[String]| names.iter().filter(|n| is_pooled(n)).count();
    wait_recorded(&state, "the pool fills", |n| pooled(n) == 3);
    wait_pool_ready(&d, "the pool fills", 3);
    let ready = recorded_netns(&state);

    // Two children take two of the three made ahead.
    let kids = spawn(&d, "net", 2);
    for k in kids.as_array().unwrap() {
        let ns = k["netns"].as_str().unwrap();
        assert!(ready.iter().any(|r| r == ns), "{ns} was not made ahead");
        let id = k["id"].as_str().unwrap();
        d.expect("POST", &format!("/v1/sandboxes/{id}/ping"), None, 200);
        assert!(tap_in(ns).contains("LOWER_UP"), "{ns}: {}", tap_in(ns));
    }
    // It refills to three ready beside the two in use.
    wait_recorded(&state, "the pool refills", |n| pooled(n) == 5);
    wait_pool_ready(&d, "the pool refills", 3);

    // More than the pool holds: three from it, the rest made on the spot.
    let more = spawn(&d, "net", 5);
    let names: Vec<&str> = more
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["netns"].as_str().unwrap())
        .collect();
    assert_eq!(
        names.iter().filter(|n| is_pooled(n)).count(),
        3,
        "{names:?}"
    );
    let id = more[4]["id"].as_str().unwrap();
    d.expect("POST", &format!("/v1/sandboxes/{id}/ping"), None, 200);

    kill_all(&d);
    wait_recorded(&state, "the pool refills after the kills", |n| n.len() == 3);
    wait_pool_ready(&d, "the pool refills after the kills", 3);
    let left = recorded_netns(&state);
    assert!(
        d.stop(),
        "the daemon did not stop cleanly:\n{}",
        d.log_text()
    );
    assert!(
        recorded_netns(&state).is_empty(),
        "the pool was not removed"
    );
    for n in left {
        assert!(
            !std::path::Path::new(&format!("/var/run/netns/{n}")).exists(),
            "{n} is left after shutdown"
        );
    }
}
