//! [`Cluster`]: the harness as a Rust API for tests, benchmarks and the demo.
//!
//! ```no_run
//! let c = ferry_tests::Cluster::start(2);
//! c.sh_ok("ws1", "echo hi > /tmp/x");
//! assert_eq!(c.sh_ok("ws2", "cat /.../ws1/tmp/x"), "hi\n");
//! // dropped: the cluster goes down and its directory is removed
//! ```
//!
//! Commands run through the `cluster` binary (`cluster exec`), so a multi-threaded
//! test process never forks into a namespace itself.

use std::ffi::OsStr;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use common::config::NodeConfig;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::daemons;
use crate::down::{down, DownError, DownReport};
use crate::state::ClusterState;
use crate::up::{self, alive, log_path, tail, UpError, UpOptions};

/// Where [`Cluster::start`] puts its directories (not under /tmp, which nodes replace).
pub const TEST_ROOT: &str = "/var/tmp/ferry-clusters";

/// A running local cluster. Dropping it stops it (and removes its directory unless the
/// thread is panicking or `FERRY_KEEP=1`, so that a failed test's logs stay).
pub struct Cluster {
    state: ClusterState,
    remove_dir: bool,
    stopped: bool,
}

/// Options for [`Cluster::with`].
pub struct Builder {
    opts: UpOptions,
}

impl Builder {
    /// Changes every node's config before the daemons start.
    pub fn configure(mut self, f: impl Fn(&mut NodeConfig) + 'static) -> Builder {
        self.opts.configure = Some(Box::new(f));
        self
    }

    /// Uses `dir` (kept after the cluster goes down) instead of a fresh one.
    pub fn dir(mut self, dir: impl Into<PathBuf>) -> Builder {
        self.opts.dir = dir.into();
        self
    }

    /// Takes `cluster` and the daemons from `dir` instead of [`crate::up::find_bin_dir`].
    pub fn bin_dir(mut self, dir: impl Into<PathBuf>) -> Builder {
        self.opts.bin_dir = Some(dir.into());
        self
    }

    /// Starts the cluster.
    pub fn up(self) -> Result<Cluster, UpError> {
        // Clusters of test processes that died without taking them down go first
        // (once per process; live clusters of other processes are left alone).
        static SWEEP: std::sync::Once = std::sync::Once::new();
        SWEEP.call_once(|| {
            for (dir, r) in crate::down::down_stale() {
                match r {
                    Ok(_) => eprintln!("stopped a left-over cluster in {}", dir.display()),
                    Err(e) => eprintln!("cannot stop a left-over cluster: {e}"),
                }
            }
        });
        let remove_dir = self.opts.dir.starts_with(TEST_ROOT);
        let state = up::up(&self.opts)?;
        Ok(Cluster {
            state,
            remove_dir,
            stopped: false,
        })
    }

    /// Starts the cluster or panics with the reason (and the daemon log that says it).
    pub fn start(self) -> Cluster {
        self.up()
            .unwrap_or_else(|e| panic!("cluster up failed: {e}"))
    }
}

fn fresh_dir() -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    PathBuf::from(TEST_ROOT).join(format!("c{}-{n}", std::process::id()))
}

impl Cluster {
    /// A builder for an `n`-node cluster in a fresh directory under [`TEST_ROOT`].
    pub fn with(nodes: usize) -> Builder {
        Builder {
            opts: UpOptions::new(nodes, fresh_dir()),
        }
    }

    /// Starts an `n`-node cluster with default configs.
    pub fn up(nodes: usize) -> Result<Cluster, UpError> {
        Self::with(nodes).up()
    }

    /// Starts an `n`-node cluster or panics with the reason.
    pub fn start(nodes: usize) -> Cluster {
        Self::with(nodes).start()
    }

    /// The cluster directory.
    pub fn dir(&self) -> &Path {
        &self.state.dir
    }

    /// What `up` recorded.
    pub fn state(&self) -> &ClusterState {
        &self.state
    }

    /// Node names, `ws1` first.
    pub fn nodes(&self) -> Vec<String> {
        self.state.nodes.iter().map(|n| n.name.clone()).collect()
    }

    /// A node's address on the cluster bridge.
    pub fn addr(&self, node: &str) -> Ipv4Addr {
        self.node(node).addr
    }

