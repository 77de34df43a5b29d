//! Protocol 2 against the agent running as a host process: interactive
//! sessions, terminals, background processes, `user`, and mkdir, remove
//! and rename. Runs as root (as CI does): `user` switches users.

mod common;

use std::time::{Duration, Instant};

use agent_client::agent::{ErrorCode, ExecRequest, PtySize, PROTOCOL_VERSION};
use agent_client::{ClientError, Event, SessionReader, Stream};

fn agent() -> common::Agent {
    common::agent(&["--no-interpreter"])
}

fn req(args: &[&str]) -> ExecRequest {
    ExecRequest {
        timeout_ms: 20_000,
        ..ExecRequest::new(args.iter().map(|s| s.to_string()).collect())
    }
}

/// Output until the exit: (stdout, stderr, status).
fn drain(r: &mut SessionReader) -> (Vec<u8>, Vec<u8>, agent_client::agent::ExitStatus) {
    let (mut out, mut err) = (Vec::new(), Vec::new());
    loop {
        match r.next_event().unwrap() {
            Event::Output(Stream::Stdout, d) => out.extend(d),
            Event::Output(Stream::Stderr, d) => err.extend(d),
            Event::Exit(s) => return (out, err, s),
        }
    }
}

/// Reads until `needle` has appeared in the output.
fn read_until(r: &mut SessionReader, got: &mut Vec<u8>, needle: &str) {
    while !String::from_utf8_lossy(got).contains(needle) {
        match r.next_event().unwrap() {
            Event::Output(_, d) => got.extend(d),
            Event::Exit(s) => panic!(
                "exited ({s:?}) before {needle:?}; output: {}",
                String::from_utf8_lossy(got)
            ),
        }
    }
}

fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid, 0) == 0 }
}

#[test]
fn ping_says_protocol_2() {
    let a = agent();
    assert_eq!(a.client().ping().unwrap().protocol, PROTOCOL_VERSION);
    assert_eq!(PROTOCOL_VERSION, 2);
}

#[test]
fn a_session_streams_stdin_in_and_output_out_while_it_runs() {
    let a = agent();
    let c = a.client();
    let (pid, mut r, mut w) = c.session(&req(&["cat"]), b"first\n").unwrap();
    assert!(pid > 0 && alive(pid));
    let mut got = Vec::new();
    // The first line comes back before stdin is closed: it is a stream.
    read_until(&mut r, &mut got, "first\n");
    w.stdin(b"second\n").unwrap();
    read_until(&mut r, &mut got, "second\n");
    w.close_stdin().unwrap();
    let (rest, _, status) = drain(&mut r);
    got.extend(rest);
    assert_eq!(got, b"first\nsecond\n");
    assert_eq!(status.code, Some(0));
    // Forgotten once collected.
    assert!(c.procs().unwrap().iter().all(|p| p.pid != pid));

    // The first line of a slow loop arrives before the loop ends.
    let start = Instant::now();
    let (_, mut r, _w) = c
        .session(
            &req(&["sh", "-c", "for i in 1 2 3; do echo $i; sleep 1; done"]),
            b"",
        )
        .unwrap();
    let mut got = Vec::new();
    read_until(&mut r, &mut got, "1\n");
    let first = start.elapsed();
    assert!(
        first < Duration::from_millis(900),
        "first line after {first:?}"
    );
    let (rest, _, status) = drain(&mut r);
    got.extend(rest);
    assert_eq!(got, b"1\n2\n3\n");
    assert_eq!(status.code, Some(0));
    assert!(start.elapsed() >= Duration::from_secs(2));
}

