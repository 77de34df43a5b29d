//! What each kind of VMM thread may call (x86-64).
//!
//! The lists hold what the threads were seen to call across the test
//! suite (run with `FORKD_SECCOMP=log`, the kernel's audit log read
//! after: `dmesg | grep type=1326`, by `comm=` and `syscall=`), grouped by
//! what needs them. Without auditd those lines go through printk's rate
//! limit, which drops some ("kauditd_printk_skb: N callbacks suppressed"):
//! collect with `/proc/sys/kernel/printk_ratelimit` at 0. ioctls are allowed by number on the
//! threads a guest drives (vCPUs and device workers); the control and copy
//! threads, driven by the daemon, may make any ioctl of the kinds they
//! use (KVM, userfaultfd), by the number's type byte.

use std::collections::BTreeMap;

use kvm_bindings::{
    kvm_cpuid2, kvm_debugregs, kvm_device_attr, kvm_fpu, kvm_irq_level, kvm_lapic_state,
    kvm_mp_state, kvm_msi, kvm_msr_list, kvm_msrs, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs,
    kvm_xsave, KVMIO,
};
use seccompiler::{BpfProgram, SeccompAction};
use vmm::seccomp::Kind;

use super::bpf::{self, Cond};
use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iow_nr, ioctl_iowr_nr};

// The vCPU ioctls, from linux/kvm.h (the numbers are facts of the ABI;
// kvm-ioctls keeps its own private).
ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_regs);
ioctl_iow_nr!(KVM_SET_REGS, KVMIO, 0x82, kvm_regs);
ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_sregs);
ioctl_iow_nr!(KVM_SET_SREGS, KVMIO, 0x84, kvm_sregs);
ioctl_iowr_nr!(KVM_GET_MSRS, KVMIO, 0x88, kvm_msrs);
ioctl_iow_nr!(KVM_SET_MSRS, KVMIO, 0x89, kvm_msrs);
ioctl_iow_nr!(KVM_SET_SIGNAL_MASK, KVMIO, 0x8b, [u32; 1]);
ioctl_ior_nr!(KVM_GET_FPU, KVMIO, 0x8c, kvm_fpu);
ioctl_iow_nr!(KVM_SET_FPU, KVMIO, 0x8d, kvm_fpu);
ioctl_ior_nr!(KVM_GET_LAPIC, KVMIO, 0x8e, kvm_lapic_state);
ioctl_iow_nr!(KVM_SET_LAPIC, KVMIO, 0x8f, kvm_lapic_state);
ioctl_ior_nr!(KVM_GET_MP_STATE, KVMIO, 0x98, kvm_mp_state);
ioctl_iow_nr!(KVM_SET_MP_STATE, KVMIO, 0x99, kvm_mp_state);
ioctl_ior_nr!(KVM_GET_VCPU_EVENTS, KVMIO, 0x9f, kvm_vcpu_events);
ioctl_iow_nr!(KVM_SET_VCPU_EVENTS, KVMIO, 0xa0, kvm_vcpu_events);
ioctl_ior_nr!(KVM_GET_DEBUGREGS, KVMIO, 0xa1, kvm_debugregs);
ioctl_iow_nr!(KVM_SET_DEBUGREGS, KVMIO, 0xa2, kvm_debugregs);
ioctl_io_nr!(KVM_GET_TSC_KHZ, KVMIO, 0xa3);
ioctl_ior_nr!(KVM_GET_XSAVE, KVMIO, 0xa4, kvm_xsave);
ioctl_iow_nr!(KVM_SET_XSAVE, KVMIO, 0xa5, kvm_xsave);
ioctl_ior_nr!(KVM_GET_XCRS, KVMIO, 0xa6, kvm_xcrs);
ioctl_iow_nr!(KVM_SET_XCRS, KVMIO, 0xa7, kvm_xcrs);
ioctl_io_nr!(KVM_KVMCLOCK_CTRL, KVMIO, 0xad);
ioctl_ior_nr!(KVM_GET_XSAVE2, KVMIO, 0xcf, kvm_xsave);
ioctl_iow_nr!(KVM_SET_CPUID2, KVMIO, 0x90, kvm_cpuid2);
ioctl_iowr_nr!(KVM_GET_CPUID2, KVMIO, 0x91, kvm_cpuid2);
ioctl_io_nr!(KVM_SET_TSC_KHZ, KVMIO, 0xa2);
ioctl_iow_nr!(KVM_SET_DEVICE_ATTR, KVMIO, 0xe1, kvm_device_attr);
ioctl_iow_nr!(KVM_GET_DEVICE_ATTR, KVMIO, 0xe2, kvm_device_attr);
ioctl_iow_nr!(KVM_HAS_DEVICE_ATTR, KVMIO, 0xe3, kvm_device_attr);
// The one system ioctl a vCPU's state capture makes (on /dev/kvm): which
// MSRs there are.
ioctl_iowr_nr!(KVM_GET_MSR_INDEX_LIST, KVMIO, 0x02, kvm_msr_list);
// The VM ioctls a device model makes from a vCPU exit: a legacy
// interrupt line, an MSI.
ioctl_iow_nr!(KVM_IRQ_LINE, KVMIO, 0x61, kvm_irq_level);
ioctl_iow_nr!(KVM_SIGNAL_MSI, KVMIO, 0xa5, kvm_msi);

