//! Engine behaviours beyond "a workload runs on": file mappings, --leave-running,
//! refusals that leave the process untouched, corrupt images, a 2 GiB process, pids.

mod common;
use common::*;
use std::process::Command;

const FMAP_C: &str = r#"
#include <stdio.h>
#include <stdint.h>
#include <fcntl.h>
#include <unistd.h>
#include <sys/mman.h>
#define SZ (8 << 20)
int main(void) {
    int fs = open("shared.dat", O_RDWR | O_CREAT | O_TRUNC, 0644);
    if (ftruncate(fs, SZ)) return 1;
    int fp = open("private.dat", O_RDONLY);
    uint8_t *sh = mmap(0, SZ, PROT_READ | PROT_WRITE, MAP_SHARED, fs, 0);
    uint8_t *pr = mmap(0, SZ, PROT_READ | PROT_WRITE, MAP_PRIVATE, fp, 0);
    if (sh == MAP_FAILED || pr == MAP_FAILED) return 2;
    close(fs); close(fp);
    uint64_t x = 88172645463325252ull;
    for (int round = 0; round < 400; round++) {
        for (int k = 0; k < 2000; k++) {
            x ^= x << 13; x ^= x >> 7; x ^= x << 17;
            sh[x % SZ] = (uint8_t)x;
            pr[(x >> 20) % SZ] ^= (uint8_t)(x >> 8);
        }
        uint64_t a = 0, b = 0;
        for (int i = 0; i < SZ; i += 4096) { a = a * 31 + sh[i] + sh[i + 17]; b = b * 37 + pr[i] + pr[i + 99]; }
        printf("%d %016llx %016llx\n", round, (unsigned long long)a, (unsigned long long)b);
        usleep(5000);
    }
    msync(sh, SZ, MS_SYNC);
    uint64_t a = 0;
    for (int i = 0; i < SZ; i++) a = a * 131 + sh[i];
    printf("final %016llx\n", (unsigned long long)a);
    return 0;
}
"#;

#[test]
fn c_program_writing_private_and_shared_file_mappings_survives_three_dumps() {
    let dir = tempdir();
    let exe = compile_c(dir.path(), "fmap", FMAP_C, &[]);
    gen_binary(&dir.path().join("private.dat"), 8 << 20, 3);
    let w = Workload::new(dir.path(), &[exe.to_str().unwrap()]);
    check_workload("C file mappings", &w, &[ms(400), ms(400), ms(400)]);
}

const TICKER_C: &str = r#"
#include <stdio.h>
#include <stdint.h>
#include <unistd.h>
int main(void) {
    uint64_t h = 1;
    for (int i = 0; i < 400; i++) {
        for (int k = 0; k < 100000; k++) h = h * 6364136223846793005ull + 1442695040888963407ull;
        printf("%d %016llx\n", i, (unsigned long long)h);
        fflush(stdout);
        usleep(5000);
    }
    return 0;
}
"#;

#[test]
fn leave_running_dumps_leave_the_process_running_with_identical_output() {
    let dir = tempdir();
    let exe = compile_c(dir.path(), "ticker", TICKER_C, &[]);
    let w = Workload::new(dir.path(), &[exe.to_str().unwrap()]);
    let reference = w.reference(&dir.path().join("ref.out"));
    let out = dir.path().join("run.out");
    let mut child = Command::new(&exe)
        .stdout(std::fs::File::create(&out).unwrap())
        .spawn()
        .unwrap();
    for i in 0..3 {
        std::thread::sleep(ms(300));
        let o = Command::new(migd())
            .args([
                "dump",
                "--leave-running",
                "--pid",
                &child.id().to_string(),
                "--images",
            ])
            .arg(dir.path().join(format!("img{i}")))
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "dump --leave-running {i} failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(
            String::from_utf8_lossy(&o.stdout).contains("left running"),
            "dump did not say it left the process running"
        );
    }
    let st = child.wait().unwrap();
    assert!(
        st.success(),
        "the process did not finish cleanly after --leave-running dumps: {st}"
    );
    assert_same_output("--leave-running", &reference, &std::fs::read(&out).unwrap());
}

