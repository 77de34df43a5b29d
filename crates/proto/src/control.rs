//! forkd-vmm's control socket: a Unix stream socket; the client writes one
//! JSON request per line and reads one JSON response per line.

use serde::{Deserialize, Serialize};

use crate::guest::{GuestRequest, GuestResponse};

/// Longest request line the VMM reads; longer lines are refused.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// Longest guest memory read `peek` answers.
pub const MAX_PEEK_BYTES: u64 = 4096;

/// A request on the control socket.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ControlRequest {
    /// Stop all vCPUs with their state consistent.
    Pause,
    /// Let paused vCPUs run again.
    Resume,
    /// What the VM is doing.
    Status,
    /// End the VM and the process.
    Shutdown,
    /// Forward a request to the guest and wait for its answer.
    Guest {
        /// The request.
        request: GuestRequest,
        /// How long to wait for the guest, in milliseconds (default 10 s).
        #[serde(default)]
        timeout_ms: Option<u64>,
    },
    /// Write a snapshot of the VM to `dir` (which must not exist). The VM
    /// is paused for the copy and then resumed, unless `leave_paused`.
    Snapshot {
        /// Destination directory.
        dir: std::path::PathBuf,
        /// Stay paused afterwards.
        #[serde(default)]
        leave_paused: bool,
        /// What the pause holds (default: full).
        #[serde(default)]
        mode: SnapshotMode,
        /// For live: answer once the copy is done (default); with false,
        /// answer as soon as the VM runs again, the snapshot `writing` until
        /// the copy ends.
        #[serde(default = "default_true")]
        wait: bool,
        /// For full: also write, inside the pause, the diff a diff
        /// snapshot would have written (then drop it), and report its cost
        /// ([`DiffCost`]). Left out when false.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        measure_diff: bool,
    },
    /// Read guest memory (at most [`MAX_PEEK_BYTES`]) without involving the guest.
    Peek {
        /// Guest-physical address.
        addr: u64,
        /// Bytes to read.
        len: u64,
    },
    /// A test of the VMM's confinement: the thread serving it makes a
    /// system call no VMM thread may make (`execve` with null arguments,
    /// harmless when let through). Under its seccomp filter the VMM ends
    /// with [`SECCOMP_VIOLATION_EXIT_CODE`] and no answer; without one,
    /// the answer is an error saying the call went through.
    SeccompSelfTest,
    /// A test of the VMM's task limit: the thread serving it starts up to
    /// `threads` (at most [`MAX_SELF_TEST_THREADS`]) threads that wait,
    /// counts those the kernel let it start, then ends them all
    /// ([`ControlResponse::Threads`]). Under a cgroup `pids.max` below
    /// what the VMM has plus `threads`, the kernel refuses the rest.
    ThreadsSelfTest {
        /// How many threads to try.
        threads: u32,
    },
}

/// Most threads a [`ControlRequest::ThreadsSelfTest`] tries.
pub const MAX_SELF_TEST_THREADS: u32 = 4096;

fn default_true() -> bool {
    true
}

/// How a snapshot (BRANCH) captures memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotMode {
    /// Write all of RAM while paused.
    #[default]
    Full,
    /// Write the pages changed since the VM's last snapshot (or the snapshot
    /// it was restored from) while paused, over that snapshot.
    Diff,
    /// Pause only to save CPU state and write-protect RAM (userfaultfd); copy
    /// RAM in the background while the VM runs, a page a guest writes first
    /// being copied before its write goes through. Needs memfd RAM.
    Live,
}

/// VM run state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    /// vCPUs are running.
    Running,
    /// vCPUs are stopped with consistent state.
    Paused,
    /// The VM has ended.
    Stopped,
}

/// Answer to [`ControlRequest::Status`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStatus {
    /// Run state.
    pub state: RunState,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Guest RAM in MiB.
    pub mem_mib: u64,
    /// `anonymous`, `memfd` or `file`.
    pub memory_backend: String,
    /// Resident set size of the VMM process, in bytes.
    pub rss_bytes: u64,
    /// Why the VM stopped, once it has.
    pub exit_reason: Option<String>,
    /// The most data its drives' own CoW layers may each hold, in bytes;
    /// absent without a quota (or a drive).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_quota_bytes: Option<u64>,
    /// Guest writes refused because a CoW layer held its quota (the guest
    /// saw each as an I/O error).
    #[serde(default)]
    pub disk_quota_refusals: u64,
}

