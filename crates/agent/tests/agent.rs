//! The agent as a normal process on a Unix socket, driven by the host client.

mod common;

use std::io::Read;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use agent_client::agent::{ErrorCode, ExecRequest, WriteRequest, MAX_FRAME};
use agent_client::{ClientError, Stream};
use common::agent;

fn exec_req(args: &[&str], timeout_ms: u64) -> ExecRequest {
    ExecRequest {
        timeout_ms,
        ..ExecRequest::new(args.iter().map(|s| s.to_string()).collect())
    }
}

#[test]
fn ping_reports_version_and_warm_interpreter() {
    let a = agent(&["--warm", "import json"]);
    let c = a.client();
    let start = Instant::now();
    loop {
        let p = c.ping().unwrap();
        assert_eq!(p.guest, "guest: linux");
        assert_eq!(p.version, env!("CARGO_PKG_VERSION"));
        if p.interpreter_ready {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "interpreter never ready: {p:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn exec_streams_output_before_the_process_ends() {
    let a = agent(&["--no-interpreter"]);
    let c = a.client();
    let start = Instant::now();
    let mut first: Option<Duration> = None;
    let mut out = Vec::new();
    let status = c
        .exec(
            &exec_req(&["sh", "-c", "echo first; sleep 1.5; echo second"], 10_000),
            b"",
            |s, d| {
                assert_eq!(s, Stream::Stdout);
                first.get_or_insert(start.elapsed());
                out.extend_from_slice(d);
                true
            },
        )
        .unwrap();
    assert_eq!(out, b"first\nsecond\n");
    assert_eq!(status.code, Some(0));
    let first = first.unwrap();
    assert!(
        first < Duration::from_millis(1000),
        "first chunk after {first:?}"
    );
    assert!(start.elapsed() >= Duration::from_millis(1500));
}

#[test]
fn exec_stdin_env_cwd_exit_codes_and_signals() {
    let a = agent(&["--no-interpreter"]);
    let c = a.client();
    let o = c
        .exec_collect(&exec_req(&["cat"], 10_000), b"hello stdin", 1 << 20)
        .unwrap();
    assert_eq!(o.stdout, b"hello stdin");
    assert_eq!(o.status.code, Some(0));

    let mut r = exec_req(
        &["sh", "-c", "echo $FOO; pwd; echo oops >&2; exit 7"],
        10_000,
    );
    r.env.insert("FOO".into(), "bar".into());
    r.cwd = Some(a.dir.to_string_lossy().into_owned());
    let o = c.exec_collect(&r, b"", 1 << 20).unwrap();
    assert_eq!(
        String::from_utf8(o.stdout).unwrap(),
        format!("bar\n{}\n", a.dir.display())
    );
    assert_eq!(o.stderr, b"oops\n");
    assert_eq!(
        (o.status.code, o.status.signal, o.status.timed_out),
        (Some(7), None, false)
    );

    let o = c
        .exec_collect(&exec_req(&["sh", "-c", "kill -TERM $$"], 10_000), b"", 1024)
        .unwrap();
    assert_eq!(
        (o.status.code, o.status.signal),
        (None, Some(libc_sigterm()))
    );

    let e = c
        .exec_collect(&exec_req(&["/no/such/program"], 10_000), b"", 1024)
        .unwrap_err();
    assert!(
        matches!(
            e,
            ClientError::Agent {
                code: ErrorCode::NotFound,
                ..
            }
        ),
        "{e}"
    );
}

fn libc_sigterm() -> i32 {
    15
}

#[test]
fn exec_timeout_kills_the_process_group() {
    let a = agent(&["--no-interpreter"]);
    let c = a.client();
    let marker = a.dir.join("survived");
    let script = format!("(sleep 2; touch {}) & sleep 30", marker.display());
    let start = Instant::now();
    let o = c
        .exec_collect(&exec_req(&["sh", "-c", &script], 500), b"", 1024)
        .unwrap();
    assert!(o.status.timed_out);
    assert_eq!(o.status.signal, Some(9));
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "took {:?}",
        start.elapsed()
    );
    std::thread::sleep(Duration::from_millis(2500));
    assert!(
        !marker.exists(),
        "a process of the group outlived the timeout"
    );
}

#[test]
fn exec_large_stdout_streams_in_bounded_frames() {
    let a = agent(&["--no-interpreter"]);
    let c = a.client();
    let mut total = 0u64;
    let mut biggest = 0usize;
    let status = c
        .exec(
            &exec_req(&["head", "-c", "52428800", "/dev/zero"], 60_000),
            b"",
            |_, d| {
                total += d.len() as u64;
                biggest = biggest.max(d.len());
                true
            },
        )
        .unwrap();
    assert_eq!(status.code, Some(0));
    assert_eq!(total, 50 << 20);
    assert!(biggest <= MAX_FRAME);
    // The collecting call stops at its limit instead of growing.
    let e = c
        .exec_collect(
            &exec_req(&["head", "-c", "52428800", "/dev/zero"], 60_000),
            b"",
            1 << 20,
        )
        .unwrap_err();
    assert!(matches!(e, ClientError::TooLarge { .. }), "{e}");
}

#[test]
fn eval_keeps_state_and_reports_exceptions() {
    let a = agent(&["--warm", "import math\nWARM = 'yes'"]);
    let c = a.client();
    let t = Duration::from_secs(20);
    assert_eq!(c.eval("WARM", t).unwrap().result.as_deref(), Some("'yes'"));
    let r = c.eval("x = 20\ndef f(y):\n    return x + y", t).unwrap();
    assert_eq!((r.result, r.error, r.exit_code), (None, None, 0));
    let r = c.eval("print('side'); f(22)", t).unwrap();
    assert_eq!(r.result.as_deref(), Some("42"));
    assert_eq!(r.stdout, "side\n");
    assert_eq!(
        c.eval("math.isqrt(x * 5)", t).unwrap().result.as_deref(),
        Some("10")
    );
    let r = c.eval("undefined_name + 1", t).unwrap();
    assert_eq!(r.exit_code, 1);
    assert!(r.error.as_deref().unwrap().contains("NameError"), "{r:?}");
    assert!(
        !r.error.as_deref().unwrap().contains("_forkd_driver"),
        "{r:?}"
    );
    let r = c.eval("import sys; sys.exit(4)", t).unwrap();
    assert_eq!((r.exit_code, r.error), (4, None));
    // Still alive, state intact.
    assert_eq!(c.eval("x", t).unwrap().result.as_deref(), Some("20"));
}

#[test]
fn eval_timeout_interrupts_and_keeps_state() {
    let a = agent(&[]);
    let c = a.client();
    let t = Duration::from_secs(20);
    c.eval("kept = 5", t).unwrap();
    let start = Instant::now();
    let r = c
        .eval(
            "import time\nwhile True: time.sleep(0.01)",
            Duration::from_millis(500),
        )
        .unwrap();
    assert_eq!(r.exit_code, 1);
    assert!(r.error.unwrap().contains("timeout"));
    assert!(start.elapsed() < Duration::from_secs(4));
    assert_eq!(c.eval("kept", t).unwrap().result.as_deref(), Some("5"));
}

fn fnv(data: &mut dyn Read) -> (u64, u64) {
    let mut h: u64 = 0xcbf29ce484222325;
    let mut buf = vec![0u8; 1 << 16];
    let mut n = 0u64;
    loop {
        let k = data.read(&mut buf).unwrap();
        if k == 0 {
            return (h, n);
        }
        n += k as u64;
        for b in &buf[..k] {
            h ^= *b as u64;
            h = h.wrapping_mul(0x100000001b3);
        }
    }
}

/// A deterministic pseudo-random byte stream of `len` bytes.
struct Pattern {
    state: u64,
    left: u64,
}

impl Read for Pattern {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = (buf.len() as u64).min(self.left) as usize;
        for b in &mut buf[..n] {
            self.state ^= self.state << 13;
            self.state ^= self.state >> 7;
            self.state ^= self.state << 17;
            *b = self.state as u8;
        }
        self.left -= n as u64;
        Ok(n)
    }
}

