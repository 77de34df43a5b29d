//! Host tests: the built-in guest answers the agent protocol over
//! virtio-vsock (through forkd-vmm's vsock Unix socket), beside its mailbox.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use agent_client::{Client, ClientConfig, ClientError, Target};
use common::{
    fork_children, start_vsock_vm, vsock_connect as connect, wait_for_socket, ControlledVm,
    TempDir, TestVm,
};
use proto::agent::{
    read_frame, write_raw_frame, ErrorCode, ExecRequest, DEFAULT_VSOCK_PORT, MAX_FRAME,
};
use proto::control::{ControlRequest, ControlResponse};
use proto::guest::{GuestRequest, GuestResponse};
use serde_json::{json, Value};

fn client(uds: &Path) -> Client {
    Client::with_config(
        Target::Vsock {
            uds: uds.to_owned(),
            port: DEFAULT_VSOCK_PORT,
        },
        ClientConfig {
            request_timeout: Duration::from_secs(20),
            io_timeout: Duration::from_secs(20),
            ..ClientConfig::default()
        },
    )
}

/// Reads frames until the guest closes its side; returns (JSON, data) pairs.
fn read_all(s: &mut UnixStream) -> Vec<(Value, Vec<u8>)> {
    let mut frames = Vec::new();
    loop {
        match read_frame(s, MAX_FRAME) {
            Ok(f) => frames.push((serde_json::from_slice(&f.json).unwrap(), f.data)),
            Err(proto::agent::FrameError::Closed) => return frames,
            Err(e) => panic!("reading the guest's frames: {e} (after {frames:?})"),
        }
    }
}

/// Sends raw bytes as one connection's request; returns the answer frames.
fn raw(uds: &Path, bytes: &[u8]) -> Vec<(Value, Vec<u8>)> {
    let mut s = connect(uds);
    s.write_all(bytes).unwrap();
    read_all(&mut s)
}

/// Sends `request` as a frame; returns the single answer frame's JSON.
fn call(uds: &Path, request: Value) -> Value {
    let mut s = connect(uds);
    write_raw_frame(&mut s, request.to_string().as_bytes(), b"").unwrap();
    let mut frames = read_all(&mut s);
    assert_eq!(frames.len(), 1, "one answer frame: {frames:?}");
    frames.remove(0).0
}

fn frame_bytes(json: &[u8], data: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&(json.len() as u32).to_le_bytes());
    b.extend_from_slice(&(data.len() as u32).to_le_bytes());
    b.extend_from_slice(json);
    b.extend_from_slice(data);
    b
}

fn exec(c: &Client, args: &[&str]) -> agent_client::ExecOutput {
    let req = ExecRequest {
        timeout_ms: 5_000,
        ..ExecRequest::new(args.iter().map(|a| a.to_string()).collect())
    };
    c.exec_collect(&req, b"", 1 << 20).unwrap()
}

fn control_identity(vm: &mut TestVm) -> (u64, u64) {
    match vm.guest(GuestRequest::Identity) {
        GuestResponse::Identity {
            boot_id,
            generation,
        } => (boot_id, generation),
        other => panic!("{other:?}"),
    }
}

fn vsock_identity(uds: &Path) -> (u64, u64) {
    let v = call(uds, json!({"op": "identity"}));
    match serde_json::from_value::<GuestResponse>(v).unwrap() {
        GuestResponse::Identity {
            boot_id,
            generation,
        } => (boot_id, generation),
        other => panic!("{other:?}"),
    }
}

