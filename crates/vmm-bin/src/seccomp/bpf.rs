//! The BPF program of a rule set, written compact.
//!
//! Why by hand: seccompiler (the reference in this module's tests) emits
//! a linear list, three to six instructions for every allowed call and
//! condition: 314 to 534 for our thread kinds. The kernel checks and
//! JIT-compiles a filter at about a microsecond an instruction on the
//! development machine, and a child forked when asked takes four, so the
//! program's length is spawn time (bench/RESULTS.md, seccomp). No crate
//! emits a shorter program, so this does: the calls allowed whatever
//! their arguments are looked up in a bitmap, 32 calls a word; the few
//! with argument conditions (ioctl, prctl) are compared one by one, each
//! argument loaded once. seccompiler still installs the program.

use std::collections::BTreeMap;

use seccompiler::{sock_filter, BpfProgram};

/// A condition on one argument of a call, on its low 32 bits (the
/// arguments we test are `int`s and `unsigned int`s: ioctl requests,
/// prctl options).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Cond {
    /// `args[arg] == value`.
    Eq { arg: u8, value: u32 },
    /// `args[arg] & mask == value`.
    Masked { arg: u8, mask: u32, value: u32 },
}

impl Cond {
    fn arg(self) -> u8 {
        match self {
            Cond::Eq { arg, .. } | Cond::Masked { arg, .. } => arg,
        }
    }

    /// The mask applied before the comparison (all ones: none).
    fn mask(self) -> u32 {
        match self {
            Cond::Eq { .. } => u32::MAX,
            Cond::Masked { mask, .. } => mask,
        }
    }

    fn value(self) -> u32 {
        match self {
            Cond::Eq { value, .. } | Cond::Masked { value, .. } => value,
        }
    }
}

/// Why a rule set has no program.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("system call {0} is outside the numbers a filter can allow (0 to {MAX_NR})")]
    Number(i64),
    #[error("argument {0} does not exist (a call has six)")]
    Argument(u8),
    #[error("a jump of {0} instructions is longer than BPF's 255")]
    Jump(usize),
}

/// `struct seccomp_data`: where the call's number, its architecture and
/// the low half of each argument are.
const NR: u32 = 0;
const ARCH: u32 = 4;
fn arg_low(arg: u8) -> u32 {
    16 + 8 * u32::from(arg)
}

/// `AUDIT_ARCH_X86_64` (linux/audit.h).
const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
/// `SECCOMP_RET_KILL_PROCESS`: a call of another architecture's ABI.
const RET_KILL_PROCESS: u32 = 0x8000_0000;
/// `SECCOMP_RET_ALLOW`.
const RET_ALLOW: u32 = 0x7fff_0000;
/// Calls below this number can be allowed (x86-64 has fewer); any other is
/// a mismatch, the x32 ABI's (bit 30 set) among them.
const MAX_NR: u32 = 512;

// Classic BPF opcodes (linux/bpf_common.h, linux/filter.h).
const LD_W_ABS: u16 = 0x20;
const LD_IMM: u16 = 0x00;
const LD_MEM: u16 = 0x60;
const ST: u16 = 0x02;
const ALU_AND_K: u16 = 0x54;
const ALU_RSH_K: u16 = 0x74;
const ALU_LSH_X: u16 = 0x6c;
const MISC_TAX: u16 = 0x07;
const JEQ_K: u16 = 0x15;
const JGE_K: u16 = 0x35;
const JSET_K: u16 = 0x45;
const RET_K: u16 = 0x06;

/// Where a jump goes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Target {
    /// The next instruction.
    Next,
    /// A label, placed later.
    Label(usize),
}

/// One instruction, its jumps still labels.
struct Insn {
    code: u16,
    jt: Target,
    jf: Target,
    k: u32,
}

/// A program being assembled: forward jumps to labels, resolved at the end.
#[derive(Default)]
struct Asm {
    insns: Vec<Insn>,
    /// Label -> the instruction it is placed at.
    labels: Vec<Option<usize>>,
}

impl Asm {
    fn op(&mut self, code: u16, k: u32) {
        self.jump(code, k, Target::Next, Target::Next);
    }

    fn jump(&mut self, code: u16, k: u32, jt: Target, jf: Target) {
        self.insns.push(Insn { code, jt, jf, k });
    }

