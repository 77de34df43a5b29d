//! `forkd doctor`: what this host has of what forkd needs, one line each.
//!
//! Every check is a small function; the ones that read the system take what
//! they read as arguments where they can, so tests give them other systems.

use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

use crate::client::{routes, Client};
use crate::error::CliError;

/// How a check came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// Fine.
    Ok,
    /// Works with limits, or something optional is missing.
    Warn,
    /// forkd cannot run here until it is fixed.
    Fail,
}

impl Level {
    fn label(self) -> &'static str {
        match self {
            Level::Ok => "OK",
            Level::Warn => "WARN",
            Level::Fail => "FAIL",
        }
    }
}

/// One check's result.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// Short name.
    pub name: &'static str,
    /// How it came out.
    pub level: Level,
    /// What was found.
    pub detail: String,
    /// What to do about it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Check {
    fn ok(name: &'static str, detail: impl Into<String>) -> Self {
        Check {
            name,
            level: Level::Ok,
            detail: detail.into(),
            fix: None,
        }
    }

    fn warn(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Check {
            name,
            level: Level::Warn,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }

    fn fail(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Check {
            name,
            level: Level::Fail,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }

    /// The check as one line: level, name, what was found, `-> what to do`.
    pub fn line(&self) -> String {
        let mut s = format!(
            "{:<4}  {:<9}  {}",
            self.level.label(),
            self.name,
            self.detail
        );
        if let Some(f) = &self.fix {
            s.push_str(" -> ");
            s.push_str(f);
        }
        s
    }
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// `KVM_GET_API_VERSION = _IO(0xAE, 0x00)`.
const KVM_GET_API_VERSION: libc::c_ulong = 0xAE00;

/// /dev/kvm (or `path`) is there, opens read-write, and answers KVM's API
/// version ioctl with 12.
pub fn check_kvm(path: &Path) -> Check {
    let f = match OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Check::fail(
                "kvm",
                format!("{} does not exist", path.display()),
                "enable virtualization (VT-x/AMD-V) and load kvm_intel or kvm_amd, or use a host that offers KVM",
            )
        }
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            return Check::fail(
                "kvm",
                format!("{} is not accessible: {e}", path.display()),
                "run as root or add your user to the kvm group",
            )
        }
        Err(e) => {
            return Check::fail(
                "kvm",
                format!("cannot open {}: {e}", path.display()),
                "check the kvm modules (dmesg)",
            )
        }
    };
    // SAFETY: KVM_GET_API_VERSION takes no argument and returns an int.
    let v = unsafe { libc::ioctl(f.as_raw_fd(), KVM_GET_API_VERSION as _, 0) };
    match v {
        12 => Check::ok("kvm", format!("{} opens (KVM API 12)", path.display())),
        v if v < 0 => Check::fail(
            "kvm",
            format!(
                "{} opens but is not KVM: {}",
                path.display(),
                std::io::Error::from_raw_os_error(errno())
            ),
            "check what provides /dev/kvm",
        ),
        v => Check::fail(
            "kvm",
            format!("{} speaks KVM API {v}, not 12", path.display()),
            "use a Linux kernel with the stable KVM API",
        ),
    }
}

/// Whether the KVM module in use is PVM, from `/proc/modules` (if readable)
/// and whether `/sys/module/kvm_pvm` exists.
pub fn is_pvm(proc_modules: Option<&str>, sys_module_pvm: bool) -> bool {
    sys_module_pvm
        || proc_modules.is_some_and(|m| {
            m.lines()
                .any(|l| l.split_whitespace().next() == Some("kvm_pvm"))
        })
}

/// The hardware virtualization flag (`vmx` or `svm`) in `/proc/cpuinfo`.
pub fn virt_flag(cpuinfo: &str) -> Option<&'static str> {
    for line in cpuinfo.lines() {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        if k.trim() != "flags" {
            continue;
        }
        for f in v.split_whitespace() {
            match f {
                "vmx" => return Some("vmx"),
                "svm" => return Some("svm"),
                _ => {}
            }
        }
    }
    None
}

/// Which flavour of KVM this is, and what it means for guests.
pub fn check_pvm(pvm: bool, cpuinfo: &str) -> Check {
    if pvm {
        return Check::warn(
            "kvm-kind",
            "KVM here is PVM (kvm_pvm loaded): stock Linux guests do not boot on it; the built-in guest does",
            "use the built-in guest (forkd quickstart, forkd snapshot --builtin), or boot Linux guests in the nested lab (lab/run)",
        );
    }
    match virt_flag(cpuinfo) {
        Some(f) => Check::ok(
            "kvm-kind",
            format!("hardware virtualization ({f}): Linux and built-in guests both boot"),
        ),
        None => Check::warn(
            "kvm-kind",
            "neither PVM nor a vmx/svm CPU flag found: unknown KVM flavour",
            "if Linux guests fail to boot, use the built-in guest",
        ),
    }
}