#[test]
fn ping_eval_and_exec_over_vsock() {
    let (mut vm, uds) = start_vsock_vm("vsock-ops");
    let c = client(&uds);

    let pong = c.ping().unwrap();
    assert_eq!(pong.guest, "guest: builtin");
    // The built-in guest speaks protocol 1: the daemon refuses it the rest.
    assert_eq!(pong.protocol, proto::agent::PROTOCOL_V1);
    assert!(!pong.interpreter_ready);

    let eval = |code: &str| c.eval(code, Duration::from_secs(5)).unwrap();
    for (code, want) in [
        ("2+3*4", "14"),
        (" ( 2 + 3 ) * 4 ", "20"),
        ("-7/2", "-3"),
        ("7 % -3", "1"),
        ("--5 - -5", "10"),
        ("9223372036854775807", "9223372036854775807"),
        ("-9223372036854775808", "-9223372036854775808"),
        ("((((((((((1))))))))))+0", "1"),
    ] {
        let r = eval(code);
        assert_eq!(
            (r.result.as_deref(), r.error.as_deref(), r.exit_code),
            (Some(want), None, 0),
            "{code}"
        );
    }
    for (code, err) in [
        ("1/0", "division by zero"),
        ("5 % (3-3)", "division by zero"),
        ("9223372036854775807+1", "overflow"),
        ("-9223372036854775808/-1", "overflow"),
        ("99999999999999999999", "range"),
        ("2*(3", "expected )"),
        ("import os", "unexpected character"),
        ("", "empty expression"),
        (&"(".repeat(500), "nested too deeply"),
    ] {
        let r = eval(code);
        assert_eq!(r.result, None, "{code}");
        assert_eq!(r.exit_code, 1, "{code}");
        let e = r.error.unwrap();
        assert!(e.contains(err), "{code}: {e}");
        assert!(e.contains("integer arithmetic only"), "{code}: {e}");
    }

    let out = exec(&c, &["echo", "hello", "vsock", "wörld"]);
    assert_eq!(out.stdout, "hello vsock wörld\n".as_bytes());
    assert!(out.stderr.is_empty());
    assert_eq!(out.status.code, Some(0));
    assert_eq!(exec(&c, &["echo", "-n", "x"]).stdout, b"x");
    assert_eq!(exec(&c, &["echo"]).stdout, b"\n");
    assert_eq!(exec(&c, &["true"]).status.code, Some(0));
    assert_eq!(exec(&c, &["false"]).status.code, Some(1));
    // `pattern` (the stress tests' stream, tests/vsock_stress.rs): small,
    // empty, and refused arguments.
    let out = exec(&c, &["pattern", "20", "7"]);
    let want: Vec<u8> = (0..20u64)
        .map(|o| (vmm::boot::builtin::pattern_word(7, 0, o & !7) >> (8 * (o & 7))) as u8)
        .collect();
    assert_eq!((out.stdout, out.status.code), (want, Some(0)));
    assert_eq!(
        exec(&c, &["pattern", "0", "7", "reset"]).status.code,
        Some(0)
    );
    for bad in [
        &["pattern"][..],
        &["pattern", "x", "1"],
        &["pattern", "1", "1", "later"],
        &["pattern", "4294967297", "1"],
        &["pattern", "99999999999999999999", "1"],
    ] {
        let out = exec(&c, bad);
        assert_eq!(out.status.code, Some(2), "{bad:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).starts_with("usage: pattern BYTES SEED"),
            "{bad:?}"
        );
    }
    let out = exec(&c, &["ls", "-l"]);
    assert_eq!(out.status.code, Some(127));
    assert!(out.stdout.is_empty());
    assert_eq!(
        String::from_utf8(out.stderr).unwrap(),
        "command not found: ls (the built-in guest runs only echo, true, false, pattern)\n"
    );

    // What the guest cannot do, it says plainly.
    match c.read("/etc/passwd", 1 << 20) {
        Err(ClientError::Agent { code, message, .. }) => {
            assert_eq!(code, ErrorCode::Unsupported);
            assert!(message.contains("\"read\" is not supported by the built-in guest"));
            assert!(message.contains("eval (integer arithmetic)"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    let v = call(&uds, json!({"op": "poweroff"}));
    assert_eq!(v["kind"], "error");
    assert_eq!(v["code"], "unsupported");

    // The memory operations answer in the GuestResponse shape, and both
    // paths share them: fill over vsock, verify over the mailbox.
    let v = call(
        &uds,
        json!({"op": "fill", "seed": 77, "seq": 3, "mib": 2, "offset_mib": 1}),
    );
    assert_eq!(
        serde_json::from_value::<GuestResponse>(v).unwrap(),
        GuestResponse::Filled { bytes: 2 << 20 }
    );
    assert_eq!(
        vm.guest(GuestRequest::Verify {
            seed: 77,
            seq: 3,
            mib: 2,
            offset_mib: 1
        }),
        GuestResponse::Verified {
            bad_words: 0,
            first_bad_addr: None
        }
    );
    let v = call(
        &uds,
        json!({"op": "verify", "seed": 77, "seq": 4, "mib": 1, "offset_mib": 1}),
    );
    match serde_json::from_value::<GuestResponse>(v).unwrap() {
        GuestResponse::Verified {
            bad_words,
            first_bad_addr,
        } => {
            assert_eq!(bad_words, (1 << 20) / 8);
            assert_eq!(
                first_bad_addr,
                Some(vmm::boot::builtin::abi::SCRATCH_START + (1 << 20))
            );
        }
        other => panic!("{other:?}"),
    }
    let v = call(
        &uds,
        json!({"op": "fill", "seed": 1, "seq": 1, "mib": 1 << 20}),
    );
    assert_eq!(
        (&v["kind"], &v["code"]),
        (&json!("error"), &json!("too_large"))
    );
    let v = call(&uds, json!({"op": "fill", "seed": 1, "mib": 1}));
    assert_eq!(v["code"], "bad_request", "{v}");
    assert!(v["message"].as_str().unwrap().contains("seq"), "{v}");

    assert_eq!(vsock_identity(&uds), control_identity(&mut vm));
    let counter = |op: &str| match serde_json::from_value(call(&uds, json!({ "op": op }))) {
        Ok(GuestResponse::Counter { value }) => value,
        other => panic!("{other:?}"),
    };
    counter("counter_start");
    // While the guest spins on its counter it still serves vsock.
    let deadline = Instant::now() + Duration::from_secs(10);
    while counter("counter_read") == 0 {
        assert!(Instant::now() < deadline, "the counter did not move");
    }
    assert_eq!(c.ping().unwrap().guest, "guest: builtin");
    let stopped = counter("counter_stop");
    assert_eq!(counter("counter_read"), stopped);
    let v = call(&uds, json!({"op": "stamp_start", "mib": 2}));
    assert_eq!(
        serde_json::from_value::<GuestResponse>(v).unwrap(),
        GuestResponse::Stamp {
            bad_pages: 0,
            pass: 2,
            cursor: 0,
            pages: 512
        }
    );
    let v = call(&uds, json!({"op": "stamp_verify"}));
    assert_eq!(v["bad_pages"], 0, "{v}");
    let v = call(&uds, json!({"op": "stamp_stop"}));
    assert_eq!(v["kind"], "stamp", "{v}");
    vm.shutdown();
}

#[test]
fn many_sequential_and_concurrent_connections() {
    let (vm, uds) = start_vsock_vm("vsock-many");
    let c = client(&uds);
    for i in 0..300 {
        let r = c.eval(&format!("{i}*2"), Duration::from_secs(5)).unwrap();
        assert_eq!(r.result, Some((i * 2).to_string()));
    }
    std::thread::scope(|s| {
        for t in 0..6u64 {
            let uds = &uds;
            s.spawn(move || {
                let c = client(uds);
                for i in 0..40u64 {
                    let out = exec(&c, &["echo", &format!("{t}-{i}")]);
                    assert_eq!(out.stdout, format!("{t}-{i}\n").as_bytes());
                }
            });
        }
    });

    // Connections that never finish their request hold a slot each; past
    // the guest's table, connections are refused (reset), not hung.
    let held: Vec<UnixStream> = (0..16).map(|_| connect(&uds)).collect();
    let mut s = UnixStream::connect(&uds).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(b"CONNECT 1024\n").unwrap();
    let mut line = String::new();
    let n = BufReader::new(&mut s).read_line(&mut line).unwrap_or(0);
    assert_eq!((n, line.as_str()), (0, ""), "a 17th connection is refused");
    // Each held connection still gets its answer once it sends its request.
    for mut h in held.into_iter().take(2) {
        write_raw_frame(&mut h, br#"{"op":"ping"}"#, b"").unwrap();
        let frames = read_all(&mut h);
        assert_eq!(frames[0].0["kind"], "pong");
    }
    // The others were dropped: their slots come back.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match c.ping() {
            Ok(p) => {
                assert_eq!(p.guest, "guest: builtin");
                break;
            }
            Err(e) => assert!(Instant::now() < deadline, "no slot came back: {e}"),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    for _ in 0..50 {
        c.ping().unwrap();
    }
    // Answered connections whose host never closes are reused when the table is full.
    let answered: Vec<UnixStream> = (0..20)
        .map(|_| {
            let mut s = connect(&uds);
            write_raw_frame(&mut s, br#"{"op":"ping"}"#, b"").unwrap();
            let f = read_frame(&mut s, MAX_FRAME).unwrap();
            assert!(String::from_utf8_lossy(&f.json).contains("pong"));
            s
        })
        .collect();
    c.ping().unwrap();
    drop(answered);
    vm.shutdown();
}

#[test]
fn malformed_and_oversized_frames_get_error_frames() {
    let (vm, uds) = start_vsock_vm("vsock-bad");
    let check = |bytes: Vec<u8>, code: &str, words: &str| {
        let frames = raw(&uds, &bytes);
        assert_eq!(frames.len(), 1, "{frames:?}");
        let v = &frames[0].0;
        assert_eq!(v["kind"], "error", "{v}");
        assert_eq!(v["code"], code, "{v}");
        assert!(
            v["message"].as_str().unwrap().contains(words),
            "{v} should say {words:?}"
        );
        // And the guest keeps serving.
        assert_eq!(client(&uds).ping().unwrap().guest, "guest: builtin");
    };
    check(frame_bytes(b"not json", b""), "bad_request", "malformed");
    check(
        frame_bytes(b"[1,2]", b""),
        "bad_request",
        "not a JSON object",
    );
    check(
        frame_bytes(br#"{"op":"ping"} x"#, b""),
        "bad_request",
        "after",
    );
    check(
        frame_bytes(br#"{"op":"ping""#, b""),
        "bad_request",
        "malformed",
    );
    check(
        frame_bytes(br#"{"op":"ping","x":"\ud800"}"#, b""),
        "bad_request",
        "surrogate",
    );
    check(frame_bytes(br#"{"op":"ping","x":[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}"#, b""), "bad_request", "nested");
    check(
        frame_bytes(br#"{"code":"1"}"#, b""),
        "bad_request",
        "no \"op\"",
    );
    check(frame_bytes(br#"{"op":5}"#, b""), "bad_request", "string");
    check(
        frame_bytes(br#"{"op":"exec","args":"echo"}"#, b""),
        "bad_request",
        "args",
    );
    check(
        frame_bytes(br#"{"op":"exec","args":[]}"#, b""),
        "bad_request",
        "args",
    );
    check(
        frame_bytes(br#"{"op":"eval","code":12}"#, b""),
        "bad_request",
        "code",
    );
    check(
        frame_bytes(br#"{"op":"fill","seed":-1,"seq":1,"mib":1}"#, b""),
        "bad_request",
        "seed",
    );
    check(
        frame_bytes(br#"{"op":"fly"}"#, b""),
        "unsupported",
        "not supported by the built-in guest",
    );
    check(frame_bytes(b"{}", b""), "bad_request", "no \"op\"");
    // A frame header alone: lengths over the protocol's limit, over the
    // guest's own, and too short to hold a JSON object.
    let header = |j: u32, d: u32| [j.to_le_bytes(), d.to_le_bytes()].concat();
    check(header(u32::MAX, u32::MAX), "too_large", "1 MiB");
    check(header(MAX_FRAME as u32, 1), "too_large", "1 MiB");
    check(header(9000, 0), "too_large", "8192 bytes");
    check(header(1, 0), "bad_request", "at least 2 bytes");
    check(header(0, 5), "bad_request", "at least 2 bytes");
    // A big binary part is consumed (past the guest's advertised credit)
    // and the request still answered.
    let stdin = vec![b'x'; 600 * 1024];
    let frames = raw(
        &uds,
        &frame_bytes(br#"{"op":"exec","args":["echo","big"]}"#, &stdin),
    );
    assert_eq!(frames[0].1, b"big\n");
    assert_eq!(frames[1].0["code"], 0);
    // Escapes decode; output is escaped.
    let frames = raw(
        &uds,
        &frame_bytes(
            br#"{"op":"exec","args":["echo","q\"\\\n\t\u00e9\ud83d\ude00"],"env":{"A":"B","n":{"x":[1,2.5e3,null,true]}}}"#,
            b"",
        ),
    );
    assert_eq!(frames[0].1, "q\"\\\n\té😀\n".as_bytes());
    let frames = raw(
        &uds,
        &frame_bytes(br#"{"op":"exec","args":["a\"b\u0001"]}"#, b""),
    );
    assert_eq!(
        String::from_utf8_lossy(&frames[0].1),
        "command not found: a\"b\u{1} (the built-in guest runs only echo, true, false, pattern)\n"
    );
    // A connection that closes mid-frame, and one that closes at once.
    {
        let mut s = connect(&uds);
        s.write_all(&header(100, 0)).unwrap();
        s.write_all(b"{\"op\"").unwrap();
    }
    drop(connect(&uds));
    // A connection to another port is refused.
    let mut s = UnixStream::connect(&uds).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(b"CONNECT 1025\n").unwrap();
    let mut line = String::new();
    assert_eq!(BufReader::new(&mut s).read_line(&mut line).unwrap_or(0), 0);
    for _ in 0..20 {
        assert_eq!(client(&uds).ping().unwrap().guest, "guest: builtin");
    }
    vm.shutdown();
}

#[test]
fn two_vms_vsock_traffic_never_crosses() {
    let (mut a, uds_a) = start_vsock_vm("vsock-a");
    let (mut b, uds_b) = start_vsock_vm("vsock-b");
    let id_a = control_identity(&mut a);
    let id_b = control_identity(&mut b);
    assert_ne!(id_a, id_b);
    std::thread::scope(|s| {
        for (uds, id) in [(&uds_a, id_a), (&uds_b, id_b)] {
            for _ in 0..2 {
                s.spawn(move || {
                    for _ in 0..40 {
                        assert_eq!(vsock_identity(uds), id);
                    }
                });
            }
        }
    });
    // Memory written through one VM's socket is that VM's only.
    call(&uds_a, json!({"op": "fill", "seed": 9, "seq": 9, "mib": 1}));
    let bad = |vm: &mut TestVm| match vm.guest(GuestRequest::Verify {
        seed: 9,
        seq: 9,
        mib: 1,
        offset_mib: 0,
    }) {
        GuestResponse::Verified { bad_words, .. } => bad_words,
        other => panic!("{other:?}"),
    };
    assert_eq!(bad(&mut a), 0);
    assert_eq!(bad(&mut b), (1 << 20) / 8);
    a.shutdown();
    b.shutdown();
}

#[test]
fn fork_children_answer_over_their_own_sockets() {
    let tmp = TempDir::new("vsock-fork");
    let (mut vm, uds) = start_vsock_vm("vsock-parent");
    let parent_id = control_identity(&mut vm);
    assert_eq!(client(&uds).ping().unwrap().guest, "guest: builtin");
    // A connection in the middle of its request when the snapshot is taken.
    let mut open = connect(&uds);
    open.write_all(&frame_bytes(br#"{"op":"ping"}"#, b"")[..6])
        .unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let snap = tmp.path().join("snap");
    // Built from JSON so the optional fields keep their defaults.
    let request: ControlRequest =
        serde_json::from_value(json!({"op": "snapshot", "dir": snap, "leave_paused": false}))
            .unwrap();
    match vm.call(request) {
        ControlResponse::Snapshot { .. } => {}
        other => panic!("{other:?}"),
    }
    // The parent keeps its connection and finishes it.
    open.write_all(&frame_bytes(br#"{"op":"ping"}"#, b"")[6..])
        .unwrap();
    assert_eq!(read_all(&mut open)[0].0["kind"], "pong");

    let mut kids = fork_children(&snap, 2, &tmp.path().join("kids"), &[]);
    let mut generations = vec![parent_id.1];
    for kid in &mut kids {
        let kid_uds = kid.dir.join("vsock.sock");
        wait_for_socket(&kid_uds);
        // The child saw a transport reset: its stale connection is gone and
        // it answers new ones on its own socket.
        let c = client(&kid_uds);
        assert_eq!(c.ping().unwrap().guest, "guest: builtin");
        let id = vsock_identity(&kid_uds);
        let via_control = match kid.guest(GuestRequest::Identity) {
            GuestResponse::Identity {
                boot_id,
                generation,
            } => (boot_id, generation),
            other => panic!("{other:?}"),
        };
        assert_eq!(id, via_control, "the child's socket reaches the child");
        assert_eq!(id.0, parent_id.0, "the boot id is inherited");
        assert!(
            !generations.contains(&id.1),
            "each copy has its own generation"
        );
        generations.push(id.1);
        for i in 0..30 {
            assert_eq!(
                c.eval(&format!("{i}+1"), Duration::from_secs(5))
                    .unwrap()
                    .result,
                Some((i + 1).to_string())
            );
        }
        // All of the child's slots are free (none leaked from the parent).
        let held: Vec<UnixStream> = (0..16).map(|_| connect(&kid_uds)).collect();
        drop(held);
    }
    // The parent still answers over its own socket, as itself.
    assert_eq!(vsock_identity(&uds), parent_id);
    for kid in kids {
        kid.shutdown();
    }
    vm.shutdown();
}

/// Ping round trip over vsock against the control socket (the mailbox),
/// on the same VM. Run with `--ignored --nocapture`.
#[test]
#[ignore = "a measurement, not a check: run with --ignored --nocapture (figures in bench/RESULTS.md)"]
fn bench_ping_round_trip() {
    let (mut vm, uds) = start_vsock_vm("vsock-bench");
    let c = client(&uds);
    let n = 2000;
    let median = |mut v: Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let mut vsock = Vec::with_capacity(n);
    let mut vsock_conn = Vec::with_capacity(n);
    let mut control = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        c.ping().unwrap();
        vsock.push(t.elapsed());
        let mut s = connect(&uds);
        let t = Instant::now();
        write_raw_frame(&mut s, br#"{"op":"ping"}"#, b"").unwrap();
        read_frame(&mut s, MAX_FRAME).unwrap();
        vsock_conn.push(t.elapsed());
        drop(s);
        let t = Instant::now();
        vm.guest(GuestRequest::Ping);
        control.push(t.elapsed());
    }
    eprintln!(
        "ping round trip, median of {n}: vsock with connect {:?}, vsock request on an open connection {:?}, control socket {:?}",
        median(vsock),
        median(vsock_conn),
        median(control)
    );
    vm.shutdown();
}
