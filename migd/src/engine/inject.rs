//! Running system calls inside a stopped thread: its registers are pointed at a
//! `syscall; int3` gadget, it runs until the trap, and the result is read from rax.

use super::freeze::{FreezeError, StopKind, Stopped};
use crate::sys;

/// The gadget's bytes: `syscall` (0f 05) then `int3` (cc).
pub const GADGET: [u8; 3] = [0x0f, 0x05, 0xcc];

/// Code that runs a table of system calls in one stop ([`Injector::batch`]):
/// `r12` points at the first of `r13` 64-byte entries `{nr, a0..a5, ret}`; each
/// call's rax goes to its `ret`; it stops after the first that fails (rax in
/// -4095..-1) and ends at `int3`. Assembled from (`as`, Intel syntax):
///
/// ```text
///  0: 4d 85 ed             test   r13, r13
///  3: 74 3a                je     3f
///  5: 49 8b 04 24          mov    rax, [r12]
///  9: 49 8b 7c 24 08       mov    rdi, [r12+0x8]
///  e: 49 8b 74 24 10       mov    rsi, [r12+0x10]
/// 13: 49 8b 54 24 18       mov    rdx, [r12+0x18]
/// 18: 4d 8b 54 24 20       mov    r10, [r12+0x20]
/// 1d: 4d 8b 44 24 28       mov    r8,  [r12+0x28]
/// 22: 4d 8b 4c 24 30       mov    r9,  [r12+0x30]
/// 27: 0f 05                syscall
/// 29: 49 89 44 24 38       mov    [r12+0x38], rax
/// 2e: 48 3d 01 f0 ff ff    cmp    rax, -4095
/// 34: 73 09                jae    3f
/// 36: 49 83 c4 40          add    r12, 0x40
/// 3a: 49 ff cd             dec    r13
/// 3d: 75 c6                jne    5
/// 3f: cc                   int3
/// ```
pub const BATCH: [u8; 64] = [
    0x4d, 0x85, 0xed, 0x74, 0x3a, 0x49, 0x8b, 0x04, 0x24, 0x49, 0x8b, 0x7c, 0x24, 0x08, 0x49, 0x8b,
    0x74, 0x24, 0x10, 0x49, 0x8b, 0x54, 0x24, 0x18, 0x4d, 0x8b, 0x54, 0x24, 0x20, 0x4d, 0x8b, 0x44,
    0x24, 0x28, 0x4d, 0x8b, 0x4c, 0x24, 0x30, 0x0f, 0x05, 0x49, 0x89, 0x44, 0x24, 0x38, 0x48, 0x3d,
    0x01, 0xf0, 0xff, 0xff, 0x73, 0x09, 0x49, 0x83, 0xc4, 0x40, 0x49, 0xff, 0xcd, 0x75, 0xc6, 0xcc,
];

