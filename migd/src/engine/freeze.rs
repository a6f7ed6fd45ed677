//! Freezing a process with ptrace, as types: a [`Seized`] thread runs under our trace,
//! a [`Stopped`] thread is in a ptrace-stop and is the only kind whose registers can be
//! read or written. A [`Frozen`] process thaws (detaches every thread, letting it run
//! on unchanged) when dropped, unless it was killed or handed over.

use crate::sys;
use nix::errno::Errno;
use std::collections::BTreeSet;

/// PTRACE_EVENT_STOP (include/uapi/linux/ptrace.h).
const PTRACE_EVENT_STOP: i32 = 128;

#[derive(Debug, thiserror::Error)]
pub enum FreezeError {
    #[error("pid {pid}: no such process")]
    NoProcess { pid: i32 },
    #[error("tid {tid}: PTRACE_SEIZE failed: {errno} (is another tracer attached? are you root?)")]
    Seize { tid: i32, errno: Errno },
    #[error("tid {tid}: {op} failed: {errno}")]
    Ptrace {
        tid: i32,
        op: &'static str,
        errno: Errno,
    },
    #[error("tid {tid}: exited while being frozen")]
    Gone { tid: i32 },
}

/// A thread seized by us and (as far as we know) running.
#[derive(Debug)]
pub struct Seized {
    pub tid: i32,
}

/// A thread of ours in a ptrace-stop.
#[derive(Debug)]
pub struct Stopped {
    pub tid: i32,
}

/// What `wait_stop` saw.
pub enum StopKind {
    /// PTRACE_EVENT_STOP (interrupt or group-stop).
    Event,
    /// Signal-delivery-stop of this signal.
    Signal(i32),
    /// Another PTRACE_EVENT_* stop.
    PtraceEvent(i32),
    /// syscall-enter/exit stop (with TRACESYSGOOD).
    Syscall,
}

/// Decodes a waitpid status of a traced thread.
pub fn decode(tid: i32, status: i32) -> Result<StopKind, FreezeError> {
    if libc::WIFEXITED(status) || libc::WIFSIGNALED(status) {
        return Err(FreezeError::Gone { tid });
    }
    let sig = libc::WSTOPSIG(status);
    let event = status >> 16;
    if event == PTRACE_EVENT_STOP {
        return Ok(StopKind::Event);
    }
    if event != 0 {
        return Ok(StopKind::PtraceEvent(event));
    }
    if sig == libc::SIGTRAP | 0x80 {
        return Ok(StopKind::Syscall);
    }
    Ok(StopKind::Signal(sig))
}

impl Seized {
    pub fn seize(tid: i32, options: i32) -> Result<Seized, FreezeError> {
        sys::ptrace_seize(tid, options).map_err(|errno| FreezeError::Seize { tid, errno })?;
        Ok(Seized { tid })
    }

    /// Stops the thread. Signals that arrive first are delivered (as they would have
    /// been) before the thread stops.
    pub fn interrupt(self) -> Result<Stopped, FreezeError> {
        let tid = self.tid;
        sys::ptrace_interrupt(tid).map_err(|errno| FreezeError::Ptrace {
            tid,
            op: "PTRACE_INTERRUPT",
            errno,
        })?;
        wait_until_event_stop(tid)?;
        Ok(Stopped { tid })
    }
}

fn wait_until_event_stop(tid: i32) -> Result<(), FreezeError> {
    loop {
        let st = sys::wait_tid(tid).map_err(|errno| FreezeError::Ptrace {
            tid,
            op: "waitpid",
            errno,
        })?;
        match decode(tid, st)? {
            StopKind::Event => return Ok(()),
            StopKind::Signal(sig) => {
                // A signal was on its way: let it be delivered, the interrupt stays pending.
                sys::ptrace_cont(tid, sig).map_err(|errno| FreezeError::Ptrace {
                    tid,
                    op: "PTRACE_CONT",
                    errno,
                })?;
            }
            StopKind::PtraceEvent(_) | StopKind::Syscall => {
                sys::ptrace_cont(tid, 0).map_err(|errno| FreezeError::Ptrace {
                    tid,
                    op: "PTRACE_CONT",
                    errno,
                })?;
            }
        }
    }
}

