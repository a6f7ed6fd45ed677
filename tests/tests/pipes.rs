//! Pipes stay at home: a migrated process whose pipe has its other end at its home
//! (`prog | cat` or `cat f | prog` started there) keeps writing into or reading
//! from that pipe wherever it runs; its host relays the bytes (docs/migration.md,
//! "Pipes"). On the 3-node local cluster (ws1 is home). Needs root and the
//! workspace's release binaries.

use std::process::Child;
use std::sync::Mutex;
use std::time::Duration;

use ferry_tests::work::{
    finish_shell, migrate_ok, pids_of, spawn_shell, wait_for, wait_up_to, COUNT_PY,
};
use ferry_tests::{Cluster, Signal};

/// One 3-node cluster at a time: they are heavy for a small machine.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn cluster() -> Cluster {
    let c = Cluster::start(3);
    c.require(&["fs-server", "fuse-client", "migd", "home-proxy"]);
    c
}

fn lines_in(c: &Cluster, path: &str) -> usize {
    c.sh_ok("ws1", &format!("wc -l < {path}"))
        .trim()
        .parse()
        .unwrap_or(0)
}

/// Waits until `path` at ws1 has more lines than now; panics with `what` if not.
fn grows(c: &Cluster, path: &str, what: &str) {
    let before = lines_in(c, path);
    wait_for(|| (lines_in(c, path) > before).then_some(()))
        .unwrap_or_else(|| panic!("{what}\n{}\n{}", c.logs("ws1", 20), c.logs("ws2", 20)));
}

/// A pipeline at ws1 whose writer is count.py (tests/programs), printing `n` lines
/// into the pipe to `reader`.
struct Piped {
    /// count.py in the cluster directory (seen by every node).
    script: String,
    n: usize,
}

impl Piped {
    fn new(c: &Cluster, n: usize) -> Piped {
        let script = c.dir().join("count.py");
        std::fs::write(&script, COUNT_PY).unwrap();
        Piped {
            script: script.display().to_string(),
            n,
        }
    }

    /// What `reader` prints from an unmigrated run at full speed.
    fn reference(&self, c: &Cluster, reader: &str) -> String {
        let (script, n) = (&self.script, self.n);
        c.sh_ok(
            "ws1",
            &format!("python3 {script} /dev/stdout {n} 0 | {reader}"),
        )
    }

    /// Starts the pipeline at ws1 (lines 0.05 s apart) under a shell, followed by
    /// `then`; returns the shell.
    fn start(&self, c: &Cluster, reader: &str, then: &str) -> Child {
        let (script, n) = (&self.script, self.n);
        spawn_shell(
            c,
            "ws1",
            &format!("python3 {script} /dev/stdout {n} 0.05 | {reader}; {then}"),
        )
    }
}

/// The pid at ws1 of the only process named `comm`, once `out` has 5 lines.
fn pid_once_written(c: &Cluster, comm: &str, out: &str) -> i32 {
    wait_for(|| {
        let p = pids_of(c, "ws1", comm);
        (p.len() == 1 && lines_in(c, out) >= 5).then(|| p[0])
    })
    .unwrap_or_else(|| panic!("{comm} did not start at ws1"))
}

/// `path` at ws1 holds exactly `want`.
fn holds_exactly(c: &Cluster, path: &str, want: &str) {
    let got = c.sh_ok("ws1", &format!("cat {path}"));
    assert_eq!(got.len(), want.len(), "bytes in {path} at ws1");
    assert!(
        got == want,
        "{path} at ws1 holds other bytes than an unmigrated run's"
    );
}

