//! Running commands in a node the way the migration tests, the demo and the
//! benchmarks need them: started by a shell that waits for them (so they have a
//! parent at home), with stdio that a migration can carry, and polled without timing
//! assertions (every wait here is a bound for a hang, not a measurement).

use crate::Cluster;
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::Duration;

/// Polls `f` every 100 ms until it answers, for at most a minute.
pub fn wait_for<T>(f: impl FnMut() -> Option<T>) -> Option<T> {
    wait_up_to(Duration::from_secs(60), f)
}

/// Polls `f` every 100 ms until it answers, for at most `limit`.
pub fn wait_up_to<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    for _ in 0..limit.as_millis().div_ceil(100) {
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

/// A field of /proc/PID/status in `node`, as a number (kB for Vm* fields); panics
/// if there is no such field (the process is gone).
pub fn status_num(c: &Cluster, node: &str, pid: i32, field: &str) -> u64 {
    let o = c.sh_ok(node, &format!("grep '^{field}:' /proc/{pid}/status"));
    o.split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {field} for pid {pid} on {node}: {o:?}"))
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

/// `busy OUT MIB`: fills MIB MiB with a pattern, writes `ready` to OUT, then rewrites
/// 10% of its memory per second (0.1% every 10 ms, walking through the buffer, each
/// pass with a new generation number). On SIGUSR1 it reads every page once and
/// writes `scan <ms> <sum>`; on SIGTERM it checks every word of the buffer against
/// what it wrote and writes `ok` (exit 0) or `BAD <offset>` (exit 1). A page that
/// came back as zeros or stale after a migration fails the check.
pub const BUSY_C: &str = r#"
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
static volatile sig_atomic_t want_scan, want_end;
static void on_usr1(int s) { (void)s; want_scan = 1; }
static void on_term(int s) { (void)s; want_end = 1; }
static double now_ms(void) {
    struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}
int main(int argc, char **argv) {
    if (argc < 3) return 2;
    FILE *f = fopen(argv[1], "w");
    if (!f) return 3;
    size_t len = (size_t)atol(argv[2]) << 20, words = len / 8;
    uint64_t *m = malloc(len);
    if (!m) return 4;
    uint64_t gen = 1;
    for (size_t i = 0; i < words; i++) m[i] = i * 0x9E3779B97F4A7C15ull + gen;
    signal(SIGUSR1, on_usr1);
    signal(SIGTERM, on_term);
    fprintf(f, "ready\n"); fflush(f);
    size_t step = words / 1000, pos = 0;
    if (step == 0) step = 1;
    while (!want_end) {
        for (size_t k = 0; k < step; k++, pos++) {
            if (pos == words) { pos = 0; gen++; }
            m[pos] = pos * 0x9E3779B97F4A7C15ull + gen;
        }
        if (want_scan) {
            want_scan = 0;
            double t = now_ms();
            uint64_t sum = 0;
            for (size_t i = 0; i < words; i += 512) sum += m[i];
            fprintf(f, "scan %.3f %llu\n", now_ms() - t, (unsigned long long)sum); fflush(f);
            fsync(fileno(f)); /* visible at home now, whatever node writes it */
        }
        usleep(10000);
    }
    for (size_t i = 0; i < words; i++) {
        uint64_t g = (i < pos || gen == 1) ? gen : gen - 1;
        if (m[i] != i * 0x9E3779B97F4A7C15ull + g) { fprintf(f, "BAD %zu\n", i * 8); fflush(f); return 1; }
    }
    fprintf(f, "ok\n"); fflush(f);
    return 0;
}
"#;

/// Compiles C source with `cc -O2` into `out` (on this side; run it in a node by the
/// same path if it lies outside /tmp).
pub fn compile_c(src: &str, out: &std::path::Path, flags: &[&str]) {
    let c_file = out.with_extension("c");
    std::fs::write(&c_file, src).expect("write C source");
    let o = std::process::Command::new("cc")
        .arg("-O2")
        .args(flags)
        .arg("-o")
        .arg(out)
        .arg(&c_file)
        .output()
        .expect("cc runs");
    assert!(
        o.status.success(),
        "cc failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A running cluster and a test program compiled for it ([`cluster_with_program`]).
pub struct ClusterWithProgram {
    pub c: Cluster,
    /// The program, by a path the nodes see too (the cluster directory is not under
    /// /tmp).
    pub prog: PathBuf,
}

/// Starts a `nodes`-node cluster with all four daemons and compiles the C source
/// `src` into `DIR/NAME` (the source beside it as `NAME.c`) with [`compile_c`]:
/// `cc -O2 FLAGS`, where a `-O` level in `flags` replaces the -O2 (cc takes the last).
pub fn cluster_with_program(
    nodes: usize,
    name: &str,
    src: &str,
    flags: &[&str],
) -> ClusterWithProgram {
    cluster_with_program_configured(nodes, name, src, flags, |_| {})
}

/// [`cluster_with_program`] with every node's config changed by `configure` first.
pub fn cluster_with_program_configured(
    nodes: usize,
    name: &str,
    src: &str,
    flags: &[&str],
    configure: impl Fn(&mut common::config::NodeConfig) + 'static,
) -> ClusterWithProgram {
    let c = Cluster::with(nodes).configure(configure).start();
    c.require(&["fs-server", "fuse-client", "migd", "home-proxy"]);
    let prog = c.dir().join(name);
    compile_c(src, &prog, flags);
    ClusterWithProgram { c, prog }
}

/// `count.py OUT N PAUSE` (tests/programs/count.py): N lines, PAUSE s apart, exit 4.
pub const COUNT_PY: &str = include_str!("../programs/count.py");

/// Writes count.py into the cluster directory, runs it once unmigrated at ws1 for its
/// reference output, then starts it under a shell at ws1 writing `lines` lines 0.1 s
/// apart to /tmp/out; returns (reference, shell, python3's pid at ws1) once it wrote 5.
pub fn start_count_py(c: &Cluster, lines: u32) -> (String, Child, i32) {
    let script = c.dir().join("count.py");
    std::fs::write(&script, COUNT_PY).expect("write count.py");
    let want = c.sh_ok(
        "ws1",
        &format!(
            "python3 {} /tmp/ref {lines} 0; cat /tmp/ref",
            script.display()
        ),
    );
    let child = spawn_shell(
        c,
        "ws1",
        &format!("python3 {} /tmp/out {lines} 0.1", script.display()),
    );
    let pid: i32 = wait_for(|| {
        let o = c.sh("ws1", "pgrep -xn python3 && test $(wc -l < /tmp/out) -ge 5");
        let t = String::from_utf8_lossy(&o.stdout).trim().to_string();
        (o.status.success() && !t.is_empty()).then(|| t.parse().unwrap())
    })
    .expect("python3 did not start at ws1");
    (want, child, pid)
}

/// Runs `args` at `node` while `daemon` at `dying` (restarted before with a
/// `FERRY_FAULT` crash point) dies inside it: waits until it has died, restarts it
/// half a second later, waits for the command, and returns whether it succeeded
/// and what it printed (stdout, then stderr).
pub fn run_through_a_crash(
    c: &mut Cluster,
    node: &str,
    args: &[&str],
    dying: &str,
    daemon: &str,
) -> (bool, String) {
    let pid = c
        .daemon_pid(dying, daemon)
        .unwrap_or_else(|| panic!("no {daemon} runs at {dying}"));
    let cmd = c
        .command(node, args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cluster exec runs");
    wait_for(|| (!crate::up::alive(pid)).then_some(()))
        .unwrap_or_else(|| panic!("{daemon} at {dying} did not die at the fault point"));
    std::thread::sleep(Duration::from_millis(500));
    c.restart_daemon(dying, daemon);
    let out = cmd.wait_with_output().expect("the command ends");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{node}$ {}: {said}", args.join(" "));
    (out.status.success(), said)
}

/// Waits until `pid` at `node` is a frozen shadow (ptrace-stopped: "tracing stop");
/// panics with its state and `context` if it does not become one.
pub fn wait_until_shadow(c: &Cluster, node: &str, pid: i32, context: &str) {
    wait_for(|| {
        state_on(c, node, pid)
            .contains("tracing stop")
            .then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "pid {pid} at {node} should be the frozen shadow: {:?}\n{context}",
            state_on(c, node, pid)
        )
    });
}
