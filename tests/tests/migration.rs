//! Migration between nodes on a 3-node local cluster: real processes started at ws1,
//! moved with `migrate` (run inside ws1), running elsewhere while their files and
//! their parent stay at home. Needs root and the workspace's binaries built
//! (`cargo build --workspace`): migd, migrate, home-proxy, fs-server, fuse-client.

use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::Mutex;

use ferry_tests::work::{
    cluster_with_program, finish_shell, spawn_shell, start_count_py, state_on, status_num,
    wait_for, ClusterWithProgram as Setup,
};
use ferry_tests::Cluster;

/// One 3-node cluster at a time: they are heavy for a small machine.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// A deterministic single-threaded program: `prog OUT N CODE USLEEP [MIB]` writes N
/// lines to OUT (each a function of its index only), sleeping USLEEP µs between
/// lines, then exits with CODE. With MIB it first fills that much memory.
const PROG: &str = r#"
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
int main(int argc, char **argv) {
    FILE *f = fopen(argv[1], "w");
    if (!f) { perror(argv[1]); return 100; }
    int n = atoi(argv[2]), code = atoi(argv[3]), pause = atoi(argv[4]);
    unsigned long x = 1;
    if (argc > 5) {
        size_t len = (size_t)atoi(argv[5]) << 20;
        char *m = malloc(len);
        for (size_t i = 0; i < len; i++) m[i] = (char)i;
        for (size_t i = 0; i < len; i += 4096) x += m[i];
    }
    for (int i = 0; i < n; i++) {
        for (int k = 0; k < 20000; k++) x = x * 6364136223846793005UL + 1442695040888963407UL;
        fprintf(f, "%d %lu\n", i, x);
        fflush(f);
        if (pause) usleep(pause);
    }
    fclose(f);
    return code;
}
"#;

/// A 3-node cluster with PROG compiled as DIR/prog (at -O1, as it always was).
fn setup() -> Setup {
    cluster_with_program(3, "prog", PROG, &["-O1"])
}

/// Starts `sh -c 'prog ...; echo status=$?'` at ws1 (stdout piped) and returns it with
/// prog's pid at ws1, once prog has written `lines` lines.
fn start_at_ws1(s: &Setup, out: &str, n: u32, code: i32, lines: usize) -> (Child, i32) {
    start_with(s, &format!("{out} {n} {code} 100000"), out, lines)
}

/// Like [`start_at_ws1`] with prog's whole argument string.
fn start_with(s: &Setup, args: &str, out: &str, lines: usize) -> (Child, i32) {
    let child = spawn_shell(&s.c, "ws1", &format!("{} {args}", s.prog.display()));
    let pid = wait_for(|| {
        let o = s.c.sh(
            "ws1",
            &format!("pgrep -xn prog && test $(wc -l < {out}) -ge {lines}"),
        );
        let t = String::from_utf8_lossy(&o.stdout).trim().to_string();
        (o.status.success() && !t.is_empty()).then(|| t.parse::<i32>().unwrap())
    })
    .unwrap_or_else(|| panic!("prog did not start at ws1\n{}", s.c.logs("ws1", 10)));
    (child, pid)
}

/// Waits until prog's output at ws1 grows (it runs, wherever it is); panics with
/// `what` if it does not.
fn keeps_writing(c: &Cluster, what: &str) {
    let before = c.sh_ok("ws1", "wc -l < /tmp/out");
    wait_for(|| (c.sh_ok("ws1", "wc -l < /tmp/out") != before).then_some(())).expect(what);
}