/// python3 writes its lines into a pipe read by `cat` at ws1, and moves from ws1 to
/// ws2, to ws3 and home again while it writes: `cat` gets every byte, in order, as
/// from a run that never moved, and the shell sees python3's own exit status.
/// Before relaying, python3 lost its reader at the first move (its pipe at the host
/// had none) and died of the broken pipe.
#[test]
fn a_pipe_read_at_home_gets_every_byte_wherever_its_writer_runs() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let c = cluster();
    let p = Piped::new(&c, 400);
    let want = p.reference(&c, "cat");
    assert_eq!(want.lines().count(), 400, "the reference run");
    let shell = p.start(&c, "cat > /tmp/piped", "echo writer=${PIPESTATUS[0]}");
    let pid = pid_once_written(&c, "python3", "/tmp/piped");
    migrate_ok(&c, "ws1", pid, "ws2", &[]);
    grows(&c, "/tmp/piped", "no bytes came home from ws2");
    migrate_ok(&c, "ws1", pid, "ws3", &[]);
    grows(&c, "/tmp/piped", "no bytes came home from ws3");
    migrate_ok(&c, "ws1", pid, "home", &[]);
    grows(&c, "/tmp/piped", "no bytes after coming home");
    let out = finish_shell(&c, shell);
    assert_eq!(
        out, "writer=4\nstatus=0",
        "python3's exit status, through the shadow"
    );
    holds_exactly(&c, "/tmp/piped", &want);
}

/// `sed -u` between python3 and `cat` at ws1 runs at ws2; ws2's migd and then
/// ws1's home-proxy are killed (-9) and restarted while the lines flow: the
/// restarted migd takes both relays back from the restorer (bytes not delivered
/// are still in the pipes: at ws2 for output, at ws1 for input), the restarted
/// home-proxy takes the streams where they were, and `cat` gets exactly what an
/// unmigrated pipeline gives.
#[test]
fn relayed_pipes_survive_restarts_of_the_hosts_migd_and_of_home_proxy() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut c = cluster();
    let p = Piped::new(&c, 300);
    let want = p.reference(&c, "sed -u s/1/one/g | cat");
    let shell = p.start(
        &c,
        "sed -u s/1/one/g | cat > /tmp/piped",
        "echo ${PIPESTATUS[*]}",
    );
    let pid = pid_once_written(&c, "sed", "/tmp/piped");
    migrate_ok(&c, "ws1", pid, "ws2", &[]);
    grows(&c, "/tmp/piped", "sed at ws2 passes nothing");
    for (node, daemon) in [("ws2", "migd"), ("ws1", "home-proxy")] {
        c.kill_daemon(node, daemon, Signal::SIGKILL);
        std::thread::sleep(Duration::from_millis(500));
        c.restart_daemon(node, daemon);
        grows(
            &c,
            "/tmp/piped",
            &format!("nothing passes after {node}'s {daemon} restarted"),
        );
    }
    assert_eq!(finish_shell(&c, shell), "4 0 0\nstatus=0", "exit statuses");
    holds_exactly(&c, "/tmp/piped", &want);
}

/// `cat` reads a pipe that python3 at ws1 writes into, and moves from ws1 to ws2,
/// to ws3 and home again while it reads: it copies exactly the bytes of an
/// unmigrated run, and reads the end when python3 closes the pipe at ws1. Before
/// relaying, cat read what was buffered at the first move, then the end.
#[test]
fn a_pipe_written_at_home_is_read_whole_wherever_its_reader_runs() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let c = cluster();
    let p = Piped::new(&c, 400);
    let want = p.reference(&c, "cat");
    let shell = p.start(
        &c,
        "cat > /tmp/copied",
        "echo writer=${PIPESTATUS[0]} reader=${PIPESTATUS[1]}",
    );
    let pid = pid_once_written(&c, "cat", "/tmp/copied");
    migrate_ok(&c, "ws1", pid, "ws2", &[]);
    grows(&c, "/tmp/copied", "cat at ws2 copies nothing more");
    migrate_ok(&c, "ws1", pid, "ws3", &[]);
    grows(&c, "/tmp/copied", "cat at ws3 copies nothing more");
    migrate_ok(&c, "ws1", pid, "home", &[]);
    grows(&c, "/tmp/copied", "cat back home copies nothing more");
    let out = finish_shell(&c, shell);
    assert_eq!(out, "writer=4 reader=0\nstatus=0", "exit statuses");
    holds_exactly(&c, "/tmp/copied", &want);
}