/// A response on the control socket.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum ControlResponse {
    /// Done, nothing to report.
    Ok,
    /// Answer to status.
    Status(VmStatus),
    /// The guest's answer.
    Guest {
        /// The answer.
        response: GuestResponse,
    },
    /// The written snapshot's metadata (its snapshot.json).
    Snapshot {
        /// The metadata (boxed: it is far larger than the other answers).
        meta: Box<crate::snapshot::SnapshotMeta>,
        /// How long the VM was paused for it, in milliseconds (absent when
        /// it was paused before, or was left paused).
        #[serde(default)]
        pause_ms: Option<f64>,
        /// What the diff cost: a diff snapshot's own, or the one a full
        /// snapshot measured (`measure_diff`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        diff: Option<DiffCost>,
    },
    /// Answer to [`ControlRequest::ThreadsSelfTest`].
    Threads {
        /// How many threads started (and have ended again).
        started: u32,
        /// Why the next one could not start, when one could not.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        refused: Option<String>,
    },
    /// Bytes read by peek, hex-encoded.
    Peek {
        /// Lower-case hex, two digits a byte.
        hex: String,
    },
    /// The request failed.
    Error {
        /// What went wrong and what to do.
        message: String,
    },
}

/// What writing a diff of guest memory cost.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiffCost {
    /// Microseconds writing it (in the pause).
    pub write_us: u64,
    /// Bytes it takes on disk (its pages and their map).
    pub physical_bytes: u64,
    /// Bytes of guest memory it covers (changed pages).
    pub logical_bytes: u64,
}

/// A request to a fork server (`forkd-vmm fork-server`): a process that
/// holds one snapshot read and checked, and forks children of it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ForkRequest {
    /// Start `n` children under `out_dir` (child i in `<out_dir>/<i>/`).
    Fork {
        /// How many (1 to 1000).
        n: u32,
        /// Where their directories go.
        out_dir: std::path::PathBuf,
        /// Start them paused.
        #[serde(default)]
        paused: bool,
        /// Keep their consoles in `console.log`.
        #[serde(default)]
        console_log: bool,
        /// Give each child a copy of the snapshot's memory in a memfd
        /// instead of mapping the memory file copy-on-write, so the child
        /// can be live-BRANCHed (costs a copy per child; default false).
        /// Left out of the request when false: the line is what it was
        /// before the field existed.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        memfd: bool,
        /// One network namespace per child, in order (exactly `n` when
        /// given; names under /var/run/netns, 1 to 64 of `A-Za-z0-9_.-`):
        /// each child attaches its network interfaces to the taps its
        /// snapshot names inside its own namespace. Needed when the
        /// snapshot has network interfaces and `n` > 1. Left out of the
        /// request when empty: the line is what it was before the field
        /// existed.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        netns: Vec<String>,
        /// The memfd on 2 MiB huge pages (with `memfd`; needs huge pages
        /// reserved for every child's RAM). Left out when false.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        huge_pages: bool,
        /// Each child faults its RAM in for reading right after its
        /// restore, before it serves its control socket, so its first
        /// snapshot reads RAM without page faults. Left out when false.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        prewarm: bool,
        /// The cgroup limits of every child's VMM process (for a server
        /// started with `--cgroup-parent`: each child is in a group of its
        /// own). Left out: none (a server with parents still groups each
        /// child, unlimited). Left out of the request when empty.
        #[serde(default, skip_serializing_if = "Limits::is_none")]
        limits: Limits,
        /// The most data each child's own CoW layers may hold, in MiB (1 to
        /// [`crate::api::DISK_QUOTA_MIB_MAX`]): past it a guest write fails
        /// as an I/O error. Left out: no quota (and of the request).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        disk_quota_mib: Option<u64>,
    },
    /// Stop serving (the children run on).
    Shutdown,
}

/// One child started by a fork.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForkedChild {
    /// Its index in the request.
    pub index: u32,
    /// Its process id.
    pub pid: i32,
    /// Its directory.
    pub dir: std::path::PathBuf,
    /// Its control socket (bound before it was forked: connect at once).
    pub control_socket: std::path::PathBuf,
    /// Its vsock socket, when the snapshot has a vsock device.
    pub vsock_socket: Option<std::path::PathBuf>,
    /// The name of its cgroup under each of the server's
    /// `--cgroup-parent`s (the same name under each), when it has one:
    /// the child is in it before its guest runs; whoever removes the
    /// child removes the group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
}