/// The pids of processes named `prog` on a node.
fn progs_on(c: &Cluster, node: &str) -> Vec<i32> {
    let o = c.sh(node, "pgrep -x prog || true");
    String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

fn migrate(c: &Cluster, pid: i32, dest: &str) -> String {
    c.run_ok("ws1", &["migrate", &pid.to_string(), dest])
}

fn reference(s: &Setup, n: u32) -> String {
    s.c.sh_ok(
        "ws1",
        &format!("{} /tmp/ref {n} 0 0 && cat /tmp/ref", s.prog.display()),
    )
}

#[test]
fn migrated_process_runs_elsewhere_writes_home_and_its_exit_status_reaches_the_parent() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let s = setup();
    let c = &s.c;
    let n = 120;
    let want = reference(&s, n);
    let (child, pid) = start_at_ws1(&s, "/tmp/out", n, 5, 5);

    let said = migrate(c, pid, "ws2");
    assert!(said.contains("runs on ws2"), "migrate said: {said}");
    let remote = progs_on(c, "ws2");
    assert_eq!(remote.len(), 1, "prog is not running at ws2");
    let view = c.sh_ok("ws2", &format!("ls /proc/{}/root/.../", remote[0]));
    assert!(
        view.contains("ws1") && view.contains("store"),
        "the super-root should be at /... in prog's view at ws2: {view:?}"
    );
    let st = state_on(c, "ws1", pid);
    assert!(
        st.contains("tracing stop"),
        "at ws1, pid {pid} should be the frozen shadow, not running: {st:?}"
    );
    let list = c.run_ok("ws1", &["migrate", "--list"]);
    assert!(
        list.contains(&format!("{pid}")) && list.contains("ws2"),
        "migrate --list at ws1 does not show pid {pid} on ws2:\n{list}"
    );

    let said = migrate(c, pid, "ws3");
    assert!(said.contains("runs on ws3"), "migrate said: {said}");
    assert_eq!(progs_on(c, "ws3").len(), 1, "prog is not running at ws3");
    assert!(
        progs_on(c, "ws2").is_empty(),
        "prog still runs at ws2 after moving to ws3"
    );

    let shell = finish_shell(c, child);
    assert_eq!(
        shell, "status=5",
        "the parent shell at ws1 should see prog's exit status from ws3"
    );
    let got = c.sh_ok("ws1", "cat /tmp/out");
    assert!(
        got == want,
        "output at ws1's /tmp/out differs from an unmigrated run ({} vs {} bytes)",
        got.len(),
        want.len()
    );
    assert!(
        !Path::new(&c.dir().join("ws2/tmp/out")).exists(),
        "the output landed in ws2's /tmp instead of its home's"
    );
    let store = c.dir().join("store/migrations");
    let left: Vec<_> = std::fs::read_dir(&store)
        .map(|r| r.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "images left in the store: {left:?}");
}

#[test]
fn stop_cont_and_term_at_home_reach_the_migrated_process_and_the_shell_sees_death_by_sigterm() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let s = setup();
    let c = &s.c;
    let (child, pid) = start_at_ws1(&s, "/tmp/out", 100_000, 0, 3);
    migrate(c, pid, "ws2");
    let remote = progs_on(c, "ws2");
    assert_eq!(remote.len(), 1, "prog is not running at ws2");
    let remote = remote[0];

    c.sh_ok("ws1", &format!("kill -STOP {pid}"));
    wait_for(|| state_on(c, "ws2", remote).contains("stopped").then_some(())).unwrap_or_else(
        || {
            panic!(
                "kill -STOP at ws1 did not stop prog at ws2: {}",
                state_on(c, "ws2", remote)
            )
        },
    );
    c.sh_ok("ws1", &format!("kill -CONT {pid}"));
    let lines = c.sh_ok("ws1", "wc -l < /tmp/out");
    wait_for(|| (c.sh_ok("ws1", "wc -l < /tmp/out") != lines).then_some(())).unwrap_or_else(|| {
        panic!(
            "kill -CONT at ws1 did not resume prog at ws2: {}",
            state_on(c, "ws2", remote)
        )
    });

    c.sh_ok("ws1", &format!("kill -TERM {pid}"));
    let shell = finish_shell(c, child);
    assert_eq!(
        shell, "status=143",
        "the shell at ws1 should see prog die of SIGTERM (128+15)"
    );
    assert!(
        progs_on(c, "ws2").is_empty(),
        "prog still runs at ws2 after SIGTERM at home"
    );
    assert!(
        progs_on(c, "ws1").is_empty(),
        "the shadow is still at ws1 after its process died"
    );
}

/// A parent that tells what `waitpid` says of its child: forks, runs `argv[1:]` in
/// the child, and appends `stopped`, `continued` and `exit N` / `signal N` to
/// /tmp/events as it sees them.
const WAITING_PARENT: &str = r#"
import os, sys
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[1], sys.argv[1:])
def say(w):
    with open("/tmp/events", "a") as f:
        f.write(w + "\n")
