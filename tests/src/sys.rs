//! The few raw process and namespace operations the harness needs, each behind a
//! small safe wrapper. Everything `unsafe` in this crate is here.

use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::atomic::{AtomicI32, Ordering};

use nix::sched::CloneFlags;
use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal};
use nix::unistd::{ForkResult, Pid};

/// Makes `cmd` start in fresh mount, UTS and network namespaces, with its children in
/// a fresh pid namespace (its first child becomes pid 1 there).
pub fn unshare_node_namespaces(cmd: &mut Command) {
    let flags = CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWUTS
        | CloneFlags::CLONE_NEWNET
        | CloneFlags::CLONE_NEWPID;
    // SAFETY: the closure runs in the forked child before exec and only makes the
    // unshare(2) system call, which is async-signal-safe; it touches no memory shared
    // with the parent's other threads and does not allocate.
    unsafe {
        cmd.pre_exec(move || nix::sched::unshare(flags).map_err(std::io::Error::from));
    }
}

/// Which side of a fork we are on.
pub enum Forked {
    Parent(Pid),
    Child,
}

/// fork(2). Only call it from a single-threaded process (the `cluster` binary's
/// subcommands are): the child then may do anything, not only async-signal-safe calls.
pub fn fork_single_threaded() -> nix::Result<Forked> {
    // SAFETY: callers are single-threaded processes (documented above), so the child
    // inherits no lock held by another thread and may allocate freely.
    match unsafe { nix::unistd::fork() }? {
        ForkResult::Parent { child } => Ok(Forked::Parent(child)),
        ForkResult::Child => Ok(Forked::Child),
    }
}

static FORWARD_TO: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward(sig: libc::c_int) {
    let pid = FORWARD_TO.load(Ordering::Relaxed);
    if pid > 0 {
        // SAFETY: kill(2) is async-signal-safe and takes plain integers.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

const FORWARDED: [Signal; 4] = [
    Signal::SIGINT,
    Signal::SIGTERM,
    Signal::SIGHUP,
    Signal::SIGQUIT,
];

fn forwarded_set() -> SigSet {
    let mut set = SigSet::empty();
    for s in FORWARDED {
        set.add(s);
    }
    set
}

/// Blocks the signals [`forward_signals_to`] will forward, so that one arriving
/// between fork and the handlers' installation waits instead of killing us.
pub fn block_forwarded_signals() -> nix::Result<()> {
    forwarded_set().thread_block()
}

/// Forwards SIGINT, SIGTERM, SIGHUP and SIGQUIT received by this process to `child`,
/// the way a shell passes signals to the job it waits for; then unblocks them (see
/// [`block_forwarded_signals`]), so one that arrived meanwhile is forwarded now.
pub fn forward_signals_to(child: Pid) -> nix::Result<()> {
    FORWARD_TO.store(child.as_raw(), Ordering::Relaxed);
    let action = SigAction::new(
        SigHandler::Handler(forward),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for sig in FORWARDED {
        // SAFETY: the handler only loads an atomic and calls kill(2), both
        // async-signal-safe; no other code of this process installs handlers.
        unsafe { nix::sys::signal::sigaction(sig, &action) }?;
    }
    forwarded_set().thread_unblock()
}

/// Restores the default disposition of every signal the harness may have touched
/// (before exec'ing a command in a node).
pub fn default_signals() {
    for sig in [
        Signal::SIGINT,
        Signal::SIGTERM,
        Signal::SIGHUP,
        Signal::SIGQUIT,
        Signal::SIGPIPE,
        Signal::SIGCHLD,
    ] {
        // SAFETY: installing SIG_DFL runs no code of ours in signal context.
        let _ = unsafe { nix::sys::signal::signal(sig, SigHandler::SigDfl) };
    }
    let _ = nix::sys::signal::sigprocmask(
        nix::sys::signal::SigmaskHow::SIG_SETMASK,
        Some(&SigSet::empty()),
        None,
    );
}

/// Marks every descriptor from 3 up close-on-exec (close_range(2) with
/// CLOSE_RANGE_CLOEXEC), so a command run in a node inherits only its stdio, as over
/// ssh, and not whatever the caller left open (a test runner's jobserver pipe, say),
/// which would name files of the host inside the node.
pub fn cloexec_from_3() {
    /// CLOSE_RANGE_CLOEXEC from include/uapi/linux/close_range.h.
    const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
    // SAFETY: close_range only changes descriptor flags of this process; it reads and
    // writes no memory of ours.
    unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3 as libc::c_uint,
            libc::c_uint::MAX,
            CLOSE_RANGE_CLOEXEC,
        );
    }
}
