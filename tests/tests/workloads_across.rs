//! Programs nobody here wrote (python3 with threads, perl, bash, sha256sum, sort,
//! xz -T2, bc) and a C program with four threads, started at ws1 with their output
//! in ws1's /tmp, moved to ws2 mid-run, then to ws3, then home: the output must be
//! byte-identical to an unmigrated run's and the shell at ws1 must see them exit 0.
//! Needs root and the workspace's binaries built (`cargo build --release --workspace`).

use ferry_tests::work::{
    finish_shell, images_left, migrate_ok, newest_pid, pids_of, spawn_shell, wait_for,
};
use ferry_tests::Cluster;
use std::sync::Mutex;
use std::time::Duration;

/// One 3-node cluster at a time: they are heavy for a small machine.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// A workload: `files` are written into ws1's /tmp/w, `setup` then runs there (to
/// make inputs), and `cmd` runs there with its stdout redirected to a file; `comm`
/// names its process. Sizes are chosen so that each runs for several seconds here:
/// long enough for three moves.
struct Work {
    comm: &'static str,
    files: Vec<(&'static str, Vec<u8>)>,
    setup: &'static str,
    cmd: &'static str,
}

/// Four worker threads with a mutex and a condition variable (shared with the
/// engine tests; N items, compiled with -DN=4000 here).
const THREADS_C: &str = include_str!("../programs/threads.c");

/// Two python threads (shared with the engine tests; N from argv).
const PY_THREADS: &str = include_str!("../programs/two_threads.py");

/// Runs `w` at ws1 once unmigrated and once moved ws1 -> ws2 -> ws3 -> home, and
/// compares.
fn across(w: Work) {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let c = Cluster::start(3);
    c.require(&["fs-server", "fuse-client", "migd", "home-proxy"]);
    // ws1's /tmp is DIR/ws1/tmp on this side.
    let wdir = c.dir().join("ws1/tmp/w");
    std::fs::create_dir_all(&wdir).unwrap();
    for (name, data) in &w.files {
        std::fs::write(wdir.join(name), data).unwrap();
    }
    c.sh_ok("ws1", &format!("cd /tmp/w && chmod -R +x . && {}", w.setup));
    c.sh_ok("ws1", &format!("cd /tmp/w && {} > ref.out", w.cmd));

    let child = spawn_shell(&c, "ws1", &format!("cd /tmp/w && {} > mig.out", w.cmd));
    let pid = wait_for(|| newest_pid(&c, "ws1", w.comm))
        .unwrap_or_else(|| panic!("{} did not start at ws1\n{}", w.comm, c.logs("ws1", 10)));
    std::thread::sleep(Duration::from_millis(700));
    for (dest, node) in [("ws2", "ws2"), ("ws3", "ws3"), ("home", "ws1")] {
        let said = migrate_ok(&c, "ws1", pid, dest, &[]);
        assert!(
            said.contains(&format!("runs on {node}")),
            "{}: migrate {pid} {dest} said: {said}",
            w.comm
        );
        if node != "ws1" {
            assert_eq!(
                pids_of(&c, node, w.comm).len(),
                1,
                "{} is not running at {node} after the move",
                w.comm
            );
        }
        std::thread::sleep(Duration::from_millis(400));
    }
    let shell = finish_shell(&c, child);
    assert_eq!(
        shell, "status=0",
        "{}: the shell at ws1 should see the program's own exit status",
        w.comm
    );
    for node in ["ws2", "ws3"] {
        assert!(
            pids_of(&c, node, w.comm).is_empty(),
            "{} still runs at {node} after it ended",
            w.comm
        );
    }
    let same = c.sh("ws1", "cmp /tmp/w/ref.out /tmp/w/mig.out");
    assert!(
        same.status.success(),
        "{}: the migrated run's output differs from the unmigrated run's: {}{}",
        w.comm,
        String::from_utf8_lossy(&same.stdout),
        String::from_utf8_lossy(&same.stderr)
    );
    let size = c.sh_ok("ws1", "stat -c %s /tmp/w/mig.out");
    assert_ne!(size.trim(), "0", "{}: empty output", w.comm);
    assert!(images_left(&c).is_empty(), "images left in the store");
}

fn compile(src: &str, flags: &[&str]) -> Vec<u8> {
    let dir = std::env::temp_dir().join(format!("ferry-wa-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("p.c"), src).unwrap();
    let out = std::process::Command::new("cc")
        .arg("-O1")
        .args(flags)
        .arg("-o")
        .arg(dir.join("p"))
        .arg(dir.join("p.c"))
        .output()
        .expect("cc runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bin = std::fs::read(dir.join("p")).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    bin
}

#[test]
fn a_c_program_with_four_threads_moves_ws1_ws2_ws3_and_home() {
    across(Work {
        comm: "threads",
        files: vec![("threads", compile(THREADS_C, &["-pthread", "-DN=4000"]))],
        setup: "true",
        cmd: "./threads",
    });
}

#[test]
fn python3_with_two_threads_moves_ws1_ws2_ws3_and_home() {
    across(Work {
        comm: "python3",
        files: vec![("two.py", PY_THREADS.into())],
        setup: "true",
        cmd: "python3 two.py 20000000",
    });
}

#[test]
fn perl_moves_ws1_ws2_ws3_and_home() {
    across(Work {
        comm: "perl",
        files: vec![(
            "p.pl",
            br#"$| = 1; my $s = 0; for my $i (0..150000000) { $s = ($s * 31 + $i) % 1000003; print "$i $s\n" if $i % 10000 == 0 }"#.to_vec(),
        )],
        setup: "true",
        cmd: "perl p.pl",
    });
}

#[test]
fn bash_moves_ws1_ws2_ws3_and_home() {
    across(Work {
        comm: "bash",
        files: vec![(
            "loop.sh",
            b"i=0; s=0; while [ $i -lt 1200000 ]; do s=$(( (s*31+i) % 1000003 )); if [ $((i%1000)) = 0 ]; then echo $i $s; fi; i=$((i+1)); done\n".to_vec(),
        )],
        setup: "true",
        cmd: "bash loop.sh",
    });
}

#[test]
fn sha256sum_of_2_gib_moves_ws1_ws2_ws3_and_home() {
    across(Work {
        comm: "sha256sum",
        files: vec![],
        setup: "head -c 2G /dev/urandom > big",
        cmd: "sha256sum big",
    });
}

#[test]
fn sort_moves_ws1_ws2_ws3_and_home() {
    across(Work {
        comm: "sort",
        files: vec![],
        setup: "head -c 240M /dev/urandom | base64 > in.txt",
        cmd: "sort -S 32M --parallel=2 -T /tmp/w in.txt",
    });
}

#[test]
fn xz_with_two_threads_moves_ws1_ws2_ws3_and_home() {
    across(Work {
        comm: "xz",
        files: vec![],
        setup: "head -c 45M /dev/urandom | base64 > in.txt",
        cmd: "xz -T2 -3 -c in.txt",
    });
}

#[test]
fn bc_computing_pi_moves_ws1_ws2_ws3_and_home() {
    across(Work {
        comm: "bc",
        files: vec![("pi.bc", b"scale=4500; 4*a(1)\n".to_vec())],
        setup: "true",
        cmd: "bc -l pi.bc",
    });
}