/// `UFFDIO_API = _IOWR(0xAA, 0x3F, struct uffdio_api)`.
const UFFDIO_API: libc::c_ulong = 0xC018_AA3F;
/// `UFFD_API`.
const UFFD_API: u64 = 0xAA;
/// `UFFD_FEATURE_PAGEFAULT_FLAG_WP`: write-protect (anonymous memory).
pub const FEATURE_WP: u64 = 1 << 0;
/// `UFFD_FEATURE_WP_HUGETLBFS_SHMEM`: write-protect on shmem (memfd) and hugetlbfs.
pub const FEATURE_WP_SHMEM: u64 = 1 << 12;

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

/// The userfaultfd features this kernel offers, or the errno of the
/// syscall or of the `UFFDIO_API` handshake.
pub fn probe_uffd() -> Result<u64, i32> {
    // SAFETY: userfaultfd takes flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
    if fd < 0 {
        return Err(errno());
    }
    // SAFETY: fd is a new descriptor this function owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let mut api = UffdioApi {
        api: UFFD_API,
        features: 0,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API reads and writes a struct uffdio_api, mirrored above.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API as _, &mut api as *mut UffdioApi) };
    if r < 0 {
        return Err(errno());
    }
    Ok(api.features)
}

/// userfaultfd with write-protect on memfd memory (what live BRANCH uses).
pub fn check_uffd(probe: Result<u64, i32>, unprivileged: Option<&str>, root: bool) -> Check {
    match probe {
        Ok(f) if f & FEATURE_WP != 0 && f & FEATURE_WP_SHMEM != 0 => Check::ok(
            "uffd",
            "userfaultfd with write-protect on memfd memory (live BRANCH, live forks)",
        ),
        Ok(f) if f & FEATURE_WP != 0 => Check::warn(
            "uffd",
            "userfaultfd write-protects anonymous memory only, not memfd: live BRANCH is unavailable",
            "use Linux 5.19 or later (UFFD_FEATURE_WP_HUGETLBFS_SHMEM)",
        ),
        Ok(_) => Check::warn(
            "uffd",
            "userfaultfd without write-protect: live BRANCH is unavailable",
            "use Linux 5.19 or later built with CONFIG_HAVE_ARCH_USERFAULTFD_WP",
        ),
        Err(libc::ENOSYS) => Check::warn(
            "uffd",
            "no userfaultfd in this kernel: live BRANCH is unavailable",
            "use a kernel built with CONFIG_USERFAULTFD",
        ),
        Err(e @ (libc::EPERM | libc::EACCES)) => {
            let setting = unprivileged.map(str::trim).unwrap_or("?");
            let fix = if root {
                "check the seccomp or LSM policy that refuses userfaultfd".to_string()
            } else {
                format!(
                    "run forkd-daemon as root, or allow it: sysctl -w vm.unprivileged_userfaultfd=1 (now {setting})"
                )
            };
            Check::warn(
                "uffd",
                format!(
                    "userfaultfd refused ({}): live BRANCH is unavailable",
                    std::io::Error::from_raw_os_error(e)
                ),
                fix,
            )
        }
        Err(e) => Check::warn(
            "uffd",
            format!(
                "userfaultfd failed: {}",
                std::io::Error::from_raw_os_error(e)
            ),
            "live BRANCH is unavailable; check the kernel",
        ),
    }
}

