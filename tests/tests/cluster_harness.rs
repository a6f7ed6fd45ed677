//! The harness itself: nodes are isolated the way the rest of the tests assume, `exec`
//! behaves like a shell, and `down` leaves nothing behind, even after a crash.
//! Needs root.

use std::io::Write;
use std::path::Path;
use std::process::Stdio;

use ferry_tests::{Cluster, Signal};

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).trim().to_owned()
}

/// Live processes whose command line mentions `dir`.
fn processes_mentioning(dir: &Path) -> Vec<(i32, String)> {
    let needle = dir.to_string_lossy().into_owned();
    let me = std::process::id() as i32;
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if pid == me || !ferry_tests::up::alive(pid) {
            continue;
        }
        let cmd = std::fs::read(e.path().join("cmdline"))
            .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
            .unwrap_or_default();
        if cmd.contains(&needle) {
            found.push((pid, cmd));
        }
    }
    found
}

/// Network links of cluster slot `k` still present.
fn links_of_slot(k: u8) -> Vec<String> {
    let mut v = ferry_tests::net::veths_of_slot(k);
    let bridge = ferry_tests::net::bridge_name(k);
    if Path::new("/sys/class/net").join(&bridge).exists() {
        v.push(bridge);
    }
    v
}

fn assert_nothing_left(dir: &Path, k: u8, holders: &[i32]) {
    let procs = processes_mentioning(dir);
    assert!(
        procs.is_empty(),
        "processes of {} left: {procs:?}",
        dir.display()
    );
    let alive: Vec<i32> = holders
        .iter()
        .copied()
        .filter(|p| ferry_tests::up::alive(*p))
        .collect();
    assert!(alive.is_empty(), "node pid 1s still alive: {alive:?}");
    let links = links_of_slot(k);
    // Another test may have claimed the slot again since; only our bridge counts.
    let ours: Vec<&String> = links
        .iter()
        .filter(|l| {
            let alias =
                std::fs::read_to_string(format!("/sys/class/net/{l}/ifalias")).unwrap_or_default();
            alias.trim() == format!("ferry:{}", dir.display()) || !l.starts_with("ferrybr")
        })
        .filter(|l| l.starts_with("ferrybr"))
        .collect();
    assert!(ours.is_empty(), "links of {} left: {ours:?}", dir.display());
    assert!(
        !dir.join("cluster.state").exists(),
        "state file {} left",
        dir.join("cluster.state").display()
    );
}

#[test]
fn each_node_has_its_own_hostname() {
    let c = Cluster::start(3);
    for n in c.nodes() {
        let out = c.run_ok(&n, &["hostname"]);
        assert_eq!(out.trim(), n, "hostname inside node {n}");
    }
}

#[test]
fn pid_1_of_a_node_is_the_holder_and_pids_are_the_nodes_own() {
    let c = Cluster::start(2);
    for n in c.nodes() {
        let cmd = c.run_ok(&n, &["cat", "/proc/1/cmdline"]).replace('\0', " ");
        assert!(
            cmd.contains("node-init") && cmd.contains(&format!("--node {n}")),
            "pid 1 in {n} is {cmd:?}, not the node's holder"
        );
        // A node's /proc shows only the node's processes: the holder, the daemons,
        // and the shell running this.
        let listed = c.sh_ok(&n, "ls /proc | grep -c '^[0-9]'");
        let count: usize = listed.trim().parse().unwrap();
        assert!(
            count < 20,
            "{n}'s /proc lists {count} processes; the host's leaks in"
        );
        let me = c.sh_ok(&n, "echo $$");
        assert_ne!(me.trim(), "1", "a command must not be pid 1 of {n}");
    }
}

