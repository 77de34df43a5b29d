//! A thousand short client connections that each hang up at a random
//! moment of a spawn, branch or snapshot request (before the request is
//! whole, as soon as it is, or a little later): every request that
//! arrived whole runs to its end, and afterwards the API's view and the
//! machine agree.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::machine::assert_agrees;
use common::{kill_all, Config, Daemon, TempDir};
use serde_json::json;

/// xorshift, seeded from the clock and printed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Sends the first `cut` bytes of `request` (all of it when `cut` is
/// larger), waits `linger`, and hangs up without reading.
fn hang_up(addr: &str, request: &[u8], cut: usize, linger: Duration) {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return;
    };
    let _ = s.write_all(&request[..cut.min(request.len())]);
    std::thread::sleep(linger);
    drop(s);
}

fn request(addr: &str, path: &str, body: &serde_json::Value) -> Vec<u8> {
    let body = body.to_string();
    format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[test]
fn a_thousand_clients_that_hang_up_leave_nothing_unlisted() {
    let tmp = TempDir::new("thousand");
    let state = tmp.path().join("state");
    let d = Daemon::start(&state, &Config::default());
    d.builtin_snapshot("m", json!({}));
    let sources = d.expect(
        "POST",
        "/v1/sandboxes",
        Some(json!({"snapshot_tag": "m", "n": 4})),
        201,
    );
    let sources: Vec<String> = sources
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_owned())
        .collect();
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    eprintln!("hang-ups: seed {seed}");
    let mut rng = Rng(seed);
    let addr = d.url.trim_start_matches("http://").to_owned();
    let started = Instant::now();
    // Every whole spawn request makes one sandbox, whether or not its
    // client stays for the answer.
    let mut whole_spawns = 0;
    let mut seen = std::collections::BTreeSet::new();
    let note_listed = |seen: &mut std::collections::BTreeSet<String>| {
        let listed = d.expect("GET", "/v1/sandboxes?all=true", None, 200);
        let ids: Vec<String> = listed
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["id"].as_str().unwrap().to_owned())
            .filter(|id| !sources.contains(id))
            .collect();
        seen.extend(ids.iter().cloned());
        ids
    };
    // 1,000 connections, 40 at a time.
    let mut n = 0;
    while n < 1000 {
        let batch: Vec<(Vec<u8>, usize, Duration)> = (0..40)
            .map(|_| {
                n += 1;
                let kind = rng.below(20);
                let req = match kind {
                    0 => request(
                        &addr,
                        "/v1/snapshots",
                        &json!({"tag": format!("s{n}"), "builtin": true}),
                    ),
                    1..=6 => {
                        let id = &sources[rng.below(sources.len() as u64) as usize];
                        request(
                            &addr,
                            &format!("/v1/sandboxes/{id}/branch"),
                            &json!({"tag": format!("b{n}")}),
                        )
                    }
                    _ => request(&addr, "/v1/sandboxes", &json!({"snapshot_tag": "m"})),
                };
                // A third are cut before they are whole; the rest hang up
                // at once or within 30 ms.
                let cut = match rng.below(3) {
                    0 => rng.below(req.len() as u64) as usize,
                    _ => req.len(),
                };
                let linger = Duration::from_millis(rng.below(30));
                if kind >= 7 && cut == req.len() {
                    whole_spawns += 1;
                }
                (req, cut, linger)
            })
            .collect();
        std::thread::scope(|s| {
            for (req, cut, linger) in &batch {
                let addr = addr.as_str();
                s.spawn(move || hang_up(addr, req, *cut, *linger));
            }
        });
        // Now and then, the sandboxes spawned so far go, so the host holds
        // a few hundred VMs at most.
        if n % 200 == 0 {
            for id in note_listed(&mut seen) {
                d.call("DELETE", &format!("/v1/sandboxes/{id}"), None);
            }
        }
    }
    eprintln!("1,000 hang-ups sent in {:?}", started.elapsed());
    let deadline = Instant::now() + Duration::from_secs(60);
    while {
        note_listed(&mut seen);
        seen.len() < whole_spawns
    } {
        assert!(
            Instant::now() < deadline,
            "{whole_spawns} whole spawn requests made {} sandboxes",
            seen.len()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        seen.len(),
        whole_spawns,
        "one sandbox per whole spawn request"
    );
    eprintln!("{whole_spawns} whole spawn requests, each made its sandbox");
    assert_agrees(&d, "after 1,000 hang-ups");
    // The daemon still serves, and what the hang-ups made works.
    let snaps = d.expect("GET", "/v1/snapshots", None, 200);
    let made: Vec<&str> = snaps
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["status"] == "ready" && s["tag"] != "m")
        .map(|s| s["tag"].as_str().unwrap())
        .collect();
    eprintln!("{} snapshots made by clients that hung up", made.len());
    if let Some(tag) = made.first() {
        let kid = d.expect(
            "POST",
            "/v1/sandboxes",
            Some(json!({"snapshot_tag": tag})),
            201,
        );
        let id = kid[0]["id"].as_str().unwrap();
        d.expect("POST", &format!("/v1/sandboxes/{id}/ping"), None, 200);
    }
    kill_all(&d);
    assert_agrees(&d, "after the kills");
}
