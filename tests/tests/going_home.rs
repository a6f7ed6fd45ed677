//! Going home: `migrate PID home` restores a migrated process into its shadow at home,
//! so that it runs there again under its original pid and parent. On the 3-node local
//! cluster (ws1 is home). Needs root and the workspace's release binaries.

use std::process::Child;
use std::sync::Mutex;

use ferry_tests::work::{
    cluster_with_program, finish_shell, pids_of, spawn_shell, start_count_py, state_on, status_num,
    wait_for, ClusterWithProgram as Setup,
};
use ferry_tests::Cluster;

/// One 3-node cluster at a time: they are heavy for a small machine.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// `homer OUT N CODE USLEEP MIB [THREADS]`: fills MIB MiB with a pattern, starts
/// THREADS threads that keep checking their own tid, writes N lines to OUT (each a
/// function of its index only; a SIGUSR1 adds a line `usr1`), sleeping USLEEP µs
/// between lines, then checks that its memory still holds the pattern (exit 99 if not)
/// and that no thread saw its tid change (exit 98), and exits with CODE.
const PROG: &str = r#"
#include <pthread.h>
#include <sys/syscall.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
static volatile sig_atomic_t usr1;
static void on_usr1(int s) { (void)s; usr1 = 1; }
static volatile int stop, bad;
static void *worker(void *a) {
    (void)a;
    long tid = syscall(SYS_gettid);
    while (!stop) { usleep(2000); if (syscall(SYS_gettid) != tid) bad = 1; }
    return 0;
}
int main(int argc, char **argv) {
    signal(SIGUSR1, on_usr1);
    FILE *f = fopen(argv[1], "w");
    if (!f) { perror(argv[1]); return 100; }
    int n = atoi(argv[2]), code = atoi(argv[3]), pause = atoi(argv[4]);
    size_t len = (size_t)atoi(argv[5]) << 20;
    unsigned char *m = malloc(len);
    for (size_t i = 0; i < len; i++) m[i] = (unsigned char)(i * 7 + 3);
    int nt = argc > 6 ? atoi(argv[6]) : 0;
    pthread_t th[8];
    for (int t = 0; t < nt && t < 8; t++) pthread_create(&th[t], 0, worker, 0);
    unsigned long x = 1;
    for (int i = 0; i < n; i++) {
        for (int k = 0; k < 20000; k++) x = x * 6364136223846793005UL + 1442695040888963407UL;
        fprintf(f, "%d %lu\n", i, x);
        if (usr1) { usr1 = 0; fprintf(f, "usr1\n"); }
        fflush(f);
        if (pause) usleep(pause);
    }
    stop = 1;
    for (int t = 0; t < nt && t < 8; t++) pthread_join(th[t], 0);
    for (size_t i = 0; i < len; i++)
        if (m[i] != (unsigned char)(i * 7 + 3)) { fprintf(f, "memory differs at %zu\n", i); return 99; }
    if (bad) { fprintf(f, "a thread's tid changed\n"); return 98; }
    fclose(f);
    return code;
}
"#;

const MIB: u32 = 48;

/// A 3-node cluster with PROG compiled as DIR/homer (at -O1, as it always was).
fn setup() -> Setup {
    cluster_with_program(3, "homer", PROG, &["-O1", "-pthread"])
}

/// Starts homer at ws1 (from `bash -c`, in `cwd`) and returns the shell and homer's
/// pid, once homer has written `lines` lines to /tmp/out.
fn start_homer(s: &Setup, n: u32, code: i32, lines: usize, cwd: &str) -> (Child, i32) {
    start_homer_threads(s, n, code, lines, cwd, 0)
}

