//! The daemon's connection limits over real sockets: a connection that
//! stalls before its request's headers end (or its TLS handshake does) is
//! closed after the header timeout, a kept-alive one after the idle
//! timeout, and one over the connection cap is answered the daemon's JSON
//! 503 and closed. (That a request in flight is never cut is shown by the
//! serving layer's own tests, `forkd_daemon::conn`, with handlers slower
//! than both timeouts.)

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::{Config, Daemon, TempDir};
use serde_json::Value;

/// How much later than its deadline a close may come (a loaded 2-core
/// machine, a debug build); it may not come before.
const LATE: Duration = Duration::from_millis(900);

fn addr(d: &Daemon) -> SocketAddr {
    let hostport = d.url.split("://").nth(1).unwrap();
    hostport.parse().unwrap()
}

fn connect(d: &Daemon) -> TcpStream {
    TcpStream::connect(addr(d)).unwrap()
}

/// Reads until the server closes `s` (EOF, or a reset), at most `limit`;
/// returns how long after `since` that was. Anything read is dropped.
fn closed_at(s: &mut TcpStream, since: Instant, limit: Duration) -> Duration {
    let deadline = since + limit;
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "still open {limit:?} on");
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut buf) {
            Ok(0) => return since.elapsed(),
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return since.elapsed(),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => panic!("reading: {e}"),
        }
    }
}

/// Asserts that `at` is `deadline`, or up to [`LATE`] after it.
fn assert_closed_on_time(what: &str, at: Duration, deadline: Duration) {
    assert!(
        at >= deadline && at <= deadline + LATE,
        "{what}: closed after {at:?}, want {deadline:?} (at most {LATE:?} late)"
    );
}

/// An answer on a kept-alive connection.
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Sends `GET path` (kept alive) and reads its answer, which must have a
/// Content-Length.
fn get(s: &mut TcpStream, path: &str) -> Answer {
    write!(s, "GET {path} HTTP/1.1\r\nHost: forkd\r\n\r\n").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut got = Vec::new();
    let mut byte = [0u8; 1];
    while !got.ends_with(b"\r\n\r\n") {
        let n = s.read(&mut byte).unwrap();
        assert_eq!(n, 1, "closed inside an answer's head: {got:?}");
        got.push(byte[0]);
    }
    let head = String::from_utf8(got).unwrap();
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap().split(' ').nth(1).unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(": "))
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect();
    let mut answer = Answer {
        status: status.parse().unwrap(),
        headers,
        body: String::new(),
    };
    let len: usize = answer
        .header("content-length")
        .expect("a Content-Length")
        .parse()
        .unwrap();
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).unwrap();
    answer.body = String::from_utf8(body).unwrap();
    answer
}

