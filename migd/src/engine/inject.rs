//! Running system calls inside a stopped thread: its registers are pointed at a
//! `syscall; int3` gadget, it runs until the trap, and the result is read from rax.

use super::freeze::{FreezeError, StopKind, Stopped};
use crate::sys;

/// The gadget's bytes: `syscall` (0f 05) then `int3` (cc).
pub const GADGET: [u8; 3] = [0x0f, 0x05, 0xcc];

#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    #[error("injecting syscall {nr} into tid {tid}: {source}")]
    Ptrace {
        tid: i32,
        nr: i64,
        source: FreezeError,
    },
    #[error("injecting syscall {nr} into tid {tid}: unexpected stop (signal {sig})")]
    Unexpected { tid: i32, nr: i64, sig: i32 },
    #[error("syscall {what} in tid {tid} failed: {errno}")]
    Failed {
        tid: i32,
        what: String,
        errno: nix::errno::Errno,
    },
}

/// Where the gadget is; `base` is a template register set (segment registers etc.).
pub struct Injector {
    pub gadget: u64,
}

/// Result of one injected call, including any thread created by it (clone).
pub struct Outcome {
    pub ret: i64,
    pub new_tid: Option<i32>,
}

impl Injector {
    /// Runs `nr(args)` in `t`. `t`'s registers are clobbered (callers restore them).
    pub fn call(&self, t: &Stopped, nr: i64, args: &[u64]) -> Result<Outcome, InjectError> {
        let tid = t.tid;
        let perr = |source| InjectError::Ptrace { tid, nr, source };
        let mut r = t.regs().map_err(perr)?;
        r.rip = self.gadget;
        r.rax = nr as u64;
        r.orig_rax = u64::MAX;
        r.eflags &= !((1 << 8) | (1 << 10)); // TF, DF
        let a = |i: usize| args.get(i).copied().unwrap_or(0);
        r.rdi = a(0);
        r.rsi = a(1);
        r.rdx = a(2);
        r.r10 = a(3);
        r.r8 = a(4);
        r.r9 = a(5);
        t.set_regs(&r).map_err(perr)?;
        let mut new_tid = None;
        let mut sig = 0;
        loop {
            match t.cont_and_wait(sig, false).map_err(perr)? {
                StopKind::Signal(libc::SIGTRAP) => break,
                StopKind::PtraceEvent(ev) => {
                    if ev == libc::PTRACE_EVENT_CLONE {
                        new_tid = Some(sys::ptrace_geteventmsg(tid).map_err(|errno| {
                            InjectError::Ptrace {
                                tid,
                                nr,
                                source: FreezeError::Ptrace {
                                    tid,
                                    op: "PTRACE_GETEVENTMSG",
                                    errno,
                                },
                            }
                        })? as i32);
                    }
                    sig = 0;
                }
                StopKind::Event | StopKind::Syscall => sig = 0,
                StopKind::Signal(s) => return Err(InjectError::Unexpected { tid, nr, sig: s }),
            }
        }
        let out = t.regs().map_err(perr)?;
        Ok(Outcome {
            ret: out.rax as i64,
            new_tid,
        })
    }

    /// Like [`call`](Self::call) but turns a negative result into an error naming `what`.
    pub fn ok(
        &self,
        t: &Stopped,
        nr: i64,
        args: &[u64],
        what: impl FnOnce() -> String,
    ) -> Result<i64, InjectError> {
        let o = self.call(t, nr, args)?;
        if (-4095..0).contains(&o.ret) {
            return Err(InjectError::Failed {
                tid: t.tid,
                what: what(),
                errno: nix::errno::Errno::from_raw(-o.ret as i32),
            });
        }
        Ok(o.ret)
    }
}
