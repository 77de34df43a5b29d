//! The client against fake agents that misbehave: every call must fail
//! with an error in bounded time and without unbounded allocation.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use agent_client::agent::{write_frame, Pong, Reply};
use agent_client::{Client, ClientConfig, ClientError, Target};

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A fake agent's socket, removed when the test is done with it.
struct Fake(PathBuf);

impl Drop for Fake {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Serves every connection with `behave` on a thread; returns the socket.
fn fake(behave: fn(UnixStream)) -> Fake {
    let path = std::env::temp_dir().join(format!(
        "forkd-fake-agent-{}-{}.sock",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_file(&path);
    let l = UnixListener::bind(&path).unwrap();
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            std::thread::spawn(move || behave(c));
        }
    });
    Fake(path)
}

fn quick() -> ClientConfig {
    ClientConfig {
        connect_timeout: Duration::from_secs(1),
        io_timeout: Duration::from_millis(300),
        request_timeout: Duration::from_secs(1),
        transfer_timeout: Duration::from_secs(1),
        grace: Duration::from_millis(500),
        ..ClientConfig::default()
    }
}

fn drain_request(c: &mut UnixStream) {
    let mut h = [0u8; 8];
    c.read_exact(&mut h).unwrap();
    let n = u32::from_le_bytes(h[0..4].try_into().unwrap())
        + u32::from_le_bytes(h[4..8].try_into().unwrap());
    let mut b = vec![0u8; n as usize];
    c.read_exact(&mut b).unwrap();
}

fn bounded<T: std::fmt::Debug>(max: Duration, f: impl FnOnce() -> T) -> T {
    let start = Instant::now();
    let r = f();
    assert!(start.elapsed() < max, "took {:?}: {r:?}", start.elapsed());
    r
}

#[test]
fn huge_length_is_refused_without_allocating() {
    let f = fake(|mut c| {
        drain_request(&mut c);
        let _ = c.write_all(&[0xff; 8]);
        std::thread::sleep(Duration::from_secs(5));
    });
    let c = Client::with_config(Target::Unix(f.0.clone()), quick());
    let e = bounded(Duration::from_secs(2), || c.ping()).unwrap_err();
    assert!(matches!(e, ClientError::Frame { .. }), "{e}");
    assert!(e.to_string().contains("exceeds"), "{e}");
}

#[test]
fn silent_agent_times_out() {
    let f = fake(|mut c| {
        drain_request(&mut c);
        std::thread::sleep(Duration::from_secs(10));
    });
    let c = Client::with_config(Target::Unix(f.0.clone()), quick());
    let e = bounded(Duration::from_secs(3), || c.ping()).unwrap_err();
    assert!(e.is_timeout(), "{e}");
    let e = bounded(Duration::from_secs(3), || {
        c.eval("1", Duration::from_millis(100))
    })
    .unwrap_err();
    assert!(e.is_timeout(), "{e}");
}

#[test]
fn trickling_agent_is_cut_at_the_deadline() {
    // One byte every 100 ms: each read succeeds, the whole never ends.
    let f = fake(|mut c| {
        drain_request(&mut c);
        let mut h = Vec::new();
        h.extend_from_slice(&1000u32.to_le_bytes());
        h.extend_from_slice(&0u32.to_le_bytes());
        h.extend(std::iter::repeat_n(b' ', 1000));
        for b in h {
            if c.write_all(&[b]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    let c = Client::with_config(Target::Unix(f.0.clone()), quick());
    let e = bounded(Duration::from_secs(3), || c.ping()).unwrap_err();
    assert!(e.is_timeout(), "{e}");
}

#[test]
fn endless_exec_output_is_bounded_by_the_deadline_and_the_limit() {
    let f = fake(|mut c| {
        drain_request(&mut c);
        let chunk = vec![b'x'; 64 * 1024];
        while write_frame(&mut c, &Reply::Stdout, &chunk).is_ok() {}
    });
    let c = Client::with_config(Target::Unix(f.0.clone()), quick());
    let req = agent_client::agent::ExecRequest {
        timeout_ms: 500,
        ..agent_client::agent::ExecRequest::new(vec!["yes".into()])
    };
    let e = bounded(Duration::from_secs(3), || c.exec(&req, b"", |_, _| true)).unwrap_err();
    assert!(e.is_timeout(), "{e}");
    let e = bounded(Duration::from_secs(3), || {
        c.exec_collect(&req, b"", 1 << 20)
    })
    .unwrap_err();
    assert!(matches!(e, ClientError::TooLarge { .. }), "{e}");
}

#[test]
fn read_beyond_the_announced_size_is_a_protocol_error() {
    let f = fake(|mut c| {
        drain_request(&mut c);
        let _ = write_frame(&mut c, &Reply::File { size: 4 }, &[]);
        let _ = write_frame(&mut c, &Reply::Data, b"12345678");
    });
    let c = Client::with_config(Target::Unix(f.0.clone()), quick());
    let e = bounded(Duration::from_secs(2), || c.read("/x", 100)).unwrap_err();
    assert!(matches!(e, ClientError::Protocol { .. }), "{e}");
}

#[test]
fn vsock_handshake() {
    // A fake forkd-vmm vsock socket: CONNECT line, OK line, then the agent.
    let f = fake(|mut c| {
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        while c.read(&mut b).unwrap() == 1 && b[0] != b'\n' {
            line.push(b[0]);
        }
        if line == b"CONNECT 1024" {
            c.write_all(b"OK 1073741824\n").unwrap();
            drain_request(&mut c);
            let pong = Reply::Pong(Pong {
                version: "x".into(),
                protocol: 1,
                uptime_ms: 1,
                interpreter_ready: false,
                interpreter_error: None,
                guest: "guest: fake".into(),
                pid: None,
            });
            write_frame(&mut c, &pong, &[]).unwrap();
        } else {
            c.write_all(b"ERROR no\n").unwrap();
        }
    });
    let ok = Client::with_config(
        Target::Vsock {
            uds: f.0.clone(),
            port: 1024,
        },
        quick(),
    );
    assert_eq!(ok.ping().unwrap().guest, "guest: fake");
    let bad = Client::with_config(
        Target::Vsock {
            uds: f.0.clone(),
            port: 7,
        },
        quick(),
    );
    let e = bad.ping().unwrap_err();
    assert!(matches!(e, ClientError::Handshake { .. }), "{e}");

    // A socket that never answers the handshake.
    let f = fake(|_c| std::thread::sleep(Duration::from_secs(10)));
    let c = Client::with_config(
        Target::Vsock {
            uds: f.0.clone(),
            port: 1024,
        },
        quick(),
    );
    let e = bounded(Duration::from_secs(3), || c.ping()).unwrap_err();
    assert!(matches!(e, ClientError::Handshake { .. }), "{e}");
}

#[test]
fn missing_socket_is_a_connect_error() {
    let c = Client::new(Target::Unix("/nonexistent/forkd.sock".into()));
    let e = c.ping().unwrap_err();
    assert!(matches!(e, ClientError::Connect { .. }), "{e}");
    assert!(e.to_string().contains("is the VM"), "{e}");
}