const TCP_PY: &str = r#"
import socket, sys, time
s = socket.socket()
s.bind(("127.0.0.1", 0))
s.listen(1)
for i in range(60):
    print(i, i * i, flush=True)
    time.sleep(0.02)
"#;

#[test]
fn process_with_tcp_socket_is_refused_naming_the_fd_and_keeps_running() {
    let dir = tempdir();
    std::fs::write(dir.path().join("tcp.py"), TCP_PY).unwrap();
    let w = Workload::new(dir.path(), &["/usr/bin/python3", "tcp.py"]);
    let reference = w.reference(&dir.path().join("ref.out"));
    let out = dir.path().join("run.out");
    let mut child = Command::new("/usr/bin/python3")
        .arg("tcp.py")
        .current_dir(dir.path())
        .stdout(std::fs::File::create(&out).unwrap())
        .spawn()
        .unwrap();
    std::thread::sleep(ms(300));
    let o = Command::new(migd())
        .args(["dump", "--pid", &child.id().to_string(), "--images"])
        .arg(dir.path().join("img"))
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success(),
        "dump of a process with a TCP socket succeeded"
    );
    assert!(
        err.contains("fd 3: TCP socket"),
        "refusal does not name the fd and its kind: {err}"
    );
    assert!(
        err.contains("left running untouched"),
        "refusal does not say the process was left alone: {err}"
    );
    let st = child.wait().unwrap();
    assert!(st.success(), "refused process did not finish cleanly: {st}");
    assert_same_output(
        "refused TCP process",
        &reference,
        &std::fs::read(&out).unwrap(),
    );
}

fn dump_ticker(dir: &std::path::Path) -> std::path::PathBuf {
    let exe = compile_c(dir, "ticker", TICKER_C, &[]);
    let mut child = Command::new(&exe)
        .stdout(std::fs::File::create(dir.join("o")).unwrap())
        .spawn()
        .unwrap();
    std::thread::sleep(ms(200));
    let img = dir.join("img");
    dump_ok(&child.id().to_string(), &img, "dump failed");
    let _ = child.wait();
    img
}

fn restore_fails(img: &std::path::Path) -> String {
    let o = Command::new(migd())
        .args(["restore", "--images"])
        .arg(img)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    assert!(!o.status.success(), "restore of a damaged image succeeded");
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn corrupt_page_data_is_refused_before_anything_is_built() {
    let dir = tempdir();
    let img = dump_ticker(dir.path());
    let pages = img.join("pages.img");
    let mut data = std::fs::read(&pages).unwrap();
    let mid = data.len() / 2;
    data[mid] ^= 0x55;
    std::fs::write(&pages, data).unwrap();
    let err = restore_fails(&img);
    assert!(
        err.contains("checksum mismatch in page chunk"),
        "corrupt pages not reported as such: {err}"
    );
    assert!(
        !err.contains("restored pid"),
        "a process was started: {err}"
    );
}

#[test]
fn truncated_manifest_and_pages_are_refused() {
    let dir = tempdir();
    let img = dump_ticker(dir.path());
    let pages = img.join("pages.img");
    let data = std::fs::read(&pages).unwrap();
    std::fs::write(&pages, &data[..data.len() - 100]).unwrap();
    let err = restore_fails(&img);
    assert!(
        err.contains("truncated"),
        "truncated pages not reported: {err}"
    );
    std::fs::write(&pages, &data).unwrap();
    let man = img.join("manifest.json");
    let m = std::fs::read(&man).unwrap();
    std::fs::write(&man, &m[..m.len() - 10]).unwrap();
    let err = restore_fails(&img);
    assert!(
        err.contains("truncated"),
        "truncated manifest not reported: {err}"
    );
}

#[test]
fn a_manifest_handed_over_is_checked_like_the_file_and_needs_no_file() {
    use migd::engine::image;
    let dir = tempdir();
    let img = dump_ticker(dir.path());
    let man = img.join("manifest.json");
    let bytes = std::fs::read(&man).unwrap();
    let from_file = image::read_manifest(&img).unwrap();
    // What a destination is handed is used even when the store's copy is gone.
    std::fs::remove_file(&man).unwrap();
    let given = image::manifest_from(&img, Some(&bytes)).unwrap();
    assert_eq!(given.pid, from_file.pid);
    assert_eq!(given.areas.len(), from_file.areas.len());
    assert!(
        image::manifest_from(&img, None).is_err(),
        "no file, nothing given: no manifest"
    );
    // A damaged handover is refused, naming the checksum or the length.
    let mut bad = bytes.clone();
    let last = bad.len() - 2;
    bad[last] ^= 0x01;
    let err = image::manifest_from(&img, Some(&bad))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("manifest"),
        "damaged manifest not named: {err}"
    );
    let err = image::manifest_from(&img, Some(&bytes[..bytes.len() - 10]))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("truncated"),
        "short manifest not reported: {err}"
    );
}

