//! `cluster up`: namespaces, network, configs, key, then the daemons, phase by phase.

use std::io::{BufRead, BufReader};
use std::net::IpAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::config::{FsConfig, MigdConfig, NodeConfig, NodeEntry, VolumeConfig};

use crate::daemons::{DaemonSpec, Ready, DAEMONS, STUB_MARKER};
use crate::exec::{holder_alive, is_zombie, under_tmp};
use crate::net::{self, NetError};
use crate::state::{ClusterState, DaemonState, NodeState, StateError};

/// Why `up` failed. `up` has cleaned up what it started before returning it.
#[derive(Debug, thiserror::Error)]
pub enum UpError {
    #[error(
        "a cluster is already running in {dir}; stop it first with `cluster down --dir {dir}`"
    )]
    AlreadyUp { dir: PathBuf },
    #[error("cannot prepare {path}: {source}")]
    Prepare {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{binary} is missing in {dir}; build the workspace first (`cargo build --workspace`, same profile)")]
    MissingBinary { binary: String, dir: PathBuf },
    #[error(transparent)]
    Net(#[from] NetError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("node {node}: cannot start its namespaces: {detail}")]
    NodeInit { node: String, detail: String },
    #[error("node {node}: cannot start {daemon}: {detail}")]
    Spawn {
        node: String,
        daemon: String,
        detail: String,
    },
    #[error("node {node}: {daemon} {problem}; see {log}:\n{tail}")]
    Daemon {
        node: String,
        daemon: String,
        problem: String,
        log: PathBuf,
        tail: String,
    },
    #[error("{nodes} nodes asked; a cluster has 1 to 200")]
    NodeCount { nodes: usize },
}

/// A change applied to every node's config before it is written.
pub type Configure = Box<dyn Fn(&mut NodeConfig)>;

/// How to start a cluster.
pub struct UpOptions {
    pub nodes: usize,
    /// The cluster directory; created if missing.
    pub dir: PathBuf,
    /// Where `cluster` and the daemons are; default: [`find_bin_dir`].
    pub bin_dir: Option<PathBuf>,
    /// Changes applied to every node's config before it is written.
    pub configure: Option<Configure>,
    /// How long each daemon may take to become ready.
    pub ready_timeout: Duration,
}

impl UpOptions {
    pub fn new(nodes: usize, dir: impl Into<PathBuf>) -> UpOptions {
        UpOptions {
            nodes,
            dir: dir.into(),
            bin_dir: None,
            configure: None,
            ready_timeout: Duration::from_secs(15),
        }
    }
}

/// The directory holding `cluster` and the daemons: `$FERRY_BIN_DIR`, else the
/// directory of the running executable (its parent when that is cargo's `deps` or
/// `examples`).
pub fn find_bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("FERRY_BIN_DIR") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("."));
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir
        .file_name()
        .is_some_and(|n| n == "deps" || n == "examples")
    {
        dir.pop();
    }
    dir
}

/// Present in a cluster directory while `up` runs; holds `up`'s pid.
pub const STARTING_FILE: &str = "cluster.starting";

/// Node name of the `i`-th node (1-based).
pub fn node_name(i: usize) -> String {
    format!("ws{i}")
}

fn prep<T>(path: &Path, r: std::io::Result<T>) -> Result<T, UpError> {
    r.map_err(|source| UpError::Prepare {
        path: path.to_owned(),
        source,
    })
}

/// Starts a cluster. On failure everything started is stopped again.
pub fn up(opts: &UpOptions) -> Result<ClusterState, UpError> {
    if opts.nodes == 0 || opts.nodes > 200 {
        return Err(UpError::NodeCount { nodes: opts.nodes });
    }
    prep(&opts.dir, std::fs::create_dir_all(&opts.dir))?;
    let dir = prep(&opts.dir, opts.dir.canonicalize())?;
    if let Ok(old) = ClusterState::load(&dir) {
        if old.nodes.iter().any(|n| holder_alive(n.holder)) {
            return Err(UpError::AlreadyUp { dir });
        }
    }
    // Leftovers of a crashed run in this directory go first.
    let _ = crate::down::down(&dir);

    let bin_dir = opts.bin_dir.clone().unwrap_or_else(find_bin_dir);
    let bin_dir = bin_dir.canonicalize().unwrap_or(bin_dir);
    if !bin_dir.join("cluster").exists() {
        return Err(UpError::MissingBinary {
            binary: "cluster".into(),
            dir: bin_dir,
        });
    }
    for d in DAEMONS.iter().filter(|d| d.required) {
        if !bin_dir.join(d.name).exists() {
            return Err(UpError::MissingBinary {
                binary: d.name.into(),
                dir: bin_dir,
            });
        }
    }

    let mut state = ClusterState {
        dir: dir.clone(),
        index: 0,
        bridge: String::new(),
        bin_dir: bin_dir.clone(),
        up_pid: std::process::id(),
        nodes: Vec::new(),
    };
    // Marks the cluster as being started, so `down --stale` leaves it alone while no
    // state file exists yet.
    let starting = dir.join(STARTING_FILE);
    prep(
        &starting,
        std::fs::write(&starting, std::process::id().to_string()),
    )?;
    let built = build(opts, &mut state);
    let _ = std::fs::remove_file(&starting);
    match built {
        Ok(()) => Ok(state),
        Err(e) => {
            let _ = state.save();
            let _ = crate::down::down(&dir);
            Err(e)
        }
    }
}