while True:
    _, st = os.waitpid(pid, os.WUNTRACED | os.WCONTINUED)
    if os.WIFSTOPPED(st):
        say("stopped")
    elif os.WIFCONTINUED(st):
        say("continued")
    elif os.WIFEXITED(st):
        say("exit %d" % os.WEXITSTATUS(st)); break
    else:
        say("signal %d" % os.WTERMSIG(st)); break
"#;

#[test]
fn the_parent_at_home_sees_its_migrated_child_stop_continue_and_die() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let s = setup();
    let c = &s.c;
    c.sh_ok(
        "ws1",
        &format!("rm -f /tmp/events; cat > /tmp/parent.py <<'PY'\n{WAITING_PARENT}\nPY"),
    );
    let child = spawn_shell(
        c,
        "ws1",
        &format!(
            "python3 /tmp/parent.py {} /tmp/out 100000 0 100000",
            s.prog.display()
        ),
    );
    let pid = wait_for(|| {
        let o = c.sh("ws1", "pgrep -xn prog && test $(wc -l < /tmp/out) -ge 3");
        let t = String::from_utf8_lossy(&o.stdout).trim().to_string();
        (o.status.success() && !t.is_empty()).then(|| t.parse::<i32>().unwrap())
    })
    .expect("prog did not start under its python3 parent at ws1");
    migrate(c, pid, "ws2");
    let remote = progs_on(c, "ws2");
    assert_eq!(remote.len(), 1, "prog is not running at ws2");
    let events = || c.sh_ok("ws1", "cat /tmp/events 2>/dev/null || true");

    c.sh_ok("ws1", &format!("kill -STOP {pid}"));
    wait_for(|| events().contains("stopped").then_some(())).unwrap_or_else(|| {
        panic!(
            "the parent at ws1 did not see its child stop; events: {:?}, prog at ws2: {}",
            events(),
            state_on(c, "ws2", remote[0])
        )
    });
    assert!(
        state_on(c, "ws2", remote[0]).contains("stopped"),
        "prog at ws2 should be stopped as its parent sees it"
    );

    c.sh_ok("ws1", &format!("kill -CONT {pid}"));
    wait_for(|| events().contains("continued").then_some(())).unwrap_or_else(|| {
        panic!(
            "the parent at ws1 did not see its child continue; events: {:?}",
            events()
        )
    });
    keeps_writing(c, "prog did not go on writing after SIGCONT at home");

    c.sh_ok("ws1", &format!("kill -TERM {pid}"));
    assert_eq!(
        finish_shell(c, child),
        "status=0",
        "the parent should end well"
    );
    assert_eq!(
        events().trim(),
        "stopped\ncontinued\nsignal 15",
        "what the parent at ws1 saw of its child, in order"
    );
}

#[test]
fn refused_migrations_leave_the_process_running_untouched() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let s = setup();
    let c = &s.c;
    let (child, pid) = start_at_ws1(&s, "/tmp/out", 100_000, 0, 3);
    let p = pid.to_string();

    let check_refused = |args: &[&str], expect: &str| {
        let o = c.exec("ws1", args);
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert!(!o.status.success(), "{args:?} should fail; it said {err}");
        assert!(
            err.contains(expect),
            "{args:?}: the message should say {expect:?}; it says: {err}"
        );
        let st = state_on(c, "ws1", pid);
        assert!(
            st.contains("sleeping") || st.contains("running"),
            "after {args:?}, pid {pid} should run on at ws1: {st:?}"
        );
        assert!(
            progs_on(c, "ws2").is_empty(),
            "after {args:?}, prog runs at ws2"
        );
    };
    check_refused(
        &[
            "setpriv",
            "--reuid",
            "1000",
            "--regid",
            "1000",
            "--clear-groups",
            "migrate",
            &p,
            "ws2",
        ],
        &format!("pid {pid} belongs to uid 0; you are uid 1000"),
    );
    check_refused(&["migrate", &p, "ws9"], "unknown node \"ws9\"");
    check_refused(&["migrate", "--mode", "bogus", &p, "ws2"], "invalid value");
    keeps_writing(c, "prog stopped writing after the refusals");

    // A process holding a TCP socket.
    c.sh_ok(
        "ws1",
        "python3 -c 'import socket,time; s=socket.socket(); s.bind((\"127.0.0.1\",0)); s.listen(); open(\"/tmp/listening\",\"w\").close(); time.sleep(600)' >/dev/null 2>&1 &",
    );
    let py: i32 = wait_for(|| {
        let o = c.sh("ws1", "test -e /tmp/listening && pgrep -xn python3");
        String::from_utf8_lossy(&o.stdout).trim().parse().ok()
    })
    .expect("python3 did not start");
    let o = c.exec("ws1", &["migrate", &py.to_string(), "ws2"]);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!o.status.success(), "migrating a TCP holder should fail");
    assert!(
        err.contains("TCP socket"),
        "the message should name the TCP socket: {err}"
    );
    let st = state_on(c, "ws1", py);
    assert!(st.contains("sleeping"), "python3 should run on: {st:?}");
    c.sh_ok("ws1", &format!("kill {py} {pid}"));
    let _ = finish_shell(c, child);
}