const BIG_C: &str = r#"
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <unistd.h>
#include <time.h>
int main(void) {
    size_t n = (size_t)2 << 30;
    uint64_t *p = malloc(n);
    if (!p) return 1;
    for (size_t i = 0; i < n / 8; i++) p[i] = i * 0x9E3779B97F4A7C15ull;
    printf("filled\n");
    fflush(stdout);
    struct timespec t0, t;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    do { usleep(20000); clock_gettime(CLOCK_MONOTONIC, &t); } while (t.tv_sec - t0.tv_sec < 4);
    uint64_t h = 0;
    for (size_t i = 0; i < n / 8; i++) h = h * 31 + p[i];
    printf("sum %016llx pid-ok %d\n", (unsigned long long)h, 1);
    return 0;
}
"#;

#[test]
fn process_with_2gib_rss_is_dumped_and_restored_correctly() {
    let dir = tempdir();
    let exe = compile_c(dir.path(), "big", BIG_C, &[]);
    let w = Workload::new(dir.path(), &[exe.to_str().unwrap()]);
    let reference = w.reference(&dir.path().join("ref.out"));
    let out = dir.path().join("run.out");
    let mut child = Command::new(&exe)
        .stdout(std::fs::File::create(&out).unwrap())
        .spawn()
        .unwrap();
    while !std::fs::read_to_string(&out).unwrap().contains("filled") {
        std::thread::sleep(ms(50));
    }
    let img = dir.path().join("img");
    dump_ok(
        &child.id().to_string(),
        &img,
        "dump of the 2 GiB process failed",
    );
    let _ = child.wait();
    let pages = std::fs::metadata(img.join("pages.img")).unwrap().len();
    assert!(
        pages >= 2 << 30,
        "image holds only {pages} bytes of pages for a 2 GiB process"
    );
    let (r, _) = start_restore(&img);
    let o = r.wait_with_output().unwrap();
    assert!(
        o.status.success(),
        "restored 2 GiB process failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_same_output("2 GiB process", &reference, &std::fs::read(&out).unwrap());
}

const PID_C: &str = r#"
#include <stdio.h>
#include <unistd.h>
#include <sys/syscall.h>
int main(void) {
    pid_t p = getpid(), t = (pid_t)syscall(SYS_gettid);
    for (int i = 0; i < 300; i++) {
        usleep(10000);
        if (getpid() != p || syscall(SYS_gettid) != t) { printf("pid changed at %d\n", i); return 1; }
    }
    printf("same pid\n");
    return 0;
}
"#;

#[test]
fn restored_process_keeps_its_pid_and_tid() {
    let dir = tempdir();
    let exe = compile_c(dir.path(), "pid", PID_C, &[]);
    let w = Workload::new(dir.path(), &[exe.to_str().unwrap()]);
    check_workload("pid check", &w, &[ms(300), ms(300), ms(300)]);
}

#[test]
fn process_with_a_child_is_refused_and_keeps_running() {
    let dir = tempdir();
    let out = dir.path().join("o");
    let mut child = Command::new("/bin/bash")
        .args(["-c", "sleep 1; echo finished"])
        .stdout(std::fs::File::create(&out).unwrap())
        .spawn()
        .unwrap();
    std::thread::sleep(ms(200));
    let o = Command::new(migd())
        .args(["dump", "--pid", &child.id().to_string(), "--images"])
        .arg(dir.path().join("img"))
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("child processes"),
        "a process with a child was not refused: {err}"
    );
    assert!(
        child.wait().unwrap().success(),
        "refused process did not finish cleanly"
    );
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        "finished\n",
        "refused process output differs"
    );
}