#[test]
fn a_session_takes_env_cwd_signals_and_ends_with_its_connection() {
    let a = agent();
    let c = a.client();
    let mut q = req(&["sh", "-c", "echo $GREETING; pwd"]);
    q.env.insert("GREETING".into(), "hi there".into());
    q.cwd = Some(a.dir.to_string_lossy().into_owned());
    let (_, mut r, _w) = c.session(&q, b"").unwrap();
    let (out, _, _) = drain(&mut r);
    assert_eq!(
        String::from_utf8(out).unwrap(),
        format!("hi there\n{}\n", a.dir.display())
    );

    let (pid, mut r, mut w) = c.session(&req(&["sleep", "30"]), b"").unwrap();
    w.signal(libc::SIGTERM).unwrap();
    let (_, _, status) = drain(&mut r);
    assert_eq!((status.code, status.signal), (None, Some(libc::SIGTERM)));
    assert!(w.signal(0).is_err(), "signal 0 is refused before sending");

    // Closing the connection kills the process group.
    let (pid2, r, w) = c.session(&req(&["sleep", "30"]), b"").unwrap();
    drop((r, w));
    let start = Instant::now();
    while alive(pid2) {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{pid2} outlived its session"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_ne!(pid, pid2);
}

#[test]
fn a_detached_session_goes_on_and_wait_collects_it() {
    let a = agent();
    let c = a.client();
    let mut q = req(&["sh", "-c", "echo before; sleep 1; echo after"]);
    q.detach_on_close = true;
    let (pid, mut r, w) = c.session(&q, b"").unwrap();
    let mut got = Vec::new();
    read_until(&mut r, &mut got, "before\n");
    drop((r, w));
    std::thread::sleep(Duration::from_millis(200));
    let listed = c.procs().unwrap();
    let p = listed
        .iter()
        .find(|p| p.pid == pid)
        .expect("listed after detach");
    assert!(p.running, "{p:?}");
    let mut out = Vec::new();
    let status = c
        .wait(pid, Duration::from_secs(10), |_, d| {
            out.extend_from_slice(d);
            true
        })
        .unwrap();
    assert_eq!(out, b"after\n");
    assert_eq!(status.code, Some(0));
}

#[test]
fn background_processes_are_listed_fed_signalled_and_waited_for() {
    let a = agent();
    let c = a.client();
    let mut q = req(&["cat"]);
    q.timeout_ms = 0; // no deadline
    let cat = c.spawn(&q, b"abc").unwrap();
    let sleeper = c
        .spawn(&req(&["sh", "-c", "echo started; exec sleep 30"]), b"")
        .unwrap();
    let procs = c.procs().unwrap();
    for pid in [cat, sleeper] {
        let p = procs.iter().find(|p| p.pid == pid).unwrap();
        assert!(p.running && !p.pty && p.exit.is_none(), "{p:?}");
    }
    assert_eq!(
        procs.iter().find(|p| p.pid == sleeper).unwrap().args[0],
        "sh"
    );

    c.stdin(cat, b"def", true).unwrap();
    let mut out = Vec::new();
    let s = c
        .wait(cat, Duration::from_secs(10), |_, d| {
            out.extend_from_slice(d);
            true
        })
        .unwrap();
    assert_eq!((out.as_slice(), s.code), (&b"abcdef"[..], Some(0)));

    // Output is kept while nobody waits, and handed to the first wait; a
    // wait that runs out of time leaves the process running.
    let mut out = Vec::new();
    let e = c
        .wait(sleeper, Duration::from_millis(300), |_, d| {
            out.extend_from_slice(d);
            true
        })
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
    assert_eq!(out, b"started\n");
    assert!(alive(sleeper));
    c.signal(sleeper, libc::SIGKILL).unwrap();
    let mut out = Vec::new();
    let s = c
        .wait(sleeper, Duration::from_secs(10), |_, d| {
            out.extend_from_slice(d);
            true
        })
        .unwrap();
    assert!(out.is_empty(), "output is delivered once");
    assert_eq!(s.signal, Some(libc::SIGKILL));

    // Collected processes are forgotten; unknown pids are not found.
    for e in [
        c.wait(cat, Duration::from_secs(1), |_, _| true)
            .unwrap_err(),
        c.signal(1, libc::SIGTERM).unwrap_err(),
        c.stdin(sleeper, b"x", false).unwrap_err(),
    ] {
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
    let e = c.signal(cat, 0).unwrap_err();
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

#[test]
fn a_forgotten_process_keeps_only_the_newest_output() {
    let a = agent();
    let c = a.client();
    let pid = c
        .spawn(
            &req(&["sh", "-c", "head -c 3145728 /dev/zero; echo tail"]),
            b"",
        )
        .unwrap();
    let start = Instant::now();
    while c.procs().unwrap().iter().any(|p| p.pid == pid && p.running) {
        assert!(start.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(20));
    }
    let kept = c
        .procs()
        .unwrap()
        .iter()
        .find(|p| p.pid == pid)
        .unwrap()
        .kept_bytes;
    assert!(kept <= agent_client::agent::BG_OUTPUT_MAX as u64, "{kept}");
    let mut out = Vec::new();
    let s = c
        .wait(pid, Duration::from_secs(10), |_, d| {
            out.extend_from_slice(d);
            true
        })
        .unwrap();
    assert!(out.ends_with(b"tail\n"));
    assert_eq!(out.len() as u64 + s.dropped_bytes, 3 * 1024 * 1024 + 5);
    assert!(s.dropped_bytes >= 2 * 1024 * 1024, "{s:?}");
}

#[test]
fn a_terminal_session_runs_an_interactive_shell_and_resizes() {
    let a = agent();
    let c = a.client();
    let mut q = req(&["sh", "-i"]);
    q.pty = Some(PtySize {
        rows: 30,
        cols: 100,
    });
    q.env.insert("PS1".into(), "$ ".into());
    let (_, mut r, mut w) = c.session(&q, b"").unwrap();
    let mut got = Vec::new();
    w.stdin(b"tty; stty size; echo $((6*7))\n").unwrap();
    read_until(&mut r, &mut got, "42");
    let text = String::from_utf8_lossy(&got).into_owned();
    assert!(text.contains("/dev/pts/"), "{text}");
    assert!(text.contains("30 100"), "{text}");
    w.resize(PtySize {
        rows: 50,
        cols: 132,
    })
    .unwrap();
    w.stdin(b"stty size\n").unwrap();
    read_until(&mut r, &mut got, "50 132");
    w.stdin(b"exit 3\n").unwrap();
    let (_, err, status) = drain(&mut r);
    assert!(err.is_empty(), "a terminal has no separate stderr");
    assert_eq!(status.code, Some(3));
    assert!(w.resize(PtySize { rows: 0, cols: 10 }).is_err());
}

#[test]
fn user_runs_the_process_as_that_user() {
    assert_eq!(
        // SAFETY: getuid has no preconditions.
        unsafe { libc::getuid() },
        0,
        "this test switches users: run it as root (CI does)"
    );
    let a = agent();
    let c = a.client();
    let mut q = req(&["sh", "-c", "id -u; id -g; echo $HOME"]);
    q.user = Some("nobody".into());
    let o = c.exec_collect(&q, b"", 1 << 16).unwrap();
    let text = String::from_utf8(o.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "65534", "{text}");
    q.user = Some("4242".into());
    let o = c.exec_collect(&q, b"", 1 << 16).unwrap();
    assert_eq!(String::from_utf8(o.stdout).unwrap(), "4242\n4242\n/\n");
    q.user = Some("no-such-user".into());
    let e = c.exec_collect(&q, b"", 1 << 16).unwrap_err();
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
    // A bad name is refused by the client before sending, and by the
    // agent when a host sends it anyway.
    q.user = Some("a:b".into());
    assert!(matches!(
        c.exec_collect(&q, b"", 1 << 16).unwrap_err(),
        ClientError::Invalid { .. }
    ));
    let mut conn = std::os::unix::net::UnixStream::connect(&a.sock).unwrap();
    let raw = r#"{"op":"exec","args":["id"],"user":"a:b"}"#;
    proto::agent::write_raw_frame(&mut conn, raw.as_bytes(), b"").unwrap();
    let f = proto::agent::read_frame(&mut conn, proto::agent::MAX_FRAME).unwrap();
    let v: serde_json::Value = f.parse().unwrap();
    assert_eq!(
        (v["kind"].as_str(), v["code"].as_str()),
        (Some("error"), Some("bad_request")),
        "{v}"
    );
}

#[test]
fn mkdir_remove_and_rename() {
    let a = agent();
    let c = a.client();
    let base = a.dir.join("tree");
    let p = |s: &str| base.join(s).to_string_lossy().into_owned();
    c.mkdir(&p("x/y/z"), true, 0o750).unwrap();
    assert!(base.join("x/y/z").is_dir());
    let code = |e: ClientError| match e {
        ClientError::Agent { code, .. } => code,
        e => panic!("{e}"),
    };
    assert_eq!(
        code(c.mkdir(&p("x/y/z"), false, 0o755).unwrap_err()),
        ErrorCode::Io
    );
    c.mkdir(&p("x/y/z"), true, 0o755).unwrap();
    assert_eq!(
        code(c.mkdir(&p("none/a"), false, 0o755).unwrap_err()),
        ErrorCode::NotFound
    );
    c.write(&p("x/y/z/f"), b"data").unwrap();
    c.rename(&p("x/y/z/f"), &p("x/g")).unwrap();
    assert_eq!(std::fs::read(base.join("x/g")).unwrap(), b"data");
    assert_eq!(
        code(c.rename(&p("x/y/z/f"), &p("x/h")).unwrap_err()),
        ErrorCode::NotFound
    );
    let e = c.remove(&p("x"), false).unwrap_err();
    assert!(e.to_string().contains("recursive"), "{e}");
    c.remove(&p("x/g"), false).unwrap();
    c.remove(&p("x"), true).unwrap();
    assert!(!base.join("x").exists());
    assert_eq!(
        code(c.remove(&p("x"), false).unwrap_err()),
        ErrorCode::NotFound
    );
    assert_eq!(
        code(c.remove("relative", false).unwrap_err()),
        ErrorCode::BadRequest
    );
    assert_eq!(
        code(c.remove("/", true).unwrap_err()),
        ErrorCode::BadRequest
    );
}

#[test]
fn a_session_takes_stdin_by_pid_from_another_connection() {
    let a = agent();
    let c = a.client();
    let (pid, mut r, _w) = c.session(&req(&["sh", "-c", "echo go; cat"]), b"").unwrap();
    let mut got = Vec::new();
    read_until(&mut r, &mut got, "go\n");
    c.stdin(pid, b"by pid\n", false).unwrap();
    read_until(&mut r, &mut got, "by pid\n");
    c.stdin(pid, b"", true).unwrap();
    let (rest, _, status) = drain(&mut r);
    got.extend(rest);
    assert_eq!(got, b"go\nby pid\n");
    assert_eq!(status.code, Some(0));
}