#[test]
fn the_shadow_keeps_pid_and_parent_at_home_and_releases_its_memory() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let s = setup();
    let c = &s.c;
    let (child, pid) = start_with(&s, "/tmp/out 100000 0 100000 64", "/tmp/out", 2);
    let ppid = status_num(c, "ws1", pid, "PPid");
    let rss = status_num(c, "ws1", pid, "VmRSS");
    assert!(
        rss > 60 * 1024,
        "prog should hold 64 MiB before: VmRSS {rss} kB"
    );
    migrate(c, pid, "ws2");
    assert_eq!(
        status_num(c, "ws1", pid, "PPid"),
        ppid,
        "the shadow's parent changed"
    );
    // The shadow releases its memory once home-proxy has the commit (just after
    // `migrate` returns).
    let released = wait_for(|| (status_num(c, "ws1", pid, "VmRSS") < 4 * 1024).then_some(()));
    assert!(
        released.is_some(),
        "the shadow at ws1 should have released its memory: VmRSS {} kB (was {rss})",
        status_num(c, "ws1", pid, "VmRSS")
    );
    let remote = progs_on(c, "ws2");
    assert_eq!(remote.len(), 1, "prog is not running at ws2");
    // Its pages fault in from the store (lazy by default): wait until all are in.
    let there = wait_for(|| {
        let v = status_num(c, "ws2", remote[0], "VmRSS");
        (v > 60 * 1024).then_some(v)
    });
    assert!(
        there.is_some(),
        "prog at ws2 should come to hold its 64 MiB: VmRSS {} kB",
        status_num(c, "ws2", remote[0], "VmRSS")
    );
    c.sh_ok("ws1", &format!("kill -TERM {pid}"));
    assert_eq!(finish_shell(c, child), "status=143");
}

#[test]
fn killing_the_daemons_after_a_migration_loses_neither_the_shadow_nor_the_exit_status() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut s = setup();
    let (child, pid) = start_at_ws1(&s, "/tmp/out", 80, 9, 3);
    migrate(&s.c, pid, "ws2");

    // The source's migd has no part left once the migration is done.
    s.c.kill_daemon("ws1", "migd", ferry_tests::Signal::SIGKILL);
    s.c.restart_daemon("ws1", "migd");

    s.c.kill_daemon("ws1", "home-proxy", ferry_tests::Signal::SIGKILL);
    s.c.restart_daemon("ws1", "home-proxy");
    let st = state_on(&s.c, "ws1", pid);
    assert!(
        st.contains("tracing stop"),
        "after home-proxy's restart pid {pid} should still be the frozen shadow: {st:?}"
    );
    let list = s.c.run_ok("ws1", &["migrate", "--list"]);
    assert!(
        list.contains("ws2"),
        "the restarted home-proxy does not list the shadow:\n{list}"
    );

    s.c.kill_daemon("ws2", "migd", ferry_tests::Signal::SIGKILL);
    s.c.restart_daemon("ws2", "migd");
    assert_eq!(
        progs_on(&s.c, "ws2").len(),
        1,
        "prog should run on at ws2 across its migd's restart"
    );

    let shell = finish_shell(&s.c, child);
    assert_eq!(
        shell, "status=9",
        "the exit status should reach the shell at ws1 across both restarts"
    );
    let want = reference(&s, 80);
    let got = s.c.sh_ok("ws1", "cat /tmp/out");
    assert!(got == want, "output at ws1 differs from an unmigrated run");
}