#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    #[error("injecting syscall {nr} into tid {tid}: {source}")]
    Ptrace {
        tid: i32,
        nr: i64,
        source: FreezeError,
    },
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
        self.aim(t, nr, args)?;
        let new_tid = run_to_trap(t, nr)?;
        let out = t.regs().map_err(perr)?;
        Ok(Outcome {
            ret: out.rax as i64,
            new_tid,
        })
    }

    /// Sets `t`'s registers so that, once resumed, it runs `nr(args)` at the gadget
    /// and traps after it; runs nothing (see [`call`](Self::call)). `t`'s registers
    /// are clobbered.
    pub fn aim(&self, t: &Stopped, nr: i64, args: &[u64]) -> Result<(), InjectError> {
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
        t.set_regs(&r).map_err(perr)
    }

    /// Runs `calls` in `t` in one stop, not one each: the [`BATCH`] code, planted by
    /// the caller at `code` in executable memory of the process, goes through a table
    /// the caller lends at `table` (writable memory of the process, 64 bytes a call).
    /// Returns the calls' results in order, up to the first that failed (an errno
    /// as a negative number), the calls after it not run. `t`'s registers are
    /// clobbered (callers restore them).
    pub fn batch(
        &self,
        t: &Stopped,
        pid: i32,
        code: u64,
        table: u64,
        calls: &[(i64, [u64; 6])],
    ) -> Result<Vec<i64>, InjectError> {
        let tid = t.tid;
        let nr = calls.first().map_or(-1, |c| c.0);
        let perr = |source| InjectError::Ptrace { tid, nr, source };
        let memerr = |what: &str, errno| InjectError::Failed {
            tid,
            what: format!("{what} the table of a batch of {} calls", calls.len()),
            errno,
        };
        // Not run yet: a result no call gives.
        const NOT_RUN: i64 = i64::MIN;
        let mut bytes = Vec::with_capacity(calls.len() * 64);
        for (nr, args) in calls {
            bytes.extend_from_slice(&nr.to_ne_bytes());
            for a in args {
                bytes.extend_from_slice(&a.to_ne_bytes());
            }
            bytes.extend_from_slice(&NOT_RUN.to_ne_bytes());
        }
        write_all(pid, table, &bytes).map_err(|e| memerr("writing", e))?;
        let mut r = t.regs().map_err(perr)?;
        r.rip = code;
        r.orig_rax = u64::MAX;
        r.eflags &= !((1 << 8) | (1 << 10)); // TF, DF
        r.r12 = table;
        r.r13 = calls.len() as u64;
        t.set_regs(&r).map_err(perr)?;
        run_to_trap(t, nr)?;
        let mut back = vec![0u8; bytes.len()];
        sys::vm_read_exact(pid, table, &mut back).map_err(|e| memerr("reading back", e))?;
        Ok(back
            .chunks_exact(64)
            .map(|e| i64::from_ne_bytes(e[56..64].try_into().expect("8 bytes")))
            .take_while(|&ret| ret != NOT_RUN)
            .collect())
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

fn write_all(pid: i32, addr: u64, bytes: &[u8]) -> Result<(), nix::errno::Errno> {
    let mut done = 0;
    while done < bytes.len() {
        match sys::vm_write(pid, addr + done as u64, &bytes[done..])? {
            0 => return Err(nix::errno::Errno::EIO),
            n => done += n,
        }
    }
    Ok(())
}

/// Lets `t` run from where its registers point until the gadget's `int3`; returns
/// the thread a `clone` among the calls made, if any. A signal that comes to the
/// thread meanwhile (a `kill -STOP` while a shadow is being made, say) is not
/// delivered in the middle of the calls: it is held back and sent to the thread
/// again once they are done, so it is pending as before.
fn run_to_trap(t: &Stopped, nr: i64) -> Result<Option<i32>, InjectError> {
    let tid = t.tid;
    let mut held_back: Vec<i32> = Vec::new();
    let r = run_to_trap_holding(t, nr, &mut held_back);
    for s in held_back {
        if let Err(errno) = sys::tkill(tid, s) {
            tracing::warn!(tid, sig = s, %errno, "a signal held back while calls were injected could not be sent again");
        }
    }
    r
}

fn run_to_trap_holding(
    t: &Stopped,
    nr: i64,
    held_back: &mut Vec<i32>,
) -> Result<Option<i32>, InjectError> {
    let tid = t.tid;
    let perr = |source| InjectError::Ptrace { tid, nr, source };
    let mut new_tid = None;
    let mut sig = 0;
    loop {
        match t.cont_and_wait(sig, false).map_err(perr)? {
            StopKind::Signal(libc::SIGTRAP) => break,
            StopKind::PtraceEvent(ev) => {
                if ev == libc::PTRACE_EVENT_CLONE {
                    let child = sys::ptrace_geteventmsg(tid).map_err(|errno| {
                        perr(FreezeError::Ptrace {
                            tid,
                            op: "PTRACE_GETEVENTMSG",
                            errno,
                        })
                    })?;
                    new_tid = Some(child as i32);
                }
                sig = 0;
            }
            StopKind::Event | StopKind::Syscall => sig = 0,
            StopKind::Signal(s) => {
                held_back.push(s);
                sig = 0;
            }
        }
    }
    Ok(new_tid)
}