/// `FIONBIO` (asm-generic/ioctls.h): how std makes a socket non-blocking.
const FIONBIO: u64 = 0x5421;
/// `FIONREAD`: bytes waiting on a socket.
const FIONREAD: u64 = 0x541B;
/// The type byte of userfaultfd's ioctls (`UFFDIO`).
const UFFDIO: u64 = 0xAA;

/// What every thread does: memory, locks, signals, time, its own end,
/// reading and writing descriptors it has, logging.
const COMMON: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_lseek,
    libc::SYS_close,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_fcntl,
    libc::SYS_futex,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_mremap,
    libc::SYS_brk,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_tgkill,
    libc::SYS_sched_yield,
    libc::SYS_nanosleep,
    libc::SYS_clock_nanosleep,
    libc::SYS_clock_gettime,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_getrandom,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_restart_syscall,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// Starting a thread (std's spawn: the clone, its stack and guard page
/// (mmap, mprotect above), its name, the robust-futex list and restartable
/// sequences glibc registers) and letting it take a filter of its own.
const THREADS: &[i64] = &[
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_sched_getaffinity,
    libc::SYS_seccomp,
];

/// A vCPU's own: taking a kick signal it blocked (a thread started
/// ahead of its VM makes its first `KVM_RUN` with one pending), and the
/// CPU-time timer that bounds a guest run ahead to its first wait.
const VCPU: &[i64] = &[
    libc::SYS_rt_sigtimedwait,
    libc::SYS_timer_create,
    libc::SYS_timer_settime,
    libc::SYS_timer_delete,
];

/// A device's backend: the image files and layers of a block device,
/// the tap of a net device, the Unix sockets of the vsock device (host
/// connections accepted and made, a timer for a reader that stalls),
/// eventfds.
const DEVICE: &[i64] = &[
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_fallocate,
    libc::SYS_ftruncate,
    libc::SYS_socket,
    libc::SYS_connect,
    libc::SYS_accept4,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_eventfd2,
    libc::SYS_epoll_create1,
    libc::SYS_timerfd_create,
    libc::SYS_timerfd_settime,
    libc::SYS_timerfd_gettime,
];

/// Files: a snapshot's directory and files, written, synced, renamed.
const FILES: &[i64] = &[
    libc::SYS_openat,
    libc::SYS_mkdir,
    libc::SYS_mkdirat,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_rmdir,
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_link,
    libc::SYS_linkat,
    libc::SYS_access,
    libc::SYS_faccessat,
    libc::SYS_faccessat2,
    libc::SYS_chmod,
    libc::SYS_fchmodat,
    libc::SYS_getdents64,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_fallocate,
    libc::SYS_ftruncate,
    libc::SYS_copy_file_range,
    libc::SYS_flock,
    libc::SYS_fadvise64,
    libc::SYS_fchmod,
    libc::SYS_utimensat,
    libc::SYS_getcwd,
    libc::SYS_readlink,
    libc::SYS_dup,
    libc::SYS_dup3,
];