#[test]
fn a_destination_that_cannot_restore_leaves_the_original_running_where_it_was() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut s = setup();
    let (child, pid) = start_at_ws1(&s, "/tmp/out", 100_000, 0, 3);
    // ws2 loses the super-root: it can reach neither the store nor ws1's tree.
    s.c.kill_daemon("ws2", "fuse-client", ferry_tests::Signal::SIGKILL);
    let o = s.c.exec("ws1", &["migrate", &pid.to_string(), "ws2"]);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!o.status.success(), "the migration should fail: {err}");
    assert!(
        err.contains("thawed") && err.contains("runs on at ws1"),
        "migrate should say the process runs on at ws1: {err}"
    );
    let st = state_on(&s.c, "ws1", pid);
    assert!(
        st.contains("sleeping") || st.contains("running"),
        "pid {pid} should run on at ws1 after the failed migration: {st:?}"
    );
    keeps_writing(&s.c, "prog stopped writing after the failed migration");
    assert!(
        progs_on(&s.c, "ws2").is_empty(),
        "a copy of prog runs at ws2"
    );
    s.c.sh_ok("ws1", &format!("kill {pid}"));
    assert_eq!(finish_shell(&s.c, child), "status=143");
}

#[test]
fn a_python3_program_moves_twice_and_its_output_is_unchanged() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let s = setup();
    let c = &s.c;
    let (want, child, pid) = start_count_py(c, 80);
    let said = migrate(c, pid, "ws2");
    assert!(said.contains("runs on ws2"), "migrate said: {said}");
    let said = migrate(c, pid, "ws3");
    assert!(said.contains("runs on ws3"), "migrate said: {said}");
    assert_eq!(finish_shell(c, child), "status=4", "python3's exit status");
    let got = c.sh_ok("ws1", "cat /tmp/out");
    assert!(
        got == want,
        "python3's output differs from an unmigrated run ({} vs {} bytes); its stderr: {}",
        got.len(),
        want.len(),
        c.sh_ok("ws1", "cat /tmp/cmd.err")
    );
}

#[test]
fn an_ordinary_user_moves_their_own_process() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let s = setup();
    let c = &s.c;
    let as_user = "setpriv --reuid 1000 --regid 1000 --clear-groups";
    let child = spawn_shell(
        c,
        "ws1",
        &format!("{as_user} {} /tmp/uout 60 6 100000", s.prog.display()),
    );
    let pid: i32 = wait_for(|| {
        let o = c.sh("ws1", "pgrep -xn prog && test -s /tmp/uout");
        String::from_utf8_lossy(&o.stdout).trim().parse().ok()
    })
    .expect("prog did not start at ws1");
    let said = c.sh_ok("ws1", &format!("{as_user} migrate {pid} ws2"));
    assert!(said.contains("runs on ws2"), "migrate said: {said}");
    let remote = progs_on(c, "ws2");
    assert_eq!(remote.len(), 1, "prog is not running at ws2");
    assert_eq!(
        status_num(c, "ws2", remote[0], "Uid"),
        1000,
        "prog at ws2 should run as uid 1000"
    );
    assert_eq!(finish_shell(c, child), "status=6");
    let owner = c.sh_ok("ws1", "stat -c %u /tmp/uout");
    assert_eq!(owner.trim(), "1000", "the output file's owner at ws1");
}