/// The cgroup limits of one VMM process; `None` is no limit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Memory, in MiB (cgroup v2 `memory.max`, v1
    /// `memory.limit_in_bytes`): past it, the kernel reclaims and then
    /// kills the VMM (its guest's RAM is its memory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mib: Option<u64>,
    /// CPU time, in thousandths of a CPU per period (v2 `cpu.max`, v1
    /// `cpu.cfs_quota_us`): 500 is half of one CPU, 2000 two CPUs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_millis: Option<u32>,
    /// Tasks (threads) of the process (`pids.max`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pids: Option<u64>,
    /// Disk bandwidth on one block device, each way (v2 `io.max`, v1
    /// `blkio.throttle.{read,write}_bps_device`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io: Option<IoLimit>,
}

/// A disk bandwidth cap: bytes per second read, and as many written, on
/// block device `major:minor` (a whole disk: the kernel throttles disks,
/// not partitions).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoLimit {
    /// The device's major number.
    pub major: u32,
    /// Its minor number.
    pub minor: u32,
    /// Bytes per second, each way.
    pub bytes_per_sec: u64,
}

impl Limits {
    /// No limit at all.
    pub fn is_none(&self) -> bool {
        *self == Limits::default()
    }
}

/// A jailed VMM's uid and gid are this plus its pid (`forkd-vmm --jail`):
/// unique among running VMMs without an allocator the fork servers would
/// share, and above the ids distributions give users and subordinate
/// ranges.
pub const JAIL_ID_BASE: u32 = 1 << 30;

/// The uid and gid of the jailed VMM of pid `pid`.
pub fn jail_id(pid: i32) -> u32 {
    JAIL_ID_BASE.wrapping_add(pid as u32)
}

/// The exit status of a VMM that made a system call its seccomp filter
/// forbids (128 + `SIGSYS`, as a shell reports a process that signal
/// killed); its `vmm.log` ends with a line naming the thread and the call.
pub const SECCOMP_VIOLATION_EXIT_CODE: i32 = 159;

/// Where a fork server records how one of its children ended: in the
/// child's directory, written (atomically: a temporary file, then a
/// rename) before the child is reaped, so a reader that sees the process
/// gone and no file knows nobody saw its status (the server was gone too).
pub const EXIT_FILE: &str = "exit.json";

/// How a VMM process ended (`exit.json`; the daemon keeps it too).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChildExit {
    /// Its process id.
    pub pid: i32,
    /// Its exit status, when it exited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<i32>,
    /// The signal that ended it, when one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
}

impl ChildExit {
    /// From a `waitpid`/`waitid` status word of process `pid`; `None` when
    /// the status is not an end (stopped, continued).
    pub fn from_wait_status(pid: i32, status: i32) -> Option<ChildExit> {
        if libc_like::exited(status) {
            Some(ChildExit {
                pid,
                code: Some(libc_like::exit_status(status)),
                signal: None,
            })
        } else if libc_like::signaled(status) {
            Some(ChildExit {
                pid,
                code: None,
                signal: Some(libc_like::term_sig(status)),
            })
        } else {
            None
        }
    }
}

/// The `<sys/wait.h>` macros, on the status word's documented layout
/// (proto has no libc dependency).
mod libc_like {
    pub fn exited(s: i32) -> bool {
        s & 0x7f == 0
    }
    pub fn exit_status(s: i32) -> i32 {
        (s >> 8) & 0xff
    }
    pub fn signaled(s: i32) -> bool {
        ((s & 0x7f) + 1) as i8 >> 1 > 0
    }
    pub fn term_sig(s: i32) -> i32 {
        s & 0x7f
    }
}

/// A fork server's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum ForkResponse {
    /// The children started.
    Forked {
        /// In index order.
        children: Vec<ForkedChild>,
    },
    /// Done.
    Ok,
    /// The request failed.
    Error {
        /// What went wrong.
        message: String,
    },
}

impl ForkResponse {
    /// Whether the request succeeded.
    pub fn is_ok(&self) -> bool {
        !matches!(self, ForkResponse::Error { .. })
    }
}

/// A blocking client of one VMM's control socket.
pub struct ControlClient {
    reader: std::io::BufReader<std::os::unix::net::UnixStream>,
    writer: std::os::unix::net::UnixStream,
}

/// Longest response line a client accepts (a peek answer is the largest).
pub const MAX_RESPONSE_BYTES: u64 = 64 * 1024;