#[test]
fn job_control_stopped_process_is_stopped_again_after_restore() {
    let dir = tempdir();
    let exe = compile_c(dir.path(), "ticker", TICKER_C, &[]);
    let w = Workload::new(dir.path(), &[exe.to_str().unwrap()]);
    let reference = w.reference(&dir.path().join("ref.out"));
    let out = dir.path().join("run.out");
    let mut child = Command::new(&exe)
        .stdout(std::fs::File::create(&out).unwrap())
        .spawn()
        .unwrap();
    std::thread::sleep(ms(300));
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .unwrap()
        .success());
    while !std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .contains("State:\tT")
    {
        std::thread::sleep(ms(10));
    }
    let img = dir.path().join("img");
    dump_ok(&pid, &img, "dump of a stopped process failed");
    let _ = child.wait();
    let (r, new_pid) = start_restore(&img);
    let status = format!("/proc/{new_pid}/status");
    // The stop is sent right after the process is let go; wait until it shows.
    let mut state = String::new();
    for _ in 0..200 {
        state = std::fs::read_to_string(&status).unwrap();
        if state.contains("State:\tT") {
            break;
        }
        std::thread::sleep(ms(10));
    }
    assert!(
        state.contains("State:\tT"),
        "restored process is not stopped: {}",
        state.lines().find(|l| l.starts_with("State")).unwrap_or("")
    );
    assert!(Command::new("kill")
        .args(["-CONT", &new_pid.to_string()])
        .status()
        .unwrap()
        .success());
    let o = r.wait_with_output().unwrap();
    assert!(
        o.status.success(),
        "restored process failed after SIGCONT: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_same_output("stopped process", &reference, &std::fs::read(&out).unwrap());
}

#[test]
fn process_of_an_ordinary_user_keeps_its_credentials_and_output() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let dir = tempdir();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let exe = compile_c(dir.path(), "ticker", TICKER_C, &[]);
    let w = Workload::new(dir.path(), &[exe.to_str().unwrap()]);
    let reference = w.reference(&dir.path().join("ref.out"));
    let out = dir.path().join("run.out");
    let mut child = Command::new(&exe)
        .uid(1000)
        .gid(1000)
        .stdout(std::fs::File::create(&out).unwrap())
        .spawn()
        .unwrap();
    std::thread::sleep(ms(300));
    let img = dir.path().join("img");
    dump_ok(
        &child.id().to_string(),
        &img,
        "dump of a uid-1000 process failed",
    );
    let _ = child.wait();
    let (r, new_pid) = start_restore(&img);
    let status = std::fs::read_to_string(format!("/proc/{new_pid}/status")).unwrap_or_default();
    let uid = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .unwrap_or("")
        .to_string();
    let o = r.wait_with_output().unwrap();
    assert!(
        o.status.success(),
        "restored uid-1000 process failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(
        uid.split_whitespace().skip(1).collect::<Vec<_>>(),
        ["1000"; 4],
        "restored process has other uids: {uid}"
    );
    assert_same_output(
        "uid-1000 process",
        &reference,
        &std::fs::read(&out).unwrap(),
    );
}

const PRCTL_C: &str = r#"
#include <stdio.h>
#include <signal.h>
#include <unistd.h>
#include <sys/prctl.h>
#include <sys/stat.h>
int main(void) {
    prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
    prctl(PR_SET_PDEATHSIG, SIGUSR1);
    prctl(PR_SET_CHILD_SUBREAPER, 1);
    prctl(PR_SET_NAME, "renamed");
    umask(027);
    for (int i = 0; i < 300; i++) usleep(10000);
    int pd = 0, sr = 0;
    char name[16] = {0};
    prctl(PR_GET_PDEATHSIG, &pd);
    prctl(PR_GET_CHILD_SUBREAPER, &sr);
    prctl(PR_GET_NAME, name);
    mode_t um = umask(0);
    printf("nnp=%d pdeath=%d subreaper=%d name=%s umask=%03o\n", prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0), pd, sr, name, um);
    return 0;
}
"#;