/// Makes a 2 MiB memfd, maps it shared and writes it.
pub fn probe_memfd() -> Result<(), String> {
    const SIZE: usize = 2 << 20;
    // SAFETY: a NUL-terminated name and flags; returns a new fd or -1.
    let fd = unsafe { libc::memfd_create(c"forkd-doctor".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(format!("memfd_create: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: fd is a new descriptor this function owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: plain syscalls on our fd; the mapping is ours and unmapped below.
    unsafe {
        if libc::ftruncate(fd.as_raw_fd(), SIZE as libc::off_t) != 0 {
            return Err(format!("ftruncate: {}", std::io::Error::last_os_error()));
        }
        let p = libc::mmap(
            std::ptr::null_mut(),
            SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            0,
        );
        if p == libc::MAP_FAILED {
            return Err(format!("mmap: {}", std::io::Error::last_os_error()));
        }
        p.cast::<u8>().write_volatile(1);
        libc::munmap(p, SIZE);
    }
    Ok(())
}

/// memfd memory (live forks keep RAM in one).
pub fn check_memfd(probe: Result<(), String>) -> Check {
    match probe {
        Ok(()) => Check::ok("memfd", "memfd_create and a shared mapping work"),
        Err(e) => Check::fail(
            "memfd",
            format!("memfd does not work: {e}"),
            "use Linux 3.17 or later with shmem (live forks and BRANCH need memfd RAM)",
        ),
    }
}

/// Reserved 2 MiB huge pages (informational: live BRANCH arms faster on them).
pub fn check_hugetlb(nr: Option<u64>, free: Option<u64>) -> Check {
    match (nr, free) {
        (None, _) => Check::ok("hugetlb", "no hugetlb support (optional)"),
        (Some(0), _) => Check::ok(
            "hugetlb",
            "no huge pages reserved (optional: live BRANCH of 2 MiB-page RAM arms about 1000x faster; \
             reserve with echo 512 > /proc/sys/vm/nr_hugepages)",
        ),
        (Some(n), f) => Check::ok(
            "hugetlb",
            format!(
                "{n} huge pages reserved ({} free): --memory-backend memfd-hugetlb can use them",
                f.map(|f| f.to_string()).unwrap_or_else(|| "?".into())
            ),
        ),
    }
}

/// cgroup v1 controller names (mount options of a `cgroup` mount).
const V1_CONTROLLERS: &[&str] = &[
    "cpu",
    "cpuacct",
    "cpuset",
    "memory",
    "devices",
    "freezer",
    "net_cls",
    "net_prio",
    "blkio",
    "perf_event",
    "hugetlb",
    "pids",
    "rdma",
    "misc",
];

/// What `/proc/self/mounts` says of cgroups: cgroup2 mount points, and the
/// v1 controllers mounted.
pub fn cgroup_mounts(mounts: &str) -> (Vec<String>, Vec<String>) {
    let mut v2 = Vec::new();
    let mut v1 = Vec::new();
    for line in mounts.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 4 {
            continue;
        }
        match f[2] {
            "cgroup2" => v2.push(f[1].to_string()),
            "cgroup" => {
                for o in f[3].split(',') {
                    if V1_CONTROLLERS.contains(&o) && !v1.iter().any(|c| c == o) {
                        v1.push(o.to_string());
                    }
                }
            }
            _ => {}
        }
    }
    (v2, v1)
}

/// cgroups, v1 or v2 or both, and where the controllers of a sandbox's
/// limits are: memory (`memory_limit_mib`), cpu (`cpu_limit`), pids
/// (`pids_limit`, and the daemon's default task limit) and io (v1 blkio;
/// `io_limit_mibps`). `v2_controllers`
/// reads `cgroup.controllers` under a cgroup2 mount point.
pub fn check_cgroups(mounts: &str, v2_controllers: impl Fn(&str) -> Option<String>) -> Check {
    let (v2, v1) = cgroup_mounts(mounts);
    let layout = match (v1.is_empty(), v2.is_empty()) {
        (true, true) => {
            return Check::warn(
                "cgroups",
                "no cgroup filesystem mounted: sandboxes get no cgroup, and no memory, CPU or task limits",
                "mount -t cgroup2 none /sys/fs/cgroup",
            )
        }
        (true, false) => format!("cgroup v2 at {}", v2.join(", ")),
        (false, true) => format!("cgroup v1 ({})", v1.join(", ")),
        (false, false) => format!(
            "hybrid: cgroup v1 ({}) and cgroup v2 at {}",
            v1.join(", "),
            v2.join(", ")
        ),
    };
    let mut found = Vec::new();
    let mut missing = Vec::new();
    for (controller, in_v1, field) in [
        ("memory", "memory", "memory_limit_mib"),
        ("cpu", "cpu", "cpu_limit"),
        ("pids", "pids", "pids_limit"),
        ("io", "blkio", "io_limit_mibps"),
    ] {
        let in_v2 = v2.iter().find(|mp| {
            v2_controllers(mp).is_some_and(|c| c.split_whitespace().any(|x| x == controller))
        });
        match in_v2 {
            Some(mp) => found.push(format!("{controller} in v2 at {mp}")),
            None if v1.iter().any(|c| c == in_v1) => found.push(format!("{in_v1} in v1")),
            None => missing.push((controller, field)),
        }
    }
    let detail = format!("{layout}; controllers: {}", found.join(", "));
    if missing.is_empty() {
        return Check::ok("cgroups", detail);
    }
    let names: Vec<&str> = missing.iter().map(|(c, _)| *c).collect();
    let fields: Vec<&str> = missing.iter().map(|(_, f)| *f).collect();
    Check::warn(
        "cgroups",
        format!(
            "{detail}; no {} controller: {} will not work",
            names.join(" or "),
            fields.join(" and ")
        ),
        "enable it (cgroup_enable=memory on the kernel command line for memory; +CONTROLLER in the parent's cgroup.subtree_control on v2)",
    )
}

/// Opening the tun device (a tap per sandbox network).
pub fn check_tun(path: &Path) -> Check {
    match OpenOptions::new().read(true).write(true).open(path) {
        Ok(_) => Check::ok("tun", format!("{} opens (tap devices)", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Check::warn(
            "tun",
            format!(
                "{} does not exist: sandboxes get no network",
                path.display()
            ),
            "modprobe tun",
        ),
        Err(e) => Check::warn(
            "tun",
            format!(
                "cannot open {}: {e}: sandboxes get no network",
                path.display()
            ),
            "run forkd-daemon as root (or with CAP_NET_ADMIN)",
        ),
    }
}

/// An executable named `name` on `PATH` or in the sbin directories.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Whether a network namespace holding a tap can be made, as the daemon
/// makes one per sandbox of a snapshot with a network interface (`probe`:
/// the outcome of making and removing one).
pub fn check_netns(probe: Result<(), String>) -> Check {
    match probe {
        Ok(()) => Check::ok(
            "netns",
            format!(
                "a network namespace with a tap can be made (in {})",
                netif::netns::RUN_DIR
            ),
        ),
        Err(e) => Check::warn(
            "netns",
            format!("cannot make a network namespace with a tap: {e}: no networked sandboxes"),
            "run forkd-daemon as root (or with CAP_NET_ADMIN and CAP_SYS_ADMIN), with /dev/net/tun",
        ),
    }
}

/// Makes (and removes) a network namespace with loopback up and a
/// persistent tap, what the daemon does for a networked sandbox.
fn probe_netns() -> Result<(), String> {
    let name = format!("forkd-doctor-{}", std::process::id());
    netif::netns::create(&name, || {
        netif::iface::set_up("lo")?;
        netif::tun::create_persistent_tap("forkd-doctor")?;
        netif::iface::set_up("forkd-doctor")
    })
    .map_err(|e| e.to_string())?;
    netif::netns::remove(&name).map_err(|e| e.to_string())
}

/// QEMU for the nested lab (Linux guests on a PVM host).
pub fn check_qemu(qemu: Option<&Path>) -> Check {
    match qemu {
        Some(p) => Check::ok("qemu", format!("{} (the nested lab can run)", p.display())),
        None => Check::warn(
            "qemu",
            "qemu-system-x86_64 not found (only the nested lab needs it)",
            "apt-get install qemu-system-x86 (or run .ci/setup)",
        ),
    }
}

/// Free bytes for unprivileged users at `dir`, or its nearest existing
/// ancestor (returned with the figure).
pub fn free_space(dir: &Path) -> Result<(PathBuf, u64), String> {
    let mut p = dir.to_path_buf();
    while !p.exists() {
        if !p.pop() {
            return Err(format!("no existing directory above {}", dir.display()));
        }
    }
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes())
        .map_err(|_| format!("{} has a NUL byte", p.display()))?;
    // SAFETY: statvfs writes a struct statvfs we own.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a valid out pointer.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(format!(
            "statvfs {}: {}",
            p.display(),
            std::io::Error::last_os_error()
        ));
    }
    Ok((p, st.f_bavail as u64 * st.f_frsize as u64))
}

/// Below this much free space in the state directory, warn.
pub const MIN_FREE: u64 = 5 << 30;

/// Free disk space where the daemon keeps snapshots.
pub fn check_disk(state_dir: &Path, free: Result<(PathBuf, u64), String>) -> Check {
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    match free {
        Err(e) => Check::warn(
            "disk",
            format!(
                "cannot tell the free space for {}: {e}",
                state_dir.display()
            ),
            "set FORKD_STATE_DIR (or --state-dir) to a directory on a local disk",
        ),
        Ok((at, b)) => {
            let where_ = if at == state_dir {
                format!("in {}", state_dir.display())
            } else {
                format!(
                    "for {} (on {}; not made yet)",
                    state_dir.display(),
                    at.display()
                )
            };
            if b < MIN_FREE {
                Check::warn(
                    "disk",
                    format!(
                        "only {:.1} GiB free {where_}: snapshots hold guest RAM",
                        gib(b)
                    ),
                    "free space, or set FORKD_STATE_DIR (--state-dir) to a disk with 5 GiB or more",
                )
            } else {
                Check::ok("disk", format!("{:.1} GiB free {where_}", gib(b)))
            }
        }
    }
}

/// forkd-vmm and forkd-daemon next to forkd (in `dir`).
pub fn check_binaries(dir: &Path) -> Check {
    let missing: Vec<&str> = ["forkd-vmm", "forkd-daemon"]
        .into_iter()
        .filter(|b| !is_executable(&dir.join(b)))
        .collect();
    if missing.is_empty() {
        Check::ok(
            "binaries",
            format!("forkd-vmm and forkd-daemon in {}", dir.display()),
        )
    } else {
        Check::warn(
            "binaries",
            format!("{} not in {}", missing.join(" and "), dir.display()),
            "build them next to forkd: cargo build --release --workspace",
        )
    }
}

/// Whether the daemon at `url` answered `/healthz` (with its version).
pub fn check_daemon(url: &str, health: Result<Option<String>, CliError>) -> Check {
    match health {
        Ok(v) => Check::ok(
            "daemon",
            match v {
                Some(v) => format!("forkd-daemon {v} answers at {url}"),
                None => format!("forkd-daemon answers at {url}"),
            },
        ),
        Err(CliError::Unreachable { .. }) => Check::warn(
            "daemon",
            format!("no daemon answers at {url}"),
            "start one: forkd-daemon serve (or forkd quickstart starts its own); or set FORKD_URL",
        ),
        Err(e) => Check::warn("daemon", format!("{url}: {e}"), "check the daemon's log"),
    }
}

/// What `/proc/<pid>/status` says of one VMM's confinement.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcConfinement {
    /// `Seccomp: 2` (its threads have filters; the main thread's status
    /// is the one read).
    pub seccomp: bool,
    /// Jailed: a uid other than root's, no capability (effective,
    /// permitted or bounding) and a root of its own (not the host's `/`).
    pub jailed: bool,
}