#[test]
fn a_connection_stalled_before_its_headers_end_is_closed_after_the_header_timeout() {
    let tmp = TempDir::new("header-timeout");
    let d = Daemon::start(
        &tmp.path().join("state"),
        &Config {
            header_timeout_secs: Some(1),
            idle_timeout_secs: Some(10),
            ..Default::default()
        },
    );
    let timeout = Duration::from_secs(1);
    let started = Instant::now();
    let stalls = [
        ("silent", ""),
        ("half a request line", "GET /healthz HT"),
        (
            "headers without their end",
            "GET /healthz HTTP/1.1\r\nHost: forkd\r\n",
        ),
        ("half the HTTP/2 preface", "PRI * HTTP/2.0\r\n"),
    ];
    let mut open: Vec<_> = stalls
        .iter()
        .map(|(what, sent)| {
            let mut s = connect(&d);
            s.write_all(sent.as_bytes()).unwrap();
            (what, s)
        })
        .collect();
    // Headers sent a byte at a time, never ending: what was sent does not
    // move the deadline.
    let mut trickle = connect(&d);
    let mut writer = trickle.try_clone().unwrap();
    let dripping = std::thread::spawn(move || {
        writer
            .write_all(b"GET /healthz HTTP/1.1\r\nX-Slow: ")
            .unwrap();
        while writer.write_all(b"a").is_ok() {
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    for (what, s) in &mut open {
        let at = closed_at(s, started, Duration::from_secs(5));
        assert_closed_on_time(what, at, timeout);
    }
    let at = closed_at(&mut trickle, started, Duration::from_secs(5));
    assert_closed_on_time("headers sent a byte at a time", at, timeout);
    dripping.join().unwrap();
    // The daemon serves on.
    assert_eq!(d.expect("GET", "/version", None, 200)["api"], "v1");
}

#[test]
fn a_kept_alive_connection_is_closed_after_the_idle_timeout_not_the_header_timeout() {
    let tmp = TempDir::new("idle-timeout");
    let d = Daemon::start(
        &tmp.path().join("state"),
        &Config {
            header_timeout_secs: Some(1),
            idle_timeout_secs: Some(2),
            ..Default::default()
        },
    );
    let mut s = connect(&d);
    assert_eq!(get(&mut s, "/healthz").status, 200);
    // A gap longer than the header timeout, shorter than the idle one.
    std::thread::sleep(Duration::from_millis(1500));
    // The idle gap starts when the daemon has sent the answer, after this
    // and before the answer is read here.
    let asked = Instant::now();
    assert_eq!(get(&mut s, "/healthz").status, 200);
    let at = closed_at(&mut s, asked, Duration::from_secs(6));
    assert_closed_on_time("idle after an answer", at, Duration::from_secs(2));
}

#[test]
fn over_the_cap_a_connection_is_answered_503_and_closed_until_one_closes() {
    let tmp = TempDir::new("max-connections");
    let d = Daemon::start(
        &tmp.path().join("state"),
        &Config {
            max_connections: Some(4),
            ..Default::default()
        },
    );
    // Four connections, each served (so each holds its slot).
    let mut open: Vec<TcpStream> = (0..4)
        .map(|_| {
            let mut s = connect(&d);
            assert_eq!(get(&mut s, "/healthz").status, 200);
            s
        })
        .collect();

    let mut fifth = connect(&d);
    let refused = get(&mut fifth, "/healthz");
    assert_eq!(refused.status, 503, "{}", refused.body);
    assert_eq!(refused.header("connection"), Some("close"));
    assert_eq!(refused.header("content-type"), Some("application/json"));
    let body: Value = serde_json::from_str(&refused.body).unwrap();
    let error = body["error"].as_str().expect("the daemon's error body");
    assert_eq!(body.as_object().unwrap().len(), 1, "{body}");
    assert!(error.contains("--max-connections"), "{error}");
    let at = closed_at(&mut fifth, Instant::now(), Duration::from_secs(2));
    assert!(at < Duration::from_secs(1), "closed {at:?} after its 503");

    // The four are still served.
    for s in &mut open {
        assert_eq!(get(s, "/healthz").status, 200);
    }

    // Once one closes, a new connection is served (the daemon sees the
    // close a moment later).
    drop(open.pop());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut s = connect(&d);
        let answer = get(&mut s, "/version");
        if answer.status == 200 {
            break;
        }
        assert_eq!(answer.status, 503, "{}", answer.body);
        assert!(Instant::now() < deadline, "no slot came free");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_tls_handshake_that_never_completes_is_closed_after_the_header_timeout() {
    let tmp = TempDir::new("tls-timeout");
    let (cert_path, key_path, pem) = common::self_signed_tls(tmp.path());
    let d = Daemon::start(
        &tmp.path().join("state"),
        &Config {
            tls: Some((cert_path, key_path, pem)),
            header_timeout_secs: Some(1),
            ..Default::default()
        },
    );
    let started = Instant::now();
    // Nothing, and the start of a ClientHello record that never comes.
    let mut open: Vec<_> = [&b""[..], &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]]
        .into_iter()
        .map(|sent| {
            let mut s = connect(&d);
            s.write_all(sent).unwrap();
            s
        })
        .collect();
    for s in &mut open {
        let at = closed_at(s, started, Duration::from_secs(5));
        assert_closed_on_time("a TLS handshake", at, Duration::from_secs(1));
    }
    // A whole handshake and request are served.
    assert_eq!(d.expect("GET", "/version", None, 200)["api"], "v1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_connection_idle_after_its_answer_is_closed_after_the_idle_timeout() {
    let tmp = TempDir::new("h2-idle");
    let d = Daemon::start(
        &tmp.path().join("state"),
        &Config {
            header_timeout_secs: Some(1),
            idle_timeout_secs: Some(2),
            ..Default::default()
        },
    );
    let tcp = tokio::net::TcpStream::connect(addr(&d)).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    // Ends when the daemon closes the connection.
    let connection = tokio::spawn(connection);
    let mut client = client.ready().await.unwrap();
    let request = axum::http::Request::get(format!("{}/healthz", d.url))
        .body(())
        .unwrap();
    // As over HTTP/1.1, the idle gap starts after this.
    let asked = Instant::now();
    let (answer, _) = client.send_request(request, true).unwrap();
    let answer = answer.await.unwrap();
    assert_eq!(answer.status(), 200);
    let mut body = answer.into_body();
    while let Some(chunk) = body.data().await {
        chunk.unwrap();
    }
    tokio::time::timeout(Duration::from_secs(6), connection)
        .await
        .expect("still open 6 s on")
        .unwrap()
        .ok();
    assert_closed_on_time(
        "HTTP/2 idle after an answer",
        asked.elapsed(),
        Duration::from_secs(2),
    );
}