#[test]
fn prctl_attributes_name_and_umask_survive_three_dumps() {
    let dir = tempdir();
    let exe = compile_c(dir.path(), "prctl", PRCTL_C, &[]);
    let w = Workload::new(dir.path(), &[exe.to_str().unwrap()]);
    check_workload("prctl attributes", &w, &[ms(400), ms(500), ms(500)]);
}

const SLEEPER_C: &str = r#"
#include <stdio.h>
#include <signal.h>
#include <unistd.h>
static volatile int got;
static void h(int s) { got = s; }
int main(void) { signal(SIGTERM, h); for (int i = 0; i < 3000 && !got; i++) usleep(10000); printf("got %d\n", got); return got ? 3 : 0; }
"#;

#[test]
fn signals_to_a_waiting_restore_reach_the_process_and_its_status_comes_back() {
    let dir = tempdir();
    let exe = compile_c(dir.path(), "sleeper", SLEEPER_C, &[]);
    let out = dir.path().join("o");
    let mut child = Command::new(&exe)
        .stdout(std::fs::File::create(&out).unwrap())
        .spawn()
        .unwrap();
    std::thread::sleep(ms(200));
    let img = dir.path().join("img");
    dump_ok(&child.id().to_string(), &img, "dump failed");
    let _ = child.wait();
    let (r, _) = start_restore(&img);
    assert!(Command::new("kill")
        .args(["-TERM", &r.id().to_string()])
        .status()
        .unwrap()
        .success());
    let o = r.wait_with_output().unwrap();
    assert_eq!(
        o.status.code(),
        Some(3),
        "migd restore did not exit with the process's status: {}",
        o.status
    );
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        "got 15\n",
        "the process did not get SIGTERM"
    );
}

const CHROOTED_C: &str = r#"
#include <stdio.h>
#include <unistd.h>
int main(int argc, char **argv) {
    if (chroot(argv[1]) != 0 || chdir("/inside") != 0) { perror("chroot"); return 2; }
    char cwd[256];
    for (int i = 0; i < 60; i++) {
        if (!getcwd(cwd, sizeof cwd)) cwd[0] = 0;
        printf("%d marker=%d cwd=%s\n", i, access("/marker", F_OK) == 0, cwd);
        fflush(stdout);
        usleep(20000);
    }
    return 0;
}
"#;

#[test]
fn chrooted_process_keeps_its_root_and_cwd_across_three_dumps() {
    let dir = tempdir();
    // Static, so that it runs inside a jail with no libraries.
    let exe = compile_c(dir.path(), "chrooted", CHROOTED_C, &["-static"]);
    let jail = dir.path().join("jail");
    std::fs::create_dir_all(jail.join("inside")).unwrap();
    std::fs::write(jail.join("marker"), b"").unwrap();
    let w = Workload::new(dir.path(), &[exe.to_str().unwrap(), jail.to_str().unwrap()]);
    let out = dir.path().join("ref.out");
    let reference = w.reference(&out);
    assert!(
        String::from_utf8_lossy(&reference).contains("59 marker=1 cwd=/inside"),
        "the reference run did not see its jail: {}",
        String::from_utf8_lossy(&reference)
    );
    let got = w.migrated(
        &dir.path().join("mig.out"),
        &dir.path().join("img"),
        &[ms(300), ms(300), ms(300)],
    );
    assert_same_output("chrooted process", &reference, &got);
}

const THREAD_CREDS_C: &str = r#"
#include <pthread.h>
#include <stdio.h>
#include <sys/syscall.h>
#include <unistd.h>
static volatile long ids[6];
static volatile int stop;
static void *worker(void *arg) {
    (void)arg;
    while (!stop) {
        uid_t r, e, s; gid_t gr, ge, gs;
        syscall(SYS_getresuid, &r, &e, &s);
        syscall(SYS_getresgid, &gr, &ge, &gs);
        ids[0] = r; ids[1] = e; ids[2] = s; ids[3] = gr; ids[4] = ge; ids[5] = gs;
        usleep(5000);
    }
    return 0;
}
int main(void) {
    pthread_t t;
    pthread_create(&t, 0, worker, 0);
    for (int i = 0; i < 60; i++) {
        usleep(20000);
        uid_t r, e, s;
        syscall(SYS_getresuid, &r, &e, &s);
        printf("%d main uid=%d,%d,%d worker uid=%ld,%ld,%ld gid=%ld,%ld,%ld\n", i, r, e, s,
               ids[0], ids[1], ids[2], ids[3], ids[4], ids[5]);
        fflush(stdout);
    }
    stop = 1;
    pthread_join(t, 0);
    return 0;
}
"#;