#[test]
fn file_100_mib_round_trip() {
    let a = agent(&["--no-interpreter"]);
    let c = a.client();
    let size = 100u64 << 20;
    let (want, _) = fnv(&mut Pattern {
        state: 7,
        left: size,
    });
    let path = a.dir.join("sub/big.bin");
    let req = WriteRequest {
        path: path.to_string_lossy().into_owned(),
        mode: 0o600,
        append: false,
        create_dirs: true,
    };
    assert_eq!(
        c.write_from(
            &req,
            &mut Pattern {
                state: 7,
                left: size
            }
        )
        .unwrap(),
        size
    );
    let st = c.stat(&req.path, true).unwrap();
    assert_eq!((st.size, st.mode), (size, 0o600));
    // Back through the protocol, hashed as it streams.
    struct Hasher(u64, u64);
    impl std::io::Write for Hasher {
        fn write(&mut self, d: &[u8]) -> std::io::Result<usize> {
            for b in d {
                self.0 ^= *b as u64;
                self.0 = self.0.wrapping_mul(0x100000001b3);
            }
            self.1 += d.len() as u64;
            Ok(d.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut h = Hasher(0xcbf29ce484222325, 0);
    assert_eq!(c.read_to(&req.path, 0, size, &mut h).unwrap(), size);
    assert_eq!((h.0, h.1), (want, size));
    // A limit below the size is refused before any data moves.
    let e = c.read(&req.path, size - 1).unwrap_err();
    assert!(
        matches!(
            e,
            ClientError::Agent {
                code: ErrorCode::TooLarge,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn small_files_list_and_stat() {
    let a = agent(&["--no-interpreter"]);
    let c = a.client();
    let d = a.dir.to_string_lossy().into_owned();
    c.write(&format!("{d}/a.txt"), b"abc").unwrap();
    c.write(&format!("{d}/b.txt"), b"").unwrap();
    assert_eq!(c.read(&format!("{d}/a.txt"), 10).unwrap(), b"abc");
    assert_eq!(c.read(&format!("{d}/b.txt"), 10).unwrap(), b"");
    let l = c.list(&d, 100).unwrap();
    let mut names: Vec<_> = l.entries.iter().map(|e| e.name.clone()).collect();
    names.sort();
    assert_eq!(names, ["a.txt", "agent.sock", "b.txt"]);
    assert!(!l.truncated);
    let l = c.list(&d, 1).unwrap();
    assert_eq!((l.entries.len(), l.truncated), (1, true));
    let e = c.stat(&format!("{d}/nope"), true).unwrap_err();
    assert!(
        matches!(
            e,
            ClientError::Agent {
                code: ErrorCode::NotFound,
                ..
            }
        ),
        "{e}"
    );
    let e = c.read("relative/path", 10).unwrap_err();
    assert!(
        matches!(
            e,
            ClientError::Agent {
                code: ErrorCode::BadRequest,
                ..
            }
        ),
        "{e}"
    );
}

/// Raw frames, to send what the client never would.
fn raw(sock: &PathBuf, bytes: &[u8]) -> Vec<serde_json::Value> {
    use std::io::Write;
    let mut s = std::os::unix::net::UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(bytes).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut out = Vec::new();
    let mut all = Vec::new();
    let _ = s.read_to_end(&mut all);
    let mut rest = &all[..];
    while let Ok(f) = agent_client::agent::read_frame(&mut rest, MAX_FRAME) {
        out.push(f.parse().unwrap());
    }
    out
}

fn frame(json: &[u8], data_len: u32) -> Vec<u8> {
    let mut v = (json.len() as u32).to_le_bytes().to_vec();
    v.extend_from_slice(&data_len.to_le_bytes());
    v.extend_from_slice(json);
    v
}

#[test]
fn malformed_oversized_and_unknown_requests_are_refused_and_the_agent_keeps_serving() {
    let a = agent(&["--no-interpreter"]);
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (frame(b"this is not json", 0), "bad_request"),
        (frame(b"[1,2]", 0), "bad_request"),
        (frame(br#"{"op":"exec"}"#, 0), "bad_request"),
        (frame(br#"{"op":"teleport"}"#, 0), "unsupported"),
        (frame(br#"{"op":"ping"}"#, 0)[..6].to_vec(), "bad_request"),
        (
            {
                let mut v = (2u32).to_le_bytes().to_vec();
                v.extend_from_slice(&(u32::MAX - 1).to_le_bytes());
                v
            },
            "bad_request",
        ),
        (
            (MAX_FRAME as u32 + 1)
                .to_le_bytes()
                .iter()
                .chain(&0u32.to_le_bytes())
                .copied()
                .collect(),
            "bad_request",
        ),
    ];
    for (bytes, code) in cases {
        let answers = raw(&a.sock, &bytes);
        assert_eq!(answers.len(), 1, "{answers:?}");
        assert_eq!(answers[0]["kind"], "error", "{answers:?}");
        assert_eq!(answers[0]["code"], code, "{answers:?}");
        a.client().ping().unwrap();
    }
    let answers = raw(&a.sock, &frame(br#"{"op":"teleport"}"#, 0));
    assert!(answers[0]["message"]
        .as_str()
        .unwrap()
        .contains("not supported"));
}

#[test]
fn poweroff_ends_a_host_agent() {
    let mut a = agent(&[]);
    a.client().eval("1", Duration::from_secs(20)).unwrap();
    a.client().poweroff().unwrap();
    let start = Instant::now();
    loop {
        if let Some(s) = a.child.try_wait().unwrap() {
            assert!(s.success());
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "agent did not exit"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn eval_that_ignores_the_interrupt_is_killed_and_the_interpreter_restarts() {
    let a = agent(&["--warm", "WARM = 1"]);
    let c = a.client();
    let t = Duration::from_secs(20);
    c.eval("lost = 1", t).unwrap();
    let e = c
        .eval(
            "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True: pass",
            Duration::from_millis(300),
        )
        .unwrap_err();
    assert!(
        matches!(
            e,
            ClientError::Agent {
                code: ErrorCode::Timeout,
                ..
            }
        ),
        "{e}"
    );
    // A fresh interpreter, warmed again, without the old state.
    assert_eq!(c.eval("WARM", t).unwrap().result.as_deref(), Some("1"));
    let r = c.eval("lost", t).unwrap();
    assert!(r.error.unwrap().contains("NameError"));
}