#[test]
fn nodes_have_private_tmp() {
    let c = Cluster::start(2);
    c.sh_ok("ws1", "echo ws1-secret > /tmp/private-file");
    let out = c.sh("ws2", "cat /tmp/private-file");
    assert!(
        !out.status.success(),
        "ws2 reads ws1's /tmp/private-file: {:?}",
        text(&out.stdout)
    );
    assert!(
        !Path::new("/tmp/private-file").exists() || {
            std::fs::read_to_string("/tmp/private-file").unwrap_or_default() != "ws1-secret\n"
        },
        "ws1's /tmp leaked onto the host's /tmp"
    );
    let host_side = c.dir().join("ws1/tmp/private-file");
    assert_eq!(
        std::fs::read_to_string(&host_side).unwrap_or_default(),
        "ws1-secret\n",
        "ws1's /tmp is not {}",
        host_side.display()
    );
    let mode = c.sh_ok("ws2", "stat -c %a /tmp");
    assert_eq!(
        mode.trim(),
        "1777",
        "a node's /tmp must be world-writable and sticky"
    );
}

#[test]
fn nodes_ping_each_other_over_the_bridge() {
    let c = Cluster::start(3);
    for from in c.nodes() {
        for to in c.nodes() {
            let addr = c.addr(&to).to_string();
            let out = c.exec(&from, &["ping", "-c", "1", "-W", "5", &addr]);
            assert!(
                out.status.success(),
                "{from} cannot ping {to} ({addr}): {}{}",
                text(&out.stdout),
                text(&out.stderr)
            );
        }
    }
    // Each node has its own network: only lo and eth0, with its own address.
    let links = c.sh_ok(
        "ws2",
        "ls /sys/class/net 2>/dev/null; ip -br addr show dev eth0",
    );
    assert!(
        links.contains(&c.addr("ws2").to_string()),
        "ws2's eth0 lacks its address: {links}"
    );
}

