//! Pre-copy dumps (engine::track): real processes dumped while they run, in rounds,
//! then restored by today's `migd restore`; the restored process checks its own
//! memory, and its output must equal an uninterrupted run's.

mod common;
use common::*;
use migd::engine::dump::DumpError;
use migd::engine::handoff::dump_frozen_precopy;
use migd::engine::track::{PrecopyOptions, RoundReport, Tracker};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The tests move hundreds of MiB on a small machine: one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Rewrites random pages of a 256 MiB buffer (`argv[2]` pages every ~1 ms, for
/// `argv[1]` steps), each time first checking that the page still holds what it last
/// wrote there; prints running checksums, and at the end checks every page.
const REWRITER_C: &str = r#"
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <unistd.h>
#define NP 65536
#define PW 512
static uint64_t pat(uint64_t p, uint64_t g, uint64_t i) {
    uint64_t x = (p * 0x9E3779B97F4A7C15ull) ^ (g * 0xC2B2AE3D27D4EB4Full) ^ (i * 0x165667B19E3779F9ull);
    x ^= x >> 29;
    return x;
}
int main(int argc, char **argv) {
    long steps = atol(argv[1]);
    int per = atoi(argv[2]);
    uint64_t *buf = malloc((size_t)NP * 4096);
    uint32_t *gen = calloc(NP, sizeof *gen);
    for (uint64_t p = 0; p < NP; p++)
        for (uint64_t i = 0; i < PW; i++) buf[p * PW + i] = pat(p, 0, i);
    printf("ready\n"); fflush(stdout);
    uint64_t rng = 88172645463325252ull, sum = 0;
    for (long s = 0; s < steps; s++) {
        for (int k = 0; k < per; k++) {
            rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17;
            uint64_t p = rng % NP;
            uint64_t *pg = buf + p * PW;
            for (uint64_t i = 0; i < PW; i++)
                if (pg[i] != pat(p, gen[p], i)) {
                    printf("MISMATCH step %ld page %llu word %llu\n", s, (unsigned long long)p, (unsigned long long)i);
                    fflush(stdout);
                    return 1;
                }
            sum = sum * 31 + pg[7];
            gen[p]++;
            for (uint64_t i = 0; i < PW; i++) pg[i] = pat(p, gen[p], i);
        }
        if (s % 100 == 0) { printf("step %ld sum %016llx\n", s, (unsigned long long)sum); fflush(stdout); }
        usleep(1000);
    }
    for (uint64_t p = 0; p < NP; p++)
        for (uint64_t i = 0; i < PW; i++)
            if (buf[p * PW + i] != pat(p, gen[p], i)) {
                printf("FINAL MISMATCH page %llu\n", (unsigned long long)p);
                return 1;
            }
    printf("done sum %016llx\n", (unsigned long long)sum);
    return 0;
}
"#;

/// Spawns `argv` with stdout to `out`, stderr discarded.
fn spawn(cwd: &Path, argv: &[&str], out: &Path) -> Child {
    Command::new(argv[0])
        .args(&argv[1..])
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(out).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {argv:?}: {e}"))
}

/// Waits (up to 30 s) until `out` holds a line equal to `line`.
fn wait_line(out: &Path, line: &str) {
    let t = Instant::now();
    loop {
        let text = std::fs::read_to_string(out).unwrap_or_default();
        if text.lines().any(|l| l == line) {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "waited 30 s for {line:?} in {}; it holds: {text}",
            out.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Restores `images` with `migd restore` and waits for the process to end cleanly.
fn restore_and_wait(images: &Path, what: &str) {
    let (r, _) = start_restore(images);
    let o = r.wait_with_output().unwrap();
    assert!(
        o.status.success(),
        "{what}: the restored process did not exit cleanly: {} ({})",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
}

/// `(round, pages, bytes)` of a `precopy round` line.
type Round = (u32, u64, u64);

/// `(round, pages, bytes)` of each `precopy round` line and `(pages, bytes)` of the
/// `precopy freeze` line of `migd dump --precopy`'s output.
fn parse_rounds(stdout: &str) -> (Vec<Round>, (u64, u64)) {
    let num = |s: &str| -> u64 {
        s.trim_matches(|c: char| !c.is_ascii_digit())
            .parse()
            .unwrap()
    };
    let mut rounds = Vec::new();
    let mut freeze = None;
    for l in stdout.lines() {
        let w: Vec<&str> = l.split_whitespace().collect();
        if let Some(rest) = l.strip_prefix("precopy round ") {
            let r = num(rest.split(':').next().unwrap());
            rounds.push((r as u32, num(w[3]), num(w[5])));
        } else if l.starts_with("precopy freeze:") {
            freeze = Some((num(w[2]), num(w[4])));
        }
    }
    (
        rounds,
        freeze.unwrap_or_else(|| panic!("no freeze line in {stdout}")),
    )
}

#[test]
fn precopy_dump_of_a_process_rewriting_256mib_restores_byte_exact() {
    let _g = serial();
    let dir = tempdir();
    let exe = compile_c(dir.path(), "rewriter", REWRITER_C, &[]);
    let argv = [exe.to_str().unwrap(), "3000", "16"];
    let ref_out = dir.path().join("ref.out");
    let st = spawn(dir.path(), &argv, &ref_out).wait().unwrap();
    assert!(st.success(), "reference run failed: {st}");
    let reference = std::fs::read(&ref_out).unwrap();

    let out = dir.path().join("mig.out");
    let mut child = spawn(dir.path(), &argv, &out);
    wait_line(&out, "ready");
    std::thread::sleep(Duration::from_millis(300));
    let images = dir.path().join("img");
    let o = Command::new(migd())
        .args(["dump", "--precopy", "--precopy-stop-below", "65536"])
        .args(["--precopy-rounds", "6", "--pid", &child.id().to_string()])
        .arg("--images")
        .arg(&images)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "migd dump --precopy failed: {stdout}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let _ = child.wait();
    eprintln!("{stdout}");
    let (rounds, (freeze_pages, freeze_bytes)) = parse_rounds(&stdout);
    assert!(
        rounds.len() >= 3,
        "expected several rounds while it ran: {stdout}"
    );
    let r1 = rounds[0].2;
    assert!(
        r1 >= 256 << 20,
        "round 1 wrote {r1} bytes, less than the 256 MiB buffer"
    );
    for &(r, _, b) in &rounds[1..] {
        assert!(
            b > 0,
            "round {r} found nothing written, yet the process writes all the time: {stdout}"
        );
        assert!(
            b < r1 / 2,
            "round {r} wrote {b} bytes, not much less than round 1 ({r1}): tracking does not work"
        );
    }
    assert!(
        freeze_pages > 0 && freeze_bytes < r1 / 4,
        "the freeze wrote {freeze_bytes} bytes: {stdout}"
    );
    // pages.img holds exactly what the rounds and the freeze wrote (old copies too).
    let total: u64 = rounds.iter().map(|r| r.2).sum::<u64>() + freeze_bytes;
    let m = migd::engine::image::read_image(&images).expect("reading the pre-copy image");
    assert_eq!(
        m.pages_len, total,
        "pages.img size vs the bytes the rounds reported"
    );
    let saved: u64 = m
        .areas
        .iter()
        .flat_map(|a| &a.runs)
        .map(|r| r.1 * 4096)
        .sum();
    assert!(
        saved >= 256 << 20 && saved <= m.pages_len,
        "the runs point at {saved} bytes of a {} byte pages.img",
        m.pages_len
    );
    // pages.ready (what a destination may read during pre-copy): lengths growing,
    // every round but the last announced (the destination must not read in the
    // freeze), and no range it calls replaced holds a page the image uses.
    let ready = std::fs::read(images.join(migd::engine::image::PAGES_READY_FILE))
        .expect("pages.ready written by the rounds");
    let mut at = 0;
    let mut lens = Vec::new();
    let mut replaced = Vec::new();
    while let Some(rec) = migd::engine::image::parse_pages_ready(&ready[at..]) {
        lens.push(rec.len);
        replaced.extend(rec.replaced);
        at += rec.size;
    }
    assert_eq!(at, ready.len(), "pages.ready holds whole records only");
    assert!(
        lens.windows(2).all(|w| w[0] <= w[1]),
        "lengths shrink: {lens:?}"
    );
    let all_but_last: u64 = rounds[..rounds.len() - 1].iter().map(|r| r.2).sum();
    let all_rounds = all_but_last + rounds[rounds.len() - 1].2;
    let last = lens.last().copied().unwrap_or(0);
    assert!(
        all_but_last <= last && last < all_rounds,
        "the last record ({last}) should lie in the last round ({all_but_last}..{all_rounds}), \
         not at its end: {lens:?}"
    );
    assert!(
        !replaced.is_empty(),
        "the rounds rewrote pages, yet no copy is called replaced"
    );
    for &(_, n, off) in m.areas.iter().flat_map(|a| &a.runs) {
        let (lo, hi) = (off, off + n * 4096);
        if let Some(r) = replaced.iter().find(|r| r.0 < hi && lo < r.1) {
            panic!("pages.ready calls {r:?} replaced, but a run uses {lo}..{hi}");
        }
    }

    restore_and_wait(&images, "rewriter");
    let got = std::fs::read(&out).unwrap();
    assert_same_output("256 MiB rewriter, pre-copy dump", &reference, &got);
}

/// Runs the rewriter for `steps` steps, dumps it with pre-copy as `opts` says while
/// it runs, restores the image and checks that the output is byte-identical to an
/// unmigrated run's; returns the rounds' and the freeze's reports.
fn rewriter_precopy(steps: &str, opts: &PrecopyOptions, what: &str) -> Vec<RoundReport> {
    let _g = serial();
    let dir = tempdir();
    let exe = compile_c(dir.path(), "rewriter", REWRITER_C, &[]);
    let argv = [exe.to_str().unwrap(), steps, "16"];
    let ref_out = dir.path().join("ref.out");
    assert!(spawn(dir.path(), &argv, &ref_out).wait().unwrap().success());
    let reference = std::fs::read(&ref_out).unwrap();

    let out = dir.path().join("mig.out");
    let mut child = spawn(dir.path(), &argv, &out);
    let pid = child.id() as i32;
    wait_line(&out, "ready");
    std::thread::sleep(Duration::from_millis(200));
    let images = dir.path().join("img");
    let mut reports: Vec<RoundReport> = Vec::new();
    let mut held = dump_frozen_precopy(pid, &images, opts, None, |r| reports.push(r.clone()))
        .expect("pre-copy dump");
    held.settle();
    held.kill();
    let _ = child.wait();
    restore_and_wait(&images, what);
    assert_same_output(what, &reference, &std::fs::read(&out).unwrap());
    reports
}

#[test]
fn a_round_not_worth_writing_leaves_its_pages_to_the_freeze() {
    // No shrink is enough: round 2's scan (pages written during round 1) is never
    // written, and its pages, write-protected again by that scan, must reach the
    // image at the freeze all the same (else the restore finds round 1's copies).
    let opts = PrecopyOptions {
        max_rounds: 5,
        stop_below_bytes: 0,
        min_shrink: 0.0,
        throttle_max_percent: 0,
    };
    let reports = rewriter_precopy("2000", &opts, "rewriter, round 2 left to the freeze");
    assert_eq!(reports.len(), 2, "round 1, then the freeze: {reports:?}");
    assert!(reports[1].frozen);
    assert!(
        reports[1].pages > 0,
        "the freeze wrote nothing, yet the process wrote pages all through round 1: {reports:?}"
    );
}

#[test]
fn rounds_that_do_not_shrink_throttle_the_process_and_it_restores_byte_exact() {
    // No shrink is enough: each round after the first raises the throttle (50%,
    // then 75%, its most here); the round after that is left to the freeze.
    let opts = PrecopyOptions {
        max_rounds: 8,
        stop_below_bytes: 0,
        min_shrink: 0.0,
        throttle_max_percent: 75,
    };
    let reports = rewriter_precopy("2500", &opts, "rewriter, throttled during pre-copy");
    let throttles: Vec<(u32, bool, u32)> = reports
        .iter()
        .map(|r| (r.round, r.frozen, r.throttle_percent))
        .collect();
    assert_eq!(
        throttles,
        vec![(1, false, 0), (2, false, 50), (3, false, 75), (4, true, 0)],
        "{reports:?}"
    );
}

/// Fills two areas; on SIGUSR1 frees the first half of A (MADV_DONTNEED) and reads a
/// quarter back, rewrites another quarter, and replaces B by a fresh mapping at the
/// same address with one page written; then runs on a while and checks what it sees.
const FREER_C: &str = r#"
#define _GNU_SOURCE
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <sys/mman.h>
#include <unistd.h>
#define PAGE 4096
#define NA 16384
#define NB 4096
static volatile sig_atomic_t go;
static void on_usr1(int s) { (void)s; go = 1; }
static uint64_t pat(uint64_t tag, uint64_t p, uint64_t i) {
    uint64_t x = (tag * 0x9E3779B97F4A7C15ull) ^ (p * 0xC2B2AE3D27D4EB4Full) ^ (i * 0x165667B19E3779F9ull);
    x ^= x >> 31;
    return x | 1;
}
static void fill(uint64_t *a, uint64_t tag, uint64_t p) { for (uint64_t i = 0; i < 512; i++) a[p * 512 + i] = pat(tag, p, i); }
static int holds(uint64_t *a, uint64_t tag, uint64_t p) {
    for (uint64_t i = 0; i < 512; i++) if (a[p * 512 + i] != pat(tag, p, i)) return 0;
    return 1;
}
static int zero(uint64_t *a, uint64_t p) {
    for (uint64_t i = 0; i < 512; i++) if (a[p * 512 + i]) return 0;
    return 1;
}
int main(void) {
    signal(SIGUSR1, on_usr1);
    uint64_t *A = mmap(0, (size_t)NA * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    uint64_t *B = mmap(0, (size_t)NB * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    for (uint64_t p = 0; p < NA; p++) fill(A, 1, p);
    for (uint64_t p = 0; p < NB; p++) fill(B, 2, p);
    printf("ready\n"); fflush(stdout);
    while (!go) usleep(1000);
    madvise(A, (size_t)NA / 2 * PAGE, MADV_DONTNEED);
    volatile uint64_t s = 0;
    for (uint64_t p = 0; p < NA / 4; p++) s += A[p * 512];
    for (uint64_t p = NA / 2; p < NA / 2 + NA / 4; p++) fill(A, 3, p);
    void *b = B;
    munmap(B, (size_t)NB * PAGE);
    uint64_t *B2 = mmap(b, (size_t)NB * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
    fill(B2, 4, 7);
    printf("freed\n"); fflush(stdout);
    uint64_t *C = malloc(4 << 20);
    for (int k = 0; k < 1500; k++) { C[((uint64_t)k * 512) % ((4 << 20) / 8)] = k; usleep(1000); }
    int bad = 0;
    for (uint64_t p = 0; p < NA / 2; p++) if (!zero(A, p)) { printf("BAD: A page %llu (freed) is not zero\n", (unsigned long long)p); bad++; break; }
    for (uint64_t p = NA / 2; p < NA / 2 + NA / 4; p++) if (!holds(A, 3, p)) { printf("BAD: A page %llu lost its rewrite\n", (unsigned long long)p); bad++; break; }
    for (uint64_t p = NA / 2 + NA / 4; p < NA; p++) if (!holds(A, 1, p)) { printf("BAD: A page %llu lost its first fill\n", (unsigned long long)p); bad++; break; }
    for (uint64_t p = 0; p < NB; p++) {
        int ok = p == 7 ? holds(B2, 4, 7) : zero(B2, p);
        if (!ok) { printf("BAD: page %llu of the remapped B is wrong (stale data?)\n", (unsigned long long)p); bad++; break; }
    }
    printf(bad ? "verify FAILED\n" : "verify ok\n");
    fflush(stdout);
    return bad != 0;
}
"#;

#[test]
fn memory_freed_or_remapped_during_precopy_comes_back_as_zeros_not_stale_data() {
    let _g = serial();
    let dir = tempdir();
    let exe = compile_c(dir.path(), "freer", FREER_C, &[]);
    let out = dir.path().join("freer.out");
    let mut child = spawn(dir.path(), &[exe.to_str().unwrap()], &out);
    let pid = child.id() as i32;
    wait_line(&out, "ready");
    let images = dir.path().join("img");
    let opts = PrecopyOptions {
        max_rounds: 3,
        stop_below_bytes: 0,
        min_shrink: f64::INFINITY,
        throttle_max_percent: 0,
    };
    let mut reports: Vec<RoundReport> = Vec::new();
    let mut held = dump_frozen_precopy(pid, &images, &opts, None, |r| {
        reports.push(r.clone());
        if r.round == 1 && !r.frozen {
            // The pages are saved now; free and remap them before round 2.
            migd::sys::kill(pid, libc::SIGUSR1).unwrap();
            wait_line(&out, "freed");
        }
    })
    .expect("pre-copy dump");
    // The tracking ends off the freeze's critical path, before any thaw or kill.
    held.settle();
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    assert!(
        !smaps
            .lines()
            .any(|l| l.starts_with("VmFlags:") && l.contains(" uw")),
        "the held process still has areas registered for write-protect"
    );
    held.kill();
    let _ = child.wait();
    assert_eq!(reports.len(), 4, "3 rounds and the freeze: {reports:?}");
    assert!(
        reports[0].bytes >= 80 << 20,
        "round 1 saved A and B: {reports:?}"
    );
    assert!(reports[3].frozen);
    restore_and_wait(&images, "freer");
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(
        text.lines().any(|l| l == "verify ok"),
        "the restored process saw wrong memory:\n{text}"
    );
}

#[test]
fn dropping_a_tracker_leaves_the_process_running_as_it_was() {
    let _g = serial();
    let dir = tempdir();
    let exe = compile_c(dir.path(), "rewriter", REWRITER_C, &[]);
    let argv = [exe.to_str().unwrap(), "1500", "8"];
    let ref_out = dir.path().join("ref.out");
    assert!(spawn(dir.path(), &argv, &ref_out).wait().unwrap().success());
    let reference = std::fs::read(&ref_out).unwrap();

    let out = dir.path().join("run.out");
    let mut child = spawn(dir.path(), &argv, &out);
    let pid = child.id() as i32;
    wait_line(&out, "ready");
    let images = dir.path().join("img");
    let mut t = Tracker::start(pid, &images).expect("start tracking");
    let s1 = t.scan_round().expect("round 1's scan");
    let r1 = t.write_round(s1).expect("round 1");
    let s2 = t.scan_round().expect("round 2's scan");
    let r2 = t.write_round(s2).expect("round 2");
    assert!(r2.bytes < r1.bytes, "round 2 ({r2:?}) vs round 1 ({r1:?})");
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    assert!(
        smaps.contains(" uw"),
        "no area is registered while tracking"
    );
    drop(t);
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    assert!(
        !smaps
            .lines()
            .any(|l| l.starts_with("VmFlags:") && l.contains(" uw")),
        "an area is still registered for write-protect after the tracker was dropped"
    );
    assert!(
        !images.join("pages.img").exists(),
        "the unfinished pages.img was left behind"
    );
    let st = child.wait().unwrap();
    assert!(
        st.success(),
        "the process did not finish cleanly after tracking: {st}"
    );
    assert_same_output(
        "rewriter after a dropped tracker",
        &reference,
        &std::fs::read(&out).unwrap(),
    );
}

#[test]
fn a_refused_process_gets_nothing_injected() {
    let _g = serial();
    let dir = tempdir();
    let out = dir.path().join("sock.out");
    let prog =
        "import socket, time\ns = socket.socket()\nprint('ready', flush=True)\ntime.sleep(30)\n";
    let mut child = spawn(dir.path(), &["/usr/bin/python3", "-c", prog], &out);
    let pid = child.id() as i32;
    wait_line(&out, "ready");
    let images = dir.path().join("img");
    let e = match dump_frozen_precopy(pid, &images, &PrecopyOptions::default(), None, |_| {}) {
        Err(e) => e,
        Ok(_) => panic!("a process holding a socket was dumped"),
    };
    assert!(matches!(e, DumpError::Refused { .. }), "got {e}");
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    assert!(
        !smaps.contains(" uw"),
        "an area was registered before the refusal"
    );
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
        let link = std::fs::read_link(fd.unwrap().path()).unwrap_or_default();
        assert!(
            !link.to_string_lossy().contains("userfaultfd"),
            "a userfaultfd was left in the refused process"
        );
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Two python3 threads hashing for about 5 s here (the dump starts 0.7 s in and
/// must end before the program does, also on a loaded machine: with 1.7 s of
/// work, a slow round 2 once met the program's exit).
const PY_THREADS: &str = r#"
import threading, hashlib
lock = threading.Lock()
results = {}
data = [bytearray(1 << 20) for _ in range(32)]
def work(name, n):
    h = hashlib.sha256(name.encode())
    for i in range(n):
        h.update(str(i).encode())
        if i % 20000 == 0:
            with lock:
                results[(name, i)] = h.hexdigest()[:16]
                data[(i // 20000) % 32][i % 1000] = i % 251
ts = [threading.Thread(target=work, args=(nm, 12000000)) for nm in ("a", "b")]
for t in ts: t.start()
for t in ts: t.join()
for k in sorted(results): print(k[0], k[1], results[k])
print(sum(sum(d) for d in data))
"#;

#[test]
fn python3_with_two_threads_survives_a_precopy_dump() {
    let _g = serial();
    let dir = tempdir();
    std::fs::write(dir.path().join("two.py"), PY_THREADS).unwrap();
    let argv = ["/usr/bin/python3", "two.py"];
    let ref_out = dir.path().join("ref.out");
    assert!(spawn(dir.path(), &argv, &ref_out).wait().unwrap().success());
    let reference = std::fs::read(&ref_out).unwrap();

    let out = dir.path().join("mig.out");
    let mut child = spawn(dir.path(), &argv, &out);
    std::thread::sleep(Duration::from_millis(700));
    let images = dir.path().join("img");
    let o = Command::new(migd())
        .args([
            "dump",
            "--precopy",
            "--pid",
            &child.id().to_string(),
            "--images",
        ])
        .arg(&images)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "migd dump --precopy of python3 failed: {stdout}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let _ = child.wait();
    let (rounds, _) = parse_rounds(&stdout);
    assert!(rounds.len() >= 2, "expected at least two rounds: {stdout}");
    restore_and_wait(&images, "python3 two threads");
    assert_same_output(
        "python3 two threads, pre-copy dump",
        &reference,
        &std::fs::read(&out).unwrap(),
    );
}
