//! Pipes stay at home: a migrated process that writes into a pipe whose reader is at
//! its home (`prog | cat` started there) keeps writing into that pipe from wherever
//! it runs; its host relays the bytes home (docs/migration.md, "Pipes"). On the
//! 3-node local cluster (ws1 is home). Needs root and the workspace's release
//! binaries.

use std::sync::Mutex;

use ferry_tests::work::{
    finish_shell, migrate_ok, pids_of, spawn_shell, wait_for, wait_up_to, COUNT_PY,
};
use ferry_tests::Cluster;

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

/// python3 writes its lines into a pipe read by `cat` at ws1, and moves from ws1 to
/// ws2, to ws3 and home again while it writes: `cat` gets every byte, in order, as
/// from a run that never moved, and the shell sees python3's own exit status.
/// Before relaying, python3 lost its reader at the first move (its pipe at the host
/// had none) and died of the broken pipe.
#[test]
fn a_pipe_read_at_home_gets_every_byte_wherever_its_writer_runs() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let c = cluster();
    let script = c.dir().join("count.py");
    std::fs::write(&script, COUNT_PY).unwrap();
    let script = script.display().to_string();
    let n = 400;
    let want = c.sh_ok(
        "ws1",
        &format!("python3 {script} /dev/stdout {n} 0 | cat > /tmp/ref; cat /tmp/ref"),
    );
    assert_eq!(want.lines().count(), n, "the reference run");
    let shell = spawn_shell(
        &c,
        "ws1",
        &format!(
            "python3 {script} /dev/stdout {n} 0.05 | cat > /tmp/piped; echo writer=${{PIPESTATUS[0]}}"
        ),
    );
    let pid = wait_for(|| {
        let p = pids_of(&c, "ws1", "python3");
        (p.len() == 1 && lines_in(&c, "/tmp/piped") >= 5).then(|| p[0])
    })
    .expect("python3 did not start at ws1");
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
    let got = c.sh_ok("ws1", "cat /tmp/piped");
    assert_eq!(got.len(), want.len(), "bytes that reached cat at ws1");
    assert!(
        got == want,
        "cat at ws1 got other bytes than an unmigrated run"
    );
}

/// While python3 at ws2 writes into its pipe to `cat` at ws1, ws2's migd and then
/// ws1's home-proxy are killed (-9) and restarted: the restarted migd takes the
/// relay back from the restorer (the bytes it had not delivered are still in the
/// pipe at ws2), the restarted home-proxy takes the stream where it was, and `cat`
/// gets exactly the bytes of an unmigrated run.
#[test]
fn relayed_output_survives_restarts_of_the_hosts_migd_and_of_home_proxy() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut c = cluster();
    let script = c.dir().join("count.py");
    std::fs::write(&script, COUNT_PY).unwrap();
    let script = script.display().to_string();
    let n = 300;
    let want = c.sh_ok(
        "ws1",
        &format!("python3 {script} /dev/stdout {n} 0 | cat > /tmp/ref; cat /tmp/ref"),
    );
    let shell = spawn_shell(
        &c,
        "ws1",
        &format!(
            "python3 {script} /dev/stdout {n} 0.05 | cat > /tmp/piped; echo writer=${{PIPESTATUS[0]}}"
        ),
    );
    let pid = wait_for(|| {
        let p = pids_of(&c, "ws1", "python3");
        (p.len() == 1 && lines_in(&c, "/tmp/piped") >= 5).then(|| p[0])
    })
    .expect("python3 did not start at ws1");
    migrate_ok(&c, "ws1", pid, "ws2", &[]);
    grows(&c, "/tmp/piped", "no bytes came home from ws2");
    c.kill_daemon("ws2", "migd", ferry_tests::Signal::SIGKILL);
    std::thread::sleep(std::time::Duration::from_millis(500));
    c.restart_daemon("ws2", "migd");
    grows(&c, "/tmp/piped", "no bytes after ws2's migd restarted");
    c.kill_daemon("ws1", "home-proxy", ferry_tests::Signal::SIGKILL);
    std::thread::sleep(std::time::Duration::from_millis(500));
    c.restart_daemon("ws1", "home-proxy");
    grows(
        &c,
        "/tmp/piped",
        "no bytes after ws1's home-proxy restarted",
    );
    let out = finish_shell(&c, shell);
    assert_eq!(
        out, "writer=4\nstatus=0",
        "python3's exit status, through the shadow"
    );
    let got = c.sh_ok("ws1", "cat /tmp/piped");
    assert_eq!(got.len(), want.len(), "bytes that reached cat at ws1");
    assert!(
        got == want,
        "cat at ws1 got other bytes than an unmigrated run"
    );
}