#[test]
fn killing_the_destinations_migd_mid_migration_leaves_exactly_one_copy() {
    use std::io::BufRead;
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut s = setup();
    let (child, pid) = start_at_ws1(&s, "/tmp/out", 100_000, 0, 3);
    let mut m =
        s.c.command("ws1", &["migrate", &pid.to_string(), "ws2"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cluster exec runs");
    let mut said = String::new();
    for line in std::io::BufReader::new(m.stderr.take().unwrap()).lines() {
        let line = line.unwrap_or_default();
        said.push_str(&line);
        said.push('\n');
        if line.contains("image written") {
            // The destination is restoring: its migd dies now.
            s.c.kill_daemon("ws2", "migd", ferry_tests::Signal::SIGKILL);
        }
    }
    let ok = m.wait().expect("migrate ends").success();
    let c = &s.c;
    let at_ws2 = progs_on(c, "ws2");
    let home = state_on(c, "ws1", pid);
    if ok {
        assert_eq!(
            at_ws2.len(),
            1,
            "migrate succeeded but prog is not at ws2\n{said}"
        );
        assert!(
            home.contains("tracing stop"),
            "migrate succeeded but ws1 runs prog too: {home:?}"
        );
    } else {
        assert!(
            at_ws2.is_empty(),
            "migrate failed but a copy of prog runs at ws2 too\n{said}"
        );
        assert!(
            home.contains("sleeping") || home.contains("running"),
            "migrate failed but prog does not run on at ws1: {home:?}\n{said}"
        );
        assert!(
            said.contains("thawed"),
            "migrate should say the process was thawed:\n{said}"
        );
        keeps_writing(c, "prog stopped writing after the failed migration");
    }
    eprintln!("migrate succeeded: {ok}\n{said}");
    c.sh_ok("ws1", &format!("kill {pid}"));
    assert_eq!(finish_shell(c, child), "status=143");
}

#[test]
fn kill_9_at_home_kills_the_migrated_process_too() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let s = setup();
    let c = &s.c;
    let (child, pid) = start_at_ws1(&s, "/tmp/out", 100_000, 0, 3);
    migrate(c, pid, "ws2");
    assert_eq!(progs_on(c, "ws2").len(), 1, "prog is not running at ws2");
    c.sh_ok("ws1", &format!("kill -KILL {pid}"));
    assert_eq!(
        finish_shell(c, child),
        "status=137",
        "the shell at ws1 should see death by SIGKILL"
    );
    wait_for(|| progs_on(c, "ws2").is_empty().then_some(()))
        .expect("prog still runs at ws2 after kill -9 of its shadow at ws1");
}

/// The destination holds its copy before the copy's first instruction until the
/// source commits (`migrate internal-restore`, told `restore`, says `running` and
/// waits for `commit`):
/// a copy that is never committed never ran, so a failed migration can thaw the
/// original without anything having happened twice.
#[test]
fn a_destination_copy_runs_only_once_committed() {
    use std::io::{BufRead, Write};
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let s = setup();
    let c = &s.c;
    let (child, pid) = start_with(&s, "/tmp/out 100000 0 20000", "/tmp/out", 3);
    let images = "/.../store/held-test";
    c.sh_ok("ws1", &format!("migd dump --pid {pid} --images {images}"));
    drop(child);
    let lines = || c.sh_ok("ws1", "wc -l < /tmp/out").trim().to_string();
    let dumped_at = lines();
    let restorer = |stage: &str| {
        let mut r = c
            .command(
                "ws2",
                &[
                    "migrate",
                    "internal-restore",
                    "--images",
                    images,
                    "--home",
                    "ws1",
                    "--superroot",
                    "/...",
                    "--stage",
                    stage,
                ],
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("cluster exec runs");
        let mut out = std::io::BufReader::new(r.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        assert_eq!(
            line.trim(),
            "ready",
            "the restorer's home view is not ready"
        );
        writeln!(r.stdin.as_mut().unwrap(), "restore").unwrap();
        line.clear();
        out.read_line(&mut line).unwrap();
        // prog's stdout is a pipe to the shell at ws1: the restorer names its relay.
        if line.starts_with("relays ") {
            line.clear();
            out.read_line(&mut line).unwrap();
        }
        let host_pid: i32 = line
            .strip_prefix("running ")
            .and_then(|r| r.split_whitespace().next()?.parse().ok())
            .unwrap_or_else(|| panic!("the restorer said {line:?}, not running"));
        (r, out, host_pid)
    };

    // Never committed: it stays held (tracing stop, no line written), and once its
    // restorer's input ends it is gone without having written a line.
    let (mut r, _out, host_pid) = restorer("/tmp/stage-a");
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert!(
        state_on(c, "ws2", host_pid).contains("tracing stop"),
        "the copy should be held before commit: {}",
        state_on(c, "ws2", host_pid)
    );
    assert_eq!(lines(), dumped_at, "the copy ran before any commit");
    drop(r.stdin.take());
    assert!(
        !r.wait().unwrap().success(),
        "an uncommitted restore must fail"
    );
    assert!(
        state_on(c, "ws2", host_pid).is_empty(),
        "the uncommitted copy still exists"
    );
    assert_eq!(lines(), dumped_at, "the uncommitted copy ran");

    // Committed: it runs on from where it was dumped.
    let (mut r, _out, host_pid) = restorer("/tmp/stage-b");
    assert_eq!(lines(), dumped_at, "the copy ran before its commit");
    writeln!(r.stdin.as_mut().unwrap(), "commit").unwrap();
    wait_for(|| (lines() != dumped_at).then_some(())).expect("the committed copy does not run");
    c.sh_ok("ws2", &format!("kill {host_pid}"));
    let _ = r.wait();
}

/// The destination's migd dies right after passing the commit to its restorer,
/// before answering (`FERRY_FAULT=after-commit`): the copy there runs, so the
/// source must not thaw the original on a guess. It asks until the restarted migd
/// (which takes back the committed copy) answers, then commits: exactly one copy,
/// at ws2, and the shadow at home.
#[test]
fn a_commit_whose_answer_is_lost_is_settled_by_asking_and_leaves_one_copy() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut s = setup();
    s.c.restart_daemon_with_env("ws2", "migd", &[("FERRY_FAULT", "after-commit")]);
    let (child, pid) = start_at_ws1(&s, "/tmp/out", 100_000, 0, 3);
    let (ok, said) = ferry_tests::work::run_through_a_crash(
        &mut s.c,
        "ws1",
        &["migrate", &pid.to_string(), "ws2"],
        "ws2",
        "migd",
    );
    let c = &s.c;
    assert!(ok, "migrate failed:\n{said}");
    assert_eq!(
        progs_on(c, "ws2").len(),
        1,
        "prog should run at ws2\n{said}"
    );
    let home = state_on(c, "ws1", pid);
    assert!(
        home.contains("tracing stop"),
        "ws1 should hold the shadow only, not run prog: {home:?}\n{said}"
    );
    keeps_writing(c, "prog does not go on at ws2");
    c.sh_ok("ws1", &format!("kill {pid}"));
    assert_eq!(finish_shell(c, child), "status=143");
}

/// home-proxy dies after the source decided (the destination has the commit) but
/// before the original was made the shadow (`FERRY_FAULT=proxy-before-commit`): its
/// keeper must not thaw the original at the end of its input (two copies would run)
/// but make it the shadow; a restarted home-proxy takes the shadow back from the
/// record `decided` wrote, and a signal at home still ends the process at ws2.
#[test]
fn home_proxy_dying_at_the_commit_leaves_one_copy_and_the_shadow_is_taken_back() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut s = setup();
    s.c.restart_daemon_with_env(
        "ws1",
        "home-proxy",
        &[("FERRY_FAULT", "proxy-before-commit")],
    );
    let (child, pid) = start_at_ws1(&s, "/tmp/out", 100_000, 0, 3);
    let said = migrate(&s.c, pid, "ws2");
    wait_for(|| {
        (!s.c
            .daemon_pid("ws1", "home-proxy")
            .is_some_and(ferry_tests::up::alive))
        .then_some(())
    })
    .expect("home-proxy did not die at the fault point");
    s.c.restart_daemon("ws1", "home-proxy");
    let c = &s.c;
    assert_eq!(
        progs_on(c, "ws2").len(),
        1,
        "prog should run at ws2\n{said}"
    );
    ferry_tests::work::wait_until_shadow(c, "ws1", pid, &said);
    let listed = c.sh_ok("ws1", "migrate --list");
    assert!(
        listed.contains("ws2"),
        "the restarted home-proxy lost the shadow:\n{listed}"
    );
    keeps_writing(c, "prog does not go on at ws2");
    c.sh_ok("ws1", &format!("kill {pid}"));
    assert_eq!(finish_shell(c, child), "status=143");
    assert!(progs_on(c, "ws2").is_empty(), "prog survives at ws2");
}

/// A process moving on from ws2 to ws3 (asked at home): ws2's migd dies after ws3
/// answered `committed`, before ws2's keeper killed the old copy
/// (`FERRY_FAULT=mover-after-commit`). The keeper was told `decided`, so the end of
/// its input keeps the old copy frozen instead of thawing it; the restarted migd
/// finds the decision it recorded, asks ws3 whether its copy runs, kills the old
/// copy and tells home-proxy at ws1 where the process is now: one copy, at ws3,
/// and a signal at home still reaches it.
#[test]
fn a_host_dying_after_a_move_on_committed_leaves_one_copy_and_home_learns_the_new_host() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut s = setup();
    s.c.restart_daemon_with_env("ws2", "migd", &[("FERRY_FAULT", "mover-after-commit")]);
    let (child, pid) = start_at_ws1(&s, "/tmp/out", 100_000, 0, 3);
    migrate(&s.c, pid, "ws2");
    let dying = s.c.daemon_pid("ws2", "migd").expect("migd at ws2");
    let o = s.c.exec("ws1", &["migrate", &pid.to_string(), "ws3"]);
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    wait_for(|| (!ferry_tests::up::alive(dying)).then_some(()))
        .unwrap_or_else(|| panic!("ws2's migd did not die at the fault point\n{said}"));
    s.c.restart_daemon("ws2", "migd");
    let c = &s.c;
    wait_for(|| progs_on(c, "ws2").is_empty().then_some(())).unwrap_or_else(|| {
        panic!(
            "the old copy at ws2 is still there ({}) while one runs at ws3 ({:?})\n{said}\n{}",
            progs_on(c, "ws2")
                .iter()
                .map(|p| state_on(c, "ws2", *p))
                .collect::<Vec<_>>()
                .join(", "),
            progs_on(c, "ws3"),
            c.logs("ws2", 20)
        )
    });
    assert_eq!(
        progs_on(c, "ws3").len(),
        1,
        "prog should run at ws3\n{said}"
    );
    wait_for(|| {
        c.run_ok("ws1", &["migrate", "--list"])
            .contains("ws3")
            .then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "home-proxy at ws1 was not told that prog runs at ws3:\n{}",
            c.run_ok("ws1", &["migrate", "--list"])
        )
    });
    keeps_writing(c, "prog does not go on at ws3");
    c.sh_ok("ws1", &format!("kill {pid}"));
    assert_eq!(finish_shell(c, child), "status=143");
    assert!(progs_on(c, "ws3").is_empty(), "prog survives at ws3");
}

