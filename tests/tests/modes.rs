//! Each migration mode on a 1 GiB process, and the faults of the migration issue:
//! daemons killed (-9) at the worst moments. The program (`BUSY_C`) keeps rewriting
//! 10% of its memory per second and, when told to end, checks every word it wrote:
//! a page lost, zeroed or stale anywhere fails the run. Needs root and the
//! workspace's binaries built (`cargo build --release --workspace`).

use ferry_tests::work::{
    compile_c, finish_shell, images_left, pids_of, spawn_shell, state_on, wait_for, BUSY_C,
};
use ferry_tests::{Builder, Cluster, Signal};
use std::process::Child;
use std::sync::Mutex;
use std::time::Duration;

/// One cluster at a time: 1 GiB processes on a small machine.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

struct Busy {
    child: Child,
    pid: i32,
}

fn compile(c: &Cluster) -> String {
    let bin = c.dir().join("busy");
    compile_c(BUSY_C, &bin, &[]);
    bin.display().to_string()
}

/// Starts `busy /tmp/busy.out MIB` at ws1 under a shell and waits until it is ready.
fn start_busy(c: &Cluster, mib: u64) -> Busy {
    let bin = compile(c);
    // A previous program's "ready" must not pass for this one's.
    c.sh_ok("ws1", "rm -f /tmp/busy.out");
    let child = spawn_shell(c, "ws1", &format!("{bin} /tmp/busy.out {mib}"));
    let pid = wait_for(|| {
        let o = c.sh("ws1", "grep -q ready /tmp/busy.out && pgrep -xn busy");
        String::from_utf8_lossy(&o.stdout).trim().parse().ok()
    })
    .unwrap_or_else(|| panic!("busy did not start at ws1\n{}", c.logs("ws1", 10)));
    // Let it rewrite some memory first, so that pre-copy has a dirty set to chase.
    std::thread::sleep(Duration::from_millis(1500));
    Busy { child, pid }
}

/// Starts the cluster `b` describes, with all four daemons.
fn start_cluster(b: Builder) -> Cluster {
    let c = b.start();
    c.require(&["fs-server", "fuse-client", "migd", "home-proxy"]);
    c
}

/// Starts busy (MIB MiB) at ws1 ([`start_busy`]) and moves it with `migrate PID ws2
/// ARGS` at ws1, which must succeed; returns busy and what migrate said.
fn start_and_move(c: &Cluster, mib: u64, args: &[&str]) -> (Busy, String) {
    let b = start_busy(c, mib);
    let pid = b.pid.to_string();
    let mut all = vec!["migrate", pid.as_str(), "ws2"];
    all.extend_from_slice(args);
    let said = c.run_ok("ws1", &all);
    (b, said)
}

/// Ends busy (SIGTERM at home) and checks that every word of its memory is right
/// and that the shell at home saw it exit 0.
fn end_and_check(c: &Cluster, b: Busy, what: &str) {
    c.sh_ok("ws1", &format!("kill -TERM {}", b.pid));
    let shell = finish_shell(c, b.child);
    let last = c.sh_ok("ws1", "tail -n1 /tmp/busy.out");
    assert_eq!(
        last.trim(),
        "ok",
        "{what}: the program's memory check failed (a page came back wrong)"
    );
    assert_eq!(shell, "status=0", "{what}: the shell at ws1 saw {shell}");
    for n in ["ws2", "ws3"] {
        if c.nodes().iter().any(|x| x == n) {
            assert!(pids_of(c, n, "busy").is_empty(), "{what}: busy left at {n}");
        }
    }
}

/// Running copies of busy: (node, pid) for every copy not stopped under ptrace.
/// A shadow runs briefly while its keeper releases its memory, so callers wait
/// for the answer they expect ([`settles_to`]).
fn running_copies(c: &Cluster) -> Vec<(String, i32)> {
    let mut v = Vec::new();
    for n in c.nodes() {
        for p in pids_of(c, &n, "busy") {
            if !state_on(c, &n, p).contains("tracing stop") {
                v.push((n.clone(), p));
            }
        }
    }
    v
}

/// Waits (bounded) until the running copies are `want`; panics with what it saw.
fn settles_to(c: &Cluster, want: &[(&str, i32)], what: &str) {
    let want: Vec<(String, i32)> = want.iter().map(|(n, p)| (n.to_string(), *p)).collect();
    if wait_for(|| (running_copies(c) == want).then_some(())).is_none() {
        panic!(
            "{what}: running copies {:?}, want {want:?}",
            running_copies(c)
        );
    }
}

/// Checks that there is one busy at ws2 and waits (bounded) until it is the one
/// running copy ([`settles_to`]); `what` says when, for the panic.
fn settles_at_ws2(c: &Cluster, what: &str) {
    let there = pids_of(c, "ws2", "busy");
    assert_eq!(there.len(), 1, "{what}: one busy at ws2: {there:?}");
    settles_to(c, &[("ws2", there[0])], what);
}

fn one_mode(mode: &str) {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let c = start_cluster(Cluster::with(2));
    let args: &[&str] = if mode == "default" {
        &[]
    } else {
        &["--mode", mode]
    };
    let (b, said) = start_and_move(&c, 1024, args);
    assert!(said.contains("runs on ws2"), "migrate said {said}");
    settles_at_ws2(&c, "exactly one running copy, at ws2");
    wait_for(|| images_left(&c).is_empty().then_some(()))
        .expect("the store still holds the image a minute after the move");
    end_and_check(&c, b, mode);
}