/// [`start_homer`] with `threads` more threads.
fn start_homer_threads(
    s: &Setup,
    n: u32,
    code: i32,
    lines: usize,
    cwd: &str,
    threads: u32,
) -> (Child, i32) {
    let child = spawn_shell(
        &s.c,
        "ws1",
        &format!(
            "cd {cwd} && {} /tmp/out {n} {code} 100000 {MIB} {threads}",
            s.prog.display()
        ),
    );
    let pid = wait_for(|| {
        let o = s.c.sh(
            "ws1",
            &format!("pgrep -xn homer && test $(wc -l < /tmp/out) -ge {lines}"),
        );
        let t = String::from_utf8_lossy(&o.stdout).trim().to_string();
        (o.status.success() && !t.is_empty()).then(|| t.parse::<i32>().unwrap())
    })
    .unwrap_or_else(|| panic!("homer did not start at ws1\n{}", s.c.logs("ws1", 10)));
    (child, pid)
}

/// What an unmigrated run writes.
fn reference(s: &Setup, n: u32) -> String {
    s.c.sh_ok(
        "ws1",
        &format!(
            "{} /tmp/ref {n} 0 0 {MIB} && cat /tmp/ref",
            s.prog.display()
        ),
    )
}

/// `migrate --mode stop-copy PID DEST` at `node` (the mode named: going home needs a
/// complete image, whatever the default mode).
fn migrate_at(c: &Cluster, node: &str, pid: i32, dest: &str) -> String {
    let said = c.run_ok(
        node,
        &["migrate", "--mode", "stop-copy", &pid.to_string(), dest],
    );
    eprintln!("{node}$ migrate {pid} {dest}: {said}");
    said
}

/// Nothing is listed as migrated or foreign anywhere, and the store holds no image.
fn nothing_left(c: &Cluster) {
    for node in ["ws1", "ws2", "ws3"] {
        let list = c.run_ok(node, &["migrate", "--list"]);
        assert_eq!(
            list.matches("(none)").count(),
            2,
            "migrate --list at {node} still lists something:\n{list}"
        );
    }
    let store = c.dir().join("store/migrations");
    let left: Vec<_> = std::fs::read_dir(&store)
        .map(|r| r.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "images left in the store: {left:?}");
}

/// ws1 -> ws2 -> ws3 -> home, the last step asked at `asked_at` (ws1 with the shadow's
/// pid, or ws3 with the pid there).
fn there_and_back(asked_at: &str) {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let s = setup();
    let c = &s.c;
    let n = 400;
    let code = 6;
    let want = reference(&s, n);
    let (child, pid) = start_homer(&s, n, code, 5, "/");
    let ppid = status_num(c, "ws1", pid, "PPid");
    let shell_pid = c
        .sh_ok("ws1", &format!("ps -o ppid= -p {pid}"))
        .trim()
        .to_string();

    migrate_at(c, "ws1", pid, "ws2");
    let said = migrate_at(c, "ws1", pid, "ws3");
    assert!(said.contains("runs on ws3"), "migrate said: {said}");
    let away = status_num(c, "ws1", pid, "VmRSS");
    assert!(
        away < 4 * 1024,
        "the shadow should hold almost no memory while away: VmRSS {away} kB"
    );
    let host_pid = pids_of(c, "ws3", "homer");
    assert_eq!(host_pid.len(), 1, "homer should run at ws3");

    let said = if asked_at == "ws1" {
        migrate_at(c, "ws1", pid, "home")
    } else {
        migrate_at(c, "ws3", host_pid[0], "home")
    };
    assert!(
        said.contains(&format!("runs on ws1 (pid {pid} there)")),
        "migrate should say it runs at home under its pid {pid}: {said}"
    );
    assert!(
        pids_of(c, "ws3", "homer").is_empty() && pids_of(c, "ws2", "homer").is_empty(),
        "a copy of homer still runs away from home"
    );
    runs_at_home_again(c, pid);
    assert_eq!(
        status_num(c, "ws1", pid, "PPid"),
        ppid,
        "pid {pid} came home under another parent"
    );
    assert_eq!(
        c.sh_ok("ws1", &format!("ps -o ppid= -p {pid}")).trim(),
        shell_pid,
        "the shell is not the parent of pid {pid} any more"
    );
    let back = status_num(c, "ws1", pid, "VmRSS");
    assert!(
        back > (MIB as u64 - 4) * 1024,
        "homer's memory should be back at home: VmRSS {back} kB (was {away} kB as a shadow)"
    );
    nothing_left(c);

    let shell = finish_shell(c, child);
    assert_eq!(
        shell,
        format!("status={code}"),
        "the shell should see homer's own exit status (99: its memory differed)"
    );
    let got = c.sh_ok("ws1", "cat /tmp/out");
    assert!(
        got == want,
        "output at ws1 differs from an unmigrated run ({} vs {} bytes)",
        got.len(),
        want.len()
    );
    nothing_left(c);
}