/// Reads `/proc/<pid>/status`; `None` when the process is gone.
pub fn proc_confinement(pid: i32) -> Option<ProcConfinement> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
            .map(str::to_owned)
    };
    let zero = |name: &str| field(name).is_some_and(|v| v.bytes().all(|b| b == b'0'));
    let root = field("Uid:").is_none_or(|u| u.split_whitespace().any(|id| id == "0"));
    let own_root = {
        use std::os::unix::fs::MetadataExt;
        let host = std::fs::metadata("/").ok()?;
        let theirs = std::fs::metadata(format!("/proc/{pid}/root")).ok()?;
        (theirs.dev(), theirs.ino()) != (host.dev(), host.ino())
    };
    Some(ProcConfinement {
        seccomp: field("Seccomp:").as_deref() == Some("2"),
        jailed: !root && own_root && zero("CapEff:") && zero("CapPrm:") && zero("CapBnd:"),
    })
}

/// How the running daemon's sandboxes are confined, from its
/// `GET /v1/sandboxes` and each VMM's `/proc/<pid>/status` (`probe`): the
/// cgroup each is in, the limits they have, how many run under seccomp
/// filters, and, loudly, what does not confine them yet.
pub fn check_confinement(
    sandboxes: &[proto::api::SandboxInfo],
    probe: impl Fn(i32) -> Option<ProcConfinement>,
) -> Check {
    let n = sandboxes.len();
    let grouped = sandboxes.iter().filter(|s| s.cgroup.is_some()).count();
    let probed: Vec<ProcConfinement> = sandboxes.iter().filter_map(|s| probe(s.pid)).collect();
    let filtered = probed.iter().filter(|p| p.seccomp).count();
    let unfiltered = probed.len() - filtered;
    let mut limits: std::collections::BTreeMap<String, usize> = Default::default();
    for s in sandboxes {
        let each = [
            s.memory_limit_mib.map(|m| format!("memory {m} MiB")),
            s.cpu_limit.map(|c| format!("cpu {c}")),
            s.pids_limit.map(|p| format!("pids {p}")),
            s.io_limit_mibps.map(|m| format!("io {m} MiB/s")),
        ];
        for l in each.into_iter().flatten() {
            *limits.entry(l).or_default() += 1;
        }
    }
    let limits = match limits.is_empty() {
        true => "no limits".to_owned(),
        false => limits
            .iter()
            .map(|(l, k)| format!("{l} ({k})"))
            .collect::<Vec<_>>()
            .join(", "),
    };
    let seccomp = match unfiltered {
        0 => format!("{filtered} under seccomp filters"),
        k => format!(
            "{filtered} under seccomp filters, {k} WITHOUT (a daemon started with --no-seccomp)"
        ),
    };
    let jailed = probed.iter().filter(|p| p.jailed).count();
    let unjailed = probed.len() - jailed;
    let jail = match unjailed {
        0 => format!("{jailed} jailed (a uid of their own, no capabilities, a root of their own)"),
        k => format!(
            "{jailed} jailed, {k} AS ROOT with every capability and the host's files (a daemon started with --no-jail)"
        ),
    };
    let detail = format!(
        "{n} sandboxes running, {grouped} in a cgroup of their own, {seccomp}, {jail}; \
         limits: {limits}"
    );
    if unfiltered == 0 && unjailed == 0 {
        return Check::ok("confinement", detail);
    }
    Check::warn(
        "confinement",
        detail,
        "restart the daemon without --no-seccomp and --no-jail: those are for debugging (README: Threat model)",
    )
}