/// Guest memory handling of a live branch: a memfd copy, userfaultfd
/// write protection, priorities of the copy threads.
const MEMORY: &[i64] = &[
    libc::SYS_memfd_create,
    libc::SYS_userfaultfd,
    libc::SYS_setpriority,
    libc::SYS_getpriority,
    libc::SYS_sched_setscheduler,
    libc::SYS_sched_getscheduler,
    libc::SYS_pipe2,
];

/// The control socket's connections.
const CONTROL: &[i64] = &[
    libc::SYS_accept4,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_socket,
    libc::SYS_connect,
    libc::SYS_eventfd2,
    libc::SYS_epoll_create1,
];

/// The vCPU ioctls (and the two VM ioctls a device model makes).
fn vcpu_ioctls() -> Vec<u64> {
    [
        KVM_RUN(),
        KVM_GET_REGS(),
        KVM_SET_REGS(),
        KVM_GET_SREGS(),
        KVM_SET_SREGS(),
        KVM_GET_MSRS(),
        KVM_SET_MSRS(),
        KVM_SET_SIGNAL_MASK(),
        KVM_GET_FPU(),
        KVM_SET_FPU(),
        KVM_GET_LAPIC(),
        KVM_SET_LAPIC(),
        KVM_GET_MP_STATE(),
        KVM_SET_MP_STATE(),
        KVM_GET_VCPU_EVENTS(),
        KVM_SET_VCPU_EVENTS(),
        KVM_GET_DEBUGREGS(),
        KVM_SET_DEBUGREGS(),
        KVM_GET_TSC_KHZ(),
        KVM_GET_XSAVE(),
        KVM_SET_XSAVE(),
        KVM_GET_XCRS(),
        KVM_SET_XCRS(),
        KVM_KVMCLOCK_CTRL(),
        KVM_GET_XSAVE2(),
        KVM_SET_CPUID2(),
        KVM_GET_CPUID2(),
        KVM_SET_TSC_KHZ(),
        KVM_SET_DEVICE_ATTR(),
        KVM_GET_DEVICE_ATTR(),
        KVM_HAS_DEVICE_ATTR(),
        KVM_GET_MSR_INDEX_LIST(),
        KVM_IRQ_LINE(),
        KVM_SIGNAL_MSI(),
    ]
    .to_vec()
}

/// One syscall's rules as they are being gathered.
#[derive(Clone)]
enum Allowed {
    /// Whatever its arguments.
    Always,
    /// When one of these holds.
    When(Vec<Cond>),
}

/// A rule set being built.
#[derive(Default)]
struct Rules(BTreeMap<i64, Allowed>);

impl Rules {
    fn allow(&mut self, calls: &[i64]) -> &mut Self {
        for &nr in calls {
            self.0.insert(nr, Allowed::Always);
        }
        self
    }

    /// `nr` when one of `rules` holds (nothing when it is allowed always).
    fn allow_when(&mut self, nr: i64, rules: Vec<Cond>) -> &mut Self {
        match self
            .0
            .entry(nr)
            .or_insert_with(|| Allowed::When(Vec::new()))
        {
            Allowed::Always => {}
            Allowed::When(have) => {
                for rule in rules {
                    if !have.contains(&rule) {
                        have.push(rule);
                    }
                }
            }
        }
        self
    }

    /// `ioctl` with one of these request numbers (an `unsigned int`: the
    /// kernel ignores the upper half of the register).
    fn ioctls(&mut self, requests: &[u64]) -> &mut Self {
        let rules = requests
            .iter()
            .map(|&r| Cond::Eq {
                arg: 1,
                value: r as u32,
            })
            .collect();
        self.allow_when(libc::SYS_ioctl, rules)
    }

