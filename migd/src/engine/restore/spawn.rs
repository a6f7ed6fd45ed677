//! Making the process that will become the restored one: a new pid namespace whose
//! init is a forked stub of migd that only reaps, and, inside it, a child created with
//! clone3 set_tid = [old pid] that maps the injection gadget and waits to be seized.

use super::RestoreError;
use crate::engine::freeze::{Seized, Stopped};
use crate::engine::inject::GADGET;
use crate::engine::procfs;
use crate::sys::{self, kabi};
use std::os::fd::{AsRawFd, OwnedFd};

pub struct Spawned {
    /// The stub (pid 1 of the new namespace), as we see it.
    pub stub: i32,
    /// The future restored process, as we see it.
    pub target: i32,
    pub leader: Stopped,
    /// The stub writes the target's raw wait status here when it ends.
    pub status: OwnedFd,
}

/// Forks the stub and the child. Must be called while this process is single-threaded.
pub fn spawn(vpid: i32, gadget: u64, gadget_len: usize) -> Result<Spawned, RestoreError> {
    let err = |what: &str, e: nix::errno::Errno| RestoreError::Spawn {
        what: format!("{what}: {e}"),
    };
    let (ready_r, ready_w) = sys::pipe().map_err(|e| err("pipe", e))?;
    let (status_r, status_w) = sys::pipe().map_err(|e| err("pipe", e))?;
    // clone3(CLONE_NEWPID): the stub is pid 1 of a new namespace and the caller's own
    // namespace settings stay as they were (restore can run again in this process).
    let args = kabi::CloneArgs {
        flags: libc::CLONE_NEWPID as u64,
        exit_signal: libc::SIGCHLD as u64,
        ..Default::default()
    };
    // SAFETY: without CLONE_VM this is a fork; the child (stub) only makes raw
    // syscalls and exits. Callers restore from a single-threaded process (migd
    // restore is one) or accept fork-in-threads rules for the stub's short life.
    let stub = unsafe { sys::clone3(&args) }.map_err(|e| err("clone3(CLONE_NEWPID)", e))?;
    if stub == 0 {
        drop(ready_r);
        drop(status_r);
        stub_main(
            vpid,
            gadget,
            gadget_len,
            ready_w.as_raw_fd(),
            status_w.as_raw_fd(),
        );
    }
    drop(ready_w);
    drop(status_w);
    let mut buf = [0u8; 64];
    let n = sys::read_raw(ready_r.as_raw_fd(), &mut buf);
    if n <= 0 || buf[0] != b'r' {
        let msg = String::from_utf8_lossy(&buf[..n.max(0) as usize]).into_owned();
        let _ = sys::kill(stub, libc::SIGKILL);
        let _ = sys::wait_child(stub);
        return Err(RestoreError::Spawn {
            what: format!("creating pid {vpid} in a new pid namespace failed: {msg}"),
        });
    }
    let target = *procfs::children_of(stub)
        .first()
        .ok_or_else(|| RestoreError::Spawn {
            what: "stub has no child".into(),
        })?;
    let opts = libc::PTRACE_O_TRACECLONE | libc::PTRACE_O_TRACESYSGOOD | libc::PTRACE_O_EXITKILL;
    let leader = Seized::seize(target, opts)?.interrupt()?;
    Ok(Spawned {
        stub,
        target,
        leader,
        status: status_r,
    })
}

fn stub_main(vpid: i32, gadget: u64, gadget_len: usize, ready: i32, status: i32) -> ! {
    let set_tid = [vpid];
    let args = kabi::CloneArgs {
        exit_signal: libc::SIGCHLD as u64,
        set_tid: set_tid.as_ptr() as u64,
        set_tid_size: 1,
        ..Default::default()
    };
    // SAFETY: we are the freshly forked stub, single-threaded.
    match unsafe { sys::clone3(&args) } {
        Ok(0) => {
            if let Err(e) = sys::install_gadget(gadget, gadget_len, &GADGET) {
                sys::write_raw(
                    ready,
                    format!("mapping gadget at {gadget:#x}: {e}").as_bytes(),
                );
                sys::exit_now(127);
            }
            sys::block_all_signals();
            sys::write_raw(ready, b"r");
            loop {
                sys::pause();
            }
        }
        Ok(child) => loop {
            sys::close_all_but(status);
            match sys::wait_any() {
                Ok((p, st)) if p == child => {
                    sys::write_raw(status, &st.to_ne_bytes());
                    let code = if libc::WIFEXITED(st) {
                        libc::WEXITSTATUS(st)
                    } else {
                        128 + libc::WTERMSIG(st)
                    };
                    sys::exit_now(code);
                }
                Ok(_) => {}
                Err(_) => sys::exit_now(125),
            }
        },
        Err(e) => {
            sys::write_raw(ready, format!("clone3(set_tid=[{vpid}]): {e}").as_bytes());
            sys::exit_now(126);
        }
    }
}