#[test]
fn a_process_brought_home_from_home_runs_in_its_shadow_with_its_pid_parent_and_memory() {
    there_and_back("ws1");
}

#[test]
fn a_process_sent_home_from_its_host_runs_in_its_shadow_with_its_pid_parent_and_memory() {
    there_and_back("ws3");
}

#[test]
fn a_threaded_process_comes_home_with_its_thread_ids() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let s = setup();
    let c = &s.c;
    let n = 300;
    let want = reference(&s, n);
    let (child, pid) = start_homer_threads(&s, n, 3, 5, "/", 2);
    let tids = |node: &str, pid: i32| c.sh_ok(node, &format!("ls /proc/{pid}/task | sort -n"));
    let before = tids("ws1", pid);
    assert_eq!(
        before.lines().count(),
        3,
        "homer should have 3 threads: {before}"
    );
    migrate_at(c, "ws1", pid, "ws2");
    let said = migrate_at(c, "ws1", pid, "home");
    assert!(
        said.contains(&format!("runs on ws1 (pid {pid} there)")),
        "migrate said: {said}"
    );
    assert_eq!(
        tids("ws1", pid),
        before,
        "homer's threads should be back at home with their tids"
    );
    assert_eq!(
        finish_shell(c, child),
        "status=3",
        "the shell should see homer's exit status (98: a thread's tid changed)"
    );
    let got = c.sh_ok("ws1", "cat /tmp/out");
    assert!(got == want, "output at ws1 differs from an unmigrated run");
    nothing_left(c);
}

#[test]
fn a_python3_program_goes_to_ws2_and_back_home_and_its_output_is_unchanged() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let s = setup();
    let c = &s.c;
    let (want, child, pid) = start_count_py(c, 80);
    let said = migrate_at(c, "ws1", pid, "ws2");
    assert!(said.contains("runs on ws2"), "migrate said: {said}");
    // Home in the default mode, whatever it is (going home is always stop-copy).
    let said = c.run_ok("ws1", &["migrate", &pid.to_string(), "home"]);
    eprintln!("ws1$ migrate {pid} home: {said}");
    assert!(
        said.contains(&format!("runs on ws1 (pid {pid} there)")),
        "migrate said: {said}"
    );
    assert!(
        pids_of(c, "ws2", "python3").is_empty(),
        "python3 still runs at ws2"
    );
    let st = state_on(c, "ws1", pid);
    assert!(
        st.contains("sleeping") || st.contains("running"),
        "python3 should run at home again: {st:?}"
    );
    assert_eq!(finish_shell(c, child), "status=4", "python3's exit status");
    let got = c.sh_ok("ws1", "cat /tmp/out");
    assert!(
        got == want,
        "python3's output differs from an unmigrated run ({} vs {} bytes); its stderr: {}",
        got.len(),
        want.len(),
        c.sh_ok("ws1", "cat /tmp/cmd.err")
    );
    nothing_left(c);
}