    /// `ioctl` with any request of these type bytes.
    fn ioctl_types(&mut self, types: &[u64]) -> &mut Self {
        let rules = types
            .iter()
            .map(|&t| Cond::Masked {
                arg: 1,
                mask: 0xff00,
                value: (t as u32) << 8,
            })
            .collect();
        self.allow_when(libc::SYS_ioctl, rules)
    }

    /// `openat` to read a file, and nothing else (flags `O_RDONLY |
    /// O_CLOEXEC`, as std's `File::open` and glibc's own reads open): a
    /// device worker was seen, now and then under load (the vsock stress
    /// test with its VMM stopped and continued), to open a file so, from
    /// code not yet found; before this allowance that ended the VMM.
    fn open_read_only(&mut self) -> &mut Self {
        let flags = (libc::O_RDONLY | libc::O_CLOEXEC) as u32;
        self.allow_when(
            libc::SYS_openat,
            vec![Cond::Eq {
                arg: 2,
                value: flags,
            }],
        )
    }

    /// `prctl` to name a thread or read its name, and to set
    /// no_new_privs before a thread's own filter.
    fn prctl(&mut self) -> &mut Self {
        let rules = [
            libc::PR_SET_NAME,
            libc::PR_GET_NAME,
            libc::PR_SET_NO_NEW_PRIVS,
        ]
        .into_iter()
        .map(|op| Cond::Eq {
            arg: 0,
            value: op as u32,
        })
        .collect();
        self.allow_when(libc::SYS_prctl, rules)
    }

    /// The calls allowed always, and those allowed on conditions.
    fn split(&self) -> (Vec<i64>, BTreeMap<i64, Vec<Cond>>) {
        let mut always = Vec::new();
        let mut when = BTreeMap::new();
        for (&nr, allowed) in &self.0 {
            match allowed {
                Allowed::Always => always.push(nr),
                Allowed::When(c) => {
                    when.insert(nr, c.clone());
                }
            }
        }
        (always, when)
    }

    fn build(&self, mismatch: SeccompAction) -> Result<BpfProgram, bpf::Error> {
        let (always, when) = self.split();
        bpf::program(&always, &when, u32::from(mismatch))
    }
}

/// The rule set of `kind`.
fn rules(kind: Kind) -> Rules {
    let mut r = Rules::default();
    r.allow(COMMON).prctl();
    match kind {
        Kind::Device => {
            r.allow(DEVICE)
                .ioctls(&[FIONBIO, FIONREAD])
                .open_read_only();
        }
        Kind::Vcpu => {
            // It starts (and stops) the device workers, which take their
            // own filter under this one.
            r.allow(THREADS).allow(DEVICE).allow(VCPU).open_read_only();
            r.ioctls(&[FIONBIO, FIONREAD]).ioctls(&vcpu_ioctls());
        }
        Kind::Copy => {
            r.allow(THREADS).allow(FILES).allow(MEMORY);
            r.ioctl_types(&[u64::from(KVMIO), UFFDIO]);
        }
        Kind::Control => {
            // Everything a thread it starts does (copy threads, control
            // workers), and what the device models do when a snapshot is
            // restored or a device reset from here.
            r.allow(THREADS).allow(FILES).allow(MEMORY).allow(CONTROL);
            r.allow(DEVICE);
            r.ioctl_types(&[u64::from(KVMIO), UFFDIO])
                .ioctls(&[FIONBIO, FIONREAD]);
        }
    }
    r
}