#[test]
fn exec_passes_exit_codes_signals_stdio_and_environment() {
    let c = Cluster::start(1);
    let code = |script: &str| c.sh("ws1", script).status.code();
    assert_eq!(code("exit 0"), Some(0));
    assert_eq!(code("exit 7"), Some(7), "exit 7 must come back as 7");
    assert_eq!(
        code("kill -9 $$"),
        Some(137),
        "death by SIGKILL must be 128+9"
    );
    assert_eq!(
        code("kill -TERM $$"),
        Some(143),
        "death by SIGTERM must be 128+15"
    );
    let missing = c.exec("ws1", &["no-such-command-anywhere"]);
    assert_eq!(missing.status.code(), Some(127), "a missing command is 127");
    assert!(
        text(&missing.stderr).contains("no-such-command-anywhere"),
        "the error names the command: {}",
        text(&missing.stderr)
    );

    // stdin in, stdout and stderr out.
    let mut child = c
        .command("ws1", &["sh", "-c", "tr a-z A-Z; echo to-stderr >&2"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"hello node\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(text(&out.stdout), "HELLO NODE");
    assert_eq!(text(&out.stderr), "to-stderr");

    // cwd is /, Ferry's binaries are on PATH, the node's config is named.
    assert_eq!(c.sh_ok("ws1", "pwd").trim(), "/");
    let which = c.sh_ok("ws1", "command -v cluster");
    assert!(
        which.trim().ends_with("/cluster"),
        "cluster not on PATH: {which}"
    );
    let cfg = c.sh_ok("ws1", "echo $FERRY_CONFIG");
    assert_eq!(Path::new(cfg.trim()), c.config_path("ws1"));
}

#[test]
fn a_signal_to_exec_reaches_the_command_in_the_node() {
    let c = Cluster::start(1);
    let mut child = c
        .command(
            "ws1",
            &[
                "sh",
                "-c",
                "trap 'echo got-term; exit 9' TERM; echo started; while :; do sleep 0.05; done",
            ],
        )
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut first = [0u8; 8];
    std::io::Read::read_exact(&mut stdout, &mut first).unwrap();
    assert_eq!(&first, b"started\n");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        Signal::SIGTERM,
    )
    .unwrap();
    let status = child.wait().unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    assert_eq!(rest.trim(), "got-term", "the command did not see SIGTERM");
    assert_eq!(status.code(), Some(9), "exit status of the trapped command");
}

#[test]
fn down_leaves_nothing_behind_and_is_idempotent() {
    let dir =
        Path::new(ferry_tests::cluster::TEST_ROOT).join(format!("down-{}", std::process::id()));
    let c = Cluster::with(2).dir(&dir).start();
    let k = c.state().index;
    let holders: Vec<i32> = c.nodes().iter().map(|n| c.holder(n)).collect();
    // Something long-running in a node, and something in the background.
    let mut long = c.spawn("ws1", &["sleep", "1000"]);
    c.sh_ok("ws2", "nohup sleep 1000 >/dev/null 2>&1 &");
    let report = c.down().expect("cluster down");
    assert_eq!(report.nodes_stopped, 2, "{report:?}");
    let _ = long.wait();
    assert_nothing_left(&dir, k, &holders);
    // Again: nothing to do, no error.
    let again = ferry_tests::down(&dir).expect("a second down");
    assert_eq!(again.nodes_stopped, 0, "{again:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn down_after_a_crash_cleans_up_by_name() {
    let dir =
        Path::new(ferry_tests::cluster::TEST_ROOT).join(format!("crash-{}", std::process::id()));
    let c = Cluster::with(3).dir(&dir).start();
    let k = c.state().index;
    let holders: Vec<i32> = c.nodes().iter().map(|n| c.holder(n)).collect();
    c.sh_ok("ws3", "nohup sleep 1000 >/dev/null 2>&1 &");
    // The process that ran `up` vanishes without a word, one node dies, and the state
    // file is lost.
    std::mem::forget(c);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(holders[0]), Signal::SIGKILL).unwrap();
    std::fs::remove_file(dir.join("cluster.state")).unwrap();
    assert!(
        !processes_mentioning(&dir).is_empty(),
        "the simulated crash should leave processes to clean"
    );
    // (`down --stale` of a test running alongside may have cleaned it already.)
    ferry_tests::down(&dir).expect("down after a crash");
    assert_nothing_left(&dir, k, &holders);
    // And a new cluster can start in the same directory.
    let c = Cluster::with(1).dir(&dir).start();
    assert_eq!(c.run_ok("ws1", &["hostname"]).trim(), "ws1");
    drop(c);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn clusters_side_by_side_get_their_own_bridge_and_subnet() {
    let a = Cluster::start(1);
    let b = Cluster::start(1);
    assert_ne!(a.state().bridge, b.state().bridge);
    assert_ne!(a.addr("ws1"), b.addr("ws1"));
    // b's node cannot reach a's node: separate bridges.
    let out = b.exec(
        "ws1",
        &["ping", "-c", "1", "-W", "1", &a.addr("ws1").to_string()],
    );
    assert!(
        !out.status.success(),
        "clusters must not see each other's nodes"
    );
}

#[test]
fn the_state_file_records_config_key_and_daemons() {
    let c = Cluster::start(2);
    let key = c.dir().join("cluster.key");
    let meta = std::fs::metadata(&key).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(meta.len(), 32, "cluster.key holds 32 bytes");
    assert_eq!(
        meta.permissions().mode() & 0o777,
        0o600,
        "cluster.key is 0600"
    );
    let ws1 = c.config("ws1");
    assert_eq!(ws1.node, "ws1");
    assert_eq!(ws1.nodes.len(), 2);
    assert!(
        ws1.fs
            .volumes
            .iter()
            .any(|v| v.name == "store" && v.path == c.dir().join("store")),
        "ws1 exports the store: {:?}",
        ws1.fs.volumes
    );
    assert!(
        c.config("ws2").fs.volumes.is_empty(),
        "only ws1 exports the store"
    );
    for n in c.nodes() {
        for d in ferry_tests::daemons::DAEMONS {
            let rec = c.state().node(&n).unwrap().daemon(d.name);
            assert!(rec.is_some(), "{n}: no record of {}", d.name);
        }
    }
}

fn cluster_bin() -> &'static str {
    env!("CARGO_BIN_EXE_cluster")
}

#[test]
fn the_cluster_cli_works_with_a_directory_under_tmp() {
    // The demo's case: DIR under /tmp, which every node replaces with its own.
    let dir = format!("/tmp/ferry-cli-test-{}", std::process::id());
    let run = |args: &[&str]| {
        std::process::Command::new(cluster_bin())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let up = run(&["up", "--nodes", "2", "--dir", &dir]);
    assert!(
        up.status.success(),
        "cluster up failed: {}{}",
        text(&up.stdout),
        text(&up.stderr)
    );
    let said = text(&up.stdout);
    assert!(said.contains("cluster up: 2 nodes"), "up said: {said}");
    // The cluster directory and its configs are visible inside the node at their path.
    let cfg = run(&[
        "exec",
        "--dir",
        &dir,
        "ws2",
        "--",
        "sh",
        "-c",
        "cat $FERRY_CONFIG",
    ]);
    assert!(
        text(&cfg.stdout).contains("node = \"ws2\""),
        "ws2 cannot read its config under /tmp: {}",
        text(&cfg.stderr)
    );
    let status = run(&["status", "--dir", &dir]);
    assert!(
        text(&status.stdout).contains("ferrybr"),
        "status: {}",
        text(&status.stdout)
    );
    let state = ferry_tests::ClusterState::load(Path::new(&dir)).unwrap();
    let holders: Vec<i32> = state.nodes.iter().map(|n| n.holder).collect();
    let down = run(&["down", "--dir", &dir]);
    assert!(down.status.success(), "down: {}", text(&down.stderr));
    assert_nothing_left(Path::new(&dir), state.index, &holders);
    let again = run(&["down", "--dir", &dir]);
    assert!(
        again.status.success(),
        "a second down fails: {}",
        text(&again.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn down_stale_cleans_a_test_cluster_whose_state_is_gone() {
    let dir =
        Path::new(ferry_tests::cluster::TEST_ROOT).join(format!("stale-{}", std::process::id()));
    let c = Cluster::with(1).dir(&dir).start();
    let k = c.state().index;
    let holders = vec![c.holder("ws1")];
    std::mem::forget(c);
    std::fs::remove_file(dir.join("cluster.state")).unwrap();
    let out = std::process::Command::new(cluster_bin())
        .args(["down", "--stale"])
        .output()
        .unwrap();
    assert!(out.status.success(), "down --stale: {}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains(&*dir.to_string_lossy()),
        "down --stale did not name {}: {}",
        dir.display(),
        text(&out.stdout)
    );
    assert_nothing_left(&dir, k, &holders);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A directory of stand-in daemons (shell scripts) next to the real `cluster`.
fn fake_bin(name: &str, daemons: &[(&str, &str)]) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let dir = Path::new(ferry_tests::cluster::TEST_ROOT)
        .join(format!("{name}-bin-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::os::unix::fs::symlink(cluster_bin(), dir.join("cluster")).unwrap();
    for (daemon, script) in daemons {
        let p = dir.join(daemon);
        std::fs::write(&p, format!("#!/bin/sh\n{script}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    dir
}

const LISTEN_7101: &str = "exec python3 -c 'import socket, time; s = socket.socket(); s.bind((\"0.0.0.0\", 7101)); s.listen(); time.sleep(1e6)'";
const MOUNT_SUPERROOT: &str = "mount -t tmpfs fake-superroot /... && exec sleep 1000000";

#[test]
fn a_required_daemon_that_fails_stops_up_with_its_log_and_leaves_nothing() {
    let bin = fake_bin(
        "failing",
        &[
            (
                "fs-server",
                "echo 'fs-server: cannot listen on 10.99.0.1:7101: simulated failure' >&2; exit 1",
            ),
            ("fuse-client", MOUNT_SUPERROOT),
            ("migd", "exec sleep 1000000"),
            ("home-proxy", "exec sleep 1000000"),
        ],
    );
    let dir =
        Path::new(ferry_tests::cluster::TEST_ROOT).join(format!("failing-{}", std::process::id()));
    let err = match Cluster::with(2).dir(&dir).bin_dir(&bin).up() {
        Ok(_) => panic!("up succeeded although fs-server fails"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("fs-server")
            && err.contains("simulated failure")
            && err.contains("fs-server.log"),
        "the error must name the daemon, its log and its last words: {err}"
    );
    let holders: Vec<i32> = Vec::new();
    let k = 0; // the slot is gone with the bridge; links of this dir are checked by alias
    assert_nothing_left(&dir, k, &holders);
    assert!(
        ferry_tests::net::ferry_bridges()
            .iter()
            .all(|(_, d)| Path::new(d) != dir),
        "a bridge of the failed cluster is left"
    );
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&bin);
}

#[test]
fn optional_stub_daemons_are_tolerated_and_reported() {
    let bin = fake_bin(
        "stubs",
        &[
            ("fs-server", LISTEN_7101),
            ("fuse-client", MOUNT_SUPERROOT),
            ("migd", "echo 'migd is not implemented yet' >&2; exit 2"),
            (
                "home-proxy",
                "echo 'home-proxy: not implemented yet; idling' >&2; exec sleep 1000000",
            ),
        ],
    );
    let c = Cluster::with(2).bin_dir(&bin).start();
    for n in c.nodes() {
        assert!(c.has_daemon(&n, "fs-server"), "{n}: fs-server should run");
        assert!(
            c.has_daemon(&n, "fuse-client"),
            "{n}: fuse-client should run"
        );
        assert!(
            !c.has_daemon(&n, "migd"),
            "{n}: a stub migd counts as absent"
        );
        assert!(
            !c.has_daemon(&n, "home-proxy"),
            "{n}: an idle stub counts as absent"
        );
        let rec = c.state().node(&n).unwrap().daemon("migd").unwrap().clone();
        assert_eq!(
            rec.absent.as_deref(),
            Some("not implemented yet"),
            "{n}: {rec:?}"
        );
        let mounted = c.sh_ok(&n, "grep -c ' /\\.\\.\\. ' /proc/self/mountinfo");
        assert_eq!(
            mounted.trim(),
            "1",
            "{n}: /... is mounted in the node only once"
        );
    }
    assert!(
        !std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .contains(" /... "),
        "a node's /... mount leaked into the host"
    );
    let idle = c
        .state()
        .node("ws1")
        .unwrap()
        .daemon("home-proxy")
        .unwrap()
        .pid;
    drop(c);
    if let Some(p) = idle {
        assert!(
            !ferry_tests::up::alive(p),
            "down left the idle stub home-proxy running"
        );
    }
    let _ = std::fs::remove_dir_all(&bin);
}

#[test]
fn exec_on_a_dead_node_or_an_unknown_node_says_so() {
    let c = Cluster::start(2);
    let unknown = c.exec("ws9", &["true"]);
    assert_eq!(unknown.status.code(), Some(125));
    let msg = text(&unknown.stderr);
    assert!(
        msg.contains("ws9") && msg.contains("ws1, ws2"),
        "unknown node: {msg}"
    );
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.holder("ws1")), Signal::SIGKILL).unwrap();
    for _ in 0..500 {
        if !ferry_tests::up::alive(c.holder("ws1")) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let dead = c.exec("ws1", &["true"]);
    assert_eq!(dead.status.code(), Some(125), "exec on a dead node");
    let msg = text(&dead.stderr);
    assert!(msg.contains("ws1 is not running"), "dead node: {msg}");
    // The other node is unaffected.
    assert_eq!(c.run_ok("ws2", &["hostname"]).trim(), "ws2");
}