#[test]
fn every_thread_of_an_ordinary_users_process_keeps_its_credentials() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempdir();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let exe = compile_c(dir.path(), "thread_creds", THREAD_CREDS_C, &["-pthread"]);
    // setpriv execs the program, so the workload's pid is the program's.
    let w = Workload::new(
        dir.path(),
        &[
            "setpriv",
            "--reuid=1000",
            "--regid=1000",
            "--clear-groups",
            exe.to_str().unwrap(),
        ],
    );
    let reference = w.reference(&dir.path().join("ref.out"));
    assert!(
        String::from_utf8_lossy(&reference)
            .contains("59 main uid=1000,1000,1000 worker uid=1000,1000,1000 gid=1000,1000,1000"),
        "the reference run did not run as uid 1000 in both threads: {}",
        String::from_utf8_lossy(&reference)
    );
    let got = w.migrated(
        &dir.path().join("mig.out"),
        &dir.path().join("img"),
        &[ms(300), ms(300), ms(300)],
    );
    assert_same_output("threads of a uid-1000 process", &reference, &got);
}

const CAPS_C: &str = r#"
#include <stdio.h>
#include <string.h>
#include <unistd.h>
int main(void) {
    char line[256];
    for (int i = 0; i < 50; i++) {
        FILE *f = fopen("/proc/self/status", "r");
        while (fgets(line, sizeof line, f))
            if (strncmp(line, "Cap", 3) == 0) printf("%d %s", i, line);
        fclose(f);
        fflush(stdout);
        usleep(20000);
    }
    return 0;
}
"#;

#[test]
fn a_root_process_keeps_its_reduced_capability_sets() {
    let dir = tempdir();
    let exe = compile_c(dir.path(), "caps", CAPS_C, &[]);
    // setpriv execs the program with CAP_NET_RAW out of its bounding, permitted and
    // effective sets, and CAP_CHOWN in its inheritable set.
    let w = Workload::new(
        dir.path(),
        &[
            "setpriv",
            "--bounding-set=-net_raw",
            "--inh-caps=+chown",
            exe.to_str().unwrap(),
        ],
    );
    let reference = w.reference(&dir.path().join("ref.out"));
    assert!(
        String::from_utf8_lossy(&reference).contains("49 CapInh:\t0000000000000001"),
        "the reference run did not get its inheritable set: {}",
        String::from_utf8_lossy(&reference)
    );
    let got = w.migrated(
        &dir.path().join("mig.out"),
        &dir.path().join("img"),
        &[ms(250), ms(250), ms(250)],
    );
    assert_same_output("capability sets", &reference, &got);
}

#[test]
fn a_process_that_is_not_root_but_holds_capabilities_is_refused_and_keeps_running() {
    let dir = tempdir();
    let mut child = Command::new("setpriv")
        .args([
            "--reuid=1000",
            "--regid=1000",
            "--clear-groups",
            "--inh-caps=+net_raw",
            "--ambient-caps=+net_raw",
            "sleep",
            "30",
        ])
        .spawn()
        .unwrap();
    std::thread::sleep(ms(200));
    let o = Command::new(migd())
        .args(["dump", "--pid", &child.id().to_string(), "--images"])
        .arg(dir.path().join("img"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success(),
        "dump of a capable uid-1000 process succeeded"
    );
    assert!(
        err.contains("capabilities"),
        "the refusal should name the capabilities: {err}"
    );
    assert!(
        child.try_wait().unwrap().is_none(),
        "the refused process must keep running"
    );
    let _ = child.kill();
    let _ = child.wait();
}