    /// A node's config file.
    pub fn config_path(&self, node: &str) -> PathBuf {
        self.node(node).config.clone()
    }

    /// A node's config.
    pub fn config(&self, node: &str) -> NodeConfig {
        NodeConfig::load(&self.config_path(node)).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Host pid of a node's pid 1.
    pub fn holder(&self, node: &str) -> i32 {
        self.node(node).holder
    }

    fn node(&self, node: &str) -> &crate::state::NodeState {
        self.state.node(node).unwrap_or_else(|e| panic!("{e}"))
    }

    /// The `cluster exec` command for `args` on `node`, to adjust before running.
    pub fn command<S: AsRef<OsStr>>(&self, node: &str, args: &[S]) -> Command {
        let mut cmd = Command::new(self.state.bin_dir.join("cluster"));
        cmd.arg("exec")
            .arg("--dir")
            .arg(&self.state.dir)
            .arg(node)
            .arg("--");
        cmd.args(args);
        cmd
    }

    /// Runs a command in a node and collects its output (stdin is empty).
    pub fn exec<S: AsRef<OsStr>>(&self, node: &str, args: &[S]) -> Output {
        self.command(node, args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run `cluster exec` on {node}: {e}"))
    }

    /// Runs `sh -c script` in a node.
    pub fn sh(&self, node: &str, script: &str) -> Output {
        self.exec(node, &["sh", "-c", script])
    }

    /// Runs a command in a node; panics unless it exits 0, with its output and the
    /// tails of the node's daemon logs. Returns its stdout.
    pub fn run_ok<S: AsRef<OsStr>>(&self, node: &str, args: &[S]) -> String {
        let out = self.exec(node, args);
        let shown: Vec<String> = args
            .iter()
            .map(|a| a.as_ref().to_string_lossy().into_owned())
            .collect();
        self.expect_success(node, &shown.join(" "), &out);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `sh -c script` in a node; panics unless it exits 0 (see [`Cluster::run_ok`]).
    pub fn sh_ok(&self, node: &str, script: &str) -> String {
        let out = self.sh(node, script);
        self.expect_success(node, script, &out);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Panics with a full report unless `out` is a success.
    pub fn expect_success(&self, node: &str, what: &str, out: &Output) {
        if !out.status.success() {
            panic!(
                "on {node}: `{what}` failed with {}\n--- stdout:\n{}\n--- stderr:\n{}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                self.logs(node, 15)
            );
        }
    }

    /// Starts a command in a node without waiting (stdio inherited unless changed).
    /// Killing the returned child with SIGTERM or SIGINT passes the signal on.
    pub fn spawn<S: AsRef<OsStr>>(&self, node: &str, args: &[S]) -> Child {
        self.command(node, args)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run `cluster exec` on {node}: {e}"))
    }

    /// Host pid of a running daemon.
    pub fn daemon_pid(&self, node: &str, daemon: &str) -> Option<i32> {
        self.node(node)
            .daemon(daemon)
            .and_then(|d| d.pid)
            .filter(|p| alive(*p))
    }

    /// Whether a daemon runs on a node (false for stubs that said "not implemented yet").
    pub fn has_daemon(&self, node: &str, daemon: &str) -> bool {
        let stub = self
            .node(node)
            .daemon(daemon)
            .is_some_and(|d| d.absent.is_some());
        !stub && self.daemon_pid(node, daemon).is_some()
    }

    /// Panics, naming what is missing, unless every node runs every daemon in `names`.
    pub fn require(&self, names: &[&str]) {
        for n in &self.state.nodes {
            for d in names {
                if !self.has_daemon(&n.name, d) {
                    let why = n
                        .daemon(d)
                        .and_then(|s| s.absent.clone())
                        .unwrap_or_else(|| "not running".into());
                    panic!(
                        "{d} is not running on {} ({why}); this test needs it\n{}",
                        n.name,
                        self.logs(&n.name, 10)
                    );
                }
            }
        }
    }

    /// Sends `signal` to a daemon; with SIGKILL or SIGTERM, waits until it is gone.
    pub fn kill_daemon(&mut self, node: &str, daemon: &str, signal: Signal) {
        let Some(pid) = self.daemon_pid(node, daemon) else {
            panic!("{daemon} is not running on {node}");
        };
        kill(Pid::from_raw(pid), signal)
            .unwrap_or_else(|e| panic!("cannot signal {daemon} (pid {pid}) on {node}: {e}"));
        if matches!(signal, Signal::SIGKILL | Signal::SIGTERM) {
            for _ in 0..1000 {
                if !alive(pid) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            if alive(pid) {
                // Where it hangs, for whoever reads the failure.
                let proc = |f: &str| {
                    std::fs::read_to_string(format!("/proc/{pid}/{f}")).unwrap_or_default()
                };
                let state = proc("status")
                    .lines()
                    .find(|l| l.starts_with("State:"))
                    .unwrap_or("State: ?")
                    .to_string();
                panic!(
                    "{daemon} (pid {pid}) on {node} survives {signal}: {state}, wchan {}",
                    proc("wchan")
                );
            }
        }
    }

    /// Starts a daemon again (after [`Cluster::kill_daemon`], or to replace a running
    /// one, which is killed first) and waits until it is ready.
    pub fn restart_daemon(&mut self, node: &str, daemon: &str) {
        self.restart_daemon_with_env(node, daemon, &[]);
    }

    /// [`Cluster::restart_daemon`] with extra environment variables for it (e.g.
    /// `FERRY_FAULT`, a crash point of a fault test).
    pub fn restart_daemon_with_env(&mut self, node: &str, daemon: &str, env: &[(&str, &str)]) {
        if self.has_daemon(node, daemon) {
            self.kill_daemon(node, daemon, Signal::SIGKILL);
        }
        let spec = daemons::spec(daemon).unwrap_or_else(|| panic!("no daemon named {daemon}"));
        let started = up::start_daemon_with_env(&self.state, node, spec, env)
            .unwrap_or_else(|e| panic!("restarting {daemon} on {node}: {e}"));
        let n = self.state.node_mut(node).unwrap_or_else(|e| panic!("{e}"));
        match n.daemons.iter_mut().find(|d| d.name == daemon) {
            Some(d) => *d = started,
            None => n.daemons.push(started),
        }
        let ready = up::wait_ready(&self.state, node, spec, Duration::from_secs(15))
            .unwrap_or_else(|e| panic!("restarting {daemon} on {node}: {e}"));
        let n = self.state.node_mut(node).unwrap_or_else(|e| panic!("{e}"));
        if let Some(d) = n.daemons.iter_mut().find(|d| d.name == daemon) {
            *d = ready;
        }
        self.state
            .save()
            .unwrap_or_else(|e| panic!("restarting {daemon} on {node}: {e}"));
    }

    /// A daemon's log file.
    pub fn log_path(&self, node: &str, daemon: &str) -> PathBuf {
        log_path(&self.state.dir, node, daemon)
    }

    /// The last `lines` lines of a daemon's log.
    pub fn log_tail(&self, node: &str, daemon: &str, lines: usize) -> String {
        tail(&self.log_path(node, daemon), lines)
    }

    /// The tails of every daemon log of a node, headed by file name, for failure messages.
    pub fn logs(&self, node: &str, lines: usize) -> String {
        let mut s = String::new();
        for d in daemons::DAEMONS {
            let p = self.log_path(node, d.name);
            if p.exists() {
                s.push_str(&format!("--- {} (last {lines} lines):\n", p.display()));
                s.push_str(&tail(&p, lines));
                s.push('\n');
            }
        }
        s
    }

    /// Stops the cluster now and says what was stopped.
    pub fn down(mut self) -> Result<DownReport, DownError> {
        self.stopped = true;
        let r = down(&self.state.dir);
        if std::env::var_os("FERRY_KEEP").is_some() {
            eprintln!("cluster directory kept: {}", self.state.dir.display());
        } else if r.is_ok() && self.remove_dir {
            let _ = std::fs::remove_dir_all(&self.state.dir);
        }
        r
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.stopped {
            return;
        }
        let r = down(&self.state.dir);
        if let Err(e) = &r {
            eprintln!("cluster down failed: {e}");
        }
        let keep = std::thread::panicking() || std::env::var_os("FERRY_KEEP").is_some();
        if keep {
            eprintln!("cluster directory kept: {}", self.state.dir.display());
        } else if r.is_ok() && self.remove_dir {
            let _ = std::fs::remove_dir_all(&self.state.dir);
        }
    }
}
