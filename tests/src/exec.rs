//! `cluster exec`: runs a command inside a node.
//!
//! The calling process joins the node's network, UTS and pid namespaces (those of its
//! pid 1, the holder) and forks; the child also joins the node's mount namespace,
//! moves to `/` and execs the command, so it is a process of the node in every
//! respect. The caller waits for it, forwards SIGINT/SIGTERM/SIGHUP/SIGQUIT to it and
//! returns its status as a shell would (128 + signal when a signal killed it).
//!
//! With `detach`, the command runs as a daemon of the node instead: the child starts
//! a new session and forks once more so that the command's parent is the node's
//! pid 1, its output goes to a log file, and its host pid is returned.
//!
//! This forks: call it only from a single-threaded process (the `cluster` binary).
//! Multi-threaded callers (tests) run the `cluster` binary instead, see
//! [`crate::Cluster::exec`].

use std::ffi::{CString, OsString};
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::sched::{setns, CloneFlags};
use nix::sys::wait::{waitpid, WaitStatus};

use crate::state::{ClusterState, StateError};
use crate::sys::{
    block_forwarded_signals, default_signals, fork_single_threaded, forward_signals_to, Forked,
};

/// Why a command could not be started in a node.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error("node {node} is not running (its pid 1, host pid {holder}, is gone); restart the cluster with `cluster down` and `cluster up`")]
    NodeDown { node: String, holder: i32 },
    #[error("cannot enter the {kind} namespace of node {node} (holder pid {holder}): {source}")]
    Setns {
        node: String,
        kind: &'static str,
        holder: i32,
        source: std::io::Error,
    },
    #[error("cannot open log file {path}: {source}")]
    Log {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start a process in node {node}: {source}")]
    Spawn {
        node: String,
        source: std::io::Error,
    },
    #[error("started {program} in node {node} but could not find its host pid")]
    HostPid { node: String, program: String },
    #[error("no command given")]
    NoCommand,
}

/// What to run where.
#[derive(Debug, Clone)]
pub struct ExecRequest {
    pub dir: PathBuf,
    pub node: String,
    pub argv: Vec<OsString>,
    /// Run detached, as a daemon logging to this file.
    pub detach_log: Option<PathBuf>,
}

/// Whether `pid` is a live node-init holder.
pub fn holder_alive(pid: i32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| contains(&c, b"node-init"))
        .unwrap_or(false)
        && !is_zombie(pid)
}

/// Whether `pid` is a zombie (exited, not yet reaped).
pub fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

pub(crate) fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn err_io(e: nix::Error) -> std::io::Error {
    std::io::Error::from(e)
}