/// `sed -u` between python3 and `cat` at ws1 (a pipe from home, a pipe to home)
/// moves to ws2, to ws3 and home while the lines flow: `cat` gets exactly what an
/// unmigrated pipeline gives.
#[test]
fn a_filter_between_two_pipes_at_home_moves_and_passes_every_byte() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let c = cluster();
    let p = Piped::new(&c, 400);
    let want = p.reference(&c, "sed -u s/1/one/g | cat");
    assert!(want.contains("one"), "the reference run");
    let shell = p.start(
        &c,
        "sed -u s/1/one/g | cat > /tmp/filtered",
        "echo ${PIPESTATUS[*]}",
    );
    let pid = pid_once_written(&c, "sed", "/tmp/filtered");
    for dest in ["ws2", "ws3", "home"] {
        migrate_ok(&c, "ws1", pid, dest, &[]);
        grows(
            &c,
            "/tmp/filtered",
            &format!("sed at {dest} passes nothing more"),
        );
    }
    assert_eq!(finish_shell(&c, shell), "4 0 0\nstatus=0", "exit statuses");
    holds_exactly(&c, "/tmp/filtered", &want);
}

/// sha256sum, moved to ws2 while python3 at ws1 still writes into its pipe,
/// prints at ws2 the sum of everything python3 wrote once python3 closes the pipe:
/// the sum of an unmigrated run.
#[test]
fn a_reader_at_its_host_reads_the_end_when_the_writer_at_home_closes_the_pipe() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let c = cluster();
    let p = Piped::new(&c, 120);
    let want = p.reference(&c, "sha256sum");
    let shell = p.start(&c, "sha256sum > /tmp/sum", "true");
    let pid = wait_for(|| pids_of(&c, "ws1", "sha256sum").first().copied())
        .expect("sha256sum did not start at ws1");
    std::thread::sleep(Duration::from_millis(500));
    migrate_ok(&c, "ws1", pid, "ws2", &[]);
    assert_eq!(
        pids_of(&c, "ws2", "sha256sum").len(),
        1,
        "sha256sum runs at ws2"
    );
    assert_eq!(finish_shell(&c, shell), "status=0");
    holds_exactly(&c, "/tmp/sum", &want);
}

/// `yes` fills its pipe to a reader at ws1 that waits, then takes three lines and
/// quits. Moved to ws2 meanwhile, `yes` waits there for room, as it would at home,
/// and when the reader quits it gets EPIPE and dies of SIGPIPE, as it would at home:
/// the shell sees status 141. (Before relaying, it died of SIGPIPE at ws2 at once.)
#[test]
fn a_writer_whose_reader_at_home_quits_dies_of_sigpipe_as_at_home() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let c = cluster();
    let shell = spawn_shell(
        &c,
        "ws1",
        "yes | (sleep 6; head -n 3 > /tmp/head); echo yes=${PIPESTATUS[0]}",
    );
    let pid =
        wait_for(|| pids_of(&c, "ws1", "yes").first().copied()).expect("yes did not start at ws1");
    // Full pipe: yes is blocked in write.
    std::thread::sleep(Duration::from_millis(300));
    migrate_ok(&c, "ws1", pid, "ws2", &[]);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        pids_of(&c, "ws2", "yes").len(),
        1,
        "yes waits at ws2 while the reader at home waits"
    );
    let out = finish_shell(&c, shell);
    assert_eq!(out, "yes=141\nstatus=0", "yes died of SIGPIPE");
    assert_eq!(c.sh_ok("ws1", "cat /tmp/head"), "y\ny\ny\n");
    let gone = wait_up_to(Duration::from_secs(10), || {
        pids_of(&c, "ws2", "yes").is_empty().then_some(())
    });
    assert!(gone.is_some(), "yes still runs at ws2");
}
