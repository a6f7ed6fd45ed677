//! Making the process that will become the restored one: a new pid namespace whose
//! init is a forked stub of migd that only reaps, and, inside it, a child created with
//! clone3 set_tid = [old pid] that maps the injection gadget and waits to be seized.
//!
//! The stub talks with its parent over a `SOCK_SEQPACKET` socket pair ([`StubLink`]):
//! it reports the target's wait status when the target ends, and it holds descriptors
//! handed to it (the userfaultfds of a lazy restore, which must outlive whoever serves
//! them: see [`super::lazy`]) until told to drop them or until it ends.

use super::RestoreError;
use crate::engine::freeze::{Seized, Stopped};
use crate::engine::inject::GADGET;
use crate::engine::procfs;
use crate::sys::uffd;
use crate::sys::{self, kabi};
use nix::sys::socket::{self as sock, ControlMessage, MsgFlags};
use std::io::IoSlice;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

/// Messages on the stub link: 8 bytes, a tag and a value.
const TAG_HOLD: u32 = 1; // parent -> stub: keep the fd sent along; stub -> parent: its number there
const TAG_DROP: u32 = 2; // parent -> stub: close your fd number `value`
const TAG_STATUS: u32 = 3; // stub -> parent: the target ended with raw wait status `value`

fn msg(tag: u32, value: i32) -> [u8; 8] {
    let mut b = [0u8; 8];
    b[..4].copy_from_slice(&tag.to_ne_bytes());
    b[4..].copy_from_slice(&value.to_ne_bytes());
    b
}

fn unmsg(b: &[u8]) -> Option<(u32, i32)> {
    (b.len() == 8).then(|| {
        (
            u32::from_ne_bytes(b[..4].try_into().unwrap()),
            i32::from_ne_bytes(b[4..].try_into().unwrap()),
        )
    })
}

/// Our end of the link with the stub.
#[derive(Debug)]
pub struct StubLink {
    /// The stub's pid, as we see it.
    pub pid: i32,
    fd: OwnedFd,
    /// The status, if it came while we waited for something else.
    status: Option<i32>,
}

impl StubLink {
    /// The socket, for poll: readable when the target's status has come.
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Hands `fd` to the stub, which keeps it until [`drop_fd`](Self::drop_fd) or
    /// its end; returns the number of the stub's copy.
    pub fn hold(&mut self, fd: RawFd) -> Result<i32, nix::errno::Errno> {
        let m = msg(TAG_HOLD, 0);
        let fds = [fd];
        sock::sendmsg::<()>(
            self.raw_fd(),
            &[IoSlice::new(&m)],
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::MSG_NOSIGNAL,
            None,
        )?;
        loop {
            match self.read(true)? {
                Some((TAG_HOLD, n)) => return Ok(n),
                Some((TAG_STATUS, st)) => self.status = Some(st),
                Some(_) => {}
                None => return Err(nix::errno::Errno::EPIPE),
            }
        }
    }

    /// Tells the stub to close its copy number `n`.
    pub fn drop_fd(&self, n: i32) {
        let _ = sock::send(self.raw_fd(), &msg(TAG_DROP, n), MsgFlags::MSG_NOSIGNAL);
    }

    /// One message; `None` at the end (the stub is gone).
    fn read(&self, block: bool) -> Result<Option<(u32, i32)>, nix::errno::Errno> {
        let mut b = [0u8; 8];
        let flags = if block {
            MsgFlags::empty()
        } else {
            MsgFlags::MSG_DONTWAIT
        };
        loop {
            match sock::recv(self.raw_fd(), &mut b, flags) {
                Ok(0) => return Ok(None),
                Ok(n) => return Ok(unmsg(&b[..n])),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// The target's raw wait status if it has ended (does not block). A stub that
    /// ended without reporting one (killed: SIGKILL to the stub ends its whole pid
    /// namespace) gives its own status instead, read without reaping it.
    pub fn try_status(&mut self) -> Option<i32> {
        while self.status.is_none() {
            match self.read(false) {
                Ok(Some((TAG_STATUS, st))) => self.status = Some(st),
                Ok(Some(_)) => {}
                Ok(None) => {
                    self.status = self.stub_status(false);
                    break;
                }
                Err(_) => break,
            }
        }
        self.status
    }

    /// The stub's own raw wait status once it has ended, without reaping it.
    fn stub_status(&self, block: bool) -> Option<i32> {
        use nix::sys::wait::{waitid, Id, WaitPidFlag, WaitStatus};
        let mut flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT;
        if !block {
            flags |= WaitPidFlag::WNOHANG;
        }
        match waitid(Id::Pid(nix::unistd::Pid::from_raw(self.pid)), flags) {
            Ok(WaitStatus::Exited(_, code)) => Some((code & 0xff) << 8),
            Ok(WaitStatus::Signaled(_, sig, core)) => {
                Some(sig as i32 | if core { 0x80 } else { 0 })
            }
            _ => None,
        }
    }

    /// Waits for the target's raw wait status (the stub's own if it ended without
    /// reporting one; `None` if neither can be had).
    pub fn wait_status(&mut self) -> Option<i32> {
        while self.status.is_none() {
            match self.read(true) {
                Ok(Some((TAG_STATUS, st))) => self.status = Some(st),
                Ok(Some(_)) => {}
                _ => {
                    self.status = self.stub_status(true);
                    break;
                }
            }
        }
        self.status
    }
}

pub struct Spawned {
    /// The stub (pid 1 of the new namespace), as we see it.
    pub stub: i32,
    /// The future restored process, as we see it.
    pub target: i32,
    pub leader: Stopped,
    /// The stub reports the target's raw wait status here when it ends, and holds
    /// descriptors handed to it.
    pub link: StubLink,
}

/// Forks the stub and the child. Must be called while this process is single-threaded.
pub fn spawn(vpid: i32, gadget: u64, gadget_len: usize) -> Result<Spawned, RestoreError> {
    let err = |what: &str, e: nix::errno::Errno| RestoreError::Spawn {
        what: format!("{what}: {e}"),
    };
    let (ready_r, ready_w) = sys::pipe().map_err(|e| err("pipe", e))?;
    let (link_ours, link_stub) = sock::socketpair(
        sock::AddressFamily::Unix,
        sock::SockType::SeqPacket,
        None,
        sock::SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|e| err("socketpair", e))?;
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
        drop(link_ours);
        stub_main(
            vpid,
            gadget,
            gadget_len,
            ready_w.as_raw_fd(),
            link_stub.as_raw_fd(),
        );
    }
    drop(ready_w);
    drop(link_stub);
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
        link: StubLink {
            pid: stub,
            fd: link_ours,
            status: None,
        },
    })
}