#[test]
fn a_failed_homecoming_leaves_the_process_at_its_host_and_the_shadow_working() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let s = setup();
    let c = &s.c;
    c.sh_ok("ws1", "mkdir -p /tmp/gh");
    let (child, pid) = start_homer(&s, 300, 7, 3, "/tmp/gh");
    migrate_at(c, "ws1", pid, "ws2");
    // Its working directory goes away at home while it is away.
    c.sh_ok("ws1", "rmdir /tmp/gh");

    let o = c.exec(
        "ws1",
        &["migrate", "--mode", "stop-copy", &pid.to_string(), "home"],
    );
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    eprintln!("ws1$ migrate {pid} home: {err}");
    assert!(!o.status.success(), "going home should fail: {err}");
    assert!(
        err.contains("/tmp/gh") && err.contains("runs on at ws2"),
        "migrate should name the missing directory and say the process runs on at ws2: {err}"
    );
    assert!(
        err.contains("shadow is unchanged"),
        "migrate should say the shadow is unchanged: {err}"
    );
    let remote = pids_of(c, "ws2", "homer");
    assert_eq!(remote.len(), 1, "homer should run on at ws2");
    let st = state_on(c, "ws2", remote[0]);
    assert!(
        st.contains("sleeping") || st.contains("running"),
        "homer at ws2 should have been thawed: {st:?}"
    );
    let before = c.sh_ok("ws1", "wc -l < /tmp/out");
    wait_for(|| (c.sh_ok("ws1", "wc -l < /tmp/out") != before).then_some(()))
        .expect("homer stopped writing after the failed homecoming");
    assert!(
        state_on(c, "ws1", pid).contains("tracing stop"),
        "pid {pid} at ws1 should still be the frozen shadow"
    );
    let list = c.run_ok("ws1", &["migrate", "--list"]);
    assert!(
        list.contains(&pid.to_string()) && list.contains("ws2"),
        "the shadow should still be listed at ws1:\n{list}"
    );

    the_shadow_forwards_signals_and_the_status(c, child, pid);
}

/// homer moved ws1 -> ws2, then sent home from ws2 (`migrate PID home` at ws2) while
/// ws1's migd dies at the crash point `point` (in its `restore` or `committed`), and
/// is restarted. Returns the cluster, the shell at ws1, homer's pid at home, whether
/// `migrate` succeeded and what it said.
fn home_migd_dies_at(point: &str) -> (Setup, Child, i32, bool, String) {
    let mut s = setup();
    s.c.restart_daemon_with_env("ws1", "migd", &[("FERRY_FAULT", point)]);
    let (child, pid) = start_homer(&s, 300, 7, 3, "/");
    migrate_at(&s.c, "ws1", pid, "ws2");
    let there = pids_of(&s.c, "ws2", "homer");
    assert_eq!(there.len(), 1, "homer should run at ws2");
    let host_pid = there[0].to_string();
    let (ok, said) = ferry_tests::work::run_through_a_crash(
        &mut s.c,
        "ws2",
        &["migrate", "--mode", "stop-copy", &host_pid, "home"],
        "ws1",
        "migd",
    );
    (s, child, pid, ok, said)
}

/// Home's migd dies after passing `commit_home` to home-proxy, before answering
/// `committed` (`FERRY_FAULT=home-after-commit-home`): the process runs at home
/// again, so ws2 must not thaw its copy on a guess. It keeps it frozen and asks
/// home (`runs_at_home`) until the restarted migd answers (no shadow is left:
/// it runs there), then kills its copy: one copy, at home, with its pid and parent.
#[test]
fn home_migd_dying_after_passing_the_commit_home_leaves_the_process_at_home_only() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (s, child, pid, ok, said) = home_migd_dies_at("home-after-commit-home");
    let c = &s.c;
    assert!(
        ok,
        "migrate at ws2 should succeed once home answers:\n{said}"
    );
    assert!(
        said.contains(&format!("runs on ws1 (pid {pid} there)")),
        "migrate said: {said}"
    );
    assert!(
        pids_of(c, "ws2", "homer").is_empty(),
        "a copy of homer still exists at ws2 while it runs at home"
    );
    runs_at_home_again(c, pid);
    assert_eq!(
        finish_shell(c, child),
        "status=7",
        "the shell should see homer's own exit status"
    );
    nothing_left(c);
}

