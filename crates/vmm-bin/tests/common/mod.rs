//! Helpers for tests that run forkd-vmm as a real process.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use proto::control::{ControlClient, ControlRequest, ControlResponse, VmStatus};
use proto::guest::{GuestRequest, GuestResponse};
use serde_json::{json, Value};

/// The forkd-vmm binary cargo built for these tests.
pub fn vmm_bin() -> &'static str {
    env!("CARGO_BIN_EXE_forkd-vmm")
}

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let p = std::env::temp_dir().join(format!("forkd-test-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A VM reached through its control socket: the requests tests make of
/// any of them, over one `call`.
pub trait ControlledVm {
    /// Sends a request; fails the test when the VMM does not answer.
    fn call(&mut self, req: ControlRequest) -> ControlResponse;

    /// A request to the guest; fails the test on an error answer.
    fn guest(&mut self, request: GuestRequest) -> GuestResponse {
        match self.call(ControlRequest::Guest {
            request,
            timeout_ms: None,
        }) {
            ControlResponse::Guest { response } => response,
            other => panic!("guest request failed: {other:?}"),
        }
    }

    /// The VM's status.
    fn status(&mut self) -> VmStatus {
        match self.call(ControlRequest::Status) {
            ControlResponse::Status(s) => s,
            other => panic!("status failed: {other:?}"),
        }
    }

    /// The little-endian u64 at guest address `addr`.
    fn peek_u64(&mut self, addr: u64) -> u64 {
        match self.call(ControlRequest::Peek { addr, len: 8 }) {
            ControlResponse::Peek { hex } => {
                let bytes: Vec<u8> = (0..8)
                    .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
                    .collect();
                u64::from_le_bytes(bytes.try_into().unwrap())
            }
            other => panic!("peek failed: {other:?}"),
        }
    }
}

/// A forkd-vmm process with a connected control client; killed on drop.
pub struct TestVm {
    pub child: Child,
    pub client: ControlClient,
    pub dir: TempDir,
    /// Directories the VM uses beyond its own (a vsock socket's), removed
    /// after it has ended.
    pub keep: Vec<TempDir>,
}

impl ControlledVm for TestVm {
    fn call(&mut self, req: ControlRequest) -> ControlResponse {
        TestVm::call(self, req)
    }
}

impl TestVm {
    /// Starts `forkd-vmm run <args> --control-socket ...` and connects.
    /// Fails the test with the VMM's stderr if it exits early (for example
    /// when /dev/kvm is missing).
    pub fn start(args: &[&str]) -> TestVm {
        Self::start_subcommand("run", args)
    }

    /// [`TestVm::start`] with more environment variables for the VMM.
    #[allow(dead_code)] // not every test binary sets any
    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> TestVm {
        Self::start_subcommand_with_env("run", args, env)
    }

    /// Starts `forkd-vmm <subcommand> <args> --control-socket ...` and connects.
    pub fn start_subcommand(subcommand: &str, args: &[&str]) -> TestVm {
        Self::start_subcommand_with_env(subcommand, args, &[])
    }

    fn start_subcommand_with_env(subcommand: &str, args: &[&str], env: &[(&str, &str)]) -> TestVm {
        assert!(
            Path::new("/dev/kvm").exists(),
            "this test needs /dev/kvm (a KVM host, run as root); it is missing here"
        );
        let dir = TempDir::new("vm");
        let sock = dir.path().join("control.sock");
        let mut child = Command::new(vmm_bin())
            .arg(subcommand)
            .args(args)
            .arg("--control-socket")
            .arg(&sock)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn forkd-vmm");
        let client = connect(&sock, &mut child);
        TestVm {
            child,
            client,
            dir,
            keep: Vec::new(),
        }
    }

    pub fn call(&mut self, req: ControlRequest) -> ControlResponse {
        match self.client.call(&req) {
            Ok(r) => r,
            Err(e) => self.die(&format!("control call {req:?} failed: {e}")),
        }
    }

    /// Fails the test with what the VMM process said on its way out.
    pub fn die(&mut self, what: &str) -> ! {
        std::thread::sleep(Duration::from_millis(200));
        let status = self.child.try_wait().unwrap();
        let _ = self.child.kill();
        let mut err = String::new();
        use std::io::Read;
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        panic!("{what}; forkd-vmm status {status:?}, stderr: {err}");
    }

    /// Asks the VMM to shut down and waits for a clean exit.
    pub fn shutdown(mut self) {
        assert_eq!(self.call(ControlRequest::Shutdown), ControlResponse::Ok);
        let status = wait_exit(&mut self.child, Duration::from_secs(10));
        assert!(status.success(), "forkd-vmm exited with {status}");
    }
}

impl Drop for TestVm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn connect(sock: &Path, child: &mut Child) -> ControlClient {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(c) = ControlClient::connect(sock, Duration::from_secs(30)) {
            return c;
        }
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            use std::io::Read;
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut err)
                .unwrap();
            panic!("forkd-vmm exited early ({status}): {err}");
        }
        assert!(
            Instant::now() < deadline,
            "forkd-vmm did not open its control socket in 20 s"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

pub fn wait_exit(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "forkd-vmm did not exit within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Runs forkd-vmm to completion with `args`; returns (exit code, stderr).
pub fn run_to_exit(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(vmm_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("spawn forkd-vmm");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `forkd-vmm verify --snapshot dir`: (exit code, stdout, stderr).
pub fn verify_snapshot(dir: &Path) -> (Option<i32>, String, String) {
    let out = Command::new(vmm_bin())
        .args(["verify", "--snapshot"])
        .arg(dir)
        .stdin(Stdio::null())
        .output()
        .expect("spawn forkd-vmm verify");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A child started by `forkd-vmm fork`: not our child process, so it is
/// reached by pid and control socket; killed on drop.
pub struct ForkedVm {
    pub pid: i32,
    pub client: ControlClient,
    pub dir: PathBuf,
}

impl ControlledVm for ForkedVm {
    fn call(&mut self, req: ControlRequest) -> ControlResponse {
        ForkedVm::call(self, req)
    }
}

/// The uid process `pid` runs as (0 when it cannot be read).
pub fn uid_of(pid: i32) -> u32 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|u| u.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// A jailed VMM (a child of `fork` or `fork-server`, no longer root)
/// writes a snapshot only into a directory handed over to it: made, empty,
/// given to its uid and bound into its jail, as the daemon does. Nothing
/// for one that runs as root or a directory that exists.
pub fn hand_over(pid: i32, dir: &Path) {
    let uid = uid_of(pid);
    if uid == 0 || dir.exists() {
        return;
    }
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent).unwrap();
    }
    std::fs::create_dir(dir).unwrap();
    std::os::unix::fs::chown(dir, Some(uid), Some(uid)).unwrap();
    let dir = std::path::absolute(dir).unwrap();
    jailfs::bind_into(pid, &dir)
        .unwrap_or_else(|e| panic!("cannot bind {} into VMM {pid}'s jail: {e}", dir.display()));
}

impl ForkedVm {
    pub fn call(&mut self, req: ControlRequest) -> ControlResponse {
        if let ControlRequest::Snapshot { dir, .. } = &req {
            hand_over(self.pid, dir);
        }
        match self.client.call(&req) {
            Ok(r) => r,
            Err(e) => {
                let log = std::fs::read_to_string(self.dir.join("vmm.log")).unwrap_or_default();
                panic!(
                    "child {} control call {req:?} failed: {e}; vmm.log: {log}",
                    self.pid
                )
            }
        }
    }

    /// Shuts the child down and waits until its process is gone.
    pub fn shutdown(mut self) {
        assert_eq!(self.call(ControlRequest::Shutdown), ControlResponse::Ok);
        let deadline = Instant::now() + Duration::from_secs(10);
        while process_alive(self.pid) {
            assert!(Instant::now() < deadline, "child {} did not exit", self.pid);
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for ForkedVm {
    fn drop(&mut self) {
        // SAFETY: sending SIGKILL to a pid we started; harmless if it is gone.
        unsafe { libc::kill(self.pid, libc::SIGKILL) };
    }
}

/// Runs `forkd-vmm fork` and connects to every child it reports.
pub fn fork_children(snapshot: &Path, n: u32, out: &Path, extra: &[&str]) -> Vec<ForkedVm> {
    let output = Command::new(vmm_bin())
        .args(["fork", "--snapshot"])
        .arg(snapshot)
        .args(["-n", &n.to_string(), "--out-dir"])
        .arg(out)
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .expect("spawn forkd-vmm fork");
    assert!(
        output.status.success(),
        "forkd-vmm fork failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), n as usize);
    lines
        .into_iter()
        .map(|l| {
            let sock = PathBuf::from(l["control_socket"].as_str().unwrap());
            let client =
                ControlClient::connect(&sock, Duration::from_secs(30)).expect("connect to child");
            ForkedVm {
                pid: l["pid"].as_i64().unwrap() as i32,
                client,
                dir: PathBuf::from(l["dir"].as_str().unwrap()),
            }
        })
        .collect()
}

/// Whether `pid` is running (a zombie waiting for its reaper counts as gone:
/// children of `forkd-vmm fork` are reparented once the fork command exits).
pub fn process_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state is the first field after the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z') && !rest.starts_with('X')),
        Err(_) => false,
    }
}

/// Waits (up to 10 s: the machine may be busy) for a guest counter read by
/// `read` to pass `above`, and returns the value seen.
pub fn wait_for_counter_above(mut read: impl FnMut() -> u64, above: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v = read();
        if v > above {
            return v;
        }
        assert!(Instant::now() < deadline, "the counter stayed at {above}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Writes a snapshot of `vm` into `dir` (the VM runs on); its metadata.
pub fn snapshot(
    vm: &mut impl ControlledVm,
    dir: &Path,
    mode: proto::control::SnapshotMode,
) -> serde_json::Value {
    match vm.call(ControlRequest::Snapshot {
        dir: dir.to_owned(),
        leave_paused: false,
        mode,
        wait: true,
        measure_diff: false,
    }) {
        ControlResponse::Snapshot { meta, .. } => serde_json::to_value(meta).unwrap(),
        other => panic!("{mode:?} snapshot of {} failed: {other:?}", dir.display()),
    }
}

/// A seeded memory pattern of the built-in guest: `fill` writes pattern
/// `seq` over `mib` MiB of its scratch memory from `offset_mib`, `verify`
/// checks it is there.
pub struct Pattern {
    /// The seed every `seq` derives from.
    pub seed: u64,
}

impl Pattern {
    /// The request that writes pattern `seq`.
    pub fn fill(&self, seq: u64, mib: u64, offset_mib: u64) -> GuestRequest {
        GuestRequest::Fill {
            seed: self.seed,
            seq,
            mib,
            offset_mib,
        }
    }

    /// Fails the test unless the guest holds pattern `seq` there.
    pub fn verify(&self, vm: &mut impl ControlledVm, seq: u64, mib: u64, offset_mib: u64) {
        match vm.guest(GuestRequest::Verify {
            seed: self.seed,
            seq,
            mib,
            offset_mib,
        }) {
            proto::guest::GuestResponse::Verified { bad_words, .. } => assert_eq!(
                bad_words, 0,
                "pattern {seq} on {mib} MiB at {offset_mib} MiB"
            ),
            other => panic!("verify: {other:?}"),
        }
    }
}

/// What a parked pooled child calls itself (`comm`).
pub const POOLED: &str = "forkd-pooled";

/// A running `forkd-vmm fork-server`; killed on drop.
pub struct ForkServer {
    pub child: Child,
    pub socket: PathBuf,
    /// Children it handed out: a pooled child is still called
    /// `forkd-pooled` until it has read its order.
    handed: std::cell::RefCell<Vec<i32>>,
}

impl ForkServer {
    pub fn start(snap: &Path, socket: PathBuf, pool: u32) -> ForkServer {
        Self::start_with_args(snap, socket, pool, &[])
    }

    /// Like [`ForkServer::start`], with further arguments.
    pub fn start_with_args(snap: &Path, socket: PathBuf, pool: u32, args: &[&str]) -> ForkServer {
        let child = Command::new(vmm_bin())
            .args(["fork-server", "--snapshot"])
            .arg(snap)
            .arg("--socket")
            .arg(&socket)
            .args(["--pool", &pool.to_string()])
            .args(args)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn forkd-vmm fork-server");
        ForkServer {
            child,
            socket,
            handed: Default::default(),
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// One request line, its answer.
    pub fn ask(&self, request: &Value) -> Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut s = loop {
            match UnixStream::connect(&self.socket) {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
                Err(e) => panic!("the fork server did not start: {e}"),
            }
        };
        let mut line = serde_json::to_vec(request).unwrap();
        line.push(b'\n');
        s.write_all(&line).unwrap();
        let mut answer = String::new();
        BufReader::new(s).read_line(&mut answer).unwrap();
        serde_json::from_str(&answer).unwrap()
    }

    /// Forks `n` children into `out` (`extra`: more request fields) and
    /// connects to each.
    pub fn fork(&self, n: u32, out: &Path, extra: Value) -> Vec<ForkedVm> {
        let mut request = json!({"op": "fork", "n": n, "out_dir": out});
        if let Value::Object(more) = extra {
            request.as_object_mut().unwrap().extend(more);
        }
        let r = self.ask(&request);
        assert_eq!(r["result"], "forked", "{r}");
        let kids = r["children"].as_array().unwrap();
        assert_eq!(kids.len(), n as usize);
        self.handed
            .borrow_mut()
            .extend(kids.iter().map(|k| k["pid"].as_i64().unwrap() as i32));
        kids.iter()
            .map(|k| {
                let sock = PathBuf::from(k["control_socket"].as_str().unwrap());
                let dir = PathBuf::from(k["dir"].as_str().unwrap());
                assert_eq!(sock, dir.join("control.sock"));
                let client = ControlClient::connect(&sock, Duration::from_secs(30))
                    .expect("the control socket exists when the answer comes");
                ForkedVm {
                    pid: k["pid"].as_i64().unwrap() as i32,
                    client,
                    dir,
                }
            })
            .collect()
    }

    /// The server's children that are parked in the pool.
    pub fn parked(&self) -> Vec<i32> {
        let handed = self.handed.borrow();
        children_of(self.pid())
            .into_iter()
            .filter(|p| !handed.contains(p) && comm(*p).as_deref() == Some(POOLED))
            .collect()
    }

    /// Waits (up to 30 s: the machine may be busy) until `n` children are
    /// parked; returns them.
    pub fn wait_parked(&self, n: usize) -> Vec<i32> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let parked = self.parked();
            if parked.len() == n {
                return parked;
            }
            assert!(
                Instant::now() < deadline,
                "{} children parked, expected {n}",
                parked.len()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for ForkServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn children_of(pid: i32) -> Vec<i32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

pub fn comm(pid: i32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim().to_owned())
}

/// A built-in guest with a vsock device; returns it and its vsock socket.
pub fn start_vsock_vm(tag: &str) -> (TestVm, PathBuf) {
    let dir = TempDir::new(tag);
    let uds = dir.path().join("vsock.sock");
    let mut vm = TestVm::start(&[
        "--builtin",
        "--mem-mib",
        "64",
        "--console",
        "none",
        "--vsock-uds",
        uds.to_str().unwrap(),
    ]);
    // The socket lives as long as the VM; the directory with it.
    vm.keep.push(dir);
    wait_for_socket(&uds);
    (vm, uds)
}

/// Waits until the VMM listens on `path` (its control socket may answer
/// connections before the machine and its devices exist, and the socket
/// file appears a moment before the listen).
pub fn wait_for_socket(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while let Err(e) = UnixStream::connect(path) {
        assert!(
            Instant::now() < deadline,
            "{} never accepted a connection: {e}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Connects to the guest's agent port through the VMM's vsock socket
/// (`CONNECT <port>`, then `OK <host port>`).
pub fn vsock_connect(uds: &Path) -> UnixStream {
    let mut s = UnixStream::connect(uds).expect("connect to the vsock socket");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(format!("CONNECT {}\n", proto::agent::DEFAULT_VSOCK_PORT).as_bytes())
        .unwrap();
    let mut line = String::new();
    BufReader::new(&mut s).read_line(&mut line).unwrap();
    assert!(line.starts_with("OK "), "vsock handshake answered {line:?}");
    s
}