/// Runs the request. Foreground: returns the exit code for the caller to exit with.
/// Detached: returns the daemon's host pid.
pub fn exec_in_node(req: &ExecRequest) -> Result<i32, ExecError> {
    let state = ClusterState::load(&req.dir)?;
    let node = state.node(&req.node)?;
    if req.argv.is_empty() {
        return Err(ExecError::NoCommand);
    }
    let holder = node.holder;
    if !holder_alive(holder) {
        return Err(ExecError::NodeDown {
            node: node.name.clone(),
            holder,
        });
    }
    let open_ns = |kind: &'static str| {
        File::open(format!("/proc/{holder}/ns/{kind}")).map_err(|source| ExecError::Setns {
            node: node.name.clone(),
            kind,
            holder,
            source,
        })
    };
    let (net, uts, pid, mnt) = (
        open_ns("net")?,
        open_ns("uts")?,
        open_ns("pid")?,
        open_ns("mnt")?,
    );
    let log = match &req.detach_log {
        Some(path) => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| ExecError::Log {
                    path: path.clone(),
                    source,
                })?,
        ),
        None => None,
    };

    // The environment every command of a node gets.
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    let mut new_path = OsString::from(&state.bin_dir);
    new_path.push(":");
    new_path.push(path);
    std::env::set_var("PATH", new_path);
    std::env::set_var("FERRY_CONFIG", &node.config);
    std::env::set_var("FERRY_NODE", &node.name);
    std::env::set_var("HOSTNAME", &node.name);

    for (fd, kind, flag) in [
        (&net, "net", CloneFlags::CLONE_NEWNET),
        (&uts, "uts", CloneFlags::CLONE_NEWUTS),
        (&pid, "pid", CloneFlags::CLONE_NEWPID),
    ] {
        setns(fd, flag).map_err(|e| ExecError::Setns {
            node: node.name.clone(),
            kind,
            holder,
            source: e.into(),
        })?;
    }
    let argv: Vec<CString> = req
        .argv
        .iter()
        .map(|a| CString::new(a.as_bytes()).unwrap_or_else(|_| CString::from(c"?")))
        .collect();
    let spawn_err = |source: std::io::Error| ExecError::Spawn {
        node: req.node.clone(),
        source,
    };

    if log.is_none() {
        block_forwarded_signals().map_err(|e| spawn_err(err_io(e)))?;
    }
    match log {
        None => match fork_single_threaded().map_err(|e| spawn_err(err_io(e)))? {
            Forked::Child => {
                enter_mnt_and_exec(&mnt, &argv, None);
            }
            Forked::Parent(child) => {
                forward_signals_to(child).map_err(|e| spawn_err(err_io(e)))?;
                loop {
                    match waitpid(child, None) {
                        Ok(WaitStatus::Exited(_, code)) => return Ok(code),
                        Ok(WaitStatus::Signaled(_, sig, _)) => return Ok(128 + sig as i32),
                        Ok(_) => continue,
                        Err(nix::Error::EINTR) => continue,
                        Err(e) => return Err(spawn_err(err_io(e))),
                    }
                }
            }
        },
        Some(log) => {
            // `rd`/`wr` carry the daemon's node pid out; `go_rd`/`go_wr` hold the
            // daemon back until its host pid is known (a stub may exit at once).
            let (rd, wr) = nix::unistd::pipe().map_err(|e| spawn_err(err_io(e)))?;
            let (go_rd, go_wr) = nix::unistd::pipe().map_err(|e| spawn_err(err_io(e)))?;
            match fork_single_threaded().map_err(|e| spawn_err(err_io(e)))? {
                Forked::Child => {
                    drop(rd);
                    drop(go_wr);
                    let _ = nix::unistd::setsid();
                    match fork_single_threaded() {
                        Ok(Forked::Child) => {
                            drop(wr);
                            let mut go = [0u8; 1];
                            let _ = File::from(go_rd).read(&mut go);
                            enter_mnt_and_exec(&mnt, &argv, Some(&log));
                        }
                        Ok(Forked::Parent(grandchild)) => {
                            let mut w = File::from(wr);
                            let _ = writeln!(w, "{grandchild}");
                            std::process::exit(0);
                        }
                        Err(_) => std::process::exit(1),
                    }
                }
                Forked::Parent(child) => {
                    drop(wr);
                    drop(go_rd);
                    let mut text = String::new();
                    let _ = File::from(rd).read_to_string(&mut text);
                    let _ = waitpid(child, None);
                    let node_pid: i32 = text.trim().parse().map_err(|_| ExecError::HostPid {
                        node: req.node.clone(),
                        program: req.argv[0].to_string_lossy().into_owned(),
                    })?;
                    let host = host_pid_of(holder, node_pid).ok_or_else(|| ExecError::HostPid {
                        node: req.node.clone(),
                        program: req.argv[0].to_string_lossy().into_owned(),
                    });
                    let _ = File::from(go_wr).write_all(b"g");
                    host
                }
            }
        }
    }
}

/// The child side: join the mount namespace, go to `/`, exec. Never returns.
fn enter_mnt_and_exec(mnt: &File, argv: &[CString], log: Option<&File>) -> ! {
    default_signals();
    if let Err(e) = setns(mnt, CloneFlags::CLONE_NEWNS) {
        eprintln!("cluster exec: cannot enter the node's mount namespace: {e}");
        std::process::exit(126);
    }
    let _ = std::env::set_current_dir("/");
    if let Some(log) = log {
        if let Ok(null) = File::open("/dev/null") {
            let _ = nix::unistd::dup2_stdin(&null);
        }
        let _ = nix::unistd::dup2_stdout(log);
        let _ = nix::unistd::dup2_stderr(log);
    }
    crate::sys::cloexec_from_3();
    let e = nix::unistd::execvp(&argv[0], argv).unwrap_err();
    eprintln!(
        "cluster exec: cannot run {}: {e}",
        argv[0].to_string_lossy()
    );
    std::process::exit(if e == nix::Error::ENOENT { 127 } else { 126 });
}

/// The host pid of the process that is `node_pid` in the pid namespace of `holder`.
pub fn host_pid_of(holder: i32, node_pid: i32) -> Option<i32> {
    let ns = std::fs::read_link(format!("/proc/{holder}/ns/pid")).ok()?;
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if std::fs::read_link(e.path().join("ns/pid")).ok().as_ref() != Some(&ns) {
            continue;
        }
        let Ok(status) = std::fs::read_to_string(e.path().join("status")) else {
            continue;
        };
        let inner = status
            .lines()
            .find_map(|l| l.strip_prefix("NSpid:"))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|p| p.parse::<i32>().ok());
        if inner == Some(node_pid) {
            return Some(pid);
        }
    }
    None
}

/// Host pids of every process in the pid namespace of `holder` (holder included).
pub fn processes_of_node(holder: i32) -> Vec<i32> {
    let Ok(ns) = std::fs::read_link(format!("/proc/{holder}/ns/pid")) else {
        return Vec::new();
    };
    let mut pids = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            if let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() {
                if std::fs::read_link(e.path().join("ns/pid")).ok().as_ref() == Some(&ns) {
                    pids.push(pid);
                }
            }
        }
    }
    pids
}

/// Whether `path` names something under /tmp (hidden inside nodes unless kept).
pub fn under_tmp(path: &Path) -> bool {
    path.starts_with("/tmp") && path != Path::new("/tmp")
}