fn build(opts: &UpOptions, state: &mut ClusterState) -> Result<(), UpError> {
    let dir = state.dir.clone();
    let key = dir.join("cluster.key");
    write_key(&key)?;
    let store = dir.join("store");
    prep(&store, std::fs::create_dir_all(&store))?;
    let mp = Path::new("/...");
    if !mp.is_dir() {
        prep(mp, std::fs::create_dir_all(mp))?;
    }

    let k = net::create_bridge(&dir)?;
    state.index = k;
    state.bridge = net::bridge_name(k);
    state.save()?;

    let entries: Vec<NodeEntry> = (1..=opts.nodes)
        .map(|i| NodeEntry {
            name: node_name(i),
            addr: IpAddr::V4(net::node_addr(k, i)),
        })
        .collect();
    let mut keep = Vec::new();
    for p in [&dir, &state.bin_dir] {
        if under_tmp(p) {
            keep.push(p.clone());
        }
    }

    for i in 1..=opts.nodes {
        let name = node_name(i);
        let ndir = dir.join(&name);
        let tmp = ndir.join("tmp");
        prep(&tmp, std::fs::create_dir_all(&tmp))?;
        prep(
            &tmp,
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o1777)),
        )?;
        let mut cfg = NodeConfig {
            node: name.clone(),
            key_file: key.clone(),
            nodes: entries.clone(),
            ports: Default::default(),
            fs: FsConfig::default(),
            fuse: Default::default(),
            migd: MigdConfig {
                socket: ndir.join("migd.sock"),
                state_dir: ndir.join("migd"),
                ..MigdConfig::default()
            },
        };
        if i == 1 {
            cfg.fs.volumes.push(VolumeConfig {
                name: "store".into(),
                path: store.clone(),
            });
        }
        if let Some(f) = &opts.configure {
            f(&mut cfg);
        }
        let config = ndir.join("ferry.toml");
        write_config(&config, &cfg)?;

        let holder = start_node(&state.bin_dir, &dir, &name, &tmp, &keep)?;
        state.nodes.push(NodeState {
            name: name.clone(),
            addr: net::node_addr(k, i),
            veth: net::veth_name(k, i),
            holder,
            config,
            namespaces: ["net", "mnt", "uts", "pid"]
                .iter()
                .filter_map(|k| std::fs::read_link(format!("/proc/{holder}/ns/{k}")).ok())
                .map(|l| l.to_string_lossy().into_owned())
                .collect(),
            daemons: Vec::new(),
        });
        state.save()?;
        net::connect_node(k, i, holder)?;
    }

    for spec in DAEMONS {
        if !spec.required && !state.bin_dir.join(spec.name).exists() {
            tracing::warn!(daemon = spec.name, "binary missing; not started");
            continue;
        }
        let names: Vec<String> = state.nodes.iter().map(|n| n.name.clone()).collect();
        for n in &names {
            let d = start_daemon(state, n, spec)?;
            state.node_mut(n)?.daemons.push(d);
        }
        state.save()?;
        // One deadline for the phase: the nodes' daemons start together.
        let deadline = Instant::now() + opts.ready_timeout;
        for n in &names {
            let left = deadline.saturating_duration_since(Instant::now());
            let d = wait_ready(state, n, spec, left)?;
            let slot = state
                .node_mut(n)?
                .daemons
                .iter_mut()
                .find(|x| x.name == spec.name)
                .expect("pushed above");
            *slot = d;
        }
        state.save()?;
    }
    Ok(())
}