impl Stopped {
    pub fn regs(&self) -> Result<sys::Regs, FreezeError> {
        sys::ptrace_getregs(self.tid).map_err(|errno| FreezeError::Ptrace {
            tid: self.tid,
            op: "PTRACE_GETREGS",
            errno,
        })
    }
    pub fn set_regs(&self, r: &sys::Regs) -> Result<(), FreezeError> {
        sys::ptrace_setregs(self.tid, r).map_err(|errno| FreezeError::Ptrace {
            tid: self.tid,
            op: "PTRACE_SETREGS",
            errno,
        })
    }
    pub fn xsave(&self) -> Result<Vec<u8>, FreezeError> {
        let mut buf = vec![0u8; 16384];
        let n = sys::ptrace_getregset(self.tid, sys::kabi::NT_X86_XSTATE, &mut buf).map_err(
            |errno| FreezeError::Ptrace {
                tid: self.tid,
                op: "PTRACE_GETREGSET(NT_X86_XSTATE)",
                errno,
            },
        )?;
        buf.truncate(n);
        Ok(buf)
    }
    pub fn set_xsave(&self, buf: &[u8]) -> Result<(), FreezeError> {
        sys::ptrace_setregset(self.tid, sys::kabi::NT_X86_XSTATE, buf).map_err(|errno| {
            FreezeError::Ptrace {
                tid: self.tid,
                op: "PTRACE_SETREGSET(NT_X86_XSTATE)",
                errno,
            }
        })
    }
    pub fn sigmask(&self) -> Result<u64, FreezeError> {
        sys::ptrace_getsigmask(self.tid).map_err(|errno| FreezeError::Ptrace {
            tid: self.tid,
            op: "PTRACE_GETSIGMASK",
            errno,
        })
    }
    pub fn set_sigmask(&self, m: u64) -> Result<(), FreezeError> {
        sys::ptrace_setsigmask(self.tid, m).map_err(|errno| FreezeError::Ptrace {
            tid: self.tid,
            op: "PTRACE_SETSIGMASK",
            errno,
        })
    }
    pub fn pending(&self, shared: bool) -> Result<Vec<[u8; 128]>, FreezeError> {
        sys::ptrace_peeksiginfo(self.tid, shared).map_err(|errno| FreezeError::Ptrace {
            tid: self.tid,
            op: "PTRACE_PEEKSIGINFO",
            errno,
        })
    }
    pub fn rseq(&self) -> Result<sys::kabi::PtraceRseqConfiguration, FreezeError> {
        sys::ptrace_get_rseq(self.tid).map_err(|errno| FreezeError::Ptrace {
            tid: self.tid,
            op: "PTRACE_GET_RSEQ_CONFIGURATION",
            errno,
        })
    }
    /// Resumes with `sig` and waits for the next stop.
    pub fn cont_and_wait(&self, sig: i32, syscall: bool) -> Result<StopKind, FreezeError> {
        let tid = self.tid;
        let r = if syscall {
            sys::ptrace_syscall(tid, sig)
        } else {
            sys::ptrace_cont(tid, sig)
        };
        r.map_err(|errno| FreezeError::Ptrace {
            tid,
            op: "PTRACE_CONT",
            errno,
        })?;
        let st = sys::wait_tid(tid).map_err(|errno| FreezeError::Ptrace {
            tid,
            op: "waitpid",
            errno,
        })?;
        decode(tid, st)
    }
    /// Detaches; the thread runs on.
    pub fn detach(self) -> Result<(), FreezeError> {
        sys::ptrace_detach(self.tid, 0).map_err(|errno| FreezeError::Ptrace {
            tid: self.tid,
            op: "PTRACE_DETACH",
            errno,
        })
    }
}

/// Lists the tids of a process.
pub fn list_tids(pid: i32) -> Result<BTreeSet<i32>, FreezeError> {
    let rd = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map_err(|_| FreezeError::NoProcess { pid })?;
    Ok(rd
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect())
}

/// A process whose every thread is stopped under our trace.
pub struct Frozen {
    pub pid: i32,
    /// The leader first.
    pub threads: Vec<Stopped>,
    done: bool,
}

impl Frozen {
    /// Seizes and interrupts every thread, including threads created meanwhile.
    pub fn freeze(pid: i32) -> Result<Frozen, FreezeError> {
        let mut f = Frozen {
            pid,
            threads: Vec::new(),
            done: false,
        };
        let mut seen = BTreeSet::new();
        loop {
            let tids = list_tids(pid)?;
            let new: Vec<i32> = tids.difference(&seen).copied().collect();
            if new.is_empty() {
                break;
            }
            let mut seized = Vec::new();
            for tid in new {
                seen.insert(tid);
                match Seized::seize(tid, libc::PTRACE_O_TRACESYSGOOD) {
                    Ok(s) => seized.push(s),
                    Err(FreezeError::Seize {
                        errno: Errno::ESRCH,
                        ..
                    }) if tid != pid => continue,
                    Err(e) => return Err(e),
                }
            }
            for s in seized {
                let tid = s.tid;
                match s.interrupt() {
                    Ok(st) => f.threads.push(st),
                    Err(FreezeError::Gone { .. }) if tid != pid => {}
                    Err(e) => return Err(e),
                }
            }
        }
        f.threads
            .sort_by_key(|t| if t.tid == pid { 0 } else { t.tid });
        if f.threads.first().map(|t| t.tid) != Some(pid) {
            return Err(FreezeError::NoProcess { pid });
        }
        Ok(f)
    }

    /// Lets every thread run on unchanged.
    pub fn thaw(mut self) {
        self.detach_all();
    }

    fn detach_all(&mut self) {
        self.done = true;
        for t in self.threads.drain(..) {
            if let Err(e) = t.detach() {
                tracing::warn!("thaw: {e}");
            }
        }
    }

    /// Kills the process (the dump committed) and reaps nothing (it is not our child).
    pub fn kill(mut self) {
        self.done = true;
        let _ = sys::kill(self.pid, libc::SIGKILL);
        // Non-leaders first: the leader's exit is reported only after theirs.
        for t in self.threads.drain(..).rev() {
            let _ = sys::wait_tid(t.tid);
        }
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if !self.done {
            self.detach_all();
        }
    }
}