fn read_u64(path: &str) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Every check on this host.
pub fn run_all(state_dir: &Path, client: &Client) -> Vec<Check> {
    let proc_modules = std::fs::read_to_string("/proc/modules").ok();
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let pvm = is_pvm(
        proc_modules.as_deref(),
        Path::new("/sys/module/kvm_pvm").exists(),
    );
    let unprivileged = std::fs::read_to_string("/proc/sys/vm/unprivileged_userfaultfd").ok();
    // SAFETY: geteuid cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let exe_dir = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("."));
    let quick = client.with_timeout(Duration::from_secs(3));
    let health = quick.get(routes::HEALTHZ).map(|_| {
        quick
            .get(routes::VERSION)
            .ok()
            .and_then(|a| a.parse::<proto::api::Version>().ok())
            .map(|v| v.version)
    });
    let mut checks = vec![
        check_kvm(Path::new("/dev/kvm")),
        check_pvm(pvm, &cpuinfo),
        check_uffd(probe_uffd(), unprivileged.as_deref(), root),
        check_memfd(probe_memfd()),
        check_hugetlb(
            read_u64("/proc/sys/vm/nr_hugepages"),
            read_u64("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages"),
        ),
        check_cgroups(&mounts, |mp| {
            std::fs::read_to_string(Path::new(mp).join("cgroup.controllers")).ok()
        }),
        check_tun(Path::new("/dev/net/tun")),
        check_netns(probe_netns()),
        check_qemu(which("qemu-system-x86_64").as_deref()),
        check_disk(state_dir, free_space(state_dir)),
        check_binaries(&exe_dir),
    ];
    let answers = health.is_ok();
    checks.push(check_daemon(client.base(), health));
    if answers {
        let listed = quick
            .get(routes::SANDBOXES)
            .and_then(|a| a.parse::<Vec<proto::api::SandboxInfo>>());
        checks.push(match listed {
            Ok(sandboxes) => check_confinement(&sandboxes, proc_confinement),
            Err(e) => Check::warn(
                "confinement",
                format!("cannot list the daemon's sandboxes: {e}"),
                "give forkd the daemon's token (--daemon-token-file or FORKD_TOKEN)",
            ),
        });
    }
    checks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confinement_tells_groups_and_limits_and_what_is_missing() {
        let sb = |id: &str, mem: Option<u64>, cpu: Option<f64>| proto::api::SandboxInfo {
            id: id.into(),
            memory_limit_mib: mem,
            cpu_limit: cpu,
            pids_limit: Some(1024),
            cgroup: Some(format!("forkd/i/{id}")),
            ..Default::default()
        };
        let (a, b) = (sb("a", Some(256), Some(0.5)), sb("b", None, None));
        let (a, b) = (
            proto::api::SandboxInfo { pid: 10, ..a },
            proto::api::SandboxInfo { pid: 11, ..b },
        );
        let filtered = |pid| {
            Some(ProcConfinement {
                seccomp: pid == 10,
                jailed: pid == 11,
            })
        };
        let c = check_confinement(&[a, b], filtered);
        assert_eq!(c.level, Level::Warn);
        assert!(
            c.detail.starts_with(
                "2 sandboxes running, 2 in a cgroup of their own, 1 under seccomp filters, 1 \
                 WITHOUT (a daemon started with --no-seccomp), 1 jailed, 1 AS ROOT with every \
                 capability and the host's files (a daemon started with --no-jail); limits: \
                 cpu 0.5 (1), memory 256 MiB (1), pids 1024 (2)"
            ),
            "{}",
            c.detail
        );
        assert!(c.fix.unwrap().contains("Threat model"));
        let c = check_confinement(&[], |_| None);
        assert_eq!(c.level, Level::Ok);
        assert!(c.detail.starts_with(
            "0 sandboxes running, 0 in a cgroup of their own, 0 under seccomp filters, 0 jailed \
             (a uid of their own, no capabilities, a root of their own); limits: no limits"
        ));
        // This process (the tests run as root) has no filter and no jail.
        let me = proc_confinement(std::process::id() as i32).unwrap();
        assert!(!me.seccomp && !me.jailed);
    }

    #[test]
    fn a_missing_kvm_device_fails_and_says_why() {
        let c = check_kvm(Path::new("/nonexistent/kvm"));
        assert_eq!(c.level, Level::Fail);
        assert!(c.detail.contains("does not exist"), "{}", c.detail);
    }

    #[test]
    fn a_device_that_is_not_kvm_fails() {
        let c = check_kvm(Path::new("/dev/null"));
        assert_eq!(c.level, Level::Fail);
        assert!(c.detail.contains("not KVM"), "{}", c.detail);
    }

    #[test]
    fn pvm_is_found_in_proc_modules_or_sys_module() {
        let m = "kvm_pvm 1234 0 - Live 0x0\nkvm 99 1 kvm_pvm, Live 0x0\n";
        assert!(is_pvm(Some(m), false));
        assert!(is_pvm(None, true));
        assert!(!is_pvm(
            Some("kvm_intel 1 0 - Live 0x0\nkvm 2 1 kvm_intel\n"),
            false
        ));
        assert!(!is_pvm(None, false));
    }

    #[test]
    fn pvm_warns_and_hardware_virtualization_is_ok() {
        assert_eq!(check_pvm(true, "").level, Level::Warn);
        assert!(check_pvm(true, "").detail.contains("built-in guest does"));
        let cpuinfo = "processor\t: 0\nflags\t\t: fpu vme svm lm\n";
        let c = check_pvm(false, cpuinfo);
        assert_eq!(c.level, Level::Ok);
        assert!(c.detail.contains("svm"));
        assert_eq!(virt_flag("flags : fpu vmx"), Some("vmx"));
        assert_eq!(virt_flag("flags : fpu\nvmx_flags : vmx"), None);
        assert_eq!(check_pvm(false, "flags : fpu").level, Level::Warn);
    }

    #[test]
    fn uffd_needs_write_protect_on_shmem() {
        assert_eq!(
            check_uffd(Ok(FEATURE_WP | FEATURE_WP_SHMEM), None, true).level,
            Level::Ok
        );
        let c = check_uffd(Ok(FEATURE_WP), None, true);
        assert_eq!(c.level, Level::Warn);
        assert!(c.detail.contains("anonymous memory only"));
        assert_eq!(check_uffd(Ok(0), None, true).level, Level::Warn);
        assert_eq!(check_uffd(Err(libc::ENOSYS), None, true).level, Level::Warn);
    }

    #[test]
    fn uffd_refused_to_a_user_names_the_sysctl() {
        let c = check_uffd(Err(libc::EPERM), Some("0\n"), false);
        assert_eq!(c.level, Level::Warn);
        let fix = c.fix.unwrap();
        assert!(fix.contains("vm.unprivileged_userfaultfd=1"), "{fix}");
        assert!(fix.contains("now 0"), "{fix}");
        let c = check_uffd(Err(libc::EPERM), Some("0"), true);
        assert!(c.fix.unwrap().contains("seccomp"));
    }

    #[test]
    fn uffd_and_memfd_probes_run_here() {
        // Whatever this kernel offers, the probes must not crash, and memfd
        // is in every kernel the project supports.
        let _ = check_uffd(probe_uffd(), None, true);
        assert_eq!(check_memfd(probe_memfd()).level, Level::Ok);
        assert_eq!(check_memfd(Err("x".into())).level, Level::Fail);
    }

    #[test]
    fn hugetlb_is_informational() {
        for (nr, free) in [(None, None), (Some(0), Some(0)), (Some(512), Some(500))] {
            assert_eq!(check_hugetlb(nr, free).level, Level::Ok);
        }
        assert!(check_hugetlb(Some(512), Some(500))
            .detail
            .contains("512 huge pages reserved (500 free)"));
    }

    const HYBRID: &str = "\
tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,nosuid,nodev,noexec,relatime 0 0
cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0
cgroup /sys/fs/cgroup/memory cgroup rw,nosuid,relatime,memory 0 0
cgroup /sys/fs/cgroup/systemd cgroup rw,relatime,name=systemd 0 0
";
    /// This development host's: memory, cpu, pids and blkio on v1.
    const HYBRID_ALL: &str = "\
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0
cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0
cgroup /sys/fs/cgroup/pids cgroup rw,relatime,pids 0 0
cgroup /sys/fs/cgroup/blkio cgroup rw,relatime,blkio 0 0
";
    const PURE_V2: &str = "cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid,nodev,noexec,relatime 0 0\n";

    #[test]
    fn cgroup_mounts_are_read() {
        let (v2, v1) = cgroup_mounts(HYBRID);
        assert_eq!(v2, ["/sys/fs/cgroup/unified"]);
        assert_eq!(v1, ["cpu", "memory"]);
    }

    #[test]
    fn cgroups_v1_hybrid_and_v2_are_all_fine_with_their_controllers() {
        let c = check_cgroups(HYBRID_ALL, |_| Some(String::new()));
        assert_eq!(c.level, Level::Ok, "{}", c.detail);
        assert!(c.detail.starts_with("hybrid"), "{}", c.detail);
        assert!(
            c.detail
                .contains("memory in v1, cpu in v1, pids in v1, blkio in v1"),
            "{}",
            c.detail
        );
        let c = check_cgroups(PURE_V2, |mp| {
            (mp == "/sys/fs/cgroup").then(|| "cpuset cpu io memory pids\n".to_string())
        });
        assert_eq!(c.level, Level::Ok);
        assert!(
            c.detail.contains("memory in v2 at /sys/fs/cgroup"),
            "{}",
            c.detail
        );
        // Without pids and blkio: the task and disk limits are named.
        let c = check_cgroups(HYBRID, |_| Some(String::new()));
        assert_eq!(c.level, Level::Warn);
        assert!(
            c.detail
                .contains("no pids or io controller: pids_limit and io_limit_mibps will not work"),
            "{}",
            c.detail
        );
    }

    #[test]
    fn cgroups_without_memory_or_at_all_warn() {
        let c = check_cgroups(PURE_V2, |_| Some("cpu pids io".into()));
        assert_eq!(c.level, Level::Warn);
        assert!(
            c.detail.contains("no memory controller: memory_limit_mib"),
            "{}",
            c.detail
        );
        let c = check_cgroups("proc /proc proc rw 0 0\n", |_| None);
        assert_eq!(c.level, Level::Warn);
        assert!(c.fix.unwrap().contains("mount -t cgroup2"));
    }

    #[test]
    fn missing_tun_warns() {
        assert_eq!(check_tun(Path::new("/nonexistent/tun")).level, Level::Warn);
        assert!(check_tun(Path::new("/nonexistent/tun"))
            .fix
            .unwrap()
            .contains("modprobe tun"));
    }

    /// The probe makes a real namespace (as root, like the tests) and
    /// leaves none behind; a failed one warns with what to do.
    #[test]
    fn netns_is_probed_for_real() {
        let c = check_netns(probe_netns());
        assert_eq!(c.level, Level::Ok, "{}", c.detail);
        assert!(!netif::netns::path(&format!("forkd-doctor-{}", std::process::id())).exists());
        let c = check_netns(Err("operation not permitted".into()));
        assert_eq!(c.level, Level::Warn);
        assert!(c.fix.unwrap().contains("root"));
    }

    #[test]
    fn qemu_is_optional() {
        assert_eq!(check_qemu(None).level, Level::Warn);
        assert_eq!(
            check_qemu(Some(Path::new("/usr/bin/qemu-system-x86_64"))).level,
            Level::Ok
        );
    }

    #[test]
    fn disk_warns_under_5_gib() {
        let d = Path::new("/var/lib/forkd");
        assert_eq!(check_disk(d, Ok((d.into(), 4 << 30))).level, Level::Warn);
        let c = check_disk(d, Ok((d.into(), 20 << 30)));
        assert_eq!(c.level, Level::Ok);
        assert!(
            c.detail.starts_with("20.0 GiB free in /var/lib/forkd"),
            "{}",
            c.detail
        );
        let c = check_disk(d, Ok(("/var".into(), 20 << 30)));
        assert!(c.detail.contains("not made yet"), "{}", c.detail);
        assert_eq!(check_disk(d, Err("x".into())).level, Level::Warn);
    }

    #[test]
    fn free_space_climbs_to_an_existing_directory() {
        let dir = tempfile::tempdir().unwrap();
        let (at, _) = free_space(&dir.path().join("a/b")).unwrap();
        assert_eq!(at, dir.path());
    }

    #[test]
    fn binaries_are_looked_for_next_to_forkd() {
        let dir = tempfile::tempdir().unwrap();
        let c = check_binaries(dir.path());
        assert_eq!(c.level, Level::Warn);
        assert!(
            c.detail.contains("forkd-vmm and forkd-daemon"),
            "{}",
            c.detail
        );
        for b in ["forkd-vmm", "forkd-daemon"] {
            let p = dir.path().join(b);
            std::fs::write(&p, "#!/bin/sh\n").unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        assert_eq!(check_binaries(dir.path()).level, Level::Ok);
    }

    #[test]
    fn daemon_check_says_how_to_start_one() {
        let url = "http://127.0.0.1:8889";
        let c = check_daemon(
            url,
            Err(CliError::Unreachable {
                url: url.into(),
                detail: "refused".into(),
            }),
        );
        assert_eq!(c.level, Level::Warn);
        assert!(c.fix.unwrap().contains("forkd-daemon serve"));
        let c = check_daemon(url, Ok(Some("0.1.0".into())));
        assert_eq!(c.level, Level::Ok);
        assert!(c.detail.contains("0.1.0"));
    }

    #[test]
    fn lines_show_level_name_detail_and_fix() {
        let c = Check::warn("qemu", "not found", "apt-get install qemu-system-x86");
        assert_eq!(
            c.line(),
            "WARN  qemu       not found -> apt-get install qemu-system-x86"
        );
        assert_eq!(Check::ok("kvm", "fine").line(), "OK    kvm        fine");
    }
}