/// `cat` reads a pipe that python3 at ws1 writes into, and moves from ws1 to ws2,
/// to ws3 and home again while it reads: it copies exactly the bytes of an
/// unmigrated run, and reads the end when python3 closes the pipe at ws1. Before
/// relaying, cat read what was buffered at the first move, then the end.
#[test]
fn a_pipe_written_at_home_is_read_whole_wherever_its_reader_runs() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let c = cluster();
    let script = c.dir().join("count.py");
    std::fs::write(&script, COUNT_PY).unwrap();
    let script = script.display().to_string();
    let n = 400;
    let want = c.sh_ok(
        "ws1",
        &format!("python3 {script} /dev/stdout {n} 0 | cat > /tmp/ref; cat /tmp/ref"),
    );
    let shell = spawn_shell(
        &c,
        "ws1",
        &format!(
            "python3 {script} /dev/stdout {n} 0.05 | cat > /tmp/copied; echo writer=${{PIPESTATUS[0]}} reader=${{PIPESTATUS[1]}}"
        ),
    );
    let pid = wait_for(|| {
        let p = pids_of(&c, "ws1", "cat");
        (p.len() == 1 && lines_in(&c, "/tmp/copied") >= 5).then(|| p[0])
    })
    .expect("cat did not start at ws1");
    migrate_ok(&c, "ws1", pid, "ws2", &[]);
    grows(&c, "/tmp/copied", "cat at ws2 copies nothing more");
    migrate_ok(&c, "ws1", pid, "ws3", &[]);
    grows(&c, "/tmp/copied", "cat at ws3 copies nothing more");
    migrate_ok(&c, "ws1", pid, "home", &[]);
    grows(&c, "/tmp/copied", "cat back home copies nothing more");
    let out = finish_shell(&c, shell);
    assert_eq!(out, "writer=4 reader=0\nstatus=0", "exit statuses");
    let got = c.sh_ok("ws1", "cat /tmp/copied");
    assert_eq!(got.len(), want.len(), "bytes cat copied");
    assert!(got == want, "cat copied other bytes than an unmigrated run");
}

/// sha256sum, moved to ws2 while python3 at ws1 still writes into its pipe,
/// prints at ws2 the sum of everything python3 wrote once python3 closes the pipe:
/// the sum of an unmigrated run.
#[test]
fn a_reader_at_its_host_reads_the_end_when_the_writer_at_home_closes_the_pipe() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let c = cluster();
    let script = c.dir().join("count.py");
    std::fs::write(&script, COUNT_PY).unwrap();
    let script = script.display().to_string();
    let n = 120;
    let want = c.sh_ok(
        "ws1",
        &format!("python3 {script} /dev/stdout {n} 0 | sha256sum"),
    );
    let shell = spawn_shell(
        &c,
        "ws1",
        &format!("python3 {script} /dev/stdout {n} 0.05 | sha256sum > /tmp/sum"),
    );
    let pid = wait_for(|| pids_of(&c, "ws1", "sha256sum").first().copied())
        .expect("sha256sum did not start at ws1");
    std::thread::sleep(std::time::Duration::from_millis(500));
    migrate_ok(&c, "ws1", pid, "ws2", &[]);
    assert_eq!(
        pids_of(&c, "ws2", "sha256sum").len(),
        1,
        "sha256sum runs at ws2"
    );
    let out = finish_shell(&c, shell);
    assert_eq!(out, "status=0");
    assert_eq!(
        c.sh_ok("ws1", "cat /tmp/sum"),
        want,
        "the sum sha256sum printed at ws2"
    );
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
    std::thread::sleep(std::time::Duration::from_millis(300));
    migrate_ok(&c, "ws1", pid, "ws2", &[]);
    std::thread::sleep(std::time::Duration::from_secs(1));
    assert_eq!(
        pids_of(&c, "ws2", "yes").len(),
        1,
        "yes waits at ws2 while the reader at home waits"
    );
    let out = finish_shell(&c, shell);
    assert_eq!(out, "yes=141\nstatus=0", "yes died of SIGPIPE");
    assert_eq!(c.sh_ok("ws1", "cat /tmp/head"), "y\ny\ny\n");
    let gone = wait_up_to(std::time::Duration::from_secs(10), || {
        pids_of(&c, "ws2", "yes").is_empty().then_some(())
    });
    assert!(gone.is_some(), "yes still runs at ws2");
}
