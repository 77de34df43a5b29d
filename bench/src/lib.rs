//! Shared pieces of the forkd benchmarks: timing statistics and the
//! bare-KVM floor every VM start is compared against.

use std::time::{Duration, Instant};

use kvm_bindings::{kvm_regs, kvm_userspace_memory_region};
use kvm_ioctls::Kvm;

/// Summary of a set of timings.
#[derive(Clone, Copy, Debug)]
pub struct Stats {
    /// Median.
    pub p50: Duration,
    /// 90th percentile.
    pub p90: Duration,
    /// Smallest.
    pub min: Duration,
    /// Largest.
    pub max: Duration,
}

impl Stats {
    /// Statistics of `samples` (at least one).
    pub fn of(samples: &[Duration]) -> Stats {
        assert!(!samples.is_empty(), "no samples");
        let mut s = samples.to_vec();
        s.sort();
        let at = |q: f64| s[((s.len() - 1) as f64 * q).round() as usize];
        Stats {
            p50: at(0.5),
            p90: at(0.9),
            min: s[0],
            max: s[s.len() - 1],
        }
    }
}

impl std::fmt::Display for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "p50 {:>8.3} ms  p90 {:>8.3} ms  min {:>8.3} ms  max {:>8.3} ms",
            ms(self.p50),
            ms(self.p90),
            ms(self.min),
            ms(self.max)
        )
    }
}

/// The forkd-vmm binary to benchmark: `arg`, or the one built next to
/// this benchmark. Panics with what to build when it is missing.
pub fn vmm_binary(arg: Option<std::path::PathBuf>) -> std::path::PathBuf {
    let vmm = arg.unwrap_or_else(|| {
        std::env::current_exe()
            .expect("the benchmark's own path")
            .with_file_name("forkd-vmm")
    });
    assert!(
        vmm.exists(),
        "{} not found: build it first (cargo build --release --workspace)",
        vmm.display()
    );
    vmm
}

/// Starts `forkd-vmm run --builtin` with `mem_mib` of RAM, no console,
/// its control socket at `sock` and `extra` arguments (stdin closed).
pub fn start_builtin(
    vmm: &std::path::Path,
    sock: &std::path::Path,
    mem_mib: u64,
    extra: &[&str],
) -> std::process::Child {
    std::process::Command::new(vmm)
        .args(["run", "--builtin", "--console", "none", "--mem-mib"])
        .arg(mem_mib.to_string())
        .arg("--control-socket")
        .arg(sock)
        .args(extra)
        .stdin(std::process::Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", vmm.display()))
}

/// A fork server's request for `n` plain children (no console log, no
/// memfd, no namespaces) into `out`.
pub fn fork_request(n: u32, out: &std::path::Path) -> proto::control::ForkRequest {
    proto::control::ForkRequest::Fork {
        n,
        out_dir: out.to_owned(),
        paused: false,
        console_log: false,
        memfd: false,
        netns: Vec::new(),
        huge_pages: false,
        prewarm: false,
        limits: proto::control::Limits::default(),
        disk_quota_mib: None,
    }
}

/// One request to the fork server on `sock` (waiting up to 20 s for it to
/// listen), and its answer.
pub fn ask_fork_server(
    sock: &std::path::Path,
    req: &proto::control::ForkRequest,
) -> proto::control::ForkResponse {
    use std::io::{BufRead, BufReader, Write};
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut s = loop {
        match std::os::unix::net::UnixStream::connect(sock) {
            Ok(s) => break s,
            Err(e) => {
                assert!(Instant::now() < deadline, "fork server did not start: {e}");
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    };
    let mut line = serde_json::to_vec(req).unwrap();
    line.push(b'\n');
    s.write_all(&line).unwrap();
    let mut answer = String::new();
    BufReader::new(s).read_line(&mut answer).unwrap();
    serde_json::from_str(&answer).unwrap_or_else(|e| panic!("fork server said {answer:?}: {e}"))
}

/// Connects to every control socket in `sockets` and has its guest answer
/// a ping, on two client threads (one per core of the machines this runs
/// on), the sockets taken alternately; the clients, in no fixed order.
pub fn ping_all(sockets: &[&std::path::Path]) -> Vec<proto::control::ControlClient> {
    use proto::control::{ControlRequest, ControlResponse};
    let halves: [Vec<&std::path::Path>; 2] = [
        sockets.iter().step_by(2).copied().collect(),
        sockets.iter().skip(1).step_by(2).copied().collect(),
    ];
    std::thread::scope(|s| {
        let handles: Vec<_> = halves
            .into_iter()
            .map(|half| {
                s.spawn(move || {
                    half.into_iter()
                        .map(|sock| {
                            let mut c = connect_control(sock, Duration::from_secs(60));
                            let r = c
                                .call(&ControlRequest::Guest {
                                    request: proto::guest::GuestRequest::Ping,
                                    timeout_ms: Some(10_000),
                                })
                                .expect("ping");
                            assert!(matches!(r, ControlResponse::Guest { .. }), "ping: {r:?}");
                            c
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    })
}

/// Connects to a control socket, retrying for up to 20 s while the VMM
/// starts; calls on the client then wait up to `call_timeout`.
pub fn connect_control(
    sock: &std::path::Path,
    call_timeout: Duration,
) -> proto::control::ControlClient {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match proto::control::ControlClient::connect(sock, call_timeout) {
            Ok(c) => return c,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "cannot connect to {}: {e}",
                    sock.display()
                );
                std::thread::sleep(Duration::from_micros(100));
            }
        }
    }
}

/// A duration in milliseconds.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// A bare VM kept alive for as long as this value lives.
pub struct BareVm {
    _vcpu: kvm_ioctls::VcpuFd,
    _vm: kvm_ioctls::VmFd,
    host: *mut libc::c_void,
    len: usize,
}

impl Drop for BareVm {
    fn drop(&mut self) {
        // SAFETY: `host` is the mapping made for this VM; the VM and vCPU
        // fields are dropped after this body runs, but KVM holds no access
        // to the memory once userspace unmaps it, and nothing runs the vCPU.
        unsafe { libc::munmap(self.host, self.len) };
    }
}

/// The bare-KVM floor of starting one VM: create the VM, map and register
/// `mem_bytes` of private anonymous memory, create the irqchip and one
/// vCPU, and get and set its registers. Nothing a VMM could skip. Returns
/// the time it took and the VM (alive until dropped).
pub fn bare_kvm_vm(kvm: &Kvm, mem_bytes: usize) -> (Duration, BareVm) {
    let start = Instant::now();
    let vm = kvm.create_vm().expect("KVM_CREATE_VM");
    // SAFETY: anonymous private mapping with no address hint; checked below.
    let host = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            mem_bytes,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    assert_ne!(host, libc::MAP_FAILED, "mmap of guest memory");
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: mem_bytes as u64,
        userspace_addr: host as u64,
    };
    // SAFETY: the mapping above is live until the munmap below, after the VM is gone.
    unsafe { vm.set_user_memory_region(region) }.expect("KVM_SET_USER_MEMORY_REGION");
    vm.create_irq_chip().expect("KVM_CREATE_IRQCHIP");
    let vcpu = vm.create_vcpu(0).expect("KVM_CREATE_VCPU");
    let mut regs: kvm_regs = vcpu.get_regs().expect("KVM_GET_REGS");
    regs.rip = 0x1000;
    vcpu.set_regs(&regs).expect("KVM_SET_REGS");
    let elapsed = start.elapsed();
    (
        elapsed,
        BareVm {
            _vcpu: vcpu,
            _vm: vm,
            host,
            len: mem_bytes,
        },
    )
}