fn stub_main(vpid: i32, gadget: u64, gadget_len: usize, ready: i32, status: i32) -> ! {
    far_pids();
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
        Ok(child) => stub_loop(child, status),
        Err(e) => {
            sys::write_raw(ready, format!("clone3(set_tid=[{vpid}]): {e}").as_bytes());
            sys::exit_now(126);
        }
    }
}

/// Makes the namespace hand out pids from the upper half of the range: threads and
/// children the process makes here get those, and if it goes home with them (clone3
/// set_tid needs them free there), home has most likely not given them to another
/// process, its own pids being low. The sysctl acts on the writer's pid namespace.
fn far_pids() {
    let max: i32 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(32768);
    let _ = std::fs::write("/proc/sys/kernel/ns_last_pid", (max / 2).to_string());
}

/// The stub's life as pid 1: reap every process of the namespace, keep the fds handed
/// over the link, and report the target's end (then end too, which ends the
/// namespace).
fn stub_loop(child: i32, link: RawFd) -> ! {
    use nix::sys::signal::{sigprocmask, SigSet, SigmaskHow, Signal};
    use nix::sys::signalfd::{SfdFlags, SignalFd};
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    sys::close_all_but(link);
    let mut mask = SigSet::empty();
    mask.add(Signal::SIGCHLD);
    let _ = sigprocmask(SigmaskHow::SIG_BLOCK, Some(&mask), None);
    let Ok(sfd) = SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
    else {
        sys::exit_now(124)
    };
    let mut held: Vec<OwnedFd> = Vec::new();
    let mut link_open = true;
    loop {
        // Reap everything that ended; the target's end is reported, then we end.
        while let Ok(ws) = waitpid(None, Some(WaitPidFlag::WNOHANG | WaitPidFlag::__WALL)) {
            let (pid, raw) = match ws {
                WaitStatus::Exited(p, code) => (p.as_raw(), (code & 0xff) << 8),
                WaitStatus::Signaled(p, sig, core) => {
                    (p.as_raw(), sig as i32 | if core { 0x80 } else { 0 })
                }
                WaitStatus::StillAlive => break,
                _ => continue,
            };
            if pid == child {
                let _ = sock::send(link, &msg(TAG_STATUS, raw), MsgFlags::MSG_NOSIGNAL);
                let code = if libc::WIFEXITED(raw) {
                    libc::WEXITSTATUS(raw)
                } else {
                    128 + libc::WTERMSIG(raw)
                };
                sys::exit_now(code);
            }
        }
        let fds: Vec<RawFd> = if link_open {
            vec![sfd.as_raw_fd(), link]
        } else {
            vec![sfd.as_raw_fd()]
        };
        let Ok(ready) = uffd::poll_readable(&fds, -1) else {
            continue;
        };
        while let Ok(Some(_)) = sfd.read_signal() {}
        if ready.get(1).copied().unwrap_or(false) {
            link_open = stub_serve(link, &mut held);
        }
    }
}

/// One request on the stub link; false once the parent's end is closed.
fn stub_serve(link: RawFd, held: &mut Vec<OwnedFd>) -> bool {
    let mut b = [0u8; 8];
    let (n, got) = match uffd::recv_with_fds(link, &mut b, true) {
        Ok(r) => r,
        Err(nix::errno::Errno::EAGAIN) | Err(nix::errno::Errno::EINTR) => return true,
        Err(_) => return false,
    };
    if n == 0 && got.is_empty() {
        return false;
    }
    match unmsg(&b[..n]) {
        Some((TAG_HOLD, _)) => {
            for fd in got {
                let _ = sock::send(link, &msg(TAG_HOLD, fd.as_raw_fd()), MsgFlags::MSG_NOSIGNAL);
                held.push(fd);
            }
        }
        Some((TAG_DROP, n)) => held.retain(|f| f.as_raw_fd() != n),
        _ => drop(got),
    }
    true
}
