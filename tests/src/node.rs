//! `cluster node-init`: the process that holds a node's namespaces.
//!
//! `up` starts it with fresh mount, UTS and network namespaces and with its children
//! in a fresh pid namespace (see `sys::unshare_node_namespaces`). It forks at
//! once; the child is pid 1 of the node. The child makes mount propagation private,
//! bind-mounts the node's own directory on /tmp, mounts a fresh /proc, sets the
//! hostname, reports `ready` on stdout and then only reaps orphans until it is killed.
//! The parent prints the child's host pid and exits.
//!
//! Protocol on stdout, one line each: `pid <host pid>` (parent), then `ready` or
//! `error: <what failed>` (child).

use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::fcntl::{open, OFlag};
use nix::mount::{mount, MsFlags};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::stat::Mode;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::sys::{fork_single_threaded, Forked};

/// What a node-init is told to set up.
#[derive(Debug, Clone)]
pub struct NodeInit {
    /// Node name: the hostname.
    pub name: String,
    /// The directory mounted on /tmp.
    pub tmp: PathBuf,
    /// Host paths under /tmp that must stay visible at the same path inside the node
    /// (the cluster directory, the binaries' directory) although /tmp is replaced.
    pub keep: Vec<PathBuf>,
}

/// Runs node-init; returns only on failure before the fork.
pub fn run(init: &NodeInit) -> std::io::Result<()> {
    match fork_single_threaded()? {
        Forked::Parent(child) => {
            let mut out = std::io::stdout().lock();
            writeln!(out, "pid {child}")?;
            out.flush()?;
            std::process::exit(0);
        }
        Forked::Child => {
            let result = setup(init);
            let mut out = std::io::stdout().lock();
            match result {
                Ok(()) => {
                    let _ = writeln!(out, "ready");
                    let _ = out.flush();
                    drop(out);
                    detach_stdio();
                    hold();
                }
                Err(e) => {
                    let _ = writeln!(out, "error: {e}");
                    let _ = out.flush();
                    std::process::exit(1);
                }
            }
        }
    }
}

fn err(what: String) -> impl FnOnce(nix::Error) -> std::io::Error {
    move |e| std::io::Error::other(format!("{what}: {e}"))
}

fn setup(init: &NodeInit) -> std::io::Result<()> {
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(err("making / private (mount --make-rprivate /)".into()))?;

    // Hold the paths that must survive the /tmp replacement before it hides them.
    let mut kept: Vec<(PathBuf, OwnedFd)> = Vec::new();
    for p in &init.keep {
        if p.starts_with("/tmp") && p != Path::new("/tmp") {
            let fd = open(
                p,
                OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
                Mode::empty(),
            )
            .map_err(err(format!("opening {} to keep it visible", p.display())))?;
            kept.push((p.clone(), fd));
        }
    }

    mount(
        Some(&init.tmp),
        "/tmp",
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(err(format!("bind-mounting {} on /tmp", init.tmp.display())))?;

    for (p, fd) in &kept {
        std::fs::create_dir_all(p)?;
        let src = format!("/proc/self/fd/{}", fd.as_raw_fd());
        mount(
            Some(src.as_str()),
            p,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(err(format!("bind-mounting {} back over /tmp", p.display())))?;
    }
    drop(kept);

    mount(
        Some("proc"),
        "/proc",
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(err("mounting a fresh /proc".into()))?;

    nix::unistd::sethostname(&init.name).map_err(err(format!("setting hostname {}", init.name)))?;
    std::env::set_current_dir("/")?;
    Ok(())
}

/// Points stdin, stdout and stderr at /dev/null so `up` sees end-of-file.
fn detach_stdio() {
    if let Ok(null) = open("/dev/null", OFlag::O_RDWR, Mode::empty()) {
        let _ = nix::unistd::dup2_stdin(&null);
        let _ = nix::unistd::dup2_stdout(&null);
        let _ = nix::unistd::dup2_stderr(&null);
    }
}

/// pid 1's job: reap every child, forever. SIGTERM, SIGINT and SIGHUP end the node
/// (the kernel then kills every process left in its pid namespace).
fn hold() -> ! {
    let mut set = SigSet::empty();
    for s in [
        Signal::SIGCHLD,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGHUP,
    ] {
        set.add(s);
    }
    let _ = set.thread_block();
    loop {
        match set.wait() {
            Ok(Signal::SIGCHLD) => loop {
                match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::StillAlive) | Err(_) => break,
                    Ok(_) => continue,
                }
            },
            Ok(_) => std::process::exit(0),
            Err(_) => continue,
        }
    }
}
