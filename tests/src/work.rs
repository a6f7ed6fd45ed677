//! Running commands in a node the way the migration tests, the demo and the
//! benchmarks need them: started by a shell that waits for them (so they have a
//! parent at home), with stdio that a migration can carry, and polled without timing
//! assertions (every wait here is a bound for a hang, not a measurement).

use crate::Cluster;
use std::ffi::OsString;
use std::process::{Child, Stdio};
use std::time::Duration;

/// Polls `f` every 100 ms until it answers, for at most a minute.
pub fn wait_for<T>(mut f: impl FnMut() -> Option<T>) -> Option<T> {
    for _ in 0..600 {
        if let Some(v) = f() {
            return Some(v);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

/// Starts `bash -c 'COMMAND; echo status=$?'` in `node`, its stdout piped to us. The
/// command's stderr goes to the node's /tmp/cmd.err (our own stderr is not in the
/// node's tree) and fds the shell inherited beyond stdio are closed, so that only
/// what the command opens itself and its stdio have to move with it.
pub fn spawn_shell(c: &Cluster, node: &str, command: &str) -> Child {
    let script = format!(
        "exec 2>/tmp/cmd.err; for f in /proc/$$/fd/*; do n=${{f##*/}}; \
         [ \"$n\" -gt 2 ] && eval \"exec $n>&-\"; done; {command}; echo status=$?"
    );
    c.command(node, &["bash", "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("cluster exec runs")
}

/// Waits (at most two minutes) for a shell from [`spawn_shell`] and returns its
/// output, trimmed; panics with the nodes' logs if it does not end.
pub fn finish_shell(c: &Cluster, mut child: Child) -> String {
    let ended = wait_for(|| child.try_wait().ok().flatten())
        .or_else(|| wait_for(|| child.try_wait().ok().flatten()));
    if ended.is_none() {
        let _ = child.kill();
        let _ = child.wait();
        let logs: Vec<String> = c.nodes().iter().map(|n| c.logs(n, 10)).collect();
        panic!("the shell did not end\n{}", logs.join("\n"));
    }
    let out = child.wait_with_output().expect("wait for the shell");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The newest process named exactly `comm` in `node` (as the node sees its pid).
pub fn newest_pid(c: &Cluster, node: &str, comm: &str) -> Option<i32> {
    let o = c.sh(node, &format!("pgrep -xn {comm}"));
    String::from_utf8_lossy(&o.stdout).trim().parse().ok()
}

/// The pids of the processes named exactly `comm` in `node`.
pub fn pids_of(c: &Cluster, node: &str, comm: &str) -> Vec<i32> {
    let o = c.sh(node, &format!("pgrep -x {comm} || true"));
    String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// The `State:` line of /proc/PID/status in `node` ("" if there is no such process).
pub fn state_on(c: &Cluster, node: &str, pid: i32) -> String {
    let o = c.sh(node, &format!("grep '^State:' /proc/{pid}/status || true"));
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// Runs `migrate PID DEST [ARGS..]` in `node`; panics with what it said if it fails.
pub fn migrate_ok(c: &Cluster, node: &str, pid: i32, dest: &str, args: &[&str]) -> String {
    let pid = pid.to_string();
    let mut all = vec!["migrate", pid.as_str(), dest];
    all.extend_from_slice(args);
    c.run_ok(node, &all)
}

/// Migration images still in the store (there should be none once migrations end).
pub fn images_left(c: &Cluster) -> Vec<OsString> {
    std::fs::read_dir(c.dir().join("store/migrations"))
        .map(|r| r.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default()
}
