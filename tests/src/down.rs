//! `cluster down`: stops a cluster, also one whose `up` crashed or whose state file is
//! gone, and leaves nothing behind. Idempotent.
//!
//! Order: SIGTERM every daemon (last started first), give them a few seconds, SIGKILL
//! the nodes' pid 1 (the kernel then kills whatever else runs in the node, and the
//! node's mounts and veth go with its namespaces), then delete the bridge. Leftovers
//! are found by name: node-init processes whose command line names the directory, and
//! bridges whose alias names it.

use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::exec::{contains, holder_alive, processes_of_node};
use crate::net;
use crate::state::ClusterState;
use crate::up::alive;

/// Why `down` could not finish.
#[derive(Debug, thiserror::Error)]
pub enum DownError {
    #[error("processes of the cluster in {dir} are still alive after SIGKILL: {pids:?}")]
    Survivors { dir: PathBuf, pids: Vec<i32> },
}

/// What `down` did, for the one line it prints.
#[derive(Debug, Default)]
pub struct DownReport {
    pub daemons_stopped: usize,
    pub nodes_stopped: usize,
    pub links_deleted: Vec<String>,
}

/// How long daemons get between SIGTERM and SIGKILL.
pub const GRACE: Duration = Duration::from_secs(5);

/// Stops the cluster of `dir`.
pub fn down(dir: &Path) -> Result<DownReport, DownError> {
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_owned());
    let mut report = DownReport::default();
    let state = ClusterState::load(&dir).ok();

    let mut holders: Vec<i32> = Vec::new();
    if let Some(s) = &state {
        holders.extend(
            s.nodes
                .iter()
                .map(|n| n.holder)
                .filter(|h| holder_alive(*h)),
        );
    }
    for h in find_holders(&dir) {
        if !holders.contains(&h) {
            holders.push(h);
        }
    }

    // 1. SIGTERM the daemons, the last started first.
    let mut termed = Vec::new();
    if let Some(s) = &state {
        for n in &s.nodes {
            if !holders.contains(&n.holder) {
                continue;
            }
            let in_node = processes_of_node(n.holder);
            for d in n.daemons.iter().rev() {
                if let Some(pid) = d.pid {
                    if in_node.contains(&pid) && alive(pid) {
                        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
                        termed.push(pid);
                    }
                }
            }
        }
    }
    let deadline = Instant::now() + GRACE;
    while termed.iter().any(|p| alive(*p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    report.daemons_stopped = termed.len();

    // 2. SIGKILL every node's pid 1: the kernel kills the rest of each node.
    for h in &holders {
        let _ = kill(Pid::from_raw(*h), Signal::SIGKILL);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut left: Vec<i32>;
    loop {
        left = holders.iter().copied().filter(|h| alive(*h)).collect();
        left.extend(termed.iter().copied().filter(|p| alive(*p)));
        if left.is_empty() || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    report.nodes_stopped = holders.len();

    // 3. Network: the veths die with their namespaces; the bridge is ours to delete.
    let mut links: Vec<(String, Option<u8>)> = Vec::new();
    if let Some(s) = &state {
        if !s.bridge.is_empty() {
            links.push((s.bridge.clone(), Some(s.index)));
        }
    }
    for (bridge, bdir) in net::ferry_bridges() {
        if Path::new(&bdir) == dir && !links.iter().any(|(b, _)| *b == bridge) {
            let k = bridge.trim_start_matches("ferrybr").parse().ok();
            links.push((bridge, k));
        }
    }
    for (bridge, k) in links {
        if let Some(k) = k {
            for v in net::veths_of_slot(k) {
                net::delete_link(&v);
                report.links_deleted.push(v);
            }
        }
        if Path::new("/sys/class/net").join(&bridge).exists() {
            net::delete_link(&bridge);
            report.links_deleted.push(bridge);
        }
    }

    let _ = std::fs::remove_file(ClusterState::path(&dir));
    if !left.is_empty() {
        return Err(DownError::Survivors { dir, pids: left });
    }
    Ok(report)
}

/// Live node-init processes whose command line names `dir`.
pub fn find_holders(dir: &Path) -> Vec<i32> {
    if dir.as_os_str().is_empty() {
        return Vec::new();
    }
    let needle = dir.as_os_str().as_encoded_bytes();
    let me = std::process::id() as i32;
    let mut found = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return found;
    };
    for e in rd.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let is_init = args.iter().any(|a| *a == b"node-init");
        let names_dir = args.contains(&needle);
        if is_init && names_dir && contains(&cmdline, b"--node") && holder_alive(pid) {
            found.push(pid);
        }
    }
    found
}

/// Stops every cluster left behind: those whose nodes are gone but whose bridge is
/// left, those whose state file is gone, and test clusters (under
/// [`crate::cluster::TEST_ROOT`]) whose owning test process died without taking them
/// down. A cluster started by `cluster up` that still runs is left alone.
pub fn down_stale() -> Vec<(PathBuf, Result<DownReport, DownError>)> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    for (_bridge, dir) in net::ferry_bridges() {
        if !dir.is_empty() {
            dirs.push(PathBuf::from(dir));
        }
    }
    for d in all_holder_dirs() {
        if !dirs.contains(&d) {
            dirs.push(d);
        }
    }
    let mut done = Vec::new();
    for d in dirs {
        let starting = std::fs::read_to_string(d.join(crate::up::STARTING_FILE))
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok())
            .is_some_and(crate::up::alive);
        if starting {
            continue;
        }
        let stale = match ClusterState::load(&d) {
            Err(_) => true,
            Ok(s) => {
                let nodes_live = s.nodes.iter().any(|n| holder_alive(n.holder));
                let owner_gone =
                    d.starts_with(crate::cluster::TEST_ROOT) && !crate::up::alive(s.up_pid as i32);
                !nodes_live || owner_gone
            }
        };
        if stale {
            let r = down(&d);
            done.push((d, r));
        }
    }
    done
}

/// The `--dir` of every live node-init.
fn all_holder_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return dirs;
    };
    for e in rd.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        if !args.contains(&&b"node-init"[..]) || !holder_alive(pid) {
            continue;
        }
        if let Some(i) = args.iter().position(|a| *a == b"--dir") {
            if let Some(d) = args.get(i + 1) {
                let d = PathBuf::from(std::ffi::OsStr::from_bytes(d));
                if !dirs.contains(&d) {
                    dirs.push(d);
                }
            }
        }
    }
    dirs
}