/// Home's migd dies before passing `commit_home` to home-proxy
/// (`FERRY_FAULT=home-before-commit-home`): the process was reshaped at home but
/// never let run. ws2 asks home until the restarted migd answers; it gives the
/// homecoming up (home-proxy makes it a shadow again) and says it does not run
/// there, so ws2 thaws its copy: one copy, at ws2, the shadow forwarding signals and
/// passing the exit status as before.
#[test]
fn home_migd_dying_before_passing_the_commit_home_leaves_the_process_at_its_host() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (s, child, pid, ok, said) = home_migd_dies_at("home-before-commit-home");
    left_at_ws2_with_a_working_shadow(&s, child, pid, ok, &said);
}

/// Home's migd dies after home-proxy restored the process into its shadow, before
/// it answered `restore` (`FERRY_FAULT=home-after-restore-into`): ws2 aborts and
/// thaws its copy, and the restarted migd gives up the homecoming the dead one left
/// (home-proxy makes the process a shadow again): one copy, at ws2, the shadow
/// forwarding signals and passing the exit status.
#[test]
fn home_migd_dying_inside_the_restore_leaves_the_process_at_its_host() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (s, child, pid, ok, said) = home_migd_dies_at("home-after-restore-into");
    left_at_ws2_with_a_working_shadow(&s, child, pid, ok, &said);
}

/// After a homecoming that failed at a crash point: `migrate` said so and that the
/// process runs on at ws2, it does (one copy), the shadow at ws1 is frozen and
/// forwards a SIGUSR1, the shell sees homer's status from ws2, nothing is left.
fn left_at_ws2_with_a_working_shadow(s: &Setup, child: Child, pid: i32, ok: bool, said: &str) {
    let c = &s.c;
    assert!(!ok, "going home should fail:\n{said}");
    assert!(
        said.contains("runs on at ws2"),
        "migrate should say the process runs on at ws2:\n{said}"
    );
    let remote = pids_of(c, "ws2", "homer");
    assert_eq!(remote.len(), 1, "homer should run on at ws2");
    let before = c.sh_ok("ws1", "wc -l < /tmp/out");
    wait_for(|| (c.sh_ok("ws1", "wc -l < /tmp/out") != before).then_some(()))
        .expect("homer stopped writing after the failed homecoming");
    ferry_tests::work::wait_until_shadow(c, "ws1", pid, said);
    the_shadow_forwards_signals_and_the_status(c, child, pid);
}

/// homer runs at ws2 with its shadow `pid` at ws1: a SIGUSR1 sent to the shadow
/// reaches it, the shell at ws1 sees its exit status (7) from ws2, nothing is left.
fn the_shadow_forwards_signals_and_the_status(c: &Cluster, child: Child, pid: i32) {
    c.sh_ok("ws1", &format!("kill -USR1 {pid}"));
    wait_for(|| {
        c.sh_ok("ws1", "cat /tmp/out")
            .contains("usr1")
            .then_some(())
    })
    .expect("a SIGUSR1 sent to the shadow did not reach homer at ws2");
    assert_eq!(
        finish_shell(c, child),
        "status=7",
        "the shell should see homer's exit status from ws2"
    );
    assert!(
        pids_of(c, "ws2", "homer").is_empty(),
        "homer should have ended at ws2"
    );
    nothing_left(c);
}

/// `pid` runs at ws1 again, itself: not a frozen shadow, and traced by nobody.
fn runs_at_home_again(c: &Cluster, pid: i32) {
    let st = state_on(c, "ws1", pid);
    assert!(
        st.contains("sleeping") || st.contains("running"),
        "pid {pid} should run at ws1 again, not be a frozen shadow: {st:?}"
    );
    assert_eq!(
        status_num(c, "ws1", pid, "TracerPid"),
        0,
        "pid {pid} is still traced at home"
    );
}