#[test]
fn stop_copy_moves_a_1_gib_process_intact() {
    one_mode("stop-copy");
}

#[test]
fn precopy_moves_a_1_gib_process_that_keeps_writing_intact() {
    one_mode("precopy");
}

#[test]
fn lazy_moves_a_1_gib_process_intact() {
    one_mode("lazy");
}

#[test]
fn the_default_mode_precopy_then_lazy_moves_a_1_gib_process_intact() {
    one_mode("default");
}

/// Starts `migrate PID ws2 ARGS` at ws1 in the background.
fn migrate_in_background(c: &Cluster, pid: i32, args: &[&str]) -> Child {
    let mut all = vec!["migrate".to_string(), pid.to_string(), "ws2".into()];
    all.extend(args.iter().map(|s| s.to_string()));
    c.command("ws1", &all)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("migrate starts")
}

/// The size of the image's pages.img in the store (0 if none yet).
fn pages_written(c: &Cluster) -> u64 {
    std::fs::read_dir(c.dir().join("store/migrations"))
        .map(|r| {
            r.flatten()
                .filter_map(|e| std::fs::metadata(e.path().join("pages.img")).ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

#[test]
fn killing_the_stores_fs_server_during_precopy_leaves_exactly_one_copy() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut c = start_cluster(Cluster::with(2));
    let b = start_busy(&c, 1024);
    let m = migrate_in_background(&c, b.pid, &["--mode", "precopy"]);
    wait_for(|| (pages_written(&c) > 64 << 20).then_some(()))
        .expect("pre-copy did not start writing pages");
    c.kill_daemon("ws1", "fs-server", Signal::SIGKILL);
    std::thread::sleep(Duration::from_secs(1));
    c.restart_daemon("ws1", "fs-server");
    let out = m.wait_with_output().expect("migrate ends");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        settles_at_ws2(&c, &said);
    } else {
        settles_to(&c, &[("ws1", b.pid)], &said);
        assert!(
            said.contains("runs on"),
            "a failure must say where it runs: {said}"
        );
    }
    end_and_check(&c, b, "fs-server killed during pre-copy");
}

#[test]
fn killing_the_sources_migd_after_the_migration_changes_nothing() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut c = start_cluster(Cluster::with(2));
    let (b, _) = start_and_move(&c, 256, &[]);
    wait_for(|| images_left(&c).is_empty().then_some(())).expect("the store still holds the image");
    c.kill_daemon("ws1", "migd", Signal::SIGKILL);
    std::thread::sleep(Duration::from_secs(1));
    settles_at_ws2(&c, "after the source's migd was killed");
    c.restart_daemon("ws1", "migd");
    end_and_check(&c, b, "source migd killed after the move");
}

/// Lazy fault-in with the store or the destination's migd killed while pages are
/// still coming in: nothing may come back zero or stale; the process waits and
/// goes on once the daemon is back. Prefetch is slowed (config) so that the kill
/// lands while most pages are still in the store.
fn lazy_with_a_kill(node: &str, daemon: &str) {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut c =
        start_cluster(Cluster::with(2).configure(|cfg| cfg.migd.lazy_prefetch_mib_per_sec = 128));
    let (b, _) = start_and_move(&c, 1024, &["--mode", "lazy"]);
    assert!(
        !images_left(&c).is_empty(),
        "the image should still be in the store while pages come in"
    );
    c.kill_daemon(node, daemon, Signal::SIGKILL);
    std::thread::sleep(Duration::from_secs(2));
    c.restart_daemon(node, daemon);
    wait_for(|| images_left(&c).is_empty().then_some(()))
        .or_else(|| wait_for(|| images_left(&c).is_empty().then_some(())))
        .expect("fault-in did not finish after the daemon came back");
    settles_at_ws2(&c, "after the kill");
    end_and_check(
        &c,
        b,
        &format!("{daemon} at {node} killed during lazy fault-in"),
    );
}

#[test]
fn lazy_pages_never_lie_when_the_destinations_migd_is_killed() {
    lazy_with_a_kill("ws2", "migd");
}

#[test]
fn lazy_pages_never_lie_when_the_stores_fs_server_is_killed() {
    lazy_with_a_kill("ws1", "fs-server");
}

#[test]
fn a_store_away_past_the_bound_kills_the_process_and_says_so() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut c = start_cluster(Cluster::with(2).configure(|cfg| {
        cfg.migd.lazy_prefetch_mib_per_sec = 128;
        cfg.migd.lazy_store_bound_secs = 3;
        cfg.fuse.reconnect_timeout_secs = 2;
    }));
    let (b, _) = start_and_move(&c, 1024, &["--mode", "lazy"]);
    c.kill_daemon("ws1", "fs-server", Signal::SIGKILL);
    let shell = finish_shell(&c, b.child);
    assert_eq!(
        shell, "status=137",
        "the shell at home should see the process killed (SIGKILL)"
    );
    settles_to(&c, &[], "no copy may run on after the loss");
    let log = std::fs::read_to_string(c.log_path("ws2", "migd")).unwrap_or_default();
    assert!(
        log.contains("lost"),
        "ws2's migd log should report the loss:\n{}",
        c.log_tail("ws2", "migd", 20)
    );
    c.restart_daemon("ws1", "fs-server");
}