impl ControlClient {
    /// Connects to the control socket at `path`; every later call waits at
    /// most `timeout` for the VMM.
    pub fn connect(path: &std::path::Path, timeout: std::time::Duration) -> std::io::Result<Self> {
        let stream = std::os::unix::net::UnixStream::connect(path)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        Ok(ControlClient {
            reader: std::io::BufReader::new(stream.try_clone()?),
            writer: stream,
        })
    }

    /// Sends `request` and returns the VMM's response.
    pub fn call(&mut self, request: &ControlRequest) -> std::io::Result<ControlResponse> {
        use std::io::{BufRead, Read, Write};
        let mut line = serde_json::to_vec(request)?;
        line.push(b'\n');
        self.writer.write_all(&line)?;
        let mut buf = Vec::new();
        (&mut self.reader)
            .take(MAX_RESPONSE_BYTES)
            .read_until(b'\n', &mut buf)?;
        if buf.last() != Some(&b'\n') {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "the VMM closed the control connection or sent an over-long response",
            ));
        }
        Ok(serde_json::from_slice(&buf)?)
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn wait_status_words_decode_as_the_c_macros_do() {
        // exit(3); killed by SIGKILL; killed by SIGSEGV with a core; stopped.
        assert_eq!(
            ChildExit::from_wait_status(7, 0x0300),
            Some(ChildExit {
                pid: 7,
                code: Some(3),
                signal: None
            })
        );
        assert_eq!(
            ChildExit::from_wait_status(7, 9),
            Some(ChildExit {
                pid: 7,
                code: None,
                signal: Some(9)
            })
        );
        assert_eq!(
            ChildExit::from_wait_status(7, 0x8b).unwrap().signal,
            Some(11)
        );
        assert_eq!(ChildExit::from_wait_status(7, 0x137f), None);
        assert_eq!(ChildExit::from_wait_status(7, 0xffff), None);
    }

    use super::*;

    #[test]
    fn requests_have_a_stable_wire_shape() {
        let r: ControlRequest = serde_json::from_str(r#"{"op":"pause"}"#).unwrap();
        assert_eq!(r, ControlRequest::Pause);
        let r: ControlRequest = serde_json::from_str(
            r#"{"op":"guest","request":{"op":"fill","seed":1,"seq":2,"mib":3}}"#,
        )
        .unwrap();
        assert_eq!(
            r,
            ControlRequest::Guest {
                request: GuestRequest::Fill {
                    seed: 1,
                    seq: 2,
                    mib: 3,
                    offset_mib: 0
                },
                timeout_ms: None
            }
        );
        assert!(serde_json::from_str::<ControlRequest>(r#"{"op":"explode"}"#).is_err());
    }

    #[test]
    fn fork_requests_without_memfd_or_netns_keep_their_wire_shape() {
        let old = r#"{"op":"fork","n":2,"out_dir":"/k"}"#;
        let r: ForkRequest = serde_json::from_str(old).unwrap();
        assert_eq!(
            r,
            ForkRequest::Fork {
                n: 2,
                out_dir: "/k".into(),
                paused: false,
                console_log: false,
                memfd: false,
                netns: Vec::new(),
                huge_pages: false,
                prewarm: false,
                limits: Limits::default(),
                disk_quota_mib: None,
            }
        );
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"op":"fork","n":2,"out_dir":"/k","paused":false,"console_log":false}"#
        );
        let r: ForkRequest =
            serde_json::from_str(r#"{"op":"fork","n":1,"out_dir":"/k","memfd":true}"#).unwrap();
        assert!(matches!(r, ForkRequest::Fork { memfd: true, .. }));
        assert!(serde_json::to_string(&r)
            .unwrap()
            .contains(r#""memfd":true"#));
        let line = r#"{"op":"fork","n":2,"out_dir":"/k","paused":false,"console_log":false,"netns":["a","b"]}"#;
        let r: ForkRequest = serde_json::from_str(line).unwrap();
        assert!(
            matches!(&r, ForkRequest::Fork { netns, .. } if netns == &["a", "b"]),
            "{r:?}"
        );
        assert_eq!(serde_json::to_string(&r).unwrap(), line);
    }

    #[test]
    fn responses_roundtrip() {
        let r = ControlResponse::Guest {
            response: GuestResponse::Pong {
                guest: "guest: builtin".into(),
                vcpus: 1,
            },
        };
        let s = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<ControlResponse>(&s).unwrap(), r);
        assert!(s.contains(r#""result":"guest""#));
    }
}
