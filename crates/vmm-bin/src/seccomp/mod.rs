//! The seccomp-BPF filters of a VMM's threads, one for each
//! [`Kind`] (the library has each thread take its
//! kind's filter as it starts, see [`vmm::seccomp`]).
//!
//! A process chooses its [`Mode`] once ([`configure`]): the filters are
//! compiled then, so a fork server compiles them once for all its
//! children. The main thread takes the control filter once its machine is
//! built and its privileged set-up (namespaces, taps, cgroups) is behind
//! it.
//!
//! Filters stack, so the kinds nest: the vCPU filter allows what a device
//! worker does, the control filter what a copy thread does ([`rules`]
//! builds each list from the ones it must contain; a test checks it).
//! [`bpf`] writes each list as a compact program (a bitmap of calls),
//! which the kernel compiles several times faster than seccompiler's
//! linear one; seccompiler installs it.
//!
//! A forbidden call is trapped: the handler writes what was called, and
//! from which thread, to standard error (the VMM's `vmm.log`) and ends the
//! process with [`VIOLATION_EXIT_CODE`], so whoever reaps it can say why it
//! died. Nothing else may install a `SIGSYS` handler: `rt_sigaction` is
//! in no list.

mod bpf;
mod rules;

use seccompiler::SeccompAction;
use vmm::seccomp::Kind;

/// The exit status of a VMM that made a forbidden system call.
pub const VIOLATION_EXIT_CODE: i32 = proto::control::SECCOMP_VIOLATION_EXIT_CODE;

/// What the filters do (`--seccomp on|log|off`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// A forbidden call ends the process (the default).
    #[value(name = "on")]
    Enforce,
    /// A forbidden call is allowed and logged by the kernel (the audit
    /// log, `dmesg`): for finding what a new code path needs.
    Log,
    /// No filter at all (`--seccomp off`).
    Off,
}

/// Why the filters cannot be had.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A rule set has no program (a bug in [`rules`]).
    #[error("cannot compile the seccomp filter of {kind:?} threads: {source}")]
    Compile { kind: Kind, source: bpf::Error },
    /// The `SIGSYS` handler could not be installed.
    #[error("cannot install the SIGSYS handler: {0}")]
    Handler(std::io::Error),
    /// The filters were configured already.
    #[error("the seccomp filters were configured already")]
    Configured,
}

/// Chooses this process's mode, compiles every kind's filter and hands
/// them to the library (in [`Mode::Enforce`], also installs the `SIGSYS`
/// handler). Call it once, before any thread is started.
pub fn configure(mode: Mode) -> Result<(), Error> {
    let mismatch = match mode {
        Mode::Off => return Ok(()),
        Mode::Enforce => SeccompAction::Trap,
        Mode::Log => SeccompAction::Log,
    };
    let mut programs = Vec::new();
    for kind in Kind::ALL {
        let program = rules::filter(kind, mismatch.clone())
            .map_err(|source| Error::Compile { kind, source })?;
        programs.push((kind, program));
    }
    if mode == Mode::Enforce {
        install_handler().map_err(Error::Handler)?;
    }
    if !vmm::seccomp::install(programs) {
        return Err(Error::Configured);
    }
    Ok(())
}

/// Makes a call no filter allows (`execve` with null arguments, which an
/// unconfined process sees fail with `EFAULT`): under a filter it does not
/// return. The error it returns otherwise. For self-tests.
pub fn forbidden_call() -> std::io::Error {
    // SAFETY: execve with null pointers touches no memory of ours; the
    // kernel refuses it (EFAULT) before it replaces anything.
    unsafe {
        libc::syscall(
            libc::SYS_execve,
            std::ptr::null::<libc::c_char>(),
            std::ptr::null::<*const libc::c_char>(),
            std::ptr::null::<*const libc::c_char>(),
        )
    };
    std::io::Error::last_os_error()
}

/// Installs [`on_sigsys`] for `SIGSYS`.
fn install_handler() -> std::io::Result<()> {
    // SAFETY: a zeroed sigaction is valid; the fields set below make it
    // an SA_SIGINFO handler with an empty mask.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = on_sigsys as *const () as usize;
    action.sa_flags = libc::SA_SIGINFO;
    // SAFETY: `action` is initialised; the handler only makes
    // async-signal-safe calls (prctl, write, _exit).
    if unsafe { libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The `SIGSYS` handler: says which thread made which call, then ends the
/// process. Only async-signal-safe calls, each allowed by every filter.
extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // The kernel's `siginfo_t` for SIGSYS: three ints (signo, errno, code)
    // and padding to 16 bytes, then `_sigsys { void *call_addr; int
    // syscall; unsigned int arch; }`: the call's number is at byte 24.
    // SAFETY: the kernel passes a valid siginfo_t of SIGSYS to an
    // SA_SIGINFO handler; byte 24 is inside it (it is 128 bytes).
    let nr = unsafe { info.cast::<u8>().add(24).cast::<i32>().read_unaligned() };
    let mut name = [0u8; 16];
    // SAFETY: PR_GET_NAME writes at most 16 bytes, NUL included.
    unsafe { libc::prctl(libc::PR_GET_NAME, name.as_mut_ptr()) };
    let mut line = Line::default();
    line.push(b"forkd-vmm: seccomp: thread ");
    line.push(&name[..name.iter().position(|&b| b == 0).unwrap_or(15)]);
    line.push(b" made a forbidden system call (number ");
    line.number(nr);
    line.push(b"); the VMM stops\n");
    // SAFETY: writes the initialised bytes of `line` to stderr; _exit
    // ends the process without running anything of this one's.
    unsafe {
        libc::write(2, line.buf.as_ptr().cast(), line.len);
        libc::_exit(VIOLATION_EXIT_CODE);
    }
}

/// A line built without allocating (in a signal handler).
struct Line {
    buf: [u8; 128],
    len: usize,
}

impl Default for Line {
    fn default() -> Self {
        Line {
            buf: [0; 128],
            len: 0,
        }
    }
}

impl Line {
    fn push(&mut self, bytes: &[u8]) {
        let n = bytes.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
    }

    fn number(&mut self, n: i32) {
        let mut digits = [0u8; 11];
        let mut i = digits.len();
        let mut v = i64::from(n).unsigned_abs();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        if n < 0 {
            self.push(b"-");
        }
        self.push(&digits[i..]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_is_built_without_allocating_and_bounded() {
        let mut line = Line::default();
        line.push(b"call ");
        line.number(59);
        line.push(b" ");
        line.number(-7);
        line.push(b" ");
        line.number(0);
        assert_eq!(&line.buf[..line.len], b"call 59 -7 0");
        line.push(&[b'x'; 200]);
        assert_eq!(line.len, 128);
    }
}