/// The filter of `kind`, with `mismatch` for a call it does not allow.
pub(super) fn filter(kind: Kind, mismatch: SeccompAction) -> Result<BpfProgram, bpf::Error> {
    rules(kind).build(mismatch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use seccompiler::{
        SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule, TargetArch,
    };

    /// seccompiler's program for `r`: the reference ours must agree with.
    fn reference(r: &Rules, mismatch: SeccompAction) -> BpfProgram {
        let rules =
            r.0.iter()
                .map(|(&nr, allowed)| {
                    let rules = match allowed {
                        Allowed::Always => Vec::new(),
                        Allowed::When(conds) => conds
                            .iter()
                            .map(|&c| {
                                let (arg, op, value) = match c {
                                    Cond::Eq { arg, value } => (arg, SeccompCmpOp::Eq, value),
                                    Cond::Masked { arg, mask, value } => {
                                        (arg, SeccompCmpOp::MaskedEq(u64::from(mask)), value)
                                    }
                                };
                                let cond = SeccompCondition::new(
                                    arg,
                                    SeccompCmpArgLen::Dword,
                                    op,
                                    u64::from(value),
                                )
                                .unwrap();
                                SeccompRule::new(vec![cond]).unwrap()
                            })
                            .collect(),
                    };
                    (nr, rules)
                })
                .collect();
        SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
            .and_then(BpfProgram::try_from)
            .unwrap()
    }

    /// What classic BPF program `p` answers for a call of number `nr` on
    /// `arch` with `args`: an interpreter of the instructions either
    /// program uses, refusing any other.
    fn run(p: &BpfProgram, arch: u32, nr: u32, args: [u64; 6]) -> u32 {
        let mut data = [0u32; 16];
        data[0] = nr;
        data[1] = arch;
        for (i, a) in args.iter().enumerate() {
            data[4 + 2 * i] = *a as u32;
            data[5 + 2 * i] = (*a >> 32) as u32;
        }
        let (mut acc, mut x, mut mem) = (0u32, 0u32, [0u32; 16]);
        let mut pc = 0usize;
        loop {
            let i = &p[pc];
            pc += 1;
            let jump = |taken: bool| usize::from(if taken { i.jt } else { i.jf });
            match i.code {
                0x20 => acc = data[i.k as usize / 4],
                0x00 => acc = i.k,
                0x60 => acc = mem[i.k as usize],
                0x02 => mem[i.k as usize] = acc,
                0x54 => acc &= i.k,
                0x44 => acc |= i.k,
                0x74 => acc >>= i.k,
                0x64 => acc <<= i.k,
                0x6c => acc <<= x,
                0x07 => x = acc,
                0x87 => acc = x,
                0x05 => pc += i.k as usize,
                0x15 => pc += jump(acc == i.k),
                0x25 => pc += jump(acc > i.k),
                0x35 => pc += jump(acc >= i.k),
                0x45 => pc += jump(acc & i.k != 0),
                0x06 => return i.k,
                other => panic!("instruction {other:#x} at {}", pc - 1),
            }
        }
    }

    /// For every kind and mismatch action, ours answers every call
    /// (every number, other ABIs, the conditional calls with the values
    /// their conditions name, those values changed, random ones) as
    /// seccompiler's does, in a fraction of the instructions.
    #[test]
    fn the_compact_program_answers_as_seccompiler_s() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut random = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for kind in Kind::ALL {
            let r = rules(kind);
            let mut values: Vec<u64> = Vec::new();
            for allowed in r.0.values() {
                if let Allowed::When(conds) = allowed {
                    for c in conds {
                        let v = match *c {
                            Cond::Eq { value, .. } | Cond::Masked { value, .. } => u64::from(value),
                        };
                        values.extend([v, v ^ 1, v ^ 0x100, v | 0xff, v | (7 << 32), v << 1]);
                    }
                }
            }
            values.extend((0..2000).map(|_| random()));
            values.extend((0..2000).map(|_| random() & 0xffff));
            for mismatch in [SeccompAction::Trap, SeccompAction::Log] {
                let ours = r.build(mismatch.clone()).unwrap();
                let theirs = reference(&r, mismatch);
                assert!(
                    ours.len() * 2 < theirs.len(),
                    "{kind:?}: {} instructions against seccompiler's {}",
                    ours.len(),
                    theirs.len()
                );
                let both = |arch: u32, nr: u32, args: [u64; 6]| {
                    let (a, b) = (run(&ours, arch, nr, args), run(&theirs, arch, nr, args));
                    assert_eq!(a, b, "{kind:?}: call {nr:#x} on {arch:#x} with {args:x?}");
                };
                for nr in (0..700).chain([0x4000_0000, 0x4000_0010, u32::MAX]) {
                    both(0xc000_003e, nr, [0; 6]);
                    both(0xc000_003e, nr, [random(), random(), 0, 0, 0, 0]);
                    both(0x4000_0003, nr, [0; 6]);
                }
                for nr in [libc::SYS_ioctl as u32, libc::SYS_prctl as u32] {
                    for &v in &values {
                        both(0xc000_003e, nr, [v, v, 0, 0, 0, 0]);
                        both(0xc000_003e, nr, [random(), v, 0, 0, 0, 0]);
                        both(0xc000_003e, nr, [v, random(), 0, 0, 0, 0]);
                    }
                }
            }
        }
    }

    /// Whether `outer` allows everything `inner` does (a rule-for-rule
    /// comparison: a syscall always allowed covers any rules).
    fn covers(outer: &Rules, inner: &Rules) -> Result<(), String> {
        for (nr, allowed) in &inner.0 {
            match (outer.0.get(nr), allowed) {
                (None, _) => return Err(format!("syscall {nr} missing")),
                (Some(Allowed::Always), _) => {}
                (Some(Allowed::When(_)), Allowed::Always) => {
                    return Err(format!("syscall {nr} only with conditions"))
                }
                (Some(Allowed::When(have)), Allowed::When(need)) => {
                    for rule in need {
                        // A type-byte rule covers the exact numbers of
                        // that type; exact numbers only themselves.
                        let by_type = have.iter().any(|h| matches!(h, Cond::Masked { .. }));
                        if !have.contains(rule) && !by_type {
                            return Err(format!("syscall {nr}: {rule:?} missing"));
                        }
                    }
                }
            }
        }
        Ok(())
    }

    #[test]
    fn a_thread_kind_allows_what_the_threads_it_starts_need() {
        let r = rules;
        covers(&r(Kind::Vcpu), &r(Kind::Device)).expect("vCPU threads start device workers");
        covers(&r(Kind::Control), &r(Kind::Copy)).expect("control threads start copy threads");
        covers(&r(Kind::Control), &r(Kind::Device)).expect("a restore starts device workers");
    }

    #[test]
    fn every_filter_compiles_and_none_allows_exec_or_a_new_mount() {
        for kind in Kind::ALL {
            let r = rules(kind);
            for nr in [
                libc::SYS_execve,
                libc::SYS_execveat,
                libc::SYS_mount,
                libc::SYS_ptrace,
                libc::SYS_setns,
                libc::SYS_unshare,
                libc::SYS_rt_sigaction,
                libc::SYS_open_by_handle_at,
                libc::SYS_bpf,
            ] {
                assert!(!r.0.contains_key(&nr), "{kind:?} allows syscall {nr}");
            }
            let program = filter(kind, SeccompAction::Trap).unwrap();
            assert!(!program.is_empty());
        }
    }

    #[test]
    fn guest_driven_threads_have_exact_ioctl_numbers() {
        for kind in [Kind::Vcpu, Kind::Device] {
            let r = rules(kind);
            let Some(Allowed::When(ioctls)) = r.0.get(&libc::SYS_ioctl) else {
                panic!("{kind:?}: ioctl is not conditional");
            };
            assert!(ioctls.iter().all(|c| matches!(c, Cond::Eq { .. })));
        }
        // The numbers are linux/kvm.h's.
        assert_eq!(KVM_RUN(), 0xAE80);
        assert_eq!(KVM_GET_REGS(), 0x8090_AE81);
        assert_eq!(KVM_GET_SREGS(), 0x8138_AE83);
        assert_eq!(KVM_SET_SIGNAL_MASK(), 0x4004_AE8B);
        assert_eq!(KVM_GET_XSAVE(), 0x9000_AEA4);
    }
}
