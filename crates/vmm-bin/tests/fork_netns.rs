//! Host tests: children of a snapshot with a virtio-net device, each
//! attached to a tap of the recorded name inside a network namespace of
//! its own (`fork --netns`, `restore --netns`, a fork request's `netns`).
//!
//! Needs root, /dev/kvm, /dev/net/tun and the `ip` command. Whether a
//! child holds its namespace's tap is read from the tap's carrier: a tap
//! that is up has carrier exactly while a process has it attached.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{process_alive, ControlledVm, ForkServer, ForkedVm, TempDir, TestVm};
use proto::control::{ControlClient, SnapshotMode};
use proto::guest::{GuestRequest, GuestResponse};
use serde_json::{json, Value};

/// The tap every VM here uses, in whichever namespace it is.
const TAP: &str = "forkd0";
const MAC: &str = "06:00:ac:10:00:02";

/// Fails the test, saying what is missing, without the `ip` command or
/// /dev/net/tun.
fn require_network_tools() {
    let ip = Command::new("ip").arg("-V").output();
    assert!(
        ip.is_ok_and(|o| o.status.success()),
        "this test needs the `ip` command (iproute2: apt-get install iproute2); it is missing"
    );
    assert!(
        Path::new("/dev/net/tun").exists(),
        "this test needs /dev/net/tun (modprobe tun) and root; it is missing"
    );
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace for one test (named with the test process's pid),
/// deleted with its taps when dropped.
struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Netns {
        let ns = Netns(format!("forkd-t{tag}-{}", std::process::id()));
        let _ = Command::new("ip").args(["netns", "del", &ns.0]).output();
        ip(&["netns", "add", &ns.0]);
        ns
    }

    /// A namespace holding a persistent tap [`TAP`], up, with an address:
    /// what a child attaches to.
    fn with_tap(tag: &str) -> Netns {
        let ns = Netns::new(tag);
        ip(&["-n", &ns.0, "tuntap", "add", "dev", TAP, "mode", "tap"]);
        ip(&["-n", &ns.0, "addr", "add", "172.16.0.1/24", "dev", TAP]);
        ip(&["-n", &ns.0, "link", "set", TAP, "up"]);
        ns
    }

    /// The tap's carrier as its namespace sees it: "1" while a process
    /// has it attached, "0" while nobody does.
    fn carrier(&self) -> String {
        let path = format!("/sys/class/net/{TAP}/carrier");
        let out = Command::new("ip")
            .args(["netns", "exec", &self.0, "cat", &path])
            .output()
            .expect("run ip netns exec");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Waits (up to 10 s) for the carrier to read `want`.
    fn wait_carrier(&self, want: &str, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.carrier() != want {
            assert!(
                Instant::now() < deadline,
                "{what}: the tap in {} has carrier {:?}, expected {want}",
                self.0,
                self.carrier()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// Boots the built-in guest with a NIC on tap [`TAP`] in `parent` and
/// snapshots it into `snap` (the parent is shut down).
fn make_snapshot(snap: &Path, parent: &Netns) {
    let mut vm = TestVm::start(&[
        "--builtin",
        "--mem-mib",
        "32",
        "--console",
        "none",
        "--tap",
        TAP,
        "--netns",
        &parent.0,
        "--mac",
        MAC,
    ]);
    ping(&mut vm);
    let meta = common::snapshot(&mut vm, snap, SnapshotMode::Full);
    assert_eq!(meta["nets"], json!([{"tap": TAP, "mac": MAC}]), "{meta}");
    vm.shutdown();
    let written: Value =
        serde_json::from_slice(&std::fs::read(snap.join("snapshot.json")).unwrap()).unwrap();
    assert_eq!(written["nets"], json!([{"tap": TAP, "mac": MAC}]));
}

fn ping(vm: &mut impl ControlledVm) {
    assert!(matches!(
        vm.guest(GuestRequest::Ping),
        GuestResponse::Pong { .. }
    ));
}

/// `forkd-vmm fork` expected to fail: its stderr. Nothing may have been
/// started: no child directory under `out`.
fn fork_refused(snap: &Path, n: u32, out: &Path, extra: &[&str]) -> String {
    let mut args = vec!["fork", "--snapshot", snap.to_str().unwrap()];
    let n = n.to_string();
    args.extend(["-n", &n, "--out-dir", out.to_str().unwrap()]);
    args.extend(extra);
    let (code, stderr) = common::run_to_exit(&args);
    assert_eq!(code, Some(2), "fork {extra:?} was not refused: {stderr}");
    assert!(
        !out.join("0").exists(),
        "fork {extra:?} was refused but made a child directory"
    );
    stderr
}

#[test]
fn fork_children_each_attach_to_the_tap_in_their_own_namespace() {
    require_network_tools();
    let tmp = TempDir::new("netns-fork");
    let parent = Netns::new("fp");
    let snap = tmp.path().join("snap");
    make_snapshot(&snap, &parent);
    let (a, b) = (Netns::with_tap("fa"), Netns::with_tap("fb"));
    a.wait_carrier("0", "before the fork");
    b.wait_carrier("0", "before the fork");

    let mut kids = common::fork_children(
        &snap,
        2,
        &tmp.path().join("kids"),
        &["--netns", &a.0, "--netns", &b.0],
    );
    for kid in &mut kids {
        ping(kid);
    }
    a.wait_carrier("1", "child 0 runs");
    b.wait_carrier("1", "child 1 runs");
    // Child i holds the i-th namespace's tap, and only that one.
    let mut kids = kids.into_iter();
    kids.next().unwrap().shutdown();
    a.wait_carrier("0", "child 0 is gone");
    assert_eq!(b.carrier(), "1", "child 1 still runs");
    let mut second = kids.next().unwrap();
    ping(&mut second);
    // Its own snapshot names the same tap.
    let meta = common::snapshot(&mut second, &tmp.path().join("grand"), SnapshotMode::Full);
    assert_eq!(meta["nets"], json!([{"tap": TAP, "mac": MAC}]));
    second.shutdown();
    b.wait_carrier("0", "child 1 is gone");

    // One child restored alone, in a namespace given to `restore`.
    let c = Netns::with_tap("fc");
    let mut one = TestVm::start_subcommand(
        "restore",
        &[
            "--snapshot",
            snap.to_str().unwrap(),
            "--console",
            "none",
            "--netns",
            &c.0,
        ],
    );
    ping(&mut one);
    c.wait_carrier("1", "the restored VM runs");
    one.shutdown();
    c.wait_carrier("0", "the restored VM is gone");
}

#[test]
fn two_children_without_namespaces_or_in_one_without_the_tap_are_refused_before_any_starts() {
    require_network_tools();
    let tmp = TempDir::new("netns-refused");
    let parent = Netns::new("rp");
    let snap = tmp.path().join("snap");
    make_snapshot(&snap, &parent);
    let good = Netns::with_tap("rg");
    let bare = Netns::new("rb");
    let out = tmp.path().join("kids");

    // No namespace for two children of a snapshot with a NIC.
    let err = fork_refused(&snap, 2, &out, &[]);
    assert!(
        err.contains("each of the 2 children needs a network namespace of its own")
            && err.contains(TAP)
            && err.contains("--netns"),
        "{err}"
    );
    // Not one per child, twice the same, or not a plain name.
    let err = fork_refused(&snap, 2, &out, &["--netns", &good.0]);
    assert!(
        err.contains("1 network namespaces were given for 2 children"),
        "{err}"
    );
    let err = fork_refused(&snap, 2, &out, &["--netns", &good.0, "--netns", &good.0]);
    assert!(err.contains("each child needs its own"), "{err}");
    let err = fork_refused(&snap, 2, &out, &["--netns", &good.0, "--netns", "../x"]);
    assert!(
        err.contains("child 1") && err.contains("namespace name"),
        "{err}"
    );

    // A namespace without the tap: the error names the namespace, the tap
    // and what to make; the other child (fine on its own) is not started.
    let err = fork_refused(&snap, 2, &out, &["--netns", &good.0, "--netns", &bare.0]);
    for needed in [
        "child 1",
        bare.0.as_str(),
        "\"forkd0\"",
        "tuntap add dev forkd0 mode tap",
    ] {
        assert!(err.contains(needed), "{needed:?} missing from: {err}");
    }
    assert_eq!(good.carrier(), "0", "a child attached to the good tap");
    // A namespace that does not exist.
    let err = fork_refused(&snap, 1, &out, &["--netns", "forkd-no-such-ns"]);
    assert!(
        err.contains("forkd-no-such-ns") && err.contains("ip netns add"),
        "{err}"
    );
    // `restore` says the same, and nothing is left running.
    let (code, err) = common::run_to_exit(&[
        "restore",
        "--snapshot",
        snap.to_str().unwrap(),
        "--console",
        "none",
        "--netns",
        &bare.0,
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains(&bare.0) && err.contains("\"forkd0\"") && err.contains("tuntap add"),
        "{err}"
    );
    // Nor is a tap made in the namespace in its place.
    let made = Command::new("ip")
        .args(["-n", &bare.0, "link", "show", TAP])
        .output()
        .unwrap();
    assert!(!made.status.success(), "a tap was created in {}", bare.0);
}

/// The children of a `forked` answer, connected.
fn connect_children(answer: &Value) -> Vec<ForkedVm> {
    assert_eq!(answer["result"], "forked", "{answer}");
    answer["children"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| ForkedVm {
            pid: k["pid"].as_i64().unwrap() as i32,
            client: ControlClient::connect(
                Path::new(k["control_socket"].as_str().unwrap()),
                Duration::from_secs(30),
            )
            .expect("connect to a child"),
            dir: PathBuf::from(k["dir"].as_str().unwrap()),
        })
        .collect()
}

#[test]
fn a_fork_server_gives_each_child_its_namespace_pooled_cold_or_memfd() {
    require_network_tools();
    let tmp = TempDir::new("netns-server");
    let parent = Netns::new("sp");
    let snap = tmp.path().join("snap");
    make_snapshot(&snap, &parent);
    let (a, b) = (Netns::with_tap("sa"), Netns::with_tap("sb"));
    let bare = Netns::new("sn");
    for pool in [0u32, 2] {
        let server = ForkServer::start(&snap, tmp.path().join(format!("fork{pool}.sock")), pool);
        let parked = if pool > 0 {
            server.wait_parked(pool as usize)
        } else {
            Vec::new()
        };
        for (round, memfd) in [false, true].into_iter().enumerate() {
            let what = format!("pool {pool}, memfd {memfd}");
            let out = tmp.path().join(format!("kids-{pool}-{round}"));
            let answer = server.ask(&json!({
                "op": "fork", "n": 2, "out_dir": out, "memfd": memfd,
                "netns": [a.0, b.0],
            }));
            let mut kids = connect_children(&answer);
            if pool > 0 && !memfd {
                for kid in &kids {
                    assert!(
                        parked.contains(&kid.pid),
                        "{what}: {} was not pooled",
                        kid.pid
                    );
                }
            }
            for kid in &mut kids {
                ping(kid);
                let backend = kid.status().memory_backend;
                assert_eq!(backend, if memfd { "memfd" } else { "file" }, "{what}");
            }
            a.wait_carrier("1", &format!("{what}: child 0 runs"));
            b.wait_carrier("1", &format!("{what}: child 1 runs"));
            let pids: Vec<i32> = kids.iter().map(|k| k.pid).collect();
            let mut kids = kids.into_iter();
            kids.next().unwrap().shutdown();
            a.wait_carrier("0", &format!("{what}: child 0 is gone"));
            assert_eq!(b.carrier(), "1", "{what}: child 1 still runs");
            kids.next().unwrap().shutdown();
            b.wait_carrier("0", &format!("{what}: child 1 is gone"));
            assert!(pids.iter().all(|&p| !process_alive(p)));
        }

        // Refused requests start nothing and leave the server serving.
        let out = tmp.path().join(format!("refused-{pool}"));
        for (request, says) in [
            (
                json!({"op": "fork", "n": 2, "out_dir": out}),
                "each of the 2 children needs a network namespace".to_owned(),
            ),
            (
                json!({"op": "fork", "n": 2, "out_dir": out, "netns": [a.0]}),
                "1 network namespaces were given for 2 children".to_owned(),
            ),
            (
                json!({"op": "fork", "n": 2, "out_dir": out, "netns": [a.0, "a b"]}),
                "namespace name \"a b\" is invalid".to_owned(),
            ),
            (
                json!({"op": "fork", "n": 2, "out_dir": out, "netns": [a.0, bare.0]}),
                format!(
                    "there is no tap \"forkd0\" in network namespace \"{}\"",
                    bare.0
                ),
            ),
        ] {
            let answer = server.ask(&request);
            assert_eq!(answer["result"], "error", "{request}: {answer}");
            let message = answer["message"].as_str().unwrap();
            assert!(message.contains(&says), "{request}: {message}");
            assert!(!out.join("0").exists(), "{request} made a child");
            assert_eq!(a.carrier(), "0", "{request} attached a child");
        }
        if pool > 0 {
            // The pooled children not handed out are still parked.
            assert_eq!(server.wait_parked(pool as usize).len(), pool as usize);
        }
        assert_eq!(server.ask(&json!({"op": "shutdown"}))["result"], "ok");
    }
}