/// The source's migd dies right after ws2 accepted its offer
/// (`FERRY_FAULT=source-after-offer`): ws2 started a restorer for it (the home view
/// built, waiting for `restore`) that nobody will ever tell anything. Past
/// `migd.offer_bound_secs` (5 s here) ws2 drops the offer and says so in its log;
/// the process ran on untouched at ws1, and moves to ws2 once ws1's migd is back.
#[test]
fn an_offer_whose_source_died_is_dropped_after_the_bound() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut s =
        ferry_tests::work::cluster_with_program_configured(3, "prog", PROG, &["-O1"], |cfg| {
            cfg.migd.offer_bound_secs = 5
        });
    s.c.restart_daemon_with_env("ws1", "migd", &[("FERRY_FAULT", "source-after-offer")]);
    let (child, pid) = start_at_ws1(&s, "/tmp/out", 100_000, 0, 3);
    let o = s.c.exec("ws1", &["migrate", &pid.to_string(), "ws2"]);
    assert!(
        !o.status.success(),
        "migrate should fail: its migd died at the fault point"
    );
    let c = &s.c;
    // (The bracket keeps pgrep from matching the shell that runs it.)
    let restorers = || c.sh_ok("ws2", "pgrep -f 'migrate internal-restor[e]' || true");
    assert!(
        !restorers().trim().is_empty(),
        "ws2 started no restorer for the offer"
    );
    wait_for(|| restorers().trim().is_empty().then_some(())).unwrap_or_else(|| {
        panic!(
            "ws2 still keeps the restorer of an offer whose source died\n{}",
            c.logs("ws2", 10)
        )
    });
    let log = c.log_tail("ws2", "migd", 50);
    assert!(
        log.contains("offer dropped"),
        "ws2's migd should say it dropped the offer:\n{log}"
    );
    let st = state_on(c, "ws1", pid);
    assert!(
        st.contains("sleeping") || st.contains("running"),
        "pid {pid} should run on at ws1: {st:?}"
    );
    keeps_writing(c, "prog stopped writing at ws1");
    s.c.restart_daemon("ws1", "migd");
    let c = &s.c;
    let said = migrate(c, pid, "ws2");
    assert!(said.contains("runs on ws2"), "migrate said: {said}");
    c.sh_ok("ws1", &format!("kill {pid}"));
    assert_eq!(finish_shell(c, child), "status=143");
}