/// Writes a node config file.
pub fn write_config(path: &Path, cfg: &NodeConfig) -> Result<(), UpError> {
    let text = toml::to_string_pretty(cfg).expect("a NodeConfig serializes to TOML");
    prep(path, std::fs::write(path, text))
}

fn write_key(path: &Path) -> Result<(), UpError> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).expect("the kernel's random source works");
    let _ = std::fs::remove_file(path);
    let mut f = prep(
        path,
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path),
    )?;
    prep(path, std::io::Write::write_all(&mut f, &bytes))
}

fn start_node(
    bin_dir: &Path,
    dir: &Path,
    name: &str,
    tmp: &Path,
    keep: &[PathBuf],
) -> Result<i32, UpError> {
    let fail = |detail: String| UpError::NodeInit {
        node: name.to_owned(),
        detail,
    };
    let mut cmd = Command::new(bin_dir.join("cluster"));
    cmd.arg("node-init")
        .arg("--dir")
        .arg(dir)
        .arg("--node")
        .arg(name)
        .arg("--tmp")
        .arg(tmp);
    for k in keep {
        cmd.arg("--keep").arg(k);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    crate::sys::unshare_node_namespaces(&mut cmd);
    let mut child = cmd.spawn().map_err(|e| {
        fail(format!(
            "cannot run {}: {e}",
            bin_dir.join("cluster").display()
        ))
    })?;
    let out = child.stdout.take().expect("stdout is piped");
    // Both the parent ("pid N") and the child ("ready" / "error: ...") write here, in
    // either order; read until both have closed it.
    let mut holder = None;
    let mut ready = false;
    let mut error = None;
    for line in BufReader::new(out).lines() {
        let Ok(line) = line else { break };
        if let Some(p) = line.strip_prefix("pid ") {
            holder = p.trim().parse::<i32>().ok();
        } else if line == "ready" {
            ready = true;
        } else if let Some(e) = line.strip_prefix("error: ") {
            error = Some(e.to_owned());
        }
    }
    let outcome = match (holder, ready, error) {
        (_, _, Some(e)) => Err(fail(e)),
        (Some(h), true, None) => Ok(h),
        (None, _, None) => Err(fail("node-init did not report its pid".into())),
        (Some(_), false, None) => Err(fail("node-init ended without saying ready".into())),
    };
    let _ = child.wait();
    outcome
}

/// Starts one daemon of a node (detached, logging to `DIR/<node>/<daemon>.log`).
pub fn start_daemon(
    state: &ClusterState,
    node: &str,
    spec: &DaemonSpec,
) -> Result<DaemonState, UpError> {
    start_daemon_with_env(state, node, spec, &[])
}

/// [`start_daemon`] with extra environment variables (e.g. a fault test's
/// `FERRY_FAULT`), set through env(1), which execs the daemon in its place.
pub fn start_daemon_with_env(
    state: &ClusterState,
    node: &str,
    spec: &DaemonSpec,
    env: &[(&str, &str)],
) -> Result<DaemonState, UpError> {
    let n = state.node(node)?;
    let log = log_path(&state.dir, node, spec.name);
    let fail = |detail: String| UpError::Spawn {
        node: node.to_owned(),
        daemon: spec.name.to_owned(),
        detail,
    };
    let out = Command::new(state.bin_dir.join("cluster"))
        .arg("exec")
        .arg("--dir")
        .arg(&state.dir)
        .arg("--detach-log")
        .arg(&log)
        .arg(node)
        .arg("--")
        .args(if env.is_empty() {
            vec![]
        } else {
            vec!["env".to_string()]
        })
        .args(env.iter().map(|(k, v)| format!("{k}={v}")))
        .arg(state.bin_dir.join(spec.name))
        .arg("--config")
        .arg(&n.config)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| fail(e.to_string()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let pid = text
        .trim()
        .parse::<i32>()
        .map_err(|_| fail(String::from_utf8_lossy(&out.stderr).trim().to_owned()))?;
    Ok(DaemonState {
        name: spec.name.to_owned(),
        pid: Some(pid),
        absent: None,
    })
}

/// Path of a daemon's log.
pub fn log_path(dir: &Path, node: &str, daemon: &str) -> PathBuf {
    dir.join(node).join(format!("{daemon}.log"))
}

/// The last `lines` lines of a file (or a note that it cannot be read).
pub fn tail(path: &Path, lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

/// Whether a process is running (exists and is not a zombie).
pub fn alive(pid: i32) -> bool {
    !is_zombie(pid)
}

/// Whether a process of `pid`'s network namespace listens on TCP `port` (read from
/// `/proc/<pid>/net/tcp{,6}`, so probing makes no connection the daemon would log).
pub fn listening(pid: i32, port: u16) -> bool {
    let want = format!(":{port:04X}");
    ["tcp", "tcp6"].iter().any(|f| {
        std::fs::read_to_string(format!("/proc/{pid}/net/{f}"))
            .unwrap_or_default()
            .lines()
            .skip(1)
            .any(|l| {
                let mut cols = l.split_whitespace();
                let local = cols.nth(1).unwrap_or("");
                let st = cols.nth(1).unwrap_or("");
                local.ends_with(&want) && st == "0A"
            })
    })
}

/// Whether `mountpoint` is mounted in the mount namespace of `pid`.
pub fn mounted_in(pid: i32, mountpoint: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")) else {
        return false;
    };
    let want = mountpoint.to_string_lossy();
    text.lines()
        .any(|l| l.split(' ').nth(4).is_some_and(|m| m == want))
}

/// Waits until a started daemon is ready, or decides it is a tolerated stub.
pub fn wait_ready(
    state: &ClusterState,
    node: &str,
    spec: &DaemonSpec,
    timeout: Duration,
) -> Result<DaemonState, UpError> {
    let n = state.node(node)?;
    let d = n.daemon(spec.name).cloned().unwrap_or_else(|| DaemonState {
        name: spec.name.into(),
        pid: None,
        absent: Some("not started".into()),
    });
    let Some(pid) = d.pid else { return Ok(d) };
    let log = log_path(&state.dir, node, spec.name);
    let cfg = NodeConfig::load(&n.config).ok();
    let started = Instant::now();
    loop {
        let ready = match spec.ready {
            Ready::Port(port) => cfg.as_ref().is_some_and(|c| listening(pid, port(c))),
            Ready::Mounted => {
                let mp = cfg
                    .as_ref()
                    .map(|c| c.fuse.mountpoint.clone())
                    .unwrap_or_else(|| "/...".into());
                mounted_in(pid, &mp)
            }
            Ready::Started => started.elapsed() > Duration::from_millis(300),
        };
        if ready && alive(pid) {
            return Ok(d);
        }
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains(STUB_MARKER) && spec.required {
            return Err(UpError::Daemon {
                node: node.into(),
                daemon: spec.name.into(),
                problem: format!("is a stub ({STUB_MARKER}) but required"),
                log: log.clone(),
                tail: tail(&log, 20),
            });
        }
        if text.contains(STUB_MARKER) {
            // An optional stub: tolerated whether it exited or idles; `down` still
            // stops it.
            tracing::warn!(
                node,
                daemon = spec.name,
                "daemon is a stub ({STUB_MARKER}); tolerated"
            );
            return Ok(DaemonState {
                name: spec.name.into(),
                pid: Some(pid).filter(|p| alive(*p)),
                absent: Some(STUB_MARKER.into()),
            });
        }
        if !alive(pid) {
            if !spec.required {
                tracing::warn!(node, daemon = spec.name, log = %log.display(), "optional daemon exited at start; continuing without it");
                return Ok(DaemonState {
                    name: spec.name.into(),
                    pid: None,
                    absent: Some(format!("exited at start; see {}", log.display())),
                });
            }
            return Err(UpError::Daemon {
                node: node.into(),
                daemon: spec.name.into(),
                problem: "exited during start".into(),
                log: log.clone(),
                tail: tail(&log, 20),
            });
        }
        if started.elapsed() > timeout {
            let what = match spec.ready {
                Ready::Port(port) => format!(
                    "did not listen on {}:{} by the start deadline (15 s per phase)",
                    n.addr,
                    cfg.as_ref().map(port).unwrap_or(0)
                ),
                Ready::Mounted => {
                    "did not mount the super-root by the start deadline (15 s per phase)"
                        .to_string()
                }
                Ready::Started => "did not start".into(),
            };
            if !spec.required {
                tracing::warn!(node, daemon = spec.name, "{what}; continuing (optional)");
                return Ok(d);
            }
            return Err(UpError::Daemon {
                node: node.into(),
                daemon: spec.name.into(),
                problem: what,
                log: log.clone(),
                tail: tail(&log, 20),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