    fn label(&mut self) -> Target {
        self.labels.push(None);
        Target::Label(self.labels.len() - 1)
    }

    fn place(&mut self, label: Target) {
        if let Target::Label(l) = label {
            self.labels[l] = Some(self.insns.len());
        }
    }

    fn finish(self) -> Result<BpfProgram, Error> {
        let offset = |at: usize, t: Target| -> Result<u8, Error> {
            match t {
                Target::Next => Ok(0),
                Target::Label(l) => {
                    let to = self.labels[l].expect("every label is placed");
                    let d = to - at - 1;
                    u8::try_from(d).map_err(|_| Error::Jump(d))
                }
            }
        };
        self.insns
            .iter()
            .enumerate()
            .map(|(at, i)| {
                Ok(sock_filter {
                    code: i.code,
                    jt: offset(at, i.jt)?,
                    jf: offset(at, i.jf)?,
                    k: i.k,
                })
            })
            .collect()
    }
}

/// The program that allows, of the native (x86-64) ABI, the calls in
/// `always` whatever their arguments and those in `when` when one of their
/// conditions holds; it answers `mismatch` (a `SECCOMP_RET_*` value) to
/// any other call and kills the process on a call of another ABI.
pub(super) fn program(
    always: &[i64],
    when: &BTreeMap<i64, Vec<Cond>>,
    mismatch: u32,
) -> Result<BpfProgram, Error> {
    let number = |nr: i64| {
        u32::try_from(nr)
            .ok()
            .filter(|&n| n < MAX_NR)
            .ok_or(Error::Number(nr))
    };
    let mut words = BTreeMap::<u32, u32>::new();
    for &nr in always {
        let n = number(nr)?;
        *words.entry(n / 32).or_default() |= 1 << (n % 32);
    }
    let mut a = Asm::default();
    let (allow, deny, kill) = (a.label(), a.label(), a.label());
    // The architecture, then the number.
    a.op(LD_W_ABS, ARCH);
    a.jump(JEQ_K, AUDIT_ARCH_X86_64, Target::Next, kill);
    a.op(LD_W_ABS, NR);
    let conditional: Vec<(u32, &Vec<Cond>, Target)> = when
        .iter()
        .map(|(&nr, conds)| Ok((number(nr)?, conds, a.label())))
        .collect::<Result<_, Error>>()?;
    for &(n, _, block) in &conditional {
        a.jump(JEQ_K, n, block, Target::Next);
    }
    // The bitmap: M[0] = 1 << (nr % 32), then a word by nr / 32.
    a.jump(JGE_K, MAX_NR, deny, Target::Next);
    a.op(ALU_AND_K, 31);
    a.op(MISC_TAX, 0);
    a.op(LD_IMM, 1);
    a.op(ALU_LSH_X, 0);
    a.op(ST, 0);
    a.op(LD_W_ABS, NR);
    a.op(ALU_RSH_K, 5);
    let blocks: Vec<(u32, u32, Target)> = words
        .iter()
        .map(|(&w, &mask)| (w, mask, a.label()))
        .collect();
    for &(w, _, block) in &blocks {
        a.jump(JEQ_K, w, block, Target::Next);
    }
    a.op(RET_K, mismatch);
    for &(_, mask, block) in &blocks {
        a.place(block);
        a.op(LD_MEM, 0);
        a.jump(JSET_K, mask, allow, deny);
    }
    // Each conditional call: its conditions grouped by what is loaded
    // (argument and mask), each group's value compared in turn.
    for (_, conds, block) in conditional {
        a.place(block);
        let mut groups = BTreeMap::<(u8, u32), Vec<u32>>::new();
        for c in conds {
            if c.arg() > 5 {
                return Err(Error::Argument(c.arg()));
            }
            groups
                .entry((c.arg(), c.mask()))
                .or_default()
                .push(c.value());
        }
        for ((arg, mask), values) in groups {
            a.op(LD_W_ABS, arg_low(arg));
            if mask != u32::MAX {
                a.op(ALU_AND_K, mask);
            }
            for v in values {
                a.jump(JEQ_K, v, allow, Target::Next);
            }
        }
        a.op(RET_K, mismatch);
    }
    a.place(allow);
    a.op(RET_K, RET_ALLOW);
    a.place(deny);
    a.op(RET_K, mismatch);
    a.place(kill);
    a.op(RET_K, RET_KILL_PROCESS);
    a.finish()
}
